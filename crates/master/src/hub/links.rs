//! The connected minions: one [`Link`] each, and what the master sends
//! down them.
//!
//! A link is the write end of a channel to the task that writes to the
//! minion's connection ([`crate::link`]). Desired sets are level-triggered:
//! every change, and every (re)connect, sends the node its whole set as the
//! reconciler computes it, so a lost message heals with the next one.

use std::collections::HashMap;
use std::sync::Mutex;

use phoenix_model::proto::{LinkDropView, ToMinion};
use phoenix_model::status::now_ms;
use tokio::sync::mpsc;

use super::{Hub, desired_sets};
use crate::lock;

/// The write end of a connected minion's link.
pub struct Link {
    /// Identifies the connection, so a stale one cannot unregister a newer.
    pub conn: u64,
    pub tx: mpsc::UnboundedSender<ToMinion>,
    /// The minion's services share its network (`--service-network
    /// host`): two runs of one service cannot be side by side there.
    pub host_network: bool,
    /// It takes sets without the proxy's routing fields (its `Hello`).
    pub routing_free: bool,
}

/// What a minion's `Hello` says it does.
#[derive(Clone, Copy, Debug)]
pub struct LinkCaps {
    pub host_network: bool,
    pub routing_free: bool,
}

/// The connected minions, and why each one's last link ended.
#[derive(Default)]
pub(super) struct Links {
    /// node name → its link.
    live: Mutex<HashMap<String, Link>>,
    /// node name → how its last link ended (kept in memory, for `nodes`).
    drops: Mutex<HashMap<String, LinkDropView>>,
}

impl Hub {
    /// Registers a connection of a minion of this version (one that
    /// takes sets without routing fields), replacing an older one.
    pub fn connect(
        &self,
        name: &str,
        version: &str,
        host_network: bool,
        tx: mpsc::UnboundedSender<ToMinion>,
    ) -> u64 {
        let caps = LinkCaps {
            host_network,
            routing_free: true,
        };
        self.connect_link(name, version, caps, tx)
    }

    /// Registers a minion's connection, with what its `Hello` says it
    /// does, replacing an older one.
    pub fn connect_link(
        &self,
        name: &str,
        version: &str,
        caps: LinkCaps,
        tx: mpsc::UnboundedSender<ToMinion>,
    ) -> u64 {
        let conn = self.next_id();
        lock(&self.links.live).insert(
            name.to_owned(),
            Link {
                conn,
                tx,
                host_network: caps.host_network,
                routing_free: caps.routing_free,
            },
        );
        self.seen_connect(name, version, now_ms());
        conn
    }

    /// Unregisters a connection (unless a newer one replaced it), notes
    /// why it ended, and ends the log streams it carried.
    pub fn disconnect(&self, name: &str, conn: u64, reason: &str) {
        let mut links = lock(&self.links.live);
        if links.get(name).is_some_and(|l| l.conn == conn) {
            links.remove(name);
            lock(&self.links.drops).insert(
                name.to_owned(),
                LinkDropView {
                    reason: reason.to_owned(),
                    at: now_ms(),
                },
            );
            self.end_streams_of(name);
        }
        drop(links);
        // `wait` re-reads: a service of a gone node will not settle.
        self.status_changed();
    }

    /// Drops a node's link, which closes its connection (a forgotten node:
    /// nothing about its links is kept).
    pub(super) fn drop_link(&self, name: &str) {
        lock(&self.links.live).remove(name);
        lock(&self.links.drops).remove(name);
    }

    /// How a node's last link ended, if one did since the master started.
    pub fn last_drop(&self, node: &str) -> Option<LinkDropView> {
        lock(&self.links.drops).get(node).cloned()
    }

    pub fn is_connected(&self, node: &str) -> bool {
        lock(&self.links.live).contains_key(node)
    }

    /// Whether a new version can start beside the old one on `node`: it is
    /// connected and gives each service a network namespace of its own.
    pub(super) fn runs_side_by_side(&self, node: &str) -> bool {
        lock(&self.links.live)
            .get(node)
            .is_some_and(|l| !l.host_network)
    }

    /// Whether `node` is connected and takes sets without the proxy's
    /// routing fields: a change of only those is then no change to it.
    pub(super) fn takes_routing_free(&self, node: &str) -> bool {
        lock(&self.links.live)
            .get(node)
            .is_some_and(|l| l.routing_free)
    }

    pub fn send(&self, node: &str, msg: ToMinion) -> bool {
        lock(&self.links.live)
            .get(node)
            .is_some_and(|l| l.tx.send(msg).is_ok())
    }

    /// Sends a message to every connected minion.
    pub fn broadcast(&self, msg: &ToMinion) {
        for link in lock(&self.links.live).values() {
            let _ = link.tx.send(msg.clone());
        }
    }

    /// Pushes each of these nodes that is connected its whole desired set,
    /// as the reconciler decides it now.
    pub fn push_desired<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) {
        // Read and send under the store lock: a later change cannot commit
        // between them, so sets go out in revision order even when API
        // calls race (each send carries the newest state at its time).
        let mut store = self.store();
        // Each assignment gets its resolved environment (secrets opened)
        // here, on its way to the minion, and nowhere else (`hub::env`).
        let read = store.read().and_then(|tx| {
            let mut sets = desired_sets(&tx)?;
            let unresolved = self.resolve_envs(&tx, &mut sets);
            Ok((sets, unresolved))
        });
        let (mut sets, unresolved) = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::error!("cannot read the desired sets: {e}");
                return;
            }
        };
        for node in nodes {
            if unresolved.contains(node) {
                continue;
            }
            let mut set = sets.remove(node).unwrap_or_default();
            // The proxy's routing fields stay on the master where the
            // minion can do without them (`reconcile::without_routing`).
            if self.takes_routing_free(node) {
                crate::reconcile::without_routing(&mut set);
            }
            tracing::debug!(
                node,
                revision = set.revision,
                services = set.services.len(),
                "push desired set"
            );
            self.send(node, ToMinion::Desired(set));
        }
        drop(store);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_link_is_shown_with_its_reason_until_the_node_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let hub = super::super::apply::tests::hub(dir.path());
        let view = |hub: &Hub| {
            hub.nodes()
                .unwrap()
                .into_iter()
                .find(|n| n.name == "m1")
                .unwrap()
        };
        assert_eq!(view(&hub).last_drop, None);

        let (tx, _rx) = mpsc::unbounded_channel();
        let old = hub.connect("m1", "0", false, tx);
        // A newer connection replaces it: the old one's end is no drop.
        let (tx, _rx2) = mpsc::unbounded_channel();
        let new = hub.connect("m1", "0", false, tx);
        hub.disconnect("m1", old, "closed by the master");
        assert_eq!(view(&hub).last_drop, None);
        assert_eq!(view(&hub).state, "reachable");

        let before = now_ms();
        hub.disconnect("m1", new, "no heartbeat for 6000 ms");
        let node = view(&hub);
        assert_eq!(node.state, "unreachable");
        let drop = node.last_drop.expect("the drop is shown");
        assert_eq!(drop.reason, "no heartbeat for 6000 ms");
        assert!(drop.at >= before, "{drop:?}");
        let json = serde_json::to_value(view(&hub)).unwrap();
        assert_eq!(
            json["last_drop"]["reason"],
            serde_json::json!("no heartbeat for 6000 ms")
        );

        hub.drop_link("m1");
        assert_eq!(view(&hub).last_drop, None);
    }
}
