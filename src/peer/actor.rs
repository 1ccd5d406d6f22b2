//! The peer's driver: one task that owns the [`PeerState`] and carries out what it decides.
//!
//! Handles send [`Command`]s with oneshot replies; the accept loop, the dialers, the tracker
//! registration and the connection tasks report [`NetEvent`]s. Each becomes a call into the state
//! machine with the time it happened at; then every [`Output`] it queued is carried out: a write is a
//! `try_send` into the link's queue (so the driver never waits on a network peer), a dial or a
//! history answer is a task, an event goes to the application. What a queue refuses goes back to the
//! state. No protocol decision is made here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use super::bootstrap::{self, TrackerLink};
use super::connection::{self, Connection, ReaderContext, Transport};
use super::outbox::Refused;
use super::secure::{self, Secured};
use super::seen::SeenIds;
use super::state::ids::Ids;
use super::state::receipts::Job;
use super::state::rules::LinkRules;
use super::state::{self, Closing, Connect, Output, PeerState, Report};
use super::sync::{self, HistoryConfig};
use super::trust::{self, KnownKeys};
use super::types::{Contact, Line, LinkId, Now, Role};
use super::{Event, Limits, PeerInfo, Protocol, Status};
use crate::history::clock::{self, Clock};
use crate::history::log::LogHandle;
use crate::history::store::Key;
use crate::identity::Identity;
use crate::private::RoomKey;
use crate::wire::frames::Chat;

