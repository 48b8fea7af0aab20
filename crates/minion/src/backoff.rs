//! Capped exponential backoff, for everything the minion retries against
//! the master: the link's reconnects, join requests, image pre-fetches.
//!
//! (A service's restarts follow their own schedule in [`crate::task`]: the
//! first one is immediate and the count is reported.)

use std::time::Duration;

/// The waits of one retry loop: `initial`, then each one `factor` times
/// the last, never more than `cap`; optionally scaled by a random factor
/// in [0.5, 1.5) so that many minions do not retry in step.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    factor: u32,
    cap: Duration,
    jitter: bool,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, factor: u32, cap: Duration) -> Self {
        Backoff {
            initial,
            factor,
            cap,
            jitter: false,
            next: initial.min(cap),
        }
    }

    /// Each wait scaled by a random factor in [0.5, 1.5).
    pub fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// The next wait; the one after grows by the factor, up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = base.saturating_mul(self.factor).min(self.cap);
        if self.jitter { jittered(base) } else { base }
    }

    /// Starts over from the initial wait (after a try that went well).
    pub fn reset(&mut self) {
        self.next = self.initial.min(self.cap);
    }
}

/// `base` scaled by a random factor in [0.5, 1.5).
fn jittered(base: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // Each RandomState is seeded afresh: a random number without a crate.
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    base.mul_f64(0.5 + (r % 1024) as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_grow_by_the_factor_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(100 * MS, 2, 500 * MS);
        let waits: Vec<Duration> = (0..6).map(|_| b.next_wait()).collect();
        assert_eq!(
            waits,
            [100, 200, 400, 500, 500, 500].map(|ms| ms * MS).to_vec()
        );
        b.reset();
        assert_eq!(b.next_wait(), 100 * MS);
        assert_eq!(b.next_wait(), 200 * MS);
    }

    #[test]
    fn a_factor_of_one_waits_the_same_every_time() {
        let mut b = Backoff::new(30 * MS, 1, Duration::from_secs(60));
        assert!((0..5).all(|_| b.next_wait() == 30 * MS));
    }

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half_of_the_schedule() {
        let base = Duration::from_secs(10);
        let waits: Vec<Duration> = (0..50)
            .map(|_| Backoff::new(base, 2, base).with_jitter().next_wait())
            .collect();
        assert!(waits.iter().all(|w| *w >= base / 2 && *w < base * 3 / 2));
        assert!(waits.iter().any(|w| *w != waits[0]), "no jitter: {waits:?}");
        // The schedule under the jitter still grows and is capped.
        let mut b = Backoff::new(base, 2, base * 4).with_jitter();
        let third = (0..3).map(|_| b.next_wait()).last().unwrap();
        assert!(third >= base * 2 && third < base * 6, "{third:?}");
    }
}
