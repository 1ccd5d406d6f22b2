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
//!
//! Original entries stay listed only while they are known to be alive: each has a time it was last
//! confirmed (its join, a p2pchat member vouching for it, or a successful probe). One unconfirmed for
//! longer than the TTL is due for a probe ([`Registry::due_for_probe`]); a failed probe removes it. Time is
//! passed in, so all of this is tested without waiting.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net::canonical;
use crate::protocol::DEFAULT_ROOM;
use crate::wire::frames::{self, Member, Offers, Welcome};
use crate::wire::peer_list;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Original,
    P2pchat,
}

/// Proof of one registration; see [`Registry::deregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration(u64);

#[derive(Debug)]
struct Room {
    seq_of: HashMap<SocketAddr, u64>,
    /// Members by join sequence number, oldest first.
    by_seq: BTreeMap<u64, Entry>,
    /// Original members: when each was last known alive, and whether a probe is out for it.
    originals: HashMap<SocketAddr, Liveness>,
    /// The members as a welcome lists them, in blocks by join order (oldest block first), each block
    /// newest member first. A welcome shares these blocks instead of copying 10,000 members; a change
    /// re-encodes one block.
    blocks: Vec<Block>,
    /// Members per block ([`BLOCK`]; smaller in tests).
    block_size: usize,
}

/// Members per block: a change re-encodes up to this many (~20 KB), a welcome is a few dozen blocks.
const BLOCK: usize = 512;

/// The members whose join numbers are in `first..=last`, encoded.
#[derive(Debug)]
struct Block {
    first: u64,
    last: u64,
    count: usize,
    encoded: Arc<[u8]>,
}

#[derive(Debug)]
struct Entry {
    addr: SocketAddr,
    kind: Kind,
    /// The member as a welcome lists it, encoded once (see [`Welcome`]).
    encoded: Box<[u8]>,
}

#[derive(Debug, Clone, Copy)]
struct Liveness {
    confirmed: Instant,
    probing: bool,
}

impl Room {
    fn new(block_size: usize) -> Self {
        Self {
            seq_of: HashMap::new(),
            by_seq: BTreeMap::new(),
            originals: HashMap::new(),
            blocks: Vec::new(),
            block_size,
        }
    }

    fn newest_first(&self) -> impl Iterator<Item = &Entry> {
        self.by_seq.values().rev()
    }

    fn insert(&mut self, seq: u64, addr: SocketAddr, kind: Kind, max_entries: usize) {
        if let Some(previous) = self.seq_of.insert(addr, seq) {
            self.by_seq.remove(&previous);
            self.unlist(previous);
        }
        let encoded =
            frames::encode_member(&Member { addr: addr.to_string(), p2pchat: kind == Kind::P2pchat, id: None });
        self.by_seq.insert(seq, Entry { addr, kind, encoded });
        self.list(seq);
        while self.by_seq.len() > max_entries {
            if let Some((oldest_seq, oldest)) = self.by_seq.pop_first() {
                self.seq_of.remove(&oldest.addr);
                self.originals.remove(&oldest.addr);
                self.unlist(oldest_seq);
            }
        }
    }

    fn remove(&mut self, addr: &SocketAddr) {
        if let Some(seq) = self.seq_of.remove(addr) {
            self.by_seq.remove(&seq);
            self.unlist(seq);
        }
        self.originals.remove(addr);
    }

    /// Add the member that just joined as `seq` (the newest) to the newest block.
    fn list(&mut self, seq: u64) {
        match self.blocks.last_mut() {
            Some(newest) if newest.count < self.block_size => {
                newest.last = seq;
                newest.count += 1;
            }
            _ => self.blocks.push(Block { first: seq, last: seq, count: 1, encoded: Arc::from(&b""[..]) }),
        }
        self.encode_block(self.blocks.len() - 1);
    }

