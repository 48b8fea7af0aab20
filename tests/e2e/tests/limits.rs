//! End to end: a node's desired set never outgrows a link frame. Deploys
//! that add up past the limit are refused at the door, naming the machine,
//! the size and the limit, and the node stays connected (it used to be cut
//! off every heartbeat timeout, forever, with no reason logged).

use std::time::{Duration, Instant};

use phoenix_e2e::{Cluster, free_port, testy};
use serde_json::{Value, json};

/// `model::proto::MAX_DESIRED_SET`: a quarter of the 64 MiB frame.
const LIMIT: usize = 16 << 20;

/// `n` oneshots on m1 that exit at once, each carrying about 120 KiB of
/// environment (under the per-spec limits), so a few dozen fill megabytes.
fn heavy(prefix: &str, n: usize) -> Value {
    let big = format!("BIG={}", "x".repeat(120 << 10));
    Value::Array(
        (0..n)
            .map(|i| {
                json!({
                    "machine": "m1", "name": format!("{prefix}{i}"), "image": "testy",
                    "type": "binary", "duration": "oneshot", "env": [big],
                    "args": ["--port", "0", "--crash-after", "0", "--exit-code", "0"],
                })
            })
            .collect(),
    )
}

fn deploy(c: &Cluster, specs: &Value, extra: &[&str]) -> std::process::Output {
    let path = c.dir.path().join(format!("spec-{}.json", free_port()));
    std::fs::write(&path, specs.to_string()).unwrap();
    let mut args = vec!["deploy", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    c.phoenix(&args)
}

fn node(c: &Cluster, name: &str) -> Value {
    let nodes = c.json(&["nodes", "--json"]);
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn deploys_past_the_desired_set_limit_are_refused_and_the_node_stays_reachable() {
    let mut c = Cluster::start(1);
    // The production node timeout (the harness's 3 s is for fast tests):
    // on a loaded 2-CPU machine, 70 starts with 120 KiB environments each
    // can keep a minion busy for seconds, which is not what this test is
    // about (a set too large to send drops the link at any timeout).
    c.master_flags = vec!["--node-timeout-ms".into(), "6000".into()];
    c.kill_master();
    c.start_master();
    c.wait_reachable("m1");
    // About 8.6 MB: under the limit, accepted and sent.
    let first = heavy("a", 70);
    let out = deploy(&c, &first, &["--detach"]);
    assert!(
        out.status.success(),
        "the first half was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // As much again: the set would pass the limit.
    let out = deploy(&c, &heavy("b", 70), &["--detach"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the second half was accepted");
    assert!(stderr.contains(r#"machine "m1""#), "{stderr}");
    assert!(
        stderr.contains(&format!("over the limit of {LIMIT} bytes")),
        "{stderr}"
    );
    let services = c.json(&["services", "--json"]);
    let names: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        names.len(),
        70,
        "the refused file stored something: {names:?}"
    );
    assert!(names.iter().all(|n| n.starts_with('a')), "{names:?}");

    // The node holds its link well past the heartbeat timeout (6 s): its
    // set was never too large to send.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let m1 = node(&c, "m1");
        assert_eq!(m1["state"], "reachable", "{m1}\n{}", c.log("master"));
        assert!(m1.get("last_drop").is_none(), "the link dropped: {m1}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // And it still takes changes.
    let out = deploy(
        &c,
        &json!([testy("m1", "small", &[])]),
        &["--timeout-s", "30"],
    );
    assert!(
        out.status.success(),
        "a small deploy after the refusal failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_status("small", "running", |s| s["state"] == "running");
}
