//! What a link may send, and what each frame may change, top to bottom. Every acceptance decision on
//! what arrives from a link is here; the readers and the peer's state machine only apply them.
//!
//! * **Before its hello** a p2pchat link may send only its `hello` (or an `error` refusing us);
//!   anything else ends the link.
//! * **A message** (`msg`, or `sealed` opened with the room key) is shown only if it is for our room,
//!   its text is valid, and (private rooms) it is signed by the key its name has here and was sent
//!   within [`FRESH_FOR_MS`] of our clock; then only the first copy of its id, and only while its
//!   link stays under the flood limit ([`Flood`]). Outside private rooms a signature is dropped, so
//!   nothing unchecked is ever logged or shown as signed.
//! * **History** parts pass only messages fit for our room ([`sync::acceptable`]) and, in private
//!   rooms, signed by their author's key; the state then checks they answer our request.
//! * **A name** (`nick`, a relayed member's name) must be a valid name.
//! * **Relay frames** need a valid address; the state checks who may relay.
//! * **Hellos** are judged by the state ([`super::PeerState`]): version, room, identity proof on
//!   private links, and the duplicate rule ([`keeps_link`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::ids::Ids;
use super::reader::{End, Outputs};
use super::Report;
use crate::history::clock::Clock;
use crate::peer::seen::SeenIds;
use crate::peer::sync;
use crate::peer::trust::{self, KnownKeys};
use crate::peer::types::Now;
use crate::peer::{Event, Limits};
use crate::private::RoomKey;
use crate::wire::chat;
use crate::wire::frames::{self, Chat, Frame};

/// How far a live message's own time may be from ours in a private room: older ones are replays
/// (copies within it are caught by their ids), newer ones come from a clock that is far off.
pub const FRESH_FOR_MS: u64 = 10 * 60 * 1000;

/// What every link's reader of one peer applies the rules with (shared by its links).
pub struct LinkRules {
    pub limits: Limits,
    /// The room as the wire names it.
    pub room: String,
    pub seen: Arc<Mutex<SeenIds>>,
    pub clock: Arc<Clock>,
    /// In a private room: the keys names have here; every message must be signed by its author's.
    pub authors: Option<Arc<Mutex<KnownKeys>>>,
    /// In a private room: its key, which opens sealed messages.
    pub room_key: Option<Arc<RoomKey>>,
    /// Ids for what original peers say (their lines carry none), from the peer's seeded generator.
    pub ids: Mutex<Ids>,
}

impl LinkRules {
    pub fn next_id(&self) -> String {
        self.ids.lock().map(|mut ids| ids.next_id()).unwrap_or_else(|_| frames::random_id())
    }

    /// Whether the message `stamp`, `id` is shown for the first time (and remember it).
    fn first_time(&self, stamp: u64, id: &str) -> bool {
        self.seen.lock().map(|mut seen| seen.shown(stamp, id)).unwrap_or(true)
    }

    fn seen_before(&self, id: &str) -> bool {
        self.seen.lock().map(|seen| seen.contains(id)).unwrap_or(false)
    }
}

/// A token bucket per link: a member sending faster than `max_message_rate` (after a burst of three
/// times that) is muted (its messages dropped here) until it slows down; one notice per muted spell.
const BURST: f64 = 3.0;

pub struct Flood {
    tokens: f64,
    rate: f64,
    last: Instant,
    muted: bool,
}

impl Flood {
    pub fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        Self { tokens: BURST * rate, rate, last: now, muted: false }
    }

    pub fn muted(&self) -> bool {
        self.muted
    }

    /// Whether one more message may be shown; `Some(notice)` when the muted state changes.
    pub fn admit(&mut self, now: Instant, from: SocketAddr, sender: Option<&str>) -> (bool, Option<String>) {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(BURST * self.rate);
        self.last = now;
        // Named only for a notice: this runs for every message.
        let who = || sender.map_or_else(|| from.to_string(), |name| format!("{name} ({from})"));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            let change = std::mem::take(&mut self.muted).then(|| format!("{} is no longer muted", who()));
            (true, change)
        } else if self.muted {
            (false, None)
        } else {
            self.muted = true;
            (false, Some(format!("muting {}: more than {} messages per second", who(), self.rate)))
        }
    }
}

/// Messages a link brought that were dropped (private rooms: forged, altered, replayed): the user is
/// told about the first few; a link that keeps sending them cannot fill the screen.
#[derive(Default)]
pub struct Drops(u32);

