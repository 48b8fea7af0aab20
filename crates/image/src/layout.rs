//! Reading an OCI image layout, from a directory or from a tar file.
//!
//! [`open`] finds `index.json` (without one, a tar with Docker's
//! `manifest.json` goes to [`crate::docker_archive`]), follows it (through
//! nested image indexes, picking this host's platform) to one image
//! manifest, and reads the manifest and the image config. Every blob read is checked against its
//! descriptor's size and sha256 digest; layers are only located and
//! size-checked here, their digests are checked as they are unpacked (or by
//! [`Image::verify`]).
//!
//! A tar file is indexed once (the offset and size of every member) and
//! blobs are then read in place with positioned reads: nothing is
//! extracted to disk.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Largest JSON document (index, manifest, config) we read into memory.
pub(crate) const MAX_JSON_BYTES: u64 = 16 << 20;
/// How deep nested image indexes may go.
const MAX_INDEX_DEPTH: usize = 4;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The annotations an image's name is read from: Docker >= 25 writes both
/// (`docker.io/library/myapp:v2` and `v2`), skopeo/podman/buildah the OCI
/// one.
const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Buildx marks attestation manifests (platform `unknown/unknown`) so.
const ANNOTATION_REFERENCE_TYPE: &str = "vnd.docker.reference.type";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a tar archive: {source}")]
    NotTar { path: PathBuf, source: io::Error },
    #[error("{path} is {kind}-compressed; decompress it first (an image archive is a plain tar)")]
    Compressed { path: PathBuf, kind: &'static str },
    #[error(
        "{path}: manifest.json names {entry:?}, which {problem}; the archive is damaged or was not \
         written by `docker save`"
    )]
    DockerArchiveEntry {
        path: PathBuf,
        entry: String,
        problem: &'static str,
    },
    #[error(
        "{path}: image config {config:?} lists {diff_ids} layer digests (rootfs.diff_ids) but \
         manifest.json lists {layers} layers for it"
    )]
    DockerArchiveLayerCount {
        path: PathBuf,
        config: String,
        diff_ids: usize,
        layers: usize,
    },
    #[error(
        "{entry} in {path} is corrupt: its content has digest {actual}, the image says {expected}"
    )]
    DockerArchiveCorrupt {
        path: PathBuf,
        entry: String,
        expected: String,
        actual: String,
    },
    #[error(
        "{path} is an unpacked legacy docker archive (a directory with manifest.json); give the tar \
         file `docker save` wrote instead"
    )]
    DockerArchiveDirectory { path: PathBuf },
    #[error(
        "{path} is not an image archive (no OCI index.json, no docker manifest.json); use \
         `docker image save`, `podman save --format oci-archive` or `skopeo copy ... oci-archive:FILE`"
    )]
    NotOci { path: PathBuf },
    #[error("{path}: unsupported image layout version {version:?}")]
    LayoutVersion { path: PathBuf, version: String },
    #[error("{what} in {path}: invalid json: {source}")]
    Json {
        what: String,
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{what} in {path} is over {limit} bytes")]
    TooLarge {
        what: String,
        path: PathBuf,
        limit: u64,
    },
    #[error("invalid digest {digest:?} (expected sha256:<64 lowercase hex digits>)")]
    BadDigest { digest: String },
    #[error("blob {digest} is missing from {path}")]
    MissingBlob { digest: String, path: PathBuf },
    #[error("blob {digest} in {path} has {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        digest: String,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest} in {path} is corrupt: its content has digest {actual}")]
    DigestMismatch {
        digest: String,
        path: PathBuf,
        actual: String,
    },
    #[error("{path} holds no image (its {listing} lists none)")]
    Empty {
        path: PathBuf,
        /// The file that should list the images: index.json or manifest.json.
        listing: &'static str,
    },
    #[error("{path} holds several images; pick one by name or tag: {available}")]
    Several { path: PathBuf, available: String },
    #[error("no image {reference:?} in {path}; available: {available}")]
    NoMatch {
        reference: String,
        path: PathBuf,
        available: String,
    },
    #[error("{reference:?} matches several images in {path}; be more specific: {available}")]
    Ambiguous {
        reference: String,
        path: PathBuf,
        available: String,
    },
    #[error("image index {digest} has no manifest for {wanted}; it has: {available}")]
    NoPlatform {
        digest: String,
        wanted: String,
        available: String,
    },
    #[error("blob {digest} has media type {media_type:?}, which is not {expected}")]
    MediaType {
        digest: String,
        media_type: String,
        expected: &'static str,
    },
    #[error("image indexes nested more than {MAX_INDEX_DEPTH} deep at {digest}")]
    TooDeep { digest: String },
}

