//! Starting a service's process: born in its cgroup, in its network
//! namespace, with its own `/etc/hosts`, reporting clearly what failed.
//!
//! [`Spawn`] is a small process spawner made for the minion. What std's
//! `Command` does with a `pre_exec` hook (fork, then run code in the child)
//! it does with `clone3`, which can create the child directly inside a
//! cgroup v2 directory (`CLONE_INTO_CGROUP`). A child born there is never
//! migrated: writing `cgroup.procs` after a fork takes the kernel's global
//! `cgroup_threadgroup_rwsem` for writing, which waits an RCU grace period
//! (6–11 ms on the machines this is developed on) and, in the minion,
//! stalls the single runtime thread that every service shares.
//!
//! Between `clone3` and `execve` the child runs, in order:
//! 1. joins the cgroups it could not be born in (v1 `cgroup.procs` files,
//!    written with "0"; on a kernel that refuses `CLONE_INTO_CGROUP`, the
//!    cgroup2 one too);
//! 2. with a hosts file or a private cgroup2 mount asked for: in the new
//!    mount namespace `clone3` gave it (`CLONE_NEWNS`), makes `/`
//!    recursively a slave (private, for crun's cgroup2 mount) so nothing
//!    it mounts reaches the host, then mounts cgroup2 at `/sys/fs/cgroup`
//!    and/or binds the hosts file read-only over `/etc/hosts`;
//! 3. `setns` into the network namespace given;
//! 4. `setpgid(0, 0)` (a new process group, unless told otherwise);
//! 5. stdin from `/dev/null`, stdout and stderr to the given descriptor,
//!    every other descriptor close-on-exec;
//! 6. `chdir` to the working directory;
//! 7. resets every signal disposition to its default (the minion ignores
//!    SIGPIPE, as every Rust program does, a process started by
//!    `posix_spawn` inherits the C library's signal 32 ignored, and an
//!    ignored signal stays ignored across `execve`) and unblocks every
//!    signal;
//! 8. `execve` of the program's path (no `PATH` search) with the
//!    environment given, whole.
//!
//! That code is async-signal-safe: every string and pointer array is built
//! before the clone, the child only makes system calls on them, and it
//! never allocates, locks or unwinds. Every signal is blocked in the parent
//! around the clone, so no handler of the minion's ever runs in the child.
//! A failed step is written (step and errno, 8 bytes) to a close-on-exec
//! pipe, and the parent turns it into a [`SpawnError`] naming the step and
//! the program; an `execve` that succeeds closes the pipe, which the parent
//! reads as success. The parent reaps a child that failed; a child that ran
//! its program is the caller's to wait for (its exit signal is SIGCHLD, so
//! it is an ordinary child).
//!
//! Every descriptor but 0, 1 and 2 is expected to be close-on-exec (the
//! minion opens everything so, as std does); in case one is not (inherited
//! from whatever started the minion), the child also marks all the others
//! close-on-exec (`close_range`, Linux 5.11) just before `execve`, so the
//! program inherits none.
//!
//! On x86_64 the clone also has `CLONE_VM | CLONE_VFORK`, as glibc's
//! `posix_spawn` does: the child runs on a stack of its own in the
//! minion's address space until it execs, and the minion waits. A plain
//! fork would copy the page tables of the whole minion and then take a
//! page fault for every page either side writes first: about 2 ms more per
//! start on a loaded machine with a 10 MiB heap. Elsewhere the clone is
//! fork-like.
//!
//! Fallbacks: a kernel without `clone3` (before 5.3, or a seccomp filter
//! answering `ENOSYS`) gets a plain `fork`; one that refuses
//! `CLONE_INTO_CGROUP` (before 5.7: `E2BIG` or `EINVAL`) gets `clone3`
//! without it. Either way the child then joins the cgroup2 directory by
//! writing its `cgroup.procs` (opened in the parent), with its mount
//! namespace from `unshare` where `clone3` could not give it one.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, MountPropagationFlags};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

use crate::cgroup::CgroupJoin;

/// `CLONE_INTO_CGROUP` (Linux 5.7). libc's constant is an `int` too narrow
/// for it, so it is spelled out here.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The kernel's `struct clone_args` (`CLONE_ARGS_SIZE_VER2`, 88 bytes, the
/// size that has `cgroup`). Declared here because its layout is the
/// kernel's ABI, the same on every architecture, while libc declares it
/// only for some targets.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Whether a fallback was logged already (once per process is enough).
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// What to start, and where. Build it, then [`Spawn::spawn`].
pub struct Spawn<'a> {
    program: CString,
    program_path: PathBuf,
    argv: Vec<CString>,
    env: Vec<CString>,
    cwd: Option<CString>,
    output: BorrowedFd<'a>,
    process_group: bool,
    cgroup2: Option<BorrowedFd<'a>>,
    procs: Vec<BorrowedFd<'a>>,
    netns: Option<BorrowedFd<'a>>,
    hosts_file: Option<CString>,
    private_cgroup2: bool,
    /// The first argument that could not become a C string.
    nul: Option<&'static str>,
    /// Tests: behave as on a kernel without `clone3`.
    #[cfg(test)]
    no_clone3: bool,
}

impl std::fmt::Debug for Spawn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawn")
            .field("program", &self.program_path)
            .field("argv", &self.argv)
            .field("cwd", &self.cwd)
            .field("cgroup2", &self.cgroup2)
            .field("netns", &self.netns)
            .field("hosts_file", &self.hosts_file)
            .finish_non_exhaustive()
    }
}

