//! The tracker's memory of who is in which room, with no I/O.
//!
//! Each room keeps its members ordered by when they last joined, deduplicated and bounded in size
//! (oldest forgotten first). Two kinds of member:
//! * **original** clients, which talk to the tracker once and are never heard from again; they are all in
//!   the default room ("") and stay listed until forgotten (the original never forgets at all);
//! * **p2pchat** peers, registered for as long as their control connection stays open: [`Registry::register`]
//!   hands out a token, and only [`Registry::deregister`] with that token removes the entry, so the
//!   late close of an old connection cannot remove a peer that has registered again since.
//!
//! Original clients get the default room as a list of whole entries that fits their single read.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use crate::net::canonical;
use crate::wire::frames::Member;
use crate::wire::peer_list;

/// The room original clients are in.
pub const DEFAULT_ROOM: &str = "";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Original,
    P2pchat,
}

/// Proof of one registration; see [`Registry::deregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration(u64);

#[derive(Debug, Default)]
struct Room {
    seq_of: HashMap<SocketAddr, u64>,
    /// Members by join sequence number, oldest first.
    by_seq: BTreeMap<u64, (SocketAddr, Kind)>,
}

impl Room {
    fn newest_first(&self) -> impl Iterator<Item = &(SocketAddr, Kind)> {
        self.by_seq.values().rev()
    }

    fn insert(&mut self, seq: u64, addr: SocketAddr, kind: Kind, max_entries: usize) {
        if let Some(previous) = self.seq_of.insert(addr, seq) {
            self.by_seq.remove(&previous);
        }
        self.by_seq.insert(seq, (addr, kind));
        while self.by_seq.len() > max_entries {
            if let Some((_, (oldest, _))) = self.by_seq.pop_first() {
                self.seq_of.remove(&oldest);
            }
        }
    }
}

#[derive(Debug)]
pub struct Registry {
    rooms: HashMap<String, Room>,
    next_seq: u64,
    max_entries: usize,
    list_budget: usize,
}

