//! What a minion keeps on its own disk so it can run cut off from the master:
//! the last desired set, and per run the process it started.
//!
//! Per-run files are named by the run's key (`Assignment::key`): the
//! service's name, so nothing changes for a plain run, or `NAME.GENERATION`
//! for the run a zero-downtime update starts beside the old one.
//!
//! Layout of the data dir:
//! - `minion.key`: the minion's WireGuard private key;
//! - `overlay-ip`: the overlay address the master gave when it accepted us;
//! - `desired.json`: the last desired set received;
//! - `run/KEY.json`: the running task (pid, start time, generation, driver);
//! - `run/KEY.done.json`: how a oneshot of a generation ended;
//! - `logs/`, `images/`, `work/KEY/` (the run's working directory);
//! - `programs/KEY/IMAGE`: a binary service's program, by its image's name
//!   (a symlink into `images/`, see [`crate::driver::exec`]).

use std::path::PathBuf;

use phoenix_model::proto::DesiredSet;
use phoenix_model::status::Exit;
use serde::{Deserialize, Serialize};

use crate::driver::DriverName;

/// The task a service runs, as recorded at its start: enough for the
/// driver that started it to recover it after a minion restart.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(from = "StoredRunRecord")]
pub struct RunRecord {
    pub pid: u32,
    pub start_time: u64,
    pub generation: u64,
    pub restarts: u64,
    /// The driver that started it, and that recovers and cleans up after it.
    pub driver: DriverName,
    /// What its cgroups applied of `memory` and `cpus` (the status line),
    /// shown again after a minion restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<String>,
}

/// A run record as any version of the minion wrote it: before drivers, a
/// container was `"container": true` and a binary had no such field.
#[derive(Deserialize)]
struct StoredRunRecord {
    pid: u32,
    start_time: u64,
    generation: u64,
    restarts: u64,
    #[serde(default)]
    driver: Option<DriverName>,
    #[serde(default)]
    container: bool,
    #[serde(default)]
    limits: Option<String>,
}

impl From<StoredRunRecord> for RunRecord {
    fn from(r: StoredRunRecord) -> RunRecord {
        let driver = r.driver.unwrap_or(if r.container {
            DriverName::Oci
        } else {
            DriverName::Exec
        });
        RunRecord {
            pid: r.pid,
            start_time: r.start_time,
            generation: r.generation,
            restarts: r.restarts,
            driver,
            limits: r.limits,
        }
    }
}

/// How a oneshot ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DoneRecord {
    pub generation: u64,
    pub exit: Exit,
    pub restarts: u64,
}

#[derive(Clone, Debug)]
pub struct LocalState {
    pub dir: PathBuf,
}

