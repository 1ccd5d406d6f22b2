//! The log thread: owns one peer's [`Store`] and runs its queries and writes off the async runtime.
//!
//! Callers hold a cheap [`LogHandle`] (one room). Queries go over a bounded channel and answer on
//! oneshot channels. Live messages are not sent one by one: they wait in a shared batch for
//! `GROUP_COMMIT`, then go to the thread as one transaction. So a message wakes nobody but the
//! receiving task; the log thread wakes once per batch, after the message has reached the application
//! (on two cores, another thread made runnable with every message of a busy room costs latency).

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot};

use super::store::{Key, Location, Query, Record, Retention, Store, StoreError};

/// Jobs queued before senders wait (backpressure onto the readers, never a lost message). A live job
/// is a whole batch, so this is up to `QUEUE * FULL_BATCH` messages.
const QUEUE: usize = 64;
/// Live messages wait up to this long for more to share their transaction: a commit rewrites the
/// pages it touched, so a busy room's log costs a third of the CPU in batches of hundreds than in
/// tens, and each batch wakes the runtime (its timer) and the log thread once (at 100 ms, a receiver
/// in the benchmark's latency room of 50 spent ~14 µs of its ~150 a delivery in the log thread and
/// was woken 0.17 times more per delivery; at 500 ms, ~5 µs and 0.03). A crash loses at most this
/// much of the log, and a peer that joins again fetches what its log lacks from the room; queries
/// never wait it.
const GROUP_COMMIT: std::time::Duration = std::time::Duration::from_millis(500);
/// A batch this large is written at once.
const FULL_BATCH: usize = 1024;

enum Job {
    /// Write what the shared batch holds, in one transaction. The records stay in the batch until
    /// the thread takes them: none is ever on its way outside it, where a query would miss it.
    Commit,
    /// Anything else; it sees every live message recorded before it was asked.
    Ask(Ask),
}

