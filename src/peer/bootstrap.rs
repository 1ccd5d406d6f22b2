//! Getting into the room: listen on P, ask the tracker from P, and dial the members.
//!
//! We open with our `hello` (after the p2pchat magic). A p2pchat tracker answers with a `welcome` frame
//! listing the room's members and which of them speak p2pchat, and keeps the connection as our
//! registration. The original tracker never reads: it writes its `ip:port-...` list at once and never
//! closes, so that answer ends when the connection goes idle; it tells nothing about who speaks what.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};

use super::actor::NetEvent;
use super::types::Contact;
use super::{Limits, PeerConfig, PeerError, Protocol};
use crate::net;
use crate::protocol::{MAGIC, PROTOCOL_VERSION};
use crate::reading::{read_frame, FrameReadError};
use crate::wire::frames::{self, classify_opening, Frame, FrameDecoder, Hello, Opening};
use crate::wire::peer_list;

pub(super) struct Boot {
    pub listener: TcpListener,
    pub listen_addr: SocketAddr,
    /// The tracker's address, if we have one (to register again after losing it).
    pub tracker: Option<SocketAddr>,
    /// The members to dial, without ourselves.
    pub contacts: Vec<Contact>,
    /// Our registration with a p2pchat tracker (open for as long as we are registered).
    pub tracker_link: Option<TrackerLink>,
}

/// A registration with a p2pchat tracker.
pub(super) struct TrackerLink {
    /// Open for as long as we are registered.
    pub stream: TcpStream,
    /// What its welcome said: it relays between members (see `tracker::hub`), it needs no pings.
    pub offers: frames::Offers,
}

/// What asking a tracker gave.
pub(super) enum Asked {
    /// A p2pchat tracker registered us: keep `link` open to stay registered.
    Registered { link: TrackerLink, contacts: Vec<Contact> },
    /// An original tracker listed the room (it knows nothing of protocols, and nothing needs keeping).
    Listed { contacts: Vec<Contact> },
}

/// Listen, and ask the tracker (if any) for the members of `room` (as the wire names it).
pub(super) async fn contact_tracker(config: &PeerConfig, room: &str) -> Result<Boot, PeerError> {
    let tracker = match &config.tracker {
        Some(t) => Some(resolve(&t.host, t.port).await?),
        None => None,
    };
    let family_of = tracker.or_else(|| config.peers.first().copied()).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let wanted = net::unspecified_like(&family_of, config.listen_port.unwrap_or(0));
    let listener = net::listen_shared(wanted).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => PeerError::AddressInUse { port: wanted.port() },
        _ => PeerError::Listen { addr: wanted, source },
    })?;
    let listen_addr = listener.local_addr().map_err(|source| PeerError::Listen { addr: wanted, source })?;
    let Some(tracker_addr) = tracker else {
        return Ok(Boot { listener, listen_addr, tracker: None, contacts: Vec::new(), tracker_link: None });
    };
    let (contacts, tracker_link) = match ask_tracker(tracker_addr, listen_addr.port(), room, &config.limits).await? {
        Asked::Registered { link, contacts } => (contacts, Some(link)),
        Asked::Listed { contacts } => (contacts, None),
    };
    let kind = if tracker_link.is_some() { "p2pchat" } else { "original" };
    log::info!("listening on {listen_addr}; the {kind} tracker at {tracker_addr} listed {} peer(s)", contacts.len());
    Ok(Boot { listener, listen_addr, tracker, contacts, tracker_link })
}

