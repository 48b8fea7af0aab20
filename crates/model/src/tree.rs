//! Reading a tree of spec files from disk: `phoenix apply PATH` and
//! `phoenix diff PATH` in the CLI, and the master for a git source's
//! checked-out commit (issue #15). Both send what they read to the same
//! parser ([`crate::spec::parse_specs`], through the master's
//! `hub::sources::parse_tree`), so a tree gives the same errors, with file
//! and line, wherever it is read.
//!
//! A tree is PATH itself if it is a file, else every `.json`, `.yaml` and
//! `.yml` file under it, sorted by path, skipping names that start with a
//! dot (files and folders). Links are followed; with [`Links::Within`]
//! only links that stay inside the tree's root (a git checkout's files
//! must not read the master's disk).

use std::path::{Path, PathBuf};

use crate::proto::SourceFile;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    // `error`, not `source`: the message says it already, and a chain
    // printer (anyhow's `{:#}`) would say it twice.
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path} holds no spec files (.json, .yaml, .yml); nothing to apply")]
    Empty { path: String },
    #[error("{path} leads out of the tree (a link, or `..`); it is not read")]
    Escapes { path: String },
    #[error("{path} is larger than {max} bytes, more than a {what} can be; it is not read")]
    TooLarge {
        path: String,
        what: &'static str,
        max: u64,
    },
    /// An env file a spec names (`env_file`) cannot be read.
    #[error("cannot read env file {path} (named in `env_file` of {spec}): {error}")]
    EnvFile {
        path: String,
        spec: String,
        error: std::io::Error,
    },
}

/// Which symbolic links a tree may follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links<'a> {
    /// Any (a folder the user named on the command line).
    Follow,
    /// Only those that lead to a path under this (canonical) root.
    Within(&'a Path),
}

/// The largest spec file a tree may hold. A spec is at most 256 KiB as
/// JSON; this is room for many, and keeps a hostile tree (a git commit)
/// from making its reader parse hundreds of MiB of YAML.
pub const MAX_SPEC_FILE_BYTES: u64 = 8 << 20;
/// The largest env file: a service's args and env together are at most
/// 128 KiB.
pub const MAX_ENV_FILE_BYTES: u64 = 1 << 20;

/// The text of the file at `path`, or `None` if it is over `max` bytes,
/// found without reading more than that (a link to `/dev/zero` too).
fn read_limited(path: &Path, max: u64) -> std::io::Result<Option<String>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Ok(None);
    }
    String::from_utf8(bytes).map(Some).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> TreeError {
    let path = path.display().to_string();
    move |error| TreeError::Read { path, error }
}

/// Whether a file name is a spec file's: `.json`, `.yaml` or `.yml`.
pub fn is_spec_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "json" | "yaml" | "yml"))
}

fn check_link(path: &Path, links: Links<'_>) -> Result<(), TreeError> {
    let Links::Within(root) = links else {
        return Ok(());
    };
    let real = std::fs::canonicalize(path).map_err(read_err(path))?;
    if real.starts_with(root) {
        Ok(())
    } else {
        Err(TreeError::Escapes {
            path: path.display().to_string(),
        })
    }
}

