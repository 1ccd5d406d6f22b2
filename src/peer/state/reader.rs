//! One link's reading side, with no I/O: bytes in, reports, log records and events out, time passed in.
//!
//! A [`LinkReader`] first finds out which protocol its link speaks (the *opening*, see [`Role`]),
//! then decodes it for the rest of the link's life: `<NAME> :: text` pieces from an original peer,
//! frames from a p2pchat one. What each frame may do is decided by [`super::rules`]. It runs inside
//! the link's own task (so a message goes from the socket to the application without a hop through
//! the peer's task), and in the simulator on an in-memory pipe.
//!
//! Each call appends to an [`Outputs`]: reports for the peer's state machine first, then records
//! for the log, then events for the application, in that order (a message is logged before it is
//! shown, so `history()` after `recv()` has it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::rules::{self, Drops, Flood, LinkRules};
use super::Report;
use crate::history::store::Record;
use crate::peer::types::{Now, Role};
use crate::peer::{Event, Message};
use crate::protocol::MAGIC;
use crate::wire::chat::{line_start, ChatDecoder, LineStart, Piece};
use crate::wire::frames::{classify_opening, FrameDecoder, Opening};

/// How a link's reading ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Report the link closed: why, and whether the other end said goodbye first.
    Closed { reason: String, clean: bool },
    /// Nothing to report as a closed link: a probe the other end rejected (reported as such), or
    /// the stream ended and the driver knows better why (its writer may have failed first).
    Quietly,
    /// The stream ended without a goodbye: the other side closed it, unless our writer failed first.
    StreamEnded,
}

/// What one call produced, in the order it must be carried out.
#[derive(Debug, Default)]
pub struct Outputs {
    pub reports: Vec<Report>,
    pub to_log: Vec<Record>,
    pub to_show: Vec<Event>,
    pub end: Option<End>,
}

impl Outputs {
    pub fn is_empty(&self) -> bool {
        self.reports.is_empty() && self.to_log.is_empty() && self.to_show.is_empty() && self.end.is_none()
    }
}

enum Phase {
    /// Reading the first bytes, until `deadline`.
    Opening {
        first: Vec<u8>,
        deadline: Instant,
    },
    /// The original protocol; `hold_until`: when text held back (a possible header or a split
    /// character) is shown anyway. Boxed decoder: links to original peers are few, and inline it
    /// would size every link's reader (a room of 200 holds 199 links, nearly all p2pchat).
    Original {
        decoder: Box<ChatDecoder>,
        pending: Vec<u8>,
        hold_until: Option<Instant>,
        /// Its first bytes were a `<NAME> :: ` header: a chat peer. Until then nothing it sends is
        /// shown or logged, and `hold_until` is when it must have sent one.
        vetted: bool,
    },
    /// p2pchat frames; the link is dead once nothing arrived by `silent_at`. `None` once its hello
    /// said `quiet` (it does not ping: the kernel's keep-alive watches the link instead).
    P2pchat {
        decoder: FrameDecoder,
        greeted: bool,
        said_bye: bool,
        silent_at: Option<Instant>,
    },
    Ended,
}

pub struct LinkReader {
    from: SocketAddr,
    role: Role,
    /// A private room's Noise session: its other end proved it holds the room key.
    authenticated: bool,
    phase: Phase,
    flood: Flood,
    drops: Drops,
}

impl LinkReader {
    /// A link from `from`, opening as `role`, over a private room's Noise session or not
    /// (`authenticated`); call [`Self::start`] once before anything else.
    pub fn new(role: Role, from: SocketAddr, authenticated: bool, now: Now, rules: &LinkRules) -> Self {
        let wait = match role {
            Role::Probe => rules.limits.probe_timeout,
            Role::Accepted | Role::DialOriginal => rules.limits.decide_timeout,
        };
        Self {
            from,
            role,
            authenticated,
            phase: Phase::Opening { first: Vec::new(), deadline: now.at + wait },
            flood: Flood::new(rules.limits.max_message_rate, now.at),
            drops: Drops::default(),
        }
    }

    /// The link starts: a link to a known original peer speaks the original protocol from its first
    /// byte.
    pub fn start(&mut self, out: &mut Outputs) {
        if self.role == Role::DialOriginal {
            self.become_original(Vec::new(), out);
        }
    }

    /// Where the next read's bytes go (then call [`Self::handle_read`]); `None` once ended.
    pub fn read_buffer(&mut self) -> Option<&mut Vec<u8>> {
        match &mut self.phase {
            Phase::Opening { first, .. } => Some(first),
            Phase::Original { pending, .. } => Some(pending),
            Phase::P2pchat { decoder, .. } => Some(decoder.read_buffer()),
            Phase::Ended => None,
        }
    }

