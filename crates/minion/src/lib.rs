//! The Phoenix minion daemon: runs what the master assigns, and keeps
//! running it when the master is away.
//!
//! - [`supervisor`]: a task per service (start, watch, health-check,
//!   restart with backoff, stop), converging on the desired set;
//! - [`process`]: process groups, pidfds, adoption after a minion restart;
//! - [`health`], [`logs`], [`images`]: health checks, log files, image cache;
//! - [`state`]: what the minion keeps on disk to run cut off from the master;
//! - [`link`]: the join request and the long-lived connection to the master.
//!
//! On start the minion applies the desired set saved on disk before it even
//! tries to reach the master, adopting processes a previous run started.

pub mod health;
pub mod images;
pub mod link;
pub mod logs;
pub mod process;
pub mod state;
pub mod supervisor;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use phoenix_model::keys::KeyPair;
use tokio::sync::mpsc;

pub use link::Identity;

#[derive(Clone, Debug)]
pub struct MinionConfig {
    pub data_dir: PathBuf,
    pub name: String,
    pub master_key: String,
    pub public_ip: std::net::IpAddr,
    pub private_ip: std::net::IpAddr,
    pub join_addr: std::net::SocketAddr,
    pub link_addr: std::net::SocketAddr,
    pub health: health::HealthTiming,
    pub stop_timeout: Duration,
    pub log_max_bytes: u64,
    pub stats_every: Duration,
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
    process::raise_nofile_limit();
    let key = public_key(&cfg.data_dir)?;
    let state =
        state::LocalState::new(cfg.data_dir.clone()).map_err(|source| MinionError::DataDir {
            path: cfg.data_dir.display().to_string(),
            source,
        })?;
    let id = Identity {
        name: cfg.name.clone(),
        key: key.clone(),
        master_key: cfg.master_key.clone(),
        public_ip: cfg.public_ip,
        private_ip: cfg.private_ip,
        join_addr: cfg.join_addr,
        link_addr: cfg.link_addr,
    };
    let files = logs::LogFiles {
        dir: cfg.data_dir.join("logs"),
        max_bytes: cfg.log_max_bytes,
        keep: 3,
    };
    let (log_tx, log_rx) = mpsc::unbounded_channel();
    let (report_tx, report_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(supervisor::Ctx {
        images: images::ImageCache::new(
            cfg.data_dir.join("images"),
            cfg.link_addr,
            cfg.name.clone(),
            key,
        ),
        logs: files.clone(),
        log_cmds: log_tx,
        state: state.clone(),
        health: cfg.health,
        stop_timeout: cfg.stop_timeout,
        reports: report_tx,
    });
    let watcher = tokio::spawn(logs::watcher(files, log_rx));
    let mut sup = supervisor::Supervisor::new(ctx.clone());
    let mut revision = 0;
    // Run what we ran before, master or no master.
    if let Some(set) = state.desired() {
        tracing::info!(
            revision = set.revision,
            services = set.services.len(),
            "resuming the saved desired set"
        );
        link::apply(&ctx, &mut sup, &mut revision, set);
    }
    if !state.joined() {
        link::join(&id).await?;
        state.set_joined().map_err(|source| MinionError::DataDir {
            path: cfg.data_dir.display().to_string(),
            source,
        })?;
    }
    tokio::select! {
        r = link::run(id, ctx, sup, revision, report_rx, cfg.stats_every) => r?,
        r = watcher => {
            if let Ok(Err(e)) = r {
                return Err(MinionError::Logs(e));
            }
        }
    }
    Ok(())
}
