//! Unpacking: entry kinds, metadata, whiteouts, limits.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;
use phoenix_image::{Image, Limits, UnpackError, open, unpack};

/// Writes a one-image layout dir in `tmp/image` and opens it.
fn image_of(tmp: &Path, layers: &[LayerSpec]) -> Image {
    let dir = tmp.join("image");
    Layout::single(layers).write_dir(&dir);
    open(&dir, None).unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    uid == 0
}

#[test]
fn whiteouts_and_opaque_directories_across_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let lower = LayerSpec::new(
        &[
            Entry::dir("etc/"),
            Entry::file("etc/keep", b"keep"),
            Entry::file("etc/gone", b"gone"),
            Entry::dir("etc/gonedir/"),
            Entry::file("etc/gonedir/inner", b"x"),
            Entry::dir("opq/"),
            Entry::file("opq/old1", b"old"),
            Entry::dir("opq/olddir/"),
            Entry::file("opq/olddir/old2", b"old"),
            Entry::dir("opq/shared/"),
            Entry::file("opq/shared/old3", b"old"),
        ],
        Comp::Gzip,
    );
    let upper = LayerSpec::new(
        &[
            Entry::file("etc/.wh.gone", b""),
            Entry::file("etc/.wh.gonedir", b""),
            Entry::file("etc/.wh.never-existed", b""),
            Entry::dir("opq/"),
            // Same-layer content before and after the marker stays.
            Entry::file("opq/new-before", b"new"),
            Entry::dir("opq/shared/"),
            Entry::file("opq/shared/new", b"new"),
            Entry::file("opq/.wh..wh..opq", b""),
            Entry::file("opq/new-after", b"new"),
        ],
        Comp::Zstd,
    );
    let image = image_of(tmp.path(), &[lower, upper]);
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();

    assert_eq!(std::fs::read(dest.join("etc/keep")).unwrap(), b"keep");
    assert!(!dest.join("etc/gone").exists());
    assert!(!dest.join("etc/gonedir").exists());
    assert!(
        !dest.join("etc/.wh.gone").exists(),
        "whiteout files are not created"
    );
    let mut opq: Vec<String> = std::fs::read_dir(dest.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    opq.sort();
    assert_eq!(opq, ["new-after", "new-before", "shared"]);
    let shared: Vec<String> = std::fs::read_dir(dest.join("opq/shared"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        shared,
        ["new"],
        "the lower shared/old3 is hidden by the opaque parent"
    );
}

#[test]
fn hard_links_and_symlinks() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = LayerSpec::new(
        &[
            Entry::dir("bin/"),
            Entry::file("bin/busybox", b"BUSYBOX").mode(0o755),
            Entry::hardlink("bin/sh", "bin/busybox"),
            Entry::hardlink("bin/ls", "./bin/busybox"),
            Entry::symlink("bin/ash", "busybox"),
            // Symlinks may point anywhere: they are only created.
            Entry::symlink("etc-link", "/etc"),
            Entry::symlink("up", "../../.."),
            Entry::symlink("dangling", "/nonexistent/thing"),
            // A hard link to a symlink links the symlink itself.
            Entry::hardlink("ash2", "bin/ash"),
        ],
        Comp::None,
    );
    // A hard link to a file from a lower layer.
    let upper = LayerSpec::new(&[Entry::hardlink("bin/cat", "bin/busybox")], Comp::Gzip);
    let image = image_of(tmp.path(), &[layer, upper]);
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();

    let ino = |p: &str| std::fs::symlink_metadata(dest.join(p)).unwrap().ino();
    assert_eq!(ino("bin/sh"), ino("bin/busybox"));
    assert_eq!(ino("bin/ls"), ino("bin/busybox"));
    assert_eq!(ino("bin/cat"), ino("bin/busybox"));
    assert_eq!(
        std::fs::symlink_metadata(dest.join("bin/busybox"))
            .unwrap()
            .nlink(),
        4
    );
    assert_eq!(
        std::fs::read_link(dest.join("bin/ash")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(std::fs::read(dest.join("bin/ash")).unwrap(), b"BUSYBOX");
    assert_eq!(
        std::fs::read_link(dest.join("etc-link")).unwrap(),
        Path::new("/etc")
    );
    assert_eq!(
        std::fs::read_link(dest.join("up")).unwrap(),
        Path::new("../../..")
    );
    assert_eq!(
        std::fs::read_link(dest.join("ash2")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(ino("ash2"), ino("bin/ash"));
}

#[test]
fn modes_owners_times_xattrs() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = LayerSpec::new(
        &[
            Entry::dir("usr/").mode(0o755).mtime(1_500_000_000),
            Entry::dir("usr/bin/")
                .mode(0o750)
                .owner(0, 7)
                .mtime(1_400_000_000),
            Entry::file("usr/bin/su", b"su")
                .mode(0o4755)
                .mtime(1_300_000_000),
            Entry::file("usr/bin/wall", b"wall")
                .mode(0o2755)
                .owner(0, 5),
            Entry::file("usr/bin/secret", b"s")
                .mode(0o600)
                .owner(1234, 4321),
            Entry::dir("tmp/").mode(0o1777),
            Entry::dir("ro/").mode(0o555),
            Entry::file("ro/file", b"in a read-only dir").mode(0o444),
            Entry::file("precise", b"p").pax("mtime", b"1700000000.25"),
            Entry::file("with-xattr", b"x").pax("SCHILY.xattr.user.phoenix", b"yes"),
            Entry::symlink("link", "usr/bin/su")
                .owner(1234, 4321)
                .mtime(1_200_000_000),
        ],
        Comp::Gzip,
    );
    let image = image_of(tmp.path(), &[layer]);
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();

    let meta = |p: &str| std::fs::symlink_metadata(dest.join(p)).unwrap();
    assert_eq!(meta("usr/bin/su").permissions().mode() & 0o7777, 0o4755);
    assert_eq!(meta("usr/bin/wall").permissions().mode() & 0o7777, 0o2755);
    assert_eq!(meta("usr/bin/secret").permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta("usr/bin").permissions().mode() & 0o7777, 0o750);
    assert_eq!(meta("tmp").permissions().mode() & 0o7777, 0o1777);
    assert_eq!(meta("ro").permissions().mode() & 0o7777, 0o555);
    assert_eq!(meta("ro/file").permissions().mode() & 0o7777, 0o444);
    assert_eq!(meta("").permissions().mode() & 0o7777, 0o755);
    assert_eq!(meta("usr/bin/su").mtime(), 1_300_000_000);
    // Directory times survive their children being written.
    assert_eq!(meta("usr/bin").mtime(), 1_400_000_000);
    assert_eq!(meta("usr").mtime(), 1_500_000_000);
    assert_eq!(meta("link").mtime(), 1_200_000_000);
    assert_eq!(meta("precise").mtime(), 1_700_000_000);
    assert_eq!(meta("precise").mtime_nsec(), 250_000_000);
    if is_root() {
        assert_eq!(
            (meta("usr/bin/secret").uid(), meta("usr/bin/secret").gid()),
            (1234, 4321)
        );
        assert_eq!(meta("usr/bin").gid(), 7);
        assert_eq!((meta("link").uid(), meta("link").gid()), (1234, 4321));
        // Set after chown, so the setgid bit stayed.
        assert_eq!(meta("usr/bin/wall").gid(), 5);
    }
    // user.* xattrs need filesystem support (tmpfs has it since 6.6).
    let mut value = [0u8; 16];
    let path =
        std::ffi::CString::new(dest.join("with-xattr").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C strings and a buffer whose length we pass.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.phoenix".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if n >= 0 {
        assert_eq!(&value[..n as usize], b"yes");
    } else {
        eprintln!(
            "user xattrs not supported here: {}",
            std::io::Error::last_os_error()
        );
    }

    // The result can be removed by its owner even with read-only dirs
    // (when not root this needs the chmod).
    let mut perms = std::fs::metadata(dest.join("ro")).unwrap().permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(dest.join("ro"), perms).unwrap();
}

#[test]
fn device_nodes_are_made_or_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = LayerSpec::new(
        &[
            Entry::dir("dev/"),
            Entry::char_dev("dev/null", 1, 3),
            Entry::fifo("dev/pipe").mode(0o640),
            Entry::file("after", b"after"),
        ],
        Comp::None,
    );
    let image = image_of(tmp.path(), &[layer]);
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();
    match std::fs::symlink_metadata(dest.join("dev/null")) {
        Ok(meta) => {
            assert!(meta.file_type().is_char_device());
            assert_eq!(meta.rdev(), libc::makedev(1, 3));
        }
        Err(_) => eprintln!("mknod of a char device not permitted here: skipped, as designed"),
    }
    if let Ok(meta) = std::fs::symlink_metadata(dest.join("dev/pipe")) {
        assert!(meta.file_type().is_fifo());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    }
    assert_eq!(std::fs::read(dest.join("after")).unwrap(), b"after");
}

#[test]
fn later_layers_replace_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let lower = LayerSpec::new(
        &[
            Entry::dir("was-dir/"),
            Entry::file("was-dir/child", b"child"),
            Entry::file("was-file", b"file"),
            Entry::symlink("was-link", "/etc"),
            Entry::file("overwritten", b"old contents that are longer"),
        ],
        Comp::Gzip,
    );
    let upper = LayerSpec::new(
        &[
            Entry::file("was-dir", b"now a file"),
            Entry::dir("was-file/"),
            Entry::file("was-file/inside", b"inside"),
            Entry::dir("was-link/"),
            Entry::file("overwritten", b"new"),
        ],
        Comp::Gzip,
    );
    let image = image_of(tmp.path(), &[lower, upper]);
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.join("was-dir")).unwrap(), b"now a file");
    assert_eq!(
        std::fs::read(dest.join("was-file/inside")).unwrap(),
        b"inside"
    );
    assert!(
        std::fs::symlink_metadata(dest.join("was-link"))
            .unwrap()
            .is_dir()
    );
    assert_eq!(std::fs::read(dest.join("overwritten")).unwrap(), b"new");
}

