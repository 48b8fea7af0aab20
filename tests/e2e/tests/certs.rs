//! The master's proxy with real certificates: pebble (an ACME server) and
//! its DNS server run in a host of their own ("acme"), every name resolves
//! to the master, and pebble validates HTTP-01 against the master's proxy
//! on port 80. Two services under two names each get a certificate; a
//! client in a host of its own ("client") checks what port 443 serves by
//! SNI against pebble's root, the redirect from HTTP, a WebSocket-style
//! upgrade through the proxy, and that a master restart orders nothing.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phoenix_e2e::netns::Net;
use phoenix_e2e::pebble::{self, Pebble, TlsStream, peer_leaf, read_all, tls_connect};
use phoenix_e2e::{Cluster, require_netns};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};

const NAMES: [(&str, &str); 2] = [("a.example", "site-a"), ("b.example", "site-b")];

fn testy(machine: &str, name: &str, host: &str) -> Value {
    json!({
        "machine": machine, "name": name, "image": "testy", "type": "binary",
        "proxyport": 8000, "healthcheck": "/health", "proxyname": host,
    })
}

fn running(s: &Value) -> bool {
    s["state"] == "running" && s["health"] == "healthy"
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A reply split into (status, head, body).
fn parse(reply: &[u8]) -> Option<(u16, String, String)> {
    let reply = String::from_utf8_lossy(reply);
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, head.to_owned(), body.to_owned()))
}

/// A header's value in a reply head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One plain HTTP/1.1 GET to `to` with `host`.
fn http_get(to: SocketAddr, host: &str, path: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    parse(&read_all(&mut s).ok()?)
}

/// One HTTPS GET to `to` with SNI and Host `host`, trusting `root` only;
/// the reply and the leaf certificate served.
fn https_get(
    to: SocketAddr,
    host: &str,
    path: &str,
    root: &CertificateDer<'static>,
) -> Result<((u16, String, String), CertificateDer<'static>), String> {
    let mut s = tls_connect(to, host, root).map_err(|e| format!("TLS to {host}: {e}"))?;
    let leaf = peer_leaf(&s).ok_or("no certificate served")?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let reply = read_all(&mut s).map_err(|e| format!("reading from {host}: {e}"))?;
    let reply = parse(&reply).ok_or_else(|| format!("no HTTP reply: {reply:?}"))?;
    Ok((reply, leaf))
}

/// `phoenix routes --json`'s certificate for `host`: (not_after,
/// next_attempt), once it has one.
fn cert_of(routes: &Value, host: &str) -> Option<(u64, u64)> {
    let route = routes["routes"]
        .as_array()?
        .iter()
        .find(|r| r["host"] == host)?;
    let cert = &route["certificate"];
    Some((cert["not_after"].as_u64()?, cert["next_attempt"].as_u64()?))
}