/// An image found in an image file: its manifest, its config, its layers,
/// and where to read its blobs from.
#[derive(Clone, Debug)]
pub struct Image {
    /// The image's identity, `sha256:<64 hex digits>`. For an OCI image,
    /// the digest of its manifest. A legacy Docker archive has no manifest:
    /// there it is the sha256 of a marker and the image config (see
    /// [`crate::docker_archive`]), which no OCI manifest digest can equal.
    pub manifest_digest: String,
    pub config: ImageConfig,
    /// Bottom layer first.
    pub layers: Vec<Layer>,
    pub(crate) blobs: Blobs,
    pub(crate) layer_files: LayerFiles,
}

/// How a layer is found, and what its digest covers.
#[derive(Clone, Debug)]
pub(crate) enum LayerFiles {
    /// OCI: a blob named by its digest, which covers the blob as stored
    /// (compressed or not).
    Blobs,
    /// Legacy Docker archive: a tar member named in manifest.json, found
    /// by the layer's digest, which is its diff_id: the sha256 of the
    /// *uncompressed* layer tar.
    DockerArchive(Arc<HashMap<String, String>>),
}

/// What the image config says about running the image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `80/tcp`, `53/udp`... sorted.
    pub exposed_ports: Vec<String>,
    /// Go's names: `amd64`, `arm64`...
    pub architecture: String,
    pub os: String,
}

/// One layer's descriptor, as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// `sha256:...` of the (possibly compressed) blob; in a legacy Docker
    /// archive, of the uncompressed layer tar (its diff_id).
    pub digest: String,
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
}

/// Where blobs live.
#[derive(Clone, Debug)]
pub(crate) enum Blobs {
    /// An OCI layout directory: `DIR/blobs/sha256/HEX`.
    Dir(PathBuf),
    /// A tar file, kept open, with the position of each member.
    Tar {
        path: PathBuf,
        file: Arc<File>,
        members: Arc<HashMap<String, Member>>,
    },
}

/// Where a tar member's data is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Member {
    offset: u64,
    size: u64,
}

