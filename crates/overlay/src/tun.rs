//! A Linux TUN device, opened and configured with ioctls (no `ip` command,
//! no netlink library): the privileged part of the overlay, kept small.

use std::ffi::CStr;
use std::io;
use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use gotatun::packet::{Ip, Packet, PacketBufPool};
use gotatun::tun::{IpRecv, IpSend, MtuWatcher};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// `struct in6_ifreq` from `<linux/ipv6.h>`.
#[repr(C)]
struct In6Ifreq {
    addr: libc::in6_addr,
    prefixlen: u32,
    ifindex: libc::c_int,
}

/// Refuses what cannot be an interface name.
pub(crate) fn check_name(name: &str) -> io::Result<()> {
    let bad = |c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(bad) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{name:?} is not an interface name (1 to 15 characters, no '/', ':' or spaces)"
            ),
        ));
    }
    Ok(())
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    check_name(name)?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn check(ret: libc::c_int, what: &str, name: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what} on {name}: {e}")));
    }
    Ok(())
}

/// A socket for interface ioctls.
fn ctl_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An open TUN device; clones share the descriptor.
#[derive(Clone)]
pub struct Tun {
    fd: Arc<AsyncFd<OwnedFd>>,
    name: String,
    mtu: u16,
}

impl Tun {
    /// Creates (or attaches to) the TUN device `name`, gives it `addr/prefix`,
    /// sets its MTU and brings it up.
    pub fn create(name: &str, addr: Option<(Ipv6Addr, u8)>, mtu: u16) -> io::Result<Tun> {
        let path = c"/dev/net/tun";
        // SAFETY: open(2) on a constant C string; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("open /dev/net/tun: {e}")));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes the ifreq we own.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) };
        if ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY) {
            // Another process holds a TUN of this name.
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("interface {name} is in use by another process"),
            ));
        }
        check(ret, "TUNSETIFF", name)?;
        // SAFETY: the kernel wrote a NUL-terminated name into ifr_name.
        let actual = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        set_mtu(&actual, mtu)?;
        set_up(&actual)?;
        if let Some((ip, prefix)) = addr {
            add_address(&actual, ip, prefix)?;
        }
        // SAFETY: `fd` is an OwnedFd we just opened; the AsyncFd owns it for
        // its whole life and nothing else closes or replaces it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(Tun {
            fd: Arc::new(fd),
            name: actual,
            mtu,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds an address to the device (e.g. once the minion knows its own).
    pub fn add_address(&self, ip: Ipv6Addr, prefix: u8) -> io::Result<()> {
        add_address(&self.name, ip, prefix)
    }
}

pub(crate) fn set_mtu(name: &str, mtu: u16) -> io::Result<()> {
    let sock = ctl_socket(libc::AF_INET6)?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    // SAFETY: SIOCSIFMTU reads the ifreq we own.
    check(
        unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &req) },
        "set mtu",
        name,
    )
}

pub(crate) fn set_up(name: &str) -> io::Result<()> {
    let sock = ctl_socket(libc::AF_INET6)?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS writes into the ifreq we own.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    check(ret, "get flags", name)?;
    // SAFETY: the kernel filled ifru_flags above.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    check(
        unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) },
        "set flags",
        name,
    )
}

pub(crate) fn add_address(name: &str, ip: Ipv6Addr, prefix: u8) -> io::Result<()> {
    let sock = ctl_socket(libc::AF_INET6)?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFINDEX writes into the ifreq we own.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) };
    check(ret, "get index", name)?;
    let in6 = In6Ifreq {
        addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        prefixlen: u32::from(prefix),
        // SAFETY: the kernel filled ifru_ifindex above.
        ifindex: unsafe { req.ifr_ifru.ifru_ifindex },
    };
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads a struct in6_ifreq.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &in6) };
    if ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    check(ret, &format!("add address {ip}/{prefix}"), name)
}

impl IpSend for Tun {
    async fn send(&mut self, packet: Packet<Ip>) -> io::Result<()> {
        let bytes = packet.into_bytes();
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                // SAFETY: write(2) from a buffer we hold for the call's duration.
                let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            })
            .await
    }
}

impl IpRecv for Tun {
    async fn recv<'a>(
        &'a mut self,
        pool: &mut PacketBufPool,
    ) -> io::Result<impl Iterator<Item = Packet<Ip>> + Send + 'a> {
        loop {
            let mut packet = pool.get();
            let n = self
                .fd
                .async_io(Interest::READABLE, |fd| {
                    // SAFETY: read(2) into the packet buffer we own, bounded by its length.
                    let n = unsafe {
                        libc::read(fd.as_raw_fd(), packet.as_mut_ptr().cast(), packet.len())
                    };
                    if n < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                })
                .await?;
            packet.truncate(n);
            // Not an IP packet (the kernel sends none, but be safe): drop it.
            if let Ok(p) = packet.try_into_ip() {
                return Ok(std::iter::once(p));
            }
        }
    }

    fn mtu(&self) -> MtuWatcher {
        MtuWatcher::new(self.mtu)
    }
}
