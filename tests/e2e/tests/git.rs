//! End to end: git as the source (issue #15, item 2). The master tracks
//! local repositories (`file://` and `git daemon` on loopback, no
//! network): a source that moves two commits ahead restarts only what
//! changed, a bad commit is refused whole with the previous one still
//! live and the error in `phoenix sources`, a webhook push is applied
//! within seconds (the interval is an hour, so only the webhook explains
//! it), and a remote that is gone is reported while the services keep
//! running.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use phoenix_e2e::{Cluster, free_port, git, wait_for};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A working repository the tests commit to; the master reads it as a
/// remote.
struct Repo {
    dir: PathBuf,
}

impl Repo {
    fn new(dir: PathBuf) -> Repo {
        std::fs::create_dir_all(&dir).unwrap();
        git(&dir, &["init", "-q", "-b", "main"]);
        Repo { dir }
    }

    fn write(&self, path: &str, text: &str) {
        let p = self.dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn remove(&self, path: &str) {
        std::fs::remove_file(self.dir.join(path)).unwrap();
    }

    /// Commits everything; returns the commit.
    fn commit(&self, message: &str) -> String {
        git(&self.dir, &["add", "-A"]);
        git(
            &self.dir,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.com",
                "commit",
                "-q",
                "-m",
                message,
            ],
        );
        git(&self.dir, &["rev-parse", "HEAD"])
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.display())
    }
}

/// A service's spec, its proxy port fixed once so that only the arguments
/// differ between commits.
fn spec(name: &str, port: u16, args: &[&str]) -> String {
    json!({
        "machine": "m1", "name": name, "image": "testy", "type": "binary",
        "proxyport": port, "args": args,
    })
    .to_string()
}

/// The service's generation and pid, once it runs.
fn running(c: &Cluster, name: &str) -> (u64, u64) {
    let s = c.wait_status(name, "running", |s| {
        s["state"] == "running" && s["pid"].as_u64().is_some()
    });
    (
        s["generation"].as_u64().unwrap(),
        s["pid"].as_u64().unwrap(),
    )
}

