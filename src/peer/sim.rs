//! A deterministic room simulator: many peers in one thread, on a virtual clock, over in-memory links.
//!
//! Each p2pchat peer is the real [`PeerState`] with a real [`LinkReader`] per link, driven as the
//! tokio driver drives them, with none of its I/O: a dial or a write becomes an event in a priority
//! queue of `(time, sequence)`, delivered after the link's delay, cut into chunks wherever the seed
//! says (a TCP stream has no framing, so chunk boundaries must never matter). Original peers are
//! modelled byte for byte: they write `<NAME> :: text`, keep every byte they get, and drop a link on
//! a 0xFF byte (their UTF-8 decoder fails on it).
//!
//! The tracker is a p2pchat tracker: it tells a newcomer who registered and what each speaks, passes
//! hole-punch requests on, and can be lost (it restarts empty, and members register again with the
//! driver's backoff). Pairs of members can be put behind NATs that drop every dial between them, so
//! they reach each other only through a member that relays. A room can be private: the Noise
//! handshake is not run (its outcome, a shared handshake hash, is handed to both ends), but
//! everything after it is the real state's, sealed messages and identity proofs included.
//!
//! Besides what every run checks at its end (see `check_invariants`), each line a p2pchat peer says
//! must be stamped after every message it had shown: the room's clock orders replies after what they
//! answer.
//!
//! Everything random comes from the run's seed, so a failing run prints its seed and
//! `SIM_SEED=<seed> cargo test --lib sim` replays it exactly; `SIM_SEEDS=<n>` runs more seeds, from
//! `SIM_SEEDS_FROM` (default 1).
//! `SIM_LOG=1` (with `-- --nocapture`) prints the peers' log, each line with its virtual time and peer.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::seen::SeenIds;
use super::state::ids::Ids;
use super::state::reader::{End, LinkReader, Outputs};
use super::state::receipts::Job;
use super::state::rules::LinkRules;
use super::state::{self, Closing, Connect, Output, PeerState};
use super::sync::HistoryConfig;
use super::trust::KnownKeys;
use super::types::{Contact, LinkId, Now};
use super::{Event, Limits, Protocol};
use crate::history::clock::Clock;
use crate::history::store::Record;
use crate::identity::Identity;
use crate::private::RoomKey;
use crate::wire::chat;
use crate::wire::frames::{self, Frame, Offers};

// Which peer the simulator is running, and when (virtual time): the prefix of its log lines.
thread_local! {
    static RUNNING: std::cell::Cell<(Duration, NodeId)> = const { std::cell::Cell::new((Duration::ZERO, 0)) };
}

/// Prints the peers' log lines, under `SIM_LOG`.
struct SimLog;

impl log::Log for SimLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let (at, node) = RUNNING.with(|running| running.get());
        eprintln!("{:>9.3} p{node} {}: {}", at.as_secs_f64(), record.level(), record.args());
    }

    fn flush(&self) {}
}

fn log_if_asked() {
    static LOGGER: SimLog = SimLog;
    if std::env::var_os("SIM_LOG").is_some() && log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
}

/// A small deterministic generator for the schedule (splitmix64).
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn seed32(&mut self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        for chunk in seed.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        seed
    }
}

type NodeId = usize;
type PipeId = usize;

/// One direction of a connection's other end, as a node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct End2 {
    pipe: PipeId,
    /// 0: the dialler's end, 1: the acceptor's.
    side: usize,
}

/// A simulated TCP connection between two nodes.
struct Pipe {
    nodes: [NodeId; 2],
    /// The link id at each end (p2pchat nodes), or the original's connection number.
    links: [Option<LinkId>; 2],
    /// One-way delay.
    delay: Duration,
    /// When the last chunk in each direction arrives (so chunks stay in order).
    last_arrival: [Duration; 2],
    /// Each end closed its writing side.
    write_closed: [bool; 2],
    /// Each end stopped reading (it is gone).
    gone: [bool; 2],
}

/// A p2pchat tracker: who registered (in order), and whether it is up.
struct Tracker {
    addr: SocketAddr,
    up: bool,
    registered: Vec<NodeId>,
}

/// A line said: by whom, under which name, and its text.
struct Said {
    author: NodeId,
    name: String,
    text: String,
}

enum Ev {
    /// A dial from `from` reaches `to` (or fails); refusals and silence are retried with backoff
    /// until `retry_until`, as `bootstrap::dial` does.
    Dial { from: NodeId, to: NodeId, contact: Contact, retry_until: Duration, backoff: Duration },
    /// The partition ending at `until`, if it still holds, has lasted long enough for TCP keep-alive
    /// to give up on the connections across it.
    KeepAliveExpires { until: Duration },
    /// That dial failed (`silent`: no answer at all, across a partition).
    DialFailed { from: NodeId, contact: Contact, retry_until: Duration, backoff: Duration, silent: bool },
    /// Bytes arrive at one end of a pipe.
    Bytes { at: End2, bytes: Vec<u8> },
    /// The other end closed its writing side: end of stream at this end.
    Eof { at: End2 },
    /// A reader's or the state's timer may be due.
    Timer { node: NodeId },
    /// The keep-alive period of a node.
    Tick { node: NodeId },
    /// A scripted action.
    Act(Action),
    /// A member tries to register with the tracker again (it lost it), retrying with `backoff`.
    Register { node: NodeId, backoff: Duration },
    /// The tracker is back (restarted: it knows nobody).
    TrackerUp,
    /// The tracker asks `node` to dial the member at `addr` (a hole punch).
    Punch { node: NodeId, addr: SocketAddr },
    /// A private room's handshake on `pipe` finished: both ends hold a secured connection.
    Secured { pipe: PipeId, contact: Contact },
}

#[derive(Debug, Clone)]
enum Action {
    Join(NodeId),
    Say {
        node: NodeId,
        text: String,
    },
    Crash(NodeId),
    Leave(NodeId),
    /// A p2pchat member takes a new name.
    Rename {
        node: NodeId,
        name: String,
    },
    /// The tracker goes away for `lasting`, and comes back knowing nobody.
    TrackerDown {
        lasting: Duration,
    },
    /// The connections between two members break (a reset: what was in flight is lost).
    Cut {
        a: NodeId,
        b: NodeId,
    },
    /// Nothing passes between `side` and the rest for `lasting`: bytes wait (TCP retransmits them once
    /// the network is back), dials across get no answer.
    Split {
        side: Vec<NodeId>,
        lasting: Duration,
    },
}

/// What the simulated tracker's welcome says: no relay, and no pings needed (it never drops a
/// registration for its silence).
const QUIET_TRACKER: Offers = Offers { relay: false, quiet: true };

/// A network partition in force.
struct Partition {
    side: Vec<NodeId>,
    until: Duration,
}

/// A message shown by a p2pchat node.
#[derive(Debug, Clone)]
struct Shown {
    sender: Option<String>,
    text: String,
    history: bool,
    /// When it was shown (virtual time).
    at: Duration,
}

struct P2pNode {
    state: PeerState,
    rules: LinkRules,
    readers: BTreeMap<LinkId, LinkReader>,
    /// Link → pipe end, and per link: writes since the last keep-alive, whether it relays.
    ends: BTreeMap<LinkId, End2>,
    wrote_since_ping: HashSet<LinkId>,
    forwarding: HashSet<LinkId>,
    shown: Vec<Shown>,
    /// Per link, the entry the next continued piece of an original peer's line belongs to.
    last_piece: HashMap<LinkId, usize>,
    /// Who was shown joining and leaving.
    joined: Vec<SocketAddr>,
    left: Vec<SocketAddr>,
    /// When the node's armed wake-up goes off.
    timer_at: Option<Duration>,
    /// The greatest stamp among the messages it showed: what it says next must sort after it.
    latest_stamp: u64,
    log: Vec<Record>,
}

