//! Keeps the registry's catalog current from filesystem events, pushes it
//! to the minions, and collects what no image or service needs any more.
//!
//! Files may arrive by `phoenix push` (indexed on upload, so its event finds
//! nothing to do) or by hand: `cp`/`mv`/`rm` in `DATA_DIR/registry`. Events
//! that come close together are taken as one change, so copying a hundred
//! files makes one catalog push and one collection, not a hundred.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use phoenix_model::proto::ToMinion;

use crate::hub::Hub;
use crate::registry::is_image_file_name;

/// How long to wait for more events once one came.
const SETTLE: Duration = Duration::from_millis(10);

/// Runs the watcher until the master stops; logs why if it cannot.
pub async fn run(hub: Arc<Hub>) {
    tokio::spawn(push_catalog(hub.clone()));
    if let Err(e) = watch(hub).await {
        tracing::error!(
            "registry watcher stopped: {e}; files added by hand are picked up at the next deploy or restart"
        );
    }
}

/// Sends the catalog to every connected minion whenever it changes.
async fn push_catalog(hub: Arc<Hub>) {
    let mut changes = hub.registry.changes();
    while changes.changed().await.is_ok() {
        let images = hub.registry.catalog();
        tracing::info!(
            images = images.len(),
            "registry changed; telling the minions"
        );
        hub.broadcast(&ToMinion::Catalog { images });
    }
}

/// What to do on the next round.
#[derive(Default)]
struct Todo {
    rescan: bool,
    names: BTreeSet<String>,
    collect: bool,
}

async fn watch(hub: Arc<Hub>) -> std::io::Result<()> {
    let inotify = Inotify::init()?;
    let mut events = inotify.into_event_stream(vec![0u8; 4096])?;
    events.watches().add(
        hub.registry.dir(),
        WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::ATTRIB,
    )?;
    // The watch is set: now read what was there before it.
    let mut todo = Todo {
        rescan: true,
        collect: true,
        ..Todo::default()
    };
    loop {
        let round = std::mem::take(&mut todo);
        let h = hub.clone();
        let _ = tokio::task::spawn_blocking(move || {
            h.registry_round(round.rescan, round.names, round.collect)
        })
        .await;
        // Wait for the next event or collection request, then let a burst settle.
        tokio::select! {
            ev = events.next() => match ev {
                Some(ev) => note(&mut todo, ev?),
                None => return Ok(()),
            },
            () = hub.collect_requested() => todo.collect = true,
        }
        while let Ok(Some(ev)) = tokio::time::timeout(SETTLE, events.next()).await {
            note(&mut todo, ev?);
        }
    }
}

fn note(todo: &mut Todo, ev: inotify::Event<std::ffi::OsString>) {
    if ev.mask.contains(EventMask::Q_OVERFLOW) {
        todo.rescan = true;
    }
    if let Some(name) = ev.name.as_ref().and_then(|n| n.to_str())
        && is_image_file_name(name)
    {
        todo.names.insert(name.to_owned());
        todo.collect = true;
    }
}
