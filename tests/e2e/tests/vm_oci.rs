//! OCI images run as VMs: `type: "vm"` naming a container image file.
//!
//! The test builds an OCI image of busybox (as the container tests do),
//! pushes it, and deploys it as a VM: the minion makes an ext4 disk of the
//! unpacked image, boots Debian's cloud kernel with phoenix itself as the
//! guest's init, and the image's program serves HTTP at the service's
//! address (its health check passes, it answers from the minion's side).
//! Deleted, its QEMU goes well within the stop timeout: the power button
//! reached the program through the guest init. The same image as a
//! oneshot, as another user (the image's `User`), with `args` that exit 3
//! and an `env` over the image's, is reported as exit code 3. A file that
//! is neither a VM image nor an OCI image is refused at deploy, naming it.
//!
//! Needs root, the multi-host harness, and the Debian packages
//! `qemu-system-x86 linux-image-cloud-amd64 busybox-static e2fsprogs`;
//! skips, saying which, otherwise.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use phoenix_e2e::netns::Net;
use phoenix_e2e::oci::{self, Layer};
use phoenix_e2e::vm::{qemus, up, wait_status};
use phoenix_e2e::{Cluster, ServiceAt, alive, require_netns, wait_for};
use serde_json::{Value, json};

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if let Some(why) = phoenix_e2e::vm_test_missing(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("mkfs.ext4", "e2fsprogs"),
    ]) {
        return Some(why);
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("needs /bin/busybox (apt-get install busybox-static)".into());
    }
    None
}

/// The image's program: says where it runs, then serves `/health` and
/// `/name` with busybox httpd at `[::]:$PORT`.
const SERVE: &str = r#"echo "vm-oci: $PHOENIX_NAME at [$PHOENIX_IP]:$PORT in $(pwd) as $(/bin/busybox id -u) FROM_IMAGE=$FROM_IMAGE"
/bin/busybox mkdir -p /tmp/www
echo ok > /tmp/www/health
echo "$PHOENIX_NAME" > /tmp/www/name
exec /bin/busybox httpd -f -p "[::]:$PORT" -h /tmp/www"#;

fn deploy(c: &Cluster, spec: &Value) -> std::process::Output {
    let file = c
        .dir
        .path()
        .join(format!("{}.json", spec["name"].as_str().unwrap_or("spec")));
    std::fs::write(&file, spec.to_string()).unwrap();
    // A TCG boot on a busy machine can outlast the harness's 30 s deploy.
    c.phoenix(&["deploy", file.to_str().unwrap(), "--timeout", "150"])
}

