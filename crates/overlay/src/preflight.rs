//! What an overlay claims on this machine, checked before a daemon touches
//! anything: its interface name and its UDP port.
//!
//! Two daemons on one machine with the default flags would otherwise fail
//! far from the cause: a TUN name another process holds made the kernel
//! path report a missing WireGuard module, and a WireGuard port another
//! daemon holds surfaced only when the master added its first peer (at an
//! `accept`). Each check names the flag that fixes it.
//!
//! A kernel WireGuard link outlives its process, so one left behind by a
//! daemon that was killed is not "taken": it is ours if it carries our own
//! public key (the key lives in the data dir, which only one daemon runs
//! from at a time), and is then reused.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6, UdpSocket};

use gotatun::x25519::{PublicKey, StaticSecret};
use wireguard_uapi::{DeviceInterface, WgSocket};

use crate::OverlayError;

/// Checks that interface `tun_name` does not exist (or is our own
/// leftover kernel WireGuard link) and that UDP `wg_port` is free.
pub fn check_free(
    tun_name: &str,
    wg_port: u16,
    private_key: &[u8; 32],
) -> Result<(), OverlayError> {
    crate::tun::check_name(tun_name).map_err(|source| OverlayError::Tun {
        name: tun_name.to_owned(),
        source,
    })?;
    let mut port_is_our_links = false;
    if interface_exists(tun_name) {
        match leftover_link_port(tun_name, private_key) {
            Some(port) => {
                tracing::info!(
                    interface = tun_name,
                    "reusing our kernel WireGuard link left by an earlier run"
                );
                port_is_our_links = port == wg_port;
            }
            None => {
                return Err(OverlayError::InterfaceExists {
                    name: tun_name.to_owned(),
                });
            }
        }
    }
    if !port_is_our_links {
        bind_udp(wg_port)?;
    }
    Ok(())
}

/// Whether a network interface of that name exists in our network
/// namespace (`if_nametoindex` asks the kernel; `/sys` may show another
/// namespace's).
pub fn interface_exists(name: &str) -> bool {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads the NUL-terminated string we own.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) != 0 }
}

/// The listen port of kernel WireGuard link `name` if it carries our key.
fn leftover_link_port(name: &str, private_key: &[u8; 32]) -> Option<u16> {
    let ours = PublicKey::from(&StaticSecret::from(*private_key));
    let device = WgSocket::connect()
        .ok()?
        .get_device(DeviceInterface::from_name(name))
        .ok()?;
    (device.public_key == Some(*ours.as_bytes())).then_some(device.listen_port)
}

/// Binds UDP `port` on every address, IPv4 and IPv6, as WireGuard will.
/// The sockets hold the port for as long as they live.
pub fn bind_udp(port: u16) -> Result<Vec<UdpSocket>, OverlayError> {
    let in_use = |e: io::Error| {
        if e.kind() == io::ErrorKind::AddrInUse {
            OverlayError::PortInUse { port }
        } else {
            OverlayError::Device {
                port,
                detail: format!("cannot bind udp port {port}: {e}"),
            }
        }
    };
    let mut held = Vec::new();
    match UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)) {
        Ok(v6) => {
            // A dual-stack socket (the usual `bindv6only = 0`) holds the
            // IPv4 port too; otherwise IPv4 needs a socket of its own.
            let dual = !only_v6(&v6);
            held.push(v6);
            if dual {
                return Ok(held);
            }
        }
        // No IPv6 on this machine: IPv4 alone, as WireGuard does then.
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
        Err(e) => return Err(in_use(e)),
    }
    held.push(UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).map_err(in_use)?);
    Ok(held)
}

/// Whether an IPv6 socket leaves IPv4 alone (`IPV6_V6ONLY`).
fn only_v6(socket: &UdpSocket) -> bool {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = 1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the int we own.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    // Unknown: assume IPv6 only, and bind IPv4 too.
    ret != 0 || value != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_udp_port_in_use_is_named_with_the_flag_that_fixes_it() {
        let holder = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let err = bind_udp(port).unwrap_err();
        assert!(matches!(err, OverlayError::PortInUse { port: p } if p == port));
        let msg = err.to_string();
        assert!(msg.contains(&format!("UDP {port} is in use")), "{msg}");
        assert!(msg.contains("--wg-port"), "{msg}");
        drop(holder);
        let held = bind_udp(port).unwrap();
        // Held: a second daemon now finds it in use.
        assert!(matches!(
            bind_udp(port),
            Err(OverlayError::PortInUse { .. })
        ));
        drop(held);
        bind_udp(port).unwrap();
    }

    #[test]
    fn an_existing_interface_is_refused_before_anything_is_touched() {
        // `lo` exists everywhere and is no WireGuard link of ours.
        let err = check_free("lo", 0, &[7; 32]).unwrap_err();
        assert!(matches!(&err, OverlayError::InterfaceExists { name } if name == "lo"));
        let msg = err.to_string();
        assert!(msg.contains("interface lo exists"), "{msg}");
        assert!(msg.contains("--tun-name"), "{msg}");
        assert!(!interface_exists("phx-nonesuch9"));
        check_free("phx-nonesuch9", 0, &[7; 32]).unwrap();
    }

    #[test]
    fn a_name_no_interface_can_have_is_refused() {
        let err = check_free("a-name-far-too-long-for-linux", 0, &[7; 32]).unwrap_err();
        assert!(err.to_string().contains("not an interface name"), "{err}");
    }
}
