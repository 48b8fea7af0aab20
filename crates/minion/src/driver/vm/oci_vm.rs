//! OCI images booted as VMs: `type: "vm"` naming a container image file
//! (`image: app.tar:tag`, as for `docker`).
//!
//! The image file decides: one named `.zst` or zstd inside is a VM image
//! (the parent module), anything else is opened as an OCI image (a layout tar or directory,
//! `docker image save` output).
//!
//! **Prepare**, once per image: the oci driver's unpacker makes the root
//! filesystem (`images/rootfs/<manifest digest>/rootfs`, shared with
//! containers of the same image, hostile layers refused there), and
//! `mkfs.ext4 -d` turns it into `vm-root.ext4` beside it (no mounting;
//! sized from the content plus room to write, sparse), so it is collected
//! with the image like the rootfs. Once per minion run, the guest
//! initramfs is built into `vm/initramfs.cpio`: the running `phoenix`
//! binary as `/init` (cut to its loaded segments, see
//! [`phoenix_image::initramfs::strip_sections`]), its ELF interpreter and
//! libraries (as `ld.so --list` names them, at their own paths: the binary
//! is linked against glibc), the kernel's virtio, power-button and evdev
//! modules ([`phoenix_image::guest::MODULES`], found through `modules.dep`
//! of the kernel's release, read from the bzImage header), and
//! `/dev/console`.
//!
//! **Kernel**: `--vm-kernel PATH`, else the newest
//! `/boot/vmlinuz-*-cloud-amd64` (Debian's `linux-image-cloud-amd64`).
//!
//! **Start**: the disk is copied into the run's work directory (as for a
//! VM image), the run description ([`GuestRun`]: Entrypoint/Cmd or the
//! spec's `args`, the image's Env then the spec's `env` then Phoenix's
//! variables, WorkingDir, User resolved against the image's `/etc/passwd`,
//! the service's hosts file) is appended after the filesystem, and QEMU
//! boots the kernel with the initramfs, `-- guest-init` on the command
//! line and an `isa-debug-exit` device, through which the guest reports
//! the program's exit code ([`phoenix_image::guest::decode_exit`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use phoenix_image::guest::{self, GuestRun};
use phoenix_image::initramfs::{self as ird, CpioWriter};
use phoenix_image::vm::VmConfig;
use phoenix_model::status::Exit;

use super::{IFUP, Plan, VmDriver, VmProc, cmdline, fresh_disk, memory_mib};
use crate::driver::oci::{ImageSettings, OciDriver, resolve_user};
use crate::driver::{BoxFuture, RunningTask, TaskConfig, TaskHandle};
use crate::reaper;

/// The root disk made from an unpacked OCI image, beside its `rootfs`.
pub const DISK: &str = "vm-root.ext4";
/// What the minion says when it has no guest kernel.
pub const NO_KERNEL: &str = "no guest kernel to boot OCI images with: install Debian's linux-image-cloud-amd64 (apt-get install linux-image-cloud-amd64), or start the minion with --vm-kernel PATH";
const MKFS_HELP: &str = "mkfs.ext4 is not installed on this minion; install it (Debian/Ubuntu: apt-get install e2fsprogs) to run OCI images as VMs";
/// The device through which the guest reports its program's exit code.
const DEBUG_EXIT: &str = "isa-debug-exit,iobase=0xf4,iosize=0x01";

/// What OCI images need beside the VM driver's own state.
pub struct OciVm {
    oci: Arc<OciDriver>,
    kernel: Option<PathBuf>,
    /// `DATA_DIR/vm`: the initramfs.
    dir: PathBuf,
    initramfs: tokio::sync::Mutex<Option<PathBuf>>,
    disks: std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// Whether the cached image file of `spec` is a VM image (its registry
/// name ends in `.zst`, or it is zstd), not an OCI image.
pub fn is_vm_image(image: &Path, spec: &phoenix_model::spec::Spec) -> bool {
    guest::is_vm_image(&spec.registry_file().0, image)
}

/// Whether a prepared artifact is an OCI image made bootable.
pub fn is_oci_artifact(place: &Path) -> bool {
    place.join(DISK).is_file() && place.join("settings.json").is_file()
}

/// Debian's cloud kernel, the newest there is.
pub fn default_kernel() -> Option<PathBuf> {
    let mut found: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let release = name.strip_prefix("vmlinuz-")?;
            release.ends_with("-cloud-amd64").then(|| {
                let version = release
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse().ok())
                    .collect();
                (version, e.path())
            })
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

impl OciVm {
    /// `kernel`: the minion's `--vm-kernel`, else [`default_kernel`].
    pub fn new(oci: Arc<OciDriver>, data_dir: &Path, kernel: Option<PathBuf>) -> OciVm {
        let kernel = kernel.or_else(default_kernel);
        match &kernel {
            Some(k) => {
                tracing::info!(kernel = %k.display(), "guest kernel for OCI images run as VMs")
            }
            None => tracing::info!("{NO_KERNEL}"),
        }
        OciVm {
            oci,
            kernel,
            dir: data_dir.join("vm"),
            initramfs: Default::default(),
            disks: Default::default(),
        }
    }

