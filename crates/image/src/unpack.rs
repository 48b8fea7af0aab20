//! Unpacking an image's layers into a root filesystem, confined to it.
//!
//! See the crate documentation for the design; in short: every parent
//! directory is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` relative to the root's descriptor, and the last
//! component is created with `*at()` calls that do not follow symlinks.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::layout::{HashingReader, Image, ImageError, Layer};
use crate::sys;

/// What an unpack may write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Uncompressed bytes one layer may write. File contents count, and
    /// every entry counts 512 bytes more (its tar header), so a layer of
    /// millions of empty files is bounded too.
    pub max_layer_bytes: u64,
    /// The same, for all layers together (bytes a later layer deletes still
    /// count: this bounds the work, not the final size).
    pub max_total_bytes: u64,
}

impl Default for Limits {
    /// 8 GiB per layer, 16 GiB per image.
    fn default() -> Self {
        Self {
            max_layer_bytes: 8 << 30,
            max_total_bytes: 16 << 30,
        }
    }
}

/// What one tar entry costs besides its data.
const ENTRY_CHARGE: u64 = 512;
/// How many bytes of extension headers (PAX, GNU long names) may come
/// before an entry. The tar crate reads those into memory whole.
const MAX_META_BYTES: u64 = 1 << 20;
const COPY_BUF: usize = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("destination {path} already exists")]
    Exists { path: PathBuf },
    #[error("create destination {path}: {source}")]
    Dest { path: PathBuf, source: io::Error },
    #[error("openat2(2) is not available ({source}); unpacking needs linux >= 5.6")]
    NoOpenat2 { source: io::Error },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("layer {digest}: {source}")]
    Read { digest: String, source: io::Error },
    #[error("layer {digest} is corrupt: its content has digest {actual}")]
    Digest { digest: String, actual: String },
    #[error("layer {digest} (media type {media_type:?}): the data is {found}")]
    Compression {
        digest: String,
        media_type: String,
        found: &'static str,
    },
    #[error("layer {digest}: unsupported media type {media_type:?}")]
    MediaType { digest: String, media_type: String },
    #[error("layer {digest}: entry {entry:?} refused: {reason}")]
    Refused {
        digest: String,
        entry: String,
        reason: &'static str,
    },
    #[error("layer {digest}: entry {entry:?}: {op}: {source}")]
    Entry {
        digest: String,
        entry: String,
        op: &'static str,
        source: io::Error,
    },
    #[error(
        "layer {digest} is over the limit of {limit} uncompressed bytes per layer (at entry {entry:?})"
    )]
    LayerLimit {
        digest: String,
        entry: String,
        limit: u64,
    },
    #[error(
        "image is over the limit of {limit} uncompressed bytes in total (at layer {digest}, entry {entry:?})"
    )]
    TotalLimit {
        digest: String,
        entry: String,
        limit: u64,
    },
    #[error("finish directory {path:?}: {op}: {source}")]
    Finish {
        path: String,
        op: &'static str,
        source: io::Error,
    },
}

/// Why [`fresh_dir`] failed.
pub(crate) enum FreshDirError {
    /// `dest` is there already.
    Exists,
    /// Creating `path` (`dest` or its parent) failed.
    Io { path: PathBuf, source: io::Error },
}

/// Creates `dest`, which must not exist, private (0700), and its parent if
/// missing: where an unpacker writes a tree of its own.
pub(crate) fn fresh_dir(dest: &Path) -> Result<(), FreshDirError> {
    if let Some(parent) = dest.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|source| FreshDirError::Io {
            path: parent.to_owned(),
            source,
        })?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(FreshDirError::Exists),
        Err(source) => Err(FreshDirError::Io {
            path: dest.to_owned(),
            source,
        }),
    }
}

/// Unpacks `image`'s layers, bottom first, into `dest`, which must not
/// exist: it is created (its parent too, if missing). On any error `dest`
/// is removed entirely, and nothing is ever written outside it.
pub fn unpack(image: &Image, dest: &Path, limits: &Limits) -> Result<(), UnpackError> {
    fresh_dir(dest).map_err(|e| match e {
        FreshDirError::Exists => UnpackError::Exists {
            path: dest.to_owned(),
        },
        FreshDirError::Io { path, source } => UnpackError::Dest { path, source },
    })?;
    let result = unpack_into(image, dest, limits);
    if let Err(error) = &result {
        tracing::debug!(dest = %dest.display(), %error, "unpack failed; removing the destination");
        if let Err(cleanup) = remove_dest(dest) {
            tracing::error!(
                dest = %dest.display(),
                error = %cleanup,
                "could not remove the destination of a failed unpack"
            );
        }
    }
    result
}

