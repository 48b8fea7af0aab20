//! The mesh: every other minion as a direct WireGuard peer of this one.
//!
//! Each desired set lists the other minions ([`MeshPeer`]: key, overlay
//! address, endpoint, the addresses of their services). This minion makes
//! its overlay's peers match that list: a peer for each, allowed its
//! overlay /128 and its services' /128s, so traffic to another minion or its
//! services goes straight there (WireGuard picks the most specific allowed
//! IP, and the master peer's /48 is only the fallback). Peers no longer
//! listed are removed. The master peer is never touched.
//!
//! The list comes with every desired set, from the master or from
//! `desired.json` at start, so a minion cut off from the master keeps (and
//! after a restart rebuilds) its mesh, and services keep talking.
//!
//! [`keep`] runs as a task of its own: the link hands it each list through
//! a watch channel and never waits on the overlay. A peer whose config is
//! unchanged is not set again, so its sessions stay up.

use std::sync::Arc;
use std::time::Duration;

use phoenix_model::proto::MeshPeer;
use phoenix_overlay::{Overlay, OverlayError, PeerConfig};
use tokio::sync::watch;

/// How long to wait before trying again a mesh the overlay refused (unless
/// a new list comes first).
const RETRY: Duration = Duration::from_secs(5);

/// The sending end: the link puts each desired set's peers here.
pub type MeshSender = watch::Sender<Vec<MeshPeer>>;

/// A channel for the mesh, empty to begin with.
pub fn channel() -> (MeshSender, watch::Receiver<Vec<MeshPeer>>) {
    watch::channel(Vec::new())
}

/// Hands a desired set's peers to [`keep`]; wakes it only if they changed.
pub fn offer(mesh: &MeshSender, peers: &[MeshPeer]) {
    mesh.send_if_modified(|current| {
        if current.as_slice() == peers {
            return false;
        }
        *current = peers.to_vec();
        true
    });
}

/// The overlay peer for another minion: its overlay address and its
/// services' addresses, at the endpoint it joined with. With a keepalive:
/// a minion that restarts has lost its sessions while its peers still
/// send on theirs, which it cannot read; its keepalive handshakes at once,
/// so their traffic to its services flows again within a round trip
/// instead of after WireGuard's own timeout (about 15 s). It also keeps
/// NAT mappings open.
pub fn peer_config(p: &MeshPeer) -> PeerConfig {
    PeerConfig {
        key: p.key.clone(),
        allowed: std::iter::once(p.overlay_ip)
            .chain(p.services.iter().copied())
            .map(|ip| (ip, 128))
            .collect(),
        endpoint: p.endpoint,
        keepalive: Some(phoenix_overlay::KEEPALIVE_SECS),
    }
}

/// What to change to go from the overlay's peers `current` to the mesh
/// `wanted`: the peers to set (new or changed ones) and the keys to remove
/// (minion peers no longer listed). The peers with key `keep` (the master,
/// and this minion itself should it be listed) are left alone.
pub fn plan(
    current: &[PeerConfig],
    wanted: &[MeshPeer],
    keep: &[&str],
) -> (Vec<PeerConfig>, Vec<String>) {
    let wanted: Vec<PeerConfig> = wanted
        .iter()
        .filter(|p| !keep.contains(&p.key.as_str()))
        .map(peer_config)
        .collect();
    let set = wanted
        .iter()
        .filter(|w| !current.contains(w))
        .cloned()
        .collect();
    let remove = current
        .iter()
        .filter(|c| !keep.contains(&c.key.as_str()) && !wanted.iter().any(|w| w.key == c.key))
        .map(|c| c.key.clone())
        .collect();
    (set, remove)
}

