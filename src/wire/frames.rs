//! The p2pchat extension protocol's framing, spoken only between p2pchat ends.
//!
//! A p2pchat end opens with [`MAGIC`] (its first byte is 0xFF, which is never valid UTF-8, so an original
//! peer decoding the chunk fails before printing anything and drops the connection), then sends frames:
//! a 4-byte big-endian length followed by that many bytes of JSON. Every frame is an object with a
//! `"type"`; unknown types decode to [`Frame::Unknown`] and unknown fields are ignored, so later versions
//! can add both. A `hello` carries the protocol version `v`; ends with a different `v` refuse each other
//! with an `error` frame (code [`ERR_VERSION`]).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::protocol::{MAGIC, PROTOCOL_VERSION};

/// Largest frame accepted (a 64 KiB text plus its envelope fits easily).
pub const MAX_FRAME_BYTES: usize = 256 * 1024;
/// Largest welcome a peer accepts from a tracker: a room of 16,384 members at their longest (IPv6).
pub const MAX_WELCOME_BYTES: usize = 4 * 1024 * 1024;

pub const ERR_VERSION: &str = "version";
pub const ERR_ROOM: &str = "room";
pub const ERR_MALFORMED: &str = "malformed";
pub const ERR_IDENTITY: &str = "identity";
/// The acceptor already has a link to this peer and keeps that one.
pub const ERR_DUPLICATE: &str = "duplicate";

/// Introduces an end: sent first by a dialler, answered by the acceptor; also registers with a tracker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub v: u32,
    /// A random id for this peer's session (tells two links to the same peer apart from two peers).
    pub id: String,
    /// The sender's display name (absent when registering with a tracker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The room ("" is the default room, the one original peers are in).
    #[serde(default)]
    pub room: String,
    /// The port this end accepts peers on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Room members the sender is connected to and where they listen: peer exchange.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<Member>,
    /// In a private room: the sender's identity key, proven for this link (see `identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityProof>,
    /// To a tracker: this is a link to its relay, not a registration (see `tracker::hub`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
    /// The sender neither pings this link nor drops it for being silent: it leaves a peer that
    /// vanished to TCP keep-alive, in the kernel. A hello without it asks for pings (see `ping`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quiet: bool,
}

/// An identity key and its signature over the link's handshake hash: the holder of the key is the
/// other end of this very link (a proof copied from another link does not verify here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityProof {
    /// The Ed25519 public key, 64 hex digits.
    pub key: String,
    /// Its signature (128 hex digits) over "p2pchat identity v1", a 0 byte and the handshake hash.
    pub sig: String,
}

/// A room member as a p2pchat tracker lists it: in a welcome, a p2pchat member is just its address as a
/// string (the tracker's whole list is 18 bytes a member rather than 42); any other member, and every
/// member of a hello's peer exchange, is an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "MemberForm")]
pub struct Member {
    pub addr: String,
    /// Whether it registered as a p2pchat peer (else it is an original client).
    #[serde(default)]
    pub p2pchat: bool,
    /// Its session id (the `id` of its hello), in a hello's peer exchange: what a member asks a
    /// relay for when it cannot reach this one directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// The two ways a [`Member`] is written.
#[derive(Deserialize)]
#[serde(untagged)]
enum MemberForm {
    /// A p2pchat member with no id, as a welcome lists it.
    Address(String),
    Object {
        addr: String,
        #[serde(default)]
        p2pchat: bool,
        #[serde(default)]
        id: Option<String>,
    },
}

impl From<MemberForm> for Member {
    fn from(form: MemberForm) -> Self {
        match form {
            MemberForm::Address(addr) => Member { addr, p2pchat: true, id: None },
            MemberForm::Object { addr, p2pchat, id } => Member { addr, p2pchat, id },
        }
    }
}

/// A chat line between p2pchat peers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chat {
    /// Random, unique per message: the receiver shows each id once.
    pub id: String,
    pub from: String,
    pub room: String,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub ts: u64,
    /// The message's place in the room's order: the sender's hybrid logical clock (`history::clock`; its
    /// layout in `protocol`).
    /// 0 from a sender that does not stamp; the receiver then orders it by `ts`.
    #[serde(default)]
    pub hlc: u64,
    pub text: String,
    /// In a private room: the author's identity key (64 hex digits) and its signature (128) over the
    /// fields above (see `identity::sign_chat`), so no member passing it on can alter or forge it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
}

