//! The Phoenix minion daemon: runs what the master assigns, and keeps
//! running it when the master is away.
//!
//! - [`supervisor`]: a task runner per service, converging on the desired set;
//! - [`task`]: the task runner (start, watch, health-check, restart with
//!   backoff, stop, adopt), the same for every kind of workload;
//! - [`driver`]: how each kind runs (`exec` for binaries, `oci` for
//!   containers): prepare, start, recover, stop, destroy;
//! - [`hooks`]: per-service resources around every driver (cgroups);
//! - [`process`], [`reaper`]: process groups, pidfds, start times, reaping;
//! - [`health`], [`logs`], [`images`]: health checks, log files, image cache;
//! - [`state`]: what the minion keeps on disk to run cut off from the master;
//! - [`link`]: the join request and the long-lived connection to the master;
//! - [`mesh`]: the other minions as direct WireGuard peers.
//!
//! On start the minion applies the desired set saved on disk before it even
//! tries to reach the master, adopting processes a previous run started.

mod backoff;
pub mod driver;
pub mod health;
pub mod hooks;
pub mod images;
pub mod link;
pub mod logs;
pub mod mesh;
pub mod process;
pub mod reaper;
pub mod state;
pub mod supervisor;
pub mod task;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use phoenix_model::keys::KeyPair;
use phoenix_model::net;
use phoenix_overlay::{Overlay, OverlayConfig, PeerConfig};
use tokio::sync::mpsc;

/// Masks an address down to the cluster's /48.
const CLUSTER_MASK: Ipv6Addr = Ipv6Addr::new(0xffff, 0xffff, 0xffff, 0, 0, 0, 0, 0);

pub use link::Identity;

#[derive(Clone, Debug)]
pub struct MinionConfig {
    pub data_dir: PathBuf,
    pub name: String,
    pub master_key: String,
    pub public_ip: std::net::IpAddr,
    pub private_ip: std::net::IpAddr,
    pub master_ip: std::net::IpAddr,
    pub master_join_port: u16,
    pub master_link_port: u16,
    /// The WireGuard overlay; `None` talks to the master in clear text (for
    /// single-host development without root only).
    pub overlay: Option<OverlaySettings>,
    pub token: Option<String>,
    pub health: health::HealthTiming,
    pub stop_timeout: Duration,
    /// How long a daemon without a health check must stay up to count as
    /// running (0: at once).
    pub min_uptime: Duration,
    pub log_max_bytes: u64,
    /// Disk space pre-caching must leave free (`None`: a tenth, ≤ 1 GiB).
    pub keep_free: Option<u64>,
    pub stats_every: Duration,
    /// A network namespace per service, or the minion's network for all.
    pub service_network: hooks::net::NetMode,
    /// How services of type vm are run.
    pub vm: driver::vm::VmSettings,
}

