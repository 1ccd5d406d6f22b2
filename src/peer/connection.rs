//! One TCP connection to another member, run by one task that reads and writes it.
//!
//! Its writer drains a bounded queue of encoded bytes (see `outbox`); the actor only ever `try_send`s
//! into it, so a peer that stops reading fills its own queue and gets dropped, never stalling the others.
//! Reading and writing share the task (one task and one borrowed socket per link, not two of each), and
//! the task polls its writer first, so a write that took the socket's error is known before the reader
//! sees the connection end, and the link ends with that reason.
//!
//! The reader first finds out which protocol the link speaks (the *opening*), reports it to the actor,
//! then decodes that protocol for the rest of the link's life:
//! * [`Role::Probe`]: we dialled and our hello (0xFF first) is queued. A hello back means p2pchat.
//!   Original bytes back mean an original peer (that typed before reading our probe). A close or
//!   silence means an original peer that dropped the link on our 0xFF byte: the actor redials it
//!   speaking the original protocol.
//! * [`Role::DialOriginal`]: we dialled a known original peer; original protocol from the first byte.
//! * [`Role::Accepted`]: the first bytes decide: the p2pchat magic, else original (also when nothing
//!   comes within `decide_timeout`, since an original dialler says nothing until its user types). The
//!   actor writes nothing to the link until then.
//!
//! Messages go straight from the reader to the application's event channel, waiting when it is full: a
//! slow application slows its senders through TCP, it does not lose messages.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::actor::NetEvent;
use super::history;
use super::outbox::{self, Drain, Outbox};
use super::secure::SecureStream;
use super::seen::SeenIds;
use super::trust::{self, KnownKeys};
use super::{Event, Limits, Message};
use crate::history::clock::Clock;
use crate::history::log::LogHandle;
use crate::history::store::Record;
use crate::private::RoomKey;
use crate::reading::{read_opening, Opened, Silence};
use crate::sending;
use crate::wire::chat::{self, ChatDecoder, Piece};
use crate::wire::frames::{self, Chat, Frame, FrameDecoder};

/// Encoded bytes for one connection's queue, shared between connections when they are the same.
pub(super) type Line = Arc<[u8]>;

pub(super) type ConnId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Probe,
    DialOriginal,
    Accepted,
}

/// A token bucket per link: a member sending faster than `max_message_rate` (after a burst of three
/// times that) is muted (its messages dropped here) until it slows down; one notice per muted spell.
const BURST: f64 = 3.0;

struct Flood {
    tokens: f64,
    rate: f64,
    last: tokio::time::Instant,
    muted: bool,
}

impl Flood {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self { tokens: BURST * rate, rate, last: tokio::time::Instant::now(), muted: false }
    }

    /// Whether one more message may be shown; `Some(notice)` when the muted state changes.
    fn admit(&mut self, from: SocketAddr, sender: Option<&str>) -> (bool, Option<String>) {
        let now = tokio::time::Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(BURST * self.rate);
        self.last = now;
        // Named only for a notice: this runs for every message.
        let who = || sender.map_or_else(|| from.to_string(), |name| format!("{name} ({from})"));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            let change = std::mem::take(&mut self.muted).then(|| format!("{} is no longer muted", who()));
            (true, change)
        } else if self.muted {
            (false, None)
        } else {
            self.muted = true;
            (false, Some(format!("muting {}: more than {} messages per second", who(), self.rate)))
        }
    }
}

/// What a reader needs besides its socket (one per peer, shared by its links).
pub(super) struct ReaderContext {
    pub limits: Limits,
    pub room: String,
    pub net: mpsc::Sender<NetEvent>,
    pub events: mpsc::Sender<Event>,
    pub seen: Arc<Mutex<SeenIds>>,
    pub clock: Arc<Clock>,
    pub log: LogHandle,
    /// In a private room: the keys names have here; every message must be signed by its author's.
    pub authors: Option<Arc<Mutex<KnownKeys>>>,
    /// In a private room: its key, which opens sealed messages.
    pub room_key: Option<Arc<RoomKey>>,
}

/// What the actor tells a running link; its task reads each when it matters.
#[derive(Default)]
pub(super) struct LinkFlags {
    /// Set once the link speaks p2pchat frames: its writer may then join queued lines in one write.
    pub framed: AtomicBool,
    /// Set while we relay this member's messages to others: its reader then hands each new message
    /// to the actor as well.
    pub forwards: AtomicBool,
    /// Set when the actor closes the link: it stops reading, writes what is queued, and ends. Without
    /// it, a link whose queue is closed (a retired one) reads on until the other side closes.
    pub closing: AtomicBool,
}

