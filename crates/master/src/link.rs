//! The minion link: one long-lived connection per minion, dialled by it.
//!
//! The first frame says what the connection is for: [`ToMaster::Hello`]
//! starts the long-lived link, [`ToMaster::FetchIndex`] asks for one image.
//! Until the overlay lands this is clear TCP on the master's link port.

use std::sync::Arc;

use phoenix_model::framed::{self, LinkDrop, LinkTiming, SendError};
use phoenix_model::proto::{MAX_FRAME, ToMaster, ToMinion, read_frame, write_frame};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::BoxError;
use crate::hub::{Hub, LogEvent};
use crate::store::Node;

pub async fn serve(hub: Arc<Hub>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("link accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let hub = hub.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(hub, stream).await {
                tracing::info!(%peer, "link closed: {e}");
            }
        });
    }
}

/// Chunk batches being encoded at once, over all fetches.
static ENCODERS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();

/// The accepted node with this name and key, if any.
fn member(hub: &Hub, name: &str, key: &str) -> Result<Option<Node>, BoxError> {
    Ok(hub.node(name)?.filter(|n| n.key == key))
}

async fn connection(hub: Arc<Hub>, mut stream: TcpStream) -> Result<(), BoxError> {
    let first: Option<ToMaster> = read_frame(&mut stream, MAX_FRAME).await?;
    match first {
        Some(ToMaster::Hello {
            name,
            key,
            version,
            revision,
            host_network,
            routing_free,
        }) => {
            let caps = crate::hub::LinkCaps {
                host_network,
                routing_free,
            };
            link(hub, stream, name, key, version, revision, caps).await
        }
        Some(ToMaster::FetchIndex {
            name,
            key,
            image,
            hash,
        }) => fetch(hub, stream, name, key, image, hash).await,
        Some(other) => Err(format!("unexpected first message {other:?}").into()),
        None => Ok(()),
    }
}

async fn refuse(stream: &mut TcpStream, reason: String) -> Result<(), BoxError> {
    write_frame(
        stream,
        &ToMinion::Refused {
            reason: reason.clone(),
        },
    )
    .await?;
    Err(reason.into())
}

