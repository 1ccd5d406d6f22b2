//! The tracker: tells each newcomer who is already in the room, in the original tracker's format.
//!
//! One task (`run`) owns the listener and the [`Registry`]; nothing else touches them, so no lock is
//! needed. Each accepted connection gets a short task that asks the owner, over a bounded channel with a
//! oneshot reply, for its list (which admits it), writes it and closes. A [`TrackerHandle`] asks the same
//! way.
//!
//! The bytes of the exchange are the original's: the list, nothing else. Two things differ, both so an
//! unmodified original client works on Linux:
//! * the list is written after a short grace period (`answer_after`) instead of at once: a reset that
//!   lands before the client's own `connect()` has returned makes that `connect()` fail with
//!   `ECONNRESET`, and on loopback our answer can be that fast;
//! * the exchange ends with data and FIN in one segment, and a reset that frees the client's socket
//!   (see [`crate::net::write_and_end`]), so it is gone when the client binds its listener to the same
//!   port, which the original tracker's lingering connection made impossible.
//!
//! The first bytes decide what a connection is (an original client never writes to the tracker):
//! * nothing within the grace period: an original client, served as above, listed in the default room;
//! * the p2pchat [`MAGIC`](crate::protocol::MAGIC) and a `hello`: a p2pchat peer registering. It
//!   gets a `welcome` frame with its room's members (each marked p2pchat or original) and stays
//!   registered while it keeps this control connection open;
//! * the magic and a `hello` with a `name`: a member's link to the tracker's relay, when it relays
//!   (see `hub`); refused otherwise;
//! * anything else: junk, reset without being listed.

mod hub;
mod registry;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::protocol::{DEFAULT_PORT, DEFAULT_ROOM};
pub use registry::{Kind, Registry};

use crate::protocol::PROTOCOL_VERSION;
use crate::reading::{read_frame, read_opening, FrameReadError, Opened, Silence};
use crate::wire::chat::validate_room;
use crate::wire::frames::{self, Frame, FrameDecoder, Offers, Welcome};
use crate::wire::peer_list::LEGACY_LIST_BUDGET;

/// How long a registering peer has to finish its hello once the magic arrived.
const HELLO_WAIT: Duration = Duration::from_secs(5);
/// Room for one read of a registered peer: its pings are 19 bytes; a longer frame takes more reads.
const REGISTRATION_READ: usize = 512;

/// A tracker's settings: `TrackerConfig::listening_on(addr)` (or `default()`, on every interface at
/// port 7472), then any field set by assignment. Non-exhaustive: settings added later break no caller.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TrackerConfig {
    pub listen: SocketAddr,
    /// Addresses remembered at most; the oldest is forgotten first.
    pub max_entries: usize,
    /// Largest list sent to a client, in bytes (whole entries only).
    pub list_budget: usize,
    /// Connections being answered at once (before they are known as an original client's or a
    /// registration); one more is reset at once, so a flood cannot grow the tracker.
    pub max_connections: usize,
    /// How long writing a list to a client may take before the connection is dropped.
    pub write_timeout: Duration,
    /// How long after accepting a client the list is written (see the module docs).
    pub answer_after: Duration,
    /// p2pchat peers registered at once (each holds a connection open).
    pub max_registrations: usize,
    /// A peer that vanished leaves the list within about this long: a registration whose hello did
    /// not say `quiet` (it pings every 2 s) is dropped after this long without a word; a quiet one is
    /// watched by TCP keep-alive set to give up within it.
    pub registration_timeout: Duration,
    /// An original entry that no p2pchat member vouched for and that was not otherwise confirmed for
    /// this long is probed (a bare TCP connect, reset at once); it is dropped if the probe fails.
    pub original_ttl: Duration,
    /// How long a probe may take to connect.
    pub probe_timeout: Duration,
    /// Probes in flight at once.
    pub max_probes: usize,
    /// Relay between members that cannot reach each other (see `hub`). Off by default: the tracker
    /// then never carries a chat message.
    pub relay: bool,
}

