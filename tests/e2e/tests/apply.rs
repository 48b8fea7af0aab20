//! End to end: configuration as files (issue #15). `phoenix apply` of a
//! folder of specs (JSON and YAML) makes the cluster match it: applying
//! it again restarts nothing, a changed file restarts only its service, a
//! removed file's service is kept until `--prune`, a service deployed by
//! hand is never touched, and a folder with bad files applies nothing and
//! names every error.

use std::path::Path;

use phoenix_e2e::{Cluster, free_port, testy};
use serde_json::Value;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// The service's generation and pid.
fn running(c: &Cluster, name: &str) -> (u64, u64) {
    let s = c.wait_status(name, "running", |s| {
        s["state"] == "running" && s["pid"].as_u64().is_some()
    });
    (
        s["generation"].as_u64().unwrap(),
        s["pid"].as_u64().unwrap(),
    )
}

#[test]
fn a_folder_of_specs_is_applied_kept_in_step_and_pruned_only_when_asked() {
    let c = Cluster::start(1);
    let tree = c.dir.path().join("conf");
    let dir = tree.to_str().unwrap();
    write(&tree.join("web.json"), &testy("m1", "web", &[]).to_string());
    write(
        &tree.join("jobs/api.json"),
        &testy("m1", "api", &[]).to_string(),
    );
    let port = free_port();
    let yaml = |args: &str| {
        format!(
            "# a YAML spec\nmachine: m1\nname: worker\nimage: testy\ntype: binary\n\
             proxyport: {port}\nargs: [{args}]\n"
        )
    };
    write(&tree.join("jobs/worker.yaml"), &yaml(""));
    // Dotfiles and other files are not specs.
    write(&tree.join(".hidden.json"), "not json");
    write(&tree.join("README.md"), "# notes");

    let diff = c.ok(&["diff", dir]);
    assert!(diff.contains("+ web (m1)"), "{diff}");
    assert!(diff.contains("+ worker (m1)"), "{diff}");
    assert!(diff.contains("nothing was changed"), "{diff}");
    assert!(
        c.json(&["services", "--json"])
            .as_array()
            .unwrap()
            .is_empty()
    );

    let out = c.ok(&["apply", dir, "--timeout-s", "30"]);
    assert!(out.contains("+ api (m1)"), "{out}");
    let before: Vec<(u64, u64)> = ["web", "api", "worker"]
        .iter()
        .map(|n| running(&c, n))
        .collect();

    // The same tree again: a no-op, nothing restarted.
    let again = c.ok(&["apply", dir, "--timeout-s", "30"]);
    assert!(again.contains("= 3 unchanged"), "{again}");
    assert!(again.contains("nothing to change"), "{again}");
    let plan: Value = c.json(&["diff", dir, "--json"]);
    assert_eq!(plan["unchanged"].as_array().unwrap().len(), 3, "{plan}");
    for (n, b) in ["web", "api", "worker"].iter().zip(&before) {
        assert_eq!(running(&c, n), *b, "{n} was restarted");
    }

    // One file changes: only that service restarts.
    write(
        &tree.join("jobs/worker.yaml"),
        &yaml("--crash-after, '600'"),
    );
    let out = c.ok(&["apply", dir, "--timeout-s", "30"]);
    assert!(out.contains("~ worker (m1): args"), "{out}");
    assert!(out.contains("= 2 unchanged"), "{out}");
    let (generation, pid) = running(&c, "worker");
    assert_eq!(generation, before[2].0 + 1);
    assert_ne!(pid, before[2].1);
    assert_eq!(running(&c, "web"), before[0]);
    assert_eq!(running(&c, "api"), before[1]);

    // Only where the proxy routes it changes: the plan says so, and
    // nothing restarts.
    let api = tree.join("jobs/api.json");
    let mut routed: Value = serde_json::from_str(&std::fs::read_to_string(&api).unwrap()).unwrap();
    routed["proxyname"] = serde_json::json!("api.example");
    write(&api, &routed.to_string());
    let diff = c.ok(&["diff", dir]);
    assert!(
        diff.contains("~ api (m1): proxyname") && diff.contains("(routing only: restarts nothing)"),
        "{diff}"
    );
    let out = c.ok(&["apply", dir, "--timeout-s", "30"]);
    assert!(out.contains("(routing only: nothing restarted)"), "{out}");
    assert_eq!(running(&c, "api"), before[1]);

    // A file removed: listed, kept without --prune, deleted with it.
    std::fs::remove_file(tree.join("web.json")).unwrap();
    let out = c.ok(&["apply", dir, "--timeout-s", "30"]);
    assert!(
        out.contains("- web (would be pruned with --prune; kept)"),
        "{out}"
    );
    assert_eq!(running(&c, "web"), before[0]);
    let out = c.ok(&["apply", dir, "--prune", "--timeout-s", "30"]);
    assert!(out.contains("- web (pruned)"), "{out}");
    let names: Vec<String> = c
        .json(&["services", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["api", "worker"]);
    let audit = c.ok(&["audit"]);
    assert!(audit.contains("apply"), "{audit}");
    assert!(audit.contains(dir), "the audit names the source: {audit}");

    // A service deployed by hand, named by the tree: refused, untouched.
    c.apply("deploy", &testy("m1", "manual", &[]));
    let manual = running(&c, "manual");
    write(
        &tree.join("manual.json"),
        &testy("m1", "manual", &["--crash-after", "600"]).to_string(),
    );
    let err = c.fails(&["apply", dir, "--prune"]);
    assert!(
        err.contains("service \"manual\" exists and was deployed by hand"),
        "{err}"
    );
    assert_eq!(running(&c, "manual"), manual);
    std::fs::remove_file(tree.join("manual.json")).unwrap();

    // Two bad files: nothing applied, both named with their errors.
    write(
        &tree.join("bad.json"),
        r#"{"machine":"m1","name":"b1","imgae":"testy","type":"binary"}"#,
    );
    write(
        &tree.join("bad.yml"),
        "machine: m1\nname: b2\nimage: testy\ntype: binary\nproxyport: -1\n",
    );
    write(
        &tree.join("jobs/api.json"),
        &testy("m1", "api", &["--crash-after", "600"]).to_string(),
    );
    let err = c.fails(&["apply", dir, "--prune"]);
    assert!(err.contains("bad.json: rejected"), "{err}");
    assert!(err.contains("did you mean `image`?"), "{err}");
    assert!(err.contains("bad.yml: rejected"), "{err}");
    assert!(
        err.contains("line 5: spec \"b2\": field `proxyport`"),
        "{err}"
    );
    assert_eq!(running(&c, "api"), before[1], "api must not have changed");
    // Two files defining one name are refused naming both.
    std::fs::remove_file(tree.join("bad.json")).unwrap();
    std::fs::remove_file(tree.join("bad.yml")).unwrap();
    write(
        &tree.join("again.json"),
        &testy("m1", "api", &[]).to_string(),
    );
    let err = c.fails(&["apply", dir]);
    assert!(
        err.contains("service \"api\" is defined in two files"),
        "{err}"
    );
    assert!(
        err.contains("again.json") && err.contains("api.json"),
        "{err}"
    );

    // A YAML file deploys on its own too.
    let single = c.dir.path().join("one.yml");
    write(
        &single,
        &format!(
            "machine: m1\nname: solo\nimage: testy\ntype: binary\nproxyport: {}\n",
            free_port()
        ),
    );
    c.ok(&["deploy", single.to_str().unwrap(), "--timeout-s", "30"]);
    running(&c, "solo");
}
