//! The original peer-to-peer chat stream: each line is written as the UTF-8 bytes `<NAME> :: text`, with
//! no terminator and no length, so the receiver sees an undelimited byte stream.
//!
//! Sending is trivial ([`encode_line`]) once the inputs are checked ([`validate_name`],
//! [`validate_text`]). Receiving is the hard part and lives in [`ChatDecoder`]:
//!
//! * bytes are decoded incrementally: a character split across reads is joined, invalid bytes become
//!   U+FFFD, nothing ever fails;
//! * the text is split into messages only at `<N> :: `, where N is the name the first header on this
//!   connection taught us; a `<x> :: ` with another name inside a text is just text;
//! * text is handed out as soon as it arrives (chat is latency-sensitive and the stream has no
//!   terminator), so a message whose bytes arrive in two bursts comes out as a first piece and a
//!   continuation piece of the same sender ([`Piece::starts_message`]). Only a possible header prefix at
//!   the very end of a read (`<ali`) or a header without text yet is held back until the next read or
//!   [`ChatDecoder::flush`] (which the connection calls when the stream goes idle). A split character
//!   waits for its other bytes however long they take (a lost TCP segment is retransmitted after
//!   200 ms and more), and becomes U+FFFD only if the stream ends first ([`ChatDecoder::finish`]).

use thiserror::Error;

/// The original client keeps at most this many characters of the name it reads.
pub const MAX_NAME_CHARS: usize = 40;
/// The longest text one `send` accepts, in UTF-8 bytes. The original had no limit; this keeps one
/// message within a few TCP segments and bounds what one call can queue to every peer.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

const SEPARATOR: &str = " :: ";

/// Why a name or a text cannot be sent.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InvalidInput {
    #[error("the name is empty")]
    EmptyName,
    #[error("the name has {0} characters; at most {MAX_NAME_CHARS} are allowed")]
    NameTooLong(usize),
    #[error("the name contains '>', which would end the '<NAME> :: ' prefix other peers split messages on")]
    NameHasAngleBracket,
    #[error("the name contains a line break or another control character")]
    NameHasControlChar,
    #[error("the room name has {0} characters; at most {MAX_ROOM_CHARS} are allowed")]
    RoomTooLong(usize),
    #[error("the room name contains a line break or another control character")]
    RoomHasControlChar,
    #[error("the message is empty")]
    EmptyText,
    #[error("the message contains a line break; send each line as its own message")]
    TextHasLineBreak,
    #[error("the message is {len} bytes long; at most {MAX_TEXT_BYTES} bytes are allowed")]
    TextTooLong { len: usize },
}

/// Check a display name: 1 to 40 characters, no `>` (it would end the header early for original
/// peers), no control characters.
pub fn validate_name(name: &str) -> Result<(), InvalidInput> {
    let chars = name.chars().count();
    if chars == 0 {
        return Err(InvalidInput::EmptyName);
    }
    if chars > MAX_NAME_CHARS {
        return Err(InvalidInput::NameTooLong(chars));
    }
    if name.contains('>') {
        return Err(InvalidInput::NameHasAngleBracket);
    }
    if name.chars().any(char::is_control) {
        return Err(InvalidInput::NameHasControlChar);
    }
    Ok(())
}

/// Longest room name, in characters.
pub const MAX_ROOM_CHARS: usize = 64;

/// Check a room name: at most 64 characters, no control characters. "" is the default room.
pub fn validate_room(room: &str) -> Result<(), InvalidInput> {
    let chars = room.chars().count();
    if chars > MAX_ROOM_CHARS {
        return Err(InvalidInput::RoomTooLong(chars));
    }
    if room.chars().any(char::is_control) {
        return Err(InvalidInput::RoomHasControlChar);
    }
    Ok(())
}

/// Check a text: one non-empty line, as the original's `input()` produces, within [`MAX_TEXT_BYTES`].
pub fn validate_text(text: &str) -> Result<(), InvalidInput> {
    if text.is_empty() {
        return Err(InvalidInput::EmptyText);
    }
    if text.contains(['\n', '\r']) {
        return Err(InvalidInput::TextHasLineBreak);
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(InvalidInput::TextTooLong { len: text.len() });
    }
    Ok(())
}