/// Reads one blob (or a tar member) with positioned reads, so several can
/// be open on the same file at once.
#[derive(Debug)]
pub(crate) struct BlobReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl BlobReader {
    /// Bytes between the reader's position and its end.
    pub(crate) fn len(&self) -> u64 {
        self.end - self.pos
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "image file is shorter than its index says (truncated or changed while open)",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Passes bytes through while hashing and counting them.
#[derive(Debug)]
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// `sha256:HEX` of everything read, and how many bytes that was.
    pub(crate) fn finish(self) -> (String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (digest, self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Opens the image at `path`: an OCI layout (a tar file or a directory),
/// or a legacy Docker archive (a tar with `manifest.json` and no
/// `index.json`, read by [`crate::docker_archive`]). With several images
/// in it, `reference` picks one: a tag (`v2`), a name (`myapp:v2`,
/// `docker.io/library/myapp:v2`) or a digest (OCI: the manifest's; legacy:
/// Docker's image id).
pub fn open(path: &Path, reference: Option<&str>) -> Result<Image, ImageError> {
    let io_err = |source| ImageError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    let blobs = if meta.is_dir() {
        Blobs::Dir(path.to_owned())
    } else {
        let mut file = File::open(path).map_err(io_err)?;
        check_not_compressed(path, &mut file)?;
        let members = index_tar(path, &mut file)?;
        Blobs::Tar {
            path: path.to_owned(),
            file: Arc::new(file),
            members: Arc::new(members),
        }
    };

    if !blobs.has_file("index.json") {
        if blobs.has_file(crate::docker_archive::MANIFEST) {
            return crate::docker_archive::open(blobs, reference);
        }
        return Err(ImageError::NotOci {
            path: path.to_owned(),
        });
    }
    if blobs.has_file("oci-layout") {
        let bytes = blobs.read_file("oci-layout")?;
        let layout: OciLayout = blobs.parse_json("oci-layout", &bytes)?;
        if !layout.image_layout_version.starts_with("1.") {
            return Err(ImageError::LayoutVersion {
                path: path.to_owned(),
                version: layout.image_layout_version,
            });
        }
    } else {
        tracing::debug!(path = %path.display(), "no oci-layout file; reading index.json anyway");
    }
    let bytes = blobs.read_file("index.json")?;
    let index: Index = blobs.parse_json("index.json", &bytes)?;

    let candidates: Vec<Candidate<'_>> = index
        .manifests
        .iter()
        .map(|d| Candidate {
            names: names_of(d),
            id: &d.digest,
        })
        .collect();
    let chosen = &index.manifests[choose(path, "index.json", &candidates, reference)?];
    let manifest_desc = blobs.resolve_manifest(chosen, 0)?;
    let bytes = blobs.read_json_blob(&manifest_desc, "manifest")?;
    let manifest: Manifest =
        blobs.parse_json(&format!("manifest {}", manifest_desc.digest), &bytes)?;

    let config_bytes = blobs.read_json_blob(&manifest.config, "image config")?;
    let config_file: ConfigFile = blobs.parse_json(
        &format!("image config {}", manifest.config.digest),
        &config_bytes,
    )?;

    let mut layers = Vec::with_capacity(manifest.layers.len());
    for desc in manifest.layers {
        // Locate and size-check every layer now: a missing or truncated
        // layer fails here, not halfway through an unpack.
        blobs.open_blob(&desc.digest, desc.size)?;
        layers.push(Layer {
            digest: desc.digest,
            media_type: desc.media_type,
            size: desc.size,
        });
    }

    Ok(Image {
        manifest_digest: manifest_desc.digest,
        config: config_file.into_config(),
        layers,
        blobs,
        layer_files: LayerFiles::Blobs,
    })
}

impl Image {
    /// Opens a layer's blob for reading (size already checked; the digest
    /// is the reader's to check).
    pub(crate) fn layer_reader(&self, layer: &Layer) -> Result<BlobReader, ImageError> {
        match &self.layer_files {
            LayerFiles::Blobs => self.blobs.open_blob(&layer.digest, layer.size),
            LayerFiles::DockerArchive(files) => {
                crate::docker_archive::layer_reader(&self.blobs, files, layer)
            }
        }
    }

    /// Whether a layer's digest covers its uncompressed tar (a legacy
    /// Docker archive's diff_ids) rather than the blob as stored.
    pub(crate) fn digests_uncompressed(&self) -> bool {
        matches!(self.layer_files, LayerFiles::DockerArchive(_))
    }

    /// The error for a layer whose content does not have its digest.
    pub(crate) fn corrupt_layer(&self, layer: &Layer, actual: String) -> ImageError {
        match &self.layer_files {
            LayerFiles::Blobs => ImageError::DigestMismatch {
                digest: layer.digest.clone(),
                path: self.blobs.path().to_owned(),
                actual,
            },
            LayerFiles::DockerArchive(files) => ImageError::DockerArchiveCorrupt {
                path: self.blobs.path().to_owned(),
                entry: files.get(&layer.digest).cloned().unwrap_or_default(),
                expected: layer.digest.clone(),
                actual,
            },
        }
    }

    /// Reads every layer through and checks its sha256 digest, without
    /// unpacking anything (the index, manifest and config were checked by
    /// [`open`]). [`crate::unpack()`] checks the same as it goes. A legacy
    /// Docker archive's layers are decompressed on the way when they are
    /// compressed, since their digests cover the uncompressed tar.
    pub fn verify(&self) -> Result<(), ImageError> {
        let read_err = |source| ImageError::Io {
            path: self.blobs.path().to_owned(),
            source,
        };
        for layer in &self.layers {
            let reader = self.layer_reader(layer)?;
            let actual = if self.digests_uncompressed() {
                let decoded = crate::unpack::decompressed(layer, io::BufReader::new(reader))
                    .map_err(|e| match e {
                        crate::UnpackError::Image(e) => e,
                        other => read_err(io::Error::other(other.to_string())),
                    })?;
                let mut hashed = HashingReader::new(decoded);
                io::copy(&mut hashed, &mut io::sink()).map_err(read_err)?;
                hashed.finish().0
            } else {
                let mut hashed = HashingReader::new(reader);
                io::copy(&mut hashed, &mut io::sink()).map_err(read_err)?;
                hashed.finish().0
            };
            if actual != layer.digest {
                return Err(self.corrupt_layer(layer, actual));
            }
        }
        Ok(())
    }

    /// The image file or directory this image is read from.
    pub fn source(&self) -> &Path {
        self.blobs.path()
    }
}

/// Refuses a compressed archive up front, with a message that says so,
/// rather than a tar parse error.
fn check_not_compressed(path: &Path, file: &mut File) -> Result<(), ImageError> {
    let mut magic = [0u8; 6];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ImageError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|source| ImageError::Io {
            path: path.to_owned(),
            source,
        })?;
    let kind = match &magic[..got] {
        [0x1f, 0x8b, ..] => "gzip",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [b'B', b'Z', b'h', ..] => "bzip2",
        [0xfd, b'7', b'z', b'X', b'Z', 0] => "xz",
        _ => return Ok(()),
    };
    Err(ImageError::Compressed {
        path: path.to_owned(),
        kind,
    })
}

/// A member name as a lookup key: `./` prefixes, leading `/` and repeated
/// slashes dropped, `..` applied lexically. `None` if it climbs out.
pub(crate) fn member_key(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// One pass over the tar headers (seeking over the data): where each
/// regular member's data is. Hard links and symlinks between members are
/// resolved to their targets' data.
fn index_tar(path: &Path, file: &mut File) -> Result<HashMap<String, Member>, ImageError> {
    let not_tar = |source| ImageError::NotTar {
        path: path.to_owned(),
        source,
    };
    let mut members = HashMap::new();
    let mut links: Vec<(String, String)> = Vec::new();
    let mut archive = tar::Archive::new(file);
    for entry in archive.entries_with_seek().map_err(not_tar)? {
        let entry = entry.map_err(not_tar)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(key) = member_key(&name) else {
            continue;
        };
        let kind = entry.header().entry_type();
        if kind.is_file() || kind == tar::EntryType::Continuous {
            members.insert(
                key,
                Member {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
            );
        } else if kind.is_hard_link() || kind.is_symlink() {
            let Some(target) = entry.link_name_bytes() else {
                continue;
            };
            let target = String::from_utf8_lossy(&target).into_owned();
            // A symlink is relative to its own directory, a hard link to
            // the archive root.
            let target = if kind.is_symlink() && !target.starts_with('/') {
                match key.rsplit_once('/') {
                    Some((dir, _)) => format!("{dir}/{target}"),
                    None => target,
                }
            } else {
                target
            };
            if let Some(target) = member_key(&target) {
                links.push((key, target));
            }
        }
    }
    // Links to links: a few rounds settle any sane chain.
    for _ in 0..8 {
        let mut changed = false;
        for (key, target) in &links {
            if let Some(member) = members.get(target).copied()
                && !members.contains_key(key)
            {
                members.insert(key.clone(), member);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    Ok(members)
}

impl Blobs {
    pub(crate) fn path(&self) -> &Path {
        match self {
            Blobs::Dir(path) | Blobs::Tar { path, .. } => path,
        }
    }

    pub(crate) fn has_file(&self, name: &str) -> bool {
        match self {
            Blobs::Dir(dir) => dir.join(name).is_file(),
            Blobs::Tar { members, .. } => members.contains_key(name),
        }
    }

    /// Opens a layout file or blob by its path in the layout; the size is
    /// what is there.
    pub(crate) fn open_member(&self, name: &str) -> Result<Option<BlobReader>, ImageError> {
        match self {
            Blobs::Dir(dir) => {
                let path = dir.join(name);
                let file = match File::open(&path) {
                    Ok(file) => file,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(source) => return Err(ImageError::Io { path, source }),
                };
                let meta = file.metadata().map_err(|source| ImageError::Io {
                    path: path.clone(),
                    source,
                })?;
                if !meta.is_file() {
                    return Ok(None);
                }
                Ok(Some(BlobReader {
                    file: Arc::new(file),
                    pos: 0,
                    end: meta.len(),
                }))
            }
            Blobs::Tar { file, members, .. } => Ok(members.get(name).map(|m| BlobReader {
                file: Arc::clone(file),
                pos: m.offset,
                end: m.offset + m.size,
            })),
        }
    }

    /// Reads a small layout file (index.json, oci-layout) whole.
    pub(crate) fn read_file(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let reader = self.open_member(name)?.ok_or_else(|| ImageError::NotOci {
            path: self.path().to_owned(),
        })?;
        if reader.end - reader.pos > MAX_JSON_BYTES {
            return Err(ImageError::TooLarge {
                what: name.to_owned(),
                path: self.path().to_owned(),
                limit: MAX_JSON_BYTES,
            });
        }
        let mut bytes = Vec::new();
        let mut reader = reader;
        reader
            .read_to_end(&mut bytes)
            .map_err(|source| ImageError::Io {
                path: self.path().join(name),
                source,
            })?;
        Ok(bytes)
    }

    pub(crate) fn parse_json<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        bytes: &[u8],
    ) -> Result<T, ImageError> {
        serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
            what: what.to_owned(),
            path: self.path().to_owned(),
            source,
        })
    }

    /// Opens a blob by digest and checks its size against the descriptor.
    fn open_blob(&self, digest: &str, size: u64) -> Result<BlobReader, ImageError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| ImageError::BadDigest {
                digest: digest.to_owned(),
            })?;
        let reader = self
            .open_member(&format!("blobs/sha256/{hex}"))?
            .ok_or_else(|| ImageError::MissingBlob {
                digest: digest.to_owned(),
                path: self.path().to_owned(),
            })?;
        let actual = reader.end - reader.pos;
        if actual != size {
            return Err(ImageError::SizeMismatch {
                digest: digest.to_owned(),
                path: self.path().to_owned(),
                expected: size,
                actual,
            });
        }
        Ok(reader)
    }

    /// Reads a JSON blob whole and checks its digest.
    fn read_json_blob(&self, desc: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
        if desc.size > MAX_JSON_BYTES {
            return Err(ImageError::TooLarge {
                what: format!("{what} {}", desc.digest),
                path: self.path().to_owned(),
                limit: MAX_JSON_BYTES,
            });
        }
        let mut reader = HashingReader::new(self.open_blob(&desc.digest, desc.size)?);
        let mut bytes = Vec::with_capacity(desc.size as usize);
        reader
            .read_to_end(&mut bytes)
            .map_err(|source| ImageError::Io {
                path: self.path().to_owned(),
                source,
            })?;
        let (actual, _) = reader.finish();
        if actual != desc.digest {
            return Err(ImageError::DigestMismatch {
                digest: desc.digest.clone(),
                path: self.path().to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Follows image indexes down to one image manifest's descriptor.
    fn resolve_manifest(&self, desc: &Descriptor, depth: usize) -> Result<Descriptor, ImageError> {
        match desc.media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => return Ok(desc.clone()),
            OCI_INDEX | DOCKER_LIST => {}
            other if !other.is_empty() => {
                return Err(ImageError::MediaType {
                    digest: desc.digest.clone(),
                    media_type: other.to_owned(),
                    expected: "an image manifest or image index",
                });
            }
            // No media type on the descriptor (allowed by older layouts):
            // look at the document itself below.
            _ => {}
        }
        if depth >= MAX_INDEX_DEPTH {
            return Err(ImageError::TooDeep {
                digest: desc.digest.clone(),
            });
        }
        let bytes = self.read_json_blob(desc, "image index")?;
        let doc: serde_json::Value = self.parse_json(&format!("blob {}", desc.digest), &bytes)?;
        if doc.get("manifests").is_none() {
            // An untyped descriptor to a manifest.
            return Ok(desc.clone());
        }
        let index: Index = self.parse_json(&format!("image index {}", desc.digest), &bytes)?;
        let next = pick_platform(&desc.digest, &index.manifests)?;
        self.resolve_manifest(next, depth + 1)
    }
}

/// The platform name Go (and so every image) uses for this host.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// The manifest of a multi-platform index that this host can run.
fn pick_platform<'a>(
    digest: &str,
    manifests: &'a [Descriptor],
) -> Result<&'a Descriptor, ImageError> {
    let runnable: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| !d.annotations.contains_key(ANNOTATION_REFERENCE_TYPE))
        .collect();
    let arch = host_arch();
    let found = runnable.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
    });
    if let Some(found) = found {
        return Ok(found);
    }
    if let [only] = runnable.as_slice()
        && only.platform.is_none()
    {
        return Ok(only);
    }
    let available: Vec<String> = manifests
        .iter()
        .map(|d| match &d.platform {
            Some(p) => match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            },
            None => format!("{} (no platform)", d.digest),
        })
        .collect();
    Err(ImageError::NoPlatform {
        digest: digest.to_owned(),
        wanted: format!("linux/{arch}"),
        available: if available.is_empty() {
            "nothing".to_owned()
        } else {
            available.join(", ")
        },
    })
}

