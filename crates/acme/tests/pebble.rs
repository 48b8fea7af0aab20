//! The manager against a real ACME server: Debian's `pebble`, with
//! `pebble-challtestsrv` as its DNS (every name resolves to 127.0.0.1), and
//! a small HTTP server here that answers HTTP-01 from the manager's
//! `Challenges` (standing in for the proxy). Pebble's validation is real:
//! it fetches `http://NAME:PORT/.well-known/acme-challenge/TOKEN` from that
//! server. Each test starts its own pebble on free ports, with a TLS
//! certificate from a CA the test makes, and kills it when it ends, also
//! on failure. Without the `pebble` binary the tests say so and pass.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::net::{SocketAddr, TcpListener as StdListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use phoenix_acme::{Acme, AcmeConfig, Cert, CertMap, CertStore, Challenges};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The bound on every test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// The environment: pebble, its DNS, the challenge server.

fn find_binary(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A port free on 127.0.0.1 for both TCP and UDP (for the DNS server),
/// never the same twice in this process, and below Linux's ephemeral range
/// (32768 and up), so neither a `bind(0)` nor an outgoing connection takes
/// it between here and pebble's own bind.
fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let offset = u64::from(std::process::id()) * 7919;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((offset + n) % 12_000) as u16;
        let Ok(_tcp) = StdListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The HTTP-01 responder: answers from `Challenges`, except for the hosts
/// in `refuse`, which get a 404 as if nothing answered for them.
struct ChallengeServer {
    port: u16,
    requests: Arc<AtomicU64>,
}

async fn challenge_server(challenges: Challenges, refuse: HashSet<String>) -> ChallengeServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let challenges = challenges.clone();
            let refuse = refuse.clone();
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let host = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("host").then(|| v.trim())
                    })
                    .unwrap_or("");
                let host = host.split(':').next().unwrap_or("").to_ascii_lowercase();
                let answer = if refuse.contains(&host) {
                    None
                } else {
                    challenges.answer(path)
                };
                let response = match answer {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_string()
                    }
                };
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    ChallengeServer { port, requests }
}