#[test]
fn missing_parents_long_names_and_dot_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let long = format!("{}/file", ["deep"; 40].join("/"));
    let layer = LayerSpec::new(
        &[
            Entry::file("a/b/c/file", b"implicit parents"),
            Entry::file(&long, b"long"),
            Entry::file("./dot/./x", b"dot"),
            Entry::dir("./"),
        ],
        Comp::Gzip,
    );
    let image = image_of(tmp.path(), &[layer]);
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();
    assert_eq!(
        std::fs::read(dest.join("a/b/c/file")).unwrap(),
        b"implicit parents"
    );
    assert_eq!(std::fs::read(dest.join(&long)).unwrap(), b"long");
    assert_eq!(std::fs::read(dest.join("dot/x")).unwrap(), b"dot");
}

#[test]
fn existing_destination_is_refused_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let image = image_of(
        tmp.path(),
        &[LayerSpec::new(&[Entry::file("f", b"f")], Comp::None)],
    );
    let dest = tmp.path().join("rootfs");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("mine"), b"mine").unwrap();
    let err = unpack(&image, &dest, &Limits::default()).unwrap_err();
    assert!(matches!(err, UnpackError::Exists { .. }), "{err}");
    assert_eq!(std::fs::read(dest.join("mine")).unwrap(), b"mine");
}

