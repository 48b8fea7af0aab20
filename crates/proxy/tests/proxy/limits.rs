//! Limits, timeouts and shutdown: no client can stall the others.

use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use phoenix_proxy::{ProxyConfig, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Whether the proxy has closed `stream` (read gives EOF or an error)
/// within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn huge_headers_get_431_and_others_are_still_served() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let mut request = b"GET / HTTP/1.1\r\nHost: a.test\r\n".to_vec();
    for i in 0..100 {
        request.extend_from_slice(format!("X-Big-{i}: {}\r\n", "b".repeat(1000)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let answer = raw(p.http, &request, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert_eq!(a.hits(), 0);
    assert_eq!(get(p.http, "a.test", "/", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_slowloris_client_is_dropped_at_the_header_timeout_while_others_are_served() {
    let a = Backend::start("a").await;
    let timeout = Duration::from_secs(2);
    let p = start_proxy(
        ProxyConfig {
            header_read_timeout: timeout,
            ..ProxyConfig::default()
        },
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let started = Instant::now();
    let mut slow = TcpStream::connect(p.http).await.unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed_at = None;
    for (i, byte) in head.iter().enumerate() {
        if slow.write_all(&[*byte]).await.is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        if i == 1 {
            // Meanwhile, another client is served at once.
            let t = Instant::now();
            assert_eq!(get(p.http, "a.test", "/", &[]).await.status, StatusCode::OK);
            assert!(t.elapsed() < Duration::from_secs(1));
        }
        if closed_within(&mut slow, Duration::from_secs(1)).await {
            closed_at = Some(started.elapsed());
            break;
        }
    }
    let closed_at = closed_at.expect("the slow client was dropped");
    assert!(
        closed_at >= timeout - Duration::from_millis(100)
            && closed_at < timeout + Duration::from_secs(2),
        "dropped after {closed_at:?}"
    );
    assert_eq!(a.hits(), 1, "only the other client's request");
}

#[tokio::test]
async fn a_keep_alive_client_slow_with_its_next_head_is_dropped_at_the_header_timeout() {
    let a = Backend::start("a").await;
    let timeout = Duration::from_secs(2);
    let p = start_proxy(
        ProxyConfig {
            header_read_timeout: timeout,
            ..ProxyConfig::default()
        },
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let mut slow = TcpStream::connect(p.http).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), slow.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // The rest of the response comes within this first wait.
    assert!(!closed_within(&mut slow, Duration::from_millis(200)).await);
    let answered = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed_at = None;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err()
            || closed_within(&mut slow, Duration::from_millis(300)).await
        {
            closed_at = Some(answered.elapsed());
            break;
        }
    }
    let closed_at = closed_at.expect("the slow client was dropped");
    assert!(
        closed_at >= timeout - Duration::from_millis(300)
            && closed_at < timeout + Duration::from_secs(2),
        "dropped {closed_at:?} after its first response"
    );
    assert_eq!(a.hits(), 1, "only the first request");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let p = start_proxy(
        ProxyConfig {
            header_read_timeout: Duration::from_millis(500),
            ..ProxyConfig::default()
        },
        vec![],
    )
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(p.http).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    assert!(started.elapsed() >= Duration::from_millis(400));
    // Also over TLS: a handshake that never starts.
    let mut silent = TcpStream::connect(p.https).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_but_a_long_request_is_not() {
    let a = Backend::start("a").await;
    let idle = Duration::from_millis(500);
    let p = start_proxy(
        ProxyConfig {
            idle_timeout: idle,
            ..ProxyConfig::default()
        },
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    // HTTP/2 with prior knowledge on plain HTTP.
    let (mut sender, conn) = h2c(p.http).await;
    let request = Request::get("http://a.test/hold").body(empty()).unwrap();
    let held = tokio::spawn(sender.send_request(request));
    // The request outlasts the idle timeout several times over.
    tokio::time::sleep(idle * 3).await;
    a.release.add_permits(1);
    let response = held.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let finished = Instant::now();
    drop(response);
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the idle connection is closed")
        .unwrap()
        .unwrap();
    assert!(finished.elapsed() >= idle - Duration::from_millis(100));
}

#[tokio::test]
async fn requests_in_flight_per_ip_are_limited_over_http2_streams() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig {
            max_requests_per_ip: 2,
            ..ProxyConfig::default()
        },
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    // One connection, many streams: what the connection limit alone lets
    // one client multiply.
    let (sender, _conn) = h2c(p.http).await;
    let send = |path: &'static str| {
        let mut sender = sender.clone();
        tokio::spawn(async move {
            let request = Request::get(format!("http://a.test{path}"))
                .body(empty())
                .unwrap();
            sender.send_request(request).await.unwrap().status()
        })
    };
    let held = [send("/hold"), send("/hold")];
    wait_until("two requests held at the instance", || {
        p.proxy.outstanding("a") == 2
    })
    .await;
    let third = tokio::time::timeout(Duration::from_secs(5), send("/"))
        .await
        .expect("answered at once")
        .unwrap();
    assert_eq!(third, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.hits(), 2, "the third never reached the instance");
    a.release.add_permits(2);
    for held in held {
        assert_eq!(held.await.unwrap(), StatusCode::OK);
    }
    // Places free again once those are done.
    let fourth = tokio::time::timeout(Duration::from_secs(5), send("/"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fourth, StatusCode::OK);
}

#[tokio::test]
async fn connections_per_ip_are_limited() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig {
            max_connections_per_ip: 2,
            ..ProxyConfig::default()
        },
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let one = TcpStream::connect(p.http).await.unwrap();
    let two = TcpStream::connect(p.http).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(p.proxy.snapshot().connections, 2);
    let mut three = TcpStream::connect(p.http).await.unwrap();
    assert!(closed_within(&mut three, Duration::from_secs(2)).await);
    drop(one);
    drop(two);
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.proxy.snapshot().connections > 0 {
        assert!(
            Instant::now() < deadline,
            "closed connections free their slots"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(get(p.http, "a.test", "/", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_stops_accepting() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let addr = p.http;
    let held = tokio::spawn(async move { get(addr, "a.test", "/hold", &[]).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.hits() == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // An idle keep-alive connection closes at once.
    let mut idle = TcpStream::connect(p.http).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    idle.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");

    p.proxy.shutdown();
    assert!(closed_within(&mut idle, Duration::from_secs(2)).await);
    assert!(!p.served.is_finished());
    a.release.add_permits(1);
    let answer = held.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(5), p.served)
        .await
        .expect("the listeners finish once their connections have")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn shutdown_drops_what_outlasts_the_grace() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig {
            shutdown_grace: Duration::from_millis(300),
            ..ProxyConfig::default()
        },
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let mut stream = TcpStream::connect(p.http).await.unwrap();
    stream
        .write_all(b"GET /hold HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.hits() == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(5), p.served)
        .await
        .expect("the grace period bounds shutdown")
        .unwrap();
    assert!(closed_within(&mut stream, Duration::from_secs(2)).await);
}

#[tokio::test]
async fn a_request_body_that_stalls_is_cut_off_and_frees_the_instance() {
    let a = Backend::start("a").await;
    let idle = Duration::from_millis(500);
    let p = start_proxy(
        ProxyConfig {
            idle_timeout: idle,
            ..ProxyConfig::default()
        },
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    // A promised body of 1,000 bytes, one sent, then nothing: the request
    // (head and that byte) is at the instance, the rest never comes.
    let started = Instant::now();
    let answer = raw(
        p.http,
        b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000\r\n\r\nx",
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered, not timed out"
    );
    assert!(started.elapsed() >= idle - Duration::from_millis(100));
    // The connection to the instance went with it (a half-sent request
    // cannot go back to the pool).
    wait_until("the instance's connection is closed", || a.open() == 0).await;
    // A body that keeps coming, slower than that in all but each pause,
    // is not cut off.
    let mut stream = TcpStream::connect(p.http).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for byte in [b"a", b"b", b"c", b"d"] {
        tokio::time::sleep(idle / 2).await;
        stream.write_all(byte).await.unwrap();
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}
