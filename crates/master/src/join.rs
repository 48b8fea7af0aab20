//! The public join endpoint: the only clear-text port of the cluster.
//!
//! A connection carries one bounded [`JoinRequest`] (4 KiB, 5 s to arrive).
//! At most [`MAX_READING`] connections are read at once (32 per source
//! network); past that the oldest is dropped, so connections that send
//! nothing cannot crowd out a minion, which sends its request at once.
//!
//! Then, in this order, each step cheap enough to run for a flood:
//! 1. the name and key are checked, and the token proof if there is one (a
//!    keyed BLAKE3): a wrong one is refused for good;
//! 2. the request is charged to its budget ([`budget`]): requests with the
//!    token have their own, anonymous ones are charged per source network
//!    and together. The same minion asking again from the same address
//!    (its request is waiting) is not charged;
//! 3. a name accepted with this key is answered `Accepted`; with another key,
//!    refused for good;
//! 4. with `--auto-accept`, a request with the token is accepted now;
//! 5. otherwise it joins the waiting list ([`waiting`]), in memory and capped,
//!    and the master answers `Waiting` and holds the connection (TCP
//!    keepalive finds a vanished minion; a `Waiting` every
//!    [`WAITING_EVERY`] tells the minion the master is still there) until an
//!    admin decides: `Accepted` with the overlay address, or `Refused`.
//!
//! Refusals say whether they are final ([`JoinReply::Refused`]'s
//! `permanent`): only those that asking again cannot change are. Nothing
//! secret is ever sent: the overlay address and the master's public key are
//! not secrets.

pub mod budget;
pub mod waiting;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use phoenix_model::keys::{check_token_proof, fingerprint, is_valid_public_key};
use phoenix_model::proto::{JoinReply, JoinRequest, MAX_JOIN_FRAME, read_frame, write_frame};
use phoenix_model::spec::check_hostname_label;
use phoenix_model::status::now_ms;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::hub::Hub;
use budget::{Budgets, Rates, SourceNet};
use waiting::{Decision, taken};

/// Join connections being read at once.
pub const MAX_READING: usize = 512;
/// Of those, from one source network.
const READING_PER_NET: usize = 32;
/// How long a request may take to arrive.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a held connection hears `Waiting` again.
pub const WAITING_EVERY: Duration = Duration::from_secs(20);

/// Connections being read, oldest first; a new one past the limit ends the
/// oldest (of its own network first).
#[derive(Default)]
struct ReadingSlots {
    inner: Mutex<ReadingInner>,
}

#[derive(Default)]
struct ReadingInner {
    next: u64,
    open: BTreeMap<u64, (SourceNet, oneshot::Sender<()>)>,
    per_net: HashMap<SourceNet, usize>,
}

impl ReadingInner {
    fn remove(&mut self, id: u64) {
        if let Some((net, _ends_it)) = self.open.remove(&id)
            && let Some(n) = self.per_net.get_mut(&net)
        {
            *n -= 1;
            if *n == 0 {
                self.per_net.remove(&net);
            }
        }
    }
}

/// A connection being read; `dropped` fires if a newer one took its slot.
struct Reading<'a> {
    slots: &'a ReadingSlots,
    id: u64,
    dropped: oneshot::Receiver<()>,
}

impl ReadingSlots {
    fn enter(&self, ip: IpAddr) -> Reading<'_> {
        let net = SourceNet::of(ip);
        let mut s = crate::lock(&self.inner);
        if s.per_net.get(&net).copied().unwrap_or(0) >= READING_PER_NET {
            let oldest = s
                .open
                .iter()
                .find(|(_, (n, _))| *n == net)
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                s.remove(id);
            }
        } else if s.open.len() >= MAX_READING
            && let Some(id) = s.open.keys().next().copied()
        {
            s.remove(id);
        }
        let id = s.next;
        s.next += 1;
        let (tx, dropped) = oneshot::channel();
        s.open.insert(id, (net, tx));
        *s.per_net.entry(net).or_default() += 1;
        Reading {
            slots: self,
            id,
            dropped,
        }
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        crate::lock(&self.slots.inner).remove(self.id);
    }
}

/// Refusals not logged one by one (a flood would fill the log), counted and
/// summed up at most every 10 s.
#[derive(Default)]
struct QuietRefusals {
    count: AtomicU64,
    last_report: Mutex<Option<Instant>>,
}

impl QuietRefusals {
    fn add(&self, now: Instant) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut last = crate::lock(&self.last_report);
        if last.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10)) {
            *last = Some(now);
            let n = self.count.swap(0, Ordering::Relaxed);
            tracing::warn!(
                "{n} join requests refused since the last report (over budget, waiting list full or malformed; see debug logs)"
            );
        }
    }
}

