//! Membership: join requests waiting for an admin, and the accepted nodes.
//!
//! A join request is recorded by [`crate::join`]; `accept` gives the node an
//! overlay address in the store, then [`Hub::admit`] adds its WireGuard peer
//! and wakes whoever waits on the decision (its held join connection, a
//! waiting link) through the `membership` signal.

use std::net::Ipv6Addr;

use phoenix_model::keys::fingerprint;
use phoenix_model::proto::{Accepted, Forgotten, MasterInfo, NodeView, Rejected, WaitingNode};
use phoenix_overlay::PeerConfig;
use tokio::sync::watch;

use super::{ApiError, Hub, desired_sets};
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

    pub fn waiting(&self) -> Result<Vec<WaitingNode>, ApiError> {
        let nodes = self.store().read()?.nodes(false)?;
        Ok(nodes
            .into_iter()
            .map(|n| WaitingNode {
                fingerprint: fingerprint(&n.key),
                token_proof: n.token_proof,
                name: n.name,
                key: n.key,
                public_ip: n.public_ip,
                private_ip: n.private_ip,
                requested_at: n.requested_at,
                version: n.version,
            })
            .collect())
    }

    /// Changes whenever a node is accepted, rejected or forgotten.
    pub fn membership(&self) -> watch::Receiver<u64> {
        self.membership.subscribe()
    }

    /// Records a waiting node as accepted; [`Hub::admit`] then lets it in.
    pub fn accept(&self, actor: &str, name: &str) -> Result<Node, ApiError> {
        self.store().write(|tx| -> Result<Node, ApiError> {
            let node = match tx.node(name)? {
                Some(n) if n.accepted => {
                    return Err(ApiError::Conflict(format!(
                        "node {name:?} is already accepted"
                    )));
                }
                Some(n) => n,
                None => return Err(ApiError::no_waiting(name)),
            };
            let ip = tx.next_node_ip()?;
            tx.accept_node(name, ip)?;
            let node = tx.node(name)?.unwrap_or(node);
            tx.audit(actor, "accept", name, None, Some(&audit_json(&node)))?;
            Ok(node)
        })
    }

    /// Adds an accepted node's overlay peer, then wakes whoever waits on its
    /// admission (its held join connection, a waiting link).
    pub async fn admit(&self, node: &Node) -> Result<Accepted, ApiError> {
        if let Some(o) = &self.overlay {
            o.set_peer(&peer_config(node)).await.map_err(|e| {
                ApiError::Internal(format!(
                    "node {:?} is accepted, but its overlay peer failed: {e}",
                    node.name
                ))
            })?;
        }
        self.membership.send_modify(|n| *n += 1);
        tracing::info!(node = %node.name, ip = ?node.overlay_ip, "node accepted");
        Ok(Accepted {
            name: node.name.clone(),
            overlay_ip: node.overlay_ip.unwrap_or(Ipv6Addr::UNSPECIFIED),
        })
    }

    /// Removes an accepted node, its key and its overlay peer; refused while
    /// services are placed on it.
    pub async fn forget(&self, actor: &str, name: &str) -> Result<Forgotten, ApiError> {
        let node = self.store().write(|tx| -> Result<Node, ApiError> {
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
            Ok(node)
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
        self.forget_seen(name);
        self.membership.send_modify(|n| *n += 1);
        tracing::info!(node = name, "node forgotten");
        Ok(Forgotten {
            forgotten: name.to_owned(),
        })
    }

    pub fn reject(&self, actor: &str, name: &str) -> Result<Rejected, ApiError> {
        self.store().write(|tx| -> Result<(), ApiError> {
            match tx.node(name)? {
                Some(n) if !n.accepted => {
                    tx.delete_node(name)?;
                    tx.audit(actor, "reject", name, Some(&audit_json(&n)), None)?;
                    Ok(())
                }
                Some(_) => Err(ApiError::Conflict(format!(
                    "node {name:?} is already accepted; rejecting is for waiting requests"
                ))),
                None => Err(ApiError::no_waiting(name)),
            }
        })?;
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
                    name: n.name,
                }
            })
            .collect())
    }
}
