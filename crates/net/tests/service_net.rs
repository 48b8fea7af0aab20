//! Service namespaces, their veths and the minion's firewall, for real.
//!
//! Each test runs its whole body on a thread that first moves into a fresh
//! network namespace, which stands in for the minion's host: nothing here
//! touches the machine's own network. Around it, the test builds what a
//! node would have: an "overlay" namespace behind `ov0` (the TUN's stand-in,
//! carrying the node's address `fd38:dde8:32dd::2/48`, with a service of
//! another node at `fd38:dde8:32dd:1::99`) and an "internet" namespace
//! behind `wan0` (`192.0.2.2`, `2001:db8:1::2`). Needs root and iproute2's
//! `ip`; skipped otherwise.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use phoenix_model::net::service_ip;
use phoenix_net::{
    FirewallState, FwService, NetPlan, ServiceNet, apply_firewall, cleanup_orphans, host_if_name,
    host_if_prefix, prepare_host, run_in,
};

const MINION: &str = "m1";
const PORT: u16 = 7000;
const NODE: Ipv6Addr = Ipv6Addr::new(0xfd38, 0xdde8, 0x32dd, 0, 0, 0, 0, 2);
const REMOTE: Ipv6Addr = Ipv6Addr::new(0xfd38, 0xdde8, 0x32dd, 1, 0, 0, 0, 0x99);
const WAN4_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const WAN4_PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const WAN6_HOST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const WAN6_PEER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);

/// Whether the tests can run here; says why not when they cannot.
fn can_run() -> bool {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: network namespace tests need root");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipped: these tests need iproute2's `ip`");
        return false;
    }
    true
}

/// Runs `f` on a thread of its own inside a fresh network namespace (the
/// test's "host"), with `lo` up.
fn in_fresh_host(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: only CLONE_NEWNET is unshared; the descriptor table stays
        // shared with the rest of the process.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
            .expect("unshare(CLONE_NEWNET)");
        sh("ip link set lo up");
        f();
    })
    .join()
    .expect("test body");
}

/// Runs a shell command in the calling thread's namespace; panics on failure.
fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh namespace, held by its descriptor.
fn new_ns() -> OwnedFd {
    std::thread::spawn(|| {
        // SAFETY: as in `in_fresh_host`.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
            .expect("unshare");
        sh("ip link set lo up");
        OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").expect("own ns"))
    })
    .join()
    .expect("namespace thread")
}

/// A path to `ns` that `ip ... netns PATH` can open.
fn ns_path(ns: BorrowedFd<'_>) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), ns.as_raw_fd())
}

/// The node's surroundings: the overlay (a remote service) and the
/// internet, each a namespace behind a veth. Keep it alive for the test.
struct World {
    _overlay: OwnedFd,
    internet: OwnedFd,
}

fn build_world() -> World {
    let overlay = new_ns();
    sh(&format!(
        "ip link add ov0 type veth peer name ov1 netns {path} && \
         ip -6 addr add {NODE}/48 dev ov0 nodad && ip -6 addr add fe80::2/64 dev ov0 nodad && \
         ip link set ov0 up",
        path = ns_path(overlay.as_fd())
    ));
    run_in(overlay.as_fd(), || {
        sh(&format!(
            "ip link set ov1 up && ip -6 addr add {REMOTE}/128 dev ov1 nodad && \
             ip -6 addr add fe80::99/64 dev ov1 nodad && \
             ip -6 route add fd38:dde8:32dd::/48 via fe80::2 dev ov1"
        ))
    })
    .unwrap();
    let internet = new_ns();
    sh(&format!(
        "ip link add wan0 type veth peer name up0 netns {path} && \
         ip addr add {WAN4_HOST}/24 dev wan0 && ip -6 addr add {WAN6_HOST}/64 dev wan0 nodad && \
         ip link set wan0 up",
        path = ns_path(internet.as_fd())
    ));
    run_in(internet.as_fd(), || {
        sh(&format!(
            "ip link set up0 up && ip addr add {WAN4_PEER}/24 dev up0 && \
             ip -6 addr add {WAN6_PEER}/64 dev up0 nodad"
        ))
    })
    .unwrap();
    // Everyone answers on PORT with the address it sees the caller at.
    serve(Some(overlay.as_fd()));
    serve(Some(internet.as_fd()));
    serve(None);
    World {
        _overlay: overlay,
        internet,
    }
}

