//! Relays: passing messages between two members that cannot reach each other, and members relayed
//! to us (the bookkeeping is `peer::relay`; the decisions are here).

use super::*;

impl PeerState {
    /// A new message on link `id`, which we relay: pass it on to its partners.
    pub fn forward(&mut self, id: LinkId, line: Line) {
        let mut partners: Vec<LinkId> = self.relays.partners_of(id).filter(|p| self.links.contains_key(p)).collect();
        partners.sort_unstable();
        for link in partners {
            // A partner that is not reading is dropped by its own writes and pings.
            self.out(Output::Write { link, bytes: line.clone() });
        }
    }

    /// A p2pchat member stays out of reach: if the tracker relays, link to its relay (once), so a
    /// member that can reach nobody we know can still be relayed to us.
    pub(super) fn link_to_hub(&mut self, now: Now) {
        // (In a private room, too: the link to the tracker is not encrypted, but every message on it
        // is sealed, and our hello there carries no name.)
        let (true, Hub::Unused, Some(tracker)) = (self.tracker_relays, self.hub, self.tracker) else { return };
        log::info!("linking to the tracker's relay at {tracker}");
        self.hub = Hub::Dialling;
        self.dial(now, Contact { addr: tracker, known: Some(Protocol::P2pchat) }, self.limits.retry_refused_for);
    }

    /// p2pchat members whose dial has not connected within `relay_first`: reach them through a relay
    /// now (our neighbours are asked by address, and the tracker's relay is used if it offers one),
    /// and have the tracker punch a hole, while the dials go on. Whatever connects first carries the
    /// room; a direct link that comes up later retires the relay (`retire_relay`).
    pub(super) fn relay_slow_dials(&mut self, now: Now) {
        let due: Vec<SocketAddr> =
            self.slow_dials.iter().filter(|(_, at)| **at <= now.at).map(|(addr, _)| *addr).collect();
        for addr in due {
            self.slow_dials.remove(&addr);
            if !self.dialling.contains(&addr) || self.linked_to(addr) {
                continue;
            }
            log::info!(
                "{addr} did not answer within {:?}; reaching it through a relay while dialling on",
                self.limits.relay_first
            );
            self.punch(addr);
            self.relays.unreached(addr, now.at);
            self.link_to_hub(now);
        }
    }

    /// Whether the connection to `addr` we are opening is our link to the tracker's relay.
    pub(super) fn dials_hub(&self, addr: SocketAddr) -> bool {
        self.hub == Hub::Dialling && Some(addr) == self.tracker
    }

    /// Our hello to the tracker's relay: who we are to it, and nothing it need not know (in a private
    /// room not even our name).
    pub(super) fn hub_hello(&self) -> Hello {
        let name = if self.private.is_some() { None } else { Some(self.name.clone()) };
        Hello {
            v: PROTOCOL_VERSION,
            id: self.my_id.clone(),
            name,
            room: self.room.clone(),
            listen_port: Some(self.listen_port),
            peers: Vec::new(),
            identity: None,
            relay: true,
            quiet: false,
        }
    }

    /// Whether link `id` was our link to the tracker's relay; we have none after this.
    pub(super) fn hub_gone(&mut self, id: LinkId) -> bool {
        let was = matches!(self.hub, Hub::Opening(hub) | Hub::Linked(hub) if hub == id);
        if was {
            self.hub = Hub::Unused;
        }
        was
    }

    /// Our p2pchat link to the member with session id `peer`, if we hold one.
    pub(super) fn p2pchat_link_to(&self, peer: &str) -> Option<LinkId> {
        self.links
            .iter()
            .find(|(_, l)| l.kind == LinkKind::P2pchat && l.peer_id.as_deref() == Some(peer))
            .map(|(id, _)| *id)
    }

    /// Ask neighbours to relay the members we heard of, or gave up dialling, but still cannot reach.
    pub(super) fn ask_relays(&mut self, now: Now) {
        let neighbours: Vec<LinkId> =
            self.links.iter().filter(|(_, l)| l.kind == LinkKind::P2pchat).map(|(id, _)| *id).collect();
        for (via, wanted) in self.relays.due_asks(now.at, &neighbours) {
            let Some(link) = self.links.get(&via) else { continue };
            let neighbour = link.shown_addr();
            let frame = match wanted {
                relay::Wanted::Peer(peer) => {
                    log::info!("cannot reach member {peer} directly; asking {neighbour} to relay it");
                    Frame::RelayAsk { peer, addr: None }
                }
                relay::Wanted::Addr(addr) => {
                    log::info!("cannot reach {addr} directly; asking {neighbour} to relay it");
                    Frame::RelayAsk { peer: String::new(), addr: Some(addr.to_string()) }
                }
            };
            self.write_frame(via, &frame);
        }
    }

    /// The `relay_open` that tells one end of a relay about the other (link `id`).
    pub(super) fn relay_open_for(&self, id: LinkId) -> Option<Line> {
        let link = self.links.get(&id)?;
        let frame = Frame::RelayOpen {
            peer: link.peer_id.clone()?,
            name: link.name.clone(),
            addr: link.shown_addr().to_string(),
        };
        Some(frames::encode(&frame).into())
    }

