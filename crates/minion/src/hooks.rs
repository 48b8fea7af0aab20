//! Per-service resources, set up around the driver by the task runner, for
//! every kind of task alike (after Nomad's task hooks): cgroups here, a
//! network namespace and firewall rules in [`net`].
//!
//! The cgroup hook:
//! - before a start, [`ServiceCgroups::enter`] creates the service's cgroups with its
//!   `memory`/`cpus` limits and opens them for joining; the driver has the
//!   process it starts join them between fork and exec (a binary; crun,
//!   whose container inherits them), so nothing the service ever forks is
//!   outside them;
//! - after a run ends (exit, stop, crash, failed health, a failed start),
//!   [`clear`] kills everything left in them — a double-forked or `setsid`
//!   grandchild is no longer in the process group, but is in the cgroup —
//!   waits until they are empty and removes them (and the `phoenix` parents
//!   once empty);
//! - after a minion restart, a service whose recorded process is gone, and
//!   a service with cgroups but no longer wanted, is cleared the same way
//!   before anything else runs ([`ServiceCgroups::clear_leftover`]).
//!
//! What the cgroups applied is the service's `status.limits`
//! ([`ServiceCgroup::description`]), kept in its run record across minion
//! restarts.

pub mod net;

use std::sync::Arc;
use std::time::Duration;

use phoenix_host::cgroup::{CgroupJoin, CgroupMode, Cgroups, Limits, ServiceCgroup};
use phoenix_model::proto::Assignment;

/// How long [`clear`] waits for the killed processes to be gone. SIGKILL
/// is not instant for a process in uninterruptible sleep (a hung NFS read),
/// so this is generous; past it the cgroups are left, and said so.
const CLEAR_TIMEOUT: Duration = Duration::from_secs(10);

/// The cgroups of this minion's services.
///
/// cgroups are host-wide, and one host may run several minions (the demo,
/// the tests; each with its own data dir): each service's cgroup is named
/// `SERVICE@MINION`, where MINION is a short id of the minion's key, so
/// that a minion never touches another's services.
pub struct ServiceCgroups {
    cgroups: Cgroups,
    /// `@` and the minion's id.
    suffix: String,
}

impl ServiceCgroups {
    /// The cgroups of services of the minion with public key `minion_key`.
    pub fn new(cgroups: Cgroups, minion_key: &str) -> ServiceCgroups {
        let id = blake3::hash(minion_key.as_bytes()).to_hex();
        ServiceCgroups {
            cgroups,
            suffix: format!("@{}", &id[..8]),
        }
    }

    pub fn mode(&self) -> CgroupMode {
        self.cgroups.mode()
    }

    /// The cgroup name of the run with key `key` (`KEY@MINION`; the key is
    /// the service's name, or `NAME.GENERATION` for a run an update
    /// started, whose `.` is written `_`: cgroup interface files are the
    /// names with a dot, and service names have no `_`).
    pub fn cgroup_name(&self, key: &str) -> String {
        format!("{}{}", key.replace('.', "_"), self.suffix)
    }

    /// A service's cgroups for a start: created, with the limits applied,
    /// and opened for joining (`None` when this host tracks no processes).
    pub fn enter(
        &self,
        a: &Assignment,
    ) -> Result<(ServiceCgroup, Option<Arc<CgroupJoin>>), String> {
        let limits = Limits {
            memory: a.spec.memory,
            cpus: a.spec.cpus,
        };
        let cg = self
            .cgroups
            .create(&self.cgroup_name(a.key()), &limits)
            .map_err(|e| e.to_string())?;
        if !cg.is_tracked() {
            return Ok((cg, None));
        }
        match cg.prepare_join() {
            Ok(join) => Ok((cg, Some(Arc::new(join)))),
            Err(e) => {
                let _ = cg.remove();
                Err(e.to_string())
            }
        }
    }

    /// The cgroups service `service` has now (nothing is created).
    pub fn open(&self, service: &str) -> Result<ServiceCgroup, String> {
        self.cgroups
            .open(&self.cgroup_name(service))
            .map_err(|e| e.to_string())
    }

    /// The keys of this minion's runs that have cgroups.
    pub fn services(&self) -> Vec<String> {
        self.cgroups
            .services()
            .into_iter()
            .filter_map(|n| n.strip_suffix(&self.suffix).map(|k| k.replace('_', ".")))
            .collect()
    }

