//! The tracker's side of the peer: hole punching through the tracker, and keep-alives for the
//! links and the registration.

use super::*;

impl PeerState {
    /// A member we could not reach, probably behind a router that drops connections nobody inside
    /// asked for: through our p2pchat tracker, have it dial us while we dial it, both from our
    /// listening ports. Once per member; an address that is not a registered p2pchat member of our
    /// room is ignored by the tracker.
    pub(super) fn punch(&mut self, addr: SocketAddr) {
        if !self.registered || self.originals.contains(&addr) || !self.punched.insert(addr) {
            return;
        }
        self.out(Output::ToTracker(frames::encode(&Frame::PunchRequest { addr: addr.to_string() }).into()));
        log::info!("cannot reach {addr} directly; asking the tracker to have it dial us too");
        // Beside the dial still trying: whichever connects first makes the link.
        let contact = Contact { addr, known: Some(Protocol::P2pchat) };
        self.out(Output::Dial { contact, from_port: Some(self.listen_port), retry_for: self.limits.retry_refused_for });
    }

    /// Keep-alive for the tracker registration, which also hears which original peers we are linked
    /// to, and for the p2pchat links that ask for it: the tracker's relay, and members of an earlier
    /// p2pchat, whose readers drop a link that stays silent. Members that say `quiet` are not pinged:
    /// pinging each one every period made an idle room cost every member in proportion to its size,
    /// and the kernel's keep-alive probes (`net::detect_dead_peer`) notice a vanished member as soon,
    /// without waking the process.
    pub(super) fn ping(&mut self) {
        if self.registered {
            let originals: Vec<String> = self
                .links
                .values()
                .filter(|l| l.kind == LinkKind::Original && l.outgoing)
                .filter_map(|l| l.listen_addr.map(|a| a.to_string()))
                .collect();
            // A vouch keeps the original peers we hold links to listed (the tracker probes those
            // nobody vouched for); a ping keeps a registration whose tracker asked for pings.
            let frame = match (originals.is_empty(), self.tracker_quiet) {
                (false, _) => Some(Frame::Vouch { originals }),
                (true, false) => Some(Frame::Ping),
                (true, true) => None,
            };
            if let Some(frame) = frame {
                self.out(Output::ToTracker(frames::encode(&frame).into()));
            }
        }
        let ping: Line = frames::encode(&Frame::Ping).into();
        let framed: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| matches!(l.kind, LinkKind::P2pchat | LinkKind::Relay) && l.wants_pings)
            .map(|(id, _)| *id)
            .collect();
        for link in framed {
            self.out(Output::KeepAlive { link, bytes: ping.clone() });
        }
    }
}
