//! Hostile or broken peers: what a misbehaving instance or client sends
//! must not reach the other side in a form that side reads differently.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use phoenix_proxy::{Instance, ProxyConfig, Route};
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
