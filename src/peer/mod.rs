//! A chat peer: joins a room through a tracker (or through any member), keeps a TCP connection to every
//! other member (a full mesh) and writes each line straight to each of them.
//!
//! Every link speaks one of two protocols. With an original peer it is the original one: `<NAME> :: text`
//! bytes and nothing else. Between p2pchat peers it is the extension (`wire::frames`): framed messages
//! with ids, rooms, names and presence. A link finds out which without an original peer ever printing
//! a byte it would not get from an original peer (see `connection`).
//!
//! Tasks and channels (one owner per piece of state):
//!
//! ```text
//!  PeerHandle (Clone) ──Command (bounded mpsc, oneshot replies)──▶ actor ◀──NetEvent── accept loop, dialers,
//!                                                                   │                  connection readers/writers
//!                                          per-connection queue ◀──┘ (try_send: a full queue drops that peer)
//!  Events ◀── Event (bounded mpsc) ── connection readers (messages, with backpressure) and the actor (presence)
//! ```
//!
//! [`join`] binds the listener on port P first, then asks the tracker from P (so nobody can be handed
//! P before we listen), then dials every listed peer concurrently.

mod actor;
mod bootstrap;
mod connection;
mod events;
mod outbox;
mod recent;
mod relay;
mod secure;
mod seen;
#[cfg(test)]
mod sim;
mod state;
mod sync;
mod trust;
mod types;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::history::log::{self as message_log, LogError, LogHandle};
use crate::history::store::{Key, Query, Record, StoreError};
use crate::identity::{Identity, IdentityError};
use crate::private::RoomKey;
use crate::wire::chat::{self, InvalidInput};
use trust::{KnownKeys, TrustError};

pub use self::events::Events;
pub use self::sync::HistoryConfig;

/// Where to find the tracker: a host name or IP address, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerAddr {
    pub host: String,
    pub port: u16,
}

/// Timing and size limits of a peer; the defaults suit a LAN or the Internet. Non-exhaustive:
/// start from `Limits::default()` and assign the fields to change.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// How long one connection attempt to a peer or the tracker may take.
    pub connect_timeout: Duration,
    /// How long a peer that refuses connections (or does not answer) is retried, with backoff, before
    /// it is skipped.
    pub retry_refused_for: Duration,
    /// How long to wait for the tracker's first byte.
    pub tracker_answer_timeout: Duration,
    /// The tracker's answer is complete once no byte arrived for this long (the original never closes).
    pub tracker_idle: Duration,
    /// Largest tracker answer read; the rest is ignored.
    pub tracker_answer_cap: usize,
    /// Lines queued for one peer past which it must keep taking them: if its queue stays this long
    /// for `stalled_after` without a line taken, it is not reading and is disconnected. (History
    /// answers wait for room below it.)
    pub send_queue: usize,
    /// See `send_queue`.
    pub stalled_after: Duration,
    /// Bytes queued for one peer at most, however it keeps up: past that it is disconnected.
    pub send_queue_bytes: usize,
    /// Events buffered for the application before readers wait (backpressure onto the senders).
    pub event_queue: usize,
    /// A possible header prefix at the end of an original peer's read is held back at most this long
    /// (a split character waits for its other bytes, however long).
    pub hold_back: Duration,
    /// How long `close` lets queued lines drain before the sockets are closed.
    pub close_grace: Duration,
    /// How long a dialled peer may take to answer our hello before it counts as an original peer.
    pub probe_timeout: Duration,
    /// How long an accepted connection may stay silent before it counts as an original peer (which
    /// sends nothing until its user types). Lines for it are held, not written, until then.
    pub decide_timeout: Duration,
    /// How often p2pchat links and the tracker registration are pinged.
    pub keepalive_interval: Duration,
    /// A link silent this long is dead: a p2pchat link that got no frame (it pings), or an original
    /// link whose TCP keep-alive probes went unanswered.
    pub dead_after: Duration,
    /// How long a p2pchat peer whose link was lost without a goodbye is redialled (with backoff).
    pub redial_for: Duration,
    /// Links held at once; more incoming connections are refused (reset) with a log line.
    pub max_links: usize,
    /// Messages per second one member may send before it is muted here (its further messages are
    /// dropped until it slows down); bursts of three times this are allowed (a pasted page).
    pub max_message_rate: u32,
    /// A p2pchat member we are still not linked to this long after we first dialled it, or first
    /// heard of it from a neighbour, is reached through a relay at once (a neighbour that is linked
    /// to it, or the tracker's relay), while the direct dials and the hole punch go on; a direct link
    /// that comes up later retires the relay. Short, so nothing typed waits for the dials to fail.
    pub relay_first: Duration,
    /// An ask for a relay that nobody answered is asked again this long after.
    pub relay_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            retry_refused_for: Duration::from_secs(5),
            tracker_answer_timeout: Duration::from_secs(5),
            tracker_idle: Duration::from_millis(200),
            tracker_answer_cap: 64 * 1024,
            send_queue: 256,
            stalled_after: Duration::from_secs(3),
            // At least the line bound's worth of the longest lines (256 of 64 KiB), as when it was the only bound.
            send_queue_bytes: 32 * 1024 * 1024,
            event_queue: 4096,
            hold_back: Duration::from_millis(50),
            close_grace: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(3),
            decide_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(2),
            dead_after: Duration::from_secs(8),
            redial_for: Duration::from_secs(30),
            max_links: 512,
            max_message_rate: 200,
            relay_first: Duration::from_secs(1),
            relay_after: Duration::from_secs(10),
        }
    }
}

