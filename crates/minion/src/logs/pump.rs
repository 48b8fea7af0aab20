//! Moving a service's output from its FIFO into its log file, and rotating
//! that file by rename.
//!
//! `LiveLog` is the synchronous part (it is what the unit tests drive); a
//! `Pump` is the tokio task that waits for the FIFO to become readable and
//! has a blocking thread drain it, so a disk that stalls writes (dirty-page
//! throttling, a slow device) never stalls the minion's single runtime
//! thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::pipe::SpliceFlags;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::LogFiles;

/// Bytes one drain moves at most before the task yields, so one flooding
/// service cannot hold a blocking thread indefinitely.
const DRAIN_BUDGET: u64 = 4 << 20;

/// The most one `splice` or `read` moves: the pipe's capacity.
pub(super) const PIPE_BYTES: usize = 1 << 20;

/// How often a failing log (a full disk, say) is reported.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The live log file of one service, which the minion alone writes.
pub(super) struct LiveLog {
    files: LogFiles,
    name: String,
    file: File,
    /// The file's length: where the next byte goes.
    len: u64,
    /// Cleared when the file system refuses `splice` into a file; then
    /// `read` and `write` are used, through `buf`.
    splice: bool,
    buf: Vec<u8>,
}

/// What one drain did.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Drained {
    pub moved: u64,
    /// The pipe was found empty (rather than the budget running out).
    pub empty: bool,
}

impl LiveLog {
    /// Opens (or creates) the live file and continues at its end.
    pub fn open(files: &LogFiles, name: &str) -> io::Result<LiveLog> {
        // Not O_APPEND: `splice` refuses append-mode targets, and the
        // minion is the only writer, so it keeps the offset itself.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(files.path(name))?;
        let len = file.metadata()?.len();
        Ok(LiveLog {
            files: files.clone(),
            name: name.to_owned(),
            file,
            len,
            splice: true,
            buf: Vec::new(),
        })
    }

    /// The most the live file may hold.
    fn limit(&self) -> u64 {
        self.files.max_bytes.max(1)
    }

    /// Moves what `pipe` (non-blocking) holds into the log, rotating
    /// whenever the live file reaches the limit, until the pipe is empty or
    /// `budget` bytes have moved. No file ever exceeds the limit.
    pub fn drain(&mut self, pipe: BorrowedFd<'_>, budget: u64) -> io::Result<Drained> {
        let mut moved = 0;
        while moved < budget {
            if self.len >= self.limit() {
                self.rotate()?;
            }
            let room = (self.limit() - self.len).min(PIPE_BYTES as u64) as usize;
            match self.move_once(pipe, room) {
                // With its own read-write end open, the pipe never reaches
                // end of file; treat it as empty all the same.
                Ok(0) => return Ok(Drained { moved, empty: true }),
                Ok(n) => {
                    self.len += n as u64;
                    moved += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Drained { moved, empty: true });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Drained {
            moved,
            empty: false,
        })
    }

    /// Moves at most `room` bytes from the pipe to the end of the file.
    fn move_once(&mut self, pipe: BorrowedFd<'_>, room: usize) -> io::Result<usize> {
        if self.splice {
            let mut at = self.len;
            match rustix::pipe::splice(
                pipe,
                None,
                &self.file,
                Some(&mut at),
                room,
                SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
            ) {
                Ok(n) => return Ok(n),
                // The file system cannot take spliced pages.
                Err(Errno::INVAL) => self.splice = false,
                Err(e) => return Err(e.into()),
            }
        }
        self.buf.resize(room, 0);
        let n = rustix::io::read(pipe, &mut self.buf[..room])?;
        self.file.write_all_at(&self.buf[..n], self.len)?;
        Ok(n)
    }

    /// Renames the live file to `.1` (older ones shift up, the oldest goes)
    /// and starts a new one. The service is not involved: it writes the
    /// FIFO, never the file.
    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.files.keep;
        if keep == 0 {
            self.file.set_len(0)?;
            self.len = 0;
            return Ok(());
        }
        for n in (1..keep).rev() {
            match std::fs::rename(
                self.files.rotated(&self.name, n),
                self.files.rotated(&self.name, n + 1),
            ) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let live = self.files.path(&self.name);
        std::fs::rename(&live, self.files.rotated(&self.name, 1))?;
        self.file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&live)?;
        self.len = 0;
        Ok(())
    }

    /// Throws away what the pipe holds now (the log cannot take it), so the
    /// service is not blocked by a full disk.
    fn discard(&mut self, pipe: BorrowedFd<'_>) -> u64 {
        self.buf.resize(PIPE_BYTES, 0);
        let mut dropped = 0;
        while let Ok(n @ 1..) = rustix::io::read(pipe, &mut self.buf[..]) {
            dropped += n as u64;
        }
        dropped
    }
}

