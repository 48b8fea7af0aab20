//! `phoenix apply --git` and `phoenix sources`: git repositories as the
//! source, which the master tracks itself (`phoenix_master::hub::git`).

use anyhow::{Context, Result};
use phoenix_model::proto::{GitApplied, GitSettings, Request, SourceView};

use crate::cli::{GitArgs, SourcesAction, Target, Waiting};
use crate::client::{self, MasterRefused};
use crate::output::{ago, table, utc};
use crate::{opt, print_json, print_plan, wait_running_then};

/// The repository's name from its URL (`.../web.git` → `web`), as the
/// master would take it; `--source` names it otherwise.
fn default_name(url: &str) -> String {
    phoenix_master::hub::git_default_name(url)
}

/// Registers (or changes) a git source on the master, which applies the
/// ref's current commit now; then waits like `apply PATH` does.
pub async fn apply(
    git: GitArgs,
    url_ref: String,
    source: Option<String>,
    prune: bool,
    waiting: Waiting,
    target: Target,
    json: bool,
) -> Result<()> {
    let (url, reference) = phoenix_master::hub::git_parse_target(&url_ref)
        .map_err(|e| client::InvalidInput(e.to_string()))?;
    let webhook_secret = match &git.webhook_secret_file {
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the webhook secret file {}", f.display()))?;
            let secret = text.trim().to_owned();
            if secret.is_empty() {
                anyhow::bail!("the webhook secret file {} is empty", f.display());
            }
            Some(secret)
        }
        None => None,
    };
    let settings = GitSettings {
        name: source.unwrap_or_else(|| default_name(&url)),
        url,
        reference,
        path: git.subdir,
        watch: git.watch,
        interval_ms: git.interval_s.saturating_mul(1000),
        prune,
        webhook_secret,
    };
    let done: GitApplied = client::call(&target.data_dir, &Request::GitSource(settings)).await?;
    let s = &done.source;
    if !json {
        let commit = s.live_commit.as_deref().map_or("-", short);
        println!(
            "source {}: {}{} at commit {commit}{}",
            s.name,
            s.url,
            s.reference
                .as_deref()
                .map(|r| format!("#{r}"))
                .unwrap_or_default(),
            if s.watch {
                format!(", watched every {}", interval(s.interval_ms))
            } else {
                String::new()
            }
        );
        if let Some(secret) = &done.new_webhook_secret {
            println!(
                "webhook: POST https://<master>/_phoenix/git/{} with secret {secret}\n\
                 (shown this once; GitHub: content type application/json, this secret; \
                 GitLab: this secret token)",
                s.name
            );
        }
        if let Some(plan) = &done.plan {
            print_plan(plan);
        }
    }
    if let Some(r) = done.refused {
        if json {
            print_json(&done.source)?;
        }
        return Err(MasterRefused {
            kind: r.kind,
            message: r.message,
        }
        .into());
    }
    let Some(plan) = done.plan.as_ref().filter(|p| !p.applied.is_empty()) else {
        if json {
            return print_json(&done);
        }
        return Ok(());
    };
    if waiting.detach {
        return if json { print_json(&done) } else { Ok(()) };
    }
    wait_running_then(&target.data_dir, &plan.applied, waiting, json, Some(plan)).await
}

fn short(commit: &str) -> &str {
    commit.get(..7).unwrap_or(commit)
}

fn interval(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// A source's last error in the table: its start (the whole error is
/// printed under the table, and a table row the width of a paragraph
/// reads as neither).
fn error_cell(error: &str) -> String {
    let first = error.lines().next().unwrap_or("");
    match first.char_indices().nth(40) {
        Some((i, _)) => format!("{}… (below)", &first[..i]),
        None => first.to_owned(),
    }
}

/// `phoenix sources [--json]` and `phoenix sources rm NAME`.
pub async fn sources(action: Option<SourcesAction>, target: &Target, json: bool) -> Result<()> {
    if let Some(SourcesAction::Rm { name }) = action {
        let gone: SourceView = client::call(&target.data_dir, &Request::SourceRm { name }).await?;
        if json {
            return print_json(&gone);
        }
        println!(
            "removed source {}; its services stay as they are (delete them with `phoenix del`)",
            gone.name
        );
        return Ok(());
    }
    let all: Vec<SourceView> = client::call(&target.data_dir, &Request::Sources).await?;
    if json {
        return print_json(&all);
    }
    if all.is_empty() {
        println!("no git sources (add one with `phoenix apply --git URL`)");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.url.clone(),
                opt(s.reference.clone()),
                opt(s.path.clone()),
                s.live_commit
                    .as_deref()
                    .map_or("-".into(), |c| short(c).to_owned()),
                s.live_at.map_or("-".into(), utc),
                if s.watch {
                    interval(s.interval_ms)
                } else {
                    "no".into()
                },
                s.checked_at.map_or("-".into(), ago),
                opt(s.last_error.as_deref().map(error_cell)),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "URL", "REF", "PATH", "LIVE", "SINCE", "WATCH", "CHECKED", "ERROR",
        ],
        &rows,
    );
    for s in all.iter().filter(|s| s.last_error.is_some()) {
        println!("\n{}: {}", s.name, s.last_error.as_deref().unwrap_or(""));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_column_holds_the_start_of_the_error() {
        assert_eq!(error_cell("no route"), "no route");
        let long = "commit 1623cdf of file:///srv/repo refused, nothing was changed: ...";
        let cell = error_cell(long);
        assert_eq!(cell, "commit 1623cdf of file:///srv/repo refus… (below)");
        assert_eq!(error_cell("é".repeat(50).as_str()).chars().count(), 49);
    }
}
