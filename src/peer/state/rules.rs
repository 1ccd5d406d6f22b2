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
//! * **History** parts pass only messages fit for our room ([`history::acceptable`]) and, in private
//!   rooms, signed by their author's key; the state then checks they answer our request.
//! * **A name** (`nick`, a relayed member's name) must be a valid name.
//! * **Relay frames** need a valid address; the state checks who may relay.
//! * **Hellos** are judged by the state ([`super::PeerState`]): version, room, identity proof on
//!   private links, and the duplicate rule ([`keeps_link`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::ids::Ids;
use super::link::{End, Outputs};
use super::Report;
use crate::history::clock::Clock;
use crate::peer::history;
use crate::peer::seen::SeenIds;
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

    /// Whether `id` is shown for the first time (and remember it).
    fn first_time(&self, id: &str) -> bool {
        self.seen.lock().map(|mut seen| seen.first_time(id)).unwrap_or(true)
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
    /// Its hello came.
    pub greeted: &'a mut bool,
    /// It said `bye`.
    pub said_bye: &'a mut bool,
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

/// In a private room, whether a live message is its author's (see `trust::check_author`) and recent.
fn authentic_and_fresh(chat: &Chat, now: Now, rules: &LinkRules) -> Result<(), String> {
    let Some(authors) = &rules.authors else { return Ok(()) };
    trust::check_author(chat, &rules.room, authors)?;
    if now.wall_ms.abs_diff(chat.ts) > FRESH_FOR_MS {
        return Err(format!(
            "a message from {:?} sent at a time more than 10 minutes from ours (a replay?)",
            chat.from
        ));
    }
    Ok(())
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
            out.reports.push(Report::Hello(hello));
        }
        Frame::Error { code, message } => {
            out.reports.push(Report::Refused { code, message });
            return Some(End::Closed { reason: "refused".to_owned(), clean: false });
        }
        _ if !*link.greeted => return Some(End::Closed { reason: "spoke before its hello".to_owned(), clean: false }),
        Frame::Msg(mut chat) => {
            unverified(&mut chat, rules);
            if chat.room != rules.room || chat::validate_text(&chat.text).is_err() {
                log::debug!("ignoring a message from {from} for room {:?} or with an invalid text", chat.room);
                return None;
            }
            if let Err(why) = authentic_and_fresh(&chat, now, rules) {
                link.drops.tell(format!("dropped {why}, passed on by {from}"), from, &mut out.to_show);
                return None;
            }
            let first_time = rules.first_time(&chat.id);
            let (shown, notice) =
                if first_time { link.flood.admit(now.at, from, Some(&chat.from)) } else { (false, None) };
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
                out.to_log.push(history::chat_to_record(&chat));
                out.to_show.push(Event::Message(super::link::shown(chat, from, now, false)));
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
                .filter(|m| history::acceptable(m, &rules.room) && authentic(m))
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
        Frame::RelayAsk { peer } => out.reports.push(Report::RelayAsked { peer }),
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
