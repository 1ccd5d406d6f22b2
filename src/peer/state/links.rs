//! Links: how a link is classified (probe, original, p2pchat, the tracker's relay), the duplicate
//! rule, adopting a link and what it was holding, peer exchange, presence and trust on first use.

use super::*;

impl PeerState {
    /// Our hello: who we are, and (peer exchange) the members we know where to reach; on a private
    /// link (handshake hash `binding`), our identity proven for it.
    pub(super) fn hello(&self, binding: Option<&[u8]>) -> Hello {
        let peers = self
            .links
            .values()
            .filter(|l| l.is_member())
            .filter_map(|l| {
                l.listen_addr.map(|a| Member {
                    addr: a.to_string(),
                    p2pchat: l.kind == LinkKind::P2pchat,
                    id: l.peer_id.clone(),
                })
            })
            .collect();
        Hello {
            v: PROTOCOL_VERSION,
            id: self.my_id.clone(),
            name: Some(self.name.clone()),
            room: self.room.clone(),
            listen_port: Some(self.listen_port),
            peers,
            identity: binding.map(|b| self.identity.prove(b)),
            relay: false,
            // Members need no pings from us, nor we from them: the kernel's keep-alive probes notice
            // a vanished member without waking either process (see `ping`).
            quiet: true,
        }
    }

    pub(super) fn on_hello(&mut self, now: Now, id: LinkId, hello: Hello) {
        let Some(link) = self.links.get_mut(&id) else { return };
        link.wants_pings = !hello.quiet;
        let (outgoing, remote, binding) = (link.outgoing, link.remote, link.binding.clone());
        if hello.v != PROTOCOL_VERSION {
            let message =
                format!("{remote} speaks p2pchat protocol version {}, this peer version {PROTOCOL_VERSION}", hello.v);
            self.notice(message.clone());
            return self.refuse(id, ERR_VERSION, message);
        }
        if hello.id == self.my_id {
            log::debug!("link {id} reached ourselves; closing it");
            return self.close_quietly(id);
        }
        if hello.room != self.room {
            log::debug!("{remote} is in room {:?}, we are in {:?}", hello.room, self.room);
            return if outgoing {
                self.close_quietly(id)
            } else {
                self.refuse(id, ERR_ROOM, format!("this peer is in room {:?}", self.room))
            };
        }
        if hello.peers.len() > self.limits.max_links {
            let message = format!("a hello listing {} members, more than a room holds", hello.peers.len());
            log::warn!("refusing {remote}: {message}");
            return self.refuse(id, ERR_MALFORMED, message);
        }
        // A member named to us must be the one announced (see `learned`).
        let listen_addr = self.links.get(&id).and_then(|l| l.listen_addr.filter(|_| l.outgoing));
        if let Some((announced, _)) = self.learned_unconfirmed(listen_addr) {
            let wrong = announced.is_some_and(|announced| announced != hello.id);
            if let Some(addr) = listen_addr {
                self.learned_settled(addr);
            }
            if wrong {
                log::debug!("{remote} is not the member we were told listens there; closing it");
                return self.close_quietly(id);
            }
        }
        // On a private link the other end proves its identity key for this very link: no proof, no link.
        if let Some(binding) = binding {
            let proof = hello.identity.as_ref().ok_or(identity::ProofError::Missing);
            match proof.and_then(|proof| identity::verify_proof(proof, &binding)) {
                Ok(key) => {
                    if let Some(link) = self.links.get_mut(&id) {
                        link.key = Some(Box::new(key));
                    }
                }
                Err(err) => {
                    let message = format!("{remote} gave no valid identity: {err}");
                    self.notice(message.clone());
                    return self.refuse(id, ERR_IDENTITY, message);
                }
            }
        }
        let duplicate = self
            .links
            .iter()
            .find(|(_, l)| l.kind == LinkKind::P2pchat && l.peer_id.as_deref() == Some(hello.id.as_str()))
            .map(|(other, l)| (*other, l.outgoing));
        if let Some((existing, existing_outgoing)) = duplicate {
            if !rules::keeps_link(&self.my_id, &hello.id, outgoing, existing_outgoing) {
                log::debug!("link {id} duplicates link {existing} to the same peer; closing it");
                if outgoing {
                    // It answered our hello and may already be writing to it: read it out.
                    return self.retire(id);
                }
                // We have not answered it: a link closed without a word looks to its dialler like an
                // original peer that dropped a probe, so say why.
                return self.refuse(id, ERR_DUPLICATE, "already linked to you through another connection".to_owned());
            }
            log::debug!("link {id} replaces link {existing} to the same peer");
            return self.replace(now, existing, id, hello);
        }
        let linked: HashSet<&str> =
            self.links.values().filter(|l| l.kind == LinkKind::P2pchat).filter_map(|l| l.peer_id.as_deref()).collect();
        let unreached: Vec<String> = hello
            .peers
            .iter()
            .filter(|m| m.p2pchat)
            .filter_map(|m| m.id.clone())
            .filter(|peer| *peer != self.my_id && !linked.contains(peer.as_str()))
            .collect();
        self.relays.heard_of(id, unreached, now.at);
        if self.hub == Hub::Opening(id) {
            if self.adopt(now, id, hello.id, None, None, Vec::new()).is_some() {
                log::info!("linked to the tracker's relay");
                self.hub = Hub::Linked(id);
                if let Some(link) = self.links.get_mut(&id) {
                    link.kind = LinkKind::Relay;
                }
            }
            return;
        }
        let name = hello.name.filter(|n| chat::validate_name(n).is_ok());
        let Some(addr) = self.adopt(now, id, hello.id.clone(), hello.listen_port, name.clone(), Vec::new()) else {
            return;
        };
        let fingerprint = self.meet(id, name.as_deref());
        if let Some(relayed) = self.relays.direct(&hello.id, addr) {
            log::info!("linked directly to {addr}, which a relay passed to us until now");
            self.retire_relay(relayed.via, &hello.id);
        } else if self.moving.remove(&hello.id).is_some() {
            log::debug!("{addr} is back on link {id}");
        } else {
            let (encrypted, key_changed) =
                self.links.get(&id).map_or((false, false), |l| (l.binding.is_some(), l.key_changed));
            self.emit(Event::Joined {
                addr,
                name,
                protocol: Protocol::P2pchat,
                outgoing,
                relayed_by: None,
                encrypted,
                fingerprint,
                key_changed,
            });
        }
        self.after_adopting(now, id, &hello.id);
        self.learn(now, id, hello.peers);
    }

