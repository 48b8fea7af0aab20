//! Container images for Phoenix: open the image file a user has, check it,
//! and unpack it into a root filesystem on disk, safely.
//!
//! # What is accepted
//!
//! The image files people actually have:
//!
//! - `docker image save IMAGE:TAG -o image.tar` from Docker >= 25: a tar
//!   holding an OCI image layout (`oci-layout`, `index.json`,
//!   `blobs/sha256/...`) beside Docker's own `manifest.json`, which we
//!   ignore.
//! - An OCI layout as a tar ("oci-archive"): `podman save --format
//!   oci-archive`, `skopeo copy ... oci-archive:FILE`, `buildah push ...
//!   oci-archive:FILE`.
//! - An OCI layout as a directory (`skopeo copy ... oci:DIR`).
//! - A legacy Docker archive: what `docker save` writes before Docker 25
//!   (Debian's and Ubuntu's packaged Docker still do), and `skopeo copy
//!   ... docker-archive:FILE`: `manifest.json` listing each image's config
//!   file and layer tars, no `index.json`. Module [`docker_archive`] reads
//!   it into the same [`Image`], its layers checked against the config's
//!   `rootfs.diff_ids`, and unpacked by the same code.
//!
//! A compressed archive (`image.tar.gz`) is refused with "decompress it
//! first": blobs are read in place, which needs a plain tar.
//!
//! # Opening ([`open`], module [`layout`])
//!
//! `index.json` lists images. Several images in one file (`docker save a:1
//! b:2`) are told apart by their names, read from the annotations
//! `io.containerd.image.name` (Docker: `docker.io/library/myapp:v2`) and
//! `org.opencontainers.image.ref.name` (Docker: `v2`; skopeo/podman: what
//! the user wrote). The `reference` argument matches a tag (`v2`), a short
//! or full name (`myapp:v2`, `docker.io/library/myapp:v2`, compared after
//! Docker's normalization), or a manifest digest. Without one, the file must
//! hold exactly one image (the same image under several names counts once);
//! otherwise the error lists the names there are. A legacy archive's
//! images are chosen the same way, by the names in its `manifest.json`
//! (`RepoTags`, e.g. `myapp:v2`) or by Docker's image id.
//!
//! An entry may point to an image index instead of a manifest (multi-
//! platform images, and Docker's containerd image store): it is followed,
//! up to four levels, picking `linux/<this host's architecture>` and
//! skipping buildx attestation manifests.
//!
//! Every blob read is checked against its descriptor: the size when it is
//! located, the sha256 digest when it is read. The index, manifest and
//! config are read (and checked) by [`open`]; layers are located and
//! size-checked by [`open`] and digest-checked while [`unpack()`] streams
//! them (or by [`Image::verify`]). A mismatch names the blob.
//!
//! For a tar file, the tar's headers are read once (seeking over the data)
//! into a map from member name to offset and size; a blob is then read with
//! positioned reads (`pread`) from the one open descriptor. Nothing is
//! extracted to a temporary directory, and an [`Image`] can be cloned and
//! read from several threads.
//!
//! # Unpacking ([`unpack()`], module [`unpack`](mod@unpack))
//!
//! Layers are applied bottom first into a new directory, streaming: blob →
//! sha256 → decompression (gzip with flate2, zstd with libzstd; chosen by
//! media type, with the data's magic bytes as the fallback and the
//! arbiter) → tar parser → the filesystem (for a legacy archive's layer,
//! whose digest is a diff_id, the sha256 comes after the decompression).
//! The `tar` crate only parses; every entry is applied by our code, so
//! that the one rule below holds.
//!
//! **Nothing is written outside the destination.** The destination is
//! opened once as an `O_PATH` descriptor (the root). For each entry:
//!
//! 1. The path is cleaned lexically: `.` and empty components dropped, `..`
//!    applied; an absolute path, or one whose `..` climbs above the root,
//!    is refused.
//! 2. The parent directory is opened with `openat2(2)` relative to the
//!    root, with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!    RESOLVE_NO_MAGICLINKS`: the kernel refuses any symlink on the way
//!    (`ELOOP`) and any escape (`EXDEV`). So a layer that plants `a ->
//!    /etc` or `a -> ../..` and then writes `a/passwd` is refused, whatever
//!    earlier layers or entries did. Missing parents are created (0755).
//! 3. The last component is created relative to that parent descriptor with
//!    `*at()` calls that never follow it: `mkdirat`; `openat(O_CREAT |
//!    O_EXCL | O_NOFOLLOW)` after `unlinkat` of whatever was there;
//!    `symlinkat` (a symlink's target is stored as is, never followed by
//!    us); `linkat` without `AT_SYMLINK_FOLLOW` to a target resolved the
//!    same way (a hard link target outside the root, or reached through a
//!    symlink, is refused); `mknodat`; `fchownat(AT_SYMLINK_NOFOLLOW)`,
//!    `utimensat(AT_SYMLINK_NOFOLLOW)`, and `fchown`/`fchmod`/`futimens`/
//!    `fsetxattr` on descriptors we created.
//!
//! The threat model is the image's content; nothing else is expected to
//! write into the destination while it is unpacked (it is created `0700`).
//!
//! Metadata: modes including setuid/setgid/sticky (set after the owner, as
//! chown clears them), owners (`EPERM` ignored when not root, `EINVAL` for
//! ids outside a user namespace ignored always; counted and warned once),
//! mtimes (PAX sub-second times honoured), xattrs from PAX
//! `SCHILY.xattr.*` records (best effort). Directories are created `0700`
//! and get their owner, mode and times in a last pass, deepest first, so
//! their children do not disturb their mtimes and a read-only directory
//! does not block its own contents. Device nodes (char, block, fifo) are
//! made with `mknodat`; where that is not permitted they are skipped with a
//! warning.
//!
//! Whiteouts follow the OCI layer spec: `DIR/.wh.NAME` deletes `NAME`
//! (from lower layers; a directory with all it holds), and
//! `DIR/.wh..wh..opq` empties `DIR` of everything that this layer did not
//! itself put there (before or after the marker). Whiteout files are never
//! created. aufs bookkeeping entries (`.wh..wh.*`) are ignored.
//!
//! **Bounded.** [`Limits`] caps the uncompressed bytes written per layer
//! and per image: file data, plus 512 bytes per entry (so millions of empty
//! files count too). An entry's declared size is checked before anything is
//! written, and bytes are counted again as they are copied. Tar extension
//! headers (PAX, GNU long names) are capped at 1 MiB per entry, because the
//! tar crate reads them into memory.
//!
//! **All or nothing.** [`unpack()`] creates the destination (it must not
//! exist) and, on any error, removes it entirely, with the same
//! symlink-proof `*at()` walk. A layer's digest is known only once it has
//! been read through, so a corrupt layer is found at its end, and the whole
//! destination goes.
//!
//! # Not done (yet)
//!
//! - Paths through a symlink are refused, not resolved inside the root the
//!   way containerd does (`RESOLVE_IN_ROOT` would be the switch); layers
//!   built by Docker and buildah never need it.
//! - In OCI images the config's `rootfs.diff_ids` (digests of the
//!   uncompressed layers) are not checked: the layer blob digests already
//!   cover the content. (A legacy Docker archive has nothing else, and
//!   there they are checked.)
//! - Sparse files are written out in full.

pub mod docker_archive;
pub mod guest;
pub mod initramfs;
pub mod layout;
mod sys;
pub mod unpack;
pub mod vm;

pub use layout::{Image, ImageConfig, ImageError, Layer, open};
pub use unpack::{Limits, UnpackError, unpack};
