//! A service's network namespace, held by a descriptor, and its veth.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use rustix::thread::{LinkNameSpaceType, UnshareFlags, move_into_link_name_space};

use crate::netlink::{self, CREATE_EXCL, CREATE_REPLACE, Netlink, Request};
use crate::plan::{GATEWAY4, GATEWAY6, NetPlan, SERVICE_IF};
use crate::{NetError, host_err};

/// A service's network namespace and the veth that joins it to the host.
///
/// The namespace lives as long as this handle's descriptor or any process
/// inside it. Dropping the handle only closes the descriptor;
/// [`destroy`](ServiceNet::destroy) removes the veth at once.
///
/// "The host" is always the network namespace of the thread that calls
/// these functions: the minion's own, or a test's throwaway one.
///
/// Its methods take `&self`, so one handle can be shared (an `Arc`) by the
/// task that starts processes in it and a job that changes its addresses
/// ([`readdress`](ServiceNet::readdress)).
#[derive(Debug)]
pub struct ServiceNet {
    /// What it is built from now (only `held6` changes, by `readdress`).
    plan: Mutex<NetPlan>,
    /// Held by `readdress` for its whole run: changes never interleave.
    busy: Mutex<()>,
    ns: OwnedFd,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn svc_err(plan: &NetPlan, what: impl Into<String>, source: io::Error) -> NetError {
    NetError::Service {
        service: plan.service.clone(),
        what: what.into(),
        source,
    }
}

fn failed(plan: &NetPlan, f: netlink::Failed) -> NetError {
    svc_err(plan, f.what, f.source)
}

/// Opens the network namespace of the calling thread.
fn own_netns() -> io::Result<OwnedFd> {
    Ok(File::open("/proc/thread-self/ns/net")?.into())
}

/// Runs `f` on a fresh thread (which inherits the caller's network
/// namespace) and waits for it; the thread may change namespace freely, as
/// it ends with `f`.
fn on_thread<T: Send>(
    plan: &NetPlan,
    f: impl FnOnce() -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("phoenix-netns".into())
            .spawn_scoped(s, f)
            .map_err(|e| svc_err(plan, "starting a namespace thread", e))?;
        handle.join().map_err(|_| {
            svc_err(
                plan,
                "namespace thread",
                io::Error::other("the thread panicked"),
            )
        })?
    })
}

/// Runs `f` on a short-lived thread inside the network namespace `ns` and
/// returns its result; the calling thread never changes namespace. Sockets
/// opened and processes spawned in `f` belong to `ns`.
pub fn run_in<T: Send>(ns: BorrowedFd<'_>, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("phoenix-netns".into())
            .spawn_scoped(s, move || -> io::Result<T> {
                move_into_link_name_space(ns, Some(LinkNameSpaceType::Network))?;
                Ok(f())
            })?;
        handle
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
    })
}

fn write_sysctl(plan: &NetPlan, path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(|e| svc_err(plan, format!("writing {value} to {path}"), e))
}

/// Builds the veth and everything on it. Runs on a thread inside the
/// service's namespace; `host` is a socket in the host namespace and
/// `host_ns` that namespace.
fn plumb(
    plan: &NetPlan,
    host_ns: BorrowedFd<'_>,
    host: &mut Netlink,
    inner: &mut Netlink,
) -> Result<(), NetError> {
    // Sysctls under /proc/sys/net belong to the opener's namespace: these
    // are the service's. No duplicate address detection (its link-local
    // address is usable at once), no router solicitations (nobody sends
    // advertisements on this link).
    write_sysctl(plan, "/proc/sys/net/ipv6/conf/all/accept_dad", "0")?;
    write_sysctl(plan, "/proc/sys/net/ipv6/conf/default/accept_dad", "0")?;
    write_sysctl(
        plan,
        "/proc/sys/net/ipv6/conf/default/router_solicitations",
        "0",
    )?;

    let veth = || {
        Request::new(
            netlink::new_veth(SERVICE_IF, 0, &plan.host_if, host_ns),
            CREATE_EXCL,
            format!("creating veth {SERVICE_IF} / {}", plan.host_if),
        )
    };
    if let Err(e) = inner.request(veth()) {
        if e.source.raw_os_error() != Some(rustix::io::Errno::EXIST.raw_os_error()) {
            return Err(failed(plan, e));
        }
        // A host end left by an earlier namespace of this service (a minion
        // killed before it could destroy it): it is stale, replace it.
        tracing::warn!(service = %plan.service, host_if = %plan.host_if, "replacing a stale veth");
        host.request(Request::new(
            netlink::del_link(&plan.host_if),
            0,
            format!("deleting stale {}", plan.host_if),
        ))
        .map_err(|e| failed(plan, e))?;
        inner.request(veth()).map_err(|e| failed(plan, e))?;
    }
    let eth0 = eth0_index(plan, inner)?.ok_or_else(|| {
        svc_err(
            plan,
            format!("looking up {SERVICE_IF}"),
            io::Error::from(io::ErrorKind::NotFound),
        )
    })?;
    configure_inside(plan, inner, eth0, &[])?;
    host_side(plan, host).map(|_| ())
}