/// Connect to the tracker from our listening port, say hello, and read its answer.
pub(super) async fn ask_tracker(
    tracker: SocketAddr,
    listen_port: u16,
    room: &str,
    limits: &Limits,
) -> Result<Asked, PeerError> {
    // From P, so the tracker records the address we listen on; P already accepts connections.
    let unreachable = |source| PeerError::TrackerUnreachable { addr: tracker, source };
    let from = net::unspecified_like(&tracker, listen_port);
    let mut stream = timeout(limits.connect_timeout, net::connect_from(from, tracker))
        .await
        .map_err(|_| unreachable(timed_out(limits.connect_timeout)))?
        .map_err(unreachable)?;
    let seen_as = stream.local_addr().map_err(unreachable)?;
    let hello = Hello {
        v: PROTOCOL_VERSION,
        id: frames::random_id(),
        name: None,
        room: room.to_owned(),
        listen_port: Some(listen_port),
        peers: Vec::new(),
        identity: None,
        relay: false,
        // We need no pings from the tracker, nor it from us, if it knows `quiet` (its welcome says so).
        quiet: true,
    };
    // The original tracker never reads, so these bytes are harmless there.
    stream.write_all(&frames::encode_opening(&Frame::Hello(hello))).await.map_err(unreachable)?;
    let not_us = |c: &Contact| net::canonical(c.addr) != net::canonical(seen_as);
    Ok(match read_answer(&mut stream, tracker, limits).await {
        Ok(Answer::Welcome { members, offers }) => {
            let contacts = members
                .into_iter()
                .filter_map(|m| match m.addr.parse() {
                    Ok(addr) => Some(Contact {
                        addr,
                        known: Some(if m.p2pchat { Protocol::P2pchat } else { Protocol::Original }),
                    }),
                    Err(_) => {
                        log::warn!("ignoring an unusable member address from the tracker: {:?}", m.addr);
                        None
                    }
                })
                .filter(not_us)
                .collect();
            net::detect_dead_peer(&stream, limits.dead_after);
            Asked::Registered { link: TrackerLink { stream, offers }, contacts }
        }
        Ok(Answer::List(list)) => {
            // A reset leaves no TIME_WAIT on P, so asking again from the same port works at once.
            net::reset(stream);
            let (addrs, rejected) = peer_list::parse(&list);
            for entry in rejected {
                log::warn!("ignoring an unusable entry in the tracker's list: {:?}", entry.0);
            }
            Asked::Listed {
                contacts: addrs.into_iter().map(|addr| Contact { addr, known: None }).filter(not_us).collect(),
            }
        }
        Err(err) => {
            net::reset(stream);
            return Err(err);
        }
    })
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, PeerError> {
    let lookup_failed = |source| PeerError::TrackerLookup { host: host.to_owned(), source };
    let mut addrs = tokio::net::lookup_host((host, port)).await.map_err(lookup_failed)?;
    addrs.next().ok_or_else(|| lookup_failed(io::Error::new(io::ErrorKind::NotFound, "no address found")))
}

enum Answer {
    /// A p2pchat tracker's members, and what else it said.
    Welcome { members: Vec<frames::Member>, offers: frames::Offers },
    /// An original tracker's list.
    List(Vec<u8>),
}

/// Read the tracker's answer: a `welcome` frame, or an original list read until EOF, a reset after the
/// list, or `tracker_idle` without a byte (never trusting a single read: a long list can span segments).
async fn read_answer(stream: &mut TcpStream, tracker: SocketAddr, limits: &Limits) -> Result<Answer, PeerError> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limits.tracker_answer_timeout;
    let mut idle_deadline = deadline;
    loop {
        if classify_opening(&answer) == Opening::P2pchat {
            return read_welcome(
                stream,
                tracker,
                answer.split_off(MAGIC.len()),
                deadline,
                limits.tracker_answer_timeout,
            )
            .await;
        }
        if answer.len() >= limits.tracker_answer_cap {
            log::warn!("the tracker's answer is longer than {} bytes; ignoring the rest", limits.tracker_answer_cap);
            answer.truncate(limits.tracker_answer_cap);
            return Ok(Answer::List(answer));
        }
        match timeout_at(idle_deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                idle_deadline = Instant::now() + limits.tracker_idle;
            }
            // Our tracker resets an original client's connection right after the list.
            Ok(Err(_)) if !answer.is_empty() => break,
            Ok(Err(source)) => return Err(PeerError::TrackerUnreachable { addr: tracker, source }),
        }
    }
    if answer.is_empty() {
        return Err(PeerError::TrackerSilent { addr: tracker, waited: limits.tracker_answer_timeout });
    }
    Ok(Answer::List(answer))
}

/// The rest of a p2pchat tracker's answer: its `welcome`, by the answer's deadline (`waited` after it began).
async fn read_welcome(
    stream: &mut TcpStream,
    tracker: SocketAddr,
    after_magic: Vec<u8>,
    deadline: Instant,
    waited: Duration,
) -> Result<Answer, PeerError> {
    let mut decoder = FrameDecoder::with_limit(frames::MAX_WELCOME_BYTES);
    decoder.feed(&after_magic);
    let refused = |message: String| PeerError::TrackerRefused { addr: tracker, message };
    loop {
        return match read_frame(stream, &mut decoder, deadline).await {
            Ok(Frame::Welcome { members, relay, quiet, .. }) => {
                Ok(Answer::Welcome { members, offers: frames::Offers { relay, quiet } })
            }
            Ok(Frame::Error { message, .. }) => Err(refused(message)),
            Ok(_) => continue,
            Err(FrameReadError::Bad(err)) => Err(refused(format!("unreadable answer: {err}"))),
            Err(FrameReadError::Closed) => Err(refused("it closed the connection before answering".to_owned())),
            Err(FrameReadError::Io(source)) => Err(PeerError::TrackerUnreachable { addr: tracker, source }),
            Err(FrameReadError::TimedOut) => Err(PeerError::TrackerSilent { addr: tracker, waited }),
        };
    }
}

