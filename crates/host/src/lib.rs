//! Host operations behind one narrow interface.
//!
//! Everything privileged or kernel-facing that the minion does to its host
//! (signalling processes and process groups, pidfds, `/proc/PID/stat`,
//! `statvfs`/`statfs`, overlayfs mounts, and the file operations the cgroup
//! filesystem is driven through) goes through the object-safe [`Host`]
//! trait. [`Linux`] is the real implementation (rustix, so almost no
//! `unsafe`); `Recording` (feature `fake`) records every call and keeps
//! an in-memory file tree, so the logic above — cgroups here, the drivers
//! and supervisor in the minion — is unit-tested without root.
//!
//! Invariants every implementation keeps:
//! - a pid or process group below 2 is refused (`EINVAL`) and never
//!   signalled: `kill(-1)` would signal every process and `kill(0)` our own
//!   group;
//! - errors name the operation and the path or pid ([`HostError`]), and keep
//!   the OS error so callers can match on it ([`HostError::raw_os_error`]);
//! - nothing here changes the calling thread's namespaces: what must run in
//!   another mount namespace runs in a forked child ([`pre_exec`]).
//!
//! Beside the trait: [`cgroup`] (per-service cgroups on v1, v2 and hybrid
//! hosts), [`spawn`] (starting a service's process inside its cgroup and
//! namespaces), [`fs::write_atomic`] and [`users`] (`/etc/passwd` and
//! `/etc/group` parsing).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

pub mod cgroup;
pub mod fs;
mod linux;
pub mod pre_exec;
#[cfg(any(test, feature = "fake"))]
mod recording;
pub mod spawn;
pub mod users;

pub use linux::{Linux, parse_start_time};
#[cfg(any(test, feature = "fake"))]
pub use recording::{Call, Recording};

/// Raises this process's open-file limit to its hard maximum (a shell's
/// soft limit is often 1024, far below what the daemons need: the minion
/// holds a pidfd a service, the master's proxy a descriptor or two a
/// connection) and returns the limit then in force.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    // `None` is unlimited.
    limit.current.unwrap_or(u64::MAX)
}

/// The host operations the minion needs, and no more.
///
/// Object safe, so the minion holds an `Arc<dyn Host>` and tests hand it a
/// `Recording`.
pub trait Host: Send + Sync {
    /// Sends `signal` to one process.
    fn signal(&self, pid: u32, signal: Signal) -> Result<(), HostError>;
    /// Sends `signal` to every process of the group led by `pgid`.
    fn signal_group(&self, pgid: u32, signal: Signal) -> Result<(), HostError>;
    /// Whether any process of the group led by `pgid` still exists.
    fn group_alive(&self, pgid: u32) -> bool;
    /// A pidfd for `pid`: it becomes readable when the process ends.
    fn pidfd_open(&self, pid: u32) -> Result<OwnedFd, HostError>;
    /// The start time of `pid` in clock ticks since boot (`/proc/PID/stat`
    /// field 22); with the pid it names one process across pid reuse. None
    /// when the process is gone or a zombie.
    fn process_start_time(&self, pid: u32) -> Option<u64>;
    /// Size and free bytes (for unprivileged users) of `path`'s filesystem.
    fn disk_space(&self, path: &Path) -> Result<DiskSpace, HostError>;
    /// The filesystem type (`statfs` magic) of `path`.
    fn fs_type(&self, path: &Path) -> Result<FsMagic, HostError>;
    /// Mounts an overlayfs.
    fn mount_overlay(&self, mount: &OverlayMount) -> Result<(), HostError>;
    /// Detaches the mount at `target` (`umount2(MNT_DETACH)`).
    fn unmount_detach(&self, target: &Path) -> Result<(), HostError>;
    /// Creates one directory; one that already exists is fine.
    fn create_dir(&self, path: &Path) -> Result<(), HostError>;
    /// Writes a small file in one write (created if missing, truncated).
    /// On the cgroup filesystem each write is one command.
    fn write_file(&self, path: &Path, contents: &[u8]) -> Result<(), HostError>;
    /// Reads a small text file whole.
    fn read_file(&self, path: &Path) -> Result<String, HostError>;
    /// Removes an empty directory (a cgroup without processes or children).
    fn remove_dir(&self, path: &Path) -> Result<(), HostError>;
    /// The names in a directory, sorted.
    fn list_dir(&self, path: &Path) -> Result<Vec<String>, HostError>;
    /// Opens an existing file write-only (close-on-exec), to be written
    /// later, e.g. from a forked child where opening would allocate.
    fn open_write(&self, path: &Path) -> Result<OwnedFd, HostError>;
    /// Opens a directory read-only (close-on-exec): a cgroup2 directory to
    /// start a process in ([`spawn::Spawn::into_cgroup`]).
    fn open_dir(&self, path: &Path) -> Result<OwnedFd, HostError>;
}

