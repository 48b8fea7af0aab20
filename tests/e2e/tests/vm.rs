//! Services of type "vm": a microVM run by QEMU on the multi-host harness.
//!
//! The tests build VM images from this machine's Debian cloud kernel and
//! busybox (`phoenix_e2e::vm`). `web` serves `/health` with busybox httpd: it is
//! deployed with a health check, reached from another machine, restarted
//! when QEMU dies, stopped through the power button (not SIGKILL), and
//! leaves nothing behind when deleted. `mute` never serves: it is killed
//! at the boot timeout and backs off, its console in `status`. `hog` runs
//! its guest out of memory: `status` says so. A binary killed by its
//! cgroup's OOM killer (what happens to a QEMU over its `memory`) says so
//! too.
//!
//! Needs root, the multi-host harness, and the Debian packages
//! `qemu-system-x86 linux-image-cloud-amd64 busybox-static e2fsprogs zstd
//! cpio`; skips, saying which, otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use phoenix_e2e::netns::Net;
use phoenix_e2e::vm::{
    WEB, build_image, build_image_with, image_test_missing, qemus, up, wait_status,
};
use phoenix_e2e::{Cluster, ServiceAt, alive, is_root, require_netns, wait_for};
use serde_json::json;

/// `mute`: boots, and never serves.
const MUTE: &str = r#"
echo "vm: $PHOENIX_NAME up, serving nothing"
while :; do sleep 3600; done
"#;

/// `hog`: takes more memory than the guest has (overcommit on, so the
/// allocation succeeds and the guest's OOM killer ends it), then powers
/// off as an init whose program died would.
const HOG: &str = r#"
echo 1 > /proc/sys/vm/overcommit_memory
echo "vm: $PHOENIX_NAME eating 512 MiB"
dd if=/dev/zero of=/dev/null bs=512M count=1
echo "vm: dd ended ($?)"
poweroff -f
"#;

