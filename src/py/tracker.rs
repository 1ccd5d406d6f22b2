//! `p2pchat.Tracker`: the core tracker, running in the background from the moment it is created.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::sync::{oneshot, watch};

use super::{activate, register_live, runtime, seconds, wait, Closable, InvalidInput, P2PChatError, Port};
use crate::tracker::{Tracker, TrackerConfig, TrackerHandle};

/// How long `stop()` waits for the tracker's task to end.
const STOP_WAIT: Duration = Duration::from_secs(2);

struct Control {
    handle: TrackerHandle,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    stopped: watch::Receiver<bool>,
}

impl Control {
    fn request_stop(&self) {
        if let Some(stop) = self.stop.lock().ok().and_then(|mut s| s.take()) {
            let _ = stop.send(());
        }
    }

    async fn until_stopped(mut stopped: watch::Receiver<bool>) {
        let _ = stopped.wait_for(|done| *done).await;
    }

    /// Ask the tracker to stop, then wait (up to [`STOP_WAIT`]) until its listening socket is closed.
    fn stopping(&self) -> impl std::future::Future<Output = PyResult<()>> + Send + 'static {
        self.request_stop();
        let stopped = self.stopped.clone();
        async move {
            tokio::time::timeout(STOP_WAIT, Control::until_stopped(stopped))
                .await
                .map_err(|_| P2PChatError::new_err("the tracker did not stop within 2 s"))
        }
    }
}

impl Closable for Control {
    fn close_blocking(&self) {
        self.request_stop();
        let stopped = self.stopped.clone();
        let _ =
            runtime().block_on(async move { tokio::time::timeout(STOP_WAIT, Control::until_stopped(stopped)).await });
    }
}

/// A p2pchat tracker, speaking the original tracker's protocol. It starts serving in the background as
/// soon as it is created; `port=0` picks a free port (see `address`).
///
/// `registration_timeout`: a p2pchat peer that stops pinging is dropped after this many seconds.
/// `original_ttl`: an original peer nobody vouched for in this many seconds is probed, and dropped if
/// the probe fails.
/// `relay`: relay messages between p2pchat members that cannot reach each other (off by default: the
/// tracker then never carries a chat message).
///
/// >>> with Tracker(host="127.0.0.1", port=0) as tracker:
/// ...     host, port = tracker.address
#[pyclass(frozen, name = "Tracker", module = "p2pchat._core", weakref)]
pub struct PyTracker {
    control: Arc<Control>,
}

/// Where to listen: `host` looked up with the GIL released (see `peer::look_up`).
fn resolve(py: Python<'_>, host: &str, port: u16) -> PyResult<SocketAddr> {
    super::peer::look_up(py, host, port)
        .map_err(|why| InvalidInput::new_err(format!("cannot use {host:?} as an address to listen on: {why}")))
}

#[pymethods]
impl PyTracker {
    #[new]
    #[pyo3(signature = (host = "0.0.0.0", port = Port(crate::protocol::DEFAULT_PORT), *, original_ttl = 45.0, registration_timeout = 6.0, relay = false))]
    // The signature Python shows (and stubtest checks `_core.pyi` against): `port` would show as `...`.
    #[pyo3(text_signature = "(host='0.0.0.0', port=7472, *, original_ttl=45.0, registration_timeout=6.0, relay=False)")]
    fn new(
        py: Python<'_>,
        host: &str,
        port: Port,
        original_ttl: f64,
        registration_timeout: f64,
        relay: bool,
    ) -> PyResult<Self> {
        activate(py)?;
        let positive = |name: &str, value: f64| match seconds(Some(value))? {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(InvalidInput::new_err(format!("{name} must be a positive number of seconds"))),
        };
        let config = TrackerConfig {
            listen: resolve(py, host, port.0)?,
            original_ttl: positive("original_ttl", original_ttl)?,
            registration_timeout: positive("registration_timeout", registration_timeout)?,
            relay,
            ..TrackerConfig::default()
        };
        let tracker = wait(py, Tracker::bind(config))??;
        let handle = tracker.handle();
        let (stop, stop_requested) = oneshot::channel::<()>();
        let (stopped_tx, stopped) = watch::channel(false);
        runtime().spawn(async move {
            tracker
                .run(async move {
                    let _ = stop_requested.await;
                })
                .await;
            let _ = stopped_tx.send(true);
        });
        let control = Arc::new(Control { handle, stop: Mutex::new(Some(stop)), stopped });
        let weak = Arc::downgrade(&control);
        register_live(weak);
        Ok(Self { control })
    }

    /// The `(host, port)` the tracker listens on; the real port when it was created with `port=0`.
    #[getter]
    fn address(&self) -> (String, u16) {
        let addr = self.control.handle.local_addr();
        (addr.ip().to_string(), addr.port())
    }

    /// Whether the tracker is still serving.
    #[getter]
    fn running(&self) -> bool {
        !*self.control.stopped.borrow()
    }

    /// The `(ip, port)` addresses of a room's members, oldest first; the default room ("", where
    /// original clients are) unless `room` is given.
    #[pyo3(signature = (room = ""))]
    fn peers(&self, py: Python<'_>, room: &str) -> PyResult<Vec<(String, u16)>> {
        let handle = self.control.handle.clone();
        let room = room.to_owned();
        let members = wait(py, async move { handle.members(&room).await })??;
        Ok(members.into_iter().map(|(a, _)| (a.ip().to_string(), a.port())).collect())
    }

    /// Block until the tracker stops (another thread calls `stop()`), or raise `KeyboardInterrupt` on
    /// Ctrl-C; the tracker keeps running in that case until `stop()` or exit.
    fn serve_forever(&self, py: Python<'_>) -> PyResult<()> {
        wait(py, Control::until_stopped(self.control.stopped.clone()))
    }

    /// Stop serving and wait (up to 2 s) until the listening socket is closed. Stopping twice is fine.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        wait(py, self.control.stopping())?
    }

    /// `await tracker.stop_async()`: `stop()` without blocking the event loop.
    fn stop_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        super::awaitables::future_into_py(py, self.control.stopping())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// `async with Tracker(...) as tracker:` (it is serving from creation; leaving stops it).
    fn __aenter__<'py>(slf: Py<Self>, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        super::awaitables::future_into_py(py, async move { Ok(slf) })
    }

    #[pyo3(signature = (*_exc))]
    fn __aexit__<'py>(&self, py: Python<'py>, _exc: &Bound<'py, pyo3::types::PyTuple>) -> PyResult<Bound<'py, PyAny>> {
        let stopping = self.control.stopping();
        super::awaitables::future_into_py(py, async move {
            stopping.await?;
            Ok(false)
        })
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let addr = self.control.handle.local_addr();
        let state = if self.running() { "running" } else { "stopped" };
        format!("<p2pchat.Tracker {addr} {state}>")
    }
}
