//! The supervisor: one task per service, converging on the desired set.
//!
//! [`Supervisor::apply`] compares a new desired set with what runs: services
//! that left the set are stopped, new ones get a task, changed ones (a new
//! generation) are restarted with their new assignment. Each task owns its
//! process and is the only one that touches it; it reports every state change
//! as a [`Report`].
//!
//! Restart policy for daemons: the first restart after a crash is immediate;
//! while it keeps crashing the wait doubles from 100 ms up to 30 s; a run of
//! 10 s counts as stable and resets it. Oneshots are never restarted.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use phoenix_model::proto::{Assignment, DesiredSet};
use phoenix_model::spec::{Duration as Lifetime, Kind};
use phoenix_model::status::{Exit, Health, ServiceState, ServiceStatus, now_ms};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::health::{self, HealthTiming};
use crate::images::ImageCache;
use crate::logs::{LogCmd, LogFiles};
use crate::process::{Launch, Proc, Target, kill_group};
use crate::state::{DoneRecord, LocalState, RunRecord};

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
    pub runtime: crate::container::Runtime,
    pub logs: LogFiles,
    pub log_cmds: mpsc::UnboundedSender<LogCmd>,
    pub state: LocalState,
    pub health: HealthTiming,
    pub stop_timeout: Duration,
    pub reports: mpsc::UnboundedSender<Report>,
}

enum Cmd {
    Replace(Box<Assignment>),
    /// The image of this newer assignment could not be fetched (why): a
    /// running process keeps running; a stopped one tries the new one.
    Held(Box<Assignment>, String),
    Stop,
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
            for name in self.ctx.state.recorded_services() {
                if !wanted.contains_key(name.as_str()) {
                    stop_orphan(&self.ctx, &name);
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
                    tokio::spawn(Task::new(self.ctx.clone(), a.clone(), rx).run());
                }
            }
        }
    }
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

/// Ends the process of a service that is no longer wanted and has no task.
fn stop_orphan(ctx: &Arc<Ctx>, name: &str) {
    let rec = ctx.state.run_record(name);
    if let Some(rec) = &rec {
        let target = if rec.container {
            Target::Single
        } else {
            Target::Group
        };
        if let Some(p) = Proc::adopt(rec.pid, rec.start_time, target) {
            p.signal(libc::SIGKILL);
        }
    }
    let container = rec.is_some_and(|r| r.container);
    let ctx2 = ctx.clone();
    let name2 = name.to_owned();
    tokio::spawn(async move {
        if container {
            let work = ctx2.state.work_dir(&name2);
            ctx2.runtime.cleanup(&name2, &work).await;
        }
        ctx2.state.forget(&name2);
    });
    ctx.logs.remove(name);
    let _ = ctx.reports.send(Report::Gone(name.to_owned()));
}

