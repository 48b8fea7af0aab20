//! Phoenix's registry chunks (issue 5: images pre-synced to minions with
//! block-level deduplication).
//!
//! Every registry file (binaries, OCI tars, VM images) is split into
//! content-defined chunks with FastCDC (the `fastcdc` crate, its `v2020`
//! module). Each chunk is named by its BLAKE3 hash and stored once in a
//! [`ChunkStore`], across all images and versions. An image *is* its
//! [`Index`]: the ordered list of chunk hashes and sizes plus the
//! whole-file BLAKE3 hash. A minion that has an older version of an image
//! asks only for the chunks it lacks ([`ChunkStore::missing`]), receives them
//! zstd-compressed in batches ([`encode_batch`] / [`decode_batch`]), each
//! verified against its hash, and assembles the file atomically
//! ([`ChunkStore::assemble`]).
//!
//! # Chunk sizes, chosen by measurement
//!
//! `cargo run --release -p phoenix-chunks --example measure` chunks a 50 MiB
//! file of seeded pseudo-random data, then a copy with three 16-byte edits
//! (at 10 %, 30 % and 85 %) and a 1 KiB insertion in the middle, and reports
//! how many chunks the new version has, how many of its bytes are in chunks
//! the old version lacks (what a sync moves), and the size of the new
//! index as JSON:
//!
//! | min / avg / max   | chunks | moved bytes | moved  | index JSON | index + moved | chunks per GiB |
//! |-------------------|-------:|------------:|-------:|-----------:|--------------:|---------------:|
//! | 4K / 16K / 64K    |   2650 |     112 504 |  0.21% |   279 990 B |     392 494 B |         54 272 |
//! | 16K / 64K / 256K  |    650 |     398 575 |  0.76% |    69 021 B |     467 596 B |         13 312 |
//! | **32K / 128K / 512K** | **335** | **754 871** | **1.44%** | **35 786 B** | **790 657 B** | **6 860** |
//! | 64K / 256K / 1M   |    171 |   1 240 097 |  2.37% |    18 353 B |   1 258 450 B |          3 502 |
//! | 256K / 1M / 4M    |     43 |   6 024 305 | 11.49% |     4 719 B |   6 029 024 B |            880 |
//!
//! (Chunking both versions takes 120–170 ms in a release build for every
//! set: the parameters do not change the chunking speed.)
//!
//! Random data is the worst case for compression and the neutral case for
//! chunking (real tars and VM images dedup better, never worse, in the
//! number of chunks touched). Every edit dirties about one chunk (two when
//! it lands near a boundary), so the moved bytes grow linearly with the
//! average chunk size, while the chunk count (index size, one file, one
//! hash check and one batch entry per chunk) shrinks with it.
//!
//! **Choice: min 32 KiB, avg 128 KiB, max 512 KiB** ([`ChunkParams::DEFAULT`]).
//! A sync sends the new index (about 107 bytes of JSON per chunk, i.e. per
//! `size / avg`) plus about `avg` bytes per edit, so its cost is lowest
//! when `avg ≈ sqrt(107 · size / edits)`: about 35 KiB for this 50 MiB file
//! with four edits, about 150 KiB for a 1 GiB VM image or OCI tar with a
//! handful of edits per version — the files where syncing matters most.
//! 128 KiB sits between the two, moves 1.4 % of the 50 MiB file here (5 of
//! 335 chunks), and keeps the per-chunk costs modest: about 6 900 chunk
//! files, index entries, hash checks and batch entries per GiB (four times
//! fewer than 16K/64K/256K, whose moved bytes are only 350 KiB lower here),
//! and an index of about 0.7 MiB per GiB. 64K/256K/1M halves the chunk
//! count but moves 1.6× the bytes for every edit; 256K/1M/4M moves 11 % of
//! the file for four small edits. The largest chunk (512 KiB) also bounds
//! the memory a chunk costs on both sides and keeps batches fine-grained.
//!
//! Chunk hashes are lowercase hex BLAKE3 (64 characters); the store never
//! builds a path from a string that is not one, so an index from the wire
//! cannot name a path outside the store.

mod batch;
mod seeds;
mod store;

