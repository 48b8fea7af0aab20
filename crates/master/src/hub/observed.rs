//! Observed state: what the minions report, kept in memory.
//!
//! Service statuses and each node's last contact, version, load and image
//! cache live under one lock: they arrive together on a link and are read
//! together by the views. Nothing here is durable; a restarted master learns
//! it again from the minions' full reports on reconnect.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use phoenix_model::proto::{ImageSync, ServiceView, Settled, Verdict};
use phoenix_model::spec::Duration as SpecDuration;
use phoenix_model::status::{NodeStats, ServiceState, ServiceStatus, now_ms};
use tokio::sync::watch;

use super::rollout::RolloutStage;
use super::{ApiError, Hub, desired_sets};
use crate::lock;
use crate::store::Service;

/// A machine disconnected this long during a wait makes its services'
/// verdict `unreachable`: long enough for a minion that is just connecting
/// (a restart) to come up, short enough to answer a deploy to a machine that
/// is down within a couple of seconds.
pub const UNREACHABLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a wait looks at reachability when nothing is reported.
const WAIT_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// What a wait is about for one service: its generation at the change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub generation: u64,
    pub oneshot: bool,
}

/// The names in `link` that no stored service has, sorted.
pub fn dangling_links(link: &[String], names: &HashSet<String>) -> Vec<String> {
    let mut dangling: Vec<String> = link
        .iter()
        .filter(|l| !names.contains(*l))
        .cloned()
        .collect();
    dangling.sort();
    dangling.dedup();
    dangling
}

/// The verdict on one service for a wait, from its last report and, when
/// its machine has been disconnected for [`UNREACHABLE_AFTER`], that
/// machine's name; with the reason for a failure.
///
/// The rules (the README's deploy section says them too):
/// - a daemon has settled once this generation runs: the minion reports
///   `running` only after a health check passed or, without one, after its
///   minimum uptime, so a service that exits at once never counts;
/// - a oneshot has settled once this generation ended: `exited` (status 0)
///   is success, `failed` is failure;
/// - `backoff` of this generation fails the wait at once: the minion
///   restarts a first crash immediately and backs off only from the second
///   consecutive one (or a start that failed twice: an exec error, an image
///   that cannot be fetched or unpacked), so a daemon that crashes once and
///   then runs still succeeds, while a crash loop fails within its first
///   two runs; so do `unhealthy` and `failed`;
/// - a running older generation whose status says this one is held back
///   (its new image cannot be fetched) fails the wait with that message;
/// - anything else is still waiting, unless the machine is unreachable.
///
/// A report of a newer generation than the one waited for (another change
/// came meanwhile) is judged as if it were the one.
pub fn judge(
    want: &Wanted,
    status: Option<&ServiceStatus>,
    unreachable: Option<&str>,
) -> (Verdict, Option<String>) {
    let waiting = |status: Option<&ServiceStatus>| match unreachable {
        Some(machine) => (
            Verdict::Unreachable,
            Some(match status {
                Some(s) if s.generation >= want.generation => format!(
                    "machine {machine:?} is unreachable (last known: {}); the change is stored \
                     and takes effect when the machine reconnects",
                    s.state.as_str()
                ),
                _ => format!(
                    "machine {machine:?} is unreachable; the change is stored and takes effect \
                     when the machine reconnects"
                ),
            }),
        ),
        None => (Verdict::Waiting, None),
    };
    let Some(s) = status else {
        return waiting(None);
    };
    if s.generation < want.generation {
        let held = format!("generation {} is held back", want.generation);
        return match &s.message {
            Some(m) if m.contains(&held) => (Verdict::Failed, Some(m.clone())),
            _ => waiting(Some(s)),
        };
    }
    let why = |fallback: String| Some(s.message.clone().unwrap_or(fallback));
    match s.state {
        ServiceState::Running if !want.oneshot => (Verdict::Running, None),
        ServiceState::Exited if want.oneshot => (Verdict::Exited, None),
        ServiceState::Failed => (
            Verdict::Failed,
            why(match s.last_exit {
                Some(e) => format!("exited with {e}"),
                None => "failed".into(),
            }),
        ),
        ServiceState::Backoff => (Verdict::Failed, why("backing off".into())),
        ServiceState::Unhealthy => (Verdict::Failed, why("unhealthy".into())),
        // Starting; a oneshot that runs; a daemon being stopped for the
        // change.
        ServiceState::Starting | ServiceState::Running | ServiceState::Exited => waiting(Some(s)),
    }
}

