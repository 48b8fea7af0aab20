//! Per-service logs: the output FIFO, the rotated files, and following them.
//!
//! A service's stdout and stderr are a FIFO, `logs/NAME.pipe`, which the
//! service opens read-write: it holds a reader of its own, so it never gets
//! SIGPIPE or EPIPE, minion or no minion. The minion reads the FIFO when it
//! becomes readable (tokio's `AsyncFd`, no polling) and `splice`s what it
//! holds into `logs/NAME.log`, a file only the minion writes. When that file
//! reaches `max_bytes` it is renamed to `.1` (older ones shift up to
//! `.keep`, the oldest is dropped) and a new one begins, so a service's logs
//! take at most `(keep + 1) × max_bytes` of disk whatever its write rate: a
//! writer faster than the disk fills the pipe and then waits.
//!
//! Services writing their log file directly (what Phoenix did before) cannot
//! be bounded that way: the minion can only copy and truncate a file it does
//! not own, and a fast writer outruns the copy (issue 11: 4.26 GB in 20 s
//! with a 1 MiB limit). BENCHMARKS.md "Logs" has the figures of both.
//!
//! The FIFO outlives the minion. A restarted minion reopens it and carries
//! on; what the service wrote meanwhile waits in the pipe (1 MiB, raised
//! with `F_SETPIPE_SZ`), and a service that writes more than that while no
//! minion runs blocks until one is back. A follower (`logs -f`) is told by
//! the pump when bytes were written; it holds the file it reads open, so a
//! rotation loses it nothing.

mod pump;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use phoenix_model::proto::ToMaster;
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use tokio::sync::{mpsc, oneshot};

use pump::Pump;

/// Where logs live and how big they may grow.
#[derive(Clone, Debug)]
pub struct LogFiles {
    pub dir: PathBuf,
    /// The most one file holds; a service's logs hold at most
    /// `(keep + 1) × max_bytes`.
    pub max_bytes: u64,
    /// Rotated files kept besides the live file.
    pub keep: usize,
}

impl LogFiles {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn rotated(&self, name: &str, n: usize) -> PathBuf {
        self.dir.join(format!("{name}.log.{n}"))
    }

    fn fifo_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pipe"))
    }

    /// The service's end of its output FIFO (made if missing), to be its
    /// stdout and stderr: opened read-write and blocking.
    pub fn open_output(&self, name: &str) -> io::Result<File> {
        let fifo = self.fifo_path(name);
        make_fifo(&fifo)?;
        // Opening a FIFO read-write never waits for a peer.
        let fd = rustix::fs::open(
            &fifo,
            OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        raise_pipe_size(std::os::fd::AsFd::as_fd(&fd), name);
        // The live file exists from the start, so `logs` of a quiet
        // service shows nothing rather than an error.
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path(name))?;
        Ok(File::from(fd))
    }

    /// The minion's end of the service's FIFO, opened before the service
    /// starts and handed to the pump with [`LogCmd::Watch`]. A FIFO keeps
    /// its data only while someone holds it open: a service that writes and
    /// exits before the minion's end is open would take its last words
    /// with it.
    pub fn open_collector(&self, name: &str) -> io::Result<OwnedFd> {
        pump::open_minion_end(self, name)
    }

    /// Deletes the service's files; the watcher does it once its pump has
    /// stopped (`LogCmd::Remove`), so no rotation can bring one back.
    fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.path(name));
        let _ = std::fs::remove_file(self.fifo_path(name));
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

