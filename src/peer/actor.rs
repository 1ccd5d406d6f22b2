//! The peer's one stateful task: it owns the links, the room's presence and the protocol decisions,
//! and nothing else touches them.
//!
//! Handles send [`Command`]s with oneshot replies; the accept loop, the dialers, the tracker
//! registration and the connection tasks report [`NetEvent`]s. Writing to a link is a `try_send` into
//! its queue, so the actor never waits on a network peer. Lines for a link whose protocol is not known
//! yet are held here and written, in the right encoding, once it is.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use super::bootstrap::{self, Contact, TrackerLink};
use super::connection::{self, ConnId, Connection, Line, ReaderContext, Role, Transport};
use super::history::{self, AnswerBudget, Ask, HistoryConfig, Part, Requests};
use super::outbox::Refused;
use super::relay::{self, Relays};
use super::secure::{self, Secured};
use super::seen::SeenIds;
use super::trust::{self, KnownKeys, Seen};
use super::{Event, Limits, PeerInfo, Protocol, Status, TrackerState};
use crate::history::clock::{self, Clock};
use crate::history::log::LogHandle;
use crate::history::store::{Key, Query};
use crate::identity::{self, Identity};
use crate::private::RoomKey;
use crate::tracker::DEFAULT_ROOM;
use crate::wire::chat;
use crate::wire::frames::{
    self, Chat, Frame, Hello, Member, Position, ERR_DUPLICATE, ERR_IDENTITY, ERR_ROOM, ERR_VERSION, PROTOCOL_VERSION,
};

