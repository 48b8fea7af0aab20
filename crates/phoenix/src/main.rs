//! `phoenix`: the installer, the master daemon, the minion daemon and the CLI.
//!
//! This binary only parses arguments and wires the libraries together; the
//! master lives in `phoenix-master`, the minion in `phoenix-minion`.

mod cli;
mod client;
mod demo;
mod envcmd;
mod git;
mod guest;
mod import;
mod install;
mod output;
mod progress;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cli::{ApplyArgs, Cli, Command, TreeArgs, Waiting};
use output::{ago, bytes, table, utc};
use phoenix_model::proto::{
    Accepted, Applied, AuditEntry, Deleted, Forgotten, ImageView, MasterInfo, NodeView, Plan,
    Rejected, Request, ServiceView, Settled, Verdict, WaitingNode,
};

use phoenix_model::spec::Spec;

fn main() {
    let cli = cli::parse();
    let level = std::env::var("PHOENIX_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(i32::from(client::exit_code(&e) as u8));
    }
}

fn runtime(daemon_threads: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let rt = match daemon_threads {
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        // The minion and the CLI are one thread: small, and plenty.
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    rt.context("cannot start the async runtime")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::GuestInit => guest::run(),
        Command::Master(a) => {
            if !a.foreground {
                let args: Vec<String> = std::env::args().skip(1).collect();
                return install::install("master", &args);
            }
            let cfg = phoenix_master::MasterConfig {
                data_dir: a.data_dir,
                public_ip: a.public_ip,
                join_port: a.join_port,
                link_port: a.link_port,
                overlay: (!a.overlay.no_overlay).then_some(phoenix_master::OverlaySettings {
                    mode: a.overlay.wireguard,
                    wg_port: a.overlay.wg_port,
                    tun_name: a.overlay.tun_name,
                }),
                auto_accept: a.auto_accept,
                node_timeout: Duration::from_millis(a.node_timeout_ms),
                update_timeout: Duration::from_millis(a.update_timeout_ms),
                drain_timeout: Duration::from_millis(a.drain_timeout_ms),
                proxy: (!a.no_proxy).then_some(phoenix_master::front::ProxySettings {
                    http_port: a.http_port,
                    https_port: a.https_port,
                    acme_directory: a.acme_directory,
                    acme_ca: a.acme_ca,
                    acme_email: a.acme_email,
                    header_timeout: Duration::from_millis(a.proxy_header_timeout_ms),
                    idle_timeout: Duration::from_millis(a.proxy_idle_timeout_ms),
                    connect_timeout: Duration::from_millis(a.proxy_connect_timeout_ms),
                    response_timeout: Duration::from_millis(a.proxy_response_timeout_ms),
                    max_conns_per_ip: usize::try_from(a.proxy_max_conns_per_ip)
                        .unwrap_or(usize::MAX),
                    max_requests_per_ip: usize::try_from(a.proxy_max_requests_per_ip)
                        .unwrap_or(usize::MAX),
                    threads: a.proxy_threads.map(|n| usize::try_from(n).unwrap_or(64)),
                }),
            };
            runtime(Some(2))?.block_on(async {
                tokio::select! {
                    r = phoenix_master::run(cfg) => r.map_err(Into::into),
                    _ = shutdown() => Ok(()),
                }
            })
        }
        Command::Minion(a) => {
            if !a.foreground {
                // Make the key now, so the install can print it.
                let key = phoenix_minion::public_key(&a.data_dir)?;
                eprintln!("minion {} public key: {key}", a.name);
                let args: Vec<String> = std::env::args().skip(1).collect();
                return install::install("minion", &args);
            }
            phoenix_model::spec::check_hostname_label(&a.name)
                .map_err(|r| anyhow::anyhow!("minion name: {r}"))?;
            if let Some(k) = &a.vm_kernel
                && !k.is_file()
            {
                bail!("--vm-kernel {}: no such file", k.display());
            }
            if !phoenix_model::keys::is_valid_public_key(&a.master_key) {
                bail!(
                    "master key {:?} is not a base64 WireGuard key; copy it from `phoenix master-info` on the master",
                    a.master_key
                );
            }
            let cfg = phoenix_minion::MinionConfig {
                data_dir: a.data_dir,
                name: a.name,
                master_key: a.master_key,
                public_ip: a.minion_public_ip,
                private_ip: a.minion_private_ip,
                master_ip: a.master_public_ip,
                master_join_port: a.master_join_port,
                master_link_port: a.master_link_port,
                overlay: (!a.overlay.no_overlay).then_some(phoenix_minion::OverlaySettings {
                    mode: a.overlay.wireguard,
                    wg_port: a.overlay.wg_port,
                    master_wg_port: a.master_wg_port,
                    tun_name: a.overlay.tun_name,
                }),
                token: a.token,
                health: phoenix_minion::health::HealthTiming {
                    grace: Duration::from_millis(a.health_grace_ms),
                    interval: Duration::from_millis(a.health_interval_ms.max(10)),
                    timeout: Duration::from_millis(a.health_timeout_ms.max(10)),
                },
                stop_timeout: Duration::from_millis(a.stop_timeout_ms),
                min_uptime: Duration::from_millis(a.min_uptime_ms),
                log_max_bytes: a.log_max_bytes,
                keep_free: a.keep_free_mb.map(|mb| mb << 20),
                stats_every: Duration::from_secs(5),
                service_network: a.service_network,
                vm: phoenix_minion::driver::vm::VmSettings {
                    boot_timeout: Duration::from_millis(a.vm_boot_timeout_ms),
                    kernel: a.vm_kernel,
                },
            };
            let result = runtime(None)?.block_on(async {
                tokio::select! {
                    r = phoenix_minion::run(cfg.clone()) => r.map_err(Into::into),
                    _ = shutdown() => Ok(()),
                }
            });
            if result.is_ok() {
                phoenix_minion::tidy_after_stop(&cfg);
            }
            result
        }
        Command::Uninstall {
            role,
            purge,
            data_dir,
        } => {
            install::uninstall(&role)?;
            if purge {
                let default = if role == "master" {
                    cli::DEFAULT_MASTER_DIR
                } else {
                    cli::DEFAULT_MINION_DIR
                };
                install::purge(&data_dir.unwrap_or_else(|| default.into()))?;
            }
            Ok(())
        }
        Command::Demo {
            dir,
            testy,
            seconds,
        } => demo::run(&dir, testy, seconds),
        Command::Version { json } => {
            if json.json {
                return print_json(&serde_json::json!({
                    "version": cli::VERSION,
                    "protocol": phoenix_model::proto::PROTOCOL_VERSION,
                }));
            }
            println!("phoenix {}", cli::VERSION);
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "phoenix", &mut script);
            // Into a closed pipe (`| head`): end quietly, as Unix tools do.
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                written => written.context("writing the completion script"),
            }
        }
        other => {
            // A CLI command writing into a closed pipe (`phoenix services |
            // head`) should end quietly, as Unix tools do, not panic.
            // SAFETY: setting a signal's disposition to its default.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            }
            runtime(None)?.block_on(command(other))
        }
    }
}

