//! The peer's protocol decisions, as a state machine with no I/O: inputs in, outputs out, time passed in.
//!
//! [`PeerState`] owns the room as this peer sees it: its links and what each speaks, the duplicate
//! rule, presence, peer exchange, relays, history requests and answer budgets, the lines held for
//! links still opening, and the join's progress. It never touches a socket, a task, a timer or the
//! system clock: the driver (`peer::actor`) turns sockets, dial results, link reports and its
//! keep-alive ticks into calls here, with the time ([`Now`]), and carries out what comes back from
//! [`PeerState::poll_output`] ([`Output`]). Randomness (our session id, message ids) comes from a
//! seeded generator ([`ids::Ids`]). The room simulator (`tests/sim`) drives the same machine with
//! in-memory links and a virtual clock.
//!
//! A few answers are immediate, because the driver holds the resource they are about: what to do
//! with a connection that just opened ([`Connect`]), and how many members a line was queued for.
//!
//! This file holds the state, its inputs and outputs, connections and commands; the rest of its
//! decisions are in `links` (classification, the duplicate rule, presence), `exchange` (history
//! asked and answered), `relaying` and `punching` (hole punching and keep-alives). What a link's
//! reader does is in [`reader`], the acceptance rules in [`rules`], received history in [`receipts`].

mod exchange;
pub mod ids;
mod learned;
mod links;
mod punching;
pub mod reader;
pub mod receipts;
mod relaying;
pub mod rules;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::recent::Summary;
use super::relay::{self, Relays};
use super::seen::SeenIds;
use super::sync::{self, AnswerBudget, Ask, HistoryConfig, Part, Requests};
use super::trust::{KnownKeys, Seen};
use super::types::{Contact, Line, LinkId, Now, Role};
use super::{Event, Limits, PeerInfo, Protocol, Status, TrackerState};
use crate::history::clock::Clock;
use crate::history::store::{Key, Query, Record};
use crate::identity::{self, Identity};
use crate::private::RoomKey;
use crate::protocol::DEFAULT_ROOM;
use crate::wire::chat;
use crate::wire::frames::{
    self, Chat, Frame, Hello, Member, Offers, Position, ERR_DUPLICATE, ERR_IDENTITY, ERR_MALFORMED, ERR_ROOM,
    ERR_VERSION,
};

use crate::protocol::PROTOCOL_VERSION;
use ids::Ids;
use receipts::{Job, Receipts, Taken};

/// What the driver must do, in order.
#[derive(Debug)]
pub enum Output {
    /// Queue these bytes on the link (refused: tell [`PeerState::write_refused`]).
    Write { link: LinkId, bytes: Line },
    /// Queue a keep-alive on the link unless it carried another line since the last one.
    KeepAlive { link: LinkId, bytes: Line },
    /// The link speaks p2pchat frames from now on: its writer may join queued lines in one write.
    Framed { link: LinkId },
    /// Whether the link's reader hands each new message over for relaying ([`PeerState::forward`]).
    Forwards { link: LinkId, on: bool },
    /// Close the link as said.
    Close { link: LinkId, how: Closing },
    /// Dial this contact (from our listening port with `from_port`), retrying refusals for `retry_for`.
    Dial { contact: Contact, from_port: Option<u16>, retry_for: Duration },
    /// Show this to the application.
    Emit(Event),
    /// Record this message of ours in the log.
    Log(Record),
    /// A history request went out on `link` as `req`: start the task that carries out its answer's
    /// [`Job`]s.
    AskHistory { link: LinkId, req: u32 },
    /// Work for the task of our request `req` on `link`, in order.
    History { link: LinkId, req: u32, job: Job },
    /// That request's answer is complete: its task ends once its jobs are done.
    HistoryDone { link: LinkId, req: u32 },
    /// Answer request `req` on `link` from the log with `query`, then tell
    /// [`PeerState::history_answered`] how many bytes went.
    AnswerHistory { link: LinkId, req: u32, query: Query },
    /// Write this frame on our tracker registration.
    ToTracker(Line),
    /// The tracker registration was lost: register again with `tracker` from `listen_port`, in the
    /// background.
    RegisterAgain { tracker: SocketAddr, listen_port: u16 },
    /// Write the known keys met since the last write.
    SaveKnownKeys,
    /// Every contact of the join was tried once, or `relay_first` passed; this many were reached.
    Ready { reached: usize },
}

/// How a link closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// At once, reading and writing nothing more (it never joined, or it is gone).
    Now,
    /// Write what is queued (an `error` frame telling why), then close; bounded by the close grace.
    Refused,
    /// A duplicate: write nothing more, but read on until the other end closes it, so nothing in
    /// flight is lost. Its end comes back as [`PeerState::closed`].
    Retire,
    /// We are leaving: write what is queued (a `bye`), then close; the driver waits for these.
    Leaving,
}

/// What to do with a connection that just opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    /// Run it as link `link`, starting as `role`.
    Open { link: LinkId, role: Role },
    /// A private room: run the Noise handshake first ([`PeerState::secured`] after it).
    Handshake,
    /// Refuse it (reset): too many links.
    Reset,
}

