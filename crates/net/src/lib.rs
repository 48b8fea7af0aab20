//! Per-service networking on a minion: a network namespace per service,
//! joined to the host by a veth, and the minion's nftables table that
//! enforces `link`.
//!
//! # The shape
//!
//! ```text
//!   service namespace              host: the minion's namespace
//!  ┌─────────────────────────┐    ┌──────────────────────────────────────────┐
//!  │ eth0                    │    │ phAAABBBBBBBBBB (host end)                │
//!  │   fd38:dde8:32dd:1::7/128    │   fe80::1/64, 169.254.1.1/32             │
//!  │   100.64.0.7/32         ├veth┤ route fd38:dde8:32dd:1::7/128 dev ph…    │
//!  │ default via fe80::1     │    │ route 100.64.0.7/32 dev ph…              │
//!  │ default via 169.254.1.1 │    │ TUN fd38:dde8:32dd::2/48 ── overlay ──▶ other nodes
//!  └─────────────────────────┘    │ table inet phoenix_<minion>: link, NAT   │
//!                                 └──────────────────────────────────────────┘
//! ```
//!
//! **A namespace held by a descriptor, not a bind mount.**
//! [`ServiceNet::create`] makes the namespace on a short-lived thread
//! (`unshare(CLONE_NEWNET)`, then `/proc/thread-self/ns/net` opened: that
//! descriptor is the handle), so the minion's own threads never change
//! namespace. A namespace lives as long as a descriptor to it or a process
//! in it, and nothing is mounted under `/run/netns`: a killed minion leaks
//! nothing (a service's processes keep its namespace while they run; the
//! kernel removes it, veth and all, after the last one), and a restarted
//! minion takes over a running service's namespace from `/proc/PID/ns/net`
//! ([`ServiceNet::adopt`]), repairing the host side if needed. The spawner
//! joins a new process into [`ServiceNet::netns`] before exec.
//!
//! **The veth.** `eth0` inside; the host end is named by [`host_if_name`]:
//! `ph`, a short hash of the minion (so [`cleanup_orphans`] finds this
//! minion's leftovers by prefix, even with several minions on one host), a
//! hash of the service. Inside: the service's cluster address as a /128 and
//! a node-local IPv4 egress address from `100.64.0.0/10` ([`Ipv4Pool`]) as a
//! /32, default routes via `fe80::1` and `169.254.1.1`, which every host end
//! carries. On the host: a /128 and a /32 route to the service through its
//! host end, so the node's /48 route into the overlay's TUN takes the rest.
//! IPv6 addresses are added without duplicate address detection and the
//! namespace has DAD and router solicitations off: the first packet never
//! waits. Everything is configured over rtnetlink (a small synchronous
//! client on the rust-netlink message crates) with requests pipelined, a
//! handful of system calls per service. [`ServiceNet::destroy`] deletes the
//! host end, which takes the pair at once.
//!
//! **The host.** [`prepare_host`] turns forwarding on (keeping router
//! advertisements working: interfaces at `accept_ra=1` go to `2` first) and
//! checks that netlink, veth and `nft` work, with errors that name what to
//! install.
//!
//! **The firewall.** One table per minion, `inet phoenix_<minion>`, rebuilt
//! whole from a [`FirewallState`] by [`apply_firewall`] in one `nft -j -f -`
//! transaction ([`ruleset`] is the pure part). New traffic from a service
//! into the cluster range is accepted only towards the addresses its `link`
//! names (a concatenated `ifname . ipv6_addr` set) and refused otherwise,
//! at once (TCP with a reset, the rest with ICMPv6 administratively
//! prohibited); a service cannot use another's source address, reach
//! another service through its node-local IPv4 address, or open connections
//! to the node's own cluster address; its IPv4, and its IPv6 to outside the
//! cluster, are masqueraded on the way out. Enforcement is at the source:
//! traffic arriving from the overlay is accepted, the sending minion has
//! checked it.
//!
//! "The host" is, everywhere in this crate, the network namespace of the
//! calling thread; the tests run everything inside a throwaway namespace.

mod firewall;
mod host;
mod netlink;
mod plan;
mod service;

use std::io;

pub use firewall::{
    FirewallState, FwService, apply_firewall, remove_firewall, ruleset, ruleset_delta, table_name,
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