    /// Take the member that joined as `seq` (already out of `by_seq`) out of its block.
    fn unlist(&mut self, seq: u64) {
        let mut at = self.blocks.partition_point(|b| b.last < seq);
        let Some(block) = self.blocks.get_mut(at).filter(|b| b.first <= seq) else { return };
        block.count -= 1;
        if block.count == 0 {
            self.blocks.remove(at);
            return;
        }
        // A block that has shrunk joins a neighbour, so that a room after much churn is still a few
        // blocks (one slice each in a welcome's write).
        let block_size = self.block_size;
        if block.count < block_size / 4 {
            let fits = |a: &Block, b: &Block| a.count + b.count <= block_size;
            if at + 1 < self.blocks.len() && fits(&self.blocks[at], &self.blocks[at + 1]) {
                let newer = self.blocks.remove(at + 1);
                let merged = &mut self.blocks[at];
                (merged.last, merged.count) = (newer.last, merged.count + newer.count);
            } else if at > 0 && fits(&self.blocks[at - 1], &self.blocks[at]) {
                let newer = self.blocks.remove(at);
                at -= 1;
                let merged = &mut self.blocks[at];
                (merged.last, merged.count) = (newer.last, merged.count + newer.count);
            }
        }
        self.encode_block(at);
    }

    fn encode_block(&mut self, at: usize) {
        let (first, last) = (self.blocks[at].first, self.blocks[at].last);
        let mut encoded = Vec::with_capacity(self.blocks[at].count * 48);
        for (i, entry) in self.by_seq.range(first..=last).rev().map(|(_, entry)| entry).enumerate() {
            if i > 0 {
                encoded.push(b',');
            }
            encoded.extend_from_slice(&entry.encoded);
        }
        self.blocks[at].encoded = encoded.into();
    }

    /// The answer to a newcomer at `addr`, which is not in the room (see [`Registry::register`]).
    fn welcome(&self, addr: SocketAddr, offers: Offers) -> Welcome {
        Welcome::new(self.blocks.iter().rev().map(|b| b.encoded.clone()), &addr.to_string(), offers)
    }
}

#[derive(Debug)]
pub struct Registry {
    rooms: HashMap<String, Room>,
    next_seq: u64,
    max_entries: usize,
    list_budget: usize,
    block_size: usize,
}

impl Registry {
    /// `max_entries` bounds each room; `list_budget` bounds the list sent to an original client.
    pub fn new(max_entries: usize, list_budget: usize) -> Self {
        Self { rooms: HashMap::new(), next_seq: 0, max_entries, list_budget, block_size: BLOCK }
    }

