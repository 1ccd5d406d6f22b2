//! A user's long-term identity: an Ed25519 key pair kept in a file of the data directory, and the short
//! fingerprint people compare to tell two users with the same name apart.
//!
//! The file is JSON (`{"v": 1, "ed25519": "<64 hex digits>"}`), created once, atomically and readable by
//! its owner only (0600 on Unix): it is the user's secret. A file that cannot be read as one is never
//! replaced: the error names it and the ways forward.

use hex::FromHex;
use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::wire::frames::{Chat, IdentityProof};

/// The identity file inside a data directory.
pub const FILE_NAME: &str = "identity.json";
const FORMAT: u32 = 1;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot create the identity {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot read the identity {path}: {reason}. It was left as it is; restore it from a backup, \
             move it away (a new identity is created, and people who knew the old one will see a new \
             fingerprint), or choose another file with --identity"
    )]
    Unreadable { path: PathBuf, reason: String },
}

/// A user's key pair.
pub struct Identity {
    signing: SigningKey,
}

#[derive(Serialize, Deserialize)]
struct File {
    v: u32,
    ed25519: String,
}

impl Identity {
    /// A new random identity.
    pub fn generate() -> Result<Self, std::io::Error> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self::from_secret(secret))
    }

    /// The identity with this secret key (the simulator's come from its seed).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self { signing: SigningKey::from_bytes(&secret) }
    }

    /// The identity in `path`, created there first if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        match fs::read(path) {
            Ok(bytes) => {
                Self::parse(&bytes).map_err(|reason| IdentityError::Unreadable { path: path.to_owned(), reason })
            }
            // Missing, or under a path that cannot be a directory: creating it says what is wrong.
            Err(err) if matches!(err.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                let create = |source| IdentityError::Create { path: path.to_owned(), source };
                let identity = Self::generate().map_err(create)?;
                identity.save_new(path).map_err(create)?;
                Ok(identity)
            }
            Err(err) => Err(IdentityError::Unreadable { path: path.to_owned(), reason: err.to_string() }),
        }
    }

    fn parse(bytes: &[u8]) -> Result<Self, String> {
        let file: File = serde_json::from_slice(bytes).map_err(|e| format!("not an identity file ({e})"))?;
        if file.v != FORMAT {
            return Err(format!("written by another p2pchat (identity format {}, this one reads {FORMAT})", file.v));
        }
        let secret: [u8; 32] = <[u8; 32]>::from_hex(&file.ed25519).map_err(|_| "its key is not 64 hex digits")?;
        Ok(Self { signing: SigningKey::from_bytes(&secret) })
    }

    /// Write to a new file next to `path`, owner-only, then move it into place: a crash leaves either
    /// no identity or a whole one, and another process creating one at the same time cannot be
    /// overwritten (the first one in place wins, and this one is then read back).
    fn save_new(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::owner_only::create_dir(dir)?;
        }
        let file = File { v: FORMAT, ed25519: hex::encode(self.signing.as_bytes()) };
        let json = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        let temporary = crate::owner_only::write_beside(path, &json)?;
        let placed = fs::hard_link(&temporary, path);
        let _ = fs::remove_file(&temporary);
        match placed {
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        }
    }

    /// Proof that this identity is the end of the link whose handshake hash is `binding`.
    pub fn prove(&self, binding: &[u8]) -> IdentityProof {
        IdentityProof {
            key: hex::encode(self.public().as_bytes()),
            sig: hex::encode(self.signing.sign(&proof_message(binding)).to_bytes()),
        }
    }

    /// Sign `chat` as its author (private rooms): sets its `key` and `sig`.
    pub fn sign_chat(&self, chat: &mut Chat) {
        chat.key = Some(hex::encode(self.public().as_bytes()));
        chat.sig = Some(hex::encode(self.signing.sign(&chat_message(chat)).to_bytes()));
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// What people compare: 32 hex digits (128 bits) of the public key's SHA-256, in groups of four.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public())
    }
}

fn proof_message(binding: &[u8]) -> Vec<u8> {
    let mut message = b"p2pchat identity v1\0".to_vec();
    message.extend_from_slice(binding);
    message
}

/// What an author signs: every field of the message but the signature itself, in a fixed order.
fn chat_message(chat: &Chat) -> Vec<u8> {
    let fields = (&chat.id, &chat.from, &chat.room, chat.ts, chat.hlc, &chat.text);
    let mut message = b"p2pchat msg v1\0".to_vec();
    message.extend(serde_json::to_vec(&fields).unwrap_or_default());
    message
}

/// The key that signed `chat`, if its signature verifies.
pub fn verify_chat(chat: &Chat) -> Result<VerifyingKey, ProofError> {
    let (Some(key), Some(sig)) = (&chat.key, &chat.sig) else { return Err(ProofError::Missing) };
    verify(key, sig, &chat_message(chat))
}

