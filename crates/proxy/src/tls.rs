//! Certificates by SNI, settable at runtime, and the ACME HTTP-01
//! challenge map.
//!
//! Both are cheap handles over shared maps: the ACME code keeps a clone and
//! sets entries; the proxy reads them on every handshake or challenge
//! request. Reads take no lock ([`arc_swap`]); a write copies the map,
//! which is fine for a map written a few times a day.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::routes::normalize_host;

/// Why a certificate was refused. The host's previous certificate, if
/// any, stays.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate for {host:?}: not a DNS name")]
    BadHost { host: String },
    #[error("certificate for {host}: the chain PEM holds no certificate")]
    NoCertificate { host: String },
    #[error("certificate for {host}: reading the chain PEM: {source}")]
    ChainPem {
        host: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate for {host}: reading the private key PEM: {source}")]
    KeyPem {
        host: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error(
        "certificate for {host}: the key does not fit the certificate or is not supported: {source}"
    )]
    Key { host: String, source: rustls::Error },
}

/// Certificates by host name; the HTTPS listener's
/// [`ResolvesServerCert`]. A name `*.example.com` serves every direct
/// subdomain of `example.com` that has no certificate of its own.
#[derive(Clone)]
pub struct Certs {
    map: Arc<ArcSwap<HashMap<String, Arc<CertifiedKey>>>>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("hosts", &self.hosts())
            .finish()
    }
}

impl Certs {
    pub(crate) fn new(provider: Arc<CryptoProvider>) -> Self {
        Certs {
            map: Arc::default(),
            provider,
        }
    }

    /// Installs (or replaces) `host`'s certificate: `chain_pem` the leaf
    /// first then intermediates, `key_pem` its private key (PKCS#8, PKCS#1
    /// or SEC1). Checked before it replaces anything: the key must load and
    /// match the leaf.
    pub fn set(&self, host: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), CertError> {
        let (name, key) = self.load(host, chain_pem, key_pem)?;
        self.set_certified(&name, key)
    }

    /// Replaces every certificate at once with `certs` (host, chain PEM,
    /// key PEM), as from the ACME manager's map: hosts not listed lose
    /// theirs. An entry that does not load is left out (a host that had a
    /// certificate keeps it) and its error returned; the others apply.
    pub fn replace_all<'a>(
        &self,
        certs: impl IntoIterator<Item = (&'a str, &'a [u8], &'a [u8])>,
    ) -> Vec<CertError> {
        let mut errors = Vec::new();
        let mut loaded = HashMap::new();
        let mut failed = Vec::new();
        for (host, chain_pem, key_pem) in certs {
            match self.load(host, chain_pem, key_pem) {
                Ok((name, key)) => {
                    loaded.insert(name, key);
                }
                Err(e) => {
                    failed.extend(cert_name(host));
                    errors.push(e);
                }
            }
        }
        self.map.rcu(|map| {
            let mut next = loaded.clone();
            for name in &failed {
                if let Some(old) = map.get(name) {
                    next.entry(name.clone()).or_insert_with(|| old.clone());
                }
            }
            next
        });
        errors
    }

    fn load(
        &self,
        host: &str,
        chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<(String, Arc<CertifiedKey>), CertError> {
        let name = cert_name(host).ok_or_else(|| CertError::BadHost {
            host: host.to_owned(),
        })?;
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CertError::ChainPem {
                host: name.clone(),
                source,
            })?;
        if chain.is_empty() {
            return Err(CertError::NoCertificate { host: name });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| CertError::KeyPem {
            host: name.clone(),
            source,
        })?;
        let certified = CertifiedKey::from_der(chain, key, &self.provider).map_err(|source| {
            CertError::Key {
                host: name.clone(),
                source,
            }
        })?;
        Ok((name, Arc::new(certified)))
    }

