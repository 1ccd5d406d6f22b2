//! PyO3 bindings: the `p2pchat._core` extension module. Only adaptation lives here; the logic is in the
//! Python-free core.
//!
//! * One tokio runtime per process (pyo3-async-runtimes' shared one: a worker per core, or
//!   `TOKIO_WORKER_THREADS`). p2pchat's tokio tasks never call into Python: results reach Python as
//!   return values of blocking calls (GIL released; on the main thread woken every 100 ms so Ctrl-C
//!   works, see [`wait`]) or through pyo3-async-runtimes awaitables (see [`awaitables`]); Rust logs go
//!   through a channel that a Python thread drains (see [`logging`]).
//! * Errors map to a small hierarchy under `P2PChatError`, defined in Python (`p2pchat/_errors.py`)
//!   so that each class can also derive from the builtin a caller would catch (`InvalidInput` is a
//!   `ValueError`, `TrackerUnreachable` a `ConnectionError`, ...); raised here by importing them.
//! * `_shutdown()`, registered with `atexit` by the Python package, closes every live peer and tracker
//!   before the interpreter finalizes, then waits for the awaitables to be finished, so nothing is
//!   left half-written and nothing touches a dying interpreter.

mod awaitables;
#[cfg(feature = "bench")]
mod bench;
mod logging;
mod peer;
mod tracker;

use std::cell::Cell;
use std::future::Future;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use pyo3::import_exception;
use pyo3::prelude::*;

use crate::peer::PeerError;
use crate::tracker::TrackerError;

import_exception!(p2pchat._errors, P2PChatError);
import_exception!(p2pchat._errors, InvalidInput);
import_exception!(p2pchat._errors, TrackerUnreachable);
import_exception!(p2pchat._errors, AddressInUse);
import_exception!(p2pchat._errors, PeerClosed);
import_exception!(p2pchat._errors, HistoryError);
import_exception!(p2pchat._errors, IdentityError);

/// A whole number from Python within `low..=high` (`what` names it in the error). Out of range, it is
/// `InvalidInput` (a `ValueError`) saying which values are allowed, where pyo3's own conversion to a
/// Rust integer raises a bare `OverflowError`; not a number stays a `TypeError`.
fn whole_in(obj: Borrowed<'_, '_, PyAny>, low: i64, high: i64, what: &str) -> PyResult<i64> {
    let out_of_range = |shown: &dyn std::fmt::Display| {
        InvalidInput::new_err(format!("{what} must be between {low} and {high}, not {shown}"))
    };
    let value: i64 = obj.extract().map_err(|err: PyErr| {
        if err.is_instance_of::<pyo3::exceptions::PyOverflowError>(obj.py()) {
            out_of_range(&*obj)
        } else {
            err
        }
    })?;
    if (low..=high).contains(&value) {
        Ok(value)
    } else {
        Err(out_of_range(&value))
    }
}

/// A TCP port argument (0: any free one).
pub(crate) struct Port(pub u16);

impl<'a, 'py> FromPyObject<'a, 'py> for Port {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Self(whole_in(obj, 0, u16::MAX.into(), "a port")? as u16))
    }
}

/// A count argument (messages, a limit): zero or more.
pub(crate) struct Count(pub usize);

impl<'a, 'py> FromPyObject<'a, 'py> for Count {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let most = i64::try_from(usize::MAX).unwrap_or(i64::MAX);
        Ok(Self(whole_in(obj, 0, most, "a count")? as usize))
    }
}

/// A rate argument (per second).
pub(crate) struct Rate(pub u32);

impl<'a, 'py> FromPyObject<'a, 'py> for Rate {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        Ok(Self(whole_in(obj, 0, u32::MAX.into(), "a rate")? as u32))
    }
}

/// How often a blocking wait wakes up to let Python handle signals (Ctrl-C).
const SIGNAL_SLICE: Duration = Duration::from_millis(100);

fn runtime() -> &'static tokio::runtime::Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

/// Drive `fut` to completion on this thread, inside the shared runtime, with the GIL released. Driving it
/// here rather than spawning it saves a task and a hop between threads on every call (`send` is one).
///
/// Only the main thread runs Python's signal handlers, so only there is the wait cut into
/// [`SIGNAL_SLICE`]s, after each of which Ctrl-C drops the future and raises `KeyboardInterrupt`. A
/// thread that waits for messages sleeps until one comes: an idle peer wakes nobody (a slice's timer
/// also woke the runtime's worker).
fn wait<T: Send>(py: Python<'_>, fut: impl Future<Output = T> + Send) -> PyResult<T> {
    let rt = runtime();
    let mut fut = std::pin::pin!(fut);
    if !on_main_thread(py) {
        return Ok(py.detach(|| rt.block_on(fut)));
    }
    loop {
        let outcome = py.detach(|| rt.block_on(async { tokio::time::timeout(SIGNAL_SLICE, fut.as_mut()).await }));
        match outcome {
            Ok(value) => return Ok(value),
            Err(_slice_elapsed) => py.check_signals()?,
        }
    }
}