impl P2pNode {
    /// Show a message; an original peer's line that came in pieces is shown as one.
    fn show(&mut self, at: Duration, link: Option<LinkId>, message: super::Message) {
        self.latest_stamp = self.latest_stamp.max(message.stamp.unwrap_or(0));
        if let (false, Some(link)) = (message.starts_message, link) {
            if let Some(entry) = self.last_piece.get(&link).and_then(|i| self.shown.get_mut(*i)) {
                entry.text.push_str(&message.text);
                return;
            }
        }
        if let Some(link) = link {
            self.last_piece.insert(link, self.shown.len());
        }
        self.shown.push(Shown { sender: message.sender, text: message.text, history: message.history, at });
    }
}

struct OriginalNode {
    /// Connections, and the bytes each brought.
    conns: BTreeMap<usize, (End2, Vec<u8>)>,
    /// What the connections that ended brought.
    ended: Vec<Vec<u8>>,
    next_conn: usize,
}

enum Kind {
    P2p(Box<P2pNode>),
    Original(OriginalNode),
}

struct Node {
    name: String,
    addr: SocketAddr,
    kind: Option<Kind>,
    /// Up (joined and not crashed or left).
    up: bool,
    /// How far its wall clock is off (up to 1.5 s either way): the room's clock must order lines
    /// all the same.
    skew_ms: i64,
    is_original: bool,
}

struct Sim {
    base: Instant,
    now: Duration,
    seq: u64,
    /// (when, sequence): the sequence keeps events of one instant in the order they were made.
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    events: HashMap<u64, Ev>,
    dice: Dice,
    nodes: Vec<Node>,
    pipes: Vec<Pipe>,
    limits: Limits,
    said: Vec<Said>,
    partition: Option<Partition>,
    tracker: Tracker,
    /// Pairs (smaller first) whose dials to each other get no answer, either way.
    /// Pairs behind NATs that drop every dial between them, until then (virtual time).
    blocked: HashMap<(NodeId, NodeId), Duration>,
    /// The key of the room, if it is private.
    private: Option<Arc<RoomKey>>,
    /// Every name a node had, for what original peers may see.
    names_ever: HashSet<String>,
    /// Invariants found broken while the run went on.
    broken: Vec<String>,
}

/// The wall clock at the simulation's start.
const WALL_START_MS: u64 = 1_750_000_000_000;

