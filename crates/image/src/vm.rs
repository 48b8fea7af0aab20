//! VM images: what a service of `type: "vm"` boots.
//!
//! # The format
//!
//! A VM image is one registry file, conventionally named `NAME.zst`: a
//! **zstd-compressed tar** (one or more zstd frames) whose members are all
//! at its top level (a leading `./` is allowed, so `tar -C dir .` works):
//!
//! | member | | what it is |
//! |---|---|---|
//! | `vmlinux` or `bzImage` | required, exactly one | the guest kernel: an ELF `vmlinux` (PVH) or an x86 `bzImage` (what distributions ship as `/boot/vmlinuz-*`) |
//! | `rootfs.ext4` | required | the root filesystem, an ext4 image; the guest sees it as `/dev/vda` (a fresh copy each start) |
//! | `initrd` | optional | an initramfs, for kernels whose virtio drivers are modules (it must load them and mount `/dev/vda`) |
//! | `config.json` | optional | `{"cmdline": "...", "cpus": 2, "memory_mib": 512}`: extra kernel arguments, and the size the VM gets when the spec sets no `cpus` / `memory` |
//!
//! Only regular files with those names are accepted (and the `.` directory):
//! a path with a `/` inside, `..`, a link, a device or any other member is
//! refused, naming it, as is a member given twice. So unpacking writes
//! exactly the listed names into a fresh directory and nothing else; there
//! is no path to resolve, so none can escape it (the files are created with
//! `O_EXCL | O_NOFOLLOW`). The kernel's and the root filesystem's magic
//! numbers are checked (`HdrS` at 0x202 or `\x7fELF`; ext4's `0xEF53` at
//! byte 1080), so a swapped or truncated file is refused at deploy rather
//! than found at boot. Runs of zero bytes are written as holes, so a
//! mostly empty `rootfs.ext4` takes only its used blocks on disk.
//!
//! [`check`] reads an image through without writing anything (the master
//! does, at deploy); [`unpack`] writes its members into a new directory,
//! all or nothing.
//!
//! Build one: `mkfs.ext4 -d rootdir rootfs.ext4 64M`, copy the kernel in as
//! `bzImage`, then `tar -C dir -c . | zstd > NAME.zst`.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The root filesystem member.
pub const ROOTFS: &str = "rootfs.ext4";
/// The optional initramfs member.
pub const INITRD: &str = "initrd";
/// The optional settings member.
pub const CONFIG: &str = "config.json";
/// The kernel members (exactly one must be there).
pub const KERNELS: [&str; 2] = ["vmlinux", "bzImage"];

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const MAX_CONFIG: u64 = 64 << 10;
const MAX_CMDLINE: usize = 1024;

