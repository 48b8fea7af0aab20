//! Containers (type "docker") run by crun. Needs root and crun; skips otherwise.

use std::path::Path;
use std::time::{Duration, Instant};

use phoenix_e2e::oci::{self, Layer};
use phoenix_e2e::{Cluster, alive, free_port, wait_for};
use serde_json::{Value, json};

fn pid(s: &Value) -> u64 {
    s["pid"].as_u64().unwrap_or_else(|| panic!("no pid in {s}"))
}

fn container(name: &str, image: &str, args: &[&str]) -> Value {
    json!({
        "machine": "m1", "name": name, "image": image, "type": "docker",
        "proxyport": free_port(), "args": args, "healthcheck": "/health",
    })
}

fn port(spec: &Value) -> u16 {
    spec["proxyport"].as_u64().unwrap() as u16
}

/// Pushes an image tar built from `images` as `file`.
fn push_image(c: &Cluster, file: &str, images: &[(&str, Vec<Layer>, Value)]) {
    let path = c.dir.path().join(file);
    oci::write_tar(&path, images);
    c.ok(&["push", path.to_str().unwrap(), file]);
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .contains(path.to_str().unwrap())
}

#[test]
fn a_container_is_supervised_like_a_binary() {
    if !phoenix_e2e::can_run_containers("container test") {
        return;
    }
    let c = Cluster::start(1);
    push_image(
        &c,
        "app.tar",
        &[
            (
                "v1",
                oci::testy_layers(),
                oci::config(&["/testy"], &["FROM_IMAGE=v1", "SHARED=image"]),
            ),
            (
                "v2",
                oci::testy_layers(),
                oci::config(&["/testy"], &["FROM_IMAGE=v2"]),
            ),
        ],
    );
    // `image` is FILE:TAG with .tar assumed.
    let mut spec = container("box", "app:v1", &["--write-file", "/starts"]);
    spec["env"] = json!(["SHARED=spec"]);
    spec["memory"] = json!("64M");
    spec["cpus"] = json!(0.5);
    c.apply("deploy", &spec);
    let s = c.wait_status("box", "healthy", |s| s["health"] == "healthy");
    let first = pid(&s);

    // It is a container: its own PID namespace and hostname, the image's env
    // overridden by the spec's, Phoenix's variables.
    let own_ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    assert_ne!(
        std::fs::read_link(format!("/proc/{first}/ns/pid")).unwrap(),
        own_ns
    );
    let (_, env) = c
        .http_service(spec["name"].as_str().unwrap(), port(&spec), "/env")
        .unwrap();
    assert!(
        env.contains("FROM_IMAGE=v1\n") && env.contains("SHARED=spec\n"),
        "{env}"
    );
    assert!(
        env.contains("PHOENIX_NAME=box\n") && env.contains(&format!("PORT={}\n", port(&spec))),
        "{env}"
    );
    let (_, hello) = c
        .http_service(spec["name"].as_str().unwrap(), port(&spec), "/")
        .unwrap();
    assert!(hello.contains("name=box"), "{hello}");
    // Its output is in the service log.
    wait_for(
        "container output in the log",
        Duration::from_secs(10),
        || c.ok(&["logs", "box"]).contains("listening").then_some(()),
    );
    // The memory limit is applied, and status says how.
    let limits = s["limits"].as_str().unwrap_or_default().to_owned();
    assert!(
        limits.contains("memory 64 MiB") && limits.contains("cpus 0.5"),
        "{s}"
    );
    if Path::new("/sys/fs/cgroup/unified").is_dir() {
        // Hybrid host: the minion put the container into v1 cgroups itself.
        // The init is in the service's cgroup (`box@<minion id>`) of
        // each hierarchy.
        let of_init = std::fs::read_to_string(format!("/proc/{first}/cgroup")).unwrap();
        let cg = |hierarchy: &str, f: &str| {
            let path = of_init
                .lines()
                .find_map(|l| {
                    let (_, rest) = l.split_once(':')?;
                    let (controllers, path) = rest.split_once(':')?;
                    controllers
                        .split(',')
                        .any(|c| c == hierarchy)
                        .then_some(path)
                })
                .unwrap_or_else(|| panic!("no {hierarchy} cgroup: {of_init}"));
            assert!(path.starts_with("/phoenix/box@"), "{of_init}");
            let file = format!("/sys/fs/cgroup/{hierarchy}{path}/{f}");
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file}: {e}"))
        };
        let procs = cg("memory", "cgroup.procs");
        assert!(procs.lines().any(|p| p == first.to_string()), "{procs}");
        assert_eq!(
            cg("memory", "memory.limit_in_bytes").trim(),
            (64u64 << 20).to_string()
        );
        assert_eq!(cg("cpu", "cpu.cfs_quota_us").trim(), "50000");
    }

    // kill -9: restarted from the image, with a fresh writable layer.
    let upper = c.minion_dir("m1").join("work/box/upper/starts");
    assert_eq!(std::fs::read_to_string(&upper).unwrap().lines().count(), 1);
    // SAFETY: kill(2) on the container's init, which we deployed.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let s = c.wait_status("box", "restarted", |s| {
        s["restarts"] == 1 && s["health"] == "healthy"
    });
    assert_ne!(pid(&s), first);
    assert_eq!(
        std::fs::read_to_string(&upper).unwrap().lines().count(),
        1,
        "the last run's writes must not survive a restart"
    );

    // A failing health check restarts it too.
    c.http_service(spec["name"].as_str().unwrap(), port(&spec), "/unhealthy")
        .unwrap();
    let s = c.wait_status("box", "restarted after its check failed", |s| {
        s["restarts"] == 2 && s["health"] == "healthy"
    });

    // Update to another image in the same file.
    spec["image"] = json!("app:v2");
    c.apply("update", &spec);
    let s2 = c.wait_status("box", "on v2", |s| {
        s["generation"] == 2 && s["health"] == "healthy"
    });
    assert!(!alive(pid(&s)));
    let (_, env) = c
        .http_service(spec["name"].as_str().unwrap(), port(&spec), "/env")
        .unwrap();
    assert!(env.contains("FROM_IMAGE=v2\n"), "{env}");

    // Delete: the container, its crun state and its mount are gone.
    let bundle = c.minion_dir("m1").join("work/box/bundle/rootfs");
    assert!(mounted(&bundle));
    c.ok(&["del", "box"]);
    wait_for("the container to end", Duration::from_secs(10), || {
        (!alive(pid(&s2))).then_some(())
    });
    wait_for("the mount to go", Duration::from_secs(10), || {
        (!mounted(&bundle)).then_some(())
    });
    let state = c.minion_dir("m1").join("crun/phoenix-box");
    wait_for("crun's state to go", Duration::from_secs(10), || {
        (!state.exists()).then_some(())
    });
    // Its images leave the registry: the unpacked root filesystems go too.
    let unpacked = || {
        std::fs::read_dir(c.minion_dir("m1").join("images/rootfs"))
            .unwrap()
            .flatten()
            .count()
    };
    assert!(unpacked() > 0);
    for e in std::fs::read_dir(c.master_dir().join("registry"))
        .unwrap()
        .flatten()
    {
        if e.file_name().to_string_lossy().ends_with(".tar") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    wait_for(
        "the unpacked images to be collected",
        Duration::from_secs(10),
        || (unpacked() == 0).then_some(()),
    );
}