impl Sim {
    fn new(seed: u64, p2p: usize, originals: usize) -> Self {
        let mut dice = Dice(seed);
        let mut nodes = Vec::new();
        let mut names_ever = HashSet::new();
        for i in 0..p2p + originals {
            let is_original = i >= p2p;
            let name = if is_original { format!("o{i}") } else { format!("p{i}") };
            names_ever.insert(name.clone());
            let addr = SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16));
            let skew_ms = dice.below(3_001) as i64 - 1_500;
            nodes.push(Node { name, addr, kind: None, up: false, is_original, skew_ms });
        }
        Self {
            base: Instant::now(),
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            dice,
            nodes,
            pipes: Vec::new(),
            limits: Limits::default(),
            said: Vec::new(),
            partition: None,
            tracker: Tracker { addr: SocketAddr::from(([127, 0, 0, 2], 7472)), up: true, registered: Vec::new() },
            blocked: HashMap::new(),
            private: None,
            names_ever,
            broken: Vec::new(),
        }
    }

    /// Make the room private, under a key from the seed.
    fn make_private(&mut self) {
        let code = format!("p2pc1-{}-{}", hex::encode(self.dice.seed32()), hex::encode(b"simulated"));
        self.private = Some(Arc::new(RoomKey::from_secret("", &code).expect("a well-formed invite code")));
    }

    /// Put `a` and `b` behind NATs that drop every dial between them.
    fn block(&mut self, a: NodeId, b: NodeId) {
        self.block_until(a, b, Duration::MAX);
    }

    /// Dials between `a` and `b` get no answer until `until` (a hole punch that takes a while).
    fn block_until(&mut self, a: NodeId, b: NodeId, until: Duration) {
        self.blocked.insert((a.min(b), a.max(b)), until);
    }

    fn blocked(&self, a: NodeId, b: NodeId) -> bool {
        self.blocked.get(&(a.min(b), a.max(b))).is_some_and(|until| self.now < *until)
    }

    /// The tracker's list for `node`: who registered and is still up, and what each speaks.
    fn tracker_list(&self, node: NodeId) -> Vec<Contact> {
        let listed = self.tracker.registered.iter().filter(|&&n| n != node && self.nodes[n].up);
        let known = |n: &Node| Some(if n.is_original { Protocol::Original } else { Protocol::P2pchat });
        listed.map(|&n| Contact { addr: self.nodes[n].addr, known: known(&self.nodes[n]) }).collect()
    }

    /// The time as `node` sees it: one monotonic clock for all, and its own wall clock, a little off.
    fn clock(&self, node: NodeId) -> Now {
        RUNNING.with(|running| running.set((self.now, node)));
        let wall = (WALL_START_MS + self.now.as_millis() as u64).saturating_add_signed(self.nodes[node].skew_ms);
        Now { at: self.base + self.now, wall_ms: wall }
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        let seq = self.seq;
        self.seq += 1;
        self.events.insert(seq, ev);
        self.queue.push(Reverse((self.now + after, seq)));
    }

    fn schedule_at(&mut self, at: Duration, ev: Ev) {
        let after = at.saturating_sub(self.now);
        self.schedule(after, ev);
    }

    /// Run until `until` (virtual time).
    fn run_until(&mut self, until: Duration) {
        while let Some(Reverse((at, key))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at;
            if let Some(ev) = self.events.remove(&key) {
                self.handle(ev);
            }
        }
        self.now = until;
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Act(action) => self.act(action),
            Ev::Dial { from, to, contact, retry_until, backoff } => {
                self.dial_arrives(from, to, contact, retry_until, backoff)
            }
            Ev::DialFailed { from, contact, retry_until, backoff, silent } => {
                self.dial_failed(from, contact, retry_until, backoff, silent)
            }
            Ev::Bytes { at, bytes } => self.arrive(at, Some(bytes)),
            Ev::Eof { at } => self.arrive(at, None),
            Ev::Timer { node } => self.timer(node),
            Ev::Register { node, backoff } => self.register_again(node, backoff),
            Ev::TrackerUp => self.tracker.up = true,
            Ev::KeepAliveExpires { until } => self.keep_alive_expires(until),
            Ev::Punch { node, addr } => {
                if self.nodes[node].up {
                    let now = self.clock(node);
                    self.p2p(node).state.punch_asked(now, addr);
                    self.drain(node);
                }
            }
            Ev::Secured { pipe, contact } => self.secured(pipe, contact),
            Ev::Tick { node } => {
                if !self.nodes[node].up {
                    return;
                }
                let (now, room_size) = (self.clock(node), self.nodes.len());
                if let Some(Kind::P2p(p)) = &mut self.nodes[node].kind {
                    p.state.tick(now);
                    if let Some(why) = p.state.bounds_broken(room_size) {
                        self.broken.push(why);
                    }
                }
                self.drain(node);
                let every = self.limits.keepalive_interval;
                self.schedule(every, Ev::Tick { node });
            }
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::Join(node) => self.join(node),
            Action::Say { node, text } => {
                if !self.nodes[node].up {
                    return;
                }
                let now = self.clock(node);
                let name = self.nodes[node].name.clone();
                log::info!("(simulator) {name} says {text:?}");
                self.said.push(Said { author: node, name: name.clone(), text: text.clone() });
                match &mut self.nodes[node].kind {
                    Some(Kind::P2p(p)) => {
                        let seen = p.latest_stamp;
                        p.state.send(now, &text);
                        self.drain(node);
                        // The room's clock: a line sorts after everything its author had seen.
                        let stamp = self.p2p(node).log.last().map_or(0, |record| record.stamp);
                        if stamp <= seen {
                            let name = &self.nodes[node].name;
                            self.broken.push(format!("{name} stamped {text:?} {stamp}, not after {seen} it had seen"));
                        }
                    }
                    Some(Kind::Original(o)) => {
                        let line = chat::encode_line(&name, &text);
                        let ends: Vec<End2> = o.conns.values().map(|(end, _)| *end).collect();
                        for end in ends {
                            self.send_bytes(end, line.clone());
                        }
                    }
                    None => {}
                }
            }
            Action::Crash(node) => self.crash(node, false),
            Action::Leave(node) => self.crash(node, true),
            Action::Split { side, lasting } => {
                let until = self.now + lasting;
                self.partition = Some(Partition { side, until });
                self.schedule(self.limits.dead_after, Ev::KeepAliveExpires { until });
            }
            Action::Rename { node, name } => {
                if !self.nodes[node].up {
                    return;
                }
                self.clock(node);
                log::info!("(simulator) {} is now {name}", self.nodes[node].name);
                self.names_ever.insert(name.clone());
                self.nodes[node].name = name.clone();
                self.p2p(node).state.nick(name);
                self.drain(node);
            }
            Action::TrackerDown { lasting } => {
                self.tracker.up = false;
                self.tracker.registered.clear();
                self.schedule(lasting, Ev::TrackerUp);
                for node in 0..self.nodes.len() {
                    self.clock(node);
                    if let (true, Some(Kind::P2p(p))) = (self.nodes[node].up, &mut self.nodes[node].kind) {
                        p.state.tracker_lost("connection reset");
                        self.drain(node);
                    }
                }
            }
            Action::Cut { a, b } => self.cut(a, b),
        }
    }

    /// A member registers with the tracker again: listed with those who did before it, or retried
    /// with backoff while the tracker is away (as `bootstrap::register_again` does).
    fn register_again(&mut self, node: NodeId, backoff: Duration) {
        if !self.nodes[node].up {
            return;
        }
        if !self.tracker.up {
            let again = (backoff * 2).min(Duration::from_secs(4));
            return self.schedule(again, Ev::Register { node, backoff: again });
        }
        let contacts = self.tracker_list(node);
        self.tracker.registered.push(node);
        let now = self.clock(node);
        self.p2p(node).state.registered_again(now, QUIET_TRACKER, contacts);
        self.drain(node);
    }

    /// The connections between `a` and `b` are reset: each end hears it at once, and what was in
    /// flight is lost.
    fn cut(&mut self, a: NodeId, b: NodeId) {
        let pipes: Vec<PipeId> = (0..self.pipes.len())
            .filter(|&i| {
                let pipe = &self.pipes[i];
                let [x, y] = pipe.nodes;
                (x, y) == (a, b) || (x, y) == (b, a)
            })
            .filter(|&i| !self.pipes[i].gone[0] && !self.pipes[i].gone[1])
            .collect();
        for pipe in pipes {
            self.reset(pipe, "connection reset");
        }
    }

    /// A partition that began `dead_after` ago still holds (ending at `until`): the kernels' TCP
    /// keep-alive probes across it went unanswered, so each connection between two p2pchat members
    /// on either side fails with a time-out at both ends. (Members no longer ping each other; links
    /// to original peers are left to carry on when the network is back.)
    fn keep_alive_expires(&mut self, until: Duration) {
        if self.partition.as_ref().is_none_or(|p| p.until != until) || self.now >= until {
            return;
        }
        let p2pchat = |node: NodeId| matches!(self.nodes[node].kind, Some(Kind::P2p(_)));
        let pipes: Vec<PipeId> = (0..self.pipes.len())
            .filter(|&i| {
                let [a, b] = self.pipes[i].nodes;
                !self.pipes[i].gone[0]
                    && !self.pipes[i].gone[1]
                    && p2pchat(a)
                    && p2pchat(b)
                    && self.held_until(a, b).is_some()
            })
            .collect();
        for pipe in pipes {
            self.reset(pipe, "connection timed out");
        }
    }

    /// Both ends of `pipe` learn at once that it is gone (`why`), and what was in flight is lost.
    fn reset(&mut self, pipe: PipeId, why: &str) {
        for side in 0..2 {
            let node = self.pipes[pipe].nodes[side];
            self.pipes[pipe].gone[side] = true;
            self.pipes[pipe].write_closed[side] = true;
            let Some(link) = self.pipes[pipe].links[side] else { continue };
            let now = self.clock(node);
            match &mut self.nodes[node].kind {
                Some(Kind::P2p(p)) if p.ends.contains_key(&link) => {
                    p.ends.remove(&link);
                    p.readers.remove(&link);
                    p.state.closed(now, link, why.to_owned(), false);
                    self.drain(node);
                }
                Some(Kind::Original(o)) => {
                    if let Some((_, got)) = o.conns.remove(&(link as usize)) {
                        o.ended.push(got);
                    }
                }
                _ => {}
            }
        }
    }

    fn join(&mut self, node: NodeId) {
        if !self.tracker.up {
            // The client retries the tracker until it answers.
            return self.schedule(Duration::from_secs(1), Ev::Act(Action::Join(node)));
        }
        let now = self.clock(node);
        let contacts = self.tracker_list(node);
        self.tracker.registered.push(node);
        self.nodes[node].up = true;
        if self.nodes[node].is_original {
            self.nodes[node].kind =
                Some(Kind::Original(OriginalNode { conns: BTreeMap::new(), ended: Vec::new(), next_conn: 0 }));
            // The original client dials every listed peer, once each.
            for contact in contacts {
                let to = self.node_at(contact.addr);
                let dial = Ev::Dial { from: node, to, contact, retry_until: self.now, backoff: Duration::ZERO };
                self.schedule(Duration::from_millis(1), dial);
            }
            return;
        }
        let seen = Arc::new(Mutex::new(SeenIds::new(super::seen::REMEMBERED_IDS)));
        let clock = Arc::new(Clock::new());
        let known_keys = Arc::new(Mutex::new(KnownKeys::load(None).expect("no file, no error")));
        let room = self.private.as_ref().map(|key| key.room_id()).unwrap_or_default();
        let setup = state::Setup {
            name: self.nodes[node].name.clone(),
            room: room.clone(),
            limits: self.limits.clone(),
            history: HistoryConfig::default(),
            listen_port: self.nodes[node].addr.port(),
            tracker: Some(self.tracker.addr),
            // A p2pchat tracker that does not relay.
            registered: Some(QUIET_TRACKER),
            // Every newcomer asks the first member for the room's history, as the client does.
            history_after: Some(None),
            joined_via_tracker: true,
            contacts,
            private: self.private.clone(),
            identity: Arc::new(Identity::from_secret(self.dice.seed32())),
            known_keys: known_keys.clone(),
            seen: seen.clone(),
            clock: clock.clone(),
            seed: self.dice.seed32(),
        };
        let state = PeerState::new(setup, now);
        let rules = LinkRules {
            limits: self.limits.clone(),
            room,
            seen,
            clock,
            authors: self.private.as_ref().map(|_| known_keys.clone()),
            room_key: self.private.clone(),
            ids: Mutex::new(Ids::from_seed(self.dice.seed32())),
        };
        self.nodes[node].kind = Some(Kind::P2p(Box::new(P2pNode {
            state,
            rules,
            readers: BTreeMap::new(),
            ends: BTreeMap::new(),
            wrote_since_ping: HashSet::new(),
            forwarding: HashSet::new(),
            shown: Vec::new(),
            last_piece: HashMap::new(),
            joined: Vec::new(),
            left: Vec::new(),
            timer_at: None,
            latest_stamp: 0,
            log: Vec::new(),
        })));
        self.drain(node);
        let every = self.limits.keepalive_interval;
        let first = Duration::from_millis(self.dice.below(every.as_millis() as u64));
        self.schedule(first, Ev::Tick { node });
    }

    /// A node stops: `clean` says goodbye first (a p2pchat `leave`), else it crashes (its
    /// connections end with no goodbye, as the kernel closes a dead process's sockets).
    fn crash(&mut self, node: NodeId, clean: bool) {
        if !self.nodes[node].up {
            return;
        }
        if clean {
            if let Some(Kind::P2p(p)) = &mut self.nodes[node].kind {
                p.state.leave();
            }
            self.drain(node);
        }
        self.nodes[node].up = false;
        let ends: Vec<End2> = (0..self.pipes.len())
            .flat_map(|pipe| (0..2).map(move |side| End2 { pipe, side }))
            .filter(|e| self.pipes[e.pipe].nodes[e.side] == node)
            .collect();
        for end in ends {
            self.close_end(end);
        }
    }

    fn node_at(&self, addr: SocketAddr) -> NodeId {
        self.nodes.iter().position(|n| n.addr == addr).expect("a simulated address")
    }

    /// Carry out a p2pchat node's outputs, as the tokio driver does.
    fn drain(&mut self, node: NodeId) {
        loop {
            let output = match &mut self.nodes[node].kind {
                Some(Kind::P2p(p)) => p.state.poll_output(),
                _ => None,
            };
            let Some(output) = output else { break };
            self.carry_out(node, output);
        }
        self.arm_timer(node);
    }

    fn p2p(&mut self, node: NodeId) -> &mut P2pNode {
        RUNNING.with(|running| running.set((self.now, node)));
        match &mut self.nodes[node].kind {
            Some(Kind::P2p(p)) => p,
            _ => unreachable!("a p2pchat node"),
        }
    }

    fn carry_out(&mut self, node: NodeId, output: Output) {
        match output {
            Output::Write { link, bytes } => {
                let p = self.p2p(node);
                if let Some(end) = p.ends.get(&link).copied() {
                    p.wrote_since_ping.insert(link);
                    self.send_bytes(end, bytes.to_vec());
                }
            }
            Output::KeepAlive { link, bytes } => {
                let p = self.p2p(node);
                let busy = p.wrote_since_ping.remove(&link);
                if let (false, Some(end)) = (busy, p.ends.get(&link).copied()) {
                    self.send_bytes(end, bytes.to_vec());
                }
            }
            Output::Framed { .. } | Output::SaveKnownKeys => {}
            Output::RegisterAgain { .. } => {
                let backoff = Duration::from_millis(500);
                self.schedule(backoff, Ev::Register { node, backoff });
            }
            Output::ToTracker(line) => {
                let mut decoder = frames::FrameDecoder::new();
                decoder.feed(&line);
                let listed = self.tracker.up && self.tracker.registered.contains(&node);
                if let (true, Ok(Some(Frame::PunchRequest { addr }))) = (listed, decoder.next_frame()) {
                    let target = addr.parse().ok().and_then(|addr| self.nodes.iter().position(|n| n.addr == addr));
                    if let Some(target) = target.filter(|t| self.tracker.registered.contains(t) && self.nodes[*t].up) {
                        let (addr, delay) = (self.nodes[node].addr, self.link_delay());
                        self.schedule(delay * 2, Ev::Punch { node: target, addr });
                    }
                }
            }
            Output::Ready { .. } | Output::AskHistory { .. } => {}
            Output::Forwards { link, on } => {
                let p = self.p2p(node);
                if on {
                    p.forwarding.insert(link);
                } else {
                    p.forwarding.remove(&link);
                }
            }
            Output::Close { link, how } => {
                let p = self.p2p(node);
                let Some(end) = p.ends.get(&link).copied() else { return };
                if how == Closing::Retire {
                    // No more writes; reads go on until the other end closes.
                    self.shut_write(end);
                } else {
                    // At once, or once what was queued is written: here every write is already on its
                    // way, and the end of stream follows it.
                    p.ends.remove(&link);
                    p.readers.remove(&link);
                    self.close_end(end);
                }
            }
            Output::Dial { contact, retry_for, .. } => {
                let to = self.node_at(contact.addr);
                let delay = self.link_delay();
                let (retry_until, backoff) = (self.now + retry_for, Duration::from_millis(100));
                self.schedule(delay, Ev::Dial { from: node, to, contact, retry_until, backoff });
            }
            Output::Emit(event) => match event {
                Event::Message(m) => {
                    let at = self.now;
                    self.p2p(node).show(at, None, m)
                }
                Event::Joined { addr, .. } => self.p2p(node).joined.push(addr),
                Event::Left { addr, .. } => self.p2p(node).left.push(addr),
                _ => {}
            },
            Output::Log(record) => self.p2p(node).log.push(record),
            // As `sync::receive` does: a part is logged, and the log says which were new to it.
            Output::History { link, req, job: Job::Ingest(msgs) } => {
                let p = self.p2p(node);
                let mut fresh = Vec::new();
                for chat in &msgs {
                    let new = !p.log.iter().any(|r| r.id == chat.id);
                    if new {
                        p.log.push(super::sync::chat_to_record(chat));
                    }
                    fresh.push(new);
                }
                let now = self.clock(node);
                self.p2p(node).state.history_ingested(now, link, req, msgs, fresh);
            }
            Output::History { job: Job::Show(messages), .. } => {
                let at = self.now;
                for message in messages {
                    self.p2p(node).show(at, None, message);
                }
            }
            Output::History { job: Job::Tell(_), .. } | Output::HistoryDone { .. } => {}
            Output::AnswerHistory { link, req, query } => {
                let p = self.p2p(node);
                let after = query.after.map(|k| (k.stamp, k.id));
                let mut records: Vec<&Record> = p
                    .log
                    .iter()
                    .filter(|r| r.shared && after.as_ref().is_none_or(|a| (r.stamp, &r.id) > (a.0, &a.1)))
                    .collect();
                records.sort_by(|a, b| (a.stamp, &a.id).cmp(&(b.stamp, &b.id)));
                let skip = records.len().saturating_sub(query.limit);
                let room = &p.rules.room;
                let msgs = records[skip..].iter().map(|r| super::sync::record_to_chat((*r).clone(), room)).collect();
                let frames = super::sync::answer_frames(req, msgs);
                let bytes: usize = frames.iter().map(Vec::len).sum();
                let end = p.ends.get(&link).copied();
                if let Some(end) = end {
                    for frame in frames {
                        self.send_bytes(end, frame);
                    }
                }
                self.p2p(node).state.history_answered(link, bytes);
            }
        }
    }

    fn link_delay(&mut self) -> Duration {
        Duration::from_micros(200 + self.dice.below(20_000))
    }

    /// Write bytes at one end: they arrive at the other, cut into chunks, in order.
    fn send_bytes(&mut self, from: End2, bytes: Vec<u8>) {
        let pipe = &self.pipes[from.pipe];
        if pipe.write_closed[from.side] || bytes.is_empty() {
            return;
        }
        let to = End2 { pipe: from.pipe, side: 1 - from.side };
        let sent_at = self.held_until(pipe.nodes[0], pipe.nodes[1]).unwrap_or(self.now);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let cut =
                if self.dice.below(4) == 0 { 1 + self.dice.below(rest.len() as u64) as usize } else { rest.len() };
            let (chunk, tail) = rest.split_at(cut);
            let pipe = &mut self.pipes[from.pipe];
            let jitter = Duration::from_micros(self.dice.below(500));
            let arrival = (sent_at + pipe.delay + jitter).max(pipe.last_arrival[from.side]);
            pipe.last_arrival[from.side] = arrival;
            self.schedule_at(arrival, Ev::Bytes { at: to, bytes: chunk.to_vec() });
            rest = tail;
        }
    }

    /// Close one end for writing: the other end sees the end of stream after what is in flight.
    fn shut_write(&mut self, end: End2) {
        let sent_at = self.held_until(self.pipes[end.pipe].nodes[0], self.pipes[end.pipe].nodes[1]).unwrap_or(self.now);
        let pipe = &mut self.pipes[end.pipe];
        if pipe.write_closed[end.side] {
            return;
        }
        pipe.write_closed[end.side] = true;
        let arrival = (sent_at + pipe.delay).max(pipe.last_arrival[end.side]);
        pipe.last_arrival[end.side] = arrival;
        self.schedule_at(arrival, Ev::Eof { at: End2 { pipe: end.pipe, side: 1 - end.side } });
    }

    /// One end is gone: it writes and reads nothing more.
    fn close_end(&mut self, end: End2) {
        self.shut_write(end);
        self.pipes[end.pipe].gone[end.side] = true;
    }

    fn dial_arrives(&mut self, from: NodeId, to: NodeId, contact: Contact, retry_until: Duration, backoff: Duration) {
        if !self.nodes[from].up {
            return;
        }
        if !self.nodes[to].up {
            let refused = Ev::DialFailed { from, contact, retry_until, backoff, silent: false };
            return self.schedule(Duration::ZERO, refused);
        }
        if self.held_until(from, to).is_some() || self.blocked(from, to) {
            let timed_out = Ev::DialFailed { from, contact, retry_until, backoff, silent: true };
            return self.schedule(self.limits.connect_timeout, timed_out);
        }
        let pipe = self.pipes.len();
        let delay = self.link_delay();
        self.pipes.push(Pipe {
            nodes: [from, to],
            links: [None, None],
            delay,
            last_arrival: [self.now; 2],
            write_closed: [false; 2],
            gone: [false; 2],
        });
        // The acceptor first (its accept loop), then the dialler (its connect returns).
        let remote = self.remote_of_dialler(pipe);
        if self.private.is_none() {
            self.attach(to, End2 { pipe, side: 1 }, None, remote);
            self.attach(from, End2 { pipe, side: 0 }, Some(contact), self.nodes[to].addr);
            return;
        }
        // A private room: both ends hand the connection to the handshake, which takes a round trip
        // (an original peer cannot be in one: it never answers the handshake).
        let to_addr = self.nodes[to].addr;
        let accepted = self.p2p_state(to, |state, now| state.accepted(now, remote));
        if !matches!(accepted, Some(Connect::Handshake)) {
            self.pipes[pipe].gone = [true; 2];
            self.drain(to);
            // The dial connected, then its handshake met the reset.
            let reason = "the connection was reset";
            self.p2p_state(from, |state, now| state.dialled(now, contact));
            self.p2p_state(from, |state, now| state.handshake_failed(now, to_addr, reason, true, false));
            self.drain(from);
            return;
        }
        self.drain(to);
        let dialled = self.p2p_state(from, |state, now| state.dialled(now, contact.clone()));
        self.drain(from);
        debug_assert!(matches!(dialled, Some(Connect::Handshake)), "a private room's dial is secured first");
        self.schedule(2 * delay, Ev::Secured { pipe, contact });
    }

    /// The address the acceptor of `pipe` sees it dialled from (an ephemeral port).
    fn remote_of_dialler(&self, pipe: PipeId) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 40_000 + (pipe % 20_000) as u16))
    }

    /// Call into a p2pchat node's state with its clock (`None` for any other node).
    fn p2p_state<T>(&mut self, node: NodeId, f: impl FnOnce(&mut PeerState, Now) -> T) -> Option<T> {
        let now = self.clock(node);
        match &mut self.nodes[node].kind {
            Some(Kind::P2p(p)) => Some(f(&mut p.state, now)),
            _ => None,
        }
    }

    /// A private room's handshake on `pipe` ended: both ends are secured with one handshake hash, or
    /// (an end went down meanwhile) the other end's handshake fails.
    fn secured(&mut self, pipe: PipeId, contact: Contact) {
        let [from, to] = self.pipes[pipe].nodes;
        if let Some(until) = self.held_until(from, to) {
            // The handshake's messages wait for the network, as TCP retransmits them.
            return self.schedule_at(until, Ev::Secured { pipe, contact });
        }
        let (from_up, to_up) = (self.nodes[from].up, self.nodes[to].up);
        if !(from_up && to_up) {
            self.pipes[pipe].gone = [true; 2];
            let remote = self.remote_of_dialler(pipe);
            let to_addr = self.nodes[to].addr;
            let reason = "the connection closed during the handshake";
            if from_up {
                self.p2p_state(from, |state, now| state.handshake_failed(now, to_addr, reason, true, false));
                self.drain(from);
            }
            if to_up {
                self.p2p_state(to, |state, now| state.handshake_failed(now, remote, reason, false, false));
                self.drain(to);
            }
            return;
        }
        let binding = self.dice.seed32().to_vec();
        let remote = self.remote_of_dialler(pipe);
        let accepted = self.p2p_state(to, |state, now| state.secured(now, remote, None, binding.clone()));
        self.open_link(to, End2 { pipe, side: 1 }, accepted, remote, true);
        let to_addr = self.nodes[to].addr;
        let dialled = self.p2p_state(from, |state, now| state.secured(now, to_addr, Some(contact), binding));
        self.open_link(from, End2 { pipe, side: 0 }, dialled, to_addr, true);
    }

    /// A dial failed: tell the dialler, and try again after `backoff` while there is time left.
    fn dial_failed(&mut self, from: NodeId, contact: Contact, retry_until: Duration, backoff: Duration, silent: bool) {
        let retry = self.nodes[from].up && self.now + backoff < retry_until;
        let now = self.clock(from);
        let Some(Kind::P2p(p)) = &mut self.nodes[from].kind else { return };
        let reason = if silent { "timed out" } else { "connection refused" };
        p.state.dial_failed(now, contact.addr, contact.known, reason, !retry, silent);
        self.drain(from);
        if retry {
            let to = self.node_at(contact.addr);
            let again = Ev::Dial { from, to, contact, retry_until, backoff: (backoff * 2).min(Duration::from_secs(1)) };
            self.schedule(backoff, again);
        }
    }

    /// When bytes between `a` and `b` can pass again, while a partition separates them.
    fn held_until(&self, a: NodeId, b: NodeId) -> Option<Duration> {
        let partition = self.partition.as_ref().filter(|p| self.now < p.until)?;
        (partition.side.contains(&a) != partition.side.contains(&b)).then_some(partition.until)
    }

    /// A connection's end arrives at a node: accepted, or (with `dialled`) the dial connected.
    fn attach(&mut self, node: NodeId, end: End2, dialled: Option<Contact>, remote: SocketAddr) {
        let now = self.clock(node);
        match &mut self.nodes[node].kind {
            Some(Kind::Original(o)) => {
                o.conns.insert(o.next_conn, (end, Vec::new()));
                self.pipes[end.pipe].links[end.side] = Some(o.next_conn as LinkId);
                o.next_conn += 1;
            }
            Some(Kind::P2p(p)) => {
                let connect = match dialled {
                    Some(contact) => p.state.dialled(now, contact),
                    None => p.state.accepted(now, remote),
                };
                self.open_link(node, end, Some(connect), remote, false);
            }
            None => {}
        }
    }

    /// Run a connection as the state decided: a link with its reader, or closed; `authenticated`: a
    /// private room's secured connection.
    fn open_link(
        &mut self,
        node: NodeId,
        end: End2,
        connect: Option<Connect>,
        remote: SocketAddr,
        authenticated: bool,
    ) {
        let now = self.clock(node);
        let Some(Kind::P2p(p)) = &mut self.nodes[node].kind else { return };
        match connect {
            Some(Connect::Open { link, role }) => {
                let mut reader = LinkReader::new(role, remote, authenticated, now, &p.rules);
                let mut out = Outputs::default();
                reader.start(&mut out);
                p.readers.insert(link, reader);
                p.ends.insert(link, end);
                self.pipes[end.pipe].links[end.side] = Some(link);
                self.drain(node);
                self.reader_outputs(node, link, out);
            }
            Some(Connect::Handshake | Connect::Reset) | None => self.close_end(end),
        }
    }

    /// Bytes (`None`: the end of stream) arrive at one end of a pipe.
    fn arrive(&mut self, at: End2, bytes: Option<Vec<u8>>) {
        if self.pipes[at.pipe].gone[at.side] {
            return;
        }
        let node = self.pipes[at.pipe].nodes[at.side];
        let Some(link) = self.pipes[at.pipe].links[at.side] else { return };
        let now = self.clock(node);
        match &mut self.nodes[node].kind {
            Some(Kind::Original(o)) => {
                let Some((end, got)) = o.conns.get_mut(&(link as usize)) else { return };
                let end = *end;
                // The original closes its side when the other does, and drops the link when its
                // decoder fails on a 0xFF byte.
                let drop_link = match &bytes {
                    Some(bytes) => {
                        got.extend_from_slice(bytes);
                        bytes.contains(&0xFF)
                    }
                    None => true,
                };
                if drop_link {
                    if let Some((_, got)) = o.conns.remove(&(link as usize)) {
                        o.ended.push(got);
                    }
                    self.close_end(end);
                }
            }
            Some(Kind::P2p(p)) => {
                let Some(reader) = p.readers.get_mut(&link) else { return };
                let mut out = Outputs::default();
                match bytes {
                    Some(bytes) => {
                        if let Some(buf) = reader.read_buffer() {
                            buf.extend_from_slice(&bytes);
                            let forwarding = p.forwarding.contains(&link);
                            reader.handle_read(now, &p.rules, forwarding, &mut out);
                        }
                    }
                    None => reader.handle_eof(now, &p.rules, &mut out),
                }
                self.reader_outputs(node, link, out);
            }
            None => {}
        }
    }

    /// What a link's reader produced, carried out as a link task does.
    fn reader_outputs(&mut self, node: NodeId, link: LinkId, mut out: Outputs) {
        let (now, at) = (self.clock(node), self.now);
        let p = self.p2p(node);
        for report in out.reports.drain(..) {
            p.state.report(now, link, report);
        }
        p.log.append(&mut out.to_log);
        for event in out.to_show.drain(..) {
            if let Event::Message(m) = event {
                p.show(at, Some(link), m);
            }
        }
        // A link's task ends with its reading, and its socket closes.
        let ended = out.end.is_some().then(|| (p.readers.remove(&link), p.ends.remove(&link)));
        match out.end {
            None | Some(End::Quietly) => {}
            Some(End::StreamEnded) => p.state.closed(now, link, "closed by the other side".to_owned(), false),
            Some(End::Closed { reason, clean }) => p.state.closed(now, link, reason, clean),
        }
        if let Some((_, Some(end))) = ended {
            self.close_end(end);
        }
        self.drain(node);
    }

    fn timer(&mut self, node: NodeId) {
        if !self.nodes[node].up {
            return;
        }
        let now = self.clock(node);
        let Some(Kind::P2p(p)) = &mut self.nodes[node].kind else { return };
        p.timer_at = p.timer_at.filter(|at| *at > self.now);
        p.state.handle_timeout(now);
        let mut all = Vec::new();
        for (link, reader) in &mut p.readers {
            if reader.poll_timeout().is_some_and(|at| at <= now.at) {
                let mut out = Outputs::default();
                reader.handle_timeout(now, &p.rules, &mut out);
                all.push((*link, out));
            }
        }
        for (link, out) in all {
            self.reader_outputs(node, link, out);
        }
        self.drain(node);
    }

    /// Wake the node when its earliest timer is due: one wake-up is armed at a time, and another only
    /// when something needs it sooner (a wake-up that finds nothing due is harmless).
    fn arm_timer(&mut self, node: NodeId) {
        let Some(Kind::P2p(p)) = &mut self.nodes[node].kind else { return };
        let earliest = p.readers.values().filter_map(LinkReader::poll_timeout).chain(p.state.poll_timeout()).min();
        let Some(at) = earliest.map(|at| at.duration_since(self.base).max(self.now)) else { return };
        if p.timer_at.is_none_or(|armed| at < armed) {
            p.timer_at = Some(at);
            self.schedule_at(at, Ev::Timer { node });
        }
    }
}

