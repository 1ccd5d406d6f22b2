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
//! * the exchange ends with an abortive close (see [`crate::net::abortive_close`]), so the client's
//!   socket is gone when it binds its listener to the same port, which the original tracker's lingering
//!   connection made impossible.
//!
//! An original client never writes to the tracker; a connection that sends bytes during the grace period
//! is not one, and is reset without being listed.

mod registry;

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

pub use registry::Registry;

use crate::wire::peer_list::LEGACY_LIST_BUDGET;

/// The original tracker's fixed port.
pub const DEFAULT_PORT: u16 = 7472;

#[derive(Debug, Clone)]
pub struct TrackerConfig {
    pub listen: SocketAddr,
    /// Addresses remembered at most; the oldest is forgotten first.
    pub max_entries: usize,
    /// Largest list sent to a client, in bytes (whole entries only).
    pub list_budget: usize,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long writing a list to a client may take before the connection is dropped.
    pub write_timeout: Duration,
    /// How long after accepting a client the list is written (see the module docs).
    pub answer_after: Duration,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            max_entries: 10_000,
            list_budget: LEGACY_LIST_BUDGET,
            max_connections: 1024,
            write_timeout: Duration::from_secs(5),
            answer_after: Duration::from_millis(150),
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
    Addresses(oneshot::Sender<Vec<SocketAddr>>),
    /// Remember this client and give the list to send it.
    Admit { addr: SocketAddr, reply: oneshot::Sender<Vec<u8>> },
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

    /// Every address the tracker remembers, oldest first.
    pub async fn addresses(&self) -> Result<Vec<SocketAddr>, TrackerError> {
        self.ask(Query::Addresses).await
    }

    async fn admit(&self, addr: SocketAddr) -> Result<Vec<u8>, TrackerError> {
        self.ask(|reply| Query::Admit { addr, reply }).await
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
            let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
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
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let mut serving = JoinSet::new();
        tokio::pin!(shutdown);
        log::info!("tracker listening on {}", handle.local_addr);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(query) = queries.recv() => match query {
                    Query::Addresses(reply) => { let _ = reply.send(registry.addresses()); }
                    Query::Admit { addr, reply } => {
                        let list = registry.admit(addr);
                        log::debug!("{addr} joined; {} bytes of list; {} remembered", list.len(), registry.len());
                        let _ = reply.send(list);
                    }
                },
                accepted = listener.accept() => match accepted {
                    Ok((stream, remote)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            log::warn!("{remote} refused: already serving {} connections", config.max_connections);
                            crate::net::reset(stream);
                            continue;
                        };
                        let (handle, config) = (handle.clone(), config.clone());
                        serving.spawn(async move {
                            serve_client(stream, remote, handle, config).await;
                            drop(slot);
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

/// The original exchange: after the grace period, write the list, then reset once it is on its way.
async fn serve_client(mut stream: TcpStream, remote: SocketAddr, tracker: TrackerHandle, config: TrackerConfig) {
    let _ = stream.set_nodelay(true);
    let mut probe = [0u8; 1];
    match tokio::time::timeout(config.answer_after, stream.read(&mut probe)).await {
        Err(_quiet) => {}
        Ok(Ok(0)) => return log::debug!("{remote} left before its list was sent"),
        Ok(Ok(_)) => {
            log::debug!("{remote} sent bytes; not an original client, closing");
            return crate::net::reset(stream);
        }
        Ok(Err(err)) => return log::debug!("{remote}: {err}"),
    }
    let Ok(list) = tracker.admit(remote).await else { return };
    // The reset has to reach the client before its own close(), microseconds after it reads the list:
    // prepare it now so only the write and the close separate the two.
    crate::net::reset_on_close(&stream);
    match tokio::time::timeout(config.write_timeout, stream.write_all(&list)).await {
        Ok(Ok(())) => crate::net::abortive_close(stream, Duration::from_secs(1)).await,
        Ok(Err(err)) => log::debug!("{remote} left before its list was written: {err}"),
        Err(_) => log::debug!("{remote} did not take its list within {:?}; dropped", config.write_timeout),
    }
}
