//! End to end: a real master, real minions, real testy processes.

use std::time::Duration;

use phoenix_e2e::{Cluster, alive, noise, testy, wait_for};
use serde_json::{Value, json};

fn pid(s: &Value) -> u64 {
    s["pid"].as_u64().unwrap_or_else(|| panic!("no pid in {s}"))
}

fn port(spec: &Value) -> u16 {
    spec["proxyport"].as_u64().unwrap() as u16
}

#[test]
fn deploy_update_del() {
    let c = Cluster::start(2);
    let mut web = testy("m1", "web", &[]);
    web["healthcheck"] = json!("/health");
    web["env"] = json!(["GREETING=hello"]);
    let out = c.apply("deploy", &json!([web, testy("m2", "worker", &[])]));
    assert!(
        out.contains("deployed web on m1 at fd38:dde8:32dd:1::"),
        "{out}"
    );

    let s = c.wait_status("web", "running and healthy", |s| {
        s["state"] == "running" && s["health"] == "healthy"
    });
    let first = pid(&s);
    assert!(alive(first));
    assert_eq!(s["machine"], "m1");
    assert_eq!(s["restarts"], 0);
    let ip = s["ip"].as_str().unwrap().to_owned();
    assert!(ip.starts_with("fd38:dde8:32dd:"), "{ip}");

    // The service sees its name, address, port and the spec's env.
    let (code, env) = c
        .http_service("web", port(&web), "/env")
        .expect("testy answers");
    assert_eq!(code, 200);
    assert!(env.contains("PHOENIX_NAME=web\n"), "{env}");
    assert!(env.contains(&format!("PHOENIX_IP={ip}\n")), "{env}");
    assert!(env.contains(&format!("PORT={}\n", port(&web))), "{env}");
    assert!(env.contains("GREETING=hello\n"), "{env}");

    // Update: new env, same address, new process, next generation.
    web["env"] = json!(["GREETING=bonjour"]);
    c.apply("update", &json!(web));
    let s = c.wait_status("web", "restarted by the update", |s| {
        s["generation"] == 2 && s["state"] == "running"
    });
    assert_ne!(pid(&s), first);
    assert_eq!(s["ip"], ip.as_str());
    assert!(
        !alive(first),
        "the old process must be gone after an update"
    );
    let (_, env) = c.http_service("web", port(&web), "/env").unwrap();
    assert!(env.contains("GREETING=bonjour\n"), "{env}");

    // Update of an unchanged spec is a manual restart.
    let before = pid(&s);
    c.apply("update", &json!(web));
    let s = c.wait_status("web", "restarted", |s| {
        s["generation"] == 3 && s["state"] == "running"
    });
    assert_ne!(pid(&s), before);

    // info shows the spec with its address.
    let info = c.json(&["info", "web"]);
    assert_eq!(info["ip"], ip.as_str());
    assert_eq!(info["env"], json!(["GREETING=bonjour"]));

    let services = c.json(&["services", "--json"]);
    assert_eq!(services.as_array().unwrap().len(), 2);

    let last = pid(&s);
    c.ok(&["del", "web"]);
    wait_for("web's process to end", Duration::from_secs(10), || {
        (!alive(last)).then_some(())
    });
    let err = c.fails(&["status", "web"]);
    assert!(err.contains("no service \"web\""), "{err}");
    assert_eq!(c.json(&["services", "--json"]).as_array().unwrap().len(), 1);

    // Every change is in the audit log with old and new specs.
    let audit = c.json(&["audit", "--json"]);
    let actions: Vec<(&str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["subject"].as_str().unwrap(),
            )
        })
        .collect();
    for want in [
        ("accept", "m1"),
        ("push", "testy"),
        ("deploy", "web"),
        ("update", "web"),
        ("del", "web"),
    ] {
        assert!(actions.contains(&want), "{want:?} missing from {actions:?}");
    }
    let update = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "update")
        .unwrap();
    assert_eq!(update["old"]["env"], json!(["GREETING=hello"]));
    assert_eq!(update["new"]["env"], json!(["GREETING=bonjour"]));
    let del = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "del")
        .unwrap();
    assert!(del["new"].is_null() && del["old"]["name"] == "web");
    assert!(
        update["actor"].as_str().unwrap().starts_with("uid "),
        "{update}"
    );
}

