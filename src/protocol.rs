//! The protocol's constants in one place: what both the original scripts and p2pchat agree on (the
//! tracker's port, the default room), and what p2pchat's extension puts on the wire before and in
//! its frames (the magic, the version, the layout of a message's stamp). `wire/`, the tracker and the
//! peer read them from here, so none of them depends on another for a constant.

/// The original tracker's fixed port.
pub const DEFAULT_PORT: u16 = 7472;

/// The room original clients are in (they have no rooms): the empty name.
pub const DEFAULT_ROOM: &str = "";

/// The first bytes of every p2pchat connection, before any frame. 0xFF is never valid UTF-8, so an
/// original peer's decoder fails on it and drops the link instead of printing anything.
pub const MAGIC: &[u8] = b"\xFFp2pchat";

/// The extension protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A message's stamp (`hlc`, see `history::clock`) is milliseconds since the Unix epoch in its high
/// 48 bits and a counter in the low 16.
const STAMP_COUNTER_BITS: u32 = 16;

/// The stamp at the start of millisecond `ms`.
pub fn stamp_at(ms: u64) -> u64 {
    ms << STAMP_COUNTER_BITS
}

/// The wall-clock millisecond of a stamp.
pub fn millis_of(stamp: u64) -> u64 {
    stamp >> STAMP_COUNTER_BITS
}

/// Test support: PROTOCOL.md must give each of these known-answer vectors, which the unit tests check
/// the code against (so the document and the code cannot drift apart).
#[cfg(test)]
pub(crate) fn assert_protocol_md_gives(vectors: &[&str]) {
    let protocol = include_str!("../PROTOCOL.md");
    for vector in vectors {
        assert!(protocol.contains(vector), "PROTOCOL.md lacks {vector}");
    }
}
