//! Keeping the room's history in sync between members: asking them for messages we do not have, and
//! answering their asks within limits. (The log itself, and the clock that orders it, are
//! `crate::history`.)
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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::actor::NetEvent;
use super::connection::ReaderContext;
use super::outbox::Outbox;
use super::state::receipts::Job;
use super::types::{Line, LinkId};
use super::{Event, Message};
use crate::history::log::LogHandle;
use crate::history::store::{self, Key, Query, Record};
use crate::wire::chat;
use crate::wire::frames::{self, Chat, Frame, Position};
use std::time::Instant;

/// Largest answer frame: well under the frame limit, so one 64 KiB message always fits in one.
pub const CHUNK_BYTES: usize = 128 * 1024;
/// Longest message id accepted in history (ours are 32 characters).
const MAX_ID_CHARS: usize = 64;

/// How a peer keeps and exchanges history. Non-exhaustive: start from `HistoryConfig::default()`
/// (or a `PeerConfig`'s) and assign the fields to change.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HistoryConfig {
    /// Where the log lives.
    pub location: crate::history::store::Location,
    /// How much of each room the log keeps.
    pub retention: crate::history::store::Retention,
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
            retention: crate::history::store::Retention::default(),
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
    last: Instant,
    busy: bool,
}

impl AnswerBudget {
    pub fn new(config: &HistoryConfig, now: Instant) -> Self {
        let burst = config.answer_burst_bytes as f64;
        Self { tokens: burst, burst, per_sec: config.answer_bytes_per_sec as f64, last: now, busy: false }
    }

    /// Start an answer: how many bytes it may carry, or `None` while another answer is being sent or
    /// the allowance is spent.
    pub fn start(&mut self, now: Instant) -> Option<usize> {
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
        let len = store::wire_size(&msg.text, &msg.from, &msg.id);
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
        key: record.author_key,
        sig: record.sig,
    }
}