    /// Clears what `service` left in its cgroups, if it has any (after a
    /// minion restart).
    pub async fn clear_leftover(&self, service: &str) {
        match self.open(service) {
            Ok(cg) => clear(&cg).await,
            Err(e) => tracing::warn!(service, "{e}"),
        }
    }
}

/// Kills every process left in `cg`, waits until none is listed, and
/// removes the cgroups. Errors are logged: a service whose cgroups cannot
/// be cleared still restarts (into the same cgroups).
pub async fn clear(cg: &ServiceCgroup) {
    if !cg.is_tracked() {
        return;
    }
    let began = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    let mut last_kill = None;
    loop {
        let pids = match cg.pids() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(service = %cg.name(), "{e}");
                break;
            }
        };
        if pids.is_empty() {
            break;
        }
        if began.elapsed() >= CLEAR_TIMEOUT {
            tracing::warn!(
                service = %cg.name(),
                ?pids,
                "processes survived SIGKILL for {CLEAR_TIMEOUT:?}; their cgroups stay"
            );
            return;
        }
        // Again now and then: without a freezer, a process forked between
        // the listing and the signals escapes one round.
        if last_kill.is_none_or(|t: tokio::time::Instant| t.elapsed() >= Duration::from_millis(100))
        {
            if let Err(e) = cg.kill_all() {
                tracing::warn!(service = %cg.name(), "{e}");
            }
            last_kill = Some(tokio::time::Instant::now());
            // Often gone at once (`cgroup.kill`): look before sleeping.
            continue;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    if let Err(e) = cg.remove() {
        tracing::warn!(service = %cg.name(), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_host::{FsMagic, Recording};

    fn v2_host() -> Arc<Recording> {
        let h = Arc::new(Recording::new());
        h.cgroupfs(
            "/sys/fs/cgroup",
            FsMagic::CGROUP2,
            &[("cgroup.procs", ""), ("cgroup.kill", "")],
        );
        h.put_file("/sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n");
        h
    }

    /// Two minions on one host: each sees, and clears, only its own.
    #[tokio::test(start_paused = true)]
    async fn minions_on_one_host_never_touch_each_others_services() {
        let h = v2_host();
        let at = |key| ServiceCgroups::new(Cgroups::at(h.clone(), "/sys/fs/cgroup"), key);
        let (one, two) = (at("key one"), at("key two"));
        let a = |name: &str| {
            let spec = phoenix_model::spec::parse_specs(
                "t",
                &format!(r#"{{"machine":"m","name":"{name}","type":"binary","image":"x"}}"#),
            )
            .unwrap()
            .remove(0);
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
        };
        let (web1, _) = one.enter(&a("web")).unwrap();
        let (web2, _) = two.enter(&a("web")).unwrap();
        let (db2, _) = two.enter(&a("db")).unwrap();
        assert_ne!(web1.name(), web2.name());
        for (pid, cg) in [(10, &web1), (20, &web2), (21, &db2)] {
            h.add_process(pid, pid, 1);
            cg.add(pid).unwrap();
        }
        assert_eq!(one.services(), ["web"]);
        assert_eq!(two.services(), ["db", "web"]);

        one.clear_leftover("web").await;
        assert!(!h.is_running(10));
        assert!(h.is_running(20) && h.is_running(21));
        assert!(one.services().is_empty());
        assert_eq!(two.services(), ["db", "web"]);
        // Nothing to clear is fine.
        one.clear_leftover("web").await;

        // A run an update started has cgroups of its own, beside the old
        // run's, found again by its key.
        let mut update = a("db");
        update.instance = Some(phoenix_model::proto::instance_key("db", 4));
        let (db4, _) = two.enter(&update).unwrap();
        assert_ne!(db4.name(), db2.name());
        h.add_process(22, 22, 1);
        db4.add(22).unwrap();
        assert_eq!(two.services(), ["db", "db.4", "web"]);
        two.clear_leftover("db.4").await;
        assert!(!h.is_running(22));
        assert!(h.is_running(21), "the old run is untouched");
        assert_eq!(two.services(), ["db", "web"]);
    }
}
