//! HTTP health checks: `GET <path>` on the service's port; 200 is healthy.
//!
//! A tiny HTTP/1.1 client on purpose: one request, `Connection: close`, read
//! the status line. Anything but a 200 in time (no answer, a refused
//! connection, another status) is a failure. Within its time a probe keeps
//! trying to connect ([`connect`]): a fresh attempt beside one unanswered
//! for 100 ms, so a lost SYN (which the kernel resends only after 1 s) does
//! not fail it. A refusal fails it at once, as before: in steady state that
//! is a service that stopped listening, and during start-up the next probe
//! follows within 100 ms anyway.
//!
//! When to probe ([`probe_delay`], [`failure_counts`]): a run is probed
//! quickly from its start (after 10 ms, then 20, 40, 80, then every 100 ms)
//! until a probe passes, so a service that serves within milliseconds of a
//! (re)start is running and healthy within milliseconds too. Failures
//! during the start-up grace do not count: it is the time a service has to
//! come up, not a wait before the first probe. Once a probe has passed, or
//! the grace is over, probes run at the steady interval, and consecutive
//! failures there make the service unhealthy.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::driver::BoxFuture;

/// Timing of health checks (the same for every service on a minion).
#[derive(Clone, Copy, Debug)]
pub struct HealthTiming {
    /// The start-up grace: how long after a start failed checks do not
    /// count. Probes run quickly during it (see the module header).
    pub grace: Duration,
    /// Between probes once one has passed (or the grace is over).
    pub interval: Duration,
    pub timeout: Duration,
}

/// The first probe after a start waits this long; each further one until a
/// probe passes waits twice as long as the one before, up to
/// [`STARTUP_PROBE_MAX`].
pub const STARTUP_PROBE_FIRST: Duration = Duration::from_millis(10);
/// The longest wait between probes before the first pass, in the grace.
pub const STARTUP_PROBE_MAX: Duration = Duration::from_millis(100);

/// How long to wait before the next probe of a run: `probes` probes have
/// run since its start, the last of them `since_start` after it (0 when
/// none has), and `passed` whether one of them passed.
pub fn probe_delay(
    timing: &HealthTiming,
    probes: u32,
    since_start: Duration,
    passed: bool,
) -> Duration {
    let starting = !passed && (probes == 0 || since_start < timing.grace);
    if !starting {
        return timing.interval;
    }
    let ramp = STARTUP_PROBE_FIRST.saturating_mul(1 << probes.min(16));
    ramp.min(STARTUP_PROBE_MAX).min(timing.interval)
}

/// Whether a failed probe that started `since_start` after the run's start
/// counts towards making the service unhealthy.
pub fn failure_counts(timing: &HealthTiming, since_start: Duration) -> bool {
    since_start >= timing.grace
}

