//! The cluster's key pair: an X25519 (WireGuard) key, so that the overlay can
//! use it as the master's WireGuard identity.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use x25519_dalek::{PublicKey, StaticSecret};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} does not hold a base64 X25519 key")]
    Malformed { path: String },
}

/// A WireGuard key pair.
pub struct KeyPair {
    secret: StaticSecret,
}

impl KeyPair {
    /// Loads the private key at `path`, or makes one there (mode 0600).
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes: [u8; 32] = STANDARD
                    .decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| KeyError::Malformed {
                        path: path.display().to_string(),
                    })?;
                Ok(KeyPair {
                    secret: StaticSecret::from(bytes),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = StaticSecret::random_from_rng(rand_core::OsRng);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                writeln!(f, "{}", STANDARD.encode(secret.to_bytes())).map_err(io)?;
                f.sync_all().map_err(io)?;
                Ok(KeyPair { secret })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The private key's bytes (for the WireGuard device).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The public key, base64 as WireGuard writes it.
    pub fn public(&self) -> String {
        STANDARD.encode(PublicKey::from(&self.secret).as_bytes())
    }
}

/// Whether `key` is a base64 32-byte key.
pub fn is_valid_public_key(key: &str) -> bool {
    STANDARD.decode(key).is_ok_and(|b| b.len() == 32)
}

/// A short, stable fingerprint of a public key for people to compare:
/// the first 8 bytes of its BLAKE3 hash, as colon-separated hex.
pub fn fingerprint(key: &str) -> String {
    let hash = blake3::hash(key.as_bytes());
    hash.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A new random join token (base64, 32 bytes).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    STANDARD.encode(bytes)
}

/// Proof that a minion knows the join token, bound to its public key: a
/// keyed BLAKE3 of the key, keyed by (a hash of) the token. The token itself
/// never crosses the wire, and a proof cannot be replayed for another key.
pub fn token_proof(token: &str, public_key: &str) -> String {
    let key = blake3::derive_key("phoenix join token v1", token.trim().as_bytes());
    blake3::keyed_hash(&key, public_key.as_bytes())
        .to_hex()
        .to_string()
}

/// Compares a proof in constant time.
pub fn check_token_proof(token: &str, public_key: &str, proof: &str) -> bool {
    let want = token_proof(token, public_key);
    want.len() == proof.len()
        && want
            .bytes()
            .zip(proof.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let a = KeyPair::load_or_create(&path).unwrap().public();
        let b = KeyPair::load_or_create(&path).unwrap().public();
        assert_eq!(a, b);
        assert!(is_valid_public_key(&a));
        assert!(!is_valid_public_key("abc"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fingerprint(&a).len(), 23);
    }

    #[test]
    fn token_proofs_bind_key_and_token() {
        let t = new_token();
        let p = token_proof(&t, "key-a");
        assert!(check_token_proof(&t, "key-a", &p));
        assert!(!check_token_proof(&t, "key-b", &p));
        assert!(!check_token_proof(&new_token(), "key-a", &p));
        assert!(!check_token_proof(&t, "key-a", "00"));
    }
}
