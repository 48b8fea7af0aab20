//! One request: ACME challenges and redirects on plain HTTP, routing,
//! basic auth, picking an instance, forwarding (with one retry on another
//! instance of an idempotent request that got no answer), upgrades.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::Inner;
use crate::balance::{Outstanding, pick};
use crate::body::{Body, Guarded, Sent, empty, full};
use crate::phase::Phase;
use crate::pool::PooledBody;
use crate::routes::{Lookup, RouteEntry, has_dot_segment, normalize_host, strip};
use crate::server::Conn;
use crate::stats::RouteCounters;

const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1);
/// `Connection` first.
const HOPS: usize = 9;
static HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serves one request from a client connection.
pub(crate) async fn handle(
    inner: &Arc<Inner>,
    conn: &Arc<Conn>,
    request: Request<Incoming>,
) -> Response<Guarded> {
    let active = conn.begin();
    if active.over_limit() {
        let mut response = plain(
            StatusCode::TOO_MANY_REQUESTS,
            "phoenix: too many requests in flight from this address\n",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response.map(|body| Guarded::new(body, None, active));
    }
    let (response, outstanding) = route(inner, conn, request).await;
    response.map(|body| Guarded::new(body, outstanding, active))
}

async fn route(
    inner: &Arc<Inner>,
    conn: &Arc<Conn>,
    request: Request<Incoming>,
) -> (Response<Body>, Option<Outstanding>) {
    // The host as the client gave it: the URI's authority (HTTP/2, or an
    // absolute-form HTTP/1 target), else the Host header.
    let raw_host = match request.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => request.headers().get(header::HOST).cloned(),
    };
    let Some(raw_host) = raw_host else {
        return (
            plain(
                StatusCode::BAD_REQUEST,
                "phoenix: the request names no host\n",
            ),
            None,
        );
    };
    let Some(host) = raw_host.to_str().ok().and_then(normalize_host) else {
        return (
            plain(
                StatusCode::BAD_REQUEST,
                "phoenix: the request's host is not valid\n",
            ),
            None,
        );
    };
    if request.method() == Method::CONNECT {
        return (
            plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "phoenix: CONNECT is not served\n",
            ),
            None,
        );
    }
    let path = request.uri().path();
    if !path.starts_with('/') {
        return (
            plain(
                StatusCode::BAD_REQUEST,
                "phoenix: the request's path is not valid\n",
            ),
            None,
        );
    }

    // Requests for the master (a git push webhook), on both listeners.
    if inner.hooks.takes(path) {
        let limit = inner.config.header_read_timeout;
        return (inner.hooks.serve(request, limit).await, None);
    }
    if !conn.tls {
        if let Some(token) = path.strip_prefix(ACME_PREFIX) {
            return (acme(inner, token), None);
        }
        if inner.certs.contains(&host) {
            return (redirect(inner, &host, request.uri()), None);
        }
    }

    if has_dot_segment(path) {
        return (
            plain(
                StatusCode::BAD_REQUEST,
                "phoenix: the path holds a '.' or '..' segment\n",
            ),
            None,
        );
    }

    let entry = {
        let table = inner.table.load();
        match table.lookup(&host, path) {
            Lookup::Found(entry) => entry.clone(),
            Lookup::UnknownHost => {
                return (
                    plain(
                        StatusCode::NOT_FOUND,
                        "phoenix: no service is published at this host\n",
                    ),
                    None,
                );
            }
            Lookup::NoPrefix => {
                return (
                    plain(
                        StatusCode::NOT_FOUND,
                        "phoenix: no service is published at this path\n",
                    ),
                    None,
                );
            }
        }
    };
    RouteCounters::bump(&entry.counters.requests);

    if !entry.auth.is_empty()
        && !inner
            .auth
            .check(&entry.auth, request.headers().get(header::AUTHORIZATION))
            .await
    {
        RouteCounters::bump(&entry.counters.unauthorized);
        let mut response = plain(
            StatusCode::UNAUTHORIZED,
            "phoenix: authentication required\n",
        );
        let challenge = format!("Basic realm=\"{host}\", charset=\"UTF-8\"");
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        return (response, None);
    }

    forward(inner, conn, &entry, raw_host, request).await
}