/// What a minion reported last about itself.
#[derive(Clone, Debug, Default)]
pub struct NodeSeen {
    pub last_seen: u64,
    pub version: Option<String>,
    pub stats: Option<NodeStats>,
    /// Its image cache, as last reported.
    pub images: Option<ImageSync>,
}

/// Everything the minions reported.
#[derive(Default)]
pub(super) struct Observed {
    /// instance key (the service's name, or `NAME.GENERATION` for a run
    /// an update started) → its last reported status.
    pub(super) statuses: HashMap<String, ServiceStatus>,
    /// node name → what it said about itself.
    seen: HashMap<String, NodeSeen>,
    /// Deleted services' runs their minion has not reported stopped yet:
    /// instance key → its node and the service's name.
    stopping: HashMap<String, (String, String)>,
}

impl Observed {
    fn seen_mut(&mut self, node: &str) -> &mut NodeSeen {
        let s = self.seen.entry(node.to_owned()).or_default();
        s.last_seen = now_ms();
        s
    }
}

pub(super) struct ObservedState {
    pub(super) state: Mutex<Observed>,
    /// Bumped whenever a reported status changes (for `wait` and the
    /// proxy's routes).
    pub(super) changes: watch::Sender<u64>,
}

impl Default for ObservedState {
    fn default() -> Self {
        ObservedState {
            state: Mutex::default(),
            changes: watch::channel(0).0,
        }
    }
}

