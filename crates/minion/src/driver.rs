//! Task drivers: how one kind of workload is prepared, started, recovered,
//! stopped and cleaned up.
//!
//! The contract follows Nomad's `DriverPlugin`, cut down to what the minion
//! needs. A driver knows how to run one kind of task and nothing of policy:
//! restarts, backoff, health checks, oneshot results and status reports are
//! the task runner's ([`crate::task`]), which drives every kind the same way.
//!
//! Life of a run, as the runner sees it:
//!
//! 1. [`Driver::prepare`] turns the fetched image file into what a start
//!    needs (the file itself for `exec`; an unpacked root filesystem for
//!    `oci`), once per image where that is costly;
//! 2. [`Driver::start`] runs the task from a [`TaskConfig`] and returns a
//!    [`TaskHandle`]: the pid, the process to wait for and signal, and the
//!    start time the runner persists (with [`DriverName`]) in the service's
//!    run record;
//! 3. [`RunningTask::wait`] and [`RunningTask::signal`] while it runs;
//!    [`Driver::stop`] ends it with SIGTERM, then SIGKILL after a timeout;
//! 4. [`Driver::destroy`] removes what the run left behind, once it has
//!    ended (not when the minion merely shuts down: the task keeps running
//!    for the next minion to adopt);
//! 5. after a minion restart, [`Driver::recover`] takes the task back from
//!    its run record, if that process still runs.
//!
//! Host operations (signals, pidfds, process start times, mounts) go
//! through the minion's [`phoenix_host::Host`], so the drivers are tested
//! against its recording fake. Per-service resources are not the drivers'
//! business: the runner puts every task in its service's cgroups
//! ([`phoenix_host::cgroup`]) around [`Driver::start`], for every kind of
//! task alike, and a driver only starts its process inside them
//! ([`TaskConfig::cgroup`]). A service's network namespace and hosts file
//! come the same way ([`TaskConfig::network`]): the driver's process is
//! started in them.
//!
//! Methods that wait return boxed futures, so that drivers are trait
//! objects ([`Drivers`] holds one per kind) and a fake driver can stand in
//! for the real ones in the runner's tests.

pub mod exec;
pub mod oci;
pub mod vm;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use phoenix_host::Host;
use phoenix_host::cgroup::{CgroupJoin, CgroupMode};
use phoenix_model::proto::Assignment;
use phoenix_model::spec::Kind;
use phoenix_model::status::Exit;
use serde::{Deserialize, Serialize};

use crate::state::RunRecord;

/// A boxed future that may move between threads (tasks are `tokio::spawn`ed).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which driver runs a task; persisted in its run record.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum DriverName {
    /// A binary in its own process group.
    Exec,
    /// An OCI container run by crun.
    Oci,
    /// A microVM run by QEMU.
    Vm,
}

impl DriverName {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverName::Exec => "exec",
            DriverName::Oci => "oci",
            DriverName::Vm => "vm",
        }
    }

    /// The driver that runs services of this type (`None`: no driver yet).
    pub fn for_kind(kind: Kind) -> Option<DriverName> {
        match kind {
            Kind::Binary => Some(DriverName::Exec),
            Kind::Docker => Some(DriverName::Oci),
            Kind::Vm => Some(DriverName::Vm),
        }
    }
}

impl std::fmt::Display for DriverName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a driver could not prepare or start a task. The message goes into
/// the service's status after "cannot start IMAGE: ".
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The program could not be executed.
    #[error("{0}")]
    Spawn(std::io::Error),
    /// The container runtime, or setting up for it, failed; the message
    /// says which step and what it reported.
    #[error("{0}")]
    Container(String),
    /// The VMM (QEMU), or setting up for it, failed; the message says
    /// which step and what it reported.
    #[error("{0}")]
    Vm(String),
    /// No driver on this minion runs this type of service.
    #[error("services of type {0:?} cannot run on this minion yet")]
    Unsupported(&'static str),
}

/// What a driver knows about itself that the runner must respect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `prepare` leaves files in the image cache that a start reads (an
    /// unpacked root filesystem): the cache must not be collected from
    /// the start of `prepare` to the end of `start`.
    pub artifact_in_image_cache: bool,
}

/// What [`Driver::prepare`] made of an image file: the path a start uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// exec: the program; oci: the unpacked image's directory (its `rootfs`
    /// and `settings.json`).
    pub path: PathBuf,
}

