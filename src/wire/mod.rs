//! The original protocol's two wire formats, as pure functions with no I/O.
//!
//! * [`peer_list`]: the tracker's answer, `ip:port` entries joined by `-` (or a lone `-`).
//! * [`chat`]: the peer-to-peer stream, `<NAME> :: text` written back to back with no terminator.
//!
//! Everything here is unit- and property-tested without sockets; the network modules only move bytes.

pub mod chat;
pub mod peer_list;