#[test]
fn kill_9_restarts_with_new_pid_and_counts_it() {
    let c = Cluster::start(1);
    c.apply("deploy", &testy("m1", "victim", &[]));
    let s = c.wait_status("victim", "running", |s| s["state"] == "running");
    let old = pid(&s);
    // SAFETY: kill(2) on the pid of a process we deployed.
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    let s = c.wait_status("victim", "restarted", |s| {
        s["restarts"] == 1 && s["state"] == "running"
    });
    assert_ne!(pid(&s), old);
    assert!(alive(pid(&s)));
    assert_eq!(s["last_exit"]["signal"], 9);
}

#[test]
fn crash_loop_backs_off() {
    let c = Cluster::start(1);
    let out = c.phoenix_stdin(
        &["deploy", "-", "--detach"],
        &testy("m1", "crashy", &["--crash-after", "0", "--exit-code", "7"]).to_string(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Counted from its first crash (fetching the image first takes a
    // while on a loaded machine).
    c.wait_status("crashy", "crashed once", |s| {
        s["restarts"].as_u64() >= Some(1)
    });
    std::thread::sleep(Duration::from_secs(4));
    let s = c.status("crashy");
    let restarts = s["restarts"].as_u64().unwrap();
    // Immediate, then 100, 200, 400, 800, 1600 ms...: about 6 in 4 s; a
    // supervisor that spins would count hundreds.
    assert!(
        (3..=9).contains(&restarts),
        "restarts in 4 s: {restarts} ({s})"
    );
    assert_eq!(s["last_exit"]["code"], 7);
    let s = c.wait_status("crashy", "backing off", |s| s["state"] == "backoff");
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("exited with code 7; restarting in"),
        "{s}"
    );
}

#[test]
fn failing_health_check_restarts() {
    let c = Cluster::start(1);
    let mut spec = testy("m1", "sick", &[]);
    spec["healthcheck"] = json!("/health");
    c.apply("deploy", &spec);
    let s = c.wait_status("sick", "healthy", |s| s["health"] == "healthy");
    let old = pid(&s);
    let (code, _) = c
        .http_service(spec["name"].as_str().unwrap(), port(&spec), "/unhealthy")
        .unwrap();
    assert_eq!(code, 200);
    let s = c.wait_status("sick", "restarted after failing its check", |s| {
        s["restarts"] == 1 && s["health"] == "healthy" && s["pid"].as_u64() != Some(old)
    });
    assert!(!alive(old));
    assert_eq!(s["last_exit"]["signal"], libc::SIGTERM);
}

#[test]
fn oneshot_is_not_restarted_and_keeps_its_exit_code() {
    let c = Cluster::start(1);
    let mut ok = testy(
        "m1",
        "job-ok",
        &["--crash-after", "0.2", "--exit-code", "0"],
    );
    ok["duration"] = json!("oneshot");
    let mut bad = testy(
        "m1",
        "job-bad",
        &["--crash-after", "0.2", "--exit-code", "3"],
    );
    bad["duration"] = json!("oneshot");
    let out = c.phoenix_stdin(&["deploy", "-"], &json!([ok, bad]).to_string());
    // deploy waits for the services to settle, and says which failed
    // (exit code 7: stored, but not started).
    assert_eq!(out.status.code(), Some(7));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("job-bad failed: exited with code 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_secs(2));
    let s = c.status("job-ok");
    assert_eq!(
        (s["state"].as_str(), s["restarts"].as_u64()),
        (Some("exited"), Some(0)),
        "{s}"
    );
    assert_eq!(s["last_exit"]["code"], 0);
    let s = c.status("job-bad");
    assert_eq!(
        (s["state"].as_str(), s["restarts"].as_u64()),
        (Some("failed"), Some(0)),
        "{s}"
    );
    assert_eq!(s["last_exit"]["code"], 3);
    let text = c.ok(&["status", "job-bad"]);
    assert!(text.contains("last exit:   code 3"), "{text}");
}

#[test]
fn services_outlive_the_master() {
    let mut c = Cluster::start(2);
    c.apply(
        "deploy",
        &json!([testy("m1", "a", &[]), testy("m2", "b", &[])]),
    );
    let pa = pid(&c.wait_status("a", "running", |s| s["state"] == "running"));
    let pb = pid(&c.wait_status("b", "running", |s| s["state"] == "running"));
    c.kill_master();
    std::thread::sleep(Duration::from_secs(3));
    assert!(alive(pa) && alive(pb), "services died with the master");
    assert_eq!(c.recorded_pid("m1", "a"), Some(pa));
    // The CLI says plainly that the master is not there.
    let err = c.fails(&["services"]);
    assert!(err.contains("cannot reach the master"), "{err}");
    // Back up: the minions reconnect and nothing was restarted.
    c.start_master();
    c.wait_reachable("m1");
    c.wait_reachable("m2");
    let s = c.wait_status("a", "reported again", |s| s["state"] == "running");
    assert_eq!(pid(&s), pa);
    assert_eq!(s["restarts"], 0);
    assert_eq!(pid(&c.status("b")), pb);
}

#[test]
fn minion_restart_adopts_its_services() {
    let mut c = Cluster::start(1);
    c.apply("deploy", &testy("m1", "steady", &[]));
    let p = pid(&c.wait_status("steady", "running", |s| s["state"] == "running"));
    c.kill_minion("m1");
    assert!(alive(p), "a service must survive its minion");
    c.start_minion("m1");
    c.wait_reachable("m1");
    let s = c.wait_status("steady", "re-reported", |s| s["state"] == "running");
    assert_eq!(pid(&s), p, "the restarted minion must adopt, not restart");
    // The adopted process is still supervised: kill it, it comes back.
    // SAFETY: kill(2) on the pid of a process we deployed.
    unsafe { libc::kill(p as i32, libc::SIGKILL) };
    let s = c.wait_status("steady", "restarted", |s| {
        s["restarts"] == 1 && s["state"] == "running"
    });
    assert_ne!(pid(&s), p);
}

#[test]
fn minion_restarted_while_master_is_down_starts_its_services() {
    let mut c = Cluster::start(1);
    let spec = testy("m1", "phoenixed", &[]);
    c.apply("deploy", &spec);
    let p = pid(&c.wait_status("phoenixed", "running", |s| s["state"] == "running"));
    // Asked while the master can still say where it is.
    let at = c.service_at("phoenixed", port(&spec));
    c.kill_master();
    // The machine "reboots": the minion and its services are gone.
    c.kill_minion("m1");
    // SAFETY: kill(2) of the service's process group.
    unsafe { libc::kill(-(p as i32), libc::SIGKILL) };
    wait_for("the service to die", Duration::from_secs(5), || {
        (!alive(p)).then_some(())
    });
    c.start_minion("m1");
    let new = wait_for(
        "the service to be started from the saved desired set",
        Duration::from_secs(15),
        || {
            c.recorded_pid("m1", "phoenixed")
                .filter(|n| *n != p && alive(*n))
        },
    );
    let (code, _) = wait_for("the new process to serve", Duration::from_secs(10), || {
        c.get(&at, "/health")
    });
    assert_eq!(code, 200);
    c.start_master();
    let s = c.wait_status("phoenixed", "reported", |s| s["state"] == "running");
    assert_eq!(pid(&s), new);
}

#[test]
fn bad_specs_are_refused_and_change_nothing() {
    let c = Cluster::start(1);
    c.apply("deploy", &testy("m1", "existing", &[]));
    let before_services = c.json(&["services", "--json"]);
    let before_audit = c.json(&["audit", "--json"]).as_array().unwrap().len();
    let taken_ip = before_services[0]["ip"].as_str().unwrap().to_owned();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!([testy("m1", "fine", &[]), testy("m9", "lost", &[])]),
            "spec #2 (\"lost\"): field `machine`: unknown machine \"m9\"; accepted machines: m1",
        ),
        (
            json!({"machine": "m1", "name": "x", "image": "nope", "type": "binary"}),
            "field `image`: image \"nope\" is not in the registry",
        ),
        (
            json!({"machine": "m1", "name": "x", "image": "testy", "type": "binary", "ip": taken_ip}),
            "is already used by service \"existing\"",
        ),
        (
            testy("m1", "existing", &[]),
            "service \"existing\" already exists; use `phoenix update`",
        ),
        (
            json!({"machine": "m1", "name": "Bad_Name", "image": "testy", "type": "binary", "restart": "always"}),
            "field `restart`: unknown field",
        ),
        (
            json!({"machine": "m1", "name": "x", "image": "testy", "type": "binary", "env": ["NOPE"]}),
            "field `env[0]`: \"NOPE\" is not of the form KEY=VALUE",
        ),
        (
            // A binary is neither a VM image nor an OCI image to boot as
            // one: refused at the door, naming it.
            json!({"machine": "m1", "name": "x", "image": "testy", "type": "vm"}),
            "registry file \"testy\" is neither a VM image (a zstd tar) nor an OCI image phoenix can boot: testy is not a tar archive",
        ),
    ];
    for (spec, want) in cases {
        let out = c.phoenix_stdin(&["deploy", "-", "--detach"], &spec.to_string());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {spec}");
        assert!(err.contains(want), "for {spec}\nwanted: {want}\ngot: {err}");
        assert!(err.contains("rejected, nothing was changed"), "{err}");
    }
    let out = c.phoenix_stdin(
        &["update", "-", "--detach"],
        &testy("m1", "ghost", &[]).to_string(),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no service \"ghost\"; use `phoenix deploy`")
    );
    let out = c.phoenix_stdin(&["deploy", "-"], "{\"machine\": ");
    assert!(String::from_utf8_lossy(&out.stderr).contains("<stdin>: rejected"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));

    assert_eq!(c.json(&["services", "--json"]).as_array().unwrap().len(), 1);
    assert_eq!(
        c.json(&["audit", "--json"]).as_array().unwrap().len(),
        before_audit
    );
    assert_eq!(c.status("existing")["generation"], 1);
    assert!(c.fails(&["status", "fine"]).contains("no service"));
}

