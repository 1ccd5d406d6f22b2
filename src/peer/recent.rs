//! Anti-entropy: what each side of a new link lacks of the room's recent messages, told cheaply.
//!
//! Every p2pchat message shown (live, caught up, or our own) is noted here by its stamp and id,
//! for the last [`HORIZON_MS`] of the room's clock and at most [`KEPT`] messages. When a link to a
//! member comes up, for any reason (a join, a redial, a relay, a healed partition), each side sends
//! a [`Summary`]: per [`BUCKET_MS`] of stamps, how many messages it holds and the XOR of their
//! ids. A few hundred bytes cover ten busy minutes. Each side compares the other's summary with its
//! own and asks for the messages after the first bucket where the other side holds something it
//! does not hold the same of (the history request every member already answers); what it already
//! has is logged and shown once only. So a line said while a member could not be reached (during
//! its join, while a relay was being set up, across a partition) reaches it as soon as any link
//! opens.
//!
//! A single level of range reconciliation (negentropy's first round, without recursion): a bucket
//! that differs is sent whole. Buckets are short and differences sit at the recent end, so that is
//! a few messages, and a room's history within the horizon at worst.

use std::collections::BTreeSet;

use crate::protocol::millis_of;

/// How far back a summary reaches, in the room's milliseconds.
pub const HORIZON_MS: u64 = 10 * 60 * 1000;
/// The most messages noted (a busy room's horizon is shorter).
pub const KEPT: usize = 1000;
/// The span of stamps one bucket covers.
pub const BUCKET_MS: u64 = 10_000;

/// One side's recent messages, as the other side is told them: from `since` (a bucket's start, in
/// stamp milliseconds), each non-empty bucket's start, count and XOR of its ids' keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub since: u64,
    pub buckets: Vec<(u64, u32, u64)>,
}

/// The messages noted, by (stamp, key of id).
#[derive(Debug, Default)]
pub struct Recent {
    noted: BTreeSet<(u64, u64)>,
}

/// A message id's key: its first 16 hex digits (ids are random), or a hash of anything else.
fn key(id: &str) -> u64 {
    match id.get(..16).and_then(|head| u64::from_str_radix(head, 16).ok()) {
        Some(key) => key,
        None => id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)),
    }
}

fn bucket_of(stamp: u64) -> u64 {
    millis_of(stamp) / BUCKET_MS * BUCKET_MS
}

impl Recent {
    /// A message with this stamp and id was shown (or said) here.
    pub fn note(&mut self, stamp: u64, id: &str) {
        self.noted.insert((stamp, key(id)));
        while self.noted.len() > KEPT {
            self.noted.pop_first();
        }
    }

    /// The start of the horizon at `now_ms`, never before the oldest complete bucket kept.
    fn since(&self, now_ms: u64) -> u64 {
        let horizon = bucket_of(crate::protocol::stamp_at(now_ms.saturating_sub(HORIZON_MS)));
        match (self.noted.len() >= KEPT, self.noted.first()) {
            // Full: the oldest bucket may have lost some of its messages to the bound.
            (true, Some(&(oldest, _))) => horizon.max(bucket_of(oldest) + BUCKET_MS),
            _ => horizon,
        }
    }

    /// What we hold from the horizon on, for the other side of a new link.
    pub fn summary(&self, now_ms: u64) -> Summary {
        let since = self.since(now_ms);
        Summary { since, buckets: self.buckets_from(since) }
    }

    fn buckets_from(&self, since: u64) -> Vec<(u64, u32, u64)> {
        let mut buckets: Vec<(u64, u32, u64)> = Vec::new();
        for &(stamp, key) in self.noted.range((crate::protocol::stamp_at(since), 0)..) {
            let at = bucket_of(stamp);
            match buckets.last_mut() {
                Some((last, count, xor)) if *last == at => {
                    *count += 1;
                    *xor ^= key;
                }
                _ => buckets.push((at, 1, key)),
            }
        }
        buckets
    }

    /// Where to ask the other side for messages from (a stamp), given its summary: the start of the
    /// first bucket, within both horizons, where it holds messages and not the same ones as we do.
    pub fn lacking(&self, theirs: &Summary, now_ms: u64) -> Option<u64> {
        let since = self.since(now_ms).max(theirs.since);
        let ours = self.buckets_from(since);
        theirs
            .buckets
            .iter()
            .filter(|(at, count, _)| *at >= since && *count > 0)
            .find(|bucket| !ours.contains(bucket))
            .map(|(at, _, _)| crate::protocol::stamp_at(*at))
    }

    /// Messages noted (for the simulator's bounds check).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.noted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::stamp_at;

    const NOW: u64 = 1_750_000_000_000;

    fn id(n: u64) -> String {
        format!("{n:016x}{:016x}", n.wrapping_mul(7))
    }

    #[test]
    fn the_same_messages_make_the_same_summary_and_nothing_is_asked() {
        let (mut a, mut b) = (Recent::default(), Recent::default());
        for n in 0..50 {
            let stamp = stamp_at(NOW - 300_000 + n * 3_000);
            a.note(stamp, &id(n));
            b.note(stamp, &id(n));
        }
        assert_eq!(a.summary(NOW), b.summary(NOW));
        assert!(a.summary(NOW).buckets.len() <= 31, "a few buckets for five minutes");
        assert_eq!(a.lacking(&b.summary(NOW), NOW), None);
    }

    #[test]
    fn the_side_that_lacks_a_message_asks_from_its_bucket_and_the_other_does_not() {
        let (mut has, mut lacks) = (Recent::default(), Recent::default());
        for n in 0..20 {
            let stamp = stamp_at(NOW - 200_000 + n * 5_000);
            has.note(stamp, &id(n));
            if n != 12 {
                lacks.note(stamp, &id(n));
            }
        }
        let missing_at = stamp_at(bucket_of(stamp_at(NOW - 200_000 + 12 * 5_000)));
        assert_eq!(lacks.lacking(&has.summary(NOW), NOW), Some(missing_at));
        // The fuller side may not tell which side lacks what; it asks only where the other holds
        // something, here the same bucket (a few messages it already has, logged once).
        assert_eq!(has.lacking(&lacks.summary(NOW), NOW), Some(missing_at));
        let empty = Recent::default();
        assert_eq!(has.lacking(&empty.summary(NOW), NOW), None, "a newcomer holds nothing to ask for");
        assert!(empty.lacking(&has.summary(NOW), NOW).is_some());
    }

    #[test]
    fn what_is_older_than_either_horizon_is_never_asked_for_and_the_bound_holds() {
        let (mut old, young) = (Recent::default(), Recent::default());
        old.note(stamp_at(NOW - HORIZON_MS - 60_000), &id(1));
        assert_eq!(young.lacking(&old.summary(NOW), NOW), None);
        // Their summary reaches further back (their clock is behind): only the common span counts.
        let mut behind = Recent::default();
        behind.note(stamp_at(NOW - HORIZON_MS - 20_000), &id(2));
        assert_eq!(young.lacking(&behind.summary(NOW - 30_000), NOW), None);
        let mut full = Recent::default();
        for n in 0..(KEPT as u64 + 500) {
            full.note(stamp_at(NOW - 100_000 + n * 10), &id(n));
        }
        assert_eq!(full.len(), KEPT);
        let summary = full.summary(NOW);
        assert!(summary.since > bucket_of(stamp_at(NOW - 100_000)), "the bucket cut by the bound is left out");
    }
}
