//! The master's store: one SQLite database (WAL) in the data dir.
//!
//! It holds the facts of the cluster: nodes and their keys, services with
//! their specs and addresses, per-node revisions of the desired set, and the
//! audit log. Every change goes through one transaction that also writes its
//! audit row, so the log cannot miss a change.
//!
//! The store loads and saves rows; it decides nothing. What a node should
//! run is computed from these rows by [`crate::reconcile`]. A stored spec is
//! checked again as it is loaded ([`parse_stored`]), so a row written by an
//! older master, or edited by hand, cannot reach a minion unchecked.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;

use phoenix_model::net;
use phoenix_model::proto::AuditEntry;
use phoenix_model::spec::{Spec, SpecErrors, parse_stored};
use phoenix_model::status::now_ms;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("store {path}: cannot make it private (mode 0600): {source}")]
    Mode {
        path: String,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store holds a malformed {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    /// A stored spec no longer passes the checks (written by an older
    /// master with looser ones, or edited by hand).
    #[error(
        "the stored spec of service {name:?} no longer passes the checks: {}; remove it with `phoenix del {name}` and deploy it again",
        reasons(.errors)
    )]
    BadSpec { name: String, errors: SpecErrors },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

mod env;
mod git;
pub use env::SealedSecret;
pub use git::{GitSource, Outcome};

/// The database and its `-wal` and `-shm` files hold the join token: only
/// their owner may read them. Creates the database file 0600 if missing.
fn make_private(db: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mode_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| StoreError::Mode { path, source }
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(db)
        .map_err(mode_err(db))?;
    for suffix in ["", "-wal", "-shm"] {
        let mut file = db.as_os_str().to_owned();
        file.push(suffix);
        let file = Path::new(&file);
        match std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r.map_err(mode_err(file))?,
        }
    }
    Ok(())
}

fn reasons(errors: &SpecErrors) -> String {
    let all: Vec<String> = errors.errors.iter().map(ToString::to_string).collect();
    all.join("; ")
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    name         TEXT PRIMARY KEY,
    key          TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('waiting', 'accepted')),
    public_ip    TEXT NOT NULL,
    private_ip   TEXT NOT NULL,
    overlay_ip   TEXT UNIQUE,
    wg_port      INTEGER NOT NULL,
    token_proof  INTEGER NOT NULL DEFAULT 0,
    version      TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    accepted_at  INTEGER,
    revision     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS services (
    name        TEXT PRIMARY KEY,
    machine     TEXT NOT NULL,
    spec        TEXT NOT NULL,
    ip          TEXT NOT NULL UNIQUE,
    image_hash  TEXT NOT NULL,
    image_size  INTEGER NOT NULL,
    generation  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    run         TEXT,
    next        TEXT,
    source      TEXT
);
CREATE INDEX IF NOT EXISTS services_machine ON services (machine);
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    old     TEXT,
    new     TEXT
);
";

/// A node as stored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    pub name: String,
    pub key: String,
    pub accepted: bool,
    pub public_ip: IpAddr,
    pub private_ip: IpAddr,
    pub overlay_ip: Option<Ipv6Addr>,
    /// The minion's WireGuard port on its public IP.
    pub wg_port: u16,
    /// Whether its join request proved the join token.
    pub token_proof: bool,
    pub version: String,
    pub requested_at: u64,
    pub accepted_at: Option<u64>,
    pub revision: u64,
}

/// A service as stored: its spec plus what the master decided for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub spec: Spec,
    pub ip: Ipv6Addr,
    pub image_hash: String,
    pub image_size: u64,
    pub generation: u64,
    /// The run that serves it, when a zero-downtime update started it
    /// (None: the run named after the service, at `ip`).
    pub run: Option<Run>,
    /// The new version a zero-downtime update runs beside this one until
    /// the switch (see `hub::rollout`).
    pub next: Option<NextVersion>,
}

/// A run of a service that a zero-downtime update started: its instance
/// key (`NAME.GENERATION`) and its own address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Run {
    pub instance: String,
    pub own_ip: Ipv6Addr,
}

/// The version an update is bringing up beside the current one.
#[derive(Clone, Debug, PartialEq)]
pub struct NextVersion {
    pub spec: Spec,
    pub image_hash: String,
    pub image_size: u64,
    pub generation: u64,
    pub run: Run,
    /// Unix ms when the update started it.
    pub since: u64,
}