/// The longest a closing peer waits for its log to write the last batch.
const LOG_FLUSH_BOUND: Duration = Duration::from_secs(2);

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
    Trust {
        name: String,
        fingerprint: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Untrust {
        name: String,
        reply: oneshot::Sender<bool>,
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
    /// What link `id`'s reader found.
    Report {
        id: LinkId,
        report: Report,
    },
    /// The link ended (its reader saw it end): `clean` when the other end said goodbye first.
    Closed {
        id: LinkId,
        reason: String,
        clean: bool,
    },
    TrackerLost {
        reason: String,
    },
    /// The log took a part of the answer to our request `req` on link `link`: which were new to it.
    Ingested {
        link: LinkId,
        req: u32,
        msgs: Vec<Chat>,
        fresh: Vec<bool>,
    },
    /// Our answer to a history request on this link was queued: `bytes` of it.
    HistoryAnswered {
        id: LinkId,
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
    /// The newest messages from p2pchat peers in our log (stamp, id): seen already, so a copy
    /// replayed after a restart is not shown again, and summarised on new links (`recent`).
    pub remembered: Vec<(u64, String)>,
    /// Whether a tracker (of either kind) gave us the room.
    pub joined_via_tracker: bool,
    pub contacts: Vec<Contact>,
    pub commands: mpsc::Receiver<Command>,
    pub events: mpsc::Sender<Event>,
    /// Told how many contacts the first attempts reached, once every one was tried (or
    /// `Limits::relay_first` passed).
    pub ready: oneshot::Sender<usize>,
    /// A private room's key: every link is then encrypted (see `secure`), and `room` is its opaque id.
    pub private: Option<RoomKey>,
    /// Our identity, proven on private links, and the keys we met names with before.
    pub identity: Arc<Identity>,
    pub known_keys: Arc<Mutex<KnownKeys>>,
}

/// The system's clocks, as tokio sees them (so a test's paused tokio clock holds here too).
pub(super) fn now() -> Now {
    Now { at: tokio::time::Instant::now().into_std(), wall_ms: clock::wall_millis() }
}

/// 32 bytes from the OS for the state's id generator.
fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    if getrandom::fill(&mut seed).is_err() {
        // No OS randomness: the clock, as `frames::random_id` falls back to.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        seed[..16].copy_from_slice(&nanos.to_le_bytes());
    }
    seed
}

struct Driver {
    state: PeerState,
    /// The running links, by the state's ids.
    conns: HashMap<LinkId, Connection>,
    /// Links retired for a duplicate: no longer written to (the writer finishes its queue and shuts
    /// down), read until they end. Their tasks.
    retiring: HashMap<LinkId, AbortOnDropHandle<()>>,
    /// Links closing because we leave; waited for, up to the close grace.
    leaving: Vec<AbortOnDropHandle<()>>,
    /// The tasks taking the answers to our history requests, by link and request number.
    answers: HashMap<(LinkId, u32), mpsc::UnboundedSender<Job>>,
    /// Frames for our tracker registration (pings, vouches), while we are registered.
    registration: Option<mpsc::Sender<Line>>,
    background: JoinSet<()>,
    /// What every link's reader shares; also the driver's limits and room, and its handles to
    /// the seen ids, the clock, the log and the two channels.
    readers: Arc<ReaderContext>,
    private: Option<Arc<RoomKey>>,
    known_keys: Arc<Mutex<KnownKeys>>,
    /// The write of the known keys in progress (one at a time, so an older one never lands last).
    saving_keys: Option<tokio::task::JoinHandle<()>>,
    ready: Option<oneshot::Sender<usize>>,
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
        remembered,
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
    let private = private.map(Arc::new);
    let mut seen = SeenIds::new(super::seen::REMEMBERED_IDS);
    for (stamp, id) in &remembered {
        seen.first_time(id);
        seen.recent.note(*stamp, id);
    }
    let seen = Arc::new(Mutex::new(seen));
    let clock = Arc::new(Clock::new());
    // What every link's reader needs, made once: a link holds a pointer to it, not a copy.
    let readers = Arc::new(ReaderContext {
        rules: LinkRules {
            limits: limits.clone(),
            room: room.clone(),
            seen: seen.clone(),
            clock: clock.clone(),
            authors: private.as_ref().map(|_| known_keys.clone()),
            room_key: private.clone(),
            ids: Mutex::new(Ids::from_seed(os_seed())),
        },
        net,
        events,
        log,
    });
    let state = PeerState::new(
        state::Setup {
            name,
            room,
            limits,
            history,
            listen_port,
            tracker,
            registered: tracker_link.as_ref().map(|link| link.offers),
            history_after,
            joined_via_tracker,
            contacts,
            private: private.clone(),
            identity,
            known_keys: known_keys.clone(),
            seen,
            clock,
            seed: os_seed(),
        },
        now(),
    );
    let mut driver = Driver {
        state,
        conns: HashMap::new(),
        retiring: HashMap::new(),
        leaving: Vec::new(),
        answers: HashMap::new(),
        registration: None,
        background: JoinSet::new(),
        readers,
        private,
        known_keys,
        saving_keys: None,
        ready: Some(ready),
    };
    // Dropping `background` (when the driver ends) aborts the accept loop, the dialers and the registration.
    driver.background.spawn(accept_loop(listener, driver.readers.net.clone()));
    if let Some(link) = tracker_link {
        driver.hold_registration(link);
    }
    driver.carry_out();
    let mut keepalive = tokio::time::interval(driver.readers.rules.limits.keepalive_interval);
    // Set by `close` (or when every handle is gone): lines held for links still opening get until the
    // grace deadline to be written, then everything closes.
    let mut closing: Option<(tokio::time::Instant, Option<oneshot::Sender<()>>)> = None;
    log::debug!("peer {:?} running in room {:?}", driver.state.name(), driver.state.room());

    loop {
        if let Some((deadline, _)) = &closing {
            if !driver.state.holds_lines() || tokio::time::Instant::now() >= *deadline {
                break;
            }
        }
        let grace_over = async {
            match &closing {
                Some((deadline, _)) => tokio::time::sleep_until(*deadline).await,
                None => std::future::pending().await,
            }
        };
        let timeout = driver.state.poll_timeout().map(tokio::time::Instant::from_std);
        let timer = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = commands.recv(), if closing.is_none() => {
                let grace = driver.readers.rules.limits.close_grace;
                match command {
                    Some(Command::Send { text, reply }) => {
                        let reached = driver.state.send(now(), &text);
                        // Carried out before the caller hears back: the line is in the log's batch (which
                        // `history` reads) and queued on every link by the time `send` returns.
                        driver.carry_out();
                        if let Some(reply) = reply {
                            let _ = reply.send(reached);
                        }
                    }
                    Some(Command::Nick { name, reply }) => {
                        driver.state.nick(name);
                        let _ = reply.send(());
                    }
                    Some(Command::Name { reply }) => {
                        let _ = reply.send(driver.state.name().to_owned());
                    }
                    Some(Command::Trust { name, fingerprint, reply }) => {
                        let _ = reply.send(driver.state.trust(&name, &fingerprint));
                    }
                    Some(Command::Untrust { name, reply }) => {
                        let _ = reply.send(driver.state.untrust(&name));
                    }
                    Some(Command::Peers { reply }) => {
                        let _ = reply.send(driver.state.peers());
                    }
                    Some(Command::Status { reply }) => {
                        let _ = reply.send(driver.state.status());
                    }
                    Some(Command::Close { reply }) => closing = Some((tokio::time::Instant::now() + grace, Some(reply))),
                    None => closing = Some((tokio::time::Instant::now() + grace, None)),
                }
            }
            Some(event) = net_rx.recv() => driver.handle(event),
            () = grace_over => {}
            () = timer => driver.state.handle_timeout(now()),
            // A finished task keeps its memory (sized for its whole future) until it is reaped here.
            Some(finished) = driver.background.join_next() => {
                if let Err(err) = finished {
                    if err.is_panic() {
                        log::error!("a background task of this peer panicked: {err}");
                    }
                }
            }
            _ = keepalive.tick() => driver.state.tick(now()),
        }
        driver.carry_out();
    }
    driver.leave().await;
    // What arrived last is still in the log's batch (bounded: closing must never hang).
    if tokio::time::timeout(LOG_FLUSH_BOUND, driver.readers.log.flush()).await.is_err() {
        log::warn!("the message log did not finish writing within {LOG_FLUSH_BOUND:?} of closing");
    }
    if let Some(saving) = driver.saving_keys.take() {
        let _ = saving.await;
    }
    driver.save_known_keys();
    if let Some(saving) = driver.saving_keys.take() {
        let _ = saving.await;
    }
    if let Some((_, Some(reply))) = closing {
        let _ = reply.send(());
    }
    log::debug!("peer {:?} closed", driver.state.name());
}

