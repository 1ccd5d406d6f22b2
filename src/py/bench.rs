//! `p2pchat._core._bench_*`: the Rust load generators of the benchmark (`benches/run.py`), run on the
//! shared runtime with the GIL released. Results come back as plain dicts.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::BorrowedFd;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::{seconds, wait, P2PChatError};
use crate::bench::latency_floor::RawLinks;
use crate::bench::{fanout, tracker_load, BenchError};

impl From<BenchError> for PyErr {
    fn from(err: BenchError) -> PyErr {
        match err {
            BenchError::Setting(_) => PyValueError::new_err(err.to_string()),
            _ => P2PChatError::new_err(err.to_string()),
        }
    }
}

fn positive_seconds(value: f64, what: &str) -> PyResult<Duration> {
    seconds(Some(value))?
        .filter(|d| !d.is_zero())
        .ok_or_else(|| PyValueError::new_err(format!("{what} must be above zero")))
}

/// Hold `registrations` at the tracker at `host:port`, then join for `duration` seconds with
/// `concurrency` workers, each join reading the full list. `protocol` is "p2pchat", "original", or
/// "raw" for `_bench_raw_list_server` (the floor; each join reads its `list_bytes`).
#[pyfunction]
#[pyo3(signature = (host, port, protocol, registrations, *, list_bytes = None, concurrency = 4, duration = 2.0))]
#[allow(clippy::too_many_arguments)] // a Python signature: keyword arguments, not a struct
fn _bench_tracker_joins<'py>(
    py: Python<'py>,
    host: &str,
    port: u16,
    protocol: &str,
    registrations: usize,
    list_bytes: Option<usize>,
    concurrency: usize,
    duration: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let tracker = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| PyValueError::new_err(format!("cannot resolve {host}:{port}")))?;
    let protocol = match (protocol, list_bytes) {
        ("p2pchat", None) => tracker_load::TrackerProtocol::P2pchat,
        ("original", None) => tracker_load::TrackerProtocol::Original,
        ("raw", Some(list_bytes)) => tracker_load::TrackerProtocol::Raw { list_bytes },
        ("raw", None) => return Err(PyValueError::new_err("protocol 'raw' needs list_bytes")),
        ("p2pchat" | "original", Some(_)) => {
            return Err(PyValueError::new_err("list_bytes is for protocol 'raw' only"))
        }
        (other, _) => {
            return Err(PyValueError::new_err(format!(
                "protocol must be 'p2pchat', 'original' or 'raw', not {other:?}"
            )))
        }
    };
    let load = tracker_load::JoinLoad {
        tracker,
        protocol,
        registrations,
        concurrency,
        duration: positive_seconds(duration, "duration")?,
    };
    join_report(py, wait(py, tracker_load::run(load))??)
}

/// The tracker scenario's floor, for a process of its own (as a tracker is): listen on `host:port`
/// (0: any free port), call `on_listening(port)`, then answer every connection with `list_bytes`
/// bytes and nothing else, until Ctrl-C (`KeyboardInterrupt`) or the process is ended.
#[pyfunction]
#[pyo3(signature = (list_bytes, on_listening, *, host = "127.0.0.1", port = 0))]
fn _bench_raw_list_server(
    py: Python<'_>,
    list_bytes: usize,
    on_listening: Bound<'_, PyAny>,
    host: &str,
    port: u16,
) -> PyResult<()> {
    let listener = wait(py, tokio::net::TcpListener::bind((host.to_owned(), port)))?
        .map_err(|e| P2PChatError::new_err(format!("cannot listen on {host}:{port}: {e}")))?;
    let port = listener.local_addr().map_err(|e| P2PChatError::new_err(e.to_string()))?.port();
    on_listening.call1((port,))?;
    wait(py, tracker_load::serve_raw_list(listener, list_bytes))
}