    pub(super) fn on_original(&mut self, now: Now, id: LinkId) {
        if !self.in_default_room() {
            // Original peers are all in the default room; this one is not in ours.
            log::debug!("link {id} speaks the original protocol, which has no rooms; closing it");
            return self.close_quietly(id);
        }
        let listen_addr = self.links.get(&id).and_then(|l| l.listen_addr.filter(|_| l.outgoing));
        let learned = self.learned_unconfirmed(listen_addr).map(|(_, p2pchat)| p2pchat);
        if let Some(addr) = listen_addr.filter(|_| learned.is_some()) {
            self.learned_settled(addr);
        }
        if learned == Some(true) {
            log::debug!(
                "{} was named to us as a p2pchat member, but is not one; closing it",
                listen_addr.map_or(String::new(), |a| a.to_string())
            );
            return self.close_quietly(id);
        }
        let Some(link) = self.links.get_mut(&id) else { return };
        link.kind = LinkKind::Original;
        // Named to us as an original peer: shown once it says a line.
        link.unconfirmed = learned == Some(false);
        if link.outgoing && !link.unconfirmed {
            if let Some(addr) = link.listen_addr {
                self.originals.insert(addr);
            }
        }
        let (addr, outgoing, held) = (link.shown_addr(), link.outgoing, std::mem::take(&mut link.held));
        let unconfirmed = link.unconfirmed;
        self.flush_held(now, id, held);
        if !unconfirmed {
            self.original_joined(addr, None, outgoing);
        }
    }

    fn original_joined(&mut self, addr: SocketAddr, name: Option<String>, outgoing: bool) {
        self.emit(Event::Joined {
            addr,
            name,
            protocol: Protocol::Original,
            outgoing,
            relayed_by: None,
            encrypted: false,
            fingerprint: None,
            key_changed: false,
        });
    }