impl Chat {
    /// Where it sorts: its stamp, or the start of its `ts` millisecond when it has none.
    pub fn stamp(&self) -> u64 {
        if self.hlc == 0 {
            crate::protocol::stamp_at(self.ts)
        } else {
            self.hlc
        }
    }
}

/// A position in a room's order: a message's stamp and id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub hlc: u64,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    Hello(Hello),
    /// The tracker's answer to a registering peer: the room's other members.
    Welcome {
        v: u32,
        members: Vec<Member>,
        /// The address the tracker saw this peer at.
        you: String,
        /// The tracker relays between members that cannot reach each other (its operator turned
        /// that on): a member may open a link to it as to a member (a `hello` with a `name`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        relay: bool,
        /// The registration's `hello` said `quiet`, and this tracker needs no pings on it either: it
        /// watches the connection with TCP keep-alive. Without it, ping every 2 s.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
    },
    Msg(Chat),
    /// The sender now goes by `name`.
    Nick {
        name: String,
    },
    /// The sender is leaving on purpose (a closed link without it is a lost peer).
    Bye,
    /// Keep-alive: sent every couple of seconds; a link (or registration) silent for longer than its
    /// bound is dead.
    Ping,
    /// Peer → tracker: the original peers (listen addresses) this peer holds live links to, so the
    /// tracker keeps listing them without disturbing them.
    Vouch {
        originals: Vec<String>,
    },
    /// Ask for the room's history: the newest `limit` messages after `after` (all of them when absent),
    /// answered by `history` frames carrying the same `req`.
    HistoryRequest {
        req: u32,
        limit: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<Position>,
    },
    /// Part of an answer, oldest first; the last part has `more: false`. An answer may hold fewer
    /// messages than asked (the answerer's log is shorter, or its size and rate limits cut it).
    History {
        req: u32,
        msgs: Vec<Chat>,
        more: bool,
    },
    /// Peer → p2pchat tracker: the member listening at `addr` cannot be reached; have it dial me
    /// while I dial it, each from our listening port (a simultaneous open through both NATs).
    PunchRequest {
        addr: String,
    },
    /// p2pchat tracker → registered peer: the member at `addr` cannot reach you; dial it now, from
    /// your listening port.
    Punch {
        addr: String,
    },
    /// Peer → member: I cannot reach the member whose session id is `peer`, and you are linked to
    /// it; pass its messages and mine between us. With `addr` (and `peer` empty): the member that
    /// listens there, whose session id the asker never learned (it was not in any `hello`).
    RelayAsk {
        peer: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        addr: Option<String>,
    },
    /// Relay → member: you now reach the member `peer` (called `name`, listening at `addr`) through
    /// me; every message it sends comes to you on this link, and yours go to it. Sent again when
    /// its name changes.
    RelayOpen {
        peer: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        addr: String,
    },
    /// Relay → member: I no longer pass messages between you and `peer` (it left, said goodbye when
    /// `clean`; or I was never linked to it).
    RelayClose {
        peer: String,
        reason: String,
        clean: bool,
    },
    /// A private room's message, sealed end to end under the room key (see `private`): `data` is hex of
    /// a 24-byte nonce and the XChaCha20-Poly1305 ciphertext of the signed `msg` object, `id` (its id,
    /// for telling copies apart unopened) its associated data. Whoever passes it on without the key
    /// sees only this.
    Sealed {
        id: String,
        data: String,
    },
    /// Peer → member, once when their link is up: the room's recent messages we hold, per bucket of
    /// stamps (start in milliseconds, count, XOR of the ids' keys) from `since`; the other side
    /// asks for what it lacks (see `peer::recent`). With `reply`, the other side also sends its
    /// own (a relay that just opened: what it passes on from now is not what we missed).
    Summary {
        since: u64,
        buckets: Vec<(u64, u32, u64)>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reply: bool,
    },
    /// Opens a link in a private room, in place of `hello`: only the version and the room's opaque
    /// id (see `private`). The Noise handshake follows, then everything else, encrypted.
    SecureHello {
        v: u32,
        room: String,
    },
    /// The sender refuses the link; it closes after this.
    Error {
        code: String,
        message: String,
    },
    /// A frame type this version does not know; ignored.
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a frame of {len} bytes is larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("a frame is not valid p2pchat JSON: {0}")]
    Malformed(String),
}

