//! Per-service log files, their rotation, and following them.
//!
//! A service's stdout and stderr are the log file itself (opened for
//! append), not a pipe through the minion: the minion copies no bytes, and a
//! service keeps running and logging while the minion restarts. Size is
//! watched through inotify; a file over the limit is copied to `.1` (older
//! copies shift up) and truncated in place, which the service's append-mode
//! writes follow. Lines written between the copy and the truncate are lost;
//! that window is a few milliseconds per rotation.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;

use futures_util::StreamExt;
use inotify::{Inotify, WatchDescriptor, WatchMask};
use phoenix_model::proto::ToMaster;
use tokio::sync::mpsc;

/// Where logs live and how big they may grow.
#[derive(Clone, Debug)]
pub struct LogFiles {
    pub dir: PathBuf,
    pub max_bytes: u64,
    /// Rotated copies kept besides the live file.
    pub keep: usize,
}

impl LogFiles {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn rotated(&self, name: &str, n: usize) -> PathBuf {
        self.dir.join(format!("{name}.log.{n}"))
    }

    pub fn open_append(&self, name: &str) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(name))
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.path(name));
        for n in 1..=self.keep {
            let _ = std::fs::remove_file(self.rotated(name, n));
        }
    }

    /// The last `lines` lines of the live file (and of `.1` when the live
    /// file holds fewer), and the live file's length.
    pub fn tail(&self, name: &str, lines: usize) -> io::Result<(String, u64)> {
        let path = self.path(name);
        let mut f = File::open(&path)?;
        let len = f.metadata()?.len();
        let mut text = read_last(&mut f, len, lines)?;
        let have = text.lines().count();
        if have < lines
            && let Ok(mut old) = File::open(self.rotated(name, 1))
        {
            let old_len = old.metadata()?.len();
            let mut older = read_last(&mut old, old_len, lines - have)?;
            older.push_str(&text);
            text = older;
        }
        Ok((text, len))
    }

    /// Copies the live file to `.1` (shifting older copies) and truncates it.
    fn rotate(&self, name: &str) -> io::Result<()> {
        for n in (1..self.keep).rev() {
            let from = self.rotated(name, n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(name, n + 1))?;
            }
        }
        let live = self.path(name);
        std::fs::copy(&live, self.rotated(name, 1))?;
        OpenOptions::new().write(true).open(&live)?.set_len(0)
    }
}

/// The last `lines` lines of the first `len` bytes of `f`, reading at most 1 MiB.
fn read_last(f: &mut File, len: u64, lines: usize) -> io::Result<String> {
    let start = len.saturating_sub(1 << 20);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(len - start).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let ends_nl = text.ends_with('\n');
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    let mut out = all[from..].join("\n");
    if ends_nl && !out.is_empty() {
        out.push('\n');
    }
    Ok(out)
}

/// Requests to the log watcher.
pub enum LogCmd {
    /// Start watching a service's file (after it is created).
    Watch(String),
    Unwatch(String),
    /// Send what is appended to `name`'s log after `offset` as stream `stream`.
    Follow {
        stream: u64,
        name: String,
        offset: u64,
        out: mpsc::UnboundedSender<ToMaster>,
    },
    Cancel(u64),
    /// The link to the master dropped: every follower goes.
    CancelAll,
}

struct Follower {
    name: String,
    offset: u64,
    out: mpsc::UnboundedSender<ToMaster>,
}

/// Runs the watcher: rotation and followers, driven by inotify events.
pub async fn watcher(files: LogFiles, mut cmds: mpsc::UnboundedReceiver<LogCmd>) -> io::Result<()> {
    let inotify = Inotify::init()?;
    let mut events = inotify.into_event_stream(vec![0u8; 4096])?;
    let mut watches = events.watches();
    let mut by_wd: HashMap<WatchDescriptor, String> = HashMap::new();
    let mut by_name: HashMap<String, WatchDescriptor> = HashMap::new();
    let mut followers: HashMap<u64, Follower> = HashMap::new();
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => return Ok(()),
                Some(LogCmd::Watch(name)) => {
                    if by_name.contains_key(&name) {
                        continue;
                    }
                    match watches.add(files.path(&name), WatchMask::MODIFY) {
                        Ok(wd) => {
                            by_wd.insert(wd.clone(), name.clone());
                            by_name.insert(name, wd);
                        }
                        Err(e) => tracing::warn!(service = %name, "cannot watch log: {e}"),
                    }
                }
                Some(LogCmd::Unwatch(name)) => {
                    if let Some(wd) = by_name.remove(&name) {
                        by_wd.remove(&wd);
                        let _ = watches.remove(wd);
                    }
                    followers.retain(|id, f| {
                        if f.name != name {
                            return true;
                        }
                        let _ = f.out.send(ToMaster::LogEnd { stream: *id, error: None });
                        false
                    });
                }
                Some(LogCmd::Follow { stream, name, offset, out }) => {
                    let mut f = Follower { name, offset, out };
                    // Catch up on what was written before the follow began.
                    send_new(&files, &mut f, stream);
                    followers.insert(stream, f);
                }
                Some(LogCmd::Cancel(stream)) => {
                    followers.remove(&stream);
                }
                Some(LogCmd::CancelAll) => followers.clear(),
            },
            ev = events.next() => {
                let Some(Ok(ev)) = ev else { continue };
                let Some(name) = by_wd.get(&ev.wd).cloned() else { continue };
                for (id, f) in followers.iter_mut().filter(|(_, f)| f.name == name) {
                    send_new(&files, f, *id);
                }
                let len = std::fs::metadata(files.path(&name)).map_or(0, |m| m.len());
                if len > files.max_bytes {
                    let files = files.clone();
                    let n = name.clone();
                    let rotated = tokio::task::spawn_blocking(move || files.rotate(&n)).await;
                    if let Ok(Err(e)) = rotated {
                        tracing::warn!(service = %name, "log rotation failed: {e}");
                    }
                }
            }
        }
    }
}

/// Sends a follower what was appended since its offset.
fn send_new(files: &LogFiles, f: &mut Follower, stream: u64) {
    let Ok(mut file) = File::open(files.path(&f.name)) else {
        return;
    };
    let len = file.metadata().map_or(0, |m| m.len());
    if len < f.offset {
        // Rotated: the file was truncated under us.
        f.offset = 0;
    }
    if len == f.offset || file.seek(SeekFrom::Start(f.offset)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if file.take(len - f.offset).read_to_end(&mut buf).is_ok() {
        f.offset += buf.len() as u64;
        for chunk in buf.chunks(64 << 10) {
            let data = String::from_utf8_lossy(chunk).into_owned();
            let _ = f.out.send(ToMaster::LogData { stream, data });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let files = LogFiles {
            dir: dir.path().to_owned(),
            max_bytes: 10,
            keep: 2,
        };
        let mut f = files.open_append("web").unwrap();
        writeln!(f, "one\ntwo\nthree").unwrap();
        assert_eq!(files.tail("web", 2).unwrap().0, "two\nthree\n");
        files.rotate("web").unwrap();
        // Appends after the truncate start at the beginning again.
        writeln!(f, "four").unwrap();
        assert_eq!(
            std::fs::read_to_string(files.path("web")).unwrap(),
            "four\n"
        );
        assert_eq!(files.tail("web", 3).unwrap().0, "two\nthree\nfour\n");
        files.rotate("web").unwrap();
        assert!(dir.path().join("web.log.2").exists());
        files.remove("web");
        assert!(!dir.path().join("web.log.1").exists());
    }
}
