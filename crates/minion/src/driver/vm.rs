//! The `vm` driver: a service of `type: "vm"` is a microVM, run by QEMU
//! (`qemu-system-x86_64 -M microvm`), one QEMU process per service and no
//! other process of ours beside it.
//!
//! Image: a VM image ([`phoenix_image::vm`]: a zstd tar holding a kernel,
//! `rootfs.ext4`, optionally an `initrd` and `config.json`), fetched and
//! hash-checked like any image. Prepare unpacks it once per image file into
//! `images/rootfs/vm-<hash>` (collected with the image, like an unpacked
//! container image). Each start copies `rootfs.ext4` into the run's work
//! directory (`cp --reflink=auto --sparse=always`: a reflink where the
//! filesystem has them), so every start boots from the image.
//!
//! Or an OCI image ([`oci_vm`]): the image file decides, one named `.zst`
//! or zstd inside is a VM image and anything else is opened as a
//! container image (`image:
//! app.tar:tag`, as for `docker`; the master checks both at deploy). Its
//! unpacked root filesystem (the oci driver's, per manifest digest) becomes
//! an ext4 disk (`mkfs.ext4 -d`, once, beside it), booted with the
//! minion's guest kernel (`--vm-kernel`, default Debian's cloud kernel)
//! and an initramfs holding the `phoenix` binary itself as the guest's
//! PID 1 (`phoenix guest-init`, with its libraries and the kernel's virtio
//! modules). The init runs the image's program as the oci driver would
//! (Entrypoint/Cmd or `args`, Env then `env`, WorkingDir, User), from a run
//! description the minion appends to the disk after its filesystem;
//! configures the network from the service's address; reaps; turns the
//! power button into SIGTERM to the program; and reports its exit code
//! through QEMU's `isa-debug-exit`, which is the run's exit (0 to 125
//! exactly, 126 for more or a signal), after recording it on the run's
//! disk too, where the driver reads it when QEMU's exit status says
//! nothing (a QEMU adopted after a minion restart is not its child).
//!
//! Acceleration, probed once at minion start: KVM when `/dev/kvm` opens
//! and a hardware-virtualisation module (`kvm_intel`, `kvm_amd`) is loaded;
//! TCG (QEMU's software emulation, several times slower) otherwise. A
//! `/dev/kvm` backed by `kvm_pvm` (paravirtualised, as on these CI
//! machines) does not run stock kernels, so it counts as none. Under TCG
//! the guest is told the TSC frequency (the host's, which TCG's TSC runs
//! at: `tsc_early_khz`) and skips the timer check: a Debian kernel without
//! it hangs calibrating against the (missing) PIT. The minion reports
//! which in its node stats (`vm_accel`: `kvm`, `tcg`, or `none` without
//! QEMU; a column of `phoenix nodes`), and `phoenix status` of a VM on a
//! TCG minion says it is slow (a `note`), never silently.
//!
//! Firecracker: where a `firecracker` binary is in `PATH` and KVM works,
//! an image whose kernel is a `vmlinux` boots with Firecracker instead,
//! configured through its API socket ([`firecracker`]); a bzImage still
//! boots with QEMU, as does everything under TCG.
//!
//! Sizing: `cpus` (rounded up) vCPUs, default the image's `config.json`
//! or 1. `memory` is the service's whole cgroup limit, which QEMU itself
//! must also fit in, so the guest gets `memory` minus 96 MiB (at least 64
//! MiB); without `memory`, the image's `memory_mib` or 256 MiB.
//!
//! Environment: the spec's `env` and Phoenix's variables (`PHOENIX_IP`,
//! `PHOENIX_NAME`, `PORT`, ...) go on the kernel command line as
//! `KEY=VALUE`; the kernel hands parameters it does not know to the
//! guest's init as environment variables. The kernel's limits hold: the
//! line is at most 2048 bytes, init gets at most 32 variables, a key with
//! a `.` would be a module parameter and a value cannot hold `"`; a start
//! that breaks them is refused, saying which.
//!
//! Network: QEMU is started in the service's network namespace (by the
//! same spawner as binaries). It creates a tap device `vm0` there and runs
//! the run's `ifup` script, which takes the service's IPv6 addresses off
//! `eth0`, routes them to `vm0` (the namespace forwards), answers
//! neighbour discovery for them on `eth0` with `eth0`'s MAC address
//! (proxy NDP), and gives `vm0` the address `fe80::1`: the guest owns the
//! service's address on its virtio-net device and has `fe80::1` as its
//! default route, so the host's route to the service, the firewall,
//! health checks and the proxy work as for any service, and the minion's
//! neighbour entry for the service stays valid (a bridge, the first
//! design, gave the address a new MAC address, and a health check that
//! had resolved it before the guest was up went nowhere for up to 30 s).
//! The tap and its routes go with QEMU; the proxy entries stay with the
//! namespace for the next start. The guest must configure its interface
//! from `PHOENIX_IP` itself (address/128, route to `fe80::1`, default via
//! `fe80::1`); IPv4 egress is not given to it yet.
//!
//! Console: the guest's serial port is a QEMU chardev writing to QEMU's
//! stdout, the service's log (QEMU's own errors go there too).
//!
//! Stop: SIGTERM becomes an ACPI power-button press (`system_powerdown`
//! on the run's QMP socket), so the guest can shut down cleanly; SIGKILL
//! follows after the stop timeout as for any service. The guest must act
//! on the button: with the kernel's `button` and `evdev` drivers the press
//! is an input event, which a busybox init can wait for (`dd` one event
//! from `/dev/input/event0`, then `poweroff -f`; the e2e test's image
//! does). A restarted minion adopts a running QEMU by pid and start time,
//! and finds its QMP socket (and, booting an OCI image, its disk) in its
//! command line.
//!
//! Boot: a VM with a health check has booted when the check first passes.
//! Until then its failures do not count and it is probed quickly; if it
//! has not passed within the boot timeout (`--vm-boot-timeout-ms`, 120 s,
//! enough for a TCG boot on a loaded machine) the guest never booted:
//! QEMU is killed (SIGKILL: a guest that did not boot heeds no power
//! button) and restarted with backoff like any failing start (such a run
//! never resets the backoff, however long it was), the status saying
//! `did not boot within N s`, and `phoenix status` showing the last lines
//! of its console. A VM without a health check cannot be told booted from
//! hung: it runs once it has stayed up the minion's minimum uptime.
//!
//! Out of memory: after a run ends, a guest kernel's `Out of memory` line
//! in what the run wrote to its console (its OOM killer, or the panic when
//! nothing is left to kill) makes its status say `out of memory in the
//! guest` with that line; QEMU itself killed by its cgroup's OOM killer
//! (over the service's `memory`) is found by the runner for every kind of
//! task (`oom_kill` in the cgroup's memory events) and said the same way.
//! A guest whose OOM killer ends a process it survives keeps running; the
//! line is in its log.

