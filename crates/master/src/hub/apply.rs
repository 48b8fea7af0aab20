//! Applying changes: deploy, update and del, and the checks that guard them.
//!
//! A spec file is checked in three steps, and applied whole or not at all:
//! 1. on its own ([`phoenix_model::spec::parse_specs`]): fields and values;
//! 2. against the registry, before the store is locked (it can take a
//!    while): each image must be there, and a `docker` image must be a
//!    container image that opens ([`phoenix_image::open`]), so that a bad
//!    file is refused at the door with the user's names, not by a minion
//!    looping in backoff. The verdict is cached per file version and tag, so
//!    a large image is read once, not on every deploy;
//! 3. against the cluster, in the store transaction that then writes it:
//!    names exist or not as the verb wants, machines are accepted members,
//!    addresses are free, every `link` names a service that is stored or in
//!    the same file (a restart does not ask: it applies the stored spec).
//!
//! Every refusal reports all errors at once and changes nothing. After a
//! commit, every node whose set changed gets it from the reconciler (a
//! service's address moving changes every other node's mesh peers, and its
//! creation or deletion the links of those that name it: `hub/mesh.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv6Addr;
use std::sync::Mutex;

use phoenix_model::net;
use phoenix_model::proto::{Applied, Deleted, DesiredSet, instance_key};
use phoenix_model::spec::{
    Duration, Kind, Spec, SpecError, SpecErrors, edit_distance, parse_specs,
};
use phoenix_model::status::now_ms;

use super::{ApiError, Hub};
use crate::lock;
use crate::registry::ImageRef;
use crate::store::{NextVersion, Run, Service, StoreError};

/// Whether a deploy creates services or changes existing ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    Deploy,
    Update,
    /// Stored specs applied again: a new generation and the registry's
    /// current image, nothing else changed.
    Restart,
    /// A tree of spec files (`phoenix apply`, `hub::sources`): creates and
    /// changes at once, only services of the same source (or new ones).
    Tree,
}

/// What a [`Apply::Tree`] change adds to the specs it writes: the source
/// they come from, and the services of that source to delete (`--prune`).
#[derive(Clone, Copy, Debug)]
pub(super) struct TreeChange<'a> {
    pub source: &'a str,
    /// What the audit rows name after `via`: the source, or for a git
    /// source `git:NAME@COMMIT` (`hub::git`).
    pub via: &'a str,
    pub prune: &'a [String],
    /// Check everything a real apply would, then change nothing (`diff`).
    pub dry_run: bool,
}

impl Apply {
    /// The action as the audit log names it.
    fn action(self) -> &'static str {
        match self {
            Apply::Deploy => "deploy",
            Apply::Update => "update",
            Apply::Restart => "restart",
            Apply::Tree => "apply",
        }
    }
}

/// Whether a change from `old` to `new` (at address `ip`) starts the new
/// version beside the old one: a daemon the proxy serves that stays one,
/// at the same address.
fn side_by_side(old: &Service, new: &Spec, ip: Ipv6Addr) -> bool {
    old.spec.duration == Duration::Daemon
        && new.duration == Duration::Daemon
        && old.spec.proxyname.is_some()
        && new.proxyname.is_some()
        && old.ip == ip
}

/// Whether `new` changes `old` only in where the proxy routes it
/// (`proxyname`, `proxypath`, `proxyauth`), and changes something there.
/// Only the master's proxy acts on those (minions of this version do not
/// get them: `reconcile::without_routing`), so the running version serves
/// on and only the route table changes.
fn routes_only(old: &Spec, new: &Spec) -> bool {
    let unrouted = |s: &Spec| {
        let mut s = s.clone();
        s.clear_routing();
        s
    };
    old != new && unrouted(old) == unrouted(new)
}

/// Why a `link` name is refused: no such service, and the closest name
/// there is, if one is close enough to be a typo (a third of its letters).
fn no_such_link(link: &str, names: &BTreeSet<String>) -> String {
    let closest = names
        .iter()
        .map(|n| (edit_distance(link, n), n))
        .min_by_key(|(d, _)| *d)
        .filter(|(d, _)| *d <= (link.chars().count() / 3).max(1));
    match closest {
        Some((_, n)) => format!("no service named {link:?}; did you mean {n:?}?"),
        None => format!("no service named {link:?}; deploy it first, or in the same file"),
    }
}

/// Refuses a change after which one of `machines` would get a desired
/// set of more than `limit` bytes (as JSON, as it is sent): the set must
/// always fit in one link frame. Names each machine, its size and the limit.
pub(super) fn desired_sets_fit(
    sets: &BTreeMap<String, DesiredSet>,
    machines: &BTreeSet<String>,
    limit: usize,
) -> Result<(), ApiError> {
    let too_large: Vec<String> = machines
        .iter()
        .filter_map(|m| {
            let size = serialized_size(sets.get(m)?);
            (size > limit).then(|| {
                format!(
                    "the desired set of machine {m:?} would be {size} bytes ({}), over the limit of {limit} bytes ({})",
                    mib(size),
                    mib(limit)
                )
            })
        })
        .collect();
    if too_large.is_empty() {
        return Ok(());
    }
    Err(ApiError::Invalid(format!(
        "{}; nothing was changed: make the specs smaller (large args or env) or place some services on another machine",
        too_large.join("; ")
    )))
}