/// What a peer needs to join: `PeerConfig::new(name, tracker host, tracker port)`, then any field
/// set by assignment. Non-exhaustive: settings added later break no caller.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PeerConfig {
    pub name: String,
    /// The room; "" is the default room, the only one original peers can be in.
    pub room: String,
    /// The tracker to ask; `None` joins through `peers` alone.
    pub tracker: Option<TrackerAddr>,
    /// Members to dial directly (`--peer`); with p2pchat members, they tell us the rest of the room.
    pub peers: Vec<SocketAddr>,
    /// Fix the listening port P (for a forwarded port on a router); `None` lets the system choose.
    pub listen_port: Option<u16>,
    pub limits: Limits,
    pub history: HistoryConfig,
    /// The user's identity file (created on first use); `None`: a new identity for this session only.
    pub identity: Option<std::path::PathBuf>,
    /// Make `room` private: only holders of this key can join or read it (see `private`). Its name
    /// must be `room` (or `room` left empty).
    pub private: Option<RoomKey>,
}

impl PeerConfig {
    pub fn new(name: impl Into<String>, tracker_host: impl Into<String>, tracker_port: u16) -> Self {
        Self {
            name: name.into(),
            room: String::new(),
            tracker: Some(TrackerAddr { host: tracker_host.into(), port: tracker_port }),
            peers: Vec::new(),
            listen_port: None,
            limits: Limits::default(),
            history: HistoryConfig::default(),
            identity: None,
            private: None,
        }
    }
}

/// Which protocol a link speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The p2pchat extension (framed, with ids and presence).
    P2pchat,
    /// The original `<NAME> :: text` stream.
    Original,
}

/// One received chat message (or, when its bytes arrived in two bursts, one piece of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The name in the sender's `<NAME> :: ` prefix; `None` for bytes that came before any prefix.
    pub sender: Option<String>,
    pub text: String,
    /// The remote address of the connection it came on.
    pub from: SocketAddr,
    pub received_at: SystemTime,
    /// False for the later part of a message whose bytes arrived after a pause (original links only).
    pub starts_message: bool,
    /// The message id (p2pchat links only; original lines carry none).
    pub id: Option<String>,
    /// When the sender says it sent it (p2pchat links only; the sender's clock).
    pub sent_at: Option<SystemTime>,
    /// Its place in the room's order (see `history::clock`): the author's stamp for p2pchat
    /// messages, ours at arrival for original lines.
    pub stamp: Option<u64>,
    /// Said before it reached us: history on join, or missed during a gap and fetched since.
    pub history: bool,
    /// Signed by its author, checked here (private rooms only; it also came encrypted on every link).
    pub signed: bool,
}

