//! What a minion keeps on its own disk so it can run cut off from the master:
//! the last desired set, and per service the process it started.
//!
//! Layout of the data dir:
//! - `minion.key`: the minion's WireGuard private key;
//! - `overlay-ip`: the overlay address the master gave when it accepted us;
//! - `desired.json`: the last desired set received;
//! - `run/NAME.json`: the running process (pid, start time, generation);
//! - `run/NAME.done.json`: how a oneshot of a generation ended;
//! - `logs/`, `images/`, `work/NAME/` (the service's working directory).

use std::io::Write;
use std::path::{Path, PathBuf};

use phoenix_model::proto::DesiredSet;
use phoenix_model::status::Exit;
use serde::{Deserialize, Serialize};

/// The process a service runs, as recorded at its start.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RunRecord {
    pub pid: u32,
    pub start_time: u64,
    pub generation: u64,
    pub restarts: u64,
    /// A container's init (signalled alone), not a process group leader.
    #[serde(default)]
    pub container: bool,
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

/// Writes a file atomically: a temporary beside it, fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
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
        write_atomic(&self.dir.join(rel), &data)
    }

    pub fn desired(&self) -> Option<DesiredSet> {
        self.read("desired.json")
    }

    pub fn save_desired(&self, set: &DesiredSet) -> std::io::Result<()> {
        self.write("desired.json", set)
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
        write_atomic(&self.dir.join("overlay-ip"), ip.to_string().as_bytes())
    }

    /// Names of services that have a run record (for cleaning up services
    /// deleted while the minion was down).
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
