//! The API on the master's Unix socket: what the CLI talks to.
//!
//! One [`Request`] per connection, answered by one final [`Reply`] (`Ok` or
//! `Error`), with `Log` replies before it for log streams. Handlers return
//! typed replies (`phoenix_model::proto::{Applied, Deleted, ...}`) or an
//! [`ApiError`], whose kind travels with its message; this module only turns
//! them into frames. The socket is
//! mode 0600 in the data dir: whoever can open it administers the cluster.

use std::sync::Arc;
use std::time::Duration;

use phoenix_model::proto::{
    AuditEntry, MAX_FRAME, Pushed, Reply, Request, read_frame, write_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::BoxError;
use crate::hub::{ApiError, Apply, Hub, LogEvent};
use crate::registry::{self, FileFormat, NotRunnable};

pub async fn serve(hub: Arc<Hub>, listener: UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("api accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(hub, stream).await {
                tracing::debug!("api connection: {e}");
            }
        });
    }
}

/// Names the caller for the audit log: `uid 1000 (alice)`.
fn actor(stream: &UnixStream) -> String {
    let Ok(cred) = stream.peer_cred() else {
        return "unknown".into();
    };
    let uid = cred.uid();
    let user = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| phoenix_host::users::user_by_uid(&p, uid).map(|u| u.name.to_owned()));
    match user {
        Some(u) => format!("uid {uid} ({u})"),
        None => format!("uid {uid}"),
    }
}

async fn connection(hub: Arc<Hub>, mut stream: UnixStream) -> Result<(), BoxError> {
    let Some(req) = read_frame::<_, Request>(&mut stream, MAX_FRAME).await? else {
        return Ok(());
    };
    let who = actor(&stream);
    let reply = match req {
        Request::Logs { name, tail, follow } => {
            return logs(&hub, stream, &name, tail, follow).await;
        }
        Request::Push { name, size } => reply(push(&hub, &mut stream, &who, name, size).await),
        Request::Accept { name, fingerprint } => {
            let h = hub.clone();
            let n = name.clone();
            let accepted = match tokio::task::spawn_blocking(move || {
                h.accept(&who, &n, fingerprint.as_deref())
            })
            .await
            {
                // A node that cannot get in is rolled back, and audited
                // as such (`accept-rolled-back`), by `admit` itself.
                Ok(Ok(node)) => hub.admit(&node).await,
                Ok(Err(e)) => Err(e),
                Err(e) => Err(ApiError::Internal(format!("accept: {e}"))),
            };
            if let Err(e) = &accepted {
                tracing::warn!(node = %name, "accept failed: {e}");
            }
            reply(accepted)
        }
        Request::Forget { name } => reply(hub.forget(&who, &name).await),
        Request::Update {
            source,
            text,
            env_files,
        } => {
            let h = hub.clone();
            let applied = tokio::task::spawn_blocking(move || {
                h.apply_with_env_files(&who, Apply::Update, &source, &text, &env_files)
            })
            .await
            .unwrap_or_else(|e| Err(ApiError::Internal(format!("update: {e}"))));
            reply(applied.inspect(|applied| start_rollouts(&hub, applied)))
        }
        Request::Restart { names } => {
            let h = hub.clone();
            let applied = tokio::task::spawn_blocking(move || h.restart(&who, &names))
                .await
                .unwrap_or_else(|e| Err(ApiError::Internal(format!("restart: {e}"))));
            reply(applied.inspect(|applied| start_rollouts(&hub, applied)))
        }
        Request::Del { name } => reply(hub.delete_drained(&who, &name).await),
        Request::ApplyTree {
            source,
            files,
            prune,
            dry_run,
        } => {
            let plan = hub
                .apply_tree_drained(who, source, files, prune, dry_run)
                .await;
            reply(plan.inspect(|plan| start_rollouts(&hub, &plan.applied)))
        }
        // Its rollouts are started by `hub::git`, as for a watched commit.
        Request::GitSource(settings) => reply(hub.git_source(who, settings).await),
        Request::Wait { names, timeout_ms } => {
            reply(hub.wait(&names, Duration::from_millis(timeout_ms)).await)
        }
        Request::WaitGone { names, timeout_ms } => reply(
            hub.wait_gone(&names, Duration::from_millis(timeout_ms))
                .await,
        ),
        req => {
            let hub = hub.clone();
            tokio::task::spawn_blocking(move || handle(&hub, &who, req))
                .await
                .unwrap_or_else(|e| reply::<()>(Err(ApiError::Internal(format!("request: {e}")))))
        }
    };
    write_frame(&mut stream, &reply).await?;
    Ok(())
}

/// Starts the task of every zero-downtime update among `applied`.
fn start_rollouts(hub: &Arc<Hub>, applied: &[phoenix_model::proto::Applied]) {
    for a in applied.iter().filter(|a| a.beside) {
        hub.start_rollout(&a.name, a.generation);
    }
}

/// The final reply for a handler's typed result.
fn reply<T: serde::Serialize>(result: Result<T, ApiError>) -> Reply {
    Reply::of(result.map_err(ApiError::into_wire))
}

