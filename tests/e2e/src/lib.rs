//! The end-to-end harness: real `phoenix` daemons and real `testy` services.
//!
//! A [`Cluster`] is a master and some minions, each a `phoenix ... --foreground`
//! process with its own data dir under one temporary directory, talking over
//! loopback. Dropping it (also when a test panics) kills the daemons and
//! every service process group the minions recorded, and removes the dir.
//!
//! The binaries come from the same target dir as the test executable, so run
//! `cargo build --workspace` before `cargo test --workspace` (the README's
//! test command does both).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub mod joinflood;
pub mod netns;
pub mod oci;
pub mod pebble;
pub mod vm;
pub use netns::Net;

/// The directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/e2e-xxxx → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// A TCP port nobody listens on now. Ports are handed out from a range
/// chosen per test process, so parallel tests do not collide.
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768 and up), so that no
    // outgoing connection holds the port when a service wants it.
    const LOW: u16 = 20000;
    const SPAN: u16 = 12000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id() % u32::from(SPAN)) as u16 + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let p = LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let v4 = TcpListener::bind(("127.0.0.1", p)).is_ok();
        let v6 = TcpListener::bind(("::1", p)).is_ok();
        if v4 && v6 {
            return p;
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) with integers only; a stale pid just fails.
    unsafe {
        libc::kill(pid, sig);
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    master: Option<Child>,
    minions: HashMap<String, Child>,
    pub join_port: u16,
    pub link_port: u16,
    /// The master's proxy ports (80 and 443 in a host of its own).
    pub http_port: u16,
    pub https_port: u16,
    pub wg_port: u16,
    pub key: String,
    /// Extra flags for every minion.
    pub minion_flags: Vec<String>,
    /// Extra flags for the master.
    pub master_flags: Vec<String>,
    /// The WireGuard overlay is on (it needs root).
    pub overlay: bool,
    /// Hosts in network namespaces; `None`: everything on loopback.
    pub net: Option<Net>,
    /// Services get a network namespace each (clusters on `net`);
    /// otherwise minions run with `--service-network host`.
    pub service_netns: bool,
    /// Makes TUN names unique on a shared host.
    tag: String,
    /// UDP ports for minions' WireGuard on loopback.
    minion_wg_ports: Vec<u16>,
}

/// A service's address as seen from its machine's host.
#[derive(Clone, Debug)]
pub struct ServiceAt {
    pub machine: String,
    pub addr: std::net::SocketAddr,
}

/// A UDP port the kernel says is free now.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("udp port")
}

/// Whether this process may create TUN devices (and so run the overlay).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `git -C dir ARGS` with no system or user configuration (HOME is
/// `dir`); panics with git's stderr when it fails; returns its stdout,
/// trimmed.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("run git (install the `git` package)");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Why this machine cannot run a VM test, if it cannot: it needs root,
/// each of `programs` (named with the Debian package that has it) and
/// Debian's cloud kernel in /boot.
pub fn vm_test_missing(programs: &[(&str, &str)]) -> Option<String> {
    if !is_root() {
        return Some("needs root".into());
    }
    let has = |p: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for (program, package) in programs {
        if !has(program) {
            return Some(format!("needs {program} (apt-get install {package})"));
        }
    }
    let kernel = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
        });
    if !kernel {
        return Some(
            "needs Debian's cloud kernel in /boot (apt-get install linux-image-cloud-amd64)".into(),
        );
    }
    None
}

/// Whether this process can run containers (root, and crun installed);
/// when not, says that `what` is skipped and why.
pub fn can_run_containers(what: &str) -> bool {
    let crun = std::process::Command::new("crun")
        .arg("--version")
        .output()
        .is_ok();
    if !is_root() || !crun {
        eprintln!("SKIPPED: {what} needs root and crun (apt-get install crun)");
        return false;
    }
    true
}

impl Cluster {
    /// A master and accepted minions `m1..=mN` on loopback, with testy
    /// pushed as `testy`.
    pub fn start(minions: usize) -> Cluster {
        Cluster::master_only().with_minions(minions)
    }

    /// Starts minions `m1..=mN`, accepts them, waits for them, pushes testy.
    pub fn with_minions(mut self, minions: usize) -> Cluster {
        for i in 1..=minions {
            self.start_minion(&format!("m{i}"));
        }
        for i in 1..=minions {
            let name = format!("m{i}");
            self.wait_waiting(&name);
            self.ok(&["accept", &name]);
        }
        for i in 1..=minions {
            self.wait_reachable(&format!("m{i}"));
        }
        self.ok(&["push", bin("testy").to_str().unwrap(), "testy"]);
        self
    }