/// The names a top-level descriptor is known by.
fn names_of(desc: &Descriptor) -> Vec<&str> {
    let mut names = Vec::new();
    for key in [ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME] {
        if let Some(name) = desc.annotations.get(key)
            && !name.is_empty()
            && !names.contains(&name.as_str())
        {
            names.push(name.as_str());
        }
    }
    names
}

/// Docker's normalization of an image name: `myapp` →
/// `docker.io/library/myapp:latest`, `me/app:v2` → `docker.io/me/app:v2`.
fn normalize(name: &str) -> String {
    let (repo, tag) = split_tag(name);
    let tag = tag.unwrap_or("latest");
    let first = repo.split('/').next().unwrap_or("");
    let has_registry =
        repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let repo = if has_registry {
        repo.to_owned()
    } else if repo.contains('/') {
        format!("docker.io/{repo}")
    } else {
        format!("docker.io/library/{repo}")
    };
    format!("{repo}:{tag}")
}

/// `repo[:tag]`: a colon after the last slash starts the tag.
fn split_tag(name: &str) -> (&str, Option<&str>) {
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[slash..].rfind(':') {
        Some(i) => (&name[..slash + i], Some(&name[slash + i + 1..])),
        None => (name, None),
    }
}

/// One image a file holds, as [`choose`] sees it: the names it is known
/// by, and its identity (the OCI manifest digest; for a legacy Docker
/// archive, the image id where its config's file name gives it).
pub(crate) struct Candidate<'a> {
    pub(crate) names: Vec<&'a str>,
    pub(crate) id: &'a str,
}