/// The exact bytes the original client writes for one typed line.
pub fn encode_line(name: &str, text: &str) -> Vec<u8> {
    format!("<{name}>{SEPARATOR}{text}").into_bytes()
}

/// A run of received text attributed to one sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The name from the header this text follows; `None` for text that arrived before any header.
    pub sender: Option<String>,
    pub text: String,
    /// False when this piece continues a message already handed out (its bytes arrived later).
    pub starts_message: bool,
}

/// Incremental UTF-8 decoding that never fails: split characters are joined across calls and invalid
/// bytes become U+FFFD, the same replacement `bytes.decode(errors="replace")` makes.
#[derive(Debug, Default)]
struct Utf8Stream {
    /// The first bytes of a character whose remaining bytes have not arrived yet (at most 3).
    partial: Vec<u8>,
}

impl Utf8Stream {
    fn decode(&mut self, bytes: &[u8]) -> String {
        let joined;
        let mut rest: &[u8] = if self.partial.is_empty() {
            bytes
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(bytes);
            joined = buf;
            &joined
        };
        let mut out = String::with_capacity(rest.len());
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    return out;
                }
                Err(err) => {
                    let (valid, tail) = rest.split_at(err.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match err.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &tail[bad..];
                        }
                        None => {
                            self.partial = tail.to_vec();
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// The stream ended or went idle inside a character: it will not be completed.
    fn finish(&mut self) -> Option<char> {
        if self.partial.is_empty() {
            return None;
        }
        self.partial.clear();
        Some(char::REPLACEMENT_CHARACTER)
    }
}

#[derive(Debug)]
struct OpenMessage {
    sender: Option<String>,
    /// Whether any piece of it was handed out yet.
    emitted: bool,
}

/// Turns the bytes of one connection into [`Piece`]s. One decoder per connection.
#[derive(Debug, Default)]
pub struct ChatDecoder {
    utf8: Utf8Stream,
    /// `<NAME> :: ` once the first header on this connection taught us NAME.
    header: Option<String>,
    name: Option<String>,
    /// Decoded text not handed out yet: at most a possible header prefix after each `feed`.
    pending: String,
    open: Option<OpenMessage>,
}

impl ChatDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The sender name learnt from the first header, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Feed the bytes of one read; returns every piece of text that can be handed out now.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let decoded = self.utf8.decode(bytes);
        self.pending.push_str(&decoded);
        self.drain(false)
    }

    /// The stream went idle: hand out what was held back in case a header followed (a possible
    /// header prefix, a header with no text yet). The first bytes of a split character stay: the
    /// rest is on its way.
    pub fn flush(&mut self) -> Vec<Piece> {
        self.drain(true)
    }

    /// The stream ended: hand out everything, a character that never got its last bytes as U+FFFD.
    pub fn finish(&mut self) -> Vec<Piece> {
        if let Some(replacement) = self.utf8.finish() {
            self.pending.push(replacement);
        }
        self.drain(true)
    }

    /// Whether [`flush`](Self::flush) would hand out something that `feed` held back.
    pub fn has_held_back(&self) -> bool {
        !self.pending.is_empty() || self.open.as_ref().is_some_and(|m| !m.emitted)
    }

    fn drain(&mut self, flushing: bool) -> Vec<Piece> {
        let mut out = Vec::new();
        while let Some((start, end, name)) = self.find_header() {
            let before = self.pending[..start].to_owned();
            self.pending.drain(..end);
            self.emit(before, true, &mut out);
            if self.header.is_none() {
                self.header = Some(format!("<{name}>{SEPARATOR}"));
                self.name = Some(name.clone());
            }
            self.open = Some(OpenMessage { sender: Some(name), emitted: false });
        }
        let keep_from = if flushing { self.pending.len() } else { self.held_back_from() };
        let ready: String = self.pending.drain(..keep_from).collect();
        self.emit(ready, flushing, &mut out);
        out
    }

    /// Hand out `text` as part of the open message. `ends_message` says that the message is complete,
    /// so a header that had no text at all is handed out as an empty message.
    fn emit(&mut self, text: String, ends_message: bool, out: &mut Vec<Piece>) {
        if text.is_empty() {
            if let Some(open) = self.open.as_mut().filter(|m| ends_message && !m.emitted) {
                open.emitted = true;
                out.push(Piece { sender: open.sender.clone(), text, starts_message: true });
            }
            return;
        }
        let open = self.open.get_or_insert(OpenMessage { sender: None, emitted: false });
        out.push(Piece { sender: open.sender.clone(), text, starts_message: !open.emitted });
        open.emitted = true;
    }

