//! End to end through the real CLI: the everyday verbs, what the master
//! checks before it stores a change, and what the CLI says on the way.

use std::process::Output;
use std::time::Duration;

use phoenix_e2e::{Cluster, alive, bin, noise, testy, wait_for};
use serde_json::{Value, json};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the CLI without a master.
fn phoenix(args: &[&str]) -> Output {
    std::process::Command::new(bin("phoenix"))
        .args(args)
        .env_remove("PHOENIX_DATA_DIR")
        .output()
        .expect("run phoenix")
}

/// Writes specs to a file in the cluster's dir; returns its path.
fn spec_file(c: &Cluster, name: &str, specs: &Value) -> String {
    let path = c.dir.path().join(format!("{name}.json"));
    std::fs::write(&path, specs.to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn version_completions_help_and_typos() {
    let version = format!("phoenix {}", env!("CARGO_PKG_VERSION"));
    for args in [&["version"][..], &["--version"]] {
        let out = phoenix(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out).trim(), version, "{args:?}");
    }
    let v: Value = serde_json::from_slice(&phoenix(&["version", "--json"]).stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));

    for shell in ["bash", "zsh", "fish"] {
        let out = phoenix(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        assert!(
            script.contains("restart") && script.contains("completions"),
            "{shell}"
        );
    }
    // Into a pipe whose reader is gone (`| head -1`): quiet, not a panic.
    let mut child = std::process::Command::new(bin("phoenix"))
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}: {}", out.status, stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));

    // A typo is a usage error (2) that suggests the verb meant.
    for (typo, meant) in [
        ("statsu", "status"),
        ("servcies", "services"),
        ("restrat", "restart"),
    ] {
        let out = phoenix(&[typo]);
        assert_eq!(out.status.code(), Some(2), "{typo}");
        assert!(
            stderr(&out).contains(&format!("similar subcommand exists: '{meant}'")),
            "{typo}: {}",
            stderr(&out)
        );
    }

    let help = stdout(&phoenix(&["minion", "--help"]));
    for positional in [
        "This machine's name",
        "The master's public IP",
        "The master's public key",
        "This machine's public IP",
        "private network",
    ] {
        assert!(help.contains(positional), "{positional:?} in:\n{help}");
    }
    let help = stdout(&phoenix(&["services", "--help"]));
    assert!(help.contains("PHOENIX_DATA_DIR"), "{help}");
    assert!(!help.contains("PHOENIX_DATA_DIR="), "{help}");
    let help = stdout(&phoenix(&["deploy", "--help"]));
    assert!(help.contains("--timeout-s <SECONDS>"), "{help}");
}

#[test]
fn empty_lists_say_what_to_do_and_push_refuses_what_nothing_can_run() {
    let c = Cluster::master_only();
    let waiting = c.ok(&["waiting"]);
    assert!(waiting.starts_with("no machines are waiting"), "{waiting}");
    assert!(waiting.contains("phoenix minion"), "{waiting}");
    let nodes = c.ok(&["nodes"]);
    assert!(nodes.starts_with("no machines have joined"), "{nodes}");
    assert!(nodes.contains("phoenix accept"), "{nodes}");
    for verb in ["services", "ps"] {
        let services = c.ok(&[verb]);
        assert!(services.starts_with("no services"), "{verb}: {services}");
        assert!(services.contains("phoenix deploy"), "{verb}: {services}");
    }
    assert_eq!(c.json(&["ps", "--json"]), json!([]));

    let dir = c.dir.path().join("a-dir");
    std::fs::create_dir(&dir).unwrap();
    let out = c.phoenix(&["push", dir.to_str().unwrap(), "app"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("{} is a directory", dir.display())),
        "{}",
        stderr(&out)
    );
    let notes = c.dir.path().join("notes.txt");
    std::fs::write(&notes, "not a program\n").unwrap();
    let out = c.phoenix(&["push", notes.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{} is a text file without a `#!` line",
            notes.display()
        )),
        "{err}"
    );
    assert!(err.contains("nothing was pushed"), "{err}");
    assert_eq!(c.json(&["images", "--json"]), json!([]));

    let script = c.dir.path().join("hello");
    std::fs::write(&script, "#!/bin/sh\necho hello\n").unwrap();
    let pushed = c.json(&["push", script.to_str().unwrap(), "--json"]);
    assert_eq!(pushed["name"], "hello");
    assert_eq!(pushed["format"], "script");
    assert_eq!(pushed["stale_services"], json!([]));
}

