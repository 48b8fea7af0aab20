//! The `oci` driver: OCI containers, run by crun, with no process of ours
//! left beside them.
//!
//! Prepare: the image file (fetched and hash-checked like any image) is
//! unpacked once per manifest digest into `images/rootfs/<digest>/rootfs`
//! (shared by every service using it), its settings beside it. Start: the
//! service gets an overlayfs with that as its lower layer and a fresh upper
//! layer (a copy where overlayfs is missing), so each start begins from the
//! image; `crun create` sets the container up and exits, leaving the
//! container's init as the minion's child (the minion is a subreaper, see
//! [`crate::reaper`]); `crun start` lets it run. Stop signals the init alone
//! (ending it ends its PID namespace). Destroy: `crun delete`, an unmount
//! and the writable layer go.
//!
//! cgroups are not crun's: the runner owns every service's cgroups, for
//! containers and binaries alike ([`phoenix_host::cgroup`]). `crun create`
//! is started inside them ([`phoenix_host::spawn`]), so the container's
//! init and everything in it inherit them, and every crun command runs
//! with `--cgroup-manager=disabled` and a runtime config without
//! `linux.resources` or `cgroupsPath`. crun 1.8 still refuses "hybrid"
//! hosts (v1 controllers plus a cgroup2 mount at /sys/fs/cgroup/unified):
//! there each crun command runs in a private mount namespace whose
//! /sys/fs/cgroup is a fresh cgroup2 mount, entered after the join
//! ([`phoenix_host::spawn::Spawn::private_cgroup2`] for `crun create`,
//! [`phoenix_host::pre_exec::private_cgroup2_mount`] for the others), so
//! the minion never changes namespace itself.
//!
//! A service with a network of its own ([`super::TaskNetwork`]): `crun
//! create` is started in its network namespace, and the runtime config
//! asks for no new one, so the container joins it; its hosts file is
//! bound read-only over the container's `/etc/hosts`.
//!
//! Host operations (statfs, overlay mounts, unmounts, signals, pidfds) go
//! through the driver's [`Host`].

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use phoenix_host::cgroup::CgroupMode;
use phoenix_host::spawn::Spawn;
use phoenix_host::users::UserError;
use phoenix_host::{Host, OverlayMount};
use phoenix_model::proto::Assignment;
use serde_json::{Value, json};

use super::{
    Artifact, BoxFuture, Capabilities, Driver, DriverError, DriverName, TaskConfig, TaskDir,
    TaskHandle,
};
use crate::process::{Proc, Target};
use crate::reaper;
use crate::state::RunRecord;

/// Image settings the runtime config is made from.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ImageSettings {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// Where containers live and how crun is run.
pub struct OciDriver {
    /// One unpack at a time per image file, however many services share it.
    unpacking: std::sync::Mutex<
        std::collections::HashMap<PathBuf, std::sync::Arc<tokio::sync::Mutex<()>>>,
    >,
    crun: Option<PathBuf>,
    state_dir: PathBuf,
    rootfs_dir: PathBuf,
    host: Arc<dyn Host>,
    /// crun must see a cgroup2-only /sys/fs/cgroup (a hybrid host).
    private_cgroup2: bool,
}