/// A started child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spawned {
    pub pid: u32,
    /// The child was born in the cgroup2 directory given
    /// (`CLONE_INTO_CGROUP`) rather than moved into it.
    pub born_in_cgroup: bool,
}

/// A step the child takes before `execve`; what a failure names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    JoinCgroup = 1,
    MountNamespace,
    MountPropagation,
    Cgroup2Mount,
    HostsFile,
    NetworkNamespace,
    ProcessGroup,
    Stdio,
    WorkingDirectory,
    Signals,
    Exec,
}

impl Step {
    const ALL: [Step; 11] = [
        Step::JoinCgroup,
        Step::MountNamespace,
        Step::MountPropagation,
        Step::Cgroup2Mount,
        Step::HostsFile,
        Step::NetworkNamespace,
        Step::ProcessGroup,
        Step::Stdio,
        Step::WorkingDirectory,
        Step::Signals,
        Step::Exec,
    ];

    fn from_raw(raw: u32) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u32 == raw)
    }

    fn describe(self) -> &'static str {
        match self {
            Step::JoinCgroup => "join the service's cgroups (write cgroup.procs)",
            Step::MountNamespace => "enter a mount namespace of its own",
            Step::MountPropagation => "keep its mounts from reaching the host (make / rslave)",
            Step::Cgroup2Mount => "mount a private cgroup2 at /sys/fs/cgroup",
            Step::HostsFile => "bind the service's hosts file over /etc/hosts",
            Step::NetworkNamespace => "setns into the service's network namespace",
            Step::ProcessGroup => "start a process group (setpgid)",
            Step::Stdio => "connect stdin, stdout and stderr",
            Step::WorkingDirectory => "change to the working directory",
            Step::Signals => "reset the signal dispositions and mask",
            Step::Exec => "execute",
        }
    }
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {}: its {what} contains a NUL byte", program.display())]
    Nul {
        program: PathBuf,
        what: &'static str,
    },
    /// Preparing in the parent failed (a pipe, `/dev/null`, the clone).
    #[error("cannot start {}: {what}: {source}", program.display())]
    Parent {
        program: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    /// `execve` failed: the program is missing, not executable, not a
    /// program for this machine.
    #[error("cannot execute {}: {source}", program.display())]
    Exec { program: PathBuf, source: io::Error },
    /// A step before `execve` failed in the child.
    #[error("cannot start {}: {}{}: {source}", program.display(), step.describe(), detail.as_ref().map(|d| format!(" {}", d.display())).unwrap_or_default())]
    Child {
        program: PathBuf,
        step: Step,
        /// The path the step was about (the working directory, the hosts
        /// file).
        detail: Option<PathBuf>,
        source: io::Error,
    },
}

impl SpawnError {
    fn io(&self) -> Option<&io::Error> {
        match self {
            SpawnError::Nul { .. } => None,
            SpawnError::Parent { source, .. }
            | SpawnError::Exec { source, .. }
            | SpawnError::Child { source, .. } => Some(source),
        }
    }

    /// The OS error, if the failure was one.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.io().and_then(io::Error::raw_os_error)
    }

    /// The step of the child that failed, if it was one.
    pub fn step(&self) -> Option<Step> {
        match self {
            SpawnError::Exec { .. } => Some(Step::Exec),
            SpawnError::Child { step, .. } => Some(*step),
            _ => None,
        }
    }
}

impl From<SpawnError> for io::Error {
    fn from(e: SpawnError) -> io::Error {
        let kind = e.io().map_or(io::ErrorKind::InvalidInput, io::Error::kind);
        io::Error::new(kind, e)
    }
}

fn c_string(s: &OsStr) -> Option<CString> {
    CString::new(s.as_bytes()).ok()
}

