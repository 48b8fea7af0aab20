//! End to end: `deploy` tells the truth, fast. A service that does not
//! start fails the deploy within seconds (exit code 7) with the reason and
//! its last log lines; a machine that is down is named at once (exit code
//! 6); a service that starts is reported running, with progress on the way.

use std::process::Output;
use std::time::{Duration, Instant};

use phoenix_e2e::{Cluster, free_port, testy};
use serde_json::{Value, json};

/// Exit codes of the CLI (README, "Exit codes").
const UNAVAILABLE: i32 = 6;
const NOT_STARTED: i32 = 7;

/// Far below the wait's own timeout: a failure must not be waited out.
const FAST: Duration = Duration::from_secs(10);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `phoenix deploy` of `specs` (with a 60 s timeout, which a fast answer
/// never reaches); the output and how long it took.
fn deploy(c: &Cluster, specs: &Value, extra: &[&str]) -> (Output, Duration) {
    let path = c.dir.path().join(format!("spec-{}.json", free_port()));
    std::fs::write(&path, specs.to_string()).unwrap();
    let mut args = vec!["deploy", path.to_str().unwrap(), "--timeout-s", "60"];
    args.extend_from_slice(extra);
    let began = Instant::now();
    let out = c.phoenix(&args);
    (out, began.elapsed())
}

/// Asserts the deploy failed fast with `code`; returns (stdout, stderr).
fn failed_fast(out: &Output, took: Duration, code: i32) -> (String, String) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(took < FAST, "took {took:?}:\n{stdout}\n{stderr}");
    (stdout, stderr)
}

#[test]
fn a_service_that_exits_at_once_fails_the_deploy_with_its_reason_and_log() {
    let c = Cluster::start(1);
    let spec = testy("m1", "quitter", &["--crash-after", "0", "--exit-code", "2"]);
    let (out, took) = deploy(&c, &spec, &[]);
    let (stdout, stderr) = failed_fast(&out, took, NOT_STARTED);
    assert!(
        stderr.contains("quitter failed: exited with code 2"),
        "{stderr}"
    );
    assert!(stderr.contains("`phoenix logs quitter`"), "{stderr}");
    // The status message and the service's own last words.
    assert!(
        stdout.contains("exited with code 2; restarting in"),
        "{stdout}"
    );
    assert!(stdout.contains("| testy: stderr hello"), "{stdout}");
    // The spec is stored, and the minion keeps trying.
    assert_eq!(c.status("quitter")["state"], "backoff");
}

