//! Opening images: each format, compression, name selection, nested
//! indexes, and the errors for what is not (or not quite) an OCI image.

mod common;

use common::*;
use phoenix_image::{ImageError, Limits, UnpackError, open, unpack};
use serde_json::json;

fn app_layer(comp: Comp) -> LayerSpec {
    LayerSpec::new(
        &[
            Entry::dir("bin/"),
            Entry::file("bin/app", b"#!/bin/sh\necho hi\n").mode(0o755),
            Entry::dir("srv/"),
            Entry::file("srv/data.txt", b"hello"),
        ],
        comp,
    )
}

/// Opens and unpacks `path`, checks the config and the files.
fn open_and_check(path: &std::path::Path, reference: Option<&str>) {
    let image = open(path, reference).unwrap();
    assert!(image.manifest_digest.starts_with("sha256:"));
    assert_eq!(image.config.entrypoint, ["/bin/app"]);
    assert_eq!(image.config.cmd, ["--serve"]);
    assert_eq!(image.config.env, ["PATH=/usr/bin:/bin", "MODE=test"]);
    assert_eq!(image.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(image.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(image.config.exposed_ports, ["53/udp", "8080/tcp"]);
    assert_eq!(image.config.os, "linux");
    assert_eq!(image.config.architecture, host_arch());
    assert_eq!(image.layers.len(), 1);
    image.verify().unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.join("srv/data.txt")).unwrap(), b"hello");
    assert_eq!(
        std::fs::read(dest.join("bin/app")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
}

#[test]
fn oci_layout_directory_uncompressed() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::single(&[app_layer(Comp::None)]);
    layout.write_dir(tmp.path());
    open_and_check(tmp.path(), None);
}

#[test]
fn oci_archive_gzip() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("image.tar");
    Layout::single(&[app_layer(Comp::Gzip)]).write_tar(&path);
    open_and_check(&path, None);
}

#[test]
fn oci_archive_zstd() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("image.tar");
    Layout::single(&[app_layer(Comp::Zstd)]).write_tar(&path);
    open_and_check(&path, None);
}

#[test]
fn oci_layout_directory_zstd_and_gzip_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let second = LayerSpec::new(&[Entry::file("srv/more.txt", b"more")], Comp::Gzip);
    Layout::single(&[app_layer(Comp::Zstd), second]).write_dir(tmp.path());
    let image = open(tmp.path(), None).unwrap();
    assert_eq!(image.layers.len(), 2);
    assert_eq!(image.layers[0].media_type, LAYER_ZSTD);
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.join("srv/more.txt")).unwrap(), b"more");
    assert_eq!(std::fs::read(dest.join("srv/data.txt")).unwrap(), b"hello");
}

/// What `docker image save` writes since Docker 25: an OCI layout plus
/// Docker's manifest.json and repositories, names in annotations, docker
/// media types on gzip layers.
fn docker_save_layout(images: &[(&str, &str)]) -> Layout {
    let mut layout = Layout::default();
    let mut legacy = Vec::new();
    for (name, marker) in images {
        let layer = LayerSpec::new(
            &[
                Entry::file("bin/app", b"app").mode(0o755),
                Entry::file("srv/data.txt", b"hello"),
                Entry::file("which", marker.as_bytes()),
            ],
            Comp::Gzip,
        )
        .media_type(DOCKER_GZIP);
        let desc = layout.image(&[layer], default_config());
        let tag = name.rsplit_once(':').unwrap().1;
        let full = format!("docker.io/library/{name}");
        layout.add(
            desc,
            &[
                ("io.containerd.image.name", &full),
                ("org.opencontainers.image.ref.name", tag),
            ],
        );
        legacy.push(json!({"Config": "blobs/sha256/x", "RepoTags": [name], "Layers": []}));
    }
    layout
        .extra
        .push(("manifest.json".into(), serde_json::to_vec(&legacy).unwrap()));
    layout.extra.push(("repositories".into(), b"{}".to_vec()));
    layout
}

#[test]
fn docker_save_archive() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("image.tar");
    docker_save_layout(&[("myapp:v1", "one")]).write_tar(&path);
    let image = open(&path, None).unwrap();
    assert_eq!(image.layers[0].media_type, DOCKER_GZIP);
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.join("which")).unwrap(), b"one");
    // Its own name works as a reference too.
    open(&path, Some("myapp:v1")).unwrap();
    open(&path, Some("v1")).unwrap();
}