pub use batch::{
    MAX_BATCH_BYTES, decode_batch, decode_batch_with_bases, encode_batch, encode_batch_with_bases,
};
pub use seeds::Seeds;
pub use store::{ChunkStore, GcStats, Insert, Usage};

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// FastCDC size parameters (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl ChunkParams {
    /// The parameters Phoenix uses (see the crate docs for the measurement).
    pub const DEFAULT: ChunkParams = ChunkParams {
        min: 32 * 1024,
        avg: 128 * 1024,
        max: 512 * 1024,
    };

    fn check(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&self.min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&self.avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidParams(*self))
        }
    }
}

impl Default for ChunkParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One chunk of a file: its BLAKE3 hash (lowercase hex), where it starts in
/// the file and how long it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: String,
    pub offset: u64,
    pub len: u32,
}

/// A file as its chunks: the whole-file BLAKE3 hash (lowercase hex), its
/// size, and the chunks in file order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub file_hash: String,
    pub size: u64,
    pub chunks: Vec<ChunkRef>,
}

impl Index {
    /// Checks that the index is well formed: valid hashes, chunks that are
    /// non-empty, contiguous from offset 0, and add up to `size`.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidIndex {
                file_hash: self.file_hash.clone(),
                reason,
            })
        };
        if !is_hash(&self.file_hash) {
            return bad("file hash is not 64 lowercase hex digits".into());
        }
        let mut next = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            if !is_hash(&c.hash) {
                return bad(format!(
                    "chunk {i}: hash {:?} is not 64 lowercase hex digits",
                    c.hash
                ));
            }
            if c.offset != next {
                return bad(format!(
                    "chunk {i} ({}): offset {} where {next} was expected",
                    c.hash, c.offset
                ));
            }
            if c.len == 0 {
                return bad(format!("chunk {i} ({}): empty", c.hash));
            }
            next += u64::from(c.len);
        }
        if next != self.size {
            return bad(format!(
                "chunks add up to {next} bytes, size is {}",
                self.size
            ));
        }
        Ok(())
    }

    /// The index as JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses and validates an index from JSON.
    pub fn from_json(json: &str) -> Result<Index> {
        let index: Index = serde_json::from_str(json).map_err(|e| Error::Json(e.to_string()))?;
        index.validate()?;
        Ok(index)
    }

    /// The index for the wire, 36 bytes a chunk (a third of its JSON): the
    /// magic `PXINDEX1`, the raw file hash, the size (`u64`), the chunk
    /// count (`u32`), then per chunk its raw hash and length (`u32`), all
    /// big-endian; offsets follow from the lengths.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(52 + 36 * self.chunks.len());
        out.extend_from_slice(b"PXINDEX1");
        let raw = |hex_hash: &str, out: &mut Vec<u8>| {
            let mut bin = [0u8; 32];
            // Hashes in a validated index are 64 hex digits.
            let _ = hex::decode_to_slice(hex_hash, &mut bin);
            out.extend_from_slice(&bin);
        };
        raw(&self.file_hash, &mut out);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_be_bytes());
        for c in &self.chunks {
            raw(&c.hash, &mut out);
            out.extend_from_slice(&c.len.to_be_bytes());
        }
        out
    }

    /// Parses and validates an index from [`Index::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Index> {
        let bad = |what: &str| Error::Json(format!("binary index: {what}"));
        let (head, mut rest) = bytes
            .split_at_checked(52)
            .ok_or_else(|| bad("truncated header"))?;
        if &head[..8] != b"PXINDEX1" {
            return Err(bad("bad magic"));
        }
        let file_hash = hex::encode(&head[8..40]);
        let size = u64::from_be_bytes(head[40..48].try_into().map_err(|_| bad("size"))?);
        let count = u32::from_be_bytes(head[48..52].try_into().map_err(|_| bad("count"))?) as usize;
        if rest.len() != count.saturating_mul(36) {
            return Err(bad("length does not match the chunk count"));
        }
        let mut chunks = Vec::with_capacity(count);
        let mut offset = 0u64;
        while let Some((c, tail)) = rest.split_at_checked(36) {
            let len = u32::from_be_bytes(c[32..36].try_into().map_err(|_| bad("length"))?);
            chunks.push(ChunkRef {
                hash: hex::encode(&c[..32]),
                offset,
                len,
            });
            offset += u64::from(len);
            rest = tail;
        }
        let index = Index {
            file_hash,
            size,
            chunks,
        };
        index.validate()?;
        Ok(index)
    }

    /// The bytes of `self` in chunks that `old` does not have: what a sync
    /// from `old` to `self` moves (each distinct chunk counted once).
    pub fn bytes_not_in(&self, old: &Index) -> u64 {
        let have: std::collections::HashSet<&str> =
            old.chunks.iter().map(|c| c.hash.as_str()).collect();
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .filter(|c| !have.contains(c.hash.as_str()) && seen.insert(c.hash.as_str()))
            .map(|c| u64::from(c.len))
            .sum()
    }
}

