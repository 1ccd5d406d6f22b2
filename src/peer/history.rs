//! The peer's side of history: asking members for messages we do not have, and answering their asks
//! within limits.
//!
//! * On join, the first p2pchat member reached is asked for the newest `ask_on_join` messages after
//!   the newest one in our own log. [`super::Events`] holds live messages back until that answer is
//!   in (or failed, or its first part is late), so history shows first and in order.
//! * After a gap (a p2pchat link lost without a goodbye, then back), both ends ask each other for
//!   what was said since shortly before the link went quiet.
//! * Answers come from the log, only messages written by p2pchat peers (original peers' lines reach
//!   every p2pchat peer separately and carry no id), in frames of at most [`CHUNK_BYTES`], with at
//!   most `answer_messages` per request, one answer being queued at a time per link, and a per-link
//!   byte budget ([`AnswerBudget`]).
//! * Received history is logged; only messages new to the log and not yet shown this session are
//!   passed on, marked as history. Message ids make every path idempotent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::connection::Line;
use super::seen::SeenIds;
use super::{Event, Message};
use crate::history::clock::Clock;
use crate::history::log::LogHandle;
use crate::history::store::{Key, Query, Record};
use crate::wire::chat;
use crate::wire::frames::{self, Chat, Frame, Position};

/// Largest answer frame: well under the frame limit, so one 64 KiB message always fits in one.
pub const CHUNK_BYTES: usize = 128 * 1024;
/// Longest message id accepted in history (ours are 32 characters).
const MAX_ID_CHARS: usize = 64;

/// How a peer keeps and exchanges history.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    /// Where the log lives.
    pub location: crate::history::store::Location,
    /// How many messages to ask a member for on join (0: ask nothing).
    pub ask_on_join: usize,
    /// Most messages one answer carries.
    pub answer_messages: usize,
    /// Bytes a member may make us send at once, and how fast that allowance refills.
    pub answer_burst_bytes: usize,
    pub answer_bytes_per_sec: usize,
    /// How long an asked member may take to answer completely.
    pub answer_wait: Duration,
    /// How long the join holds the room's live events back for the first part of the answer; a
    /// slower member's history still comes, after them.
    pub first_part_wait: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            location: crate::history::store::Location::Memory,
            ask_on_join: 100,
            answer_messages: 10_000,
            answer_burst_bytes: 16 * 1024 * 1024,
            answer_bytes_per_sec: 1024 * 1024,
            answer_wait: Duration::from_secs(10),
            first_part_wait: Duration::from_secs(3),
        }
    }
}

/// One link's allowance for history answers: a token bucket of bytes, and one answer being queued
/// at a time (so two cannot both spend the same allowance).
#[derive(Debug)]
pub(super) struct AnswerBudget {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    last: tokio::time::Instant,
    busy: bool,
}

impl AnswerBudget {
    pub fn new(config: &HistoryConfig) -> Self {
        let burst = config.answer_burst_bytes as f64;
        Self { tokens: burst, burst, per_sec: config.answer_bytes_per_sec as f64, last: tokio::time::Instant::now(), busy: false }
    }

    /// Start an answer: how many bytes it may carry, or `None` while another answer is being sent or
    /// the allowance is spent.
    pub fn start(&mut self, now: tokio::time::Instant) -> Option<usize> {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_sec).min(self.burst);
        self.last = now;
        if self.busy || self.tokens < 1.0 {
            return None;
        }
        self.busy = true;
        Some(self.tokens as usize)
    }

    /// An answer of `bytes` was sent (it may overdraw a little: its frames' envelopes).
    pub fn finish(&mut self, bytes: usize) {
        self.busy = false;
        self.tokens -= bytes as f64;
    }
}

