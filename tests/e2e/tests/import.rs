//! End to end: `phoenix import compose` (issue #15). A compose file of two
//! services, one depending on the other, is printed for review (YAML that
//! `phoenix diff` reads, and `--json`), then applied with `--apply`: both
//! run as containers of a busybox-and-testy image, the link is there,
//! applying again restarts nothing, and `--prune` removes a service the
//! file dropped. A Procfile goes the same way. Needs root and crun; skips
//! otherwise.

use std::process::Output;

use phoenix_e2e::oci;
use phoenix_e2e::{Cluster, free_port};
use serde_json::Value;

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(c: &Cluster, args: &[&str]) -> (String, String) {
    let out = c.phoenix(args);
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "phoenix {args:?} failed:\n{stdout}\n{stderr}\nmaster log:\n{}",
        c.log("master")
    );
    (stdout, stderr)
}

fn running(c: &Cluster, name: &str) -> (u64, u64) {
    let s = c.wait_status(name, "running and healthy", |s| {
        s["state"] == "running" && s["pid"].as_u64().is_some() && s["health"] != "unhealthy"
    });
    (
        s["generation"].as_u64().unwrap(),
        s["pid"].as_u64().unwrap(),
    )
}

/// The test image: testy as the entrypoint, busybox as /bin/sh, tag v1.
fn push_app(c: &Cluster) {
    let path = c.dir.path().join("app.tar");
    oci::write_tar(
        &path,
        &[(
            "v1",
            oci::testy_layers(),
            oci::config(&["/testy"], &["FROM_IMAGE=v1"]),
        )],
    );
    c.ok(&["push", path.to_str().unwrap(), "app.tar"]);
}

