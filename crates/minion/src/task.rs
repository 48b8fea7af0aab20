//! The task runner: one per service, the same for every kind of workload.
//!
//! It owns the policy; the [driver](crate::driver) of the service's type
//! owns the mechanics. A runner: fetches the image if missing → has the
//! driver prepare and start the task → watches it (its exit, commands from
//! the supervisor, health probes) → has the driver destroy what the run left
//! → daemon: restarts it (the first restart at once, then 100 ms doubling to
//! 30 s, reset by a run of 10 s); oneshot: records the result and waits for
//! a new generation. Stopping is the driver's SIGTERM, then SIGKILL after
//! the stop timeout. After a minion restart, the runner first asks the
//! driver named in the service's run record to recover the task.
//!
//! Every state change goes to the link as a [`Report`]. Nothing here knows
//! which kind of task runs; the runner's tests run it with a fake driver.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use phoenix_model::proto::Assignment;
use phoenix_model::spec::Duration as Lifetime;
use phoenix_model::status::{Exit, Health, ServiceState, ServiceStatus, now_ms};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use phoenix_host::cgroup::ServiceCgroup;

use crate::driver::{BoxFuture, Driver, TaskConfig, TaskDir, TaskHandle, TaskNetwork};
use crate::health;
use crate::hooks;
use crate::hooks::net::ServiceNetwork;
use crate::logs::LogCmd;
use crate::state::{DoneRecord, RunRecord};
use crate::supervisor::{Ctx, Report};

/// A run this long resets the backoff.
pub const STABLE_RUN: Duration = Duration::from_secs(10);
/// The longest wait between restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Consecutive failed health checks that make a service unhealthy.
pub const HEALTH_FAILURES: u32 = 2;

/// The wait before the `n`th consecutive restart (n ≥ 1).
pub fn backoff(n: u32) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    let ms = 100u64.saturating_mul(1 << (n - 2).min(20));
    Duration::from_millis(ms).min(MAX_BACKOFF)
}

/// What the supervisor tells a service's runner.
pub enum Cmd {
    Replace(Box<Assignment>),
    /// The image of this newer assignment could not be fetched (why): a
    /// running task keeps running; a stopped one tries the new one.
    Held(Box<Assignment>, String),
    /// What the service's `link` names resolve to changed (a linked
    /// service was created, moved or deleted); nothing restarts.
    Relink(BTreeMap<String, Ipv6Addr>),
    /// Whether the run holds the service's stable address changed (and
    /// maybe its links): this assignment differs from the current one in
    /// `holds_ip` and `links` only. Nothing restarts; `done` is told once
    /// the address has moved (see `ServiceNetworks::readdress`).
    Readdress(Box<Assignment>, Option<oneshot::Sender<()>>),
    Stop,
}

/// A task that runs, the driver that started or recovered it, and the
/// service's cgroups it runs in.
struct Running {
    driver: Arc<dyn Driver>,
    handle: TaskHandle,
    cgroup: ServiceCgroup,
}

/// How a supervised run ended.
enum Ended {
    Exited(Exit),
    Unhealthy(Exit),
    /// It never passed its health check within the driver's boot timeout
    /// (a guest that never booted) and was killed.
    NotBooted(Exit),
    /// A command came in; the task is already stopped (unless the command
    /// is `None`: the minion is shutting down and the task runs on).
    Command(Option<Cmd>),
}

/// What a runner does next after a command.
enum Next {
    /// Start (again) with the current assignment.
    Start,
    /// The service is gone or the minion is shutting down.
    Return,
    /// Nothing to do: keep waiting (or keep running).
    Wait,
}

pub fn initial_status(a: &Assignment) -> ServiceStatus {
    ServiceStatus {
        name: a.spec.name.clone(),
        instance: a.instance.clone(),
        generation: a.generation,
        state: ServiceState::Starting,
        pid: None,
        restarts: 0,
        last_exit: None,
        limits: None,
        health: if a.spec.healthcheck.is_some() {
            Health::Pending
        } else {
            Health::None
        },
        since: now_ms(),
        message: None,
    }
}

/// Waits for the probe in flight, if there is one (never ends otherwise).
async fn probe_result(
    probe: Option<&mut BoxFuture<'static, Result<(), String>>>,
) -> Result<(), String> {
    match probe {
        Some(p) => p.await,
        None => std::future::pending().await,
    }
}

pub struct TaskRunner {
    ctx: Arc<Ctx>,
    a: Assignment,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    status: ServiceStatus,
    /// Crashes since the last stable run.
    consecutive: u32,
    /// The service's network namespace: made before its first start, kept
    /// across restarts, given back when the service leaves this minion.
    net: Option<ServiceNetwork>,
    /// Why the last run ended badly, beyond its exit (out of memory, no
    /// boot): in the status while it backs off and starts again.
    failure: Option<String>,
    /// The length of the service's log when the run started: what it
    /// wrote comes after.
    log_from: u64,
}

impl TaskRunner {
    pub fn new(ctx: Arc<Ctx>, a: Assignment, cmds: mpsc::UnboundedReceiver<Cmd>) -> Self {
        TaskRunner {
            status: initial_status(&a),
            ctx,
            a,
            cmds,
            consecutive: 0,
            net: None,
            failure: None,
            log_from: 0,
        }
    }

    /// Where the service is reached: its own address in its namespace,
    /// `None` when it shares the minion's network.
    fn service_addr(&self) -> Option<IpAddr> {
        hooks::net::service_addr(self.net.as_ref())
    }

    /// New addresses for the names the service links: its hosts file and
    /// its firewall entry follow; its environment does at the next start.
    fn relink(&mut self, links: BTreeMap<String, Ipv6Addr>) {
        self.a.links = links;
        if let Some(net) = &self.net {
            self.ctx.nets.relink(&self.a, net);
            let work = self.ctx.state.work_dir(self.key());
            let text = hooks::net::hosts_text(&self.a.spec.name, self.a.ip, &self.a.links);
            if let Err(e) = hooks::net::write_hosts(&hooks::net::hosts_path(&work), &text) {
                tracing::warn!(service = %self.key(), "cannot rewrite its hosts file: {e}");
            }
        }
    }

    /// Takes `a`'s `holds_ip` and `links` (nothing else of it differs):
    /// the hosts file, the firewall entry and the addresses follow, without
    /// a restart.
    fn readdress(&mut self, a: Assignment, done: Option<oneshot::Sender<()>>) {
        self.a.holds_ip = a.holds_ip;
        let links = a.links;
        if let Some(net) = self.net.as_mut() {
            // The firewall entry is set with the addresses just below.
            self.a.links = links.clone();
            self.ctx.nets.readdress(&self.a, net, done);
            self.relink(links);
        } else {
            self.relink(links);
            if let Some(d) = done {
                let _ = d.send(());
            }
        }
    }

    /// Gives the run's network back (it is deleted or moved, or an update
    /// replaced it).
    fn release_net(&mut self) {
        if let Some(net) = self.net.take() {
            self.ctx.nets.release(self.a.key(), net);
        }
    }

    /// The run's key: what its task, files, cgroup and network are named
    /// by (the service's name, or `NAME.GENERATION` for a run an update
    /// started beside the old one).
    fn key(&self) -> &str {
        self.a.key()
    }

    fn set(&mut self, state: ServiceState, message: Option<String>) {
        if self.status.state != state {
            self.status.since = now_ms();
        }
        self.status.state = state;
        self.status.message = message;
        self.report();
    }

    fn report(&self) {
        let _ = self.ctx.reports.send(Report::Status(self.status.clone()));
    }

    /// The state of a task that has just started, or been recovered
    /// (`adopted`). It is `running` only once a health check passed or,
    /// for a daemon without one, once it has stayed up for the minimum
    /// uptime (an adopted task has shown that already): a service that
    /// exits at once must never look as if it runs.
    fn started_state(&self, adopted: bool) -> ServiceState {
        let on_probation =
            !adopted && self.a.spec.duration == Lifetime::Daemon && !self.ctx.min_uptime.is_zero();
        if self.a.spec.healthcheck.is_some() || on_probation {
            ServiceState::Starting
        } else {
            ServiceState::Running
        }
    }

    /// Handles a command that arrived while no task runs.
    fn command(&mut self, cmd: Option<Cmd>) -> Next {
        match cmd {
            Some(Cmd::Replace(a) | Cmd::Held(a, _)) => {
                self.a = *a;
                self.status = initial_status(&self.a);
                self.consecutive = 0;
                self.failure = None;
                Next::Start
            }
            Some(Cmd::Relink(links)) => {
                self.relink(links);
                Next::Wait
            }
            Some(Cmd::Readdress(a, done)) => {
                self.readdress(*a, done);
                Next::Wait
            }
            Some(Cmd::Stop) => {
                self.release_net();
                self.ctx.state.forget(self.key());
                let _ = self
                    .ctx
                    .log_cmds
                    .send(LogCmd::Remove(self.key().to_owned()));
                let _ = self.ctx.reports.send(Report::Gone(self.key().to_owned()));
                Next::Return
            }
            // The supervisor is gone: the minion is shutting down, and its
            // services keep running for the next minion to adopt.
            None => Next::Return,
        }
    }

