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
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no spec files (.json, .yaml, .yml); nothing to apply")]
    Empty { path: String },
    #[error("{path} is a link that leads out of the tree; it is not read")]
    Escapes { path: String },
}

/// Which symbolic links a tree may follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Links<'a> {
    /// Any (a folder the user named on the command line).
    Follow,
    /// Only those that lead to a path under this (canonical) root.
    Within(&'a Path),
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> TreeError {
    let path = path.display().to_string();
    move |source| TreeError::Read { path, source }
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
/// [`SourceFile::path`], which errors show) by `name`.
pub fn read_tree(
    path: &Path,
    links: Links<'_>,
    name: impl Fn(&Path) -> String,
) -> Result<Vec<SourceFile>, TreeError> {
    spec_files(path, links)?
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).map_err(read_err(&p))?;
            Ok(SourceFile { path: name(&p), text })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            read_tree(&root, Links::Follow, named).unwrap()[1].text,
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

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let e = spec_files(&empty, Links::Follow).unwrap_err().to_string();
        assert!(e.contains("holds no spec files"), "{e}");
        let e = spec_files(&dir.path().join("nope"), Links::Follow).unwrap_err();
        assert!(e.to_string().starts_with("cannot read "), "{e}");
    }
}
