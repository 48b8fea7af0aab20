//! The supervisor: one task runner per run of a service, converging on the
//! desired set.
//!
//! Runs are keyed by their assignment's key ([`Assignment::key`]): the
//! service's name, or `NAME.GENERATION` for the run a zero-downtime update
//! starts beside the old one; two runs of one service are independent
//! tasks. [`Supervisor::apply`] compares a new desired set with what runs:
//! runs that left the set are stopped, new ones get a [`TaskRunner`],
//! changed ones (a new generation) are restarted with their new assignment;
//! a change of only `holds_ip` and `links` (or of the proxy's routing
//! fields, which a newer master leaves out) restarts nothing. A run that
//! takes the service's stable address moves it first: the runs of that
//! service that the same set removes are stopped once the address routes
//! to the new holder (or after [`SWITCH_WAIT`]). Each runner
//! owns its task and is the only one that touches it; it reports every state
//! change as a [`Report`]. Restart policy, health checks and adoption are the
//! runner's ([`crate::task`]); how each kind of task runs is its driver's
//! ([`crate::driver`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use phoenix_host::Host;
use phoenix_model::proto::{Assignment, DesiredSet};
use phoenix_model::status::ServiceStatus;
use tokio::sync::{mpsc, oneshot};

use crate::driver::{Drivers, TaskDir};
use crate::health::{HealthProbe, HealthTiming};
use crate::hooks::ServiceCgroups;
use crate::hooks::net::ServiceNetworks;
use crate::images::ImageCache;
use crate::logs::{LogCmd, LogFiles};
use crate::state::LocalState;
use crate::task::{Cmd, TaskRunner};

/// What service tasks tell the link to the master.
#[derive(Debug)]
pub enum Report {
    Status(ServiceStatus),
    /// The run with this key is gone (`ToMaster::Gone`).
    Gone(String),
}

/// What every service task shares.
pub struct Ctx {
    pub images: ImageCache,
    /// Saves desired sets to disk off the runtime thread, in order.
    pub desired_writer: std::sync::mpsc::Sender<DesiredSet>,
    /// One driver per kind of workload.
    pub drivers: Drivers,
    /// The host's kernel interface (the recording fake in tests).
    pub host: Arc<dyn Host>,
    /// Where services' cgroups are (see [`crate::hooks`]).
    pub cgroups: ServiceCgroups,
    /// Services' network namespaces and the firewall (see
    /// [`crate::hooks::net`]).
    pub nets: ServiceNetworks,
    /// How health checks reach a service.
    pub probe: Arc<dyn HealthProbe>,
    pub logs: LogFiles,
    pub log_cmds: mpsc::UnboundedSender<LogCmd>,
    pub state: LocalState,
    pub health: HealthTiming,
    pub stop_timeout: Duration,
    /// How long a daemon without a health check must stay up to count as
    /// running.
    pub min_uptime: Duration,
    pub reports: mpsc::UnboundedSender<Report>,
}

/// The longest a run that leaves the set waits, before it is stopped, for
/// another run of its service to take the stable address (the firewall's
/// wait and a few netlink requests).
pub const SWITCH_WAIT: Duration = Duration::from_secs(12);

pub struct Supervisor {
    ctx: Arc<Ctx>,
    /// The runners by run key.
    services: HashMap<String, (Assignment, mpsc::UnboundedSender<Cmd>)>,
    /// The newest generation wanted per run key; a change whose image is
    /// still being fetched is sent on only if no newer one came meanwhile.
    latest: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    /// Whether a desired set has been applied since the minion started.
    applied: bool,
}

