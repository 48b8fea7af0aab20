//! Atomic file replacement.
//!
//! [`write_atomic`] leaves either the old file or the new one at the path,
//! whole, across a crash or power loss: the data goes to a temporary file
//! beside the target (same directory, so same filesystem), which is
//! fsynced, renamed over the target, and the directory is fsynced so the
//! rename itself is durable. The temporary's name is unique per process and
//! call, so concurrent writers never share one, and it is removed when any
//! step fails.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError {
    #[error("cannot write {} atomically: it names no file", path.display())]
    NoFileName { path: PathBuf },
    #[error("cannot write {} atomically: {op} {}: {source}", path.display(), step_path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        step_path: PathBuf,
        source: std::io::Error,
    },
}

impl From<AtomicWriteError> for std::io::Error {
    /// For callers that return `io::Result`: the kind of the OS error, the
    /// whole message.
    fn from(e: AtomicWriteError) -> std::io::Error {
        let kind = match &e {
            AtomicWriteError::NoFileName { .. } => std::io::ErrorKind::InvalidInput,
            AtomicWriteError::Io { source, .. } => source.kind(),
        };
        std::io::Error::new(kind, e)
    }
}

/// Replaces `path` with `bytes` atomically and durably; a new file gets
/// mode 0644 (less the umask).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AtomicWriteError> {
    write_atomic_with_mode(path, bytes, 0o644)
}

/// [`write_atomic`] with the mode of the new file (e.g. 0600 for keys),
/// less the umask.
pub fn write_atomic_with_mode(
    path: &Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), AtomicWriteError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(name) = path.file_name() else {
        return Err(AtomicWriteError::NoFileName {
            path: path.to_path_buf(),
        });
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let fail = |op: &'static str, at: &Path| {
        let path = path.to_path_buf();
        let step_path = at.to_path_buf();
        move |source| AtomicWriteError::Io {
            path,
            op,
            step_path,
            source,
        }
    };

    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(fail("create", &tmp))?;
    let written = file
        .write_all(bytes)
        .map_err(fail("write", &tmp))
        .and_then(|()| file.sync_all().map_err(fail("fsync", &tmp)))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(fail("rename to", path)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is in the directory: without this it may be lost in a
    // crash even though the file's data is on disk.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn the_mode_is_that_of_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomic_with_mode(&path, b"secret", 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn failures_name_the_target_and_the_step_and_leave_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory in the way: the rename fails, the temporary goes.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        let e = write_atomic(&path, b"new").unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot write {} atomically: rename to",
                path.display()
            )),
            "{text}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(std::fs::read(path.join("inside")).unwrap(), b"x");

        let missing = dir.path().join("no/such/dir/file");
        let e = write_atomic(&missing, b"x").unwrap_err();
        assert!(e.to_string().contains("create"), "{e}");
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);

        assert!(matches!(
            write_atomic(Path::new("/"), b"x"),
            Err(AtomicWriteError::NoFileName { .. })
        ));
    }
}
