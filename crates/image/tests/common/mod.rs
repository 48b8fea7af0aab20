//! Builds test images by hand: raw tar layers (so malicious entries can be
//! written, which the `tar` crate's builder refuses), OCI layouts as a
//! directory or a tar, Docker-save-style archives.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// One tar entry, raw.
#[derive(Clone, Debug)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: Vec<u8>,
    pub data: Vec<u8>,
    /// Overrides the size field (data is still what is written).
    pub declared_size: Option<u64>,
    pub major: u32,
    pub minor: u32,
    pub pax: Vec<(String, Vec<u8>)>,
}

impl Entry {
    fn new(path: &str, kind: u8, mode: u32) -> Self {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            link: Vec::new(),
            data: Vec::new(),
            declared_size: None,
            major: 0,
            minor: 0,
            pax: Vec::new(),
        }
    }
    pub fn file(path: &str, data: &[u8]) -> Self {
        let mut e = Entry::new(path, b'0', 0o644);
        e.data = data.to_vec();
        e
    }
    pub fn dir(path: &str) -> Self {
        Entry::new(path, b'5', 0o755)
    }
    pub fn symlink(path: &str, target: &str) -> Self {
        let mut e = Entry::new(path, b'2', 0o777);
        e.link = target.as_bytes().to_vec();
        e
    }
    pub fn hardlink(path: &str, target: &str) -> Self {
        let mut e = Entry::new(path, b'1', 0o644);
        e.link = target.as_bytes().to_vec();
        e
    }
    pub fn char_dev(path: &str, major: u32, minor: u32) -> Self {
        let mut e = Entry::new(path, b'3', 0o666);
        e.major = major;
        e.minor = minor;
        e
    }
    pub fn fifo(path: &str) -> Self {
        Entry::new(path, b'6', 0o644)
    }
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }
    pub fn pax(mut self, key: &str, value: &[u8]) -> Self {
        self.pax.push((key.to_owned(), value.to_vec()));
        self
    }
}

fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    assert!(s.len() <= digits, "value {value} too large for a tar field");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

fn header(name: &[u8], kind: u8, size: u64, e: &Entry) -> [u8; 512] {
    let mut h = [0u8; 512];
    assert!(name.len() <= 100, "long names go through pax");
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], u64::from(e.mode));
    octal(&mut h[108..116], e.uid);
    octal(&mut h[116..124], e.gid);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], e.mtime);
    h[148..156].fill(b' ');
    h[156] = kind;
    let link = if e.link.len() <= 100 {
        &e.link[..]
    } else {
        &[][..]
    };
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], u64::from(e.major));
    octal(&mut h[337..345], u64::from(e.minor));
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

fn pad(out: &mut Vec<u8>) {
    let rem = out.len() % 512;
    if rem != 0 {
        out.resize(out.len() + 512 - rem, 0);
    }
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "LEN key=value\n", LEN counting itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len = len.to_string().len() + body;
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// A tar stream of these entries, with end-of-archive blocks.
pub fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut pax = e.pax.clone();
        let name: Vec<u8> = if e.path.len() > 100 {
            pax.push(("path".into(), e.path.clone()));
            b"longname".to_vec()
        } else {
            e.path.clone()
        };
        if e.link.len() > 100 {
            pax.push(("linkpath".into(), e.link.clone()));
        }
        if !pax.is_empty() {
            let mut body = Vec::new();
            for (k, v) in &pax {
                body.extend(pax_record(k, v));
            }
            let px = Entry::new("pax", b'x', 0o644);
            out.extend_from_slice(&header(b"PaxHeader", b'x', body.len() as u64, &px));
            out.extend(body);
            pad(&mut out);
        }
        let size = e.declared_size.unwrap_or(e.data.len() as u64);
        out.extend_from_slice(&header(&name, e.kind, size, e));
        out.extend_from_slice(&e.data);
        pad(&mut out);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

pub fn compress(data: &[u8], comp: Comp) -> Vec<u8> {
    match comp {
        Comp::None => data.to_vec(),
        Comp::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        }
        Comp::Zstd => zstd::encode_all(data, 3).unwrap(),
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A layer to put in an image: its tar, compression and media type.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub tar: Vec<u8>,
    pub comp: Comp,
    pub media_type: String,
}

impl LayerSpec {
    pub fn new(entries: &[Entry], comp: Comp) -> Self {
        let media_type = match comp {
            Comp::None => LAYER_TAR,
            Comp::Gzip => LAYER_GZIP,
            Comp::Zstd => LAYER_ZSTD,
        };
        LayerSpec {
            tar: tar(entries),
            comp,
            media_type: media_type.to_owned(),
        }
    }
    pub fn media_type(mut self, mt: &str) -> Self {
        self.media_type = mt.to_owned();
        self
    }
}

pub fn default_config() -> Value {
    json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/app"],
            "Cmd": ["--serve"],
            "Env": ["PATH=/usr/bin:/bin", "MODE=test"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "ExposedPorts": {"8080/tcp": {}, "53/udp": {}}
        },
        "rootfs": {"type": "layers", "diff_ids": []}
    })
}

pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An OCI layout being built in memory.
#[derive(Default)]
pub struct Layout {
    pub blobs: BTreeMap<String, Vec<u8>>,
    pub index: Vec<Value>,
    /// Extra top-level files (Docker's manifest.json, repositories).
    pub extra: Vec<(String, Vec<u8>)>,
    pub no_index: bool,
}

impl Layout {
    /// Stores a blob; returns a descriptor for it.
    pub fn blob(&mut self, media_type: &str, data: Vec<u8>) -> Value {
        let digest = sha256(&data);
        let size = data.len();
        self.blobs.insert(digest.clone(), data);
        json!({"mediaType": media_type, "digest": digest, "size": size})
    }

    /// Stores the layers, config and manifest of one image; returns the
    /// manifest's descriptor (not yet in the index).
    pub fn image(&mut self, layers: &[LayerSpec], config: Value) -> Value {
        let layer_descs: Vec<Value> = layers
            .iter()
            .map(|l| {
                let data = compress(&l.tar, l.comp);
                self.blob(&l.media_type, data)
            })
            .collect();
        let config = self.blob(OCI_CONFIG, serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": layer_descs,
        });
        self.blob(OCI_MANIFEST, serde_json::to_vec(&manifest).unwrap())
    }

    /// Adds a descriptor to index.json with these annotations.
    pub fn add(&mut self, mut desc: Value, annotations: &[(&str, &str)]) {
        if !annotations.is_empty() {
            let map: serde_json::Map<String, Value> = annotations
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            desc["annotations"] = Value::Object(map);
        }
        self.index.push(desc);
    }

    /// One image with the default config, unnamed.
    pub fn single(layers: &[LayerSpec]) -> Layout {
        let mut layout = Layout::default();
        let desc = layout.image(layers, default_config());
        layout.add(desc, &[]);
        layout
    }

    fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut files = vec![(
            "oci-layout".to_owned(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        )];
        if !self.no_index {
            let index =
                json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index});
            files.push(("index.json".to_owned(), serde_json::to_vec(&index).unwrap()));
        }
        for (digest, data) in &self.blobs {
            let hex = digest.strip_prefix("sha256:").unwrap();
            files.push((format!("blobs/sha256/{hex}"), data.clone()));
        }
        files.extend(self.extra.iter().cloned());
        files
    }

    pub fn write_dir(&self, dir: &Path) {
        for (name, data) in self.files() {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }
    }

    /// As a tar file, directories included, the way the tools write it.
    pub fn write_tar(&self, path: &Path) {
        let mut entries = vec![Entry::dir("blobs/"), Entry::dir("blobs/sha256/")];
        for (name, data) in self.files() {
            entries.push(Entry::file(&name, &data));
        }
        std::fs::write(path, tar(&entries)).unwrap();
    }

    /// Replaces a blob's bytes (same length: a corruption, not a resize).
    pub fn corrupt(&mut self, digest: &str) {
        let data = self.blobs.get_mut(digest).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
    }
}

