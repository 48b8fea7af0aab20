//! Membership: join requests waiting for an admin, and the accepted nodes.
//!
//! A join request waits in memory ([`crate::join::waiting`]) while its
//! minion holds its connection; `accept` stores it as a node with an
//! overlay address, then [`Hub::admit`] adds its WireGuard peer
//! and wakes whoever waits on the decision (its held join connection, a
//! waiting link) through the `membership` signal.

use std::collections::BTreeSet;
use std::net::Ipv6Addr;
use std::time::Instant;

use phoenix_model::proto::{
    Accepted, Forgotten, JoinRequest, MasterInfo, NodeView, Rejected, WaitingNode,
};
use phoenix_model::status::now_ms;
use phoenix_overlay::PeerConfig;
use tokio::sync::watch;

use super::{ApiError, Hub, desired_sets};
use crate::join::waiting::Choice;
use crate::lock;
use crate::store::Node;

/// The overlay peer for an accepted node: its overlay address, reachable at
/// its public IP (the minion keeps the path open with keepalives; the
/// endpoint lets a restarted master reach it first).
pub fn peer_config(n: &Node) -> PeerConfig {
    PeerConfig {
        key: n.key.clone(),
        allowed: n.overlay_ip.map(|ip| vec![(ip, 128)]).unwrap_or_default(),
        endpoint: Some(std::net::SocketAddr::new(n.public_ip, n.wg_port)),
        keepalive: None,
    }
}

fn audit_json(node: &Node) -> serde_json::Value {
    serde_json::to_value(node).unwrap_or_default()
}

impl Hub {
    pub fn master_info(&self) -> Result<MasterInfo, ApiError> {
        let mut info = self.info.clone();
        info.next_minion_ip = self.store().read()?.next_node_ip()?;
        Ok(info)
    }

    pub fn node(&self, name: &str) -> Result<Option<Node>, ApiError> {
        Ok(self.store().read()?.node(name)?)
    }

    /// The waiting join requests, by name (a name may wait with several keys).
    pub fn waiting(&self) -> Result<Vec<WaitingNode>, ApiError> {
        let list = lock(&self.joins).list(Instant::now());
        Ok(list
            .into_iter()
            .map(|c| WaitingNode {
                fingerprint: c.fingerprint(),
                token_proof: c.proven,
                name: c.request.name,
                key: c.request.key,
                public_ip: c.request.public_ip,
                private_ip: c.request.private_ip,
                requested_at: c.requested_at,
                version: c.request.version,
            })
            .collect())
    }

    /// Whether a join request for `name` is waiting.
    pub fn is_waiting(&self, name: &str) -> bool {
        lock(&self.joins).has_name(name)
    }

    /// Changes whenever a node is accepted, rejected or forgotten.
    pub fn membership(&self) -> watch::Receiver<u64> {
        self.membership.subscribe()
    }

    /// Records a waiting request as an accepted node (the one whose key has
    /// `fingerprint` when several wait under the name); [`Hub::admit`] then
    /// lets it in.
    pub fn accept(
        &self,
        actor: &str,
        name: &str,
        fingerprint: Option<&str>,
    ) -> Result<Node, ApiError> {
        if let Some(n) = self.node(name)?
            && n.accepted
        {
            return Err(ApiError::Conflict(format!(
                "node {name:?} is already accepted"
            )));
        }
        let chosen = lock(&self.joins).choose(name, fingerprint, Instant::now());
        let candidate = chosen.map_err(|e| match e {
            Choice::NoneWaiting { .. } | Choice::NoSuchKey { .. } => {
                ApiError::NotFound(e.to_string())
            }
            Choice::Ambiguous { .. } => ApiError::Conflict(e.to_string()),
        })?;
        self.record_accepted(actor, &candidate.request, candidate.proven)
    }

