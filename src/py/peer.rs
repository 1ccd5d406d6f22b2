//! `p2pchat.Peer` and the event classes it yields.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::awaitables::future_into_py;
use super::{
    activate, register_live, runtime, seconds, wait, Closable, Count, InvalidInput, P2PChatError, PeerClosed, Port,
    Rate,
};
use crate::history::store::{Key, Location, Record};
use crate::peer::{self, Event, Events, JoinReport, PeerConfig, PeerError, PeerHandle, Protocol};
use crate::private::RoomKey;
use crate::wire::chat;

type SharedEvents = Arc<tokio::sync::Mutex<Events>>;

fn py_addr(addr: SocketAddr) -> (String, u16) {
    (addr.ip().to_string(), addr.port())
}

/// An optional string as Python would write it in a repr.
fn repr_opt(value: &Option<String>) -> String {
    value.as_ref().map_or_else(|| "None".to_owned(), |v| format!("{v:?}"))
}

/// A chat message received from another member.
#[pyclass(frozen, name = "Message", module = "p2pchat._core")]
pub struct PyMessage {
    /// The sender's name from its `<NAME> :: ` prefix (None for bytes that came before any prefix).
    #[pyo3(get)]
    sender: Option<String>,
    /// What it says: one line, without its end-of-line.
    #[pyo3(get)]
    text: String,
    /// Kept as it came and written out only when asked for: most applications never read it.
    arrived_on: Option<SocketAddr>,
    /// When it was received, in seconds since the epoch (as `time.time()`).
    #[pyo3(get)]
    received_at: f64,
    /// True for the later part of a message whose bytes arrived after a pause (the original protocol has
    /// no message boundaries; see docs/python-api.md).
    #[pyo3(get)]
    continued: bool,
    /// The message's unique id (messages from p2pchat peers; None from original peers).
    #[pyo3(get)]
    id: Option<String>,
    /// When the sender says it sent it, in seconds since the epoch (p2pchat peers; the sender's clock).
    #[pyo3(get)]
    sent_at: Option<f64>,
    /// Its place in the room's order, which every p2pchat peer agrees on: sort by `(stamp, id)`.
    #[pyo3(get)]
    stamp: Option<u64>,
    /// True when it was said before it reached us: history on join, a catch-up after a gap, or a
    /// message read from the local log.
    #[pyo3(get)]
    history: bool,
    /// True when its author signed it and the signature was checked (private rooms, whose messages
    /// also travel encrypted); False in open rooms, where a name proves nothing.
    #[pyo3(get)]
    signed: bool,
}

#[pymethods]
impl PyMessage {
    /// The `(ip, port)` of the connection it arrived on (None for a message read from the local log).
    #[getter]
    fn address(&self) -> Option<(String, u16)> {
        self.arrived_on.map(py_addr)
    }

    fn __repr__(&self) -> String {
        let history = if self.history { ", history=True" } else { "" };
        format!(
            "Message(sender={}, text={:?}, address={:?}{history})",
            repr_opt(&self.sender),
            self.text,
            self.address()
        )
    }

    fn __str__(&self) -> String {
        match &self.sender {
            Some(sender) => format!("<{sender}> :: {}", self.text),
            None => self.text.clone(),
        }
    }

    /// `case Message(sender, text):` matches these two by position.
    #[classattr]
    fn __match_args__() -> (&'static str, &'static str) {
        ("sender", "text")
    }

    /// Two messages with ids (from p2pchat peers) are equal when their ids are: the same message
    /// received live and again as history, or from the log, is one message. A message without an id
    /// (an original peer's line, which carries none) is equal only to itself. (A comparison with
    /// anything but a Message gives NotImplemented: the other side decides.)
    fn __eq__(slf: &Bound<'_, Self>, other: &Bound<'_, Self>) -> bool {
        match (&slf.get().id, &other.get().id) {
            (Some(id), Some(other_id)) => id == other_id,
            _ => slf.is(other),
        }
    }

    /// Consistent with `__eq__`: the id's hash, or the object's identity when there is no id.
    fn __hash__(slf: &Bound<'_, Self>) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        match &slf.get().id {
            Some(id) => id.hash(&mut hasher),
            None => (slf.as_ptr() as usize).hash(&mut hasher),
        }
        hasher.finish()
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::P2pchat => "p2pchat",
        Protocol::Original => "original",
    }
}

