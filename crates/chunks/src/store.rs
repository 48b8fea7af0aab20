//! The chunk store: `DIR/chunks/ab/abcdef…`, one file per distinct chunk.

use crate::{ChunkParams, ChunkRef, Error, Index, Result, check_hash, hash_hex, io_err};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A directory of chunks named by their BLAKE3 hash.
///
/// Chunks are written to a temporary file in their final directory and
/// renamed into place, so a chunk file is either absent or complete. Every
/// read verifies the content against the name; a chunk damaged on disk is
/// reported as [`Error::CorruptChunk`] and can be dropped with
/// [`ChunkStore::remove`] and fetched again. [`ChunkStore::gc`] must not run
/// while another process inserts chunks for an index the `gc` caller does
/// not keep.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    root: PathBuf,
}

/// What [`ChunkStore::insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub hash: String,
    /// False when the store already had the chunk (nothing was written).
    pub stored: bool,
}

/// What [`ChunkStore::gc`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    pub removed: u64,
    pub bytes: u64,
}

/// What the store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub chunks: u64,
    pub bytes: u64,
}

impl ChunkStore {
    /// Opens (creating if needed) the store in `dir`; chunks live in
    /// `dir/chunks`.
    pub fn open(dir: impl AsRef<Path>) -> Result<ChunkStore> {
        let root = dir.as_ref().join("chunks");
        fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
        Ok(ChunkStore { root })
    }

    /// The path of chunk `hash` (which must be a valid hash).
    pub fn chunk_path(&self, hash: &str) -> Result<PathBuf> {
        check_hash(hash)?;
        Ok(self.root.join(&hash[..2]).join(hash))
    }

    /// True if the store has chunk `hash` (not verified: see [`Self::get`]).
    pub fn has(&self, hash: &str) -> bool {
        self.chunk_path(hash).is_ok_and(|p| p.is_file())
    }

    /// Stores `data` under its BLAKE3 hash unless it is already there.
    pub fn insert(&self, data: &[u8]) -> Result<Insert> {
        let hash = hash_hex(data);
        let stored = self.write_if_absent(&hash, data)?;
        Ok(Insert { hash, stored })
    }

    /// Stores `data`, which must hash to `hash` (a chunk fetched for an
    /// index): a mismatch is [`Error::HashMismatch`] and nothing is written.
    pub fn insert_expecting(&self, hash: &str, data: &[u8]) -> Result<Insert> {
        check_hash(hash)?;
        let actual = hash_hex(data);
        if actual != hash {
            return Err(Error::HashMismatch {
                hash: hash.to_string(),
                actual,
            });
        }
        self.insert(data)
    }

    fn write_if_absent(&self, hash: &str, data: &[u8]) -> Result<bool> {
        let path = self.chunk_path(hash)?;
        if path.is_file() {
            return Ok(false);
        }
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(|e| io_err(dir, e))?;
        tmp.write_all(data).map_err(|e| io_err(tmp.path(), e))?;
        // No fsync per chunk: a chunk lost or torn by a crash fails its
        // hash check on read and is fetched again.
        tmp.persist(&path).map_err(|e| io_err(&path, e.error))?;
        Ok(true)
    }

