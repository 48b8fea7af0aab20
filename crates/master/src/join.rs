//! The public join endpoint: the only clear-text port of the cluster.
//!
//! It reads one bounded [`JoinRequest`] and records it as waiting; it never
//! sends anything but a [`JoinReply`], and nothing secret.

use std::sync::Arc;
use std::time::Duration;

use phoenix_model::proto::{JoinReply, JoinRequest, MAX_JOIN_FRAME, read_frame, write_frame};
use phoenix_model::spec::check_hostname_label;
use phoenix_model::status::now_ms;
use tokio::net::{TcpListener, TcpStream};

use crate::hub::Hub;
use crate::store::Node;
use phoenix_model::keys::{fingerprint, is_valid_public_key};

pub async fn serve(hub: Arc<Hub>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("join accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(5), handle(&hub, stream)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%peer, "join request refused: {e}"),
                Err(_) => tracing::warn!(%peer, "join request timed out"),
            }
        });
    }
}

async fn handle(hub: &Hub, mut stream: TcpStream) -> Result<(), String> {
    let req: JoinRequest = read_frame(&mut stream, MAX_JOIN_FRAME)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("connection closed before a request")?;
    let reply = decide(hub, &req);
    let _ = write_frame(&mut stream, &reply).await;
    match reply {
        JoinReply::Refused { reason } => Err(format!("{:?}: {reason}", req.name)),
        _ => Ok(()),
    }
}

fn decide(hub: &Hub, req: &JoinRequest) -> JoinReply {
    let refuse = |reason: String| JoinReply::Refused { reason };
    if let Err(r) = check_hostname_label(&req.name) {
        return refuse(format!("name: {r}"));
    }
    if !is_valid_public_key(&req.key) {
        return refuse("key is not a base64 WireGuard public key".into());
    }
    let result = hub.store().write(|tx| -> Result<JoinReply, crate::store::StoreError> {
        Ok(match tx.node(&req.name)? {
            Some(n) if n.key != req.key => refuse(format!(
                "name {:?} is taken by a node with another key ({})",
                req.name,
                fingerprint(&n.key)
            )),
            Some(n) if n.accepted => JoinReply::Accepted,
            Some(_) => JoinReply::Waiting,
            None => {
                tx.insert_waiting(&Node {
                    name: req.name.clone(),
                    key: req.key.clone(),
                    accepted: false,
                    public_ip: req.public_ip,
                    private_ip: req.private_ip,
                    overlay_ip: None,
                    version: req.version.clone(),
                    requested_at: now_ms(),
                    accepted_at: None,
                    revision: 0,
                })?;
                tracing::info!(node = %req.name, fingerprint = %fingerprint(&req.key), "join request waiting");
                JoinReply::Waiting
            }
        })
    });
    result.unwrap_or_else(|e| refuse(format!("master error: {e}")))
}
