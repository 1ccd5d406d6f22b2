//! Private rooms' keys: from a secret (or an invite code) to the room key, and from the key to the
//! opaque room id that the tracker and the network see instead of the room's name.
//!
//! * key = Argon2id(secret, salt = SHA-256("p2pchat room salt v1" ‖ 0 ‖ room name)[..16]),
//!   64 MiB, 3 passes, 1 lane, 32 bytes: memory-hard, so a captured room id cannot be matched
//!   against guessed secrets quickly; salted per room, so one guess never tests two rooms.
//! * room id = hex::encode(SHA-256("p2pchat room id v1" ‖ 0 ‖ key)[..16]): names the room on the wire,
//!   says nothing about its name or key.
//! * invite code = `p2pc1-` ‖ hex::encode(key) ‖ `-` ‖ hex::encode(room name): carries the key itself, so the invited
//!   need no passphrase (and skip the KDF). Whoever holds it can join: it is as secret as the key.
//! * a new room's key (`RoomKey::generate`) is 32 random bytes, shared only through its invite code:
//!   nothing on the wire or at the tracker then helps anyone guess it, unlike a passphrase, which the
//!   room id lets its holder test offline (Argon2id only slows each guess).
//!
//! No I/O: the secret is read by the caller (never from the command line; see the client).

use hex::FromHex;
use std::fmt;
use zeroize::{Zeroize, Zeroizing};

use sha2::{Digest, Sha256};
use thiserror::Error;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::wire::frames::{Chat, Frame};

/// Argon2id cost: 64 MiB of memory, 3 passes, 1 lane (about a quarter second on a laptop).
const KDF_MEMORY_KIB: u32 = 64 * 1024;
const KDF_PASSES: u32 = 3;
const INVITE_PREFIX: &str = "p2pc1-";
/// Shortest secret accepted: the KDF slows guessing, it cannot make "abc" safe.
pub const MIN_SECRET_CHARS: usize = 8;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("the room secret is empty")]
    Empty,
    #[error("the room secret is too short: use at least {MIN_SECRET_CHARS} characters (or an invite code)")]
    TooShort,
    #[error("this invite code is damaged or incomplete (it starts with {INVITE_PREFIX} and is one word)")]
    BadInvite,
    #[error("this invite code is for room {invited:?}, not {asked:?}")]
    OtherRoom { invited: String, asked: String },
    #[error("cannot derive the room key: {0}")]
    Kdf(String),
    #[error("the room name {0:?} cannot be used: {1}")]
    BadRoom(String, String),
    #[error("the system gave no randomness for a new room key: {0}")]
    NoRandomness(String),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealError {
    #[error("it does not open with this room's key (altered, or sealed for another room)")]
    DoesNotOpen,
    #[error("what it holds is not a message")]
    NotAMessage,
}

/// The key of a private room, and its name (shown to members only).
#[derive(Clone, PartialEq, Eq)]
pub struct RoomKey {
    name: String,
    key: [u8; 32],
}

impl Drop for RoomKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl fmt::Debug for RoomKey {
    // Never print the key itself (logs, tracebacks).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoomKey").field("name", &self.name).field("id", &self.room_id()).finish_non_exhaustive()
    }
}

impl RoomKey {
    /// The key for room `room` from what the user typed: an invite code, or a secret to stretch.
    /// An invite code names its room; `room` may then be empty ("the invite's room").
    pub fn from_secret(room: &str, secret: &str) -> Result<Self, SecretError> {
        let secret = secret.trim_end_matches(['\r', '\n']);
        if secret.trim().is_empty() {
            return Err(SecretError::Empty);
        }
        if let Some(code) = secret.trim().strip_prefix(INVITE_PREFIX) {
            let invited = Self::from_invite(code)?;
            if !room.is_empty() && invited.name != room {
                return Err(SecretError::OtherRoom { invited: invited.name.clone(), asked: room.to_owned() });
            }
            return Ok(invited);
        }
        if secret.chars().count() < MIN_SECRET_CHARS {
            return Err(SecretError::TooShort);
        }
        let params = argon2::Params::new(KDF_MEMORY_KIB, KDF_PASSES, 1, Some(32))
            .map_err(|e| SecretError::Kdf(e.to_string()))?;
        let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = &tagged_hash(b"p2pchat room salt v1", room.as_bytes())[..16];
        let mut key = Zeroizing::new([0u8; 32]);
        kdf.hash_password_into(secret.as_bytes(), salt, &mut *key).map_err(|e| SecretError::Kdf(e.to_string()))?;
        Ok(Self { name: room.to_owned(), key: *key })
    }