fn source(c: &Cluster, name: &str) -> Value {
    c.json(&["sources", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until the source's row satisfies `pred`; returns it.
fn wait_source(c: &Cluster, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(30), || {
        let s = source(c, name);
        pred(&s).then_some(s)
    })
}

#[test]
fn a_git_source_moves_ahead_refuses_a_bad_commit_and_outlives_its_remote() {
    let mut c = Cluster::start(1);
    let repo = Repo::new(c.dir.path().join("conf-repo"));
    let (web, api, worker) = (free_port(), free_port(), free_port());
    repo.write("README.md", "# not a spec\n");
    repo.write("other/ignored.json", "not read: outside --path");
    repo.write("specs/web.json", &spec("web", web, &[]));
    repo.write("specs/api.yaml", &spec("api", api, &[]));
    let c1 = repo.commit("web and api");

    // Bad input is named: a ref the remote lacks, a path not in it, a URL.
    let url = repo.url();
    let err = c.fails(&["apply", "--git", &format!("{url}#nope"), "--path", "specs"]);
    assert!(err.contains("has no branch or tag \"nope\""), "{err}");
    let err = c.fails(&["apply", "--git", &format!("{url}#main"), "--path", "conf"]);
    assert!(
        err.contains("path \"conf\" is not in the repository"),
        "{err}"
    );
    assert!(err.contains("was not added"), "{err}");
    let err = c.fails(&["apply", "--git", "file:///nowhere/at/all"]);
    assert!(err.contains("ls-remote file:///nowhere/at/all"), "{err}");
    let err = c.fails(&["apply", "--git=-x"]);
    assert!(err.contains("bad git URL \"-x\""), "{err}");
    assert!(
        c.json(&["sources", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );

    let out = c.ok(&[
        "apply",
        "--git",
        &format!("{url}#main"),
        "--path",
        "specs",
        "--source",
        "conf",
        "--watch",
        "--interval-s",
        "1",
        "--timeout-s",
        "30",
    ]);
    assert!(out.contains("source conf:"), "{out}");
    assert!(out.contains(&c1[..7]), "{out}");
    assert!(out.contains("+ web (m1)  specs/web.json"), "{out}");
    assert!(out.contains("webhook: POST"), "a secret is made: {out}");
    let s = source(&c, "conf");
    assert_eq!(s["live_commit"], c1.as_str(), "{s}");
    assert_eq!(
        (s["watch"].clone(), s["webhook"].clone()),
        (json!(true), json!(true))
    );
    let web1 = running(&c, "web");
    let api1 = running(&c, "api");
    let audit = c.ok(&["audit"]);
    assert!(
        audit.contains(&format!("via git:conf@{}", &c1[..7])),
        "the audit names the source and the commit: {audit}"
    );

    // Two commits ahead, one at a time: only what changed restarts.
    repo.write(
        "specs/api.yaml",
        &spec("api", api, &["--crash-after", "600"]),
    );
    let c2 = repo.commit("api changes");
    wait_source(&c, "conf", "commit 2 live", |s| {
        s["live_commit"] == c2.as_str()
    });
    let api2 = running(&c, "api");
    assert_eq!(api2.0, api1.0 + 1);
    assert_ne!(api2.1, api1.1);
    assert_eq!(running(&c, "web"), web1, "web did not change");
    repo.write("specs/jobs/worker.json", &spec("worker", worker, &[]));
    let c3 = repo.commit("a worker");
    wait_source(&c, "conf", "commit 3 live", |s| {
        s["live_commit"] == c3.as_str()
    });
    let worker3 = running(&c, "worker");
    assert_eq!(running(&c, "web"), web1);
    assert_eq!(running(&c, "api"), api2);
    let audit = c.ok(&["audit"]);
    assert!(
        audit.contains(&format!("via git:conf@{}", &c3[..7])),
        "{audit}"
    );

    // A bad commit: refused whole (web's change is not applied either),
    // the previous commit stays live, the error names file and field.
    repo.write(
        "specs/web.json",
        &spec("web", web, &["--crash-after", "600"]),
    );
    repo.write(
        "specs/bad.json",
        r#"{"machine":"m1","name":"bad","imgae":"testy","type":"binary"}"#,
    );
    let c4 = repo.commit("a typo");
    let s = wait_source(&c, "conf", "commit 4 refused", |s| {
        s["refused_commit"] == c4.as_str()
    });
    assert_eq!(s["live_commit"], c3.as_str(), "{s}");
    let error = s["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("commit {} of", &c4[..7])),
        "{error}"
    );
    assert!(error.contains("specs/bad.json: rejected"), "{error}");
    assert!(error.contains("did you mean `image`?"), "{error}");
    assert!(
        error.contains(&format!("commit {} stays live", &c3[..7])),
        "{error}"
    );
    let table = c.ok(&["sources"]);
    assert!(
        table.contains("conf") && table.contains(&c3[..7]),
        "{table}"
    );
    assert!(table.contains("specs/bad.json"), "{table}");
    // Looked at again (the interval is 1 s), it is still not applied.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(source(&c, "conf")["live_commit"], c3.as_str());
    assert_eq!(running(&c, "web"), web1);
    assert_eq!(c.phoenix(&["status", "bad"]).status.code(), Some(4));

    // The fix applies.
    repo.remove("specs/bad.json");
    let c5 = repo.commit("the typo fixed");
    let s = wait_source(&c, "conf", "commit 5 live", |s| {
        s["live_commit"] == c5.as_str()
    });
    assert!(s["last_error"].is_null(), "{s}");
    let web5 = running(&c, "web");
    assert_eq!(web5.0, web1.0 + 1);

    // A restarted master watches on: the source is in its store.
    c.kill_master();
    c.start_master();
    assert_eq!(source(&c, "conf")["live_commit"], c5.as_str());
    repo.write(
        "specs/jobs/worker.json",
        &spec("worker", worker, &["--crash-after", "600"]),
    );
    let c6 = repo.commit("the worker changes");
    wait_source(&c, "conf", "commit 6 live after a restart", |s| {
        s["live_commit"] == c6.as_str()
    });
    let worker6 = running(&c, "worker");
    assert_eq!(worker6.0, worker3.0 + 1);
    assert_eq!(running(&c, "web"), web5);

    // The remote is gone: reported, nothing stops.
    let moved = c.dir.path().join("moved-away");
    std::fs::rename(&repo.dir, &moved).unwrap();
    let s = wait_source(&c, "conf", "the missing remote reported", |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("ls-remote"))
    });
    assert_eq!(s["live_commit"], c6.as_str(), "{s}");
    assert_eq!(running(&c, "web"), web5);
    assert_eq!(running(&c, "worker"), worker6);

    // Removing the source leaves its services alone.
    let out = c.ok(&["sources", "rm", "conf"]);
    assert!(out.contains("removed source conf"), "{out}");
    assert!(
        c.json(&["sources", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(running(&c, "web"), web5);
    let err = c.fails(&["sources", "rm", "conf"]);
    assert!(err.contains("no git source \"conf\""), "{err}");
    assert!(!c.master_dir().join("sources/conf").exists());
}

/// `git daemon` serving `base` on a loopback port, in a process group of
/// its own; the group is killed when dropped (the daemon's children hold
/// its listening socket too).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let group = -(self.0.id() as i32);
        // SAFETY: kill(2) with integers only; a gone group just fails.
        unsafe {
            libc::kill(group, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

fn git_daemon(base: &Path, port: u16) -> Daemon {
    let child = Command::new("git")
        .args([
            "daemon",
            "--export-all",
            "--reuseaddr",
            "--listen=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.display()))
        .arg(base)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("git daemon");
    let daemon = Daemon(child);
    wait_for("git daemon", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    daemon
}

/// HMAC-SHA256 (RFC 2104), as GitHub signs a webhook's body.
fn hmac_sha256(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(body)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// POSTs `body` to the master's proxy; returns the status.
fn post(port: u16, path: &str, headers: &[(&str, String)], body: &[u8]) -> u16 {
    post_declaring(port, path, headers, body, body.len())
}

/// [`post`], with a `Content-Length` of `declared`.
fn post_declaring(
    port: u16,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
    declared: usize,
) -> u16 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: hooks.example\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {declared}\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {resp:?}"))
}

#[test]
fn a_webhook_push_is_applied_within_seconds() {
    let c = Cluster::start(1);
    let base = c.dir.path().join("served");
    let repo = Repo::new(base.join("app"));
    let port = free_port();
    let svc = free_port();
    repo.write("hello.json", &spec("hello", svc, &[]));
    let c1 = repo.commit("hello");
    let daemon = git_daemon(&base, port);
    let url = format!("git://127.0.0.1:{port}/app");
    let secret_file = c.dir.path().join("hook.secret");
    std::fs::write(&secret_file, "s3cret-for-tests\n").unwrap();
    // An hour between looks: only the webhook can explain a quick apply.
    let out = c.ok(&[
        "apply",
        "--git",
        &url,
        "--source",
        "app",
        "--watch",
        "--interval-s",
        "3600",
        "--webhook-secret-file",
        secret_file.to_str().unwrap(),
        "--timeout-s",
        "30",
    ]);
    assert!(out.contains("+ hello (m1)  hello.json"), "{out}");
    assert!(
        !out.contains("s3cret"),
        "the secret is never printed: {out}"
    );
    assert_eq!(source(&c, "app")["live_commit"], c1.as_str());
    let hello1 = running(&c, "hello");

    repo.write("hello.json", &spec("hello", svc, &["--crash-after", "600"]));
    let c2 = repo.commit("hello changes");
    let body = br#"{"ref":"refs/heads/main","after":"x"}"#;
    let path = "/_phoenix/git/app";
    let sign = |key: &str| format!("sha256={}", hex(&hmac_sha256(key.as_bytes(), body)));
    // Refused alike: no signature, a wrong one, an unknown source, GET.
    assert_eq!(post(c.http_port, path, &[], body), 403);
    let wrong = [("X-Hub-Signature-256", sign("wrong"))];
    assert_eq!(post(c.http_port, path, &wrong, body), 403);
    let right = [("X-Hub-Signature-256", sign("s3cret-for-tests"))];
    assert_eq!(post(c.http_port, "/_phoenix/git/nope", &right, body), 403);
    let token = [("X-Gitlab-Token", "s3cret-for-test".to_owned())];
    assert_eq!(post(c.http_port, path, &token, body), 403);
    // Over 1 MiB: refused as it is read (all of it sent, so the answer
    // arrives before the connection closes).
    let too_big = vec![b' '; 1024 * 1024 + 1];
    assert_eq!(
        post_declaring(c.http_port, path, &right, &too_big, 2 * 1024 * 1024),
        413
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        source(&c, "app")["live_commit"],
        c1.as_str(),
        "nothing refused may wake the source"
    );

    let started = std::time::Instant::now();
    assert_eq!(post(c.http_port, path, &right, body), 202);
    wait_for("the pushed commit live", Duration::from_secs(10), || {
        (source(&c, "app")["live_commit"] == c2.as_str()).then_some(())
    });
    let took = started.elapsed();
    let hello2 = running(&c, "hello");
    assert_eq!(hello2.0, hello1.0 + 1);
    assert!(took < Duration::from_secs(10), "{took:?}");

    // GitLab's token works too.
    repo.write("hello.json", &spec("hello", svc, &[]));
    let c3 = repo.commit("hello back");
    let token = [("X-Gitlab-Token", "s3cret-for-tests".to_owned())];
    assert_eq!(post(c.http_port, path, &token, body), 202);
    wait_for("the next commit live", Duration::from_secs(10), || {
        (source(&c, "app")["live_commit"] == c3.as_str()).then_some(())
    });

    // The daemon stops: the next look reports it; the service runs on.
    drop(daemon);
    assert_eq!(post(c.http_port, path, &token, body), 202);
    let s = wait_source(&c, "app", "the unreachable remote reported", |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("ls-remote"))
    });
    assert_eq!(s["live_commit"], c3.as_str(), "{s}");
    running(&c, "hello");
}
