//! Importers: other tools' files become Phoenix specs (issue 15, item 4).
//!
//! Each importer is a pure function from a file's text (and the few facts
//! it cannot know: the machine, the variables, how to read a file it
//! names) to [`Imported`]: a [`RawSpec`] per service, the same thing the
//! JSON and YAML readers produce, plus everything that was *not* carried
//! over, so nothing is dropped silently. [`Imported::check`] runs the specs
//! through the ordinary pipeline (it renders them as JSON and parses that),
//! and [`Imported::to_yaml`] / [`Imported::report`] (JSON) render them for review.
//!
//! - [`compose`]: a `docker-compose.yml`.
//! - [`procfile`]: a Heroku-style `Procfile`.
//!
//! Errors ([`ImportError`]) name the file, the line, the service and the
//! field, and list every problem of the file at once, as spec errors do.

pub mod compose;
mod interpolate;
pub mod procfile;
mod tree;

use std::fmt;

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::Value;

pub use compose::{ComposeInput, compose};
pub use interpolate::interpolate;
pub use procfile::{ProcfileInput, procfile};

use super::raw::{RawSpec, Size};
use super::{Spec, SpecErrors, parse_specs};

/// Something of the imported file that the specs do not carry, or carry
/// only in part.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The service (as the file names it), None for the file as a whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The field of the imported file (`ports[1]`, `deploy.replicas`).
    pub field: String,
    /// The line in the imported file, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if let Some(s) = &self.service {
            write!(f, "service {s:?}: ")?;
        }
        write!(f, "`{}`: {}", self.field, self.reason)
    }
}

/// A registry file the imported specs need, and how to make it.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct RegistryFile {
    /// The file's name in the registry (`nginx.tar`).
    pub file: String,
    /// The references the file must hold (`nginx:1.25`), as the imported
    /// file gives them.
    pub references: Vec<String>,
    /// The services that run it (their Phoenix names).
    pub services: Vec<String>,
    /// A command line that makes and uploads the file.
    pub how: String,
}

/// What an importer made of a file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imported {
    /// One spec per service, in the file's order.
    pub specs: Vec<RawSpec>,
    /// What was not carried over (or only in part).
    pub not_carried: Vec<Note>,
    /// Changes made on the way that the user should know of (a renamed
    /// service, an inlined env file, an unset variable).
    pub warnings: Vec<Note>,
    /// The registry files the specs run, to `phoenix push` first.
    pub push: Vec<RegistryFile>,
    /// The line in the imported file where each spec's service is, in
    /// the order of `specs`: errors of the checks point there.
    pub lines: Vec<usize>,
}

/// One problem that stops a file from being imported.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
}

impl Problem {
    pub fn new(line: Option<usize>, field: Option<&str>, reason: impl Into<String>) -> Self {
        Problem {
            line,
            service: None,
            field: field.map(str::to_owned),
            reason: reason.into(),
        }
    }

