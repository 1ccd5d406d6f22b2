//! The throughput floor: a full TCP mesh on loopback that fans out the same chat bytes with no protocol
//! work at all, one write per message per link (as a chat sends each line when it is typed), and
//! readers that only count bytes. One process, the same tokio runtime design as p2pchat.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::BenchError;

#[derive(Debug, Clone)]
pub struct FanoutLoad {
    pub nodes: usize,
    /// Messages each node sends per second.
    pub rate: u32,
    pub duration: Duration,
    /// The bytes of one message.
    pub message: Vec<u8>,
    /// How long after the last send the messages may take to arrive.
    pub drain: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct FanoutReport {
    pub sent: u64,
    /// Whole messages received, over all links.
    pub delivered: u64,
    /// `sent` times the links each message goes to.
    pub expected: u64,
    /// From the first send to the last delivery (or the end of the drain).
    pub seconds: f64,
}

pub async fn run(load: FanoutLoad) -> Result<FanoutReport, BenchError> {
    if load.nodes < 2 || load.message.is_empty() || load.rate == 0 || load.duration.is_zero() {
        return Err(BenchError::Setting("need at least 2 nodes, a message, a rate and a duration".into()));
    }
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = JoinSet::new();
    let mut writers: Vec<Vec<OwnedWriteHalf>> = (0..load.nodes).map(|_| Vec::new()).collect();
    // Node i dials every node j > i: one connection per pair, each end both sends and receives.
    for i in 0..load.nodes {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let addr = listener.local_addr()?;
        for j in 0..i {
            let dialled = TcpStream::connect(addr).await.map_err(|source| BenchError::Connect { addr, source })?;
            let (accepted, _) = listener.accept().await?;
            for (owner, stream) in [(j, dialled), (i, accepted)] {
                stream.set_nodelay(true)?;
                let (mut read_half, write_half) = stream.into_split();
                writers[owner].push(write_half);
                let received = received.clone();
                readers.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = read_half.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        }
    }
    let links_per_message = (load.nodes - 1) as u64;
    let total = u64::from(load.rate) * load.duration.as_millis() as u64 / 1000;
    let started = Instant::now();
    let mut senders = JoinSet::new();
    for links in writers {
        let (message, rate) = (load.message.clone(), load.rate);
        senders.spawn(send_paced(links, message, rate, total, started));
    }
    let mut sent = 0;
    while let Some(done) = senders.join_next().await {
        sent += done.map_err(|e| BenchError::Setting(format!("a sender failed: {e}")))??;
    }
    let expected_bytes = sent * links_per_message * load.message.len() as u64;
    let drain_until = Instant::now() + load.drain;
    // Poll the shared counter: the readers are many, and a notification per read would cost more
    // than the work measured.
    while received.load(Ordering::Relaxed) < expected_bytes && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    readers.shutdown().await;
    Ok(FanoutReport {
        sent,
        delivered: received.load(Ordering::Relaxed) / load.message.len() as u64,
        expected: sent * links_per_message,
        seconds,
    })
}

/// Send `total` messages at `rate` per second to every link, one write per message per link.
async fn send_paced(
    mut links: Vec<OwnedWriteHalf>,
    message: Vec<u8>,
    rate: u32,
    total: u64,
    started: Instant,
) -> Result<u64, BenchError> {
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * f64::from(rate)) as u64).min(total);
        while sent < due {
            for link in &mut links {
                link.write_all(&message).await?;
            }
            sent += 1;
        }
    }
    Ok(sent)
}