fn unpack_into(image: &Image, dest: &Path, limits: &Limits) -> Result<(), UnpackError> {
    let root: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dest)
        .map_err(|source| UnpackError::Dest {
            path: dest.to_owned(),
            source,
        })?
        .into();
    // Probe openat2 once, so an old kernel (or a seccomp filter that
    // denies it) gets one clear error.
    if let Err(source) = sys::open_beneath(
        root.as_fd(),
        Path::new(""),
        libc::O_PATH | libc::O_DIRECTORY,
    ) {
        return Err(match source.raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM) => UnpackError::NoOpenat2 { source },
            _ => UnpackError::Dest {
                path: dest.to_owned(),
                source,
            },
        });
    }
    let mut unpacker = Unpacker {
        root,
        limits: *limits,
        total: 0,
        is_root: sys::geteuid() == 0,
        dirs: BTreeMap::new(),
        buf: vec![0; COPY_BUF],
        owners_skipped: 0,
        xattrs_skipped: 0,
    };
    for layer in &image.layers {
        unpacker.layer(image, layer)?;
    }
    unpacker.finish()?;
    if unpacker.owners_skipped > 0 {
        tracing::warn!(
            dest = %dest.display(),
            count = unpacker.owners_skipped,
            "file owners not set (not permitted for this user); files belong to the unpacking user"
        );
    }
    if unpacker.xattrs_skipped > 0 {
        tracing::warn!(
            dest = %dest.display(),
            count = unpacker.xattrs_skipped,
            "extended attributes not set (not supported or not permitted)"
        );
    }
    Ok(())
}

/// Removes a failed unpack's destination, without following any symlink
/// in it.
fn remove_dest(dest: &Path) -> io::Result<()> {
    if sys::geteuid() != 0 {
        // A root entry may have made the top read-only for us.
        let _ = std::fs::set_permissions(dest, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    }
    let root: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dest)?
        .into();
    remove_tree(root.as_fd(), Path::new(""), sys::geteuid() == 0)?;
    drop(root);
    std::fs::remove_dir(dest)
}

/// Empties the directory `rel` beneath `root` (the directory itself stays).
/// Iterative, holding one descriptor at a time, so depth is no problem.
fn remove_tree(root: BorrowedFd<'_>, rel: &Path, is_root: bool) -> io::Result<()> {
    let mut stack = vec![rel.to_owned()];
    while let Some(dir) = stack.last().cloned() {
        let fd = sys::open_beneath(root, &dir, libc::O_PATH | libc::O_DIRECTORY)?;
        let mut descended = false;
        for name in sys::list_dir(fd.as_fd())? {
            let Some(st) = sys::lstat_at(fd.as_fd(), &name)? else {
                continue;
            };
            if !sys::is_dir(&st) {
                sys::unlinkat(fd.as_fd(), &name, false)?;
                continue;
            }
            if !is_root && st.st_mode & 0o700 != 0o700 {
                sys::fchmodat(fd.as_fd(), &name, (st.st_mode & 0o7777) | 0o700)?;
            }
            match sys::unlinkat(fd.as_fd(), &name, true) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                    stack.push(dir.join(OsStr::from_bytes(name.to_bytes())));
                    descended = true;
                }
                Err(e) => return Err(e),
            }
        }
        if !descended {
            stack.pop();
        }
    }
    Ok(())
}

/// A directory's metadata, applied after everything is unpacked: its
/// children change its mtime, and a read-only mode would stop them being
/// written (when not root).
#[derive(Clone, Copy, Debug)]
struct DirMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
}

struct Unpacker {
    /// `O_PATH` descriptor of the destination: everything resolves from it.
    root: OwnedFd,
    limits: Limits,
    total: u64,
    is_root: bool,
    /// Directories created by entries, by path beneath the root.
    dirs: BTreeMap<PathBuf, DirMeta>,
    buf: Vec<u8>,
    owners_skipped: u64,
    xattrs_skipped: u64,
}

/// One layer in progress.
struct LayerState<'a> {
    digest: &'a str,
    written: u64,
    /// The paths this layer created, with their ancestors: what an opaque
    /// directory keeps.
    paths: HashSet<PathBuf>,
}

/// The current entry, for errors.
struct Ctx<'a> {
    digest: &'a str,
    entry: &'a str,
}

