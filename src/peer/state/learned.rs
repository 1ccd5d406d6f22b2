//! Addresses a member told us about (a hello's `peers`): peer exchange, without making us a port
//! scanner or a reflector for whoever wrote the list.
//!
//! * A hello that lists more members than a room of `max_links` could hold is refused.
//! * A loopback, link-local or private address is dialled only if the member that named it is
//!   reached in that same range: a public member naming `10.0.0.5` names someone else's network.
//! * Learned addresses wait in a bounded queue and are dialled [`AT_ONCE`] at a time, one every
//!   [`DIAL_EVERY`] at most.
//! * What answers must be what was announced: a p2pchat member with the session id the list gave
//!   it. Anything else (an original peer, a silent port, a service) is closed and forgotten: never
//!   taken for an original peer, listed in our hellos or shown.
//! * An address listed as an original peer is linked (and sent our lines, as the original would),
//!   but shown and listed in our hellos only once a `<NAME> :: ` line came from it (its reader then
//!   reports the name it learnt; the join is shown with that first line); a silent port tells the
//!   sender nothing.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;
use crate::wire::frames::Member;

/// Learned addresses being dialled (or probed) at once.
pub const AT_ONCE: usize = 8;
/// The least time between two learned addresses' first dials.
pub const DIAL_EVERY: Duration = Duration::from_millis(100);

/// What was announced for a learned address.
#[derive(Debug, Clone)]
struct Announced {
    /// The session id its p2pchat hello must carry (`None`: an original peer, or a list from a
    /// version that sends no ids).
    id: Option<String>,
    p2pchat: bool,
    /// Dialled (or linked and not settled yet), as opposed to waiting in the queue.
    dialling: bool,
}

/// The learned addresses not settled yet.
pub struct Learned {
    queue: VecDeque<SocketAddr>,
    announced: HashMap<SocketAddr, Announced>,
    next_dial_at: Instant,
}

impl Learned {
    pub fn new(now: Instant) -> Self {
        Self { queue: VecDeque::new(), announced: HashMap::new(), next_dial_at: now }
    }

    /// Addresses waiting or being dialled (for the simulator's bounds check).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.announced.len()
    }

    fn dialling(&self) -> usize {
        self.announced.values().filter(|a| a.dialling).count()
    }

    /// When the next queued address may be dialled, if one waits and a slot is free.
    pub fn next_dial(&self) -> Option<Instant> {
        (!self.queue.is_empty() && self.dialling() < AT_ONCE).then_some(self.next_dial_at)
    }
}

/// Where an address lives: a member may name an address of a scope it is reached in, or a public one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Loopback,
    LinkLocal,
    Private,
    Public,
}

fn scope(ip: IpAddr) -> Scope {
    match ip.to_canonical() {
        ip if ip.is_loopback() || ip.is_unspecified() => Scope::Loopback,
        IpAddr::V4(v4) if v4.is_link_local() => Scope::LinkLocal,
        IpAddr::V4(v4) if v4.is_private() || v4.octets()[0] == 100 && (v4.octets()[1] & 0xC0) == 64 => Scope::Private,
        IpAddr::V6(v6) if (v6.segments()[0] & 0xFFC0) == 0xFE80 => Scope::LinkLocal,
        IpAddr::V6(v6) if (v6.segments()[0] & 0xFE00) == 0xFC00 => Scope::Private,
        _ => Scope::Public,
    }
}

/// Whether a member reached at `teller` may point us at `addr`.
fn may_name(teller: IpAddr, addr: IpAddr) -> bool {
    let named = scope(addr);
    named == Scope::Public || named == scope(teller)
}