/// What a scripted run checks at its end.
/// Whether the members that stayed were linked all along (a partition makes them leave and come back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Stable,
    Changes,
}

fn check_invariants(sim: &Sim, stayed: &[NodeId], presence: Presence) -> Result<(), String> {
    if let Some(broken) = sim.broken.first() {
        return Err(broken.clone());
    }
    let names: Vec<&str> = sim.nodes.iter().map(|n| n.name.as_str()).collect();
    // One connection per pair of members once the room settled: a duplicate is closed at both ends.
    let mut open: HashMap<(NodeId, NodeId), usize> = HashMap::new();
    for pipe in sim.pipes.iter().filter(|p| !p.gone[0] && !p.gone[1]) {
        let pair = (pipe.nodes[0].min(pipe.nodes[1]), pipe.nodes[0].max(pipe.nodes[1]));
        *open.entry(pair).or_default() += 1;
    }
    if let Some(((a, b), n)) = open.into_iter().find(|(_, n)| *n > 1) {
        return Err(format!("{} and {} hold {n} connections to each other", names[a], names[b]));
    }
    for &receiver in stayed {
        let node = &sim.nodes[receiver];
        match &node.kind {
            Some(Kind::P2p(p)) => {
                // Every line said by another member that stayed reaches it once, under the name its
                // author had when saying it.
                for said in &sim.said {
                    if said.author == receiver || !stayed.contains(&said.author) {
                        continue;
                    }
                    let count = p
                        .shown
                        .iter()
                        .filter(|s| s.sender.as_deref() == Some(said.name.as_str()) && s.text == said.text)
                        .count();
                    if count != 1 {
                        return Err(format!("{} showed {:?} from {} {count} times", node.name, said.text, said.name));
                    }
                }
                // Lines from one author are shown in the order they were said.
                for &author in stayed {
                    let said: Vec<&String> = sim.said.iter().filter(|s| s.author == author).map(|s| &s.text).collect();
                    let shown: Vec<&String> =
                        p.shown.iter().filter(|s| !s.history && said.contains(&&s.text)).map(|s| &s.text).collect();
                    let mut in_order = said.iter();
                    if !shown.iter().all(|s| in_order.any(|t| t == s)) {
                        return Err(format!("{} showed {}'s lines out of order", node.name, names[author]));
                    }
                }
                // Presence is stable: no member that stayed was ever shown leaving, and each p2pchat
                // member that stayed was shown joining once (an original one that dialled us is
                // shown by the address it dialled from).
                let stayed_addrs: Vec<SocketAddr> = stayed.iter().map(|n| sim.nodes[*n].addr).collect();
                let flapped = p.left.iter().find(|a| stayed_addrs.contains(a));
                if let (Presence::Stable, Some(addr)) = (presence, flapped) {
                    return Err(format!("{} showed {addr} leaving, which stayed", node.name));
                }
                let p2pchat_members = stayed.iter().filter(|m| **m != receiver && !sim.nodes[**m].is_original);
                for &member in p2pchat_members.filter(|_| presence == Presence::Stable) {
                    let addr = sim.nodes[member].addr;
                    let joins = p.joined.iter().filter(|a| **a == addr).count();
                    if joins != 1 {
                        return Err(format!("{} showed {} joining {joins} times", node.name, names[member]));
                    }
                }
                // Each p2pchat member that stayed is listed under the name it has now.
                let peers = p.state.peers();
                for &member in stayed.iter().filter(|m| **m != receiver && !sim.nodes[**m].is_original) {
                    let (addr, name) = (sim.nodes[member].addr, &sim.nodes[member].name);
                    let listed = peers.iter().find(|info| info.addr == addr).and_then(|info| info.name.as_ref());
                    if listed != Some(name) {
                        return Err(format!("{} lists {addr} as {listed:?}, not {name}", node.name));
                    }
                }
                if p.state.holds_lines() {
                    return Err(format!("{} still holds lines for links that never opened", node.name));
                }
                let members = p.state.peers().len();
                if members != stayed.len() - 1 {
                    return Err(format!("{} lists {members} members, {} stayed", node.name, stayed.len() - 1));
                }
            }
            Some(Kind::Original(o)) => {
                // An original peer gets only `<NAME> :: text` bytes (on every connection it had, also
                // the ones that ended), and each line said by a member that stayed exactly once.
                let streams: Vec<&Vec<u8>> = o.conns.values().map(|(_, b)| b).chain(&o.ended).collect();
                let mut all = String::new();
                for bytes in streams {
                    let stream = std::str::from_utf8(bytes)
                        .map_err(|_| format!("{} got bytes that are not UTF-8", node.name))?;
                    let mut decoder = chat::ChatDecoder::new();
                    let mut pieces = decoder.feed(stream.as_bytes());
                    pieces.extend(decoder.finish());
                    if pieces.iter().any(|p| p.sender.as_ref().is_none_or(|s| !sim.names_ever.contains(s))) {
                        return Err(format!("{} got text that is not `<NAME> :: text`: {stream:?}", node.name));
                    }
                    all.push_str(stream);
                    all.push('\u{0}');
                }
                for said in &sim.said {
                    if said.author == receiver || !stayed.contains(&said.author) {
                        continue;
                    }
                    // Lines carry no terminator; the texts are made so that none contains another.
                    let line = format!("<{}> :: {}", said.name, said.text);
                    let count = all.matches(&line).count();
                    if count != 1 {
                        return Err(format!("{} got {line:?} {count} times", node.name));
                    }
                }
            }
            None => {}
        }
    }
    Ok(())
}

