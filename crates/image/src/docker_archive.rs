//! Reading a legacy Docker image archive: what `docker save` writes before
//! Docker 25 (and Debian's and Ubuntu's packaged Docker still do).
//!
//! Such a tar has no OCI `index.json`. Its `manifest.json` lists the
//! images it holds:
//!
//! ```json
//! [{"Config": "<id>.json", "RepoTags": ["app:v1"],
//!   "Layers": ["<v1 id>/layer.tar", ...]}]
//! ```
//!
//! `Config` and `Layers` are paths of members of the same tar. Nothing in
//! `manifest.json` is checksummed, so everything is checked against what
//! the config itself says:
//!
//! - The config's `rootfs.diff_ids` are the sha256 digests of the
//!   *uncompressed* layer tars, bottom first, one per entry of `Layers`.
//!   A layer's [`Layer::digest`] is its diff_id, and the unpack (or
//!   [`Image::verify`]) hashes the tar stream after decompression (Docker
//!   writes plain tars; other tools writing this format may gzip them) and
//!   refuses a mismatch, naming the layer's path.
//! - Docker names the config file after its own digest (`<hex>.json`, or
//!   `blobs/sha256/<hex>`): where it is so named, the content is checked
//!   against the name. That digest is Docker's image id, and a `sha256:`
//!   reference matches it.
//!
//! Paths in `manifest.json` come from the file, so they are refused when
//! absolute or climbing with `..`, or when they name nothing in the
//! archive; a layer path listed twice for one image is refused too. Only a
//! tar file is read: an unpacked archive (a directory) is refused, so a
//! path can never lead through a symlink out of it.
//!
//! The image's identity ([`Image::manifest_digest`], under which minions
//! cache root filesystems) is the sha256 of [`IDENTITY_MARKER`] followed
//! by the config bytes. The config covers the diff_ids, so it identifies
//! the content; the marker makes it differ from any OCI manifest digest
//! (a manifest is JSON, and no JSON document starts with a NUL-terminated
//! word), so a crafted archive cannot pose as a cached OCI image.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::layout::{
    BlobReader, Blobs, Candidate, ConfigFile, HashingReader, Image, ImageError, Layer, LayerFiles,
    MAX_JSON_BYTES, choose, member_key,
};

/// The file that makes a tar a legacy Docker archive.
pub(crate) const MANIFEST: &str = "manifest.json";

/// What precedes the config bytes in the hash that names the image.
pub const IDENTITY_MARKER: &[u8] = b"phoenix docker-archive config\0";

/// Docker's media type for an uncompressed layer. Recorded on the layers
/// for what they usually are; the unpack decides compression from the
/// data's magic bytes, which win for a tar media type.
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// One image, as `manifest.json` lists it.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    /// `null` when the image was saved by id.
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

/// Opens the image `reference` names (or the only one) in a legacy Docker
/// archive whose members `blobs` indexes.
pub(crate) fn open(blobs: Blobs, reference: Option<&str>) -> Result<Image, ImageError> {
    let path = blobs.path().to_owned();
    if matches!(blobs, Blobs::Dir(_)) {
        return Err(ImageError::DockerArchiveDirectory { path });
    }
    let bytes = blobs.read_file(MANIFEST)?;
    let entries: Vec<ArchiveEntry> = blobs.parse_json(MANIFEST, &bytes)?;

    let ids: Vec<String> = entries
        .iter()
        .map(|e| image_id(&e.config).unwrap_or_else(|| e.config.clone()))
        .collect();
    let candidates: Vec<Candidate<'_>> = entries
        .iter()
        .zip(&ids)
        .map(|(e, id)| Candidate {
            names: e
                .repo_tags
                .iter()
                .flatten()
                .map(String::as_str)
                .filter(|n| !n.is_empty())
                .collect(),
            id,
        })
        .collect();
    let entry = &entries[choose(&path, MANIFEST, &candidates, reference)?];

    let config_key = entry_key(&path, &entry.config)?;
    let mut reader = open_entry(&blobs, &path, &entry.config, &config_key)?;
    if reader.len() > MAX_JSON_BYTES {
        return Err(ImageError::TooLarge {
            what: format!("image config {}", entry.config),
            path,
            limit: MAX_JSON_BYTES,
        });
    }
    let mut config_bytes = Vec::new();
    reader
        .read_to_end(&mut config_bytes)
        .map_err(|source| ImageError::Io {
            path: path.clone(),
            source,
        })?;
    if let Some(expected) = image_id(&entry.config) {
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes)));
        if actual != expected {
            return Err(ImageError::DockerArchiveCorrupt {
                path,
                entry: entry.config.clone(),
                expected,
                actual,
            });
        }
    }
    let config_file: ConfigFile =
        blobs.parse_json(&format!("image config {}", entry.config), &config_bytes)?;
    let diff_ids = config_file
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(ImageError::DockerArchiveLayerCount {
            path,
            config: entry.config.clone(),
            diff_ids: diff_ids.len(),
            layers: entry.layers.len(),
        });
    }

    let mut layers = Vec::with_capacity(entry.layers.len());
    // diff_id → the member it is read from. The same content may be
    // listed twice under different paths (Docker links one to the other):
    // it is read from the first, which the digest check makes equivalent.
    let mut files: HashMap<String, String> = HashMap::new();
    let mut seen: HashSet<String> = HashSet::new();
    for (listed, diff_id) in entry.layers.iter().zip(diff_ids) {
        check_digest(&diff_id)?;
        let key = entry_key(&path, listed)?;
        if !seen.insert(key.clone()) {
            return Err(ImageError::DockerArchiveEntry {
                path,
                entry: listed.clone(),
                problem: "is listed twice as a layer of the image",
            });
        }
        // Locate every layer now: a missing one fails here, not halfway
        // through an unpack.
        let size = open_entry(&blobs, &path, listed, &key)?.len();
        let size = match files.get(&diff_id) {
            Some(first) => open_entry(&blobs, &path, first, first)?.len(),
            None => {
                files.insert(diff_id.clone(), key);
                size
            }
        };
        layers.push(Layer {
            digest: diff_id,
            media_type: DOCKER_LAYER_TAR.to_owned(),
            size,
        });
    }

    let mut identity = HashingReader::new(IDENTITY_MARKER.chain(config_bytes.as_slice()));
    std::io::copy(&mut identity, &mut std::io::sink()).map_err(|source| ImageError::Io {
        path: path.clone(),
        source,
    })?;
    let (manifest_digest, _) = identity.finish();

    Ok(Image {
        manifest_digest,
        config: config_file.into_config(),
        layers,
        blobs,
        layer_files: LayerFiles::DockerArchive(Arc::new(files)),
    })
}