impl Supervisor {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Supervisor {
            ctx,
            services: HashMap::new(),
            latest: Arc::default(),
            applied: false,
        }
    }

    /// Converges on `set`. Runs recorded on disk but in no set (deleted
    /// while the minion was down) are stopped too.
    ///
    /// Order: changes of `holds_ip` (and `links`) go to their runners
    /// first; then runs no longer wanted are stopped, those of a service
    /// one of whose runs takes the stable address in this set only once it
    /// has (see [`SWITCH_WAIT`]); then new runs start and changed ones are
    /// replaced.
    pub fn apply(&mut self, set: &DesiredSet) {
        let wanted: HashMap<&str, &Assignment> =
            set.services.iter().map(|a| (a.key(), a)).collect();
        // Recorded on disk but wanted no more: left over from before this
        // minion started (deleted while it was down). Only the first set can
        // find such; later every recorded run has a task, possibly one
        // still stopping, which must not be raced.
        if !self.applied {
            self.applied = true;
            self.ctx.nets.expect(set.services.len());
            self.ctx
                .nets
                .clean_orphans(set.services.iter().map(|a| a.key().to_owned()));
            let recorded = self.ctx.state.recorded_services();
            for key in &recorded {
                if !wanted.contains_key(key.as_str()) {
                    stop_orphan(&self.ctx, key);
                }
            }
            // Cgroups of runs neither wanted nor recorded (a run record
            // that was never written): their processes go too.
            for key in self.ctx.cgroups.services() {
                if !wanted.contains_key(key.as_str()) && !recorded.contains(&key) {
                    let ctx = self.ctx.clone();
                    tokio::spawn(async move {
                        ctx.cgroups.clear_leftover(&key).await;
                    });
                }
            }
        }
        // Addresses first: a run that takes the stable address does so at
        // once, whatever else the set does.
        let mut taking: HashMap<&str, Vec<oneshot::Receiver<()>>> = HashMap::new();
        for a in &set.services {
            let Some((old, tx)) = self.services.get_mut(a.key()) else {
                continue;
            };
            let addressing_same = old.links == a.links && old.holds_ip == a.holds_ip;
            if addressing_same || !only_addressing_differs(old, a) {
                continue;
            }
            if old.holds_ip == a.holds_ip {
                old.links = a.links.clone();
                let _ = tx.send(Cmd::Relink(a.links.clone()));
                continue;
            }
            let (done, moved) = oneshot::channel();
            if a.holds_ip {
                taking.entry(a.spec.name.as_str()).or_default().push(moved);
            }
            old.links = a.links.clone();
            old.holds_ip = a.holds_ip;
            let _ = tx.send(Cmd::Readdress(Box::new(a.clone()), Some(done)));
        }
        // Then stops: a run of a service whose stable address another run
        // takes in this set is stopped once it has taken it.
        let latest = &self.latest;
        let mut after_switch: HashMap<String, Vec<mpsc::UnboundedSender<Cmd>>> = HashMap::new();
        self.services.retain(|key, (old, tx)| {
            let keep = wanted.contains_key(key.as_str());
            if !keep {
                if taking.contains_key(old.spec.name.as_str()) {
                    after_switch
                        .entry(old.spec.name.clone())
                        .or_default()
                        .push(tx.clone());
                } else {
                    let _ = tx.send(Cmd::Stop);
                }
                latest.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
            }
            keep
        });
        for (service, stops) in after_switch {
            let moves = taking.remove(service.as_str()).unwrap_or_default();
            tokio::spawn(async move {
                let all = futures_join(moves);
                if tokio::time::timeout(SWITCH_WAIT, all).await.is_err() {
                    tracing::warn!(%service, "the stable address did not move within {} s; stopping the old run anyway", SWITCH_WAIT.as_secs());
                }
                for tx in stops {
                    let _ = tx.send(Cmd::Stop);
                }
            });
        }
        for a in &set.services {
            match self.services.get_mut(a.key()) {
                // Routing fields, which a master from before they were
                // left out of the sets still sent: nothing to restart.
                Some((old, _)) if old != a && only_routing_differs(old, a) => *old = a.clone(),
                Some((old, tx)) if old != a => {
                    let fetch_first = old.image_hash != a.image_hash
                        && !self.ctx.images.path(&a.image_hash).exists();
                    *old = a.clone();
                    let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
                    latest.insert(a.key().to_owned(), a.generation);
                    if fetch_first {
                        // The old version runs on until the new image is
                        // here (and for good if it cannot be fetched).
                        tokio::spawn(fetch_then_replace(
                            self.ctx.clone(),
                            self.latest.clone(),
                            a.clone(),
                            tx.clone(),
                        ));
                    } else {
                        let _ = tx.send(Cmd::Replace(Box::new(a.clone())));
                    }
                }
                Some(_) => {}
                None => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    self.services.insert(a.key().to_owned(), (a.clone(), tx));
                    tokio::spawn(TaskRunner::new(self.ctx.clone(), a.clone(), rx).run());
                }
            }
        }
    }
}

/// Waits for every receiver (a dropped sender counts as done).
async fn futures_join(moves: Vec<oneshot::Receiver<()>>) {
    for m in moves {
        let _ = m.await;
    }
}