/// The spec files of the tree at `path`, sorted.
pub fn spec_files(path: &Path, links: Links<'_>) -> Result<Vec<PathBuf>, TreeError> {
    check_link(path, links)?;
    let meta = std::fs::metadata(path).map_err(read_err(path))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut found = Vec::new();
    let mut todo = vec![path.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).map_err(read_err(&dir))? {
            let entry = entry.map_err(read_err(&dir))?;
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            // Follows links, as reading a file named on the command line does.
            let meta = std::fs::metadata(&p).map_err(read_err(&p))?;
            if meta.is_dir() {
                // A link to this folder or one above it (`current -> .`)
                // would be walked until the kernel's limit on links in a
                // path, and then fail: it holds nothing new, skip it.
                if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                    let to = std::fs::canonicalize(&p).map_err(read_err(&p))?;
                    let here = std::fs::canonicalize(&dir).map_err(read_err(&dir))?;
                    if here.starts_with(&to) {
                        continue;
                    }
                }
                check_link(&p, links)?;
                todo.push(p);
            } else if is_spec_file(&p) {
                check_link(&p, links)?;
                found.push(p);
            }
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(TreeError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(found)
}

/// Every spec file of the tree at `path` with its text, each named (in
/// [`SourceFile::path`], which errors show) by `name`; then the env files
/// their specs name (`env_file`, relative to each spec file), each once,
/// named by [`crate::spec::env_file_key`] of its spec file's name. A
/// tree's reader (`hub::sources::parse_tree`) tells them apart by
/// [`is_spec_file`]: an env file's name never ends in `.json`, `.yaml` or
/// `.yml` (the spec's checks refuse that).
pub fn read_tree(
    path: &Path,
    links: Links<'_>,
    name: impl Fn(&Path) -> String,
) -> Result<Vec<SourceFile>, TreeError> {
    let mut files = Vec::new();
    let mut env_files: Vec<SourceFile> = Vec::new();
    // A link out is named as the tree names its files.
    let found = spec_files(path, links).map_err(|e| match e {
        TreeError::Escapes { path } => TreeError::Escapes {
            path: name(Path::new(&path)),
        },
        e => e,
    })?;
    for p in found {
        let text = read_limited(&p, MAX_SPEC_FILE_BYTES)
            .map_err(read_err(&p))?
            .ok_or_else(|| TreeError::TooLarge {
                path: p.display().to_string(),
                what: "spec file",
                max: MAX_SPEC_FILE_BYTES,
            })?;
        let named = name(&p);
        for f in read_env_files(&p, &named, &text, links)? {
            if !env_files.iter().any(|e| e.path == f.path) {
                env_files.push(f);
            }
        }
        files.push(SourceFile { path: named, text });
    }
    files.extend(env_files);
    Ok(files)
}

/// The env files the specs of one spec file name, read from beside it
/// (`spec_path` on disk, `spec_name` as errors and the master name it),
/// each named by [`crate::spec::env_file_key`]. A spec file that does not
/// parse names none: the master reports its errors.
pub fn read_env_files(
    spec_path: &Path,
    spec_name: &str,
    text: &str,
    links: Links<'_>,
) -> Result<Vec<SourceFile>, TreeError> {
    use crate::spec::{env_file_key, normalize, parse_specs};
    let Ok(specs) = parse_specs(spec_name, text) else {
        return Ok(Vec::new());
    };
    let base = spec_path.parent().unwrap_or(Path::new(""));
    let mut out: Vec<SourceFile> = Vec::new();
    for entry in specs.iter().flat_map(|s| &s.env_file) {
        let key = env_file_key(spec_name, &entry.path);
        if out.iter().any(|f| f.path == key) {
            continue;
        }
        let disk = normalize(&base.join(&entry.path));
        // Errors name it as the tree does (a git checkout's path in the
        // repository, not where the master unpacked it).
        let fail = |error| TreeError::EnvFile {
            path: key.clone(),
            spec: spec_name.to_owned(),
            error,
        };
        if let Links::Within(root) = links {
            // `..` that climbs out is refused before the disk is asked,
            // so a tree cannot learn which files exist outside it.
            let from = std::fs::canonicalize(base).map_err(read_err(base))?;
            if !normalize(&from.join(&entry.path)).starts_with(root) {
                return Err(TreeError::Escapes { path: key.clone() });
            }
            let real = std::fs::canonicalize(&disk).map_err(fail)?;
            if !real.starts_with(root) {
                return Err(TreeError::Escapes { path: key.clone() });
            }
        }
        let text = read_limited(&disk, MAX_ENV_FILE_BYTES)
            .map_err(fail)?
            .ok_or_else(|| TreeError::TooLarge {
                path: key.clone(),
                what: "env file",
                max: MAX_ENV_FILE_BYTES,
            })?;
        out.push(SourceFile { path: key, text });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_files_are_read_from_beside_their_spec_files_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        std::fs::create_dir_all(root.join("web")).unwrap();
        let spec = |name: &str, files: &str| {
            format!(
                r#"{{"machine":"m","name":"{name}","image":"x","type":"binary","env_file":[{files}]}}"#
            )
        };
        std::fs::write(
            root.join("web/w.json"),
            spec("w", r#""w.env","../common.env""#),
        )
        .unwrap();
        std::fs::write(root.join("a.json"), spec("a", r#""common.env""#)).unwrap();
        std::fs::write(root.join("web/w.env"), "W=1\n").unwrap();
        std::fs::write(root.join("common.env"), "C=1\n").unwrap();
        let named = |p: &Path| p.strip_prefix(&root).unwrap().display().to_string();
        let files = read_tree(&root, Links::Follow, named).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["a.json", "web/w.json", "common.env", "web/w.env"]);
        assert_eq!(files[3].text, "W=1\n");

        std::fs::remove_file(root.join("web/w.env")).unwrap();
        let e = read_tree(&root, Links::Follow, named)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read env file"), "{e}");
        assert!(
            e.contains("web/w.env (named in `env_file` of web/w.json)"),
            "{e}"
        );

        // Within a git checkout, an env file may not lead out of it.
        std::fs::write(root.join("web/w.env"), "W=1\n").unwrap();
        std::fs::write(dir.path().join("outside.env"), "S=1\n").unwrap();
        std::fs::write(root.join("a.json"), spec("a", r#""../outside.env""#)).unwrap();
        let canonical = std::fs::canonicalize(&root).unwrap();
        let e = read_tree(&root, Links::Within(&canonical), named).unwrap_err();
        assert!(matches!(e, TreeError::Escapes { .. }), "{e}");
        // One that climbs out to a file that does not exist is refused
        // the same way: whether it exists is not for the tree to learn.
        std::fs::write(
            root.join("a.json"),
            spec("a", r#""../../../../../../../../../../no/such.env""#),
        )
        .unwrap();
        let e = read_tree(&root, Links::Within(&canonical), named).unwrap_err();
        assert!(matches!(e, TreeError::Escapes { .. }), "{e}");
        // Named as the tree names it, not where it was unpacked.
        let shown = e.to_string();
        assert!(shown.starts_with("../../"), "{shown}");
        assert!(!shown.contains(&*dir.path().to_string_lossy()), "{shown}");
        std::fs::write(root.join("a.json"), spec("a", r#""missing.env""#)).unwrap();
        let e = read_tree(&root, Links::Within(&canonical), named).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read env file missing.env (named in `env_file` of a.json)"),
            "{e}"
        );
        // A folder's files may lead anywhere (the user's own disk), but
        // not read without end.
        std::os::unix::fs::symlink("/dev/zero", root.join("zero.env")).unwrap();
        std::fs::write(root.join("a.json"), spec("a", r#""zero.env""#)).unwrap();
        let e = read_tree(&root, Links::Follow, named).unwrap_err();
        assert!(
            matches!(
                &e,
                TreeError::TooLarge {
                    what: "env file",
                    ..
                }
            ),
            "{e}"
        );
        std::fs::write(root.join("a.json"), spec("a", r#""common.env""#)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", root.join("z.yaml")).unwrap();
        let e = read_tree(&root, Links::Follow, named).unwrap_err();
        assert!(
            matches!(
                &e,
                TreeError::TooLarge {
                    what: "spec file",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("z.yaml is larger than"), "{e}");
    }

    #[test]
    fn a_folder_s_spec_files_sorted_without_dotfiles_and_links_kept_inside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        std::fs::create_dir_all(root.join("b/.hidden")).unwrap();
        std::fs::write(root.join("b/x.yaml"), "x").unwrap();
        std::fs::write(root.join("a.json"), "a").unwrap();
        std::fs::write(root.join("README.md"), "no").unwrap();
        std::fs::write(root.join(".dot.json"), "no").unwrap();
        std::fs::write(root.join("b/.hidden/h.json"), "no").unwrap();
        let named = |p: &Path| p.strip_prefix(&root).unwrap().display().to_string();
        let files = read_tree(&root, Links::Follow, named).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["a.json", "b/x.yaml"]);
        assert_eq!(files[0].text, "a");

        std::fs::write(dir.path().join("outside.json"), "secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside.json"), root.join("l.json")).unwrap();
        let canonical = std::fs::canonicalize(&root).unwrap();
        let e = read_tree(&root, Links::Within(&canonical), named).unwrap_err();
        assert!(
            matches!(&e, TreeError::Escapes { path } if path.ends_with("l.json")),
            "{e}"
        );
        assert_eq!(
            read_tree(&root, Links::Follow, named).unwrap()[2].text,
            "secret"
        );
        std::fs::remove_file(root.join("l.json")).unwrap();
        std::os::unix::fs::symlink(root.join("a.json"), root.join("l.json")).unwrap();
        assert_eq!(
            read_tree(&root, Links::Within(&canonical), named)
                .unwrap()
                .len(),
            3
        );

        // Links to a folder above (or itself) are not walked round and
        // round: they hold nothing new.
        std::os::unix::fs::symlink(".", root.join("b/here")).unwrap();
        std::os::unix::fs::symlink("..", root.join("b/up")).unwrap();
        std::os::unix::fs::symlink("../..", root.join("b/out")).unwrap();
        for links in [Links::Follow, Links::Within(&canonical)] {
            let names: Vec<String> = read_tree(&root, links, named)
                .unwrap()
                .into_iter()
                .map(|f| f.path)
                .collect();
            assert_eq!(names, ["a.json", "b/x.yaml", "l.json"], "{links:?}");
        }

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let e = spec_files(&empty, Links::Follow).unwrap_err().to_string();
        assert!(e.contains("holds no spec files"), "{e}");
        let e = spec_files(&dir.path().join("nope"), Links::Follow).unwrap_err();
        assert!(e.to_string().starts_with("cannot read "), "{e}");
    }
}
