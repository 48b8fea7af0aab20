//! Changes that reach every node they touch, and the master's own peers.
//!
//! A node's desired set depends on more than its own services: its mesh
//! peers list every other minion with the addresses it serves, and its
//! assignments carry the addresses of the services they link to. So a
//! deploy on one machine can change every other machine's set. Every change
//! goes through [`Hub::write_change`]: in its one transaction it compares
//! every node's set before and after, bumps the revision of each that
//! changed, and returns them; [`Hub::publish`] then pushes those nodes
//! their whole sets and wakes [`Hub::keep_overlay_peers`], which gives the
//! master's WireGuard peer of each minion the addresses it now serves.

use std::collections::{BTreeMap, BTreeSet};

use phoenix_model::proto::{DesiredSet, MeshPeer};
use phoenix_overlay::PeerConfig;

use super::{ApiError, Hub, desired_sets};
use crate::reconcile;
use crate::store::{Node, Service, Tx};

/// The nodes whose set differs between `before` and `after`, revisions
/// aside. A node new in `after` counts; one gone from it does not (it is no
/// member any more, and gets nothing). Without `before` (the store could
/// not say), every node counts.
pub(super) fn changed_sets(
    before: Option<&BTreeMap<String, DesiredSet>>,
    after: &BTreeMap<String, DesiredSet>,
) -> BTreeSet<String> {
    after
        .iter()
        .filter(|(name, set)| {
            before
                .and_then(|b| b.get(*name))
                .is_none_or(|old| old.services != set.services || old.peers != set.peers)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// The master's WireGuard peer for a minion: its overlay address and the
/// addresses of its services (so the master, and whatever it runs, can
/// reach them and accept their packets), at the endpoint it joined with.
/// The master sends no keepalive: the minion keeps the path open.
pub fn master_peer(p: &MeshPeer) -> PeerConfig {
    PeerConfig {
        key: p.key.clone(),
        allowed: allowed_ips(p),
        endpoint: p.endpoint,
        keepalive: None,
    }
}

/// A mesh peer's allowed IPs: its overlay address and its services', each
/// a /128.
pub fn allowed_ips(p: &MeshPeer) -> Vec<(std::net::Ipv6Addr, u8)> {
    std::iter::once(p.overlay_ip)
        .chain(p.services.iter().copied())
        .map(|ip| (ip, 128))
        .collect()
}

/// The master's peer for each accepted node, as [`master_peer`] makes it.
pub fn master_peers(nodes: &[Node], services: &[Service]) -> Vec<PeerConfig> {
    reconcile::mesh(nodes, services)
        .iter()
        .map(master_peer)
        .collect()
}

impl Hub {
    /// Runs a change in one store transaction and bumps the revision of
    /// every node whose desired set it changes: `f` returns its result and
    /// the machines it knows it touched (counted even when the sets cannot
    /// be computed, e.g. a stored spec that no longer passes the checks).
    /// A change after which a changed set would not fit in a link frame is
    /// refused and rolled back. Returns `f`'s result and the changed nodes,
    /// for [`Hub::publish`].
    pub(super) fn write_change<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<(T, BTreeSet<String>), ApiError>,
    ) -> Result<(T, BTreeSet<String>), ApiError> {
        self.change(true, f)
    }

    /// [`write_change`](Self::write_change), committed or, without
    /// `commit`, run whole (every check, the desired sets' sizes too) in a
    /// transaction that is then rolled back: what a dry run reports is
    /// what the change would meet.
    pub(super) fn change<T>(
        &self,
        commit: bool,
        f: impl FnOnce(&mut Tx<'_>) -> Result<(T, BTreeSet<String>), ApiError>,
    ) -> Result<(T, BTreeSet<String>), ApiError> {
        let inner = |tx: &mut Tx<'_>| {
            let before = desired_sets(tx).ok();
            let (out, mut changed) = f(tx)?;
            match desired_sets(tx) {
                Ok(after) => {
                    changed.extend(changed_sets(before.as_ref(), &after));
                    changed.retain(|n| after.contains_key(n));
                    // Checked on the sets as they would be sent; an error
                    // here rolls the whole change back.
                    super::apply::desired_sets_fit(
                        &after,
                        &changed,
                        phoenix_model::proto::MAX_DESIRED_SET,
                    )?;
                }
                Err(e) => tracing::warn!(
                    "cannot compute the desired sets after a change ({e}); only its own machines get theirs"
                ),
            }
            for n in &changed {
                tx.bump_revision(n)?;
            }
            Ok((out, changed))
        };
        let mut store = self.store();
        if commit {
            store.write(inner)
        } else {
            // Never committed: dropped, it rolls back.
            inner(&mut store.read()?)
        }
    }

    /// After a committed change: pushes each changed node its whole set,
    /// and has the master's overlay peers follow.
    pub(super) fn publish(&self, changed: &BTreeSet<String>) {
        self.push_desired(changed.iter().map(String::as_str));
        self.mesh_changed.notify_one();
        self.routes_changed.notify_one();
    }

    /// The master's peer for each accepted node, from the store.
    pub fn master_peers(&self) -> Result<Vec<PeerConfig>, ApiError> {
        let mut store = self.store();
        let tx = store.read()?;
        Ok(master_peers(&tx.nodes(true)?, &tx.services()?))
    }

    /// Keeps the allowed IPs of the master's WireGuard peers equal to what
    /// each minion serves: once now, then after every change. Runs until
    /// the master stops; without the overlay, returns at once.
    pub async fn keep_overlay_peers(&self) {
        let Some(overlay) = &self.overlay else {
            return;
        };
        loop {
            match self.master_peers() {
                Ok(peers) => {
                    for p in peers {
                        // A peer the overlay does not have yet (an accept
                        // in progress) is added with its addresses by
                        // `admit`; nothing is done for it here.
                        match overlay.set_allowed_ips(&p.key, &p.allowed).await {
                            Ok(true) => tracing::debug!(
                                key = %p.key,
                                allowed = p.allowed.len(),
                                "master peer's allowed IPs updated"
                            ),
                            Ok(false) => {}
                            Err(e) => tracing::error!(
                                key = %p.key,
                                "cannot update the master's WireGuard peer: {e}"
                            ),
                        }
                    }
                }
                Err(e) => tracing::error!("cannot compute the master's WireGuard peers: {e}"),
            }
            self.mesh_changed.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(revision: u64, peers: usize) -> DesiredSet {
        DesiredSet {
            revision,
            services: Vec::new(),
            peers: (0..peers)
                .map(|i| MeshPeer {
                    node: format!("m{i}"),
                    key: format!("k{i}"),
                    overlay_ip: phoenix_model::net::node_ip(i as u64 + 1),
                    endpoint: None,
                    services: Vec::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_set_changes_by_its_content_not_its_revision() {
        let before = BTreeMap::from([("a".to_owned(), set(1, 1)), ("b".to_owned(), set(1, 1))]);
        let after = BTreeMap::from([
            ("a".to_owned(), set(5, 1)),
            ("b".to_owned(), set(1, 2)),
            ("c".to_owned(), set(0, 0)),
        ]);
        let changed = changed_sets(Some(&before), &after);
        assert_eq!(changed, BTreeSet::from(["b".to_owned(), "c".to_owned()]));
        assert_eq!(changed_sets(None, &after).len(), 3);
    }

    #[test]
    fn the_master_peer_allows_the_overlay_address_and_the_services() {
        let p = MeshPeer {
            node: "m1".into(),
            key: "k".into(),
            overlay_ip: phoenix_model::net::node_ip(1),
            endpoint: Some("10.0.0.2:51820".parse().unwrap()),
            services: vec![phoenix_model::net::service_ip(0)],
        };
        let c = master_peer(&p);
        assert_eq!(
            c.allowed,
            [
                (phoenix_model::net::node_ip(1), 128),
                (phoenix_model::net::service_ip(0), 128)
            ]
        );
        assert_eq!(c.endpoint, p.endpoint);
        assert_eq!(c.keepalive, None);
    }
}