/// A member joined the room (a link to it opened and we know what it speaks).
#[pyclass(frozen, get_all, name = "PeerJoined", module = "p2pchat._core")]
pub struct PyPeerJoined {
    /// Where it accepts connections (or, for an original peer that dialled us, its connection's address).
    address: (String, u16),
    /// Its name: from its hello (p2pchat peers); None for an original peer until it says something.
    name: Option<String>,
    /// "p2pchat" or "original".
    protocol: &'static str,
    /// True when we dialled it, False when it dialled us.
    outgoing: bool,
    /// The member that passes its messages to us (we cannot reach it directly); None for a direct link.
    relayed_by: Option<(String, u16)>,
    /// True on a private room's encrypted, authenticated link.
    encrypted: bool,
    /// The identity key it proved (private rooms): 32 hex digits in groups of four; else None.
    fingerprint: Option<String>,
    /// True when its name had another key when you first met it in this room: perhaps someone else.
    key_changed: bool,
}

#[pymethods]
impl PyPeerJoined {
    fn __repr__(&self) -> String {
        format!("PeerJoined(address={:?}, name={}, protocol={:?})", self.address, repr_opt(&self.name), self.protocol)
    }
}

/// A member left the room.
#[pyclass(frozen, get_all, name = "PeerLeft", module = "p2pchat._core")]
pub struct PyPeerLeft {
    /// Its `(ip, port)`, as `PeerJoined` gave it.
    address: (String, u16),
    /// Its name when it left (None for an original peer that never said a line).
    name: Option<String>,
    /// Why, in words: "left" when it said goodbye (`clean`), else what ended the link.
    reason: String,
    /// True when it said goodbye (a p2pchat peer leaving on purpose), False when the link was lost.
    clean: bool,
}

#[pymethods]
impl PyPeerLeft {
    fn __repr__(&self) -> String {
        format!("PeerLeft(address={:?}, name={}, reason={:?})", self.address, repr_opt(&self.name), self.reason)
    }
}

/// A member is known by a new name: a p2pchat peer's `/nick`, or an original peer's first prefix
/// (then `old` is None).
#[pyclass(frozen, get_all, name = "PeerRenamed", module = "p2pchat._core")]
pub struct PyPeerRenamed {
    /// Its `(ip, port)`, as `PeerJoined` gave it.
    address: (String, u16),
    /// The name it had (None: an original peer, named now by its first line).
    old: Option<String>,
    /// The name it has now.
    new: String,
}

#[pymethods]
impl PyPeerRenamed {
    fn __repr__(&self) -> String {
        format!("PeerRenamed(address={:?}, old={}, new={:?})", self.address, repr_opt(&self.old), self.new)
    }
}

/// Something the user should know that is not about one message (a refused link, a lost tracker).
#[pyclass(frozen, get_all, name = "Notice", module = "p2pchat._core")]
pub struct PyNotice {
    /// What happened, in a sentence for the user.
    text: String,
}

#[pymethods]
impl PyNotice {
    fn __repr__(&self) -> String {
        format!("Notice({:?})", self.text)
    }
}

/// The history asked for on join is in: `received` messages came before this event (0 when nobody
/// had any or nobody could be asked); live messages that arrived meanwhile come after it.
#[pyclass(frozen, get_all, name = "HistorySynced", module = "p2pchat._core")]
pub struct PyHistorySynced {
    /// How many earlier messages arrived (0 when nobody had any, or nobody could be asked).
    received: usize,
}

#[pymethods]
impl PyHistorySynced {
    fn __repr__(&self) -> String {
        format!("HistorySynced(received={})", self.received)
    }
}

/// A member this peer holds a connection to.
#[pyclass(frozen, get_all, name = "PeerInfo", module = "p2pchat._core")]
pub struct PyPeerInfo {
    /// Where it accepts connections, `(ip, port)` (for an original peer that dialled us: its
    /// connection's address).
    address: (String, u16),
    /// Its name (None for an original peer that has not said a line yet).
    name: Option<String>,
    /// True when we dialled it, False when it dialled us.
    outgoing: bool,
    /// "p2pchat", "original", or None while an accepted connection has not shown what it speaks.
    protocol: Option<&'static str>,
    /// The member that passes its messages to us (we cannot reach it directly); None for a direct link.
    relayed_by: Option<(String, u16)>,
    /// True on a private room's encrypted, authenticated link.
    encrypted: bool,
    /// The identity key it proved (private rooms); else None.
    fingerprint: Option<String>,
    /// True when its name had another key when you first met it in this room.
    key_changed: bool,
}

#[pymethods]
impl PyPeerInfo {
    fn __repr__(&self) -> String {
        format!("PeerInfo(address={:?}, name={})", self.address, repr_opt(&self.name))
    }
}

#[derive(IntoPyObject)]
enum PyEvent {
    Message(PyMessage),
    Joined(PyPeerJoined),
    Left(PyPeerLeft),
    Renamed(PyPeerRenamed),
    Notice(PyNotice),
    HistorySynced(PyHistorySynced),
}

