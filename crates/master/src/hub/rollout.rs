//! Zero-downtime updates: the new version of a proxied daemon starts
//! beside the old one, takes the traffic once healthy, and takes the
//! service's stable address once the old one has drained.
//!
//! The stored service carries the new version as `next` from the update
//! on, so the reconciler puts both in the node's desired set: the old run
//! as it was (holding the stable address), the new one under its own
//! instance key `NAME.GENERATION` at an address of its own. One task per
//! update ([`Hub::drive_rollout`]) then:
//!
//! 1. waits until the minion reports the new run running (and healthy, if
//!    it has a health check). A new run that fails, backs off or turns
//!    unhealthy, or is not up within `--update-timeout-ms`, ends the
//!    update: `next` is dropped, the old version never stopped serving,
//!    nothing was switched, and `wait` reports the update failed;
//! 2. switches the routes: the proxy sends new requests to the new run
//!    only, and the old one drains (its requests in flight finish, up to
//!    `--drain-timeout-ms`);
//! 3. promotes `next` in one store transaction: the old run leaves the
//!    desired set (its minion stops it) and the new one holds the stable
//!    address (its minion adds the address to the run's namespace and
//!    points the host route at it, without a restart).
//!
//! A master restart in the middle resumes from the store: the update's
//! task starts again at step 1.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use phoenix_model::proto::{Deleted, Verdict};
use phoenix_model::status::ServiceStatus;

use super::observed::{Wanted, judge};
use super::{ApiError, Hub};
use crate::lock;
use crate::store::Service;

/// Lines of a failed update's new version's log kept for `update` to
/// show, as the CLI shows of a service that did not start.
const FAILED_LOG_LINES: usize = 10;
/// How long the failure waits for those lines from the minion.
const LOG_TAIL_WAIT: Duration = Duration::from_secs(2);

/// The in-memory side of updates and draining deletes.
#[derive(Default)]
pub(super) struct Rollouts {
    /// Services whose new version takes the traffic while the old drains.
    pub(super) switching: HashSet<String>,
    /// Services being drained before their deletion.
    pub(super) deleting: HashSet<String>,
    /// Why an update ended without a switch: name → (its generation, why,
    /// the last lines of the new version's log, which went with it).
    failures: HashMap<String, (u64, String, Option<String>)>,
}

/// Where a waited-for update stands.
pub(super) enum RolloutStage {
    /// Switched (or never an update): judge the run with this key.
    Judge(String),
    /// The new version is still coming up beside the old.
    Starting,
    /// It ended without a switch.
    Ended(Verdict, Option<String>),
}

/// What became of the new version while the driver waited for it.
enum Came {
    Up,
    Failed(String),
    /// Replaced by a newer update, or the service deleted: not ours to end.
    Superseded,
}

impl Hub {
    /// Where the update of `name` to `generation` stands (for `wait`).
    pub(super) fn rollout_stage(&self, name: &str, generation: u64) -> RolloutStage {
        let svc = self.store().read().and_then(|tx| tx.service(name));
        match svc {
            Ok(Some(svc)) if svc.generation >= generation => {
                RolloutStage::Judge(svc.instance().to_owned())
            }
            Ok(Some(svc))
                if svc
                    .next
                    .as_ref()
                    .is_some_and(|n| n.generation == generation) =>
            {
                RolloutStage::Starting
            }
            Ok(Some(_)) => {
                let failure = lock(&self.rollouts)
                    .failures
                    .get(name)
                    .filter(|(g, ..)| *g == generation)
                    .map(|(_, why, _)| why.clone());
                RolloutStage::Ended(
                    Verdict::Failed,
                    Some(failure.unwrap_or_else(|| {
                        "the update was replaced by a newer change before it switched".into()
                    })),
                )
            }
            Ok(None) => RolloutStage::Ended(
                Verdict::Failed,
                Some("the service was deleted during the update".into()),
            ),
            Err(e) => RolloutStage::Ended(Verdict::Failed, Some(e.to_string())),
        }
    }

