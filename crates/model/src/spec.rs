//! The service spec (seed 000) and its validation.
//!
//! Parsing is by hand from a `serde_json::Value` rather than through derive,
//! so that every error can name the service, the field and the reason, and so
//! that all errors of a file are reported at once. Checks that need cluster
//! state (does the machine exist, is the image in the registry, is the address
//! free) belong to the master and report through the same [`SpecError`].

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv6Addr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::net;

/// The port the proxy expects a service on when the spec does not say.
pub const DEFAULT_PROXYPORT: u16 = 8000;

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxyname: Option<String>,
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

impl Spec {
    /// The registry file and the tag within it. For type docker `image` is
    /// `FILE[:TAG]`, and `.tar` is assumed when FILE has no extension of its
    /// own (seed 000); for binaries it is the file's name.
    pub fn registry_file(&self) -> (String, Option<String>) {
        if self.kind != Kind::Docker {
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
}

impl SpecError {
    pub fn new(field: Option<&str>, reason: impl Into<String>) -> Self {
        SpecError {
            index: None,
            name: None,
            field: field.map(str::to_owned),
            reason: reason.into(),
        }
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

const FIELDS: [&str; 14] = [
    "machine",
    "name",
    "image",
    "type",
    "duration",
    "env",
    "proxyname",
    "proxyport",
    "healthcheck",
    "ip",
    "args",
    "link",
    "memory",
    "cpus",
];

/// Parses a file holding one spec object or an array of them.
///
/// Every spec is checked on its own and against the others of the file
/// (duplicate names and addresses). Any error rejects the whole file.
pub fn parse_specs(source: &str, text: &str) -> Result<Vec<Spec>, SpecErrors> {
    let fail = |errors| SpecErrors {
        file: source.to_owned(),
        errors,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| {
        fail(vec![SpecError::new(
            None,
            format!(
                "not valid JSON: {e} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )])
    })?;
    let (items, single) = match value {
        Value::Array(items) => (items, false),
        v @ Value::Object(_) => (vec![v], true),
        other => {
            return Err(fail(vec![SpecError::new(
                None,
                format!(
                    "expected a spec object or an array of them, got {}",
                    describe(&other)
                ),
            )]));
        }
    };
    if items.is_empty() {
        return Err(fail(vec![SpecError::new(None, "the array holds no specs")]));
    }
    let mut errors = Vec::new();
    let mut specs = Vec::with_capacity(items.len());
    let mut names = HashSet::new();
    let mut ips = HashSet::new();
    for (i, item) in items.iter().enumerate() {
        let index = (!single).then_some(i);
        match parse_one(item) {
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
        Err(fail(errors))
    }
}

/// Parses and validates one spec object.
pub fn parse_one(value: &Value) -> Result<Spec, Vec<SpecError>> {
    let Value::Object(obj) = value else {
        return Err(vec![SpecError::new(
            None,
            format!("expected an object, got {}", describe(value)),
        )]);
    };
    let mut errs = Vec::new();
    for key in obj.keys() {
        if !FIELDS.contains(&key.as_str()) {
            errs.push(SpecError::new(
                Some(key),
                format!("unknown field (known fields: {})", FIELDS.join(", ")),
            ));
        }
    }
    let mut f = Fields {
        obj,
        errs: &mut errs,
    };
    let machine = f.string("machine", true).unwrap_or_default();
    let name = f.string("name", true).unwrap_or_default();
    let image = f.string("image", true).unwrap_or_default();
    let kind = f.kind();
    let duration = f.duration();
    let env = f.strings("env");
    let proxyname = f.string("proxyname", false);
    let proxyport = f.port();
    let healthcheck = f.string("healthcheck", false);
    let ip = f.ip();
    let args = f.strings("args");
    let link = f.strings("link");
    let memory = f.memory();
    let cpus = f.cpus();

    if !machine.is_empty() {
        check_hostname_label(&machine)
            .unwrap_or_else(|r| errs.push(SpecError::new(Some("machine"), r)));
    }
    if !name.is_empty() {
        check_hostname_label(&name).unwrap_or_else(|r| errs.push(SpecError::new(Some("name"), r)));
    }
    if !image.is_empty() {
        check_image_name(&image).unwrap_or_else(|r| errs.push(SpecError::new(Some("image"), r)));
    }
    if kind == Some(Kind::Vm) {
        errs.push(SpecError::new(
            Some("type"),
            "type \"vm\" is not supported yet; this version runs \"binary\" and \"docker\"",
        ));
    }
    if kind == Some(Kind::Binary) {
        for (field, set) in [("memory", memory.is_some()), ("cpus", cpus.is_some())] {
            if set {
                errs.push(SpecError::new(
                    Some(field),
                    "limits apply to type \"docker\" only in this version",
                ));
            }
        }
    }
    for (i, entry) in env.iter().enumerate() {
        if let Err(r) = check_env(entry) {
            errs.push(SpecError::new(Some(&format!("env[{i}]")), r));
        }
    }
    if let Some(p) = &proxyname {
        check_domain(p).unwrap_or_else(|r| errs.push(SpecError::new(Some("proxyname"), r)));
    }
    if let Some(h) = &healthcheck
        && (!h.starts_with('/') || h.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        errs.push(SpecError::new(
            Some("healthcheck"),
            format!("{h:?} is not a URL path; it must start with '/' and hold no spaces, e.g. \"/health\""),
        ));
    }
    for (i, l) in link.iter().enumerate() {
        if let Err(r) = check_hostname_label(l) {
            errs.push(SpecError::new(Some(&format!("link[{i}]")), r));
        } else if *l == name {
            errs.push(SpecError::new(
                Some(&format!("link[{i}]")),
                "a service need not link to itself",
            ));
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Spec {
        machine,
        name,
        image,
        kind: kind.unwrap_or(Kind::Binary),
        duration: duration.unwrap_or_default(),
        env,
        proxyname,
        proxyport: proxyport.unwrap_or(DEFAULT_PROXYPORT),
        healthcheck,
        ip,
        args,
        link,
        memory,
        cpus,
    })
}

/// Reads typed fields out of a spec object, recording what is wrong.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    errs: &'a mut Vec<SpecError>,
}

impl Fields<'_> {
    fn wrong(&mut self, field: &str, expected: &str, got: &Value) {
        self.errs.push(SpecError::new(
            Some(field),
            format!("expected {expected}, got {}", describe(got)),
        ));
    }

    fn string(&mut self, field: &str, required: bool) -> Option<String> {
        match self.obj.get(field) {
            None | Some(Value::Null) if required => {
                self.errs
                    .push(SpecError::new(Some(field), "required field is missing"));
                None
            }
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => {
                self.errs
                    .push(SpecError::new(Some(field), "must not be empty"));
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.wrong(field, "a string", v);
                None
            }
        }
    }

    fn strings(&mut self, field: &str) -> Vec<String> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        v => self.wrong(&format!("{field}[{i}]"), "a string", v),
                    }
                }
                out
            }
            Some(v) => {
                self.wrong(field, "an array of strings", v);
                Vec::new()
            }
        }
    }

    fn kind(&mut self) -> Option<Kind> {
        match self.string("type", true)?.as_str() {
            "binary" => Some(Kind::Binary),
            "docker" => Some(Kind::Docker),
            "vm" => Some(Kind::Vm),
            other => {
                self.errs.push(SpecError::new(
                    Some("type"),
                    format!("{other:?} is not a type; use \"binary\", \"docker\" or \"vm\""),
                ));
                None
            }
        }
    }

    fn duration(&mut self) -> Option<Duration> {
        match self.string("duration", false)?.as_str() {
            "daemon" => Some(Duration::Daemon),
            "oneshot" => Some(Duration::Oneshot),
            other => {
                self.errs.push(SpecError::new(
                    Some("duration"),
                    format!("{other:?} is not a duration; use \"daemon\" or \"oneshot\""),
                ));
                None
            }
        }
    }

    fn memory(&mut self) -> Option<u64> {
        let v = self.obj.get("memory")?;
        let parsed = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => parse_size(s),
            _ => None,
        };
        match parsed {
            Some(b) if b >= 4 << 20 => Some(b),
            _ => {
                self.wrong(
                    "memory",
                    "a size of at least 4M, like \"512M\", \"2G\" or a number of bytes",
                    v,
                );
                None
            }
        }
    }

    fn cpus(&mut self) -> Option<f64> {
        let v = self.obj.get("cpus")?;
        match v.as_f64() {
            Some(c) if (0.01..=1024.0).contains(&c) => Some(c),
            _ => {
                self.wrong("cpus", "a number of cores from 0.01 up, like 0.5 or 2", v);
                None
            }
        }
    }

    fn port(&mut self) -> Option<u16> {
        let v = self.obj.get("proxyport")?;
        match v.as_u64() {
            Some(p) if (1..=65535).contains(&p) => u16::try_from(p).ok(),
            _ => {
                self.wrong("proxyport", "a port number from 1 to 65535", v);
                None
            }
        }
    }

    fn ip(&mut self) -> Option<Ipv6Addr> {
        let s = self.string("ip", false)?;
        let Ok(ip) = s.parse::<Ipv6Addr>() else {
            self.errs.push(SpecError::new(
                Some("ip"),
                format!("{s:?} is not an IPv6 address"),
            ));
            return None;
        };
        if !net::in_cluster(ip) {
            self.errs.push(SpecError::new(
                Some("ip"),
                format!("{ip} is outside the cluster's range fd38:dde8:32dd::/48"),
            ));
            return None;
        }
        if net::in_node_range(ip) {
            self.errs.push(SpecError::new(
                Some("ip"),
                format!("{ip} is in fd38:dde8:32dd::/64, which is reserved for nodes"),
            ));
            return None;
        }
        Some(ip)
    }
}

/// A short description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    let s = v.to_string();
    let kind = match v {
        Value::Null => return "null".into(),
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    if s.len() <= 40 {
        format!("{kind} {s}")
    } else {
        kind.to_owned()
    }
}

/// `"512M"`, `"2G"`, `"64k"`, `"1000"` (bytes) → bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// A name that can be a hostname label (RFC 1123): 1 to 63 of `a-z`, `0-9`
/// and `-`, not starting or ending with `-`. Lowercase only, so that two
/// names never differ by case alone.
pub fn check_hostname_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!(
            "{s:?} is {} characters; a hostname label has at most 63",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{s:?} cannot be a hostname: {c:?} is not allowed (use a-z, 0-9 and '-')"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!(
            "{s:?} cannot be a hostname: it starts or ends with '-'"
        ));
    }
    Ok(())
}

