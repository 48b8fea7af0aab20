//! A service's environment, in layers (issue 15).
//!
//! Lowest precedence first, a later layer overriding an earlier one for
//! the same variable:
//!
//! 1. **image**: the OCI image's own `Env` (type docker; binaries and VMs
//!    have none), merged by the minion, which opens the image;
//! 2. **cluster**: `phoenix env set KEY=VALUE`, for every service;
//! 3. **env files**: the spec's `env_file`s, in the order the spec lists
//!    them (a later file overrides an earlier one);
//! 4. **spec**: the spec's `env`.
//!
//! Phoenix's own variables (`PHOENIX_NAME`, `PHOENIX_IP`, `PORT`, links)
//! come last and cannot be overridden; `PATH` has a default below all.
//!
//! The master computes layers 2–4 ([`layered`]) and resolves the secret
//! references among them (`secret:NAME`) only when it builds a minion's
//! desired set ([`resolve`]); the result travels as the assignment's
//! [`Environment`], whose `Debug` never shows a value.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::{Spec, secret_ref};

/// Where a variable of a service's environment comes from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    Image,
    Cluster,
    EnvFile,
    Spec,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Image => "image",
            Layer::Cluster => "cluster",
            Layer::EnvFile => "env_file",
            Layer::Spec => "spec",
        }
    }
}

/// One variable of a service's environment as `phoenix info NAME --env`
/// shows it: the value as written, so a secret shows `secret:NAME`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EnvVar {
    pub key: String,
    pub value: String,
    pub layer: Layer,
    /// The env file it comes from (layer `env_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The secret it refers to, if it does (`value` is then `secret:NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `phoenix info NAME --env`'s reply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EnvView {
    pub name: String,
    /// Sorted by key; the layer that won for each.
    pub env: Vec<EnvVar>,
    /// Why the image layer is missing, if it could not be read (the
    /// registry no longer holds that version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_note: Option<String>,
}

/// The effective environment of a service, layer by layer (see the
/// module's documentation), sorted by key. `image` is the image's `Env`
/// (`K=V` entries; empty when the master does not read it), `cluster` the
/// cluster's variables.
pub fn layered(image: &[String], cluster: &BTreeMap<String, String>, spec: &Spec) -> Vec<EnvVar> {
    let mut out: BTreeMap<String, EnvVar> = BTreeMap::new();
    let mut put = |key: &str, value: &str, layer: Layer, file: Option<&str>| {
        out.insert(
            key.to_owned(),
            EnvVar {
                key: key.to_owned(),
                value: value.to_owned(),
                layer,
                file: file.map(str::to_owned),
                secret: (layer != Layer::Image)
                    .then(|| secret_ref(value).map(str::to_owned))
                    .flatten(),
            },
        );
    };
    for (k, v) in image.iter().filter_map(|e| e.split_once('=')) {
        put(k, v, Layer::Image, None);
    }
    for (k, v) in cluster {
        put(k, v, Layer::Cluster, None);
    }
    for f in &spec.env_file {
        for (k, v) in f.env.iter().flatten().filter_map(|e| e.split_once('=')) {
            put(k, v, Layer::EnvFile, Some(&f.path));
        }
    }
    for (k, v) in spec.env_pairs() {
        put(k, v, Layer::Spec, None);
    }
    out.into_values().collect()
}

/// Layers 2–4 with every secret reference replaced by its value
/// (`secret` looks one up), for the minion; or the names of the secrets
/// that do not exist.
pub fn resolve(
    cluster: &BTreeMap<String, String>,
    spec: &Spec,
    mut secret: impl FnMut(&str) -> Option<String>,
) -> Result<Environment, Vec<String>> {
    let mut missing = Vec::new();
    let mut entries = Vec::new();
    for var in layered(&[], cluster, spec) {
        match &var.secret {
            Some(name) => match secret(name) {
                Some(value) => entries.push((var.key, value)),
                None => missing.push(name.clone()),
            },
            None => entries.push((var.key, var.value)),
        }
    }
    if missing.is_empty() {
        Ok(Environment::new(entries))
    } else {
        missing.sort();
        missing.dedup();
        Err(missing)
    }
}

/// A service's resolved environment (cluster, env files and spec, secrets
/// included): what its process gets, under Phoenix's own variables and
/// over the image's. It holds secret values, so its `Debug` shows only the
/// keys, and it is never logged or shown.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Environment(Vec<String>);

impl Environment {
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Environment(pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
    }

    /// The variables as pairs, in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().filter_map(|e| e.split_once('='))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&str> = self.pairs().map(|(k, _)| k).collect();
        write!(f, "Environment {{ keys: {keys:?}, values: <redacted> }}")
    }
}

/// How the variables a spec sets itself (its env files and `env`, as
/// written: a secret is `secret:NAME`) differ between two versions of it,
/// for `phoenix diff`: `+KEY=VALUE`, `-KEY`, `~KEY=VALUE (was OLD)`, by key.
pub fn env_changes(old: &Spec, new: &Spec) -> Vec<String> {
    let none = BTreeMap::new();
    let vars = |s: &Spec| -> BTreeMap<String, String> {
        layered(&[], &none, s)
            .into_iter()
            .map(|v| (v.key, v.value))
            .collect()
    };
    let (old, new) = (vars(old), vars(new));
    let mut out = Vec::new();
    for (k, v) in &new {
        match old.get(k) {
            None => out.push(format!("+{k}={v}")),
            Some(o) if o != v => out.push(format!("~{k}={v} (was {o})")),
            Some(_) => {}
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        out.push(format!("-{k}"));
    }
    out.sort_by(|a, b| a[1..].cmp(&b[1..]));
    out
}

/// A secret's value on its way from the CLI to the master (`phoenix secret
/// set`); its `Debug` shows nothing of it.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretValue(pub String);

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// One cluster variable, for `phoenix env list`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ClusterVar {
    pub key: String,
    pub value: String,
    /// Unix ms of its last change.
    pub updated_at: u64,
}

