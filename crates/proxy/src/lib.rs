//! Phoenix's HTTP and HTTPS reverse proxy and load balancer.
//!
//! The master serves HTTP (80) and HTTPS (443) on its public address and
//! sends each request to an instance of the service published at the
//! request's host and path, over the WireGuard overlay. This crate is that
//! proxy as a library: the master feeds it whole route tables and
//! certificates. The master runs it as [`Shards`]: N proxies on N threads,
//! each a current-thread tokio runtime with its own backend pools, all
//! accepting from the same listening sockets, fed as one (see `shards`
//! for why). A single
//! [`Proxy`] serves listeners on whatever runtime its caller runs.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use phoenix_proxy::{Instance, Proxy, ProxyConfig, Route, Routes};
//! let proxy = Proxy::new(ProxyConfig::default())?;
//! proxy.set_routes(Routes {
//!     routes: vec![Route::new("app.example.com", vec![
//!         Instance::new("app", "[fd38:dde8:32dd:1::7]:8000".parse()?),
//!     ])],
//! })?;
//! let http = tokio::net::TcpListener::bind("[::]:80").await?;
//! let https = tokio::net::TcpListener::bind("[::]:443").await?;
//! tokio::join!(proxy.serve_http(http), proxy.serve_https(https));
//! # Ok(()) }
//! ```
//!
//! # Design
//!
//! **Routes** ([`Routes`]): a request is matched by host (case-insensitive,
//! port ignored), then by the longest path prefix on a segment boundary.
//! The master pushes the whole table whenever its state changes
//! ([`Proxy::set_routes`]); it is checked, compiled and swapped in
//! atomically (`arc-swap`), so requests in flight and open connections are
//! untouched and every request sees one table or the next, never a mix.
//! Instance state (outstanding requests, counters, down marks) lives
//! outside the table, keyed by `(service, address)`, and carries over.
//!
//! **Balancing** (`balance`): power of two choices on outstanding
//! requests, over healthy, non-draining instances. P2C needs no shared
//! lock or scan, follows load as closely as least-outstanding, and unlike
//! it does not herd concurrent requests onto the one instance that looked
//! idle. Passive health: a failed connect marks the instance down for 1 s,
//! doubling to 5 s while it keeps failing, and an idempotent request
//! without a body that got no answer (the connect failed, or the
//! connection closed first) is retried once on another instance. Any
//! other request goes again only when it never left: its head could not
//! be written on a kept connection the instance had closed (`pool`).
//! Sending it again once it has reached an instance could run it twice.
//!
//! **Forwarding** (`forward`): HTTP/1.1 and HTTP/2 from clients (HTTP/2 by
//! ALPN on TLS, or prior knowledge on plain HTTP), HTTP/1.1 with pooled
//! keep-alive connections to instances, spoken by the client connection's
//! own task (`h1`, `pool`). Bodies stream both ways frame by
//! frame with backpressure; nothing is buffered whole, so a download, an
//! upload or server-sent events cost a connection's buffers, not their
//! size. `Upgrade` requests (WebSocket) get the instance's 101 and then a
//! byte tunnel; `Upgrade: h2c` is not passed on (it would tunnel requests
//! past the proxy), the request goes as a plain one. Hop-by-hop headers
//! are removed; `X-Forwarded-For` is appended to (its last entry is the
//! one the proxy vouches for: earlier ones are whatever the client sent),
//! `X-Forwarded-Proto` and `X-Forwarded-Host` set (and
//! `X-Forwarded-Prefix`, the prefix taken off, where one is; a client's
//! own is never passed on), `Host` kept as the client sent it. WebSockets
//! over HTTP/2 (extended CONNECT) are not
//! offered, so browsers open them over HTTP/1.1. A client's `Forwarded`
//! and `X-Real-IP` are dropped. A path is routed, authenticated and
//! forwarded in one form (`routes::clean_path`): encoded unreserved
//! characters decoded, `//` merged; `.`/`..` segments, encoded `/ \ NUL
//! ; % ? #` and a raw `\` are refused (400), and a path is looked up as a
//! backend that reads `;` as segment parameters would, so that neither
//! prefix routing nor authentication can be walked around by writing a
//! path another way (`//admin`, `/%61dmin`, `/admin;x`). Two `Host`
//! headers get 400, a transfer coding besides `chunked` 501.
//!
//! **TLS** ([`Certs`], [`Challenges`]): certificates by SNI from a map the
//! ACME code (or anyone) updates at runtime; ALPN offers h2 and http/1.1;
//! sessions resume by stateless tickets (one a handshake) whose key every
//! shard shares, so a reconnection resumes whichever shard it lands on.
//! rustls with the `ring` provider: pure Rust plus a little C and
//! assembly built by `cc`, which the workspace already builds for the
//! overlay; `aws-lc-rs` would add a CMake build for no gain here. The plain
//! HTTP listener answers ACME HTTP-01 challenges for any host, redirects
//! (308) hosts that have a certificate to HTTPS, and **proxies hosts that
//! have none over plain HTTP**: a service is reachable as soon as it is
//! published, the first certificate needs the HTTP listener to work
//! anyway, and once the certificate arrives the redirect starts by itself.
//! A host that must never be served in clear should not be published
//! before its certificate is set. A handshake without SNI (a bare IP
//! address) finds no certificate and fails.
//!
//! **Basic auth** (`auth`): per route, bcrypt entries; checks run on the
//! blocking pool, successes are cached by a SHA-256 of hash, user and
//! password (never the cleartext) for a minute. A request that passes has
//! its `Authorization` header removed before it is forwarded.
//!
//! **Limits** ([`ProxyConfig`]): request heads (64 KiB, 431 beyond), header
//! read and TLS handshake timeout (10 s, against slowloris), an idle
//! timeout, backend connect (3 s) and response-head (60 s, counted once
//! the request body is sent) timeouts, connections per client IP (256) and
//! overall. Each connection is a task owning only its own buffers, so a
//! slow or hostile client delays nobody else; see `server` for the timers.
//!
//! **Draining**: an instance marked `draining` in the table gets no new
//! requests; [`Proxy::outstanding`] and [`Proxy::drained`] tell when those
//! in flight (response bodies and WebSockets included) have finished.
//!
//! **Stats**: [`Proxy::snapshot`] returns plain serializable structs.

