//! Helpers: commands with a time limit, daemons, /proc, UDP announcements,
//! percentiles, and the emergency clean-up shared by every phase.

use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::net::UdpSocket;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

/// When the bench started, for progress lines.
pub static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// A progress line on stderr, stamped with the seconds since the start.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("[{:6.1}s] {}", $crate::util::START.elapsed().as_secs_f64(), format!($($arg)*))
    };
}

/// Wall-clock time in nanoseconds since the Unix epoch (what testy puts in
/// its `started` datagram).
pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// The result of a finished command.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From just before the spawn to just after the wait.
    pub elapsed: Duration,
}

impl Out {
    pub fn ms(&self) -> f64 {
        ms(self.elapsed)
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs a command to its end, killing it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Out> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let r = child.wait_with_output();
        let _ = tx.send((r, Instant::now()));
    });
    match rx.recv_timeout(timeout) {
        Ok((r, end)) => {
            let o = r.with_context(|| format!("waiting for {what}"))?;
            Ok(Out {
                status: o.status,
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
                elapsed: end - start,
            })
        }
        Err(_) => {
            // The waiting thread has not reaped the child yet, so the pid is
            // still ours.
            kill(pid, libc::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("{what} took longer than {} s; killed it", timeout.as_secs())
        }
    }
}

/// Like [`run`], and fails unless the command succeeded.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Out> {
    let what = format!("{cmd:?}");
    let out = run(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            out.stderr.trim(),
            out.stdout.trim()
        );
    }
    Ok(out)
}

pub fn kill(pid: u32, sig: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 1 {
        return false;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid, sig) == 0 }
}

// ------------------------------------------------------------ clean-up

/// What an emergency (Ctrl-C, the watchdog) has to tear down.
struct Registry {
    /// Temp dirs: every process started under one is ours.
    roots: Vec<PathBuf>,
    /// Daemons started and not yet reaped.
    daemons: Vec<u32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    roots: Vec::new(),
    daemons: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn register_root(root: &Path) {
    registry().roots.push(root.to_owned());
}

/// Kills every daemon still running and every process found under a
/// registered temp dir, and removes the dirs. For an abnormal end.
pub fn emergency_cleanup() {
    let (roots, daemons) = {
        let r = registry();
        (r.roots.clone(), r.daemons.clone())
    };
    for pid in daemons {
        kill(pid, libc::SIGKILL);
    }
    for root in &roots {
        let n = sweep(root, &[]);
        if n > 0 {
            eprintln!(
                "cleanup: killed {n} leftover processes under {}",
                root.display()
            );
        }
        let _ = fs::remove_dir_all(root);
    }
}

/// Pids of processes that belong to `root`: their working directory or
/// executable is under it, or their command line names it.
pub fn procs_under(root: &Path, except: &[u32]) -> Vec<u32> {
    let me = std::process::id();
    let root_bytes = root.as_os_str().as_bytes();
    let mut found = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || except.contains(&pid) {
            continue;
        }
        let base = e.path();
        let under = |link: &str| fs::read_link(base.join(link)).is_ok_and(|p| p.starts_with(root));
        let in_cmdline = || {
            fs::read(base.join("cmdline"))
                .is_ok_and(|c| c.windows(root_bytes.len()).any(|w| w == root_bytes))
        };
        if under("cwd") || under("exe") || in_cmdline() {
            // Zombies are already dead; their parent reaps them.
            if proc_state(pid).is_some_and(|s| s != 'Z') {
                found.push(pid);
            }
        }
    }
    found
}