#[test]
fn a_compose_file_is_reviewed_then_applied_and_its_services_run() {
    if !phoenix_e2e::can_run_containers("import test") {
        return;
    }
    let c = Cluster::start(1);
    push_app(&c);
    let (api_port, web_port) = (free_port(), free_port());
    let dir = c.dir.path().join("shop");
    std::fs::create_dir_all(&dir).unwrap();
    let compose = dir.join("compose.yaml");
    let write = |with_web: bool| {
        let web = format!(
            "  web:\n    image: registry.example.com/team/app:${{TAG:-v1}}\n    \
             ports:\n      - \"8080:{web_port}\"\n    depends_on:\n      - api\n    \
             environment:\n      GREETING: ${{GREETING}}\n"
        );
        std::fs::write(
            &compose,
            format!(
                "services:\n  api:\n    image: app:v1\n    expose: [\"{api_port}\"]\n    \
                 healthcheck:\n      test: [\"CMD\", \"wget\", \"-q\", \"http://localhost:{api_port}/health\"]\n      \
                 interval: 5s\n    volumes:\n      - data:/data\n{}volumes:\n  data:\n",
                if with_web { web } else { String::new() }
            ),
        )
        .unwrap();
    };
    write(true);
    // `.env` beside the file fills ${GREETING}.
    std::fs::write(dir.join(".env"), "GREETING=hello from .env\n").unwrap();
    let file = compose.to_str().unwrap();

    // For review: YAML on stdout, what was not carried over on stderr.
    let (yaml, stderr) = ok(&c, &["import", "compose", file, "--machine", "m1"]);
    assert!(yaml.contains("- machine: m1\n  name: api\n"), "{yaml}");
    assert!(
        yaml.contains("    - \"GREETING=hello from .env\"\n"),
        "{yaml}"
    );
    for expected in [
        "2 services imported",
        "docker save app:v1 registry.example.com/team/app:v1 -o app.tar && phoenix push app.tar",
        "service \"api\": `volumes`: Phoenix has no volumes",
        "service \"api\": `healthcheck`: interval: the minion's --health-interval-ms",
        "service \"web\": `ports[0]`: publishing on the host (8080) is not carried over",
        "`volumes`: Phoenix has no volumes",
    ] {
        assert!(stderr.contains(expected), "{expected}\nnot in\n{stderr}");
    }
    // The YAML is a spec file `phoenix diff` and `apply` read.
    let review = c.dir.path().join("review");
    std::fs::create_dir_all(&review).unwrap();
    std::fs::write(review.join("shop.yaml"), &yaml).unwrap();
    let (diff, _) = ok(&c, &["diff", review.to_str().unwrap()]);
    assert!(
        diff.contains("+ api (m1)") && diff.contains("+ web (m1)"),
        "{diff}"
    );

    // --json: the specs and the lists.
    let (json, _) = ok(
        &c,
        &["import", "compose", file, "--machine", "m1", "--json"],
    );
    let report: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["specs"][1]["link"], serde_json::json!(["api"]));
    assert_eq!(report["specs"][1]["proxyport"], web_port);
    assert_eq!(report["specs"][0]["healthcheck"], "/health");
    assert_eq!(report["push"][0]["file"], "app.tar");
    let not_carried = report["not_carried_over"].as_array().unwrap();
    assert!(
        not_carried
            .iter()
            .any(|n| n["service"] == "api" && n["field"] == "volumes"),
        "{report}"
    );

    // --apply: both run, from the source compose:PATH; the one machine is
    // found without --machine.
    let (out, _) = ok(
        &c,
        &["import", "compose", file, "--apply", "--timeout-s", "60"],
    );
    assert!(out.contains("+ api (m1)"), "{out}");
    let api = running(&c, "api");
    let web = running(&c, "web");
    let status = c.status("api");
    assert_eq!(status["health"], "healthy", "{status}");
    let info = c.json(&["info", "web", "--json"]);
    assert_eq!(info["link"], serde_json::json!(["api"]), "{info}");
    assert_eq!(info["image"], "app:v1", "{info}");
    assert!(c.status("web").get("dangling_links").is_none());
    let (_, env) = c.http_service("web", web_port, "/env").unwrap();
    assert!(env.contains("GREETING=hello from .env\n"), "{env}");
    assert!(env.contains(&format!("PORT={web_port}\n")), "{env}");

    // Again: nothing changes, nothing restarts.
    let (again, _) = ok(
        &c,
        &["import", "compose", file, "--apply", "--timeout-s", "60"],
    );
    assert!(again.contains("= 2 unchanged"), "{again}");
    assert_eq!(running(&c, "api"), api);
    assert_eq!(running(&c, "web"), web);

    // Another source may not take the services over.
    let out = c.phoenix(&["apply", review.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("belongs to source \"compose:"), "{stderr}");

    // The file drops web: kept without --prune, deleted with it.
    write(false);
    let (kept, _) = ok(
        &c,
        &["import", "compose", file, "--apply", "--timeout-s", "60"],
    );
    assert!(
        kept.contains("- web (would be pruned with --prune; kept)"),
        "{kept}"
    );
    let (pruned, _) = ok(
        &c,
        &[
            "import",
            "compose",
            file,
            "--apply",
            "--prune",
            "--timeout-s",
            "60",
        ],
    );
    assert!(pruned.contains("- web (pruned)"), "{pruned}");
    let names: Vec<String> = c
        .json(&["services", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["api"]);
    assert_eq!(running(&c, "api"), api);
}

#[test]
fn a_procfile_is_applied_and_bad_input_is_refused_naming_it() {
    if !phoenix_e2e::can_run_containers("import test") {
        return;
    }
    let c = Cluster::start(1);
    // No ENTRYPOINT, as an image for a Procfile has: the command replaces CMD.
    let path = c.dir.path().join("proc.tar");
    oci::write_tar(
        &path,
        &[(
            "v1",
            oci::testy_layers(),
            serde_json::json!({"Cmd": ["/testy"], "Env": ["FROM_IMAGE=v1"]}),
        )],
    );
    c.ok(&["push", path.to_str().unwrap(), "proc.tar"]);
    let port = free_port();
    let procfile = c.dir.path().join("Procfile");
    // Both through busybox's sh: web on $PORT, which Phoenix sets to its
    // proxyport, the worker on any free port.
    std::fs::write(
        &procfile,
        "# the app\nweb: exec /testy --port $PORT\nworker: exec /testy --port 0\n",
    )
    .unwrap();
    let file = procfile.to_str().unwrap();
    let port_arg = port.to_string();
    let (yaml, stderr) = ok(
        &c,
        &[
            "import", "procfile", file, "--image", "proc:v1", "--port", &port_arg,
        ],
    );
    assert!(yaml.contains(&format!("proxyport: {port}")), "{yaml}");
    assert!(stderr.contains("2 services imported"), "{stderr}");
    let (out, _) = ok(
        &c,
        &[
            "import",
            "procfile",
            file,
            "--image",
            "proc:v1",
            "--port",
            &port_arg,
            "--apply",
            "--timeout-s",
            "60",
        ],
    );
    assert!(out.contains("+ worker (m1)"), "{out}");
    running(&c, "web");
    running(&c, "worker");
    let (_, hello) = c.http_service("web", port, "/").unwrap();
    assert!(hello.contains("name=web"), "{hello}");

    // A bad line: exit 3, the file and line named, nothing applied.
    std::fs::write(&procfile, "web: x\nnot a process line\n").unwrap();
    let out = c.phoenix(&["import", "procfile", file, "--image", "proc:v1", "--apply"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("{file}: cannot be imported (1 problem):"))
            && stderr.contains("line 2: \"not a process line\" is not `TYPE: COMMAND`"),
        "{stderr}"
    );
    // A compose file with an unset required variable: named with its line.
    let compose = c.dir.path().join("bad.yml");
    std::fs::write(
        &compose,
        "services:\n  a:\n    image: app:${TAG:?set TAG to the release}\n",
    )
    .unwrap();
    let out = c.phoenix(&["import", "compose", compose.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(
            "line 3: field `services.a.image`: variable TAG is required: set TAG to the release"
        ),
        "{stderr}"
    );
}