/// Probes a service's health endpoint; the runner's one way to check.
pub trait HealthProbe: Send + Sync {
    /// `GET path` on `port` of the service at `addr` (its own address in
    /// its network namespace; `None`: the service shares the minion's
    /// network, so loopback), within `timeout`; `Err` says why it failed.
    fn probe(
        &self,
        addr: Option<IpAddr>,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// The real probe: HTTP to the service's address, or on loopback.
pub struct HttpProbe;

impl HealthProbe for HttpProbe {
    fn probe(
        &self,
        addr: Option<IpAddr>,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<(), String>> {
        let path = path.to_owned();
        Box::pin(async move {
            let addrs = match addr {
                Some(ip) => vec![SocketAddr::new(ip, port)],
                // A service in the minion's own network (`--service-network
                // host`): ::1 and 127.0.0.1 side by side, the first to
                // connect answers (one after the other, a service on
                // 127.0.0.1 alone would wait out ::1's refusals).
                None => vec![
                    SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
                    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
                ],
            };
            check_any(&addrs, &path, timeout).await
        })
    }
}

/// Checks once; `Err` says why the check failed.
pub async fn check(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    check_any(&[addr], path, timeout).await
}

/// Checks once on the first of `addrs` to connect, all within `timeout`.
async fn check_any(addrs: &[SocketAddr], path: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let no_answer = || format!("GET {path}: no answer within {} ms", timeout.as_millis());
    let stream = match connect(addrs, deadline).await {
        Ok(s) => s,
        Err(Some(e)) => return Err(format!("GET {path}: {e}")),
        Err(None) => return Err(no_answer()),
    };
    match tokio::time::timeout_at(deadline, get(stream, path)).await {
        Ok(Ok(200)) => Ok(()),
        Ok(Ok(code)) => Err(format!("GET {path} answered {code}")),
        Ok(Err(e)) => Err(format!("GET {path}: {e}")),
        Err(_) => Err(no_answer()),
    }
}

/// A connection attempt not answered this long gets a fresh one beside it.
///
/// A SYN can be lost while a service comes up: a guest that has not yet
/// answered neighbour solicitation for its address (the packet waits in, or
/// falls out of, the neighbour queue), or a listener whose accept queue is
/// full (Linux drops the SYN). The kernel sends it again only after 1 s,
/// the whole default probe timeout, so one attempt made a probe of a
/// booting VM fail and the next one start 1.1 s later.
const CONNECT_STALL: Duration = Duration::from_millis(100);
/// At most this many attempts per address in flight; a new one then
/// replaces the oldest.
const CONNECT_IN_FLIGHT: usize = 4;

type Attempt = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;

/// Connects to the first of `addrs` that answers, before `deadline`.
///
/// Attempts race rather than replace each other: an earlier SYN may still
/// be answered first (one held in the neighbour queue goes out when the
/// address resolves, a retransmission may get through), so dropping it
/// would only throw that chance away; the losers are closed when the
/// winner is returned (a connection the service already accepted then
/// just ends, as a client's would). The number in flight is bounded, so a
/// long timeout does not pile up sockets. `Err(None)`: nothing answered;
/// `Err(Some(e))`: an attempt failed (refused, unreachable) with none other
/// left in flight, which ends the probe at once.
async fn connect(
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<TcpStream, Option<std::io::Error>> {
    let mut in_flight: VecDeque<Attempt> = VecDeque::new();
    let mut last_err = None;
    let mut next_round = Instant::now();
    let cap = CONNECT_IN_FLIGHT * addrs.len().max(1);
    loop {
        if Instant::now() >= next_round {
            for &addr in addrs {
                if in_flight.len() >= cap {
                    in_flight.pop_front();
                }
                in_flight.push_back(Box::pin(TcpStream::connect(addr)));
            }
            next_round = Instant::now() + CONNECT_STALL;
        }
        tokio::select! {
            result = poll_fn(|cx| first_done(&mut in_flight, cx)) => match result {
                Ok(s) => return Ok(s),
                // Refused or unreachable: that is the answer, unless an
                // earlier attempt may still get through.
                Err(e) if in_flight.is_empty() => return Err(Some(e)),
                Err(e) => last_err = Some(e),
            },
            _ = tokio::time::sleep_until(next_round) => {}
            _ = tokio::time::sleep_until(deadline) => return Err(last_err),
        }
    }
}

/// The result of the first attempt that is done, which leaves the set.
/// Pending while none is (forever when there are none).
fn first_done(
    attempts: &mut VecDeque<Attempt>,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<TcpStream>> {
    for i in 0..attempts.len() {
        if let Poll::Ready(r) = attempts[i].as_mut().poll(cx) {
            attempts.remove(i);
            return Poll::Ready(r);
        }
    }
    Poll::Pending
}

async fn get(mut s: TcpStream, path: &str) -> std::io::Result<u16> {
    let host = match s.peer_addr()? {
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        SocketAddr::V4(a) => a.to_string(),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: phoenix-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 256];
    let mut n = 0;
    // The status line is all we need: "HTTP/1.1 200 OK".
    while n < buf.len() {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not an HTTP response: {:?}",
                    line.lines().next().unwrap_or("")
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const MS: Duration = Duration::from_millis(1);

    /// The probe times of a run whose probes fail until `passes_at` (and
    /// take no time), up to `until`.
    fn schedule(t: &HealthTiming, passes_at: Duration, until: Duration) -> Vec<u64> {
        let (mut at, mut probes, mut passed) = (Duration::ZERO, 0, false);
        let mut times = Vec::new();
        loop {
            at += probe_delay(t, probes, at, passed);
            if at > until {
                return times;
            }
            times.push(at.as_millis() as u64);
            probes += 1;
            passed |= at >= passes_at;
        }
    }

    #[test]
    fn probes_ramp_up_fast_after_a_start_then_settle() {
        let t = HealthTiming {
            grace: Duration::from_secs(5),
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
        };
        // Serving at once: healthy at the first probe, 10 ms after the start.
        assert_eq!(schedule(&t, Duration::ZERO, 5000 * MS), [10, 2010, 4010]);
        // Serving after 300 ms: probed every 100 ms at most until then.
        assert_eq!(
            schedule(&t, 300 * MS, 3000 * MS),
            [10, 30, 70, 150, 250, 350, 2350]
        );
        // Never serving: fast probes through the grace, then the interval.
        let never = schedule(&t, Duration::MAX, 10_000 * MS);
        assert_eq!(&never[..5], [10, 30, 70, 150, 250]);
        let after_grace: Vec<u64> = never.iter().copied().filter(|&ms| ms > 5000).collect();
        assert_eq!(after_grace, [5050, 7050, 9050]);
        assert!(!failure_counts(&t, 4950 * MS));
        assert!(failure_counts(&t, 5050 * MS));
    }

    #[test]
    fn probe_schedule_respects_short_intervals_and_no_grace() {
        let t = HealthTiming {
            grace: Duration::ZERO,
            interval: 50 * MS,
            timeout: Duration::from_secs(1),
        };
        // No grace: the first probe is still quick, and counts.
        assert_eq!(probe_delay(&t, 0, Duration::ZERO, false), 10 * MS);
        assert!(failure_counts(&t, 10 * MS));
        assert_eq!(probe_delay(&t, 1, 10 * MS, false), 50 * MS);
        // Fast probes never wait longer than the steady interval.
        let slow_start = HealthTiming {
            grace: Duration::from_secs(1),
            ..t
        };
        assert_eq!(
            schedule(&slow_start, Duration::MAX, 200 * MS),
            [10, 30, 70, 120, 170]
        );
        assert_eq!(probe_delay(&slow_start, 3, 70 * MS, true), 50 * MS);
    }

    async fn server(reply: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn statuses() {
        let t = Duration::from_secs(2);
        let ok = server("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        assert!(check(ok, "/health", t).await.is_ok());
        let bad = server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert_eq!(
            check(bad, "/health", t).await.unwrap_err(),
            "GET /health answered 503"
        );
        let junk = server("hello\r\n").await;
        assert!(
            check(junk, "/", t)
                .await
                .unwrap_err()
                .contains("not an HTTP response")
        );
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        // Refusals are retried until the timeout: keep that short.
        assert!(check(closed, "/", 200 * MS).await.is_err());
    }

    /// A listener whose accept queue is full (Linux then drops new SYNs,
    /// and a client sends its SYN again only after 1 s): the probe gets in
    /// with a fresh attempt soon after the queue is drained at 300 ms.
    #[tokio::test]
    async fn a_dropped_syn_is_retried_within_the_timeout() {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = sock.listen(1).unwrap();
        let addr = l.local_addr().unwrap();
        // Fill the queue: connect until a handshake no longer completes.
        let mut held = Vec::new();
        loop {
            assert!(held.len() < 16, "the accept queue never filled");
            // Generous: a handshake on loopback slower than this on a
            // loaded machine would end the filling early.
            match tokio::time::timeout(500 * MS, TcpStream::connect(addr)).await {
                Ok(s) => held.push(s.unwrap()),
                Err(_) => break,
            }
        }
        let began = Instant::now();
        let drain = began + 300 * MS;
        tokio::spawn(async move {
            tokio::time::sleep_until(drain).await;
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                    }
                });
            }
        });
        let r = check(addr, "/health", Duration::from_secs(1)).await;
        let took = began.elapsed();
        assert_eq!(r, Ok(()));
        // A retransmitted SYN would be sent at 1 s: well before that.
        assert!(took >= 290 * MS && took < 900 * MS, "{took:?}");
        drop(held);
    }

    /// A refused port fails the probe at once, with the refusal, not at
    /// its timeout: in steady state that is a service that stopped
    /// listening, and it should count as soon as it is seen.
    #[tokio::test]
    async fn a_refused_port_fails_at_once() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let began = Instant::now();
        let e = check(addr, "/", Duration::from_secs(2)).await.unwrap_err();
        let took = began.elapsed();
        assert!(e.contains("refused"), "{e}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    /// On loopback (a service in the minion's network), one listening on
    /// 127.0.0.1 only passes at once: ::1's refusals do not hold it up.
    #[tokio::test]
    async fn loopback_probes_both_families_side_by_side() {
        let ok = server("HTTP/1.1 200 OK\r\n\r\n").await;
        let began = Instant::now();
        let r = HttpProbe
            .probe(None, ok.port(), "/", Duration::from_secs(2))
            .await;
        assert_eq!(r, Ok(()));
        assert!(began.elapsed() < Duration::from_secs(1));
    }
}