impl<'a> Spawn<'a> {
    /// Runs the file at `program` (a path: no `PATH` search) with
    /// `argv[0]` the same path, an empty environment, stdin from
    /// `/dev/null` and stdout and stderr to `output`, in a new process
    /// group.
    pub fn new(program: &Path, output: BorrowedFd<'a>) -> Spawn<'a> {
        let mut s = Spawn {
            program: CString::default(),
            program_path: program.to_owned(),
            argv: Vec::new(),
            env: Vec::new(),
            cwd: None,
            output,
            process_group: true,
            cgroup2: None,
            procs: Vec::new(),
            netns: None,
            hosts_file: None,
            private_cgroup2: false,
            nul: None,
            #[cfg(test)]
            no_clone3: false,
        };
        match c_string(program.as_os_str()) {
            Some(c) => {
                s.argv.push(c.clone());
                s.program = c;
            }
            None => s.nul = Some("path"),
        }
        s
    }

    fn c(&mut self, s: &OsStr, what: &'static str) -> Option<CString> {
        let c = c_string(s);
        if c.is_none() {
            self.nul.get_or_insert(what);
        }
        c
    }

    /// What the program sees as its name (`argv[0]`).
    pub fn arg0(&mut self, arg0: impl AsRef<OsStr>) -> &mut Self {
        if let Some(c) = self.c(arg0.as_ref(), "argv[0]") {
            match self.argv.first_mut() {
                Some(first) => *first = c,
                None => self.argv.push(c),
            }
        }
        self
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        if let Some(c) = self.c(arg.as_ref(), "arguments") {
            self.argv.push(c);
        }
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&mut self, args: I) -> &mut Self {
        for a in args {
            self.arg(a);
        }
        self
    }

    /// Adds `key=value` to the environment (which starts empty; a key given
    /// twice is given twice, so callers pass each once).
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        let mut kv = key.as_ref().as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(value.as_ref().as_bytes());
        if let Some(c) = self.c(OsStr::from_bytes(&kv), "environment") {
            self.env.push(c);
        }
        self
    }

    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self.env(k, v);
        }
        self
    }

    /// The working directory (the minion's when not set).
    pub fn cwd(&mut self, dir: &Path) -> &mut Self {
        self.cwd = self.c(dir.as_os_str(), "working directory");
        self
    }

    /// Whether the child leads a new process group (the default) or stays
    /// in the caller's.
    pub fn process_group(&mut self, new: bool) -> &mut Self {
        self.process_group = new;
        self
    }

    /// The service's cgroups: born in its cgroup2 directory, joining the
    /// v1 ones before `execve`.
    pub fn cgroups(&mut self, join: &'a CgroupJoin) -> &mut Self {
        if let Some(dir) = join.cgroup2_dir() {
            self.into_cgroup(dir);
        }
        for fd in join.v1_procs() {
            self.join_procs(fd);
        }
        self
    }

    /// A cgroup2 directory (opened read-only) to create the child in.
    pub fn into_cgroup(&mut self, dir: BorrowedFd<'a>) -> &mut Self {
        self.cgroup2 = Some(dir);
        self
    }

    /// A `cgroup.procs` file (opened for writing) the child writes "0" to
    /// before `execve`.
    pub fn join_procs(&mut self, procs: BorrowedFd<'a>) -> &mut Self {
        self.procs.push(procs);
        self
    }

    /// A network namespace (`/proc/PID/ns/net` or a bind mount of one) for
    /// the child to `setns` into.
    pub fn netns(&mut self, ns: BorrowedFd<'a>) -> &mut Self {
        self.netns = Some(ns);
        self
    }

    /// A file the child sees as `/etc/hosts` (bound read-only over it, in a
    /// mount namespace of the child's own).
    pub fn hosts_file(&mut self, file: &Path) -> &mut Self {
        self.hosts_file = self.c(file.as_os_str(), "hosts file path");
        self
    }

    /// Gives the child a private mount namespace whose `/sys/fs/cgroup` is
    /// a fresh cgroup2 mount (for crun on a hybrid host: see
    /// [`crate::pre_exec::private_cgroup2_mount`]).
    pub fn private_cgroup2(&mut self, yes: bool) -> &mut Self {
        self.private_cgroup2 = yes;
        self
    }

    fn parent_err(&self, what: &'static str) -> impl FnOnce(rustix::io::Errno) -> SpawnError + '_ {
        move |e| SpawnError::Parent {
            program: self.program_path.clone(),
            what,
            source: e.into(),
        }
    }

    /// Starts the child; returns once it runs its program (or failed to).
    ///
    /// A program file is busy for exec (ETXTBSY) while any process holds it
    /// open for writing, which includes a child another thread forked while
    /// it wrote the file, until that child execs. That passes within
    /// milliseconds, so such an exec is tried again, a few times.
    pub fn spawn(&self) -> Result<Spawned, SpawnError> {
        let mut tries = 0u32;
        loop {
            match self.spawn_once() {
                Err(SpawnError::Exec { source, .. })
                    if source.raw_os_error() == Some(libc::ETXTBSY) && tries < 5 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(2 << tries));
                }
                result => return result,
            }
        }
    }

    fn spawn_once(&self) -> Result<Spawned, SpawnError> {
        if let Some(what) = self.nul {
            return Err(SpawnError::Nul {
                program: self.program_path.clone(),
                what,
            });
        }
        // Everything the child touches is made here, before the clone.
        let argv: Vec<*const libc::c_char> = self
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = self
            .env
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let null = rustix::fs::open(
            c"/dev/null",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .and_then(above_stdio)
        .map_err(self.parent_err("open /dev/null"))?;
        // Descriptors 0..=2 would be overwritten by the redirections before
        // they are read: keep a copy above them.
        let output_copy = match self.output.as_raw_fd() {
            0..=2 => Some(
                rustix::io::fcntl_dupfd_cloexec(self.output, 3)
                    .map_err(self.parent_err("copy the output descriptor"))?,
            ),
            _ => None,
        };
        let output = output_copy.as_ref().map_or(self.output, |fd| fd.as_fd());
        let (report_rx, report_tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .and_then(|(r, w)| Ok((r, above_stdio(w)?)))
            .map_err(self.parent_err("create the error pipe"))?;

        let mut into_cgroup = self.cgroup2.is_some();
        #[cfg(test)]
        let mut use_clone3 = !self.no_clone3;
        #[cfg(not(test))]
        let mut use_clone3 = true;
        // The cgroup2 directory's cgroup.procs, when the child cannot be
        // born in it.
        let mut cgroup2_procs: Option<OwnedFd> = None;
        let pid = loop {
            if !(into_cgroup && use_clone3)
                && cgroup2_procs.is_none()
                && let Some(dir) = self.cgroup2
            {
                into_cgroup = false;
                let procs = rustix::fs::openat(
                    dir,
                    c"cgroup.procs",
                    OFlags::WRONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(self.parent_err("open the cgroup's cgroup.procs"))?;
                cgroup2_procs = Some(procs);
            }
            let child = Child {
                program: &self.program,
                argv: &argv,
                envp: &envp,
                cwd: self.cwd.as_deref(),
                null: null.as_fd(),
                output,
                report: report_tx.as_fd(),
                process_group: self.process_group,
                cgroup2_procs: cgroup2_procs.as_ref().map(|fd| fd.as_fd()),
                procs: &self.procs,
                netns: self.netns,
                hosts_file: self.hosts_file.as_deref(),
                private_cgroup2: self.private_cgroup2,
                unshare_mounts: false,
            };
            let needs_mount_ns = child.hosts_file.is_some() || child.private_cgroup2;
            let result = if use_clone3 {
                let mut flags = 0;
                if needs_mount_ns {
                    flags |= libc::CLONE_NEWNS as u64;
                }
                let mut args = CloneArgs {
                    flags,
                    exit_signal: libc::SIGCHLD as u64,
                    ..CloneArgs::default()
                };
                if into_cgroup && let Some(dir) = self.cgroup2 {
                    args.flags |= CLONE_INTO_CGROUP;
                    args.cgroup = dir.as_raw_fd() as u64;
                }
                // SAFETY: the child runs only `Child::run`, which is
                // async-signal-safe (see the module header) and never
                // returns; the parent goes on as after any clone.
                unsafe { clone3(&args, &child) }
            } else {
                let child = Child {
                    unshare_mounts: needs_mount_ns,
                    ..child
                };
                // SAFETY: as for clone3 above.
                unsafe { fork(&child) }
            };
            match result {
                Ok(pid) => break pid,
                Err(e) if use_clone3 && e == rustix::io::Errno::NOSYS => {
                    log_fallback("clone3 is not available (ENOSYS): forking instead");
                    use_clone3 = false;
                }
                Err(e)
                    if into_cgroup
                        && (e == rustix::io::Errno::TOOBIG || e == rustix::io::Errno::INVAL) =>
                {
                    log_fallback(
                        "the kernel refuses clone3 CLONE_INTO_CGROUP: children join their cgroup2 by writing cgroup.procs instead",
                    );
                    into_cgroup = false;
                }
                Err(e) => {
                    let what = match (use_clone3, into_cgroup) {
                        (true, true) => "clone3 into the service's cgroup",
                        (true, false) => "clone3",
                        (false, _) => "fork",
                    };
                    return Err(self.parent_err(what)(e));
                }
            }
        };
        drop(report_tx);
        let report = read_report(&report_rx);
        let Some((step, errno)) = report else {
            return Ok(Spawned {
                pid: pid as u32,
                born_in_cgroup: into_cgroup,
            });
        };
        // It failed before running anything: reap it here. (A reaper of the
        // caller's may have been quicker: ECHILD is fine.)
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::waitpid(Some(p), rustix::process::WaitOptions::empty());
        }
        let source = io::Error::from_raw_os_error(errno);
        let program = self.program_path.clone();
        Err(match step {
            Some(Step::Exec) => SpawnError::Exec { program, source },
            Some(step) => {
                let detail = match step {
                    Step::WorkingDirectory => self.cwd.as_deref(),
                    Step::HostsFile => self.hosts_file.as_deref(),
                    _ => None,
                }
                .map(|c| PathBuf::from(OsStr::from_bytes(c.to_bytes())));
                SpawnError::Child {
                    program,
                    step,
                    detail,
                    source,
                }
            }
            None => SpawnError::Parent {
                program,
                what: "read the child's report (garbled)",
                source,
            },
        })
    }
}

#[cfg(test)]
impl Spawn<'_> {
    /// Behave as on a kernel without `clone3`.
    fn without_clone3(&mut self) -> &mut Self {
        self.no_clone3 = true;
        self
    }
}