#[test]
fn a_container_survives_its_minion_and_never_outlives_its_service() {
    if !phoenix_e2e::can_run_containers("container test") {
        return;
    }
    let mut c = Cluster::start(1);
    push_image(
        &c,
        "app.tar",
        &[("latest", oci::testy_layers(), oci::config(&["/testy"], &[]))],
    );
    c.apply(
        "deploy",
        &json!([
            container("kept", "app", &[]),
            container("dropped", "app", &[])
        ]),
    );
    let kept = pid(&c.wait_status("kept", "healthy", |s| s["health"] == "healthy"));
    let dropped = pid(&c.wait_status("dropped", "healthy", |s| s["health"] == "healthy"));
    c.kill_minion("m1");
    // Deleted while its minion is down (nothing to wait for: --detach)...
    c.ok(&["del", "--detach", "dropped"]);
    assert!(alive(kept) && alive(dropped));
    c.start_minion("m1");
    c.wait_reachable("m1");
    // ...so the restarted minion ends it, and adopts the other.
    wait_for(
        "the deleted service's container to end",
        Duration::from_secs(10),
        || (!alive(dropped)).then_some(()),
    );
    let s = c.wait_status("kept", "re-reported", |s| s["state"] == "running");
    assert_eq!(pid(&s), kept);
    // The adopted container is still supervised.
    // SAFETY: kill(2) on a container init we deployed.
    unsafe { libc::kill(kept as i32, libc::SIGKILL) };
    c.wait_status("kept", "restarted", |s| {
        s["restarts"] == 1 && s["health"] == "healthy"
    });
}