#[test]
fn an_oci_image_boots_as_a_vm_serves_and_reports_its_exit_code() {
    require_netns!();
    if let Some(why) = missing() {
        eprintln!("SKIPPED: vm_oci test {why}");
        return;
    }
    // Outside a VM the guest init refuses to run.
    let out = Command::new(phoenix_e2e::bin("phoenix"))
        .arg("guest-init")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PID 1 only"));

    let began = Instant::now();
    let mut c = Cluster::master_only_on(Net::new(&["master", "m1"]));
    // A TCG boot takes seconds: no health failures count until then.
    let at = c
        .minion_flags
        .iter()
        .position(|f| f == "--health-grace-ms")
        .unwrap();
    c.minion_flags[at + 1] = "120000".into();
    // A stop that ends the VM before this can only be the power button's.
    let at = c
        .minion_flags
        .iter()
        .position(|f| f == "--stop-timeout-ms")
        .unwrap();
    c.minion_flags[at + 1] = "60000".into();
    let mut c = c.with_minions(1);

    // Neither a VM image nor an OCI image: refused at deploy, named.
    let junk = c.dir.path().join("junk.tar");
    {
        // A tar, but of no image.
        let mut b = tar::Builder::new(std::fs::File::create(&junk).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
        b.finish().unwrap();
    }
    c.ok(&["push", junk.to_str().unwrap(), "junk.tar"]);
    let out = deploy(
        &c,
        &json!({"machine": "m1", "name": "junk", "image": "junk.tar:latest", "type": "vm"}),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("registry file \"junk.tar\" is neither a VM image"),
        "{err}"
    );

    // The image: busybox, an entrypoint that runs a shell command.
    let layer = || {
        Layer::default()
            .binary("/bin/busybox", Path::new("/bin/busybox"))
            .symlink("/bin/sh", "busybox")
    };
    let config = json!({
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": [SERVE],
        "Env": ["FROM_IMAGE=yes", "PATH=/bin"],
        "WorkingDir": "/srv",
    });
    let image = c.dir.path().join("app.tar");
    // The same, as another user, for the oneshot.
    let mut job_config = config.clone();
    job_config["User"] = json!("1000:50");
    oci::write_tar(
        &image,
        &[
            ("latest", vec![layer()], config),
            ("job", vec![layer()], job_config),
        ],
    );
    c.ok(&["push", image.to_str().unwrap(), "app.tar"]);

    let port = 8080;
    let deployed = Instant::now();
    let out = deploy(
        &c,
        &json!({
            "machine": "m1", "name": "vmoci", "image": "app:latest", "type": "vm",
            "proxyport": port, "healthcheck": "/health",
        }),
    );
    assert!(
        out.status.success(),
        "{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.phoenix(&["logs", "vmoci"]).stdout.escape_ascii()
    );
    let mut program_at = None;
    let s = wait_status(&c, "vmoci", Duration::from_secs(150), |s| {
        if program_at.is_none()
            && c.phoenix(&["logs", "vmoci"])
                .stdout
                .windows(7)
                .any(|w| w == b"vm-oci:")
        {
            program_at = Some(deployed.elapsed());
        }
        up(s)
    });
    eprintln!("deploy -> the program's first line: {program_at:?}");
    eprintln!("deploy -> running and healthy: {:?}", deployed.elapsed());
    // Where the first start's time went: the minion's steps.
    for l in c.log("m1").lines().filter(|l| {
        [
            "image unpacked",
            "root disk made",
            "initramfs built",
            "vmoci",
        ]
        .iter()
        .any(|w| l.contains(w))
    }) {
        eprintln!("  m1: {l}");
    }
    let pid = s["pid"].as_u64().expect("a pid");
    let found = qemus(&c, "phoenix-vmoci");
    if found != vec![pid as u32] {
        let ps = Command::new("ps")
            .args(["-o", "pid,ppid,stat,etime,args", "-p"])
            .arg(
                found
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .output()
            .unwrap();
        panic!(
            "one QEMU, {pid}: {found:?}\n{}\n{s}",
            String::from_utf8_lossy(&ps.stdout)
        );
    }

    // It answers at its own address.
    let addr = std::net::SocketAddr::new(c.service_ip("vmoci").into(), port);
    let at = ServiceAt {
        machine: "m1".into(),
        addr,
    };
    let (code, body) = c.get(&at, "/name").expect("the VM answers");
    assert_eq!((code, body.trim()), (200, "vmoci"));
    // The console is the service's log: the program ran with the image's
    // WorkingDir and Env, Phoenix's variables, as root.
    let line = wait_for(
        "the program's line in the log",
        Duration::from_secs(10),
        || {
            let log = c.ok(&["logs", "vmoci"]);
            log.lines()
                .find(|l| l.contains("vm-oci: vmoci at"))
                .map(str::to_owned)
        },
    );
    assert!(
        line.contains(&format!(":{port} in /srv as 0 FROM_IMAGE=yes")),
        "{line}"
    );

    // Deleted: the power button stops the program, the init reports, QEMU
    // ends, well before the 60 s stop timeout would kill it.
    let stopped = Instant::now();
    c.ok(&["del", "vmoci"]);
    wait_for("QEMU gone", Duration::from_secs(40), || {
        (!alive(pid) && qemus(&c, "phoenix-vmoci").is_empty()).then_some(())
    });
    eprintln!("del -> QEMU gone: {:?}", stopped.elapsed());

    // A oneshot of the same image: its exit code is the program's.
    let ran = Instant::now();
    let out = deploy(
        &c,
        &json!({
            "machine": "m1", "name": "vmjob", "image": "app.tar:job", "type": "vm",
            "duration": "oneshot", "env": ["FROM_IMAGE=spec"],
            "args": ["echo vm-oneshot-ran as $(/bin/busybox id -u):$(/bin/busybox id -g) FROM_IMAGE=$FROM_IMAGE; exit 3"],
        }),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    // Stored but did not succeed: the CLI's exit 7, with the reason.
    assert_eq!(
        out.status.code(),
        Some(7),
        "{err}\nlog:\n{}",
        c.phoenix(&["logs", "vmjob"]).stdout.escape_ascii()
    );
    assert!(err.contains("vmjob failed: exited with code 3"), "{err}");
    let s = wait_status(&c, "vmjob", Duration::from_secs(30), |s| {
        s["state"] == "failed"
    });
    assert_eq!(s["last_exit"]["code"], 3, "{s}");
    assert_eq!(s["restarts"].as_u64(), Some(0), "{s}");
    // The image's User, the spec's env over the image's, `args` in place
    // of Cmd.
    let log = c.ok(&["logs", "vmjob"]);
    assert!(
        log.contains("vm-oneshot-ran as 1000:50 FROM_IMAGE=spec"),
        "{log}"
    );
    eprintln!("oneshot deploy -> exit 3: {:?}", ran.elapsed());

    // A oneshot whose QEMU a restarted minion adopted: not QEMU's parent,
    // the minion reads the exit code the guest recorded on its disk.
    let spec = json!({
        "machine": "m1", "name": "vmlate", "image": "app.tar:job", "type": "vm",
        "duration": "oneshot",
        "args": ["echo vm-late-running; /bin/busybox sleep 8; exit 5"],
    });
    let file = c.dir.path().join("vmlate.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    c.ok(&["deploy", file.to_str().unwrap(), "--detach"]);
    wait_for("vmlate's program running", Duration::from_secs(60), || {
        // `logs` fails until the run has written something.
        String::from_utf8_lossy(&c.phoenix(&["logs", "vmlate"]).stdout)
            .contains("vm-late-running")
            .then_some(())
    });
    let restarted = Instant::now();
    c.kill_minion("m1");
    c.start_minion("m1");
    c.wait_reachable("m1");
    eprintln!("minion restarted in {:?}", restarted.elapsed());
    let s = wait_status(&c, "vmlate", Duration::from_secs(60), |s| {
        s["state"] == "failed"
    });
    assert_eq!(s["last_exit"]["code"], 5, "{s}");
    assert_eq!(s["restarts"].as_u64(), Some(0), "{s}");
    eprintln!("whole test: {:?}", began.elapsed());
}

#[test]
fn a_minion_refuses_a_guest_kernel_that_is_not_there() {
    let mut child = Command::new(phoenix_e2e::bin("phoenix"))
        .args([
            "minion",
            "m1",
            "127.0.0.1",
            "CDwqO7vZaQN8mjTBnaIEyc4xSNWyIORFdzYFWqBOqwg=",
            "127.0.0.1",
            "127.0.0.1",
            "--foreground",
            "--vm-kernel",
            "/nonexistent/bzImage",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let began = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if began.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the minion started with a guest kernel that is not there");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("--vm-kernel /nonexistent/bzImage: no such file"),
        "{err}"
    );
}
