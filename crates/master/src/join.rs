//! The public join endpoint: the only clear-text port of the cluster.
//!
//! A connection carries one bounded [`JoinRequest`] (4 KiB, 5 s to arrive).
//! Requests are rate-limited per source address and overall. The master
//! answers `Waiting` and keeps the connection open (up to ten minutes, and at
//! most [`MAX_HELD`] at once) so it can send `Accepted` with the minion's
//! overlay address the moment an admin accepts, or `Refused` when the request
//! is rejected. Nothing secret is ever sent: the overlay address and the
//! master's public key are not secrets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phoenix_model::keys::{check_token_proof, fingerprint, is_valid_public_key};
use phoenix_model::proto::{JoinReply, JoinRequest, MAX_JOIN_FRAME, read_frame, write_frame};
use phoenix_model::spec::check_hostname_label;
use phoenix_model::status::now_ms;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::hub::Hub;
use crate::store::Node;

/// Join connections held open waiting for a decision.
pub const MAX_HELD: usize = 256;
/// How long a held connection waits before the minion must ask again.
const HOLD: Duration = Duration::from_secs(600);

/// A token bucket: `burst` requests at once, then one per `every`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Rate limits: per source address, and for the endpoint as a whole.
pub struct RateLimit {
    per_ip: Mutex<HashMap<IpAddr, Bucket>>,
    global: Mutex<Bucket>,
    burst: f64,
    every: Duration,
    global_burst: f64,
    global_every: Duration,
}

impl RateLimit {
    pub fn new(burst: u32, every: Duration, global_burst: u32, global_every: Duration) -> Self {
        RateLimit {
            per_ip: Mutex::default(),
            global: Mutex::new(Bucket {
                tokens: f64::from(global_burst),
                at: Instant::now(),
            }),
            burst: f64::from(burst),
            every,
            global_burst: f64::from(global_burst),
            global_every,
        }
    }

    fn take(b: &mut Bucket, burst: f64, every: Duration, now: Instant) -> bool {
        let refill = now.duration_since(b.at).as_secs_f64() / every.as_secs_f64();
        b.tokens = (b.tokens + refill).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a request from `ip` may go ahead now.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut per_ip = crate::lock(&self.per_ip);
        if per_ip.len() > 10_000 {
            // Forget sources that have refilled completely.
            let full = self.every.mul_f64(self.burst);
            per_ip.retain(|_, b| now.duration_since(b.at) < full);
        }
        let b = per_ip.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        if !Self::take(b, self.burst, self.every, now) {
            return false;
        }
        let mut g = crate::lock(&self.global);
        Self::take(&mut g, self.global_burst, self.global_every, now)
    }
}

pub async fn serve(hub: Arc<Hub>, listener: TcpListener) {
    // 10 requests at once per address, then one every 6 s; 100 at once
    // overall, then 2 a second.
    let limit = Arc::new(RateLimit::new(
        10,
        Duration::from_secs(6),
        100,
        Duration::from_millis(500),
    ));
    let held = Arc::new(Semaphore::new(MAX_HELD));
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
        let limit = limit.clone();
        let held = held.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            if !limit.allow(peer.ip(), Instant::now()) {
                tracing::warn!(%peer, "join request refused: rate limited");
                let reply = JoinReply::Refused {
                    reason: "too many join requests; try again in a minute".into(),
                };
                let _ = write_frame(&mut stream, &reply).await;
                return;
            }
            if let Err(e) = handle(&hub, stream, &held).await {
                tracing::warn!(%peer, "join request refused: {e}");
            }
        });
    }
}

