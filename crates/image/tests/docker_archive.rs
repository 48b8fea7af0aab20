//! Legacy Docker archives (`docker save` before Docker 25): opened by tag
//! like OCI archives, layers checked against the config's diff_ids, and
//! every hostile or broken manifest.json refused naming the archive and
//! the entry.

mod common;

use common::*;
use phoenix_image::docker_archive::IDENTITY_MARKER;
use phoenix_image::{ImageError, Limits, UnpackError, open, unpack};
use serde_json::{Value, json};

fn app_layer(comp: Comp, marker: &str) -> LayerSpec {
    LayerSpec::new(
        &[
            Entry::dir("bin/"),
            Entry::file("bin/app", b"#!/bin/sh\necho hi\n").mode(0o755),
            Entry::dir("srv/"),
            Entry::file("srv/data.txt", b"hello"),
            Entry::file("which", marker.as_bytes()),
        ],
        comp,
    )
}

/// Opens `path` (by `reference`), checks the config, unpacks it and
/// returns what its `which` file says.
fn open_and_unpack(path: &std::path::Path, reference: Option<&str>) -> String {
    let image = open(path, reference).unwrap();
    assert_eq!(image.config.entrypoint, ["/bin/app"]);
    assert_eq!(image.config.cmd, ["--serve"]);
    assert_eq!(image.config.env, ["PATH=/usr/bin:/bin", "MODE=test"]);
    assert_eq!(image.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(image.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(image.config.exposed_ports, ["53/udp", "8080/tcp"]);
    image.verify().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.join("srv/data.txt")).unwrap(), b"hello");
    assert_eq!(
        std::fs::read(dest.join("bin/app")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    std::fs::read_to_string(dest.join("which")).unwrap()
}

fn write(archive: &DockerArchive) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("old.tar");
    archive.write_tar(&path);
    (tmp, path)
}

#[test]
fn one_image_opens_without_a_tag_and_by_its_tag() {
    let archive = DockerArchive::single(&["myapp:v1"], &[app_layer(Comp::None, "one")]);
    let (_tmp, path) = write(&archive);
    for reference in [
        None,
        Some("v1"),
        Some("myapp:v1"),
        Some("docker.io/library/myapp:v1"),
    ] {
        assert_eq!(open_and_unpack(&path, reference), "one", "{reference:?}");
    }
    let err = open(&path, Some("v2")).unwrap_err();
    assert!(matches!(err, ImageError::NoMatch { .. }), "{err}");
    assert!(err.to_string().contains("myapp:v1"), "{err}");
}

#[test]
fn identity_is_the_marked_config_digest_and_stable() {
    let mut archive = DockerArchive::default();
    let config_hex = archive.image(
        &["myapp:v1"],
        &[app_layer(Comp::None, "one")],
        default_config(),
    );
    let (_tmp, path) = write(&archive);
    let image = open(&path, None).unwrap();
    let config = &archive
        .files
        .iter()
        .find(|(name, _)| *name == format!("{config_hex}.json"))
        .unwrap()
        .1;
    let mut marked = IDENTITY_MARKER.to_vec();
    marked.extend_from_slice(config);
    assert_eq!(image.manifest_digest, sha256(&marked));
    assert_ne!(image.manifest_digest, format!("sha256:{config_hex}"));
    assert_eq!(
        open(&path, None).unwrap().manifest_digest,
        image.manifest_digest
    );
    // The layer's digest is its diff_id, as the config lists it.
    assert_eq!(image.layers.len(), 1);
    assert_eq!(
        image.layers[0].digest,
        sha256(&app_layer(Comp::None, "one").tar)
    );
}

#[test]
fn several_images_picked_like_oci_ones() {
    let mut archive = DockerArchive::default();
    archive.image(
        &["myapp:v1"],
        &[app_layer(Comp::None, "one")],
        default_config(),
    );
    let mut config_two = default_config();
    config_two["config"]["Labels"] = json!({"which": "two"});
    let two_hex = archive.image(
        &["myapp:v2", "myapp:latest"],
        &[app_layer(Comp::None, "two")],
        config_two,
    );
    let mut config_three = default_config();
    config_three["config"]["Labels"] = json!({"which": "three"});
    archive.image(
        &["me/other:v1"],
        &[app_layer(Comp::None, "three")],
        config_three,
    );
    let (_tmp, path) = write(&archive);

    for (reference, marker) in [
        ("v2", "two"),
        ("myapp:v2", "two"),
        ("myapp", "two"),
        ("myapp:latest", "two"),
        ("docker.io/library/myapp:v2", "two"),
        ("myapp:v1", "one"),
        ("me/other:v1", "three"),
        ("docker.io/me/other:v1", "three"),
    ] {
        assert_eq!(
            open_and_unpack(&path, Some(reference)),
            marker,
            "{reference}"
        );
    }
    // Docker's image id (`docker images --no-trunc`) picks one too.
    let by_id = format!("sha256:{two_hex}");
    assert_eq!(open_and_unpack(&path, Some(&by_id)), "two");

    let err = open(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::Several { .. }), "{err}");
    for name in ["myapp:v1", "myapp:v2 = myapp:latest", "me/other:v1"] {
        assert!(err.to_string().contains(name), "{name} missing from: {err}");
    }
    let err = open(&path, Some("v1")).unwrap_err();
    assert!(matches!(err, ImageError::Ambiguous { .. }), "{err}");
    let err = open(&path, Some("nope:v9")).unwrap_err();
    assert!(matches!(err, ImageError::NoMatch { .. }), "{err}");
}