    /// Starts the task of every update the store holds (after a master
    /// restart).
    pub fn resume_rollouts(self: &Arc<Self>) -> Result<(), ApiError> {
        let pending: Vec<(String, u64)> = self
            .store()
            .read()?
            .services()?
            .into_iter()
            .filter_map(|s| Some((s.spec.name, s.next?.generation)))
            .collect();
        for (name, generation) in pending {
            tracing::info!(service = %name, generation, "resuming the update");
            tokio::spawn(self.clone().drive_rollout(name, generation));
        }
        Ok(())
    }

    /// Starts the task of the update of `name` to `generation`.
    pub fn start_rollout(self: &Arc<Self>, name: &str, generation: u64) {
        tokio::spawn(self.clone().drive_rollout(name.to_owned(), generation));
    }

    /// One update, from the new version's start to the switch (see the
    /// module's text).
    async fn drive_rollout(self: Arc<Self>, name: String, generation: u64) {
        let started = tokio::time::Instant::now();
        let outcome = self.came_up(&name, generation, started).await;
        let why = match outcome {
            Came::Superseded => return,
            Came::Failed(why) => why,
            Came::Up => {
                let old = match self.store().read().and_then(|tx| tx.service(&name)) {
                    Ok(Some(svc)) => svc.instance().to_owned(),
                    _ => return,
                };
                lock(&self.rollouts).switching.insert(name.clone());
                self.drain(&old).await;
                match self.promote(&name, generation) {
                    Ok(true) => {
                        tracing::info!(service = %name, generation, took_ms = started.elapsed().as_millis() as u64, "update switched");
                        lock(&self.rollouts).switching.remove(&name);
                        self.routes_changed.notify_one();
                        self.status_changed();
                        return;
                    }
                    Ok(false) => {
                        lock(&self.rollouts).switching.remove(&name);
                        self.routes_changed.notify_one();
                        return;
                    }
                    Err(e) => format!("the switch could not be stored: {e}"),
                }
            }
        };
        tracing::warn!(service = %name, generation, "update failed: {why}");
        lock(&self.rollouts).switching.remove(&name);
        // The new version's log goes with it: its last lines are kept
        // with the failure for `update` to show (the service's own log is
        // the old version's, which kept serving).
        let tail = match self.next_run(&name, generation) {
            Some((node, key)) => {
                self.log_tail_at(&node, &key, FAILED_LOG_LINES, LOG_TAIL_WAIT)
                    .await
            }
            None => None,
        };
        if let Err(e) = self.abandon(&name, generation, &why, tail) {
            tracing::error!(service = %name, "cannot drop the failed update's new version: {e}");
        }
        self.routes_changed.notify_one();
        self.status_changed();
    }

    /// Waits until the new run is up, fails, or the update is superseded.
    async fn came_up(&self, name: &str, generation: u64, started: tokio::time::Instant) -> Came {
        let mut changes = self.observed.changes.subscribe();
        let deadline = started + self.settings.update_timeout;
        let want = Wanted {
            generation,
            oneshot: false,
        };
        loop {
            let next = match self.store().read().and_then(|tx| tx.service(name)) {
                Ok(Some(svc)) => svc.next.filter(|n| n.generation == generation),
                Ok(None) => None,
                Err(e) => return Came::Failed(e.to_string()),
            };
            let Some(next) = next else {
                return Came::Superseded;
            };
            let status: Option<ServiceStatus> = self.reported(&next.run.instance);
            match judge(&want, status.as_ref(), None) {
                (Verdict::Running, _) => return Came::Up,
                (Verdict::Failed, why) => {
                    // It is stopped now, not restarted: drop that part.
                    let why = why.unwrap_or_else(|| "failed".into());
                    let why = why.split("; restarting in").next().unwrap_or(&why);
                    return Came::Failed(format!(
                        "the new version ({}) did not come up: {why}; the old one kept serving",
                        next.run.instance,
                    ));
                }
                _ => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                let state = status.map_or("not reported", |s| s.state.as_str());
                return Came::Failed(format!(
                    "the new version ({}) was not up within {} s (last state: {state}); the old \
                     one kept serving",
                    next.run.instance,
                    self.settings.update_timeout.as_secs()
                ));
            }
            // Reports wake this; the tick notices a deadline.
            let tick = now + Duration::from_secs(1);
            let _ = tokio::time::timeout_at(deadline.min(tick), changes.changed()).await;
        }
    }

