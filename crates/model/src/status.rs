//! Observed state: what minions report about their services and themselves.

use serde::{Deserialize, Serialize};

/// Where a service is in its life on a minion.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Fetching its image, or started and not yet past its first health check.
    Starting,
    Running,
    /// Failed its health check; it is being restarted.
    Unhealthy,
    /// Waiting before the next restart after a crash.
    Backoff,
    /// A oneshot that finished with status 0, or a service being stopped.
    Exited,
    /// A oneshot that finished with an error, or a service that cannot start.
    Failed,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::Unhealthy => "unhealthy",
            ServiceState::Backoff => "backoff",
            ServiceState::Exited => "exited",
            ServiceState::Failed => "failed",
        }
    }
}

/// The result of the last health check.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The spec has no health check.
    #[default]
    None,
    /// Not checked yet (in the start-up grace).
    Pending,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::None => "-",
            Health::Pending => "pending",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// How a process ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Unix time in milliseconds.
    pub at: u64,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "code {c}"),
            (None, Some(s)) => write!(f, "signal {s}"),
            (None, None) => write!(f, "unknown"),
        }
    }
}

/// One service as a minion sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ServiceStatus {
    pub name: String,
    /// The run this is about when it is not the service's name (a run a
    /// zero-downtime update started: `NAME.GENERATION`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The spec generation this status is about.
    pub generation: u64,
    pub state: ServiceState,
    pub pid: Option<u32>,
    /// Restarts since the service was deployed or last updated.
    pub restarts: u64,
    pub last_exit: Option<Exit>,
    /// What became of the spec's `memory` / `cpus` on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<String>,
    pub health: Health,
    /// Unix time in milliseconds of the last state change.
    pub since: u64,
    /// Why it is failed or backing off, when there is a reason to give.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ServiceStatus {
    /// The instance key this status is about.
    pub fn key(&self) -> &str {
        self.instance.as_deref().unwrap_or(&self.name)
    }
}

/// A node's resources.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct NodeStats {
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub mem_total: u64,
    pub mem_available: u64,
    pub disk_total: u64,
    pub disk_available: u64,
    /// Resident memory of the minion daemon itself.
    pub minion_rss: u64,
    /// Bytes of image chunks this minion received since it started.
    #[serde(default)]
    pub image_bytes_fetched: u64,
    /// How it runs VMs: `kvm`, `tcg` (QEMU's software emulation, slow) or
    /// `none` (no QEMU). Absent from minions that predate VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_accel: Option<String>,
}

/// Unix time now in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