    /// The member on link `asker` cannot reach member `peer` (or, not knowing its session id, the
    /// member listening at `addr`): pass their messages between them if we are linked to it, and
    /// tell both.
    pub(super) fn relay_between(&mut self, asker: LinkId, peer: &str, addr: Option<SocketAddr>) {
        if self.links.get(&asker).is_none_or(|l| l.kind != LinkKind::P2pchat) {
            return;
        }
        let by_addr = || {
            let addr = addr?;
            let listening_there = |l: &Link| l.kind == LinkKind::P2pchat && l.listen_addr == Some(addr);
            self.links.iter().find(|(_, l)| listening_there(l)).map(|(id, _)| *id)
        };
        let target = if peer.is_empty() { by_addr() } else { self.p2pchat_link_to(peer) };
        let Some(target) = target.filter(|t| *t != asker) else {
            let reason = "the relay is not linked to it".to_owned();
            // Named as it was asked for, so the asker knows which ask this answers.
            let peer = match addr.filter(|_| peer.is_empty()) {
                Some(addr) => addr.to_string(),
                None => peer.to_owned(),
            };
            return self.write_frame(asker, &Frame::RelayClose { peer, reason, clean: false });
        };
        if self.relays.pair(asker, target) {
            for (id, other) in [(asker, target), (target, asker)] {
                self.out(Output::Forwards { link: id, on: true });
                if let (Some(link), Some(other)) = (self.links.get(&id), self.links.get(&other)) {
                    log::info!("relaying between {} and {}", link.shown_addr(), other.shown_addr());
                }
            }
        }
        // Sent again to an end that asks again: its first answer may have crossed a lost link.
        for (id, other) in [(asker, target), (target, asker)] {
            if let Some(open) = self.relay_open_for(other) {
                self.out(Output::Write { link: id, bytes: open });
            }
        }
    }

    /// Link `via` relays member `peer` to us.
    pub(super) fn relayed_to_us(
        &mut self,
        now: Now,
        via: LinkId,
        peer: String,
        name: Option<String>,
        addr: SocketAddr,
    ) {
        let Some(via_addr) = self
            .links
            .get(&via)
            .filter(|l| matches!(l.kind, LinkKind::P2pchat | LinkKind::Relay))
            .map(|l| l.shown_addr())
        else {
            return;
        };
        if peer == self.my_id {
            return;
        }
        if self.p2pchat_link_to(&peer).is_some() {
            // Linked directly already (the relay answered an ask that crossed the direct link).
            return self.retire_relay(via, &peer);
        }
        match self.relays.opened(via, peer, name.clone(), addr) {
            relay::Opened::New => {
                log::info!("{addr} is relayed to us by {via_addr}");
                // What the member said before the relay opened went to the relay, not to us: learn
                // what the relay holds that we lack.
                self.send_summary(now, via, true);
                self.emit(Event::Joined {
                    addr,
                    name,
                    protocol: Protocol::P2pchat,
                    outgoing: false,
                    relayed_by: Some(via_addr),
                    encrypted: false,
                    fingerprint: None,
                    key_changed: false,
                });
            }
            relay::Opened::Renamed { old } => {
                if let Some(new) = name {
                    self.emit(Event::Renamed { addr, old, new });
                }
            }
            relay::Opened::Unchanged => {}
        }
    }

    /// We are linked directly to member `peer`, which link `via` relays to us: tell the relay to stop
    /// passing its messages to us. Nothing is lost: what the member said before the direct link came
    /// up either came through the relay already or is in the summary both ends send on the new link.
    /// (A relay of an earlier version ignores this; its copies are then shown once, as before.)
    pub(super) fn retire_relay(&mut self, via: LinkId, peer: &str) {
        if self.links.contains_key(&via) {
            let frame = Frame::RelayClose { peer: peer.to_owned(), reason: "linked directly".to_owned(), clean: true };
            self.write_frame(via, &frame);
        }
    }

    /// The member on link `asker` says it is linked directly to member `peer` now: stop passing
    /// messages between the two, and say nothing to either (they have their own link). False when we
    /// relay nothing between them: then the frame is a relay's, about a member it relayed to us.
    pub(super) fn stop_relaying(&mut self, asker: LinkId, peer: &str) -> bool {
        let Some(target) = self.p2pchat_link_to(peer) else { return false };
        if !self.relays.unpair(asker, target) {
            return false;
        }
        for link in [asker, target] {
            let on = self.relays.forwards(link);
            self.out(Output::Forwards { link, on });
        }
        if let (Some(a), Some(b)) = (self.links.get(&asker), self.links.get(&target)) {
            log::info!(
                "no longer relaying between {} and {}: they are linked directly",
                a.shown_addr(),
                b.shown_addr()
            );
        }
        true
    }

    /// Link `id` (at `addr`; to member `peer` when it spoke p2pchat) is gone: members it relayed to
    /// us are lost, and members we relayed it to hear that it is gone.
    pub(super) fn end_relays(&mut self, id: LinkId, peer: Option<&str>, addr: SocketAddr, reason: &str, clean: bool) {
        let gone = self.relays.link_gone(id, peer);
        for (_, member) in gone.lost {
            let reason = format!("its relay {addr} is gone ({reason})");
            self.emit(Event::Left { addr: member.addr, name: member.name, reason, clean: false });
        }
        let Some(peer) = peer else { return };
        let close: Line =
            frames::encode(&Frame::RelayClose { peer: peer.to_owned(), reason: reason.to_owned(), clean }).into();
        for partner in gone.partners {
            if self.links.contains_key(&partner) {
                self.out(Output::Write { link: partner, bytes: close.clone() });
                let on = self.relays.forwards(partner);
                self.out(Output::Forwards { link: partner, on });
            }
        }
    }
}