const CRUN_HELP: &str = "crun is not installed on this minion; install it (Debian/Ubuntu: apt-get install crun, Alpine: apk add crun) to run services of type docker";

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The container of the run with key `name` (the service's name, or
/// `NAME.GENERATION` beside it during an update).
pub fn container_id(name: &str) -> String {
    format!("phoenix-{name}")
}

impl OciDriver {
    /// The driver on `host`, whose cgroups are mounted as `cgroups` says,
    /// keeping crun's state and unpacked images under `data_dir`.
    pub fn new(data_dir: &Path, host: Arc<dyn Host>, cgroups: CgroupMode) -> OciDriver {
        let rt = OciDriver {
            unpacking: Default::default(),
            crun: find_in_path("crun"),
            state_dir: data_dir.join("crun"),
            rootfs_dir: data_dir.join("images").join("rootfs"),
            host,
            // crun checks that /sys/fs/cgroup is a cgroup fs: on a hybrid host,
            // and where none is mounted (`ip netns exec` mounts a fresh
            // sysfs), it gets a private cgroup2 mount.
            private_cgroup2: matches!(cgroups, CgroupMode::Hybrid | CgroupMode::None),
        };
        match &rt.crun {
            Some(p) => tracing::info!(crun = %p.display(), ?cgroups, "container runtime"),
            None => tracing::warn!("{CRUN_HELP}"),
        }
        rt
    }

    /// A crun command (other than `create`), set up for this host's
    /// cgroups.
    fn crun(&self) -> Result<Command, String> {
        let bin = self.crun.as_ref().ok_or(CRUN_HELP)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--root")
            .arg(&self.state_dir)
            .arg("--cgroup-manager=disabled");
        if self.private_cgroup2 {
            // SAFETY: private_cgroup2_mount makes only async-signal-safe
            // system calls on static strings (unshare, mount).
            unsafe { cmd.pre_exec(phoenix_host::pre_exec::private_cgroup2_mount) };
        }
        Ok(cmd)
    }

    /// Runs a crun subcommand to its end; its error text on failure.
    async fn crun_run(&self, args: &[&str], what: &str) -> Result<(), String> {
        let mut cmd = self.crun()?;
        cmd.args(args).stdout(Stdio::null());
        let (exit, err) = reaper::run(&mut cmd)
            .await
            .map_err(|e| format!("crun {what}: {e}"))?;
        if exit.code == Some(0) {
            Ok(())
        } else {
            Err(format!("crun {what} failed ({exit}): {}", err.trim()))
        }
    }

    /// The unpacked image of `image` (a file in the image cache): its
    /// directory, holding `rootfs` and `settings.json`. Unpacks it first if
    /// this digest has not been unpacked yet.
    pub async fn unpacked(&self, image: &Path, tag: Option<&str>) -> Result<PathBuf, String> {
        let lock = self
            .unpacking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(image.to_owned())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let image = image.to_owned();
        let tag = tag.map(str::to_owned);
        let dir = self.rootfs_dir.clone();
        tokio::task::spawn_blocking(move || unpack_cached(&image, tag.as_deref(), &dir))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Sets up and starts the container of `task`, from the unpacked image
    /// [`Self::unpacked`] made.
    async fn start_container(&self, task: TaskConfig<'_>) -> Result<TaskHandle, String> {
        if self.crun.is_none() {
            return Err(CRUN_HELP.into());
        }
        let a = task.assignment;
        let work = task.work_dir;
        let log = &task.log;
        let spec = &a.spec;
        let lower = task.artifact.path.join("rootfs");
        let settings = load_settings(&task.artifact.path)?;
        let key = task.name();
        self.cleanup(key, work).await;
        let bundle = work.join("bundle");
        let rootfs = bundle.join("rootfs");
        let upper = work.join("upper");
        let ovl = work.join("ovlwork");
        for d in [&rootfs, &upper, &ovl] {
            std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        let overlay = OverlayMount {
            lower: vec![lower.clone()],
            upper: upper.clone(),
            work: ovl.clone(),
            target: rootfs.clone(),
        };
        if let Err(e) = self.host.mount_overlay(&overlay) {
            tracing::info!(service = %spec.name, "overlayfs unavailable ({e}); copying the image instead");
            let mut cp = Command::new("cp");
            cp.arg("-a")
                .arg(format!("{}/.", lower.display()))
                .arg(&rootfs);
            let (exit, err) = reaper::run(&mut cp)
                .await
                .map_err(|e| format!("copy rootfs: {e}"))?;
            if exit.code != Some(0) {
                return Err(format!("copy rootfs: {}", err.trim()));
            }
        }
        let hosts_file = task.network.map(|n| n.hosts_file);
        let config = runtime_config(a, &settings, &lower, task.env, hosts_file)?;
        // The config holds the service's environment, secrets included:
        // only root may read it.
        let config_path = bundle.join("config.json");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(&config_path);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&config_path)
                .and_then(|mut f| {
                    f.write_all(&serde_json::to_vec_pretty(&config).unwrap_or_default())
                })
                .map_err(|e| format!("write {}: {e}", config_path.display()))?;
        }

        let id = container_id(key);
        let pid_file = work.join("container.pid");
        let crun_log = work.join("crun.log");
        let _ = std::fs::remove_file(&pid_file);
        let _ = std::fs::remove_file(&crun_log);
        // The container inherits crun's stdout and stderr (the service
        // log), its cgroups and its network namespace.
        let bin = self.crun.as_ref().ok_or(CRUN_HELP)?;
        let mut create = Spawn::new(bin, log.as_fd());
        create
            .arg("--root")
            .arg(&self.state_dir)
            .arg("--cgroup-manager=disabled")
            .arg(format!("--log=file:{}", crun_log.display()))
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(&id)
            .envs(std::env::vars_os())
            .process_group(false)
            .private_cgroup2(self.private_cgroup2);
        if let Some(join) = task.cgroup.as_deref() {
            create.cgroups(join);
        }
        if let Some(network) = task.network {
            create.netns(network.netns);
        }
        let child = create.spawn().map_err(|e| format!("run crun: {e}"))?;
        let exit = reaper::exit_of(child.pid).await;
        if exit.code != Some(0) {
            let why = std::fs::read_to_string(&crun_log).unwrap_or_default();
            self.cleanup(key, work).await;
            return Err(format!("crun create failed ({exit}): {}", last_line(&why)));
        }
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| format!("crun create wrote no pid to {}", pid_file.display()))?;
        if let Err(e) = self.crun_run(&["start", &id], "start").await {
            self.cleanup(key, work).await;
            return Err(e);
        }
        Ok(TaskHandle {
            pid,
            start_time: self.host.process_start_time(pid).unwrap_or(0),
            process: Box::new(Proc::child(self.host.clone(), pid, Target::Single)),
        })
    }

    /// Removes what a container run leaves behind: crun's state, the
    /// overlay mount, the writable layer.
    pub async fn cleanup(&self, name: &str, work: &Path) {
        // crun keeps a directory per container in its state dir: no
        // directory, nothing to delete (and one process start saved).
        if self.crun.is_some() && self.state_dir.join(container_id(name)).exists() {
            let _ = self
                .crun_run(&["delete", "--force", &container_id(name)], "delete")
                .await;
        }
        // Nothing mounted there (a copied rootfs, a start that failed
        // early) is fine.
        let _ = self
            .host
            .unmount_detach(&work.join("bundle").join("rootfs"));
        for d in ["upper", "ovlwork", "bundle"] {
            let _ = std::fs::remove_dir_all(work.join(d));
        }
    }
}