#[test]
fn image_saved_by_id_has_no_tags() {
    let mut archive = DockerArchive::single(&[], &[app_layer(Comp::None, "one")]);
    archive.manifest[0]["RepoTags"] = Value::Null;
    let (_tmp, path) = write(&archive);
    assert_eq!(open_and_unpack(&path, None), "one");
}

#[test]
fn empty_manifest_holds_no_image() {
    let (_tmp, path) = write(&DockerArchive::default());
    let err = open(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::Empty { .. }), "{err}");
    assert!(err.to_string().contains("manifest.json"), "{err}");
}

#[test]
fn layers_apply_in_order_with_whiteouts() {
    let base = LayerSpec::new(
        &[
            Entry::dir("etc/"),
            Entry::file("etc/gone", b"x"),
            Entry::file("etc/kept", b"old"),
        ],
        Comp::None,
    );
    let top = LayerSpec::new(
        &[
            Entry::file("etc/.wh.gone", b""),
            Entry::file("etc/kept", b"new"),
        ],
        Comp::None,
    );
    let (tmp, path) = write(&DockerArchive::single(&["a:1"], &[base, top]));
    let image = open(&path, None).unwrap();
    assert_eq!(image.layers.len(), 2);
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();
    assert!(!dest.join("etc/gone").exists());
    assert!(!dest.join("etc/.wh.gone").exists());
    assert_eq!(std::fs::read(dest.join("etc/kept")).unwrap(), b"new");
}

#[test]
fn compressed_layers_are_checked_after_decompression() {
    let archive = DockerArchive::single(
        &["a:1"],
        &[
            app_layer(Comp::Gzip, "one"),
            LayerSpec::new(&[Entry::file("more", b"more")], Comp::Zstd),
        ],
    );
    let (_tmp, path) = write(&archive);
    assert_eq!(open_and_unpack(&path, None), "one");
}

#[test]
fn docker_links_a_repeated_layer_to_its_first_copy() {
    // The same content twice: Docker writes the second as a symlink to the
    // first's layer.tar.
    let same = LayerSpec::new(&[Entry::file("same", b"same")], Comp::None);
    let mid = LayerSpec::new(&[Entry::file("same", b"changed")], Comp::None);
    let mut archive = DockerArchive::single(&["a:1"], &[same.clone(), mid, same]);
    let layers: Vec<String> = archive.manifest[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect();
    archive.files.retain(|(name, _)| *name != layers[2]);
    let mut entries = archive.entries();
    let first_dir = layers[0].split_once('/').unwrap().0;
    entries.push(Entry::symlink(
        &layers[2],
        &format!("../{first_dir}/layer.tar"),
    ));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("old.tar");
    std::fs::write(&path, tar(&entries)).unwrap();
    let image = open(&path, None).unwrap();
    assert_eq!(image.layers.len(), 3);
    assert_eq!(image.layers[0].digest, image.layers[2].digest);
    image.verify().unwrap();
    let dest = tmp.path().join("rootfs");
    unpack(&image, &dest, &Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.join("same")).unwrap(), b"same");
}

