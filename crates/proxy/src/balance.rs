//! Load balancing: per-instance state shared across route tables, the
//! power-of-two-choices picker, passive health.
//!
//! Each request picks two distinct eligible instances at random and sends
//! to the one with fewer requests outstanding. That needs no global scan or
//! lock, adapts to slow instances as fast as "least outstanding" does, and
//! does not stampede the instance that was least loaded a moment ago (which
//! plain least-outstanding does when many requests decide at once on stale
//! counts).
//!
//! Eligible: healthy and not draining as the master says, and not marked
//! down. A failed connect marks an instance down for 1 s, doubling per
//! consecutive failure up to 5 s (`ProxyConfig::mark_down_*`); a successful
//! response clears it. When every instance of a route is marked down the
//! picker still tries them (a mark is a guess; answering 503 without trying
//! would turn a blip into an outage).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// What the proxy knows of one instance, shared by every route (and
/// every table) that lists it.
#[derive(Debug)]
pub(crate) struct InstanceState {
    pub id: String,
    pub addr: SocketAddr,
    healthy: AtomicBool,
    draining: AtomicBool,
    outstanding: AtomicU64,
    total: AtomicU64,
    failures: AtomicU64,
    /// Connect failures in a row.
    streak: AtomicU32,
    /// Milliseconds since the proxy's epoch; 0 when not marked down.
    down_until: AtomicU64,
    /// Woken whenever an instance's outstanding count drops to zero.
    idle: Arc<Notify>,
    /// Idle keep-alive connections to it.
    pub conns: crate::pool::Idle,
}

impl InstanceState {
    pub fn new(id: &str, addr: SocketAddr, idle: Arc<Notify>) -> Self {
        InstanceState {
            id: id.to_owned(),
            addr,
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            outstanding: AtomicU64::new(0),
            total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            streak: AtomicU32::new(0),
            down_until: AtomicU64::new(0),
            idle,
            conns: crate::pool::Idle::default(),
        }
    }

    pub fn set_flags(&self, healthy: bool, draining: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
        self.draining.store(draining, Ordering::SeqCst);
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    fn eligible(&self) -> bool {
        self.healthy() && !self.draining()
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::SeqCst)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Milliseconds until the down mark ends, if marked down at `now_ms`.
    pub fn down_for(&self, now_ms: u64) -> Option<u64> {
        let until = self.down_until.load(Ordering::Relaxed);
        (until > now_ms).then(|| until - now_ms)
    }

    /// A connect to this instance failed: count it and mark the instance
    /// down for `min` doubling per failure in a row, at most `max`.
    pub fn connect_failed(&self, now_ms: u64, min: Duration, max: Duration) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let streak = self.streak.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = min.saturating_mul(1 << streak).min(max);
        let until = now_ms + u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX / 2);
        self.down_until.fetch_max(until, Ordering::Relaxed);
    }

    /// A request failed after connecting (an error or a timeout).
    pub fn request_failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The instance answered: clear any down mark.
    pub fn succeeded(&self) {
        if self.streak.load(Ordering::Relaxed) != 0 {
            self.streak.store(0, Ordering::Relaxed);
        }
        if self.down_until.load(Ordering::Relaxed) != 0 {
            self.down_until.store(0, Ordering::Relaxed);
        }
    }
}

/// One request outstanding on an instance, until dropped.
#[derive(Debug)]
pub(crate) struct Outstanding {
    state: Arc<InstanceState>,
}

impl Outstanding {
    pub fn state(&self) -> &Arc<InstanceState> {
        &self.state
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        if self.state.outstanding.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.state.idle.notify_waiters();
        }
    }
}

/// Power of two choices over `loads`: two distinct indices drawn from `r`,
/// the less loaded wins (the first on a tie).
pub(crate) fn p2c(loads: &[u64], r: u64) -> Option<usize> {
    let n = loads.len() as u64;
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let i = (r % n) as usize;
            let mut j = ((r >> 32) % (n - 1)) as usize;
            if j >= i {
                j += 1;
            }
            Some(if loads[j] < loads[i] { j } else { i })
        }
    }
}

/// Picks an instance of `backends` for one request, skipping those in
/// `exclude`, and counts the request on it.
///
/// The count is taken before the final eligibility check, so a
/// [`drained`](crate::Proxy::drained) waiter that saw zero after setting an
/// instance draining can never be followed by a request on it.
pub(crate) fn pick(
    backends: &[Arc<InstanceState>],
    exclude: &[Arc<InstanceState>],
    now_ms: u64,
    mut random: impl FnMut() -> u64,
) -> Option<Outstanding> {
    let mut refused: Vec<&Arc<InstanceState>> = Vec::new();
    let skip = |s: &Arc<InstanceState>, refused: &[&Arc<InstanceState>]| {
        exclude.iter().any(|e| Arc::ptr_eq(e, s)) || refused.iter().any(|e| Arc::ptr_eq(e, s))
    };
    for _ in 0..=backends.len() {
        let mut pool: Vec<&Arc<InstanceState>> = backends
            .iter()
            .filter(|s| s.eligible() && s.down_for(now_ms).is_none() && !skip(s, &refused))
            .collect();
        if pool.is_empty() {
            pool = backends
                .iter()
                .filter(|s| s.eligible() && !skip(s, &refused))
                .collect();
        }
        let loads: Vec<u64> = pool.iter().map(|s| s.outstanding()).collect();
        let chosen = pool[p2c(&loads, random())?];
        chosen.outstanding.fetch_add(1, Ordering::SeqCst);
        let guard = Outstanding {
            state: chosen.clone(),
        };
        if chosen.eligible() {
            chosen.total.fetch_add(1, Ordering::Relaxed);
            return Some(guard);
        }
        // Set draining (or unhealthy) between the filter and the count.
        drop(guard);
        refused.push(chosen);
    }
    None
}