/// Listens on `[::]:PORT` (IPv6 and IPv4) in `ns` (or here) and answers
/// every connection with the caller's address as it sees it.
fn serve(ns: Option<BorrowedFd<'_>>) {
    let bind = || TcpListener::bind((Ipv6Addr::UNSPECIFIED, PORT));
    let listener = match ns {
        Some(ns) => run_in(ns, bind).unwrap(),
        None => bind(),
    }
    .expect("listen");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let peer = conn.peer_addr().map(|a| a.ip()).ok();
            let peer = match peer {
                Some(IpAddr::V6(v6)) => v6
                    .to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6)),
                Some(v4) => v4,
                None => continue,
            };
            let _ = conn.write_all(peer.to_string().as_bytes());
        }
    });
}

/// Connects to `ip:PORT` from `ns` (or from here) and returns what the
/// other side saw as our address.
fn call(ns: Option<BorrowedFd<'_>>, ip: IpAddr) -> io::Result<String> {
    let go = move || -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(ip, PORT), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    };
    match ns {
        Some(ns) => run_in(ns, go)?,
        None => go(),
    }
}

/// Sends one UDP datagram from `ns`, from the source address `src` (which
/// must be on one of its interfaces), to `dst:PORT`.
fn datagram_from(ns: BorrowedFd<'_>, src: Ipv6Addr, dst: Ipv6Addr) {
    run_in(ns, move || {
        let s = UdpSocket::bind((src, 0)).expect("bind");
        s.send_to(b"hello", (dst, PORT)).expect("send");
    })
    .unwrap();
}

/// The source of the next datagram `rx` receives, if one comes soon.
fn received(rx: &UdpSocket) -> Option<IpAddr> {
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    rx.recv_from(&mut buf).ok().map(|(_, from)| from.ip())
}

/// Asserts that a call is refused, at once.
fn refused(ns: Option<BorrowedFd<'_>>, ip: IpAddr, why: &str) {
    let t = Instant::now();
    let r = call(ns, ip);
    let took = t.elapsed();
    let err = r.expect_err(why);
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::PermissionDenied
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
        ),
        "{why}: {err} ({:?})",
        err.kind()
    );
    assert!(took < Duration::from_millis(500), "{why}: took {took:?}");
}

/// One ICMPv6 echo from `ns` to `to`: `Ok` when answered.
fn ping(ns: BorrowedFd<'_>, to: Ipv6Addr) -> io::Result<()> {
    use rustix::net::{
        AddressFamily, RecvFlags, SendFlags, SocketAddrV6, SocketType, ipproto, recv, sendto,
        socket, sockopt,
    };
    run_in(ns, move || -> io::Result<()> {
        // Ping sockets are open to the groups in this range (per namespace).
        std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 0")?;
        let s = socket(
            AddressFamily::INET6,
            SocketType::DGRAM,
            Some(ipproto::ICMPV6),
        )?;
        sockopt::set_socket_timeout(&s, sockopt::Timeout::Recv, Some(Duration::from_secs(2)))?;
        let echo = [128u8, 0, 0, 0, 0, 0, 0, 1, b'p', b'h'];
        sendto(
            &s,
            &echo,
            SendFlags::empty(),
            &SocketAddrV6::new(to, 0, 0, 0),
        )?;
        let mut buf = [0u8; 64];
        let (_, n) = recv(&s, &mut buf[..], RecvFlags::empty())?;
        if n >= 8 && buf[0] == 129 {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "unexpected ICMPv6 type {}",
                buf[0]
            )))
        }
    })?
}

fn plan(service: &str, n: u64) -> NetPlan {
    NetPlan {
        service: service.into(),
        ipv6: service_ip(n),
        ipv4: Ipv4Addr::new(100, 64, 0, n as u8 + 1),
        held6: None,
        host_if: host_if_name(service, MINION),
    }
}

fn fw(net: &ServiceNet, allowed: &[Ipv6Addr]) -> FwService {
    let p = net.plan();
    FwService {
        host_if: p.host_if.clone(),
        own6: p.ipv6_addresses(),
        ipv4: p.ipv4,
        allowed: allowed.to_vec(),
    }
}

