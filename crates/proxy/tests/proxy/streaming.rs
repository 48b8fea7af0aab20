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

/// An instance that answers at once and streams its answer while it
/// reads the upload, and a client that sends its whole upload before it
/// reads a byte of the answer, both larger than the sockets' buffers: the
/// proxy must go on taking the upload while the answer waits for the
/// client.
#[tokio::test]
async fn a_client_that_uploads_before_reading_an_early_answer_does_not_stall() {
    const SIZE: usize = 32 * MIB;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let uploaded = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = uploaded.clone();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let mut have = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let end = loop {
            let n = read.read(&mut buf).await.unwrap();
            assert!(n > 0, "the head came");
            have.extend_from_slice(&buf[..n]);
            if let Some(at) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        counted.fetch_add(have.len() - end, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            write
                .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {SIZE}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let chunk = vec![b'a'; CHUNK];
            for _ in 0..SIZE / CHUNK {
                if write.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        while counted.load(std::sync::atomic::Ordering::SeqCst) < SIZE {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    counted.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    });
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new(
            "a.test",
            vec![phoenix_proxy::Instance::new("a", addr)],
        )],
    )
    .await;
    let mut client = TcpStream::connect(p.http).await.unwrap();
    let exchanged = async {
        client
            .write_all(
                format!("POST /echo HTTP/1.1\r\nhost: a.test\r\ncontent-length: {SIZE}\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let chunk = vec![b'u'; CHUNK];
        for _ in 0..SIZE / CHUNK {
            client.write_all(&chunk).await.unwrap();
        }
        // Only now does the client read.
        let mut got = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        let mut head = Vec::new();
        while got < SIZE {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "the answer ended early");
            if head.windows(4).all(|w| w != b"\r\n\r\n") {
                head.extend_from_slice(&buf[..n]);
                if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
                    got += head.len() - at - 4;
                }
            } else {
                got += n;
            }
        }
        got
    };
    let got = tokio::time::timeout(Duration::from_secs(30), exchanged)
        .await
        .expect("the upload and the answer both finish");
    assert_eq!(got, SIZE);
    assert_eq!(uploaded.load(std::sync::atomic::Ordering::SeqCst), SIZE);
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