fn matches(reference: &str, candidate: &Candidate<'_>) -> bool {
    if reference.starts_with("sha256:") {
        return candidate.id == reference;
    }
    let bare_tag = !reference.contains(['/', ':', '@']);
    candidate.names.iter().any(|&name| {
        name == reference
            || normalize(name) == normalize(reference)
            || (bare_tag && split_tag(name).1 == Some(reference))
    })
}

/// Picks the image `reference` names (or the only image): its position in
/// `candidates`. `listing` is the file that lists them, for the errors.
pub(crate) fn choose(
    path: &Path,
    listing: &'static str,
    candidates: &[Candidate<'_>],
    reference: Option<&str>,
) -> Result<usize, ImageError> {
    let describe = |chosen: &[usize]| -> String {
        let mut seen = BTreeSet::new();
        for &i in chosen {
            let c = &candidates[i];
            seen.insert(if c.names.is_empty() {
                c.id.to_owned()
            } else {
                c.names.join(" = ")
            });
        }
        seen.into_iter().collect::<Vec<_>>().join(", ")
    };
    let all: Vec<usize> = (0..candidates.len()).collect();
    let found: Vec<usize> = match reference {
        None => all.clone(),
        Some(r) => all
            .iter()
            .copied()
            .filter(|&i| matches(r, &candidates[i]))
            .collect(),
    };
    // The same image saved under several names is one image.
    let ids: BTreeSet<&str> = found.iter().map(|&i| candidates[i].id).collect();
    match (ids.len(), reference) {
        (1, _) => Ok(found[0]),
        (0, None) => Err(ImageError::Empty {
            path: path.to_owned(),
            listing,
        }),
        (0, Some(r)) => Err(ImageError::NoMatch {
            reference: r.to_owned(),
            path: path.to_owned(),
            available: if all.is_empty() {
                "none".to_owned()
            } else {
                describe(&all)
            },
        }),
        (_, None) => Err(ImageError::Several {
            path: path.to_owned(),
            available: describe(&all),
        }),
        (_, Some(r)) => Err(ImageError::Ambiguous {
            reference: r.to_owned(),
            path: path.to_owned(),
            available: describe(&found),
        }),
    }
}

#[derive(Deserialize)]
struct OciLayout {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: String,
}

#[derive(Clone, Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RunConfig>,
    /// Read for legacy Docker archives only, where the diff_ids are what
    /// layers are checked against (OCI layers have blob digests).
    #[serde(default)]
    pub(crate) rootfs: Option<RootFs>,
}