    /// A master on loopback; the overlay is on when we are root.
    pub fn master_only() -> Cluster {
        Cluster::new(None)
    }

    /// A master on host `master` of `net` (overlay on, default ports).
    pub fn master_only_on(net: Net) -> Cluster {
        Cluster::new(Some(net))
    }

    /// A master and accepted minions on the hosts of `net` named `m1..`.
    pub fn start_on(net: Net, minions: usize) -> Cluster {
        Cluster::master_only_on(net).with_minions(minions)
    }

    fn new(net: Option<Net>) -> Cluster {
        static N: AtomicU16 = AtomicU16::new(0);
        let dir = tempfile::Builder::new()
            .prefix("phoenix-e2e-")
            .tempdir()
            .expect("temp dir");
        let on_net = net.is_some();
        let mut c = Cluster {
            dir,
            master: None,
            minions: HashMap::new(),
            join_port: if on_net { 51821 } else { free_port() },
            link_port: if on_net { 51822 } else { free_port() },
            http_port: if on_net { 80 } else { free_port() },
            https_port: if on_net { 443 } else { free_port() },
            wg_port: if on_net { 51820 } else { free_udp_port() },
            minion_wg_ports: (0..10).map(|_| free_udp_port()).collect(),
            key: String::new(),
            master_flags: vec!["--node-timeout-ms".into(), "3000".into()],
            overlay: on_net || is_root(),
            // Clusters on loopback share the host's network namespace, and
            // several run at once: their services' addresses would clash.
            service_netns: on_net,
            net,
            tag: format!(
                "{}{}",
                std::process::id() % 1000,
                N.fetch_add(1, Ordering::SeqCst)
            ),
            minion_flags: [
                "--health-grace-ms",
                "600",
                "--health-interval-ms",
                "200",
                "--health-timeout-ms",
                "500",
                "--stop-timeout-ms",
                "1500",
                // Test machines' disks may be nearly full; the tests' images are small.
                "--keep-free-mb",
                "16",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        };
        if !c.service_netns {
            c.minion_flags
                .extend(["--service-network".to_owned(), "host".to_owned()]);
        }
        c.start_master();
        c.key = c.json(&["master-info", "--json"])["key"]
            .as_str()
            .unwrap()
            .to_owned();
        c
    }

    pub fn master_dir(&self) -> PathBuf {
        self.dir.path().join("master")
    }

    pub fn minion_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The address a host's daemons use (loopback without a `net`).
    pub fn host_ip(&self, host: &str) -> String {
        match &self.net {
            Some(n) => n.host(host).ip.to_string(),
            None => "127.0.0.1".into(),
        }
    }

    fn overlay_flags(&self, role: &str) -> Vec<String> {
        if !self.overlay {
            return vec!["--no-overlay".into()];
        }
        if self.net.is_some() {
            // One node per namespace: the default device name and port.
            return Vec::new();
        }
        // Several nodes in one namespace: each its own device and port.
        vec![
            "--tun-name".into(),
            format!("px{}{role}", self.tag),
            "--wg-port".into(),
            self.wg_port_of(role).to_string(),
        ]
    }

    fn wg_port_of(&self, role: &str) -> u16 {
        if self.net.is_some() {
            return 51820;
        }
        let n: usize = role.trim_start_matches('m').parse().unwrap_or(0);
        if role == "master" {
            self.wg_port
        } else {
            self.minion_wg_ports[n % self.minion_wg_ports.len()]
        }
    }

    fn spawn(&self, host: &str, args: &[String], log: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(log))
            .unwrap();
        let mut cmd = match &self.net {
            Some(n) => n.command(host, &bin("phoenix")),
            None => Command::new(bin("phoenix")),
        };
        cmd.args(args)
            .env("PHOENIX_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn phoenix")
    }