    fn kernel(&self) -> Result<&Path, String> {
        self.kernel.as_deref().ok_or_else(|| NO_KERNEL.to_owned())
    }

    /// Unpacks the image, makes its root disk and the initramfs: the
    /// unpacked image's directory.
    pub async fn prepare(&self, image: &Path, tag: Option<&str>) -> Result<PathBuf, String> {
        self.kernel()?;
        let place = self.oci.unpacked(image, tag).await.map_err(|e| {
            format!("neither a VM image (a zstd tar) nor an OCI image phoenix can boot: {e}")
        })?;
        self.disk(&place).await?;
        self.initramfs().await?;
        Ok(place)
    }

    /// The root disk of the unpacked image at `place`, made once.
    async fn disk(&self, place: &Path) -> Result<PathBuf, String> {
        let lock = self
            .disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(place.to_owned())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let disk = place.join(DISK);
        if disk.is_file() {
            return Ok(disk);
        }
        let mkfs = super::find_in_path("mkfs.ext4")
            .or_else(|| Some(PathBuf::from("/sbin/mkfs.ext4")).filter(|p| p.is_file()))
            .ok_or(MKFS_HELP)?;
        let rootfs = place.join("rootfs");
        let walked = rootfs.clone();
        let (bytes, entries) = tokio::task::spawn_blocking(move || usage(&walked))
            .await
            .map_err(|e| e.to_string())?;
        let (size_mib, inodes) = disk_size(bytes, entries);
        let tmp = place.join(format!(".{DISK}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut cmd = Command::new(mkfs);
        cmd.args(mkfs_args(&rootfs, &tmp, size_mib, inodes));
        let (exit, err) = reaper::run(&mut cmd)
            .await
            .map_err(|e| format!("run mkfs.ext4: {e}"))?;
        if exit.code != Some(0) {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("mkfs.ext4 failed ({exit}): {}", err.trim()));
        }
        std::fs::rename(&tmp, &disk).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("store {}: {e}", disk.display())
        })?;
        tracing::info!(disk = %disk.display(), size_mib, "root disk made for an OCI image run as a VM");
        Ok(disk)
    }

    /// The guest initramfs, built once per minion run.
    pub async fn initramfs(&self) -> Result<PathBuf, String> {
        let mut held = self.initramfs.lock().await;
        if let Some(p) = &*held {
            return Ok(p.clone());
        }
        let kernel = self.kernel()?.to_owned();
        let exe = std::fs::read("/proc/self/exe")
            .map_err(|e| format!("read this program (/proc/self/exe): {e}"))?;
        let interp = ird::elf_interpreter(&exe)
            .map_err(|e| format!("this program (/proc/self/exe): {e}"))?;
        let libs = match &interp {
            None => Vec::new(),
            Some(interp) => {
                std::fs::create_dir_all(&self.dir)
                    .map_err(|e| format!("create {}: {e}", self.dir.display()))?;
                // The file this process runs, or a copy where it was
                // replaced or removed since (an upgrade): what it needs.
                let copy = self.dir.join(format!("exe.{}", std::process::id()));
                let me = match std::env::current_exe() {
                    Ok(p) if p.is_file() => p,
                    _ => {
                        std::fs::write(&copy, &exe)
                            .map_err(|e| format!("write {}: {e}", copy.display()))?;
                        copy.clone()
                    }
                };
                let mut cmd = Command::new(interp);
                cmd.arg("--list").arg(&me);
                let listed = command_output(&mut cmd, &self.dir).await;
                let _ = std::fs::remove_file(&copy);
                ird::parse_ld_list(&listed?)?
            }
        };
        let out = self.dir.join("initramfs.cpio");
        let dir = self.dir.clone();
        let built = out.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
            build_initramfs(&kernel, &exe, &libs, &built)
        })
        .await
        .map_err(|e| e.to_string())??;
        tracing::info!(initramfs = %out.display(), "guest initramfs built");
        *held = Some(out.clone());
        Ok(out)
    }
}