impl Driver {
    fn handle(&mut self, event: NetEvent) {
        let now = now();
        match event {
            NetEvent::Dialled { stream, contact } => {
                let connect = self.state.dialled(now, contact.clone());
                self.connect(connect, stream, contact.addr, Some(contact));
            }
            NetEvent::Accepted { stream, addr } => {
                let connect = self.state.accepted(now, addr);
                self.connect(connect, stream, addr, None);
            }
            NetEvent::Secured { secured, remote, dialled } => {
                let connect = self.state.secured(now, remote, dialled, secured.binding);
                if let Connect::Open { link, role } = connect {
                    self.spawn_link(link, Transport::Secure(secured.stream), remote, role);
                }
            }
            NetEvent::HandshakeFailed { remote, reason, dialled, wrong_key } => {
                self.state.handshake_failed(now, remote, &reason, dialled, wrong_key)
            }
            NetEvent::DialFailed { addr, known, reason, gave_up, silent } => {
                self.state.dial_failed(now, addr, known, &reason, gave_up, silent)
            }
            NetEvent::Report { id, report } => self.state.report(now, id, report),
            NetEvent::Closed { id, reason, clean } => {
                self.retiring.remove(&id);
                self.state.closed(now, id, reason, clean);
            }
            NetEvent::HistoryAnswered { id, bytes } => self.state.history_answered(id, bytes),
            NetEvent::Ingested { link, req, msgs, fresh } => self.state.history_ingested(now, link, req, msgs, fresh),
            NetEvent::TrackerLost { reason } => {
                self.registration = None;
                self.state.tracker_lost(&reason);
            }
            NetEvent::Registered { link, contacts } => {
                let offers = link.offers;
                self.hold_registration(link);
                self.state.registered_again(now, offers, contacts);
            }
            NetEvent::Punch { addr } => self.state.punch_asked(now, addr),
        }
    }

    /// A connection opened: run it as a link, hand it to the handshake, or refuse it, as the state says.
    fn connect(&mut self, connect: Connect, stream: TcpStream, remote: SocketAddr, dialled: Option<Contact>) {
        match connect {
            Connect::Open { link, role } => self.spawn_link(link, Transport::Plain(stream), remote, role),
            Connect::Handshake => self.handshake(stream, remote, dialled),
            Connect::Reset => crate::net::reset(stream),
        }
    }

    fn spawn_link(&mut self, link: LinkId, transport: Transport, remote: SocketAddr, role: Role) {
        let conn = connection::spawn(link, transport, remote, role, self.readers.clone());
        self.conns.insert(link, conn);
    }

