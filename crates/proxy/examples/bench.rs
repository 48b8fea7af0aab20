//! Measures the proxy on loopback: request rate and latency direct to a
//! backend and through the proxy, memory per keep-alive connection, and
//! memory while large bodies stream.
//!
//! ```text
//! cargo run --release -p phoenix-proxy --example bench [SECONDS] [CONCURRENCY]
//! ```
//!
//! Backend, proxy and load generator share one process (and, here, two
//! cores), so the rates are a lower bound of what the proxy alone does;
//! the comparison between direct and proxied is the point.

use std::convert::Infallible;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use phoenix_proxy::{Instance, Proxy, ProxyConfig, Route, Routes};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const BIG: usize = 64 * 1024 * 1024;

async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let body = if req.uri().path() == "/big" {
                        // 64 MiB, produced lazily in 64 KiB chunks.
                        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
                        tokio::spawn(async move {
                            for _ in 0..BIG / chunk.len() {
                                if tx.send(chunk.clone()).await.is_err() {
                                    return;
                                }
                            }
                        });
                        ChannelBody(rx).boxed_unsync()
                    } else {
                        Full::new(Bytes::from_static(b"hello, world\n"))
                            .map_err(|e| match e {})
                            .boxed_unsync()
                    };
                    Ok::<_, Infallible>(Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// `concurrency` keep-alive connections sending GETs for `duration`;
/// returns the rate and the 50th and 99th percentile latencies.
async fn load(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> (f64, Duration, Duration) {
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            while Instant::now() < end {
                let request = Request::get("/")
                    .header("host", "bench.test")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let start = Instant::now();
                let response = sender.send_request(request).await.unwrap();
                response.into_body().collect().await.unwrap();
                latencies.push(start.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    let rate = all.len() as f64 / duration.as_secs_f64();
    (rate, all[all.len() / 2], all[all.len() * 99 / 100])
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: u64 = args.first().map_or(Ok(5), |s| s.parse())?;
    let concurrency: usize = args.get(1).map_or(Ok(32), |s| s.parse())?;
    let duration = Duration::from_secs(seconds);

    let backend = backend().await;
    let proxy = Proxy::new(ProxyConfig::default())?;
    proxy.set_routes(Routes {
        routes: vec![Route::new(
            "bench.test",
            vec![Instance::new("bench", backend)],
        )],
    })?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxied = listener.local_addr()?;
    tokio::spawn(proxy.serve_http(listener));

    println!("{concurrency} keep-alive connections, {seconds} s each, small GETs:");
    let (rate, p50, p99) = load(backend, concurrency, duration).await;
    println!("  direct:  {rate:>8.0} req/s  p50 {p50:>9.1?}  p99 {p99:>9.1?}");
    let (rate, p50, p99) = load(proxied, concurrency, duration).await;
    println!("  proxied: {rate:>8.0} req/s  p50 {p50:>9.1?}  p99 {p99:>9.1?}");

    // Memory per keep-alive client connection that has served a request.
    let connections = 1000;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let mut held = Vec::new();
    for _ in 0..connections {
        let mut stream = TcpStream::connect(proxied).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n")
            .await?;
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib();
    println!(
        "{connections} idle keep-alive connections: +{} KiB RSS, {:.1} KiB each (client sockets, \
         proxy and backend connections together)",
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / connections as f64
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Memory while 16 downloads of 64 MiB stream through, read slowly.
    let before = rss_kib();
    let mut peak = before;
    let started = Instant::now();
    let mut downloads = Vec::new();
    for _ in 0..16 {
        downloads.push(tokio::spawn(async move {
            let stream = TcpStream::connect(proxied).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let request = Request::get("/big")
                .header("host", "bench.test")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let mut body = sender.send_request(request).await.unwrap().into_body();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                total += frame.unwrap().into_data().map_or(0, |d| d.len());
            }
            total
        }));
    }
    let total = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while downloads.iter().any(|d| !d.is_finished()) {
        peak = peak.max(rss_kib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for d in downloads {
        total.fetch_add(d.await?, std::sync::atomic::Ordering::Relaxed);
    }
    let total = total.load(std::sync::atomic::Ordering::Relaxed);
    let elapsed = started.elapsed();
    println!(
        "16 x 64 MiB downloads through the proxy: {} MiB in {elapsed:.2?} ({:.0} MiB/s), peak RSS +{} KiB",
        total / (1024 * 1024),
        total as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64(),
        peak.saturating_sub(before)
    );
    proxy.shutdown();
    Ok(())
}
