//! One TCP connection to another member: a reader task and a writer task.
//!
//! The writer owns the write half and a bounded queue of encoded lines; the actor only ever `try_send`s
//! into it, so a peer that stops reading fills its own queue and gets dropped, never stalling the others.
//! The reader decodes the legacy stream ([`ChatDecoder`]) and hands messages straight to the application's
//! event channel, waiting when it is full: a slow application slows its senders through TCP, it does
//! not lose messages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::actor::NetEvent;
use super::{Event, Limits, Message};
use crate::wire::chat::{ChatDecoder, Piece};

/// An encoded line, shared by every connection's queue.
pub(super) type Line = Arc<[u8]>;

pub(super) type ConnId = u64;

/// The live parts of a connection; dropping it aborts both tasks and closes the socket.
pub(super) struct Connection {
    pub queue: mpsc::Sender<Line>,
    pub reader: AbortOnDropHandle<()>,
    pub writer: AbortOnDropHandle<()>,
}

pub(super) fn spawn(
    id: ConnId,
    stream: TcpStream,
    addr: SocketAddr,
    limits: &Limits,
    net: mpsc::Sender<NetEvent>,
    events: mpsc::Sender<Event>,
) -> Connection {
    let _ = stream.set_nodelay(true);
    let (read_half, write_half) = stream.into_split();
    let (queue, lines) = mpsc::channel(limits.send_queue);
    let reader = tokio::spawn(read_loop(id, read_half, addr, limits.hold_back, net.clone(), events));
    let writer = tokio::spawn(write_loop(id, write_half, lines, net));
    Connection { queue, reader: AbortOnDropHandle::new(reader), writer: AbortOnDropHandle::new(writer) }
}

async fn write_loop(id: ConnId, mut half: OwnedWriteHalf, mut lines: mpsc::Receiver<Line>, net: mpsc::Sender<NetEvent>) {
    while let Some(line) = lines.recv().await {
        if let Err(err) = half.write_all(&line).await {
            let _ = net.send(NetEvent::Closed { id, reason: format!("write failed: {err}") }).await;
            return;
        }
    }
    // The actor dropped the queue: we are leaving, or the reader saw the other side go.
    let _ = half.shutdown().await;
}

async fn read_loop(
    id: ConnId,
    mut half: OwnedReadHalf,
    from: SocketAddr,
    hold_back: std::time::Duration,
    net: mpsc::Sender<NetEvent>,
    events: mpsc::Sender<Event>,
) {
    let mut decoder = ChatDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let reason = loop {
        let read = if decoder.has_held_back() {
            match tokio::time::timeout(hold_back, half.read(&mut buf)).await {
                Ok(read) => read,
                Err(_idle) => {
                    deliver(decoder.flush(), from, &events).await;
                    continue;
                }
            }
        } else {
            half.read(&mut buf).await
        };
        match read {
            Ok(0) => break "closed by the other side".to_owned(),
            Ok(n) => {
                let had_name = decoder.name().is_some();
                let pieces = decoder.feed(&buf[..n]);
                if let (false, Some(name)) = (had_name, decoder.name()) {
                    let _ = net.send(NetEvent::NameLearned { id, name: name.to_owned() }).await;
                }
                deliver(pieces, from, &events).await;
            }
            Err(err) => break format!("read failed: {err}"),
        }
    };
    deliver(decoder.flush(), from, &events).await;
    let _ = net.send(NetEvent::Closed { id, reason }).await;
}

async fn deliver(pieces: Vec<Piece>, from: SocketAddr, events: &mpsc::Sender<Event>) {
    for Piece { sender, text, starts_message } in pieces {
        let message = Message { sender, text, from, received_at: SystemTime::now(), starts_message };
        // An error means the application dropped its event stream: nobody is listening any more.
        let _ = events.send(Event::Message(message)).await;
    }
}