impl Ctx<'_> {
    fn refused(&self, reason: &'static str) -> UnpackError {
        UnpackError::Refused {
            digest: self.digest.to_owned(),
            entry: self.entry.to_owned(),
            reason,
        }
    }

    fn err(&self, op: &'static str) -> impl FnOnce(io::Error) -> UnpackError + '_ {
        move |source| UnpackError::Entry {
            digest: self.digest.to_owned(),
            entry: self.entry.to_owned(),
            op,
            source,
        }
    }

    /// An error resolving a path beneath the root: the two that mean an
    /// attack (or a broken layer) are refusals.
    fn resolve_err(&self, op: &'static str, e: io::Error) -> UnpackError {
        match e.raw_os_error() {
            Some(libc::ELOOP) => self.refused("its path goes through a symlink"),
            Some(libc::EXDEV) => self.refused("its path escapes the root"),
            _ => self.err(op)(e),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression a layer media type declares: `Ok(None)` for a media
/// type we do not know (the data's magic bytes decide).
fn declared_compression(media_type: &str) -> Result<Option<Compression>, ()> {
    if media_type.contains("encrypted") {
        return Err(());
    }
    Ok(match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
        _ => None,
    })
}

/// Decides a layer's compression from its first bytes, checked against its
/// media type. Magic bytes win when they are gzip's or zstd's (mislabeled
/// layers exist); a compressed media type over uncompressed data is an
/// error.
fn compression(layer: &Layer, magic: &[u8]) -> Result<Compression, UnpackError> {
    let declared =
        declared_compression(&layer.media_type).map_err(|()| UnpackError::MediaType {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
        })?;
    let mismatch = |found| UnpackError::Compression {
        digest: layer.digest.clone(),
        media_type: layer.media_type.clone(),
        found,
    };
    let sniffed = match magic {
        [0x1f, 0x8b, ..] => Some(Compression::Gzip),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(Compression::Zstd),
        [b'B', b'Z', b'h', ..] => return Err(mismatch("bzip2-compressed, which is not supported")),
        [0xfd, b'7', b'z', b'X', b'Z', ..] => {
            return Err(mismatch("xz-compressed, which is not supported"));
        }
        _ => None,
    };
    match (declared, sniffed) {
        (_, Some(found)) => {
            if declared.is_some_and(|d| d != found) {
                tracing::debug!(digest = %layer.digest, media_type = %layer.media_type, ?found, "layer compression differs from its media type; using the data's");
            }
            Ok(found)
        }
        (Some(Compression::Gzip), None) => Err(mismatch("not gzip-compressed")),
        (Some(Compression::Zstd), None) => Err(mismatch("not zstd-compressed")),
        (_, None) => Ok(Compression::None),
    }
}

/// The layer's tar stream: `raw` decompressed as its first bytes (and its
/// media type) say.
pub(crate) fn decompressed<'a, R: BufRead + 'a>(
    layer: &Layer,
    mut raw: R,
) -> Result<Box<dyn Read + 'a>, UnpackError> {
    let read_err = |source| UnpackError::Read {
        digest: layer.digest.clone(),
        source,
    };
    let magic = raw.fill_buf().map_err(read_err)?;
    Ok(match compression(layer, magic)? {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(raw).map_err(read_err)?)
        }
    })
}

/// Caps how far the tar parser may read: an entry's data plus
/// [`MAX_META_BYTES`] of headers before the next entry. Without it a layer
/// could declare a PAX header of gigabytes, which the tar crate would read
/// into memory.
struct Guard<R> {
    inner: R,
    pos: u64,
    limit: Rc<Cell<u64>>,
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = self.limit.get();
        if self.pos >= limit {
            return Err(io::Error::other(format!(
                "tar extension headers (pax or long names) over {MAX_META_BYTES} bytes"
            )));
        }
        let room = usize::try_from(limit - self.pos).unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = self.inner.read(&mut buf[..want])?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// An entry's path as a relative path with no `.` or `..`; `None` is the
/// root itself (an empty path). Absolute paths and paths that climb out
/// are refused.
fn clean_path(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err("its path escapes the root (..)");
                }
            }
            p => parts.push(p),
        }
    }
    let mut path = PathBuf::new();
    for part in parts {
        path.push(OsStr::from_bytes(part));
    }
    Ok(path)
}

fn padded(size: u64) -> u64 {
    size.saturating_add(511) & !511
}

/// What the unpacker needs from an entry's header and PAX records.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    xattrs: Vec<(CString, Vec<u8>)>,
}

