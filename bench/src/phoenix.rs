//! A Phoenix cluster on loopback: a master and minions started with
//! `--foreground` in a temp dir, driven through the `phoenix` CLI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::util::{Daemon, Out, procs_under, run, run_ok, sweep, until, wait_none_under};

pub struct Cluster {
    exe: PathBuf,
    pub dir: PathBuf,
    master: Daemon,
    minions: Vec<(String, Daemon)>,
}

/// What the teardown found.
#[derive(Debug, Default, Clone)]
pub struct Teardown {
    pub deleted: usize,
    /// From the first `phoenix del` (one at a time) until no service process was left.
    pub all_gone_after: Option<Duration>,
    /// Processes the sweep had to kill after the daemons were stopped.
    pub leftovers: usize,
    pub errors: Vec<String>,
    /// WARN/ERROR lines in the master's and minions' logs: count, examples.
    pub log_problems: (usize, Vec<String>),
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    pub fn start(exe: &Path, dir: &Path, minions: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (join, link) = (free_port()?, free_port()?);
        let master_dir = dir.join("master");
        let no_overlay = needs_no_overlay(exe);
        let s = |v: &str| v.to_owned();
        let mut margs = vec![
            s("master"),
            s("127.0.0.1"),
            s("--foreground"),
            s("--data-dir"),
            master_dir.display().to_string(),
            s("--join-port"),
            join.to_string(),
            s("--link-port"),
            link.to_string(),
            s("--no-proxy"),
        ];
        if no_overlay {
            margs.push(s("--no-overlay"));
        }
        let master = spawn(exe, "phoenix master", &margs, &dir.join("master.log"))?;
        let mut cl = Cluster {
            exe: exe.to_owned(),
            dir: dir.to_owned(),
            master,
            minions: Vec::new(),
        };
        let key = until(
            "the master to answer",
            Duration::from_secs(15),
            Duration::from_millis(50),
            || {
                let info = cl.json(&["master-info", "--json"]).ok()?;
                info["key"].as_str().map(str::to_owned)
            },
        )?;
        for m in minions {
            let mut args = vec![
                s("minion"),
                s(m),
                s("127.0.0.1"),
                key.clone(),
                s("127.0.0.1"),
                s("127.0.0.1"),
                s("--foreground"),
                s("--data-dir"),
                dir.join(m).display().to_string(),
                s("--master-join-port"),
                join.to_string(),
                s("--master-link-port"),
                link.to_string(),
                // Running means started, as supervisord's startsecs=0 here:
                // without a health check a service otherwise counts as
                // running only after a second of uptime.
                s("--min-uptime-ms"),
                s("0"),
                // supervisord gives its programs no network of their own;
                // nor does Phoenix here (the netns cost is measured apart).
                s("--service-network"),
                s("host"),
            ];
            if no_overlay {
                args.push(s("--no-overlay"));
            }
            let d = spawn(
                exe,
                &format!("phoenix minion {m}"),
                &args,
                &dir.join(format!("{m}.log")),
            )?;
            cl.minions.push((m.to_string(), d));
        }
        until(
            "the join requests",
            Duration::from_secs(15),
            Duration::from_millis(50),
            || {
                let w = cl.json(&["waiting", "--json"]).ok()?;
                let names: Vec<&str> = w
                    .as_array()?
                    .iter()
                    .filter_map(|n| n["name"].as_str())
                    .collect();
                minions.iter().all(|m| names.contains(m)).then_some(())
            },
        )?;
        for m in minions {
            cl.cli(&["accept", m], Duration::from_secs(10))?;
        }
        until(
            "the minions to connect",
            Duration::from_secs(15),
            Duration::from_millis(50),
            || {
                let n = cl.json(&["nodes", "--json"]).ok()?;
                let up = n
                    .as_array()?
                    .iter()
                    .filter(|n| n["state"] == "reachable")
                    .count();
                (up == minions.len()).then_some(())
            },
        )?;
        Ok(cl)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args)
            .env("PHOENIX_DATA_DIR", self.dir.join("master"));
        c
    }

    /// Runs `phoenix ARGS` against this cluster; fails unless it succeeds.
    pub fn cli(&self, args: &[&str], timeout: Duration) -> Result<Out> {
        run_ok(&mut self.command(args), timeout)
    }

    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let out = self.cli(args, Duration::from_secs(20))?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("phoenix {args:?} printed no JSON"))
    }

    pub fn master_pid(&self) -> u32 {
        self.master.pid()
    }

    pub fn minion_pid(&self, name: &str) -> Result<u32> {
        self.minions
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.pid())
            .with_context(|| format!("no minion {name}"))
    }

    fn daemon_pids(&self) -> Vec<u32> {
        let mut p: Vec<u32> = self.minions.iter().map(|(_, d)| d.pid()).collect();
        p.push(self.master.pid());
        p
    }

    /// `phoenix deploy FILE`, which waits for the services to run.
    pub fn deploy(&self, file: &Path, timeout: Duration) -> Result<Out> {
        let t = timeout.as_secs().max(1).to_string();
        let f = file.display().to_string();
        self.cli(
            &["deploy", &f, "--timeout", &t],
            timeout + Duration::from_secs(10),
        )
    }

    /// `phoenix services --json`.
    pub fn services(&self) -> Result<Vec<Value>> {
        match self.json(&["services", "--json"])? {
            Value::Array(v) => Ok(v),
            other => bail!("`phoenix services --json` printed {other}"),
        }
    }

    /// Checks that every daemon still runs.
    pub fn check_alive(&mut self) -> Result<()> {
        if !self.master.alive() {
            bail!(
                "the phoenix master exited; see {}",
                self.dir.join("master.log").display()
            );
        }
        for (n, d) in &mut self.minions {
            if !d.alive() {
                bail!(
                    "phoenix minion {n} exited; see {}",
                    self.dir.join(format!("{n}.log")).display()
                );
            }
        }
        Ok(())
    }

    /// Deletes every service (`phoenix del`, a few at a time), waits for
    /// their processes to end, stops the daemons, and kills whatever is left.
    pub fn teardown(mut self) -> Teardown {
        let mut td = Teardown::default();
        let daemons = self.daemon_pids();
        let names = match self.services() {
            Ok(list) => list
                .iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect(),
            Err(e) => {
                td.errors.push(format!("cannot list services: {e:#}"));
                Vec::new()
            }
        };
        // One at a time: concurrent `phoenix del` calls can reach the minion
        // as desired sets out of order (the master reads and sends each set
        // outside any common lock), which briefly revives deleted services.
        let start = Instant::now();
        for name in &names {
            match self.cli(&["del", name], Duration::from_secs(20)) {
                Ok(_) => td.deleted += 1,
                Err(e) => td.errors.push(format!("del {name}: {e:#}")),
            }
        }
        match wait_none_under(&self.dir, &daemons, Duration::from_secs(60)) {
            Ok(_) => td.all_gone_after = Some(start.elapsed()),
            Err(e) => td
                .errors
                .push(format!("after deleting every service: {e:#}")),
        }
        for (_, d) in &mut self.minions {
            d.stop(Duration::from_secs(10));
        }
        self.master.stop(Duration::from_secs(10));
        let left = procs_under(&self.dir, &[]);
        if !left.is_empty() {
            td.errors.push(format!(
                "processes left after the daemons stopped: {left:?}"
            ));
        }
        td.leftovers = sweep(&self.dir, &[]);
        td.log_problems = log_problems(&self.dir);
        td
    }
}