/// Resolves on SIGTERM or SIGINT. Daemons exit; services keep running.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("stopping (services keep running)");
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

async fn command(cmd: Command) -> Result<()> {
    match cmd {
        Command::MasterInfo { target, json } => {
            let info: MasterInfo = client::call(&target.data_dir, &Request::MasterInfo).await?;
            if json.json {
                return print_json(&info);
            }
            println!("public ip:       {}", info.public_ip);
            println!("key:             {}", info.key);
            println!("overlay ip:      {}", info.overlay_ip);
            println!("next minion ip:  {}", info.next_minion_ip);
            println!("join port:       {}", info.join_port);
            println!(
                "link port:       {} (on the overlay address)",
                info.link_port
            );
            println!(
                "wireguard port:  {}",
                info.wg_port
                    .map_or_else(|| "off (no overlay)".into(), |p| p.to_string())
            );
            println!("join token:      {}", info.token);
            println!("version:         {}", info.version);
            println!(
                "\njoin a minion with:\n  phoenix minion <name> {} {} <minion-public-ip> <minion-private-ip>\n\
                 (add --token {} to have a master started with --auto-accept admit it)",
                info.public_ip, info.key, info.token
            );
        }
        Command::Waiting { target, json } => {
            let nodes: Vec<WaitingNode> = client::call(&target.data_dir, &Request::Waiting).await?;
            if json.json {
                return print_json(&nodes);
            }
            if nodes.is_empty() {
                print!("{}", output::NO_WAITING);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.fingerprint.clone(),
                        n.public_ip.to_string(),
                        n.private_ip.to_string(),
                        ago(n.requested_at),
                        if n.token_proof {
                            "valid".into()
                        } else {
                            "-".into()
                        },
                    ]
                })
                .collect();
            table(
                &[
                    "NAME",
                    "KEY FINGERPRINT",
                    "PUBLIC IP",
                    "PRIVATE IP",
                    "ASKED",
                    "TOKEN",
                ],
                &rows,
            );
        }
        Command::Accept {
            name,
            fingerprint,
            target,
            json,
        } => {
            let node: Accepted = client::call(
                &target.data_dir,
                &Request::Accept {
                    name: name.clone(),
                    fingerprint,
                },
            )
            .await?;
            if json.json {
                return print_json(&node);
            }
            println!("accepted {} (overlay ip {})", node.name, node.overlay_ip);
        }
        Command::Reject {
            name,
            fingerprint,
            target,
            json,
        } => {
            let r: Rejected = client::call(
                &target.data_dir,
                &Request::Reject {
                    name: name.clone(),
                    fingerprint,
                },
            )
            .await?;
            if json.json {
                return print_json(&r);
            }
            println!("rejected {}", r.rejected);
        }
        Command::Forget { name, target, json } => {
            let f: Forgotten =
                client::call(&target.data_dir, &Request::Forget { name: name.clone() }).await?;
            if json.json {
                return print_json(&f);
            }
            println!(
                "forgot {}: its key and overlay peer are removed",
                f.forgotten
            );
        }
        Command::Deploy(a) => apply(a, false).await?,
        Command::Update(a) => apply(a, true).await?,
        Command::Diff(t) => apply_tree(t, false, false, None).await?,
        Command::Import(a) => import::run(a).await?,
        Command::Apply {
            path,
            git,
            source,
            prune,
            waiting,
            target,
            json,
        } => match (path, git.git.clone()) {
            (_, Some(url_ref)) => {
                git::apply(git, url_ref, source, prune, waiting, target, json.json).await?
            }
            (Some(path), None) => {
                let tree = TreeArgs {
                    path,
                    source,
                    target,
                    json,
                };
                apply_tree(tree, true, prune, Some(waiting)).await?
            }
            (None, None) => bail!("give a PATH, or --git URL"),
        },
        Command::Sources {
            action,
            target,
            json,
        } => git::sources(action, &target, json.json).await?,
        Command::Del {
            name,
            waiting,
            target,
            json,
        } => delete(&target.data_dir, &name, waiting, json.json).await?,
        Command::Restart {
            names,
            waiting,
            target,
            json,
        } => {
            let applied: Vec<Applied> =
                client::call(&target.data_dir, &Request::Restart { names }).await?;
            if !json.json {
                for v in &applied {
                    println!(
                        "restarting {} on {} (generation {})",
                        v.name, v.machine, v.generation
                    );
                }
            }
            wait_running(&target.data_dir, &applied, waiting, json.json).await?;
        }
        Command::Status { name, target, json } => {
            let v: ServiceView = client::call(&target.data_dir, &Request::Status { name }).await?;
            if json.json {
                return print_json(&v);
            }
            println!("name:        {}", v.name);
            println!(
                "state:       {}{}",
                v.state,
                if v.node_reachable {
                    ""
                } else {
                    " (machine unreachable; last known)"
                }
            );
            println!("machine:     {}", v.machine);
            println!("ip:          {}", v.ip);
            println!("type:        {} {}", v.kind, v.duration);
            println!("image:       {}", output::image_detail(&v));
            println!("pid:         {}", opt(v.pid));
            println!("restarts:    {}", v.restarts);
            println!("health:      {}", v.health);
            println!(
                "last exit:   {}",
                opt(v.last_exit.map(|e| format!("{e} ({})", ago(e.at))))
            );
            println!("since:       {}", opt(v.since.map(ago)));
            println!("generation:  {}", v.generation);
            if let Some(l) = output::dangling_links(&v) {
                println!("links:       {l}");
            }
            if let Some(l) = v.limits {
                println!("limits:      {l}");
            }
            if let Some(m) = v.message {
                println!("message:     {m}");
            }
            if let Some(i) = v.instance {
                println!("instance:    {i}");
            }
            if let Some(u) = v.update {
                println!("update:      {u}");
            }
            if let Some(n) = &v.note {
                println!("note:        {n}");
            }
            // Why it does not run: its last words (a VM's last console
            // lines), as `deploy` shows them for a start that failed.
            if matches!(v.state.as_str(), "backoff" | "failed" | "unhealthy") {
                print_log_tail(&target.data_dir, &v.name).await;
            }
        }
        Command::Info {
            name,
            env: true,
            target,
            json,
        } => envcmd::info_env(&target.data_dir, name, json.json).await?,
        Command::Info {
            name,
            env: false,
            target,
            json: _,
        } => {
            let spec: Spec = client::call(&target.data_dir, &Request::Info { name }).await?;
            print_json(&spec)?;
        }
        Command::Env { action } => envcmd::env(action).await?,
        Command::Secret { action } => envcmd::secret(action).await?,
        Command::Services { target, json } => {
            let list: Vec<ServiceView> = client::call(&target.data_dir, &Request::Services).await?;
            if json.json {
                return print_json(&list);
            }
            if list.is_empty() {
                print!("{}", output::NO_SERVICES);
                return Ok(());
            }
            output::services_table(&list);
        }
        Command::Routes { target, json } => {
            let view: phoenix_model::proto::RoutesView =
                client::call(&target.data_dir, &Request::Routes).await?;
            if json.json {
                return print_json(&view);
            }
            print!("{}", output::routes_text(&view));
        }
        Command::Nodes { target, json } => {
            let list: Vec<NodeView> = client::call(&target.data_dir, &Request::Nodes).await?;
            if json.json {
                return print_json(&list);
            }
            if list.is_empty() {
                print!("{}", output::NO_NODES);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|n| {
                    let s = n.stats.clone().unwrap_or_default();
                    vec![
                        n.name.clone(),
                        n.state.clone(),
                        n.overlay_ip.to_string(),
                        n.public_ip.to_string(),
                        opt(n.last_seen.map(ago)),
                        format!("{:.2}", s.load1),
                        format!(
                            "{} / {}",
                            bytes(s.mem_total.saturating_sub(s.mem_available)),
                            bytes(s.mem_total)
                        ),
                        n.services.to_string(),
                        opt(s.vm_accel.clone()),
                        opt(n.version.clone()),
                    ]
                })
                .collect();
            table(
                &[
                    "NAME",
                    "STATE",
                    "OVERLAY IP",
                    "PUBLIC IP",
                    "LAST SEEN",
                    "LOAD",
                    "MEMORY",
                    "SERVICES",
                    "VM",
                    "VERSION",
                ],
                &rows,
            );
            // Why each node's last link ended: the answer to "why is it
            // unreachable" (or why it was, a moment ago).
            for n in &list {
                if let Some(d) = &n.last_drop {
                    println!("{}: link dropped {}: {}", n.name, ago(d.at), d.reason);
                }
            }
        }
        Command::Images { target, json } => {
            let list: Vec<ImageView> = client::call(&target.data_dir, &Request::Images).await?;
            if json.json {
                return print_json(&list);
            }
            output::images_table(&list);
        }
        Command::Audit {
            limit,
            target,
            json,
        } => {
            let log: Vec<AuditEntry> =
                client::call(&target.data_dir, &Request::Audit { limit }).await?;
            if json.json {
                return print_json(&log);
            }
            for e in &log {
                println!(
                    "{}  {:<7} {:<20} by {}",
                    utc(e.at),
                    e.action,
                    e.subject,
                    e.actor
                );
                for change in output::audit_changes(e.old.as_ref(), e.new.as_ref()) {
                    println!("    {change}");
                }
            }
        }
        Command::Push {
            file,
            name,
            target,
            json,
        } => {
            let name = match name {
                Some(n) => n,
                None => file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_owned)
                    .with_context(|| {
                        format!("{} has no file name; give the image a NAME", file.display())
                    })?,
            };
            let v = client::push(&target.data_dir, &file, &name).await?;
            if json.json {
                return print_json(&v);
            }
            println!(
                "pushed {} ({}, {}, {} chunks, blake3 {}); minions fetch it now (`phoenix images` shows where)",
                v.name,
                v.format,
                bytes(v.size),
                v.chunks,
                v.hash
            );
            if !v.stale_services.is_empty() {
                println!(
                    "{} run{} the previous version of {}; roll this one out with `phoenix restart {}` \
                     (or `phoenix update SPEC` with a changed spec)",
                    v.stale_services.join(", "),
                    if v.stale_services.len() == 1 { "s" } else { "" },
                    v.name,
                    v.stale_services.join(" ")
                );
            }
        }
        Command::Logs {
            name,
            follow,
            lines,
            target,
        } => client::logs(&target.data_dir, &name, lines, follow).await?,
        Command::Master(_)
        | Command::Minion(_)
        | Command::Uninstall { .. }
        | Command::Demo { .. }
        | Command::Version { .. }
        | Command::GuestInit
        | Command::Completions { .. } => {
            bail!("not a client command")
        }
    }
    Ok(())
}