/// The bytes of one frame, length prefix included.
pub fn encode(frame: &Frame) -> Vec<u8> {
    // Serializing these plain structs cannot fail; an empty object would be refused by the peer.
    let json = serde_json::to_vec(frame).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// One member as it appears in a welcome's `members` array (see [`Welcome`]): the address alone for a
/// p2pchat member without an id.
pub fn encode_member(member: &Member) -> Box<[u8]> {
    let json = match member {
        Member { addr, p2pchat: true, id: None } => serde_json::to_vec(addr),
        other => serde_json::to_vec(other),
    };
    json.unwrap_or_default().into_boxed_slice()
}

/// What a tracker's welcome says besides its list (see [`Frame::Welcome`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offers {
    /// It relays between members.
    pub relay: bool,
    /// It needs no pings on this registration.
    pub quiet: bool,
}

/// A tracker's whole answer to a registering peer: [`MAGIC`] and a `welcome` frame (decodes as
/// [`Frame::Welcome`]). Its members come in blocks, each already encoded by [`encode_member`] and
/// joined by commas; the tracker's registry keeps them so and shares them with every answer, so a join
/// into a room of thousands copies no member: the answer goes out as [`slices`](Self::slices) in one
/// vectored write.
#[derive(Debug, Clone)]
pub struct Welcome {
    head: Vec<u8>,
    blocks: Vec<std::sync::Arc<[u8]>>,
    /// Every byte of the answer, [`MAGIC`] included.
    byte_len: usize,
}

impl Welcome {
    const TAIL: &'static [u8] = b"]}";

    /// The answer listing `blocks` in order (empty blocks are skipped), to a peer seen at `you`.
    pub fn new(blocks: impl IntoIterator<Item = std::sync::Arc<[u8]>>, you: &str, offers: Offers) -> Self {
        let blocks: Vec<_> = blocks.into_iter().filter(|b| !b.is_empty()).collect();
        let you = serde_json::to_string(you).unwrap_or_else(|_| "\"\"".to_owned());
        let relay = if offers.relay { r#""relay":true,"# } else { "" };
        let quiet = if offers.quiet { r#""quiet":true,"# } else { "" };
        let json_head = format!(r#"{{"type":"welcome","v":{PROTOCOL_VERSION},"you":{you},{relay}{quiet}"members":["#);
        let commas = blocks.len().saturating_sub(1);
        let body_len = json_head.len() + blocks.iter().map(|b| b.len()).sum::<usize>() + commas + Self::TAIL.len();
        let mut head = Vec::with_capacity(MAGIC.len() + 4 + json_head.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(body_len as u32).to_be_bytes());
        head.extend_from_slice(json_head.as_bytes());
        Self { head, blocks, byte_len: MAGIC.len() + 4 + body_len }
    }

    /// The answer's bytes in order, for a vectored write.
    pub fn slices(&self) -> Vec<std::io::IoSlice<'_>> {
        let mut out = Vec::with_capacity(2 * self.blocks.len() + 2);
        out.push(std::io::IoSlice::new(&self.head));
        for (i, block) in self.blocks.iter().enumerate() {
            if i > 0 {
                out.push(std::io::IoSlice::new(b","));
            }
            out.push(std::io::IoSlice::new(block));
        }
        out.push(std::io::IoSlice::new(Self::TAIL));
        out
    }

    /// The whole answer in one buffer (the tracker never needs it: it writes the slices).
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        self.slices().iter().flat_map(|s| s.iter().copied()).collect()
    }

    pub fn byte_len(&self) -> usize {
        self.byte_len
    }
}

/// [`MAGIC`] followed by one frame: how every p2pchat connection starts.
pub fn encode_opening(frame: &Frame) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&encode(frame));
    out
}

/// What the first bytes received on a connection say about the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Too few bytes to tell yet.
    Undecided,
    /// It starts with [`MAGIC`]: a p2pchat end.
    P2pchat,
    /// Anything else: an original end (which never sends a 0xFF byte).
    Original,
}

pub fn classify_opening(first: &[u8]) -> Opening {
    let n = first.len().min(MAGIC.len());
    if first[..n] != MAGIC[..n] {
        Opening::Original
    } else if n < MAGIC.len() {
        Opening::Undecided
    } else {
        Opening::P2pchat
    }
}

