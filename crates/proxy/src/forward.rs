//! One request: ACME challenges and redirects on plain HTTP, routing,
//! basic auth, picking an instance, forwarding (with one retry on another
//! instance of an idempotent request that got no answer), upgrades.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::BytesMut;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::Inner;
use crate::balance::{Outstanding, pick};
use crate::body::{Body, Guarded, empty, full};
use crate::h1::RequestHead;
use crate::headers::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, FORWARDED_FOR, Present, UPGRADE, X_FORWARDED_FOR,
    name_index, remove_connection_named,
};
use crate::phase::Phase;
use crate::pool::{Exchange, Outgoing, SendError, Stalled};
use crate::routes::{
    Lookup, RouteEntry, clean_path, normalize_host, prefix_matches, strip, without_params,
};
use crate::server::Conn;
use crate::stats::RouteCounters;

const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

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
    mut request: Request<Incoming>,
) -> (Response<Body>, Option<Outstanding>) {
    // Two Host headers: which one a backend believes is its own choice
    // (RFC 9112 section 3.2: 400).
    if request
        .headers()
        .get_all(header::HOST)
        .iter()
        .nth(1)
        .is_some()
    {
        return (
            plain(
                StatusCode::BAD_REQUEST,
                "phoenix: the request has more than one Host header\n",
            ),
            None,
        );
    }
    // A transfer coding besides `chunked` (`gzip, chunked`): the proxy
    // takes the chunks off and would pass the body on still compressed,
    // with nothing saying so (RFC 9112 section 6.1: 501).
    let codings = request.headers().get_all(header::TRANSFER_ENCODING);
    if codings.iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',')
                .any(|c| !c.trim().eq_ignore_ascii_case("chunked"))
        })
    }) {
        return (
            plain(
                StatusCode::NOT_IMPLEMENTED,
                "phoenix: only the chunked transfer coding is served\n",
            ),
            None,
        );
    }
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

    // Routing, authentication and the instance see one form of the path.
    let cleaned = match clean_path(path) {
        Ok(Cow::Borrowed(_)) => None,
        Ok(Cow::Owned(cleaned)) => Some(cleaned),
        Err(bad) => return (plain(StatusCode::BAD_REQUEST, bad.message()), None),
    };
    if let Some(cleaned) = cleaned {
        let uri = request.uri();
        let mut parts = uri.clone().into_parts();
        let path_and_query = match uri.query() {
            Some(query) => format!("{cleaned}?{query}"),
            None => cleaned,
        };
        let rebuilt = path_and_query.parse().ok().and_then(|p| {
            parts.path_and_query = Some(p);
            Uri::from_parts(parts).ok()
        });
        let Some(rebuilt) = rebuilt else {
            return (
                plain(
                    StatusCode::BAD_REQUEST,
                    "phoenix: the request's path is not valid\n",
                ),
                None,
            );
        };
        *request.uri_mut() = rebuilt;
    }
    let path = request.uri().path();

    let entry = {
        let table = inner.table.load();
        // Looked up as a backend that reads `;` as segment parameters
        // would see it, so `/admin;x/secret` finds `/admin`'s route; the
        // path itself must then be under that prefix too, or the
        // parameter sits inside it and the request is refused.
        let view = without_params(path);
        let has_params = matches!(view, Cow::Owned(_));
        match table.lookup(&host, &view) {
            Lookup::Found(entry) if has_params && !prefix_matches(&entry.prefix, path) => {
                return (
                    plain(
                        StatusCode::BAD_REQUEST,
                        "phoenix: the path holds a ';' parameter inside the route's prefix\n",
                    ),
                    None,
                );
            }
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
    let (mut parts, body) = request.into_parts();

    // The origin form (path and query) the instance gets. The path was
    // checked when the request was parsed; taking off a prefix leaves a
    // valid one.
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let rooted;
    let path_and_query = if path_and_query.starts_with('/') {
        path_and_query
    } else {
        // `http://host?q` and an HTTP/2 `:path` of `?q`: the path is `/`.
        rooted = format!("/{path_and_query}");
        rooted.as_str()
    };
    let stripped;
    let target = if entry.strip_prefix {
        stripped = strip(&entry.prefix, path_and_query);
        stripped.as_str()
    } else {
        path_and_query
    };

    // The head, in one pass over the client's headers: the proxy's own
    // names and the hop-by-hop ones are left out (also those `Connection`
    // names), the rest go as they came.
    remove_connection_named(&mut parts.headers, &present);
    let mut head = RequestHead::new(&parts.method, target);
    head.header("host", raw_host.as_bytes());
    let mut after_cookie = false;
    for (name, value) in &parts.headers {
        if let Some(i) = name_index(name)
            // The credentials were for the proxy; the service never set them.
            && (i != AUTHORIZATION || !entry.auth.is_empty())
        {
            after_cookie = false;
            continue;
        }
        if name == header::COOKIE {
            if after_cookie {
                head.extend_last(b"; ", value.as_bytes());
                continue;
            }
            after_cookie = true;
        } else {
            after_cookie = false;
        }
        head.header(name.as_str(), value.as_bytes());
    }
    if let Some(upgrade) = &upgrade {
        head.header("connection", b"upgrade");
        head.header("upgrade", upgrade.as_bytes());
    }
    if present.has(FORWARDED_FOR) {
        let mut forwarded_for = parts
            .headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        if !forwarded_for.is_empty() {
            forwarded_for.push_str(", ");
        }
        forwarded_for.push_str(&conn.peer.ip().to_string());
        head.header("x-forwarded-for", forwarded_for.as_bytes());
    } else {
        head.header("x-forwarded-for", conn.peer_ip.as_bytes());
    }
    head.header(
        "x-forwarded-proto",
        if conn.tls { b"https" } else { b"http" },
    );
    head.header("x-forwarded-host", raw_host.as_bytes());
    // Where the instance is mounted, so it can write links that work
    // through the proxy (a client's own value is never passed on: it
    // would let the client choose the links an instance writes).
    if entry.strip_prefix && entry.prefix != "/" {
        head.header("x-forwarded-prefix", entry.prefix.as_bytes());
    }
    // The body's framing is the proxy's: its length when known (HTTP/1
    // with Content-Length, HTTP/2 with content-length), else chunked.
    let (body, chunked) = if hyper::body::Body::is_end_stream(&body) {
        if present.has(CONTENT_LENGTH) {
            head.header("content-length", b"0");
        }
        (None, false)
    } else if let Some(length) = hyper::body::Body::size_hint(&body).exact() {
        head.header("content-length", length.to_string().as_bytes());
        (Some(body), false)
    } else {
        head.header("transfer-encoding", b"chunked");
        (Some(body), true)
    };
    let head = head.finish();
    let head_request = parts.method == Method::HEAD;

    // A request may be sent again to another instance only when it is
    // idempotent and has no body (nothing of the client's was consumed).
    let replayable = is_idempotent(&parts.method) && body.is_none();
    let mut body = body;
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
        let request = Outgoing {
            head: &head,
            head_request,
            body: body.take(),
            chunked,
        };
        match crate::pool::send(&inner.pool, &instance, request).await {
            Ok(exchange) => {
                instance.succeeded();
                return respond(inner, conn, exchange, outstanding, client_upgrade);
            }
            Err(SendError::Timeout) => {
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
            Err(SendError::ClientBody(e)) => {
                tracing::debug!(peer = %conn.peer, error = %e, "proxy: request body failed");
                if e.is::<Stalled>() {
                    return (
                        plain(
                            StatusCode::REQUEST_TIMEOUT,
                            "phoenix: the request body stalled\n",
                        ),
                        None,
                    );
                }
                return (
                    plain(
                        StatusCode::BAD_REQUEST,
                        "phoenix: the request body broke off\n",
                    ),
                    None,
                );
            }
            Err(e) => {
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
        }
    }
}

/// Passes the instance's response on; a 101 to an upgrade request becomes
/// a tunnel between the client's upgraded connection and the instance's.
fn respond(
    inner: &Arc<Inner>,
    conn: &Arc<Conn>,
    exchange: Exchange,
    outstanding: Outstanding,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> (Response<Body>, Option<Outstanding>) {
    if exchange.head.response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let response = exchange.into_response(outstanding.state().clone(), inner.pool.max_idle);
        return (response.map(BodyExt::boxed_unsync), Some(outstanding));
    }
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
    // An upgrade request has no body to send, nor a writer to wait for.
    drop(exchange.writer);
    let Some((stream, early)) = exchange.upstream.into_parts() else {
        return (
            plain(
                StatusCode::BAD_GATEWAY,
                "phoenix: the instance switched protocols mid-body\n",
            ),
            None,
        );
    };
    let mut response = exchange.head.response;
    // `h1` keeps a 101's `Upgrade` (and nothing else hop-by-hop).
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    tunnel(
        inner.clone(),
        conn.clone(),
        client_upgrade,
        stream,
        early,
        outstanding,
    );
    (response.map(|()| empty()), None)
}

/// Copies both ways between the client's upgraded connection and the
/// instance's (first what the instance sent after its 101, `early`) until
/// either side closes or the proxy stops. The request stays outstanding
/// on its instance (and the client's connection slot taken) while the
/// tunnel is open.
fn tunnel(
    inner: Arc<Inner>,
    conn: Arc<Conn>,
    client: hyper::upgrade::OnUpgrade,
    mut backend: TcpStream,
    early: BytesMut,
    outstanding: Outstanding,
) {
    tokio::spawn(async move {
        let mut client = match client.await {
            Ok(client) => TokioIo::new(client),
            Err(e) => {
                tracing::debug!(peer = %conn.peer, error = %e, "proxy: upgrade failed");
                return;
            }
        };
        tokio::select! {
            result = async {
                client.write_all(&early).await?;
                tokio::io::copy_bidirectional(&mut client, &mut backend).await
            } => {
                if let Err(e) = result {
                    tracing::debug!(peer = %conn.peer, error = %e, "proxy: tunnel ended");
                }
            }
            () = inner.phase.reached(Phase::Stopped) => {}
        }
        drop(outstanding);
    });
}
