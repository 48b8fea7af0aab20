//! Requests for the master itself: `/_phoenix/...` on any host, over HTTP
//! and HTTPS (such as a git host's push webhook, `POST /_phoenix/git/NAME`).
//!
//! The proxy only intercepts them while a handler is set
//! ([`Hooks::set_handler`]); it reads the body (up to [`MAX_HOOK_BODY`])
//! and hands the path, the headers and the body to the handler, which
//! answers with a status. Nothing else of the proxy changes.
//!
//! Unlike a proxied body, which streams, a hook body is held whole in
//! memory until the handler has run, and anyone can send one. So a body
//! must arrive within a time limit (the caller's, the header timeout: 408
//! after it), and at most [`MAX_HOOK_READS`] are read at once over all
//! shards (503 beyond): clients that stop one byte short of 1 MiB hold at
//! most that many MiB, for that long.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::sync::Semaphore;

use crate::body::{Body, full};

/// The path prefix the proxy hands to the hooks' handler.
pub const HOOK_PREFIX: &str = "/_phoenix/";
/// The largest body a hook request may have (413 beyond).
pub const MAX_HOOK_BODY: usize = 1024 * 1024;
/// Hook requests whose bodies are read at once (503 beyond).
pub const MAX_HOOK_READS: usize = 16;

/// One request for the master, as its handler sees it.
#[derive(Debug)]
pub struct HookRequest<'a> {
    pub method: &'a str,
    /// The path after [`HOOK_PREFIX`] (`git/NAME`), without the query.
    pub path: &'a str,
    headers: &'a HeaderMap,
    pub body: &'a [u8],
}

impl HookRequest<'_> {
    /// A header's value (the first one), by name in any case.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name).map(|v| v.as_bytes())
    }
}

/// The handler's answer: a status and a short text for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookResponse {
    pub status: u16,
    pub text: String,
}

type Handler = Box<dyn Fn(&HookRequest<'_>) -> HookResponse + Send + Sync>;

/// The handler of `/_phoenix/` requests that every proxy of a
/// [`Shards`](crate::Shards) shares; none until set.
#[derive(Clone)]
pub struct Hooks {
    handler: Arc<ArcSwapOption<Handler>>,
    /// Bodies being read.
    reads: Arc<Semaphore>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            handler: Arc::default(),
            reads: Arc::new(Semaphore::new(MAX_HOOK_READS)),
        }
    }
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("handler", &self.handler.load().is_some())
            .finish()
    }
}

impl Hooks {
    /// Answers `/_phoenix/` requests with `handler` from now on (it runs on
    /// the proxy's threads: it must be quick and never block).
    pub fn set_handler(
        &self,
        handler: impl Fn(&HookRequest<'_>) -> HookResponse + Send + Sync + 'static,
    ) {
        let handler: Handler = Box::new(handler);
        self.handler.store(Some(Arc::new(handler)));
    }

    /// Whether `path` is one the proxy hands over (a handler is set).
    pub(crate) fn takes(&self, path: &str) -> bool {
        path.starts_with(HOOK_PREFIX) && self.handler.load().is_some()
    }

    /// Reads the request's body, for at most `limit`, and asks the
    /// handler.
    pub(crate) async fn serve(
        &self,
        request: hyper::Request<Incoming>,
        limit: std::time::Duration,
    ) -> Response<Body> {
        let Some(handler) = self.handler.load_full() else {
            return text(StatusCode::NOT_FOUND, "phoenix: not found\n".into());
        };
        let (parts, body) = request.into_parts();
        if parts.method != Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "phoenix: only POST is served here\n".into(),
            );
        }
        let Ok(_reading) = self.reads.try_acquire() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "phoenix: too many requests for the master at once; try again\n".into(),
            );
        };
        let read = tokio::time::timeout(limit, Limited::new(body, MAX_HOOK_BODY).collect());
        let Ok(read) = read.await else {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "phoenix: the body did not arrive in time\n".into(),
            );
        };
        let body: Bytes = match read {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("phoenix: the body is over {MAX_HOOK_BODY} bytes\n"),
                );
            }
            Err(_) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "phoenix: the body could not be read\n".into(),
                );
            }
        };
        let path = parts.uri.path();
        let answer = handler(&HookRequest {
            method: parts.method.as_str(),
            path: path.strip_prefix(HOOK_PREFIX).unwrap_or(path),
            headers: &parts.headers,
            body: &body,
        });
        let status =
            StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        text(status, answer.text)
    }
}

fn text(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
