//! What a service's network is made of (its plan), the names of host-side
//! interfaces, and the node-local IPv4 egress addresses.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use phoenix_model::net::host_part;

/// The interface name inside every service's namespace.
pub const SERVICE_IF: &str = "eth0";

/// The IPv6 gateway of every service: the host end of its veth carries this
/// link-local address (the same on every host end, as each is its own link).
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The IPv4 gateway of every service, on every host end (link-local, so it
/// never clashes with an address of the host's own networks).
pub const GATEWAY4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The node-local IPv4 egress range, `100.64.0.0/10` (shared address space):
/// these addresses never leave the node; they are masqueraded on the way
/// out.
pub const EGRESS4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
/// The prefix length of [`EGRESS4`].
pub const EGRESS4_PREFIX: u8 = 10;

/// Everything that makes up one service's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// The service's name (for messages).
    pub service: String,
    /// Its cluster address, inside `fd38:dde8:32dd::/48`: the run's own
    /// address, where it is reached (health checks, the proxy).
    pub ipv6: Ipv6Addr,
    /// The service's stable address when this run holds it and it is not
    /// [`ipv6`](NetPlan::ipv6) (a run a zero-downtime update started, after
    /// the switch): on `eth0` beside it, with a host route of its own.
    pub held6: Option<Ipv6Addr>,
    /// Its node-local IPv4 egress address, from [`Ipv4Pool`].
    pub ipv4: Ipv4Addr,
    /// The name of the host end of its veth, from [`host_if_name`].
    pub host_if: String,
}

impl NetPlan {
    /// Every IPv6 address this run has: its own, then the held one.
    pub fn ipv6_addresses(&self) -> Vec<Ipv6Addr> {
        let mut out = vec![self.ipv6];
        out.extend(self.held6.filter(|h| *h != self.ipv6));
        out
    }
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

fn base32(bytes: &[u8], chars: usize) -> String {
    let mut bits: u128 = 0;
    for b in bytes.iter().take(16) {
        bits = bits << 8 | u128::from(*b);
    }
    (0..chars)
        .map(|i| char::from(BASE32[((bits >> (123 - 5 * i)) & 31) as usize]))
        .collect()
}

/// The prefix every host-side interface of minion `minion_id` starts with:
/// `ph` and 3 base32 characters (15 bits) of a BLAKE3 of the id, so minions
/// sharing a host (as in tests) each find their own interfaces.
pub fn host_if_prefix(minion_id: &str) -> String {
    let h = blake3::hash(minion_id.as_bytes());
    format!("ph{}", base32(h.as_bytes(), 3))
}

/// The host end of the veth of `service` (a run's key: the service's name,
/// or `NAME.GENERATION` for a run an update started) on minion `minion_id`: the minion's
/// [`host_if_prefix`] and 10 base32 characters (50 bits) of a BLAKE3 of
/// both names, 15 bytes in all (the kernel's limit).
pub fn host_if_name(service: &str, minion_id: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(minion_id.as_bytes());
    h.update(&[0]);
    h.update(service.as_bytes());
    format!(
        "{}{}",
        host_if_prefix(minion_id),
        base32(h.finalize().as_bytes(), 10)
    )
}

/// Node-local IPv4 egress addresses out of `100.64.0.0/10`.
///
/// Pure: it knows only the addresses it is told are in use. A service's
/// address follows from the host part of its IPv6 address when that one is
/// free (`fd38:dde8:32dd:1::1` → `100.64.0.1`), so a restarted minion that
/// rebuilds the pool in the same order hands out the same addresses;
/// otherwise the next free one after it.
#[derive(Debug, Clone, Default)]
pub struct Ipv4Pool {
    in_use: HashSet<Ipv4Addr>,
}

/// Usable offsets in the /10: 1 ..= SIZE - 2 (not the first and last).
const POOL_SIZE: u32 = 1 << (32 - EGRESS4_PREFIX);

impl Ipv4Pool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// A pool with these addresses taken.
    pub fn with_in_use(in_use: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        Ipv4Pool {
            in_use: in_use.into_iter().collect(),
        }
    }

    /// Whether `ip` is inside `100.64.0.0/10`.
    pub fn contains(ip: Ipv4Addr) -> bool {
        u32::from(ip) & !(POOL_SIZE - 1) == u32::from(EGRESS4)
    }