fn entry_meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    ctx: &Ctx<'_>,
) -> Result<EntryMeta, UnpackError> {
    let header = entry.header();
    let bad = |e| ctx.err("read header")(e);
    let mode = header.mode().map_err(bad)? & 0o7777;
    let id = |v: u64| {
        u32::try_from(v).map_err(|_| {
            ctx.err("read header")(io::Error::other(format!("owner id {v} out of range")))
        })
    };
    let uid = id(header.uid().map_err(bad)?)?;
    let gid = id(header.gid().map_err(bad)?)?;
    let mut mtime = (
        i64::try_from(header.mtime().map_err(bad)?).unwrap_or(i64::MAX),
        0u32,
    );
    let mut xattrs = Vec::new();
    if let Some(pax) = entry.pax_extensions().map_err(ctx.err("read pax header"))? {
        for ext in pax {
            let ext = ext.map_err(ctx.err("read pax header"))?;
            let key = ext.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if let Ok(name) = CString::new(name) {
                    xattrs.push((name, ext.value_bytes().to_vec()));
                }
            } else if key == b"mtime"
                && let Some(t) = ext.value().ok().and_then(parse_pax_time)
            {
                mtime = t;
            }
        }
    }
    Ok(EntryMeta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// A PAX time: decimal seconds with an optional fraction.
fn parse_pax_time(value: &str) -> Option<(i64, u32)> {
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    Some((secs, nanos))
}

impl Unpacker {
    fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    fn layer(&mut self, image: &Image, layer: &Layer) -> Result<(), UnpackError> {
        if image.digests_uncompressed() {
            return self.layer_by_diff_id(image, layer);
        }
        let digest = layer.digest.as_str();
        let read_err = |source| UnpackError::Read {
            digest: digest.to_owned(),
            source,
        };
        let mut hashed = HashingReader::new(image.layer_reader(layer)?);
        let applied = decompressed(layer, BufReader::with_capacity(COPY_BUF, &mut hashed))
            .and_then(|tar| self.apply_layer(layer, tar));
        // The tar may end before the blob does (padding, trailing zeros),
        // and a failure may stop anywhere: the digest covers the whole
        // blob, so read the rest through. A corrupt blob is reported as
        // such, whatever it made the parser say.
        let drained = io::copy(&mut hashed, &mut io::sink()).map_err(read_err);
        let (actual, _) = hashed.finish();
        if drained.is_ok() && actual != layer.digest {
            return Err(UnpackError::Digest {
                digest: layer.digest.clone(),
                actual,
            });
        }
        applied.and(drained.map(drop))
    }

    /// A legacy Docker archive's layer: its digest (the diff_id) covers
    /// the uncompressed tar, so the hash is taken after decompression.
    fn layer_by_diff_id(&mut self, image: &Image, layer: &Layer) -> Result<(), UnpackError> {
        let digest = layer.digest.as_str();
        let read_err = |source| UnpackError::Read {
            digest: digest.to_owned(),
            source,
        };
        let raw = BufReader::with_capacity(COPY_BUF, image.layer_reader(layer)?);
        let mut hashed = HashingReader::new(decompressed(layer, raw)?);
        let applied = self.apply_layer(layer, &mut hashed);
        // As above, the digest covers the whole tar stream, so read the
        // rest through; but the rest is decompressed data now, which a
        // small file can make huge: it counts against the layer limit.
        let cap = self.limits.max_layer_bytes;
        let drained = io::copy(&mut (&mut hashed).take(cap + 1), &mut io::sink()).map_err(read_err);
        if drained.as_ref().is_ok_and(|&n| n > cap) {
            return Err(UnpackError::LayerLimit {
                digest: digest.to_owned(),
                entry: "(data after the end of the tar)".to_owned(),
                limit: cap,
            });
        }
        let (actual, _) = hashed.finish();
        if drained.is_ok() && actual != layer.digest {
            return Err(image.corrupt_layer(layer, actual).into());
        }
        applied.and(drained.map(drop))
    }

    fn apply_layer<R: Read>(&mut self, layer: &Layer, tar: R) -> Result<(), UnpackError> {
        let digest = layer.digest.as_str();
        let read_err = |source| UnpackError::Read {
            digest: digest.to_owned(),
            source,
        };
        let limit = Rc::new(Cell::new(MAX_META_BYTES));
        let mut archive = tar::Archive::new(Guard {
            inner: tar,
            pos: 0,
            limit: Rc::clone(&limit),
        });
        let mut state = LayerState {
            digest,
            written: 0,
            paths: HashSet::new(),
        };
        let mut devices_skipped = Vec::new();
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            self.entry(&mut state, &mut entry, &limit, &mut devices_skipped)?;
        }
        if let Some(first) = devices_skipped.first() {
            tracing::warn!(
                layer = digest,
                count = devices_skipped.len(),
                first = %first,
                "device nodes skipped: creating them is not permitted here"
            );
        }
        Ok(())
    }

    /// Whether `bytes` more fit both limits; the new totals if so.
    fn fits(
        &self,
        state: &LayerState<'_>,
        entry: &str,
        bytes: u64,
    ) -> Result<(u64, u64), UnpackError> {
        let layer = state.written.saturating_add(bytes);
        if layer > self.limits.max_layer_bytes {
            return Err(UnpackError::LayerLimit {
                digest: state.digest.to_owned(),
                entry: entry.to_owned(),
                limit: self.limits.max_layer_bytes,
            });
        }
        let total = self.total.saturating_add(bytes);
        if total > self.limits.max_total_bytes {
            return Err(UnpackError::TotalLimit {
                digest: state.digest.to_owned(),
                entry: entry.to_owned(),
                limit: self.limits.max_total_bytes,
            });
        }
        Ok((layer, total))
    }

    /// Counts `bytes` against both limits before they are written.
    fn charge(
        &mut self,
        state: &mut LayerState<'_>,
        entry: &str,
        bytes: u64,
    ) -> Result<(), UnpackError> {
        (state.written, self.total) = self.fits(state, entry, bytes)?;
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        state: &mut LayerState<'_>,
        entry: &mut tar::Entry<'_, R>,
        guard: &Cell<u64>,
        devices_skipped: &mut Vec<String>,
    ) -> Result<(), UnpackError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let size = entry.size();
        // Refuse an oversized entry before reading (or skipping) its data.
        self.fits(state, &name, size.saturating_add(ENTRY_CHARGE))?;
        self.charge(state, &name, ENTRY_CHARGE)?;
        guard.set(
            entry
                .raw_file_position()
                .saturating_add(padded(size))
                .saturating_add(MAX_META_BYTES),
        );

        let digest = state.digest;
        let ctx = Ctx {
            digest,
            entry: &name,
        };
        let mut kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            return Ok(());
        }
        if kind == tar::EntryType::Regular && raw.ends_with(b"/") {
            // Old tars mark directories by the trailing slash only.
            kind = tar::EntryType::Directory;
        }
        let rel = clean_path(&raw).map_err(|reason| ctx.refused(reason))?;

        // Whiteouts.
        if let Some(file_name) = rel.file_name()
            && let Some(target) = file_name.as_bytes().strip_prefix(b".wh.")
        {
            let dir = rel.parent().unwrap_or(Path::new(""));
            if target == b".wh..opq" {
                return self.opaque(state, &ctx, dir);
            }
            if target.starts_with(b".wh.") {
                // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content.
                tracing::debug!(entry = %name, "ignoring aufs metadata entry");
                return Ok(());
            }
            if target.is_empty() || target == b"." || target == b".." {
                return Err(ctx.refused("invalid whiteout name"));
            }
            return self.whiteout(&ctx, &dir.join(OsStr::from_bytes(target)));
        }

        let meta = entry_meta(entry, &ctx)?;
        if rel.as_os_str().is_empty() {
            // The root itself: only a directory makes sense.
            if kind != tar::EntryType::Directory {
                return Err(ctx.refused("a non-directory entry for the root"));
            }
            self.dirs.insert(PathBuf::new(), DirMeta::from(&meta));
            return Ok(());
        }
        let file_name = rel
            .file_name()
            .expect("a non-empty clean path has a last component");
        let cname = sys::name_of(file_name).map_err(ctx.err("name"))?;
        let parent = self.parent(state, &ctx, rel.parent().unwrap_or(Path::new("")))?;
        let pfd = parent.as_fd();

        match kind {
            tar::EntryType::Directory => {
                let existing = sys::lstat_at(pfd, &cname).map_err(ctx.err("stat"))?;
                match existing {
                    Some(st) if sys::is_dir(&st) => {}
                    Some(_) => sys::unlinkat(pfd, &cname, false)
                        .map_err(ctx.err("remove the file in the way"))?,
                    None => {}
                }
                if !existing.is_some_and(|st| sys::is_dir(&st)) {
                    // Private while we fill it; the real mode comes last.
                    sys::mkdirat(pfd, &cname, 0o700).map_err(ctx.err("create directory"))?;
                }
                if !meta.xattrs.is_empty() {
                    let fd = sys::openat(pfd, &cname, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                        .map_err(ctx.err("open directory"))?;
                    self.set_xattrs(fd.as_fd(), &meta.xattrs);
                }
                self.dirs.insert(rel.clone(), DirMeta::from(&meta));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.clear(&ctx, pfd, &cname, &rel)?;
                let fd = sys::openat(
                    pfd,
                    &cname,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )
                .map_err(ctx.err("create file"))?;
                let mut file = File::from(fd);
                loop {
                    let n = entry
                        .read(&mut self.buf)
                        .map_err(|source| UnpackError::Read {
                            digest: digest.to_owned(),
                            source,
                        })?;
                    if n == 0 {
                        break;
                    }
                    self.charge(state, &name, n as u64)?;
                    file.write_all(&self.buf[..n]).map_err(ctx.err("write"))?;
                }
                let fd = file.as_fd();
                let owned = self.tolerate_owner(sys::fchown(fd, meta.uid, meta.gid));
                owned.map_err(ctx.err("set owner"))?;
                // After the owner: chown clears setuid/setgid bits.
                sys::fchmod(fd, meta.mode).map_err(ctx.err("set mode"))?;
                self.set_xattrs(fd, &meta.xattrs);
                sys::futimens(fd, meta.mtime.0, meta.mtime.1).map_err(ctx.err("set times"))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.refused("a symlink without a target"))?;
                let target = sys::cstr(&target).map_err(ctx.err("symlink target"))?;
                self.clear(&ctx, pfd, &cname, &rel)?;
                // The target may say anything: it is stored, never followed
                // by us.
                sys::symlinkat(&target, pfd, &cname).map_err(ctx.err("create symlink"))?;
                let owned = self.tolerate_owner(sys::lchown_at(pfd, &cname, meta.uid, meta.gid));
                owned.map_err(ctx.err("set owner"))?;
                sys::utimes_at(pfd, &cname, meta.mtime.0, meta.mtime.1)
                    .map_err(ctx.err("set times"))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.refused("a hard link without a target"))?;
                self.hard_link(&ctx, pfd, &cname, &rel, &target)?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let node = match kind {
                    tar::EntryType::Char => libc::S_IFCHR,
                    tar::EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                self.clear(&ctx, pfd, &cname, &rel)?;
                match sys::mknodat(pfd, &cname, node, 0o600, major, minor) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                        tracing::debug!(entry = %name, "device node not permitted; skipped");
                        devices_skipped.push(name.clone());
                        return Ok(());
                    }
                    Err(e) => return Err(ctx.err("create device node")(e)),
                }
                let owned = self.tolerate_owner(sys::lchown_at(pfd, &cname, meta.uid, meta.gid));
                owned.map_err(ctx.err("set owner"))?;
                // We just created it: not a symlink, so following is moot.
                sys::fchmodat(pfd, &cname, meta.mode).map_err(ctx.err("set mode"))?;
                sys::utimes_at(pfd, &cname, meta.mtime.0, meta.mtime.1)
                    .map_err(ctx.err("set times"))?;
            }
            other => {
                tracing::warn!(layer = digest, entry = %name, kind = ?other, "skipping tar entry of unsupported type");
                return Ok(());
            }
        }
        self.created(state, rel);
        Ok(())
    }

    /// Records a path (and its ancestors) as this layer's.
    fn created(&self, state: &mut LayerState<'_>, rel: PathBuf) {
        let mut path = rel;
        loop {
            if !state.paths.insert(path.clone()) {
                break;
            }
            match path.parent() {
                Some(parent) => path = parent.to_owned(),
                None => break,
            }
        }
    }

    /// Opens the directory `dir` beneath the root, creating missing
    /// directories (mode 0755, like other runtimes) on the way.
    fn parent(
        &self,
        state: &mut LayerState<'_>,
        ctx: &Ctx<'_>,
        dir: &Path,
    ) -> Result<OwnedFd, UnpackError> {
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        match sys::open_beneath(self.root(), dir, flags) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(ctx.resolve_err("open parent directory", e)),
        }
        // Walk down one component at a time, creating what is missing.
        let mut fd = sys::open_beneath(self.root(), Path::new(""), flags)
            .map_err(|e| ctx.resolve_err("open root", e))?;
        let mut so_far = PathBuf::new();
        for part in dir.components() {
            let part = part.as_os_str();
            so_far.push(part);
            let next = match sys::open_beneath(fd.as_fd(), Path::new(part), flags) {
                Ok(next) => next,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let cname = sys::name_of(part).map_err(ctx.err("name"))?;
                    match sys::mkdirat(fd.as_fd(), &cname, 0o755) {
                        Ok(()) => self.created(state, so_far.clone()),
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => return Err(ctx.err("create parent directory")(e)),
                    }
                    sys::open_beneath(fd.as_fd(), Path::new(part), flags)
                        .map_err(|e| ctx.resolve_err("open parent directory", e))?
                }
                Err(e) => return Err(ctx.resolve_err("open parent directory", e)),
            };
            fd = next;
        }
        Ok(fd)
    }

    /// Makes room for a new non-directory at `name`: removes what is there
    /// (a whole directory tree too).
    fn clear(
        &mut self,
        ctx: &Ctx<'_>,
        pfd: BorrowedFd<'_>,
        name: &CString,
        rel: &Path,
    ) -> Result<(), UnpackError> {
        match sys::lstat_at(pfd, name).map_err(ctx.err("stat"))? {
            None => Ok(()),
            Some(st) if sys::is_dir(&st) => self.remove(ctx, pfd, name, rel, true),
            Some(_) => {
                sys::unlinkat(pfd, name, false).map_err(ctx.err("remove the file in the way"))
            }
        }
    }

    /// Removes `name` in `pfd` (at `rel` beneath the root).
    fn remove(
        &mut self,
        ctx: &Ctx<'_>,
        pfd: BorrowedFd<'_>,
        name: &CString,
        rel: &Path,
        is_dir: bool,
    ) -> Result<(), UnpackError> {
        if is_dir {
            remove_tree(self.root(), rel, self.is_root)
                .map_err(|e| ctx.resolve_err("remove directory", e))?;
            sys::unlinkat(pfd, name, true).map_err(ctx.err("remove directory"))?;
            // Its directories' pending metadata goes with it.
            let doomed: Vec<PathBuf> = self
                .dirs
                .range(rel.to_owned()..)
                .take_while(|(k, _)| k.starts_with(rel))
                .map(|(k, _)| k.clone())
                .collect();
            for k in doomed {
                self.dirs.remove(&k);
            }
            Ok(())
        } else {
            sys::unlinkat(pfd, name, false).map_err(ctx.err("remove"))
        }
    }

    /// `.wh.NAME`: NAME (from a lower layer) is deleted.
    fn whiteout(&mut self, ctx: &Ctx<'_>, rel: &Path) -> Result<(), UnpackError> {
        let dir = rel.parent().unwrap_or(Path::new(""));
        let pfd = match sys::open_beneath(self.root(), dir, libc::O_PATH | libc::O_DIRECTORY) {
            Ok(fd) => fd,
            // Nothing there to hide.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                return Ok(());
            }
            Err(e) => return Err(ctx.resolve_err("open whiteout directory", e)),
        };
        let name = sys::name_of(rel.file_name().unwrap_or_default()).map_err(ctx.err("name"))?;
        match sys::lstat_at(pfd.as_fd(), &name).map_err(ctx.err("stat"))? {
            None => Ok(()),
            Some(st) => self.remove(ctx, pfd.as_fd(), &name, rel, sys::is_dir(&st)),
        }
    }

    /// `DIR/.wh..wh..opq`: DIR keeps only what this layer put in it.
    fn opaque(
        &mut self,
        state: &mut LayerState<'_>,
        ctx: &Ctx<'_>,
        dir: &Path,
    ) -> Result<(), UnpackError> {
        // The marker implies its directory.
        let fd = self.parent(state, ctx, dir)?;
        drop(fd);
        self.created(state, dir.to_owned());
        let mut stack = vec![dir.to_owned()];
        while let Some(current) = stack.pop() {
            let fd = sys::open_beneath(self.root(), &current, libc::O_PATH | libc::O_DIRECTORY)
                .map_err(|e| ctx.resolve_err("open opaque directory", e))?;
            for name in sys::list_dir(fd.as_fd()).map_err(ctx.err("list opaque directory"))? {
                let child = current.join(OsStr::from_bytes(name.to_bytes()));
                let Some(st) = sys::lstat_at(fd.as_fd(), &name).map_err(ctx.err("stat"))? else {
                    continue;
                };
                if state.paths.contains(&child) {
                    if sys::is_dir(&st) {
                        stack.push(child);
                    }
                } else {
                    self.remove(ctx, fd.as_fd(), &name, &child, sys::is_dir(&st))?;
                }
            }
        }
        Ok(())
    }

    /// A hard link to a path already unpacked, resolved beneath the root
    /// with no symlink on the way.
    fn hard_link(
        &mut self,
        ctx: &Ctx<'_>,
        pfd: BorrowedFd<'_>,
        cname: &CString,
        rel: &Path,
        target: &[u8],
    ) -> Result<(), UnpackError> {
        let target = clean_path(target).map_err(|reason| {
            ctx.refused(match reason {
                "absolute path" => "hard link target is an absolute path",
                _ => "hard link target escapes the root",
            })
        })?;
        let Some(target_name) = target.file_name() else {
            return Err(ctx.refused("hard link to the root"));
        };
        if target == rel {
            return Ok(());
        }
        let tdir = target.parent().unwrap_or(Path::new(""));
        let tfd = sys::open_beneath(self.root(), tdir, libc::O_PATH | libc::O_DIRECTORY).map_err(
            |e| match e.raw_os_error() {
                Some(libc::ELOOP) => ctx.refused("hard link target goes through a symlink"),
                Some(libc::EXDEV) => ctx.refused("hard link target escapes the root"),
                _ => ctx.err("open hard link target directory")(e),
            },
        )?;
        let tname = sys::name_of(target_name).map_err(ctx.err("name"))?;
        match sys::lstat_at(tfd.as_fd(), &tname).map_err(ctx.err("stat hard link target"))? {
            None => {
                return Err(ctx.err("hard link target")(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} does not exist", target.display()),
                )));
            }
            Some(st) if sys::is_dir(&st) => return Err(ctx.refused("hard link to a directory")),
            Some(_) => {}
        }
        self.clear(ctx, pfd, cname, rel)?;
        sys::linkat(tfd.as_fd(), &tname, pfd, cname).map_err(ctx.err("create hard link"))
    }

    /// Owners cannot always be set: unprivileged (EPERM), or an id outside
    /// this user namespace (EINVAL). Files then stay ours; counted, warned
    /// once.
    fn tolerate_owner(&mut self, result: io::Result<()>) -> io::Result<()> {
        match result {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.owners_skipped += 1;
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && !self.is_root => {
                self.owners_skipped += 1;
                Ok(())
            }
            other => other,
        }
    }

    /// Best effort: the filesystem may not support them, or the user may
    /// not set `trusted.*`/`security.*` ones.
    fn set_xattrs(&mut self, fd: BorrowedFd<'_>, xattrs: &[(CString, Vec<u8>)]) {
        for (name, value) in xattrs {
            if let Err(error) = sys::fsetxattr(fd, name, value) {
                tracing::debug!(name = ?name, %error, "xattr not set");
                self.xattrs_skipped += 1;
            }
        }
    }

    /// Applies directory owners, modes and times, deepest first (so a
    /// read-only directory is closed only after its children are done).
    fn finish(&mut self) -> Result<(), UnpackError> {
        if !self.dirs.contains_key(Path::new("")) {
            let fd = sys::open_beneath(
                self.root(),
                Path::new(""),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )
            .map_err(|source| UnpackError::Finish {
                path: "/".to_owned(),
                op: "open",
                source,
            })?;
            sys::fchmod(fd.as_fd(), 0o755).map_err(|source| UnpackError::Finish {
                path: "/".to_owned(),
                op: "set mode",
                source,
            })?;
        }
        let mut dirs: Vec<(PathBuf, DirMeta)> =
            std::mem::take(&mut self.dirs).into_iter().collect();
        dirs.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
        for (path, meta) in dirs {
            let shown = format!("/{}", path.display());
            let err = |op| {
                let shown = shown.clone();
                move |source| UnpackError::Finish {
                    path: shown,
                    op,
                    source,
                }
            };
            let fd = match sys::open_beneath(self.root(), &path, libc::O_RDONLY | libc::O_DIRECTORY)
            {
                Ok(fd) => fd,
                // Replaced by a later layer with something else.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(err("open")(e)),
            };
            let owned = self.tolerate_owner(sys::fchown(fd.as_fd(), meta.uid, meta.gid));
            owned.map_err(err("set owner"))?;
            sys::fchmod(fd.as_fd(), meta.mode).map_err(err("set mode"))?;
            sys::futimens(fd.as_fd(), meta.mtime.0, meta.mtime.1).map_err(err("set times"))?;
        }
        Ok(())
    }
}

