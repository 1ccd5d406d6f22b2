//! The local message log: one SQLite database per data directory, a table of messages keyed by room
//! and the room's agreed order `(stamp, id)`.
//!
//! Blocking; only the log thread ([`super::log`]) touches it. Messages from original peers are kept
//! with a locally made id and `shared = 0`: they are shown from this peer's own log but never served
//! to other peers, because every p2pchat peer received them separately and has its own copy.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::path::PathBuf;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use thiserror::Error;

/// The database file inside a data directory.
pub const FILE_NAME: &str = "history.sqlite3";
/// Messages an in-memory log keeps per room (a peer run without a log on disk).
pub const MEMORY_KEEPS: usize = 20_000;

/// How much of each room a log on disk keeps: the newest `messages`, and none older than
/// `max_age` (by its stamp). Older messages are deleted as new ones come, so a log cannot grow
/// without bound however long a room lives or however much it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub messages: usize,
    pub max_age: std::time::Duration,
}

impl Default for Retention {
    /// A year, and 100,000 messages per room (about 20 MB of a busy room's text).
    fn default() -> Self {
        Self { messages: 100_000, max_age: std::time::Duration::from_secs(365 * 24 * 3600) }
    }
}
/// 2: messages carry their author's key and signature (private rooms).
const SCHEMA_VERSION: i64 = 2;

/// Where a peer keeps its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `FILE_NAME` in this directory (created if missing).
    Dir(PathBuf),
    /// In memory for this session only: nothing is written to disk.
    Memory,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot create the history directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot open the history file {path}: {reason}. It was left as it is; move it away (a new one \
             is started), choose another directory with --data-dir, or run with --no-history"
    )]
    Unusable { path: PathBuf, reason: String },
    #[error("the history log failed: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// One logged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    /// Its place in the room's order (see `clock`).
    pub stamp: u64,
    /// The author's wall clock when it was said, in milliseconds since the epoch.
    pub sent_at: u64,
    pub sender: Option<String>,
    pub text: String,
    /// Written by a p2pchat peer (served to others); false for lines from original peers.
    pub shared: bool,
    /// In a private room, the author's key and signature (see `Chat`), passed on with the message.
    pub author_key: Option<String>,
    pub sig: Option<String>,
}

impl Record {
    /// About how many bytes it takes in a history answer (its text, names and JSON envelope).
    pub fn wire_size(&self) -> usize {
        wire_size(&self.text, self.sender.as_deref().unwrap_or(""), &self.id)
    }
}

/// About how many bytes a message takes in a history answer: its text, sender and id, and the JSON
/// around them (field names, room, stamps).
pub fn wire_size(text: &str, sender: &str, id: &str) -> usize {
    const ENVELOPE_BYTES: usize = 96;
    text.len() + sender.len() + id.len() + ENVELOPE_BYTES
}

/// A position in a room's order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub stamp: u64,
    pub id: String,
}

/// Which records a query wants: strictly after `after`, strictly before `before`, the newest `limit`
/// of them (returned oldest first), and no more than `max_bytes` of them ([`Record::wire_size`]).
#[derive(Debug, Clone)]
pub struct Query {
    pub after: Option<Key>,
    pub before: Option<Key>,
    pub limit: usize,
    pub max_bytes: usize,
    pub shared_only: bool,
}

impl Query {
    pub fn latest(limit: usize) -> Self {
        Self { after: None, before: None, limit, max_bytes: usize::MAX, shared_only: false }
    }
}

pub struct Store {
    conn: Connection,
    in_memory: bool,
    inserted_since_prune: usize,
    retention: Retention,
    /// Room name to its number in the `rooms` table.
    rooms: HashMap<String, i64>,
}

/// SQLite gives each connection a 48 KB pool for its small allocations (lookaside), written through
/// when it is set up, so every peer process holds all of it. The log runs a few cached statements:
/// 8 KB inserts as fast (1.2 µs a row in batches of 1,000, measured against the default), while no
/// pool at all costs 12 to 18% more per row. Set before the connection allocates anything; if that
/// fails the default stays.
fn small_lookaside(conn: Connection) -> Connection {
    const SLOT_BYTES: c_int = 512;
    const SLOTS: c_int = 16;
    // SAFETY: the handle is a live connection no other thread sees; with a null buffer SQLite
    // allocates the pool itself.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_config(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<c_void>(),
            SLOT_BYTES,
            SLOTS,
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        log::debug!("SQLite kept its default lookaside (code {rc})");
    }
    conn
}

