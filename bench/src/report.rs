//! The results table (stdout) and BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::util::{Summary, run};
use crate::{Config, Side};

/// The exact command that reproduces a full run, from the workspace root.
pub const COMMAND: &str = "cargo build --release --workspace && target/release/phoenix-bench";

/// The targets.
const RESTART_P50_MS: f64 = 50.0;
const DEPLOY_MS: f64 = 300.0;
const RSS_BYTES: f64 = 15e6;

/// Where and with what the run happened.
pub struct Context {
    pub date: String,
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub mem: String,
    pub phoenix: String,
    pub supervisord: String,
    pub quick: bool,
    pub crashes: usize,
    pub services: usize,
    pub repeats: usize,
    pub sup_lanes: usize,
    pub deploys: usize,
    pub procs: usize,
    pub elapsed: Duration,
}

fn sh(cmd: &str, args: &[&str]) -> Option<String> {
    let out = run(Command::new(cmd).args(args), Duration::from_secs(10)).ok()?;
    out.status.success().then(|| out.stdout.trim().to_owned())
}

impl Context {
    pub fn gather(cfg: &Config, phoenix: &Path, elapsed: Duration) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "?".into(), |(_, v)| v.trim().to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or_else(
                || "?".into(),
                |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
            );
        let root = crate::workspace_root();
        let root = root.display().to_string();
        let git = sh("git", &["-C", &root, "rev-parse", "--short", "HEAD"]).map(|h| {
            let dirty =
                sh("git", &["-C", &root, "status", "--porcelain"]).is_some_and(|s| !s.is_empty());
            format!("{h}{}", if dirty { " + uncommitted changes" } else { "" })
        });
        Context {
            date: utc_now(),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: sh("uname", &["-srm"]).unwrap_or_else(|| "?".into()),
            cpu,
            mem,
            phoenix: format!(
                "{} (git {}){}",
                crate::phoenix::version(phoenix),
                git.unwrap_or_else(|| "?".into()),
                if crate::phoenix::needs_no_overlay(phoenix) {
                    "; daemons run with `--no-overlay` (minion links in clear-text TCP on loopback)"
                } else {
                    ""
                }
            ),
            supervisord: crate::supd::version(),
            quick: cfg.quick,
            crashes: cfg.crashes,
            services: cfg.services,
            repeats: cfg.repeats,
            sup_lanes: cfg.sup_lanes,
            deploys: cfg.deploys,
            procs: cfg.procs,
            elapsed,
        }
    }

    fn machine(&self) -> String {
        format!(
            "{} CPUs (nproc) · {} · kernel {} · {} RAM",
            self.nproc, self.cpu, self.kernel, self.mem
        )
    }
}

/// `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn fmt_ms(x: f64) -> String {
    if x < 10.0 {
        format!("{x:.2} ms")
    } else if x < 100.0 {
        format!("{x:.1} ms")
    } else {
        format!("{x:.0} ms")
    }
}

fn fmt_mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ratio(sup: f64, phx: f64) -> String {
    if phx <= 0.0 || sup <= 0.0 {
        return "–".into();
    }
    let r = sup / phx;
    if r >= 10.0 {
        format!("{r:.0}×")
    } else {
        format!("{r:.1}×")
    }
}

/// A latency cell, with its sample count when it differs from the plan.
fn lat(s: &Summary, pick: fn(&Summary) -> f64, planned: usize) -> String {
    if s.n == 0 {
        return "–".into();
    }
    let v = fmt_ms(pick(s));
    if s.n == planned {
        v
    } else {
        format!("{v} (n={})", s.n)
    }
}

struct Row {
    metric: String,
    phx: String,
    sup: String,
    ratio: String,
}

