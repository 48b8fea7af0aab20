//! The real host: each [`Host`] operation is one or two system calls
//! through rustix (no `unsafe` here) or `std::fs`.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::mount::{MountFlags, UnmountFlags};
use rustix::process::{PidfdFlags, Signal as RawSignal};

use crate::{DiskSpace, FsMagic, Host, HostError, OverlayMount, Signal, checked_pid};

/// The running Linux kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct Linux;

fn raw(signal: Signal) -> RawSignal {
    // Every `Signal` was made from a named number (`Signal::from_raw` or a
    // constant checked in the tests), so this cannot fail.
    RawSignal::from_named_raw(signal.as_raw()).unwrap_or(RawSignal::KILL)
}

fn path_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> HostError + 'a {
    move |e| HostError::path(op, path, e)
}

impl Host for Linux {
    fn signal(&self, pid: u32, signal: Signal) -> Result<(), HostError> {
        let target = checked_pid("signal", pid)?;
        rustix::process::kill_process(target, raw(signal))
            .map_err(|e| HostError::process("signal", pid, e.into()))
    }

    fn signal_group(&self, pgid: u32, signal: Signal) -> Result<(), HostError> {
        let target = checked_pid("signal the group of", pgid)?;
        rustix::process::kill_process_group(target, raw(signal))
            .map_err(|e| HostError::process("signal the group of", pgid, e.into()))
    }

    fn group_alive(&self, pgid: u32) -> bool {
        checked_pid("probe the group of", pgid)
            .is_ok_and(|p| rustix::process::test_kill_process_group(p).is_ok())
    }

    fn pidfd_open(&self, pid: u32) -> Result<OwnedFd, HostError> {
        let target = checked_pid("open a pidfd for", pid)?;
        rustix::process::pidfd_open(target, PidfdFlags::empty())
            .map_err(|e| HostError::process("open a pidfd for", pid, e.into()))
    }

    fn process_start_time(&self, pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_start_time(&stat)
    }

    fn disk_space(&self, path: &Path) -> Result<DiskSpace, HostError> {
        let st =
            rustix::fs::statvfs(path).map_err(|e| HostError::path("statvfs", path, e.into()))?;
        Ok(DiskSpace {
            total: st.f_blocks.saturating_mul(st.f_frsize),
            free: st.f_bavail.saturating_mul(st.f_frsize),
        })
    }

    fn fs_type(&self, path: &Path) -> Result<FsMagic, HostError> {
        let st = rustix::fs::statfs(path).map_err(|e| HostError::path("statfs", path, e.into()))?;
        // f_type is a signed word on some targets; magics are small
        // positive numbers, so the bits are the value.
        #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
        Ok(FsMagic(st.f_type as u64))
    }

    fn mount_overlay(&self, mount: &OverlayMount) -> Result<(), HostError> {
        let op = "mount an overlayfs on";
        let data = mount.options()?;
        let data = CString::new(data).map_err(|_| {
            HostError::path(op, &mount.target, std::io::ErrorKind::InvalidInput.into())
        })?;
        rustix::mount::mount(
            "overlay",
            &mount.target,
            "overlay",
            MountFlags::empty(),
            Some(data.as_c_str()),
        )
        .map_err(|e| HostError::path(op, &mount.target, e.into()))
    }

    fn unmount_detach(&self, target: &Path) -> Result<(), HostError> {
        rustix::mount::unmount(target, UnmountFlags::DETACH)
            .map_err(|e| HostError::path("unmount", target, e.into()))
    }

    fn create_dir(&self, path: &Path) -> Result<(), HostError> {
        match std::fs::create_dir(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
            Err(e) => Err(HostError::path("create directory", path, e)),
        }
    }

