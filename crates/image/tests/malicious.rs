//! Hostile layers: each must be refused with a clear error, leave nothing
//! outside the destination, and leave no destination behind.

mod common;

use common::*;
use phoenix_image::{Limits, UnpackError, open, unpack};

/// Unpacks these layers (as an oci-archive tar) in a fresh sandbox and
/// returns the error, after checking nothing escaped and dest is gone.
fn refused(layers: &[Vec<Entry>], limits: Limits) -> (UnpackError, Sandbox) {
    let sandbox = Sandbox::new();
    let specs: Vec<LayerSpec> = layers
        .iter()
        .map(|e| LayerSpec::new(e, Comp::Gzip))
        .collect();
    let path = sandbox.image_path("image.tar");
    Layout::single(&specs).write_tar(&path);
    let image = open(&path, None).unwrap();
    let err = unpack(&image, &sandbox.dest, &limits).expect_err("a hostile layer was unpacked");
    sandbox.assert_outside_untouched();
    sandbox.assert_dest_gone();
    (err, sandbox)
}

fn refusal(err: &UnpackError) -> &'static str {
    match err {
        UnpackError::Refused { reason, .. } => reason,
        other => panic!("expected a refusal, got: {other}"),
    }
}

/// Layers that first put something legitimate in dest, so the cleanup has
/// work to do.
fn with_content(mut hostile: Vec<Entry>) -> Vec<Entry> {
    let mut entries = vec![
        Entry::dir("etc/"),
        Entry::file("etc/hostname", b"box"),
        Entry::dir("ro/").mode(0o500),
        Entry::file("ro/x", b"x").mode(0o400),
    ];
    entries.append(&mut hostile);
    entries
}

#[test]
fn dot_dot_escape() {
    for path in ["../x", "a/../../x", "./../../../../x", "etc/../../escaped"] {
        let (err, _s) = refused(
            &[with_content(vec![Entry::file(path, b"evil")])],
            Limits::default(),
        );
        assert!(refusal(&err).contains("escapes"), "{path}: {err}");
        assert!(err.to_string().contains(path), "{err}");
    }
}

#[test]
fn absolute_path() {
    let name = format!("/tmp/phoenix-image-test-absolute-{}", std::process::id());
    let (err, _s) = refused(
        &[with_content(vec![Entry::file(&name, b"evil")])],
        Limits::default(),
    );
    assert!(refusal(&err).contains("absolute"), "{err}");
    assert!(!std::path::Path::new(&name).exists());
}

#[test]
fn symlink_to_absolute_outside_then_write_through() {
    let sandbox_probe = Sandbox::new();
    // The real absolute path of a directory outside dest (that sandbox's
    // `outside`); a second sandbox checks its own outside too.
    let target = sandbox_probe.outside.to_str().unwrap().to_owned();
    let (err, _s) = refused(
        &[with_content(vec![
            Entry::symlink("a", &target),
            Entry::file("a/f", b"evil"),
        ])],
        Limits::default(),
    );
    assert!(refusal(&err).contains("symlink"), "{err}");
    sandbox_probe.assert_outside_untouched();
    assert!(!sandbox_probe.outside.join("f").exists());
}

#[test]
fn symlink_to_etc_then_passwd() {
    let (err, _s) = refused(
        &[with_content(vec![
            Entry::symlink("a", "/etc"),
            Entry::file("a/phoenix-image-test-passwd", b"evil"),
        ])],
        Limits::default(),
    );
    assert!(refusal(&err).contains("symlink"), "{err}");
    assert!(!std::path::Path::new("/etc/phoenix-image-test-passwd").exists());
}

#[test]
fn symlink_up_then_write() {
    for (link, write) in [("up", "up/x"), ("up", "up/outside/keep"), ("up", "up/f")] {
        let (err, _s) = refused(
            &[with_content(vec![
                Entry::symlink(link, "../../"),
                Entry::file(write, b"evil"),
            ])],
            Limits::default(),
        );
        assert!(refusal(&err).contains("symlink"), "{write}: {err}");
    }
}

#[test]
fn symlink_in_one_layer_write_in_the_next() {
    let (err, _s) = refused(
        &[
            with_content(vec![Entry::symlink("lib", "../../../../../outside")]),
            vec![Entry::file("lib/keep", b"evil"), Entry::dir("lib/newdir/")],
        ],
        Limits::default(),
    );
    assert!(refusal(&err).contains("symlink"), "{err}");
}