impl TrackerConfig {
    /// The defaults, listening on `listen` (port 0: any free port, see `Tracker::local_addr`).
    pub fn listening_on(listen: SocketAddr) -> Self {
        Self { listen, ..Self::default() }
    }
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            max_entries: 16_384,
            list_budget: LEGACY_LIST_BUDGET,
            max_connections: 1024,
            write_timeout: Duration::from_secs(5),
            answer_after: Duration::from_millis(150),
            max_registrations: 16_000,
            registration_timeout: Duration::from_secs(6),
            original_ttl: Duration::from_secs(45),
            probe_timeout: Duration::from_secs(3),
            max_probes: 32,
            relay: false,
        }
    }
}

#[derive(Debug, Error)]
pub enum TrackerError {
    #[error("port {port} is already in use on {host}; stop the other tracker or choose another port")]
    AddressInUse { host: std::net::IpAddr, port: u16 },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("the tracker has stopped")]
    Stopped,
}

enum Query {
    Members {
        room: String,
        reply: oneshot::Sender<Vec<(SocketAddr, Kind)>>,
    },
    /// Remember this original client and give the list to send it.
    AdmitOriginal {
        addr: SocketAddr,
        reply: oneshot::Sender<Vec<u8>>,
    },
    Register {
        room: String,
        addr: SocketAddr,
        /// Its hello said `quiet`: it will not ping (see `serve_registration`).
        quiet: bool,
        /// Frames for this registration's peer (punch requests from others).
        to_peer: mpsc::Sender<Vec<u8>>,
        reply: oneshot::Sender<(Welcome, registry::Registration)>,
    },
    /// The registered peer `from` cannot reach the member at `target`: ask `target` to dial it.
    PunchRequest {
        room: String,
        from: SocketAddr,
        target: SocketAddr,
    },
    Deregister {
        room: String,
        addr: SocketAddr,
        registration: registry::Registration,
    },
    /// A p2pchat member of the default room holds live links to these original peers.
    Vouch {
        originals: Vec<SocketAddr>,
    },
    Probed {
        addr: SocketAddr,
        alive: bool,
    },
}

/// A bound tracker, ready to [`run`](Tracker::run).
pub struct Tracker {
    listener: TcpListener,
    config: TrackerConfig,
    queries: mpsc::Receiver<Query>,
    handle: TrackerHandle,
}

/// A cheap handle to ask a running tracker what it knows.
#[derive(Clone, Debug)]
pub struct TrackerHandle {
    queries: mpsc::Sender<Query>,
    local_addr: SocketAddr,
}

impl TrackerHandle {
    /// The address the tracker listens on (with the real port when it was bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The members of `room` ("" is the default room), oldest first.
    pub async fn members(&self, room: &str) -> Result<Vec<(SocketAddr, Kind)>, TrackerError> {
        let room = room.to_owned();
        self.ask(|reply| Query::Members { room, reply }).await
    }

    async fn admit_original(&self, addr: SocketAddr) -> Result<Vec<u8>, TrackerError> {
        self.ask(|reply| Query::AdmitOriginal { addr, reply }).await
    }

    async fn ask<T>(&self, query: impl FnOnce(oneshot::Sender<T>) -> Query) -> Result<T, TrackerError> {
        let (reply, answer) = oneshot::channel();
        self.queries.send(query(reply)).await.map_err(|_| TrackerError::Stopped)?;
        answer.await.map_err(|_| TrackerError::Stopped)
    }
}

impl Tracker {
    /// Bind the listening socket. Errors here are the user's to fix (port in use, bad address).
    pub async fn bind(config: TrackerConfig) -> Result<Self, TrackerError> {
        let addr = config.listen;
        let bound = (|| {
            let socket =
                if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            // SO_REUSEADDR only: a restarted tracker may rebind past TIME_WAIT, but two trackers can never
            // share the port (no SO_REUSEPORT here).
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(1024)
        })();
        let listener = bound.map_err(|source| match source.kind() {
            io::ErrorKind::AddrInUse => TrackerError::AddressInUse { host: addr.ip(), port: addr.port() },
            _ => TrackerError::Bind { addr, source },
        })?;
        let local_addr = listener.local_addr().map_err(|source| TrackerError::Bind { addr, source })?;
        let (tx, queries) = mpsc::channel(64);
        Ok(Self { listener, config, queries, handle: TrackerHandle { queries: tx, local_addr } })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr
    }