#[derive(Clone, Debug)]
pub struct OverlaySettings {
    /// Kernel or userspace WireGuard (auto: the kernel's where it has it).
    pub mode: phoenix_overlay::Mode,
    /// Our WireGuard port.
    pub wg_port: u16,
    /// The master's WireGuard port (on its public IP).
    pub master_wg_port: u16,
    pub tun_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MinionError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] phoenix_model::keys::KeyError),
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error("log watcher: {0}")]
    Logs(std::io::Error),
    #[error("cannot become the reaper of our children: {0}")]
    Reaper(std::io::Error),
    #[error(transparent)]
    Overlay(#[from] phoenix_overlay::OverlayError),
    #[error("{0} (or run services in the minion's own network with --service-network host)")]
    Network(#[from] phoenix_net::NetError),
}

/// A short id of the minion's key, naming what it makes on a host that
/// other minions may share (cgroups, interfaces, its nftables table).
pub fn minion_id(key: &str) -> String {
    blake3::hash(key.as_bytes()).to_hex()[..8].to_owned()
}

/// After the minion stopped: one that runs no service leaves no firewall
/// table behind (one with services keeps it: they run on, confined).
pub fn tidy_after_stop(cfg: &MinionConfig) {
    if cfg.service_network != hooks::net::NetMode::Namespaces {
        return;
    }
    let Ok(state) = state::LocalState::new(cfg.data_dir.clone()) else {
        return;
    };
    if !state.recorded_services().is_empty() {
        return;
    }
    let Ok(keys) = KeyPair::load_or_create(&cfg.data_dir.join("minion.key")) else {
        return;
    };
    if let Err(e) = phoenix_net::remove_firewall(&minion_id(&keys.public())) {
        tracing::warn!("{e}");
    }
}

/// The minion's public key, creating its key pair on first use.
pub fn public_key(data_dir: &std::path::Path) -> Result<String, MinionError> {
    std::fs::create_dir_all(data_dir).map_err(|source| MinionError::DataDir {
        path: data_dir.display().to_string(),
        source,
    })?;
    Ok(KeyPair::load_or_create(&data_dir.join("minion.key"))?.public())
}

/// Runs the minion until the process is stopped. Services keep running
/// when the minion stops; the next start adopts them.
pub async fn run(cfg: MinionConfig) -> Result<(), MinionError> {
    // Every service holds a pidfd in the minion.
    phoenix_host::raise_nofile_limit();
    reaper::start().map_err(MinionError::Reaper)?;
    let data_err = |source| MinionError::DataDir {
        path: cfg.data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&cfg.data_dir).map_err(data_err)?;
    let keys = KeyPair::load_or_create(&cfg.data_dir.join("minion.key"))?;
    let key = keys.public();
    // A taken interface name or WireGuard port (another daemon on this
    // machine) is refused here, before any saved service is resumed.
    if let Some(o) = &cfg.overlay {
        phoenix_overlay::preflight::check_free(&o.tun_name, o.wg_port, &keys.secret_bytes())?;
    }
    let state = state::LocalState::new(cfg.data_dir.clone()).map_err(data_err)?;
    let link_addr = match cfg.overlay {
        Some(_) => SocketAddr::new(IpAddr::V6(net::MASTER_IP), cfg.master_link_port),
        None => SocketAddr::new(cfg.master_ip, cfg.master_link_port),
    };
    let id = Identity {
        name: cfg.name.clone(),
        key: key.clone(),
        master_key: cfg.master_key.clone(),
        public_ip: cfg.public_ip,
        private_ip: cfg.private_ip,
        wg_port: cfg.overlay.as_ref().map_or(0, |o| o.wg_port),
        token: cfg.token.clone(),
        join_addr: SocketAddr::new(cfg.master_ip, cfg.master_join_port),
        link_addr,
    };
    let files = logs::LogFiles {
        dir: cfg.data_dir.join("logs"),
        max_bytes: cfg.log_max_bytes,
        keep: 3,
    };
    let (log_tx, log_rx) = mpsc::unbounded_channel();
    let (report_tx, report_rx) = mpsc::unbounded_channel();
    let host: Arc<dyn phoenix_host::Host> = Arc::new(phoenix_host::Linux);
    let cgroups = hooks::ServiceCgroups::new(
        phoenix_host::cgroup::Cgroups::detect(host.clone()),
        &keys.public(),
    );
    tracing::info!(mode = ?cgroups.mode(), "services' cgroups");
    let nets = hooks::net::ServiceNetworks::new(cfg.service_network, &minion_id(&keys.public()));
    // No nftables, no veth: said now, before any saved service is resumed.
    nets.prepare()?;
    let ctx = Arc::new(supervisor::Ctx {
        images: images::ImageCache::new(
            cfg.data_dir.join("images"),
            link_addr,
            cfg.name.clone(),
            key,
            cfg.keep_free,
        )
        .map_err(|e| MinionError::DataDir {
            path: cfg.data_dir.join("chunks").display().to_string(),
            source: std::io::Error::other(e),
        })?,
        drivers: driver::Drivers::on_host(
            &cfg.data_dir,
            host.clone(),
            cgroups.mode(),
            cfg.vm.clone(),
        ),
        host,
        cgroups,
        nets,
        probe: Arc::new(health::HttpProbe),
        desired_writer: state.desired_writer(),
        logs: files.clone(),
        log_cmds: log_tx,
        state: state.clone(),
        health: cfg.health,
        stop_timeout: cfg.stop_timeout,
        min_uptime: cfg.min_uptime,
        reports: report_tx,
    });
    let watcher = tokio::spawn(logs::watcher(files, log_rx));
    tokio::spawn({
        let ctx = ctx.clone();
        async move { ctx.images.prefetch().await }
    });
    let mut sup = supervisor::Supervisor::new(ctx.clone());
    let (mesh_tx, mesh_rx) = mesh::channel();
    let mut desired = link::Desired {
        revision: 0,
        mesh: mesh_tx,
    };
    // Run what we ran before, master or no master (its mesh too, once the
    // overlay is up).
    if let Some(set) = state.desired() {
        tracing::info!(
            revision = set.revision,
            services = set.services.len(),
            "resuming the saved desired set"
        );
        link::apply(&ctx, &mut sup, &mut desired, set);
    }
    // The master is our peer before we even ask to join; it lets our
    // handshakes in once an admin accepts us.
    let overlay = match &cfg.overlay {
        Some(o) => Some(Arc::new(
            Overlay::start(
                OverlayConfig {
                    tun_name: o.tun_name.clone(),
                    address: state.overlay_ip(),
                    listen_port: o.wg_port,
                    private_key: keys.secret_bytes(),
                    peers: vec![PeerConfig {
                        key: cfg.master_key.clone(),
                        allowed: vec![(net::node_ip(0) & CLUSTER_MASK, 48)],
                        endpoint: Some(SocketAddr::new(cfg.master_ip, o.master_wg_port)),
                        keepalive: Some(phoenix_overlay::KEEPALIVE_SECS),
                    }],
                },
                o.mode,
            )
            .await?,
        )),
        None => None,
    };
    // The other minions as direct peers, from each desired set.
    let mesh = overlay.clone().map(|o| {
        tokio::spawn(mesh::keep(
            o,
            cfg.master_key.clone(),
            keys.public(),
            mesh_rx,
        ))
    });
    if state.overlay_ip().is_none() {
        let ip = link::join(&id).await?;
        if let Some(o) = &overlay {
            o.set_address(ip)?;
            o.rehandshake().await?;
        }
        state.set_overlay_ip(ip).map_err(data_err)?;
    }
    let result = tokio::select! {
        r = link::run(id, ctx, sup, desired, report_rx, cfg.stats_every) => r.map_err(Into::into),
        r = watcher => match r {
            Ok(Err(e)) => Err(MinionError::Logs(e)),
            _ => Ok(()),
        },
    };
    if let Some(m) = mesh {
        m.abort();
        let _ = m.await;
    }
    drop(overlay);
    result
}
