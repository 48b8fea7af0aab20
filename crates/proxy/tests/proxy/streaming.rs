//! Bodies stream both ways; SSE and upgrades pass through.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use phoenix_proxy::{ProxyConfig, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_10_mib_response_streams_before_the_backend_has_finished() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let request = Request::get(format!("http://{}/big", p.http))
        .header("host", "a.test")
        .body(empty())
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = 0usize;
    // The backend holds back its last chunk until the gate opens, so all
    // of this arrives while it is still sending.
    while received < 10 * MIB - CHUNK {
        let frame = tokio::time::timeout(LIMIT, body.frame())
            .await
            .expect("bytes arrive while the backend is mid-body")
            .unwrap()
            .unwrap();
        received += frame.into_data().map_or(0, |d| d.len());
    }
    assert_eq!(
        p.proxy.outstanding("a"),
        1,
        "a streaming body counts as outstanding"
    );
    a.gate.add_permits(1);
    while let Some(frame) = tokio::time::timeout(LIMIT, body.frame()).await.unwrap() {
        received += frame.unwrap().into_data().map_or(0, |d| d.len());
    }
    assert_eq!(received, 10 * MIB);
    tokio::time::timeout(LIMIT, p.proxy.drained("a"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_10_mib_upload_reaches_the_backend_while_the_client_still_sends() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let (tx, body) = channel_body();
    let request = Request::post(format!("http://{}/upload", p.http))
        .header("host", "a.test")
        .body(body)
        .unwrap();
    let client = client();
    let response = tokio::spawn(async move { client.request(request).await });
    let chunk = Bytes::from(vec![b'u'; CHUNK]);
    tx.send(chunk.clone()).await.unwrap();
    tokio::time::timeout(LIMIT, a.first_bytes.notified())
        .await
        .expect("the first chunk reaches the backend before the rest is sent");
    for _ in 1..(10 * MIB / CHUNK) {
        tx.send(chunk.clone()).await.unwrap();
    }
    drop(tx);
    let response = tokio::time::timeout(LIMIT, response)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let total = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(total, (10 * MIB).to_string());
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let request = Request::get(format!("http://{}/sse", p.http))
        .header("host", "a.test")
        .body(empty())
        .unwrap();
    let response = client().request(request).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    for i in 1..=3 {
        if i > 1 {
            a.gate.add_permits(1);
        }
        let mut event = Vec::new();
        while !event.ends_with(b"\n\n") {
            let frame = tokio::time::timeout(LIMIT, body.frame())
                .await
                .unwrap_or_else(|_| panic!("event {i} arrives on its own"))
                .unwrap()
                .unwrap();
            event.extend_from_slice(&frame.into_data().unwrap());
        }
        assert_eq!(event, format!("data: {i}\n\n").as_bytes());
    }
    assert!(
        tokio::time::timeout(LIMIT, body.frame())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_websocket_upgrade_becomes_a_tunnel() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let mut stream = TcpStream::connect(p.http).await.unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(LIMIT, stream.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("sec-websocket-accept: test"), "{head}");

    for message in [&b"hello"[..], b"through the proxy", &[0u8, 255, 1, 254]] {
        stream.write_all(message).await.unwrap();
        let mut echo = vec![0u8; message.len()];
        tokio::time::timeout(LIMIT, stream.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo, message);
    }
    assert_eq!(p.proxy.outstanding("a"), 1, "an open tunnel is outstanding");
    drop(stream);
    tokio::time::timeout(LIMIT, p.proxy.drained("a"))
        .await
        .expect("the tunnel ends with the client");
}