/// Makes the FIFO at `path` unless one is there; anything else there (a
/// file left by hand, say) is replaced.
fn make_fifo(path: &Path) -> io::Result<()> {
    let fifo = || {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
    };
    match fifo() {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => {
            let st = rustix::fs::lstat(path)?;
            if FileType::from_raw_mode(st.st_mode) == FileType::Fifo {
                return Ok(());
            }
            std::fs::remove_file(path)?;
            Ok(fifo()?)
        }
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Raises the pipe's buffer to 1 MiB: fewer wake-ups for the minion, and
/// room for a second or so of a busy service's output while no minion
/// reads. The pipe works with the default 64 KiB if the kernel refuses.
fn raise_pipe_size(fd: BorrowedFd<'_>, name: &str) {
    if let Err(e) = rustix::pipe::fcntl_setpipe_size(fd, pump::PIPE_BYTES) {
        tracing::debug!(service = %name, "cannot raise the log pipe's buffer: {e}");
    }
}

/// Requests to the log watcher.
pub enum LogCmd {
    /// Start collecting a service's output (after its task started or was
    /// adopted), through `fifo` when the starter already opened the
    /// minion's end ([`LogFiles::open_collector`]).
    Watch {
        name: String,
        fifo: Option<OwnedFd>,
    },
    /// The service is deleted: stop collecting, end its followers, delete
    /// its files.
    Remove(String),
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
    /// Answer `done` once what the service has written so far is in its
    /// log file (before a tail is read).
    Flush {
        name: String,
        done: oneshot::Sender<()>,
    },
}

struct Follower {
    name: String,
    /// The file being read, held open so that a rotation cannot take it
    /// away half read.
    file: Option<File>,
    offset: u64,
    out: mpsc::UnboundedSender<ToMaster>,
}

/// Runs the watcher: a pump per service, and the followers, which the pumps
/// wake.
pub async fn watcher(files: LogFiles, mut cmds: mpsc::UnboundedReceiver<LogCmd>) -> io::Result<()> {
    let (wrote_tx, mut wrote) = mpsc::unbounded_channel::<String>();
    let mut pumps: HashMap<String, Pump> = HashMap::new();
    let mut followers: HashMap<u64, Follower> = HashMap::new();
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => return Ok(()),
                Some(LogCmd::Watch { name, fifo }) => {
                    if pumps.contains_key(&name) {
                        continue;
                    }
                    match Pump::start(&files, &name, fifo, wrote_tx.clone()) {
                        Ok(p) => {
                            pumps.insert(name, p);
                        }
                        Err(e) => tracing::warn!(service = %name, "cannot collect the output: {e}"),
                    }
                }
                Some(LogCmd::Remove(name)) => {
                    if let Some(p) = pumps.remove(&name) {
                        p.stop().await;
                    }
                    followers.retain(|id, f| {
                        if f.name != name {
                            return true;
                        }
                        let _ = f.out.send(ToMaster::LogEnd { stream: *id, error: None });
                        false
                    });
                    files.remove(&name);
                }
                Some(LogCmd::Follow { stream, name, offset, out }) => {
                    let mut f = Follower { name, file: None, offset, out };
                    // Catch up on what was written before the follow began.
                    send_new(&files, &mut f, stream);
                    followers.insert(stream, f);
                }
                Some(LogCmd::Cancel(stream)) => {
                    followers.remove(&stream);
                }
                Some(LogCmd::CancelAll) => followers.clear(),
                Some(LogCmd::Flush { name, done }) => match pumps.get(&name) {
                    Some(p) => p.flush(done),
                    None => {
                        let _ = done.send(());
                    }
                },
            },
            Some(name) = wrote.recv() => {
                for (id, f) in followers.iter_mut().filter(|(_, f)| f.name == name) {
                    send_new(&files, f, *id);
                }
            }
        }
    }
}

