//! The HTTPS client instant-acme talks to the directory through: rustls
//! with the `ring` provider, the system's roots plus the extra root given
//! with `--acme-ca`.

use std::sync::Arc;

use bytes::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::BodyWrapper;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub(crate) type HttpsClient = Client<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

/// Why the HTTPS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the extra ACME root certificate: {0}")]
    ExtraCa(String),
    #[error("the TLS client for the ACME directory: {0}")]
    Tls(#[from] rustls::Error),
}

/// Parses the certificates of a PEM file (one or more); an error if it
/// holds none or one does not parse.
pub(crate) fn parse_roots(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let mut roots = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots.push(cert.map_err(|e| ClientError::ExtraCa(format!("not PEM: {e}")))?);
    }
    if roots.is_empty() {
        return Err(ClientError::ExtraCa(
            "it holds no PEM CERTIFICATE block".into(),
        ));
    }
    Ok(roots)
}

/// An HTTPS-only client that trusts the system's roots (as
/// rustls-platform-verifier finds them) and `extra_roots`.
pub(crate) fn https_client(
    extra_roots: Vec<CertificateDer<'static>>,
) -> Result<HttpsClient, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots, provider.clone())?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_must_be_pem_certificates() {
        let (cert, key) = crate::cert::tests::self_signed(&["ca.test"]);
        assert_eq!(parse_roots(cert.as_bytes()).unwrap().len(), 1);
        let two = format!("{cert}{cert}");
        assert_eq!(parse_roots(two.as_bytes()).unwrap().len(), 2);
        assert!(parse_roots(key.as_bytes()).is_err());
        assert!(parse_roots(b"hello").is_err());
        assert!(https_client(parse_roots(cert.as_bytes()).unwrap()).is_ok());
    }
}
