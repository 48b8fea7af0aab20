//! cgroups as a per-service hook, around any driver.
//!
//! Each service gets cgroups named after it under a `phoenix` parent, so
//! that (1) every process it ever starts — children, daemons that double
//! fork, a container's whole tree — can be listed and killed, and (2)
//! `memory` and `cpus` limits apply to binaries and containers alike. What
//! was applied, and what could not be, is a one-line description for
//! `phoenix status` ([`ServiceCgroup::description`]).
//!
//! Hosts come in four kinds ([`CgroupMode`]):
//! - pure v2 (`/sys/fs/cgroup` is cgroup2): one cgroup
//!   `/sys/fs/cgroup/phoenix/NAME`, with `memory.max` and `cpu.max` after
//!   the controllers are enabled in the parents' `cgroup.subtree_control`;
//!   killing writes `cgroup.kill` where the kernel has it (5.14+),
//!   otherwise freezes (`cgroup.freeze`), SIGKILLs every listed pid and
//!   thaws;
//! - hybrid (v1 controllers plus a cgroup2 mount at `unified`): the
//!   processes are tracked in `unified/phoenix/NAME` (a cgroup2 cgroup
//!   without controllers, killed through `cgroup.kill` as on v2), and the
//!   limits are v1's, below;
//! - v1: `freezer/phoenix/NAME` and `pids/phoenix/NAME` always, so the
//!   processes can be found and killed without any limit set; killing
//!   freezes, SIGKILLs every listed pid and thaws, so nothing forks between
//!   the listing and the kill. On v1 and hybrid hosts alike, limits are
//!   `memory/phoenix/NAME` (`memory.limit_in_bytes`) and `cpu/phoenix/NAME`
//!   (`cpu.cfs_period_us`, `cpu.cfs_quota_us`), made only when asked for;
//! - none: nothing is created, and the description says limits were not
//!   applied.
//!
//! A process should enter its cgroups before it runs its program: moving
//! it in after spawning leaves a window in which its children escape. Best
//! is to be born in them: [`ServiceCgroup::prepare_join`] opens the
//! cgroup2 directory for `clone3(CLONE_INTO_CGROUP)` ([`crate::spawn`]),
//! and only the v1 cgroups (on a hybrid host: just the limiting ones, when
//! limits are set) are joined by writing `cgroup.procs` before `execve`.
//! Such a write migrates the process, which takes a kernel-wide lock and
//! waits an RCU grace period (milliseconds); a birth in the cgroup does not.
//!
//! Everything goes through [`Host`], so each mode is tested here against
//! the `Recording` fake; one test (root only) runs on the real
//! host.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::{EBUSY, ENOENT, ENOTEMPTY, ESRCH, FsMagic, Host, HostError, Signal};

/// Where the cgroup filesystems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The folder every service's cgroup is in, in each hierarchy.
pub const PARENT: &str = "phoenix";

/// cpu limits are a quota per period of 100 ms.
const CPU_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts (1 ms).
const CPU_MIN_QUOTA_US: u64 = 1_000;

/// How the host's cgroups are mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupMode {
    /// `/sys/fs/cgroup` is a cgroup2 mount.
    V2,
    /// v1 controllers with a cgroup2 mount at `unified` beside them:
    /// processes tracked in the cgroup2 one, limits through v1.
    Hybrid,
    V1,
    None,
}

impl CgroupMode {
    /// The mode of the cgroups mounted at `root`.
    pub fn detect(host: &dyn Host, root: &Path) -> CgroupMode {
        let is = |p: &Path, magic: FsMagic| host.fs_type(p).is_ok_and(|m| m == magic);
        if is(root, FsMagic::CGROUP2) {
            CgroupMode::V2
        } else if is(&root.join("unified"), FsMagic::CGROUP2) {
            CgroupMode::Hybrid
        } else if V1_HIERARCHIES
            .iter()
            .any(|h| is(&root.join(h.dir_name()), FsMagic::CGROUP1))
        {
            CgroupMode::V1
        } else {
            CgroupMode::None
        }
    }

    /// How the description names it.
    fn label(self) -> &'static str {
        match self {
            CgroupMode::V2 => "cgroup v2",
            CgroupMode::Hybrid | CgroupMode::V1 => "cgroup v1",
            CgroupMode::None => "no cgroups",
        }
    }
}

/// A cgroup hierarchy a service may have a cgroup in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// The one v2 hierarchy.
    Unified,
    Freezer,
    Pids,
    Memory,
    Cpu,
}

/// The v1 hierarchies in the order a service's cgroups are made in: the
/// ones that find every process first.
const V1_HIERARCHIES: [Hierarchy; 4] = [
    Hierarchy::Freezer,
    Hierarchy::Pids,
    Hierarchy::Memory,
    Hierarchy::Cpu,
];

impl Hierarchy {
    fn dir_name(self) -> &'static str {
        match self {
            Hierarchy::Unified => "",
            Hierarchy::Freezer => "freezer",
            Hierarchy::Pids => "pids",
            Hierarchy::Memory => "memory",
            Hierarchy::Cpu => "cpu",
        }
    }
}

/// The limits a service asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// Bytes of memory.
    pub memory: Option<u64>,
    /// CPUs' worth of time (0.5 = half of one CPU).
    pub cpus: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "service name {0:?} cannot name a cgroup: it must be one path component, not empty, \".\" or \"..\""
    )]
    InvalidName(String),
    #[error("cannot put process {pid} into the cgroups of service {service}: {source}")]
    Join {
        service: String,
        pid: u32,
        source: HostError,
    },
    #[error("cannot open the cgroups of service {service} to join them: {source}")]
    PrepareJoin { service: String, source: HostError },
    #[error("cannot list the processes of service {service}: {source}")]
    List { service: String, source: HostError },
    #[error("cannot kill the processes of service {service}: {source}")]
    Kill { service: String, source: HostError },
    #[error("cannot remove the cgroups of service {service}: {source}")]
    Remove { service: String, source: HostError },
}

/// The host's cgroups, and where services' cgroups go.
pub struct Cgroups {
    host: Arc<dyn Host>,
    root: PathBuf,
    mode: CgroupMode,
}

