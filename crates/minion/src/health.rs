//! HTTP health checks: `GET <path>` on the service's port; 200 is healthy.
//!
//! A tiny HTTP/1.1 client on purpose: one request, `Connection: close`, read
//! the status line. Anything but a 200 in time (no answer, a refused
//! connection, another status) is a failure.
//!
//! When to probe ([`probe_delay`], [`failure_counts`]): a run is probed
//! quickly from its start (after 10 ms, then 20, 40, 80, then every 100 ms)
//! until a probe passes, so a service that serves within milliseconds of a
//! (re)start is running and healthy within milliseconds too. Failures
//! during the start-up grace do not count: it is the time a service has to
//! come up, not a wait before the first probe. Once a probe has passed, or
//! the grace is over, probes run at the steady interval, and consecutive
//! failures there make the service unhealthy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
            if let Some(ip) = addr {
                return check(SocketAddr::new(ip, port), &path, timeout).await;
            }
            // A service in the minion's own network (`--service-network
            // host`): try ::1, then 127.0.0.1.
            let v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port);
            match check(v6, &path, timeout).await {
                Ok(()) => Ok(()),
                Err(_) => {
                    check(
                        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
                        &path,
                        timeout,
                    )
                    .await
                }
            }
        })
    }
}

/// Checks once; `Err` says why the check failed.
pub async fn check(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, get(addr, path)).await {
        Ok(Ok(200)) => Ok(()),
        Ok(Ok(code)) => Err(format!("GET {path} answered {code}")),
        Ok(Err(e)) => Err(format!("GET {path}: {e}")),
        Err(_) => Err(format!(
            "GET {path}: no answer within {} ms",
            timeout.as_millis()
        )),
    }
}

async fn get(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(addr).await?;
    let host = match addr {
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
        assert!(check(closed, "/", t).await.is_err());
    }
}
