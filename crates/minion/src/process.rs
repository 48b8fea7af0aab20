//! Processes: start one in its own process group, wait for it, end it.
//! Signals, pidfds and process start times go through the minion's
//! [`Host`]; waiting for our own children goes through [`crate::reaper`].
//!
//! Every binary service runs as the leader of a new process group, so that
//! stopping it (and cleaning up after it exits) reaches every process it
//! started. A container's init is signalled alone: ending it ends its whole
//! PID namespace. Children are waited on through the [`crate::reaper`]; a
//! process adopted after a minion restart is no longer our child, so its end
//! is noticed through a pidfd and its exit status is unknown.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use phoenix_host::cgroup::CgroupJoin;
use phoenix_host::spawn::Spawn;
use phoenix_host::{Host, Signal};
use phoenix_model::status::{Exit, now_ms};
use tokio::io::unix::AsyncFd;

use crate::driver::{BoxFuture, RunningTask};
use crate::reaper;

/// What to run.
pub struct Launch<'a> {
    /// The file to execute.
    pub program: &'a std::path::Path,
    /// What the program sees as its name (`argv[0]`); the program's path
    /// when `None`.
    pub arg0: Option<&'a OsStr>,
    pub args: &'a [String],
    pub env: Vec<(String, String)>,
    pub cwd: &'a std::path::Path,
    /// Where stdout and stderr go (opened for append).
    pub log: std::fs::File,
    /// The service's cgroups: the program is born in them (see
    /// [`phoenix_host::spawn`]), so it and everything it forks are in them
    /// from the start.
    pub cgroup: Option<&'a CgroupJoin>,
    /// A network namespace to start the program in.
    pub netns: Option<BorrowedFd<'a>>,
    /// A file the program sees as `/etc/hosts`.
    pub hosts_file: Option<&'a std::path::Path>,
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
    host: Arc<dyn Host>,
    pid: u32,
    target: Target,
    waiter: Waiter,
}

impl Proc {
    /// Starts `l` as the leader of a new process group, stdin from
    /// `/dev/null`, stdout and stderr to its log, inside its cgroups and
    /// namespaces from its first instruction. The error names the step
    /// that failed (e.g. the program is missing).
    pub fn spawn(host: Arc<dyn Host>, l: Launch<'_>) -> io::Result<Proc> {
        let mut s = Spawn::new(l.program, l.log.as_fd());
        if let Some(arg0) = l.arg0 {
            s.arg0(arg0);
        }
        s.args(l.args).envs(l.env).cwd(l.cwd);
        if let Some(join) = l.cgroup {
            s.cgroups(join);
        }
        if let Some(ns) = l.netns {
            s.netns(ns);
        }
        if let Some(hosts) = l.hosts_file {
            s.hosts_file(hosts);
        }
        let child = s.spawn()?;
        Ok(Proc::child(host, child.pid, Target::Group))
    }

    /// A child of ours (also one reparented to us) to wait for.
    pub fn child(host: Arc<dyn Host>, pid: u32, target: Target) -> Proc {
        Proc {
            host,
            pid,
            target,
            waiter: Waiter::Child,
        }
    }

    /// Takes over a process started by an earlier run of the minion, if it is
    /// still the same process (same pid and start time).
    pub fn adopt(host: Arc<dyn Host>, pid: u32, start_time: u64, target: Target) -> Option<Proc> {
        if host.process_start_time(pid)? != start_time {
            return None;
        }
        let fd = host.pidfd_open(pid).ok()?;
        // SAFETY: `fd` is an OwnedFd we just opened; the AsyncFd owns it for
        // its whole life and nothing else closes or replaces it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()?;
        Some(Proc {
            host,
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

    /// Sends signal number `sig` to the process (or its group). Errors (it
    /// is already gone) are of no interest: its end is seen by `wait`.
    pub fn signal(&self, sig: i32) {
        let Some(sig) = Signal::from_raw(sig) else {
            tracing::warn!(pid = self.pid, "not a signal: {sig}");
            return;
        };
        let _ = match self.target {
            Target::Group => self.host.signal_group(self.pid, sig),
            Target::Single => self.host.signal(self.pid, sig),
        };
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

    #[tokio::test]
    async fn spawn_wait_and_group_stop() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let args: Vec<String> = vec!["-c".into(), "sleep 30 & sleep 30; echo never".into()];
        let _ = crate::reaper::start();
        let host: Arc<dyn Host> = Arc::new(phoenix_host::Linux);
        let mut p = Proc::spawn(
            host.clone(),
            Launch {
                program: std::path::Path::new("/bin/sh"),
                arg0: None,
                args: &args,
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                cwd: dir.path(),
                log,
                cgroup: None,
                netns: None,
                hosts_file: None,
            },
        )
        .unwrap();
        let pid = p.pid().unwrap();
        assert!(host.group_alive(pid));
        let start = host.process_start_time(pid).unwrap();
        // The adopted view of the same process sees it end too.
        let mut adopted = Proc::adopt(host.clone(), pid, start, Target::Group).unwrap();
        assert!(Proc::adopt(host.clone(), pid, start + 1, Target::Group).is_none());
        let exit = p.stop(Duration::from_secs(5)).await;
        assert_eq!(exit.signal, Some(libc::SIGTERM));
        tokio::time::timeout(Duration::from_secs(5), adopted.wait())
            .await
            .unwrap();
        // The background sleep of the group is gone too.
        for _ in 0..50 {
            if !host.group_alive(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("process group {pid} survived stop");
    }
}
