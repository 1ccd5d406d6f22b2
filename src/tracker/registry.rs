//! The tracker's memory of who joined, with no I/O: addresses ordered by when they last joined, bounded
//! in size, deduplicated.
//!
//! The original tracker appends every connection's address to a list forever and sends the whole list
//! (cut at 2048 bytes, possibly mid-address). This registry keeps at most `max_entries` addresses,
//! forgets the oldest first, counts a returning address once (at its newest position) and hands each
//! newcomer a list of whole entries that fits the original client's single read.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use crate::net::canonical;
use crate::wire::peer_list;

#[derive(Debug)]
pub struct Registry {
    /// Join sequence number of each address; the inverse of `by_seq`.
    seq_of: HashMap<SocketAddr, u64>,
    /// Addresses by join sequence number, oldest first.
    by_seq: BTreeMap<u64, SocketAddr>,
    next_seq: u64,
    max_entries: usize,
    list_budget: usize,
}

impl Registry {
    pub fn new(max_entries: usize, list_budget: usize) -> Self {
        Self { seq_of: HashMap::new(), by_seq: BTreeMap::new(), next_seq: 0, max_entries, list_budget }
    }

    /// A connection from `addr` arrived: return the list to send it, then remember it.
    ///
    /// The newcomer's own address is never in its list (a peer re-joining from the same port must not
    /// dial itself).
    pub fn admit(&mut self, addr: SocketAddr) -> Vec<u8> {
        let addr = canonical(addr);
        let others = self.by_seq.values().rev().filter(|known| **known != addr);
        let list = peer_list::encode(others, self.list_budget);
        self.remember(addr);
        list
    }

    fn remember(&mut self, addr: SocketAddr) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(previous) = self.seq_of.insert(addr, seq) {
            self.by_seq.remove(&previous);
        }
        self.by_seq.insert(seq, addr);
        while self.by_seq.len() > self.max_entries {
            if let Some((_, oldest)) = self.by_seq.pop_first() {
                self.seq_of.remove(&oldest);
            }
        }
    }

    /// Every remembered address, oldest first.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.by_seq.values().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.by_seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::peer_list::LEGACY_LIST_BUDGET;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn behaves_like_the_original_for_a_small_room() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        assert_eq!(r.admit(a("10.0.0.1:1000")), b"-");
        assert_eq!(r.admit(a("10.0.0.2:2000")), b"10.0.0.1:1000");
        assert_eq!(r.admit(a("10.0.0.3:3000")), b"10.0.0.1:1000-10.0.0.2:2000");
        assert_eq!(r.addresses(), vec![a("10.0.0.1:1000"), a("10.0.0.2:2000"), a("10.0.0.3:3000")]);
    }

    #[test]
    fn a_returning_address_is_not_listed_to_itself_and_counted_once() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        r.admit(a("10.0.0.1:1000"));
        r.admit(a("10.0.0.2:2000"));
        assert_eq!(r.admit(a("10.0.0.1:1000")), b"10.0.0.2:2000");
        assert_eq!(r.addresses(), vec![a("10.0.0.2:2000"), a("10.0.0.1:1000")]);
    }

    #[test]
    fn mapped_ipv6_is_stored_as_ipv4() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        r.admit(a("[::ffff:10.0.0.1]:1000"));
        assert_eq!(r.admit(a("10.0.0.1:1000")), b"-");
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn memory_is_bounded_and_forgets_the_oldest() {
        let mut r = Registry::new(3, LEGACY_LIST_BUDGET);
        for port in 1..=5u16 {
            r.admit(SocketAddr::from(([10, 0, 0, 1], port)));
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.admit(a("10.0.0.9:9")), b"10.0.0.1:3-10.0.0.1:4-10.0.0.1:5");
    }

    #[test]
    fn the_list_fits_one_read_however_many_joined() {
        let mut r = Registry::new(10_000, LEGACY_LIST_BUDGET);
        for i in 0..5_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            r.admit(SocketAddr::from(([10, b, c, d], 40_000)));
        }
        let list = r.admit(a("192.168.1.1:1"));
        assert!(list.len() <= LEGACY_LIST_BUDGET);
        let (addrs, rejected) = peer_list::parse(&list);
        assert!(rejected.is_empty());
        assert_eq!(addrs.last(), Some(&a("10.0.19.135:40000")), "the newest entry is kept");
    }
}
