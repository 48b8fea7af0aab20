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
//!    addresses are free.
//!
//! Every refusal reports all errors at once and changes nothing. After a
//! commit, the nodes whose sets changed get them from the reconciler.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv6Addr;
use std::sync::Mutex;

use phoenix_model::net;
use phoenix_model::proto::{Applied, Deleted};
use phoenix_model::spec::{Kind, Spec, SpecError, SpecErrors, parse_specs};

use super::{ApiError, Hub};
use crate::lock;
use crate::registry::ImageRef;
use crate::store::{Service, StoreError};

/// Whether a deploy creates services or changes existing ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    Deploy,
    Update,
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
        let specs = parse_specs(source, text)?;
        let images = self.resolve_images(&specs);
        let fail = |errors| {
            ApiError::from(SpecErrors {
                file: source.to_owned(),
                errors,
            })
        };
        let mut touched = BTreeSet::new();
        let applied = self.store().write(|tx| -> Result<Vec<Applied>, ApiError> {
            let mut errors = Vec::new();
            let mut existing = Vec::with_capacity(specs.len());
            let mut ip_owner: HashMap<Ipv6Addr, String> = HashMap::new();
            for s in tx.services()? {
                ip_owner.insert(s.ip, s.spec.name);
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
                if let Some(ip) = spec.ip
                    && let Some(owner) = ip_owner.get(&ip)
                    && *owner != spec.name
                {
                    err(
                        "ip",
                        format!("address {ip} is already used by service {owner:?}"),
                    );
                }
                existing.push(old);
            }
            if !errors.is_empty() {
                return Err(fail(errors));
            }
            let mut used = tx.used_ips()?;
            let mut next = 0u64;
            let mut applied = Vec::with_capacity(specs.len());
            for ((spec, old), image) in specs.iter().zip(existing).zip(&images) {
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
                let Ok(image) = image else {
                    unreachable!("image errors were reported above");
                };
                let svc = Service {
                    spec: spec.clone(),
                    ip,
                    image_hash: image.hash.clone(),
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
                tx.audit(
                    actor,
                    action,
                    &spec.name,
                    old.as_ref().map(Service::to_json).as_ref(),
                    Some(&svc.to_json()),
                )?;
                applied.push(Applied {
                    name: spec.name.clone(),
                    machine: spec.machine.clone(),
                    ip,
                    generation: svc.generation,
                });
            }
            for m in &touched {
                tx.bump_revision(m)?;
            }
            Ok(applied)
        })?;
        self.push_desired(touched.iter().map(String::as_str));
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

    /// Deletes a service, also one whose stored spec fails the checks
    /// (deleting it is the way out the error names).
    pub fn delete(&self, actor: &str, name: &str) -> Result<Deleted, ApiError> {
        let machine = self.store().write(|tx| -> Result<String, ApiError> {
            let (machine, old) = match tx.service(name) {
                Ok(Some(svc)) => (svc.spec.machine.clone(), Some(svc.to_json())),
                Ok(None) => return Err(ApiError::no_service(name)),
                Err(StoreError::BadSpec { .. }) => {
                    let machine = tx
                        .service_machine(name)?
                        .ok_or_else(|| ApiError::no_service(name))?;
                    (machine, None)
                }
                Err(e) => return Err(e.into()),
            };
            tx.delete_service(name)?;
            tx.bump_revision(&machine)?;
            tx.audit(actor, "del", name, old.as_ref(), None)?;
            Ok(machine)
        })?;
        self.forget_status(name);
        self.push_desired([machine.as_str()]);
        self.request_collection();
        Ok(Deleted {
            deleted: name.to_owned(),
            machine,
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
mod tests {
    use std::cell::Cell;
    use std::path::Path;

    use phoenix_model::proto::{ErrorKind, MasterInfo, ToMinion};
    use tokio::sync::mpsc;

    use super::*;
    use crate::hub::Settings;
    use crate::registry::Registry;
    use crate::store::{Node, Store};

    /// A hub with one accepted machine `m1`, one waiting `m2`, and a binary
    /// `app` in its registry.
    fn hub(dir: &Path) -> Hub {
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
        let settings = Settings {
            auto_accept: false,
            node_timeout: std::time::Duration::from_secs(6),
        };
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
        hub.connect("m1", "0", tx);

        let web = spec("web", "m1", "app", "binary");
        let applied = hub.apply("root", Apply::Deploy, "web.json", &web).unwrap();
        assert_eq!(
            applied,
            [Applied {
                name: "web".into(),
                machine: "m1".into(),
                ip: net::service_ip(0),
                generation: 1
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
                machine: "m1".into()
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
}
