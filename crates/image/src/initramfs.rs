//! The pieces of a guest initramfs: a `newc` cpio writer, and what the
//! minion reads from ELF files, kernels and `/lib/modules` to fill one.
//!
//! The initramfs of an OCI image run as a VM holds the `phoenix` binary as
//! `/init` (the guest's PID 1, `phoenix guest-init`), the ELF interpreter
//! and shared libraries it is linked against at their own paths, the
//! kernel modules of [`crate::guest::MODULES`], and `/dev/console`. Every
//! function here is pure (bytes and text in, bytes or names out); the
//! minion does the file system work.

use std::collections::BTreeSet;
use std::io::{self, Write};

/// The kernel's cpio format: "new ASCII" (`070701`), no checksums.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const S_IFLNK: u32 = 0o120000;

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter {
            out,
            written: 0,
            ino: 0,
            dirs: BTreeSet::new(),
        }
    }

    fn raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.raw(&[0u8; 3][..n as usize])
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> io::Result<()> {
        if name.is_empty() || name.starts_with('/') || name.split('/').any(|c| c == "..") {
            return Err(io::Error::other(format!(
                "cpio entry {name:?}: not a relative path"
            )));
        }
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.raw(header.as_bytes())?;
        self.raw(name.as_bytes())?;
        self.raw(&[0])?;
        self.pad()?;
        self.raw(data)?;
        self.pad()
    }

    /// Entries for the parents of `path` not written yet (0755).
    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let dir = path[..at + i].to_owned();
            at += i + 1;
            if self.dirs.insert(dir.clone()) {
                self.entry(&dir, S_IFDIR | 0o755, &[], (0, 0))?;
            }
        }
        Ok(())
    }

    /// A directory (and its parents). Paths are relative: `dev`, `lib/x`.
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        self.parents(path)?;
        if self.dirs.insert(path.to_owned()) {
            self.entry(path, S_IFDIR | (mode & 0o7777), &[], (0, 0))?;
        }
        Ok(())
    }

    /// A regular file (and its parents).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFREG | (mode & 0o7777), data, (0, 0))
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFLNK | 0o777, target.as_bytes(), (0, 0))
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFCHR | (mode & 0o7777), &[], (major, minor))
    }

    /// Writes the trailer; the writer back.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        // The kernel reads the archive in 512-byte blocks, as cpio writes it.
        let n = (512 - self.written % 512) % 512;
        self.raw(&vec![0u8; n as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Why an ELF file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64,
    #[error("truncated ELF file")]
    Truncated,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ElfError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(ElfError::Truncated)
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ElfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(ElfError::Truncated)
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, ElfError> {
    let s = b.get(at..at + 8).ok_or(ElfError::Truncated)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

/// An ELF64 program header: (type, file offset, size in the file).
fn program_headers(elf: &[u8]) -> Result<Vec<(u32, u64, u64)>, ElfError> {
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err(ElfError::NotElf64);
    }
    let phoff = u64_at(elf, 0x20)? as usize;
    let phentsize = u16_at(elf, 0x36)? as usize;
    let phnum = u16_at(elf, 0x38)? as usize;
    (0..phnum)
        .map(|i| {
            let at = phoff + i * phentsize;
            Ok((
                u32_at(elf, at)?,
                u64_at(elf, at + 8)?,
                u64_at(elf, at + 32)?,
            ))
        })
        .collect()
}

/// The ELF interpreter (`PT_INTERP`) of a dynamic executable; `None` for
/// a static one.
pub fn elf_interpreter(elf: &[u8]) -> Result<Option<String>, ElfError> {
    const PT_INTERP: u32 = 3;
    for (kind, offset, size) in program_headers(elf)? {
        if kind == PT_INTERP {
            let s = elf
                .get(offset as usize..(offset + size) as usize)
                .ok_or(ElfError::Truncated)?;
            let s = s.split(|&b| b == 0).next().unwrap_or_default();
            return Ok(Some(String::from_utf8_lossy(s).into_owned()));
        }
    }
    Ok(None)
}

/// How many leading bytes of an ELF executable its segments use: what
/// the loader reads. Section headers and sections no segment covers
/// (debug information, symbol tables) lie after it in files the usual
/// linkers write, and a process runs the same without them (as
/// ELFkickers' `sstrip` does). With [`strip_sections`], a debug build's
/// init costs the guest its code, not its debug information.
pub fn loaded_len(elf: &[u8]) -> Result<u64, ElfError> {
    let phoff = u64_at(elf, 0x20)?;
    let phentsize = u64::from(u16_at(elf, 0x36)?);
    let phnum = u64::from(u16_at(elf, 0x38)?);
    let mut end = phoff + phentsize * phnum;
    for (_, offset, size) in program_headers(elf)? {
        end = end.max(offset + size);
    }
    Ok(end.max(64))
}

/// `elf` cut to [`loaded_len`], its section header table dropped from the
/// ELF header. Unchanged when a section header table lies inside the
/// loaded part (nothing to gain, and something might rely on it).
pub fn strip_sections(elf: &[u8]) -> Result<Vec<u8>, ElfError> {
    let end = loaded_len(elf)?;
    let shoff = u64_at(elf, 0x28)?;
    if shoff != 0 && shoff < end || end >= elf.len() as u64 {
        return Ok(elf.to_vec());
    }
    let mut out = elf[..end as usize].to_vec();
    out[0x28..0x30].copy_from_slice(&0u64.to_le_bytes()); // e_shoff
    out[0x3a..0x3c].copy_from_slice(&0u16.to_le_bytes()); // e_shentsize
    out[0x3c..0x3e].copy_from_slice(&0u16.to_le_bytes()); // e_shnum
    out[0x3e..0x40].copy_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    Ok(out)
}

/// The files the dynamic loader's `--list` (what `ldd` prints) names:
/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO (no path) is skipped.
pub fn parse_ld_list(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            return Err(format!("a library is missing: {line}"));
        }
        let path = line
            .rsplit("=>")
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') && !out.iter().any(|p| p == path) {
            out.push(path.to_owned());
        }
    }
    Ok(out)
}

