//! The cluster's environment and each service's, layer by layer (issue 15;
//! the layers are `phoenix_model::env`'s).
//!
//! - `phoenix env set|unset|list`: the cluster layer, in the store with an
//!   audit row per variable. A change restarts exactly the services whose
//!   environment it changes (a generation bump and an `env-restart` audit
//!   row each, in the same transaction).
//! - `phoenix info NAME --env`: every variable, its value as written
//!   (`secret:NAME` for a secret) and the layer it comes from; the image
//!   layer is read from the registry file of the version the service runs.
//! - The resolved environment of every assignment, secrets opened, when a
//!   desired set is pushed ([`Hub::resolve_envs`]): nowhere else.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use phoenix_model::env::{ClusterVar, EnvChanged, EnvView, layered, resolve};
use phoenix_model::proto::DesiredSet;
use phoenix_model::spec::{Kind, Spec, check_env_key, secret_ref};

use super::{ApiError, Hub};
use crate::store::{Service, Tx};

/// The most bytes the cluster's variables may take (as `KEY=VALUE\0`).
pub const MAX_CLUSTER_ENV_BYTES: usize = 64 << 10;

/// Restarts a service because its environment changed: a new generation
/// (past an update's, if one is in progress) and an `env-restart` audit
/// row saying why. Returns its machine, whose set changes.
pub(super) fn restart_for_env(
    tx: &Tx<'_>,
    actor: &str,
    svc: &Service,
    why: &str,
) -> Result<String, ApiError> {
    let generation = svc
        .generation
        .max(svc.next.as_ref().map_or(0, |n| n.generation))
        + 1;
    let new = Service {
        generation,
        ..svc.clone()
    };
    tx.put_service(&new)?;
    tx.audit(
        actor,
        "env-restart",
        &svc.spec.name,
        Some(&serde_json::json!({ "generation": svc.generation })),
        Some(&serde_json::json!({ "generation": generation, "reason": why })),
    )?;
    Ok(svc.spec.machine.clone())
}

/// Where each secret a spec refers to is referred to: (field, name).
fn secret_fields(spec: &Spec) -> Vec<(String, String)> {
    fn value(e: &str) -> Option<&str> {
        e.split_once('=').and_then(|(_, v)| secret_ref(v))
    }
    let mut out = Vec::new();
    for (i, e) in spec.env.iter().enumerate() {
        if let Some(name) = value(e) {
            out.push((format!("env[{i}]"), name.to_owned()));
        }
    }
    for (i, f) in spec.env_file.iter().enumerate() {
        for e in f.env.iter().flatten() {
            if let Some(name) = value(e) {
                out.push((format!("env_file[{i}]"), name.to_owned()));
            }
        }
    }
    out
}

/// Why a spec's secret references cannot be deployed, as (field, reason):
/// a secret that does not exist (named), or any secret in a VM booted from
/// a VM image, whose environment travels on its kernel command line
/// (readable by every user of its machine; `env_on_cmdline`). An OCI image
/// booted as a VM gets its environment on its own 0600 disk, so it may.
pub(super) fn secret_errors(
    tx: &Tx<'_>,
    spec: &Spec,
    env_on_cmdline: bool,
) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    let mut checked: HashMap<String, bool> = HashMap::new();
    for (field, name) in secret_fields(spec) {
        if env_on_cmdline {
            out.push((
                field,
                format!(
                    "secret {name:?}: a VM's environment is passed on its kernel command line, \
                     which any user of its machine can read; secrets are not given to a VM image \
                     (an OCI image run as type vm may have them)"
                ),
            ));
            continue;
        }
        let exists = match checked.get(&name) {
            Some(e) => *e,
            None => {
                let e = tx.secret(&name)?.is_some();
                checked.insert(name.clone(), e);
                e
            }
        };
        if !exists {
            out.push((
                field,
                format!("no secret {name:?}; set it first with `phoenix secret set {name}`"),
            ));
        }
    }
    Ok(out)
}