/// What a tree holds, without following symlinks: path → description.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            let mode = meta.permissions().mode();
            let desc = if meta.file_type().is_symlink() {
                format!(
                    "symlink -> {}",
                    std::fs::read_link(&path).unwrap().display()
                )
            } else if meta.is_dir() {
                walk(root, &path, out);
                format!("dir {mode:o}")
            } else if meta.is_file() {
                format!(
                    "file {mode:o} {} {:?}",
                    meta.mtime(),
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap())
                )
            } else {
                format!("other {mode:o}")
            };
            out.insert(rel, desc);
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// A temporary directory with `dest` (not yet created) several levels
/// down, and a sibling tree `outside` holding files, to prove nothing
/// escapes: `../..`-style escapes from dest stay inside the temp dir, where
/// the snapshot sees them.
pub struct Sandbox {
    pub tmp: tempfile::TempDir,
    pub dest: PathBuf,
    pub outside: PathBuf,
    before: BTreeMap<PathBuf, String>,
}

impl Sandbox {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("l1/l2/l3/work/dest");
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("keep"), b"precious").unwrap();
        std::fs::write(outside.join("sub").join("keep2"), b"also precious").unwrap();
        let before = snapshot(tmp.path());
        Sandbox {
            tmp,
            dest,
            outside,
            before,
        }
    }

    /// Where to write the image file (`image/`, not compared).
    pub fn image_path(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join("image");
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn compared(&self, tree: BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, String> {
        tree.into_iter()
            .filter(|(p, _)| !p.starts_with("l1/l2/l3/work/dest") && !p.starts_with("image"))
            .collect()
    }

    /// Everything but dest and the image is as it was.
    pub fn assert_outside_untouched(&self) {
        let now = self.compared(snapshot(self.tmp.path()));
        let before = self.compared(self.before.clone());
        assert_eq!(before, now, "something outside dest changed");
    }

    pub fn assert_dest_gone(&self) {
        assert!(
            std::fs::symlink_metadata(&self.dest).is_err(),
            "dest {} still exists after a failed unpack",
            self.dest.display()
        );
    }
}

/// A legacy `docker save` archive (Docker < 25) being built: its members
/// and its manifest.json entries, both open to tampering by the tests.
#[derive(Default)]
pub struct DockerArchive {
    pub files: Vec<(String, Vec<u8>)>,
    pub manifest: Vec<Value>,
}

impl DockerArchive {
    /// Adds an image the way Docker 20.10 writes it: each layer as
    /// `<id>/layer.tar` (compressed as its spec says, which Docker never
    /// does but other writers of the format may), the config's
    /// `rootfs.diff_ids` set to the uncompressed tars' digests, the config
    /// as `<its sha256>.json`. Returns the config's sha256 hex.
    pub fn image(&mut self, tags: &[&str], layers: &[LayerSpec], mut config: Value) -> String {
        let mut paths = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let id = hex::encode(Sha256::digest(
                format!("{}/{i}/{:?}", self.manifest.len(), tags).as_bytes(),
            ));
            let path = format!("{id}/layer.tar");
            self.files
                .push((path.clone(), compress(&layer.tar, layer.comp)));
            self.files.push((format!("{id}/VERSION"), b"1.0".to_vec()));
            paths.push(path);
            diff_ids.push(sha256(&layer.tar));
        }
        config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
        let bytes = serde_json::to_vec(&config).unwrap();
        let hex = hex::encode(Sha256::digest(&bytes));
        self.files.push((format!("{hex}.json"), bytes));
        self.manifest.push(json!({
            "Config": format!("{hex}.json"),
            "RepoTags": tags,
            "Layers": paths,
        }));
        hex
    }

    /// One image with the default config, these tags.
    pub fn single(tags: &[&str], layers: &[LayerSpec]) -> DockerArchive {
        let mut archive = DockerArchive::default();
        archive.image(tags, layers, default_config());
        archive
    }

    /// The tar's entries, manifest.json and repositories last, as Docker
    /// writes them.
    pub fn entries(&self) -> Vec<Entry> {
        let mut entries = Vec::new();
        for (name, data) in &self.files {
            if let Some((dir, _)) = name.rsplit_once('/') {
                let dir = format!("{dir}/");
                if !entries.iter().any(|e: &Entry| e.path == dir.as_bytes()) {
                    entries.push(Entry::dir(&dir));
                }
            }
            entries.push(Entry::file(name, data));
        }
        entries.push(Entry::file(
            "manifest.json",
            &serde_json::to_vec(&self.manifest).unwrap(),
        ));
        entries.push(Entry::file("repositories", b"{}"));
        entries
    }

    pub fn write_tar(&self, path: &Path) {
        std::fs::write(path, tar(&self.entries())).unwrap();
    }
}
