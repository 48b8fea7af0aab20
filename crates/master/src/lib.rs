//! The Phoenix master daemon.
//!
//! It owns the cluster's state ([`store`]), the images ([`registry`]) and the
//! cluster key, and serves three endpoints:
//! - [`api`]: the CLI's Unix socket in the data dir;
//! - [`join`]: the public join endpoint, the only clear-text port by design;
//! - [`link`]: the minions' long-lived connections, over which the master
//!   pushes each minion its whole desired set and receives observed state.
//!
//! [`hub`] ties them together: operations, in-memory observed state, links.
//! What each node should run is decided in one place, the pure
//! [`reconcile`], which the hub feeds from the store on every change.

pub mod api;
pub mod front;
pub mod hub;
pub mod join;
pub mod link;
pub mod reconcile;
pub mod registry;
pub mod routes;
pub mod store;
pub mod watch;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use phoenix_model::keys::{self, KeyPair};
use phoenix_model::net;
use phoenix_model::proto::MasterInfo;
use phoenix_overlay::{Overlay, OverlayConfig};
use tokio::net::{TcpListener, UnixListener};

pub const DEFAULT_JOIN_PORT: u16 = 51821;
pub const DEFAULT_LINK_PORT: u16 = 51822;

#[derive(Clone, Debug)]
pub struct MasterConfig {
    pub data_dir: PathBuf,
    pub public_ip: IpAddr,
    pub join_port: u16,
    pub link_port: u16,
    /// The WireGuard overlay; `None` runs the links in clear text (for
    /// single-host development without root only).
    pub overlay: Option<OverlaySettings>,
    /// Admit minions that prove the join token without a manual `accept`.
    pub auto_accept: bool,
    /// A minion silent this long is marked unreachable.
    pub node_timeout: std::time::Duration,
    /// How long an update's new version may take to come up beside the old.
    pub update_timeout: std::time::Duration,
    /// How long requests in flight may take on a run leaving the proxy.
    pub drain_timeout: std::time::Duration,
    /// The HTTP/HTTPS proxy on the public IP; `None`: `--no-proxy`.
    pub proxy: Option<front::ProxySettings>,
}

#[derive(Clone, Debug)]
pub struct OverlaySettings {
    /// Kernel or userspace WireGuard (auto: the kernel's where it has it).
    pub mode: phoenix_overlay::Mode,
    pub wg_port: u16,
    pub tun_name: String,
}

/// The cause of each variant is its `source`, which the binary prints
/// after the message (`{:#}`), so the messages leave it out.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("data dir {path}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} ({what})")]
    Listen {
        addr: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("TCP {port} is in use (is a master running here?): pick another with {flag}")]
    PortInUse { port: u16, flag: &'static str },
    #[error("cannot listen on {addr} for {what}")]
    ProxyListen {
        addr: SocketAddr,
        what: String,
        source: std::io::Error,
    },
    #[error("proxy: {0}")]
    Proxy(String),
    #[error("another master is already running with data dir {0}")]
    AlreadyRunning(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Key(#[from] phoenix_model::keys::KeyError),
    #[error(transparent)]
    Overlay(#[from] phoenix_overlay::OverlayError),
}

/// A connection task's error, logged when the connection ends.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Locks a mutex of the master's in-memory state (a panic while holding
/// one must not poison the whole master).
pub(crate) use phoenix_model::lock;

/// The CLI socket's path in a data dir.
pub fn socket_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("phoenix.sock")
}

/// One of the master's TCP ports: what it is and the flag that moves it.
#[derive(Clone, Copy)]
struct TcpPort {
    port: u16,
    what: &'static str,
    flag: &'static str,
}

impl TcpPort {
    fn error(self, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> MasterError {
        move |source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                MasterError::PortInUse {
                    port: self.port,
                    flag: self.flag,
                }
            } else {
                MasterError::Listen {
                    addr: addr.to_string(),
                    what: self.what,
                    source,
                }
            }
        }
    }

    /// Fails if something listens on this port at any address. The link
    /// listens on the overlay address, which exists only once the overlay
    /// is up: this says so before anything is touched.
    fn check_free(self) -> Result<(), MasterError> {
        let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), self.port);
        match std::net::TcpListener::bind(any) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), self.port);
                std::net::TcpListener::bind(any)
                    .map(drop)
                    .map_err(self.error(any))
            }
            Err(e) => Err(self.error(any)(e)),
        }
    }
}

