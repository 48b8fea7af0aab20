//! Env files (a spec's `env_file`) and secret references.
//!
//! An env file is UTF-8 text, one entry a line:
//!
//! - `KEY=VALUE`: KEY a variable name (letters, digits and `_`, not
//!   starting with a digit), immediately followed by `=`; VALUE is the
//!   rest of the line as it is (spaces, `#`, `$` and `\` included: there
//!   is no shell expansion, no escape and no inline comment). A VALUE
//!   wholly inside one pair of matching quotes (`"…"` or `'…'`) loses
//!   them, so `A="x y"` and `A=x y` are the same. A `\r` before the line's
//!   end is dropped (files from Windows).
//! - an optional `export ` before KEY, so a file a shell sources reads too;
//! - blank lines, and lines whose first non-blank character is `#`
//!   (comments), are skipped;
//! - a KEY given twice in one file is an error (naming both lines), as are
//!   the variables Phoenix sets itself (`PHOENIX_NAME`, `PHOENIX_IP`,
//!   `PORT`), NUL bytes, and any other line.
//!
//! A VALUE of the form `secret:NAME` (in an env file or in the spec's
//! `env`) is a reference to the cluster secret NAME (`phoenix secret set
//! NAME`): the master puts its value there when it sends the service to
//! its minion, and shows `secret:NAME` everywhere else.
//!
//! Every error names the file and the line (`app.env:3: ...`) and never
//! repeats a value.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{RESERVED_ENV, is_yaml};

/// The prefix of a value that refers to a secret.
pub const SECRET_PREFIX: &str = "secret:";

/// The longest secret name.
pub const MAX_SECRET_NAME: usize = 64;

/// One env file of a spec: its path as the spec gives it (relative to the
/// spec file), and, once read, its entries (`KEY=VALUE`, in file order).
///
/// A user writes only the path (`"env_file": ["app.env"]`); the CLI sends
/// the file's text with the spec and the master stores the entries with
/// the service (`{"path": "app.env", "env": [...]}`), so that the service's
/// environment can be computed without the source tree.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EnvFile {
    pub path: String,
    /// None until the file's text has been read ([`load_env_files`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
}

/// One thing wrong in an env file, at a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvFileError {
    pub file: String,
    /// 1-based.
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for EnvFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.reason)
    }
}

/// The secret a value refers to (`secret:NAME` → `NAME`), if it does.
pub fn secret_ref(value: &str) -> Option<&str> {
    value.strip_prefix(SECRET_PREFIX)
}

/// Checks a secret's name: 1 to 64 ASCII letters, digits, `_`, `.` or
/// `-`, starting with a letter or a digit.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_SECRET_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a secret name: 1 to {MAX_SECRET_NAME} letters, digits, '_', '.' or '-', \
             starting with a letter or a digit"
        ))
    }
}

/// Checks an environment variable's name: letters, digits and `_`, not
/// starting with a digit, and not one Phoenix sets.
pub fn check_env_key(key: &str) -> Result<(), String> {
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

/// Checks a value: no NUL byte, and a secret reference names a valid
/// secret. The reason never repeats the value.
pub fn check_env_value(value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err("holds a NUL byte, which an environment variable cannot".into());
    }
    if let Some(name) = secret_ref(value) {
        check_secret_name(name)?;
    }
    Ok(())
}

/// Reads an env file (the format is in the module's documentation) into
/// its entries, `KEY=VALUE`, in file order; or every error of the file,
/// each naming `file` and its line.
pub fn parse_env_file(file: &str, text: &str) -> Result<Vec<String>, Vec<EnvFileError>> {
    let mut errors = Vec::new();
    let mut entries = Vec::new();
    let mut seen: Vec<(String, usize)> = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let n = i + 1;
        let mut err = |reason: String| {
            errors.push(EnvFileError {
                file: file.to_owned(),
                line: n,
                reason,
            });
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let body = match body.strip_prefix("export") {
            Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
            _ => body,
        };
        let Some((key, value)) = body.split_once('=') else {
            err("expected KEY=VALUE (or a # comment); this line has no '='".into());
            continue;
        };
        if key.ends_with([' ', '\t']) {
            err(format!(
                "{:?}: no space may come before '=' (write KEY=VALUE)",
                key.trim_end()
            ));
            continue;
        }
        if let Err(r) = check_env_key(key) {
            err(r);
            continue;
        }
        let value = unquote(value);
        if let Err(r) = check_env_value(value) {
            err(format!("{key}: {r}"));
            continue;
        }
        if let Some((_, first)) = seen.iter().find(|(k, _)| k == key) {
            err(format!(
                "{key} is set twice in this file (lines {first} and {n})"
            ));
            continue;
        }
        seen.push((key.to_owned(), n));
        entries.push(format!("{key}={value}"));
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(errors)
    }
}