    pub(super) fn on_probe_rejected(&mut self, now: Now, id: LinkId) {
        if self.hub_gone(id) {
            log::warn!("the tracker's relay closed our link without a hello; not using it");
            self.close_quietly(id);
            self.tracker_relays = false;
            return;
        }
        if let Some(link) = self.links.remove(&id) {
            self.out(Output::Close { link: id, how: Closing::Now });
            let addr = link.shown_addr();
            if self.learned_unconfirmed(Some(addr)).is_some() {
                log::debug!("{addr}, which a member told us about, did not answer as a p2pchat member");
                return self.learned_settled(addr);
            }
            if self.links.values().any(|l| l.kind == LinkKind::P2pchat && l.listen_addr == Some(addr)) {
                // A p2pchat member we are linked to closed a second link (a version that does
                // not say `duplicate`): not an original peer.
                log::debug!("{addr} closed a second link to it");
                return;
            }
            log::debug!("{addr} dropped our p2pchat hello: an original peer");
            self.originals.insert(addr);
            if self.in_default_room() {
                self.carried.insert(addr, link.held);
                self.dial(now, Contact { addr, known: Some(Protocol::Original) }, self.limits.retry_refused_for);
            }
        }
    }

    pub(super) fn on_refused(&mut self, now: Now, id: LinkId, code: &str, message: String) {
        if code == ERR_DUPLICATE && self.links.get(&id).is_some_and(|l| l.kind == LinkKind::P2pchat) {
            return self.hand_over(now, id);
        }
        let Some(link) = self.links.remove(&id) else { return };
        self.out(Output::Close { link: id, how: Closing::Now });
        let addr = link.shown_addr();
        if self.hub_gone(id) {
            log::warn!("the tracker's relay refused us: {message}");
            self.tracker_relays = false;
            return;
        }
        if code == ERR_ROOM {
            log::debug!("{addr} is in another room: {message}");
            return;
        }
        if code == ERR_DUPLICATE {
            // Linked through another connection, or about to be (its hello is on the way).
            log::debug!("{addr} keeps another link to us: {message}");
            return;
        }
        self.notice(format!("{addr} refused the p2pchat link: {message}"));
        if code == ERR_VERSION && link.outgoing && self.in_default_room() {
            self.notice(format!("using the original protocol with {addr}"));
            self.originals.insert(addr);
            self.carried.insert(addr, link.held);
            self.dial(now, Contact { addr, known: Some(Protocol::Original) }, self.limits.retry_refused_for);
        }
    }

    pub(super) fn on_renamed(&mut self, id: LinkId, name: String) {
        // A nick on a link given up as a duplicate was written before its sender saw that: it is
        // the peer's new name all the same, for the link that replaced it.
        let retired_for = self.retiring.get(&id).cloned().flatten();
        let id = match retired_for.and_then(|peer| self.p2pchat_link_to(&peer)) {
            Some(replacement) => replacement,
            None => id,
        };
        let Some(link) = self.links.get_mut(&id) else { return };
        if link.unconfirmed {
            // Its first line: an original peer after all, shown from now on.
            link.unconfirmed = false;
            link.name = Some(name.clone());
            let (addr, outgoing) = (link.shown_addr(), link.outgoing);
            self.originals.insert(addr);
            return self.original_joined(addr, Some(name), outgoing);
        }
        if link.name.as_deref() == Some(name.as_str()) {
            return;
        }
        let old = link.name.replace(name.clone());
        let addr = link.shown_addr();
        self.meet(id, Some(&name));
        self.emit(Event::Renamed { addr, old, new: name });
        // Members we relay it to know it by the name in our `relay_open`: tell them the new one.
        let mut partners: Vec<LinkId> = self.relays.partners_of(id).collect();
        partners.sort_unstable();
        if let Some(open) = self.relay_open_for(id) {
            for partner in partners {
                self.out(Output::Write { link: partner, bytes: open.clone() });
            }
        }
    }

    /// Stop writing to a link but read it until the other end closes it, so nothing in flight is lost.
    /// The other end may hold it as its link to us still (the kept link's hello is on its way): the
    /// `duplicate` error tells it that we are moving, not leaving (see [`Self::hand_over`]).
    pub(super) fn retire(&mut self, id: LinkId) {
        if let Some(link) = self.links.remove(&id) {
            self.end_relays(id, None, link.shown_addr(), "replaced by another link", false);
            self.retiring.insert(id, link.peer_id.clone());
            self.write_frame(
                id,
                &Frame::Error { code: ERR_DUPLICATE.to_owned(), message: "replaced by another link".to_owned() },
            );
            self.out(Output::Close { link: id, how: Closing::Retire });
        }
    }