/// `GET /.well-known/acme-challenge/TOKEN` from the shared map.
fn acme(inner: &Inner, token: &str) -> Response<Body> {
    match inner.challenges.get(token) {
        Some(key_authorization) => {
            let mut response = Response::new(full(key_authorization));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        None => plain(StatusCode::NOT_FOUND, "phoenix: no such challenge\n"),
    }
}

/// 308 to the same host and path over HTTPS (method and body kept).
fn redirect(inner: &Inner, host: &str, uri: &Uri) -> Response<Body> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = match inner.config.https_port {
        443 => format!("https://{host}{path}"),
        port => format!("https://{host}:{port}{path}"),
    };
    let mut response = plain(StatusCode::PERMANENT_REDIRECT, "phoenix: use https\n");
    match HeaderValue::from_str(&location) {
        Ok(value) => {
            response.headers_mut().insert(header::LOCATION, value);
            response
        }
        Err(_) => plain(
            StatusCode::BAD_REQUEST,
            "phoenix: the request's path is not valid\n",
        ),
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols; the `Upgrade`
/// value to pass on if so. Not `h2c`: an instance that took it would
/// turn the connection into an HTTP/2 tunnel, and the requests after the
/// first would reach the service without the proxy's basic auth check or
/// its `X-Forwarded-For` ("h2c smuggling"); such a request goes on as a
/// plain one.
fn upgrade_of(request: &Request<Incoming>, present: &Present) -> Option<HeaderValue> {
    if request.version() != Version::HTTP_11 || !(present.has(CONNECTION) && present.has(UPGRADE)) {
        return None;
    }
    let wants = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    let upgrade = request.headers().get(header::UPGRADE)?;
    let h2c = upgrade.to_str().map_or(true, |v| {
        v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c"))
    });
    (!h2c).then(|| upgrade.clone())
}

// Indices of the names `Present` looks for: the hop-by-hop ones first, as
// in `HOP_BY_HOP`, then two more that a request is looked at for.
const CONNECTION: usize = 0;
const TRANSFER_ENCODING: usize = 7;
const UPGRADE: usize = 8;
const EXPECT: usize = HOPS;
const FORWARDED_FOR: usize = HOPS + 1;

/// Where `name` is among the names `Present` looks for, if it is one: a
/// match on the lowercase name, which costs a length test and at most a
/// short compare.
fn name_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => CONNECTION,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => TRANSFER_ENCODING,
        "upgrade" => UPGRADE,
        "expect" => EXPECT,
        "x-forwarded-for" => FORWARDED_FOR,
        _ => return None,
    })
}

/// Which of the names the proxy acts on a header map holds, found by one
/// pass over its names. Every lookup or removal in a `HeaderMap` hashes
/// the name; most requests and responses hold none of these names or one
/// (`Connection`), so looking first and then touching only those present
/// saves a dozen hashes a request.
#[derive(Clone, Copy, Debug, Default)]
struct Present([bool; HOPS + 2]);

impl Present {
    fn of(headers: &HeaderMap) -> Present {
        let mut present = Present::default();
        for name in headers.keys() {
            if let Some(i) = name_index(name) {
                present.0[i] = true;
            }
        }
        present
    }

    fn has(&self, index: usize) -> bool {
        self.0[index]
    }
}

/// Removes hop-by-hop headers, also those the `Connection` header names;
/// `present` is what [`Present::of`] found in `headers`.
fn strip_hop_by_hop(headers: &mut HeaderMap, present: &Present) {
    if !present.0[..HOPS].contains(&true) {
        return;
    }
    // `keep-alive` and `close`, the usual tokens, name nothing that the
    // loop below does not remove anyway: skipped, so that the common case
    // allocates nothing (and a value that is just one of them is not even
    // split).
    let usual = |v: &HeaderValue| {
        v.as_bytes().eq_ignore_ascii_case(b"keep-alive")
            || v.as_bytes().eq_ignore_ascii_case(b"close")
    };
    if present.has(CONNECTION) && !headers.get_all(header::CONNECTION).iter().all(usual) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|token| {
                !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close")
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, &present) in HOP_BY_HOP.iter().zip(&present.0[..HOPS]) {
        if present {
            headers.remove(name);
        }
    }
}

