//! The peer's one stateful task: it owns the connection table, and nothing else touches it.
//!
//! Handles send [`Command`]s with oneshot replies; the accept loop, the dialers and the connection tasks
//! report [`NetEvent`]s. Sending a line is a `try_send` into each connection's queue, so the actor never
//! waits on a network peer.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinSet;

use super::bootstrap;
use super::connection::{self, ConnId, Connection, Line};
use super::{Event, Limits, PeerInfo};

pub(crate) enum Command {
    Send { line: Line, reply: oneshot::Sender<usize> },
    Peers { reply: oneshot::Sender<Vec<PeerInfo>> },
    Close { reply: oneshot::Sender<()> },
}

pub(crate) enum NetEvent {
    Opened { stream: TcpStream, addr: SocketAddr, outgoing: bool },
    DialFailed { addr: SocketAddr, reason: String, gave_up: bool },
    NameLearned { id: ConnId, name: String },
    Closed { id: ConnId, reason: String },
}

pub(super) struct Setup {
    pub name: String,
    pub limits: Limits,
    pub listener: TcpListener,
    pub initial_peers: Vec<SocketAddr>,
    pub commands: mpsc::Receiver<Command>,
    pub events: mpsc::Sender<Event>,
    /// Told how many listed peers the first attempts reached, once every one was tried.
    pub ready: oneshot::Sender<usize>,
}

struct Member {
    info: PeerInfo,
    conn: Connection,
}

struct Actor {
    limits: Limits,
    members: HashMap<ConnId, Member>,
    next_id: ConnId,
    net: mpsc::Sender<NetEvent>,
    events: mpsc::Sender<Event>,
}

pub(super) async fn run(setup: Setup) {
    let Setup { name, limits, listener, initial_peers, mut commands, events, ready } = setup;
    let (net, mut net_rx) = mpsc::channel(1024);
    // Dropping this set (when the actor ends) aborts the accept loop and every dialer.
    let mut background = JoinSet::new();
    background.spawn(accept_loop(listener, net.clone()));
    let mut untried: HashSet<SocketAddr> = initial_peers.iter().copied().collect();
    for addr in initial_peers {
        background.spawn(bootstrap::dial(addr, limits.clone(), net.clone()));
    }
    let mut ready = Some(ready);
    let mut reached_first_time = 0;
    let mut actor = Actor { limits, members: HashMap::new(), next_id: 0, net, events };
    log::debug!("peer {name:?} running");

    loop {
        if untried.is_empty() {
            if let Some(ready) = ready.take() {
                let _ = ready.send(reached_first_time);
            }
        }
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Send { line, reply }) => { let _ = reply.send(actor.broadcast(line)); }
                Some(Command::Peers { reply }) => { let _ = reply.send(actor.peers()); }
                Some(Command::Close { reply }) => {
                    actor.close_all().await;
                    let _ = reply.send(());
                    break;
                }
                None => {
                    actor.close_all().await;
                    break;
                }
            },
            Some(event) = net_rx.recv() => match event {
                NetEvent::Opened { stream, addr, outgoing } => {
                    if outgoing && untried.remove(&addr) {
                        reached_first_time += 1;
                    }
                    actor.open(stream, addr, outgoing);
                }
                NetEvent::DialFailed { addr, reason, gave_up } => {
                    untried.remove(&addr);
                    if gave_up {
                        log::warn!("cannot reach {addr} ({reason}); skipping it");
                    } else {
                        log::debug!("{addr} refused ({reason}); retrying");
                    }
                }
                NetEvent::NameLearned { id, name } => {
                    if let Some(member) = actor.members.get_mut(&id) {
                        member.info.name = Some(name);
                    }
                }
                NetEvent::Closed { id, reason } => actor.remove(id, reason),
            },
        }
    }
    log::debug!("peer {name:?} closed");
}

impl Actor {
    fn open(&mut self, stream: TcpStream, addr: SocketAddr, outgoing: bool) {
        let id = self.next_id;
        self.next_id += 1;
        let conn = connection::spawn(id, stream, addr, &self.limits, self.net.clone(), self.events.clone());
        log::info!("connected to {addr} ({})", if outgoing { "dialled" } else { "accepted" });
        self.members.insert(id, Member { info: PeerInfo { addr, name: None, outgoing }, conn });
        self.notify(Event::Connected { addr, outgoing });
    }

    /// Queue `line` for every member; returns how many took it. A member whose queue is full is not
    /// reading: it is dropped rather than allowed to hold the others back.
    fn broadcast(&mut self, line: Line) -> usize {
        let mut queued = 0;
        let mut dropped = Vec::new();
        for (id, member) in &self.members {
            match member.conn.queue.try_send(line.clone()) {
                Ok(()) => queued += 1,
                Err(TrySendError::Full(_)) => dropped.push((*id, format!("not reading: {} lines queued", self.limits.send_queue))),
                Err(TrySendError::Closed(_)) => dropped.push((*id, "connection closed".to_owned())),
            }
        }
        for (id, reason) in dropped {
            self.remove(id, reason);
        }
        queued
    }

    fn peers(&self) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = self.members.values().map(|m| m.info.clone()).collect();
        peers.sort_by_key(|p| p.addr);
        peers
    }

    fn remove(&mut self, id: ConnId, reason: String) {
        if let Some(Member { info, conn }) = self.members.remove(&id) {
            log::info!("disconnected from {} ({reason})", info.addr);
            drop(conn);
            self.notify(Event::Disconnected { addr: info.addr, name: info.name, reason });
        }
    }

    /// Let each writer finish what is queued (within the grace period), then close everything.
    async fn close_all(&mut self) {
        let deadline = tokio::time::Instant::now() + self.limits.close_grace;
        let mut writers = Vec::new();
        for (_, Member { conn, .. }) in self.members.drain() {
            let Connection { queue, reader, writer } = conn;
            drop(queue);
            drop(reader);
            writers.push(writer);
        }
        for writer in &mut writers {
            let _ = tokio::time::timeout_at(deadline, writer).await;
        }
    }

    /// Membership events are rare; if the application is behind, deliver them later rather than block.
    fn notify(&self, event: Event) {
        if let Err(TrySendError::Full(event)) = self.events.try_send(event) {
            let events = self.events.clone();
            tokio::spawn(async move {
                let _ = events.send(event).await;
            });
        }
    }
}

async fn accept_loop(listener: TcpListener, net: mpsc::Sender<NetEvent>) {
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                if net.send(NetEvent::Opened { stream, addr, outgoing: false }).await.is_err() {
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