/// [`NextVersion`] as the `next` column holds it (the spec as JSON text,
/// checked again on load like every stored spec).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredNext {
    spec: String,
    image_hash: String,
    image_size: u64,
    generation: u64,
    run: Run,
    since: u64,
}

impl Service {
    /// The instance key of the run that serves it now.
    pub fn instance(&self) -> &str {
        self.run
            .as_ref()
            .map_or(self.spec.name.as_str(), |r| r.instance.as_str())
    }

    /// Where the run that serves it now is reached.
    pub fn reach_ip(&self) -> Ipv6Addr {
        self.run.as_ref().map_or(self.ip, |r| r.own_ip)
    }

    /// The service as it is once `next` has taken over.
    pub fn promoted(&self) -> Option<Service> {
        let next = self.next.as_ref()?;
        Some(Service {
            spec: next.spec.clone(),
            ip: self.ip,
            image_hash: next.image_hash.clone(),
            image_size: next.image_size,
            generation: next.generation,
            run: Some(next.run.clone()),
            next: None,
        })
    }

    /// The spec as `info` and the audit log show it: with its address.
    pub fn to_json(&self) -> serde_json::Value {
        let mut spec = self.spec.clone();
        spec.ip = Some(self.ip);
        serde_json::to_value(spec).unwrap_or_default()
    }
}

pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        make_private(path)?;
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // SQLite gives `-wal` and `-shm` the database's mode, but files left
        // by an older master keep theirs.
        make_private(path)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        conn.execute_batch(git::SCHEMA).map_err(open_err)?;
        conn.execute_batch(env::SCHEMA).map_err(open_err)?;
        // Columns added since the first schema, for stores an older master
        // made.
        for (column, kind) in [("run", "TEXT"), ("next", "TEXT"), ("source", "TEXT")] {
            let present: bool = conn
                .query_row(
                    "SELECT COUNT(*) > 0 FROM pragma_table_info('services') WHERE name = ?1",
                    [column],
                    |r| r.get(0),
                )
                .map_err(open_err)?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE services ADD COLUMN {column} {kind}"))
                    .map_err(open_err)?;
            }
        }
        // Join requests wait in memory, for as long as their minion holds its
        // connection (`join::waiting`); rows an older master stored are junk
        // after a restart, and the minions behind real ones ask again.
        let dropped = conn
            .execute("DELETE FROM nodes WHERE state = 'waiting'", [])
            .map_err(open_err)?;
        if dropped > 0 {
            tracing::info!("dropped {dropped} stored join requests; their minions ask again");
        }
        if conn
            .query_row(
                "SELECT COUNT(*) = 0 FROM meta WHERE key = 'audit_redacted'",
                [],
                |r| r.get::<_, bool>(0),
            )
            .map_err(open_err)?
        {
            redact_stored_audit(&mut conn).map_err(open_err)?;
        }
        Ok(Store { conn })
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Runs `f` in one transaction, committed only if it returns `Ok`.
    pub fn write<T, E>(&mut self, f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let tx = self.conn.transaction().map_err(StoreError::from)?;
        let mut tx = Tx { tx };
        let out = f(&mut tx)?;
        tx.tx.commit().map_err(StoreError::from)?;
        Ok(out)
    }

    pub fn read(&mut self) -> Result<Tx<'_>> {
        Ok(Tx {
            tx: self.conn.transaction()?,
        })
    }
}

/// A transaction on the store; reads and writes.
pub struct Tx<'a> {
    tx: Transaction<'a>,
}

fn parse<T: std::str::FromStr>(what: &'static str, s: &str) -> Result<T> {
    s.parse().map_err(|_| StoreError::Corrupt {
        what,
        detail: s.to_owned(),
    })
}

fn node_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<[String; 6]> {
    Ok([
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get::<_, Option<String>>(5)?.unwrap_or_default(),
    ])
}

const NODE_COLS: &str = "name, key, state, public_ip, private_ip, overlay_ip, version, requested_at, accepted_at, revision, wg_port, token_proof";
const SERVICE_COLS: &str = "name, spec, ip, image_hash, image_size, generation, run, next";

