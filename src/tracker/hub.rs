//! The tracker's relay, off by default (`TrackerConfig::relay`, `server.py --relay`): for members
//! that cannot reach each other and have no member in common that could relay (two peers behind
//! symmetric NATs alone in a room).
//!
//! A peer that a welcome told about the relay, and that failed to reach a member, opens a link to
//! the tracker as to a member: the magic and a `hello` with a `name`. The tracker answers with a
//! `hello` of its own, listing (with their session ids) the room's members linked to it, and from then
//! on speaks the relay's part of the protocol: `relay_ask` pairs two members' links, `relay_open` tells
//! both, each `msg` arriving on one is written to its partners, `relay_close` tells a partner that the
//! other end left. A member's own `relay_close` naming its partner (they linked directly) ends the
//! pair without a word to either. It shows nothing, logs no message and keeps none.
//!
//! One task (`run`) owns the members and the pairs; each link's task reports to it over a channel
//! and writes what the hub queues for it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::pairs::Pairs;
use crate::protocol::PROTOCOL_VERSION;
use crate::wire::chat;
use crate::wire::frames::{self, Frame, FrameDecoder, Hello, Member};

/// How often the hub pings its links (peers drop a link silent for 8 s).
const PING_EVERY: Duration = Duration::from_secs(2);
/// Frames queued for one member link before it counts as not reading and is dropped.
const QUEUE: usize = 256;
/// The longest one write to a member may wait for it to read; then it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

type Line = Arc<[u8]>;

enum HubEvent {
    Joined {
        member: LinkedMember,
        id: String,
        reply: oneshot::Sender<Result<Line, String>>,
    },
    Asked {
        id: String,
        peer: String,
    },
    /// Member `id` is linked directly to `peer` now: stop relaying between them.
    Unneeded {
        id: String,
        peer: String,
    },
    Forward {
        id: String,
        line: Line,
    },
    Renamed {
        id: String,
        name: String,
    },
    Left {
        id: String,
        reason: String,
        clean: bool,
    },
}

struct LinkedMember {
    room: String,
    name: Option<String>,
    addr: SocketAddr,
    queue: mpsc::Sender<Line>,
}

/// A cheap handle to the hub task.
#[derive(Clone, Debug)]
pub(super) struct HubHandle {
    events: mpsc::Sender<HubEvent>,
}

impl HubHandle {
    /// Start the hub task; it ends when every handle is gone.
    pub fn start() -> Self {
        let (events, rx) = mpsc::channel(1024);
        tokio::spawn(run(rx));
        Self { events }
    }
}

async fn run(mut events: mpsc::Receiver<HubEvent>) {
    let hub_id = frames::random_id();
    let mut members: HashMap<String, LinkedMember> = HashMap::new();
    let mut pairs: Pairs<String> = Pairs::new();
    while let Some(event) = events.recv().await {
        match event {
            HubEvent::Joined { member, id, reply } => {
                if members.contains_key(&id) || id == hub_id {
                    let _ = reply.send(Err("a member with this session id is already linked".to_owned()));
                    continue;
                }
                let peers = members
                    .iter()
                    .filter(|(_, m)| m.room == member.room)
                    .map(|(id, m)| Member { addr: m.addr.to_string(), p2pchat: true, id: Some(id.clone()) })
                    .collect();
                let hello = Hello {
                    v: PROTOCOL_VERSION,
                    id: hub_id.clone(),
                    name: None,
                    room: member.room.clone(),
                    listen_port: None,
                    peers,
                    identity: None,
                    relay: false,
                    quiet: false,
                };
                log::debug!("{} linked to the relay in room {:?}", member.addr, member.room);
                members.insert(id, member);
                let _ = reply.send(Ok(frames::encode_opening(&Frame::Hello(hello)).into()));
            }
            HubEvent::Asked { id, peer } => {
                let (Some(asker), Some(target)) = (members.get(&id), members.get(&peer)) else {
                    if let Some(asker) = members.get(&id) {
                        let close = Frame::RelayClose {
                            peer,
                            reason: "not linked to the tracker's relay".to_owned(),
                            clean: false,
                        };
                        let _ = asker.queue.try_send(frames::encode(&close).into());
                    }
                    continue;
                };
                if asker.room != target.room || id == peer {
                    continue;
                }
                if pairs.pair(id.clone(), peer.clone()) {
                    log::info!("relaying between {} and {} (room {:?})", asker.addr, target.addr, asker.room);
                }
                let _ = asker.queue.try_send(open_frame(&peer, target));
                let _ = target.queue.try_send(open_frame(&id, asker));
            }
            HubEvent::Unneeded { id, peer } => {
                if pairs.unpair(&id, &peer) {
                    if let (Some(a), Some(b)) = (members.get(&id), members.get(&peer)) {
                        log::info!("no longer relaying between {} and {}: they are linked directly", a.addr, b.addr);
                    }
                }
            }
            HubEvent::Forward { id, line } => {
                let mut stuck = Vec::new();
                for partner in pairs.partners_of(&id) {
                    if let Some(member) = members.get(partner) {
                        if let Err(mpsc::error::TrySendError::Full(_)) = member.queue.try_send(line.clone()) {
                            stuck.push(partner.clone());
                        }
                    }
                }
                // A member that does not read what is queued for it would hold its partners' lines
                // back (or lose them): it is dropped, and its partners are told.
                for id in stuck {
                    let reason = format!("dropped by the relay: {QUEUE} frames waited for it to read");
                    leave(&mut members, &mut pairs, &id, reason, false);
                }
            }
            HubEvent::Renamed { id, name } => {
                let Some(member) = members.get_mut(&id) else { continue };
                member.name = Some(name);
                let open = open_frame(&id, member);
                for partner in pairs.partners_of(&id) {
                    if let Some(other) = members.get(partner) {
                        let _ = other.queue.try_send(open.clone());
                    }
                }
            }
            HubEvent::Left { id, reason, clean } => leave(&mut members, &mut pairs, &id, reason, clean),
        }
    }
}