fn log_fallback(what: &str) {
    if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!("{what}");
    }
}

/// `fd`, or a copy of it above 2 (closing it) if it is one of 0..=2.
fn above_stdio(fd: OwnedFd) -> rustix::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    rustix::io::fcntl_dupfd_cloexec(&fd, 3)
}

/// Reads the child's report: `None` when it closed the pipe by exec'ing,
/// else the step (None if garbled) and errno.
fn read_report(rx: &OwnedFd) -> Option<(Option<Step>, i32)> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(rx, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Some((None, e.raw_os_error())),
        }
    }
    match got {
        0 => None,
        8 => {
            let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            Some((Step::from_raw(step), errno))
        }
        _ => Some((None, libc::EIO)),
    }
}

/// Every signal blocked for the life of the value, then the old mask back.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> SignalsBlocked {
        // SAFETY: sigset_t is plain data; sigfillset initialises `all`, and
        // pthread_sigmask writes the old mask into `old`, which we own.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            SignalsBlocked(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}

/// # Safety
/// See [`Child::run`]: the child must only run async-signal-safe code.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3(args: &CloneArgs, child: &Child<'_>) -> rustix::io::Result<i32> {
    // SAFETY: passed on.
    unsafe { clone3_vfork(args, child) }
}

/// The child's stack for [`clone3_vfork`]: its own mapping, with a guard
/// page below it, unmapped when dropped.
#[cfg(target_arch = "x86_64")]
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

#[cfg(target_arch = "x86_64")]
impl ChildStack {
    /// Far more than the child's few frames of system calls need.
    const LEN: usize = 128 << 10;
    const GUARD: usize = 4096;

