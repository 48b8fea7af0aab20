//! Per-service networking on a minion: a network namespace per service,
//! joined to the host by a veth, and the minion's nftables table that
//! enforces `link`.
//!
//! # The shape
//!
//! ```text
//!  service namespace                    host (the minion's namespace)                 other nodes
//!  ┌───────────────────────────┐        ┌───────────────────────────────────────┐
//!  │ eth0  fd38:dde8:32dd:1::7/128      │ phXXXYYYYYYYYYY  fe80::1/64            │
//!  │       100.64.0.7/32       ├─veth───┤                  169.254.1.1/32        │
//!  │ default via fe80::1       │        │ fd38:dde8:32dd:1::7/128 dev phX…      │  TUN (fd38:dde8:32dd::2/48)
//!  │ default via 169.254.1.1   │        │ 100.64.0.7/32 dev phX…                ├──── WireGuard ────▶
//!  └───────────────────────────┘        │ table inet phoenix_<minion>           │
//!                                       └───────────────────────────────────────┘
//! ```
//!
//! **A namespace held by a descriptor, not a bind mount.**
//! [`ServiceNet::create`] makes the namespace on a short-lived thread
//! (`unshare(CLONE_NEWNET)`, then `/proc/thread-self/ns/net` opened: that
//! descriptor is the handle), so the minion's own threads never change
//! namespace. A namespace lives as long as a descriptor to it or a process in
//! it: nothing is mounted under `/run/netns`, so a killed minion leaks no
//! namespace (the service's processes keep theirs alive while they run, and
//! the kernel removes it, with its veth, after the last one), and a restarted
//! minion takes over a running service's namespace from
//! `/proc/PID/ns/net` ([`ServiceNet::adopt`]), repairing the host side if
//! needed. The spawner joins a new process into [`ServiceNet::netns`].
//!
//! **The veth.** `eth0` inside, the host end named by [`host_if_name`]
//! (`ph` + a short hash of the minion, so [`cleanup_orphans`] finds this
//! minion's leftovers by prefix, + a hash of the service). Inside: the
//! service's cluster address as a /128 and a node-local IPv4 egress address
//! from `100.64.0.0/10` ([`Ipv4Pool`]) as a /32, default routes via
//! `fe80::1` and `169.254.1.1`, which every host end carries. On the host: a
//! /128 and a /32 route to the service through its host end. IPv6 addresses
//! are added without duplicate address detection, and the namespace has DAD
//! and router solicitations off, so the first packet never waits. Everything
//! is configured over rtnetlink (a small synchronous client on the
//! rust-netlink message crates), with requests pipelined: a create is a handful of
//! system calls. [`ServiceNet::destroy`] deletes the host end, which takes
//! the pair at once.
//!
//! **The host.** [`prepare_host`] turns forwarding on (keeping router
//! advertisements working: `accept_ra=1` becomes `2` first) and checks that
//! netlink, veth and `nft` work, with errors that name what to install.
//!
//! **The firewall.** One table per minion, `inet phoenix_<minion>`, rebuilt
//! whole and atomically from a [`FirewallState`] by [`apply_firewall`] (one
//! `nft -j -f -` transaction; [`ruleset`] is the pure part). Traffic from a
//! service to the cluster range is accepted only towards the addresses its
//! `link` names (a concatenated `ifname . ipv6_addr` set) and rejected with
//! ICMPv6 administratively-prohibited otherwise, so a forbidden connect fails
//! at once; a service cannot spoof another's source address nor open
//! connections to the node's own cluster address; its IPv4 and its traffic
//! to IPv6 addresses outside the cluster are masqueraded on the way out.
//! Enforcement is at the source: traffic arriving from the overlay is
//! accepted, since the sending minion has checked it.
//!
//! "The host" is, everywhere in this crate, the network namespace of the
//! calling thread, so tests run the whole thing inside a throwaway namespace.

mod firewall;
mod host;
mod netlink;
mod plan;
mod service;

use std::io;

pub use firewall::{
    FirewallState, FwService, apply_firewall, remove_firewall, ruleset, table_name,
};
pub use host::{HostReport, prepare_host};
pub use plan::{
    EGRESS4, EGRESS4_PREFIX, GATEWAY4, GATEWAY6, Ipv4Pool, NetPlan, SERVICE_IF, host_if_name,
    host_if_prefix,
};
pub use service::{ServiceNet, cleanup_orphans, run_in};

/// What went wrong, naming the service or host step and the kernel's or
/// tool's answer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A step of building, adopting or removing a service's network.
    #[error("network of service `{service}`: {what}: {source}")]
    Service {
        service: String,
        what: String,
        #[source]
        source: io::Error,
    },
    /// A step on the host (forwarding, checks, clean-up).
    #[error("host network: {what}: {source}")]
    Host {
        what: String,
        #[source]
        source: io::Error,
    },
    /// `nft` is not installed or does not run.
    #[error("nftables is missing: install the `nftables` package (apt-get install nftables)")]
    NftablesMissing {
        #[source]
        source: io::Error,
    },
    /// `nft` ran and refused.
    #[error("nft refused {what}: {stderr}")]
    Nft { what: String, stderr: String },
    /// The kernel cannot make veth devices.
    #[error(
        "veth network devices are not available ({source}): load the kernel module `veth` (modprobe veth)"
    )]
    VethMissing {
        #[source]
        source: io::Error,
    },
}

pub(crate) fn host_err(what: impl Into<String>, source: io::Error) -> NetError {
    NetError::Host {
        what: what.into(),
        source,
    }
}
