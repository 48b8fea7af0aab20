//! The minion's side of the link: join once, then hold one connection to the
//! master, reconnecting with backoff.
//!
//! Down the link come desired sets (applied and saved to disk) and log
//! requests; up go service states (coalesced: everything that changed since
//! the last frame goes in one), node stats every few seconds, and log data.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use phoenix_model::proto::{
    DesiredSet, JoinReply, JoinRequest, MAX_FRAME, MAX_JOIN_FRAME, ToMaster, ToMinion, read_frame,
    write_frame,
};
use phoenix_model::status::{NodeStats, ServiceStatus};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use phoenix_model::framed::{self, LinkDrop, LinkTiming, SendError};

use crate::backoff::Backoff;
use crate::logs::LogCmd;
use crate::mesh::MeshSender;
use crate::supervisor::{Ctx, Report, Supervisor};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the master at {addr} refused the join request: {reason}")]
    JoinRefused { addr: SocketAddr, reason: String },
    #[error(
        "the master at {addr} answers with key {got}, not {expected} given on the command line"
    )]
    WrongMaster {
        addr: SocketAddr,
        expected: String,
        got: String,
    },
    #[error("master {addr}: {detail}")]
    Connection { addr: SocketAddr, detail: String },
}

/// Who this minion is and where its master is.
#[derive(Clone, Debug)]
pub struct Identity {
    pub name: String,
    pub key: String,
    pub master_key: String,
    pub public_ip: IpAddr,
    pub private_ip: IpAddr,
    pub wg_port: u16,
    /// The join token, if the minion was given one.
    pub token: Option<String>,
    pub join_addr: SocketAddr,
    /// The master's link: on the overlay, or its public IP without one.
    pub link_addr: SocketAddr,
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The first wait before asking to join again, and the longest.
const JOIN_RETRY_FIRST: Duration = Duration::from_millis(500);
const JOIN_RETRY_MAX: Duration = Duration::from_secs(30);
/// The first wait before dialling the link again, and the longest.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// A held join connection on which the master has said nothing for this
/// long is given up and asked again (it sends `Waiting` every 20 s).
const JOIN_SILENCE: Duration = Duration::from_secs(65);

/// Asks to join and waits for the decision on the same connection (the
/// master holds it open). Never gives up on its own: a dropped connection,
/// an unreachable master or a refusal that may pass (rate limits, a full
/// waiting list, a master error) is retried with capped, jittered backoff.
/// Only a refusal the master marks final ends it: a malformed request, a
/// wrong join token, an admin's rejection, or the name accepted with
/// another key. Returns our overlay address once accepted.
pub async fn join(id: &Identity) -> Result<Ipv6Addr, LinkError> {
    let fingerprint = phoenix_model::keys::fingerprint(&id.key);
    let mut backoff = Backoff::new(JOIN_RETRY_FIRST, 2, JOIN_RETRY_MAX).with_jitter();
    let mut told_waiting = false;
    loop {
        let mut waited = false;
        let result = join_once(id, &mut waited, &fingerprint, &mut told_waiting).await;
        // A connection that got as far as waiting was a good one: the next
        // try starts over from the shortest wait.
        if waited {
            backoff.reset();
        }
        let pause = backoff.next_wait();
        match result {
            Ok(Some(ip)) => return Ok(ip),
            Ok(None) => tracing::info!(
                "join connection closed before a decision; asking again in {} ms",
                pause.as_millis()
            ),
            Err(e @ LinkError::JoinRefused { .. }) => return Err(e),
            Err(e) => tracing::warn!("join: {e}; asking again in {} ms", pause.as_millis()),
        }
        tokio::time::sleep(pause).await;
    }
}

/// One join connection: `Ok(None)` if it ended before a decision,
/// `Err(JoinRefused)` only for a final refusal. Sets `waited` once the
/// master has listed the request.
async fn join_once(
    id: &Identity,
    waited: &mut bool,
    fingerprint: &str,
    told_waiting: &mut bool,
) -> Result<Option<Ipv6Addr>, LinkError> {
    let err = |e: &dyn std::fmt::Display| LinkError::Connection {
        addr: id.join_addr,
        detail: e.to_string(),
    };
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(id.join_addr))
        .await
        .map_err(|e| err(&e))?
        .map_err(|e| err(&e))?;
    let req = JoinRequest {
        name: id.name.clone(),
        key: id.key.clone(),
        public_ip: id.public_ip,
        private_ip: id.private_ip,
        wg_port: id.wg_port,
        version: VERSION.into(),
        proof: id
            .token
            .as_deref()
            .map(|t| phoenix_model::keys::token_proof(t, &id.key)),
    };
    write_frame(&mut s, &req).await.map_err(|e| err(&e))?;
    loop {
        let frame = tokio::time::timeout(
            JOIN_SILENCE,
            read_frame::<_, JoinReply>(&mut s, MAX_JOIN_FRAME),
        )
        .await
        .map_err(|_| err(&format!("the master said nothing for {JOIN_SILENCE:?}")))?
        .map_err(|e| err(&e))?;
        match frame {
            Some(JoinReply::Waiting) => {
                *waited = true;
                if !*told_waiting {
                    *told_waiting = true;
                    tracing::info!(
                        master = %id.join_addr, %fingerprint,
                        "join request sent; waiting for `phoenix accept {}` on the master (compare this key fingerprint with `phoenix waiting`)",
                        id.name
                    );
                }
            }
            Some(JoinReply::Accepted { overlay_ip }) => {
                tracing::info!(%overlay_ip, "accepted into the cluster");
                return Ok(Some(overlay_ip));
            }
            Some(JoinReply::Refused {
                reason,
                permanent: true,
            }) => {
                return Err(LinkError::JoinRefused {
                    addr: id.join_addr,
                    reason,
                });
            }
            Some(JoinReply::Refused {
                reason,
                permanent: false,
            }) => return Err(err(&format!("join request refused for now: {reason}"))),
            None => return Ok(None),
        }
    }
}