mod auth;
mod balance;
mod body;
mod config;
mod forward;
mod h1;
mod headers;
mod hooks;
mod phase;
mod pool;
mod routes;
mod server;
mod shards;
mod stats;
mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use body::Guarded;
pub use config::ProxyConfig;
pub use hooks::{HOOK_PREFIX, HookRequest, HookResponse, Hooks, MAX_HOOK_BODY, MAX_HOOK_READS};
pub use routes::{HtpasswdError, Instance, Route, RouteError, Routes, parse_htpasswd};
pub use shards::{Listening, Shards, ShardsError};
pub use stats::{InstanceSnapshot, RouteSnapshot, Snapshot};
pub use tls::{CertError, Certs, Challenges};

use balance::{InstanceState, Random};
use phase::{Phase, PhaseBell};
use routes::{InstanceKey, Table};
use server::{Limits, Tracker};
use stats::RouteCounters;

/// The largest read buffer of a connection to an instance (and so the
/// largest response head an instance may send; more is a 502).
const BACKEND_READ_BUF: usize = 64 * 1024;

/// Why a proxy could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy config: max_header_bytes is {0}, it must be at least 8192")]
    HeaderLimit(usize),
    #[error("proxy config: {0} must not be zero")]
    Zero(&'static str),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// The proxy: cheap to clone, every clone the same proxy.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

/// What requests share.
pub(crate) struct Inner {
    config: ProxyConfig,
    table: ArcSwap<Table>,
    registry: Mutex<Registry>,
    idle: Arc<Notify>,
    certs: Certs,
    challenges: Challenges,
    /// `/_phoenix/` requests for the master (`hooks`).
    hooks: Hooks,
    tls: Arc<rustls::ServerConfig>,
    pool: pool::PoolConfig,
    builder: auto::Builder<TokioExecutor>,
    auth: Arc<auth::Auth>,
    limits: Arc<Limits>,
    tasks: Arc<Tracker>,
    phase: PhaseBell,
    epoch: Instant,
    random: Random,
}

impl Inner {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX / 2)
    }
}

/// Instance states and route counters by key, kept across tables.
#[derive(Default)]
struct Registry {
    instances: HashMap<InstanceKey, Arc<InstanceState>>,
    counters: HashMap<(String, String), Arc<RouteCounters>>,
}

impl Proxy {
    /// A proxy with an empty route table and no certificates. Serves
    /// nothing until [`serve_http`](Self::serve_http) or
    /// [`serve_https`](Self::serve_https) run.
    pub fn new(config: ProxyConfig) -> Result<Proxy, ProxyError> {
        check(&config)?;
        let shared = Shared::new(&config)?;
        Proxy::with_shared(config, &shared)
    }

