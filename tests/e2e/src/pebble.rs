//! An ACME server in a host of its own: Debian's `pebble`, with
//! `pebble-challtestsrv` as its DNS server answering every name with one
//! IPv4 address (the master's), so pebble's HTTP-01 validation reaches the
//! master's proxy on port 80. Pebble's own TLS listener gets a certificate
//! from a CA the test makes ([`Pebble::ca_file`], for `--acme-ca`). Both
//! programs are killed when the [`Pebble`] is dropped, also on failure,
//! and their output is printed then if the test is failing.
//!
//! Also a small blocking TLS client (rustls with ring) for the tests: a
//! connection that trusts exactly one root.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::netns::Net;

/// Pebble's ACME listener, in its host.
pub const ACME_PORT: u16 = 14000;
/// Pebble's management listener (`/roots/0`, ...).
pub const MANAGEMENT_PORT: u16 = 15000;
const DNS_PORT: u16 = 8053;
const DNS_MANAGEMENT_PORT: u16 = 8055;

/// The path of a program: `$ENV`, else the first `name` on `$PATH`.
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

/// Why the certificate tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    match (
        find_binary("PEBBLE", "pebble"),
        find_binary("PEBBLE_CHALLTESTSRV", "pebble-challtestsrv"),
    ) {
        (Some(_), Some(_)) => None,
        _ => Some(
            "needs `pebble` and `pebble-challtestsrv` (Debian: apt-get install pebble; \
             or set PEBBLE and PEBBLE_CHALLTESTSRV)"
                .into(),
        ),
    }
}

/// A running pebble and its DNS server in host `host` of a [`Net`].
pub struct Pebble {
    children: Vec<Child>,
    dir: tempfile::TempDir,
    /// Pebble's host address.
    pub ip: Ipv4Addr,
    /// The host the programs run in.
    pub host: String,
    ca_pem: String,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

impl Pebble {
    /// Starts pebble and its DNS server in `host`; every name resolves to
    /// `answer` and HTTP-01 is validated on its port 80. Waits until both
    /// listen (panics with their output if they exit or take over 20 s).
    pub fn start(net: &Net, host: &str, answer: Ipv4Addr) -> Pebble {
        let pebble = find_binary("PEBBLE", "pebble").expect("pebble is installed");
        let dns = find_binary("PEBBLE_CHALLTESTSRV", "pebble-challtestsrv")
            .expect("pebble-challtestsrv is installed");
        let ip = net.host(host).ip;
        let dir = tempfile::Builder::new()
            .prefix("phoenix-pebble-")
            .tempdir()
            .expect("temp dir");

        // A CA, and pebble's listener certificate for its address.
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "phoenix e2e pebble CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let params = CertificateParams::new(vec![ip.to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();

        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("0.0.0.0:{ACME_PORT}"),
                "managementListenAddress": format!("0.0.0.0:{MANAGEMENT_PORT}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": 80,
                "tlsPort": 443,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let config_path = dir.path().join("pebble-config.json");
        fs::write(&config_path, config.to_string()).unwrap();

        let log = |name: &str| fs::File::create(dir.path().join(name)).unwrap();
        let mut children = Vec::new();
        // Every A query answers `answer`, no AAAA; no challenge servers of
        // its own (the master's proxy answers).
        children.push(
            net.command(host, &dns)
                .args(["-defaultIPv4", &answer.to_string(), "-defaultIPv6", ""])
                .args(["-dns01", &format!("127.0.0.1:{DNS_PORT}")])
                .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
                .args(["-management", &format!("127.0.0.1:{DNS_MANAGEMENT_PORT}")])
                .stdout(log("challtestsrv.log"))
                .stderr(log("challtestsrv.err"))
                .spawn()
                .expect("pebble-challtestsrv starts"),
        );
        children.push(
            net.command(host, &pebble)
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &format!("127.0.0.1:{DNS_PORT}")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .stdout(log("pebble.log"))
                .stderr(log("pebble.err"))
                .spawn()
                .expect("pebble starts"),
        );
        let mut p = Pebble {
            children,
            dir,
            ip,
            host: host.to_owned(),
            ca_pem: ca_cert.pem(),
        };
        let ports = [ACME_PORT, MANAGEMENT_PORT, DNS_PORT, DNS_MANAGEMENT_PORT];
        if let Err(e) = net.within(host, || p.wait_listening(&ports)) {
            panic!("pebble did not start: {e}\n{}", p.logs());
        }
        p
    }

    /// Waits until something listens on every port in pebble's host, as
    /// long as both programs run.
    fn wait_listening(&mut self, ports: &[u16]) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for &port in ports {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                for child in &mut self.children {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("a program exited ({status})"));
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!("nothing listens on port {port} after 20 s"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The directory URL for `--acme-directory`.
    pub fn directory_url(&self) -> String {
        format!("https://{}:{ACME_PORT}/dir", self.ip)
    }

    /// The test CA's certificate (PEM file) for `--acme-ca`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The programs' output, for failure reports.
    pub fn logs(&self) -> String {
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
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// Pebble's log (stdout and stderr), for counting what it did.
    pub fn log(&self) -> String {
        ["pebble.log", "pebble.err"]
            .iter()
            .map(|name| fs::read_to_string(self.dir.path().join(name)).unwrap_or_default())
            .collect()
    }

    /// Pebble's root certificate (it makes a new one at every start),
    /// fetched over HTTPS from its management port, from host `from`.
    pub fn root(&self, net: &Net, from: &str) -> CertificateDer<'static> {
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap();
        let addr = SocketAddr::from((self.ip, MANAGEMENT_PORT));
        let name = self.ip.to_string();
        let reply = net
            .within(from, || {
                let mut s = tls_connect(addr, &name, &ca)?;
                write!(
                    s,
                    "GET /roots/0 HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                )?;
                read_all(&mut s)
            })
            .unwrap_or_else(|e| panic!("GET https://{addr}/roots/0: {e}"));
        let reply = String::from_utf8_lossy(&reply);
        let (head, body) = reply.split_once("\r\n\r\n").unwrap_or(("", ""));
        assert!(head.starts_with("HTTP/1.1 200"), "/roots/0: {reply}");
        CertificateDer::from_pem_slice(body.as_bytes())
            .unwrap_or_else(|e| panic!("/roots/0 is no PEM certificate ({e}): {body}"))
    }
}

/// A blocking TLS connection.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects to `addr` with TLS (SNI `name`; no ALPN, so HTTP/1.1),
/// trusting only `root`, and completes the handshake (verifying the
/// server's chain for `name`). Reads time out after 5 s.
pub fn tls_connect(
    addr: SocketAddr,
    name: &str,
    root: &CertificateDer<'static>,
) -> io::Result<TlsStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).map_err(io::Error::other)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server_name = ServerName::try_from(name.to_owned()).map_err(io::Error::other)?;
    let conn =
        rustls::ClientConnection::new(Arc::new(config), server_name).map_err(io::Error::other)?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// The leaf certificate a connection's server presented.
pub fn peer_leaf(s: &TlsStream) -> Option<CertificateDer<'static>> {
    s.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
}

/// Reads until the peer closes (a close without TLS's close_notify ends
/// the read too: the reply is checked by its contents anyway).
pub fn read_all(s: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Ok(out),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !out.is_empty() => Ok(out),
        Err(e) => Err(e),
    }
}