/// Something that happened in the room, in the order the peer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message(Message),
    /// A member joined: a link opened and its protocol is known. `outgoing` when we dialled it;
    /// `relayed_by`: the member that relays it to us (we could not reach it directly).
    /// `encrypted`: a private room's link; `fingerprint`: the identity key it proved there;
    /// `key_changed`: its name had another key when first met here (see `trust`).
    Joined {
        addr: SocketAddr,
        name: Option<String>,
        protocol: Protocol,
        outgoing: bool,
        relayed_by: Option<SocketAddr>,
        encrypted: bool,
        fingerprint: Option<String>,
        key_changed: bool,
    },
    /// A member is known by a new name: a p2pchat peer's `/nick`, or an original peer's first prefix.
    Renamed {
        addr: SocketAddr,
        old: Option<String>,
        new: String,
    },
    /// A member left: `clean` when it said goodbye, else the link was lost (with the reason).
    Left {
        addr: SocketAddr,
        name: Option<String>,
        reason: String,
        clean: bool,
    },
    /// Something the user should know that is not about one message (a refused link, a lost tracker).
    Notice {
        text: String,
    },
    /// The history asked for on join is in (`received` messages; 0 when nobody had any or nobody
    /// could be asked). What happened meanwhile (live messages, presence) comes right after it.
    HistorySynced {
        received: usize,
    },
}

/// A member we hold a connection to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Where it accepts connections when known (p2pchat peers and peers we dialled), else the remote
    /// address of the connection.
    pub addr: SocketAddr,
    /// Its name: from its hello (p2pchat) or its first `<NAME> :: ` prefix (original), once known.
    pub name: Option<String>,
    pub outgoing: bool,
    /// `None` while an accepted connection has not shown what it speaks yet.
    pub protocol: Option<Protocol>,
    /// The member that relays it to us; `None` for a direct link.
    pub relayed_by: Option<SocketAddr>,
    /// A private room's encrypted, authenticated link.
    pub encrypted: bool,
    /// The identity key it proved (private rooms), and whether its name had another key before.
    pub fingerprint: Option<String>,
    pub key_changed: bool,
}

/// How the tracker sees us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerState {
    /// Joined through members only (`peers`), no tracker.
    None,
    /// An original tracker: it lists us to newcomers and keeps no connection.
    Original,
    /// Registered with a p2pchat tracker.
    Registered,
    /// The p2pchat tracker was lost; registering again in the background.
    Reconnecting,
}

/// A peer at a glance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Members we hold a link to whose protocol is known.
    pub members: usize,
    pub tracker: TrackerState,
}

/// What joining found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinReport {
    /// The address we listen on.
    pub listen_addr: SocketAddr,
    /// How many addresses the tracker listed (after removing our own).
    pub listed: usize,
    /// How many of them we reached with the first attempt.
    pub connected: usize,
}