    /// Accepts a join request at once (`--auto-accept` and the join token):
    /// records it, lets it in, and returns its overlay address.
    pub async fn accept_request(
        &self,
        request: &JoinRequest,
        proven: bool,
    ) -> Result<Ipv6Addr, ApiError> {
        let node = self.record_accepted("auto-accept (join token)", request, proven)?;
        Ok(self.admit(&node).await?.overlay_ip)
    }

    /// Stores a join request as an accepted node with the next overlay
    /// address, and its audit row, in one transaction.
    fn record_accepted(
        &self,
        actor: &str,
        request: &JoinRequest,
        proven: bool,
    ) -> Result<Node, ApiError> {
        let name = &request.name;
        // Every other node's set changes (a new mesh peer): their
        // revisions are bumped here, and `admit` pushes them.
        let (node, _changed) = self.write_change(|tx| {
            match tx.node(name)? {
                Some(n) if n.accepted => {
                    return Err(ApiError::Conflict(format!(
                        "node {name:?} is already accepted"
                    )));
                }
                // A waiting row from an older master: the request replaces it.
                Some(_) => tx.delete_node(name)?,
                None => {}
            }
            let ip = tx.next_node_ip()?;
            tx.insert_waiting(&Node {
                name: name.clone(),
                key: request.key.clone(),
                accepted: false,
                public_ip: request.public_ip,
                private_ip: request.private_ip,
                overlay_ip: None,
                wg_port: request.wg_port,
                token_proof: proven,
                version: request.version.clone(),
                requested_at: now_ms(),
                accepted_at: None,
                revision: 0,
            })?;
            tx.accept_node(name, ip)?;
            let node = tx.node(name)?.ok_or_else(|| {
                ApiError::Internal(format!("node {name:?} vanished while being accepted"))
            })?;
            tx.audit(actor, "accept", name, None, Some(&audit_json(&node)))?;
            Ok((node, BTreeSet::new()))
        })?;
        Ok(node)
    }

    /// Adds an accepted node's overlay peer, then wakes whoever waits on its
    /// admission (its held join connection, a waiting link); any other
    /// request waiting under its name is refused. If the peer cannot be
    /// added, the acceptance is rolled back: a node the overlay cannot reach
    /// must not look accepted, and its request still waits.
    pub async fn admit(&self, node: &Node) -> Result<Accepted, ApiError> {
        let peer_added = match &self.overlay {
            Some(o) => {
                // With the addresses it serves, should it have any.
                let peer = self
                    .master_peers()
                    .ok()
                    .and_then(|all| all.into_iter().find(|p| p.key == node.key))
                    .unwrap_or_else(|| peer_config(node));
                let added = o.set_peer(&peer).await;
                if added.is_err() {
                    // Whatever of the peer got in goes too.
                    let _ = o.remove_peer(&node.key).await;
                }
                added.map_err(|e| e.to_string())
            }
            None => Ok(()),
        };
        self.admit_after(node, peer_added)
    }

    /// The rest of [`Hub::admit`], once adding the peer succeeded or failed.
    fn admit_after(
        &self,
        node: &Node,
        peer_added: Result<(), String>,
    ) -> Result<Accepted, ApiError> {
        if let Err(e) = peer_added {
            let name = &node.name;
            let rolled_back = self.write_change(|tx| {
                match tx.node(name)? {
                    Some(n) if n.key == node.key => tx.delete_node(name)?,
                    _ => {}
                }
                let detail = serde_json::json!({ "error": e });
                tx.audit(
                    "master",
                    "accept-rolled-back",
                    name,
                    Some(&audit_json(node)),
                    Some(&detail),
                )?;
                Ok(((), BTreeSet::new()))
            });
            let outcome = match rolled_back {
                Ok(((), changed)) => {
                    self.publish(&changed);
                    "it is not accepted and still waits".to_owned()
                }
                Err(r) => {
                    format!("rolling the acceptance back failed too ({r}); `phoenix forget {name}`")
                }
            };
            tracing::warn!(node = %name, "accept failed: overlay peer: {e}; {outcome}");
            return Err(ApiError::Internal(format!(
                "cannot accept node {name:?}: adding its WireGuard peer failed: {e}; {outcome}"
            )));
        }
        let overlay_ip = node.overlay_ip.unwrap_or(Ipv6Addr::UNSPECIFIED);
        // Every other minion gets it as a mesh peer (their revisions were
        // bumped with the acceptance); it gets its own set when it connects.
        let others: BTreeSet<String> = self
            .store()
            .read()
            .and_then(|tx| tx.nodes(true))
            .map(|nodes| {
                nodes
                    .into_iter()
                    .filter(|n| n.accepted && n.name != node.name)
                    .map(|n| n.name)
                    .collect()
            })
            .unwrap_or_default();
        self.publish(&others);
        lock(&self.joins).accepted(&node.name, &node.key, overlay_ip);
        self.membership.send_modify(|n| *n += 1);
        tracing::info!(node = %node.name, ip = ?node.overlay_ip, "node accepted");
        Ok(Accepted {
            name: node.name.clone(),
            overlay_ip,
        })
    }

