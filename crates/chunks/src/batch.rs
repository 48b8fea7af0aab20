//! Chunk batches for the wire.
//!
//! Before compression a batch is: the magic `PXCHUNK1`, a big-endian `u32`
//! chunk count, then per chunk its raw 32-byte BLAKE3 hash, a big-endian
//! `u32` length and the data. The whole batch is zstd-compressed. Decoding
//! refuses a batch that decompresses to more than [`MAX_BATCH_BYTES`], is
//! truncated or has trailing bytes, or holds a chunk whose data does not
//! hash to its name.

use crate::{ChunkStore, Error, Result, check_hash, hash_hex};
use std::io::Read;

const MAGIC: &[u8; 8] = b"PXCHUNK1";

/// The largest batch (uncompressed) that is encoded or accepted.
pub const MAX_BATCH_BYTES: usize = 256 << 20;

const ZSTD_LEVEL: i32 = 3;

/// Encodes chunks `hashes` from `store` (each verified as it is read) into
/// one zstd-compressed batch.
pub fn encode_batch(store: &ChunkStore, hashes: &[&str]) -> Result<Vec<u8>> {
    let count = u32::try_from(hashes.len())
        .map_err(|_| Error::Batch(format!("{} chunks in one batch", hashes.len())))?;
    let mut raw = Vec::new();
    raw.extend_from_slice(MAGIC);
    raw.extend_from_slice(&count.to_be_bytes());
    for hash in hashes {
        let data = store.get(hash)?;
        let mut bin = [0u8; 32];
        hex::decode_to_slice(hash, &mut bin).map_err(|_| Error::InvalidHash(hash.to_string()))?;
        raw.extend_from_slice(&bin);
        let len = u32::try_from(data.len())
            .map_err(|_| Error::Batch(format!("chunk {hash}: {} bytes", data.len())))?;
        raw.extend_from_slice(&len.to_be_bytes());
        raw.extend_from_slice(&data);
        if raw.len() > MAX_BATCH_BYTES {
            return Err(Error::Batch(format!(
                "more than {MAX_BATCH_BYTES} bytes at chunk {hash}; split the batch"
            )));
        }
    }
    zstd::stream::encode_all(&raw[..], ZSTD_LEVEL).map_err(|e| Error::Batch(format!("zstd: {e}")))
}

/// Decodes a batch into `(hash, data)` pairs, each verified.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let decoder =
        zstd::stream::Decoder::new(bytes).map_err(|e| Error::Batch(format!("zstd: {e}")))?;
    let mut raw = Vec::new();
    decoder
        .take(MAX_BATCH_BYTES as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| Error::Batch(format!("zstd: {e}")))?;
    if raw.len() > MAX_BATCH_BYTES {
        return Err(Error::Batch(format!(
            "decompresses to more than {MAX_BATCH_BYTES} bytes"
        )));
    }
    let mut r = Reader { buf: &raw };
    if r.take(MAGIC.len(), "magic")? != MAGIC {
        return Err(Error::Batch("bad magic".into()));
    }
    let count = r.u32("count")?;
    let mut out = Vec::new();
    for i in 0..count {
        let hash = hex::encode(r.take(32, "hash")?);
        let len = r.u32("length")? as usize;
        let data = r.take(len, "data")?;
        check_hash(&hash)?;
        let actual = hash_hex(data);
        if actual != hash {
            return Err(Error::Batch(format!(
                "chunk {i} named {hash} hashes to {actual}"
            )));
        }
        out.push((hash, data.to_vec()));
    }
    if !r.buf.is_empty() {
        return Err(Error::Batch(format!("{} trailing bytes", r.buf.len())));
    }
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::Batch(format!("truncated at {what}")));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}