impl Hub {
    /// A status report; `full` replaces all that is known of the node's
    /// services.
    pub fn report_status(&self, node: &str, services: Vec<ServiceStatus>, full: bool) {
        // Which services are the node's: the reconciler says (read before
        // taking the observed lock, which is never held with another).
        let mine: Vec<String> = if full {
            self.store()
                .read()
                .and_then(|tx| desired_sets(&tx))
                .map(|mut sets| sets.remove(node).unwrap_or_default().services)
                .map(|v| v.into_iter().map(|a| a.key().to_owned()).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        {
            let mut o = lock(&self.observed.state);
            for name in mine {
                o.statuses.remove(&name);
            }
            if full {
                // A full report that leaves out a service being stopped
                // says it is gone (its `Gone` may have been lost with a link).
                let reported: Vec<&str> = services.iter().map(ServiceStatus::key).collect();
                o.stopping
                    .retain(|key, (n, _)| n != node || reported.contains(&key.as_str()));
            }
            for s in services {
                o.statuses.insert(s.key().to_owned(), s);
            }
            o.seen_mut(node);
        }
        self.status_changed();
    }

    pub fn report_gone(&self, node: &str, names: Vec<String>) {
        {
            let mut o = lock(&self.observed.state);
            for n in names {
                o.statuses.remove(&n);
                if o.stopping.get(&n).is_some_and(|(on, _)| on == node) {
                    o.stopping.remove(&n);
                }
            }
            o.seen_mut(node);
        }
        self.status_changed();
    }

    pub fn report_images(&self, node: &str, images: ImageSync) {
        lock(&self.observed.state).seen_mut(node).images = Some(images);
    }

    pub fn report_node(&self, node: &str, stats: NodeStats) {
        lock(&self.observed.state).seen_mut(node).stats = Some(stats);
    }

    /// Notes that a node was heard from.
    pub fn touch(&self, node: &str) {
        lock(&self.observed.state).seen_mut(node);
    }

    pub(super) fn seen_connect(&self, node: &str, version: &str, at: u64) {
        let mut o = lock(&self.observed.state);
        let s = o.seen.entry(node.to_owned()).or_default();
        s.last_seen = at;
        s.version = Some(version.to_owned());
    }

    pub(super) fn forget_seen(&self, node: &str) {
        let mut o = lock(&self.observed.state);
        o.seen.remove(node);
        o.stopping.retain(|_, (n, _)| n != node);
    }

    /// Forgets a deleted service's status; [`Hub::wait_gone`] then waits
    /// for its minion to say it stopped it, if the minion has it: it
    /// reported the service, or it is connected and so was sent the set
    /// that held it (a service deleted a moment after its deploy may be
    /// starting there unreported). A full report that leaves it out also
    /// ends the wait, so a set lost with a link cannot hold it forever.
    pub(super) fn forget_status(&self, name: &str, key: &str, node: &str) {
        let connected = self.is_connected(node);
        let mut o = lock(&self.observed.state);
        if o.statuses.remove(key).is_some() || connected {
            o.stopping
                .insert(key.to_owned(), (node.to_owned(), name.to_owned()));
        } else {
            // Never reported, and no link to have sent it on.
            o.stopping.remove(key);
        }
    }

    /// The last status reported for a run, by instance key.
    pub(super) fn reported(&self, key: &str) -> Option<ServiceStatus> {
        lock(&self.observed.state).statuses.get(key).cloned()
    }

    /// What a node last said about itself (empty if nothing yet).
    pub fn seen(&self, node: &str) -> NodeSeen {
        lock(&self.observed.state)
            .seen
            .get(node)
            .cloned()
            .unwrap_or_default()
    }

    pub(super) fn all_seen(&self) -> HashMap<String, NodeSeen> {
        lock(&self.observed.state).seen.clone()
    }

    /// Wakes `wait`ers to look again.
    pub(super) fn status_changed(&self) {
        self.observed.changes.send_modify(|n| *n += 1);
    }

    pub fn status(&self, name: &str) -> Result<ServiceView, ApiError> {
        let (svc, names) = {
            let mut store = self.store();
            let tx = store.read()?;
            let svc = tx
                .service(name)?
                .ok_or_else(|| ApiError::no_service(name))?;
            (svc, tx.service_names()?)
        };
        Ok(self.view(&svc, &names))
    }

    pub fn services(&self) -> Result<Vec<ServiceView>, ApiError> {
        let services = self.store().read()?.services()?;
        let names: HashSet<String> = services.iter().map(|s| s.spec.name.clone()).collect();
        Ok(services.iter().map(|s| self.view(s, &names)).collect())
    }

    /// A service as `status` and `services` show it; `names` are every
    /// stored service's, for its dangling links.
    fn view(&self, svc: &Service, names: &HashSet<String>) -> ServiceView {
        let st = self.reported(svc.instance());
        let update = svc.next.as_ref().map(|next| {
            let st = self.reported(&next.run.instance);
            let state = st.as_ref().map_or("pending", |s| s.state.as_str());
            match st.and_then(|s| s.message) {
                Some(m) => format!(
                    "generation {} starting beside this one as {} on {}: {state} ({m})",
                    next.generation, next.run.instance, next.spec.machine
                ),
                None => format!(
                    "generation {} starting beside this one as {} on {}: {state}",
                    next.generation, next.run.instance, next.spec.machine
                ),
            }
        });
        let reachable = self.is_connected(&svc.spec.machine);
        // The version the registry holds now, against the one this runs.
        let registry = self.registry.entry(&svc.spec.registry_file().0);
        let current = registry
            .as_ref()
            .filter(|e| e.index.file_hash == svc.image_hash);
        let image_pushed_at = current.map(|e| {
            e.mtime
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        });
        let registry_hash = registry
            .filter(|e| e.index.file_hash != svc.image_hash)
            .map(|e| e.index.file_hash.clone());
        ServiceView {
            name: svc.spec.name.clone(),
            machine: svc.spec.machine.clone(),
            kind: svc.spec.kind.as_str().into(),
            duration: svc.spec.duration.as_str().into(),
            ip: svc.ip,
            image: svc.spec.image.clone(),
            image_hash: svc.image_hash.clone(),
            image_pushed_at,
            registry_hash,
            generation: svc.generation,
            state: st.as_ref().map_or("pending", |s| s.state.as_str()).into(),
            pid: st.as_ref().and_then(|s| s.pid),
            restarts: st.as_ref().map_or(0, |s| s.restarts),
            health: st.as_ref().map_or("-", |s| s.health.as_str()).into(),
            last_exit: st.as_ref().and_then(|s| s.last_exit),
            limits: st.as_ref().and_then(|s| s.limits.clone()),
            since: st.as_ref().map(|s| s.since),
            message: st.and_then(|s| s.message),
            node_reachable: reachable,
            dangling_links: dangling_links(&svc.spec.link, names),
            instance: svc.run.as_ref().map(|r| r.instance.clone()),
            update,
            note: self.note(svc),
        }
    }

    /// A VM on a minion that runs VMs under TCG is slow: said in its status.
    fn note(&self, svc: &Service) -> Option<String> {
        let tcg = svc.spec.kind == phoenix_model::spec::Kind::Vm
            && lock(&self.observed.state)
                .seen
                .get(&svc.spec.machine)
                .and_then(|n| n.stats.as_ref())
                .is_some_and(|s| s.vm_accel.as_deref() == Some("tcg"));
        tcg.then(|| phoenix_model::proto::TCG_NOTE.to_owned())
    }

    /// Waits until every named service has a verdict for its current
    /// generation ([`judge`]), or the timeout passes (an `unavailable`
    /// error naming where each one stands).
    pub async fn wait(
        &self,
        names: &[String],
        timeout: std::time::Duration,
    ) -> Result<Vec<Settled>, ApiError> {
        let mut changes = self.observed.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        // What each service's verdict is about, read from the store once:
        // the generation, and whether an update brings it up beside the
        // old one (then the verdict waits for the switch).
        let wanted: Vec<(Wanted, String, Option<String>)> = {
            let mut store = self.store();
            let tx = store.read()?;
            names
                .iter()
                .map(|n| {
                    let s = tx.service(n)?.ok_or_else(|| ApiError::no_service(n))?;
                    Ok(match &s.next {
                        Some(next) => (
                            Wanted {
                                generation: next.generation,
                                oneshot: false,
                            },
                            next.spec.machine.clone(),
                            None,
                        ),
                        // The run that serves it (not its name, after an
                        // update that started it).
                        None => (
                            Wanted {
                                generation: s.generation,
                                oneshot: s.spec.duration == SpecDuration::Oneshot,
                            },
                            s.spec.machine.clone(),
                            Some(s.instance().to_owned()),
                        ),
                    })
                })
                .collect::<Result<_, ApiError>>()?
        };
        // Machine → since when this wait has seen it disconnected.
        let mut disconnected: HashMap<String, tokio::time::Instant> = HashMap::new();
        loop {
            let now = tokio::time::Instant::now();
            // Where each update stands: whose status to judge, or its
            // verdict already (read before the observed lock).
            let stages: Vec<RolloutStage> = names
                .iter()
                .zip(&wanted)
                .map(|(name, (want, _, key))| match key {
                    Some(key) => RolloutStage::Judge(key.clone()),
                    None => self.rollout_stage(name, want.generation),
                })
                .collect();
            for (_, machine, _) in &wanted {
                if self.is_connected(machine) {
                    disconnected.remove(machine);
                } else {
                    disconnected.entry(machine.clone()).or_insert(now);
                }
            }
            let verdicts: Vec<(Verdict, Option<String>)> = {
                let o = lock(&self.observed.state);
                stages
                    .iter()
                    .zip(&wanted)
                    .map(|(stage, (want, machine, _))| {
                        let unreachable = disconnected
                            .get(machine)
                            .is_some_and(|since| now - *since >= UNREACHABLE_AFTER)
                            .then_some(machine.as_str());
                        match stage {
                            RolloutStage::Judge(key) => {
                                judge(want, o.statuses.get(key), unreachable)
                            }
                            RolloutStage::Starting => (Verdict::Waiting, None),
                            RolloutStage::Ended(verdict, reason) => (*verdict, reason.clone()),
                        }
                    })
                    .collect()
            };
            if verdicts.iter().all(|(v, _)| *v != Verdict::Waiting) {
                return names
                    .iter()
                    .zip(verdicts)
                    .zip(stages.iter().zip(&wanted))
                    .map(|((n, (verdict, reason)), (stage, (want, ..)))| {
                        let log_tail = matches!(stage, RolloutStage::Ended(..))
                            .then(|| self.failed_update_log(n, want.generation))
                            .flatten();
                        Ok(Settled {
                            view: self.status(n)?,
                            verdict,
                            reason,
                            log_tail,
                        })
                    })
                    .collect();
            }
            // Reachability is polled: a link that drops, or one that has
            // not come up, is noticed within a tick.
            let tick = now + WAIT_TICK;
            match tokio::time::timeout_at(deadline.min(tick), changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ApiError::Internal("the master is stopping".into())),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    let detail: Vec<String> = names
                        .iter()
                        .zip(&verdicts)
                        .filter(|(_, (v, _))| *v == Verdict::Waiting)
                        .map(|(n, _)| match self.status(n) {
                            Ok(v) => match v.message {
                                Some(m) => format!("{n} ({}: {m})", v.state),
                                None => format!("{n} ({})", v.state),
                            },
                            Err(_) => n.clone(),
                        })
                        .collect();
                    return Err(ApiError::Unavailable(format!(
                        "timed out after {} ms waiting for: {}",
                        timeout.as_millis(),
                        detail.join(", ")
                    )));
                }
                Err(_) => {}
            }
        }
    }