/// What a command printed on stdout (through a file in `dir`), run
/// through the minion's reaper.
async fn command_output(cmd: &mut Command, dir: &Path) -> Result<String, String> {
    let out = dir.join(format!("stdout.{}", std::process::id()));
    let file = std::fs::File::create(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    cmd.stdout(file);
    let result = reaper::run(cmd).await;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let (exit, err) = result.map_err(|e| format!("run {cmd:?}: {e}"))?;
    if exit.code != Some(0) {
        return Err(format!("{cmd:?} failed ({exit}): {}", err.trim()));
    }
    Ok(text)
}

/// Bytes and entries under `dir` (not following symlinks).
fn usage(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            entries += 1;
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                todo.push(e.path());
            } else {
                // Whole 4 KiB blocks, as ext4 stores them.
                bytes += m.len().div_ceil(4096) * 4096;
            }
        }
    }
    (bytes, entries)
}

/// The disk's size (MiB) and inode count for content of `bytes` in
/// `entries` files: the content plus a quarter, plus 256 MiB to write in
/// (the file is sparse: unwritten space costs the host nothing), and two
/// inodes per entry plus 16384 to spare.
fn disk_size(bytes: u64, entries: u64) -> (u64, u64) {
    let mib = (bytes + bytes / 4 + entries * 256).div_ceil(1 << 20) + 256;
    (mib, entries * 2 + 16384)
}

fn mkfs_args(rootfs: &Path, out: &Path, size_mib: u64, inodes: u64) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = [
        "-q",
        "-F",
        // A fresh copy per start: no journal to replay, no space reserved.
        "-O",
        "^has_journal",
        "-m",
        "0",
        "-L",
        "phoenix-root",
        "-N",
    ]
    .iter()
    .map(Into::into)
    .collect();
    a.push(inodes.to_string().into());
    a.push("-d".into());
    a.push(rootfs.into());
    a.push(out.into());
    a.push(format!("{size_mib}M").into());
    a
}

/// Writes the initramfs (see the module header) to `out`, via a
/// temporary file renamed into place.
fn build_initramfs(kernel: &Path, exe: &[u8], libs: &[String], out: &Path) -> Result<(), String> {
    let image = std::fs::read(kernel)
        .map_err(|e| format!("read the guest kernel {}: {e}", kernel.display()))?;
    let modules = guest_modules(kernel, ird::bzimage_release(&image).as_deref())?;
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let write = || -> std::io::Result<()> {
        let mut w = CpioWriter::new(std::io::BufWriter::new(file));
        w.dir("dev", 0o755)?;
        w.char_device("dev/console", 0o600, 5, 1)?;
        for d in ["proc", "sys", "newroot", "tmp"] {
            w.dir(d, 0o755)?;
        }
        let init = ird::strip_sections(exe).map_err(std::io::Error::other)?;
        w.file("init", 0o755, &init)?;
        for lib in libs {
            let data =
                std::fs::read(lib).map_err(|e| std::io::Error::other(format!("{lib}: {e}")))?;
            w.file(lib.trim_start_matches('/'), 0o755, &data)?;
        }
        w.dir(guest::MODULE_DIR, 0o755)?;
        for (i, (name, data, ext)) in modules.iter().enumerate() {
            w.file(
                &format!("{}/{i:02}-{name}{ext}", guest::MODULE_DIR),
                0o644,
                data,
            )?;
        }
        w.finish()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
    };
    if let Err(e) = write().and_then(|()| std::fs::rename(&tmp, out)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("write the guest initramfs {}: {e}", out.display()));
    }
    Ok(())
}

