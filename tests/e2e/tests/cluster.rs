//! Multi-host: each daemon in its own network namespace, all master–minion
//! traffic through the WireGuard overlay. Needs root; skips otherwise.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use phoenix_e2e::{Cluster, Net, alive, require_netns, testy, wait_for};
use serde_json::{Value, json};

fn pid(s: &Value) -> u64 {
    s["pid"].as_u64().unwrap_or_else(|| panic!("no pid in {s}"))
}

fn port(spec: &Value) -> u16 {
    spec["proxyport"].as_u64().unwrap() as u16
}

fn node<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// Whether a TCP connection from inside `host` to `addr` succeeds.
fn reachable(c: &Cluster, host: &str, addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().unwrap();
    c.net.as_ref().unwrap().within(host, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
    })
}

#[test]
fn a_cluster_forms_and_works_with_only_wireguard_and_join_on_the_wire() {
    require_netns!();
    let net = Net::new(&["master", "m1", "m2", "m3"]);
    // Before anything starts: between hosts, only WireGuard's UDP port and
    // the join endpoint pass.
    for h in ["master", "m1", "m2", "m3"] {
        net.only_overlay(h, 51820, 51821);
    }
    let c = Cluster::start_on(net, 3);
    let nodes = c.json(&["nodes", "--json"]);
    for (i, m) in ["m1", "m2", "m3"].iter().enumerate() {
        let n = node(&nodes, m);
        assert_eq!(n["state"], "reachable");
        assert_eq!(n["overlay_ip"], format!("fd38:dde8:32dd::{}", i + 2));
        assert_eq!(n["public_ip"], format!("10.99.0.{}", i + 2));
    }
    assert_eq!(
        c.json(&["master-info", "--json"])["next_minion_ip"],
        "fd38:dde8:32dd::5"
    );

    // One service per minion; the image crosses the overlay too.
    let specs: Vec<Value> = ["m1", "m2", "m3"]
        .iter()
        .map(|m| {
            let mut s = testy(m, &format!("web-{m}"), &[]);
            s["healthcheck"] = json!("/health");
            s
        })
        .collect();
    c.apply("deploy", &json!(specs));
    for (m, spec) in ["m1", "m2", "m3"].iter().zip(&specs) {
        let s = c.wait_status(&format!("web-{m}"), "healthy", |s| s["health"] == "healthy");
        assert_eq!(s["machine"], *m);
        let (code, body) = c
            .http_service(&format!("web-{m}"), port(spec), "/")
            .expect("testy answers inside its host");
        assert_eq!(code, 200);
        assert!(body.contains(&format!("name=web-{m}")), "{body}");
    }

    // Update and logs travel the same way.
    let mut s1 = specs[0].clone();
    s1["env"] = json!(["COLOUR=blue"]);
    c.apply("update", &s1);
    let st = c.wait_status("web-m1", "updated", |s| {
        s["generation"] == 2 && s["health"] == "healthy"
    });
    assert!(alive(pid(&st)));
    let logs = c.ok(&["logs", "web-m1"]);
    assert!(logs.contains("listening"), "{logs}");

    // The link is not on the public address at all, and the firewall would
    // stop it anyway: only the tunnel carries it.
    assert!(!reachable(&c, "m1", "10.99.0.1:51822"));
    assert!(reachable(&c, "m1", "[fd38:dde8:32dd::1]:51822"));
}

#[test]
fn a_cut_off_minion_keeps_running_is_marked_unreachable_and_converges() {
    require_netns!();
    let c = Cluster::start_on(Net::new(&["master", "m1", "m2"]), 2);
    c.apply(
        "deploy",
        &json!([testy("m1", "steady", &[]), testy("m2", "other", &[])]),
    );
    let before = pid(&c.wait_status("steady", "running", |s| s["state"] == "running"));

    let net = c.net.as_ref().unwrap();
    net.cut("m1");
    let cut_at = Instant::now();
    // The master's node timeout is 3 s in this harness.
    wait_for("m1 to be shown unreachable", Duration::from_secs(8), || {
        let nodes = c.json(&["nodes", "--json"]);
        (node(&nodes, "m1")["state"] == "unreachable").then_some(())
    });
    let noticed = cut_at.elapsed();
    assert!(
        noticed <= Duration::from_secs(6),
        "took {noticed:?} to notice"
    );
    assert_eq!(
        node(&c.json(&["nodes", "--json"]), "m2")["state"],
        "reachable"
    );
    // A change made while it is away waits for it.
    c.phoenix_stdin(
        &["deploy", "-", "--detach"],
        &testy("m1", "later", &[]).to_string(),
    );
    std::thread::sleep(Duration::from_secs(30).saturating_sub(cut_at.elapsed()));
    assert!(
        alive(before),
        "the service died while its minion was cut off"
    );
    assert_eq!(c.recorded_pid("m1", "steady"), Some(before));

    net.heal("m1");
    c.wait_reachable("m1");
    c.wait_status("later", "running after the heal", |s| {
        s["state"] == "running"
    });
    let s = c.status("steady");
    assert_eq!(pid(&s), before, "reconnecting must not restart services");
    assert_eq!(s["restarts"], 0);
}