/// Whether two assignments of one run differ in what its links resolve to
/// and whether it holds the stable address alone (no restart needed).
fn only_addressing_differs(old: &Assignment, new: &Assignment) -> bool {
    Assignment {
        links: new.links.clone(),
        holds_ip: new.holds_ip,
        ..unrouted(old)
    } == unrouted(new)
}

/// Whether two assignments of one run differ only in the proxy's routing
/// fields (`proxyname`, `proxypath`, `proxyauth`). The master no longer
/// sends them (only its proxy acts on them); a minion that ran a set from
/// an older master gets them removed, and restarts nothing for that.
fn only_routing_differs(old: &Assignment, new: &Assignment) -> bool {
    unrouted(old) == unrouted(new)
}

/// An assignment without its spec's routing fields.
fn unrouted(a: &Assignment) -> Assignment {
    let mut a = a.clone();
    a.spec.clear_routing();
    a
}

/// Fetches the image of a changed service, then hands the change to its
/// task, unless a newer change came meanwhile. A failed fetch is reported
/// and tried again.
async fn fetch_then_replace(
    ctx: Arc<Ctx>,
    latest: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    a: Assignment,
    tx: mpsc::UnboundedSender<Cmd>,
) {
    let current = || {
        latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(a.key())
            .is_some_and(|g| *g == a.generation)
    };
    let image = a.spec.registry_file().0;
    loop {
        let fetched = ctx.images.ensure(&image, &a.image_hash).await;
        // Checked and sent under the lock: `apply` cannot slip a newer
        // change in between.
        {
            let guard = latest.lock().unwrap_or_else(|p| p.into_inner());
            if guard.get(a.key()) != Some(&a.generation) {
                return;
            }
            let cmd = match fetched {
                Ok(_) => Cmd::Replace(Box::new(a.clone())),
                Err(e) => Cmd::Held(Box::new(a.clone()), e),
            };
            let done = matches!(cmd, Cmd::Replace(_));
            if tx.send(cmd).is_err() || done {
                return;
            }
        }
        tokio::time::sleep(crate::images::RETRY).await;
        if !current() {
            return;
        }
    }
}

/// Ends the task of a run (by key) that is no longer wanted and has no
/// runner, and has its driver clean up after it.
fn stop_orphan(ctx: &Arc<Ctx>, name: &str) {
    let orphan = ctx.state.run_record(name).map(|rec| {
        let driver = ctx.drivers.named(rec.driver).clone();
        let handle = driver.recover(&rec);
        if let Some(h) = &handle {
            h.process.signal(libc::SIGKILL);
        }
        (driver, handle)
    });
    let ctx2 = ctx.clone();
    let name2 = name.to_owned();
    tokio::spawn(async move {
        if let Some((driver, handle)) = orphan {
            let work = ctx2.state.work_dir(&name2);
            let dir = TaskDir {
                name: &name2,
                work_dir: &work,
            };
            driver.destroy(dir, handle).await;
        }
        ctx2.cgroups.clear_leftover(&name2).await;
        ctx2.state.forget(&name2);
    });
    let _ = ctx.log_cmds.send(LogCmd::Remove(name.to_owned()));
    let _ = ctx.reports.send(Report::Gone(name.to_owned()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_fields_alone_are_no_change_to_restart_for() {
        let text = r#"{"machine":"m1","name":"web","image":"app","type":"binary",
            "proxyname":"a.example","proxypath":"/x","proxyauth":["ann:$2y$05$aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]}"#;
        let spec = phoenix_model::spec::parse_specs("t", text)
            .unwrap()
            .remove(0);
        let old = Assignment {
            spec,
            ip: phoenix_model::net::service_ip(0),
            image_hash: "h".into(),
            image_size: 1,
            generation: 3,
            links: Default::default(),
            instance: None,
            own_ip: None,
            holds_ip: true,
            env: None,
        };
        let mut new = old.clone();
        new.spec.proxyname = None;
        new.spec.proxypath = None;
        new.spec.proxyauth.clear();
        assert!(only_routing_differs(&old, &new));
        let mut restarted = new.clone();
        restarted.generation += 1;
        assert!(!only_routing_differs(&old, &restarted));
        let mut changed = new.clone();
        changed.spec.proxyport += 1;
        assert!(!only_routing_differs(&old, &changed));
        // Both at once (an older master's set, and a link moved): the
        // address part is handled first, then nothing restarts.
        let mut relinked = new;
        relinked
            .links
            .insert("db".into(), phoenix_model::net::service_ip(1));
        assert!(only_addressing_differs(&old, &relinked));
    }
}
