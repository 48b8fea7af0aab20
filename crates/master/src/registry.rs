//! The registry: a folder of images in the master's data dir (seed 000).
//!
//! An image is a file, named by its file name. Minions fetch it whole and
//! check it against its BLAKE3 hash; hashes are cached by (size, mtime) so a
//! thousand deploys of one image hash it once.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use phoenix_model::spec::check_image_name;

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

pub struct Registry {
    dir: PathBuf,
    /// Every image's chunks, stored once (`DATA_DIR/chunks`), and the
    /// indexes (`DATA_DIR/indexes/<file hash>.json`) minions fetch by.
    chunks: phoenix_chunks::ChunkStore,
    indexes_dir: PathBuf,
    /// One indexing at a time: two minions asking for a new image at once
    /// must not both chunk it and race on its index file.
    indexing: Mutex<()>,
    /// name → (size, mtime, hash).
    hashes: Mutex<HashMap<String, (u64, SystemTime, String)>>,
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
        Ok(Registry {
            chunks,
            indexes_dir,
            indexing: Mutex::new(()),
            dir,
            hashes: Mutex::new(HashMap::new()),
        })
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

    /// Opens an image and tells its hash and size (blocking: it may hash).
    pub fn open_image(&self, name: &str) -> Result<(File, ImageRef), RegistryError> {
        let path = self.path(name)?;
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RegistryError::Missing {
                    name: name.to_owned(),
                    dir: self.dir.display().to_string(),
                });
            }
            Err(e) => return Err(Self::io(&path)(e)),
        };
        let meta = file.metadata().map_err(Self::io(&path))?;
        if !meta.is_file() {
            return Err(RegistryError::Missing {
                name: name.to_owned(),
                dir: self.dir.display().to_string(),
            });
        }
        let mtime = meta.modified().map_err(Self::io(&path))?;
        let size = meta.len();
        let cached = self
            .hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .filter(|(s, m, _)| *s == size && *m == mtime)
            .map(|(_, _, h)| h.clone());
        let hash = match cached {
            Some(h) => h,
            None => {
                let h = hash_reader(&mut file).map_err(Self::io(&path))?;
                io::Seek::rewind(&mut file).map_err(Self::io(&path))?;
                self.hashes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_owned(), (size, mtime, h.clone()));
                h
            }
        };
        Ok((file, ImageRef { hash, size }))
    }

    /// The hash and size of an image (blocking).
    pub fn resolve(&self, name: &str) -> Result<ImageRef, RegistryError> {
        self.open_image(name).map(|(_, r)| r)
    }

    /// The index of image `name` whose whole-file hash is `hash`, chunking
    /// and storing it the first time (blocking).
    pub fn index(&self, name: &str, hash: &str) -> Result<phoenix_chunks::Index, RegistryError> {
        if !phoenix_chunks::is_hash(hash) {
            return Err(RegistryError::Changed {
                name: name.to_owned(),
            });
        }
        let saved = self.indexes_dir.join(format!("{hash}.json"));
        let _one_at_a_time = self.indexing.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(text) = std::fs::read_to_string(&saved)
            && let Ok(index) = phoenix_chunks::Index::from_json(&text)
            && index.chunks.iter().all(|c| self.chunks.has(&c.hash))
        {
            return Ok(index);
        }
        let path = self.path(name)?;
        let index = self
            .chunks
            .import_file(&path)
            .map_err(|e| RegistryError::Chunks(e.to_string()))?;
        if index.file_hash != hash {
            return Err(RegistryError::Changed {
                name: name.to_owned(),
            });
        }
        let tmp = self.indexes_dir.join(format!(".{hash}.tmp"));
        std::fs::write(&tmp, index.to_json())
            .and_then(|()| std::fs::rename(&tmp, &saved))
            .map_err(Self::io(&saved))?;
        Ok(index)
    }

    /// A zstd batch of the given chunks, for the wire (blocking).
    pub fn chunk_batch(&self, hashes: &[String]) -> Result<Vec<u8>, RegistryError> {
        let refs: Vec<&str> = hashes.iter().map(String::as_str).collect();
        phoenix_chunks::encode_batch(&self.chunks, &refs)
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

    pub fn commit(&self, tmp: &Path, name: &str) -> Result<ImageRef, RegistryError> {
        let path = self.path(name)?;
        let mut f = File::open(tmp).map_err(Self::io(tmp))?;
        f.sync_all().map_err(Self::io(tmp))?;
        let hash = hash_reader(&mut f).map_err(Self::io(tmp))?;
        let size = f.metadata().map_err(Self::io(tmp))?.len();
        std::fs::rename(tmp, &path).map_err(Self::io(&path))?;
        Ok(ImageRef { hash, size })
    }
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
}