#[test]
fn total_limit_across_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let chunk = vec![7u8; 600 << 10];
    let a = LayerSpec::new(&[Entry::file("a", &chunk)], Comp::Gzip);
    let b = LayerSpec::new(&[Entry::file("b", &chunk)], Comp::Gzip);
    let image = image_of(tmp.path(), &[a, b]);
    let limits = Limits {
        max_layer_bytes: 1 << 20,
        max_total_bytes: 1 << 20,
    };
    let dest = tmp.path().join("rootfs");
    let err = unpack(&image, &dest, &limits).unwrap_err();
    assert!(matches!(err, UnpackError::TotalLimit { .. }), "{err}");
    assert!(err.to_string().contains("1048576"), "{err}");
    assert!(!dest.exists());

    // Each layer alone fits.
    let limits = Limits {
        max_layer_bytes: 1 << 20,
        max_total_bytes: 2 << 20,
    };
    unpack(&image, &dest, &limits).unwrap();
}

#[test]
fn many_empty_entries_count_too() {
    let tmp = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = (0..100)
        .map(|i| Entry::file(&format!("f{i}"), b""))
        .collect();
    let image = image_of(tmp.path(), &[LayerSpec::new(&entries, Comp::Gzip)]);
    let limits = Limits {
        max_layer_bytes: 50 * 512,
        max_total_bytes: 1 << 30,
    };
    let dest = tmp.path().join("rootfs");
    let err = unpack(&image, &dest, &limits).unwrap_err();
    assert!(matches!(err, UnpackError::LayerLimit { .. }), "{err}");
    assert!(!dest.exists());
}
