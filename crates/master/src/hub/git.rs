//! Git as the source (issue #15, item 2): `phoenix apply --git URL[#REF]`.
//!
//! The master tracks a repository itself. A source has a name (the
//! webhook's path and its folder; its services' source is `git:NAME`), a
//! URL, a ref (a branch or tag; the remote's HEAD by default), a path in
//! the repository, and whether it is watched. Its row in the store
//! (`git_sources`) records the commit that is live, the last look and the
//! last error.
//!
//! A look ([`Hub::git_check`]) is inexpensive: `git ls-remote URL REF`.
//! Only when the ref's commit is not the live one (nor one refused before,
//! see [`decide`]) does the master fetch it (`git fetch --depth 1` into the
//! bare repository `DATA_DIR/sources/NAME`), extract its tree (`git
//! archive`, unpacked into `DATA_DIR/sources/.work-NAME`), read it with
//! the CLI's reader ([`phoenix_model::tree`], links kept inside the
//! checkout) and apply it as `phoenix apply` does ([`Hub::apply_tree`]):
//! every error of every file with file and line, all or nothing. A commit
//! that is refused leaves the previous one live; a remote that cannot be
//! read leaves everything as it is; both show in `phoenix sources`.
//!
//! A watched source has one task ([`Hub::git_watch`]) that sleeps for its
//! interval or until its webhook wakes it (`POST /_phoenix/git/NAME` on
//! the proxy's ports, [`Hub::git_webhook`]): GitHub's
//! `X-Hub-Signature-256` (HMAC-SHA256 of the body) or GitLab's
//! `X-Gitlab-Token`, both checked in constant time against the source's
//! secret; anything else gets the same 403, whether the source exists or
//! not.
//!
//! Git is the `git` binary (Debian's `git`), run through tokio with a
//! timeout, `GIT_TERMINAL_PROMPT=0` and no stdin: one dependency fewer
//! than `gix` (a large one), and users' own credentials, SSH and `insteadOf`
//! configuration work as they do in their shell.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use phoenix_model::proto::{ErrorKind, GitApplied, GitSettings, Plan, Refused, SourceView};
use phoenix_model::status::now_ms;
use phoenix_model::tree::{Links, TreeError, read_tree};
use phoenix_proxy::{HookRequest, HookResponse};
use tokio::sync::Notify;

use super::{ApiError, Hub};
use crate::lock;
use crate::store::{GitSource, Outcome};

/// The shortest interval a source may have.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
const LS_REMOTE_TIMEOUT: Duration = Duration::from_secs(30);
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);
const LOCAL_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest tree (as `git archive` writes it) a source may apply.
const MAX_TREE_BYTES: u64 = 64 * 1024 * 1024;
/// The transports a source's URL may use (`GIT_ALLOW_PROTOCOL`).
const ALLOWED_PROTOCOLS: &str = "file:git:http:https:ssh";
/// Where a fetched commit is kept in a source's bare repository.
const FETCHED: &str = "refs/phoenix/fetched";

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("bad git URL {url:?}: {why}")]
    BadUrl { url: String, why: &'static str },
    #[error("bad git ref {reference:?}: {why}")]
    BadRef {
        reference: String,
        why: &'static str,
    },
    #[error("bad source name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("bad path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("cannot run git (install the `git` package): {0}")]
    Spawn(std::io::Error),
    #[error("`git {what}` took longer than {secs} s and was stopped")]
    Timeout { what: String, secs: u64 },
    #[error("`git {what}` failed: {stderr}")]
    Failed { what: String, stderr: String },
    #[error("{url} has no branch or tag {reference:?} (see `git ls-remote {url}`)")]
    NoSuchRef { url: String, reference: String },
    #[error("{url} has no HEAD (is the repository empty?)")]
    NoHead { url: String },
    #[error("path {path:?} is not in the repository at commit {commit}")]
    NoPath { path: String, commit: String },
    #[error(
        "the tree of commit {commit} is over {MAX_TREE_BYTES} bytes; point --path at the specs"
    )]
    TooLarge { commit: String },
    #[error("commit {commit}: {source}{hint}")]
    Tree {
        commit: String,
        source: TreeError,
        hint: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl GitError {
    /// Whether the commit itself is at fault (refused, not tried again
    /// until the ref moves), rather than the remote or the master's disk.
    fn commit_at_fault(&self) -> bool {
        matches!(
            self,
            GitError::NoPath { .. } | GitError::TooLarge { .. } | GitError::Tree { .. }
        )
    }
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> GitError {
    let what = what.to_string();
    move |source| GitError::Io { what, source }
}

// ------------------------------------------------------------ pure parts

/// `URL[#REF]` as `phoenix apply --git` takes it.
pub fn parse_target(target: &str) -> Result<(String, Option<String>), GitError> {
    let (url, reference) = match target.rsplit_once('#') {
        Some((url, r)) => (url, Some(r)),
        None => (target, None),
    };
    check_url(url)?;
    if let Some(r) = reference {
        check_ref(r)?;
    }
    Ok((url.to_owned(), reference.map(str::to_owned)))
}

pub fn check_url(url: &str) -> Result<(), GitError> {
    let bad = |why| {
        Err(GitError::BadUrl {
            url: url.to_owned(),
            why,
        })
    };
    if url.is_empty() {
        return bad("it is empty");
    }
    if url.starts_with('-') {
        return bad("it starts with '-'");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("it holds a space or a control character");
    }
    if url.starts_with("ext::") || url.starts_with("fd::") {
        return bad("the ext:: and fd:: transports run commands; use a URL");
    }
    // Credentials in the URL would show wherever the URL does (`phoenix
    // sources`, the audit log, errors): a password in any, and any user
    // of http(s) (a token passes as one). ssh's `git@host` is a name.
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority = rest.split('/').next().unwrap_or("");
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            let http = matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https");
            if userinfo.contains(':') || http {
                return Err(GitError::BadUrl {
                    url: format!(
                        "{scheme}://***@{host}/{}",
                        rest.split_once('/').map_or("", |(_, p)| p)
                    ),
                    why: "it holds credentials, which would show wherever the URL does; \
                          give them to git instead (a credential helper, or an insteadOf \
                          rule of the user the master runs as)",
                });
            }
        }
    }
    Ok(())
}