#[test]
fn concurrent_deploys_from_several_clis() {
    let c = Cluster::start(2);
    let clis = 6;
    let per = 4;
    std::thread::scope(|s| {
        for i in 0..clis {
            let c = &c;
            s.spawn(move || {
                let specs: Vec<Value> = (0..per)
                    .map(|j| {
                        testy(
                            if j % 2 == 0 { "m1" } else { "m2" },
                            &format!("svc-{i}-{j}"),
                            &[],
                        )
                    })
                    .collect();
                c.apply("deploy", &json!(specs));
            });
        }
    });
    let list = c.json(&["services", "--json"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), clis * per);
    let ips: std::collections::HashSet<&str> =
        list.iter().map(|s| s["ip"].as_str().unwrap()).collect();
    assert_eq!(ips.len(), clis * per, "addresses must be unique");
    assert!(list.iter().all(|s| s["state"] == "running"), "{list:?}");
}

#[test]
fn stop_kills_the_whole_group_and_escalates_to_sigkill() {
    let c = Cluster::start(1);
    c.apply(
        "deploy",
        &json!([
            testy("m1", "stubborn", &["--ignore-sigterm"]),
            testy("m1", "parent", &["--spawn-child"])
        ]),
    );
    let stubborn = pid(&c.wait_status("stubborn", "running", |s| s["state"] == "running"));
    let parent = pid(&c.wait_status("parent", "running", |s| s["state"] == "running"));
    let log = wait_for(
        "the child's pid in the log",
        Duration::from_secs(10),
        || {
            let l = c.ok(&["logs", "parent"]);
            l.contains("child pid").then_some(l)
        },
    );
    let child: u64 = log
        .lines()
        .find_map(|l| l.strip_prefix("testy: child pid "))
        .and_then(|p| p.trim().parse().ok())
        .expect("child pid");
    assert!(alive(child));
    c.ok(&["del", "parent"]);
    wait_for("parent and child to end", Duration::from_secs(10), || {
        (!alive(parent) && !alive(child)).then_some(())
    });
    let t = std::time::Instant::now();
    c.ok(&["del", "stubborn"]);
    wait_for(
        "the stubborn service to be killed",
        Duration::from_secs(10),
        || (!alive(stubborn)).then_some(()),
    );
    // It ignores SIGTERM, so only the SIGKILL after the 1.5 s stop timeout ends it.
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn logs_capture_stdout_and_stderr_and_follow() {
    let c = Cluster::start(1);
    let spec = testy("m1", "talker", &[]);
    c.apply("deploy", &spec);
    let logs = wait_for("start-up lines", Duration::from_secs(10), || {
        let l = c.ok(&["logs", "talker"]);
        (l.contains("listening") && l.contains("testy: stderr hello")).then_some(l)
    });
    assert!(logs.contains("testy: pid"), "{logs}");
    assert!(c.ok(&["logs", "talker", "-n", "1"]).lines().count() <= 1);

    let mut follow = std::process::Command::new(phoenix_e2e::bin("phoenix"))
        .args(["logs", "talker", "-f", "-n", "0"])
        .env("PHOENIX_DATA_DIR", c.master_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    c.http_service(spec["name"].as_str().unwrap(), port(&spec), "/marker-path")
        .unwrap();
    let got = (|| {
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
            if line.contains("/marker-path") {
                return true;
            }
        }
        false
    })();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(got, "`logs -f` did not show the new request");
    assert!(
        c.fails(&["logs", "nobody"])
            .contains("no service \"nobody\"")
    );
}

#[test]
fn join_needs_accept_and_the_right_master_key() {
    let mut c = Cluster::master_only();
    c.start_minion("m1");
    c.wait_waiting("m1");
    let waiting = c.json(&["waiting", "--json"]);
    assert_eq!(waiting[0]["public_ip"], "127.0.0.1");
    assert_eq!(waiting[0]["fingerprint"].as_str().unwrap().len(), 23);
    // Not accepted: nothing can be placed on it.
    c.ok(&["push", phoenix_e2e::bin("testy").to_str().unwrap(), "testy"]);
    let out = c.phoenix_stdin(
        &["deploy", "-", "--detach"],
        &testy("m1", "early", &[]).to_string(),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has asked to join but is not accepted yet")
    );
    assert_eq!(c.json(&["nodes", "--json"]).as_array().unwrap().len(), 0);
    let info = c.json(&["master-info", "--json"]);
    assert_eq!(info["next_minion_ip"], "fd38:dde8:32dd::2");
    c.ok(&["accept", "m1"]);
    c.wait_reachable("m1");
    assert_eq!(
        c.json(&["master-info", "--json"])["next_minion_ip"],
        "fd38:dde8:32dd::3"
    );
    assert!(c.fails(&["accept", "m1"]).contains("already accepted"));

    // A minion given the wrong master key stops once it meets the master.
    let wrong = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let mut impostor = std::process::Command::new(phoenix_e2e::bin("phoenix"))
        .args(c.minion_args("m2", wrong))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.wait_waiting("m2");
    c.ok(&["accept", "m2"]);
    let status = wait_for("the minion to give up", Duration::from_secs(10), || {
        impostor.try_wait().unwrap()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut impostor.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("not AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= given on the command line"),
        "{err}"
    );

    // A rejected request is gone from the list.
    c.start_minion("m3");
    c.wait_waiting("m3");
    c.ok(&["reject", "m3"]);
    assert!(
        c.json(&["waiting", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        c.fails(&["accept", "m3"])
            .contains("no join request from \"m3\" is waiting")
    );
}

#[test]
fn logs_rotate_by_size_and_nodes_report_resources() {
    let mut c = Cluster::master_only();
    c.minion_flags
        .extend(["--log-max-bytes".to_owned(), "4000".to_owned()]);
    c.start_minion("m1");
    c.wait_waiting("m1");
    c.ok(&["accept", "m1"]);
    c.wait_reachable("m1");
    c.ok(&["push", phoenix_e2e::bin("testy").to_str().unwrap(), "testy"]);
    let spec = testy("m1", "chatty", &[]);
    c.apply("deploy", &spec);
    // Every request writes a line of about 50 bytes.
    for i in 0..200 {
        wait_for("a request to be answered", Duration::from_secs(10), || {
            c.http_service(
                spec["name"].as_str().unwrap(),
                port(&spec),
                &format!("/request-number-{i}"),
            )
        });
    }
    let logs = c.minion_dir("m1").join("logs");
    wait_for("a rotated log", Duration::from_secs(10), || {
        logs.join("chatty.log.1").exists().then_some(())
    });
    let live = std::fs::metadata(logs.join("chatty.log")).unwrap().len();
    assert!(live < 8000, "the live log is {live} bytes after rotation");
    assert!(
        !logs.join("chatty.log.4").exists(),
        "only three rotated copies are kept"
    );
    // The newest lines are still served.
    let tail = c.ok(&["logs", "chatty", "-n", "5"]);
    assert!(tail.contains("/request-number-199"), "{tail}");

    let nodes = wait_for("node stats", Duration::from_secs(10), || {
        let n = c.json(&["nodes", "--json"]);
        n[0]["stats"].is_object().then_some(n)
    });
    let n = &nodes[0];
    assert_eq!(
        (n["name"].as_str(), n["state"].as_str()),
        (Some("m1"), Some("reachable"))
    );
    assert_eq!(n["services"], 1);
    assert_eq!(n["overlay_ip"], "fd38:dde8:32dd::2");
    assert!(n["stats"]["mem_total"].as_u64().unwrap() > 0);
    assert!(n["stats"]["disk_total"].as_u64().unwrap() > 0);
    assert!(n["stats"]["minion_rss"].as_u64().unwrap() > 0);
    assert!(n["version"].is_string() && n["last_seen"].is_u64());
    let table = c.ok(&["nodes"]);
    assert!(
        table.starts_with("NAME") && table.contains("reachable"),
        "{table}"
    );
}

#[test]
fn asking_for_kernel_wireguard_where_there_is_none_is_a_clear_error() {
    let probe = std::process::Command::new("ip")
        .args(["link", "add", "phxwgprobe", "type", "wireguard"])
        .output();
    if probe.as_ref().is_ok_and(|o| o.status.success()) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", "phxwgprobe"])
            .output();
        eprintln!("SKIPPED: this kernel has WireGuard");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(phoenix_e2e::bin("phoenix"))
        .args([
            "master",
            "127.0.0.1",
            "--foreground",
            "--wireguard",
            "kernel",
            "--tun-name",
            "phxkwtest",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--join-port", &phoenix_e2e::free_port().to_string()])
        .args(["--link-port", &phoenix_e2e::free_port().to_string()])
        .args(["--wg-port", &phoenix_e2e::free_udp_port().to_string()])
        .arg("--no-proxy")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kernel WireGuard was asked for, but the kernel has none"),
        "{err}"
    );
}

#[test]
fn back_to_back_deletes_each_get_their_grace_period() {
    let c = Cluster::start(1);
    c.apply(
        "deploy",
        &json!([
            testy("m1", "ga", &["--ignore-sigterm"]),
            testy("m1", "gb", &["--ignore-sigterm"])
        ]),
    );
    let ga = pid(&c.wait_status("ga", "running", |s| s["state"] == "running"));
    let gb = pid(&c.wait_status("gb", "running", |s| s["state"] == "running"));
    // `--detach`: `del` would otherwise wait out each stop in turn.
    c.ok(&["del", "ga", "--detach"]);
    c.ok(&["del", "gb", "--detach"]);
    // Both ignore SIGTERM, so both must still be there well inside the
    // harness's 1.5 s stop timeout: no shortcut to SIGKILL for either.
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        alive(ga) && alive(gb),
        "a service was killed before its stop timeout"
    );
    wait_for(
        "both to be killed after the timeout",
        Duration::from_secs(10),
        || (!alive(ga) && !alive(gb)).then_some(()),
    );
}

/// Deterministic pseudo-random bytes (xorshift).
#[test]
fn a_new_image_version_moves_only_its_changes() {
    let c = Cluster::start(1);
    let fetched = |more_than: u64| -> u64 {
        wait_for(
            "the minion's fetched-bytes figure",
            Duration::from_secs(15),
            || {
                let n = c.json(&["nodes", "--json"])[0]["stats"]["image_bytes_fetched"].as_u64()?;
                (n > more_than).then_some(n)
            },
        )
    };
    // testy with 4 MiB of data appended still runs (the ELF loader ignores it).
    let mut v1 = std::fs::read(phoenix_e2e::bin("testy")).unwrap();
    v1.extend(noise(4 << 20, 42));
    let file = c.dir.path().join("big");
    std::fs::write(&file, &v1).unwrap();
    c.ok(&["push", file.to_str().unwrap(), "big"]);
    let mut spec = testy("m1", "big-svc", &[]);
    spec["image"] = json!("big");
    c.apply("deploy", &spec);
    let first = fetched(0);
    assert!(
        first > 2 << 20,
        "the first version moved only {first} bytes"
    );

    // Three small edits and a 1 KiB insertion in the data.
    let mut v2 = v1.clone();
    let tail = v2.len() - (4 << 20);
    for at in [tail + 100_000, tail + 2_000_000, tail + 3_900_000] {
        v2[at] ^= 0xff;
    }
    let mid = tail + (2 << 20);
    v2.splice(mid..mid, noise(1024, 7));
    std::fs::write(&file, &v2).unwrap();
    c.ok(&["push", file.to_str().unwrap(), "big"]);
    c.apply("update", &spec);
    c.wait_status("big-svc", "running the new version", |s| {
        s["generation"] == 2 && s["state"] == "running"
    });
    let moved = fetched(first) - first;
    assert!(
        (moved as usize) < v2.len() / 8,
        "the new version of {} bytes moved {moved} bytes",
        v2.len()
    );
    // A corrupt chunk and its repair: tests/e2e/tests/registry.rs.
}
