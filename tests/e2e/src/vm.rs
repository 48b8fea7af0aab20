//! VM images for the VM tests, built from this machine's Debian cloud
//! kernel and busybox: an initrd that loads the virtio, evdev and ACPI
//! button modules and switches to `/dev/vda`; an ext4 root made with
//! `mkfs.ext4 -d` whose init takes its address from `PHOENIX_IP` on the
//! kernel command line, powers off when the ACPI power button is pressed,
//! and then runs the tail the test gives (such as [`WEB`]). And what the
//! tests of VMs share: waiting on a slow boot, finding QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Cluster;

/// Why this machine cannot build these images and run them, if it cannot.
pub fn image_test_missing() -> Option<String> {
    crate::vm_test_missing(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("mkfs.ext4", "e2fsprogs"),
        ("zstd", "zstd"),
        ("cpio", "cpio"),
    ])
}

/// Builds a VM image at `$1` whose root init ends with the script `$2`,
/// with `$3` as its `config.json` if given (see the module header).
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
   $K/drivers/net/virtio_net.ko $K/drivers/input/evdev.ko $K/drivers/acpi/button.ko "$W/initrd/lib/"
cat > "$W/initrd/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
for m in virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net evdev button; do
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
# The ACPI power button (its only input device) powers the guest off.
for e in /dev/input/event*; do
  (dd if="$e" of=/dev/null bs=24 count=1 2>/dev/null
   echo "vm: power button pressed, powering off"
   poweroff -f) &
done
if [ -e /sys/class/net/eth0 ]; then
  echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
  ip link set lo up
  ip link set eth0 up
  ip -6 addr add "$PHOENIX_IP/128" dev eth0
  ip -6 route add fe80::1 dev eth0
  ip -6 route add default via fe80::1 dev eth0
fi
INIT
cat "$2" >> "$W/root/init"
if [ -n "${3:-}" ]; then cp "$3" "$W/img/config.json"; fi
chmod 755 "$W/initrd/init" "$W/root/init"
(cd "$W/initrd" && find . | cpio -o -H newc --quiet) > "$W/img/initrd"
if [ -n "${VMLINUX:-}" ]; then cp "$VMLINUX" "$W/img/vmlinux"; else cp /boot/vmlinuz-$KVER "$W/img/bzImage"; fi
mkfs.ext4 -q -d "$W/root" "$W/img/rootfs.ext4" 16M >/dev/null
tar -C "$W/img" -c . | zstd -q -f -o "$OUT"
"#;

/// `web`: serves `/health` and `/name` with busybox httpd.
pub const WEB: &str = r#"
echo ok > /www/health
echo "$PHOENIX_NAME" > /www/name
echo "vm: $PHOENIX_NAME at [$PHOENIX_IP]:$PORT"
httpd -p "[::]:$PORT" -h /www
while :; do sleep 3600; done
"#;

/// Builds image `name` at `dir/NAME.zst`, its init ending with `tail`
/// (see the module header), with `config` as its `config.json` if given.
pub fn build_image(dir: &Path, name: &str, tail: &str, config: Option<&str>) -> PathBuf {
    build_image_with(dir, name, tail, config, None)
}

/// [`build_image`], with `vmlinux` as its kernel rather than the cloud
/// kernel's bzImage.
pub fn build_image_with(
    dir: &Path,
    name: &str,
    tail: &str,
    config: Option<&str>,
    vmlinux: Option<&Path>,
) -> PathBuf {
    let out = dir.join(format!("{name}.zst"));
    let init = dir.join(format!("{name}.init"));
    std::fs::write(&init, tail).unwrap();
    let mut sh = Command::new("sh");
    sh.args(["-c", MKVM, "mkvm"]).arg(&out).arg(&init);
    if let Some(k) = vmlinux {
        sh.env("VMLINUX", k);
    }
    if let Some(config) = config {
        let file = dir.join(format!("{name}.config.json"));
        std::fs::write(&file, config).unwrap();
        sh.arg(file);
    }
    let made = sh.output().expect("run sh");
    assert!(
        made.status.success(),
        "building the VM image failed: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    out
}

/// Running, and its health check passed.
pub fn up(s: &Value) -> bool {
    s["state"] == "running" && s["health"] == "healthy"
}

/// Waits for `pred` on the service's status, up to `timeout` (a TCG boot
/// on a busy machine takes far longer than the harness's 20 s).
pub fn wait_status(
    c: &Cluster,
    name: &str,
    timeout: Duration,
    mut pred: impl FnMut(&Value) -> bool,
) -> Value {
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

/// QEMU processes of this cluster whose command line names `needle`.
pub fn qemus(c: &Cluster, needle: &str) -> Vec<u32> {
    // Only this cluster's: another test may run a VM of the same name.
    let dir = c.dir.path().to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("/usr/bin/qemu-system") && c.contains(needle) && c.contains(&dir)
            })
        })
        .collect()
}
