//! Processes: start one in its own process group, wait for it, end it.
//! With [`crate::reaper`], this is where the drivers' signals, pidfds and
//! process start times meet the host.
//!
//! Every binary service runs as the leader of a new process group, so that
//! stopping it (and cleaning up after it exits) reaches every process it
//! started. A container's init is signalled alone: ending it ends its whole
//! PID namespace. Children are waited on through the [`crate::reaper`]; a
//! process adopted after a minion restart is no longer our child, so its end
//! is noticed through a pidfd and its exit status is unknown.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use phoenix_model::status::{Exit, now_ms};
use tokio::io::unix::AsyncFd;

use crate::driver::{BoxFuture, RunningTask};
use crate::reaper;

/// What to run.
pub struct Launch<'a> {
    pub program: &'a std::path::Path,
    pub args: &'a [String],
    pub env: Vec<(String, String)>,
    pub cwd: &'a std::path::Path,
    /// Where stdout and stderr go (opened for append).
    pub log: std::fs::File,
}

/// How a process is signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The process group it leads (binaries).
    Group,
    /// The process alone (a container's init).
    Single,
}

enum Waiter {
    /// Our child: the reaper has its exit status.
    Child,
    /// Not our child (adopted): a pidfd says when it ends.
    Pidfd(AsyncFd<OwnedFd>),
}

/// A running service process.
pub struct Proc {
    pid: u32,
    target: Target,
    waiter: Waiter,
}

impl Proc {
    pub fn spawn(l: Launch<'_>) -> io::Result<Proc> {
        let err_log = l.log.try_clone()?;
        let child = std::process::Command::new(l.program)
            .args(l.args)
            .env_clear()
            .envs(l.env)
            .current_dir(l.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(l.log))
            .stderr(Stdio::from(err_log))
            .process_group(0)
            .spawn()?;
        Ok(Proc::child(child.id(), Target::Group))
    }

    /// A child of ours (also one reparented to us) to wait for.
    pub fn child(pid: u32, target: Target) -> Proc {
        Proc {
            pid,
            target,
            waiter: Waiter::Child,
        }
    }

    /// Takes over a process started by an earlier run of the minion, if it is
    /// still the same process (same pid and start time).
    pub fn adopt(pid: u32, start_time: u64, target: Target) -> Option<Proc> {
        if process_start_time(pid)? != start_time {
            return None;
        }
        let fd = pidfd_open(pid).ok()?;
        // SAFETY: `fd` is an OwnedFd we just opened; the AsyncFd owns it for
        // its whole life and nothing else closes or replaces it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()?;
        Some(Proc {
            pid,
            target,
            waiter: Waiter::Pidfd(fd),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    /// Waits for the process to end (cancel-safe).
    pub async fn wait(&mut self) -> Exit {
        match &self.waiter {
            Waiter::Child => reaper::exit_of(self.pid).await,
            Waiter::Pidfd(fd) => {
                // A pidfd becomes readable when the process ends.
                let _ = fd.readable().await;
                unknown_exit()
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        match self.target {
            Target::Group => kill_group(self.pid, sig),
            Target::Single => kill_one(self.pid, sig),
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after `timeout`.
    pub async fn stop(&mut self, timeout: Duration) -> Exit {
        crate::driver::stop_with_escalation(self, timeout).await
    }
}

impl RunningTask for Proc {
    fn wait(&mut self) -> BoxFuture<'_, Exit> {
        Box::pin(Proc::wait(self))
    }

    fn signal(&self, signal: i32) {
        Proc::signal(self, signal);
    }
}

fn unknown_exit() -> Exit {
    Exit {
        code: None,
        signal: None,
        at: now_ms(),
    }
}

/// Sends `sig` to one process.
pub fn kill_one(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, sig);
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
        let _ = crate::reaper::start();
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
        let mut adopted = Proc::adopt(pid, start, Target::Group).unwrap();
        assert!(Proc::adopt(pid, start + 1, Target::Group).is_none());
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