    /// Takes the run `key` out of the proxy's rotation at once and waits
    /// until the requests in flight on it are done, for at most the drain
    /// timeout. Without the proxy there is nothing to wait for.
    pub(super) async fn drain(&self, key: &str) {
        self.routes_changed.notify_one();
        let Some(front) = self.front.get() else {
            return;
        };
        // The table is set here, not by the route keeper some time later:
        // once this returns, no new request picks the run.
        match self.route_table() {
            Ok(table) => front.set_routes(&table),
            Err(e) => tracing::error!("cannot compute the proxy's routes: {e}"),
        }
        let limit = self.settings.drain_timeout;
        if tokio::time::timeout(limit, front.drained(key))
            .await
            .is_err()
        {
            tracing::warn!(
                instance = key,
                "requests still in flight after the drain timeout ({} s); stopping it anyway",
                limit.as_secs()
            );
        }
    }

    /// Makes the new version the service's, if the update is still the
    /// current one. `Ok(false)`: it was superseded meanwhile.
    fn promote(&self, name: &str, generation: u64) -> Result<bool, ApiError> {
        let (done, changed) = self.write_change(|tx| {
            let Some(svc) = tx.service(name)? else {
                return Ok((false, Default::default()));
            };
            let Some(promoted) = svc.promoted().filter(|p| p.generation == generation) else {
                return Ok((false, Default::default()));
            };
            tx.put_service(&promoted)?;
            tx.audit(
                "phoenix",
                "update-switch",
                name,
                Some(&svc.to_json()),
                Some(&promoted.to_json()),
            )?;
            let touched = [svc.spec.machine.clone(), promoted.spec.machine.clone()]
                .into_iter()
                .collect();
            Ok((true, touched))
        })?;
        if done {
            self.publish(&changed);
        }
        Ok(done)
    }

    /// Where the new version of `name`'s update to `generation` runs:
    /// (machine, run key).
    fn next_run(&self, name: &str, generation: u64) -> Option<(String, String)> {
        let svc = self.store().read().and_then(|tx| tx.service(name)).ok()??;
        let next = svc.next.filter(|n| n.generation == generation)?;
        Some((next.spec.machine, next.run.instance))
    }

    /// The last lines of the log of a failed update's new version, if it
    /// is one (see `drive_rollout`).
    pub(super) fn failed_update_log(&self, name: &str, generation: u64) -> Option<String> {
        lock(&self.rollouts)
            .failures
            .get(name)
            .filter(|(g, ..)| *g == generation)
            .and_then(|(_, _, tail)| tail.clone())
    }

    /// Drops the new version of a failed update (if still the current
    /// one) and remembers why (and its last log lines), for `wait`.
    fn abandon(
        &self,
        name: &str,
        generation: u64,
        why: &str,
        tail: Option<String>,
    ) -> Result<(), ApiError> {
        lock(&self.rollouts)
            .failures
            .insert(name.to_owned(), (generation, why.to_owned(), tail));
        let (_, changed) = self.write_change(|tx| {
            let Some(mut svc) = tx.service(name)? else {
                return Ok(((), Default::default()));
            };
            let Some(next) = svc.next.take().filter(|n| n.generation == generation) else {
                return Ok(((), Default::default()));
            };
            tx.put_service(&svc)?;
            tx.audit(
                "phoenix",
                "update-failed",
                name,
                Some(&serde_json::json!({ "generation": generation, "reason": why })),
                None,
            )?;
            Ok(((), [next.spec.machine].into_iter().collect()))
        })?;
        self.publish(&changed);
        Ok(())
    }