#[test]
fn restart_push_del_and_link_checks_through_the_cli() {
    let mut c = Cluster::master_only();
    c.start_minion("m1");
    c.wait_waiting("m1");
    let accepted = c.json(&["accept", "m1", "--json"]);
    assert_eq!(accepted["name"], "m1");
    c.wait_reachable("m1");
    let testy_bin = std::fs::read(bin("testy")).unwrap();
    let image = c.dir.path().join("app");
    std::fs::write(&image, &testy_bin).unwrap();
    c.ok(&["push", image.to_str().unwrap()]);

    // A link to no service: refused, naming the spec, the field and the name.
    let a = {
        let mut s = testy("m1", "a", &[]);
        s["image"] = json!("app");
        s
    };
    let mut clash = a.clone();
    clash["name"] = json!("clash");
    clash["link"] = json!(["nope"]);
    let file = spec_file(&c, "both", &json!([a, clash]));
    let out = c.phoenix(&["deploy", &file]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("spec #2 (\"clash\"): field `link[0]`: no service named \"nope\""),
        "{err}"
    );
    assert_eq!(c.json(&["services", "--json"]), json!([]));

    let mut b = testy("m1", "b", &[]);
    b["image"] = json!("app");
    c.apply("deploy", &json!([a, b]));
    let first = c.status("a");
    let old_hash = first["image_hash"].as_str().unwrap().to_owned();
    assert_eq!(old_hash.len(), 64, "{first}");
    assert!(first["image_pushed_at"].as_u64().is_some(), "{first}");
    assert!(
        c.ok(&["status", "a"])
            .contains(&format!("app (version {}", &old_hash[..12]))
    );
    assert!(c.ok(&["ps"]).contains(&format!("app@{}", &old_hash[..12])));

    // A new version: push says who runs the old one and how to roll out.
    let mut v2 = testy_bin.clone();
    v2.extend(noise(4096, 3));
    std::fs::write(&image, &v2).unwrap();
    let said = c.ok(&["push", image.to_str().unwrap()]);
    assert!(
        said.contains("a, b run the previous version of app"),
        "{said}"
    );
    assert!(said.contains("`phoenix restart a b`"), "{said}");
    let pushed = c.json(&["push", image.to_str().unwrap(), "app", "--json"]);
    assert_eq!(pushed["stale_services"], json!(["a", "b"]));
    let new_hash = pushed["hash"].as_str().unwrap().to_owned();
    let before = c.status("a");
    assert_eq!(before["image_hash"], old_hash.as_str());
    assert_eq!(before["registry_hash"], new_hash.as_str());
    assert!(
        c.ok(&["status", "a"])
            .contains("`phoenix restart a` runs it")
    );

    // restart: a new process with the new version, waited for.
    let old_pid = first["pid"].as_u64().unwrap();
    let restarted = c.json(&["restart", "a", "--json", "--timeout-s", "30"]);
    assert_eq!(restarted[0]["state"], "running", "{restarted}");
    assert_eq!(restarted[0]["generation"], 2);
    assert_eq!(restarted[0]["image_hash"], new_hash.as_str());
    assert_eq!(restarted[0]["registry_hash"], Value::Null);
    assert_ne!(restarted[0]["pid"].as_u64(), Some(old_pid));
    assert_eq!(
        c.status("b")["generation"],
        1,
        "only the named service restarts"
    );
    let out = c.phoenix(&["restart", "ghost"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    // audit shows what changed, not the whole spec.
    let audit = c.ok(&["audit", "-n", "1"]);
    assert!(audit.contains("restart a"), "{audit}");
    assert!(audit.contains("~ generation: 1 -> 2"), "{audit}");
    assert!(audit.contains("~ image_hash:"), "{audit}");
    assert!(
        !audit.contains("\"machine\""),
        "unchanged fields are left out: {audit}"
    );

    // del waits until the minion stopped the process.
    let pid = c.status("a")["pid"].as_u64().unwrap();
    let said = c.ok(&["del", "a"]);
    assert!(said.contains("deleted a: stopped on m1"), "{said}");
    assert!(!alive(pid), "del returned while pid {pid} runs");
    let info = c.json(&["info", "b", "--json"]);
    assert_eq!(info["name"], "b");

    // With its machine gone, del says so and returns.
    c.kill_minion("m1");
    wait_for("m1 to be unreachable", Duration::from_secs(15), || {
        (c.json(&["nodes", "--json"])[0]["state"] == "unreachable").then_some(())
    });
    let out = c.phoenix(&["del", "b", "--timeout-s", "30"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("machine \"m1\" is unreachable"),
        "{}",
        stderr(&out)
    );
    assert_eq!(c.json(&["services", "--json"]), json!([]));
}