    /// Reads chunk `hash`, verifying its BLAKE3 hash.
    pub fn get(&self, hash: &str) -> Result<Vec<u8>> {
        let path = self.chunk_path(hash)?;
        let data = fs::read(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::MissingChunk {
                    hash: hash.to_string(),
                    path: path.clone(),
                }
            } else {
                io_err(&path, e)
            }
        })?;
        let actual = hash_hex(&data);
        if actual != hash {
            return Err(Error::CorruptChunk {
                hash: hash.to_string(),
                actual,
                path,
            });
        }
        Ok(data)
    }

    /// Reads chunk `hash` from the store, or else from a file of `seeds`,
    /// verified either way.
    pub fn get_or_seed(&self, hash: &str, seeds: &crate::Seeds) -> Result<Vec<u8>> {
        if !self.has(hash)
            && let Some(found) = seeds.get(hash)
        {
            return found;
        }
        self.get(hash)
    }

    /// The chunks of `index` neither the store nor `seeds` has, each once,
    /// in index order.
    pub fn missing_with(&self, index: &Index, seeds: &crate::Seeds) -> Vec<ChunkRef> {
        let mut seen = HashSet::new();
        index
            .chunks
            .iter()
            .filter(|c| seen.insert(c.hash.as_str()) && !seeds.has(&c.hash) && !self.has(&c.hash))
            .cloned()
            .collect()
    }

    /// Removes chunk `hash`; true if it was there.
    pub fn remove(&self, hash: &str) -> Result<bool> {
        let path = self.chunk_path(hash)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// The chunks of `index` the store lacks, each once, in index order.
    pub fn missing(&self, index: &Index) -> Vec<ChunkRef> {
        let mut seen = HashSet::new();
        index
            .chunks
            .iter()
            .filter(|c| seen.insert(c.hash.as_str()) && !self.has(&c.hash))
            .cloned()
            .collect()
    }

    /// Chunks the file at `path` and stores all its chunks.
    pub fn import_file(&self, path: impl AsRef<Path>) -> Result<Index> {
        self.import_file_with(path, ChunkParams::DEFAULT)
    }

    /// [`Self::import_file`] with explicit chunk parameters.
    pub fn import_file_with(&self, path: impl AsRef<Path>, params: ChunkParams) -> Result<Index> {
        crate::for_each_chunk(path.as_ref(), params, |c, data| {
            self.write_if_absent(&c.hash, data).map(|_| ())
        })
    }

    /// Writes the file `index` describes to `dest`: into a temporary file
    /// beside `dest`, each chunk verified, then the whole-file hash checked,
    /// the data synced, and the file renamed over `dest` (and the directory
    /// synced). On any error (a missing or corrupt chunk, a full disk) the
    /// temporary file is removed and `dest` is untouched.
    pub fn assemble(&self, index: &Index, dest: impl AsRef<Path>) -> Result<()> {
        self.assemble_with(index, dest, &crate::Seeds::default())
    }

    /// [`Self::assemble`], taking chunks the store lacks from `seeds`.
    pub fn assemble_with(
        &self,
        index: &Index,
        dest: impl AsRef<Path>,
        seeds: &crate::Seeds,
    ) -> Result<()> {
        let dest = dest.as_ref();
        index.validate()?;
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempfile_in(dir)
            .map_err(|e| io_err(dir, e))?;
        // Write errors (a full disk above all) name `dest`, the file the
        // caller asked for; the temporary file is removed on return.
        let mut whole = blake3::Hasher::new();
        let mut out = BufWriter::with_capacity(1 << 20, tmp);
        for c in &index.chunks {
            let data = self.get_or_seed(&c.hash, seeds)?;
            if data.len() != c.len as usize {
                return Err(Error::ChunkLength {
                    hash: c.hash.clone(),
                    offset: c.offset,
                    expected: c.len,
                    actual: data.len(),
                });
            }
            whole.update(&data);
            out.write_all(&data).map_err(|e| io_err(dest, e))?;
        }
        let actual = whole.finalize().to_hex().to_string();
        if actual != index.file_hash {
            return Err(Error::FileHash {
                path: dest.to_path_buf(),
                expected: index.file_hash.clone(),
                actual,
            });
        }
        let tmp = out.into_inner().map_err(|e| io_err(dest, e.into_error()))?;
        tmp.as_file().sync_all().map_err(|e| io_err(dest, e))?;
        tmp.persist(dest).map_err(|e| io_err(dest, e.error))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, e))?;
        Ok(())
    }

    /// Calls `each(hash, path, len)` for every chunk file (temporary files
    /// and foreign names are skipped).
    fn walk(&self, mut each: impl FnMut(&str, &Path, u64) -> Result<()>) -> Result<()> {
        let subdirs = fs::read_dir(&self.root).map_err(|e| io_err(&self.root, e))?;
        for sub in subdirs {
            let sub = sub.map_err(|e| io_err(&self.root, e))?.path();
            if !sub.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&sub).map_err(|e| io_err(&sub, e))? {
                let entry = entry.map_err(|e| io_err(&sub, e))?;
                let path = entry.path();
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if !crate::is_hash(&name) {
                    continue;
                }
                let meta = entry.metadata().map_err(|e| io_err(&path, e))?;
                if meta.is_file() {
                    each(&name, &path, meta.len())?;
                }
            }
        }
        Ok(())
    }

    /// How many chunks the store holds and their total size.
    pub fn usage(&self) -> Result<Usage> {
        let mut u = Usage::default();
        self.walk(|_, _, len| {
            u.chunks += 1;
            u.bytes += len;
            Ok(())
        })?;
        Ok(u)
    }

    /// Deletes every chunk no index in `keep` references.
    pub fn gc(&self, keep: &[&Index]) -> Result<GcStats> {
        let live: HashSet<&str> = keep
            .iter()
            .flat_map(|i| i.chunks.iter().map(|c| c.hash.as_str()))
            .collect();
        let mut stats = GcStats::default();
        self.walk(|hash, path, len| {
            if live.contains(hash) {
                return Ok(());
            }
            match fs::remove_file(path) {
                Ok(()) => {
                    stats.removed += 1;
                    stats.bytes += len;
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err(path, e)),
            }
        })?;
        Ok(stats)
    }
}
