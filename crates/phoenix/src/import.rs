//! `phoenix import compose FILE` and `phoenix import procfile FILE`: the
//! conversion is `phoenix_model::spec::import`'s (pure, unit-tested); this
//! reads the files it names, prints the specs for review (YAML that
//! `phoenix apply` reads, or `--json`), lists on stderr what was not
//! carried over, and with `--apply` sends the specs the way `phoenix
//! apply` does, from the source `compose:PATH` or `procfile:PATH`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use phoenix_model::proto::{NodeView, Request, SourceFile};
use phoenix_model::spec::import::{
    self, ComposeInput, ImportError, Imported, ProcfileInput, compose::parse_env_file,
};

use crate::cli::{Json, Target, Waiting};
use crate::client::{self, InvalidInput};

#[derive(Subcommand, Debug)]
pub enum Import {
    /// A compose file: each service becomes a spec of type docker.
    Compose {
        /// The compose file (compose.yaml, docker-compose.yml...). `${VAR}`
        /// takes its value from the environment, then from `.env` beside it.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// A Procfile: each process type becomes a service running IMAGE with
    /// its command (through /bin/sh -c); `web` gets proxyport, and so PORT.
    Procfile {
        /// The Procfile.
        file: PathBuf,
        /// The image every process runs, as a spec names it: `app:v1` is
        /// tag v1 of registry file app.tar.
        #[arg(long)]
        image: String,
        /// The web process's proxyport; Phoenix sets its PORT to it.
        #[arg(long, default_value_t = phoenix_model::spec::DEFAULT_PROXYPORT)]
        port: u16,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args, Debug)]
pub struct Common {
    /// The machine every service runs on; may be left out when the
    /// cluster has one machine.
    #[arg(long, value_name = "M")]
    machine: Option<String>,
    /// Apply the specs now, as `phoenix apply` would apply a file of them,
    /// instead of printing them.
    #[arg(long)]
    apply: bool,
    /// With --apply: also delete the services this source made before
    /// that the file no longer defines.
    #[arg(long, requires = "apply")]
    prune: bool,
    /// The source the services belong to; `compose:PATH` or
    /// `procfile:PATH` (PATH canonical) by default.
    #[arg(long, value_name = "NAME")]
    source: Option<String>,
    #[command(flatten)]
    waiting: Waiting,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    json: Json,
}

pub async fn run(import: Import) -> Result<()> {
    let (kind, file, common) = match &import {
        Import::Compose { file, common } => ("compose", file, common),
        Import::Procfile { file, common, .. } => ("procfile", file, common),
    };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read {kind} file {}", file.display()))?;
    let canonical = std::fs::canonicalize(file)
        .with_context(|| format!("cannot resolve {}", file.display()))?;
    let shown = file.display().to_string();
    let machine = match &common.machine {
        Some(m) => m.clone(),
        None => only_machine(&common.target.data_dir).await?,
    };
    let imported = match &import {
        Import::Compose { .. } => {
            let dir = canonical.parent().unwrap_or(Path::new("/")).to_owned();
            let project = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "compose".into());
            let dotenv = dot_env(&dir)?;
            let vars = |name: &str| {
                std::env::var(name).ok().or_else(|| {
                    dotenv
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                })
            };
            let read_file =
                |p: &str| std::fs::read_to_string(dir.join(p)).map_err(|e| e.to_string());
            import::compose(&ComposeInput {
                file: &shown,
                text: &text,
                machine: &machine,
                project: &project,
                vars: &vars,
                read_file: &read_file,
            })
        }
        Import::Procfile { image, port, .. } => import::procfile(&ProcfileInput {
            file: &shown,
            text: &text,
            machine: &machine,
            image,
            port: Some(*port),
        }),
    }
    .map_err(invalid)?;
    // The specs are checked as any spec file is before anything is shown.
    imported.check(&shown)?;
    report(&imported, &shown);
    let json = common.json.json;
    if !common.apply {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&imported.report(&shown))?
            );
        } else {
            let header = [
                format!(
                    "Specs imported from {shown} by `phoenix import {kind}`; review them, then"
                ),
                "`phoenix apply` this file (or a folder holding it).".to_owned(),
            ];
            print!("{}", imported.to_yaml(&header));
        }
        return Ok(());
    }
    let source = common
        .source
        .clone()
        .unwrap_or_else(|| format!("{kind}:{}", canonical.display()));
    let specs = serde_json::to_string_pretty(&imported.spec_values())?;
    let files = vec![SourceFile {
        // Not .yaml: the master reads the text as JSON.
        path: format!("{} (imported)", canonical.display()),
        text: specs,
    }];
    crate::send_tree(
        source,
        files,
        &common.target.data_dir,
        json,
        true,
        common.prune,
        Some(common.waiting),
    )
    .await
}

/// The importer's errors are the user's input: exit code 3.
fn invalid(e: ImportError) -> anyhow::Error {
    InvalidInput(e.to_string()).into()
}

/// The machine to use when none is given: the cluster's only one.
async fn only_machine(data_dir: &Path) -> Result<String> {
    let nodes: Vec<NodeView> = client::call(data_dir, &Request::Nodes)
        .await
        .context("no --machine given, and the master cannot say which machines there are")?;
    match nodes.as_slice() {
        [one] => Ok(one.name.clone()),
        [] => bail!("no --machine given, and the cluster has no machines yet"),
        many => {
            let names: Vec<&str> = many.iter().map(|n| n.name.as_str()).collect();
            Err(InvalidInput(format!(
                "give --machine: the cluster has {} machines ({})",
                names.len(),
                names.join(", ")
            ))
            .into())
        }
    }
}

/// The variables of `.env` beside a compose file, if there is one; its
/// own `${VAR}` take the process environment.
fn dot_env(dir: &Path) -> Result<Vec<(String, String)>> {
    let path = dir.join(".env");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    parse_env_file(&text, &|name| std::env::var(name).ok()).map_err(|errors| {
        let lines: Vec<String> = errors
            .iter()
            .map(|(line, reason)| format!("\n  line {line}: {reason}"))
            .collect();
        InvalidInput(format!("{}: {}", path.display(), lines.concat())).into()
    })
}

/// What the import did not carry over, and what to push, on stderr.
fn report(imported: &Imported, shown: &str) {
    let n = imported.specs.len();
    eprintln!(
        "{shown}: {n} service{} imported",
        if n == 1 { "" } else { "s" }
    );
    if !imported.push.is_empty() {
        eprintln!("push these registry files first (`phoenix images` lists what is there):");
        for p in &imported.push {
            eprintln!("  {}", p.how);
        }
    }
    for (title, notes) in [
        ("not carried over:", &imported.not_carried),
        ("changed on the way:", &imported.warnings),
    ] {
        if !notes.is_empty() {
            eprintln!("{title}");
            for note in notes {
                eprintln!("  {note}");
            }
        }
    }
}