/// Makes the overlay's minion peers match `wanted`. Every step is tried;
/// the first error is returned.
async fn apply(overlay: &Overlay, wanted: &[MeshPeer], keep: &[&str]) -> Result<(), OverlayError> {
    let (set, remove) = plan(&overlay.peers(), wanted, keep);
    let mut first_error = None;
    for key in remove {
        match overlay.remove_peer(&key).await {
            Ok(()) => tracing::info!(%key, "mesh peer removed"),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for p in set {
        match overlay.set_peer(&p).await {
            Ok(()) => tracing::info!(
                key = %p.key,
                endpoint = ?p.endpoint,
                addresses = p.allowed.len(),
                "mesh peer set"
            ),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Keeps the overlay's minion peers equal to the latest list, until the
/// sending end is gone. `master_key` and `own_key` are never touched.
pub async fn keep(
    overlay: Arc<Overlay>,
    master_key: String,
    own_key: String,
    mut peers: watch::Receiver<Vec<MeshPeer>>,
) {
    let keep = [master_key.as_str(), own_key.as_str()];
    loop {
        let wanted = peers.borrow_and_update().clone();
        let failed = apply(&overlay, &wanted, &keep).await.err();
        if let Some(e) = &failed {
            tracing::error!(
                "cannot set up the mesh ({} peers): {e}; trying again in {} s",
                wanted.len(),
                RETRY.as_secs()
            );
        }
        tokio::select! {
            changed = peers.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RETRY), if failed.is_some() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_model::net;

    fn minion(n: u64, services: &[u64]) -> MeshPeer {
        MeshPeer {
            node: format!("m{n}"),
            key: format!("key-{n}"),
            overlay_ip: net::node_ip(n),
            endpoint: Some(format!("10.0.0.{}:51820", n + 1).parse().unwrap()),
            services: services.iter().map(|s| net::service_ip(*s)).collect(),
        }
    }

    fn master() -> PeerConfig {
        PeerConfig {
            key: "master".into(),
            allowed: vec![(net::MASTER_IP, 48)],
            endpoint: Some("10.0.0.1:51820".parse().unwrap()),
            keepalive: Some(25),
        }
    }

    #[test]
    fn a_minion_peer_allows_its_address_and_its_services() {
        let c = peer_config(&minion(2, &[4, 7]));
        assert_eq!(
            c.allowed,
            [
                (net::node_ip(2), 128),
                (net::service_ip(4), 128),
                (net::service_ip(7), 128)
            ]
        );
        assert_eq!(c.endpoint, Some("10.0.0.3:51820".parse().unwrap()));
        assert_eq!(c.keepalive, Some(phoenix_overlay::KEEPALIVE_SECS));
    }

    #[test]
    fn only_new_and_changed_peers_are_set_and_unlisted_ones_removed() {
        let keep = ["master", "key-1"];
        // From the master alone: every listed minion is added.
        let wanted = [minion(2, &[]), minion(3, &[1])];
        let (set, remove) = plan(&[master()], &wanted, &keep);
        assert_eq!(set, [peer_config(&wanted[0]), peer_config(&wanted[1])]);
        assert!(remove.is_empty());

        // Unchanged peers are left alone (their sessions stay); a service
        // moved from m3 to m2 changes both; m4 went away.
        let current = [
            master(),
            peer_config(&minion(2, &[])),
            peer_config(&minion(3, &[1])),
            peer_config(&minion(4, &[])),
            peer_config(&minion(5, &[9])),
        ];
        let wanted = [minion(2, &[1]), minion(3, &[]), minion(5, &[9])];
        let (set, remove) = plan(&current, &wanted, &keep);
        assert_eq!(set, [peer_config(&wanted[0]), peer_config(&wanted[1])]);
        assert_eq!(remove, ["key-4"]);

        // The same list again changes nothing.
        let current = [
            master(),
            peer_config(&wanted[0]),
            peer_config(&wanted[1]),
            peer_config(&wanted[2]),
        ];
        assert_eq!(plan(&current, &wanted, &keep), (vec![], vec![]));
    }

    #[test]
    fn the_master_and_this_minion_are_never_touched() {
        let keep = ["master", "key-1"];
        // An empty list (an older master's set) removes the minions only.
        let current = [master(), peer_config(&minion(2, &[]))];
        assert_eq!(plan(&current, &[], &keep), (vec![], vec!["key-2".into()]));
        // Ourselves, or the master's key, listed as a peer: ignored.
        let mut odd = minion(9, &[]);
        odd.key = "master".into();
        let (set, remove) = plan(&[master()], &[minion(1, &[]), odd], &keep);
        assert!(set.is_empty() && remove.is_empty());
    }

    #[test]
    fn an_unchanged_list_does_not_wake_the_task() {
        let (tx, mut rx) = channel();
        let peers = [minion(2, &[])];
        offer(&tx, &peers);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        offer(&tx, &peers);
        assert!(!rx.has_changed().unwrap());
        offer(&tx, &[]);
        assert!(rx.has_changed().unwrap());
    }
}