/// Runs the link forever; returns only on an error that retrying cannot fix.
pub async fn run(
    id: Identity,
    ctx: Arc<Ctx>,
    mut sup: Supervisor,
    mut desired: Desired,
    mut reports: mpsc::UnboundedReceiver<Report>,
    stats_every: Duration,
) -> Result<(), LinkError> {
    let mut latest: HashMap<String, ServiceStatus> = HashMap::new();
    let mut backoff = Backoff::new(RECONNECT_FIRST, 2, RECONNECT_MAX);
    loop {
        let ended = session(
            &id,
            &ctx,
            &mut sup,
            &mut desired,
            &mut reports,
            &mut latest,
            stats_every,
            &mut backoff,
        )
        .await;
        let delay = backoff.next_wait();
        match ended {
            Ok(()) => {}
            Err(e @ LinkError::WrongMaster { .. }) => return Err(e),
            Err(e) => tracing::warn!("link: {e}; reconnecting in {} ms", delay.as_millis()),
        }
        let _ = ctx.log_cmds.send(LogCmd::CancelAll);
        // Keep absorbing reports while disconnected, so the next session
        // starts with the latest state of every service.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                r = reports.recv() => match r {
                    Some(r) => absorb(&mut latest, &r),
                    None => return Ok(()),
                },
            }
        }
    }
}