#[test]
fn a_vm_boots_serves_restarts_and_leaves_nothing() {
    require_netns!();
    if let Some(why) = image_test_missing() {
        eprintln!("SKIPPED: vm test {why}");
        return;
    }
    let began = Instant::now();
    let mut c = Cluster::master_only_on(Net::new(&["master", "m1", "m2"]));
    // Health failures do not count until the boot timeout (120 s by
    // default) or a first pass. A stop has 60 s for the guest to power off
    // before SIGKILL: the test shows it takes the ACPI path, well within.
    set_flag(
        &mut c,
        "--stop-timeout-ms",
        &STOP_TIMEOUT.as_millis().to_string(),
    );
    let c = c.with_minions(2);
    let image = build_image(c.dir.path(), "web", WEB, None);
    c.ok(&["push", image.to_str().unwrap(), "web.zst"]);
    let port = 8080;
    let spec = json!({
        "machine": "m1", "name": "vmweb", "image": "web.zst", "type": "vm",
        "proxyport": port, "healthcheck": "/health",
    });
    let deployed = Instant::now();
    // A TCG boot on a busy machine can outlast the harness's 30 s deploy.
    let spec_file = c.dir.path().join("vm.json");
    std::fs::write(&spec_file, spec.to_string()).unwrap();
    c.ok(&["deploy", spec_file.to_str().unwrap(), "--timeout", "120"]);
    let s = wait_status(&c, "vmweb", Duration::from_secs(90), up);
    eprintln!("deploy -> running and healthy: {:?}", deployed.elapsed());
    let first = s["pid"].as_u64().expect("a pid");
    assert_eq!(
        qemus(&c, "phoenix-vmweb"),
        vec![first as u32],
        "one QEMU: {s}"
    );
    // The node says how it runs VMs; a VM under TCG says it is slow.
    let nodes = c.json(&["nodes", "--json"]);
    let m1 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "m1")
        .unwrap();
    let accel = m1["stats"]["vm_accel"].as_str().unwrap_or_default();
    assert!(accel == "tcg" || accel == "kvm", "{m1}");
    assert!(c.ok(&["nodes"]).contains(accel));
    let text = c.ok(&["status", "vmweb"]);
    assert_eq!(
        text.contains("note:        tcg: software emulation, slow"),
        accel == "tcg",
        "{text}"
    );

    // Reached at its own address from the other machine, over the mesh.
    let addr = std::net::SocketAddr::new(c.service_ip("vmweb").into(), port);
    let from_m2 = ServiceAt {
        machine: "m2".into(),
        addr,
    };
    let (code, body) = c.get(&from_m2, "/name").expect("the VM answers from m2");
    assert_eq!((code, body.trim()), (200, "vmweb"));
    // The serial console is the service's log.
    wait_for("the console in the log", Duration::from_secs(10), || {
        c.ok(&["logs", "vmweb"])
            .contains("vm: vmweb at")
            .then_some(())
    });

    // QEMU killed: restarted, from a fresh disk, healthy again.
    // SAFETY: kill(2) on a pid the minion reported as the service's.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let s = wait_status(&c, "vmweb", Duration::from_secs(90), |s| {
        up(s) && s["pid"].as_u64().is_some_and(|p| p != first)
    });
    assert!(s["restarts"].as_u64().unwrap_or(0) >= 1, "{s}");
    let (code, _) = c.get(&from_m2, "/health").expect("answers after restart");
    assert_eq!(code, 200);

    // A stop presses the power button: the guest powers off, long before
    // the stop timeout would have QEMU killed.
    let second = s["pid"].as_u64().unwrap();
    let stopping = Instant::now();
    let restart = std::thread::scope(|t| {
        let restart = t.spawn(|| c.phoenix(&["restart", "vmweb", "--detach"]));
        wait_for("the old QEMU gone", STOP_TIMEOUT, || {
            (!alive(second)).then_some(())
        });
        restart.join().unwrap()
    });
    let stopped_in = stopping.elapsed();
    eprintln!("restart: QEMU gone after {stopped_in:?} (stop timeout {STOP_TIMEOUT:?})");
    assert!(restart.status.success(), "{restart:?}");
    assert!(stopped_in < STOP_TIMEOUT / 2, "{stopped_in:?}");
    wait_for(
        "the power button in the console",
        Duration::from_secs(10),
        || {
            c.ok(&["logs", "vmweb"])
                .contains("vm: power button pressed, powering off")
                .then_some(())
        },
    );
    assert!(
        !c.log("m1").contains("sending SIGTERM to QEMU"),
        "the powerdown did not reach QEMU"
    );
    let s = wait_status(&c, "vmweb", Duration::from_secs(150), |s| {
        up(s) && s["pid"].as_u64().is_some_and(|p| p != second)
    });

    // Deleted: no QEMU, no tap, no per-start disk.
    let third = s["pid"].as_u64().unwrap();
    c.ok(&["del", "vmweb"]);
    wait_for("QEMU gone", Duration::from_secs(15), || {
        (!alive(third) && qemus(&c, "phoenix-vmweb").is_empty()).then_some(())
    });
    let work = c.minion_dir("m1").join("work");
    let disks: Vec<PathBuf> = walk(&work)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "disk.ext4"))
        .collect();
    assert!(disks.is_empty(), "per-start disks left: {disks:?}");
    let net = c.net.as_ref().unwrap();
    let links = Command::new("ip")
        .args(["-n", &net.host("m1").ns, "-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("vm0"), "a tap left on m1: {links}");
    eprintln!("whole test: {:?}", began.elapsed());
}

/// The Firecracker backend, where this machine has it: a `firecracker`
/// binary in `PATH` and KVM with hardware virtualisation (then the minion
/// boots images whose kernel is a `vmlinux` with Firecracker). The
/// image's kernel is Debian's cloud kernel decompressed (its `vmlinuz` is
/// LZ4: the frame after its magic, through `lz4 -d`).
#[test]
fn a_vm_with_a_vmlinux_boots_with_firecracker_where_it_is_installed() {
    let firecracker = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("firecracker"))
            .find(|f| f.is_file())
    });
    let Some(firecracker) = firecracker else {
        eprintln!(
            "SKIPPED: no `firecracker` binary in PATH (it is in no Debian archive: install a release from \
             https://github.com/firecracker-microvm/firecracker/releases on a host with KVM)"
        );
        return;
    };
    let kvm = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).exists());
    if !kvm {
        eprintln!(
            "SKIPPED: {} found, but no hardware virtualisation (kvm_intel or kvm_amd): the minion uses QEMU then",
            firecracker.display()
        );
        return;
    }
    require_netns!();
    if let Some(why) = image_test_missing() {
        eprintln!("SKIPPED: vm test {why}");
        return;
    }
    let c = Cluster::start_on(Net::new(&["master", "m1"]), 1);
    let vmlinux = c.dir.path().join("vmlinux");
    let made = Command::new("sh")
        .args([
            "-c",
            r#"K=$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -1)
               OFF=$(grep -obUaP '\x02\x21\x4c\x18' "$K" | head -1 | cut -d: -f1)
               tail -c +$((OFF + 1)) "$K" | lz4 -dc > "$1" 2>/dev/null || true
               head -c 4 "$1" | grep -q ELF"#,
            "vmlinux",
        ])
        .arg(&vmlinux)
        .status()
        .expect("run sh");
    if !made.success() {
        eprintln!("SKIPPED: cannot extract a vmlinux from the cloud kernel (needs lz4)");
        return;
    }
    let image = build_image_with(c.dir.path(), "fcweb", WEB, None, Some(&vmlinux));
    c.ok(&["push", image.to_str().unwrap(), "fcweb.zst"]);
    let spec = json!({
        "machine": "m1", "name": "fcweb", "image": "fcweb.zst", "type": "vm",
        "proxyport": 8080, "healthcheck": "/health",
    });
    let file = c.dir.path().join("fc.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    c.ok(&["deploy", file.to_str().unwrap(), "--timeout", "120"]);
    let s = wait_status(&c, "fcweb", Duration::from_secs(60), up);
    let pid = s["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("firecracker"),
        "not Firecracker: {}",
        String::from_utf8_lossy(&cmdline)
    );
    let (code, body) = c.http_service("fcweb", 8080, "/name").expect("answers");
    assert_eq!((code, body.trim()), (200, "fcweb"));
    c.ok(&["del", "fcweb"]);
    wait_for("Firecracker gone", Duration::from_secs(15), || {
        (!alive(pid)).then_some(())
    });
}