/// WARN and ERROR lines in the daemons' logs: (count, a few distinct ones).
fn log_problems(dir: &Path) -> (usize, Vec<String>) {
    let mut count = 0;
    let mut seen: Vec<String> = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (0, seen);
    };
    let mut logs: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let file = log
            .file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
        // Running without the overlay is our choice, not a problem.
        let problem = |l: &&str| {
            (l.contains(" WARN ") || l.contains(" ERROR "))
                && !l.to_ascii_lowercase().contains("without the overlay")
        };
        for line in text.lines().filter(problem) {
            count += 1;
            // Drop the timestamp; keep one example of each kind.
            let msg = line.split_once(' ').map_or(line, |(_, m)| m).trim();
            let kind: String = msg.chars().take(60).collect();
            if seen.len() < 5 && !seen.iter().any(|s| s.contains(&kind)) {
                seen.push(format!("{file}: {msg}"));
            }
        }
    }
    (count, seen)
}

/// Whether this phoenix has a WireGuard overlay that can be turned off.
/// A master and two minions on one host cannot each own the overlay's TUN
/// device and UDP port, so the bench runs them with `--no-overlay`: the
/// minion links are then clear-text TCP on loopback. The overlay carries only
/// master↔minion traffic, none of the restart path.
pub fn needs_no_overlay(exe: &Path) -> bool {
    run(
        Command::new(exe).args(["master", "--help"]),
        Duration::from_secs(10),
    )
    .is_ok_and(|o| o.stdout.contains("--no-overlay"))
}

fn spawn(exe: &Path, name: &str, args: &[String], log: &Path) -> Result<Daemon> {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    Daemon::spawn(name, exe.as_os_str(), &args, &[], log)
}

/// `phoenix --version`, for the report.
pub fn version(exe: &Path) -> String {
    run(Command::new(exe).arg("--version"), Duration::from_secs(10))
        .map(|o| o.stdout.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}