/// One service's task, as a start needs it.
pub struct TaskConfig<'a> {
    /// The service's spec, address and generation.
    pub assignment: &'a Assignment,
    pub artifact: &'a Artifact,
    /// The task's own directory (`work/NAME`), created by the runner; a
    /// binary runs in it, a container keeps its bundle there.
    pub work_dir: &'a Path,
    /// Phoenix's variables (`PHOENIX_NAME`, `PHOENIX_IP`, `PORT`): each
    /// driver puts them after the image's and the spec's, so they win.
    pub env: &'a [(String, String)],
    /// The service's log file, opened for append: its stdout and stderr.
    pub log: std::fs::File,
    /// The service's cgroups, opened for joining: the driver starts its
    /// process (a binary; crun, whose container inherits them) inside them
    /// ([`phoenix_host::spawn::Spawn::cgroups`]). `None` where the host
    /// tracks no processes.
    pub cgroup: Option<Arc<CgroupJoin>>,
    /// The service's own network, when it has one: the driver starts its
    /// process in that namespace, seeing `hosts_file` as `/etc/hosts`.
    /// `None`: the minion's network and `/etc/hosts`.
    pub network: Option<TaskNetwork<'a>>,
}

/// A service's network namespace and the hosts file its names resolve by.
#[derive(Clone, Copy, Debug)]
pub struct TaskNetwork<'a> {
    /// The namespace (`/proc/PID/ns/net` or a bind mount of one).
    pub netns: std::os::fd::BorrowedFd<'a>,
    /// What the task sees as `/etc/hosts` (bound read-only over it).
    pub hosts_file: &'a Path,
}

impl TaskConfig<'_> {
    /// The run's key (the service's name, or `NAME.GENERATION` for a run
    /// an update started beside the old one): what its per-run resources
    /// (container, program link) are named by.
    pub fn name(&self) -> &str {
        self.assignment.key()
    }
}

/// Where a task lives, for cleaning up after it.
#[derive(Clone, Copy, Debug)]
pub struct TaskDir<'a> {
    /// The run's key.
    pub name: &'a str,
    pub work_dir: &'a Path,
}

/// A started or recovered process the runner waits for and signals.
pub trait RunningTask: Send {
    /// Waits for the process to end (cancel-safe: may be called again
    /// after a cancelled wait).
    fn wait(&mut self) -> BoxFuture<'_, Exit>;
    /// Sends `signal` to what the task is (a binary's process group; a
    /// container's init).
    fn signal(&self, signal: i32);
}

/// A task the driver started or recovered.
pub struct TaskHandle {
    pub pid: u32,
    /// With the pid, names the process across pid reuse; persisted so a
    /// restarted minion can recover the task.
    pub start_time: u64,
    pub process: Box<dyn RunningTask>,
}

/// One kind of workload. See the module header for the life of a run.
pub trait Driver: Send + Sync {
    fn name(&self) -> DriverName;

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Makes what a start needs from the image file `image` (in the image
    /// cache, hash-checked) of assignment `a`.
    fn prepare<'a>(
        &'a self,
        image: &'a Path,
        a: &'a Assignment,
    ) -> BoxFuture<'a, Result<Artifact, DriverError>>;

    /// Starts the task; it runs once this returns.
    fn start<'a>(&'a self, task: TaskConfig<'a>) -> BoxFuture<'a, Result<TaskHandle, DriverError>>;

    /// Takes back a task a previous minion run started, from its run
    /// record: `None` if that process is gone (or the pid now names
    /// another process).
    fn recover(&self, record: &RunRecord) -> Option<TaskHandle>;

    /// Stops the task: SIGTERM, then SIGKILL if it has not ended after
    /// `timeout`. Its exit.
    fn stop<'a>(&'a self, task: &'a mut TaskHandle, timeout: Duration) -> BoxFuture<'a, Exit> {
        Box::pin(stop_with_escalation(task.process.as_mut(), timeout))
    }

    /// How long a started task has to pass its first health check before
    /// it counts as never having come up (a guest that never boots): it is
    /// then killed and backs off like a failed start. Health failures do
    /// not count before then. `None`: the minion's health grace alone.
    fn boot_timeout(&self) -> Option<Duration> {
        None
    }

    /// Reads why a run ended in what it wrote to its log, for its status
    /// (a guest kernel's OOM killer, say): given the run's output (its
    /// last 64 KiB), a reason or `None`. `None` here: the runner reads no
    /// log after a run.
    fn log_explainer(&self) -> Option<fn(&str) -> Option<String>> {
        None
    }

    /// How this driver runs its tasks, for the node's report: the VM
    /// driver's accelerator (`kvm`, `tcg`, `none`). `None`: nothing to say.
    fn accelerator(&self) -> Option<&'static str> {
        None
    }

    /// Removes what a run left behind once it has ended (`task`: its handle,
    /// if there is one; a recovered orphan's, or `None` when the process was
    /// already gone).
    fn destroy<'a>(&'a self, dir: TaskDir<'a>, task: Option<TaskHandle>) -> BoxFuture<'a, ()>;
}

/// SIGTERM, wait up to `timeout`, SIGKILL. The SIGKILL also goes after a
/// process that ended in time: for a process group it reaches what the
/// leader left behind.
pub async fn stop_with_escalation(p: &mut dyn RunningTask, timeout: Duration) -> Exit {
    p.signal(libc::SIGTERM);
    match tokio::time::timeout(timeout, p.wait()).await {
        Ok(exit) => {
            p.signal(libc::SIGKILL);
            exit
        }
        Err(_) => {
            p.signal(libc::SIGKILL);
            p.wait().await
        }
    }
}