/// SIGKILLs every process under `root` (but `except`); returns how many.
pub fn sweep(root: &Path, except: &[u32]) -> usize {
    let mut total = 0;
    for _ in 0..5 {
        let pids = procs_under(root, except);
        if pids.is_empty() {
            break;
        }
        for &p in &pids {
            if kill(p, libc::SIGKILL) {
                total += 1;
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    total
}

/// Waits until no process (but `except`) is left under `root`; how long it took.
pub fn wait_none_under(root: &Path, except: &[u32], timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let left = procs_under(root, except).len();
        if left == 0 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!(
                "{left} processes still run under {} after {} s",
                root.display(),
                timeout.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Fields after the command name in /proc/PID/stat.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn proc_state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// Live (not zombie) children of `ppid`.
pub fn children_of(ppid: u32) -> usize {
    let Ok(rd) = fs::read_dir("/proc") else {
        return 0;
    };
    let want = ppid.to_string();
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| stat_fields(pid).is_some_and(|f| f.len() > 1 && f[0] != "Z" && f[1] == want))
        .count()
}

/// (VmRSS, VmHWM) of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => bail!("no VmRSS/VmHWM for process {pid}"),
    }
}

// ------------------------------------------------------------ daemons

/// A long-running process we started; stopped (and reaped) by [`Daemon::stop`].
pub struct Daemon {
    pub name: String,
    child: Child,
    stopped: bool,
}

impl Daemon {
    /// Starts `exe args` in its own process group (so that a Ctrl-C on the
    /// terminal reaches only the bench, which cleans up in order), output to `log`.
    pub fn spawn(
        name: &str,
        exe: &OsStr,
        args: &[&OsStr],
        envs: &[(&str, &OsStr)],
        log: &Path,
    ) -> Result<Self> {
        let out =
            fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        registry().daemons.push(child.id());
        Ok(Daemon {
            name: name.to_owned(),
            child,
            stopped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if !self.alive() {
                self.forget();
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGTERM, then SIGKILL after `timeout`; reaps it. Whether it went on SIGTERM.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        if self.stopped {
            return true;
        }
        if !self.alive() {
            self.forget();
            return true;
        }
        kill(self.pid(), libc::SIGTERM);
        if self.wait_exit(timeout) {
            return true;
        }
        crate::say!(
            "{} ignored SIGTERM for {} s; killing it",
            self.name,
            timeout.as_secs()
        );
        kill(self.pid(), libc::SIGKILL);
        let _ = self.child.wait();
        self.forget();
        false
    }

    fn forget(&mut self) {
        self.stopped = true;
        let pid = self.pid();
        registry().daemons.retain(|&p| p != pid);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.stopped {
            kill(self.pid(), libc::SIGKILL);
            let _ = self.child.wait();
            self.forget();
        }
    }
}

/// Polls `f` every `every` until it returns `Some`, for at most `timeout`.
pub fn until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        thread::sleep(every);
    }
}

// ------------------------------------------------------------ announcements

/// A UDP socket that receives testy's `started <pid> <unix_nanos>` datagrams.
pub struct Announce {
    sock: UdpSocket,
}

/// One `started` datagram.
#[derive(Clone, Copy, Debug)]
pub struct Started {
    pub pid: u32,
    pub at_ns: i128,
}

impl Announce {
    pub fn new() -> Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0").context("cannot bind a UDP socket")?;
        Ok(Announce { sock })
    }

    pub fn addr(&self) -> String {
        self.sock
            .local_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string())
    }

    /// Drops datagrams already queued.
    pub fn drain(&self) {
        let mut buf = [0u8; 256];
        if self.sock.set_nonblocking(true).is_ok() {
            while self.sock.recv(&mut buf).is_ok() {}
            let _ = self.sock.set_nonblocking(false);
        }
    }

    /// The next datagram, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Started> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 256];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no `started` datagram on {} within {} ms",
                    self.addr(),
                    timeout.as_millis()
                );
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let mut f = text.split_whitespace();
                    if let (Some("started"), Some(pid), Some(at)) = (f.next(), f.next(), f.next())
                        && let (Ok(pid), Ok(at_ns)) = (pid.parse(), at.parse())
                    {
                        return Ok(Started { pid, at_ns });
                    }
                    eprintln!("ignoring a stray datagram on {}: {text:?}", self.addr());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

// ------------------------------------------------------------ ports

/// `n` TCP ports that are free on both [::] and 0.0.0.0, from `from` up
/// (below the usual ephemeral range, so that nothing else grabs them).
pub fn free_ports(from: u16, n: usize) -> Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(n);
    let mut p = from;
    while ports.len() < n {
        let ok = std::net::TcpListener::bind(("::", p)).is_ok()
            && std::net::TcpListener::bind(("0.0.0.0", p)).is_ok();
        if ok {
            ports.push(p);
        }
        p = p.checked_add(1).context("ran out of ports")?;
    }
    Ok(ports)
}

// ------------------------------------------------------------ statistics

/// A summary of samples in milliseconds.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentiles (p50 is the lower median for an even count).
pub fn summarize(samples: &[f64]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let r = (p * s.len() as f64).ceil() as usize;
        s[r.clamp(1, s.len()) - 1]
    };
    Summary {
        n: s.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        min: s[0],
        max: s[s.len() - 1],
        mean: s.iter().sum::<f64>() / s.len() as f64,
    }
}

/// Writes a file, creating its directory.
pub fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s: Vec<f64> = (1..=200).map(f64::from).collect();
        let m = summarize(&s);
        assert_eq!(
            (m.n, m.p50, m.p99, m.min, m.max),
            (200, 100.0, 198.0, 1.0, 200.0)
        );
        let one = summarize(&[7.0]);
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
    }

    #[test]
    fn children_and_rss_of_self() {
        let mut c = Command::new("sleep").arg("5").spawn().unwrap();
        assert!(children_of(std::process::id()) >= 1);
        let (rss, hwm) = rss_kib(std::process::id()).unwrap();
        assert!(rss > 0 && hwm >= rss);
        let _ = c.kill();
        let _ = c.wait();
    }
}