    pub fn start_master(&mut self) {
        assert!(self.master.is_none(), "master already running");
        let ip = self.host_ip("master");
        let mut args: Vec<String> = [
            "master",
            &ip,
            "--foreground",
            "--data-dir",
            self.master_dir().to_str().unwrap(),
            "--join-port",
            &self.join_port.to_string(),
            "--link-port",
            &self.link_port.to_string(),
            "--http-port",
            &self.http_port.to_string(),
            "--https-port",
            &self.https_port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.overlay_flags("master"));
        args.extend(self.master_flags.iter().cloned());
        self.master = Some(self.spawn("master", &args, "master.log"));
        let sock = self.master_dir().join("phoenix.sock");
        wait_for("the master's socket", Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        });
    }

    pub fn kill_master(&mut self) {
        if let Some(mut m) = self.master.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }

    pub fn minion_args(&self, name: &str, key: &str) -> Vec<String> {
        let (master_ip, ip) = (self.host_ip("master"), self.host_ip(name));
        let mut args: Vec<String> = [
            "minion",
            name,
            &master_ip,
            key,
            &ip,
            &ip,
            "--foreground",
            "--data-dir",
            self.minion_dir(name).to_str().unwrap(),
            "--master-join-port",
            &self.join_port.to_string(),
            "--master-link-port",
            &self.link_port.to_string(),
            "--master-wg-port",
            &self.wg_port_of("master").to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.overlay_flags(name));
        args.extend(self.minion_flags.iter().cloned());
        args
    }

    /// A command running a minion's daemon (e.g. with other flags).
    pub fn minion_command(&self, name: &str, key: &str) -> Command {
        let mut cmd = match &self.net {
            Some(n) => n.command(name, &bin("phoenix")),
            None => Command::new(bin("phoenix")),
        };
        cmd.args(self.minion_args(name, key));
        cmd
    }

    pub fn start_minion(&mut self, name: &str) {
        let args = self.minion_args(name, &self.key.clone());
        let child = self.spawn(name, &args, &format!("{name}.log"));
        self.minions.insert(name.to_owned(), child);
    }

    /// SIGKILL, as a crash would; the minion's services are left running.
    pub fn kill_minion(&mut self, name: &str) {
        if let Some(mut m) = self.minions.remove(name) {
            let _ = m.kill();
            let _ = m.wait();
        }
    }

    pub fn minion_pid(&self, name: &str) -> u32 {
        self.minions[name].id()
    }

    /// Runs the CLI against this cluster's master.
    pub fn phoenix(&self, args: &[&str]) -> Output {
        Command::new(bin("phoenix"))
            .args(args)
            .env("PHOENIX_DATA_DIR", self.master_dir())
            .stdin(Stdio::null())
            .output()
            .expect("run phoenix")
    }

    /// Runs the CLI with `stdin` as its input.
    pub fn phoenix_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(bin("phoenix"))
            .args(args)
            .env("PHOENIX_DATA_DIR", self.master_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run phoenix");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs the CLI and asserts it succeeded; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.phoenix(args);
        assert!(
            out.status.success(),
            "phoenix {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI, asserts it failed, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.phoenix(args);
        assert!(
            !out.status.success(),
            "phoenix {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).expect("JSON output")
    }

    pub fn wait_waiting(&self, name: &str) {
        wait_for(
            &format!("{name} in `phoenix waiting`"),
            Duration::from_secs(15),
            || {
                let w = self.json(&["waiting", "--json"]);
                w.as_array()?
                    .iter()
                    .any(|n| n["name"] == name)
                    .then_some(())
            },
        );
    }

    pub fn wait_reachable(&self, name: &str) {
        wait_for(
            &format!("{name} to be reachable"),
            Duration::from_secs(15),
            || {
                let nodes = self.json(&["nodes", "--json"]);
                nodes
                    .as_array()?
                    .iter()
                    .any(|n| n["name"] == name && n["state"] == "reachable")
                    .then_some(())
            },
        );
    }

    /// Writes specs to a file and deploys (or updates) them, waiting for them to run.
    pub fn apply(&self, verb: &str, specs: &Value) -> String {
        let path = self.dir.path().join(format!("spec-{}.json", free_port()));
        std::fs::write(&path, specs.to_string()).unwrap();
        self.ok(&[verb, path.to_str().unwrap(), "--timeout", "30"])
    }

    /// A service's own address (`ip` in its status).
    pub fn service_ip(&self, name: &str) -> std::net::Ipv6Addr {
        let s = self.status(name);
        s["ip"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .unwrap_or_else(|| panic!("no ip in the status of {name}: {s}"))
    }

    /// Where a service is reached from the host of its machine: its own
    /// address (a namespace per service), or loopback where services
    /// share the minion's network (not root).
    pub fn service_at(&self, name: &str, port: u16) -> ServiceAt {
        let s = self.status(name);
        let machine = s["machine"].as_str().unwrap_or_default().to_owned();
        let ip: std::net::IpAddr = if self.service_netns {
            self.service_ip(name).into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        };
        ServiceAt {
            machine,
            addr: std::net::SocketAddr::new(ip, port),
        }
    }

    /// GET on a service found with [`Cluster::service_at`], from the host
    /// of its machine.
    pub fn get(&self, at: &ServiceAt, path: &str) -> Option<(u16, String)> {
        match &self.net {
            Some(n) => n.within(&at.machine, || http_get_at(at.addr, path)),
            None => http_get_at(at.addr, path),
        }
    }

    /// GET on a service's port, from the host of its machine.
    pub fn http_service(&self, name: &str, port: u16, path: &str) -> Option<(u16, String)> {
        self.get(&self.service_at(name, port), path)
    }

    pub fn status(&self, name: &str) -> Value {
        self.json(&["status", name, "--json"])
    }

    /// Waits until `pred` holds for the service's status; returns it.
    pub fn wait_status(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let found = (|| {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                let s = self.status(name);
                if pred(&s) {
                    return Some(s);
                }
                last = s;
                std::thread::sleep(Duration::from_millis(50));
            }
            None
        })();
        found.unwrap_or_else(|| {
            panic!("timed out waiting for {name} to be {what}; last status: {last}")
        })
    }

    /// The pid a minion recorded for a service (read from its disk, so it
    /// works with the master down).
    pub fn recorded_pid(&self, minion: &str, service: &str) -> Option<u64> {
        let text = std::fs::read_to_string(
            self.minion_dir(minion)
                .join("run")
                .join(format!("{service}.json")),
        )
        .ok()?;
        serde_json::from_str::<Value>(&text).ok()?["pid"].as_u64()
    }

    /// The debug log of a daemon, for failure messages.
    pub fn log(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{daemon}.log"))).unwrap_or_default()
    }
}

/// The minion's short id (as `phoenix_minion::minion_id` makes it),
/// which names its nftables table.
fn phoenix_minion_id(key: &str) -> String {
    blake3::hash(key.as_bytes()).to_hex()[..8].to_owned()
}

/// `len` bytes of seeded xorshift noise (incompressible, reproducible).
pub fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// A testy service spec on `machine` listening on a free port.
pub fn testy(machine: &str, name: &str, args: &[&str]) -> Value {
    json!({
        "machine": machine, "name": name, "image": "testy", "type": "binary",
        "proxyport": free_port(), "args": args,
    })
}

/// Fetches `path` from a local port over HTTP/1.1; returns (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_at(([127, 0, 0, 1], port).into(), path)
}

