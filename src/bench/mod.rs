//! Load generators for the benchmark (`benches/run.py`), in Rust so that they are never the bottleneck.
//!
//! * [`tracker_load`] holds many live registrations at a tracker and then measures joins per second,
//!   each join reading the full list, against a p2pchat tracker or an original one.
//! * [`fanout`] is the floor for the throughput scenario: the same chat bytes sent over a full TCP mesh
//!   on loopback with no protocol work at all, to show how close p2pchat gets to what sockets allow.
//! * [`latency_floor`] is the latency scenario's sockets floor: a peer process's links read by Rust,
//!   timing each message as it is read.
//!
//! Neither is used by the chat itself; the Python module exposes them as `p2pchat._core.bench`.

pub mod fanout;
pub mod latency_floor;
pub mod tracker_load;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the tracker at {addr} answered something unexpected: {what}")]
    Protocol { addr: std::net::SocketAddr, what: String },
    #[error("invalid benchmark setting: {0}")]
    Setting(String),
}