impl LocalState {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("run"))?;
        std::fs::create_dir_all(dir.join("logs"))?;
        std::fs::create_dir_all(dir.join("images"))?;
        std::fs::create_dir_all(dir.join("work"))?;
        Ok(LocalState { dir })
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, rel: &str) -> Option<T> {
        let text = std::fs::read(self.dir.join(rel)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write<T: Serialize>(&self, rel: &str, value: &T) -> std::io::Result<()> {
        let data = serde_json::to_vec(value).map_err(std::io::Error::other)?;
        Ok(phoenix_host::fs::write_atomic(&self.dir.join(rel), &data)?)
    }

    pub fn desired(&self) -> Option<DesiredSet> {
        self.read("desired.json")
    }

    /// Mode 0600: the set holds the services' resolved environments,
    /// secrets included (`Assignment::env`), and only root may read them.
    pub fn save_desired(&self, set: &DesiredSet) -> std::io::Result<()> {
        let data = serde_json::to_vec(set).map_err(std::io::Error::other)?;
        let path = self.dir.join("desired.json");
        // A new file renamed over the old one: one an older minion wrote
        // 0644 is replaced, not kept.
        phoenix_host::fs::write_atomic_with_mode(&path, &data, 0o600)?;
        Ok(())
    }

    /// A thread that saves desired sets in the order given, skipping to the
    /// newest when several wait. The fsync stays off the runtime thread, so a
    /// busy disk cannot stall supervision (or heartbeats).
    pub fn desired_writer(&self) -> std::sync::mpsc::Sender<DesiredSet> {
        let (tx, rx) = std::sync::mpsc::channel::<DesiredSet>();
        let state = self.clone();
        std::thread::Builder::new()
            .name("desired-writer".into())
            .spawn(move || {
                while let Ok(mut set) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        set = newer;
                    }
                    if let Err(e) = state.save_desired(&set) {
                        tracing::error!(
                            revision = set.revision,
                            "cannot save the desired set: {e}"
                        );
                    }
                }
            })
            .expect("spawn the desired-set writer");
        tx
    }

    /// Where service `name`'s run record is.
    pub fn run_path(&self, name: &str) -> PathBuf {
        self.dir.join("run").join(format!("{name}.json"))
    }

    pub fn run_record(&self, name: &str) -> Option<RunRecord> {
        self.read(&format!("run/{name}.json"))
    }

    /// Recorded at every start; a plain write (not fsynced) because it is
    /// written on the restart path and a lost record only costs an adoption.
    pub fn save_run(&self, name: &str, rec: &RunRecord) -> std::io::Result<()> {
        let data = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        let path = self.dir.join(format!("run/{name}.json"));
        let tmp = self.dir.join(format!("run/{name}.json.tmp"));
        std::fs::write(&tmp, data)?;
        std::fs::rename(tmp, path)
    }

    pub fn done_record(&self, name: &str) -> Option<DoneRecord> {
        self.read(&format!("run/{name}.done.json"))
    }

    pub fn save_done(&self, name: &str, rec: &DoneRecord) -> std::io::Result<()> {
        self.write(&format!("run/{name}.done.json"), rec)
    }

    /// Forgets a service entirely (after it was deleted and stopped).
    pub fn forget(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(format!("run/{name}.json")));
        let _ = std::fs::remove_file(self.dir.join(format!("run/{name}.done.json")));
        let _ = std::fs::remove_dir_all(self.work_dir(name));
        let _ = std::fs::remove_dir_all(self.dir.join("programs").join(name));
    }

    pub fn work_dir(&self, name: &str) -> PathBuf {
        self.dir.join("work").join(name)
    }

    /// Our overlay address, once the master has accepted us.
    pub fn overlay_ip(&self) -> Option<std::net::Ipv6Addr> {
        std::fs::read_to_string(self.dir.join("overlay-ip"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn set_overlay_ip(&self, ip: std::net::Ipv6Addr) -> std::io::Result<()> {
        Ok(phoenix_host::fs::write_atomic(
            &self.dir.join("overlay-ip"),
            ip.to_string().as_bytes(),
        )?)
    }

    /// Keys of runs that have a run record (for cleaning up runs deleted
    /// while the minion was down).
    pub fn recorded_services(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.dir.join("run")) else {
            return Vec::new();
        };
        rd.filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let base = name.strip_suffix(".json")?;
            (!base.ends_with(".done")).then(|| base.to_owned())
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_records_name_their_driver_and_old_ones_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let state = LocalState::new(dir.path().to_owned()).unwrap();
        let old = |name: &str, json: &str| {
            std::fs::write(dir.path().join(format!("run/{name}.json")), json).unwrap();
            state.run_record(name).unwrap()
        };
        let box_ = old(
            "box",
            r#"{"pid":10,"start_time":20,"generation":3,"restarts":4,"container":true}"#,
        );
        assert_eq!(
            box_,
            RunRecord {
                pid: 10,
                start_time: 20,
                generation: 3,
                restarts: 4,
                driver: DriverName::Oci,
                limits: None,
            }
        );
        let bin = old(
            "bin",
            r#"{"pid":11,"start_time":21,"generation":1,"restarts":0,"container":false}"#,
        );
        assert_eq!(bin.driver, DriverName::Exec);
        let older = old(
            "older",
            r#"{"pid":12,"start_time":22,"generation":1,"restarts":0}"#,
        );
        assert_eq!(older.driver, DriverName::Exec);
        assert_eq!(older.pid, 12);

        // What is written now names the driver, and reads back the same.
        state.save_run("box", &box_).unwrap();
        let text = std::fs::read_to_string(dir.path().join("run/box.json")).unwrap();
        assert!(text.contains(r#""driver":"oci""#), "{text}");
        assert!(!text.contains("container"), "{text}");
        assert_eq!(state.run_record("box").unwrap(), box_);
        let exec = RunRecord {
            driver: DriverName::Exec,
            limits: Some("memory 64 MiB (cgroup v1)".into()),
            ..box_
        };
        state.save_run("bin", &exec).unwrap();
        assert_eq!(state.run_record("bin").unwrap(), exec);
    }
}
