//! Hostile or broken peers: what a misbehaving instance or client sends
//! must not reach the other side in a form that side reads differently.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use phoenix_proxy::{HookResponse, Instance, MAX_HOOK_BODY, MAX_HOOK_READS, ProxyConfig, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::*;

/// An instance that reads a request head and answers `response` as is, on
/// every connection.
async fn scripted(response: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_response_with_content_length_and_chunked_reaches_the_client_as_chunked() {
    // RFC 9112 §6.3: Transfer-Encoding wins, and an intermediary removes
    // the Content-Length before passing the message on. Kept, it promises
    // the client 5 bytes where the body has 3.
    let addr = scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![Instance::new("a", addr)])],
    )
    .await;
    let answer = raw(
        p.http,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        !answer.to_ascii_lowercase().contains("content-length: 5"),
        "{answer:?}"
    );
    let a = get(p.http, "a.test", "/", &[]).await;
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "abc"));
}

/// Sends a hook request's head and `sent` bytes of a body announced as
/// `MAX_HOOK_BODY` bytes, and leaves the connection open.
async fn partial_hook_post(addr: SocketAddr, sent: usize) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /_phoenix/git/x HTTP/1.1\r\nHost: any.test\r\nContent-Length: {MAX_HOOK_BODY}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b'x'; sent]).await.unwrap();
    stream
}

/// The answer on `stream` (until it closes or `limit` passes).
async fn answer_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_hook_body_that_never_ends_is_dropped_and_few_are_read_at_once() {
    // Hook bodies are read whole into memory (up to 1 MiB each) before the
    // handler runs: without a time limit and a bound on how many at once,
    // clients that stop one byte short hold that memory for as long as
    // they like (300 of them took 320 MiB of a master's RSS).
    let site = Backend::start("site").await;
    let config = ProxyConfig {
        header_read_timeout: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(30),
        ..ProxyConfig::default()
    };
    let p = start_proxy(config, vec![Route::new("a.test", vec![site.instance()])]).await;
    p.proxy.hooks().set_handler(|_| HookResponse {
        status: 202,
        text: "ok\n".into(),
    });

    let mut stalled = partial_hook_post(p.http, 10).await;
    let answer = answer_within(&mut stalled, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");

    // Those reading at once are bounded; one more gets 503 at once, and
    // requests for the services go on.
    let mut held = Vec::new();
    for _ in 0..MAX_HOOK_READS {
        held.push(partial_hook_post(p.http, 64 * 1024).await);
    }
    // The proxy has taken them all in hand.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = partial_hook_post(p.http, 10).await;
    let answer = answer_within(&mut extra, Duration::from_millis(400)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert_eq!(get(p.http, "a.test", "/", &[]).await.status, StatusCode::OK);
    // Once they timed out, a whole hook request is served again.
    for stream in &mut held {
        let answer = answer_within(stream, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    }
    let answer = raw(
        p.http,
        b"POST /_phoenix/git/x HTTP/1.1\r\nHost: any.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer:?}");
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_passed_to_the_instance() {
    // An instance that took `Upgrade: h2c` would make the connection a
    // tunnel, and the client's later requests on it would reach that
    // service untouched by the proxy: no basic auth check after the first,
    // an X-Forwarded-For of the client's choosing (h2c smuggling).
    // WebSockets are the upgrade the proxy passes on.
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let answer = raw(
        p.http,
        b"GET /x HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    let headers = &seen["headers"];
    assert!(headers.get("upgrade").is_none(), "{headers}");
    assert!(headers.get("http2-settings").is_none(), "{headers}");
    assert!(headers.get("connection").is_none(), "{headers}");
}

#[tokio::test]
async fn request_smuggling_shapes_are_refused_or_end_the_connection() {
    // Regression guard (hyper does the parsing): none of these may leave a
    // second request on the connection for the proxy and an instance to
    // read differently.
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let limit = Duration::from_secs(5);
    for refused in [
        &b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"[..],
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4, 4\r\n\r\nabcd",
        b"GET /x HTTP/1.1\r\nHost: a.test\r\nX-A: a\r\n b\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ] {
        let answer = raw(p.http, refused, limit).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{:?}: {answer:?}",
            String::from_utf8_lossy(refused)
        );
    }
    // Both lengths: chunked wins, the instance gets no Content-Length, and
    // the connection ends after the answer, so what followed the chunked
    // body is never read as a request.
    let before = a.hits();
    let answer = raw(
        p.http,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
        limit,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(!answer.contains("/smuggled"), "{answer:?}");
    assert!(!answer.contains("content-length\":"), "{answer:?}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer:?}");
    assert_eq!(a.hits(), before + 1);
}

#[tokio::test]
async fn two_host_headers_are_400_and_a_coding_besides_chunked_is_501() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![
            Route::new("a.test", vec![a.instance()]),
            Route::new("b.test", vec![a.instance()]),
        ],
    )
    .await;
    let limit = Duration::from_secs(5);
    let answer = raw(
        p.http,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        limit,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.contains("more than one Host"), "{answer:?}");
    // The instance would get the body still gzipped, told nothing.
    let answer = raw(
        p.http,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        limit,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer:?}");
    assert_eq!(a.hits(), 0);
    // Chunked alone goes through.
    let answer = raw(
        p.http,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        limit,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(a.hits(), 1);
}
