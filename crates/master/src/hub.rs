//! The master's shared state and the operations on it, by concern.
//!
//! Durable facts live in the [`Store`]; what minions report lives in memory
//! (`hub/observed.rs`) and is rebuilt from their reports after a master restart.
//! What each node should run is decided by one pure function,
//! [`crate::reconcile`], fed by the store; `hub/links.rs` pushes its output to
//! the connected minions.
//!
//! | module | what | state |
//! |---|---|---|
//! | `hub/membership.rs` | join requests, accept/reject/forget, `nodes` | store, `membership` signal |
//! | `hub/apply.rs` | deploy/update/del/info, checks against the cluster and the images | store |
//! | `hub/observed.rs` | reported statuses, node stats, image sync, `wait` | one lock: statuses and node reports together |
//! | `hub/links.rs` | connected minions, send/broadcast, desired-set pushes | one lock: node → [`Link`] |
//! | `hub/logs.rs` | log streams between a minion and a CLI | one lock: stream → CLI |
//! | `hub/images.rs` | `images`, registry upkeep and garbage collection | the [`Registry`] |
//! | `hub/mesh.rs` | changes that reach every node they touch; the master's WireGuard peers | store |
//! | `hub/routes.rs` | the proxy's route table from the store and the reports | reads store and observed |
//! | `hub/git.rs` | git sources: looks at the remote, fetches, applies a commit's tree; the webhook | store (`git_sources`); one lock: each source's secret, wake-up and task |
//! | `hub/env.rs` | the cluster's variables (`env set/unset/list`), `info --env`, each assignment's resolved environment at push time | store (`cluster_env`) |
//! | `hub/secrets.rs` | `secret set/list/rm`, sealed at rest with `DATA_DIR/secrets.key` | store (`secrets`), the key file |
//! | `hub/rollout.rs` | zero-downtime updates (new version beside, switch, drain, promote) and draining deletes | `next` in the store; one lock: switching/deleting sets |
//!
//! Lock order, where two are held at once: store, then links (a desired
//! set is sent under the store lock so that sets go out in revision order);
//! links, then log streams (a disconnect ends its node's streams);
//! rollouts, then observed (the route table reads both). The observed lock
//! is never held while taking another.

mod apply;
mod env;
mod error;
mod git;
mod images;
mod links;
mod logs;
mod membership;
mod mesh;
mod observed;
mod rollout;
mod routes;
mod secrets;
mod sources;

pub use routes::{MovingNow, RoutesChange};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use phoenix_model::proto::{DesiredSet, MasterInfo};
use phoenix_overlay::Overlay;
use tokio::sync::watch;

use crate::registry::Registry;
use crate::store::{Store, StoreError, Tx};
use crate::{lock, reconcile};

pub use apply::Apply;
pub use error::ApiError;
pub use git::{GitError, default_name as git_default_name, parse_target as git_parse_target};
pub use links::{Link, LinkCaps};
pub use logs::LogEvent;
pub use membership::peer_config;
pub use mesh::{allowed_ips, master_peer, master_peers};
pub use observed::NodeSeen;

/// Policy knobs from the master's command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub auto_accept: bool,
    pub node_timeout: std::time::Duration,
    /// How long an update's new version may take to come up beside the
    /// old one before the update is called failed (`hub::rollout`).
    pub update_timeout: std::time::Duration,
    /// How long requests in flight on a run taken out of the proxy's
    /// rotation (an update's old version, a deleted service) may take.
    pub drain_timeout: std::time::Duration,
}

impl Settings {
    /// The defaults of the master's flags.
    pub fn new(auto_accept: bool, node_timeout: std::time::Duration) -> Settings {
        Settings {
            auto_accept,
            node_timeout,
            update_timeout: std::time::Duration::from_secs(120),
            drain_timeout: std::time::Duration::from_secs(30),
        }
    }
}

pub struct Hub {
    store: Mutex<Store>,
    pub registry: Registry,
    pub info: MasterInfo,
    pub overlay: Option<Arc<Overlay>>,
    pub settings: Settings,
    links: links::Links,
    observed: observed::ObservedState,
    logs: logs::LogStreams,
    /// Docker image files already checked at deploy time.
    image_formats: apply::ImageFormats,
    /// Bumped whenever a node is accepted or rejected (for waiting links).
    membership: watch::Sender<u64>,
    /// Join requests waiting for an admin (in memory: see `join::waiting`).
    pub(crate) joins: Mutex<crate::join::waiting::WaitingRequests>,
    next_id: AtomicU64,
    /// Asks the registry watcher to collect garbage (after services change).
    collect: tokio::sync::Notify,
    /// Wakes [`Hub::keep_overlay_peers`]: what a minion serves may have
    /// changed.
    mesh_changed: tokio::sync::Notify,
    /// Wakes the proxy's route keeper: the services changed.
    routes_changed: tokio::sync::Notify,
    /// The proxy and its certificates, once started (not with
    /// `--no-proxy`).
    pub front: std::sync::OnceLock<Arc<crate::front::Front>>,
    /// Updates switching and deletes draining (see `hub::rollout`).
    rollouts: Mutex<rollout::Rollouts>,
    /// The git sources' webhook secrets, wake-ups and watch tasks (see
    /// `hub::git`).
    git: git::GitSources,
}

impl Hub {
    pub fn new(
        store: Store,
        registry: Registry,
        info: MasterInfo,
        overlay: Option<Arc<Overlay>>,
        settings: Settings,
    ) -> Self {
        Hub {
            store: Mutex::new(store),
            registry,
            info,
            overlay,
            settings,
            links: links::Links::default(),
            observed: observed::ObservedState::default(),
            logs: logs::LogStreams::default(),
            image_formats: apply::ImageFormats::default(),
            membership: watch::channel(0).0,
            joins: Mutex::new(crate::join::waiting::WaitingRequests::new(
                crate::join::waiting::Limits::default(),
            )),
            next_id: AtomicU64::new(1),
            collect: tokio::sync::Notify::new(),
            mesh_changed: tokio::sync::Notify::new(),
            routes_changed: tokio::sync::Notify::new(),
            front: std::sync::OnceLock::new(),
            rollouts: Mutex::default(),
            git: git::GitSources::default(),
        }
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }
}

/// Every accepted node's desired set, as the reconciler decides it from the
/// store's rows. The one way the hub learns what a node runs.
fn desired_sets(tx: &Tx<'_>) -> Result<BTreeMap<String, DesiredSet>, StoreError> {
    Ok(reconcile::desired_sets(&tx.nodes(true)?, &tx.services()?))
}