/// Whether a service's environment is only its spec's `env` (no cluster
/// variables, env files or secrets, or cluster variables it overrides
/// all of): its assignment then carries no environment of its own, as from
/// a master before environments, so that such a service is not restarted
/// by an upgrade of the master, nor by a cluster variable it overrides
/// (its assignment stays equal, as its generation does).
fn only_spec_env(cluster: &BTreeMap<String, String>, spec: &Spec) -> bool {
    if !spec.env_file.is_empty() || !spec.secret_refs().is_empty() {
        return false;
    }
    let none = BTreeMap::new();
    layered(&[], cluster, spec) == layered(&[], &none, spec)
}

impl Hub {
    /// `phoenix env list`.
    pub fn env_list(&self) -> Result<Vec<ClusterVar>, ApiError> {
        Ok(self.store().read()?.cluster_vars()?)
    }

    /// `phoenix env set KEY=VALUE...`.
    pub fn env_set(&self, actor: &str, vars: &[String]) -> Result<EnvChanged, ApiError> {
        let mut errors = Vec::new();
        let mut changes = Vec::new();
        if vars.is_empty() {
            errors.push("give at least one KEY=VALUE".to_owned());
        }
        for v in vars {
            let Some((key, value)) = v.split_once('=') else {
                errors.push(format!("{v:?} is not of the form KEY=VALUE"));
                continue;
            };
            if let Err(r) = check_env_key(key) {
                errors.push(r);
                continue;
            }
            if value.contains('\0') {
                errors.push(format!(
                    "{key}: holds a NUL byte, which an environment variable cannot"
                ));
                continue;
            }
            if secret_ref(value).is_some() {
                errors.push(format!(
                    "{key}: cluster variables cannot refer to secrets; refer to it as \
                     `{key}={value}` in the env of the specs that need it"
                ));
                continue;
            }
            changes.push((key.to_owned(), Some(value.to_owned())));
        }
        if !errors.is_empty() {
            return Err(ApiError::Invalid(format!(
                "env set: {}; nothing was changed",
                errors.join("; ")
            )));
        }
        self.change_cluster_env(actor, changes)
    }

    /// `phoenix env unset KEY...`.
    pub fn env_unset(&self, actor: &str, keys: &[String]) -> Result<EnvChanged, ApiError> {
        if keys.is_empty() {
            return Err(ApiError::Invalid(
                "env unset: give at least one KEY; nothing was changed".into(),
            ));
        }
        let mut errors = Vec::new();
        for k in keys {
            if let Err(r) = check_env_key(k) {
                errors.push(r);
            }
        }
        if !errors.is_empty() {
            return Err(ApiError::Invalid(format!(
                "env unset: {}; nothing was changed",
                errors.join("; ")
            )));
        }
        self.change_cluster_env(actor, keys.iter().map(|k| (k.clone(), None)).collect())
    }