    fn of(mut self, service: &str) -> Self {
        self.service = Some(service.to_owned());
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if let Some(s) = &self.service {
            write!(f, "service {s:?}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.reason)
    }
}

/// Everything that stops a file from being imported; nothing is imported.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ImportError {
    /// The imported file, as the user named it.
    pub file: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: cannot be imported ({n} problem{}):",
            self.file,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl Imported {
    /// The specs as JSON objects, their fields in the order of seed 000.
    pub fn spec_values(&self) -> Vec<OrderedSpec> {
        self.specs.iter().map(fields).map(OrderedSpec).collect()
    }

    /// Runs the specs through the pipeline every spec file goes through
    /// (`source` names them in errors): what `phoenix apply` would accept
    /// of them, cluster checks aside.
    pub fn check(&self, source: &str) -> Result<Vec<Spec>, SpecErrors> {
        let text =
            serde_json::to_string(&self.spec_values()).expect("specs serialize to JSON text");
        // Read as JSON whatever the source's extension says.
        parse_specs(&format!("{source} (imported)"), &text).map_err(|mut e| {
            for err in &mut e.errors {
                err.line = err.index.and_then(|i| self.lines.get(i).copied());
            }
            e
        })
    }

    /// The specs as one YAML document (a list), which `phoenix apply`
    /// reads as it reads any `.yaml` file; `header` lines become comments
    /// on top, followed by the files to push and what was not carried over.
    pub fn to_yaml(&self, header: &[String]) -> String {
        let mut out = String::new();
        let comment = |out: &mut String, text: &str| {
            for line in text.lines() {
                out.push_str(if line.is_empty() { "#" } else { "# " });
                out.push_str(line);
                out.push('\n');
            }
        };
        for h in header {
            comment(&mut out, h);
        }
        if !self.push.is_empty() {
            comment(&mut out, "Push these registry files first:");
            for p in &self.push {
                comment(&mut out, &format!("  {}", p.how));
            }
        }
        for (title, notes) in [
            ("Not carried over:", &self.not_carried),
            ("Changed on the way:", &self.warnings),
        ] {
            if !notes.is_empty() {
                comment(&mut out, title);
                for n in notes {
                    comment(&mut out, &format!("  {n}"));
                }
            }
        }
        for spec in self.spec_values() {
            out.push('\n');
            let mut first = true;
            for (key, value) in &spec.0 {
                out.push_str(if first { "- " } else { "  " });
                first = false;
                out.push_str(key);
                out.push(':');
                match value {
                    Value::Array(items) => {
                        out.push('\n');
                        for item in items {
                            out.push_str("    - ");
                            out.push_str(&yaml_scalar(item));
                            out.push('\n');
                        }
                    }
                    v => {
                        out.push(' ');
                        out.push_str(&yaml_scalar(v));
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    /// The import as one JSON object: `source`, `specs`, `push`,
    /// `not_carried_over` and `warnings` (the specs' fields in seed 000's
    /// order).
    pub fn report<'a>(&'a self, source: &'a str) -> Report<'a> {
        Report {
            source,
            specs: self.spec_values(),
            push: &self.push,
            not_carried_over: &self.not_carried,
            warnings: &self.warnings,
        }
    }
}

/// [`Imported::report`]: what `phoenix import --json` prints.
#[derive(Serialize, Debug)]
pub struct Report<'a> {
    pub source: &'a str,
    pub specs: Vec<OrderedSpec>,
    pub push: &'a [RegistryFile],
    pub not_carried_over: &'a [Note],
    pub warnings: &'a [Note],
}

/// A spec's fields in a fixed order, serialized in that order.
#[derive(Clone, Debug, PartialEq)]
pub struct OrderedSpec(pub Vec<(&'static str, Value)>);

impl Serialize for OrderedSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The fields an importer sets, in seed 000's order; empty ones left out.
fn fields(raw: &RawSpec) -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    let mut text = |k: &'static str, v: &Option<String>| {
        if let Some(v) = v {
            out.push((k, Value::from(v.as_str())));
        }
    };
    text("machine", &raw.machine);
    text("name", &raw.name);
    text("image", &raw.image);
    text("type", &raw.kind);
    text("duration", &raw.duration);
    if !raw.env.is_empty() {
        out.push(("env", Value::from(raw.env.clone())));
    }
    if let Some(p) = &raw.proxyname {
        out.push(("proxyname", Value::from(p.as_str())));
    }
    if let Some(p) = raw.proxyport {
        out.push(("proxyport", Value::from(p)));
    }
    if let Some(h) = &raw.healthcheck {
        out.push(("healthcheck", Value::from(h.as_str())));
    }
    if !raw.args.is_empty() {
        out.push(("args", Value::from(raw.args.clone())));
    }
    if !raw.link.is_empty() {
        out.push(("link", Value::from(raw.link.clone())));
    }
    match &raw.memory {
        Some(Size::Bytes(b)) => out.push(("memory", Value::from(*b))),
        Some(Size::Text(t)) => out.push(("memory", Value::from(t.as_str()))),
        None => {}
    }
    if let Some(c) = raw.cpus {
        out.push(("cpus", Value::from(c)));
    }
    out
}

/// A scalar as YAML: plain where YAML 1.2 reads it back as the same
/// string, JSON's double-quoted form (which is YAML's too) otherwise.
fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::String(s) if plain_is_safe(s) => s.clone(),
        v => v.to_string(),
    }
}

fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let words = ["null", "true", "false", "~", "yes", "no", "on", "off"];
    (first.is_ascii_alphabetic() || first == '/' || first == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./=+@:,-".contains(c))
        && !s.ends_with(':')
        && !words.iter().any(|w| s.eq_ignore_ascii_case(w))
}

/// A service name as a hostname label: lowercase, `a-z0-9-`, at most 63.
/// None if nothing is left.
fn sanitize_name(name: &str) -> Option<String> {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out.trim_matches('-').chars().take(63).collect();
    let out = out.trim_end_matches('-').to_owned();
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_hostname_labels() {
        assert_eq!(sanitize_name("web").as_deref(), Some("web"));
        assert_eq!(sanitize_name("My_App.v2").as_deref(), Some("my-app-v2"));
        assert_eq!(sanitize_name("__x__").as_deref(), Some("x"));
        assert_eq!(sanitize_name("___"), None);
        assert_eq!(sanitize_name(&"a".repeat(80)).unwrap().len(), 63);
    }

    #[test]
    fn yaml_scalars_are_plain_only_when_they_read_back_as_strings() {
        for s in ["web", "nginx:1.25", "/health", "A=1", "a-b_c.d"] {
            assert_eq!(yaml_scalar(&Value::from(s)), s);
        }
        for s in [
            "8080", "true", "No", "null", "~", "", "-x", "a b", "a: b", "x:", "#c", "0.5", "1e3",
            "*a", "&a", "!t", "'q'", "\"q\"", "[a]", "{a}", "a\nb",
        ] {
            assert_eq!(yaml_scalar(&Value::from(s)), Value::from(s).to_string());
        }
    }

    #[test]
    fn rendered_yaml_reads_back_as_the_same_specs() {
        let imported = Imported {
            specs: vec![RawSpec {
                machine: Some("m1".into()),
                name: Some("web".into()),
                image: Some("nginx:1.25".into()),
                kind: Some("docker".into()),
                env: vec!["A=1".into(), "B=two words: yes".into(), "C=".into()],
                proxyport: Some(80),
                healthcheck: Some("/health?x=1".into()),
                args: vec!["sh".into(), "-c".into(), "echo \"$A\" # no".into()],
                link: vec!["db".into()],
                memory: Some(Size::Text("512M".into())),
                cpus: Some(0.5),
                ..RawSpec::default()
            }],
            push: vec![RegistryFile {
                file: "nginx.tar".into(),
                references: vec!["nginx:1.25".into()],
                services: vec!["web".into()],
                how: "docker save nginx:1.25 -o nginx.tar && phoenix push nginx.tar".into(),
            }],
            not_carried: vec![Note {
                service: Some("web".into()),
                field: "volumes".into(),
                line: Some(3),
                reason: "no volumes\nsecond line".into(),
            }],
            warnings: Vec::new(),
            lines: vec![1],
        };
        let yaml = imported.to_yaml(&["Imported from x.yml".into()]);
        assert!(
            yaml.starts_with("# Imported from x.yml\n# Push these"),
            "{yaml}"
        );
        assert!(
            yaml.contains("#   line 3: service \"web\": `volumes`: no volumes\n# second line"),
            "{yaml}"
        );
        let from_yaml = parse_specs("out.yaml", &yaml).unwrap();
        assert_eq!(from_yaml, imported.check("out.json").unwrap(), "{yaml}");
        assert_eq!(from_yaml[0].args[2], "echo \"$A\" # no");
        let text = serde_json::to_string(&imported.report("x.yml")).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["specs"][0]["proxyport"], 80);
        assert_eq!(json["not_carried_over"][0]["field"], "volumes");
        // The fields keep seed 000's order in JSON too.
        assert!(text.find("\"machine\"") < text.find("\"image\""), "{text}");
    }
}