pub(super) fn chat_to_record(chat: &Chat) -> Record {
    Record {
        id: chat.id.clone(),
        stamp: chat.stamp(),
        sent_at: chat.ts,
        sender: Some(chat.from.clone()),
        text: chat.text.clone(),
        shared: true,
        author_key: chat.key.clone(),
        sig: chat.sig.clone(),
    }
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
pub(super) fn message(chat: Chat, from: SocketAddr, received_at: SystemTime, history: bool) -> Message {
    let stamp = chat.stamp();
    Message {
        sender: Some(chat.from),
        text: chat.text,
        from,
        received_at,
        starts_message: true,
        id: Some(chat.id),
        sent_at: Some(UNIX_EPOCH + Duration::from_millis(chat.ts)),
        stamp: Some(stamp),
        history,
        // Signatures are kept only where they were checked (see `state::rules::unverified`).
        signed: chat.sig.is_some(),
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
pub(super) async fn answer(log: LogHandle, room: String, req: u32, query: Query, queue: Outbox<Line>) -> usize {
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

/// A request to make: the newest `limit` messages after `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ask {
    pub after: Option<Key>,
    pub limit: usize,
    pub purpose: Purpose,
}

/// A request of ours being answered on one link.
struct Asked {
    req: u32,
    /// Who is answering (a session id): a replacement link to it takes the request over.
    peer_id: Option<String>,
    ask: Ask,
    /// Messages still accepted in the answer.
    remaining: usize,
}

/// Our history requests, I/O-free: what to ask a member whose link comes up, which answers we wait
/// for (one per link), and the members lost without a goodbye, to catch up with if they come back.
/// The actor does the sending.
pub(super) struct Requests {
    /// The join's request until it is made; its purpose becomes `CatchUp` once the join stopped
    /// waiting for it.
    join: Option<Ask>,
    next: u32,
    asked: HashMap<LinkId, Asked>,
    /// Session id → (the stamp to catch up from, when it was lost).
    lost: HashMap<String, (u64, Instant)>,
    catch_up_limit: usize,
}

/// What became of a part of an answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Part {
    /// These messages go on to the receiving task; `last`: the answer is complete.
    Passed { msgs: Vec<Chat>, last: bool },
    /// Nobody asked (another request number, or a link we asked nothing).
    Unasked,
}

impl Requests {
    /// Requests waiting for an answer, and members lost that we may catch up from (for the
    /// simulator's bounds check).
    #[cfg(test)]
    pub fn sizes(&self) -> (usize, usize) {
        (self.asked.len(), self.lost.len())
    }

    /// `join_after`: ask the first member for the newest `ask_on_join` after it (`Some(None)`: the
    /// newest); `None`: ask nothing on join.
    pub fn new(join_after: Option<Option<Key>>, ask_on_join: usize, catch_up_limit: usize) -> Self {
        let join = join_after.map(|after| Ask { after, limit: ask_on_join, purpose: Purpose::Join });
        Self { join, next: 0, asked: HashMap::new(), lost: HashMap::new(), catch_up_limit }
    }

    /// The join's request is still to be made or answered.
    pub fn join_pending(&self) -> bool {
        self.join.is_some() || self.asked.values().any(|a| a.ask.purpose.is_join_history())
    }

    pub fn waits_for_join(&self) -> bool {
        matches!(self.join, Some(Ask { purpose: Purpose::Join, .. }))
    }

    /// The join shows the room without its history; a member that turns up later is still asked.
    pub fn stop_waiting_for_join(&mut self) {
        if let Some(ask) = &mut self.join {
            ask.purpose = Purpose::Late;
        }
    }

    /// A link to the member `peer_id` is up: what to ask it, if anything (taken; give it back with
    /// [`Self::not_asked`] if it cannot be sent).
    pub fn on_link_up(&mut self, peer_id: &str) -> Option<Ask> {
        if let Some((since, _)) = self.lost.remove(peer_id) {
            return Some(Ask {
                after: Some(Key { stamp: since, id: String::new() }),
                limit: self.catch_up_limit,
                purpose: Purpose::CatchUp,
            });
        }
        self.join.take()
    }

    /// `ask` could not be sent; the join's request waits for the next member.
    pub fn not_asked(&mut self, ask: Ask) {
        if self.join.is_none() && ask.purpose.is_join_history() {
            self.join = Some(ask);
        }
    }

    /// The number for the next request.
    pub fn next_req(&mut self) -> u32 {
        let req = self.next;
        self.next = self.next.wrapping_add(1);
        req
    }

    /// `ask` was sent on `conn` as `req`.
    pub fn sent(&mut self, conn: LinkId, req: u32, peer_id: Option<String>, ask: Ask) {
        let remaining = ask.limit;
        self.asked.insert(conn, Asked { req, peer_id, ask, remaining });
    }

    /// Request `req` on `conn` is given up (too late, or its parts come faster than they are
    /// logged): the rest of its answer is ignored.
    pub fn give_up(&mut self, conn: LinkId, req: u32) {
        if self.asked.get(&conn).is_some_and(|a| a.req == req) {
            self.asked.remove(&conn);
        }
    }

    pub fn is_asking(&self, conn: LinkId) -> bool {
        self.asked.contains_key(&conn)
    }

    /// A part of an answer on `conn`: passed on, up to the number of messages asked for.
    pub fn part(&mut self, conn: LinkId, req: u32, mut msgs: Vec<Chat>, more: bool) -> Part {
        let Some(asked) = self.asked.get_mut(&conn).filter(|a| a.req == req) else { return Part::Unasked };
        msgs.truncate(asked.remaining);
        asked.remaining -= msgs.len();
        let last = !more || asked.remaining == 0;
        if last {
            self.asked.remove(&conn);
        }
        Part::Passed { msgs, last }
    }

    /// The member `peer_id` was lost without a goodbye; if it comes back within `keep_for`, catch up
    /// from `since`, or from an earlier point it was lost at and has not come back since (nothing
    /// between the two losses is missed).
    pub fn lost(&mut self, peer_id: String, since: u64, now: Instant, keep_for: Duration) {
        self.lost.retain(|_, (_, when)| now.duration_since(*when) < keep_for);
        self.catch_up_when_back(peer_id, since, now);
    }

    fn catch_up_when_back(&mut self, peer_id: String, since: u64, now: Instant) {
        let entry = self.lost.entry(peer_id).or_insert((since, now));
        *entry = (entry.0.min(since), now);
    }

    /// A request cut off with its link that no other link can take over yet (two members that redial
    /// each other keep one of two links, and the kept one may come up after the other closed): a
    /// catch-up waits for its member's next link, from the earliest point asked; the join's request
    /// waits for the next member, as [`Purpose::Late`] (the join stopped waiting when its link closed).
    pub fn ask_when_back(&mut self, peer_id: Option<String>, ask: Ask, now: Instant) {
        match (ask.purpose, peer_id) {
            (Purpose::CatchUp, Some(peer_id)) => {
                self.catch_up_when_back(peer_id, ask.after.map_or(0, |key| key.stamp), now)
            }
            (purpose, _) if purpose.is_join_history() && self.join.is_none() => {
                self.join = Some(Ask { purpose: purpose.asked_again(), ..ask })
            }
            _ => {}
        }
    }

    /// Link `conn` is gone: the rest of a request it had not finished answering, to ask again (on a
    /// link to the same member, or for the join's history any member), and who was answering.
    pub fn link_gone(&mut self, conn: LinkId) -> Option<(Option<String>, Ask)> {
        let asked = self.asked.remove(&conn)?;
        let rest = Ask { after: asked.ask.after, limit: asked.remaining, purpose: asked.ask.purpose };
        Some((asked.peer_id, rest))
    }
}

/// What a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// The history shown on join; ends with [`Event::HistorySynced`].
    Join,
    /// The join's history once the join stopped waiting for it (the room was empty, or the member
    /// asked left first): the room's earlier messages, from the next member, shown as they come.
    Late,
    /// What we missed while a link was down.
    CatchUp,
}

impl Purpose {
    /// The join's history (waited for or not): any member can answer it.
    pub(super) fn is_join_history(self) -> bool {
        matches!(self, Purpose::Join | Purpose::Late)
    }

    /// What the rest of a request cut off with its link is, asked again: the first ask's task still
    /// ends the join's wait, so the rest of the join's history is shown as it comes.
    pub(super) fn asked_again(self) -> Purpose {
        if self.is_join_history() {
            Purpose::Late
        } else {
            Purpose::CatchUp
        }
    }
}

/// Carry out the jobs of the answer to our request `req` on `link` (see `state::receipts`), in
/// order: log a part and report which of its messages were new to the log, show messages, tell
/// events. Showing waits for room in the application's event queue. It ends once the driver drops
/// its sender and every job is done.
pub(super) async fn receive(mut jobs: mpsc::UnboundedReceiver<Job>, link: LinkId, req: u32, sink: Arc<ReaderContext>) {
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Ingest(msgs) => {
                let records: Vec<Record> = msgs.iter().map(chat_to_record).collect();
                let fresh = match sink.log.ingest(records).await {
                    Ok(fresh) => fresh,
                    Err(err) => {
                        log::warn!("cannot log history: {err}");
                        vec![true; msgs.len()]
                    }
                };
                if sink.net.send(NetEvent::Ingested { link, req, msgs, fresh }).await.is_err() {
                    return;
                }
            }
            Job::Show(messages) => {
                for message in messages {
                    if sink.events.send(Event::Message(message)).await.is_err() {
                        return;
                    }
                }
            }
            Job::Tell(event) => {
                let _ = sink.events.send(event).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(text_len: usize) -> Chat {
        Chat {
            id: frames::random_id(),
            from: "ana".into(),
            room: "r".into(),
            ts: 1,
            hlc: 2,
            text: "x".repeat(text_len),
            ..Chat::default()
        }
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

    #[test]
    fn the_answer_budget_allows_one_answer_at_a_time_and_refills() {
        let config = HistoryConfig { answer_burst_bytes: 1000, answer_bytes_per_sec: 100, ..HistoryConfig::default() };
        let now = Instant::now();
        let mut budget = AnswerBudget::new(&config, now);
        assert_eq!(budget.start(now), Some(1000));
        assert_eq!(budget.start(now), None, "busy");
        budget.finish(1100);
        assert_eq!(budget.start(now), None, "overdrawn");
        assert_eq!(budget.start(now + Duration::from_secs(3)), Some(200));
        budget.finish(0);
        assert_eq!(budget.start(now + Duration::from_secs(60)), Some(1000), "never more than the burst");
    }

    #[test]
    fn the_join_asks_the_first_member_and_a_lost_member_is_caught_up_with() {
        let mut requests = Requests::new(Some(None), 100, 10_000);
        assert!(requests.waits_for_join());
        let join = requests.on_link_up("a").expect("the join's request");
        assert_eq!((join.limit, join.purpose), (100, Purpose::Join));
        assert_eq!(requests.on_link_up("b"), None, "asked once");
        requests.not_asked(join.clone());
        assert_eq!(requests.on_link_up("b"), Some(join), "a request that could not be sent waits for the next member");

        let now = Instant::now();
        requests.lost("a".into(), 42, now, Duration::from_secs(60));
        let catch_up = requests.on_link_up("a").expect("a catch-up");
        assert_eq!(
            (catch_up.after, catch_up.limit, catch_up.purpose),
            (Some(Key { stamp: 42, id: String::new() }), 10_000, Purpose::CatchUp)
        );
        assert_eq!(requests.on_link_up("a"), None, "once");
        requests.lost("a".into(), 42, now, Duration::from_secs(60));
        requests.lost("a".into(), 50, now + Duration::from_secs(1), Duration::from_secs(60));
        let twice = requests.on_link_up("a").expect("a catch-up");
        assert_eq!(
            twice.after,
            Some(Key { stamp: 42, id: String::new() }),
            "lost twice before it came back: from the first loss"
        );
        requests.lost("old".into(), 1, now, Duration::from_secs(60));
        requests.lost("new".into(), 2, now + Duration::from_secs(61), Duration::from_secs(60));
        assert_eq!(requests.on_link_up("old"), None, "forgotten after a while");
    }

    #[test]
    fn a_join_that_stopped_waiting_asks_the_next_member_for_earlier_messages_not_a_catch_up() {
        let mut requests = Requests::new(Some(None), 100, 10_000);
        requests.stop_waiting_for_join();
        assert!(!requests.waits_for_join());
        let late = requests.on_link_up("first to come").expect("still asked");
        assert_eq!((late.limit, late.purpose), (100, Purpose::Late));
        requests.not_asked(late.clone());
        assert_eq!(requests.on_link_up("next"), Some(late), "one that could not be sent waits for the next member");
    }

    #[test]
    fn a_request_cut_off_with_its_link_waits_for_the_next_one() {
        let now = Instant::now();
        let mut requests = Requests::new(None, 0, 10_000);
        requests.lost("a".into(), 42, now, Duration::from_secs(60));
        let catch_up = requests.on_link_up("a").expect("a catch-up");
        let req = requests.next_req();
        requests.sent(7, req, Some("a".into()), catch_up);
        let (answering, rest) = requests.link_gone(7).expect("unanswered");
        // Lost again meanwhile (from a later point): the catch-up still starts at the earlier one.
        requests.lost("a".into(), 50, now, Duration::from_secs(60));
        requests.ask_when_back(answering, rest, now);
        let again = requests.on_link_up("a").expect("asked again on the next link");
        assert_eq!((again.after, again.purpose), (Some(Key { stamp: 42, id: String::new() }), Purpose::CatchUp));
        assert_eq!(requests.on_link_up("a"), None, "once");

        let mut requests = Requests::new(Some(None), 100, 10_000);
        let join = requests.on_link_up("b").expect("the join's request");
        let req = requests.next_req();
        requests.sent(8, req, Some("b".into()), join);
        let (answering, rest) = requests.link_gone(8).expect("unanswered");
        requests.ask_when_back(answering, rest, now);
        let next = requests.on_link_up("c").expect("the next member is asked");
        assert_eq!((next.limit, next.purpose), (100, Purpose::Late), "the rest of the join's history, not a catch-up");
    }

    #[test]
    fn answers_are_routed_by_link_and_number_and_cut_at_the_limit() {
        let mut requests = Requests::new(None, 0, 10_000);
        let req = requests.next_req();
        requests.sent(7, req, Some("a".into()), Ask { after: None, limit: 3, purpose: Purpose::CatchUp });
        assert_eq!(requests.part(8, req, vec![chat(1)], true), Part::Unasked);
        assert_eq!(requests.part(7, req + 1, vec![chat(1)], true), Part::Unasked);
        let passed = |part: Part| match part {
            Part::Passed { msgs, last } => (msgs.len(), last),
            Part::Unasked => panic!("unasked"),
        };
        assert_eq!(passed(requests.part(7, req, vec![chat(1), chat(1)], true)), (2, false));
        assert_eq!(passed(requests.part(7, req, vec![chat(1), chat(1)], true)), (1, true), "three asked, three passed");
        assert!(!requests.is_asking(7), "done at the limit");

        let req = requests.next_req();
        requests.sent(9, req, Some("b".into()), Ask { after: None, limit: 5, purpose: Purpose::Join });
        requests.part(9, req, vec![chat(1), chat(1)], true);
        let (peer, rest) = requests.link_gone(9).expect("unfinished");
        assert_eq!((peer.as_deref(), rest.limit, rest.purpose), (Some("b"), 3, Purpose::Join));
        assert_eq!(requests.link_gone(9), None);
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