/// A layer whose content is not what the config's diff_id says.
#[test]
fn corrupt_layer_is_refused_naming_its_path() {
    let mut archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]);
    let layer_path = archive.manifest[0]["Layers"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let data = &mut archive
        .files
        .iter_mut()
        .find(|(name, _)| *name == layer_path)
        .unwrap()
        .1;
    // Inside the file data of the last entry: still a valid tar.
    let at = data.iter().rposition(|&b| b == b'o').unwrap();
    data[at] = b'X';
    let sandbox = Sandbox::new();
    let path = sandbox.image_path("old.tar");
    archive.write_tar(&path);
    let image = open(&path, None).unwrap();

    let err = image.verify().unwrap_err();
    assert!(
        matches!(err, ImageError::DockerArchiveCorrupt { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&layer_path), "{err}");

    let err = unpack(&image, &sandbox.dest, &Limits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Image(ImageError::DockerArchiveCorrupt { .. })
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&layer_path), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    sandbox.assert_dest_gone();
    sandbox.assert_outside_untouched();
}

#[test]
fn compressed_corrupt_layer_is_refused_too() {
    let mut archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::Gzip, "one")]);
    // The diff_id of another tar: the gzip stream is sound, its content
    // is not the layer the config describes.
    let config_name = archive.manifest[0]["Config"].as_str().unwrap().to_owned();
    let mut config = default_config();
    config["rootfs"] = json!({"type": "layers", "diff_ids": [sha256(b"something else")]});
    let bytes = serde_json::to_vec(&config).unwrap();
    archive.files.retain(|(name, _)| *name != config_name);
    archive.files.push(("config.json".into(), bytes));
    archive.manifest[0]["Config"] = json!("config.json");
    let (tmp, path) = write(&archive);
    let image = open(&path, None).unwrap();
    let err = unpack(&image, &tmp.path().join("rootfs"), &Limits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::Image(ImageError::DockerArchiveCorrupt { .. })
        ),
        "{err}"
    );
    assert!(!tmp.path().join("rootfs").exists());
}

#[test]
fn config_not_matching_its_name_is_refused() {
    let mut archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]);
    let config_name = archive.manifest[0]["Config"].as_str().unwrap().to_owned();
    let config = &mut archive
        .files
        .iter_mut()
        .find(|(name, _)| *name == config_name)
        .unwrap()
        .1;
    let text = String::from_utf8(config.clone()).unwrap();
    *config = text.replace("--serve", "--evil!").into_bytes();
    let (_tmp, path) = write(&archive);
    let err = open(&path, None).unwrap_err();
    assert!(
        matches!(err, ImageError::DockerArchiveCorrupt { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&config_name), "{err}");
}

#[test]
fn diff_ids_must_match_the_layer_count() {
    let mut archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]);
    let first = archive.manifest[0]["Layers"][0].clone();
    archive.manifest[0]["Layers"] = json!([first, "other/layer.tar"]);
    archive.files.push(("other/layer.tar".into(), tar(&[])));
    let (_tmp, path) = write(&archive);
    let err = open(&path, None).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::DockerArchiveLayerCount {
                diff_ids: 1,
                layers: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn malformed_diff_id_is_refused() {
    let mut archive = DockerArchive::default();
    let mut config = default_config();
    config["rootfs"] = json!({"type": "layers", "diff_ids": ["sha256:../../etc"]});
    let bytes = serde_json::to_vec(&config).unwrap();
    archive.files.push(("config.json".into(), bytes));
    archive.files.push(("l/layer.tar".into(), tar(&[])));
    archive.manifest.push(json!({
        "Config": "config.json", "RepoTags": ["a:1"], "Layers": ["l/layer.tar"],
    }));
    let (_tmp, path) = write(&archive);
    let err = open(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::BadDigest { .. }), "{err}");
}

/// Opens an archive whose manifest.json was tampered with; the error must
/// be a refusal naming the archive and `entry`.
fn refused_entry(archive: &DockerArchive, entry: &str, problem: &str) {
    let (_tmp, path) = write(archive);
    let err = open(&path, None).unwrap_err();
    match &err {
        ImageError::DockerArchiveEntry { entry: e, .. } => assert_eq!(e, entry),
        other => panic!("{entry}: expected a refused entry, got: {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(entry), "{msg}");
    assert!(msg.contains(problem), "{msg}");
}

#[test]
fn paths_escaping_the_archive_are_refused() {
    for (bad, problem) in [
        ("../outside.json", "`..`"),
        ("a/../../outside.json", "`..`"),
        ("a/../inside.json", "`..`"),
        ("/etc/passwd", "absolute"),
        ("", "not a file path"),
    ] {
        let mut archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]);
        archive.manifest[0]["Config"] = json!(bad);
        refused_entry(&archive, bad, problem);

        let mut archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]);
        archive.manifest[0]["Layers"][0] = json!(bad);
        refused_entry(&archive, bad, problem);
    }
}

#[test]
fn missing_files_are_refused() {
    let mut archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]);
    archive.manifest[0]["Config"] = json!("nothere.json");
    refused_entry(&archive, "nothere.json", "not a file in the archive");

    let mut archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]);
    archive.manifest[0]["Layers"][0] = json!("nothere/layer.tar");
    refused_entry(&archive, "nothere/layer.tar", "not a file in the archive");

    // A directory is not a layer file.
    let mut archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]);
    let layer = archive.manifest[0]["Layers"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = layer.split_once('/').unwrap().0.to_owned();
    archive.manifest[0]["Layers"][0] = json!(dir);
    refused_entry(&archive, &dir, "not a file in the archive");
}