    /// A proxy whose certificates, challenges, connection limits and
    /// basic-auth cache are `shared`'s (one of [`Shards`]).
    pub(crate) fn with_shared(config: ProxyConfig, shared: &Shared) -> Result<Proxy, ProxyError> {
        let pool = pool::PoolConfig {
            connect_timeout: config.backend_connect_timeout,
            response_timeout: config.backend_response_timeout,
            body_stall: config.idle_timeout,
            idle_timeout: config.backend_pool_idle_timeout,
            max_idle: config.backend_pool_max_idle,
            // A connection's reads grow while a large body streams, and a
            // pooled connection keeps its buffer while idle: capped, 65
            // idle connections hold at most 4 MiB. It also bounds a
            // response head.
            max_buf: BACKEND_READ_BUF,
        };

        let mut builder = auto::Builder::new(TokioExecutor::new());
        // No header timer for HTTP/1: the connection's idle timer does it
        // (see `server`).
        builder
            .http1()
            .header_read_timeout(None)
            .max_buf_size(config.max_header_bytes)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(config.h2_max_concurrent_streams)
            // What a client may send ahead of the proxy reading it: 256 KiB
            // a stream, 1 MiB a connection; and at most 128 KiB queued per
            // stream toward a slow reader. This bounds an HTTP/2
            // connection's buffers whatever its streams do.
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(1024 * 1024)
            .max_send_buf_size(128 * 1024);

        Ok(Proxy {
            inner: Arc::new(Inner {
                table: ArcSwap::default(),
                registry: Mutex::default(),
                idle: Arc::new(Notify::new()),
                certs: shared.certs.clone(),
                challenges: shared.challenges.clone(),
                hooks: shared.hooks.clone(),
                tls: shared.tls.clone(),
                pool,
                builder,
                auth: shared.auth.clone(),
                limits: shared.limits.clone(),
                tasks: Arc::default(),
                phase: PhaseBell::default(),
                epoch: Instant::now(),
                random: Random::new(),
                config,
            }),
        })
    }

    /// Replaces the whole route table. Requests already routed go on;
    /// every new request sees the new table. A table that does not check
    /// out is refused whole and the old one stays.
    ///
    /// Instances that were in the old table and are not in the new one
    /// get no new requests (as if draining); their requests in flight
    /// still count for [`outstanding`](Self::outstanding).
    pub fn set_routes(&self, routes: Routes) -> Result<(), RouteError> {
        let inner = &self.inner;
        let mut registry = inner.registry.lock().unwrap_or_else(|e| e.into_inner());
        let compiled = routes::compile(
            &routes,
            &registry.instances,
            &registry.counters,
            &inner.idle,
        )?;
        for (key, &(healthy, draining)) in &compiled.flags {
            compiled.states[key].set_flags(healthy, draining);
        }
        let mut instances = compiled.states;
        for (key, state) in registry.instances.drain() {
            if instances.contains_key(&key) {
                continue;
            }
            state.set_flags(state.healthy(), true);
            if state.outstanding() > 0 {
                instances.insert(key, state);
            }
        }
        registry.instances = instances;
        registry.counters = compiled
            .table
            .order
            .iter()
            .map(|r| ((r.host.clone(), r.prefix.clone()), r.counters.clone()))
            .collect();
        inner.table.store(Arc::new(compiled.table));
        Ok(())
    }

    /// The certificates the HTTPS listener serves; set them at any time.
    pub fn certs(&self) -> Certs {
        self.inner.certs.clone()
    }

    /// The ACME HTTP-01 challenges the HTTP listener answers.
    pub fn challenges(&self) -> Challenges {
        self.inner.challenges.clone()
    }

    /// The handler of `/_phoenix/` requests (both listeners).
    pub fn hooks(&self) -> Hooks {
        self.inner.hooks.clone()
    }

