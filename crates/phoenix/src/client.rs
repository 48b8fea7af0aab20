//! The CLI's side of the master's Unix socket, and what its failures mean
//! for the exit code.
//!
//! A request gets one typed reply (`phoenix_model::proto::{Applied, Deleted,
//! ...}`, decoded from the JSON body) or a [`MasterRefused`] carrying the
//! error's kind, which [`exit_code`] maps to a distinct exit status.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use phoenix_model::proto::{ErrorKind, MAX_FRAME, Pushed, Reply, Request, read_frame, write_frame};
use phoenix_model::spec::SpecErrors;
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// The CLI's exit statuses on failure; `phoenix --help` and the README
/// list them. 0 is success, and 2 is clap's for bad arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Anything else: an internal error of the master, a failure here.
    Failure = 1,
    /// The input is invalid (a spec error), locally or on the master.
    Invalid = 3,
    NotFound = 4,
    Conflict = 5,
    /// The master, or a machine the request needs, is not reachable, or
    /// waiting for services timed out.
    Unavailable = 6,
    /// The change is stored, but a service it touched did not start (a
    /// crash loop, an exec error, a failed oneshot, unhealthy).
    NotStarted = 7,
}

/// The master answered a request with an error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct MasterRefused {
    pub kind: ErrorKind,
    pub message: String,
}

/// The master's socket does not answer.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the master at {socket} (is `phoenix master` running? point --data-dir or PHOENIX_DATA_DIR at its data dir)"
)]
pub struct MasterUnreachable {
    pub socket: String,
    pub source: std::io::Error,
}

/// Input the CLI refuses before asking the master (a directory to
/// `push`, a file nothing could run): exit code 3, like the master's
/// refusals of invalid input.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// Services a stored change touched that did not start: exit code 7.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotStarted(pub String);

/// The exit status for an error: the first cause in its chain that says
/// what kind of failure it is decides.
pub fn exit_code(err: &anyhow::Error) -> Exit {
    for cause in err.chain() {
        if let Some(refused) = cause.downcast_ref::<MasterRefused>() {
            return match refused.kind {
                ErrorKind::Invalid => Exit::Invalid,
                ErrorKind::NotFound => Exit::NotFound,
                ErrorKind::Conflict => Exit::Conflict,
                ErrorKind::Unavailable => Exit::Unavailable,
                ErrorKind::Internal => Exit::Failure,
            };
        }
        // A spec, a tree of them or an env file that cannot be read or
        // parsed is the user's input, not a failure of Phoenix.
        if cause.is::<SpecErrors>()
            || cause.is::<InvalidInput>()
            || cause.is::<phoenix_model::tree::TreeError>()
        {
            return Exit::Invalid;
        }
        if cause.is::<MasterUnreachable>() {
            return Exit::Unavailable;
        }
        if cause.is::<NotStarted>() {
            return Exit::NotStarted;
        }
    }
    Exit::Failure
}

pub async fn connect(data_dir: &Path) -> Result<UnixStream> {
    let path = phoenix_master::socket_path(data_dir);
    UnixStream::connect(&path).await.map_err(|source| {
        MasterUnreachable {
            socket: path.display().to_string(),
            source,
        }
        .into()
    })
}

/// Sends one request and returns the body of its final reply.
pub async fn call<T: DeserializeOwned>(data_dir: &Path, req: &Request) -> Result<T> {
    let mut s = connect(data_dir).await?;
    write_frame(&mut s, req).await?;
    finish(&mut s).await
}

async fn finish<T: DeserializeOwned>(s: &mut UnixStream) -> Result<T> {
    loop {
        match read_frame::<_, Reply>(s, MAX_FRAME).await? {
            Some(Reply::Ok { body }) => {
                return serde_json::from_value(body)
                    .context("the master's answer has an unexpected shape");
            }
            Some(Reply::Error { message, kind }) => {
                return Err(MasterRefused { kind, message }.into());
            }
            Some(Reply::Log { data }) => print!("{data}"),
            None => bail!("the master closed the connection without an answer"),
        }
    }
}

/// Streams a service's log to stdout until the master ends it.
pub async fn logs(data_dir: &Path, name: &str, tail: usize, follow: bool) -> Result<()> {
    let mut s = connect(data_dir).await?;
    write_frame(
        &mut s,
        &Request::Logs {
            name: name.into(),
            tail,
            follow,
        },
    )
    .await?;
    finish(&mut s).await
}