/// [`strip_hop_by_hop`] for headers not looked over yet.
fn strip_all_hop_by_hop(headers: &mut HeaderMap) {
    let present = Present::of(headers);
    strip_hop_by_hop(headers, &present);
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

async fn forward(
    inner: &Arc<Inner>,
    conn: &Arc<Conn>,
    entry: &Arc<RouteEntry>,
    raw_host: HeaderValue,
    mut request: Request<Incoming>,
) -> (Response<Body>, Option<Outstanding>) {
    let present = Present::of(request.headers());
    let upgrade = upgrade_of(&request, &present);
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();

    // The origin form (path and query) the instance gets.
    let uri = if entry.strip_prefix {
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        match Uri::try_from(strip(&entry.prefix, path_and_query)) {
            Ok(uri) => uri,
            Err(_) => {
                return (
                    plain(
                        StatusCode::BAD_REQUEST,
                        "phoenix: the request's path is not valid\n",
                    ),
                    None,
                );
            }
        }
    } else if parts.uri.scheme().is_none() && parts.uri.authority().is_none() {
        // HTTP/1's usual origin form: as it came (a cheap clone).
        parts.uri.clone()
    } else {
        Uri::from(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        )
    };

    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, &present);
    if present.has(EXPECT) {
        headers.remove(header::EXPECT);
    }
    if !entry.auth.is_empty() {
        // The credentials were for the proxy; the service never set them.
        headers.remove(header::AUTHORIZATION);
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
    if present.has(FORWARDED_FOR) {
        let mut forwarded_for = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        if !forwarded_for.is_empty() {
            forwarded_for.push_str(", ");
        }
        forwarded_for.push_str(&conn.peer.ip().to_string());
        if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
            headers.insert(X_FORWARDED_FOR, value);
        }
    } else {
        headers.insert(X_FORWARDED_FOR, conn.peer_ip.clone());
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    headers.insert(X_FORWARDED_HOST, raw_host.clone());
    headers.insert(header::HOST, raw_host);

    // A request may be sent again to another instance only when it is
    // idempotent and has no body (nothing of the client's was consumed).
    let replayable = is_idempotent(&parts.method) && hyper::body::Body::is_end_stream(&body);
    let mut body = Some(body);
    let mut tried: Vec<Arc<crate::balance::InstanceState>> = Vec::new();
    // Why the last instance tried gave no answer, for the 502.
    let mut failure = "phoenix: no instance could be reached\n";
    loop {
        let now_ms = inner.now_ms();
        let Some(outstanding) = pick(&entry.backends, &tried, now_ms, || inner.random.next())
        else {
            if tried.is_empty() {
                RouteCounters::bump(&entry.counters.unavailable);
                return (
                    plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "phoenix: no healthy instance\n",
                    ),
                    None,
                );
            }
            RouteCounters::bump(&entry.counters.bad_gateway);
            return (plain(StatusCode::BAD_GATEWAY, failure), None);
        };
        let instance = outstanding.state().clone();
        let (request_body, sent) = match body.take() {
            // Nothing to send (a GET): no box, no channel.
            Some(body) if hyper::body::Body::is_end_stream(&body) => (empty(), None),
            Some(body) => {
                let (body, sent) = Sent::new(body.map_err(Into::into));
                (body.boxed_unsync(), sent)
            }
            None => (empty(), None),
        };
        let mut backend_request = Request::new(request_body);
        *backend_request.method_mut() = parts.method.clone();
        *backend_request.uri_mut() = uri.clone();
        *backend_request.version_mut() = Version::HTTP_11;
        // Kept for a second attempt only when there can be one.
        *backend_request.headers_mut() =
            if replayable && tried.is_empty() && entry.backends.len() > 1 {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };

        let timeout = inner.config.backend_response_timeout;
        let sending = crate::pool::send(&inner.pool, &instance, backend_request);
        let deadline = async {
            // The response timeout counts once the request body is sent.
            if let Some(sent) = sent {
                let _ = sent.await;
            }
            tokio::time::sleep(timeout).await;
        };
        let result = tokio::select! {
            result = sending => Some(result),
            () = deadline => None,
        };
        match result {
            Some(Ok((response, sender))) => {
                instance.succeeded();
                return respond(inner, conn, response, sender, outstanding, client_upgrade);
            }
            Some(Err(e)) => {
                // A connect that failed marks the instance down for a while;
                // a connection that broke before any answer (the instance
                // died with the request in flight, or closed a pooled
                // connection) only counts. Either way an idempotent request
                // without a body goes once to another instance, as nginx's
                // `proxy_next_upstream error` does.
                let connect = e.is_connect();
                if connect {
                    instance.connect_failed(
                        now_ms,
                        inner.config.mark_down_min,
                        inner.config.mark_down_max,
                    );
                } else {
                    instance.request_failed();
                }
                tracing::debug!(instance = %instance.addr, id = %instance.id, error = %e, connect, "proxy: request failed");
                drop(outstanding);
                tried.push(instance);
                failure = if connect {
                    "phoenix: no instance could be reached\n"
                } else {
                    "phoenix: the instance failed to answer\n"
                };
                if replayable && tried.len() < 2 {
                    continue;
                }
                RouteCounters::bump(&entry.counters.bad_gateway);
                return (plain(StatusCode::BAD_GATEWAY, failure), None);
            }
            None => {
                instance.request_failed();
                tracing::debug!(instance = %instance.addr, id = %instance.id, "proxy: response timed out");
                RouteCounters::bump(&entry.counters.timeouts);
                return (
                    plain(
                        StatusCode::GATEWAY_TIMEOUT,
                        "phoenix: the instance did not answer in time\n",
                    ),
                    None,
                );
            }
        }
    }
}