/// A signal number that names a real signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Signal(i32);

impl Signal {
    pub const HUP: Signal = Signal(1);
    pub const INT: Signal = Signal(2);
    pub const QUIT: Signal = Signal(3);
    pub const KILL: Signal = Signal(9);
    pub const USR1: Signal = Signal(10);
    pub const USR2: Signal = Signal(12);
    pub const TERM: Signal = Signal(15);
    pub const CONT: Signal = Signal(18);
    pub const STOP: Signal = Signal(19);

    /// The signal with this number, if it is one Linux names (1..=31 and
    /// the real-time range).
    pub fn from_raw(raw: i32) -> Option<Signal> {
        rustix::process::Signal::from_named_raw(raw).map(|_| Signal(raw))
    }

    pub fn as_raw(self) -> i32 {
        self.0
    }
}

/// A filesystem's `statfs` magic number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FsMagic(pub u64);

impl FsMagic {
    pub const CGROUP2: FsMagic = FsMagic(0x6367_7270);
    pub const CGROUP1: FsMagic = FsMagic(0x0027_e0eb);
    pub const TMPFS: FsMagic = FsMagic(0x0102_1994);
    pub const EXT4: FsMagic = FsMagic(0xef53);
    pub const OVERLAYFS: FsMagic = FsMagic(0x794c_7630);
}

/// Size and free space of a filesystem, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    pub total: u64,
    /// What an unprivileged user may still write (`f_bavail`).
    pub free: u64,
}

/// An overlayfs mount: `lower` layers (uppermost first) below a writable
/// `upper`, with overlayfs's scratch `work` on the same filesystem as
/// `upper`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayMount {
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub target: PathBuf,
}

impl OverlayMount {
    /// The mount's data string. A `,` in any path, or a `:` in a lower one,
    /// would be read as a separator by overlayfs, so such paths are refused.
    pub fn options(&self) -> Result<String, HostError> {
        let bad = |p: &Path, extra: char| {
            let s = p.to_string_lossy();
            s.contains(',') || s.contains(extra) || s.contains('\0')
        };
        let mut lower = Vec::new();
        for p in &self.lower {
            if bad(p, ':') {
                return Err(HostError::invalid("use as an overlay layer", p));
            }
            lower.push(p.to_string_lossy().into_owned());
        }
        if lower.is_empty() {
            return Err(HostError::invalid(
                "mount overlayfs without lower layers on",
                &self.target,
            ));
        }
        for p in [&self.upper, &self.work] {
            if bad(p, ',') {
                return Err(HostError::invalid("use as an overlay directory", p));
            }
        }
        Ok(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            self.upper.display(),
            self.work.display()
        ))
    }
}

/// A host operation that failed: which, on what, and the OS error.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot {op} {}: {source}", path.display())]
    Path {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {op} process {pid}: {source}")]
    Process {
        op: &'static str,
        pid: u32,
        source: std::io::Error,
    },
}