/// A branch or tag name, or a full `refs/...` name (the rules of `git
/// check-ref-format` that matter here).
pub fn check_ref(reference: &str) -> Result<(), GitError> {
    let bad = |why| {
        Err(GitError::BadRef {
            reference: reference.to_owned(),
            why,
        })
    };
    if reference.is_empty() {
        return bad("it is empty (leave out '#' for the remote's HEAD)");
    }
    if reference.starts_with('-') || reference.starts_with('/') || reference.ends_with('/') {
        return bad("it starts with '-' or '/', or ends with '/'");
    }
    if reference.contains("..") || reference.contains("//") || reference.contains("@{") {
        return bad("it holds '..', '//' or '@{'");
    }
    if reference.ends_with(".lock") || reference.ends_with('.') {
        return bad("it ends with '.lock' or '.'");
    }
    if reference
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
    {
        return bad("it holds a space, a control character or one of ~^:?*[\\");
    }
    Ok(())
}

/// A source's name: the webhook's path and a folder name.
pub fn check_name(name: &str) -> Result<(), GitError> {
    let bad = |why| {
        Err(GitError::BadName {
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return bad("it must have 1 to 64 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it must not start with '.' or '-'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// The path in the repository (`None`: its root), made relative and plain.
pub fn check_path(path: &str) -> Result<Option<String>, GitError> {
    let bad = |why| {
        Err(GitError::BadPath {
            path: path.to_owned(),
            why,
        })
    };
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return bad("it must stay inside the repository (no '..')"),
            p if p.chars().any(|c| c.is_control()) => {
                return bad("it holds a control character");
            }
            p => parts.push(p),
        }
    }
    if path.starts_with('/') {
        return bad("it is relative to the repository's root; drop the leading '/'");
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// A source's name when none is given: the repository's, from its URL
/// (`https://host/team/web.git` → `web`).
pub fn default_name(url: &str) -> String {
    let last = url
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("");
    let last = last.strip_suffix(".git").unwrap_or(last);
    let name: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_start_matches(['.', '-']);
    if name.is_empty() {
        "git".into()
    } else {
        name.chars().take(64).collect()
    }
}

/// The ref to fetch and its commit, from `git ls-remote URL REF`'s output
/// (`<sha>\t<ref>` lines): `None` names the remote's HEAD; a short name is
/// a branch first, then a tag (an annotated tag's commit from its peeled
/// `^{}` line).
pub fn pick_commit(listing: &str, reference: Option<&str>) -> Option<(String, String)> {
    let lines: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(sha, name)| (sha.trim(), name.trim()))
        .collect();
    let find = |name: &str| lines.iter().find(|(_, n)| *n == name).map(|(s, _)| *s);
    let candidates: Vec<String> = match reference {
        None => vec!["HEAD".into()],
        Some(r) if r.starts_with("refs/") => vec![r.to_owned()],
        Some(r) => vec![format!("refs/heads/{r}"), format!("refs/tags/{r}")],
    };
    candidates.into_iter().find_map(|name| {
        let sha = find(&format!("{name}^{{}}")).or_else(|| find(&name))?;
        Some((name, sha.to_owned()))
    })
}

/// What a look at the remote calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The ref's commit is live: nothing to do.
    Live,
    /// It was refused before: not tried again until the ref moves.
    Refused,
    /// Fetch it and apply its tree.
    Apply,
}

/// The state machine of a source: `remote` is the ref's commit now;
/// `forced` (the source was just applied with `phoenix apply --git`)
/// applies even a live or refused commit (the settings may have changed,
/// or the images a refused commit lacked been pushed).
pub fn decide(remote: &str, live: Option<&str>, refused: Option<&str>, forced: bool) -> Decision {
    if forced {
        Decision::Apply
    } else if live == Some(remote) {
        Decision::Live
    } else if refused == Some(remote) {
        Decision::Refused
    } else {
        Decision::Apply
    }
}

/// Whether a webhook request carries `secret`: GitHub's
/// `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`, or
/// GitLab's `X-Gitlab-Token: <secret>`. Constant time in the secret and
/// the signature; without a secret, always false (after the same work).
pub fn webhook_ok(
    secret: Option<&str>,
    github: Option<&[u8]>,
    gitlab: Option<&[u8]>,
    body: &[u8],
) -> bool {
    // A source without a secret (or none at all) does the same work
    // against a key nobody has, so the answer's timing does not tell.
    let (known, secret) = match secret {
        Some(s) if !s.is_empty() => (true, s.as_bytes()),
        _ => (false, &b"phoenix: no secret, never matches"[..]),
    };
    let signed = github.and_then(|sig| {
        let hex_sig = sig.strip_prefix(b"sha256=")?;
        let tag = hex::decode(hex_sig).ok()?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        Some(ring::hmac::verify(&key, body, &tag).is_ok())
    });
    // BLAKE3's Hash compares in constant time, and hashing hides the length.
    let token = gitlab.map(|t| blake3::hash(t) == blake3::hash(secret));
    known && (signed == Some(true) || token == Some(true))
}

/// A new webhook secret: 32 random bytes, hex.
pub fn new_secret() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| ApiError::Internal("no randomness for a webhook secret".into()))?;
    Ok(hex::encode(bytes))
}

/// The longest error a source keeps for `phoenix sources`.
const MAX_KEPT_ERROR: usize = 16 << 10;

/// `error`, or its first lines and how many more there were, in at most
/// [`MAX_KEPT_ERROR`] bytes (so what is kept is kept as it is).
pub fn kept_error(error: &str) -> String {
    if error.len() <= MAX_KEPT_ERROR {
        return error.to_owned();
    }
    // Room for the line that says how many more.
    let mut cut = MAX_KEPT_ERROR - 200;
    while !error.is_char_boundary(cut) {
        cut -= 1;
    }
    // Whole lines, unless the first is that long.
    if let Some(nl) = error[..cut].rfind('\n') {
        cut = nl;
    }
    let more = error[cut..].lines().filter(|l| !l.is_empty()).count();
    format!(
        "{}\n... and {more} more lines (`phoenix diff` of a checkout of the commit lists them all)",
        &error[..cut]
    )
}

/// The first 7 characters of a commit, as people read it.
pub fn short(commit: &str) -> &str {
    commit.get(..7).unwrap_or(commit)
}

/// The services' source for a git source's name.
pub fn owner(name: &str) -> String {
    format!("git:{name}")
}

// ------------------------------------------------------------ running git

/// The last lines git wrote to stderr, for an error message.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let joined = lines[lines.len().saturating_sub(3)..].join("; ");
    if joined.is_empty() {
        "(no message)".into()
    } else {
        joined.chars().take(600).collect()
    }
}

