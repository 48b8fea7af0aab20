//! The WireGuard overlay that carries all master–minion traffic.
//!
//! Each node runs WireGuard in userspace inside its own `phoenix` process:
//! [gotatun]'s device over a TUN device of ours ([`tun::Tun`]) and a UDP
//! socket. The kernel's WireGuard is not used even where present: one code
//! path, tested here, where the kernel has no module.
//!
//! Addresses (see `phoenix_model::net`): the master is `fd38:dde8:32dd::1`,
//! minions `::2`, `::3`... Each node's TUN carries its address with a /48
//! prefix, so the whole cluster range routes into the tunnel. A minion's
//! peers are the master (allowed IPs: the /48) and every other minion (a
//! mesh; allowed IPs: its /128 and its services' /128s); the master's peers
//! are the minions (the same /128s). WireGuard picks the most specific
//! allowed IP, so a direct /128 wins over the /48 through the master.

pub mod kernel;
pub mod preflight;
pub mod tun;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gotatun::device::{Device, DeviceBuilder, Peer};
use gotatun::x25519::{PublicKey, StaticSecret};
use ipnetwork::IpNetwork;

/// WireGuard's usual port; the default for both master and minions.
pub const DEFAULT_WG_PORT: u16 = 51820;
/// 1500 minus the IPv6 + UDP + WireGuard overhead (80 bytes).
pub const MTU: u16 = 1420;
/// Socket buffers of the userspace WireGuard's UDP socket.
const UDP_BUFFER: usize = 4 << 20;
/// Keepalive a minion sends its master, so NAT mappings stay open.
pub const KEEPALIVE_SECS: u16 = 25;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(
        "tun device {name}: {source} (the overlay needs root or CAP_NET_ADMIN, and /dev/net/tun)"
    )]
    Tun {
        name: String,
        source: std::io::Error,
    },
    #[error("wireguard device on udp port {port}: {detail}")]
    Device { port: u16, detail: String },
    #[error("{key:?} is not a base64 WireGuard public key")]
    BadKey { key: String },
    #[error(
        "UDP {port} is in use (is a master or another minion running here?): pick another with --wg-port"
    )]
    PortInUse { port: u16 },
    #[error(
        "interface {name} exists (is another phoenix daemon running here?): pick another with --tun-name"
    )]
    InterfaceExists { name: String },
}

/// One peer of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Base64 public key.
    pub key: String,
    pub allowed: Vec<(Ipv6Addr, u8)>,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: Option<u16>,
}

/// What a node's overlay is.
#[derive(Clone, Debug)]
pub struct OverlayConfig {
    pub tun_name: String,
    /// This node's overlay address, if known yet (a minion learns its own
    /// when it is accepted).
    pub address: Option<Ipv6Addr>,
    pub listen_port: u16,
    pub private_key: [u8; 32],
    pub peers: Vec<PeerConfig>,
}

/// Which WireGuard to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The kernel's where it has WireGuard, userspace otherwise.
    Auto,
    Kernel,
    Userspace,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "kernel" => Ok(Mode::Kernel),
            "userspace" => Ok(Mode::Userspace),
            other => Err(format!("{other:?}: use auto, kernel or userspace")),
        }
    }
}

type UserDevice = Device<(gotatun::udp::socket::UdpSocketFactory, tun::Tun, tun::Tun)>;

enum Backend {
    Userspace {
        device: UserDevice,
        tun: tun::Tun,
        /// gotatun binds its socket and starts its tasks only once it has a
        /// peer; a master that starts with none brings them up at the first.
        connected: std::sync::atomic::AtomicBool,
        /// Until then these sockets hold the WireGuard port, so that a second
        /// daemon on this machine finds it taken at its start, not the
        /// master at its first `accept`.
        reserved: std::sync::Mutex<Vec<std::net::UdpSocket>>,
    },
    Kernel(kernel::KernelWg),
}

/// A running overlay: a WireGuard device and the interface it serves.
pub struct Overlay {
    backend: Backend,
    pub listen_port: u16,
    /// The peers as configured, so a kernel peer can be re-added.
    peers: std::sync::Mutex<Vec<PeerConfig>>,
}

fn public_key(key: &str) -> Result<PublicKey, OverlayError> {
    let bytes: [u8; 32] = STANDARD
        .decode(key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| OverlayError::BadKey {
            key: key.to_owned(),
        })?;
    Ok(PublicKey::from(bytes))
}

