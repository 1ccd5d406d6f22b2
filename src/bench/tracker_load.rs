//! Joins per second at a tracker that already holds many registrations.
//!
//! Setup registers `registrations` members. Against a p2pchat tracker each is a live control connection
//! (hello, welcome, then a ping every 2 s, as a real peer keeps it). Against an original tracker an entry
//! is just an accepted connection, which it never forgets, so each is closed as soon as it is answered.
//!
//! Then `concurrency` workers join over and over for `duration`. A join is a new connection that reads
//! the **full** list: the whole `welcome` frame from a p2pchat tracker; from an original tracker (which
//! never ends its answer) every entry that must be in it, i.e. at least the registrations plus the joins
//! finished before this one connected. Every join ends with a reset, so no port lingers in TIME_WAIT and
//! tens of thousands of joins fit in the ephemeral port range.
//!
//! [`serve_raw_list`] is the scenario's floor: a server with no protocol at all that answers every
//! connection with a list of the same size ([`TrackerProtocol::Raw`]). Run in a process of its own,
//! as a tracker is, it shows how much of a join's cost is just the connection and moving the list's
//! bytes through loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::BenchError;
use crate::protocol::{MAGIC, PROTOCOL_VERSION};
use crate::wire::frames::{self, Frame, Hello};

/// How long the tracker may take to answer the first join after the setup.
const SETTLE_LIMIT: Duration = Duration::from_secs(300);

/// Which tracker protocol the load speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerProtocol {
    P2pchat,
    Original,
    /// The floor's: a list of exactly this many bytes, then nothing.
    Raw {
        list_bytes: usize,
    },
}

