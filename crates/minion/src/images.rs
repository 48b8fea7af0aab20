//! The minion's image cache: files named by their BLAKE3 hash.
//!
//! A missing image is synced from the master over a link connection of its
//! own: first its index (the ordered chunk list, `phoenix-chunks`), then only
//! the chunks this minion lacks, in zstd batches, each verified against its
//! hash. The file is assembled beside its place, checked against the whole
//! file's hash, and renamed into place, so a half-fetched or corrupt image is
//! never run. Services sharing an image fetch it once; a new version costs
//! only its changed chunks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phoenix_chunks::Index;
use phoenix_model::proto::{Assignment, MAX_FRAME, ToMaster, ToMinion, read_frame, write_frame};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Chunks asked for per round trip (about 8 MiB at the 128 KiB average).
const BATCH_CHUNKS: usize = 64;

pub struct ImageCache {
    pub dir: PathBuf,
    /// Chunks of every image fetched, stored once (`DATA_DIR/chunks`).
    chunks: phoenix_chunks::ChunkStore,
    fetched: std::sync::atomic::AtomicU64,
    pub master: SocketAddr,
    pub node: String,
    pub key: String,
    /// One lock per hash being fetched.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageCache {
    pub fn new(
        dir: PathBuf,
        master: SocketAddr,
        node: String,
        key: String,
    ) -> Result<Self, String> {
        let chunks_dir = dir
            .parent()
            .map(|p| p.join("chunks"))
            .unwrap_or_else(|| dir.join("chunks"));
        let chunks = phoenix_chunks::ChunkStore::open(&chunks_dir).map_err(|e| e.to_string())?;
        Ok(ImageCache {
            chunks,
            fetched: Default::default(),
            dir,
            master,
            node,
            key,
            fetching: Mutex::default(),
        })
    }

    pub fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(hash)
    }

    /// The path of the assignment's image, fetching it first if needed.
    pub async fn ensure(&self, a: &Assignment) -> Result<PathBuf, String> {
        let path = self.path(&a.image_hash);
        if path.exists() {
            return Ok(path);
        }
        let lock = self
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(a.image_hash.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if path.exists() {
            return Ok(path);
        }
        let result = tokio::time::timeout(Duration::from_secs(600), self.fetch(a)).await;
        self.fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&a.image_hash);
        match result {
            Ok(r) => r.map(|()| path),
            Err(_) => Err(format!(
                "fetching image {:?} took over 10 minutes",
                a.spec.image
            )),
        }
    }

    async fn fetch(&self, a: &Assignment) -> Result<(), String> {
        let image = &a.spec.registry_file().0;
        let ctx = |e: &dyn std::fmt::Display| {
            format!(
                "fetching image {image:?} from the master at {}: {e}",
                self.master
            )
        };
        let mut s = TcpStream::connect(self.master).await.map_err(|e| ctx(&e))?;
        let req = ToMaster::FetchIndex {
            name: self.node.clone(),
            key: self.key.clone(),
            image: image.clone(),
            hash: a.image_hash.clone(),
        };
        write_frame(&mut s, &req).await.map_err(|e| ctx(&e))?;
        let index = match read_frame::<_, ToMinion>(&mut s, MAX_FRAME)
            .await
            .map_err(|e| ctx(&e))?
        {
            Some(ToMinion::Index { index }) => Index::from_json(&index).map_err(|e| ctx(&e))?,
            Some(ToMinion::Refused { reason }) => return Err(ctx(&reason)),
            other => return Err(ctx(&format!("unexpected answer {other:?}"))),
        };
        if index.file_hash != a.image_hash {
            return Err(ctx(&format!(
                "the master sent the index of {}, not {}",
                index.file_hash, a.image_hash
            )));
        }
        // Only the chunks we lack cross the wire, in batches; chunks from an
        // interrupted fetch are kept, so a retry resumes. A chunk found
        // corrupt while assembling is dropped and fetched once more.
        let mut moved = 0u64;
        let assembled_at = self.dir.join(format!(".assemble-{}", a.image_hash));
        for attempt in 0..2 {
            let missing = self.chunks.missing(&index);
            for batch in missing.chunks(BATCH_CHUNKS) {
                let hashes: Vec<String> = batch.iter().map(|c| c.hash.clone()).collect();
                write_frame(&mut s, &ToMaster::FetchChunks { hashes })
                    .await
                    .map_err(|e| ctx(&e))?;
                let size = match read_frame::<_, ToMinion>(&mut s, MAX_FRAME)
                    .await
                    .map_err(|e| ctx(&e))?
                {
                    Some(ToMinion::Chunks { size })
                        if size <= phoenix_chunks::MAX_BATCH_BYTES as u64 =>
                    {
                        size
                    }
                    Some(ToMinion::Refused { reason }) => return Err(ctx(&reason)),
                    other => return Err(ctx(&format!("unexpected answer {other:?}"))),
                };
                let mut data = vec![0u8; size as usize];
                s.read_exact(&mut data).await.map_err(|e| ctx(&e))?;
                moved += size;
                let store = self.chunks.clone();
                tokio::task::spawn_blocking(move || -> Result<(), phoenix_chunks::Error> {
                    for (hash, chunk) in phoenix_chunks::decode_batch(&data)? {
                        store.insert_expecting(&hash, &chunk)?;
                    }
                    Ok(())
                })
                .await
                .map_err(|e| ctx(&e))?
                .map_err(|e| ctx(&e))?;
            }
            let store = self.chunks.clone();
            let (idx, tmp) = (index.clone(), assembled_at.clone());
            let assembled = tokio::task::spawn_blocking(move || store.assemble(&idx, &tmp))
                .await
                .map_err(|e| ctx(&e))?;
            match assembled {
                Ok(()) => break,
                Err(phoenix_chunks::Error::CorruptChunk { hash, .. }) if attempt == 0 => {
                    tracing::warn!(image = %image, chunk = %hash, "corrupt chunk in the cache; fetching it again");
                    let _ = self.chunks.remove(&hash);
                }
                Err(e) => return Err(ctx(&e)),
            }
        }
        self.fetched
            .fetch_add(moved, std::sync::atomic::Ordering::Relaxed);
        let tmp = assembled_at;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| ctx(&e))?;
        std::fs::rename(&tmp, self.path(&a.image_hash)).map_err(|e| ctx(&e))?;
        tracing::info!(image = %image, size = index.size, moved, "image synced");
        Ok(())
    }

    /// Bytes of chunk batches received since the minion started.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }
}