/// `git ARGS` (in `dir`) as the master runs it: never prompting, no
/// stdin, stderr kept, in a session of its own, killed with its handle.
fn command(dir: Option<&Path>, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("git");
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env("SSH_ASKPASS", "true")
        // Only the transports a source's URL may name: no remote helper
        // (`ext::`, `fd::`, or any `git-remote-*` on the machine) runs,
        // whatever the master's user's git configuration allows.
        .env("GIT_ALLOW_PROTOCOL", ALLOWED_PROTOCOLS)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // A session of its own: no controlling terminal, so ssh cannot ask
    // anything (not even in a `--foreground` master's terminal), and a
    // timeout ends git's helpers (ssh, git-remote-https) with it.
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the
    // parent; it runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Kills a git and its helpers (its session's process group).
fn kill_group(group: Option<i32>) {
    if let Some(group) = group {
        // SAFETY: kill(2) with integers only; a gone group just fails.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
}

/// Runs `git ARGS` (in `dir`), its stdout kept, with a timeout.
async fn git(dir: Option<&Path>, args: &[&str], timeout: Duration) -> Result<Vec<u8>, GitError> {
    let what = args.first().copied().unwrap_or("").to_owned();
    let child = command(dir, args).spawn().map_err(GitError::Spawn)?;
    let group = child.id().and_then(|id| i32::try_from(id).ok());
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(GitError::Spawn)?,
        Err(_) => {
            kill_group(group);
            return Err(GitError::Timeout {
                what,
                secs: timeout.as_secs(),
            });
        }
    };
    if !output.status.success() {
        return Err(GitError::Failed {
            what,
            stderr: tail(&output.stderr),
        });
    }
    Ok(output.stdout)
}

/// Runs `git ARGS` in `dir` with its stdout written to the file `to`, at
/// most `limit` bytes of it: past that git is stopped and the answer is
/// `Ok(None)`, so a small commit that unpacks huge (a blob of zeros packs
/// a thousand times smaller) never fills the master's disk.
async fn git_to_file(
    dir: &Path,
    args: &[&str],
    timeout: Duration,
    to: &Path,
    limit: u64,
) -> Result<Option<u64>, GitError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let what = args.first().copied().unwrap_or("").to_owned();
    let mut child = command(Some(dir), args).spawn().map_err(GitError::Spawn)?;
    let group = child.id().and_then(|id| i32::try_from(id).ok());
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        kill_group(group);
        return Err(GitError::Spawn(std::io::Error::other(
            "git's output is not piped",
        )));
    };
    // Read on its own, so a git that writes much to stderr never blocks.
    let errors = tokio::spawn(async move {
        let mut e = Vec::new();
        let _ = stderr.read_to_end(&mut e).await;
        e
    });
    let written = tokio::time::timeout(timeout, async {
        let mut file = tokio::fs::File::create(to).await?;
        let n = tokio::io::copy(&mut stdout.take(limit.saturating_add(1)), &mut file).await?;
        file.flush().await?;
        Ok::<u64, std::io::Error>(n)
    })
    .await;
    let n = match written {
        Err(_) => {
            kill_group(group);
            errors.abort();
            return Err(GitError::Timeout {
                what,
                secs: timeout.as_secs(),
            });
        }
        Ok(Err(e)) => {
            kill_group(group);
            errors.abort();
            return Err(io_err(to.display())(e));
        }
        Ok(Ok(n)) if n > limit => {
            kill_group(group);
            errors.abort();
            let _ = child.wait().await;
            return Ok(None);
        }
        Ok(Ok(n)) => n,
    };
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(r) => r.map_err(GitError::Spawn)?,
        Err(_) => {
            kill_group(group);
            errors.abort();
            return Err(GitError::Timeout {
                what,
                secs: timeout.as_secs(),
            });
        }
    };
    let stderr = errors.await.unwrap_or_default();
    if !status.success() {
        return Err(GitError::Failed {
            what,
            stderr: tail(&stderr),
        });
    }
    Ok(Some(n))
}

/// The ref to fetch and its commit, as the remote has them now.
pub async fn ls_remote(url: &str, reference: Option<&str>) -> Result<(String, String), GitError> {
    // An annotated tag's commit is on its peeled `^{}` line, which a
    // pattern only lists when asked for by name.
    let pattern = reference.unwrap_or("HEAD");
    let peeled = format!("{pattern}^{{}}");
    let out = git(
        None,
        &["ls-remote", url, pattern, &peeled],
        LS_REMOTE_TIMEOUT,
    )
    .await
    .map_err(said_as(format!("ls-remote {url}")))?;
    pick_commit(&String::from_utf8_lossy(&out), reference).ok_or_else(|| match reference {
        Some(r) => GitError::NoSuchRef {
            url: url.to_owned(),
            reference: r.to_owned(),
        },
        None => GitError::NoHead {
            url: url.to_owned(),
        },
    })
}

/// A git failure said as `what` (with the URL, not the arguments git was
/// run with); other errors as they are.
fn said_as(what: String) -> impl FnOnce(GitError) -> GitError {
    move |e| match e {
        GitError::Failed { stderr, .. } => GitError::Failed { what, stderr },
        e => e,
    }
}

