//! Session and message ids from a seeded generator, so the state machine draws no OS randomness:
//! the driver seeds it from the OS once, the simulator from its test seed (and a run then replays
//! exactly). The generator is the ChaCha20 keystream, so ids from an OS seed are as unpredictable as
//! the OS's own.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;

pub struct Ids {
    stream: ChaCha20,
}

impl Ids {
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self { stream: ChaCha20::new(&seed.into(), &[0u8; 12].into()) }
    }

    /// 16 fresh bytes as 32 hex digits (the form of every p2pchat id).
    pub fn next_id(&mut self) -> String {
        let mut bytes = [0u8; 16];
        self.stream.apply_keystream(&mut bytes);
        hex::encode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::Ids;

    #[test]
    fn one_seed_gives_one_sequence_and_ids_differ() {
        let (mut a, mut b) = (Ids::from_seed([7; 32]), Ids::from_seed([7; 32]));
        let first: Vec<String> = (0..4).map(|_| a.next_id()).collect();
        let again: Vec<String> = (0..4).map(|_| b.next_id()).collect();
        assert_eq!(first, again);
        assert_eq!(first[0].len(), 32);
        assert_ne!(first[0], first[1]);
        assert_ne!(Ids::from_seed([8; 32]).next_id(), first[0]);
    }
}