/// Sends a follower what was written since its offset, across rotations.
fn send_new(files: &LogFiles, f: &mut Follower, stream: u64) {
    let path = files.path(&f.name);
    loop {
        let file = match &mut f.file {
            Some(file) => file,
            None => {
                let Ok(file) = File::open(&path) else { return };
                if file.metadata().map_or(0, |m| m.len()) < f.offset {
                    // Rotated between the tail and the follow.
                    f.offset = 0;
                }
                f.file.insert(file)
            }
        };
        // Looked at before the held file is read to its end: once the live
        // file has been renamed away, nothing more is written to it.
        let held = file.metadata().map(|m| (m.dev(), m.ino())).ok();
        let rotated = std::fs::metadata(&path).is_ok_and(|m| Some((m.dev(), m.ino())) != held);
        let mut buf = Vec::new();
        if file.seek(SeekFrom::Start(f.offset)).is_ok() && file.read_to_end(&mut buf).is_ok() {
            f.offset += buf.len() as u64;
            for chunk in buf.chunks(64 << 10) {
                let data = String::from_utf8_lossy(chunk).into_owned();
                let _ = f.out.send(ToMaster::LogData { stream, data });
            }
        }
        if !rotated {
            return;
        }
        f.file = held.and_then(|held| files.after(&f.name, held));
        f.offset = 0;
    }
}