#[test]
fn a_broken_or_hostile_image_fails_the_service_with_a_clear_message() {
    if !phoenix_e2e::can_run_containers("container test") {
        return;
    }
    let c = Cluster::start(1);
    // A layer that tries to write through a symlink out of the rootfs.
    let outside = c.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let evil = Layer::default().symlink("/escape", outside.to_str().unwrap());
    let mut evil_path = Layer::default().bare();
    let payload = c.dir.path().join("payload");
    std::fs::write(&payload, "pwned").unwrap();
    evil_path = evil_path.binary("/escape/pwned", &payload);
    push_image(
        &c,
        "evil.tar",
        &[(
            "latest",
            vec![evil, evil_path],
            oci::config(&["/testy"], &[]),
        )],
    );
    let out = c.phoenix_stdin(
        &["deploy", "-", "--detach"],
        &container("evil", "evil", &[]).to_string(),
    );
    assert!(out.status.success());
    let s = c.wait_status("evil", "refused", |s| {
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("symlink") || m.contains("escape"))
    });
    assert_ne!(s["state"], "running");
    assert!(
        !outside.join("pwned").exists(),
        "a layer wrote outside the rootfs"
    );
    // Nothing half-unpacked is left in the cache. (The service is retried
    // with backoff, and each retry unpacks again into a temporary folder
    // for a moment: between retries, none may be left.)
    let cache = c.minion_dir("m1").join("images/rootfs");
    let left = || -> Vec<_> {
        std::fs::read_dir(&cache)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    wait_for(
        "the rootfs cache to hold nothing",
        Duration::from_secs(5),
        || left().is_empty().then_some(()),
    );

    // A damaged legacy Docker tar (a manifest.json naming files it does not
    // hold) is refused at deploy, at once, naming the spec, the field, the
    // registry file and the fix; nothing is stored.
    let legacy = c.dir.path().join("legacy.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&legacy).unwrap());
    let manifest = br#"[{"Config":"c.json","RepoTags":["x:1"],"Layers":[]}]"#;
    let mut h = tar::Header::new_gnu();
    h.set_size(manifest.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "manifest.json", &manifest[..])
        .unwrap();
    b.into_inner().unwrap();
    c.ok(&["push", legacy.to_str().unwrap(), "legacy.tar"]);
    let started = Instant::now();
    let out = c.phoenix_stdin(
        &["deploy", "-"],
        &container("old", "legacy", &[]).to_string(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "invalid input: {err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    for part in [
        r#"spec "old": field `image`"#,
        r#"registry file "legacy.tar""#,
        "`phoenix push FILE legacy.tar`",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    assert!(
        !err.contains(c.master_dir().to_str().unwrap()),
        "the master's own path leaked: {err}"
    );
    let missing = c.phoenix(&["status", "old"]);
    assert_eq!(missing.status.code(), Some(4), "nothing was stored");
}

#[test]
fn an_image_from_docker_image_save_runs() {
    if !phoenix_e2e::can_run_containers("container test") {
        return;
    }
    if std::process::Command::new("docker")
        .arg("info")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        eprintln!("SKIPPED: no Docker Engine here");
        return;
    }
    let c = Cluster::start(1);
    // A FROM scratch image: no pull needed.
    let ctx = c.dir.path().join("docker-ctx");
    std::fs::create_dir(&ctx).unwrap();
    let layer = oci::testy_layers().remove(0);
    let mut dockerfile = String::from("FROM scratch\n");
    for (i, (at, host)) in layer.files().iter().enumerate() {
        std::fs::copy(host, ctx.join(format!("f{i}"))).unwrap();
        dockerfile.push_str(&format!("COPY f{i} /{at}\n"));
    }
    dockerfile.push_str("ENV FROM_DOCKER=yes\nENTRYPOINT [\"/testy\"]\n");
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let tag = format!("phoenix-e2e-testy:{}", std::process::id());
    let built = std::process::Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let tar = c.dir.path().join("saved.tar");
    let saved = std::process::Command::new("docker")
        .args(["image", "save", &tag, "-o"])
        .arg(&tar)
        .output()
        .unwrap();
    let _ = std::process::Command::new("docker")
        .args(["image", "rm", "-f", &tag])
        .output();
    assert!(
        saved.status.success(),
        "docker image save: {}",
        String::from_utf8_lossy(&saved.stderr)
    );
    // Docker 25 and later save an OCI layout; an older Engine (this host
    // has 20.10) saves the legacy format, which Phoenix reads as well.
    let is_oci = tar::Archive::new(std::fs::File::open(&tar).unwrap())
        .entries()
        .unwrap()
        .flatten()
        .any(|e| e.path().is_ok_and(|p| p.as_os_str() == "oci-layout"));
    eprintln!(
        "docker saved {}",
        if is_oci {
            "an OCI layout"
        } else {
            "a legacy archive"
        }
    );
    c.ok(&["push", tar.to_str().unwrap(), "saved.tar"]);
    let spec = container("from-docker", "saved", &[]);
    c.apply("deploy", &spec);
    c.wait_status("from-docker", "healthy", |s| s["health"] == "healthy");
    let (_, env) = c
        .http_service(spec["name"].as_str().unwrap(), port(&spec), "/env")
        .unwrap();
    assert!(env.contains("FROM_DOCKER=yes\n"), "{env}");
}

#[test]
fn a_oneshot_container_keeps_its_exit_code_and_is_not_restarted() {
    if !phoenix_e2e::can_run_containers("container test") {
        return;
    }
    let c = Cluster::start(1);
    push_image(
        &c,
        "app.tar",
        &[("latest", oci::testy_layers(), oci::config(&["/testy"], &[]))],
    );
    let mut job = container("job", "app", &["--crash-after", "0.3", "--exit-code", "4"]);
    job["duration"] = json!("oneshot");
    job.as_object_mut().unwrap().remove("healthcheck");
    let out = c.phoenix_stdin(&["deploy", "-"], &job.to_string());
    let err = String::from_utf8_lossy(&out.stderr);
    // Stored but did not succeed: exit 7, with the reason.
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("job failed: exited with code 4"), "{err}");
    std::thread::sleep(Duration::from_secs(2));
    let s = c.status("job");
    assert_eq!(
        (s["state"].as_str(), s["restarts"].as_u64()),
        (Some("failed"), Some(0)),
        "{s}"
    );
    assert_eq!(s["last_exit"]["code"], 4, "{s}");
    // Its container is cleaned up after it ended.
    let state = c.minion_dir("m1").join("crun/phoenix-job");
    wait_for("crun's state to go", Duration::from_secs(10), || {
        (!state.exists()).then_some(())
    });
}