impl Driver for OciDriver {
    fn name(&self) -> DriverName {
        DriverName::Oci
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
            if self.crun.is_none() {
                return Err(DriverError::Container(CRUN_HELP.into()));
            }
            let (_, tag) = a.spec.registry_file();
            let path = self
                .unpacked(image, tag.as_deref())
                .await
                .map_err(DriverError::Container)?;
            Ok(Artifact { path })
        })
    }

    fn start<'a>(&'a self, task: TaskConfig<'a>) -> BoxFuture<'a, Result<TaskHandle, DriverError>> {
        Box::pin(async move {
            self.start_container(task)
                .await
                .map_err(DriverError::Container)
        })
    }

    fn recover(&self, record: &RunRecord) -> Option<TaskHandle> {
        // The init alone: its PID namespace ends with it.
        let proc = Proc::adopt(
            self.host.clone(),
            record.pid,
            record.start_time,
            Target::Single,
        )?;
        Some(TaskHandle {
            pid: record.pid,
            start_time: record.start_time,
            process: Box::new(proc),
        })
    }

    fn destroy<'a>(&'a self, dir: TaskDir<'a>, _task: Option<TaskHandle>) -> BoxFuture<'a, ()> {
        Box::pin(self.cleanup(dir.name, dir.work_dir))
    }
}

fn last_line(s: &str) -> &str {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no message)")
}

/// A file `from-<image hash>` in an unpacked image's directory names a
/// cached image it came from.
pub const ROOTFS_MARK: &str = "from-";