/// Waits until `phoenix routes --json` shows a certificate for every name.
fn wait_certs(c: &Cluster, timeout: Duration) -> Value {
    let start = Instant::now();
    loop {
        let routes = c.json(&["routes", "--json"]);
        if NAMES
            .iter()
            .all(|(host, _)| cert_of(&routes, host).is_some())
        {
            return routes;
        }
        assert!(
            start.elapsed() < timeout,
            "no certificate for every name after {timeout:?}: {routes:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How many certificates pebble says it issued.
fn issued(pebble: &Pebble) -> usize {
    pebble.log().matches("Issued certificate serial").count()
}

/// Reads a reply head (up to the blank line); the head and any bytes
/// that came behind it.
fn read_head(s: &mut TlsStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 || buf.len() > 16384 {
            return Err(std::io::Error::other(format!(
                "no reply head: {:?}",
                String::from_utf8_lossy(&buf)
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// An upgrade to `host`'s `/ws` over HTTPS, then each message sent
/// comes back; the reply head.
fn upgrade_and_echo(
    to: SocketAddr,
    host: &str,
    root: &CertificateDer<'static>,
    messages: &[&[u8]],
) -> Result<String, String> {
    let mut s = tls_connect(to, host, root).map_err(|e| format!("TLS to {host}: {e}"))?;
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let (head, mut got) = read_head(&mut s).map_err(|e| e.to_string())?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no 101: {head}"));
    }
    for message in messages {
        s.write_all(message).map_err(|e| e.to_string())?;
        s.flush().map_err(|e| e.to_string())?;
        while got.len() < message.len() {
            let mut chunk = [0u8; 1024];
            match s.read(&mut chunk) {
                Ok(0) => return Err(format!("closed after {got:?}")),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("{e} after {got:?}")),
            }
        }
        let back: Vec<u8> = got.drain(..message.len()).collect();
        if back != *message {
            return Err(format!("sent {message:?}, got {back:?}"));
        }
    }
    Ok(head)
}

#[test]
fn certificates_from_pebble_are_served_by_sni_and_survive_a_restart() {
    require_netns!();
    if let Some(why) = pebble::unavailable() {
        eprintln!("SKIPPED: certificate test {why}");
        return;
    }
    let mut c = Cluster::start_on(Net::new(&["master", "m1", "m2", "client", "acme"]), 2);
    let net = c.net.as_ref().unwrap();
    let master_ip: Ipv4Addr = net.host("master").ip;
    // Declared after the cluster, so dropped (killed) before it.
    let pebble = Pebble::start(net, "acme", master_ip);
    c.master_flags.extend([
        "--acme-directory".into(),
        pebble.directory_url(),
        "--acme-ca".into(),
        pebble.ca_file().to_str().unwrap().into(),
        "--acme-email".into(),
        "ops@phoenix.test".into(),
    ]);
    c.kill_master();
    c.start_master();
    c.wait_reachable("m1");
    c.wait_reachable("m2");
    c.apply(
        "deploy",
        &json!([
            testy("m1", NAMES[0].1, NAMES[0].0),
            testy("m2", NAMES[1].1, NAMES[1].0),
        ]),
    );
    for (_, service) in NAMES {
        c.wait_status(service, "running and healthy", running);
    }

    // Both names get a certificate (pebble validates through the proxy).
    let routes = wait_certs(&c, Duration::from_secs(30));
    let net = c.net.as_ref().unwrap();
    let root = pebble.root(net, "client");
    let https: SocketAddr = (master_ip, 443).into();
    let http: SocketAddr = (master_ip, 80).into();

    // Port 443 serves each name its own certificate (the handshake checks
    // it against pebble's root and the name), and the right service.
    let mut leaves = Vec::new();
    for (host, service) in NAMES {
        let ((code, _, body), leaf) = net
            .within("client", || https_get(https, host, "/", &root))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(code, 200, "{host}: {body}");
        assert!(
            body.starts_with(&format!("testy name={service} ")),
            "{host} is served by {service}: {body}"
        );
        leaves.push(leaf);
    }
    assert_ne!(leaves[0], leaves[1], "a certificate per name");

    // Plain HTTP to a name with a certificate is sent to HTTPS, path and
    // query kept; an ACME challenge path is answered, not redirected.
    let (code, head, _) = net
        .within("client", || http_get(http, "a.example", "/some/path?q=1"))
        .expect("an answer on port 80");
    assert_eq!(code, 308, "{head}");
    assert_eq!(
        header(&head, "location"),
        Some("https://a.example/some/path?q=1"),
        "{head}"
    );
    let (code, head, _) = net
        .within("client", || {
            http_get(http, "a.example", "/.well-known/acme-challenge/x")
        })
        .expect("an answer on port 80");
    assert_eq!(code, 404, "an unknown token, not a redirect: {head}");
    assert_eq!(header(&head, "location"), None, "{head}");

    // An upgrade passes through the proxy: the service's 101, then bytes
    // both ways.
    let head = net
        .within("client", || {
            upgrade_and_echo(https, "b.example", &root, &[b"hello", b"through the proxy"])
        })
        .unwrap_or_else(|e| panic!("upgrade through the proxy: {e}"));
    assert_eq!(
        header(&head, "upgrade").map(str::to_ascii_lowercase),
        Some("websocket".into()),
        "{head}"
    );

    // A master restart orders nothing: the same certificates, from disk.
    let orders = issued(&pebble);
    assert_eq!(orders, 2, "one order per name:\n{}", pebble.log());
    let before: Vec<_> = NAMES
        .iter()
        .map(|(host, _)| cert_of(&routes, host).unwrap())
        .collect();
    c.kill_master();
    c.start_master();
    c.wait_reachable("m1");
    c.wait_reachable("m2");
    let routes = wait_certs(&c, Duration::from_secs(10));
    let net = c.net.as_ref().unwrap();
    for (i, (host, service)) in NAMES.iter().enumerate() {
        let (not_after, next_attempt) = cert_of(&routes, host).unwrap();
        assert_eq!(not_after, before[i].0, "{host}: the same certificate");
        assert!(
            next_attempt > now_ms() + 24 * 3600 * 1000,
            "{host}: nothing due (renewal at {next_attempt})"
        );
        let start = Instant::now();
        let ((code, _, body), leaf) = loop {
            match net.within("client", || https_get(https, host, "/", &root)) {
                Ok(got) if got.0.0 == 200 => break got,
                other => assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "{host} over HTTPS after the restart: {other:?}"
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(code, 200);
        assert!(
            body.starts_with(&format!("testy name={service} ")),
            "{body}"
        );
        assert_eq!(leaf, leaves[i], "{host}: the same certificate is served");
    }
    assert_eq!(issued(&pebble), orders, "no order after the restart");
}
