//! Real tools, where this machine has them: `docker build` a `FROM scratch`
//! image holding a static busybox, `docker image save` it, open and unpack
//! it, whichever format the local Docker writes (an OCI layout from Docker
//! 25 on, the legacy archive before). If skopeo is installed, its OCI
//! conversions of the same image are opened and unpacked too, and must be
//! the same image. Each missing tool is a skip with a message, not a
//! failure.

use std::path::Path;
use std::process::Command;

use phoenix_image::{Limits, open, unpack};

const BUSYBOX: &str = "/bin/busybox";

fn docker_server_version() -> Option<String> {
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unpacks `image_path` and checks the busybox image came out whole.
fn check_busybox_image(image_path: &Path, reference: Option<&str>, dest: &Path) {
    let image = open(image_path, reference).unwrap();
    assert_eq!(image.config.entrypoint, [BUSYBOX]);
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(image.config.os, "linux");
    unpack(&image, dest, &Limits::default()).unwrap();
    let unpacked = std::fs::read(dest.join("bin/busybox")).unwrap();
    assert!(
        unpacked == std::fs::read(BUSYBOX).unwrap(),
        "unpacked busybox differs"
    );
    let out = Command::new(dest.join("bin/busybox"))
        .arg("true")
        .output()
        .unwrap();
    assert!(out.status.success(), "the unpacked busybox does not run");
}

/// Removes the test image on drop, pass or fail.
struct ImageTag(String);

impl Drop for ImageTag {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["image", "rm", "-f", &self.0])
            .output();
    }
}

#[test]
fn docker_built_image() {
    let Some(version) = docker_server_version() else {
        eprintln!("SKIP docker_built_image: docker is not available (`docker version` failed)");
        return;
    };
    if !Path::new(BUSYBOX).exists() {
        eprintln!(
            "SKIP docker_built_image: {BUSYBOX} missing (Debian's busybox-static provides it)"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    std::fs::copy(BUSYBOX, ctx.join("busybox")).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT [\"/bin/busybox\"]\nCMD [\"sh\"]\n",
    )
    .unwrap();
    let tag = ImageTag(format!("phoenix-image-test:t{}", std::process::id()));
    run(Command::new("docker")
        .args(["build", "-q", "-t", &tag.0])
        .arg(&ctx));
    let saved = tmp.path().join("image.tar");
    run(Command::new("docker")
        .args(["image", "save", &tag.0, "-o"])
        .arg(&saved));

    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let is_oci = docker_saved_oci(&saved);
    assert_eq!(
        is_oci,
        major >= 25,
        "docker {version} saved {} archive",
        if is_oci { "an OCI" } else { "a legacy" }
    );
    let bare_tag = tag.0.rsplit_once(':').unwrap().1;
    check_busybox_image(&saved, None, &tmp.path().join("rootfs"));
    check_busybox_image(&saved, Some(&tag.0), &tmp.path().join("rootfs2"));
    check_busybox_image(&saved, Some(bare_tag), &tmp.path().join("rootfs3"));
    eprintln!(
        "docker {version} saved {} archive; opened and unpacked",
        if is_oci { "an OCI" } else { "a legacy" }
    );

    let skopeo_works = Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !skopeo_works {
        eprintln!("SKIP the skopeo half of docker_built_image: no skopeo");
        return;
    }
    let oci = tmp.path().join("image-oci.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("docker-archive:{}", saved.display()))
        .arg(format!("oci-archive:{}:{}", oci.display(), tag.0)));
    check_busybox_image(&oci, None, &tmp.path().join("rootfs4"));
    check_busybox_image(&oci, Some(bare_tag), &tmp.path().join("rootfs5"));

    let dir = tmp.path().join("layout");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("docker-archive:{}", saved.display()))
        .arg(format!("oci:{}:{}", dir.display(), bare_tag)));
    check_busybox_image(&dir, None, &tmp.path().join("rootfs6"));

    // Read by phoenix directly or converted by skopeo, it is one image.
    let saved_image = open(&saved, None).unwrap();
    let converted = open(&dir, None).unwrap();
    assert_eq!(saved_image.config, converted.config);
    assert_eq!(saved_image.layers.len(), converted.layers.len());
}

/// Whether `docker save` wrote an OCI layout (it has `oci-layout`).
fn docker_saved_oci(saved: &Path) -> bool {
    let out = Command::new("tar").arg("-tf").arg(saved).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim_start_matches("./") == "oci-layout")
}