/// The modules to load in the guest, in order: (name, bytes, extension).
/// None when the kernel's release has no modules directory (a kernel with
/// its drivers built in).
type Module = (String, Vec<u8>, &'static str);

fn guest_modules(kernel: &Path, release: Option<&str>) -> Result<Vec<Module>, String> {
    let Some(release) = release else {
        tracing::info!(kernel = %kernel.display(), "not a bzImage with a release: no modules in the guest initramfs");
        return Ok(Vec::new());
    };
    let dir = Path::new("/lib/modules").join(release);
    let dep = match std::fs::read_to_string(dir.join("modules.dep")) {
        Ok(d) => d,
        Err(_) => {
            tracing::info!(dir = %dir.display(), "no modules.dep: the guest kernel's drivers must be built in");
            return Ok(Vec::new());
        }
    };
    let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
    let (paths, missing) = ird::resolve_modules(&dep, &builtin, &guest::MODULES);
    let required: Vec<&String> = missing
        .iter()
        .filter(|m| guest::REQUIRED_MODULES.contains(&m.as_str()))
        .collect();
    if !required.is_empty() {
        return Err(format!(
            "the guest kernel {} lacks modules a VM needs ({}), in {}",
            kernel.display(),
            required
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            dir.display()
        ));
    }
    paths
        .iter()
        .map(|p| {
            let path = dir.join(p);
            let data = std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
            let (data, ext) =
                ird::module_for_guest(p, data).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok((ird::module_name_of(p), data, ext))
        })
        .collect()
}

/// The run of an OCI image: the oci driver's semantics (Entrypoint, then
/// the spec's `args` or else Cmd; the image's Env, then the spec's `env`,
/// then Phoenix's variables, later entries winning).
pub fn guest_run(
    settings: &ImageSettings,
    name: &str,
    spec_args: &[String],
    spec_env: &[(String, String)],
    phoenix_env: &[(String, String)],
    ids: (u32, u32),
    hosts: Option<String>,
) -> Result<GuestRun, String> {
    let mut argv = settings.entrypoint.clone();
    if spec_args.is_empty() {
        argv.extend(settings.cmd.iter().cloned());
    } else {
        argv.extend(spec_args.iter().cloned());
    }
    if argv.is_empty() {
        return Err(
            "the image has neither Entrypoint nor Cmd; give the command in the spec's args".into(),
        );
    }
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_owned(), v.to_owned()));
    };
    set("PATH", crate::driver::exec::DEFAULT_PATH);
    for e in &settings.env {
        if let Some((k, v)) = e.split_once('=') {
            set(k, v);
        }
    }
    for (k, v) in spec_env.iter().chain(phoenix_env) {
        set(k, v);
    }
    let ip = env
        .iter()
        .find(|(k, _)| k == "PHOENIX_IP")
        .and_then(|(_, v)| v.parse().ok());
    Ok(GuestRun {
        argv,
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        cwd: settings
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into()),
        uid: ids.0,
        gid: ids.1,
        hostname: name.to_owned(),
        ip,
        hosts,
    })
}

/// Refuses a guest too small for its initramfs (which stays in its memory:
/// the init runs from it) plus 64 MiB for the kernel and the program.
fn enough_memory(guest_mib: u64, initrd_bytes: u64) -> Result<(), String> {
    let need = initrd_bytes.div_ceil(1 << 20) + 64;
    if guest_mib < need {
        return Err(format!(
            "memory: the guest would get {guest_mib} MiB, but an OCI image's VM needs at least \
             {need} MiB (its init is {} MiB); give the service at least {} MiB of memory",
            initrd_bytes.div_ceil(1 << 20),
            need + super::QEMU_OVERHEAD_MIB
        ));
    }
    Ok(())
}

/// A QEMU booting an OCI image: its exit is the program's, as the guest
/// reported it.
struct OciVmProc {
    vm: VmProc,
    /// The run's disk, where the guest also records the exit
    /// ([`guest::write_exit`]): read when QEMU's exit status says nothing.
    disk: PathBuf,
}

impl RunningTask for OciVmProc {
    fn wait(&mut self) -> BoxFuture<'_, Exit> {
        Box::pin(async move {
            let qemu = self.vm.proc.wait().await;
            // QEMU has ended: everything the guest wrote is in the file.
            program_exit(qemu, || recorded_exit(&self.disk))
        })
    }

    fn signal(&self, signal: i32) {
        self.vm.signal(signal);
    }
}

/// A QEMU adopted after a minion restart ([`super::VmDriver::recover`]):
/// one that boots an OCI image (its command line has the exit device) gets
/// its program's exit from the disk, as the minion is not its parent and
/// never sees QEMU's exit status.
pub(super) fn adopted(pid: u32, vm: VmProc) -> Box<dyn RunningTask> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    match oci_disk_of(&cmdline) {
        Some(disk) => Box::new(OciVmProc { vm, disk }),
        None => Box::new(vm),
    }
}