fn epoch_seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl From<Event> for PyEvent {
    fn from(event: Event) -> Self {
        match event {
            Event::Message(m) => PyEvent::Message(PyMessage {
                sender: m.sender,
                text: m.text,
                arrived_on: Some(m.from),
                received_at: epoch_seconds(m.received_at),
                continued: !m.starts_message,
                id: m.id,
                sent_at: m.sent_at.map(epoch_seconds),
                stamp: m.stamp,
                history: m.history,
                signed: m.signed,
            }),
            Event::Joined { addr, name, protocol, outgoing, relayed_by, encrypted, fingerprint, key_changed } => {
                PyEvent::Joined(PyPeerJoined {
                    address: py_addr(addr),
                    name,
                    protocol: protocol_name(protocol),
                    outgoing,
                    relayed_by: relayed_by.map(py_addr),
                    encrypted,
                    fingerprint,
                    key_changed,
                })
            }
            Event::Left { addr, name, reason, clean } => {
                PyEvent::Left(PyPeerLeft { address: py_addr(addr), name, reason, clean })
            }
            Event::Renamed { addr, old, new } => PyEvent::Renamed(PyPeerRenamed { address: py_addr(addr), old, new }),
            Event::Notice { text } => PyEvent::Notice(PyNotice { text }),
            Event::HistorySynced { received } => PyEvent::HistorySynced(PyHistorySynced { received }),
        }
    }
}

enum Stage {
    New,
    Joining,
    Joined { handle: PeerHandle, events: SharedEvents, report: JoinReport },
}

struct Core {
    state: Mutex<Stage>,
}

impl Core {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Stage>> {
        self.state.lock().map_err(|_| P2PChatError::new_err("internal state poisoned"))
    }

    fn start_joining(&self) -> PyResult<()> {
        let mut state = self.lock()?;
        match *state {
            Stage::New => {
                *state = Stage::Joining;
                Ok(())
            }
            Stage::Joining => Err(P2PChatError::new_err("this peer is already joining")),
            Stage::Joined { .. } => {
                Err(P2PChatError::new_err("this peer has already joined; create a new Peer to join again"))
            }
        }
    }

    fn finish_joining(&self, result: Result<(PeerHandle, Events, JoinReport), PeerError>) -> PyResult<()> {
        let mut state = self.lock()?;
        match result {
            Ok((handle, events, report)) => {
                *state = Stage::Joined { handle, events: Arc::new(tokio::sync::Mutex::new(events)), report };
                Ok(())
            }
            Err(err) => {
                *state = Stage::New;
                Err(err.into())
            }
        }
    }

    fn joined(&self) -> PyResult<(PeerHandle, SharedEvents)> {
        match &*self.lock()? {
            Stage::Joined { handle, events, .. } => Ok((handle.clone(), events.clone())),
            _ => Err(PeerClosed::new_err("this peer has not joined a room yet; call join() first")),
        }
    }

    /// The joined peer's events, without making an exception when there are none (see `next_event_blocking`).
    fn events(&self) -> Option<SharedEvents> {
        match self.state.lock().as_deref() {
            Ok(Stage::Joined { events, .. }) => Some(events.clone()),
            _ => None,
        }
    }

    fn is_joined(&self) -> bool {
        matches!(self.state.lock().as_deref(), Ok(Stage::Joined { .. }))
    }
}

impl Closable for Core {
    fn close_blocking(&self) {
        let handle = match self.state.lock().as_deref() {
            Ok(Stage::Joined { handle, .. }) => handle.clone(),
            _ => return,
        };
        runtime().block_on(handle.close());
    }
}

/// An event that is already waiting (the next message when `messages_only`), taken without spawning a
/// task or releasing the GIL: under load this is how most events are picked up. `None` when nothing is
/// waiting or another caller is taking events right now.
fn ready_event(events: &SharedEvents, messages_only: bool) -> Option<Result<Event, PeerError>> {
    let mut events = events.try_lock().ok()?;
    loop {
        match events.try_recv() {
            Ok(Some(event @ Event::Message(_))) => return Some(Ok(event)),
            Ok(Some(event)) if !messages_only => return Some(Ok(event)),
            Ok(Some(_)) => continue,
            Ok(None) => return None,
            Err(closed) => return Some(Err(closed)),
        }
    }
}

/// The next message, waiting at most `timeout`: as `next_event_blocking`.
fn next_message(
    py: Python<'_>,
    events: SharedEvents,
    timeout: Option<Duration>,
) -> PyResult<Result<Option<PyMessage>, PeerError>> {
    Ok(next_event_blocking(py, events, timeout, true)?.map(|event| match event.map(PyEvent::from) {
        Some(PyEvent::Message(message)) => Some(message),
        // `messages_only` lets nothing else through.
        _ => None,
    }))
}

