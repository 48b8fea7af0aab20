//! HTTP health checks: `GET <path>` on the service's port; 200 is healthy.
//!
//! A tiny HTTP/1.1 client on purpose: one request, `Connection: close`, read
//! the status line. Anything but a 200 in time (no answer, a refused
//! connection, another status) is a failure.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Timing of health checks (the same for every service on a minion).
#[derive(Clone, Copy, Debug)]
pub struct HealthTiming {
    /// How long after a start the first check runs (start-up grace).
    pub grace: Duration,
    pub interval: Duration,
    pub timeout: Duration,
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
