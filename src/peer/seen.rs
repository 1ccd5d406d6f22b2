//! Which message ids were already shown: a bounded set that forgets the oldest first.
//!
//! The same message can reach a peer twice (two links to one member while a duplicate link is being
//! retired, later relays). A busy room of 20 sends tens of thousands of messages a second, so the set
//! remembers the last 65,536 ids, each as a 64-bit keyed hash (a collision between two live ids is
//! about one in 2^48) rather than as its 32-character text.

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;

/// How many ids a peer remembers by default.
pub const REMEMBERED_IDS: usize = 65_536;

#[derive(Debug)]
pub struct SeenIds {
    /// The recent messages shown, by stamp, for anti-entropy summaries (see `recent`).
    pub recent: super::recent::Recent,
    order: VecDeque<u64>,
    set: HashSet<u64>,
    capacity: usize,
    keys: RandomState,
}

impl SeenIds {
    pub fn new(capacity: usize) -> Self {
        Self {
            recent: super::recent::Recent::default(),
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity,
            keys: RandomState::new(),
        }
    }

    /// A message with this stamp and id is shown: true the first time (it is then remembered and
    /// noted for anti-entropy summaries), false for a repeat. One lock for both, on the hot path.
    pub fn shown(&mut self, stamp: u64, id: &str) -> bool {
        let first = self.first_time(id);
        if first {
            self.recent.note(stamp, id);
        }
        first
    }

    /// Whether `id` was offered before (without offering it).
    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(&self.keys.hash_one(id))
    }

    /// True the first time `id` is offered, false for a repeat.
    pub fn first_time(&mut self, id: &str) -> bool {
        let key = self.keys.hash_one(id);
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.set.remove(&oldest);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_refused_and_memory_is_bounded() {
        let mut seen = SeenIds::new(2);
        assert!(seen.first_time("a"));
        assert!(!seen.first_time("a"));
        assert!(seen.first_time("b"));
        assert!(seen.first_time("c"));
        assert!(seen.first_time("a"), "the oldest was forgotten");
        assert!(!seen.first_time("c"));
    }
}