async fn handle(hub: &Hub, mut stream: TcpStream, held: &Semaphore) -> Result<(), String> {
    let req: JoinRequest = tokio::time::timeout(
        Duration::from_secs(5),
        read_frame(&mut stream, MAX_JOIN_FRAME),
    )
    .await
    .map_err(|_| "no request within 5 s".to_owned())?
    .map_err(|e| e.to_string())?
    .ok_or("connection closed before a request")?;
    let mut reply = decide(hub, &req);
    if let JoinReply::Waiting = reply
        && hub.settings.auto_accept
        && req.proof.is_some()
    {
        // decide() refused a wrong proof already: this one is right.
        reply = match hub.accept("auto-accept (join token)", &req.name) {
            Ok(node) => match hub.admit(&node).await {
                Ok(_) => accepted(&node),
                Err(e) => JoinReply::Refused {
                    reason: e.to_string(),
                },
            },
            Err(e) => JoinReply::Refused {
                reason: e.to_string(),
            },
        };
    }
    write_frame(&mut stream, &reply)
        .await
        .map_err(|e| e.to_string())?;
    match reply {
        JoinReply::Refused { reason } => return Err(format!("{:?}: {reason}", req.name)),
        JoinReply::Accepted { .. } => return Ok(()),
        JoinReply::Waiting => {}
    }
    // Hold the connection until an admin decides.
    let Ok(_permit) = held.try_acquire() else {
        return Ok(());
    };
    let mut membership = hub.membership();
    let deadline = tokio::time::Instant::now() + HOLD;
    loop {
        let outcome = match hub.node(&req.name) {
            Ok(Some(n)) if n.accepted && n.key == req.key => Some(accepted(&n)),
            Ok(Some(n)) if n.key == req.key => None,
            Ok(_) => Some(JoinReply::Refused {
                reason: "the join request was rejected".into(),
            }),
            Err(e) => return Err(e.to_string()),
        };
        if let Some(reply) = outcome {
            let _ = write_frame(&mut stream, &reply).await;
            return Ok(());
        }
        tokio::select! {
            changed = membership.changed() => if changed.is_err() { return Ok(()) },
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            // The minion hung up.
            _ = stream.readable() => {
                let mut probe = [0u8; 1];
                match stream.try_read(&mut probe) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    _ => return Ok(()),
                }
            }
        }
    }
}

fn accepted(n: &Node) -> JoinReply {
    match n.overlay_ip {
        Some(overlay_ip) => JoinReply::Accepted { overlay_ip },
        None => JoinReply::Refused {
            reason: "accepted without an overlay address (store damaged?)".into(),
        },
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
    let proved = match &req.proof {
        Some(p) if check_token_proof(&hub.info.token, &req.key, p) => true,
        Some(_) => {
            return refuse(
                "wrong join token proof; check the token from `phoenix master-info`".into(),
            );
        }
        None => false,
    };
    let result = hub.store().write(|tx| -> Result<JoinReply, crate::store::StoreError> {
        Ok(match tx.node(&req.name)? {
            Some(n) if n.key != req.key => refuse(format!(
                "name {:?} is taken by a node with another key ({})",
                req.name,
                fingerprint(&n.key)
            )),
            Some(n) if n.accepted => accepted(&n),
            Some(_) => JoinReply::Waiting,
            None => {
                tx.insert_waiting(&Node {
                    name: req.name.clone(),
                    key: req.key.clone(),
                    accepted: false,
                    public_ip: req.public_ip,
                    private_ip: req.private_ip,
                    overlay_ip: None,
                    wg_port: req.wg_port,
                    token_proof: proved,
                    version: req.version.clone(),
                    requested_at: now_ms(),
                    accepted_at: None,
                    revision: 0,
                })?;
                tracing::info!(node = %req.name, fingerprint = %fingerprint(&req.key), token = proved, "join request waiting");
                JoinReply::Waiting
            }
        })
    });
    result.unwrap_or_else(|e| refuse(format!("master error: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_per_address_and_overall() {
        let l = RateLimit::new(3, Duration::from_secs(6), 5, Duration::from_secs(1));
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a, t)));
        assert!(!l.allow(a, t), "a fourth at once from one address");
        assert!(l.allow(b, t) && l.allow(b, t));
        assert!(!l.allow(b, t), "the global bucket of 5 is empty");
        // 6 s later each address has one more, and the global bucket refilled.
        let later = t + Duration::from_secs(6);
        assert!(l.allow(a, later));
        assert!(!l.allow(a, later));
    }
}