/// Passes the instance's response on; a 101 to an upgrade request becomes
/// a tunnel between the two upgraded connections.
fn respond(
    inner: &Arc<Inner>,
    conn: &Arc<Conn>,
    mut response: Response<Incoming>,
    sender: hyper::client::conn::http1::SendRequest<Body>,
    outstanding: Outstanding,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> (Response<Body>, Option<Outstanding>) {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            // A 101 nobody asked for cannot be passed on.
            return (
                plain(
                    StatusCode::BAD_GATEWAY,
                    "phoenix: the instance switched protocols unasked\n",
                ),
                None,
            );
        };
        let backend_upgrade = hyper::upgrade::on(&mut response);
        let upgrade = response.headers().get(header::UPGRADE).cloned();
        let (mut parts, _) = response.into_parts();
        strip_all_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(upgrade) = upgrade {
            parts.headers.insert(header::UPGRADE, upgrade);
        }
        tunnel(
            inner.clone(),
            conn.clone(),
            client_upgrade,
            backend_upgrade,
            outstanding,
        );
        return (Response::from_parts(parts, empty()), None);
    }
    let (mut parts, body) = response.into_parts();
    let present = Present::of(&parts.headers);
    if present.has(TRANSFER_ENCODING) {
        // The body was read by its Transfer-Encoding, which wins over a
        // Content-Length sent with it (RFC 9112 §6.3); passed on, that
        // length would promise the client another size than it gets.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers, &present);
    let body = PooledBody::new(
        body,
        sender,
        outstanding.state().clone(),
        inner.pool.max_idle,
    );
    (
        Response::from_parts(parts, body.map_err(Into::into).boxed_unsync()),
        Some(outstanding),
    )
}

/// Copies both ways between the client's and the instance's upgraded
/// connections until either side closes or the proxy stops. The request
/// stays outstanding on its instance (and the client's connection slot
/// taken) while the tunnel is open.
fn tunnel(
    inner: Arc<Inner>,
    conn: Arc<Conn>,
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    outstanding: Outstanding,
) {
    tokio::spawn(async move {
        let (client, backend) = match tokio::join!(client, backend) {
            (Ok(client), Ok(backend)) => (client, backend),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(peer = %conn.peer, error = %e, "proxy: upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut backend = TokioIo::new(backend);
        tokio::select! {
            result = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
                if let Err(e) = result {
                    tracing::debug!(peer = %conn.peer, error = %e, "proxy: tunnel ended");
                }
            }
            () = inner.phase.reached(Phase::Stopped) => {}
        }
        drop(outstanding);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_index_finds_each_name_and_nothing_else() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(name_index(name), Some(i), "{name}");
        }
        assert_eq!(name_index(&header::CONNECTION), Some(CONNECTION));
        assert_eq!(name_index(&header::UPGRADE), Some(UPGRADE));
        assert_eq!(name_index(&header::EXPECT), Some(EXPECT));
        assert_eq!(name_index(&X_FORWARDED_FOR), Some(FORWARDED_FOR));
        for other in ["host", "x-forwarded-host", "connections", "tE-x", "keep"] {
            let name = HeaderName::from_bytes(other.as_bytes()).unwrap();
            assert_eq!(name_index(&name), None, "{other}");
        }
    }

    #[test]
    fn hop_by_hop_headers_go_also_those_connection_names() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_all_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }
}