/// The live parts of a connection; dropping it aborts its task and closes the socket.
pub(super) struct Connection {
    pub queue: Outbox<Line>,
    pub flags: Arc<LinkFlags>,
    pub task: AbortOnDropHandle<()>,
}

/// What a link runs on: the socket itself, or (in a private room) the plaintext side of its
/// encryption (see `secure`).
pub(super) enum Transport {
    Plain(TcpStream),
    Secure(SecureStream),
}

pub(super) fn spawn(
    id: ConnId,
    transport: Transport,
    from: SocketAddr,
    role: Role,
    context: Arc<ReaderContext>,
) -> Connection {
    let limits = &context.limits;
    let (queue, lines) = outbox::outbox(outbox::Bounds {
        lines: limits.send_queue,
        stalled_after: limits.stalled_after,
        bytes: limits.send_queue_bytes,
    });
    let flags = Arc::new(LinkFlags::default());
    let link = LinkTask { id, from, role, context, flags: flags.clone() };
    let task = match transport {
        Transport::Plain(mut stream) => {
            let _ = stream.set_nodelay(true);
            crate::net::detect_dead_peer(&stream, link.context.limits.dead_after);
            tokio::spawn(async move {
                // Borrowed halves: one task reads and writes, so the socket needs no shared owner.
                let (read_half, write_half) = stream.split();
                link.run(read_half, write_half, lines).await;
            })
        }
        Transport::Secure(stream) => {
            let (read_half, write_half) = tokio::io::split(stream);
            tokio::spawn(link.run(read_half, write_half, lines))
        }
    };
    Connection { queue, flags, task: AbortOnDropHandle::new(task) }
}

/// The writing side of a link.
trait LinkWriter: AsyncWrite + Unpin + Send {
    /// After a failed write: make the link's reader end once it has read what already arrived.
    fn stop_reads(&self);
}

impl LinkWriter for tcp::WriteHalf<'_> {
    fn stop_reads(&self) {
        let _ = socket2::SockRef::from(self.as_ref()).shutdown(std::net::Shutdown::Read);
    }
}

impl LinkWriter for WriteHalf<SecureStream> {
    /// Writing here fails only once the encryption's pumps are gone, and they end the reads
    /// themselves.
    fn stop_reads(&self) {}
}

/// The reading side of a link.
trait LinkReader: AsyncRead + Unpin + Send {
    /// Wait until a read would not: the link takes a read buffer only then, so an idle link holds
    /// none. (An error is left for that read to report.)
    fn readable(&self) -> impl Future<Output = ()> + Send;
}

impl LinkReader for tcp::ReadHalf<'_> {
    async fn readable(&self) {
        let _ = self.as_ref().readable().await;
    }
}

impl LinkReader for ReadHalf<SecureStream> {
    /// The encryption's pumps hand plaintext over through an in-memory pipe that tells no readiness:
    /// a private link's read waits with its buffer.
    async fn readable(&self) {}
}

/// How a link's reading ended.
enum ReadEnd {
    /// The stream ended without a goodbye: the other side closed it, unless our writer failed first
    /// (it then stopped our reads, or its write took the socket's error).
    EndOfStream,
    /// Why it ended, and whether the other side said goodbye.
    Because(String, bool),
}

/// How a link's writing ended.
enum Written {
    /// The queue was closed and everything in it written; the write side is shut down.
    All,
    Failed(String),
}

/// One link's task: it reads and writes the connection, and tells the actor how it ended.
struct LinkTask {
    id: ConnId,
    from: SocketAddr,
    role: Role,
    context: Arc<ReaderContext>,
    flags: Arc<LinkFlags>,
}

impl LinkTask {
    async fn run(self, mut read_half: impl LinkReader, write_half: impl LinkWriter, lines: Drain<Line>) {
        let mut reading = std::pin::pin!(self.read(&mut read_half));
        let mut writing = std::pin::pin!(write_loop(write_half, lines, &self.flags));
        let mut written = None;
        // The writer is polled first: a write that took the socket's error is known before the
        // reader's end of stream (one task, so there is no race to settle).
        let ended = std::future::poll_fn(|cx| {
            if written.is_none() {
                if let Poll::Ready(outcome) = writing.as_mut().poll(cx) {
                    written = Some(outcome);
                }
            }
            if self.flags.closing.load(Ordering::Acquire) {
                // Nothing more is read or reported: the link ends once its queue is written.
                return if written.is_some() { Poll::Ready(None) } else { Poll::Pending };
            }
            reading.as_mut().poll(cx).map(Some)
        })
        .await;
        let (reason, clean) = match ended.flatten() {
            None => return,
            Some(ReadEnd::Because(reason, clean)) => (reason, clean),
            Some(ReadEnd::EndOfStream) => match written {
                Some(Written::Failed(reason)) => (reason, false),
                _ => ("closed by the other side".to_owned(), false),
            },
        };
        let _ = sending::send(&self.context.net, NetEvent::Closed { id: self.id, reason, clean }).await;
    }

