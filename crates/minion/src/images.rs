//! The minion's image cache: files named by their BLAKE3 hash.
//!
//! A missing image is fetched whole from the master over its own link
//! connection, hashed while it is written to a temporary file, and renamed
//! into place only when the hash matches, so a half-fetched or corrupt image
//! is never run. Services sharing an image fetch it once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phoenix_model::proto::{Assignment, MAX_FRAME, ToMaster, ToMinion, read_frame, write_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct ImageCache {
    pub dir: PathBuf,
    pub master: SocketAddr,
    pub node: String,
    pub key: String,
    /// One lock per hash being fetched.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageCache {
    pub fn new(dir: PathBuf, master: SocketAddr, node: String, key: String) -> Self {
        ImageCache {
            dir,
            master,
            node,
            key,
            fetching: Mutex::default(),
        }
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
        let req = ToMaster::Fetch {
            name: self.node.clone(),
            key: self.key.clone(),
            image: image.clone(),
            hash: a.image_hash.clone(),
        };
        write_frame(&mut s, &req).await.map_err(|e| ctx(&e))?;
        let size = match read_frame::<_, ToMinion>(&mut s, MAX_FRAME)
            .await
            .map_err(|e| ctx(&e))?
        {
            Some(ToMinion::Image { size, .. }) => size,
            Some(ToMinion::Refused { reason }) => return Err(ctx(&reason)),
            other => return Err(ctx(&format!("unexpected answer {other:?}"))),
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| ctx(&e))?;
        let tmp = self.dir.join(format!(".fetch-{}", a.image_hash));
        let result = async {
            let mut out = tokio::fs::File::create(&tmp).await?;
            let mut hasher = blake3::Hasher::new();
            let mut left = size;
            let mut buf = vec![0u8; 64 << 10];
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = s.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("connection ended {left} bytes short"),
                    ));
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            out.sync_all().await?;
            Ok(hasher.finalize().to_hex().to_string())
        }
        .await;
        let hash = match result {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(ctx(&e));
            }
        };
        if hash != a.image_hash {
            let _ = std::fs::remove_file(&tmp);
            return Err(ctx(&format!(
                "hash mismatch: expected {}, got {hash}",
                a.image_hash
            )));
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| ctx(&e))?;
        std::fs::rename(&tmp, self.path(&a.image_hash)).map_err(|e| ctx(&e))?;
        tracing::info!(image = %image, size, "image fetched");
        Ok(())
    }
}