#[test]
fn directory_through_symlink() {
    let (err, _s) = refused(
        &[with_content(vec![
            Entry::symlink("d", "../../../../../outside"),
            Entry::dir("d/sub/new/"),
        ])],
        Limits::default(),
    );
    assert!(refusal(&err).contains("symlink"), "{err}");
}

#[test]
fn hard_link_outside() {
    for target in [
        "../outside/keep",
        "../../../../../outside/keep",
        "/etc/passwd",
    ] {
        let (err, _s) = refused(
            &[with_content(vec![Entry::hardlink("h", target)])],
            Limits::default(),
        );
        assert!(
            refusal(&err).contains("hard link target"),
            "{target}: {err}"
        );
    }
}

#[test]
fn hard_link_through_symlink() {
    let (err, _s) = refused(
        &[with_content(vec![
            Entry::symlink("l", "../../../../../outside"),
            Entry::hardlink("h", "l/keep"),
        ])],
        Limits::default(),
    );
    assert!(refusal(&err).contains("through a symlink"), "{err}");
}

#[test]
fn whiteout_through_symlink() {
    // Must not delete outside/keep.
    let (err, _s) = refused(
        &[
            with_content(vec![Entry::symlink("l", "../../../../../outside")]),
            vec![Entry::file("l/.wh.keep", b"")],
        ],
        Limits::default(),
    );
    assert!(refusal(&err).contains("symlink"), "{err}");
}

#[test]
fn opaque_through_symlink() {
    // Must not empty outside/.
    let (err, _s) = refused(
        &[
            with_content(vec![Entry::symlink("l", "../../../../../outside")]),
            vec![Entry::file("l/.wh..wh..opq", b"")],
        ],
        Limits::default(),
    );
    assert!(refusal(&err).contains("symlink"), "{err}");
}

#[test]
fn huge_file_over_the_layer_limit() {
    let big = vec![0u8; 4 << 20];
    let (err, _s) = refused(
        &[with_content(vec![Entry::file("big", &big)])],
        Limits {
            max_layer_bytes: 1 << 20,
            max_total_bytes: 1 << 30,
        },
    );
    assert!(matches!(err, UnpackError::LayerLimit { .. }), "{err}");
    assert!(err.to_string().contains("1048576"), "{err}");
}

#[test]
fn oversized_pax_header() {
    // 2 MiB of PAX records before one entry: refused before the tar parser
    // buffers it all.
    let junk = vec![b'a'; 2 << 20];
    let (err, _s) = refused(
        &[with_content(vec![
            Entry::file("f", b"x").pax("comment", &junk),
        ])],
        Limits::default(),
    );
    assert!(err.to_string().contains("pax"), "{err}");
}

#[test]
fn replacing_a_symlink_does_not_write_through_it() {
    // Not an error: a file entry over a symlink replaces the symlink.
    let sandbox = Sandbox::new();
    let layers = [
        LayerSpec::new(
            &[Entry::symlink("a", "../../../../../outside/keep")],
            Comp::Gzip,
        ),
        LayerSpec::new(
            &[
                Entry::file("a", b"replaced"),
                Entry::symlink("b", "../../../../../outside/sub"),
                Entry::dir("b/"),
                Entry::symlink("c", "../../../../../outside/keep"),
                Entry::hardlink("c2", "c"),
            ],
            Comp::Gzip,
        ),
    ];
    let path = sandbox.image_path("image.tar");
    Layout::single(&layers).write_tar(&path);
    let image = open(&path, None).unwrap();
    unpack(&image, &sandbox.dest, &Limits::default()).unwrap();
    sandbox.assert_outside_untouched();
    let a = std::fs::symlink_metadata(sandbox.dest.join("a")).unwrap();
    assert!(a.is_file());
    assert_eq!(std::fs::read(sandbox.dest.join("a")).unwrap(), b"replaced");
    assert!(
        std::fs::symlink_metadata(sandbox.dest.join("b"))
            .unwrap()
            .is_dir()
    );
    assert!(
        std::fs::symlink_metadata(sandbox.dest.join("c2"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}