/// The next event, or the next message when `messages_only`: `Ok(Ok(None))` on timeout, `Ok(Err(Closed))`
/// once the peer is closed and everything was taken, and `Err` only for a signal's exception.
///
/// The peer's outcome stays a Rust error so that iterators can end on `Closed` without making a Python
/// exception: a daemon thread in `for m in peer` wakes when `atexit` closes the peer, and a `PyErr`
/// inspected then is normalized with the GIL released for a moment, long enough for the interpreter to
/// begin finalizing, after which pyo3 panics rather than attach again.
fn next_event_blocking(
    py: Python<'_>,
    events: SharedEvents,
    timeout: Option<Duration>,
    messages_only: bool,
) -> PyResult<Result<Option<Event>, PeerError>> {
    if let Some(ready) = ready_event(&events, messages_only) {
        return Ok(ready.map(Some));
    }
    wait(py, next_event(events, timeout, messages_only))
}

/// The next event, or the next message when `messages_only`; `Ok(None)` on timeout, `Err(Closed)` once
/// the peer is closed and everything was taken.
async fn next_event(
    events: SharedEvents,
    timeout: Option<Duration>,
    messages_only: bool,
) -> Result<Option<Event>, PeerError> {
    let take = async {
        let mut events = events.lock().await;
        loop {
            match events.recv().await {
                Some(event @ Event::Message(_)) => return Ok(event),
                Some(event) if !messages_only => return Ok(event),
                Some(_) => continue,
                None => return Err(PeerError::Closed),
            }
        }
    };
    match timeout {
        Some(limit) => match tokio::time::timeout(limit, take).await {
            Ok(result) => result.map(Some),
            Err(_) => Ok(None),
        },
        None => take.await.map(Some),
    }
}

/// A chat peer. Create it, then `join()` (or `await join_async()`, or use it as a context manager):
/// it listens on a port, asks the tracker at `server:port` who is in the room, and connects to everyone.
///
/// `room` picks a room ("" is the default room, shared with original peers). `peers` lists members to
/// dial directly, as `(host, port)` or `"host:port"`; with `server=None` they are the only way in.
/// `listen` fixes the port to listen on (for a port forwarded on a router); by default the system picks
/// one. `max_message_rate` is how many messages per second (after a burst of three times that) one
/// member may send before this peer mutes it (default 200; raise it for rooms of bots). Names are 1 to
/// 40 characters without `>`.
///
/// History: the room's messages are logged in `data_dir` (default: `default_data_dir()`); with
/// `save_history=False` nothing is written to disk (this session's messages are kept in memory). On
/// join, the first p2pchat member reached is asked for the newest `history` messages we do not have
/// (0: ask nothing); they arrive as messages with `history=True`, before live ones.
#[pyclass(frozen, name = "Peer", module = "p2pchat._core", weakref)]
pub struct PyPeer {
    config: PeerConfig,
    core: Arc<Core>,
    /// Our name as last set (the actor has the authoritative copy).
    name: Mutex<String>,
}

/// Every event of a peer (`Peer.events()`), blocking or async; it ends when the peer closes.
#[pyclass(frozen, name = "EventStream", module = "p2pchat._core")]
pub struct PyEventStream {
    events: SharedEvents,
}

#[pymethods]
impl PyEventStream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match next_event_blocking(py, self.events.clone(), None, false)? {
            Ok(Some(event)) => Ok(Some(PyEvent::from(event).into_pyobject(py)?.unbind())),
            Ok(None) | Err(PeerError::Closed) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        anext_event(py, self.events.clone(), false)
    }
}

/// An awaitable of the next event (or message, when `messages_only`) that ends an `async for` with
/// `StopAsyncIteration` once the peer is closed.
fn anext_event(py: Python<'_>, events: SharedEvents, messages_only: bool) -> PyResult<Bound<'_, PyAny>> {
    future_into_py(py, async move {
        match next_event(events, None, messages_only).await {
            Ok(Some(event)) => Ok(PyEvent::from(event)),
            Ok(None) | Err(_) => Err(PyStopAsyncIteration::new_err(())),
        }
    })
}

/// Where the message log is kept unless `data_dir` says otherwise: `$P2PCHAT_DATA_DIR`, else the
/// platform's per-user data directory (`~/.local/share/p2pchat` on Linux).
#[pyfunction]
pub fn default_data_dir() -> std::path::PathBuf {
    crate::history::default_dir()
}

/// A new private room called `room`, under a random 256-bit key: its invite code, to give as `secret`
/// (to this peer and to everyone invited). Unlike a passphrase, nothing on the wire lets anyone guess it.
#[pyfunction]
pub fn new_invite_code(room: &str) -> PyResult<String> {
    let key = RoomKey::generate(room).map_err(|e| InvalidInput::new_err(e.to_string()))?;
    Ok(key.invite_code())
}

/// A position in the room's order from a `Message` or from seconds since the epoch.
fn position(value: &Bound<'_, PyAny>) -> PyResult<Key> {
    if let Ok(message) = value.cast::<PyMessage>() {
        let message = message.get();
        let stamp =
            message.stamp.ok_or_else(|| InvalidInput::new_err("this message has no place in the room's order"))?;
        return Ok(Key { stamp, id: message.id.clone().unwrap_or_default() });
    }
    let seconds: f64 = value
        .extract()
        .map_err(|_| InvalidInput::new_err("before must be a Message or a time in seconds since the epoch"))?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(InvalidInput::new_err(format!("before must be a time after 1970, not {seconds}")));
    }
    Ok(Key { stamp: crate::protocol::stamp_at((seconds * 1000.0) as u64), id: String::new() })
}

