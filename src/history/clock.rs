//! A hybrid logical clock: the order every p2pchat peer agrees on for a room's messages.
//!
//! A stamp is one `u64`: milliseconds since the Unix epoch in the high 48 bits and a counter in the low
//! 16. Each message is stamped by its author; sorting by `(stamp, id)` gives the same order everywhere.
//! A stamp is always greater than every stamp its author had seen, so a reply sorts after what it
//! answers even when the replier's wall clock is behind; and it stays close to wall-clock time, so
//! messages from unrelated peers interleave as they were said. Stamps from a clock more than
//! [`MAX_AHEAD_MS`] ahead of ours are not followed (one peer with a clock set to next year would
//! otherwise drag every peer's stamps there for good); such a message still sorts by its own stamp.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::protocol::{millis_of, stamp_at};

/// How far ahead of our wall clock another peer's stamp may be and still move our clock.
pub const MAX_AHEAD_MS: u64 = 60_000;

pub fn wall_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One peer's clock, shared by its actor (stamping what it sends) and its readers (following what
/// they receive); lock-free.
#[derive(Debug, Default)]
pub struct Clock {
    last: AtomicU64,
}

impl Clock {
    pub fn new() -> Self {
        Self::default()
    }

    /// A stamp for a new message, given the wall clock: greater than every stamp issued or seen.
    pub fn tick_at(&self, wall_ms: u64) -> u64 {
        let floor = stamp_at(wall_ms);
        let mut current = self.last.load(Ordering::Relaxed);
        loop {
            let next = floor.max(current + 1);
            match self.last.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(actual) => current = actual,
            }
        }
    }

    pub fn tick(&self) -> u64 {
        self.tick_at(wall_millis())
    }

    /// Another peer's stamp was received: our next stamps sort after it, unless it is too far ahead.
    pub fn observe_at(&self, stamp: u64, wall_ms: u64) {
        if millis_of(stamp) <= wall_ms + MAX_AHEAD_MS {
            self.last.fetch_max(stamp, Ordering::AcqRel);
        }
    }

    pub fn observe(&self, stamp: u64) {
        self.observe_at(stamp, wall_millis());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_grow_within_one_millisecond_and_follow_the_wall_clock() {
        let clock = Clock::new();
        let a = clock.tick_at(1_000);
        let b = clock.tick_at(1_000);
        assert!(b > a);
        assert_eq!(millis_of(b), 1_000);
        assert_eq!(clock.tick_at(2_000), stamp_at(2_000));
    }

    #[test]
    fn a_reply_sorts_after_what_it_answers_even_with_a_slow_wall_clock() {
        let (fast, slow) = (Clock::new(), Clock::new());
        let question = fast.tick_at(50_000);
        slow.observe_at(question, 20_000); // the replier's clock is 30 s behind
        let answer = slow.tick_at(20_001);
        assert!(answer > question);
    }

    #[test]
    fn a_clock_far_ahead_is_not_followed() {
        let clock = Clock::new();
        clock.observe_at(stamp_at(10_000 + MAX_AHEAD_MS + 1), 10_000);
        assert_eq!(millis_of(clock.tick_at(10_000)), 10_000);
    }

    #[test]
    fn no_stamp_is_issued_twice_across_threads() {
        let clock = std::sync::Arc::new(Clock::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let clock = clock.clone();
                std::thread::spawn(move || (0..10_000).map(|_| clock.tick_at(7)).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        assert_eq!(n, 40_000);
    }
}
