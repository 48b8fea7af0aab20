//! The minion's image cache: files named by their BLAKE3 hash.
//!
//! The master sends its catalog (every registry image) on connect and on
//! every change; [`ImageCache::prefetch`] fetches what this minion lacks, the images of
//! its own services first, so a deploy finds its image already here. An
//! image is synced over a link connection of its own: first its index (the
//! ordered chunk list, `phoenix-chunks`, saved in `DATA_DIR/indexes`), then
//! only the chunks this minion lacks, in zstd batches, each verified against
//! its hash. The file is assembled beside its place, checked against the
//! whole file's hash, and renamed into place, so a half-fetched or corrupt
//! image is never run. Chunks of an interrupted fetch are kept, so the next
//! try resumes; a new version costs only its changed chunks.
//!
//! After each pass over the catalog, [`ImageCache::collect`] deletes images,
//! indexes and chunks that are neither in the catalog nor used by a service
//! in the desired set.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phoenix_chunks::{Index, Seeds};
use phoenix_model::proto::{
    CatalogEntry, Fetching, ImageSync, MAX_FRAME, ToMaster, ToMinion, read_frame, write_frame,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use phoenix_host::Host;
use phoenix_model::lock;

use crate::backoff::Backoff;

/// Chunks asked for per round trip (about 8 MiB at the 128 KiB average).
const BATCH_CHUNKS: usize = 64;

/// Room left free on the minion's disk beyond what an image needs.
const MARGIN: u64 = 8 << 20;

/// A failed fetch is tried again after this long at most (or on the next
/// catalog or desired set).
pub const RETRY: Duration = Duration::from_secs(30);
/// The first wait before trying a failed pre-fetch again; it doubles up to
/// [`RETRY`] while fetches keep failing.
const RETRY_FIRST: Duration = Duration::from_secs(2);

pub struct ImageCache {
    pub dir: PathBuf,
    /// Chunks of every image fetched, stored once (`DATA_DIR/chunks`).
    chunks: phoenix_chunks::ChunkStore,
    /// Indexes of the images held or being fetched (`DATA_DIR/indexes`).
    indexes_dir: PathBuf,
    fetched: std::sync::atomic::AtomicU64,
    pub master: SocketAddr,
    pub node: String,
    pub key: String,
    /// One lock per hash being fetched.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Fetches hold it shared, a collection exclusively: chunks that a
    /// fetch has stored but not yet used are never collected.
    collecting: tokio::sync::RwLock<()>,
    /// The master's catalog (`None` until the first one arrives, so that
    /// nothing is collected on the strength of an empty list).
    catalog: Mutex<Option<Vec<CatalogEntry>>>,
    /// Registry name → the hash it had before the catalog last changed it:
    /// the version whose chunks serve as delta bases for the new one.
    previous: Mutex<HashMap<String, String>>,
    /// Chunks found damaged inside held image files: not read from there.
    damaged: Mutex<HashSet<String>>,
    /// Images the desired set uses: hash → registry file name.
    wanted: Mutex<BTreeMap<String, String>>,
    /// What the master is told (`ToMaster::Images`).
    sync: tokio::sync::watch::Sender<ImageSync>,
    /// Wakes [`ImageCache::prefetch`] (catalog or desired set changed).
    wake: tokio::sync::Notify,
    /// What pre-caching leaves free (`None`: a tenth of the disk, ≤ 1 GiB).
    keep_free: Option<u64>,
    /// Where free disk space is asked.
    host: Arc<dyn Host>,
}

impl ImageCache {
    pub fn new(
        dir: PathBuf,
        master: SocketAddr,
        node: String,
        key: String,
        keep_free: Option<u64>,
    ) -> Result<Self, String> {
        let data = dir.parent().map_or_else(|| dir.clone(), Path::to_owned);
        let chunks =
            phoenix_chunks::ChunkStore::open(data.join("chunks")).map_err(|e| e.to_string())?;
        let indexes_dir = data.join("indexes");
        std::fs::create_dir_all(&indexes_dir)
            .map_err(|e| format!("{}: {e}", indexes_dir.display()))?;
        let cache = ImageCache {
            chunks,
            indexes_dir,
            fetched: Default::default(),
            dir,
            master,
            node,
            key,
            fetching: Mutex::default(),
            collecting: tokio::sync::RwLock::new(()),
            catalog: Mutex::new(None),
            previous: Mutex::default(),
            damaged: Mutex::default(),
            wanted: Mutex::default(),
            sync: tokio::sync::watch::Sender::new(ImageSync::default()),
            wake: tokio::sync::Notify::new(),
            keep_free,
            host: Arc::new(phoenix_host::Linux),
        };
        cache.sync.send_modify(|s| s.held = cache.held());
        Ok(cache)
    }

    pub fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(hash)
    }

    /// Hashes of the complete images in the cache.
    fn held(&self) -> Vec<String> {
        let mut held: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| phoenix_chunks::is_hash(n))
                    .collect()
            })
            .unwrap_or_default();
        held.sort();
        held
    }

    /// Keeps collections off while the guard lives.
    pub async fn hold(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.collecting.read().await
    }

    /// Subscribes to the cache's state, as reported to the master.
    pub fn sync_state(&self) -> tokio::sync::watch::Receiver<ImageSync> {
        self.sync.subscribe()
    }

    /// Takes the master's catalog and fetches what is missing.
    pub fn set_catalog(&self, images: Vec<CatalogEntry>) {
        let mut catalog = lock(&self.catalog);
        if let Some(old) = catalog.as_ref() {
            let mut previous = lock(&self.previous);
            for e in &images {
                if let Some(o) = old.iter().find(|o| o.name == e.name && o.hash != e.hash) {
                    previous.insert(e.name.clone(), o.hash.clone());
                }
            }
        }
        *catalog = Some(images);
        drop(catalog);
        self.wake.notify_one();
    }

    /// Takes the images the desired set uses (hash → registry file name).
    pub fn set_wanted(&self, wanted: BTreeMap<String, String>) {
        let mut w = lock(&self.wanted);
        if *w != wanted {
            *w = wanted;
            drop(w);
            self.wake.notify_one();
        }
    }

    /// The image file with this hash, fetching it first if needed.
    pub async fn ensure(&self, name: &str, hash: &str) -> Result<PathBuf, String> {
        self.ensure_leaving(name, hash, MARGIN).await
    }

    /// [`Self::ensure`], refusing to leave less than `reserve` bytes free.
    async fn ensure_leaving(
        &self,
        name: &str,
        hash: &str,
        reserve: u64,
    ) -> Result<PathBuf, String> {
        let path = self.path(hash);
        if path.exists() {
            return Ok(path);
        }
        let one = lock(&self.fetching)
            .entry(hash.to_owned())
            .or_default()
            .clone();
        let _guard = one.lock().await;
        if path.exists() {
            return Ok(path);
        }
        let result = {
            let _no_collection = self.collecting.read().await;
            tokio::time::timeout(Duration::from_secs(600), self.fetch(name, hash, reserve)).await
        };
        lock(&self.fetching).remove(hash);
        let result = match result {
            Ok(r) => r.map(|()| path),
            Err(_) => Err(format!("fetching image {name:?} took over 10 minutes")),
        };
        self.sync.send_modify(|s| {
            s.fetching = None;
            match &result {
                Ok(_) => {
                    s.failed.remove(hash);
                    if !s.held.iter().any(|h| h == hash) {
                        s.held.push(hash.to_owned());
                        s.held.sort();
                    }
                }
                Err(e) => {
                    s.failed.insert(hash.to_owned(), e.clone());
                }
            }
        });
        result
    }

    async fn fetch(&self, image: &str, hash: &str, reserve: u64) -> Result<(), String> {
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
            image: image.to_owned(),
            hash: hash.to_owned(),
        };
        write_frame(&mut s, &req).await.map_err(|e| ctx(&e))?;
        let (index, json) = match read_frame::<_, ToMinion>(&mut s, MAX_FRAME)
            .await
            .map_err(|e| ctx(&e))?
        {
            Some(ToMinion::Index { size }) if size <= MAX_FRAME as u64 => {
                let mut bytes = vec![0u8; size as usize];
                s.read_exact(&mut bytes).await.map_err(|e| ctx(&e))?;
                self.fetched
                    .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
                let index = Index::from_bytes(&bytes).map_err(|e| ctx(&e))?;
                let json = index.to_json();
                (index, json)
            }
            Some(ToMinion::Refused { reason }) => return Err(ctx(&reason)),
            other => return Err(ctx(&format!("unexpected answer {other:?}"))),
        };
        if index.file_hash != hash {
            return Err(ctx(&format!(
                "the master sent the index of {}, not {hash}",
                index.file_hash
            )));
        }
        // Saved first: its chunks are then kept by a collection even if
        // this fetch is cut off, and the next one resumes from them.
        let saved = self.indexes_dir.join(format!("{hash}.json"));
        phoenix_host::fs::write_atomic(&saved, json.as_bytes())
            .map_err(std::io::Error::from)
            .map_err(|e| {
                if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                    ctx(&self.full_disk(index.size, 0))
                } else {
                    ctx(&e)
                }
            })?;
        // Only the chunks we lack cross the wire, in batches. A chunk
        // found corrupt while assembling is dropped and fetched once more.
        let mut moved = 0u64;
        let assembled_at = self.dir.join(format!(".assemble-{hash}"));
        // Chunks this fetch added: on a full disk they go again, so that
        // the services here keep room for their logs and state.
        let mut added: Vec<String> = Vec::new();
        let full = |added: &[String], need: u64| {
            for h in added {
                let _ = self.chunks.remove(h);
            }
            let _ = std::fs::remove_file(&assembled_at);
            ctx(&self.full_disk(need, 0))
        };
        for attempt in 0..2 {
            // Chunks of the images already here are read from their files.
            let seeds = Arc::new(self.seeds());
            let missing = self.chunks.missing_with(&index, &seeds);
            let total: u64 = missing.iter().map(|c| u64::from(c.len)).sum();
            let bases = self.bases(image, &index, &seeds);
            // The missing chunks, then the assembled file: refuse at once
            // what cannot fit rather than fill the disk first.
            let need = total + index.size;
            let free = self.disk_free();
            tracing::debug!(image, need, ?free, "fetching chunks");
            if free.is_some_and(|free| free < need + reserve) {
                let _ = std::fs::remove_file(&assembled_at);
                return Err(ctx(&self.full_disk(need, reserve)));
            }
            let mut done = 0u64;
            let progress = |done: u64| {
                self.sync.send_modify(|st| {
                    st.fetching = Some(Fetching {
                        hash: hash.to_owned(),
                        done,
                        total,
                    });
                });
            };
            progress(0);
            // Two requests in flight: the master reads and packs the next
            // batch while this one crosses the wire and is stored, and a
            // batch is stored while the next one arrives.
            let batches: Vec<&[phoenix_chunks::ChunkRef]> = missing.chunks(BATCH_CHUNKS).collect();
            let request = |k: usize| {
                let hashes: Vec<String> = batches[k].iter().map(|c| c.hash.clone()).collect();
                let bases = hashes.iter().map(|h| bases.get(h).cloned()).collect();
                ToMaster::FetchChunks { hashes, bases }
            };
            let mut sent = 0;
            while sent < batches.len().min(2) {
                write_frame(&mut s, &request(sent))
                    .await
                    .map_err(|e| ctx(&e))?;
                sent += 1;
            }
            let mut storing: Option<(tokio::task::JoinHandle<Stored>, u64)> = None;
            // One round more than batches: the last one stores the last batch.
            for k in 0..=batches.len() {
                let arrived = match batches.get(k) {
                    Some(batch) => {
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
                        self.fetched
                            .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
                        if sent < batches.len() {
                            write_frame(&mut s, &request(sent))
                                .await
                                .map_err(|e| ctx(&e))?;
                            sent += 1;
                        }
                        let bytes = batch.iter().map(|c| u64::from(c.len)).sum::<u64>();
                        Some((data, bytes))
                    }
                    None => None,
                };
                if let Some((task, bytes)) = storing.take() {
                    let stored = task.await.map_err(|e| ctx(&e))?;
                    self.absorb(stored, &mut added).map_err(|e| match e {
                        Absorb::Full => full(&added, need),
                        Absorb::Other(e) => ctx(&e),
                    })?;
                    done += bytes;
                    progress(done);
                }
                if let Some((data, bytes)) = arrived {
                    let (store, seeds) = (self.chunks.clone(), seeds.clone());
                    let task =
                        tokio::task::spawn_blocking(move || store_batch(&store, &seeds, &data));
                    storing = Some((task, bytes));
                }
            }
            let store = self.chunks.clone();
            let (idx, tmp) = (index.clone(), assembled_at.clone());
            let assembled =
                tokio::task::spawn_blocking(move || store.assemble_with(&idx, &tmp, &seeds))
                    .await
                    .map_err(|e| ctx(&e))?;
            match assembled {
                Ok(()) => break,
                Err(phoenix_chunks::Error::CorruptChunk { hash, .. }) if attempt == 0 => {
                    tracing::warn!(image = %image, chunk = %hash, "corrupt chunk in the cache; fetching it again");
                    self.damaged(&hash);
                }
                Err(phoenix_chunks::Error::DiskFull { .. }) => {
                    return Err(full(&added, index.size));
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&assembled_at);
                    return Err(ctx(&e));
                }
            }
        }
        let tmp = assembled_at;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .and_then(|()| std::fs::rename(&tmp, self.path(hash)))
            // The rename is an entry in the directory: without this a crash
            // could lose it (the file's data was synced when assembled).
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all())
            .map_err(|e| ctx(&e))?;
        tracing::info!(image = %image, size = index.size, moved, "image synced");
        Ok(())
    }

    /// Takes in what a stored batch added; a damaged delta base is dropped,
    /// so the next try fetches that chunk whole.
    fn absorb(&self, stored: Stored, added: &mut Vec<String>) -> Result<(), Absorb> {
        added.extend(stored.0);
        match stored.1 {
            Ok(()) => Ok(()),
            Err(phoenix_chunks::Error::DiskFull { .. }) => Err(Absorb::Full),
            Err(e) => {
                if let phoenix_chunks::Error::CorruptChunk { hash, .. } = &e {
                    self.damaged(hash);
                }
                Err(Absorb::Other(e.to_string()))
            }
        }
    }

    /// The chunks inside the images this minion holds (from their saved
    /// indexes), less any found damaged.
    fn seeds(&self) -> Seeds {
        let damaged = lock(&self.damaged).clone();
        let mut seeds = Seeds::default();
        for hash in self.held() {
            let index = std::fs::read_to_string(self.indexes_dir.join(format!("{hash}.json")))
                .ok()
                .and_then(|t| Index::from_json(&t).ok());
            if let Some(index) = index {
                seeds.add(self.path(&hash), &index);
            }
        }
        for h in &damaged {
            seeds.forget(h);
        }
        seeds
    }

    /// A chunk read damaged (from the store or from an image file): it is
    /// fetched again rather than read from there.
    fn damaged(&self, hash: &str) {
        let _ = self.chunks.remove(hash);
        lock(&self.damaged).insert(hash.to_owned());
    }

    /// For each chunk of `index` this minion lacks, the chunk at its place
    /// in the version of `image` it had before, if it still has that: the
    /// base the master may send a delta against.
    fn bases(&self, image: &str, index: &Index, seeds: &Seeds) -> HashMap<String, String> {
        let Some(old) = lock(&self.previous)
            .get(image)
            .and_then(|h| std::fs::read_to_string(self.indexes_dir.join(format!("{h}.json"))).ok())
            .and_then(|t| Index::from_json(&t).ok())
        else {
            return HashMap::new();
        };
        let old_hashes: Vec<&str> = old.chunks.iter().map(|c| c.hash.as_str()).collect();
        let mut bases = HashMap::new();
        for (c, base) in index
            .chunks
            .iter()
            .zip(counterparts(&index.chunks, &old_hashes))
        {
            if let Some(b) = base
                && !seeds.has(&c.hash)
                && !self.chunks.has(&c.hash)
                && (seeds.has(b) || self.chunks.has(b))
            {
                bases.insert(c.hash.clone(), b.to_owned());
            }
        }
        bases
    }

    /// Bytes of chunk batches received since the minion started.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Deletes images, indexes and chunks that are neither in the
    /// master's catalog nor used by the desired set; nothing before the
    /// first catalog has arrived.
    pub async fn collect(&self) -> Result<phoenix_chunks::GcStats, String> {
        let Some(catalog) = lock(&self.catalog).clone() else {
            return Ok(Default::default());
        };
        let _exclusive = self.collecting.write().await;
        let keep: HashSet<String> = catalog
            .into_iter()
            .map(|e| e.hash)
            .chain(lock(&self.wanted).keys().cloned())
            .collect();
        let (dir, indexes_dir, store) = (
            self.dir.clone(),
            self.indexes_dir.clone(),
            self.chunks.clone(),
        );
        let kept = keep.clone();
        let stats = tokio::task::spawn_blocking(move || collect(&dir, &indexes_dir, &store, &keep))
            .await
            .map_err(|e| e.to_string())??;
        let held = self.held();
        self.sync.send_if_modified(|s| {
            let before = (s.held.len(), s.failed.len());
            // Failures of images nobody wants any more are forgotten.
            s.failed.retain(|h, _| kept.contains(h));
            s.held = held;
            before != (s.held.len(), s.failed.len())
        });
        Ok(stats)
    }
}

