//! Answers to our history requests as they come in, with no I/O: what to log, what to show, and when
//! the join stops holding the room back.
//!
//! Each request we send gets a [`Receipt`]. Its parts go to the log first ([`Job::Ingest`]); the log
//! says which messages were new to it, and of those the ones not shown live this session are shown,
//! marked as history ([`Job::Show`]). The join's own request holds the application's live events back
//! (see `peer::Events`) until it is complete, or until its first part is late
//! (`HistoryConfig::first_part_wait`): then [`Event::HistorySynced`] is told at once and the rest
//! comes as it comes. An answer that does not finish within `answer_wait` is given up.
//!
//! The driver runs one task per receipt that carries out its jobs in order (so a part is logged
//! before it is shown, and `HistorySynced` comes after every message shown before it), with
//! backpressure from the application's event queue.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::peer::sync::Purpose;
use crate::peer::types::LinkId;
use crate::peer::{Event, Message};
use crate::wire::frames::Chat;

/// Parts of one answer being logged at once, at most: a member that sends parts faster than the log
/// takes them has the rest of its answer dropped.
pub const MAX_INGESTING: usize = 64;

/// Work for the task that takes one answer in.
#[derive(Debug)]
pub enum Job {
    /// Log these messages and report which were new to the log (`PeerState::history_ingested`).
    Ingest(Vec<Chat>),
    /// Show these to the application, in order.
    Show(Vec<Message>),
    /// Tell the application this (the join's history is in, or how many came late).
    Tell(Event),
}

/// One request of ours being answered.
#[derive(Debug)]
pub struct Receipt {
    from: SocketAddr,
    purpose: Purpose,
    /// Shown so far.
    received: usize,
    /// The join holds the room back until this answer is in.
    holding: bool,
    /// A part came.
    answering: bool,
    first_part_by: Instant,
    done_by: Instant,
    /// Parts sent to the log and not reported back yet.
    ingesting: usize,
    /// No part will come any more (the last came, the link is gone, or it took too long).
    no_more: bool,
}

/// What became of a part handed to [`Receipts::part`].
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Sent to the log.
    Ingesting,
    /// Nothing to log in it.
    Empty,
    /// Too many parts are being logged already: the rest of the answer is dropped.
    Overflow,
}

/// A receipt's key: the link its request went out on, and the request's number.
pub type Key = (LinkId, u32);

/// What [`Receipts::expire`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// The join's answers whose first part is late: the room is shown now (`HistorySynced`).
    pub released: Vec<Key>,
    /// Answers past their time: no more of them is taken.
    pub late: Vec<Key>,
}

/// Every receipt, by link and request number.
#[derive(Debug)]
pub struct Receipts {
    open: BTreeMap<Key, Receipt>,
    /// How long the join waits for an answer's first part, and any answer for its last.
    first_part_wait: Duration,
    answer_wait: Duration,
}

impl Receipts {
    pub fn new(first_part_wait: Duration, answer_wait: Duration) -> Self {
        Self { open: BTreeMap::new(), first_part_wait, answer_wait }
    }

    /// Answers open, and the most parts one of them has in the log's hands (for the simulator's
    /// bounds check).
    #[cfg(test)]
    pub fn sizes(&self) -> (usize, usize) {
        (self.open.len(), self.open.values().map(|r| r.ingesting).max().unwrap_or(0))
    }

    /// Request `req` went out on `link` to `from`.
    /// The join's answer is still coming in, or being logged.
    pub fn join_open(&self) -> bool {
        self.open.values().any(|r| r.purpose.is_join_history())
    }

    pub fn asked(&mut self, link: LinkId, req: u32, from: SocketAddr, purpose: Purpose, now: Instant) {
        let (first_part_wait, answer_wait) = (self.first_part_wait, self.answer_wait);
        let receipt = Receipt {
            from,
            purpose,
            received: 0,
            holding: purpose == Purpose::Join,
            answering: false,
            first_part_by: now + first_part_wait.min(answer_wait),
            done_by: now + answer_wait,
            ingesting: 0,
            no_more: false,
        };
        self.open.insert((link, req), receipt);
    }

    /// A part came (`msgs` may be empty; `last`: no more will come).
    pub fn part(&mut self, link: LinkId, req: u32, has_msgs: bool, last: bool) -> Taken {
        let Some(receipt) = self.open.get_mut(&(link, req)) else { return Taken::Empty };
        receipt.answering = true;
        receipt.no_more |= last;
        if !has_msgs {
            return Taken::Empty;
        }
        if receipt.ingesting >= MAX_INGESTING {
            receipt.no_more = true;
            return Taken::Overflow;
        }
        receipt.ingesting += 1;
        Taken::Ingesting
    }

    /// Where the answer to `req` on `link` comes from, while it is open.
    pub fn from(&self, link: LinkId, req: u32) -> Option<SocketAddr> {
        self.open.get(&(link, req)).map(|r| r.from)
    }

    /// The log took a part; `shown` of its messages are shown.
    pub fn ingested(&mut self, link: LinkId, req: u32, shown: usize) {
        if let Some(receipt) = self.open.get_mut(&(link, req)) {
            receipt.ingesting = receipt.ingesting.saturating_sub(1);
            receipt.received += shown;
        }
    }

    /// No more parts will come on `link` (it is gone, or its answer was dropped).
    pub fn link_done(&mut self, link: LinkId) {
        for ((_, _), receipt) in self.open.range_mut((link, 0)..=(link, u32::MAX)) {
            receipt.no_more = true;
        }
    }

