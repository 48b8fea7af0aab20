//! The kernel's WireGuard, configured over netlink (the `wireguard` link
//! type through rtnetlink, the device and peers through generic netlink).
//!
//! Used where the kernel has the module. The machines this is developed on
//! have none, so only its absence (and the fallback to userspace) is
//! exercised by the tests here.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;

use wireguard_uapi::set::{AllowedIp, Device, Peer, WgDeviceF, WgPeerF};
use wireguard_uapi::{RouteSocket, WgSocket};

use crate::{MTU, OverlayError, PeerConfig, tun};

/// A kernel WireGuard interface owned by this process.
pub struct KernelWg {
    ifname: String,
    port: u16,
    sock: Mutex<WgSocket>,
}

fn err(port: u16, what: &str, e: impl std::fmt::Display) -> OverlayError {
    OverlayError::Device {
        port,
        detail: format!("kernel wireguard: {what}: {e}"),
    }
}

/// Whether the kernel can make WireGuard links: `Err` says why not.
pub fn create_link(ifname: &str) -> Result<(), String> {
    let mut route = RouteSocket::connect().map_err(|e| e.to_string())?;
    match route.add_device(ifname) {
        Ok(()) => Ok(()),
        // Left over from a previous run that was killed: reuse it.
        Err(e) if e.to_string().contains("File exists") => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

struct Keys {
    key: [u8; 32],
    endpoint: Option<SocketAddr>,
    allowed: Vec<(IpAddr, u8)>,
}

fn keys(p: &PeerConfig, port: u16) -> Result<Keys, OverlayError> {
    Ok(Keys {
        key: *crate::public_key(&p.key)?.as_bytes(),
        endpoint: p.endpoint,
        allowed: p
            .allowed
            .iter()
            .map(|(ip, len)| (IpAddr::V6(*ip), *len))
            .collect(),
    })
    .map_err(|e: OverlayError| err(port, "peer", e))
}

fn peer<'a>(k: &'a Keys, keepalive: Option<u16>, flags: Vec<WgPeerF>) -> Peer<'a> {
    let mut p = Peer::from_public_key(&k.key).flags(flags).allowed_ips(
        k.allowed
            .iter()
            .map(|(ip, len)| AllowedIp {
                ipaddr: ip,
                cidr_mask: Some(*len),
            })
            .collect(),
    );
    if let Some(e) = &k.endpoint {
        p = p.endpoint(e);
    }
    if let Some(k) = keepalive {
        p = p.persistent_keepalive_interval(k);
    }
    p
}

impl KernelWg {
    /// Configures the link `create_link` made: MTU, up, address, key, port, peers.
    pub fn start(
        ifname: &str,
        address: Option<Ipv6Addr>,
        port: u16,
        private_key: &[u8; 32],
        peers: &[PeerConfig],
    ) -> Result<KernelWg, OverlayError> {
        let tun_err = |source| OverlayError::Tun {
            name: ifname.to_owned(),
            source,
        };
        tun::set_mtu(ifname, MTU).map_err(tun_err)?;
        tun::set_up(ifname).map_err(tun_err)?;
        if let Some(ip) = address {
            tun::add_address(ifname, ip, 48).map_err(tun_err)?;
        }
        let mut sock = WgSocket::connect().map_err(|e| err(port, "connect", e))?;
        let keys = peers
            .iter()
            .map(|p| keys(p, port))
            .collect::<Result<Vec<_>, _>>()?;
        let device = Device::from_ifname(ifname)
            .flags(vec![WgDeviceF::ReplacePeers])
            .private_key(private_key)
            .listen_port(port)
            .peers(
                keys.iter()
                    .zip(peers)
                    .map(|(k, p)| peer(k, p.keepalive, vec![WgPeerF::ReplaceAllowedIps]))
                    .collect(),
            );
        sock.set_device(device)
            .map_err(|e| err(port, "configure", e))?;
        Ok(KernelWg {
            ifname: ifname.to_owned(),
            port,
            sock: Mutex::new(sock),
        })
    }

    fn set(&self, p: Peer<'_>) -> Result<(), OverlayError> {
        let device = Device::from_ifname(self.ifname.as_str()).peers(vec![p]);
        self.sock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_device(device)
            .map_err(|e| err(self.port, "set peer", e))
    }

    pub fn set_address(&self, ip: Ipv6Addr) -> Result<(), OverlayError> {
        tun::add_address(&self.ifname, ip, 48).map_err(|source| OverlayError::Tun {
            name: self.ifname.clone(),
            source,
        })
    }

    pub fn set_peer(&self, p: &PeerConfig) -> Result<(), OverlayError> {
        let k = keys(p, self.port)?;
        self.set(peer(&k, p.keepalive, vec![WgPeerF::ReplaceAllowedIps]))
    }

    /// Replaces a peer's allowed IPs; its endpoint and keepalive stay (a
    /// peer given without them keeps the kernel's).
    pub fn set_allowed_ips(
        &self,
        key: &str,
        allowed: &[(Ipv6Addr, u8)],
    ) -> Result<(), OverlayError> {
        let k = Keys {
            key: *crate::public_key(key)?.as_bytes(),
            endpoint: None,
            allowed: allowed
                .iter()
                .map(|(ip, len)| (IpAddr::V6(*ip), *len))
                .collect(),
        };
        self.set(peer(
            &k,
            None,
            vec![WgPeerF::ReplaceAllowedIps, WgPeerF::UpdateOnly],
        ))
    }

    pub fn remove_peer(&self, key: &str) -> Result<(), OverlayError> {
        let k = Keys {
            key: *crate::public_key(key)?.as_bytes(),
            endpoint: None,
            allowed: Vec::new(),
        };
        self.set(peer(&k, None, vec![WgPeerF::RemoveMe]))
    }

    /// Re-adds a peer so the kernel forgets its handshake backoff.
    pub fn refresh_peer(&self, p: &PeerConfig) -> Result<(), OverlayError> {
        self.remove_peer(&p.key)?;
        self.set_peer(p)
    }
}

impl Drop for KernelWg {
    fn drop(&mut self) {
        // Unlike a TUN device, a kernel link outlives the process.
        if let Ok(mut route) = RouteSocket::connect() {
            let _ = route.del_device(&self.ifname);
        }
    }
}