/// A change of routing alone (`proxyname` here) to a service that is
/// failing is no failure of that change: `update` stores it, restarts
/// nothing, and exits 0 at once.
#[test]
fn a_routing_change_to_a_failing_service_succeeds_and_restarts_nothing() {
    let c = Cluster::start(1);
    let mut spec = testy("m1", "quitter", &["--crash-after", "0", "--exit-code", "2"]);
    let (out, took) = deploy(&c, &spec, &[]);
    failed_fast(&out, took, NOT_STARTED);
    let generation = c.status("quitter")["generation"].clone();
    spec["proxyname"] = json!("quitter.example");
    let path = c.dir.path().join("routed.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    let began = Instant::now();
    let out = c.phoenix(&["update", path.to_str().unwrap(), "--timeout-s", "60"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(began.elapsed() < FAST, "{:?}", began.elapsed());
    assert!(stdout.contains("nothing restarted"), "{stdout}");
    assert_eq!(c.status("quitter")["generation"], generation);
    assert_eq!(c.json(&["info", "quitter"])["proxyname"], "quitter.example");
}

#[test]
fn exec_errors_fail_fast_naming_the_error_for_each_service() {
    let c = Cluster::start(1);
    // An ELF executable for a machine no kernel here runs: ENOEXEC.
    let mut alien = vec![0u8; 64];
    alien[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    alien[16] = 2; // ET_EXEC
    alien[18..20].copy_from_slice(&0x4242u16.to_le_bytes()); // e_machine
    alien[20] = 1; // EV_CURRENT
    let alien_path = c.dir.path().join("alien");
    std::fs::write(&alien_path, alien).unwrap();
    // A script whose interpreter is missing: ENOENT from exec.
    let script_path = c.dir.path().join("orphan-script");
    std::fs::write(&script_path, "#!/nonexistent/interpreter\necho never\n").unwrap();
    for p in [&alien_path, &script_path] {
        c.ok(&["push", p.to_str().unwrap()]);
    }
    let mut a = testy("m1", "alien", &[]);
    a["image"] = json!("alien");
    let mut b = testy("m1", "orphan", &[]);
    b["image"] = json!("orphan-script");
    let (out, took) = deploy(&c, &json!([a, b]), &[]);
    let (stdout, stderr) = failed_fast(&out, took, NOT_STARTED);
    // Each service is reported, with the error that stopped it (in the
    // status message, or in the log when the exec failed in the child).
    assert!(stderr.contains("alien failed: "), "{stderr}");
    assert!(stderr.contains("orphan failed: "), "{stderr}");
    let alien_part = &stdout[stdout.find("  alien ").expect(&stdout)..];
    let orphan_part = &stdout[stdout.find("  orphan ").expect(&stdout)..];
    let (alien_part, orphan_part) = if alien_part.len() > orphan_part.len() {
        (
            &alien_part[..alien_part.len() - orphan_part.len()],
            orphan_part,
        )
    } else {
        (
            alien_part,
            &orphan_part[..orphan_part.len() - alien_part.len()],
        )
    };
    assert!(alien_part.contains("Exec format error"), "{stdout}");
    assert!(
        orphan_part.contains("No such file or directory"),
        "{stdout}"
    );
}

#[test]
fn a_service_whose_port_is_taken_fails_the_deploy() {
    let c = Cluster::start(1);
    let spec = testy("m1", "squatted", &[]);
    let port = spec["proxyport"].as_u64().unwrap() as u16;
    // Not a service: a plain listener the master knows nothing of.
    let _v6 = std::net::TcpListener::bind(("::", port)).unwrap();
    let _v4 = std::net::TcpListener::bind(("0.0.0.0", port));
    let (out, took) = deploy(&c, &spec, &[]);
    let (stdout, stderr) = failed_fast(&out, took, NOT_STARTED);
    assert!(
        stderr.contains("squatted failed: exited with code 1"),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("testy: cannot listen on port {port}")),
        "{stdout}"
    );
}

#[test]
fn a_oneshot_that_fails_fails_the_deploy() {
    let c = Cluster::start(1);
    let mut job = testy("m1", "job", &["--crash-after", "0", "--exit-code", "1"]);
    job["duration"] = json!("oneshot");
    let (out, took) = deploy(&c, &job, &[]);
    let (stdout, stderr) = failed_fast(&out, took, NOT_STARTED);
    assert!(
        stderr.contains("job failed: exited with code 1"),
        "{stderr}"
    );
    // Its own last words, though it ended at once.
    assert!(stdout.contains("| testy: stderr hello"), "{stdout}");
}

#[test]
fn a_deploy_to_a_machine_that_is_down_says_so_at_once() {
    let mut c = Cluster::start(1);
    c.kill_minion("m1");
    let (out, took) = deploy(&c, &testy("m1", "far", &[]), &[]);
    let (stdout, stderr) = failed_fast(&out, took, UNAVAILABLE);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        stderr.contains("machine \"m1\" is unreachable; the change is stored"),
        "{stderr}"
    );
    assert!(stdout.contains("far"), "{stdout}");
    // Stored all the same: it is there, pending.
    assert_eq!(c.status("far")["state"], "pending");
}

#[test]
fn a_service_that_starts_is_reported_running_with_progress_on_the_way() {
    let c = Cluster::start(1);
    let (out, _) = deploy(&c, &testy("m1", "fine", &[]), &[]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("deployed fine on m1"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["fine", "running"])),
        "{stdout}"
    );
    // Not a terminal: plain progress lines, one per change, while it
    // proves it stays up.
    assert!(stderr.contains("  fine: starting"), "{stderr}");
    assert!(!stderr.contains('\r'), "{stderr:?}");

    // --json: one JSON document on stdout and no progress at all.
    let (out, _) = deploy(&c, &testy("m1", "quiet", &[]), &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let settled: Value = serde_json::from_slice(&out.stdout).expect("JSON only on stdout");
    assert_eq!(settled[0]["name"], "quiet");
    assert_eq!(settled[0]["verdict"], "running");
    assert!(settled[0]["pid"].as_u64().is_some(), "{settled}");
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn a_service_that_ends_before_its_minimum_uptime_is_not_running() {
    let c = Cluster::start(1);
    // Exits with status 0 after half a second; the minimum is 1 s.
    let spec = testy("m1", "brief", &["--crash-after", "0.5", "--exit-code", "0"]);
    let (out, took) = deploy(&c, &spec, &[]);
    let (_, stderr) = failed_fast(&out, took, NOT_STARTED);
    assert!(stderr.contains("brief failed: exited with"), "{stderr}");
    let s = c.status("brief");
    assert_ne!(s["state"], "running", "{s}");
    assert!(s["restarts"].as_u64() >= Some(1), "{s}");
}