    /// Waits `d`, or less if a command comes.
    async fn pause(&mut self, d: Duration) -> Option<Next> {
        let until = Instant::now() + d;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return None,
                cmd = self.cmds.recv() => match self.command(cmd) {
                    Next::Wait => continue,
                    next => return Some(next),
                },
            }
        }
    }

    /// Waits for the next command while nothing runs.
    async fn command_wait(&mut self) -> Next {
        loop {
            let cmd = self.cmds.recv().await;
            match self.command(cmd) {
                Next::Wait => continue,
                next => return next,
            }
        }
    }

    pub async fn run(mut self) {
        let mut running = self.recover().await;
        if running.is_none()
            && self.a.spec.duration == Lifetime::Oneshot
            && let Some(done) = self
                .ctx
                .state
                .done_record(self.key())
                .filter(|d| d.generation == self.a.generation)
        {
            // This generation already ran to its end; never again.
            self.status.restarts = done.restarts;
            self.finish_oneshot(done.exit);
            match self.command_wait().await {
                Next::Start | Next::Wait => {}
                Next::Return => return,
            }
        }
        loop {
            let mut run = match running.take() {
                Some(r) => r,
                None => match self.start().await {
                    Ok(r) => r,
                    Err(Some(Next::Start | Next::Wait)) => continue,
                    Err(Some(Next::Return)) => return,
                    Err(None) => {
                        // Could not start: back off like a crash.
                        if let Some(Next::Return) = self.after_exit(None).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let started = Instant::now();
            let ended = self.supervise(&mut run).await;
            if let Ended::Exited(_) | Ended::Unhealthy(_) | Ended::NotBooted(_) = ended {
                let kills = run.cgroup.oom_kills();
                self.post_mortem(kills, run.driver.log_explainer()).await;
            }
            // Not when the minion is merely shutting down: then the task
            // keeps running for the next minion to adopt.
            if !matches!(ended, Ended::Command(None)) {
                let work = self.ctx.state.work_dir(self.key());
                let dir = TaskDir {
                    name: self.key(),
                    work_dir: &work,
                };
                run.driver.destroy(dir, Some(run.handle)).await;
                // What left the process group (a double fork, `setsid`)
                // is still in the cgroup.
                hooks::clear(&run.cgroup).await;
            }
            let (exit, booted) = match ended {
                Ended::Command(cmd) => match self.command(cmd) {
                    Next::Start | Next::Wait => continue,
                    Next::Return => return,
                },
                Ended::Exited(exit) | Ended::Unhealthy(exit) => (exit, true),
                Ended::NotBooted(exit) => (exit, false),
            };
            // A run that never came up is no stable run, however long.
            if booted && started.elapsed() >= STABLE_RUN {
                self.consecutive = 0;
            }
            self.status.last_exit = Some(exit);
            self.status.pid = None;
            if self.a.spec.duration == Lifetime::Oneshot {
                let done = DoneRecord {
                    generation: self.a.generation,
                    exit,
                    restarts: self.status.restarts,
                };
                // Two fsyncs: off the runtime thread, which a busy disk
                // would otherwise stall (with the link's heartbeats) once
                // per oneshot that ends.
                let (state, key) = (self.ctx.state.clone(), self.key().to_owned());
                let saved = tokio::task::spawn_blocking(move || state.save_done(&key, &done))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                if let Err(e) = saved {
                    tracing::warn!(service = %self.key(), "cannot record oneshot result: {e}");
                }
                self.finish_oneshot(exit);
                match self.command_wait().await {
                    Next::Start | Next::Wait => continue,
                    Next::Return => return,
                }
            }
            if let Some(Next::Return) = self.after_exit(Some(exit)).await {
                return;
            }
        }
    }

    fn finish_oneshot(&mut self, exit: Exit) {
        self.status.last_exit = Some(exit);
        let state = if exit.code == Some(0) {
            ServiceState::Exited
        } else {
            ServiceState::Failed
        };
        let why = self.failure.take();
        self.set(state, why);
    }

    /// Counts a restart (if a task ended) and waits its backoff. `Some(next)`
    /// if a command came during the wait.
    async fn after_exit(&mut self, exit: Option<Exit>) -> Option<Next> {
        // A restart is of a task that ran; a start that failed before (an
        // image that could not be fetched) only backs off.
        if exit.is_some() {
            self.status.restarts += 1;
        }
        self.consecutive += 1;
        let delay = backoff(self.consecutive);
        if delay.is_zero() {
            return None;
        }
        let why = match (exit, &self.failure) {
            (Some(e), Some(f)) => format!("{f}; exited with {e}"),
            (Some(e), None) => format!("exited with {e}"),
            (None, _) => self
                .status
                .message
                .clone()
                .unwrap_or_else(|| "could not start".into()),
        };
        self.set(
            ServiceState::Backoff,
            Some(format!("{why}; restarting in {} ms", delay.as_millis())),
        );
        self.pause(delay).await
    }

    /// Takes over the task a previous minion run started, if it still runs
    /// and is of this generation. One of another generation (the spec
    /// changed while the minion was down) is killed and cleaned up.
    async fn recover(&mut self) -> Option<Running> {
        let running = self.recover_task().await;
        // The firewall's first rebuild after a minion restart waits for
        // every service to get this far (see `hooks::net`).
        self.ctx.nets.settled();
        running
    }

    async fn recover_task(&mut self) -> Option<Running> {
        let ctx = self.ctx.clone();
        let Some(rec) = ctx.state.run_record(self.key()) else {
            // No record, but maybe processes (a record that could not be
            // written, a crash in between): none may run beside the start.
            ctx.cgroups.clear_leftover(self.key()).await;
            return None;
        };
        let driver = ctx.drivers.named(rec.driver).clone();
        let handle = driver.recover(&rec);
        let cgroup = match ctx.cgroups.open(self.key()) {
            Ok(cg) => Some(cg),
            Err(e) => {
                tracing::warn!(service = %self.key(), "{e}");
                None
            }
        };
        if rec.generation != self.a.generation {
            if let Some(h) = &handle {
                h.process.signal(libc::SIGKILL);
            }
            let work = ctx.state.work_dir(self.key());
            let dir = TaskDir {
                name: self.key(),
                work_dir: &work,
            };
            driver.destroy(dir, handle).await;
            if let Some(cg) = &cgroup {
                hooks::clear(cg).await;
            }
            return None;
        }
        // Counted on across minion restarts, whatever became of the task.
        self.status.restarts = rec.restarts;
        let (handle, cgroup) = match (handle, cgroup) {
            (Some(handle), Some(cgroup)) => (handle, cgroup),
            (handle, _) => {
                // It ended while the minion was down (or, with a name no
                // cgroup can have, cannot be tracked): what it left behind
                // goes before it starts again, which is a restart.
                if let Some(h) = handle {
                    h.process.signal(libc::SIGKILL);
                }
                ctx.cgroups.clear_leftover(self.key()).await;
                self.status.restarts += 1;
                return None;
            }
        };
        // Its network namespace is the one its process is in.
        match ctx.nets.adopt(&self.a, rec.pid).await {
            Ok(net) => self.net = net,
            Err(e) => {
                tracing::warn!(service = %self.key(), "cannot take over its network, restarting it: {e}");
                handle.process.signal(libc::SIGKILL);
                hooks::clear(&cgroup).await;
                self.status.restarts += 1;
                return None;
            }
        }
        tracing::info!(service = %self.key(), pid = rec.pid, driver = %rec.driver, "adopted running task");
        self.log_from = self.log_length();
        self.status.pid = Some(rec.pid);
        self.status.limits = rec.limits.clone();
        let _ = self.ctx.log_cmds.send(LogCmd::Watch {
            name: self.key().to_owned(),
            fifo: None,
        });
        self.set(self.started_state(true), None);
        Some(Running {
            driver,
            handle,
            cgroup,
        })
    }

    /// Fetches the image and starts the task. `Err(Some(next))` when a
    /// command came first, `Err(None)` when it could not start.
    async fn start(&mut self) -> Result<Running, Option<Next>> {
        self.status.health = if self.a.spec.healthcheck.is_some() {
            Health::Pending
        } else {
            Health::None
        };
        if !self.ctx.images.path(&self.a.image_hash).exists() {
            self.set(
                ServiceState::Starting,
                Some(format!("fetching image {:?}", self.a.spec.image)),
            );
        }
        let ctx = self.ctx.clone();
        let (file, hash) = (self.a.spec.registry_file().0, self.a.image_hash.clone());
        let image = tokio::select! {
            r = ctx.images.ensure(&file, &hash) => r,
            cmd = self.cmds.recv() => return Err(Some(self.command(cmd))),
        };
        let image = match image {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(service = %self.key(), "{e}");
                self.status.message = Some(e);
                return Err(None);
            }
        };
        match self.launch(&image).await {
            Ok(r) => Ok(r),
            Err(e) => {
                let msg = format!("cannot start {:?}: {e}", self.a.spec.image);
                tracing::warn!(service = %self.key(), "{msg}");
                if self.a.spec.duration == Lifetime::Oneshot {
                    self.set(ServiceState::Failed, Some(msg));
                    return Err(Some(self.command_wait().await));
                }
                self.status.message = Some(msg);
                Err(None)
            }
        }
    }

    /// Has the service's driver prepare and start the task, and records it.
    async fn launch(&mut self, image: &Path) -> Result<Running, String> {
        let ctx = self.ctx.clone();
        let a = &self.a;
        let driver = ctx
            .drivers
            .for_kind(a.spec.kind)
            .map_err(|e| e.to_string())?
            .clone();
        let work_dir = ctx.state.work_dir(a.key());
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| format!("create {}: {e}", work_dir.display()))?;
        // The network hook: the namespace is made once and kept across
        // restarts (a new one if the run's own address changed).
        if self.net.as_ref().is_some_and(|n| n.ipv6() != a.reach_ip()) {
            self.release_net();
        }
        let a = &self.a;
        if self.net.is_none() {
            self.net = ctx
                .nets
                .create(a)
                .await
                .map_err(|e| format!("cannot set up its network namespace: {e}"))?;
        }
        let hosts = hooks::net::hosts_path(&work_dir);
        if let Some(net) = self.net.as_mut() {
            // A new generation may link other services, and hold the
            // stable address or not: the firewall entry and the addresses
            // follow before it starts.
            let (done, moved) = oneshot::channel();
            ctx.nets.readdress(a, net, Some(done));
            let _ = moved.await;
            let text = hooks::net::hosts_text(&a.spec.name, a.ip, &a.links);
            hooks::net::write_hosts(&hosts, &text)
                .map_err(|e| format!("write {}: {e}", hosts.display()))?;
        }
        let mut env = vec![
            ("PHOENIX_NAME".to_owned(), a.spec.name.clone()),
            ("PHOENIX_IP".to_owned(), a.ip.to_string()),
            ("PORT".to_owned(), a.spec.proxyport.to_string()),
        ];
        env.extend(hooks::net::link_env(&a.links));
        let log = ctx
            .logs
            .open_output(a.key())
            .map_err(|e| format!("open log: {e}"))?;
        let collector = ctx
            .logs
            .open_collector(a.key())
            .map_err(|e| format!("open log: {e}"))?;
        // The cgroup hook: the task joins its service's cgroups before it
        // runs (see `hooks`).
        let (cgroup, join) = ctx.cgroups.enter(a)?;
        self.log_from = self.log_length();
        let started = {
            // No collection while files prepared in the image cache are
            // made and used.
            let _no_collection = match driver.capabilities().artifact_in_image_cache {
                true => Some(ctx.images.hold().await),
                false => None,
            };
            match driver.prepare(image, a).await {
                Ok(artifact) => {
                    driver
                        .start(TaskConfig {
                            assignment: a,
                            artifact: &artifact,
                            work_dir: &work_dir,
                            env: &env,
                            log,
                            cgroup: join,
                            network: self.net.as_ref().map(|n| TaskNetwork {
                                netns: n.netns(),
                                hosts_file: &hosts,
                            }),
                        })
                        .await
                }
                Err(e) => Err(e),
            }
        };
        let mut handle = match started {
            Ok(h) => h,
            Err(e) => {
                // A start that failed halfway may have left processes.
                hooks::clear(&cgroup).await;
                return Err(e.to_string());
            }
        };
        let limits = cgroup.description();
        let rec = RunRecord {
            pid: handle.pid,
            start_time: handle.start_time,
            generation: a.generation,
            restarts: self.status.restarts,
            driver: driver.name(),
            limits: limits.clone(),
        };
        if let Err(e) = ctx.state.save_run(a.key(), &rec) {
            // Unrecorded, it would be started again beside itself after a
            // minion restart, and escape `del` then: end it at once.
            handle.process.signal(libc::SIGKILL);
            let _ = tokio::time::timeout(ctx.stop_timeout, handle.process.wait()).await;
            let dir = TaskDir {
                name: a.key(),
                work_dir: &work_dir,
            };
            driver.destroy(dir, Some(handle)).await;
            hooks::clear(&cgroup).await;
            return Err(format!(
                "cannot record its process in {}: {e}; stopped it, as it could not be found again after a minion restart",
                ctx.state.run_path(a.key()).display()
            ));
        }
        let _ = ctx.log_cmds.send(LogCmd::Watch {
            name: a.key().to_owned(),
            fifo: Some(collector),
        });
        self.status.pid = Some(handle.pid);
        self.status.limits = limits;
        self.status.since = now_ms();
        self.status.state = self.started_state(false);
        // Why the last run ended stays said until this one runs.
        let failure = self.failure.take();
        self.status.message = failure
            .filter(|_| self.status.state == ServiceState::Starting)
            .map(|f| format!("restarted after: {f}"));
        self.report();
        Ok(Running {
            driver,
            handle,
            cgroup,
        })
    }

    /// Why a run that ended (not stopped) ended, beyond its exit: killed
    /// by the OOM killer at its cgroup's memory limit, or what its driver
    /// reads in its log (a guest kernel out of memory). Kept in
    /// `self.failure` for the status. `kills`: the OOM kills its cgroups
    /// counted, read before they go.
    async fn post_mortem(&mut self, kills: u64, explainer: Option<fn(&str) -> Option<String>>) {
        let mut why = Vec::new();
        if kills > 0 {
            let limit = self
                .a
                .spec
                .memory
                .map(|m| format!(" of {} MiB", m >> 20))
                .unwrap_or_default();
            why.push(format!(
                "out of memory: the kernel's OOM killer killed {kills} of its processes at its memory limit{limit}"
            ));
        }
        if let Some(explain) = explainer {
            let log = self.run_log().await;
            why.extend(explain(&log));
        }
        if let Some(f) = self.failure.take() {
            why.insert(0, f);
        }
        if !why.is_empty() {
            let why = why.join("; ");
            tracing::warn!(service = %self.key(), "{why}");
            self.failure = Some(why);
        }
    }

    /// What the run wrote to its log (its last 64 KiB), once the log
    /// watcher has caught up with its output.
    async fn run_log(&self) -> String {
        let (done, flushed) = oneshot::channel();
        let _ = self.ctx.log_cmds.send(LogCmd::Flush {
            name: self.key().to_owned(),
            done,
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), flushed).await;
        let path = self.ctx.logs.path(self.key());
        let from = self.log_from;
        let read = move || -> std::io::Result<Vec<u8>> {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(&path)?;
            let len = f.metadata()?.len();
            // A rotation since the start: the new file is all this run's.
            let from = if len < from { 0 } else { from };
            let from = from.max(len.saturating_sub(64 << 10));
            f.seek(SeekFrom::Start(from))?;
            let mut buf = Vec::new();
            f.take(len - from).read_to_end(&mut buf)?;
            Ok(buf)
        };
        let buf = tokio::task::spawn_blocking(read)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The log's length now: where a run that starts now begins writing.
    fn log_length(&self) -> u64 {
        std::fs::metadata(self.ctx.logs.path(self.key())).map_or(0, |m| m.len())
    }

    /// Watches a running task: its exit, commands, health probes.
    async fn supervise(&mut self, run: &mut Running) -> Ended {
        let check = self.a.spec.healthcheck.clone();
        // A task with a boot timeout (a VM) has booted once its health
        // check passes: until then its failures do not count and it is
        // probed quickly (its grace is the boot timeout), and at the
        // timeout it is killed.
        let boot_timeout = run.driver.boot_timeout().filter(|_| check.is_some());
        let timing = match boot_timeout {
            Some(t) => health::HealthTiming {
                grace: self.ctx.health.grace.max(t),
                ..self.ctx.health
            },
            None => self.ctx.health,
        };
        let port = self.a.spec.proxyport;
        let started = Instant::now();
        let mut probes = 0u32;
        let mut passed = false;
        let mut failures = 0u32;
        let mut next_probe = started + health::probe_delay(&timing, 0, Duration::ZERO, false);
        // The probe in flight and when it began; exits and commands are
        // handled while it runs.
        let mut probe: Option<BoxFuture<'static, Result<(), String>>> = None;
        let mut probe_began = started;
        // Without a health check, a daemon on probation (see
        // `started_state`) runs once it has stayed up this long.
        let mut on_probation = check.is_none() && self.status.state == ServiceState::Starting;
        let probation_ends = started + self.ctx.min_uptime;
        let boot_deadline = started + boot_timeout.unwrap_or_default();
        loop {
            tokio::select! {
                // A stop that arrives with an exit wins: no restart then.
                biased;
                cmd = self.cmds.recv() => {
                    let cmd = match cmd {
                        Some(Cmd::Relink(links)) => {
                            self.relink(links);
                            continue;
                        }
                        Some(Cmd::Readdress(a, done)) => {
                            self.readdress(*a, done);
                            continue;
                        }
                        other => other,
                    };
                    if let Some(Cmd::Held(a, why)) = &cmd {
                        self.status.message = Some(format!(
                            "generation {} keeps running: generation {} is held back: {why}",
                            self.a.generation, a.generation
                        ));
                        self.report();
                        continue;
                    }
                    if let Some(Cmd::Replace(_) | Cmd::Stop) = &cmd {
                        self.set(ServiceState::Exited, Some("stopping".into()));
                        let exit = run.driver.stop(&mut run.handle, self.ctx.stop_timeout).await;
                        self.status.last_exit = Some(exit);
                        self.status.pid = None;
                    }
                    // With no command sender the minion is shutting down;
                    // the task stays for the next minion to adopt.
                    return Ended::Command(cmd);
                }
                exit = run.handle.process.wait() => return Ended::Exited(exit),
                result = probe_result(probe.as_mut()) => {
                    probe = None;
                    probes += 1;
                    let since_start = probe_began - started;
                    match result {
                        Ok(()) => {
                            passed = true;
                            failures = 0;
                            if self.status.health != Health::Healthy || self.status.state != ServiceState::Running {
                                self.status.health = Health::Healthy;
                                self.set(ServiceState::Running, None);
                            }
                        }
                        Err(e) if health::failure_counts(&timing, since_start) => {
                            failures += 1;
                            if failures >= HEALTH_FAILURES {
                                tracing::info!(service = %self.key(), "unhealthy: {e}; restarting");
                                self.status.health = Health::Unhealthy;
                                self.set(ServiceState::Unhealthy, Some(e));
                                let exit = run.driver.stop(&mut run.handle, self.ctx.stop_timeout).await;
                                return Ended::Unhealthy(exit);
                            }
                        }
                        // Still in its start-up grace.
                        Err(_) => {}
                    }
                    next_probe = Instant::now() + health::probe_delay(&timing, probes, since_start, passed);
                }
                _ = tokio::time::sleep_until(boot_deadline), if boot_timeout.is_some() && !passed => {
                    let why = format!(
                        "did not boot within {} s: its health check never passed",
                        boot_timeout.unwrap_or_default().as_secs_f64()
                    );
                    tracing::info!(service = %self.key(), "{why}; killing it");
                    self.status.health = Health::Unhealthy;
                    self.set(ServiceState::Unhealthy, Some(why.clone()));
                    // A guest that never booted heeds no power button.
                    run.handle.process.signal(libc::SIGKILL);
                    let exit = run.handle.process.wait().await;
                    self.failure = Some(why);
                    return Ended::NotBooted(exit);
                }
                _ = tokio::time::sleep_until(probation_ends), if on_probation => {
                    on_probation = false;
                    self.set(ServiceState::Running, None);
                }
                _ = tokio::time::sleep_until(next_probe), if probe.is_none() && check.is_some() => {
                    let path = check.as_deref().unwrap_or("/");
                    probe_began = Instant::now();
                    probe = Some(self.ctx.probe.probe(self.service_addr(), port, path, timing.timeout));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The runner against a fake driver and a fake health probe, in paused
    //! time: what is asserted is the policy, to the millisecond.

    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::sync::watch;

    use super::*;
    use crate::driver::{Artifact, DriverError, DriverName, Drivers, RunningTask};
    use crate::health::{HealthProbe, HealthTiming};
    use crate::hooks::ServiceCgroups;
    use crate::images::ImageCache;
    use crate::logs::LogFiles;
    use crate::state::LocalState;
    use phoenix_host::cgroup::Cgroups;
    use phoenix_host::{FsMagic, Host, Recording};

    const MS: Duration = Duration::from_millis(1);
    const STOP_TIMEOUT: Duration = Duration::from_secs(3);
    const IMAGE_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    /// What a fake task does once started.
    #[derive(Clone, Copy, Debug, Default)]
    struct Behaviour {
        /// Exits by itself this long after its start, with this code.
        exits_after: Option<(Duration, i32)>,
        /// Only SIGKILL ends it.
        ignores_term: bool,
        /// Forks a grandchild that leaves its process group (`setsid`).
        forks_away: bool,
    }

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Event {
        Start(u32),
        Signal(u32, i32),
        Destroy(Option<u32>),
    }

    type Events = Arc<Mutex<Vec<(Instant, Event)>>>;

    fn record(events: &Events, e: Event) {
        events.lock().unwrap().push((Instant::now(), e));
    }

    struct FakeTask {
        pid: u32,
        behaviour: Behaviour,
        started: Instant,
        ended: Arc<watch::Sender<Option<Exit>>>,
        events: Events,
    }

    fn exit(code: Option<i32>, signal: Option<i32>) -> Exit {
        Exit {
            code,
            signal,
            at: now_ms(),
        }
    }

    impl RunningTask for FakeTask {
        fn wait(&mut self) -> BoxFuture<'_, Exit> {
            let mut ended = self.ended.subscribe();
            let by_itself = self
                .behaviour
                .exits_after
                .map(|(after, code)| (self.started + after, code));
            Box::pin(async move {
                let own_end = async {
                    match by_itself {
                        Some((at, code)) => {
                            tokio::time::sleep_until(at).await;
                            exit(Some(code), None)
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    e = ended.wait_for(Option::is_some) => e.unwrap().unwrap(),
                    e = own_end => e,
                }
            })
        }

        fn signal(&self, signal: i32) {
            record(&self.events, Event::Signal(self.pid, signal));
            if signal == libc::SIGKILL || (signal == libc::SIGTERM && !self.behaviour.ignores_term)
            {
                end(&self.ended, exit(None, Some(signal)));
            }
        }
    }

    fn end(ended: &watch::Sender<Option<Exit>>, e: Exit) {
        ended.send_if_modified(|x| {
            let first = x.is_none();
            if first {
                *x = Some(e);
            }
            first
        });
    }

    #[derive(Default)]
    struct FakeDriver {
        /// What each start does, in order; past the end, a task that runs
        /// until signalled. `Err`: the start fails with that message.
        script: Mutex<VecDeque<Result<Behaviour, String>>>,
        /// Tasks a previous minion left running, by pid.
        survivors: Mutex<HashMap<u32, Behaviour>>,
        /// The end of each task started or recovered, by pid.
        live: Mutex<HashMap<u32, Arc<watch::Sender<Option<Exit>>>>>,
        next_pid: AtomicU32,
        events: Events,
        /// The fake host the runner's cgroups are on.
        host: Option<Arc<Recording>>,
        /// What `Driver::boot_timeout` says (a VM's).
        boot_timeout: Mutex<Option<Duration>>,
    }

    impl FakeDriver {
        fn handle(&self, pid: u32, behaviour: Behaviour) -> TaskHandle {
            let ended = Arc::new(watch::Sender::new(None));
            self.live.lock().unwrap().insert(pid, ended.clone());
            TaskHandle {
                pid,
                start_time: u64::from(pid) * 10,
                process: Box::new(FakeTask {
                    pid,
                    behaviour,
                    started: Instant::now(),
                    ended,
                    events: self.events.clone(),
                }),
            }
        }

        /// Makes task `pid` exit with `code`, as a crash would.
        fn crash(&self, pid: u32, code: i32) {
            end(&self.live.lock().unwrap()[&pid], exit(Some(code), None));
        }

        fn events(&self) -> Vec<(Instant, Event)> {
            self.events.lock().unwrap().clone()
        }

        fn starts(&self) -> Vec<Instant> {
            self.events()
                .into_iter()
                .filter_map(|(at, e)| matches!(e, Event::Start(_)).then_some(at))
                .collect()
        }
    }

    impl Driver for FakeDriver {
        fn name(&self) -> DriverName {
            DriverName::Exec
        }

        fn prepare<'a>(
            &'a self,
            image: &'a Path,
            _a: &'a Assignment,
        ) -> BoxFuture<'a, Result<Artifact, DriverError>> {
            Box::pin(std::future::ready(Ok(Artifact {
                path: image.to_owned(),
            })))
        }

        fn start<'a>(
            &'a self,
            task: TaskConfig<'a>,
        ) -> BoxFuture<'a, Result<TaskHandle, DriverError>> {
            let step = self.script.lock().unwrap().pop_front();
            let result = match step.unwrap_or(Ok(Behaviour::default())) {
                Ok(behaviour) => {
                    let pid = 1000 + self.next_pid.fetch_add(1, Ordering::SeqCst);
                    record(&self.events, Event::Start(pid));
                    // What joining the cgroups before exec does on a real
                    // host: the task, and what it forks, are in them.
                    if let Some(host) = &self.host
                        && task.cgroup.is_some()
                    {
                        let procs = cgroup_dir(task.name()).join("cgroup.procs");
                        host.add_process(pid, pid, u64::from(pid) * 10);
                        host.write_file(&procs, pid.to_string().as_bytes()).unwrap();
                        if behaviour.forks_away {
                            let away = pid + GRANDCHILD;
                            host.add_process(away, away, 1);
                            host.write_file(&procs, away.to_string().as_bytes())
                                .unwrap();
                        }
                    }
                    Ok(self.handle(pid, behaviour))
                }
                Err(why) => Err(DriverError::Container(why)),
            };
            Box::pin(std::future::ready(result))
        }

        fn recover(&self, record: &RunRecord) -> Option<TaskHandle> {
            let behaviour = self.survivors.lock().unwrap().remove(&record.pid)?;
            (record.start_time == u64::from(record.pid) * 10)
                .then(|| self.handle(record.pid, behaviour))
        }

        fn destroy<'a>(&'a self, _dir: TaskDir<'a>, task: Option<TaskHandle>) -> BoxFuture<'a, ()> {
            record(&self.events, Event::Destroy(task.map(|t| t.pid)));
            Box::pin(std::future::ready(()))
        }

        fn boot_timeout(&self) -> Option<Duration> {
            *self.boot_timeout.lock().unwrap()
        }
    }

    /// Answers from a function of the time since the test began.
    struct FakeProbe {
        began: Instant,
        healthy: Mutex<Box<dyn Fn(Duration) -> bool + Send>>,
    }

    impl HealthProbe for FakeProbe {
        fn probe(
            &self,
            _addr: Option<std::net::IpAddr>,
            _port: u16,
            path: &str,
            _timeout: Duration,
        ) -> BoxFuture<'static, Result<(), String>> {
            let ok = (self.healthy.lock().unwrap())(self.began.elapsed());
            let result = if ok {
                Ok(())
            } else {
                Err(format!("GET {path}: connection refused"))
            };
            Box::pin(std::future::ready(result))
        }
    }

    /// A pure cgroup v2 host with `cgroup.kill`, as the fake builds it.
    fn cgroup_v2_host() -> Arc<Recording> {
        let h = Arc::new(Recording::new());
        h.cgroupfs(
            "/sys/fs/cgroup",
            FsMagic::CGROUP2,
            &[
                ("cgroup.procs", ""),
                ("cgroup.kill", ""),
                ("cgroup.subtree_control", ""),
                ("memory.max", "max"),
                ("cpu.max", "max 100000"),
            ],
        );
        h.put_file("/sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n");
        h.put_file("/sys/fs/cgroup/cgroup.subtree_control", "");
        h
    }

    /// Where the fake host has service `name`'s cgroup (the harness's
    /// minion key is "key").
    fn cgroup_dir(name: &str) -> std::path::PathBuf {
        let minion = blake3::hash(b"key").to_hex();
        let name = name.replace('.', "_");
        Path::new("/sys/fs/cgroup/phoenix").join(format!("{name}@{}", &minion[..8]))
    }

    /// A fake task's grandchild that left its group has this pid + the
    /// task's.
    const GRANDCHILD: u32 = 50_000;

    struct Harness {
        ctx: Arc<Ctx>,
        host: Arc<Recording>,
        driver: Arc<FakeDriver>,
        probe: Arc<FakeProbe>,
        reports: mpsc::UnboundedReceiver<Report>,
        began: Instant,
        _dir: tempfile::TempDir,
    }

    fn assignment(spec: serde_json::Value, generation: u64) -> Assignment {
        let mut json =
            serde_json::json!({"machine": "m1", "name": "svc", "type": "binary", "image": "img"});
        json.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        let spec = phoenix_model::spec::parse_specs("t", &json.to_string())
            .unwrap()
            .remove(0);
        Assignment {
            spec,
            ip: phoenix_model::net::service_ip(0),
            image_hash: IMAGE_HASH.into(),
            image_size: 0,
            generation,
            links: Default::default(),
            instance: None,
            own_ip: None,
            holds_ip: true,
            env: None,
        }
    }

    impl Harness {
        /// Daemons without a health check run at once, as the policy
        /// tests below assume; see `with_min_uptime`.
        fn new() -> Harness {
            Harness::with_min_uptime(Duration::ZERO)
        }

        fn with_min_uptime(min_uptime: Duration) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let state = LocalState::new(dir.path().to_owned()).unwrap();
            let images = ImageCache::new(
                dir.path().join("images"),
                "127.0.0.1:9".parse().unwrap(),
                "m1".into(),
                "key".into(),
                None,
            )
            .unwrap();
            std::fs::write(images.path(IMAGE_HASH), b"").unwrap();
            let host = cgroup_v2_host();
            let driver = Arc::new(FakeDriver {
                host: Some(host.clone()),
                ..FakeDriver::default()
            });
            let began = Instant::now();
            let probe = Arc::new(FakeProbe {
                began,
                healthy: Mutex::new(Box::new(|_| true)),
            });
            let (reports_tx, reports) = mpsc::unbounded_channel();
            let (log_cmds, _) = mpsc::unbounded_channel();
            let ctx = Arc::new(Ctx {
                images,
                desired_writer: std::sync::mpsc::channel().0,
                drivers: Drivers::new(driver.clone(), driver.clone()),
                cgroups: ServiceCgroups::new(Cgroups::at(host.clone(), "/sys/fs/cgroup"), "key"),
                nets: crate::hooks::net::ServiceNetworks::new(
                    crate::hooks::net::NetMode::Host,
                    "test",
                ),
                host: host.clone(),
                probe: probe.clone(),
                logs: LogFiles {
                    dir: dir.path().join("logs"),
                    max_bytes: 1 << 20,
                    keep: 1,
                },
                log_cmds,
                state,
                health: HealthTiming {
                    grace: Duration::from_secs(1),
                    interval: Duration::from_secs(2),
                    timeout: Duration::from_millis(500),
                },
                stop_timeout: STOP_TIMEOUT,
                min_uptime,
                reports: reports_tx,
            });
            Harness {
                ctx,
                host,
                driver,
                probe,
                reports,
                began,
                _dir: dir,
            }
        }

        /// Starts a runner for `a`; its command channel.
        fn run(&self, a: &Assignment) -> mpsc::UnboundedSender<Cmd> {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(TaskRunner::new(self.ctx.clone(), a.clone(), rx).run());
            tx
        }

        /// The time since the test began.
        fn now(&self) -> Duration {
            self.began.elapsed()
        }

        /// The next report (a test that waits in vain fails, it does not hang).
        async fn next(&mut self) -> Report {
            tokio::time::timeout(Duration::from_secs(3600), self.reports.recv())
                .await
                .expect("no report within an hour")
                .expect("reports closed")
        }

        /// Skips status reports until one satisfies `pred`.
        async fn until(&mut self, pred: impl Fn(&ServiceStatus) -> bool) -> ServiceStatus {
            loop {
                if let Report::Status(s) = self.next().await
                    && pred(&s)
                {
                    return s;
                }
            }
        }

        /// The statuses reported until one satisfies `pred` (included).
        async fn collect(&mut self, pred: impl Fn(&ServiceStatus) -> bool) -> Vec<ServiceStatus> {
            let mut seen = Vec::new();
            loop {
                if let Report::Status(s) = self.next().await {
                    let done = pred(&s);
                    seen.push(s);
                    if done {
                        return seen;
                    }
                }
            }
        }
    }

    fn running(s: &ServiceStatus) -> bool {
        s.state == ServiceState::Running
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_restarts_at_once_then_with_growing_backoff() {
        let mut h = Harness::new();
        let a = assignment(serde_json::json!({}), 1);
        let _cmds = h.run(&a);
        let first = h.until(running).await;
        assert_eq!((first.restarts, first.health), (0, Health::None));

        let mut pid = first.pid.unwrap();
        let mut waits = Vec::new();
        for restarts in 1..=4 {
            let crashed_at = h.now();
            h.driver.crash(pid, 1);
            let s = h.until(running).await;
            assert_eq!(s.restarts, restarts);
            assert_eq!(s.last_exit.unwrap().code, Some(1));
            assert_ne!(s.pid, Some(pid));
            pid = s.pid.unwrap();
            waits.push(h.now() - crashed_at);
        }
        assert_eq!(waits, [Duration::ZERO, 100 * MS, 200 * MS, 400 * MS]);

        // A run past STABLE_RUN resets the backoff: the next crash restarts
        // at once again.
        tokio::time::sleep(STABLE_RUN).await;
        let crashed_at = h.now();
        h.driver.crash(pid, 1);
        let s = h.until(running).await;
        assert_eq!((s.restarts, h.now() - crashed_at), (5, Duration::ZERO));
        // Each run was destroyed once it ended.
        let destroyed = h
            .driver
            .events()
            .iter()
            .filter(|(_, e)| matches!(e, Event::Destroy(Some(_))))
            .count();
        assert_eq!(destroyed, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loop_is_reported_as_backoff_with_the_reason() {
        let mut h = Harness::new();
        let crashes = Behaviour {
            exits_after: Some((10 * MS, 3)),
            ..Behaviour::default()
        };
        h.driver
            .script
            .lock()
            .unwrap()
            .extend(std::iter::repeat_n(Ok(crashes), 5));
        let a = assignment(serde_json::json!({}), 1);
        let _cmds = h.run(&a);
        let seen = h.collect(|s| running(s) && s.restarts == 5).await;
        let backoffs: Vec<&str> = seen
            .iter()
            .filter(|s| s.state == ServiceState::Backoff)
            .map(|s| s.message.as_deref().unwrap())
            .collect();
        assert_eq!(
            backoffs,
            [
                "exited with code 3; restarting in 100 ms",
                "exited with code 3; restarting in 200 ms",
                "exited with code 3; restarting in 400 ms",
                "exited with code 3; restarting in 800 ms",
            ]
        );
        let starts = h.driver.starts();
        let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        // 10 ms of running, then the backoff.
        assert_eq!(gaps, [10 * MS, 110 * MS, 210 * MS, 410 * MS, 810 * MS]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_never_boots_is_killed_at_its_boot_timeout_and_backs_off() {
        let mut h = Harness::new();
        let boot = Duration::from_secs(30);
        *h.driver.boot_timeout.lock().unwrap() = Some(boot);
        *h.probe.healthy.lock().unwrap() = Box::new(|_| false);
        let a = assignment(serde_json::json!({"healthcheck": "/health"}), 1);
        let _cmds = h.run(&a);
        // Failures do not count in the boot timeout, although it is past
        // the health grace (1 s): killed at 30 s, not unhealthy before.
        let killed = h.until(|s| s.state == ServiceState::Unhealthy).await;
        assert_eq!(h.now(), boot);
        assert_eq!(
            killed.message.as_deref(),
            Some("did not boot within 30 s: its health check never passed")
        );
        // Killed outright, restarted at once saying why.
        let again = h.until(|s| s.state == ServiceState::Starting).await;
        assert_eq!(
            again.message.as_deref(),
            Some("restarted after: did not boot within 30 s: its health check never passed")
        );
        assert_eq!(again.last_exit.unwrap().signal, Some(libc::SIGKILL));
        // A 30 s run that never booted is no stable run: the next one backs off.
        let backoff = h.until(|s| s.state == ServiceState::Backoff).await;
        assert_eq!(
            backoff.message.as_deref(),
            Some(
                "did not boot within 30 s: its health check never passed; exited with signal 9; restarting in 100 ms"
            )
        );
        let signals: Vec<i32> = h
            .driver
            .events()
            .into_iter()
            .filter_map(|(_, e)| match e {
                Event::Signal(_, s) => Some(s),
                _ => None,
            })
            .collect();
        assert!(!signals.contains(&libc::SIGTERM), "{signals:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_booting_task_that_passes_its_check_runs_and_later_failures_count() {
        let mut h = Harness::new();
        *h.driver.boot_timeout.lock().unwrap() = Some(Duration::from_secs(30));
        // Boots after 20 s, fails from 40 s on.
        *h.probe.healthy.lock().unwrap() =
            Box::new(|t| t >= Duration::from_secs(20) && t < Duration::from_secs(40));
        let a = assignment(serde_json::json!({"healthcheck": "/health"}), 1);
        let _cmds = h.run(&a);
        let up = h.until(running).await;
        assert!(h.now() >= Duration::from_secs(20) && h.now() < Duration::from_secs(21));
        assert_eq!(up.health, Health::Healthy);
        let sick = h.until(|s| s.state == ServiceState::Unhealthy).await;
        assert!(sick.message.unwrap().contains("connection refused"));
        assert!(h.now() < Duration::from_secs(45), "{:?}", h.now());
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_killed_by_its_cgroups_oom_killer_says_out_of_memory() {
        // On probation after a start, so `starting` between the runs.
        let mut h = Harness::with_min_uptime(Duration::from_secs(1));
        let a = assignment(serde_json::json!({"memory": "64M"}), 1);
        let _cmds = h.run(&a);
        let s = h.until(running).await;
        h.host.put_file(
            cgroup_dir("svc").join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        );
        h.driver.crash(s.pid.unwrap(), 137);
        let again = h.until(|s| s.state == ServiceState::Starting).await;
        assert_eq!(
            again.message.as_deref(),
            Some(
                "restarted after: out of memory: the kernel's OOM killer killed 1 of its processes at its memory limit of 64 MiB"
            )
        );
        // Said until it runs again.
        let s = h.until(running).await;
        assert_eq!(s.message, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_start_backs_off_without_counting_a_restart() {
        let mut h = Harness::new();
        h.driver.script.lock().unwrap().extend([
            Err("crun create failed (code 1): no rootfs".to_owned()),
            Err("crun create failed (code 1): no rootfs".to_owned()),
            Ok(Behaviour::default()),
        ]);
        let a = assignment(serde_json::json!({}), 1);
        let _cmds = h.run(&a);
        let seen = h.collect(running).await;
        let backoff = seen
            .iter()
            .find(|s| s.state == ServiceState::Backoff)
            .expect("a backoff before the start that worked");
        assert_eq!(
            backoff.message.as_deref(),
            Some(
                "cannot start \"img\": crun create failed (code 1): no rootfs; restarting in 100 ms"
            )
        );
        let s = seen.last().unwrap();
        assert_eq!((s.restarts, s.last_exit), (0, None));
        // First failure: retried at once; second: after 100 ms.
        assert_eq!(h.now(), 100 * MS);
        assert_eq!(h.driver.starts(), [h.began + 100 * MS]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_that_hangs_escalates_to_sigkill_after_the_stop_timeout() {
        let mut h = Harness::new();
        h.driver.script.lock().unwrap().push_back(Ok(Behaviour {
            ignores_term: true,
            ..Behaviour::default()
        }));
        let a = assignment(serde_json::json!({}), 1);
        let cmds = h.run(&a);
        let pid = h.until(running).await.pid.unwrap();
        assert!(h.ctx.state.run_record("svc").is_some());
        let stop_at = h.began.elapsed();
        cmds.send(Cmd::Stop).ok().unwrap();
        let stopping = h.until(|s| s.state == ServiceState::Exited).await;
        assert_eq!(stopping.message.as_deref(), Some("stopping"));
        loop {
            if let Report::Gone(name) = h.next().await {
                assert_eq!(name, "svc");
                break;
            }
        }
        let events: Vec<(Duration, Event)> = h
            .driver
            .events()
            .into_iter()
            .map(|(at, e)| (at - h.began - stop_at, e))
            .filter(|(_, e)| !matches!(e, Event::Start(_)))
            .collect();
        assert_eq!(
            events,
            [
                (Duration::ZERO, Event::Signal(pid, libc::SIGTERM)),
                (STOP_TIMEOUT, Event::Signal(pid, libc::SIGKILL)),
                (STOP_TIMEOUT, Event::Destroy(Some(pid))),
            ]
        );
        // A stopped service is forgotten and never restarted.
        assert!(h.ctx.state.run_record("svc").is_none());
        assert_eq!(h.driver.starts().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn oneshots_end_exited_or_failed_and_never_run_twice_per_generation() {
        let mut h = Harness::new();
        let job = |code| {
            Ok(Behaviour {
                exits_after: Some((50 * MS, code)),
                ..Behaviour::default()
            })
        };
        h.driver.script.lock().unwrap().extend([job(0), job(4)]);
        let a = assignment(serde_json::json!({"duration": "oneshot"}), 1);
        let cmds = h.run(&a);
        let s = h.until(|s| s.state == ServiceState::Exited).await;
        assert_eq!(s.last_exit.unwrap().code, Some(0));
        assert_eq!(s.restarts, 0);
        assert_eq!(h.ctx.state.done_record("svc").unwrap().generation, 1);

        // The minion restarts: the same generation is not run again.
        drop(cmds);
        let cmds = h.run(&a);
        let s = h.until(|_| true).await;
        assert_eq!(s.state, ServiceState::Exited);
        assert_eq!(s.last_exit.unwrap().code, Some(0));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(h.driver.starts().len(), 1);

        // A new generation runs; a non-zero exit is a failure, not restarted.
        let a2 = assignment(serde_json::json!({"duration": "oneshot"}), 2);
        cmds.send(Cmd::Replace(Box::new(a2))).ok().unwrap();
        let s = h.until(|s| s.state == ServiceState::Failed).await;
        assert_eq!((s.generation, s.last_exit.unwrap().code), (2, Some(4)));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(h.driver.starts().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_survived_a_minion_restart_is_adopted() {
        let mut h = Harness::new();
        let a = assignment(serde_json::json!({}), 7);
        h.ctx
            .state
            .save_run(
                "svc",
                &RunRecord {
                    pid: 4242,
                    start_time: 42420,
                    generation: 7,
                    restarts: 5,
                    driver: DriverName::Exec,
                    limits: Some("cpus 0.5 (cgroup v1)".into()),
                },
            )
            .unwrap();
        h.driver
            .survivors
            .lock()
            .unwrap()
            .insert(4242, Behaviour::default());
        let cmds = h.run(&a);
        let s = h.until(running).await;
        assert_eq!((s.pid, s.restarts), (Some(4242), 5));
        assert_eq!(s.limits.as_deref(), Some("cpus 0.5 (cgroup v1)"));
        assert!(
            h.driver.starts().is_empty(),
            "an adopted task is not started"
        );

        // Its crash is a restart like any other, counted on from the record.
        h.driver.crash(4242, 9);
        let s = h.until(running).await;
        assert_eq!(s.restarts, 6);
        let rec = h.ctx.state.run_record("svc").unwrap();
        assert_eq!((rec.pid, rec.restarts), (s.pid.unwrap(), 6));

        // The minion shuts down: the task runs on, untouched, for the next.
        let before = h.driver.events().len();
        drop(cmds);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(h.driver.events().len(), before);
        assert!(h.ctx.state.run_record("svc").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_of_another_generation_is_killed_and_replaced() {
        let mut h = Harness::new();
        h.ctx
            .state
            .save_run(
                "svc",
                &RunRecord {
                    pid: 4242,
                    start_time: 42420,
                    generation: 1,
                    restarts: 5,
                    driver: DriverName::Exec,
                    limits: None,
                },
            )
            .unwrap();
        h.driver
            .survivors
            .lock()
            .unwrap()
            .insert(4242, Behaviour::default());
        let _cmds = h.run(&assignment(serde_json::json!({}), 2));
        let s = h.until(running).await;
        assert_eq!(s.restarts, 0);
        let events: Vec<Event> = h.driver.events().into_iter().map(|(_, e)| e).collect();
        assert_eq!(
            events,
            [
                Event::Signal(4242, libc::SIGKILL),
                Event::Destroy(Some(4242)),
                Event::Start(s.pid.unwrap()),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_service_that_answers_at_once_is_healthy_within_milliseconds() {
        let mut h = Harness::new();
        let a = assignment(serde_json::json!({"healthcheck": "/health"}), 1);
        let _cmds = h.run(&a);
        let s = h.until(running).await;
        assert_eq!(s.health, Health::Healthy);
        assert_eq!(h.now(), 10 * MS);

        h.driver.crash(s.pid.unwrap(), 1);
        let crashed_at = h.now();
        let restarted = h.until(|s| s.restarts == 1).await;
        assert_eq!(
            (restarted.state, restarted.health),
            (ServiceState::Starting, Health::Pending)
        );
        let s = h.until(running).await;
        assert_eq!((s.restarts, s.health), (1, Health::Healthy));
        assert_eq!(h.now() - crashed_at, 10 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_count_only_after_the_grace_then_restart_the_service() {
        let mut h = Harness::new();
        // Refuses until 400 ms, serves until 5 s, then fails for good.
        *h.probe.healthy.lock().unwrap() =
            Box::new(|t| t >= 400 * MS && t < Duration::from_secs(5));
        let a = assignment(serde_json::json!({"healthcheck": "/health"}), 1);
        let _cmds = h.run(&a);
        let s = h.until(running).await;
        assert_eq!((s.health, s.restarts), (Health::Healthy, 0));
        // Probed at 10, 30, 70, 150, 250, 350, 450 ms: healthy at the first
        // probe after it began to serve, with its failures forgiven.
        assert_eq!(h.now(), 450 * MS);
        let pid = s.pid.unwrap();

        // Then every 2 s: 2450, 4450 pass; 6450 and 8450 fail.
        let s = h.until(|s| s.state == ServiceState::Unhealthy).await;
        assert_eq!(h.now(), 8450 * MS);
        assert_eq!(s.health, Health::Unhealthy);
        assert_eq!(
            s.message.as_deref(),
            Some("GET /health: connection refused")
        );
        let s = h.until(|s| s.restarts == 1).await;
        assert_eq!(s.last_exit.unwrap().signal, Some(libc::SIGTERM));
        assert!(
            h.driver
                .events()
                .iter()
                .any(|(_, e)| *e == Event::Signal(pid, libc::SIGTERM))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_daemon_without_a_health_check_runs_only_after_its_minimum_uptime() {
        let mut h = Harness::with_min_uptime(Duration::from_secs(1));
        // Exits with 2 after 500 ms, twice; then stays up.
        let early = Behaviour {
            exits_after: Some((500 * MS, 2)),
            ..Behaviour::default()
        };
        h.driver
            .script
            .lock()
            .unwrap()
            .extend([Ok(early), Ok(early)]);
        let a = assignment(serde_json::json!({}), 1);
        let _cmds = h.run(&a);
        let seen = h.collect(running).await;
        // Never reported running before it stayed up: starting, then the
        // first crash restarts at once, the second backs off (which is what
        // fails a deploy).
        let states: Vec<ServiceState> = seen.iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [
                ServiceState::Starting,
                ServiceState::Starting,
                ServiceState::Backoff,
                ServiceState::Starting,
                ServiceState::Running,
            ]
        );
        assert_eq!(
            seen[2].message.as_deref(),
            Some("exited with code 2; restarting in 100 ms")
        );
        // 500 + 500 ms of crashing, a 100 ms backoff, then 1 s of uptime
        // (and whatever the starts themselves take).
        assert!((2100 * MS..2110 * MS).contains(&h.now()), "{:?}", h.now());

        // A task adopted after a minion restart has shown it stays up.
        let mut h = Harness::with_min_uptime(Duration::from_secs(1));
        h.ctx
            .state
            .save_run(
                "svc",
                &RunRecord {
                    pid: 4242,
                    start_time: 42420,
                    generation: 1,
                    restarts: 0,
                    driver: DriverName::Exec,
                    limits: None,
                },
            )
            .unwrap();
        h.driver
            .survivors
            .lock()
            .unwrap()
            .insert(4242, Behaviour::default());
        let _cmds = h.run(&a);
        let s = h.next().await;
        assert!(matches!(&s, Report::Status(s) if running(s)));
        assert_eq!(h.now(), Duration::ZERO);
    }

    /// The pids the fake host lists in service `name`'s cgroup.
    fn cgroup_pids(h: &Harness, name: &str) -> Vec<u32> {
        h.host
            .file(cgroup_dir(name).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn every_task_runs_in_its_cgroup_with_its_limits_and_nothing_outlives_a_run() {
        let mut h = Harness::new();
        let forks = Ok(Behaviour {
            forks_away: true,
            ..Behaviour::default()
        });
        h.driver
            .script
            .lock()
            .unwrap()
            .extend([forks.clone(), forks]);
        let a = assignment(serde_json::json!({"memory": "64M", "cpus": 0.5}), 1);
        let cmds = h.run(&a);
        let s = h.until(running).await;
        let limits = "memory 64 MiB, cpus 0.5 (cgroup v2)";
        assert_eq!(s.limits.as_deref(), Some(limits));
        let pid = s.pid.unwrap();
        assert_eq!(cgroup_pids(&h, "svc"), [pid, pid + GRANDCHILD]);
        assert_eq!(
            h.host.file(cgroup_dir("svc").join("memory.max")).as_deref(),
            Some("67108864")
        );
        // The status line is kept for a restarted minion.
        let rec = h.ctx.state.run_record("svc").unwrap();
        assert_eq!(rec.limits.as_deref(), Some(limits));

        // A crash: the grandchild that left the group goes before the
        // restart, which gets fresh cgroups.
        h.driver.crash(pid, 1);
        let s = h.until(|s| running(s) && s.restarts == 1).await;
        assert!(
            !h.host.is_running(pid + GRANDCHILD),
            "the grandchild survived a crash"
        );
        let pid = s.pid.unwrap();
        assert_eq!(cgroup_pids(&h, "svc"), [pid, pid + GRANDCHILD]);

        // A stop (`del`): nothing of it is left, nor any cgroup folder.
        cmds.send(Cmd::Stop).ok().unwrap();
        loop {
            if let Report::Gone(_) = h.next().await {
                break;
            }
        }
        assert!(
            !h.host.is_running(pid + GRANDCHILD),
            "the grandchild survived del"
        );
        assert!(!h.host.exists(cgroup_dir("svc")));
        assert!(!h.host.exists("/sys/fs/cgroup/phoenix"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_whose_run_record_cannot_be_saved_is_stopped_at_once() {
        let mut h = Harness::new();
        // The record's temporary file cannot be written (as on a full disk).
        let blocker = h.ctx.state.dir.join("run/svc.json.tmp");
        std::fs::create_dir(&blocker).unwrap();
        let a = assignment(serde_json::json!({}), 1);
        let _cmds = h.run(&a);
        let s = h.until(|s| s.state == ServiceState::Backoff).await;
        let message = s.message.unwrap();
        assert!(
            message.starts_with("cannot start \"img\": cannot record its process in "),
            "{message}"
        );
        assert!(message.contains("run/svc.json"), "{message}");
        let first = match h.driver.events()[0].1 {
            Event::Start(pid) => pid,
            ref e => panic!("{e:?}"),
        };
        assert!(
            h.driver
                .events()
                .iter()
                .any(|(_, e)| *e == Event::Signal(first, libc::SIGKILL)),
            "the unrecorded task was not killed"
        );
        assert!(!h.host.is_running(first));
        assert!(h.ctx.state.run_record("svc").is_none());

        // Once the record can be written, it starts; no restart counted.
        std::fs::remove_dir(&blocker).unwrap();
        let s = h.until(running).await;
        assert_eq!(s.restarts, 0);
        assert_eq!(h.ctx.state.run_record("svc").unwrap().pid, s.pid.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn what_a_task_that_died_while_the_minion_was_down_left_is_killed_first() {
        let mut h = Harness::new();
        h.ctx
            .state
            .save_run(
                "svc",
                &RunRecord {
                    pid: 4242,
                    start_time: 42420,
                    generation: 3,
                    restarts: 5,
                    driver: DriverName::Exec,
                    limits: None,
                },
            )
            .unwrap();
        // 4242 is gone; its child, in the service's cgroup, is not.
        let cgroups = Cgroups::at(h.host.clone(), "/sys/fs/cgroup");
        let left = cgroups
            .create(
                &h.ctx.cgroups.cgroup_name("svc"),
                &phoenix_host::cgroup::Limits::default(),
            )
            .unwrap();
        h.host.add_process(777, 777, 1);
        left.add(777).unwrap();
        let _cmds = h.run(&assignment(serde_json::json!({}), 3));
        let s = h.until(running).await;
        assert!(
            !h.host.is_running(777),
            "a leftover child runs beside the restart"
        );
        // The count goes on from the record: its death was a restart.
        assert_eq!(s.restarts, 6);
        assert_eq!(cgroup_pids(&h, "svc"), [s.pid.unwrap()]);
    }

    // ------------------------------------------------ instances (updates)

    /// The run a zero-downtime update starts beside the running one: key
    /// `svc.GENERATION`, its own address, not (yet) holding the stable one.
    fn update_run(generation: u64, holds_ip: bool) -> Assignment {
        let mut a = assignment(serde_json::json!({}), generation);
        a.instance = Some(phoenix_model::proto::instance_key("svc", generation));
        a.own_ip = Some(phoenix_model::net::service_ip(1));
        a.holds_ip = holds_ip;
        a
    }

    fn set(services: &[&Assignment]) -> phoenix_model::proto::DesiredSet {
        phoenix_model::proto::DesiredSet {
            revision: 1,
            services: services.iter().map(|a| (*a).clone()).collect(),
            peers: Vec::new(),
        }
    }

    fn destroyed(h: &Harness, pid: u32) -> bool {
        h.driver
            .events()
            .iter()
            .any(|(_, e)| *e == Event::Destroy(Some(pid)))
    }

    /// Waits for the report that run `key` is gone.
    async fn gone(h: &mut Harness, key: &str) {
        loop {
            if let Report::Gone(k) = h.next().await {
                assert_eq!(k, key, "another run reported gone");
                return;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_runs_beside_the_old_run_and_takes_over_without_a_restart() {
        let mut h = Harness::new();
        let mut sup = crate::supervisor::Supervisor::new(h.ctx.clone());
        let old = assignment(serde_json::json!({}), 1);
        sup.apply(&set(&[&old]));
        let first = h.until(running).await;
        assert_eq!((first.instance.as_deref(), first.key()), (None, "svc"));
        let old_pid = first.pid.unwrap();

        // The new version beside it: a task of its own, reported apart.
        let new = update_run(2, false);
        sup.apply(&set(&[&old, &new]));
        let second = h.until(running).await;
        assert_eq!(second.instance.as_deref(), Some("svc.2"));
        assert_eq!((second.name.as_str(), second.generation), ("svc", 2));
        let new_pid = second.pid.unwrap();
        assert_ne!(new_pid, old_pid);
        assert_eq!(h.driver.starts().len(), 2, "the old run was not touched");
        assert!(!destroyed(&h, old_pid));
        // Every per-run resource is its own.
        let (rec1, rec2) = (
            h.ctx.state.run_record("svc").unwrap(),
            h.ctx.state.run_record("svc.2").unwrap(),
        );
        assert_eq!((rec1.pid, rec1.generation), (old_pid, 1));
        assert_eq!((rec2.pid, rec2.generation), (new_pid, 2));
        assert_eq!(cgroup_pids(&h, "svc"), [old_pid]);
        assert_eq!(cgroup_pids(&h, "svc.2"), [new_pid]);
        assert!(h.ctx.state.work_dir("svc.2").is_dir());
        assert!(h.ctx.state.work_dir("svc").is_dir());

        // The switch, in one set: the new run holds the stable address,
        // the old one is gone. The new run is not restarted.
        let switched = update_run(2, true);
        sup.apply(&set(&[&switched]));
        gone(&mut h, "svc").await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(h.driver.starts().len(), 2, "nothing started");
        assert!(destroyed(&h, old_pid));
        assert!(!destroyed(&h, new_pid), "the new run was restarted");
        assert!(h.host.is_running(new_pid));
        // The old run's records are gone; the new run's are untouched.
        assert!(h.ctx.state.run_record("svc").is_none());
        assert!(!h.ctx.state.work_dir("svc").exists());
        assert_eq!(h.ctx.state.run_record("svc.2").unwrap().pid, new_pid);
        assert!(h.ctx.state.work_dir("svc.2").is_dir());
        assert_eq!(cgroup_pids(&h, "svc.2"), [new_pid]);
        assert!(!h.host.exists(cgroup_dir("svc")));
        assert_eq!(
            h.ctx.cgroups.services(),
            ["svc.2"],
            "cgroups are found again by key"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_of_holds_ip_alone_restarts_nothing() {
        let mut h = Harness::new();
        let mut sup = crate::supervisor::Supervisor::new(h.ctx.clone());
        let a = update_run(3, false);
        sup.apply(&set(&[&a]));
        let pid = h.until(running).await.pid.unwrap();
        for holds_ip in [true, false, true] {
            let mut changed = a.clone();
            changed.holds_ip = holds_ip;
            changed.links = BTreeMap::from([("db".to_owned(), phoenix_model::net::service_ip(9))]);
            sup.apply(&set(&[&changed]));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(h.driver.starts().len(), 1);
        assert!(!destroyed(&h, pid));
        assert_eq!(h.ctx.state.run_record("svc.2").map(|r| r.pid), None);
        assert_eq!(h.ctx.state.run_record("svc.3").unwrap().pid, pid);
        // A new generation still replaces it.
        let mut next = a.clone();
        next.generation = 4;
        sup.apply(&set(&[&next]));
        let s = h.until(|s| running(s) && s.generation == 4).await;
        assert_ne!(s.pid, Some(pid));
        assert!(destroyed(&h, pid));

        // The runner itself: a readdress is acknowledged, nothing restarts.
        let mut h = Harness::new();
        let cmds = h.run(&a);
        let pid = h.until(running).await.pid.unwrap();
        let (done, moved) = oneshot::channel();
        let mut holding = a.clone();
        holding.holds_ip = true;
        cmds.send(Cmd::Readdress(Box::new(holding), Some(done)))
            .ok()
            .unwrap();
        moved.await.expect("the readdress is acknowledged");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(h.driver.starts().len(), 1);
        assert!(!destroyed(&h, pid));
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_one_run_leaves_the_other_runs_records_alone() {
        let mut h = Harness::new();
        let mut sup = crate::supervisor::Supervisor::new(h.ctx.clone());
        let old = assignment(serde_json::json!({"duration": "oneshot"}), 1);
        h.driver.script.lock().unwrap().push_back(Ok(Behaviour {
            exits_after: Some((10 * MS, 0)),
            ..Behaviour::default()
        }));
        let mut new = update_run(2, false);
        new.spec.duration = Lifetime::Daemon;
        sup.apply(&set(&[&old]));
        h.until(|s| s.state == ServiceState::Exited).await;
        assert_eq!(h.ctx.state.done_record("svc").unwrap().generation, 1);
        sup.apply(&set(&[&old, &new]));
        let s = h.until(running).await;
        assert_eq!(s.instance.as_deref(), Some("svc.2"));
        let new_pid = s.pid.unwrap();

        // The update is rolled back: its run goes, the old one's records
        // (here a oneshot's result) stay, and it does not run again.
        sup.apply(&set(&[&old]));
        gone(&mut h, "svc.2").await;
        assert!(destroyed(&h, new_pid));
        assert!(h.ctx.state.run_record("svc.2").is_none());
        assert!(!h.ctx.state.work_dir("svc.2").exists());
        assert!(!h.host.exists(cgroup_dir("svc.2")));
        assert_eq!(h.ctx.state.done_record("svc").unwrap().generation, 1);
        assert!(h.ctx.state.run_record("svc").is_some());
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(h.driver.starts().len(), 2);
    }
}
