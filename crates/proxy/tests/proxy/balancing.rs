//! Load balancing, passive health, retries, draining.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use phoenix_proxy::{ProxyConfig, Route, Routes};

use crate::common::*;

#[tokio::test]
async fn requests_spread_over_two_backends() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance(), b.instance()])],
    )
    .await;
    let client = client();
    for _ in 0..40 {
        let answer = send(&client, p.http, "GET", "a.test", "/", &[], empty()).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert_eq!(a.hits() + b.hits(), 40);
    assert!(
        a.hits() >= 5 && b.hits() >= 5,
        "a {} b {}",
        a.hits(),
        b.hits()
    );
}

/// Starts a `/hold` request and waits until it is the `nth` at `backend`.
async fn hold(
    addr: std::net::SocketAddr,
    backend: &Arc<Backend>,
    nth: usize,
) -> tokio::task::JoinHandle<String> {
    let task = tokio::spawn(async move { get(addr, "a.test", "/hold", &[]).await.backend() });
    wait_until("the request to arrive", || backend.hits() == nth).await;
    task
}

#[tokio::test]
async fn new_requests_go_to_the_less_loaded_instance() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    // Three requests held on a, the only instance.
    let mut on_a = Vec::new();
    for n in 1..=3 {
        on_a.push(hold(p.http, &a, n).await);
    }
    // b joins; a's three outstanding requests carry over into the new
    // table, so the next three all go to b.
    p.proxy
        .set_routes(Routes {
            routes: vec![Route::new("a.test", vec![a.instance(), b.instance()])],
        })
        .unwrap();
    let mut on_b = Vec::new();
    for n in 1..=3 {
        on_b.push(hold(p.http, &b, n).await);
    }
    assert_eq!((a.hits(), b.hits()), (3, 3));
    assert_eq!(p.proxy.outstanding("a"), 3);
    assert_eq!(p.proxy.outstanding("b"), 3);
    let snapshot = p.proxy.snapshot();
    let loads: Vec<u64> = snapshot.routes[0]
        .instances
        .iter()
        .map(|i| i.outstanding)
        .collect();
    assert_eq!(loads, vec![3, 3]);

    a.release.add_permits(3);
    b.release.add_permits(3);
    for task in on_a {
        assert_eq!(task.await.unwrap(), "a");
    }
    for task in on_b {
        assert_eq!(task.await.unwrap(), "b");
    }
    assert_eq!(p.proxy.outstanding("a") + p.proxy.outstanding("b"), 0);
}

/// Down marks that outlast a loaded test machine's slowest test.
fn slow_recovery() -> ProxyConfig {
    ProxyConfig {
        mark_down_min: Duration::from_secs(30),
        mark_down_max: Duration::from_secs(30),
        ..ProxyConfig::default()
    }
}

#[tokio::test]
async fn a_dead_instance_is_retried_around_for_get_and_marked_down() {
    let live = Backend::start("live").await;
    let dead = phoenix_proxy::Instance::new("dead", closed_port().await);
    let p = start_proxy(
        slow_recovery(),
        vec![
            Route::new("a.test", vec![dead.clone(), live.instance()]),
            Route::new("dead.test", vec![dead.clone()]),
        ],
    )
    .await;
    let client = client();
    for _ in 0..20 {
        let answer = send(&client, p.http, "GET", "a.test", "/", &[], empty()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.backend(), "live");
    }
    let snapshot = p.proxy.snapshot();
    let dead_view = snapshot.routes[0]
        .instances
        .iter()
        .find(|i| i.id == "dead")
        .unwrap();
    assert!(dead_view.failures >= 1, "{dead_view:?}");
    assert!(
        dead_view.down_for_ms.is_some(),
        "marked down: {dead_view:?}"
    );
    assert!(
        dead_view.failures <= 2,
        "skipped while down, not tried on every request: {dead_view:?}"
    );

    // Only a dead instance: a GET is tried and fails with 502; a POST with
    // a body is never sent twice.
    let answer = send(&client, p.http, "GET", "dead.test", "/", &[], empty()).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let answer = send(&client, p.http, "POST", "dead.test", "/", &[], full("data")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(p.proxy.snapshot().routes[1].bad_gateway >= 2);
}

#[tokio::test]
async fn a_post_is_not_retried_on_another_instance() {
    let live = Backend::start("live").await;
    let dead = phoenix_proxy::Instance::new("dead", closed_port().await);
    let p = start_proxy(
        slow_recovery(),
        vec![Route::new("a.test", vec![dead, live.instance()])],
    )
    .await;
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let answer = send(&client, p.http, "POST", "a.test", "/", &[], full("data")).await;
        statuses.push(answer.status);
    }
    // At most the first POSTs that drew the dead instance failed (it is
    // then marked down and skipped); none went to live twice.
    let failed = statuses
        .iter()
        .filter(|s| **s == StatusCode::BAD_GATEWAY)
        .count();
    assert!(failed <= 1, "{statuses:?}");
    assert_eq!(live.hits(), 10 - failed);
}