    /// Blocks of `block_size` members, so that tests reach many blocks with few members.
    #[cfg(test)]
    fn with_block_size(self, block_size: usize) -> Self {
        Self { block_size, ..self }
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// An original client at `addr` asks: return its list (the default room without itself), then
    /// remember it.
    pub fn admit_original(&mut self, addr: SocketAddr, now: Instant) -> Vec<u8> {
        let addr = canonical(addr);
        let seq = self.next_seq();
        let block_size = self.block_size;
        let room = self.rooms.entry(DEFAULT_ROOM.to_owned()).or_insert_with(|| Room::new(block_size));
        // When more are alive than fit, the most recently confirmed alive go first: registered p2pchat
        // peers (alive now), then original ones by when they were last confirmed.
        let mut candidates: Vec<(Instant, &SocketAddr)> = room
            .newest_first()
            .filter(|entry| entry.addr != addr)
            .map(|Entry { addr: known, kind, .. }| match kind {
                Kind::P2pchat => (now, known),
                Kind::Original => (room.originals.get(known).map_or(now, |l| l.confirmed), known),
            })
            .collect();
        // Only what can fit matters (the shortest entry, `1.1.1.1:1`, is 9 bytes plus a separator).
        let can_fit = self.list_budget / 10 + 1;
        if candidates.len() > can_fit {
            candidates.select_nth_unstable_by(can_fit, |a, b| b.0.cmp(&a.0));
            candidates.truncate(can_fit);
        }
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        let list = peer_list::encode(candidates.into_iter().map(|(_, a)| a), self.list_budget);
        room.insert(seq, addr, Kind::Original, self.max_entries);
        room.originals.insert(addr, Liveness { confirmed: now, probing: false });
        list
    }

    /// A p2pchat member of the default room holds live links to these original peers.
    pub fn vouch(&mut self, originals: &[SocketAddr], now: Instant) {
        let Some(room) = self.rooms.get_mut(DEFAULT_ROOM) else { return };
        for addr in originals {
            if let Some(liveness) = room.originals.get_mut(&canonical(*addr)) {
                liveness.confirmed = now;
            }
        }
    }

    /// Original entries nobody confirmed for `ttl` and not being probed (at most `limit`): they are
    /// marked as probed and returned, for the caller to try to reach.
    pub fn due_for_probe(&mut self, now: Instant, ttl: Duration, limit: usize) -> Vec<SocketAddr> {
        let Some(room) = self.rooms.get_mut(DEFAULT_ROOM) else { return Vec::new() };
        let mut due = Vec::new();
        for (addr, liveness) in room.originals.iter_mut() {
            if due.len() == limit {
                break;
            }
            if !liveness.probing && now.saturating_duration_since(liveness.confirmed) >= ttl {
                liveness.probing = true;
                due.push(*addr);
            }
        }
        due
    }

    /// The probe of `addr` answered (`alive`) or not; a dead original is forgotten.
    pub fn probed(&mut self, addr: SocketAddr, alive: bool, now: Instant) {
        let Some(room) = self.rooms.get_mut(DEFAULT_ROOM) else { return };
        if alive {
            if let Some(liveness) = room.originals.get_mut(&addr) {
                *liveness = Liveness { confirmed: now, probing: false };
            }
        } else {
            room.remove(&addr);
        }
    }

    /// A p2pchat peer at `addr` registers in `room`: return its whole answer (a welcome listing the
    /// other members, newest first, and whether this tracker relays) and the proof of registration.
    pub fn register(&mut self, room_name: &str, addr: SocketAddr, offers: Offers) -> (Welcome, Registration) {
        let addr = canonical(addr);
        let seq = self.next_seq();
        let block_size = self.block_size;
        let room = self.rooms.entry(room_name.to_owned()).or_insert_with(|| Room::new(block_size));
        // Nobody is listed to itself: an earlier registration from this address goes first.
        room.remove(&addr);
        let welcome = room.welcome(addr, offers);
        room.insert(seq, addr, Kind::P2pchat, self.max_entries);
        (welcome, Registration(seq))
    }

    /// The registration's connection closed: forget the peer, unless it has registered again since.
    pub fn deregister(&mut self, room_name: &str, addr: SocketAddr, registration: Registration) {
        let addr = canonical(addr);
        let Some(room) = self.rooms.get_mut(room_name) else { return };
        if room.seq_of.get(&addr) == Some(&registration.0) {
            room.remove(&addr);
        }
        if room.by_seq.is_empty() {
            self.rooms.remove(room_name);
        }
    }

    /// The members of `room`, oldest first.
    pub fn members(&self, room: &str) -> Vec<(SocketAddr, Kind)> {
        self.rooms.get(room).map(|r| r.by_seq.values().map(|e| (e.addr, e.kind)).collect()).unwrap_or_default()
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

    fn welcome_members(welcome: &Welcome) -> Vec<Member> {
        let opening = welcome.to_vec();
        let mut decoder = frames::FrameDecoder::with_limit(frames::MAX_WELCOME_BYTES);
        decoder.feed(&opening[crate::protocol::MAGIC.len()..]);
        match decoder.next_frame() {
            Ok(Some(frames::Frame::Welcome { members, .. })) => members,
            other => panic!("not a welcome: {other:?}"),
        }
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn addrs(members: &[(SocketAddr, Kind)]) -> Vec<SocketAddr> {
        members.iter().map(|(a, _)| *a).collect()
    }

    /// The tests' registry, with a fixed "now" for original clients.
    trait AdmitNow {
        fn admit(&mut self, addr: SocketAddr) -> Vec<u8>;
    }

    impl AdmitNow for Registry {
        fn admit(&mut self, addr: SocketAddr) -> Vec<u8> {
            self.admit_original(addr, Instant::now())
        }
    }

    #[test]
    fn behaves_like_the_original_for_a_small_room() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        assert_eq!(r.admit(a("10.0.0.1:1000")), b"-");
        assert_eq!(r.admit(a("10.0.0.2:2000")), b"10.0.0.1:1000");
        assert_eq!(r.admit(a("10.0.0.3:3000")), b"10.0.0.1:1000-10.0.0.2:2000");
        assert_eq!(addrs(&r.members(DEFAULT_ROOM)), vec![a("10.0.0.1:1000"), a("10.0.0.2:2000"), a("10.0.0.3:3000")]);
    }

    #[test]
    fn a_returning_address_is_not_listed_to_itself_and_counted_once() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        r.admit(a("10.0.0.1:1000"));
        r.admit(a("10.0.0.2:2000"));
        assert_eq!(r.admit(a("10.0.0.1:1000")), b"10.0.0.2:2000");
        assert_eq!(addrs(&r.members(DEFAULT_ROOM)), vec![a("10.0.0.2:2000"), a("10.0.0.1:1000")]);
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
        for i in 0..2_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            r.admit(SocketAddr::from(([10, b, c, d], 40_000)));
        }
        let list = r.admit(a("192.168.1.1:1"));
        assert!(list.len() <= LEGACY_LIST_BUDGET);
        let (listed, rejected) = peer_list::parse(&list);
        assert!(rejected.is_empty());
        assert_eq!(listed.last(), Some(&a("10.0.7.207:40000")), "the newest entry is kept");
    }

