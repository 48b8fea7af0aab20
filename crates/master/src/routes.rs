//! What the proxy serves: one pure function from the stored services and
//! what the minions report to the route table.
//!
//! Every service with a `proxyname` is an instance of the route for its
//! (`proxyname`, `proxypath`) pair; services that share a pair are
//! load-balanced (their `proxyport`s may differ). An instance is up while
//! its minion reports it running and not unhealthy; one that is stopped,
//! backing off, failed or unhealthy is out of the rotation within the
//! report that says so. Basic auth of a route is every `proxyauth` entry of
//! its instances (any one of them lets a request in), so instances that
//! disagree never lock a user out half the time.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, SocketAddrV6};

use phoenix_model::status::{Health, ServiceState, ServiceStatus};

use crate::store::Service;

/// One route: a host and a path prefix, and where its requests go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub host: String,
    /// `/` for the whole host.
    pub path: String,
    pub instances: Vec<RouteInstance>,
    /// `(user, bcrypt hash)`; empty: no auth.
    pub auth: Vec<(String, String)>,
}

/// One run of a service behind a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInstance {
    /// The run's instance key (the service's name, or `NAME.GENERATION`
    /// for a run an update started): the proxy's id for it.
    pub service: String,
    pub machine: String,
    /// The run's own address and its `proxyport`.
    pub addr: SocketAddr,
    /// Whether requests may go to it now.
    pub up: bool,
    /// Taking no new requests: its service is being deleted, or an
    /// update's new version took over and it finishes what it has.
    pub draining: bool,
}

/// Whether a reported status lets requests in.
pub fn is_up(status: Option<&ServiceStatus>) -> bool {
    status.is_some_and(|s| s.state == ServiceState::Running && s.health != Health::Unhealthy)
}

/// Services in the middle of a change that moves their traffic.
#[derive(Clone, Copy, Debug, Default)]
pub struct Moving<'a> {
    /// Updates whose new version takes the traffic while the old drains.
    pub switching: Option<&'a HashSet<String>>,
    /// Services drained before their deletion.
    pub deleting: Option<&'a HashSet<String>>,
}

impl Moving<'_> {
    fn switching(&self, name: &str) -> bool {
        self.switching.is_some_and(|s| s.contains(name))
    }

    fn deleting(&self, name: &str) -> bool {
        self.deleting.is_some_and(|s| s.contains(name))
    }
}