/// A running pebble and its DNS server, killed when dropped.
struct Pebble {
    children: Vec<Child>,
    dir: tempfile::TempDir,
    directory_url: String,
    management: SocketAddr,
    ca_pem: String,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for log in self.logs() {
                eprintln!("{log}");
            }
        }
    }
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port`; `None` (after
    /// saying why) when pebble is not installed.
    fn start(http_port: u16) -> Option<Pebble> {
        let (Some(pebble), Some(dns)) = (
            find_binary("PEBBLE", "pebble"),
            find_binary("PEBBLE_CHALLTESTSRV", "pebble-challtestsrv"),
        ) else {
            eprintln!(
                "SKIPPED: `pebble` and `pebble-challtestsrv` are not installed \
                 (Debian: apt-get install pebble; or set PEBBLE and PEBBLE_CHALLTESTSRV)"
            );
            return None;
        };
        // Another program may take a port between our check and pebble's
        // bind: then pebble exits, and we start again on other ports.
        let mut why = String::new();
        for attempt in 1..=4 {
            match Pebble::try_start(&pebble, &dns, http_port) {
                Ok(env) => return Some(env),
                Err(e) => {
                    eprintln!("pebble did not start (attempt {attempt}): {e}");
                    why = e;
                }
            }
        }
        panic!("pebble did not start: {why}");
    }

    fn try_start(pebble: &Path, dns: &Path, http_port: u16) -> Result<Pebble, String> {
        let dir = tempfile::tempdir().unwrap();

        // A CA, and pebble's TLS certificate for 127.0.0.1 and localhost.
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "phoenix-acme test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();

        let listen = free_port();
        let management = free_port();
        let dns_port = free_port();
        let dns_management = free_port();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{management}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let config_path = dir.path().join("pebble-config.json");
        fs::write(&config_path, config.to_string()).unwrap();

        let logs = dir.path().to_path_buf();
        let log = |name: &str| fs::File::create(logs.join(name)).unwrap();
        let mut env = Pebble {
            children: Vec::new(),
            directory_url: format!("https://127.0.0.1:{listen}/dir"),
            management: SocketAddr::from(([127, 0, 0, 1], management)),
            ca_pem: ca_cert.pem(),
            dir,
        };
        // Every A query answers 127.0.0.1, no AAAA; no challenge servers
        // of its own (ours answers).
        env.children.push(
            Command::new(dns)
                .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{dns_management}")])
                .stdout(log("challtestsrv.log"))
                .stderr(log("challtestsrv.err"))
                .spawn()
                .expect("pebble-challtestsrv starts"),
        );
        env.children.push(
            Command::new(pebble)
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(log("pebble.log"))
                .stderr(log("pebble.err"))
                .spawn()
                .expect("pebble starts"),
        );
        env.wait_listening(&[listen, management, dns_port, dns_management])?;
        Ok(env)
    }

    /// Waits until something listens on every port, as long as both
    /// programs run.
    fn wait_listening(&mut self, ports: &[u16]) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for &port in ports {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                for child in &mut self.children {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!(
                            "a program exited ({status}):\n{}",
                            self.logs().join("\n")
                        ));
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!("nothing listens on 127.0.0.1:{port} after 20 s"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The programs' output.
    fn logs(&self) -> Vec<String> {
        [
            "pebble.log",
            "pebble.err",
            "challtestsrv.log",
            "challtestsrv.err",
        ]
        .iter()
        .map(|name| {
            let text = fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            format!("--- {name} ---\n{text}")
        })
        .collect()
    }

    /// Pebble's root certificate (it makes a new one at every start).
    async fn root(&self) -> CertificateDer<'static> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, Empty<Bytes>>(connector);
        let url = format!("https://{}/roots/0", self.management);
        let response = client.get(url.parse().unwrap()).await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        CertificateDer::from_pem_slice(&body).unwrap()
    }
}

// ---------------------------------------------------------------------------
// Helpers.

fn config(pebble: &Pebble, data_dir: &Path) -> AcmeConfig {
    AcmeConfig {
        directory_url: pebble.directory_url.clone(),
        extra_ca_pem: Some(pebble.ca_pem.clone().into_bytes()),
        email: Some("admin@phoenix.test".into()),
        data_dir: data_dir.to_path_buf(),
    }
}

fn hosts(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Waits (on the manager's change events) until `done` holds.
async fn until(acme: &Acme, mut done: impl FnMut(&Acme) -> bool) {
    let mut changes = acme.changes();
    while !done(acme) {
        changes.changed().await.unwrap();
    }
}

/// Waits until the published map holds all of `names`.
async fn until_certs(certs: &mut watch::Receiver<CertMap>, names: &[&str]) -> CertMap {
    loop {
        let map = certs.borrow_and_update().clone();
        if names.iter().all(|n| map.contains_key(*n)) {
            return map;
        }
        certs.changed().await.unwrap();
    }
}

/// Checks the chain: it parses, its leaf is for `host` and chains to
/// pebble's root through the intermediates it carries.
fn verify_chain(chain_pem: &str, root: &CertificateDer<'static>, host: &str) -> Result<(), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    assert!(chain.len() >= 2, "a leaf and pebble's intermediate");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(host.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test ran out of time");
}

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test]
async fn issues_one_certificate_per_host_and_a_restart_orders_nothing() {
    bounded(async {
        let challenges = Challenges::new();
        let server = challenge_server(challenges.clone(), HashSet::new()).await;
        let Some(pebble) = Pebble::start(server.port) else {
            return;
        };
        let data = tempfile::tempdir().unwrap();
        let acme = Acme::new(config(&pebble, data.path()), challenges.clone()).unwrap();
        assert!(acme.current().is_empty());
        let mut certs = acme.subscribe();
        let task = tokio::spawn({
            let acme = acme.clone();
            async move { acme.run().await }
        });
        let names = ["a.phoenix.test", "b.phoenix.test"];
        assert!(acme.set_hosts(hosts(&names)).is_empty());
        let map = until_certs(&mut certs, &names).await;
        assert_eq!(acme.orders_placed(), 2);
        assert!(challenges.is_empty(), "the tokens are withdrawn");
        assert!(
            server.requests.load(Ordering::Relaxed) >= 2,
            "pebble fetched the challenges from our server"
        );

        // The chains are real: each leaf is for its own name only, and
        // chains to pebble's root.
        let root = pebble.root().await;
        for name in names {
            let cert = &map[name];
            assert_eq!(cert.host, name);
            verify_chain(&cert.chain_pem, &root, name).unwrap();
            let other = names.iter().find(|n| **n != name).unwrap();
            assert!(verify_chain(&cert.chain_pem, &root, other).is_err());
            assert!(cert.not_before <= now_ms() && now_ms() < cert.not_after);
        }
        // Not some other CA's root.
        let stranger = CertificateDer::from_pem_slice(pebble.ca_pem.as_bytes()).unwrap();
        assert!(verify_chain(&map[names[0]].chain_pem, &stranger, names[0]).is_err());

        // The files, private.
        let dir = data.path().join("acme");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("certs")), 0o700);
        for file in ["account.json", "state.json"] {
            assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
        }
        for name in names {
            for ext in ["pem", "key"] {
                let path = dir.join(format!("certs/{name}.{ext}"));
                assert_eq!(mode(&path), 0o600, "{}", path.display());
            }
            let on_disk = fs::read_to_string(dir.join(format!("certs/{name}.pem"))).unwrap();
            assert_eq!(on_disk, map[name].chain_pem);
        }

        // Status: issued, no error, renewal two thirds into the lifetime.
        let status = acme.status();
        assert_eq!(status.len(), 2);
        for s in &status {
            let cert = &map[s.host.as_str()];
            assert_eq!(s.not_after, Some(cert.not_after));
            assert_eq!(s.last_error, None);
            assert_eq!(
                s.next_attempt,
                Some(phoenix_acme::renew_at(cert.not_before, cert.not_after))
            );
            assert!(s.next_attempt.unwrap() > now_ms());
        }
        task.abort();
        let _ = task.await;

        // A restart: the stored certificates are published at once, and
        // nothing is ordered for them.
        let again = Acme::new(config(&pebble, data.path()), challenges.clone()).unwrap();
        let loaded = again.current();
        let loaded: BTreeMap<_, _> = loaded
            .iter()
            .map(|(h, c)| (h.clone(), (**c).clone()))
            .collect();
        let before: BTreeMap<_, _> = map
            .iter()
            .map(|(h, c)| (h.clone(), (**c).clone()))
            .collect();
        assert_eq!(loaded, before);
        let requests = server.requests.load(Ordering::Relaxed);
        let task = tokio::spawn({
            let again = again.clone();
            async move { again.run().await }
        });
        assert!(again.set_hosts(hosts(&names)).is_empty());
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(again.orders_placed(), 0);
        assert_eq!(server.requests.load(Ordering::Relaxed), requests);
        assert!(again.status().iter().all(|s| s.last_error.is_none()));

        // A new host on the same account: only it is ordered.
        let mut certs = again.subscribe();
        again.set_hosts(hosts(&[
            "a.phoenix.test",
            "b.phoenix.test",
            "c.phoenix.test",
        ]));
        let map = until_certs(&mut certs, &["c.phoenix.test"]).await;
        assert_eq!(again.orders_placed(), 1);
        verify_chain(&map["c.phoenix.test"].chain_pem, &root, "c.phoenix.test").unwrap();
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn a_failed_order_records_its_error_backs_off_and_does_not_spin() {
    bounded(async {
        let challenges = Challenges::new();
        let refuse: HashSet<String> = ["fail.phoenix.test".to_string()].into();
        let server = challenge_server(challenges.clone(), refuse).await;
        let Some(pebble) = Pebble::start(server.port) else {
            return;
        };
        let data = tempfile::tempdir().unwrap();
        let acme = Acme::new(config(&pebble, data.path()), challenges.clone()).unwrap();
        let task = tokio::spawn({
            let acme = acme.clone();
            async move { acme.run().await }
        });
        let started = now_ms();
        acme.set_hosts(hosts(&["fail.phoenix.test", "ok.phoenix.test"]));
        until(&acme, |a| {
            a.status()
                .iter()
                .all(|s| s.not_after.is_some() || s.last_error.is_some())
        })
        .await;
        let status = acme.status();
        let fail = status
            .iter()
            .find(|s| s.host == "fail.phoenix.test")
            .unwrap();
        let ok = status.iter().find(|s| s.host == "ok.phoenix.test").unwrap();
        // The other host is not held back by the failing one.
        assert!(ok.not_after.is_some() && ok.last_error.is_none(), "{ok:?}");
        assert_eq!(fail.not_after, None);
        let error = fail.last_error.as_deref().unwrap();
        eprintln!("the failed order's error: {error}");
        assert!(
            error.contains("validating the http-01 challenge") && error.contains("404"),
            "{error}"
        );
        let next = fail.next_attempt.unwrap();
        assert!(
            next >= started + 45_000 && next <= now_ms() + 75_000,
            "the first retry waits about a minute: {next} vs now {}",
            now_ms()
        );
        assert!(challenges.is_empty(), "a failed order withdraws its token");
        assert!(
            !data
                .path()
                .join("acme/certs/fail.phoenix.test.pem")
                .exists()
        );

        // No spinning: nothing more is ordered while the backoff runs.
        let placed = acme.orders_placed();
        assert_eq!(placed, 2);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(acme.orders_placed(), placed);
        // Setting the same hosts again does not cut the backoff short.
        acme.set_hosts(hosts(&["fail.phoenix.test", "ok.phoenix.test"]));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(acme.orders_placed(), placed);
        task.abort();
        let _ = task.await;

        // The backoff and the error survive a restart.
        let again = Acme::new(config(&pebble, data.path()), challenges.clone()).unwrap();
        again.set_hosts(hosts(&["fail.phoenix.test", "ok.phoenix.test"]));
        let status = again.status();
        let fail_again = status
            .iter()
            .find(|s| s.host == "fail.phoenix.test")
            .unwrap();
        assert_eq!(fail_again.next_attempt, Some(next));
        assert_eq!(fail_again.last_error.as_deref(), Some(error));
        let task = tokio::spawn({
            let again = again.clone();
            async move { again.run().await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(again.orders_placed(), 0);
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn a_stored_certificate_two_thirds_through_its_life_is_renewed() {
    bounded(async {
        let challenges = Challenges::new();
        let server = challenge_server(challenges.clone(), HashSet::new()).await;
        let Some(pebble) = Pebble::start(server.port) else {
            return;
        };
        let data = tempfile::tempdir().unwrap();
        // A self-signed certificate still valid for a year, but well past
        // two thirds of its twelve: as if a restart found it due.
        let host = "renew.phoenix.test";
        let year = 1970 + (now_ms() / 1000 / 31_556_952) as i32;
        let mut params = CertificateParams::new(vec![host.to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(year - 10, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + 1, 12, 31);
        let key = KeyPair::generate().unwrap();
        let old = params.self_signed(&key).unwrap();
        let store = CertStore::open(data.path()).unwrap();
        store
            .save_cert(&Cert {
                host: host.to_string(),
                chain_pem: old.pem(),
                key_pem: key.serialize_pem(),
                not_before: 0,
                not_after: 0,
            })
            .unwrap();

        let acme = Acme::new(config(&pebble, data.path()), challenges.clone()).unwrap();
        // Served at once, and due at once.
        assert_eq!(acme.current()[host].chain_pem, old.pem());
        assert!(acme.current()[host].not_after > now_ms());
        acme.set_hosts(hosts(&[host]));
        assert!(acme.status()[0].next_attempt.unwrap() <= now_ms());
        let mut certs = acme.subscribe();
        certs.borrow_and_update();
        let task = tokio::spawn({
            let acme = acme.clone();
            async move { acme.run().await }
        });
        certs.changed().await.unwrap();
        let renewed = certs.borrow().clone();
        let renewed = &renewed[host];
        assert_ne!(renewed.chain_pem, old.pem());
        verify_chain(&renewed.chain_pem, &pebble.root().await, host).unwrap();
        assert_eq!(acme.orders_placed(), 1);
        assert_eq!(store.load_cert(host).unwrap().as_ref(), Some(&**renewed));
        assert!(acme.status()[0].next_attempt.unwrap() > now_ms());
        task.abort();
    })
    .await;
}

// ---------------------------------------------------------------------------
// Without a server.

#[tokio::test]
async fn an_unreachable_directory_is_a_recorded_failure_with_backoff() {
    bounded(async {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let acme = Acme::new(
            AcmeConfig {
                directory_url: format!("https://127.0.0.1:{port}/dir"),
                extra_ca_pem: None,
                email: None,
                data_dir: data.path().to_path_buf(),
            },
            Challenges::new(),
        )
        .unwrap();
        let task = tokio::spawn({
            let acme = acme.clone();
            async move { acme.run().await }
        });
        acme.set_hosts(hosts(&["x.phoenix.test"]));
        until(&acme, |a| a.status()[0].last_error.is_some()).await;
        let status = &acme.status()[0];
        let error = status.last_error.as_deref().unwrap();
        eprintln!("the unreachable directory's error: {error}");
        assert!(error.starts_with("creating the ACME account"), "{error}");
        assert!(status.next_attempt.unwrap() > now_ms() + 30_000);
        assert_eq!(acme.orders_placed(), 0, "no order without an account");
        assert!(!data.path().join("acme/account.json").exists());

        // A second run while one runs returns at once; after an abort, the
        // same manager runs again.
        tokio::time::timeout(Duration::from_secs(1), acme.run())
            .await
            .expect("a second run returns at once");
        task.abort();
        let _ = task.await;
        let task = tokio::spawn({
            let acme = acme.clone();
            async move { acme.run().await }
        });
        acme.set_hosts(hosts(&["x.phoenix.test", "y.phoenix.test"]));
        until(&acme, |a| a.status()[1].last_error.is_some()).await;
        task.abort();
    })
    .await;
}

#[test]
fn invalid_names_are_refused_and_shown_and_bad_configs_fail_at_start() {
    let data = tempfile::tempdir().unwrap();
    let config = |url: &str, ca: Option<&[u8]>| AcmeConfig {
        directory_url: url.to_string(),
        extra_ca_pem: ca.map(<[u8]>::to_vec),
        email: None,
        data_dir: data.path().to_path_buf(),
    };
    let err = Acme::new(config("http://acme.test/dir", None), Challenges::new()).unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
    let err = Acme::new(
        config("https://acme.test/dir", Some(b"not a certificate")),
        Challenges::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("extra ACME root"), "{err}");

    let acme = Acme::new(config("https://acme.test/dir", None), Challenges::new()).unwrap();
    let refused = acme.set_hosts(hosts(&[
        "Good.Phoenix.Test",
        "../etc/passwd",
        "*.wild.test",
    ]));
    let names: Vec<&str> = refused.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["*.wild.test", "../etc/passwd"]);
    let status = acme.status();
    assert_eq!(status.len(), 3);
    assert_eq!(status[0].host, "good.phoenix.test");
    assert_eq!(status[0].last_error, None);
    assert!(status[0].next_attempt.is_some());
    for s in &status[1..] {
        assert!(
            s.last_error
                .as_deref()
                .unwrap()
                .contains("cannot have a certificate")
        );
        assert_eq!(s.next_attempt, None);
    }
    assert!(
        fs::read_dir(data.path().join("acme/certs"))
            .unwrap()
            .next()
            .is_none()
    );
}
