//! The registry: a folder of images in the master's data dir (seed 000).
//!
//! An image is a file, named by its file name. Every file is split into
//! content-defined chunks, stored once in `DATA_DIR/chunks` across all images
//! and versions; its index (the ordered chunk list and the whole file's
//! BLAKE3 hash) is kept in `DATA_DIR/indexes/<hash>.json`. The catalog, name
//! → index, is what minions pre-cache; it is rebuilt at start and kept
//! current by filesystem events ([`crate::watch`]), so a file is read once
//! per version, whether it came by `phoenix push` or by hand.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use phoenix_chunks::Index;
use phoenix_model::proto::CatalogEntry;
use phoenix_model::spec::check_image_name;

use crate::lock;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "image {name:?} is not in the registry ({dir}); add it with `phoenix push FILE {name}`"
    )]
    Missing { name: String, dir: String },
    #[error("image name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("registry file {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("registry chunk store: {0}")]
    Chunks(String),
    #[error(
        "image {name:?} in the registry changed since the service was deployed; run `phoenix update` to use the new one"
    )]
    Changed { name: String },
}

/// What a minion needs to fetch and verify an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub hash: String,
    pub size: u64,
}

/// The catalog on disk (`indexes/catalog.json`): the files as last
/// indexed, and the version each name had before.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedCatalog {
    files: BTreeMap<String, SavedEntry>,
    #[serde(default)]
    previous: BTreeMap<String, String>,
}

/// A catalog entry on disk.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedEntry {
    size: u64,
    mtime_s: u64,
    mtime_ns: u32,
    hash: String,
}

/// A registry file as last indexed.
#[derive(Clone, Debug)]
pub struct Entry {
    pub size: u64,
    pub mtime: SystemTime,
    pub index: Arc<Index>,
}

/// What a garbage collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub indexes: u64,
    pub chunks: u64,
    pub bytes: u64,
}

