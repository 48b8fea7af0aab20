//! `phoenix env`, `phoenix secret` and `phoenix info NAME --env` (issue 15).
//!
//! A secret's value is read from stdin (with the terminal's echo off when
//! stdin is one) and sent once, to the master's socket; nothing here ever
//! prints it.

use std::io::{IsTerminal, Read};
use std::path::Path;

use anyhow::{Context, Result};
use phoenix_model::env::{
    ClusterVar, EnvChanged, EnvView, Layer, SecretChanged, SecretValue, SecretView,
};
use phoenix_model::proto::Request;

use crate::cli::{EnvAction, SecretAction};
use crate::client::InvalidInput;
use crate::output::{table, utc};
use crate::{client, print_json};

pub async fn env(action: EnvAction) -> Result<()> {
    match action {
        EnvAction::Set { vars, target, json } => {
            let changed: EnvChanged =
                client::call(&target.data_dir, &Request::EnvSet { vars }).await?;
            report_env(&changed, "set", json.json)
        }
        EnvAction::Unset { keys, target, json } => {
            let changed: EnvChanged =
                client::call(&target.data_dir, &Request::EnvUnset { keys }).await?;
            report_env(&changed, "unset", json.json)
        }
        EnvAction::List { target, json } => {
            let vars: Vec<ClusterVar> = client::call(&target.data_dir, &Request::EnvList).await?;
            if json.json {
                return print_json(&vars);
            }
            if vars.is_empty() {
                println!("no cluster variables (`phoenix env set KEY=VALUE` sets one)");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = vars
                .iter()
                .map(|v| vec![v.key.clone(), one_line(&v.value), utc(v.updated_at)])
                .collect();
            table(&["KEY", "VALUE", "UPDATED"], &rows);
            Ok(())
        }
    }
}

fn report_env(changed: &EnvChanged, verb: &str, json: bool) -> Result<()> {
    if json {
        return print_json(changed);
    }
    if changed.changed.is_empty() {
        println!("nothing changed: the cluster's variables already were so");
        return Ok(());
    }
    println!("{verb} {}", changed.changed.join(", "));
    restarted(&changed.restarted);
    Ok(())
}

fn restarted(names: &[String]) {
    if names.is_empty() {
        println!("no service's environment changed; nothing restarts");
    } else {
        println!("restarting {} (new generation)", names.join(", "));
    }
}

pub async fn secret(action: SecretAction) -> Result<()> {
    match action {
        SecretAction::Set { name, target, json } => {
            phoenix_model::spec::check_secret_name(&name)
                .map_err(|r| InvalidInput(format!("secret name: {r}")))?;
            let value = secret_value(&name, read_secret(&name)?)?;
            let changed: SecretChanged = client::call(
                &target.data_dir,
                &Request::SecretSet {
                    name,
                    value: SecretValue(value),
                },
            )
            .await?;
            if json.json {
                return print_json(&changed);
            }
            println!(
                "secret {} {}",
                changed.name,
                if changed.created { "set" } else { "updated" }
            );
            if !changed.created {
                restarted(&changed.restarted);
            }
            Ok(())
        }
        SecretAction::List { target, json } => {
            let list: Vec<SecretView> =
                client::call(&target.data_dir, &Request::SecretList).await?;
            if json.json {
                return print_json(&list);
            }
            if list.is_empty() {
                println!("no secrets (`phoenix secret set NAME` reads one from stdin)");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        utc(s.created_at),
                        utc(s.updated_at),
                        if s.used_by.is_empty() {
                            "-".into()
                        } else {
                            s.used_by.join(", ")
                        },
                    ]
                })
                .collect();
            table(&["NAME", "CREATED", "UPDATED", "USED BY"], &rows);
            Ok(())
        }
        SecretAction::Rm { name, target, json } => {
            let gone: SecretView =
                client::call(&target.data_dir, &Request::SecretRm { name }).await?;
            if json.json {
                return print_json(&gone);
            }
            println!("removed secret {}", gone.name);
            Ok(())
        }
    }
}

/// The secret's value from stdin: typed without echo on a terminal, or
/// piped (see [`secret_value`]).
fn read_secret(name: &str) -> Result<String> {
    let stdin = std::io::stdin();
    let mut value = String::new();
    if stdin.is_terminal() {
        eprint!("value of secret {name} (not shown): ");
        let _echo = EchoOff::new();
        stdin
            .read_line(&mut value)
            .context("cannot read the secret from the terminal")?;
        eprintln!();
    } else {
        stdin.lock().read_to_string(&mut value).map_err(|_| {
            InvalidInput(format!(
                "secret {name}: the value on stdin is not UTF-8 text; nothing was changed"
            ))
        })?;
    }
    Ok(value)
}