impl From<&EntryMeta> for DirMeta {
    fn from(meta: &EntryMeta) -> Self {
        DirMeta {
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path(b"./a//b/./c").unwrap(), PathBuf::from("a/b/c"));
        assert_eq!(clean_path(b"a/../b").unwrap(), PathBuf::from("b"));
        assert_eq!(clean_path(b"./").unwrap(), PathBuf::new());
        assert!(clean_path(b"../x").is_err());
        assert!(clean_path(b"a/../../x").is_err());
        assert!(clean_path(b"/etc/x").is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("12"), Some((12, 0)));
        assert_eq!(parse_pax_time("12.5"), Some((12, 500_000_000)));
        assert_eq!(parse_pax_time("12.000000001"), Some((12, 1)));
        assert_eq!(parse_pax_time("x"), None);
    }

    #[test]
    fn media_types() {
        let layer = |mt: &str| Layer {
            digest: "sha256:00".into(),
            media_type: mt.into(),
            size: 0,
        };
        let gz = [0x1f, 0x8b, 8, 0];
        let zst = [0x28, 0xb5, 0x2f, 0xfd];
        let tar = *b"etc/";
        let oci = "application/vnd.oci.image.layer.v1.tar";
        assert_eq!(compression(&layer(oci), &tar).unwrap(), Compression::None);
        assert_eq!(compression(&layer(oci), &gz).unwrap(), Compression::Gzip);
        assert_eq!(
            compression(
                &layer("application/vnd.docker.image.rootfs.diff.tar.gzip"),
                &gz
            )
            .unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            compression(&layer("whatever"), &zst).unwrap(),
            Compression::Zstd
        );
        assert!(compression(&layer("application/vnd.oci.image.layer.v1.tar+gzip"), &tar).is_err());
        assert!(
            compression(
                &layer("application/vnd.oci.image.layer.v1.tar+gzip+encrypted"),
                &gz
            )
            .is_err()
        );
    }
}
