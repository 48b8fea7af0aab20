//! The `exec` driver: a binary from the image cache, run as the leader of
//! its own process group.
//!
//! The program is the image file itself (nothing to prepare). The process
//! gets a clean environment (`PATH`, the spec's `env`, then Phoenix's
//! variables), the task's work directory, its log file as stdout and
//! stderr, and starts inside the service's cgroups and, when it has one,
//! its network namespace with its hosts file as `/etc/hosts`
//! ([`phoenix_host::spawn`]). Signals go to the
//! whole group; what left the group (a double fork, `setsid`) is the
//! cgroup's to end, which the runner does after every run.
//!
//! Names. The cached file is named by its hash, which would make `argv[0]`
//! and the process title (`/proc/PID/comm`, what `ps -e` and `top` show)
//! a hash, and breaks multi-call binaries such as busybox that choose what
//! to be by `argv[0]`. So the program runs through a symlink named after
//! the image (`programs/KEY/IMAGE` under the data dir, KEY the run's key), which makes the
//! title the image name, and `argv[0]` is the image name itself.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use phoenix_host::{Host, Signal};
use phoenix_model::proto::Assignment;

use super::{
    Artifact, BoxFuture, Driver, DriverError, DriverName, TaskConfig, TaskDir, TaskHandle,
};
use crate::process::{Launch, Proc, Target};
use crate::state::RunRecord;

/// The `PATH` a binary service starts with, before the spec's `env`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct ExecDriver {
    host: Arc<dyn Host>,
    /// Where the symlinks named after images are (see the module header);
    /// `None`: run the cached file by its own name.
    programs_dir: Option<PathBuf>,
}

impl ExecDriver {
    /// A driver whose programs are named through symlinks in
    /// `programs_dir` (one folder per service).
    pub fn new(host: Arc<dyn Host>, programs_dir: Option<PathBuf>) -> ExecDriver {
        ExecDriver { host, programs_dir }
    }

    /// The path to execute `artifact` by: a symlink named `image` in the
    /// service's folder, or the artifact itself when the link cannot be
    /// made (the title is then the hash, nothing else changes).
    fn named_program(&self, service: &str, image: &str, artifact: &Path) -> PathBuf {
        let Some(dir) = &self.programs_dir else {
            return artifact.to_owned();
        };
        let dir = dir.join(service);
        let link = dir.join(image);
        // A restart of the same image finds its link in place: making it
        // again would cost an unlink and a new inode on every restart.
        if std::fs::read_link(&link).is_ok_and(|to| to == artifact) {
            return link;
        }
        let made = std::fs::create_dir_all(&dir).and_then(|()| {
            match std::fs::remove_file(&link) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            std::os::unix::fs::symlink(artifact, &link)
        });
        match made {
            Ok(()) => link,
            Err(e) => {
                tracing::warn!(service, "cannot name the program {}: {e}", link.display());
                artifact.to_owned()
            }
        }
    }
}

/// The name a binary service's program runs under: the image's file name
/// (registry names are one path component; anything else falls back).
pub fn program_name(a: &Assignment) -> Option<&str> {
    let image = a.spec.image.as_str();
    let name = image.rsplit('/').next().unwrap_or(image);
    (!name.is_empty() && name != "." && name != ".." && !name.contains('\0')).then_some(name)
}

impl Driver for ExecDriver {
    fn name(&self) -> DriverName {
        DriverName::Exec
    }

    fn prepare<'a>(
        &'a self,
        image: &'a Path,
        _a: &'a Assignment,
    ) -> BoxFuture<'a, Result<Artifact, DriverError>> {
        let checked = check_runnable(image).map(|()| Artifact {
            path: image.to_owned(),
        });
        Box::pin(std::future::ready(checked))
    }

    fn start<'a>(&'a self, task: TaskConfig<'a>) -> BoxFuture<'a, Result<TaskHandle, DriverError>> {
        // Spawning is synchronous: no await, the future is ready at once.
        Box::pin(std::future::ready(self.spawn(task)))
    }

    fn recover(&self, record: &RunRecord) -> Option<TaskHandle> {
        let proc = Proc::adopt(
            self.host.clone(),
            record.pid,
            record.start_time,
            Target::Group,
        )?;
        Some(TaskHandle {
            pid: record.pid,
            start_time: record.start_time,
            process: Box::new(proc),
        })
    }

    fn destroy<'a>(&'a self, _dir: TaskDir<'a>, task: Option<TaskHandle>) -> BoxFuture<'a, ()> {
        // Whatever the leader left behind in its group goes with it (the
        // runner's cgroup kill reaches what left the group).
        if let Some(task) = task {
            let _ = self.host.signal_group(task.pid, Signal::KILL);
        }
        Box::pin(std::future::ready(()))
    }
}