impl Tx<'_> {
    // ------------------------------------------------------------ nodes

    fn nodes_where(&self, clause: &str, arg: &str) -> Result<Vec<Node>> {
        let mut stmt = self.tx.prepare_cached(&format!(
            "SELECT {NODE_COLS} FROM nodes {clause} ORDER BY name"
        ))?;
        let rows = stmt.query_map([arg], |r| {
            Ok((
                node_from_row(r)?,
                r.get::<_, String>(6)?,
                [
                    r.get::<_, i64>(7)?,
                    r.get::<_, Option<i64>>(8)?.unwrap_or(-1),
                    r.get::<_, i64>(9)?,
                    r.get::<_, i64>(10)?,
                ],
                r.get::<_, bool>(11)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                [name, key, state, public_ip, private_ip, overlay],
                version,
                [req, acc, rev, wg_port],
                token_proof,
            ) = row?;
            out.push(Node {
                name,
                key,
                accepted: state == "accepted",
                public_ip: parse("public ip", &public_ip)?,
                private_ip: parse("private ip", &private_ip)?,
                overlay_ip: if overlay.is_empty() {
                    None
                } else {
                    Some(parse("overlay ip", &overlay)?)
                },
                wg_port: u16::try_from(wg_port).unwrap_or(0),
                token_proof,
                version,
                requested_at: req as u64,
                accepted_at: (acc >= 0).then_some(acc as u64),
                revision: rev as u64,
            });
        }
        Ok(out)
    }

    pub fn node(&self, name: &str) -> Result<Option<Node>> {
        Ok(self.nodes_where("WHERE name = ?1", name)?.pop())
    }

    pub fn nodes(&self, accepted: bool) -> Result<Vec<Node>> {
        self.nodes_where(
            "WHERE state = ?1",
            if accepted { "accepted" } else { "waiting" },
        )
    }

    /// Inserts a node not yet accepted; [`Tx::accept_node`] accepts it in the
    /// same transaction. (Such a row left alone is dropped at the next open.)
    pub fn insert_waiting(&self, node: &Node) -> Result<()> {
        self.tx.execute(
            "INSERT INTO nodes (name, key, state, public_ip, private_ip, version, requested_at, wg_port, token_proof)
             VALUES (?1, ?2, 'waiting', ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                node.name,
                node.key,
                node.public_ip.to_string(),
                node.private_ip.to_string(),
                node.version,
                node.requested_at as i64,
                node.wg_port,
                node.token_proof
            ],
        )?;
        Ok(())
    }

    /// The lowest overlay address not held by a node (the master holds `::1`).
    pub fn next_node_ip(&self) -> Result<Ipv6Addr> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT overlay_ip FROM nodes WHERE overlay_ip IS NOT NULL")?;
        let used: HashSet<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok((1..)
            .map(net::node_ip)
            .find(|ip| !used.contains(&ip.to_string()))
            .unwrap_or(net::MASTER_IP))
    }

    pub fn accept_node(&self, name: &str, overlay_ip: Ipv6Addr) -> Result<()> {
        self.tx.execute(
            "UPDATE nodes SET state = 'accepted', overlay_ip = ?2, accepted_at = ?3 WHERE name = ?1",
            params![name, overlay_ip.to_string(), now_ms() as i64],
        )?;
        Ok(())
    }

    pub fn delete_node(&self, name: &str) -> Result<()> {
        self.tx
            .execute("DELETE FROM nodes WHERE name = ?1", [name])?;
        Ok(())
    }

    /// Bumps a node's revision; its desired set changed.
    pub fn bump_revision(&self, machine: &str) -> Result<()> {
        self.tx.execute(
            "UPDATE nodes SET revision = revision + 1 WHERE name = ?1",
            [machine],
        )?;
        Ok(())
    }

    // ------------------------------------------------------------ services

    fn services_where(&self, clause: &str, arg: Option<&str>) -> Result<Vec<Service>> {
        let mut stmt = self.tx.prepare_cached(&format!(
            "SELECT {SERVICE_COLS} FROM services {clause} ORDER BY name"
        ))?;
        let map = |r: &rusqlite::Row<'_>| {
            Ok((
                [r.get::<_, String>(0)?, r.get::<_, String>(1)?],
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                [
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                ],
            ))
        };
        let rows = match arg {
            Some(a) => stmt
                .query_map([a], map)?
                .collect::<rusqlite::Result<Vec<_>>>()?,
            None => stmt
                .query_map([], map)?
                .collect::<rusqlite::Result<Vec<_>>>()?,
        };
        rows.into_iter()
            .map(
                |([name, spec], ip, image_hash, size, generation, [run, next])| {
                    let run = run
                        .map(|r| {
                            serde_json::from_str::<Run>(&r).map_err(|e| StoreError::Corrupt {
                                what: "service run",
                                detail: e.to_string(),
                            })
                        })
                        .transpose()?;
                    let next = match next {
                        Some(n) => {
                            let n: StoredNext =
                                serde_json::from_str(&n).map_err(|e| StoreError::Corrupt {
                                    what: "service next version",
                                    detail: e.to_string(),
                                })?;
                            Some(NextVersion {
                                spec: parse_stored(&name, &n.spec).map_err(|errors| {
                                    StoreError::BadSpec {
                                        name: name.clone(),
                                        errors,
                                    }
                                })?,
                                image_hash: n.image_hash,
                                image_size: n.image_size,
                                generation: n.generation,
                                run: n.run,
                                since: n.since,
                            })
                        }
                        None => None,
                    };
                    Ok(Service {
                        spec: parse_stored(&name, &spec)
                            .map_err(|errors| StoreError::BadSpec { name, errors })?,
                        ip: parse("service ip", &ip)?,
                        image_hash,
                        image_size: size as u64,
                        generation: generation as u64,
                        run,
                        next,
                    })
                },
            )
            .collect()
    }

    pub fn service(&self, name: &str) -> Result<Option<Service>> {
        Ok(self.services_where("WHERE name = ?1", Some(name))?.pop())
    }

    pub fn services(&self) -> Result<Vec<Service>> {
        self.services_where("", None)
    }

    /// Every stored service's name (without reading, or checking, specs).
    pub fn service_names(&self) -> Result<HashSet<String>> {
        let mut stmt = self.tx.prepare_cached("SELECT name FROM services")?;
        let names = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(names)
    }

    /// Every address a service or one of its runs holds: the stable ones,
    /// and the own addresses of runs that updates started.
    pub fn used_ips(&self) -> Result<HashSet<Ipv6Addr>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT ip, run, next FROM services")?;
        let rows: Vec<(String, Option<String>, Option<String>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut ips = HashSet::new();
        for (ip, run, next) in rows {
            ips.insert(parse("service ip", &ip)?);
            if let Some(run) = run.and_then(|r| serde_json::from_str::<Run>(&r).ok()) {
                ips.insert(run.own_ip);
            }
            if let Some(next) = next.and_then(|n| serde_json::from_str::<StoredNext>(&n).ok()) {
                ips.insert(next.run.own_ip);
            }
        }
        Ok(ips)
    }

    pub fn put_service(&self, svc: &Service) -> Result<()> {
        let now = now_ms() as i64;
        let corrupt = |what| {
            move |e: serde_json::Error| StoreError::Corrupt {
                what,
                detail: e.to_string(),
            }
        };
        let spec = serde_json::to_string(&svc.spec).map_err(corrupt("spec"))?;
        let run = svc
            .run
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(corrupt("service run"))?;
        let next = svc
            .next
            .as_ref()
            .map(|n| {
                serde_json::to_string(&StoredNext {
                    spec: serde_json::to_string(&n.spec)?,
                    image_hash: n.image_hash.clone(),
                    image_size: n.image_size,
                    generation: n.generation,
                    run: n.run.clone(),
                    since: n.since,
                })
            })
            .transpose()
            .map_err(corrupt("service next version"))?;
        self.tx.execute(
            "INSERT INTO services (name, machine, spec, ip, image_hash, image_size, generation, run, next, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)
             ON CONFLICT (name) DO UPDATE SET machine = excluded.machine, spec = excluded.spec,
               ip = excluded.ip, image_hash = excluded.image_hash, image_size = excluded.image_size,
               generation = excluded.generation, run = excluded.run, next = excluded.next,
               updated_at = excluded.updated_at",
            params![
                svc.spec.name,
                svc.spec.machine,
                spec,
                svc.ip.to_string(),
                svc.image_hash,
                svc.image_size as i64,
                svc.generation as i64,
                run,
                next,
                now
            ],
        )?;
        Ok(())
    }

    /// The machine a service's row names, read without its spec (so that
    /// a service whose stored spec fails the checks can still be deleted).
    pub fn service_machine(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .tx
            .query_row(
                "SELECT machine FROM services WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Where each service's spec comes from: the source `phoenix apply`
    /// gave it (a folder or file of specs), None for one deployed by hand.
    pub fn service_sources(&self) -> Result<HashMap<String, Option<String>>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT name, source FROM services")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Records where a service's spec comes from (`put_service` keeps it).
    pub fn set_service_source(&self, name: &str, source: Option<&str>) -> Result<()> {
        self.tx.execute(
            "UPDATE services SET source = ?2 WHERE name = ?1",
            params![name, source],
        )?;
        Ok(())
    }

    pub fn delete_service(&self, name: &str) -> Result<()> {
        self.tx
            .execute("DELETE FROM services WHERE name = ?1", [name])?;
        Ok(())
    }

    // ------------------------------------------------------------ audit

    pub fn audit(
        &self,
        actor: &str,
        action: &str,
        subject: &str,
        old: Option<&serde_json::Value>,
        new: Option<&serde_json::Value>,
    ) -> Result<()> {
        self.tx.execute(
            "INSERT INTO audit (at, actor, action, subject, old, new) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                now_ms() as i64,
                actor,
                action,
                subject,
                old.map(|v| redacted(v).to_string()),
                new.map(|v| redacted(v).to_string())
            ],
        )?;
        Ok(())
    }

    /// The newest `limit` entries, oldest first.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT id, at, actor, action, subject, old, new FROM
               (SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })?;
        let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        let mut out = Vec::new();
        for row in rows {
            let (id, at, actor, action, subject, old, new) = row?;
            out.push(AuditEntry {
                id,
                at: at as u64,
                actor,
                action,
                subject,
                old: json(old),
                new: json(new),
            });
        }
        Ok(out)
    }
}