/// Errors, each naming the failing path or hash.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: disk full ({source})", path.display())]
    DiskFull { path: PathBuf, source: io::Error },
    #[error("{}: chunking failed: {message}", path.display())]
    Chunker { path: PathBuf, message: String },
    #[error("invalid chunk parameters {0:?}")]
    InvalidParams(ChunkParams),
    #[error("invalid chunk hash {0:?} (expected 64 lowercase hex digits)")]
    InvalidHash(String),
    #[error("chunk {hash} is not in the store ({})", path.display())]
    MissingChunk { hash: String, path: PathBuf },
    #[error("chunk {hash} is corrupt: its content hashes to {actual} ({}); remove it and fetch it again", path.display())]
    CorruptChunk {
        hash: String,
        actual: String,
        path: PathBuf,
    },
    #[error("chunk {hash} data hashes to {actual}")]
    HashMismatch { hash: String, actual: String },
    #[error("chunk {hash} at offset {offset}: index says {expected} bytes, store has {actual}")]
    ChunkLength {
        hash: String,
        offset: u64,
        expected: u32,
        actual: usize,
    },
    #[error("{}: assembled file hashes to {actual}, index says {expected}", path.display())]
    FileHash {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("index of {file_hash}: {reason}")]
    InvalidIndex { file_hash: String, reason: String },
    #[error("index JSON: {0}")]
    Json(String),
    #[error("chunk batch refused: {0}")]
    Batch(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Maps an I/O error on `path` to [`Error::DiskFull`] when the disk (or
/// quota) is full, [`Error::Io`] otherwise.
pub(crate) fn io_err(path: &Path, source: io::Error) -> Error {
    let full = matches!(
        source.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    );
    let path = path.to_path_buf();
    if full {
        Error::DiskFull { path, source }
    } else {
        Error::Io { path, source }
    }
}

/// True for a lowercase hex BLAKE3 hash (64 characters).
pub fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(crate) fn check_hash(s: &str) -> Result<()> {
    if is_hash(s) {
        Ok(())
    } else {
        Err(Error::InvalidHash(s.to_string()))
    }
}

/// The lowercase hex BLAKE3 hash of `data`.
pub fn hash_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// Chunks the file at `path` with [`ChunkParams::DEFAULT`].
pub fn chunk_file(path: impl AsRef<Path>) -> Result<Index> {
    chunk_file_with(path, ChunkParams::DEFAULT)
}

/// Chunks the file at `path` with the given parameters.
pub fn chunk_file_with(path: impl AsRef<Path>, params: ChunkParams) -> Result<Index> {
    for_each_chunk(path.as_ref(), params, |_, _| Ok(()))
}

/// Chunks in-memory data with the given parameters (the same cuts as
/// [`chunk_file_with`] on a file holding `data`).
pub fn chunk_bytes(data: &[u8], params: ChunkParams) -> Result<Index> {
    chunk_reader(data, Path::new("<memory>"), params, |_, _| Ok(()))
}

/// Chunks the file at `path`, calling `each` with every chunk and its data.
pub(crate) fn for_each_chunk(
    path: &Path,
    params: ChunkParams,
    each: impl FnMut(&ChunkRef, &[u8]) -> Result<()> + Send,
) -> Result<Index> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    chunk_reader(file, path, params, each)
}

fn chunk_reader(
    source: impl Read,
    path: &Path,
    params: ChunkParams,
    mut each: impl FnMut(&ChunkRef, &[u8]) -> Result<()> + Send,
) -> Result<Index> {
    params.check()?;
    // Two stages on two threads: finding the cut points here; hashing (the
    // whole file and each chunk) and `each` (storing) on a worker. They
    // take about as long as each other, so a file is indexed in about half
    // the time.
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(8);
        let worker = scope.spawn(move || -> Result<Index> {
            let mut whole = blake3::Hasher::new();
            let mut chunks = Vec::new();
            let mut size = 0u64;
            for (offset, data) in rx {
                whole.update(&data);
                let r = ChunkRef {
                    hash: hash_hex(&data),
                    offset,
                    // A chunk is at most `params.max` (a u32) bytes.
                    len: u32::try_from(data.len()).map_err(|_| Error::Chunker {
                        path: path.to_path_buf(),
                        message: format!("chunk of {} bytes", data.len()),
                    })?,
                };
                size += u64::from(r.len);
                each(&r, &data)?;
                chunks.push(r);
            }
            Ok(Index {
                file_hash: whole.finalize().to_hex().to_string(),
                size,
                chunks,
            })
        });
        let failed = cut_points(source, params, |offset, data| {
            tx.send((offset, data)).is_ok()
        })
        .map_err(|e| io_err(path, e))
        .err();
        drop(tx);
        let index = worker.join().map_err(|_| Error::Chunker {
            path: path.to_path_buf(),
            message: "the hashing thread panicked".into(),
        })?;
        match failed {
            Some(e) => Err(e),
            None => index,
        }
    })
}