/// The route table, sorted by host then path (longest first within a
/// host, the order a lookup tries them in). A service being updated is
/// served by its current run until its new version is up and the update
/// switches: from then on the new run takes the requests and the old one
/// drains.
pub fn route_table<'a>(
    services: &[Service],
    status: impl Fn(&str) -> Option<&'a ServiceStatus>,
    moving: Moving<'_>,
) -> Vec<RouteSpec> {
    let mut routes: BTreeMap<(String, String), RouteSpec> = BTreeMap::new();
    for s in services {
        let switching = moving.switching(&s.spec.name) && s.next.is_some();
        let runs = std::iter::once((
            &s.spec,
            s.instance(),
            s.reach_ip(),
            switching || moving.deleting(&s.spec.name),
        ))
        .chain(
            s.next
                .as_ref()
                .filter(|_| switching)
                .map(|n| (&n.spec, n.run.instance.as_str(), n.run.own_ip, false)),
        );
        for (spec, key, ip, draining) in runs {
            let Some(host) = &spec.proxyname else {
                continue;
            };
            let path = spec.proxypath.clone().unwrap_or_else(|| "/".to_owned());
            let route = routes
                .entry((host.clone(), path.clone()))
                .or_insert_with(|| RouteSpec {
                    host: host.clone(),
                    path,
                    instances: Vec::new(),
                    auth: Vec::new(),
                });
            route.instances.push(RouteInstance {
                service: key.to_owned(),
                machine: spec.machine.clone(),
                addr: SocketAddr::V6(SocketAddrV6::new(ip, spec.proxyport, 0, 0)),
                up: is_up(status(key)),
                draining,
            });
            for entry in &spec.proxyauth {
                if let Some((user, hash)) = entry.split_once(':') {
                    let pair = (user.to_owned(), hash.to_owned());
                    if !route.auth.contains(&pair) {
                        route.auth.push(pair);
                    }
                }
            }
        }
    }
    let mut out: Vec<RouteSpec> = routes.into_values().collect();
    for r in &mut out {
        r.instances.sort_by(|a, b| a.service.cmp(&b.service));
        r.auth.sort();
    }
    out.sort_by(|a, b| {
        a.host
            .cmp(&b.host)
            .then(b.path.len().cmp(&a.path.len()))
            .then(a.path.cmp(&b.path))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_model::spec::parse_specs;
    use phoenix_model::status::now_ms;
    use std::collections::HashMap;

    fn services(json: &str) -> Vec<Service> {
        parse_specs("t", json)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, spec)| Service {
                spec,
                ip: phoenix_model::net::service_ip(i as u64),
                image_hash: String::new(),
                image_size: 0,
                generation: 1,
                run: None,
                next: None,
            })
            .collect()
    }

    fn status(name: &str, state: ServiceState, health: Health) -> ServiceStatus {
        ServiceStatus {
            name: name.into(),
            instance: None,
            generation: 1,
            state,
            pid: Some(1),
            restarts: 0,
            last_exit: None,
            limits: None,
            health,
            since: now_ms(),
            message: None,
        }
    }

    const HASH: &str = "$2y$05$abcdefghijklmnopqrstuu0123456789ABCDEFGHIJKLMNOPQRSTU";

    #[test]
    fn instances_group_by_name_and_path_and_only_running_healthy_ones_are_up() {
        let svcs = services(&format!(
            r#"[
            {{"machine":"m1","name":"web1","image":"x","type":"binary","proxyname":"example.com","proxyport":8000}},
            {{"machine":"m2","name":"web2","image":"x","type":"binary","proxyname":"example.com","proxyport":9000,
              "proxyauth":["ann:{HASH}"]}},
            {{"machine":"m1","name":"api","image":"x","type":"binary","proxyname":"example.com","proxypath":"/api"}},
            {{"machine":"m1","name":"other","image":"x","type":"binary","proxyname":"b.example.com"}},
            {{"machine":"m1","name":"internal","image":"x","type":"binary"}}
        ]"#
        ));
        let reported: HashMap<String, ServiceStatus> = [
            status("web1", ServiceState::Running, Health::Healthy),
            status("web2", ServiceState::Running, Health::Unhealthy),
            status("api", ServiceState::Running, Health::None),
        ]
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
        let table = route_table(&svcs, |n| reported.get(n), Moving::default());
        let keys: Vec<(&str, &str)> = table
            .iter()
            .map(|r| (r.host.as_str(), r.path.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("b.example.com", "/"),
                ("example.com", "/api"),
                ("example.com", "/")
            ]
        );
        let root = &table[2];
        let ups: Vec<(&str, bool, u16)> = root
            .instances
            .iter()
            .map(|i| (i.service.as_str(), i.up, i.addr.port()))
            .collect();
        assert_eq!(ups, [("web1", true, 8000), ("web2", false, 9000)]);
        assert_eq!(root.auth, [("ann".to_owned(), HASH.to_owned())]);
        assert!(table[1].instances[0].up, "running without a health check");
        assert!(!table[0].instances[0].up, "never reported: not up");
        assert_eq!(table[1].instances[0].addr.ip(), svcs[2].ip);
    }

    #[test]
    fn stopped_starting_and_backing_off_instances_are_out() {
        for state in [
            ServiceState::Starting,
            ServiceState::Backoff,
            ServiceState::Failed,
            ServiceState::Exited,
            ServiceState::Unhealthy,
        ] {
            assert!(
                !is_up(Some(&status("a", state, Health::Pending))),
                "{state:?}"
            );
        }
        assert!(is_up(Some(&status(
            "a",
            ServiceState::Running,
            Health::Pending
        ))));
    }

    #[test]
    fn an_update_switches_to_the_new_run_and_drains_the_old_one() {
        let mut svcs = services(
            r#"[{"machine":"m1","name":"web","image":"x","type":"binary","proxyname":"example.com"}]"#,
        );
        let own = phoenix_model::net::service_ip(9);
        let mut next_spec = svcs[0].spec.clone();
        next_spec.proxyport = 9000;
        svcs[0].next = Some(crate::store::NextVersion {
            spec: next_spec,
            image_hash: String::new(),
            image_size: 0,
            generation: 2,
            run: crate::store::Run {
                instance: "web.2".into(),
                own_ip: own,
            },
            since: 0,
        });
        let mut new = status("web", ServiceState::Running, Health::Healthy);
        new.instance = Some("web.2".into());
        let reported: HashMap<String, ServiceStatus> =
            [status("web", ServiceState::Running, Health::Healthy), new]
                .into_iter()
                .map(|s| (s.key().to_owned(), s))
                .collect();
        let runs = |moving| -> Vec<(String, bool, bool, u16)> {
            route_table(&svcs, |k| reported.get(k), moving)[0]
                .instances
                .iter()
                .map(|i| (i.service.clone(), i.up, i.draining, i.addr.port()))
                .collect()
        };
        // Before the switch the new run takes nothing, even once up.
        assert_eq!(runs(Moving::default()), [("web".into(), true, false, 8000)]);
        let switching: HashSet<String> = ["web".to_owned()].into();
        let moving = Moving {
            switching: Some(&switching),
            deleting: None,
        };
        assert_eq!(
            runs(moving),
            [
                ("web".into(), true, true, 8000),
                ("web.2".into(), true, false, 9000)
            ]
        );
        let table = route_table(&svcs, |k| reported.get(k), moving);
        assert_eq!(table[0].instances[1].addr.ip(), own);
        // A service being deleted drains.
        let moving = Moving {
            switching: None,
            deleting: Some(&switching),
        };
        assert_eq!(runs(moving), [("web".into(), true, true, 8000)]);
    }
}
