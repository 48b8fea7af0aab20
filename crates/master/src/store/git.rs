//! The git sources the master tracks (`phoenix apply --git`, issue #15):
//! their settings, the commit that is live, and the last look's outcome.
//! One row per source in `git_sources`; the services a source applied keep
//! `git:NAME` in `services.source`.

use phoenix_model::proto::{GitSettings, SourceView};
use rusqlite::{OptionalExtension, params};

use super::{Result, Tx};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS git_sources (
    name           TEXT PRIMARY KEY,
    url            TEXT NOT NULL,
    ref            TEXT,
    path           TEXT,
    watch          INTEGER NOT NULL,
    interval_ms    INTEGER NOT NULL,
    prune          INTEGER NOT NULL,
    secret         TEXT,
    actor          TEXT NOT NULL,
    live_commit    TEXT,
    live_at        INTEGER,
    checked_at     INTEGER,
    last_error     TEXT,
    refused_commit TEXT,
    created_at     INTEGER NOT NULL
);
";

/// A git source as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitSource {
    pub settings: GitSettings,
    /// Who registered it (or last changed its settings): audit rows of its
    /// applies name them.
    pub actor: String,
    pub live_commit: Option<String>,
    pub live_at: Option<u64>,
    pub checked_at: Option<u64>,
    pub last_error: Option<String>,
    pub refused_commit: Option<String>,
}

impl GitSource {
    /// As `phoenix sources` shows it (never the secret).
    pub fn view(&self) -> SourceView {
        let s = &self.settings;
        SourceView {
            name: s.name.clone(),
            url: s.url.clone(),
            reference: s.reference.clone(),
            path: s.path.clone(),
            watch: s.watch,
            interval_ms: s.interval_ms,
            prune: s.prune,
            webhook: s.webhook_secret.is_some(),
            live_commit: self.live_commit.clone(),
            live_at: self.live_at,
            checked_at: self.checked_at,
            last_error: self.last_error.clone(),
            refused_commit: self.refused_commit.clone(),
        }
    }
}

const COLS: &str = "name, url, ref, path, watch, interval_ms, prune, secret, actor, \
                    live_commit, live_at, checked_at, last_error, refused_commit";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GitSource> {
    let ms = |i| -> rusqlite::Result<Option<u64>> {
        Ok(r.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64))
    };
    Ok(GitSource {
        settings: GitSettings {
            name: r.get(0)?,
            url: r.get(1)?,
            reference: r.get(2)?,
            path: r.get(3)?,
            watch: r.get(4)?,
            interval_ms: r.get::<_, i64>(5)?.max(0) as u64,
            prune: r.get(6)?,
            webhook_secret: r.get(7)?,
        },
        actor: r.get(8)?,
        live_commit: r.get(9)?,
        live_at: ms(10)?,
        checked_at: ms(11)?,
        last_error: r.get(12)?,
        refused_commit: r.get(13)?,
    })
}