/// Fetches `full_ref` of `url` into the bare repository `bare` (made if
/// missing) unless it has `commit`; returns the commit fetched.
async fn fetch(bare: &Path, url: &str, full_ref: &str, commit: &str) -> Result<String, GitError> {
    if !bare.join("HEAD").exists() {
        std::fs::create_dir_all(bare).map_err(io_err(bare.display()))?;
        let dir = bare.to_string_lossy();
        git(None, &["init", "--bare", "-q", &dir], LOCAL_TIMEOUT).await?;
    }
    let have = format!("{commit}^{{commit}}");
    if git(Some(bare), &["cat-file", "-e", &have], LOCAL_TIMEOUT)
        .await
        .is_ok()
    {
        return Ok(commit.to_owned());
    }
    let refspec = format!("+{full_ref}:{FETCHED}");
    git(
        Some(bare),
        &["fetch", "-q", "--depth", "1", "--no-tags", url, &refspec],
        FETCH_TIMEOUT,
    )
    .await
    .map_err(said_as(format!("fetch {url} {full_ref}")))?;
    // Each fetch leaves the previous commit unreferenced; let git pack
    // and prune now and then, as it would after a fetch of its own.
    let _ = git(Some(bare), &["gc", "--auto", "--quiet"], FETCH_TIMEOUT).await;
    let peel = format!("{FETCHED}^{{commit}}");
    let out = git(
        Some(bare),
        &["rev-parse", "--verify", "-q", &peel],
        LOCAL_TIMEOUT,
    )
    .await?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

/// The spec files of `commit` under `path`, read from a fresh extraction
/// into `work`, named by their path in the repository; a tree over
/// `limit` bytes (as `git archive` writes it) is refused before more than
/// that is written.
async fn read_commit(
    bare: &Path,
    work: &Path,
    commit: &str,
    path: Option<&str>,
    limit: u64,
) -> Result<Vec<phoenix_model::proto::SourceFile>, GitError> {
    if let Some(p) = path {
        let object = format!("{commit}:{p}");
        if git(Some(bare), &["cat-file", "-e", &object], LOCAL_TIMEOUT)
            .await
            .is_err()
        {
            return Err(GitError::NoPath {
                path: p.to_owned(),
                commit: commit.to_owned(),
            });
        }
    }
    match std::fs::remove_dir_all(work) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io_err(work.display())(e));
        }
        _ => {}
    }
    let tree = work.join("tree");
    std::fs::create_dir_all(&tree).map_err(io_err(tree.display()))?;
    let tar = work.join("commit.tar");
    let mut args = vec!["archive", "--format=tar", commit];
    if let Some(p) = path {
        args.extend(["--", p]);
    }
    if git_to_file(bare, &args, LOCAL_TIMEOUT, &tar, limit)
        .await?
        .is_none()
    {
        let _ = std::fs::remove_file(&tar);
        return Err(GitError::TooLarge {
            commit: commit.to_owned(),
        });
    }
    let (tar2, tree2, commit2) = (tar.clone(), tree.clone(), commit.to_owned());
    let path = path.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let unpack = |source| GitError::Io {
            what: format!("unpacking commit {commit2}"),
            source,
        };
        let file = std::fs::File::open(&tar2).map_err(unpack)?;
        tar::Archive::new(file).unpack(&tree2).map_err(unpack)?;
        let root = std::fs::canonicalize(&tree2).map_err(io_err(tree2.display()))?;
        let top = match &path {
            Some(p) => tree2.join(p),
            None => tree2.clone(),
        };
        read_tree(&top, Links::Within(&root), |f| {
            f.strip_prefix(&tree2).unwrap_or(f).display().to_string()
        })
        .map_err(|source| GitError::Tree {
            hint: match (&source, &path) {
                (TreeError::EnvFile { error, .. }, Some(p))
                    if error.kind() == std::io::ErrorKind::NotFound =>
                {
                    format!(" (only {p:?}, the source's --path, is checked out)")
                }
                _ => String::new(),
            },
            commit: commit2,
            source,
        })
    })
    .await
    .map_err(|e| GitError::Io {
        what: "reading the commit".into(),
        source: std::io::Error::other(e.to_string()),
    })?
}

// ------------------------------------------------------------ the hub's part

/// What the master holds in memory for its git sources: each one's
/// webhook secret and wake-up, its watch task, and a lock that keeps two
/// looks at one source from running at once.
#[derive(Default)]
pub(crate) struct GitSources {
    dir: OnceLock<PathBuf>,
    running: Mutex<HashMap<String, Running>>,
}

#[derive(Clone)]
struct Running {
    secret: Option<String>,
    wake: Arc<Notify>,
    busy: Arc<tokio::sync::Mutex<()>>,
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for GitSources {
    fn drop(&mut self) {
        for r in lock(&self.running).values() {
            if let Some(t) = &r.task {
                t.abort();
            }
        }
    }
}

/// What one look found and did.
#[derive(Debug, Default)]
struct Checked {
    plan: Option<Plan>,
    refused: Option<Refused>,
}

fn api_err(e: GitError) -> ApiError {
    match e {
        GitError::BadUrl { .. }
        | GitError::BadRef { .. }
        | GitError::BadName { .. }
        | GitError::BadPath { .. }
        | GitError::NoSuchRef { .. }
        | GitError::NoHead { .. }
        | GitError::NoPath { .. }
        | GitError::TooLarge { .. }
        | GitError::Tree { .. } => ApiError::Invalid(e.to_string()),
        GitError::Failed { .. } | GitError::Timeout { .. } => ApiError::Unavailable(e.to_string()),
        GitError::Spawn(_) | GitError::Io { .. } => ApiError::Internal(e.to_string()),
    }
}

/// An error of `kind` with `message`.
fn of_kind(kind: ErrorKind, message: String) -> ApiError {
    match kind {
        ErrorKind::Invalid => ApiError::Invalid(message),
        ErrorKind::NotFound => ApiError::NotFound(message),
        ErrorKind::Conflict => ApiError::Conflict(message),
        ErrorKind::Unavailable => ApiError::Unavailable(message),
        ErrorKind::Internal => ApiError::Internal(message),
    }
}

impl Hub {
    fn sources_dir(&self) -> Result<&Path, ApiError> {
        self.git
            .dir
            .get()
            .map(PathBuf::as_path)
            .ok_or_else(|| ApiError::Unavailable("the master's git sources are not started".into()))
    }

    /// At the master's start: the sources' folder, and a watch task for
    /// every watched source (which looks at once).
    pub fn start_git_sources(self: &Arc<Self>, data_dir: &Path) -> Result<(), ApiError> {
        let _ = self.git.dir.set(data_dir.join("sources"));
        let sources = self.store().read()?.git_sources()?;
        for s in sources {
            self.git_run(&s.settings, true);
        }
        Ok(())
    }

    /// Records a source's secret and (re)starts its watch task; `now`: the
    /// task looks at once.
    fn git_run(self: &Arc<Self>, s: &GitSettings, now: bool) {
        let mut running = lock(&self.git.running);
        let entry = running.entry(s.name.clone()).or_insert_with(|| Running {
            secret: None,
            wake: Arc::new(Notify::new()),
            busy: Arc::default(),
            task: None,
        });
        entry.secret = s.webhook_secret.clone().filter(|_| s.watch);
        if let Some(t) = entry.task.take() {
            t.abort();
        }
        if s.watch {
            let interval = Duration::from_millis(s.interval_ms).max(MIN_INTERVAL);
            let task = tokio::spawn(self.clone().git_watch(
                s.name.clone(),
                entry.wake.clone(),
                interval,
                now,
            ));
            entry.task = Some(task.abort_handle());
        }
    }

