//! Listeners and client connections: accepting within the connection
//! limits, TLS handshakes, the HTTP/1 + HTTP/2 server, the idle timer and
//! graceful shutdown.
//!
//! Every connection is a task of its own and owns only its socket, its
//! hyper state and a few counters, so a client that stalls stalls nothing
//! but itself. The time limits:
//!
//! - TLS handshake: `header_read_timeout`.
//! - A request head: `header_read_timeout`, which also runs while an
//!   HTTP/1 keep-alive connection waits for its next request (so such a
//!   connection idles out after the shorter of it and `idle_timeout`); a
//!   head over `max_header_bytes` gets 431, garbage 400, and the
//!   connection closes. This is the idle timer below, not hyper's header
//!   timer, which cost a timer (a box and a timer wheel entry) a request.
//! - No request yet: a connection whose first request has not arrived
//!   within `header_read_timeout` is closed (this also covers HTTP/2
//!   clients that connect and never send a stream). [`Shards`](crate::Shards)
//!   listeners also defer the accept (`TCP_DEFER_ACCEPT`) until the first
//!   bytes are in, for about `header_read_timeout` (the kernel counts it
//!   in SYN-ACK retransmissions, so up to about half again): a client that
//!   sends nothing costs the kernel a pending connection and the proxy
//!   nothing for that long, and is then accepted and timed as above.
//! - Idle: with no request in flight for `idle_timeout`, the connection is
//!   shut down gracefully (HTTP/2 gets a GOAWAY), and dropped 1 s later if
//!   it has not closed by then.
//!
//! The idle timer sleeps until the moment the connection could become due
//! and re-arms from the last request's start or end: no polling, at most
//! one wake per idle period. Requests never wake it: a request's end only
//! moves the due time later, which the timer finds when it fires. (It used
//! to be woken by every request's end; as the wake came from inside the
//! connection's own task, tokio re-queued that task and woke a second
//! worker thread to steal it, a futex and a context switch per request.)

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::Inner;
use crate::phase::Phase;

/// Connection limits: overall (a semaphore the accept loops wait on) and
/// per client IP (a count; over it, the connection is closed at once);
/// and requests in flight per client IP (over it, 429).
#[derive(Debug)]
pub(crate) struct Limits {
    pub global: Arc<Semaphore>,
    open: AtomicU64,
    per_ip: Mutex<HashMap<IpAddr, Arc<Client>>>,
    max_per_ip: usize,
    max_requests_per_ip: usize,
}

/// What one client (see [`client_key`]) holds: connections (changed under
/// the map's lock) and requests in flight (changed by each request without
/// it, an atomic add and subtract).
#[derive(Debug, Default)]
struct Client {
    conns: AtomicUsize,
    requests: AtomicUsize,
}

impl Limits {
    pub fn new(max: usize, max_per_ip: usize, max_requests_per_ip: usize) -> Self {
        Limits {
            global: Arc::new(Semaphore::new(max.max(1))),
            open: AtomicU64::new(0),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: max_per_ip.max(1),
            max_requests_per_ip: max_requests_per_ip.max(1),
        }
    }

    /// Client connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    fn admit(self: &Arc<Self>, ip: IpAddr, permit: OwnedSemaphorePermit) -> Option<Slot> {
        let ip = client_key(ip);
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let client = per_ip.entry(ip).or_default();
        if client.conns.load(Ordering::Relaxed) >= self.max_per_ip {
            return None;
        }
        client.conns.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            limits: self.clone(),
            client: client.clone(),
            ip,
            _permit: permit,
        })
    }
}

/// Whom a client address counts as for `max_connections_per_ip`: an IPv4
/// address itself, an IPv6 address its /64, which one host (or one home
/// or VPS) is given whole and can pick any address in.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from_bits(
            v6.to_bits() & !u128::from(u64::MAX),
        )),
    }
}

/// One admitted client connection's place in the limits.
#[derive(Debug)]
struct Slot {
    limits: Arc<Limits>,
    client: Arc<Client>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = self.limits.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if self.client.conns.fetch_sub(1, Ordering::Relaxed) == 1 {
            per_ip.remove(&self.ip);
        }
    }
}

/// Counts the proxy's connection and tunnel tasks, so that shutdown can
/// wait for them.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    count: AtomicUsize,
    done: Notify,
}

#[derive(Debug)]
pub(crate) struct Tracked(Arc<Tracker>);

