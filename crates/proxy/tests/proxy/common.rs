//! Test fixtures: a scriptable backend, a proxy on ephemeral ports, and
//! clients.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_proxy::{Instance, Proxy, ProxyConfig, Route, Routes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc};

pub type TestBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// A body fed from a channel, for streaming uploads and downloads.
pub fn channel_body() -> (mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    (tx, ChannelBody(rx).boxed_unsync())
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

pub const MIB: usize = 1024 * 1024;
pub const CHUNK: usize = 64 * 1024;

/// A backend on 127.0.0.1 that answers by path:
/// - anything else: JSON `{backend, method, path, headers}`;
/// - `/hold`: waits for a `release` permit, then answers like the above;
/// - `/slow`: answers after 2 s;
/// - `/big`: 10 MiB in 64 KiB chunks, waiting for a `gate` permit before
///   the last one;
/// - `/sse`: `text/event-stream`, event 1, then one more event per `gate`
///   permit, 3 in all;
/// - `/upload`: reads the body frame by frame (waking `first_bytes` at the
///   first), answers the byte count;
/// - `/ws`: 101 and echoes whatever arrives on the upgraded connection.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: AtomicUsize,
    /// Connections from the proxy open now.
    pub conns: AtomicUsize,
    pub release: Semaphore,
    pub gate: Semaphore,
    pub first_bytes: Notify,
}

impl Backend {
    pub async fn start(name: &str) -> Arc<Backend> {
        Self::start_at(name, "127.0.0.1:0").await.unwrap()
    }

    /// The same on another address; `None` when it cannot be bound (no
    /// IPv6 here, say).
    pub async fn start_at(name: &str, bind: &str) -> Option<Arc<Backend>> {
        let listener = TcpListener::bind(bind).await.ok()?;
        let backend = Arc::new(Backend {
            name: name.to_owned(),
            addr: listener.local_addr().unwrap(),
            hits: AtomicUsize::new(0),
            conns: AtomicUsize::new(0),
            release: Semaphore::new(0),
            gate: Semaphore::new(0),
            first_bytes: Notify::new(),
        });
        let b = backend.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let b = b.clone();
                b.conns.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let counted = b.clone();
                    let service = service_fn(move |req| {
                        let b = b.clone();
                        async move { Ok::<_, Infallible>(b.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                    counted.conns.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Some(backend)
    }

    pub fn instance(&self) -> Instance {
        Instance::new(self.name.clone(), self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    async fn answer(self: Arc<Self>, mut req: Request<Incoming>) -> Response<TestBody> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        match req.uri().path() {
            "/hold" => {
                self.release.acquire().await.unwrap().forget();
                self.info(&req)
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.info(&req)
            }
            "/big" => {
                let (tx, body) = channel_body();
                let me = self.clone();
                tokio::spawn(async move {
                    let chunk = Bytes::from(vec![b'x'; CHUNK]);
                    for i in 0..(10 * MIB / CHUNK) {
                        if i == 10 * MIB / CHUNK - 1 {
                            me.gate.acquire().await.unwrap().forget();
                        }
                        if tx.send(chunk.clone()).await.is_err() {
                            return;
                        }
                    }
                });
                Response::new(body)
            }
            "/sse" => {
                let (tx, body) = channel_body();
                let me = self.clone();
                tokio::spawn(async move {
                    for i in 1..=3 {
                        if i > 1 {
                            me.gate.acquire().await.unwrap().forget();
                        }
                        if tx
                            .send(Bytes::from(format!("data: {i}\n\n")))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
                let mut response = Response::new(body);
                response
                    .headers_mut()
                    .insert("content-type", "text/event-stream".parse().unwrap());
                response
            }
            "/upload" => {
                let mut body = req.into_body();
                let mut total = 0usize;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { break };
                    if let Ok(data) = frame.into_data() {
                        if total == 0 && !data.is_empty() {
                            self.first_bytes.notify_one();
                        }
                        total += data.len();
                    }
                }
                Response::new(full(total.to_string()))
            }
            "/ws" => {
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let Ok(upgraded) = upgrade.await else { return };
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 1024];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                let mut response = Response::new(empty());
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                response
                    .headers_mut()
                    .insert("upgrade", "websocket".parse().unwrap());
                response
                    .headers_mut()
                    .insert("connection", "Upgrade".parse().unwrap());
                response
                    .headers_mut()
                    .insert("sec-websocket-accept", "test".parse().unwrap());
                response
            }
            _ => self.info(&req),
        }
    }

    fn info(&self, req: &Request<Incoming>) -> Response<TestBody> {
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in req.headers() {
            headers
                .entry(name.as_str().to_owned())
                .or_default()
                .push(value.to_str().unwrap_or("?").to_owned());
        }
        let info = serde_json::json!({
            "backend": self.name,
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
            "headers": headers,
        });
        let mut response = Response::new(full(info.to_string()));
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        response
    }
}

/// A proxy on 127.0.0.1 with both listeners.
pub struct TestProxy {
    pub proxy: Proxy,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub served: tokio::task::JoinHandle<()>,
}

pub async fn start_proxy(config: ProxyConfig, routes: Vec<Route>) -> TestProxy {
    let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = http_listener.local_addr().unwrap();
    let https = https_listener.local_addr().unwrap();
    let config = ProxyConfig {
        https_port: https.port(),
        ..config
    };
    let proxy = Proxy::new(config).unwrap();
    proxy.set_routes(Routes { routes }).unwrap();
    let p = proxy.clone();
    let served = tokio::spawn(async move {
        tokio::join!(p.serve_http(http_listener), p.serve_https(https_listener));
    });
    TestProxy {
        proxy,
        http,
        https,
        served,
    }
}

/// One HTTP/2 connection with prior knowledge (no TLS) to `addr`, and the
/// task driving it (it ends when the proxy closes the connection).
pub async fn h2c(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<TestBody>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    (sender, tokio::spawn(conn))
}

/// A keep-alive HTTP/1 client.
pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The backend that answered.
    pub fn backend(&self) -> String {
        self.json()["backend"].as_str().unwrap().to_owned()
    }

    pub fn path(&self) -> String {
        self.json()["path"].as_str().unwrap().to_owned()
    }

    /// A request header the backend saw (the values joined by ", ").
    pub fn seen(&self, name: &str) -> Option<String> {
        let json = self.json();
        json["headers"][name].as_array().map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect::<Vec<_>>()
                .join(", ")
        })
    }
}

/// `GET http://{addr}{path}` with `Host: host` and extra headers.
pub async fn get(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    send(&client(), addr, "GET", host, path, headers, empty()).await
}

pub async fn send(
    client: &Client<HttpConnector, TestBody>,
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: TestBody,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(request.body(body).unwrap()),
    )
    .await
    .expect("the proxy answers in time")
    .expect("the request goes through");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends raw bytes on a new connection and reads the answer until the
/// proxy closes it or `limit` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An address nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// An address that accepts connections, reads the request and hangs up
/// without answering: an instance that dies with the request in flight.
pub async fn hang_up_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
        }
    });
    addr
}

/// Waits until `check` holds, for at most 10 s (then fails naming `what`).
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
