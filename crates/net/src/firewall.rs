//! The minion's nftables table: `link` enforced at the source, anti-spoofing,
//! and masquerade for egress.
//!
//! [`ruleset`] is pure (state in, the `nft -j` document out);
//! [`apply_firewall`] loads it in one transaction that deletes and re-adds
//! the table, so the rules change atomically and the load works the same
//! whether the table exists or not.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::NetError;
use crate::plan::{EGRESS4, EGRESS4_PREFIX};

/// The cluster range, `fd38:dde8:32dd::/48`.
const CLUSTER6: &str = "fd38:dde8:32dd::";
const CLUSTER6_PREFIX: u8 = 48;

/// One service of this minion, as the firewall sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwService {
    /// The host end of its veth.
    pub host_if: String,
    /// Its cluster addresses, the only IPv6 sources it may use: its own
    /// and, while it holds it, the service's stable address (a run a
    /// zero-downtime update started has both).
    pub own6: Vec<Ipv6Addr>,
    /// Its node-local IPv4 address (the only IPv4 source it may use).
    pub ipv4: Ipv4Addr,
    /// The cluster addresses it may open connections to (its `link`s,
    /// resolved; see [`FwService::resolve_links`]).
    pub allowed: Vec<Ipv6Addr>,
}

impl FwService {
    /// The addresses of the services `links` names, from a directory of
    /// service name → address; names not in it (deleted, not deployed yet)
    /// are simply absent.
    pub fn resolve_links(links: &[String], directory: &HashMap<String, Ipv6Addr>) -> Vec<Ipv6Addr> {
        let set: BTreeSet<Ipv6Addr> = links
            .iter()
            .filter_map(|l| directory.get(l))
            .copied()
            .collect();
        set.into_iter().collect()
    }
}

/// Everything the firewall of one minion is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallState {
    pub services: Vec<FwService>,
}

/// The table of minion `minion_id`: `phoenix_` and the id with anything
/// but ASCII letters, digits and `_` made `_`.
pub fn table_name(minion_id: &str) -> String {
    let id: String = minion_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("phoenix_{id}")
}

fn meta(key: &str) -> Value {
    json!({ "meta": { "key": key } })
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({ "payload": { "protocol": protocol, "field": field } })
}

fn matches(op: &str, left: Value, right: Value) -> Value {
    json!({ "match": { "op": op, "left": left, "right": right } })
}

fn prefix(addr: &str, len: u8) -> Value {
    json!({ "prefix": { "addr": addr, "len": len } })
}

fn concat(items: Vec<Value>) -> Value {
    json!({ "concat": items })
}

fn from_service() -> Value {
    matches("==", meta("iifname"), json!("@service_ifs"))
}

fn in_cluster6(field: &str, op: &str) -> Value {
    matches(op, payload("ip6", field), prefix(CLUSTER6, CLUSTER6_PREFIX))
}

fn egress4(field: &str) -> Value {
    matches(
        "==",
        payload("ip", field),
        prefix(&EGRESS4.to_string(), EGRESS4_PREFIX),
    )
}

fn established() -> Value {
    matches(
        "in",
        json!({ "ct": { "key": "state" } }),
        json!(["established", "related"]),
    )
}

/// Refusals: TCP with a reset, the rest with an ICMP "administratively
/// prohibited" of `icmp_type` (`icmpv6` or `icmp`).
///
/// Why a reset for TCP: on a node, the refusal comes back within
/// microseconds, while `connect()` still holds its socket; the kernel then
/// keeps an ICMP error as a soft error and only fails the connect when the
/// SYN is retransmitted, a second later, whereas a reset waits in the
/// socket's backlog and fails it (`ECONNREFUSED`) as soon as it is released.
fn refusals(icmp_type: &str) -> [(Option<Value>, Value); 2] {
    [
        (
            Some(matches("==", meta("l4proto"), json!("tcp"))),
            json!({ "reject": { "type": "tcp reset" } }),
        ),
        (
            None,
            json!({ "reject": { "type": icmp_type, "expr": "admin-prohibited" } }),
        ),
    ]
}