fn read_spec(file: &Path) -> Result<(String, String)> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the spec from stdin")?;
        return Ok(("<stdin>".into(), text));
    }
    let text = std::fs::read_to_string(file).map_err(|e| {
        client::InvalidInput(format!("cannot read spec file {}: {e}", file.display()))
    })?;
    Ok((file.display().to_string(), text))
}

async fn apply(a: ApplyArgs, update: bool) -> Result<()> {
    let (source, text) = read_spec(&a.file)?;
    // Check locally first for a quick answer; the master checks again
    // against the cluster and is the authority.
    phoenix_model::spec::parse_specs(&source, &text)?;
    // The env files its specs name, from beside it; the master keeps
    // their entries with each service.
    let env_files = phoenix_model::tree::read_env_files(
        &a.file,
        &source,
        &text,
        phoenix_model::tree::Links::Follow,
    )?;
    let req = if update {
        Request::Update {
            source,
            text,
            env_files,
        }
    } else {
        Request::Deploy {
            source,
            text,
            env_files,
        }
    };
    let applied: Vec<Applied> = client::call(&a.target.data_dir, &req).await?;
    if !a.json.json {
        for v in &applied {
            if v.beside {
                println!(
                    "updating {} on {} at {}: generation {} starts beside the running one, which \
                     serves until it is up, then drains and stops",
                    v.name, v.machine, v.ip, v.generation
                );
                continue;
            }
            if v.routes_only {
                println!(
                    "updated the routes of {} (only routing fields changed); generation {} on {} serves on, nothing restarted",
                    v.name, v.generation, v.machine
                );
                continue;
            }
            println!(
                "{} {} on {} at {}",
                if update { "updated" } else { "deployed" },
                v.name,
                v.machine,
                v.ip
            );
        }
    }
    wait_running(&a.target.data_dir, &applied, a.waiting, a.json.json).await
}

