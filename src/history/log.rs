//! The log thread: owns one peer's [`Store`] and runs its queries and writes off the async runtime.
//!
//! Callers hold a cheap [`LogHandle`] (one room) and send jobs over a bounded channel; queries answer
//! on oneshot channels. Live messages are written in batches: whatever is queued when the thread
//! wakes, and what comes in the next few milliseconds, goes into one transaction.

use tokio::sync::{mpsc, oneshot};

use super::store::{Key, Location, Query, Record, Store, StoreError};

/// Jobs queued before writers wait (backpressure onto the readers, never a lost message).
const QUEUE: usize = 4096;
/// Live messages wait this long for more to share their transaction: a commit rewrites the pages it
/// touched, so a busy room's log costs a third of the CPU in batches of hundreds than in tens.
const GROUP_COMMIT: std::time::Duration = std::time::Duration::from_millis(10);
/// A batch this large is written at once.
const FULL_BATCH: usize = 1024;

enum Job {
    Record(Vec<Record>),
    Ingest { records: Vec<Record>, reply: oneshot::Sender<Result<Vec<bool>, StoreError>> },
    Query { query: Query, reply: oneshot::Sender<Result<Vec<Record>, StoreError>> },
    NewestShared { reply: oneshot::Sender<Result<Option<Key>, StoreError>> },
}

/// One room's log; the thread ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct LogHandle {
    jobs: mpsc::Sender<Job>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the history log is closed")]
    Closed,
}

/// Open the store at `location` (blocking; call from a blocking context) and start its thread.
pub fn open(location: &Location, room: String) -> Result<LogHandle, StoreError> {
    let store = Store::open(location)?;
    let (jobs, rx) = mpsc::channel(QUEUE);
    std::thread::Builder::new()
        .name("p2pchat-log".into())
        .spawn(move || serve(store, room, rx))
        .map_err(|e| StoreError::Unusable { path: location_name(location).into(), reason: format!("cannot start its thread: {e}") })?;
    Ok(LogHandle { jobs })
}

fn location_name(location: &Location) -> String {
    match location {
        Location::Dir(dir) => dir.display().to_string(),
        Location::Memory => "(memory)".to_owned(),
    }
}

fn serve(mut store: Store, room: String, mut rx: mpsc::Receiver<Job>) {
    let mut failed_before = false;
    let mut next = rx.blocking_recv();
    while let Some(job) = next.take() {
        match job {
            Job::Record(mut batch) => {
                // Gather the live messages queued now, and for a moment more, into one transaction
                // (until a job of another kind, which must see them logged).
                next = gather(&mut rx, &mut batch);
                if next.is_none() && batch.len() < FULL_BATCH {
                    std::thread::sleep(GROUP_COMMIT);
                    next = gather(&mut rx, &mut batch);
                }
                if let Err(err) = store.insert(&room, &batch) {
                    // Keep chatting without the log; say it once rather than once per message.
                    if !failed_before {
                        log::warn!("messages are not being logged: {err}");
                        failed_before = true;
                    }
                }
            }
            Job::Ingest { records, reply } => {
                let _ = reply.send(store.insert(&room, &records));
            }
            Job::Query { query, reply } => {
                let _ = reply.send(store.query(&room, &query));
            }
            Job::NewestShared { reply } => {
                let _ = reply.send(store.newest_shared(&room));
            }
        }
        if next.is_none() {
            next = rx.blocking_recv();
        }
    }
}

/// Move queued `Record` jobs into `batch`; returns the first job of another kind, if one came.
fn gather(rx: &mut mpsc::Receiver<Job>, batch: &mut Vec<Record>) -> Option<Job> {
    loop {
        match rx.try_recv() {
            Ok(Job::Record(more)) => batch.extend(more),
            Ok(other) => return Some(other),
            Err(_) => return None,
        }
    }
}

impl LogHandle {
    /// Log live messages (waits only while the log thread is 4,096 jobs behind).
    pub async fn record(&self, records: Vec<Record>) {
        let _ = self.jobs.send(Job::Record(records)).await;
    }

    /// Log one message without waiting, for callers that must not wait (the peer's actor); when the
    /// queue is full it is handed to a task that waits.
    pub fn record_now(&self, record: Record) {
        if let Err(mpsc::error::TrySendError::Full(job)) = self.jobs.try_send(Job::Record(vec![record])) {
            let jobs = self.jobs.clone();
            tokio::spawn(async move {
                let _ = jobs.send(job).await;
            });
        }
    }

    /// Log messages received as history; for each, whether it was new to this log.
    pub async fn ingest(&self, records: Vec<Record>) -> Result<Vec<bool>, LogError> {
        self.ask(|reply| Job::Ingest { records, reply }).await
    }

    pub async fn query(&self, query: Query) -> Result<Vec<Record>, LogError> {
        self.ask(|reply| Job::Query { query, reply }).await
    }

    /// The newest position of a message from a p2pchat peer in this log.
    pub async fn newest_shared(&self) -> Result<Option<Key>, LogError> {
        self.ask(|reply| Job::NewestShared { reply }).await
    }

    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job) -> Result<T, LogError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(job(reply)).await.map_err(|_| LogError::Closed)?;
        Ok(answer.await.map_err(|_| LogError::Closed)??)
    }
}