#[test]
fn a_layer_listed_twice_is_refused() {
    let layer = LayerSpec::new(&[Entry::file("x", b"x")], Comp::None);
    let mut archive = DockerArchive::single(&["a:1"], &[layer.clone(), layer]);
    let first = archive.manifest[0]["Layers"][0]
        .as_str()
        .unwrap()
        .to_owned();
    // Spelled differently, the same member.
    archive.manifest[0]["Layers"][1] = json!(format!("./{first}"));
    refused_entry(&archive, &format!("./{first}"), "listed twice");
}

#[test]
fn huge_manifest_json_is_refused() {
    let mut archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]);
    archive.manifest[0]["Padding"] = json!("x".repeat(17 << 20));
    let (_tmp, path) = write(&archive);
    let err = open(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("manifest.json"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn huge_config_is_refused() {
    let mut archive = DockerArchive::default();
    let mut config = default_config();
    config["Padding"] = json!("x".repeat(17 << 20));
    archive.image(&["a:1"], &[], config);
    let (_tmp, path) = write(&archive);
    let err = open(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains(".json"), "{err}");
}

#[test]
fn invalid_manifest_json_is_refused() {
    let mut entries = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]).entries();
    entries.retain(|e| e.path != b"manifest.json");
    entries.push(Entry::file(
        "manifest.json",
        br#"[{"Layers": "not a list"}]"#,
    ));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("old.tar");
    std::fs::write(&path, tar(&entries)).unwrap();
    let err = open(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::Json { .. }), "{err}");
    assert!(err.to_string().contains("manifest.json"), "{err}");
}

#[test]
fn an_unpacked_archive_directory_is_refused() {
    let archive = DockerArchive::single(&["a:1"], &[app_layer(Comp::None, "one")]);
    let tmp = tempfile::tempdir().unwrap();
    for (name, data) in &archive.files {
        let path = tmp.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    std::fs::write(
        tmp.path().join("manifest.json"),
        serde_json::to_vec(&archive.manifest).unwrap(),
    )
    .unwrap();
    let err = open(tmp.path(), None).unwrap_err();
    assert!(
        matches!(err, ImageError::DockerArchiveDirectory { .. }),
        "{err}"
    );
}

/// Hostile layer content goes through the same confined unpack as OCI
/// layers.
#[test]
fn hostile_layer_entries_are_refused() {
    let hostile = LayerSpec::new(
        &[
            Entry::dir("etc/"),
            Entry::symlink("etc/evil", "../../../outside"),
            Entry::file("etc/evil/keep", b"overwritten"),
        ],
        Comp::None,
    );
    let sandbox = Sandbox::new();
    let path = sandbox.image_path("old.tar");
    DockerArchive::single(&["a:1"], &[hostile]).write_tar(&path);
    let image = open(&path, None).unwrap();
    let err = unpack(&image, &sandbox.dest, &Limits::default()).unwrap_err();
    assert!(
        matches!(err, UnpackError::Refused { .. } | UnpackError::Entry { .. }),
        "{err}"
    );
    sandbox.assert_outside_untouched();
    sandbox.assert_dest_gone();
}

/// The digest covers the decompressed stream, which is read to its end:
/// what follows the tar counts against the layer limit, so a small gzip
/// of endless zeros cannot keep the unpack busy.
#[test]
fn data_after_the_tar_counts_against_the_layer_limit() {
    let mut tar_bytes = tar(&[Entry::file("small", b"small")]);
    tar_bytes.resize(tar_bytes.len() + (4 << 20), 0);
    let layer = LayerSpec {
        tar: tar_bytes,
        comp: Comp::Gzip,
        media_type: LAYER_GZIP.to_owned(),
    };
    let (tmp, path) = write(&DockerArchive::single(&["a:1"], &[layer]));
    let image = open(&path, None).unwrap();
    let limits = Limits {
        max_layer_bytes: 1 << 20,
        max_total_bytes: 1 << 30,
    };
    let dest = tmp.path().join("rootfs");
    let err = unpack(&image, &dest, &limits).unwrap_err();
    assert!(matches!(err, UnpackError::LayerLimit { .. }), "{err}");
    assert!(!dest.exists());
    // Within the limit, the same layer unpacks.
    unpack(&image, &dest, &Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.join("small")).unwrap(), b"small");
}
