//! The connected minions: one [`Link`] each, and what the master sends
//! down them.
//!
//! A link is the write end of a channel to the task that writes to the
//! minion's connection ([`crate::link`]). Desired sets are level-triggered:
//! every change, and every (re)connect, sends the node its whole set as the
//! reconciler computes it, so a lost message heals with the next one.

use std::collections::HashMap;
use std::sync::Mutex;

use phoenix_model::proto::ToMinion;
use phoenix_model::status::now_ms;
use tokio::sync::mpsc;

use super::{Hub, desired_sets};
use crate::lock;

/// The write end of a connected minion's link.
pub struct Link {
    /// Identifies the connection, so a stale one cannot unregister a newer.
    pub conn: u64,
    pub tx: mpsc::UnboundedSender<ToMinion>,
}

/// node name → its link.
#[derive(Default)]
pub(super) struct Links(Mutex<HashMap<String, Link>>);

impl Hub {
    /// Registers a minion's connection, replacing an older one.
    pub fn connect(&self, name: &str, version: &str, tx: mpsc::UnboundedSender<ToMinion>) -> u64 {
        let conn = self.next_id();
        lock(&self.links.0).insert(name.to_owned(), Link { conn, tx });
        self.seen_connect(name, version, now_ms());
        conn
    }

    /// Unregisters a connection (unless a newer one replaced it) and ends
    /// the log streams it carried.
    pub fn disconnect(&self, name: &str, conn: u64) {
        let mut links = lock(&self.links.0);
        if links.get(name).is_some_and(|l| l.conn == conn) {
            links.remove(name);
            self.end_streams_of(name);
        }
        drop(links);
        // `wait` re-reads: a service of a gone node will not settle.
        self.status_changed();
    }

    /// Drops a node's link, which closes its connection.
    pub(super) fn drop_link(&self, name: &str) {
        lock(&self.links.0).remove(name);
    }

    pub fn is_connected(&self, node: &str) -> bool {
        lock(&self.links.0).contains_key(node)
    }

    pub fn send(&self, node: &str, msg: ToMinion) -> bool {
        lock(&self.links.0)
            .get(node)
            .is_some_and(|l| l.tx.send(msg).is_ok())
    }

    /// Sends a message to every connected minion.
    pub fn broadcast(&self, msg: &ToMinion) {
        for link in lock(&self.links.0).values() {
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
        let mut sets = match store.read().and_then(|tx| desired_sets(&tx)) {
            Ok(sets) => sets,
            Err(e) => {
                tracing::error!("cannot read the desired sets: {e}");
                return;
            }
        };
        for node in nodes {
            let set = sets.remove(node).unwrap_or_default();
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
