//! `phoenix demo`: a master and two minions on loopback, with testy deployed
//! in a few unreliable ways, shown live until Ctrl-C; then all of it removed.

use std::io::{IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use phoenix_model::proto::{MasterInfo, Request, ServiceView, WaitingNode};
use serde_json::{Value, json};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::client;

/// Daemons started by the demo; stopped when dropped. Each runs in a
/// process group of its own, so a Ctrl-C in the terminal reaches only the
/// demo, which then deletes its services before it stops the daemons.
struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// Where the demo prints. A write that fails (the reader of a pipe went
/// away) is an error like any other, so the demo stops and cleans up
/// instead of dying on SIGPIPE or a panic.
struct Screen {
    /// Redraw the status in place (a terminal) or print it as lines.
    redraw: bool,
}

impl Screen {
    fn say(&self, text: &str) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        if !text.ends_with('\n') {
            out.write_all(b"\n")?;
        }
        out.flush()
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(exe: &Path, args: &[String], log: &Path) -> Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Out of the terminal's process group: Ctrl-C is the demo's to handle.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))
}

async fn until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The signals that end the demo. Once these handlers exist, a second
/// Ctrl-C no longer kills the process, so the clean-up always finishes.
struct StopSignals([Signal; 3]);

impl StopSignals {
    fn new() -> Result<Self> {
        let sig = |k| signal(k).context("cannot handle signals");
        Ok(StopSignals([
            sig(SignalKind::interrupt())?,
            sig(SignalKind::terminate())?,
            sig(SignalKind::hangup())?,
        ]))
    }

    async fn recv(&mut self) -> &'static str {
        let [int, term, hup] = &mut self.0;
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
        }
    }
}

/// How to run the CLI against the demo's master from another terminal:
/// `phoenix` if that is this binary on PATH, its full path otherwise.
fn cli_hint(exe: &Path, master_dir: &Path) -> String {
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|d| std::fs::canonicalize(d.join("phoenix")).is_ok_and(|p| p == exe))
    });
    let cli = if on_path {
        "phoenix".to_owned()
    } else {
        exe.display().to_string()
    };
    format!("PHOENIX_DATA_DIR={} {cli} services", master_dir.display())
}