/// An image is a file name in the registry: no path separators, not hidden.
pub fn check_image_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.contains('/') || s.contains('\0') || s.starts_with('.') || s.len() > 255 {
        return Err(format!(
            "{s:?} is not an image name: it names a file in the registry, without '/' and not starting with '.'"
        ));
    }
    Ok(())
}

fn check_env(entry: &str) -> Result<(), String> {
    let Some((key, _)) = entry.split_once('=') else {
        return Err(format!("{entry:?} is not of the form KEY=VALUE"));
    };
    let mut chars = key.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "{key:?} is not a variable name (letters, digits and '_', not starting with a digit)"
        ));
    }
    if RESERVED_ENV.contains(&key) {
        return Err(format!(
            "{key} is set by Phoenix for every service and cannot be overridden"
        ));
    }
    Ok(())
}

fn check_domain(s: &str) -> Result<(), String> {
    let lower = s.to_ascii_lowercase();
    if s.len() > 253 || lower != s {
        return Err(format!(
            "{s:?} is not a lowercase domain name of at most 253 characters"
        ));
    }
    for label in s.split('.') {
        check_hostname_label(label).map_err(|r| format!("{s:?} is not a domain name: {r}"))?;
    }
    Ok(())
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
        let all = errs(
            r#"{"machine":"m","name":"b","image":"x","type":"binary","memory":"1G","cpus":"two"}"#,
        )
        .join("\n");
        assert!(
            all.contains("field `memory`: limits apply to type \"docker\" only"),
            "{all}"
        );
        assert!(
            all.contains("field `cpus`: expected a number of cores"),
            "{all}"
        );
        assert!(
            errs(r#"{"machine":"m","name":"v","image":"x","type":"vm"}"#)
                .join("")
                .contains("\"vm\" is not supported yet")
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
}