/// The requests that only touch the store (blocking).
fn handle(hub: &Hub, who: &str, req: Request) -> Reply {
    match req {
        Request::MasterInfo => reply(hub.master_info()),
        Request::Waiting => reply(hub.waiting()),
        Request::Reject { name, fingerprint } => {
            reply(hub.reject(who, &name, fingerprint.as_deref()))
        }
        Request::Deploy {
            source,
            text,
            env_files,
        } => reply(hub.apply_with_env_files(who, Apply::Deploy, &source, &text, &env_files)),
        Request::Status { name } => reply(hub.status(&name)),
        Request::Info { name } => reply(hub.info(&name)),
        Request::Services => reply(hub.services()),
        Request::Nodes => reply(hub.nodes()),
        Request::Routes => reply(hub.routes_view()),
        Request::Images => reply(hub.images()),
        Request::Audit { limit } => reply(audit(hub, limit)),
        Request::EnvSet { vars } => reply(hub.env_set(who, &vars)),
        Request::EnvUnset { keys } => reply(hub.env_unset(who, &keys)),
        Request::EnvList => reply(hub.env_list()),
        Request::InfoEnv { name } => reply(hub.info_env(&name)),
        Request::SecretSet { name, value } => reply(hub.secret_set(who, &name, &value)),
        Request::SecretList => reply(hub.secret_list()),
        Request::SecretRm { name } => reply(hub.secret_rm(who, &name)),
        Request::Sources => reply(hub.git_sources()),
        Request::SourceRm { name } => reply(hub.git_source_rm(who, &name)),
        Request::Logs { .. }
        | Request::Update { .. }
        | Request::Restart { .. }
        | Request::Del { .. }
        | Request::Push { .. }
        | Request::Wait { .. }
        | Request::WaitGone { .. }
        | Request::Accept { .. }
        | Request::Forget { .. }
        | Request::ApplyTree { .. }
        | Request::GitSource(_) => {
            reply::<()>(Err(ApiError::Internal("request handled elsewhere".into())))
        }
    }
}

fn audit(hub: &Hub, limit: usize) -> Result<Vec<AuditEntry>, ApiError> {
    Ok(hub.store().read()?.audit_log(limit)?)
}

/// What an upload is, or why it is refused (it is removed then).
fn check_format(tmp: &std::path::Path, name: &str) -> Result<FileFormat, ApiError> {
    let head = std::fs::File::open(tmp)
        .and_then(|mut f| registry::probe(&mut f))
        .map_err(|e| ApiError::Internal(format!("reading the upload of {name:?}: {e}")))?;
    registry::file_format(&head).map_err(|what| {
        ApiError::Invalid(
            NotRunnable {
                file: format!("image {name:?}"),
                what,
            }
            .to_string(),
        )
    })
}

/// Services that use registry file `name` but run another version than
/// `hash`.
fn stale_services(hub: &Hub, name: &str, hash: &str) -> Result<Vec<String>, ApiError> {
    Ok(hub
        .store()
        .read()?
        .services()?
        .into_iter()
        .filter(|s| s.spec.registry_file().0 == name && s.image_hash != hash)
        .map(|s| s.spec.name)
        .collect())
}

async fn push(
    hub: &Arc<Hub>,
    stream: &mut UnixStream,
    who: &str,
    name: String,
    size: u64,
) -> Result<Pushed, ApiError> {
    let (tmp, file) = hub.registry.staging(&name)?;
    let mut file = tokio::fs::File::from_std(file);
    let copied = tokio::io::copy(&mut (&mut *stream).take(size), &mut file).await;
    let _ = file.flush().await;
    drop(file);
    match copied {
        Ok(n) if n == size => {}
        Ok(n) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(ApiError::Invalid(format!(
                "upload of {name:?} ended after {n} of {size} bytes; nothing was changed"
            )));
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(ApiError::Internal(format!(
                "upload of {name:?} failed: {e}; nothing was changed"
            )));
        }
    }
    // Checking and chunking the upload read it once more; off the async
    // threads.
    let (h, n, t) = (hub.clone(), name.clone(), tmp.clone());
    let (format, image) = tokio::task::spawn_blocking(move || {
        let format = check_format(&t, &n)?;
        Ok((format, h.registry.commit(&t, &n)?))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("indexing {name:?}: {e}")))
    .and_then(|r: Result<_, ApiError>| r)
    .inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    let chunks = hub
        .registry
        .entry(&name)
        .map_or(0, |e| e.index.chunks.len());
    let stale = {
        let (h, n, hash) = (hub.clone(), name.clone(), image.hash.clone());
        tokio::task::spawn_blocking(move || stale_services(&h, &n, &hash))
            .await
            .map_err(|e| ApiError::Internal(format!("services of {name:?}: {e}")))??
    };
    let pushed = Pushed {
        name,
        hash: image.hash,
        size: image.size,
        chunks,
        format: format.as_str().into(),
        stale_services: stale,
    };
    let audited = serde_json::to_value(&pushed).unwrap_or_default();
    hub.store()
        .write(|tx| tx.audit(who, "push", &pushed.name, None, Some(&audited)))?;
    Ok(pushed)
}

async fn logs(
    hub: &Hub,
    mut stream: UnixStream,
    name: &str,
    tail: usize,
    follow: bool,
) -> Result<(), BoxError> {
    let (id, node, mut rx) = match hub.open_logs(name, tail, follow) {
        Ok(v) => v,
        Err(e) => {
            write_frame(&mut stream, &reply::<()>(Err(e))).await?;
            return Ok(());
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    let mut probe = [0u8; 1];
    let result = loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(LogEvent::Data(data)) => write_frame(&mut wr, &Reply::Log { data }).await?,
                Some(LogEvent::End(None)) | None => break reply(Ok(())),
                // The minion could not serve it, or its link went away.
                Some(LogEvent::End(Some(message))) => {
                    break reply::<()>(Err(ApiError::Unavailable(message)));
                }
            },
            // The CLI went away (e.g. Ctrl-C on `logs -f`).
            _ = rd.read(&mut probe) => {
                hub.close_logs(id, &node);
                return Ok(());
            }
        }
    };
    hub.close_logs(id, &node);
    write_frame(&mut wr, &result).await?;
    Ok(())
}
