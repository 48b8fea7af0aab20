//! The service spec (seed 000): how it is read, and what makes it valid.
//!
//! Reading is a pipeline of three steps, each with one job:
//!
//! 1. **Format.** Text becomes a document tree: JSON (its syntax errors say
//!    the line and column) or YAML (`spec/yaml.rs`, by the file's
//!    extension; every error of a YAML file says its line). A compose
//!    reader will produce the same tree, or a [`RawSpec`] directly.
//! 2. **Raw spec** (`spec/raw.rs`). Each spec of the tree becomes a
//!    [`RawSpec`]: serde with unknown fields denied, so the known fields are
//!    the struct's own. Errors carry their path (`env[2]`), an unknown field suggests the
//!    known one it was probably meant to be, and a field that cannot be read
//!    does not hide the others.
//! 3. **Validation** ([`validate()`], `spec/validate.rs`). A raw spec
//!    becomes a [`Spec`] with defaults filled in, or every reason it cannot.
//!
//! Every error names the spec (its place in the file and its name), the
//! field and the reason, and a file is accepted or rejected whole, with all
//! its errors at once. Checks that need cluster state (does the machine
//! exist, is the image in the registry, is the address free) belong to the
//! master and report through the same [`SpecError`]. The master stores each
//! [`Spec`] as JSON and runs it through the same pipeline when it loads it
//! ([`parse_stored`]), so a damaged store cannot hand a minion a spec that
//! a user could not have deployed.

mod env_file;
pub mod import;
mod raw;
mod validate;
mod yaml;

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::Ipv6Addr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use env_file::{
    EnvFile, EnvFileError, EnvFileTexts, MAX_SECRET_NAME, SECRET_PREFIX, check_env_key,
    check_env_value, check_secret_name, env_file_key, env_file_keys, load_env_files, normalize,
    parse_env_file, secret_ref,
};
pub use raw::{RawSpec, Size, edit_distance, known_fields};
pub use validate::{check_hostname_label, check_image_name, parse_size, validate};

/// The port the proxy expects a service on when the spec does not say.
pub const DEFAULT_PROXYPORT: u16 = 8000;

/// The most specs one file may hold.
pub const MAX_SPECS_PER_FILE: usize = 1000;

/// The most bytes one spec may take as compact JSON (as the master stores it).
pub const MAX_SPEC_BYTES: usize = 256 << 10;

/// The most bytes `args` and `env` may take together, counting each string's
/// terminating NUL. The kernel refuses to start a process whose arguments and
/// environment exceed `ARG_MAX` (2 MiB on most hosts, less under a small
/// stack limit) or any one string over 128 KiB; this stays well under both,
/// leaving room for what Phoenix adds.
pub const MAX_ARGS_ENV_BYTES: usize = 128 << 10;

/// Environment variables Phoenix sets for every service; a spec may not set them.
pub const RESERVED_ENV: [&str; 3] = ["PHOENIX_NAME", "PHOENIX_IP", "PORT"];

/// What kind of image a service runs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Binary,
    Docker,
    Vm,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Binary => "binary",
            Kind::Docker => "docker",
            Kind::Vm => "vm",
        }
    }
}

/// Whether a service is kept running or run once.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Duration {
    #[default]
    Daemon,
    Oneshot,
}

impl Duration {
    pub fn as_str(self) -> &'static str {
        match self {
            Duration::Daemon => "daemon",
            Duration::Oneshot => "oneshot",
        }
    }
}

/// One service, as a user writes it, with defaults filled in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Spec {
    pub machine: String,
    pub name: String,
    pub image: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub duration: Duration,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Env files (relative to the spec file) with their entries once read:
    /// below `env`, above the cluster's environment (`spec/env_file.rs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_file: Vec<EnvFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxyname: Option<String>,
    /// The path prefix the proxy routes to this service under `proxyname`
    /// (`/api`; stripped before forwarding). `None`: the whole host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxypath: Option<String>,
    /// HTTP basic auth at the proxy, htpasswd bcrypt form (`user:$2y$...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxyauth: Vec<String>,
    pub proxyport: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link: Vec<String>,
    /// Memory limit in bytes (type docker): `"512M"`, `"1G"` or a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// CPU limit in cores (type docker), e.g. `0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
}

