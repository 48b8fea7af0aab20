//! Secrets (issue 15): `phoenix secret set|list|rm`, sealed at rest.
//!
//! A secret's value is sealed with XChaCha20-Poly1305 (RustCrypto's
//! `chacha20poly1305`, pure Rust) under a 32-byte key kept in
//! `DATA_DIR/secrets.key` (mode 0600, beside `master.key`, created at the
//! first `secret set`), with a random 24-byte nonce per value and the
//! secret's name as associated data, so a sealed value copied onto another
//! name's row does not open. The store holds only the nonce and the
//! sealed bytes.
//!
//! Specs refer to a secret as `secret:NAME` in `env` or an env file; the
//! stored spec keeps the reference. The value is opened only when the
//! master builds a minion's desired set (`hub::env`), so it travels only
//! over the overlay link, and nothing the master shows or logs holds it.
//! Setting a new value restarts the services that use it (a generation
//! bump and an audit row each); the audit log records that the value
//! changed, never the value.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use phoenix_model::env::{SecretChanged, SecretValue, SecretView};
use phoenix_model::spec::check_secret_name;
use rand_core::{OsRng, RngCore};

use super::{ApiError, Hub};
use crate::store::Service;

/// The key file's name in the master's data dir.
pub const KEY_FILE: &str = "secrets.key";

/// The largest secret value accepted.
pub const MAX_SECRET_BYTES: usize = 64 << 10;

const NONCE_BYTES: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("secret key {path} holds {len} bytes, not 32; it is not a key phoenix wrote")]
    Size { path: String, len: usize },
    #[error(
        "secret key {path} is missing, but the store holds sealed secrets; restore it from a backup of the data dir"
    )]
    Missing { path: String },
    #[error(
        "secret {name:?} does not open with the key in {path}: the key is not the one it was sealed with, or its row is damaged; set it again with `phoenix secret set {name}`"
    )]
    Open { name: String, path: String },
    #[error("secret {name:?} cannot be sealed")]
    Seal { name: String },
}

/// The key that seals secrets. Its `Debug` shows nothing of it.
pub struct SecretKey {
    key: [u8; 32],
    path: PathBuf,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({}, <redacted>)", self.path.display())
    }
}

impl SecretKey {
    /// The key in `path`, None if there is no such file.
    pub fn load(path: &Path) -> Result<Option<SecretKey>, SecretError> {
        let io = |source| SecretError::Io {
            path: path.display().to_string(),
            source,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| SecretError::Size {
            path: path.display().to_string(),
            len: bytes.len(),
        })?;
        Ok(Some(SecretKey {
            key,
            path: path.to_owned(),
        }))
    }

    /// The key in `path`, made (32 random bytes, mode 0600) if missing.
    /// Two masters' first secrets cannot race: the file is written whole
    /// under another name and linked into place, which fails if it exists.
    pub fn load_or_create(path: &Path) -> Result<SecretKey, SecretError> {
        if let Some(key) = Self::load(path)? {
            return Ok(key);
        }
        let io = |source| SecretError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&key)?;
                f.sync_all()
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
                }
                tracing::info!(path = %path.display(), "made the key that seals secrets");
                Ok(SecretKey {
                    key,
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path)?
                .ok_or_else(|| SecretError::Missing {
                    path: path.display().to_string(),
                }),
            Err(e) => Err(io(e)),
        }
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.key).into())
    }

    /// Seals `value` for secret `name`: (nonce, sealed bytes).
    pub fn seal(&self, name: &str, value: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SecretError> {
        let mut nonce = [0u8; NONCE_BYTES];
        OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Seal {
                name: name.to_owned(),
            })?;
        Ok((nonce.to_vec(), sealed))
    }

    /// Opens what [`SecretKey::seal`] sealed for `name`.
    pub fn open(&self, name: &str, nonce: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SecretError> {
        let fail = || SecretError::Open {
            name: name.to_owned(),
            path: self.path.display().to_string(),
        };
        if nonce.len() != NONCE_BYTES {
            return Err(fail());
        }
        self.cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| fail())
    }
}

/// The services whose spec (or an update's new version) refers to secret
/// `name`, sorted.
pub(super) fn users<'a>(services: &'a [Service], name: &str) -> Vec<&'a Service> {
    services
        .iter()
        .filter(|s| {
            s.spec.secret_refs().iter().any(|r| r == name)
                || s.next
                    .as_ref()
                    .is_some_and(|n| n.spec.secret_refs().iter().any(|r| r == name))
        })
        .collect()
}

impl Hub {
    /// Where the key that seals secrets is: beside `master.key`.
    pub(super) fn secret_key_path(&self) -> PathBuf {
        self.registry
            .dir()
            .parent()
            .unwrap_or(Path::new("."))
            .join(KEY_FILE)
    }

    /// The key, None when no secret was ever set.
    pub(super) fn secret_key(&self) -> Result<Option<SecretKey>, SecretError> {
        SecretKey::load(&self.secret_key_path())
    }

