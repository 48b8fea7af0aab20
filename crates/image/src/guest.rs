//! What the minion and the guest init of an OCI image run as a VM agree on.
//!
//! A container image booted as a VM (`type: "vm"` naming an OCI image) is
//! started by the `phoenix` binary itself as the guest's PID 1 (`phoenix
//! guest-init`, from an initramfs the minion builds, see
//! [`crate::initramfs`]). Three things cross the VM boundary, all defined
//! here so both sides use one definition:
//!
//! - **The run** ([`GuestRun`]: argv, environment, working directory, user,
//!   hostname), written by the minion as JSON **after the end of the root
//!   disk's ext4 filesystem**: the disk file is the ext4 image, then the
//!   JSON, then a 512-byte footer ([`FOOTER`] bytes: [`MAGIC`], the JSON's
//!   offset and length, little-endian u64s). The guest reads the footer from
//!   the last sector of `/dev/vda`. Nothing else is needed (no config disk,
//!   no vsock, no firmware interface), the size is not bounded by the
//!   kernel command line, and each start gets its own (the disk is a fresh
//!   copy per start anyway). ext4 ignores what lies past its last block.
//! - **The kernel modules** to load, in order ([`MODULES`]), from
//!   [`MODULE_DIR`] in the initramfs, named `NN-NAME.ko` (or `.ko.xz`,
//!   which the guest asks the kernel to decompress).
//! - **The program's exit code**, reported through QEMU's `isa-debug-exit`
//!   device at port [`DEBUG_EXIT_PORT`]: a byte `v` written there makes
//!   QEMU exit with `(v << 1) | 1`. See [`exit_byte`] and [`decode_exit`].
//!   The guest also writes it into the footer sector ([`write_exit`], at
//!   [`EXIT_AT`]), where the minion reads it ([`read_exit`]) when it could
//!   not see QEMU's exit status: a QEMU adopted after a minion restart is
//!   not the minion's child.

use std::io::{self, Read, Seek, SeekFrom, Write};

/// The first bytes of the footer.
pub const MAGIC: &[u8; 16] = b"PHOENIX-GUEST-01";
/// The footer's size: the disk's last sector.
pub const FOOTER: u64 = 512;
/// Where in the footer sector the guest records the program's exit:
/// [`EXIT_MAGIC`], then the code (little-endian i32). Zeros (the footer as
/// [`append_run`] writes it) mean none was recorded.
pub const EXIT_AT: u64 = 256;
/// The first bytes of an exit record.
pub const EXIT_MAGIC: &[u8; 16] = b"PHOENIX-EXIT-01\0";
/// The largest run description accepted.
pub const MAX_RUN_BYTES: u64 = 4 << 20;
/// The I/O port of QEMU's `isa-debug-exit` device.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The initramfs directory holding the modules to load.
pub const MODULE_DIR: &str = "lib/modules/phoenix";
/// The modules a Debian cloud kernel needs for a virtio disk and network
/// (in load order), then the ACPI power button and its input device, so
/// the guest sees a stop. Modules built into the kernel are skipped;
/// dependencies `modules.dep` names are added before each.
pub const MODULES: [&str; 9] = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "button",
    "evdev",
];
/// Of [`MODULES`], those a guest cannot boot without.
pub const REQUIRED_MODULES: [&str; 7] = [
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
];

/// Whether the file at `path` is a VM image ([`crate::vm`]: zstd, by its
/// first bytes) rather than an OCI image to boot; `type: "vm"` takes both.
pub fn is_vm_image_file(path: &std::path::Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == [0x28, 0xb5, 0x2f, 0xfd])
}

/// Whether the registry file `name` (at `path`) is a VM image: named
/// `.zst` (then it must be one), or zstd by its content. Anything else
/// given to `type: "vm"` is an OCI image to boot.
pub fn is_vm_image(name: &str, path: &std::path::Path) -> bool {
    name.ends_with(".zst") || is_vm_image_file(path)
}

/// What the guest init runs: everything already resolved by the minion
/// (image config, spec, Phoenix's variables), so the guest decides nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestRun {
    /// The program and its arguments (`argv[0]` is looked up in `PATH`).
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries, later ones already removed where they repeat.
    pub env: Vec<String>,
    /// The working directory.
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// The guest's hostname (the service's name).
    pub hostname: String,
    /// The service's address, given to the guest's network device (/128).
    pub ip: Option<std::net::Ipv6Addr>,
    /// What the guest's `/etc/hosts` is to hold (the service's hosts
    /// file: its own name and the services its `link` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<String>,
}