/// A value without one pair of matching quotes around all of it.
fn unquote(value: &str) -> &str {
    for q in ['"', '\''] {
        if value.len() >= 2 && value.starts_with(q) && value.ends_with(q) {
            return &value[1..value.len() - 1];
        }
    }
    value
}

/// Checks an `env_file` entry as a spec gives it: a relative path.
pub fn check_env_file_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("must not be empty".into());
    }
    if path.contains('\0') || path.chars().any(char::is_control) {
        return Err(format!(
            "{path:?} is not a file path: it holds a control character"
        ));
    }
    if is_yaml(path) || path.to_ascii_lowercase().ends_with(".json") {
        return Err(format!(
            "{path:?} ends like a spec file (.json, .yaml, .yml); name env files otherwise \
             (`app.env`), so a tree of spec files can hold them"
        ));
    }
    if path.starts_with('/') {
        return Err(format!(
            "{path:?} is absolute; give env files relative to the spec file, so the tree reads \
             the same wherever it is checked out"
        ));
    }
    Ok(())
}

/// The name of the env file `entry` of the spec file named `spec_file`:
/// `entry` relative to the spec file's folder, with `.` and `..` resolved
/// without looking at any disk (`deploy/web.json` + `../app.env` →
/// `app.env`). The CLI names the files it sends this way and the master
/// finds them by it, so both agree whatever the tree's root.
pub fn env_file_key(spec_file: &str, entry: &str) -> String {
    let base = Path::new(spec_file).parent().unwrap_or(Path::new(""));
    normalize(&base.join(entry)).display().to_string()
}

/// `.` and `..` resolved lexically; a `..` above the start is kept.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) => {}
                _ => out.push(c),
            },
            c => out.push(c),
        }
    }
    out.iter().collect()
}

/// The text of each env file sent with a spec file, by its name
/// ([`env_file_key`]).
pub trait EnvFileTexts {
    fn text_of(&self, key: &str) -> Option<&str>;
}

impl EnvFileTexts for [crate::proto::SourceFile] {
    fn text_of(&self, key: &str) -> Option<&str> {
        self.iter().find(|f| f.path == key).map(|f| f.text.as_str())
    }
}

impl EnvFileTexts for Vec<crate::proto::SourceFile> {
    fn text_of(&self, key: &str) -> Option<&str> {
        self.as_slice().text_of(key)
    }
}

