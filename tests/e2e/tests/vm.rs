//! Services of type "vm": a microVM run by QEMU on the multi-host harness.
//!
//! The test builds a VM image from this machine's Debian cloud kernel and
//! busybox (an initrd that loads the virtio modules and switches to
//! `/dev/vda`; an ext4 root made with `mkfs.ext4 -d` whose init takes its
//! address from `PHOENIX_IP` on the kernel command line and serves
//! `/health` with busybox httpd), pushes it, deploys it with a health
//! check, and checks it is reached from another machine, restarted when
//! QEMU dies, and leaves nothing behind when deleted.
//!
//! Needs root, the multi-host harness, and the Debian packages
//! `qemu-system-x86 linux-image-cloud-amd64 busybox-static e2fsprogs zstd
//! cpio`; skips, saying which, otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use phoenix_e2e::netns::Net;
use phoenix_e2e::{Cluster, ServiceAt, alive, is_root, require_netns, wait_for};
use serde_json::{Value, json};

/// Builds the test's VM image at `$1` (see the module header).
const MKVM: &str = r#"
set -eu
OUT=$1
KVER=$(ls /lib/modules | grep -- '-cloud-amd64$' | sort -V | tail -1)
K=/lib/modules/$KVER/kernel
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/initrd/bin" "$W/initrd/lib" "$W/initrd/proc" "$W/initrd/dev" "$W/initrd/newroot" \
  "$W/root/bin" "$W/root/proc" "$W/root/sys" "$W/root/dev" "$W/root/www" "$W/img"
cp /bin/busybox "$W/initrd/bin/busybox"
cp /bin/busybox "$W/root/bin/busybox"
cp $K/drivers/virtio/virtio_ring.ko $K/drivers/virtio/virtio.ko $K/drivers/virtio/virtio_mmio.ko \
   $K/drivers/block/virtio_blk.ko $K/net/core/failover.ko $K/drivers/net/net_failover.ko \
   $K/drivers/net/virtio_net.ko "$W/initrd/lib/"
cat > "$W/initrd/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
for m in virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net; do
  /bin/busybox insmod /lib/$m.ko || echo "initrd: insmod $m failed"
done
/bin/busybox mount -t ext4 /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; /bin/busybox poweroff -f; }
/bin/busybox umount /proc
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /init
INIT
cat > "$W/root/init" <<'INIT'
#!/bin/busybox sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
ip link set lo up
ip link set eth0 up
ip -6 addr add "$PHOENIX_IP/128" dev eth0
ip -6 route add fe80::1 dev eth0
ip -6 route add default via fe80::1 dev eth0
echo ok > /www/health
echo "$PHOENIX_NAME" > /www/name
echo "vm: $PHOENIX_NAME at [$PHOENIX_IP]:$PORT"
httpd -p "[::]:$PORT" -h /www
while :; do sleep 3600; done
INIT
chmod 755 "$W/initrd/init" "$W/root/init"
(cd "$W/initrd" && find . | cpio -o -H newc --quiet) > "$W/img/initrd"
cp /boot/vmlinuz-$KVER "$W/img/bzImage"
mkfs.ext4 -q -d "$W/root" "$W/img/rootfs.ext4" 16M >/dev/null
tar -C "$W/img" -c . | zstd -q -f -o "$OUT"
"#;

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if !is_root() {
        return Some("needs root".into());
    }
    let has = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for (program, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("mkfs.ext4", "e2fsprogs"),
        ("zstd", "zstd"),
        ("cpio", "cpio"),
    ] {
        if !has(program) {
            return Some(format!("needs {program} (apt-get install {package})"));
        }
    }
    let kernel = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
        });
    if !kernel {
        return Some(
            "needs Debian's cloud kernel in /boot (apt-get install linux-image-cloud-amd64)".into(),
        );
    }
    None
}

fn build_image(dir: &Path) -> PathBuf {
    let out = dir.join("web.zst");
    let made = Command::new("sh")
        .args(["-c", MKVM, "mkvm"])
        .arg(&out)
        .output()
        .expect("run sh");
    assert!(
        made.status.success(),
        "building the VM image failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    out
}

fn up(s: &Value) -> bool {
    s["state"] == "running" && s["health"] == "healthy"
}

/// Waits for `pred` on the service's status, up to `timeout` (a TCG boot
/// on a busy machine takes far longer than the harness's 20 s).
fn wait_status(c: &Cluster, name: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let began = Instant::now();
    let mut last = Value::Null;
    while began.elapsed() < timeout {
        let s = c.status(name);
        if pred(&s) {
            return s;
        }
        last = s;
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{name} not as wanted after {timeout:?}: {last}\nlog:\n{}",
        c.phoenix(&["logs", name]).stdout.escape_ascii()
    );
}

/// QEMU processes whose command line names `needle`.
fn qemus(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("/usr/bin/qemu-system") && c.contains(needle)
            })
        })
        .collect()
}

#[test]
fn a_vm_boots_serves_restarts_and_leaves_nothing() {
    require_netns!();
    if let Some(why) = missing() {
        eprintln!("SKIPPED: vm test {why}");
        return;
    }
    let began = Instant::now();
    let mut c = Cluster::master_only_on(Net::new(&["master", "m1", "m2"]));
    // A TCG boot takes seconds: no health failures count until then.
    let at = c
        .minion_flags
        .iter()
        .position(|f| f == "--health-grace-ms")
        .unwrap();
    c.minion_flags[at + 1] = "90000".into();
    let c = c.with_minions(2);
    let image = build_image(c.dir.path());
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
    assert_eq!(qemus("phoenix-vmweb"), vec![first as u32], "one QEMU: {s}");

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

    // Deleted: no QEMU, no tap, no per-start disk.
    let second = s["pid"].as_u64().unwrap();
    c.ok(&["del", "vmweb"]);
    wait_for("QEMU gone", Duration::from_secs(15), || {
        (!alive(second) && qemus("phoenix-vmweb").is_empty()).then_some(())
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