/// Why a disk holds no run description.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("read the disk: {0}")]
    Io(#[from] io::Error),
    #[error("no phoenix run description at the end of the disk")]
    NoFooter,
    #[error("the run description is {0} bytes, over the limit")]
    TooLarge(u64),
    #[error("the run description is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Appends `run` to a disk image whose filesystem ends at its current
/// length (a multiple of 512).
pub fn append_run(disk: &mut (impl Write + Seek), run: &GuestRun) -> io::Result<()> {
    let json = serde_json::to_vec(run).map_err(io::Error::other)?;
    let offset = disk.seek(SeekFrom::End(0))?;
    if offset % FOOTER != 0 {
        return Err(io::Error::other(format!(
            "the disk's length ({offset}) is not a multiple of {FOOTER}"
        )));
    }
    disk.write_all(&json)?;
    let pad = (FOOTER - json.len() as u64 % FOOTER) % FOOTER;
    disk.write_all(&vec![0; pad as usize])?;
    let mut footer = [0u8; FOOTER as usize];
    footer[..16].copy_from_slice(MAGIC);
    footer[16..24].copy_from_slice(&offset.to_le_bytes());
    footer[24..32].copy_from_slice(&(json.len() as u64).to_le_bytes());
    disk.write_all(&footer)?;
    disk.flush()
}

/// Reads the run description [`append_run`] left at the end of `disk`.
pub fn read_run(disk: &mut (impl Read + Seek)) -> Result<GuestRun, RunError> {
    let size = disk.seek(SeekFrom::End(0))?;
    if size < FOOTER {
        return Err(RunError::NoFooter);
    }
    disk.seek(SeekFrom::Start(size - FOOTER))?;
    let mut footer = [0u8; FOOTER as usize];
    disk.read_exact(&mut footer)?;
    if &footer[..16] != MAGIC {
        return Err(RunError::NoFooter);
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&footer[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (offset, len) = (word(16), word(24));
    if len > MAX_RUN_BYTES {
        return Err(RunError::TooLarge(len));
    }
    if offset
        .checked_add(len)
        .is_none_or(|end| end > size - FOOTER)
    {
        return Err(RunError::NoFooter);
    }
    disk.seek(SeekFrom::Start(offset))?;
    let mut json = vec![0u8; len as usize];
    disk.read_exact(&mut json)?;
    Ok(serde_json::from_slice(&json)?)
}

/// Records exit code `code` (a [`shell_code`]) in the footer of `disk`,
/// which must hold a run description ([`append_run`]).
pub fn write_exit(disk: &mut (impl Read + Write + Seek), code: i32) -> io::Result<()> {
    let footer = footer_at(disk)?.ok_or_else(|| io::Error::other(RunError::NoFooter))?;
    let mut record = [0u8; 20];
    record[..16].copy_from_slice(EXIT_MAGIC);
    record[16..].copy_from_slice(&code.to_le_bytes());
    disk.seek(SeekFrom::Start(footer + EXIT_AT))?;
    disk.write_all(&record)?;
    disk.flush()
}

/// The exit code [`write_exit`] recorded on `disk`, if it did.
pub fn read_exit(disk: &mut (impl Read + Seek)) -> io::Result<Option<i32>> {
    let Some(footer) = footer_at(disk)? else {
        return Ok(None);
    };
    let mut record = [0u8; 20];
    disk.seek(SeekFrom::Start(footer + EXIT_AT))?;
    disk.read_exact(&mut record)?;
    if &record[..16] != EXIT_MAGIC {
        return Ok(None);
    }
    let mut code = [0u8; 4];
    code.copy_from_slice(&record[16..]);
    Ok(Some(i32::from_le_bytes(code)))
}

/// Where the footer of `disk` begins, if it has one.
fn footer_at(disk: &mut (impl Read + Seek)) -> io::Result<Option<u64>> {
    let size = disk.seek(SeekFrom::End(0))?;
    if size < FOOTER {
        return Ok(None);
    }
    let mut magic = [0u8; 16];
    disk.seek(SeekFrom::Start(size - FOOTER))?;
    disk.read_exact(&mut magic)?;
    Ok((&magic == MAGIC).then_some(size - FOOTER))
}

/// The exit code a shell would report for a program's end: its code, or
/// 128 + the signal that killed it.
pub fn shell_code(code: Option<i32>, signal: Option<i32>) -> i32 {
    match (code, signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 127,
    }
}

/// The code the guest init reports when it could not run the program at
/// all (as a shell does for a command it cannot run).
pub const INIT_FAILED: i32 = 127;

/// The byte the guest writes to [`DEBUG_EXIT_PORT`] for exit code `code`:
/// `code + 1`, with 126 standing for 126 and above (QEMU's exit status has
/// 8 bits, the low one always set, so 7 bits are left; 0 is QEMU's own
/// "error", so the code is shifted by one).
pub fn exit_byte(code: i32) -> u8 {
    (reported_code(code) + 1) as u8
}

/// The exit code the minion reports for a program that ended with `code`
/// ([`decode_exit`] of [`exit_byte`]): 0 to 125 exactly, 126 for 126 and
/// above. A code read back with [`read_exit`] is reported the same, so a
/// run's exit does not depend on how the minion learnt it.
pub fn reported_code(code: i32) -> i32 {
    code.clamp(0, 126)
}

/// The program's exit code from QEMU's exit status, when the guest
/// reported one through `isa-debug-exit` (odd and at least 3): 0 to 125
/// exactly, 126 for 126 and above (a program killed by a signal counts as
/// 128 + the signal; the console names it). `None`: QEMU ended otherwise
/// (0: the guest shut down or rebooted without reporting, as a kernel
/// panic does; 1: QEMU failed).
pub fn decode_exit(qemu_status: i32) -> Option<i32> {
    (qemu_status >= 3 && qemu_status % 2 == 1 && qemu_status <= 255)
        .then_some((qemu_status >> 1) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_survives_the_trip_through_the_disk() {
        let run = GuestRun {
            argv: vec!["/bin/app".into(), "--port".into(), "8000".into()],
            env: vec!["PATH=/bin".into(), "PHOENIX_IP=fd38::7".into()],
            cwd: "/srv".into(),
            uid: 1000,
            gid: 1000,
            hostname: "web".into(),
            ip: Some("fd38::7".parse().unwrap()),
            hosts: Some("fd38::7 web\n".into()),
        };
        let mut disk = std::io::Cursor::new(vec![7u8; 4096]);
        append_run(&mut disk, &run).unwrap();
        let bytes = disk.get_ref();
        assert_eq!(bytes.len() % 512, 0);
        assert_eq!(
            &bytes[..4096],
            &[7u8; 4096][..],
            "the filesystem is untouched"
        );
        assert_eq!(read_run(&mut disk).unwrap(), run);
        // A disk without one, or with a lying footer.
        let mut plain = std::io::Cursor::new(vec![0u8; 4096]);
        assert!(matches!(read_run(&mut plain), Err(RunError::NoFooter)));
        let mut bad = disk.into_inner();
        let n = bad.len();
        bad[n - 512 + 24..n - 512 + 32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            read_run(&mut std::io::Cursor::new(bad)),
            Err(RunError::TooLarge(_))
        ));
        // A disk whose length is not whole sectors is refused.
        let mut odd = std::io::Cursor::new(vec![0u8; 100]);
        assert!(append_run(&mut odd, &run).is_err());
    }

    #[test]
    fn an_exit_is_recorded_in_the_footer() {
        let run = GuestRun {
            argv: vec!["/bin/app".into()],
            ..GuestRun::default()
        };
        let mut disk = std::io::Cursor::new(vec![7u8; 4096]);
        append_run(&mut disk, &run).unwrap();
        assert_eq!(read_exit(&mut disk).unwrap(), None, "none yet");
        write_exit(&mut disk, 137).unwrap();
        assert_eq!(read_exit(&mut disk).unwrap(), Some(137));
        assert_eq!(read_run(&mut disk).unwrap(), run, "the run is untouched");
        assert_eq!(disk.get_ref().len(), 4096 + 1024, "nothing appended");
        assert_eq!(&disk.get_ref()[..4096], &[7u8; 4096][..]);
        write_exit(&mut disk, 0).unwrap();
        assert_eq!(read_exit(&mut disk).unwrap(), Some(0));
        // A disk without a run description: nothing read, nothing written.
        let mut plain = std::io::Cursor::new(vec![0u8; 4096]);
        assert_eq!(read_exit(&mut plain).unwrap(), None);
        assert!(write_exit(&mut plain, 1).is_err());
        assert_eq!(plain.get_ref(), &vec![0u8; 4096]);
        assert_eq!(reported_code(137), 126);
        assert_eq!(reported_code(3), 3);
    }

    #[test]
    fn exit_codes_cross_qemu() {
        let qemu = |code: i32| ((i32::from(exit_byte(code)) << 1) | 1) & 0xff;
        for code in 0..=125 {
            assert_eq!(decode_exit(qemu(code)), Some(code), "{code}");
        }
        assert_eq!(decode_exit(qemu(126)), Some(126));
        assert_eq!(decode_exit(qemu(255)), Some(126));
        assert_eq!(decode_exit(qemu(shell_code(None, Some(9)))), Some(126));
        assert_eq!(decode_exit(qemu(-1)), Some(0));
        assert_eq!(decode_exit(0), None, "a guest that never reported");
        assert_eq!(decode_exit(1), None, "QEMU's own failure");
        assert_eq!(decode_exit(2), None);
        assert_eq!(shell_code(Some(3), None), 3);
        assert_eq!(shell_code(None, Some(15)), 143);
    }
}