/// The release (`uname -r`) of an x86 bzImage, from its setup header's
/// `kernel_version` string: what names its `/lib/modules` directory.
pub fn bzimage_release(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return None;
    }
    let at = u16_at(image, 0x20e).ok()?;
    if at == 0 {
        return None;
    }
    let start = 0x200 + usize::from(at);
    let s = image.get(start..start.saturating_add(256).min(image.len()))?;
    let s = s.split(|&b| b == 0).next()?;
    let release = std::str::from_utf8(s).ok()?.split_whitespace().next()?;
    (!release.is_empty()).then(|| release.to_owned())
}

/// A module's name from its path in `modules.dep`: `kernel/a/virtio_ring.ko.xz`
/// → `virtio_ring` (dashes read as underscores, as the kernel does).
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Where each wanted module is, relative to `/lib/modules/RELEASE`, from
/// `modules.dep` and `modules.builtin`: dependencies first, each once, in
/// the order given; built-in modules are left out. The names not found
/// in either are returned second.
pub fn resolve_modules(dep: &str, builtin: &str, wanted: &[&str]) -> (Vec<String>, Vec<String>) {
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let deps: Vec<(String, Vec<String>)> = dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((
                m.trim().to_owned(),
                d.split_whitespace().map(String::from).collect(),
            ))
        })
        .collect();
    let find = |name: &str| deps.iter().find(|(p, _)| module_name(p) == name);
    let (mut out, mut missing) = (Vec::<String>::new(), Vec::new());
    for name in wanted {
        let name = name.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        let Some((path, ds)) = find(&name) else {
            missing.push(name);
            continue;
        };
        // modules.dep lists what a module needs nearest first: load the
        // farthest first.
        for d in ds.iter().rev().chain(std::iter::once(path)) {
            if !out.contains(d) {
                out.push(d.clone());
            }
        }
    }
    (out, missing)
}

/// A module file as the guest loads it, and the name it gets there:
/// `.ko.zst` and `.ko.gz` are decompressed here, `.ko.xz` is kept for the
/// kernel to decompress (the guest init passes
/// `MODULE_INIT_COMPRESSED_FILE` for it), `.ko` is as it is.
pub fn module_for_guest(path: &str, data: Vec<u8>) -> io::Result<(Vec<u8>, &'static str)> {
    if path.ends_with(".ko.zst") {
        Ok((zstd::decode_all(&data[..])?, ".ko"))
    } else if path.ends_with(".ko.gz") {
        let mut out = Vec::new();
        io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&data[..]), &mut out)?;
        Ok((out, ".ko"))
    } else if path.ends_with(".ko.xz") {
        Ok((data, ".ko.xz"))
    } else if path.ends_with(".ko") {
        Ok((data, ".ko"))
    } else {
        Err(io::Error::other(format!(
            "{path}: not a kernel module (.ko, .ko.xz, .ko.zst, .ko.gz)"
        )))
    }
}