fn peer(p: &PeerConfig) -> Result<Peer, OverlayError> {
    let mut peer = Peer::new(public_key(&p.key)?).with_allowed_ips(
        p.allowed
            .iter()
            .filter_map(|(ip, len)| IpNetwork::new(IpAddr::V6(*ip), *len).ok()),
    );
    if let Some(e) = p.endpoint {
        peer = peer.with_endpoint(e);
    }
    peer.keepalive = p.keepalive;
    Ok(peer)
}

/// A device error, saying plainly when the cause is a taken port.
fn device_error(port: u16, e: gotatun::device::Error) -> OverlayError {
    match e {
        gotatun::device::Error::Bind(source, _)
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            OverlayError::PortInUse { port }
        }
        e => OverlayError::Device {
            port,
            detail: e.to_string(),
        },
    }
}

impl Overlay {
    /// Starts the overlay, after checking that its interface name and UDP
    /// port are free ([`preflight::check_free`], which a daemon also calls
    /// first thing, before it touches anything else).
    pub async fn start(cfg: OverlayConfig, mode: Mode) -> Result<Overlay, OverlayError> {
        preflight::check_free(&cfg.tun_name, cfg.listen_port, &cfg.private_key)?;
        let kernel_why = match mode {
            Mode::Userspace => Some("userspace WireGuard was asked for".to_owned()),
            Mode::Auto | Mode::Kernel => kernel::create_link(&cfg.tun_name).err(),
        };
        let backend = match (kernel_why, mode) {
            (None, _) => {
                let wg = kernel::KernelWg::start(
                    &cfg.tun_name,
                    cfg.address,
                    cfg.listen_port,
                    &cfg.private_key,
                    &cfg.peers,
                )?;
                tracing::info!(interface = %cfg.tun_name, port = cfg.listen_port, address = ?cfg.address, "overlay up (kernel WireGuard)");
                Backend::Kernel(wg)
            }
            (Some(why), Mode::Kernel) => {
                return Err(OverlayError::Device {
                    port: cfg.listen_port,
                    detail: format!(
                        "kernel WireGuard was asked for, but the kernel has none: {why}"
                    ),
                });
            }
            (Some(why), _) => {
                tracing::debug!("no kernel WireGuard ({why}); using the userspace one");
                Self::userspace(&cfg).await?
            }
        };
        Ok(Overlay {
            backend,
            listen_port: cfg.listen_port,
            peers: std::sync::Mutex::new(cfg.peers),
        })
    }

    async fn userspace(cfg: &OverlayConfig) -> Result<Backend, OverlayError> {
        let tun = tun::Tun::create(&cfg.tun_name, cfg.address.map(|a| (a, 48)), MTU).map_err(
            |source| {
                if source.kind() == std::io::ErrorKind::AddrInUse {
                    OverlayError::InterfaceExists {
                        name: cfg.tun_name.clone(),
                    }
                } else {
                    OverlayError::Tun {
                        name: cfg.tun_name.clone(),
                        source,
                    }
                }
            },
        )?;
        let peers = cfg.peers.iter().map(peer).collect::<Result<Vec<_>, _>>()?;
        let connected = !peers.is_empty();
        let reserved = if connected {
            Vec::new()
        } else {
            preflight::bind_udp(cfg.listen_port)?
        };
        let device = DeviceBuilder::new()
            .with_default_udp()
            // The default 208 KiB receive buffer overflows under a bulk
            // transfer (an image sync), and every dropped datagram is a TCP
            // resend inside the tunnel. The kernel caps this at rmem_max.
            .udp_recv_buffer_size(UDP_BUFFER)
            .udp_send_buffer_size(UDP_BUFFER)
            .with_ip_pair(tun.clone(), tun.clone())
            .with_private_key(StaticSecret::from(cfg.private_key))
            .with_listen_port(cfg.listen_port)
            .with_peers(peers)
            .build()
            .await
            .map_err(|e| device_error(cfg.listen_port, e))?;
        tracing::info!(tun = tun.name(), port = cfg.listen_port, address = ?cfg.address, "overlay up (userspace WireGuard)");
        Ok(Backend::Userspace {
            device,
            tun,
            connected: connected.into(),
            reserved: std::sync::Mutex::new(reserved),
        })
    }

    /// Whether the kernel's WireGuard carries this overlay.
    pub fn is_kernel(&self) -> bool {
        matches!(self.backend, Backend::Kernel(_))
    }

    fn device_err(&self, e: gotatun::device::Error) -> OverlayError {
        device_error(self.listen_port, e)
    }

    /// Gives this node its overlay address (a minion, once accepted).
    pub fn set_address(&self, ip: Ipv6Addr) -> Result<(), OverlayError> {
        match &self.backend {
            Backend::Kernel(k) => k.set_address(ip),
            Backend::Userspace { tun, .. } => {
                tun.add_address(ip, 48).map_err(|source| OverlayError::Tun {
                    name: tun.name().to_owned(),
                    source,
                })
            }
        }
    }

