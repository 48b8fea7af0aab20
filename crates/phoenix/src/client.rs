//! The CLI's side of the master's Unix socket.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use phoenix_model::proto::{MAX_FRAME, Reply, Request, read_frame, write_frame};
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

pub async fn connect(data_dir: &Path) -> Result<UnixStream> {
    let path = phoenix_master::socket_path(data_dir);
    UnixStream::connect(&path).await.with_context(|| {
        format!(
            "cannot reach the master at {} (is `phoenix master` running? point --data-dir or PHOENIX_DATA_DIR at its data dir)",
            path.display()
        )
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
            Some(Reply::Error { message }) => bail!("{message}"),
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
    let _: serde_json::Value = finish(&mut s).await?;
    Ok(())
}

/// Uploads a file to the registry, showing progress on a terminal.
pub async fn push(data_dir: &Path, file: &Path, name: &str) -> Result<serde_json::Value> {
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
        s.write_all(&buf[..n])
            .await
            .map_err(|e| anyhow!("upload interrupted: {e}"))?;
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