#[test]
fn a_restarted_minion_daemon_comes_back_without_a_new_accept() {
    require_netns!();
    let mut c = Cluster::start_on(Net::new(&["master", "m1"]), 1);
    c.apply("deploy", &testy("m1", "kept", &[]));
    let before = pid(&c.wait_status("kept", "running", |s| s["state"] == "running"));
    c.kill_minion("m1");
    wait_for("m1 to be unreachable", Duration::from_secs(8), || {
        (node(&c.json(&["nodes", "--json"]), "m1")["state"] == "unreachable").then_some(())
    });
    c.start_minion("m1");
    c.wait_reachable("m1");
    assert!(
        c.json(&["waiting", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    let s = c.wait_status("kept", "reported again", |s| s["state"] == "running");
    assert_eq!(pid(&s), before);
}

#[test]
fn unaccepted_rejected_and_forgotten_minions_receive_nothing() {
    require_netns!();
    let mut c = Cluster::master_only_on(Net::new(&["master", "m1", "m2"]));
    c.ok(&["push", phoenix_e2e::bin("testy").to_str().unwrap(), "testy"]);

    // Waiting: no tunnel, so no link and no desired set.
    let mut waiting = c
        .minion_command("m1", &c.key)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.wait_waiting("m1");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!c.minion_dir("m1").join("desired.json").exists());
    assert!(!reachable(&c, "m1", "[fd38:dde8:32dd::1]:51822"));

    // Rejected: the minion is told and stops.
    c.ok(&["reject", "m1"]);
    let status = wait_for(
        "the rejected minion to stop",
        Duration::from_secs(10),
        || waiting.try_wait().unwrap(),
    );
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut waiting.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("refused the join request: an admin rejected the join request"),
        "{err}"
    );
    assert!(!c.minion_dir("m1").join("desired.json").exists());

    // Forgotten: the tunnel closes behind it.
    c.start_minion("m2");
    c.wait_waiting("m2");
    c.ok(&["accept", "m2"]);
    c.wait_reachable("m2");
    assert!(reachable(&c, "m2", "[fd38:dde8:32dd::1]:51822"));
    c.apply("deploy", &testy("m2", "brief", &[]));
    let err = c.fails(&["forget", "m2"]);
    assert!(err.contains("still runs brief"), "{err}");
    c.ok(&["del", "brief"]);
    c.ok(&["forget", "m2"]);
    assert!(c.json(&["nodes", "--json"]).as_array().unwrap().is_empty());
    assert!(!reachable(&c, "m2", "[fd38:dde8:32dd::1]:51822"));
    let out = c.phoenix_stdin(
        &["deploy", "-", "--detach"],
        &testy("m2", "again", &[]).to_string(),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown machine \"m2\""));
    let audit = c.ok(&["audit"]);
    assert!(
        audit.contains("reject") && audit.contains("forget"),
        "{audit}"
    );
}

#[test]
fn forged_joins_are_refused_and_a_token_auto_accepts() {
    require_netns!();
    let mut c = Cluster::master_only_on(Net::new(&["master", "m1", "m2"]));
    c.kill_master();
    c.master_flags.push("--auto-accept".into());
    c.start_master();
    let token = c.json(&["master-info", "--json"])["token"]
        .as_str()
        .unwrap()
        .to_owned();

    // A wrong token proof is refused at once.
    let out = c
        .minion_command("m1", &c.key)
        .args(["--token", "not-the-token"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong join token proof"));
    assert!(
        c.json(&["waiting", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    std::fs::remove_dir_all(c.minion_dir("m1")).unwrap();

    // The right token: admitted with no `accept`.
    c.minion_flags.extend(["--token".to_owned(), token]);
    c.start_minion("m1");
    c.wait_reachable("m1");
    let audit = c.json(&["audit", "--json"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "accept" && e["actor"] == "auto-accept (join token)")
    );

    // Another machine claiming the name m1 with its own key is refused.
    let impostor_dir = c.dir.path().join("impostor");
    let mut args = c.minion_args("m1", &c.key.clone());
    let i = args.iter().position(|a| a == "--data-dir").unwrap();
    args[i + 1] = impostor_dir.display().to_string();
    let out = c
        .net
        .as_ref()
        .unwrap()
        .command("m2", &phoenix_e2e::bin("phoenix"))
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("name \"m1\" belongs to an accepted node with another key"),
        "{err}"
    );
    let master_log = c.log("master");
    assert!(
        master_log.contains("join request refused"),
        "refusals are logged"
    );
}