/// Whether this is the interpreter's main thread (the one signal handlers run on); asked once per thread.
fn on_main_thread(py: Python<'_>) -> bool {
    thread_local!(static MAIN: Cell<Option<bool>> = const { Cell::new(None) });
    MAIN.with(|main| {
        if let Some(known) = main.get() {
            return known;
        }
        let ask = || -> PyResult<bool> {
            let threading = py.import("threading")?;
            Ok(threading.call_method0("current_thread")?.is(&threading.call_method0("main_thread")?))
        };
        // If Python cannot tell, slice the wait as on the main thread: Ctrl-C must work.
        let main_or_unsure = ask().unwrap_or(true);
        main.set(Some(main_or_unsure));
        main_or_unsure
    })
}

fn seconds(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t))),
        Some(t) => Err(InvalidInput::new_err(format!("timeout must be a non-negative number of seconds, not {t}"))),
    }
}

impl From<PeerError> for PyErr {
    fn from(err: PeerError) -> PyErr {
        let message = err.to_string();
        match err {
            PeerError::InvalidInput(_)
            | PeerError::NothingToJoin
            | PeerError::UnnamedPrivateRoom
            | PeerError::RoomKeyMismatch { .. }
            | PeerError::NotTrusted(_) => InvalidInput::new_err(message),
            PeerError::TrackerLookup { .. }
            | PeerError::TrackerUnreachable { .. }
            | PeerError::TrackerSilent { .. }
            | PeerError::TrackerRefused { .. } => TrackerUnreachable::new_err(message),
            PeerError::AddressInUse { .. } => AddressInUse::new_err(message),
            PeerError::Listen { .. } => P2PChatError::new_err(message),
            PeerError::History(_) => HistoryError::new_err(message),
            PeerError::Identity(_) | PeerError::Trust(_) => IdentityError::new_err(message),
            PeerError::Closed => PeerClosed::new_err(message),
        }
    }
}

impl From<TrackerError> for PyErr {
    fn from(err: TrackerError) -> PyErr {
        let message = err.to_string();
        match err {
            TrackerError::AddressInUse { .. } => AddressInUse::new_err(message),
            TrackerError::Bind { .. } | TrackerError::Stopped => P2PChatError::new_err(message),
        }
    }
}

/// Something `_shutdown` must close at interpreter exit.
trait Closable: Send + Sync {
    fn close_blocking(&self);
}

static LIVE: Mutex<Vec<Weak<dyn Closable>>> = Mutex::new(Vec::new());

/// Start what importing p2pchat does not (`p2pchat._activation`: the log bridge's thread and the exit
/// hooks); called first by every Tracker and Peer constructor, and cheap after the first.
fn activate(py: Python<'_>) -> PyResult<()> {
    static ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !ACTIVE.load(std::sync::atomic::Ordering::Acquire) {
        // Idempotent on the Python side, so two threads racing here both succeed.
        py.import("p2pchat._activation")?.call_method0("activate")?;
        ACTIVE.store(true, std::sync::atomic::Ordering::Release);
    }
    Ok(())
}

fn register_live(item: Weak<dyn Closable>) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|w| w.strong_count() > 0);
        live.push(item);
    }
}

/// Close every live peer and tracker (called by `atexit`).
#[pyfunction]
fn _shutdown(py: Python<'_>) {
    let live: Vec<_> = LIVE.lock().map(|mut l| std::mem::take(&mut *l)).unwrap_or_default();
    py.detach(|| {
        for item in live.iter().filter_map(Weak::upgrade) {
            item.close_blocking();
        }
    });
    // Closing ended every future still awaited; pyo3-async-runtimes finishes each on a runtime thread.
    awaitables::wait_for_all(py);
}

#[pymodule(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_PORT", crate::protocol::DEFAULT_PORT)?;
    m.add("MAX_NAME_CHARS", crate::wire::chat::MAX_NAME_CHARS)?;
    m.add("MAX_TEXT_BYTES", crate::wire::chat::MAX_TEXT_BYTES)?;
    m.add("MAX_ROOM_CHARS", crate::wire::chat::MAX_ROOM_CHARS)?;
    m.add_class::<tracker::PyTracker>()?;
    m.add_class::<peer::PyPeer>()?;
    m.add_class::<peer::PyMessage>()?;
    m.add_class::<peer::PyPeerJoined>()?;
    m.add_class::<peer::PyPeerLeft>()?;
    m.add_class::<peer::PyPeerRenamed>()?;
    m.add_class::<peer::PyNotice>()?;
    m.add_class::<peer::PyHistorySynced>()?;
    m.add_class::<peer::PyEventStream>()?;
    m.add_class::<peer::PyPeerInfo>()?;
    m.add_function(wrap_pyfunction!(_shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(peer::default_data_dir, m)?)?;
    m.add_function(wrap_pyfunction!(peer::new_invite_code, m)?)?;
    logging::register(m)?;
    #[cfg(feature = "bench")]
    bench::register(m)?;
    Ok(())
}