/// An audit record without password hashes: every `proxyauth` entry
/// (`user:bcrypt-hash`), wherever it sits in the record, keeps its user
/// and shows the hash only as a short fingerprint (`user:bcrypt:1a2b3c4d`),
/// enough to see that a password changed. The audit log is read by
/// anyone with `phoenix audit`, and an offline guesser needs the hash.
fn redacted(value: &serde_json::Value) -> std::borrow::Cow<'_, serde_json::Value> {
    use serde_json::Value;
    fn holds_auth(v: &Value) -> bool {
        match v {
            Value::Object(o) => o.iter().any(|(k, v)| k == "proxyauth" || holds_auth(v)),
            Value::Array(a) => a.iter().any(holds_auth),
            _ => false,
        }
    }
    fn redact(v: &mut Value) {
        match v {
            Value::Object(o) => {
                for (k, v) in o.iter_mut() {
                    if k == "proxyauth"
                        && let Value::Array(entries) = v
                    {
                        for e in entries.iter_mut() {
                            if let Value::String(s) = e
                                && let Some((user, hash)) = s.split_once(':')
                                // A fingerprint already (`bcrypt:…`) stays.
                                && hash.starts_with('$')
                            {
                                let print = blake3::hash(hash.as_bytes()).to_hex();
                                *s = format!("{user}:bcrypt:{}", &print[..8]);
                            }
                        }
                    } else {
                        redact(v);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(redact),
            _ => {}
        }
    }
    if !holds_auth(value) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut owned = value.clone();
    redact(&mut owned);
    std::borrow::Cow::Owned(owned)
}

/// Audit rows an older master wrote with `proxyauth` hashes in them, as
/// [`redacted`] writes them now: once (the `audit_redacted` meta key), in
/// one transaction. Only rows whose text names the field are parsed.
fn redact_stored_audit(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let mut stmt = tx.prepare(
        "SELECT id, old, new FROM audit WHERE old LIKE '%\"proxyauth\"%' OR new LIKE '%\"proxyauth\"%'",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let redact = |text: &Option<String>| -> Option<String> {
        let text = text.as_ref()?;
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => Some(redacted(&v).to_string()),
            Err(_) => Some(text.clone()),
        }
    };
    drop(stmt);
    for (id, old, new) in rows {
        let (o, n) = (redact(&old), redact(&new));
        if o != old || n != new {
            tx.execute(
                "UPDATE audit SET old = ?2, new = ?3 WHERE id = ?1",
                params![id, o, n],
            )?;
        }
    }
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_redacted', '1')",
        [],
    )?;
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &str) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_database_and_its_wal_and_shm_are_private_also_when_an_older_master_left_them_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("phoenix.db");
        let files = |suffix: &str| format!("{}{suffix}", db.display());
        {
            let store = Store::open(&db).unwrap();
            store.set_meta("join_token", "secret").unwrap();
            for suffix in ["", "-wal", "-shm"] {
                assert_eq!(mode(&files(suffix)), 0o600, "phoenix.db{suffix}");
            }
        }
        // As an older master left them.
        for suffix in ["", "-wal", "-shm"] {
            let path = files(suffix);
            if std::path::Path::new(&path).exists() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        let store = Store::open(&db).unwrap();
        store.set_meta("join_token", "secret2").unwrap();
        for suffix in ["", "-wal", "-shm"] {
            assert_eq!(
                mode(&files(suffix)),
                0o600,
                "phoenix.db{suffix} after reopening"
            );
        }
    }
    use phoenix_model::spec::parse_specs;

    fn node(name: &str) -> Node {
        Node {
            name: name.into(),
            key: "k".into(),
            accepted: false,
            public_ip: "10.0.0.2".parse().unwrap(),
            private_ip: "10.1.0.2".parse().unwrap(),
            overlay_ip: None,
            wg_port: 51820,
            token_proof: false,
            version: "0".into(),
            requested_at: 1,
            accepted_at: None,
            revision: 0,
        }
    }

    /// `spec` stored as the first service: the first address, generation 1.
    fn first_service(spec: Spec) -> Service {
        Service {
            spec,
            ip: net::service_ip(0),
            image_hash: "h".into(),
            image_size: 3,
            generation: 1,
            run: None,
            next: None,
        }
    }

    #[test]
    fn nodes_services_and_audit() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db")).unwrap();
        store
            .write(|tx| -> Result<()> {
                tx.insert_waiting(&node("m1"))?;
                tx.insert_waiting(&node("m2"))?;
                let ip = tx.next_node_ip()?;
                assert_eq!(ip.to_string(), "fd38:dde8:32dd::2");
                tx.accept_node("m1", ip)?;
                assert_eq!(tx.next_node_ip()?.to_string(), "fd38:dde8:32dd::3");
                Ok(())
            })
            .unwrap();
        let spec = parse_specs(
            "t",
            r#"{"machine":"m1","name":"a","image":"x","type":"binary"}"#,
        )
        .unwrap();
        let svc = first_service(spec[0].clone());
        store
            .write(|tx| -> Result<()> {
                tx.put_service(&svc)?;
                tx.bump_revision("m1")?;
                tx.audit("root", "deploy", "a", None, Some(&svc.to_json()))
            })
            .unwrap();
        // A failed write leaves nothing behind.
        let failed: Result<()> = store.write(|tx| {
            tx.delete_service("a")?;
            Err(StoreError::Corrupt {
                what: "test",
                detail: String::new(),
            })
        });
        assert!(failed.is_err());

        let tx = store.read().unwrap();
        assert_eq!(tx.nodes(true).unwrap().len(), 1);
        assert_eq!(tx.nodes(false).unwrap()[0].name, "m2");
        let set =
            crate::reconcile::desired_set("m1", &tx.nodes(true).unwrap(), &tx.services().unwrap());
        assert_eq!(set.revision, 1);
        assert_eq!(set.services[0].spec.name, "a");
        assert!(tx.used_ips().unwrap().contains(&net::service_ip(0)));
        let log = tx.audit_log(10).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].new.as_ref().unwrap()["ip"], "fd38:dde8:32dd:1::1");
    }

    #[test]
    fn the_audit_log_keeps_no_basic_auth_hash_only_a_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db")).unwrap();
        let hash = |c: char| format!("$2y$05${}", c.to_string().repeat(53));
        let spec = |h: &str| {
            let json = serde_json::json!({"machine":"m1","name":"a","image":"x","type":"binary",
                "proxyname":"a.example.com","proxyauth":[format!("ann:{h}")]});
            parse_specs("t", &json.to_string()).unwrap().remove(0)
        };
        let svc = |h: &str| first_service(spec(h));
        let (one, two) = (svc(&hash('a')), svc(&hash('b')));
        // Nested too, as an update's new version sits under `next`.
        let nested = serde_json::json!({ "next": two.to_json() });
        store
            .write(|tx| -> Result<()> {
                tx.audit("root", "deploy", "a", Some(&one.to_json()), Some(&nested))
            })
            .unwrap();
        let tx = store.read().unwrap();
        let entry = &tx.audit_log(1).unwrap()[0];
        let text = format!("{:?} {:?}", entry.old, entry.new);
        assert!(!text.contains("$2y$"), "{text}");
        let old = entry.old.as_ref().unwrap()["proxyauth"][0]
            .as_str()
            .unwrap();
        let new = entry.new.as_ref().unwrap()["next"]["proxyauth"][0]
            .as_str()
            .unwrap();
        assert!(
            old.starts_with("ann:bcrypt:") && old.len() == "ann:bcrypt:".len() + 8,
            "{old}"
        );
        assert_ne!(old, new, "a changed password shows as changed");
        drop(tx);
        // Rows an older master wrote with the hash are redacted at open.
        let raw = one.to_json().to_string();
        assert!(raw.contains("$2y$"));
        store
            .conn
            .execute(
                "INSERT INTO audit (at, actor, action, subject, old, new) VALUES (1, 'root', 'deploy', 'a', NULL, ?1)",
                [&raw],
            )
            .unwrap();
        // As an older master left it: no mark that the rows were redacted.
        store
            .conn
            .execute("DELETE FROM meta WHERE key = 'audit_redacted'", [])
            .unwrap();
        drop(store);
        let mut store = Store::open(&dir.path().join("s.db")).unwrap();
        let tx = store.read().unwrap();
        let log = tx.audit_log(10).unwrap();
        assert_eq!(log.len(), 2);
        assert!(!format!("{log:?}").contains("$2y$"), "{log:?}");
        assert_eq!(
            log[1].new.as_ref().unwrap()["proxyauth"][0].as_str(),
            Some(old)
        );
        // A fingerprint is redacted no further: the same after the reopen.
        assert_eq!(
            log[0].old.as_ref().unwrap()["proxyauth"][0].as_str(),
            Some(old)
        );
        // A record without basic auth is stored as it is.
        assert!(matches!(
            redacted(&nested["next"]["ip"]),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn join_requests_stored_by_an_older_master_are_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut store = Store::open(&path).unwrap();
        store
            .write(|tx| -> Result<()> {
                for name in ["m1", "junk1", "junk2"] {
                    tx.insert_waiting(&node(name))?;
                }
                tx.accept_node("m1", net::node_ip(1))
            })
            .unwrap();
        drop(store);
        let mut store = Store::open(&path).unwrap();
        let tx = store.read().unwrap();
        assert!(tx.nodes(false).unwrap().is_empty());
        assert_eq!(tx.nodes(true).unwrap()[0].name, "m1");
    }

    #[test]
    fn a_stored_spec_is_checked_again_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("s.db")).unwrap();
        let spec = parse_specs(
            "t",
            r#"{"machine":"m1","name":"a","image":"x","type":"binary"}"#,
        )
        .unwrap();
        let svc = first_service(spec[0].clone());
        store.write(|tx| tx.put_service(&svc)).unwrap();
        assert_eq!(
            store.read().unwrap().services().unwrap(),
            std::slice::from_ref(&svc)
        );
        // Its source is kept across later writes of the service.
        store
            .write(|tx| {
                tx.set_service_source("a", Some("/etc/specs"))?;
                tx.put_service(&svc)
            })
            .unwrap();
        assert_eq!(
            store.read().unwrap().service_sources().unwrap()["a"].as_deref(),
            Some("/etc/specs")
        );
        // A row edited by hand (or written by a master with looser checks).
        store
            .conn
            .execute(
                "UPDATE services SET spec = ?1 WHERE name = 'a'",
                [r#"{"machine":"m1","name":"a","image":"x","type":"binary","duration":"daemon","proxyport":0}"#],
            )
            .unwrap();
        let err = store.read().unwrap().service("a").unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, StoreError::BadSpec { .. }), "{message}");
        assert!(message.contains(r#"service "a""#), "{message}");
        assert!(message.contains("field `proxyport`"), "{message}");
        assert!(message.contains("`phoenix del a`"), "{message}");
        // Its row can still be found, to delete it.
        let tx = store.read().unwrap();
        assert_eq!(tx.service_machine("a").unwrap().as_deref(), Some("m1"));
        assert_eq!(tx.service_machine("b").unwrap(), None);
    }
}
