//! Rust futures as asyncio awaitables (pyo3-async-runtimes), each tracked until the bridge has let go
//! of Python, so that the interpreter does not finalize under a bridge still finishing.
//!
//! pyo3-async-runtimes finishes every future on a thread of the runtime, attached to Python: to set its
//! result, or, for a future asyncio cancelled, to see that it was. That thread can come late, when the
//! machine is busy; if it attaches once the interpreter has begun to finalize, CPython aborts the
//! process ("PyGILState_Release: thread state ... must be current when releasing", pyo3-async-runtimes
//! issues #40 and #90). An asyncio program that ended on Ctrl-C while awaiting a message did, in
//! one exit of three to seven with two busy processes beside it.
//!
//! The bridge's task locals are the last Python objects it lets go of: released inside that attached
//! call, or, when its other task drops them unattached, when a thread next attaches. So each future
//! gets task locals of its own (what `future_into_py` builds anyway: the running loop and a copy of the
//! context), and a weak reference to that copy says when the bridge is done. [`wait_for_all`], run
//! by `_shutdown` at exit, waits for every one.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyWeakrefReference;
use pyo3_async_runtimes::TaskLocals;

/// The bridges not done yet, by number: their weak references (which must live for their callbacks
/// to run). Never held while calling into Python: a collection there can run a callback, which takes it.
static OPEN: Mutex<BTreeMap<u64, Py<PyWeakrefReference>>> = Mutex::new(BTreeMap::new());
static DONE: Condvar = Condvar::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The most `_shutdown` waits for bridges: each needs only its thread's turn at the interpreter.
const WAIT_AT_EXIT: Duration = Duration::from_secs(2);
/// How long a detached wait lasts before re-attaching, which releases what bridges dropped unattached.
const SLICE: Duration = Duration::from_millis(10);

/// Called by a weak reference when its bridge's task locals are gone.
#[pyclass(frozen)]
struct BridgeDone {
    id: u64,
}

#[pymethods]
impl BridgeDone {
    fn __call__(&self, _gone: &Bound<'_, PyAny>) {
        let weakref = open().remove(&self.id);
        DONE.notify_all();
        // Dropped outside the lock (this very weak reference is calling; CPython allows that).
        drop(weakref);
    }
}

fn open() -> MutexGuard<'static, BTreeMap<u64, Py<PyWeakrefReference>>> {
    OPEN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `pyo3_async_runtimes::tokio::future_into_py`, with the bridge tracked until it is done with Python.
pub(super) fn future_into_py<F, T>(py: Python<'_>, fut: F) -> PyResult<Bound<'_, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'py> IntoPyObject<'py> + Send + 'static,
{
    let locals = TaskLocals::with_running_loop(py)?.copy_context(py)?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    // Its callback cannot come before the insert: `locals` holds the context until the bridge has it.
    let weakref = PyWeakrefReference::new_with(&locals.context(py), BridgeDone { id })?;
    open().insert(id, weakref.unbind());
    pyo3_async_runtimes::tokio::future_into_py_with_locals(py, locals, fut)
}

/// Wait, detached, until every bridge is done with Python, or [`WAIT_AT_EXIT`] passed.
pub(super) fn wait_for_all(py: Python<'_>) {
    let deadline = Instant::now() + WAIT_AT_EXIT;
    loop {
        let all_done = py.detach(|| {
            let slice = SLICE.min(deadline.saturating_duration_since(Instant::now()));
            let (open, _) =
                DONE.wait_timeout_while(open(), slice, |open| !open.is_empty()).unwrap_or_else(PoisonError::into_inner);
            open.is_empty()
        });
        if all_done || Instant::now() >= deadline {
            return;
        }
    }
}