/// Messages for a history answer, as frames of at most [`CHUNK_BYTES`] (the last says `more: false`).
pub(super) fn answer_frames(req: u32, msgs: Vec<Chat>) -> Vec<Vec<u8>> {
    let mut frames_out = Vec::new();
    let mut part = Vec::new();
    let mut size = 0;
    for msg in msgs {
        let len = msg.text.len() + msg.from.len() + msg.id.len() + 96; // as `Record::wire_size`
        if !part.is_empty() && size + len > CHUNK_BYTES {
            frames_out.push(frames::encode(&Frame::History { req, msgs: std::mem::take(&mut part), more: true }));
            size = 0;
        }
        size += len;
        part.push(msg);
    }
    frames_out.push(frames::encode(&Frame::History { req, msgs: part, more: false }));
    frames_out
}

pub(super) fn record_to_chat(record: Record, room: &str) -> Chat {
    Chat {
        id: record.id,
        from: record.sender.unwrap_or_default(),
        room: room.to_owned(),
        ts: record.sent_at,
        hlc: record.stamp,
        text: record.text,
    }
}

pub(super) fn chat_to_record(chat: &Chat) -> Record {
    Record { id: chat.id.clone(), stamp: chat.stamp(), sent_at: chat.ts, sender: Some(chat.from.clone()), text: chat.text.clone(), shared: true }
}

/// Whether a message received as history is one we could have received live.
pub(super) fn acceptable(chat: &Chat, room: &str) -> bool {
    chat.room == room
        && !chat.id.is_empty()
        && chat.id.len() <= MAX_ID_CHARS
        && chat::validate_text(&chat.text).is_ok()
        && chat::validate_name(&chat.from).is_ok()
}

/// A p2pchat message as the application sees it; `from` is the link it came on.
pub(super) fn message(chat: Chat, from: SocketAddr, history: bool) -> Message {
    let stamp = chat.stamp();
    Message {
        sender: Some(chat.from),
        text: chat.text,
        from,
        received_at: SystemTime::now(),
        starts_message: true,
        id: Some(chat.id),
        sent_at: Some(UNIX_EPOCH + Duration::from_millis(chat.ts)),
        stamp: Some(stamp),
        history,
    }
}

pub(super) fn position(key: &Key) -> Position {
    Position { hlc: key.stamp, id: key.id.clone() }
}

pub(super) fn key(position: Position) -> Key {
    Key { stamp: position.hlc, id: position.id }
}

/// Answer one request on `queue`: read the log, send the frames (waiting for room in the queue: an
/// answer is many frames, and live lines must still fit), and return how many bytes were sent.
pub(super) async fn answer(log: LogHandle, room: String, req: u32, query: Query, queue: mpsc::Sender<Line>) -> usize {
    let msgs = match log.query(query).await {
        Ok(records) => records.into_iter().map(|r| record_to_chat(r, &room)).collect(),
        Err(err) => {
            log::warn!("cannot answer a history request: {err}");
            Vec::new()
        }
    };
    let mut sent = 0;
    for frame in answer_frames(req, msgs) {
        sent += frame.len();
        if queue.send(frame.into()).await.is_err() {
            break;
        }
    }
    sent
}

/// What a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// The history shown on join; ends with [`Event::HistorySynced`].
    Join,
    /// What we missed while a link was down.
    CatchUp,
}

/// Where received history goes.
#[derive(Clone)]
pub(super) struct Sink {
    pub log: LogHandle,
    pub seen: Arc<Mutex<SeenIds>>,
    pub clock: Arc<Clock>,
    pub events: mpsc::Sender<Event>,
}