impl Drops {
    const TOLD: u32 = 5;

    fn tell(&mut self, text: String, from: SocketAddr, shown: &mut Vec<Event>) {
        log::warn!("{text}");
        self.0 = self.0.saturating_add(1);
        if self.0 <= Self::TOLD {
            shown.push(Event::Notice { text });
        }
        if self.0 == Self::TOLD {
            shown.push(Event::Notice { text: format!("more messages dropped from {from} are only logged") });
        }
    }
}

/// A p2pchat link as the frame rules see it.
pub struct LinkView<'a> {
    pub from: SocketAddr,
    /// A private room's Noise session (see [`private_room_takes`]).
    pub authenticated: bool,
    /// Its hello came.
    pub greeted: &'a mut bool,
    /// It said `bye`.
    pub said_bye: &'a mut bool,
    /// Its hello said `quiet`: it sends no pings, so its silence means nothing.
    pub quiet: &'a mut bool,
    /// We relay its messages: each new one is handed over to be passed on.
    pub forwarding: bool,
    pub flood: &'a mut Flood,
    pub drops: &'a mut Drops,
}

/// Outside private rooms nobody checks signatures: drop any a message carries, so that it is never
/// logged or shown as signed.
fn unverified(chat: &mut Chat, rules: &LinkRules) {
    if rules.authors.is_none() {
        chat.key = None;
        chat.sig = None;
    }
}

/// In a private room, whether a live message is its author's (see `trust::check_author`) and recent;
/// `Ok(true)` when its key is the one its author's name proved here (shown as verified).
fn authentic_and_fresh(chat: &Chat, now: Now, rules: &LinkRules) -> Result<bool, String> {
    let Some(authors) = &rules.authors else { return Ok(false) };
    let proven = trust::check_author(chat, &rules.room, authors)?;
    if now.wall_ms.abs_diff(chat.ts) > FRESH_FOR_MS {
        return Err(format!(
            "a message from {:?} sent at a time more than 10 minutes from ours (a replay?)",
            chat.from
        ));
    }
    Ok(proven)
}

/// Whether a private room takes `frame` from this link. A link that never ran the Noise handshake
/// (our link to the tracker's relay) is nobody's word: whoever runs or watches the tracker, or knows
/// the room's id, could be writing on it. It may carry only what the room key authenticates (sealed
/// messages) and what changes nothing here: its own hello, pings, a goodbye, an error. So no name,
/// presence (`relay_open`, `relay_close`), history or plain message comes from it.
fn private_room_takes(rules: &LinkRules, link: &LinkView<'_>, frame: &Frame) -> bool {
    if rules.room_key.is_none() || link.authenticated {
        return true;
    }
    match frame {
        Frame::Sealed { .. } | Frame::Ping | Frame::Bye | Frame::Error { .. } => true,
        Frame::Hello(_) => !*link.greeted,
        _ => false,
    }
}