    /// Removes an accepted node, its key and its overlay peer; refused while
    /// services are placed on it.
    pub async fn forget(&self, actor: &str, name: &str) -> Result<Forgotten, ApiError> {
        let (node, changed) = self.write_change(|tx| {
            let node = match tx.node(name)? {
                Some(n) if n.accepted => n,
                Some(_) => {
                    return Err(ApiError::Conflict(format!(
                        "node {name:?} is waiting, not accepted; use `phoenix reject {name}`"
                    )));
                }
                None => {
                    return Err(ApiError::NotFound(format!(
                        "no node {name:?} (see `phoenix nodes`)"
                    )));
                }
            };
            let placed: Vec<String> = desired_sets(tx)?
                .remove(name)
                .unwrap_or_default()
                .services
                .into_iter()
                .map(|a| a.spec.name)
                .collect();
            if !placed.is_empty() {
                return Err(ApiError::Conflict(format!(
                    "node {name:?} still runs {}; `phoenix del` them or `phoenix update` them onto another machine first",
                    placed.join(", ")
                )));
            }
            tx.delete_node(name)?;
            tx.audit(actor, "forget", name, Some(&audit_json(&node)), None)?;
            Ok((node, BTreeSet::new()))
        })?;
        if let Some(o) = &self.overlay {
            o.remove_peer(&node.key).await.map_err(|e| {
                ApiError::Internal(format!(
                    "node {name:?} is forgotten, but removing its peer failed: {e}"
                ))
            })?;
        }
        // Dropping the link's sender ends its writer and closes the connection.
        self.drop_link(name);
        // The others drop it from their mesh.
        self.publish(&changed);
        self.forget_seen(name);
        self.membership.send_modify(|n| *n += 1);
        tracing::info!(node = name, "node forgotten");
        Ok(Forgotten {
            forgotten: name.to_owned(),
        })
    }

    /// Refuses a waiting request for good (the one whose key has
    /// `fingerprint` when several wait under the name).
    pub fn reject(
        &self,
        actor: &str,
        name: &str,
        fingerprint: Option<&str>,
    ) -> Result<Rejected, ApiError> {
        if let Some(n) = self.node(name)?
            && n.accepted
        {
            return Err(ApiError::Conflict(format!(
                "node {name:?} is already accepted; rejecting is for waiting requests"
            )));
        }
        let rejected = {
            let mut joins = lock(&self.joins);
            let chosen = joins.choose(name, fingerprint, Instant::now());
            match chosen {
                Ok(c) => joins.reject(c.id),
                Err(e @ Choice::Ambiguous { .. }) => {
                    return Err(ApiError::Conflict(e.to_string()));
                }
                Err(e) => return Err(ApiError::NotFound(e.to_string())),
            }
        };
        if let Some(c) = rejected {
            let record = serde_json::json!({
                "name": c.request.name,
                "key": c.request.key,
                "public_ip": c.request.public_ip,
                "source": c.source,
                "token_proof": c.proven,
            });
            self.store()
                .write(|tx| tx.audit(actor, "reject", name, Some(&record), None))?;
        }
        self.membership.send_modify(|n| *n += 1);
        Ok(Rejected {
            rejected: name.to_owned(),
        })
    }