    /// The member on p2pchat link `id` keeps another link to us and closed this one: it comes back on
    /// that link, whose hello is on its way. Nobody is told it left (or, when it is back, that it
    /// joined) unless it does not come back within [`Self::handover_wait`].
    pub(super) fn hand_over(&mut self, now: Now, id: LinkId) {
        let Some(link) = self.links.remove(&id) else { return };
        self.out(Output::Close { link: id, how: Closing::Now });
        let Some(peer_id) = link.peer_id.clone() else { return };
        let addr = link.shown_addr();
        log::debug!("{addr} moves to another link to us");
        self.end_relays(id, Some(&peer_id), addr, "replaced by another link", false);
        self.forget_link_history(now, id, None, false);
        let moving = Moving { name: link.name.clone(), addr, listen_addr: link.listen_addr, since: now.at };
        self.moving.insert(peer_id, moving);
    }

    /// How long a member that moved to another link may take to say hello on it.
    pub(super) fn handover_wait(&self) -> Duration {
        self.limits.connect_timeout + self.limits.probe_timeout
    }

    /// Members that moved to another link and never said hello on it are gone after all.
    pub(super) fn expire_moves(&mut self, now: Now) {
        let wait = self.handover_wait();
        let expired: Vec<String> = self
            .moving
            .iter()
            .filter(|(_, m)| now.at.duration_since(m.since) >= wait)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in expired {
            let Some(moving) = self.moving.remove(&peer) else { continue };
            let reason = "its new link never came".to_owned();
            self.emit(Event::Left { addr: moving.addr, name: moving.name, reason, clean: false });
            if let Some(addr) = moving.listen_addr {
                self.dial(now, Contact { addr, known: Some(Protocol::P2pchat) }, self.limits.redial_for);
            }
        }
    }

    /// `newer` takes over from `older` as the link to the same peer, without presence noise.
    pub(super) fn replace(&mut self, now: Now, older: LinkId, newer: LinkId, hello: Hello) {
        let (old_name, held) = match self.links.get_mut(&older) {
            Some(old) => (old.name.clone(), std::mem::take(&mut old.held)),
            None => (None, Vec::new()),
        };
        self.retire(older);
        // The newer hello has the name the peer goes by now (it may have renamed itself since the
        // older one).
        let name = hello.name.filter(|n| chat::validate_name(n).is_ok()).or(old_name.clone());
        let adopted = self.adopt(now, newer, hello.id, hello.listen_port, old_name.clone(), held);
        if adopted.is_some() {
            // Our summary went out on the older link, which the other end may be reading out as its
            // duplicate: it would not compare it, and a line we said as the links crossed, before
            // either carried it, would stay missing there. Tell it again on the link that stays.
            self.send_summary(now, newer, false);
        }
        if let (Some(_), Some(name)) = (adopted, name.filter(|n| Some(n) != old_name.as_ref())) {
            self.on_renamed(newer, name);
        }
    }

    /// Make `id` the p2pchat link to the peer `peer_id`: answer its hello if it dialled us, then write
    /// what was held for it (and `carried` from a link it replaces). Returns where it is shown.
    pub(super) fn adopt(
        &mut self,
        now: Now,
        id: LinkId,
        peer_id: String,
        listen_port: Option<u16>,
        name: Option<String>,
        carried: Vec<Arc<OutLine>>,
    ) -> Option<SocketAddr> {
        let our_hello = self
            .links
            .get(&id)
            .filter(|l| !l.outgoing)
            .map(|l| frames::encode_opening(&Frame::Hello(self.hello(l.binding.as_deref()))));
        let link = self.links.get_mut(&id)?;
        if let Some(port) = listen_port {
            link.listen_addr = Some(SocketAddr::new(link.remote.ip(), port));
        }
        link.kind = LinkKind::P2pchat;
        link.name = name;
        link.peer_id = Some(peer_id);
        let addr = link.shown_addr();
        // Our hello on a link we dialled went out when it opened: a name taken since is news to it.
        let renamed_since_hello = link.probed && link.hello_renames != self.renames;
        let mut held = std::mem::take(&mut link.held);
        held.extend(carried);
        self.out(Output::Framed { link: id });
        if let Some(bytes) = our_hello {
            self.out(Output::Write { link: id, bytes: bytes.into() });
        }
        if renamed_since_hello && self.hub != Hub::Opening(id) {
            self.write_frame(id, &Frame::Nick { name: self.name.clone() });
        }
        self.flush_held(now, id, held);
        Some(addr)
    }

