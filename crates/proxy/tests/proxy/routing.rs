//! Routing, headers, auth, errors.

use base64::Engine;
use http::StatusCode;
use phoenix_proxy::{Instance, ProxyConfig, Route, Routes};

use crate::common::*;

#[tokio::test]
async fn routes_by_host_and_longest_prefix_and_strips_it() {
    let site = Backend::start("site").await;
    let api = Backend::start("api").await;
    let v2 = Backend::start("v2").await;
    let other = Backend::start("other").await;
    let mut keep = Route::new("a.test", vec![v2.instance()]).at("/api/v2");
    keep.strip_prefix = false;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![
            Route::new("a.test", vec![site.instance()]),
            Route::new("a.test", vec![api.instance()]).at("/api"),
            keep,
            Route::new("B.Test", vec![other.instance()]),
        ],
    )
    .await;

    // A stripped prefix is told in X-Forwarded-Prefix; a client's own
    // value never reaches an instance.
    let spoof = [("x-forwarded-prefix", "/evil")];
    let a = get(p.http, "a.test", "/api/x?q=1", &spoof).await;
    assert_eq!((a.backend(), a.path()), ("api".into(), "/x?q=1".into()));
    assert_eq!(a.seen("x-forwarded-prefix").as_deref(), Some("/api"));
    for path in ["/", "/api/v2/users"] {
        let a = get(p.http, "a.test", path, &spoof).await;
        assert_eq!(a.seen("x-forwarded-prefix"), None, "{path}");
    }
    let a = get(p.http, "a.test", "/api", &[]).await;
    assert_eq!((a.backend(), a.path()), ("api".into(), "/".into()));
    let a = get(p.http, "a.test", "/api?q", &[]).await;
    assert_eq!((a.backend(), a.path()), ("api".into(), "/?q".into()));
    let a = get(p.http, "a.test", "/apix", &[]).await;
    assert_eq!((a.backend(), a.path()), ("site".into(), "/apix".into()));
    let a = get(p.http, "a.test", "/api/v2/users", &[]).await;
    assert_eq!(
        (a.backend(), a.path()),
        ("v2".into(), "/api/v2/users".into())
    );
    // Host: case, port and a trailing dot do not matter.
    let a = get(p.http, "b.TEST:8080", "/", &[]).await;
    assert_eq!(a.backend(), "other");
    let a = get(p.http, "b.test.", "/", &[]).await;
    assert_eq!(a.backend(), "other");

    let unknown = get(p.http, "c.test", "/", &[]).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert!(unknown.text().contains("no service"), "{}", unknown.text());

    let walked = get(p.http, "a.test", "/api/../admin", &[]).await;
    assert_eq!(walked.status, StatusCode::BAD_REQUEST);

    let snapshot = p.proxy.snapshot();
    let api_route = snapshot
        .routes
        .iter()
        .find(|r| r.path_prefix == "/api")
        .unwrap();
    assert_eq!(api_route.requests, 3);
    assert_eq!(api_route.instances[0].total, 3);
    assert_eq!(api_route.instances[0].outstanding, 0);
}

#[tokio::test]
async fn no_healthy_instance_is_503_and_a_new_table_applies_at_once() {
    let a = Backend::start("a").await;
    let mut sick = a.instance();
    sick.healthy = false;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![
            Route::new("sick.test", vec![sick]),
            Route::new("none.test", vec![]),
        ],
    )
    .await;
    for host in ["sick.test", "none.test"] {
        let answer = get(p.http, host, "/", &[]).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{host}");
        assert!(answer.text().contains("no healthy instance"));
    }
    assert_eq!(a.hits(), 0);
    assert_eq!(p.proxy.snapshot().routes[0].unavailable, 1);

    // The same client connection sees the next table.
    let client = client();
    let before = send(&client, p.http, "GET", "sick.test", "/", &[], empty()).await;
    assert_eq!(before.status, StatusCode::SERVICE_UNAVAILABLE);
    p.proxy
        .set_routes(Routes {
            routes: vec![Route::new("sick.test", vec![a.instance()])],
        })
        .unwrap();
    let after = send(&client, p.http, "GET", "sick.test", "/", &[], empty()).await;
    assert_eq!(after.status, StatusCode::OK);
    let gone = send(&client, p.http, "GET", "none.test", "/", &[], empty()).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);

    // A table that does not check out changes nothing.
    let err = p
        .proxy
        .set_routes(Routes {
            routes: vec![Route::new("x", vec![]).at("nope")],
        })
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    assert_eq!(
        get(p.http, "sick.test", "/", &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_backend_sees_forwarded_headers_and_no_hop_by_hop_ones() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let answer = get(
        p.http,
        "a.test:81",
        "/",
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "gopher"),
            ("connection", "x-hop"),
            ("x-hop", "secret"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-kept", "yes"),
            // Would tell an instance that trusts them another client.
            ("forwarded", "for=192.0.2.1;proto=https;host=evil.test"),
            ("x-real-ip", "192.0.2.1"),
        ],
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.seen("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(answer.seen("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        answer.seen("x-forwarded-host").as_deref(),
        Some("a.test:81")
    );
    assert_eq!(answer.seen("host").as_deref(), Some("a.test:81"));
    assert_eq!(answer.seen("x-kept").as_deref(), Some("yes"));
    assert_eq!(answer.seen("x-hop"), None);
    assert_eq!(answer.seen("proxy-authorization"), None);
    assert_eq!(answer.seen("forwarded"), None);
    assert_eq!(answer.seen("x-real-ip"), None);

    let fresh = get(p.http, "a.test", "/", &[]).await;
    assert_eq!(fresh.seen("x-forwarded-for").as_deref(), Some("127.0.0.1"));
}

#[tokio::test]
async fn a_path_written_another_way_cannot_walk_around_a_prefix_with_auth() {
    // `/` open and `/admin` behind basic auth, on the same instance: a
    // backend that merges slashes or decodes `%61` or `%2F` (nginx does
    // all three), or reads `;x` as a parameter (Tomcat), would serve
    // `/admin/secret` for each of these.
    let site = Backend::start("site").await;
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let mut admin = Route::new("a.test", vec![site.instance()]).at("/admin");
    admin.strip_prefix = false;
    admin.auth = vec![phoenix_proxy::parse_htpasswd(&format!("alice:{hash}")).unwrap()];
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![site.instance()]), admin],
    )
    .await;
    for path in [
        "/admin/secret",
        "//admin/secret",
        "/admin//secret",
        "/%61dmin/secret",
        "/%61%64%6d%69%6e",
    ] {
        let a = get(p.http, "a.test", path, &[]).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    for path in [
        "/admin;x/secret",
        "/admin%2fsecret",
        "/%2Fadmin/secret",
        "/x/..%2fadmin/secret",
        "/x%2f..%2fadmin/secret",
        "/%2e%2e/admin/secret",
        "/admin%3bx/secret",
        "/%2561dmin/secret",
    ] {
        let a = get(p.http, "a.test", path, &[]).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path}: {}", a.text());
    }
    assert_eq!(site.hits(), 0);
    // The instance gets the path in the form it was routed by; a
    // parameter outside a prefix stays.
    for (sent, seen) in [
        ("/a//b/%7euser?q=%2F", "/a/b/~user?q=%2F"),
        ("/page;jsessionid=1", "/page;jsessionid=1"),
        ("/caf%c3%a9", "/caf%C3%A9"),
    ] {
        let a = get(p.http, "a.test", sent, &[]).await;
        assert_eq!(
            (a.status, a.path()),
            (StatusCode::OK, seen.to_owned()),
            "{sent}"
        );
    }
}