    pub fn handle(&self) -> TrackerHandle {
        self.handle.clone()
    }

    /// Serve until `shutdown` completes. Connections being served are dropped at shutdown.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Tracker { listener, config, mut queries, handle } = self;
        let mut registry = Registry::new(config.max_entries, config.list_budget);
        // Registered p2pchat peers: their room, their registration, and the way to send them frames.
        let mut registered_peers: HashMap<SocketAddr, (String, registry::Registration, mpsc::Sender<Vec<u8>>)> =
            HashMap::new();
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let registrations = Arc::new(Semaphore::new(config.max_registrations));
        let mut probes_in_flight = 0usize;
        let mut probe_tick =
            tokio::time::interval((config.original_ttl / 4).clamp(Duration::from_millis(20), Duration::from_secs(5)));
        let mut serving = JoinSet::new();
        let hub = config.relay.then(hub::HubHandle::start);
        tokio::pin!(shutdown);
        log::info!("tracker listening on {}", handle.local_addr);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(query) = queries.recv() => match query {
                    Query::Members { room, reply } => { let _ = reply.send(registry.members(&room)); }
                    Query::AdmitOriginal { addr, reply } => {
                        let list = registry.admit_original(addr, std::time::Instant::now());
                        log::debug!("{addr} joined; {} bytes of list; {} remembered", list.len(), registry.len());
                        let _ = reply.send(list);
                    }
                    Query::Register { room, addr, quiet, to_peer, reply } => {
                        let registered = registry.register(&room, addr, Offers { relay: config.relay, quiet });
                        registered_peers.insert(addr, (room.clone(), registered.1, to_peer));
                        log::debug!("{addr} registered in room {room:?}; answered with a {}-byte welcome", registered.0.byte_len());
                        let _ = reply.send(registered);
                    }
                    Query::PunchRequest { room, from, target } => {
                        // Only between registered p2pchat members of one room.
                        match registered_peers.get(&target).filter(|(r, _, _)| *r == room) {
                            Some((_, _, to_peer)) => {
                                log::debug!("asking {target} to dial {from} (a simultaneous open)");
                                let _ = to_peer.try_send(frames::encode(&Frame::Punch { addr: from.to_string() }));
                            }
                            None => log::debug!("{from} asked for a punch to {target}, which is not registered in its room"),
                        }
                    }
                    Query::Deregister { room, addr, registration } => {
                        if registered_peers.get(&addr).is_some_and(|(_, r, _)| *r == registration) {
                            registered_peers.remove(&addr);
                        }
                        registry.deregister(&room, addr, registration);
                        log::debug!("{addr} left room {room:?}");
                    }
                    Query::Vouch { originals } => registry.vouch(&originals, std::time::Instant::now()),
                    Query::Probed { addr, alive } => {
                        probes_in_flight -= 1;
                        registry.probed(addr, alive, std::time::Instant::now());
                        if !alive {
                            log::debug!("original peer {addr} did not answer a probe; forgotten");
                        }
                    }
                },
                _ = probe_tick.tick() => {
                    let room = config.max_probes.saturating_sub(probes_in_flight);
                    for addr in registry.due_for_probe(std::time::Instant::now(), config.original_ttl, room) {
                        probes_in_flight += 1;
                        serving.spawn(probe(addr, config.probe_timeout, handle.clone()));
                    }
                },
                accepted = listener.accept() => match accepted {
                    Ok((stream, remote)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            log::warn!("{remote} refused: already serving {} connections", config.max_connections);
                            crate::net::reset(stream);
                            continue;
                        };
                        let (handle, config, registrations, hub) = (handle.clone(), config.clone(), registrations.clone(), hub.clone());
                        serving.spawn(async move {
                            serve_client(stream, remote, handle, config, slot, registrations, hub).await;
                        });
                    }
                    Err(err) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        log::warn!("accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = serving.join_next() => {}
            }
        }
        log::info!("tracker stopped");
    }
}