/// A random run: `p2p` p2pchat peers and `originals` original ones join over a window and say lines,
/// while one of these happens (or nothing): a member crashes or leaves; the room is split for 20 s;
/// the tracker is lost and restarts empty, and a newcomer joins after it; the links between two
/// members are reset; two members cannot dial each other and are relayed. Some members take new
/// names as they talk, and a quarter of the rooms of p2pchat peers only are private.
/// Returns what the run did.
fn random_run(seed: u64, p2p: usize, originals: usize) -> Result<String, String> {
    let mut sim = Sim::new(seed, p2p, originals);
    let total = p2p + originals;
    if originals == 0 && sim.dice.below(4) == 0 {
        sim.make_private();
    }
    // Some rooms start all at once, so newcomers learn of each other from hellos and dial each other
    // at the same moment (the duplicate rule then picks one link at both ends).
    let join_window = match sim.dice.below(2) {
        0 => Duration::from_millis(1 + sim.dice.below(60)),
        _ => Duration::from_millis(200 + sim.dice.below(3_000)),
    };
    // Settled: every link opened (an original that dialled us is known after `decide_timeout`).
    let settled = join_window + Duration::from_secs(6);
    let mut joins: Vec<Duration> = (0..total)
        .map(|node| {
            if node == 0 {
                Duration::ZERO
            } else {
                Duration::from_millis(sim.dice.below(join_window.as_millis() as u64))
            }
        })
        .collect();
    let mut stayed: Vec<NodeId> = (0..total).collect();
    let mut talk_from = settled;
    let mut talk_for = Duration::from_secs(2);
    let mut wait_after = Duration::from_secs(3);
    let mut presence = Presence::Stable;
    // What the run does, for its failure message.
    let mut story = vec![if sim.private.is_some() { "a private room" } else { "a room" }];
    match sim.dice.below(6) {
        0 if total > 2 && p2p > 1 => {
            let who = 1 + sim.dice.below(p2p as u64 - 1) as usize;
            let action = if sim.dice.below(2) == 0 { Action::Crash(who) } else { Action::Leave(who) };
            sim.schedule(settled, Ev::Act(action));
            stayed.retain(|n| *n != who);
            talk_from = settled + Duration::from_secs(12);
            story.push("a member goes");
        }
        // A room of p2pchat peers split in two for 20 s, talking all along: what one side says
        // reaches the other once the split heals, through catch-up. (Original peers get no
        // catch-up: what is said while they are cut off is lost to them, as with the original.)
        1 if originals == 0 && p2p > 2 => {
            let side: Vec<NodeId> = (0..total).filter(|_| sim.dice.below(2) == 0).collect();
            if !side.is_empty() && side.len() < total {
                sim.schedule(settled, Ev::Act(Action::Split { side, lasting: Duration::from_secs(20) }));
                talk_for = Duration::from_secs(30);
                wait_after = Duration::from_secs(15);
                presence = Presence::Changes;
                story.push("split for 20 s");
            }
        }
        // The tracker is lost while the room talks (it is not in the data path), and restarts empty.
        // Members register again; a newcomer joining after it learns of those that did not register
        // yet from the others' hellos. (Original peers never register again, so a newcomer could
        // not find one that dialled every member itself: rooms with them get no newcomer.)
        2 => {
            let lasting = Duration::from_millis(1_000 + sim.dice.below(9_000));
            sim.schedule(settled, Ev::Act(Action::TrackerDown { lasting }));
            talk_for = lasting + Duration::from_secs(10);
            story.push("the tracker restarts");
            if originals == 0 && p2p > 2 {
                let late = settled + lasting + Duration::from_millis(sim.dice.below(3_000));
                joins[p2p - 1] = late;
            }
        }
        // The links between two p2pchat members are reset while they talk: they link again, and
        // what was lost in flight comes as catch-up.
        3 if p2p > 1 => {
            let a = sim.dice.below(p2p as u64) as usize;
            let b = (a + 1 + sim.dice.below(p2p as u64 - 1) as usize) % p2p;
            talk_for = Duration::from_secs(6);
            let at = settled + Duration::from_millis(sim.dice.below(talk_for.as_millis() as u64));
            sim.schedule(at, Ev::Act(Action::Cut { a, b }));
            wait_after = Duration::from_secs(10);
            presence = Presence::Changes;
            story.push("two members' links are reset");
        }
        // Two p2pchat members behind NATs that drop every dial between them: each gives up on the
        // other, asks the tracker for a hole punch (which fails too), and then a member that both
        // reach relays between them.
        4 if p2p > 2 => {
            let a = sim.dice.below(p2p as u64) as usize;
            let b = (a + 1 + sim.dice.below(p2p as u64 - 1) as usize) % p2p;
            sim.block(a, b);
            story.push("two members are relayed");
            // Talking all along: what is said before the relay opens comes through it as catch-up.
            talk_for = Duration::from_secs(16);
            wait_after = Duration::from_secs(12);
        }
        _ => {}
    }
    for (node, at) in joins.iter().enumerate() {
        sim.schedule(*at, Ev::Act(Action::Join(node)));
    }
    // A member talks once its own links settled.
    let ready = |node: NodeId, at: Duration| at >= joins[node] + Duration::from_secs(6);
    for i in 0..(3 * total) {
        let at = talk_from + Duration::from_millis(sim.dice.below(talk_for.as_millis() as u64));
        let speakers: Vec<NodeId> = stayed.iter().copied().filter(|n| ready(*n, at)).collect();
        if speakers.is_empty() {
            continue;
        }
        let node = speakers[sim.dice.below(speakers.len() as u64) as usize];
        let text = format!("line {i} from n{node}: héllo ✓");
        sim.schedule(at, Ev::Act(Action::Say { node, text }));
    }
    if sim.dice.below(3) == 0 {
        for round in 0..1 + sim.dice.below(2) {
            let node = sim.dice.below(p2p as u64) as usize;
            let at = talk_from + Duration::from_millis(sim.dice.below(talk_for.as_millis() as u64));
            sim.schedule(at, Ev::Act(Action::Rename { node, name: format!("p{node}-{round}") }));
        }
        story.push("renames");
    }
    let last_join = joins.iter().max().copied().unwrap_or_default();
    sim.run_until((talk_from + talk_for).max(last_join + Duration::from_secs(6)) + wait_after);
    let story = story.join(", ");
    check_invariants(&sim, &stayed, presence).map_err(|why| format!("{story}: {why}"))?;
    Ok(story)
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let number = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let count = number("SIM_SEEDS").unwrap_or(2_000);
    let first = number("SIM_SEEDS_FROM").unwrap_or(1);
    (first..first.saturating_add(count)).collect()
}

