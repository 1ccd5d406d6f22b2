//! Relays: reaching a member we cannot dial (a symmetric NAT, a firewall) through one we can.
//!
//! Each p2pchat hello lists the members its sender is linked to, with their session ids. A member
//! some neighbour is linked to, but that we still cannot reach directly `relay_first` after first
//! hearing of it, is asked for from that neighbour (`relay_ask`); unanswered, it is asked again every
//! `relay_after`. The neighbour pairs the two links: from then on, each new message arriving on one
//! is written to the other too, and it tells both ends (`relay_open`) so their member lists show who
//! is relayed and by whom. Messages keep their ids, so a copy that also arrives another way is shown
//! once.
//!
//! A member we dial that has not answered within `relay_first` may be one no `hello` named to us: it
//! joined while we did, and our neighbours' hellos were written before they linked to it. It is
//! asked for by its address instead, from one p2pchat neighbour after another until one relays it (a
//! neighbour not linked to it answers `relay_close` with the address as `peer`); when every neighbour
//! said no, the round starts again `relay_after` later.
//!
//! The relay is a bridge, not a destination: the dials go on, and once a direct link comes up the
//! state tells the relay to stop (see `relaying.rs`).
//!
//! This module is the bookkeeping only, without I/O: the actor feeds it what happens and does what
//! it answers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use std::time::Instant;

use super::types::LinkId;
use crate::pairs::Pairs;

/// A member we reach through a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RelayedMember {
    pub via: LinkId,
    pub name: Option<String>,
    pub addr: SocketAddr,
}

/// A member some neighbours are linked to and we are not.
struct Heard {
    vias: HashSet<LinkId>,
    since: Instant,
    asked: Option<Instant>,
}

impl Heard {
    /// When it is to be asked for (again): `first` after we heard of it, `after` after the last ask.
    fn due_at(&self, first: Duration, after: Duration) -> Instant {
        let waited = self.since + first;
        self.asked.map_or(waited, |at| waited.max(at + after))
    }
}

/// A member's address we could not dial in time, which no neighbour named: asked for by address.
struct Unreached {
    /// When it became one.
    since: Instant,
    /// Neighbours that said they are not linked to it, this round.
    refused: BTreeSet<LinkId>,
    /// The neighbour asked now, and when.
    asking: Option<(LinkId, Instant)>,
    /// No neighbour is asked before this (after a round in which every one said no).
    next_round: Option<Instant>,
}

impl Unreached {
    /// When a neighbour is to be asked for it: once the one asked has not answered for `after`, at
    /// the next round, or at once.
    fn due_at(&self, after: Duration) -> Instant {
        match (self.asking, self.next_round) {
            (Some((_, at)), _) => at + after,
            (None, Some(at)) => at,
            (None, None) => self.since,
        }
    }
}

/// Whom to ask for a relay.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Wanted {
    /// The member with this session id.
    Peer(String),
    /// The member listening at this address.
    Addr(SocketAddr),
}

/// What a `relay_open` changed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Opened {
    /// A member we could not reach is now relayed to us.
    New,
    /// A relayed member has a new name (it was called `old`).
    Renamed { old: Option<String> },
    /// Nothing: we already have it so, or we are linked to it directly.
    Unchanged,
}

/// A link ended: what that means for relays.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct LinkGone {
    /// Members we reached through it, by session id: no longer reached.
    pub lost: Vec<(String, RelayedMember)>,
    /// Links we relayed it to: each must hear that it is gone.
    pub partners: Vec<LinkId>,
}

pub(super) struct Relays {
    relay_first: Duration,
    relay_after: Duration,
    heard: HashMap<String, Heard>,
    relayed: HashMap<String, RelayedMember>,
    /// Addresses we gave up dialling and ask for by address.
    unreached: BTreeMap<SocketAddr, Unreached>,
    /// As a relay: which links we pass each link's messages to.
    pairs: Pairs<LinkId>,
}