    /// A watched source's task: a look every interval, or when woken.
    async fn git_watch(
        self: Arc<Self>,
        name: String,
        wake: Arc<Notify>,
        every: Duration,
        now: bool,
    ) {
        if !now {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = wake.notified() => {}
            }
        }
        loop {
            match self.git_check(&name, false).await {
                Ok(c) => {
                    if let Some(r) = c.refused {
                        tracing::warn!(source = %name, "git: {}", kept_error(&r.message));
                    }
                }
                Err(e) => tracing::warn!(source = %name, "git: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = wake.notified() => {}
            }
        }
    }

    fn git_record(&self, name: &str, outcome: &Outcome<'_>) {
        // A commit of thousands of bad files has an error of megabytes:
        // its start is kept (and shown by `phoenix sources`).
        let error = match outcome {
            Outcome::Refused { error, .. } | Outcome::Failed { error } => kept_error(error),
            Outcome::Live { .. } => String::new(),
        };
        let outcome = match *outcome {
            Outcome::Refused { commit, .. } => Outcome::Refused {
                commit,
                error: &error,
            },
            Outcome::Failed { .. } => Outcome::Failed { error: &error },
            Outcome::Live { commit } => Outcome::Live { commit },
        };
        if let Err(e) = self
            .store()
            .write(|tx| tx.git_outcome(name, now_ms(), &outcome))
        {
            tracing::error!(source = %name, "cannot record a git look: {e}");
        }
    }

    /// One look at a source's remote, and the apply of a new commit (see
    /// [`decide`]). An error: the remote could not be read or the commit
    /// fetched, recorded; a refusal: the commit, recorded.
    async fn git_check(self: &Arc<Self>, name: &str, forced: bool) -> Result<Checked, ApiError> {
        let busy = lock(&self.git.running)
            .get(name)
            .map(|r| r.busy.clone())
            .ok_or_else(|| ApiError::NotFound(format!("no git source {name:?}")))?;
        let _busy = busy.lock().await;
        let src: GitSource = self
            .store()
            .read()?
            .git_source(name)?
            .ok_or_else(|| ApiError::NotFound(format!("no git source {name:?}")))?;
        let s = &src.settings;
        let failed = |e: GitError| {
            let e = api_err(e);
            self.git_record(
                name,
                &Outcome::Failed {
                    error: &e.to_string(),
                },
            );
            e
        };
        let (full_ref, remote) = ls_remote(&s.url, s.reference.as_deref())
            .await
            .map_err(failed)?;
        match decide(
            &remote,
            src.live_commit.as_deref(),
            src.refused_commit.as_deref(),
            forced,
        ) {
            Decision::Live => {
                self.git_record(name, &Outcome::Live { commit: &remote });
                return Ok(Checked::default());
            }
            Decision::Refused => {
                // Refused and reported already: only the look is recorded
                // (not logged again at every interval).
                let error = src.last_error.clone().unwrap_or_default();
                self.git_record(
                    name,
                    &Outcome::Refused {
                        commit: &remote,
                        error: &error,
                    },
                );
                return Ok(Checked::default());
            }
            Decision::Apply => {}
        }
        let dir = self.sources_dir()?;
        let bare = dir.join(name);
        let commit = fetch(&bare, &s.url, &full_ref, &remote)
            .await
            .map_err(failed)?;
        let work = dir.join(format!(".work-{name}"));
        let files = read_commit(&bare, &work, &commit, s.path.as_deref(), MAX_TREE_BYTES).await;
        let _ = std::fs::remove_dir_all(&work);
        let refuse = |e: ApiError| {
            let message = format!(
                "commit {} of {} refused, nothing was changed{}: {e}",
                short(&commit),
                s.url,
                match &src.live_commit {
                    Some(live) => format!(" (commit {} stays live)", short(live)),
                    None => String::new(),
                }
            );
            self.git_record(
                name,
                &Outcome::Refused {
                    commit: &commit,
                    error: &message,
                },
            );
            Checked {
                plan: None,
                refused: Some(Refused {
                    kind: e.kind(),
                    message,
                }),
            }
        };
        let files = match files {
            Ok(f) => f,
            Err(e) if e.commit_at_fault() => return Ok(refuse(api_err(e))),
            Err(e) => return Err(failed(e)),
        };
        let via = format!("{}@{}", owner(name), short(&commit));
        let applied = self
            .apply_tree_via(src.actor.clone(), owner(name), via, files, s.prune, false)
            .await;
        match applied {
            Ok(plan) => {
                self.git_record(name, &Outcome::Live { commit: &commit });
                for a in plan.applied.iter().filter(|a| a.beside) {
                    self.start_rollout(&a.name, a.generation);
                }
                tracing::info!(source = %name, commit = %short(&commit), "git: commit applied");
                Ok(Checked {
                    plan: Some(plan),
                    refused: None,
                })
            }
            Err(e @ (ApiError::Invalid(_) | ApiError::Conflict(_) | ApiError::NotFound(_))) => {
                Ok(refuse(e))
            }
            Err(e) => {
                self.git_record(
                    name,
                    &Outcome::Failed {
                        error: &e.to_string(),
                    },
                );
                Err(e)
            }
        }
    }