impl HostError {
    pub fn path(op: &'static str, path: &Path, source: std::io::Error) -> HostError {
        HostError::Path {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn process(op: &'static str, pid: u32, source: std::io::Error) -> HostError {
        HostError::Process { op, pid, source }
    }

    fn invalid(op: &'static str, path: &Path) -> HostError {
        HostError::path(op, path, std::io::Error::from_raw_os_error(EINVAL))
    }

    /// The OS error number, to tell "gone" (`ESRCH`, `ENOENT`) or "busy"
    /// from real failures.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.io().raw_os_error()
    }

    pub fn io(&self) -> &std::io::Error {
        match self {
            HostError::Path { source, .. } | HostError::Process { source, .. } => source,
        }
    }
}

/// The errno values callers match on, without a libc dependency.
pub const ENOENT: i32 = 2;
pub const ESRCH: i32 = 3;
pub const EACCES: i32 = 13;
pub const EBUSY: i32 = 16;
pub const EEXIST: i32 = 17;
pub const EINVAL: i32 = 22;
pub const ENOTEMPTY: i32 = 39;

/// Pids and groups below 2 are never signalled (see the module invariants).
fn checked_pid(op: &'static str, pid: u32) -> Result<rustix::process::Pid, HostError> {
    let refuse = || HostError::process(op, pid, std::io::Error::from_raw_os_error(EINVAL));
    if pid < 2 {
        return Err(refuse());
    }
    let raw = i32::try_from(pid).map_err(|_| refuse())?;
    rustix::process::Pid::from_raw(raw).ok_or_else(refuse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_raised_to_its_maximum() {
        use rustix::process::{Resource, getrlimit};
        let limit = raise_nofile_limit();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(now.current, now.maximum);
        assert_eq!(limit, now.current.unwrap_or(u64::MAX));
    }

    #[test]
    fn signals_are_checked_against_the_named_ones() {
        assert_eq!(Signal::from_raw(15), Some(Signal::TERM));
        assert_eq!(Signal::from_raw(9).map(Signal::as_raw), Some(9));
        assert_eq!(Signal::from_raw(0), None);
        assert_eq!(Signal::from_raw(-3), None);
        assert_eq!(Signal::from_raw(4000), None);
        // The constants are the Linux numbers.
        for (s, r) in [
            (Signal::HUP, rustix::process::Signal::HUP),
            (Signal::INT, rustix::process::Signal::INT),
            (Signal::QUIT, rustix::process::Signal::QUIT),
            (Signal::KILL, rustix::process::Signal::KILL),
            (Signal::USR1, rustix::process::Signal::USR1),
            (Signal::USR2, rustix::process::Signal::USR2),
            (Signal::TERM, rustix::process::Signal::TERM),
            (Signal::CONT, rustix::process::Signal::CONT),
            (Signal::STOP, rustix::process::Signal::STOP),
        ] {
            assert_eq!(s.as_raw(), r.as_raw());
        }
    }

    #[test]
    fn pids_below_two_are_refused() {
        for pid in [0, 1, u32::MAX] {
            let e = checked_pid("signal", pid).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(EINVAL));
            assert!(e.to_string().contains(&format!("process {pid}")), "{e}");
        }
        assert_eq!(checked_pid("signal", 2).unwrap().as_raw_nonzero().get(), 2);
    }

    #[test]
    fn overlay_options_list_the_layers_and_refuse_separators() {
        let m = OverlayMount {
            lower: vec!["/img/a".into(), "/img/b".into()],
            upper: "/w/upper".into(),
            work: "/w/work".into(),
            target: "/w/rootfs".into(),
        };
        assert_eq!(
            m.options().unwrap(),
            "lowerdir=/img/a:/img/b,upperdir=/w/upper,workdir=/w/work"
        );
        let colon = OverlayMount {
            lower: vec!["/img/a:b".into()],
            ..m.clone()
        };
        let e = colon.options().unwrap_err();
        assert!(e.to_string().contains("/img/a:b"), "{e}");
        let comma = OverlayMount {
            upper: "/w/up,per".into(),
            ..m.clone()
        };
        assert!(
            comma
                .options()
                .unwrap_err()
                .to_string()
                .contains("/w/up,per")
        );
        let none = OverlayMount { lower: vec![], ..m };
        assert!(none.options().is_err());
    }

    #[test]
    fn errors_name_the_operation_and_the_target() {
        let e = HostError::path(
            "write",
            Path::new("/sys/fs/cgroup/x/memory.max"),
            std::io::Error::from_raw_os_error(EACCES),
        );
        let text = e.to_string();
        assert!(
            text.starts_with("cannot write /sys/fs/cgroup/x/memory.max: "),
            "{text}"
        );
        assert_eq!(e.raw_os_error(), Some(EACCES));
    }
}
