//! Service networking across machines: every service in its own network
//! namespace at its own address, `link` enforced by the minions' nftables
//! rules, names from `/etc/hosts`, egress through the minion, moves that
//! keep the address, and nothing left behind.
//!
//! Each test is a cluster on the multi-host harness (a network namespace
//! per host); the services are testy, whose `/get?to=HOST:PORT` makes a
//! request from inside the service, so what is asserted is what a service
//! itself can and cannot reach.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use phoenix_e2e::netns::Net;
use phoenix_e2e::{Cluster, ServiceAt, bin, free_port, http_get_at, require_netns, wait_for};
use serde_json::{Value, json};

/// A testy spec on `machine` serving on `port` with a health check.
fn svc(machine: &str, name: &str, port: u16, link: &[&str]) -> Value {
    json!({
        "machine": machine, "name": name, "image": "testy", "type": "binary",
        "proxyport": port, "healthcheck": "/health", "link": link,
    })
}

/// What `from` gets for `GET http://to/path`, made from inside `from`
/// (which serves on `port`): `Ok(body)` or `Err(why)`.
fn reach(c: &Cluster, from: &str, port: u16, to: &str, path: &str) -> Result<String, String> {
    reach_at(c, &c.service_at(from, port), to, path)
}

/// [`reach`] from a service already located (so it works with the master
/// down).
fn reach_at(c: &Cluster, from: &ServiceAt, to: &str, path: &str) -> Result<String, String> {
    let q = format!("/get?to={to}&path={path}");
    match c.get(from, &q) {
        Some((200, body)) => Ok(body),
        Some((code, body)) => Err(format!("{code}: {body}")),
        None => Err(format!("{from:?} itself did not answer")),
    }
}

/// Asserts `from` cannot open a connection to `to`, and is told so at once
/// (a reject, not a timeout).
fn refused(c: &Cluster, from: &str, port: u16, to: &str) {
    let began = Instant::now();
    let r = reach(c, from, port, to, "/health");
    assert!(
        r.is_err(),
        "{from} reached {to}, which it does not link: {r:?}"
    );
    assert!(
        began.elapsed() < Duration::from_millis(1500),
        "{from} → {to} was refused only after {:?} (a timeout, not a reject): {r:?}",
        began.elapsed()
    );
}

/// The veths on a host beside its own `eth0`: one per service namespace.
fn service_veths(net: &Net, host: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args([
            "-n",
            &net.host(host).ns,
            "-o",
            "link",
            "show",
            "type",
            "veth",
        ])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
        .map(|n| n.split('@').next().unwrap_or("").to_owned())
        .filter(|n| n != "eth0")
        .collect()
}