    /// Installs an already loaded certificate for `host`.
    pub fn set_certified(&self, host: &str, key: Arc<CertifiedKey>) -> Result<(), CertError> {
        let name = cert_name(host).ok_or_else(|| CertError::BadHost {
            host: host.to_owned(),
        })?;
        self.map.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(name.clone(), key.clone());
            map
        });
        Ok(())
    }

    /// Removes `host`'s certificate; its plain HTTP is then proxied again
    /// rather than redirected.
    pub fn remove(&self, host: &str) {
        let Some(name) = cert_name(host) else {
            return;
        };
        self.map.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.remove(&name);
            map
        });
    }

    /// Whether a handshake for `host` would find a certificate.
    pub fn contains(&self, host: &str) -> bool {
        normalize_host(host).is_some_and(|name| self.find(&name).is_some())
    }

    /// The names that have a certificate, sorted.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.map.load().keys().cloned().collect();
        hosts.sort();
        hosts
    }

    /// The certificate for a normalised name: its own, else a wildcard's.
    pub(crate) fn find(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let map = self.map.load();
        if let Some(key) = map.get(name) {
            return Some(key.clone());
        }
        let (_, parent) = name.split_once('.')?;
        map.get(&format!("*.{parent}")).cloned()
    }
}

/// The HTTPS listeners' TLS config, one for all shards: certificates from
/// `certs` by SNI, ALPN h2 then http/1.1, and session resumption by
/// stateless tickets.
///
/// Tickets rather than rustls's default session cache: that cache lives
/// in the config (256 sessions), and with a config a shard a client's next
/// connection, which either shard may take, found its
/// session only half the time and paid a full handshake (the certificate
/// and a signature) otherwise. A ticket carries the session, encrypted
/// with a key every shard shares (ring's ChaCha20-Poly1305 ticketer, the
/// key rotated every 6 hours), so any shard resumes it and nothing is
/// kept per client.
///
/// One ticket a handshake rather than rustls's two (as Go's servers, Caddy
/// among them, send): a stateless ticket may be offered again, and each
/// resumed handshake brings a fresh one, so one is enough for a client's
/// next connection. The second cost both ends an encryption, random draws
/// and a session object each time (bench/proxy.sh, a new connection for
/// each small request: about 5 % more requests/s with one).
pub(crate) fn server_config(
    provider: Arc<CryptoProvider>,
    certs: &Certs,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certs.clone()));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tls.ticketer = rustls::crypto::ring::Ticketer::new()?;
    tls.send_tls13_tickets = 1;
    Ok(Arc::new(tls))
}

/// A certificate's name as the map keys it: a host, or `*.` and a host.
fn cert_name(host: &str) -> Option<String> {
    match host.trim().strip_prefix("*.") {
        Some(parent) => normalize_host(parent).map(|p| format!("*.{p}")),
        None => normalize_host(host).map(Cow::into_owned),
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No SNI (an IP address, an old client): no certificate to choose,
        // so the handshake fails.
        let name = hello.server_name()?.to_ascii_lowercase();
        self.find(name.strip_suffix('.').unwrap_or(&name))
    }
}

/// ACME HTTP-01 challenges: token → key authorization. The HTTP listener
/// answers `GET /.well-known/acme-challenge/TOKEN` from it, for any host:
/// from the entries [`set`](Self::set) here, else from a source function
/// (such as another crate's challenge map, [`set_source`](Self::set_source)).
#[derive(Clone, Default)]
pub struct Challenges {
    inner: Arc<ChallengeMaps>,
}

type ChallengeSource = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

#[derive(Default)]
struct ChallengeMaps {
    map: ArcSwap<HashMap<String, String>>,
    source: ArcSwapOption<ChallengeSource>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("tokens", &self.inner.map.load().len())
            .field("source", &self.inner.source.load().is_some())
            .finish()
    }
}