pub struct Registry {
    dir: PathBuf,
    /// Every image's chunks, stored once (`DATA_DIR/chunks`), and the
    /// indexes (`DATA_DIR/indexes/<file hash>.json`) minions fetch by.
    chunks: phoenix_chunks::ChunkStore,
    indexes_dir: PathBuf,
    /// One chunking or collection at a time: two indexings of one file must
    /// not race on its index file, and a collection must not delete the
    /// chunks of an index that is being written.
    indexing: Mutex<()>,
    /// name → the file as last indexed.
    catalog: Mutex<BTreeMap<String, Entry>>,
    /// name → the version it replaced: kept (with its chunks) so that
    /// minions holding it can receive the new version as deltas against it.
    previous: Mutex<HashMap<String, Arc<Index>>>,
    /// Bumped whenever the catalog changes.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    pub fn open(dir: PathBuf) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(&dir).map_err(|source| RegistryError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let data = dir
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| dir.clone());
        let indexes_dir = data.join("indexes");
        std::fs::create_dir_all(&indexes_dir).map_err(Self::io(&indexes_dir))?;
        let chunks = phoenix_chunks::ChunkStore::open(data.join("chunks"))
            .map_err(|e| RegistryError::Chunks(e.to_string()))?;
        let reg = Registry {
            chunks,
            indexes_dir,
            indexing: Mutex::new(()),
            dir,
            catalog: Mutex::new(BTreeMap::new()),
            previous: Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
        };
        reg.load_catalog();
        Ok(reg)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> Result<PathBuf, RegistryError> {
        check_image_name(name).map_err(|reason| RegistryError::BadName {
            name: name.to_owned(),
            reason,
        })?;
        Ok(self.dir.join(name))
    }

    fn io(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
        move |source| RegistryError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    fn missing(&self, name: &str) -> RegistryError {
        RegistryError::Missing {
            name: name.to_owned(),
            dir: self.dir.display().to_string(),
        }
    }

    /// Size and mtime of registry file `name`; `None` if there is no such
    /// regular file.
    fn stat(&self, name: &str) -> Result<Option<(u64, SystemTime)>, RegistryError> {
        let path = self.path(name)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some((m.len(), m.modified().map_err(Self::io(&path))?))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io(&path)(e)),
        }
    }

    fn cached(&self, name: &str, stat: (u64, SystemTime)) -> Option<ImageRef> {
        lock(&self.catalog)
            .get(name)
            .filter(|e| (e.size, e.mtime) == stat)
            .map(|e| ImageRef {
                hash: e.index.file_hash.clone(),
                size: e.size,
            })
    }

    /// Remembers which file (size, mtime) had which hash, so a restarted
    /// master reads no file that has not changed.
    fn save_catalog(&self, cat: &BTreeMap<String, Entry>) {
        let files: BTreeMap<String, SavedEntry> = cat
            .iter()
            .map(|(name, e)| {
                let t = e
                    .mtime
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                let saved = SavedEntry {
                    size: e.size,
                    mtime_s: t.as_secs(),
                    mtime_ns: t.subsec_nanos(),
                    hash: e.index.file_hash.clone(),
                };
                (name.clone(), saved)
            })
            .collect();
        let previous = lock(&self.previous)
            .iter()
            .map(|(name, i)| (name.clone(), i.file_hash.clone()))
            .collect();
        let saved = SavedCatalog { files, previous };
        let path = self.indexes_dir.join("catalog.json");
        let text = serde_json::to_vec(&saved).unwrap_or_default();
        if let Err(e) = phoenix_host::fs::write_atomic(&path, &text) {
            tracing::warn!("cannot save the registry catalog: {e}");
        }
    }

    /// The catalog as the last run left it (entries whose index is gone are
    /// skipped; `scan` checks the rest against the files).
    fn load_catalog(&self) {
        let Ok(text) = std::fs::read(self.indexes_dir.join("catalog.json")) else {
            return;
        };
        let Ok(saved) = serde_json::from_slice::<SavedCatalog>(&text) else {
            return;
        };
        let mut previous = lock(&self.previous);
        for (name, hash) in saved.previous {
            if let Some(index) = self.load_index(&hash) {
                previous.insert(name, Arc::new(index));
            }
        }
        drop(previous);
        let mut cat = lock(&self.catalog);
        for (name, e) in saved.files {
            if let Some(index) = self.load_index(&e.hash) {
                let mtime =
                    SystemTime::UNIX_EPOCH + std::time::Duration::new(e.mtime_s, e.mtime_ns);
                let entry = Entry {
                    size: e.size,
                    mtime,
                    index: Arc::new(index),
                };
                cat.insert(name, entry);
            }
        }
    }

    /// Subscribes to catalog changes.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn set_entry(&self, name: &str, entry: Option<Entry>) {
        let mut cat = lock(&self.catalog);
        let changed = match entry {
            Some(e) => {
                let old = cat.insert(name.to_owned(), e.clone());
                let same = old
                    .as_ref()
                    .is_some_and(|old| old.index.file_hash == e.index.file_hash);
                if let Some(old) = old.filter(|_| !same) {
                    lock(&self.previous).insert(name.to_owned(), old.index);
                }
                !same
            }
            None => {
                lock(&self.previous).remove(name);
                cat.remove(name).is_some()
            }
        };
        self.save_catalog(&cat);
        drop(cat);
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// The hash and size of an image, indexing it first if it is new or
    /// changed (blocking).
    pub fn resolve(&self, name: &str) -> Result<ImageRef, RegistryError> {
        if let Some(stat) = self.stat(name)?
            && let Some(r) = self.cached(name, stat)
        {
            return Ok(r);
        }
        self.refresh(name)?.ok_or_else(|| self.missing(name))
    }

    /// Brings the catalog entry of `name` up to date with the file: indexes
    /// a new or changed file, drops a removed one (blocking).
    pub fn refresh(&self, name: &str) -> Result<Option<ImageRef>, RegistryError> {
        let path = self.path(name)?;
        let _one_at_a_time = lock(&self.indexing);
        // A file still being written by hand changes under us; index it
        // again (its close brings another event anyway).
        for _ in 0..3 {
            let Some(before) = self.stat(name)? else {
                self.set_entry(name, None);
                return Ok(None);
            };
            if let Some(r) = self.cached(name, before) {
                return Ok(Some(r));
            }
            let index = match self.chunks.import_file(&path) {
                Ok(i) => i,
                Err(phoenix_chunks::Error::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    continue;
                }
                Err(e) => return Err(RegistryError::Chunks(e.to_string())),
            };
            if self.stat(name)? != Some(before) {
                continue;
            }
            self.save_index(&index)?;
            let r = ImageRef {
                hash: index.file_hash.clone(),
                size: before.0,
            };
            self.set_entry(
                name,
                Some(Entry {
                    size: before.0,
                    mtime: before.1,
                    index: Arc::new(index),
                }),
            );
            return Ok(Some(r));
        }
        Err(RegistryError::Io {
            path: path.display().to_string(),
            source: io::Error::other("the file keeps changing while it is read"),
        })
    }

    fn save_index(&self, index: &Index) -> Result<(), RegistryError> {
        let saved = self.indexes_dir.join(format!("{}.json", index.file_hash));
        if saved.exists() {
            return Ok(());
        }
        phoenix_host::fs::write_atomic(&saved, index.to_json().as_bytes())
            .map_err(|e| Self::io(&saved)(e.into()))
    }

    fn load_index(&self, hash: &str) -> Option<Index> {
        if !phoenix_chunks::is_hash(hash) {
            return None;
        }
        let text = std::fs::read_to_string(self.indexes_dir.join(format!("{hash}.json"))).ok()?;
        Index::from_json(&text).ok().filter(|i| i.file_hash == hash)
    }

    /// Indexes every file in the folder and drops entries for files that
    /// are gone (blocking). Returns the names that could not be indexed,
    /// with why.
    pub fn scan(&self) -> Vec<(String, RegistryError)> {
        let mut failed = Vec::new();
        let mut present = HashSet::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                failed.push((String::new(), Self::io(&self.dir)(e)));
                return failed;
            }
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !is_image_file_name(&name) {
                continue;
            }
            match self.refresh(&name) {
                Ok(Some(_)) => {
                    present.insert(name);
                }
                Ok(None) => {}
                Err(e) => failed.push((name, e)),
            }
        }
        let gone: Vec<String> = lock(&self.catalog)
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.set_entry(&name, None);
        }
        failed
    }

    /// The catalog as minions get it.
    pub fn catalog(&self) -> Vec<CatalogEntry> {
        lock(&self.catalog)
            .iter()
            .map(|(name, e)| CatalogEntry {
                name: name.clone(),
                hash: e.index.file_hash.clone(),
                size: e.size,
            })
            .collect()
    }

    /// The catalog entry of image `name`.
    pub fn entry(&self, name: &str) -> Option<Entry> {
        lock(&self.catalog).get(name).cloned()
    }

    /// The catalog with each image's index.
    pub fn entries(&self) -> Vec<(String, Entry)> {
        lock(&self.catalog)
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect()
    }

    /// The index of the image whose whole-file hash is `hash`; `name` is
    /// the registry file it came from, indexed again if needed (blocking).
    pub fn index(&self, name: &str, hash: &str) -> Result<Index, RegistryError> {
        if !phoenix_chunks::is_hash(hash) {
            return Err(RegistryError::Changed {
                name: name.to_owned(),
            });
        }
        {
            let _one_at_a_time = lock(&self.indexing);
            if let Some(index) = self.load_index(hash)
                && index.chunks.iter().all(|c| self.chunks.has(&c.hash))
            {
                return Ok(index);
            }
        }
        // Index or chunks lost (or never made): the file itself, if it is
        // still this version.
        lock(&self.catalog).remove(name);
        match self.refresh(name)? {
            Some(r) if r.hash == hash => self.load_index(hash).ok_or_else(|| {
                RegistryError::Chunks(format!("index {hash} vanished after indexing"))
            }),
            Some(_) => Err(RegistryError::Changed {
                name: name.to_owned(),
            }),
            None => Err(self.missing(name)),
        }
    }

    /// A zstd batch of the given chunks, for the wire, each a delta against
    /// its base where that helps (blocking).
    pub fn chunk_batch(
        &self,
        hashes: &[String],
        bases: &[Option<String>],
    ) -> Result<Vec<u8>, RegistryError> {
        let refs: Vec<(&str, Option<&str>)> = hashes
            .iter()
            .enumerate()
            .map(|(i, h)| (h.as_str(), bases.get(i).and_then(|b| b.as_deref())))
            .collect();
        phoenix_chunks::encode_batch_with_bases(&self.chunks, &refs)
            .map_err(|e| RegistryError::Chunks(e.to_string()))
    }

    /// Deletes the indexes and chunks of images that are neither in the
    /// registry nor in `pinned` (hashes deployed services use) (blocking).
    pub fn collect(&self, pinned: &HashSet<String>) -> Result<Collected, RegistryError> {
        let _one_at_a_time = lock(&self.indexing);
        let mut keep: HashMap<String, Arc<Index>> = lock(&self.catalog)
            .values()
            .map(|e| (e.index.file_hash.clone(), e.index.clone()))
            .collect();
        for i in lock(&self.previous).values() {
            keep.insert(i.file_hash.clone(), i.clone());
        }
        for hash in pinned {
            if !keep.contains_key(hash)
                && let Some(i) = self.load_index(hash)
            {
                keep.insert(hash.clone(), Arc::new(i));
            }
        }
        let mut out = Collected::default();
        let listing = std::fs::read_dir(&self.indexes_dir).map_err(Self::io(&self.indexes_dir))?;
        for entry in listing.flatten() {
            let file = entry.file_name();
            let Some(hash) = file
                .to_str()
                .and_then(|f| f.strip_suffix(".json"))
                .filter(|h| phoenix_chunks::is_hash(h))
            else {
                continue;
            };
            if !keep.contains_key(hash) && std::fs::remove_file(entry.path()).is_ok() {
                out.indexes += 1;
            }
        }
        let kept: Vec<&Index> = keep.values().map(|i| &**i).collect();
        let gc = self
            .chunks
            .gc(&kept)
            .map_err(|e| RegistryError::Chunks(e.to_string()))?;
        out.chunks = gc.removed;
        out.bytes = gc.bytes;
        Ok(out)
    }

    /// Chunks and bytes in the store.
    pub fn usage(&self) -> Result<phoenix_chunks::Usage, RegistryError> {
        self.chunks
            .usage()
            .map_err(|e| RegistryError::Chunks(e.to_string()))
    }

    /// A temporary file in the registry for an upload; [`Registry::commit`]
    /// moves it into place atomically, so a half-uploaded image is never seen.
    pub fn staging(&self, name: &str) -> Result<(PathBuf, File), RegistryError> {
        self.path(name)?;
        let tmp = self.dir.join(format!(
            ".push-{name}-{}-{}",
            std::process::id(),
            phoenix_model::status::now_ms()
        ));
        let file = File::create(&tmp).map_err(Self::io(&tmp))?;
        Ok((tmp, file))
    }

    /// Indexes an uploaded file and moves it into place (blocking). The
    /// file is read once: the rename's filesystem event finds it indexed.
    pub fn commit(&self, tmp: &Path, name: &str) -> Result<ImageRef, RegistryError> {
        let path = self.path(name)?;
        let f = File::open(tmp).map_err(Self::io(tmp))?;
        f.sync_all().map_err(Self::io(tmp))?;
        let _one_at_a_time = lock(&self.indexing);
        let index = self
            .chunks
            .import_file(tmp)
            .map_err(|e| RegistryError::Chunks(e.to_string()))?;
        self.save_index(&index)?;
        let meta = f.metadata().map_err(Self::io(tmp))?;
        let (size, mtime) = (meta.len(), meta.modified().map_err(Self::io(tmp))?);
        std::fs::rename(tmp, &path).map_err(Self::io(&path))?;
        // The rename is an entry in the registry directory: synced, so an
        // acknowledged push survives a crash (the data was synced above).
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io(&self.dir))?;
        let r = ImageRef {
            hash: index.file_hash.clone(),
            size,
        };
        self.set_entry(
            name,
            Some(Entry {
                size,
                mtime,
                index: Arc::new(index),
            }),
        );
        Ok(r)
    }
}