/// A process ended when the test ends, also when it fails.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// testy on a host outside the cluster, standing in for the internet.
fn outside_server(net: &Net, host: &str, port: u16) -> Killed {
    Killed(
        net.command(host, &bin("testy"))
            .args(["--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start testy outside the cluster"),
    )
}

fn running(s: &Value) -> bool {
    s["state"] == "running" && s["health"] == "healthy"
}

#[test]
fn links_names_ports_and_egress_across_machines() {
    require_netns!();
    let net = Net::new(&["master", "m1", "m2", "internet"]);
    let internet = net.host("internet").ip;
    let outside_port = free_port();
    let _outside = outside_server(&net, "internet", outside_port);
    // An IPv6 internet too: global addresses on m1 and the outside host.
    for (host, ip) in [("m1", "2001:db8::2"), ("internet", "2001:db8::4")] {
        let ok = Command::new("ip")
            .args([
                "-n",
                &net.host(host).ns,
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                "eth0",
                "nodad",
            ])
            .status()
            .expect("ip addr add");
        assert!(ok.success(), "an IPv6 address for {host}");
    }
    // Something listening on m1 itself, outside any service.
    let host_port = free_port();
    let _on_m1 = outside_server(&net, "m1", host_port);
    let mut c = Cluster::start_on(net, 2);
    // `a` and `c` share a port on one machine; `b` on the other machine
    // links `a`; `d` beside `a` links it; `c` links nothing.
    let port = 8000;
    c.apply(
        "deploy",
        &json!([
            svc("m1", "a", port, &[]),
            svc("m1", "c", port, &[]),
            svc("m2", "b", port, &["a"]),
            svc("m1", "d", 8001, &["a"]),
        ]),
    );
    for name in ["a", "b", "c", "d"] {
        c.wait_status(name, "running and healthy", running);
    }
    let a_ip = c.service_ip("a");

    // Two services on one machine on one port, each at its own address,
    // health-checked there.
    let a_says = c.http_service("a", port, "/").expect("a answers");
    let c_says = c.http_service("c", port, "/").expect("c answers");
    assert!(a_says.1.contains("name=a"), "{a_says:?}");
    assert!(c_says.1.contains("name=c"), "{c_says:?}");

    // Linked: across machines by name, and on one machine.
    let to_a = format!("a:{port}");
    assert_eq!(reach(&c, "b", port, &to_a, "/health").as_deref(), Ok("ok"));
    assert_eq!(reach(&c, "d", 8001, &to_a, "/health").as_deref(), Ok("ok"));
    // By address too, and the name is in the service's hosts file.
    let by_ip = format!("[{a_ip}]:{port}");
    assert_eq!(reach(&c, "b", port, &by_ip, "/health").as_deref(), Ok("ok"));
    let hosts = c
        .http_service("b", port, "/file?path=/etc/hosts")
        .expect("b's /etc/hosts");
    assert!(
        hosts
            .1
            .lines()
            .any(|l| l.contains(&a_ip.to_string()) && l.split_whitespace().any(|w| w == "a")),
        "b's /etc/hosts names a at {a_ip}: {}",
        hosts.1
    );
    let env = c.http_service("b", port, "/env").expect("b's env").1;
    assert!(env.contains(&format!("PHOENIX_LINK_A={a_ip}")), "{env}");
    assert!(
        env.contains(&format!("PHOENIX_IP={}", c.service_ip("b"))),
        "{env}"
    );

    // Not linked: refused both ways across machines, and on one machine.
    let b_ip = c.service_ip("b");
    refused(&c, "a", port, &format!("[{b_ip}]:{port}"));
    refused(&c, "c", port, &by_ip);
    // A service cannot reach its minion's own overlay address either.
    refused(&c, "a", port, "[fd38:dde8:32dd::2]:51822");

    // The master reaches every service (the proxy will).
    let from_master = c.net.as_ref().unwrap().within("master", || {
        http_get_at(SocketAddr::new(a_ip.into(), port), "/health")
    });
    assert_eq!(from_master.map(|r| r.0), Some(200), "master → a");

    // Egress: a service reaches a host outside the cluster (IPv4, through
    // its minion's masquerade).
    let outside = format!("{internet}:{outside_port}");
    assert_eq!(
        reach(&c, "c", port, &outside, "/health").as_deref(),
        Ok("ok")
    );
    let outside6 = format!("[2001:db8::4]:{outside_port}");
    assert_eq!(
        reach(&c, "c", port, &outside6, "/health").as_deref(),
        Ok("ok")
    );
    // A port of the minion's own host, at the services' gateway (README).
    let gateway = format!("169.254.1.1:{host_port}");
    assert_eq!(
        reach(&c, "c", port, &gateway, "/health").as_deref(),
        Ok("ok")
    );

    // Service-to-service traffic does not go through the master.
    let (at_a, at_b) = (c.service_at("a", port), c.service_at("b", port));
    c.kill_master();
    assert_eq!(reach_at(&c, &at_b, &to_a, "/health").as_deref(), Ok("ok"));
    assert!(reach_at(&c, &at_a, &format!("[{b_ip}]:{port}"), "/health").is_err());
}

#[test]
fn moves_keep_the_address_and_nothing_is_left_behind() {
    require_netns!();
    let mut c = Cluster::start_on(Net::new(&["master", "m1", "m2"]), 2);
    let port = 8000;
    c.apply(
        "deploy",
        &json!([svc("m1", "a", port, &[]), svc("m2", "b", port, &["a"])]),
    );
    c.wait_status("a", "running and healthy", running);
    c.wait_status("b", "running and healthy", running);
    let a_ip = c.service_ip("a");
    let net = c.net.as_ref().unwrap();
    assert_eq!(service_veths(net, "m1").len(), 1, "one namespace on m1");

    // A minion killed mid-service and started again adopts the service
    // and its namespace: same process, same veth, still reachable.
    let pid = c.recorded_pid("m1", "a");
    let veths = service_veths(c.net.as_ref().unwrap(), "m1");
    c.kill_minion("m1");
    c.start_minion("m1");
    c.wait_reachable("m1");
    c.wait_status("a", "running and healthy again", running);
    assert_eq!(
        c.recorded_pid("m1", "a"),
        pid,
        "a was adopted, not restarted"
    );
    assert_eq!(
        service_veths(c.net.as_ref().unwrap(), "m1"),
        veths,
        "no namespace leaked or lost"
    );
    let to_a = format!("a:{port}");
    assert_eq!(reach(&c, "b", port, &to_a, "/health").as_deref(), Ok("ok"));

    // A move: same address on m2, reachable from b within a second of
    // running, nothing left on m1.
    let mut moved = svc("m2", "a", port, &[]);
    moved["ip"] = json!(a_ip.to_string());
    c.apply("update", &json!([moved]));
    c.wait_status("a", "running on m2", |s| s["machine"] == "m2" && running(s));
    assert_eq!(
        c.service_ip("a"),
        a_ip,
        "the address moved with the service"
    );
    let began = Instant::now();
    wait_for("b to reach a on m2", Duration::from_secs(1), || {
        reach(&c, "b", port, &to_a, "/health").ok()
    });
    eprintln!(
        "b reached a on m2 {:?} after a was running",
        began.elapsed()
    );
    wait_for("m1 to clean up", Duration::from_secs(5), || {
        service_veths(c.net.as_ref().unwrap(), "m1")
            .is_empty()
            .then_some(())
    });

    // A container on m1 resolves the names it links.
    let image = c.dir.path().join("testy-oci.tar");
    phoenix_e2e::oci::write_tar(
        &image,
        &[(
            "latest",
            phoenix_e2e::oci::testy_layers(),
            phoenix_e2e::oci::config(&["/testy"], &[]),
        )],
    );
    c.ok(&["push", image.to_str().unwrap(), "testy-oci.tar"]);
    let box_spec = json!({
        "machine": "m1", "name": "box", "image": "testy-oci.tar:latest", "type": "docker",
        "proxyport": port, "healthcheck": "/health", "link": ["a"],
    });
    c.apply("deploy", &json!([box_spec]));
    c.wait_status("box", "running and healthy", running);
    assert_eq!(
        reach(&c, "box", port, &to_a, "/health").as_deref(),
        Ok("ok")
    );
    refused(&c, "box", port, &format!("[{}]:{port}", c.service_ip("b")));

    // A service deleted while its minion is down: the minion finds its
    // namespace orphaned at start and removes it.
    c.apply("deploy", &json!([svc("m1", "gone", 8002, &[])]));
    c.wait_status("gone", "running and healthy", running);
    let before = service_veths(c.net.as_ref().unwrap(), "m1").len();
    c.kill_minion("m1");
    c.ok(&["del", "gone", "--detach"]);
    c.start_minion("m1");
    c.wait_reachable("m1");
    wait_for(
        "m1 to remove the orphan's namespace",
        Duration::from_secs(10),
        || (service_veths(c.net.as_ref().unwrap(), "m1").len() == before - 1).then_some(()),
    );

    // `del` removes namespaces on both machines.
    for name in ["a", "b", "box"] {
        c.ok(&["del", name]);
    }
    for host in ["m1", "m2"] {
        wait_for(
            &format!("{host} to clean up after del"),
            Duration::from_secs(5),
            || {
                service_veths(c.net.as_ref().unwrap(), host)
                    .is_empty()
                    .then_some(())
            },
        );
    }
}

#[test]
fn a_minion_without_nft_says_which_package_to_install() {
    require_netns!();
    let dir = tempfile::tempdir().unwrap();
    // A valid key; no master answers: the check comes first.
    let key = "foWMpOd85qhbo7PWS5DID5piFevx/1LThtyRlodUqDA=";
    let empty = dir.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let out = Command::new(bin("phoenix"))
        .args(["minion", "m1", "127.0.0.1", key, "127.0.0.1", "127.0.0.1"])
        .args(["--foreground", "--no-overlay", "--data-dir"])
        .arg(dir.path().join("m1"))
        .env("PATH", &empty)
        .stdin(Stdio::null())
        .output()
        .expect("run phoenix minion");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a minion without nft started: {said}"
    );
    assert!(
        said.contains("install the `nftables` package") && said.contains("--service-network host"),
        "{said}"
    );
}