/// Splits a byte stream (after [`MAGIC`]) into frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf`: consumed frames are dropped in one move per `feed`, not
    /// one per frame, so a read holding hundreds of small frames costs no more than their bytes.
    start: usize,
    max_frame: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::with_limit(MAX_FRAME_BYTES)
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder accepting frames of up to `max_frame` bytes (a tracker's welcome lists a whole room).
    pub fn with_limit(max_frame: usize) -> Self {
        Self { buf: Vec::new(), start: 0, max_frame }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.read_buffer().extend_from_slice(bytes);
    }

    /// The buffer the next read appends to, the bytes not decoded yet at its start: a link reads
    /// straight into its decoder (no second buffer per link, no copy per read). The caller sizes it.
    pub fn read_buffer(&mut self) -> &mut Vec<u8> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        &mut self.buf
    }

    /// Give the buffer's memory back once every byte fed was decoded: a link then holds a buffer only
    /// while bytes wait in it, not through the silences between its messages.
    pub fn release_if_drained(&mut self) {
        if self.start == self.buf.len() {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// The bytes fed but not decoded yet (what follows the frames taken), leaving it empty.
    pub fn take_rest(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.start);
        self.buf.clear();
        self.start = 0;
        rest
    }

    /// The next complete frame, if one is buffered. After an error the stream cannot be trusted.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let pending = &self.buf[self.start..];
        let Some(prefix) = pending.get(..4) else { return Ok(None) };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge { len, max: self.max_frame });
        }
        if pending.len() < 4 + len {
            return Ok(None);
        }
        let parsed = decode_body(&pending[4..4 + len]);
        self.start += 4 + len;
        parsed.map(Some).map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

/// How a chat line's frame starts as [`encode`] writes it: the tag first.
const MSG_OPENING: &[u8] = br#"{"type":"msg","#;

/// One frame's JSON. Nearly every frame is a chat line: serde decodes a tagged enum by first copying
/// every field into a tree of its own, so a line that starts as ours do is read straight into a
/// [`Chat`] (which ignores the `type` field); anything else takes the general way.
fn decode_body(body: &[u8]) -> serde_json::Result<Frame> {
    if body.starts_with(MSG_OPENING) {
        return serde_json::from_slice::<Chat>(body).map(Frame::Msg);
    }
    serde_json::from_slice(body)
}

