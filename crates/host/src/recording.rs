//! A fake host for tests: it records every call in order and keeps a small
//! world in memory — a file tree, processes with process groups and
//! pidfds, mounts — so logic above [`Host`] can be driven and asserted
//! without root.
//!
//! The world behaves like Linux where tests look: a missing parent is
//! `ENOENT`, a signal to an unknown process `ESRCH`. Directories created
//! under a path registered with [`Recording::cgroupfs`] behave like
//! cgroups: they are born with the interface files given, a write to
//! `cgroup.procs` moves that pid in (out of the hierarchy's other cgroups),
//! a write of `1` to `cgroup.kill` kills every listed process, and
//! `rmdir` works with files inside but fails with `EBUSY` while processes
//! or child cgroups remain. A process ends on `SIGKILL` (and on `SIGTERM`
//! and `SIGINT` unless told to ignore them, [`Recording::ignore_signal`]):
//! it leaves its cgroups, its start time reads as gone, and its pidfds
//! become readable.
//!
//! [`Recording::fail_when`] makes chosen calls fail with an errno; the call
//! is still recorded.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::{
    DiskSpace, EBUSY, EEXIST, EINVAL, ENOENT, ENOTEMPTY, ESRCH, FsMagic, Host, HostError,
    OverlayMount, Signal, checked_pid,
};

/// One call made to the host, with its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Signal {
        pid: u32,
        signal: Signal,
    },
    SignalGroup {
        pgid: u32,
        signal: Signal,
    },
    GroupAlive {
        pgid: u32,
    },
    PidfdOpen {
        pid: u32,
    },
    ProcessStartTime {
        pid: u32,
    },
    DiskSpace {
        path: PathBuf,
    },
    FsType {
        path: PathBuf,
    },
    MountOverlay(OverlayMount),
    UnmountDetach {
        target: PathBuf,
    },
    CreateDir {
        path: PathBuf,
    },
    /// The contents as text (lossy), which is what tests compare.
    WriteFile {
        path: PathBuf,
        contents: String,
    },
    ReadFile {
        path: PathBuf,
    },
    RemoveDir {
        path: PathBuf,
    },
    ListDir {
        path: PathBuf,
    },
    OpenWrite {
        path: PathBuf,
    },
    OpenDir {
        path: PathBuf,
    },
}

impl Call {
    /// The path the call is about, if it is about one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Call::DiskSpace { path }
            | Call::FsType { path }
            | Call::CreateDir { path }
            | Call::WriteFile { path, .. }
            | Call::ReadFile { path }
            | Call::RemoveDir { path }
            | Call::ListDir { path }
            | Call::OpenWrite { path }
            | Call::OpenDir { path } => Some(path),
            Call::UnmountDetach { target } => Some(target),
            Call::MountOverlay(m) => Some(&m.target),
            Call::Signal { .. }
            | Call::SignalGroup { .. }
            | Call::GroupAlive { .. }
            | Call::PidfdOpen { .. }
            | Call::ProcessStartTime { .. } => None,
        }
    }

    /// The error this call fails with, named as [`crate::Linux`] names it.
    fn error(&self, errno: i32) -> HostError {
        let e = std::io::Error::from_raw_os_error(errno);
        let (op, pid) = match self {
            Call::Signal { pid, .. } => ("signal", *pid),
            Call::SignalGroup { pgid, .. } => ("signal the group of", *pgid),
            Call::GroupAlive { pgid } => ("probe the group of", *pgid),
            Call::PidfdOpen { pid } => ("open a pidfd for", *pid),
            Call::ProcessStartTime { pid } => ("read the start time of", *pid),
            _ => {
                let op = match self {
                    Call::DiskSpace { .. } => "statvfs",
                    Call::FsType { .. } => "statfs",
                    Call::MountOverlay(_) => "mount an overlayfs on",
                    Call::UnmountDetach { .. } => "unmount",
                    Call::CreateDir { .. } => "create directory",
                    Call::WriteFile { .. } => "write",
                    Call::ReadFile { .. } => "read",
                    Call::RemoveDir { .. } => "remove directory",
                    Call::ListDir { .. } => "list",
                    Call::OpenDir { .. } => "open directory",
                    _ => "open for writing",
                };
                let path = self.path().unwrap_or(Path::new("/"));
                return HostError::path(op, path, e);
            }
        };
        HostError::process(op, pid, e)
    }
}

