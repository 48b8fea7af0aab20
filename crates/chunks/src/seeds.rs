//! Chunks inside whole files already on disk.
//!
//! A minion holds every image it has assembled; the chunks of those files
//! need no second copy in the store. [`Seeds`] maps each chunk hash to a
//! place in such a file, and reads it from there, verified like a stored
//! chunk (a file damaged on disk gives [`Error::CorruptChunk`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Error, Index, Result, hash_hex, io_err};

/// Chunk hash → (file, offset, length) in files described by their indexes.
#[derive(Debug, Clone, Default)]
pub struct Seeds {
    map: HashMap<String, (Arc<Path>, u64, u32)>,
}

impl Seeds {
    /// Adds the chunks of the file at `path`, which `index` describes.
    pub fn add(&mut self, path: impl Into<PathBuf>, index: &Index) {
        let path: Arc<Path> = Arc::from(path.into());
        for c in &index.chunks {
            self.map
                .entry(c.hash.clone())
                .or_insert_with(|| (path.clone(), c.offset, c.len));
        }
    }

    pub fn has(&self, hash: &str) -> bool {
        self.map.contains_key(hash)
    }

    /// Stops offering `hash` (found damaged in its file).
    pub fn forget(&mut self, hash: &str) {
        self.map.remove(hash);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Reads chunk `hash` from its file, verified; `None` if no file has it.
    pub fn get(&self, hash: &str) -> Option<Result<Vec<u8>>> {
        let (path, offset, len) = self.map.get(hash)?;
        Some(read_at(path, *offset, *len).and_then(|data| {
            let actual = hash_hex(&data);
            if actual == hash {
                Ok(data)
            } else {
                Err(Error::CorruptChunk {
                    hash: hash.to_string(),
                    actual,
                    path: path.to_path_buf(),
                })
            }
        }))
    }
}

fn read_at(path: &Path, offset: u64, len: u32) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, offset)
        .map_err(|e| io_err(path, e))?;
    Ok(data)
}