#[test]
fn several_images_picked_by_tag_or_name() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("image.tar");
    docker_save_layout(&[
        ("myapp:v1", "one"),
        ("myapp:v2", "two"),
        ("other:v1", "three"),
    ])
    .write_tar(&path);

    for (reference, marker) in [
        ("v2", "two"),
        ("myapp:v2", "two"),
        ("docker.io/library/myapp:v2", "two"),
        ("library/myapp:v2", "two"),
        ("myapp:v1", "one"),
        ("other:v1", "three"),
    ] {
        let Ok(image) = open(&path, Some(reference)) else {
            panic!("{reference} not found");
        };
        let dest = tmp
            .path()
            .join(format!("rootfs-{}", reference.replace('/', "_")));
        unpack(&image, &dest, &Limits::default()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("which")).unwrap(),
            marker,
            "reference {reference}"
        );
    }

    // By manifest digest.
    let v2 = open(&path, Some("v2")).unwrap();
    let by_digest = open(&path, Some(&v2.manifest_digest)).unwrap();
    assert_eq!(by_digest.manifest_digest, v2.manifest_digest);

    let err = open(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::Several { .. }), "{err}");
    let msg = err.to_string();
    for name in [
        "docker.io/library/myapp:v1",
        "docker.io/library/myapp:v2",
        "docker.io/library/other:v1",
    ] {
        assert!(msg.contains(name), "{msg}");
    }

    let err = open(&path, Some("v3")).unwrap_err();
    assert!(matches!(err, ImageError::NoMatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("\"v3\"") && msg.contains("myapp:v2") && msg.contains("other:v1"),
        "{msg}"
    );

    // v1 is two different images.
    let err = open(&path, Some("v1")).unwrap_err();
    assert!(matches!(err, ImageError::Ambiguous { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("myapp:v1") && msg.contains("other:v1") && !msg.contains("myapp:v2"),
        "{msg}"
    );
}

#[test]
fn same_image_under_two_names_is_one_image() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::default();
    let desc = layout.image(&[app_layer(Comp::Gzip)], default_config());
    layout.add(
        desc.clone(),
        &[("org.opencontainers.image.ref.name", "a:1")],
    );
    layout.add(desc, &[("org.opencontainers.image.ref.name", "a:latest")]);
    layout.write_dir(tmp.path());
    open_and_check(tmp.path(), None);
    open(tmp.path(), Some("a")).unwrap();
}

#[test]
fn nested_index_picks_this_host() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::default();
    let mine = layout.image(&[app_layer(Comp::Gzip)], default_config());
    let mut other_config = default_config();
    let other_arch = if host_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    other_config["architecture"] = json!(other_arch);
    let other = layout.image(
        &[LayerSpec::new(&[Entry::file("wrong", b"x")], Comp::Gzip)],
        other_config,
    );
    let mut attestation = layout.image(&[], json!({"architecture": "unknown", "os": "unknown"}));
    attestation["platform"] = json!({"architecture": "unknown", "os": "unknown"});
    attestation["annotations"] = json!({"vnd.docker.reference.type": "attestation-manifest"});
    let mut other = other;
    other["platform"] = json!({"architecture": other_arch, "os": "linux"});
    let mut mine = mine;
    mine["platform"] = json!({"architecture": host_arch(), "os": "linux"});
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [attestation, other, mine.clone()],
    });
    let index_desc = layout.blob(OCI_INDEX, serde_json::to_vec(&index).unwrap());
    layout.add(
        index_desc,
        &[("org.opencontainers.image.ref.name", "multi")],
    );
    let path = tmp.path().join("image.tar");
    layout.write_tar(&path);

    let image = open(&path, Some("multi")).unwrap();
    assert_eq!(image.manifest_digest, mine["digest"].as_str().unwrap());
    open_and_check(&path, None);
}

#[test]
fn nested_index_without_this_platform_lists_what_it_has() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::default();
    let mut m = layout.image(&[app_layer(Comp::Gzip)], default_config());
    m["platform"] = json!({"architecture": "s390x", "os": "linux"});
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [m]});
    let index_desc = layout.blob(OCI_INDEX, serde_json::to_vec(&index).unwrap());
    layout.add(index_desc, &[]);
    layout.write_dir(tmp.path());
    let err = open(tmp.path(), None).unwrap_err();
    assert!(matches!(err, ImageError::NoPlatform { .. }), "{err}");
    assert!(err.to_string().contains("linux/s390x"), "{err}");
}

#[test]
fn compression_detected_by_magic_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    // Unknown media type, gzip data; and an "uncompressed" media type over
    // zstd data (mislabeled).
    let a = app_layer(Comp::Gzip).media_type("application/x-unknown-layer");
    let b = LayerSpec::new(&[Entry::file("srv/b", b"b")], Comp::Zstd).media_type(LAYER_TAR);
    Layout::single(&[a, b]).write_dir(tmp.path());
    let image = open(tmp.path(), None).unwrap();
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.join("srv/data.txt")).unwrap(), b"hello");
    assert_eq!(std::fs::read(dest.join("srv/b")).unwrap(), b"b");
}

#[test]
fn gzip_media_type_over_plain_tar_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let a = app_layer(Comp::None).media_type(LAYER_GZIP);
    Layout::single(&[a]).write_dir(tmp.path());
    let image = open(tmp.path(), None).unwrap();
    let dest = tmp.path().join("rootfs");
    let err = unpack(&image, &dest, &Limits::default()).unwrap_err();
    assert!(matches!(err, UnpackError::Compression { .. }), "{err}");
    assert!(!dest.exists());
}