/// The root disk of a QEMU whose command line (NUL-separated) boots an
/// OCI image: has [`DEBUG_EXIT`], and `-drive id=root,file=PATH,...`.
fn oci_disk_of(cmdline: &[u8]) -> Option<PathBuf> {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    if !args.contains(&DEBUG_EXIT.as_bytes()) {
        return None;
    }
    let drive = args
        .windows(2)
        .find(|w| w[0] == b"-drive")
        .and_then(|w| std::str::from_utf8(w[1]).ok())?;
    qemu_options(drive)
        .into_iter()
        .find_map(|o| o.strip_prefix("file=").map(PathBuf::from))
}

/// QEMU's `key=value,...` options, a `,,` being a comma within a value.
fn qemu_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut option = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            option.push(c);
        } else if chars.next_if_eq(&',').is_some() {
            option.push(',');
        } else {
            out.push(std::mem::take(&mut option));
        }
    }
    out.push(option);
    out
}

/// The exit code the guest recorded on `disk`, if it did.
fn recorded_exit(disk: &Path) -> Option<i32> {
    let mut f = std::fs::File::open(disk).ok()?;
    guest::read_exit(&mut f).ok().flatten()
}

/// QEMU's exit as the program's: the code the guest reported through the
/// exit device; else (QEMU ended with 0, the guest went down without
/// reporting, as after a kernel panic; or QEMU was adopted and its status
/// is unknown) the code it recorded on its disk (`recorded`), else an
/// unknown end; anything else is QEMU's own (its failure, a signal).
fn program_exit(qemu: Exit, recorded: impl FnOnce() -> Option<i32>) -> Exit {
    let unknown = Exit {
        code: None,
        signal: None,
        ..qemu
    };
    let code = match (qemu.code, qemu.signal) {
        (Some(s), _) => match guest::decode_exit(s) {
            Some(code) => Some(code),
            None if s == 0 => recorded().map(guest::reported_code),
            None => return qemu,
        },
        (None, Some(_)) => return qemu,
        (None, None) => recorded().map(guest::reported_code),
    };
    Exit { code, ..unknown }
}

impl VmDriver {
    /// Connects the OCI unpacker and chooses the guest kernel (`kernel`:
    /// `--vm-kernel`), so OCI images boot.
    pub fn with_oci_images(
        mut self,
        oci: Arc<OciDriver>,
        data_dir: &Path,
        kernel: Option<PathBuf>,
    ) -> VmDriver {
        self.oci_vm = Some(Arc::new(OciVm::new(oci, data_dir, kernel)));
        self
    }

    pub(super) async fn prepare_oci(
        &self,
        image: &Path,
        tag: Option<&str>,
    ) -> Result<PathBuf, String> {
        let o = self.oci_vm.as_ref().ok_or(
            "this minion cannot boot OCI images as VMs (no image unpacker); the file is not a VM image (a zstd tar)",
        )?;
        o.prepare(image, tag).await
    }