    pub fn nodes(&self) -> Result<Vec<NodeView>, ApiError> {
        let (nodes, sets) = {
            let mut store = self.store();
            let tx = store.read()?;
            (tx.nodes(true)?, desired_sets(&tx)?)
        };
        Ok(nodes
            .into_iter()
            .map(|n| {
                let seen = self.seen(&n.name);
                NodeView {
                    state: if self.is_connected(&n.name) {
                        "reachable"
                    } else {
                        "unreachable"
                    }
                    .into(),
                    services: sets.get(&n.name).map_or(0, |s| s.services.len()),
                    overlay_ip: n.overlay_ip.unwrap_or(Ipv6Addr::UNSPECIFIED),
                    public_ip: n.public_ip,
                    private_ip: n.private_ip,
                    key: n.key,
                    last_seen: (seen.last_seen > 0).then_some(seen.last_seen),
                    version: seen.version,
                    stats: seen.stats,
                    last_drop: self.last_drop(&n.name),
                    name: n.name,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use phoenix_model::net;
    use phoenix_model::proto::MasterInfo;

    use super::*;
    use crate::hub::Settings;
    use crate::registry::Registry;
    use crate::store::Store;

    fn hub(dir: &std::path::Path) -> Hub {
        let store = Store::open(&dir.join("phoenix.db")).unwrap();
        let registry = Registry::open(dir.join("registry")).unwrap();
        let info = MasterInfo {
            public_ip: "10.0.0.1".parse().unwrap(),
            key: "master-key".into(),
            overlay_ip: net::MASTER_IP,
            next_minion_ip: net::node_ip(1),
            join_port: 1,
            link_port: 2,
            wg_port: Some(51820),
            token: "t".into(),
            version: "0".into(),
        };
        let settings = Settings::new(false, std::time::Duration::from_secs(6));
        Hub::new(store, registry, info, None, settings)
    }

    fn request(name: &str) -> JoinRequest {
        JoinRequest {
            name: name.into(),
            key: format!("key-of-{name}"),
            public_ip: "10.0.0.2".parse().unwrap(),
            private_ip: "10.1.0.2".parse().unwrap(),
            wg_port: 51820,
            version: "0".into(),
            proof: None,
        }
    }

    #[tokio::test]
    async fn an_accept_whose_overlay_peer_fails_is_rolled_back_and_the_request_still_waits() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(dir.path());
        let (_candidate, mut decision) = lock(&hub.joins)
            .insert(
                request("web1"),
                "10.0.0.2".parse().unwrap(),
                false,
                now_ms(),
                Instant::now(),
            )
            .unwrap();

        let node = hub.accept("root", "web1", None).unwrap();
        let err = hub
            .admit_after(&node, Err("UDP 51820 is in use".into()))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cannot accept node \"web1\""), "{msg}");
        assert!(msg.contains("UDP 51820 is in use"), "{msg}");
        assert!(msg.contains("still waits"), "{msg}");
        // Not half-accepted: no node, the request waits, nobody was told.
        assert!(hub.node("web1").unwrap().is_none());
        assert!(hub.is_waiting("web1"));
        assert!(decision.try_recv().is_err());
        let audit = hub.store().read().unwrap().audit_log(10).unwrap();
        let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
        assert_eq!(actions, ["accept", "accept-rolled-back"]);

        // Once the overlay takes the peer, the same request is accepted,
        // with the address the failed attempt did not keep.
        let node = hub.accept("root", "web1", None).unwrap();
        let accepted = hub.admit_after(&node, Ok(())).unwrap();
        assert_eq!(accepted.overlay_ip, net::node_ip(1));
        assert!(hub.node("web1").unwrap().unwrap().accepted);
        assert!(!hub.is_waiting("web1"));
    }
}