type Predicate = Box<dyn Fn(&Call) -> bool + Send + Sync>;

#[derive(Debug)]
enum Node {
    Dir,
    File(String),
}

struct Process {
    group: u32,
    start_time: u64,
    ignored: Vec<Signal>,
    /// Write ends of the pipes handed out as pidfds: dropping them makes
    /// the read ends readable, as a real pidfd is when the process ends.
    pidfd_writers: Vec<OwnedFd>,
}

#[derive(Default)]
struct World {
    calls: Vec<Call>,
    tree: BTreeMap<PathBuf, Node>,
    /// cgroup mounts and the interface files a new cgroup under each gets.
    cgroupfs: Vec<(PathBuf, Vec<(String, String)>)>,
    fs_types: BTreeMap<PathBuf, FsMagic>,
    disks: BTreeMap<PathBuf, DiskSpace>,
    processes: BTreeMap<u32, Process>,
    mounts: BTreeMap<PathBuf, OverlayMount>,
    failures: Vec<(Predicate, i32)>,
}

/// The fake host. See the module documentation for how its world behaves.
pub struct Recording {
    world: Mutex<World>,
}

impl Default for Recording {
    fn default() -> Self {
        Recording::new()
    }
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("calls", &self.world().calls)
            .finish_non_exhaustive()
    }
}

fn err(errno: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(errno)
}

impl Recording {
    /// An empty world: only `/` exists.
    pub fn new() -> Recording {
        let mut world = World::default();
        world.tree.insert(PathBuf::from("/"), Node::Dir);
        Recording {
            world: Mutex::new(world),
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        // A test that panicked while holding the lock has failed already;
        // the world is still worth reading.
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    // --- setting the world up (not recorded) ---

    /// Creates a directory and its missing ancestors.
    pub fn put_dir(&self, path: impl AsRef<Path>) {
        let mut w = self.world();
        for a in path.as_ref().ancestors() {
            w.tree.entry(a.to_path_buf()).or_insert(Node::Dir);
        }
    }

    /// Creates (or replaces) a file, and its missing ancestors.
    pub fn put_file(&self, path: impl AsRef<Path>, contents: &str) {
        let path = path.as_ref();
        if let Some(parent) = path.parent() {
            self.put_dir(parent);
        }
        self.world()
            .tree
            .insert(path.to_path_buf(), Node::File(contents.to_owned()));
    }

    /// Makes `mount` (created if missing) a cgroup filesystem of the given
    /// type whose new cgroups are born with `files` (name, contents).
    pub fn cgroupfs(&self, mount: impl AsRef<Path>, magic: FsMagic, files: &[(&str, &str)]) {
        let mount = mount.as_ref();
        self.put_dir(mount);
        let files = files
            .iter()
            .map(|(n, c)| ((*n).to_owned(), (*c).to_owned()))
            .collect();
        let mut w = self.world();
        w.cgroupfs.push((mount.to_path_buf(), files));
        w.fs_types.insert(mount.to_path_buf(), magic);
    }

    /// What `fs_type` answers for `path` (otherwise: ext4 where the path
    /// exists).
    pub fn set_fs_type(&self, path: impl AsRef<Path>, magic: FsMagic) {
        self.world()
            .fs_types
            .insert(path.as_ref().to_path_buf(), magic);
    }

    /// What `disk_space` answers for paths at or under `path`.
    pub fn set_disk_space(&self, path: impl AsRef<Path>, space: DiskSpace) {
        self.world()
            .disks
            .insert(path.as_ref().to_path_buf(), space);
    }

    /// A running process in process group `pgid`.
    pub fn add_process(&self, pid: u32, pgid: u32, start_time: u64) {
        self.world().processes.insert(
            pid,
            Process {
                group: pgid,
                start_time,
                ignored: Vec::new(),
                pidfd_writers: Vec::new(),
            },
        );
    }

    /// `pid` survives `signal` (SIGKILL cannot be ignored).
    pub fn ignore_signal(&self, pid: u32, signal: Signal) {
        if let Some(p) = self.world().processes.get_mut(&pid) {
            p.ignored.push(signal);
        }
    }

    /// Ends `pid` as if it exited by itself.
    pub fn end_process(&self, pid: u32) {
        self.world().end(pid);
    }

    /// Every later call for which `when` is true fails with `errno`.
    pub fn fail_when(&self, when: impl Fn(&Call) -> bool + Send + Sync + 'static, errno: i32) {
        self.world().failures.push((Box::new(when), errno));
    }

    /// Every later call about `path` fails with `errno`.
    pub fn fail_path(&self, path: impl AsRef<Path>, errno: i32) {
        let path = path.as_ref().to_path_buf();
        self.fail_when(move |c| c.path() == Some(path.as_path()), errno);
    }

    /// Calls stop failing.
    pub fn clear_failures(&self) {
        self.world().failures.clear();
    }

    // --- reading it back ---

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.world().calls.clone()
    }

    /// Every call so far, and forgets them.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.world().calls)
    }