/// Keeps `latest` up to date with a report.
fn absorb(latest: &mut HashMap<String, ServiceStatus>, r: &Report) {
    match r {
        Report::Status(s) => {
            latest.insert(s.key().to_owned(), s.clone());
        }
        Report::Gone(n) => {
            latest.remove(n);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    id: &Identity,
    ctx: &Arc<Ctx>,
    sup: &mut Supervisor,
    desired: &mut Desired,
    reports: &mut mpsc::UnboundedReceiver<Report>,
    latest: &mut HashMap<String, ServiceStatus>,
    stats_every: Duration,
    backoff: &mut Backoff,
) -> Result<(), LinkError> {
    let addr = id.link_addr;
    let err = |e: &dyn std::fmt::Display| LinkError::Connection {
        addr,
        detail: e.to_string(),
    };
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|e| err(&e))?
        .map_err(|e| err(&e))?;
    let _ = s.set_nodelay(true);
    let hello = ToMaster::Hello {
        name: id.name.clone(),
        key: id.key.clone(),
        version: VERSION.into(),
        revision: desired.revision,
        host_network: ctx.nets.mode() == crate::hooks::net::NetMode::Host,
        routing_free: true,
    };
    write_frame(&mut s, &hello).await.map_err(|e| err(&e))?;
    // The master holds this answer back until the node is accepted.
    let heartbeat = match read_frame::<_, ToMinion>(&mut s, MAX_FRAME)
        .await
        .map_err(|e| err(&e))?
    {
        Some(ToMinion::Welcome {
            master_key,
            heartbeat_ms,
        }) if master_key == id.master_key => Duration::from_millis(heartbeat_ms.max(50)),
        Some(ToMinion::Welcome { master_key, .. }) => {
            return Err(LinkError::WrongMaster {
                addr,
                expected: id.master_key.clone(),
                got: master_key,
            });
        }
        Some(ToMinion::Refused { reason }) => return Err(err(&format!("refused: {reason}"))),
        other => return Err(err(&format!("unexpected answer {other:?}"))),
    };
    tracing::info!(master = %addr, "connected to the master");
    // Welcomed: a later drop reconnects from the shortest wait.
    backoff.reset();

    // The master heartbeats as often as we do; three missed means it is gone.
    let timing = LinkTiming {
        heartbeat,
        silence: heartbeat * 3,
    };
    let (rd, wr) = s.into_split();
    let (link, mut frames) =
        framed::spawn::<ToMinion, _, _, _>(rd, wr, &ToMaster::Heartbeat, timing, MAX_FRAME)
            .map_err(|e| err(&e))?;
    // Log streams and request handlers queue their messages here; they go
    // onto the link from the loop below.
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ToMaster>();
    let _ = out_tx.send(ToMaster::Node(node_stats(ctx)));
    let mut sync = ctx.images.sync_state();
    let _ = out_tx.send(ToMaster::Images(sync.borrow_and_update().clone()));
    let _ = out_tx.send(ToMaster::Status {
        services: latest.values().cloned().collect(),
        full: true,
    });
    let mut stats = tokio::time::interval(stats_every);
    stats.tick().await;
    let mut fresh = true;
    loop {
        tokio::select! {
            msg = frames.recv() => match msg {
                Ok(msg) => handle(ctx, sup, desired, &mut fresh, msg, &out_tx).await,
                Err(LinkDrop::PeerClosed) => return Err(err(&"the master closed the connection")),
                Err(LinkDrop::Silent(d)) => {
                    return Err(err(&format!("no heartbeat from the master for {} ms", d.as_millis())));
                }
                Err(drop) => return Err(err(&drop)),
            },
            Some(msg) = out_rx.recv() => match link.send(&msg) {
                Ok(()) => {}
                // Too large for a frame: said here, and the link goes on.
                Err(SendError::Encode(e)) => tracing::error!("not sent to the master: {e}"),
                // The link ended: `frames` says why.
                Err(SendError::Closed) => {}
            },
            r = reports.recv() => {
                let Some(r) = r else { return Ok(()) };
                // Coalesce: send everything already queued in one frame.
                let mut changed = Vec::new();
                let mut gone = Vec::new();
                let mut next = Some(r);
                while let Some(r) = next {
                    absorb(latest, &r);
                    match r {
                        Report::Status(s) => {
                            changed.retain(|c: &ServiceStatus| c.key() != s.key());
                            changed.push(s);
                        }
                        Report::Gone(n) => {
                            changed.retain(|c: &ServiceStatus| c.key() != n);
                            gone.push(n);
                        }
                    }
                    next = reports.try_recv().ok();
                }
                if !changed.is_empty() {
                    let _ = out_tx.send(ToMaster::Status { services: changed, full: false });
                }
                if !gone.is_empty() {
                    let _ = out_tx.send(ToMaster::Gone { names: gone });
                }
            }
            changed = sync.changed() => {
                if changed.is_ok() {
                    let state = sync.borrow_and_update().clone();
                    // A fetch ended: the bytes it moved show at once.
                    let ended = state.fetching.is_none();
                    let _ = out_tx.send(ToMaster::Images(state));
                    if ended {
                        let _ = out_tx.send(ToMaster::Node(node_stats(ctx)));
                    }
                }
            }
            _ = stats.tick() => {
                let _ = out_tx.send(ToMaster::Node(node_stats(ctx)));
            }
        }
    }
}

async fn handle(
    ctx: &Arc<Ctx>,
    sup: &mut Supervisor,
    desired: &mut Desired,
    fresh: &mut bool,
    msg: ToMinion,
    out: &mpsc::UnboundedSender<ToMaster>,
) {
    match msg {
        // The master sends sets in revision order; a lower revision than
        // the one applied on this connection would be stale, so it is
        // dropped. (A new connection takes whatever comes first: the
        // master's store is the authority, even if it was restored.)
        ToMinion::Desired(set) if *fresh || set.revision >= desired.revision => {
            *fresh = false;
            apply(ctx, sup, desired, set);
        }
        ToMinion::Desired(set) => {
            tracing::warn!(
                stale = set.revision,
                applied = desired.revision,
                "dropped an out-of-order desired set"
            );
        }
        ToMinion::Logs {
            stream,
            service,
            tail,
            follow,
        } => {
            // What the service wrote before now (a oneshot's last words a
            // moment ago) is moved from its pipe into the file first.
            let (done, flushed) = tokio::sync::oneshot::channel();
            let _ = ctx.log_cmds.send(LogCmd::Flush {
                name: service.clone(),
                done,
            });
            let _ = flushed.await;
            let files = ctx.logs.clone();
            let name = service.clone();
            let tailed = tokio::task::spawn_blocking(move || files.tail(&name, tail)).await;
            match tailed {
                Ok(Ok((text, len))) => {
                    if !text.is_empty() {
                        let _ = out.send(ToMaster::LogData { stream, data: text });
                    }
                    if follow {
                        let _ = ctx.log_cmds.send(LogCmd::Follow {
                            stream,
                            name: service,
                            offset: len,
                            out: out.clone(),
                        });
                    } else {
                        let _ = out.send(ToMaster::LogEnd {
                            stream,
                            error: None,
                        });
                    }
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    let error =
                        (!follow).then(|| format!("{service:?} has not written any output yet"));
                    if follow {
                        let _ = ctx.log_cmds.send(LogCmd::Follow {
                            stream,
                            name: service,
                            offset: 0,
                            out: out.clone(),
                        });
                    } else {
                        let _ = out.send(ToMaster::LogEnd { stream, error });
                    }
                }
                Ok(Err(e)) => {
                    let _ = out.send(ToMaster::LogEnd {
                        stream,
                        error: Some(format!("reading the log of {service:?}: {e}")),
                    });
                }
                Err(e) => {
                    let _ = out.send(ToMaster::LogEnd {
                        stream,
                        error: Some(e.to_string()),
                    });
                }
            }
        }
        ToMinion::LogsCancel { stream } => {
            let _ = ctx.log_cmds.send(LogCmd::Cancel(stream));
        }
        ToMinion::Heartbeat => {}
        ToMinion::Catalog { images } => ctx.images.set_catalog(images),
        other => tracing::warn!("unexpected message from the master: {other:?}"),
    }
}

/// What the minion has applied of its desired sets.
pub struct Desired {
    /// The revision of the set applied last.
    pub revision: u64,
    /// Where each set's mesh peers go ([`crate::mesh::keep`] applies them
    /// to the overlay, in a task of its own).
    pub mesh: MeshSender,
}

/// Has a desired set saved to disk (so it survives a restart cut off from
/// the master; the writer thread does the I/O) and converges on it: its
/// services, and its mesh of direct peers.
pub fn apply(ctx: &Ctx, sup: &mut Supervisor, desired: &mut Desired, set: DesiredSet) {
    let _ = ctx.desired_writer.send(set.clone());
    tracing::info!(
        revision = set.revision,
        services = set.services.len(),
        peers = set.peers.len(),
        "desired set"
    );
    desired.revision = set.revision;
    crate::mesh::offer(&desired.mesh, &set.peers);
    ctx.images.set_wanted(
        set.services
            .iter()
            .map(|a| (a.image_hash.clone(), a.spec.registry_file().0))
            .collect(),
    );
    sup.apply(&set);
}

/// Load, memory and disk of this node.
pub fn node_stats(ctx: &Ctx) -> NodeStats {
    let data_dir = &ctx.state.dir;
    let mut s = NodeStats {
        minion_rss: crate::process::self_rss(),
        image_bytes_fetched: ctx.images.fetched_bytes(),
        vm_accel: ctx
            .drivers
            .named(crate::driver::DriverName::Vm)
            .accelerator()
            .map(str::to_owned),
        ..NodeStats::default()
    };
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        let mut f = l
            .split_whitespace()
            .map(|x| x.parse::<f64>().unwrap_or(0.0));
        s.load1 = f.next().unwrap_or(0.0);
        s.load5 = f.next().unwrap_or(0.0);
        s.load15 = f.next().unwrap_or(0.0);
    }
    if let Ok(m) = std::fs::read_to_string("/proc/meminfo") {
        for line in m.lines() {
            let mut f = line.split_whitespace();
            let (Some(k), Some(v)) = (f.next(), f.next().and_then(|v| v.parse::<u64>().ok()))
            else {
                continue;
            };
            match k {
                "MemTotal:" => s.mem_total = v * 1024,
                "MemAvailable:" => s.mem_available = v * 1024,
                _ => {}
            }
        }
    }
    if let Ok(space) = phoenix_host::Host::disk_space(&phoenix_host::Linux, data_dir) {
        s.disk_total = space.total;
        s.disk_available = space.free;
    }
    s
}

