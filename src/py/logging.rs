//! Rust `log` records to Python's `logging`, without ever calling Python from a Rust thread.
//!
//! The `log` facade writes records into a channel bounded at `QUEUE` records (dropping them, and
//! counting, if Python falls behind); `p2pchat._logbridge` runs a Python thread that drains it with
//! `_next_log_records` and feeds each record to `logging.getLogger("p2pchat.<module>")`. That thread
//! sleeps until a record comes (or `_wake_log_bridge`), so an idle process is not woken for logging.
//! The effective level of the `p2pchat` logger is pushed down with `_set_log_level` whenever Python's
//! levels change, so disabled levels cost one comparison in Rust.
//! (pyo3-log does the same job by taking the GIL on whatever thread logs, which would stall tokio
//! workers: the pitfall the bindings are built to avoid.)

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel as unbounded, Receiver, Sender};
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};
use pyo3::prelude::*;

const QUEUE: usize = 4096;

type LogLine = (String, i32, String);

enum Item {
    Line(LogLine),
    /// Makes the waiting `_next_log_records` return (the bridge is stopping).
    Wake,
}

/// The bound is a count beside an unbounded channel, not `sync_channel(QUEUE)`: that one allocates and
/// writes its whole ring up front, 256 KiB resident in every process that imports p2pchat, for a
/// queue that is nearly always empty. This one holds memory only for records waiting.
struct Channel {
    tx: Sender<Item>,
    rx: Mutex<Receiver<Item>>,
    queued: AtomicUsize,
    dropped: AtomicU64,
}

impl Channel {
    fn push(&self, line: LogLine) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE || self.tx.send(Item::Line(line)).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Add what was taken to `out` (a wake-up adds nothing).
    fn take_into(&self, item: Item, out: &mut Vec<LogLine>) {
        if let Item::Line(line) = item {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            out.push(line);
        }
    }
}

fn channel() -> &'static Channel {
    static CHANNEL: OnceLock<Channel> = OnceLock::new();
    CHANNEL.get_or_init(|| {
        let (tx, rx) = unbounded();
        Channel { tx, rx: Mutex::new(rx), queued: AtomicUsize::new(0), dropped: AtomicU64::new(0) }
    })
}

struct Bridge;

impl Log for Bridge {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level() && metadata.target().starts_with("p2pchat")
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => 40,
            Level::Warn => 30,
            Level::Info => 20,
            Level::Debug => 10,
            Level::Trace => 5,
        };
        let logger = record.target().replace("::", ".");
        channel().push((logger, level, record.args().to_string()));
    }

    fn flush(&self) {}
}

static BRIDGE: Bridge = Bridge;

/// Set the most verbose Python level that Rust should emit (e.g. `logging.DEBUG`).
#[pyfunction]
fn _set_log_level(level: i32) {
    log::set_max_level(match level {
        i32::MIN..=5 => LevelFilter::Trace,
        6..=10 => LevelFilter::Debug,
        11..=20 => LevelFilter::Info,
        21..=30 => LevelFilter::Warn,
        31..=50 => LevelFilter::Error,
        _ => LevelFilter::Off,
    });
}

/// The log records waiting, as `(logger, level, message)` tuples (at most 256), plus a notice if
/// records were dropped because nobody drained them in time. With `wait`, first sleep until one comes
/// (or `_wake_log_bridge`).
#[pyfunction]
fn _next_log_records(py: Python<'_>, wait: bool) -> Vec<LogLine> {
    py.detach(|| {
        let channel = channel();
        let Ok(rx) = channel.rx.lock() else { return Vec::new() };
        let mut out = Vec::new();
        if wait {
            if let Ok(item) = rx.recv() {
                channel.take_into(item, &mut out);
            }
        }
        while out.len() < 256 {
            match rx.try_recv() {
                Ok(item) => channel.take_into(item, &mut out),
                Err(_) => break,
            }
        }
        let dropped = channel.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            out.push(("p2pchat".to_owned(), 30, format!("{dropped} log records were dropped (logging fell behind)")));
        }
        out
    })
}

/// Make a waiting `_next_log_records` return now.
#[pyfunction]
fn _wake_log_bridge() {
    // Cannot fail: the channel's receiver lives as long as the process.
    let _ = channel().tx.send(Item::Wake);
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Another extension may have installed a `log` logger in this process already; then ours stays off.
    if log::set_logger(&BRIDGE).is_ok() {
        log::set_max_level(LevelFilter::Warn);
    }
    m.add_function(wrap_pyfunction!(_set_log_level, m)?)?;
    m.add_function(wrap_pyfunction!(_next_log_records, m)?)?;
    m.add_function(wrap_pyfunction!(_wake_log_bridge, m)?)?;
    Ok(())
}