/// The endpoint's shared state.
struct Endpoint {
    hub: Arc<Hub>,
    budgets: Mutex<Budgets>,
    reading: ReadingSlots,
    quiet: QuietRefusals,
}

pub async fn serve(hub: Arc<Hub>, listener: TcpListener) {
    let endpoint = Arc::new(Endpoint {
        hub,
        budgets: Mutex::new(Budgets::new(Rates::default(), Instant::now())),
        reading: ReadingSlots::default(),
        quiet: QuietRefusals::default(),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, most likely: let some close.
                tracing::warn!("join accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move { endpoint.connection(stream, peer).await });
    }
}

/// Step 1, pure and cheap: whether a request is well-formed, and whether
/// it proves the join token (`Ok(true)`) or carries no proof (`Ok(false)`).
/// Every refusal here is final: asking again cannot change it.
pub fn check_request(req: &JoinRequest, token: &str) -> Result<bool, String> {
    check_hostname_label(&req.name).map_err(|r| format!("name: {r}"))?;
    if !is_valid_public_key(&req.key) {
        return Err("key is not a base64 WireGuard public key".into());
    }
    match &req.proof {
        Some(p) if check_token_proof(token, &req.key, p) => Ok(true),
        Some(_) => Err(
            "wrong join token proof; check the token from `phoenix master-info` and start the minion again"
                .into(),
        ),
        None => Ok(false),
    }
}

/// What the endpoint does with a request.
enum Answer {
    /// Reply and close. `loud`: worth a log line of its own.
    Reply { reply: JoinReply, loud: bool },
    /// Listed as waiting: reply `Waiting` and hold the connection.
    Hold {
        id: u64,
        decision: oneshot::Receiver<Decision>,
    },
}

fn refuse(reason: impl Into<String>, permanent: bool, loud: bool) -> Answer {
    Answer::Reply {
        reply: JoinReply::Refused {
            reason: reason.into(),
            permanent,
        },
        loud,
    }
}

impl Endpoint {
    async fn connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        let req = {
            let mut reading = self.reading.enter(peer.ip());
            tokio::select! {
                r = tokio::time::timeout(READ_TIMEOUT, read_frame::<_, JoinRequest>(&mut stream, MAX_JOIN_FRAME)) => match r {
                    Ok(Ok(Some(req))) => req,
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "join request unreadable: {e}");
                        return self.quiet.add(Instant::now());
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "no join request within {READ_TIMEOUT:?}");
                        return self.quiet.add(Instant::now());
                    }
                },
                _ = &mut reading.dropped => {
                    tracing::debug!(%peer, "join connection dropped unread: too many being read");
                    return self.quiet.add(Instant::now());
                }
            }
        };
        match self.answer(&req, peer.ip()).await {
            Answer::Reply { reply, loud } => {
                if let JoinReply::Refused { reason, permanent } = &reply {
                    if loud {
                        tracing::warn!(%peer, node = %req.name, permanent, "join request refused: {reason}");
                    } else {
                        tracing::debug!(%peer, node = %req.name, "join request refused: {reason}");
                        self.quiet.add(Instant::now());
                    }
                }
                let _ = write_frame(&mut stream, &reply).await;
            }
            Answer::Hold { id, decision } => {
                self.hold(&mut stream, peer, &req, decision).await;
                crate::lock(&self.hub.joins).closed(id, Instant::now());
            }
        }
    }

    /// Decides what to do with a request (steps 1 to 5 of the module doc).
    async fn answer(&self, req: &JoinRequest, source: IpAddr) -> Answer {
        let hub = &self.hub;
        let proven = match check_request(req, &hub.info.token) {
            Ok(proven) => proven,
            Err(reason) => return refuse(reason, true, false),
        };
        let now = Instant::now();
        let repeat = crate::lock(&hub.joins).is_repeat(&req.name, &req.key, source);
        if !repeat {
            let mut budgets = crate::lock(&self.budgets);
            let charged = if proven {
                budgets.take_proven(now)
            } else {
                budgets.take_anonymous(source, now)
            };
            if let Err(e) = charged {
                return refuse(format!("{e}; try again later"), false, false);
            }
        }
        match hub.node(&req.name) {
            Ok(Some(n)) if n.accepted && n.key == req.key => {
                return match n.overlay_ip {
                    Some(overlay_ip) => Answer::Reply {
                        reply: JoinReply::Accepted { overlay_ip },
                        loud: false,
                    },
                    None => refuse(
                        "accepted without an overlay address (store damaged?)",
                        false,
                        true,
                    ),
                };
            }
            Ok(Some(n)) if n.accepted => return refuse(taken(&req.name, &n.key), true, true),
            // A waiting row written by an older master: the list replaces it.
            Ok(_) => {}
            Err(e) => return refuse(format!("master error: {e}"), false, true),
        }
        if proven && hub.settings.auto_accept {
            return match hub.accept_request(req, true).await {
                Ok(overlay_ip) => Answer::Reply {
                    reply: JoinReply::Accepted { overlay_ip },
                    loud: false,
                },
                Err(e) => refuse(e.to_string(), false, true),
            };
        }
        let listed = crate::lock(&hub.joins).insert(req.clone(), source, proven, now_ms(), now);
        match listed {
            Ok((candidate, decision)) => {
                if !repeat {
                    tracing::info!(
                        node = %req.name, fingerprint = %fingerprint(&req.key), %source, token = proven,
                        "join request waiting"
                    );
                }
                Answer::Hold {
                    id: candidate.id,
                    decision,
                }
            }
            Err(full) => refuse(format!("{full}; try again later"), false, false),
        }
    }

    /// Holds a waiting request's connection until the decision, or until
    /// either side goes away.
    async fn hold(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        req: &JoinRequest,
        mut decision: oneshot::Receiver<Decision>,
    ) {
        keep_alive(stream);
        let mut tick = tokio::time::interval(WAITING_EVERY);
        loop {
            tokio::select! {
                d = &mut decision => {
                    let reply = match d {
                        Ok(Decision::Accepted(overlay_ip)) => JoinReply::Accepted { overlay_ip },
                        Ok(Decision::Refused { reason, permanent }) => {
                            tracing::info!(%peer, node = %req.name, permanent, "join request refused: {reason}");
                            JoinReply::Refused { reason, permanent }
                        }
                        // Replaced by a newer connection of the same minion.
                        Ok(Decision::Replaced) | Err(_) => return,
                    };
                    let _ = write_frame(stream, &reply).await;
                    return;
                }
                // The first tick is at once: the first `Waiting`.
                _ = tick.tick() => {
                    if write_frame(stream, &JoinReply::Waiting).await.is_err() {
                        return;
                    }
                }
                // The minion hung up.
                _ = stream.readable() => {
                    let mut probe = [0u8; 1];
                    match stream.try_read(&mut probe) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        _ => return,
                    }
                }
            }
        }
    }
}