/// What a pushed file is, judged by its first bytes ([`FORMAT_PROBE_LEN`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// An ELF executable.
    Elf,
    /// A script with a `#!` line.
    Script,
    /// A tar: an OCI layout or a `docker image save` archive.
    Tar,
    /// A zstd-compressed file (`.zst`).
    Zstd,
}

impl FileFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            FileFormat::Elf => "executable (ELF)",
            FileFormat::Script => "script",
            FileFormat::Tar => "OCI/Docker archive",
            FileFormat::Zstd => "zstd archive",
        }
    }
}

/// How many leading bytes [`file_format`] needs: a tar's magic is at 257.
pub const FORMAT_PROBE_LEN: usize = 512;

/// A file `push` refuses: nothing could run it.
#[derive(Debug, thiserror::Error)]
#[error(
    "{file} is {what}, neither an executable (ELF, or a script starting with `#!`) \
     nor a container image (an OCI or Docker archive tar, or a .zst); nothing was pushed"
)]
pub struct NotRunnable {
    /// The file as the user named it.
    pub file: String,
    /// What it is instead.
    pub what: &'static str,
}

/// What a file is, from its first [`FORMAT_PROBE_LEN`] bytes (fewer for a
/// shorter file), or what it is instead when it is nothing a minion can
/// run: a binary service runs the file itself, so it must be an
/// executable; a container image must be an archive. Refusing the rest at
/// `push` spares a user the wait for a service that cannot start.
pub fn file_format(head: &[u8]) -> Result<FileFormat, &'static str> {
    match head {
        [0x7f, b'E', b'L', b'F', ..] => return Ok(FileFormat::Elf),
        [b'#', b'!', ..] => return Ok(FileFormat::Script),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => return Ok(FileFormat::Zstd),
        _ => {}
    }
    if head.get(257..262) == Some(b"ustar") {
        return Ok(FileFormat::Tar);
    }
    Err(match head {
        [] => "an empty file",
        [0x1f, 0x8b, ..] => "gzip-compressed (decompress it: images are plain tars)",
        [b'B', b'Z', b'h', ..] => "bzip2-compressed (decompress it: images are plain tars)",
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            "xz-compressed (decompress it: images are plain tars)"
        }
        [b'P', b'K', 3, 4, ..] => "a zip archive",
        [b'%', b'P', b'D', b'F', ..] => "a PDF document",
        _ if looks_like_text(head) => "a text file without a `#!` line",
        _ => "data of a format phoenix does not know",
    })
}

