//! p2pchat: a peer-to-peer group chat with a tiny tracker, wire-compatible with the original asyncio
//! `server.py` / `client.py` pair.
//!
//! The core knows nothing of Python: [`tracker`] and [`peer`] are tokio services built on the pure
//! [`wire`] formats and the socket helpers in [`net`]; [`history`] is each peer's message log and the
//! clock that orders it. The `python` feature adds the PyO3 bindings in `py`, which maturin builds
//! into the `p2pchat._core` extension module; the `bench` feature adds the benchmark's Rust load
//! generators (`bench`), which wheels leave out.

#[cfg(feature = "bench")]
pub mod bench;
pub mod history;
pub mod identity;
pub mod net;
pub mod owner_only;
mod pairs;
pub mod peer;
pub mod private;
pub mod protocol;
mod reading;
mod sending;
pub mod tracker;
pub mod wire;

#[cfg(feature = "python")]
mod py;