    /// Starts an OCI image prepared by [`Self::prepare_oci`].
    pub(super) async fn start_oci(&self, task: TaskConfig<'_>) -> Result<TaskHandle, String> {
        let qemu = self.qemu.as_ref().ok_or(super::QEMU_HELP)?;
        let o = self
            .oci_vm
            .as_ref()
            .ok_or("this minion cannot boot OCI images as VMs")?;
        let place = &task.artifact.path;
        let settings: ImageSettings = std::fs::read(place.join("settings.json"))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .ok_or_else(|| format!("{} holds no unpacked OCI image", place.display()))?;
        let spec = &task.assignment.spec;
        let ids = resolve_user(settings.user.as_deref(), &place.join("rootfs"))?;
        // The master's layers (cluster, env files, spec; secrets in
        // place), as for a container.
        let spec_env = task.assignment.env_pairs();
        let hosts = task
            .network
            .and_then(|n| std::fs::read_to_string(n.hosts_file).ok());
        let run = guest_run(
            &settings, &spec.name, &spec.args, &spec_env, task.env, ids, hosts,
        )?;
        let initrd = o.initramfs().await?;
        let work = task.work_dir;
        let disk = fresh_disk(work, &place.join(DISK)).await?;
        // The run description holds the service's environment, secrets
        // included: only root may read the disk.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .and_then(|mut f| {
                f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                // The run goes after the filesystem, on a whole sector.
                let len = f.metadata()?.len();
                f.set_len(len.div_ceil(guest::FOOTER) * guest::FOOTER)?;
                guest::append_run(&mut f, &run)
            })
            .map_err(|e| format!("write the run description to {}: {e}", disk.display()))?;
        let ifup = work.join("ifup");
        if task.network.is_some() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&ifup, IFUP)
                .and_then(|()| {
                    std::fs::set_permissions(&ifup, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(|e| format!("write {}: {e}", ifup.display()))?;
        }
        let config = VmConfig::default();
        let memory = memory_mib(spec.memory, &config);
        let initrd_bytes = std::fs::metadata(&initrd).map_or(0, |m| m.len());
        enough_memory(memory, initrd_bytes)?;
        let plan = Plan {
            kernel: o.kernel()?.to_owned(),
            initrd: Some(initrd),
            disk,
            qmp: work.join("qmp.sock"),
            ifup: task.network.is_some().then_some(ifup),
            cmdline: format!(
                "{} -- guest-init",
                cmdline(self.accel, self.tsc_khz, &config, &[])?
            ),
            memory_mib: memory,
            cpus: spec.cpus.map(|c| c.ceil().max(1.0) as u32).unwrap_or(1),
            accel: self.accel,
            name: task.name().to_owned(),
        };
        let mut args = plan.args();
        args.extend(["-device".to_owned(), DEBUG_EXIT.to_owned()]);
        let disk = plan.disk.clone();
        self.spawn_qemu(qemu, &args, task, plan.qmp, |vm| {
            Box::new(OciVmProc { vm, disk })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `cmd` to its end: its exit, stdout and stderr. Through the
    /// minion's reaper, not std's `output()`: a test in this process that
    /// started the reaper (the exec driver's) reaps every exited child,
    /// and `output()`'s own wait then fails with ECHILD.
    async fn output_of(cmd: &mut Command, input: Option<&[u8]>) -> (Exit, String, String) {
        use std::io::{Read, Seek};
        let _ = reaper::start();
        let mut out = tempfile::tempfile().unwrap();
        cmd.stdout(out.try_clone().unwrap());
        let (exit, err) = reaper::run_with_input(cmd, input).await.unwrap();
        let mut text = String::new();
        out.rewind().unwrap();
        out.read_to_string(&mut text).unwrap();
        (exit, text, err)
    }

    fn settings() -> ImageSettings {
        ImageSettings {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--default".into()],
            env: vec!["A=image".into(), "B=image".into(), "PATH=/app/bin".into()],
            working_dir: Some("/srv".into()),
            user: None,
        }
    }

    #[test]
    fn the_run_follows_the_container_rules() {
        let phoenix = [
            ("PHOENIX_IP".to_owned(), "fd38:dde8:32dd:1::7".to_owned()),
            ("PORT".to_owned(), "8000".to_owned()),
        ];
        let spec_env = [("A".to_owned(), "spec".to_owned())];
        let run = guest_run(
            &settings(),
            "web",
            &[],
            &spec_env,
            &phoenix,
            (1000, 50),
            None,
        )
        .unwrap();
        assert_eq!(run.argv, ["/bin/app", "--default"]);
        assert_eq!(
            run.env,
            [
                "B=image",
                "PATH=/app/bin",
                "A=spec",
                "PHOENIX_IP=fd38:dde8:32dd:1::7",
                "PORT=8000"
            ]
        );
        assert_eq!((run.cwd.as_str(), run.uid, run.gid), ("/srv", 1000, 50));
        assert_eq!(run.hostname, "web");
        assert_eq!(run.ip, Some("fd38:dde8:32dd:1::7".parse().unwrap()));
        // The spec's args replace Cmd, not Entrypoint.
        let run = guest_run(&settings(), "web", &["x".into()], &[], &[], (0, 0), None).unwrap();
        assert_eq!(run.argv, ["/bin/app", "x"]);
        assert_eq!(run.ip, None);
        assert!(run.env.contains(&"PATH=/app/bin".to_owned()));
        // Nothing to run.
        let empty = ImageSettings::default();
        assert!(
            guest_run(&empty, "web", &[], &[], &[], (0, 0), None)
                .unwrap_err()
                .contains("neither Entrypoint nor Cmd")
        );
        let run = guest_run(&empty, "web", &["/bin/sh".into()], &[], &[], (0, 0), None).unwrap();
        assert_eq!((run.argv.len(), run.cwd.as_str()), (1, "/"));
    }

    #[test]
    fn qemu_exits_become_the_programs() {
        let qemu = |code| Exit {
            code: Some(code),
            signal: None,
            at: 5,
        };
        let none = || None;
        assert_eq!(program_exit(qemu(7), none).code, Some(2));
        assert_eq!(
            program_exit(qemu(3), || Some(9)).code,
            Some(0),
            "QEMU's says"
        );
        assert_eq!(program_exit(qemu(0), none).code, None, "never reported");
        assert_eq!(
            program_exit(qemu(0), || Some(4)).code,
            Some(4),
            "recorded, but the exit device missed"
        );
        assert_eq!(
            program_exit(qemu(1), || Some(4)).code,
            Some(1),
            "QEMU's own failure"
        );
        let killed = Exit {
            code: None,
            signal: Some(9),
            at: 5,
        };
        assert_eq!(program_exit(killed, || Some(4)), killed);
        // Adopted: QEMU's status is unknown; the disk has the program's.
        let adopted = Exit {
            code: None,
            signal: None,
            at: 5,
        };
        assert_eq!(program_exit(adopted, none), adopted);
        let from_disk = program_exit(adopted, || Some(137));
        assert_eq!((from_disk.code, from_disk.at), (Some(126), 5));
        assert_eq!(program_exit(adopted, || Some(5)).code, Some(5));
    }

    #[test]
    fn an_adopted_qemu_names_its_disk_when_it_boots_an_oci_image() {
        let line = |args: &[&str]| args.join("\0").into_bytes();
        let oci = line(&[
            "/usr/bin/qemu-system-x86_64",
            "-drive",
            "id=root,file=/data/work/a,,b/disk.ext4,format=raw,if=none",
            "-device",
            DEBUG_EXIT,
        ]);
        assert_eq!(
            oci_disk_of(&oci),
            Some(PathBuf::from("/data/work/a,b/disk.ext4"))
        );
        // A VM image's QEMU has no exit device: its exit stays unknown.
        let plain = line(&[
            "/usr/bin/qemu-system-x86_64",
            "-drive",
            "id=root,file=/data/work/disk.ext4,format=raw,if=none",
        ]);
        assert_eq!(oci_disk_of(&plain), None);
        assert_eq!(oci_disk_of(b""), None);
        assert_eq!(
            qemu_options("a=1,,2,b=,c"),
            ["a=1,2", "b=", "c"].map(String::from)
        );
    }

    /// An OCI VM's disk as the guest leaves it: the exit read back.
    #[test]
    fn the_recorded_exit_is_read_from_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.ext4");
        let mut f = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&disk)
            .unwrap();
        f.set_len(4096).unwrap();
        guest::append_run(&mut f, &GuestRun::default()).unwrap();
        assert_eq!(recorded_exit(&disk), None);
        guest::write_exit(&mut f, 3).unwrap();
        assert_eq!(recorded_exit(&disk), Some(3));
        assert_eq!(recorded_exit(&dir.path().join("gone")), None);
    }

    #[test]
    fn a_guest_must_hold_its_init() {
        assert!(enough_memory(256, 50 << 20).is_ok());
        let e = enough_memory(64, 50 << 20).unwrap_err();
        assert!(e.contains("needs at least 114 MiB"), "{e}");
        assert!(e.contains("at least 210 MiB of memory"), "{e}");
    }

    #[test]
    fn disks_have_room_and_inodes() {
        let (mib, inodes) = disk_size(100 << 20, 1000);
        assert_eq!(mib, 125 + 1 + 256);
        assert_eq!(inodes, 18384);
        let args = mkfs_args(Path::new("/r"), Path::new("/o.ext4"), 4096, 10);
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "-q -F -O ^has_journal -m 0 -L phoenix-root -N 10 -d /r /o.ext4 4096M"
        );
    }

    #[test]
    fn images_are_told_apart_by_their_first_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let zst = dir.path().join("a");
        std::fs::write(&zst, zstd_magic()).unwrap();
        let tar = dir.path().join("b");
        std::fs::write(&tar, b"oci-layout\0\0\0").unwrap();
        let spec = |image: &str| {
            phoenix_model::spec::parse_specs(
                "t",
                &format!(r#"{{"machine":"m","name":"v","type":"vm","image":"{image}"}}"#),
            )
            .unwrap()
            .remove(0)
        };
        assert!(is_vm_image(&zst, &spec("web")));
        assert!(!is_vm_image(&tar, &spec("app:latest")));
        assert!(!is_vm_image(&tar, &spec("app.tar")));
        assert!(
            is_vm_image(&tar, &spec("web.zst")),
            "named .zst: a VM image"
        );
        assert!(!is_vm_image(&dir.path().join("missing"), &spec("app")));
        assert!(!is_oci_artifact(dir.path()));
    }

    fn zstd_magic() -> Vec<u8> {
        vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0]
    }

    /// A disk made from a directory, when mkfs.ext4 is here: an ext4
    /// image with the files in it (read back with debugfs).
    #[tokio::test]
    async fn a_root_disk_is_made_from_a_directory() {
        let Some(mkfs) = super::super::find_in_path("mkfs.ext4") else {
            eprintln!("SKIPPED: no mkfs.ext4 (apt-get install e2fsprogs)");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/app"), b"#!/bin/sh\necho hi\n").unwrap();
        let (bytes, entries) = usage(&rootfs);
        assert_eq!((bytes, entries), (4096, 2));
        let (mib, inodes) = disk_size(bytes, entries);
        let out = dir.path().join("d.ext4");
        let (exit, _, err) = output_of(
            Command::new(mkfs).args(mkfs_args(&rootfs, &out, mib, inodes)),
            None,
        )
        .await;
        assert_eq!(exit.code, Some(0), "{err}");
        let head = std::fs::read(&out).unwrap();
        assert_eq!(&head[1080..1082], &[0x53, 0xef], "ext4 magic");
        assert_eq!(head.len() as u64, mib << 20);
        // The run description goes after the filesystem.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&out)
            .unwrap();
        let run = GuestRun {
            argv: vec!["/bin/app".into()],
            ..Default::default()
        };
        guest::append_run(&mut f, &run).unwrap();
        assert_eq!(guest::read_run(&mut f).unwrap(), run);
    }

    /// The initramfs of this machine's cloud kernel, with this test binary
    /// as its init: the modules and the libraries are in it.
    #[tokio::test]
    async fn an_initramfs_holds_init_libraries_and_modules() {
        let Some(kernel) = default_kernel() else {
            eprintln!(
                "SKIPPED: no /boot/vmlinuz-*-cloud-amd64 (apt-get install linux-image-cloud-amd64)"
            );
            return;
        };
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let interp = ird::elf_interpreter(&exe)
            .unwrap()
            .expect("a dynamic test binary");
        let (_, listed, _) = output_of(
            std::process::Command::new(&interp)
                .arg("--list")
                .arg(std::env::current_exe().unwrap()),
            None,
        )
        .await;
        let libs = ird::parse_ld_list(&listed).unwrap();
        assert!(libs.iter().any(|l| l.contains("libc.so")), "{libs:?}");
        let dir = tempfile::tempdir().unwrap();
        let cpio = dir.path().join("initramfs.cpio");
        build_initramfs(&kernel, &exe, &libs, &cpio).unwrap();
        if super::super::find_in_path("cpio").is_none() {
            eprintln!("SKIPPED the listing: no cpio (apt-get install cpio)");
            return;
        }
        let archive = std::fs::read(&cpio).unwrap();
        let (_, names, _) = output_of(
            std::process::Command::new("cpio").args(["-t", "--quiet"]),
            Some(&archive),
        )
        .await;
        assert!(names.lines().any(|l| l == "init"), "{names}");
        assert!(names.lines().any(|l| l == "dev/console"), "{names}");
        assert!(names.contains("libc.so.6"), "{names}");
        assert!(
            names.contains(&interp.trim_start_matches('/').to_owned()),
            "{names}"
        );
        for m in ["00-virtio_ring.ko", "virtio_blk.ko", "virtio_net.ko"] {
            assert!(names.contains(m), "{m} in {names}");
        }
        // Smaller than the binary with its debug information.
        assert!(std::fs::metadata(&cpio).unwrap().len() < exe.len() as u64 + (32 << 20));
    }
}
