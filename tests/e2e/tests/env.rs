//! Environment layers and secrets (issue 15 item 5), end to end: a real
//! container sees the four layers in order (its image's Env, the
//! cluster's, an env file's, the spec's), a secret reaches it, and the
//! secret's value shows nowhere else: not in `info`, `status`, `audit`,
//! `diff`, any `--json`, the daemons' logs or the master's database file.
//! Needs root and crun (the image layer); skips otherwise.

use std::path::Path;
use std::time::Duration;

use phoenix_e2e::oci;
use phoenix_e2e::{Cluster, free_port, git, testy, wait_for};
use serde_json::{Value, json};

/// Values no output may hold.
const DB_VALUE: &str = "s3cr3t-db-7f3a9c";
const DB_VALUE_2: &str = "r0tated-db-5b1e2d";
const API_VALUE: &str = "t0ken-api-8c4d6e";

fn set_secret(c: &Cluster, name: &str, value: &str) -> Value {
    let out = c.phoenix_stdin(&["secret", "set", name, "--json"], &format!("{value}\n"));
    assert!(
        out.status.success(),
        "secret set {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The service's environment, as it sees it.
fn env_of(c: &Cluster, name: &str, port: u16) -> String {
    c.http_service(name, port, "/env")
        .unwrap_or_else(|| panic!("GET /env of {name}"))
        .1
}

fn has_none(what: &str, text: &str) {
    for v in [DB_VALUE, DB_VALUE_2, API_VALUE] {
        assert!(!text.contains(v), "{what} holds a secret's value:\n{text}");
    }
}

fn file_has_none(path: &Path) {
    if let Ok(bytes) = std::fs::read(path) {
        for v in [DB_VALUE, DB_VALUE_2, API_VALUE] {
            assert!(
                !bytes.windows(v.len()).any(|w| w == v.as_bytes()),
                "{} holds a secret's value",
                path.display()
            );
        }
    }
}

fn generation_and_pid(c: &Cluster, name: &str) -> (u64, u64) {
    let s = c.status(name);
    (
        s["generation"].as_u64().unwrap(),
        s["pid"].as_u64().unwrap_or(0),
    )
}

#[test]
fn four_layers_in_order_and_a_secret_that_shows_nowhere_else() {
    if !phoenix_e2e::can_run_containers("env test") {
        return;
    }
    let c = Cluster::start(1);
    let image = c.dir.path().join("envimg.tar");
    oci::write_tar(
        &image,
        &[(
            "v1",
            oci::testy_layers(),
            oci::config(
                &["/testy"],
                &[
                    "L_IMAGE=image",
                    "L_CLUSTER=image",
                    "L_FILE=image",
                    "L_SPEC=image",
                ],
            ),
        )],
    );
    c.ok(&["push", image.to_str().unwrap(), "envimg.tar"]);

    // The cluster layer, and two secrets.
    c.ok(&[
        "env",
        "set",
        "L_CLUSTER=cluster",
        "L_FILE=cluster",
        "L_SPEC=cluster",
    ]);
    let created = set_secret(&c, "db", DB_VALUE);
    assert_eq!(created["created"], json!(true));
    set_secret(&c, "api", API_VALUE);
    // An empty value and a bad name are refused.
    let empty = c.phoenix_stdin(&["secret", "set", "empty"], "\n");
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("empty"));
    let bad = c.phoenix_stdin(&["secret", "set", "no/slash"], "x");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a secret name"));

    // A tree: the container with an env file beside its spec, and a
    // binary that names no secret.
    let tree = c.dir.path().join("tree");
    std::fs::create_dir_all(tree.join("conf")).unwrap();
    let box_port = free_port();
    let spec = json!({
        "machine": "m1", "name": "box", "image": "envimg:v1", "type": "docker",
        "proxyport": box_port, "healthcheck": "/health",
        "env_file": ["conf/app.env"],
        "env": ["L_SPEC=spec", "API_TOKEN=secret:api"],
    });
    std::fs::write(tree.join("box.json"), spec.to_string()).unwrap();
    std::fs::write(
        tree.join("conf/app.env"),
        "# the file layer\n\nexport L_FILE=file\nL_SPEC=file\nDB_PASSWORD=secret:db\n",
    )
    .unwrap();
    let other = testy("m1", "other", &[]);
    let other_port = other["proxyport"].as_u64().unwrap() as u16;
    std::fs::write(tree.join("other.json"), other.to_string()).unwrap();
    let tree_arg = tree.to_str().unwrap();
    let diff = c.ok(&["diff", tree_arg]);
    assert!(diff.contains("+ box (m1)"), "{diff}");
    c.ok(&["apply", tree_arg, "--timeout-s", "60"]);
    c.wait_status("box", "healthy", |s| s["health"] == "healthy");

    // The container sees each layer where it wins, and both secrets.
    let env = env_of(&c, "box", box_port);
    for line in [
        "L_IMAGE=image\n",
        "L_CLUSTER=cluster\n",
        "L_FILE=file\n",
        "L_SPEC=spec\n",
        &format!("DB_PASSWORD={DB_VALUE}\n"),
        &format!("API_TOKEN={API_VALUE}\n"),
        "PHOENIX_NAME=box\n",
    ] {
        assert!(env.contains(line), "{line:?} not in\n{env}");
    }
    // The binary gets the cluster layer, and no secret.
    let other_env = env_of(&c, "other", other_port);
    assert!(other_env.contains("L_CLUSTER=cluster\n"), "{other_env}");
    has_none("other's environment", &other_env);

    // `info --env` names each variable's layer; secrets by name.
    let layers = c.json(&["info", "box", "--env", "--json"]);
    let layer = |k: &str| {
        let v = layers["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["key"] == k)
            .unwrap_or_else(|| panic!("{k} not in {layers}"))
            .clone();
        (
            v["value"].as_str().unwrap().to_owned(),
            v["layer"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(layer("L_IMAGE"), ("image".into(), "image".into()));
    assert_eq!(layer("L_CLUSTER"), ("cluster".into(), "cluster".into()));
    assert_eq!(layer("L_FILE"), ("file".into(), "env_file".into()));
    assert_eq!(layer("L_SPEC"), ("spec".into(), "spec".into()));
    assert_eq!(
        layer("DB_PASSWORD"),
        ("secret:db".into(), "env_file".into())
    );
    assert_eq!(layer("API_TOKEN"), ("secret:api".into(), "spec".into()));
    let text = c.ok(&["info", "box", "--env"]);
    assert!(
        text.contains("secret:db") && text.contains("(env_file conf/app.env)"),
        "{text}"
    );

    // A new value of db restarts box, which uses it, and not other.
    let (box_gen, box_pid) = generation_and_pid(&c, "box");
    let (other_gen, other_pid) = generation_and_pid(&c, "other");
    let changed = set_secret(&c, "db", DB_VALUE_2);
    assert_eq!(changed["restarted"], json!(["box"]));
    wait_for(
        "box restarted with the new value",
        Duration::from_secs(30),
        || {
            let s = c.status("box");
            (s["generation"].as_u64() > Some(box_gen)
                && s["state"] == "running"
                && s["health"] == "healthy"
                && s["pid"].as_u64().is_some_and(|p| p != box_pid))
            .then_some(())
        },
    );
    let env = env_of(&c, "box", box_port);
    assert!(
        env.contains(&format!("DB_PASSWORD={DB_VALUE_2}\n")),
        "{env}\n{}\n{}",
        std::fs::read_to_string(c.minion_dir("m1").join("desired.json")).unwrap_or_default(),
        c.status("box")
    );
    assert_ne!(generation_and_pid(&c, "box").1, box_pid);
    assert_eq!(generation_and_pid(&c, "other"), (other_gen, other_pid));

    // A cluster variable box overrides restarts other only.
    let (box_gen, box_pid) = generation_and_pid(&c, "box");
    let set = c.json(&["env", "set", "L_SPEC=cluster2", "--json"]);
    assert_eq!(set["restarted"], json!(["other"]), "{set}");
    wait_for("other restarted", Duration::from_secs(30), || {
        env_of(&c, "other", other_port)
            .contains("L_SPEC=cluster2\n")
            .then_some(())
    });
    assert_eq!(generation_and_pid(&c, "box"), (box_gen, box_pid));

    // A spec naming a missing secret is refused, naming it; nothing changes.
    let mut missing = testy("m1", "lost", &[]);
    missing["env"] = json!(["X=secret:nope"]);
    let path = c.dir.path().join("lost.json");
    std::fs::write(&path, missing.to_string()).unwrap();
    let e = c.fails(&["deploy", path.to_str().unwrap()]);
    assert!(e.contains("no secret \"nope\""), "{e}");
    assert!(!c.ok(&["services"]).contains("lost"));
    // An env file's error names the file and the line.
    std::fs::write(tree.join("conf/app.env"), "L_FILE=file\nnot a line\n").unwrap();
    let e = c.fails(&["diff", tree_arg]);
    assert!(e.contains("conf/app.env:2: expected KEY=VALUE"), "{e}");
    std::fs::write(
        tree.join("conf/app.env"),
        "L_FILE=file2\nL_SPEC=file\nDB_PASSWORD=secret:api\n",
    )
    .unwrap();
    // The diff names the variables, secrets by name.
    let diff = c.ok(&["diff", tree_arg]);
    assert!(diff.contains("~ box (m1): env_file"), "{diff}");
    assert!(
        diff.contains("~DB_PASSWORD=secret:api (was secret:db)"),
        "{diff}"
    );
    assert!(diff.contains("~L_FILE=file2 (was file)"), "{diff}");
    has_none("diff", &diff);
    has_none("diff --json", &c.ok(&["diff", tree_arg, "--json"]));
    // A secret in use is not removed.
    let e = c.fails(&["secret", "rm", "db"]);
    assert!(e.contains("used by service box"), "{e}");

    // The value shows nowhere but in the service.
    for args in [
        &["info", "box"][..],
        &["info", "box", "--json"],
        &["info", "box", "--env", "--json"],
        &["status", "box", "--json"],
        &["status", "box"],
        &["services", "--json"],
        &["audit", "--json", "-n", "500"],
        &["audit", "-n", "500"],
        &["secret", "list", "--json"],
        &["env", "list", "--json"],
        &["logs", "box"],
    ] {
        has_none(&format!("phoenix {}", args.join(" ")), &c.ok(args));
    }
    let secrets = c.json(&["secret", "list", "--json"]);
    let db = secrets
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "db")
        .unwrap();
    assert_eq!(db["used_by"], json!(["box"]));
    let audit = c.ok(&["audit", "--json", "-n", "500"]);
    assert!(
        audit.contains("secret-change") && audit.contains("env-restart"),
        "{audit}"
    );
    has_none("master.log", &c.log("master"));
    has_none("m1.log", &c.log("m1"));
    for f in ["phoenix.db", "phoenix.db-wal"] {
        file_has_none(&c.master_dir().join(f));
    }
    // The key beside master.key, and the minion's copy: root's only.
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&c.master_dir().join("secrets.key")), 0o600);
    assert_eq!(mode(&c.minion_dir("m1").join("desired.json")), 0o600);
}

fn commit(dir: &Path) {
    git(dir, &["add", "-A"]);
    git(
        dir,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-q",
            "-m",
            "specs",
        ],
    );
}

#[test]
fn a_git_source_s_env_files_come_from_its_commit() {
    let c = Cluster::start(1);
    let repo = c.dir.path().join("repo");
    std::fs::create_dir_all(repo.join("specs/web")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    let web = testy("m1", "web", &[]);
    let port = web["proxyport"].as_u64().unwrap() as u16;
    let mut spec = web.clone();
    spec["env_file"] = json!(["../common.env", "web.env"]);
    spec["env"] = json!(["A=spec"]);
    std::fs::write(repo.join("specs/web/web.json"), spec.to_string()).unwrap();
    std::fs::write(
        repo.join("specs/common.env"),
        "A=common\nB=common\nC=common\n",
    )
    .unwrap();
    std::fs::write(repo.join("specs/web/web.env"), "B=web\nTOKEN=secret:tok\n").unwrap();
    commit(&repo);
    set_secret(&c, "tok", API_VALUE);
    let url = format!("file://{}#main", repo.display());
    c.ok(&[
        "apply",
        "--git",
        &url,
        "--path",
        "specs",
        "--source",
        "conf",
        "--timeout-s",
        "30",
    ]);
    c.wait_status("web", "running", |s| s["state"] == "running");
    let env = env_of(&c, "web", port);
    for line in [
        "A=spec\n",
        "B=web\n",
        "C=common\n",
        &format!("TOKEN={API_VALUE}\n"),
    ] {
        assert!(env.contains(line), "{line:?} not in\n{env}");
    }
    let layers = c.ok(&["info", "web", "--env"]);
    assert!(layers.contains("(env_file web.env)"), "{layers}");
    has_none("info --env", &layers);
    has_none("sources", &c.ok(&["sources", "--json"]));

    // An env file outside --path is not in the checkout: the commit is
    // refused, naming it, and the live one stays.
    spec["env_file"] = json!(["../../outside.env"]);
    std::fs::write(repo.join("specs/web/web.json"), spec.to_string()).unwrap();
    std::fs::write(repo.join("outside.env"), "X=1\n").unwrap();
    commit(&repo);
    let e = c.fails(&[
        "apply",
        "--git",
        &url,
        "--path",
        "specs",
        "--source",
        "conf",
        "--timeout-s",
        "30",
    ]);
    assert!(e.contains("outside.env"), "{e}");
    assert!(env_of(&c, "web", port).contains("B=web\n"));
    has_none("master.log", &c.log("master"));
    has_none("m1.log", &c.log("m1"));
}