impl Registry {
    /// `max_entries` bounds each room; `list_budget` bounds the list sent to an original client.
    pub fn new(max_entries: usize, list_budget: usize) -> Self {
        Self { rooms: HashMap::new(), next_seq: 0, max_entries, list_budget }
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// An original client at `addr` asks: return its list (the default room without itself), then
    /// remember it.
    pub fn admit_original(&mut self, addr: SocketAddr) -> Vec<u8> {
        let addr = canonical(addr);
        let seq = self.next_seq();
        let room = self.rooms.entry(DEFAULT_ROOM.to_owned()).or_default();
        let list = peer_list::encode(room.newest_first().map(|(a, _)| a).filter(|known| **known != addr), self.list_budget);
        room.insert(seq, addr, Kind::Original, self.max_entries);
        list
    }

    /// A p2pchat peer at `addr` registers in `room`: return the other members, newest first.
    pub fn register(&mut self, room_name: &str, addr: SocketAddr) -> (Vec<Member>, Registration) {
        let addr = canonical(addr);
        let seq = self.next_seq();
        let room = self.rooms.entry(room_name.to_owned()).or_default();
        let members = room
            .newest_first()
            .filter(|(known, _)| *known != addr)
            .map(|(known, kind)| Member { addr: known.to_string(), p2pchat: *kind == Kind::P2pchat })
            .collect();
        room.insert(seq, addr, Kind::P2pchat, self.max_entries);
        (members, Registration(seq))
    }

    /// The registration's connection closed: forget the peer, unless it has registered again since.
    pub fn deregister(&mut self, room_name: &str, addr: SocketAddr, registration: Registration) {
        let addr = canonical(addr);
        let Some(room) = self.rooms.get_mut(room_name) else { return };
        if room.seq_of.get(&addr) == Some(&registration.0) {
            room.seq_of.remove(&addr);
            room.by_seq.remove(&registration.0);
        }
        if room.by_seq.is_empty() {
            self.rooms.remove(room_name);
        }
    }

    /// The members of `room`, oldest first.
    pub fn members(&self, room: &str) -> Vec<(SocketAddr, Kind)> {
        self.rooms.get(room).map(|r| r.by_seq.values().copied().collect()).unwrap_or_default()
    }

    /// How many addresses are remembered, over all rooms.
    pub fn len(&self) -> usize {
        self.rooms.values().map(|r| r.by_seq.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::peer_list::LEGACY_LIST_BUDGET;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn addrs(members: &[(SocketAddr, Kind)]) -> Vec<SocketAddr> {
        members.iter().map(|(a, _)| *a).collect()
    }

    #[test]
    fn behaves_like_the_original_for_a_small_room() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        assert_eq!(r.admit_original(a("10.0.0.1:1000")), b"-");
        assert_eq!(r.admit_original(a("10.0.0.2:2000")), b"10.0.0.1:1000");
        assert_eq!(r.admit_original(a("10.0.0.3:3000")), b"10.0.0.1:1000-10.0.0.2:2000");
        assert_eq!(addrs(&r.members(DEFAULT_ROOM)), vec![a("10.0.0.1:1000"), a("10.0.0.2:2000"), a("10.0.0.3:3000")]);
    }

    #[test]
    fn a_returning_address_is_not_listed_to_itself_and_counted_once() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        r.admit_original(a("10.0.0.1:1000"));
        r.admit_original(a("10.0.0.2:2000"));
        assert_eq!(r.admit_original(a("10.0.0.1:1000")), b"10.0.0.2:2000");
        assert_eq!(addrs(&r.members(DEFAULT_ROOM)), vec![a("10.0.0.2:2000"), a("10.0.0.1:1000")]);
    }

    #[test]
    fn mapped_ipv6_is_stored_as_ipv4() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        r.admit_original(a("[::ffff:10.0.0.1]:1000"));
        assert_eq!(r.admit_original(a("10.0.0.1:1000")), b"-");
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn memory_is_bounded_and_forgets_the_oldest() {
        let mut r = Registry::new(3, LEGACY_LIST_BUDGET);
        for port in 1..=5u16 {
            r.admit_original(SocketAddr::from(([10, 0, 0, 1], port)));
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.admit_original(a("10.0.0.9:9")), b"10.0.0.1:3-10.0.0.1:4-10.0.0.1:5");
    }

    #[test]
    fn the_list_fits_one_read_however_many_joined() {
        let mut r = Registry::new(10_000, LEGACY_LIST_BUDGET);
        for i in 0..5_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            r.admit_original(SocketAddr::from(([10, b, c, d], 40_000)));
        }
        let list = r.admit_original(a("192.168.1.1:1"));
        assert!(list.len() <= LEGACY_LIST_BUDGET);
        let (listed, rejected) = peer_list::parse(&list);
        assert!(rejected.is_empty());
        assert_eq!(listed.last(), Some(&a("10.0.19.135:40000")), "the newest entry is kept");
    }

    #[test]
    fn rooms_are_separate_and_originals_see_only_the_default_room() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        let (members, _) = r.register("x", a("10.0.0.1:1"));
        assert!(members.is_empty());
        let (members, _) = r.register("x", a("10.0.0.2:2"));
        assert_eq!(members, vec![Member { addr: "10.0.0.1:1".into(), p2pchat: true }]);
        r.register(DEFAULT_ROOM, a("10.0.0.3:3"));
        assert_eq!(r.admit_original(a("10.0.0.4:4")), b"10.0.0.3:3");
        let (members, _) = r.register(DEFAULT_ROOM, a("10.0.0.5:5"));
        assert_eq!(
            members,
            vec![Member { addr: "10.0.0.4:4".into(), p2pchat: false }, Member { addr: "10.0.0.3:3".into(), p2pchat: true }]
        );
    }

    #[test]
    fn deregistration_removes_only_its_own_registration() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        let (_, first) = r.register("x", a("10.0.0.1:1"));
        let (_, again) = r.register("x", a("10.0.0.1:1"));
        r.deregister("x", a("10.0.0.1:1"), first);
        assert_eq!(r.members("x").len(), 1, "the stale close left the new registration alone");
        r.deregister("x", a("10.0.0.1:1"), again);
        assert!(r.members("x").is_empty());
        assert!(r.is_empty(), "an empty room is forgotten");
    }
}