/// The last `tail` lines of a service's log, as text (what `phoenix logs
/// -n` prints).
pub async fn log_tail(data_dir: &Path, name: &str, tail: usize) -> Result<String> {
    let mut s = connect(data_dir).await?;
    write_frame(
        &mut s,
        &Request::Logs {
            name: name.into(),
            tail,
            follow: false,
        },
    )
    .await?;
    let mut text = String::new();
    loop {
        match read_frame::<_, Reply>(&mut s, MAX_FRAME).await? {
            Some(Reply::Log { data }) => text.push_str(&data),
            Some(Reply::Ok { .. }) => return Ok(text),
            Some(Reply::Error { message, kind }) => {
                return Err(MasterRefused { kind, message }.into());
            }
            None => bail!("the master closed the connection without an answer"),
        }
    }
}

/// Checks that `file` is something the registry takes (the master checks
/// again): a regular file that is an executable or an image.
pub fn check_pushable(file: &Path) -> Result<()> {
    let meta =
        std::fs::metadata(file).with_context(|| format!("cannot open {}", file.display()))?;
    if meta.is_dir() {
        return Err(InvalidInput(format!(
            "{} is a directory; push takes one file (an OCI layout directory goes in as a tar: \
             `tar -cf image.tar -C {} .`)",
            file.display(),
            file.display()
        ))
        .into());
    }
    if !meta.is_file() {
        return Err(InvalidInput(format!("{} is not a regular file", file.display())).into());
    }
    let head = std::fs::File::open(file)
        .and_then(|mut f| phoenix_master::registry::probe(&mut f))
        .with_context(|| format!("cannot read {}", file.display()))?;
    phoenix_master::registry::file_format(&head).map_err(|what| {
        InvalidInput(
            phoenix_master::registry::NotRunnable {
                file: file.display().to_string(),
                what,
            }
            .to_string(),
        )
    })?;
    Ok(())
}