impl Challenges {
    pub fn set(&self, token: &str, key_authorization: &str) {
        self.inner.map.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(token.to_owned(), key_authorization.to_owned());
            map
        });
    }

    pub fn remove(&self, token: &str) {
        self.inner.map.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.remove(token);
            map
        });
    }

    /// Also answers tokens `source` knows (asked after the entries set
    /// here). Replaces any previous source.
    pub fn set_source(&self, source: impl Fn(&str) -> Option<String> + Send + Sync + 'static) {
        let source: ChallengeSource = Box::new(source);
        self.inner.source.store(Some(Arc::new(source)));
    }

    pub fn get(&self, token: &str) -> Option<String> {
        if let Some(answer) = self.inner.map.load().get(token) {
            return Some(answer.clone());
        }
        self.inner
            .source
            .load()
            .as_ref()
            .and_then(|source| source(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let c = rcgen::generate_simple_self_signed(names).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn set_find_wildcard_remove() {
        let certs = Certs::new(provider());
        let (chain, key) = self_signed(&["a.example"]);
        certs
            .set("A.Example", chain.as_bytes(), key.as_bytes())
            .unwrap();
        assert!(certs.contains("a.example:443"));
        assert!(!certs.contains("b.example"));
        let (chain, key) = self_signed(&["*.example"]);
        certs
            .set("*.example", chain.as_bytes(), key.as_bytes())
            .unwrap();
        assert!(certs.contains("b.example"));
        assert!(!certs.contains("x.b.example"));
        assert_eq!(certs.hosts(), vec!["*.example", "a.example"]);
        certs.remove("a.example");
        assert!(certs.contains("a.example"), "the wildcard still covers it");
        certs.remove("*.example");
        assert!(!certs.contains("a.example"));
    }

    #[test]
    fn mismatched_or_broken_pems_are_refused_and_keep_the_old() {
        let certs = Certs::new(provider());
        let (chain, key) = self_signed(&["a.example"]);
        let (_, other_key) = self_signed(&["a.example"]);
        certs
            .set("a.example", chain.as_bytes(), key.as_bytes())
            .unwrap();
        let err = certs
            .set("a.example", chain.as_bytes(), other_key.as_bytes())
            .unwrap_err();
        assert!(matches!(err, CertError::Key { .. }), "{err}");
        assert!(certs.contains("a.example"));
        assert!(matches!(
            certs.set("a.example", b"", key.as_bytes()),
            Err(CertError::NoCertificate { .. })
        ));
        assert!(matches!(
            certs.set("a.example", chain.as_bytes(), b"nope"),
            Err(CertError::KeyPem { .. })
        ));
        assert!(matches!(
            certs.set("a b", chain.as_bytes(), key.as_bytes()),
            Err(CertError::BadHost { .. })
        ));
    }

    #[test]
    fn challenges() {
        let c = Challenges::default();
        c.set("tok", "tok.thumb");
        assert_eq!(c.get("tok").as_deref(), Some("tok.thumb"));
        c.clone().remove("tok");
        assert_eq!(c.get("tok"), None);
        c.set_source(|t| (t == "other").then(|| "other.thumb".to_owned()));
        c.set("tok", "tok.thumb");
        assert_eq!(c.get("other").as_deref(), Some("other.thumb"));
        assert_eq!(c.get("tok").as_deref(), Some("tok.thumb"));
        assert_eq!(c.get("none"), None);
    }

    #[test]
    fn replace_all_swaps_the_set_and_keeps_a_failed_hosts_old() {
        let certs = Certs::new(provider());
        let (a_chain, a_key) = self_signed(&["a.example"]);
        let (b_chain, b_key) = self_signed(&["b.example"]);
        let errors = certs.replace_all([
            ("a.example", a_chain.as_bytes(), a_key.as_bytes()),
            ("b.example", b_chain.as_bytes(), b_key.as_bytes()),
        ]);
        assert!(errors.is_empty());
        assert_eq!(certs.hosts(), vec!["a.example", "b.example"]);
        let errors = certs.replace_all([
            ("a.example", a_chain.as_bytes(), b_key.as_bytes()),
            ("c.example", b"junk".as_slice(), b"junk".as_slice()),
        ]);
        assert_eq!(errors.len(), 2);
        assert_eq!(
            certs.hosts(),
            vec!["a.example"],
            "b dropped, a kept its old one"
        );
    }
}