fn timed_out(after: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {after:?}"))
}

/// Dial one member. A refusal or a timeout is retried with backoff for `retry_for` (it may be about to
/// listen, restarting, or behind a passing outage); any other error gives up at once. Every outcome is
/// reported to the actor.
///
/// With `from_port`, the connection leaves from that port (our listening port, shared): the other
/// end, told by the tracker to dial us at the same moment, does the same, and two home routers that
/// keep ports let the crossing connections through (a TCP simultaneous open).
pub(super) async fn dial(
    contact: Contact,
    from_port: Option<u16>,
    limits: Limits,
    retry_for: Duration,
    net: mpsc::Sender<NetEvent>,
) {
    let deadline = Instant::now() + retry_for;
    let mut backoff = Duration::from_millis(100);
    loop {
        let connect = async {
            match from_port {
                Some(port) => {
                    net::shared_port_socket(net::unspecified_like(&contact.addr, port))?.connect(contact.addr).await
                }
                None => TcpStream::connect(contact.addr).await,
            }
        };
        let error = match timeout(limits.connect_timeout, connect).await {
            Ok(Ok(stream)) => {
                let _ = net.send(NetEvent::Dialled { stream, contact }).await;
                return;
            }
            Ok(Err(error)) => error,
            Err(_) => timed_out(limits.connect_timeout),
        };
        let transient = matches!(error.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut);
        let retry = transient && Instant::now() + backoff < deadline;
        let silent = error.kind() == io::ErrorKind::TimedOut;
        let report = NetEvent::DialFailed {
            addr: contact.addr,
            known: contact.known,
            reason: error.to_string(),
            gave_up: !retry,
            silent,
        };
        if net.send(report).await.is_err() || !retry {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Hold our registration with a p2pchat tracker, writing what the actor queues (pings, vouches); tell
/// the actor when the tracker goes away.
pub(super) async fn hold_registration(
    mut link: TcpStream,
    mut outgoing: mpsc::Receiver<Arc<[u8]>>,
    net: mpsc::Sender<NetEvent>,
) {
    let mut buf = [0u8; 1024];
    let mut decoder = FrameDecoder::new();
    let reason = loop {
        tokio::select! {
            read = link.read(&mut buf) => match read {
                Ok(0) => break "it closed the connection".to_owned(),
                Ok(n) => {
                    decoder.feed(&buf[..n]);
                    // The tracker asks us to dial a member that cannot reach us.
                    while let Ok(Some(frame)) = decoder.next_frame() {
                        if let Frame::Punch { addr } = frame {
                            if let Ok(addr) = addr.parse() {
                                let _ = net.send(NetEvent::Punch { addr }).await;
                            }
                        }
                    }
                }
                Err(err) => break err.to_string(),
            },
            frame = outgoing.recv() => match frame {
                Some(frame) => {
                    if let Err(err) = link.write_all(&frame).await {
                        break err.to_string();
                    }
                }
                None => return net::reset(link),
            },
        }
    };
    // A reset leaves no TIME_WAIT, so registering again from the same port can start at once.
    net::reset(link);
    let _ = net.send(NetEvent::TrackerLost { reason }).await;
}

/// Register with the tracker again after losing it, with backoff, until it answers (or turns out to be
/// an original tracker, with which there is nothing to keep).
pub(super) async fn register_again(
    tracker: SocketAddr,
    listen_port: u16,
    room: String,
    limits: Limits,
    net: mpsc::Sender<NetEvent>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        tokio::time::sleep(backoff).await;
        match ask_tracker(tracker, listen_port, &room, &limits).await {
            Ok(Asked::Registered { link, contacts }) => {
                let _ = net.send(NetEvent::Registered { link, contacts }).await;
                return;
            }
            Ok(Asked::Listed { .. }) => {
                log::info!("the tracker at {tracker} is now an original tracker; nothing to register");
                return;
            }
            Err(err) => log::debug!("registering again failed: {err}"),
        }
        backoff = (backoff * 2).min(Duration::from_secs(4));
    }
}