fn rows(c: &Context, p: &Side, s: &Side) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut lat_row =
        |metric: String, pp: &Summary, ss: &Summary, pick: fn(&Summary) -> f64, planned: usize| {
            rows.push(Row {
                metric,
                phx: lat(pp, pick, planned),
                sup: lat(ss, pick, planned),
                ratio: ratio(pick(ss), pick(pp)),
            });
        };
    let p50: fn(&Summary) -> f64 = |s| s.p50;
    let p99: fn(&Summary) -> f64 = |s| s.p99;
    lat_row(
        format!("Restart after SIGKILL, p50 (n={})", c.crashes),
        &p.restart.first,
        &s.restart.first,
        p50,
        c.crashes,
    );
    lat_row(
        "Restart after SIGKILL, p99".into(),
        &p.restart.first,
        &s.restart.first,
        p99,
        c.crashes,
    );
    lat_row(
        format!(
            "Restart, 2nd crash 1.5 s after a restart, p50 (n={})",
            c.repeats
        ),
        &p.restart.repeat,
        &s.restart.repeat,
        p50,
        c.repeats,
    );
    let heals = p.crash_healthy.n;
    lat_row(
        format!("SIGKILL → running and healthy again (health-checked), p50 (n={heals})"),
        &p.crash_healthy,
        &s.crash_healthy,
        p50,
        heals,
    );
    lat_row(
        format!("Deploy → running (CLI returns), p50 (n={})", c.deploys),
        &p.deploy_cli,
        &s.deploy_cli,
        p50,
        c.deploys,
    );
    lat_row(
        "Deploy → running (CLI returns), p99".into(),
        &p.deploy_cli,
        &s.deploy_cli,
        p99,
        c.deploys,
    );
    lat_row(
        "Deploy → first datagram, p50".into(),
        &p.deploy_first,
        &s.deploy_first,
        p50,
        c.deploys,
    );
    lat_row(
        "Deploy → first datagram, p99".into(),
        &p.deploy_first,
        &s.deploy_first,
        p99,
        c.deploys,
    );
    lat_row(
        "CLI round trip (`status` of one service), p50".into(),
        &p.cli_rtt,
        &s.cli_rtt,
        p50,
        10,
    );
    let mem = |metric: String, pk: u64, sk: u64| Row {
        metric,
        phx: fmt_mib(pk),
        sup: fmt_mib(sk),
        ratio: ratio(sk as f64, pk as f64),
    };
    rows.push(mem("Supervisor RSS, idle".into(), p.rss_idle, s.rss_idle));
    rows.push(mem(
        format!("Supervisor RSS, {} processes", c.procs),
        p.rss_full,
        s.rss_full,
    ));
    rows.push(mem(
        format!("Supervisor peak RSS (VmHWM), {} processes", c.procs),
        p.hwm_full,
        s.hwm_full,
    ));
    rows.push(Row {
        metric: format!("Bring up {} processes", c.procs),
        phx: fmt_ms(p.bringup_ms()),
        sup: fmt_ms(s.bringup_ms()),
        ratio: ratio(s.bringup_ms(), p.bringup_ms()),
    });
    if let (Some(i), Some(f)) = (p.master_rss_idle, p.master_rss_full) {
        rows.push(Row {
            metric: format!("Master RSS, idle → {} services", c.procs),
            phx: format!("{} → {}", fmt_mib(i), fmt_mib(f)),
            sup: "n/a".into(),
            ratio: "".into(),
        });
    }
    rows
}

fn render_rows(rows: &[Row]) -> String {
    let mut t = String::from(
        "| Metric | Phoenix | supervisord | supervisord ÷ Phoenix |\n|---|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(t, "| {} | {} | {} | {} |", r.metric, r.phx, r.sup, r.ratio);
    }
    t
}

struct Verdict {
    target: &'static str,
    /// None: not evaluated in this run.
    met: Option<bool>,
    detail: String,
}

