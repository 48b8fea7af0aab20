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
const MKVM: &str = include_str!("mkvm.sh");

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
