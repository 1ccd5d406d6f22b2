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
use std::sync::Arc;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::actor::{now, NetEvent};
use super::outbox::{self, Drain, Outbox};
use super::secure::SecureStream;
use super::state::reader::{self, End, Outputs};
use super::state::rules::LinkRules;
use super::types::{Line, LinkId, Role};
use super::Event;
use crate::history::log::LogHandle;
use crate::history::store::Record;
use crate::sending;

/// What a link's task needs besides its socket (one per peer, shared by its links): the rules its
/// reader applies, and where what it reads goes.
pub(super) struct ReaderContext {
    pub rules: LinkRules,
    pub net: mpsc::Sender<NetEvent>,
    pub events: mpsc::Sender<Event>,
    pub log: LogHandle,
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
    id: LinkId,
    transport: Transport,
    from: SocketAddr,
    role: Role,
    context: Arc<ReaderContext>,
) -> Connection {
    let limits = &context.rules.limits;
    let (queue, lines) = outbox::outbox(outbox::Bounds {
        lines: limits.send_queue,
        stalled_after: limits.stalled_after,
        bytes: limits.send_queue_bytes,
    });
    let flags = Arc::new(LinkFlags::default());
    let authenticated = matches!(transport, Transport::Secure(_));
    let link = LinkTask { id, from, role, authenticated, context, flags: flags.clone() };
    let task = match transport {
        Transport::Plain(mut stream) => {
            let _ = stream.set_nodelay(true);
            crate::net::detect_dead_peer(&stream, link.context.rules.limits.dead_after);
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
    StreamEnded,
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
    id: LinkId,
    from: SocketAddr,
    role: Role,
    /// A private room's Noise session (its other end proved it holds the room key).
    authenticated: bool,
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
            Some(ReadEnd::StreamEnded) => match written {
                Some(Written::Failed(reason)) => (reason, false),
                _ => ("closed by the other side".to_owned(), false),
            },
        };
        let _ = sending::send(&self.context.net, NetEvent::Closed { id: self.id, reason, clean }).await;
    }

    /// Read the link until it ends; `None` when there is nothing to report as a closed link.
    async fn read(&self, half: &mut impl LinkReader) -> Option<ReadEnd> {
        let rules = &self.context.rules;
        let mut reader = reader::LinkReader::new(self.role, self.from, self.authenticated, now(), rules);
        let mut out = Outputs::default();
        let mut read_size = ReadSize::new();
        let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        reader.start(&mut out);
        loop {
            if !out.is_empty() {
                let end = out.end.take();
                if !self.carry_out(&mut out).await {
                    // The peer is closing: nobody to tell.
                    return None;
                }
                match end {
                    None => {}
                    Some(End::Quietly) => return None,
                    Some(End::StreamEnded) => return Some(ReadEnd::StreamEnded),
                    Some(End::Closed { reason, clean }) => return Some(ReadEnd::Because(reason, clean)),
                }
            }
            // One timer per link, moved only when the reader needs it sooner or it went off: a busy
            // link pushes its silence bound back with every read, and re-arming a timer per read
            // would cost the timer wheel work on every message.
            // A reader that needs no timer drops it: a timer that went off would be ready at every poll.
            match (reader.poll_timeout().map(tokio::time::Instant::from_std), &mut timer) {
                (None, _) => timer = None,
                (Some(at), Some(armed)) if at < armed.deadline() || armed.is_elapsed() => armed.as_mut().reset(at),
                (Some(_), Some(_)) => {}
                (Some(at), None) => timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            let step = {
                let read = async {
                    half.readable().await;
                    let Some(buf) = reader.read_buffer() else { return Ok(0) };
                    read_size.prepare(buf);
                    half.read_buf(buf).await
                };
                let fired = async {
                    match &mut timer {
                        Some(armed) => armed.as_mut().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    read = read => Some(read),
                    () = fired => None,
                }
            };
            let forwarding = self.flags.forwards.load(Ordering::Relaxed);
            match step {
                None => reader.handle_timeout(now(), rules, &mut out),
                Some(Ok(0)) => reader.handle_eof(now(), rules, &mut out),
                Some(Ok(n)) => {
                    read_size.after_read(n);
                    reader.handle_read(now(), rules, forwarding, &mut out);
                }
                Some(Err(err)) => reader.handle_error(now(), rules, &err.to_string(), &mut out),
            }
        }
    }

    /// Send what the reader produced on, in order: reports to the peer's task, then the messages,
    /// logged in one job before they are shown. False once the peer's task is gone.
    async fn carry_out(&self, out: &mut Outputs) -> bool {
        let context = &*self.context;
        let mut peer_gone = false;
        for report in out.reports.drain(..) {
            peer_gone |= sending::send(&context.net, NetEvent::Report { id: self.id, report }).await.is_err();
        }
        log_then_show(context, std::mem::take(&mut out.to_log), std::mem::take(&mut out.to_show)).await;
        !peer_gone
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