enum Ask {
    Ingest {
        records: Vec<Record>,
        reply: oneshot::Sender<Result<Vec<bool>, StoreError>>,
    },
    Query {
        query: Query,
        reply: oneshot::Sender<Result<Vec<Record>, StoreError>>,
    },
    NewestShared {
        reply: oneshot::Sender<Result<Option<Key>, StoreError>>,
    },
    /// Nothing but what every ask does first: write the waiting batch.
    Flush {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// Live messages not yet handed to the log thread. Shared with the thread, which takes them before
/// any other job, so a query asked after a message arrived still finds it.
#[derive(Clone, Debug, Default)]
struct Batch(Arc<Mutex<Vec<Record>>>);

impl Batch {
    /// Add `records`; returns whether the batch was empty before, and whether it just became full
    /// (once per batch: it stays full until the thread takes it).
    fn add(&self, records: Vec<Record>) -> (bool, bool) {
        let mut batch = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let before = batch.len();
        batch.extend(records);
        (before == 0, before < FULL_BATCH && batch.len() >= FULL_BATCH)
    }

    fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// One room's log; the thread ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct LogHandle {
    jobs: mpsc::Sender<Job>,
    batch: Batch,
    /// See [`commit_delay`].
    commit_after: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the history log is closed")]
    Closed,
}

/// Open the store at `location` (blocking; call from a blocking context) and start its thread.
pub fn open(location: &Location, room: String, retention: Retention) -> Result<LogHandle, StoreError> {
    let mut store = Store::open(location)?;
    store.set_retention(retention);
    let (jobs, rx) = mpsc::channel(QUEUE);
    let batch = Batch::default();
    let thread_batch = batch.clone();
    std::thread::Builder::new()
        .name("p2pchat-log".into())
        .spawn(move || serve(store, room, rx, thread_batch))
        .map_err(|e| StoreError::Unusable {
            path: location_name(location).into(),
            reason: format!("cannot start its thread: {e}"),
        })?;
    Ok(LogHandle { jobs, batch, commit_after: commit_delay() })
}

/// How long this log's batches wait: between half of [`GROUP_COMMIT`] and all of it, at random.
/// Every member of a room receives a message at about the same moment, so with one fixed delay they
/// all committed at once, a burst of 50 commits on 2 cores in a room of 50 that held up whichever
/// message came during it (p99 latency there: 4,639 to 6,604 µs fixed, 4,068 to 5,060 spread).
fn commit_delay() -> std::time::Duration {
    let mut seed = [0u8; 2];
    // Without randomness every log takes the same delay, as before: no worse than that.
    let _ = getrandom::fill(&mut seed);
    GROUP_COMMIT / 2 + GROUP_COMMIT / 2 * u32::from(u16::from_le_bytes(seed)) / 65_536
}

fn location_name(location: &Location) -> String {
    match location {
        Location::Dir(dir) => dir.display().to_string(),
        Location::Memory => "(memory)".to_owned(),
    }
}

fn serve(mut store: Store, room: String, mut rx: mpsc::Receiver<Job>, batch: Batch) {
    let mut live = LiveWriter { failed_before: false };
    while let Some(job) = rx.blocking_recv() {
        match job {
            Job::Commit => live.write(&mut store, &room, &batch.take()),
            Job::Ask(ask) => {
                live.write(&mut store, &room, &batch.take());
                answer(&mut store, &room, ask);
            }
        }
    }
    // The last handle is gone: what was still waiting is written before the thread ends.
    live.write(&mut store, &room, &batch.take());
}

fn answer(store: &mut Store, room: &str, ask: Ask) {
    // A send error means the asker stopped waiting: nothing to do.
    let _ = match ask {
        Ask::Ingest { records, reply } => reply.send(store.insert(room, &records)).map_err(drop),
        Ask::Query { query, reply } => reply.send(store.query(room, &query)).map_err(drop),
        Ask::NewestShared { reply } => reply.send(store.newest_shared(room)).map_err(drop),
        Ask::Flush { reply } => reply.send(Ok(())).map_err(drop),
    };
}

struct LiveWriter {
    failed_before: bool,
}

impl LiveWriter {
    fn write(&mut self, store: &mut Store, room: &str, records: &[Record]) {
        if records.is_empty() {
            return;
        }
        if let Err(err) = store.insert(room, records) {
            // Keep chatting without the log; say it once rather than once per message.
            if !self.failed_before {
                log::warn!("messages are not being logged: {err}");
                self.failed_before = true;
            }
        }
    }
}

impl LogHandle {
    /// Log live messages; waits only while the log thread is `QUEUE` batches behind.
    pub async fn record(&self, records: Vec<Record>) {
        if self.add(records) {
            let _ = crate::sending::send(&self.jobs, Job::Commit).await;
        }
    }

    /// Log one message without waiting, for callers that must not wait (the peer's actor); a full
    /// batch that finds the queue full is handed to a task that waits.
    pub fn record_now(&self, record: Record) {
        if self.add(vec![record]) {
            if let Err(mpsc::error::TrySendError::Full(job)) = self.jobs.try_send(Job::Commit) {
                let jobs = self.jobs.clone();
                tokio::spawn(async move {
                    let _ = jobs.send(job).await;
                });
            }
        }
    }

    /// Add to the batch; the first message of a batch sets its timer. Returns whether the batch is
    /// full, to be written now.
    fn add(&self, records: Vec<Record>) -> bool {
        let (was_empty, full) = self.batch.add(records);
        if was_empty && !full {
            let (jobs, commit_after) = (self.jobs.clone(), self.commit_after);
            tokio::spawn(async move {
                tokio::time::sleep(commit_after).await;
                // The thread takes what the batch holds then (nothing, if a full batch or a query
                // took it first).
                let _ = jobs.send(Job::Commit).await;
            });
        }
        full
    }

    /// Log messages received as history; for each, whether it was new to this log.
    pub async fn ingest(&self, records: Vec<Record>) -> Result<Vec<bool>, LogError> {
        self.ask(|reply| Ask::Ingest { records, reply }).await
    }

    pub async fn query(&self, query: Query) -> Result<Vec<Record>, LogError> {
        self.ask(|reply| Ask::Query { query, reply }).await
    }

    /// The newest position of a message from a p2pchat peer in this log.
    pub async fn newest_shared(&self) -> Result<Option<Key>, LogError> {
        self.ask(|reply| Ask::NewestShared { reply }).await
    }

    /// Write the live messages still waiting for their batch's timer, and wait until they are: the
    /// timer may fire only after the peer is gone, and never if the process exits first.
    pub async fn flush(&self) -> Result<(), LogError> {
        self.ask(|reply| Ask::Flush { reply }).await
    }

    async fn ask<T>(&self, ask: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Ask) -> Result<T, LogError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job::Ask(ask(reply))).await.map_err(|_| LogError::Closed)?;
        Ok(answer.await.map_err(|_| LogError::Closed)??)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These tests' messages are stamped near 1970: a log that keeps everything.
    fn keep_all() -> Retention {
        Retention { messages: usize::MAX, max_age: std::time::Duration::MAX }
    }

    fn record(id: &str, stamp: u64) -> Record {
        Record {
            id: id.into(),
            stamp,
            sent_at: stamp,
            sender: Some("ana".into()),
            text: id.into(),
            shared: true,
            author_key: None,
            sig: None,
        }
    }

    fn ids(records: &[Record]) -> Vec<&str> {
        records.iter().map(|r| r.id.as_str()).collect()
    }

    #[tokio::test]
    async fn a_query_sees_live_messages_still_waiting_for_their_batch() {
        let log = open(&Location::Memory, "r".into(), keep_all()).unwrap();
        log.record_now(record("a", 1));
        log.record(vec![record("b", 2)]).await;
        // Asked at once, long before the batch's timer: the thread writes the batch first.
        assert_eq!(ids(&log.query(Query::latest(10)).await.unwrap()), ["a", "b"]);
    }

    #[tokio::test]
    async fn a_flush_writes_the_waiting_batch_to_disk_before_it_returns() {
        let dir = std::env::temp_dir().join(format!("p2pchat-flush-{}", crate::wire::frames::random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = open(&Location::Dir(dir.clone()), "r".into(), keep_all()).unwrap();
        log.record_now(record("a", 1));
        // Another connection to the same file sees only what the log thread has written.
        let mut other = Store::open(&Location::Dir(dir.clone())).unwrap();
        assert!(other.query("r", &Query::latest(10)).unwrap().is_empty(), "still waiting for its batch's timer");
        log.flush().await.unwrap();
        assert_eq!(ids(&other.query("r", &Query::latest(10)).unwrap()), ["a"]);
        drop((log, other));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn batches_wait_between_half_the_group_commit_and_all_of_it() {
        let delays: Vec<_> = (0..64).map(|_| commit_delay()).collect();
        assert!(delays.iter().all(|d| (GROUP_COMMIT / 2..GROUP_COMMIT).contains(d)), "{delays:?}");
        assert!(delays.iter().any(|d| *d != delays[0]), "spread at random: {delays:?}");
    }

    #[tokio::test]
    async fn a_full_batch_goes_at_once_and_nothing_is_lost_or_doubled() {
        let mut log = open(&Location::Memory, "r".into(), keep_all()).unwrap();
        // Only a full batch can make the thread write during this test: the timer is an hour away.
        log.commit_after = std::time::Duration::from_secs(3600);
        let count = FULL_BATCH * 2 + 7;
        for stamp in 0..count as u64 {
            log.record_now(record(&format!("m{stamp:05}"), stamp));
        }
        // The thread takes each full batch on its own (a bounded wait for it, not a sleep).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.batch.0.lock().unwrap().len() >= FULL_BATCH {
            assert!(std::time::Instant::now() < deadline, "a full batch was not taken by the thread");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let logged = log.query(Query::latest(count + 10)).await.unwrap();
        assert_eq!(logged.len(), count);
        assert_eq!(logged.last().map(|r| r.id.as_str()), Some(format!("m{:05}", count - 1).as_str()));
    }
}