/// The drivers of this minion, one per kind of workload.
#[derive(Clone)]
pub struct Drivers {
    exec: Arc<dyn Driver>,
    oci: Arc<dyn Driver>,
    vm: Arc<dyn Driver>,
}

impl Drivers {
    /// `exec` and `oci`, and a `vm` driver that runs no VM (it refuses
    /// them, naming QEMU's package).
    pub fn new(exec: Arc<dyn Driver>, oci: Arc<dyn Driver>) -> Drivers {
        let vm = Arc::new(vm::VmDriver::absent(Arc::new(phoenix_host::Linux)));
        Drivers { exec, oci, vm }
    }

    /// These drivers with `vm` running VMs.
    pub fn with_vm(mut self, vm: Arc<dyn Driver>) -> Drivers {
        self.vm = vm;
        self
    }

    /// The real drivers, keeping their state under `data_dir`, on a host
    /// whose cgroups are mounted as `cgroups` says.
    pub fn on_host(
        data_dir: &Path,
        host: Arc<dyn Host>,
        cgroups: CgroupMode,
        vm: vm::VmSettings,
    ) -> Drivers {
        let oci = Arc::new(oci::OciDriver::new(data_dir, host.clone(), cgroups));
        let kernel = vm.kernel.clone();
        Drivers::new(
            Arc::new(exec::ExecDriver::new(
                host.clone(),
                Some(data_dir.join("programs")),
            )),
            oci.clone(),
        )
        .with_vm(Arc::new(
            vm::VmDriver::new(data_dir, host, vm).with_oci_images(oci, data_dir, kernel),
        ))
    }

    pub fn named(&self, name: DriverName) -> &Arc<dyn Driver> {
        match name {
            DriverName::Exec => &self.exec,
            DriverName::Oci => &self.oci,
            DriverName::Vm => &self.vm,
        }
    }

    /// The driver for services of type `kind`.
    pub fn for_kind(&self, kind: Kind) -> Result<&Arc<dyn Driver>, DriverError> {
        DriverName::for_kind(kind)
            .map(|n| self.named(n))
            .ok_or(DriverError::Unsupported(kind.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records signals; ends on SIGKILL only, or on SIGTERM too if `obeys`.
    struct Recorded {
        signals: Arc<Mutex<Vec<i32>>>,
        obeys_term: bool,
        ended: tokio::sync::watch::Sender<Option<i32>>,
    }

    impl RunningTask for Recorded {
        fn wait(&mut self) -> BoxFuture<'_, Exit> {
            let mut rx = self.ended.subscribe();
            Box::pin(async move {
                let sig = *rx.wait_for(Option::is_some).await.unwrap();
                Exit {
                    code: None,
                    signal: sig,
                    at: 0,
                }
            })
        }

        fn signal(&self, signal: i32) {
            self.signals.lock().unwrap().push(signal);
            if signal == libc::SIGKILL || (signal == libc::SIGTERM && self.obeys_term) {
                self.ended.send_if_modified(|e| {
                    let first = e.is_none();
                    if first {
                        *e = Some(signal);
                    }
                    first
                });
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stop_escalates_to_sigkill_after_the_timeout() {
        let signals = Arc::new(Mutex::new(Vec::new()));
        let mut p = Recorded {
            signals: signals.clone(),
            obeys_term: false,
            ended: tokio::sync::watch::Sender::new(None),
        };
        let t0 = tokio::time::Instant::now();
        let exit = stop_with_escalation(&mut p, Duration::from_secs(3)).await;
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        assert_eq!(*signals.lock().unwrap(), [libc::SIGTERM, libc::SIGKILL]);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_of_an_obedient_task_takes_no_timeout() {
        let signals = Arc::new(Mutex::new(Vec::new()));
        let mut p = Recorded {
            signals: signals.clone(),
            obeys_term: true,
            ended: tokio::sync::watch::Sender::new(None),
        };
        let t0 = tokio::time::Instant::now();
        let exit = stop_with_escalation(&mut p, Duration::from_secs(3)).await;
        assert_eq!(exit.signal, Some(libc::SIGTERM));
        assert_eq!(t0.elapsed(), Duration::ZERO);
        // The SIGKILL after the exit is for what the leader left behind.
        assert_eq!(*signals.lock().unwrap(), [libc::SIGTERM, libc::SIGKILL]);
    }

    #[test]
    fn kinds_map_to_drivers() {
        assert_eq!(DriverName::for_kind(Kind::Binary), Some(DriverName::Exec));
        assert_eq!(DriverName::for_kind(Kind::Docker), Some(DriverName::Oci));
        assert_eq!(DriverName::for_kind(Kind::Vm), Some(DriverName::Vm));
        assert_eq!(serde_json::to_string(&DriverName::Oci).unwrap(), "\"oci\"");
    }
}