fn eth0_index(plan: &NetPlan, inner: &mut Netlink) -> Result<Option<u32>, NetError> {
    inner
        .link_index(SERVICE_IF)
        .map_err(|e| svc_err(plan, format!("looking up {SERVICE_IF}"), e))
}

/// The cluster and node-local addresses on `eth0` that the plan does not
/// have (left by an earlier plan: a restarted minion's other IPv4 address,
/// a stable address this run no longer holds).
fn stale_addresses(
    plan: &NetPlan,
    inner: &mut Netlink,
    eth0: u32,
) -> Result<Vec<(IpAddr, u8)>, NetError> {
    let present = inner
        .addresses(eth0)
        .map_err(|e| svc_err(plan, format!("listing the addresses of {SERVICE_IF}"), e))?;
    let own6 = plan.ipv6_addresses();
    Ok(present
        .into_iter()
        .filter(|(ip, _)| match ip {
            IpAddr::V6(v6) => phoenix_model::net::in_cluster(*v6) && !own6.contains(v6),
            IpAddr::V4(v4) => crate::Ipv4Pool::contains(*v4) && *v4 != plan.ipv4,
        })
        .collect())
}

/// Inside the namespace: `lo` and `eth0` up, the plan's addresses, the
/// `stale` ones removed (see [`stale_addresses`]: the plan is the truth),
/// the default routes. Idempotent, so it also repairs.
fn configure_inside(
    plan: &NetPlan,
    inner: &mut Netlink,
    eth0: u32,
    stale: &[(IpAddr, u8)],
) -> Result<(), NetError> {
    let mut requests = vec![
        Request::new(netlink::set_up(1), 0, "bringing lo up"),
        Request::new(
            netlink::set_up(eth0),
            0,
            format!("bringing {SERVICE_IF} up"),
        ),
    ];
    for ip in plan.ipv6_addresses() {
        requests.push(Request::new(
            netlink::new_addr(eth0, IpAddr::V6(ip), 128),
            CREATE_REPLACE,
            format!("adding {ip}/128 to {SERVICE_IF}"),
        ));
    }
    requests.push(Request::new(
        netlink::new_addr(eth0, IpAddr::V4(plan.ipv4), 32),
        CREATE_REPLACE,
        format!("adding {}/32 to {SERVICE_IF}", plan.ipv4),
    ));
    for &(ip, prefix) in stale {
        requests.push(Request::new(
            netlink::del_addr(eth0, ip, prefix),
            0,
            format!("removing the stale address {ip}/{prefix} from {SERVICE_IF}"),
        ));
    }
    requests.push(Request::new(
        netlink::new_default6(GATEWAY6, eth0),
        CREATE_REPLACE,
        format!("adding the route default via {GATEWAY6}"),
    ));
    requests.push(Request::new(
        netlink::new_default4(GATEWAY4, eth0),
        CREATE_REPLACE,
        format!("adding the route default via {GATEWAY4}"),
    ));
    inner.batch(requests).map_err(|e| failed(plan, e))
}