pub mod firecracker;
pub mod oci_vm;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use phoenix_host::{Host, Signal};
use phoenix_image::vm::{INITRD, ROOTFS, VmConfig};
use phoenix_model::proto::Assignment;

use super::{
    Artifact, BoxFuture, Capabilities, Driver, DriverError, DriverName, RunningTask, TaskConfig,
    TaskDir, TaskHandle,
};
use crate::process::{Launch, Proc, Target};
use crate::reaper;
use crate::state::RunRecord;
use phoenix_model::status::Exit;

/// What the minion says when QEMU is missing.
pub const QEMU_HELP: &str = "qemu-system-x86_64 is not installed on this minion; install it (Debian/Ubuntu: apt-get install qemu-system-x86) to run services of type vm";

/// The most bytes a VM image may unpack to.
const MAX_IMAGE_BYTES: u64 = 64 << 30;
/// x86's `COMMAND_LINE_SIZE`.
const MAX_CMDLINE: usize = 2048;
/// The kernel's `MAX_INIT_ENVS` (32) less what it sets itself (HOME, TERM).
const MAX_GUEST_ENV: usize = 30;
/// What QEMU itself needs beside the guest's memory, within `memory`.
const QEMU_OVERHEAD_MIB: u64 = 96;
const DEFAULT_MEMORY_MIB: u64 = 256;
/// The tap device QEMU makes in the service's namespace.
const TAP: &str = "vm0";