/// Apply the rules to one frame from a p2pchat link; `Some(end)` ends the link.
pub fn take_frame(
    now: Now,
    rules: &LinkRules,
    link: &mut LinkView<'_>,
    frame: Frame,
    out: &mut Outputs,
) -> Option<End> {
    let from = link.from;
    if !private_room_takes(rules, link, &frame) {
        log::debug!("ignoring a frame from {from}: a private room takes only sealed messages without the handshake");
        return None;
    }
    // A sealed message is opened here and then taken as any message; what is passed on to relay
    // partners stays sealed.
    let (frame, passed_on) = match frame {
        Frame::Sealed { id: msg_id, data } => {
            match rules.room_key.as_deref().map(|key| key.open_sealed(&msg_id, &data)) {
                Some(Ok(chat)) => (Frame::Msg(chat), Some(Frame::Sealed { id: msg_id, data })),
                Some(Err(err)) => {
                    link.drops.tell(
                        format!("dropped a sealed message passed on by {from}: {err}"),
                        from,
                        &mut out.to_show,
                    );
                    return None;
                }
                // Not a private room: nothing here opens it.
                None => return None,
            }
        }
        other => (other, None),
    };
    match frame {
        Frame::Hello(hello) if !*link.greeted => {
            *link.greeted = true;
            *link.quiet = hello.quiet;
            out.reports.push(Report::Hello(hello));
        }
        Frame::Error { code, message } => {
            out.reports.push(Report::Refused { code, message });
            return Some(End::Closed { reason: "refused".to_owned(), clean: false });
        }
        _ if !*link.greeted => return Some(End::Closed { reason: "spoke before its hello".to_owned(), clean: false }),
        Frame::Msg(mut chat) => {
            unverified(&mut chat, rules);
            // The same checks as for history: our room, an id of 1 to 64 characters, a valid name and text.
            if !sync::acceptable(&chat, &rules.room) {
                log::debug!(
                    "ignoring a message from {from} for room {:?}, or with an invalid id, name or text",
                    chat.room
                );
                return None;
            }
            let proven = match authentic_and_fresh(&chat, now, rules) {
                Ok(proven) => proven,
                Err(why) => {
                    link.drops.tell(format!("dropped {why}, passed on by {from}"), from, &mut out.to_show);
                    return None;
                }
            };
            // Its id is remembered only once the flood limit let it through: a copy dropped here (a
            // muted member) may still be shown when it comes another way.
            let (admitted, notice) = if rules.seen_before(&chat.id) {
                (false, None)
            } else {
                link.flood.admit(now.at, from, Some(&chat.from))
            };
            // (Another link's reader may have taken the same id meanwhile: the set decides.)
            let shown = admitted && rules.first_time(chat.stamp(), &chat.id);
            if let Some(text) = notice {
                out.to_show.push(Event::Notice { text });
            }
            if shown {
                if link.forwarding {
                    let line = match &passed_on {
                        Some(sealed) => frames::encode(sealed),
                        None => frames::encode(&Frame::Msg(chat.clone())),
                    }
                    .into();
                    out.reports.push(Report::Forward { line });
                }
                rules.clock.observe_at(chat.stamp(), now.wall_ms);
                out.to_log.push(sync::chat_to_record(&chat));
                let mut message = sync::message(chat, from, super::reader::received_at(now), false);
                message.signed = proven;
                out.to_show.push(Event::Message(message));
            }
        }
        Frame::HistoryRequest { req, limit, after } => {
            out.reports.push(Report::HistoryRequested { req, limit, after });
        }
        Frame::History { req, msgs, more } => {
            let authentic = |m: &Chat| match &rules.authors {
                None => true,
                Some(authors) => trust::check_author(m, &rules.room, authors)
                    .map_err(|why| log::warn!("dropped history from {from}: {why}"))
                    .is_ok(),
            };
            let msgs = msgs
                .into_iter()
                .filter(|m| sync::acceptable(m, &rules.room) && authentic(m))
                .map(|mut m| {
                    unverified(&mut m, rules);
                    m
                })
                .collect();
            out.reports.push(Report::HistoryPart { req, msgs, more });
        }
        Frame::Nick { name } => {
            if chat::validate_name(&name).is_ok() {
                out.reports.push(Report::Renamed { name });
            }
        }
        Frame::Bye => *link.said_bye = true,
        Frame::Summary { since, buckets, reply } => {
            out.reports.push(Report::Summary { summary: crate::peer::recent::Summary { since, buckets }, reply })
        }
        Frame::RelayAsk { peer, addr } => {
            let addr = addr.and_then(|a| a.parse().ok());
            out.reports.push(Report::RelayAsked { peer, addr });
        }
        Frame::RelayOpen { peer, name, addr } => {
            let (name, addr) = (name.filter(|n| chat::validate_name(n).is_ok()), addr.parse().ok());
            if let Some(addr) = addr {
                out.reports.push(Report::RelayOpened { peer, name, addr });
            }
        }
        Frame::RelayClose { peer, reason, clean } => out.reports.push(Report::RelayClosed { peer, reason, clean }),
        Frame::Hello(_)
        | Frame::Welcome { .. }
        | Frame::Ping
        | Frame::Vouch { .. }
        | Frame::PunchRequest { .. }
        | Frame::Punch { .. }
        | Frame::SecureHello { .. }
        | Frame::Sealed { .. }
        | Frame::Unknown => {}
    }
    None
}