#[derive(Debug, Clone)]
pub struct JoinLoad {
    pub tracker: SocketAddr,
    pub protocol: TrackerProtocol,
    pub registrations: usize,
    pub concurrency: usize,
    pub duration: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct JoinReport {
    pub joins: u64,
    pub failures: u64,
    pub seconds: f64,
    /// Bytes of list received, over all joins.
    pub list_bytes: u64,
    /// List entries received, over all joins.
    pub entries: u64,
    /// The shortest list any join received (to check that every join got the full list).
    pub min_entries: u64,
    pub setup_seconds: f64,
}

impl JoinReport {
    pub fn joins_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.joins as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Register, then measure joins; the registrations are closed when this returns.
pub async fn run(load: JoinLoad) -> Result<JoinReport, BenchError> {
    if load.concurrency == 0 || load.duration.is_zero() {
        return Err(BenchError::Setting("concurrency and duration must be above zero".into()));
    }
    let setup_started = Instant::now();
    // Register in parallel batches: a tracker on a 2-core machine takes them faster than one at a time.
    // Each registration pings from the moment it is made: setting up 10,000 takes longer than the
    // tracker's 6 s silence limit.
    let mut keepalives = JoinSet::new();
    let mut pending = JoinSet::new();
    for i in 0..=load.registrations {
        while pending.len() >= 64 || (i == load.registrations && !pending.is_empty()) {
            if let Some(done) = pending.join_next().await {
                if let Some(stream) = done.map_err(join_failed)?? {
                    keepalives.spawn(keep_alive(stream));
                }
            }
        }
        if i < load.registrations {
            let (tracker, protocol) = (load.tracker, load.protocol);
            pending.spawn(async move { register(tracker, protocol).await });
        }
    }
    // One join that is not counted: an original tracker writes a growing list to every registration
    // and may still be busy with them; the clock starts once it answers a join in full.
    let mut settle = connect(load.tracker).await?;
    let mut buf = Vec::new();
    let settled = read_list(&mut settle, &load, load.registrations as u64, &mut buf);
    let (_, entries) = tokio::time::timeout(SETTLE_LIMIT, settled).await.map_err(|_| {
        BenchError::Setting(format!("the tracker did not answer a join within {SETTLE_LIMIT:?} after the setup"))
    })??;
    if entries < load.registrations as u64 {
        return Err(BenchError::Protocol {
            addr: load.tracker,
            what: format!("it lists {entries} of {} registrations", load.registrations),
        });
    }
    drop(settle);
    let setup_seconds = setup_started.elapsed().as_secs_f64();

    let completed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + load.duration;
    let mut workers = JoinSet::new();
    for _ in 0..load.concurrency {
        let (load, completed) = (load.clone(), completed.clone());
        workers.spawn(async move { worker(load, deadline, completed).await });
    }
    let mut report = JoinReport { min_entries: u64::MAX, setup_seconds, ..JoinReport::default() };
    while let Some(done) = workers.join_next().await {
        let part = done.map_err(join_failed)?;
        report.joins += part.joins;
        report.failures += part.failures;
        report.list_bytes += part.list_bytes;
        report.entries += part.entries;
        report.min_entries = report.min_entries.min(part.min_entries);
    }
    report.seconds = started.elapsed().as_secs_f64();
    if report.joins == 0 {
        report.min_entries = 0;
    }
    keepalives.shutdown().await;
    Ok(report)
}

fn join_failed(err: tokio::task::JoinError) -> BenchError {
    BenchError::Setting(format!("a load task failed: {err}"))
}

async fn connect(tracker: SocketAddr) -> Result<TcpStream, BenchError> {
    let stream = TcpStream::connect(tracker).await.map_err(|source| BenchError::Connect { addr: tracker, source })?;
    stream.set_nodelay(true)?;
    // A reset on close: nothing lingers in TIME_WAIT on either side.
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    Ok(stream)
}

/// One registration: a live control connection (p2pchat) or an address the tracker answered and so
/// remembers (original, `None`).
async fn register(tracker: SocketAddr, protocol: TrackerProtocol) -> Result<Option<TcpStream>, BenchError> {
    let mut stream = connect(tracker).await?;
    match protocol {
        TrackerProtocol::P2pchat => {
            read_welcome(&mut stream, tracker, &mut Vec::new()).await?;
            Ok(Some(stream))
        }
        TrackerProtocol::Raw { .. } => Err(BenchError::Setting("the floor's server holds no registrations".into())),
        TrackerProtocol::Original => {
            // Wait for the first bytes of its answer: a connection reset while it is still in the
            // accept backlog would never be remembered.
            let mut first = [0u8; 1];
            stream.read_exact(&mut first).await?;
            Ok(None)
        }
    }
}

async fn keep_alive(mut stream: TcpStream) {
    let ping = frames::encode(&Frame::Ping);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if stream.write_all(&ping).await.is_err() {
            return;
        }
    }
}

/// Read one join's whole list into `buf`; returns (list bytes, entries). `original_entries`: how many
/// an original tracker's list must hold. A worker reuses `buf` from join to join: a fresh buffer for
/// a list of 10,000 was at times a fresh mapping of memory, zeroed and faulted in page by page: ~30%
/// of the samples of `perf record` on the in-process floor of the time.
async fn read_list(
    stream: &mut TcpStream,
    load: &JoinLoad,
    original_entries: u64,
    buf: &mut Vec<u8>,
) -> Result<(u64, u64), BenchError> {
    match load.protocol {
        TrackerProtocol::P2pchat => read_welcome(stream, load.tracker, buf).await,
        TrackerProtocol::Original => read_original_list(stream, original_entries, buf).await,
        TrackerProtocol::Raw { list_bytes } => read_raw_list(stream, list_bytes, buf).await,
    }
}

/// Exactly `len` bytes into `buf`, replacing what it held (its spare capacity is read into as it is,
/// not zeroed first).
async fn read_exactly(stream: &mut (impl AsyncRead + Unpin), len: usize, buf: &mut Vec<u8>) -> Result<(), BenchError> {
    buf.clear();
    buf.reserve(len);
    let mut rest = stream.take(len as u64);
    while buf.len() < len {
        if rest.read_buf(buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(())
}

/// Send our hello and read the whole welcome; returns (list bytes, entries).
async fn read_welcome(
    stream: &mut TcpStream,
    tracker: SocketAddr,
    body: &mut Vec<u8>,
) -> Result<(u64, u64), BenchError> {
    let port = stream.local_addr()?.port();
    let hello = Hello {
        v: PROTOCOL_VERSION,
        id: frames::random_id(),
        name: None,
        room: String::new(),
        listen_port: Some(port),
        peers: vec![],
        identity: None,
        relay: false,
        quiet: false,
    };
    stream.write_all(&frames::encode_opening(&Frame::Hello(hello))).await?;
    let mut head = [0u8; MAGIC.len() + 4];
    stream.read_exact(&mut head).await?;
    if &head[..MAGIC.len()] != MAGIC {
        return Err(BenchError::Protocol { addr: tracker, what: "no p2pchat opening".into() });
    }
    let len = u32::from_be_bytes([head[8], head[9], head[10], head[11]]) as usize;
    read_exactly(stream, len, body).await?;
    let entries = welcome_entries(body).ok_or_else(|| BenchError::Protocol {
        addr: tracker,
        what: String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned(),
    })?;
    Ok((len as u64, entries))
}

/// How many members a welcome frame's body lists (None if it is not a welcome). Counted without
/// parsing, so that reading 10,000 members costs the load generator little beside receiving them:
/// `members` is the last field, and its entries are addresses (which hold no comma) unless an
/// object is among them, in which case the frame is parsed.
fn welcome_entries(body: &[u8]) -> Option<u64> {
    const FIELD: &[u8] = br#""members":["#;
    if !body.starts_with(br#"{"type":"welcome""#) || !body.ends_with(b"]}") {
        return None;
    }
    let start = body.windows(FIELD.len()).position(|w| w == FIELD)? + FIELD.len();
    let members = body.get(start..body.len() - 2)?;
    if members.is_empty() {
        return Some(0);
    }
    if count_byte(members, b'{') == 0 {
        return Some(count_byte(members, b',') + 1);
    }
    match serde_json::from_slice(body) {
        Ok(Frame::Welcome { members, .. }) => Some(members.len() as u64),
        _ => None,
    }
}

/// How many times `byte` occurs in `haystack`, counted in a `u8` per 255 bytes so that the compiler
/// compares many bytes at once: 4.5 µs for a welcome of 10,000 members (180 KB), where
/// `filter().count()` took 63 µs and `contains` 11. Those two took 37% of the load generator's CPU
/// (`perf record`), on the 2 cores the tracker it measures runs on too.
fn count_byte(haystack: &[u8], byte: u8) -> u64 {
    haystack.chunks(255).map(|chunk| u64::from(chunk.iter().fold(0u8, |n, &b| n + u8::from(b == byte)))).sum()
}

/// Read an original tracker's list until it holds at least `expected` entries (or it ends).
async fn read_original_list(
    stream: &mut TcpStream,
    expected: u64,
    buf: &mut Vec<u8>,
) -> Result<(u64, u64), BenchError> {
    const CHUNK: usize = 256 * 1024;
    if buf.len() < CHUNK {
        buf.resize(CHUNK, 0);
    }
    let (mut bytes, mut separators) = (0u64, 0u64);
    loop {
        let n = stream.read(&mut buf[..CHUNK]).await?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        separators += count_byte(&buf[..n], b'-');
        // n entries have n-1 separators; once `expected` entries have started, all earlier ones are whole.
        if separators + 1 >= expected.max(1) {
            break;
        }
    }
    Ok((bytes, separators + 1))
}

async fn read_raw_list(stream: &mut TcpStream, list_bytes: usize, buf: &mut Vec<u8>) -> Result<(u64, u64), BenchError> {
    read_exactly(stream, list_bytes, buf).await?;
    Ok((list_bytes as u64, 0))
}

/// Answer every connection on `listener` with `list_bytes` bytes and nothing else (no registry, no
/// encoding, no protocol), keeping it until the joiner closes; runs until dropped.
pub async fn serve_raw_list(listener: TcpListener, list_bytes: usize) {
    let list: Arc<[u8]> = vec![b'-'; list_bytes].into();
    let mut answers = JoinSet::new(); // aborted with this future
    while let Ok((mut stream, _)) = listener.accept().await {
        let list = list.clone();
        answers.spawn(async move {
            let _ = stream.set_nodelay(true);
            if stream.write_all(&list).await.is_ok() {
                // Keep the connection until the joiner resets it, as a tracker does.
                let _ = stream.read(&mut [0u8; 1]).await;
            }
        });
        while answers.try_join_next().is_some() {}
    }
}

#[derive(Default)]
struct WorkerReport {
    joins: u64,
    failures: u64,
    list_bytes: u64,
    entries: u64,
    min_entries: u64,
}

async fn worker(load: JoinLoad, deadline: Instant, completed: Arc<AtomicU64>) -> WorkerReport {
    let mut report = WorkerReport { min_entries: u64::MAX, ..WorkerReport::default() };
    let mut buf = Vec::new();
    while Instant::now() < deadline {
        let done_before = completed.load(Ordering::Relaxed);
        let outcome = async {
            let mut stream = connect(load.tracker).await?;
            read_list(&mut stream, &load, load.registrations as u64 + done_before, &mut buf).await
        };
        match tokio::time::timeout(Duration::from_secs(10), outcome).await {
            Ok(Ok((bytes, entries))) => {
                completed.fetch_add(1, Ordering::Relaxed);
                report.joins += 1;
                report.list_bytes += bytes;
                report.entries += entries;
                report.min_entries = report.min_entries.min(entries);
            }
            Ok(Err(err)) => {
                log::debug!("a join failed: {err}");
                report.failures += 1;
            }
            Err(_) => report.failures += 1,
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frames::{encode_member, Member, Offers, Welcome};

    /// The body (after magic and length) of a tracker's welcome listing `members`.
    fn welcome_body(members: &[Member]) -> Vec<u8> {
        let block: Vec<u8> = members.iter().map(|m| encode_member(m).into_vec()).collect::<Vec<_>>().join(&b","[..]);
        Welcome::new([Arc::from(block)], "127.0.0.1:9", Offers::default()).to_vec().split_off(MAGIC.len() + 4)
    }

    #[tokio::test]
    async fn read_exactly_replaces_the_buffer_with_the_next_bytes() {
        let (mut reader, mut writer) = tokio::io::duplex(4);
        let sending = tokio::spawn(async move { writer.write_all(b"0123456789").await });
        let mut buf = b"old contents".to_vec();
        read_exactly(&mut reader, 7, &mut buf).await.unwrap();
        assert_eq!(buf, b"0123456");
        read_exactly(&mut reader, 3, &mut buf).await.unwrap();
        assert_eq!(buf, b"789");
        sending.await.unwrap().unwrap();
        assert!(read_exactly(&mut reader, 1, &mut buf).await.is_err(), "the stream ended first");
    }

    #[test]
    fn counts_every_member_of_a_welcome() {
        let p2pchat = |i: u16| Member { addr: format!("127.0.0.1:{i}"), p2pchat: true, id: None };
        let original = |i: u16| Member { addr: format!("[::1]:{i}"), p2pchat: false, id: None };
        assert_eq!(welcome_entries(&welcome_body(&[])), Some(0));
        assert_eq!(welcome_entries(&welcome_body(&[p2pchat(1)])), Some(1));
        assert_eq!(welcome_entries(&welcome_body(&(1..=500).map(p2pchat).collect::<Vec<_>>())), Some(500));
        assert_eq!(welcome_entries(&welcome_body(&[p2pchat(1), original(2), p2pchat(3), original(4)])), Some(4));
        assert_eq!(welcome_entries(br#"{"type":"error","code":"x","message":"y"}"#), None);
        // Across the counter's 255-byte chunks, and with every byte the counted one.
        let mixed: Vec<u8> = (0..2000u32).map(|i| if i % 7 == 0 { b',' } else { b'1' }).collect();
        assert_eq!(count_byte(&mixed, b','), 286);
        assert_eq!(count_byte(&[b','; 1000], b','), 1000);
        assert_eq!(count_byte(&[], b','), 0);
    }
}