/// Uploads a file to the registry, showing progress on a terminal.
pub async fn push(data_dir: &Path, file: &Path, name: &str) -> Result<Pushed> {
    // The master checks the name as well; checking it here says why before
    // a byte is sent.
    phoenix_model::spec::check_image_name(name)
        .map_err(|reason| InvalidInput(format!("cannot push {}: {reason}", file.display())))?;
    check_pushable(file)?;
    let mut f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let size = f.metadata().await?.len();
    let mut s = connect(data_dir).await?;
    write_frame(
        &mut s,
        &Request::Push {
            name: name.into(),
            size,
        },
    )
    .await?;
    let show = std::io::stderr().is_terminal() && size > 8 << 20;
    let mut buf = vec![0u8; 256 << 10];
    let mut sent = 0u64;
    let mut last_pct = u64::MAX;
    loop {
        let n = tokio::io::AsyncReadExt::read(&mut f, &mut buf).await?;
        if n == 0 {
            break;
        }
        if let Err(e) = s.write_all(&buf[..n]).await {
            // The master stops reading when it refuses the upload: its
            // answer says why, which a bare broken pipe does not.
            return match finish::<Pushed>(&mut s).await {
                Err(refused) if refused.is::<MasterRefused>() => Err(refused),
                _ => Err(anyhow!("upload interrupted: {e}")),
            };
        }
        sent += n as u64;
        let pct = sent * 100 / size.max(1);
        if show && pct != last_pct {
            eprint!(
                "\rpushing {name}: {pct:3}% of {}",
                crate::output::bytes(size)
            );
            last_pct = pct;
        }
    }
    if show {
        eprintln!("\rpushing {name}: sent; the master is chunking it");
    }
    if sent != size {
        bail!(
            "{} changed while it was read ({sent} of {size} bytes)",
            file.display()
        );
    }
    finish(&mut s).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_model::spec::SpecError;

    fn refused(kind: ErrorKind) -> anyhow::Error {
        MasterRefused {
            kind,
            message: "m".into(),
        }
        .into()
    }

    #[test]
    fn each_kind_of_failure_has_its_exit_code() {
        let cases = [
            (ErrorKind::Invalid, 3),
            (ErrorKind::NotFound, 4),
            (ErrorKind::Conflict, 5),
            (ErrorKind::Unavailable, 6),
            (ErrorKind::Internal, 1),
        ];
        for (kind, code) in cases {
            assert_eq!(exit_code(&refused(kind)) as u8, code, "{kind:?}");
        }
        // Context on top (as `deploy` adds to its wait) keeps the kind.
        let waited = refused(ErrorKind::Unavailable).context("the change is stored, but");
        assert_eq!(exit_code(&waited), Exit::Unavailable);
        // A spec refused locally, before the master is asked.
        let local = anyhow::Error::from(SpecErrors {
            file: "web.json".into(),
            errors: vec![SpecError::new(Some("name"), "empty")],
        });
        assert_eq!(exit_code(&local), Exit::Invalid);
        // A tree (or an env file) that cannot be read is bad input too.
        let tree = phoenix_model::tree::read_tree(
            std::path::Path::new("/nonexistent/specs"),
            phoenix_model::tree::Links::Follow,
            |p| p.display().to_string(),
        )
        .map(drop)
        .map_err(anyhow::Error::from)
        .unwrap_err();
        assert_eq!(exit_code(&tree), Exit::Invalid, "{tree}");
        let down = anyhow::Error::from(MasterUnreachable {
            socket: "/x/phoenix.sock".into(),
            source: std::io::ErrorKind::NotFound.into(),
        });
        assert_eq!(exit_code(&down), Exit::Unavailable);
        assert!(down.to_string().contains("/x/phoenix.sock"), "{down}");
        assert_eq!(exit_code(&anyhow!("failed: job")), Exit::Failure);
        let crashed = anyhow::Error::from(NotStarted("job did not start".into()));
        assert_eq!(exit_code(&crashed.context("deploy")), Exit::NotStarted);
    }

    #[test]
    fn push_refuses_a_directory_and_a_file_nothing_can_run_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_pushable(dir.path()).unwrap_err();
        assert_eq!(exit_code(&err), Exit::Invalid);
        assert!(
            err.to_string()
                .starts_with(&format!("{} is a directory", dir.path().display())),
            "{err}"
        );
        let notes = dir.path().join("notes.txt");
        std::fs::write(&notes, "remember the milk\n").unwrap();
        let err = check_pushable(&notes).unwrap_err();
        assert_eq!(exit_code(&err), Exit::Invalid);
        assert!(
            err.to_string().starts_with(&format!(
                "{} is a text file without a `#!` line",
                notes.display()
            )),
            "{err}"
        );
        let script = dir.path().join("run.sh");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 1\n").unwrap();
        check_pushable(&script).unwrap();
        let missing = check_pushable(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("cannot open"), "{missing}");
    }

    #[tokio::test]
    async fn push_refuses_an_image_name_with_a_newline_or_a_leading_dot_before_sending() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app");
        std::fs::write(&file, "#!/bin/sh\nexec sleep 1\n").unwrap();
        // No master listens: the name alone must refuse it, with exit 3.
        for name in ["web\nx", ".hidden", "a/b"] {
            let err = push(dir.path(), &file, name).await.unwrap_err();
            assert_eq!(exit_code(&err), Exit::Invalid, "{name:?}: {err}");
            assert!(err.to_string().contains("is not an image name"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_push_the_master_refuses_midway_says_why_not_broken_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big");
        let mut body = b"#!/bin/sh\n".to_vec();
        body.resize(32 << 20, b'#');
        std::fs::write(&file, &body).unwrap();
        let sock = phoenix_master::socket_path(dir.path());
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let master = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _: Option<Request> = read_frame(&mut s, MAX_FRAME).await.unwrap();
            let reply = Reply::Error {
                message: "image \"big\" is refused".into(),
                kind: ErrorKind::Invalid,
            };
            write_frame(&mut s, &reply).await.unwrap();
            // Closed without reading the upload.
        });
        let err = push(dir.path(), &file, "big").await.unwrap_err();
        master.await.unwrap();
        assert_eq!(exit_code(&err), Exit::Invalid, "{err}");
        assert_eq!(err.to_string(), "image \"big\" is refused");
    }

    #[tokio::test]
    async fn an_error_reply_keeps_its_kind_and_message() {
        let dir = tempfile::tempdir().unwrap();
        let sock = phoenix_master::socket_path(dir.path());
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let master = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _: Option<Request> = read_frame(&mut s, MAX_FRAME).await.unwrap();
            let reply = Reply::Error {
                message: "no service \"web\" (see `phoenix services`)".into(),
                kind: ErrorKind::NotFound,
            };
            write_frame(&mut s, &reply).await.unwrap();
        });
        let err = call::<()>(dir.path(), &Request::Del { name: "web".into() })
            .await
            .unwrap_err();
        master.await.unwrap();
        assert_eq!(exit_code(&err), Exit::NotFound);
        assert_eq!(
            err.to_string(),
            "no service \"web\" (see `phoenix services`)"
        );
        let gone = call::<()>(dir.path(), &Request::Services)
            .await
            .unwrap_err();
        assert_eq!(exit_code(&gone), Exit::Unavailable);
    }
}