/// Why a file is not a VM image phoenix can boot.
#[derive(Debug, thiserror::Error)]
pub enum VmImageError {
    #[error(
        "not zstd-compressed (a VM image is a zstd-compressed tar: tar -C DIR -c . | zstd > NAME.zst)"
    )]
    NotZstd,
    #[error("read: {0}")]
    Read(io::Error),
    #[error("member {entry:?} refused: {reason}")]
    Refused { entry: String, reason: &'static str },
    #[error("member {0:?} is there twice")]
    Duplicate(String),
    #[error("no {0} in the image")]
    Missing(&'static str),
    #[error("both vmlinux and bzImage are in the image; keep one")]
    TwoKernels,
    #[error("{member} is not {what}")]
    Format {
        member: &'static str,
        what: &'static str,
    },
    #[error("config.json: {0}")]
    Config(String),
    #[error("the image is over the limit of {0} uncompressed bytes")]
    TooLarge(u64),
    #[error("destination {path} already exists")]
    Exists { path: PathBuf },
    #[error("write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// `config.json`: settings for booting the image.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Appended to the kernel command line phoenix builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// vCPUs when the spec sets no `cpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Guest memory (MiB) when the spec sets no `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

/// What a valid image holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmImage {
    /// `vmlinux` or `bzImage`.
    pub kernel: &'static str,
    pub has_initrd: bool,
    pub config: VmConfig,
    /// Uncompressed size of `rootfs.ext4`.
    pub rootfs_bytes: u64,
}

/// Reads the image `path` through and checks it; writes nothing.
pub fn check(path: &Path, max_bytes: u64) -> Result<VmImage, VmImageError> {
    let f = File::open(path).map_err(VmImageError::Read)?;
    scan(f, None, max_bytes)
}

/// Unpacks the image `path` into `dest`, which must not exist: it is
/// created (0700) and holds the members by their names. On any error
/// `dest` is removed.
pub fn unpack(path: &Path, dest: &Path, max_bytes: u64) -> Result<VmImage, VmImageError> {
    crate::unpack::fresh_dir(dest).map_err(|e| match e {
        crate::unpack::FreshDirError::Exists => VmImageError::Exists {
            path: dest.to_owned(),
        },
        crate::unpack::FreshDirError::Io { path, source } => VmImageError::Write { path, source },
    })?;
    let result = File::open(path)
        .map_err(VmImageError::Read)
        .and_then(|f| scan(f, Some(dest), max_bytes));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    result
}

/// The member a tar path names, if it is one of ours.
fn member_name(raw: &[u8]) -> Result<&'static str, &'static str> {
    let s = std::str::from_utf8(raw).map_err(|_| "its name is not UTF-8")?;
    let s = s.strip_prefix("./").unwrap_or(s);
    if s.starts_with('/') {
        return Err("an absolute path");
    }
    if s.split('/').any(|c| c == "..") {
        return Err("its path climbs out of the image (..)");
    }
    if s.contains('/') {
        return Err("a VM image's members are all at its top level");
    }
    [ROOTFS, INITRD, CONFIG, KERNELS[0], KERNELS[1]]
        .into_iter()
        .find(|m| *m == s)
        .ok_or("not a member of a VM image (vmlinux or bzImage, rootfs.ext4, initrd, config.json)")
}

fn is_root_dir(raw: &[u8]) -> bool {
    matches!(raw, b"." | b"./" | b"" | b"/")
}

/// Reads the zstd tar from `file`; with `dest`, writes the members there.
fn scan(file: File, dest: Option<&Path>, max_bytes: u64) -> Result<VmImage, VmImageError> {
    let mut raw = io::BufReader::with_capacity(128 << 10, file);
    let mut magic = [0u8; 4];
    match raw.read_exact(&mut magic) {
        Ok(()) if magic == ZSTD_MAGIC => {}
        Ok(()) => return Err(VmImageError::NotZstd),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(VmImageError::NotZstd),
        Err(e) => return Err(VmImageError::Read(e)),
    }
    raw.seek(SeekFrom::Start(0)).map_err(VmImageError::Read)?;
    let zst = zstd::stream::read::Decoder::with_buffer(raw).map_err(VmImageError::Read)?;
    let mut archive = tar::Archive::new(zst);
    let mut seen: Vec<&'static str> = Vec::new();
    let mut config = VmConfig::default();
    let mut rootfs_bytes = 0;
    let mut total: u64 = 0;
    let mut buf = vec![0u8; 128 << 10];
    for entry in archive.entries().map_err(VmImageError::Read)? {
        let mut entry = entry.map_err(VmImageError::Read)?;
        let path_bytes = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&path_bytes).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() && is_root_dir(&path_bytes) {
            continue;
        }
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        let name = member_name(&path_bytes).map_err(|reason| VmImageError::Refused {
            entry: shown.clone(),
            reason,
        })?;
        if !kind.is_file() {
            return Err(VmImageError::Refused {
                entry: shown,
                reason: "not a regular file (links, directories and devices are refused)",
            });
        }
        if seen.contains(&name) {
            return Err(VmImageError::Duplicate(shown));
        }
        seen.push(name);
        let size = entry.size();
        total = total.saturating_add(size);
        if total > max_bytes {
            return Err(VmImageError::TooLarge(max_bytes));
        }
        if name == CONFIG {
            if size > MAX_CONFIG {
                return Err(VmImageError::Config(format!(
                    "{size} bytes, over the limit of {MAX_CONFIG}"
                )));
            }
            let mut text = Vec::new();
            entry.read_to_end(&mut text).map_err(VmImageError::Read)?;
            config = parse_config(&text)?;
            if let Some(d) = dest {
                write_new(&d.join(name), &text)?;
            }
            continue;
        }
        let mut out = match dest {
            Some(d) => Some(SparseWriter::create(&d.join(name))?),
            None => None,
        };
        let mut head: Vec<u8> = Vec::new();
        let mut copied = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(VmImageError::Read)?;
            if n == 0 {
                break;
            }
            copied += n as u64;
            if head.len() < 2048 {
                let take = (2048 - head.len()).min(n);
                head.extend_from_slice(&buf[..take]);
            }
            if let Some(out) = &mut out {
                out.write(&buf[..n])?;
            }
        }
        if let Some(out) = out {
            out.finish(copied)?;
        }
        check_magic(name, &head)?;
        if name == ROOTFS {
            rootfs_bytes = copied;
        }
    }
    let kernels: Vec<&'static str> = KERNELS.into_iter().filter(|k| seen.contains(k)).collect();
    let kernel = match kernels[..] {
        [] => return Err(VmImageError::Missing("kernel (vmlinux or bzImage)")),
        [k] => k,
        _ => return Err(VmImageError::TwoKernels),
    };
    if !seen.contains(&ROOTFS) {
        return Err(VmImageError::Missing("root filesystem (rootfs.ext4)"));
    }
    Ok(VmImage {
        kernel,
        has_initrd: seen.contains(&INITRD),
        config,
        rootfs_bytes,
    })
}