/// ELF machines (`e_machine`) this host's kernel runs, by the architecture
/// this minion was built for.
fn native_machines() -> &'static [u16] {
    match std::env::consts::ARCH {
        // x86-64, and i386 through the kernel's 32-bit emulation.
        "x86_64" => &[62, 3],
        // AArch64, and 32-bit ARM where the CPU has it.
        "aarch64" => &[183, 40],
        "riscv64" => &[243],
        _ => &[],
    }
}

/// Refuses an ELF file built for another machine before it is run, naming
/// the machine: the kernel would answer `execve` with a bare ENOEXEC
/// ("Exec format error"), and a C library's `execvp` hands such a file to
/// `/bin/sh`, whose "not found" hides the cause.
fn check_runnable(image: &Path) -> Result<(), DriverError> {
    use std::io::Read;
    let mut head = [0u8; 20];
    let n = std::fs::File::open(image)
        .and_then(|mut f| f.read(&mut head))
        .map_err(DriverError::Spawn)?;
    if n < head.len() || head[..4] != *b"\x7fELF" {
        return Ok(());
    }
    let machine = match head[5] {
        2 => u16::from_be_bytes([head[18], head[19]]),
        _ => u16::from_le_bytes([head[18], head[19]]),
    };
    let native = native_machines();
    if native.is_empty() || native.contains(&machine) {
        return Ok(());
    }
    Err(DriverError::Spawn(std::io::Error::other(format!(
        "an ELF executable for machine {machine:#06x}, which this {} machine cannot run (Exec format error)",
        std::env::consts::ARCH
    ))))
}

