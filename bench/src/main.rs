//! `phoenix-bench`: Phoenix side by side with supervisord on one machine.
//!
//! Three measurements, each done the same way for both supervisors:
//! restart latency after a SIGKILL, deploy → running for a new service, and
//! the supervisor's memory idle and with many supervised processes. Prints a
//! markdown table and (for a full run) rewrites the supervision section of
//! `BENCHMARKS.md` (between its `<!-- supervision:begin -->` and
//! `<!-- supervision:end -->` markers; the other benchmarks' sections are left
//! alone). Run `phoenix-bench --help` for the knobs; see `BENCHMARKS.md` for
//! the method.

mod measure;
mod phoenix;
mod report;
mod supd;
mod util;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use serde_json::{Value, json};

use measure::{RestartPlan, RestartResult, Target, first_starts, restart_test};
use util::{
    Announce, Out, Summary, children_of, free_ports, ms, now_ns, rss_kib, summarize, until, write,
};

#[derive(Parser, Debug)]
#[command(
    name = "phoenix-bench",
    about = "Benchmarks Phoenix against supervisord: restart latency, deploy latency, supervisor memory",
    long_about = "Benchmarks Phoenix against supervisord on this machine: restart latency after SIGKILL, \
        deploy -> running, and the supervisor's RSS idle and with many processes. Everything runs in a \
        temp dir on loopback and is removed at the end.\n\n\
        Run from the workspace root after `cargo build --release --workspace`."
)]
struct Args {
    /// A short run: 30 crashes, 10 deploys, 250 processes; does not touch BENCHMARKS.md.
    #[arg(long)]
    quick: bool,
    /// Crashes to measure per supervisor [default: 200, --quick 30].
    #[arg(long)]
    crashes: Option<usize>,
    /// Services the crashes rotate over [default: 100, --quick 30].
    #[arg(long)]
    services: Option<usize>,
    /// Deploys to measure per supervisor [default: 30, --quick 10].
    #[arg(long)]
    deploys: Option<usize>,
    /// supervisord instances the crashes run in, one crash at a time in each
    /// (its restarts take 1-2 s) [default: 4, --quick 2].
    #[arg(long)]
    supervisord_lanes: Option<usize>,
    /// Processes for the memory measurement [default: 1000, --quick 250].
    #[arg(long)]
    procs: Option<usize>,
    /// The phoenix binary [default: beside this one].
    #[arg(long)]
    phoenix: Option<PathBuf>,
    /// The testy binary [default: beside this one].
    #[arg(long)]
    testy: Option<PathBuf>,
    /// Put the report into this file, between its supervision markers [default:
    /// BENCHMARKS.md at the workspace root; none with --quick].
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Do not write the markdown report.
    #[arg(long, conflicts_with = "markdown")]
    no_markdown: bool,
    /// Keep the temp dir (logs, configs) instead of removing it at the end.
    #[arg(long)]
    keep: bool,
    /// Give up and clean up after this many seconds [default: 600, --quick 420].
    #[arg(long)]
    max_seconds: Option<u64>,
}

/// What to run, resolved from the arguments.
pub struct Config {
    pub quick: bool,
    pub crashes: usize,
    pub services: usize,
    pub repeats: usize,
    pub sup_lanes: usize,
    pub deploys: usize,
    /// SIGKILLs of a health-checked service (crash → healthy).
    pub heal_kills: usize,
    pub procs: usize,
    pub phoenix: PathBuf,
    pub testy: PathBuf,
    pub sleep: PathBuf,
    pub plan: RestartPlan,
}