/// Every element of the table's four sets for `state`, as nft JSON values
/// by set name (`service_ifs`, `own6`, `own4`, `allowed6`).
fn elements(state: &FirewallState) -> [(&'static str, BTreeSet<String>); 4] {
    let pair = |i: &str, a: String| concat(vec![json!(i), json!(a)]).to_string();
    let mut ifs = BTreeSet::new();
    let (mut own6, mut own4, mut allowed) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for s in &state.services {
        ifs.insert(json!(s.host_if).to_string());
        for a in &s.own6 {
            own6.insert(pair(&s.host_if, a.to_string()));
        }
        own4.insert(pair(&s.host_if, s.ipv4.to_string()));
        for a in &s.allowed {
            allowed.insert(pair(&s.host_if, a.to_string()));
        }
    }
    [
        ("service_ifs", ifs),
        ("own6", own6),
        ("own4", own4),
        ("allowed6", allowed),
    ]
}

/// The `nft -j` document that turns minion `minion_id`'s table from the
/// rules for `old` into those for `new` by adding and deleting set
/// elements only: the chains and rules are the same for every state, so
/// this is what [`ruleset`] for `new` would give, in a transaction a
/// fraction of its size (a new service is a handful of elements, whatever
/// the number of others). `None` when nothing changes. Deletions come
/// first, so a service whose entry changed is never briefly allowed both
/// its old and new links.
pub fn ruleset_delta(minion_id: &str, old: &FirewallState, new: &FirewallState) -> Option<Value> {
    let table = table_name(minion_id);
    let (before, after) = (elements(old), elements(new));
    let mut cmds = vec![json!({ "metainfo": { "json_schema_version": 1 } })];
    let element = |verb: &str, name: &str, elems: Vec<&String>| -> Value {
        let elem: Vec<Value> = elems
            .into_iter()
            .map(|e| serde_json::from_str(e).unwrap_or(Value::Null))
            .collect();
        json!({ verb: { "element": {
            "family": "inet", "table": table, "name": name, "elem": elem
        } } })
    };
    for ((name, b), (_, a)) in before.iter().zip(after.iter()) {
        let gone: Vec<&String> = b.difference(a).collect();
        if !gone.is_empty() {
            cmds.push(element("delete", name, gone));
        }
    }
    for ((name, b), (_, a)) in before.iter().zip(after.iter()) {
        let new: Vec<&String> = a.difference(b).collect();
        if !new.is_empty() {
            cmds.push(element("add", name, new));
        }
    }
    (cmds.len() > 1).then(|| json!({ "nftables": cmds }))
}

/// The `nft -j` document that replaces minion `minion_id`'s table with the
/// rules for `state`:
///
/// - **forward** (policy accept): from a service's host end, an IPv6 or IPv4
///   source other than the service's own is dropped (anti-spoofing, before
///   anything else); established and related traffic is accepted; to an
///   address in `fd38:dde8:32dd::/48`, new traffic is accepted only if the
///   pair (host end, destination) is in the `allowed6` set built from
///   `allowed`, and refused otherwise, at once: TCP with a reset (the
///   connect fails with `ECONNREFUSED`), anything else with ICMPv6
///   administratively-prohibited (see `refusals` for why not ICMP for
///   TCP too); to another service's
///   node-local IPv4 address (`100.64.0.0/10`) it is rejected likewise,
///   since that would bypass `link`. Everything else (egress, traffic from
///   the overlay to services) is accepted.
/// - **input** (policy accept): after established and related traffic, new
///   traffic from a service's host end to an address of the /48 (the
///   node's own cluster address) is refused the same way. Neighbour discovery uses
///   link-local and multicast addresses, outside the /48, so it keeps
///   working.
/// - **postrouting** (nat): IPv4 from `100.64.0.0/10`, and IPv6 from the /48
///   to outside it, leaving by an interface that is not a service's veth,
///   is masqueraded. (IPv6 to outside the /48 never takes the overlay's
///   TUN, whose route is the /48, so the TUN needs no rule of its own.)
pub fn ruleset(minion_id: &str, state: &FirewallState) -> Value {
    let table = table_name(minion_id);
    let family = "inet";
    let ifs: BTreeSet<&str> = state.services.iter().map(|s| s.host_if.as_str()).collect();
    let own6: BTreeSet<(&str, Ipv6Addr)> = state
        .services
        .iter()
        .flat_map(|s| s.own6.iter().map(move |a| (s.host_if.as_str(), *a)))
        .collect();
    let own4: BTreeSet<(&str, Ipv4Addr)> = state
        .services
        .iter()
        .map(|s| (s.host_if.as_str(), s.ipv4))
        .collect();
    let allowed: BTreeSet<(&str, Ipv6Addr)> = state
        .services
        .iter()
        .flat_map(|s| s.allowed.iter().map(move |a| (s.host_if.as_str(), *a)))
        .collect();

    let set = |name: &str, ty: Value, elems: Vec<Value>| -> Value {
        let mut s = json!({ "family": family, "table": table, "name": name, "type": ty });
        if !elems.is_empty() {
            s["elem"] = Value::Array(elems);
        }
        json!({ "add": { "set": s } })
    };
    let pair = |i: &str, a: String| concat(vec![json!(i), json!(a)]);
    let chain = |name: &str, ty: &str, hook: &str, prio: i32| -> Value {
        json!({ "add": { "chain": {
            "family": family, "table": table, "name": name,
            "type": ty, "hook": hook, "prio": prio, "policy": "accept"
        } } })
    };
    let rule = |chain: &str, expr: Vec<Value>| -> Value {
        json!({ "add": { "rule": {
            "family": family, "table": table, "chain": chain, "expr": expr
        } } })
    };
    let table_obj = json!({ "table": { "family": family, "name": table } });

    let refuse = |chain: &str, conditions: Vec<Value>, icmp_type: &str| -> Vec<Value> {
        refusals(icmp_type)
            .into_iter()
            .map(|(proto, verdict)| {
                let mut expr = conditions.clone();
                expr.extend(proto);
                expr.push(verdict);
                rule(chain, expr)
            })
            .collect()
    };

    let mut cmds = vec![
        json!({ "metainfo": { "json_schema_version": 1 } }),
        // Add first, so that the delete succeeds when there is none yet.
        json!({ "add": table_obj }),
        json!({ "delete": table_obj }),
        json!({ "add": table_obj }),
        set(
            "service_ifs",
            json!("ifname"),
            ifs.iter().map(|i| json!(i)).collect(),
        ),
        set(
            "own6",
            json!(["ifname", "ipv6_addr"]),
            own6.iter().map(|(i, a)| pair(i, a.to_string())).collect(),
        ),
        set(
            "own4",
            json!(["ifname", "ipv4_addr"]),
            own4.iter().map(|(i, a)| pair(i, a.to_string())).collect(),
        ),
        set(
            "allowed6",
            json!(["ifname", "ipv6_addr"]),
            allowed
                .iter()
                .map(|(i, a)| pair(i, a.to_string()))
                .collect(),
        ),
        chain("forward", "filter", "forward", 0),
        rule(
            "forward",
            vec![
                from_service(),
                matches(
                    "!=",
                    concat(vec![meta("iifname"), payload("ip6", "saddr")]),
                    json!("@own6"),
                ),
                json!({ "drop": null }),
            ],
        ),
        rule(
            "forward",
            vec![
                from_service(),
                matches(
                    "!=",
                    concat(vec![meta("iifname"), payload("ip", "saddr")]),
                    json!("@own4"),
                ),
                json!({ "drop": null }),
            ],
        ),
        rule("forward", vec![established(), json!({ "accept": null })]),
        rule(
            "forward",
            vec![
                from_service(),
                in_cluster6("daddr", "=="),
                matches(
                    "==",
                    concat(vec![meta("iifname"), payload("ip6", "daddr")]),
                    json!("@allowed6"),
                ),
                json!({ "accept": null }),
            ],
        ),
    ];
    cmds.extend(refuse(
        "forward",
        vec![from_service(), in_cluster6("daddr", "==")],
        "icmpv6",
    ));
    cmds.extend(refuse(
        "forward",
        vec![from_service(), egress4("daddr")],
        "icmp",
    ));
    cmds.push(chain("input", "filter", "input", 0));
    cmds.push(rule(
        "input",
        vec![established(), json!({ "accept": null })],
    ));
    cmds.extend(refuse(
        "input",
        vec![from_service(), in_cluster6("daddr", "==")],
        "icmpv6",
    ));
    cmds.extend([
        chain("postrouting", "nat", "postrouting", 100),
        rule(
            "postrouting",
            vec![
                egress4("saddr"),
                matches("!=", meta("oifname"), json!("@service_ifs")),
                json!({ "masquerade": null }),
            ],
        ),
        rule(
            "postrouting",
            vec![
                in_cluster6("saddr", "=="),
                in_cluster6("daddr", "!="),
                matches("!=", meta("oifname"), json!("@service_ifs")),
                json!({ "masquerade": null }),
            ],
        ),
    ]);
    json!({ "nftables": cmds })
}

/// The base chains on the forward hook whose policy is drop, as
/// `family table chain`, from `nft -j list chains` output. Such a chain
/// (Docker's `ip filter FORWARD`, for one) drops forwarded service traffic
/// whatever this table accepts: a packet must pass every base chain of a
/// hook.
pub(crate) fn forward_drop_chains(listing: &Value) -> Vec<String> {
    let Some(items) = listing["nftables"].as_array() else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| i.get("chain"))
        .filter(|c| c["hook"] == "forward" && c["policy"] == "drop")
        .map(|c| {
            let field = |k: &str| c[k].as_str().unwrap_or("?").to_owned();
            format!("{} {} {}", field("family"), field("table"), field("name"))
        })
        .collect()
}