/// `diff` (`write` false) and `apply`: sends the tree to the master as one
/// request, prints the plan, and for `apply` waits like `deploy` does.
async fn apply_tree(t: TreeArgs, write: bool, prune: bool, waiting: Option<Waiting>) -> Result<()> {
    let files = phoenix_model::tree::read_tree(&t.path, phoenix_model::tree::Links::Follow, |p| {
        p.display().to_string()
    })?;
    let source = match t.source {
        Some(s) => s,
        None => std::fs::canonicalize(&t.path)
            .with_context(|| format!("cannot resolve {}", t.path.display()))?
            .display()
            .to_string(),
    };
    send_tree(
        source,
        files,
        &t.target.data_dir,
        t.json.json,
        write,
        prune,
        waiting,
    )
    .await
}

/// Sends a tree of spec files from `source` to the master as one
/// `ApplyTree` (`write` false: a diff), prints the plan, and when writing
/// waits like `deploy` does. `apply PATH` and `import --apply` use it.
async fn send_tree(
    source: String,
    files: Vec<phoenix_model::proto::SourceFile>,
    data_dir: &Path,
    json: bool,
    write: bool,
    prune: bool,
    waiting: Option<Waiting>,
) -> Result<()> {
    let req = Request::ApplyTree {
        source,
        files,
        prune,
        dry_run: !write,
    };
    let plan: Plan = client::call(data_dir, &req).await?;
    let Some(waiting) = waiting.filter(|_| write) else {
        if json {
            return print_json(&plan);
        }
        print_plan(&plan);
        return Ok(());
    };
    if !json {
        print_plan(&plan);
    }
    let pruned: Vec<String> = if plan.prune {
        plan.delete.clone()
    } else {
        Vec::new()
    };
    if !pruned.is_empty() && !waiting.detach {
        let wait = Request::WaitGone {
            names: pruned,
            timeout_ms: waiting.timeout_s.saturating_mul(1000),
        };
        let _: Vec<String> = client::call(data_dir, &wait).await?;
    }
    if plan.applied.is_empty() || waiting.detach {
        return if json { print_json(&plan) } else { Ok(()) };
    }
    wait_running_then(data_dir, &plan.applied, waiting, json, Some(&plan)).await
}

