//! The master's shared state and the operations on it.
//!
//! Durable facts live in the [`Store`]; what minions report (service states,
//! node load) lives here in memory and is rebuilt from their reports after a
//! master restart. Each connected minion has a [`Link`]: a channel to the task
//! that writes to its connection. Whenever a node's desired set changes, the
//! whole set is pushed down that channel.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv6Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use phoenix_model::net;
use phoenix_model::proto::{
    ImageNodeView, ImageSync, ImageView, MasterInfo, NodeView, ServiceView, ToMinion, WaitingNode,
};
use phoenix_model::spec::{SpecError, SpecErrors, parse_specs};
use phoenix_model::status::{NodeStats, ServiceState, ServiceStatus, now_ms};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::registry::{ImageRef, Registry, RegistryError};
use crate::store::{Node, Service, Store, StoreError};
use phoenix_model::keys::fingerprint;
use phoenix_overlay::{Overlay, PeerConfig};

/// An error an API caller sees; the message says what and why.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Spec(#[from] SpecErrors),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Refused(String),
}

/// What a minion reported last about itself.
#[derive(Clone, Debug, Default)]
pub struct NodeSeen {
    pub last_seen: u64,
    pub version: Option<String>,
    pub stats: Option<NodeStats>,
    /// Its image cache, as last reported.
    pub images: Option<ImageSync>,
}

/// The write end of a connected minion's link.
pub struct Link {
    /// Identifies the connection, so a stale one cannot unregister a newer.
    pub conn: u64,
    pub tx: mpsc::UnboundedSender<ToMinion>,
}

/// Log output on its way from a minion to a CLI.
pub enum LogEvent {
    Data(String),
    End(Option<String>),
}

/// Policy knobs from the master's command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub auto_accept: bool,
    pub node_timeout: std::time::Duration,
}

/// The overlay peer for an accepted node: its overlay address, reachable at
/// its public IP (the minion keeps the path open with keepalives; the
/// endpoint lets a restarted master reach it first).
pub fn peer_config(n: &Node) -> PeerConfig {
    PeerConfig {
        key: n.key.clone(),
        allowed: n.overlay_ip.map(|ip| vec![(ip, 128)]).unwrap_or_default(),
        endpoint: Some(std::net::SocketAddr::new(n.public_ip, n.wg_port)),
        keepalive: None,
    }
}

