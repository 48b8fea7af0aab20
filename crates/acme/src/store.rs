//! The files under `DATA_DIR/acme` (see the crate documentation).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use phoenix_host::fs::{AtomicWriteError, write_atomic_with_mode};
use serde::{Deserialize, Serialize};

use crate::cert::{Cert, check_pair};
use crate::host::canonical_host;
use crate::policy::HostState;

const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
    #[error("{} is not valid JSON of its kind: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{} and its key: {reason}", path.display())]
    Cert { path: PathBuf, reason: String },
    #[error(transparent)]
    Host(#[from] crate::host::InvalidHost),
}

/// The ACME account as stored: the directory it belongs to and
/// instant-acme's credentials (its id and private key).
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredAccount {
    pub directory_url: String,
    pub credentials: instant_acme::AccountCredentials,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    #[serde(default)]
    hosts: BTreeMap<String, HostState>,
}

/// `DATA_DIR/acme`: the account, the certificates and keys, the per-host
/// state. Every file is written atomically (temporary file, fsync, rename,
/// directory fsync) with mode 0600; both directories are 0700.
#[derive(Debug, Clone)]
pub struct CertStore {
    dir: PathBuf,
}

impl CertStore {
    /// Opens (creating them as needed) `data_dir/acme` and
    /// `data_dir/acme/certs`, and sets both to mode 0700.
    pub fn open(data_dir: &Path) -> Result<CertStore, StoreError> {
        let store = CertStore {
            dir: data_dir.join("acme"),
        };
        for dir in [store.dir.clone(), store.certs_dir()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&dir)
                .map_err(io_err("cannot create", &dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(DIR_MODE))
                .map_err(io_err("cannot set mode 0700 on", &dir))?;
        }
        Ok(store)
    }

    /// `DATA_DIR/acme`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    pub fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// `certs/<host>.pem`, the chain; the host is validated first.
    pub fn chain_path(&self, host: &str) -> Result<PathBuf, StoreError> {
        Ok(self.certs_dir().join(format!("{}.pem", checked(host)?)))
    }

    /// `certs/<host>.key`, the private key; the host is validated first.
    pub fn key_path(&self, host: &str) -> Result<PathBuf, StoreError> {
        Ok(self.certs_dir().join(format!("{}.key", checked(host)?)))
    }

    pub(crate) fn load_account(&self) -> Result<Option<StoredAccount>, StoreError> {
        let path = self.account_path();
        let Some(bytes) = read_if_exists(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Json { path, source })
    }

    pub(crate) fn save_account(&self, account: &StoredAccount) -> Result<(), StoreError> {
        let path = self.account_path();
        let bytes = serde_json::to_vec_pretty(account).map_err(|source| StoreError::Json {
            path: path.clone(),
            source,
        })?;
        write_atomic_with_mode(&path, &bytes, FILE_MODE)?;
        Ok(())
    }

    /// Moves a stored account aside (`account.json.old`), e.g. when the
    /// server no longer knows it.
    pub(crate) fn retire_account(&self) -> Result<(), StoreError> {
        let path = self.account_path();
        let old = self.dir.join("account.json.old");
        match fs::rename(&path, &old) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io {
                op: "cannot move aside",
                path,
                source: e,
            }),
        }
    }

    /// The stored certificate of `host`, if both files are there; an error
    /// if they are there but unreadable, not a chain for `host`, or the
    /// key is not the leaf's.
    pub fn load_cert(&self, host: &str) -> Result<Option<Cert>, StoreError> {
        let chain_path = self.chain_path(host)?;
        let key_path = self.key_path(host)?;
        let Some(chain) = read_if_exists(&chain_path)? else {
            return Ok(None);
        };
        let Some(key) = read_if_exists(&key_path)? else {
            return Ok(None);
        };
        let not_text = |path: &Path| StoreError::Cert {
            path: path.to_path_buf(),
            reason: "not UTF-8 text".into(),
        };
        let chain = String::from_utf8(chain).map_err(|_| not_text(&chain_path))?;
        let key = String::from_utf8(key).map_err(|_| not_text(&key_path))?;
        check_pair(host, chain, key)
            .map(Some)
            .map_err(|reason| StoreError::Cert {
                path: chain_path,
                reason,
            })
    }

    /// Stores a certificate: the key first, then the chain. A crash between
    /// the two leaves a pair that [`CertStore::load_cert`] refuses (the key
    /// is not the leaf's), so the host is ordered again rather than served a
    /// mismatched pair.
    pub fn save_cert(&self, cert: &Cert) -> Result<(), StoreError> {
        write_atomic_with_mode(
            &self.key_path(&cert.host)?,
            cert.key_pem.as_bytes(),
            FILE_MODE,
        )?;
        write_atomic_with_mode(
            &self.chain_path(&cert.host)?,
            cert.chain_pem.as_bytes(),
            FILE_MODE,
        )?;
        Ok(())
    }

    /// The hosts with a chain file in `certs/` (names that are not valid
    /// hosts are ignored).
    pub fn stored_hosts(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.certs_dir();
        let mut hosts = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
            let entry = entry.map_err(io_err("cannot list", &dir))?;
            let name = entry.file_name();
            let Some(host) = name.to_str().and_then(|n| n.strip_suffix(".pem")) else {
                continue;
            };
            if canonical_host(host).as_deref() == Ok(host) {
                hosts.push(host.to_string());
            }
        }
        hosts.sort();
        Ok(hosts)
    }

    /// The per-host state (`state.json`), empty when there is none.
    pub fn load_state(&self) -> Result<BTreeMap<String, HostState>, StoreError> {
        let path = self.state_path();
        let Some(bytes) = read_if_exists(&path)? else {
            return Ok(BTreeMap::new());
        };
        let file: StateFile =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Json { path, source })?;
        Ok(file
            .hosts
            .into_iter()
            .filter(|(host, _)| canonical_host(host).as_deref() == Ok(host.as_str()))
            .collect())
    }

    pub fn save_state(&self, hosts: &BTreeMap<String, HostState>) -> Result<(), StoreError> {
        let path = self.state_path();
        let file = StateFile {
            hosts: hosts.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|source| StoreError::Json {
            path: path.clone(),
            source,
        })?;
        write_atomic_with_mode(&path, &bytes, FILE_MODE)?;
        Ok(())
    }
}