/// The fields only the master's proxy acts on: where a service is routed
/// and who may reach it there. A minion has no use for them, and a change
/// of only these needs no restart.
pub const ROUTING_FIELDS: [&str; 3] = ["proxyname", "proxypath", "proxyauth"];

impl Spec {
    /// Empties the [`ROUTING_FIELDS`].
    pub fn clear_routing(&mut self) {
        self.proxyname = None;
        self.proxypath = None;
        self.proxyauth.clear();
    }

    /// The registry file and the tag within it. For type docker `image` is
    /// `FILE[:TAG]`, and `.tar` is assumed when FILE has no extension of its
    /// own (seed 000); for binaries it is the file's name.
    pub fn registry_file(&self) -> (String, Option<String>) {
        // A vm names a VM image file as it is (`web.zst`), or an OCI image
        // as docker does (`app:tag`, `app.tar:tag`).
        let tagged_vm = self.kind == Kind::Vm && self.image.contains(':');
        if self.kind != Kind::Docker && !tagged_vm {
            return (self.image.clone(), None);
        }
        let (file, tag) = match self.image.split_once(':') {
            Some((f, t)) if !t.is_empty() => (f, Some(t.to_owned())),
            _ => (self.image.as_str(), None),
        };
        let file = if file.ends_with(".tar") {
            file.to_owned()
        } else {
            format!("{file}.tar")
        };
        (file, tag)
    }