pub fn run(dir: &Path, testy: Option<PathBuf>, seconds: Option<u64>) -> Result<()> {
    let exe = std::fs::canonicalize(std::env::current_exe()?)?;
    let testy = testy.unwrap_or_else(|| exe.with_file_name("testy"));
    if !testy.exists() {
        bail!(
            "testy not found at {}; build it with `cargo build` (or pass --testy PATH)",
            testy.display()
        );
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let screen = Screen {
        redraw: std::io::stdout().is_terminal(),
    };
    let mut daemons = Daemons(Vec::new());
    let result = rt.block_on(async {
        let mut signals = StopSignals::new()?;
        tokio::select! {
            r = demo(&exe, &testy, dir, seconds, &mut daemons, &screen) => match r {
                Err(e) if is_closed_output(&e) => Ok("the output was closed"),
                r => r,
            },
            why = signals.recv() => Ok(why),
        }
    });
    if let Ok(why) = &result {
        // The reader may be gone (a closed pipe): nothing to do about that.
        let _ = screen.say(&format!(
            "stopping the demo ({why}): deleting its services, then its daemons"
        ));
    }
    let master_dir = dir.join("master");
    // Delete every service and wait until the minions say they stopped
    // them (a service deployed a moment ago may still be starting), then
    // stop the daemons.
    rt.block_on(async {
        if let Ok(list) = client::call::<Vec<ServiceView>>(&master_dir, &Request::Services).await {
            let mut names = Vec::new();
            for s in list {
                let del = Request::Del {
                    name: s.name.clone(),
                };
                if client::call::<Value>(&master_dir, &del).await.is_ok() {
                    names.push(s.name);
                }
            }
            let gone = Request::WaitGone {
                names,
                timeout_ms: 15_000,
            };
            if let Err(e) = client::call::<Value>(&master_dir, &gone).await {
                let _ = screen.say(&format!("not every service stopped: {e:#}"));
            }
        }
    });
    drop(daemons);
    let _ = std::fs::remove_dir_all(dir);
    result.map(|_| ())
}

/// Whether an error is a write to a closed pipe.
fn is_closed_output(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

async fn demo(
    exe: &Path,
    testy: &Path,
    dir: &Path,
    seconds: Option<u64>,
    daemons: &mut Daemons,
    screen: &Screen,
) -> Result<&'static str> {
    let (join, link) = (free_port()?, free_port()?);
    // The overlay needs root (TUN devices). Without it, run the links in
    // clear text on loopback and say so.
    // SAFETY: geteuid has no preconditions.
    let overlay = unsafe { libc::geteuid() } == 0;
    let master_wg = free_udp_port()?;
    let overlay_flags = |role: &str, port: u16| -> Vec<String> {
        if overlay {
            vec![
                "--tun-name".into(),
                format!("phxdemo-{role}"),
                "--wg-port".into(),
                port.to_string(),
            ]
        } else {
            // Without root, no namespace per service either.
            vec![
                "--no-overlay".into(),
                "--service-network".into(),
                "host".into(),
            ]
        }
    };
    if !overlay {
        screen.say(
            "not root: running WITHOUT the WireGuard overlay (links in clear text on loopback)",
        )?;
    }
    let master_dir = dir.join("master");
    let s = |v: &str| v.to_owned();
    screen.say(&format!(
        "starting a master on 127.0.0.1 (join port {join}, link port {link}) in {}",
        master_dir.display()
    ))?;
    let mut args = vec![
        s("master"),
        s("127.0.0.1"),
        s("--foreground"),
        s("--data-dir"),
        master_dir.display().to_string(),
        s("--join-port"),
        join.to_string(),
        s("--link-port"),
        link.to_string(),
        // The proxy on free ports: 80 and 443 may be taken, or need root.
        s("--http-port"),
        free_port()?.to_string(),
        s("--https-port"),
        free_port()?.to_string(),
    ];
    args.extend(overlay_flags("m", master_wg));
    daemons.0.push(spawn(exe, &args, &dir.join("master.log"))?);
    let info: MasterInfo = until("the master to start", Duration::from_secs(10), async || {
        client::call(&master_dir, &Request::MasterInfo).await.ok()
    })
    .await?;
    screen.say(&format!("master key {}", info.key))?;
    for m in ["m1", "m2"] {
        screen.say(&format!("starting minion {m}"))?;
        let mut args = vec![
            s("minion"),
            s(m),
            s("127.0.0.1"),
            info.key.clone(),
            s("127.0.0.1"),
            s("127.0.0.1"),
            s("--foreground"),
            s("--data-dir"),
            dir.join(m).display().to_string(),
            s("--master-join-port"),
            join.to_string(),
            s("--master-link-port"),
            link.to_string(),
            s("--health-grace-ms"),
            s("1500"),
            s("--health-interval-ms"),
            s("1000"),
            s("--stop-timeout-ms"),
            s("2000"),
            s("--master-wg-port"),
            master_wg.to_string(),
        ];
        args.extend(overlay_flags(m, free_udp_port()?));
        daemons
            .0
            .push(spawn(exe, &args, &dir.join(format!("{m}.log")))?);
    }
    until("both join requests", Duration::from_secs(10), async || {
        let w: Vec<WaitingNode> = client::call(&master_dir, &Request::Waiting).await.ok()?;
        (w.len() == 2).then_some(())
    })
    .await?;
    for m in ["m1", "m2"] {
        let _: Value = client::call(
            &master_dir,
            &Request::Accept {
                name: m.into(),
                fingerprint: None,
            },
        )
        .await?;
        screen.say(&format!("accepted {m}"))?;
    }
    let pushed = client::push(&master_dir, testy, "testy").await?;
    screen.say(&format!("pushed testy ({} bytes)", pushed.size))?;
    let specs = json!([
        {"machine": "m1", "name": "web", "image": "testy", "type": "binary",
         "proxyport": free_port()?, "healthcheck": "/health"},
        {"machine": "m2", "name": "flaky", "image": "testy", "type": "binary",
         "proxyport": free_port()?, "args": ["--crash-prob", "0.15"]},
        {"machine": "m1", "name": "sickly", "image": "testy", "type": "binary",
         "proxyport": free_port()?, "healthcheck": "/health", "args": ["--unhealthy-after", "6"]},
        {"machine": "m2", "name": "once", "image": "testy", "type": "binary", "duration": "oneshot",
         "proxyport": free_port()?, "args": ["--crash-after", "1", "--exit-code", "0"]}
    ]);
    let _: Value = client::call(
        &master_dir,
        &Request::Deploy {
            source: "demo.json".into(),
            text: specs.to_string(),
            env_files: Vec::new(),
        },
    )
    .await?;
    screen.say("deployed")?;
    let hint = cli_hint(exe, &master_dir);
    let mut header = format!(
        "Phoenix demo: a master and minions m1, m2 in {}\n\
         web (health-checked), flaky (crashes at random), sickly (turns unhealthy), once (a oneshot)\n\
         try in another terminal: {hint}\n\
         Ctrl-C stops the demo and removes everything.\n",
        dir.display()
    );
    if !screen.redraw {
        screen.say(&header)?;
        header.clear();
    }
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    let mut images_shown = false;
    loop {
        ticker.tick().await;
        let list: Vec<ServiceView> = client::call(&master_dir, &Request::Services).await?;
        let mut frame = String::new();
        if screen.redraw {
            // Home and clear: the status stays in place instead of scrolling.
            frame.push_str("\x1b[H\x1b[2J");
            frame.push_str(&header);
            frame.push('\n');
        }
        frame.push_str(&crate::output::utc(phoenix_model::status::now_ms()));
        frame.push('\n');
        frame.push_str(&crate::output::services_text(&list));
        // The registry image, on both minions once they have synced it: on a
        // terminal it stays on screen; as lines, it is printed once.
        if (screen.redraw || !images_shown) && list.iter().all(|s| s.state != "starting") {
            let images: Vec<phoenix_model::proto::ImageView> =
                client::call(&master_dir, &Request::Images).await?;
            frame.push('\n');
            frame.push_str(&crate::output::images_text(&images));
            images_shown = true;
        }
        screen.say(&frame)?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok("time is up");
        }
    }
}
