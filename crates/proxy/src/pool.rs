//! Keep-alive HTTP/1.1 connections to instances: each instance keeps a
//! stack of idle connections, a request takes the most recently used one
//! (or connects), and its response body puts the connection back when it
//! has been read to the end.
//!
//! This replaces hyper-util's pooled `Client`, which per request boxed the
//! response future, took the pool's lock twice, made a oneshot channel for
//! the body's end and spawned a task to put the connection back once it
//! was ready again; and which needed an absolute URI (formatted and parsed
//! per request) only to turn it back into the origin form. Here a request
//! costs a lock to take a connection and one to return it, and the
//! connection's own task (hyper's dispatcher, spawned at connect) does the
//! rest. A connection returned before hyper has finished with the previous
//! exchange is waited for (`ready`) by the next request that takes it.
//!
//! A connection goes back only when its response body was read whole;
//! one dropped early (the client went away) is closed. Connections idle
//! longer than `backend_pool_idle_timeout` are closed by [`Idle::sweep`],
//! which the accept loops run, and a connection the instance closed is
//! dropped when next seen.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::balance::InstanceState;
use crate::body::Body;

/// Why a request got no response from an instance.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be made (refused, unreachable, timed out): the
    /// request never left the proxy.
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    /// The connection broke or the instance answered garbage.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

/// An instance's idle connections, the most recently used last.
#[derive(Debug, Default)]
pub(crate) struct Idle {
    conns: Mutex<VecDeque<IdleConn>>,
}

#[derive(Debug)]
struct IdleConn {
    sender: SendRequest<Body>,
    since: Instant,
}