    /// `phoenix secret set NAME`: stores the value sealed and restarts the
    /// services that use the secret, if its value changed.
    pub fn secret_set(
        &self,
        actor: &str,
        name: &str,
        value: &SecretValue,
    ) -> Result<SecretChanged, ApiError> {
        check_secret_name(name).map_err(ApiError::Invalid)?;
        let value = value.0.as_bytes();
        let refuse =
            |why: &str| ApiError::Invalid(format!("secret {name:?}: {why}; nothing was changed"));
        if value.is_empty() {
            return Err(refuse("the value is empty"));
        }
        if value.contains(&0) {
            return Err(refuse(
                "the value holds a NUL byte, which an environment variable cannot",
            ));
        }
        if value.len() > MAX_SECRET_BYTES {
            return Err(refuse(&format!(
                "the value takes {} bytes; at most {MAX_SECRET_BYTES} (64 KiB) are allowed",
                value.len()
            )));
        }
        // A key is made only for the first secret: one lost while the
        // store holds secrets sealed with it is not silently replaced.
        let internal = |e: SecretError| ApiError::Internal(e.to_string());
        if self.secret_key().map_err(internal)?.is_none()
            && !self.store().read()?.secrets()?.is_empty()
        {
            return Err(internal(SecretError::Missing {
                path: self.secret_key_path().display().to_string(),
            }));
        }
        let key = SecretKey::load_or_create(&self.secret_key_path()).map_err(internal)?;
        let (nonce, sealed) = key
            .seal(name, value)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let (reply, changed) = self.write_change(|tx| {
            let old = tx.secret(name)?;
            let same = old
                .as_ref()
                .and_then(|o| key.open(name, &o.nonce, &o.sealed).ok())
                .is_some_and(|v| v == value);
            let mut reply = SecretChanged {
                name: name.to_owned(),
                created: old.is_none(),
                restarted: Vec::new(),
            };
            if same {
                return Ok((reply, BTreeSet::new()));
            }
            tx.put_secret(name, &nonce, &sealed)?;
            let action = if old.is_none() {
                "secret-set"
            } else {
                "secret-change"
            };
            tx.audit(
                actor,
                action,
                name,
                old.as_ref()
                    .map(|o| serde_json::json!({ "updated_at": o.updated_at }))
                    .as_ref(),
                Some(&serde_json::json!({ "value": "changed (not recorded)" })),
            )?;
            let services = tx.services()?;
            let mut touched = BTreeSet::new();
            for svc in users(&services, name) {
                touched.insert(super::env::restart_for_env(
                    tx,
                    actor,
                    svc,
                    &format!("secret {name:?} changed"),
                )?);
                reply.restarted.push(svc.spec.name.clone());
            }
            Ok((reply, touched))
        })?;
        self.publish(&changed);
        Ok(reply)
    }

    /// `phoenix secret list`: names, times and users, never values.
    pub fn secret_list(&self) -> Result<Vec<SecretView>, ApiError> {
        let mut store = self.store();
        let tx = store.read()?;
        let services = tx.services()?;
        Ok(tx
            .secrets()?
            .into_iter()
            .map(|s| SecretView {
                used_by: users(&services, &s.name)
                    .into_iter()
                    .map(|u| u.spec.name.clone())
                    .collect(),
                name: s.name,
                created_at: s.created_at,
                updated_at: s.updated_at,
            })
            .collect())
    }

    /// `phoenix secret rm NAME`: refused while a service uses it.
    pub fn secret_rm(&self, actor: &str, name: &str) -> Result<SecretView, ApiError> {
        let (view, _) = self.write_change(|tx| {
            let Some(secret) = tx.secret(name)? else {
                return Err(ApiError::NotFound(format!("no secret {name:?}")));
            };
            let services = tx.services()?;
            let users: Vec<String> = users(&services, name)
                .into_iter()
                .map(|u| u.spec.name.clone())
                .collect();
            if !users.is_empty() {
                return Err(ApiError::Conflict(format!(
                    "secret {name:?} is used by {} {}; remove the references (`secret:{name}`) \
                     first; nothing was changed",
                    if users.len() == 1 {
                        "service"
                    } else {
                        "services"
                    },
                    users.join(", ")
                )));
            }
            tx.delete_secret(name)?;
            tx.audit(actor, "secret-rm", name, None, None)?;
            Ok((
                SecretView {
                    name: secret.name,
                    created_at: secret.created_at,
                    updated_at: secret.updated_at,
                    used_by: users,
                },
                BTreeSet::new(),
            ))
        })?;
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_with_its_key_and_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        assert!(SecretKey::load(&path).unwrap().is_none());
        let key = SecretKey::load_or_create(&path).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(std::fs::read(&path).unwrap().len(), 32);
        let (nonce, sealed) = key.seal("db", b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(key.open("db", &nonce, &sealed).unwrap(), b"hunter2");
        // A nonce each time: the same value seals differently.
        let (nonce2, sealed2) = key.seal("db", b"hunter2").unwrap();
        assert_ne!((&nonce, &sealed), (&nonce2, &sealed2));
        // Loading again gives the same key.
        let again = SecretKey::load_or_create(&path).unwrap();
        assert_eq!(again.open("db", &nonce, &sealed).unwrap(), b"hunter2");
        // Another name (the associated data) does not open it.
        let e = key.open("api", &nonce, &sealed).unwrap_err().to_string();
        assert!(e.contains("secret \"api\" does not open"), "{e}");
        // A tampered byte does not open.
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert!(key.open("db", &nonce, &bad).is_err());
        // Nor does another key.
        let other = SecretKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("db", &nonce, &sealed).is_err());
        assert!(!format!("{key:?}").contains(&format!("{:?}", key.key)));
        // A file of the wrong size is refused, not used.
        std::fs::write(dir.path().join("short.key"), b"x").unwrap();
        let e = SecretKey::load(&dir.path().join("short.key")).unwrap_err();
        assert!(e.to_string().contains("holds 1 bytes, not 32"), "{e}");
    }
}
