//! End to end, as root: every service in its own cgroups. Processes that
//! leave their process group die with the service, leftovers of a service
//! that died while its minion was down are ended, `cpus` and `memory` bind
//! binaries, and a binary runs under its image's name.
//!
//! Service names here are used by no other test file: each test's guard
//! kills whatever is left in cgroups of these names, also when it fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phoenix_e2e::{Cluster, alive, is_root, testy, wait_for};
use serde_json::{Value, json};

/// The cgroup hierarchies services' cgroups can be in.
const ROOTS: [&str; 6] = [
    "/sys/fs/cgroup",
    "/sys/fs/cgroup/unified",
    "/sys/fs/cgroup/freezer",
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/memory",
    "/sys/fs/cgroup/cpu",
];

/// Every cgroup directory of service `name` (of any minion).
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}@");
    ROOTS
        .iter()
        .filter_map(|r| std::fs::read_dir(Path::new(r).join("phoenix")).ok())
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

fn procs(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn sigkill(pid: u64) {
    // SAFETY: kill(2) with integers only; a stale pid just fails.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// On drop, kills what is left in the cgroups of these services and
/// removes the cgroups, so a failed test leaves nothing running.
struct Cleanup(Vec<&'static str>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.0 {
            for dir in cgroup_dirs(name) {
                for pid in procs(&dir) {
                    sigkill(pid);
                }
                let _ = wait_until(Duration::from_secs(5), || procs(&dir).is_empty());
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
}

fn wait_until(timeout: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn pid(s: &Value) -> u64 {
    s["pid"].as_u64().unwrap_or_else(|| panic!("no pid in {s}"))
}

/// A cluster of one minion, or None (and a note) when not root: cgroups
/// and the overlay need it.
fn cluster() -> Option<Cluster> {
    if !is_root() {
        eprintln!("skipped: needs root (cgroups)");
        return None;
    }
    Some(Cluster::start(1))
}

/// Pushes a shell script as image `name`.
fn push_script(c: &Cluster, name: &str, body: &str) {
    let path = c.dir.path().join(format!("{name}.sh"));
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    c.ok(&["push", path.to_str().unwrap(), name]);
}

/// A service that starts a `setsid` grandchild and a double-forked one
/// (both out of its process group), logs their pids, and sleeps.
const ESCAPER: &str = r#"
setsid sh -c 'echo "escaped $$"; exec sleep 600' &
( sh -c 'echo "escaped $$"; exec sleep 600' & )
exec sleep 600
"#;

/// The pids the escaper's current run logged (the last two).
fn escaped(c: &Cluster, service: &str) -> Vec<u64> {
    wait_for("two escaped pids", Duration::from_secs(10), || {
        let log = c.ok(&["logs", service]);
        let pids: Vec<u64> = log
            .lines()
            .filter_map(|l| l.strip_prefix("escaped ")?.trim().parse().ok())
            .collect();
        let last: Vec<u64> = pids[pids.len().saturating_sub(2)..].to_vec();
        (last.len() == 2 && last.iter().all(|p| alive(*p))).then_some(last)
    })
}

#[test]
fn processes_that_left_the_group_die_with_a_restart_and_with_del() {
    let _cleanup = Cleanup(vec!["escaper"]);
    let Some(c) = cluster() else { return };
    push_script(&c, "escaper", ESCAPER);
    c.apply(
        "deploy",
        &json!([{"machine": "m1", "name": "escaper", "image": "escaper", "type": "binary"}]),
    );
    let s = c.wait_status("escaper", "running", |s| s["state"] == "running");
    let first = escaped(&c, "escaper");
    // In the cgroup; the `setsid` one out of the group (the double-forked
    // one is out of its parent's reach, reparented).
    let pgid = |p: u64| {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap();
        // Field 5, the process group, is the third after the ')'.
        stat.rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(first.iter().any(|p| pgid(*p) != pid(&s)), "{first:?}");
    for p in &first {
        let cgroups = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap();
        assert!(cgroups.contains("/phoenix/escaper@"), "{p}: {cgroups}");
    }

    // A crash of the main process: its escaped processes go before the
    // restart, so none leaks per restart.
    sigkill(pid(&s));
    c.wait_status("escaper", "restarted", |s| {
        s["state"] == "running" && s["restarts"] == 1
    });
    let second = escaped(&c, "escaper");
    for p in &first {
        assert!(!alive(*p), "{p} survived its service's restart");
    }

    c.ok(&["del", "escaper"]);
    assert!(
        wait_until(Duration::from_secs(10), || second
            .iter()
            .all(|p| !alive(*p))),
        "escaped processes survived del: {second:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || cgroup_dirs("escaper").is_empty()),
        "cgroups left after del: {:?}",
        cgroup_dirs("escaper")
    );
}

#[test]
fn leftovers_of_a_service_that_died_while_the_minion_was_down_are_ended() {
    let _cleanup = Cleanup(vec!["orphaner"]);
    let Some(mut c) = cluster() else { return };
    push_script(&c, "orphaner", ESCAPER);
    c.apply(
        "deploy",
        &json!([{"machine": "m1", "name": "orphaner", "image": "orphaner",
                 "type": "binary", "memory": "64M"}]),
    );
    let s = c.wait_status("orphaner", "running", |s| s["state"] == "running");
    // One restart before, to see the count survive the minion's restart.
    sigkill(pid(&s));
    let s = c.wait_status("orphaner", "restarted", |s| {
        s["state"] == "running" && s["restarts"] == 1
    });
    let limits = s["limits"].as_str().unwrap_or_default().to_owned();
    assert!(limits.starts_with("memory 64 MiB (cgroup v"), "{s}");
    let left = escaped(&c, "orphaner");

    let dead = pid(&s);
    c.kill_minion("m1");
    sigkill(dead);
    std::thread::sleep(Duration::from_millis(200));
    assert!(left.iter().all(|p| alive(*p)), "nothing left to clean up");
    c.start_minion("m1");
    assert!(
        wait_until(Duration::from_secs(15), || left.iter().all(|p| !alive(*p))),
        "the dead service's children outlived the minion's restart: {left:?}"
    );
    let s = c.wait_status("orphaner", "running again", |s| {
        s["state"] == "running" && s["pid"] != json!(dead) && s["restarts"] == 2
    });
    assert_eq!(s["limits"], json!(limits), "{s}");
    // One copy runs: its own two escaped processes, the main one, nothing else.
    let now = escaped(&c, "orphaner");
    let dirs = cgroup_dirs("orphaner");
    assert!(!dirs.is_empty());
    for dir in dirs {
        let mut listed = procs(&dir);
        listed.sort();
        let mut want = vec![pid(&s), now[0], now[1]];
        want.sort();
        assert_eq!(listed, want, "{}", dir.display());
    }
    c.ok(&["del", "orphaner"]);
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u64) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat are the 12th and 13th after the ')'.
    let at = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    at(11) + at(12)
}

#[test]
fn a_cpu_limited_spinner_cannot_starve_a_health_checked_neighbour() {
    let _cleanup = Cleanup(vec!["spinner", "neighbour"]);
    let Some(c) = cluster() else { return };
    // Four busy loops: two cores' worth and more, without the limit.
    push_script(
        &c,
        "spinner",
        "for i in 1 2 3 4; do (while :; do :; done) & done\nexec sleep 600",
    );
    let mut neighbour = testy("m1", "neighbour", &[]);
    neighbour["healthcheck"] = json!("/health");
    let port = neighbour["proxyport"].as_u64().unwrap() as u16;
    c.apply(
        "deploy",
        &json!([neighbour,
                {"machine": "m1", "name": "spinner", "image": "spinner", "type": "binary",
                 "cpus": 0.2, "memory": "32M"}]),
    );
    let s = c.wait_status("spinner", "running", |s| s["state"] == "running");
    let limits = s["limits"].as_str().unwrap_or_default();
    assert!(
        limits.starts_with("memory 32 MiB, cpus 0.2 (cgroup v"),
        "{s}"
    );
    c.wait_status("neighbour", "healthy", |s| s["health"] == "healthy");

    let spinners = wait_for("the spinner's loops", Duration::from_secs(10), || {
        let dir = cgroup_dirs("spinner").into_iter().next()?;
        let p = procs(&dir);
        (p.len() >= 5).then_some(p)
    });
    let ticks = || spinners.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
    // SAFETY: sysconf takes an integer name and returns an integer.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let neighbour_at = c.service_at("neighbour", port);
    let (t0, at0) = (ticks(), Instant::now());
    // The neighbour answers its health checks throughout.
    let mut slow = Vec::new();
    while at0.elapsed() < Duration::from_secs(4) {
        let asked = Instant::now();
        let answer = c.get(&neighbour_at, "/health");
        assert_eq!(
            answer.map(|a| a.0),
            Some(200),
            "the neighbour stopped answering"
        );
        if asked.elapsed() > Duration::from_millis(200) {
            slow.push(asked.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let share = (ticks() - t0) as f64 / hz / at0.elapsed().as_secs_f64();
    eprintln!("spinner's CPU share over 4 s: {share:.3} cores (limit 0.2)");
    assert!(
        (0.1..=0.3).contains(&share),
        "the spinner used {share:.3} cores, limit 0.2"
    );
    assert!(slow.len() <= 2, "slow health answers: {slow:?}");
    let n = c.status("neighbour");
    assert_eq!(
        (n["health"].as_str(), n["restarts"].as_u64()),
        (Some("healthy"), Some(0)),
        "{n}"
    );
    c.ok(&["del", "spinner"]);
    c.ok(&["del", "neighbour"]);
    assert!(
        wait_until(Duration::from_secs(10), || spinners
            .iter()
            .all(|p| !alive(*p))),
        "spinners survived del"
    );
}

#[test]
fn busybox_runs_as_a_multi_call_binary_under_its_name() {
    let _cleanup = Cleanup(vec!["bbox"]);
    let Some(c) = cluster() else { return };
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        eprintln!("skipped: /bin/busybox is missing (apt-get install busybox-static)");
        return;
    }
    c.ok(&["push", busybox.to_str().unwrap(), "busybox"]);
    c.apply(
        "deploy",
        &json!([{"machine": "m1", "name": "bbox", "image": "busybox", "type": "binary",
                 "args": ["sh", "-c", "echo hi from busybox; sleep 600; echo bye"]}]),
    );
    wait_for("busybox's greeting", Duration::from_secs(10), || {
        c.ok(&["logs", "bbox"])
            .contains("hi from busybox")
            .then_some(())
    });
    let s = c.wait_status("bbox", "running", |s| s["state"] == "running");
    // busybox chose its sh applet by argv[0] = "busybox", args[0] = "sh";
    // `ps` shows the image's name, not the cached file's hash.
    let p = pid(&s);
    let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap();
    let cmdline = std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap();
    assert_eq!(comm.trim(), "busybox", "{cmdline:?}");
    assert!(cmdline.starts_with("busybox\0sh\0-c\0"), "{cmdline:?}");
    c.ok(&["del", "bbox"]);
}