fn join_report(py: Python<'_>, report: tracker_load::JoinReport) -> PyResult<Bound<'_, PyDict>> {
    let out = PyDict::new(py);
    out.set_item("joins", report.joins)?;
    out.set_item("failures", report.failures)?;
    out.set_item("seconds", report.seconds)?;
    out.set_item("joins_per_second", report.joins_per_second())?;
    out.set_item("list_bytes", report.list_bytes)?;
    out.set_item("entries", report.entries)?;
    out.set_item("min_entries", report.min_entries)?;
    out.set_item("setup_seconds", report.setup_seconds)?;
    Ok(out)
}

/// The raw TCP fan-out floor: `nodes` in a full mesh on loopback, each sending `message` `rate` times
/// a second for `duration` seconds, one write per message per link, on every core. Not interruptible
/// by Ctrl-C (it ends after `duration` plus `drain` seconds).
#[pyfunction]
#[pyo3(signature = (nodes, rate, message, *, duration = 2.0, drain = 2.0))]
fn _bench_fanout<'py>(
    py: Python<'py>,
    nodes: usize,
    rate: u32,
    message: Vec<u8>,
    duration: f64,
    drain: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let load = fanout::FanoutLoad {
        nodes,
        rate,
        message,
        duration: positive_seconds(duration, "duration")?,
        drain: positive_seconds(drain, "drain")?,
    };
    // The floor gets a runtime of its own with a worker per core: the shared runtime has one worker
    // (right for a chat peer), and the floor must show what the sockets allow on the whole machine.
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let floor_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
        .map_err(|e| P2PChatError::new_err(format!("cannot start the floor's runtime: {e}")))?;
    let report = py.detach(|| floor_runtime.block_on(fanout::run(load)))?;
    let out = PyDict::new(py);
    out.set_item("sent", report.sent)?;
    out.set_item("delivered", report.delivered)?;
    out.set_item("expected", report.expected)?;
    out.set_item("seconds", report.seconds)?;
    Ok(out)
}

/// The latency scenario's sockets floor: a process's links, read by a Rust thread that takes the time
/// of every message as it reads it (see `bench::latency_floor`).
#[pyclass(frozen, name = "_BenchRawLinks", module = "p2pchat._core")]
struct PyRawLinks(RawLinks);

#[pymethods]
impl PyRawLinks {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Self(RawLinks::start()?))
    }

    /// Read and send on a copy of the connected socket `link` (any object with `fileno()`); the
    /// caller's socket may be closed afterwards.
    fn add(&self, link: &Bound<'_, PyAny>) -> PyResult<()> {
        let fd: i32 = link.call_method0("fileno")?.extract()?;
        if fd < 0 {
            return Err(PyValueError::new_err("the socket is closed"));
        }
        // SAFETY: `fd` is the descriptor of `link`, which holds it open for the length of this call;
        // it is only duplicated here (an invalid one fails to duplicate with EBADF).
        let copy = unsafe { BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .map_err(|e| P2PChatError::new_err(e.to_string()))?;
        Ok(self.0.add(TcpStream::from(copy))?)
    }

    /// Write `message` to every link; returns how many took it.
    fn send(&self, py: Python<'_>, message: Vec<u8>) -> usize {
        py.detach(|| self.0.send(&message))
    }

    /// What arrived since the last call: `{"counts": {sender: n}, "latencies_ns": [...]}`.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let received = self.0.take();
        let out = PyDict::new(py);
        out.set_item("counts", received.counts)?;
        out.set_item("latencies_ns", PyList::new(py, received.latencies_ns)?)?;
        Ok(out)
    }

    fn __len__(&self) -> usize {
        self.0.link_count()
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Set as attributes, not added: the module's `__all__` (its public API, which `_core.pyi` states)
    // is the same with and without the benchmark's helpers.
    m.setattr("_BenchRawLinks", m.py().get_type::<PyRawLinks>())?;
    m.setattr("_bench_tracker_joins", wrap_pyfunction!(_bench_tracker_joins, m)?)?;
    m.setattr("_bench_fanout", wrap_pyfunction!(_bench_fanout, m)?)?;
    m.setattr("_bench_raw_list_server", wrap_pyfunction!(_bench_raw_list_server, m)?)?;
    Ok(())
}
