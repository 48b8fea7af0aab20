//! Preparing the minion's namespace: forwarding on, and the checks that
//! netlink, veth and nftables work, with errors that say what to install.

use std::io;
use std::process::Command;

use crate::firewall::{FirewallState, FwService, nft_run};
use crate::netlink::{self, Netlink, Request};
use crate::{NetError, host_err};

/// What [`prepare_host`] found and changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    /// Interfaces whose `accept_ra` went from 1 to 2, so that they keep
    /// taking router advertisements (and their default route) once
    /// forwarding is on.
    pub accept_ra_raised: Vec<String>,
    /// IPv6 forwarding was off and is now on.
    pub ipv6_forwarding_enabled: bool,
    /// IPv4 forwarding was off and is now on.
    pub ipv4_forwarding_enabled: bool,
    /// `nft --version`.
    pub nft_version: String,
    /// Other tables' forward chains whose policy is drop (`family table
    /// chain`, as nftables lists them; iptables-legacy rules are not seen).
    /// Such a chain, like Docker's `ip filter FORWARD`, drops forwarded
    /// service traffic whatever the minion's table accepts; the admin must
    /// let the service veths (`ph*`) through it, e.g. in `DOCKER-USER`.
    pub forward_drop: Vec<String>,
}

const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";
const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";
const IPV4_FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";

fn read_sysctl(path: &str) -> Result<String, NetError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| host_err(format!("reading {path}"), e))
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(|e| host_err(format!("writing {value} to {path}"), e))
}

/// Whether `name` looks like the host end of a Phoenix veth (ours or
/// another minion's on the same host).
fn is_phoenix_if(name: &str) -> bool {
    name.len() == 15 && name.starts_with("ph")
}

/// Prepares the calling thread's network namespace (the minion's) for
/// service namespaces. Checks first, so that nothing changes when one
/// fails:
///
/// - netlink answers (a link dump), and the kernel makes veth devices (a
///   test pair is created and deleted), else an error naming the `veth`
///   module;
/// - `nft` runs (`nft --version`) and takes a ruleset of the shape
///   [`apply_firewall`](crate::apply_firewall) loads (a dry run, `nft -c`),
///   else an error naming the `nftables` package.
///
/// Then it turns on IPv6 and IPv4 forwarding. A host configured by router
/// advertisements would lose them (and its default route) when IPv6
/// forwarding goes on, since a router ignores advertisements at
/// `accept_ra=1`; so every interface at `accept_ra=1` is first set to `2`
/// (take them even when forwarding). Service veths are left alone: their
/// host ends must never learn routes from a service.
pub fn prepare_host() -> Result<HostReport, NetError> {
    check_netlink()?;
    let nft_version = check_nft()?;

    let mut accept_ra_raised = Vec::new();
    let ipv6_forwarding = read_sysctl(IPV6_FORWARDING)?;
    if ipv6_forwarding != "1" {
        let dir = std::fs::read_dir(IPV6_CONF)
            .map_err(|e| host_err(format!("listing {IPV6_CONF}"), e))?;
        let mut names: Vec<String> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n != "all" && n != "default" && !is_phoenix_if(n))
            .collect();
        names.sort();
        for name in names {
            let path = format!("{IPV6_CONF}/{name}/accept_ra");
            // An interface may go away meanwhile: skip it.
            let Ok(value) = std::fs::read_to_string(&path) else {
                continue;
            };
            if value.trim() == "1" {
                write_sysctl(&path, "2")?;
                accept_ra_raised.push(name);
            }
        }
        write_sysctl(IPV6_FORWARDING, "1")?;
    }
    let ipv4_forwarding = read_sysctl(IPV4_FORWARDING)?;
    if ipv4_forwarding != "1" {
        write_sysctl(IPV4_FORWARDING, "1")?;
    }
    let forward_drop = forward_drop();
    for chain in &forward_drop {
        tracing::warn!(
            chain = %chain,
            "a forward chain drops by default: service traffic through this node is dropped unless it lets the service veths (ph*) through"
        );
    }
    Ok(HostReport {
        accept_ra_raised,
        ipv6_forwarding_enabled: ipv6_forwarding != "1",
        ipv4_forwarding_enabled: ipv4_forwarding != "1",
        nft_version,
        forward_drop,
    })
}

/// The forward chains that drop by default (best effort: an `nft` that
/// cannot list reports none).
fn forward_drop() -> Vec<String> {
    let Ok(out) = Command::new("nft").args(["-j", "list", "chains"]).output() else {
        return Vec::new();
    };
    serde_json::from_slice(&out.stdout)
        .map(|listing| crate::firewall::forward_drop_chains(&listing))
        .unwrap_or_default()
}

fn check_netlink() -> Result<(), NetError> {
    let mut nl = Netlink::open().map_err(|e| host_err("opening a netlink socket", e))?;
    nl.links()
        .map_err(|e| host_err("listing links over netlink", e))?;
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    let (a, b) = (format!("phck{tid:x}a"), format!("phck{tid:x}b"));
    match nl.request(Request::new(
        netlink::new_local_veth(&a, &b),
        netlink::CREATE_EXCL,
        "",
    )) {
        Ok(()) => {}
        Err(e) if e.source.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => {
            return Err(NetError::VethMissing { source: e.source });
        }
        Err(e) => {
            return Err(host_err(
                format!("creating a test veth pair {a} / {b}"),
                e.source,
            ));
        }
    }
    nl.request(Request::new(netlink::del_link(&a), 0, ""))
        .map_err(|e| host_err(format!("deleting the test veth {a}"), e.source))
}

fn check_nft() -> Result<String, NetError> {
    let out = Command::new("nft")
        .arg("--version")
        .output()
        .map_err(|source| NetError::NftablesMissing { source })?;
    if !out.status.success() {
        return Err(NetError::NftablesMissing {
            source: io::Error::other(format!(
                "nft --version: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        });
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let sample = FirewallState {
        services: vec![FwService {
            host_if: "phcheck".into(),
            own6: vec![phoenix_model::net::service_ip(0)],
            ipv4: crate::EGRESS4,
            allowed: vec![phoenix_model::net::service_ip(1)],
        }],
    };
    let json = crate::firewall::ruleset("check", &sample);
    nft_run(
        &["-j", "-c", "-f", "-"],
        &json.to_string(),
        "a dry run of the firewall",
    )?;
    Ok(version)
}