    fn write_file(&self, path: &Path, contents: &[u8]) -> Result<(), HostError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(path_err("open for writing", path))?;
        f.write_all(contents).map_err(path_err("write", path))
    }

    fn read_file(&self, path: &Path) -> Result<String, HostError> {
        std::fs::read_to_string(path).map_err(path_err("read", path))
    }

    fn remove_dir(&self, path: &Path) -> Result<(), HostError> {
        std::fs::remove_dir(path).map_err(path_err("remove directory", path))
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>, HostError> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path).map_err(path_err("list", path))? {
            let entry = entry.map_err(path_err("list", path))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn open_write(&self, path: &Path) -> Result<OwnedFd, HostError> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map(OwnedFd::from)
            .map_err(path_err("open for writing", path))
    }

    fn open_dir(&self, path: &Path) -> Result<OwnedFd, HostError> {
        use rustix::fs::{Mode, OFlags};
        rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| HostError::path("open directory", path, e.into()))
    }
}

/// The start time (field 22) from the text of `/proc/PID/stat`; None for a
/// zombie or dead process, or text that is not a stat line.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and ')'; fields after the
    // last ')' are plain. Field 3 (the state) is the first after it, so
    // field 22 is the 20th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EINVAL, ENOENT, ESRCH};

    #[test]
    fn start_time_survives_odd_command_names() {
        let line = "4242 (we ird) name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_start_time(line), Some(987_654));
        let zombie = line.replace(") S ", ") Z ");
        assert_eq!(parse_start_time(&zombie), None);
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_start_time("1 (x) S 1 2"), None);
    }

    #[test]
    fn our_own_start_time_is_read_and_stable() {
        let me = std::process::id();
        let first = Linux.process_start_time(me).expect("our own stat");
        assert_eq!(Linux.process_start_time(me), Some(first));
        // No pid above the kernel's maximum exists.
        assert_eq!(Linux.process_start_time(u32::MAX), None);
    }

    #[test]
    fn signals_to_gone_processes_say_so() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let e = Linux.signal(pid, Signal::TERM).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(ESRCH), "{e}");
        assert!(!Linux.group_alive(pid));
        assert_eq!(
            Linux
                .signal_group(1, Signal::KILL)
                .unwrap_err()
                .raw_os_error(),
            Some(EINVAL)
        );
        assert!(!Linux.group_alive(0));
    }

    #[test]
    fn a_pidfd_becomes_readable_when_the_process_ends() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = Linux.pidfd_open(child.id()).unwrap();
        let readable = |fd: &OwnedFd| {
            let mut p = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
            let ts = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            rustix::event::poll(&mut p, Some(&ts)).unwrap() == 1
        };
        assert!(!readable(&fd));
        Linux.signal(child.id(), Signal::KILL).unwrap();
        child.wait().unwrap();
        assert!(readable(&fd));
    }

    #[test]
    fn files_and_directories_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a");
        Linux.create_dir(&sub).unwrap();
        Linux.create_dir(&sub).unwrap(); // already there: fine
        Linux.write_file(&sub.join("f"), b"one").unwrap();
        Linux.write_file(&sub.join("f"), b"2").unwrap();
        assert_eq!(Linux.read_file(&sub.join("f")).unwrap(), "2");
        Linux.write_file(&sub.join("e"), b"").unwrap();
        assert_eq!(Linux.list_dir(&sub).unwrap(), ["e", "f"]);
        let e = Linux.remove_dir(&sub).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot remove directory {}", sub.display()))
        );
        let e = Linux.read_file(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(ENOENT));
        // A file where a directory is asked for is an error, not "exists".
        assert!(Linux.create_dir(&sub.join("f")).is_err());
        assert!(Linux.open_write(&dir.path().join("missing")).is_err());
        std::fs::remove_file(sub.join("e")).unwrap();
        std::fs::remove_file(sub.join("f")).unwrap();
        Linux.remove_dir(&sub).unwrap();
    }

    #[test]
    fn disk_space_and_fs_type_of_proc() {
        let d = Linux.disk_space(Path::new("/")).unwrap();
        assert!(d.total > 0 && d.free <= d.total, "{d:?}");
        assert_eq!(Linux.fs_type(Path::new("/proc")).unwrap(), FsMagic(0x9fa0));
        let e = Linux.fs_type(Path::new("/no/such/dir")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(ENOENT));
        assert!(e.to_string().contains("statfs /no/such/dir"), "{e}");
    }
}