/// A plan as people read it: `+ web (m1)`, `~ api (m1): env, args`,
/// `- old (pruned)`, `= 12 unchanged`.
fn print_plan(plan: &Plan) {
    for e in &plan.create {
        println!("+ {} ({})  {}", e.name, e.machine, e.file);
    }
    for e in &plan.change {
        // Written: what the master did; a diff: what only routing fields
        // would do where the machine's minion is of this version.
        let routing = plan
            .applied
            .iter()
            .any(|a| a.name == e.name && a.routes_only)
            || (!plan.written
                && e.fields
                    .iter()
                    .all(|f| phoenix_model::spec::ROUTING_FIELDS.contains(&f.as_str())));
        println!(
            "~ {} ({}): {}  {}{}",
            e.name,
            e.machine,
            e.fields.join(", "),
            e.file,
            match (routing, plan.written) {
                (true, true) => "  (routing only: nothing restarted)",
                (true, false) => "  (routing only: restarts nothing)",
                _ => "",
            }
        );
        for v in &e.env {
            println!("    {v}");
        }
    }
    for name in &plan.delete {
        match (plan.prune, plan.written) {
            (true, true) => println!("- {name} (pruned)"),
            (true, false) => println!("- {name} (deleted by apply --prune)"),
            (false, _) => println!("- {name} (would be pruned with --prune; kept)"),
        }
    }
    if !plan.unchanged.is_empty() {
        println!("= {} unchanged", plan.unchanged.len());
    }
    let nothing =
        plan.create.is_empty() && plan.change.is_empty() && (plan.delete.is_empty() || !plan.prune);
    if nothing {
        println!("nothing to change for {}", plan.source);
    } else if !plan.written {
        println!("(a diff: nothing was changed; `phoenix apply` writes it)");
    }
}

