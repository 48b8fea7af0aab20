//! The supervisor: one task runner per service, converging on the desired
//! set.
//!
//! [`Supervisor::apply`] compares a new desired set with what runs: services
//! that left the set are stopped, new ones get a [`TaskRunner`], changed ones
//! (a new generation) are restarted with their new assignment. Each runner
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
use tokio::sync::mpsc;

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

pub struct Supervisor {
    ctx: Arc<Ctx>,
    services: HashMap<String, (Assignment, mpsc::UnboundedSender<Cmd>)>,
    /// The newest generation wanted per service; a change whose image is
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

    /// Converges on `set`. Services recorded on disk but in no set (deleted
    /// while the minion was down) are stopped too.
    pub fn apply(&mut self, set: &DesiredSet) {
        let wanted: HashMap<&str, &Assignment> = set
            .services
            .iter()
            .map(|a| (a.spec.name.as_str(), a))
            .collect();
        // Recorded on disk but wanted no more: left over from before this
        // minion started (deleted while it was down). Only the first set can
        // find such; later every recorded service has a task, possibly one
        // still stopping, which must not be raced.
        if !self.applied {
            self.applied = true;
            self.ctx.nets.expect(set.services.len());
            self.ctx
                .nets
                .clean_orphans(set.services.iter().map(|a| a.spec.name.clone()));
            let recorded = self.ctx.state.recorded_services();
            for name in &recorded {
                if !wanted.contains_key(name.as_str()) {
                    stop_orphan(&self.ctx, name);
                }
            }
            // Cgroups of services neither wanted nor recorded (a run record
            // that was never written): their processes go too.
            for name in self.ctx.cgroups.services() {
                if !wanted.contains_key(name.as_str()) && !recorded.contains(&name) {
                    let ctx = self.ctx.clone();
                    tokio::spawn(async move {
                        ctx.cgroups.clear_leftover(&name).await;
                    });
                }
            }
        }
        let latest = &self.latest;
        self.services.retain(|name, (_, tx)| {
            let keep = wanted.contains_key(name.as_str());
            if !keep {
                let _ = tx.send(Cmd::Stop);
                latest
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
            }
            keep
        });
        for a in &set.services {
            match self.services.get_mut(&a.spec.name) {
                Some((old, tx)) if old != a && only_links_differ(old, a) => {
                    old.links = a.links.clone();
                    let _ = tx.send(Cmd::Relink(a.links.clone()));
                }
                Some((old, tx)) if old != a => {
                    let fetch_first = old.image_hash != a.image_hash
                        && !self.ctx.images.path(&a.image_hash).exists();
                    *old = a.clone();
                    let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
                    latest.insert(a.spec.name.clone(), a.generation);
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
                    self.services.insert(a.spec.name.clone(), (a.clone(), tx));
                    tokio::spawn(TaskRunner::new(self.ctx.clone(), a.clone(), rx).run());
                }
            }
        }
    }
}

/// Whether two assignments of one service differ in what its links
/// resolve to alone (no restart needed).
fn only_links_differ(old: &Assignment, new: &Assignment) -> bool {
    old.links != new.links
        && Assignment {
            links: new.links.clone(),
            ..old.clone()
        } == *new
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
            .get(&a.spec.name)
            .is_some_and(|g| *g == a.generation)
    };
    let image = a.spec.registry_file().0;
    loop {
        let fetched = ctx.images.ensure(&image, &a.image_hash).await;
        // Checked and sent under the lock: `apply` cannot slip a newer
        // change in between.
        {
            let guard = latest.lock().unwrap_or_else(|p| p.into_inner());
            if guard.get(&a.spec.name) != Some(&a.generation) {
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

/// Ends the task of a service that is no longer wanted and has no runner,
/// and has its driver clean up after it.
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