    fn new() -> rustix::io::Result<ChildStack> {
        let len = Self::LEN + Self::GUARD;
        // SAFETY: a fresh private anonymous mapping; nothing else refers
        // to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(last_errno());
        }
        let stack = ChildStack { base, len };
        // SAFETY: the lowest page of our own mapping becomes inaccessible,
        // so an overflow faults instead of writing below the stack.
        if unsafe { libc::mprotect(base, Self::GUARD, libc::PROT_NONE) } != 0 {
            return Err(last_errno());
        }
        Ok(stack)
    }

    /// The top of the stack (16-byte aligned: the mapping is page
    /// aligned).
    fn top(&self) -> u64 {
        self.base as u64 + self.len as u64
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used: the child has exec'd or
        // exited (CLONE_VFORK) before the parent gets here.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

fn last_errno() -> rustix::io::Errno {
    rustix::io::Errno::from_raw_os_error(
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL),
    )
}

/// The child's entry on its own stack (see [`clone3_vfork`]).
#[cfg(target_arch = "x86_64")]
extern "C" fn child_entry(child: *const Child<'_>) -> ! {
    // SAFETY: `child` points into the parent's frame, which stays put
    // (CLONE_VFORK suspends the parent) and which the child only reads; we
    // are the child, with every signal blocked.
    unsafe { (*child).run() }
}

/// `clone3` with `CLONE_VM | CLONE_VFORK`, as `posix_spawn` does: the child
/// borrows this address space on a stack of its own until it execs, so
/// nothing is copied (a fork copies the page tables of the whole minion and
/// then takes a page fault for every page either side writes first). The
/// parent is suspended until the child has exec'd or exited.
///
/// # Safety
/// See [`Child::run`]: the child must only run async-signal-safe code, and
/// with CLONE_VM it must write no memory of ours but its own stack (it
/// writes none but this thread's `errno`, through the C library, which
/// nothing reads afterwards: system calls on data built before the
/// clone).
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_vfork(args: &CloneArgs, child: &Child<'_>) -> rustix::io::Result<i32> {
    let stack = ChildStack::new()?;
    let args = CloneArgs {
        flags: args.flags | libc::CLONE_VM as u64 | libc::CLONE_VFORK as u64,
        stack: stack.base as u64,
        stack_size: stack.top() - stack.base as u64,
        ..*args
    };
    let blocked = SignalsBlocked::new();
    let ret: isize;
    // SAFETY: the raw clone3 system call. The parent's registers but rax,
    // rcx and r11 (the syscall's) are kept. The child starts after the
    // `syscall` with rax 0 and its stack pointer at the top of `stack`
    // (16-byte aligned, so the `call` leaves the callee's frame as the ABI
    // wants it), and never comes back: `child_entry` ends in execve or
    // _exit.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") &args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") child as *const Child<'_>,
            in("r13") child_entry as extern "C" fn(*const Child<'_>) -> !,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    drop(blocked);
    drop(stack);
    if ret < 0 {
        return Err(rustix::io::Errno::from_raw_os_error(-ret as i32));
    }
    Ok(ret as i32)
}

/// # Safety
/// See [`Child::run`]: the child must only run async-signal-safe code.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3(args: &CloneArgs, child: &Child<'_>) -> rustix::io::Result<i32> {
    let blocked = SignalsBlocked::new();
    // SAFETY: `args` is a valid clone_args of the size passed. Without
    // CLONE_VM the child gets a copy of this address space and of this
    // stack, like fork, and continues from here.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        0 => {
            // SAFETY: we are the child, with every signal blocked.
            unsafe { child.run() }
        }
        pid if pid > 0 => {
            drop(blocked);
            Ok(pid as i32)
        }
        _ => {
            let e = rustix::io::Errno::from_io_error(&io::Error::last_os_error())
                .unwrap_or(rustix::io::Errno::INVAL);
            drop(blocked);
            Err(e)
        }
    }
}

/// # Safety
/// See [`Child::run`].
unsafe fn fork(child: &Child<'_>) -> rustix::io::Result<i32> {
    let blocked = SignalsBlocked::new();
    // SAFETY: fork in a possibly multi-threaded process: the child runs
    // only async-signal-safe code (`Child::run`).
    let ret = unsafe { libc::fork() };
    match ret {
        0 => {
            // SAFETY: we are the child, with every signal blocked.
            unsafe { child.run() }
        }
        pid if pid > 0 => {
            drop(blocked);
            Ok(pid)
        }
        _ => {
            let e = last_errno();
            drop(blocked);
            Err(e)
        }
    }
}

/// What the child needs, all of it made before the clone.
#[derive(Clone, Copy)]
struct Child<'a> {
    program: &'a std::ffi::CStr,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    cwd: Option<&'a std::ffi::CStr>,
    null: BorrowedFd<'a>,
    output: BorrowedFd<'a>,
    report: BorrowedFd<'a>,
    process_group: bool,
    cgroup2_procs: Option<BorrowedFd<'a>>,
    procs: &'a [BorrowedFd<'a>],
    netns: Option<BorrowedFd<'a>>,
    hosts_file: Option<&'a std::ffi::CStr>,
    private_cgroup2: bool,
    /// The clone gave no mount namespace (the fork fallback): unshare one.
    unshare_mounts: bool,
}

type StepResult = Result<(), (Step, i32)>;

fn step(s: Step) -> impl Fn(rustix::io::Errno) -> (Step, i32) {
    move |e| (s, e.raw_os_error())
}