#[derive(Debug, Error)]
pub enum PeerError {
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    #[error("cannot find the tracker host {host:?}: {source}")]
    TrackerLookup { host: String, source: io::Error },
    #[error("the tracker at {addr} refused us: {message}")]
    TrackerRefused { addr: SocketAddr, message: String },
    #[error("nobody to join: give a tracker or at least one peer address")]
    NothingToJoin,
    #[error("cannot reach the tracker at {addr}: {source}")]
    TrackerUnreachable { addr: SocketAddr, source: io::Error },
    #[error("the tracker at {addr} accepted the connection but sent nothing within {waited:?}")]
    TrackerSilent { addr: SocketAddr, waited: Duration },
    #[error("port {port} is already in use on this machine; choose another listening port")]
    AddressInUse { port: u16 },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    History(#[from] StoreError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("the default room cannot be private: give the private room a name")]
    UnnamedPrivateRoom,
    #[error("the room key is for room {key_room:?}, not {room:?}")]
    RoomKeyMismatch { key_room: String, room: String },
    /// `trust` found no member with that name and key.
    #[error("{0}")]
    NotTrusted(String),
    #[error("the peer is closed")]
    Closed,
}

impl From<LogError> for PeerError {
    fn from(err: LogError) -> Self {
        match err {
            LogError::Store(err) => PeerError::History(err),
            LogError::Closed => PeerError::Closed,
        }
    }
}

/// A cheap, cloneable handle to a joined peer. The peer shuts down when [`close`](Self::close) is
/// called or when every handle is dropped.
#[derive(Clone, Debug)]
pub struct PeerHandle {
    commands: mpsc::Sender<actor::Command>,
    log: LogHandle,
    /// The user's key's fingerprint (see `identity`).
    fingerprint: String,
    room: String,
    listen_addr: SocketAddr,
}

/// Commands (sends, questions) waiting for the peer's task; past that, senders wait.
pub const COMMAND_QUEUE: usize = 256;

/// Join the room: listen on P, ask the tracker from P (if any), dial every listed peer and `peers`.
///
/// Returns once each of them was tried once, or `Limits::relay_first` (1 s) after it began, whichever
/// comes first: the user can type while a slow dial goes on, and members not reached yet are
/// reached in the background (refusals retried; a silent member relayed, see `relay`).
pub async fn join(mut config: PeerConfig) -> Result<(PeerHandle, Events, JoinReport), PeerError> {
    chat::validate_name(&config.name)?;
    chat::validate_room(&config.room)?;
    // On the wire (to the tracker and between peers) a private room goes by its opaque id only.
    let wire_room = match &config.private {
        None => config.room.clone(),
        Some(key) if key.name().is_empty() => return Err(PeerError::UnnamedPrivateRoom),
        Some(key) if !config.room.is_empty() && config.room != key.name() => {
            return Err(PeerError::RoomKeyMismatch { key_room: key.name().to_owned(), room: config.room.clone() })
        }
        Some(key) => {
            config.room = key.name().to_owned();
            key.room_id()
        }
    };
    if config.tracker.is_none() && config.peers.is_empty() {
        return Err(PeerError::NothingToJoin);
    }
    let identity_file = config.identity.clone();
    let (identity, known_keys) = tokio::task::spawn_blocking(move || -> Result<_, PeerError> {
        let identity = match &identity_file {
            Some(path) => Identity::load_or_create(path)?,
            None => Identity::generate()
                .map_err(|source| IdentityError::Create { path: "(this session)".into(), source })?,
        };
        // The keys we met names with live beside the identity (with a session-only identity, in memory).
        let known_keys = KnownKeys::load(identity_file.map(|path| path.with_file_name(trust::FILE_NAME)))?;
        Ok((Arc::new(identity), Arc::new(std::sync::Mutex::new(known_keys))))
    })
    .await
    .map_err(|_| PeerError::Closed)??;
    let (location, room, retention) = (config.history.location.clone(), wire_room.clone(), config.history.retention);
    let log = tokio::task::spawn_blocking(move || message_log::open(&location, room, retention))
        .await
        .map_err(|_| PeerError::Closed)??;
    let history_after = match config.history.ask_on_join {
        0 => None,
        _ => Some(log.newest_shared().await?),
    };
    // What the log holds of the room's recent messages is seen already: a copy replayed after a
    // restart (a captured sealed frame, within its freshness window) is not shown again.
    let newest = Query { shared_only: true, ..Query::latest(recent::KEPT) };
    let remembered = log.query(newest).await?.into_iter().map(|record| (record.stamp, record.id)).collect();
    let boot = bootstrap::contact_tracker(&config, &wire_room).await?;
    let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let (events_tx, events_rx) = mpsc::channel(config.limits.event_queue);
    let (ready_tx, ready_rx) = oneshot::channel();
    let listen_addr = boot.listen_addr;
    let mut contacts = boot.contacts;
    for addr in &config.peers {
        if !contacts.iter().any(|c| c.addr == *addr) {
            contacts.push(types::Contact { addr: *addr, known: None });
        }
    }
    let listed = contacts.len();
    let holding = history_after.is_some();
    tokio::spawn(actor::run(actor::Setup {
        name: config.name.clone(),
        room: wire_room,
        limits: config.limits.clone(),
        listener: boot.listener,
        tracker: boot.tracker,
        tracker_link: boot.tracker_link,
        log: log.clone(),
        history: config.history.clone(),
        history_after,
        remembered,
        joined_via_tracker: config.tracker.is_some(),
        contacts,
        commands: commands_rx,
        events: events_tx,
        ready: ready_tx,
        private: config.private.clone(),
        identity: identity.clone(),
        known_keys,
    }));
    let connected = ready_rx.await.map_err(|_| PeerError::Closed)?;
    let handle = PeerHandle { commands, log, fingerprint: identity.fingerprint(), room: config.room, listen_addr };
    let events = Events::new(events_rx, holding);
    Ok((handle, events, JoinReport { listen_addr, listed, connected }))
}

impl PeerHandle {
    pub fn room(&self) -> &str {
        &self.room
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// The fingerprint of this user's key, for people to compare.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Send one line to every connected peer; returns how many peers it was queued for.
    pub async fn send(&self, text: &str) -> Result<usize, PeerError> {
        chat::validate_text(text)?;
        let text = text.to_owned();
        self.ask(|reply| actor::Command::Send { text, reply: Some(reply) }).await
    }

    /// Send one line to every connected peer without waiting for the peer's task to take it: for a
    /// program that sends many lines (a bot, a bridge), each `send` would wait for that task to be
    /// scheduled. Lines go out in the order they were sent or posted. Waits only while
    /// [`COMMAND_QUEUE`] commands are queued; see [`PeerHandle::try_post`] to never wait.
    pub async fn post(&self, text: &str) -> Result<(), PeerError> {
        let command = Self::post_command(text)?;
        self.commands.send(command).await.map_err(|_| PeerError::Closed)
    }

    /// [`PeerHandle::post`] if the command queue has room; `Ok(false)` (nothing sent) if it is full.
    pub fn try_post(&self, text: &str) -> Result<bool, PeerError> {
        match self.commands.try_send(Self::post_command(text)?) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(_)) => Ok(false),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PeerError::Closed),
        }
    }

    fn post_command(text: &str) -> Result<actor::Command, PeerError> {
        chat::validate_text(text)?;
        Ok(actor::Command::Send { text: text.to_owned(), reply: None })
    }

    /// The room's messages from our own log, oldest first: the newest `limit` of them said before
    /// `before` (all when `None`).
    pub async fn history(&self, limit: usize, before: Option<Key>) -> Result<Vec<Record>, PeerError> {
        Ok(self.log.query(Query { before, ..Query::latest(limit) }).await?)
    }

    /// Our current name.
    pub async fn name(&self) -> Result<String, PeerError> {
        self.ask(|reply| actor::Command::Name { reply }).await
    }

    /// Change our name: announced to p2pchat peers; original peers see it in the next line's prefix.
    pub async fn nick(&self, name: &str) -> Result<(), PeerError> {
        chat::validate_name(name)?;
        let name = name.to_owned();
        self.ask(|reply| actor::Command::Nick { name, reply }).await
    }

    /// Tie member `name` to the key with `fingerprint` it proves now (private rooms: a genuine new
    /// key, after the warning that it changed).
    pub async fn trust(&self, name: &str, fingerprint: &str) -> Result<(), PeerError> {
        let (name, fingerprint) = (name.to_owned(), fingerprint.to_owned());
        self.ask(|reply| actor::Command::Trust { name, fingerprint, reply }).await?.map_err(PeerError::NotTrusted)
    }

    /// Forget the key `name` was tied to (the next one it proves is taken); false if it had none.
    pub async fn untrust(&self, name: &str) -> Result<bool, PeerError> {
        let name = name.to_owned();
        self.ask(|reply| actor::Command::Untrust { name, reply }).await
    }

    pub async fn status(&self) -> Result<Status, PeerError> {
        self.ask(|reply| actor::Command::Status { reply }).await
    }

    /// The members we currently hold a connection to.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, PeerError> {
        self.ask(|reply| actor::Command::Peers { reply }).await
    }

    /// Leave the room: queued lines get a short grace period to be written, then every connection closes.
    /// Closing twice is fine.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(actor::Command::Close { reply }).await.is_ok() {
            let _ = done.await;
        }
        // The actor answers just before it ends; once this returns, `is_closed` is true (bounded, in
        // case the task is somehow stuck: closing must never hang the caller).
        let _ = tokio::time::timeout(Duration::from_secs(5), self.commands.closed()).await;
    }

    /// Whether the peer has stopped (closed, or every other handle dropped).
    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> actor::Command) -> Result<T, PeerError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).await.map_err(|_| PeerError::Closed)?;
        answer.await.map_err(|_| PeerError::Closed)
    }
}