#[cfg(test)]
mod join_tests {
    use super::*;
    use tokio::net::TcpListener;

    fn identity(join_addr: SocketAddr) -> Identity {
        Identity {
            name: "m1".into(),
            key: "key".into(),
            master_key: "master".into(),
            public_ip: "127.0.0.1".parse().unwrap(),
            private_ip: "127.0.0.1".parse().unwrap(),
            wg_port: 51820,
            token: None,
            join_addr,
            link_addr: join_addr,
        }
    }

    /// A master that answers each join connection with the next reply.
    async fn master(replies: Vec<JoinReply>) -> (SocketAddr, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let mut asked = 0;
            for reply in replies {
                let (mut s, _) = listener.accept().await.unwrap();
                let _: Option<JoinRequest> = read_frame(&mut s, MAX_JOIN_FRAME).await.unwrap();
                asked += 1;
                write_frame(&mut s, &reply).await.unwrap();
            }
            asked
        });
        (addr, served)
    }

    #[tokio::test]
    async fn a_refusal_that_may_pass_is_asked_again_until_accepted() {
        let overlay_ip: Ipv6Addr = "fd38:dde8:32dd::2".parse().unwrap();
        let busy = JoinReply::Refused {
            reason: "too many join requests without the join token".into(),
            permanent: false,
        };
        let (addr, served) =
            master(vec![busy.clone(), busy, JoinReply::Accepted { overlay_ip }]).await;
        let joined = tokio::time::timeout(Duration::from_secs(10), join(&identity(addr)))
            .await
            .expect("joined within the backoff");
        assert_eq!(joined.unwrap(), overlay_ip);
        assert_eq!(served.await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_final_refusal_ends_joining_with_its_reason() {
        let (addr, served) = master(vec![JoinReply::Refused {
            reason: "an admin rejected the join request".into(),
            permanent: true,
        }])
        .await;
        let err = tokio::time::timeout(Duration::from_secs(5), join(&identity(addr)))
            .await
            .expect("ended at once")
            .unwrap_err();
        assert!(matches!(err, LinkError::JoinRefused { .. }), "{err}");
        assert!(err.to_string().contains("an admin rejected"), "{err}");
        assert_eq!(served.await.unwrap(), 1);
    }
}