    /// Deletes a service after draining it from the proxy: new requests
    /// go to the route's other instances (or get a 503 if there are none)
    /// while those in flight finish, for at most the drain timeout.
    pub async fn delete_drained(&self, actor: &str, name: &str) -> Result<Deleted, ApiError> {
        let svc: Option<Service> = self.store().read()?.service(name).ok().flatten();
        if let Some(svc) = svc.filter(|s| s.spec.proxyname.is_some()) {
            lock(&self.rollouts).deleting.insert(name.to_owned());
            self.drain(svc.instance()).await;
        }
        let deleted = self.delete(actor, name);
        lock(&self.rollouts).deleting.remove(name);
        self.routes_changed.notify_one();
        deleted
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use phoenix_model::proto::{Assignment, ToMinion};
    use phoenix_model::status::{Health, ServiceState, ServiceStatus};
    use tokio::sync::mpsc;

    use super::*;
    use crate::hub::Apply;
    use crate::hub::apply::tests::{hub, next_set};

    fn web(args: &str) -> String {
        format!(
            r#"{{"machine":"m1","name":"web","image":"app","type":"binary","args":["{args}"],"proxyname":"shop.example"}}"#
        )
    }

    fn keys(set: &[Assignment]) -> Vec<(String, bool, u64)> {
        set.iter()
            .map(|a| (a.key().to_owned(), a.holds_ip, a.generation))
            .collect()
    }

    fn status(key: &str, generation: u64, state: ServiceState) -> ServiceStatus {
        ServiceStatus {
            name: "web".into(),
            instance: (key != "web").then(|| key.to_owned()),
            generation,
            state,
            pid: Some(7),
            restarts: 0,
            last_exit: None,
            limits: None,
            health: Health::None,
            since: 1,
            message: None,
        }
    }

    fn connected(hub: &Hub, host_network: bool) -> mpsc::UnboundedReceiver<ToMinion> {
        let (tx, rx) = mpsc::unbounded_channel();
        hub.connect("m1", "0", host_network, tx);
        rx
    }

    #[test]
    fn an_update_of_a_proxied_daemon_runs_the_new_version_beside_then_promotes_it() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let mut rx = connected(&hub, false);
        hub.apply("root", Apply::Deploy, "w", &web("1")).unwrap();
        let stable = next_set(&mut rx).unwrap().services[0].ip;

        let applied = hub.apply("root", Apply::Update, "w", &web("2")).unwrap();
        assert!(applied[0].beside, "{applied:?}");
        assert_eq!(applied[0].generation, 2);
        let set = next_set(&mut rx).unwrap();
        assert_eq!(
            keys(&set.services),
            [("web".into(), true, 1), ("web.2".into(), false, 2)]
        );
        let new = &set.services[1];
        assert_eq!(new.spec.args, ["2"]);
        assert_eq!(new.ip, stable, "PHOENIX_IP stays the stable address");
        let own = new.own_ip.expect("an address of its own");
        assert_ne!(own, stable);
        assert!(matches!(
            hub.rollout_stage("web", 2),
            RolloutStage::Starting
        ));
        // Status and info still show the version that serves.
        assert_eq!(hub.info("web").unwrap().args, ["1"]);
        assert!(hub.status("web").unwrap().update.is_some());

        assert!(hub.promote("web", 2).unwrap());
        let set = next_set(&mut rx).unwrap();
        assert_eq!(keys(&set.services), [("web.2".into(), true, 2)]);
        assert_eq!(set.services[0].own_ip, Some(own));
        assert_eq!(set.services[0].ip, stable);
        assert!(matches!(hub.rollout_stage("web", 2), RolloutStage::Judge(k) if k == "web.2"));
        assert_eq!(hub.info("web").unwrap().args, ["2"]);
        // A second promotion of the same update changes nothing.
        assert!(!hub.promote("web", 2).unwrap());

        // The next update runs beside web.2, at yet another address.
        let applied = hub.apply("root", Apply::Update, "w", &web("3")).unwrap();
        assert_eq!((applied[0].beside, applied[0].generation), (true, 3));
        let set = next_set(&mut rx).unwrap();
        assert_eq!(
            keys(&set.services),
            [("web.2".into(), true, 2), ("web.3".into(), false, 3)]
        );
        assert!(![Some(stable), Some(own)].contains(&set.services[1].own_ip));
        // It fails: the new run goes, web.2 is untouched, `wait` says why.
        hub.abandon("web", 3, "it crashed", None).unwrap();
        let set = next_set(&mut rx).unwrap();
        assert_eq!(keys(&set.services), [("web.2".into(), true, 2)]);
        match hub.rollout_stage("web", 3) {
            RolloutStage::Ended(Verdict::Failed, Some(why)) => assert_eq!(why, "it crashed"),
            _ => panic!("not ended"),
        }
        let audit: Vec<String> = hub
            .store()
            .read()
            .unwrap()
            .audit_log(10)
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert!(audit.contains(&"update-switch".to_owned()), "{audit:?}");
        assert!(audit.contains(&"update-failed".to_owned()), "{audit:?}");
    }