    /// `phoenix apply --git`: checks the settings and the remote, stores
    /// the source (or its new settings) and applies its ref's commit now.
    /// A new source whose first commit cannot be applied is not kept.
    pub async fn git_source(
        self: &Arc<Self>,
        who: String,
        mut s: GitSettings,
    ) -> Result<GitApplied, ApiError> {
        check_name(&s.name).map_err(api_err)?;
        check_url(&s.url).map_err(api_err)?;
        if let Some(r) = &s.reference {
            check_ref(r).map_err(api_err)?;
        }
        s.path = match &s.path {
            Some(p) => check_path(p).map_err(api_err)?,
            None => None,
        };
        if s.interval_ms < MIN_INTERVAL.as_millis() as u64 {
            return Err(ApiError::Invalid(format!(
                "the interval must be at least {} s",
                MIN_INTERVAL.as_secs()
            )));
        }
        if s.webhook_secret.as_deref().is_some_and(str::is_empty) {
            return Err(ApiError::Invalid("the webhook secret is empty".into()));
        }
        self.sources_dir()?;
        // The remote and the ref must exist before anything is stored.
        ls_remote(&s.url, s.reference.as_deref())
            .await
            .map_err(api_err)?;
        let old = self.store().read()?.git_source(&s.name)?;
        let mut new_webhook_secret = None;
        if !s.watch {
            s.webhook_secret = None;
        } else if s.webhook_secret.is_none() {
            s.webhook_secret = match old.as_ref().and_then(|o| o.settings.webhook_secret.clone()) {
                Some(kept) => Some(kept),
                None => {
                    let made = new_secret()?;
                    new_webhook_secret = Some(made.clone());
                    Some(made)
                }
            };
        }
        let mut shown = s.clone();
        shown.webhook_secret = None;
        let audited = serde_json::to_value(&shown).unwrap_or_default();
        let before = old.as_ref().map(|o| {
            let mut v = o.settings.clone();
            v.webhook_secret = None;
            serde_json::to_value(v).unwrap_or_default()
        });
        self.store().write(|tx| {
            tx.put_git_source(&s, &who)?;
            tx.audit(&who, "git-source", &s.name, before.as_ref(), Some(&audited))
        })?;
        // The task starts after this look (which it would repeat).
        {
            let mut running = lock(&self.git.running);
            let entry = running.entry(s.name.clone()).or_insert_with(|| Running {
                secret: None,
                wake: Arc::new(Notify::new()),
                busy: Arc::default(),
                task: None,
            });
            if let Some(t) = entry.task.take() {
                t.abort();
            }
        }
        let checked = self.git_check(&s.name, true).await;
        let failure = match &checked {
            Err(e) => Some(e.to_string()),
            Ok(c) => c.refused.as_ref().map(|r| r.message.clone()),
        };
        if old.is_none()
            && let Some(why) = failure
        {
            self.git_forget(&s.name);
            let _ = self.store().write(|tx| {
                tx.delete_git_source(&s.name)?;
                tx.audit(&who, "git-source-rm", &s.name, Some(&audited), None)
            });
            let why = format!("{why}\n(the source {:?} was not added)", s.name);
            let kind = match checked {
                Err(e) => e.kind(),
                Ok(c) => c.refused.map_or(ErrorKind::Invalid, |r| r.kind),
            };
            return Err(of_kind(kind, why));
        }
        self.git_run(&s, false);
        let checked = checked.unwrap_or_else(|e| Checked {
            plan: None,
            refused: Some(Refused {
                kind: e.kind(),
                message: e.to_string(),
            }),
        });
        let source = self
            .store()
            .read()?
            .git_source(&s.name)?
            .map(|g| g.view())
            .ok_or_else(|| ApiError::Internal("the source vanished".into()))?;
        Ok(GitApplied {
            source,
            plan: checked.plan,
            refused: checked.refused,
            new_webhook_secret,
        })
    }

    /// Stops a source's task and forgets it in memory, and its folder.
    fn git_forget(&self, name: &str) {
        if let Some(r) = lock(&self.git.running).remove(name)
            && let Some(t) = r.task
        {
            t.abort();
        }
        if let Some(dir) = self.git.dir.get() {
            let _ = std::fs::remove_dir_all(dir.join(name));
            let _ = std::fs::remove_dir_all(dir.join(format!(".work-{name}")));
        }
    }

    /// `phoenix sources`.
    pub fn git_sources(&self) -> Result<Vec<SourceView>, ApiError> {
        Ok(self
            .store()
            .read()?
            .git_sources()?
            .iter()
            .map(GitSource::view)
            .collect())
    }

    /// `phoenix sources rm NAME`: the master stops tracking it; its
    /// services stay as they are (deleted by hand, or taken over by
    /// another `apply`).
    pub fn git_source_rm(&self, who: &str, name: &str) -> Result<SourceView, ApiError> {
        let gone = self.store().write(|tx| {
            let Some(old) = tx.git_source(name)? else {
                return Ok(None);
            };
            tx.delete_git_source(name)?;
            let mut shown = old.settings.clone();
            shown.webhook_secret = None;
            let shown = serde_json::to_value(shown).unwrap_or_default();
            tx.audit(who, "git-source-rm", name, Some(&shown), None)?;
            Ok::<_, ApiError>(Some(old))
        })?;
        let gone = gone.ok_or_else(|| {
            ApiError::NotFound(format!("no git source {name:?} (see `phoenix sources`)"))
        })?;
        self.git_forget(name);
        Ok(gone.view())
    }