impl Store {
    pub fn open(location: &Location) -> Result<Self, StoreError> {
        let (conn, in_memory, found_version) = match location {
            Location::Memory => (small_lookaside(Connection::open_in_memory()?), true, 0),
            Location::Dir(dir) => {
                crate::owner_only::create_dir(dir)
                    .map_err(|source| StoreError::CreateDir { path: dir.clone(), source })?;
                let path = dir.join(FILE_NAME);
                let unusable = |reason: String| StoreError::Unusable { path: path.clone(), reason };
                // Owner-only before SQLite opens it: its -wal and -shm then take the same mode.
                crate::owner_only::own_file(&path).map_err(|e| unusable(e.to_string()))?;
                let flags =
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let conn =
                    small_lookaside(Connection::open_with_flags(&path, flags).map_err(|e| unusable(e.to_string()))?);
                let found_version = Self::prepare_file(&conn).map_err(unusable)?;
                (conn, false, found_version)
            }
        };
        // One B-tree, in the room's order: a message's stamp is fixed by its author, so (stamp, id)
        // identifies it as well as its id alone does, and a busy room's inserts are appends. Rooms are
        // numbered so that the key starts with an integer (a text first column cost a tenth of a busy
        // peer's CPU in string comparisons).
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS rooms (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
             CREATE TABLE IF NOT EXISTS messages (
                 room INTEGER NOT NULL,
                 stamp INTEGER NOT NULL,
                 id TEXT NOT NULL,
                 sent_at INTEGER NOT NULL,
                 sender TEXT,
                 text TEXT NOT NULL,
                 shared INTEGER NOT NULL,
                 author_key TEXT,
                 sig TEXT,
                 PRIMARY KEY (room, stamp, id)
             ) WITHOUT ROWID;",
        )?;
        if found_version == 1 {
            conn.execute_batch(&format!(
                "ALTER TABLE messages ADD COLUMN author_key TEXT;
                 ALTER TABLE messages ADD COLUMN sig TEXT;
                 PRAGMA user_version = {SCHEMA_VERSION};"
            ))?;
        }
        let retention = Retention::default();
        Ok(Self { conn, in_memory, inserted_since_prune: 0, retention, rooms: HashMap::new() })
    }

    /// Settings for a file shared by every peer of one user, and a check that it is ours; returns the
    /// format it was in (0: new), so an older one is brought up to date once its tables are there.
    fn prepare_file(conn: &Connection) -> Result<i64, String> {
        let settings = || -> rusqlite::Result<i64> {
            // Several clients of one user may run at once: WAL lets them read while one writes, and a
            // writer waits for another instead of failing.
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_query_value(None, "user_version", |row| row.get(0))
        };
        match settings().map_err(|e| e.to_string())? {
            0 => conn.pragma_update(None, "user_version", SCHEMA_VERSION).map(|()| 0).map_err(|e| e.to_string()),
            version @ (1 | SCHEMA_VERSION) => Ok(version),
            other => {
                Err(format!("it was written by a newer p2pchat (log format {other}, this one reads {SCHEMA_VERSION})"))
            }
        }
    }

    /// The number of `room`, creating it when `create` (else `None` for a room never logged).
    fn room_number(&mut self, room: &str, create: bool) -> Result<Option<i64>, StoreError> {
        if let Some(number) = self.rooms.get(room) {
            return Ok(Some(*number));
        }
        if create {
            self.conn.execute("INSERT OR IGNORE INTO rooms (name) VALUES (?1)", params![room])?;
        }
        let number =
            self.conn.query_row("SELECT id FROM rooms WHERE name = ?1", params![room], |row| row.get(0)).optional()?;
        if let Some(number) = number {
            self.rooms.insert(room.to_owned(), number);
        }
        Ok(number)
    }