    /// Read the link until it ends; `None` when there is nothing to report as a closed link.
    async fn read(&self, half: &mut impl LinkReader) -> Option<ReadEnd> {
        let (id, context) = (self.id, &*self.context);
        let opened = match self.role {
            Role::DialOriginal => Opened::Original(Vec::new()),
            Role::Probe => read_opening(half, context.limits.probe_timeout).await,
            Role::Accepted => read_opening(half, context.limits.decide_timeout).await,
        };
        match (self.role, opened) {
            (Role::Probe, Opened::Silent | Opened::Closed(_)) => {
                let _ = sending::send(&context.net, NetEvent::ProbeRejected { id }).await;
                None
            }
            (_, Opened::Closed(reason)) => Some(ReadEnd::Because(reason, false)),
            (_, Opened::P2pchat(rest)) => {
                Some(p2pchat_loop(id, half, self.from, rest, context, &self.flags.forwards).await)
            }
            (_, opened @ (Opened::Original(_) | Opened::Silent)) => {
                let first = if let Opened::Original(first) = opened { first } else { Vec::new() };
                sending::send(&context.net, NetEvent::Original { id }).await.ok()?;
                // Boxed: links to original peers are few, and inline this loop would size every link's
                // task (a p2pchat link's loop is smaller).
                Some(Box::pin(original_loop(id, half, self.from, first, context)).await)
            }
        }
    }
}

/// How much one read asks for: it starts small, since chat lines are short, doubles while reads fill it,
/// up to 64 KiB for a busy link, and halves again while reads use a quarter of it or less, so a link
/// that once carried a big frame (a hello listing a room of hundreds, a history answer) goes back to
/// ~1 KiB reads. A link takes its buffer when bytes are there to read and gives it back once they are
/// decoded (a room of 200 holds 199 links, nearly all idle at any moment). Buffers are filled with
/// `read_buf`, which never zeroes them: only pages data lands in are touched.
#[derive(Debug, Clone, Copy)]
struct ReadSize(usize);

impl ReadSize {
    const FIRST: usize = 1024;
    const MOST: usize = 64 * 1024;

    fn new() -> Self {
        Self(Self::FIRST)
    }

    /// Room for the next read in `buf`, giving back what a past burst left beyond twice that.
    fn prepare(self, buf: &mut Vec<u8>) {
        if buf.capacity() > buf.len() + 2 * self.0 {
            buf.shrink_to(buf.len() + self.0);
        }
        buf.reserve(self.0);
    }

    /// A read of `n` bytes happened: grow when it took everything asked for, shrink when it took little.
    fn after_read(&mut self, n: usize) {
        if n >= self.0 {
            self.0 = (self.0 * 2).min(Self::MOST);
        } else if n <= self.0 / 4 {
            self.0 = (self.0 / 2).max(Self::FIRST);
        }
    }
}

/// Most bytes one write gathers from a framed link's queue.
const MAX_BATCH_BYTES: usize = 64 * 1024;

async fn write_loop(mut half: impl LinkWriter, mut lines: Drain<Line>, flags: &LinkFlags) -> Written {
    while let Some(line) = lines.next().await {
        let next = if flags.framed.load(Ordering::Acquire) { lines.try_next() } else { None };
        let written = match next {
            // Frames keep their boundaries however the stream is cut, so a p2pchat link writes
            // everything already queued at once (one syscall instead of one per line when the room is
            // busy), in a buffer made for the occasion: a link keeps no batch memory between bursts.
            // An original peer prints each read as it comes, so its lines keep one write each.
            Some(next) => {
                let mut batch = Vec::with_capacity(line.len() + next.len());
                batch.extend_from_slice(&line);
                batch.extend_from_slice(&next);
                while batch.len() < MAX_BATCH_BYTES {
                    let Some(more) = lines.try_next() else { break };
                    batch.extend_from_slice(&more);
                }
                half.write_all(&batch).await
            }
            None => half.write_all(&line).await,
        };
        if let Err(err) = written {
            // The reader reports the end, not us: the other side may have said goodbye and closed
            // while our line was on its way, and its `bye` may still wait, unread, in our socket.
            // Stopping the reads makes the reader take what arrived and then end, with this reason
            // unless it read a goodbye.
            half.stop_reads();
            return Written::Failed(format!("write failed: {err}"));
        }
    }
    // The actor closed the queue: we are leaving, or the link was retired or refused.
    let _ = half.shutdown().await;
    Written::All
}