/// The settings [`unpack_cached`] kept beside an unpacked image.
fn load_settings(place: &Path) -> Result<ImageSettings, String> {
    let path = place.join("settings.json");
    let text = std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("read {}: {e}", path.display()))
}

/// Unpacks an image once per manifest digest, atomically (into a temporary
/// directory renamed into place), and remembers its settings beside it.
/// The directory holding both.
fn unpack_cached(image: &Path, tag: Option<&str>, dir: &Path) -> Result<PathBuf, String> {
    let img = phoenix_image::open(image, tag).map_err(|e| e.to_string())?;
    let digest = img.manifest_digest.trim_start_matches("sha256:").to_owned();
    let place = dir.join(&digest);
    let rootfs = place.join("rootfs");
    let settings_path = place.join("settings.json");
    // Which cached images use this root filesystem: it is collected with
    // the last of them (see `images::collect`).
    let mark = |place: &Path| {
        if let Some(hash) = image.file_name().and_then(|n| n.to_str()) {
            let _ = std::fs::write(place.join(format!("{ROOTFS_MARK}{hash}")), b"");
        }
    };
    if let Ok(text) = std::fs::read(&settings_path)
        && serde_json::from_slice::<ImageSettings>(&text).is_ok()
        && rootfs.is_dir()
    {
        mark(&place);
        return Ok(place);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".unpack-{digest}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let limits = phoenix_image::Limits {
        max_layer_bytes: 8 << 30,
        max_total_bytes: 16 << 30,
    };
    if let Err(e) = phoenix_image::unpack(&img, &tmp.join("rootfs"), &limits) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.to_string());
    }
    let c = &img.config;
    let settings = ImageSettings {
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
        env: c.env.clone(),
        working_dir: c.working_dir.clone(),
        user: c.user.clone(),
    };
    let write = std::fs::write(
        tmp.join("settings.json"),
        serde_json::to_vec(&settings).unwrap_or_default(),
    );
    if let Err(e) = write.and_then(|()| {
        let _ = std::fs::remove_dir_all(&place);
        std::fs::rename(&tmp, &place)
    }) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!("store unpacked image in {}: {e}", place.display()));
    }
    mark(&place);
    tracing::info!(digest = %digest, "image unpacked");
    Ok(place)
}

/// Resolves the image's `User` ("name", "uid", "uid:gid", "name:group")
/// against the image's own /etc/passwd and /etc/group (also for an OCI
/// image booted as a VM).
pub(crate) fn resolve_user(user: Option<&str>, rootfs: &Path) -> Result<(u32, u32), String> {
    // The image controls these paths: never follow a symlink out of it.
    let read = |file: &str| -> Option<String> {
        let plain =
            |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() || m.is_file());
        let path = rootfs.join(file);
        (plain(&rootfs.join("etc")) && plain(&path))
            .then(|| std::fs::read_to_string(path).ok())
            .flatten()
    };
    let (passwd, group) = (read("etc/passwd"), read("etc/group"));
    phoenix_host::users::resolve_user(user.unwrap_or(""), passwd.as_deref(), group.as_deref())
        .map_err(|e| match e {
            UserError::UnknownUser(u) => {
                format!("image user {u:?} is not in the image's /etc/passwd")
            }
            UserError::UnknownGroup(g) => {
                format!("image group {g:?} is not in the image's /etc/group")
            }
        })
}