/// What a link is to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// Its protocol is not known yet: lines for it are held.
    Opening,
    P2pchat,
    Original,
    /// Our link to the tracker's relay: it gets our messages and passes on others', but it is not a
    /// member (not listed, not announced, never asked for history).
    Relay,
}

/// What a link's reader found and tells the state (see `connection`).
#[derive(Debug)]
pub enum Report {
    /// The link speaks p2pchat; this is the other end's hello.
    Hello(Hello),
    /// The link speaks the original protocol.
    Original,
    /// We probed and the other end closed or said nothing: an original peer.
    ProbeRejected,
    /// The other end refused the link with an `error` frame.
    Refused { code: String, message: String },
    /// The other end is known by this name now.
    Renamed { name: String },
    /// The other end asks for history.
    HistoryRequested { req: u32, limit: u32, after: Option<Position> },
    /// Part of an answer to our history request (only messages fit for our room).
    HistoryPart { req: u32, msgs: Vec<Chat>, more: bool },
    /// The member on this link cannot reach member `peer` and asks us to relay between them.
    RelayAsked { peer: String, addr: Option<SocketAddr> },
    /// The member on this link relays member `peer` to us.
    RelayOpened { peer: String, name: Option<String>, addr: SocketAddr },
    /// The member on this link no longer relays member `peer` to us.
    RelayClosed { peer: String, reason: String, clean: bool },
    /// A new message arrived on this link, which we relay: pass it on to its partners.
    Forward { line: Line },
    /// The recent messages the member on this link holds (sent when the link came up); `reply`:
    /// it asks for ours in return.
    Summary { summary: Summary, reply: bool },
}

/// One line in both encodings; each link takes the one it speaks.
#[derive(Debug)]
struct OutLine {
    original: Line,
    p2pchat: Line,
}

/// A member that moved to another link (see [`PeerState::hand_over`]).
struct Moving {
    name: Option<String>,
    addr: SocketAddr,
    listen_addr: Option<SocketAddr>,
    since: Instant,
}

/// Our use of the tracker's relay (see `tracker::hub`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hub {
    Unused,
    Dialling,
    Opening(LinkId),
    Linked(LinkId),
}

struct Link {
    /// The remote address of the connection.
    remote: SocketAddr,
    /// Where it accepts connections: the address we dialled, or its hello's port. Unknown for an
    /// original peer that dialled us.
    listen_addr: Option<SocketAddr>,
    outgoing: bool,
    kind: LinkKind,
    name: Option<String>,
    peer_id: Option<String>,
    /// We opened with a p2pchat hello (its 0xFF makes an original peer drop the link).
    probed: bool,
    /// Which of our names that hello carried (see `PeerState::renames`).
    hello_renames: u32,
    /// An original peer a member named to us that has not said a line yet: not shown, not listed
    /// (see `learned`).
    unconfirmed: bool,
    /// Lines held until the protocol is known.
    held: Vec<Arc<OutLine>>,
    /// What it may still make us send as history.
    budget: AnswerBudget,
    /// A private link's handshake hash, which both ends' identity proofs are bound to.
    binding: Option<Vec<u8>>,
    /// The identity key the other end proved (private links), and whether its name had another key
    /// before (see `trust`). Boxed: it is 200 bytes, and most links (outside private rooms) have none.
    key: Option<Box<ed25519_dalek::VerifyingKey>>,
    key_changed: bool,
    /// Its hello asked for pings (no `quiet`): an earlier p2pchat, or the tracker's relay, which
    /// drop a link that stays silent.
    wants_pings: bool,
}

impl Link {
    fn shown_addr(&self) -> SocketAddr {
        self.listen_addr.unwrap_or(self.remote)
    }

    /// A member of the room we hold a direct link to, shown and listed in our hellos.
    fn is_member(&self) -> bool {
        matches!(self.kind, LinkKind::P2pchat | LinkKind::Original) && !self.unconfirmed
    }
}

/// What the state needs to start.
pub struct Setup {
    pub name: String,
    /// The room as the wire names it (a private room's opaque id).
    pub room: String,
    pub limits: Limits,
    pub history: HistoryConfig,
    pub listen_port: u16,
    /// The tracker, to register again after losing it.
    pub tracker: Option<SocketAddr>,
    /// Registered with a p2pchat tracker, and what its welcome offered.
    pub registered: Option<Offers>,
    /// Ask the first p2pchat member for history after this position (`Some(None)`: the newest
    /// messages); `None`: ask nothing.
    pub history_after: Option<Option<Key>>,
    /// Whether a tracker (of either kind) gave us the room; see [`PeerState::consider`].
    pub joined_via_tracker: bool,
    pub contacts: Vec<Contact>,
    /// A private room's key: every link is then encrypted, and `room` is its opaque id.
    pub private: Option<Arc<RoomKey>>,
    /// Our identity, proven on private links, and the keys we met names with before.
    pub identity: Arc<Identity>,
    pub known_keys: Arc<Mutex<KnownKeys>>,
    /// Message ids shown already, shared with the link readers.
    pub seen: Arc<Mutex<SeenIds>>,
    pub clock: Arc<Clock>,
    /// Seeds our session id and message ids.
    pub seed: [u8; 32],
}

