//! Trust on first use: the identity key each name had when this user first met it in a room.
//!
//! A member of a private room proves its identity key on every link (see `identity`). The first key
//! seen for a name in a room is remembered (in `known_keys.json` beside the identity file); a later
//! member claiming that name with another key is flagged to the user, never silently accepted, and
//! the remembered key stays. No I/O on the way: `meet` runs in readers for every message of a private
//! room, so new keys are only marked, and the owner writes the file off the runtime (`unsaved`).

use hex::FromHex;
use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::{fingerprint, verify_chat};
use crate::wire::frames::Chat;

pub const FILE_NAME: &str = "known_keys.json";
const FORMAT: u32 = 1;

#[derive(Debug, Error)]
pub enum TrustError {
    #[error("cannot read the known keys in {path}: {reason} (move it away to start trusting anew)")]
    Unreadable { path: PathBuf, reason: String },
}

/// The most names remembered per room: the file stays small whoever joins (a name met beyond it is
/// proven on its link all the same, but not remembered for next time).
pub const MAX_NAMES_PER_ROOM: usize = 1000;

/// What meeting `name` with a key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Never met under this name here: remembered now (unless the room has [`MAX_NAMES_PER_ROOM`]).
    First,
    /// The key this name had before.
    Same,
    /// Another key than before: perhaps someone else. `was` is the remembered key's fingerprint.
    Changed { was: String },
}

#[derive(Default, Serialize, Deserialize)]
struct File {
    v: u32,
    /// Room id → name → key (hex).
    rooms: HashMap<String, HashMap<String, String>>,
}

/// A name's key, and the name as it was first met (what the file shows).
struct Pinned {
    name: String,
    key: [u8; 32],
}

/// Room id → the name's [`likeness`] → its key. Kept as bytes: every message of a private room is
/// checked against it.
type Rooms = HashMap<String, HashMap<String, Pinned>>;

/// What a name looks like: NFKC, then the confusables skeleton of Unicode TS #39, so that a Cyrillic
/// "аlice" or a fullwidth "ａｌｉｃｅ" is the same name as "alice" here, and cannot pose as it.
fn likeness(name: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let normal: String = name.nfkc().collect();
    unicode_security::confusable_detection::skeleton(&normal).collect()
}

pub struct KnownKeys {
    path: Option<PathBuf>,
    rooms: Rooms,
    /// A key was met for the first time since the file was last written.
    dirty: bool,
}