/// Printable UTF-8 (a character cut off at the end of the probe allowed).
fn looks_like_text(head: &[u8]) -> bool {
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => return false,
    };
    text.chars()
        .all(|c| !c.is_control() || matches!(c, '\n' | '\r' | '\t'))
}

/// Reads up to [`FORMAT_PROBE_LEN`] bytes from the start of a file.
pub fn probe(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(FORMAT_PROBE_LEN);
    r.take(FORMAT_PROBE_LEN as u64).read_to_end(&mut head)?;
    Ok(head)
}

/// Whether a file in the registry folder is an image: temporary files
/// (a dot first, as `push` and most editors make) are not.
pub fn is_image_file_name(name: &str) -> bool {
    !name.starts_with('.') && check_image_name(name).is_ok()
}

/// Bytes of each image's chunks that no other image in `entries` has.
pub fn unique_bytes(entries: &[(String, Entry)]) -> Vec<u64> {
    let mut owners: HashMap<&str, (usize, u64)> = HashMap::new();
    for (i, (_, e)) in entries.iter().enumerate() {
        for c in &e.index.chunks {
            let o = owners
                .entry(c.hash.as_str())
                .or_insert((i, u64::from(c.len)));
            if o.0 != i {
                o.0 = usize::MAX;
            }
        }
    }
    let mut out = vec![0; entries.len()];
    for (owner, size) in owners.into_values() {
        if let Some(b) = out.get_mut(owner) {
            *b += size;
        }
    }
    out
}