impl Tracker {
    fn track(self: &Arc<Self>) -> Tracked {
        self.count.fetch_add(1, Ordering::SeqCst);
        Tracked(self.clone())
    }

    async fn wait(&self) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.done.notify_waiters();
        }
    }
}

/// One client connection, shared by its requests and any tunnel made from
/// it: who the client is, and the requests in flight for the idle timer.
/// The connection's limit slot is released when the last holder (the
/// connection task, a WebSocket tunnel) lets go.
#[derive(Debug)]
pub(crate) struct Conn {
    pub peer: SocketAddr,
    /// The peer's IP address as an `X-Forwarded-For` value.
    pub peer_ip: http::HeaderValue,
    pub tls: bool,
    inflight: AtomicUsize,
    requested: AtomicBool,
    /// Milliseconds after `start` of the last request's start or end.
    last: AtomicU64,
    start: Instant,
    slot: Slot,
    _tracked: Tracked,
}

/// One request in flight on a client connection (and for its client).
#[derive(Debug)]
pub struct Active(Arc<Conn>);

impl Active {
    /// Whether the client has more requests in flight than
    /// `max_requests_per_ip`, this one included: it is then answered 429.
    /// (HTTP/2 multiplies a client's connections by its streams; the
    /// requests, each holding a connection to an instance, are what one
    /// client could otherwise take from the others.)
    pub fn over_limit(&self) -> bool {
        let slot = &self.0.slot;
        slot.client.requests.load(Ordering::Relaxed) > slot.limits.max_requests_per_ip
    }
}