pub struct Hub {
    store: Mutex<Store>,
    pub registry: Registry,
    pub info: MasterInfo,
    pub overlay: Option<Arc<Overlay>>,
    pub settings: Settings,
    links: Mutex<HashMap<String, Link>>,
    statuses: Mutex<HashMap<String, ServiceStatus>>,
    seen: Mutex<HashMap<String, NodeSeen>>,
    /// Bumped whenever a reported status changes (for `Wait`).
    status_changes: watch::Sender<u64>,
    /// Bumped whenever a node is accepted or rejected (for waiting links).
    membership: watch::Sender<u64>,
    /// Open log streams: id → (node, where the lines go).
    streams: Mutex<HashMap<u64, (String, mpsc::UnboundedSender<LogEvent>)>>,
    next_id: AtomicU64,
    /// Asks the registry watcher to collect garbage (after services change).
    collect: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind,
    // still consistent enough to serve; never poison the whole master.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a deploy creates services or changes existing ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    Deploy,
    Update,
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
            links: Mutex::default(),
            statuses: Mutex::default(),
            seen: Mutex::default(),
            status_changes: watch::channel(0).0,
            membership: watch::channel(0).0,
            streams: Mutex::default(),
            next_id: AtomicU64::new(1),
            collect: tokio::sync::Notify::new(),
        }
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    // ------------------------------------------------------------ nodes

    pub fn master_info(&self) -> Result<MasterInfo, ApiError> {
        let mut info = self.info.clone();
        info.next_minion_ip = self.store().read()?.next_node_ip()?;
        Ok(info)
    }

    pub fn node(&self, name: &str) -> Result<Option<Node>, ApiError> {
        Ok(self.store().read()?.node(name)?)
    }

    pub fn waiting(&self) -> Result<Vec<WaitingNode>, ApiError> {
        let nodes = self.store().read()?.nodes(false)?;
        Ok(nodes
            .into_iter()
            .map(|n| WaitingNode {
                fingerprint: fingerprint(&n.key),
                token_proof: n.token_proof,
                name: n.name,
                key: n.key,
                public_ip: n.public_ip,
                private_ip: n.private_ip,
                requested_at: n.requested_at,
                version: n.version,
            })
            .collect())
    }

    pub fn membership(&self) -> watch::Receiver<u64> {
        self.membership.subscribe()
    }

    /// Records a waiting node as accepted; [`Hub::admit`] then lets it in.
    pub fn accept(&self, actor: &str, name: &str) -> Result<Node, ApiError> {
        self.store().write(|tx| -> Result<Node, ApiError> {
            let node = match tx.node(name)? {
                Some(n) if n.accepted => {
                    return Err(ApiError::Refused(format!(
                        "node {name:?} is already accepted"
                    )));
                }
                Some(n) => n,
                None => return Err(no_waiting(name)),
            };
            let ip = tx.next_node_ip()?;
            tx.accept_node(name, ip)?;
            let node = tx.node(name)?.unwrap_or(node);
            tx.audit(actor, "accept", name, None, Some(&json!(node)))?;
            Ok(node)
        })
    }

    /// Adds an accepted node's overlay peer, then wakes whoever waits on its
    /// admission (its held join connection, a waiting link).
    pub async fn admit(&self, node: &Node) -> Result<Value, ApiError> {
        if let Some(o) = &self.overlay {
            o.set_peer(&peer_config(node)).await.map_err(|e| {
                ApiError::Refused(format!(
                    "node {:?} is accepted, but its overlay peer failed: {e}",
                    node.name
                ))
            })?;
        }
        self.membership.send_modify(|n| *n += 1);
        tracing::info!(node = %node.name, ip = ?node.overlay_ip, "node accepted");
        Ok(json!(node))
    }

    /// Removes an accepted node, its key and its overlay peer; refused while
    /// services are placed on it.
    pub async fn forget(&self, actor: &str, name: &str) -> Result<Value, ApiError> {
        let node = self.store().write(|tx| -> Result<Node, ApiError> {
            let node = match tx.node(name)? {
                Some(n) if n.accepted => n,
                Some(_) => {
                    return Err(ApiError::Refused(format!(
                        "node {name:?} is waiting, not accepted; use `phoenix reject {name}`"
                    )));
                }
                None => return Err(ApiError::Refused(format!("no node {name:?} (see `phoenix nodes`)"))),
            };
            let placed: Vec<String> = tx.services_on(name)?.into_iter().map(|s| s.spec.name).collect();
            if !placed.is_empty() {
                return Err(ApiError::Refused(format!(
                    "node {name:?} still runs {}; `phoenix del` them or `phoenix update` them onto another machine first",
                    placed.join(", ")
                )));
            }
            tx.delete_node(name)?;
            tx.audit(actor, "forget", name, Some(&json!(node)), None)?;
            Ok(node)
        })?;
        if let Some(o) = &self.overlay {
            o.remove_peer(&node.key).await.map_err(|e| {
                ApiError::Refused(format!(
                    "node {name:?} is forgotten, but removing its peer failed: {e}"
                ))
            })?;
        }
        // Dropping the link's sender ends its writer and closes the connection.
        lock(&self.links).remove(name);
        lock(&self.seen).remove(name);
        self.membership.send_modify(|n| *n += 1);
        tracing::info!(node = name, "node forgotten");
        Ok(json!({ "forgotten": name }))
    }

    pub fn reject(&self, actor: &str, name: &str) -> Result<Value, ApiError> {
        self.store().write(|tx| -> Result<(), ApiError> {
            match tx.node(name)? {
                Some(n) if !n.accepted => {
                    tx.delete_node(name)?;
                    tx.audit(actor, "reject", name, Some(&json!(n)), None)?;
                    Ok(())
                }
                Some(_) => Err(ApiError::Refused(format!(
                    "node {name:?} is already accepted; rejecting is for waiting requests"
                ))),
                None => Err(no_waiting(name)),
            }
        })?;
        self.membership.send_modify(|n| *n += 1);
        Ok(json!({ "rejected": name }))
    }

    pub fn nodes(&self) -> Result<Vec<NodeView>, ApiError> {
        let (nodes, counts) = {
            let mut store = self.store();
            let tx = store.read()?;
            let mut counts: HashMap<String, usize> = HashMap::new();
            for s in tx.services()? {
                *counts.entry(s.spec.machine).or_default() += 1;
            }
            (tx.nodes(true)?, counts)
        };
        let links = lock(&self.links);
        let seen = lock(&self.seen);
        Ok(nodes
            .into_iter()
            .map(|n| {
                let s = seen.get(&n.name).cloned().unwrap_or_default();
                NodeView {
                    state: if links.contains_key(&n.name) {
                        "reachable"
                    } else {
                        "unreachable"
                    }
                    .into(),
                    services: counts.get(&n.name).copied().unwrap_or(0),
                    overlay_ip: n.overlay_ip.unwrap_or(Ipv6Addr::UNSPECIFIED),
                    public_ip: n.public_ip,
                    private_ip: n.private_ip,
                    key: n.key,
                    last_seen: (s.last_seen > 0).then_some(s.last_seen),
                    version: s.version,
                    stats: s.stats,
                    name: n.name,
                }
            })
            .collect())
    }

    // ------------------------------------------------------------ services

    /// Validates a spec file against the cluster and applies it whole, or
    /// changes nothing.
    pub fn apply(
        &self,
        actor: &str,
        mode: Apply,
        source: &str,
        text: &str,
    ) -> Result<Value, ApiError> {
        let specs = parse_specs(source, text)?;
        // Hash images before taking the store lock: it can take a while.
        let mut images: HashMap<String, Result<ImageRef, String>> = HashMap::new();
        for s in &specs {
            images
                .entry(s.registry_file().0)
                .or_insert_with_key(|file| self.registry.resolve(file).map_err(|e| e.to_string()));
        }
        let fail = |errors| {
            ApiError::Spec(SpecErrors {
                file: source.to_owned(),
                errors,
            })
        };
        let mut touched = BTreeSet::new();
        let applied = self.store().write(|tx| -> Result<Vec<Value>, ApiError> {
            let mut errors = Vec::new();
            let mut existing = Vec::with_capacity(specs.len());
            let mut ip_owner: HashMap<Ipv6Addr, String> = HashMap::new();
            for s in tx.services()? {
                ip_owner.insert(s.ip, s.spec.name);
            }
            for (i, spec) in specs.iter().enumerate() {
                let index = (specs.len() > 1).then_some(i);
                let mut err = |field: &str, reason: String| {
                    errors.push(SpecError::new(Some(field), reason).at(index, Some(&spec.name)));
                };
                let old = tx.service(&spec.name)?;
                match (mode, &old) {
                    (Apply::Deploy, Some(_)) => err(
                        "name",
                        format!("service {:?} already exists; use `phoenix update` to change it", spec.name),
                    ),
                    (Apply::Update, None) => err(
                        "name",
                        format!("no service {:?}; use `phoenix deploy` to create it", spec.name),
                    ),
                    _ => {}
                }
                match tx.node(&spec.machine)? {
                    Some(n) if n.accepted => {}
                    Some(_) => err(
                        "machine",
                        format!(
                            "machine {:?} has asked to join but is not accepted yet (`phoenix accept {}`)",
                            spec.machine, spec.machine
                        ),
                    ),
                    None => {
                        let known: Vec<String> = tx.nodes(true)?.into_iter().map(|n| n.name).collect();
                        err(
                            "machine",
                            format!(
                                "unknown machine {:?}; accepted machines: {}",
                                spec.machine,
                                if known.is_empty() { "none".into() } else { known.join(", ") }
                            ),
                        );
                    }
                }
                if let Some(Err(e)) = images.get(&spec.registry_file().0) {
                    err("image", e.clone());
                }
                if let Some(ip) = spec.ip
                    && let Some(owner) = ip_owner.get(&ip)
                    && *owner != spec.name
                {
                    err("ip", format!("address {ip} is already used by service {owner:?}"));
                }
                existing.push(old);
            }
            if !errors.is_empty() {
                return Err(fail(errors));
            }
            let mut used = tx.used_ips()?;
            let mut next = 0u64;
            let mut applied = Vec::with_capacity(specs.len());
            for (spec, old) in specs.iter().zip(existing) {
                let ip = match (spec.ip, &old) {
                    (Some(ip), _) => ip,
                    (None, Some(o)) => o.ip,
                    (None, None) => loop {
                        let ip = net::service_ip(next);
                        next += 1;
                        if !used.contains(&ip) && !ip_owner.contains_key(&ip) {
                            break ip;
                        }
                    },
                };
                if let Some(o) = &old {
                    used.remove(&o.ip);
                }
                used.insert(ip);
                let image = match images.get(&spec.registry_file().0) {
                    Some(Ok(r)) => r.clone(),
                    _ => unreachable!("image errors were reported above"),
                };
                let svc = Service {
                    spec: spec.clone(),
                    ip,
                    image_hash: image.hash,
                    image_size: image.size,
                    generation: old.as_ref().map_or(1, |o| o.generation + 1),
                };
                tx.put_service(&svc)?;
                touched.insert(spec.machine.clone());
                if let Some(o) = &old
                    && o.spec.machine != spec.machine
                {
                    touched.insert(o.spec.machine.clone());
                }
                let action = if old.is_some() { "update" } else { "deploy" };
                tx.audit(actor, action, &spec.name, old.as_ref().map(Service::to_json).as_ref(), Some(&svc.to_json()))?;
                applied.push(json!({
                    "name": spec.name, "machine": spec.machine, "ip": ip, "generation": svc.generation,
                }));
            }
            for m in &touched {
                tx.bump_revision(m)?;
            }
            Ok(applied)
        })?;
        for m in &touched {
            self.push_desired(m);
        }
        self.collect.notify_one();
        Ok(Value::Array(applied))
    }

    pub fn delete(&self, actor: &str, name: &str) -> Result<Value, ApiError> {
        let svc = self.store().write(|tx| -> Result<Service, ApiError> {
            let svc = tx.service(name)?.ok_or_else(|| no_service(name))?;
            tx.delete_service(name)?;
            tx.bump_revision(&svc.spec.machine)?;
            tx.audit(actor, "del", name, Some(&svc.to_json()), None)?;
            Ok(svc)
        })?;
        lock(&self.statuses).remove(name);
        self.push_desired(&svc.spec.machine);
        self.collect.notify_one();
        Ok(json!({ "deleted": name, "machine": svc.spec.machine }))
    }

    pub fn info(&self, name: &str) -> Result<Value, ApiError> {
        let svc = self
            .store()
            .read()?
            .service(name)?
            .ok_or_else(|| no_service(name))?;
        Ok(svc.to_json())
    }

    pub fn status(&self, name: &str) -> Result<ServiceView, ApiError> {
        let svc = self
            .store()
            .read()?
            .service(name)?
            .ok_or_else(|| no_service(name))?;
        Ok(self.view(&svc))
    }

    pub fn services(&self) -> Result<Vec<ServiceView>, ApiError> {
        let services = self.store().read()?.services()?;
        Ok(services.iter().map(|s| self.view(s)).collect())
    }

    fn view(&self, svc: &Service) -> ServiceView {
        let st = lock(&self.statuses).get(&svc.spec.name).cloned();
        let reachable = lock(&self.links).contains_key(&svc.spec.machine);
        ServiceView {
            name: svc.spec.name.clone(),
            machine: svc.spec.machine.clone(),
            kind: svc.spec.kind.as_str().into(),
            duration: svc.spec.duration.as_str().into(),
            ip: svc.ip,
            image: svc.spec.image.clone(),
            generation: svc.generation,
            state: st.as_ref().map_or("pending", |s| s.state.as_str()).into(),
            pid: st.as_ref().and_then(|s| s.pid),
            restarts: st.as_ref().map_or(0, |s| s.restarts),
            health: st.as_ref().map_or("-", |s| s.health.as_str()).into(),
            last_exit: st.as_ref().and_then(|s| s.last_exit),
            limits: st.as_ref().and_then(|s| s.limits.clone()),
            since: st.as_ref().map(|s| s.since),
            message: st.and_then(|s| s.message),
            node_reachable: reachable,
        }
    }

    /// Waits until every named service reports its current generation as
    /// settled (see below), or the timeout passes.
    pub async fn wait(
        &self,
        names: &[String],
        timeout: std::time::Duration,
    ) -> Result<Vec<ServiceView>, ApiError> {
        let mut changes = self.status_changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        // What "settled" means per service, read from the store once.
        let wanted: Vec<(String, u64, bool)> = {
            let mut store = self.store();
            let tx = store.read()?;
            names
                .iter()
                .map(|n| {
                    let s = tx.service(n)?.ok_or_else(|| no_service(n))?;
                    Ok((
                        s.spec.name,
                        s.generation,
                        s.spec.duration == phoenix_model::spec::Duration::Oneshot,
                    ))
                })
                .collect::<Result<_, ApiError>>()?
        };
        let pending = || -> Vec<String> {
            let statuses = lock(&self.statuses);
            wanted
                .iter()
                .filter(|(name, generation, oneshot)| {
                    // A daemon has settled once it runs; a oneshot once it ended.
                    let done: &[ServiceState] = if *oneshot {
                        &[ServiceState::Exited, ServiceState::Failed]
                    } else {
                        &[ServiceState::Running, ServiceState::Failed]
                    };
                    !statuses
                        .get(name)
                        .is_some_and(|s| s.generation == *generation && done.contains(&s.state))
                })
                .map(|(name, _, _)| name.clone())
                .collect()
        };
        loop {
            let left = pending();
            if left.is_empty() {
                return names.iter().map(|n| self.status(n)).collect();
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    let detail: Vec<String> = left
                        .iter()
                        .map(|n| {
                            format!(
                                "{n} ({})",
                                self.status(n).map(|v| v.state).unwrap_or_default()
                            )
                        })
                        .collect();
                    return Err(ApiError::Refused(format!(
                        "timed out after {} ms waiting for: {}",
                        timeout.as_millis(),
                        detail.join(", ")
                    )));
                }
            }
        }
    }

    // ------------------------------------------------------------ links

    /// Registers a minion's connection, replacing an older one.
    pub fn connect(&self, name: &str, version: &str, tx: mpsc::UnboundedSender<ToMinion>) -> u64 {
        let conn = self.next_id();
        lock(&self.links).insert(name.to_owned(), Link { conn, tx });
        let mut seen = lock(&self.seen);
        let s = seen.entry(name.to_owned()).or_default();
        s.last_seen = now_ms();
        s.version = Some(version.to_owned());
        conn
    }

    pub fn disconnect(&self, name: &str, conn: u64) {
        let mut links = lock(&self.links);
        if links.get(name).is_some_and(|l| l.conn == conn) {
            links.remove(name);
            // Log streams from that node end with it.
            lock(&self.streams).retain(|_, (node, tx)| {
                if node != name {
                    return true;
                }
                let _ = tx.send(LogEvent::End(Some(format!(
                    "machine {name:?} disconnected"
                ))));
                false
            });
        }
        drop(links);
        self.status_changes.send_modify(|n| *n += 1);
    }

    pub fn send(&self, node: &str, msg: ToMinion) -> bool {
        lock(&self.links)
            .get(node)
            .is_some_and(|l| l.tx.send(msg).is_ok())
    }

    /// Pushes a node its whole desired set, if it is connected.
    pub fn push_desired(&self, node: &str) {
        // Read and send under the store lock: a later change cannot commit
        // between them, so sets go out in revision order even when API
        // calls race (each send carries the newest state at its time).
        let mut store = self.store();
        let set = match store.read().and_then(|tx| tx.desired_set(node)) {
            Ok(set) => set,
            Err(e) => {
                tracing::error!(node, "cannot read desired set: {e}");
                return;
            }
        };
        tracing::debug!(
            node,
            revision = set.revision,
            services = set.services.len(),
            "push desired set"
        );
        self.send(node, ToMinion::Desired(set));
        drop(store);
    }

    pub fn report_status(&self, node: &str, services: Vec<ServiceStatus>, full: bool) {
        {
            let mut statuses = lock(&self.statuses);
            if full {
                let mine: Vec<String> = self
                    .store()
                    .read()
                    .and_then(|tx| tx.services_on(node))
                    .map(|v| v.into_iter().map(|s| s.spec.name).collect())
                    .unwrap_or_default();
                for name in mine {
                    statuses.remove(&name);
                }
            }
            for s in services {
                statuses.insert(s.name.clone(), s);
            }
        }
        self.touch(node);
        self.status_changes.send_modify(|n| *n += 1);
    }

    pub fn report_gone(&self, node: &str, names: Vec<String>) {
        let mut statuses = lock(&self.statuses);
        for n in names {
            statuses.remove(&n);
        }
        drop(statuses);
        self.touch(node);
    }

    pub fn report_images(&self, node: &str, images: ImageSync) {
        let mut seen = lock(&self.seen);
        let s = seen.entry(node.to_owned()).or_default();
        s.last_seen = now_ms();
        s.images = Some(images);
    }

    pub fn report_node(&self, node: &str, stats: NodeStats) {
        let mut seen = lock(&self.seen);
        let s = seen.entry(node.to_owned()).or_default();
        s.last_seen = now_ms();
        s.stats = Some(stats);
    }

    pub fn touch(&self, node: &str) {
        lock(&self.seen)
            .entry(node.to_owned())
            .or_default()
            .last_seen = now_ms();
    }

    // ------------------------------------------------------------ images

    /// Sends a message to every connected minion.
    pub fn broadcast(&self, msg: &ToMinion) {
        for link in lock(&self.links).values() {
            let _ = link.tx.send(msg.clone());
        }
    }

    /// Resolves when an API change asked for a collection.
    pub async fn collect_requested(&self) {
        self.collect.notified().await;
    }

    /// One round of registry upkeep (blocking): index changed files (or all
    /// of them), then, if asked, delete chunks and indexes that neither a
    /// registry image nor a deployed service uses.
    pub fn registry_round(&self, rescan: bool, names: BTreeSet<String>, collect: bool) {
        if rescan {
            for (name, e) in self.registry.scan() {
                tracing::warn!(image = %name, "cannot index registry file: {e}");
            }
        }
        for name in names {
            match self.registry.refresh(&name) {
                Ok(Some(r)) => {
                    tracing::debug!(image = %name, hash = %r.hash, "registry file indexed")
                }
                Ok(None) => tracing::info!(image = %name, "registry file removed"),
                Err(e) => tracing::warn!(image = %name, "cannot index registry file: {e}"),
            }
        }
        if !collect {
            return;
        }
        let pinned = match self.store().read().and_then(|tx| tx.services()) {
            Ok(v) => v.into_iter().map(|s| s.image_hash).collect(),
            Err(e) => {
                tracing::error!("cannot read services for garbage collection: {e}");
                return;
            }
        };
        match self.registry.collect(&pinned) {
            Ok(c) if c.chunks > 0 || c.indexes > 0 => tracing::info!(
                indexes = c.indexes,
                chunks = c.chunks,
                bytes = c.bytes,
                "registry garbage collected"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("registry garbage collection: {e}"),
        }
    }

    /// The registry's images and where every accepted node stands with
    /// each.
    pub fn images(&self) -> Result<Vec<ImageView>, ApiError> {
        let entries = self.registry.entries();
        let unique = crate::registry::unique_bytes(&entries);
        let nodes = self.store().read()?.nodes(true)?;
        let seen = lock(&self.seen).clone();
        Ok(entries
            .iter()
            .zip(unique)
            .map(|((name, e), unique_bytes)| {
                let hash = &e.index.file_hash;
                let nodes = nodes
                    .iter()
                    .map(|n| {
                        let sync = seen.get(&n.name).and_then(|s| s.images.as_ref());
                        node_image_view(&n.name, hash, e.size, sync)
                    })
                    .collect();
                ImageView {
                    name: name.clone(),
                    hash: hash.clone(),
                    size: e.size,
                    chunks: e.index.chunks.len(),
                    unique_bytes,
                    nodes,
                }
            })
            .collect())
    }

    // ------------------------------------------------------------ logs

    /// Opens a log stream from the minion that runs `name`.
    pub fn open_logs(
        &self,
        name: &str,
        tail: usize,
        follow: bool,
    ) -> Result<(u64, String, mpsc::UnboundedReceiver<LogEvent>), ApiError> {
        let svc = self
            .store()
            .read()?
            .service(name)?
            .ok_or_else(|| no_service(name))?;
        let stream = self.next_id();
        let (tx, rx) = mpsc::unbounded_channel();
        let node = svc.spec.machine;
        lock(&self.streams).insert(stream, (node.clone(), tx));
        let sent = self.send(
            &node,
            ToMinion::Logs {
                stream,
                service: name.to_owned(),
                tail,
                follow,
            },
        );
        if !sent {
            lock(&self.streams).remove(&stream);
            return Err(ApiError::Refused(format!(
                "machine {node:?}, which runs {name:?}, is not connected to the master; its logs are on that machine"
            )));
        }
        Ok((stream, node, rx))
    }

    pub fn close_logs(&self, stream: u64, node: &str) {
        if lock(&self.streams).remove(&stream).is_some() {
            self.send(node, ToMinion::LogsCancel { stream });
        }
    }

    pub fn log_event(&self, stream: u64, event: LogEvent) {
        let mut streams = lock(&self.streams);
        let end = matches!(event, LogEvent::End(_));
        if let Some((_, tx)) = streams.get(&stream) {
            let _ = tx.send(event);
        }
        if end {
            streams.remove(&stream);
        }
    }
}

/// One node's state for one image, from its last report.
fn node_image_view(node: &str, hash: &str, size: u64, sync: Option<&ImageSync>) -> ImageNodeView {
    let mut v = ImageNodeView {
        node: node.to_owned(),
        state: "unknown".into(),
        error: None,
        done: 0,
        total: size,
    };
    let Some(sync) = sync else { return v };
    if sync.held.iter().any(|h| h == hash) {
        v.state = "synced".into();
        v.done = size;
    } else if let Some(f) = sync.fetching.as_ref().filter(|f| f.hash == hash) {
        v.state = "syncing".into();
        v.done = f.done;
        v.total = f.total;
    } else if let Some(e) = sync.failed.get(hash) {
        v.state = "failed".into();
        v.error = Some(e.clone());
    } else {
        v.state = "pending".into();
    }
    v
}

fn no_service(name: &str) -> ApiError {
    ApiError::Refused(format!("no service {name:?} (see `phoenix services`)"))
}

fn no_waiting(name: &str) -> ApiError {
    ApiError::Refused(format!(
        "no join request from {name:?} is waiting (see `phoenix waiting`)"
    ))
}