    /// Writes changes to the cluster's variables (a value, or None to
    /// unset) and restarts the services whose environment they change, in
    /// one transaction.
    fn change_cluster_env(
        &self,
        actor: &str,
        changes: Vec<(String, Option<String>)>,
    ) -> Result<EnvChanged, ApiError> {
        let (reply, changed) = self.write_change(|tx| {
            let before = tx.cluster_env()?;
            let mut after = before.clone();
            let mut reply = EnvChanged::default();
            for (key, value) in &changes {
                let old = before.get(key);
                if old == value.as_ref() || reply.changed.contains(key) {
                    continue;
                }
                match value {
                    Some(v) => {
                        tx.set_cluster_var(key, v)?;
                        after.insert(key.clone(), v.clone());
                    }
                    None => {
                        tx.unset_cluster_var(key)?;
                        after.remove(key);
                    }
                }
                tx.audit(
                    actor,
                    if value.is_some() {
                        "env-set"
                    } else {
                        "env-unset"
                    },
                    key,
                    old.map(|v| serde_json::json!({ "value": v })).as_ref(),
                    value
                        .as_ref()
                        .map(|v| serde_json::json!({ "value": v }))
                        .as_ref(),
                )?;
                reply.changed.push(key.clone());
            }
            let bytes: usize = after.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
            if bytes > MAX_CLUSTER_ENV_BYTES {
                return Err(ApiError::Invalid(format!(
                    "the cluster's variables would take {bytes} bytes; at most \
                     {MAX_CLUSTER_ENV_BYTES} (64 KiB) are allowed; nothing was changed"
                )));
            }
            let mut touched = BTreeSet::new();
            if reply.changed.is_empty() {
                return Ok((reply, touched));
            }
            let why = format!("cluster env changed: {}", reply.changed.join(", "));
            for svc in tx.services()? {
                let differs =
                    |spec: &Spec| layered(&[], &before, spec) != layered(&[], &after, spec);
                if differs(&svc.spec) || svc.next.as_ref().is_some_and(|n| differs(&n.spec)) {
                    touched.insert(restart_for_env(tx, actor, &svc, &why)?);
                    reply.restarted.push(svc.spec.name.clone());
                }
            }
            Ok((reply, touched))
        })?;
        self.publish(&changed);
        Ok(reply)
    }

    /// `phoenix info NAME --env`: the service's environment, each variable
    /// with the layer it comes from; secrets as `secret:NAME`.
    pub fn info_env(&self, name: &str) -> Result<EnvView, ApiError> {
        let (svc, cluster) = {
            let mut store = self.store();
            let tx = store.read()?;
            let svc = tx
                .service(name)?
                .ok_or_else(|| ApiError::no_service(name))?;
            (svc, tx.cluster_env()?)
        };
        let (image, image_note) = self.image_env(&svc);
        Ok(EnvView {
            name: name.to_owned(),
            env: layered(&image, &cluster, &svc.spec),
            image_note,
        })
    }

    /// The image's own variables, read from the registry file of the
    /// version the service runs; or why they could not be read.
    fn image_env(&self, svc: &Service) -> (Vec<String>, Option<String>) {
        if svc.spec.kind != Kind::Docker {
            return (Vec::new(), None);
        }
        let (file, tag) = svc.spec.registry_file();
        match self.registry.entry(&file) {
            Some(e) if e.index.file_hash == svc.image_hash => {}
            _ => {
                return (
                    Vec::new(),
                    Some(format!(
                        "the image's own variables are not shown: the registry no longer holds \
                         the version of {file:?} the service runs"
                    )),
                );
            }
        }
        let path = self.registry.dir().join(&file);
        match phoenix_image::open(&path, tag.as_deref()) {
            Ok(image) => (image.config.env, None),
            Err(e) => (
                Vec::new(),
                Some(format!(
                    "the image's own variables are not shown: {}",
                    e.to_string().replace(&path.display().to_string(), &file)
                )),
            ),
        }
    }