fn host_links() -> String {
    sh("ip -o link show")
}

#[test]
fn links_are_enforced_both_ways() {
    if !can_run() {
        return;
    }
    in_fresh_host(|| {
        let report = prepare_host().expect("prepare_host");
        // A new namespace starts with IPv6 forwarding off (IPv4's settings
        // are copied from the initial namespace).
        assert!(report.ipv6_forwarding_enabled, "{report:?}");
        let _world = build_world();
        let a = ServiceNet::create(&plan("a", 0)).expect("create a");
        let b = ServiceNet::create(&plan("b", 1)).expect("create b");
        serve(Some(a.netns()));
        serve(Some(b.netns()));
        let (a6, b6) = (IpAddr::V6(a.plan().ipv6), IpAddr::V6(b.plan().ipv6));

        // No firewall yet: everything flows.
        assert_eq!(call(Some(b.netns()), a6).unwrap(), b6.to_string());

        // a may call b and the remote service; b may call nobody.
        let state = FirewallState {
            services: vec![fw(&a, &[b.plan().ipv6, REMOTE]), fw(&b, &[])],
        };
        apply_firewall(MINION, &state).expect("apply");
        // Inside the cluster nothing is translated: b sees a's address.
        assert_eq!(call(Some(a.netns()), b6).unwrap(), a6.to_string());
        assert_eq!(
            call(Some(a.netns()), IpAddr::V6(REMOTE)).unwrap(),
            a6.to_string()
        );
        ping(a.netns(), b.plan().ipv6).expect("a pings b");
        refused(Some(b.netns()), a6, "b -> a is not linked");
        refused(Some(b.netns()), IpAddr::V6(REMOTE), "b -> remote");
        assert!(ping(b.netns(), a.plan().ipv6).is_err(), "b pings a");
        // a cannot pass for b: with b's address added inside a, what a
        // sends from it is dropped (while its own address still works).
        let (a_ip, b_ip) = (a.plan().ipv6, b.plan().ipv6);
        run_in(a.netns(), || {
            sh(&format!("ip -6 addr add {b_ip}/128 dev eth0 nodad"))
        })
        .unwrap();
        let rx = run_in(_world._overlay.as_fd(), || UdpSocket::bind((REMOTE, PORT)))
            .unwrap()
            .expect("udp");
        datagram_from(a.netns(), a_ip, REMOTE);
        assert_eq!(
            received(&rx),
            Some(IpAddr::V6(a_ip)),
            "from a's own address"
        );
        datagram_from(a.netns(), b_ip, REMOTE);
        assert_eq!(received(&rx), None, "a passing for b is dropped");
        run_in(a.netns(), || {
            sh(&format!("ip -6 addr del {b_ip}/128 dev eth0"))
        })
        .unwrap();
        // Not around link through the node-local IPv4 addresses.
        refused(
            Some(a.netns()),
            IpAddr::V4(b.plan().ipv4),
            "a -> b over IPv4",
        );
        // Nor to the node's own cluster address.
        refused(Some(a.netns()), IpAddr::V6(NODE), "a -> the node");
        // The host reaches both; the overlay reaches both (checked at its
        // source minion, not here).
        assert_eq!(call(None, a6).unwrap(), NODE.to_string());
        assert_eq!(call(None, b6).unwrap(), NODE.to_string());
        let overlay = _world._overlay.as_fd();
        assert_eq!(call(Some(overlay), b6).unwrap(), REMOTE.to_string());

        // Links change: the table is replaced in one go.
        let state = FirewallState {
            services: vec![fw(&a, &[]), fw(&b, &[a.plan().ipv6])],
        };
        apply_firewall(MINION, &state).expect("apply again");
        assert_eq!(call(Some(b.netns()), a6).unwrap(), b6.to_string());
        refused(Some(a.netns()), b6, "a -> b after the change");
        refused(Some(a.netns()), IpAddr::V6(REMOTE), "a -> remote after");

        a.destroy().unwrap();
        b.destroy().unwrap();
    });
}