/// TCP keepalive on a held connection: a minion that vanished without
/// closing is found within about a minute, and its request then expires.
fn keep_alive(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: setsockopt on a socket we own, with a pointer to an int
        // that lives for the call and its exact size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                std::ptr::from_ref(&value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    let ok = set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1) == 0
        && set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30) == 0
        && set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10) == 0
        && set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3) == 0;
    if !ok {
        tracing::debug!(
            "join connection keepalive: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot::error::TryRecvError;

    /// Whether a newer connection took this one's slot.
    fn dropped(r: &mut Reading<'_>) -> bool {
        match r.dropped.try_recv() {
            Err(TryRecvError::Closed) => true,
            Err(TryRecvError::Empty) => false,
            Ok(()) => unreachable!("nothing is ever sent"),
        }
    }

    #[test]
    fn reading_slots_drop_the_oldest_of_a_busy_network_first() {
        let slots = ReadingSlots::default();
        let busy: IpAddr = "192.0.2.1".parse().unwrap();
        let mut held: Vec<Reading<'_>> = (0..READING_PER_NET).map(|_| slots.enter(busy)).collect();
        let other = slots.enter("198.51.100.1".parse().unwrap());
        let newest = slots.enter(busy);
        // The busy network's oldest was dropped, nobody else's.
        assert!(dropped(&mut held[0]));
        assert!(!dropped(&mut held[1]));
        let mut other = other;
        assert!(!dropped(&mut other));
        drop(newest);
        drop(held);
        drop(other);
        let s = crate::lock(&slots.inner);
        assert!(s.open.is_empty() && s.per_net.is_empty());
    }

    #[test]
    fn reading_slots_past_the_total_drop_the_oldest() {
        let slots = ReadingSlots::default();
        let mut all: Vec<Reading<'_>> = (0..MAX_READING)
            .map(|i| {
                let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0001 + ((i as u32) << 8)));
                slots.enter(ip)
            })
            .collect();
        let _late = slots.enter("192.0.2.1".parse().unwrap());
        assert!(dropped(&mut all[0]));
        assert!(!dropped(&mut all[1]));
        assert_eq!(crate::lock(&slots.inner).open.len(), MAX_READING);
    }
}