    /// A new private room called `room`, under a random key: share its `invite_code`.
    pub fn generate(room: &str) -> Result<Self, SecretError> {
        if room.is_empty() {
            return Err(SecretError::BadRoom(room.to_owned(), "a private room needs a name".to_owned()));
        }
        crate::wire::chat::validate_room(room).map_err(|e| SecretError::BadRoom(room.to_owned(), e.to_string()))?;
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *key).map_err(|e| SecretError::NoRandomness(e.to_string()))?;
        Ok(Self { name: room.to_owned(), key: *key })
    }

    fn from_invite(code: &str) -> Result<Self, SecretError> {
        let (key_hex, name_hex) = code.split_once('-').ok_or(SecretError::BadInvite)?;
        let key = Zeroizing::new(<[u8; 32]>::from_hex(key_hex).map_err(|_| SecretError::BadInvite)?);
        let name = hex::decode(name_hex).ok().and_then(|n| String::from_utf8(n).ok()).ok_or(SecretError::BadInvite)?;
        if crate::wire::chat::validate_room(&name).is_err() || name.is_empty() {
            return Err(SecretError::BadInvite);
        }
        Ok(Self { name, key: *key })
    }

    /// The room's name, as its members call it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key itself (the pre-shared key of the links' handshake).
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// What the tracker and the network see instead of the room's name.
    pub fn room_id(&self) -> String {
        hex::encode(&tagged_hash(b"p2pchat room id v1", &self.key)[..16])
    }

    /// `chat` sealed for the room's members (see `Frame::Sealed`): its id stays readable, the rest not.
    pub fn seal(&self, chat: &Chat) -> Frame {
        let mut nonce = [0u8; 24];
        // Without OS randomness no message is sent at all rather than one under a guessable nonce.
        if getrandom::fill(&mut nonce).is_err() {
            log::error!("no randomness from the system: a message could not be sealed and is not sent");
            return Frame::Unknown;
        }
        let plaintext = serde_json::to_vec(chat).unwrap_or_default();
        let sealed =
            self.cipher().encrypt(XNonce::from_slice(&nonce), Payload { msg: &plaintext, aad: chat.id.as_bytes() });
        let mut data = nonce.to_vec();
        data.extend(sealed.unwrap_or_default());
        Frame::Sealed { id: chat.id.clone(), data: hex::encode(&data) }
    }

    /// The message a `sealed` frame holds, if it was sealed with this room's key under this id.
    pub fn open_sealed(&self, id: &str, data: &str) -> Result<Chat, SealError> {
        let data = hex::decode(data).ok().filter(|d| d.len() > 24).ok_or(SealError::DoesNotOpen)?;
        let (nonce, ciphertext) = data.split_at(24);
        let plaintext = self
            .cipher()
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: id.as_bytes() })
            .map_err(|_| SealError::DoesNotOpen)?;
        let chat: Chat = serde_json::from_slice(&plaintext).map_err(|_| SealError::NotAMessage)?;
        if chat.id != id {
            return Err(SealError::NotAMessage);
        }
        Ok(chat)
    }

    /// The message key: derived from the room key, so the links' and the messages' keys differ.
    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&tagged_hash(b"p2pchat message key v1", &self.key).into())
    }

    /// A code that lets someone join without the secret: it carries the key.
    pub fn invite_code(&self) -> String {
        format!("{INVITE_PREFIX}{}-{}", hex::encode(self.key), hex::encode(self.name.as_bytes()))
    }
}