impl LogFiles {
    /// The file that followed the one with `(dev, inode)` `held`, oldest
    /// first; the oldest kept when `held` itself is gone (the follower fell
    /// more than the kept files behind).
    fn after(&self, name: &str, held: (u64, u64)) -> Option<File> {
        let chain: Vec<PathBuf> = (1..=self.keep)
            .rev()
            .map(|n| self.rotated(name, n))
            .chain([self.path(name)])
            .collect();
        let at = chain
            .iter()
            .position(|p| std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == held));
        let next = at.map_or(0, |i| i + 1);
        chain[next..].iter().find_map(|p| File::open(p).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::pump::{Drained, LiveLog, open_minion_end};
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn files(dir: &Path, max_bytes: u64, keep: usize) -> LogFiles {
        LogFiles {
            dir: dir.to_owned(),
            max_bytes,
            keep,
        }
    }

    /// Numbered lines, `count` of them, 10 bytes each.
    fn lines(from: usize, count: usize) -> String {
        (from..from + count)
            .map(|i| format!("line {i:04}\n"))
            .collect()
    }

    #[test]
    fn tail_spans_the_live_file_and_the_last_rotated_one() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), 30, 3);
        let mut service = files.open_output("web").unwrap();
        let pipe = open_minion_end(&files, "web").unwrap();
        let mut log = LiveLog::open(&files, "web").unwrap();
        service.write_all(lines(0, 4).as_bytes()).unwrap();
        log.drain(pipe.as_fd(), u64::MAX).unwrap();
        // 30 bytes in the first file; the fourth line began the next one.
        assert_eq!(
            std::fs::read_to_string(files.path("web")).unwrap(),
            lines(3, 1)
        );
        assert_eq!(files.tail("web", 2).unwrap().0, lines(2, 2));
        assert_eq!(files.tail("web", 9).unwrap().0, lines(0, 4));
    }

    #[test]
    fn rotation_by_rename_keeps_at_most_keep_files_each_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), 4096, 3);
        let mut service = files.open_output("fast").unwrap();
        let pipe = open_minion_end(&files, "fast").unwrap();
        let mut log = LiveLog::open(&files, "fast").unwrap();
        let written = lines(0, 5000);
        for part in written.as_bytes().chunks(7000) {
            service.write_all(part).unwrap();
            let d = log.drain(pipe.as_fd(), u64::MAX).unwrap();
            assert_eq!(
                d,
                Drained {
                    moved: part.len() as u64,
                    empty: true
                }
            );
        }
        let mut kept = String::new();
        for n in (1..=3).rev() {
            let text = std::fs::read_to_string(files.rotated("fast", n)).unwrap();
            assert_eq!(text.len(), 4096, "rotated file {n} is full, no more");
            kept.push_str(&text);
        }
        let live = std::fs::read_to_string(files.path("fast")).unwrap();
        assert!(live.len() <= 4096, "the live file has {} bytes", live.len());
        kept.push_str(&live);
        assert!(!files.rotated("fast", 4).exists(), "only three are kept");
        // What is kept is the newest output, in order, nothing lost.
        assert!(
            written.ends_with(&kept),
            "kept {} bytes out of order",
            kept.len()
        );
        assert_eq!(kept.len(), 3 * 4096 + live.len());
    }

    #[test]
    fn a_restarted_reader_resumes_where_the_last_one_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), 1 << 20, 3);
        let mut service = files.open_output("web").unwrap();
        {
            let pipe = open_minion_end(&files, "web").unwrap();
            let mut log = LiveLog::open(&files, "web").unwrap();
            service.write_all(b"before\n").unwrap();
            log.drain(pipe.as_fd(), u64::MAX).unwrap();
        }
        // No minion: the service's own read-write end keeps the pipe whole,
        // so it writes without EPIPE, into the buffer.
        service.write_all(b"while away\n").unwrap();
        let pipe = open_minion_end(&files, "web").unwrap();
        let mut log = LiveLog::open(&files, "web").unwrap();
        service.write_all(b"after\n").unwrap();
        log.drain(pipe.as_fd(), u64::MAX).unwrap();
        assert_eq!(
            std::fs::read_to_string(files.path("web")).unwrap(),
            "before\nwhile away\nafter\n"
        );
    }

    #[test]
    fn a_file_where_the_fifo_belongs_is_not_read_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), 1 << 20, 3);
        std::fs::write(files.fifo_path("old"), b"").unwrap();
        let e = open_minion_end(&files, "old").unwrap_err();
        assert!(e.to_string().contains("not a FIFO"), "{e}");
        // A launch replaces it with the FIFO.
        files.open_output("old").unwrap();
        open_minion_end(&files, "old").unwrap();
    }

    /// Receives a follower's data until `want` bytes came.
    async fn followed(rx: &mut mpsc::UnboundedReceiver<ToMaster>, want: usize) -> String {
        let mut got = String::new();
        while got.len() < want {
            let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("the follower got everything in time")
                .unwrap();
            match msg {
                ToMaster::LogData { data, .. } => got.push_str(&data),
                other => panic!("unexpected {other:?}"),
            }
        }
        got
    }

    #[tokio::test]
    async fn the_watcher_pumps_follows_across_rotations_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), 100, 3);
        let (cmds, rx) = mpsc::unbounded_channel();
        let watcher = tokio::spawn(watcher(files.clone(), rx));
        let mut service = files.open_output("web").unwrap();
        service.write_all(lines(0, 3).as_bytes()).unwrap();
        cmds.send(LogCmd::Watch {
            name: "web".into(),
            fifo: None,
        })
        .unwrap();
        let (out, mut follow) = mpsc::unbounded_channel();
        cmds.send(LogCmd::Follow {
            stream: 7,
            name: "web".into(),
            offset: 0,
            out,
        })
        .unwrap();
        assert_eq!(followed(&mut follow, 30).await, lines(0, 3));
        // Ten times the limit, a rotation every other write: the follower
        // sees every byte in order though the file it read was renamed.
        for i in 0..20 {
            let more = lines(3 + i * 5, 5);
            service.write_all(more.as_bytes()).unwrap();
            assert_eq!(followed(&mut follow, more.len()).await, more);
        }
        // Two and a half files at once: it reads on through the renamed
        // ones, oldest first.
        let burst = lines(200, 25);
        service.write_all(burst.as_bytes()).unwrap();
        assert_eq!(followed(&mut follow, burst.len()).await, burst);
        assert!(!files.rotated("web", 4).exists());

        cmds.send(LogCmd::Remove("web".into())).unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), follow.recv())
            .await
            .unwrap();
        assert!(
            matches!(
                end,
                Some(ToMaster::LogEnd {
                    stream: 7,
                    error: None
                })
            ),
            "{end:?}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "left after removal: {left:?}");
        drop(cmds);
        watcher.await.unwrap().unwrap();
    }
}
