//! The latency scenario's sockets floor: one peer process's links read by Rust, with no Python and no
//! protocol on the receiving side.
//!
//! The benchmark's raw peer (`peer_proc.py --impl floor-rust`) meshes in Python, as the Python floor
//! does, then hands every link to a [`RawLinks`]: one thread, one current-thread runtime, whose tasks
//! read the links and take the time of each whole message as they read it (CLOCK_MONOTONIC, the clock
//! every benchmark process stamps its sends with). Sending writes the bytes to every link from the
//! calling thread, as the Python floor's `sendall` does. A message is the original's
//! `<NAME> :: SENDER:SEQ:T.` (see `peer_proc.py`).

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::BenchError;

/// What the links brought since the last [`RawLinks::take`].
#[derive(Debug, Default)]
pub struct Received {
    /// Whole messages, by the sender's index.
    pub counts: HashMap<u64, u64>,
    /// Nanoseconds from each message's send call to its read.
    pub latencies_ns: Vec<u64>,
}

/// A process's links: read by a thread of their own, written by whoever sends.
pub struct RawLinks {
    received: Arc<Mutex<Received>>,
    to_reader: mpsc::UnboundedSender<TcpStream>,
    writers: Mutex<Vec<TcpStream>>,
}

impl RawLinks {
    /// Start the reading thread.
    pub fn start() -> Result<Self, BenchError> {
        let received = Arc::new(Mutex::new(Received::default()));
        let (to_reader, links) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
        let shared = received.clone();
        std::thread::Builder::new()
            .name("floor-reader".into())
            // Ends when `RawLinks` is dropped (its channel closes), and its readers with the runtime.
            .spawn(move || runtime.block_on(read_links(links, shared)))?;
        Ok(Self { received, to_reader, writers: Mutex::new(Vec::new()) })
    }

    /// Read `link` from now on, and send to it.
    pub fn add(&self, link: TcpStream) -> Result<(), BenchError> {
        link.set_nodelay(true)?;
        link.set_nonblocking(true)?;
        self.writers.lock().unwrap_or_else(PoisonError::into_inner).push(link.try_clone()?);
        self.to_reader.send(link).map_err(|_| BenchError::Setting("the reading thread has ended".into()))
    }

    /// The links still taking what is sent.
    pub fn link_count(&self) -> usize {
        self.writers.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Write `message` to every link; returns how many took it (a link that failed is left out).
    pub fn send(&self, message: &[u8]) -> usize {
        let mut writers = self.writers.lock().unwrap_or_else(PoisonError::into_inner);
        writers.retain_mut(|link| write_all(link, message).is_ok());
        writers.len()
    }

    /// What arrived since the last call.
    pub fn take(&self) -> Received {
        std::mem::take(&mut *self.received.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// `write_all` on a non-blocking socket (the reader's runtime made it so): waits for room when full.
fn write_all(link: &mut TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match link.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                let mut writable = libc::pollfd { fd: link.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                // SAFETY: one valid pollfd, for a descriptor `link` keeps open during the call.
                if unsafe { libc::poll(&mut writable, 1, -1) } < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

async fn read_links(mut links: mpsc::UnboundedReceiver<TcpStream>, received: Arc<Mutex<Received>>) {
    let mut readers = tokio::task::JoinSet::new();
    while let Some(link) = links.recv().await {
        let Ok(link) = tokio::net::TcpStream::from_std(link) else { continue };
        readers.spawn(read_link(link, received.clone()));
    }
}

async fn read_link(mut link: tokio::net::TcpStream, received: Arc<Mutex<Received>>) {
    let mut pending = Vec::with_capacity(4096);
    loop {
        match link.read_buf(&mut pending).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let now = monotonic_ns();
                let mut received = received.lock().unwrap_or_else(PoisonError::into_inner);
                let used = take_messages(&pending, now, &mut received);
                pending.drain(..used);
            }
        }
    }
}

/// Count every whole message in `bytes` as read at `now_ns`; returns how many bytes they took (the
/// rest is the start of a message cut by the read).
fn take_messages(bytes: &[u8], now_ns: u64, received: &mut Received) -> usize {
    let mut used = 0;
    while let Some(end) = bytes[used..].iter().position(|&b| b == b'.') {
        let message = &bytes[used..used + end];
        used += end + 1;
        let Some(start) = message.windows(4).position(|w| w == b" :: ") else { continue };
        let mut fields = message[start + 4..].split(|&b| b == b':');
        let (Some(sender), Some(_seq), Some(sent_ns)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let (Some(sender), Some(sent_ns)) = (number(sender), number(sent_ns)) else { continue };
        *received.counts.entry(sender).or_default() += 1;
        received.latencies_ns.push(now_ns.saturating_sub(sent_ns));
    }
    used
}

fn number(digits: &[u8]) -> Option<u64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// CLOCK_MONOTONIC in nanoseconds, as Python's `time.monotonic_ns()` reads it (Rust's `Instant` is
/// the same clock but does not show its value).
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write to; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_whole_messages_and_keeps_a_cut_one() {
        let mut received = Received::default();
        let bytes = b"<n1> :: 1:0:100.<n2> :: 2:5:250.<n1> :: 1:1:3";
        let used = take_messages(bytes, 1000, &mut received);
        assert_eq!(&bytes[used..], b"<n1> :: 1:1:3");
        assert_eq!(received.counts, HashMap::from([(1, 1), (2, 1)]));
        assert_eq!(received.latencies_ns, [900, 750]);
        // Garbage between messages is skipped, not counted.
        assert_eq!(take_messages(b"noise.<n3> :: 3:0:10.", 20, &mut received), 21);
        assert_eq!(received.counts[&3], 1);
    }

    #[test]
    fn links_carry_messages_to_the_reader_and_from_send() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (ours, theirs) =
            (TcpStream::connect(listener.local_addr().unwrap()).unwrap(), listener.accept().unwrap().0);
        let (near, far) = (RawLinks::start().unwrap(), RawLinks::start().unwrap());
        near.add(ours).unwrap();
        far.add(theirs).unwrap();
        let sent = format!("<n4> :: 4:0:{}.", monotonic_ns());
        assert_eq!(near.send(sent.as_bytes()), 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut got = Received::default();
        while got.latencies_ns.is_empty() && std::time::Instant::now() < deadline {
            got = far.take();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got.counts, HashMap::from([(4, 1)]), "the message did not arrive within 5 s");
        assert!(got.latencies_ns[0] < 5_000_000_000);
    }
}
