//! Counters and the plain, serializable snapshot `phoenix routes` shows.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Per-route counters, kept across table replacements under
/// `(host, prefix)`.
#[derive(Debug, Default)]
pub(crate) struct RouteCounters {
    pub requests: AtomicU64,
    pub unauthorized: AtomicU64,
    pub unavailable: AtomicU64,
    pub bad_gateway: AtomicU64,
    pub timeouts: AtomicU64,
}

impl RouteCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The whole proxy at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// In the order of the current table.
    pub routes: Vec<RouteSnapshot>,
    /// Hosts that have a certificate.
    pub certificates: Vec<String>,
    /// Client connections open now (HTTP and HTTPS).
    pub connections: u64,
}

/// One route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSnapshot {
    pub host: String,
    pub path_prefix: String,
    pub strip_prefix: bool,
    pub auth: bool,
    /// Requests that matched this route.
    pub requests: u64,
    /// Answered 401.
    pub unauthorized: u64,
    /// Answered 503: no instance could take it.
    pub unavailable: u64,
    /// Answered 502: no instance could be reached, or one failed.
    pub bad_gateway: u64,
    /// Answered 504: an instance did not answer in time.
    pub timeouts: u64,
    pub instances: Vec<InstanceSnapshot>,
}

/// One instance. Its counters are the instance's across all routes that
/// list it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSnapshot {
    pub id: String,
    pub addr: SocketAddr,
    pub healthy: bool,
    pub draining: bool,
    /// Requests in flight now (a WebSocket counts while it is open).
    pub outstanding: u64,
    /// Requests sent to it.
    pub total: u64,
    /// Failed connects, errors and timeouts.
    pub failures: u64,
    /// Milliseconds left of a passive-health down mark.
    pub down_for_ms: Option<u64>,
}