/// Refuses a host that is not in canonical form (so `A.test` and `a.test`
/// never name two files).
fn checked(host: &str) -> Result<&str, StoreError> {
    let canonical = canonical_host(host)?;
    if canonical != host {
        return Err(StoreError::Host(crate::host::InvalidHost {
            name: host.to_string(),
            reason: "it is not in lower case",
        }));
    }
    Ok(host)
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            op: "cannot read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::tests::self_signed;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn certs_round_trip_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CertStore::open(tmp.path()).unwrap();
        assert_eq!(mode(store.dir()), 0o700);
        assert_eq!(mode(&store.dir().join("certs")), 0o700);
        assert_eq!(store.load_cert("a.test").unwrap(), None);
        let (chain, key) = self_signed(&["a.test"]);
        let cert = check_pair("a.test", chain, key).unwrap();
        store.save_cert(&cert).unwrap();
        assert_eq!(mode(&store.chain_path("a.test").unwrap()), 0o600);
        assert_eq!(mode(&store.key_path("a.test").unwrap()), 0o600);
        assert_eq!(store.load_cert("a.test").unwrap(), Some(cert));
        assert_eq!(store.stored_hosts().unwrap(), vec!["a.test".to_string()]);
    }

    #[test]
    fn open_tightens_an_existing_directory() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("acme/certs")).unwrap();
        fs::set_permissions(tmp.path().join("acme"), fs::Permissions::from_mode(0o755)).unwrap();
        let store = CertStore::open(tmp.path()).unwrap();
        assert_eq!(mode(store.dir()), 0o700);
    }

    #[test]
    fn a_key_that_is_not_the_leafs_is_refused_on_load() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CertStore::open(tmp.path()).unwrap();
        let (chain, key) = self_signed(&["a.test"]);
        store
            .save_cert(&check_pair("a.test", chain, key).unwrap())
            .unwrap();
        let (_, other) = self_signed(&["a.test"]);
        fs::write(store.key_path("a.test").unwrap(), other).unwrap();
        let err = store.load_cert("a.test").unwrap_err();
        assert!(err.to_string().contains("not the certificate's"), "{err}");
    }

    #[test]
    fn bad_host_names_never_become_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CertStore::open(tmp.path()).unwrap();
        for bad in ["../x", "a/b", "", "A.test", "a\0b"] {
            assert!(store.chain_path(bad).is_err(), "{bad:?}");
            assert!(store.load_cert(bad).is_err(), "{bad:?}");
        }
        fs::write(store.dir().join("certs/Not_A_Host.pem"), "x").unwrap();
        assert!(store.stored_hosts().unwrap().is_empty());
    }

    #[test]
    fn state_round_trips_and_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let store = CertStore::open(tmp.path()).unwrap();
        assert!(store.load_state().unwrap().is_empty());
        let mut hosts = BTreeMap::new();
        hosts.insert(
            "a.test".to_string(),
            HostState {
                failures: 3,
                last_error: Some("refused".into()),
                retry_at: Some(42),
                ..HostState::default()
            },
        );
        store.save_state(&hosts).unwrap();
        assert_eq!(mode(&store.state_path()), 0o600);
        assert_eq!(store.load_state().unwrap(), hosts);
        fs::write(store.state_path(), "{").unwrap();
        assert!(matches!(store.load_state(), Err(StoreError::Json { .. })));
    }
}