#[test]
fn not_an_image_at_all() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("junk.tar");
    std::fs::write(&path, tar(&[Entry::file("hello.txt", b"hi")])).unwrap();
    let err = open(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::NotOci { .. }), "{err}");

    std::fs::write(
        &path,
        b"this is not a tar file, not even close, and it goes on a bit",
    )
    .unwrap();
    let err = open(&path, None).unwrap_err();
    assert!(
        matches!(err, ImageError::NotTar { .. } | ImageError::NotOci { .. }),
        "{err}"
    );

    let err = open(&tmp.path().join("missing.tar"), None).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
}

#[test]
fn compressed_archive_says_decompress_first() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("image.tar");
    Layout::single(&[app_layer(Comp::None)]).write_tar(&plain);
    let gz = tmp.path().join("image.tar.gz");
    std::fs::write(&gz, compress(&std::fs::read(&plain).unwrap(), Comp::Gzip)).unwrap();
    let err = open(&gz, None).unwrap_err();
    assert!(
        matches!(err, ImageError::Compressed { kind: "gzip", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("decompress it first"), "{err}");
}

#[test]
fn corrupt_config_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::single(&[app_layer(Comp::Gzip)]);
    let manifest_digest = layout.index[0]["digest"].as_str().unwrap().to_owned();
    let manifest: serde_json::Value =
        serde_json::from_slice(&layout.blobs[&manifest_digest]).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
    layout.corrupt(&config_digest);
    let path = tmp.path().join("image.tar");
    layout.write_tar(&path);
    let err = open(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&config_digest), "{err}");
}

#[test]
fn corrupt_manifest_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::single(&[app_layer(Comp::Gzip)]);
    let manifest_digest = layout.index[0]["digest"].as_str().unwrap().to_owned();
    layout.corrupt(&manifest_digest);
    layout.write_dir(tmp.path());
    let err = open(tmp.path(), None).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&manifest_digest), "{err}");
}

#[test]
fn corrupt_layer_is_named_and_dest_removed() {
    let tmp = tempfile::tempdir().unwrap();
    for comp in [Comp::None, Comp::Gzip, Comp::Zstd] {
        let mut layout = Layout::single(&[app_layer(comp)]);
        let manifest_digest = layout.index[0]["digest"].as_str().unwrap().to_owned();
        let manifest: serde_json::Value =
            serde_json::from_slice(&layout.blobs[&manifest_digest]).unwrap();
        let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
        // Corrupt a byte that does not break decompression: for the plain
        // tar, the end-of-archive padding; for the compressed ones the last
        // byte (gzip's size trailer / zstd's checksum).
        layout.corrupt(&layer_digest);
        let path = tmp.path().join(format!("image-{comp:?}.tar"));
        layout.write_tar(&path);
        let image = open(&path, None).unwrap();
        let err = image.verify().unwrap_err();
        assert!(err.to_string().contains(&layer_digest), "{err}");

        let dest = tmp.path().join(format!("rootfs-{comp:?}"));
        let err = unpack(&image, &dest, &Limits::default()).unwrap_err();
        assert!(err.to_string().contains(&layer_digest), "{comp:?}: {err}");
        assert!(!dest.exists(), "{comp:?}: dest left behind");
    }
}

#[test]
fn size_mismatch_and_missing_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::single(&[app_layer(Comp::Gzip)]);
    let manifest_digest = layout.index[0]["digest"].as_str().unwrap().to_owned();
    // The index says one byte more than the manifest has.
    let size = layout.index[0]["size"].as_u64().unwrap();
    layout.index[0]["size"] = json!(size + 1);
    layout.write_dir(&tmp.path().join("a"));
    let err = open(&tmp.path().join("a"), None).unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&manifest_digest), "{err}");

    layout.index[0]["size"] = json!(size);
    let manifest: serde_json::Value =
        serde_json::from_slice(&layout.blobs[&manifest_digest]).unwrap();
    let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    layout.blobs.remove(&layer_digest);
    let path = tmp.path().join("b.tar");
    layout.write_tar(&path);
    let err = open(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::MissingBlob { .. }), "{err}");
    assert!(err.to_string().contains(&layer_digest), "{err}");
}

#[test]
fn digest_with_path_tricks_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::single(&[app_layer(Comp::Gzip)]);
    layout.index[0]["digest"] = json!("sha256:../../../etc/passwd");
    layout.write_dir(tmp.path());
    let err = open(tmp.path(), None).unwrap_err();
    assert!(matches!(err, ImageError::BadDigest { .. }), "{err}");
}

#[test]
fn empty_index() {
    let tmp = tempfile::tempdir().unwrap();
    Layout::default().write_dir(tmp.path());
    let err = open(tmp.path(), None).unwrap_err();
    assert!(matches!(err, ImageError::Empty { .. }), "{err}");
}
