//! Observed state: what the minions report, kept in memory.
//!
//! Service statuses and each node's last contact, version, load and image
//! cache live under one lock: they arrive together on a link and are read
//! together by the views. Nothing here is durable; a restarted master learns
//! it again from the minions' full reports on reconnect.

use std::collections::HashMap;
use std::sync::Mutex;

use phoenix_model::proto::{ImageSync, ServiceView};
use phoenix_model::spec::Duration as SpecDuration;
use phoenix_model::status::{NodeStats, ServiceState, ServiceStatus, now_ms};
use tokio::sync::watch;

use super::{ApiError, Hub, desired_sets};
use crate::lock;
use crate::store::Service;

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
struct Observed {
    /// service name → its last reported status.
    statuses: HashMap<String, ServiceStatus>,
    /// node name → what it said about itself.
    seen: HashMap<String, NodeSeen>,
    /// Deleted services their minion has not reported stopped yet:
    /// service name → its node.
    stopping: HashMap<String, String>,
}

impl Observed {
    fn seen_mut(&mut self, node: &str) -> &mut NodeSeen {
        let s = self.seen.entry(node.to_owned()).or_default();
        s.last_seen = now_ms();
        s
    }
}

pub(super) struct ObservedState {
    state: Mutex<Observed>,
    /// Bumped whenever a reported status changes (for `wait`).
    changes: watch::Sender<u64>,
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
                .map(|v| v.into_iter().map(|a| a.spec.name).collect())
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
                let reported: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
                o.stopping
                    .retain(|name, n| n != node || reported.contains(&name.as_str()));
            }
            for s in services {
                o.statuses.insert(s.name.clone(), s);
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
                if o.stopping.get(&n).is_some_and(|on| on == node) {
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
        o.stopping.retain(|_, n| n != node);
    }

    /// Forgets a deleted service's status; if its minion had reported it,
    /// [`Hub::wait_gone`] waits for the minion to say it stopped.
    pub(super) fn forget_status(&self, service: &str, node: &str) {
        let mut o = lock(&self.observed.state);
        if o.statuses.remove(service).is_some() {
            o.stopping.insert(service.to_owned(), node.to_owned());
        } else {
            // Never reported: the minion never started it, or has not said.
            o.stopping.remove(service);
        }
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
        let svc = self
            .store()
            .read()?
            .service(name)?
            .ok_or_else(|| ApiError::no_service(name))?;
        Ok(self.view(&svc))
    }

    pub fn services(&self) -> Result<Vec<ServiceView>, ApiError> {
        let services = self.store().read()?.services()?;
        Ok(services.iter().map(|s| self.view(s)).collect())
    }

    fn view(&self, svc: &Service) -> ServiceView {
        let st = lock(&self.observed.state)
            .statuses
            .get(&svc.spec.name)
            .cloned();
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
        }
    }

    /// Waits until every named service reports its current generation as
    /// settled (see below), or the timeout passes.
    pub async fn wait(
        &self,
        names: &[String],
        timeout: std::time::Duration,
    ) -> Result<Vec<ServiceView>, ApiError> {
        let mut changes = self.observed.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        // What "settled" means per service, read from the store once.
        let wanted: Vec<(String, u64, bool)> = {
            let mut store = self.store();
            let tx = store.read()?;
            names
                .iter()
                .map(|n| {
                    let s = tx.service(n)?.ok_or_else(|| ApiError::no_service(n))?;
                    Ok((
                        s.spec.name,
                        s.generation,
                        s.spec.duration == SpecDuration::Oneshot,
                    ))
                })
                .collect::<Result<_, ApiError>>()?
        };
        let pending = || -> Vec<String> {
            let o = lock(&self.observed.state);
            wanted
                .iter()
                .filter(|(name, generation, oneshot)| {
                    // A daemon has settled once it runs; a oneshot once it ended.
                    let done: &[ServiceState] = if *oneshot {
                        &[ServiceState::Exited, ServiceState::Failed]
                    } else {
                        &[ServiceState::Running, ServiceState::Failed]
                    };
                    !o.statuses
                        .get(name)
                        .is_some_and(|s| s.generation == *generation && done.contains(&s.state))
                })
                .map(|(name, _, _)| name.clone())
                .collect()
        };
        loop {
            let left = pending();
            if left.is_empty() {
                return names.iter().map(|n| self.status(n)).collect();
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    let detail: Vec<String> = left
                        .iter()
                        .map(|n| {
                            format!(
                                "{n} ({})",
                                self.status(n).map(|v| v.state).unwrap_or_default()
                            )
                        })
                        .collect();
                    return Err(ApiError::Unavailable(format!(
                        "timed out after {} ms waiting for: {}",
                        timeout.as_millis(),
                        detail.join(", ")
                    )));
                }
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
                names
                    .iter()
                    .filter_map(|n| o.stopping.get(n).map(|m| (n.clone(), m.clone())))
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