/// BLAKE3 of a whole stream, hex.
pub fn hash_reader(r: &mut impl Read) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn push_knows_executables_and_images_and_says_what_else_a_file_is() {
        let mut tar = vec![0u8; 1024];
        tar[257..263].copy_from_slice(b"ustar\0");
        let cases: [(&[u8], Result<FileFormat, &str>); 10] = [
            (b"\x7fELF\x02\x01", Ok(FileFormat::Elf)),
            (b"#!/bin/sh\necho hi\n", Ok(FileFormat::Script)),
            (&tar, Ok(FileFormat::Tar)),
            (&[0x28, 0xb5, 0x2f, 0xfd, 0], Ok(FileFormat::Zstd)),
            (b"", Err("an empty file")),
            (
                b"server {\n  listen 80;\n}\n",
                Err("a text file without a `#!` line"),
            ),
            (
                &[0x1f, 0x8b, 8, 0],
                Err("gzip-compressed (decompress it: images are plain tars)"),
            ),
            (b"PK\x03\x04rest", Err("a zip archive")),
            (
                &[0, 1, 2, 3, 0xff],
                Err("data of a format phoenix does not know"),
            ),
            // A multi-byte character cut off by the probe is still text.
            (
                "caf\u{e9}".as_bytes().split_last().unwrap().1,
                Err("a text file without a `#!` line"),
            ),
        ];
        for (head, want) in cases {
            assert_eq!(file_format(head), want, "{head:?}");
        }
        let e = NotRunnable {
            file: "./notes.txt".into(),
            what: "a text file without a `#!` line",
        };
        assert!(
            e.to_string().starts_with("./notes.txt is a text file"),
            "{e}"
        );
        let mut big = std::io::Cursor::new(vec![7u8; 4096]);
        assert_eq!(probe(&mut big).unwrap().len(), FORMAT_PROBE_LEN);
    }

    #[test]
    fn push_resolve_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path().join("registry")).unwrap();
        let err = reg.resolve("nope").unwrap_err().to_string();
        assert!(
            err.contains("image \"nope\" is not in the registry"),
            "{err}"
        );
        assert!(reg.resolve("../etc").is_err());
        let (tmp, mut f) = reg.staging("app").unwrap();
        f.write_all(b"hello").unwrap();
        drop(f);
        let r = reg.commit(&tmp, "app").unwrap();
        assert_eq!(r.size, 5);
        assert_eq!(r.hash, blake3::hash(b"hello").to_hex().to_string());
        assert_eq!(reg.resolve("app").unwrap(), r);
        assert!(!tmp.exists());
    }

    /// `len` reproducible, incompressible bytes.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let mut xof = blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof();
        xof.fill(&mut out);
        out
    }

    #[test]
    fn scan_refresh_and_removal_keep_the_catalog_in_step_with_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path().join("registry")).unwrap();
        let changes = reg.changes();
        let a = noise(1 << 20, 1);
        std::fs::write(reg.dir().join("a"), &a).unwrap();
        std::fs::write(reg.dir().join(".a.part"), b"half").unwrap();
        assert!(reg.scan().is_empty());
        let cat = reg.catalog();
        assert_eq!(cat.len(), 1, "{cat:?}");
        assert_eq!(cat[0].hash, blake3::hash(&a).to_hex().to_string());
        assert!(changes.has_changed().unwrap());
        // Indexed once: its index is on disk and a resolve is a lookup.
        assert!(
            dir.path()
                .join(format!("indexes/{}.json", cat[0].hash))
                .exists()
        );
        assert_eq!(reg.resolve("a").unwrap().hash, cat[0].hash);

        // Replaced by hand: the same name, a new hash.
        std::fs::write(reg.dir().join("a"), b"version two").unwrap();
        let r = reg.refresh("a").unwrap().unwrap();
        assert_eq!(r.hash, blake3::hash(b"version two").to_hex().to_string());
        // The old version stays fetchable by hash while its index is kept.
        let old = reg.index("a", &cat[0].hash).unwrap();
        assert_eq!(old.size, a.len() as u64);

        std::fs::remove_file(reg.dir().join("a")).unwrap();
        assert_eq!(reg.refresh("a").unwrap(), None);
        assert!(reg.catalog().is_empty());
        assert!(matches!(
            reg.resolve("a"),
            Err(RegistryError::Missing { .. })
        ));
    }

    #[test]
    fn a_reopened_registry_knows_unchanged_files_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path().join("registry")).unwrap();
        std::fs::write(reg.dir().join("a"), noise(1 << 20, 1)).unwrap();
        reg.scan();
        let hash = reg.catalog()[0].hash.clone();
        drop(reg);
        // Same size, same mtime, other bytes: like rsync's quick check,
        // the restarted master trusts size and mtime and reads nothing.
        let path = dir.path().join("registry/a");
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, noise(1 << 20, 2)).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let reg = Registry::open(dir.path().join("registry")).unwrap();
        assert!(reg.scan().is_empty());
        assert_eq!(reg.catalog()[0].hash, hash);
        // A real change (new mtime) is read.
        std::fs::write(&path, noise(1 << 20, 3)).unwrap();
        reg.refresh("a").unwrap();
        assert_ne!(reg.catalog()[0].hash, hash);
        // The version it replaced is kept (delta bases), also across a
        // restart.
        drop(reg);
        let reg = Registry::open(dir.path().join("registry")).unwrap();
        reg.collect(&HashSet::new()).unwrap();
        assert!(reg.index("a", &hash).is_ok(), "the previous version went");
    }

    #[test]
    fn collection_keeps_catalog_and_pinned_images_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path().join("registry")).unwrap();
        let (a, b, c) = (noise(1 << 20, 1), noise(1 << 20, 2), noise(1 << 20, 3));
        for (name, data) in [("a", &a), ("b", &b), ("c", &c)] {
            std::fs::write(reg.dir().join(name), data).unwrap();
        }
        reg.scan();
        let hash = |d: &[u8]| blake3::hash(d).to_hex().to_string();
        let all = reg.usage().unwrap().bytes;
        assert_eq!(all, 3 << 20);
        // b and c leave the folder; a service still uses b.
        std::fs::remove_file(reg.dir().join("b")).unwrap();
        std::fs::remove_file(reg.dir().join("c")).unwrap();
        reg.scan();
        let pinned: HashSet<String> = [hash(&b)].into();
        let got = reg.collect(&pinned).unwrap();
        assert_eq!(got.indexes, 1);
        assert_eq!(got.bytes, 1 << 20);
        assert_eq!(reg.usage().unwrap().bytes, 2 << 20);
        assert!(reg.index("b", &hash(&b)).is_ok(), "the pinned image went");
        assert!(reg.index("c", &hash(&c)).is_err());
        // Unpinned, b goes too.
        reg.collect(&HashSet::new()).unwrap();
        assert_eq!(reg.usage().unwrap().bytes, 1 << 20);
    }

    #[test]
    fn unique_bytes_count_only_chunks_no_other_image_has() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path().join("registry")).unwrap();
        let a = noise(2 << 20, 1);
        let mut b = a.clone();
        b.extend(noise(1 << 20, 2));
        std::fs::write(reg.dir().join("a"), &a).unwrap();
        std::fs::write(reg.dir().join("b"), &b).unwrap();
        reg.scan();
        let entries = reg.entries();
        let unique = unique_bytes(&entries);
        // a's content is all in b except maybe its last chunk (cut at the
        // end of file); b's own megabyte is its alone.
        assert!(unique[0] < (512 << 10), "{unique:?}");
        assert!(
            unique[1] >= (1 << 20) && unique[1] < (2 << 20),
            "{unique:?}"
        );
    }
}