/// The original protocol: `<NAME> :: text` pieces, decoded incrementally.
async fn original_loop(
    id: ConnId,
    half: &mut impl LinkReader,
    from: SocketAddr,
    first: Vec<u8>,
    context: &ReaderContext,
) -> ReadEnd {
    let mut decoder = ChatDecoder::new();
    let mut flood = Flood::new(context.limits.max_message_rate);
    let mut pending = first;
    let mut read_size = ReadSize::new();
    loop {
        if !pending.is_empty() {
            let had_name = decoder.name().is_some();
            let pieces = decoder.feed(&pending);
            pending = Vec::new();
            if let (false, Some(name)) = (had_name, decoder.name()) {
                let _ = sending::send(&context.net, NetEvent::Renamed { id, name: name.to_owned() }).await;
            }
            deliver(pieces, from, context, &mut flood).await;
        }
        let read = async {
            half.readable().await;
            read_size.prepare(&mut pending);
            half.read_buf(&mut pending).await
        };
        let read = if decoder.has_held_back() {
            match tokio::time::timeout(context.limits.hold_back, read).await {
                Ok(read) => read,
                Err(_idle) => {
                    deliver(decoder.flush(), from, context, &mut flood).await;
                    continue;
                }
            }
        } else {
            read.await
        };
        match read {
            Ok(0) => break,
            Ok(n) => read_size.after_read(n),
            Err(err) => {
                deliver(decoder.flush(), from, context, &mut flood).await;
                return ReadEnd::Because(format!("read failed: {err}"), false);
            }
        }
    }
    deliver(decoder.flush(), from, context, &mut flood).await;
    ReadEnd::EndOfStream
}

/// Log and show what an original peer said. Its lines carry no id: each is logged under one made
/// here, as not shared (see `history::store`).
async fn deliver(pieces: Vec<Piece>, from: SocketAddr, context: &ReaderContext, flood: &mut Flood) {
    let mut records = Vec::new();
    let mut shown = Vec::new();
    for Piece { sender, text, starts_message } in pieces {
        if starts_message {
            let (admitted, notice) = flood.admit(from, sender.as_deref());
            if let Some(text) = notice {
                shown.push(Event::Notice { text });
            }
            if !admitted {
                continue;
            }
        } else if flood.muted {
            continue;
        }
        let stamp = context.clock.tick();
        let received_at = SystemTime::now();
        records.push(Record {
            id: crate::wire::frames::random_id(),
            stamp,
            sent_at: crate::history::clock::millis_of(stamp),
            sender: sender.clone(),
            text: text.clone(),
            shared: false,
            author_key: None,
            sig: None,
        });
        let message = Message {
            sender,
            text,
            from,
            received_at,
            starts_message,
            id: None,
            sent_at: None,
            stamp: Some(stamp),
            history: false,
            signed: false,
        };
        shown.push(Event::Message(message));
    }
    log_then_show(context, records, shown).await;
}

/// Log messages before the application sees them, so a `history()` asked after a message arrived
/// has it (the log thread takes jobs in order).
async fn log_then_show(context: &ReaderContext, records: Vec<Record>, events: Vec<Event>) {
    if !records.is_empty() {
        context.log.record(records).await;
    }
    for event in events {
        // An error means the application dropped its event stream: nobody is listening any more.
        let _ = sending::send(&context.events, event).await;
    }
}

/// How far a live message's own time may be from ours in a private room: older ones are replays
/// (copies within it are caught by their ids), newer ones come from a clock that is far off.
const FRESH_FOR_MS: u64 = 10 * 60 * 1000;

/// Outside private rooms nobody checks signatures: drop any a message carries, so that it is never
/// logged or shown as signed.
fn unverified(chat: &mut Chat, context: &ReaderContext) {
    if context.authors.is_none() {
        chat.key = None;
        chat.sig = None;
    }
}