/// Holds the data dir's lock (`master.lock`) for the life of the master,
/// so a second master on it is refused before it changes anything.
struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    fn take(data_dir: &std::path::Path) -> Result<DataDirLock, MasterError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join("master.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| MasterError::DataDir {
                path: path.display().to_string(),
                source,
            })?;
        // SAFETY: flock on a descriptor we own; the lock goes with it.
        let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if ret != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                MasterError::AlreadyRunning(data_dir.display().to_string())
            } else {
                MasterError::DataDir {
                    path: path.display().to_string(),
                    source: e,
                }
            });
        }
        Ok(DataDirLock { _file: file })
    }
}

/// Binds `ip:port`, or the unspecified address of the same family if `ip` is
/// not on this machine (a VPS behind 1:1 NAT knows its public IP but does not
/// hold it).
async fn bind(ip: IpAddr, port: TcpPort) -> Result<TcpListener, MasterError> {
    let err = |addr: SocketAddr| port.error(addr);
    let port = port.port;
    let addr = SocketAddr::new(ip, port);
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            let any = match ip {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let addr = SocketAddr::new(any, port);
            TcpListener::bind(addr).await.map_err(err(addr))
        }
        Err(e) => Err(err(addr)(e)),
    }
}

/// Runs the master until the process is stopped.
pub async fn run(cfg: MasterConfig) -> Result<(), MasterError> {
    let dir_err = |source| MasterError::DataDir {
        path: cfg.data_dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&cfg.data_dir).map_err(dir_err)?;
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(dir_err)?;
    // Everything that can refuse the start comes before anything changes:
    // a master already on this data dir, a port or interface in use.
    let _lock = DataDirLock::take(&cfg.data_dir)?;
    let sock = socket_path(&cfg.data_dir);
    if tokio::net::UnixStream::connect(&sock).await.is_ok() {
        return Err(MasterError::AlreadyRunning(
            cfg.data_dir.display().to_string(),
        ));
    }
    let join_port = TcpPort {
        port: cfg.join_port,
        what: "join endpoint",
        flag: "--join-port",
    };
    let link_port = TcpPort {
        port: cfg.link_port,
        what: "minion link",
        flag: "--link-port",
    };
    let join = bind(cfg.public_ip, join_port).await?;
    if cfg.link_port != 0 {
        link_port.check_free()?;
    }
    let key = KeyPair::load_or_create(&cfg.data_dir.join("master.key"))?;
    if let Some(o) = &cfg.overlay {
        phoenix_overlay::preflight::check_free(&o.tun_name, o.wg_port, &key.secret_bytes())?;
    }
    let mut store = store::Store::open(&cfg.data_dir.join("phoenix.db"))?;
    store.set_meta("public_ip", &cfg.public_ip.to_string())?;
    let token = match store.meta("join_token")? {
        Some(t) => t,
        None => {
            let t = keys::new_token();
            store.set_meta("join_token", &t)?;
            t
        }
    };
    // The master's peers: every accepted minion, allowed its overlay
    // address and its services' (a stored spec that no longer passes the
    // checks leaves the services out until it is deleted).
    let peers = {
        let tx = store.read()?;
        let members = tx.nodes(true)?;
        let services = tx.services().unwrap_or_else(|e| {
            tracing::error!("{e}; the master's WireGuard peers start without services' addresses");
            Vec::new()
        });
        hub::master_peers(&members, &services)
    };
    let registry = registry::Registry::open(cfg.data_dir.join("registry"))?;

    let _ = std::fs::remove_file(&sock);
    let api = UnixListener::bind(&sock).map_err(|source| MasterError::Listen {
        addr: sock.display().to_string(),
        what: "cli socket",
        source,
    })?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).map_err(dir_err)?;

    // The overlay comes up first: with it, the minion links listen on the
    // master's overlay address only, never on the public one.
    let overlay = match &cfg.overlay {
        Some(o) => Some(Arc::new(
            Overlay::start(
                OverlayConfig {
                    tun_name: o.tun_name.clone(),
                    address: Some(net::MASTER_IP),
                    listen_port: o.wg_port,
                    private_key: key.secret_bytes(),
                    peers,
                },
                o.mode,
            )
            .await?,
        )),
        None => None,
    };
    let link_ip = if overlay.is_some() {
        IpAddr::V6(net::MASTER_IP)
    } else {
        cfg.public_ip
    };
    let link = bind(link_ip, link_port).await?;

    let info = MasterInfo {
        public_ip: cfg.public_ip,
        key: key.public(),
        overlay_ip: net::MASTER_IP,
        next_minion_ip: net::node_ip(1),
        join_port: join.local_addr().map(|a| a.port()).unwrap_or(cfg.join_port),
        link_port: link.local_addr().map(|a| a.port()).unwrap_or(cfg.link_port),
        wg_port: cfg.overlay.as_ref().map(|o| o.wg_port),
        token,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    if overlay.is_some() {
        tracing::info!(
            public_ip = %cfg.public_ip, join_port = info.join_port, wg_port = ?info.wg_port, key = %info.key,
            "master up; minion links on the overlay at [{}]:{}", net::MASTER_IP, info.link_port
        );
    } else {
        tracing::warn!(
            public_ip = %cfg.public_ip, join_port = info.join_port, link_port = info.link_port,
            "master up WITHOUT the overlay: minion links are clear-text TCP (development only)"
        );
    }
    let settings = hub::Settings {
        update_timeout: cfg.update_timeout,
        drain_timeout: cfg.drain_timeout,
        ..hub::Settings::new(cfg.auto_accept, cfg.node_timeout)
    };
    let hub = Arc::new(hub::Hub::new(store, registry, info, overlay, settings));
    // Git sources (`hub::git`): a task for each watched one.
    if let Err(e) = hub.start_git_sources(&cfg.data_dir) {
        tracing::error!("cannot start the git sources: {e}");
    }
    if let Some(proxy) = &cfg.proxy {
        let front =
            front::Front::start(hub.clone(), proxy, cfg.public_ip, cfg.data_dir.clone()).await?;
        // Git push webhooks (`POST /_phoenix/git/NAME`) on the proxy's ports.
        let weak = Arc::downgrade(&hub);
        front.hooks().set_handler(move |req| match weak.upgrade() {
            Some(hub) => hub.git_webhook(req),
            None => phoenix_proxy::HookResponse {
                status: 503,
                text: "phoenix: the master is stopping\n".into(),
            },
        });
        let _ = hub.front.set(front);
    }
    // Updates a previous master left half way go on where they were.
    if let Err(e) = hub.resume_rollouts() {
        tracing::error!("cannot resume the updates in progress: {e}");
    }
    tokio::spawn(join::serve(hub.clone(), join));
    tokio::spawn(link::serve(hub.clone(), link));
    tokio::spawn(watch::run(hub.clone()));
    tokio::spawn({
        let hub = hub.clone();
        async move { hub.keep_overlay_peers().await }
    });
    api::serve(hub, api).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(data_dir: &std::path::Path, public_ip: &str, join_port: u16) -> MasterConfig {
        MasterConfig {
            data_dir: data_dir.to_owned(),
            public_ip: public_ip.parse().unwrap(),
            join_port,
            link_port: 0,
            overlay: None,
            auto_accept: false,
            node_timeout: std::time::Duration::from_secs(6),
            update_timeout: std::time::Duration::from_secs(120),
            drain_timeout: std::time::Duration::from_secs(30),
            proxy: None,
        }
    }

    #[tokio::test]
    async fn a_second_master_on_one_data_dir_is_refused_before_it_changes_anything() {
        let dir = tempfile::tempdir().unwrap();
        let first = tokio::spawn(run(config(dir.path(), "127.0.0.1", 0)));
        let sock = socket_path(dir.path());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::UnixStream::connect(&sock).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the first master never came up"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }

        let second = run(config(dir.path(), "127.0.0.2", 0)).await.unwrap_err();
        assert!(matches!(second, MasterError::AlreadyRunning(_)), "{second}");
        assert!(
            second
                .to_string()
                .contains("another master is already running"),
            "{second}"
        );
        first.abort();
        let _ = first.await;
        let store = store::Store::open(&dir.path().join("phoenix.db")).unwrap();
        assert_eq!(
            store.meta("public_ip").unwrap().as_deref(),
            Some("127.0.0.1")
        );
    }

    #[tokio::test]
    async fn a_join_port_in_use_is_named_with_its_flag_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = run(config(dir.path(), "127.0.0.1", port))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert_eq!(
            msg,
            format!(
                "TCP {port} is in use (is a master running here?): pick another with --join-port"
            )
        );
        assert!(!dir.path().join("phoenix.db").exists());
        assert!(!dir.path().join("master.key").exists());
    }

    #[tokio::test]
    async fn a_link_port_in_use_is_named_with_its_flag() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("[::]:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut cfg = config(dir.path(), "127.0.0.1", 0);
        cfg.link_port = port;
        let err = run(cfg).await.unwrap_err();
        assert!(
            err.to_string().contains(&format!("TCP {port} is in use")),
            "{err}"
        );
        assert!(err.to_string().contains("--link-port"), "{err}");
        assert!(!dir.path().join("phoenix.db").exists());
    }
}
