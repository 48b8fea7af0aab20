//! Processes: start one in its own process group, wait for it, end the group.
//!
//! Every service runs as the leader of a new process group, so that stopping
//! it (and cleaning up after it exits) reaches every process it started. A
//! process the minion started itself is waited on through tokio (a pidfd
//! underneath). A process adopted after a minion restart is not our child, so
//! its end is noticed through a pidfd of our own and its exit status is unknown.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use phoenix_model::status::{Exit, now_ms};
use tokio::io::unix::AsyncFd;

/// What to run.
pub struct Launch<'a> {
    pub program: &'a std::path::Path,
    pub args: &'a [String],
    pub env: Vec<(String, String)>,
    pub cwd: &'a std::path::Path,
    /// Where stdout and stderr go (opened for append).
    pub log: std::fs::File,
}

/// A running service process.
pub enum Proc {
    Child(tokio::process::Child),
    Adopted { pid: u32, fd: AsyncFd<OwnedFd> },
}

impl Proc {
    pub fn spawn(l: Launch<'_>) -> io::Result<Proc> {
        let err_log = l.log.try_clone()?;
        let mut cmd = tokio::process::Command::new(l.program);
        cmd.args(l.args)
            .env_clear()
            .envs(l.env)
            .current_dir(l.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(l.log))
            .stderr(Stdio::from(err_log))
            .process_group(0)
            .kill_on_drop(false);
        Ok(Proc::Child(cmd.spawn()?))
    }

    /// Takes over a process started by an earlier run of the minion, if it is
    /// still the same process (same pid and start time).
    pub fn adopt(pid: u32, start_time: u64) -> Option<Proc> {
        if process_start_time(pid)? != start_time {
            return None;
        }
        let fd = pidfd_open(pid).ok()?;
        // SAFETY: `fd` is an OwnedFd we just opened; the AsyncFd owns it for
        // its whole life and nothing else closes or replaces it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()?;
        Some(Proc::Adopted { pid, fd })
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted { pid, .. } => Some(*pid),
        }
    }

    /// Waits for the process to end.
    pub async fn wait(&mut self) -> Exit {
        match self {
            Proc::Child(c) => match c.wait().await {
                Ok(status) => exit_of(status),
                Err(_) => unknown_exit(),
            },
            Proc::Adopted { fd, .. } => {
                // A pidfd becomes readable when the process ends.
                let _ = fd.readable().await;
                unknown_exit()
            }
        }
    }

    /// Stops the process group: SIGTERM, then SIGKILL after `timeout`.
    pub async fn stop(&mut self, timeout: Duration) -> Exit {
        let Some(pid) = self.pid() else {
            return self.wait().await;
        };
        kill_group(pid, libc::SIGTERM);
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(exit) => {
                kill_group(pid, libc::SIGKILL);
                exit
            }
            Err(_) => {
                kill_group(pid, libc::SIGKILL);
                self.wait().await
            }
        }
    }
}

fn unknown_exit() -> Exit {
    Exit {
        code: None,
        signal: None,
        at: now_ms(),
    }
}

fn exit_of(status: ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    Exit {
        code: status.code(),
        signal: status.signal(),
        at: now_ms(),
    }
}

/// Sends `sig` to every process of the group led by `pgid`. Errors (the
/// group is already gone) are of no interest.
pub fn kill_group(pgid: u32, sig: i32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; it takes
    // plain integers and touches no memory of ours.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Whether any process of the group led by `pgid` is alive.
pub fn group_alive(pgid: u32) -> bool {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new file
    // descriptor or -1; it reads no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The start time of a process in clock ticks since boot (`/proc/PID/stat`
/// field 22); with the pid it names one process, even across pid reuse.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and ')'; fields after the
    // last ')' are plain. Field 3 is the first after it; 22 is the 20th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let state = rest.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Raises the open-file limit to its hard maximum: every service holds a
/// pidfd in the minion.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// This process's resident set size in bytes.
pub fn self_rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf takes an integer name and returns an integer.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self() {
        let me = std::process::id();
        let t = process_start_time(me).unwrap();
        assert_eq!(process_start_time(me), Some(t));
        assert_eq!(process_start_time(u32::MAX), None);
    }

    #[tokio::test]
    async fn spawn_wait_and_group_stop() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let args: Vec<String> = vec!["-c".into(), "sleep 30 & sleep 30; echo never".into()];
        let mut p = Proc::spawn(Launch {
            program: std::path::Path::new("/bin/sh"),
            args: &args,
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: dir.path(),
            log,
        })
        .unwrap();
        let pid = p.pid().unwrap();
        assert!(group_alive(pid));
        let start = process_start_time(pid).unwrap();
        // The adopted view of the same process sees it end too.
        let mut adopted = Proc::adopt(pid, start).unwrap();
        assert!(Proc::adopt(pid, start + 1).is_none());
        let exit = p.stop(Duration::from_secs(5)).await;
        assert_eq!(exit.signal, Some(libc::SIGTERM));
        tokio::time::timeout(Duration::from_secs(5), adopted.wait())
            .await
            .unwrap();
        // The background sleep of the group is gone too.
        for _ in 0..50 {
            if !group_alive(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("process group {pid} survived stop");
    }
}