fn tagged_hash(tag: &[u8], data: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(tag);
    hash.update([0]);
    hash.update(data);
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_secret_gives_the_same_key_per_room_and_different_keys_across_rooms() {
        let a = RoomKey::from_secret("plans", "correct horse battery").unwrap();
        assert_eq!(a, RoomKey::from_secret("plans", "correct horse battery").unwrap());
        let other_room = RoomKey::from_secret("plans2", "correct horse battery").unwrap();
        assert_ne!(a.key(), other_room.key(), "salted per room");
        assert_ne!(a.key(), RoomKey::from_secret("plans", "correct horse battery!").unwrap().key());
        let id = a.room_id();
        assert_eq!(id.len(), 32);
        assert!(!id.contains("plans") && id != other_room.room_id());
        assert!(!format!("{a:?}").contains(&hex::encode(a.key())), "Debug never shows the key");
    }

    #[test]
    fn an_invite_code_carries_the_room_and_its_key() {
        let room = RoomKey::from_secret("plans ☃", "correct horse battery").unwrap();
        let code = room.invite_code();
        assert!(code.starts_with("p2pc1-"));
        assert_eq!(RoomKey::from_secret("", &code).unwrap(), room);
        assert_eq!(RoomKey::from_secret("plans ☃", &format!("  {code}\n")).unwrap(), room);
        assert_eq!(
            RoomKey::from_secret("other", &code),
            Err(SecretError::OtherRoom { invited: "plans ☃".into(), asked: "other".into() })
        );
        for damaged in [&code[..code.len() - 1], &code[..20], "p2pc1-zz-zz", "p2pc1-"] {
            assert_eq!(RoomKey::from_secret("", damaged), Err(SecretError::BadInvite), "{damaged}");
        }
    }

    #[test]
    fn a_sealed_message_opens_only_with_the_room_key_and_its_id() {
        let room = RoomKey::from_secret("plans", "correct horse battery").unwrap();
        let chat = Chat { id: "m1".into(), from: "ana".into(), text: "the secret plan".into(), ..Chat::default() };
        let Frame::Sealed { id, data } = room.seal(&chat) else { panic!("not sealed") };
        assert!(!data.contains(&hex::encode(b"secret plan")) && !data.contains("secret"));
        assert_eq!(room.open_sealed(&id, &data), Ok(chat));
        let other = RoomKey::from_secret("plans", "another secret entirely").unwrap();
        assert_eq!(other.open_sealed(&id, &data), Err(SealError::DoesNotOpen));
        assert_eq!(room.open_sealed("m2", &data), Err(SealError::DoesNotOpen), "the id is bound to it");
        let mut altered = hex::decode(&data).unwrap();
        altered[30] ^= 1;
        assert_eq!(room.open_sealed(&id, &hex::encode(&altered)), Err(SealError::DoesNotOpen));
        assert_eq!(room.open_sealed(&id, "zz"), Err(SealError::DoesNotOpen));
    }

    #[test]
    fn a_new_room_has_a_fresh_random_key_that_its_invite_code_carries() {
        let room = RoomKey::generate("plans").unwrap();
        let again = RoomKey::generate("plans").unwrap();
        assert_ne!(room.key(), again.key(), "every new room has its own key");
        assert_ne!(room.room_id(), again.room_id());
        assert_ne!(room.key(), &[0; 32]);
        assert_eq!(RoomKey::from_secret("plans", &room.invite_code()).unwrap(), room);
        assert!(matches!(RoomKey::generate(""), Err(SecretError::BadRoom(..))));
        assert!(matches!(RoomKey::generate("a\nb"), Err(SecretError::BadRoom(..))));
    }

    /// The key schedule's known-answer vectors, as PROTOCOL.md gives them (keep the two the same).
    #[test]
    fn the_key_schedule_gives_the_published_vectors() {
        let room = RoomKey::from_secret("plans", "correct horse battery staple").unwrap();
        assert_eq!(hex::encode(&tagged_hash(b"p2pchat room salt v1", b"plans")[..16]), KAT_SALT);
        assert_eq!(hex::encode(room.key()), KAT_ROOM_KEY);
        assert_eq!(room.room_id(), KAT_ROOM_ID);
        assert_eq!(hex::encode(tagged_hash(b"p2pchat message key v1", room.key())), KAT_MESSAGE_KEY);
        assert_eq!(room.invite_code(), KAT_INVITE);
        crate::protocol::assert_protocol_md_gives(&[KAT_SALT, KAT_ROOM_KEY, KAT_ROOM_ID, KAT_MESSAGE_KEY, KAT_INVITE]);
    }

    // Computed independently of this code (Python's hashlib and argon2-cffi's Argon2id).
    const KAT_SALT: &str = "a5527d43fc7ecf9619664ca1667c358c";
    const KAT_ROOM_KEY: &str = "db50446ebdfad15f114bf2609cc1932d63078e309a520f25769d3b42103c48d4";
    const KAT_ROOM_ID: &str = "9e050ad745c6ed52eee7e2c3ef05ec4a";
    const KAT_MESSAGE_KEY: &str = "421905a082f306e0ddccc9f14c31e1e06401f99a7eb7673619df755375e54189";
    const KAT_INVITE: &str = "p2pc1-db50446ebdfad15f114bf2609cc1932d63078e309a520f25769d3b42103c48d4-706c616e73";

    #[test]
    fn weak_secrets_are_refused() {
        assert_eq!(RoomKey::from_secret("r", ""), Err(SecretError::Empty));
        assert_eq!(RoomKey::from_secret("r", "  \n"), Err(SecretError::Empty));
        assert_eq!(RoomKey::from_secret("r", "short"), Err(SecretError::TooShort));
    }
}