/// What a look at the remote (and maybe an apply) found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// `commit` was applied (or was live already): it is live now.
    Live { commit: &'a str },
    /// `commit` was refused (validation, a conflict): the previous one
    /// stays live, and this one is not tried again until the ref moves.
    Refused { commit: &'a str, error: &'a str },
    /// The remote could not be read, or the commit not fetched: nothing
    /// changed; tried again at the next look.
    Failed { error: &'a str },
}

impl Tx<'_> {
    pub fn git_sources(&self) -> Result<Vec<GitSource>> {
        let mut stmt = self
            .tx
            .prepare_cached(&format!("SELECT {COLS} FROM git_sources ORDER BY name"))?;
        let rows = stmt
            .query_map([], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn git_source(&self, name: &str) -> Result<Option<GitSource>> {
        Ok(self
            .tx
            .query_row(
                &format!("SELECT {COLS} FROM git_sources WHERE name = ?1"),
                [name],
                from_row,
            )
            .optional()?)
    }

    /// Inserts a source, or changes one's settings. Changed settings forget
    /// a refused commit (it is tried again: the path may differ, or the
    /// images it lacked may be pushed since).
    pub fn put_git_source(&self, s: &GitSettings, actor: &str) -> Result<()> {
        self.tx.execute(
            "INSERT INTO git_sources (name, url, ref, path, watch, interval_ms, prune, secret,
                                      actor, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (name) DO UPDATE SET url = excluded.url, ref = excluded.ref,
                 path = excluded.path, watch = excluded.watch,
                 interval_ms = excluded.interval_ms, prune = excluded.prune,
                 secret = excluded.secret, actor = excluded.actor, refused_commit = NULL",
            params![
                s.name,
                s.url,
                s.reference,
                s.path,
                s.watch,
                i64::try_from(s.interval_ms).unwrap_or(i64::MAX),
                s.prune,
                s.webhook_secret,
                actor,
                phoenix_model::status::now_ms() as i64,
            ],
        )?;
        Ok(())
    }

    pub fn delete_git_source(&self, name: &str) -> Result<bool> {
        Ok(self
            .tx
            .execute("DELETE FROM git_sources WHERE name = ?1", [name])?
            > 0)
    }

    /// Records a look's outcome at `at` (unix ms).
    pub fn git_outcome(&self, name: &str, at: u64, outcome: &Outcome<'_>) -> Result<()> {
        let at = at as i64;
        match outcome {
            Outcome::Live { commit } => self.tx.execute(
                "UPDATE git_sources SET checked_at = ?2, last_error = NULL, refused_commit = NULL,
                     live_at = CASE WHEN live_commit IS ?3 THEN live_at ELSE ?2 END,
                     live_commit = ?3
                 WHERE name = ?1",
                params![name, at, commit],
            )?,
            Outcome::Refused { commit, error } => self.tx.execute(
                "UPDATE git_sources SET checked_at = ?2, last_error = ?4, refused_commit = ?3
                 WHERE name = ?1",
                params![name, at, commit, error],
            )?,
            Outcome::Failed { error } => self.tx.execute(
                "UPDATE git_sources SET checked_at = ?2, last_error = ?3 WHERE name = ?1",
                params![name, at, error],
            )?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn a_source_is_stored_changed_and_keeps_its_live_commit_when_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        let mut s = GitSettings {
            name: "web".into(),
            url: "file:///r".into(),
            reference: Some("main".into()),
            path: None,
            watch: true,
            interval_ms: 60_000,
            prune: false,
            webhook_secret: Some("s3".into()),
        };
        store.write(|tx| tx.put_git_source(&s, "me")).unwrap();
        store
            .write(|tx| tx.git_outcome("web", 5, &Outcome::Live { commit: "aaa" }))
            .unwrap();
        store
            .write(|tx| {
                tx.git_outcome(
                    "web",
                    7,
                    &Outcome::Refused {
                        commit: "bbb",
                        error: "bad",
                    },
                )
            })
            .unwrap();
        let got = store.read().unwrap().git_source("web").unwrap().unwrap();
        assert_eq!(got.live_commit.as_deref(), Some("aaa"));
        assert_eq!((got.live_at, got.checked_at), (Some(5), Some(7)));
        assert_eq!(got.refused_commit.as_deref(), Some("bbb"));
        assert_eq!(got.last_error.as_deref(), Some("bad"));
        assert!(got.view().webhook);
        s.path = Some("conf".into());
        store.write(|tx| tx.put_git_source(&s, "you")).unwrap();
        let got = store.read().unwrap().git_sources().unwrap().remove(0);
        assert_eq!((got.actor.as_str(), got.refused_commit), ("you", None));
        assert_eq!(got.settings, s);
        assert_eq!(got.live_commit.as_deref(), Some("aaa"));
        assert!(store.write(|tx| tx.delete_git_source("web")).unwrap());
        assert!(store.read().unwrap().git_sources().unwrap().is_empty());
    }
}
