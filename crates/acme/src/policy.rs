//! When to order: renewal at two thirds of the lifetime, exponential backoff
//! after failures. Pure functions over [`HostState`], so they are tested
//! without a server.

use serde::{Deserialize, Serialize};

/// The first wait after a failed order.
pub const BACKOFF_MIN_MS: u64 = 60_000;
/// The longest wait after failed orders.
pub const BACKOFF_MAX_MS: u64 = 24 * 3600 * 1000;

/// What the manager remembers about one host across restarts (the
/// certificate's validity is also read back from the certificate itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostState {
    /// The stored certificate's notBefore, Unix ms.
    pub not_before: Option<u64>,
    /// The stored certificate's notAfter, Unix ms.
    pub not_after: Option<u64>,
    /// Failed orders since the last success.
    pub failures: u32,
    /// Why the last order failed (cleared by a success).
    pub last_error: Option<String>,
    /// After a failure: not before this time (Unix ms).
    pub retry_at: Option<u64>,
    /// When the last order ended, Unix ms.
    pub last_attempt: Option<u64>,
}

/// The time two thirds into `[not_before, not_after]`.
pub fn renew_at(not_before: u64, not_after: u64) -> u64 {
    let life = not_after.saturating_sub(not_before);
    not_before.saturating_add(life / 3 * 2 + (life % 3) * 2 / 3)
}

/// The least time between two orders for one host that succeed: a
/// certificate that comes back already due (a CA or a clock far off) is
/// not ordered again in a loop.
pub const MIN_RENEWAL_INTERVAL_MS: u64 = 10 * 60_000;

/// When the manager should next order for a host: the backoff's time after
/// a failure, else the renewal time of its certificate (but not within
/// [`MIN_RENEWAL_INTERVAL_MS`] of the last order), else `now` (no
/// certificate yet).
pub fn due_at(state: &HostState, now: u64) -> u64 {
    if state.failures > 0
        && let Some(t) = state.retry_at
    {
        return t;
    }
    match (state.not_before, state.not_after) {
        (Some(nb), Some(na)) => {
            let earliest = state
                .last_attempt
                .map_or(0, |t| t.saturating_add(MIN_RENEWAL_INTERVAL_MS));
            renew_at(nb, na).max(earliest)
        }
        _ => now,
    }
}

/// The wait after the `failures`-th failure in a row (1-based): 1 min
/// doubling up to 24 h, times a jitter factor between 0.8 and 1.2 from
/// `unit` (in [0, 1)), never over 24 h.
pub fn backoff_ms(failures: u32, unit: f64) -> u64 {
    let doublings = failures.saturating_sub(1).min(20);
    let base = BACKOFF_MIN_MS
        .saturating_mul(1u64 << doublings)
        .min(BACKOFF_MAX_MS);
    let factor = 0.8 + 0.4 * unit.clamp(0.0, 1.0);
    ((base as f64 * factor) as u64).min(BACKOFF_MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600 * 1000;

    #[test]
    fn renewal_is_two_thirds_into_the_lifetime() {
        assert_eq!(renew_at(0, 90 * DAY), 60 * DAY);
        assert_eq!(renew_at(1000, 1000 + 3 * DAY), 1000 + 2 * DAY);
        assert_eq!(renew_at(0, 3), 2);
        assert_eq!(renew_at(5, 5), 5);
        // A notAfter before notBefore (a broken certificate) is due at once.
        assert_eq!(renew_at(10, 5), 10);
        assert_eq!(renew_at(0, u64::MAX), u64::MAX / 3 * 2);
    }

    #[test]
    fn due_time_is_backoff_then_renewal_then_now() {
        let now = 50 * DAY;
        assert_eq!(due_at(&HostState::default(), now), now);
        let valid = HostState {
            not_before: Some(40 * DAY),
            not_after: Some(130 * DAY),
            ..HostState::default()
        };
        assert_eq!(due_at(&valid, now), 100 * DAY);
        // A certificate that came back already due is not ordered again at
        // once.
        let due_at_birth = HostState {
            not_before: Some(now - 10 * DAY),
            not_after: Some(now + 2 * DAY),
            last_attempt: Some(now - 1000),
            ..HostState::default()
        };
        assert_eq!(
            due_at(&due_at_birth, now),
            now - 1000 + MIN_RENEWAL_INTERVAL_MS
        );
        let due_long_after = HostState {
            last_attempt: Some(now - 20 * DAY),
            ..due_at_birth
        };
        assert_eq!(due_at(&due_long_after, now), now - 2 * DAY);
        let failed = HostState {
            failures: 2,
            retry_at: Some(now + 120_000),
            last_error: Some("x".into()),
            ..valid.clone()
        };
        assert_eq!(due_at(&failed, now), now + 120_000);
        let failed_without_cert = HostState {
            not_before: None,
            not_after: None,
            ..failed
        };
        assert_eq!(due_at(&failed_without_cert, now), now + 120_000);
    }

    #[test]
    fn backoff_doubles_from_a_minute_to_a_day_with_jitter() {
        assert_eq!(backoff_ms(1, 0.5), 60_000);
        assert_eq!(backoff_ms(2, 0.5), 120_000);
        assert_eq!(backoff_ms(3, 0.5), 240_000);
        assert_eq!(backoff_ms(1, 0.0), 48_000);
        assert_eq!(backoff_ms(1, 0.999_999), 71_999);
        assert_eq!(backoff_ms(11, 0.5), 61_440_000);
        for n in 12..200 {
            for unit in [0.0, 0.5, 0.999] {
                let d = backoff_ms(n, unit);
                assert!(d <= BACKOFF_MAX_MS, "{n}: {d}");
                assert!(d >= BACKOFF_MAX_MS * 8 / 10, "{n}: {d}");
            }
        }
        // Jitter spreads hosts that failed together.
        assert_ne!(backoff_ms(5, 0.1), backoff_ms(5, 0.9));
    }
}