    /// The file writes so far, in order: (path, contents).
    pub fn writes(&self) -> Vec<(PathBuf, String)> {
        self.world()
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::WriteFile { path, contents } => Some((path.clone(), contents.clone())),
                _ => None,
            })
            .collect()
    }

    /// A file's contents, if it is a file.
    pub fn file(&self, path: impl AsRef<Path>) -> Option<String> {
        match self.world().tree.get(path.as_ref()) {
            Some(Node::File(c)) => Some(c.clone()),
            _ => None,
        }
    }

    /// Whether anything (file or directory) is at `path`.
    pub fn exists(&self, path: impl AsRef<Path>) -> bool {
        self.world().tree.contains_key(path.as_ref())
    }

    /// Whether `pid` is still running.
    pub fn is_running(&self, pid: u32) -> bool {
        self.world().processes.contains_key(&pid)
    }

    /// The overlay mounted at `target`, if any.
    pub fn mount_at(&self, target: impl AsRef<Path>) -> Option<OverlayMount> {
        self.world().mounts.get(target.as_ref()).cloned()
    }

    /// Records `call`, then fails it if a failure was asked for.
    fn enter(&self, call: Call) -> Result<MutexGuard<'_, World>, HostError> {
        let mut w = self.world();
        let failure = w.failures.iter().find(|(p, _)| p(&call)).map(|(_, e)| *e);
        w.calls.push(call.clone());
        match failure {
            Some(errno) => Err(call.error(errno)),
            None => Ok(w),
        }
    }
}

impl World {
    fn end(&mut self, pid: u32) {
        // Dropping the process drops its pidfd write ends.
        if self.processes.remove(&pid).is_none() {
            return;
        }
        let line = pid.to_string();
        for (path, node) in &mut self.tree {
            if let Node::File(text) = node
                && path.file_name().is_some_and(|n| n == "cgroup.procs")
            {
                *text = remove_line(text, &line);
            }
        }
    }

    /// Delivers `signal` to `pid`: KILL always ends it, TERM and INT unless
    /// ignored, others are only recorded.
    fn deliver(&mut self, pid: u32, signal: Signal) {
        let ends = signal == Signal::KILL
            || ([Signal::TERM, Signal::INT].contains(&signal)
                && self
                    .processes
                    .get(&pid)
                    .is_some_and(|p| !p.ignored.contains(&signal)));
        if ends {
            self.end(pid);
        }
    }

    /// The cgroup mount `path` is strictly under, with its interface files.
    fn cgroup_mount(&self, path: &Path) -> Option<&(PathBuf, Vec<(String, String)>)> {
        self.cgroupfs
            .iter()
            .filter(|(m, _)| path.starts_with(m) && path != m)
            .max_by_key(|(m, _)| m.components().count())
    }

    fn is_cgroup(&self, dir: &Path) -> bool {
        self.cgroupfs.iter().any(|(m, _)| dir.starts_with(m))
    }

