//! The cluster's environment variables and its secrets (issue 15).
//!
//! A secret's row holds its value encrypted (`hub::secrets`: XChaCha20-
//! Poly1305 under the key in `DATA_DIR/secrets.key`, a random nonce per
//! value, the name as associated data), never the value itself.

use std::collections::BTreeMap;

use phoenix_model::env::ClusterVar;
use phoenix_model::status::now_ms;
use rusqlite::{OptionalExtension, params};

use super::{Result, Tx};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cluster_env (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    name       TEXT PRIMARY KEY,
    nonce      BLOB NOT NULL,
    sealed     BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
";

/// A secret as stored: sealed.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub name: String,
    pub nonce: Vec<u8>,
    /// The value encrypted, with its tag.
    pub sealed: Vec<u8>,
    pub created_at: u64,
    pub updated_at: u64,
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecret")
            .field("name", &self.name)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish_non_exhaustive()
    }
}

impl Tx<'_> {
    /// The cluster's variables, by key.
    pub fn cluster_env(&self) -> Result<BTreeMap<String, String>> {
        Ok(self
            .cluster_vars()?
            .into_iter()
            .map(|v| (v.key, v.value))
            .collect())
    }

    /// The cluster's variables with their times, sorted by key.
    pub fn cluster_vars(&self) -> Result<Vec<ClusterVar>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT key, value, updated_at FROM cluster_env ORDER BY key")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ClusterVar {
                    key: r.get(0)?,
                    value: r.get(1)?,
                    updated_at: r.get::<_, i64>(2)? as u64,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn set_cluster_var(&self, key: &str, value: &str) -> Result<()> {
        self.tx.execute(
            "INSERT INTO cluster_env (key, value, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
            params![key, value, now_ms() as i64],
        )?;
        Ok(())
    }

    pub fn unset_cluster_var(&self, key: &str) -> Result<()> {
        self.tx
            .execute("DELETE FROM cluster_env WHERE key = ?1", [key])?;
        Ok(())
    }

    fn sealed_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SealedSecret> {
        Ok(SealedSecret {
            name: r.get(0)?,
            nonce: r.get(1)?,
            sealed: r.get(2)?,
            created_at: r.get::<_, i64>(3)? as u64,
            updated_at: r.get::<_, i64>(4)? as u64,
        })
    }

    pub fn secret(&self, name: &str) -> Result<Option<SealedSecret>> {
        Ok(self
            .tx
            .query_row(
                "SELECT name, nonce, sealed, created_at, updated_at FROM secrets WHERE name = ?1",
                [name],
                Self::sealed_from_row,
            )
            .optional()?)
    }

    /// Every secret, sealed, sorted by name.
    pub fn secrets(&self) -> Result<Vec<SealedSecret>> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT name, nonce, sealed, created_at, updated_at FROM secrets ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], Self::sealed_from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Stores a secret's sealed value (its creation time kept when it
    /// exists).
    pub fn put_secret(&self, name: &str, nonce: &[u8], sealed: &[u8]) -> Result<()> {
        self.tx.execute(
            "INSERT INTO secrets (name, nonce, sealed, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (name) DO UPDATE SET nonce = excluded.nonce, sealed = excluded.sealed,
               updated_at = excluded.updated_at",
            params![name, nonce, sealed, now_ms() as i64],
        )?;
        Ok(())
    }

    pub fn delete_secret(&self, name: &str) -> Result<()> {
        self.tx
            .execute("DELETE FROM secrets WHERE name = ?1", [name])?;
        Ok(())
    }
}