    /// Puts into every assignment of `sets` its resolved environment (the
    /// cluster's variables, its env files and its `env`, secrets opened).
    /// Returns the nodes whose sets could not be resolved (a secret that
    /// does not open): they must not be sent, so their minions keep
    /// running what they have; the reason is logged, naming the service
    /// and the secret, never a value.
    pub(super) fn resolve_envs(
        &self,
        tx: &Tx<'_>,
        sets: &mut BTreeMap<String, DesiredSet>,
    ) -> BTreeSet<String> {
        let mut failed = BTreeSet::new();
        let cluster = match tx.cluster_env() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cannot read the cluster's variables: {e}");
                return sets.keys().cloned().collect();
            }
        };
        let mut key = None;
        let mut opened: HashMap<String, Result<String, String>> = HashMap::new();
        for (node, set) in sets.iter_mut() {
            for a in &mut set.services {
                if only_spec_env(&cluster, &a.spec) {
                    a.env = None;
                    continue;
                }
                for name in a.spec.secret_refs() {
                    if opened.contains_key(&name) {
                        continue;
                    }
                    let value = self.open_secret(tx, &mut key, &name);
                    opened.insert(name, value);
                }
                let mut errors = Vec::new();
                let env = resolve(&cluster, &a.spec, |name| match opened.get(name) {
                    Some(Ok(v)) => Some(v.clone()),
                    Some(Err(e)) => {
                        errors.push(e.clone());
                        None
                    }
                    None => None,
                });
                match env {
                    Ok(env) => a.env = Some(env),
                    Err(missing) => {
                        tracing::error!(
                            service = %a.spec.name,
                            node = %node,
                            "cannot resolve the service's secrets ({}): {}; its machine's desired set is not sent until they resolve",
                            missing.join(", "),
                            if errors.is_empty() { "no such secret".to_owned() } else { errors.join("; ") }
                        );
                        failed.insert(node.clone());
                    }
                }
            }
        }
        failed
    }

    /// One secret's value, opened with the key (loaded once per round).
    fn open_secret(
        &self,
        tx: &Tx<'_>,
        key: &mut Option<super::secrets::SecretKey>,
        name: &str,
    ) -> Result<String, String> {
        let sealed = tx
            .secret(name)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no secret {name:?}"))?;
        if key.is_none() {
            *key = Some(
                self.secret_key()
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        super::secrets::SecretError::Missing {
                            path: self.secret_key_path().display().to_string(),
                        }
                        .to_string()
                    })?,
            );
        }
        let Some(k) = key.as_ref() else {
            return Err("no key".into());
        };
        let value = k
            .open(name, &sealed.nonce, &sealed.sealed)
            .map_err(|e| e.to_string())?;
        String::from_utf8(value).map_err(|_| format!("secret {name:?} is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use phoenix_model::env::SecretValue;
    use phoenix_model::proto::{ErrorKind, SourceFile, ToMinion};
    use tokio::sync::mpsc;

    use super::super::Apply;
    use super::super::apply::tests::hub;

    fn spec(name: &str, env: &str) -> String {
        format!(
            r#"{{"machine":"m1","name":"{name}","image":"app","type":"binary","env":[{env}]{}}}"#,
            if name == "filed" {
                r#","env_file":["app.env"]"#
            } else {
                ""
            }
        )
    }

    /// The last desired set pushed: each service's generation and
    /// resolved environment.
    fn last_set(
        rx: &mut mpsc::UnboundedReceiver<ToMinion>,
    ) -> BTreeMap<String, (u64, BTreeMap<String, String>)> {
        let mut last = None;
        while let Ok(msg) = rx.try_recv() {
            if let ToMinion::Desired(set) = msg {
                last = Some(set);
            }
        }
        last.expect("a set was pushed")
            .services
            .into_iter()
            .map(|a| {
                let env = a.env_pairs().into_iter().collect();
                (a.spec.name.clone(), (a.generation, env))
            })
            .collect()
    }

    fn last_set_raw(
        rx: &mut mpsc::UnboundedReceiver<ToMinion>,
    ) -> Vec<phoenix_model::proto::Assignment> {
        hub_last(rx).services
    }

    fn hub_last(rx: &mut mpsc::UnboundedReceiver<ToMinion>) -> phoenix_model::proto::DesiredSet {
        let mut last = None;
        while let Ok(msg) = rx.try_recv() {
            if let ToMinion::Desired(set) = msg {
                last = Some(set);
            }
        }
        last.expect("a set was pushed")
    }

    #[test]
    fn secrets_and_cluster_env_reach_only_their_services_and_restart_only_them() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.connect("m1", "0", false, tx);

        // A spec naming a missing secret is refused, naming it, and
        // changes nothing.
        let user = spec("user", r#""DB=secret:db","A=spec""#);
        let e = hub
            .apply("root", Apply::Deploy, "u.json", &user)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let msg = e.to_string();
        assert!(
            msg.contains(
                "field `env[0]`: no secret \"db\"; set it first with `phoenix secret set db`"
            ),
            "{msg}"
        );
        assert!(hub.store().read().unwrap().services().unwrap().is_empty());

        let set = hub
            .secret_set("root", "db", &SecretValue("hunter2".into()))
            .unwrap();
        assert!(set.created && set.restarted.is_empty());
        hub.apply("root", Apply::Deploy, "u.json", &user).unwrap();
        hub.apply(
            "root",
            Apply::Deploy,
            "o.json",
            &spec("other", r#""A=other""#),
        )
        .unwrap();
        let files = [SourceFile {
            path: "app.env".into(),
            text: "F=file\nA=file\n".into(),
        }];
        hub.apply_with_env_files(
            "root",
            Apply::Deploy,
            "f.json",
            &spec("filed", r#""A=spec""#),
            &files,
        )
        .unwrap();
        let s = last_set(&mut rx);
        assert_eq!(s["user"].1["DB"], "hunter2");
        assert_eq!(s["user"].1["A"], "spec");
        assert_eq!(s["filed"].1["F"], "file");
        assert_eq!(s["filed"].1["A"], "spec");
        let gens = |s: &BTreeMap<String, (u64, BTreeMap<String, String>)>| {
            s.iter()
                .map(|(k, v)| (k.clone(), v.0))
                .collect::<BTreeMap<_, _>>()
        };
        let before = gens(&s);

        // The stored spec keeps the reference; `info` and `info --env`
        // show `secret:db`.
        let shown = serde_json::to_string(&hub.info("user").unwrap()).unwrap();
        assert!(shown.contains("secret:db") && !shown.contains("hunter2"));
        let env = hub.info_env("user").unwrap();
        let db = env.env.iter().find(|v| v.key == "DB").unwrap();
        assert_eq!(
            (db.value.as_str(), db.secret.as_deref()),
            ("secret:db", Some("db"))
        );

        // A new value restarts its user only.
        let changed = hub
            .secret_set("root", "db", &SecretValue("swordfish".into()))
            .unwrap();
        assert_eq!(changed.restarted, ["user"]);
        let s = last_set(&mut rx);
        assert_eq!(s["user"].1["DB"], "swordfish");
        assert_eq!(s["user"].0, before["user"] + 1);
        assert_eq!(s["other"].0, before["other"]);
        // The same value again restarts nothing.
        let same = hub
            .secret_set("root", "db", &SecretValue("swordfish".into()))
            .unwrap();
        assert!(same.restarted.is_empty());

        // A cluster variable: below env files and the spec's env, so only
        // the services it reaches restart.
        let c = hub.env_set("root", &["F=cluster".into()]).unwrap();
        assert_eq!(
            (c.changed.as_slice(), c.restarted.as_slice()),
            (
                &["F".to_owned()][..],
                &["other".to_owned(), "user".to_owned()][..]
            )
        );
        let s = last_set(&mut rx);
        assert_eq!(s["filed"].1["F"], "file");
        assert_eq!(s["other"].1["F"], "cluster");
        let again = hub.env_set("root", &["F=cluster".into()]).unwrap();
        assert!(again.changed.is_empty() && again.restarted.is_empty());
        // Every service sets A itself: none restarts, and none's
        // assignment changes (which would restart it on its minion).
        hub.push_desired(["m1"]);
        let before = last_set_raw(&mut rx);
        let c = hub.env_set("root", &["A=cluster".into()]).unwrap();
        assert!(c.restarted.is_empty(), "{c:?}");
        assert!(rx.try_recv().is_err(), "no set was pushed");
        hub.push_desired(["m1"]);
        assert_eq!(last_set_raw(&mut rx), before);
        let u = hub.env_unset("root", &["F".into(), "A".into()]).unwrap();
        assert_eq!(u.restarted, ["other", "user"]);
        let bad = hub
            .env_set(
                "root",
                &["X=secret:db".into(), "PORT=1".into(), "nope".into()],
            )
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("cluster variables cannot refer to secrets"),
            "{bad}"
        );
        assert!(bad.contains("PORT is set by Phoenix"), "{bad}");
        assert!(
            bad.contains("\"nope\" is not of the form KEY=VALUE"),
            "{bad}"
        );

        // A secret in use cannot be removed; the list names its users.
        let list = hub.secret_list().unwrap();
        assert_eq!(list[0].used_by, ["user"]);
        let e = hub.secret_rm("root", "db").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(e.to_string().contains("used by service user"), "{e}");
        assert!(
            hub.secret_set("root", "db", &SecretValue(String::new()))
                .is_err()
        );

        // Nothing shown or stored holds a value: the audit log, the
        // database's bytes.
        let audit =
            serde_json::to_string(&hub.store().read().unwrap().audit_log(100).unwrap()).unwrap();
        assert!(!audit.contains("hunter2") && !audit.contains("swordfish"));
        assert!(
            audit.contains("secret-change") && audit.contains("env-restart"),
            "{audit}"
        );
        drop(hub);
        for f in ["phoenix.db", "phoenix.db-wal"] {
            if let Ok(bytes) = std::fs::read(dir.path().join(f)) {
                for plain in [&b"hunter2"[..], b"swordfish"] {
                    assert!(!bytes.windows(plain.len()).any(|w| w == plain), "{f}");
                }
            }
        }
    }

    #[test]
    fn a_lost_key_is_not_replaced_while_secrets_need_it() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.connect("m1", "0", false, tx);
        hub.secret_set("root", "db", &SecretValue("x".into()))
            .unwrap();
        hub.apply(
            "root",
            Apply::Deploy,
            "u.json",
            &spec("user", r#""DB=secret:db""#),
        )
        .unwrap();
        assert_eq!(last_set(&mut rx)["user"].1["DB"], "x");
        std::fs::remove_file(dir.path().join("secrets.key")).unwrap();
        let e = hub
            .secret_set("root", "api", &SecretValue("y".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("secrets.key is missing"), "{e}");
        assert!(!dir.path().join("secrets.key").exists());
        // The machine's set is not sent without its secrets: its minion
        // keeps what it runs.
        hub.apply("root", Apply::Deploy, "o.json", &spec("other", ""))
            .unwrap();
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_service_whose_cluster_variables_it_all_overrides_carries_no_environment() {
        let spec = |env: &str| {
            phoenix_model::spec::parse_specs(
                "t",
                &format!(
                    r#"{{"machine":"m1","name":"a","image":"app","type":"binary","env":[{env}]}}"#
                ),
            )
            .unwrap()
            .remove(0)
        };
        let cluster = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let own = spec(r#""A=1""#);
        assert!(super::only_spec_env(&cluster(&[]), &own));
        assert!(super::only_spec_env(&cluster(&[("A", "2")]), &own));
        assert!(!super::only_spec_env(&cluster(&[("B", "2")]), &own));
        assert!(!super::only_spec_env(
            &cluster(&[]),
            &spec(r#""A=secret:s""#)
        ));
    }

    #[test]
    fn a_vm_is_given_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        hub.secret_set("root", "db", &SecretValue("x".into()))
            .unwrap();
        let e = hub
            .apply(
                "root",
                Apply::Deploy,
                "v.json",
                r#"{"machine":"m1","name":"v","image":"app.zst","type":"vm","env":["DB=secret:db"]}"#,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("secrets are not given to a VM image"), "{e}");
        // An OCI image booted as a VM keeps its environment on its own
        // disk: its secret is not refused (only its missing image is).
        let e = hub
            .apply(
                "root",
                Apply::Deploy,
                "v.json",
                r#"{"machine":"m1","name":"v","image":"app","type":"vm","env":["DB=secret:db"]}"#,
            )
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}