/// Everything measured for one supervisor.
#[derive(Default, Clone, Debug)]
pub struct Side {
    pub restart: RestartResult,
    /// Deploy command start → command returned (service running).
    pub deploy_cli: Summary,
    /// Deploy command start → the service's `started` datagram.
    pub deploy_first: Summary,
    /// A `status` query of one service through the CLI.
    pub cli_rtt: Summary,
    /// Phoenix only: SIGKILL of a health-checked service → its status says
    /// running and healthy again (with a new pid), seen through the CLI.
    pub crash_healthy: Summary,
    /// The CLI's `--help`, which does not contact the server: its start-up.
    pub cli_startup: Summary,
    /// RSS in KiB of the supervisor with nothing to supervise.
    pub rss_idle: u64,
    /// RSS and peak RSS in KiB with `procs` processes.
    pub rss_full: u64,
    pub hwm_full: u64,
    /// Bring-up of `procs` processes: until the CLI returned, and until that
    /// many children were alive.
    pub bringup_cli_ms: f64,
    pub bringup_procs_ms: f64,
    /// Services the supervisor reported as running after the bring-up.
    pub running_after: usize,
    /// Phoenix only: the master's RSS in KiB.
    pub master_rss_idle: Option<u64>,
    pub master_rss_full: Option<u64>,
    /// Observations for the report (sanity checks, teardown).
    pub notes: Vec<String>,
}

impl Side {
    pub fn bringup_ms(&self) -> f64 {
        self.bringup_cli_ms.max(self.bringup_procs_ms)
    }
}

fn main() {
    std::sync::LazyLock::force(&util::START);
    install_signal_handlers();
    let args = Args::parse();
    match real_main(args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("phoenix-bench: error: {e:#}");
            util::emergency_cleanup();
            std::process::exit(1);
        }
    }
}

static GOT_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    GOT_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Ctrl-C, SIGTERM and SIGHUP tear everything down. A handler rather than a
/// blocked mask and sigwait: children inherit a signal mask (the daemons
/// would ignore our SIGTERM), while handlers are reset on exec.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; signal(2) reads no memory of ours.
        unsafe {
            libc::signal(sig, handler);
        }
    }
    thread::spawn(|| {
        loop {
            thread::sleep(Duration::from_millis(100));
            let sig = GOT_SIGNAL.load(Ordering::SeqCst);
            if sig != 0 {
                eprintln!("\nphoenix-bench: got signal {sig}; cleaning up");
                util::emergency_cleanup();
                std::process::exit(130);
            }
        }
    });
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