pub struct PeerState {
    my_id: String,
    name: String,
    /// How many times we renamed ourselves: a link whose hello carried an older name is told the
    /// new one once it turns out to speak p2pchat.
    renames: u32,
    room: String,
    limits: Limits,
    history: HistoryConfig,
    listen_port: u16,
    /// Ordered by id, so every walk over the links (sending a line, pinging) goes in the same order
    /// on every run: the simulator replays a seed exactly. Boxed: a map keeps room for more entries
    /// than it holds, and an empty slot then costs a pointer rather than a whole link.
    links: BTreeMap<LinkId, Box<Link>>,
    next_link: LinkId,
    /// Listen addresses known to speak only the original protocol: never probed again.
    originals: HashSet<SocketAddr>,
    /// Private rooms' handshakes in flight: connections not yet links, counted against the limit.
    handshakes: usize,
    /// Addresses being dialled (so peer exchange does not dial them twice).
    dialling: HashSet<SocketAddr>,
    /// p2pchat members being dialled, and when each is to be reached through a relay instead if the
    /// dial has not connected by then (the dials go on; see `relaying::relay_slow_dials`).
    slow_dials: BTreeMap<SocketAddr, Instant>,
    /// Summaries from members that came while the join's history was still to come: compared once it
    /// is in (it brings most of what they would show missing); by the member's session id.
    deferred_summaries: Vec<(String, Summary)>,
    /// Addresses members told us about, dialled at a bounded pace.
    learned: learned::Learned,
    /// Members we asked the tracker to punch through to (once each).
    punched: HashSet<SocketAddr>,
    /// Lines held for an original peer being redialled after it dropped our probe (and every line sent
    /// until the redial connects or gives up).
    carried: HashMap<SocketAddr, Vec<Arc<OutLine>>>,
    /// Links given up for a duplicate to the same peer, and that peer's session id: read until they
    /// end, and what they still bring (a new name) is the peer's.
    retiring: HashMap<LinkId, Option<String>>,
    /// Members whose link the other end closed as a duplicate: by session id, until they say hello
    /// on the link they kept.
    moving: HashMap<String, Moving>,
    joined_via_tracker: bool,
    tracker: Option<SocketAddr>,
    /// Registered with the tracker now (pings and vouches go to it).
    registered: bool,
    /// The tracker speaks p2pchat (it holds registrations); an original tracker forgets us at once.
    tracker_registers: bool,
    /// The tracker relays between members that cannot reach each other, and our link to it.
    tracker_relays: bool,
    /// The tracker needs no pings on our registration (its welcome said `quiet`).
    tracker_quiet: bool,
    hub: Hub,
    /// Our history requests (on join, after a gap) and the answers we wait for.
    requests: Requests,
    /// The answers to them as they come in.
    receipts: Receipts,
    /// Members reached through a relay, and the links we relay between.
    relays: Relays,
    private: Option<Arc<RoomKey>>,
    identity: Arc<Identity>,
    known_keys: Arc<Mutex<KnownKeys>>,
    seen: Arc<Mutex<SeenIds>>,
    clock: Arc<Clock>,
    ids: Ids,
    /// The join's first attempts not finished yet, how many of them reached their member, and
    /// whether the driver was told.
    untried: HashSet<SocketAddr>,
    reached_first_time: usize,
    ready_told: bool,
    /// The driver is told the join is done by then at the latest (`relay_first` after it began):
    /// members not reached yet are reached in the background, and the user need not wait for a
    /// dial to time out before typing.
    ready_by: Instant,
    /// The join stops waiting for its history at this time (it is still fetched later, as a catch-up).
    history_deadline: Instant,
    outputs: VecDeque<Output>,
}

impl PeerState {
    /// A peer about to join: its first outputs dial the contacts.
    pub fn new(setup: Setup, now: Now) -> Self {
        let Setup {
            name,
            room,
            limits,
            history,
            listen_port,
            tracker,
            registered,
            history_after,
            joined_via_tracker,
            contacts,
            private,
            identity,
            known_keys,
            seen,
            clock,
            seed,
        } = setup;
        let mut ids = Ids::from_seed(seed);
        let history_deadline = now.at + limits.connect_timeout + limits.probe_timeout;
        let ready_by = now.at + limits.relay_first;
        let mut state = Self {
            my_id: ids.next_id(),
            name,
            renames: 0,
            room,
            relays: Relays::new(limits.relay_first, limits.relay_after),
            requests: Requests::new(history_after, history.ask_on_join, history.answer_messages),
            receipts: Receipts::new(history.first_part_wait, history.answer_wait),
            limits,
            history,
            listen_port,
            links: BTreeMap::new(),
            next_link: 0,
            originals: HashSet::new(),
            dialling: HashSet::new(),
            slow_dials: BTreeMap::new(),
            handshakes: 0,
            learned: learned::Learned::new(now.at),
            deferred_summaries: Vec::new(),
            punched: HashSet::new(),
            carried: HashMap::new(),
            retiring: HashMap::new(),
            moving: HashMap::new(),
            joined_via_tracker,
            tracker,
            registered: registered.is_some(),
            tracker_registers: registered.is_some(),
            tracker_relays: registered.is_some_and(|offers| offers.relay),
            tracker_quiet: registered.is_some_and(|offers| offers.quiet),
            hub: Hub::Unused,
            private,
            identity,
            known_keys,
            seen,
            clock,
            ids,
            untried: contacts.iter().map(|c| c.addr).collect(),
            reached_first_time: 0,
            ready_told: false,
            history_deadline,
            ready_by,
            outputs: VecDeque::new(),
        };
        for contact in contacts {
            state.dial(now, contact, state.limits.retry_refused_for);
        }
        state.settle(now);
        state
    }