    /// `POST /_phoenix/git/NAME` on the proxy: a valid signature wakes the
    /// source's task; anything else gets one answer (403), whether the
    /// source exists, has a secret, or not. Runs on a proxy thread: it
    /// only reads memory.
    pub fn git_webhook(&self, req: &HookRequest<'_>) -> HookResponse {
        let refused = HookResponse {
            status: 403,
            text: "phoenix: webhook refused (a wrong or missing signature, or no such source)\n"
                .into(),
        };
        let Some(name) = req.path.strip_prefix("git/") else {
            return HookResponse {
                status: 404,
                text: "phoenix: not found\n".into(),
            };
        };
        let (secret, wake) = match lock(&self.git.running).get(name) {
            Some(r) => (r.secret.clone(), Some(r.wake.clone())),
            None => (None, None),
        };
        let ok = webhook_ok(
            secret.as_deref(),
            req.header("x-hub-signature-256"),
            req.header("x-gitlab-token"),
            req.body,
        );
        match wake.filter(|_| ok) {
            Some(wake) => {
                tracing::info!(source = %name, "git: webhook; looking for a new commit");
                wake.notify_one();
                HookResponse {
                    status: 202,
                    text: format!("phoenix: source {name} looks for a new commit now\n"),
                }
            }
            None => refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_ref_are_parsed_and_bad_ones_named() {
        assert_eq!(
            parse_target("https://h/x/web.git#main").unwrap(),
            ("https://h/x/web.git".into(), Some("main".into()))
        );
        assert_eq!(
            parse_target("file:///srv/r").unwrap(),
            ("file:///srv/r".into(), None)
        );
        assert_eq!(
            parse_target("git@h:x/y.git#refs/tags/v1").unwrap().1,
            Some("refs/tags/v1".into())
        );
        let e = parse_target("https://h/x#").unwrap_err().to_string();
        assert!(e.starts_with("bad git ref \"\""), "{e}");
        let e = parse_target("-uhoh").unwrap_err().to_string();
        assert!(e.contains("bad git URL \"-uhoh\""), "{e}");
        assert!(parse_target("ext::sh -c x").is_err());
        // Credentials are refused without repeating them.
        for with in [
            "https://bob:TOKEN1@h/x.git",
            "https://TOKEN1@h/x.git#main",
            "ssh://bob:TOKEN1@h/x.git",
        ] {
            let e = parse_target(with).unwrap_err().to_string();
            assert!(e.contains("holds credentials"), "{e}");
            assert!(!e.contains("TOKEN1"), "{e}");
            assert!(e.contains("://***@h/x.git"), "{e}");
        }
        assert!(parse_target("ssh://git@h/x.git").is_ok());
        assert!(parse_target("git@h:x/y.git").is_ok());
        assert!(parse_target("https://h/a@b/x.git").is_ok());
        assert!(parse_target("").is_err());
        for bad in ["a..b", "-x", "a b", "x.lock", "a:b", "/a", "a/"] {
            assert!(check_ref(bad).is_err(), "{bad}");
        }
        for good in ["main", "release/1.2", "v1.0", "refs/heads/x"] {
            check_ref(good).unwrap();
        }
    }

    #[test]
    fn a_long_error_is_kept_by_its_start() {
        assert_eq!(kept_error("short"), "short");
        let long: String = (0..5000).map(|i| format!("f{i}.json: bad\n")).collect();
        let kept = kept_error(&long);
        assert!(kept.len() <= MAX_KEPT_ERROR, "{}", kept.len());
        // Kept again (a refused commit looked at again), it stays so.
        assert_eq!(kept_error(&kept), kept);
        assert!(kept.starts_with("f0.json: bad\nf1.json: bad\n"), "{kept}");
        let shown = kept.lines().count() - 1;
        assert!(
            kept.ends_with(&format!(
                "... and {} more lines (`phoenix diff` of a checkout of the commit lists them all)",
                5000 - shown
            )),
            "{kept}"
        );
        // One line longer than all of it, in characters of two bytes.
        let wide = "é".repeat(MAX_KEPT_ERROR);
        assert!(kept_error(&wide).starts_with("éé"));
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(default_name("https://h/team/web.git"), "web");
        assert_eq!(default_name("git@h:team/api.git/"), "api");
        assert_eq!(default_name("file:///srv/my repo"), "my-repo");
        assert_eq!(default_name("/"), "git");
        check_name("web-1.prod_x").unwrap();
        assert!(check_name(".x").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("").is_err());
        assert_eq!(
            check_path("./conf//prod/").unwrap().as_deref(),
            Some("conf/prod")
        );
        assert_eq!(check_path(".").unwrap(), None);
        assert!(check_path("../x").is_err());
        assert!(check_path("/abs").is_err());
    }

    #[test]
    fn the_ref_s_commit_is_picked_from_ls_remote() {
        let listing = "aaa\tHEAD\nbbb\trefs/heads/main\nccc\trefs/tags/v1\nddd\trefs/tags/v1^{}\n\
                       eee\trefs/heads/v1\nfff\trefs/remotes/origin/main\n";
        assert_eq!(
            pick_commit(listing, None),
            Some(("HEAD".into(), "aaa".into()))
        );
        assert_eq!(
            pick_commit(listing, Some("main")),
            Some(("refs/heads/main".into(), "bbb".into()))
        );
        // A branch before a tag of the same name; an annotated tag peeled.
        assert_eq!(
            pick_commit(listing, Some("v1")),
            Some(("refs/heads/v1".into(), "eee".into()))
        );
        assert_eq!(
            pick_commit(listing, Some("refs/tags/v1")),
            Some(("refs/tags/v1".into(), "ddd".into()))
        );
        assert_eq!(pick_commit(listing, Some("nope")), None);
        assert_eq!(pick_commit("", None), None);
    }

    #[test]
    fn a_new_commit_is_applied_a_live_or_refused_one_is_not_unless_forced() {
        assert_eq!(decide("a", None, None, false), Decision::Apply);
        assert_eq!(decide("a", Some("a"), None, false), Decision::Live);
        assert_eq!(decide("b", Some("a"), None, false), Decision::Apply);
        assert_eq!(decide("b", Some("a"), Some("b"), false), Decision::Refused);
        // The ref moved past the refused commit.
        assert_eq!(decide("c", Some("a"), Some("b"), false), Decision::Apply);
        // Moved back to the live one.
        assert_eq!(decide("a", Some("a"), Some("b"), false), Decision::Live);
        assert_eq!(decide("a", Some("a"), None, true), Decision::Apply);
        assert_eq!(decide("b", Some("a"), Some("b"), true), Decision::Apply);
    }

    fn sh_git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    #[tokio::test]
    async fn a_commit_is_looked_up_fetched_and_read_from_a_local_repository() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(repo.join("specs/sub")).unwrap();
        sh_git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("specs/a.json"), "{}").unwrap();
        std::fs::write(repo.join("specs/sub/b.yaml"), "x: 1").unwrap();
        std::fs::write(repo.join("README.md"), "no").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", repo.join("specs/out.json")).unwrap();
        sh_git(&repo, &["add", "-A"]);
        sh_git(&repo, &["commit", "-q", "-m", "one"]);
        sh_git(&repo, &["tag", "-a", "-m", "v1", "v1"]);
        let head = sh_git(&repo, &["rev-parse", "HEAD"]);
        let url = format!("file://{}", repo.display());

        assert_eq!(
            ls_remote(&url, None).await.unwrap(),
            ("HEAD".into(), head.clone())
        );
        // An annotated tag: its commit, not the tag object.
        assert_eq!(
            ls_remote(&url, Some("v1")).await.unwrap(),
            ("refs/tags/v1".into(), head.clone())
        );
        let e = ls_remote(&url, Some("nope")).await.unwrap_err().to_string();
        assert!(e.contains("has no branch or tag \"nope\""), "{e}");
        let e = ls_remote("file:///no/such/repo", None).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with("`git ls-remote file:///no/such/repo` failed: "),
            "{e}"
        );