#[test]
fn egress_is_masqueraded() {
    if !can_run() {
        return;
    }
    in_fresh_host(|| {
        prepare_host().expect("prepare_host");
        let world = build_world();
        let a = ServiceNet::create(&plan("a", 0)).expect("create a");
        apply_firewall(
            MINION,
            &FirewallState {
                services: vec![fw(&a, &[])],
            },
        )
        .unwrap();
        // The internet sees the host's addresses, never 100.64/10 or the
        // cluster's.
        assert_eq!(
            call(Some(a.netns()), IpAddr::V4(WAN4_PEER)).unwrap(),
            WAN4_HOST.to_string()
        );
        assert_eq!(
            call(Some(a.netns()), IpAddr::V6(WAN6_PEER)).unwrap(),
            WAN6_HOST.to_string()
        );
        drop(world.internet);
        a.destroy().unwrap();
    });
}

#[test]
fn destroy_leaves_no_veth() {
    if !can_run() {
        return;
    }
    in_fresh_host(|| {
        let p = plan("web", 3);
        let net = ServiceNet::create(&p).expect("create");
        assert!(host_links().contains(&p.host_if));
        let inside = run_in(net.netns(), || sh("ip -o addr show dev eth0")).unwrap();
        assert!(inside.contains(&format!("{}/128", p.ipv6)), "{inside}");
        assert!(inside.contains(&format!("{}/32", p.ipv4)), "{inside}");
        assert!(!inside.contains("tentative"), "{inside}");
        // A service started into it is reachable at once.
        serve(Some(net.netns()));
        assert!(call(None, IpAddr::V6(p.ipv6)).is_ok());
        net.destroy().expect("destroy");
        assert!(!host_links().contains(&p.host_if), "{}", host_links());
        assert!(!sh("ip -6 route").contains(&p.ipv6.to_string()));
        // Destroying twice (a veth already gone) is fine.
        let again = ServiceNet::create(&p).expect("create again");
        sh(&format!("ip link del {}", p.host_if));
        again.destroy().expect("destroy a gone veth");
    });
}

/// A process that lives in `ns` until killed.
fn sleeper(ns: BorrowedFd<'_>) -> std::process::Child {
    run_in(ns, || Command::new("sleep").arg("60").spawn())
        .unwrap()
        .expect("sleep")
}

#[test]
fn adopt_takes_over_a_running_service() {
    if !can_run() {
        return;
    }
    in_fresh_host(|| {
        let p = plan("web", 4);
        let net = ServiceNet::create(&p).expect("create");
        serve(Some(net.netns()));
        let mut child = sleeper(net.netns());
        // The minion goes away: its descriptor closes, the namespace stays
        // with the process.
        drop(net);
        sh(&format!("ip -6 route del {}/128", p.ipv6));
        assert!(call(None, IpAddr::V6(p.ipv6)).is_err());

        let net = ServiceNet::adopt(child.id(), &p).expect("adopt");
        call(None, IpAddr::V6(p.ipv6)).expect("the route is back");

        // The veth itself gone: adopt builds it again inside.
        drop(net);
        sh(&format!("ip link del {}", p.host_if));
        let net = ServiceNet::adopt(child.id(), &p).expect("adopt after the veth went");
        assert!(call(None, IpAddr::V6(p.ipv6)).is_ok());

        // A restarted minion handed out another IPv4 address: the plan wins.
        drop(net);
        let mut moved = p.clone();
        moved.ipv4 = Ipv4Addr::new(100, 64, 9, 9);
        let net = ServiceNet::adopt(child.id(), &moved).expect("adopt with another IPv4");
        let inside = run_in(net.netns(), || sh("ip -o addr show dev eth0")).unwrap();
        assert!(inside.contains("100.64.9.9/32"), "{inside}");
        assert!(!inside.contains(&format!("{}/32", p.ipv4)), "{inside}");
        assert!(inside.contains(&format!("{}/128", p.ipv6)), "{inside}");
        assert!(sh("ip route").contains("100.64.9.9 dev"));
        assert!(call(None, IpAddr::V6(p.ipv6)).is_ok());

        // A process of the host's own namespace is refused.
        let mut local = Command::new("sleep").arg("60").spawn().unwrap();
        let err = ServiceNet::adopt(local.id(), &p).unwrap_err().to_string();
        assert!(err.contains("host's own network namespace"), "{err}");
        local.kill().unwrap();
        local.wait().unwrap();
        // And a process that is gone is an error naming its namespace file.
        let err = ServiceNet::adopt(u32::MAX / 2, &p).unwrap_err().to_string();
        assert!(err.contains("/proc/") && err.contains("ns/net"), "{err}");

        child.kill().unwrap();
        child.wait().unwrap();
        net.destroy().unwrap();
    });
}