impl Relays {
    /// Members heard of, addresses asked for, and members relayed to us (for the simulator's
    /// bounds check).
    #[cfg(test)]
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.heard.len(), self.unreached.len(), self.relayed.len())
    }

    pub fn new(relay_first: Duration, relay_after: Duration) -> Self {
        Self {
            relay_first,
            relay_after,
            heard: HashMap::new(),
            relayed: HashMap::new(),
            unreached: BTreeMap::new(),
            pairs: Pairs::new(),
        }
    }

    /// Neighbour `via` is linked to these members, none of which we are linked to.
    pub fn heard_of(&mut self, via: LinkId, peers: impl IntoIterator<Item = String>, now: Instant) {
        for peer in peers {
            self.heard
                .entry(peer)
                .or_insert_with(|| Heard { vias: HashSet::new(), since: now, asked: None })
                .vias
                .insert(via);
        }
    }

    /// We are linked to `peer` (listening at `addr`) directly now: it needs no relay (copies that
    /// still come through one are shown once). Returns the relayed entry it replaces.
    pub fn direct(&mut self, peer: &str, addr: SocketAddr) -> Option<RelayedMember> {
        self.heard.remove(peer);
        self.unreached.remove(&addr);
        self.relayed.remove(peer)
    }

    /// A dial to the p2pchat member at `addr` did not connect in time (or gave up): ask for it by
    /// address unless it is relayed to us already.
    pub fn unreached(&mut self, addr: SocketAddr, now: Instant) {
        if !self.relayed.values().any(|m| m.addr == addr) {
            self.unreached.entry(addr).or_insert_with(|| Unreached {
                since: now,
                refused: BTreeSet::new(),
                asking: None,
                next_round: None,
            });
        }
    }

    /// When `due_asks` next has something to ask (if the neighbours it is given do not change).
    pub fn next_ask_at(&self) -> Option<Instant> {
        let peers = self
            .heard
            .iter()
            .filter(|(peer, _)| !self.relayed.contains_key(*peer))
            .map(|(_, heard)| heard.due_at(self.relay_first, self.relay_after));
        let addrs = self.unreached.values().map(|unreached| unreached.due_at(self.relay_after));
        peers.chain(addrs).min()
    }

    /// Neighbour `via` is not linked to the member at `addr`.
    pub fn not_via(&mut self, via: LinkId, addr: SocketAddr) {
        if let Some(unreached) = self.unreached.get_mut(&addr) {
            unreached.refused.insert(via);
            unreached.asking = unreached.asking.filter(|(asked, _)| *asked != via);
        }
    }

    /// Members to ask a relay for now, and which neighbour to ask (of `neighbours`, our p2pchat
    /// members' links): those heard of `relay_after` ago, not reached yet and not asked within the
    /// last `relay_after`; and those we gave up dialling, from the next neighbour that did not
    /// refuse (an unanswered ask counts as a refusal after `relay_after`).
    pub fn due_asks(&mut self, now: Instant, neighbours: &[LinkId]) -> Vec<(LinkId, Wanted)> {
        let mut asks: Vec<(LinkId, Wanted)> =
            self.due_peer_asks(now).into_iter().map(|(via, peer)| (via, Wanted::Peer(peer))).collect();
        for (addr, unreached) in &mut self.unreached {
            if now < unreached.due_at(self.relay_after) {
                continue;
            }
            // The neighbour asked did not answer in time: a no.
            if let Some((via, _)) = unreached.asking.take() {
                unreached.refused.insert(via);
            }
            match neighbours.iter().find(|n| !unreached.refused.contains(n)) {
                Some(&via) => {
                    unreached.asking = Some((via, now));
                    unreached.next_round = None;
                    asks.push((via, Wanted::Addr(*addr)));
                }
                None => {
                    unreached.refused.clear();
                    unreached.next_round = Some(now + self.relay_after);
                }
            }
        }
        asks
    }

    fn due_peer_asks(&mut self, now: Instant) -> Vec<(LinkId, String)> {
        let mut asks = Vec::new();
        for (peer, heard) in &mut self.heard {
            if self.relayed.contains_key(peer) || now < heard.due_at(self.relay_first, self.relay_after) {
                continue;
            }
            // The smallest id: any neighbour that knows it will do, and it is the same one each time.
            if let Some(&via) = heard.vias.iter().min() {
                heard.asked = Some(now);
                asks.push((via, peer.clone()));
            }
        }
        // In a stable order (the map's is per process), so a simulated run replays exactly.
        asks.sort_unstable();
        asks
    }

    /// Relay `via` says it passes messages between us and `peer` now.
    pub fn opened(&mut self, via: LinkId, peer: String, name: Option<String>, addr: SocketAddr) -> Opened {
        match self.relayed.get_mut(&peer) {
            Some(known) if known.via == via && known.name == name => Opened::Unchanged,
            Some(known) if known.via == via => Opened::Renamed { old: std::mem::replace(&mut known.name, name) },
            // Relayed by another already: keep the one we have.
            Some(_) => Opened::Unchanged,
            None => {
                self.unreached.remove(&addr);
                self.relayed.insert(peer, RelayedMember { via, name, addr });
                Opened::New
            }
        }
    }

    /// Relay `via` stopped passing `peer`'s messages; the member is lost if it relayed it. A member
    /// that left on purpose is forgotten; otherwise another neighbour may still be asked for it.
    pub fn closed(&mut self, via: LinkId, peer: &str, clean: bool) -> Option<RelayedMember> {
        if clean {
            self.heard.remove(peer);
        } else if let Some(heard) = self.heard.get_mut(peer) {
            heard.vias.remove(&via);
            if heard.vias.is_empty() {
                self.heard.remove(peer);
            }
        }
        match self.relayed.get(peer) {
            Some(member) if member.via == via => self.relayed.remove(peer),
            _ => None,
        }
    }

    /// As a relay: pass messages between links `a` and `b` from now on. False when already so.
    pub fn pair(&mut self, a: LinkId, b: LinkId) -> bool {
        self.pairs.pair(a, b)
    }

    /// As a relay: stop passing messages between `a` and `b`. False when they were not paired.
    pub fn unpair(&mut self, a: LinkId, b: LinkId) -> bool {
        self.pairs.unpair(&a, &b)
    }

    /// Links that get a copy of what arrives on `id`.
    pub fn partners_of(&self, id: LinkId) -> impl Iterator<Item = LinkId> + '_ {
        self.pairs.partners_of(&id).copied()
    }

    /// Link `id` (to the member `peer`, when it spoke p2pchat) is gone.
    pub fn link_gone(&mut self, id: LinkId, peer: Option<&str>) -> LinkGone {
        if let Some(peer) = peer {
            self.heard.remove(peer);
        }
        self.heard.retain(|_, heard| {
            heard.vias.remove(&id);
            !heard.vias.is_empty()
        });
        for unreached in self.unreached.values_mut() {
            unreached.refused.remove(&id);
            unreached.asking = unreached.asking.filter(|(asked, _)| *asked != id);
        }
        let lost_ids: Vec<String> = self.relayed.iter().filter(|(_, m)| m.via == id).map(|(p, _)| p.clone()).collect();
        let lost = lost_ids.into_iter().filter_map(|p| self.relayed.remove(&p).map(|m| (p, m))).collect();
        LinkGone { lost, partners: self.pairs.remove(&id) }
    }

    /// Whether anything arriving on `id` is passed on.
    pub fn forwards(&self, id: LinkId) -> bool {
        self.pairs.has_partners(&id)
    }

    pub fn relayed(&self) -> impl Iterator<Item = (&String, &RelayedMember)> {
        self.relayed.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_secs(1);
    const AFTER: Duration = Duration::from_secs(10);

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn a_member_heard_of_is_asked_for_once_it_stayed_unreached() {
        let mut relays = Relays::new(FIRST, AFTER);
        let t0 = Instant::now();
        relays.heard_of(3, ["q".to_owned()], t0);
        relays.heard_of(1, ["q".to_owned()], t0);
        assert_eq!(relays.next_ask_at(), Some(t0 + FIRST));
        assert!(relays.due_peer_asks(t0 + FIRST / 2).is_empty(), "a direct dial gets its first moment");
        assert_eq!(relays.due_peer_asks(t0 + FIRST), vec![(1, "q".to_owned())], "then a relay, at once");
        assert_eq!(relays.next_ask_at(), Some(t0 + FIRST + AFTER));
        assert!(relays.due_peer_asks(t0 + FIRST + AFTER / 2).is_empty(), "not asked again right away");
        let again = t0 + FIRST + AFTER;
        assert_eq!(relays.due_peer_asks(again), vec![(1, "q".to_owned())], "asked again while unanswered");
        assert_eq!(relays.opened(1, "q".into(), Some("quinn".into()), addr(7)), Opened::New);
        assert_eq!(relays.next_ask_at(), None, "relayed: nothing to wait for");
        assert!(relays.due_peer_asks(t0 + AFTER * 10).is_empty(), "relayed: nothing to ask");
    }

    #[test]
    fn a_direct_link_ends_the_need_for_a_relay() {
        let mut relays = Relays::new(FIRST, AFTER);
        let t0 = Instant::now();
        relays.heard_of(1, ["q".to_owned()], t0);
        relays.opened(1, "q".into(), None, addr(7));
        assert_eq!(relays.direct("q", addr(7)), Some(RelayedMember { via: 1, name: None, addr: addr(7) }));
        assert!(relays.due_peer_asks(t0 + AFTER * 2).is_empty());
        assert_eq!(relays.relayed().count(), 0);
    }

    #[test]
    fn a_relay_renames_and_a_second_relay_is_ignored() {
        let mut relays = Relays::new(FIRST, AFTER);
        assert_eq!(relays.opened(1, "q".into(), Some("a".into()), addr(7)), Opened::New);
        assert_eq!(relays.opened(1, "q".into(), Some("a".into()), addr(7)), Opened::Unchanged);
        assert_eq!(relays.opened(1, "q".into(), Some("b".into()), addr(7)), Opened::Renamed { old: Some("a".into()) });
        assert_eq!(relays.opened(2, "q".into(), Some("c".into()), addr(7)), Opened::Unchanged);
        assert_eq!(relays.closed(2, "q", false), None, "only the relay that has it can close it");
        assert!(relays.closed(1, "q", true).is_some());
    }

    #[test]
    fn losing_a_relay_loses_its_members_but_another_neighbour_is_asked() {
        let mut relays = Relays::new(FIRST, AFTER);
        let t0 = Instant::now();
        relays.heard_of(1, ["q".to_owned(), "r".to_owned()], t0);
        relays.heard_of(2, ["q".to_owned()], t0);
        relays.opened(1, "q".into(), None, addr(7));
        relays.opened(1, "r".into(), None, addr(8));
        let gone = relays.link_gone(1, Some("p"));
        let mut lost: Vec<&str> = gone.lost.iter().map(|(p, _)| p.as_str()).collect();
        lost.sort_unstable();
        assert_eq!(lost, ["q", "r"]);
        assert_eq!(relays.due_peer_asks(t0 + AFTER), vec![(2, "q".to_owned())], "r had no other neighbour");
    }

    #[test]
    fn a_member_that_left_on_purpose_is_not_asked_for_again() {
        let mut relays = Relays::new(FIRST, AFTER);
        let t0 = Instant::now();
        relays.heard_of(1, ["q".to_owned()], t0);
        relays.heard_of(2, ["q".to_owned()], t0);
        relays.opened(1, "q".into(), None, addr(7));
        assert!(relays.closed(1, "q", true).is_some());
        assert!(relays.due_peer_asks(t0 + AFTER * 3).is_empty());
    }

    #[test]
    fn a_gone_link_ends_its_pairs() {
        let mut relays = Relays::new(FIRST, AFTER);
        relays.pair(1, 2);
        relays.pair(1, 3);
        assert!(relays.forwards(1) && relays.forwards(2));
        assert_eq!(relays.link_gone(1, Some("p")).partners, [2, 3]);
        assert!(!relays.forwards(2) && !relays.forwards(3), "nothing left to pass on");
    }

    #[test]
    fn a_member_we_gave_up_dialling_is_asked_for_by_address_from_one_neighbour_after_another() {
        let mut relays = Relays::new(FIRST, AFTER);
        let t0 = Instant::now();
        relays.unreached(addr(7), t0);
        let ask = |via| vec![(via, Wanted::Addr(addr(7)))];
        assert_eq!(relays.next_ask_at(), Some(t0), "due at once");
        assert_eq!(relays.due_asks(t0, &[2, 5]), ask(2), "asked at once, from the first neighbour");
        assert_eq!(relays.next_ask_at(), Some(t0 + AFTER), "an answer is awaited");
        assert!(relays.due_asks(t0, &[2, 5]).is_empty(), "one ask at a time");
        relays.not_via(2, addr(7));
        assert_eq!(relays.due_asks(t0, &[2, 5]), ask(5), "the next one, as soon as the first says no");
        assert!(relays.due_asks(t0 + AFTER / 2, &[2, 5]).is_empty());
        assert!(relays.due_asks(t0 + AFTER, &[2, 5]).is_empty(), "unanswered: a no; every one said no");
        assert_eq!(relays.next_ask_at(), Some(t0 + AFTER * 2), "the next round");
        assert!(relays.due_asks(t0 + AFTER * 3 / 2, &[2, 5]).is_empty(), "a new round waits");
        assert_eq!(relays.due_asks(t0 + AFTER * 2, &[2, 5]), ask(2), "and starts from the first again");
        assert_eq!(relays.opened(2, "q".into(), None, addr(7)), Opened::New);
        assert!(relays.due_asks(t0 + AFTER * 5, &[2, 5]).is_empty(), "relayed: nothing to ask");
        assert_eq!(relays.next_ask_at(), None);
        relays.unreached(addr(7), t0);
        assert!(relays.due_asks(t0 + AFTER * 5, &[2, 5]).is_empty(), "still relayed");
    }

    #[test]
    fn a_direct_link_or_a_gone_neighbour_settles_an_ask_by_address() {
        let mut relays = Relays::new(FIRST, AFTER);
        let t0 = Instant::now();
        relays.unreached(addr(7), t0);
        assert_eq!(relays.due_asks(t0, &[2, 5]), vec![(2, Wanted::Addr(addr(7)))]);
        relays.link_gone(2, None);
        assert_eq!(relays.due_asks(t0, &[5]), vec![(5, Wanted::Addr(addr(7)))], "its ask went with it");
        assert_eq!(relays.direct("q", addr(7)), None);
        assert!(relays.due_asks(t0 + AFTER * 5, &[5]).is_empty(), "linked directly");
    }
}