impl std::fmt::Debug for Cgroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cgroups")
            .field("root", &self.root)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Cgroups {
    /// The cgroups at [`CGROUP_ROOT`].
    pub fn detect(host: Arc<dyn Host>) -> Cgroups {
        Cgroups::at(host, CGROUP_ROOT)
    }

    /// The cgroups mounted at `root`.
    pub fn at(host: Arc<dyn Host>, root: impl Into<PathBuf>) -> Cgroups {
        let root = root.into();
        let mode = CgroupMode::detect(host.as_ref(), &root);
        Cgroups { host, root, mode }
    }

    pub fn mode(&self) -> CgroupMode {
        self.mode
    }

    /// Where hierarchy `h` is mounted.
    fn hierarchy_root(&self, h: Hierarchy) -> PathBuf {
        match (h, self.mode) {
            (Hierarchy::Unified, CgroupMode::Hybrid) => self.root.join("unified"),
            _ => self.root.join(h.dir_name()),
        }
    }

    /// `root/<hierarchy>/phoenix`.
    fn parent(&self, h: Hierarchy) -> PathBuf {
        self.hierarchy_root(h).join(PARENT)
    }

    /// The hierarchies a service's cgroups may be in on this host: where
    /// [`Cgroups::open`] and [`Cgroups::services`] look. On a hybrid host
    /// that includes the v1 tracking ones (freezer, pids) that earlier
    /// versions made, so that their leftovers are still found.
    fn hierarchies(&self) -> Vec<Hierarchy> {
        match self.mode {
            CgroupMode::None => Vec::new(),
            CgroupMode::V2 => vec![Hierarchy::Unified],
            CgroupMode::V1 => self.v1_present(),
            CgroupMode::Hybrid => {
                let mut all = vec![Hierarchy::Unified];
                all.extend(self.v1_present());
                all
            }
        }
    }

    /// The v1 hierarchies this host has.
    fn v1_present(&self) -> Vec<Hierarchy> {
        V1_HIERARCHIES
            .into_iter()
            .filter(|h| {
                self.host
                    .fs_type(&self.root.join(h.dir_name()))
                    .is_ok_and(|m| m == FsMagic::CGROUP1)
            })
            .collect()
    }

    /// Creates the cgroups of service `name` (existing ones are reused, as
    /// after a minion restart) and applies `limits`. Only an invalid name
    /// is an error: what cannot be created or applied is in the result's
    /// description, and the service runs without it.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<ServiceCgroup, CgroupError> {
        check_name(name)?;
        let mut cg = self.empty(name);
        match self.mode {
            CgroupMode::None => {
                if limits.memory.is_some() || limits.cpus.is_some() {
                    cg.not_applied
                        .push("limits not applied: this host has no cgroups".into());
                }
            }
            CgroupMode::V2 => self.create_v2(&mut cg, limits),
            CgroupMode::V1 => self.create_v1(&mut cg, limits),
            CgroupMode::Hybrid => self.create_hybrid(&mut cg, limits),
        }
        // Held for the service's whole run, a thousand at once.
        cg.dirs.shrink_to_fit();
        Ok(cg)
    }

    /// The cgroups service `name` already has (after a minion restart, to
    /// kill and remove what a service left); nothing is created or written.
    pub fn open(&self, name: &str) -> Result<ServiceCgroup, CgroupError> {
        check_name(name)?;
        let mut cg = self.empty(name);
        for h in self.hierarchies() {
            if self.has_cgroup(h, name) {
                cg.dirs.push((h, self.parent(h).join(name)));
            }
        }
        cg.dirs.shrink_to_fit();
        Ok(cg)
    }

    /// The services that have a cgroup under `phoenix` in any hierarchy:
    /// what a restarted minion compares with its desired set to clean up.
    pub fn services(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .hierarchies()
            .into_iter()
            .flat_map(|h| {
                let names = self.host.list_dir(&self.parent(h)).unwrap_or_default();
                // Interface files have dots in their names, except v1's
                // `tasks`, which a service may also be called.
                names
                    .into_iter()
                    .filter(move |n| !n.contains('.') && check_name(n).is_ok())
                    .filter(move |n| self.has_cgroup(h, n))
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether `phoenix/name` in `h` is a cgroup (a directory).
    fn has_cgroup(&self, h: Hierarchy, name: &str) -> bool {
        self.host.list_dir(&self.parent(h).join(name)).is_ok()
    }

    fn empty(&self, name: &str) -> ServiceCgroup {
        ServiceCgroup {
            host: self.host.clone(),
            mode: self.mode,
            name: name.to_owned(),
            dirs: Vec::new(),
            applied: Vec::new(),
            not_applied: Vec::new(),
        }
    }

    /// Creates `root/<h>/phoenix/NAME`; a parent removed meanwhile by
    /// another service's removal is made again once.
    fn make_dir(&self, h: Hierarchy, name: &str) -> Result<PathBuf, HostError> {
        let parent = self.parent(h);
        let dir = parent.join(name);
        self.host.create_dir(&parent)?;
        match self.host.create_dir(&dir) {
            Err(e) if e.raw_os_error() == Some(ENOENT) => {
                self.host.create_dir(&parent)?;
                self.host.create_dir(&dir)?;
            }
            other => other?,
        }
        Ok(dir)
    }

    fn create_v2(&self, cg: &mut ServiceCgroup, limits: &Limits) {
        let h = self.host.as_ref();
        let parent = self.parent(Hierarchy::Unified);
        let wanted = [
            ("memory", limits.memory.is_some()),
            ("cpu", limits.cpus.is_some()),
        ];
        // A controller must be enabled in every ancestor's
        // subtree_control before its files appear in the service's cgroup.
        let mut enabled = Vec::new();
        if wanted.iter().any(|(_, w)| *w) {
            let ready = h
                .read_file(&self.root.join("cgroup.controllers"))
                .and_then(|available| h.create_dir(&parent).map(|()| available))
                .map_err(|e| e.to_string());
            for (controller, _) in wanted.iter().filter(|(_, w)| *w) {
                let result = ready.clone().and_then(|available| {
                    if !available.split_whitespace().any(|c| c == *controller) {
                        return Err(format!(
                            "the host's cgroup v2 has no {controller} controller"
                        ));
                    }
                    [&self.root, &parent]
                        .iter()
                        .try_for_each(|dir| {
                            let control = dir.join("cgroup.subtree_control");
                            h.write_file(&control, format!("+{controller}").as_bytes())
                        })
                        .map_err(|e| e.to_string())
                });
                match result {
                    Ok(()) => enabled.push(*controller),
                    Err(e) => cg
                        .not_applied
                        .push(format!("{controller} limit NOT applied: {e}")),
                }
            }
        }
        let dir = match self.make_dir(Hierarchy::Unified, &cg.name) {
            Ok(dir) => dir,
            Err(e) => {
                cg.not_applied.push(format!("processes NOT tracked: {e}"));
                return;
            }
        };
        cg.dirs.push((Hierarchy::Unified, dir.clone()));
        if let Some(bytes) = limits.memory.filter(|_| enabled.contains(&"memory")) {
            match h.write_file(&dir.join("memory.max"), bytes.to_string().as_bytes()) {
                Ok(()) => cg.applied.push(format!("memory {}", show_bytes(bytes))),
                Err(e) => cg
                    .not_applied
                    .push(format!("memory limit NOT applied: {e}")),
            }
        }
        if let Some(cpus) = limits.cpus.filter(|_| enabled.contains(&"cpu")) {
            let applied = cpu_quota(cpus).and_then(|quota| {
                let value = format!("{quota} {CPU_PERIOD_US}");
                h.write_file(&dir.join("cpu.max"), value.as_bytes())
                    .map_err(|e| e.to_string())
            });
            match applied {
                Ok(()) => cg.applied.push(format!("cpus {cpus}")),
                Err(e) => cg.not_applied.push(format!("cpu limit NOT applied: {e}")),
            }
        }
    }

    fn create_v1(&self, cg: &mut ServiceCgroup, limits: &Limits) {
        let present = self.v1_present();
        self.track_v1(cg, &present);
        self.limits_v1(cg, &present, limits);
    }

    /// Tracks the processes in the cgroup2 hierarchy at `unified` (a birth
    /// there needs no migration), or in v1's freezer and pids where that
    /// cgroup cannot be made; limits through v1.
    fn create_hybrid(&self, cg: &mut ServiceCgroup, limits: &Limits) {
        let present = self.v1_present();
        match self.make_dir(Hierarchy::Unified, &cg.name) {
            Ok(dir) => cg.dirs.push((Hierarchy::Unified, dir)),
            Err(e) => {
                tracing::warn!(
                    service = %cg.name,
                    "cannot track processes in the cgroup2 hierarchy ({e}); using v1's freezer and pids"
                );
                self.track_v1(cg, &present);
            }
        }
        self.limits_v1(cg, &present, limits);
    }

    /// The v1 cgroups that list every process: freezer and pids.
    fn track_v1(&self, cg: &mut ServiceCgroup, present: &[Hierarchy]) {
        if !present.contains(&Hierarchy::Freezer) && !present.contains(&Hierarchy::Pids) {
            cg.not_applied.push(
                "processes NOT tracked: this host has neither the freezer nor the pids cgroup controller"
                    .into(),
            );
        }
        for hierarchy in [Hierarchy::Freezer, Hierarchy::Pids] {
            if !present.contains(&hierarchy) {
                continue;
            }
            match self.make_dir(hierarchy, &cg.name) {
                Ok(dir) => cg.dirs.push((hierarchy, dir)),
                Err(e) => cg.not_applied.push(format!("processes NOT tracked: {e}")),
            }
        }
    }

    /// The v1 cgroups that limit: memory and cpu, when asked for.
    fn limits_v1(&self, cg: &mut ServiceCgroup, present: &[Hierarchy], limits: &Limits) {
        if let Some(bytes) = limits.memory {
            let files = vec![("memory.limit_in_bytes", bytes.to_string())];
            let shown = format!("memory {}", show_bytes(bytes));
            self.limit_v1(cg, present, Hierarchy::Memory, Ok(files), shown);
        }
        if let Some(cpus) = limits.cpus {
            let files = cpu_quota(cpus).map(|quota| {
                vec![
                    ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ]
            });
            self.limit_v1(cg, present, Hierarchy::Cpu, files, format!("cpus {cpus}"));
        }
    }

    /// Makes the service's cgroup in a v1 limiting `hierarchy` and writes
    /// its limit `files` (or the reason there are none); notes the outcome.
    fn limit_v1(
        &self,
        cg: &mut ServiceCgroup,
        present: &[Hierarchy],
        hierarchy: Hierarchy,
        files: Result<Vec<(&str, String)>, String>,
        shown: String,
    ) {
        let h = self.host.as_ref();
        let applied = files.and_then(|files| {
            if !present.contains(&hierarchy) {
                return Err(format!(
                    "this host has no {} cgroup controller",
                    hierarchy.dir_name()
                ));
            }
            let dir = self
                .make_dir(hierarchy, &cg.name)
                .map_err(|e| e.to_string())?;
            let written = files
                .iter()
                .try_for_each(|(file, value)| h.write_file(&dir.join(file), value.as_bytes()));
            match written {
                Ok(()) => Ok(dir),
                Err(e) => {
                    // Not limiting: don't keep the service in it.
                    let _ = h.remove_dir(&dir);
                    Err(e.to_string())
                }
            }
        });
        match applied {
            Ok(dir) => {
                cg.dirs.push((hierarchy, dir));
                cg.applied.push(shown);
            }
            Err(e) => {
                let what = hierarchy.dir_name();
                cg.not_applied
                    .push(format!("{what} limit NOT applied: {e}"));
            }
        }
    }
}

fn check_name(name: &str) -> Result<(), CgroupError> {
    let bad = name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']);
    if bad {
        return Err(CgroupError::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// The cpu quota per [`CPU_PERIOD_US`] for `cpus`.
fn cpu_quota(cpus: f64) -> Result<u64, String> {
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(format!("cpus {cpus} is not a positive number"));
    }
    // Far above any real machine's CPU count, so the cast cannot overflow.
    let quota = (cpus.min(1e6) * CPU_PERIOD_US as f64).round() as u64;
    Ok(quota.max(CPU_MIN_QUOTA_US))
}

fn show_bytes(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// One service's cgroups.
pub struct ServiceCgroup {
    host: Arc<dyn Host>,
    mode: CgroupMode,
    name: String,
    /// Every cgroup of the service, those that list every process first.
    dirs: Vec<(Hierarchy, PathBuf)>,
    applied: Vec<String>,
    not_applied: Vec<String>,
}

impl std::fmt::Debug for ServiceCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceCgroup")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("dirs", &self.dirs)
            .finish_non_exhaustive()
    }
}

impl ServiceCgroup {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mode(&self) -> CgroupMode {
        self.mode
    }

    /// The service's cgroup directories.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d)| d.as_path())
    }

    /// What was applied and what was not, for `phoenix status`: e.g.
    /// "memory 256 MiB, cpus 0.5 (cgroup v1)", or "cpus 0.5 (cgroup v2);
    /// memory limit NOT applied: cannot write …: Permission denied". None
    /// when no limits were asked for and nothing failed.
    pub fn description(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.applied.is_empty() {
            parts.push(format!(
                "{} ({})",
                self.applied.join(", "),
                self.mode.label()
            ));
        }
        parts.extend(self.not_applied.iter().cloned());
        (!parts.is_empty()).then(|| parts.join("; "))
    }

    /// Whether some cgroup lists every process of the service, so that
    /// [`ServiceCgroup::kill_all`] reaches them all.
    pub fn is_tracked(&self) -> bool {
        !self.dirs.is_empty()
    }

    fn tracking(&self) -> Option<&Path> {
        self.dirs.first().map(|(_, d)| d.as_path())
    }

    /// Moves `pid` (with all its threads) into every cgroup of the service.
    /// Prefer [`ServiceCgroup::prepare_join`], which leaves no window.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            self.host
                .write_file(&dir.join("cgroup.procs"), pid.to_string().as_bytes())
                .map_err(|source| CgroupError::Join {
                    service: self.name.clone(),
                    pid,
                    source,
                })?;
        }
        Ok(())
    }

    /// Opens the service's cgroups now for a process to be started in
    /// them ([`crate::spawn::Spawn::cgroups`]), so that the child needs no
    /// allocation and no path lookup: the cgroup2 directory, to be born in
    /// (`clone3` with `CLONE_INTO_CGROUP`), and the `cgroup.procs` of each
    /// v1 cgroup, for the child to write before `execve`. On a v2 host that
    /// is the directory alone; on a hybrid host, the directory plus the v1
    /// memory and cpu cgroups only when the service has those limits; on a
    /// v1 host, `cgroup.procs` files only.
    ///
    /// ```no_run
    /// use std::os::fd::AsFd;
    /// use std::sync::Arc;
    /// use phoenix_host::cgroup::{Cgroups, Limits};
    /// use phoenix_host::spawn::Spawn;
    ///
    /// let cgroups = Cgroups::detect(Arc::new(phoenix_host::Linux));
    /// let cgroup = cgroups.create("web", &Limits::default())?;
    /// let join = cgroup.prepare_join()?;
    /// let log = std::fs::File::create("/tmp/web.log")?;
    /// let child = Spawn::new("/usr/local/bin/web".as_ref(), log.as_fd())
    ///     .cgroups(&join)
    ///     .spawn()?; // in the cgroups from its first instruction
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// The descriptors are close-on-exec. A process started this way needs
    /// no [`ServiceCgroup::add`].
    pub fn prepare_join(&self) -> Result<CgroupJoin, CgroupError> {
        let err = |source| CgroupError::PrepareJoin {
            service: self.name.clone(),
            source,
        };
        let mut join = CgroupJoin {
            cgroup2: None,
            procs: Vec::new(),
        };
        for (h, dir) in &self.dirs {
            if *h == Hierarchy::Unified && join.cgroup2.is_none() {
                join.cgroup2 = Some(self.host.open_dir(dir).map_err(err)?);
            } else {
                let procs = self.host.open_write(&dir.join("cgroup.procs"));
                join.procs.push(procs.map_err(err)?);
            }
        }
        Ok(join)
    }

    /// How many of the service's processes the kernel's OOM killer killed
    /// in its cgroups since they were made: `oom_kill` of a cgroup2
    /// `memory.events` or of a v1 `memory.oom_control`. 0 where neither
    /// is there (no memory limit on a v1 or hybrid host).
    pub fn oom_kills(&self) -> u64 {
        let count = |text: String| {
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse::<u64>().ok())
        };
        self.dirs
            .iter()
            .filter_map(|(h, dir)| {
                let file = match h {
                    Hierarchy::Unified => "memory.events",
                    Hierarchy::Memory => "memory.oom_control",
                    _ => return None,
                };
                self.host.read_file(&dir.join(file)).ok().and_then(count)
            })
            .max()
            .unwrap_or(0)
    }

    /// The pids of every process of the service (empty when untracked).
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let Some(dir) = self.tracking() else {
            return Ok(Vec::new());
        };
        self.pids_in(dir).map_err(|source| CgroupError::List {
            service: self.name.clone(),
            source,
        })
    }

    fn pids_in(&self, dir: &Path) -> Result<Vec<u32>, HostError> {
        let text = self.host.read_file(&dir.join("cgroup.procs"))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// SIGKILLs every process of the service, including those that left
    /// its process group. Returns once the signals are sent; the processes
    /// are gone when [`ServiceCgroup::pids`] is empty, and only then can
    /// [`ServiceCgroup::remove`] succeed. Without a freezer (v1 with only
    /// `pids`), a process forked between listing and signalling survives
    /// one call: call again while `pids` is not empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let err = |source| CgroupError::Kill {
            service: self.name.clone(),
            source,
        };
        let Some((tracking, dir)) = self.dirs.first() else {
            return Ok(());
        };
        let h = self.host.as_ref();
        match tracking {
            Hierarchy::Unified => {
                let names = h.list_dir(dir).map_err(err)?;
                if names.iter().any(|n| n == "cgroup.kill") {
                    return h.write_file(&dir.join("cgroup.kill"), b"1").map_err(err);
                }
                let freeze = dir.join("cgroup.freeze");
                self.frozen_kill(
                    dir,
                    || h.write_file(&freeze, b"1"),
                    || h.write_file(&freeze, b"0"),
                )
                .map_err(err)
            }
            _ => {
                let freezer = self.dirs.iter().find(|(h, _)| *h == Hierarchy::Freezer);
                match freezer {
                    Some((_, dir)) => {
                        let state = dir.join("freezer.state");
                        let freeze = || {
                            h.write_file(&state, b"FROZEN")?;
                            wait_frozen(h, &state);
                            Ok(())
                        };
                        self.frozen_kill(dir, freeze, || h.write_file(&state, b"THAWED"))
                            .map_err(err)
                    }
                    None => self.kill_listed(dir).map_err(err),
                }
            }
        }
    }

    /// Freezes, kills every listed pid, thaws (also when the kill failed:
    /// a frozen cgroup would hold its processes forever).
    fn frozen_kill(
        &self,
        dir: &Path,
        freeze: impl FnOnce() -> Result<(), HostError>,
        thaw: impl FnOnce() -> Result<(), HostError>,
    ) -> Result<(), HostError> {
        if let Err(e) = freeze() {
            // Killing unfrozen still kills all but a process forked in
            // between; better than not killing.
            tracing::warn!(service = %self.name, "cannot freeze before killing: {e}");
        }
        let killed = self.kill_listed(dir);
        let thawed = thaw();
        killed.and(thawed)
    }

    fn kill_listed(&self, dir: &Path) -> Result<(), HostError> {
        for pid in self.pids_in(dir)? {
            match self.host.signal(pid, Signal::KILL) {
                Err(e) if e.raw_os_error() != Some(ESRCH) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes the service's cgroups, then each `phoenix` parent left
    /// empty. Fails with `EBUSY` while processes remain (see
    /// [`ServiceCgroup::kill_all`]); cgroups already gone are fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first_error = None;
        for (_, dir) in self.dirs.iter().rev() {
            match self.host.remove_dir(dir) {
                Err(e) if e.raw_os_error() != Some(ENOENT) => {
                    first_error.get_or_insert(e);
                }
                _ => {}
            }
        }
        for (_, dir) in &self.dirs {
            let Some(parent) = dir.parent() else { continue };
            // Another service's cgroup inside: EBUSY (cgroupfs) or
            // ENOTEMPTY; gone already: ENOENT. All mean "leave it".
            match self.host.remove_dir(parent) {
                Err(e) if ![EBUSY, ENOTEMPTY, ENOENT].contains(&e.raw_os_error().unwrap_or(0)) => {
                    first_error.get_or_insert(e);
                }
                _ => {}
            }
        }
        match first_error {
            None => Ok(()),
            Some(source) => Err(CgroupError::Remove {
                service: self.name.clone(),
                source,
            }),
        }
    }
}

/// Waits (a few milliseconds at most) for a v1 freezer to report FROZEN;
/// a task in an uninterruptible sleep can keep it FREEZING, and then the
/// kill goes ahead anyway.
fn wait_frozen(host: &dyn Host, state: &Path) {
    for _ in 0..20 {
        match host.read_file(state) {
            Ok(s) if s.trim() != "FREEZING" => return,
            Err(_) => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// A service's cgroups, opened for a process to start in them (see
/// [`ServiceCgroup::prepare_join`]).
#[derive(Debug)]
pub struct CgroupJoin {
    /// The cgroup2 directory, to be born in.
    cgroup2: Option<OwnedFd>,
    /// The `cgroup.procs` of each v1 cgroup to join before `execve`.
    procs: Vec<OwnedFd>,
}

impl CgroupJoin {
    /// The service's cgroup2 directory, for `clone3(CLONE_INTO_CGROUP)`.
    pub fn cgroup2_dir(&self) -> Option<BorrowedFd<'_>> {
        self.cgroup2.as_ref().map(|fd| fd.as_fd())
    }

    /// The `cgroup.procs` files (opened for writing) of the v1 cgroups the
    /// process must still join by writing "0" before `execve`: empty on a
    /// v2 host, and on a hybrid host for a service without limits.
    pub fn v1_procs(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.procs.iter().map(|fd| fd.as_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Call, EACCES, Linux, Recording};

    const MIB: u64 = 1 << 20;
    const LIMITS: Limits = Limits {
        memory: Some(256 * MIB),
        cpus: Some(0.5),
    };

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn write(path: &str, contents: &str) -> Call {
        Call::WriteFile {
            path: p(path),
            contents: contents.into(),
        }
    }

    fn v2_host(with_kill: bool) -> Arc<Recording> {
        let h = Arc::new(Recording::new());
        let mut files = vec![
            ("cgroup.procs", ""),
            ("cgroup.freeze", "0"),
            ("cgroup.subtree_control", ""),
            ("memory.max", "max"),
            ("cpu.max", "max 100000"),
        ];
        if with_kill {
            files.push(("cgroup.kill", ""));
        }
        h.cgroupfs("/sys/fs/cgroup", FsMagic::CGROUP2, &files);
        h.put_file(
            "/sys/fs/cgroup/cgroup.controllers",
            "cpuset cpu io memory pids\n",
        );
        h.put_file("/sys/fs/cgroup/cgroup.subtree_control", "");
        h
    }

    /// v1 hierarchies (all four unless `without`), with or without the
    /// cgroup2 mount that makes the host hybrid.
    fn v1_host(hybrid: bool, without: &[&str]) -> Arc<Recording> {
        let h = Arc::new(Recording::new());
        h.put_dir("/sys/fs/cgroup");
        h.set_fs_type("/sys/fs/cgroup", FsMagic::TMPFS);
        if hybrid {
            h.cgroupfs(
                "/sys/fs/cgroup/unified",
                FsMagic::CGROUP2,
                &[
                    ("cgroup.procs", ""),
                    ("cgroup.kill", ""),
                    ("cgroup.freeze", "0"),
                ],
            );
        }
        let hierarchies: [(&str, &[(&str, &str)]); 4] = [
            ("freezer", &[("freezer.state", "THAWED")]),
            ("pids", &[("pids.max", "max")]),
            (
                "memory",
                &[("memory.limit_in_bytes", "9223372036854771712")],
            ),
            (
                "cpu",
                &[("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "-1")],
            ),
        ];
        for (name, own) in hierarchies {
            if without.contains(&name) {
                continue;
            }
            let mut files = vec![("cgroup.procs", ""), ("tasks", "")];
            files.extend_from_slice(own);
            h.cgroupfs(format!("/sys/fs/cgroup/{name}"), FsMagic::CGROUP1, &files);
        }
        h
    }

    fn cgroups(h: &Arc<Recording>) -> Cgroups {
        let cg = Cgroups::detect(h.clone());
        h.take_calls();
        cg
    }

    #[test]
    fn modes_are_told_apart_by_filesystem_type() {
        let detect = |h: &Arc<Recording>| Cgroups::detect(h.clone()).mode();
        assert_eq!(detect(&v2_host(true)), CgroupMode::V2);
        assert_eq!(detect(&v1_host(true, &[])), CgroupMode::Hybrid);
        assert_eq!(detect(&v1_host(false, &[])), CgroupMode::V1);
        assert_eq!(
            detect(&v1_host(false, &["freezer", "memory", "cpu"])),
            CgroupMode::V1
        );
        let bare = Arc::new(Recording::new());
        bare.put_dir("/sys/fs/cgroup");
        bare.set_fs_type("/sys/fs/cgroup", FsMagic::TMPFS);
        assert_eq!(detect(&bare), CgroupMode::None);
        assert_eq!(detect(&Arc::new(Recording::new())), CgroupMode::None);
    }

    #[test]
    fn v2_enables_the_controllers_then_writes_the_limits() {
        let h = v2_host(true);
        let cg = cgroups(&h).create("web", &LIMITS).unwrap();
        assert_eq!(
            h.writes(),
            [
                (p("/sys/fs/cgroup/cgroup.subtree_control"), "+memory".into()),
                (
                    p("/sys/fs/cgroup/phoenix/cgroup.subtree_control"),
                    "+memory".into()
                ),
                (p("/sys/fs/cgroup/cgroup.subtree_control"), "+cpu".into()),
                (
                    p("/sys/fs/cgroup/phoenix/cgroup.subtree_control"),
                    "+cpu".into()
                ),
                (
                    p("/sys/fs/cgroup/phoenix/web/memory.max"),
                    "268435456".into()
                ),
                (
                    p("/sys/fs/cgroup/phoenix/web/cpu.max"),
                    "50000 100000".into()
                ),
            ]
        );
        assert_eq!(
            cg.dirs().collect::<Vec<_>>(),
            [Path::new("/sys/fs/cgroup/phoenix/web")]
        );
        assert_eq!(
            cg.description().as_deref(),
            Some("memory 256 MiB, cpus 0.5 (cgroup v2)")
        );
        assert!(cg.is_tracked());
    }

    #[test]
    fn v2_without_limits_only_makes_the_cgroup() {
        let h = v2_host(true);
        let cg = cgroups(&h).create("web", &Limits::default()).unwrap();
        assert!(h.writes().is_empty());
        assert!(h.exists("/sys/fs/cgroup/phoenix/web/cgroup.procs"));
        assert_eq!(cg.description(), None);
    }

    #[test]
    fn v2_says_which_limit_was_not_applied_and_why() {
        let h = v2_host(true);
        h.put_file("/sys/fs/cgroup/cgroup.controllers", "cpu pids\n");
        let cg = cgroups(&h).create("web", &LIMITS).unwrap();
        assert_eq!(
            cg.description().as_deref(),
            Some(
                "cpus 0.5 (cgroup v2); memory limit NOT applied: the host's cgroup v2 has no memory controller"
            )
        );
        assert!(
            !h.writes()
                .iter()
                .any(|(path, _)| path.ends_with("memory.max"))
        );

        let h = v2_host(true);
        h.fail_path("/sys/fs/cgroup/phoenix/web/cpu.max", EACCES);
        let cg = cgroups(&h).create("web", &LIMITS).unwrap();
        assert_eq!(
            cg.description().as_deref(),
            Some(
                "memory 256 MiB (cgroup v2); cpu limit NOT applied: cannot write \
                 /sys/fs/cgroup/phoenix/web/cpu.max: Permission denied (os error 13)"
            )
        );
    }

    #[test]
    fn v2_without_a_phoenix_cgroup_applies_nothing_and_says_so() {
        let h = v2_host(true);
        h.fail_path("/sys/fs/cgroup/phoenix", EACCES);
        let cg = cgroups(&h).create("web", &LIMITS).unwrap();
        let why = "cannot create directory /sys/fs/cgroup/phoenix: Permission denied (os error 13)";
        assert_eq!(
            cg.description().unwrap(),
            format!(
                "memory limit NOT applied: {why}; cpu limit NOT applied: {why}; processes NOT tracked: {why}"
            )
        );
        assert!(!cg.is_tracked());
        assert!(h.writes().is_empty());
    }

    #[test]
    fn v2_kills_through_cgroup_kill_then_removes_everything() {
        let h = v2_host(true);
        h.add_process(10, 10, 1);
        // A daemon that left the service's process group is still found.
        h.add_process(11, 11, 1);
        let cg = cgroups(&h).create("web", &Limits::default()).unwrap();
        cg.add(10).unwrap();
        cg.add(11).unwrap();
        assert_eq!(cg.pids().unwrap(), [10, 11]);
        h.take_calls();
        cg.kill_all().unwrap();
        assert_eq!(
            h.take_calls(),
            [
                Call::ListDir {
                    path: p("/sys/fs/cgroup/phoenix/web")
                },
                write("/sys/fs/cgroup/phoenix/web/cgroup.kill", "1"),
            ]
        );
        assert!(!h.is_running(10) && !h.is_running(11));
        assert!(cg.pids().unwrap().is_empty());
        cg.remove().unwrap();
        assert!(!h.exists("/sys/fs/cgroup/phoenix/web"));
        assert!(
            !h.exists("/sys/fs/cgroup/phoenix"),
            "the empty parent is left behind"
        );
        assert!(h.exists("/sys/fs/cgroup"));
    }

    #[test]
    fn v2_without_cgroup_kill_freezes_kills_and_thaws() {
        let h = v2_host(false);
        h.add_process(10, 10, 1);
        h.add_process(11, 10, 1);
        let cg = cgroups(&h).create("web", &Limits::default()).unwrap();
        cg.add(10).unwrap();
        cg.add(11).unwrap();
        h.take_calls();
        cg.kill_all().unwrap();
        let dir = "/sys/fs/cgroup/phoenix/web";
        assert_eq!(
            h.take_calls(),
            [
                Call::ListDir { path: p(dir) },
                write(&format!("{dir}/cgroup.freeze"), "1"),
                Call::ReadFile {
                    path: p(&format!("{dir}/cgroup.procs"))
                },
                Call::Signal {
                    pid: 10,
                    signal: Signal::KILL
                },
                Call::Signal {
                    pid: 11,
                    signal: Signal::KILL
                },
                write(&format!("{dir}/cgroup.freeze"), "0"),
            ]
        );
        assert!(!h.is_running(10) && !h.is_running(11));
    }

    #[test]
    fn v1_tracks_every_service_and_limits_only_when_asked() {
        {
            let h = v1_host(false, &[]);
            let cg = cgroups(&h).create("web", &LIMITS).unwrap();
            let made: Vec<_> = h
                .calls()
                .into_iter()
                .filter_map(|c| match c {
                    Call::CreateDir { path } => Some(path),
                    _ => None,
                })
                .collect();
            for ctl in ["freezer", "pids", "memory", "cpu"] {
                assert!(
                    made.contains(&p(&format!("/sys/fs/cgroup/{ctl}/phoenix/web"))),
                    "{ctl}"
                );
            }
            assert_eq!(
                h.writes(),
                [
                    (
                        p("/sys/fs/cgroup/memory/phoenix/web/memory.limit_in_bytes"),
                        "268435456".into()
                    ),
                    (
                        p("/sys/fs/cgroup/cpu/phoenix/web/cpu.cfs_period_us"),
                        "100000".into()
                    ),
                    (
                        p("/sys/fs/cgroup/cpu/phoenix/web/cpu.cfs_quota_us"),
                        "50000".into()
                    ),
                ]
            );
            assert_eq!(
                cg.description().as_deref(),
                Some("memory 256 MiB, cpus 0.5 (cgroup v1)")
            );
            assert!(!h.calls().iter().any(|c| {
                c.path()
                    .is_some_and(|p| p.starts_with("/sys/fs/cgroup/unified"))
            }));

            h.take_calls();
            cg.add(4242).unwrap();
            let procs = h.writes();
            assert_eq!(
                procs,
                ["freezer", "pids", "memory", "cpu"].map(|c| (
                    p(&format!("/sys/fs/cgroup/{c}/phoenix/web/cgroup.procs")),
                    "4242".to_string()
                ))
            );

            // No limits: the tracking cgroups only, and nothing to say.
            let h = v1_host(false, &[]);
            let cg = cgroups(&h).create("db", &Limits::default()).unwrap();
            assert_eq!(
                cg.dirs().collect::<Vec<_>>(),
                [
                    Path::new("/sys/fs/cgroup/freezer/phoenix/db"),
                    Path::new("/sys/fs/cgroup/pids/phoenix/db")
                ]
            );
            assert!(!h.exists("/sys/fs/cgroup/memory/phoenix"));
            assert_eq!(cg.description(), None);
        }
    }

    #[test]
    fn hybrid_tracks_in_cgroup2_and_limits_through_v1() {
        let h = v1_host(true, &[]);
        let cgs = cgroups(&h);
        let cg = cgs.create("web", &LIMITS).unwrap();
        assert_eq!(
            cg.dirs().collect::<Vec<_>>(),
            [
                Path::new("/sys/fs/cgroup/unified/phoenix/web"),
                Path::new("/sys/fs/cgroup/memory/phoenix/web"),
                Path::new("/sys/fs/cgroup/cpu/phoenix/web"),
            ]
        );
        assert!(!h.exists("/sys/fs/cgroup/freezer/phoenix"));
        assert!(!h.exists("/sys/fs/cgroup/pids/phoenix"));
        assert_eq!(
            cg.description().as_deref(),
            Some("memory 256 MiB, cpus 0.5 (cgroup v1)")
        );
        // Killing goes through cgroup.kill of the cgroup2 one.
        h.add_process(10, 10, 1);
        cg.add(10).unwrap();
        assert_eq!(cg.pids().unwrap(), [10]);
        h.take_calls();
        cg.kill_all().unwrap();
        let dir = "/sys/fs/cgroup/unified/phoenix/web";
        assert_eq!(
            h.take_calls(),
            [
                Call::ListDir { path: p(dir) },
                write(&format!("{dir}/cgroup.kill"), "1"),
            ]
        );
        assert!(!h.is_running(10));
        cg.remove().unwrap();
        assert!(cgs.services().is_empty());
        assert!(!h.exists("/sys/fs/cgroup/unified/phoenix"));

        // No limits: the cgroup2 one alone, nothing in v1.
        let h = v1_host(true, &[]);
        let cg = cgroups(&h).create("db", &Limits::default()).unwrap();
        assert_eq!(
            cg.dirs().collect::<Vec<_>>(),
            [Path::new("/sys/fs/cgroup/unified/phoenix/db")]
        );
        assert_eq!(cg.description(), None);
        for ctl in ["freezer", "pids", "memory", "cpu"] {
            assert!(!h.exists(format!("/sys/fs/cgroup/{ctl}/phoenix")), "{ctl}");
        }
    }

    #[test]
    fn hybrid_without_a_cgroup2_cgroup_tracks_in_v1() {
        let h = v1_host(true, &[]);
        h.fail_path("/sys/fs/cgroup/unified/phoenix", EACCES);
        let cg = cgroups(&h).create("web", &Limits::default()).unwrap();
        assert_eq!(
            cg.dirs().collect::<Vec<_>>(),
            [
                Path::new("/sys/fs/cgroup/freezer/phoenix/web"),
                Path::new("/sys/fs/cgroup/pids/phoenix/web"),
            ]
        );
        assert!(cg.is_tracked());
        assert_eq!(cg.description(), None);
    }

    /// Earlier versions tracked a hybrid host's services in v1's freezer
    /// and pids: a restarted minion still finds, kills and removes those.
    #[test]
    fn hybrid_finds_what_v1_tracking_left() {
        let h = v1_host(true, &[]);
        h.add_process(10, 10, 1);
        for ctl in ["freezer", "pids"] {
            let dir = format!("/sys/fs/cgroup/{ctl}/phoenix/old");
            h.create_dir(Path::new(&format!("/sys/fs/cgroup/{ctl}/phoenix")))
                .unwrap();
            h.create_dir(Path::new(&dir)).unwrap();
            h.write_file(&p(&format!("{dir}/cgroup.procs")), b"10")
                .unwrap();
        }
        let cgs = cgroups(&h);
        assert_eq!(cgs.services(), ["old"]);
        let old = cgs.open("old").unwrap();
        assert_eq!(old.pids().unwrap(), [10]);
        old.kill_all().unwrap();
        assert!(!h.is_running(10));
        old.remove().unwrap();
        assert!(cgs.services().is_empty());
    }

    #[test]
    fn v1_kill_freezes_kills_every_listed_pid_and_thaws() {
        let h = v1_host(false, &[]);
        h.add_process(10, 10, 1);
        h.add_process(11, 99, 1);
        let cg = cgroups(&h).create("web", &LIMITS).unwrap();
        for pid in [10, 11, 12] {
            // 12 exits by itself before the kill: ESRCH is no error.
            cg.add(pid).unwrap();
        }
        h.take_calls();
        cg.kill_all().unwrap();
        let freezer = "/sys/fs/cgroup/freezer/phoenix/web";
        assert_eq!(
            h.take_calls(),
            [
                write(&format!("{freezer}/freezer.state"), "FROZEN"),
                Call::ReadFile {
                    path: p(&format!("{freezer}/freezer.state"))
                },
                Call::ReadFile {
                    path: p(&format!("{freezer}/cgroup.procs"))
                },
                Call::Signal {
                    pid: 10,
                    signal: Signal::KILL
                },
                Call::Signal {
                    pid: 11,
                    signal: Signal::KILL
                },
                Call::Signal {
                    pid: 12,
                    signal: Signal::KILL
                },
                write(&format!("{freezer}/freezer.state"), "THAWED"),
            ]
        );
        assert!(!h.is_running(10) && !h.is_running(11));
    }

    #[test]
    fn v1_thaws_even_when_a_kill_fails() {
        let h = v1_host(false, &[]);
        h.add_process(10, 10, 1);
        let cg = cgroups(&h).create("web", &Limits::default()).unwrap();
        cg.add(10).unwrap();
        h.fail_when(
            |c| matches!(c, Call::Signal { .. }),
            crate::EINVAL + 1, /* EPERM-like */
        );
        let e = cg.kill_all().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot kill the processes of service web: cannot signal process 10"),
            "{e}"
        );
        assert_eq!(
            h.file("/sys/fs/cgroup/freezer/phoenix/web/freezer.state")
                .as_deref(),
            Some("THAWED")
        );
    }

    #[test]
    fn v1_without_freezer_kills_what_pids_lists() {
        let h = v1_host(false, &["freezer", "cpu"]);
        h.add_process(10, 10, 1);
        let cg = cgroups(&h).create("web", &LIMITS).unwrap();
        assert_eq!(
            cg.description().as_deref(),
            Some(
                "memory 256 MiB (cgroup v1); cpu limit NOT applied: this host has no cpu cgroup controller"
            )
        );
        cg.add(10).unwrap();
        h.take_calls();
        cg.kill_all().unwrap();
        assert_eq!(
            h.take_calls(),
            [
                Call::ReadFile {
                    path: p("/sys/fs/cgroup/pids/phoenix/web/cgroup.procs")
                },
                Call::Signal {
                    pid: 10,
                    signal: Signal::KILL
                },
            ]
        );
    }

    #[test]
    fn v1_limit_failures_are_described_and_leave_no_cgroup() {
        let h = v1_host(false, &[]);
        let file = "/sys/fs/cgroup/memory/phoenix/web/memory.limit_in_bytes";
        h.fail_path(file, EACCES);
        let cg = cgroups(&h).create("web", &LIMITS).unwrap();
        assert_eq!(
            cg.description().unwrap(),
            format!(
                "cpus 0.5 (cgroup v1); memory limit NOT applied: cannot write {file}: Permission denied (os error 13)"
            )
        );
        assert!(!h.exists("/sys/fs/cgroup/memory/phoenix/web"));
        assert!(!cg.dirs().any(|d| d.starts_with("/sys/fs/cgroup/memory")));

        // Nothing tracked: said so, and kill/remove have nothing to do.
        let h = v1_host(false, &[]);
        h.fail_when(|c| matches!(c, Call::CreateDir { .. }), EACCES);
        let cg = cgroups(&h).create("web", &Limits::default()).unwrap();
        let text = cg.description().unwrap();
        assert!(
            text.starts_with(
                "processes NOT tracked: cannot create directory /sys/fs/cgroup/freezer/phoenix"
            ),
            "{text}"
        );
        assert!(!cg.is_tracked());
        h.take_calls();
        cg.kill_all().unwrap();
        cg.remove().unwrap();
        assert!(cg.pids().unwrap().is_empty());
        assert!(h.calls().is_empty());
    }

    #[test]
    fn removal_waits_for_the_processes_and_keeps_a_shared_parent() {
        let h = v1_host(false, &[]);
        h.add_process(10, 10, 1);
        let cgs = cgroups(&h);
        let web = cgs.create("web", &LIMITS).unwrap();
        let db = cgs.create("db", &Limits::default()).unwrap();
        web.add(10).unwrap();
        let busy = web.remove().unwrap_err();
        assert_eq!(
            busy.to_string(),
            "cannot remove the cgroups of service web: cannot remove directory \
             /sys/fs/cgroup/cpu/phoenix/web: Device or resource busy (os error 16)"
        );
        web.kill_all().unwrap();
        web.remove().unwrap();
        for ctl in ["freezer", "pids", "memory", "cpu"] {
            assert!(
                !h.exists(format!("/sys/fs/cgroup/{ctl}/phoenix/web")),
                "{ctl}"
            );
        }
        // db still has its cgroups; memory and cpu held only web's.
        assert!(h.exists("/sys/fs/cgroup/freezer/phoenix/db"));
        assert!(!h.exists("/sys/fs/cgroup/memory/phoenix"));
        assert_eq!(cgs.services(), ["db"]);
        db.remove().unwrap();
        assert!(!h.exists("/sys/fs/cgroup/freezer/phoenix"));
        assert!(!h.exists("/sys/fs/cgroup/pids/phoenix"));
        assert!(cgs.services().is_empty());
        // Removing twice is fine.
        db.remove().unwrap();
    }

    #[test]
    fn a_restarted_minion_reopens_what_a_service_left() {
        let h = v1_host(false, &[]);
        h.add_process(10, 10, 1);
        let cgs = cgroups(&h);
        cgs.create("web", &LIMITS).unwrap().add(10).unwrap();
        let again = Cgroups::detect(h.clone());
        assert_eq!(again.services(), ["web"]);
        let web = again.open("web").unwrap();
        assert_eq!(web.dirs().count(), 4);
        assert_eq!(web.pids().unwrap(), [10]);
        web.kill_all().unwrap();
        web.remove().unwrap();
        assert!(again.services().is_empty());
        assert_eq!(again.open("web").unwrap().dirs().count(), 0);
    }

    #[test]
    fn a_host_without_cgroups_says_limits_were_not_applied() {
        let h = Arc::new(Recording::new());
        let cgs = cgroups(&h);
        assert_eq!(cgs.mode(), CgroupMode::None);
        let cg = cgs.create("web", &LIMITS).unwrap();
        assert_eq!(
            cg.description().as_deref(),
            Some("limits not applied: this host has no cgroups")
        );
        assert_eq!(
            cgs.create("web", &Limits::default()).unwrap().description(),
            None
        );
        cg.add(10).unwrap();
        cg.kill_all().unwrap();
        cg.remove().unwrap();
        assert!(cg.pids().unwrap().is_empty());
        assert!(h.calls().is_empty());
    }

    #[test]
    fn names_must_be_one_path_component() {
        let cgs = cgroups(&v2_host(true));
        for bad in ["", ".", "..", "a/b", "../etc", "x\0y"] {
            let e = cgs.create(bad, &Limits::default()).unwrap_err();
            assert!(
                matches!(e, CgroupError::InvalidName(ref n) if n == bad),
                "{e}"
            );
            assert!(cgs.open(bad).is_err());
        }
    }

    #[test]
    fn cpu_quotas_are_rounded_and_bounded() {
        assert_eq!(cpu_quota(0.5), Ok(50_000));
        assert_eq!(cpu_quota(2.0), Ok(200_000));
        assert_eq!(cpu_quota(0.001), Ok(CPU_MIN_QUOTA_US));
        assert!(cpu_quota(0.0).is_err());
        assert!(cpu_quota(f64::NAN).is_err());
        let h = v1_host(false, &[]);
        let cg = cgroups(&h)
            .create(
                "web",
                &Limits {
                    memory: Some(1000),
                    cpus: Some(-1.0),
                },
            )
            .unwrap();
        assert_eq!(
            cg.description().as_deref(),
            Some(
                "memory 1000 bytes (cgroup v1); cpu limit NOT applied: cpus -1 is not a positive number"
            )
        );
    }

    #[test]
    fn joining_opens_the_cgroup2_directory_and_the_v1_procs_files() {
        let opened = |h: &Arc<Recording>, limits: &Limits| {
            let cg = cgroups(h).create("web", limits).unwrap();
            h.take_calls();
            let join = cg.prepare_join().unwrap();
            (join, h.take_calls())
        };
        let open_dir = |d: &str| Call::OpenDir { path: p(d) };
        let open_procs = |d: &str| Call::OpenWrite {
            path: p(&format!("{d}/cgroup.procs")),
        };

        // v2: born in the cgroup, nothing to join.
        let (join, calls) = opened(&v2_host(true), &LIMITS);
        assert_eq!(calls, [open_dir("/sys/fs/cgroup/phoenix/web")]);
        assert!(join.cgroup2_dir().is_some());
        assert_eq!(join.v1_procs().count(), 0);

        // Hybrid: born in the cgroup2 one; v1 only for the limits.
        let (join, calls) = opened(&v1_host(true, &[]), &LIMITS);
        assert_eq!(
            calls,
            [
                open_dir("/sys/fs/cgroup/unified/phoenix/web"),
                open_procs("/sys/fs/cgroup/memory/phoenix/web"),
                open_procs("/sys/fs/cgroup/cpu/phoenix/web"),
            ]
        );
        assert!(join.cgroup2_dir().is_some());
        assert_eq!(join.v1_procs().count(), 2);
        let (join, calls) = opened(&v1_host(true, &[]), &Limits::default());
        assert_eq!(calls, [open_dir("/sys/fs/cgroup/unified/phoenix/web")]);
        assert_eq!(join.v1_procs().count(), 0);

        // v1: every cgroup joined by writing cgroup.procs.
        let (join, calls) = opened(&v1_host(false, &[]), &LIMITS);
        assert_eq!(
            calls,
            ["freezer", "pids", "memory", "cpu"]
                .map(|c| open_procs(&format!("/sys/fs/cgroup/{c}/phoenix/web")))
        );
        assert!(join.cgroup2_dir().is_none());
        assert_eq!(join.v1_procs().count(), 4);

        // A failure names the file.
        let h = v1_host(false, &[]);
        let cg = cgroups(&h).create("web", &LIMITS).unwrap();
        h.fail_path("/sys/fs/cgroup/pids/phoenix/web/cgroup.procs", EACCES);
        let e = cg.prepare_join().unwrap_err();
        assert!(
            e.to_string().contains("pids/phoenix/web/cgroup.procs"),
            "{e}"
        );
    }

    /// On the real host (root only): a service whose process forks a
    /// grandchild is killed whole, and its cgroups go.
    #[test]
    fn real_host_kills_a_process_tree_and_removes_the_cgroups() {
        use std::os::fd::AsFd;
        use std::time::Instant;

        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped real_host_kills_a_process_tree_and_removes_the_cgroups: needs root");
            return;
        }
        let host: Arc<dyn Host> = Arc::new(Linux);
        let cgs = Cgroups::detect(host.clone());
        if cgs.mode() == CgroupMode::None {
            eprintln!(
                "skipped real_host_kills_a_process_tree_and_removes_the_cgroups: no cgroups here"
            );
            return;
        }
        let name = format!("phoenix-host-test-{}", std::process::id());
        let limits = Limits {
            memory: Some(64 * MIB),
            cpus: Some(0.5),
        };
        let cg = cgs.create(&name, &limits).unwrap();
        let text = cg.description().unwrap();
        assert!(
            text.starts_with("memory 64 MiB, cpus 0.5 (cgroup v"),
            "{text}"
        );
        assert!(!text.contains("NOT"), "{text}");

        let wait_until = |what: &str, ok: &dyn Fn() -> bool| {
            let start = Instant::now();
            while !ok() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "timed out waiting: {what}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        };

        // Started in them, with a grandchild that sh forks.
        let join = cg.prepare_join().unwrap();
        let null = std::fs::File::create("/dev/null").unwrap();
        let tree = crate::spawn::Spawn::new(Path::new("/bin/sh"), null.as_fd())
            .args(["-c", "sleep 60 & sleep 60; true"])
            .env("PATH", "/usr/bin:/bin")
            .cgroups(&join)
            .spawn()
            .unwrap();
        assert_eq!(
            tree.born_in_cgroup,
            cgs.mode() != CgroupMode::V1,
            "{tree:?}"
        );
        // And one moved in after it started.
        let mut added = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        cg.add(added.id()).unwrap();
        wait_until("sh, its two sleeps and the added sleep", &|| {
            cg.pids().unwrap().len() >= 4
        });
        let pids = cg.pids().unwrap();
        assert!(
            pids.contains(&tree.pid) && pids.contains(&added.id()),
            "{pids:?}"
        );
        for dir in cg.dirs() {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            assert!(
                procs.contains(&tree.pid.to_string()),
                "{} lacks sh",
                dir.display()
            );
        }

        cg.kill_all().unwrap();
        use std::os::unix::process::ExitStatusExt;
        let status = rustix::process::waitpid(
            rustix::process::Pid::from_raw(tree.pid as i32),
            rustix::process::WaitOptions::empty(),
        )
        .unwrap()
        .unwrap()
        .1;
        assert_eq!(status.terminating_signal(), Some(9));
        assert_eq!(added.wait().unwrap().signal(), Some(9));
        // The grandchildren are reaped by whoever inherited them.
        wait_until("every process of the cgroup to end", &|| {
            cg.pids().unwrap().is_empty()
        });
        for pid in pids {
            assert_eq!(Linux.process_start_time(pid), None, "{pid} survived");
        }

        cg.remove().unwrap();
        for dir in cg.dirs() {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
        assert!(!cgs.services().contains(&name));
    }
}