#[test]
fn orphans_are_cleaned_up() {
    if !can_run() {
        return;
    }
    in_fresh_host(|| {
        let keep = ServiceNet::create(&plan("keep", 5)).expect("create keep");
        let orphan = ServiceNet::create(&plan("orphan", 6)).expect("create orphan");
        let mut child = sleeper(orphan.netns());
        let orphan_if = orphan.plan().host_if.clone();
        drop(orphan);
        // Another minion's service on the same host is not ours to touch.
        let mut other = plan("keep", 7);
        other.host_if = host_if_name("keep", "m2");
        let other = ServiceNet::create(&other).expect("create m2's");

        let kept: HashSet<String> = [keep.plan().host_if.clone()].into();
        let deleted = cleanup_orphans(&host_if_prefix(MINION), &kept).expect("cleanup");
        assert_eq!(deleted, vec![orphan_if.clone()]);
        let links = host_links();
        assert!(!links.contains(&orphan_if), "{links}");
        assert!(links.contains(&keep.plan().host_if), "{links}");
        assert!(links.contains(&other.plan().host_if), "{links}");
        assert!(cleanup_orphans("", &kept).is_err(), "an empty prefix");

        child.kill().unwrap();
        child.wait().unwrap();
        keep.destroy().unwrap();
        other.destroy().unwrap();
    });
}

#[test]
fn a_stale_host_end_is_replaced() {
    if !can_run() {
        return;
    }
    in_fresh_host(|| {
        let p = plan("web", 8);
        let old = ServiceNet::create(&p).expect("create");
        let mut child = sleeper(old.netns());
        drop(old);
        // The minion lost track of it and starts the service afresh.
        let new = ServiceNet::create(&p).expect("create over a stale veth");
        serve(Some(new.netns()));
        assert!(call(None, IpAddr::V6(p.ipv6)).is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        new.destroy().unwrap();
    });
}

#[test]
fn prepare_host_is_idempotent() {
    if !can_run() {
        return;
    }
    in_fresh_host(|| {
        let first = prepare_host().expect("prepare_host");
        assert!(first.nft_version.starts_with("nftables"), "{first:?}");
        assert_eq!(sh("cat /proc/sys/net/ipv6/conf/all/forwarding").trim(), "1");
        assert_eq!(sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
        let second = prepare_host().expect("prepare_host again");
        assert!(!second.ipv6_forwarding_enabled && !second.ipv4_forwarding_enabled);
        assert!(second.accept_ra_raised.is_empty());
        assert!(second.forward_drop.is_empty(), "{second:?}");
        // A forward chain that drops by default (as Docker's) is reported.
        sh("nft add table ip filter && \
            nft add chain ip filter FORWARD '{ type filter hook forward priority 0; policy drop; }'");
        let third = prepare_host().expect("prepare_host with a dropping chain");
        assert_eq!(third.forward_drop, vec!["ip filter FORWARD"]);
    });
}

/// Listens on `[::]:PORT + 1` in `ns` and answers every connection with
/// `tag`: which namespace an address leads to.
fn serve_tag(ns: BorrowedFd<'_>, tag: &'static str) {
    let listener = run_in(ns, || TcpListener::bind((Ipv6Addr::UNSPECIFIED, PORT + 1)))
        .unwrap()
        .expect("listen");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.write_all(tag.as_bytes());
        }
    });
}

/// Who answers at `ip` (see [`serve_tag`]), from the host.
fn who(ip: Ipv6Addr) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::new(IpAddr::V6(ip), PORT + 1),
        Duration::from_secs(3),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The host's route to `ip`, as `ip -6 route` shows it ("" when none).
