//! The `exec` driver: a binary from the image cache, run as the leader of
//! its own process group.
//!
//! The program is the image file itself (nothing to prepare). The process
//! gets a clean environment (`PATH`, the spec's `env`, then Phoenix's
//! variables), the task's work directory, and its log file as stdout and
//! stderr. Signals go to the whole group, so stopping a service reaches
//! every process it started, and destroying a run kills what the leader
//! left behind in its group.

use std::path::Path;

use phoenix_model::proto::Assignment;

use super::{
    Artifact, BoxFuture, Driver, DriverError, DriverName, TaskConfig, TaskDir, TaskHandle,
};
use crate::process::{self, Launch, Proc, Target};
use crate::state::RunRecord;

/// The `PATH` a binary service starts with, before the spec's `env`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct ExecDriver;

impl Driver for ExecDriver {
    fn name(&self) -> DriverName {
        DriverName::Exec
    }

    fn prepare<'a>(
        &'a self,
        image: &'a Path,
        _a: &'a Assignment,
    ) -> BoxFuture<'a, Result<Artifact, DriverError>> {
        Box::pin(std::future::ready(Ok(Artifact {
            path: image.to_owned(),
        })))
    }

    fn start<'a>(&'a self, task: TaskConfig<'a>) -> BoxFuture<'a, Result<TaskHandle, DriverError>> {
        // Spawning is synchronous: no await, the future is ready at once.
        Box::pin(std::future::ready(spawn(task)))
    }

    fn recover(&self, record: &RunRecord) -> Option<TaskHandle> {
        let proc = Proc::adopt(record.pid, record.start_time, Target::Group)?;
        Some(TaskHandle {
            pid: record.pid,
            start_time: record.start_time,
            limits: None,
            process: Box::new(proc),
        })
    }

    fn destroy<'a>(&'a self, _dir: TaskDir<'a>, task: Option<TaskHandle>) -> BoxFuture<'a, ()> {
        // Whatever the leader left behind in its group goes with it.
        if let Some(task) = task {
            process::kill_group(task.pid, libc::SIGKILL);
        }
        Box::pin(std::future::ready(()))
    }
}

fn spawn(task: TaskConfig<'_>) -> Result<TaskHandle, DriverError> {
    let spec = &task.assignment.spec;
    let mut env = vec![("PATH".to_owned(), DEFAULT_PATH.to_owned())];
    env.extend(spec.env_pairs().map(|(k, v)| (k.to_owned(), v.to_owned())));
    env.extend(task.env.iter().cloned());
    let proc = Proc::spawn(Launch {
        program: &task.artifact.path,
        args: &spec.args,
        env,
        cwd: task.work_dir,
        log: task.log,
    })
    .map_err(DriverError::Spawn)?;
    let pid = proc.pid().unwrap_or(0);
    Ok(TaskHandle {
        pid,
        start_time: process::process_start_time(pid).unwrap_or(0),
        limits: None,
        process: Box::new(proc),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn assignment(args: &[&str]) -> Assignment {
        let mut spec = phoenix_model::spec::parse_specs(
            "t",
            r#"{"machine":"m","name":"job","type":"binary","image":"sh","env":["GREETING=hi"]}"#,
        )
        .unwrap()
        .remove(0);
        spec.args = args.iter().map(|s| s.to_string()).collect();
        Assignment {
            spec,
            ip: phoenix_model::net::service_ip(0),
            image_hash: String::new(),
            image_size: 0,
            generation: 1,
        }
    }

    #[tokio::test]
    async fn starts_recovers_and_destroys_a_process_group() {
        let _ = crate::reaper::start();
        let dir = tempfile::tempdir().unwrap();
        // The echo comes after the background sleep has been forked.
        let a = assignment(&["-c", "sleep 30 & echo \"$GREETING $PORT\"; sleep 30"]);
        let driver = ExecDriver;
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
            })
            .await
            .unwrap();
        assert!(process::group_alive(handle.pid));
        let record = RunRecord {
            pid: handle.pid,
            start_time: handle.start_time,
            generation: 1,
            restarts: 0,
            driver: DriverName::Exec,
        };
        let mut recovered = driver.recover(&record).expect("the process runs");
        let stale = RunRecord {
            start_time: record.start_time + 1,
            ..record.clone()
        };
        assert!(driver.recover(&stale).is_none());
        for _ in 0..250 {
            if std::fs::read_to_string(&log_path).unwrap() == "hi 8123\n" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Ending the leader leaves its background sleep; destroy ends it.
        process::kill_one(handle.pid, libc::SIGKILL);
        let exit = handle.process.wait().await;
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        tokio::time::timeout(Duration::from_secs(5), recovered.process.wait())
            .await
            .unwrap();
        let pgid = handle.pid;
        assert!(process::group_alive(pgid));
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
            if !process::group_alive(pgid) {
                assert_eq!(std::fs::read_to_string(&log_path).unwrap(), "hi 8123\n");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("process group {pgid} survived destroy");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_start_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = assignment(&[]);
        let artifact = Artifact {
            path: dir.path().join("nothing-here"),
        };
        let err = ExecDriver
            .start(TaskConfig {
                assignment: &a,
                artifact: &artifact,
                work_dir: dir.path(),
                env: &[],
                log: std::fs::File::create(dir.path().join("log")).unwrap(),
            })
            .await
            .err()
            .expect("no such program");
        assert!(matches!(err, DriverError::Spawn(_)), "{err}");
    }
}
