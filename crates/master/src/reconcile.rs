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
//!
//! The mesh is decided here too: which addresses each node serves (its
//! overlay address and its services'), so every minion gets every other as
//! a direct WireGuard peer, and `link` names resolve to addresses.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv6Addr, SocketAddr};

use phoenix_model::proto::{Assignment, DesiredSet, MeshPeer};
use phoenix_model::spec::Spec;

use crate::store::{Node, Service};

/// Each accepted node's desired set, keyed by node name. A node that is not
/// accepted gets no entry (it cannot connect to receive one); a service
/// whose machine is not an accepted node is placed nowhere.
///
/// Each set carries its node's revision, which the store bumps in the same
/// transaction as any change to the set, so a minion can tell a newer set
/// from a stale one.
///
/// Besides its services, a set lists the node's mesh peers: every other
/// accepted minion with the addresses it serves ([`mesh`]). Each
/// assignment carries the addresses of the services its spec links to
/// (those that exist). Both are sorted, so equal input gives equal sets.
pub fn desired_sets(nodes: &[Node], services: &[Service]) -> BTreeMap<String, DesiredSet> {
    let mesh = mesh(nodes, services);
    let mut sets: BTreeMap<String, DesiredSet> = nodes
        .iter()
        .filter(|n| n.accepted)
        .map(|n| {
            let set = DesiredSet {
                revision: n.revision,
                services: Vec::new(),
                peers: mesh.iter().filter(|p| p.node != n.name).cloned().collect(),
            };
            (n.name.clone(), set)
        })
        .collect();
    let addresses: HashMap<&str, Ipv6Addr> = services
        .iter()
        .map(|s| (s.spec.name.as_str(), s.ip))
        .collect();
    for svc in services {
        if let Some(set) = sets.get_mut(&svc.spec.machine) {
            set.services.push(assignment(svc, &addresses));
        }
        // An update's new version, beside the current one until the switch.
        if let Some(next) = &svc.next
            && let Some(set) = sets.get_mut(&next.spec.machine)
        {
            let mut a = assignment(svc, &addresses);
            a.spec = next.spec.clone();
            a.image_hash = next.image_hash.clone();
            a.image_size = next.image_size;
            a.generation = next.generation;
            a.links = links(&next.spec, &addresses);
            a.instance = Some(next.run.instance.clone());
            a.own_ip = Some(next.run.own_ip);
            a.holds_ip = false;
            set.services.push(a);
        }
    }
    for set in sets.values_mut() {
        set.services
            .sort_by(|a, b| (&a.spec.name, a.key()).cmp(&(&b.spec.name, b.key())));
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

/// Every accepted minion as a WireGuard peer, by name: its key, overlay
/// address, endpoint, and the addresses of the services placed on it. A
/// minion's set lists all of them but itself; the master's own peer for
/// each minion allows the same addresses.
pub fn mesh(nodes: &[Node], services: &[Service]) -> Vec<MeshPeer> {
    let mut peers: Vec<MeshPeer> = nodes
        .iter()
        .filter(|n| n.accepted)
        .filter_map(|n| {
            Some(MeshPeer {
                node: n.name.clone(),
                key: n.key.clone(),
                overlay_ip: n.overlay_ip?,
                // A minion without the overlay joined with port 0.
                endpoint: (n.wg_port != 0).then(|| SocketAddr::new(n.public_ip, n.wg_port)),
                services: Vec::new(),
            })
        })
        .collect();
    peers.sort_by(|a, b| a.node.cmp(&b.node));
    let mut serve = |node: &str, ip: Ipv6Addr| {
        if let Ok(i) = peers.binary_search_by(|p| p.node.as_str().cmp(node)) {
            peers[i].services.push(ip);
        }
    };
    for svc in services {
        serve(&svc.spec.machine, svc.ip);
        if let Some(run) = &svc.run {
            serve(&svc.spec.machine, run.own_ip);
        }
        if let Some(next) = &svc.next {
            serve(&next.spec.machine, next.run.own_ip);
        }
    }
    for p in &mut peers {
        p.services.sort();
        p.services.dedup();
    }
    peers
}

/// What a minion needs to run one service; `addresses` are every stored
/// service's, by name.
fn assignment(svc: &Service, addresses: &HashMap<&str, Ipv6Addr>) -> Assignment {
    Assignment {
        spec: svc.spec.clone(),
        ip: svc.ip,
        image_hash: svc.image_hash.clone(),
        image_size: svc.image_size,
        generation: svc.generation,
        links: links(&svc.spec, addresses),
        instance: svc.run.as_ref().map(|r| r.instance.clone()),
        own_ip: svc.run.as_ref().map(|r| r.own_ip),
        holds_ip: true,
        // Resolved (secrets opened) only as the set is pushed: `hub::env`.
        env: None,
    }
}

/// A set as a minion that can do without them gets it (its `Hello` says
/// `routing_free`): without `proxyname`, `proxypath` and `proxyauth`, on
/// which only the master's proxy acts (the minion needs `proxyport`). The
/// password hashes stay on the master, such a minion (and its
/// `desired.json`) never holds them, and a change of routing alone
/// (`hub::apply` keeps its generation) is no change to it.
pub fn without_routing(set: &mut DesiredSet) {
    for a in &mut set.services {
        a.spec.clear_routing();
    }
}

/// The addresses of the services `spec` links to, of those that exist.
fn links(spec: &Spec, addresses: &HashMap<&str, Ipv6Addr>) -> BTreeMap<String, Ipv6Addr> {
    spec.link
        .iter()
        .filter_map(|name| Some((name.clone(), *addresses.get(name.as_str())?)))
        .collect()
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
            overlay_ip: accepted.then(|| net::node_ip(name[1..].parse().unwrap_or(9))),
            wg_port: 51820,
            token_proof: false,
            version: "0".into(),
            requested_at: 1,
            accepted_at: accepted.then_some(2),
            revision,
        }
    }

    fn service(name: &str, machine: &str, n: u64) -> Service {
        linking(name, machine, n, &[])
    }

    fn linking(name: &str, machine: &str, n: u64, links: &[&str]) -> Service {
        let text = format!(
            r#"{{"machine":"{machine}","name":"{name}","image":"app","type":"binary","link":{}}}"#,
            serde_json::to_string(links).unwrap()
        );
        Service {
            spec: parse_specs("t", &text).unwrap().remove(0),
            ip: net::service_ip(n),
            image_hash: format!("hash-{name}"),
            image_size: 100 + n,
            generation: n + 1,
            run: None,
            next: None,
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
    fn a_set_without_routing_holds_no_basic_auth_hash() {
        let nodes = [node("m1", true, 1)];
        let mut web = service("web", "m1", 0);
        web.spec.proxyname = Some("web.example.com".into());
        web.spec.proxyauth = vec![format!("ann:$2y$05${}", "a".repeat(53))];
        let mut next = web.clone();
        next.generation += 1;
        web.next = Some(crate::store::NextVersion {
            spec: next.spec.clone(),
            image_hash: next.image_hash.clone(),
            image_size: next.image_size,
            generation: next.generation,
            run: crate::store::Run {
                instance: "web-2".into(),
                own_ip: net::service_ip(9),
            },
            since: 1,
        });
        let mut set = desired_set("m1", &nodes, std::slice::from_ref(&web));
        assert_eq!(set.services.len(), 2, "the service and its update");
        assert!(serde_json::to_string(&set).unwrap().contains("$2y$"));
        without_routing(&mut set);
        for a in &set.services {
            assert!(a.spec.proxyauth.is_empty(), "{:?}", a.spec);
            assert_eq!(a.spec.proxyname, None);
            assert_eq!(a.spec.proxyport, web.spec.proxyport);
        }
        assert!(!serde_json::to_string(&set).unwrap().contains("$2y$"));
        // Nothing of the routing is left: other routes, the same set.
        web.spec.proxyauth = vec![format!("ann:$2y$05${}", "b".repeat(53))];
        web.spec.proxyname = Some("other.example.com".into());
        let mut again = desired_set("m1", &nodes, &[web]);
        without_routing(&mut again);
        assert_eq!(again, set);
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

    fn peer_services<'a>(set: &'a DesiredSet, node: &str) -> &'a [Ipv6Addr] {
        &set.peers
            .iter()
            .find(|p| p.node == node)
            .unwrap_or_else(|| panic!("no peer {node} in {set:?}"))
            .services
    }

    #[test]
    fn links_resolve_to_the_addresses_of_services_that_exist() {
        let nodes = [node("m1", true, 1), node("m2", true, 1)];
        let services = [
            linking("web", "m1", 0, &["db", "gone", "cache"]),
            service("db", "m2", 1),
            // Stored but placed nowhere: it exists, so the link resolves.
            service("cache", "m9", 2),
        ];
        let sets = desired_sets(&nodes, &services);
        let web = &sets["m1"].services[0];
        assert_eq!(
            web.links,
            BTreeMap::from([
                ("cache".to_owned(), net::service_ip(2)),
                ("db".to_owned(), net::service_ip(1)),
            ]),
            "the dangling name is simply absent"
        );
        assert!(sets["m2"].services[0].links.is_empty());
    }

    #[test]
    fn every_node_has_every_other_accepted_node_as_a_peer_but_not_itself() {
        let nodes = [
            node("m1", true, 1),
            node("m2", true, 1),
            node("m3", true, 1),
            node("m4", false, 0),
        ];
        let services = [
            service("web", "m1", 0),
            service("api", "m1", 5),
            service("db", "m2", 1),
        ];
        let sets = desired_sets(&nodes, &services);
        for (me, others) in [
            ("m1", ["m2", "m3"]),
            ("m2", ["m1", "m3"]),
            ("m3", ["m1", "m2"]),
        ] {
            let names: Vec<&str> = sets[me].peers.iter().map(|p| p.node.as_str()).collect();
            assert_eq!(names, others, "{me}'s peers, in name order");
        }
        let m1 = &sets["m2"].peers[0];
        assert_eq!(m1.key, "key-m1");
        assert_eq!(m1.overlay_ip, net::node_ip(1));
        assert_eq!(m1.endpoint, Some("10.0.0.2:51820".parse().unwrap()));
        assert_eq!(m1.services, [net::service_ip(0), net::service_ip(5)]);
        assert_eq!(peer_services(&sets["m1"], "m2"), [net::service_ip(1)]);
        // A node without services is a peer all the same.
        assert!(peer_services(&sets["m1"], "m3").is_empty());
        // The whole mesh, as the master's peers see it.
        let all: Vec<String> = mesh(&nodes, &services)
            .into_iter()
            .map(|p| p.node)
            .collect();
        assert_eq!(all, ["m1", "m2", "m3"]);
    }

    #[test]
    fn a_moved_service_changes_the_peers_of_every_other_node() {
        let nodes = [
            node("m1", true, 1),
            node("m2", true, 1),
            node("m3", true, 1),
        ];
        let before = desired_sets(&nodes, &[service("web", "m1", 0)]);
        let after = desired_sets(&nodes, &[service("web", "m2", 0)]);
        let web = [net::service_ip(0)];
        assert_eq!(peer_services(&before["m3"], "m1"), web);
        assert!(peer_services(&before["m3"], "m2").is_empty());
        assert!(peer_services(&after["m3"], "m1").is_empty());
        assert_eq!(peer_services(&after["m3"], "m2"), web);
        assert_eq!(peer_services(&after["m1"], "m2"), web);
        assert!(peer_services(&after["m2"], "m1").is_empty());
        for n in ["m1", "m2", "m3"] {
            assert_ne!(before[n], after[n], "{n}'s set changed");
        }
    }

    #[test]
    fn equal_input_gives_equal_sets_whatever_the_order() {
        let nodes = [node("m2", true, 1), node("m1", true, 1)];
        let services = [
            service("b", "m1", 3),
            linking("a", "m2", 1, &["c", "b"]),
            service("c", "m1", 2),
        ];
        let mut reversed_nodes = nodes.clone();
        reversed_nodes.reverse();
        let mut reversed = services.clone();
        reversed.reverse();
        let one = desired_sets(&nodes, &services);
        assert_eq!(one, desired_sets(&nodes, &services));
        assert_eq!(one, desired_sets(&reversed_nodes, &reversed));
        assert_eq!(
            peer_services(&one["m2"], "m1"),
            [net::service_ip(2), net::service_ip(3)]
        );
    }

    #[test]
    fn a_node_without_the_overlay_has_no_endpoint() {
        let mut m2 = node("m2", true, 1);
        m2.wg_port = 0;
        let sets = desired_sets(&[node("m1", true, 1), m2], &[]);
        assert_eq!(sets["m1"].peers[0].endpoint, None);
    }
}