    /// Waits until the minions report the named deleted services stopped.
    /// A service on a machine that is not connected cannot be waited for:
    /// that is an error that says so (the deletion itself is stored).
    pub async fn wait_gone(
        &self,
        names: &[String],
        timeout: std::time::Duration,
    ) -> Result<Vec<String>, ApiError> {
        let mut changes = self.observed.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left: Vec<(String, String)> = {
                let o = lock(&self.observed.state);
                o.stopping
                    .values()
                    .filter(|(_, name)| names.contains(name))
                    .map(|(node, name)| (name.clone(), node.clone()))
                    .collect()
            };
            if left.is_empty() {
                return Ok(names.to_vec());
            }
            if let Some((name, machine)) = left.iter().find(|(_, m)| !self.is_connected(m)) {
                return Err(ApiError::Unavailable(format!(
                    "service {name:?} is deleted, but machine {machine:?} is unreachable; \
                     it stops there when the machine reconnects"
                )));
            }
            // A link that drops while we wait is noticed within a second.
            let tick = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
            match tokio::time::timeout_at(deadline.min(tick), changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ApiError::Internal("the master is stopping".into())),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    let detail: Vec<String> =
                        left.iter().map(|(n, m)| format!("{n} on {m}")).collect();
                    return Err(ApiError::Unavailable(format!(
                        "timed out after {} ms waiting for the minion to stop: {}; \
                         the deletion is stored",
                        timeout.as_millis(),
                        detail.join(", ")
                    )));
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use phoenix_model::status::{Exit, Health};

    use super::*;

    const DAEMON: Wanted = Wanted {
        generation: 2,
        oneshot: false,
    };
    const ONESHOT: Wanted = Wanted {
        generation: 2,
        oneshot: true,
    };

    fn status(generation: u64, state: ServiceState, message: Option<&str>) -> ServiceStatus {
        ServiceStatus {
            name: "web".into(),
            instance: None,
            generation,
            state,
            pid: None,
            restarts: 0,
            last_exit: None,
            limits: None,
            health: Health::None,
            since: 0,
            message: message.map(str::to_owned),
        }
    }

    fn verdict(want: &Wanted, s: Option<&ServiceStatus>) -> Verdict {
        judge(want, s, None).0
    }

    #[test]
    fn a_daemon_settles_when_this_generation_runs_and_fails_on_backoff() {
        use ServiceState::*;
        assert_eq!(verdict(&DAEMON, None), Verdict::Waiting);
        // The old generation running says nothing about the new one.
        assert_eq!(
            verdict(&DAEMON, Some(&status(1, Running, None))),
            Verdict::Waiting
        );
        for (state, expected) in [
            (Starting, Verdict::Waiting),
            (Exited, Verdict::Waiting),
            (Running, Verdict::Running),
            (Backoff, Verdict::Failed),
            (Unhealthy, Verdict::Failed),
            (Failed, Verdict::Failed),
        ] {
            assert_eq!(
                verdict(&DAEMON, Some(&status(2, state, None))),
                expected,
                "{state:?}"
            );
        }
        // The minion's reason is the verdict's.
        let crashing = status(2, Backoff, Some("exited with code 2; restarting in 100 ms"));
        assert_eq!(
            judge(&DAEMON, Some(&crashing), None),
            (
                Verdict::Failed,
                Some("exited with code 2; restarting in 100 ms".into())
            )
        );
        // A newer generation than the one waited for is judged the same.
        assert_eq!(
            verdict(&DAEMON, Some(&status(3, Running, None))),
            Verdict::Running
        );
    }

    #[test]
    fn a_oneshot_settles_when_it_ends_and_fails_on_a_nonzero_exit() {
        use ServiceState::*;
        assert_eq!(
            verdict(&ONESHOT, Some(&status(2, Running, None))),
            Verdict::Waiting
        );
        assert_eq!(
            verdict(&ONESHOT, Some(&status(2, Exited, None))),
            Verdict::Exited
        );
        assert_eq!(
            verdict(&ONESHOT, Some(&status(1, Exited, None))),
            Verdict::Waiting
        );
        let mut failed = status(2, Failed, None);
        failed.last_exit = Some(Exit {
            code: Some(1),
            signal: None,
            at: 0,
        });
        assert_eq!(
            judge(&ONESHOT, Some(&failed), None),
            (Verdict::Failed, Some("exited with code 1".into()))
        );
        // An image it cannot fetch backs it off: a failure too.
        assert_eq!(
            verdict(&ONESHOT, Some(&status(2, Backoff, Some("no space")))),
            Verdict::Failed
        );
    }

    #[test]
    fn a_held_back_generation_fails_with_the_minions_message() {
        let held = status(
            1,
            ServiceState::Running,
            Some("generation 1 keeps running: generation 2 is held back: disk full"),
        );
        assert_eq!(
            judge(&DAEMON, Some(&held), None),
            (
                Verdict::Failed,
                Some("generation 1 keeps running: generation 2 is held back: disk full".into())
            )
        );
        // Held back for another generation: not this wait's business.
        let other = status(
            1,
            ServiceState::Running,
            Some("generation 1 keeps running: generation 22 is held back: disk full"),
        );
        assert_eq!(verdict(&DAEMON, Some(&other)), Verdict::Waiting);
    }

    #[test]
    fn an_unreachable_machine_ends_only_a_wait_without_a_verdict() {
        let (v, why) = judge(&DAEMON, None, Some("m9"));
        assert_eq!(v, Verdict::Unreachable);
        let why = why.unwrap();
        assert!(why.starts_with("machine \"m9\" is unreachable"), "{why}");
        assert!(why.contains("the change is stored"), "{why}");
        let (v, why) = judge(
            &DAEMON,
            Some(&status(2, ServiceState::Starting, None)),
            Some("m9"),
        );
        assert_eq!(v, Verdict::Unreachable);
        assert!(why.unwrap().contains("last known: starting"));
        // What it reported before it went away stands.
        assert_eq!(
            judge(
                &DAEMON,
                Some(&status(2, ServiceState::Running, None)),
                Some("m9")
            )
            .0,
            Verdict::Running
        );
        assert_eq!(
            judge(
                &DAEMON,
                Some(&status(2, ServiceState::Backoff, None)),
                Some("m9")
            )
            .0,
            Verdict::Failed
        );
    }
}