/// Member `id` is gone (its link ended, or the hub dropped it, which ends its link: its queue's
/// sender goes with it): its partners are told.
fn leave(
    members: &mut HashMap<String, LinkedMember>,
    pairs: &mut Pairs<String>,
    id: &str,
    reason: String,
    clean: bool,
) {
    let Some(member) = members.remove(id) else { return };
    log::debug!("{} left the relay ({reason})", member.addr);
    let close: Line = frames::encode(&Frame::RelayClose { peer: id.to_owned(), reason, clean }).into();
    for partner in pairs.remove(&id.to_owned()) {
        if let Some(other) = members.get(&partner) {
            let _ = other.queue.try_send(close.clone());
        }
    }
}

/// The `relay_open` that tells a member about `member` (session id `id`).
fn open_frame(id: &str, member: &LinkedMember) -> Line {
    frames::encode(&Frame::RelayOpen { peer: id.to_owned(), name: member.name.clone(), addr: member.addr.to_string() })
        .into()
}

/// Serve a member's link to the relay, from its `hello` until it closes or goes silent.
pub(super) async fn serve_member(
    mut stream: TcpStream,
    remote: SocketAddr,
    hello: Hello,
    mut decoder: FrameDecoder,
    hub: HubHandle,
    silence: Duration,
) {
    let (queue, mut lines) = mpsc::channel::<Line>(QUEUE);
    let id = hello.id;
    let member = LinkedMember {
        room: hello.room.clone(),
        name: hello.name.filter(|n| chat::validate_name(n).is_ok()),
        addr: SocketAddr::new(remote.ip(), hello.listen_port.unwrap_or(remote.port())),
        queue,
    };
    let (reply, answer) = oneshot::channel();
    if hub.events.send(HubEvent::Joined { member, id: id.clone(), reply }).await.is_err() {
        return;
    }
    let opening = match answer.await {
        Ok(Ok(opening)) => opening,
        Ok(Err(why)) => return super::refuse(stream, remote, frames::ERR_MALFORMED, why).await,
        Err(_) => return,
    };
    let (reason, clean) =
        relay_loop(&mut stream, &opening, &hello.room, &id, &mut decoder, &mut lines, &hub, silence).await;
    let _ = hub.events.send(HubEvent::Left { id, reason, clean }).await;
    crate::net::reset(stream);
}

/// The link's life: frames in, queued frames and pings out. Returns why it ended, and whether the
/// member said goodbye.
#[allow(clippy::too_many_arguments)]
async fn relay_loop(
    stream: &mut TcpStream,
    opening: &[u8],
    room: &str,
    id: &str,
    decoder: &mut FrameDecoder,
    lines: &mut mpsc::Receiver<Line>,
    hub: &HubHandle,
    silence: Duration,
) -> (String, bool) {
    if stream.write_all(opening).await.is_err() {
        return ("closed before the relay's hello".to_owned(), false);
    }
    let ping: Line = frames::encode(&Frame::Ping).into();
    let mut pings = tokio::time::interval(PING_EVERY);
    let mut buf = vec![0u8; 16 * 1024];
    let mut quiet_until = Instant::now() + silence;
    let mut said_bye = false;
    loop {
        let write = tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) => return (if said_bye { "left" } else { "closed by the other side" }.to_owned(), said_bye),
                Ok(n) => {
                    decoder.feed(&buf[..n]);
                    quiet_until = Instant::now() + silence;
                    None
                }
                Err(err) => return (format!("read failed: {err}"), said_bye),
            },
            line = lines.recv() => match line {
                Some(line) => Some(line),
                None => return ("dropped by the relay: it did not read".to_owned(), false),
            },
            _ = pings.tick() => Some(ping.clone()),
            () = tokio::time::sleep_until(quiet_until) => return (format!("silent for {silence:?}"), false),
        };
        if let Some(line) = write {
            match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&line)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return ("write failed".to_owned(), said_bye),
                Err(_) => return (format!("not reading: a write waited {WRITE_TIMEOUT:?}"), false),
            }
        }
        loop {
            let event = match decoder.next_frame() {
                Ok(Some(Frame::Msg(chat))) if chat.room == room => {
                    HubEvent::Forward { id: id.to_owned(), line: frames::encode(&Frame::Msg(chat)).into() }
                }
                // A private room's message: passed on as it came, which is all the tracker can do.
                Ok(Some(sealed @ Frame::Sealed { .. })) => {
                    HubEvent::Forward { id: id.to_owned(), line: frames::encode(&sealed).into() }
                }
                Ok(Some(Frame::RelayAsk { peer, .. })) => HubEvent::Asked { id: id.to_owned(), peer },
                Ok(Some(Frame::RelayClose { peer, .. })) => HubEvent::Unneeded { id: id.to_owned(), peer },
                Ok(Some(Frame::Nick { name })) if chat::validate_name(&name).is_ok() => {
                    HubEvent::Renamed { id: id.to_owned(), name }
                }
                Ok(Some(Frame::Bye)) => {
                    said_bye = true;
                    continue;
                }
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(err) => return (format!("protocol error: {err}"), false),
            };
            if hub.events.send(event).await.is_err() {
                return ("the tracker is stopping".to_owned(), false);
            }
        }
    }
}
