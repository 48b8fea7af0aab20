//! The minion-to-minion WireGuard mesh, and `link` as the master checks
//! and reports it.
//!
//! The mesh tests run on the multi-host harness (a network namespace per
//! host, so each minion has its own overlay device and address) and skip
//! without root. What they assert is reachability between the minions'
//! overlay addresses: a TCP connection made from inside one host to a
//! listener on another's overlay address, with the master up and then
//! killed (so the path cannot go through it), and after a minion restarts
//! while the master is down (so the mesh comes from its saved set).

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use phoenix_e2e::{Cluster, Net, require_netns, testy, wait_for};
use serde_json::{Value, json};

const M1: Ipv6Addr = Ipv6Addr::new(0xfd38, 0xdde8, 0x32dd, 0, 0, 0, 0, 2);
const M2: Ipv6Addr = Ipv6Addr::new(0xfd38, 0xdde8, 0x32dd, 0, 0, 0, 0, 3);

/// A listener on `ip:port` inside `host` that answers every connection
/// with the host's name (until the test ends).
fn echo_name(net: &Net, host: &str, ip: Ipv6Addr, port: u16) {
    let addr = SocketAddr::new(ip.into(), port);
    // Bound inside the host's namespace; accepting works from any thread.
    let listener = wait_for(
        &format!("{host}'s overlay address {ip}"),
        Duration::from_secs(15),
        || net.within(host, || TcpListener::bind(addr).ok()),
    );
    let name = host.to_owned();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(name.as_bytes());
        }
    });
}

/// What a connection from inside `from` to `ip:port` reads, if it connects
/// within two seconds.
fn ask(net: &Net, from: &str, ip: Ipv6Addr, port: u16) -> Option<String> {
    let addr = SocketAddr::new(ip.into(), port);
    net.within(from, || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        Some(answer)
    })
}

/// Waits until `from` reaches `to`'s listener on `ip:port`; returns how long
/// that took.
fn reaches(net: &Net, from: &str, to: &str, ip: Ipv6Addr, port: u16) -> Duration {
    let began = Instant::now();
    wait_for(
        &format!("{from} to reach {to} at [{ip}]:{port}"),
        Duration::from_secs(20),
        || (ask(net, from, ip, port).as_deref() == Some(to)).then_some(()),
    );
    began.elapsed()
}

/// A minion's saved desired set, as it holds it on disk.
fn saved_set(c: &Cluster, minion: &str) -> Value {
    let text = std::fs::read_to_string(c.minion_dir(minion).join("desired.json"))
        .unwrap_or_else(|_| "{}".into());
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// The addresses `minion` has for its mesh peer `peer`, per its saved set.
fn peer_services(c: &Cluster, minion: &str, peer: &str) -> Option<Vec<String>> {
    let set = saved_set(c, minion);
    let p = set["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node"] == peer)?;
    Some(
        p["services"]
            .as_array()?
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
    )
}

#[test]
fn minions_reach_each_other_directly_also_without_the_master() {
    require_netns!();
    let net = Net::new(&["master", "m1", "m2"]);
    let mut c = Cluster::start_on(net, 2);
    let port = 7001;
    {
        let net = c.net.as_ref().unwrap();
        echo_name(net, "m1", M1, port);
        echo_name(net, "m2", M2, port);
        let took = reaches(net, "m1", "m2", M2, port);
        eprintln!("m1 → m2 over the mesh after accept: {took:?}");
        reaches(net, "m2", "m1", M1, port);
    }
    // Each has the other as a peer, with its endpoint.
    let set = saved_set(&c, "m1");
    let peers = set["peers"].as_array().expect("m1's set lists peers");
    assert_eq!(peers.len(), 1, "{set}");
    assert_eq!(peers[0]["node"], "m2");
    assert_eq!(peers[0]["overlay_ip"], M2.to_string());
    assert_eq!(peers[0]["endpoint"], "10.99.0.3:51820");

    // No master: whatever still connects goes straight between them.
    c.kill_master();
    {
        let net = c.net.as_ref().unwrap();
        reaches(net, "m1", "m2", M2, port);
        reaches(net, "m2", "m1", M1, port);
    }

    // A minion restarted while the master is down builds its mesh from its
    // saved set.
    c.kill_minion("m1");
    c.start_minion("m1");
    let net = c.net.as_ref().unwrap();
    // Its overlay device is new: listen on its address again.
    echo_name(net, "m1", M1, port + 1);
    let took = reaches(net, "m1", "m2", M2, port);
    eprintln!("m1 → m2 after m1 restarted without a master: {took:?}");
    reaches(net, "m2", "m1", M1, port + 1);
}