    /// The earliest time a receipt needs [`Self::expire`].
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open
            .values()
            .filter_map(|r| match (r.holding && !r.answering, r.no_more) {
                (true, _) => Some(r.first_part_by),
                (false, false) => Some(r.done_by),
                (false, true) => None,
            })
            .min()
    }

    /// Time passed: the join stops holding the room back for a late first part (`HistorySynced`
    /// for each, to tell at once); answers past their time get no more parts (their links, to stop
    /// asking for them).
    pub fn expire(&mut self, now: Instant) -> Expired {
        let mut expired = Expired::default();
        for (key, receipt) in &mut self.open {
            if receipt.holding && !receipt.answering && now >= receipt.first_part_by && now < receipt.done_by {
                log::info!("{} is slow to send history; showing the room now, its history when it comes", receipt.from);
                receipt.holding = false;
                expired.released.push(*key);
            }
            if now >= receipt.done_by && !receipt.no_more {
                receipt.no_more = true;
                expired.late.push(*key);
            }
        }
        expired
    }

    /// The receipts that are complete, with what to tell the application last: `HistorySynced` for
    /// the join's, or a notice of how many came late.
    pub fn finished(&mut self) -> Vec<(Key, Option<Event>)> {
        let done: Vec<Key> =
            self.open.iter().filter(|(_, r)| r.no_more && r.ingesting == 0).map(|(key, _)| *key).collect();
        done.into_iter()
            .filter_map(|key| self.open.remove(&key).map(|r| (key, r)))
            .map(|(key, r)| {
                let last = if r.holding {
                    Some(Event::HistorySynced { received: r.received })
                } else if r.received > 0 {
                    let (n, from) = (r.received, r.from);
                    let text = match r.purpose {
                        Purpose::Join | Purpose::Late => format!("{n} earlier message(s) arrived late from {from}"),
                        Purpose::CatchUp => format!("caught up: {n} message(s) said while the link to {from} was down"),
                    };
                    Some(Event::Notice { text })
                } else {
                    None
                };
                (key, last)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    #[test]
    fn the_joins_answer_ends_with_history_synced_after_its_last_part_is_logged() {
        let (now, mut receipts) = (Instant::now(), Receipts::new(Duration::from_secs(3), Duration::from_secs(10)));
        receipts.asked(1, 7, addr(), Purpose::Join, now);
        assert_eq!(receipts.part(1, 7, true, false), Taken::Ingesting);
        assert_eq!(receipts.part(1, 7, true, true), Taken::Ingesting);
        assert!(receipts.finished().is_empty(), "two parts still being logged");
        receipts.ingested(1, 7, 3);
        assert!(receipts.finished().is_empty(), "one part still being logged");
        receipts.ingested(1, 7, 2);
        let done = receipts.finished();
        assert!(matches!(done.as_slice(), [((1, 7), Some(Event::HistorySynced { received: 5 }))]), "{done:?}");
    }

    #[test]
    fn a_late_first_part_releases_the_room_and_the_rest_ends_with_a_notice() {
        let (now, mut receipts) = (Instant::now(), Receipts::new(Duration::from_secs(3), Duration::from_secs(10)));
        receipts.asked(1, 7, addr(), Purpose::Join, now);
        assert_eq!(receipts.next_deadline(), Some(now + Duration::from_secs(3)));
        assert_eq!(receipts.expire(now + Duration::from_secs(2)), Expired::default());
        assert_eq!(receipts.expire(now + Duration::from_secs(3)), Expired { released: vec![(1, 7)], late: vec![] });
        assert_eq!(receipts.next_deadline(), Some(now + Duration::from_secs(10)));
        receipts.part(1, 7, true, true);
        receipts.ingested(1, 7, 4);
        let done = receipts.finished();
        assert!(matches!(done.as_slice(), [((1, 7), Some(Event::Notice { .. }))]), "{done:?}");
    }

    #[test]
    fn an_answer_that_never_finishes_is_given_up_and_a_gone_link_ends_its_answer() {
        let (now, mut receipts) = (Instant::now(), Receipts::new(Duration::from_secs(3), Duration::from_secs(10)));
        receipts.asked(1, 7, addr(), Purpose::CatchUp, now);
        receipts.asked(2, 8, addr(), Purpose::CatchUp, now);
        receipts.part(1, 7, true, false);
        receipts.ingested(1, 7, 0);
        assert_eq!(receipts.expire(now + Duration::from_secs(10)).late, vec![(1, 7), (2, 8)]);
        let done = receipts.finished();
        assert!(
            matches!(done.as_slice(), [((1, 7), None), ((2, 8), None)]),
            "nothing shown, nothing to tell: {done:?}"
        );

        receipts.asked(3, 9, addr(), Purpose::CatchUp, now);
        receipts.link_done(3);
        assert_eq!(receipts.finished().len(), 1);
    }

    #[test]
    fn parts_faster_than_the_log_are_dropped_past_the_bound() {
        let (now, mut receipts) = (Instant::now(), Receipts::new(Duration::from_secs(3), Duration::from_secs(10)));
        receipts.asked(1, 7, addr(), Purpose::CatchUp, now);
        for _ in 0..MAX_INGESTING {
            assert_eq!(receipts.part(1, 7, true, false), Taken::Ingesting);
        }
        assert_eq!(receipts.part(1, 7, true, false), Taken::Overflow);
    }
}