    #[test]
    fn other_changes_stop_the_old_version_first() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        // A minion whose services share its network cannot run two.
        let mut rx = connected(&hub, true);
        hub.apply("root", Apply::Deploy, "w", &web("1")).unwrap();
        let applied = hub.apply("root", Apply::Update, "w", &web("2")).unwrap();
        assert!(!applied[0].beside);
        next_set(&mut rx);
        assert_eq!(
            keys(&next_set(&mut rx).unwrap().services),
            [("web".into(), true, 2)]
        );
        // Not proxied: nothing to keep serving.
        let plain = r#"{"machine":"m1","name":"job","image":"app","type":"binary"}"#;
        let mut rx = connected(&hub, false);
        hub.apply("root", Apply::Deploy, "j", plain).unwrap();
        assert!(!hub.apply("root", Apply::Update, "j", plain).unwrap()[0].beside);
        while next_set(&mut rx).is_some() {}
    }

    /// `wait` for web, which must answer within 5 s.
    async fn settle(hub: &Hub) -> Vec<phoenix_model::proto::Settled> {
        let names = ["web".to_owned()];
        tokio::time::timeout(
            Duration::from_secs(5),
            hub.wait(&names, Duration::from_secs(5)),
        )
        .await
        .expect("wait answers")
        .expect("a verdict")
    }

    #[tokio::test]
    async fn the_update_switches_once_the_new_run_is_up_and_fails_if_it_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Arc::new(hub(dir.path()));
        let mut rx = connected(&hub, false);
        hub.apply("root", Apply::Deploy, "w", &web("1")).unwrap();
        hub.apply("root", Apply::Update, "w", &web("2")).unwrap();
        hub.start_rollout("web", 2);
        hub.report_status(
            "m1",
            vec![status("web.2", 2, ServiceState::Starting)],
            false,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(
            hub.rollout_stage("web", 2),
            RolloutStage::Starting
        ));
        hub.report_status("m1", vec![status("web.2", 2, ServiceState::Running)], false);
        // The wait judges web.2 once switched; it reports running.
        let settled = settle(&hub).await;
        assert_eq!(settled[0].verdict, Verdict::Running, "{settled:?}");
        assert_eq!(settled[0].view.instance.as_deref(), Some("web.2"));
        while next_set(&mut rx).is_some() {}

        hub.apply("root", Apply::Update, "w", &web("3")).unwrap();
        hub.start_rollout("web", 3);
        hub.report_status("m1", vec![status("web.3", 3, ServiceState::Backoff)], false);
        let settled = settle(&hub).await;
        assert_eq!(settled[0].verdict, Verdict::Failed);
        assert!(
            settled[0]
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("old one kept serving"),
            "{settled:?}"
        );
        assert_eq!(hub.info("web").unwrap().args, ["2"]);

        // A change that is not side by side (no proxyname any more)
        // restarts the run that serves it, web.2, and the wait judges it.
        let plain = r#"{"machine":"m1","name":"web","image":"app","type":"binary"}"#;
        let applied = hub.apply("root", Apply::Update, "w", plain).unwrap();
        assert_eq!((applied[0].beside, applied[0].generation), (false, 3));
        hub.report_status("m1", vec![status("web.2", 3, ServiceState::Running)], false);
        let settled = settle(&hub).await;
        assert_eq!(settled[0].verdict, Verdict::Running, "{settled:?}");
    }
}