/// Tell an original client from a registering p2pchat peer by its first bytes, and serve it.
async fn serve_client(
    mut stream: TcpStream,
    remote: SocketAddr,
    tracker: TrackerHandle,
    config: TrackerConfig,
    slot: tokio::sync::OwnedSemaphorePermit,
    registrations: Arc<Semaphore>,
    hub: Option<hub::HubHandle>,
) {
    let _ = stream.set_nodelay(true);
    let after_magic = match read_opening(&mut stream, config.answer_after).await {
        Opened::Silent => return serve_original(stream, remote, &tracker, &config).await,
        Opened::P2pchat(after_magic) => after_magic,
        Opened::Original => {
            log::debug!("{remote} sent bytes that are neither nothing nor a p2pchat hello; closing");
            return crate::net::reset(stream);
        }
        Opened::Closed(why) => return log::debug!("{remote}: {why}; not answered"),
    };
    drop(slot);
    let Ok(registration_slot) = registrations.try_acquire_owned() else {
        log::warn!("{remote} refused: {} peers already registered", config.max_registrations);
        return crate::net::reset(stream);
    };
    serve_registration(stream, remote, after_magic, &tracker, config.registration_timeout, hub).await;
    drop(registration_slot);
}

/// The original exchange: write the list and end the connection so the client can bind its port again
/// at once (see [`crate::net::write_and_end`]).
async fn serve_original(stream: TcpStream, remote: SocketAddr, tracker: &TrackerHandle, config: &TrackerConfig) {
    let Ok(list) = tracker.admit_original(remote).await else { return };
    match tokio::time::timeout(config.write_timeout, crate::net::write_and_end(stream, &list, Duration::from_secs(1)))
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(err)) => log::debug!("{remote} left before its list was written: {err}"),
        Err(_) => log::debug!("{remote} did not take its list within {:?}; dropped", config.write_timeout),
    }
}