/// Run every seed of this test run: rooms of 2 to 6 p2pchat peers and 0 to 2 original ones.
fn run_seeds() {
    log_if_asked();
    for seed in seeds() {
        run_seed(seed);
    }
}

/// Run one seed's room; returns what it did.
fn run_seed(seed: u64) -> String {
    let mut dice = Dice(seed ^ 0x5EED);
    let p2p = 2 + dice.below(5) as usize;
    let originals = dice.below(3) as usize;
    match random_run(seed, p2p, originals) {
        Ok(story) => story,
        Err(why) => panic!(
            "seed {seed} ({p2p} p2pchat, {originals} original peers): {why}\nreplay: SIM_SEED={seed} cargo test --lib sim"
        ),
    }
}

/// Seeds that found bugs beyond the 2,000 run by default, with what they do: a change to how runs
/// are drawn makes a seed do something else, which fails here rather than going untested (find new
/// ones then: undo the fix, and run `SIM_SEEDS=60000`, with `SIM_SEEDS_FROM` to go on past a failure).
#[test]
fn sim_seeds_that_found_bugs_still_pass() {
    // Each fails with the three fixes for renames undone (in `replace`, `adopt` and `on_renamed`):
    // a member renamed itself while another's two links to it crossed or one was replaced, and the
    // other kept listing its old name.
    // 6884 fails without the summary sent again in `replace`: a newcomer's two links to a member
    // crossed just after the member said a line, the member's only summary went out on the link the
    // newcomer read out as a duplicate, and the line never reached it.
    let found = [
        (6_884, "a private room, the tracker restarts, renames"),
        (7_287, "a private room, split for 20 s, renames"),
        (21_075, "a room, two members' links are reset, renames"),
        (36_429, "a room, two members' links are reset, renames"),
    ];
    for (seed, story) in found {
        assert_eq!(run_seed(seed), story, "seed {seed} no longer runs the room that found its bug");
    }
}