    #[test]
    fn rooms_are_separate_and_originals_see_only_the_default_room() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        let (welcome, _) = r.register("x", a("10.0.0.1:1"), Offers::default());
        assert!(welcome_members(&welcome).is_empty());
        let (welcome, _) = r.register("x", a("10.0.0.2:2"), Offers::default());
        assert_eq!(welcome_members(&welcome), vec![Member { addr: "10.0.0.1:1".into(), p2pchat: true, id: None }]);
        r.register(DEFAULT_ROOM, a("10.0.0.3:3"), Offers::default());
        assert_eq!(r.admit(a("10.0.0.4:4")), b"10.0.0.3:3");
        let (welcome, _) = r.register(DEFAULT_ROOM, a("10.0.0.5:5"), Offers::default());
        assert_eq!(
            welcome_members(&welcome),
            vec![
                Member { addr: "10.0.0.4:4".into(), p2pchat: false, id: None },
                Member { addr: "10.0.0.3:3".into(), p2pchat: true, id: None }
            ]
        );
    }

    #[test]
    fn deregistration_removes_only_its_own_registration() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        let (_, first) = r.register("x", a("10.0.0.1:1"), Offers::default());
        let (_, again) = r.register("x", a("10.0.0.1:1"), Offers::default());
        r.deregister("x", a("10.0.0.1:1"), first);
        assert_eq!(r.members("x").len(), 1, "the stale close left the new registration alone");
        r.deregister("x", a("10.0.0.1:1"), again);
        assert!(r.members("x").is_empty());
        assert!(r.is_empty(), "an empty room is forgotten");
    }

    #[test]
    fn originals_stay_while_confirmed_and_are_probed_when_not() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(45);
        r.admit_original(a("10.0.0.1:1"), t0);
        r.admit_original(a("10.0.0.2:2"), t0);
        assert!(r.due_for_probe(t0 + Duration::from_secs(44), ttl, 10).is_empty());
        // A p2pchat member vouches for the first one.
        r.vouch(&[a("10.0.0.1:1")], t0 + Duration::from_secs(40));
        assert_eq!(r.due_for_probe(t0 + Duration::from_secs(46), ttl, 10), vec![a("10.0.0.2:2")]);
        assert!(r.due_for_probe(t0 + Duration::from_secs(47), ttl, 10).is_empty(), "one probe at a time");
        r.probed(a("10.0.0.2:2"), false, t0 + Duration::from_secs(48));
        assert_eq!(addrs(&r.members(DEFAULT_ROOM)), vec![a("10.0.0.1:1")]);
        // Unvouched for a whole TTL, the first is probed; it answers and stays.
        assert_eq!(r.due_for_probe(t0 + Duration::from_secs(86), ttl, 10), vec![a("10.0.0.1:1")]);
        r.probed(a("10.0.0.1:1"), true, t0 + Duration::from_secs(87));
        assert!(r.due_for_probe(t0 + Duration::from_secs(100), ttl, 10).is_empty());
        assert_eq!(r.members(DEFAULT_ROOM).len(), 1);
    }

    #[test]
    fn a_full_list_keeps_the_most_recently_confirmed() {
        let mut r = Registry::new(100, 30); // room for two entries of 13-14 bytes
        let t0 = Instant::now();
        r.admit_original(a("10.0.0.1:1001"), t0);
        r.admit_original(a("10.0.0.2:1002"), t0 + Duration::from_secs(1));
        r.admit_original(a("10.0.0.3:1003"), t0 + Duration::from_secs(2));
        // The oldest joiner was vouched for most recently.
        r.vouch(&[a("10.0.0.1:1001")], t0 + Duration::from_secs(3));
        assert_eq!(r.admit_original(a("10.0.0.9:9"), t0 + Duration::from_secs(4)), b"10.0.0.3:1003-10.0.0.1:1001");
    }

    #[test]
    fn p2pchat_registrations_are_never_probed() {
        let mut r = Registry::new(100, LEGACY_LIST_BUDGET);
        let t0 = Instant::now();
        r.register(DEFAULT_ROOM, a("10.0.0.1:1"), Offers::default());
        assert!(r.due_for_probe(t0 + Duration::from_secs(3600), Duration::from_secs(1), 10).is_empty());
    }

    proptest::proptest! {
        /// Whatever joins, leaves and evictions happened, a welcome lists exactly the room's members
        /// as they were, newest first, and never the newcomer (the blocks stay in step with them).
        #[test]
        fn a_welcome_lists_the_room_newest_first_after_any_churn(
            steps in proptest::collection::vec((0u8..4, 0u16..60), 1..300),
            max_entries in 5usize..40,
            block_size in 1usize..9,
        ) {
            let mut r = Registry::new(max_entries, LEGACY_LIST_BUDGET).with_block_size(block_size);
            let mut registrations = HashMap::new();
            for (kind, who) in steps {
                let addr = a(&format!("10.0.0.{who}:7000"));
                match kind {
                    0 | 1 => {
                        let mut expected: Vec<SocketAddr> = addrs(&r.members(DEFAULT_ROOM)).into_iter().filter(|m| *m != addr).collect();
                        expected.reverse();
                        let (welcome, token) = r.register(DEFAULT_ROOM, addr, Offers::default());
                        registrations.insert(addr, token);
                        let listed: Vec<SocketAddr> = welcome_members(&welcome).iter().map(|m| m.addr.parse().unwrap()).collect();
                        proptest::prop_assert_eq!(listed, expected);
                    }
                    2 => {
                        if let Some(token) = registrations.remove(&addr) {
                            r.deregister(DEFAULT_ROOM, addr, token);
                        }
                    }
                    _ => {
                        r.admit(addr);
                    }
                }
            }
        }
    }
}