fn verdicts(c: &Context, p: &Side, s: &Side) -> Vec<Verdict> {
    let r = (p.restart.first.p50, s.restart.first.p50);
    let rss_mb = p.rss_full as f64 * 1024.0 / 1e6;
    let mut v = vec![
        Verdict {
            target: "Restart ≤ 50 ms p50 and faster than supervisord",
            met: Some(p.restart.first.n > 0 && r.0 <= RESTART_P50_MS && r.0 < r.1),
            detail: format!(
                "p50 {} (p99 {}) vs supervisord {}",
                fmt_ms(r.0),
                fmt_ms(p.restart.first.p99),
                fmt_ms(r.1)
            ),
        },
        Verdict {
            target: "Deploy → running ≤ 300 ms (image cached)",
            met: Some(p.deploy_cli.n > 0 && p.deploy_cli.p50 <= DEPLOY_MS),
            detail: format!(
                "p50 {} (p99 {}) until `phoenix deploy` returned; first datagram p50 {}",
                fmt_ms(p.deploy_cli.p50),
                fmt_ms(p.deploy_cli.p99),
                fmt_ms(p.deploy_first.p50)
            ),
        },
        Verdict {
            target: "Minion RSS ≤ 15 MB with 1,000 processes",
            met: (c.procs >= 1000).then_some((p.rss_full as f64 * 1024.0) <= RSS_BYTES),
            detail: format!(
                "{} = {rss_mb:.1} MB VmRSS with {} processes (peak {}); 15 MB read as 15·10⁶ bytes",
                fmt_mib(p.rss_full),
                c.procs,
                fmt_mib(p.hwm_full)
            ),
        },
    ];
    if c.procs < 1000 {
        v[2].detail
            .push_str(" (fewer than 1,000 processes in this run)");
    }
    v
}

fn verdict_lines(c: &Context, p: &Side, s: &Side) -> String {
    let mut t = String::new();
    for v in verdicts(c, p, s) {
        let verdict = match v.met {
            Some(true) => "MET",
            Some(false) => "NOT MET",
            None => "NOT EVALUATED",
        };
        let _ = writeln!(t, "- **{}** — {verdict}: {}", v.target, v.detail);
    }
    t
}

/// What goes to stdout.
pub fn table(c: &Context, p: &Side, s: &Side) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\n## phoenix-bench results{}\n",
        if c.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(t, "Date: {}  ", c.date);
    let _ = writeln!(t, "Machine: {}  ", c.machine());
    let _ = writeln!(t, "Phoenix {} · {}\n", c.phoenix, c.supervisord);
    t.push_str(&render_rows(&rows(c, p, s)));
    t.push_str("\nTargets:\n");
    t.push_str(&verdict_lines(c, p, s));
    let notes = notes(p, s);
    if !notes.is_empty() {
        t.push_str("\nNotes:\n");
        t.push_str(&notes);
    }
    t
}

fn notes(p: &Side, s: &Side) -> String {
    let mut t = String::new();
    for n in &p.notes {
        let _ = writeln!(t, "- Phoenix: {n}");
    }
    for n in &s.notes {
        let _ = writeln!(t, "- supervisord: {n}");
    }
    if p.running_after > 0 || s.running_after > 0 {
        let _ = writeln!(
            t,
            "- Services reported running after the bring-up: Phoenix {} (`phoenix services`), supervisord {} (`supervisorctl status`).",
            p.running_after, s.running_after
        );
    }
    t
}

fn details(label: &str, s: &Summary) -> String {
    if s.n == 0 {
        return format!("| {label} | 0 | – | – | – | – | – |\n");
    }
    format!(
        "| {label} | {} | {} | {} | {} | {} | {} |\n",
        s.n,
        fmt_ms(s.min),
        fmt_ms(s.p50),
        fmt_ms(s.mean),
        fmt_ms(s.p99),
        fmt_ms(s.max)
    )
}

/// The markers around the section of BENCHMARKS.md that `phoenix-bench`
/// writes; the rest of the file (other benchmarks) is left alone.
pub const BEGIN: &str = "<!-- supervision:begin -->";
pub const END: &str = "<!-- supervision:end -->";

/// `doc` with the text between [`BEGIN`] and [`END`] replaced by `section`;
/// `None` if the markers are missing or out of order.
pub fn splice(doc: &str, section: &str) -> Option<String> {
    let a = doc.find(BEGIN)? + BEGIN.len();
    let b = a + doc[a..].find(END)?;
    Some(format!(
        "{}\n{}\n{}",
        &doc[..a],
        section.trim_end(),
        &doc[b..]
    ))
}