/// The longest a closing peer waits for its log to write the last batch.
const LOG_FLUSH_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) enum Command {
    /// A line for everyone; the reply (when asked for) says how many it reached.
    Send {
        text: String,
        reply: Option<oneshot::Sender<usize>>,
    },
    Nick {
        name: String,
        reply: oneshot::Sender<()>,
    },
    Name {
        reply: oneshot::Sender<String>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

pub(crate) enum NetEvent {
    Dialled {
        stream: TcpStream,
        contact: Contact,
    },
    Accepted {
        stream: TcpStream,
        addr: SocketAddr,
    },
    /// `silent`: no answer at all (not even a refusal), as from behind a router that drops it.
    DialFailed {
        addr: SocketAddr,
        known: Option<Protocol>,
        reason: String,
        gave_up: bool,
        silent: bool,
    },
    /// The link speaks p2pchat; this is the other end's hello.
    Hello {
        id: ConnId,
        hello: Hello,
    },
    /// The link speaks the original protocol.
    Original {
        id: ConnId,
    },
    /// We probed and the other end closed or said nothing: an original peer.
    ProbeRejected {
        id: ConnId,
    },
    /// The other end refused the link with an `error` frame.
    Refused {
        id: ConnId,
        code: String,
        message: String,
    },
    /// The other end is known by this name now.
    Renamed {
        id: ConnId,
        name: String,
    },
    /// The link ended (its reader saw it end): `clean` when the other end said goodbye first.
    Closed {
        id: ConnId,
        reason: String,
        clean: bool,
    },
    TrackerLost {
        reason: String,
    },
    /// The other end asks for history.
    HistoryRequested {
        id: ConnId,
        req: u32,
        limit: u32,
        after: Option<Position>,
    },
    /// Part of an answer to our history request (only messages fit for our room).
    HistoryPart {
        id: ConnId,
        req: u32,
        msgs: Vec<Chat>,
        more: bool,
    },
    /// Our answer to a history request on this link was queued: `bytes` of it.
    HistoryAnswered {
        id: ConnId,
        bytes: usize,
    },
    /// Registered with the tracker again after losing it.
    Registered {
        link: TrackerLink,
        contacts: Vec<Contact>,
    },
    /// The tracker asks us to dial this member from our listening port (it cannot reach us).
    Punch {
        addr: SocketAddr,
    },
    /// The member on link `id` cannot reach member `peer` and asks us to relay between them.
    RelayAsked {
        id: ConnId,
        peer: String,
    },
    /// The member on link `id` relays member `peer` to us.
    RelayOpened {
        id: ConnId,
        peer: String,
        name: Option<String>,
        addr: SocketAddr,
    },
    /// The member on link `id` no longer relays member `peer` to us.
    RelayClosed {
        id: ConnId,
        peer: String,
        reason: String,
        clean: bool,
    },
    /// A new message arrived on link `id`, which we relay: pass it on to its partners.
    Forward {
        id: ConnId,
        line: Line,
    },
    /// A private room's handshake succeeded on a connection we dialled (`dialled`) or accepted.
    Secured {
        secured: Secured,
        remote: SocketAddr,
        dialled: Option<Contact>,
    },
    /// A private room's handshake failed; `wrong_key`: the other end reached the room without its key.
    HandshakeFailed {
        remote: SocketAddr,
        reason: String,
        dialled: bool,
        wrong_key: bool,
    },
}

pub(super) struct Setup {
    pub name: String,
    pub room: String,
    pub limits: Limits,
    pub listener: TcpListener,
    /// The tracker, to register again after losing it.
    pub tracker: Option<SocketAddr>,
    pub tracker_link: Option<TrackerLink>,
    pub log: LogHandle,
    pub history: HistoryConfig,
    /// Ask the first p2pchat member for history after this position (`Some(None)`: the newest
    /// messages); `None`: ask nothing.
    pub history_after: Option<Option<Key>>,
    /// Whether a tracker (of either kind) gave us the room; see [`Actor::consider`].
    pub joined_via_tracker: bool,
    pub contacts: Vec<Contact>,
    pub commands: mpsc::Receiver<Command>,
    pub events: mpsc::Sender<Event>,
    /// Told how many contacts the first attempts reached, once every one was tried.
    pub ready: oneshot::Sender<usize>,
    /// A private room's key: every link is then encrypted (see `secure`), and `room` is its opaque id.
    pub private: Option<RoomKey>,
    /// Our identity, proven on private links, and the keys we met names with before.
    pub identity: Arc<Identity>,
    pub known_keys: Arc<Mutex<KnownKeys>>,
}

/// One line in both encodings; each link takes the one it speaks.
struct OutLine {
    original: Line,
    p2pchat: Line,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Opening,
    P2pchat,
    Original,
    /// Our link to the tracker's relay: it gets our messages and passes on others', but it is not
    /// a member (not listed, not announced, never asked for history).
    Relay,
}

/// Our use of the tracker's relay (see `tracker::hub`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hub {
    Unused,
    Dialling,
    Opening(ConnId),
    Linked(ConnId),
}

struct Link {
    conn: Connection,
    /// The remote address of the connection.
    remote: SocketAddr,
    /// Where it accepts connections: the address we dialled, or its hello's port. Unknown for an
    /// original peer that dialled us.
    listen_addr: Option<SocketAddr>,
    outgoing: bool,
    state: State,
    name: Option<String>,
    peer_id: Option<String>,
    /// We opened with a p2pchat hello (its 0xFF makes an original peer drop the link).
    probed: bool,
    /// Lines held until the protocol is known.
    held: Vec<Arc<OutLine>>,
    /// What it may still make us send as history.
    budget: AnswerBudget,
    /// A private link's handshake hash, which both ends' identity proofs are bound to.
    binding: Option<Vec<u8>>,
    /// The identity key the other end proved (private links), and whether its name had another
    /// key before (see `trust`). Boxed: it is 200 bytes, and most links (outside private rooms) have
    /// none.
    key: Option<Box<ed25519_dalek::VerifyingKey>>,
    key_changed: bool,
}

impl Link {
    fn shown_addr(&self) -> SocketAddr {
        self.listen_addr.unwrap_or(self.remote)
    }
}

struct Actor {
    my_id: String,
    name: String,
    listen_port: u16,
    /// Boxed: a hash map keeps room for more entries than it holds (up to twice as many), and an
    /// empty slot then costs a pointer rather than a whole link.
    links: HashMap<ConnId, Box<Link>>,
    next_id: ConnId,
    /// Listen addresses known to speak only the original protocol: never probed again.
    originals: HashSet<SocketAddr>,
    /// Addresses being dialled (so peer exchange does not dial them twice).
    dialling: HashSet<SocketAddr>,
    /// Members we asked the tracker to punch through to (once each).
    punched: HashSet<SocketAddr>,
    /// Lines held for an original peer being redialled after it dropped our probe (and every line sent
    /// until the redial connects or gives up).
    carried: HashMap<SocketAddr, Vec<Arc<OutLine>>>,
    /// Links given up for a duplicate to the same peer: no longer written to (the writer finishes its
    /// queue and shuts down), read until they end. Their tasks.
    retiring: HashMap<ConnId, AbortOnDropHandle<()>>,
    joined_via_tracker: bool,
    tracker: Option<SocketAddr>,
    /// Frames for our tracker registration (pings, vouches), while we are registered.
    registration: Option<mpsc::Sender<Line>>,
    /// The tracker speaks p2pchat (it holds registrations); an original tracker forgets us at once.
    tracker_registers: bool,
    /// The tracker relays between members that cannot reach each other, and our link to it.
    tracker_relays: bool,
    hub: Hub,
    background: JoinSet<()>,
    /// What every link's reader shares; also the actor's own limits and room, and its handles to
    /// the seen ids, the clock, the log and the two channels.
    readers: Arc<ReaderContext>,
    history: HistoryConfig,
    /// Our history requests (on join, after a gap) and the answers we wait for.
    requests: Requests,
    /// Members reached through a relay, and the links we relay between.
    relays: Relays,
    /// A private room's key (every link is encrypted).
    private: Option<Arc<RoomKey>>,
    identity: Arc<Identity>,
    known_keys: Arc<Mutex<KnownKeys>>,
    /// The write of the known keys in progress (one at a time, so an older one never lands last).
    saving_keys: Option<tokio::task::JoinHandle<()>>,
}

pub(super) async fn run(setup: Setup) {
    let Setup {
        name,
        room,
        limits,
        listener,
        tracker,
        tracker_link,
        log,
        history,
        history_after,
        joined_via_tracker,
        contacts,
        mut commands,
        events,
        ready,
        private,
        identity,
        known_keys,
    } = setup;
    let (net, mut net_rx) = mpsc::channel(1024);
    let listen_port = listener.local_addr().map_or(0, |a| a.port());
    let relay_after = limits.relay_after;
    let private = private.map(Arc::new);
    // What every link's reader needs, made once: a link holds a pointer to it, not a copy.
    let readers = Arc::new(ReaderContext {
        limits,
        room,
        net,
        events,
        seen: Arc::new(Mutex::new(SeenIds::new(super::seen::REMEMBERED_IDS))),
        clock: Arc::new(Clock::new()),
        log,
        authors: private.as_ref().map(|_| known_keys.clone()),
        room_key: private.clone(),
    });
    let mut actor = Actor {
        my_id: frames::random_id(),
        name,
        listen_port,
        links: HashMap::new(),
        next_id: 0,
        originals: HashSet::new(),
        dialling: HashSet::new(),
        punched: HashSet::new(),
        relays: Relays::new(relay_after),
        private,
        identity,
        known_keys,
        saving_keys: None,
        carried: HashMap::new(),
        retiring: HashMap::new(),
        joined_via_tracker,
        tracker,
        registration: None,
        tracker_registers: tracker_link.is_some(),
        tracker_relays: false,
        hub: Hub::Unused,
        background: JoinSet::new(),
        readers,
        requests: Requests::new(history_after, history.ask_on_join, history.answer_messages),
        history,
    };
    // The join stops waiting for its history this long after the first attempts (then it is still
    // fetched, as a catch-up, from the first member that turns out to speak p2pchat).
    let history_deadline =
        tokio::time::Instant::now() + actor.readers.limits.connect_timeout + actor.readers.limits.probe_timeout;
    // Dropping `background` (when the actor ends) aborts the accept loop, the dialers and the registration.
    actor.background.spawn(accept_loop(listener, actor.readers.net.clone()));
    if let Some(link) = tracker_link {
        actor.hold_registration(link);
    }
    let mut untried: HashSet<SocketAddr> = contacts.iter().map(|c| c.addr).collect();
    for contact in contacts {
        actor.dial(contact, actor.readers.limits.retry_refused_for);
    }
    let mut keepalive = tokio::time::interval(actor.readers.limits.keepalive_interval);
    let mut ready = Some(ready);
    let mut reached_first_time = 0;
    // Set by `close` (or when every handle is gone): lines held for links still opening get until the
    // grace deadline to be written, then everything closes.
    let mut closing: Option<(tokio::time::Instant, Option<oneshot::Sender<()>>)> = None;
    log::debug!("peer {:?} running in room {:?}", actor.name, actor.readers.room);

    loop {
        if untried.is_empty() {
            if let Some(ready) = ready.take() {
                let _ = ready.send(reached_first_time);
            }
            actor.settle_join_history(history_deadline);
        }
        if let Some((deadline, _)) = &closing {
            if !actor.holds_lines() || tokio::time::Instant::now() >= *deadline {
                break;
            }
        }
        let grace_over = async {
            match &closing {
                Some((deadline, _)) => tokio::time::sleep_until(*deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = commands.recv(), if closing.is_none() => match command {
                Some(Command::Send { text, reply }) => {
                    let reached = actor.send(&text);
                    if let Some(reply) = reply {
                        let _ = reply.send(reached);
                    }
                }
                Some(Command::Nick { name, reply }) => { actor.nick(name); let _ = reply.send(()); }
                Some(Command::Name { reply }) => { let _ = reply.send(actor.name.clone()); }
                Some(Command::Peers { reply }) => { let _ = reply.send(actor.peers()); }
                Some(Command::Status { reply }) => { let _ = reply.send(actor.status()); }
                Some(Command::Close { reply }) => closing = Some((tokio::time::Instant::now() + actor.readers.limits.close_grace, Some(reply))),
                None => closing = Some((tokio::time::Instant::now() + actor.readers.limits.close_grace, None)),
            },
            Some(event) = net_rx.recv() => {
                // A member counts as reached once its link can take lines: connected, and in a private
                // room also through the handshake.
                match &event {
                    NetEvent::Dialled { contact, .. } if actor.private.is_none() && untried.remove(&contact.addr) => reached_first_time += 1,
                    NetEvent::Secured { dialled: Some(contact), .. } if untried.remove(&contact.addr) => reached_first_time += 1,
                    NetEvent::DialFailed { addr, .. } | NetEvent::HandshakeFailed { remote: addr, dialled: true, .. } => { untried.remove(addr); }
                    _ => {}
                }
                actor.handle(event);
            }
            () = grace_over => {}
            // A finished task keeps its memory (sized for its whole future) until it is reaped here.
            Some(finished) = actor.background.join_next() => {
                if let Err(err) = finished {
                    if err.is_panic() {
                        log::error!("a background task of this peer panicked: {err}");
                    }
                }
            }
            _ = keepalive.tick() => {
                actor.ping();
                actor.ask_relays();
                actor.save_known_keys();
            }
            () = tokio::time::sleep_until(history_deadline), if actor.requests.waits_for_join() && untried.is_empty() => {}
        }
    }
    actor.close_all().await;
    // What arrived last is still in the log's batch (bounded: closing must never hang).
    if tokio::time::timeout(LOG_FLUSH_BOUND, actor.readers.log.flush()).await.is_err() {
        log::warn!("the message log did not finish writing within {LOG_FLUSH_BOUND:?} of closing");
    }
    if let Some(saving) = actor.saving_keys.take() {
        let _ = saving.await;
    }
    actor.save_known_keys();
    if let Some(saving) = actor.saving_keys.take() {
        let _ = saving.await;
    }
    if let Some((_, Some(reply))) = closing {
        let _ = reply.send(());
    }
    log::debug!("peer {:?} closed", actor.name);
}

impl Actor {
    fn in_default_room(&self) -> bool {
        self.readers.room == DEFAULT_ROOM
    }

    /// Stop holding the join's live messages back when nobody can give us history: every link is
    /// settled and none speaks p2pchat (we are alone, or among original peers), or it took too long.
    /// A p2pchat member that turns up later is still asked, as a catch-up.
    fn settle_join_history(&mut self, deadline: tokio::time::Instant) {
        if !self.requests.waits_for_join() {
            return;
        }
        let settled = self.links.values().all(|l| matches!(l.state, State::Original | State::Relay));
        if settled || tokio::time::Instant::now() >= deadline {
            self.notify(Event::HistorySynced { received: 0 });
            self.requests.stop_waiting_for_join();
        }
    }

    /// Send `ask` to the member on link `id`, with a task to take its answer; false when the link
    /// cannot take the request (it is closing).
    fn ask_history(&mut self, id: ConnId, ask: Ask) -> bool {
        let Some(link) = self.links.get(&id) else { return false };
        let req = self.requests.next_req();
        let limit = u32::try_from(ask.limit).unwrap_or(u32::MAX);
        let frame = Frame::HistoryRequest { req, limit, after: ask.after.as_ref().map(history::position) };
        if link.conn.queue.try_send(frames::encode(&frame).into()).is_err() {
            return false;
        }
        let (link_addr, purpose) = (link.shown_addr(), ask.purpose);
        log::debug!("asking {link_addr} for {limit} messages of history ({purpose:?})");
        let (parts, parts_rx) = mpsc::channel(64);
        let sink = self.readers.clone();
        let config = self.history.clone();
        self.background.spawn(async move { history::receive(parts_rx, link_addr, purpose, &config, sink).await });
        self.requests.sent(id, req, link.peer_id.clone(), ask, parts);
        true
    }

    /// A p2pchat link is up: ask it for history if we are joining, or if it is a member we lost.
    fn after_adopting(&mut self, id: ConnId, peer_id: &str) {
        if let Some(ask) = self.requests.on_link_up(peer_id) {
            if !self.ask_history(id, ask.clone()) {
                self.requests.not_asked(ask);
            }
        }
    }

    /// Answer a member's history request from our log, within its link's allowance.
    fn answer_history(&mut self, id: ConnId, req: u32, limit: u32, after: Option<Position>) {
        let Some(link) = self.links.get_mut(&id) else { return };
        if link.state != State::P2pchat {
            return;
        }
        let Some(max_bytes) = link.budget.start(tokio::time::Instant::now()) else {
            log::info!("{} asks for history faster than it may; answering with nothing", link.shown_addr());
            let empty = Frame::History { req, msgs: Vec::new(), more: false };
            let _ = link.conn.queue.try_send(frames::encode(&empty).into());
            return;
        };
        let query = Query {
            after: after.map(history::key),
            before: None,
            limit: (limit as usize).min(self.history.answer_messages),
            max_bytes,
            shared_only: true,
        };
        let (log, room, queue, net) =
            (self.readers.log.clone(), self.readers.room.clone(), link.conn.queue.clone(), self.readers.net.clone());
        self.background.spawn(async move {
            let bytes = history::answer(log, room, req, query, queue).await;
            let _ = net.send(NetEvent::HistoryAnswered { id, bytes }).await;
        });
    }

    /// Pass on a part of an answer to one of our requests, up to the number of messages asked for.
    fn take_history_part(&mut self, id: ConnId, req: u32, msgs: Vec<Chat>, more: bool) {
        match self.requests.part(id, req, msgs, more) {
            Part::Passed => {}
            Part::Unasked => log::debug!("ignoring history nobody asked for from link {id}"),
            Part::Overflow => {
                log::warn!("history from link {id} comes faster than it can be logged; dropping the rest of it")
            }
        }
    }

    /// Link `id` is gone: a p2pchat member lost without a goodbye is caught up with if it comes back,
    /// and a join request it had not finished answering goes to another member.
    fn forget_link_history(&mut self, id: ConnId, peer_id: Option<String>, lost: bool) {
        if let (Some(peer_id), true) = (peer_id, lost) {
            // The link may have been dead for up to `dead_after` before that was noticed; a little
            // more covers clocks a few seconds apart. Anything fetched twice is shown once.
            let quiet_since =
                clock::wall_millis().saturating_sub((self.readers.limits.dead_after.as_millis() as u64) + 5_000);
            self.requests.lost(
                peer_id,
                clock::stamp_at(quiet_since),
                tokio::time::Instant::now(),
                self.readers.limits.redial_for * 2,
            );
        }
        let Some((answering, rest)) = self.requests.link_gone(id) else { return };
        // Unanswered: ask again on the link that replaced this one (two peers that redial each other
        // keep one of the two links), or, for the join's history, any member; with neither up yet,
        // when one comes.
        let free = |id: ConnId, l: &Link| l.state == State::P2pchat && !self.requests.is_asking(id);
        let same_peer = self
            .links
            .iter()
            .filter(|(id, l)| free(**id, l))
            .find(|(_, l)| l.peer_id.is_some() && l.peer_id == answering);
        let any = self.links.iter().filter(|(id, l)| free(**id, l)).find(|_| rest.purpose.is_join_history());
        let again = Ask { purpose: rest.purpose.asked_again(), ..rest.clone() };
        let asked = same_peer.or(any).map(|(&other, _)| other).is_some_and(|other| self.ask_history(other, again));
        if !asked {
            self.requests.ask_when_back(answering, rest, tokio::time::Instant::now());
        }
    }

    /// Whether some line is still waiting for a link to show what it speaks.
    fn holds_lines(&self) -> bool {
        self.links.values().any(|l| !l.held.is_empty()) || self.carried.values().any(|c| !c.is_empty())
    }

    fn dial(&mut self, contact: Contact, retry_for: std::time::Duration) {
        self.dial_from(contact, None, retry_for);
    }

    fn dial_from(&mut self, contact: Contact, from_port: Option<u16>, retry_for: std::time::Duration) {
        if self.dialling.insert(contact.addr) {
            self.background.spawn(bootstrap::dial(
                contact,
                from_port,
                self.readers.limits.clone(),
                retry_for,
                self.readers.net.clone(),
            ));
        }
    }

    /// A p2pchat member stays out of reach: if the tracker relays, link to its relay (once), so a
    /// member that can reach nobody we know can still be relayed to us.
    fn link_to_hub(&mut self) {
        // (In a private room, too: the link to the tracker is not encrypted, but every message on it
        // is sealed, and our hello there carries no name.)
        let (true, Hub::Unused, Some(tracker)) = (self.tracker_relays, self.hub, self.tracker) else { return };
        log::info!("linking to the tracker's relay at {tracker}");
        self.hub = Hub::Dialling;
        self.dial(Contact { addr: tracker, known: Some(Protocol::P2pchat) }, self.readers.limits.retry_refused_for);
    }

    /// A private room's connection (to `remote`; `dialled`: the member we dialled, else accepted): run
    /// the handshake in a task, which reports `Secured` or `HandshakeFailed`.
    fn handshake(&mut self, stream: TcpStream, remote: SocketAddr, dialled: Option<Contact>) {
        let Some(key) = self.private.clone() else { return };
        let (net, limits) = (self.readers.net.clone(), self.readers.limits.clone());
        self.background.spawn(async move {
            let shaken = match &dialled {
                Some(_) => secure::dial_side(stream, &key, limits.probe_timeout, limits.dead_after).await,
                None => secure::accept_side(stream, &key, limits.probe_timeout, limits.dead_after).await,
            };
            let event = match shaken {
                Ok(secured) => NetEvent::Secured { secured, remote, dialled },
                Err(err) => NetEvent::HandshakeFailed {
                    remote,
                    dialled: dialled.is_some(),
                    wrong_key: err.is_wrong_key(),
                    reason: err.to_string(),
                },
            };
            let _ = net.send(event).await;
        });
    }

    /// Write the keys met since the last write, off the runtime (keys are met in readers, which must
    /// not wait on the disk).
    fn save_known_keys(&mut self) {
        if self.saving_keys.as_ref().is_some_and(|saving| !saving.is_finished()) {
            return;
        }
        let Some((path, json)) = self.known_keys.lock().ok().and_then(|mut keys| keys.unsaved()) else { return };
        self.saving_keys = Some(tokio::task::spawn_blocking(move || {
            if let Err(err) = trust::save(&path, &json) {
                log::warn!("cannot save the known keys in {}: {err}", path.display());
            }
        }));
    }

    /// Whether the connection to `addr` we are opening is our link to the tracker's relay.
    fn dials_hub(&self, addr: SocketAddr) -> bool {
        self.hub == Hub::Dialling && Some(addr) == self.tracker
    }

    /// Our hello to the tracker's relay: who we are to it, and nothing it need not know (in a private
    /// room not even our name).
    fn hub_hello(&self) -> Hello {
        let name = if self.private.is_some() { None } else { Some(self.name.clone()) };
        Hello {
            v: PROTOCOL_VERSION,
            id: self.my_id.clone(),
            name,
            room: self.readers.room.clone(),
            listen_port: Some(self.listen_port),
            peers: Vec::new(),
            identity: None,
            relay: true,
        }
    }

    /// Whether link `id` was our link to the tracker's relay; we have none after this.
    fn hub_gone(&mut self, id: ConnId) -> bool {
        let was = matches!(self.hub, Hub::Opening(hub) | Hub::Linked(hub) if hub == id);
        if was {
            self.hub = Hub::Unused;
        }
        was
    }

    /// Link `id`'s member proved its key under `name`: check it against the key that name had when we
    /// first met it here (trust on first use), and warn when it differs. Returns its fingerprint.
    fn meet(&mut self, id: ConnId, name: Option<&str>) -> Option<String> {
        let link = self.links.get(&id)?;
        let (key, addr) = (*link.key.as_deref()?, link.shown_addr());
        let fingerprint = identity::fingerprint(&key);
        let seen =
            name.and_then(|name| Some((name, self.known_keys.lock().ok()?.meet(&self.readers.room, name, &key))));
        let changed = match seen {
            Some((name, Seen::Changed { was })) => {
                self.notice(format!(
                    "WARNING: {name} ({addr}) proves key {fingerprint}, but {name} had key {was} when you first met it here: it may be someone else"
                ));
                true
            }
            _ => false,
        };
        if let Some(link) = self.links.get_mut(&id) {
            link.key_changed |= changed;
        }
        Some(fingerprint)
    }

    /// Our p2pchat link to the member with session id `peer`, if we hold one.
    fn p2pchat_link_to(&self, peer: &str) -> Option<ConnId> {
        self.links
            .iter()
            .find(|(_, l)| l.state == State::P2pchat && l.peer_id.as_deref() == Some(peer))
            .map(|(id, _)| *id)
    }

    /// Ask neighbours to relay the members we heard of but still cannot reach.
    fn ask_relays(&mut self) {
        for (via, peer) in self.relays.due_asks(tokio::time::Instant::now()) {
            let Some(link) = self.links.get(&via) else { continue };
            log::info!("cannot reach member {peer} directly; asking {} to relay it", link.shown_addr());
            let _ = link.conn.queue.try_send(frames::encode(&Frame::RelayAsk { peer }).into());
        }
    }

    /// The `relay_open` that tells one end of a relay about the other (link `id`).
    fn relay_open_for(&self, id: ConnId) -> Option<Line> {
        let link = self.links.get(&id)?;
        let frame = Frame::RelayOpen {
            peer: link.peer_id.clone()?,
            name: link.name.clone(),
            addr: link.shown_addr().to_string(),
        };
        Some(frames::encode(&frame).into())
    }

    /// The member on link `asker` cannot reach member `peer`: pass their messages between them if we
    /// are linked to it, and tell both.
    fn relay_between(&mut self, asker: ConnId, peer: &str) {
        if self.links.get(&asker).is_none_or(|l| l.state != State::P2pchat) {
            return;
        }
        let Some(target) = self.p2pchat_link_to(peer).filter(|t| *t != asker) else {
            let frame = Frame::RelayClose {
                peer: peer.to_owned(),
                reason: "the relay is not linked to it".to_owned(),
                clean: false,
            };
            if let Some(link) = self.links.get(&asker) {
                let _ = link.conn.queue.try_send(frames::encode(&frame).into());
            }
            return;
        };
        if self.relays.pair(asker, target) {
            for (id, other) in [(asker, target), (target, asker)] {
                if let Some(link) = self.links.get(&id) {
                    link.conn.flags.forwards.store(true, std::sync::atomic::Ordering::Relaxed);
                    log::info!(
                        "relaying between {} and {}",
                        link.shown_addr(),
                        self.links.get(&other).map_or_else(String::new, |l| l.shown_addr().to_string())
                    );
                }
            }
        }
        // Sent again to an end that asks again: its first answer may have crossed a lost link.
        for (id, other) in [(asker, target), (target, asker)] {
            if let (Some(open), Some(link)) = (self.relay_open_for(other), self.links.get(&id)) {
                let _ = link.conn.queue.try_send(open);
            }
        }
    }

    /// Link `via` relays member `peer` to us.
    fn relayed_to_us(&mut self, via: ConnId, peer: String, name: Option<String>, addr: SocketAddr) {
        let Some(via_addr) =
            self.links.get(&via).filter(|l| matches!(l.state, State::P2pchat | State::Relay)).map(|l| l.shown_addr())
        else {
            return;
        };
        if peer == self.my_id || self.p2pchat_link_to(&peer).is_some() {
            return;
        }
        match self.relays.opened(via, peer, name.clone(), addr) {
            relay::Opened::New => {
                log::info!("{addr} is relayed to us by {via_addr}");
                let joined = Event::Joined {
                    addr,
                    name,
                    protocol: Protocol::P2pchat,
                    outgoing: false,
                    relayed_by: Some(via_addr),
                    encrypted: false,
                    fingerprint: None,
                    key_changed: false,
                };
                self.notify(joined);
            }
            relay::Opened::Renamed { old } => {
                if let Some(new) = name {
                    self.notify(Event::Renamed { addr, old, new });
                }
            }
            relay::Opened::Unchanged => {}
        }
    }

    /// Link `id` (at `addr`; to member `peer` when it spoke p2pchat) is gone: members it relayed to
    /// us are lost, and members we relayed it to hear that it is gone.
    fn end_relays(&mut self, id: ConnId, peer: Option<&str>, addr: SocketAddr, reason: &str, clean: bool) {
        let gone = self.relays.link_gone(id, peer);
        for (_, member) in gone.lost {
            let reason = format!("its relay {addr} is gone ({reason})");
            self.notify(Event::Left { addr: member.addr, name: member.name, reason, clean: false });
        }
        let Some(peer) = peer else { return };
        let close: Line =
            frames::encode(&Frame::RelayClose { peer: peer.to_owned(), reason: reason.to_owned(), clean }).into();
        for partner in gone.partners {
            if let Some(link) = self.links.get(&partner) {
                let _ = link.conn.queue.try_send(close.clone());
                link.conn.flags.forwards.store(self.relays.forwards(partner), std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Whether we hold a link to the member listening at `addr`.
    fn linked_to(&self, addr: SocketAddr) -> bool {
        self.links.values().any(|l| l.listen_addr == Some(addr))
    }

    /// A member we could not reach, probably behind a router that drops connections nobody inside
    /// asked for: through our p2pchat tracker, have it dial us while we dial it, both from our
    /// listening ports. Once per member; an address that is not a registered p2pchat member of our
    /// room is ignored by the tracker.
    fn punch(&mut self, addr: SocketAddr) {
        let Some(registration) = &self.registration else { return };
        if self.originals.contains(&addr) || !self.punched.insert(addr) {
            return;
        }
        let request = frames::encode(&Frame::PunchRequest { addr: addr.to_string() });
        if registration.try_send(request.into()).is_ok() {
            log::info!("cannot reach {addr} directly; asking the tracker to have it dial us too");
            // Beside the dial still trying: whichever connects first makes the link.
            let contact = Contact { addr, known: Some(Protocol::P2pchat) };
            let task = bootstrap::dial(
                contact,
                Some(self.listen_port),
                self.readers.limits.clone(),
                self.readers.limits.retry_refused_for,
                self.readers.net.clone(),
            );
            self.background.spawn(task);
        }
    }

    fn hold_registration(&mut self, link: TrackerLink) {
        let (frames, outgoing) = mpsc::channel(8);
        self.registration = Some(frames);
        self.tracker_relays = link.relays;
        self.background.spawn(bootstrap::hold_registration(link.stream, outgoing, self.readers.net.clone()));
    }

    /// Keep-alive for p2pchat links (their readers drop a link that stays silent) and for the tracker
    /// registration, which also hears which original peers we are linked to.
    fn ping(&mut self) {
        if let Some(registration) = &self.registration {
            let originals: Vec<String> = self
                .links
                .values()
                .filter(|l| l.state == State::Original && l.outgoing)
                .filter_map(|l| l.listen_addr.map(|a| a.to_string()))
                .collect();
            let frame = if originals.is_empty() { Frame::Ping } else { Frame::Vouch { originals } };
            let _ = registration.try_send(frames::encode(&frame).into());
        }
        let ping: Line = frames::encode(&Frame::Ping).into();
        let limits = &self.readers.limits;
        let stuck: Vec<(ConnId, String)> = self
            .links
            .iter()
            .filter(|(_, l)| matches!(l.state, State::P2pchat | State::Relay))
            .filter_map(|(id, l)| {
                l.conn
                    .queue
                    .keep_alive(ping.clone())
                    .err()
                    .and_then(|refused| not_reading(&refused, limits))
                    .map(|why| (*id, why))
            })
            .collect();
        for (id, why) in stuck {
            self.remove(id, why, false);
        }
    }

    fn handle(&mut self, event: NetEvent) {
        match event {
            NetEvent::Dialled { stream, contact } => {
                self.dialling.remove(&contact.addr);
                if self.private.is_some() && !self.dials_hub(contact.addr) {
                    return self.handshake(stream, contact.addr, Some(contact));
                }
                let original = contact.known == Some(Protocol::Original) || self.originals.contains(&contact.addr);
                let role = if original { Role::DialOriginal } else { Role::Probe };
                let id = self.open(Transport::Plain(stream), contact.addr, Some(contact.addr), true, role, None);
                if self.dials_hub(contact.addr) {
                    self.hub = Hub::Opening(id);
                }
                if let Some(carried) = self.carried.remove(&contact.addr) {
                    if let Some(link) = self.links.get_mut(&id) {
                        link.held.extend(carried);
                    }
                }
            }
            NetEvent::Accepted { stream, addr } => {
                if self.links.len() >= self.readers.limits.max_links {
                    log::warn!("refusing {addr}: already {} links (the limit)", self.readers.limits.max_links);
                    return crate::net::reset(stream);
                }
                if self.private.is_some() {
                    return self.handshake(stream, addr, None);
                }
                self.open(Transport::Plain(stream), addr, None, false, Role::Accepted, None);
            }
            NetEvent::Secured { secured, remote, dialled } => {
                let (listen_addr, role) = match &dialled {
                    Some(contact) => (Some(contact.addr), Role::Probe),
                    None => (None, Role::Accepted),
                };
                self.open(
                    Transport::Secure(secured.stream),
                    remote,
                    listen_addr,
                    dialled.is_some(),
                    role,
                    Some(secured.binding),
                );
            }
            NetEvent::HandshakeFailed { remote, reason, dialled, wrong_key } => {
                // Ours to tell: a member we tried to reach, or someone at our door without the key.
                if dialled || wrong_key {
                    self.notice(format!("no private link with {remote}: {reason}"));
                } else {
                    log::info!("no private link with {remote}: {reason}");
                }
            }
            NetEvent::DialFailed { addr, known, reason, gave_up, silent } => {
                if self.dials_hub(addr) {
                    if gave_up {
                        log::warn!("cannot reach the tracker's relay at {addr} ({reason})");
                        self.dialling.remove(&addr);
                        self.hub = Hub::Unused;
                    }
                    return;
                }
                if silent && known == Some(Protocol::P2pchat) {
                    // No answer at all from a p2pchat member: perhaps a router that drops what nobody
                    // inside asked for. (Original peers get nothing but the original protocol.)
                    self.punch(addr);
                }
                if !gave_up {
                    log::debug!("{addr} refused ({reason}); retrying");
                } else if self.linked_to(addr) {
                    log::debug!("{addr} did not answer a dial, but a link to it is up ({reason})");
                } else {
                    self.dialling.remove(&addr);
                    self.carried.remove(&addr);
                    log::warn!("cannot reach {addr} ({reason}); skipping it");
                    if known == Some(Protocol::P2pchat) {
                        self.link_to_hub();
                    }
                }
            }
            NetEvent::Hello { id, hello } => self.on_hello(id, hello),
            NetEvent::HistoryRequested { id, req, limit, after } => self.answer_history(id, req, limit, after),
            NetEvent::HistoryPart { id, req, msgs, more } => self.take_history_part(id, req, msgs, more),
            NetEvent::HistoryAnswered { id, bytes } => {
                if let Some(link) = self.links.get_mut(&id) {
                    link.budget.finish(bytes);
                }
            }
            NetEvent::Original { id } => self.on_original(id),
            NetEvent::ProbeRejected { id } => {
                if self.hub_gone(id) {
                    log::warn!("the tracker's relay closed our link without a hello; not using it");
                    self.links.remove(&id);
                    self.tracker_relays = false;
                    return;
                }
                if let Some(link) = self.links.remove(&id) {
                    let addr = link.shown_addr();
                    if self.links.values().any(|l| l.state == State::P2pchat && l.listen_addr == Some(addr)) {
                        // A p2pchat member we are linked to closed a second link (a version that does
                        // not say `duplicate`): not an original peer.
                        log::debug!("{addr} closed a second link to it");
                        return;
                    }
                    log::debug!("{addr} dropped our p2pchat hello: an original peer");
                    self.originals.insert(addr);
                    if self.in_default_room() {
                        self.carried.insert(addr, link.held);
                        self.dial(
                            Contact { addr, known: Some(Protocol::Original) },
                            self.readers.limits.retry_refused_for,
                        );
                    }
                }
            }
            NetEvent::Refused { id, code, message } => {
                let Some(link) = self.links.remove(&id) else { return };
                let addr = link.shown_addr();
                if self.hub_gone(id) {
                    log::warn!("the tracker's relay refused us: {message}");
                    self.tracker_relays = false;
                    return;
                }
                if code == ERR_ROOM {
                    log::debug!("{addr} is in another room: {message}");
                    return;
                }
                if code == ERR_DUPLICATE {
                    // Linked through another connection, or about to be (its hello is on the way).
                    log::debug!("{addr} keeps another link to us: {message}");
                    return;
                }
                self.notice(format!("{addr} refused the p2pchat link: {message}"));
                if code == ERR_VERSION && link.outgoing && self.in_default_room() {
                    self.notice(format!("using the original protocol with {addr}"));
                    self.originals.insert(addr);
                    self.carried.insert(addr, link.held);
                    self.dial(Contact { addr, known: Some(Protocol::Original) }, self.readers.limits.retry_refused_for);
                }
            }
            NetEvent::Renamed { id, name } => {
                let Some(link) = self.links.get_mut(&id) else { return };
                if link.name.as_deref() == Some(name.as_str()) {
                    return;
                }
                let old = link.name.replace(name.clone());
                let addr = link.shown_addr();
                self.meet(id, Some(&name));
                self.notify(Event::Renamed { addr, old, new: name });
            }
            NetEvent::Closed { id, reason, clean } => {
                if self.retiring.remove(&id).is_some() {
                    // Its replacement is up; a request it was still answering goes to another member.
                    return self.forget_link_history(id, None, false);
                }
                let Some(link) = self.links.get(&id) else { return };
                // An original peer we probed drops that link when it reads the probe: dial it again.
                let redial_original = link.outgoing && link.probed && link.state == State::Original;
                // A p2pchat peer lost without a goodbye may still be in the room: try to get it back.
                let redial_p2pchat = link.state == State::P2pchat && !clean;
                let (addr, listen_addr) = (link.shown_addr(), link.listen_addr);
                self.remove(id, reason, clean);
                if redial_original {
                    self.dial(Contact { addr, known: Some(Protocol::Original) }, self.readers.limits.retry_refused_for);
                } else if let (true, Some(addr)) = (redial_p2pchat, listen_addr) {
                    self.dial(Contact { addr, known: Some(Protocol::P2pchat) }, self.readers.limits.redial_for);
                }
            }
            NetEvent::TrackerLost { reason } => {
                self.registration = None;
                let Some(tracker) = self.tracker else { return };
                self.notice(format!(
                    "lost the connection to the tracker ({reason}); the room goes on, registering again"
                ));
                let task = bootstrap::register_again(
                    tracker,
                    self.listen_port,
                    self.readers.room.clone(),
                    self.readers.limits.clone(),
                    self.readers.net.clone(),
                );
                self.background.spawn(task);
            }
            NetEvent::Punch { addr } => {
                if !self.dialling.contains(&addr) && !self.linked_to(addr) {
                    log::info!("the tracker says {addr} cannot reach us; dialling it from our listening port");
                    self.dial_from(
                        Contact { addr, known: Some(Protocol::P2pchat) },
                        Some(self.listen_port),
                        self.readers.limits.retry_refused_for,
                    );
                }
            }
            NetEvent::RelayAsked { id, peer } => self.relay_between(id, &peer),
            NetEvent::RelayOpened { id, peer, name, addr } => self.relayed_to_us(id, peer, name, addr),
            NetEvent::RelayClosed { id, peer, reason, clean } => {
                if let Some(member) = self.relays.closed(id, &peer, clean) {
                    let reason: String = reason.chars().take(200).collect();
                    self.notify(Event::Left { addr: member.addr, name: member.name, reason, clean });
                }
            }
            NetEvent::Forward { id, line } => {
                for partner in self.relays.partners_of(id) {
                    if let Some(link) = self.links.get(&partner) {
                        // A partner that is not reading is dropped by its own writes and pings.
                        let _ = link.conn.queue.try_send(line.clone());
                    }
                }
            }
            NetEvent::Registered { link, contacts } => {
                self.notice("registered with the tracker again".to_owned());
                self.hold_registration(link);
                // Only p2pchat members: a second link to one is noticed by its id, but an original peer
                // we already know may be on a link we accepted, whose listen address we cannot know.
                for contact in contacts.into_iter().filter(|c| c.known == Some(Protocol::P2pchat)) {
                    if !self.linked_to(contact.addr) {
                        self.dial(contact, self.readers.limits.retry_refused_for);
                    }
                }
            }
        }
    }

    fn open(
        &mut self,
        transport: Transport,
        remote: SocketAddr,
        listen_addr: Option<SocketAddr>,
        outgoing: bool,
        role: Role,
        binding: Option<Vec<u8>>,
    ) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        let conn = connection::spawn(id, transport, remote, role, self.readers.clone());
        let probed = role == Role::Probe;
        if probed {
            let hello =
                if outgoing && self.dials_hub(remote) { self.hub_hello() } else { self.hello(binding.as_deref()) };
            let _ = conn.queue.try_send(frames::encode_opening(&Frame::Hello(hello)).into());
        }
        log::debug!("link {id} to {remote} opened ({role:?})");
        let budget = AnswerBudget::new(&self.history);
        let link = Box::new(Link {
            conn,
            remote,
            listen_addr,
            outgoing,
            state: State::Opening,
            name: None,
            peer_id: None,
            probed,
            held: Vec::new(),
            budget,
            binding,
            key: None,
            key_changed: false,
        });
        self.links.insert(id, link);
        id
    }

    /// Our hello: who we are, and (peer exchange) the members we know where to reach; on a private
    /// link (handshake hash `binding`), our identity proven for it.
    fn hello(&self, binding: Option<&[u8]>) -> Hello {
        let peers = self
            .links
            .values()
            .filter(|l| matches!(l.state, State::P2pchat | State::Original))
            .filter_map(|l| {
                l.listen_addr.map(|a| Member {
                    addr: a.to_string(),
                    p2pchat: l.state == State::P2pchat,
                    id: l.peer_id.clone(),
                })
            })
            .collect();
        Hello {
            v: PROTOCOL_VERSION,
            id: self.my_id.clone(),
            name: Some(self.name.clone()),
            room: self.readers.room.clone(),
            listen_port: Some(self.listen_port),
            peers,
            identity: binding.map(|b| self.identity.prove(b)),
            relay: false,
        }
    }

    fn on_hello(&mut self, id: ConnId, hello: Hello) {
        let Some(link) = self.links.get(&id) else { return };
        let (outgoing, remote, binding) = (link.outgoing, link.remote, link.binding.clone());
        if hello.v != PROTOCOL_VERSION {
            let message =
                format!("{remote} speaks p2pchat protocol version {}, this peer version {PROTOCOL_VERSION}", hello.v);
            self.notice(message.clone());
            return self.refuse(id, ERR_VERSION, message);
        }
        if hello.id == self.my_id {
            log::debug!("link {id} reached ourselves; closing it");
            return self.close_quietly(id);
        }
        if hello.room != self.readers.room {
            log::debug!("{remote} is in room {:?}, we are in {:?}", hello.room, self.readers.room);
            return if outgoing {
                self.close_quietly(id)
            } else {
                self.refuse(id, ERR_ROOM, format!("this peer is in room {:?}", self.readers.room))
            };
        }
        // On a private link the other end proves its identity key for this very link: no proof, no link.
        if let Some(binding) = binding {
            let proof = hello.identity.as_ref().ok_or(identity::ProofError::Missing);
            match proof.and_then(|proof| identity::verify_proof(proof, &binding)) {
                Ok(key) => {
                    if let Some(link) = self.links.get_mut(&id) {
                        link.key = Some(Box::new(key));
                    }
                }
                Err(err) => {
                    let message = format!("{remote} gave no valid identity: {err}");
                    self.notice(message.clone());
                    return self.refuse(id, ERR_IDENTITY, message);
                }
            }
        }
        let duplicate = self
            .links
            .iter()
            .find(|(_, l)| l.state == State::P2pchat && l.peer_id.as_deref() == Some(hello.id.as_str()))
            .map(|(other, l)| (*other, l.outgoing));
        if let Some((existing, existing_outgoing)) = duplicate {
            // Two links to one peer (we dialled each other at once). Both ends must keep the same one:
            // the link dialled by the smaller session id.
            let dialler = |outgoing: bool| if outgoing { self.my_id.clone() } else { hello.id.clone() };
            if dialler(outgoing) >= dialler(existing_outgoing) {
                log::debug!("link {id} duplicates link {existing} to the same peer; closing it");
                if outgoing {
                    // It answered our hello and may already be writing to it: read it out.
                    return self.retire(id);
                }
                // We have not answered it: a link closed without a word looks to its dialler like an
                // original peer that dropped a probe, so say why.
                return self.refuse(id, ERR_DUPLICATE, "already linked to you through another connection".to_owned());
            }
            log::debug!("link {id} replaces link {existing} to the same peer");
            return self.replace(existing, id, hello);
        }
        let linked: HashSet<&str> =
            self.links.values().filter(|l| l.state == State::P2pchat).filter_map(|l| l.peer_id.as_deref()).collect();
        let unreached: Vec<String> = hello
            .peers
            .iter()
            .filter(|m| m.p2pchat)
            .filter_map(|m| m.id.clone())
            .filter(|peer| *peer != self.my_id && !linked.contains(peer.as_str()))
            .collect();
        self.relays.heard_of(id, unreached, tokio::time::Instant::now());
        if self.hub == Hub::Opening(id) {
            if self.adopt(id, hello.id, None, None, Vec::new()).is_some() {
                log::info!("linked to the tracker's relay");
                self.hub = Hub::Linked(id);
                if let Some(link) = self.links.get_mut(&id) {
                    link.state = State::Relay;
                }
            }
            return;
        }
        let name = hello.name.filter(|n| chat::validate_name(n).is_ok());
        let Some(addr) = self.adopt(id, hello.id.clone(), hello.listen_port, name.clone(), Vec::new()) else { return };
        let fingerprint = self.meet(id, name.as_deref());
        if self.relays.direct(&hello.id).is_some() {
            log::info!("linked directly to {addr}, which a relay passed to us until now");
        } else {
            let (encrypted, key_changed) =
                self.links.get(&id).map_or((false, false), |l| (l.binding.is_some(), l.key_changed));
            self.notify(Event::Joined {
                addr,
                name,
                protocol: Protocol::P2pchat,
                outgoing,
                relayed_by: None,
                encrypted,
                fingerprint,
                key_changed,
            });
        }
        self.after_adopting(id, &hello.id);
        for member in hello.peers {
            self.consider(member);
        }
    }

    fn on_original(&mut self, id: ConnId) {
        if !self.in_default_room() {
            // Original peers are all in the default room; this one is not in ours.
            log::debug!("link {id} speaks the original protocol, which has no rooms; closing it");
            return self.close_quietly(id);
        }
        let Some(link) = self.links.get_mut(&id) else { return };
        link.state = State::Original;
        if link.outgoing {
            if let Some(addr) = link.listen_addr {
                self.originals.insert(addr);
            }
        }
        let (addr, outgoing, held) = (link.shown_addr(), link.outgoing, std::mem::take(&mut link.held));
        self.flush_held(id, held);
        self.notify(Event::Joined {
            addr,
            name: None,
            protocol: Protocol::Original,
            outgoing,
            relayed_by: None,
            encrypted: false,
            fingerprint: None,
            key_changed: false,
        });
    }

    /// Stop writing to a link but read it until the other end closes it, so nothing in flight is lost.
    fn retire(&mut self, id: ConnId) {
        if let Some(link) = self.links.remove(&id) {
            self.end_relays(id, None, link.shown_addr(), "replaced by another link", false);
            let Connection { queue, task, .. } = link.conn;
            drop(queue);
            self.retiring.insert(id, task);
        }
    }

    /// `newer` takes over from `older` as the link to the same peer, without presence noise.
    fn replace(&mut self, older: ConnId, newer: ConnId, hello: Hello) {
        let (name, held) = match self.links.get_mut(&older) {
            Some(old) => (old.name.clone(), std::mem::take(&mut old.held)),
            None => (None, Vec::new()),
        };
        self.retire(older);
        self.adopt(newer, hello.id, hello.listen_port, name, held);
    }

    /// Make `id` the p2pchat link to the peer `peer_id`: answer its hello if it dialled us, then write
    /// what was held for it (and `carried` from a link it replaces). Returns where it is shown.
    fn adopt(
        &mut self,
        id: ConnId,
        peer_id: String,
        listen_port: Option<u16>,
        name: Option<String>,
        carried: Vec<Arc<OutLine>>,
    ) -> Option<SocketAddr> {
        let our_hello = self
            .links
            .get(&id)
            .filter(|l| !l.outgoing)
            .map(|l| frames::encode_opening(&Frame::Hello(self.hello(l.binding.as_deref()))));
        let link = self.links.get_mut(&id)?;
        if let Some(port) = listen_port {
            link.listen_addr = Some(SocketAddr::new(link.remote.ip(), port));
        }
        link.state = State::P2pchat;
        link.conn.flags.framed.store(true, std::sync::atomic::Ordering::Release);
        link.name = name;
        link.peer_id = Some(peer_id);
        if let Some(bytes) = our_hello {
            let _ = link.conn.queue.try_send(bytes.into());
        }
        let addr = link.shown_addr();
        let mut held = std::mem::take(&mut link.held);
        held.extend(carried);
        self.flush_held(id, held);
        Some(addr)
    }

    /// A member another peer told us about: dial it unless we know it already.
    ///
    /// Original members are only dialled by a peer that joined through members alone (`--peer`): one
    /// that joined through a tracker dialled every original peer the tracker knew, and every later one
    /// dialled it, on a link whose listen address we cannot know (so we could not tell it is the same).
    fn consider(&mut self, member: Member) {
        let Ok(addr) = member.addr.parse::<SocketAddr>() else { return };
        let ours = addr.port() == self.listen_port
            && (addr.ip().is_loopback()
                || addr.ip().is_unspecified()
                || self.links.values().any(|l| l.remote.ip() == addr.ip()));
        let known = self.dialling.contains(&addr)
            || self.links.values().any(|l| l.listen_addr == Some(addr) || l.remote == addr)
            || (!member.p2pchat && (self.joined_via_tracker || !self.in_default_room()));
        if !ours && !known {
            log::debug!("dialling {addr}, which a member told us about");
            let known = if member.p2pchat { None } else { Some(Protocol::Original) };
            self.dial(Contact { addr, known }, self.readers.limits.retry_refused_for);
        }
    }

    fn flush_held(&mut self, id: ConnId, held: Vec<Arc<OutLine>>) {
        for line in held {
            self.write(id, &line);
        }
    }

    /// Queue one line for one link, in its protocol's encoding.
    fn write(&mut self, id: ConnId, line: &Arc<OutLine>) -> bool {
        let Some(link) = self.links.get_mut(&id) else { return false };
        let bytes = match link.state {
            State::P2pchat | State::Relay => line.p2pchat.clone(),
            State::Original => line.original.clone(),
            State::Opening => {
                if link.held.len() < self.readers.limits.send_queue {
                    link.held.push(line.clone());
                    return true;
                }
                let reason = format!("not answering: {} lines held", self.readers.limits.send_queue);
                self.remove(id, reason, false);
                return false;
            }
        };
        let Err(refused) = link.conn.queue.try_send(bytes) else { return true };
        let why = not_reading(&refused, &self.readers.limits).unwrap_or_else(|| "connection closed".to_owned());
        self.remove(id, why, false);
        false
    }

    /// Send a line to every member; returns how many took it.
    fn send(&mut self, text: &str) -> usize {
        let stamp = self.readers.clock.tick();
        let ts = clock::wall_millis();
        let mut message = Chat {
            id: frames::random_id(),
            from: self.name.clone(),
            room: self.readers.room.clone(),
            ts,
            hlc: stamp,
            text: text.to_owned(),
            key: None,
            sig: None,
        };
        if self.private.is_some() {
            // Signed by its author, so no member passing it on (relays, history) can alter or forge it.
            self.identity.sign_chat(&mut message);
        }
        if let Ok(mut seen) = self.readers.seen.lock() {
            seen.first_time(&message.id);
        }
        // Logged only once it is queued on every link (below): a history answer being made for a
        // member meanwhile (on another worker) then either misses it or is queued after it, so the
        // member never gets it as history first (seen in CI: a fresh line shown as caught up).
        let record = history::chat_to_record(&message);
        // In a private room the message travels sealed end to end: relays see only ciphertext.
        let frame = match &self.private {
            Some(key) => key.seal(&message),
            None => Frame::Msg(message),
        };
        let line = Arc::new(OutLine {
            original: chat::encode_line(&self.name, text).into(),
            p2pchat: frames::encode(&frame).into(),
        });
        // An original peer being redialled (it dropped our hello) has no link yet: keep the line with
        // the ones carried for it, so what is typed meanwhile is not lost.
        for carried in self.carried.values_mut() {
            if carried.len() < self.readers.limits.send_queue {
                carried.push(line.clone());
            }
        }
        let ids: Vec<ConnId> = self.links.keys().copied().collect();
        let mut reached = 0;
        for id in ids {
            let member = self.links.get(&id).is_some_and(|l| l.state != State::Relay);
            if self.write(id, &line) && member {
                reached += 1;
            }
        }
        self.readers.log.record_now(record);
        // Relays pass it on to the members we reach through them (those still linked took it).
        reached + self.relays.relayed().filter(|(_, m)| self.links.contains_key(&m.via)).count()
    }

    fn nick(&mut self, name: String) {
        self.name = name.clone();
        let frame: Line = frames::encode(&Frame::Nick { name }).into();
        // The tracker's relay passes a new name on; in a private room it must never learn one.
        let told = |l: &Link| l.state == State::P2pchat || (l.state == State::Relay && self.private.is_none());
        for link in self.links.values().filter(|l| told(l)) {
            let _ = link.conn.queue.try_send(frame.clone());
        }
    }

    fn status(&self) -> Status {
        let tracker = match (self.tracker, &self.registration) {
            (None, _) => TrackerState::None,
            (Some(_), Some(_)) => TrackerState::Registered,
            (Some(_), None) if self.tracker_registers => TrackerState::Reconnecting,
            (Some(_), None) => TrackerState::Original,
        };
        let linked = self.links.values().filter(|l| matches!(l.state, State::P2pchat | State::Original)).count();
        Status { members: linked + self.relays.relayed().count(), tracker }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = self
            .links
            .values()
            .filter(|l| l.state != State::Relay)
            .map(|l| PeerInfo {
                addr: l.shown_addr(),
                name: l.name.clone(),
                outgoing: l.outgoing,
                protocol: match l.state {
                    State::Opening | State::Relay => None,
                    State::P2pchat => Some(Protocol::P2pchat),
                    State::Original => Some(Protocol::Original),
                },
                relayed_by: None,
                encrypted: l.binding.is_some(),
                fingerprint: l.key.as_deref().map(identity::fingerprint),
                key_changed: l.key_changed,
            })
            .collect();
        peers.extend(self.relays.relayed().map(|(_, m)| PeerInfo {
            addr: m.addr,
            name: m.name.clone(),
            outgoing: false,
            protocol: Some(Protocol::P2pchat),
            relayed_by: self.links.get(&m.via).map(|l| l.shown_addr()),
            encrypted: false,
            fingerprint: None,
            key_changed: false,
        }));
        peers.sort_by_key(|p| p.addr);
        peers
    }

    fn remove(&mut self, id: ConnId, reason: String, clean: bool) {
        if self.hub_gone(id) {
            log::info!("the link to the tracker's relay closed ({reason})");
        }
        if let Some(link) = self.links.remove(&id) {
            log::info!("link to {} closed ({reason})", link.shown_addr());
            let announced = matches!(link.state, State::P2pchat | State::Original);
            let (addr, name) = (link.shown_addr(), link.name.clone());
            let lost = link.state == State::P2pchat && !clean;
            let peer_id = link.peer_id.clone();
            drop(link);
            self.end_relays(id, peer_id.as_deref(), addr, &reason, clean);
            self.forget_link_history(id, peer_id, lost);
            if announced {
                self.notify(Event::Left { addr, name, reason, clean });
            }
        }
    }

    /// Close a link that never joined, without telling anyone.
    fn close_quietly(&mut self, id: ConnId) {
        self.links.remove(&id);
    }

    /// Tell the other end why (an `error` frame), then close once that is written.
    fn refuse(&mut self, id: ConnId, code: &str, message: String) {
        let Some(link) = self.links.remove(&id) else { return };
        let frame = Frame::Error { code: code.to_owned(), message };
        let bytes = if link.outgoing { frames::encode(&frame) } else { frames::encode_opening(&frame) };
        let _ = link.conn.queue.try_send(bytes.into());
        let task = end_when_written(link.conn);
        let grace = self.readers.limits.close_grace;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(grace, task).await;
        });
    }

    /// Say goodbye to p2pchat members, let each writer finish what is queued (within the grace
    /// period), then close everything.
    async fn close_all(&mut self) {
        let bye: Line = frames::encode(&Frame::Bye).into();
        let deadline = tokio::time::Instant::now() + self.readers.limits.close_grace;
        let mut links = Vec::new();
        for (_, link) in self.links.drain() {
            // A link still opening that carried our hello is a member's already, if it speaks
            // p2pchat: without a goodbye it would take us for lost and dial us again. (An original
            // peer has dropped the link at the hello's first byte.)
            let member_knows_us =
                matches!(link.state, State::P2pchat | State::Relay) || (link.state == State::Opening && link.probed);
            if member_knows_us {
                let _ = link.conn.queue.try_send(bye.clone());
            }
            links.push(end_when_written(link.conn));
        }
        for link in &mut links {
            let _ = tokio::time::timeout_at(deadline, link).await;
        }
    }

    fn notice(&self, text: String) {
        // Logged under its own name: an application that shows notices (the client) can keep the
        // log from saying them a second time; one that reads only messages still sees them there.
        log::warn!(target: "p2pchat::notice", "{text}");
        self.notify(Event::Notice { text });
    }

    /// Presence events are rare; if the application is behind, deliver them later rather than block.
    fn notify(&self, event: Event) {
        if let Err(TrySendError::Full(event)) = self.readers.events.try_send(event) {
            let events = self.readers.events.clone();
            tokio::spawn(async move {
                let _ = events.send(event).await;
            });
        }
    }
}

/// Why a link whose queue refused a line is dropped as not reading (`None`: its connection is gone).
fn not_reading(refused: &Refused<Line>, limits: &Limits) -> Option<String> {
    match refused {
        Refused::Stalled(_) => {
            Some(format!("not reading: {} lines queued, none taken for {:?}", limits.send_queue, limits.stalled_after))
        }
        Refused::Overflow(_) => Some(format!("not reading fast enough: {} KiB queued", limits.send_queue_bytes / 1024)),
        Refused::Closed(_) => None,
    }
}

/// Stop reading `conn` and close it once what is queued is written; its task ends then (or is
/// aborted when the returned handle is dropped).
fn end_when_written(conn: Connection) -> AbortOnDropHandle<()> {
    let Connection { queue, flags, task } = conn;
    flags.closing.store(true, std::sync::atomic::Ordering::Release);
    // Dropping the queue wakes the task, which then sees the flag.
    drop(queue);
    task
}

async fn accept_loop(listener: TcpListener, net: mpsc::Sender<NetEvent>) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                if net.send(NetEvent::Accepted { stream, addr }).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                log::warn!("accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
