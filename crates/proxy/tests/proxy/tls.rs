//! HTTPS with certificates set at runtime, HTTP/2 by ALPN, redirects and
//! ACME challenges on plain HTTP.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_proxy::{ProxyConfig, Route};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::common::*;

struct SelfSigned {
    chain_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn self_signed(host: &str) -> SelfSigned {
    let made = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
    SelfSigned {
        chain_pem: made.cert.pem(),
        key_pem: made.signing_key.serialize_pem(),
        der: made.cert.der().clone(),
    }
}

/// A TLS connection to the proxy for `host`, trusting `cert`, offering
/// `alpn`.
async fn connect(
    addr: std::net::SocketAddr,
    host: &str,
    cert: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await
}

#[tokio::test]
async fn https_with_a_runtime_certificate_over_http2_and_http1() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let cert = self_signed("a.test");

    // No certificate yet: the handshake fails.
    assert!(
        connect(p.https, "a.test", &cert.der, &[b"h2"])
            .await
            .is_err()
    );

    p.proxy
        .certs()
        .set("a.test", cert.chain_pem.as_bytes(), cert.key_pem.as_bytes())
        .unwrap();

    // HTTP/2, chosen by ALPN.
    let tls = connect(p.https, "a.test", &cert.der, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for path in ["/one", "/two"] {
        let request = Request::get(format!("https://a.test{path}"))
            .body(empty())
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), Version::HTTP_2);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["path"], path);
        assert_eq!(json["headers"]["x-forwarded-proto"][0], "https");
        assert_eq!(json["headers"]["host"][0], "a.test");
    }

    // HTTP/1.1 over TLS.
    let tls = connect(p.https, "a.test", &cert.der, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/x")
        .header("host", "a.test")
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_11);

    // Another name is refused: no certificate for it.
    assert!(
        connect(p.https, "b.test", &self_signed("b.test").der, &[b"h2"])
            .await
            .is_err()
    );
    assert_eq!(p.proxy.snapshot().certificates, vec!["a.test"]);
}

#[tokio::test]
async fn http_redirects_hosts_with_a_certificate_and_serves_the_others() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![
            Route::new("secure.test", vec![a.instance()]),
            Route::new("plain.test", vec![a.instance()]),
        ],
    )
    .await;
    let cert = self_signed("secure.test");
    p.proxy
        .certs()
        .set(
            "secure.test",
            cert.chain_pem.as_bytes(),
            cert.key_pem.as_bytes(),
        )
        .unwrap();

    let redirected = get(p.http, "Secure.test:80", "/a/b?c=d", &[]).await;
    assert_eq!(redirected.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        redirected.headers["location"],
        format!("https://secure.test:{}/a/b?c=d", p.https.port())
    );
    assert_eq!(a.hits(), 0);

    let served = get(p.http, "plain.test", "/a", &[]).await;
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(served.seen("x-forwarded-proto").as_deref(), Some("http"));

    // Once the certificate is gone, plain HTTP is served again.
    p.proxy.certs().remove("secure.test");
    assert_eq!(
        get(p.http, "secure.test", "/", &[]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn acme_challenges_are_answered_over_http_for_any_host() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let cert = self_signed("a.test");
    p.proxy
        .certs()
        .set("a.test", cert.chain_pem.as_bytes(), cert.key_pem.as_bytes())
        .unwrap();
    let challenges = p.proxy.challenges();
    challenges.set("tok-1", "tok-1.thumbprint");
    for host in ["a.test", "new.test"] {
        let answer = get(p.http, host, "/.well-known/acme-challenge/tok-1", &[]).await;
        assert_eq!(answer.status, StatusCode::OK, "{host}");
        assert_eq!(answer.text(), "tok-1.thumbprint");
    }
    let missing = get(p.http, "a.test", "/.well-known/acme-challenge/other", &[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    challenges.remove("tok-1");
    let gone = get(p.http, "new.test", "/.well-known/acme-challenge/tok-1", &[]).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    // A source function (the ACME crate's own map) answers too.
    challenges.set_source(|token| (token == "tok-2").then(|| "tok-2.thumbprint".to_owned()));
    let sourced = get(p.http, "a.test", "/.well-known/acme-challenge/tok-2", &[]).await;
    assert_eq!(sourced.text(), "tok-2.thumbprint");
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn hook_requests_are_answered_over_https_and_not_redirected_over_http() {
    let a = Backend::start("a").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![a.instance()])],
    )
    .await;
    let cert = self_signed("a.test");
    p.proxy
        .certs()
        .set("a.test", cert.chain_pem.as_bytes(), cert.key_pem.as_bytes())
        .unwrap();
    p.proxy
        .hooks()
        .set_handler(|req| phoenix_proxy::HookResponse {
            status: 202,
            text: format!("{} {} {}\n", req.method, req.path, req.body.len()),
        });

    let tls = connect(p.https, "a.test", &cert.der, &[b"http/1.1"])
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::post("/_phoenix/git/conf")
        .header("host", "a.test")
        .body(full("{}"))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"POST git/conf 2\n");

    // Plain HTTP for a host with a certificate: answered, not redirected
    // (a git host's webhook does not follow a redirect of a POST).
    let plain = send(
        &client(),
        p.http,
        "POST",
        "a.test",
        "/_phoenix/git/conf",
        &[],
        full("{}"),
    )
    .await;
    assert_eq!(plain.status, StatusCode::ACCEPTED);
    let other = get(p.http, "a.test", "/x", &[]).await;
    assert_eq!(other.status, StatusCode::PERMANENT_REDIRECT);
}