/// Runs `nft ARGS` with `input` on its standard input.
pub(crate) fn nft_run(args: &[&str], input: &str, what: &str) -> Result<(), NetError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetError::NftablesMissing { source })?;
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().map_err(|e| NetError::Nft {
        what: what.to_owned(),
        stderr: format!("waiting for nft: {e}"),
    })?;
    if !out.status.success() {
        return Err(NetError::Nft {
            what: what.to_owned(),
            stderr: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    if let Some(Err(e)) = written {
        return Err(NetError::Nft {
            what: what.to_owned(),
            stderr: format!("writing the ruleset to nft: {e}"),
        });
    }
    Ok(())
}

/// Replaces minion `minion_id`'s table with the rules for `state`, in one
/// transaction (`nft -j -f -`): either the whole new table is in place or
/// the old one is untouched. Blocking (it runs `nft`, a few milliseconds).
pub fn apply_firewall(minion_id: &str, state: &FirewallState) -> Result<(), NetError> {
    let doc = ruleset(minion_id, state);
    nft_run(
        &["-j", "-f", "-"],
        &doc.to_string(),
        &format!("table inet {}", table_name(minion_id)),
    )
}

/// Deletes minion `minion_id`'s table, if there is one.
pub fn remove_firewall(minion_id: &str) -> Result<(), NetError> {
    let table = json!({ "table": { "family": "inet", "name": table_name(minion_id) } });
    let doc = json!({ "nftables": [ { "add": table }, { "delete": table } ] });
    nft_run(
        &["-j", "-f", "-"],
        &doc.to_string(),
        &format!("deleting table inet {}", table_name(minion_id)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_model::net::service_ip;

    fn svc(host_if: &str, n: u64, allowed: &[u64]) -> FwService {
        FwService {
            host_if: host_if.into(),
            own6: vec![service_ip(n)],
            ipv4: Ipv4Addr::new(100, 64, 0, n as u8 + 1),
            allowed: allowed.iter().map(|a| service_ip(*a)).collect(),
        }
    }

    /// The elements of set `name` as text: `if . addr` or `if`.
    fn elements(doc: &Value, name: &str) -> Vec<String> {
        let cmds = doc["nftables"].as_array().unwrap();
        let set = cmds
            .iter()
            .find_map(|c| c["add"]["set"].as_object().filter(|s| s["name"] == name))
            .unwrap_or_else(|| panic!("no set {name}"));
        let Some(elems) = set.get("elem") else {
            return vec![];
        };
        elems
            .as_array()
            .unwrap()
            .iter()
            .map(|e| match e.get("concat") {
                Some(c) => c
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(" . "),
                None => e.as_str().unwrap().to_owned(),
            })
            .collect()
    }

    fn rules(doc: &Value, chain: &str) -> Vec<Value> {
        doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["add"]["rule"]["chain"] == chain)
            .map(|c| c["add"]["rule"]["expr"].clone())
            .collect()
    }

    /// Dry-runs the document with `nft -j -c` inside a throwaway network
    /// namespace; skipped when not root or nft is absent.
    fn nft_accepts(doc: &Value) {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: the nft dry run needs root");
            return;
        }
        if Command::new("nft").arg("--version").output().is_err() {
            eprintln!("skipped: nft is not installed");
            return;
        }
        let text = doc.to_string();
        std::thread::spawn(move || {
            // SAFETY: only CLONE_NEWNET; the descriptor table stays shared.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
                .unwrap();
            nft_run(&["-j", "-c", "-f", "-"], &text, "test").unwrap();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn links_are_directional() {
        // a may connect to b; b to nobody.
        let state = FirewallState {
            services: vec![svc("pha", 0, &[1]), svc("phb", 1, &[])],
        };
        let doc = ruleset("m1", &state);
        assert_eq!(
            elements(&doc, "allowed6"),
            vec![format!("pha . {}", service_ip(1))]
        );
        assert_eq!(elements(&doc, "service_ifs"), vec!["pha", "phb"]);
        assert_eq!(
            elements(&doc, "own6"),
            vec![
                format!("pha . {}", service_ip(0)),
                format!("phb . {}", service_ip(1))
            ]
        );
        assert_eq!(
            elements(&doc, "own4"),
            vec!["pha . 100.64.0.1", "phb . 100.64.0.2"]
        );
        nft_accepts(&doc);
    }

    #[test]
    fn a_run_that_holds_the_stable_address_may_send_from_both() {
        // The update's run at its own address ::21, holding ::20 too.
        let mut new = svc("phnew", 21, &[]);
        new.own6.push(service_ip(20));
        let state = FirewallState {
            services: vec![svc("phold", 20, &[]), new],
        };
        let doc = ruleset("m1", &state);
        assert_eq!(
            elements(&doc, "own6"),
            vec![
                format!("phnew . {}", service_ip(20)),
                format!("phnew . {}", service_ip(21)),
                format!("phold . {}", service_ip(20)),
            ]
        );
        nft_accepts(&doc);
    }

    #[test]
    fn dangling_links_are_absent() {
        let directory: HashMap<String, Ipv6Addr> = [
            ("db".to_owned(), service_ip(7)),
            ("cache".to_owned(), service_ip(3)),
        ]
        .into();
        let links = ["db", "gone", "cache", "db"].map(String::from);
        assert_eq!(
            FwService::resolve_links(&links, &directory),
            vec![service_ip(3), service_ip(7)]
        );
        let state = FirewallState {
            services: vec![svc("pha", 0, &[7, 7])],
        };
        assert_eq!(
            elements(&ruleset("m1", &state), "allowed6"),
            vec![format!("pha . {}", service_ip(7))],
            "duplicates collapse"
        );
    }

    #[test]
    fn empty_state_is_valid() {
        let doc = ruleset("m1", &FirewallState::default());
        for set in ["service_ifs", "own6", "own4", "allowed6"] {
            assert!(elements(&doc, set).is_empty(), "{set}");
        }
        assert_eq!(rules(&doc, "forward").len(), 8);
        nft_accepts(&doc);
    }

    #[test]
    fn replaces_its_own_table_atomically() {
        let doc = ruleset("minion-1.x", &FirewallState::default());
        let cmds = doc["nftables"].as_array().unwrap();
        let table = json!({ "table": { "family": "inet", "name": "phoenix_minion_1_x" } });
        assert_eq!(cmds[1], json!({ "add": table }));
        assert_eq!(cmds[2], json!({ "delete": table }));
        assert_eq!(cmds[3], json!({ "add": table }));
        // Nothing outside the table.
        for c in &cmds[4..] {
            let (_, obj) = c["add"].as_object().unwrap().iter().next().unwrap();
            assert_eq!(obj["table"], "phoenix_minion_1_x", "{c}");
        }
    }

    #[test]
    fn spoofing_is_checked_before_established_traffic() {
        let doc = ruleset("m1", &FirewallState::default());
        let fwd = rules(&doc, "forward");
        let text: Vec<String> = fwd.iter().map(|r| r.to_string()).collect();
        assert!(text[0].contains("@own6") && text[0].contains("drop"));
        assert!(text[1].contains("@own4") && text[1].contains("drop"));
        assert!(text[2].contains("established"));
        assert!(text[3].contains("@allowed6") && text[3].contains("accept"));
        assert!(text[4].contains("tcp reset") && text[4].contains("fd38:dde8:32dd::"));
        assert!(text[5].contains("admin-prohibited") && text[5].contains("fd38:dde8:32dd::"));
        assert!(text[6].contains("tcp reset") && text[6].contains("100.64.0.0"));
        assert!(text[7].contains("admin-prohibited") && text[7].contains("100.64.0.0"));
        let input: Vec<String> = rules(&doc, "input").iter().map(|r| r.to_string()).collect();
        assert!(input[0].contains("established"));
        assert!(input[1].contains("tcp reset"));
        assert!(input[2].contains("admin-prohibited"));
        let nat: Vec<String> = rules(&doc, "postrouting")
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert!(
            nat.iter()
                .all(|r| r.contains("masquerade") && r.contains("@service_ifs"))
        );
    }

    #[test]
    fn finds_forward_chains_that_drop() {
        let listing = json!({ "nftables": [
            { "metainfo": { "version": "1.0.6" } },
            { "chain": { "family": "ip", "table": "filter", "name": "FORWARD",
                         "type": "filter", "hook": "forward", "prio": 0, "policy": "drop" } },
            { "chain": { "family": "ip", "table": "filter", "name": "DOCKER-USER" } },
            { "chain": { "family": "inet", "table": "phoenix_m1", "name": "forward",
                         "type": "filter", "hook": "forward", "prio": 0, "policy": "accept" } },
            { "chain": { "family": "ip", "table": "filter", "name": "INPUT",
                         "type": "filter", "hook": "input", "prio": 0, "policy": "drop" } },
        ] });
        assert_eq!(forward_drop_chains(&listing), vec!["ip filter FORWARD"]);
        assert!(forward_drop_chains(&json!({})).is_empty());
    }

    #[test]
    fn table_names() {
        assert_eq!(table_name("m1"), "phoenix_m1");
        assert_eq!(table_name("a-b c"), "phoenix_a_b_c");
    }
}

#[cfg(test)]
mod delta_tests {
    use super::*;

    fn svc(i: u8, allowed: &[u8]) -> FwService {
        FwService {
            host_if: format!("phabc{i}"),
            own6: vec![format!("fd38:dde8:32dd:1::{i}").parse().unwrap()],
            ipv4: Ipv4Addr::new(100, 64, 0, i),
            allowed: allowed
                .iter()
                .map(|a| format!("fd38:dde8:32dd:1::{a}").parse().unwrap())
                .collect(),
        }
    }

    #[test]
    fn a_delta_adds_and_deletes_only_the_changed_elements() {
        let old = FirewallState {
            services: vec![svc(1, &[2]), svc(2, &[])],
        };
        let new = FirewallState {
            services: vec![svc(1, &[3]), svc(3, &[1])],
        };
        let doc = ruleset_delta("m", &old, &new).expect("a change");
        let cmds = doc["nftables"].as_array().unwrap();
        let verbs: Vec<(String, String, usize)> = cmds[1..]
            .iter()
            .map(|c| {
                let (verb, body) = c.as_object().unwrap().iter().next().unwrap();
                let e = &body["element"];
                (
                    verb.clone(),
                    e["name"].as_str().unwrap().to_owned(),
                    e["elem"].as_array().unwrap().len(),
                )
            })
            .collect();
        let v = |a: &str, b: &str, n| (a.to_owned(), b.to_owned(), n);
        assert_eq!(
            verbs,
            [
                v("delete", "service_ifs", 1),
                v("delete", "own6", 1),
                v("delete", "own4", 1),
                v("delete", "allowed6", 1),
                v("add", "service_ifs", 1),
                v("add", "own6", 1),
                v("add", "own4", 1),
                v("add", "allowed6", 2),
            ]
        );
        // Elements have the shape the full ruleset gives its sets.
        let full = ruleset("m", &new).to_string();
        for c in &cmds[1..] {
            for e in c.as_object().unwrap().values().next().unwrap()["element"]["elem"]
                .as_array()
                .unwrap()
            {
                if c.get("add").is_some() {
                    assert!(full.contains(&e.to_string()), "{e} not in the full ruleset");
                }
            }
        }
        assert!(ruleset_delta("m", &new, &new).is_none());
    }

    #[test]
    fn taking_over_the_stable_address_is_one_element() {
        let stable: Ipv6Addr = "fd38:dde8:32dd:1::1".parse().unwrap();
        let before = FirewallState {
            services: vec![svc(1, &[]), svc(2, &[])],
        };
        let mut after = before.clone();
        after.services[1].own6.push(stable);
        let doc = ruleset_delta("m", &before, &after).expect("a change");
        let cmds = &doc["nftables"].as_array().unwrap()[1..];
        assert_eq!(cmds.len(), 1, "{doc}");
        let e = &cmds[0]["add"]["element"];
        assert_eq!(e["name"], "own6");
        assert_eq!(
            e["elem"],
            json!([{ "concat": ["phabc2", "fd38:dde8:32dd:1::1"] }])
        );
        // Giving it up (or the old run going) deletes just that.
        let doc = ruleset_delta("m", &after, &before).expect("a change");
        let cmds = &doc["nftables"].as_array().unwrap()[1..];
        assert_eq!(cmds.len(), 1, "{doc}");
        assert_eq!(cmds[0]["delete"]["element"]["name"], "own6");
    }
}