fn real_main(args: Args) -> Result<()> {
    let started = Instant::now();
    let quick = args.quick;
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("no directory for this binary")?
        .to_owned();
    let pick = |given: Option<PathBuf>, name: &str| -> Result<PathBuf> {
        let p = given.unwrap_or_else(|| exe_dir.join(name));
        if !p.is_file() {
            bail!(
                "{} not found; build it with `cargo build --release --workspace` (or pass --{name} PATH)",
                p.display()
            );
        }
        Ok(std::fs::canonicalize(&p)?)
    };
    let services = args.services.unwrap_or(if quick { 30 } else { 100 }).max(1);
    let cfg = Config {
        quick,
        crashes: args.crashes.unwrap_or(if quick { 30 } else { 200 }),
        services,
        repeats: if quick { 4 } else { 10 },
        sup_lanes: args
            .supervisord_lanes
            .unwrap_or(if quick { 2 } else { 4 })
            .clamp(1, services),
        deploys: args.deploys.unwrap_or(if quick { 10 } else { 30 }).max(1),
        heal_kills: if quick { 3 } else { 6 },
        procs: args.procs.unwrap_or(if quick { 250 } else { 1000 }).max(1),
        phoenix: pick(args.phoenix, "phoenix")?,
        testy: pick(args.testy, "testy")?,
        sleep: std::fs::canonicalize("/bin/sleep").context("/bin/sleep")?,
        plan: RestartPlan {
            crashes: 0,
            gap: Duration::from_secs(11),
            spacing: Duration::from_millis(50),
            budget: Duration::from_secs(if quick { 90 } else { 240 }),
        },
    };
    let cfg = Config {
        plan: RestartPlan {
            crashes: cfg.crashes,
            ..cfg.plan
        },
        ..cfg
    };
    for tool in ["supervisord", "supervisorctl"] {
        util::run_ok(
            std::process::Command::new(tool).arg("--help"),
            Duration::from_secs(20),
        )
        .with_context(|| format!("{tool} is needed (Debian package `supervisor`)"))?;
    }
    let markdown = match (args.markdown, args.no_markdown, quick) {
        (Some(p), _, _) => Some(p),
        (None, true, _) | (None, false, true) => None,
        (None, false, false) => Some(workspace_root().join("BENCHMARKS.md")),
    };

    let max_seconds = args.max_seconds.unwrap_or(if quick { 420 } else { 600 });
    thread::spawn(move || {
        thread::sleep(Duration::from_secs(max_seconds));
        eprintln!(
            "\nphoenix-bench: still running after {max_seconds} s (--max-seconds); giving up"
        );
        util::emergency_cleanup();
        std::process::exit(3);
    });

    let root = std::env::temp_dir().join(format!("phoenix-bench-{}", std::process::id()));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    util::register_root(&root);
    say!("phoenix-bench: working in {}", root.display());

    let phx = phoenix_side(&cfg, &root)?;
    let sup = supervisord_side(&cfg, &root)?;

    if args.keep {
        say!("phoenix-bench: kept {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    let ctx = report::Context::gather(&cfg, &cfg.phoenix, started.elapsed());
    let table = report::table(&ctx, &phx, &sup);
    println!("{table}");
    if let Some(path) = markdown {
        write_section(&path, &report::markdown(&ctx, &phx, &sup))?;
    }
    say!(
        "phoenix-bench: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Puts the supervision section into the markdown file at `path`, between
/// its markers, leaving the rest of the file (the other benchmarks) alone.
/// A file without the markers gets the section appended, markers and all,
/// rather than losing the run's results.
fn write_section(path: &Path, section: &str) -> Result<()> {
    let doc = match std::fs::read_to_string(path) {
        Ok(doc) => doc,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write(path, &report::new_document(section))?;
            say!("phoenix-bench: wrote {}", path.display());
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let text = match report::splice(&doc, section) {
        Some(text) => {
            say!(
                "phoenix-bench: rewrote the supervision section of {}",
                path.display()
            );
            text
        }
        None => {
            say!(
                "phoenix-bench: {} has no `{}` ... `{}` markers; appending the section at its end",
                path.display(),
                report::BEGIN,
                report::END
            );
            format!(
                "{}\n\n## Supervision (vs supervisord)\n\n{}\n{}\n{}\n",
                doc.trim_end(),
                report::BEGIN,
                section.trim_end(),
                report::END
            )
        }
    };
    // A temp file renamed into place: an interrupted write leaves the old file.
    // It keeps the file's permissions.
    let tmp = path.with_extension("md.tmp");
    write(&tmp, &text)?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

fn testy_spec(machine: &str, name: &str, port: u16, announce: &str) -> Value {
    json!({
        "machine": machine, "name": name, "image": "testy", "type": "binary",
        "proxyport": port, "args": ["--announce", announce],
    })
}

fn targets(prefix: &str, ports: &[u16]) -> Result<Vec<Target>> {
    ports
        .iter()
        .enumerate()
        .map(|(i, &p)| Target::new(format!("{prefix}{i}"), p))
        .collect()
}

/// Runs `deploy` (which starts `n` processes under `parent`) and polls the
/// children of `parent`: how long until `deploy` returned, and until `n`
/// children were alive.
fn bring_up(
    n: usize,
    parent: u32,
    deploy: impl FnOnce() -> Result<Out> + Send,
) -> Result<(Out, f64)> {
    let timeout = Duration::from_secs(300);
    let start = Instant::now();
    thread::scope(|s| {
        let h = s.spawn(deploy);
        let mut procs_at = None;
        while start.elapsed() < timeout {
            if children_of(parent) >= n {
                procs_at = Some(start.elapsed());
                break;
            }
            if h.is_finished() && start.elapsed() > Duration::from_secs(30) {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let out = h
            .join()
            .map_err(|_| anyhow!("the deploy thread panicked"))??;
        let procs_at = procs_at
            .with_context(|| format!("{} of {n} processes came up", children_of(parent)))?;
        Ok((out, ms(procs_at)))
    })
}

// ------------------------------------------------------------ Phoenix

fn phoenix_side(cfg: &Config, root: &Path) -> Result<Side> {
    say!("phoenix: starting a master and minions m1 (latency) and m2 (memory)");
    let mut cl = phoenix::Cluster::start(&cfg.phoenix, &root.join("phoenix"), &["m1", "m2"])?;
    let mut side = Side::default();
    let result = phoenix_measure(cfg, &mut cl, &mut side);
    say!("phoenix: deleting every service and stopping the daemons");
    let td = cl.teardown();
    result?;
    if let Some(d) = td.all_gone_after {
        side.notes.push(format!(
            "Teardown: `phoenix del` of all {} services, one at a time, until no service process was left: {:.1} s.",
            td.deleted,
            d.as_secs_f64()
        ));
    }
    if td.leftovers > 0 {
        side.notes.push(format!(
            "Teardown: {} processes were still running after the services were deleted and the daemons stopped.",
            td.leftovers
        ));
    }
    for e in td.errors {
        side.notes.push(format!("Teardown problem: {e}"));
    }
    let (n, examples) = td.log_problems;
    if n > 0 {
        side.notes.push(format!(
            "The master and minion logs hold {n} WARN/ERROR lines, e.g.: {}",
            examples
                .iter()
                .map(|e| format!("`{e}`"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    Ok(side)
}

fn phoenix_measure(cfg: &Config, cl: &mut phoenix::Cluster, side: &mut Side) -> Result<()> {
    let specs = cl.dir.join("specs");
    let testy = cfg.testy.display().to_string();
    let sleep = cfg.sleep.display().to_string();
    cl.cli(&["push", &testy, "testy"], Duration::from_secs(60))?;
    cl.cli(&["push", &sleep, "sleep"], Duration::from_secs(60))?;

    // Idle memory: joined and connected, nothing deployed.
    thread::sleep(Duration::from_secs(1));
    side.rss_idle = rss_kib(cl.minion_pid("m2")?)?.0;
    side.master_rss_idle = Some(rss_kib(cl.master_pid())?.0);

    // Restart latency.
    say!(
        "phoenix: restart latency ({} crashes over {} services, +{} repeat crashes)",
        cfg.crashes,
        cfg.services,
        cfg.repeats
    );
    let ports = free_ports(21000, cfg.services + cfg.repeats)?;
    let mut lanes = [measure::Lane {
        targets: targets("r", &ports[..cfg.services])?,
        repeat_targets: targets("q", &ports[cfg.services..])?,
    }];
    let lane = &mut lanes[0];
    let list: Vec<Value> = lane
        .targets
        .iter()
        .chain(&lane.repeat_targets)
        .map(|t| testy_spec("m1", &t.name, t.port, &t.announce.addr()))
        .collect();
    let file = specs.join("restart.json");
    write(&file, &Value::Array(list).to_string())?;
    cl.deploy(&file, Duration::from_secs(120))?;
    first_starts(&mut lane.targets, Duration::from_secs(30))?;
    first_starts(&mut lane.repeat_targets, Duration::from_secs(30))?;
    side.restart = restart_test("phoenix", &mut lanes, &cfg.plan)?;
    cl.check_alive()?;
    let crashes = (side.restart.first.n + 2 * side.restart.repeat.n) as u64;
    let counted: u64 = cl
        .services()?
        .iter()
        .filter(|s| {
            s["name"]
                .as_str()
                .is_some_and(|n| n.starts_with('r') || n.starts_with('q'))
        })
        .filter_map(|s| s["restarts"].as_u64())
        .sum();
    if counted != crashes {
        side.notes.push(format!(
            "Sanity check failed: {crashes} crashes, but `phoenix services` counts {counted} restarts."
        ));
    }

    side.crash_healthy = crash_to_healthy(cl, &specs, cfg.heal_kills)?;

    // Deploy → running.
    say!("phoenix: deploy -> running ({} deploys)", cfg.deploys);
    let shared: &phoenix::Cluster = cl;
    let (cli, first) = deploys(cfg.deploys, 23000, |name, port, ann| {
        let f = specs.join(format!("{name}.json"));
        write(&f, &json!([testy_spec("m1", name, port, ann)]).to_string())?;
        Ok(Box::new(move || shared.deploy(&f, Duration::from_secs(60))))
    })?;
    side.deploy_cli = summarize(&cli);
    side.deploy_first = summarize(&first);
    let mut rtt = Vec::new();
    for _ in 0..10 {
        rtt.push(
            cl.cli(&["status", "d1", "--json"], Duration::from_secs(10))?
                .ms(),
        );
    }
    side.cli_rtt = summarize(&rtt);
    let mut startup = Vec::new();
    for _ in 0..10 {
        startup.push(cl.cli(&["--help"], Duration::from_secs(10))?.ms());
    }
    side.cli_startup = summarize(&startup);

    // Memory with many processes, on m2 (which ran nothing so far).
    say!("phoenix: {} processes on minion m2", cfg.procs);
    let list: Vec<Value> = (0..cfg.procs)
        .map(|i| {
            json!({
                "machine": "m2", "name": format!("z{i}"), "image": "sleep", "type": "binary",
                "proxyport": 30000 + i % 30000, "args": ["infinity"],
            })
        })
        .collect();
    let file = specs.join("procs.json");
    write(&file, &Value::Array(list).to_string())?;
    let m2 = cl.minion_pid("m2")?;
    let (out, procs_ms) = bring_up(cfg.procs, m2, || cl.deploy(&file, Duration::from_secs(240)))?;
    side.bringup_cli_ms = out.ms();
    side.bringup_procs_ms = procs_ms;
    thread::sleep(Duration::from_secs(2));
    cl.check_alive()?;
    (side.rss_full, side.hwm_full) = rss_kib(m2)?;
    side.master_rss_full = Some(rss_kib(cl.master_pid())?.0);
    side.running_after = cl
        .services()?
        .iter()
        .filter(|s| s["machine"] == "m2" && s["state"] == "running")
        .count();
    Ok(())
}

/// Kills a health-checked service `n` times: milliseconds from each SIGKILL
/// until `phoenix status` shows it running and healthy with a new pid. The
/// CLI is polled as fast as it answers (about 2 ms a round trip), so that is
/// the resolution.
fn crash_to_healthy(cl: &phoenix::Cluster, specs: &Path, n: usize) -> Result<Summary> {
    say!("phoenix: crash -> healthy ({n} kills of a health-checked service)");
    let port = free_ports(24000, 1)?[0];
    let spec = json!({
        "machine": "m1", "name": "heal", "image": "testy", "type": "binary",
        "proxyport": port, "healthcheck": "/health",
    });
    let file = specs.join("heal.json");
    write(&file, &json!([spec]).to_string())?;
    cl.deploy(&file, Duration::from_secs(60))?;
    let healthy_pid = |not: Option<u64>| -> Option<u64> {
        let s = cl.json(&["status", "heal", "--json"]).ok()?;
        let pid = s["pid"].as_u64()?;
        (s["state"] == "running" && s["health"] == "healthy" && Some(pid) != not).then_some(pid)
    };
    let mut pid = until(
        "the health-checked service to be healthy",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || healthy_pid(None),
    )?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        // Past the stable-run time, so every crash is a first crash
        // (restarted at once, no backoff): the case this measures.
        thread::sleep(Duration::from_millis(10_500));
        let t0 = Instant::now();
        // SAFETY: kill(2) with plain integers; the pid is the service's.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        pid = until(
            "the killed service to be healthy again",
            Duration::from_secs(30),
            Duration::ZERO,
            || healthy_pid(Some(pid)),
        )?;
        samples.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    cl.cli(&["del", "heal"], Duration::from_secs(30))?;
    Ok(summarize(&samples))
}

/// A deploy to time: builds its spec or config, returns the command to run.
type DeployFn<'a> = Box<dyn FnOnce() -> Result<Out> + 'a>;

/// Deploys `n` fresh testy services one after another (after one unmeasured
/// warm-up): milliseconds until the deploy returned, and until the service's
/// `started` datagram.
fn deploys<'a>(
    n: usize,
    port_base: u16,
    mut prepare: impl FnMut(&str, u16, &str) -> Result<DeployFn<'a>>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let ports = free_ports(port_base, n + 1)?;
    let ann = Announce::new()?;
    let (mut cli, mut first) = (Vec::new(), Vec::new());
    for (i, &port) in ports.iter().enumerate() {
        let name = if i == 0 {
            "dwarm".to_owned()
        } else {
            format!("d{i}")
        };
        let deploy = prepare(&name, port, &ann.addr())?;
        ann.drain();
        thread::sleep(Duration::from_millis(100));
        let t0 = now_ns();
        let start = Instant::now();
        deploy()?;
        let took = ms(start.elapsed());
        let s = ann
            .recv(Duration::from_secs(15))
            .with_context(|| format!("{name} did not start"))?;
        if i > 0 {
            cli.push(took);
            first.push((s.at_ns - t0) as f64 / 1e6);
        }
    }
    Ok((cli, first))
}

// ------------------------------------------------------------ supervisord

fn supervisord_side(cfg: &Config, root: &Path) -> Result<Side> {
    let mut side = Side::default();
    say!(
        "supervisord: starting {} instances for the latency tests",
        cfg.sup_lanes
    );
    let mut insts = Vec::new();
    let mut result = Ok(());
    for i in 0..cfg.sup_lanes {
        match supd::Supd::start(&root.join(format!("supervisord-a{i}"))) {
            Ok(s) => insts.push(s),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        result = supervisord_latency(cfg, &mut insts, &mut side);
    }
    say!("supervisord: shutting down the latency instances");
    let tds: Vec<supd::Teardown> = thread::scope(|s| {
        let hs: Vec<_> = insts
            .into_iter()
            .map(|i| s.spawn(move || i.teardown()))
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    result?;
    for (i, td) in tds.into_iter().enumerate() {
        supervisord_notes(&format!("A{i}"), td, &mut side);
    }

    say!("supervisord: starting instance B (memory)");
    let mut b = supd::Supd::start(&root.join("supervisord-b"))?;
    let result = supervisord_memory(cfg, &mut b, &mut side);
    say!("supervisord: shutting down instance B");
    let td = b.teardown();
    result?;
    supervisord_notes("B", td, &mut side);
    Ok(side)
}

fn supervisord_notes(which: &str, td: supd::Teardown, side: &mut Side) {
    if let Some(d) = td.shutdown_after {
        side.notes.push(format!(
            "Teardown of instance {which}: `supervisorctl shutdown` until supervisord exited: {:.1} s.",
            d.as_secs_f64()
        ));
    }
    for n in &td.notes {
        side.notes
            .push(format!("Teardown of instance {which}: {n}."));
    }
    if td.leftovers > 0 && td.notes.is_empty() {
        side.notes.push(format!(
            "Teardown of instance {which}: {} processes were left running.",
            td.leftovers
        ));
    }
    for e in td.errors {
        side.notes
            .push(format!("Teardown problem (instance {which}): {e}"));
    }
}

fn testy_program(
    cfg: &Config,
    name: &str,
    port: u16,
    announce: &str,
    autostart: bool,
) -> supd::Program {
    supd::Program {
        name: name.to_owned(),
        command: format!("{} --announce {announce}", cfg.testy.display()),
        port: Some(port),
        autostart,
    }
}

fn supervisord_latency(cfg: &Config, insts: &mut [supd::Supd], side: &mut Side) -> Result<()> {
    say!(
        "supervisord: restart latency ({} crashes over {} programs in {} instances, +{} repeat crashes; 1-2 s each)",
        cfg.crashes,
        cfg.services,
        insts.len(),
        cfg.repeats
    );
    let w = insts.len();
    let ports = free_ports(21000, cfg.services + cfg.repeats)?;
    let (all, again) = (
        targets("r", &ports[..cfg.services])?,
        targets("q", &ports[cfg.services..])?,
    );
    let mut lanes: Vec<measure::Lane> = (0..w)
        .map(|_| measure::Lane {
            targets: Vec::new(),
            repeat_targets: Vec::new(),
        })
        .collect();
    for (j, t) in all.into_iter().enumerate() {
        lanes[j % w].targets.push(t);
    }
    for (j, t) in again.into_iter().enumerate() {
        lanes[j % w].repeat_targets.push(t);
    }
    for (lane, s) in lanes.iter_mut().zip(insts.iter()) {
        let programs: Vec<supd::Program> = lane
            .targets
            .iter()
            .chain(&lane.repeat_targets)
            .map(|t| testy_program(cfg, &t.name, t.port, &t.announce.addr(), true))
            .collect();
        s.write_programs("restart", &programs)?;
        s.ctl_ok(&["update"], Duration::from_secs(120))?;
    }
    for (lane, s) in lanes.iter_mut().zip(insts.iter()) {
        first_starts(&mut lane.targets, Duration::from_secs(30))?;
        first_starts(&mut lane.repeat_targets, Duration::from_secs(30))?;
        // A crash while a program is still STARTING counts as a failed start
        // (BACKOFF); wait until all are RUNNING, as they would be in production.
        let total = lane.targets.len() + lane.repeat_targets.len();
        until(
            "every program to be RUNNING",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || (s.running().ok()? == total).then_some(()),
        )?;
    }
    side.restart = restart_test("supervisord", &mut lanes, &cfg.plan)?;
    for s in insts.iter_mut() {
        s.check_alive()?;
    }
    let s = &insts[0];

    say!("supervisord: deploy -> running ({} deploys)", cfg.deploys);
    let shared: &supd::Supd = s;
    let (cli, first) = deploys(cfg.deploys, 23000, |name, port, ann| {
        shared.write_programs(name, &[testy_program(cfg, name, port, ann, false)])?;
        let name = name.to_owned();
        let s = shared;
        Ok(Box::new(move || {
            let t = Duration::from_secs(60);
            let a = s.ctl_ok(&["update", &name], t)?;
            let b = s.ctl_ok(&["start", &name], t)?;
            Ok(Out {
                elapsed: a.elapsed + b.elapsed,
                ..b
            })
        }))
    })?;
    side.deploy_cli = summarize(&cli);
    side.deploy_first = summarize(&first);
    let mut rtt = Vec::new();
    for _ in 0..10 {
        rtt.push(s.ctl_ok(&["status", "d1"], Duration::from_secs(10))?.ms());
    }
    side.cli_rtt = summarize(&rtt);
    let mut startup = Vec::new();
    for _ in 0..10 {
        startup.push(s.ctl_ok(&["--help"], Duration::from_secs(10))?.ms());
    }
    side.cli_startup = summarize(&startup);
    Ok(())
}

fn supervisord_memory(cfg: &Config, s: &mut supd::Supd, side: &mut Side) -> Result<()> {
    thread::sleep(Duration::from_secs(1));
    side.rss_idle = rss_kib(s.pid())?.0;
    say!("supervisord: {} processes", cfg.procs);
    let programs: Vec<supd::Program> = (0..cfg.procs)
        .map(|i| supd::Program {
            name: format!("z{i}"),
            command: format!("{} infinity", cfg.sleep.display()),
            port: None,
            autostart: true,
        })
        .collect();
    s.write_programs("procs", &programs)?;
    let pid = s.pid();
    let (out, procs_ms) = bring_up(cfg.procs, pid, || {
        s.ctl_ok(&["update"], Duration::from_secs(280))
    })?;
    side.bringup_cli_ms = out.ms();
    side.bringup_procs_ms = procs_ms;
    thread::sleep(Duration::from_secs(2));
    s.check_alive()?;
    (side.rss_full, side.hwm_full) = rss_kib(pid)?;
    side.running_after = s.running()?;
    Ok(())
}
