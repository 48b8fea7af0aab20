//! Configuration as files: `phoenix diff` and `phoenix apply` of a tree of
//! spec files (issue #15).
//!
//! A tree comes from a *source* (its canonical path, or a name given with
//! `--source`), which every service it creates keeps (the `source` column
//! of the store's `services`). Applying a tree:
//! 1. parses every file ([`phoenix_model::spec::parse_specs`], JSON or YAML
//!    by extension) and refuses the whole tree with every error of every
//!    file, or a name that two files define (naming both);
//! 2. plans ([`plan`], a pure function of the stored services and the
//!    tree): services to create, to change (with the fields that differ),
//!    unchanged ones (left alone: no new generation, no restart), and this
//!    source's services the tree no longer names (deleted only with
//!    `--prune`). A service the tree names that was deployed by hand or
//!    from another source is refused, and never touched;
//! 3. for `apply`, writes creates, changes and prunes in one transaction
//!    through the deploy path (`hub::apply`, [`Apply::Tree`]), so the
//!    cluster checks, audit rows and zero-downtime updates are deploy's.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use phoenix_model::proto::{Plan, PlanEntry, SourceFile};
use phoenix_model::spec::{Spec, env_file_keys, known_fields, load_env_files, parse_specs};

use super::apply::TreeChange;
use super::{ApiError, Apply, Hub};
use crate::lock;

/// Why a service the tree names is refused: it is not this source's.
pub(super) fn not_ours(name: &str, owner: Option<&str>) -> String {
    match owner {
        None => format!(
            "service {name:?} exists and was deployed by hand, not from this source; \
             `phoenix apply` does not touch it (delete it with `phoenix del {name}` first, \
             or rename it in the files)"
        ),
        Some(other) => match other.strip_prefix(GIT_PREFIX) {
            Some(git) => format!(
                "service {name:?} belongs to the git source {git:?}; it changes with that \
                 repository's commits (`phoenix sources`), and `phoenix apply` does not touch \
                 it (rename it, or change it in the repository)"
            ),
            None => format!(
                "service {name:?} belongs to source {other:?}; `phoenix apply` does not touch \
                 another source's services (rename it, or apply it from {other:?})"
            ),
        },
    }
}

/// The prefix of the sources the master's git sources own (`git:NAME`).
const GIT_PREFIX: &str = "git:";

/// A source a client may name (`phoenix apply --source`, `import
/// --apply`): not a git source's, which only its commits change (else a
/// folder applied as `git:conf` would change, or prune, what the watched
/// repository defines, and the master would not put it back until the
/// ref moved).
pub(super) fn check_client_source(source: &str) -> Result<(), ApiError> {
    if source.starts_with(GIT_PREFIX) {
        return Err(ApiError::Invalid(format!(
            "source {source:?}: names starting with {GIT_PREFIX:?} are the master's git sources \
             (`phoenix apply --git`, `phoenix sources`); give --source another name"
        )));
    }
    Ok(())
}

/// A service as stored: its spec (an update's new version when one is in
/// progress) and its source.
#[derive(Clone, Debug)]
pub struct Stored {
    pub spec: Spec,
    pub source: Option<String>,
}