impl Child<'_> {
    /// The child's side: the steps, then `execve`; on failure the step and
    /// errno go to the report pipe and the child exits with 127.
    ///
    /// # Safety
    /// Only in the child of a clone/fork, with every signal blocked. Makes
    /// system calls only: no allocation, no lock, no panic.
    unsafe fn run(&self) -> ! {
        let (failed, errno) = match self.prepare() {
            // SAFETY: pointers and strings built before the clone, alive
            // in this copy of the address space.
            Ok(()) => unsafe { self.exec() },
            Err(e) => e,
        };
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&(failed as u32).to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        let _ = rustix::io::write(self.report, &buf);
        // SAFETY: _exit ends this process at once, without running atexit
        // handlers or flushing std's buffers (which belong to the parent).
        unsafe { libc::_exit(127) }
    }

    fn prepare(&self) -> StepResult {
        for fd in self.cgroup2_procs.iter().chain(self.procs) {
            rustix::io::write(fd, b"0").map_err(step(Step::JoinCgroup))?;
        }
        if self.unshare_mounts {
            // SAFETY: CLONE_NEWNS gives this single-threaded child its own
            // copy of the mount table; no CLONE_FILES, whose hazard
            // `unshare_unsafe` warns of.
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }
                .map_err(step(Step::MountNamespace))?;
        }
        if self.private_cgroup2 {
            rustix::mount::mount_change(
                c"/",
                MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
            )
            .map_err(step(Step::MountPropagation))?;
            rustix::mount::mount(
                c"cgroup2",
                c"/sys/fs/cgroup",
                c"cgroup2",
                MountFlags::empty(),
                None,
            )
            .map_err(step(Step::Cgroup2Mount))?;
        }
        if let Some(hosts) = self.hosts_file {
            if !self.private_cgroup2 {
                rustix::mount::mount_change(
                    c"/",
                    MountPropagationFlags::REC | MountPropagationFlags::DOWNSTREAM,
                )
                .map_err(step(Step::MountPropagation))?;
            }
            rustix::mount::mount_bind(hosts, c"/etc/hosts").map_err(step(Step::HostsFile))?;
            rustix::mount::mount_remount(c"/etc/hosts", MountFlags::BIND | MountFlags::RDONLY, c"")
                .map_err(step(Step::HostsFile))?;
        }
        if let Some(ns) = self.netns {
            rustix::thread::move_into_link_name_space(ns, Some(LinkNameSpaceType::Network))
                .map_err(step(Step::NetworkNamespace))?;
        }
        if self.process_group {
            rustix::process::setpgid(None, None).map_err(step(Step::ProcessGroup))?;
        }
        rustix::stdio::dup2_stdin(self.null).map_err(step(Step::Stdio))?;
        rustix::stdio::dup2_stdout(self.output).map_err(step(Step::Stdio))?;
        rustix::stdio::dup2_stderr(self.output).map_err(step(Step::Stdio))?;
        // Whatever the minion inherited without close-on-exec (from the
        // shell or service manager that started it) does not reach the
        // program either. Best effort: before Linux 5.11 this fails and
        // the descriptors' own flags decide, as they always do.
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on
        // this process's descriptors; it closes none.
        let _ = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if let Some(dir) = self.cwd {
            rustix::process::chdir(dir).map_err(step(Step::WorkingDirectory))?;
        }
        reset_signals().map_err(|e| (Step::Signals, e))
    }

    /// `execve`; returns only on failure.
    ///
    /// # Safety
    /// `argv` and `envp` are null-terminated arrays of pointers to live C
    /// strings.
    unsafe fn exec(&self) -> (Step, i32) {
        // SAFETY: see the function's contract.
        unsafe {
            libc::execve(
                self.program.as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
            )
        };
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        (Step::Exec, errno)
    }
}

/// The kernel's `sigset_t` size, which `rt_sigaction` wants.
const KERNEL_SIGSET_SIZE: usize = if cfg!(any(target_arch = "mips", target_arch = "mips64")) {
    16
} else {
    8
};