/// A random 128-bit identifier as 32 hex digits.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to the clock and a counter, unique enough within one process.
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        bytes[..8].copy_from_slice(&(nanos as u64).to_be_bytes());
        bytes[8..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    }
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    /// Ids, keys, signatures and sealed data have one spelling each: hex digits only (a parser that
    /// also took a sign, "+f", would give one value two).
    fn hex_is_hex_digits_only() {
        use hex::FromHex;
        assert_eq!(hex::decode("0aFf").ok(), Some(vec![0x0a, 0xff]));
        for bad in ["+f", "-1", "0g", "0", " 0a", "+f+f"] {
            assert!(hex::decode(bad).is_err(), "{bad:?}");
        }
        assert!(<[u8; 2]>::from_hex("+f+f").is_err());
        assert_eq!(hex::encode([0x0a, 0xff]), "0aff", "lowercase, as ids have always been written");
    }

    fn hello() -> Hello {
        Hello {
            v: PROTOCOL_VERSION,
            id: random_id(),
            name: Some("ana".into()),
            room: "".into(),
            listen_port: Some(5000),
            peers: vec![],
            identity: None,
            relay: false,
            quiet: false,
        }
    }

    #[test]
    fn the_opening_starts_with_a_byte_no_utf8_decoder_accepts() {
        let opening = encode_opening(&Frame::Hello(hello()));
        assert_eq!(opening[0], 0xFF);
        assert!(std::str::from_utf8(&opening).is_err());
        assert_eq!(classify_opening(&opening), Opening::P2pchat);
    }

    #[test]
    fn classification_of_first_bytes() {
        assert_eq!(classify_opening(b""), Opening::Undecided);
        assert_eq!(classify_opening(b"\xFFp2p"), Opening::Undecided);
        assert_eq!(classify_opening(b"<ana> :: hi"), Opening::Original);
        assert_eq!(classify_opening(b"\xFFjunk"), Opening::Original);
    }

    #[test]
    fn frames_round_trip_through_any_split() {
        let frames = vec![
            Frame::Hello(hello()),
            Frame::Msg(Chat {
                id: random_id(),
                from: "ana".into(),
                room: "x".into(),
                ts: 1,
                hlc: 7,
                text: "olá ☃".into(),
                ..Chat::default()
            }),
            Frame::Msg(Chat {
                id: random_id(),
                text: "signed".into(),
                key: Some("ab".repeat(32)),
                sig: Some("cd".repeat(64)),
                ..Chat::default()
            }),
            Frame::Nick { name: "bia".into() },
            Frame::Bye,
            Frame::Ping,
            Frame::Vouch { originals: vec!["10.0.0.1:5000".into()] },
            Frame::HistoryRequest { req: 3, limit: 100, after: Some(Position { hlc: 1 << 40, id: random_id() }) },
            Frame::HistoryRequest { req: 4, limit: 0, after: None },
            Frame::History {
                req: 3,
                msgs: vec![Chat {
                    id: random_id(),
                    from: "bia".into(),
                    room: "x".into(),
                    ts: 2,
                    hlc: 9,
                    text: "old".into(),
                    ..Chat::default()
                }],
                more: true,
            },
            Frame::RelayAsk { peer: random_id(), addr: None },
            Frame::RelayAsk { peer: String::new(), addr: Some("10.0.0.3:5000".into()) },
            Frame::RelayOpen { peer: random_id(), name: Some("bia".into()), addr: "10.0.0.2:5000".into() },
            Frame::RelayClose { peer: random_id(), reason: "left".into(), clean: true },
            Frame::SecureHello { v: PROTOCOL_VERSION, room: random_id() },
            Frame::Sealed { id: random_id(), data: "00ff".into() },
            Frame::Summary { since: 1_750_000_000_000, buckets: vec![(1_750_000_010_000, 3, u64::MAX)], reply: true },
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(encode).collect();
        for cut in 0..bytes.len() {
            let mut decoder = FrameDecoder::new();
            let mut out = Vec::new();
            for (part, fed) in [(&bytes[..cut], cut), (&bytes[cut..], bytes.len())] {
                decoder.feed(part);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    out.push(frame);
                }
                let decoded: usize = out.iter().map(|f| encode(f).len()).sum();
                decoder.release_if_drained();
                // What is left is exactly the start of the next frame; nothing is held when that is nothing.
                let held = decoder.read_buffer();
                assert_eq!(held.as_slice(), &bytes[decoded..fed]);
                if held.is_empty() {
                    assert_eq!(held.capacity(), 0);
                }
            }
            assert_eq!(out, frames);
        }
    }

    #[test]
    fn unknown_fields_and_types_are_tolerated() {
        let mut decoder = FrameDecoder::new();
        for json in
            [r#"{"type":"hello","v":1,"id":"x","room":"","future":[1,2]}"#, r#"{"type":"teleport","to":"mars"}"#]
        {
            decoder.feed(&(json.len() as u32).to_be_bytes());
            decoder.feed(json.as_bytes());
        }
        assert!(matches!(decoder.next_frame(), Ok(Some(Frame::Hello(h))) if h.id == "x" && h.name.is_none()));
        assert_eq!(decoder.next_frame(), Ok(Some(Frame::Unknown)));
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let mut decoder = FrameDecoder::new();
        decoder.feed(&u32::MAX.to_be_bytes());
        assert_eq!(decoder.next_frame(), Err(FrameError::TooLarge { len: u32::MAX as usize, max: MAX_FRAME_BYTES }));
        let mut decoder = FrameDecoder::new();
        decoder.feed(&3u32.to_be_bytes());
        decoder.feed(b"{x}");
        assert!(matches!(decoder.next_frame(), Err(FrameError::Malformed(_))));
    }

    /// Members encoded and joined into blocks of `per_block`, as the tracker's registry keeps them.
    fn blocks(members: &[Member], per_block: usize) -> Vec<std::sync::Arc<[u8]>> {
        members
            .chunks(per_block.max(1))
            .map(|chunk| chunk.iter().map(|m| encode_member(m).into_vec()).collect::<Vec<_>>().join(&b","[..]).into())
            .collect()
    }

    #[test]
    fn a_welcome_from_encoded_blocks_is_the_welcome_frame() {
        let members: Vec<Member> =
            (0..5).map(|i| Member { addr: format!("10.0.0.{i}:5000"), p2pchat: i % 2 == 0, id: None }).collect();
        let cases =
            [(0, 1, false, true), (1, 1, true, false), (3, 1, false, false), (5, 2, true, true), (5, 5, false, false)];
        for (count, per_block, relay, quiet) in cases {
            let mut parts = blocks(&members[..count], per_block);
            parts.insert(0, std::sync::Arc::from(&b""[..])); // an empty block is skipped
            let welcome = Welcome::new(parts, "10.9.8.7:\"1\"", Offers { relay, quiet });
            let opening = welcome.to_vec();
            assert_eq!(opening.len(), welcome.byte_len());
            assert_eq!(&opening[..MAGIC.len()], MAGIC);
            let mut decoder = FrameDecoder::new();
            decoder.feed(&opening[MAGIC.len()..]);
            let expected = Frame::Welcome {
                v: PROTOCOL_VERSION,
                members: members[..count].to_vec(),
                you: "10.9.8.7:\"1\"".into(),
                relay,
                quiet,
            };
            assert_eq!(decoder.next_frame(), Ok(Some(expected)));
            assert_eq!(decoder.next_frame(), Ok(None), "the length prefix covers exactly the frame");
        }
    }

    #[test]
    fn a_welcome_lists_a_p2pchat_member_by_its_address_alone() {
        let member =
            |p2pchat: bool, id: Option<&str>| Member { addr: "10.0.0.1:5000".into(), p2pchat, id: id.map(Into::into) };
        let cases: [(Member, &[u8]); 3] = [
            (member(true, None), br#""10.0.0.1:5000""#),
            (member(false, None), br#"{"addr":"10.0.0.1:5000","p2pchat":false}"#),
            (member(true, Some("abc")), br#"{"addr":"10.0.0.1:5000","p2pchat":true,"id":"abc"}"#),
        ];
        for (member, wire) in cases {
            assert_eq!(&*encode_member(&member), wire);
            assert_eq!(serde_json::from_slice::<Member>(wire).ok(), Some(member));
        }
        assert!(serde_json::from_slice::<Member>(b"5000").is_err(), "neither an address nor an object");
    }

    #[test]
    fn a_welcome_for_a_big_room_needs_the_welcome_limit() {
        let member = Member { addr: "[2001:db8::1234:5678:9abc:def0]:65535".into(), p2pchat: true, id: None };
        let opening = Welcome::new(blocks(&vec![member; 16_384], 512), "[2001:db8::1]:1", Offers::default()).to_vec();
        assert!(opening.len() > MAX_FRAME_BYTES && opening.len() < MAX_WELCOME_BYTES);
        let mut decoder = FrameDecoder::with_limit(MAX_WELCOME_BYTES);
        decoder.feed(&opening[MAGIC.len()..]);
        assert!(matches!(decoder.next_frame(), Ok(Some(Frame::Welcome { members, .. })) if members.len() == 16_384));
    }

    #[test]
    fn a_read_buffer_holds_what_was_not_decoded_and_nothing_decoded() {
        let (first, second) = (encode(&Frame::Ping), encode(&Frame::Bye));
        let mut decoder = FrameDecoder::new();
        decoder.feed(&first);
        decoder.feed(&second[..2]); // a frame cut by the read
        assert_eq!(decoder.next_frame(), Ok(Some(Frame::Ping)));
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.read_buffer().as_slice(), &second[..2], "only the cut frame's bytes remain");
        decoder.read_buffer().extend_from_slice(&second[2..]); // what a read appends
        assert_eq!(decoder.next_frame(), Ok(Some(Frame::Bye)));
        assert!(decoder.read_buffer().is_empty());
    }

    #[test]
    fn a_chat_line_decodes_the_same_whatever_the_order_of_its_fields() {
        let chat = Chat {
            id: "a1".into(),
            from: "ana".into(),
            room: "r".into(),
            ts: 5,
            hlc: 7,
            text: "hi".into(),
            key: None,
            sig: None,
        };
        let ours = encode(&Frame::Msg(chat.clone()));
        assert!(ours[4..].starts_with(MSG_OPENING), "the encoder writes the tag first");
        let tag_last = br#"{"id":"a1","from":"ana","room":"r","ts":5,"hlc":7,"text":"hi","type":"msg"}"#;
        for body in [&ours[4..], &tag_last[..]] {
            assert_eq!(decode_body(body).ok(), Some(Frame::Msg(chat.clone())));
        }
        let missing_text = br#"{"type":"msg","id":"a1","from":"ana","room":"r","ts":5}"#;
        assert!(decode_body(missing_text).is_err(), "a chat line without its text is refused either way");
    }

    #[test]
    fn ids_are_random() {
        assert_ne!(random_id(), random_id());
        assert_eq!(random_id().len(), 32);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut decoder = FrameDecoder::new();
            decoder.feed(&bytes);
            while let Ok(Some(_)) = decoder.next_frame() {}
        }
    }
}