    /// The first complete header in `pending`: (start, end, name), as byte offsets.
    fn find_header(&self) -> Option<(usize, usize, String)> {
        if let (Some(header), Some(name)) = (&self.header, &self.name) {
            let start = self.pending.find(header.as_str())?;
            return Some((start, start + header.len(), name.clone()));
        }
        self.pending.match_indices('<').find_map(|(start, _)| {
            let after = &self.pending[start + 1..];
            let name_len = header_name_len(after)?;
            let rest = &after[name_len..];
            rest.strip_prefix('>')?.strip_prefix(SEPARATOR)?;
            let end = start + 1 + name_len + 1 + SEPARATOR.len();
            Some((start, end, after[..name_len].to_owned()))
        })
    }

    /// Where a possible (incomplete) header begins at the end of `pending`; `pending.len()` if none.
    fn held_back_from(&self) -> usize {
        let pending = &self.pending;
        let could_begin_header = |at: usize| -> bool {
            let tail = &pending[at..];
            match &self.header {
                Some(header) => header.starts_with(tail),
                None => could_be_header_prefix(&tail[1..]),
            }
        };
        pending.match_indices('<').map(|(at, _)| at).find(|&at| could_begin_header(at)).unwrap_or(pending.len())
    }
}

/// What the first bytes of an original peer's stream are: every line the original writes is
/// `<NAME> :: text`, and a connection starts at a line, so anything else is not a chat peer (a port
/// scanner, another service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineStart {
    /// A whole `<NAME> :: ` header.
    Header,
    /// Too few bytes to tell: they could still become one.
    Maybe,
    /// They cannot.
    Not,
}

/// Whether `first`, the first bytes of a stream, open with a `<NAME> :: ` header.
pub fn line_start(first: &[u8]) -> LineStart {
    // Judge the valid UTF-8 the bytes start with: after a whole header the text may hold anything,
    // but a header (and so its name) is valid UTF-8, and a character cut at the end may complete.
    let (text, invalid) = match std::str::from_utf8(first) {
        Ok(text) => (text, false),
        Err(err) => {
            let text = std::str::from_utf8(&first[..err.valid_up_to()]).unwrap_or("");
            (text, err.error_len().is_some())
        }
    };
    let Some(after) = text.strip_prefix('<') else {
        return if text.is_empty() && !invalid { LineStart::Maybe } else { LineStart::Not };
    };
    match header_name_len(after) {
        Some(len) if after[len + 1..].starts_with(SEPARATOR) => LineStart::Header,
        _ if could_be_header_prefix(after) && !invalid => LineStart::Maybe,
        _ => LineStart::Not,
    }
}

/// The byte length of a name that could stand in a header at the start of `after` (the text after `<`):
/// 1 to 40 characters up to the next `>`, without line breaks.
fn header_name_len(after: &str) -> Option<usize> {
    let mut chars = 0;
    for (at, c) in after.char_indices() {
        match c {
            '>' if chars > 0 => return Some(at),
            '>' | '\n' | '\r' => return None,
            _ if chars == MAX_NAME_CHARS => return None,
            _ => chars += 1,
        }
    }
    None
}

