//! `/_phoenix/` requests for the master (`Proxy::hooks`): handed to its
//! handler on any host once one is set, routed as usual before.

use std::sync::{Arc, Mutex};

use http::StatusCode;
use phoenix_proxy::{HookResponse, MAX_HOOK_BODY, ProxyConfig, Route};

use crate::common::*;

/// What the handler saw of a request: method, path, signature, body.
type Seen = (String, String, String, Vec<u8>);

#[tokio::test]
async fn hook_requests_go_to_the_handler_on_any_host_once_one_is_set() {
    let site = Backend::start("site").await;
    let p = start_proxy(
        ProxyConfig::default(),
        vec![Route::new("a.test", vec![site.instance()])],
    )
    .await;
    let c = client();
    let post = |host: &'static str, path: &'static str, body: Vec<u8>| {
        let c = c.clone();
        let addr = p.http;
        async move {
            send(
                &c,
                addr,
                "POST",
                host,
                path,
                &[("x-hub-signature-256", "sha256=00")],
                full(body),
            )
            .await
        }
    };

    // No handler: the path is the services' like any other.
    let before = post("a.test", "/_phoenix/git/conf", b"{}".to_vec()).await;
    assert_eq!(before.backend(), "site");

    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    p.proxy.hooks().set_handler(move |req| {
        let signature = String::from_utf8_lossy(req.header("X-Hub-Signature-256").unwrap_or(b""));
        log.lock().unwrap().push((
            req.method.to_owned(),
            req.path.to_owned(),
            signature.into_owned(),
            req.body.to_vec(),
        ));
        HookResponse {
            status: 202,
            text: "looking\n".into(),
        }
    });
    let a = post("a.test", "/_phoenix/git/conf?x=1", b"{\"ref\":1}".to_vec()).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    assert_eq!(a.text(), "looking\n");
    // Any host, known to the routes or not.
    let b = post("nowhere.test", "/_phoenix/git/other", Vec::new()).await;
    assert_eq!(b.status, StatusCode::ACCEPTED);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (
                "POST".to_owned(),
                "git/conf".to_owned(),
                "sha256=00".to_owned(),
                b"{\"ref\":1}".to_vec()
            ),
            (
                "POST".to_owned(),
                "git/other".to_owned(),
                "sha256=00".to_owned(),
                Vec::new()
            ),
        ]
    );

    // Only POST, and bodies up to the limit; the handler is not asked.
    let g = get(p.http, "a.test", "/_phoenix/git/conf", &[]).await;
    assert_eq!(g.status, StatusCode::METHOD_NOT_ALLOWED);
    let big = post(
        "a.test",
        "/_phoenix/git/conf",
        vec![b'x'; MAX_HOOK_BODY + 1],
    )
    .await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(seen.lock().unwrap().len(), 2);

    // Everything else is routed as before.
    let other = get(p.http, "a.test", "/_phoenixx", &[]).await;
    assert_eq!(other.backend(), "site");
    assert_eq!(site.hits(), 2);
}