fn check_magic(name: &'static str, head: &[u8]) -> Result<(), VmImageError> {
    let bad = |what| Err(VmImageError::Format { member: name, what });
    match name {
        "bzImage" if head.get(0x202..0x206) != Some(b"HdrS") => {
            bad("an x86 bzImage (no \"HdrS\" header at 0x202)")
        }
        "vmlinux" if head.get(..4) != Some(b"\x7fELF") => bad("an ELF kernel"),
        ROOTFS if head.get(1080..1082) != Some(&[0x53, 0xef]) => {
            bad("an ext4 filesystem image (no ext4 magic at byte 1080)")
        }
        _ => Ok(()),
    }
}

fn parse_config(text: &[u8]) -> Result<VmConfig, VmImageError> {
    let c: VmConfig =
        serde_json::from_slice(text).map_err(|e| VmImageError::Config(e.to_string()))?;
    if let Some(cmd) = &c.cmdline
        && (cmd.len() > MAX_CMDLINE || cmd.chars().any(|ch| ch.is_control()))
    {
        return Err(VmImageError::Config(format!(
            "cmdline must be one line of at most {MAX_CMDLINE} bytes"
        )));
    }
    if c.cpus == Some(0) || c.cpus.is_some_and(|n| n > 255) {
        return Err(VmImageError::Config("cpus must be 1 to 255".into()));
    }
    if c.memory_mib.is_some_and(|m| !(16..=1 << 20).contains(&m)) {
        return Err(VmImageError::Config(
            "memory_mib must be 16 to 1048576".into(),
        ));
    }
    Ok(c)
}

fn create_new(path: &Path) -> Result<File, VmImageError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| VmImageError::Write {
            path: path.to_owned(),
            source,
        })
}

fn write_new(path: &Path, data: &[u8]) -> Result<(), VmImageError> {
    create_new(path)?
        .write_all(data)
        .map_err(|source| VmImageError::Write {
            path: path.to_owned(),
            source,
        })
}

/// Writes a file, leaving holes where whole 4 KiB blocks are zero.
struct SparseWriter {
    file: File,
    path: PathBuf,
}

impl SparseWriter {
    fn create(path: &Path) -> Result<SparseWriter, VmImageError> {
        Ok(SparseWriter {
            file: create_new(path)?,
            path: path.to_owned(),
        })
    }