/// Opens the member a legacy archive's layer is read from, checking it
/// still has the size [`open`] saw.
pub(crate) fn layer_reader(
    blobs: &Blobs,
    files: &HashMap<String, String>,
    layer: &Layer,
) -> Result<BlobReader, ImageError> {
    let path = blobs.path();
    let key = files
        .get(&layer.digest)
        .ok_or_else(|| ImageError::MissingBlob {
            digest: layer.digest.clone(),
            path: path.to_owned(),
        })?;
    let reader = open_entry(blobs, path, key, key)?;
    if reader.len() != layer.size {
        return Err(ImageError::SizeMismatch {
            digest: layer.digest.clone(),
            path: path.to_owned(),
            expected: layer.size,
            actual: reader.len(),
        });
    }
    Ok(reader)
}

/// A path from `manifest.json` as a member key, refused when it could
/// only be meant to reach outside the archive.
fn entry_key(path: &Path, listed: &str) -> Result<String, ImageError> {
    let refuse = |problem| ImageError::DockerArchiveEntry {
        path: path.to_owned(),
        entry: listed.to_owned(),
        problem,
    };
    if listed.starts_with('/') {
        return Err(refuse("is an absolute path"));
    }
    if listed.split('/').any(|part| part == "..") {
        return Err(refuse("climbs out of its directory with `..`"));
    }
    match member_key(listed) {
        Some(key) if !key.is_empty() => Ok(key),
        _ => Err(refuse("is not a file path")),
    }
}

/// Opens a member named in `manifest.json`; its absence is the archive's
/// fault, and the error names the entry.
fn open_entry(
    blobs: &Blobs,
    path: &Path,
    listed: &str,
    key: &str,
) -> Result<BlobReader, ImageError> {
    blobs
        .open_member(key)?
        .ok_or_else(|| ImageError::DockerArchiveEntry {
            path: path.to_owned(),
            entry: listed.to_owned(),
            problem: "is not a file in the archive",
        })
}

/// Docker's image id (`sha256:<hex>`) where the config's file name gives
/// it: `<hex>.json` (Docker < 25) or `blobs/sha256/<hex>` (Docker >= 25's
/// own manifest.json).
fn image_id(config: &str) -> Option<String> {
    let name = config.rsplit('/').next()?;
    let hex = name.strip_suffix(".json").unwrap_or(name);
    is_sha256_hex(hex).then(|| format!("sha256:{hex}"))
}

fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_digest(digest: &str) -> Result<(), ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if is_sha256_hex(hex) => Ok(()),
        _ => Err(ImageError::BadDigest {
            digest: digest.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_from_config_names() {
        let hex = "ebaf3ba0e5f34d9ccd033ad4722be6b136f17bf1a5e990ed4917584e4c6bbea0";
        let id = format!("sha256:{hex}");
        assert_eq!(image_id(&format!("{hex}.json")), Some(id.clone()));
        assert_eq!(image_id(&format!("blobs/sha256/{hex}")), Some(id));
        assert_eq!(image_id("config.json"), None);
        assert_eq!(image_id(&format!("{}.json", hex.to_uppercase())), None);
    }

    #[test]
    fn entry_keys() {
        let p = Path::new("a.tar");
        assert_eq!(entry_key(p, "./abc/layer.tar").unwrap(), "abc/layer.tar");
        assert!(entry_key(p, "/etc/passwd").is_err());
        assert!(entry_key(p, "abc/../../x").is_err());
        assert!(entry_key(p, "abc/../x").is_err());
        assert!(entry_key(p, "").is_err());
        assert!(entry_key(p, "./").is_err());
    }
}