impl KnownKeys {
    /// The keys remembered in `path` (none yet if it does not exist); `None`: this session only.
    pub fn load(path: Option<PathBuf>) -> Result<Self, TrustError> {
        let Some(path) = path else { return Ok(Self { path: None, rooms: Rooms::new(), dirty: false }) };
        let file = match fs::read(&path) {
            Ok(bytes) => {
                let unreadable = |reason: String| TrustError::Unreadable { path: path.clone(), reason };
                let file: File =
                    serde_json::from_slice(&bytes).map_err(|e| unreadable(format!("not a known-keys file ({e})")))?;
                if file.v != FORMAT {
                    return Err(unreadable(format!("format {} (this p2pchat reads {FORMAT})", file.v)));
                }
                file
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => File { v: FORMAT, ..File::default() },
            Err(err) => return Err(TrustError::Unreadable { path, reason: err.to_string() }),
        };
        let mut rooms = Rooms::new();
        for (room, names) in file.rooms {
            for (name, key) in names {
                let key = <[u8; 32]>::from_hex(&key).ok().ok_or_else(|| TrustError::Unreadable {
                    path: path.clone(),
                    reason: format!("the key of {name:?} is not 64 hex digits"),
                })?;
                rooms.entry(room.clone()).or_default().entry(likeness(&name)).or_insert(Pinned { name, key });
            }
        }
        Ok(Self { path: Some(path), rooms, dirty: false })
    }

    /// What `key` is to `name` (or a name that looks the same) here, without remembering it: only a
    /// proof on a link pins a name ([`Self::meet`]); a message's signature, or history a member
    /// passes on, never does.
    pub fn lookup(&self, room: &str, name: &str, key: &VerifyingKey) -> Seen {
        match self.rooms.get(room).and_then(|names| names.get(&likeness(name))) {
            Some(known) if known.key == *key.as_bytes() => Seen::Same,
            Some(known) => Seen::Changed {
                was: VerifyingKey::from_bytes(&known.key).map_or_else(|_| hex::encode(known.key), |k| fingerprint(&k)),
            },
            None => Seen::First,
        }
    }

    /// Meet `name` with `key` in `room` (proven on a link): remembered if the name is new here.
    pub fn meet(&mut self, room: &str, name: &str, key: &VerifyingKey) -> Seen {
        let seen = self.lookup(room, name, key);
        if seen == Seen::First {
            let names = self.rooms.entry(room.to_owned()).or_default();
            if names.len() < MAX_NAMES_PER_ROOM {
                names.insert(likeness(name), Pinned { name: name.to_owned(), key: *key.as_bytes() });
                self.dirty = self.path.is_some();
            } else {
                log::warn!("not remembering {name}'s key: {MAX_NAMES_PER_ROOM} names are remembered in this room");
            }
        }
        seen
    }

    /// Tie `name` to `key` here, whatever it was tied to before (the user said so: a member's genuine
    /// new key).
    pub fn pin(&mut self, room: &str, name: &str, key: &VerifyingKey) {
        let names = self.rooms.entry(room.to_owned()).or_default();
        names.insert(likeness(name), Pinned { name: name.to_owned(), key: *key.as_bytes() });
        self.dirty = self.path.is_some();
    }

    /// Forget the key `name` is tied to here: the next key it proves is taken. False if none was.
    pub fn forget(&mut self, room: &str, name: &str) -> bool {
        let forgot = self.rooms.get_mut(room).and_then(|names| names.remove(&likeness(name))).is_some();
        self.dirty |= forgot && self.path.is_some();
        forgot
    }

    /// What to write, if keys were met since the last time: the file and its new contents.
    pub fn unsaved(&mut self) -> Option<(PathBuf, Vec<u8>)> {
        let path = self.path.clone().filter(|_| std::mem::take(&mut self.dirty))?;
        let rooms = self
            .rooms
            .iter()
            .map(|(room, names)| (room.clone(), names.values().map(|p| (p.name.clone(), hex::encode(p.key))).collect()))
            .collect();
        Some((path, serde_json::to_vec_pretty(&File { v: FORMAT, rooms }).unwrap_or_default()))
    }
}

/// Write `json` as the known-keys file at `path`: beside it first, then moved into place (a crash
/// leaves the old or the new). Blocking.
pub fn save(path: &std::path::Path, json: &[u8]) -> std::io::Result<()> {
    let temporary = crate::owner_only::write_beside(path, json)?;
    let placed = fs::rename(&temporary, path);
    if placed.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    placed
}

/// Whether `chat`, in a private room, is its author's: signed, and by the key its author's name has
/// here (met now for the first time, or the same as before). Else why not.
///
/// `Ok(true)`: signed by the key its author's name proved on a link here; `Ok(false)`: signed, but
/// by a key no link proved for that name yet (a member relayed to us, history of someone we never
/// met), so not shown as verified, and nothing is pinned.
pub fn check_author(chat: &Chat, room: &str, known: &std::sync::Mutex<KnownKeys>) -> Result<bool, String> {
    let key = verify_chat(chat).map_err(|err| format!("a message from {:?} whose {err}", chat.from))?;
    let seen = known.lock().map_err(|_| "the known keys are unavailable".to_owned())?.lookup(room, &chat.from, &key);
    match seen {
        Seen::Changed { was } => Err(format!(
            "a message signed as {:?} by key {}, but {:?} has key {was} here (forged, or signed again by someone else)",
            chat.from,
            fingerprint(&key),
            chat.from
        )),
        Seen::Same => Ok(true),
        Seen::First => Ok(false),
    }
}

/// Whether `chat`'s key (its signature already checked, by `check_author`) is the one its name
/// proved on a link here: what a message is shown with a ✓ for, without checking it twice.
pub fn proven(chat: &Chat, room: &str, known: &std::sync::Mutex<KnownKeys>) -> bool {
    let key =
        chat.key.as_deref().and_then(|k| <[u8; 32]>::from_hex(k).ok()).and_then(|k| VerifyingKey::from_bytes(&k).ok());
    match (key, known.lock()) {
        (Some(key), Ok(known)) => known.lookup(room, &chat.from, &key) == Seen::Same,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn a_room_remembers_a_bounded_number_of_names() {
        let mut keys = KnownKeys::load(None).unwrap();
        let key = Identity::generate().unwrap().public();
        for n in 0..MAX_NAMES_PER_ROOM + 5 {
            assert_eq!(keys.meet("room", &format!("n{n}"), &key), Seen::First);
        }
        assert_eq!(keys.rooms["room"].len(), MAX_NAMES_PER_ROOM);
        assert_eq!(keys.lookup("room", "n0", &key), Seen::Same, "the first ones stay");
        assert_eq!(keys.meet("other", "n0", &key), Seen::First, "per room");
    }

    #[test]
    fn a_name_that_looks_like_a_pinned_one_is_the_same_name() {
        let mut keys = KnownKeys::load(None).unwrap();
        let (alice, impostor) = (Identity::generate().unwrap().public(), Identity::generate().unwrap().public());
        assert_eq!(keys.meet("room", "alice", &alice), Seen::First);
        for lookalike in ["\u{430}lice", "\u{ff41}\u{ff4c}\u{ff49}\u{ff43}\u{ff45}", "a1ice", "alice"] {
            assert!(matches!(keys.lookup("room", lookalike, &impostor), Seen::Changed { .. }), "{lookalike:?}");
            assert!(matches!(keys.meet("room", lookalike, &impostor), Seen::Changed { .. }), "{lookalike:?}");
        }
        assert_eq!(keys.lookup("room", "\u{430}lice", &alice), Seen::Same, "alice under a look-alike spelling");
        assert_eq!(keys.meet("room", "bob", &impostor), Seen::First, "another name");
    }

    #[test]
    fn the_first_key_of_a_name_is_kept_and_another_is_flagged() {
        let dir = std::env::temp_dir().join(format!("p2pchat-trust-{}", crate::wire::frames::random_id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        let (bob, impostor) = (Identity::generate().unwrap().public(), Identity::generate().unwrap().public());
        let mut keys = KnownKeys::load(Some(path.clone())).unwrap();
        assert_eq!(keys.meet("room", "bob", &bob), Seen::First);
        assert_eq!(keys.meet("room", "bob", &bob), Seen::Same);
        assert_eq!(keys.meet("other room", "bob", &impostor), Seen::First, "per room");
        let (file, json) = keys.unsaved().expect("new keys to write");
        save(&file, &json).unwrap();
        assert!(keys.unsaved().is_none(), "written once");
        let mut again = KnownKeys::load(Some(path.clone())).unwrap();
        assert_eq!(
            again.meet("room", "bob", &impostor),
            Seen::Changed { was: fingerprint(&bob) },
            "remembered on disk"
        );
        assert_eq!(again.meet("room", "bob", &bob), Seen::Same, "the first key stays");
        let mut chat = Chat {
            id: "m".into(),
            from: "bob".into(),
            room: "room".into(),
            ts: 1,
            hlc: 2,
            text: "hi".into(),
            ..Chat::default()
        };
        let (bob_identity, mallory) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let known = std::sync::Mutex::new(KnownKeys::load(None).unwrap());
        assert!(check_author(&chat, "room", &known).unwrap_err().contains("carries no signature"));
        bob_identity.sign_chat(&mut chat);
        let altered = Chat { text: "hi!".into(), ..chat.clone() };
        assert!(check_author(&altered, "room", &known).unwrap_err().contains("does not verify"));
        let mut resigned = chat.clone();
        mallory.sign_chat(&mut resigned);
        // A signature pins nothing: whoever signs first under a name does not own it.
        assert_eq!(check_author(&resigned, "room", &known), Ok(false), "signed, by a key no link proved");
        assert_eq!(check_author(&chat, "room", &known), Ok(false), "bob too, until a link proves his key");
        assert_eq!(known.lock().unwrap().lookup("room", "bob", &bob_identity.public()), Seen::First, "nothing pinned");
        // Bob proves his key on a link (`meet`): his messages are his, and another key's are refused.
        known.lock().unwrap().meet("room", "bob", &bob_identity.public());
        assert_eq!(check_author(&chat, "room", &known), Ok(true));
        assert!(check_author(&resigned, "room", &known).unwrap_err().contains("signed again by someone else"));
        fs::write(&path, b"{oops").unwrap();
        let err = KnownKeys::load(Some(path)).err().unwrap().to_string();
        assert!(err.contains("not a known-keys file"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }
}