impl PeerState {
    /// The members a hello on link `id` lists: queue the new ones (see the module's rules).
    pub(super) fn learn(&mut self, now: Now, id: LinkId, members: Vec<Member>) {
        let Some(teller) = self.links.get(&id).map(|l| l.remote.ip()) else { return };
        for member in members {
            let Ok(addr) = member.addr.parse::<SocketAddr>() else { continue };
            if !may_name(teller, addr.ip()) {
                log::debug!("not dialling {addr}: {teller} named an address of another network");
                continue;
            }
            if !self.worth_dialling(addr, member.p2pchat) || self.learned.announced.contains_key(&addr) {
                continue;
            }
            if self.learned.announced.len() >= self.limits.max_links {
                log::debug!("not dialling {addr}: {} learned addresses wait already", self.limits.max_links);
                break;
            }
            let announced = Announced { id: member.id, p2pchat: member.p2pchat, dialling: false };
            self.learned.announced.insert(addr, announced);
            self.learned.queue.push_back(addr);
        }
        self.dial_learned(now);
    }

    /// Whether a member at `addr` is neither us nor one we reach or dial already.
    ///
    /// Original members are only dialled by a peer that joined through members alone (`--peer`): one
    /// that joined through a tracker dialled every original peer the tracker knew, and every later one
    /// dialled it, on a link whose listen address we cannot know (so we could not tell it is the same).
    fn worth_dialling(&self, addr: SocketAddr, p2pchat: bool) -> bool {
        let ours = addr.port() == self.listen_port
            && (addr.ip().is_loopback()
                || addr.ip().is_unspecified()
                || self.links.values().any(|l| l.remote.ip() == addr.ip()));
        let known = self.dialling.contains(&addr)
            || self.links.values().any(|l| l.listen_addr == Some(addr) || l.remote == addr)
            || (!p2pchat && (self.joined_via_tracker || !self.in_default_room()));
        !ours && !known
    }

    /// Dial queued addresses while a slot is free and the pace allows.
    pub(super) fn dial_learned(&mut self, now: Now) {
        while self.learned.next_dial().is_some_and(|at| now.at >= at) {
            let Some(addr) = self.learned.queue.pop_front() else { break };
            let Some(announced) = self.learned.announced.get(&addr).cloned() else { continue };
            if !self.worth_dialling(addr, announced.p2pchat) {
                self.learned.announced.remove(&addr);
                continue;
            }
            if let Some(a) = self.learned.announced.get_mut(&addr) {
                a.dialling = true;
            }
            self.learned.next_dial_at = now.at + DIAL_EVERY;
            log::debug!("dialling {addr}, which a member told us about");
            let known = if announced.p2pchat { None } else { Some(Protocol::Original) };
            self.dial(now, Contact { addr, known }, self.limits.retry_refused_for);
        }
    }

    /// The learned address `addr` is settled (linked as announced, or given up): its slot is free.
    pub(super) fn learned_settled(&mut self, addr: SocketAddr) {
        self.learned.announced.remove(&addr);
    }

    /// Whether `addr` was learned and is still to be confirmed; `Some(announced id)` if so.
    pub(super) fn learned_unconfirmed(&self, addr: Option<SocketAddr>) -> Option<(Option<&str>, bool)> {
        let announced = self.learned.announced.get(&addr?)?;
        Some((announced.id.as_deref(), announced.p2pchat))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_names_public_addresses_and_addresses_of_the_network_it_is_reached_in() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(may_name(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(may_name(ip("10.1.2.3"), ip("192.168.1.9")), "private to private");
        assert!(may_name(ip("203.0.113.7"), ip("198.51.100.2")), "public");
        assert!(may_name(ip("10.1.2.3"), ip("198.51.100.2")), "public, from anywhere");
        assert!(!may_name(ip("203.0.113.7"), ip("10.0.0.5")), "someone else's network");
        assert!(!may_name(ip("203.0.113.7"), ip("127.0.0.1")));
        assert!(!may_name(ip("10.1.2.3"), ip("127.0.0.1")));
        assert!(!may_name(ip("203.0.113.7"), ip("169.254.1.1")));
        assert!(!may_name(ip("203.0.113.7"), ip("100.64.0.1")), "carrier-grade NAT");
        assert!(!may_name(ip("2001:db8::1"), ip("fe80::1")));
        assert!(!may_name(ip("2001:db8::1"), ip("fd00::1")));
        assert!(may_name(ip("::ffff:10.0.0.1"), ip("10.0.0.2")), "a mapped address is its IPv4 one");
    }
}
