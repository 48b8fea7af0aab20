//! `Shards`: one proxy a thread, all accepting from one listening socket,
//! fed as one.

use std::time::Duration;

use phoenix_proxy::{ProxyConfig, Route, Routes, Shards};

use crate::common::*;

#[tokio::test]
async fn every_shard_gets_the_routes_and_drained_waits_for_all_of_them() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = Shards::new(ProxyConfig::default(), 2).unwrap();
    assert_eq!(proxy.shards().len(), 2);
    proxy
        .set_routes(Routes {
            routes: vec![Route::new("a.test", vec![a.instance()])],
        })
        .unwrap();
    for shard in proxy.shards() {
        let routes = shard.snapshot().routes;
        assert_eq!(routes.len(), 1, "every shard has the table");
        assert_eq!(routes[0].host, "a.test");
    }
    // Each shard serves a listener of its own here (on this runtime), so
    // that the test puts requests on both: which thread takes a connection
    // from the shared socket of `serve` depends on which is free first.
    let mut at = Vec::new();
    for shard in proxy.shards() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        at.push(listener.local_addr().unwrap());
        tokio::spawn(shard.serve_http(listener));
    }
    let on = |i: usize| proxy.shards()[i].outstanding("a");
    let mut held = Vec::new();
    for i in [0, 1, 0, 1] {
        let addr = at[i];
        held.push(tokio::spawn(async move {
            get(addr, "a.test", "/hold", &[]).await
        }));
        let n = held.len() as u64;
        wait_until("the request at the backend", || proxy.outstanding("a") == n).await;
    }
    assert_eq!((on(0), on(1)), (2, 2));

    // a drains; b takes the new requests, on both shards.
    let mut draining = a.instance();
    draining.draining = true;
    proxy
        .set_routes(Routes {
            routes: vec![Route::new("a.test", vec![draining, b.instance()])],
        })
        .unwrap();
    for shard in proxy.shards() {
        assert!(shard.snapshot().routes[0].instances[0].draining);
    }
    let drained = tokio::spawn(proxy.drained("a"));
    for i in 0..10 {
        assert_eq!(get(at[i % 2], "a.test", "/", &[]).await.backend(), "b");
    }
    let merged = proxy.snapshot();
    assert_eq!(merged.routes.len(), 1);
    let (va, vb) = (
        &merged.routes[0].instances[0],
        &merged.routes[0].instances[1],
    );
    assert!(va.draining && va.outstanding == held.len() as u64, "{va:?}");
    assert_eq!((vb.id.as_str(), vb.total, vb.outstanding), ("b", 10, 0));
    assert_eq!(merged.routes[0].requests, held.len() as u64 + 10);

    // Released one by one: drained waits while any shard has one in
    // flight, including when only one of them does.
    let mut one_shard_only = false;
    for left in (0..held.len()).rev() {
        a.release.add_permits(1);
        wait_until("a request done", || proxy.outstanding("a") == left as u64).await;
        if left > 0 {
            one_shard_only |= on(0) == 0 || on(1) == 0;
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!drained.is_finished(), "{left} still in flight");
        }
    }
    assert!(one_shard_only, "the last request was on one shard only");
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .expect("drained resolves once every shard is drained")
        .unwrap();
    for h in held {
        assert_eq!(h.await.unwrap().backend(), "a");
    }

    proxy.shutdown();
}

#[tokio::test]
async fn the_connection_limit_per_ip_counts_over_all_shards() {
    let a = Backend::start("a").await;
    let config = ProxyConfig {
        max_connections_per_ip: 2,
        ..ProxyConfig::default()
    };
    let proxy = Shards::new(config, 2).unwrap();
    proxy
        .set_routes(Routes {
            routes: vec![Route::new("a.test", vec![a.instance()])],
        })
        .unwrap();
    let addr = proxy
        .serve(Some("127.0.0.1:0".parse().unwrap()), None)
        .unwrap()
        .http
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A connection is accepted once its first bytes are in
    // (TCP_DEFER_ACCEPT): each sends the start of a request.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        open.push(stream);
    }
    wait_until("two connections", || proxy.snapshot().connections == 2).await;
    // Whichever shard accepts them, more are closed at once.
    for _ in 0..8 {
        let mut more = tokio::net::TcpStream::connect(addr).await.unwrap();
        more.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), more.read(&mut buf))
            .await
            .expect("over the limit: closed at once");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    drop(open);
    wait_until("the two closed", || proxy.snapshot().connections == 0).await;
    assert!(
        get(addr, "a.test", "/", &[]).await.status.is_success(),
        "under the limit again"
    );
    proxy.shutdown();
    proxy.stopped().await;
}

#[tokio::test]
async fn a_port_in_use_is_refused_even_by_another_proxy() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let proxy = Shards::new(ProxyConfig::default(), 2).unwrap();
    assert!(matches!(
        proxy.serve(Some(addr), None),
        Err(phoenix_proxy::ShardsError::Listen { addr: a, .. }) if a == addr
    ));
    drop(taken);
    // Nothing ran, so it may be tried again; once serving, not again.
    let addr = proxy.serve(Some(addr), None).unwrap().http.unwrap();
    assert!(matches!(
        proxy.serve(Some(addr), None),
        Err(phoenix_proxy::ShardsError::Serving)
    ));
    // A second proxy on the same port is refused too: it would otherwise
    // take half the connections.
    let other = Shards::new(ProxyConfig::default(), 2).unwrap();
    assert!(matches!(
        other.serve(Some(addr), None),
        Err(phoenix_proxy::ShardsError::Listen { .. })
    ));
    proxy.shutdown();
    proxy.stopped().await;
}

#[tokio::test]
async fn a_busy_thread_leaves_new_connections_to_the_free_one() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU8, Ordering};

    let a = Backend::start("a").await;
    let proxy = Shards::new(ProxyConfig::default(), 2).unwrap();
    proxy
        .set_routes(Routes {
            routes: vec![Route::new("a.test", vec![a.instance()])],
        })
        .unwrap();
    // A hook that holds the thread it runs on (hooks must never block;
    // this one does, to stand for a thread busy with other connections).
    // 0: not called, 1: holding, 2: done.
    let state = Arc::new(AtomicU8::new(0));
    let held = state.clone();
    proxy.hooks().set_handler(move |_| {
        held.store(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(3));
        held.store(2, Ordering::SeqCst);
        phoenix_proxy::HookResponse {
            status: 200,
            text: "held".into(),
        }
    });
    let addr = proxy
        .serve(Some("127.0.0.1:0".parse().unwrap()), None)
        .unwrap()
        .http
        .unwrap();
    let hold = tokio::spawn(async move {
        send(
            &client(),
            addr,
            "POST",
            "a.test",
            "/_phoenix/hold",
            &[],
            empty(),
        )
        .await
    });
    wait_until("one thread held", || state.load(Ordering::SeqCst) == 1).await;

    // With a listener a thread, the kernel would give about half of these
    // to the held thread, where they would wait out the hook.
    for i in 0..16 {
        let answer = tokio::time::timeout(Duration::from_secs(1), get(addr, "a.test", "/", &[]))
            .await
            .unwrap_or_else(|_| panic!("connection {i} waited for the held thread"));
        assert_eq!(answer.backend(), "a");
    }
    assert_eq!(
        state.load(Ordering::SeqCst),
        1,
        "all answered while the other thread was held"
    );
    assert!(hold.await.unwrap().status.is_success());
    proxy.shutdown();
    proxy.stopped().await;
}
