//! Getting into the room: listen on P, ask the tracker from P, and dial the listed members.
//!
//! Works the same under the original tracker (which writes the list and never closes, so the answer ends
//! when the connection goes idle) and under ours (which writes the list and resets the connection).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use super::actor::NetEvent;
use super::{Limits, PeerConfig, PeerError};
use crate::net;
use crate::wire::peer_list;

pub(super) struct Boot {
    pub listener: TcpListener,
    pub listen_addr: SocketAddr,
    /// The listed members, without ourselves.
    pub peers: Vec<SocketAddr>,
}

pub(super) async fn contact_tracker(config: &PeerConfig) -> Result<Boot, PeerError> {
    let limits = &config.limits;
    let tracker = resolve(&config.tracker.host, config.tracker.port).await?;
    let wanted = net::unspecified_like(&tracker, config.listen_port.unwrap_or(0));
    let listener = net::listen_shared(wanted).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => PeerError::AddressInUse { port: wanted.port() },
        _ => PeerError::Listen { addr: wanted, source },
    })?;
    let listen_addr = listener.local_addr().map_err(|source| PeerError::Listen { addr: wanted, source })?;

    // From P, so the tracker records the address we listen on; P already accepts connections.
    let unreachable = |source| PeerError::TrackerUnreachable { addr: tracker, source };
    let stream = timeout(limits.connect_timeout, net::connect_from(listen_addr, tracker))
        .await
        .map_err(|_| unreachable(timed_out(limits.connect_timeout)))?
        .map_err(unreachable)?;
    let seen_as = stream.local_addr().map_err(unreachable)?;
    let answer = read_answer(stream, tracker, limits).await?;

    let (mut peers, rejected) = peer_list::parse(&answer);
    for entry in rejected {
        log::warn!("ignoring an unusable entry in the tracker's list: {:?}", entry.0);
    }
    peers.retain(|addr| net::canonical(*addr) != net::canonical(seen_as));
    log::info!("listening on {listen_addr}; the tracker at {tracker} listed {} peer(s)", peers.len());
    Ok(Boot { listener, listen_addr, peers })
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, PeerError> {
    let lookup_failed = |source| PeerError::TrackerLookup { host: host.to_owned(), source };
    let mut addrs = tokio::net::lookup_host((host, port)).await.map_err(lookup_failed)?;
    addrs.next().ok_or_else(|| lookup_failed(io::Error::new(io::ErrorKind::NotFound, "no address found")))
}

/// Read the tracker's answer until EOF, a reset after the list, or `tracker_idle` without a byte; never
/// trust a single read, since a long list can span several segments.
async fn read_answer(mut stream: TcpStream, tracker: SocketAddr, limits: &Limits) -> Result<Vec<u8>, PeerError> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut wait = limits.tracker_answer_timeout;
    let outcome = loop {
        match timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break Ok(()),
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.len() >= limits.tracker_answer_cap {
                    log::warn!("the tracker's answer is longer than {} bytes; ignoring the rest", limits.tracker_answer_cap);
                    answer.truncate(limits.tracker_answer_cap);
                    break Ok(());
                }
                wait = limits.tracker_idle;
            }
            // Our tracker resets the connection right after the list.
            Ok(Err(_)) if !answer.is_empty() => break Ok(()),
            Ok(Err(source)) => break Err(PeerError::TrackerUnreachable { addr: tracker, source }),
        }
    };
    // A reset leaves no TIME_WAIT on P, so joining again from the same port works at once.
    net::reset(stream);
    outcome?;
    if answer.is_empty() {
        return Err(PeerError::TrackerSilent { addr: tracker, waited: limits.tracker_answer_timeout });
    }
    Ok(answer)
}

fn timed_out(after: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {after:?}"))
}

/// Dial one listed member. A refusal is retried with backoff for `retry_refused_for` (it may be about to
/// listen); a timeout or any other error gives up at once. Every outcome is reported to the actor; the
/// first one also tells `join` that this address has been tried.
pub(super) async fn dial(addr: SocketAddr, limits: Limits, net: mpsc::Sender<NetEvent>) {
    let deadline = Instant::now() + limits.retry_refused_for;
    let mut backoff = Duration::from_millis(100);
    loop {
        let error = match timeout(limits.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = net.send(NetEvent::Opened { stream, addr, outgoing: true }).await;
                return;
            }
            Ok(Err(error)) => error,
            Err(_) => timed_out(limits.connect_timeout),
        };
        let retry = error.kind() == io::ErrorKind::ConnectionRefused && Instant::now() + backoff < deadline;
        let report = NetEvent::DialFailed { addr, reason: error.to_string(), gave_up: !retry };
        if net.send(report).await.is_err() || !retry {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