/// The buffer `cut_points` reads into: many chunks per read and per move.
const WINDOW: usize = 8 << 20;

/// Finds the chunks of `source` (the same cut points as fastcdc's
/// `StreamCDC`, which moves its whole buffer for every chunk) and hands
/// each to `chunk` with its offset, until `chunk` returns false.
fn cut_points(
    mut source: impl Read,
    params: ChunkParams,
    mut chunk: impl FnMut(u64, Vec<u8>) -> bool,
) -> std::io::Result<()> {
    let max = params.max as usize;
    let mut buf = vec![0u8; WINDOW.max(2 * max)];
    let (mut len, mut offset, mut eof) = (0usize, 0u64, false);
    loop {
        while !eof && len < buf.len() {
            match source.read(&mut buf[len..]) {
                Ok(0) => eof = true,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if len == 0 {
            return Ok(());
        }
        let mut pos = 0;
        {
            let cdc = fastcdc::v2020::FastCDC::new(&buf[..len], params.min, params.avg, params.max);
            // Short of `max` bytes, a cut is final only at the end of the file.
            while pos < len && (eof || len - pos >= max) {
                let (_, end) = cdc.cut(pos, len - pos);
                if end <= pos {
                    break;
                }
                if !chunk(offset + pos as u64, buf[pos..end].to_vec()) {
                    return Ok(());
                }
                pos = end;
            }
        }
        if eof && pos >= len {
            return Ok(());
        }
        buf.copy_within(pos..len, 0);
        offset += pos as u64;
        len -= pos;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_disk_full() {
        let e = io_err(
            Path::new("/x/y"),
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(matches!(e, Error::DiskFull { .. }), "{e}");
        assert!(e.to_string().contains("/x/y: disk full"), "{e}");
        let e = io_err(
            Path::new("/x/y"),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }

    #[test]
    fn hashes_are_checked() {
        assert!(is_hash(&hash_hex(b"x")));
        assert!(!is_hash("../../etc/passwd"));
        assert!(!is_hash(&hash_hex(b"x").to_uppercase()));
        assert!(!is_hash(&hash_hex(b"x")[..63]));
    }

    #[test]
    fn empty_input_is_an_empty_index() {
        let index = chunk_bytes(&[], ChunkParams::DEFAULT).unwrap();
        assert_eq!(index.size, 0);
        assert!(index.chunks.is_empty());
        assert_eq!(index.file_hash, hash_hex(&[]));
        index.validate().unwrap();
    }
}
