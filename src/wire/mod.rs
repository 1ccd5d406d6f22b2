//! Every wire format p2pchat speaks, as pure functions and types with no I/O.
//!
//! * [`peer_list`]: the tracker's answer, `ip:port` entries joined by `-` (or a lone `-`).
//! * [`chat`]: the peer-to-peer stream, `<NAME> :: text` written back to back with no terminator.
//! * [`frames`]: the p2pchat extension protocol between p2pchat ends (magic, length-prefixed JSON).
//!
//! Everything here is unit- and property-tested without sockets; the network modules only move bytes.

pub mod chat;
pub mod frames;
pub mod peer_list;