/// The chunks a batch added to the store, and how storing it ended.
type Stored = (Vec<String>, Result<(), phoenix_chunks::Error>);

enum Absorb {
    Full,
    Other(String),
}

/// Decodes a batch (deltas against chunks in `store`) and stores its
/// chunks (blocking).
fn store_batch(store: &phoenix_chunks::ChunkStore, seeds: &Seeds, data: &[u8]) -> Stored {
    let mut stored = Vec::new();
    let decoded =
        match phoenix_chunks::decode_batch_with_bases(data, |h| store.get_or_seed(h, seeds)) {
            Ok(d) => d,
            Err(e) => return (stored, Err(e)),
        };
    for (hash, chunk) in decoded {
        match store.insert_expecting(&hash, &chunk) {
            Ok(i) if i.stored => stored.push(hash),
            Ok(_) => {}
            Err(e) => return (stored, Err(e)),
        }
    }
    (stored, Ok(()))
}

/// For each chunk of `new`, the chunk of `old` at its place: counted from
/// the nearest chunk before it that both versions share (or, failing that,
/// back from the nearest one after it; or, with nothing shared, the same
/// chunk number). An edit replaces a chunk in place and an insertion grows
/// one; either way the old chunk there holds most of the new one's bytes.
/// Linear in the two lengths.
fn counterparts<'a>(new: &[phoenix_chunks::ChunkRef], old: &[&'a str]) -> Vec<Option<&'a str>> {
    let mut at_old: HashMap<&str, usize> = HashMap::with_capacity(old.len());
    for (j, h) in old.iter().enumerate() {
        at_old.entry(*h).or_insert(j);
    }
    let shared: Vec<Option<usize>> = new
        .iter()
        .map(|c| at_old.get(c.hash.as_str()).copied())
        .collect();
    // Nearest shared chunk after each place, as (new index, old index).
    let mut after = vec![None; new.len()];
    let mut next = None;
    for i in (0..new.len()).rev() {
        after[i] = next;
        if let Some(j) = shared[i] {
            next = Some((i, j));
        }
    }
    let mut before: Option<(usize, usize)> = None;
    let mut out = Vec::with_capacity(new.len());
    for i in 0..new.len() {
        let j = match (before, after[i]) {
            (Some((p, j)), _) => Some(j + (i - p)),
            (None, Some((q, k))) => k.checked_sub(q - i),
            (None, None) => Some(i),
        };
        out.push(j.and_then(|j| old.get(j).copied()));
        if let Some(j) = shared[i] {
            before = Some((i, j));
        }
    }
    out
}