/// How long a stop waits before SIGKILL in these tests.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets a minion flag the harness gives a value, or adds it.
fn set_flag(c: &mut Cluster, flag: &str, value: &str) {
    match c.minion_flags.iter().position(|f| f == flag) {
        Some(at) => c.minion_flags[at + 1] = value.into(),
        None => c.minion_flags.extend([flag.to_owned(), value.to_owned()]),
    }
}

#[test]
fn a_vm_that_never_boots_backs_off_and_one_out_of_memory_says_so() {
    require_netns!();
    if let Some(why) = image_test_missing() {
        eprintln!("SKIPPED: vm test {why}");
        return;
    }
    let began = Instant::now();
    let mut c = Cluster::master_only_on(Net::new(&["master", "m1"]));
    set_flag(&mut c, "--vm-boot-timeout-ms", "30000");
    let c = c.with_minions(1);
    let dir = c.dir.path();
    let mute = build_image(dir, "mute", MUTE, None);
    let hog = build_image(dir, "hog", HOG, Some(r#"{"memory_mib": 128}"#));
    c.ok(&["push", mute.to_str().unwrap(), "mute.zst"]);
    c.ok(&["push", hog.to_str().unwrap(), "hog.zst"]);
    let specs = json!([
        {"machine": "m1", "name": "mute", "image": "mute.zst", "type": "vm",
         "proxyport": 8080, "healthcheck": "/health"},
        {"machine": "m1", "name": "hog", "image": "hog.zst", "type": "vm"},
    ]);
    let file = dir.join("specs.json");
    std::fs::write(&file, specs.to_string()).unwrap();
    c.ok(&["deploy", file.to_str().unwrap(), "--detach"]);

    // Never passes its health check: killed at the boot timeout, saying so.
    let s = wait_status(&c, "mute", Duration::from_secs(120), |s| {
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not boot within 30 s"))
    });
    eprintln!("mute: {} after {:?}", s["message"], began.elapsed());
    // Its console in `status`: it booted, it just never served.
    let text = wait_for(
        "mute's console in its status",
        Duration::from_secs(120),
        || {
            let out = c.phoenix(&["status", "mute"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (text.contains("last lines of its log:")
                && text.contains("vm: mute up, serving nothing"))
            .then_some(text)
        },
    );
    eprintln!("{text}");
    // It backs off: a run that never booted is no stable run.
    let s = wait_status(&c, "mute", Duration::from_secs(150), |s| {
        s["state"] == "backoff" || s["restarts"].as_u64().unwrap_or(0) >= 2
    });
    assert!(s["restarts"].as_u64().unwrap_or(0) >= 1, "{s}");

    // Out of memory in the guest: said in its status.
    let s = wait_status(&c, "hog", Duration::from_secs(150), |s| {
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("out of memory in the guest"))
    });
    let message = s["message"].as_str().unwrap();
    assert!(message.contains("Killed process"), "{message}");
    assert!(message.contains("(dd)"), "{message}");
    eprintln!("hog: {message}");
    c.ok(&["del", "mute"]);
    c.ok(&["del", "hog"]);
    eprintln!("whole test: {:?}", began.elapsed());
}

/// What a QEMU over its service's `memory` meets, shown with a binary (the
/// runner's report is the same for every kind of task): the kernel's OOM
/// killer in its cgroup, which `status` names.
#[test]
fn a_task_killed_by_its_cgroups_oom_killer_says_out_of_memory() {
    if !is_root() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("SKIPPED: needs busybox (apt-get install busybox-static)");
        return;
    };
    // On loopback: `ip netns exec` gives a multi-host harness's minions a
    // /sys without cgroups.
    let c = Cluster::start(1);
    c.ok(&["push", busybox, "busybox"]);
    let spec = json!({
        "machine": "m1", "name": "eater", "type": "binary", "image": "busybox", "memory": "32M",
        "args": ["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
    });
    let file = c.dir.path().join("eater.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    c.ok(&["deploy", file.to_str().unwrap(), "--detach"]);
    let s = wait_status(&c, "eater", Duration::from_secs(30), |s| {
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("out of memory"))
    });
    let message = s["message"].as_str().unwrap();
    assert!(
        message.contains("OOM killer killed 1 of its processes at its memory limit of 32 MiB"),
        "{message}"
    );
    c.ok(&["del", "eater"]);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