/// The index of the plan's host end.
fn host_index(plan: &NetPlan, host: &mut Netlink) -> Result<u32, NetError> {
    host.link_index(&plan.host_if)
        .map_err(|e| svc_err(plan, format!("looking up {}", plan.host_if), e))?
        .ok_or_else(|| {
            svc_err(
                plan,
                format!("looking up {}", plan.host_if),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })
}

/// Deletes the host routes of the `stale` addresses that go through the
/// host end at `index`, and only those: a route to that address through
/// another run's veth (which took the address over) stays.
fn drop_stale_routes(
    plan: &NetPlan,
    host: &mut Netlink,
    index: u32,
    stale: &[(IpAddr, u8)],
) -> Result<(), NetError> {
    let no_route = [
        rustix::io::Errno::SRCH.raw_os_error(),
        rustix::io::Errno::NOENT.raw_os_error(),
    ];
    for &(ip, _) in stale {
        let prefix = if ip.is_ipv6() { 128 } else { 32 };
        match host.request(Request::new(
            netlink::del_dev_route(ip, prefix, index),
            0,
            format!("deleting the route {ip}/{prefix} dev {}", plan.host_if),
        )) {
            Err(e)
                if !e
                    .source
                    .raw_os_error()
                    .is_some_and(|c| no_route.contains(&c)) =>
            {
                return Err(failed(plan, e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Brings an existing pair to the plan: the host routes of addresses the
/// run no longer has go (if they are still its own), the addresses inside
/// follow the plan, then the host side is repaired, its routes replaced
/// (each route to an address of the plan then goes through this host end,
/// taken over atomically from whichever veth had it).
fn converge(
    plan: &NetPlan,
    host: &mut Netlink,
    inner: &mut Netlink,
    eth0: u32,
) -> Result<(), NetError> {
    let stale = stale_addresses(plan, inner, eth0)?;
    if !stale.is_empty() {
        let index = host_index(plan, host)?;
        drop_stale_routes(plan, host, index, &stale)?;
    }
    configure_inside(plan, inner, eth0, &stale)?;
    host_side(plan, host).map(|_| ())
}

/// The host end's addresses and routes; idempotent (it also repairs). A
/// route to an address of the plan is replaced (`NLM_F_REPLACE`), so one
/// that went through another run's veth now goes through this one, with no
/// moment without a route. Returns the host end's index.
fn host_side(plan: &NetPlan, host: &mut Netlink) -> Result<u32, NetError> {
    let index = host_index(plan, host)?;
    let dev = &plan.host_if;
    let mut requests = vec![
        Request::new(netlink::set_up(index), 0, format!("bringing {dev} up")),
        Request::new(
            netlink::new_addr(index, IpAddr::V6(GATEWAY6), 64),
            CREATE_REPLACE,
            format!("adding {GATEWAY6}/64 to {dev}"),
        ),
        Request::new(
            netlink::new_addr(index, IpAddr::V4(GATEWAY4), 32),
            CREATE_REPLACE,
            format!("adding {GATEWAY4}/32 to {dev}"),
        ),
    ];
    for ip in plan.ipv6_addresses() {
        requests.push(Request::new(
            netlink::new_dev_route(IpAddr::V6(ip), 128, index),
            CREATE_REPLACE,
            format!("adding the route {ip}/128 dev {dev}"),
        ));
    }
    requests.push(Request::new(
        netlink::new_dev_route(IpAddr::V4(plan.ipv4), 32, index),
        CREATE_REPLACE,
        format!("adding the route {}/32 dev {dev}", plan.ipv4),
    ));
    host.batch(requests).map_err(|e| failed(plan, e))?;
    Ok(index)
}

/// The namespace a descriptor refers to, as (device, inode).
fn ns_id(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

impl ServiceNet {
    /// Creates the service's namespace with its veth, addresses and routes.
    ///
    /// Blocking (a few milliseconds): call it off an async runtime. The
    /// work happens on a short-lived thread, so the caller's thread never
    /// changes namespace.
    pub fn create(plan: &NetPlan) -> Result<ServiceNet, NetError> {
        let ns = on_thread(plan, || {
            let host_ns =
                own_netns().map_err(|e| svc_err(plan, "opening the host namespace", e))?;
            let mut host = Netlink::open()
                .map_err(|e| svc_err(plan, "opening a netlink socket in the host namespace", e))?;
            // SAFETY: only CLONE_NEWNET is unshared (not CLONE_FILES), so
            // this thread keeps sharing the process's descriptor table and
            // every descriptor stays valid for every thread.
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNET) }
                .map_err(|e| svc_err(plan, "creating a network namespace", e.into()))?;
            let ns = own_netns().map_err(|e| svc_err(plan, "opening the new namespace", e))?;
            let mut inner = Netlink::open()
                .map_err(|e| svc_err(plan, "opening a netlink socket in the new namespace", e))?;
            if let Err(e) = plumb(plan, host_ns.as_fd(), &mut host, &mut inner) {
                // The namespace goes with its descriptor (nothing runs in
                // it yet); remove the host end now rather than when the
                // kernel gets to it, so that a retry finds the name free.
                let _ = host.request(Request::new(netlink::del_link(&plan.host_if), 0, ""));
                return Err(e);
            }
            Ok(ns)
        })?;
        Ok(ServiceNet::new(plan, ns))
    }

    fn new(plan: &NetPlan, ns: OwnedFd) -> ServiceNet {
        ServiceNet {
            plan: Mutex::new(plan.clone()),
            busy: Mutex::new(()),
            ns,
        }
    }

    /// Takes over the namespace of a running service after a minion
    /// restart: opens `/proc/PID/ns/net`, checks that the host end of the
    /// veth is there and repairs its addresses and routes (or, if the veth
    /// is gone, builds it again inside that namespace), and makes the
    /// addresses inside match the plan (a minion that restarted may have
    /// handed out another IPv4 address). The caller checks
    /// first that `pid` is still its service (the run record's start time),
    /// as a pid can be reused.
    pub fn adopt(pid: u32, plan: &NetPlan) -> Result<ServiceNet, NetError> {
        let path = format!("/proc/{pid}/ns/net");
        let ns: OwnedFd = File::open(&path)
            .map_err(|e| svc_err(plan, format!("opening {path}"), e))?
            .into();
        let here = own_netns().map_err(|e| svc_err(plan, "opening the host namespace", e))?;
        let same = ns_id(ns.as_fd()).and_then(|a| Ok(a == ns_id(here.as_fd())?));
        if same.map_err(|e| svc_err(plan, format!("reading {path}"), e))? {
            return Err(svc_err(
                plan,
                format!("adopting process {pid}"),
                io::Error::other("it is in the host's own network namespace"),
            ));
        }
        let target = ns.as_fd();
        on_thread(plan, move || {
            let host_ns =
                own_netns().map_err(|e| svc_err(plan, "opening the host namespace", e))?;
            let mut host = Netlink::open()
                .map_err(|e| svc_err(plan, "opening a netlink socket in the host namespace", e))?;
            let link = host
                .link(&plan.host_if)
                .map_err(|e| svc_err(plan, format!("looking up {}", plan.host_if), e))?;
            if link.as_ref().is_some_and(|l| !netlink::is_veth(l)) {
                return Err(svc_err(
                    plan,
                    format!("adopting {}", plan.host_if),
                    io::Error::other("a link of that name exists and is not a veth"),
                ));
            }
            move_into_link_name_space(target, Some(LinkNameSpaceType::Network))
                .map_err(|e| svc_err(plan, format!("entering {path}"), e.into()))?;
            let mut inner = Netlink::open().map_err(|e| {
                svc_err(
                    plan,
                    "opening a netlink socket in the service's namespace",
                    e,
                )
            })?;
            match (link, eth0_index(plan, &mut inner)?) {
                (Some(_), Some(eth0)) => converge(plan, &mut host, &mut inner, eth0),
                // The pair is gone (or the host end joins some other
                // namespace): build it again.
                _ => {
                    tracing::warn!(service = %plan.service, host_if = %plan.host_if, "veth gone: building it again");
                    plumb(plan, host_ns.as_fd(), &mut host, &mut inner)
                }
            }
        })?;
        Ok(ServiceNet::new(plan, ns))
    }

    /// Makes the run hold `held6` (the service's stable address, beside
    /// its own) or, with `None`, hold nothing but its own address: the
    /// address is added to (or removed from) `eth0`, without duplicate
    /// address detection, then the host route to it is replaced so that it
    /// goes through this run's host end (`NLM_F_CREATE | NLM_F_REPLACE`:
    /// atomic, a client of that address never finds no route), or, when it
    /// is given up, deleted only if it still goes through this host end.
    /// Everything else is repaired on the way, as [`adopt`](Self::adopt)
    /// does.
    ///
    /// Blocking (a few netlink requests on a short-lived thread that
    /// enters the namespace); calls are serialised.
    pub fn readdress(&self, held6: Option<Ipv6Addr>) -> Result<(), NetError> {
        let _busy = lock(&self.busy);
        let plan = NetPlan {
            held6,
            ..self.plan()
        };
        let target = self.ns.as_fd();
        let p = &plan;
        on_thread(p, move || {
            let mut host = Netlink::open()
                .map_err(|e| svc_err(p, "opening a netlink socket in the host namespace", e))?;
            move_into_link_name_space(target, Some(LinkNameSpaceType::Network))
                .map_err(|e| svc_err(p, "entering the service's namespace", e.into()))?;
            let mut inner = Netlink::open().map_err(|e| {
                svc_err(p, "opening a netlink socket in the service's namespace", e)
            })?;
            let eth0 = eth0_index(p, &mut inner)?.ok_or_else(|| {
                svc_err(
                    p,
                    format!("looking up {SERVICE_IF}"),
                    io::Error::from(io::ErrorKind::NotFound),
                )
            })?;
            converge(p, &mut host, &mut inner, eth0)
        })?;
        *lock(&self.plan) = plan;
        Ok(())
    }

    /// The namespace, for the spawner to join (`setns`) before exec.
    pub fn netns(&self) -> BorrowedFd<'_> {
        self.ns.as_fd()
    }

    /// What this network is built from (`held6` as the last
    /// [`readdress`](Self::readdress) that succeeded left it).
    pub fn plan(&self) -> NetPlan {
        lock(&self.plan).clone()
    }

    /// Removes the veth now (deleting the host end takes the pair, and with
    /// it the service's only way out, at once) and closes the namespace's
    /// descriptor (once the last holder of this handle drops it). A veth
    /// already gone is not an error. The kernel drops the routes through
    /// the host end with it, and only those: a route to an address another
    /// run has taken over (see [`readdress`](Self::readdress)) stays.
    pub fn destroy(&self) -> Result<(), NetError> {
        let plan = self.plan();
        let mut host =
            Netlink::open().map_err(|e| svc_err(&plan, "opening a netlink socket", e))?;
        match host.request(Request::new(
            netlink::del_link(&plan.host_if),
            0,
            format!("deleting {}", plan.host_if),
        )) {
            Err(e) if e.source.raw_os_error() != Some(netlink::libc_enodev()) => {
                Err(failed(&plan, e))
            }
            _ => Ok(()),
        }
    }
}

/// Deletes the host ends of veths whose name starts with `prefix` (this
/// minion's, [`host_if_prefix`](crate::host_if_prefix)) and that are not in
/// `keep`: what a minion killed before it could destroy them left. Returns
/// the names deleted. Used at minion start, once the services it adopts are
/// known.
pub fn cleanup_orphans(prefix: &str, keep: &HashSet<String>) -> Result<Vec<String>, NetError> {
    if prefix.is_empty() {
        return Err(host_err(
            "cleaning up orphan veths",
            io::Error::new(io::ErrorKind::InvalidInput, "empty name prefix"),
        ));
    }
    let mut nl = Netlink::open().map_err(|e| host_err("opening a netlink socket", e))?;
    let links = nl.links().map_err(|e| host_err("listing links", e))?;
    let mut deleted = Vec::new();
    for l in &links {
        let Some(name) = netlink::link_name(l) else {
            continue;
        };
        if !name.starts_with(prefix) || keep.contains(name) || !netlink::is_veth(l) {
            continue;
        }
        match nl.request(Request::new(
            netlink::del_link(name),
            0,
            format!("deleting orphan veth {name}"),
        )) {
            Ok(()) => deleted.push(name.to_owned()),
            // Gone meanwhile (its namespace was torn down): fine.
            Err(e) if e.source.raw_os_error() == Some(netlink::libc_enodev()) => {}
            Err(e) => return Err(host_err(e.what, e.source)),
        }
    }
    Ok(deleted)
}