/// A new file for `section`, when there is none to splice it into.
pub fn new_document(section: &str) -> String {
    format!(
        "# Benchmarks\n\n## Supervision (vs supervisord)\n\n{BEGIN}\n{}\n{END}\n",
        section.trim_end()
    )
}

/// The supervision section of BENCHMARKS.md (what goes between the markers,
/// under the heading "Supervision (vs supervisord)").
pub fn markdown(c: &Context, p: &Side, s: &Side) -> String {
    let mut t = String::new();
    t.push_str(
        "_This section is written by `phoenix-bench`; rerun it rather than editing the figures by hand._\n\n",
    );
    t.push_str("### Reproduce\n\nFrom the workspace root, with the Debian package `supervisor` installed:\n\n");
    let _ = writeln!(t, "```sh\n{COMMAND}\n```\n");
    let _ = writeln!(
        t,
        "A full run takes about {:.0} minutes (this one: {:.0} s) and rewrites this section of BENCHMARKS.md \
         (between the `supervision:begin` and `supervision:end` markers; the rest of the file is left alone). \
         `target/release/phoenix-bench --quick` is a short smoke run (30 crashes, 10 deploys, 250 processes) \
         that only prints its table. `--help` lists the knobs. Everything runs on loopback in a temp dir, \
         which is removed at the end (also on Ctrl-C or after `--max-seconds`).\n",
        (c.elapsed.as_secs_f64() / 60.0).ceil(),
        c.elapsed.as_secs_f64()
    );
    t.push_str("### Results\n\n");
    let _ = writeln!(t, "- Date: {}", c.date);
    let _ = writeln!(t, "- Machine: {}", c.machine());
    let _ = writeln!(t, "- Phoenix: release build of {}", c.phoenix);
    let _ = writeln!(t, "- Peer: {}\n", c.supervisord);
    t.push_str(
        "The machine is shared and noisy: read the medians and the ratios; single figures move between runs.\n\n",
    );
    t.push_str(&render_rows(&rows(c, p, s)));
    t.push_str("\n#### Targets\n\n");
    t.push_str(&verdict_lines(c, p, s));
    t.push_str("\n#### All latency samples\n\n");
    t.push_str(
        "| Series | n | min | p50 | mean | p99 | max |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (who, side) in [("Phoenix", p), ("supervisord", s)] {
        t.push_str(&details(
            &format!("{who}: restart after SIGKILL"),
            &side.restart.first,
        ));
        t.push_str(&details(
            &format!("{who}: restart, 2nd crash 1.5 s later"),
            &side.restart.repeat,
        ));
        if side.crash_healthy.n > 0 {
            t.push_str(&details(
                &format!("{who}: SIGKILL → healthy again"),
                &side.crash_healthy,
            ));
        }
        t.push_str(&details(
            &format!("{who}: deploy → CLI returns"),
            &side.deploy_cli,
        ));
        t.push_str(&details(
            &format!("{who}: deploy → first datagram"),
            &side.deploy_first,
        ));
        t.push_str(&details(
            &format!("{who}: CLI `status` round trip"),
            &side.cli_rtt,
        ));
        t.push_str(&details(
            &format!("{who}: CLI `--help` (start-up)"),
            &side.cli_startup,
        ));
    }
    let _ = writeln!(
        t,
        "\nBring-up of {} processes: Phoenix's `phoenix deploy` returned after {}, all processes alive after {}; \
         supervisord's `supervisorctl update` returned after {}, all processes alive after {}.",
        c.procs,
        fmt_ms(p.bringup_cli_ms),
        fmt_ms(p.bringup_procs_ms),
        fmt_ms(s.bringup_cli_ms),
        fmt_ms(s.bringup_procs_ms)
    );
    let notes = notes(p, s);
    if !notes.is_empty() {
        t.push_str("\n#### Notes from this run\n\n");
        t.push_str(&notes);
    }
    t.push_str(&method(c, p, s));
    t
}

