//! The measurements that do not depend on the supervisor: crash-and-restart
//! through testy's `--announce` datagrams.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{Announce, Summary, kill, now_ns, summarize};

/// A supervised testy that announces its starts on its own UDP socket.
pub struct Target {
    pub name: String,
    /// Its $PORT.
    pub port: u16,
    pub announce: Announce,
    pub pid: u32,
    /// When its current process announced itself (None: never restarted).
    pub restarted: Option<Instant>,
}

impl Target {
    pub fn new(name: String, port: u16) -> Result<Self> {
        Ok(Target {
            name,
            port,
            announce: Announce::new()?,
            pid: 0,
            restarted: None,
        })
    }
}

/// Waits for every target's first `started` datagram (its initial pid).
pub fn first_starts(targets: &mut [Target], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for t in targets {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let s = t
            .announce
            .recv(left)
            .with_context(|| format!("{} did not start", t.name))?;
        t.pid = s.pid;
    }
    Ok(())
}

/// SIGKILLs a target's process; milliseconds from just before the kill to
/// the timestamp in its successor's `started` datagram.
pub fn crash(t: &mut Target) -> Result<f64> {
    t.announce.drain();
    let t0 = now_ns();
    if !kill(t.pid, libc::SIGKILL) {
        bail!(
            "cannot kill {} (pid {}): {}",
            t.name,
            t.pid,
            std::io::Error::last_os_error()
        );
    }
    let s = t
        .announce
        .recv(Duration::from_secs(15))
        .with_context(|| format!("{} was not restarted after SIGKILL", t.name))?;
    if s.pid == t.pid {
        bail!("{} announced the killed pid {} again", t.name, s.pid);
    }
    t.pid = s.pid;
    t.restarted = Some(Instant::now());
    Ok((s.at_ns - t0) as f64 / 1e6)
}

pub struct RestartPlan {
    /// Crashes to measure.
    pub crashes: usize,
    /// Least time between a service's restart and its next crash (Phoenix
    /// counts a run of 10 s as stable and resets its backoff).
    pub gap: Duration,
    /// Pause before each crash, so that the supervisor is idle when it comes.
    pub spacing: Duration,
    /// Give up on further crashes after this long.
    pub budget: Duration,
}

#[derive(Default, Clone, Debug)]
pub struct RestartResult {
    pub first: Summary,
    pub repeat: Summary,
    /// The `first` samples, in milliseconds.
    pub samples: Vec<f64>,
    /// Independent lanes the crashes ran in (one per supervisor instance).
    pub lanes: usize,
    /// Fewer crashes than planned: the budget ran out.
    pub truncated: bool,
    pub elapsed: Duration,
}

/// The services of one supervisor instance: crashed one at a time.
pub struct Lane {
    pub targets: Vec<Target>,
    pub repeat_targets: Vec<Target>,
}

/// Runs the crash schedule in every lane at once (each lane on its own
/// supervisor instance, one crash at a time), `plan.crashes` in all.
pub fn restart_test(label: &str, lanes: &mut [Lane], plan: &RestartPlan) -> Result<RestartResult> {
    let start = Instant::now();
    let n = lanes.len().max(1);
    let results: Vec<Result<LaneResult>> = thread::scope(|s| {
        let handles: Vec<_> = lanes
            .iter_mut()
            .enumerate()
            .map(|(i, lane)| {
                let crashes = plan.crashes / n + usize::from(i < plan.crashes % n);
                s.spawn(move || {
                    let quiet = i > 0;
                    run_lane(label, lane, crashes, plan, quiet)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a crash lane panicked")))
            })
            .collect()
    });
    let (mut samples, mut repeats, mut truncated) = (Vec::new(), Vec::new(), false);
    for r in results {
        let (f, rep, t) = r?;
        samples.extend(f);
        repeats.extend(rep);
        truncated |= t;
    }
    Ok(RestartResult {
        first: summarize(&samples),
        repeat: summarize(&repeats),
        samples,
        lanes: lanes.len(),
        truncated,
        elapsed: start.elapsed(),
    })
}

/// A lane's crash samples, repeat-crash samples, and whether its budget ran out.
type LaneResult = (Vec<f64>, Vec<f64>, bool);

/// One lane: crashes its targets in rotation, each at most once per
/// `plan.gap`; then crashes each of its repeat targets twice, 1.5 s apart.
fn run_lane(
    label: &str,
    lane: &mut Lane,
    crashes: usize,
    plan: &RestartPlan,
    quiet: bool,
) -> Result<LaneResult> {
    let start = Instant::now();
    let mut samples = Vec::with_capacity(crashes);
    let mut truncated = false;
    let mut last_report = Instant::now();
    let targets = &mut lane.targets;
    if targets.is_empty() && crashes > 0 {
        anyhow::bail!("{label}: a lane has no services to crash");
    }
    for i in 0..crashes {
        if start.elapsed() > plan.budget {
            crate::say!(
                "{label}: the {} s budget ran out after {i} of {crashes} crashes in a lane",
                plan.budget.as_secs(),
            );
            truncated = true;
            break;
        }
        let k = targets.len();
        let t = &mut targets[i % k];
        if let Some(at) = t.restarted {
            let due = at + plan.gap;
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
        }
        thread::sleep(plan.spacing);
        samples.push(crash(t)?);
        if !quiet && last_report.elapsed() > Duration::from_secs(15) {
            let s = summarize(&samples);
            crate::say!(
                "{label}: {}/{crashes} crashes in the first lane, p50 so far {:.1} ms",
                samples.len(),
                s.p50
            );
            last_report = Instant::now();
        }
    }
    // The backoff case: crash services that never crashed (first crash,
    // restarted at once by both), then crash each again 1.5 s after that
    // restart: inside Phoenix's 10 s window, so its backoff applies; past
    // supervisord's startsecs=0, so its does not.
    for t in lane.repeat_targets.iter_mut() {
        thread::sleep(plan.spacing);
        crash(t)?;
    }
    let mut repeats = Vec::with_capacity(lane.repeat_targets.len());
    for t in lane.repeat_targets.iter_mut() {
        let since = t.restarted.map_or(Duration::ZERO, |at| at.elapsed());
        if since < Duration::from_millis(1500) {
            thread::sleep(Duration::from_millis(1500) - since);
        }
        thread::sleep(plan.spacing);
        let since = t.restarted.map_or(Duration::ZERO, |at| at.elapsed());
        if since > Duration::from_secs(9) {
            crate::say!(
                "{label}: {} ran {:.1} s before its second crash; it may count as stable",
                t.name,
                since.as_secs_f64()
            );
        }
        repeats.push(crash(t)?);
    }
    Ok((samples, repeats, truncated))
}
