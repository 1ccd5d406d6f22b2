//! History: each peer's local log of its room, the clock that orders it, and where it lives on disk.
//!
//! * [`clock`]: hybrid logical clock stamps, the order all p2pchat peers agree on;
//! * [`store`]: the SQLite log (blocking);
//! * [`log`]: the thread that owns a store, and the handle the peer's tasks use.
//!
//! The history protocol itself (asking members for what we miss, answering within limits) is the
//! peer's (`peer::actor`, `wire::frames`).

pub mod clock;
pub mod log;
pub mod store;

use std::path::PathBuf;

/// Overrides the platform's data directory (tests and portable installs).
pub const DATA_DIR_ENV: &str = "P2PCHAT_DATA_DIR";

/// Where a user's log lives unless told otherwise: `$P2PCHAT_DATA_DIR`, else the platform's per-user
/// data directory (`~/.local/share/p2pchat` on Linux, `~/Library/Application Support/p2pchat` on macOS,
/// `%APPDATA%\p2pchat` on Windows), else `.p2pchat` in the current directory.
pub fn default_dir() -> PathBuf {
    match std::env::var_os(DATA_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => dirs::data_dir().map_or_else(|| PathBuf::from(".p2pchat"), |d| d.join("p2pchat")),
    }
}