    /// Carry out everything the state decided, in order.
    fn carry_out(&mut self) {
        while let Some(output) = self.state.poll_output() {
            match output {
                Output::Write { link, bytes } => {
                    let Some(conn) = self.conns.get(&link) else { continue };
                    if let Err(refused) = conn.queue.try_send(bytes) {
                        let why = not_reading(&refused, &self.readers.rules.limits);
                        self.state.write_refused(now(), link, why);
                    }
                }
                Output::KeepAlive { link, bytes } => {
                    let Some(conn) = self.conns.get(&link) else { continue };
                    let stuck =
                        conn.queue.keep_alive(bytes).err().and_then(|r| not_reading(&r, &self.readers.rules.limits));
                    if let Some(why) = stuck {
                        self.state.write_refused(now(), link, Some(why));
                    }
                }
                Output::Framed { link } => {
                    if let Some(conn) = self.conns.get(&link) {
                        conn.flags.framed.store(true, std::sync::atomic::Ordering::Release);
                    }
                }
                Output::Forwards { link, on } => {
                    if let Some(conn) = self.conns.get(&link) {
                        conn.flags.forwards.store(on, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Output::Close { link, how } => self.close(link, how),
                Output::Dial { contact, from_port, retry_for } => {
                    let (limits, net) = (self.readers.rules.limits.clone(), self.readers.net.clone());
                    self.background.spawn(bootstrap::dial(contact, from_port, limits, retry_for, net));
                }
                Output::Emit(event) => self.notify(event),
                Output::Log(record) => self.readers.log.record_now(record),
                Output::AskHistory { link, req } => {
                    // Unbounded: the state bounds the jobs of one answer (`receipts::MAX_INGESTING`).
                    let (jobs, jobs_rx) = mpsc::unbounded_channel();
                    let sink = self.readers.clone();
                    self.background.spawn(sync::receive(jobs_rx, link, req, sink));
                    self.answers.insert((link, req), jobs);
                }
                Output::History { link, req, job } => {
                    if let Some(jobs) = self.answers.get(&(link, req)) {
                        let _ = jobs.send(job);
                    }
                }
                Output::HistoryDone { link, req } => {
                    // Its task ends once it has done the jobs it holds.
                    self.answers.remove(&(link, req));
                }
                Output::AnswerHistory { link, req, query } => {
                    let Some(conn) = self.conns.get(&link) else { continue };
                    let (log, room, queue, net) = (
                        self.readers.log.clone(),
                        self.readers.rules.room.clone(),
                        conn.queue.clone(),
                        self.readers.net.clone(),
                    );
                    self.background.spawn(async move {
                        let bytes = sync::answer(log, room, req, query, queue).await;
                        let _ = net.send(NetEvent::HistoryAnswered { id: link, bytes }).await;
                    });
                }
                Output::ToTracker(bytes) => {
                    if let Some(registration) = &self.registration {
                        let _ = registration.try_send(bytes);
                    }
                }
                Output::RegisterAgain { tracker, listen_port } => {
                    let task = bootstrap::register_again(
                        tracker,
                        listen_port,
                        self.readers.rules.room.clone(),
                        self.readers.rules.limits.clone(),
                        self.readers.net.clone(),
                    );
                    self.background.spawn(task);
                }
                Output::SaveKnownKeys => self.save_known_keys(),
                Output::Ready { reached } => {
                    if let Some(ready) = self.ready.take() {
                        let _ = ready.send(reached);
                    }
                }
            }
        }
    }

    fn close(&mut self, link: LinkId, how: Closing) {
        let Some(conn) = self.conns.remove(&link) else { return };
        match how {
            // Dropping the connection aborts its task and closes the socket.
            Closing::Now => drop(conn),
            Closing::Refused => {
                let task = end_when_written(conn);
                let grace = self.readers.rules.limits.close_grace;
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(grace, task).await;
                });
            }
            Closing::Retire => {
                let Connection { queue, task, .. } = conn;
                drop(queue);
                self.retiring.insert(link, task);
            }
            Closing::Leaving => self.leaving.push(end_when_written(conn)),
        }
    }

    /// Say goodbye to p2pchat members, let each writer finish what is queued (within the grace
    /// period), then close everything.
    async fn leave(&mut self) {
        let deadline = tokio::time::Instant::now() + self.readers.rules.limits.close_grace;
        self.state.leave();
        self.carry_out();
        for link in &mut self.leaving {
            let _ = tokio::time::timeout_at(deadline, link).await;
        }
    }

    /// A private room's connection (to `remote`; `dialled`: the member we dialled, else accepted): run
    /// the handshake in a task, which reports `Secured` or `HandshakeFailed`.
    fn handshake(&mut self, stream: TcpStream, remote: SocketAddr, dialled: Option<Contact>) {
        let Some(key) = self.private.clone() else { return };
        let (net, limits) = (self.readers.net.clone(), self.readers.rules.limits.clone());
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

    fn hold_registration(&mut self, link: TrackerLink) {
        let (frames, outgoing) = mpsc::channel(8);
        self.registration = Some(frames);
        self.background.spawn(bootstrap::hold_registration(link.stream, outgoing, self.readers.net.clone()));
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
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