fn route_to(ip: Ipv6Addr) -> String {
    sh(&format!("ip -6 route show {ip}/128")).trim().to_owned()
}

#[test]
fn a_new_run_takes_over_the_stable_address_and_keeps_it() {
    if !can_run() {
        return;
    }
    in_fresh_host(|| {
        // The running version holds the service's stable address as its own.
        let stable = service_ip(20);
        let old = ServiceNet::create(&plan("web", 20)).expect("create the old run");
        // The update's run: its own address, not (yet) the stable one.
        let new = ServiceNet::create(&plan("web.2", 21)).expect("create the new run");
        serve_tag(old.netns(), "old");
        serve_tag(new.netns(), "new");
        assert_eq!(who(stable).unwrap(), "old");
        assert_eq!(who(service_ip(21)).unwrap(), "new");
        let new_if = new.plan().host_if;
        let old_if = old.plan().host_if;
        assert!(route_to(stable).contains(&old_if), "{}", route_to(stable));

        // The switch: the route is replaced, in one step.
        new.readdress(Some(stable)).expect("take over");
        assert_eq!(new.plan().held6, Some(stable));
        assert!(route_to(stable).contains(&new_if), "{}", route_to(stable));
        assert_eq!(who(stable).unwrap(), "new");
        assert_eq!(who(service_ip(21)).unwrap(), "new");
        let inside = run_in(new.netns(), || sh("ip -o -6 addr show dev eth0")).unwrap();
        assert!(inside.contains(&format!("{stable}/128")), "{inside}");
        assert!(!inside.contains("tentative"), "{inside}");
        // Doing it again changes nothing.
        new.readdress(Some(stable)).expect("again");
        assert_eq!(who(stable).unwrap(), "new");

        // The old run goes: its veth goes, the route to the new one stays.
        old.destroy().expect("destroy the old run");
        drop(old);
        assert!(!host_links().contains(&old_if));
        assert!(route_to(stable).contains(&new_if), "{}", route_to(stable));
        assert_eq!(who(stable).unwrap(), "new");
        ping_from_host(stable).expect("ping the stable address");

        // A third run takes it over; the second giving it up afterwards
        // must not remove the third's route, only its own address.
        let third = ServiceNet::create(&plan("web.3", 22)).expect("create a third run");
        serve_tag(third.netns(), "third");
        third.readdress(Some(stable)).expect("third takes over");
        assert_eq!(who(stable).unwrap(), "third");
        new.readdress(None).expect("the second gives it up");
        let inside = run_in(new.netns(), || sh("ip -o -6 addr show dev eth0")).unwrap();
        assert!(!inside.contains(&format!("{stable}/128")), "{inside}");
        assert!(
            route_to(stable).contains(&third.plan().host_if),
            "{}",
            route_to(stable)
        );
        assert_eq!(who(stable).unwrap(), "third");
        new.destroy().unwrap();
        assert_eq!(who(stable).unwrap(), "third");

        // Giving up an address whose route is its own removes the route.
        third.readdress(None).expect("the third gives it up");
        assert_eq!(route_to(stable), "");
        assert!(who(stable).is_err());

        // Adopted after a minion restart by a plan that holds it again
        // (the switch happened while the minion was down): taken back.
        let mut child = sleeper(third.netns());
        let mut p = third.plan();
        drop(third);
        p.held6 = Some(stable);
        let third = ServiceNet::adopt(child.id(), &p).expect("adopt holding");
        assert_eq!(who(stable).unwrap(), "third");
        // And by one that no longer holds it: given up.
        drop(third);
        p.held6 = None;
        let third = ServiceNet::adopt(child.id(), &p).expect("adopt not holding");
        assert_eq!(route_to(stable), "");
        let inside = run_in(third.netns(), || sh("ip -o -6 addr show dev eth0")).unwrap();
        assert!(!inside.contains(&format!("{stable}/128")), "{inside}");
        assert!(
            inside.contains(&format!("{}/128", service_ip(22))),
            "{inside}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        third.destroy().unwrap();
    });
}

/// One ICMPv6 echo from the host (the calling thread's namespace).
fn ping_from_host(to: Ipv6Addr) -> io::Result<()> {
    let here = OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net")?);
    ping(here.as_fd(), to)
}