impl ExecDriver {
    fn spawn(&self, task: TaskConfig<'_>) -> Result<TaskHandle, DriverError> {
        let spec = &task.assignment.spec;
        let mut env = vec![("PATH".to_owned(), DEFAULT_PATH.to_owned())];
        // The master's layers (cluster, env files, spec; secrets in
        // place), then Phoenix's own.
        env.extend(task.assignment.env_pairs());
        env.extend(task.env.iter().cloned());
        let name = program_name(task.assignment);
        let program = match name {
            Some(image) => self.named_program(task.name(), image, &task.artifact.path),
            None => task.artifact.path.clone(),
        };
        let proc = Proc::spawn(
            self.host.clone(),
            Launch {
                program: &program,
                arg0: name.map(OsStr::new),
                args: &spec.args,
                env,
                cwd: task.work_dir,
                log: task.log,
                cgroup: task.cgroup.as_deref(),
                netns: task.network.map(|n| n.netns),
                hosts_file: task.network.map(|n| n.hosts_file),
            },
        )
        .map_err(DriverError::Spawn)?;
        let pid = proc.pid().unwrap_or(0);
        Ok(TaskHandle {
            pid,
            start_time: self.host.process_start_time(pid).unwrap_or(0),
            process: Box::new(proc),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn assignment(image: &str, args: &[&str]) -> Assignment {
        let mut spec = phoenix_model::spec::parse_specs(
            "t",
            r#"{"machine":"m","name":"job","type":"binary","image":"sh","env":["GREETING=hi"]}"#,
        )
        .unwrap()
        .remove(0);
        spec.image = image.to_owned();
        spec.args = args.iter().map(|s| s.to_string()).collect();
        Assignment {
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
        }
    }

    fn linux() -> Arc<dyn Host> {
        Arc::new(phoenix_host::Linux)
    }

    async fn wait_for_log(path: &Path, want: &str) -> String {
        let mut text = String::new();
        for _ in 0..250 {
            text = std::fs::read_to_string(path).unwrap_or_default();
            if text == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        text
    }

    #[test]
    fn an_elf_for_another_machine_is_refused_before_exec() {
        let dir = tempfile::tempdir().unwrap();
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        elf[18..20].copy_from_slice(&0x4242u16.to_le_bytes());
        let alien = dir.path().join("alien");
        std::fs::write(&alien, &elf).unwrap();
        let err = check_runnable(&alien).unwrap_err().to_string();
        assert!(
            err.contains("machine 0x4242") && err.contains("Exec format error"),
            "{err}"
        );
        // This machine's own programs, scripts and short files pass.
        let me = std::env::current_exe().unwrap();
        assert!(check_runnable(&me).is_ok());
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        assert!(check_runnable(&script).is_ok());
    }

    #[tokio::test]
    async fn starts_recovers_and_destroys_a_process_group() {
        let _ = crate::reaper::start();
        let dir = tempfile::tempdir().unwrap();
        let host = linux();
        // The echo comes after the background sleep has been forked.
        let a = assignment(
            "sh",
            &["-c", "sleep 30 & echo \"$GREETING $PORT\"; sleep 30"],
        );
        let driver = ExecDriver::new(host.clone(), None);
        let artifact = driver.prepare(Path::new("/bin/sh"), &a).await.unwrap();
        assert_eq!(artifact.path, Path::new("/bin/sh"));
        let log_path = dir.path().join("log");
        let env = [("PORT".to_owned(), "8123".to_owned())];
        let mut handle = driver
            .start(TaskConfig {
                assignment: &a,
                artifact: &artifact,
                work_dir: dir.path(),
                env: &env,
                log: std::fs::File::create(&log_path).unwrap(),
                cgroup: None,
                network: None,
            })
            .await
            .unwrap();
        assert!(host.group_alive(handle.pid));
        let record = RunRecord {
            pid: handle.pid,
            start_time: handle.start_time,
            generation: 1,
            restarts: 0,
            driver: DriverName::Exec,
            limits: None,
        };
        let mut recovered = driver.recover(&record).expect("the process runs");
        let stale = RunRecord {
            start_time: record.start_time + 1,
            ..record.clone()
        };
        assert!(driver.recover(&stale).is_none());
        wait_for_log(&log_path, "hi 8123\n").await;
        // Ending the leader leaves its background sleep; destroy ends it.
        host.signal(handle.pid, Signal::KILL).unwrap();
        let exit = handle.process.wait().await;
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        tokio::time::timeout(Duration::from_secs(5), recovered.process.wait())
            .await
            .unwrap();
        let pgid = handle.pid;
        assert!(host.group_alive(pgid));
        driver
            .destroy(
                TaskDir {
                    name: "job",
                    work_dir: dir.path(),
                },
                Some(handle),
            )
            .await;
        for _ in 0..50 {
            if !host.group_alive(pgid) {
                assert_eq!(std::fs::read_to_string(&log_path).unwrap(), "hi 8123\n");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("process group {pgid} survived destroy");
    }

    /// A multi-call binary picks its part by `argv[0]`, and `ps` shows the
    /// process title: both are the image's name, not the cached file's hash.
    #[tokio::test]
    async fn the_program_runs_under_the_image_name() {
        let _ = crate::reaper::start();
        let dir = tempfile::tempdir().unwrap();
        // A cached image file, named by a hash like the real ones.
        let cached = dir.path().join("77f562aa");
        std::fs::copy("/bin/sh", &cached).unwrap();
        let a = assignment(
            "greeter",
            &[
                "-c",
                "tr '\\0' ' ' < /proc/$$/cmdline; echo; cat /proc/$$/comm",
            ],
        );
        let host = linux();
        let driver = ExecDriver::new(host, Some(dir.path().join("programs")));
        let artifact = driver.prepare(&cached, &a).await.unwrap();
        let log_path = dir.path().join("log");
        let mut handle = driver
            .start(TaskConfig {
                assignment: &a,
                artifact: &artifact,
                work_dir: dir.path(),
                env: &[],
                log: std::fs::File::create(&log_path).unwrap(),
                cgroup: None,
                network: None,
            })
            .await
            .unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), handle.process.wait())
            .await
            .unwrap();
        assert_eq!(exit.code, Some(0));
        let log = std::fs::read_to_string(&log_path).unwrap();
        let mut lines = log.lines();
        let cmdline = lines.next().unwrap_or_default();
        assert!(cmdline.starts_with("greeter -c "), "{log}");
        assert_eq!(lines.next(), Some("greeter"), "{log}");
        let link = dir.path().join("programs/job/greeter");
        assert_eq!(std::fs::read_link(&link).unwrap(), cached);
        // A restart reuses the link as it is; a new image replaces it.
        use std::os::unix::fs::MetadataExt;
        let inode = |p: &Path| std::fs::symlink_metadata(p).unwrap().ino();
        let before = inode(&link);
        assert_eq!(driver.named_program("job", "greeter", &cached), link);
        assert_eq!(inode(&link), before);
        let newer = dir.path().join("88aa1234");
        std::fs::copy("/bin/sh", &newer).unwrap();
        assert_eq!(driver.named_program("job", "greeter", &newer), link);
        assert_eq!(std::fs::read_link(&link).unwrap(), newer);
    }

    #[tokio::test]
    async fn a_missing_program_is_a_start_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = assignment("sh", &[]);
        let artifact = Artifact {
            path: dir.path().join("nothing-here"),
        };
        let err = ExecDriver::new(linux(), Some(dir.path().join("programs")))
            .start(TaskConfig {
                assignment: &a,
                artifact: &artifact,
                work_dir: dir.path(),
                env: &[],
                log: std::fs::File::create(dir.path().join("log")).unwrap(),
                cgroup: None,
                network: None,
            })
            .await
            .err()
            .expect("no such program");
        assert!(matches!(err, DriverError::Spawn(_)), "{err}");
        // It names the program and what the kernel said.
        let text = err.to_string();
        assert!(
            text.contains("programs/job/sh") && text.contains("No such file or directory"),
            "{text}"
        );
    }
}