/// How often a wait's progress is looked at.
const PROGRESS_EVERY: Duration = Duration::from_millis(300);
/// The log lines shown of a service that did not start.
const FAILED_LOG_LINES: usize = 10;
/// How long the log of a failed service may take to arrive.
const LOG_TIMEOUT: Duration = Duration::from_secs(3);

/// Waits until the services a change touched have a verdict (unless
/// `--detach`), showing progress meanwhile; prints each one, with the
/// reason and its last log lines when it did not start. Fails with exit
/// code 7 if any did not start, 6 if a machine is unreachable.
async fn wait_running(
    data_dir: &Path,
    applied: &[Applied],
    waiting: Waiting,
    json: bool,
) -> Result<()> {
    wait_running_then(data_dir, applied, waiting, json, None).await
}

/// [`wait_running`]; with `--json` and a plan (`apply`), prints the plan
/// with the verdicts under `settled`, as one object.
async fn wait_running_then(
    data_dir: &Path,
    applied: &[Applied],
    waiting: Waiting,
    json: bool,
    plan: Option<&Plan>,
) -> Result<()> {
    if waiting.detach {
        if json {
            print_json(&applied)?;
        }
        return Ok(());
    }
    let names: Vec<String> = applied.iter().map(|v| v.name.clone()).collect();
    let wait = Request::Wait {
        names: names.clone(),
        timeout_ms: waiting.timeout_s.saturating_mul(1000),
    };
    let mut progress = (!json).then(progress::Progress::on_stderr);
    let settled = {
        let call = client::call::<Vec<Settled>>(data_dir, &wait);
        tokio::pin!(call);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                r = &mut call => break r,
                _ = tick.tick(), if progress.is_some() => {
                    // Progress is a courtesy: a failed look shows nothing.
                    if let (Some(p), Ok(all)) = (
                        progress.as_mut(),
                        client::call::<Vec<ServiceView>>(data_dir, &Request::Services).await,
                    ) {
                        p.show(all.iter().filter(|v| names.contains(&v.name)));
                    }
                }
            }
        }
    };
    if let Some(p) = progress.as_mut() {
        p.clear();
    }
    let settled = settled.context("the change is stored, but the services did not settle")?;
    if let (true, Some(plan)) = (json, plan) {
        let mut v = serde_json::to_value(plan)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("settled".into(), serde_json::to_value(&settled)?);
        }
        print_json(&v)?;
    } else if json {
        print_json(&settled)?;
    } else {
        for s in &settled {
            print_settled(data_dir, s).await;
        }
    }
    // A change of routing alone took effect as it was stored, its run
    // untouched: how that run fares is shown, but it is no failure of
    // this change (it may have been failing before).
    let routes_only: Vec<&str> = applied
        .iter()
        .filter(|a| a.routes_only)
        .map(|a| a.name.as_str())
        .collect();
    let settled: Vec<&Settled> = settled
        .iter()
        .filter(|s| !routes_only.contains(&s.view.name.as_str()))
        .collect();
    let failed: Vec<String> = settled
        .iter()
        .filter(|s| s.verdict == Verdict::Failed)
        .map(|s| {
            format!(
                "{} failed: {}",
                s.view.name,
                s.reason.as_deref().unwrap_or("did not start")
            )
        })
        .collect();
    // An update whose new version ran beside the old one and did not come
    // up changed nothing: the old one serves on, and nothing is retried.
    let beside: Vec<&str> = applied
        .iter()
        .filter(|a| a.beside)
        .map(|a| a.name.as_str())
        .collect();
    if !failed.is_empty()
        && settled
            .iter()
            .all(|s| s.verdict != Verdict::Failed || beside.contains(&s.view.name.as_str()))
    {
        return Err(
            client::NotStarted(format!("{}; nothing was switched", failed.join("; "))).into(),
        );
    }
    if !failed.is_empty() {
        let hint: Vec<&str> = settled
            .iter()
            .filter(|s| s.verdict == Verdict::Failed)
            .map(|s| s.view.name.as_str())
            .collect();
        return Err(client::NotStarted(format!(
            "{}; the change is stored and its machine keeps trying (`phoenix status {}`, \
             `phoenix logs {}`)",
            failed.join("; "),
            hint[0],
            hint[0]
        ))
        .into());
    }
    let unreachable: Vec<&str> = settled
        .iter()
        .filter(|s| s.verdict == Verdict::Unreachable)
        .filter_map(|s| s.reason.as_deref())
        .collect();
    if !unreachable.is_empty() {
        let mut reasons = unreachable;
        reasons.dedup();
        return Err(client::MasterRefused {
            kind: phoenix_model::proto::ErrorKind::Unavailable,
            message: reasons.join("; "),
        }
        .into());
    }
    Ok(())
}