    /// Serves plain HTTP on `listener` until [`shutdown`](Self::shutdown):
    /// ACME challenges, redirects for hosts with a certificate, the routes
    /// for the others. Returns once its connections have finished (or
    /// were dropped after the grace period).
    pub fn serve_http(&self, listener: TcpListener) -> impl Future<Output = ()> + Send + 'static {
        server::serve(self.inner.clone(), listener, false)
    }

    /// Serves HTTPS on `listener` until [`shutdown`](Self::shutdown), with
    /// the certificates of [`certs`](Self::certs).
    pub fn serve_https(&self, listener: TcpListener) -> impl Future<Output = ()> + Send + 'static {
        server::serve(self.inner.clone(), listener, true)
    }

    /// Stops accepting connections and lets those open finish their
    /// requests (idle ones close at once), for at most
    /// `ProxyConfig::shutdown_grace`; then drops what is left, WebSockets
    /// included. The `serve_*` futures return when it is done. Final: a
    /// proxy that was shut down serves no more (make a new one).
    pub fn shutdown(&self) {
        self.inner.phase.advance(Phase::Draining);
    }

    /// Requests in flight on instances of service `id` (any address),
    /// response bodies and open WebSockets included.
    pub fn outstanding(&self, id: &str) -> u64 {
        self.inner.outstanding(id)
    }

    /// Resolves when no request is in flight on instances of `id`. Set
    /// them `draining` (or remove them) with
    /// [`set_routes`](Self::set_routes) first, and no new request can
    /// start on them once this has resolved.
    pub fn drained(&self, id: &str) -> impl Future<Output = ()> + Send + 'static {
        let inner = self.inner.clone();
        let id = id.to_owned();
        async move {
            loop {
                let notified = inner.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if inner.outstanding(&id) == 0 {
                    return;
                }
                notified.await;
            }
        }
    }

    /// Routes, instances, counters and certificates now.
    pub fn snapshot(&self) -> Snapshot {
        let inner = &self.inner;
        let now_ms = inner.now_ms();
        let table = inner.table.load();
        let routes = table
            .order
            .iter()
            .map(|route| {
                let c = &route.counters;
                let load =
                    |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
                RouteSnapshot {
                    host: route.host.clone(),
                    path_prefix: route.prefix.clone(),
                    strip_prefix: route.strip_prefix,
                    auth: !route.auth.is_empty(),
                    requests: load(&c.requests),
                    unauthorized: load(&c.unauthorized),
                    unavailable: load(&c.unavailable),
                    bad_gateway: load(&c.bad_gateway),
                    timeouts: load(&c.timeouts),
                    instances: route
                        .backends
                        .iter()
                        .map(|s| InstanceSnapshot {
                            id: s.id.clone(),
                            addr: s.addr,
                            healthy: s.healthy(),
                            draining: s.draining(),
                            outstanding: s.outstanding(),
                            total: s.total(),
                            failures: s.failures(),
                            down_for_ms: s.down_for(now_ms),
                        })
                        .collect(),
                }
            })
            .collect();
        Snapshot {
            routes,
            certificates: inner.certs.hosts(),
            connections: inner.limits.open(),
        }
    }
}

/// Checks a config as [`Proxy::new`] does.
fn check(config: &ProxyConfig) -> Result<(), ProxyError> {
    if config.max_header_bytes < 8192 {
        return Err(ProxyError::HeaderLimit(config.max_header_bytes));
    }
    for (name, zero) in [
        ("header_read_timeout", config.header_read_timeout.is_zero()),
        ("idle_timeout", config.idle_timeout.is_zero()),
        (
            "backend_connect_timeout",
            config.backend_connect_timeout.is_zero(),
        ),
        (
            "backend_response_timeout",
            config.backend_response_timeout.is_zero(),
        ),
        ("max_connections", config.max_connections == 0),
        ("max_connections_per_ip", config.max_connections_per_ip == 0),
        ("max_requests_per_ip", config.max_requests_per_ip == 0),
        (
            "h2_max_concurrent_streams",
            config.h2_max_concurrent_streams == 0,
        ),
    ] {
        if zero {
            return Err(ProxyError::Zero(name));
        }
    }

    Ok(())
}

/// What the proxies of one [`Shards`] share: one certificate map, one
/// challenge source, one set of connection limits (so that
/// `max_connections_per_ip` means the same with one proxy or many) and
/// one basic-auth cache.
pub(crate) struct Shared {
    /// One TLS config, so that a client resumes its session on whichever
    /// shard its next connection lands (see `tls::server_config`).
    tls: Arc<rustls::ServerConfig>,
    certs: Certs,
    challenges: Challenges,
    hooks: Hooks,
    limits: Arc<Limits>,
    auth: Arc<auth::Auth>,
}

impl Shared {
    fn new(config: &ProxyConfig) -> Result<Shared, ProxyError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = Certs::new(provider.clone());
        Ok(Shared {
            tls: tls::server_config(provider, &certs)?,
            certs,
            challenges: Challenges::default(),
            hooks: Hooks::default(),
            limits: Arc::new(Limits::new(
                config.max_connections,
                config.max_connections_per_ip,
                config.max_requests_per_ip,
            )),
            auth: Arc::new(auth::Auth::new(
                config.auth_cache_ttl,
                config.auth_cache_entries,
            )),
        })
    }
}

impl Inner {
    /// Closes connections to instances idle past their timeout.
    fn sweep_pools(&self) {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        for state in registry.instances.values() {
            state.conns.sweep(self.config.backend_pool_idle_timeout);
        }
    }

    fn outstanding(&self, id: &str) -> u64 {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry
            .instances
            .iter()
            .filter(|((key, _), _)| key == id)
            .map(|(_, state)| state.outstanding())
            .sum()
    }
}