    /// Store `records` of `room` in one transaction; for each, whether it was new (messages already
    /// stored are left as they are).
    /// Keep `retention` of each room from now on.
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
    }

    pub fn insert(&mut self, room: &str, records: &[Record]) -> Result<Vec<bool>, StoreError> {
        let room = self.room_number(room, true)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
        let tx = self.conn.transaction()?;
        let mut fresh = Vec::with_capacity(records.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO messages (room, id, stamp, sent_at, sender, text, shared, author_key, sig)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for r in records {
                let changed = insert.execute(params![
                    room,
                    r.id,
                    r.stamp as i64,
                    r.sent_at as i64,
                    r.sender,
                    r.text,
                    r.shared,
                    r.author_key,
                    r.sig
                ])?;
                fresh.push(changed == 1);
            }
        }
        // Pruned every tenth of the bound inserted: a busy room costs one DELETE per few thousand.
        let keep = if self.in_memory { MEMORY_KEEPS.min(self.retention.messages) } else { self.retention.messages };
        self.inserted_since_prune += records.len();
        if self.inserted_since_prune > (keep / 10).max(1) {
            self.inserted_since_prune = 0;
            tx.execute(
                "DELETE FROM messages WHERE room = ?1 AND stamp < (
                     SELECT stamp FROM messages WHERE room = ?1 ORDER BY stamp DESC LIMIT 1 OFFSET ?2)",
                params![room, i64::try_from(keep).unwrap_or(i64::MAX).saturating_sub(1)],
            )?;
            let now_ms = crate::history::clock::wall_millis();
            let max_age_ms = u64::try_from(self.retention.max_age.as_millis()).unwrap_or(u64::MAX);
            let oldest = crate::protocol::stamp_at(now_ms.saturating_sub(max_age_ms));
            tx.execute("DELETE FROM messages WHERE room = ?1 AND stamp < ?2", params![room, oldest as i64])?;
        }
        tx.commit()?;
        Ok(fresh)
    }

    /// The records `query` asks for, oldest first.
    pub fn query(&mut self, room: &str, query: &Query) -> Result<Vec<Record>, StoreError> {
        let Some(room) = self.room_number(room, false)? else { return Ok(Vec::new()) };
        let (after_stamp, after_id) = query.after.as_ref().map_or((-1, ""), |k| (k.stamp as i64, k.id.as_str()));
        let (before_stamp, before_id) =
            query.before.as_ref().map_or((i64::MAX, ""), |k| (k.stamp as i64, k.id.as_str()));
        let mut select = self.conn.prepare_cached(
            "SELECT id, stamp, sent_at, sender, text, shared, author_key, sig FROM messages
             WHERE room = ?1 AND (stamp, id) > (?2, ?3) AND (stamp, id) < (?4, ?5) AND (shared OR NOT ?6)
             ORDER BY stamp DESC, id DESC LIMIT ?7",
        )?;
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let rows = select.query_map(
            params![room, after_stamp, after_id, before_stamp, before_id, query.shared_only, limit],
            |row| {
                Ok(Record {
                    id: row.get(0)?,
                    stamp: row.get::<_, i64>(1)? as u64,
                    sent_at: row.get::<_, i64>(2)? as u64,
                    sender: row.get(3)?,
                    text: row.get(4)?,
                    shared: row.get(5)?,
                    author_key: row.get(6)?,
                    sig: row.get(7)?,
                })
            },
        )?;
        let mut newest_first = Vec::new();
        let mut bytes = 0usize;
        for row in rows {
            let record = row?;
            bytes += record.wire_size();
            if bytes > query.max_bytes && !newest_first.is_empty() {
                break;
            }
            newest_first.push(record);
        }
        newest_first.reverse();
        Ok(newest_first)
    }

    /// The newest position of `room` in this log, if it has any message from a p2pchat peer.
    pub fn newest_shared(&mut self, room: &str) -> Result<Option<Key>, StoreError> {
        let Some(room) = self.room_number(room, false)? else { return Ok(None) };
        let key = self
            .conn
            .query_row(
                "SELECT stamp, id FROM messages WHERE room = ?1 AND shared ORDER BY stamp DESC, id DESC LIMIT 1",
                params![room],
                |row| Ok(Key { stamp: row.get::<_, i64>(0)? as u64, id: row.get(1)? }),
            )
            .optional()?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, stamp: u64) -> Record {
        Record {
            id: id.into(),
            stamp,
            sent_at: stamp,
            sender: Some("ana".into()),
            text: format!("text {id}"),
            shared: true,
            author_key: None,
            sig: None,
        }
    }

    fn ids(records: &[Record]) -> Vec<&str> {
        records.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn a_log_keeps_its_newest_messages_and_none_past_their_age() {
        let dir = std::env::temp_dir().join(format!("p2pchat-keep-{}", crate::wire::frames::random_id()));
        let mut store = Store::open(&Location::Dir(dir.clone())).unwrap();
        store.set_retention(Retention { messages: 50, max_age: std::time::Duration::from_secs(3600) });
        let now = crate::history::clock::wall_millis();
        let stamp = |ms_ago: u64, n: u64| crate::protocol::stamp_at(now - ms_ago) + n;
        // Two hours old, then recent: 400 recent messages in batches, as the log writes them.
        store.insert("r", &[record("ancient", stamp(2 * 3_600_000, 0))]).unwrap();
        for batch in 0..40u64 {
            let records: Vec<Record> =
                (0..10).map(|i| record(&format!("m{batch:02}-{i}"), stamp(60_000, batch * 10 + i))).collect();
            store.insert("r", &records).unwrap();
        }
        let kept = store.query("r", &Query::latest(1_000)).unwrap();
        assert!(
            kept.len() <= 50 + 10,
            "{} kept: the bound, give or take the batches since the last pruning",
            kept.len()
        );
        assert!(kept.iter().all(|r| r.id != "ancient"), "older than the age bound");
        assert_eq!(kept.last().map(|r| r.id.as_str()), Some("m39-9"), "the newest stay");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn records_come_back_in_stamp_then_id_order_and_repeats_are_not_new() {
        let mut store = Store::open(&Location::Memory).unwrap();
        let fresh = store.insert("r", &[record("b", 2), record("a", 2), record("c", 1)]).unwrap();
        assert_eq!(fresh, [true, true, true]);
        assert_eq!(store.insert("r", &[record("a", 2), record("d", 3)]).unwrap(), [false, true]);
        assert_eq!(ids(&store.query("r", &Query::latest(10)).unwrap()), ["c", "a", "b", "d"]);
        assert_eq!(ids(&store.query("r", &Query::latest(2)).unwrap()), ["b", "d"], "the newest two, oldest first");
        assert!(store.query("other", &Query::latest(10)).unwrap().is_empty(), "rooms are apart");
    }

    #[test]
    fn queries_page_by_position_bytes_and_sharing() {
        let mut store = Store::open(&Location::Memory).unwrap();
        let mut local = record("o", 5);
        local.shared = false;
        store.insert("r", &[record("a", 1), record("b", 2), record("c", 3), local]).unwrap();
        let after_a = Query { after: Some(Key { stamp: 1, id: "a".into() }), ..Query::latest(10) };
        assert_eq!(ids(&store.query("r", &after_a).unwrap()), ["b", "c", "o"]);
        let before_c = Query { before: Some(Key { stamp: 3, id: "c".into() }), ..Query::latest(10) };
        assert_eq!(ids(&store.query("r", &before_c).unwrap()), ["a", "b"]);
        let shared = Query { shared_only: true, ..Query::latest(10) };
        assert_eq!(ids(&store.query("r", &shared).unwrap()), ["a", "b", "c"]);
        let small = Query { max_bytes: 230, ..shared };
        assert_eq!(ids(&store.query("r", &small).unwrap()), ["b", "c"], "about 110 bytes each: two fit in 230");
        assert_eq!(store.newest_shared("r").unwrap(), Some(Key { stamp: 3, id: "c".into() }));
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("p2pchat-store-test-{}", crate::wire::frames::random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = b"this is not a database, it is a shopping list".repeat(100);
        std::fs::write(dir.join(FILE_NAME), &garbage).unwrap();
        let err = Store::open(&Location::Dir(dir.clone())).err().expect("refused");
        assert!(matches!(err, StoreError::Unusable { .. }), "{err}");
        assert!(err.to_string().contains("--no-history"), "{err}");
        assert_eq!(std::fs::read(dir.join(FILE_NAME)).unwrap(), garbage);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_on_disk_survives_reopening() {
        let dir = std::env::temp_dir().join(format!("p2pchat-store-test-{}", crate::wire::frames::random_id()));
        Store::open(&Location::Dir(dir.clone())).unwrap().insert("r", &[record("a", 1)]).unwrap();
        let mut again = Store::open(&Location::Dir(dir.clone())).unwrap();
        assert_eq!(ids(&again.query("r", &Query::latest(10)).unwrap()), ["a"]);
        assert!(dir.join(FILE_NAME).is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_of_the_first_format_is_brought_up_to_date_and_keeps_its_messages() {
        let dir = std::env::temp_dir().join(format!("p2pchat-store-test-{}", crate::wire::frames::random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = Connection::open(dir.join(FILE_NAME)).unwrap();
        old.execute_batch(
            "CREATE TABLE rooms (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
             CREATE TABLE messages (room INTEGER NOT NULL, stamp INTEGER NOT NULL, id TEXT NOT NULL,
                 sent_at INTEGER NOT NULL, sender TEXT, text TEXT NOT NULL, shared INTEGER NOT NULL,
                 PRIMARY KEY (room, stamp, id)) WITHOUT ROWID;
             INSERT INTO rooms (id, name) VALUES (1, 'r');
             INSERT INTO messages VALUES (1, 1, 'old', 1, 'ana', 'from before', 1);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(old);
        let mut store = Store::open(&Location::Dir(dir.clone())).unwrap();
        let signed = Record { author_key: Some("k".into()), sig: Some("s".into()), ..record("new", 2) };
        store.insert("r", std::slice::from_ref(&signed)).unwrap();
        let back = store.query("r", &Query::latest(10)).unwrap();
        assert_eq!(ids(&back), ["old", "new"]);
        assert_eq!((back[0].author_key.as_deref(), back[1].sig.as_deref()), (None, Some("s")));
        drop(store);
        assert!(Store::open(&Location::Dir(dir.clone())).is_ok(), "opens again at the new format");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