/// Every signal to its default disposition, then an empty mask. Handlers
/// would be reset by `execve` anyway; ignored signals would not: SIGPIPE,
/// which every Rust program ignores, and the C library's own 32 and 33,
/// which a process started by `posix_spawn` (cargo's children, for one)
/// inherits ignored.
fn reset_signals() -> Result<(), i32> {
    // SIG_DFL, no flags, no restorer, an empty mask: all zeros, whatever
    // the architecture's layout of the kernel's struct (this buffer is
    // larger than any).
    let dfl = [0u64; 8];
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads a kernel sigaction from `dfl` (all
        // zeros is SIG_DFL) and writes nothing (no old action asked for).
        // The raw system call, because the C library refuses to touch its
        // own signals 32 and 33.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                KERNEL_SIGSET_SIZE,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
    }
    // SAFETY: sigemptyset initialises the set; pthread_sigmask reads it.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        match libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) {
            0 => Ok(()),
            e => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FsMagic, Host, Linux};
    use std::io::Read;

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// Waits for child `pid`: its exit code (None if a signal ended it).
    fn wait(pid: u32) -> Option<i32> {
        let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
        let (_, status) =
            rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
                .unwrap()
                .unwrap();
        status.exit_status()
    }

    /// Runs `build`'s child (`/bin/sh` with a `PATH`) to its end, its
    /// output into `out`: its exit code and output.
    fn run_into<'a>(
        out: &'a std::fs::File,
        build: impl FnOnce(&mut Spawn<'a>),
    ) -> (Option<i32>, String) {
        let mut s = Spawn::new(Path::new("/bin/sh"), out.as_fd());
        s.env("PATH", "/usr/bin:/bin");
        build(&mut s);
        let child = s.spawn().unwrap_or_else(|e| panic!("{e}"));
        (wait(child.pid), read(out))
    }

    /// What was written to `out`, from its start.
    fn read(mut out: &std::fs::File) -> String {
        use std::io::Seek;
        let mut text = String::new();
        out.rewind().unwrap();
        out.read_to_string(&mut text).unwrap();
        text
    }

    fn run(build: impl for<'a> FnOnce(&mut Spawn<'a>)) -> (Option<i32>, String) {
        run_into(&tempfile::tempfile().unwrap(), build)
    }

    /// The cgroup2 hierarchy of this host: pure v2 or hybrid.
    fn cgroup2_root() -> Option<PathBuf> {
        ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| Linux.fs_type(p).is_ok_and(|m| m == FsMagic::CGROUP2))
    }

    /// A cgroup made for one test and removed after it.
    struct TestCgroup(PathBuf);

    impl TestCgroup {
        fn new(root: &Path, what: &str) -> TestCgroup {
            let dir = root.join(format!("phoenix-spawn-{what}-{}", std::process::id()));
            let _ = std::fs::remove_dir(&dir);
            std::fs::create_dir(&dir).unwrap();
            TestCgroup(dir)
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    #[test]
    fn argv_env_cwd_stdio_and_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let (code, out) = run(|s| {
            s.arg0("named")
                .args([
                    "-c",
                    "echo \"$0|$A|$(pwd)|$(readlink /proc/self/fd/0)\"; cut -d' ' -f5 /proc/$$/stat; echo $$",
                ])
                .env("A", "b c")
                .cwd(dir.path());
        });
        assert_eq!(code, Some(0), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            format!("named|b c|{}|/dev/null", dir.path().display())
        );
        // The leader of its own process group.
        assert_eq!(lines[1], lines[2], "{out}");
        // ... or, when told, in ours.
        let (_, out) = run(|s| {
            s.args(["-c", "cut -d' ' -f5 /proc/$$/stat"])
                .process_group(false);
        });
        assert_eq!(
            out.trim(),
            rustix::process::getpgrp().as_raw_nonzero().to_string()
        );
    }

    #[test]
    fn signals_are_reset_and_no_descriptor_leaks() {
        // This test binary ignores SIGPIPE, as every Rust program does; the
        // program itself reads its own status (a shell would change it).
        let out = tempfile::tempfile().unwrap();
        let (code, status) = {
            let mut s = Spawn::new(Path::new("/bin/cat"), out.as_fd());
            s.arg("/proc/self/status");
            let child = s.spawn().unwrap();
            (wait(child.pid), read(&out))
        };
        assert_eq!(code, Some(0), "{status}");
        assert!(status.contains("SigBlk:\t0000000000000000"), "{status}");
        assert!(status.contains("SigIgn:\t0000000000000000"), "{status}");
        // ls's own descriptors: 0, 1, 2 and the one it lists with.
        let out = tempfile::tempfile().unwrap();
        let child = Spawn::new(Path::new("/bin/ls"), out.as_fd())
            .arg("/proc/self/fd")
            .spawn()
            .unwrap();
        assert_eq!(wait(child.pid), Some(0));
        let fds: Vec<String> = read(&out).lines().map(str::to_owned).collect();
        assert_eq!(fds, ["0", "1", "2", "3"]);
    }

    #[test]
    fn a_missing_program_is_an_error_naming_it() {
        let out = tempfile::tempfile().unwrap();
        let e = Spawn::new(Path::new("/no/such/program"), out.as_fd())
            .spawn()
            .unwrap_err();
        assert_eq!(e.step(), Some(Step::Exec));
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(
            e.to_string(),
            "cannot execute /no/such/program: No such file or directory (os error 2)"
        );
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
        assert!(io.to_string().contains("/no/such/program"), "{io}");
    }

    #[test]
    fn a_failed_step_names_the_step_and_its_path() {
        let out = tempfile::tempfile().unwrap();
        let e = Spawn::new(Path::new("/bin/true"), out.as_fd())
            .cwd(Path::new("/no/such/dir"))
            .spawn()
            .unwrap_err();
        assert_eq!(e.step(), Some(Step::WorkingDirectory));
        assert_eq!(
            e.to_string(),
            "cannot start /bin/true: change to the working directory /no/such/dir: No such file or directory (os error 2)"
        );
        // A descriptor that is no network namespace.
        let e = Spawn::new(Path::new("/bin/true"), out.as_fd())
            .netns(out.as_fd())
            .spawn()
            .unwrap_err();
        assert_eq!(e.step(), Some(Step::NetworkNamespace));
        assert!(
            e.to_string()
                .contains("setns into the service's network namespace: Invalid argument"),
            "{e}"
        );
        // A NUL byte never reaches the child.
        let e = Spawn::new(Path::new("/bin/true"), out.as_fd())
            .arg("a\0b")
            .spawn()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot start /bin/true: its arguments contains a NUL byte"
        );
    }

    #[test]
    fn a_child_is_born_in_its_cgroup() {
        if !is_root() {
            eprintln!("skipped a_child_is_born_in_its_cgroup: needs root");
            return;
        }
        let Some(root) = cgroup2_root() else {
            eprintln!("skipped a_child_is_born_in_its_cgroup: no cgroup2 here");
            return;
        };
        for fork in [false, true] {
            let cg = TestCgroup::new(&root, if fork { "fork" } else { "clone3" });
            let dir = Linux.open_dir(&cg.0).unwrap();
            let out = tempfile::tempfile().unwrap();
            let mut s = Spawn::new(Path::new("/bin/cat"), out.as_fd());
            s.arg("/proc/self/cgroup").into_cgroup(dir.as_fd());
            if fork {
                s.without_clone3();
            }
            let child = s.spawn().unwrap();
            assert_eq!(child.born_in_cgroup, !fork);
            assert_eq!(wait(child.pid), Some(0));
            let text = read(&out);
            let name = cg.0.file_name().unwrap().to_string_lossy();
            assert!(text.lines().any(|l| l == format!("0::/{name}")), "{text}");
        }
    }

    #[test]
    fn a_child_joins_v1_cgroups_before_exec() {
        if !is_root() {
            eprintln!("skipped a_child_joins_v1_cgroups_before_exec: needs root");
            return;
        }
        let pids = Path::new("/sys/fs/cgroup/pids");
        if !Linux.fs_type(pids).is_ok_and(|m| m == FsMagic::CGROUP1) {
            eprintln!("skipped a_child_joins_v1_cgroups_before_exec: no v1 pids hierarchy");
            return;
        }
        let cg = TestCgroup::new(pids, "v1");
        let procs = Linux.open_write(&cg.0.join("cgroup.procs")).unwrap();
        let name = cg.0.file_name().unwrap().to_string_lossy().into_owned();
        let file = tempfile::tempfile().unwrap();
        let (code, out) = run_into(&file, |s| {
            s.args(["-c", "cat /proc/self/cgroup"])
                .join_procs(procs.as_fd());
        });
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.lines().any(|l| l.ends_with(&format!(":pids:/{name}"))),
            "{out}"
        );
    }

    #[test]
    fn a_child_joins_a_network_namespace() {
        if !is_root() {
            eprintln!("skipped a_child_joins_a_network_namespace: needs root");
            return;
        }
        // A namespace of a thread's own, held by its descriptor.
        let ns = std::thread::spawn(|| {
            // SAFETY: CLONE_NEWNET moves only this thread, which ends
            // right after; no CLONE_FILES.
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNET) }.unwrap();
            OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").unwrap())
        })
        .join()
        .unwrap();
        let interfaces = |dev: &str| -> Vec<String> {
            dev.lines()
                .skip(2)
                .filter_map(|l| Some(l.split(':').next()?.trim().to_owned()))
                .collect()
        };
        let file = tempfile::tempfile().unwrap();
        let (code, out) = run_into(&file, |s| {
            s.args(["-c", "cat /proc/net/dev"]).netns(ns.as_fd());
        });
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(interfaces(&out), ["lo"], "{out}");
        // Ours are the host's, not that.
        let ours = std::fs::read_to_string("/proc/self/net/dev").unwrap();
        assert_ne!(interfaces(&ours), ["lo"], "{ours}");
    }

    #[test]
    fn a_hosts_file_is_bound_for_the_child_alone() {
        if !is_root() {
            eprintln!("skipped a_hosts_file_is_bound_for_the_child_alone: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "fd38:dde8:32dd:1::7 web\n").unwrap();
        let host_hosts = std::fs::read_to_string("/etc/hosts").unwrap();
        let mounts = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let before = mounts();
        for fork in [false, true] {
            let (code, out) = run(|s| {
                s.args([
                    "-c",
                    "cat /etc/hosts; echo 1.2.3.4 evil >> /etc/hosts && echo wrote",
                ])
                .hosts_file(&hosts);
                if fork {
                    s.without_clone3();
                }
            });
            // Read-only: the service cannot change what it was given.
            assert_ne!(code, Some(0), "{out}");
            assert!(
                out.starts_with("fd38:dde8:32dd:1::7 web\n")
                    && out.contains("Read-only file system"),
                "fork: {fork}: {out}"
            );
            assert_eq!(
                std::fs::read_to_string(&hosts).unwrap(),
                "fd38:dde8:32dd:1::7 web\n"
            );
            assert_eq!(std::fs::read_to_string("/etc/hosts").unwrap(), host_hosts);
            assert_eq!(mounts(), before, "a mount leaked into our namespace");
        }
        // A missing file is named.
        let out = tempfile::tempfile().unwrap();
        let e = Spawn::new(Path::new("/bin/true"), out.as_fd())
            .hosts_file(&dir.path().join("missing"))
            .spawn()
            .unwrap_err();
        assert_eq!(e.step(), Some(Step::HostsFile), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn a_private_cgroup2_mount_stays_in_the_child() {
        if !is_root() {
            eprintln!("skipped a_private_cgroup2_mount_stays_in_the_child: needs root");
            return;
        }
        let before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let (code, out) = run(|s| {
            s.args(["-c", "stat -f -c %T /sys/fs/cgroup"])
                .private_cgroup2(true);
        });
        assert_eq!(code, Some(0), "{out}");
        assert_eq!(out.trim(), "cgroup2fs");
        let after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(before, after, "the mount leaked into our namespace");
    }
}