/// One service's line after a wait; for one that did not start, its last
/// log lines too.
async fn print_settled(data_dir: &Path, s: &Settled) {
    let v = &s.view;
    match s.verdict {
        Verdict::Running | Verdict::Exited | Verdict::Waiting => {
            println!(
                "  {:<24} {:<11} pid {}",
                v.name,
                s.verdict.as_str(),
                opt(v.pid)
            );
        }
        Verdict::Unreachable => println!(
            "  {:<24} {:<11} {}",
            v.name,
            s.verdict.as_str(),
            s.reason.as_deref().unwrap_or("")
        ),
        Verdict::Failed => {
            println!(
                "  {:<24} {:<11} {} ({}, restarts {})",
                v.name,
                s.verdict.as_str(),
                s.reason.as_deref().unwrap_or("did not start"),
                v.state,
                v.restarts
            );
            match &s.log_tail {
                // An update's new version, gone with its log: the master
                // kept its last lines (the service's log is the old one's).
                Some(tail) => print_tail(tail),
                None => print_log_tail(data_dir, &v.name).await,
            }
        }
    }
}

/// The last lines of a service's log, indented, for a service that did
/// not start.
async fn print_log_tail(data_dir: &Path, name: &str) {
    let tail = tokio::time::timeout(
        LOG_TIMEOUT,
        client::log_tail(data_dir, name, FAILED_LOG_LINES),
    )
    .await;
    match tail {
        Ok(Ok(text)) => print_tail(&text),
        Ok(Err(e)) => println!("    (its log cannot be read: {e:#})"),
        Err(_) => println!("    (its log did not arrive within {LOG_TIMEOUT:?})"),
    }
}

/// Log lines, indented, under a service that did not start.
fn print_tail(text: &str) {
    if text.trim().is_empty() {
        println!("    (its log is empty)");
        return;
    }
    println!("    last lines of its log:");
    for line in text.lines() {
        println!("    | {line}");
    }
}

/// `del`: removes the service, then (unless `--detach`) waits until its
/// minion has stopped it.
async fn delete(data_dir: &Path, name: &str, waiting: Waiting, json: bool) -> Result<()> {
    let mut d: Deleted = client::call(data_dir, &Request::Del { name: name.into() }).await?;
    if !waiting.detach {
        let wait = Request::WaitGone {
            names: vec![d.deleted.clone()],
            timeout_ms: waiting.timeout_s.saturating_mul(1000),
        };
        let _: Vec<String> = client::call(data_dir, &wait).await?;
        d.stopped = true;
    }
    if json {
        return print_json(&d);
    }
    if d.stopped {
        println!("deleted {}: stopped on {}", d.deleted, d.machine);
    } else {
        println!(
            "deleted {}; {} stops it now (`phoenix del` without --detach waits for that)",
            d.deleted, d.machine
        );
    }
    Ok(())
}