/// What `phoenix env set` or `unset` changed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct EnvChanged {
    /// The keys set (with a new value) or unset; keys already so are not.
    pub changed: Vec<String>,
    /// The services whose environment changed, restarted with a new
    /// generation.
    pub restarted: Vec<String>,
}

/// What `phoenix secret set` did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretChanged {
    pub name: String,
    /// A new secret (else a new value for an existing one).
    pub created: bool,
    /// The services that use it, restarted with a new generation (none
    /// when the value is the one it had).
    pub restarted: Vec<String>,
}

/// A secret as `phoenix secret list` shows it: never its value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SecretView {
    pub name: String,
    /// Unix ms.
    pub created_at: u64,
    pub updated_at: u64,
    /// The services whose spec or env files refer to it, sorted.
    pub used_by: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::SourceFile;
    use crate::spec::{load_env_files, parse_specs};

    fn spec() -> Spec {
        let mut specs = parse_specs(
            "s/web.json",
            r#"{"machine":"m","name":"web","image":"x","type":"docker",
                "env_file":["a.env","b.env"],"env":["S=spec","DB=secret:db"]}"#,
        )
        .unwrap();
        let files = vec![
            SourceFile {
                path: "s/a.env".into(),
                text: "F=a\nAB=a\nS=file\nC=file\n".into(),
            },
            SourceFile {
                path: "s/b.env".into(),
                text: "AB=b\nTOKEN=secret:api\n".into(),
            },
        ];
        load_env_files(&mut specs, "s/web.json", &files).unwrap();
        specs.remove(0)
    }

    fn cluster() -> BTreeMap<String, String> {
        [("C", "cluster"), ("I", "cluster"), ("K", "cluster")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn each_layer_overrides_the_ones_below() {
        let image = [
            "I=image".to_owned(),
            "IMG=image".to_owned(),
            "bare".to_owned(),
        ];
        let got: Vec<(String, String, Layer, Option<String>)> =
            layered(&image, &cluster(), &spec())
                .into_iter()
                .map(|v| (v.key, v.value, v.layer, v.file))
                .collect();
        let want = |k: &str, v: &str, l: Layer, f: Option<&str>| {
            (k.to_owned(), v.to_owned(), l, f.map(str::to_owned))
        };
        assert_eq!(
            got,
            [
                want("AB", "b", Layer::EnvFile, Some("b.env")),
                want("C", "file", Layer::EnvFile, Some("a.env")),
                want("DB", "secret:db", Layer::Spec, None),
                want("F", "a", Layer::EnvFile, Some("a.env")),
                want("I", "cluster", Layer::Cluster, None),
                want("IMG", "image", Layer::Image, None),
                want("K", "cluster", Layer::Cluster, None),
                want("S", "spec", Layer::Spec, None),
                want("TOKEN", "secret:api", Layer::EnvFile, Some("b.env")),
            ]
        );
        let db = layered(&[], &cluster(), &spec())
            .into_iter()
            .find(|v| v.key == "DB")
            .unwrap();
        assert_eq!(db.secret.as_deref(), Some("db"));
    }

    #[test]
    fn secrets_resolve_and_missing_ones_are_named() {
        let env = resolve(&cluster(), &spec(), |n| Some(format!("value-of-{n}"))).unwrap();
        let pairs: BTreeMap<&str, &str> = env.pairs().collect();
        assert_eq!(pairs["DB"], "value-of-db");
        assert_eq!(pairs["TOKEN"], "value-of-api");
        assert_eq!(pairs["S"], "spec");
        assert!(!pairs.contains_key("IMG"));
        let missing = resolve(&cluster(), &spec(), |n| (n == "db").then(String::new));
        assert_eq!(missing.unwrap_err(), ["api"]);
    }

    #[test]
    fn env_changes_show_variables_as_written() {
        let old = spec();
        let mut new = spec();
        new.env = vec!["S=spec2".into(), "DB=secret:db2".into(), "N=1".into()];
        new.env_file[1].env = Some(vec!["AB=b".into()]);
        assert_eq!(
            env_changes(&old, &new),
            [
                "~DB=secret:db2 (was secret:db)",
                "+N=1",
                "~S=spec2 (was spec)",
                "-TOKEN"
            ]
        );
        assert!(env_changes(&old, &old).is_empty());
    }

    #[test]
    fn debug_never_shows_a_value() {
        let env = Environment::new([("DB".to_owned(), "hunter2".to_owned())]);
        let shown = format!("{env:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("DB"), "{shown}");
        let typed = format!("{:?}", SecretValue("hunter2".into()));
        assert!(!typed.contains("hunter2"), "{typed}");
        // A request carrying one, as the master would log it.
        let req = crate::proto::Request::SecretSet {
            name: "db".into(),
            value: SecretValue("hunter2".into()),
        };
        assert!(!format!("{req:?}").contains("hunter2"));
        // Nor through the assignment that carries it.
        let mut a = crate::proto::Assignment {
            spec: spec(),
            ip: "fd38:dde8:32dd:1::1".parse().unwrap(),
            image_hash: "h".into(),
            image_size: 1,
            generation: 1,
            links: BTreeMap::new(),
            instance: None,
            own_ip: None,
            holds_ip: true,
            env: Some(env),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
        // On the wire (and in desired.json) it is there, for the minion.
        let json = serde_json::to_string(&a).unwrap();
        assert!(json.contains("DB=hunter2"), "{json}");
        a.env = None;
        assert!(a.env_pairs().contains(&("S".to_owned(), "spec".to_owned())));
    }
}