/// The duplicate rule: two links to one peer (we dialled each other at once), and both ends must
/// keep the same one, the link dialled by the smaller session id. Whether the new link (`outgoing`
/// when we dialled it) is kept over the one we hold (`existing_outgoing`).
pub fn keeps_link(my_id: &str, peer_id: &str, outgoing: bool, existing_outgoing: bool) -> bool {
    let dialler = |outgoing: bool| if outgoing { my_id } else { peer_id };
    dialler(outgoing) < dialler(existing_outgoing)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::peer::state::reader::LinkReader;
    use crate::peer::types::Role;
    use crate::protocol::{MAGIC, PROTOCOL_VERSION};
    use crate::wire::frames::Hello;

    fn rules(rate: u32) -> LinkRules {
        LinkRules {
            limits: Limits { max_message_rate: rate, ..Limits::default() },
            room: "r".into(),
            seen: Arc::new(Mutex::new(SeenIds::new(64))),
            clock: Arc::new(Clock::new()),
            authors: None,
            room_key: None,
            ids: Mutex::new(Ids::from_seed([1; 32])),
        }
    }

    fn at(base: Instant, ms: u64) -> Now {
        Now { at: base + Duration::from_millis(ms), wall_ms: 1_750_000_000_000 + ms }
    }

    fn from() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    fn hello() -> Frame {
        Frame::Hello(Hello {
            v: PROTOCOL_VERSION,
            id: "a".repeat(32),
            name: Some("ana".into()),
            room: "r".into(),
            listen_port: Some(1),
            peers: vec![],
            identity: None,
            relay: false,
            quiet: false,
        })
    }

    fn msg(id: &str, room: &str) -> Frame {
        Frame::Msg(Chat {
            id: id.into(),
            from: "ana".into(),
            room: room.into(),
            ts: 1,
            hlc: 2,
            text: format!("hi in {room}"),
            key: Some("00".repeat(32)),
            sig: Some("00".repeat(64)),
        })
    }

    /// A reader that accepted a link and read `frames` (after the magic), all at once.
    fn read_frames(rules: &LinkRules, frames: &[Frame]) -> Outputs {
        read_link(rules, false, frames)
    }

    /// [`read_frames`] on a private room's Noise session (`authenticated`) or not.
    fn read_link(rules: &LinkRules, authenticated: bool, frames: &[Frame]) -> Outputs {
        let base = Instant::now();
        let mut reader = LinkReader::new(Role::Accepted, from(), authenticated, at(base, 0), rules);
        let mut out = Outputs::default();
        reader.start(&mut out);
        let buf = reader.read_buffer().expect("reading");
        buf.extend_from_slice(MAGIC);
        for frame in frames {
            buf.extend_from_slice(&frames::encode(frame));
        }
        reader.handle_read(at(base, 1), rules, false, &mut out);
        out
    }

    fn shown_texts(out: &Outputs) -> Vec<(String, bool)> {
        out.to_show
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some((m.text.clone(), m.signed)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_private_room_takes_only_sealed_messages_from_a_link_without_the_handshake() {
        let key =
            Arc::new(RoomKey::from_secret("", &format!("p2pc1-{}-{}", "11".repeat(32), hex::encode(b"r"))).unwrap());
        // Fresh for each link below: they bring the same message ids.
        let private_rules = || LinkRules {
            room: key.room_id(),
            authors: Some(Arc::new(Mutex::new(KnownKeys::load(None).unwrap()))),
            room_key: Some(key.clone()),
            ..rules(200)
        };
        let identity = crate::identity::Identity::from_secret([7; 32]);
        let chat = |id: &str, text: &str| {
            let mut chat = Chat {
                id: id.into(),
                from: "ana".into(),
                room: key.room_id(),
                ts: at(Instant::now(), 1).wall_ms,
                hlc: 0,
                text: text.into(),
                key: None,
                sig: None,
            };
            identity.sign_chat(&mut chat);
            chat
        };
        let unsealed = [
            Frame::Msg(chat("m1", "plain")),
            Frame::Nick { name: "eve".into() },
            Frame::RelayOpen { peer: "p".repeat(32), name: Some("eve".into()), addr: "10.0.0.9:1".into() },
            Frame::RelayClose { peer: "p".repeat(32), reason: "gone".into(), clean: true },
            Frame::RelayAsk { peer: "p".repeat(32), addr: None },
            Frame::HistoryRequest { req: 1, limit: 10, after: None },
            Frame::History { req: 1, msgs: vec![chat("m2", "old")], more: false },
        ];
        let mut frames = vec![hello()];
        frames.extend(unsealed.iter().cloned());
        frames.push(key.seal(&chat("m3", "sealed")));
        let out = read_link(&private_rules(), false, &frames);
        assert!(matches!(out.reports.as_slice(), [Report::Hello(_)]), "{:?}", out.reports);
        // (Signed by a key no link proved for "ana" here: shown, but not as verified.)
        assert_eq!(shown_texts(&out), vec![("sealed".to_owned(), false)], "only the sealed message");
        assert_eq!(out.end, None);
        // The same frames on a Noise session are a member's, and count.
        let out = read_link(&private_rules(), true, &frames);
        assert_eq!(out.reports.len(), unsealed.len(), "the hello and all but the message: {:?}", out.reports);
        let shown = vec![("plain".to_owned(), false), ("sealed".to_owned(), false)];
        assert_eq!(shown_texts(&out), shown);
    }

    #[test]
    fn a_link_that_speaks_before_its_hello_is_ended_and_nothing_it_said_is_shown() {
        let out = read_frames(&rules(200), &[msg("m1", "r"), hello()]);
        assert!(out.to_show.is_empty() && out.to_log.is_empty());
        assert!(out.reports.is_empty(), "not even its hello: {:?}", out.reports);
        assert_eq!(out.end, Some(End::Closed { reason: "spoke before its hello".into(), clean: false }));
    }

    #[test]
    fn a_message_is_shown_once_only_in_our_room_and_never_as_signed_outside_private_rooms() {
        let out = read_frames(&rules(200), &[hello(), msg("m0", "other"), msg("m1", "r"), msg("m1", "r")]);
        assert!(matches!(out.reports.as_slice(), [Report::Hello(_)]));
        assert_eq!(shown_texts(&out), vec![("hi in r".to_owned(), false)], "once, from our room, unsigned");
        assert_eq!(out.to_log.len(), 1);
        assert_eq!(out.to_log[0].sig, None, "an unchecked signature is not logged");
        assert_eq!(out.end, None);
    }

    #[test]
    fn a_member_over_the_flood_limit_is_muted_with_one_notice() {
        let frames: Vec<Frame> = std::iter::once(hello()).chain((0..10).map(|i| msg(&format!("m{i}"), "r"))).collect();
        let out = read_frames(&rules(2), &frames);
        assert_eq!(shown_texts(&out).len(), 6, "a burst of three times the rate");
        let notices = out.to_show.iter().filter(|e| matches!(e, Event::Notice { .. })).count();
        assert_eq!(notices, 1);
    }

    /// The bucket in virtual time: a burst of three times the rate, then one message per 1/rate;
    /// muted in between with one notice, and told when shown again.
    #[test]
    fn the_flood_limit_refills_at_its_rate_and_unmutes_with_a_notice() {
        let (t0, from) = (Instant::now(), "10.0.0.1:7".parse().unwrap());
        let mut flood = Flood::new(10, t0);
        for i in 0..30 {
            assert_eq!(flood.admit(t0, from, Some("bob")), (true, None), "message {i} of the burst");
        }
        let (shown, notice) = flood.admit(t0, from, Some("bob"));
        assert!(!shown && notice.as_deref().is_some_and(|n| n.starts_with("muting bob (10.0.0.1:7)")), "{notice:?}");
        assert_eq!(flood.admit(t0 + Duration::from_millis(99), from, Some("bob")), (false, None), "one notice only");
        assert!(flood.muted());
        let (shown, notice) = flood.admit(t0 + Duration::from_millis(100), from, Some("bob"));
        assert!(shown && notice.as_deref() == Some("bob (10.0.0.1:7) is no longer muted"), "{notice:?}");
        // A steady 10 per second is shown in full, however long it goes on.
        for i in 2..=100 {
            assert_eq!(flood.admit(t0 + Duration::from_millis(100 * i), from, None), (true, None), "at {i}/10 s");
        }
        // A pause refills the burst, and no more than the burst.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..31).filter(|_| flood.admit(later, from, None).0).count(), 30);
    }

    #[test]
    fn a_live_message_is_checked_as_history_is() {
        let valid = |id: &str, from: &str| {
            let Frame::Msg(mut chat) = msg(id, "r") else { unreachable!() };
            chat.from = from.into();
            Frame::Msg(chat)
        };
        let frames = [
            hello(),
            valid("", "ana"),
            valid(&"i".repeat(65), "ana"),
            valid("m1", ""),
            valid("m2", "two\nlines"),
            valid("m3", &"n".repeat(41)),
            valid("m4", "ana"),
        ];
        let out = read_frames(&rules(200), &frames);
        assert_eq!(shown_texts(&out).len(), 1, "only the last one");
        assert_eq!(out.to_log.len(), 1);
    }

    #[test]
    fn a_message_dropped_by_the_flood_limit_is_not_remembered_as_seen() {
        let rules = rules(2);
        let frames: Vec<Frame> = std::iter::once(hello()).chain((0..10).map(|i| msg(&format!("m{i}"), "r"))).collect();
        let flooded = read_frames(&rules, &frames);
        assert_eq!(shown_texts(&flooded).len(), 6);
        // The four dropped ones come again on another link (a relay, history): shown now.
        let again: Vec<Frame> = std::iter::once(hello()).chain((6..10).map(|i| msg(&format!("m{i}"), "r"))).collect();
        assert_eq!(shown_texts(&read_frames(&rules, &again)).len(), 4);
        let repeats: Vec<Frame> = std::iter::once(hello()).chain((0..3).map(|i| msg(&format!("m{i}"), "r"))).collect();
        assert!(shown_texts(&read_frames(&rules, &repeats)).is_empty(), "what was shown stays seen");
    }

    #[test]
    fn an_error_frame_refuses_the_link_and_bye_makes_its_end_clean() {
        let refused =
            read_frames(&rules(200), &[hello(), Frame::Error { code: "room".into(), message: "elsewhere".into() }]);
        assert!(matches!(refused.reports.last(), Some(Report::Refused { code, .. }) if code == "room"));
        assert_eq!(refused.end, Some(End::Closed { reason: "refused".into(), clean: false }));

        let rules = rules(200);
        let base = Instant::now();
        let mut reader = LinkReader::new(Role::Accepted, from(), false, at(base, 0), &rules);
        let mut out = Outputs::default();
        let buf = reader.read_buffer().expect("reading");
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&frames::encode(&hello()));
        buf.extend_from_slice(&frames::encode(&Frame::Bye));
        reader.handle_read(at(base, 1), &rules, false, &mut out);
        reader.handle_eof(at(base, 2), &rules, &mut out);
        assert_eq!(out.end, Some(End::Closed { reason: "left".into(), clean: true }));
    }

    #[test]
    fn an_opening_decides_by_first_bytes_or_silence() {
        let rules = rules(200);
        let base = Instant::now();
        // Silence on a link we probed: an original peer that dropped our hello.
        let mut probe = LinkReader::new(Role::Probe, from(), false, at(base, 0), &rules);
        let mut out = Outputs::default();
        probe.handle_timeout(at(base, 10_000), &rules, &mut out);
        assert!(matches!(out.reports.as_slice(), [Report::ProbeRejected]));
        assert_eq!(out.end, Some(End::Quietly));
        // Silence on a link we accepted: an original peer that has not typed yet.
        let mut accepted = LinkReader::new(Role::Accepted, from(), false, at(base, 0), &rules);
        let mut out = Outputs::default();
        accepted.handle_timeout(at(base, 10_000), &rules, &mut out);
        assert!(matches!(out.reports.as_slice(), [Report::Original]));
        assert_eq!(out.end, None);
        // Original bytes first: its name and its line.
        let mut talking = LinkReader::new(Role::Accepted, from(), false, at(base, 0), &rules);
        let mut out = Outputs::default();
        talking.read_buffer().expect("reading").extend_from_slice(b"<bo> :: hello");
        talking.handle_read(at(base, 1), &rules, false, &mut out);
        assert!(matches!(out.reports.as_slice(), [Report::Original, Report::Renamed { name }] if name == "bo"));
        assert_eq!(shown_texts(&out), vec![("hello".to_owned(), false)]);
    }

    #[test]
    fn both_ends_keep_the_same_one_of_two_links() {
        // Link 1 was dialled by `a`, link 2 by `b`; each end holds one and then sees the other.
        for (a, b) in [("a1", "b2"), ("b2", "a1")] {
            // At `a`: it holds link 1 (outgoing) when link 2 (incoming) says hello.
            let a_keeps_link_2 = keeps_link(a, b, false, true);
            // At `b`: it holds link 2 (outgoing) when link 1 (incoming) says hello.
            let b_keeps_link_2 = !keeps_link(b, a, false, true);
            assert_eq!(a_keeps_link_2, b_keeps_link_2, "{a} and {b} keep the same link");
            assert_eq!(a_keeps_link_2, b < a, "the one dialled by the smaller session id");
        }
    }
}
