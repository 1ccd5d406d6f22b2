//! A link's send queue: bounded in lines, and holding no memory while the link is idle.
//!
//! A room of 200 holds 199 links per peer, nearly all idle at any moment, so what an idle link keeps
//! matters more than what a busy one does. tokio's `mpsc` channel allocates its state (512 bytes,
//! cache-line aligned) and a first block of 32 slots (544 bytes) with the channel, whether anything is
//! ever sent: about 1 KiB per link. Here the queue is a `VecDeque` behind a mutex that only the actor
//! (and a history answer) push to and only the link's writer pops from; it grows on first use and is
//! given back when a burst has drained.
//!
//! Semantics are those of a bounded mpsc channel: [`Outbox::try_send`] tells a full queue (the member
//! is not reading) from a closed one (the writer is gone); [`Outbox::send`] waits for room; once every
//! [`Outbox`] is dropped, the [`Drain`] yields what is left and then `None`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// A queue that holds more than this after a burst frees its memory once it drains.
const KEPT_WHEN_EMPTY: usize = 8;

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// Wakes the drain: a line was queued, or the last sender left.
    queued: Notify,
    /// Wakes senders waiting for room: a line was taken from a full queue, or the drain left.
    room: Notify,
}

struct State<T> {
    lines: VecDeque<T>,
    senders: usize,
    drain_alive: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // No code holding this lock can panic half-way through a change.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why [`Outbox::try_send`] did not queue a line; the line comes back.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused<T> {
    Full(T),
    Closed(T),
}

/// The drain is gone: the link's writer ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Closed;

/// The sending side; clones share the queue.
pub(super) struct Outbox<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving side, owned by the link's writer.
pub(super) struct Drain<T> {
    shared: Arc<Shared<T>>,
}

/// A queue of at most `capacity` lines.
pub(super) fn outbox<T>(capacity: usize) -> (Outbox<T>, Drain<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { lines: VecDeque::new(), senders: 1, drain_alive: true }),
        capacity: capacity.max(1),
        queued: Notify::new(),
        room: Notify::new(),
    });
    (Outbox { shared: shared.clone() }, Drain { shared })
}

impl<T> Outbox<T> {
    pub fn try_send(&self, line: T) -> Result<(), Refused<T>> {
        let mut state = self.shared.lock();
        if !state.drain_alive {
            return Err(Refused::Closed(line));
        }
        if state.lines.len() >= self.shared.capacity {
            return Err(Refused::Full(line));
        }
        state.lines.push_back(line);
        drop(state);
        self.shared.queued.notify_one();
        Ok(())
    }

    /// Queue `line`, waiting for room while the queue is full.
    pub async fn send(&self, mut line: T) -> Result<(), Closed> {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            // Registered before trying, so room made between the try and the wait is not missed.
            room.as_mut().enable();
            match self.try_send(line) {
                Ok(()) => return Ok(()),
                Err(Refused::Closed(_)) => return Err(Closed),
                Err(Refused::Full(back)) => line = back,
            }
            room.await;
        }
    }
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self { shared: self.shared.clone() }
    }
}

impl<T> Drop for Outbox<T> {
    fn drop(&mut self) {
        let last = {
            let mut state = self.shared.lock();
            state.senders -= 1;
            state.senders == 0
        };
        if last {
            self.shared.queued.notify_one();
        }
    }
}

impl<T> Drain<T> {
    /// The next line, or `None` once the queue is empty and every sender is gone.
    pub async fn next(&mut self) -> Option<T> {
        loop {
            {
                let mut state = self.shared.lock();
                if let Some(line) = self.take(&mut state) {
                    return Some(line);
                }
                if state.senders == 0 {
                    return None;
                }
            }
            // `notify_one` leaves a permit when nobody waits, so a line queued since the check wakes this.
            self.shared.queued.notified().await;
        }
    }

    /// The next line if one is queued now.
    pub fn try_next(&mut self) -> Option<T> {
        let mut state = self.shared.lock();
        self.take(&mut state)
    }

    fn take(&self, state: &mut State<T>) -> Option<T> {
        let was_full = state.lines.len() >= self.shared.capacity;
        let line = state.lines.pop_front()?;
        if state.lines.is_empty() && state.lines.capacity() > KEPT_WHEN_EMPTY {
            state.lines = VecDeque::new();
        }
        // A sender waits only on a full queue, so only taking from a full one can make room it awaits.
        if was_full {
            self.shared.room.notify_waiters();
        }
        Some(line)
    }
}

impl<T> Drop for Drain<T> {
    fn drop(&mut self) {
        let dropped = {
            let mut state = self.shared.lock();
            state.drain_alive = false;
            std::mem::take(&mut state.lines)
        };
        // Dropped outside the lock: a line may be the last owner of a large buffer.
        drop(dropped);
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_full_queue_refuses_and_keeps_order() {
        let (tx, mut rx) = outbox(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(Refused::Full(3)));
        assert_eq!(rx.try_next(), Some(1));
        assert_eq!(tx.try_send(3), Ok(()));
        assert_eq!((rx.try_next(), rx.try_next(), rx.try_next()), (Some(2), Some(3), None));
    }

    #[tokio::test]
    async fn the_drain_yields_what_is_left_then_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = outbox(8);
        let second = tx.clone();
        tx.try_send("a").unwrap();
        drop(tx);
        second.try_send("b").unwrap();
        drop(second);
        assert_eq!(rx.next().await, Some("a"));
        assert_eq!(rx.next().await, Some("b"));
        assert_eq!(rx.next().await, None);
    }

    #[tokio::test]
    async fn a_waiting_drain_wakes_for_a_line_and_for_the_last_sender_leaving() {
        let (tx, mut rx) = outbox::<u32>(8);
        let reader = tokio::spawn(async move { (rx.next().await, rx.next().await) });
        tokio::task::yield_now().await;
        tx.try_send(7).unwrap();
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("drain woke").unwrap();
        assert_eq!(got, (Some(7), None));
    }

    #[tokio::test]
    async fn send_waits_for_room_and_fails_once_the_drain_is_gone() {
        let (tx, mut rx) = outbox(1);
        tx.try_send(1).unwrap();
        let waiting = tx.clone();
        let sender = tokio::spawn(async move { waiting.send(2).await });
        tokio::task::yield_now().await;
        assert!(!sender.is_finished(), "a full queue makes send wait");
        assert_eq!(rx.next().await, Some(1));
        let sent = tokio::time::timeout(Duration::from_secs(5), sender).await.expect("room woke the sender").unwrap();
        assert_eq!(sent, Ok(()));
        assert_eq!(rx.next().await, Some(2));

        tx.try_send(3).unwrap();
        let blocked = tx.clone();
        let sender = tokio::spawn(async move { blocked.send(4).await });
        tokio::task::yield_now().await;
        drop(rx);
        let sent = tokio::time::timeout(Duration::from_secs(5), sender).await.expect("the closed drain woke the sender").unwrap();
        assert_eq!(sent, Err(Closed));
        assert_eq!(tx.try_send(5), Err(Refused::Closed(5)));
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let (tx, mut rx) = outbox(256);
        for i in 0..200 {
            tx.try_send(i).unwrap();
        }
        assert!(tx.shared.lock().lines.capacity() >= 200);
        while rx.try_next().is_some() {}
        assert_eq!(tx.shared.lock().lines.capacity(), 0);
        tx.try_send(1).unwrap();
        assert_eq!(rx.try_next(), Some(1));
        assert!(tx.shared.lock().lines.capacity() <= KEPT_WHEN_EMPTY, "a small queue keeps its few slots");
    }
}
