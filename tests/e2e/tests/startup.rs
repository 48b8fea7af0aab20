//! Starting daemons: the README's single-machine quickstart, run as it
//! stands, and daemons that cannot start saying why before they change
//! anything (a taken interface name, WireGuard port, join port, or a data
//! dir another master runs from).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use phoenix_e2e::{bin, bin_dir, free_port, free_udp_port, is_root, wait_for};

/// Kills, when dropped (also when a test fails), every process that runs
/// from under `dir` or names it on its command line: the daemons a test
/// started and the services their minions started. Nothing else has the
/// temporary dir's unique name in it.
struct KillUnder {
    dir: PathBuf,
}

impl KillUnder {
    fn pids(&self) -> Vec<i32> {
        let needle = self.dir.to_string_lossy().into_owned();
        let me = std::process::id() as i32;
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| *pid != me)
            .filter(|pid| {
                let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|c| c.starts_with(&self.dir));
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle));
                cwd || cmdline
            })
            .collect()
    }
}

impl Drop for KillUnder {
    fn drop(&mut self) {
        for _ in 0..20 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: kill(2) with integers; these pids run from our dir.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The README's quickstart block: the ```sh fence after the quickstart
/// marker.
fn readme_quickstart() -> String {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md");
    let after = text
        .split_once("<!-- quickstart:")
        .expect("the README's quickstart marker")
        .1;
    let block = after
        .split_once("```sh\n")
        .expect("the quickstart's ```sh block")
        .1;
    block
        .split_once("\n```")
        .expect("the end of the quickstart block")
        .0
        .to_owned()
}

/// Runs `script` with bash in a network namespace of its own (so the
/// default ports and interface names are free, as on a fresh machine), with
/// the workspace's binaries on PATH, for at most `limit`.
fn run_in_fresh_netns(script: &str, cwd: &Path, limit: Duration) -> Output {
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("unshare")
        .args(["--net", "--", "bash", "-c"])
        .arg("ip link set lo up && exec bash -e -c \"$0\"")
        .arg(script)
        .current_dir(cwd)
        .env("PATH", path)
        .env_remove("PHOENIX_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "the quickstart did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn the_readme_quickstart_works_pasted_into_a_fresh_shell() {
    if !is_root() {
        eprintln!("SKIPPED: the quickstart runs the overlay, which needs root");
        return;
    }
    // Built like every e2e binary: `cargo build --workspace`.
    bin("phoenix");
    bin("testy");
    let dir = tempfile::Builder::new()
        .prefix("phoenix-quickstart-")
        .tempdir()
        .unwrap();
    let cleanup = KillUnder {
        dir: dir.path().to_owned(),
    };
    let script = readme_quickstart();
    assert!(script.contains("Q=/tmp/phoenix-quickstart\n"), "{script}");
    // The one change: the quickstart's dir is this test's own, so a failed
    // run is cleaned up here and parallel runs do not meet.
    let q = dir.path().join("q");
    let script = script.replace(
        "Q=/tmp/phoenix-quickstart\n",
        &format!("Q={}\n", q.display()),
    );
    // From a dir without target/release, so PATH finds this build.
    let out = run_in_fresh_netns(&script, dir.path(), Duration::from_secs(180));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs = ["master.log", "web1.log"]
        .iter()
        .map(|l| std::fs::read_to_string(q.join(l)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        out.status.success(),
        "the quickstart failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}\nlogs:\n{logs}",
        out.status
    );
    // testy's `/` answers with the service's name.
    assert!(
        stdout.contains("testy name=hello"),
        "no answer from the service\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // It cleaned up after itself: its dir is gone, and nothing runs from it.
    assert!(!q.exists(), "the quickstart left {}", q.display());
    let left = wait_for_none(|| {
        let pids = cleanup.pids();
        (!pids.is_empty()).then_some(pids)
    });
    assert!(left.is_none(), "the quickstart left processes: {left:?}");
}

/// Polls `f` for up to 5 s until it returns `None`; returns its last value.
fn wait_for_none<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        let v = f();
        if v.is_none() || start.elapsed() > Duration::from_secs(5) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A daemon started by a test, killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn phoenix(args: &[String]) -> Command {
    let mut cmd = Command::new(bin("phoenix"));
    cmd.args(args)
        .env_remove("PHOENIX_DATA_DIR")
        .stdin(Stdio::null());
    cmd
}

fn spawn(args: &[String], log: &Path) -> Daemon {
    let log = std::fs::File::create(log).unwrap();
    Daemon(
        phoenix(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn phoenix"),
    )
}

/// Runs a daemon that must refuse to start; returns what it said.
fn refused(args: &[String]) -> String {
    let mut child = phoenix(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn phoenix");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} started instead of refusing:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{args:?} exited 0");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn master_info(data_dir: &Path) -> serde_json::Value {
    let out = phoenix(&strings(&["master-info", "--json", "--data-dir"]))
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_master(data_dir: &Path) -> serde_json::Value {
    wait_for("the master's socket", Duration::from_secs(15), || {
        std::os::unix::net::UnixStream::connect(data_dir.join("phoenix.sock")).ok()
    });
    master_info(data_dir)
}

#[test]
fn a_second_master_on_a_data_dir_or_a_port_is_refused_before_it_changes_anything() {
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = KillUnder {
        dir: dir.path().to_owned(),
    };
    let data = dir.path().join("master");
    let (join, link) = (free_port(), free_port());
    let master = |ip: &str, data: &Path, join: u16, link: u16| {
        let mut args = strings(&[
            "master",
            ip,
            "--foreground",
            "--no-overlay",
            "--no-proxy",
            "--join-port",
            &join.to_string(),
            "--link-port",
            &link.to_string(),
            "--data-dir",
        ]);
        args.push(data.display().to_string());
        args
    };
    let _first = spawn(
        &master("127.0.0.1", &data, join, link),
        &dir.path().join("first.log"),
    );
    assert_eq!(wait_master(&data)["public_ip"], "127.0.0.1");

    let said = refused(&master("127.0.0.2", &data, free_port(), free_port()));
    assert!(
        said.contains(&format!(
            "another master is already running with data dir {}",
            data.display()
        )),
        "{said}"
    );
    assert_eq!(master_info(&data)["public_ip"], "127.0.0.1");

    let other = dir.path().join("other");
    let said = refused(&master("127.0.0.1", &other, join, free_port()));
    assert!(
        said.contains(&format!(
            "TCP {join} is in use (is a master running here?): pick another with --join-port"
        )),
        "{said}"
    );
    assert!(!other.join("phoenix.db").exists());
}

#[test]
fn a_minion_on_a_taken_interface_or_wireguard_port_says_which_flag_fixes_it() {
    if !is_root() {
        eprintln!("SKIPPED: the overlay needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = KillUnder {
        dir: dir.path().to_owned(),
    };
    let data = dir.path().join("master");
    let tag = std::process::id() % 100_000;
    let (master_tun, master_wg) = (format!("pxs{tag}m"), free_udp_port());
    let (join, link) = (free_port(), free_port());
    let mut args = strings(&[
        "master",
        "127.0.0.1",
        "--foreground",
        "--no-proxy",
        "--wireguard",
        "userspace",
        "--join-port",
        &join.to_string(),
        "--link-port",
        &link.to_string(),
        "--wg-port",
        &master_wg.to_string(),
        "--tun-name",
        &master_tun,
        "--data-dir",
    ]);
    args.push(data.display().to_string());
    let _master = spawn(&args, &dir.path().join("master.log"));
    let key = wait_master(&data)["key"].as_str().unwrap().to_owned();

    let minion = |name: &str, tun: &str, wg: u16, wireguard: &str| {
        let mut args = strings(&[
            "minion",
            name,
            "127.0.0.1",
            &key,
            "127.0.0.1",
            "127.0.0.1",
            "--foreground",
            "--wireguard",
            wireguard,
            "--master-join-port",
            &join.to_string(),
            "--master-link-port",
            &link.to_string(),
            "--master-wg-port",
            &master_wg.to_string(),
            "--wg-port",
            &wg.to_string(),
            "--tun-name",
            tun,
            "--data-dir",
        ]);
        args.push(dir.path().join(name).display().to_string());
        args
    };
    // Once this blamed a missing kernel WireGuard module (`auto`).
    for wireguard in ["auto", "userspace"] {
        let said = refused(&minion("m1", &master_tun, free_udp_port(), wireguard));
        assert!(
            said.contains(&format!(
                "interface {master_tun} exists (is another phoenix daemon running here?): pick another with --tun-name"
            )),
            "{said}"
        );
        assert!(!said.contains("DKMS"), "{said}");
    }
    // Once this started, and the master's first `accept` failed.
    let said = refused(&minion("m2", &format!("pxs{tag}b"), master_wg, "auto"));
    assert!(
        said.contains(&format!(
            "UDP {master_wg} is in use (is a master or another minion running here?): pick another with --wg-port"
        )),
        "{said}"
    );
    // Neither asked to join.
    let out = phoenix(&strings(&["waiting", "--json", "--data-dir"]))
        .arg(&data)
        .output()
        .unwrap();
    let waiting: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(waiting, serde_json::json!([]));
}