/// How the guest's CPU is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation: works anywhere, several times slower.
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` opens and a hardware-virtualisation module is
    /// loaded; TCG otherwise (see the module header for `kvm_pvm`).
    pub fn probe() -> Accel {
        let hw = ["kvm_intel", "kvm_amd"]
            .iter()
            .any(|m| Path::new("/sys/module").join(m).exists());
        let opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if hw && opens { Accel::Kvm } else { Accel::Tcg }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How the minion runs VMs (its `--vm-*` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSettings {
    /// How long a VM with a health check has to pass it after a start
    /// (see [`Driver::boot_timeout`]).
    pub boot_timeout: Duration,
    /// The guest kernel OCI images boot with (`--vm-kernel`); `None`:
    /// Debian's cloud kernel ([`oci_vm::default_kernel`]).
    pub kernel: Option<PathBuf>,
}

/// A TCG boot of a stock kernel takes 2 to 60 s on a loaded machine.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

impl Default for VmSettings {
    fn default() -> Self {
        VmSettings {
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            kernel: None,
        }
    }
}

/// What a guest kernel prints when it runs out of memory: its OOM killer
/// ("Out of memory: Killed process 93 (dd) ..."), or the panic when
/// nothing is left to kill ("Out of memory and no killable processes").
const GUEST_OOM: &str = "Out of memory";

/// The guest's out-of-memory line in `log`, if there is one, as a status
/// message: the last one, without the kernel's timestamp.
fn guest_oom(log: &str) -> Option<String> {
    let line = log.lines().rev().find(|l| l.contains(GUEST_OOM))?;
    let line = line.trim();
    let line = match line.strip_prefix('[').and_then(|r| r.split_once(']')) {
        Some((_, rest)) => rest.trim(),
        None => line,
    };
    let line: String = line.chars().take(200).collect();
    Some(format!("out of memory in the guest (its kernel: {line:?})"))
}

/// What prepare kept beside the unpacked image.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Unpacked {
    kernel: String,
    initrd: bool,
    config: VmConfig,
}

pub struct VmDriver {
    host: Arc<dyn Host>,
    qemu: Option<PathBuf>,
    accel: Accel,
    settings: VmSettings,
    /// `images/rootfs`: unpacked images, `vm-<image hash>` each.
    rootfs_dir: PathBuf,
    /// The host's TSC frequency (kHz), for TCG guests.
    tsc_khz: Option<u64>,
    unpacking: std::sync::Mutex<std::collections::HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// OCI images booted as VMs ([`oci_vm`]); `None`: refused.
    oci_vm: Option<Arc<oci_vm::OciVm>>,
    /// Firecracker, when it is in `PATH` and KVM works: it boots images
    /// whose kernel is a `vmlinux` ([`firecracker`]).
    firecracker: Option<PathBuf>,
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The host's TSC frequency in kHz, from `/proc/cpuinfo` (x86).
fn host_tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

impl VmDriver {
    /// The driver, with QEMU found in `PATH` and the accelerator probed,
    /// keeping unpacked images under `data_dir/images/rootfs`.
    pub fn new(data_dir: &Path, host: Arc<dyn Host>, settings: VmSettings) -> VmDriver {
        let mut d = VmDriver {
            host,
            qemu: find_in_path("qemu-system-x86_64"),
            accel: Accel::probe(),
            settings,
            rootfs_dir: data_dir.join("images").join("rootfs"),
            tsc_khz: host_tsc_khz(),
            unpacking: Default::default(),
            oci_vm: None,
            firecracker: None,
        };
        d.firecracker = find_in_path("firecracker").filter(|_| d.accel == Accel::Kvm);
        if let Some(fc) = &d.firecracker {
            tracing::info!(firecracker = %fc.display(), "vm images with a vmlinux boot with Firecracker");
        }
        match &d.qemu {
            Some(q) => tracing::info!(
                qemu = %q.display(),
                accel = d.accel.as_str(),
                boot_timeout_ms = d.settings.boot_timeout.as_millis() as u64,
                "vm runtime{}",
                if d.accel == Accel::Tcg {
                    ": no hardware virtualisation here, so QEMU's software emulation (TCG), several times slower"
                } else {
                    ""
                }
            ),
            None => tracing::info!("{QEMU_HELP}"),
        }
        d
    }

    /// A driver that runs no VM (for minions built without one, and tests).
    pub fn absent(host: Arc<dyn Host>) -> VmDriver {
        VmDriver {
            host,
            qemu: None,
            accel: Accel::Tcg,
            settings: VmSettings::default(),
            rootfs_dir: PathBuf::new(),
            tsc_khz: None,
            unpacking: Default::default(),
            oci_vm: None,
            firecracker: None,
        }
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    async fn unpacked(&self, image: &Path) -> Result<PathBuf, String> {
        let lock = self
            .unpacking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(image.to_owned())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let image = image.to_owned();
        let dir = self.rootfs_dir.clone();
        tokio::task::spawn_blocking(move || unpack_cached(&image, &dir))
            .await
            .map_err(|e| e.to_string())?
    }

    async fn start_vm(&self, task: TaskConfig<'_>) -> Result<TaskHandle, String> {
        let qemu = self.qemu.as_ref().ok_or(QEMU_HELP)?;
        let place = &task.artifact.path;
        let info: Unpacked = std::fs::read(place.join("vm.json"))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .ok_or_else(|| format!("{} holds no unpacked VM image", place.display()))?;
        let work = task.work_dir;
        let disk = fresh_disk(work, &place.join(ROOTFS)).await?;
        let ifup = work.join("ifup");
        if task.network.is_some() {
            std::fs::write(&ifup, IFUP)
                .and_then(|()| {
                    std::fs::set_permissions(&ifup, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(|e| format!("write {}: {e}", ifup.display()))?;
        }
        let spec = &task.assignment.spec;
        let mut env: Vec<(String, String)> = task.assignment.env_pairs();
        env.extend(task.env.iter().cloned());
        let plan = Plan {
            kernel: place.join(&info.kernel),
            initrd: info.initrd.then(|| place.join(INITRD)),
            disk,
            qmp: work.join("qmp.sock"),
            ifup: task.network.is_some().then_some(ifup),
            cmdline: cmdline(self.accel, self.tsc_khz, &info.config, &env)?,
            memory_mib: memory_mib(spec.memory, &info.config),
            cpus: spec
                .cpus
                .map(|c| c.ceil().max(1.0) as u32)
                .or(info.config.cpus)
                .unwrap_or(1),
            accel: self.accel,
            name: task.name().to_owned(),
        };
        if let Some(fc) = self
            .firecracker
            .as_ref()
            .filter(|_| info.kernel == "vmlinux")
        {
            return self.start_firecracker(fc, task, plan).await;
        }
        let args = plan.args();
        self.spawn_qemu(qemu, &args, task, plan.qmp, |vm| Box::new(vm))
    }

    /// Starts QEMU with `args` in the task's network namespace and
    /// cgroups, its output into the service's log; `wrap` makes the
    /// running task of the VM (`qmp`: its QMP socket, for the power
    /// button).
    fn spawn_qemu(
        &self,
        qemu: &Path,
        args: &[String],
        task: TaskConfig<'_>,
        qmp: PathBuf,
        wrap: impl FnOnce(VmProc) -> Box<dyn RunningTask>,
    ) -> Result<TaskHandle, String> {
        let proc = Proc::spawn(
            self.host.clone(),
            Launch {
                program: qemu,
                arg0: None,
                args,
                env: vec![("PATH".to_owned(), super::exec::DEFAULT_PATH.to_owned())],
                cwd: task.work_dir,
                log: task.log,
                cgroup: task.cgroup.as_deref(),
                netns: task.network.map(|n| n.netns),
                hosts_file: None,
            },
        )
        .map_err(|e| e.to_string())?;
        let pid = proc.pid().unwrap_or(0);
        Ok(TaskHandle {
            pid,
            start_time: self.host.process_start_time(pid).unwrap_or(0),
            process: wrap(VmProc {
                proc,
                qmp: Some(qmp),
            }),
        })
    }
}

impl VmDriver {
    /// Boots `plan` with Firecracker (see [`firecracker`]).
    async fn start_firecracker(
        &self,
        fc: &Path,
        task: TaskConfig<'_>,
        plan: Plan,
    ) -> Result<TaskHandle, String> {
        let sock = task.work_dir.join("fc.sock");
        let _ = std::fs::remove_file(&sock);
        let network = plan.ifup.is_some();
        let id = format!("phoenix-{}", plan.name);
        let args = vec![
            "-c".to_owned(),
            firecracker::launch_script(fc, &sock, &id, plan.ifup.as_deref()),
        ];
        let mut proc = Proc::spawn(
            self.host.clone(),
            Launch {
                program: Path::new("/bin/sh"),
                arg0: None,
                args: &args,
                env: vec![("PATH".to_owned(), super::exec::DEFAULT_PATH.to_owned())],
                cwd: task.work_dir,
                log: task.log,
                cgroup: task.cgroup.as_deref(),
                netns: task.network.map(|n| n.netns),
                hosts_file: None,
            },
        )
        .map_err(|e| e.to_string())?;
        let pid = proc.pid().unwrap_or(0);
        let vm = firecracker::FcVm {
            kernel: plan.kernel,
            initrd: plan.initrd,
            // Firecracker's guests reboot through the keyboard controller
            // (which ends Firecracker) and have no PCI.
            boot_args: format!("{} reboot=k pci=off", plan.cmdline),
            rootfs: plan.disk,
            network,
            vcpus: plan.cpus,
            mem_mib: plan.memory_mib,
        };
        let requests = firecracker::boot_requests(&vm);
        let at = sock.clone();
        let configured = tokio::task::spawn_blocking(move || {
            firecracker::configure(&at, &requests, Duration::from_secs(10))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Err(e) = configured {
            proc.signal(libc::SIGKILL);
            let _ = proc.wait().await;
            return Err(e);
        }
        Ok(TaskHandle {
            pid,
            start_time: self.host.process_start_time(pid).unwrap_or(0),
            process: Box::new(FcProc { proc, sock }),
        })
    }
}

/// A running Firecracker: SIGTERM is Ctrl-Alt-Del to the guest.
struct FcProc {
    proc: Proc,
    sock: PathBuf,
}

impl RunningTask for FcProc {
    fn wait(&mut self) -> BoxFuture<'_, Exit> {
        Box::pin(self.proc.wait())
    }

    fn signal(&self, signal: i32) {
        if signal == libc::SIGTERM {
            match firecracker::send(&self.sock, &firecracker::stop_request()) {
                Ok(()) => return,
                Err(e) => tracing::info!("{e}; sending SIGTERM to Firecracker"),
            }
        }
        self.proc.signal(signal);
    }
}

/// Run by QEMU in the service's namespace with the tap's name: gives the
/// service's IPv6 addresses to the guest, which the namespace routes to
/// through the tap, and answers neighbour discovery for them on `eth0`
/// (proxy NDP, at once) with `eth0`'s own MAC address. So the minion's
/// neighbour entry for the service, made before QEMU ran, stays right: a
/// bridge (which this replaced) gave the address a new MAC address, and
/// the minion's stale entry kept health checks from reaching the guest for
/// up to 30 s. The tap holds `fe80::1`, the guest's gateway, and resolves
/// the guest's address every 10 ms while it is unresolved (not every
/// second: a solicitation sent while the guest booted held the first
/// answer back by up to a second; bench/vm.sh measured +0.5 s). On a restart
/// the addresses are the proxy entries the last start left.
const IFUP: &str = r#"#!/bin/sh
set -e
own=$(ip -6 -o addr show dev eth0 scope global | sed -n 's|.* inet6 \([^ ]*\) .*|\1|p')
addrs=$( (for a in $own; do echo "${a%/*}"; done
          ip -6 neigh show proxy dev eth0 | cut -d' ' -f1) | sort -u)
echo 1 > /proc/sys/net/ipv6/conf/all/forwarding
echo 1 > /proc/sys/net/ipv6/conf/eth0/proxy_ndp
echo 0 > /proc/sys/net/ipv6/neigh/eth0/proxy_delay
ip link set "$1" up
echo 10 > /proc/sys/net/ipv6/neigh/"$1"/retrans_time_ms
ip -6 addr add fe80::1/64 dev "$1" nodad
for a in $own; do ip -6 addr del "$a" dev eth0; done
for a in $addrs; do
  ip -6 neigh replace proxy "$a" dev eth0
  ip -6 route replace "$a/128" dev "$1"
done
"#;

/// Everything a QEMU command line is made from.
struct Plan {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    disk: PathBuf,
    qmp: PathBuf,
    /// The network script; `None`: no network device.
    ifup: Option<PathBuf>,
    cmdline: String,
    memory_mib: u64,
    cpus: u32,
    accel: Accel,
    name: String,
}

impl Plan {
    fn args(&self) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        let mut a: Vec<String> = vec!["-name".into(), format!("phoenix-{}", self.name)];
        a.extend(["-M".into(), "microvm".into()]);
        match self.accel {
            Accel::Kvm => a.extend(["-accel", "kvm", "-cpu", "host"].map(String::from)),
            Accel::Tcg => a.extend(["-accel", "tcg,tb-size=32", "-cpu", "max"].map(String::from)),
        }
        a.extend([
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
        ]);
        a.extend(
            [
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                "-chardev",
                "file,id=con,path=/proc/self/fd/1",
                "-serial",
                "chardev:con",
            ]
            .map(String::from),
        );
        a.extend(["-kernel".into(), p(&self.kernel)]);
        if let Some(i) = &self.initrd {
            a.extend(["-initrd".into(), p(i)]);
        }
        a.extend(["-append".into(), self.cmdline.clone()]);
        a.extend([
            "-drive".into(),
            format!("id=root,file={},format=raw,if=none", qemu_path(&self.disk)),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
        ]);
        match &self.ifup {
            Some(ifup) => a.extend([
                "-netdev".into(),
                format!(
                    "tap,id=n0,ifname={TAP},script={},downscript=no",
                    qemu_path(ifup)
                ),
                "-device".into(),
                "virtio-net-device,netdev=n0".into(),
            ]),
            None => a.extend(["-nic".into(), "none".into()]),
        }
        a.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qemu_path(&self.qmp)),
        ]);
        a
    }
}

/// A path inside a QEMU option list, where a comma is written twice.
/// The disk one start boots from: the run's work directory emptied, then
/// the image's disk copied in as `disk.ext4` (a reflink where the
/// filesystem has them, sparse otherwise), so every start begins from the
/// image.
async fn fresh_disk(work: &Path, image_disk: &Path) -> Result<PathBuf, String> {
    cleanup(work);
    let disk = work.join("disk.ext4");
    let mut cp = Command::new("cp");
    cp.args(["--reflink=auto", "--sparse=always"])
        .arg(image_disk)
        .arg(&disk);
    let what = image_disk.file_name().unwrap_or_default().to_string_lossy();
    let (exit, err) = reaper::run(&mut cp)
        .await
        .map_err(|e| format!("copy {what}: {e}"))?;
    if exit.code != Some(0) {
        return Err(format!("copy {what}: {}", err.trim()));
    }
    Ok(disk)
}

fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The guest's memory in MiB: see the module header.
fn memory_mib(spec_bytes: Option<u64>, config: &VmConfig) -> u64 {
    match spec_bytes {
        Some(b) => ((b >> 20).saturating_sub(QEMU_OVERHEAD_MIB)).max(64),
        None => config.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
    }
}

/// The kernel command line: console and root, the TCG timing hints, the
/// image's own arguments, then the environment (later keys win).
fn cmdline(
    accel: Accel,
    tsc_khz: Option<u64>,
    config: &VmConfig,
    env: &[(String, String)],
) -> Result<String, String> {
    let mut line = String::from("console=ttyS0 root=/dev/vda rw panic=-1 quiet");
    if accel == Accel::Tcg {
        if let Some(khz) = tsc_khz {
            line.push_str(&format!(" tsc_early_khz={khz}"));
        }
        line.push_str(" no_timer_check");
    }
    if let Some(extra) = &config.cmdline {
        line.push(' ');
        line.push_str(extra);
    }
    let mut vars: Vec<(&str, &str)> = Vec::new();
    for (k, v) in env {
        vars.retain(|(key, _)| key != k);
        vars.push((k, v));
    }
    if vars.len() > MAX_GUEST_ENV {
        return Err(format!(
            "{} environment variables, but the kernel passes at most {MAX_GUEST_ENV} to the guest's init",
            vars.len()
        ));
    }
    for (k, v) in vars {
        if k.contains('.') || k.contains(' ') {
            return Err(format!(
                "env {k:?}: a kernel parameter name cannot hold '.' or a space"
            ));
        }
        if v.contains('"') || v.chars().any(char::is_control) {
            return Err(format!(
                "env {k}: a value on the kernel command line cannot hold '\"' or control characters"
            ));
        }
        if v.contains(' ') || v.is_empty() {
            line.push_str(&format!(" {k}=\"{v}\""));
        } else {
            line.push_str(&format!(" {k}={v}"));
        }
    }
    if line.len() >= MAX_CMDLINE {
        return Err(format!(
            "the kernel command line would be {} bytes, over the limit of {MAX_CMDLINE}; shorten env",
            line.len()
        ));
    }
    Ok(line)
}

/// Unpacks a VM image once per image file into `dir/vm-<hash>`.
fn unpack_cached(image: &Path, dir: &Path) -> Result<PathBuf, String> {
    let hash = image
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{}: not a cached image", image.display()))?;
    let place = dir.join(format!("vm-{hash}"));
    let mark = |place: &Path| {
        let _ = std::fs::write(
            place.join(format!("{}{hash}", super::oci::ROOTFS_MARK)),
            b"",
        );
    };
    if std::fs::read(place.join("vm.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<Unpacked>(&t).ok())
        .is_some()
    {
        mark(&place);
        return Ok(place);
    }
    let tmp = dir.join(format!(".unpack-vm-{hash}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let info = phoenix_image::vm::unpack(image, &tmp, MAX_IMAGE_BYTES)
        .map_err(|e| format!("not a VM image phoenix can boot: {e}"))?;
    let saved = Unpacked {
        kernel: info.kernel.to_owned(),
        initrd: info.has_initrd,
        config: info.config,
    };
    let write = std::fs::write(
        tmp.join("vm.json"),
        serde_json::to_vec(&saved).unwrap_or_default(),
    );
    if let Err(e) = write.and_then(|()| {
        let _ = std::fs::remove_dir_all(&place);
        std::fs::rename(&tmp, &place)
    }) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!("store unpacked image in {}: {e}", place.display()));
    }
    mark(&place);
    tracing::info!(image = hash, "vm image unpacked");
    Ok(place)
}

/// What a run leaves in its work directory.
fn cleanup(work: &Path) {
    for f in ["disk.ext4", "ifup", "qmp.sock", "fc.sock"] {
        let _ = std::fs::remove_file(work.join(f));
    }
}

/// A running QEMU: SIGTERM is the ACPI power button.
struct VmProc {
    proc: Proc,
    qmp: Option<PathBuf>,
}

impl RunningTask for VmProc {
    fn wait(&mut self) -> BoxFuture<'_, Exit> {
        Box::pin(self.proc.wait())
    }

    fn signal(&self, signal: i32) {
        if signal == libc::SIGTERM
            && let Some(qmp) = &self.qmp
        {
            match powerdown(qmp) {
                Ok(()) => return,
                Err(e) => tracing::info!(
                    "ACPI powerdown through {}: {e}; sending SIGTERM to QEMU",
                    qmp.display()
                ),
            }
        }
        self.proc.signal(signal);
    }
}

/// Presses the guest's power button over QMP. Blocking, on a local socket
/// QEMU serves from its main loop; bounded by short timeouts.
fn powerdown(qmp: &Path) -> std::io::Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(qmp)?;
    let t = Some(Duration::from_millis(500));
    s.set_read_timeout(t)?;
    s.set_write_timeout(t)?;
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"system_powerdown\"}\n")?;
    // The greeting and two answers; an error answer is an error.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.iter().filter(|&&b| b == b'\n').count() < 3 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    if text.contains("\"error\"") {
        return Err(std::io::Error::other(text.trim().to_owned()));
    }
    Ok(())
}

/// The QMP socket named in a QEMU's command line (`-qmp unix:PATH,...`).
fn qmp_of(pid: u32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|&b| b == 0);
    args.by_ref().find(|a| *a == b"-qmp")?;
    let spec = std::str::from_utf8(args.next()?).ok()?;
    let path = spec.strip_prefix("unix:")?.split(",server").next()?;
    Some(PathBuf::from(path.replace(",,", ",")))
}

impl Driver for VmDriver {
    fn name(&self) -> DriverName {
        DriverName::Vm
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            artifact_in_image_cache: true,
        }
    }

    fn prepare<'a>(
        &'a self,
        image: &'a Path,
        a: &'a Assignment,
    ) -> BoxFuture<'a, Result<Artifact, DriverError>> {
        Box::pin(async move {
            if self.qemu.is_none() {
                return Err(DriverError::Vm(QEMU_HELP.into()));
            }
            if !oci_vm::is_vm_image(image, &a.spec) {
                // Neither named .zst nor zstd: an OCI image to boot.
                let (_, tag) = a.spec.registry_file();
                let path = self.prepare_oci(image, tag.as_deref()).await;
                return Ok(Artifact {
                    path: path.map_err(DriverError::Vm)?,
                });
            }
            let path = self.unpacked(image).await.map_err(DriverError::Vm)?;
            Ok(Artifact { path })
        })
    }

    fn start<'a>(&'a self, task: TaskConfig<'a>) -> BoxFuture<'a, Result<TaskHandle, DriverError>> {
        Box::pin(async move {
            if oci_vm::is_oci_artifact(&task.artifact.path) {
                return self.start_oci(task).await.map_err(DriverError::Vm);
            }
            self.start_vm(task).await.map_err(DriverError::Vm)
        })
    }

    fn boot_timeout(&self) -> Option<Duration> {
        Some(self.settings.boot_timeout)
    }

    fn log_explainer(&self) -> Option<fn(&str) -> Option<String>> {
        Some(guest_oom)
    }

    fn accelerator(&self) -> Option<&'static str> {
        Some(match self.qemu {
            None => "none",
            Some(_) => self.accel.as_str(),
        })
    }

    fn recover(&self, record: &RunRecord) -> Option<TaskHandle> {
        let proc = Proc::adopt(
            self.host.clone(),
            record.pid,
            record.start_time,
            Target::Group,
        )?;
        let process: Box<dyn RunningTask> = match firecracker::api_sock_of(record.pid) {
            Some(sock) => Box::new(FcProc { proc, sock }),
            None => oci_vm::adopted(
                record.pid,
                VmProc {
                    proc,
                    qmp: qmp_of(record.pid),
                },
            ),
        };
        Some(TaskHandle {
            pid: record.pid,
            start_time: record.start_time,
            process,
        })
    }

    fn destroy<'a>(&'a self, dir: TaskDir<'a>, task: Option<TaskHandle>) -> BoxFuture<'a, ()> {
        if let Some(task) = task {
            let _ = self.host.signal_group(task.pid, Signal::KILL);
        }
        cleanup(dir.work_dir);
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_carries_the_environment() {
        let env = [
            ("A".to_owned(), "1".to_owned()),
            ("PHOENIX_IP".to_owned(), "fd38:dde8:32dd:1::7".to_owned()),
            ("A".to_owned(), "two words".to_owned()),
        ];
        let config = VmConfig {
            cmdline: Some("init=/sbin/init".into()),
            ..Default::default()
        };
        let line = cmdline(Accel::Tcg, Some(2_000_000), &config, &env).unwrap();
        assert_eq!(
            line,
            "console=ttyS0 root=/dev/vda rw panic=-1 quiet tsc_early_khz=2000000 no_timer_check \
             init=/sbin/init PHOENIX_IP=fd38:dde8:32dd:1::7 A=\"two words\""
        );
        let kvm = cmdline(Accel::Kvm, Some(1), &VmConfig::default(), &[]).unwrap();
        assert!(!kvm.contains("tsc"), "{kvm}");
        let bad = |k: &str, v: &str| {
            cmdline(
                Accel::Kvm,
                None,
                &VmConfig::default(),
                &[(k.into(), v.into())],
            )
            .unwrap_err()
        };
        assert!(bad("a.b", "1").contains("'.'"));
        assert!(bad("A", "say \"hi\"").contains("'\"'"));
        assert!(bad("A", &"x".repeat(3000)).contains("over the limit of 2048"));
        let many: Vec<(String, String)> =
            (0..40).map(|i| (format!("V{i}"), "1".to_owned())).collect();
        assert!(
            cmdline(Accel::Kvm, None, &VmConfig::default(), &many)
                .unwrap_err()
                .contains("at most 30")
        );
    }

    #[test]
    fn a_guest_oom_in_the_console_is_reported() {
        let log = "vm: web at [fd38::7]:8080\n\
                   [   12.345678] Out of memory: Killed process 93 (dd) total-vm:266340kB, anon-rss:120000kB\n\
                   vm: dd ended\n";
        assert_eq!(
            guest_oom(log).unwrap(),
            "out of memory in the guest (its kernel: \"Out of memory: Killed process 93 (dd) total-vm:266340kB, anon-rss:120000kB\")"
        );
        assert_eq!(guest_oom("vm: fine\n"), None);
        let d = VmDriver::absent(Arc::new(phoenix_host::Linux));
        assert_eq!(d.accelerator(), Some("none"));
        assert!(d.log_explainer().is_some());
        assert_eq!(d.boot_timeout(), Some(DEFAULT_BOOT_TIMEOUT));
    }

    #[test]
    fn memory_leaves_room_for_qemu() {
        let c = VmConfig {
            memory_mib: Some(512),
            ..Default::default()
        };
        assert_eq!(memory_mib(None, &c), 512);
        assert_eq!(memory_mib(None, &VmConfig::default()), 256);
        assert_eq!(memory_mib(Some(1 << 30), &c), 1024 - 96);
        assert_eq!(memory_mib(Some(100 << 20), &c), 64);
    }

    #[test]
    fn qemu_args() {
        let plan = Plan {
            kernel: "/i/bzImage".into(),
            initrd: Some("/i/initrd".into()),
            disk: "/w/a,b/disk.ext4".into(),
            qmp: "/w/qmp.sock".into(),
            ifup: Some("/w/ifup".into()),
            cmdline: "console=ttyS0".into(),
            memory_mib: 256,
            cpus: 2,
            accel: Accel::Tcg,
            name: "web".into(),
        };
        let a = plan.args().join(" ");
        assert!(
            a.contains("-M microvm -accel tcg,tb-size=32 -cpu max -m 256 -smp 2"),
            "{a}"
        );
        assert!(a.contains("file=/w/a,,b/disk.ext4,format=raw"), "{a}");
        assert!(
            a.contains("tap,id=n0,ifname=vm0,script=/w/ifup,downscript=no"),
            "{a}"
        );
        assert!(a.contains("-initrd /i/initrd -append console=ttyS0"), "{a}");
        assert!(
            a.ends_with("-qmp unix:/w/qmp.sock,server=on,wait=off"),
            "{a}"
        );
    }

    #[tokio::test]
    async fn without_qemu_a_vm_is_refused_naming_the_package() {
        let d = VmDriver::absent(Arc::new(phoenix_host::Linux));
        let spec = phoenix_model::spec::parse_specs(
            "t",
            r#"{"machine":"m","name":"v","type":"vm","image":"v.zst"}"#,
        )
        .unwrap()
        .remove(0);
        let a = Assignment {
            spec,
            ip: phoenix_model::net::service_ip(0),
            image_hash: String::new(),
            image_size: 0,
            generation: 1,
            links: Default::default(),
            instance: None,
            own_ip: None,
            holds_ip: true,
            env: None,
        };
        let err = d
            .prepare(Path::new("/nonexistent"), &a)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("apt-get install qemu-system-x86"), "{err}");
    }
}
