//! Builds OCI images for tests: files from the host (with the shared
//! libraries a dynamic binary needs), written as an OCI image layout in a tar.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// One layer: paths in the image → files on the host.
#[derive(Default)]
pub struct Layer {
    files: BTreeMap<String, PathBuf>,
    symlinks: BTreeMap<String, String>,
    /// Leave out entries for parent directories (for hostile layers).
    bare: bool,
}

impl Layer {
    /// Adds a host file at `at`, and, if it is a dynamic binary, the shared
    /// libraries `ldd` lists at their own paths.
    pub fn binary(mut self, at: &str, host: &Path) -> Layer {
        self.files
            .insert(at.trim_start_matches('/').to_owned(), host.to_owned());
        let out = Command::new("ldd").arg(host).output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
                let path = line
                    .split("=>")
                    .last()
                    .unwrap_or("")
                    .split_whitespace()
                    .next()
                    .unwrap_or("");
                if path.starts_with('/') && Path::new(path).exists() {
                    let real = std::fs::canonicalize(path).unwrap();
                    self.files
                        .insert(path.trim_start_matches('/').to_owned(), real);
                }
            }
        }
        self
    }

    /// Writes no parent directory entries, so a path can go through
    /// whatever a lower layer put there (a symlink, say).
    pub fn bare(mut self) -> Layer {
        self.bare = true;
        self
    }

    /// The files of the layer: image path → host path.
    pub fn files(&self) -> &BTreeMap<String, PathBuf> {
        &self.files
    }

    pub fn symlink(mut self, at: &str, target: &str) -> Layer {
        self.symlinks
            .insert(at.trim_start_matches('/').to_owned(), target.to_owned());
        self
    }

    fn tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut dirs = std::collections::BTreeSet::new();
        for p in self
            .files
            .keys()
            .chain(self.symlinks.keys())
            .filter(|_| !self.bare)
        {
            let mut acc = PathBuf::new();
            let parent = Path::new(p)
                .parent()
                .map(Path::to_owned)
                .unwrap_or_default();
            for c in parent.components() {
                acc.push(c);
                dirs.insert(acc.clone());
            }
        }
        for d in dirs {
            let mut h = header();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            b.append_data(&mut h, &d, std::io::empty()).unwrap();
        }
        for (at, host) in &self.files {
            let data = std::fs::read(host).unwrap();
            let mut h = header();
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, at, data.as_slice()).unwrap();
        }
        for (at, target) in &self.symlinks {
            let mut h = header();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            b.append_link(&mut h, at, target).unwrap();
        }
        b.into_inner().unwrap()
    }
}

/// A header with owner and time set, as every real tool writes them.
fn header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn digest(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// Image config fields (the `config` object of an OCI image config).
pub fn config(entrypoint: &[&str], env: &[&str]) -> Value {
    json!({ "Entrypoint": entrypoint, "Env": env })
}

/// Writes an OCI image layout tar at `out` with one image per (tag, layers, config).
pub fn write_tar(out: &Path, images: &[(&str, Vec<Layer>, Value)]) {
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut manifests = Vec::new();
    for (tag, layers, cfg) in images {
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        for l in layers {
            let data = l.tar();
            let d = digest(&data);
            diff_ids.push(d.clone());
            layer_descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": data.len()}));
            blobs.insert(d, data);
        }
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux", "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let cd = digest(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": layer_descs,
        }))
        .unwrap();
        blobs.insert(cd, config);
        let md = digest(&manifest);
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        blobs.insert(md, manifest);
    }
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests})).unwrap();
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = header();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for (d, data) in &blobs {
        add(
            &format!("blobs/sha256/{}", d.trim_start_matches("sha256:")),
            data,
        );
    }
    b.into_inner().unwrap();
}

/// The testy image: testy (with its libraries) as the entrypoint, busybox
/// as /bin/sh.
pub fn testy_layers() -> Vec<Layer> {
    let mut l = Layer::default().binary("/testy", &crate::bin("testy"));
    if Path::new("/bin/busybox").exists() {
        l = l
            .binary("/bin/busybox", Path::new("/bin/busybox"))
            .symlink("/bin/sh", "busybox");
    }
    vec![l]
}