fn verify(key: &str, sig: &str, message: &[u8]) -> Result<VerifyingKey, ProofError> {
    let key =
        <[u8; 32]>::from_hex(key).ok().and_then(|k| VerifyingKey::from_bytes(&k).ok()).ok_or(ProofError::BadKey)?;
    let sig = <[u8; 64]>::from_hex(sig).ok().map(|s| Signature::from_bytes(&s)).ok_or(ProofError::BadSignature)?;
    key.verify_strict(message, &sig).map_err(|_| ProofError::BadSignature)?;
    Ok(key)
}

/// The key a proof is for, if it proves it for the link whose handshake hash is `binding`.
pub fn verify_proof(proof: &IdentityProof, binding: &[u8]) -> Result<VerifyingKey, ProofError> {
    verify(&proof.key, &proof.sig, &proof_message(binding))
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProofError {
    #[error("its identity key is not a valid Ed25519 key")]
    BadKey,
    #[error("its signature does not verify")]
    BadSignature,
    #[error("it carries no signature")]
    Missing,
}

pub fn fingerprint(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    // 128 bits: what someone comparing fingerprints aloud can trust against a deliberate collision.
    let digits = hex::encode(&digest[..16]);
    digits.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!("p2pchat-identity-test-{}", crate::wire::frames::random_id()))
    }

    // Known-answer vectors for a signed message, as PROTOCOL.md gives them; computed independently of
    // this code (Python's json and the `cryptography` package's Ed25519).
    const KAT_PUBLIC_KEY: &str = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8";
    const KAT_FINGERPRINT: &str = "5647-5aa7-5463-474c-0285-df5d-bf2b-cab7";
    const KAT_SIGNED_BYTES: &str = "70327063686174206d7367207631005b223031323334353637383961626364656630313233343536373839616263646566222c22616e61222c223965303530616437343563366564353265656537653263336566303565633461222c313730303030303030303030302c3131313431313230303030303030303030312c2268c3a96c6c6f20e29c93225d";
    const KAT_SIGNATURE: &str = "27905fe154152832a7c0992ea98977dd6535f5e401d6292d28c6363350a82409f0d03b8aa2891d43a5eb3333b02203fabfa7917efcc6a3697c42e003d7508609";

    #[test]
    fn a_signed_message_gives_the_published_vectors() {
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
        let identity = Identity::from_secret(seed);
        let mut chat = Chat {
            id: "0123456789abcdef0123456789abcdef".into(),
            from: "ana".into(),
            room: "9e050ad745c6ed52eee7e2c3ef05ec4a".into(),
            ts: 1_700_000_000_000,
            hlc: (1_700_000_000_000 << 16) + 1,
            text: "héllo ✓".into(),
            ..Chat::default()
        };
        assert_eq!(hex::encode(chat_message(&chat)), KAT_SIGNED_BYTES);
        identity.sign_chat(&mut chat);
        assert_eq!(chat.key.as_deref(), Some(KAT_PUBLIC_KEY));
        assert_eq!(chat.sig.as_deref(), Some(KAT_SIGNATURE));
        assert_eq!(identity.fingerprint(), KAT_FINGERPRINT);
        assert_eq!(verify_chat(&chat).map(|k| hex::encode(k.as_bytes())), Ok(KAT_PUBLIC_KEY.to_owned()));
        crate::protocol::assert_protocol_md_gives(&[KAT_PUBLIC_KEY, KAT_FINGERPRINT, KAT_SIGNED_BYTES, KAT_SIGNATURE]);
    }

    #[test]
    fn an_identity_is_created_once_owner_only_and_read_back() {
        let dir = temp_dir();
        let path = dir.join(FILE_NAME);
        let first = Identity::load_or_create(&path).unwrap();
        let again = Identity::load_or_create(&path).unwrap();
        assert_eq!(first.public(), again.public());
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert_eq!(first.fingerprint().len(), 39, "eight groups of four hex digits: 128 bits");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file is left behind");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_identities_differ() {
        assert_ne!(Identity::generate().unwrap().fingerprint(), Identity::generate().unwrap().fingerprint());
    }

    #[test]
    fn a_damaged_identity_is_refused_and_left_alone() {
        let dir = temp_dir();
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        for damaged in [&b"not json"[..], br#"{"v":1,"ed25519":"zz"}"#, br#"{"v":9,"ed25519":""}"#] {
            fs::write(&path, damaged).unwrap();
            let err = Identity::load_or_create(&path).err().expect("refused");
            assert!(matches!(err, IdentityError::Unreadable { .. }), "{err}");
            assert!(err.to_string().contains("--identity"), "{err}");
            assert_eq!(fs::read(&path).unwrap(), damaged);
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