/// Whether `after` (the text after a `<` that ends the pending text) could still grow into a header.
fn could_be_header_prefix(after: &str) -> bool {
    match after.find('>') {
        None => after.chars().count() <= MAX_NAME_CHARS && !after.contains(['\n', '\r']),
        Some(close) => {
            let tail = &after[close + 1..];
            header_name_len(after) == Some(close) && SEPARATOR.starts_with(tail) && tail.len() < SEPARATOR.len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn piece(sender: &str, text: &str, starts: bool) -> Piece {
        Piece { sender: Some(sender.to_owned()), text: text.to_owned(), starts_message: starts }
    }

    /// Feed every chunk, flush, and glue continuations: the messages a reader would see.
    fn messages(chunks: &[&[u8]]) -> Vec<(Option<String>, String)> {
        let mut decoder = ChatDecoder::new();
        let mut pieces = Vec::new();
        for chunk in chunks {
            pieces.extend(decoder.feed(chunk));
        }
        pieces.extend(decoder.finish());
        let mut out: Vec<(Option<String>, String)> = Vec::new();
        for p in pieces {
            match out.last_mut() {
                Some(last) if !p.starts_message => last.1.push_str(&p.text),
                _ => out.push((p.sender, p.text)),
            }
        }
        out
    }

    fn named(list: &[(&str, &str)]) -> Vec<(Option<String>, String)> {
        list.iter().map(|(n, t)| (Some(n.to_string()), t.to_string())).collect()
    }

    #[test]
    fn encodes_exactly_like_the_original() {
        assert_eq!(encode_line("ana", "olá"), "<ana> :: olá".as_bytes());
    }

    #[test]
    fn validation() {
        assert_eq!(validate_name(""), Err(InvalidInput::EmptyName));
        assert_eq!(validate_name(&"x".repeat(41)), Err(InvalidInput::NameTooLong(41)));
        assert!(validate_name(&"é".repeat(40)).is_ok());
        assert_eq!(validate_name("a>b"), Err(InvalidInput::NameHasAngleBracket));
        assert_eq!(validate_name("a\nb"), Err(InvalidInput::NameHasControlChar));
        assert_eq!(validate_text(""), Err(InvalidInput::EmptyText));
        assert_eq!(validate_text("a\nb"), Err(InvalidInput::TextHasLineBreak));
        assert_eq!(validate_text("a\rb"), Err(InvalidInput::TextHasLineBreak));
        assert!(matches!(validate_text(&"x".repeat(MAX_TEXT_BYTES + 1)), Err(InvalidInput::TextTooLong { .. })));
        assert!(validate_text("<x> :: is fine inside a text").is_ok());
        assert!(validate_room("").is_ok());
        assert!(validate_room("café ☕").is_ok());
        assert_eq!(validate_room(&"r".repeat(65)), Err(InvalidInput::RoomTooLong(65)));
        assert_eq!(validate_room("a\tb"), Err(InvalidInput::RoomHasControlChar));
    }

    #[test]
    fn one_message_in_one_read() {
        let mut d = ChatDecoder::new();
        assert_eq!(d.feed(b"<ana> :: hello"), vec![piece("ana", "hello", true)]);
        assert_eq!(d.name(), Some("ana"));
        assert!(!d.has_held_back());
    }

    #[test]
    fn two_messages_in_one_read_are_split() {
        assert_eq!(messages(&[b"<ana> :: one<ana> :: two"]), named(&[("ana", "one"), ("ana", "two")]));
    }

    #[test]
    fn a_message_split_across_reads_continues_the_same_message() {
        let mut d = ChatDecoder::new();
        assert_eq!(d.feed(b"<ana> :: hel"), vec![piece("ana", "hel", true)]);
        assert_eq!(d.feed(b"lo"), vec![piece("ana", "lo", false)]);
        assert_eq!(messages(&[b"<ana> :: hel", b"lo", b"<ana> :: next"]), named(&[("ana", "hello"), ("ana", "next")]));
    }

    #[test]
    fn a_header_split_across_reads_is_recognised() {
        for cut in 1.."<ana> :: ".len() {
            let line = b"<ana> :: a<ana> :: b";
            let second_header = 10;
            let (first, second) = line.split_at(second_header + cut);
            assert_eq!(messages(&[first, second]), named(&[("ana", "a"), ("ana", "b")]), "cut at {cut}");
            let (first, second) = b"<ana> :: x".split_at(cut);
            assert_eq!(messages(&[first, second]), named(&[("ana", "x")]), "first header cut at {cut}");
        }
    }

    #[test]
    fn a_header_with_another_name_inside_a_text_is_text() {
        assert_eq!(
            messages(&[b"<ana> :: she said <bob> :: hi", b"<ana> :: ok"]),
            named(&[("ana", "she said <bob> :: hi"), ("ana", "ok")])
        );
    }

    #[test]
    fn a_split_multibyte_character_is_joined() {
        let text = "<ana> :: olá ☃".as_bytes();
        for cut in 0..=text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(messages(&[a, b]), named(&[("ana", "olá ☃")]), "cut at {cut}");
        }
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(messages(&[b"<ana> :: a\xffb\xc3"]), named(&[("ana", "a\u{fffd}b\u{fffd}")]));
    }

    #[test]
    fn text_before_any_header_has_no_sender() {
        assert_eq!(
            messages(&[b"stray bytes<ana> :: hi"]),
            vec![(None, "stray bytes".to_owned()), (Some("ana".to_owned()), "hi".to_owned())]
        );
    }

    #[test]
    fn an_empty_line_from_the_original_is_an_empty_message() {
        assert_eq!(messages(&[b"<ana> :: <ana> :: x"]), named(&[("ana", ""), ("ana", "x")]));
        let mut d = ChatDecoder::new();
        assert!(d.feed(b"<ana> :: ").is_empty());
        assert!(d.has_held_back());
        assert_eq!(d.flush(), vec![piece("ana", "", true)]);
    }

    #[test]
    fn a_stream_is_a_chat_peers_only_if_it_opens_with_a_header() {
        for first in [&b"<ana> :: hi"[..], b"<ana> :: ", "<já> :: ✓".as_bytes(), b"<ana> :: bad \xFF\xFE byte"] {
            assert_eq!(line_start(first), LineStart::Header, "{first:?}");
        }
        for first in [&b""[..], b"<", b"<an", b"<ana>", b"<ana> :", b"<j\xC3"] {
            assert_eq!(line_start(first), LineStart::Maybe, "{first:?}");
        }
        let long_name = format!("<{}", "n".repeat(MAX_NAME_CHARS + 1));
        for first in [
            &b"GET / HTTP/1.1"[..],
            b"\x16\x03\x01",
            b"\xFE",
            b"<an\xFFa> :: x",
            b"<ana>:: x",
            b"<> :: x",
            b"<a\nb> :: x",
            long_name.as_bytes(),
        ] {
            assert_eq!(line_start(first), LineStart::Not, "{first:?}");
        }
    }

    #[test]
    fn a_split_character_waits_for_its_other_bytes_however_idle_the_stream() {
        let mut d = ChatDecoder::new();
        assert_eq!(d.feed(b"<ana> :: ol\xC3"), vec![piece("ana", "ol", true)], "the text before it at once");
        assert!(!d.has_held_back(), "nothing for the idle timer");
        assert_eq!(d.flush(), vec![], "idle: the character is not given up");
        assert_eq!(d.feed(b"\xA1!"), vec![piece("ana", "\u{e1}!", false)]);
        assert_eq!(d.feed(b" \xE2\x9C"), vec![piece("ana", " ", false)]);
        assert_eq!(d.finish(), vec![piece("ana", "\u{fffd}", false)], "the stream ended inside it");
    }

    #[test]
    fn a_held_back_prefix_that_was_text_after_all_is_flushed() {
        let mut d = ChatDecoder::new();
        assert_eq!(d.feed(b"<ana> :: I <"), vec![piece("ana", "I ", true)]);
        assert_eq!(d.flush(), vec![piece("ana", "<", false)]);
        assert!(!d.has_held_back());
    }

    /// Byte offsets where a UTF-8 string may be cut into reads.
    fn cuts(total: usize) -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(0..=total, 0..8).prop_map(|mut v| {
            v.sort_unstable();
            v
        })
    }

    proptest! {
        /// Whatever the read boundaries, a sequence of lines from one sender comes out as exactly those
        /// lines (texts here hold no `<`, so none can contain the sender's header).
        #[test]
        fn any_read_boundaries_give_the_same_messages(
            name in "[a-zA-Z0-9 é☃<:]{1,40}",
            texts in proptest::collection::vec("[^\n\r<]{1,30}", 1..6),
            cut_at in cuts(1000),
        ) {
            let stream: Vec<u8> = texts.iter().flat_map(|t| encode_line(&name, t)).collect();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut last = 0;
            for cut in cut_at.into_iter().map(|c| c.min(stream.len())) {
                chunks.push(&stream[last..cut]);
                last = cut;
            }
            chunks.push(&stream[last..]);
            let expected: Vec<(Option<String>, String)> = texts.iter().map(|t| (Some(name.clone()), t.clone())).collect();
            prop_assert_eq!(messages(&chunks), expected);
        }

        /// Random bytes in random reads never panic.
        #[test]
        fn random_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let _ = messages(&refs);
        }
    }
}