/// A message read from the local log.
fn logged_message(record: Record) -> PyMessage {
    let sent_at = record.sent_at as f64 / 1000.0;
    PyMessage {
        sender: record.sender,
        text: record.text,
        arrived_on: None,
        received_at: sent_at,
        continued: false,
        id: record.shared.then_some(record.id),
        sent_at: record.shared.then_some(sent_at),
        stamp: Some(record.stamp),
        history: true,
        signed: record.sig.is_some(),
    }
}

/// `(host, port)`, `"host:port"` or `"[v6]:port"`: the host and the port, checked, not looked up.
fn host_and_port(value: &Bound<'_, PyAny>) -> PyResult<(String, u16)> {
    let Ok(text) = value.extract::<String>() else {
        return value.extract().map_err(|_| InvalidInput::new_err("a peer address is (host, port) or \"host:port\""));
    };
    // An IP address with its port, v4 or bracketed v6, as the standard library reads it.
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    if text.starts_with('[') {
        return Err(InvalidInput::new_err(format!("{text:?} is not [IPV6]:PORT")));
    }
    let (host, port) =
        text.rsplit_once(':').ok_or_else(|| InvalidInput::new_err(format!("{text:?} is not HOST:PORT")))?;
    let port = port.parse().map_err(|_| InvalidInput::new_err(format!("{port:?} in {text:?} is not a port")))?;
    if host.contains(':') || host.contains(']') || host.is_empty() {
        // "::1:7472" could split anywhere.
        return Err(InvalidInput::new_err(format!(
            "{text:?} is not HOST:PORT (an IPv6 address is written in brackets: \"[::1]:7472\")"
        )));
    }
    Ok((host.to_owned(), port))
}

/// Look `host` up with the GIL released: a slow resolver must not stop every other Python thread.
/// The error says why, for the caller to put in its own words.
pub(super) fn look_up(py: Python<'_>, host: &str, port: u16) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    py.detach(|| (host, port).to_socket_addrs().map(|mut addrs| addrs.next()))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "it has no address".to_owned())
}