/// Bytes of `value` as JSON, counted without keeping them.
fn serialized_size(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serializing plain data into a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// A service as the audit log records it: its spec with its address, and
/// the image version and generation (what a restart changes).
fn audited(svc: &Service) -> serde_json::Value {
    let mut v = svc.to_json();
    if let Some(o) = v.as_object_mut() {
        o.insert("image_hash".into(), svc.image_hash.clone().into());
        o.insert("generation".into(), svc.generation.into());
    }
    v
}

/// Verdicts on container image files: (file hash, tag) → why it cannot run,
/// if it cannot. A file's hash names its content, so a verdict never goes
/// stale; a replaced file has a new hash and is checked afresh.
#[derive(Default)]
pub(super) struct ImageFormats(Mutex<HashMap<ImageVersion, Result<(), String>>>);

/// One image in one version of a registry file: (file hash, tag).
type ImageVersion = (String, Option<String>);

/// Verdicts kept at most; past this the cache starts over (each entry is
/// small, but a registry churned for months should not grow it forever).
const MAX_IMAGE_VERDICTS: usize = 4096;

impl ImageFormats {
    /// The verdict on this version of a file, from the cache or from
    /// `open` (called without the lock held: opening a large image takes a
    /// while, and another deploy should not wait on it).
    fn check(
        &self,
        hash: &str,
        tag: Option<&str>,
        open: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        let key = (hash.to_owned(), tag.map(str::to_owned));
        if let Some(verdict) = lock(&self.0).get(&key) {
            return verdict.clone();
        }
        let verdict = open();
        let mut cache = lock(&self.0);
        if cache.len() >= MAX_IMAGE_VERDICTS {
            cache.clear();
        }
        cache.insert(key, verdict.clone());
        verdict
    }
}

impl Hub {
    /// Validates a spec file against the registry and the cluster and
    /// applies it whole, or changes nothing.
    pub fn apply(
        &self,
        actor: &str,
        mode: Apply,
        source: &str,
        text: &str,
    ) -> Result<Vec<Applied>, ApiError> {
        self.apply_with_env_files(actor, mode, source, text, &[])
    }

    /// [`Hub::apply`] of a spec file sent with the env files its specs
    /// name (`phoenix deploy`/`update`), each by `env_file_key`.
    pub fn apply_with_env_files(
        &self,
        actor: &str,
        mode: Apply,
        source: &str,
        text: &str,
        env_files: &[phoenix_model::proto::SourceFile],
    ) -> Result<Vec<Applied>, ApiError> {
        let mut specs = parse_specs(source, text)?;
        phoenix_model::spec::load_env_files(&mut specs, source, env_files)?;
        self.apply_specs(actor, mode, source, &specs)
    }

    /// Restarts services on their machines: a new generation each, with
    /// the registry's current version of its image. All or nothing.
    pub fn restart(&self, actor: &str, names: &[String]) -> Result<Vec<Applied>, ApiError> {
        let specs = {
            let mut store = self.store();
            let tx = store.read()?;
            names
                .iter()
                .map(|n| {
                    tx.service(n)?
                        .map(|s| s.spec)
                        .ok_or_else(|| ApiError::no_service(n))
                })
                .collect::<Result<Vec<Spec>, ApiError>>()?
        };
        if specs.is_empty() {
            return Err(ApiError::Invalid(
                "name at least one service to restart".into(),
            ));
        }
        self.apply_specs(actor, Apply::Restart, "restart", &specs)
    }

    fn apply_specs(
        &self,
        actor: &str,
        mode: Apply,
        source: &str,
        specs: &[Spec],
    ) -> Result<Vec<Applied>, ApiError> {
        self.apply_specs_of(actor, mode, source, specs, None)
    }

    /// Writes `specs` (and, for a tree, its source and its prunes) in one
    /// transaction after the checks, or changes nothing.
    pub(super) fn apply_specs_of(
        &self,
        actor: &str,
        mode: Apply,
        source: &str,
        specs: &[Spec],
        tree: Option<TreeChange<'_>>,
    ) -> Result<Vec<Applied>, ApiError> {
        // A tree's rows name where the change came from.
        let via;
        let actor = match tree {
            Some(t) => {
                via = format!("{actor} via {}", t.via);
                via.as_str()
            }
            None => actor,
        };
        let images = self.resolve_images(specs);
        let commit = !tree.as_ref().is_some_and(|t| t.dry_run);
        let fail = |errors| {
            ApiError::from(SpecErrors {
                file: source.to_owned(),
                errors,
            })
        };
        let ((applied, gone), changed) = self.change(commit, |tx| {
            let mut touched = BTreeSet::new();
            let mut errors = Vec::new();
            let sources = match tree {
                Some(_) => tx.service_sources()?,
                None => HashMap::new(),
            };
            let mut existing = Vec::with_capacity(specs.len());
            let mut ip_owner: HashMap<Ipv6Addr, String> = HashMap::new();
            // The services a `link` may name: stored ones and this file's.
            let mut names: BTreeSet<String> = specs.iter().map(|s| s.name.clone()).collect();
            for s in tx.services()? {
                ip_owner.insert(s.ip, s.spec.name.clone());
                for run in s.run.iter().chain(s.next.iter().map(|n| &n.run)) {
                    ip_owner.insert(run.own_ip, s.spec.name.clone());
                }
                names.insert(s.spec.name);
            }
            for ((i, spec), image) in specs.iter().enumerate().zip(&images) {
                let index = (specs.len() > 1).then_some(i);
                let mut err = |field: &str, reason: String| {
                    errors.push(SpecError::new(Some(field), reason).at(index, Some(&spec.name)));
                };
                let old = tx.service(&spec.name)?;
                match (mode, &old) {
                    (Apply::Deploy, Some(_)) => err(
                        "name",
                        format!(
                            "service {:?} already exists; use `phoenix update` to change it",
                            spec.name
                        ),
                    ),
                    (Apply::Update | Apply::Restart, None) => err(
                        "name",
                        format!("no service {:?}; use `phoenix deploy` to create it", spec.name),
                    ),
                    _ => {}
                }
                // Checked again here: the plan was read before this
                // transaction.
                if let (Some(t), Some(_)) = (tree, &old) {
                    let owner = sources.get(&spec.name).cloned().flatten();
                    if owner.as_deref() != Some(t.source) {
                        err("name", super::sources::not_ours(&spec.name, owner.as_deref()));
                    }
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
                    // A join request waits in memory, not in the store.
                    None if self.is_waiting(&spec.machine) => err(
                        "machine",
                        format!(
                            "machine {:?} has asked to join but is not accepted yet (`phoenix accept {}`)",
                            spec.machine, spec.machine
                        ),
                    ),
                    None => {
                        let known: Vec<String> =
                            tx.nodes(true)?.into_iter().map(|n| n.name).collect();
                        err(
                            "machine",
                            format!(
                                "unknown machine {:?}; accepted machines: {}",
                                spec.machine,
                                if known.is_empty() {
                                    "none".into()
                                } else {
                                    known.join(", ")
                                }
                            ),
                        );
                    }
                }
                if let Err(e) = image {
                    err("image", e.clone());
                }
                // Every secret it names exists (and none is given to a VM
                // image, whose environment is on QEMU's command line).
                let env_on_cmdline = spec.kind == Kind::Vm && {
                    let (file, _) = spec.registry_file();
                    phoenix_image::guest::is_vm_image(&file, &self.registry.dir().join(&file))
                };
                for (field, reason) in super::env::secret_errors(tx, spec, env_on_cmdline)? {
                    err(&field, reason);
                }
                if let Some(ip) = spec.ip
                    && let Some(owner) = ip_owner.get(&ip)
                    && *owner != spec.name
                {
                    err(
                        "ip",
                        format!("address {ip} is already used by service {owner:?}"),
                    );
                }
                // A restart applies the stored spec again, whatever became
                // of what it links to; `status` shows a dangling link.
                if mode != Apply::Restart {
                    for (i, link) in spec.link.iter().enumerate() {
                        if !names.contains(link) {
                            err(&format!("link[{i}]"), no_such_link(link, &names));
                        }
                    }
                }
                existing.push(old);
            }
            if !errors.is_empty() {
                return Err(fail(errors));
            }
            let mut used = tx.used_ips()?;
            let mut next = 0u64;
            let mut fresh_ip = |used: &HashSet<Ipv6Addr>| loop {
                let ip = net::service_ip(next);
                next += 1;
                if !used.contains(&ip) && !ip_owner.contains_key(&ip) {
                    break ip;
                }
            };
            let mut applied = Vec::with_capacity(specs.len());
            for ((spec, old), image) in specs.iter().zip(existing).zip(&images) {
                let ip = match (spec.ip, &old) {
                    (Some(ip), _) => ip,
                    (None, Some(o)) => o.ip,
                    (None, None) => fresh_ip(&used),
                };
                let Ok(image) = image else {
                    unreachable!("image errors were reported above");
                };
                // A change of routing alone: the stored spec changes, the
                // run and its generation stay, and the route table
                // (`master::front`) follows. Only where the minion takes
                // sets without routing fields (it sees no change): an older
                // one, or one not connected, would restart the run in
                // place, so the change goes as any other (beside, for a
                // proxied daemon).
                let routing = old.as_ref().filter(|o| {
                    matches!(mode, Apply::Update | Apply::Tree)
                        && o.next.is_none()
                        && o.ip == ip
                        && o.image_hash == image.hash
                        && routes_only(&o.spec, spec)
                        && self.takes_routing_free(&spec.machine)
                });
                touched.insert(spec.machine.clone());
                if let Some(o) = &old {
                    touched.insert(o.spec.machine.clone());
                    if let Some(n) = &o.next {
                        touched.insert(n.spec.machine.clone());
                    }
                }
                // A proxied daemon changes without downtime: its new
                // version starts beside the old one (`hub::rollout`).
                let beside = old.as_ref().filter(|o| {
                    routing.is_none()
                        && mode != Apply::Deploy
                        && side_by_side(o, spec, ip)
                        && self.runs_side_by_side(&spec.machine)
                });
                // What is stored, and what the audit row shows it becomes
                // (for an update beside, the version once switched).
                let (svc, generation) = if let Some(o) = routing {
                    let svc = Service {
                        spec: spec.clone(),
                        ..o.clone()
                    };
                    (svc, o.generation)
                } else if let Some(o) = beside {
                    let generation = o.generation.max(o.next.as_ref().map_or(0, |n| n.generation)) + 1;
                    let own_ip = fresh_ip(&used);
                    used.insert(own_ip);
                    let svc = Service {
                        next: Some(NextVersion {
                            spec: spec.clone(),
                            image_hash: image.hash.clone(),
                            image_size: image.size,
                            generation,
                            run: Run {
                                instance: instance_key(&spec.name, generation),
                                own_ip,
                            },
                            since: now_ms(),
                        }),
                        ..o.clone()
                    };
                    (svc, generation)
                } else {
                    if let Some(o) = &old {
                        used.remove(&o.ip);
                    }
                    used.insert(ip);
                    let svc = Service {
                        spec: spec.clone(),
                        ip,
                        image_hash: image.hash.clone(),
                        image_size: image.size,
                        generation: old.as_ref().map_or(1, |o| {
                            o.generation.max(o.next.as_ref().map_or(0, |n| n.generation)) + 1
                        }),
                        // The run that serves it stays the one to restart; an
                        // update in progress is replaced by this one.
                        run: old.as_ref().and_then(|o| o.run.clone()),
                        next: None,
                    };
                    let generation = svc.generation;
                    (svc, generation)
                };
                tx.put_service(&svc)?;
                if let Some(t) = tree {
                    tx.set_service_source(&spec.name, Some(t.source))?;
                }
                let becomes = match beside {
                    Some(_) => svc.promoted(),
                    None => Some(svc),
                };
                tx.audit(
                    actor,
                    mode.action(),
                    &spec.name,
                    old.as_ref().map(audited).as_ref(),
                    becomes.as_ref().map(audited).as_ref(),
                )?;
                applied.push(Applied {
                    name: spec.name.clone(),
                    machine: spec.machine.clone(),
                    ip,
                    generation,
                    beside: beside.is_some(),
                    routes_only: routing.is_some(),
                });
            }
            // A tree's services it no longer names, with `--prune`.
            let mut gone = Vec::new();
            if let Some(t) = tree {
                for name in t.prune {
                    let Some(svc) = tx.service(name)? else {
                        continue;
                    };
                    let owner = sources.get(name).cloned().flatten();
                    if owner.as_deref() != Some(t.source) {
                        return Err(ApiError::Conflict(super::sources::not_ours(
                            name,
                            owner.as_deref(),
                        )));
                    }
                    gone.push((name.clone(), svc.instance().to_owned(), svc.spec.machine.clone()));
                    touched.insert(svc.spec.machine.clone());
                    if let Some(n) = &svc.next {
                        gone.push((name.clone(), n.run.instance.clone(), n.spec.machine.clone()));
                        touched.insert(n.spec.machine.clone());
                    }
                    tx.delete_service(name)?;
                    tx.audit(actor, mode.action(), name, Some(&svc.to_json()), None)?;
                }
            }
            Ok(((applied, gone), touched))
        })?;
        if !commit {
            return Ok(applied);
        }
        for (name, key, node) in &gone {
            self.forget_status(name, key, node);
        }
        self.publish(&changed);
        self.request_collection();
        Ok(applied)
    }

    /// Each spec's image (hash and size), or why it cannot be used. Reads
    /// and hashes files: call it before locking the store.
    fn resolve_images(&self, specs: &[Spec]) -> Vec<Result<ImageRef, String>> {
        let mut resolved: HashMap<String, Result<ImageRef, String>> = HashMap::new();
        specs
            .iter()
            .map(|spec| {
                let (file, tag) = spec.registry_file();
                let image = resolved
                    .entry(file.clone())
                    .or_insert_with(|| self.registry.resolve(&file).map_err(|e| e.to_string()))
                    .clone()?;
                if spec.kind == Kind::Docker {
                    self.check_container_image(&file, tag.as_deref(), &image)?;
                }
                if spec.kind == Kind::Vm {
                    self.check_vm_image(&file, tag.as_deref(), &image)?;
                }
                Ok(image)
            })
            .collect()
    }

    /// Refuses a registry file that `phoenix-image` cannot open as a
    /// container image (with this tag), as the minion would.
    fn check_container_image(
        &self,
        file: &str,
        tag: Option<&str>,
        image: &ImageRef,
    ) -> Result<(), String> {
        let path = self.registry.dir().join(file);
        self.image_formats
            .check(&image.hash, tag, || {
                phoenix_image::open(&path, tag).map(drop).map_err(|e| {
                    // The user knows the file by its registry name, not by
                    // where the master keeps it.
                    e.to_string().replace(&path.display().to_string(), file)
                })
            })
            .map_err(|reason| {
                format!(
                    "registry file {file:?} is not a container image phoenix can run: {reason}; \
                     fix it, then replace it with `phoenix push FILE {file}`"
                )
            })
    }

    /// Refuses a registry file that is not a VM image the minion can boot
    /// (`phoenix_image::vm`: not zstd, a member outside its root, no
    /// kernel or root filesystem, ...), naming what is wrong. Cached per
    /// file version like container images (under a tag no container image
    /// can have).
    /// A file neither named `.zst` nor zstd is an OCI image to boot
    /// (`type: "vm"` with `image: app.tar:tag`): it is opened as a
    /// container image is.
    fn check_vm_image(
        &self,
        file: &str,
        tag: Option<&str>,
        image: &ImageRef,
    ) -> Result<(), String> {
        let path = self.registry.dir().join(file);
        if !phoenix_image::guest::is_vm_image(file, &path) {
            return self
                .image_formats
                .check(&image.hash, tag, || {
                    phoenix_image::open(&path, tag)
                        .map(drop)
                        .map_err(|e| e.to_string().replace(&path.display().to_string(), file))
                })
                .map_err(|reason| {
                    format!(
                        "registry file {file:?} is neither a VM image (a zstd tar) nor an OCI \
                         image phoenix can boot: {reason}; fix it, then replace it with \
                         `phoenix push FILE {file}`"
                    )
                });
        }
        self.image_formats
            .check(&image.hash, Some("vm image"), || {
                phoenix_image::vm::check(&path, 64 << 30)
                    .map(drop)
                    .map_err(|e| e.to_string().replace(&path.display().to_string(), file))
            })
            .map_err(|reason| {
                format!(
                    "registry file {file:?} is not a VM image phoenix can boot: {reason}; \
                     fix it, then replace it with `phoenix push FILE {file}`"
                )
            })
    }

    /// Deletes a service, also one whose stored spec fails the checks
    /// (deleting it is the way out the error names).
    pub fn delete(&self, actor: &str, name: &str) -> Result<Deleted, ApiError> {
        let ((machine, runs), changed) = self.write_change(|tx| {
            let (machine, old, runs) = match tx.service(name) {
                Ok(Some(svc)) => {
                    // Every run it has: the one that serves it, and an
                    // update's new version.
                    let mut runs = vec![(svc.instance().to_owned(), svc.spec.machine.clone())];
                    if let Some(n) = &svc.next {
                        runs.push((n.run.instance.clone(), n.spec.machine.clone()));
                    }
                    (svc.spec.machine.clone(), Some(svc.to_json()), runs)
                }
                Ok(None) => return Err(ApiError::no_service(name)),
                Err(StoreError::BadSpec { .. }) => {
                    let machine = tx
                        .service_machine(name)?
                        .ok_or_else(|| ApiError::no_service(name))?;
                    (machine.clone(), None, vec![(name.to_owned(), machine)])
                }
                Err(e) => return Err(e.into()),
            };
            tx.delete_service(name)?;
            tx.audit(actor, "del", name, old.as_ref(), None)?;
            let touched = runs.iter().map(|(_, m)| m.clone()).collect();
            Ok(((machine, runs), touched))
        })?;
        for (key, node) in &runs {
            self.forget_status(name, key, node);
        }
        self.publish(&changed);
        self.request_collection();
        Ok(Deleted {
            deleted: name.to_owned(),
            machine,
            stopped: false,
        })
    }

    /// The spec as stored, with the address it was given.
    pub fn info(&self, name: &str) -> Result<Spec, ApiError> {
        let svc = self
            .store()
            .read()?
            .service(name)?
            .ok_or_else(|| ApiError::no_service(name))?;
        let mut spec = svc.spec;
        spec.ip = Some(svc.ip);
        Ok(spec)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::Cell;
    use std::path::Path;

    use phoenix_model::proto::{ErrorKind, MAX_DESIRED_SET, MasterInfo, ToMinion};
    use tokio::sync::mpsc;

    use super::*;
    use crate::hub::Settings;
    use crate::registry::Registry;
    use crate::store::{Node, Store};

    /// A hub with one accepted machine `m1`, one waiting `m2`, and a binary
    /// `app` in its registry.
    /// A hub with m1 accepted and m2 waiting, and an `app` image.
    pub(in crate::hub) fn hub(dir: &Path) -> Hub {
        let mut store = Store::open(&dir.join("phoenix.db")).unwrap();
        store
            .write(|tx| -> Result<(), crate::store::StoreError> {
                for name in ["m1", "m2"] {
                    tx.insert_waiting(&Node {
                        name: name.into(),
                        key: format!("key-{name}"),
                        accepted: false,
                        public_ip: "10.0.0.2".parse().unwrap(),
                        private_ip: "10.1.0.2".parse().unwrap(),
                        overlay_ip: None,
                        wg_port: 51820,
                        token_proof: false,
                        version: "0".into(),
                        requested_at: 1,
                        accepted_at: None,
                        revision: 0,
                    })?;
                }
                tx.accept_node("m1", net::node_ip(1))
            })
            .unwrap();
        let registry = Registry::open(dir.join("registry")).unwrap();
        std::fs::write(dir.join("registry/app"), b"#!/bin/sh\n").unwrap();
        let info = MasterInfo {
            public_ip: "10.0.0.1".parse().unwrap(),
            key: "master-key".into(),
            overlay_ip: net::MASTER_IP,
            next_minion_ip: net::node_ip(2),
            join_port: 1,
            link_port: 2,
            wg_port: None,
            token: "t".into(),
            version: "0".into(),
        };
        let settings = Settings::new(false, std::time::Duration::from_secs(6));
        Hub::new(store, registry, info, None, settings)
    }

    fn spec(name: &str, machine: &str, image: &str, kind: &str) -> String {
        format!(r#"{{"machine":"{machine}","name":"{name}","image":"{image}","type":"{kind}"}}"#)
    }

    /// Nothing was written: no service, no audit row.
    fn assert_unchanged(hub: &Hub) {
        let mut store = hub.store();
        let tx = store.read().unwrap();
        assert!(tx.services().unwrap().is_empty());
        assert!(tx.audit_log(10).unwrap().is_empty());
    }

    fn desired(rx: &mut mpsc::UnboundedReceiver<ToMinion>) -> Option<(u64, Vec<String>)> {
        match rx.try_recv().ok()? {
            ToMinion::Desired(set) => Some((
                set.revision,
                set.services.into_iter().map(|a| a.spec.name).collect(),
            )),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn deploy_update_del_reply_typed_and_push_the_reconciled_set() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.connect("m1", "0", false, tx);

        let web = spec("web", "m1", "app", "binary");
        let applied = hub.apply("root", Apply::Deploy, "web.json", &web).unwrap();
        assert_eq!(
            applied,
            [Applied {
                name: "web".into(),
                machine: "m1".into(),
                ip: net::service_ip(0),
                generation: 1,
                beside: false,
                routes_only: false,
            }]
        );
        assert_eq!(desired(&mut rx), Some((1, vec!["web".to_owned()])));
        assert_eq!(hub.info("web").unwrap().ip, Some(net::service_ip(0)));

        let again = hub
            .apply("root", Apply::Deploy, "web.json", &web)
            .unwrap_err();
        assert_eq!(again.kind(), ErrorKind::Invalid);
        assert!(again.to_string().contains("already exists"), "{again}");
        assert_eq!(desired(&mut rx), None, "a refusal pushes nothing");

        let updated = hub.apply("root", Apply::Update, "web.json", &web).unwrap();
        assert_eq!(updated[0].generation, 2);
        assert_eq!(desired(&mut rx), Some((2, vec!["web".to_owned()])));

        assert_eq!(
            hub.delete("root", "web").unwrap(),
            Deleted {
                deleted: "web".into(),
                machine: "m1".into(),
                stopped: false,
            }
        );
        assert_eq!(desired(&mut rx), Some((3, vec![])));
        assert_eq!(
            hub.delete("root", "web").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(hub.info("web").unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(hub.status("web").unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn a_change_of_routing_alone_keeps_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.connect("m1", "0", false, tx);
        let with = |extra: &str| {
            format!(r#"{{"machine":"m1","name":"web","image":"app","type":"binary"{extra}}}"#)
        };
        let hash = format!("$2y$05${}", "a".repeat(53));
        hub.apply(
            "root",
            Apply::Deploy,
            "web.json",
            &with(r#","proxyname":"a.example""#),
        )
        .unwrap();
        assert_eq!(desired(&mut rx), Some((1, vec!["web".to_owned()])));

        let routed = with(&format!(
            r#","proxyname":"b.example","proxypath":"/shop","proxyauth":["ann:{hash}"]"#
        ));
        let applied = hub
            .apply("root", Apply::Update, "web.json", &routed)
            .unwrap();
        assert_eq!(
            (
                applied[0].generation,
                applied[0].routes_only,
                applied[0].beside
            ),
            (1, true, false)
        );
        // The minion gets its set again, the same run in it, and nothing
        // of the routing.
        let set = next_set(&mut rx).expect("the set is pushed");
        assert_eq!(set.services[0].generation, 1);
        assert_eq!(set.services[0].spec.proxyname, None);
        assert!(!serde_json::to_string(&set).unwrap().contains("$2y$"));
        let stored = hub.info("web").unwrap();
        assert_eq!(stored.proxyname.as_deref(), Some("b.example"));
        assert_eq!(stored.proxypath.as_deref(), Some("/shop"));
        let audit = hub.store().read().unwrap().audit_log(1).unwrap();
        assert_eq!(audit[0].action, "update");
        // No longer proxied at all: routing too.
        let plain = hub
            .apply("root", Apply::Update, "web.json", &with(""))
            .unwrap();
        assert_eq!((plain[0].generation, plain[0].routes_only), (1, true));

        // The same spec again is a restart, as before; so is any other
        // change, with or without routing in it.
        let again = hub
            .apply("root", Apply::Update, "web.json", &with(""))
            .unwrap();
        assert_eq!((again[0].generation, again[0].routes_only), (2, false));
        let other = with(r#","proxyname":"c.example","args":["--x"]"#);
        let changed = hub
            .apply("root", Apply::Update, "web.json", &other)
            .unwrap();
        assert_eq!((changed[0].generation, changed[0].routes_only), (3, false));
        assert!(desired(&mut rx).is_some());
    }

    #[test]
    fn an_older_minion_still_gets_the_routing_fields_it_would_restart_without() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let older = crate::hub::LinkCaps {
            host_network: false,
            routing_free: false,
        };
        hub.connect_link("m1", "0", older, tx);
        let web = r#"{"machine":"m1","name":"web","image":"app","type":"binary","proxyname":"a.example"}"#;
        hub.apply("root", Apply::Deploy, "web.json", web).unwrap();
        let set = next_set(&mut rx).expect("pushed");
        assert_eq!(set.services[0].spec.proxyname.as_deref(), Some("a.example"));
        // It would restart the run for a change of routing alone: that
        // change goes as any other.
        let routed = web.replace("a.example", "b.example");
        let applied = hub
            .apply("root", Apply::Update, "web.json", &routed)
            .unwrap();
        assert!(!applied[0].routes_only);
        assert_eq!(applied[0].generation, 2);
    }

    #[test]
    fn a_spec_for_a_machine_not_accepted_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let e = hub
            .apply(
                "root",
                Apply::Deploy,
                "w.json",
                &spec("w", "m2", "app", "binary"),
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(e.to_string().contains("`phoenix accept m2`"), "{e}");
        let e = hub
            .apply(
                "root",
                Apply::Deploy,
                "w.json",
                &spec("w", "m1", "nothere", "binary"),
            )
            .unwrap_err();
        assert!(e.to_string().contains("field `image`"), "{e}");
        assert_unchanged(&hub);
    }

    #[test]
    fn a_container_image_that_does_not_open_is_refused_at_deploy() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        // A hand-made legacy archive: a manifest.json and nothing it names.
        let mut tar = tar::Builder::new(Vec::new());
        let manifest = br#"[{"Config":"c.json","RepoTags":["x:1"],"Layers":[]}]"#;
        let mut h = tar::Header::new_gnu();
        h.set_size(manifest.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, "manifest.json", &manifest[..])
            .unwrap();
        std::fs::write(
            dir.path().join("registry/legacy.tar"),
            tar.into_inner().unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join("registry/junk.tar"), vec![7u8; 3000]).unwrap();

        for (image, file) in [("legacy", "legacy.tar"), ("junk.tar:v1", "junk.tar")] {
            let e = hub
                .apply(
                    "root",
                    Apply::Deploy,
                    "old.json",
                    &spec("old", "m1", image, "docker"),
                )
                .unwrap_err();
            let message = e.to_string();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{message}");
            assert!(message.starts_with("old.json: rejected"), "{message}");
            assert!(
                message.contains(r#"spec "old": field `image`"#),
                "{message}"
            );
            assert!(
                message.contains(&format!("registry file {file:?}")),
                "{message}"
            );
            assert!(
                message.contains(&format!("`phoenix push FILE {file}`")),
                "{message}"
            );
            // The master's own paths are not the user's business.
            let data_dir = dir.path().display().to_string();
            assert!(!message.contains(&data_dir), "{message}");
        }
        assert_unchanged(&hub);
        // A binary is any file: the same bytes deploy as one.
        hub.apply(
            "root",
            Apply::Deploy,
            "b.json",
            &spec("b", "m1", "junk.tar", "binary"),
        )
        .unwrap();
    }

    /// `data` as one zstd frame of raw (stored) blocks.
    fn zstd_raw(data: &[u8]) -> Vec<u8> {
        // Magic; a frame header with a 128 KiB window and nothing else.
        let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3];
        let blocks: Vec<&[u8]> = data.chunks(128 << 10).collect();
        for (i, b) in blocks.iter().enumerate() {
            let last = u32::from(i + 1 == blocks.len());
            let header = last | ((b.len() as u32) << 3);
            out.extend_from_slice(&header.to_le_bytes()[..3]);
            out.extend_from_slice(b);
        }
        out
    }

    #[test]
    fn a_vm_image_that_cannot_boot_is_refused_at_deploy() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let member = |tar: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            tar.append_data(&mut h, name, data).unwrap();
        };
        let mut kernel = vec![0u8; 1024];
        kernel[0x202..0x206].copy_from_slice(b"HdrS");
        let mut rootfs = vec![0u8; 4096];
        rootfs[1080..1082].copy_from_slice(&[0x53, 0xef]);
        let mut no_rootfs = tar::Builder::new(Vec::new());
        member(&mut no_rootfs, "bzImage", &kernel);
        let mut good = tar::Builder::new(Vec::new());
        member(&mut good, "bzImage", &kernel);
        member(&mut good, "rootfs.ext4", &rootfs);
        let reg = dir.path().join("registry");
        std::fs::write(
            reg.join("norootfs.zst"),
            zstd_raw(&no_rootfs.into_inner().unwrap()),
        )
        .unwrap();
        std::fs::write(reg.join("plain.zst"), vec![7u8; 3000]).unwrap();
        std::fs::write(reg.join("good.zst"), zstd_raw(&good.into_inner().unwrap())).unwrap();
        for (file, why) in [
            (
                "norootfs.zst",
                "no root filesystem (rootfs.ext4) in the image",
            ),
            ("plain.zst", "not zstd-compressed"),
        ] {
            let e = hub
                .apply(
                    "root",
                    Apply::Deploy,
                    "v.json",
                    &spec("v", "m1", file, "vm"),
                )
                .unwrap_err();
            let message = e.to_string();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{message}");
            assert!(
                message.contains(&format!(
                    "registry file {file:?} is not a VM image phoenix can boot: {why}"
                )),
                "{message}"
            );
        }
        // Not named .zst and not zstd: opened as an OCI image to boot.
        std::fs::write(reg.join("junk.tar"), vec![7u8; 3000]).unwrap();
        let e = hub
            .apply(
                "root",
                Apply::Deploy,
                "v.json",
                &spec("v", "m1", "junk.tar", "vm"),
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(
            e.to_string().contains(
                "registry file \"junk.tar\" is neither a VM image (a zstd tar) nor an OCI image"
            ),
            "{e}"
        );
        assert_unchanged(&hub);
        hub.apply(
            "root",
            Apply::Deploy,
            "v.json",
            &spec("v", "m1", "good.zst", "vm"),
        )
        .unwrap();
    }

    #[test]
    fn a_service_whose_stored_spec_fails_the_checks_can_be_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let web = spec("web", "m1", "app", "binary");
        hub.apply("root", Apply::Deploy, "web.json", &web).unwrap();
        // As a master with looser checks might have stored it.
        let mut svc = hub.store().read().unwrap().service("web").unwrap().unwrap();
        svc.spec.proxyport = 0;
        hub.store().write(|tx| tx.put_service(&svc)).unwrap();

        let e = hub.services().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(e.to_string().contains("`phoenix del web`"), "{e}");
        let deleted = hub.delete("root", "web").unwrap();
        assert_eq!(deleted.machine, "m1");
        assert!(hub.services().unwrap().is_empty());
    }

    fn spec_on_port(name: &str, port: u16, duration: &str) -> String {
        format!(
            r#"{{"machine":"m1","name":"{name}","image":"app","type":"binary","proxyport":{port},"duration":"{duration}"}}"#
        )
    }

    /// The next desired set sent down a link, whole.
    pub(in crate::hub) fn next_set(
        rx: &mut mpsc::UnboundedReceiver<ToMinion>,
    ) -> Option<DesiredSet> {
        match rx.try_recv().ok()? {
            ToMinion::Desired(set) => Some(set),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn linking(name: &str, machine: &str, links: &[&str]) -> String {
        format!(
            r#"{{"machine":"{machine}","name":"{name}","image":"app","type":"binary","link":{}}}"#,
            serde_json::to_string(links).unwrap()
        )
    }

    #[test]
    fn a_link_to_no_service_is_refused_naming_it_with_the_closest_name() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        hub.apply(
            "root",
            Apply::Deploy,
            "db.json",
            &linking("postgres", "m1", &[]),
        )
        .unwrap();
        let e = hub
            .apply(
                "root",
                Apply::Deploy,
                "web.json",
                &linking("web", "m1", &["postgress", "cache"]),
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let text = e.to_string();
        assert!(
            text.contains(r#"spec "web": field `link[0]`: no service named "postgress"; did you mean "postgres"?"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"field `link[1]`: no service named "cache"; deploy it first, or in the same file"#
            ),
            "{text}"
        );
        assert_eq!(
            hub.services().unwrap().len(),
            1,
            "nothing of web.json is stored"
        );
        // An update may not break a link either.
        let e = hub
            .apply(
                "root",
                Apply::Update,
                "db.json",
                &linking("postgres", "m1", &["web"]),
            )
            .unwrap_err();
        assert!(e.to_string().contains(r#"no service named "web""#), "{e}");
        assert_eq!(hub.status("postgres").unwrap().generation, 1);

        // Named in the same file, or stored: fine.
        let both = format!(
            "[{}, {}]",
            linking("web", "m1", &["postgres", "cache"]),
            linking("cache", "m1", &[])
        );
        hub.apply("root", Apply::Deploy, "both.json", &both)
            .unwrap();
        assert!(hub.status("web").unwrap().dangling_links.is_empty());
    }

    #[test]
    fn a_linked_service_may_be_deleted_and_its_link_then_dangles() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.connect("m1", "0", false, tx);
        let both = format!(
            "[{}, {}]",
            linking("web", "m1", &["db"]),
            linking("db", "m1", &[])
        );
        hub.apply("root", Apply::Deploy, "both.json", &both)
            .unwrap();
        let set = next_set(&mut rx).unwrap();
        let web = set.services.iter().find(|a| a.spec.name == "web").unwrap();
        let db_ip = hub.status("db").unwrap().ip;
        assert_eq!(web.links, BTreeMap::from([("db".to_owned(), db_ip)]));

        hub.delete("root", "db").unwrap();
        let set = next_set(&mut rx).unwrap();
        assert!(set.services[0].links.is_empty(), "{set:?}");
        let status = hub.status("web").unwrap();
        assert_eq!(status.dangling_links, ["db"]);
        assert_eq!(hub.services().unwrap()[0].dangling_links, ["db"]);
        // A restart applies the stored spec, dangling link and all.
        hub.restart("root", &["web".to_owned()]).unwrap();
        // Deploying a db again resolves the link, at its new address.
        hub.apply("root", Apply::Deploy, "db.json", &linking("db", "m1", &[]))
            .unwrap();
        assert!(hub.status("web").unwrap().dangling_links.is_empty());
    }

    /// The test hub with m2 accepted too, and both connected.
    fn two_machines(
        dir: &Path,
    ) -> (
        Hub,
        mpsc::UnboundedReceiver<ToMinion>,
        mpsc::UnboundedReceiver<ToMinion>,
    ) {
        let hub = hub(dir);
        hub.store()
            .write(|tx| tx.accept_node("m2", net::node_ip(2)))
            .unwrap();
        let (tx1, rx1) = mpsc::unbounded_channel();
        hub.connect("m1", "0", false, tx1);
        let (tx2, rx2) = mpsc::unbounded_channel();
        hub.connect("m2", "0", false, tx2);
        (hub, rx1, rx2)
    }

    #[test]
    fn a_change_reaches_every_node_whose_set_it_changes_with_a_new_revision() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, mut m1, mut m2) = two_machines(dir.path());

        // A service on m1: m1 runs it, m2's peer m1 now serves its address.
        hub.apply("root", Apply::Deploy, "db.json", &linking("db", "m1", &[]))
            .unwrap();
        let db_ip = hub.status("db").unwrap().ip;
        let s1 = next_set(&mut m1).expect("m1 gets its set");
        let s2 = next_set(&mut m2).expect("m2 gets its set: its peers changed");
        assert_eq!(s1.services[0].spec.name, "db");
        assert_eq!(s1.peers.len(), 1);
        assert_eq!(
            (s1.peers[0].node.as_str(), s1.peers[0].services.as_slice()),
            ("m2", &[][..])
        );
        assert!(s2.services.is_empty());
        assert_eq!(s2.peers[0].node, "m1");
        assert_eq!(s2.peers[0].key, "key-m1");
        assert_eq!(s2.peers[0].overlay_ip, net::node_ip(1));
        assert_eq!(s2.peers[0].services, [db_ip]);
        assert_eq!(
            s2.peers[0].endpoint,
            Some("10.0.0.2:51820".parse().unwrap())
        );

        // An update that changes nothing of the addresses touches only m1.
        let (r1, r2) = (s1.revision, s2.revision);
        hub.apply("root", Apply::Update, "db.json", &linking("db", "m1", &[]))
            .unwrap();
        assert!(next_set(&mut m1).unwrap().revision > r1);
        assert_eq!(next_set(&mut m2), None, "m2's set did not change");

        // A move: both get their sets at once, each with a newer revision.
        let r1 = r1 + 1;
        hub.apply("root", Apply::Update, "db.json", &linking("db", "m2", &[]))
            .unwrap();
        let s1 = next_set(&mut m1).unwrap();
        let s2 = next_set(&mut m2).unwrap();
        assert!(s1.revision > r1 && s2.revision > r2, "{s1:?} {s2:?}");
        assert!(s1.services.is_empty());
        assert_eq!(s1.peers[0].services, [db_ip]);
        assert_eq!(s2.services[0].spec.name, "db");
        assert!(s2.peers[0].services.is_empty());

        // A service on m1 linking to db: its assignment carries db's address.
        hub.apply(
            "root",
            Apply::Deploy,
            "web.json",
            &linking("web", "m1", &["db"]),
        )
        .unwrap();
        let s1 = next_set(&mut m1).unwrap();
        assert_eq!(
            s1.services[0].links,
            BTreeMap::from([("db".to_owned(), db_ip)])
        );
        let web_ip = hub.status("web").unwrap().ip;
        assert_eq!(next_set(&mut m2).unwrap().peers[0].services, [web_ip]);

        // Deleting db changes m2 (it ran it) and m1 (its peer m2 no longer
        // serves it, and web's link to it goes).
        hub.delete("root", "db").unwrap();
        let s1 = next_set(&mut m1).unwrap();
        assert!(s1.services[0].links.is_empty());
        assert!(s1.peers[0].services.is_empty());
        assert!(next_set(&mut m2).unwrap().services.is_empty());
    }

    #[tokio::test]
    async fn accepting_and_forgetting_a_node_changes_the_others_mesh() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, mut m1) = mpsc::unbounded_channel();
        hub.connect("m1", "0", false, tx);
        let r1 = hub.node("m1").unwrap().unwrap().revision;
        let request = phoenix_model::proto::JoinRequest {
            name: "m3".into(),
            key: "key-m3".into(),
            public_ip: "10.0.0.3".parse().unwrap(),
            private_ip: "10.1.0.3".parse().unwrap(),
            wg_port: 51999,
            version: "0".into(),
            proof: None,
        };
        hub.accept_request(&request, true).await.unwrap();
        let s1 = next_set(&mut m1).expect("m1 learns of m3");
        assert!(s1.revision > r1);
        assert_eq!(s1.peers.len(), 1);
        assert_eq!(s1.peers[0].node, "m3");
        assert_eq!(
            s1.peers[0].endpoint,
            Some("10.0.0.3:51999".parse().unwrap())
        );

        hub.forget("root", "m3").await.unwrap();
        let s1 = next_set(&mut m1).expect("m1 drops m3");
        assert!(s1.peers.is_empty());
    }

    #[test]
    fn daemons_on_one_machine_may_share_a_proxyport_each_in_its_own_network() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let both = format!(
            "[{}, {}]",
            spec_on_port("a", 9000, "daemon"),
            spec_on_port("b", 9000, "daemon")
        );
        hub.apply("root", Apply::Deploy, "ab.json", &both).unwrap();
        hub.apply(
            "root",
            Apply::Deploy,
            "c.json",
            &spec_on_port("c", 9000, "daemon"),
        )
        .unwrap();
        assert_eq!(hub.services().unwrap().len(), 3);
    }

    #[test]
    fn restart_bumps_the_generation_takes_the_pushed_version_and_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.connect("m1", "0", false, tx);
        hub.apply(
            "root",
            Apply::Deploy,
            "web.json",
            &spec("web", "m1", "app", "binary"),
        )
        .unwrap();
        assert_eq!(desired(&mut rx), Some((1, vec!["web".to_owned()])));
        let first = hub.status("web").unwrap();
        assert_eq!(
            first.image_hash,
            hub.registry.entry("app").unwrap().index.file_hash
        );
        assert!(first.image_pushed_at.is_some());
        assert_eq!(first.registry_hash, None);

        // A new version of the image: the service still runs the old one,
        // and its status says a newer one waits.
        std::fs::write(dir.path().join("registry/app"), b"#!/bin/sh\nexec true\n").unwrap();
        let new = hub.registry.resolve("app").unwrap().hash;
        let before = hub.status("web").unwrap();
        assert_eq!(before.image_hash, first.image_hash);
        assert_eq!(before.registry_hash.as_deref(), Some(new.as_str()));
        assert_eq!(
            before.image_pushed_at, None,
            "the registry no longer holds it"
        );

        let restarted = hub.restart("alice", &["web".to_owned()]).unwrap();
        assert_eq!(restarted[0].generation, 2);
        assert_eq!(desired(&mut rx), Some((2, vec!["web".to_owned()])));
        let after = hub.status("web").unwrap();
        assert_eq!(
            (after.image_hash.as_str(), after.registry_hash),
            (new.as_str(), None)
        );
        let log = hub.store().read().unwrap().audit_log(1).unwrap();
        assert_eq!(
            (log[0].action.as_str(), log[0].actor.as_str()),
            ("restart", "alice")
        );
        assert_eq!(log[0].new.as_ref().unwrap()["image_hash"], new.as_str());

        let e = hub
            .restart("alice", &["web".to_owned(), "ghost".to_owned()])
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(hub.status("web").unwrap().generation, 2, "all or nothing");
    }

    fn running(name: &str, generation: u64) -> phoenix_model::status::ServiceStatus {
        phoenix_model::status::ServiceStatus {
            name: name.into(),
            instance: None,
            generation,
            state: phoenix_model::status::ServiceState::Running,
            pid: Some(42),
            restarts: 0,
            last_exit: None,
            limits: None,
            health: phoenix_model::status::Health::None,
            since: 1,
            message: None,
        }
    }

    #[tokio::test]
    async fn a_deleted_service_is_gone_once_its_minion_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, _rx) = mpsc::unbounded_channel();
        let conn = hub.connect("m1", "0", false, tx);
        let all = format!(
            "[{}, {}]",
            spec_on_port("web", 9000, "daemon"),
            spec_on_port("new", 9001, "daemon")
        );
        hub.apply("root", Apply::Deploy, "all.json", &all).unwrap();
        hub.report_status("m1", vec![running("web", 1)], false);
        let short = std::time::Duration::from_millis(100);
        let names = |n: &str| vec![n.to_owned()];

        // Not reported yet, but its connected minion was sent it (it may be
        // starting there): waited for until the minion says it is gone, or
        // a full report leaves it out.
        hub.delete("root", "new").unwrap();
        let e = hub.wait_gone(&names("new"), short).await.unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        hub.report_status("m1", vec![running("web", 1)], true);
        assert_eq!(hub.wait_gone(&names("new"), short).await.unwrap(), ["new"]);

        hub.delete("root", "web").unwrap();
        let e = hub.wait_gone(&names("web"), short).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("timed out"), "{e}");
        let web = names("web");
        let waiting = hub.wait_gone(&web, std::time::Duration::from_secs(5));
        let (gone, ()) = tokio::join!(waiting, async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            hub.report_gone("m1", names("web"));
        });
        assert_eq!(gone.unwrap(), ["web"]);

        // A machine that is down is said to be down, at once.
        hub.apply(
            "root",
            Apply::Deploy,
            "web.json",
            &spec_on_port("web", 9000, "daemon"),
        )
        .unwrap();
        hub.report_status("m1", vec![running("web", 1)], false);
        hub.delete("root", "web").unwrap();
        hub.disconnect("m1", conn, "no heartbeat for 6000 ms");
        let e = hub
            .wait_gone(&names("web"), std::time::Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(
            e.to_string().contains(r#"machine "m1" is unreachable"#),
            "{e}"
        );
    }

    #[test]
    fn an_image_file_version_is_opened_once() {
        let formats = ImageFormats::default();
        let opened = Cell::new(0);
        let open = |verdict: Result<(), String>| {
            let opened = &opened;
            move || {
                opened.set(opened.get() + 1);
                verdict
            }
        };
        assert_eq!(
            formats.check("h1", None, open(Err("bad".into()))),
            Err("bad".into())
        );
        assert_eq!(formats.check("h1", None, open(Ok(()))), Err("bad".into()));
        assert_eq!(opened.get(), 1);
        // Another tag, or another version of the file, is another question.
        assert_eq!(formats.check("h1", Some("v2"), open(Ok(()))), Ok(()));
        assert_eq!(formats.check("h2", None, open(Ok(()))), Ok(()));
        assert_eq!(opened.get(), 3);
    }

    #[test]
    fn a_desired_set_over_the_limit_is_refused_naming_machine_size_and_limit() {
        let set = DesiredSet {
            revision: 7,
            services: Vec::new(),
            peers: Vec::new(),
        };
        let size = serialized_size(&set);
        assert_eq!(size, serde_json::to_vec(&set).unwrap().len());
        let sets = BTreeMap::from([("m1".to_owned(), set.clone()), ("m2".to_owned(), set)]);
        let m1 = BTreeSet::from(["m1".to_owned()]);
        desired_sets_fit(&sets, &m1, size).expect("a set of exactly the limit fits");
        let e = desired_sets_fit(&sets, &m1, size - 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let text = e.to_string();
        assert!(text.contains(r#"machine "m1""#), "{text}");
        assert!(text.contains(&format!("{size} bytes")), "{text}");
        assert!(
            text.contains(&format!("limit of {} bytes", size - 1)),
            "{text}"
        );
        assert!(
            !text.contains("m2"),
            "only the machines the change touches: {text}"
        );
    }

    #[test]
    fn deploys_adding_up_past_the_desired_set_limit_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.connect("m1", "0", false, tx);
        // Specs as large as a spec may be (args and env at their limit),
        // enough of them to fill most of the limit in one file.
        let arg = "a".repeat(phoenix_model::spec::MAX_ARGS_ENV_BYTES - 1024);
        let per_spec = arg.len();
        let file = |prefix: &str, n: usize| {
            let specs: Vec<String> = (0..n)
                .map(|i| {
                    format!(
                        r#"{{"machine":"m1","name":"{prefix}{i}","image":"app","type":"binary","duration":"oneshot","args":["{arg}"]}}"#
                    )
                })
                .collect();
            format!("[{}]", specs.join(","))
        };
        let half = MAX_DESIRED_SET / 2 / per_spec + 1;
        hub.apply("root", Apply::Deploy, "a.json", &file("a", half))
            .unwrap();
        assert_eq!(desired(&mut rx).map(|(_, names)| names.len()), Some(half));
        let e = hub
            .apply("root", Apply::Deploy, "b.json", &file("b", half))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let text = e.to_string();
        assert!(text.contains(r#"machine "m1""#), "{text}");
        assert!(
            text.contains(&format!("limit of {MAX_DESIRED_SET} bytes")),
            "{text}"
        );
        assert_eq!(desired(&mut rx), None, "a refusal pushes nothing");
        {
            let mut store = hub.store();
            let tx = store.read().unwrap();
            assert_eq!(
                tx.services().unwrap().len(),
                half,
                "nothing of b.json stored"
            );
        }
        // A small change still goes through.
        hub.apply(
            "root",
            Apply::Deploy,
            "c.json",
            &spec("c", "m1", "app", "binary"),
        )
        .unwrap();
        assert_eq!(
            desired(&mut rx).map(|(_, names)| names.len()),
            Some(half + 1)
        );
    }
}
