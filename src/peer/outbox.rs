//! A link's send queue: it tells a member that stopped reading from one that is briefly behind,
//! and holds no memory while the link is idle.
//!
//! A room of 200 holds 199 links per peer, nearly all idle at any moment, so what an idle link keeps
//! matters more than what a busy one does. tokio's `mpsc` channel allocates its state (512 bytes,
//! cache-line aligned) and a first block of 32 slots (544 bytes) with the channel, whether anything is
//! ever sent: about 1 KiB per link. Here the queue is a `VecDeque` behind a mutex that only the actor
//! (and a history answer) push to and only the link's writer pops from; it grows on first use and is
//! given back when a burst has drained.
//!
//! Its [`Bounds`]: past `lines`, the queue takes more only while its drain keeps taking (nothing
//! taken for `stalled_after` while that full: the member is not reading), and never past `bytes`. A
//! member behind in a busy room (its process short of CPU for a moment) catches up instead of being
//! dropped with what was queued for it; one that stopped reading is still dropped within seconds, and
//! memory stays bounded. Lines are shared between links, so the bytes counted here are mostly the
//! same bytes counted on every other link.
//!
//! Otherwise it behaves as a bounded mpsc channel: [`Outbox::try_send`] says why it refused a line;
//! [`Outbox::send`] waits while the queue is at `lines` (it never grows it past); once every
//! [`Outbox`] is dropped, the [`Drain`] yields what is left and then `None`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A queue that holds more than this after a burst frees its memory once it drains.
const KEPT_WHEN_EMPTY: usize = 8;

/// How much one queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bounds {
    /// Lines past which the drain must keep taking.
    pub lines: usize,
    /// How long a queue at `lines` may go without a line taken before it refuses more.
    pub stalled_after: Duration,
    /// Bytes queued at most, however the drain keeps up.
    pub bytes: usize,
}

struct Shared<T> {
    state: Mutex<Queued<T>>,
    bounds: Bounds,
    /// Wakes the drain: a line was queued, or the last sender left.
    queued: Notify,
    /// Wakes senders waiting for room: a line was taken, or the drain left.
    room: Notify,
}