fn initial_status(a: &Assignment) -> ServiceStatus {
    ServiceStatus {
        name: a.spec.name.clone(),
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

/// How a supervised run ended.
enum Ended {
    Exited(Exit),
    Unhealthy(Exit),
    /// A command came in; the process is already stopped.
    Command(Option<Cmd>),
}

struct Task {
    ctx: Arc<Ctx>,
    a: Assignment,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    status: ServiceStatus,
    /// Crashes since the last stable run.
    consecutive: u32,
}

/// What a task does next after a command.
enum Next {
    /// Start (again) with the current assignment.
    Start,
    /// The service is gone or the minion is shutting down.
    Return,
}

impl Task {
    fn new(ctx: Arc<Ctx>, a: Assignment, cmds: mpsc::UnboundedReceiver<Cmd>) -> Self {
        Task {
            status: initial_status(&a),
            ctx,
            a,
            cmds,
            consecutive: 0,
        }
    }

    fn name(&self) -> &str {
        &self.a.spec.name
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

    /// Handles a command that arrived while no process runs.
    fn command(&mut self, cmd: Option<Cmd>) -> Next {
        match cmd {
            Some(Cmd::Replace(a) | Cmd::Held(a, _)) => {
                self.a = *a;
                self.status = initial_status(&self.a);
                self.consecutive = 0;
                Next::Start
            }
            Some(Cmd::Stop) => {
                self.ctx.state.forget(self.name());
                self.ctx.logs.remove(self.name());
                let _ = self
                    .ctx
                    .log_cmds
                    .send(LogCmd::Unwatch(self.name().to_owned()));
                let _ = self.ctx.reports.send(Report::Gone(self.name().to_owned()));
                Next::Return
            }
            // The supervisor is gone: the minion is shutting down, and its
            // services keep running for the next minion to adopt.
            None => Next::Return,
        }
    }

    /// Waits `d`, or less if a command comes.
    async fn pause(&mut self, d: Duration) -> Option<Next> {
        tokio::select! {
            _ = tokio::time::sleep(d) => None,
            cmd = self.cmds.recv() => Some(self.command(cmd)),
        }
    }

    async fn run(mut self) {
        let mut proc = self.adopt();
        if proc.is_none()
            && self.a.spec.duration == Lifetime::Oneshot
            && let Some(done) = self
                .ctx
                .state
                .done_record(self.name())
                .filter(|d| d.generation == self.a.generation)
        {
            // This generation already ran to its end; never again.
            self.status.restarts = done.restarts;
            self.finish_oneshot(done.exit);
            match self.command_wait().await {
                Next::Start => {}
                Next::Return => return,
            }
        }
        loop {
            let p = match proc.take() {
                Some(p) => p,
                None => match self.start().await {
                    Ok(p) => p,
                    Err(next) => match next {
                        Some(Next::Start) => continue,
                        Some(Next::Return) => return,
                        None => {
                            // Could not start: back off like a crash.
                            if self
                                .after_exit(None)
                                .await
                                .is_some_and(|n| matches!(n, Next::Return))
                            {
                                return;
                            }
                            continue;
                        }
                    },
                },
            };
            let started = Instant::now();
            let ended = self.supervise(p).await;
            // A container leaves crun state, a mount and a writable layer;
            // not when the minion is merely shutting down (Command(None)):
            // then the container keeps running for the next minion to adopt.
            if self.a.spec.kind == Kind::Docker && !matches!(ended, Ended::Command(None)) {
                let work = self.ctx.state.work_dir(self.name());
                self.ctx.runtime.cleanup(self.name(), &work).await;
            }
            let exit = match ended {
                Ended::Command(cmd) => match self.command(cmd) {
                    Next::Start => continue,
                    Next::Return => return,
                },
                Ended::Exited(exit) | Ended::Unhealthy(exit) => exit,
            };
            if started.elapsed() >= STABLE_RUN {
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
                if let Err(e) = self.ctx.state.save_done(self.name(), &done) {
                    tracing::warn!(service = %self.name(), "cannot record oneshot result: {e}");
                }
                self.finish_oneshot(exit);
                match self.command_wait().await {
                    Next::Start => continue,
                    Next::Return => return,
                }
            }
            if let Some(Next::Return) = self.after_exit(Some(exit)).await {
                return;
            }
        }
    }

    /// Waits for the next command while nothing runs.
    async fn command_wait(&mut self) -> Next {
        let cmd = self.cmds.recv().await;
        self.command(cmd)
    }

    fn finish_oneshot(&mut self, exit: Exit) {
        self.status.last_exit = Some(exit);
        let state = if exit.code == Some(0) {
            ServiceState::Exited
        } else {
            ServiceState::Failed
        };
        self.set(state, None);
    }

    /// Counts a restart (if a process ended) and waits its backoff. `Some(next)` if a command
    /// came during the wait.
    async fn after_exit(&mut self, exit: Option<Exit>) -> Option<Next> {
        // A restart is of a process that ran; a start that failed before
        // (an image that could not be fetched) only backs off.
        if exit.is_some() {
            self.status.restarts += 1;
        }
        self.consecutive += 1;
        let delay = backoff(self.consecutive);
        if delay.is_zero() {
            return None;
        }
        let why = match exit {
            Some(e) => format!("exited with {e}"),
            None => self
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

    /// Takes over the process a previous minion run started, if it still runs.
    fn adopt(&mut self) -> Option<Proc> {
        let rec = self.ctx.state.run_record(self.name())?;
        let target = if rec.container {
            Target::Single
        } else {
            Target::Group
        };
        let proc = Proc::adopt(rec.pid, rec.start_time, target);
        if rec.generation != self.a.generation {
            // The spec changed while the minion was down: end the old one
            // (a container's leftovers go when the new one starts).
            if let Some(p) = &proc {
                p.signal(libc::SIGKILL);
            }
            return None;
        }
        let proc = proc?;
        tracing::info!(service = %self.name(), pid = rec.pid, "adopted running process");
        self.status.pid = Some(rec.pid);
        self.status.restarts = rec.restarts;
        let _ = self
            .ctx
            .log_cmds
            .send(LogCmd::Watch(self.name().to_owned()));
        let state = if self.a.spec.healthcheck.is_some() {
            ServiceState::Starting
        } else {
            ServiceState::Running
        };
        self.set(state, None);
        Some(proc)
    }

    /// Fetches the image and starts the process. `Err(Some(next))` when a
    /// command came first, `Err(None)` when it could not start.
    async fn start(&mut self) -> Result<Proc, Option<Next>> {
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
        let program = match image {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(service = %self.name(), "{e}");
                self.status.message = Some(e);
                return Err(None);
            }
        };
        match self.launch(program).await {
            Ok(p) => Ok(p),
            Err(e) => {
                let msg = format!("cannot start {:?}: {e}", self.a.spec.image);
                tracing::warn!(service = %self.name(), "{msg}");
                if self.a.spec.duration == Lifetime::Oneshot {
                    self.set(ServiceState::Failed, Some(msg));
                    return Err(Some(self.command_wait().await));
                }
                self.status.message = Some(msg);
                Err(None)
            }
        }
    }

    /// Starts the process (a binary) or the container (type docker).
    async fn launch(&mut self, program: PathBuf) -> Result<Proc, String> {
        let spec = self.a.spec.clone();
        let cwd = self.ctx.state.work_dir(&spec.name);
        std::fs::create_dir_all(&cwd).map_err(|e| format!("create {}: {e}", cwd.display()))?;
        let ours = vec![
            ("PHOENIX_NAME".to_owned(), spec.name.clone()),
            ("PHOENIX_IP".to_owned(), self.a.ip.to_string()),
            ("PORT".to_owned(), spec.proxyport.to_string()),
        ];
        let log = self
            .ctx
            .logs
            .open_append(&spec.name)
            .map_err(|e| format!("open log: {e}"))?;
        let container = spec.kind == Kind::Docker;
        let proc = if container {
            // No collection while the root filesystem is found or unpacked.
            let _no_collection = self.ctx.images.hold().await;
            let started = self
                .ctx
                .runtime
                .start(&self.a, &program, &cwd, &log, &ours)
                .await?;
            self.status.limits = started.limits;
            Proc::child(started.pid, Target::Single)
        } else {
            let mut env = vec![(
                "PATH".to_owned(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            )];
            env.extend(spec.env_pairs().map(|(k, v)| (k.to_owned(), v.to_owned())));
            env.extend(ours);
            Proc::spawn(Launch {
                program: &program,
                args: &spec.args,
                env,
                cwd: &cwd,
                log,
            })
            .map_err(|e| e.to_string())?
        };
        let pid = proc.pid().unwrap_or(0);
        let start_time = crate::process::process_start_time(pid).unwrap_or(0);
        let rec = RunRecord {
            pid,
            start_time,
            generation: self.a.generation,
            restarts: self.status.restarts,
            container,
        };
        if let Err(e) = self.ctx.state.save_run(&spec.name, &rec) {
            tracing::warn!(service = %spec.name, "cannot record pid: {e}");
        }
        let _ = self.ctx.log_cmds.send(LogCmd::Watch(spec.name.clone()));
        self.status.pid = Some(pid);
        let state = if spec.healthcheck.is_some() {
            ServiceState::Starting
        } else {
            ServiceState::Running
        };
        self.status.since = now_ms();
        self.status.state = state;
        self.status.message = None;
        self.report();
        Ok(proc)
    }

    /// Watches a running process: its exit, commands, health checks.
    async fn supervise(&mut self, mut p: Proc) -> Ended {
        let timing = self.ctx.health;
        let check = self.a.spec.healthcheck.clone();
        let addr = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), self.a.spec.proxyport);
        let addr4 = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), self.a.spec.proxyport);
        let mut next_check = Instant::now() + timing.grace;
        let mut failures = 0u32;
        let pid = p.pid();
        let ended = loop {
            tokio::select! {
                // A stop that arrives with an exit wins: no restart then.
                biased;
                cmd = self.cmds.recv() => {
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
                        let exit = p.stop(self.ctx.stop_timeout).await;
                        self.status.last_exit = Some(exit);
                        self.status.pid = None;
                    }
                    // With no command sender the minion is shutting down;
                    // the process stays for the next minion to adopt.
                    break Ended::Command(cmd);
                }
                exit = p.wait() => break Ended::Exited(exit),
                _ = tokio::time::sleep_until(next_check), if check.is_some() => {
                    let path = check.as_deref().unwrap_or("/");
                    // Services share the host network until per-service
                    // addresses land: try ::1, then 127.0.0.1.
                    let result = match health::check(addr, path, timing.timeout).await {
                        Ok(()) => Ok(()),
                        Err(_) => health::check(addr4, path, timing.timeout).await,
                    };
                    next_check = Instant::now() + timing.interval;
                    match result {
                        Ok(()) => {
                            failures = 0;
                            if self.status.health != Health::Healthy || self.status.state != ServiceState::Running {
                                self.status.health = Health::Healthy;
                                self.set(ServiceState::Running, None);
                            }
                        }
                        Err(e) => {
                            failures += 1;
                            if failures >= HEALTH_FAILURES {
                                tracing::info!(service = %self.name(), "unhealthy: {e}; restarting");
                                self.status.health = Health::Unhealthy;
                                self.set(ServiceState::Unhealthy, Some(e));
                                break Ended::Unhealthy(p.stop(self.ctx.stop_timeout).await);
                            }
                        }
                    }
                }
            }
        };
        // Whatever the leader left behind in its group goes with it.
        if let (Some(pid), Ended::Exited(_) | Ended::Unhealthy(_)) = (pid, &ended) {
            kill_group(pid, libc::SIGKILL);
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(6), Duration::from_millis(1600));
        assert_eq!(backoff(20), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