/// In a private room, whether a live message is its author's (see `trust::check_author`) and recent.
fn authentic_and_fresh(chat: &Chat, context: &ReaderContext) -> Result<(), String> {
    let Some(authors) = &context.authors else { return Ok(()) };
    trust::check_author(chat, &context.room, authors)?;
    if crate::history::clock::wall_millis().abs_diff(chat.ts) > FRESH_FOR_MS {
        return Err(format!(
            "a message from {:?} sent at a time more than 10 minutes from ours (a replay?)",
            chat.from
        ));
    }
    Ok(())
}

/// Messages a link brought that were dropped (private rooms: forged, altered, replayed): the user is
/// told about the first few; a link that keeps sending them cannot fill the screen.
#[derive(Default)]
struct Drops(u32);

impl Drops {
    const TOLD: u32 = 5;

    fn tell(&mut self, text: String, from: SocketAddr, shown: &mut Vec<Event>) {
        log::warn!("{text}");
        self.0 = self.0.saturating_add(1);
        if self.0 <= Self::TOLD {
            shown.push(Event::Notice { text });
        }
        if self.0 == Self::TOLD {
            shown.push(Event::Notice { text: format!("more messages dropped from {from} are only logged") });
        }
    }
}

/// The extension protocol: frames.
async fn p2pchat_loop(
    id: ConnId,
    half: &mut impl LinkReader,
    from: SocketAddr,
    rest: Vec<u8>,
    context: &ReaderContext,
    forwards: &AtomicBool,
) -> ReadEnd {
    let mut decoder = FrameDecoder::new();
    decoder.feed(&rest);
    let mut read_size = ReadSize::new();
    let mut silence = Silence::new(context.limits.dead_after);
    let mut flood = Flood::new(context.limits.max_message_rate);
    let mut drops = Drops::default();
    let mut greeted = false;
    let mut said_bye = false;
    // What one read brought goes on after its frames are taken, in their order: the actor's events,
    // then the messages, logged in one job before they are shown. Taking the frames never waits, so
    // the link's task is not sized to hold a frame across a wait.
    let (mut to_actor, mut to_log, mut to_show) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let ended = loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break None,
                Err(err) => {
                    let text = format!("{from} sent a broken p2pchat frame ({err}); closing that link");
                    log::warn!("{text}");
                    to_show.push(Event::Notice { text });
                    break Some((format!("protocol error: {err}"), false));
                }
            };
            // A sealed message is opened here and then taken as any message; what is passed on to
            // relay partners stays sealed.
            let (frame, passed_on) = match frame {
                Frame::Sealed { id: msg_id, data } => match context
                    .room_key
                    .as_deref()
                    .map(|key| key.open_sealed(&msg_id, &data))
                {
                    Some(Ok(chat)) => (Frame::Msg(chat), Some(Frame::Sealed { id: msg_id, data })),
                    Some(Err(err)) => {
                        drops.tell(format!("dropped a sealed message passed on by {from}: {err}"), from, &mut to_show);
                        continue;
                    }
                    // Not a private room: nothing here opens it.
                    None => continue,
                },
                other => (other, None),
            };
            match frame {
                Frame::Hello(hello) if !greeted => {
                    greeted = true;
                    to_actor.push(NetEvent::Hello { id, hello });
                }
                Frame::Error { code, message } => {
                    to_actor.push(NetEvent::Refused { id, code, message });
                    break Some(("refused".to_owned(), false));
                }
                _ if !greeted => break Some(("spoke before its hello".to_owned(), false)),
                Frame::Msg(mut chat) => {
                    unverified(&mut chat, context);
                    if chat.room != context.room || chat::validate_text(&chat.text).is_err() {
                        log::debug!("ignoring a message from {from} for room {:?} or with an invalid text", chat.room);
                        continue;
                    }
                    if let Err(why) = authentic_and_fresh(&chat, context) {
                        drops.tell(format!("dropped {why}, passed on by {from}"), from, &mut to_show);
                        continue;
                    }
                    let first_time = context.seen.lock().map(|mut seen| seen.first_time(&chat.id)).unwrap_or(true);
                    let (shown, notice) = if first_time { flood.admit(from, Some(&chat.from)) } else { (false, None) };
                    if let Some(text) = notice {
                        to_show.push(Event::Notice { text });
                    }
                    if shown {
                        if forwards.load(Ordering::Relaxed) {
                            let line = match &passed_on {
                                Some(sealed) => frames::encode(sealed),
                                None => frames::encode(&Frame::Msg(chat.clone())),
                            }
                            .into();
                            to_actor.push(NetEvent::Forward { id, line });
                        }
                        context.clock.observe(chat.stamp());
                        to_log.push(history::chat_to_record(&chat));
                        to_show.push(Event::Message(history::message(chat, from, false)));
                    }
                }
                Frame::HistoryRequest { req, limit, after } => {
                    to_actor.push(NetEvent::HistoryRequested { id, req, limit, after });
                }
                Frame::History { req, msgs, more } => {
                    let authentic = |m: &Chat| match &context.authors {
                        None => true,
                        Some(authors) => trust::check_author(m, &context.room, authors)
                            .map_err(|why| log::warn!("dropped history from {from}: {why}"))
                            .is_ok(),
                    };
                    let msgs = msgs
                        .into_iter()
                        .filter(|m| history::acceptable(m, &context.room) && authentic(m))
                        .map(|mut m| {
                            unverified(&mut m, context);
                            m
                        })
                        .collect();
                    to_actor.push(NetEvent::HistoryPart { id, req, msgs, more });
                }
                Frame::Nick { name } => {
                    if chat::validate_name(&name).is_ok() {
                        to_actor.push(NetEvent::Renamed { id, name });
                    }
                }
                Frame::Bye => said_bye = true,
                Frame::RelayAsk { peer } => {
                    to_actor.push(NetEvent::RelayAsked { id, peer });
                }
                Frame::RelayOpen { peer, name, addr } => {
                    let (name, addr) = (name.filter(|n| chat::validate_name(n).is_ok()), addr.parse().ok());
                    if let Some(addr) = addr {
                        to_actor.push(NetEvent::RelayOpened { id, peer, name, addr });
                    }
                }
                Frame::RelayClose { peer, reason, clean } => {
                    to_actor.push(NetEvent::RelayClosed { id, peer, reason, clean });
                }
                Frame::Hello(_)
                | Frame::Welcome { .. }
                | Frame::Ping
                | Frame::Vouch { .. }
                | Frame::PunchRequest { .. }
                | Frame::Punch { .. }
                | Frame::SecureHello { .. }
                | Frame::Sealed { .. }
                | Frame::Unknown => {}
            }
        };
        let mut actor_gone = false;
        for event in to_actor.drain(..) {
            actor_gone |= sending::send(&context.net, event).await.is_err();
        }
        log_then_show(context, std::mem::take(&mut to_log), std::mem::take(&mut to_show)).await;
        if let Some((reason, clean)) = ended.or_else(|| actor_gone.then(|| ("closing".to_owned(), false))) {
            return ReadEnd::Because(reason, clean);
        }
        // p2pchat ends send something (a ping if nothing else) every `keepalive_interval`: silence
        // means the other end is gone.
        decoder.release_if_drained();
        let read = tokio::select! {
            biased;
            read = async {
                half.readable().await;
                let buf = decoder.read_buffer();
                read_size.prepare(buf);
                half.read_buf(buf).await
            } => read,
            () = silence.passed() => return ReadEnd::Because(format!("silent for {:?}", context.limits.dead_after), false),
        };
        match read {
            Ok(0) if said_bye => return ReadEnd::Because("left".to_owned(), true),
            Ok(0) => return ReadEnd::EndOfStream,
            Ok(n) => {
                read_size.after_read(n);
                silence.heard();
            }
            Err(err) => return ReadEnd::Because(format!("read failed: {err}"), said_bye),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ReadSize;

    #[test]
    fn reads_start_small_grow_while_they_fill_the_buffer_and_shrink_back() {
        let mut size = ReadSize::new();
        let mut buf = Vec::new();
        size.prepare(&mut buf);
        assert!(buf.capacity() >= ReadSize::FIRST && buf.capacity() < ReadSize::MOST);
        size.after_read(ReadSize::FIRST / 2);
        assert_eq!(size.0, ReadSize::FIRST, "a read of half the buffer neither grows nor shrinks it");
        for _ in 0..20 {
            size.after_read(size.0);
        }
        assert_eq!(size.0, ReadSize::MOST, "full reads double it, up to the cap");
        size.prepare(&mut buf);
        assert!(buf.capacity() >= ReadSize::MOST);
        for _ in 0..20 {
            size.after_read(40);
        }
        assert_eq!(size.0, ReadSize::FIRST, "small reads halve it, down to the start");
        buf.clear();
        size.prepare(&mut buf);
        assert!(buf.capacity() < 4 * ReadSize::FIRST, "the buffer gives back what the burst took: {}", buf.capacity());
    }
}