/// A p2pchat peer's control connection: `hello` in, `welcome` out, registered until it closes. (Or a
/// member's link to the relay: a `hello` with a name.)
async fn serve_registration(
    mut stream: TcpStream,
    remote: SocketAddr,
    after_magic: Vec<u8>,
    tracker: &TrackerHandle,
    silence: Duration,
    hub: Option<hub::HubHandle>,
) {
    let mut decoder = FrameDecoder::new();
    decoder.feed(&after_magic);
    let hello = match read_frame(&mut stream, &mut decoder, Instant::now() + HELLO_WAIT).await {
        Ok(Frame::Hello(hello)) => hello,
        Ok(other) => {
            return refuse(stream, remote, frames::ERR_MALFORMED, format!("expected a hello, got {other:?}")).await
        }
        Err(FrameReadError::TimedOut) => {
            return refuse(stream, remote, frames::ERR_MALFORMED, format!("no whole frame within {HELLO_WAIT:?}")).await
        }
        Err(why) => return refuse(stream, remote, frames::ERR_MALFORMED, why.to_string()).await,
    };
    if hello.v != PROTOCOL_VERSION {
        let why = format!("this tracker speaks p2pchat protocol version {PROTOCOL_VERSION}, not {}", hello.v);
        return refuse(stream, remote, frames::ERR_VERSION, why).await;
    }
    if let Err(err) = validate_room(&hello.room) {
        return refuse(stream, remote, frames::ERR_ROOM, err.to_string()).await;
    }
    if hello.name.is_some() || hello.relay {
        return match hub {
            // Boxed: a relay link is rare, and its state inline would size every registration's task.
            Some(hub) => Box::pin(hub::serve_member(stream, remote, hello, decoder, hub, silence)).await,
            None => {
                refuse(
                    stream,
                    remote,
                    frames::ERR_MALFORMED,
                    "this tracker does not relay (its operator can turn that on with --relay)".to_owned(),
                )
                .await
            }
        };
    }
    let (room, quiet) = (hello.room, hello.quiet);
    let (reply, answer) = oneshot::channel();
    let (to_peer, mut for_peer) = mpsc::channel::<Vec<u8>>(16);
    let register = Query::Register { room: room.clone(), addr: remote, quiet, to_peer, reply };
    if tracker.queries.send(register).await.is_err() {
        return;
    }
    let Ok((welcome, registration)) = answer.await else { return };
    if write_welcome(&mut stream, &welcome).await.is_ok() {
        // Registered while this stays open. A peer that said `quiet` sends nothing more (a vouch or
        // a punch request now and then): the kernel's keep-alive probes tell when it is gone,
        // waking nothing here meanwhile. An earlier peer pings every 2 s, and one timer bounds its
        // silence. Reads go straight into the decoder, whose buffer is let go between them: a
        // registration that waits holds no buffer (10,000 of them wait here at once).
        let mut unheard = if quiet {
            crate::net::detect_dead_peer(&stream, silence);
            None
        } else {
            Some(Silence::new(silence))
        };
        'registered: loop {
            decoder.release_if_drained();
            tokio::select! {
                read = async {
                    // The buffer is made once there is something to read, not while waiting for it;
                    // a short read then tells the runtime the socket is drained (no second read for
                    // the WouldBlock that `try_read_buf` needed), as the peers' links read.
                    stream.readable().await?;
                    let buf = decoder.read_buffer();
                    buf.reserve(REGISTRATION_READ);
                    stream.read_buf(buf).await
                } => match read {
                    Ok(n) if n > 0 => {
                        if let Some(unheard) = &mut unheard {
                            unheard.heard();
                        }
                    }
                    Ok(_) => break,
                    Err(err) => {
                        // A quiet peer that vanished ends here, when keep-alive gives up on it.
                        log::debug!("{remote}'s registration failed ({err}); dropping it");
                        break;
                    }
                },
                Some(frame) = for_peer.recv() => {
                    if stream.write_all(&frame).await.is_err() {
                        break;
                    }
                }
                () = async {
                    match &mut unheard {
                        Some(unheard) => unheard.passed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    log::debug!("{remote} said nothing for {silence:?}; dropping its registration");
                    break;
                }
            }
            loop {
                match decoder.next_frame() {
                    Ok(Some(Frame::Vouch { originals })) if room == DEFAULT_ROOM => {
                        let originals = originals.iter().filter_map(|a| a.parse().ok()).collect();
                        let _ = tracker.queries.send(Query::Vouch { originals }).await;
                    }
                    Ok(Some(Frame::PunchRequest { addr })) => {
                        if let Ok(target) = addr.parse() {
                            let _ = tracker
                                .queries
                                .send(Query::PunchRequest { room: room.clone(), from: remote, target })
                                .await;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(err) => {
                        log::warn!("{remote} sent a broken frame ({err}); dropping its registration");
                        break 'registered;
                    }
                }
            }
        }
    }
    let _ = tracker.queries.send(Query::Deregister { room, addr: remote, registration }).await;
    crate::net::reset(stream);
}

/// Send the welcome's shared blocks as they are, in vectored writes.
async fn write_welcome(stream: &mut TcpStream, welcome: &Welcome) -> io::Result<()> {
    let mut slices = welcome.slices();
    let mut unsent = &mut slices[..];
    while !unsent.is_empty() {
        let written = stream.write_vectored(unsent).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut unsent, written);
    }
    Ok(())
}

/// Is an original peer still listening? A bare connect, reset at once (it costs the original one dead
/// entry in its connection set, so probes are rare: only for entries nobody vouched for).
async fn probe(addr: SocketAddr, timeout: Duration, tracker: TrackerHandle) {
    let alive = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            crate::net::reset(stream);
            true
        }
        _ => false,
    };
    let _ = tracker.queries.send(Query::Probed { addr, alive }).await;
}

/// Tell a p2pchat end why it is refused, then close.
async fn refuse(mut stream: TcpStream, remote: SocketAddr, code: &str, message: String) {
    log::warn!("refusing {remote}: {message}");
    let frame = frames::encode_opening(&Frame::Error { code: code.to_owned(), message });
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&frame)).await;
}