/// Opens the minion's end of a service's FIFO: read-write (so the minion is
/// a writer too, and the pipe never reports end of file or hang-up when the
/// service exits) and non-blocking.
pub(super) fn open_minion_end(files: &LogFiles, name: &str) -> io::Result<OwnedFd> {
    let path = files.fifo_path(name);
    let fd = rustix::fs::open(
        &path,
        OFlags::RDWR | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    if kind != FileType::Fifo {
        return Err(io::Error::other(format!(
            "{} is not a FIFO (a service started by an earlier minion writes its log file directly; it is rotated once it restarts)",
            path.display()
        )));
    }
    super::raise_pipe_size(fd.as_fd(), name);
    Ok(fd)
}

/// A running pump: one per service whose output the minion is collecting.
pub(super) struct Pump {
    control: Arc<Control>,
    task: JoinHandle<()>,
}

/// What the watcher asks of a pump. One small block per service: a tokio
/// channel here (its cache-padded state and first block of slots) cost
/// about 800 bytes a service, most of a 1000-service minion's log memory.
#[derive(Default)]
struct Control {
    /// Wakes the pump for a stop or a flush (a wake-up that finds the pump
    /// busy is kept for its next wait, so none is lost).
    wake: Notify,
    stop: AtomicBool,
    /// Flushes asked for: each is answered once what the pipe held is in
    /// the log. `None` once the pump has ended: a flush is answered at once.
    flushes: Mutex<Option<Vec<oneshot::Sender<()>>>>,
}

impl Control {
    fn flushes(&self) -> std::sync::MutexGuard<'_, Option<Vec<oneshot::Sender<()>>>> {
        self.flushes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_flushes(&self) -> Vec<oneshot::Sender<()>> {
        self.flushes()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// Ends the pump's side of [`Control`]: flushes waiting now, and any asked
/// for later, are answered (their senders dropped) at once.
struct Ended(Arc<Control>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.flushes().take();
    }
}

impl Pump {
    /// Starts moving `name`'s output into its log; `wrote` hears the name
    /// after every drain that moved bytes (the followers' cue).
    pub fn start(
        files: &LogFiles,
        name: &str,
        fifo: Option<OwnedFd>,
        wrote: mpsc::UnboundedSender<String>,
    ) -> io::Result<Pump> {
        let fifo = match fifo {
            Some(fd) => fd,
            None => open_minion_end(files, name)?,
        };
        let log = LiveLog::open(files, name)?;
        // SAFETY: the `AsyncFd` owns an `Arc` of the `OwnedFd`, so the
        // descriptor stays open, and the same, for as long as it is
        // registered; the clones the drains borrow never close it.
        let fifo = unsafe { AsyncFd::register_with_interest(Arc::new(fifo), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let control = Arc::new(Control {
            flushes: Mutex::new(Some(Vec::new())),
            ..Control::default()
        });
        let task = tokio::spawn(pump(fifo, log, control.clone(), wrote));
        Ok(Pump { control, task })
    }

    /// Answers `done` once everything the service wrote before this call is
    /// in its log (or the pump is gone): a tail read afterwards sees a
    /// service's last words even when it exited a moment ago.
    pub fn flush(&self, done: oneshot::Sender<()>) {
        match self.control.flushes().as_mut() {
            Some(waiting) => waiting.push(done),
            None => {
                let _ = done.send(());
                return;
            }
        }
        self.control.wake.notify_one();
    }

    /// Stops the pump once its drain in flight, if any, is done: afterwards
    /// nothing writes or renames the service's files.
    pub async fn stop(self) {
        self.control.stop.store(true, Ordering::Release);
        self.control.wake.notify_one();
        let _ = self.task.await;
    }
}

async fn pump(
    fifo: AsyncFd<Arc<OwnedFd>>,
    mut log: LiveLog,
    control: Arc<Control>,
    wrote: mpsc::UnboundedSender<String>,
) {
    let _ended = Ended(control.clone());
    let mut warned: Option<Instant> = None;
    loop {
        // Either the pipe has data, or someone wants it in the log now (or
        // the pump to stop).
        let ready = tokio::select! {
            r = fifo.readable() => match r {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(service = %log.name, "log pipe failed: {e}");
                    return;
                }
            },
            () = control.wake.notified() => None,
        };
        if control.stop.load(Ordering::Acquire) {
            return;
        }
        // Every flush asked for before this drain is answered after it.
        let flushed = control.take_flushes();
        let pipe = fifo.get_ref().clone();
        let drained = tokio::task::spawn_blocking(move || {
            let result = log.drain(pipe.as_fd(), DRAIN_BUDGET);
            let result = result.map_err(|e| (e, log.discard(pipe.as_fd())));
            (log, result)
        })
        .await;
        // The blocking pool is gone: the runtime is shutting down.
        let Ok((back, result)) = drained else { return };
        log = back;
        let drained = match result {
            Ok(d) => d,
            Err((e, dropped)) => {
                if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    warned = Some(Instant::now());
                    tracing::warn!(service = %log.name, dropped, "cannot write the log: {e}; output is dropped");
                }
                Drained {
                    moved: 0,
                    empty: true,
                }
            }
        };
        if drained.moved > 0 {
            let _ = wrote.send(log.name.clone());
        }
        if drained.empty
            && let Some(mut ready) = ready
        {
            // Only clears readiness that no newer event has set since.
            ready.clear_ready();
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    fn files(dir: &Path) -> LogFiles {
        LogFiles {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
            keep: 1,
        }
    }

    #[tokio::test]
    async fn flushes_are_answered_once_the_pipe_is_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let mut service = files.open_output("web").unwrap();
        let (wrote, _heard) = mpsc::unbounded_channel();
        let pump = Pump::start(&files, "web", None, wrote).unwrap();
        for round in 0..20 {
            writeln!(service, "line {round}").unwrap();
            // Several at once, all answered after the data is in.
            let waits: Vec<_> = (0..3)
                .map(|_| {
                    let (done, wait) = oneshot::channel();
                    pump.flush(done);
                    wait
                })
                .collect();
            for w in waits {
                w.await.unwrap();
            }
            let log = std::fs::read_to_string(files.path("web")).unwrap();
            assert_eq!(log.lines().count(), round + 1, "{log}");
        }
        // A stopped pump answers at once (no flush waits on a dead pump).
        let control = pump.control.clone();
        pump.stop().await;
        assert!(control.flushes().is_none());
        let stopped = Pump {
            control,
            task: tokio::spawn(async {}),
        };
        let (done, wait) = oneshot::channel();
        stopped.flush(done);
        assert_eq!(wait.await, Ok(()));
    }
}
