//! A VM is a service like any other on the network: its health check, the
//! master's proxy and `link` work for a `type: "vm"` service as they do for
//! a binary (`network.rs`, `proxy.rs`).
//!
//! One cluster on the multi-host harness: `vmweb`, the VM image of `vm.rs`
//! (busybox httpd in a QEMU guest, `phoenix_e2e::vm`) on m1, with a health
//! check, a `proxyname` and a link to `b`; testy services on both
//! machines, `b` and `d` linking the VM, `c` and `e` not. The VM must turn
//! healthy, be served by the proxy (plain HTTP from a host of its own:
//! the ACME directory is unreachable, so no certificate and no redirect),
//! be reached by the services that link it and refused to those that do
//! not, on its own machine and across; and from inside the guest (a CGI
//! script running busybox nc), reach what it links and nothing else.
//!
//! Needs root, the multi-host harness, and the Debian packages
//! `qemu-system-x86 linux-image-cloud-amd64 busybox-static e2fsprogs zstd
//! cpio`; skips, saying which, otherwise.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use phoenix_e2e::netns::Net;
use phoenix_e2e::vm::{WEB, build_image, image_test_missing, up, wait_status};
use phoenix_e2e::{Cluster, http_get_host, require_netns, wait_for};
use serde_json::{Value, json};

/// Before [`WEB`]: `/cgi-bin/get?[IP]:PORT` makes a GET of `/health` from
/// inside the guest, so what is asserted is what the VM itself reaches
/// (with busybox nc: the static busybox's wget crashes).
const GET_CGI: &str = r#"
mkdir -p /www/cgi-bin
cat > /www/cgi-bin/get <<'CGI'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
host=${QUERY_STRING%:*}
host=${host#[}
host=${host%]}
out=$(printf 'GET /health HTTP/1.0\r\n\r\n' | nc -w 3 "$host" "${QUERY_STRING##*:}" 2>&1)
case "$out" in
  "HTTP/1."*" 200 "*) echo ok ;;
  *) echo "get failed: $out" ;;
esac
CGI
chmod 755 /www/cgi-bin/get
"#;

const PORT: u16 = 8000;
const VM_PORT: u16 = 8080;

fn testy(machine: &str, name: &str, link: &[&str]) -> Value {
    json!({
        "machine": machine, "name": name, "image": "testy", "type": "binary",
        "proxyport": PORT, "healthcheck": "/health", "link": link,
    })
}

/// What testy `from` gets for `GET http://to/path`, made from inside it.
fn reach(c: &Cluster, from: &str, to: &str, path: &str) -> Result<String, String> {
    match c.http_service(from, PORT, &format!("/get?to={to}&path={path}")) {
        Some((200, body)) => Ok(body),
        Some((code, body)) => Err(format!("{code}: {body}")),
        None => Err(format!("{from} itself did not answer")),
    }
}

#[test]
fn links_health_checks_and_the_proxy_work_for_a_vm() {
    require_netns!();
    if let Some(why) = image_test_missing() {
        eprintln!("SKIPPED: vm test {why}");
        return;
    }
    let began = Instant::now();
    let mut c = Cluster::master_only_on(Net::new(&["master", "m1", "m2", "client"]));
    // No ACME: every host is served over plain HTTP.
    c.master_flags.extend([
        "--acme-directory".into(),
        "https://127.0.0.1:1/directory".into(),
    ]);
    c.kill_master();
    c.start_master();
    let c = c.with_minions(2);
    let image = build_image(c.dir.path(), "web", &format!("{GET_CGI}{WEB}"), None);
    c.ok(&["push", image.to_str().unwrap(), "web.zst"]);
    let specs = json!([
        {"machine": "m1", "name": "vmweb", "image": "web.zst", "type": "vm",
         "proxyport": VM_PORT, "healthcheck": "/health",
         "proxyname": "vm.example", "link": ["b"]},
        testy("m2", "b", &["vmweb"]),
        testy("m1", "d", &["vmweb"]),
        testy("m1", "c", &[]),
        testy("m2", "e", &[]),
    ]);
    let file = c.dir.path().join("specs.json");
    std::fs::write(&file, specs.to_string()).unwrap();
    let deployed = Instant::now();
    c.ok(&["deploy", file.to_str().unwrap(), "--detach"]);
    for name in ["b", "c", "d", "e"] {
        c.wait_status(name, "running and healthy", up);
    }
    // Health checks: the VM turns healthy through its probe.
    wait_status(&c, "vmweb", Duration::from_secs(90), up);
    eprintln!("deploy -> VM running and healthy: {:?}", deployed.elapsed());
    let vm_ip = c.service_ip("vmweb");
    let vm = format!("[{vm_ip}]:{VM_PORT}");

    // The proxy serves the VM, from a host outside the cluster.
    let net = c.net.as_ref().unwrap();
    let master: SocketAddr = (net.host("master").ip, 80).into();
    let via_proxy = |path: &str| net.within("client", || http_get_host(master, "vm.example", path));
    let (code, body) = wait_for(
        "the proxy to serve vm.example",
        Duration::from_secs(10),
        || via_proxy("/name").filter(|r| r.0 == 200),
    );
    assert_eq!((code, body.trim()), (200, "vmweb"));
    let routes = c.ok(&["routes"]);
    assert!(routes.contains("vm.example"), "{routes}");

    // Linked services reach the VM, across machines and on its own.
    for from in ["b", "d"] {
        let r = reach(&c, from, &vm, "/name");
        assert_eq!(r.as_deref().map(str::trim), Ok("vmweb"), "{from} → vmweb");
    }
    // The others are refused at once (a reject, not a timeout).
    for from in ["c", "e"] {
        let asked = Instant::now();
        let r = reach(&c, from, &vm, "/name");
        assert!(
            r.is_err(),
            "{from} reached vmweb, which it does not link: {r:?}"
        );
        assert!(
            asked.elapsed() < Duration::from_millis(1500),
            "{from} → vmweb refused only after {:?}: {r:?}",
            asked.elapsed()
        );
    }

    // From inside the guest: what the VM links, and nothing else.
    let from_vm = |to: &str| {
        let at = c.service_at("vmweb", VM_PORT);
        c.get(&at, &format!("/cgi-bin/get?{to}"))
            .map(|(code, body)| (code, body.trim().to_owned()))
    };
    let b = format!("[{}]:{PORT}", c.service_ip("b"));
    assert_eq!(from_vm(&b), Some((200, "ok".into())), "vmweb → b");
    let to_c = format!("[{}]:{PORT}", c.service_ip("c"));
    let asked = Instant::now();
    let r = from_vm(&to_c);
    eprintln!("vmweb → c: {r:?} after {:?}", asked.elapsed());
    assert!(
        r.as_ref()
            .is_some_and(|(_, body)| body.contains("get failed")),
        "vmweb reached c, which it does not link: {r:?}"
    );
    // The proxy still serves it, and the probe still passes.
    assert_eq!(via_proxy("/health").map(|r| r.0), Some(200));
    assert!(up(&c.status("vmweb")));
    eprintln!("whole test: {:?}", began.elapsed());
}