/// The value read: one trailing newline (`\n` or `\r\n`) dropped; an
/// empty value refused (exit code 3, as the master's refusals).
fn secret_value(name: &str, mut value: String) -> Result<String> {
    if let Some(v) = value.strip_suffix('\n') {
        value.truncate(v.strip_suffix('\r').unwrap_or(v).len());
    }
    if value.is_empty() {
        return Err(InvalidInput(format!(
            "secret {name}: the value on stdin is empty; nothing was changed"
        ))
        .into());
    }
    Ok(value)
}

/// The terminal's echo turned off on stdin until dropped.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: termios is plain old data; an all-zero value is a valid
        // (if meaningless) one, overwritten by tcgetattr before use.
        let mut old: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is stdin, a terminal here; `old` is a valid
        // termios to write into.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut old) } != 0 {
            return EchoOff(None);
        }
        let mut quiet = old;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: as above; `quiet` is the terminal's own settings with
        // echo off.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &quiet) } != 0 {
            return EchoOff(None);
        }
        EchoOff(Some(old))
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: restores the settings tcgetattr read from stdin.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, old);
            }
        }
    }
}

/// A value on one line: its newlines, tabs and other control characters
/// escaped (`\n`), so that one variable is one row.
fn one_line(value: &str) -> String {
    if !value.chars().any(char::is_control) {
        return value.to_owned();
    }
    value
        .chars()
        .map(|c| match c {
            '\n' => "\\n".to_owned(),
            '\r' => "\\r".to_owned(),
            '\t' => "\\t".to_owned(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// `phoenix info NAME --env`.
pub async fn info_env(data_dir: &Path, name: String, json: bool) -> Result<()> {
    let view: EnvView = client::call(data_dir, &Request::InfoEnv { name }).await?;
    if json {
        return print_json(&view);
    }
    print!("{}", env_text(&view));
    Ok(())
}

/// The environment as people read it: one variable a line, with where it
/// comes from.
fn env_text(view: &EnvView) -> String {
    let mut out = String::new();
    if view.env.is_empty() {
        out.push_str("no variables besides Phoenix's own (PHOENIX_NAME, PHOENIX_IP, PORT)\n");
    }
    let width = view.env.iter().map(|v| v.key.len()).max().unwrap_or(0);
    for v in &view.env {
        let from = match (v.layer, &v.file) {
            (Layer::EnvFile, Some(f)) => format!("env_file {f}"),
            (layer, _) => layer.as_str().to_owned(),
        };
        out.push_str(&format!(
            "{:<width$} = {}    ({from})\n",
            v.key,
            one_line(&v.value),
            width = width
        ));
    }
    if let Some(n) = &view.image_note {
        out.push_str(&format!("note: {n}\n"));
    }
    out.push_str(
        "order, lowest first: image < cluster (`phoenix env`) < env_file < spec env; \
         Phoenix's own variables last\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_model::env::EnvVar;

    #[test]
    fn a_secret_s_value_loses_one_newline_and_an_empty_one_is_invalid_input() {
        assert_eq!(secret_value("db", "pw\n".into()).unwrap(), "pw");
        assert_eq!(secret_value("db", "pw\r\n".into()).unwrap(), "pw");
        assert_eq!(secret_value("db", "a\nb\n\n".into()).unwrap(), "a\nb\n");
        for empty in ["", "\n", "\r\n"] {
            let e = secret_value("db", empty.into()).unwrap_err();
            assert_eq!(client::exit_code(&e), client::Exit::Invalid, "{e}");
            assert!(e.to_string().contains("is empty"), "{e}");
        }
    }

    #[test]
    fn a_value_with_newlines_is_shown_on_one_line() {
        assert_eq!(one_line("plain # value"), "plain # value");
        assert_eq!(one_line("a\nb\tc\r"), "a\\nb\\tc\\r");
        assert_eq!(one_line("x\u{1b}[31m"), "x\\u{1b}[31m");
    }

    #[test]
    fn the_env_text_names_each_layer_and_shows_secrets_by_name() {
        let view = EnvView {
            name: "web".into(),
            env: vec![
                EnvVar {
                    key: "DB".into(),
                    value: "secret:db".into(),
                    layer: Layer::Spec,
                    file: None,
                    secret: Some("db".into()),
                },
                EnvVar {
                    key: "LEVEL".into(),
                    value: "debug".into(),
                    layer: Layer::EnvFile,
                    file: Some("app.env".into()),
                    secret: None,
                },
            ],
            image_note: None,
        };
        let text = env_text(&view);
        assert!(text.contains("DB    = secret:db    (spec)"), "{text}");
        assert!(
            text.contains("LEVEL = debug    (env_file app.env)"),
            "{text}"
        );
    }
}
