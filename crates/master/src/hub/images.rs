//! Images as the API shows them, and the registry's upkeep.
//!
//! The [`crate::registry::Registry`] holds the files and their chunks; this
//! adds what needs the rest of the hub: each node's sync state (from its
//! reports) for `phoenix images`, and which image versions deployed services
//! pin, for garbage collection.

use std::collections::BTreeSet;

use phoenix_model::proto::{ImageNodeView, ImageSync, ImageView};

use super::{ApiError, Hub};

impl Hub {
    /// Resolves when an API change asked for a collection.
    pub async fn collect_requested(&self) {
        self.collect.notified().await;
    }

    /// Asks the registry watcher for a collection (services changed).
    pub(super) fn request_collection(&self) {
        self.collect.notify_one();
    }

    /// One round of registry upkeep (blocking): index changed files (or all
    /// of them), then, if asked, delete chunks and indexes that neither a
    /// registry image nor a deployed service uses.
    pub fn registry_round(&self, rescan: bool, names: BTreeSet<String>, collect: bool) {
        if rescan {
            for (name, e) in self.registry.scan() {
                tracing::warn!(image = %name, "cannot index registry file: {e}");
            }
        }
        for name in names {
            match self.registry.refresh(&name) {
                Ok(Some(r)) => {
                    tracing::debug!(image = %name, hash = %r.hash, "registry file indexed")
                }
                Ok(None) => tracing::info!(image = %name, "registry file removed"),
                Err(e) => tracing::warn!(image = %name, "cannot index registry file: {e}"),
            }
        }
        if !collect {
            return;
        }
        let pinned = match self.store().read().and_then(|tx| tx.services()) {
            Ok(v) => v.into_iter().map(|s| s.image_hash).collect(),
            Err(e) => {
                tracing::error!("cannot read services for garbage collection: {e}");
                return;
            }
        };
        match self.registry.collect(&pinned) {
            Ok(c) if c.chunks > 0 || c.indexes > 0 => tracing::info!(
                indexes = c.indexes,
                chunks = c.chunks,
                bytes = c.bytes,
                "registry garbage collected"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("registry garbage collection: {e}"),
        }
    }

    /// The registry's images and where every accepted node stands with
    /// each.
    pub fn images(&self) -> Result<Vec<ImageView>, ApiError> {
        let entries = self.registry.entries();
        let unique = crate::registry::unique_bytes(&entries);
        let nodes = self.store().read()?.nodes(true)?;
        let seen = self.all_seen();
        Ok(entries
            .iter()
            .zip(unique)
            .map(|((name, e), unique_bytes)| {
                let hash = &e.index.file_hash;
                let nodes = nodes
                    .iter()
                    .map(|n| {
                        let sync = seen.get(&n.name).and_then(|s| s.images.as_ref());
                        node_image_view(&n.name, hash, e.size, sync)
                    })
                    .collect();
                ImageView {
                    name: name.clone(),
                    hash: hash.clone(),
                    size: e.size,
                    chunks: e.index.chunks.len(),
                    unique_bytes,
                    nodes,
                }
            })
            .collect())
    }
}

/// One node's state for one image, from its last report.
fn node_image_view(node: &str, hash: &str, size: u64, sync: Option<&ImageSync>) -> ImageNodeView {
    let mut v = ImageNodeView {
        node: node.to_owned(),
        state: "unknown".into(),
        error: None,
        done: 0,
        total: size,
    };
    let Some(sync) = sync else { return v };
    if sync.held.iter().any(|h| h == hash) {
        v.state = "synced".into();
        v.done = size;
    } else if let Some(f) = sync.fetching.as_ref().filter(|f| f.hash == hash) {
        v.state = "syncing".into();
        v.done = f.done;
        v.total = f.total;
    } else if let Some(e) = sync.failed.get(hash) {
        v.state = "failed".into();
        v.error = Some(e.clone());
    } else {
        v.state = "pending".into();
    }
    v
}