/// The image config's list of uncompressed layer digests, bottom first.
#[derive(Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub(crate) diff_ids: Vec<String>,
}

/// The `config` object of an image config (Docker's capitalized names).
#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<HashMap<String, serde_json::Value>>,
}

impl ConfigFile {
    pub(crate) fn into_config(self) -> ImageConfig {
        let run = self.config.unwrap_or_default();
        let mut exposed_ports: Vec<String> =
            run.exposed_ports.unwrap_or_default().into_keys().collect();
        exposed_ports.sort();
        ImageConfig {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|s| !s.is_empty()),
            user: run.user.filter(|s| !s.is_empty()),
            exposed_ports,
            architecture: self.architecture,
            os: self.os,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_docker_names() {
        assert_eq!(normalize("myapp"), "docker.io/library/myapp:latest");
        assert_eq!(normalize("myapp:v2"), "docker.io/library/myapp:v2");
        assert_eq!(normalize("me/app:v2"), "docker.io/me/app:v2");
        assert_eq!(
            normalize("docker.io/library/myapp:v2"),
            "docker.io/library/myapp:v2"
        );
        assert_eq!(normalize("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(normalize("ghcr.io/o/app:1"), "ghcr.io/o/app:1");
    }

    #[test]
    fn member_keys() {
        assert_eq!(
            member_key("./blobs//sha256/ab").as_deref(),
            Some("blobs/sha256/ab")
        );
        assert_eq!(member_key("/index.json").as_deref(), Some("index.json"));
        assert_eq!(member_key("x/../y").as_deref(), Some("y"));
        assert_eq!(member_key("../y"), None);
    }
}