#[tokio::test]
async fn basic_auth_401_then_200_and_the_credentials_stay_at_the_proxy() {
    let a = Backend::start("a").await;
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let mut route = Route::new("a.test", vec![a.instance()]);
    route.auth = vec![phoenix_proxy::parse_htpasswd(&format!("alice:{hash}")).unwrap()];
    let p = start_proxy(
        ProxyConfig::default(),
        vec![route, Route::new("open.test", vec![a.instance()])],
    )
    .await;
    let basic = |user: &str, pass: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    };

    let missing = get(p.http, "a.test", "/", &[]).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.headers["www-authenticate"],
        "Basic realm=\"a.test\", charset=\"UTF-8\""
    );
    let wrong = get(
        p.http,
        "a.test",
        "/",
        &[("authorization", &basic("alice", "nope"))],
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let stranger = get(
        p.http,
        "a.test",
        "/",
        &[("authorization", &basic("bob", "s3cret"))],
    )
    .await;
    assert_eq!(stranger.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.hits(), 0);

    for _ in 0..2 {
        let ok = get(
            p.http,
            "a.test",
            "/",
            &[("authorization", &basic("alice", "s3cret"))],
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(ok.seen("authorization"), None);
    }
    // A route without auth passes the header on untouched.
    let open = get(p.http, "open.test", "/", &[("authorization", "Bearer t")]).await;
    assert_eq!(open.seen("authorization").as_deref(), Some("Bearer t"));
    assert_eq!(p.proxy.snapshot().routes[0].unauthorized, 3);
}

#[tokio::test]
async fn a_slow_backend_is_504_after_the_response_timeout() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig {
            backend_response_timeout: std::time::Duration::from_millis(300),
            ..ProxyConfig::default()
        },
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let started = std::time::Instant::now();
    let answer = get(p.http, "a.test", "/slow", &[]).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < std::time::Duration::from_millis(1500));
    let snapshot = p.proxy.snapshot();
    assert_eq!(snapshot.routes[0].timeouts, 1);
    assert_eq!(snapshot.routes[0].instances[0].failures, 1);
}

#[tokio::test]
async fn garbage_gets_400_and_the_connection_closes() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let answer = raw(
        p.http,
        b"\x16\x03\x01 this is not http\r\n\r\n",
        std::time::Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let no_host = raw(
        p.http,
        b"GET / HTTP/1.0\r\n\r\n",
        std::time::Duration::from_secs(5),
    )
    .await;
    assert!(
        no_host.starts_with("HTTP/1.") && no_host.contains(" 400 "),
        "{no_host:?}"
    );
    assert_eq!(get(p.http, "a.test", "/", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn serialized_tables_use_the_defaults() {
    let json = r#"{"routes":[{"host":"a.test","instances":[{"id":"a","addr":"[::1]:80"}]}]}"#;
    let routes: Routes = serde_json::from_str(json).unwrap();
    let route = &routes.routes[0];
    assert_eq!(route.path_prefix, "/");
    assert!(route.strip_prefix);
    assert!(route.auth.is_empty());
    assert_eq!(
        route.instances[0],
        Instance::new("a", "[::1]:80".parse().unwrap())
    );
}

#[tokio::test]
async fn instances_at_ipv6_addresses_are_reached() {
    // Services live at IPv6 addresses on the overlay; ::1 stands in.
    let Some(six) = Backend::start_at("six", "[::1]:0").await else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("six.test", vec![six.instance()])],
    )
    .await;
    let answer = get(p.http, "six.test", "/v6", &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        (answer.backend(), answer.path()),
        ("six".into(), "/v6".into())
    );
}