    /// The address `ipv6`'s service would get, without taking it; `None`
    /// when the pool is full.
    pub fn pick(&self, ipv6: Ipv6Addr) -> Option<Ipv4Addr> {
        if self.in_use.len() as u64 >= u64::from(POOL_SIZE - 2) {
            return None;
        }
        let usable = u64::from(POOL_SIZE - 2);
        let start = host_part(ipv6).wrapping_sub(1) % usable;
        (0..usable)
            .map(|i| (start + i) % usable + 1)
            .map(|off| Ipv4Addr::from(u32::from(EGRESS4) + off as u32))
            .find(|ip| !self.in_use.contains(ip))
    }

    /// Picks `ipv6`'s address and marks it taken.
    pub fn allocate(&mut self, ipv6: Ipv6Addr) -> Option<Ipv4Addr> {
        let ip = self.pick(ipv6)?;
        self.in_use.insert(ip);
        Some(ip)
    }

    /// Marks `ip` taken (an address a running service already has).
    pub fn reserve(&mut self, ip: Ipv4Addr) {
        self.in_use.insert(ip);
    }

    /// Gives `ip` back.
    pub fn release(&mut self, ip: Ipv4Addr) {
        self.in_use.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_model::net::service_ip;

    #[test]
    fn names_fit_and_differ() {
        let a = host_if_name("web", "m1");
        let b = host_if_name("web", "m2");
        let c = host_if_name("db", "m1");
        for n in [&a, &b, &c] {
            assert_eq!(n.len(), 15, "{n}");
            assert!(
                n.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            );
        }
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with(&host_if_prefix("m1")));
        assert!(c.starts_with(&host_if_prefix("m1")));
        assert!(!b.starts_with(&host_if_prefix("m1")));
        assert_eq!(a, host_if_name("web", "m1"), "deterministic");
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(host_if_name("c", "ab"), host_if_name("bc", "a"));
    }

    #[test]
    fn pool_follows_the_ipv6_host_part() {
        let mut pool = Ipv4Pool::new();
        assert_eq!(
            pool.allocate(service_ip(0)),
            Some(Ipv4Addr::new(100, 64, 0, 1))
        );
        assert_eq!(
            pool.allocate(service_ip(299)),
            Some(Ipv4Addr::new(100, 64, 1, 44))
        );
        // Taken: the next free one.
        let same_host: Ipv6Addr = "fd38:dde8:32dd:2::1".parse().unwrap();
        assert_eq!(pool.allocate(same_host), Some(Ipv4Addr::new(100, 64, 0, 2)));
        // Picking does not take.
        assert_eq!(pool.pick(service_ip(5)), pool.pick(service_ip(5)));
        pool.release(Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(pool.pick(same_host), Some(Ipv4Addr::new(100, 64, 0, 1)));
    }

    #[test]
    fn pool_stays_inside_the_range() {
        let pool = Ipv4Pool::new();
        for ip in [
            "fd38:dde8:32dd::".parse().unwrap(),
            "fd38:dde8:32dd:1:ffff:ffff:ffff:ffff".parse().unwrap(),
            service_ip((1 << 22) - 3),
            service_ip(1 << 22),
        ] {
            let v4 = pool.pick(ip).unwrap();
            assert!(Ipv4Pool::contains(v4), "{ip} -> {v4}");
            assert_ne!(v4, EGRESS4, "{ip}");
            assert_ne!(v4, Ipv4Addr::new(100, 127, 255, 255), "{ip}");
        }
        assert!(!Ipv4Pool::contains(Ipv4Addr::new(100, 128, 0, 1)));
        assert!(!Ipv4Pool::contains(Ipv4Addr::new(100, 63, 255, 255)));
    }

    #[test]
    fn wraps_around_and_fills() {
        let last = Ipv4Addr::new(100, 127, 255, 254);
        let mut pool = Ipv4Pool::with_in_use([last]);
        // The host part that maps to the last usable address wraps to the first.
        let ip = service_ip((1 << 22) - 3);
        assert_eq!(pool.allocate(ip), Some(Ipv4Addr::new(100, 64, 0, 1)));
        pool.reserve(Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(pool.pick(ip), Some(Ipv4Addr::new(100, 64, 0, 3)));
    }
}