    /// The spec's environment as pairs (validated `K=V` entries).
    pub fn env_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().filter_map(|e| e.split_once('='))
    }

    /// The secrets its `env` and env files refer to (`secret:NAME`),
    /// sorted, each once.
    pub fn secret_refs(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .env
            .iter()
            .chain(self.env_file.iter().flat_map(|f| f.env.iter().flatten()))
            .filter_map(|e| secret_ref(e.split_once('=')?.1))
            .map(str::to_owned)
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// One thing wrong with a spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// Position in the file's array (None for a single object).
    pub index: Option<usize>,
    /// The service's name, when it could be read.
    pub name: Option<String>,
    /// The field at fault, None for the whole spec.
    pub field: Option<String>,
    pub reason: String,
    /// The line (1-based) in the file, where the format keeps lines (YAML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

impl SpecError {
    pub fn new(field: Option<&str>, reason: impl Into<String>) -> Self {
        SpecError {
            index: None,
            name: None,
            field: field.map(str::to_owned),
            reason: reason.into(),
            line: None,
        }
    }

    /// Places this error on a line of its file.
    pub fn on_line(mut self, line: usize) -> Self {
        self.line = Some(line);
        self
    }

    /// Names the spec this error belongs to.
    pub fn at(mut self, index: Option<usize>, name: Option<&str>) -> Self {
        self.index = index;
        self.name = name.map(str::to_owned);
        self
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        match (self.index, &self.name) {
            (Some(i), Some(n)) => write!(f, "spec #{} ({n:?})", i + 1)?,
            (Some(i), None) => write!(f, "spec #{}", i + 1)?,
            (None, Some(n)) => write!(f, "spec {n:?}")?,
            (None, None) => write!(f, "spec")?,
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Everything wrong with a spec file; it is rejected as a whole.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors {
    /// Where the specs came from, e.g. the file name.
    pub file: String,
    pub errors: Vec<SpecError>,
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{}: rejected, nothing was changed ({n} error{}):",
            self.file,
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Whether a file name says YAML (`.yaml`, `.yml`); anything else is JSON.
pub fn is_yaml(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml")
}

/// Parses a file holding one spec object or an array of them: YAML when
/// `source` ends in `.yaml` or `.yml` ([`is_yaml`]), JSON otherwise.
///
/// Every spec is checked on its own and against the others of the file
/// (duplicate names and addresses). Any error rejects the whole file.
pub fn parse_specs(source: &str, text: &str) -> Result<Vec<Spec>, SpecErrors> {
    let fail = |errors| SpecErrors {
        file: source.to_owned(),
        errors,
    };
    if is_yaml(source) {
        let (document, lines) = yaml::document(text).map_err(|e| fail(vec![e]))?;
        return specs_from_tree(document).map_err(|errors| {
            fail(
                errors
                    .into_iter()
                    .map(|mut e| {
                        e.line = e.line.or_else(|| lines.of(e.index, e.field.as_deref()));
                        e
                    })
                    .collect(),
            )
        });
    }
    // serde_json's message already ends with "at line L column C".
    let document: Value = serde_json::from_str(text)
        .map_err(|e| fail(vec![SpecError::new(None, format!("not valid JSON: {e}"))]))?;
    specs_from_tree(document).map_err(fail)
}

/// Runs a spec as the master stores it (the JSON of a [`Spec`]) through the
/// same checks as a deployed one, and checks that it is stored under its
/// own name.
pub fn parse_stored(name: &str, json: &str) -> Result<Spec, SpecErrors> {
    let fail = |errors: Vec<SpecError>| SpecErrors {
        file: format!("stored spec of service {name:?}"),
        errors: errors.into_iter().map(|e| e.at(None, Some(name))).collect(),
    };
    let stored: Value = serde_json::from_str(json)
        .map_err(|e| fail(vec![SpecError::new(None, format!("not valid JSON: {e}"))]))?;
    let spec = spec_from_tree(&stored).map_err(fail)?;
    if let Some((i, f)) = spec
        .env_file
        .iter()
        .enumerate()
        .find(|(_, f)| f.env.is_none())
    {
        return Err(fail(vec![SpecError::new(
            Some(&format!("env_file[{i}]")),
            format!("env file {} is stored without its entries", f.path),
        )]));
    }
    if spec.name != name {
        return Err(fail(vec![SpecError::new(
            Some("name"),
            format!("the spec names {:?} but is stored as {name:?}", spec.name),
        )]));
    }
    Ok(spec)
}

/// The specs of a document tree: one spec object or an array of them.
fn specs_from_tree(document: Value) -> Result<Vec<Spec>, Vec<SpecError>> {
    let (items, single) = match document {
        Value::Array(items) => (items, false),
        v @ Value::Object(_) => (vec![v], true),
        other => {
            return Err(vec![SpecError::new(
                None,
                format!(
                    "expected a spec object or an array of them, got {}",
                    raw::describe(&other)
                ),
            )]);
        }
    };
    if items.is_empty() {
        return Err(vec![SpecError::new(None, "the array holds no specs")]);
    }
    if items.len() > MAX_SPECS_PER_FILE {
        return Err(vec![SpecError::new(
            None,
            format!(
                "the file holds {} specs; at most {MAX_SPECS_PER_FILE} are allowed in one file",
                items.len()
            ),
        )]);
    }
    let mut errors = Vec::new();
    let mut specs = Vec::with_capacity(items.len());
    let mut names = HashSet::new();
    let mut ips = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let index = (!single).then_some(i);
        match spec_from_tree(item) {
            Ok(spec) => {
                let at = |e: SpecError| e.at(index, Some(&spec.name));
                if !names.insert(spec.name.clone()) {
                    errors.push(at(SpecError::new(
                        Some("name"),
                        format!("duplicate name {:?} in this file", spec.name),
                    )));
                }
                if let Some(ip) = spec.ip
                    && !ips.insert(ip)
                {
                    errors.push(at(SpecError::new(
                        Some("ip"),
                        format!("address {ip} is given to two services in this file"),
                    )));
                }
                specs.push(spec);
            }
            Err(errs) => {
                // Name the spec even when its name is invalid: it is how the
                // user will find it in the file.
                let name = item
                    .get("name")
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty());
                errors.extend(errs.into_iter().map(|e| e.at(index, name)));
            }
        }
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(errors)
    }
}

/// One spec of a document tree, read and validated. The errors name their
/// field; the caller names the spec.
fn spec_from_tree(item: &Value) -> Result<Spec, Vec<SpecError>> {
    if item.is_object() {
        let bytes = json_size(item);
        if bytes > MAX_SPEC_BYTES {
            return Err(vec![SpecError::new(
                None,
                format!(
                    "the spec takes {bytes} bytes as JSON; at most {MAX_SPEC_BYTES} (256 KiB) are allowed"
                ),
            )]);
        }
    }
    let reading = raw::read(item);
    let mut errors = reading.errors;
    if let Some(raw) = reading.raw {
        match validate(raw) {
            Ok(spec) if errors.is_empty() => return Ok(spec),
            Ok(_) => {}
            Err(found) => {
                // A field that could not be read is absent to validation,
                // which would only add "required field is missing".
                let unread = |e: &SpecError| {
                    e.field.as_deref().is_some_and(|f| {
                        let top = f.split('[').next().unwrap_or(f);
                        reading.unread.iter().any(|u| u == top)
                    })
                };
                errors.extend(found.into_iter().filter(|e| !unread(e)));
            }
        }
    }
    Err(errors)
}

/// The length of a value as compact JSON, without building the text.
fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a Value to a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> Vec<String> {
        parse_specs("t.json", text)
            .unwrap_err()
            .errors
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let s = parse_specs(
            "t.json",
            r#"{"machine":"m1","name":"web","image":"testy","type":"binary"}"#,
        )
        .unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].duration, Duration::Daemon);
        assert_eq!(s[0].proxyport, 8000);
        assert!(s[0].env.is_empty() && s[0].ip.is_none());
    }

    #[test]
    fn full_spec_round_trips() {
        let text = r#"[{"machine":"m1","name":"web","image":"testy","type":"binary",
            "duration":"oneshot","env":["A=1","B=x=y"],"proxyname":"example.com",
            "proxyport":9000,"healthcheck":"/health","ip":"fd38:dde8:32dd:5::7",
            "args":["--port","9000"],"link":["db"]}]"#;
        let s = parse_specs("t.json", text).unwrap();
        let again = serde_json::to_string(&s).unwrap();
        assert_eq!(parse_specs("t.json", &again).unwrap(), s);
        assert_eq!(s[0].env_pairs().nth(1), Some(("B", "x=y")));
    }

    #[test]
    fn every_error_names_field_and_reason() {
        let e = errs(
            r#"[{"machine":"m1","name":"Web_1","image":"a/b","type":"binary","proxyport":"80",
                 "env":["NOEQUALS", "1X=2", "PORT=3"],"colour":"red","ip":"fd00::1"},
                {"name":"ok","image":"x","type":"docker","machine":"m1"}]"#,
        );
        let all = e.join("\n");
        assert!(
            all.contains("spec #1 (\"Web_1\"): field `colour`: unknown field"),
            "{all}"
        );
        assert!(
            all.contains("field `name`: \"Web_1\" cannot be a hostname"),
            "{all}"
        );
        assert!(all.contains("field `image`"), "{all}");
        assert!(
            all.contains(
                "field `proxyport`: expected a port number from 1 to 65535, got a string \"80\""
            ),
            "{all}"
        );
        assert!(
            all.contains("field `env[0]`: \"NOEQUALS\" is not of the form KEY=VALUE"),
            "{all}"
        );
        assert!(
            all.contains("field `env[1]`: \"1X\" is not a variable name"),
            "{all}"
        );
        assert!(
            all.contains("field `env[2]`: PORT is set by Phoenix"),
            "{all}"
        );
        assert!(
            all.contains("field `ip`: fd00::1 is outside the cluster's range"),
            "{all}"
        );
        assert!(!all.contains("spec #2"), "docker is supported: {all}");
    }

    #[test]
    fn missing_and_empty_fields() {
        let all = errs(r#"{"name":"","type":"binary","image":"x"}"#).join("\n");
        assert!(
            all.contains("spec: field `machine`: required field is missing"),
            "{all}"
        );
        assert!(all.contains("field `name`: must not be empty"), "{all}");
    }

    #[test]
    fn duplicates_in_one_file() {
        let all = errs(
            r#"[{"machine":"m","name":"a","image":"x","type":"binary","ip":"fd38:dde8:32dd:1::9"},
                {"machine":"m","name":"a","image":"x","type":"binary","ip":"fd38:dde8:32dd:1::9"}]"#,
        )
        .join("\n");
        assert!(
            all.contains("spec #2 (\"a\"): field `name`: duplicate name"),
            "{all}"
        );
        assert!(
            all.contains("field `ip`: address fd38:dde8:32dd:1::9 is given to two services"),
            "{all}"
        );
    }

    #[test]
    fn bad_json_and_shapes() {
        assert!(errs("{").join("").contains("not valid JSON"));
        assert!(errs("[]").join("").contains("holds no specs"));
        assert!(
            errs("42")
                .join("")
                .contains("expected a spec object or an array")
        );
        assert!(
            errs("[1]")
                .join("")
                .contains("spec #1: expected an object, got a number 1")
        );
        assert!(
            errs(
                r#"{"machine":"m","name":"a","image":"x","type":"binary","ip":"fd38:dde8:32dd::5"}"#
            )
            .join("")
            .contains("reserved for nodes")
        );
    }

    #[test]
    fn docker_images_limits_and_sizes() {
        let s = &parse_specs(
            "t",
            r#"{"machine":"m","name":"c","image":"app:v2","type":"docker","memory":"256M","cpus":0.5}"#,
        )
        .unwrap()[0];
        assert_eq!(s.registry_file(), ("app.tar".into(), Some("v2".into())));
        assert_eq!((s.memory, s.cpus), (Some(256 << 20), Some(0.5)));
        let bare = &parse_specs(
            "t",
            r#"{"machine":"m","name":"c","image":"app.tar","type":"docker"}"#,
        )
        .unwrap()[0];
        assert_eq!(bare.registry_file(), ("app.tar".into(), None));
        // Binaries take limits too since issue 9 (the minion applies them
        // through cgroups); only the malformed one is refused.
        let all = errs(
            r#"{"machine":"m","name":"b","image":"x","type":"binary","memory":"1G","cpus":"two"}"#,
        )
        .join("\n");
        assert!(!all.contains("field `memory`"), "{all}");
        let binary = &parse_specs(
            "t",
            r#"{"machine":"m","name":"b","image":"x","type":"binary","memory":"1G","cpus":0.5}"#,
        )
        .unwrap()[0];
        assert_eq!((binary.memory, binary.cpus), (Some(1 << 30), Some(0.5)));
        assert!(
            all.contains("field `cpus`: expected a number of cores"),
            "{all}"
        );
        // A VM: memory and cpus size it.
        let vm = &parse_specs(
            "t",
            r#"{"machine":"m","name":"v","image":"v.zst","type":"vm","memory":"512M","cpus":2}"#,
        )
        .unwrap()[0];
        assert_eq!(vm.kind, Kind::Vm);
        assert_eq!((vm.memory, vm.cpus), (Some(512 << 20), Some(2.0)));
        assert_eq!(vm.registry_file(), ("v.zst".to_owned(), None));
        // A VM booting an OCI image names it as docker does.
        let oci_vm = &parse_specs(
            "t",
            r#"{"machine":"m","name":"v","image":"app:v2","type":"vm"}"#,
        )
        .unwrap()[0];
        assert_eq!(
            oci_vm.registry_file(),
            ("app.tar".to_owned(), Some("v2".to_owned()))
        );
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn hostname_rules() {
        assert!(check_hostname_label("web-1").is_ok());
        assert!(check_hostname_label("-web").is_err());
        assert!(check_hostname_label(&"a".repeat(64)).is_err());
        assert!(check_hostname_label("wéb").is_err());
    }

    const WEB: &str = r#""machine":"m1","name":"web","image":"testy","type":"binary""#;

    #[test]
    fn unknown_field_suggests_the_closest_known_one() {
        let all = errs(&format!(r#"{{{WEB},"helthcheck":"/health","Name":"x"}}"#)).join("\n");
        assert!(
            all.contains(
                "spec \"web\": field `helthcheck`: unknown field; did you mean `healthcheck`?"
            ),
            "{all}"
        );
        assert!(
            all.contains("field `Name`: unknown field; did you mean `name`?"),
            "{all}"
        );
    }

    #[test]
    fn type_errors_name_their_path() {
        let all = errs(&format!(
            r#"{{{WEB},"env":["A=1","B=2",3],"link":[null],"duration":7}}"#
        ))
        .join("\n");
        assert!(
            all.contains("spec \"web\": field `env[2]`: expected a string, got a number 3"),
            "{all}"
        );
        assert!(
            all.contains("field `link[0]`: expected a string, got null"),
            "{all}"
        );
        assert!(
            all.contains("field `duration`: expected a string, got a number 7"),
            "{all}"
        );
    }

    #[test]
    fn all_errors_of_a_file_come_at_once() {
        // A type error in the first spec hides neither that spec's other
        // errors nor those of the specs after it.
        let e = errs(
            r#"[{"machine":"m1","name":"a","image":"x","type":"binary","proxyport":"80","ip":"fd00::1"},
                {"machine":"M1","name":"b","image":"x","type":"binary"},
                {"machine":"m1","name":"c","image":"x","type":"binary","imgae":"y"},
                {"name":"d","image":".hidden","type":"binary","cpus":[1]}]"#,
        );
        let all = e.join("\n");
        for expected in [
            "spec #1 (\"a\"): field `proxyport`: expected a port number from 1 to 65535, got a string \"80\"",
            "spec #1 (\"a\"): field `ip`: fd00::1 is outside the cluster's range",
            "spec #2 (\"b\"): field `machine`: \"M1\" cannot be a hostname",
            "spec #3 (\"c\"): field `imgae`: unknown field; did you mean `image`?",
            "spec #4 (\"d\"): field `cpus`: expected a number of cores from 0.01 up, like 0.5 or 2, got an array [1]",
            "spec #4 (\"d\"): field `machine`: required field is missing",
            "spec #4 (\"d\"): field `image`: \".hidden\" is not an image name",
        ] {
            assert!(all.contains(expected), "{expected}\nnot in\n{all}");
        }
        assert_eq!(e.len(), 7, "{all}");
    }

    #[test]
    fn a_field_of_the_wrong_type_is_not_also_missing() {
        let e = errs(r#"{"machine":5,"name":"a","image":"x","type":"binary"}"#);
        assert_eq!(
            e,
            ["spec \"a\": field `machine`: expected a string, got a number 5"]
        );
    }

    #[test]
    fn json_syntax_errors_say_where_once() {
        let e = errs("[\n  {\"name\": }\n]");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].matches("line").count(), 1, "{}", e[0]);
        assert!(e[0].contains("at line 2 column 12"), "{}", e[0]);
        assert!(e[0].starts_with("spec: not valid JSON: "), "{}", e[0]);
    }

    #[test]
    fn nul_bytes_in_env_and_args_are_refused() {
        let all = errs(&format!(
            r#"{{{WEB},"env":["A=1","B=\u0000"],"args":["\u0000x"]}}"#
        ))
        .join("\n");
        assert!(all.contains("field `env[1]`: holds a NUL byte"), "{all}");
        assert!(all.contains("field `args[0]`: holds a NUL byte"), "{all}");
    }

    #[test]
    fn args_and_env_are_limited_together() {
        let arg = "x".repeat(70_000);
        let all = errs(&format!(r#"{{{WEB},"args":["{arg}"],"env":["A={arg}"]}}"#)).join("\n");
        assert!(
            all.contains(
                "field `args`: args and env together take 140004 bytes; at most 131072 (128 KiB)"
            ),
            "{all}"
        );
        assert!(parse_specs("t", &format!(r#"{{{WEB},"args":["{arg}"]}}"#)).is_ok());
    }

    #[test]
    fn a_spec_over_256_kib_is_refused() {
        let big = "x".repeat(MAX_SPEC_BYTES);
        let text = format!(r#"[{{{WEB},"healthcheck":"/{big}"}}, {{"name":"b"}}]"#);
        let all = errs(&text).join("\n");
        let size = text.find(", {").unwrap() - 1;
        assert!(
            all.contains(&format!(
                "spec #1 (\"web\"): the spec takes {size} bytes as JSON; at most 262144 (256 KiB) are allowed"
            )),
            "{all}"
        );
        // The spec after it is still checked.
        assert!(
            all.contains("spec #2 (\"b\"): field `machine`: required field is missing"),
            "{all}"
        );
    }

    #[test]
    fn a_file_of_more_than_1000_specs_is_refused() {
        let file = |n: usize| {
            let specs: Vec<String> = (0..n)
                .map(|i| format!(r#"{{"machine":"m","name":"s{i}","image":"x","type":"binary"}}"#))
                .collect();
            format!("[{}]", specs.join(","))
        };
        assert_eq!(parse_specs("t", &file(1000)).unwrap().len(), 1000);
        assert_eq!(
            errs(&file(1001)),
            ["spec: the file holds 1001 specs; at most 1000 are allowed in one file"]
        );
    }

    fn stored_web() -> (Spec, String) {
        let text = format!(
            r#"{{{WEB},"env":["A=1"],"ip":"fd38:dde8:32dd:5::7","memory":"64M","cpus":0.25,"link":["db"]}}"#
        );
        let spec = parse_specs("t", &text).unwrap().remove(0);
        let json = serde_json::to_string(&spec).unwrap();
        (spec, json)
    }

    #[test]
    fn stored_specs_round_trip() {
        let (spec, json) = stored_web();
        assert_eq!(parse_stored("web", &json).unwrap(), spec);
    }

    #[test]
    fn tampered_stored_specs_are_refused() {
        let (_, json) = stored_web();
        let tampered = |from: &str, to: &str| {
            assert!(json.contains(from), "{json}");
            parse_stored("web", &json.replacen(from, to, 1))
                .unwrap_err()
                .to_string()
        };
        let e = tampered(r#""A=1""#, r#""PORT=1""#);
        assert!(
            e.starts_with("stored spec of service \"web\": rejected"),
            "{e}"
        );
        assert!(
            e.contains("spec \"web\": field `env[0]`: PORT is set by Phoenix"),
            "{e}"
        );
        let e = tampered(r#""image":"testy""#, r#""image":"../../etc/passwd""#);
        assert!(e.contains("field `image`"), "{e}");
        let e = tampered(r#""type":"binary""#, r#""type":"binary","privileged":true"#);
        assert!(e.contains("field `privileged`: unknown field"), "{e}");
        let e = tampered(r#""name":"web""#, r#""name":"other""#);
        assert!(
            e.contains("field `name`: the spec names \"other\" but is stored as \"web\""),
            "{e}"
        );
        let e = tampered("}", "");
        assert!(e.contains("not valid JSON: EOF while parsing"), "{e}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use proptest::sample::select;

        /// Any JSON, with keys that are often the known fields.
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ];
            let key = prop_oneof![select(known_fields()).prop_map(str::to_owned), ".{0,12}",];
            leaf.prop_recursive(4, 48, 8, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                    prop::collection::btree_map(key.clone(), inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Objects close to a real spec, valid often enough to round-trip.
        fn spec_like() -> impl Strategy<Value = Value> {
            let names = "[a-z][a-z0-9-]{0,8}[a-z0-9]";
            let required = (
                select(vec!["m1", "node-2", "Bad"]),
                names,
                select(vec!["testy", "app:v2", "app.tar", ".x"]),
                select(vec!["binary", "docker", "vm"]),
                prop::option::of(select(vec!["daemon", "oneshot", "forever"])),
                prop::collection::vec("[A-Z_][A-Z0-9_]{0,5}=[ -~]{0,8}", 0..3),
                prop::option::of(select(vec!["example.com", "a.b-c.io", "No"])),
            );
            let optional = (
                prop::option::of(0u64..70_000),
                prop::option::of("/[a-z/]{0,8}"),
                prop::option::of((1u16..4, any::<u16>())),
                prop::collection::vec(".{0,10}", 0..3),
                prop::collection::vec(names, 0..2),
                prop::option::of(prop_oneof![
                    any::<u64>().prop_map(Value::from),
                    "[0-9]{1,5}[kKmMgG]?".prop_map(Value::from),
                ]),
                prop::option::of(0.0f64..2000.0),
            );
            (required, optional).prop_map(
                |(
                    (machine, name, image, kind, duration, env, proxyname),
                    (proxyport, healthcheck, ip, args, link, memory, cpus),
                )| {
                    let mut o = serde_json::json!({
                        "machine": machine, "name": name, "image": image,
                        "type": kind, "env": env, "args": args, "link": link,
                    });
                    let o = o.as_object_mut().unwrap();
                    let mut put = |k: &str, v: Option<Value>| {
                        if let Some(v) = v {
                            o.insert(k.to_owned(), v);
                        }
                    };
                    put("duration", duration.map(Value::from));
                    put("proxyname", proxyname.map(Value::from));
                    put("proxyport", proxyport.map(Value::from));
                    put("healthcheck", healthcheck.map(Value::from));
                    put(
                        "ip",
                        ip.map(|(net, host)| {
                            Value::from(format!("fd38:dde8:32dd:{net:x}::{host:x}"))
                        }),
                    );
                    put("memory", memory);
                    put("cpus", cpus.map(Value::from));
                    Value::Object(o.clone())
                },
            )
        }

        proptest! {
            #[test]
            fn any_text_is_answered_without_panicking(text in ".{0,200}") {
                let _ = parse_specs("t", &text);
                let _ = parse_stored("t", &text);
            }

            #[test]
            fn any_json_is_answered_without_panicking(value in json()) {
                let text = value.to_string();
                let _ = parse_specs("t", &text);
                let _ = parse_stored("t", &text);
            }

            #[test]
            fn accepted_specs_reparse_to_themselves(value in spec_like()) {
                if let Ok(specs) = parse_specs("t", &value.to_string()) {
                    let spec = &specs[0];
                    let json = serde_json::to_string(spec).unwrap();
                    prop_assert_eq!(&parse_specs("t", &json).unwrap(), &specs);
                    prop_assert_eq!(&parse_stored(&spec.name, &json).unwrap(), spec);
                }
            }
        }

        /// The round trip above means something only if the strategy makes
        /// valid specs often; this keeps it honest.
        #[test]
        fn spec_like_is_often_valid() {
            use proptest::strategy::ValueTree;
            use proptest::test_runner::TestRunner;
            let mut runner = TestRunner::deterministic();
            let strategy = spec_like();
            let valid = (0..200)
                .filter(|_| {
                    let value = strategy.new_tree(&mut runner).unwrap().current();
                    parse_specs("t", &value.to_string()).is_ok()
                })
                .count();
            assert!(valid >= 20, "only {valid} of 200 were valid");
        }
    }
}