impl Idle {
    /// The most recently used connection that is still open and fresh.
    fn take(&self, max_age: Duration) -> Option<SendRequest<Body>> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = conns.pop_back() {
            if !conn.sender.is_closed() && conn.since.elapsed() < max_age {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Keeps `sender` for another request, unless `max` are kept already.
    fn put(&self, sender: SendRequest<Body>, max: usize) {
        if sender.is_closed() {
            return;
        }
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() < max {
            conns.push_back(IdleConn {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes connections idle for `max_age` or more, and forgets those
    /// the instance has closed.
    pub fn sweep(&self, max_age: Duration) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if !conns.is_empty() {
            conns.retain(|c| !c.sender.is_closed() && c.since.elapsed() < max_age);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// How connections to instances are made and kept.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// The largest read buffer of a connection (and so response head).
    pub max_buf: usize,
}

/// Sends `request` (origin-form URI, `Host` set) to `instance` over an idle
/// connection or a new one. A request that a pooled connection could not
/// take (it had closed) goes on another, or a new one: it was not sent.
/// Returns the response and the connection, for [`PooledBody`].
pub(crate) async fn send(
    config: &PoolConfig,
    instance: &Arc<InstanceState>,
    mut request: Request<Body>,
) -> Result<(Response<Incoming>, SendRequest<Body>), SendError> {
    loop {
        let (mut sender, reused) = match instance.conns.take(config.idle_timeout) {
            Some(sender) => (sender, true),
            None => (connect(config, instance).await?, false),
        };
        if !sender.is_ready()
            && let Err(e) = sender.ready().await
        {
            if reused {
                continue;
            }
            // A fresh connection that closed before its first request.
            return Err(SendError::Http(e));
        }
        match sender.try_send_request(request).await {
            Ok(response) => return Ok((response, sender)),
            Err(mut e) => match e.take_message() {
                Some(unsent) if reused => request = unsent,
                _ => return Err(SendError::Http(e.into_error())),
            },
        }
    }
}

async fn connect(
    config: &PoolConfig,
    instance: &InstanceState,
) -> Result<SendRequest<Body>, SendError> {
    let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(instance.addr))
        .await
        .map_err(|_| SendError::Connect(std::io::ErrorKind::TimedOut.into()))?
        .map_err(SendError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .max_buf_size(config.max_buf)
        .handshake(TokioIo::new(stream))
        .await?;
    let addr = instance.addr;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(instance = %addr, error = %e, "proxy: instance connection ended");
        }
    });
    Ok(sender)
}

/// An instance's response body that puts its connection back into the
/// instance's pool once read whole (dropped early, the connection closes).
pub(crate) struct PooledBody {
    inner: Incoming,
    conn: Option<(SendRequest<Body>, Arc<InstanceState>, usize)>,
}

impl PooledBody {
    pub fn new(
        inner: Incoming,
        sender: SendRequest<Body>,
        instance: Arc<InstanceState>,
        max_idle: usize,
    ) -> Self {
        PooledBody {
            inner,
            conn: Some((sender, instance, max_idle)),
        }
    }

    fn release(&mut self) {
        if let Some((sender, instance, max_idle)) = self.conn.take() {
            instance.conns.put(sender, max_idle);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing to read (HEAD, 204, 304, length 0) is never
        // polled; it is whole all the same.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    /// A backend that answers every request on a connection with `body`,
    /// counting connections.
    async fn backend(body: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let response = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            stream.write_all(response.as_bytes()).await.unwrap();
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn config() -> PoolConfig {
        PoolConfig {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_idle: 4,
            max_buf: 64 * 1024,
        }
    }

    fn request() -> Request<Body> {
        Request::builder()
            .uri("/")
            .header("host", "x")
            .body(crate::body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_read_whole_is_reused_one_dropped_early_is_not() {
        let (addr, accepted) = backend("hello").await;
        let instance = Arc::new(InstanceState::new("a", addr, Arc::new(Notify::new())));
        let config = config();
        for _ in 0..3 {
            let (response, sender) = send(&config, &instance, request()).await.unwrap();
            let body = PooledBody::new(response.into_body(), sender, instance.clone(), 4);
            assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(instance.conns.len(), 1);

        let (response, sender) = send(&config, &instance, request()).await.unwrap();
        drop(PooledBody::new(
            response.into_body(),
            sender,
            instance.clone(),
            4,
        ));
        // Dropped before its end (the body was not read): not kept.
        assert_eq!(instance.conns.len(), 0);

        instance.conns.sweep(Duration::ZERO);
        assert_eq!(instance.conns.len(), 0);
    }

    /// A connection the instance closed while it sat idle in the pool
    /// takes no request: the request, even one with a body, goes on a new
    /// connection.
    #[tokio::test]
    async fn a_request_taking_a_connection_closed_while_idle_goes_on_a_new_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let close = Arc::new(Notify::new());
        let (count, closing) = (accepted.clone(), close.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let closing = closing.clone();
                tokio::spawn(async move {
                    // One answer (keep-alive, as far as the client knows),
                    // then the connection closes when told.
                    let mut have = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !have.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = stream.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..n]);
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    closing.notified().await;
                });
            }
        });
        let instance = Arc::new(InstanceState::new("a", addr, Arc::new(Notify::new())));
        let config = config();
        let (response, sender) = send(&config, &instance, request()).await.unwrap();
        let body = PooledBody::new(response.into_body(), sender, instance.clone(), 4);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(
            instance.conns.len(),
            1,
            "kept: the instance said nothing of closing"
        );
        close.notify_waiters();
        tokio::time::sleep(Duration::from_millis(100)).await; // the FIN arrives

        let post = Request::builder()
            .method("POST")
            .uri("/")
            .header("host", "x")
            .header("content-length", "4")
            .body(crate::body::full("data"))
            .unwrap();
        let (response, sender) = send(&config, &instance, post).await.unwrap();
        let body = PooledBody::new(response.into_body(), sender, instance.clone(), 4);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let instance = Arc::new(InstanceState::new("a", addr, Arc::new(Notify::new())));
        let e = send(&config(), &instance, request()).await.unwrap_err();
        assert!(e.is_connect(), "{e}");
    }

    #[tokio::test]
    async fn the_sweep_closes_idle_connections() {
        let (addr, _) = backend("x").await;
        let instance = Arc::new(InstanceState::new("a", addr, Arc::new(Notify::new())));
        let (response, sender) = send(&config(), &instance, request()).await.unwrap();
        let body = PooledBody::new(response.into_body(), sender, instance.clone(), 4);
        body.collect().await.unwrap();
        assert_eq!(instance.conns.len(), 1);
        instance.conns.sweep(Duration::from_secs(60));
        assert_eq!(instance.conns.len(), 1);
        instance.conns.sweep(Duration::ZERO);
        assert_eq!(instance.conns.len(), 0);
    }
}