    fn err(&self) -> impl FnOnce(io::Error) -> VmImageError + '_ {
        |source| VmImageError::Write {
            path: self.path.clone(),
            source,
        }
    }

    fn write(&mut self, data: &[u8]) -> Result<(), VmImageError> {
        for block in data.chunks(4096) {
            if block.iter().all(|&b| b == 0) {
                self.file
                    .seek(SeekFrom::Current(block.len() as i64))
                    .map_err(self.err())?;
            } else {
                self.file.write_all(block).map_err(self.err())?;
            }
        }
        Ok(())
    }

    fn finish(self, len: u64) -> Result<(), VmImageError> {
        self.file.set_len(len).map_err(self.err())?;
        self.file.sync_all().map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext4_head() -> Vec<u8> {
        let mut v = vec![0u8; 8192];
        v[1080] = 0x53;
        v[1081] = 0xef;
        v[5000] = 7;
        v
    }

    fn bzimage() -> Vec<u8> {
        let mut v = vec![1u8; 1024];
        v[0x202..0x206].copy_from_slice(b"HdrS");
        v
    }

    /// A zstd tar of `(path, data)` members (regular files), written
    /// with raw headers so hostile names get through.
    fn image(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            b.append(&h, &data[..]).unwrap();
        }
        zstd::encode_all(&b.into_inner().unwrap()[..], 1).unwrap()
    }

    fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("img.zst");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn a_good_image_checks_and_unpacks() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            &image(&[
                ("./bzImage", bzimage()),
                ("rootfs.ext4", ext4_head()),
                ("initrd", b"cpio".to_vec()),
                ("config.json", br#"{"cmdline":"quiet","cpus":2}"#.to_vec()),
            ]),
        );
        let info = check(&p, 1 << 30).unwrap();
        assert_eq!(info.kernel, "bzImage");
        assert!(info.has_initrd);
        assert_eq!(info.config.cpus, Some(2));
        assert_eq!(info.rootfs_bytes, 8192);
        let dest = dir.path().join("out");
        assert_eq!(unpack(&p, &dest, 1 << 30).unwrap(), info);
        assert_eq!(
            std::fs::read(dest.join("rootfs.ext4")).unwrap(),
            ext4_head()
        );
        assert_eq!(std::fs::read(dest.join("bzImage")).unwrap(), bzimage());
        // A second unpack into the same place is refused.
        assert!(matches!(
            unpack(&p, &dest, 1 << 30),
            Err(VmImageError::Exists { .. })
        ));
    }

    #[test]
    fn hostile_and_incomplete_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = |bytes: Vec<u8>| {
            let p = write(dir.path(), &bytes);
            let checked = check(&p, 1 << 30).unwrap_err().to_string();
            let dest = dir.path().join("dest");
            let unpacked = unpack(&p, &dest, 1 << 30).unwrap_err().to_string();
            assert_eq!(checked, unpacked);
            assert!(!dest.exists(), "a failed unpack leaves nothing");
            checked
        };
        // Not zstd: a plain tar, and garbage.
        let mut plain = tar::Builder::new(Vec::new());
        plain
            .append_data(&mut tar::Header::new_gnu(), "bzImage", &bzimage()[..])
            .unwrap();
        assert!(err(plain.into_inner().unwrap()).contains("not zstd-compressed"));
        assert!(err(b"hello".to_vec()).contains("not zstd-compressed"));
        // Paths out of the root, or anywhere but the top.
        let e = err(image(&[("../rootfs.ext4", ext4_head())]));
        assert!(
            e.contains("\"../rootfs.ext4\"") && e.contains("climbs out"),
            "{e}"
        );
        let e = err(image(&[("/etc/passwd", vec![1])]));
        assert!(e.contains("absolute"), "{e}");
        let e = err(image(&[("a/../../x", vec![1])]));
        assert!(e.contains("climbs out"), "{e}");
        let e = err(image(&[("boot/bzImage", bzimage())]));
        assert!(e.contains("top level"), "{e}");
        let e = err(image(&[("evil", vec![1])]));
        assert!(e.contains("not a member"), "{e}");
        // A symlink named like a member.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "rootfs.ext4", "/etc/shadow").unwrap();
        let e = err(zstd::encode_all(&b.into_inner().unwrap()[..], 1).unwrap());
        assert!(e.contains("not a regular file"), "{e}");
        // Missing members, named.
        let e = err(image(&[("bzImage", bzimage())]));
        assert_eq!(e, "no root filesystem (rootfs.ext4) in the image");
        let e = err(image(&[("rootfs.ext4", ext4_head())]));
        assert_eq!(e, "no kernel (vmlinux or bzImage) in the image");
        // Wrong content, twice, both kernels, bad config.
        let e = err(image(&[
            ("bzImage", bzimage()),
            ("rootfs.ext4", vec![0; 4096]),
        ]));
        assert!(e.contains("rootfs.ext4 is not an ext4"), "{e}");
        let e = err(image(&[("bzImage", vec![0; 4096])]));
        assert!(e.contains("bzImage is not an x86 bzImage"), "{e}");
        let e = err(image(&[("bzImage", bzimage()), ("./bzImage", bzimage())]));
        assert!(e.contains("twice"), "{e}");
        let e = err(image(&[
            ("bzImage", bzimage()),
            ("vmlinux", b"\x7fELF".to_vec()),
            ("rootfs.ext4", ext4_head()),
        ]));
        assert!(e.contains("both"), "{e}");
        let e = err(image(&[
            ("bzImage", bzimage()),
            ("rootfs.ext4", ext4_head()),
            ("config.json", br#"{"vcpus":2}"#.to_vec()),
        ]));
        assert!(e.contains("config.json") && e.contains("vcpus"), "{e}");
        // Over the size limit.
        let p = write(
            dir.path(),
            &image(&[("bzImage", bzimage()), ("rootfs.ext4", ext4_head())]),
        );
        assert!(matches!(check(&p, 4096), Err(VmImageError::TooLarge(4096))));
    }

    #[test]
    fn zero_blocks_become_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let mut rootfs = ext4_head();
        rootfs.resize(8 << 20, 0);
        let p = write(
            dir.path(),
            &image(&[("bzImage", bzimage()), ("rootfs.ext4", rootfs)]),
        );
        let dest = dir.path().join("out");
        unpack(&p, &dest, 1 << 30).unwrap();
        let m = std::fs::metadata(dest.join("rootfs.ext4")).unwrap();
        assert_eq!(m.len(), 8 << 20);
        // tmpfs and ext4 both keep holes; a few blocks are allocated.
        assert!(m.blocks() * 512 < 1 << 20, "{} blocks", m.blocks());
    }
}