    /// Adds a peer, or replaces its settings: its allowed IPs are replaced,
    /// not added to (by both backends), and an existing peer keeps its
    /// sessions.
    pub async fn set_peer(&self, p: &PeerConfig) -> Result<(), OverlayError> {
        {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            peers.retain(|q| q.key != p.key);
            peers.push(p.clone());
        }
        match &self.backend {
            Backend::Kernel(k) => k.set_peer(p),
            Backend::Userspace {
                device,
                connected,
                reserved,
                ..
            } => {
                device
                    .add_or_update_peer(peer(p)?)
                    .await
                    .map_err(|e| self.device_err(e))?;
                if !connected.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    // The first peer: bring the device up now that it has
                    // one, on the port our reservation held until now.
                    reserved.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    if let Err(e) = self.restart().await {
                        // Not up: the next peer tries again.
                        connected.store(false, std::sync::atomic::Ordering::SeqCst);
                        return Err(e);
                    }
                }
                Ok(())
            }
        }
    }

    /// Drops every session and handshakes afresh. A minion calls this when it
    /// is accepted: the master ignored its earlier handshakes, and WireGuard
    /// would otherwise wait out its 5 s retry timer.
    pub async fn rehandshake(&self) -> Result<(), OverlayError> {
        match &self.backend {
            Backend::Kernel(k) => {
                let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
                peers.iter().try_for_each(|p| k.refresh_peer(p))
            }
            Backend::Userspace { .. } => self.restart().await,
        }
    }

    /// Suspends and resumes the userspace device: that binds its socket and
    /// starts its tasks if it had none (gotatun does so only for a device
    /// with peers), and drops every session, so handshakes start afresh.
    async fn restart(&self) -> Result<(), OverlayError> {
        let Backend::Userspace { device, .. } = &self.backend else {
            return Ok(());
        };
        device.suspend().await;
        device.resume().await.map_err(|e| self.device_err(e))
    }

    /// The peers as configured (the last [`Overlay::set_peer`] of each).
    pub fn peers(&self) -> Vec<PeerConfig> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces a peer's allowed IPs and nothing else: its endpoint (also
    /// one it roamed to), keepalive and sessions stay. Returns false, and
    /// does nothing, if there is no such peer or it has these already.
    pub async fn set_allowed_ips(
        &self,
        key: &str,
        allowed: &[(Ipv6Addr, u8)],
    ) -> Result<bool, OverlayError> {
        {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            match peers.iter_mut().find(|q| q.key == key) {
                Some(q) if q.allowed != allowed => q.allowed = allowed.to_vec(),
                _ => return Ok(false),
            }
        }
        match &self.backend {
            Backend::Kernel(k) => k.set_allowed_ips(key, allowed)?,
            Backend::Userspace { device, .. } => {
                let pk = public_key(key)?;
                let nets: Vec<IpNetwork> = allowed
                    .iter()
                    .filter_map(|(ip, len)| IpNetwork::new(IpAddr::V6(*ip), *len).ok())
                    .collect();
                device
                    .write(async |d| {
                        d.modify_peer(&pk, |p| {
                            p.clear_allowed_ips();
                            p.add_allowed_ips(nets);
                        })
                        .await
                    })
                    .await
                    .map_err(|e| self.device_err(e))?;
            }
        }
        Ok(true)
    }

    pub async fn remove_peer(&self, key: &str) -> Result<(), OverlayError> {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|q| q.key != key);
        match &self.backend {
            Backend::Kernel(k) => k.remove_peer(key),
            Backend::Userspace { device, .. } => {
                device
                    .remove_peer(&public_key(key)?)
                    .await
                    .map_err(|e| self.device_err(e))?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root and a TUN device: what these tests need; they say SKIPPED
    /// without.
    fn can_make_tun() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("SKIPPED: needs root and /dev/net/tun");
            return false;
        }
        true
    }

    fn config(tun_name: &str, listen_port: u16) -> OverlayConfig {
        OverlayConfig {
            tun_name: tun_name.into(),
            address: None,
            listen_port,
            private_key: [9; 32],
            peers: Vec::new(),
        }
    }

    fn free_udp_port() -> u16 {
        let s = std::net::UdpSocket::bind("[::]:0").unwrap();
        s.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_taken_tun_name_is_named_not_blamed_on_the_kernel() {
        if !can_make_tun() {
            return;
        }
        let name = format!("phxt{}", std::process::id() % 100_000);
        let first = Overlay::start(config(&name, free_udp_port()), Mode::Auto)
            .await
            .unwrap();
        for mode in [Mode::Auto, Mode::Userspace] {
            let err = Overlay::start(config(&name, free_udp_port()), mode)
                .await
                .err()
                .expect("a second overlay on a taken name");
            assert!(
                matches!(&err, OverlayError::InterfaceExists { name: n } if *n == name),
                "{err}"
            );
        }
        drop(first);
    }

    #[tokio::test]
    async fn a_master_without_peers_holds_its_port_and_lets_go_at_the_first_peer() {
        if !can_make_tun() {
            return;
        }
        let name = format!("phxu{}", std::process::id() % 100_000);
        let port = free_udp_port();
        let overlay = Overlay::start(config(&name, port), Mode::Userspace)
            .await
            .unwrap();
        // A second daemon on this port is refused at its start.
        assert!(matches!(
            preflight::bind_udp(port),
            Err(OverlayError::PortInUse { port: p }) if p == port
        ));
        let other = Overlay::start(config("phxnever0", port), Mode::Userspace)
            .await
            .err()
            .expect("a second overlay on a taken port");
        assert!(matches!(other, OverlayError::PortInUse { .. }), "{other}");
        // The first peer brings the device up on that same port.
        let key = STANDARD.encode(PublicKey::from(&StaticSecret::from([3; 32])).as_bytes());
        overlay
            .set_peer(&PeerConfig {
                key,
                allowed: vec![(Ipv6Addr::LOCALHOST, 128)],
                endpoint: None,
                keepalive: None,
            })
            .await
            .unwrap();
        assert!(matches!(
            preflight::bind_udp(port),
            Err(OverlayError::PortInUse { .. })
        ));
    }

    #[tokio::test]
    async fn allowed_ips_are_replaced_for_a_known_peer_only() {
        if !can_make_tun() {
            return;
        }
        let name = format!("phxa{}", std::process::id() % 100_000);
        let overlay = Overlay::start(config(&name, free_udp_port()), Mode::Userspace)
            .await
            .unwrap();
        let key = STANDARD.encode(PublicKey::from(&StaticSecret::from([4; 32])).as_bytes());
        let a: Ipv6Addr = "fd38:dde8:32dd::2".parse().unwrap();
        let b: Ipv6Addr = "fd38:dde8:32dd:1::1".parse().unwrap();
        let endpoint = Some("10.0.0.2:51820".parse().unwrap());
        // Not a peer yet: nothing is done.
        assert!(!overlay.set_allowed_ips(&key, &[(a, 128)]).await.unwrap());
        assert!(overlay.peers().is_empty());
        overlay
            .set_peer(&PeerConfig {
                key: key.clone(),
                allowed: vec![(a, 128)],
                endpoint,
                keepalive: None,
            })
            .await
            .unwrap();
        assert!(
            overlay
                .set_allowed_ips(&key, &[(a, 128), (b, 128)])
                .await
                .unwrap()
        );
        let peers = overlay.peers();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].allowed, [(a, 128), (b, 128)]);
        assert_eq!(peers[0].endpoint, endpoint, "the endpoint stays");
        // The same again: nothing to do.
        assert!(
            !overlay
                .set_allowed_ips(&key, &[(a, 128), (b, 128)])
                .await
                .unwrap()
        );
        // The device agrees: b replaced nothing but was added, and a
        // second replacement drops it.
        assert!(overlay.set_allowed_ips(&key, &[(a, 128)]).await.unwrap());
        let Backend::Userspace { device, .. } = &overlay.backend else {
            unreachable!("userspace was asked for");
        };
        let stats = device.peers().await;
        assert_eq!(stats.len(), 1);
        let allowed: Vec<String> = stats[0]
            .peer
            .allowed_ips
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(allowed, ["fd38:dde8:32dd::2/128"]);
        assert_eq!(
            stats[0].peer.endpoint, endpoint,
            "the device's endpoint stays"
        );
        // set_peer replaces a peer's allowed IPs too; it does not add to them.
        overlay
            .set_peer(&PeerConfig {
                key: key.clone(),
                allowed: vec![(b, 128)],
                endpoint,
                keepalive: None,
            })
            .await
            .unwrap();
        let stats = device.peers().await;
        let allowed: Vec<String> = stats[0]
            .peer
            .allowed_ips
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(allowed, ["fd38:dde8:32dd:1::1/128"]);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("auto".parse::<Mode>(), Ok(Mode::Auto));
        assert_eq!("kernel".parse::<Mode>(), Ok(Mode::Kernel));
        assert!(
            "wg".parse::<Mode>()
                .unwrap_err()
                .contains("auto, kernel or userspace")
        );
    }
}
