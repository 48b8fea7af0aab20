//! What a certificate chain says: the leaf's validity, names and key.

use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

/// A certificate with its private key, as stored and as published.
#[derive(Clone, PartialEq, Eq)]
pub struct Cert {
    /// The DNS name the certificate is for (its only SAN).
    pub host: String,
    /// The chain in PEM: the leaf first, then the intermediates.
    pub chain_pem: String,
    /// The leaf's private key in PEM (PKCS#8).
    pub key_pem: String,
    /// The leaf's notBefore, Unix milliseconds.
    pub not_before: u64,
    /// The leaf's notAfter, Unix milliseconds.
    pub not_after: u64,
}

impl std::fmt::Debug for Cert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cert")
            .field("host", &self.host)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("chain_pem", &format_args!("{} bytes", self.chain_pem.len()))
            .field("key_pem", &format_args!("(hidden)"))
            .finish()
    }
}

/// What the leaf of a chain says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeafInfo {
    pub not_before: u64,
    pub not_after: u64,
    pub dns_names: Vec<String>,
    /// The leaf's SubjectPublicKeyInfo, DER.
    pub spki: Vec<u8>,
}

/// Reads a PEM chain: every block must be a certificate, at least one;
/// the first is the leaf.
pub(crate) fn parse_chain(chain_pem: &str) -> Result<LeafInfo, String> {
    let mut leaf = None;
    for (i, pem) in Pem::iter_from_buffer(chain_pem.as_bytes()).enumerate() {
        let pem = pem.map_err(|e| format!("PEM block {}: {e}", i + 1))?;
        if pem.label != "CERTIFICATE" {
            return Err(format!(
                "PEM block {} is a {:?}, not a CERTIFICATE",
                i + 1,
                pem.label
            ));
        }
        let cert = pem
            .parse_x509()
            .map_err(|e| format!("certificate {} does not parse: {e}", i + 1))?;
        if leaf.is_none() {
            let validity = cert.validity();
            let dns_names = match cert.subject_alternative_name() {
                Ok(Some(san)) => san
                    .value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                        _ => None,
                    })
                    .collect(),
                Ok(None) => Vec::new(),
                Err(e) => return Err(format!("the leaf's subjectAltName does not parse: {e}")),
            };
            leaf = Some(LeafInfo {
                not_before: unix_ms(validity.not_before.timestamp()),
                not_after: unix_ms(validity.not_after.timestamp()),
                dns_names,
                spki: cert.public_key().raw.to_vec(),
            });
        }
    }
    leaf.ok_or_else(|| "it holds no certificate".to_string())
}

/// The SubjectPublicKeyInfo (DER) of a PEM private key.
pub(crate) fn key_spki(key_pem: &str) -> Result<Vec<u8>, String> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| format!("private key: {e}"))?;
    Ok(rcgen::PublicKeyData::subject_public_key_info(&key))
}

/// Checks that a chain and a key belong together and to `host`, and builds
/// the [`Cert`].
pub(crate) fn check_pair(host: &str, chain_pem: String, key_pem: String) -> Result<Cert, String> {
    let leaf = parse_chain(&chain_pem)?;
    if !leaf.dns_names.iter().any(|n| n == host) {
        return Err(format!(
            "the certificate is for {:?}, not {host}",
            leaf.dns_names
        ));
    }
    if key_spki(&key_pem)? != leaf.spki {
        return Err("the private key is not the certificate's".to_string());
    }
    Ok(Cert {
        host: host.to_string(),
        chain_pem,
        key_pem,
        not_before: leaf.not_before,
        not_after: leaf.not_after,
    })
}

fn unix_ms(seconds: i64) -> u64 {
    u64::try_from(seconds).unwrap_or(0).saturating_mul(1000)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    /// A self-signed certificate for `names` and its key, both PEM.
    pub(crate) fn self_signed(names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_matching_pair_yields_its_validity() {
        let (chain, key) = self_signed(&["a.test"]);
        let cert = check_pair("a.test", chain, key).unwrap();
        assert!(cert.not_before < cert.not_after);
        // rcgen's default validity starts in 1975 and runs to 4096.
        assert!(cert.not_after > 4_000_000_000_000);
    }

    #[test]
    fn a_foreign_key_another_name_or_junk_is_refused() {
        let (chain, _) = self_signed(&["a.test"]);
        let (_, other_key) = self_signed(&["a.test"]);
        let err = check_pair("a.test", chain.clone(), other_key).unwrap_err();
        assert!(err.contains("not the certificate's"), "{err}");
        let (_, key) = self_signed(&["a.test"]);
        let err = check_pair("b.test", chain.clone(), key.clone()).unwrap_err();
        assert!(err.contains("not b.test"), "{err}");
        let err = check_pair("a.test", String::new(), key.clone()).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
        let err = check_pair("a.test", key.clone(), key).unwrap_err();
        assert!(err.contains("not a CERTIFICATE"), "{err}");
    }
}
