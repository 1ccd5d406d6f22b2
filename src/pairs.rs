//! Which links pass their messages to which: the pairing a relay keeps, both ways. Used by a peer
//! relaying between two members (keyed by its link ids) and by the tracker's optional relay (keyed
//! by session ids). No I/O.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

#[derive(Debug)]
pub(crate) struct Pairs<K> {
    partners: HashMap<K, HashSet<K>>,
}

impl<K: Hash + Eq + Clone + Ord> Pairs<K> {
    pub fn new() -> Self {
        Self { partners: HashMap::new() }
    }

    /// Pass messages between `a` and `b` from now on; false when that was so already.
    pub fn pair(&mut self, a: K, b: K) -> bool {
        let new = self.partners.entry(a.clone()).or_default().insert(b.clone());
        self.partners.entry(b).or_default().insert(a);
        new
    }

    /// Stop passing messages between `a` and `b` (both ways); false when they were not paired.
    pub fn unpair(&mut self, a: &K, b: &K) -> bool {
        let mut was = false;
        for (one, other) in [(a, b), (b, a)] {
            if let Some(set) = self.partners.get_mut(one) {
                was |= set.remove(other);
                if set.is_empty() {
                    self.partners.remove(one);
                }
            }
        }
        was
    }

    /// What gets a copy of what arrives on `key`.
    pub fn partners_of<'a>(&'a self, key: &K) -> impl Iterator<Item = &'a K> + 'a {
        self.partners.get(key).into_iter().flatten()
    }

    /// Whether anything arriving on `key` is passed on.
    pub fn has_partners(&self, key: &K) -> bool {
        self.partners.contains_key(key)
    }

    /// `key` is gone: its partners, in order, each of which must hear that.
    pub fn remove(&mut self, key: &K) -> Vec<K> {
        let mut partners: Vec<K> = self.partners.remove(key).into_iter().flatten().collect();
        partners.sort_unstable();
        for partner in &partners {
            if let Some(set) = self.partners.get_mut(partner) {
                set.remove(key);
                if set.is_empty() {
                    self.partners.remove(partner);
                }
            }
        }
        partners
    }
}

#[cfg(test)]
mod tests {
    use super::Pairs;

    #[test]
    fn pairs_go_both_ways_and_end_with_either_side() {
        let mut pairs = Pairs::new();
        assert!(pairs.pair(1, 2));
        assert!(!pairs.pair(2, 1), "already paired");
        assert!(pairs.pair(1, 3));
        let mut of_one: Vec<u64> = pairs.partners_of(&1).copied().collect();
        of_one.sort_unstable();
        assert_eq!(of_one, [2, 3]);
        assert_eq!(pairs.partners_of(&2).copied().collect::<Vec<_>>(), [1]);
        assert!(pairs.unpair(&3, &1), "either side ends a pair");
        assert!(!pairs.unpair(&1, &3), "already ended");
        assert!(!pairs.has_partners(&3));
        assert!(pairs.pair(1, 3));
        assert_eq!(pairs.remove(&1), [2, 3]);
        assert!(!pairs.has_partners(&2) && !pairs.has_partners(&3), "nothing left to pass on");
        assert!(pairs.remove(&1).is_empty());
    }
}