/// Take the parts of one answer from `parts` (routed by the actor, which checked they answer our
/// request and stay within its limit), log them and pass on the new ones, marked as history.
pub(super) async fn receive(mut parts: mpsc::Receiver<Vec<Chat>>, from: SocketAddr, purpose: Purpose, config: &HistoryConfig, sink: Sink) {
    let started = tokio::time::Instant::now();
    let deadline = started + config.answer_wait;
    // While the join holds the room back, the answer's first part must come soon.
    let mut holding = purpose == Purpose::Join;
    let first_deadline = (started + config.first_part_wait).min(deadline);
    let (mut received, mut answering) = (0, false);
    loop {
        let msgs = match tokio::time::timeout_at(if holding && !answering { first_deadline } else { deadline }, parts.recv()).await {
            Ok(Some(msgs)) => {
                answering = true;
                msgs
            }
            Ok(None) => break,
            Err(_) if holding && tokio::time::Instant::now() < deadline => {
                log::info!("{from} is slow to send history; showing the room now, its history when it comes");
                let _ = sink.events.send(Event::HistorySynced { received: 0 }).await;
                holding = false;
                continue;
            }
            Err(_) => break,
        };
        let records: Vec<Record> = msgs.iter().map(chat_to_record).collect();
        let fresh = match sink.log.ingest(records).await {
            Ok(fresh) => fresh,
            Err(err) => {
                log::warn!("cannot log history: {err}");
                vec![true; msgs.len()]
            }
        };
        for (chat, is_new) in msgs.into_iter().zip(fresh) {
            sink.clock.observe(chat.stamp());
            // New to the log, and not shown live this session (the live copy may have come first).
            let show = is_new && sink.seen.lock().map(|mut seen| seen.first_time(&chat.id)).unwrap_or(true);
            if !show {
                continue;
            }
            received += 1;
            if sink.events.send(Event::Message(message(chat, from, true))).await.is_err() {
                return;
            }
        }
    }
    if holding {
        let _ = sink.events.send(Event::HistorySynced { received }).await;
    } else if received > 0 {
        let text = match purpose {
            Purpose::Join => format!("{received} earlier message(s) arrived late from {from}"),
            Purpose::CatchUp => format!("caught up: {received} message(s) said while the link to {from} was down"),
        };
        let _ = sink.events.send(Event::Notice { text }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(text_len: usize) -> Chat {
        Chat { id: frames::random_id(), from: "ana".into(), room: "r".into(), ts: 1, hlc: 2, text: "x".repeat(text_len) }
    }

    #[test]
    fn answers_are_cut_into_frames_under_the_limit_and_keep_their_order() {
        let msgs: Vec<Chat> = (0..100).map(|_| chat(chat::MAX_TEXT_BYTES / 4)).collect();
        let frames_out = answer_frames(7, msgs.clone());
        assert!(frames_out.len() > 1);
        let mut decoder = frames::FrameDecoder::new();
        let mut back = Vec::new();
        for (i, bytes) in frames_out.iter().enumerate() {
            assert!(bytes.len() <= CHUNK_BYTES + 4);
            decoder.feed(bytes);
            match decoder.next_frame() {
                Ok(Some(Frame::History { req: 7, msgs, more })) => {
                    assert_eq!(more, i + 1 < frames_out.len());
                    back.extend(msgs);
                }
                other => panic!("not a history frame: {other:?}"),
            }
        }
        assert_eq!(back, msgs);
        assert_eq!(answer_frames(1, Vec::new()).len(), 1, "an empty answer is one frame");
    }

    #[tokio::test(start_paused = true)]
    async fn the_answer_budget_allows_one_answer_at_a_time_and_refills() {
        let config = HistoryConfig { answer_burst_bytes: 1000, answer_bytes_per_sec: 100, ..HistoryConfig::default() };
        let mut budget = AnswerBudget::new(&config);
        let now = tokio::time::Instant::now();
        assert_eq!(budget.start(now), Some(1000));
        assert_eq!(budget.start(now), None, "busy");
        budget.finish(1100);
        assert_eq!(budget.start(now), None, "overdrawn");
        assert_eq!(budget.start(now + Duration::from_secs(3)), Some(200));
        budget.finish(0);
        assert_eq!(budget.start(now + Duration::from_secs(60)), Some(1000), "never more than the burst");
    }

    #[test]
    fn history_from_another_room_or_with_bad_fields_is_refused() {
        let good = chat(10);
        assert!(acceptable(&good, "r"));
        assert!(!acceptable(&good, "other"));
        assert!(!acceptable(&Chat { id: "x".repeat(65), ..good.clone() }, "r"));
        assert!(!acceptable(&Chat { text: "a\nb".into(), ..good.clone() }, "r"));
        assert!(!acceptable(&Chat { from: "a>b".into(), ..good }, "r"));
    }
}