async fn link(
    hub: Arc<Hub>,
    mut stream: TcpStream,
    name: String,
    key: String,
    version: String,
    revision: u64,
    caps: crate::hub::LinkCaps,
) -> Result<(), BoxError> {
    // A minion that has asked to join waits here until it is accepted;
    // the accept wakes it, no polling.
    let mut membership = hub.membership();
    loop {
        match hub.node(&name)? {
            Some(n) if n.key != key => {
                return refuse(
                    &mut stream,
                    format!("node {name:?} is known with another key"),
                )
                .await;
            }
            Some(n) if n.accepted => break,
            Some(_) => {
                tokio::select! {
                    changed = membership.changed() => changed?,
                    // The minion hung up while waiting.
                    _ = stream.readable() => {
                        // Nothing may come before the Welcome but a hang-up.
                        let mut probe = [0u8; 1];
                        match stream.try_read(&mut probe) {
                            Ok(0) => return Ok(()),
                            Ok(_) => return Err("message before the welcome".into()),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
            }
            None => {
                return refuse(
                    &mut stream,
                    format!("node {name:?} has no join request; run `phoenix minion` on it"),
                )
                .await;
            }
        }
    }
    let timeout = hub.settings.node_timeout;
    // Both sides speak at least every third of the timeout; a minion silent
    // for the whole of it is gone (cut off, or its host is down).
    let timing = LinkTiming {
        heartbeat: timeout / 3,
        silence: timeout,
    };
    let welcome = ToMinion::Welcome {
        master_key: hub.info.key.clone(),
        heartbeat_ms: timing.heartbeat.as_millis() as u64,
    };
    write_frame(&mut stream, &welcome).await?;
    tracing::info!(node = %name, revision, "minion connected");

    let (rd, wr) = stream.into_split();
    let (to_minion, mut from_minion) =
        framed::spawn::<ToMaster, _, _, _>(rd, wr, &ToMinion::Heartbeat, timing, MAX_FRAME)?;
    // The hub queues messages here; they are encoded onto the link below,
    // where one too large for a frame is logged and skipped.
    let (tx, mut rx) = mpsc::unbounded_channel::<ToMinion>();
    let conn = hub.connect_link(&name, &version, caps, tx);
    hub.push_desired([name.as_str()]);
    hub.send(
        &name,
        ToMinion::Catalog {
            images: hub.registry.catalog(),
        },
    );
    let reason = loop {
        tokio::select! {
            queued = rx.recv() => match queued {
                Some(msg) => match to_minion.send(&msg) {
                    Ok(()) => {}
                    Err(SendError::Encode(e)) => tracing::error!(
                        node = %name,
                        "{} not sent: {e}",
                        describe(&msg)
                    ),
                    // The link ended: its receiver says why.
                    Err(SendError::Closed) => {}
                },
                None => {
                    break "closed by the master (a newer connection from the node, or the node was forgotten)".to_owned();
                }
            },
            frame = from_minion.recv() => match frame {
                Ok(msg) => {
                    if let Err(unexpected) = handle(&hub, &name, msg) {
                        break unexpected;
                    }
                }
                Err(LinkDrop::PeerClosed) => break "the minion closed the connection".to_owned(),
                Err(drop) => break drop.to_string(),
            },
        }
    };
    hub.disconnect(&name, conn, &reason);
    drop(from_minion);
    tracing::warn!(node = %name, "minion link dropped: {reason}");
    Ok(())
}

/// Takes in one message from a connected minion; one it should not send
/// ends the link, with this reason.
fn handle(hub: &Hub, name: &str, msg: ToMaster) -> Result<(), String> {
    match msg {
        ToMaster::Heartbeat => hub.touch(name),
        ToMaster::Status { services, full } => hub.report_status(name, services, full),
        ToMaster::Gone { names } => hub.report_gone(name, names),
        ToMaster::Node(stats) => hub.report_node(name, stats),
        ToMaster::Images(sync) => hub.report_images(name, sync),
        ToMaster::LogData { stream, data } => hub.log_event(stream, LogEvent::Data(data)),
        ToMaster::LogEnd { stream, error } => hub.log_event(stream, LogEvent::End(error)),
        other => return Err(format!("unexpected message {}", describe_up(&other))),
    }
    Ok(())
}

/// A message to a minion, named for a log line (not its whole content: a
/// desired set can be megabytes).
fn describe(msg: &ToMinion) -> String {
    match msg {
        ToMinion::Desired(set) => format!(
            "desired set of revision {} ({} services)",
            set.revision,
            set.services.len()
        ),
        ToMinion::Catalog { images } => format!("catalog of {} images", images.len()),
        ToMinion::Logs { service, .. } => format!("log request for {service:?}"),
        ToMinion::Welcome { .. } => "welcome".into(),
        ToMinion::Heartbeat => "heartbeat".into(),
        ToMinion::Refused { .. } => "refusal".into(),
        ToMinion::LogsCancel { .. } => "log cancel".into(),
        ToMinion::Index { .. } => "index".into(),
        ToMinion::Chunks { .. } => "chunk batch".into(),
    }
}

/// A minion's message, named for a log line.
fn describe_up(msg: &ToMaster) -> &'static str {
    match msg {
        ToMaster::Hello { .. } => "hello",
        ToMaster::Heartbeat => "heartbeat",
        ToMaster::Status { .. } => "status",
        ToMaster::Gone { .. } => "gone",
        ToMaster::Node(_) => "node stats",
        ToMaster::LogData { .. } => "log data",
        ToMaster::LogEnd { .. } => "log end",
        ToMaster::FetchIndex { .. } => "fetch index",
        ToMaster::FetchChunks { .. } => "fetch chunks",
        ToMaster::Images(_) => "images",
    }
}

/// Serves one image fetch: its index, then the chunks the minion lacks, in
/// the batches it asks for, until it hangs up.
async fn fetch(
    hub: Arc<Hub>,
    mut stream: TcpStream,
    name: String,
    key: String,
    image: String,
    hash: String,
) -> Result<(), BoxError> {
    if member(&hub, &name, &key)?.is_none_or(|n| !n.accepted) {
        return refuse(
            &mut stream,
            format!("node {name:?} is not an accepted member"),
        )
        .await;
    }
    let h = hub.clone();
    let index = match tokio::task::spawn_blocking(move || h.registry.index(&image, &hash)).await? {
        Ok(i) => i,
        Err(e) => return refuse(&mut stream, e.to_string()).await,
    };
    let bytes = index.to_bytes();
    write_frame(
        &mut stream,
        &ToMinion::Index {
            size: bytes.len() as u64,
        },
    )
    .await?;
    stream.write_all(&bytes).await?;
    while let Some(msg) = read_frame::<_, ToMaster>(&mut stream, MAX_FRAME).await? {
        let ToMaster::FetchChunks { hashes, bases } = msg else {
            return Err(format!("unexpected message {msg:?} in a fetch").into());
        };
        // Reading and compressing a batch takes a core for a few ms; with
        // many minions fetching at once, a core is left for everything else.
        let permit = ENCODERS
            .get_or_init(|| {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1))
            })
            .acquire()
            .await?;
        let h = hub.clone();
        let batch =
            match tokio::task::spawn_blocking(move || h.registry.chunk_batch(&hashes, &bases))
                .await?
            {
                Ok(b) => b,
                Err(e) => return refuse(&mut stream, e.to_string()).await,
            };
        drop(permit);
        write_frame(
            &mut stream,
            &ToMinion::Chunks {
                size: batch.len() as u64,
            },
        )
        .await?;
        stream.write_all(&batch).await?;
    }
    Ok(())
}