/// A cheap, lock-free random source (splitmix64 over an atomic counter);
/// load balancing needs spread, not secrecy.
#[derive(Debug)]
pub(crate) struct Random(AtomicU64);

impl Random {
    pub fn new() -> Self {
        use std::hash::{BuildHasher, RandomState};
        Random(AtomicU64::new(RandomState::new().hash_one(0x5eed_u64)))
    }

    pub fn next(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(port: u16) -> Arc<InstanceState> {
        Arc::new(InstanceState::new(
            "svc",
            SocketAddr::from(([127, 0, 0, 1], port)),
            Arc::new(Notify::new()),
        ))
    }

    #[test]
    fn p2c_prefers_the_less_loaded_of_two() {
        let rng = Random::new();
        for _ in 0..1000 {
            assert_eq!(p2c(&[10, 0], rng.next()), Some(1));
            assert_eq!(p2c(&[0, 10], rng.next()), Some(0));
        }
        assert_eq!(p2c(&[], 1), None);
        assert_eq!(p2c(&[7], 1), Some(0));
    }

    #[test]
    fn p2c_skews_uneven_load_toward_the_idle() {
        // Three instances, one idle: it is in the drawn pair 2/3 of the
        // time and wins every such pair; the two busy ones split the rest.
        let rng = Random::new();
        let mut wins = [0u32; 3];
        for _ in 0..30_000 {
            wins[p2c(&[5, 9, 0], rng.next()).unwrap()] += 1;
        }
        assert!((19_000..21_000).contains(&wins[2]), "{wins:?}");
        assert!((9_000..11_000).contains(&wins[0]), "{wins:?}");
        assert_eq!(wins[1], 0, "the busiest never wins a pair: {wins:?}");
    }

    #[test]
    fn pick_counts_and_spreads_and_the_guard_releases() {
        let a = state(1);
        let b = state(2);
        let backends = vec![a.clone(), b.clone()];
        let rng = Random::new();
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(pick(&backends, &[], 0, || rng.next()).unwrap());
        }
        // Each pick goes to the less loaded, so they stay even.
        assert_eq!((a.outstanding(), b.outstanding()), (5, 5));
        assert_eq!(a.total() + b.total(), 10);
        held.clear();
        assert_eq!((a.outstanding(), b.outstanding()), (0, 0));
    }

    #[test]
    fn pick_skips_unhealthy_draining_down_and_excluded() {
        let a = state(1);
        let b = state(2);
        let backends = vec![a.clone(), b.clone()];
        let rng = Random::new();
        a.set_flags(false, false);
        for _ in 0..20 {
            assert!(Arc::ptr_eq(
                pick(&backends, &[], 0, || rng.next()).unwrap().state(),
                &b
            ));
        }
        a.set_flags(true, true);
        for _ in 0..20 {
            assert!(Arc::ptr_eq(
                pick(&backends, &[], 0, || rng.next()).unwrap().state(),
                &b
            ));
        }
        a.set_flags(true, false);
        b.connect_failed(1000, Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(b.down_for(1000), Some(1000));
        for _ in 0..20 {
            assert!(Arc::ptr_eq(
                pick(&backends, &[], 1500, || rng.next()).unwrap().state(),
                &a
            ));
        }
        // Once the mark has passed, b is back.
        let mut saw_b = false;
        for _ in 0..20 {
            saw_b |= Arc::ptr_eq(
                pick(&backends, &[], 2001, || rng.next()).unwrap().state(),
                &b,
            );
        }
        assert!(saw_b);
        assert!(Arc::ptr_eq(
            pick(&backends, std::slice::from_ref(&a), 0, || rng.next())
                .unwrap()
                .state(),
            &b
        ));
        assert!(pick(&backends, &[a.clone(), b.clone()], 0, || rng.next()).is_none());
        a.set_flags(false, false);
        b.set_flags(true, true);
        assert!(pick(&backends, &[], 0, || rng.next()).is_none());
    }

    #[test]
    fn all_marked_down_are_still_tried() {
        let a = state(1);
        a.connect_failed(0, Duration::from_secs(1), Duration::from_secs(5));
        assert!(pick(std::slice::from_ref(&a), &[], 10, || 0).is_some());
    }

    #[test]
    fn mark_down_backs_off_and_success_clears_it() {
        let a = state(1);
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(5));
        a.connect_failed(0, min, max);
        assert_eq!(a.down_for(0), Some(1000));
        a.connect_failed(0, min, max);
        assert_eq!(a.down_for(0), Some(2000));
        a.connect_failed(0, min, max);
        a.connect_failed(0, min, max);
        assert_eq!(a.down_for(0), Some(5000));
        assert_eq!(a.failures(), 4);
        a.succeeded();
        assert_eq!(a.down_for(0), None);
        a.connect_failed(0, min, max);
        assert_eq!(a.down_for(0), Some(1000));
    }

    #[tokio::test]
    async fn the_last_release_wakes_idle_waiters() {
        let a = state(1);
        let guard = pick(std::slice::from_ref(&a), &[], 0, || 0).unwrap();
        let idle = a.idle.clone();
        let waiter = tokio::spawn(async move { idle.notified().await });
        tokio::task::yield_now().await;
        drop(guard);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