    pub(super) fn dial(&mut self, now: Now, contact: Contact, retry_for: Duration) {
        self.dial_from(now, contact, None, retry_for);
    }

    pub(super) fn dial_from(&mut self, now: Now, contact: Contact, from_port: Option<u16>, retry_for: Duration) {
        if !self.dialling.insert(contact.addr) {
            return;
        }
        if contact.known == Some(Protocol::P2pchat) && !self.dials_hub(contact.addr) {
            self.slow_dials.entry(contact.addr).or_insert(now.at + self.limits.relay_first);
        }
        self.out(Output::Dial { contact, from_port, retry_for });
    }

    /// Link `id`'s member proved its key under `name`: check it against the key that name had when we
    /// first met it here (trust on first use), and warn when it differs. Returns its fingerprint.
    pub(super) fn meet(&mut self, id: LinkId, name: Option<&str>) -> Option<String> {
        let link = self.links.get(&id)?;
        let (key, addr) = (*link.key.as_deref()?, link.shown_addr());
        let fingerprint = identity::fingerprint(&key);
        let room = self.room.clone();
        let seen = name.and_then(|name| Some((name, self.known_keys.lock().ok()?.meet(&room, name, &key))));
        let changed = match seen {
            Some((name, Seen::Changed { was })) => {
                self.notice(format!(
                    "WARNING: {name} ({addr}) proves key {fingerprint}, but {name} had key {was} when you first met it here: it may be someone else"
                ));
                true
            }
            _ => false,
        };
        if let Some(link) = self.links.get_mut(&id) {
            link.key_changed |= changed;
        }
        Some(fingerprint)
    }

    /// Whether we hold a link to the member listening at `addr`.
    pub(super) fn linked_to(&self, addr: SocketAddr) -> bool {
        self.links.values().any(|l| l.listen_addr == Some(addr))
    }

    /// Link `id` is gone (`reason`; `clean`: the other end said goodbye): close it and tell
    /// whoever needs to know.
    pub(super) fn remove(&mut self, now: Now, id: LinkId, reason: String, clean: bool) {
        if self.hub_gone(id) {
            log::info!("the link to the tracker's relay closed ({reason})");
        }
        if let Some(link) = self.links.remove(&id) {
            self.out(Output::Close { link: id, how: Closing::Now });
            log::info!("link to {} closed ({reason})", link.shown_addr());
            let announced = link.is_member();
            if let Some(addr) = link.listen_addr.filter(|_| link.outgoing) {
                self.learned_settled(addr);
            }
            let (addr, name) = (link.shown_addr(), link.name.clone());
            let lost = link.kind == LinkKind::P2pchat && !clean;
            let peer_id = link.peer_id.clone();
            drop(link);
            self.end_relays(id, peer_id.as_deref(), addr, &reason, clean);
            self.forget_link_history(now, id, peer_id, lost);
            if announced {
                self.emit(Event::Left { addr, name, reason, clean });
            }
        }
    }

    /// Close a link that never joined, without telling anyone.
    pub(super) fn close_quietly(&mut self, id: LinkId) {
        if let Some(link) = self.links.remove(&id) {
            self.out(Output::Close { link: id, how: Closing::Now });
            if let Some(addr) = link.listen_addr.filter(|_| link.outgoing) {
                self.learned_settled(addr);
            }
        }
    }

    /// Tell the other end why (an `error` frame), then close once that is written.
    pub(super) fn refuse(&mut self, id: LinkId, code: &str, message: String) {
        let Some(link) = self.links.remove(&id) else { return };
        let frame = Frame::Error { code: code.to_owned(), message };
        let bytes = if link.outgoing { frames::encode(&frame) } else { frames::encode_opening(&frame) };
        self.out(Output::Write { link: id, bytes: bytes.into() });
        self.out(Output::Close { link: id, how: Closing::Refused });
    }
}
