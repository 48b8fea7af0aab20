//! `phoenix demo`: a master and two minions on loopback, with testy deployed
//! in a few unreliable ways, shown live until Ctrl-C; then all of it removed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use phoenix_model::proto::{MasterInfo, Request, ServiceView, WaitingNode};
use serde_json::{Value, json};

use crate::client;

/// Daemons started by the demo; stopped when dropped.
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

pub fn run(dir: &Path, testy: Option<PathBuf>, seconds: Option<u64>) -> Result<()> {
    let exe = std::env::current_exe()?;
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
    let mut daemons = Daemons(Vec::new());
    let result = rt.block_on(demo(&exe, &testy, dir, seconds, &mut daemons));
    let master_dir = dir.join("master");
    // Delete every service so that the minions stop them, then stop the daemons.
    rt.block_on(async {
        if let Ok(list) = client::call::<Vec<ServiceView>>(&master_dir, &Request::Services).await {
            for s in list {
                let _ = client::call::<Value>(&master_dir, &Request::Del { name: s.name }).await;
            }
            let _ = until("services to stop", Duration::from_secs(15), async || {
                let nodes: Vec<phoenix_model::proto::NodeView> =
                    client::call(&master_dir, &Request::Nodes).await.ok()?;
                let _ = nodes;
                let left = ["m1", "m2"].iter().any(|m| {
                    std::fs::read_dir(dir.join(m).join("run")).is_ok_and(|mut d| d.next().is_some())
                });
                (!left).then_some(())
            })
            .await;
        }
    });
    drop(daemons);
    let _ = std::fs::remove_dir_all(dir);
    result
}

async fn demo(
    exe: &Path,
    testy: &Path,
    dir: &Path,
    seconds: Option<u64>,
    daemons: &mut Daemons,
) -> Result<()> {
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
            vec!["--no-overlay".into()]
        }
    };
    if !overlay {
        println!(
            "not root: running WITHOUT the WireGuard overlay (links in clear text on loopback)"
        );
    }
    let master_dir = dir.join("master");
    let s = |v: &str| v.to_owned();
    println!(
        "starting a master on 127.0.0.1 (join port {join}, link port {link}) in {}",
        master_dir.display()
    );
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
    ];
    args.extend(overlay_flags("m", master_wg));
    daemons.0.push(spawn(exe, &args, &dir.join("master.log"))?);
    let info: MasterInfo = until("the master to start", Duration::from_secs(10), async || {
        client::call(&master_dir, &Request::MasterInfo).await.ok()
    })
    .await?;
    println!("master key {}", info.key);
    for m in ["m1", "m2"] {
        println!("starting minion {m}");
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
        let _: Value = client::call(&master_dir, &Request::Accept { name: m.into() }).await?;
        println!("accepted {m}");
    }
    let pushed = client::push(&master_dir, testy, "testy").await?;
    println!("pushed testy ({} bytes)", pushed.size);
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
        },
    )
    .await?;
    println!(
        "deployed: web (health-checked), flaky (crashes at random), sickly (turns unhealthy), once (a oneshot)"
    );
    println!(
        "try in another terminal: PHOENIX_DATA_DIR={} phoenix services",
        master_dir.display()
    );
    println!("Ctrl-C stops the demo and removes everything.\n");
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    let mut first = true;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let list: Vec<ServiceView> = client::call(&master_dir, &Request::Services).await?;
        println!("{}", crate::output::utc(phoenix_model::status::now_ms()));
        crate::output::services_table(&list);
        println!();
        if first && list.iter().all(|s| s.state != "starting") {
            // The registry image, by now on both minions.
            let images: Vec<phoenix_model::proto::ImageView> =
                client::call(&master_dir, &Request::Images).await?;
            crate::output::images_table(&images);
            println!();
            first = false;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    println!("stopping the demo");
    Ok(())
}