/// Reads the env files of every spec of the spec file named `spec_file`
/// from `texts` (the files the CLI sent with it, by [`env_file_key`]),
/// replacing whatever entries the specs held. Refuses the whole file with
/// every error: a file not sent, a line that does not read (naming the
/// file and the line), or args and env together over
/// [`super::MAX_ARGS_ENV_BYTES`].
pub fn load_env_files<T: EnvFileTexts + ?Sized>(
    specs: &mut [super::Spec],
    spec_file: &str,
    texts: &T,
) -> Result<(), super::SpecErrors> {
    use super::{MAX_ARGS_ENV_BYTES, SpecError};
    let single = specs.len() == 1;
    let mut errors = Vec::new();
    for (i, spec) in specs.iter_mut().enumerate() {
        let index = (!single).then_some(i);
        let name = spec.name.clone();
        let mut err = |field: &str, reason: String| {
            errors.push(SpecError::new(Some(field), reason).at(index, Some(&name)));
        };
        let mut failed = false;
        for (j, file) in spec.env_file.iter_mut().enumerate() {
            let field = format!("env_file[{j}]");
            let key = env_file_key(spec_file, &file.path);
            let Some(text) = texts.text_of(&key) else {
                err(
                    &field,
                    format!(
                        "env file {key} was not sent with the spec; `phoenix deploy`, `update` and \
                         `apply` read env files from beside the spec file"
                    ),
                );
                failed = true;
                continue;
            };
            match parse_env_file(&key, text) {
                Ok(env) => file.env = Some(env),
                Err(errs) => {
                    for e in errs {
                        err(&field, e.to_string());
                    }
                    failed = true;
                }
            }
        }
        if failed {
            continue;
        }
        let bytes: usize = spec
            .args
            .iter()
            .chain(&spec.env)
            .chain(spec.env_file.iter().flat_map(|f| f.env.iter().flatten()))
            .map(|s| s.len() + 1)
            .sum();
        if bytes > MAX_ARGS_ENV_BYTES {
            err(
                "env_file",
                format!(
                    "args, env and env files together take {bytes} bytes; at most \
                     {MAX_ARGS_ENV_BYTES} (128 KiB) are allowed, to stay well under the kernel's \
                     limit for a new process"
                ),
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(super::SpecErrors {
            file: spec_file.to_owned(),
            errors,
        })
    }
}

/// The env file names every spec of a spec file refers to
/// ([`env_file_key`]), each once, in order: what the CLI reads and sends.
pub fn env_file_keys(spec_file: &str, specs: &[super::Spec]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in specs.iter().flat_map(|s| &s.env_file) {
        let key = env_file_key(spec_file, &f.path);
        if !out.contains(&key) {
            out.push(key);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::SourceFile;
    use crate::spec::parse_specs;

    #[test]
    fn the_format_comments_export_quotes_and_no_expansion() {
        let text = "# a comment\n\n  # indented comment\nA=1\nexport B=two words\r\n\
                    C=\"quoted # not a comment\"\nD='$HOME'\nE=\nF=a=b\nG=x\\ny $PATH\n";
        assert_eq!(
            parse_env_file("app.env", text).unwrap(),
            [
                "A=1",
                "B=two words",
                "C=quoted # not a comment",
                "D=$HOME",
                "E=",
                "F=a=b",
                "G=x\\ny $PATH"
            ]
        );
        assert_eq!(parse_env_file("e", "").unwrap(), Vec::<String>::new());
        assert_eq!(
            parse_env_file("e", "DB=secret:db\n").unwrap(),
            ["DB=secret:db"]
        );
    }

    #[test]
    fn errors_name_the_file_and_line_and_never_the_value() {
        let text = "A=1\nnot a line\n1X=2\nPORT=80\nB =3\nA=hunter2\nS=secret:bad/name\nexport\n";
        let errs: Vec<String> = parse_env_file("conf/app.env", text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errs,
            [
                "conf/app.env:2: expected KEY=VALUE (or a # comment); this line has no '='",
                "conf/app.env:3: \"1X\" is not a variable name (letters, digits and '_', not starting with a digit)",
                "conf/app.env:4: PORT is set by Phoenix for every service and cannot be overridden",
                "conf/app.env:5: \"B\": no space may come before '=' (write KEY=VALUE)",
                "conf/app.env:6: A is set twice in this file (lines 1 and 6)",
                "conf/app.env:7: S: \"bad/name\" is not a secret name: 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or a digit",
                "conf/app.env:8: expected KEY=VALUE (or a # comment); this line has no '='",
            ]
        );
        assert!(!errs.join("\n").contains("hunter2"));
        let nul = parse_env_file("e", "A=x\0y").unwrap_err();
        assert_eq!(
            nul[0].to_string(),
            "e:1: A: holds a NUL byte, which an environment variable cannot"
        );
    }

    #[test]
    fn env_file_names_are_relative_to_the_spec_file() {
        assert_eq!(env_file_key("deploy/web.json", "app.env"), "deploy/app.env");
        assert_eq!(
            env_file_key("deploy/web.json", "../common.env"),
            "common.env"
        );
        assert_eq!(
            env_file_key("deploy/web.json", "./x/../y.env"),
            "deploy/y.env"
        );
        assert_eq!(env_file_key("web.json", "a.env"), "a.env");
        assert_eq!(env_file_key("/srv/t/web.yaml", "a.env"), "/srv/t/a.env");
        assert_eq!(env_file_key("web.json", "../up.env"), "../up.env");
        assert_eq!(env_file_key("<stdin>", "a.env"), "a.env");
    }

    #[test]
    fn secret_names() {
        assert!(check_secret_name("db").is_ok());
        assert!(check_secret_name("db_pass.v2-x").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_secret_name(bad).is_err(), "{bad:?}");
        }
    }

    fn web(extra: &str) -> Vec<crate::spec::Spec> {
        parse_specs(
            "deploy/web.json",
            &format!(r#"{{"machine":"m","name":"web","image":"x","type":"binary"{extra}}}"#),
        )
        .unwrap()
    }

    #[test]
    fn a_spec_s_env_files_load_from_the_files_sent_with_it() {
        let mut specs = web(r#","env_file":["app.env","../common.env"],"env":["P=secret:db"]"#);
        assert_eq!(
            env_file_keys("deploy/web.json", &specs),
            ["deploy/app.env", "common.env"]
        );
        assert_eq!(specs[0].env_file[0].env, None);
        let sent = vec![
            SourceFile {
                path: "deploy/app.env".into(),
                text: "A=1\nK=secret:api\n".into(),
            },
            SourceFile {
                path: "common.env".into(),
                text: "C=3\n".into(),
            },
        ];
        load_env_files(&mut specs, "deploy/web.json", &sent).unwrap();
        assert_eq!(
            specs[0].env_file[0].env.as_deref(),
            Some(&["A=1".to_owned(), "K=secret:api".to_owned()][..])
        );
        assert_eq!(specs[0].secret_refs(), ["api", "db"]);
        // Stored as the master keeps it, and read back through the checks.
        let json = serde_json::to_string(&specs[0]).unwrap();
        assert!(
            json.contains(r#""env_file":[{"path":"app.env","env":["A=1","K=secret:api"]}"#),
            "{json}"
        );
        assert_eq!(crate::spec::parse_stored("web", &json).unwrap(), specs[0]);

        // A file not sent, and a file with an error, are named.
        let mut specs = web(r#","env_file":["app.env","nope.env"]"#);
        let bad = vec![SourceFile {
            path: "deploy/app.env".into(),
            text: "A=1\noops\n".into(),
        }];
        let e = load_env_files(&mut specs, "deploy/web.json", &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field `env_file[0]`: deploy/app.env:2: expected KEY=VALUE"),
            "{e}"
        );
        assert!(
            e.contains("field `env_file[1]`: env file deploy/nope.env was not sent with the spec"),
            "{e}"
        );
    }

    #[test]
    fn env_file_paths_and_stored_entries_are_checked() {
        let e = parse_specs(
            "t",
            r#"{"machine":"m","name":"web","image":"x","type":"binary","env_file":["/etc/x.env", "a.yaml"],"env":["A=secret:"]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("field `env_file[0]`: \"/etc/x.env\" is absolute"),
            "{e}"
        );
        assert!(
            e.contains("field `env_file[1]`: \"a.yaml\" ends like a spec file"),
            "{e}"
        );
        assert!(
            e.contains("field `env[0]`: \"\" is not a secret name"),
            "{e}"
        );
        let e = parse_specs(
            "t",
            r#"{"machine":"m","name":"web","image":"x","type":"binary","env_file":[5]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("field `env_file[0]`: expected a file path, got a number 5"),
            "{e}"
        );
        let e = crate::spec::parse_stored(
            "web",
            r#"{"machine":"m","name":"web","image":"x","type":"binary","duration":"daemon","proxyport":8000,"env_file":[{"path":"a.env","env":["PORT=1"]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("field `env_file[0]`: a.env: PORT is set by Phoenix"),
            "{e}"
        );
    }
}
