//! The words the peer's modules share: link ids, encoded lines, whom to dial, how a link opens, and
//! the time a decision is made at. They live here, apart from any module that uses them, so the
//! state machine, the driver and the link tasks import this one module and never each other in a loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::Protocol;

/// One link (connection) of a peer, numbered from 0 in the order links open; never reused.
pub type LinkId = u64;

/// Encoded bytes for one link's queue, shared between links when they are the same.
pub type Line = Arc<[u8]>;

/// Someone to dial, and what we know of the protocol it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub addr: SocketAddr,
    pub known: Option<Protocol>,
}

/// How a link starts: what its reader expects first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We dialled and our hello (0xFF first) is queued. A hello back means p2pchat; original bytes back
    /// mean an original peer that typed before reading our probe; a close or silence means an original
    /// peer that dropped the link on our 0xFF byte.
    Probe,
    /// We dialled a known original peer: the original protocol from the first byte.
    DialOriginal,
    /// Accepted: the first bytes decide (the p2pchat magic, else original; silence too).
    Accepted,
}

/// When something happens, as the state machine is told: a monotonic instant for its timers, and the
/// wall clock in milliseconds since the Unix epoch for message stamps and freshness. The driver reads
/// both from the system; the simulator makes them up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    pub wall_ms: u64,
}