/// A module's name from its path (public for the minion's messages).
pub fn module_name_of(path: &str) -> String {
    module_name(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a newc archive back: (name, mode, data, rdev major, minor).
    fn read_cpio(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>, u32, u32)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701", "at {off}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name = std::str::from_utf8(&b[110..110 + namesize as usize - 1])
                .unwrap()
                .to_owned();
            let data_at = (110 + namesize as usize).div_ceil(4) * 4;
            let data = b[data_at..data_at + size as usize].to_vec();
            let next = (data_at + size as usize).div_ceil(4) * 4;
            off += next;
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.iter().all(|&x| x == 0));
                assert_eq!((off + b.len()) % 512, 0);
                return out;
            }
            out.push((name, mode, data, rmaj, rmin));
        }
    }

    #[test]
    fn cpio_archives_read_back() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("lib/x86_64-linux-gnu/libc.so.6", 0o755, b"libc")
            .unwrap();
        w.file("lib/x86_64-linux-gnu/libm.so.6", 0o644, b"m")
            .unwrap();
        w.symlink("lib64", "lib").unwrap();
        w.file("init", 0o755, b"\x7fELF12345").unwrap();
        assert!(w.file("../evil", 0o644, b"").is_err());
        assert!(w.file("/abs", 0o644, b"").is_err());
        let entries = read_cpio(&w.finish().unwrap());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "lib",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib/x86_64-linux-gnu/libm.so.6",
                "lib64",
                "init"
            ]
        );
        assert_eq!(entries[1].1, 0o020600);
        assert_eq!((entries[1].3, entries[1].4), (5, 1));
        assert_eq!(entries[4].2, b"libc");
        assert_eq!(entries[6].1, 0o120777);
        assert_eq!(entries[6].2, b"lib");
        assert_eq!(entries[7].1, 0o100755);
    }

    /// A minimal ELF64 with one PT_INTERP and one PT_LOAD segment, and
    /// section data past them.
    fn elf() -> Vec<u8> {
        let mut e = vec![0u8; 0x400];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[0x28..0x30].copy_from_slice(&0x300u64.to_le_bytes()); // e_shoff
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        e[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        let ph = |e: &mut Vec<u8>, i: usize, kind: u32, off: u64, size: u64| {
            let at = 64 + i * 56;
            e[at..at + 4].copy_from_slice(&kind.to_le_bytes());
            e[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
            e[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        };
        ph(&mut e, 0, 3, 0x100, 28);
        ph(&mut e, 1, 1, 0, 0x200);
        e[0x100..0x11b].copy_from_slice(b"/lib64/ld-linux-x86-64.so.2");
        e
    }

    #[test]
    fn elf_interpreter_and_stripping() {
        let e = elf();
        assert_eq!(
            elf_interpreter(&e).unwrap().as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(loaded_len(&e).unwrap(), 0x200);
        let s = strip_sections(&e).unwrap();
        assert_eq!(s.len(), 0x200);
        assert_eq!(u64_at(&s, 0x28).unwrap(), 0);
        assert_eq!(u16_at(&s, 0x3c).unwrap(), 0);
        assert_eq!(&s[0x100..0x11b], b"/lib64/ld-linux-x86-64.so.2");
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), Err(ElfError::NotElf64));
        // The running test binary: dynamic, and strippable.
        let me = std::fs::read("/proc/self/exe").unwrap();
        if let Some(interp) = elf_interpreter(&me).unwrap() {
            assert!(interp.starts_with('/'), "{interp}");
        }
        assert!(strip_sections(&me).unwrap().len() <= me.len());
    }

    #[test]
    fn ld_list_output_names_the_libraries() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ld_list(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(
            parse_ld_list("\tlibfoo.so => not found\n")
                .unwrap_err()
                .contains("libfoo")
        );
    }

    #[test]
    fn a_bzimage_names_its_release() {
        let mut k = vec![0u8; 0x1000];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let v = b"6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        k[0x500..0x500 + v.len()].copy_from_slice(v);
        assert_eq!(bzimage_release(&k).as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(bzimage_release(&[0u8; 0x1000]), None);
        // This machine's kernels, where there are any.
        for e in std::fs::read_dir("/boot").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(release) = name.strip_prefix("vmlinuz-")
                && let Ok(bytes) = std::fs::read(e.path())
            {
                assert_eq!(bzimage_release(&bytes).as_deref(), Some(release));
            }
        }
    }

    #[test]
    fn modules_resolve_with_their_dependencies() {
        let dep = "kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/virtio/virtio.ko:\n\
                   kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
                   kernel/net/core/failover.ko:\n";
        let builtin = "kernel/drivers/input/evdev.ko\n";
        let (paths, missing) = resolve_modules(
            dep,
            builtin,
            &["virtio_blk", "virtio", "net-failover", "evdev", "button"],
        );
        assert_eq!(
            paths,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko.xz",
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
            ]
        );
        assert_eq!(missing, ["button"]);
    }

    #[test]
    fn compressed_modules_are_opened_or_left_to_the_kernel() {
        let ko = b"\x7fELF module".to_vec();
        let zst = zstd::encode_all(&ko[..], 3).unwrap();
        assert_eq!(
            module_for_guest("a/virtio.ko.zst", zst).unwrap(),
            (ko.clone(), ".ko")
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &ko).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(
            module_for_guest("a/virtio.ko.gz", gz).unwrap(),
            (ko.clone(), ".ko")
        );
        assert_eq!(
            module_for_guest("a/virtio.ko.xz", vec![1]).unwrap(),
            (vec![1], ".ko.xz")
        );
        assert_eq!(
            module_for_guest("a/virtio.ko", ko.clone()).unwrap(),
            (ko, ".ko")
        );
        assert!(module_for_guest("a/virtio.txt", vec![]).is_err());
        assert_eq!(
            module_name_of("kernel/x/net-failover.ko.xz"),
            "net_failover"
        );
    }
}