/// Every spec of a tree with the file that defines it, or every error of
/// every file (and every name two files define), all at once.
pub fn parse_tree(files: &[SourceFile]) -> Result<Vec<(String, Spec)>, ApiError> {
    if files.is_empty() {
        return Err(ApiError::Invalid(
            "no spec files (.json, .yaml, .yml) to apply".into(),
        ));
    }
    let mut errors = Vec::new();
    let mut tree = Vec::new();
    let mut defined: HashMap<String, &str> = HashMap::new();
    // The files some spec names as an env file (`model::tree::read_tree`
    // sends them after the spec files) are no spec files themselves.
    let parsed: Vec<_> = files
        .iter()
        .map(|f| parse_specs(&f.path, &f.text))
        .collect();
    let env_files: std::collections::HashSet<String> = files
        .iter()
        .zip(&parsed)
        .filter_map(|(f, p)| Some(env_file_keys(&f.path, p.as_ref().ok()?)))
        .flatten()
        .collect();
    for (f, parsed) in files.iter().zip(parsed) {
        if env_files.contains(&f.path) {
            continue;
        }
        match parsed
            .and_then(|mut specs| load_env_files(&mut specs, &f.path, files).map(|()| specs))
        {
            Ok(specs) => {
                for spec in specs {
                    if let Some(first) = defined.get(spec.name.as_str()) {
                        errors.push(format!(
                            "service {:?} is defined in two files: {first} and {}",
                            spec.name, f.path
                        ));
                        continue;
                    }
                    defined.insert(spec.name.clone(), &f.path);
                    tree.push((f.path.clone(), spec));
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if errors.is_empty() {
        Ok(tree)
    } else {
        Err(ApiError::Invalid(format!(
            "the tree is rejected, nothing was changed:\n{}",
            errors.join("\n")
        )))
    }
}

/// The fields in which two specs differ, in the order of the spec's fields.
pub fn changed_fields(old: &Spec, new: &Spec) -> Vec<String> {
    let (Ok(old), Ok(new)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return vec!["spec".into()];
    };
    known_fields()
        .iter()
        .filter(|f| old.get(**f) != new.get(**f))
        .map(|f| (*f).to_owned())
        .collect()
}

/// What applying `tree` from `source` does to the cluster as `stored`
/// holds it; refused (every reason) when the tree names a service that is
/// not this source's.
pub fn plan(
    source: &str,
    tree: &[(String, Spec)],
    stored: &BTreeMap<String, Stored>,
    prune: bool,
) -> Result<Plan, Vec<String>> {
    let mut plan = Plan {
        source: source.to_owned(),
        prune,
        ..Plan::default()
    };
    let mut refused = Vec::new();
    for (file, spec) in tree {
        let entry = |fields, env| PlanEntry {
            name: spec.name.clone(),
            machine: spec.machine.clone(),
            file: file.clone(),
            fields,
            env,
        };
        match stored.get(&spec.name) {
            None => plan.create.push(entry(Vec::new(), Vec::new())),
            Some(s) if s.source.as_deref() != Some(source) => {
                refused.push(format!(
                    "{file}: {}",
                    not_ours(&spec.name, s.source.as_deref())
                ));
            }
            Some(s) => {
                let fields = changed_fields(&s.spec, spec);
                if fields.is_empty() {
                    plan.unchanged.push(spec.name.clone());
                } else {
                    // Variables as written: a secret stays `secret:NAME`.
                    let env = phoenix_model::env::env_changes(&s.spec, spec);
                    plan.change.push(entry(fields, env));
                }
            }
        }
    }
    plan.delete = stored
        .iter()
        .filter(|(name, s)| {
            s.source.as_deref() == Some(source) && !tree.iter().any(|(_, t)| &t.name == *name)
        })
        .map(|(name, _)| name.clone())
        .collect();
    if refused.is_empty() {
        Ok(plan)
    } else {
        Err(refused)
    }
}

impl Hub {
    /// The stored services with their sources.
    fn stored_with_sources(&self) -> Result<BTreeMap<String, Stored>, ApiError> {
        let mut store = self.store();
        let tx = store.read()?;
        let sources = tx.service_sources()?;
        Ok(tx
            .services()?
            .into_iter()
            .map(|s| {
                let source = sources.get(&s.spec.name).cloned().flatten();
                let spec = s.next.map_or(s.spec, |n| n.spec);
                (spec.name.clone(), Stored { spec, source })
            })
            .collect())
    }

    /// Plans a tree of spec files from `source` and, unless `dry_run`,
    /// applies the plan in one transaction (the prunes only with `prune`).
    pub fn apply_tree(
        &self,
        actor: &str,
        source: &str,
        files: &[SourceFile],
        prune: bool,
        dry_run: bool,
    ) -> Result<Plan, ApiError> {
        self.apply_tree_from(actor, source, source, files, prune, dry_run)
    }

    /// [`Hub::apply_tree`], with what the audit rows name after `via`
    /// (for a git source, the source and the commit).
    fn apply_tree_from(
        &self,
        actor: &str,
        source: &str,
        via: &str,
        files: &[SourceFile],
        prune: bool,
        dry_run: bool,
    ) -> Result<Plan, ApiError> {
        if source.is_empty() {
            return Err(ApiError::Invalid("the source must have a name".into()));
        }
        let tree = parse_tree(files)?;
        let stored = self.stored_with_sources()?;
        let mut plan = plan(source, &tree, &stored, prune).map_err(|refused| {
            ApiError::Conflict(format!(
                "the tree is refused, nothing was changed:\n{}",
                refused.join("\n")
            ))
        })?;
        let writes: Vec<Spec> = tree
            .into_iter()
            .filter(|(_, s)| {
                plan.create
                    .iter()
                    .chain(&plan.change)
                    .any(|e| e.name == s.name)
            })
            .map(|(_, s)| s)
            .collect();
        let prunes: &[String] = if prune { &plan.delete } else { &[] };
        if !writes.is_empty() || !prunes.is_empty() {
            plan.applied = self.apply_specs_of(
                actor,
                Apply::Tree,
                source,
                &writes,
                Some(TreeChange {
                    source,
                    via,
                    prune: prunes,
                    dry_run,
                }),
            )?;
        }
        if dry_run {
            // Checked as `apply` would be (machines, images, links,
            // secrets, addresses), nothing written.
            plan.applied.clear();
            return Ok(plan);
        }
        plan.written = true;
        Ok(plan)
    }

    /// [`Hub::apply_tree`] from the API: services it prunes that the proxy
    /// serves leave its rotation and drain first, as `del` has them do.
    pub async fn apply_tree_drained(
        self: &Arc<Self>,
        actor: String,
        source: String,
        files: Vec<SourceFile>,
        prune: bool,
        dry_run: bool,
    ) -> Result<Plan, ApiError> {
        check_client_source(&source)?;
        let via = source.clone();
        self.apply_tree_via(actor, source, via, files, prune, dry_run)
            .await
    }

    /// [`Hub::apply_tree_drained`], the audit rows naming `via`.
    pub(super) async fn apply_tree_via(
        self: &Arc<Self>,
        actor: String,
        source: String,
        via: String,
        files: Vec<SourceFile>,
        prune: bool,
        dry_run: bool,
    ) -> Result<Plan, ApiError> {
        let blocking = |dry_run: bool| {
            let (h, a, s, v, f) = (
                self.clone(),
                actor.clone(),
                source.clone(),
                via.clone(),
                files.clone(),
            );
            async move {
                tokio::task::spawn_blocking(move || {
                    h.apply_tree_from(&a, &s, &v, &f, prune, dry_run)
                })
                .await
                .unwrap_or_else(|e| Err(ApiError::Internal(format!("apply: {e}"))))
            }
        };
        if dry_run || !prune {
            return blocking(dry_run).await;
        }
        let preview = blocking(true).await?;
        let mut draining = Vec::new();
        for name in &preview.delete {
            let svc = self.store().read()?.service(name).ok().flatten();
            if let Some(svc) = svc.filter(|s| s.spec.proxyname.is_some()) {
                lock(&self.rollouts).deleting.insert(name.clone());
                draining.push((name.clone(), svc.instance().to_owned()));
            }
        }
        for (_, instance) in &draining {
            self.drain(instance).await;
        }
        let applied = blocking(false).await;
        let mut rollouts = lock(&self.rollouts);
        for (name, _) in &draining {
            rollouts.deleting.remove(name);
        }
        drop(rollouts);
        self.routes_changed.notify_one();
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_may_not_name_a_git_source_s_source() {
        let e = check_client_source(&super::super::git::owner("conf")).unwrap_err();
        assert!(matches!(e, ApiError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("\"git:conf\""), "{e}");
        assert!(check_client_source("/srv/specs").is_ok());
        assert!(check_client_source("compose:/srv/compose.yaml").is_ok());
        // A git source's service is not offered to `apply` as another's.
        let why = not_ours("web", Some("git:conf"));
        assert!(why.contains("belongs to the git source \"conf\""), "{why}");
        assert!(!why.contains("apply it from"), "{why}");
    }

    fn spec(name: &str, args: &[&str]) -> Spec {
        let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
        parse_specs(
            "t.json",
            &format!(
                r#"{{"machine":"m1","name":"{name}","image":"testy","type":"binary","args":[{}]}}"#,
                args.join(",")
            ),
        )
        .unwrap()
        .remove(0)
    }

    fn stored(items: &[(&str, Spec, Option<&str>)]) -> BTreeMap<String, Stored> {
        items
            .iter()
            .map(|(n, s, src)| {
                (
                    (*n).to_owned(),
                    Stored {
                        spec: s.clone(),
                        source: src.map(str::to_owned),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_plan_creates_changes_keeps_and_lists_what_the_tree_dropped() {
        let tree = vec![
            ("d/new.json".to_owned(), spec("new", &[])),
            ("d/api.yaml".to_owned(), spec("api", &["--fast"])),
            ("d/same.json".to_owned(), spec("same", &["x"])),
        ];
        let mut api_before = spec("api", &[]);
        api_before.env = vec!["A=1".into()];
        let held = stored(&[
            ("api", api_before, Some("/d")),
            ("same", spec("same", &["x"]), Some("/d")),
            ("old", spec("old", &[]), Some("/d")),
            ("other", spec("other", &[]), Some("/elsewhere")),
            ("manual", spec("manual", &[]), None),
        ]);
        let p = plan("/d", &tree, &held, false).unwrap();
        assert_eq!(p.create.len(), 1);
        assert_eq!(
            (p.create[0].name.as_str(), p.create[0].file.as_str()),
            ("new", "d/new.json")
        );
        assert_eq!(p.change.len(), 1);
        assert_eq!(p.change[0].name, "api");
        assert_eq!(p.change[0].fields, ["env", "args"]);
        assert_eq!(p.unchanged, ["same"]);
        // Only this source's: never another source's or a hand-made one.
        assert_eq!(p.delete, ["old"]);
        assert!(!p.prune && !p.written);
    }

    #[test]
    fn a_tree_s_env_files_load_into_its_specs_and_are_no_specs_themselves() {
        let file = |path: &str, text: &str| SourceFile {
            path: path.into(),
            text: text.into(),
        };
        let web = r#"{"machine":"m1","name":"web","image":"testy","type":"binary",
            "env_file":["../common.env"],"env":["DB=secret:db"]}"#;
        let files = vec![
            file("d/web/web.json", web),
            file("d/common.env", "LEVEL=debug\nTOKEN=secret:api\n"),
        ];
        let tree = parse_tree(&files).unwrap();
        assert_eq!(tree.len(), 1);
        let spec = &tree[0].1;
        assert_eq!(
            spec.env_file[0].env.as_deref(),
            Some(&["LEVEL=debug".to_owned(), "TOKEN=secret:api".to_owned()][..])
        );
        assert_eq!(spec.secret_refs(), ["api", "db"]);
        // A changed env file is a changed spec; the diff names the
        // variables, a secret by name.
        let mut before = spec.clone();
        before.env_file[0].env = Some(vec!["LEVEL=info".into(), "TOKEN=secret:old".into()]);
        let held = stored(&[("web", before, Some("/d"))]);
        let p = plan("/d", &tree, &held, false).unwrap();
        assert_eq!(p.change[0].fields, ["env_file"]);
        assert_eq!(
            p.change[0].env,
            [
                "~LEVEL=debug (was info)",
                "~TOKEN=secret:api (was secret:old)"
            ]
        );
        // An env file missing from the tree, or with a bad line, refuses
        // the tree, naming the file (and the line).
        let e = parse_tree(&files[..1]).unwrap_err().to_string();
        assert!(e.contains("env file d/common.env was not sent"), "{e}");
        let bad = vec![file("d/web/web.json", web), file("d/common.env", "oops\n")];
        let e = parse_tree(&bad).unwrap_err().to_string();
        assert!(e.contains("d/common.env:1: expected KEY=VALUE"), "{e}");
    }

    #[test]
    fn the_same_tree_again_plans_nothing() {
        let tree = vec![("a.json".to_owned(), spec("a", &["1"]))];
        let held = stored(&[("a", spec("a", &["1"]), Some("src"))]);
        let p = plan("src", &tree, &held, true).unwrap();
        assert!(p.create.is_empty() && p.change.is_empty() && p.delete.is_empty());
        assert_eq!(p.unchanged, ["a"]);
    }

    #[test]
    fn a_service_of_another_source_or_made_by_hand_is_refused_naming_it() {
        let tree = vec![
            ("t/a.json".to_owned(), spec("a", &[])),
            ("t/b.json".to_owned(), spec("b", &[])),
        ];
        let held = stored(&[
            ("a", spec("a", &[]), None),
            ("b", spec("b", &[]), Some("/x")),
        ]);
        let refused = plan("/t", &tree, &held, false).unwrap_err();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].starts_with("t/a.json: service \"a\" exists and was deployed by hand"));
        assert!(refused[1].contains("service \"b\" belongs to source \"/x\""));
    }

    #[test]
    fn every_error_of_every_file_and_names_defined_twice() {
        let file = |path: &str, text: &str| SourceFile {
            path: path.into(),
            text: text.into(),
        };
        let good = r#"{"machine":"m1","name":"web","image":"testy","type":"binary"}"#;
        let e = parse_tree(&[
            file("a.json", good),
            file(
                "b.yaml",
                "machine: m1\nname: web\nimage: testy\ntype: binary\n",
            ),
            file(
                "c.json",
                r#"{"machine":"m1","name":"x","imgae":"t","type":"binary"}"#,
            ),
            file(
                "d.yml",
                "machine: m1\nname: y\nimage: testy\ntype: binary\nproxyport: 0\n",
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("service \"web\" is defined in two files: a.json and b.yaml"),
            "{e}"
        );
        assert!(e.contains("c.json: rejected"), "{e}");
        assert!(e.contains("did you mean `image`?"), "{e}");
        assert!(e.contains("d.yml: rejected"), "{e}");
        assert!(e.contains("line 5: spec \"y\": field `proxyport`"), "{e}");
        assert!(parse_tree(&[]).is_err());
        assert_eq!(parse_tree(&[file("a.json", good)]).unwrap().len(), 1);
    }

    fn file(path: &str, name: &str, args: &str) -> SourceFile {
        SourceFile {
            path: path.into(),
            text: format!(
                r#"{{"machine":"m1","name":"{name}","image":"app","type":"binary","args":["{args}"]}}"#
            ),
        }
    }

    #[test]
    fn a_tree_is_written_once_again_a_no_op_and_pruned_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let hub = crate::hub::apply::tests::hub(dir.path());
        let generations = |hub: &Hub| -> Vec<(String, u64)> {
            let mut store = hub.store();
            let tx = store.read().unwrap();
            tx.services()
                .unwrap()
                .into_iter()
                .map(|s| (s.spec.name, s.generation))
                .collect()
        };
        let tree = [file("t/a.json", "a", "1"), file("t/b.json", "b", "1")];
        let diff = hub.apply_tree("me", "/t", &tree, false, true).unwrap();
        assert_eq!(diff.create.len(), 2);
        assert!(diff.applied.is_empty());
        assert!(!diff.written && generations(&hub).is_empty());
        assert!(
            hub.store()
                .read()
                .unwrap()
                .audit_log(10)
                .unwrap()
                .is_empty()
        );
        // A dry run meets what the apply would: here a machine that is
        // not in the cluster, and a link to no service.
        let mut bad = file("t/c.json", "c", "1");
        bad.text = bad.text.replace("\"m1\"", "\"m9\"");
        let mut linked = file("t/d.json", "d", "1");
        linked.text = linked
            .text
            .replace("\"args\"", "\"link\":[\"nosuch\"],\"args\"");
        for (tree, why) in [(bad, "m9"), (linked, "nosuch")] {
            let tree = [tree];
            let dry = hub.apply_tree("me", "/t", &tree, false, true).unwrap_err();
            let real = hub.apply_tree("me", "/t", &tree, false, false).unwrap_err();
            assert_eq!(dry.to_string(), real.to_string());
            assert!(dry.to_string().contains(why), "{dry}");
        }
        assert!(generations(&hub).is_empty());
        let p = hub.apply_tree("me", "/t", &tree, false, false).unwrap();
        assert!(p.written);
        assert_eq!(p.applied.len(), 2);
        assert_eq!(generations(&hub), [("a".into(), 1), ("b".into(), 1)]);
        let audit = hub.store().read().unwrap().audit_log(10).unwrap();
        assert!(
            audit
                .iter()
                .all(|e| e.action == "apply" && e.actor == "me via /t")
        );
        // The same tree again: nothing written, no generation bumped.
        let again = hub.apply_tree("me", "/t", &tree, true, false).unwrap();
        assert!(again.applied.is_empty() && again.delete.is_empty());
        assert_eq!(again.unchanged, ["a", "b"]);
        assert_eq!(hub.store().read().unwrap().audit_log(10).unwrap().len(), 2);
        // One file changed, one gone: only that one changes; the other is
        // kept until --prune.
        let tree = [file("t/a.json", "a", "2")];
        let p = hub.apply_tree("me", "/t", &tree, false, false).unwrap();
        assert_eq!(p.change[0].fields, ["args"]);
        assert_eq!(p.delete, ["b"]);
        assert_eq!(generations(&hub), [("a".into(), 2), ("b".into(), 1)]);
        let p = hub.apply_tree("me", "/t", &tree, true, false).unwrap();
        assert_eq!((p.delete.clone(), p.prune), (vec!["b".to_owned()], true));
        assert_eq!(generations(&hub), [("a".into(), 2)]);
        // Another source naming `a`, and a tree naming a hand-made service.
        let e = hub.apply_tree("me", "/u", &tree, false, false).unwrap_err();
        assert!(e.to_string().contains("belongs to source \"/t\""), "{e}");
        hub.apply(
            "me",
            Apply::Deploy,
            "h.json",
            &file("h.json", "h", "1").text,
        )
        .unwrap();
        let e = hub
            .apply_tree("me", "/t", &[file("t/h.json", "h", "1")], true, false)
            .unwrap_err();
        assert!(e.to_string().contains("deployed by hand"), "{e}");
        // Refused whole: `a` was not pruned.
        assert_eq!(generations(&hub), [("a".into(), 2), ("h".into(), 1)]);
    }
}
