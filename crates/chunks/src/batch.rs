//! Chunk batches for the wire.
//!
//! Before compression a batch is: the magic `PXCHUNK2`, a big-endian `u32`
//! chunk count, then per chunk its raw 32-byte BLAKE3 hash and a kind byte:
//! - `0`: a big-endian `u32` length and the data;
//! - `1`: a delta: the 32-byte hash of a base chunk the receiver holds, the
//!   data's `u32` length, then a `u32` length and the data compressed by
//!   zstd with the base as its dictionary. A chunk with a few bytes edited
//!   costs a few dozen bytes instead of its whole size.
//!
//! The whole batch is zstd-compressed. Decoding refuses a batch that
//! decompresses to more than [`MAX_BATCH_BYTES`], is truncated or has
//! trailing bytes, names a base it cannot read, or holds a chunk whose data
//! does not hash to its name.

use crate::{ChunkStore, Error, Result, check_hash, hash_hex};
use std::io::Read;

const MAGIC: &[u8; 8] = b"PXCHUNK2";

/// The largest batch (uncompressed) that is encoded or accepted.
pub const MAX_BATCH_BYTES: usize = 256 << 20;

/// The largest chunk a delta may expand to.
const MAX_CHUNK_BYTES: usize = 16 << 20;

const ZSTD_LEVEL: i32 = 3;

const RAW: u8 = 0;
const DELTA: u8 = 1;

fn raw_hash(hash: &str) -> Result<[u8; 32]> {
    let mut bin = [0u8; 32];
    hex::decode_to_slice(hash, &mut bin).map_err(|_| Error::InvalidHash(hash.to_string()))?;
    Ok(bin)
}

fn len_u32(n: usize, what: &str) -> Result<[u8; 4]> {
    u32::try_from(n)
        .map(u32::to_be_bytes)
        .map_err(|_| Error::Batch(format!("{what}: {n} bytes")))
}

/// Encodes chunks `hashes` from `store` (each verified as it is read) into
/// one zstd-compressed batch.
pub fn encode_batch(store: &ChunkStore, hashes: &[&str]) -> Result<Vec<u8>> {
    let plain: Vec<(&str, Option<&str>)> = hashes.iter().map(|h| (*h, None)).collect();
    encode_batch_with_bases(store, &plain)
}

/// [`encode_batch`], where a chunk may name a base chunk the receiver
/// holds: if `store` has the base too and the delta is smaller, the chunk
/// goes as a delta against it.
pub fn encode_batch_with_bases(
    store: &ChunkStore,
    chunks: &[(&str, Option<&str>)],
) -> Result<Vec<u8>> {
    let count = u32::try_from(chunks.len())
        .map_err(|_| Error::Batch(format!("{} chunks in one batch", chunks.len())))?;
    let mut raw = Vec::new();
    raw.extend_from_slice(MAGIC);
    raw.extend_from_slice(&count.to_be_bytes());
    for (hash, base) in chunks {
        let data = store.get(hash)?;
        raw.extend_from_slice(&raw_hash(hash)?);
        let delta = base
            .filter(|b| b != hash && store.has(b))
            .and_then(|b| Some((b, store.get(b).ok()?)))
            .and_then(|(b, base_data)| {
                let mut z = zstd::bulk::Compressor::with_dictionary(ZSTD_LEVEL, &base_data).ok()?;
                let packed = z.compress(&data).ok()?;
                (packed.len() < data.len() / 2).then_some((b, packed))
            });
        match delta {
            Some((b, packed)) => {
                raw.push(DELTA);
                raw.extend_from_slice(&raw_hash(b)?);
                raw.extend_from_slice(&len_u32(data.len(), hash)?);
                raw.extend_from_slice(&len_u32(packed.len(), hash)?);
                raw.extend_from_slice(&packed);
            }
            None => {
                raw.push(RAW);
                raw.extend_from_slice(&len_u32(data.len(), hash)?);
                raw.extend_from_slice(&data);
            }
        }
        if raw.len() > MAX_BATCH_BYTES {
            return Err(Error::Batch(format!(
                "more than {MAX_BATCH_BYTES} bytes at chunk {hash}; split the batch"
            )));
        }
    }
    zstd::stream::encode_all(&raw[..], ZSTD_LEVEL).map_err(|e| Error::Batch(format!("zstd: {e}")))
}

/// Decodes a batch into `(hash, data)` pairs, each verified. A batch with
/// deltas needs [`decode_batch_with_bases`].
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    decode(bytes, None)
}

/// [`decode_batch`], reading each delta's base with `base`.
pub fn decode_batch_with_bases(
    bytes: &[u8],
    base: impl Fn(&str) -> Result<Vec<u8>>,
) -> Result<Vec<(String, Vec<u8>)>> {
    decode(bytes, Some(&base))
}

type BaseReader<'a> = &'a dyn Fn(&str) -> Result<Vec<u8>>;

fn decode(bytes: &[u8], base_of: Option<BaseReader<'_>>) -> Result<Vec<(String, Vec<u8>)>> {
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
        check_hash(&hash)?;
        let data = match r.take(1, "kind")?[0] {
            RAW => {
                let len = r.u32("length")? as usize;
                r.take(len, "data")?.to_vec()
            }
            DELTA => {
                let base = hex::encode(r.take(32, "base")?);
                let len = r.u32("length")? as usize;
                let packed_len = r.u32("delta length")? as usize;
                let packed = r.take(packed_len, "delta")?;
                if len > MAX_CHUNK_BYTES {
                    return Err(Error::Batch(format!("chunk {i}: {len} bytes")));
                }
                let base_of = base_of.ok_or_else(|| {
                    Error::Batch(format!("chunk {i} is a delta and no base was given"))
                })?;
                let base_data = base_of(&base)?;
                let mut z = zstd::bulk::Decompressor::with_dictionary(&base_data)
                    .map_err(|e| Error::Batch(format!("zstd: {e}")))?;
                let data = z
                    .decompress(packed, len)
                    .map_err(|e| Error::Batch(format!("chunk {i} against {base}: zstd: {e}")))?;
                if data.len() != len {
                    return Err(Error::Batch(format!(
                        "chunk {i} expands to {} bytes, not {len}",
                        data.len()
                    )));
                }
                data
            }
            other => return Err(Error::Batch(format!("chunk {i}: unknown kind {other}"))),
        };
        let actual = hash_hex(&data);
        if actual != hash {
            return Err(Error::Batch(format!(
                "chunk {i} named {hash} hashes to {actual}"
            )));
        }
        out.push((hash, data));
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