fn method(c: &Context, p: &Side, s: &Side) -> String {
    let mut t = String::from("\n### Method\n\n");
    let _ = write!(
        t,
        "Everything runs on one machine over loopback, Phoenix first, then supervisord (never both at once), \
each in its own temp dir. Phoenix is the release build of this workspace: `phoenix master 127.0.0.1 --foreground` \
and two `phoenix minion … --foreground` (m1 for the latency tests, m2 for the memory test), admitted with \
`phoenix accept`, driven through the `phoenix` CLI (when the build has a WireGuard overlay, all three run with \
`--no-overlay`: on one host they cannot each own the overlay's TUN device and port; the overlay would carry only \
master↔minion messages, none of the restart path). supervisord is the distribution's, run as `supervisord -n -c …` \
in separate instances ({w} for latency, one for memory) and driven through `supervisorctl`, with its default \
log level. Each memory figure comes from a supervisor that has supervised nothing else. Every supervisord program uses `autorestart=true`, \
`startsecs=0`, `startretries=1000000`, `redirect_stderr=true` and a log file (Phoenix also writes each service's \
output to a file); to match `startsecs=0`, the minions run with `--min-uptime-ms 0`. Every Phoenix service, binaries \
included, runs in cgroups of its own, joined before exec.

#### 1. Restart latency

- The supervised program is testy (`testy --announce 127.0.0.1:<udp port>`, one UDP port per service; `$PORT` \
  distinct per service: `proxyport` in the Phoenix spec, `environment=PORT=…` for supervisord). Right after \
  parsing its arguments, testy sends the datagram `started <pid> <unix_nanos>`.
- The bench reads the wall clock right before `kill(pid, SIGKILL)` (t0) and takes the timestamp in the next \
  datagram from that service (t1). Latency = t1 − t0: the supervisor noticing the death, deciding, fork and exec, \
  and testy's start-up up to the datagram (the same for both).
- {k} services per supervisor; {n} crashes, one at a time, rotating over the services, each 50 ms after the previous \
  restart (so that the supervisor is idle when the crash comes) and never within 11 s of the same service's \
  previous restart.
- supervisord takes 1–2 s per restart, so its {n} crashes would take about 5 minutes one at a time. They run in \
  {w} supervisord instances instead, the programs spread over them, one crash at a time in each instance (each \
  instance sees exactly the sequence a single one would; the instances share nothing but the CPUs, and a few \
  simultaneous fork/execs cost microseconds against a restart of a second). Phoenix's crashes run one at a time \
  on its one minion.
- Why the 11 s: Phoenix's minion restarts after the first crash at once, but backs off on consecutive crashes \
  (100 ms, 200 ms, … up to 30 s) unless the previous run lasted 10 s. Crashing each service at most once per 11 s \
  measures the immediate path, the case restart latency is about (a service that was running fine dies). \
  supervisord does not back off once a program is past `startsecs`, so the schedule favours neither side. \
  supervisord's programs are all RUNNING before the first crash (a crash in STARTING would count as a failed start).
- The backoff path is its own row: {r} fresh services are crashed once and then again 1.5 s after their restart. \
  Phoenix waits 100 ms here by design; supervisord does not back off.

#### 2. Deploy → running (image cached)

- Phoenix: one unmeasured warm-up deploy, then {d} deploys of fresh service names to m1, each `phoenix deploy FILE` \
  with a one-service spec file written before the clock starts. `phoenix deploy` returns once the master has the \
  service as running, which for a service without a health check means the minion has spawned it. The testy image \
  is in m1's image cache already (the restart test fetched it).
- supervisord, the closest peer: write `conf.d/dN.conf` (`autostart=false`) before the clock starts, then \
  `supervisorctl update dN` (reread, add the program) and `supervisorctl start dN` (returns once spawned; with \
  `startsecs=0` it is RUNNING at once).
- \"CLI returns\": wall time from spawning the first command until the last one exits. \"First datagram\": from \
  the same start to the timestamp in the new service's `started` datagram, i.e. the process really runs. Both \
  include the CLIs' own start-up; for supervisorctl that is a Python interpreter, shown by the \"CLI round trip\" \
  row (`phoenix status dN --json` vs `supervisorctl status dN`, 10 each).

#### 3. Memory, and bring-up of {m} processes

- The process is `/bin/sleep infinity`. Phoenix: pushed as image `sleep`, {m} services in one spec array, one \
  `phoenix deploy` to minion m2. supervisord: {m} `[program:zN]` sections in one include file, one \
  `supervisorctl update` (autostart).
- RSS is VmRSS from `/proc/PID/status` of the minion process (`phoenix minion … --foreground`) and of the \
  supervisord process (python3). Idle: joined and connected (Phoenix) or started (supervisord) with nothing to \
  supervise, after 1 s. With {m} processes: 2 s after all are up; VmHWM is the peak. The master is not counted \
  (in a real cluster it runs on another machine); its RSS is listed for completeness.
- Bring-up: from starting the command until both the command returned and {m} live children of the supervisor \
  showed in /proc (polled every 50 ms).

#### Statistics

Percentiles are nearest-rank (p50 is the median); with a few hundred samples p99 is close to the maximum. The \
ratio column is supervisord ÷ Phoenix: above 1 means Phoenix is faster or smaller.
",
        k = c.services,
        n = c.crashes,
        w = c.sup_lanes,
        r = c.repeats,
        d = c.deploys,
        m = c.procs,
    );
    t.push_str("\n### Reading the results\n\n");
    if s.restart.first.p50 > 500.0 {
        let slow = s.restart.samples.iter().filter(|&&x| x >= 1500.0).count();
        let _ = writeln!(
            t,
            "- supervisord restarts land one or two seconds after the crash ({slow} of {} samples took 1.5 s or more). \
This is its design, not the benchmark: its main loop (`runforever` in supervisord.py) polls its children's pipes \
with a 1 s timeout and starts autorestarts in `transition()`, once per loop iteration, before it reaps children. \
A crash wakes the loop (the child's pipes close) and the child is reaped in that iteration, so the restart waits \
for the next wake-up: the 1 s timeout on a quiet supervisord. When the pipes close before the kernel has made the \
child a zombie, that reap finds nothing and the exit is only noticed a second later: 2 s in all. With other \
programs writing output the loop wakes sooner, so a busy supervisord restarts faster than this.",
            s.restart.samples.len()
        );
    }
    if p.restart.repeat.n > 0 {
        let _ = writeln!(
            t,
            "- Phoenix's second crash within 10 s is restarted after {} (p50): the 100 ms backoff step, on purpose, \
so that a crash-looping service cannot take the machine. supervisord ({}) does not back off here.",
            fmt_ms(p.restart.repeat.p50),
            fmt_ms(s.restart.repeat.p50)
        );
    }
    if s.cli_rtt.n > 0 && p.cli_rtt.n > 0 {
        let _ = writeln!(
            t,
            "- supervisord's deploy latency is mostly its CLI starting: a `supervisorctl status` call takes {} (p50) and \
`supervisorctl --help`, which does not contact supervisord at all, {}; a deploy takes two calls. Phoenix's CLI: \
{} for `status`, {} for `--help`.",
            fmt_ms(s.cli_rtt.p50),
            fmt_ms(s.cli_startup.p50),
            fmt_ms(p.cli_rtt.p50),
            fmt_ms(p.cli_startup.p50)
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_between_the_markers() {
        let doc = format!("# B\n\nintro\n\n{BEGIN}\nold\nfigures\n{END}\n\n## Overlay\n\nkept\n");
        let out = splice(&doc, "new\n\n").unwrap();
        assert_eq!(
            out,
            format!("# B\n\nintro\n\n{BEGIN}\nnew\n{END}\n\n## Overlay\n\nkept\n")
        );
        // Idempotent.
        assert_eq!(splice(&out, "new").unwrap(), out);
    }

    #[test]
    fn splice_needs_both_markers_in_order() {
        assert!(splice("no markers", "x").is_none());
        assert!(splice(&format!("{END}\n{BEGIN}\n"), "x").is_none());
        assert!(splice(&format!("{BEGIN} only"), "x").is_none());
        assert!(new_document("x").contains(&format!("{BEGIN}\nx\n{END}")));
    }
}