    /// When the reader needs [`Self::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Opening { deadline, .. } => Some(*deadline),
            Phase::Original { hold_until, .. } => *hold_until,
            Phase::P2pchat { silent_at, .. } => *silent_at,
            Phase::Ended => None,
        }
    }

    /// Bytes were appended to [`Self::read_buffer`]. `forwarding`: we relay this link's messages,
    /// so each new one is handed over too.
    pub fn handle_read(&mut self, now: Now, rules: &LinkRules, forwarding: bool, out: &mut Outputs) {
        match &mut self.phase {
            Phase::Opening { first, .. } => match classify_opening(first) {
                Opening::P2pchat => {
                    let rest = first.split_off(MAGIC.len());
                    self.become_p2pchat(now, rules, rest);
                    self.take_frames(now, rules, forwarding, out);
                }
                // An original peer's first bytes are a header; until they can be told apart from
                // a scanner's, wait (the opening's deadline still runs).
                Opening::Original => match line_start(first) {
                    LineStart::Header => {
                        let first = std::mem::take(first);
                        self.become_original(first, out);
                        self.take_pieces(now, rules, out);
                    }
                    LineStart::Maybe => {}
                    LineStart::Not => self.not_a_chat_peer(out),
                },
                Opening::Undecided => {}
            },
            Phase::Original { .. } => self.take_pieces(now, rules, out),
            Phase::P2pchat { silent_at, .. } => {
                if let Some(at) = silent_at {
                    *at = now.at + rules.limits.dead_after;
                }
                self.take_frames(now, rules, forwarding, out);
            }
            Phase::Ended => {}
        }
    }

    /// The stream ended (a read of 0 bytes).
    pub fn handle_eof(&mut self, now: Now, rules: &LinkRules, out: &mut Outputs) {
        let end = match &mut self.phase {
            Phase::Opening { .. } => return self.opening_failed("closed by the other side".to_owned(), out),
            Phase::Original { decoder, .. } => {
                let pieces = decoder.finish();
                self.deliver(now, rules, pieces, out);
                End::StreamEnded
            }
            Phase::P2pchat { said_bye: true, .. } => End::Closed { reason: "left".to_owned(), clean: true },
            Phase::P2pchat { .. } => End::StreamEnded,
            Phase::Ended => return,
        };
        self.end(end, out);
    }

    /// A read failed.
    pub fn handle_error(&mut self, now: Now, rules: &LinkRules, error: &str, out: &mut Outputs) {
        let reason = format!("read failed: {error}");
        let end = match &mut self.phase {
            Phase::Opening { .. } => return self.opening_failed(reason, out),
            Phase::Original { decoder, .. } => {
                let pieces = decoder.finish();
                self.deliver(now, rules, pieces, out);
                End::Closed { reason, clean: false }
            }
            Phase::P2pchat { said_bye, .. } => End::Closed { reason, clean: *said_bye },
            Phase::Ended => return,
        };
        self.end(end, out);
    }

    /// Time passed: an opening that waited long enough decides, held-back text is shown, a silent
    /// p2pchat link is dead.
    pub fn handle_timeout(&mut self, now: Now, rules: &LinkRules, out: &mut Outputs) {
        match &mut self.phase {
            Phase::Opening { first, deadline } if now.at >= *deadline => {
                if classify_opening(first) == Opening::Original {
                    // The start of a header, and nothing more.
                    return self.not_a_chat_peer(out);
                }
                if !first.is_empty() {
                    return self.opening_failed("sent a partial p2pchat opening, then nothing".to_owned(), out);
                }
                // Silence: an original peer that dropped our probe, or one that dialled us and says
                // nothing until its user types.
                if self.role == Role::Probe {
                    return self.opening_failed(String::new(), out);
                }
                self.become_original(Vec::new(), out);
            }
            Phase::Original { vetted: false, hold_until, .. } if hold_until.is_some_and(|at| now.at >= at) => {
                self.not_a_chat_peer(out)
            }
            Phase::Original { decoder, hold_until, .. } if hold_until.is_some_and(|at| now.at >= at) => {
                *hold_until = None;
                let pieces = decoder.flush();
                self.deliver(now, rules, pieces, out);
            }
            Phase::P2pchat { silent_at: Some(at), .. } if now.at >= *at => {
                let reason = format!("silent for {:?}", rules.limits.dead_after);
                self.end(End::Closed { reason, clean: false }, out);
            }
            _ => {}
        }
    }

    /// Its first bytes are neither the magic nor a `<NAME> :: ` header: not a chat peer. Dropped,
    /// and nothing it sent is shown or logged.
    fn not_a_chat_peer(&mut self, out: &mut Outputs) {
        let reason = "not a chat peer (its first bytes are no `<NAME> :: ` header)".to_owned();
        self.end(End::Closed { reason, clean: false }, out);
    }

    fn end(&mut self, end: End, out: &mut Outputs) {
        self.phase = Phase::Ended;
        out.end = Some(end);
    }

    /// The opening ended without telling the protocol: a probe was rejected (an original peer drops
    /// the link at our hello's 0xFF byte), or an accepted link closed.
    fn opening_failed(&mut self, reason: String, out: &mut Outputs) {
        if self.role == Role::Probe {
            out.reports.push(Report::ProbeRejected);
            self.end(End::Quietly, out);
        } else {
            self.end(End::Closed { reason, clean: false }, out);
        }
    }

    fn become_original(&mut self, first: Vec<u8>, out: &mut Outputs) {
        out.reports.push(Report::Original);
        self.phase =
            Phase::Original { decoder: Box::new(ChatDecoder::new()), pending: first, hold_until: None, vetted: false };
    }

    fn become_p2pchat(&mut self, now: Now, rules: &LinkRules, rest: Vec<u8>) {
        let mut decoder = FrameDecoder::new();
        decoder.feed(&rest);
        let silent_at = Some(now.at + rules.limits.dead_after);
        self.phase = Phase::P2pchat { decoder, greeted: false, said_bye: false, silent_at };
    }

    /// Decode what an original peer sent and show it.
    fn take_pieces(&mut self, now: Now, rules: &LinkRules, out: &mut Outputs) {
        let Phase::Original { decoder, pending, hold_until, vetted } = &mut self.phase else { return };
        if pending.is_empty() {
            return;
        }
        if !*vetted {
            // Kept in `pending` until they are a header: a known original peer we dialled, or one
            // silent until now, must open with one too.
            match line_start(pending) {
                LineStart::Header => *vetted = true,
                LineStart::Maybe => {
                    hold_until.get_or_insert(now.at + rules.limits.decide_timeout);
                    return;
                }
                LineStart::Not => return self.not_a_chat_peer(out),
            }
        }
        let had_name = decoder.name().is_some();
        let pieces = decoder.feed(pending);
        pending.clear();
        if let (false, Some(name)) = (had_name, decoder.name()) {
            out.reports.push(Report::Renamed { name: name.to_owned() });
        }
        *hold_until = decoder.has_held_back().then(|| now.at + rules.limits.hold_back);
        self.deliver(now, rules, pieces, out);
    }

    /// Log and show what an original peer said. Its lines carry no id: each is logged under one made
    /// here, as not shared (see `history::store`).
    fn deliver(&mut self, now: Now, rules: &LinkRules, pieces: Vec<Piece>, out: &mut Outputs) {
        for Piece { sender, text, starts_message } in pieces {
            if starts_message {
                let (admitted, notice) = self.flood.admit(now.at, self.from, sender.as_deref());
                if let Some(text) = notice {
                    out.to_show.push(Event::Notice { text });
                }
                if !admitted {
                    continue;
                }
            } else if self.flood.muted() {
                continue;
            }
            let stamp = rules.clock.tick_at(now.wall_ms);
            out.to_log.push(Record {
                id: rules.next_id(),
                stamp,
                sent_at: crate::protocol::millis_of(stamp),
                sender: sender.clone(),
                text: text.clone(),
                shared: false,
                author_key: None,
                sig: None,
            });
            let received_at = received_at(now);
            let message = Message {
                sender,
                text,
                from: self.from,
                received_at,
                starts_message,
                id: None,
                sent_at: None,
                stamp: Some(stamp),
                history: false,
                signed: false,
            };
            out.to_show.push(Event::Message(message));
        }
    }

    /// Take every whole frame the p2pchat decoder holds, as the rules say.
    fn take_frames(&mut self, now: Now, rules: &LinkRules, forwarding: bool, out: &mut Outputs) {
        let from = self.from;
        let Phase::P2pchat { decoder, greeted, said_bye, silent_at } = &mut self.phase else { return };
        let mut quiet = false;
        let ended = loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break None,
                Err(err) => {
                    let text = format!("{from} sent a broken p2pchat frame ({err}); closing that link");
                    log::warn!("{text}");
                    out.to_show.push(Event::Notice { text });
                    break Some(End::Closed { reason: format!("protocol error: {err}"), clean: false });
                }
            };
            let authenticated = self.authenticated;
            let (flood, drops) = (&mut self.flood, &mut self.drops);
            let quiet = &mut quiet;
            let mut link = rules::LinkView { from, authenticated, greeted, said_bye, quiet, forwarding, flood, drops };
            if let Some(end) = rules::take_frame(now, rules, &mut link, frame, out) {
                break Some(end);
            }
        };
        if quiet {
            *silent_at = None;
        }
        decoder.release_if_drained();
        if let Some(end) = ended {
            self.end(end, out);
        }
    }
}

/// When something read at `now` was received, as the application is told.
pub fn received_at(now: Now) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(now.wall_ms)
}