/// The blocking part of [`ImageCache::collect`].
fn collect(
    dir: &Path,
    indexes_dir: &Path,
    store: &phoenix_chunks::ChunkStore,
    keep: &HashSet<String>,
) -> Result<phoenix_chunks::GcStats, String> {
    let mut stats = phoenix_chunks::GcStats::default();
    // Images (and leftovers of assemblies cut off), then indexes.
    for entry in std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
    {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let hash = name.strip_prefix(".assemble-").unwrap_or(name);
        if phoenix_chunks::is_hash(hash) && (hash != name || !keep.contains(hash)) {
            let len = entry.metadata().map_or(0, |m| m.len());
            if std::fs::remove_file(entry.path()).is_ok() {
                stats.removed += 1;
                stats.bytes += len;
            }
        }
    }
    // Unpacked root filesystems go with the last image they came from.
    for entry in std::fs::read_dir(dir.join("rootfs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let place = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let used = std::fs::read_dir(&place)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix(crate::driver::oci::ROOTFS_MARK))
                    .is_some_and(|h| keep.contains(h))
            });
        if !used && std::fs::remove_dir_all(&place).is_ok() {
            stats.removed += 1;
        }
    }
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(indexes_dir)
        .map_err(|e| format!("{}: {e}", indexes_dir.display()))?
        .flatten()
    {
        let path = entry.path();
        let name = entry.file_name();
        let Some(hash) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if !keep.contains(hash) {
            let _ = std::fs::remove_file(&path);
        } else if !dir.join(hash).exists()
            && let Ok(index) = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| Index::from_json(&t).map_err(|e| e.to_string()))
        {
            // Not assembled yet (a fetch cut off or failed): its chunks stay
            // for the next try. An assembled image's chunks are read from
            // its file; the store needs no copy.
            kept.push(index);
        }
    }
    let refs: Vec<&Index> = kept.iter().collect();
    let chunks = store.gc(&refs).map_err(|e| e.to_string())?;
    stats.removed += chunks.removed;
    stats.bytes += chunks.bytes;
    Ok(stats)
}