#[test]
fn sim_random_rooms_deliver_every_line_once_in_order() {
    run_seeds();
}

#[test]
fn sim_a_room_of_100_meshes_and_delivers() {
    let seed = 100;
    if let Err(why) = random_run(seed, 96, 4) {
        panic!("seed {seed}: {why}");
    }
}

#[test]
fn sim_one_seed_replays_exactly() {
    let trace = |seed| {
        let mut sim = Sim::new(seed, 4, 1);
        for node in 0..5 {
            sim.schedule(Duration::from_millis(node as u64 * 37), Ev::Act(Action::Join(node)));
        }
        sim.schedule(Duration::from_secs(8), Ev::Act(Action::Say { node: 0, text: "hi".into() }));
        sim.run_until(Duration::from_secs(12));
        let shown: Vec<Vec<String>> = sim
            .nodes
            .iter()
            .map(|n| match &n.kind {
                Some(Kind::P2p(p)) => p.shown.iter().map(|s| format!("{:?}:{}", s.sender, s.text)).collect(),
                _ => Vec::new(),
            })
            .collect();
        (sim.seq, sim.pipes.len(), shown)
    };
    assert_eq!(trace(7), trace(7));
}

/// A room of 6 split 3 | 3 for 20 s, each side talking: once it heals, every member has every line
/// once, and what the other side said during the split came as history (caught up).
#[test]
fn sim_a_partition_heals_and_what_was_missed_is_caught_up() {
    let mut sim = Sim::new(6, 6, 0);
    for node in 0..6 {
        sim.schedule(Duration::from_millis(node as u64 * 50), Ev::Act(Action::Join(node)));
    }
    let split = Duration::from_secs(8);
    sim.schedule(split, Ev::Act(Action::Split { side: vec![0, 1, 2], lasting: Duration::from_secs(20) }));
    for i in 0..12 {
        let (node, at) = (i % 6, split + Duration::from_secs(2 + i as u64));
        sim.schedule(at, Ev::Act(Action::Say { node, text: format!("during the split, line {i} from n{node}") }));
    }
    sim.run_until(split + Duration::from_secs(40));
    let stayed: Vec<NodeId> = (0..6).collect();
    if let Err(why) = check_invariants(&sim, &stayed, Presence::Changes) {
        panic!("{why}");
    }
    let side = |n: NodeId| n < 3;
    for (receiver, node) in sim.nodes.iter().enumerate() {
        let Some(Kind::P2p(p)) = &node.kind else { continue };
        for said in sim.said.iter().filter(|s| side(s.author) != side(receiver)) {
            let shown = p.shown.iter().find(|s| s.text == said.text).expect("checked above");
            assert!(shown.history, "{} got {:?} from {} live across the split", node.name, said.text, said.name);
        }
    }
}

