//! Limits and timeouts.

use std::time::Duration;

/// How the proxy bounds what clients and backends can make it do. The
/// defaults suit a public listener.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Largest request head (request line + headers) from a client; over
    /// it HTTP/1 gets 431 and the connection closes. For HTTP/2 it bounds
    /// the decoded header list. At least 8 KiB. Default 64 KiB. (HTTP/1
    /// requests are also held to hyper's 100 header fields.)
    pub max_header_bytes: usize,
    /// Time a client has to send a whole request head, counted from when
    /// the proxy starts waiting for it (also between keep-alive requests on
    /// HTTP/1), and to finish a TLS handshake. Default 10 s.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/2 gets a GOAWAY first). HTTP/1 connections are also bounded by
    /// `header_read_timeout` while waiting for their next request, so for
    /// them the shorter of the two applies. Also the longest a request
    /// body may send nothing: it is then cut off with 408 (nginx's
    /// `client_body_timeout`), which frees the instance's connection it
    /// held. Default 60 s.
    pub idle_timeout: Duration,
    /// Time to establish a TCP connection to an instance. Default 3 s.
    pub backend_connect_timeout: Duration,
    /// Time for an instance to answer with a response head, once the
    /// request is sent. Bodies (downloads, SSE, WebSockets) have no time
    /// limit. Default 60 s.
    pub backend_response_timeout: Duration,
    /// Client connections open at once over all listeners. When reached,
    /// the listeners stop accepting (the kernel's backlog queues the rest).
    /// Default 16384.
    pub max_connections: usize,
    /// Client connections open at once from one IPv4 address or one IPv6
    /// /64 (what one host can hold whole); more are closed at once.
    /// Default 256.
    pub max_connections_per_ip: usize,
    /// Requests in flight at once from one IPv4 address or one IPv6 /64,
    /// over all its connections and HTTP/2 streams; more get 429. Default
    /// 1024.
    pub max_requests_per_ip: usize,
    /// Concurrent HTTP/2 streams per client connection. Default 128.
    pub h2_max_concurrent_streams: u32,
    /// After [`Proxy::shutdown`](crate::Proxy::shutdown), how long
    /// requests in flight get to finish before their connections are
    /// dropped. Default 10 s.
    pub shutdown_grace: Duration,
    /// The port HTTP requests are redirected to for hosts that have a
    /// certificate; 443 is left out of the `Location`. Default 443.
    pub https_port: u16,
    /// First down mark after a failed connect; doubles per failure in a
    /// row up to `mark_down_max`. Defaults 1 s and 5 s.
    pub mark_down_min: Duration,
    pub mark_down_max: Duration,
    /// Idle keep-alive connections kept per instance, and for how long.
    /// Defaults 256 and 90 s. Keep it above the requests an instance has
    /// in flight at once: when more connections come back idle than this,
    /// the extra ones are closed, and under steady load that means closing
    /// and reconnecting all the time (bench/proxy.sh saw one new backend
    /// connection every ~45 requests at 64 concurrent with 32).
    pub backend_pool_max_idle: usize,
    pub backend_pool_idle_timeout: Duration,
    /// How long a successful basic-auth check is remembered, and how many
    /// are. Defaults 60 s and 4096.
    pub auth_cache_ttl: Duration,
    pub auth_cache_entries: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            backend_connect_timeout: Duration::from_secs(3),
            backend_response_timeout: Duration::from_secs(60),
            max_connections: 16384,
            max_connections_per_ip: 256,
            max_requests_per_ip: 1024,
            h2_max_concurrent_streams: 128,
            shutdown_grace: Duration::from_secs(10),
            https_port: 443,
            mark_down_min: Duration::from_secs(1),
            mark_down_max: Duration::from_secs(5),
            backend_pool_max_idle: 256,
            backend_pool_idle_timeout: Duration::from_secs(90),
            auth_cache_ttl: Duration::from_secs(60),
            auth_cache_entries: 4096,
        }
    }
}
