//! `phoenix demo` ends cleanly however it is stopped: Ctrl-C in a terminal
//! (SIGINT to the whole foreground process group), SIGTERM (`timeout`),
//! SIGHUP (the terminal closed) and a closed pipe (`phoenix demo | head`).
//! Each time the services, the daemons and the demo's folder must be gone.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use phoenix_e2e::{bin, wait_for};

/// Pids of processes whose working directory or command line is in `dir`.
fn processes_in(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let dir_s = dir.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"));
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cwd.is_ok_and(|c| c.starts_with(dir)) || String::from_utf8_lossy(&cmd).contains(&dir_s)
        })
        .collect()
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) with integers only; a stale pid just fails.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A running demo; dropping it (a failed test) kills whatever is left.
struct Demo {
    child: Child,
    dir: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        kill(-(self.child.id() as i32), libc::SIGKILL);
        for pid in processes_in(&self.dir) {
            kill(pid as i32, libc::SIGKILL);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the demo is stopped.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// Ctrl-C: SIGINT to the terminal's foreground group, the demo's own.
    CtrlC,
    Signal(i32),
    /// Whoever read its output went away.
    ClosedPipe,
}

fn stop_the_demo(how: Stop) {
    let dir = std::env::temp_dir().join(format!("phoenix-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let child = Command::new(bin("phoenix"))
        .arg("demo")
        .arg("--dir")
        .arg(&dir)
        .arg("--testy")
        .arg(bin("testy"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // As a shell runs a job: a process group of its own.
        .process_group(0)
        .spawn()
        .expect("start phoenix demo");
    let mut demo = Demo { child, dir };
    let stdout = demo.child.stdout.take().expect("demo stdout");
    let mut lines = BufReader::new(stdout).lines();
    let started = Instant::now();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{how:?}: the demo ended before deploying"))
            .expect("read demo output");
        if line.starts_with("deployed") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{how:?}: no deploy within 60 s"
        );
    }
    // The command it suggests for another terminal works as printed.
    let hint = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{how:?}: the demo ended before its hint"))
            .expect("read demo output");
        if let Some(cmd) = line.strip_prefix("try in another terminal: ") {
            break cmd.to_owned();
        }
    };
    let out = Command::new("sh")
        .args(["-c", &hint])
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("run the demo's hint");
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("web"),
        "{how:?}: `{hint}` printed {listed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Three daemons run in the demo folder (their data dirs) and three of
    // the four services (the oneshot ends): web, flaky and sickly.
    wait_for(
        "the demo's daemons and services",
        Duration::from_secs(30),
        || (processes_in(&demo.dir).len() >= 5).then_some(()),
    );
    let pid = demo.child.id() as i32;
    let mut reader = Some(lines);
    match how {
        Stop::CtrlC => kill(-pid, libc::SIGINT),
        Stop::Signal(sig) => kill(pid, sig),
        // The next status the demo prints finds nobody reading.
        Stop::ClosedPipe => drop(reader.take()),
    }
    let status = wait_for("the demo to exit", Duration::from_secs(60), || {
        demo.child.try_wait().expect("wait for the demo")
    });
    drop(reader);
    assert!(status.success(), "{how:?}: the demo exited with {status}");
    let left: Vec<String> = processes_in(&demo.dir)
        .into_iter()
        .map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            format!("{pid} {}", String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect();
    assert!(
        left.is_empty(),
        "{how:?}: processes left behind in {}: {left:?}",
        demo.dir.display()
    );
    assert!(
        !demo.dir.exists(),
        "{how:?}: {} was not removed",
        demo.dir.display()
    );
}

#[test]
fn the_demo_cleans_up_however_it_is_stopped() {
    // One after another: every demo uses the same TUN names.
    for how in [
        Stop::CtrlC,
        Stop::Signal(libc::SIGTERM),
        Stop::Signal(libc::SIGHUP),
        Stop::ClosedPipe,
    ] {
        stop_the_demo(how);
    }
    on_a_terminal_the_status_is_redrawn_in_place();
}

/// On a terminal (a pseudo-terminal from `script`), each status replaces
/// the last one: cursor home and clear screen before every frame.
fn on_a_terminal_the_status_is_redrawn_in_place() {
    let dir = std::env::temp_dir().join(format!("phoenix-demo-tty-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let demo = format!(
        "{} demo --dir {} --testy {} --seconds 5",
        bin("phoenix").display(),
        dir.display(),
        bin("testy").display()
    );
    let child = Command::new("script")
        .args(["-qec", &demo, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run the demo under script(1)");
    let mut demo = Demo { child, dir };
    let status = wait_for(
        "the demo on a terminal to end",
        Duration::from_secs(60),
        || demo.child.try_wait().expect("wait for the demo"),
    );
    let mut out = String::new();
    std::io::Read::read_to_string(&mut demo.child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(
        status.success(),
        "the demo on a terminal exited with {status}: {out}"
    );
    let frames = out.matches("\x1b[H\x1b[2J").count();
    assert!(frames >= 2, "{frames} redraws in: {out}");
    assert!(!demo.dir.exists(), "{} was not removed", demo.dir.display());
}