#[tokio::test]
async fn draining_takes_no_new_requests_and_drained_waits_for_those_in_flight() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let addr = p.http;
    let held = tokio::spawn(async move { get(addr, "a.test", "/hold", &[]).await });
    wait_until("the request on a", || a.hits() == 1).await;

    let mut draining = a.instance();
    draining.draining = true;
    p.proxy
        .set_routes(Routes {
            routes: vec![Route::new("a.test", vec![draining, b.instance()])],
        })
        .unwrap();
    assert_eq!(p.proxy.outstanding("a"), 1);
    let drained = tokio::spawn(p.proxy.drained("a"));
    for _ in 0..10 {
        assert_eq!(get(p.http, "a.test", "/", &[]).await.backend(), "b");
    }
    assert!(!drained.is_finished());
    let view = p.proxy.snapshot().routes[0].instances[0].clone();
    assert!(view.draining && view.outstanding == 1, "{view:?}");

    // Removing a from the table altogether keeps counting its request.
    p.proxy
        .set_routes(Routes {
            routes: vec![Route::new("a.test", vec![b.instance()])],
        })
        .unwrap();
    assert_eq!(p.proxy.outstanding("a"), 1);

    a.release.add_permits(1);
    assert_eq!(held.await.unwrap().backend(), "a");
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .expect("drained resolves once the request is done")
        .unwrap();
    assert_eq!(p.proxy.outstanding("a"), 0);
    // An id with nothing in flight is drained at once.
    tokio::time::timeout(Duration::from_secs(1), p.proxy.drained("nobody"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_get_that_got_no_answer_goes_to_another_instance_once_a_post_does_not() {
    let live = Backend::start("live").await;
    let mute = phoenix_proxy::Instance::new("mute", hang_up_port().await);
    let p = start_proxy(
        ProxyConfig::default(),
        vec![
            Route::new("a.test", vec![mute.clone(), live.instance()]),
            Route::new("mute.test", vec![mute]),
        ],
    )
    .await;
    let client = client();
    // The mute instance accepts, so it is never marked down: GETs keep
    // drawing it, and each of those goes on to live.
    for _ in 0..20 {
        let answer = send(&client, p.http, "GET", "a.test", "/", &[], empty()).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.backend(), "live");
    }
    let mute_view = p.proxy.snapshot().routes[0]
        .instances
        .iter()
        .find(|i| i.id == "mute")
        .cloned()
        .unwrap();
    assert!(mute_view.failures >= 1, "mute was drawn: {mute_view:?}");
    assert_eq!(live.hits(), 20, "each GET reached live exactly once");

    // A POST with a body that drew the mute instance fails rather than
    // being sent twice.
    let mut failed = 0;
    for _ in 0..20 {
        let answer = send(&client, p.http, "POST", "a.test", "/", &[], full("data")).await;
        if answer.status == StatusCode::BAD_GATEWAY {
            assert!(
                answer.text().contains("failed to answer"),
                "{}",
                answer.text()
            );
            failed += 1;
        }
    }
    assert!(failed >= 1, "some POST drew the mute instance");
    assert_eq!(live.hits(), 20 + 20 - failed);
    // With the mute instance alone there is nowhere else to go: a 502
    // that says why.
    let answer = send(&client, p.http, "GET", "mute.test", "/", &[], empty()).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(
        answer.text().contains("failed to answer"),
        "{}",
        answer.text()
    );
}