    /// The next thing to do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When the state next needs [`Self::handle_timeout`] (besides the keep-alive [`Self::tick`]).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let join = match self.ready_told {
            false => Some(self.ready_by),
            true => self.requests.waits_for_join().then_some(self.history_deadline),
        };
        let relays = self.slow_dials.values().copied().chain(self.relays.next_ask_at());
        join.into_iter().chain(self.receipts.next_deadline()).chain(self.learned.next_dial()).chain(relays).min()
    }

    /// Time passed: the join may stop waiting for its history; an answer's first part may be late, or
    /// the whole answer; a member may be due a relay.
    pub fn handle_timeout(&mut self, now: Now) {
        self.settle(now);
        self.dial_learned(now);
        self.relay_slow_dials(now);
        self.ask_relays(now);
        let expired = self.receipts.expire(now.at);
        for (link, req) in expired.released {
            self.out(Output::History { link, req, job: Job::Tell(Event::HistorySynced { received: 0 }) });
        }
        for (link, req) in expired.late {
            self.requests.give_up(link, req);
        }
        self.finish_receipts();
        self.compare_deferred_summaries(now);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn room(&self) -> &str {
        &self.room
    }

    fn in_default_room(&self) -> bool {
        self.room == DEFAULT_ROOM
    }

    fn out(&mut self, output: Output) {
        self.outputs.push_back(output);
    }

    fn emit(&mut self, event: Event) {
        self.out(Output::Emit(event));
    }

    fn notice(&mut self, text: String) {
        // Logged under its own name: an application that shows notices (the client) can keep the
        // log from saying them a second time; one that reads only messages still sees them there.
        log::warn!(target: "p2pchat::notice", "{text}");
        self.emit(Event::Notice { text });
    }

    fn write_frame(&mut self, link: LinkId, frame: &Frame) {
        self.out(Output::Write { link, bytes: frames::encode(frame).into() });
    }

    /// After each input: tell the driver once every first attempt is done, and stop holding the
    /// join's live messages back when nobody can give us history: every link is settled and none
    /// speaks p2pchat (we are alone, or among original peers), or it took too long. A p2pchat member
    /// that turns up later is still asked, as a catch-up.
    fn settle(&mut self, now: Now) {
        if !self.ready_told && (self.untried.is_empty() || now.at >= self.ready_by) {
            self.ready_told = true;
            self.out(Output::Ready { reached: self.reached_first_time });
        }
        if !self.untried.is_empty() || !self.requests.waits_for_join() {
            return;
        }
        let settled = self.links.values().all(|l| matches!(l.kind, LinkKind::Original | LinkKind::Relay));
        if settled || now.at >= self.history_deadline {
            self.emit(Event::HistorySynced { received: 0 });
            self.requests.stop_waiting_for_join();
        }
    }

    // ----- connections ------------------------------------------------------------------------

    /// A dial to `contact` connected.
    pub fn dialled(&mut self, now: Now, contact: Contact) -> Connect {
        self.dialling.remove(&contact.addr);
        self.slow_dials.remove(&contact.addr);
        if self.private.is_none() && self.untried.remove(&contact.addr) {
            self.reached_first_time += 1;
        }
        let connect = if self.private.is_some() && !self.dials_hub(contact.addr) {
            self.handshakes += 1;
            Connect::Handshake
        } else {
            let original = contact.known == Some(Protocol::Original) || self.originals.contains(&contact.addr);
            let role = if original { Role::DialOriginal } else { Role::Probe };
            let link = self.open(now, contact.addr, Some(contact.addr), true, role, None);
            if self.dials_hub(contact.addr) {
                self.hub = Hub::Opening(link);
            }
            if let Some(carried) = self.carried.remove(&contact.addr) {
                if let Some(l) = self.links.get_mut(&link) {
                    l.held.extend(carried);
                }
            }
            Connect::Open { link, role }
        };
        self.settle(now);
        connect
    }

    /// Someone connected to us from `addr`.
    pub fn accepted(&mut self, now: Now, addr: SocketAddr) -> Connect {
        // Handshakes in flight count: a crowd that opens connections and never finishes one would
        // otherwise hold resources past the limit before anyone is authenticated.
        let connect = if self.links.len() + self.handshakes >= self.limits.max_links {
            log::warn!("refusing {addr}: already {} links and handshakes (the limit)", self.limits.max_links);
            Connect::Reset
        } else if self.private.is_some() {
            self.handshakes += 1;
            Connect::Handshake
        } else {
            let link = self.open(now, addr, None, false, Role::Accepted, None);
            Connect::Open { link, role: Role::Accepted }
        };
        self.settle(now);
        connect
    }

    /// A private room's handshake succeeded on a connection with `remote`, which we dialled
    /// (`dialled`) or accepted; `binding` is its handshake hash.
    pub fn secured(&mut self, now: Now, remote: SocketAddr, dialled: Option<Contact>, binding: Vec<u8>) -> Connect {
        self.handshakes = self.handshakes.saturating_sub(1);
        if let Some(contact) = &dialled {
            if self.untried.remove(&contact.addr) {
                self.reached_first_time += 1;
            }
        }
        let (listen_addr, role) = match &dialled {
            Some(contact) => (Some(contact.addr), Role::Probe),
            None => (None, Role::Accepted),
        };
        let link = self.open(now, remote, listen_addr, dialled.is_some(), role, Some(binding));
        self.settle(now);
        Connect::Open { link, role }
    }

    /// A private room's handshake failed; `wrong_key`: the other end reached the room without its key.
    pub fn handshake_failed(&mut self, now: Now, remote: SocketAddr, reason: &str, dialled: bool, wrong_key: bool) {
        self.handshakes = self.handshakes.saturating_sub(1);
        if dialled {
            self.untried.remove(&remote);
        }
        // Ours to tell: a member we tried to reach, or someone at our door without the key.
        if dialled || wrong_key {
            self.notice(format!("no private link with {remote}: {reason}"));
        } else {
            log::info!("no private link with {remote}: {reason}");
        }
        self.settle(now);
    }

    /// A dial to `addr` failed; `gave_up`: it is not retried; `silent`: no answer at all (not even a
    /// refusal), as from behind a router that drops it.
    pub fn dial_failed(
        &mut self,
        now: Now,
        addr: SocketAddr,
        known: Option<Protocol>,
        reason: &str,
        gave_up: bool,
        silent: bool,
    ) {
        self.untried.remove(&addr);
        if gave_up {
            self.learned_settled(addr);
        }
        if self.on_dial_failed(addr, known, reason, gave_up, silent) {
            self.relays.unreached(addr, now.at);
            self.link_to_hub(now);
        }
        self.dial_learned(now);
        self.ask_relays(now);
        self.settle(now);
    }

    /// True when we gave up on a p2pchat member: it is to be reached through a relay.
    fn on_dial_failed(
        &mut self,
        addr: SocketAddr,
        known: Option<Protocol>,
        reason: &str,
        gave_up: bool,
        silent: bool,
    ) -> bool {
        if self.dials_hub(addr) {
            if gave_up {
                log::warn!("cannot reach the tracker's relay at {addr} ({reason})");
                self.dialling.remove(&addr);
                self.hub = Hub::Unused;
            }
            return false;
        }
        if silent && known == Some(Protocol::P2pchat) {
            // No answer at all from a p2pchat member: perhaps a router that drops what nobody
            // inside asked for. (Original peers get nothing but the original protocol.)
            self.punch(addr);
        }
        if !gave_up {
            log::debug!("{addr} refused ({reason}); retrying");
        } else if self.linked_to(addr) {
            log::debug!("{addr} did not answer a dial, but a link to it is up ({reason})");
        } else {
            self.dialling.remove(&addr);
            self.slow_dials.remove(&addr);
            self.carried.remove(&addr);
            log::warn!("cannot reach {addr} ({reason}); skipping it");
            return known == Some(Protocol::P2pchat);
        }
        false
    }

    fn open(
        &mut self,
        now: Now,
        remote: SocketAddr,
        listen_addr: Option<SocketAddr>,
        outgoing: bool,
        role: Role,
        binding: Option<Vec<u8>>,
    ) -> LinkId {
        let id = self.next_link;
        self.next_link += 1;
        let probed = role == Role::Probe;
        if probed {
            let hello =
                if outgoing && self.dials_hub(remote) { self.hub_hello() } else { self.hello(binding.as_deref()) };
            self.out(Output::Write { link: id, bytes: frames::encode_opening(&Frame::Hello(hello)).into() });
        }
        log::debug!("link {id} to {remote} opened ({role:?})");
        let link = Box::new(Link {
            remote,
            listen_addr,
            outgoing,
            kind: LinkKind::Opening,
            name: None,
            peer_id: None,
            probed,
            hello_renames: self.renames,
            unconfirmed: false,
            held: Vec::new(),
            budget: AnswerBudget::new(&self.history, now.at),
            binding,
            key: None,
            key_changed: false,
            wants_pings: true,
        });
        self.links.insert(id, link);
        id
    }

    /// The link's queue refused a line (`why`; `None`: its connection is gone).
    pub fn write_refused(&mut self, now: Now, link: LinkId, why: Option<String>) {
        self.remove(now, link, why.unwrap_or_else(|| "connection closed".to_owned()), false);
        self.settle(now);
    }

    /// What link `link`'s reader found.
    pub fn report(&mut self, now: Now, link: LinkId, report: Report) {
        match report {
            Report::Hello(hello) => self.on_hello(now, link, hello),
            Report::Original => self.on_original(now, link),
            Report::ProbeRejected => self.on_probe_rejected(now, link),
            Report::Refused { code, message } => self.on_refused(now, link, &code, message),
            Report::Renamed { name } => self.on_renamed(link, name),
            Report::HistoryRequested { req, limit, after } => self.answer_history(now, link, req, limit, after),
            Report::HistoryPart { req, msgs, more } => self.take_history_part(link, req, msgs, more),
            Report::RelayAsked { peer, addr } => self.relay_between(link, &peer, addr),
            Report::RelayOpened { peer, name, addr } => self.relayed_to_us(now, link, peer, name, addr),
            Report::RelayClosed { peer, .. } if self.stop_relaying(link, &peer) => {}
            Report::RelayClosed { peer, reason, clean } => {
                // An answer to an ask by address: that neighbour is not linked to it; ask the next.
                if let Ok(addr) = peer.parse::<SocketAddr>() {
                    self.relays.not_via(link, addr);
                    self.ask_relays(now);
                }
                if let Some(member) = self.relays.closed(link, &peer, clean) {
                    let reason: String = reason.chars().take(200).collect();
                    self.emit(Event::Left { addr: member.addr, name: member.name, reason, clean });
                }
            }
            Report::Forward { line } => self.forward(link, line),
            Report::Summary { summary, reply } => {
                if reply {
                    self.send_summary(now, link, false);
                }
                self.on_summary(now, link, summary);
            }
        }
        self.compare_deferred_summaries(now);
        self.dial_learned(now);
        self.settle(now);
    }

    /// The link ended (its reader saw it end): `clean` when the other end said goodbye first.
    pub fn closed(&mut self, now: Now, id: LinkId, reason: String, clean: bool) {
        if self.retiring.remove(&id).is_some() {
            // Its replacement is up; a request it was still answering goes to another member.
            self.forget_link_history(now, id, None, false);
            return self.settle(now);
        }
        let Some(link) = self.links.get(&id) else { return };
        // An original peer we probed drops that link when it reads the probe: dial it again.
        let redial_original = link.outgoing && link.probed && link.kind == LinkKind::Original;
        // A p2pchat peer lost without a goodbye may still be in the room: try to get it back.
        let redial_p2pchat = link.kind == LinkKind::P2pchat && !clean;
        let (addr, listen_addr) = (link.shown_addr(), link.listen_addr);
        self.remove(now, id, reason, clean);
        if redial_original {
            self.dial(now, Contact { addr, known: Some(Protocol::Original) }, self.limits.retry_refused_for);
        } else if let (true, Some(addr)) = (redial_p2pchat, listen_addr) {
            self.dial(now, Contact { addr, known: Some(Protocol::P2pchat) }, self.limits.redial_for);
        }
        self.settle(now);
    }

    // ----- the tracker ------------------------------------------------------------------------

    /// The tracker registration ended.
    pub fn tracker_lost(&mut self, reason: &str) {
        self.registered = false;
        let Some(tracker) = self.tracker else { return };
        self.notice(format!("lost the connection to the tracker ({reason}); the room goes on, registering again"));
        self.out(Output::RegisterAgain { tracker, listen_port: self.listen_port });
    }

    /// Registered with the tracker again after losing it; it lists `contacts`.
    pub fn registered_again(&mut self, now: Now, offers: Offers, contacts: Vec<Contact>) {
        self.notice("registered with the tracker again".to_owned());
        self.registered = true;
        self.tracker_relays = offers.relay;
        self.tracker_quiet = offers.quiet;
        // Only p2pchat members: a second link to one is noticed by its id, but an original peer
        // we already know may be on a link we accepted, whose listen address we cannot know.
        for contact in contacts.into_iter().filter(|c| c.known == Some(Protocol::P2pchat)) {
            if !self.linked_to(contact.addr) {
                self.dial(now, contact, self.limits.retry_refused_for);
            }
        }
    }

    /// The tracker asks us to dial this member from our listening port (it cannot reach us).
    pub fn punch_asked(&mut self, now: Now, addr: SocketAddr) {
        if !self.dialling.contains(&addr) && !self.linked_to(addr) {
            log::info!("the tracker says {addr} cannot reach us; dialling it from our listening port");
            let contact = Contact { addr, known: Some(Protocol::P2pchat) };
            self.dial_from(now, contact, Some(self.listen_port), self.limits.retry_refused_for);
        }
    }

    // ----- commands ---------------------------------------------------------------------------

    /// Send a line to every member; returns how many it was queued (or held) for.
    pub fn send(&mut self, now: Now, text: &str) -> usize {
        let stamp = self.clock.tick_at(now.wall_ms);
        let mut message = Chat {
            id: self.ids.next_id(),
            from: self.name.clone(),
            room: self.room.clone(),
            ts: now.wall_ms,
            hlc: stamp,
            text: text.to_owned(),
            key: None,
            sig: None,
        };
        if self.private.is_some() {
            // Signed by its author, so no member passing it on (relays, history) can alter or forge it.
            self.identity.sign_chat(&mut message);
        }
        if let Ok(mut seen) = self.seen.lock() {
            seen.shown(stamp, &message.id);
        }
        // Logged only once it is queued on every link (below): a history answer being made for a
        // member meanwhile (on another worker) then either misses it or is queued after it, so the
        // member never gets it as history first (seen in CI: a fresh line shown as caught up).
        let record = sync::chat_to_record(&message);
        // In a private room the message travels sealed end to end: relays see only ciphertext.
        let frame = match &self.private {
            Some(key) => key.seal(&message),
            None => Frame::Msg(message),
        };
        let line = Arc::new(OutLine {
            original: chat::encode_line(&self.name, text).into(),
            p2pchat: frames::encode(&frame).into(),
        });
        // An original peer being redialled (it dropped our hello) has no link yet: keep the line with
        // the ones carried for it, so what is typed meanwhile is not lost.
        for carried in self.carried.values_mut() {
            if carried.len() < self.limits.send_queue {
                carried.push(line.clone());
            }
        }
        let ids: Vec<LinkId> = self.links.keys().copied().collect();
        let mut reached = 0;
        for id in ids {
            let member = self.links.get(&id).is_some_and(|l| l.kind != LinkKind::Relay);
            if self.write(now, id, &line) && member {
                reached += 1;
            }
        }
        self.out(Output::Log(record));
        // Relays pass it on to the members we reach through them (those still linked took it).
        reached + self.relays.relayed().filter(|(_, m)| self.links.contains_key(&m.via)).count()
    }

    /// The user trusts the key with `fingerprint` that a member called `name` proves on a link now
    /// (a genuine change of keys): `name` is tied to it from now on, and the member is no longer
    /// flagged. Err says why not (no such member, or not with that key).
    pub fn trust(&mut self, name: &str, fingerprint: &str) -> Result<(), String> {
        let wanted = fingerprint.trim().to_ascii_lowercase();
        let found = self.links.iter().find_map(|(id, l)| {
            let key = l.key.as_deref()?;
            (l.name.as_deref() == Some(name) && identity::fingerprint(key) == wanted).then_some((*id, *key))
        });
        let Some((id, key)) = found else {
            return Err(format!("no member called {name} proves key {wanted} on a link now (see /who)"));
        };
        self.known_keys.lock().map_err(|_| "the known keys are unavailable".to_owned())?.pin(&self.room, name, &key);
        if let Some(link) = self.links.get_mut(&id) {
            link.key_changed = false;
        }
        self.out(Output::SaveKnownKeys);
        Ok(())
    }

    /// The user no longer ties `name` to the key it had here: the next key it proves is taken.
    pub fn untrust(&mut self, name: &str) -> bool {
        let forgot = self.known_keys.lock().is_ok_and(|mut keys| keys.forget(&self.room, name));
        if forgot {
            self.out(Output::SaveKnownKeys);
        }
        forgot
    }

    /// Change our name: announced to p2pchat peers; original peers see it in the next line's prefix.
    pub fn nick(&mut self, name: String) {
        self.name = name.clone();
        self.renames += 1;
        let frame: Line = frames::encode(&Frame::Nick { name }).into();
        // The tracker's relay passes a new name on; in a private room it must never learn one.
        let private = self.private.is_some();
        let told: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.kind == LinkKind::P2pchat || (l.kind == LinkKind::Relay && !private))
            .map(|(id, _)| *id)
            .collect();
        for link in told {
            self.out(Output::Write { link, bytes: frame.clone() });
        }
    }

    pub fn status(&self) -> Status {
        let tracker = match (self.tracker, self.registered) {
            (None, _) => TrackerState::None,
            (Some(_), true) => TrackerState::Registered,
            (Some(_), false) if self.tracker_registers => TrackerState::Reconnecting,
            (Some(_), false) => TrackerState::Original,
        };
        let linked = self.links.values().filter(|l| l.is_member()).count();
        Status { members: linked + self.relays.relayed().count(), tracker }
    }

    /// The members we hold a link to, directly or through a relay.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = self
            .links
            .values()
            .filter(|l| l.kind != LinkKind::Relay && !l.unconfirmed)
            .map(|l| PeerInfo {
                addr: l.shown_addr(),
                name: l.name.clone(),
                outgoing: l.outgoing,
                protocol: match l.kind {
                    LinkKind::Opening | LinkKind::Relay => None,
                    LinkKind::P2pchat => Some(Protocol::P2pchat),
                    LinkKind::Original => Some(Protocol::Original),
                },
                relayed_by: None,
                encrypted: l.binding.is_some(),
                fingerprint: l.key.as_deref().map(identity::fingerprint),
                key_changed: l.key_changed,
            })
            .collect();
        peers.extend(self.relays.relayed().map(|(_, m)| PeerInfo {
            addr: m.addr,
            name: m.name.clone(),
            outgoing: false,
            protocol: Some(Protocol::P2pchat),
            relayed_by: self.links.get(&m.via).map(|l| l.shown_addr()),
            encrypted: false,
            fingerprint: None,
            key_changed: false,
        }));
        peers.sort_by_key(|p| p.addr);
        peers
    }

    /// The first of the state's tables found past its bound, for a room that never held more than
    /// `room_size` peers: the simulator checks this as it runs.
    #[cfg(test)]
    pub fn bounds_broken(&self, room_size: usize) -> Option<String> {
        let held = self.links.values().map(|l| l.held.len()).chain(self.carried.values().map(Vec::len)).max();
        let (asked, lost) = self.requests.sizes();
        let (answers, ingesting) = self.receipts.sizes();
        let (heard, unreached, relayed) = self.relays.sizes();
        // Per member: a link we dialled, one it dialled, and one retiring as a duplicate, at most.
        let per_member = 3 * room_size;
        let tables = [
            ("links", self.links.len(), self.limits.max_links.min(per_member)),
            ("handshakes", self.handshakes, self.limits.max_links.min(per_member)),
            ("lines held for one link", held.unwrap_or(0), self.limits.send_queue),
            ("links carrying lines", self.carried.len(), room_size),
            ("dials", self.dialling.len(), room_size),
            ("punches", self.punched.len(), room_size),
            ("retiring links", self.retiring.len(), per_member),
            ("summaries waiting", self.deferred_summaries.len(), per_member),
            ("members moving", self.moving.len(), room_size),
            ("history requests", asked, per_member),
            ("members to catch up from", lost, room_size),
            ("history answers", answers, per_member),
            ("parts being logged", ingesting, receipts::MAX_INGESTING),
            ("members heard of", heard, room_size),
            ("learned addresses", self.learned.len(), self.limits.max_links),
            ("addresses asked for", unreached, room_size),
            ("members relayed", relayed, room_size),
        ];
        let (what, size, bound) = tables.into_iter().find(|(_, size, bound)| size > bound)?;
        Some(format!("{}: {what} {size}, bound {bound}", self.name))
    }

    /// Whether some line is still waiting for a link to show what it speaks.
    pub fn holds_lines(&self) -> bool {
        self.links.values().any(|l| !l.held.is_empty()) || self.carried.values().any(|c| !c.is_empty())
    }

    /// We are leaving: say goodbye to p2pchat members and close every link once what is queued on it
    /// is written.
    pub fn leave(&mut self) {
        let bye: Line = frames::encode(&Frame::Bye).into();
        let ids: Vec<LinkId> = self.links.keys().copied().collect();
        for id in ids {
            let Some(link) = self.links.remove(&id) else { continue };
            // A link still opening that carried our hello is a member's already, if it speaks
            // p2pchat: without a goodbye it would take us for lost and dial us again. (An original
            // peer has dropped the link at the hello's first byte.)
            let member_knows_us = matches!(link.kind, LinkKind::P2pchat | LinkKind::Relay)
                || (link.kind == LinkKind::Opening && link.probed);
            if member_knows_us {
                self.out(Output::Write { link: id, bytes: bye.clone() });
            }
            self.out(Output::Close { link: id, how: Closing::Leaving });
        }
    }

    /// The keep-alive period passed: ping p2pchat links and the tracker registration, ask for relays
    /// that are due, give up on members that moved and never came back, and save new known keys.
    pub fn tick(&mut self, now: Now) {
        self.ping();
        self.ask_relays(now);
        self.expire_moves(now);
        self.out(Output::SaveKnownKeys);
        self.settle(now);
    }

    // ----- writing ----------------------------------------------------------------------------

    /// Queue one line for one link, in its protocol's encoding; false when the link is gone or
    /// dropped for holding too many lines.
    fn write(&mut self, now: Now, id: LinkId, line: &Arc<OutLine>) -> bool {
        let Some(link) = self.links.get_mut(&id) else { return false };
        let bytes = match link.kind {
            LinkKind::P2pchat | LinkKind::Relay => line.p2pchat.clone(),
            LinkKind::Original => line.original.clone(),
            LinkKind::Opening => {
                if link.held.len() < self.limits.send_queue {
                    link.held.push(line.clone());
                    return true;
                }
                let reason = format!("not answering: {} lines held", self.limits.send_queue);
                self.remove(now, id, reason, false);
                return false;
            }
        };
        self.out(Output::Write { link: id, bytes });
        true
    }

    fn flush_held(&mut self, now: Now, id: LinkId, held: Vec<Arc<OutLine>>) {
        for line in held {
            self.write(now, id, &line);
        }
    }
}