    fn parent_is_dir(&self, path: &Path) -> bool {
        path.parent()
            .is_some_and(|p| matches!(self.tree.get(p), Some(Node::Dir)))
    }

    fn children(&self, dir: &Path) -> impl Iterator<Item = (&PathBuf, &Node)> {
        self.tree
            .range(dir.to_path_buf()..)
            .skip(1)
            .take_while(move |(p, _)| p.starts_with(dir))
            .filter(move |(p, _)| p.parent() == Some(dir))
    }

    fn procs_of(&self, dir: &Path) -> Vec<u32> {
        match self.tree.get(&dir.join("cgroup.procs")) {
            Some(Node::File(t)) => t.lines().filter_map(|l| l.trim().parse().ok()).collect(),
            _ => Vec::new(),
        }
    }

    /// cgroupfs semantics of a write into a cgroup directory.
    fn cgroup_write(&mut self, path: &Path, contents: &str) {
        let Some(dir) = path.parent() else { return };
        match path.file_name().and_then(|n| n.to_str()) {
            Some("cgroup.procs") => {
                let Ok(pid) = contents.trim().parse::<u32>() else {
                    return;
                };
                let line = pid.to_string();
                let mount = self.cgroup_mount(path).map(|(m, _)| m.clone());
                for (p, node) in &mut self.tree {
                    if let Node::File(t) = node
                        && p.file_name().is_some_and(|n| n == "cgroup.procs")
                        && mount.as_ref().is_some_and(|m| p.starts_with(m))
                    {
                        *t = remove_line(t, &line);
                    }
                }
                if let Some(Node::File(t)) = self.tree.get_mut(path) {
                    t.push_str(&line);
                    t.push('\n');
                }
            }
            Some("cgroup.kill") if contents.trim() == "1" => {
                for pid in self.procs_of(dir) {
                    self.end(pid);
                }
            }
            _ => {
                if let Some(Node::File(t)) = self.tree.get_mut(path) {
                    *t = contents.to_owned();
                }
            }
        }
    }
}

fn remove_line(text: &str, line: &str) -> String {
    text.lines()
        .filter(|l| l.trim() != line)
        .flat_map(|l| [l, "\n"])
        .collect()
}

impl Host for Recording {
    fn signal(&self, pid: u32, signal: Signal) -> Result<(), HostError> {
        let mut w = self.enter(Call::Signal { pid, signal })?;
        checked_pid("signal", pid)?;
        if !w.processes.contains_key(&pid) {
            return Err(HostError::process("signal", pid, err(ESRCH)));
        }
        w.deliver(pid, signal);
        Ok(())
    }

    fn signal_group(&self, pgid: u32, signal: Signal) -> Result<(), HostError> {
        let op = "signal the group of";
        let mut w = self.enter(Call::SignalGroup { pgid, signal })?;
        checked_pid(op, pgid)?;
        let members: Vec<u32> = w
            .processes
            .iter()
            .filter(|(_, p)| p.group == pgid)
            .map(|(pid, _)| *pid)
            .collect();
        if members.is_empty() {
            return Err(HostError::process(op, pgid, err(ESRCH)));
        }
        for pid in members {
            w.deliver(pid, signal);
        }
        Ok(())
    }

    fn group_alive(&self, pgid: u32) -> bool {
        let Ok(w) = self.enter(Call::GroupAlive { pgid }) else {
            return false;
        };
        pgid > 1 && w.processes.values().any(|p| p.group == pgid)
    }