impl ImageCache {
    /// Free bytes (for unprivileged users) on the cache's filesystem.
    fn disk_free(&self) -> Option<u64> {
        self.host.disk_space(&self.dir).ok().map(|d| d.free)
    }

    fn full_disk(&self, need: u64, reserve: u64) -> String {
        let free = self
            .disk_free()
            .map_or_else(|| "?".into(), |b| format!("{} MB", b >> 20));
        let keep = if reserve > 0 {
            format!(" and {} MB must stay free", reserve >> 20)
        } else {
            String::new()
        };
        format!(
            "no space left on the minion's disk: {} has {free} free, this image needs up to {} MB more{keep}; the images already here stay in use",
            self.dir.display(),
            need.div_ceil(1 << 20)
        )
    }

    /// Fetches the catalog's images this minion lacks, those of its own
    /// services first, one at a time; then collects. Runs for the minion's
    /// life; after a pass with a failure it tries again with backoff (or at
    /// once on a new catalog or desired set).
    pub async fn prefetch(&self) {
        let mut retry = Backoff::new(RETRY_FIRST, 2, RETRY);
        loop {
            let todo: Vec<(String, String)> = {
                let wanted = lock(&self.wanted).clone();
                let catalog = lock(&self.catalog).clone().unwrap_or_default();
                let mut todo: Vec<(String, String)> = wanted
                    .into_iter()
                    .map(|(hash, name)| (name, hash))
                    .collect();
                todo.extend(catalog.into_iter().map(|e| (e.name, e.hash)));
                let mut seen = HashSet::new();
                todo.retain(|(_, hash)| seen.insert(hash.clone()) && !self.path(hash).exists());
                todo
            };
            let mut failed = false;
            // Images no service here uses yet are cached only while a tenth
            // of the disk (at most 1 GiB) stays free for the services
            // themselves.
            let reserve = self.keep_free.unwrap_or_else(|| {
                self.host
                    .disk_space(&self.dir)
                    .map_or(MARGIN, |d| (d.total / 10).min(1 << 30))
            });
            let reserve = reserve.max(MARGIN);
            for (name, hash) in &todo {
                let wanted = lock(&self.wanted).contains_key(hash);
                let leave = if wanted { MARGIN } else { reserve };
                if let Err(e) = self.ensure_leaving(name, hash, leave).await {
                    tracing::warn!(image = %name, "pre-fetch: {e}");
                    failed = true;
                }
            }
            match self.collect().await {
                Ok(s) if s.removed > 0 => {
                    tracing::info!(files = s.removed, bytes = s.bytes, "image cache collected");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("image cache collection: {e}"),
            }
            if failed {
                let _ = tokio::time::timeout(retry.next_wait(), self.wake.notified()).await;
            } else {
                retry.reset();
                self.wake.notified().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counterparts_follow_edits_and_insertions() {
        let refs = |names: &[&str]| -> Vec<phoenix_chunks::ChunkRef> {
            names
                .iter()
                .map(|n| phoenix_chunks::ChunkRef {
                    hash: (*n).to_owned(),
                    offset: 0,
                    len: 1,
                })
                .collect()
        };
        // b edited to B; an insertion grew d into D and split it into D1 D2.
        let old = ["a", "b", "c", "d", "e"];
        let new = refs(&["a", "B", "c", "D1", "D2", "e"]);
        let got = counterparts(&new, &old);
        assert_eq!(got[1], Some("b"));
        assert_eq!(got[3], Some("d"));
        assert_eq!(got[4], Some("e"), "past the old chunk: its neighbour");
        // An edit in the first chunk: counted back from the next shared.
        let got = counterparts(&refs(&["A", "b", "c"]), &old);
        assert_eq!(got[0], Some("a"));
        // Nothing shared: the same chunk number.
        let got = counterparts(&refs(&["x", "y"]), &old);
        assert_eq!(got, vec![Some("a"), Some("b")]);
    }

    #[test]
    fn collection_keeps_what_is_wanted_and_drops_the_rest() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("images");
        let indexes = data.path().join("indexes");
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::create_dir_all(&indexes).unwrap();
        let store = phoenix_chunks::ChunkStore::open(data.path().join("chunks")).unwrap();
        let mut hashes = Vec::new();
        for seed in 1..=3u8 {
            let bytes: Vec<u8> = (0..200_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> (seed + 8)) as u8 ^ seed)
                .collect();
            let file = data.path().join(format!("src{seed}"));
            std::fs::write(&file, &bytes).unwrap();
            let index = store.import_file(&file).unwrap();
            let h = index.file_hash.clone();
            std::fs::write(indexes.join(format!("{h}.json")), index.to_json()).unwrap();
            // The third is wanted but not assembled yet (a fetch cut off).
            if seed < 3 {
                std::fs::write(dir.join(&h), &bytes).unwrap();
            }
            let place = dir.join("rootfs").join(format!("digest{seed}"));
            std::fs::create_dir_all(&place).unwrap();
            std::fs::write(
                place.join(format!("{}{h}", crate::driver::oci::ROOTFS_MARK)),
                b"",
            )
            .unwrap();
            hashes.push(h);
        }
        let leftover = dir.join(format!(".assemble-{}", hashes[0]));
        std::fs::write(&leftover, b"half").unwrap();
        let keep: HashSet<String> = [hashes[0].clone(), hashes[2].clone()].into();
        collect(&dir, &indexes, &store, &keep).unwrap();
        assert!(dir.join(&hashes[0]).exists());
        assert!(!dir.join(&hashes[1]).exists());
        assert!(!leftover.exists(), "a cut-off assembly was left");
        assert!(indexes.join(format!("{}.json", hashes[0])).exists());
        assert!(!indexes.join(format!("{}.json", hashes[1])).exists());
        assert!(dir.join("rootfs/digest1").exists());
        assert!(!dir.join("rootfs/digest2").exists());
        // Only the unassembled image's chunks stay in the store: the
        // assembled one is read from its file.
        let third: Index = Index::from_json(
            &std::fs::read_to_string(indexes.join(format!("{}.json", hashes[2]))).unwrap(),
        )
        .unwrap();
        let after = store.usage().unwrap();
        assert_eq!(after.chunks as usize, third.chunks.len());
        assert!(store.missing(&third).is_empty());
    }
}
