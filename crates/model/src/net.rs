//! The cluster's IPv6 plan.
//!
//! Everything lives in `fd38:dde8:32dd::/48` (seed 000). The first /64 is for
//! nodes: the master is `::1`, minions get `::2`, `::3`, ... in the order they
//! are accepted. Services that do not name an address get one from
//! `fd38:dde8:32dd:1::/64`; a spec may name any other address in the /48.

use std::net::Ipv6Addr;

/// The cluster prefix, `fd38:dde8:32dd::/48`.
pub const CLUSTER_PREFIX: [u16; 3] = [0xfd38, 0xdde8, 0x32dd];

/// The master's overlay address.
pub const MASTER_IP: Ipv6Addr = Ipv6Addr::new(0xfd38, 0xdde8, 0x32dd, 0, 0, 0, 0, 1);

/// Whether `ip` is inside `fd38:dde8:32dd::/48`.
pub fn in_cluster(ip: Ipv6Addr) -> bool {
    ip.segments()[..3] == CLUSTER_PREFIX
}

/// Whether `ip` is in the node range `fd38:dde8:32dd::/64`.
pub fn in_node_range(ip: Ipv6Addr) -> bool {
    in_cluster(ip) && ip.segments()[3] == 0
}

/// The overlay address of the `n`th node slot (0 is the master).
pub fn node_ip(n: u64) -> Ipv6Addr {
    with_host(0, n + 1)
}

/// The `n`th automatically assigned service address (n starts at 0).
pub fn service_ip(n: u64) -> Ipv6Addr {
    with_host(1, n + 1)
}

/// The host part (last 64 bits) of an address.
pub fn host_part(ip: Ipv6Addr) -> u64 {
    (u128::from(ip) & u128::from(u64::MAX)) as u64
}

fn with_host(subnet: u16, host: u64) -> Ipv6Addr {
    let [a, b, c] = CLUSTER_PREFIX;
    let net = u128::from(Ipv6Addr::new(a, b, c, subnet, 0, 0, 0, 0));
    Ipv6Addr::from(net | u128::from(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan() {
        assert_eq!(node_ip(0), MASTER_IP);
        assert_eq!(node_ip(1).to_string(), "fd38:dde8:32dd::2");
        assert_eq!(service_ip(0).to_string(), "fd38:dde8:32dd:1::1");
        assert!(in_cluster("fd38:dde8:32dd:ffff::9".parse().unwrap()));
        assert!(!in_cluster("fd38:dde8:32de::1".parse().unwrap()));
        assert!(in_node_range(MASTER_IP));
        assert!(!in_node_range(service_ip(3)));
        assert_eq!(host_part(service_ip(41)), 42);
    }
}