#[test]
fn a_moved_service_reaches_every_minions_mesh_at_once() {
    require_netns!();
    let net = Net::new(&["master", "m1", "m2", "m3"]);
    let c = Cluster::start_on(net, 3);
    let spec = testy("m1", "web", &[]);
    c.apply("deploy", &spec);
    let ip = c.status("web")["ip"].as_str().unwrap().to_owned();
    for m in ["m2", "m3"] {
        wait_for(
            &format!("{m}'s peer m1 to serve web"),
            Duration::from_secs(5),
            || (peer_services(&c, m, "m1")? == [ip.clone()]).then_some(()),
        );
    }

    let mut moved = spec.clone();
    moved["machine"] = json!("m2");
    let path = c.dir.path().join("moved.json");
    std::fs::write(&path, moved.to_string()).unwrap();
    let began = Instant::now();
    c.ok(&["update", path.to_str().unwrap(), "--detach"]);
    // The change is stored (and pushed) by the time the CLI returns; what
    // is measured from there is the push and the minions' taking it in.
    let stored = Instant::now();
    let web = vec![ip.clone()];
    let none: Vec<String> = Vec::new();
    // Every minion's set: m1 and m3 see web at m2, m2 and m3 no longer at m1.
    for (m, peer, serves) in [
        ("m1", "m2", &web),
        ("m3", "m2", &web),
        ("m3", "m1", &none),
        ("m2", "m1", &none),
    ] {
        wait_for(
            &format!("{m}'s peer {peer} to serve {serves:?}"),
            Duration::from_secs(5),
            || (peer_services(&c, m, peer)? == *serves).then_some(()),
        );
    }
    let (total, after) = (began.elapsed(), stored.elapsed());
    eprintln!(
        "a move reached the other minions' saved sets {after:?} after the CLI returned ({total:?} from its start)"
    );
    assert!(
        after < Duration::from_secs(1),
        "a move took {after:?} after it was stored to reach the other minions"
    );
}

#[test]
fn a_link_to_no_service_is_refused_and_a_deleted_one_shows_in_status() {
    let c = Cluster::start(1);
    let mut web = testy("m1", "web", &[]);
    web["link"] = json!(["db"]);
    let path = c.dir.path().join("web.json");
    std::fs::write(&path, web.to_string()).unwrap();
    let err = c.fails(&["deploy", path.to_str().unwrap()]);
    assert!(err.contains(r#"spec "web": field `link[0]`"#), "{err}");
    assert!(err.contains(r#"no service named "db""#), "{err}");
    assert_eq!(
        c.json(&["services", "--json"]),
        json!([]),
        "nothing of the refused file is stored"
    );

    // A close name is suggested.
    let db = testy("m1", "db", &[]);
    c.apply("deploy", &db);
    let mut typo = web.clone();
    typo["link"] = json!(["dbb"]);
    std::fs::write(&path, typo.to_string()).unwrap();
    let err = c.fails(&["deploy", path.to_str().unwrap()]);
    assert!(err.contains(r#"did you mean "db"?"#), "{err}");

    c.apply("deploy", &web);
    let status = c.status("web");
    assert!(status.get("dangling_links").is_none(), "{status}");
    // Deleting what another service links to is allowed; the link dangles.
    c.ok(&["del", "db"]);
    let status = c.status("web");
    assert_eq!(status["dangling_links"], json!(["db"]), "{status}");
    let text = c.ok(&["status", "web"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("links:") && l.ends_with("db (no such service)")),
        "{text}"
    );
}
