//! One reaper for every child of the minion.
//!
//! The minion is a child subreaper (`PR_SET_CHILD_SUBREAPER`): a container
//! that `crun create` started, and any process a service left behind,
//! becomes the minion's child when its parent exits. So the minion reaps like
//! an init: on every SIGCHLD it collects all exited children with
//! `waitid(P_ALL)` and hands each status to whoever waits for that pid.
//! A status that arrives before anyone asked (the child was quicker than the
//! registration) is kept until asked for. Nothing here polls: the loop runs
//! on SIGCHLD only.
//!
//! Consequently nothing else in the minion may wait for children itself
//! (no `tokio::process`, no `std::process::Child::wait`): spawn with
//! `std::process::Command`, then [`exit_of`] the pid.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use phoenix_model::status::{Exit, now_ms};
use tokio::sync::oneshot;

#[derive(Default)]
struct Table {
    waiting: HashMap<u32, oneshot::Sender<Exit>>,
    /// Exits nobody has asked for yet (bounded: orphans' exits end up here
    /// until they are pushed out).
    early: HashMap<u32, Exit>,
}

fn table() -> &'static Mutex<Table> {
    static T: OnceLock<Mutex<Table>> = OnceLock::new();
    T.get_or_init(Mutex::default)
}

fn lock() -> std::sync::MutexGuard<'static, Table> {
    table().lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes this process a subreaper and starts reaping. Call once, inside
/// the runtime, before spawning anything.
pub fn start() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments; no memory is passed.
    let ret = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            reap_all();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(())
}

/// Collects every exited child now.
fn reap_all() {
    loop {
        // SAFETY: siginfo_t is plain data; zeroed is a valid value for
        // waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid fills the siginfo_t we own.
        let ret = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG) };
        if ret != 0 {
            return; // ECHILD: no children at all
        }
        // SAFETY: waitid succeeded, so si_pid and si_status are set (si_pid
        // 0 means no child had exited).
        let (pid, status, code) = unsafe { (info.si_pid(), info.si_status(), info.si_code) };
        if pid <= 0 {
            return;
        }
        let exit = Exit {
            code: (code == libc::CLD_EXITED).then_some(status),
            signal: (code == libc::CLD_KILLED || code == libc::CLD_DUMPED).then_some(status),
            at: now_ms(),
        };
        deliver(pid as u32, exit);
    }
}

fn deliver(pid: u32, exit: Exit) {
    let mut t = lock();
    match t.waiting.remove(&pid) {
        Some(tx) => {
            // The waiter may have given up (a cancelled wait, as in a
            // `select!`): keep the exit for its next ask, or it is lost.
            if let Err(exit) = tx.send(exit) {
                t.early.insert(pid, exit);
            }
        }
        None => {
            if t.early.len() >= 4096 {
                t.early.clear();
            }
            t.early.insert(pid, exit);
        }
    }
}

/// The exit of child `pid`, once it happens.
pub async fn exit_of(pid: u32) -> Exit {
    let rx = {
        let mut t = lock();
        if let Some(exit) = t.early.remove(&pid) {
            return exit;
        }
        let (tx, rx) = oneshot::channel();
        t.waiting.insert(pid, tx);
        rx
    };
    rx.await.unwrap_or(Exit {
        code: None,
        signal: None,
        at: now_ms(),
    })
}

/// Runs a short command (crun, cp, ...) to completion: its exit and what it
/// wrote to stderr.
pub async fn run(cmd: &mut std::process::Command) -> std::io::Result<(Exit, String)> {
    run_with_input(cmd, None).await
}

/// [`run`], with `input` as the command's stdin (read from an anonymous
/// file, so no writer has to keep up with it).
pub async fn run_with_input(
    cmd: &mut std::process::Command,
    input: Option<&[u8]>,
) -> std::io::Result<(Exit, String)> {
    let stdin = match input {
        Some(bytes) => {
            use std::io::{Seek, Write};
            let mut f = tempfile_in_memory()?;
            f.write_all(bytes)?;
            f.rewind()?;
            std::process::Stdio::from(f)
        }
        None => std::process::Stdio::null(),
    };
    let err = tempfile_in_memory()?;
    let child = cmd.stdin(stdin).stderr(err.try_clone()?).spawn()?;
    let exit = exit_of(child.id()).await;
    let mut text = String::new();
    use std::io::{Read, Seek};
    let mut err = err;
    err.rewind()?;
    err.take(64 << 10).read_to_string(&mut text)?;
    Ok((exit, text))
}

/// An anonymous file (memfd) to collect a command's stderr.
fn tempfile_in_memory() -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a static C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"phoenix-stderr".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[tokio::test]
    async fn an_exit_that_comes_after_a_cancelled_wait_is_kept() {
        // Not a real pid: no child of the test process can have it.
        let pid = u32::MAX - 7;
        let mut wait = Box::pin(exit_of(pid));
        // Registered, then given up, as a `select!` does with its losers.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        drop(wait);
        let exit = Exit {
            code: Some(3),
            signal: None,
            at: 1,
        };
        deliver(pid, exit);
        let asked_again = tokio::time::timeout(std::time::Duration::from_secs(5), exit_of(pid));
        assert_eq!(asked_again.await.expect("the exit was lost"), exit);
    }
}