struct Queued<T> {
    lines: VecDeque<T>,
    bytes: usize,
    /// Since when the queue has been at `lines` with nothing taken (first noticed by a send).
    full_since: Option<Instant>,
    /// A `send` waits for room: the next line taken wakes it.
    room_wanted: bool,
    /// A line other than a keep-alive was queued since the last [`Outbox::keep_alive`].
    queued_since_keep_alive: bool,
    senders: usize,
    drain_alive: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Queued<T>> {
        // No code holding this lock can panic half-way through a change.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why [`Outbox::try_send`] did not queue a line; the line comes back.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused<T> {
    /// At `lines`, and nothing was taken for `stalled_after`.
    Stalled(T),
    /// `bytes` are queued.
    Overflow(T),
    /// The drain is gone.
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

pub(super) fn outbox<T: AsRef<[u8]>>(bounds: Bounds) -> (Outbox<T>, Drain<T>) {
    let bounds = Bounds { lines: bounds.lines.max(1), ..bounds };
    let shared = Arc::new(Shared {
        state: Mutex::new(Queued {
            lines: VecDeque::new(),
            bytes: 0,
            full_since: None,
            room_wanted: false,
            queued_since_keep_alive: false,
            senders: 1,
            drain_alive: true,
        }),
        bounds,
        queued: Notify::new(),
        room: Notify::new(),
    });
    (Outbox { shared: shared.clone() }, Drain { shared })
}

impl<T: AsRef<[u8]>> Outbox<T> {
    pub fn try_send(&self, line: T) -> Result<(), Refused<T>> {
        self.push(line, false)
    }

    /// Queue `line`, waiting while the queue is at its `lines` bound.
    pub async fn send(&self, mut line: T) -> Result<(), Closed> {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            // Registered before trying, so room made between the try and the wait is not missed.
            room.as_mut().enable();
            match self.push(line, true) {
                Ok(()) => return Ok(()),
                Err(Refused::Closed(_)) => return Err(Closed),
                Err(Refused::Stalled(back) | Refused::Overflow(back)) => line = back,
            }
            room.await;
        }
    }

    /// Queue `ping` for a link that would otherwise be silent: unless another line was queued since
    /// the last call, as any line shows the member we are alive. A link busy with chat carries no
    /// pings, so a member of a busy room is not woken for them.
    pub fn keep_alive(&self, ping: T) -> Result<(), Refused<T>> {
        let mut state = self.shared.lock();
        if std::mem::take(&mut state.queued_since_keep_alive) {
            return Ok(());
        }
        self.admit(&mut state, ping, false)?;
        drop(state);
        self.shared.queued.notify_one();
        Ok(())
    }

    fn push(&self, line: T, strict: bool) -> Result<(), Refused<T>> {
        let mut state = self.shared.lock();
        self.admit(&mut state, line, strict)?;
        state.queued_since_keep_alive = true;
        drop(state);
        self.shared.queued.notify_one();
        Ok(())
    }

    /// Queue `line` unless a bound says no (the caller wakes the drain); `strict`: refuse at `lines`
    /// rather than go past it.
    fn admit(&self, state: &mut Queued<T>, line: T, strict: bool) -> Result<(), Refused<T>> {
        let bounds = &self.shared.bounds;
        if !state.drain_alive {
            return Err(Refused::Closed(line));
        }
        let size = line.as_ref().len();
        // An empty queue takes any line, so one larger than the bound does not wait forever.
        if state.bytes > 0 && state.bytes + size > bounds.bytes {
            state.room_wanted |= strict;
            return Err(Refused::Overflow(line));
        }
        if state.lines.len() >= bounds.lines {
            if strict {
                state.room_wanted = true;
                return Err(Refused::Stalled(line));
            }
            let since = *state.full_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= bounds.stalled_after {
                return Err(Refused::Stalled(line));
            }
        }
        state.lines.push_back(line);
        state.bytes += size;
        Ok(())
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

impl<T: AsRef<[u8]>> Drain<T> {
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

    fn take(&self, state: &mut Queued<T>) -> Option<T> {
        let line = state.lines.pop_front()?;
        state.bytes -= line.as_ref().len();
        // Taken: the stall clock starts again if the queue is still that full.
        state.full_since = None;
        if state.lines.is_empty() && state.lines.capacity() > KEPT_WHEN_EMPTY {
            state.lines = VecDeque::new();
        }
        if std::mem::take(&mut state.room_wanted) {
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
            state.bytes = 0;
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

    const PATIENT: Bounds = Bounds { lines: 2, stalled_after: Duration::from_secs(3600), bytes: 1 << 20 };

    fn bounds(lines: usize) -> Bounds {
        Bounds { lines, ..PATIENT }
    }

    #[tokio::test(start_paused = true)]
    async fn past_its_lines_a_queue_takes_more_only_while_the_drain_keeps_taking() {
        let (tx, mut rx) = outbox(Bounds { lines: 2, stalled_after: Duration::from_secs(3), bytes: 1 << 20 });
        for line in ["a", "b", "c"] {
            tx.try_send(line).unwrap();
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(tx.try_send("d"), Ok(()), "behind, not yet stalled");
        assert_eq!(rx.try_next(), Some("a"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(tx.try_send("e"), Ok(()), "a line was taken: the clock starts again");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(tx.try_send("f"), Err(Refused::Stalled("f")));
        let order: Vec<_> = std::iter::from_fn(|| rx.try_next()).collect();
        assert_eq!(order, ["b", "c", "d", "e"]);
    }

    #[test]
    fn bytes_bound_a_queue_however_its_drain_keeps_up() {
        let (tx, mut rx) = outbox(Bounds { bytes: 10, ..PATIENT });
        let big = vec![0u8; 8];
        assert_eq!(tx.try_send(big.clone()), Ok(()));
        assert_eq!(tx.try_send(vec![1u8; 3]), Err(Refused::Overflow(vec![1u8; 3])));
        assert_eq!(tx.try_send(vec![2u8; 2]), Ok(()));
        assert_eq!(rx.try_next(), Some(big));
        assert_eq!(tx.try_send(vec![3u8; 8]), Ok(()));
        // A line larger than the bound still goes through an empty queue.
        let (tx, mut rx) = outbox(Bounds { bytes: 4, ..PATIENT });
        assert_eq!(tx.try_send(vec![0u8; 9]), Ok(()));
        assert_eq!(rx.try_next().map(|l| l.len()), Some(9));
    }

    #[tokio::test]
    async fn the_drain_yields_what_is_left_then_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = outbox(bounds(8));
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
        let (tx, mut rx) = outbox::<&str>(bounds(8));
        let reader = tokio::spawn(async move { (rx.next().await, rx.next().await) });
        tokio::task::yield_now().await;
        tx.try_send("x").unwrap();
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("drain woke").unwrap();
        assert_eq!(got, (Some("x"), None));
    }

    #[tokio::test]
    async fn send_waits_at_the_line_bound_and_fails_once_the_drain_is_gone() {
        let (tx, mut rx) = outbox(bounds(1));
        tx.try_send("1").unwrap();
        let waiting = tx.clone();
        let sender = tokio::spawn(async move { waiting.send("2").await });
        tokio::task::yield_now().await;
        assert!(!sender.is_finished(), "a full queue makes send wait");
        assert_eq!(rx.next().await, Some("1"));
        let sent = tokio::time::timeout(Duration::from_secs(5), sender).await.expect("room woke the sender").unwrap();
        assert_eq!(sent, Ok(()));
        assert_eq!(rx.next().await, Some("2"));

        tx.try_send("3").unwrap();
        let blocked = tx.clone();
        let sender = tokio::spawn(async move { blocked.send("4").await });
        tokio::task::yield_now().await;
        drop(rx);
        let sent = tokio::time::timeout(Duration::from_secs(5), sender)
            .await
            .expect("the closed drain woke the sender")
            .unwrap();
        assert_eq!(sent, Err(Closed));
        assert_eq!(tx.try_send("5"), Err(Refused::Closed("5")));
    }

    #[tokio::test]
    async fn send_waits_at_the_byte_bound_too() {
        let (tx, mut rx) = outbox(Bounds { bytes: 10, ..bounds(8) });
        tx.try_send(vec![0u8; 8]).unwrap();
        let waiting = tx.clone();
        let sender = tokio::spawn(async move { waiting.send(vec![1u8; 8]).await });
        tokio::task::yield_now().await;
        assert!(!sender.is_finished(), "a queue at its bytes makes send wait");
        assert_eq!(rx.next().await, Some(vec![0u8; 8]));
        let sent = tokio::time::timeout(Duration::from_secs(5), sender).await.expect("room woke the sender").unwrap();
        assert_eq!(sent, Ok(()));
    }

    #[test]
    fn a_keep_alive_is_queued_only_when_nothing_else_was_since_the_last_one() {
        let (tx, mut rx) = outbox(bounds(8));
        tx.keep_alive("ping").unwrap();
        tx.keep_alive("ping").unwrap();
        tx.try_send("chat").unwrap();
        tx.keep_alive("ping").unwrap();
        tx.keep_alive("ping").unwrap();
        let order: Vec<_> = std::iter::from_fn(|| rx.try_next()).collect();
        assert_eq!(
            order,
            ["ping", "ping", "chat", "ping"],
            "a ping never stands in for a line, and the link is never silent for two calls"
        );
        drop(rx);
        assert_eq!(tx.keep_alive("ping"), Err(Refused::Closed("ping")));
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let (tx, mut rx) = outbox(bounds(256));
        for _ in 0..200 {
            tx.try_send("line").unwrap();
        }
        assert!(tx.shared.lock().lines.capacity() >= 200);
        while rx.try_next().is_some() {}
        assert_eq!(tx.shared.lock().lines.capacity(), 0);
        assert_eq!(tx.shared.lock().bytes, 0);
        tx.try_send("line").unwrap();
        assert_eq!(rx.try_next(), Some("line"));
        assert!(tx.shared.lock().lines.capacity() <= KEPT_WHEN_EMPTY, "a small queue keeps its few slots");
    }
}