#[pymethods]
impl PyPeer {
    #[new]
    #[pyo3(signature = (name, server = Some("127.0.0.1"), port = Port(crate::protocol::DEFAULT_PORT), *, listen = None, room = "", peers = Vec::new(),
                        max_message_rate = None, history = Count(100), data_dir = None, save_history = true, identity = None, secret = None))]
    // The signature Python shows (and stubtest checks `_core.pyi` against): the defaults above that are
    // not literals would show as `...`.
    #[pyo3(
        text_signature = "(name, server='127.0.0.1', port=7472, *, listen=None, room='', peers=(), max_message_rate=None, history=100, data_dir=None, save_history=True, identity=None, secret=None)"
    )]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments
    fn new(
        py: Python<'_>,
        name: &str,
        server: Option<&str>,
        port: Port,
        listen: Option<Port>,
        room: &str,
        peers: Vec<Bound<'_, PyAny>>,
        max_message_rate: Option<Rate>,
        history: Count,
        data_dir: Option<std::path::PathBuf>,
        save_history: bool,
        identity: Option<std::path::PathBuf>,
        secret: Option<String>,
    ) -> PyResult<Self> {
        activate(py)?;
        let (Port(port), listen, history) = (port, listen.map(|Port(p)| p), history.0);
        let max_message_rate = max_message_rate.map(|Rate(r)| r);
        chat::validate_name(name).map_err(|e| InvalidInput::new_err(e.to_string()))?;
        chat::validate_room(room).map_err(|e| InvalidInput::new_err(e.to_string()))?;
        let mut config = PeerConfig::new(name, "", port);
        config.tracker = match server {
            Some(host) if host.trim().is_empty() => {
                return Err(InvalidInput::new_err("server must be a host name or an IP address (or None)"))
            }
            Some(host) => Some(peer::TrackerAddr { host: host.to_owned(), port }),
            None => None,
        };
        let peers = peers.iter().map(host_and_port).collect::<PyResult<Vec<_>>>()?;
        config.peers = peers
            .iter()
            .map(|(host, port)| {
                look_up(py, host, *port)
                    .map_err(|why| InvalidInput::new_err(format!("cannot find {host}:{port}: {why}")))
            })
            .collect::<PyResult<_>>()?;
        if config.tracker.is_none() && config.peers.is_empty() {
            return Err(InvalidInput::new_err("nothing to join: give a server or at least one peer address"));
        }
        config.room = room.to_owned();
        if let Some(secret) = secret {
            // Argon2id takes a moment and 64 MiB: not while holding the GIL.
            let key =
                py.detach(|| RoomKey::from_secret(room, &secret)).map_err(|e| InvalidInput::new_err(e.to_string()))?;
            if key.name().is_empty() {
                return Err(InvalidInput::new_err(
                    "the default room cannot be private: give the private room a name (room=...)",
                ));
            }
            config.room = key.name().to_owned();
            config.private = Some(key);
        }
        config.listen_port = listen;
        match max_message_rate {
            Some(0) => return Err(InvalidInput::new_err("max_message_rate must be at least 1 message per second")),
            Some(rate) => config.limits.max_message_rate = rate,
            None => {}
        }
        config.history.ask_on_join = history;
        let data_dir = data_dir.unwrap_or_else(crate::history::default_dir);
        config.identity = Some(identity.unwrap_or_else(|| data_dir.join(crate::identity::FILE_NAME)));
        config.history.location = if save_history { Location::Dir(data_dir) } else { Location::Memory };
        let core = Arc::new(Core { state: Mutex::new(Stage::New) });
        let weak = Arc::downgrade(&core);
        register_live(weak);
        Ok(Self { config, core, name: Mutex::new(name.to_owned()) })
    }

    /// Join the room (blocking; Ctrl-C interrupts). Returns the peer itself.
    fn join(slf: Py<Self>, py: Python<'_>) -> PyResult<Py<Self>> {
        let this = slf.get();
        this.core.start_joining()?;
        let result = wait(py, peer::join(this.config.clone()));
        match result {
            Ok(joined) => this.core.finish_joining(joined)?,
            Err(interrupted) => {
                this.core.finish_joining(Err(PeerError::Closed)).ok();
                return Err(interrupted);
            }
        }
        Ok(slf)
    }

    /// `await peer.join_async()`: join without blocking the event loop. Resolves to the peer itself.
    fn join_async<'py>(slf: Py<Self>, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let this = slf.get();
        this.core.start_joining()?;
        let (config, core) = (this.config.clone(), this.core.clone());
        future_into_py(py, async move {
            core.finish_joining(peer::join(config).await)?;
            Ok(slf)
        })
    }

    /// Send one line to every connected peer, exactly as the original client does (`<NAME> :: text`).
    /// Returns how many peers it was written to. Raises `InvalidInput` for an empty text, a line break,
    /// or more than `MAX_TEXT_BYTES`.
    fn send(&self, py: Python<'_>, text: String) -> PyResult<usize> {
        let (handle, _) = self.core.joined()?;
        Ok(wait(py, async move { handle.send(&text).await })??)
    }

    /// Send one line to every connected peer without waiting for the peer's network task: `send` waits
    /// for that task to take the line and say how many peers it reached, which is one thread hand-off
    /// per line. For programs that send many lines (bots, bridges). Lines go out in the order they were
    /// sent or posted. Returns at once unless 256 lines or requests are already waiting (then it waits
    /// for room). Raises `InvalidInput` like `send`, and `PeerClosed` once the peer is closed.
    fn post(&self, py: Python<'_>, text: String) -> PyResult<()> {
        let (handle, _) = self.core.joined()?;
        if handle.try_post(&text)? {
            return Ok(());
        }
        Ok(wait(py, async move { handle.post(&text).await })??)
    }

    /// `await peer.send_async(text)`: like `send`.
    fn send_async<'py>(&self, py: Python<'py>, text: String) -> PyResult<Bound<'py, PyAny>> {
        let (handle, _) = self.core.joined()?;
        future_into_py(py, async move { Ok(handle.send(&text).await?) })
    }

    /// The next received message; waits up to `timeout` seconds (forever when None) and returns None if
    /// none came. Raises `PeerClosed` once the peer is closed and every message was taken.
    #[pyo3(signature = (timeout = None))]
    fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<PyMessage>> {
        let (_, events) = self.core.joined()?;
        let limit = seconds(timeout)?;
        next_message(py, events, limit)?.map_err(PyErr::from)
    }

    /// `await peer.recv_async()`: the next message; None after `timeout` seconds (None: wait as long as
    /// it takes); raises `PeerClosed` once the peer is closed. A message that arrives as `timeout`
    /// runs out waits for the next receive; a cancelled await may drop one handed over at that very
    /// moment (docs/python-api.md).
    #[pyo3(signature = (timeout = None))]
    fn recv_async<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        let (_, events) = self.core.joined()?;
        let limit = seconds(timeout)?;
        future_into_py(py, async move { Ok(next_event(events, limit, true).await?.map(PyEvent::from)) })
    }

    /// The next event of any kind: `Message`, `PeerJoined`, `PeerLeft`, `PeerRenamed` or `Notice`; None on
    /// timeout.
    #[pyo3(signature = (timeout = None))]
    fn recv_event(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Py<PyAny>>> {
        let (_, events) = self.core.joined()?;
        let limit = seconds(timeout)?;
        match next_event_blocking(py, events, limit, false)?? {
            Some(event) => Ok(Some(PyEvent::from(event).into_pyobject(py)?.unbind())),
            None => Ok(None),
        }
    }

    /// `await peer.recv_event_async()`: the next event of any kind; None after `timeout` seconds, as
    /// `recv_async`.
    #[pyo3(signature = (timeout = None))]
    fn recv_event_async<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        let (_, events) = self.core.joined()?;
        let limit = seconds(timeout)?;
        future_into_py(py, async move { Ok(next_event(events, limit, false).await?.map(PyEvent::from)) })
    }

    /// Every event, as an iterator (`for event in peer.events()`) and an async iterator
    /// (`async for event in peer.events()`); it ends when the peer closes.
    fn events(&self) -> PyResult<PyEventStream> {
        let (_, events) = self.core.joined()?;
        Ok(PyEventStream { events })
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyMessage>> {
        // A peer that is not joined (any more) ends the loop, like a closed one.
        let Some(events) = self.core.events() else {
            return Ok(None);
        };
        match next_message(py, events, None)? {
            Ok(message) => Ok(message),
            Err(PeerError::Closed) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (_, events) = self.core.joined()?;
        anext_event(py, events, true)
    }

    /// The room's messages from this peer's own log, oldest first: the newest `limit` of them said
    /// before `before` (a `Message`, to page back from it, or a time in seconds since the epoch).
    /// Every p2pchat member returns the messages they share in the same order.
    #[pyo3(signature = (limit = Count(100), before = None), text_signature = "($self, limit=100, before=None)")]
    fn history(&self, py: Python<'_>, limit: Count, before: Option<Bound<'_, PyAny>>) -> PyResult<Vec<PyMessage>> {
        let Count(limit) = limit;
        let (handle, _) = self.core.joined()?;
        let before = before.as_ref().map(position).transpose()?;
        let records = wait(py, async move { handle.history(limit, before).await })??;
        Ok(records.into_iter().map(logged_message).collect())
    }

    /// `await peer.history_async(limit, before)`: like `history`.
    #[pyo3(signature = (limit = Count(100), before = None), text_signature = "($self, limit=100, before=None)")]
    fn history_async<'py>(
        &self,
        py: Python<'py>,
        limit: Count,
        before: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let Count(limit) = limit;
        let (handle, _) = self.core.joined()?;
        let before = before.as_ref().map(position).transpose()?;
        future_into_py(py, async move {
            let records = handle.history(limit, before).await?;
            Ok(records.into_iter().map(logged_message).collect::<Vec<_>>())
        })
    }

    /// The members this peer is connected to, as `PeerInfo` objects.
    fn peers(&self, py: Python<'_>) -> PyResult<Vec<PyPeerInfo>> {
        let (handle, _) = self.core.joined()?;
        let peers = wait(py, async move { handle.peers().await })??;
        Ok(peers
            .into_iter()
            .map(|p| PyPeerInfo {
                address: py_addr(p.addr),
                name: p.name,
                outgoing: p.outgoing,
                protocol: p.protocol.map(protocol_name),
                relayed_by: p.relayed_by.map(py_addr),
                encrypted: p.encrypted,
                fingerprint: p.fingerprint,
                key_changed: p.key_changed,
            })
            .collect())
    }

    /// `(members, tracker)`: how many members this peer is linked to, and the tracker's state:
    /// "registered", "reconnecting" (a p2pchat tracker was lost), "original" (an original tracker, which
    /// keeps no connection) or "none" (joined through peers only).
    fn status(&self, py: Python<'_>) -> PyResult<(usize, &'static str)> {
        let (handle, _) = self.core.joined()?;
        let status = wait(py, async move { handle.status().await })??;
        let tracker = match status.tracker {
            peer::TrackerState::None => "none",
            peer::TrackerState::Original => "original",
            peer::TrackerState::Registered => "registered",
            peer::TrackerState::Reconnecting => "reconnecting",
        };
        Ok((status.members, tracker))
    }

    /// This peer's current name.
    #[getter]
    fn name(&self) -> String {
        self.name.lock().map(|n| n.clone()).unwrap_or_else(|_| self.config.name.clone())
    }

    /// The room this peer is in ("" is the default room).
    #[getter]
    fn room(&self) -> &str {
        &self.config.room
    }

    /// Change this peer's name: p2pchat members are told at once; original peers see it in the prefix of
    /// the next line. Raises `InvalidInput` for an unusable name.
    fn nick(&self, py: Python<'_>, name: String) -> PyResult<()> {
        let (handle, _) = self.core.joined()?;
        let new = name.clone();
        wait(py, async move { handle.nick(&new).await })??;
        if let Ok(mut current) = self.name.lock() {
            *current = name;
        }
        Ok(())
    }

    /// Tie member `name` to the key with `fingerprint` it proves now (a private room's member that
    /// genuinely changed keys, after the warning); raises `InvalidInput` if no such member proves
    /// that key on a link.
    fn trust(&self, py: Python<'_>, name: String, fingerprint: String) -> PyResult<()> {
        let (handle, _) = self.core.joined()?;
        Ok(wait(py, async move { handle.trust(&name, &fingerprint).await })??)
    }

    /// Forget the key member `name` was tied to here (the next key it proves is taken); False if
    /// it had none.
    fn untrust(&self, py: Python<'_>, name: String) -> PyResult<bool> {
        let (handle, _) = self.core.joined()?;
        Ok(wait(py, async move { handle.untrust(&name).await })??)
    }

    /// The `(host, port)` this peer listens on (None before `join`).
    #[getter]
    fn address(&self) -> PyResult<Option<(String, u16)>> {
        Ok(match &*self.core.lock()? {
            Stage::Joined { handle, .. } => Some(py_addr(handle.listen_addr())),
            _ => None,
        })
    }

    /// The fingerprint of this user's key (32 hex digits in groups of four), for people to compare;
    /// None before `join`.
    #[getter]
    fn fingerprint(&self) -> PyResult<Option<String>> {
        Ok(match &*self.core.lock()? {
            Stage::Joined { handle, .. } => Some(handle.fingerprint().to_owned()),
            _ => None,
        })
    }

    /// Whether the room is private (a `secret` was given): its links are encrypted and only holders of
    /// its key can join.
    #[getter]
    fn private(&self) -> bool {
        self.config.private.is_some()
    }

    /// For a private room, a code that lets someone join without the secret (it carries the room's
    /// key: share it only with people you invite); None for an open room.
    #[getter]
    fn invite_code(&self) -> Option<String> {
        self.config.private.as_ref().map(RoomKey::invite_code)
    }

    /// `(reached, listed)` at join: how many of the peers the tracker listed were reached at once.
    #[getter]
    fn join_result(&self) -> PyResult<Option<(usize, usize)>> {
        Ok(match &*self.core.lock()? {
            Stage::Joined { report, .. } => Some((report.connected, report.listed)),
            _ => None,
        })
    }

    /// True once the peer was closed.
    #[getter]
    fn closed(&self) -> PyResult<bool> {
        Ok(match &*self.core.lock()? {
            Stage::Joined { handle, .. } => handle.is_closed(),
            _ => false,
        })
    }

    /// Leave the room: lines already sent get up to a second to be written, then every connection
    /// closes. Closing twice, or closing a peer that never joined, is fine.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let Ok((handle, _)) = self.core.joined() else { return Ok(()) };
        wait(py, async move { handle.close().await })
    }

    /// `await peer.close_async()`: like `close`.
    fn close_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let handle = self.core.joined().ok().map(|(handle, _)| handle);
        future_into_py(py, async move {
            if let Some(handle) = handle {
                handle.close().await;
            }
            Ok(())
        })
    }

    fn __enter__(slf: Py<Self>, py: Python<'_>) -> PyResult<Py<Self>> {
        if slf.get().core.is_joined() {
            return Ok(slf);
        }
        Self::join(slf, py)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __aenter__<'py>(slf: Py<Self>, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if slf.get().core.is_joined() {
            return future_into_py(py, async move { Ok(slf) });
        }
        Self::join_async(slf, py)
    }

    #[pyo3(signature = (*_exc))]
    fn __aexit__<'py>(&self, py: Python<'py>, _exc: &Bound<'py, PyTuple>) -> PyResult<Bound<'py, PyAny>> {
        self.close_async(py)
    }

    fn __repr__(&self) -> String {
        let state = match self.core.state.lock().as_deref() {
            Ok(Stage::Joined { handle, .. }) if handle.is_closed() => "closed".to_owned(),
            Ok(Stage::Joined { handle, .. }) => format!("listening on {}", handle.listen_addr()),
            Ok(Stage::Joining) => "joining".to_owned(),
            _ => "not joined".to_owned(),
        };
        format!("<p2pchat.Peer {:?} {state}>", self.config.name)
    }
}