    fn pidfd_open(&self, pid: u32) -> Result<OwnedFd, HostError> {
        let op = "open a pidfd for";
        let mut w = self.enter(Call::PidfdOpen { pid })?;
        checked_pid(op, pid)?;
        let Some(p) = w.processes.get_mut(&pid) else {
            return Err(HostError::process(op, pid, err(ESRCH)));
        };
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| HostError::process(op, pid, e.into()))?;
        p.pidfd_writers.push(write);
        Ok(read)
    }

    fn process_start_time(&self, pid: u32) -> Option<u64> {
        let w = self.enter(Call::ProcessStartTime { pid }).ok()?;
        w.processes.get(&pid).map(|p| p.start_time)
    }

    fn disk_space(&self, path: &Path) -> Result<DiskSpace, HostError> {
        let w = self.enter(Call::DiskSpace {
            path: path.to_path_buf(),
        })?;
        path.ancestors()
            .find_map(|a| w.disks.get(a).copied())
            .ok_or_else(|| HostError::path("statvfs", path, err(ENOENT)))
    }

    fn fs_type(&self, path: &Path) -> Result<FsMagic, HostError> {
        let w = self.enter(Call::FsType {
            path: path.to_path_buf(),
        })?;
        if let Some(m) = w.fs_types.get(path) {
            return Ok(*m);
        }
        if !w.tree.contains_key(path) {
            return Err(HostError::path("statfs", path, err(ENOENT)));
        }
        if w.is_cgroup(path) {
            let mount = w.cgroupfs.iter().find(|(m, _)| path.starts_with(m));
            if let Some(m) = mount.and_then(|(m, _)| w.fs_types.get(m)) {
                return Ok(*m);
            }
        }
        Ok(FsMagic::EXT4)
    }

    fn mount_overlay(&self, mount: &OverlayMount) -> Result<(), HostError> {
        let op = "mount an overlayfs on";
        let mut w = self.enter(Call::MountOverlay(mount.clone()))?;
        mount.options()?;
        let dirs = mount
            .lower
            .iter()
            .chain([&mount.upper, &mount.work, &mount.target]);
        for d in dirs {
            if !matches!(w.tree.get(d), Some(Node::Dir)) {
                return Err(HostError::path(op, &mount.target, err(ENOENT)));
            }
        }
        w.mounts.insert(mount.target.clone(), mount.clone());
        Ok(())
    }

    fn unmount_detach(&self, target: &Path) -> Result<(), HostError> {
        let mut w = self.enter(Call::UnmountDetach {
            target: target.to_path_buf(),
        })?;
        match w.mounts.remove(target) {
            Some(_) => Ok(()),
            None => Err(HostError::path("unmount", target, err(EINVAL))),
        }
    }

    fn create_dir(&self, path: &Path) -> Result<(), HostError> {
        let op = "create directory";
        let mut w = self.enter(Call::CreateDir {
            path: path.to_path_buf(),
        })?;
        match w.tree.get(path) {
            Some(Node::Dir) => return Ok(()),
            Some(Node::File(_)) => return Err(HostError::path(op, path, err(EEXIST))),
            None => {}
        }
        if !w.parent_is_dir(path) {
            return Err(HostError::path(op, path, err(ENOENT)));
        }
        w.tree.insert(path.to_path_buf(), Node::Dir);
        if let Some((_, files)) = w.cgroup_mount(path) {
            let files: Vec<_> = files
                .iter()
                .map(|(n, c)| (path.join(n), Node::File(c.clone())))
                .collect();
            w.tree.extend(files);
        }
        Ok(())
    }

    fn write_file(&self, path: &Path, contents: &[u8]) -> Result<(), HostError> {
        let text = String::from_utf8_lossy(contents).into_owned();
        let mut w = self.enter(Call::WriteFile {
            path: path.to_path_buf(),
            contents: text.clone(),
        })?;
        match w.tree.get(path) {
            Some(Node::Dir) => Err(HostError::path("open for writing", path, err(21))),
            Some(Node::File(_)) if w.is_cgroup(path) => {
                w.cgroup_write(path, &text);
                Ok(())
            }
            // Only the interface files exist in a cgroup; nothing is created.
            None if w.is_cgroup(path) => {
                Err(HostError::path("open for writing", path, err(ENOENT)))
            }
            _ if !w.parent_is_dir(path) => {
                Err(HostError::path("open for writing", path, err(ENOENT)))
            }
            _ => {
                w.tree.insert(path.to_path_buf(), Node::File(text));
                Ok(())
            }
        }
    }

    fn read_file(&self, path: &Path) -> Result<String, HostError> {
        let w = self.enter(Call::ReadFile {
            path: path.to_path_buf(),
        })?;
        match w.tree.get(path) {
            Some(Node::File(t)) => Ok(t.clone()),
            Some(Node::Dir) => Err(HostError::path("read", path, err(21))),
            None => Err(HostError::path("read", path, err(ENOENT))),
        }
    }

    fn remove_dir(&self, path: &Path) -> Result<(), HostError> {
        let op = "remove directory";
        let mut w = self.enter(Call::RemoveDir {
            path: path.to_path_buf(),
        })?;
        match w.tree.get(path) {
            Some(Node::Dir) => {}
            Some(Node::File(_)) => return Err(HostError::path(op, path, err(20))),
            None => return Err(HostError::path(op, path, err(ENOENT))),
        }
        let cgroup = w.is_cgroup(path);
        let has_dirs = w.children(path).any(|(_, n)| matches!(n, Node::Dir));
        let has_files = w.children(path).next().is_some();
        if cgroup && (has_dirs || !w.procs_of(path).is_empty()) {
            return Err(HostError::path(op, path, err(EBUSY)));
        }
        if !cgroup && has_files {
            return Err(HostError::path(op, path, err(ENOTEMPTY)));
        }
        let inside: Vec<PathBuf> = w.children(path).map(|(p, _)| p.clone()).collect();
        for p in inside {
            w.tree.remove(&p);
        }
        w.tree.remove(path);
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>, HostError> {
        let w = self.enter(Call::ListDir {
            path: path.to_path_buf(),
        })?;
        if !matches!(w.tree.get(path), Some(Node::Dir)) {
            return Err(HostError::path("list", path, err(ENOENT)));
        }
        // BTreeMap order is component order, which for names in one
        // directory is byte order: already sorted.
        Ok(w.children(path)
            .filter_map(|(p, _)| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }

    fn open_write(&self, path: &Path) -> Result<OwnedFd, HostError> {
        let op = "open for writing";
        let w = self.enter(Call::OpenWrite {
            path: path.to_path_buf(),
        })?;
        if !matches!(w.tree.get(path), Some(Node::File(_))) {
            return Err(HostError::path(op, path, err(ENOENT)));
        }
        // Writes through this descriptor go nowhere: the fake records that
        // the file was opened, which is what a test can check.
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|e| HostError::path(op, path, e))
    }

    fn open_dir(&self, path: &Path) -> Result<OwnedFd, HostError> {
        let op = "open directory";
        let w = self.enter(Call::OpenDir {
            path: path.to_path_buf(),
        })?;
        if !matches!(w.tree.get(path), Some(Node::Dir)) {
            return Err(HostError::path(op, path, err(ENOENT)));
        }
        // A stand-in descriptor: the fake has no directories to open.
        std::fs::File::open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|e| HostError::path(op, path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_recorded_in_order_and_failures_injected() {
        let h = Recording::new();
        h.put_dir("/data");
        h.create_dir(Path::new("/data/a")).unwrap();
        h.write_file(Path::new("/data/a/f"), b"hello").unwrap();
        assert_eq!(h.read_file(Path::new("/data/a/f")).unwrap(), "hello");
        h.fail_path("/data/a/f", crate::EACCES);
        let e = h.write_file(Path::new("/data/a/f"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(crate::EACCES));
        assert_eq!(
            e.to_string(),
            "cannot write /data/a/f: Permission denied (os error 13)"
        );
        assert_eq!(h.file("/data/a/f").as_deref(), Some("hello"));
        h.clear_failures();
        assert_eq!(
            h.calls(),
            [
                Call::CreateDir {
                    path: "/data/a".into()
                },
                Call::WriteFile {
                    path: "/data/a/f".into(),
                    contents: "hello".into()
                },
                Call::ReadFile {
                    path: "/data/a/f".into()
                },
                Call::WriteFile {
                    path: "/data/a/f".into(),
                    contents: "x".into()
                },
            ]
        );
        // Linux semantics where tests look.
        let missing = h.create_dir(Path::new("/nope/x")).unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(ENOENT));
        let full = h.remove_dir(Path::new("/data/a")).unwrap_err();
        assert_eq!(full.raw_os_error(), Some(ENOTEMPTY));
        assert_eq!(h.list_dir(Path::new("/data/a")).unwrap(), ["f"]);
    }

    #[test]
    fn processes_end_on_kill_and_their_pidfds_become_readable() {
        let h = Recording::new();
        h.add_process(100, 100, 5555);
        h.add_process(101, 100, 5556);
        h.ignore_signal(101, Signal::TERM);
        let fd = h.pidfd_open(101).unwrap();
        let readable = |fd: &OwnedFd| {
            let mut p = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
            let ts = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            rustix::event::poll(&mut p, Some(&ts)).unwrap() == 1
        };
        assert_eq!(h.process_start_time(100), Some(5555));
        h.signal_group(100, Signal::TERM).unwrap();
        assert!(!h.is_running(100));
        assert!(h.is_running(101) && h.group_alive(100));
        assert!(!readable(&fd));
        h.signal_group(100, Signal::KILL).unwrap();
        assert!(!h.group_alive(100));
        assert!(readable(&fd));
        assert_eq!(h.process_start_time(101), None);
        let gone = h.signal(101, Signal::KILL).unwrap_err();
        assert_eq!(gone.raw_os_error(), Some(ESRCH));
        assert_eq!(
            h.signal_group(1, Signal::KILL).unwrap_err().raw_os_error(),
            Some(EINVAL)
        );
    }

    #[test]
    fn cgroup_directories_behave_like_cgroupfs() {
        let h = Recording::new();
        h.cgroupfs(
            "/cg",
            FsMagic::CGROUP2,
            &[("cgroup.procs", ""), ("cgroup.kill", "")],
        );
        h.add_process(7, 7, 1);
        h.create_dir(Path::new("/cg/a")).unwrap();
        h.create_dir(Path::new("/cg/b")).unwrap();
        assert_eq!(
            h.list_dir(Path::new("/cg/a")).unwrap(),
            ["cgroup.kill", "cgroup.procs"]
        );
        h.write_file(Path::new("/cg/a/cgroup.procs"), b"7").unwrap();
        h.write_file(Path::new("/cg/b/cgroup.procs"), b"7").unwrap();
        assert_eq!(h.file("/cg/a/cgroup.procs").as_deref(), Some(""));
        assert_eq!(h.file("/cg/b/cgroup.procs").as_deref(), Some("7\n"));
        let busy = h.remove_dir(Path::new("/cg/b")).unwrap_err();
        assert_eq!(busy.raw_os_error(), Some(EBUSY));
        assert!(h.write_file(Path::new("/cg/b/memory.max"), b"1").is_err());
        h.write_file(Path::new("/cg/b/cgroup.kill"), b"1").unwrap();
        assert!(!h.is_running(7));
        h.remove_dir(Path::new("/cg/b")).unwrap();
        assert!(!h.exists("/cg/b/cgroup.procs"));
        assert_eq!(h.fs_type(Path::new("/cg/a")).unwrap(), FsMagic::CGROUP2);
        assert_eq!(h.fs_type(Path::new("/")).unwrap(), FsMagic::EXT4);
    }

    #[test]
    fn overlay_mounts_need_their_directories() {
        let h = Recording::new();
        let m = OverlayMount {
            lower: vec!["/img".into()],
            upper: "/w/upper".into(),
            work: "/w/work".into(),
            target: "/w/rootfs".into(),
        };
        assert_eq!(
            h.mount_overlay(&m).unwrap_err().raw_os_error(),
            Some(ENOENT)
        );
        for d in ["/img", "/w/upper", "/w/work", "/w/rootfs"] {
            h.put_dir(d);
        }
        h.mount_overlay(&m).unwrap();
        assert_eq!(h.mount_at("/w/rootfs"), Some(m));
        h.unmount_detach(Path::new("/w/rootfs")).unwrap();
        let again = h.unmount_detach(Path::new("/w/rootfs")).unwrap_err();
        assert_eq!(again.raw_os_error(), Some(EINVAL));
    }
}