impl Conn {
    pub fn begin(self: &Arc<Self>) -> Active {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        self.slot.client.requests.fetch_add(1, Ordering::Relaxed);
        self.requested.store(true, Ordering::Relaxed);
        self.touch();
        Active(self.clone())
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    /// Whether the connection has had no request in flight for `idle`
    /// (or, before its first request, for `first`) at `now`: `Ok` if so,
    /// else when to look again (at the latest an idle period from now, as
    /// a request may start and end before then).
    fn idled(&self, now: Instant, first: Duration, idle: Duration) -> Result<(), Instant> {
        let (due, wake) = if self.inflight.load(Ordering::SeqCst) > 0 {
            (None, now + idle)
        } else if self.requested.load(Ordering::Relaxed) {
            let due = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle;
            (Some(due), due)
        } else {
            let due = self.start + first;
            (Some(due), due.min(now + idle))
        };
        match due {
            Some(due) if now >= due => Ok(()),
            _ => Err(wake),
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.touch();
        self.0.slot.client.requests.fetch_sub(1, Ordering::Relaxed);
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The accept loop of one listener; returns after shutdown, once its
/// connections are done.
pub(crate) async fn serve(inner: Arc<Inner>, listener: TcpListener, tls: bool) {
    // Closes idle connections to instances past their idle timeout.
    let mut sweep = tokio::time::interval(
        (inner.config.backend_pool_idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5)),
    );
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let permit = tokio::select! {
            permit = inner.limits.global.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = inner.phase.reached(Phase::Draining) => break,
        };
        let (stream, peer) = tokio::select! {
            _ = sweep.tick() => {
                inner.sweep_pools();
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or memory, or a connection reset
                    // before accept: wait a little rather than spin.
                    tracing::warn!(error = %e, "proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = inner.phase.reached(Phase::Draining) => break,
        };
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let Some(slot) = inner.limits.admit(peer.ip(), permit) else {
            tracing::debug!(%peer, "proxy: too many connections from this address");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let peer_ip = http::HeaderValue::from_str(&peer.ip().to_string())
            .expect("an IP address is a valid header value");
        let conn = Arc::new(Conn {
            peer,
            peer_ip,
            tls,
            inflight: AtomicUsize::new(0),
            requested: AtomicBool::new(false),
            last: AtomicU64::new(0),
            start: Instant::now(),
            slot,
            _tracked: inner.tasks.track(),
        });
        let inner = inner.clone();
        tokio::spawn(async move {
            if tls {
                let acceptor = tokio_rustls::TlsAcceptor::from(inner.tls.clone());
                let handshake =
                    tokio::time::timeout(inner.config.header_read_timeout, acceptor.accept(stream));
                match handshake.await {
                    Ok(Ok(stream)) => {
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        connection(&inner, conn, stream, h2).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %conn.peer, error = %e, "proxy: TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(peer = %conn.peer, "proxy: TLS handshake timed out"),
                }
            } else {
                // HTTP/2 without TLS (prior knowledge) is served too, but
                // timed as HTTP/1: its idle limit is the shorter one.
                connection(&inner, conn, stream, false).await;
            }
        });
        // One connection a turn of the event loop, as nginx takes them
        // (`multi_accept off`): the connections already in hand run before
        // the next one is taken, which waits in the kernel's queue
        // meanwhile. Otherwise a burst the queue holds is taken and shaken
        // hands with in one go (tokio lets a task accept until its budget
        // runs out) while responses in flight wait. bench/proxy.sh, whose
        // 64 clients never burst, shows no difference either way.
        tokio::task::yield_now().await;
    }
    drop(listener);
    finish(&inner).await;
}

/// After the accept loops stopped: give connections `shutdown_grace` to
/// finish, then drop the rest.
async fn finish(inner: &Inner) {
    if tokio::time::timeout(inner.config.shutdown_grace, inner.tasks.wait())
        .await
        .is_err()
    {
        inner.phase.advance(Phase::Stopped);
        inner.tasks.wait().await;
    }
}

/// Serves one client connection until it closes, idles out, or shutdown;
/// `h2` when it is HTTP/2 (by ALPN).
async fn connection<I>(inner: &Arc<Inner>, conn: Arc<Conn>, io: I, h2: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let inner = inner.clone();
        let conn = conn.clone();
        service_fn(move |request| {
            let inner = inner.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(crate::forward::handle(&inner, &conn, request).await) }
        })
    };
    let served = inner
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(served);
    // This task is polled a few times a request, and so is everything it
    // waits on: one timer (the idle timer, then the hard stop once the
    // connection closes for idling), and one phase wait (draining, then
    // stopped once the connection is closing), an atomic load a poll.
    let first = inner.config.header_read_timeout;
    let idle = if h2 {
        inner.config.idle_timeout
    } else {
        // Between HTTP/1 requests the next head is awaited.
        inner.config.idle_timeout.min(first)
    };
    let start = Instant::now();
    let timer = tokio::time::sleep_until(conn.idled(start, first, idle).err().unwrap_or(start));
    tokio::pin!(timer);
    let mut phase = inner.phase.reached(Phase::Draining);
    let mut closing = false;
    loop {
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %conn.peer, error = %e, "proxy: connection ended");
                }
                return;
            }
            () = &mut timer => {
                if closing {
                    return; // the hard stop
                }
                let now = Instant::now();
                match conn.idled(now, first, idle) {
                    Ok(()) => {
                        served.as_mut().graceful_shutdown();
                        closing = true;
                        phase = inner.phase.reached(Phase::Stopped);
                        timer.as_mut().reset(now + Duration::from_secs(1));
                    }
                    Err(wake) => timer.as_mut().reset(wake),
                }
            }
            () = &mut phase => {
                if closing {
                    return; // stopped
                }
                // Draining: requests in flight finish, until stopped.
                served.as_mut().graceful_shutdown();
                closing = true;
                phase = inner.phase.reached(Phase::Stopped);
                timer.as_mut().reset(Instant::now() + NEVER);
            }
        }
    }
}

/// Far enough to mean never for a timer (tokio caps its timers at about
/// two years).
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_client_counts_by_its_64_and_an_ipv4_one_by_its_address() {
        let limits = Arc::new(Limits::new(100, 2, 10));
        let admit = |ip: &str| {
            let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
            limits.admit(ip.parse().unwrap(), permit)
        };
        // Two addresses of one /64 fill its two places; another /64 and
        // an IPv4 client are apart.
        let a = admit("2001:db8:1:2::1").expect("first");
        let _b = admit("2001:db8:1:2:ffff::9").expect("second");
        assert!(admit("2001:db8:1:2::3").is_none(), "the /64 is full");
        assert!(admit("2001:db8:1:3::1").is_some(), "another /64");
        let _c = admit("192.0.2.1").expect("IPv4");
        let _d = admit("192.0.2.1").expect("IPv4, second");
        assert!(admit("192.0.2.1").is_none());
        assert!(
            admit("192.0.2.2").is_some(),
            "the next IPv4 address is apart"
        );
        // A closed connection gives its /64 a place back.
        drop(a);
        assert!(admit("2001:db8:1:2::3").is_some());
    }
}
