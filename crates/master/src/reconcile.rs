//! The reconciler: what every node should run, decided in one place.
//!
//! [`desired_sets`] is a pure function from the stored facts (the nodes and
//! the services) to each node's [`DesiredSet`]. It does no I/O and holds no
//! lock: the hub loads the rows, calls it, and pushes the sets it returns.
//! Every path that changes what a node runs (deploy, update, del, a minion
//! connecting or reconnecting) goes through it, and so does every question
//! of the form "what runs on node X" (`nodes`, `forget`, a full status
//! report), so there is exactly one rule for placement.
//!
//! Today a service runs on the machine its spec names, if that machine is
//! an accepted member. Placement rules to come extend this function, not its
//! callers: failover (a node's reachability becomes an input, and a service
//! of an unreachable node is placed on another), replicas (one spec yields
//! several assignments on several nodes). The output shape already allows
//! both: a node's set is a list of assignments, and a service may appear in
//! any number of sets.

use std::collections::BTreeMap;

use phoenix_model::proto::{Assignment, DesiredSet};

use crate::store::{Node, Service};

/// Each accepted node's desired set, keyed by node name. A node that is not
/// accepted gets no entry (it cannot connect to receive one); a service
/// whose machine is not an accepted node is placed nowhere.
///
/// Each set carries its node's revision, which the store bumps in the same
/// transaction as any change to the set, so a minion can tell a newer set
/// from a stale one.
pub fn desired_sets(nodes: &[Node], services: &[Service]) -> BTreeMap<String, DesiredSet> {
    let mut sets: BTreeMap<String, DesiredSet> = nodes
        .iter()
        .filter(|n| n.accepted)
        .map(|n| {
            let set = DesiredSet {
                revision: n.revision,
                services: Vec::new(),
            };
            (n.name.clone(), set)
        })
        .collect();
    for svc in services {
        if let Some(set) = sets.get_mut(&svc.spec.machine) {
            set.services.push(assignment(svc));
        }
    }
    for set in sets.values_mut() {
        set.services.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    }
    sets
}

/// One node's desired set: empty (at revision 0) for a node that is not an
/// accepted member.
pub fn desired_set(node: &str, nodes: &[Node], services: &[Service]) -> DesiredSet {
    desired_sets(nodes, services)
        .remove(node)
        .unwrap_or_default()
}

/// What a minion needs to run one service.
fn assignment(svc: &Service) -> Assignment {
    Assignment {
        spec: svc.spec.clone(),
        ip: svc.ip,
        image_hash: svc.image_hash.clone(),
        image_size: svc.image_size,
        generation: svc.generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_model::net;
    use phoenix_model::spec::parse_specs;

    fn node(name: &str, accepted: bool, revision: u64) -> Node {
        Node {
            name: name.into(),
            key: format!("key-{name}"),
            accepted,
            public_ip: "10.0.0.2".parse().unwrap(),
            private_ip: "10.1.0.2".parse().unwrap(),
            overlay_ip: accepted.then(|| net::node_ip(1)),
            wg_port: 51820,
            token_proof: false,
            version: "0".into(),
            requested_at: 1,
            accepted_at: accepted.then_some(2),
            revision,
        }
    }

    fn service(name: &str, machine: &str, n: u64) -> Service {
        let text =
            format!(r#"{{"machine":"{machine}","name":"{name}","image":"app","type":"binary"}}"#);
        Service {
            spec: parse_specs("t", &text).unwrap().remove(0),
            ip: net::service_ip(n),
            image_hash: format!("hash-{name}"),
            image_size: 100 + n,
            generation: n + 1,
        }
    }

    #[test]
    fn a_service_runs_on_the_machine_it_names_with_its_assignment() {
        let nodes = [node("m1", true, 7), node("m2", true, 3)];
        let services = [
            service("web", "m1", 0),
            service("db", "m2", 1),
            service("api", "m1", 2),
        ];
        let sets = desired_sets(&nodes, &services);
        assert_eq!(sets.len(), 2);
        let m1 = &sets["m1"];
        assert_eq!(m1.revision, 7);
        let names: Vec<&str> = m1.services.iter().map(|a| a.spec.name.as_str()).collect();
        assert_eq!(names, ["api", "web"]);
        let web = &m1.services[1];
        assert_eq!(web.ip, net::service_ip(0));
        assert_eq!(web.image_hash, "hash-web");
        assert_eq!(web.image_size, 100);
        assert_eq!(web.generation, 1);
        assert_eq!(web.spec, services[0].spec);
        assert_eq!(sets["m2"].revision, 3);
        assert_eq!(sets["m2"].services[0].spec.name, "db");
        assert_eq!(sets["m2"].services[0].generation, 2);
    }

    #[test]
    fn a_machine_that_is_not_accepted_gets_nothing() {
        let nodes = [node("m1", true, 1), node("m2", false, 4)];
        let services = [service("web", "m2", 0), service("ghost", "nowhere", 1)];
        let sets = desired_sets(&nodes, &services);
        assert_eq!(sets.keys().collect::<Vec<_>>(), ["m1"]);
        assert!(sets["m1"].services.is_empty());
        assert_eq!(desired_set("m2", &nodes, &services), DesiredSet::default());
        assert_eq!(
            desired_set("nowhere", &nodes, &services),
            DesiredSet::default()
        );
    }

    #[test]
    fn a_deleted_service_is_gone_and_the_new_revision_is_carried() {
        let services = vec![service("web", "m1", 0), service("api", "m1", 1)];
        let before = desired_set("m1", &[node("m1", true, 1)], &services);
        assert_eq!(before.services.len(), 2);
        // `del web`: the row goes and the node's revision is bumped.
        let after = desired_set("m1", &[node("m1", true, 2)], &services[1..]);
        assert_eq!(after.revision, 2);
        let names: Vec<&str> = after
            .services
            .iter()
            .map(|a| a.spec.name.as_str())
            .collect();
        assert_eq!(names, ["api"]);
    }

    #[test]
    fn an_update_onto_another_machine_moves_the_service() {
        let nodes = [node("m1", true, 2), node("m2", true, 2)];
        let mut web = service("web", "m1", 0);
        web.spec.machine = "m2".into();
        web.generation = 2;
        let sets = desired_sets(&nodes, &[web]);
        assert!(sets["m1"].services.is_empty());
        assert_eq!(sets["m2"].services[0].generation, 2);
    }
}