/// Fetches `path` from `addr` over HTTP/1.1; returns (status, body).
pub fn http_get_at(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    http_get_host(addr, "localhost", path)
}

/// [`http_get_at`] for host `host` (what the proxy routes by).
pub fn http_get_host(addr: std::net::SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test shows the end of each daemon's log.
        if std::thread::panicking() {
            for entry in std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                    eprintln!("---- {} (last 30 lines)\n{tail}", path.display());
                }
            }
        }
        for (_, mut m) in self.minions.drain() {
            let _ = m.kill();
            let _ = m.wait();
        }
        self.kill_master();
        // Services outlive their minion by design; end every group recorded.
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let run = entry.path().join("run");
            for rec in std::fs::read_dir(run).into_iter().flatten().flatten() {
                let Ok(text) = std::fs::read_to_string(rec.path()) else {
                    continue;
                };
                if let Some(pid) = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["pid"].as_i64())
                    && pid > 1
                {
                    // A binary leads its group; a container's init is alone.
                    kill(-(pid as i32), libc::SIGKILL);
                    kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        // A minion's nftables table outlives it by design (its services
        // keep running); on a shared host (no `net`) it goes here.
        if self.net.is_none() {
            for entry in std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let key = entry.path().join("minion.key");
                if key.exists()
                    && let Ok(pair) = phoenix_model::keys::KeyPair::load_or_create(&key)
                {
                    let table = format!("phoenix_{}", phoenix_minion_id(&pair.public()));
                    let _ = Command::new("nft")
                        .args(["delete", "table", "inet", &table])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        // Containers' overlay mounts live under the minions' dirs.
        let prefix = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        for m in mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
        {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: umount2 with a valid C string.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if std::thread::panicking() {
            for d in ["master", "m1", "m2", "m3"] {
                let log = self.log(d);
                if !log.is_empty() {
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!("---- {d}.log (last lines) ----");
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}