/// The OCI runtime config for a service's container; `hosts_file`: the
/// service's own `/etc/hosts` (it has a network namespace of its own,
/// which crun is started in).
fn runtime_config(
    a: &Assignment,
    img: &ImageSettings,
    rootfs: &Path,
    extra_env: &[(String, String)],
    hosts_file: Option<&Path>,
) -> Result<Value, String> {
    let spec = &a.spec;
    let mut args = img.entrypoint.clone();
    if spec.args.is_empty() {
        args.extend(img.cmd.iter().cloned());
    } else {
        args.extend(spec.args.iter().cloned());
    }
    if args.is_empty() {
        return Err(
            "the image has neither Entrypoint nor Cmd; give the command in the spec's args".into(),
        );
    }
    // Image env, then the master's layers (cluster, env files, spec;
    // secrets in place), then Phoenix's; later entries win.
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_owned(), v.to_owned()));
    };
    set(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    for e in &img.env {
        if let Some((k, v)) = e.split_once('=') {
            set(k, v);
        }
    }
    for (k, v) in a.env_pairs() {
        set(&k, &v);
    }
    for (k, v) in extra_env {
        set(k, v);
    }
    let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    let (uid, gid) = resolve_user(img.user.as_deref(), rootfs)?;
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        // /sys comes from the host (read-only) rather than a new sysfs.
        json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}),
    ];
    let hosts = hosts_file.unwrap_or(Path::new("/etc/hosts"));
    for (dest, source) in [
        ("/etc/resolv.conf", Path::new("/etc/resolv.conf")),
        ("/etc/hosts", hosts),
    ] {
        if source.exists() {
            mounts.push(json!({"destination": dest, "type": "bind", "source": source, "options": ["rbind", "ro"]}));
        }
    }
    // No `resources` and no `cgroupsPath`: the service's cgroups are
    // Phoenix's, joined before `crun create` (see the module header).
    // No `network` namespace: the container shares crun's, which is the
    // service's own when it has one (crun is started in it), else the
    // minion's.
    let linux = json!({
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
        "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    });
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": uid, "gid": gid },
            "args": args,
            "env": env,
            "cwd": img.working_dir.clone().filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into()),
            "capabilities": { "bounding": caps, "effective": caps, "permitted": caps },
            "noNewPrivileges": true,
        },
        "root": { "path": "rootfs", "readonly": false },
        "hostname": spec.name,
        "mounts": mounts,
        "linux": linux,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_against_the_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(None, dir.path()).unwrap(), (0, 0));
        assert_eq!(resolve_user(Some("app"), dir.path()).unwrap(), (1000, 1001));
        assert_eq!(
            resolve_user(Some("app:staff"), dir.path()).unwrap(),
            (1000, 50)
        );
        assert_eq!(resolve_user(Some("7:8"), dir.path()).unwrap(), (7, 8));
        assert!(
            resolve_user(Some("ghost"), dir.path())
                .unwrap_err()
                .contains("not in the image's /etc/passwd")
        );
    }

    #[test]
    fn config_from_image_and_spec() {
        let spec = phoenix_model::spec::parse_specs(
            "t",
            r#"{"machine":"m","name":"web","image":"app:v1","type":"docker","env":["A=spec"],"memory":"64M"}"#,
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
        let img = ImageSettings {
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["--default".into()],
            env: vec!["A=image".into(), "B=image".into()],
            working_dir: Some("/srv".into()),
            user: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let c = runtime_config(
            &a,
            &img,
            dir.path(),
            &[("PORT".into(), "8000".into())],
            None,
        )
        .unwrap();
        assert_eq!(c["process"]["args"], json!(["/bin/app", "--default"]));
        let env: Vec<&str> = c["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            env.contains(&"A=spec") && env.contains(&"B=image") && env.contains(&"PORT=8000"),
            "{env:?}"
        );
        assert_eq!(c["process"]["cwd"], "/srv");
        assert_eq!(c["hostname"], "web");
        // Limits are the runner's cgroups', never crun's.
        assert!(c["linux"].get("resources").is_none(), "{c}");
        assert!(c["linux"].get("cgroupsPath").is_none(), "{c}");
        assert!(
            c["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["type"] != "network")
        );
        let hosts_source = |c: &Value| {
            c["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["destination"] == "/etc/hosts")
                .map(|m| (m["source"].clone(), m["options"].clone()))
        };
        if Path::new("/etc/hosts").exists() {
            assert_eq!(
                hosts_source(&c),
                Some((json!("/etc/hosts"), json!(["rbind", "ro"])))
            );
        }

        // A service with a network of its own: its hosts file, and still
        // no new network namespace (crun is started in the service's).
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "fd38:dde8:32dd:1::2 web\n").unwrap();
        let c = runtime_config(&a, &img, dir.path(), &[], Some(&hosts)).unwrap();
        assert_eq!(
            hosts_source(&c),
            Some((json!(hosts), json!(["rbind", "ro"])))
        );
        assert!(
            c["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["type"] != "network")
        );
    }
}