/// Three members: n0 reaches both others, whose dials to each other get no answer (symmetric NATs),
/// until `blocked_until`. n2 joins last, and both n1 and n2 type the moment it joins. Returns the
/// simulator after 30 s, and when n2 joined.
fn relayed_pair(seed: u64, blocked_until: Duration) -> (Sim, Duration) {
    let mut sim = Sim::new(seed, 3, 0);
    sim.block_until(1, 2, blocked_until);
    let joined = Duration::from_secs(3);
    for (node, at) in [(0, Duration::ZERO), (1, Duration::from_millis(100)), (2, joined)] {
        sim.schedule(at, Ev::Act(Action::Join(node)));
    }
    // Typed at once, long before any dial between them could have failed.
    for (node, after) in [(2, 1), (1, 5)] {
        let text = format!("n{node}, the moment n2 joined");
        sim.schedule(joined + Duration::from_millis(after), Ev::Act(Action::Say { node, text }));
    }
    for i in 0..10 {
        let (node, at) = (1 + i % 2, joined + Duration::from_millis(300 * (i as u64 + 1)));
        sim.schedule(at, Ev::Act(Action::Say { node, text: format!("n{node}, line {i}") }));
    }
    sim.run_until(joined + Duration::from_secs(30));
    if let Err(why) = check_invariants(&sim, &[0, 1, 2], Presence::Stable) {
        panic!("seed {seed}: {why}");
    }
    (sim, joined)
}

/// When `receiver` showed the line `text`.
fn shown_at(sim: &Sim, receiver: NodeId, text: &str) -> Duration {
    let Some(Kind::P2p(p)) = &sim.nodes[receiver].kind else { panic!("n{receiver} is not a p2pchat peer") };
    p.shown.iter().find(|s| s.text == text).map(|s| s.at).expect("checked by the invariants")
}

/// Issue 23's target for symmetric NATs: the first lines cross within 2 s of the second peer joining
/// (it was ~10 s: 3 s of direct dials, 3 s of punched dials, then the relay), through a relay that
/// opens after `relay_first` while the dials go on.
#[test]
fn sim_members_that_cannot_dial_each_other_talk_through_a_relay_within_two_seconds() {
    for seed in 1..=20 {
        let (sim, joined) = relayed_pair(seed, Duration::MAX);
        for (receiver, author) in [(1, 2), (2, 1)] {
            let took = shown_at(&sim, receiver, &format!("n{author}, the moment n2 joined")) - joined;
            assert!(
                took <= Duration::from_secs(2),
                "seed {seed}: n{receiver} showed n{author}'s first line {took:?} after the join"
            );
        }
        let Some(Kind::P2p(p)) = &sim.nodes[1].kind else { unreachable!() };
        let n2 = p.state.peers().into_iter().find(|m| m.addr == sim.nodes[2].addr).expect("n2 is a member");
        assert_eq!(n2.relayed_by, Some(sim.nodes[0].addr), "seed {seed}: relayed by n0");
    }
}

/// A hole punch that works after 1.5 s: the relay opens first, then the direct link, which retires
/// it. Every line still arrives once (the invariants), nobody is shown leaving or joining twice, and
/// the relay passes nothing on any more.
#[test]
fn sim_a_direct_link_that_comes_after_the_relay_retires_it() {
    for seed in 1..=20 {
        let (sim, joined) = relayed_pair(seed, Duration::from_secs(3) + Duration::from_millis(1_500));
        let Some(Kind::P2p(relay)) = &sim.nodes[0].kind else { unreachable!() };
        assert!(relay.forwarding.is_empty(), "seed {seed}: n0 still relays on links {:?}", relay.forwarding);
        let Some(Kind::P2p(p)) = &sim.nodes[1].kind else { unreachable!() };
        let n2 = p.state.peers().into_iter().find(|m| m.addr == sim.nodes[2].addr).expect("n2 is a member");
        assert_eq!(n2.relayed_by, None, "seed {seed}: linked directly");
        let took = shown_at(&sim, 1, "n2, the moment n2 joined") - joined;
        assert!(took <= Duration::from_secs(2), "seed {seed}: the first line took {took:?}");
    }
}