        let bare = dir.path().join("sources/r");
        let work = dir.path().join("sources/.work-r");
        let got = fetch(&bare, &url, "refs/tags/v1", &head).await.unwrap();
        assert_eq!(got, head);
        // Fetched already: not again (the remote may be gone).
        assert_eq!(
            fetch(&bare, "file:///gone", "HEAD", &head).await.unwrap(),
            head
        );
        let e = read_commit(&bare, &work, &head, Some("nope"), MAX_TREE_BYTES)
            .await
            .unwrap_err();
        assert!(matches!(e, GitError::NoPath { .. }), "{e}");
        assert!(e.commit_at_fault());
        // A link out of the checkout is refused, naming it.
        let e = read_commit(&bare, &work, &head, Some("specs"), MAX_TREE_BYTES)
            .await
            .unwrap_err();
        assert!(
            e.to_string().ends_with(
                ": specs/out.json leads out of the tree (a link, or `..`); it is not read"
            ),
            "{e}"
        );
        assert!(e.commit_at_fault());
        std::fs::remove_file(repo.join("specs/out.json")).unwrap();
        sh_git(&repo, &["commit", "-q", "-am", "two"]);
        let (full, two) = ls_remote(&url, Some("main")).await.unwrap();
        assert_eq!(fetch(&bare, &url, &full, &two).await.unwrap(), two);
        let files = read_commit(&bare, &work, &two, Some("specs"), MAX_TREE_BYTES)
            .await
            .unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["specs/a.json", "specs/sub/b.yaml"]);
        // An env file beside --path is not checked out: the error says so,
        // naming it by its path in the repository.
        std::fs::write(
            repo.join("specs/a.json"),
            r#"{"machine":"m","name":"a","image":"x","type":"binary","env_file":["../top.env"]}"#,
        )
        .unwrap();
        std::fs::write(repo.join("top.env"), "A=1\n").unwrap();
        sh_git(&repo, &["add", "-A"]);
        sh_git(&repo, &["commit", "-q", "-m", "three"]);
        let (full, three) = ls_remote(&url, Some("main")).await.unwrap();
        assert_eq!(fetch(&bare, &url, &full, &three).await.unwrap(), three);
        let e = read_commit(&bare, &work, &three, Some("specs"), MAX_TREE_BYTES)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read env file top.env (named in `env_file` of specs/a.json)"),
            "{e}"
        );
        assert!(
            e.ends_with("(only \"specs\", the source's --path, is checked out)"),
            "{e}"
        );
        assert!(!e.contains(".work-r"), "{e}");
        let with_env = read_commit(&bare, &work, &three, None, MAX_TREE_BYTES)
            .await
            .unwrap();
        assert!(with_env.iter().any(|f| f.path == "top.env"), "{with_env:?}");
        let all = read_commit(&bare, &work, &two, None, MAX_TREE_BYTES)
            .await
            .unwrap();
        assert_eq!(all.len(), 2, "README.md is no spec");
    }

    #[tokio::test]
    async fn a_commit_that_unpacks_huge_is_refused_before_it_fills_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(repo.join("specs")).unwrap();
        sh_git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("specs/a.json"), "{}").unwrap();
        // 8 MiB of zeros: a few KiB in the repository.
        std::fs::write(repo.join("specs/zeros.bin"), vec![0u8; 8 << 20]).unwrap();
        sh_git(&repo, &["add", "-A"]);
        sh_git(&repo, &["commit", "-q", "-m", "bomb"]);
        let head = sh_git(&repo, &["rev-parse", "HEAD"]);
        let limit = 1 << 20;
        let tar = dir.path().join("commit.tar");
        let got = git_to_file(
            &repo,
            &["archive", "--format=tar", &head],
            LOCAL_TIMEOUT,
            &tar,
            limit,
        )
        .await
        .unwrap();
        assert_eq!(got, None);
        let written = std::fs::metadata(&tar).unwrap().len();
        assert!(written <= limit + 1, "{written} bytes written");
        let work = dir.path().join(".work-r");
        let e = read_commit(&repo, &work, &head, Some("specs"), limit)
            .await
            .unwrap_err();
        assert!(matches!(e, GitError::TooLarge { .. }), "{e}");
        assert!(e.commit_at_fault());
        assert!(!work.join("commit.tar").exists());
        // Under the limit, the whole archive.
        let got = git_to_file(
            &repo,
            &["archive", "--format=tar", &head, "--", "specs/a.json"],
            LOCAL_TIMEOUT,
            &tar,
            limit,
        )
        .await
        .unwrap();
        assert_eq!(got, Some(std::fs::metadata(&tar).unwrap().len()));
        // A git that fails says why.
        let e = git_to_file(&repo, &["archive", "nope"], LOCAL_TIMEOUT, &tar, limit)
            .await
            .unwrap_err();
        assert!(matches!(e, GitError::Failed { .. }), "{e}");
    }

    #[tokio::test]
    async fn no_remote_helper_runs_whatever_the_configuration_allows() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pwned");
        let url = format!("ext::sh -c touch% {}", marker.display());
        let e = git(
            None,
            &["-c", "protocol.ext.allow=always", "ls-remote", &url],
            LOCAL_TIMEOUT,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, GitError::Failed { .. }), "{e}");
        assert!(!marker.exists(), "the ext:: transport ran its command");
    }

    #[tokio::test]
    async fn a_remote_that_never_answers_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let url = format!("git://127.0.0.1:{port}/x");
        let started = std::time::Instant::now();
        let e = git(None, &["ls-remote", &url], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, GitError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(held);
    }

    fn github(secret: &str, body: &[u8]) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        format!(
            "sha256={}",
            hex::encode(ring::hmac::sign(&key, body).as_ref())
        )
        .into_bytes()
    }

    #[test]
    fn webhook_signatures() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = github("s3cret", body);
        assert!(webhook_ok(Some("s3cret"), Some(&sig), None, body));
        // The example of GitHub's documentation.
        let doc = github("It's a Secret to Everybody", b"Hello, World!");
        assert_eq!(
            String::from_utf8(doc).unwrap(),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        assert!(!webhook_ok(Some("other"), Some(&sig), None, body));
        assert!(!webhook_ok(Some("s3cret"), Some(&sig), None, b"changed"));
        assert!(!webhook_ok(Some("s3cret"), Some(b"sha1=00"), None, body));
        assert!(!webhook_ok(Some("s3cret"), Some(b"sha256=zz"), None, body));
        assert!(!webhook_ok(Some("s3cret"), None, None, body));
        assert!(webhook_ok(Some("s3cret"), None, Some(b"s3cret"), body));
        assert!(!webhook_ok(Some("s3cret"), None, Some(b"s3cre"), body));
        // No secret: never, not even with the "no secret" key's signature.
        let none = github("phoenix: no secret, never matches", body);
        assert!(!webhook_ok(None, Some(&none), None, body));
        assert!(!webhook_ok(Some(""), None, Some(b""), body));
        let s = new_secret().unwrap();
        assert_eq!(s.len(), 64);
        assert_ne!(s, new_secret().unwrap());
    }
}
