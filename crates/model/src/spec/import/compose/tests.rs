//! The compose importer against the files in tests/fixtures/compose (see
//! its README) and against small files for each field.

use std::path::PathBuf;

use super::*;
use crate::spec::{Duration, Spec, parse_specs};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/compose")
}

fn vars(name: &str) -> Option<String> {
    match name {
        "DEBUG" => Some("1".into()),
        "REGION" => Some("us-east".into()),
        _ => None,
    }
}

fn import_with(file: &str, text: &str) -> Result<Imported, ImportError> {
    let dir = fixtures();
    let read = move |p: &str| std::fs::read_to_string(dir.join(p)).map_err(|e| e.to_string());
    compose(&ComposeInput {
        file,
        text,
        machine: "m1",
        project: "fixtures",
        vars: &vars,
        read_file: &read,
    })
}

fn fixture(name: &str) -> (Imported, Vec<Spec>) {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    let imported = import_with(name, &text).unwrap_or_else(|e| panic!("{e}"));
    let specs = imported
        .check(name)
        .unwrap_or_else(|e| panic!("{e}\n{}", imported.to_yaml(&[])));
    // What `phoenix import` prints reads back as the same specs.
    let yaml = imported.to_yaml(&["header".into()]);
    assert_eq!(parse_specs("out.yaml", &yaml).unwrap(), specs, "{yaml}");
    (imported, specs)
}

fn small(text: &str) -> Imported {
    import_with("c.yml", text).unwrap_or_else(|e| panic!("{e}"))
}

fn problems(text: &str) -> String {
    import_with("c.yml", text).unwrap_err().to_string()
}

fn notes(i: &Imported) -> String {
    i.not_carried
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn warnings(i: &Imported) -> String {
    i.warnings
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn web_db_fixture() {
    let (i, specs) = fixture("web-db.yml");
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["backend", "db", "proxy"]);
    let (backend, db, proxy) = (&specs[0], &specs[1], &specs[2]);
    // build without image: the image compose would build.
    assert_eq!(backend.image, "fixtures-backend");
    assert_eq!(backend.link, ["db"]);
    assert_eq!(db.image, "postgres");
    assert_eq!(db.registry_file(), ("postgres.tar".into(), None));
    assert_eq!(
        db.env,
        [
            "POSTGRES_DB=example",
            "POSTGRES_PASSWORD_FILE=/run/secrets/db-password"
        ]
    );
    assert_eq!(db.proxyport, 5432);
    assert_eq!(db.duration, Duration::Daemon);
    assert_eq!(db.healthcheck, None);
    assert_eq!(
        (proxy.proxyport, proxy.link.as_slice()),
        (80, &["backend".to_owned()][..])
    );
    let n = notes(&i);
    for expected in [
        "line 9: service \"backend\": `secrets`: Phoenix has no file secrets",
        "line 11: service \"backend\": `depends_on`: the start order and the conditions (db: service_healthy)",
        "line 18: service \"db\": `user`: the image's user runs the service",
        "line 21: service \"db\": `volumes`: Phoenix has no volumes",
        "service \"db\": `healthcheck.test`: \"pg_isready\" is not an HTTP fetch",
        "line 30: service \"db\": `healthcheck`: interval, timeout, retries: the minion's --health-interval-ms",
        "line 42: service \"proxy\": `ports[0]`: publishing on the host (80) is not carried over",
        "`volumes`: Phoenix has no volumes",
        "`secrets`: Phoenix has no file secrets",
    ] {
        assert!(n.contains(expected), "{expected}\nnot in\n{n}");
    }
    assert!(
        warnings(&i).contains("service \"backend\": `build`: no `image`: runs fixtures-backend")
    );
    let push: Vec<&str> = i.push.iter().map(|p| p.how.as_str()).collect();
    assert_eq!(
        push,
        [
            "docker compose build backend && docker save fixtures-backend -o fixtures-backend.tar && phoenix push fixtures-backend.tar",
            "docker save postgres -o postgres.tar && phoenix push postgres.tar",
            "docker save nginx -o nginx.tar && phoenix push nginx.tar",
        ]
    );
}

#[test]
fn elk_fixture() {
    let (i, specs) = fixture("elk.yml");
    let es = &specs[0];
    assert_eq!(
        (es.name.as_str(), es.image.as_str()),
        ("elasticsearch", "elasticsearch:7.16.1")
    );
    assert_eq!(
        es.registry_file(),
        ("elasticsearch.tar".into(), Some("7.16.1".into()))
    );
    assert_eq!(es.env, ["ES_JAVA_OPTS=-Xms512m -Xmx512m"]);
    assert_eq!(es.proxyport, 9200);
    // curl of `localhost:9200/...`, no scheme: the port is proxyport's.
    assert_eq!(es.healthcheck.as_deref(), Some("/_cluster/health"));
    let logstash = &specs[1];
    assert_eq!(
        logstash.args,
        [
            "logstash",
            "-f",
            "/usr/share/logstash/pipeline/logstash-nginx.config"
        ]
    );
    assert_eq!(
        (logstash.proxyport, logstash.link.as_slice()),
        (5000, &["elasticsearch".to_owned()][..])
    );
    let n = notes(&i);
    for expected in [
        "service \"elasticsearch\": `environment.discovery.type`: \"discovery.type\": a Phoenix variable name",
        "service \"elasticsearch\": `container_name`: a service is reached by its name",
        "service \"elasticsearch\": `ports[1]`: port 9300 is reachable at the service's address, but only one port (the first, 9200)",
        "service \"logstash\": `ports[1]`: udp port 5000: reachable at the service's address, but not a proxy port",
        "service \"kibana\": `networks`: every service has its own address",
        "`networks`: every service has its own address",
    ] {
        assert!(n.contains(expected), "{expected}\nnot in\n{n}");
    }
}

#[test]
fn monitoring_fixture() {
    let (i, specs) = fixture("monitoring.yml");
    let (prom, grafana) = (&specs[0], &specs[1]);
    // A registry namespace is dropped: the file is named by the repository.
    assert_eq!(prom.image, "prometheus");
    assert_eq!(prom.args, ["--config.file=/etc/prometheus/prometheus.yml"]);
    assert_eq!(grafana.image, "grafana:10.2.0");
    assert_eq!(
        grafana.registry_file(),
        ("grafana.tar".into(), Some("10.2.0".into()))
    );
    assert_eq!(
        i.push[1].how,
        "docker save grafana/grafana:10.2.0 -o grafana.tar && phoenix push grafana.tar"
    );
    assert_eq!(i.push[1].references, ["grafana/grafana:10.2.0"]);
}

#[test]
fn features_fixture() {
    let (i, specs) = fixture("features.yml");
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web-front", "api", "db"]);
    let (web, api, db) = (&specs[0], &specs[1], &specs[2]);
    // Interpolation with a default, a merge key, a registry path dropped.
    assert_eq!(web.image, "web:2.1");
    assert_eq!(web.args, ["serve", "--port", "8080"]);
    assert_eq!(
        web.env,
        [
            "API_URL=http://api:9000",
            "LOG_LEVEL=info",
            "REGION=us-east"
        ]
    );
    assert_eq!(web.proxyport, 8080);
    assert_eq!(web.healthcheck.as_deref(), Some("/healthz?full=1"));
    assert_eq!(web.link, ["api"]);
    assert_eq!((web.memory, web.cpus), (Some(256 << 20), Some(0.5)));
    assert_eq!(web.duration, Duration::Daemon);
    // entrypoint then command, split as a shell would.
    assert_eq!(
        api.args,
        [
            "/app/api",
            "--listen",
            ":9000",
            "--db",
            "postgres://db/shop?sslmode=disable"
        ]
    );
    assert_eq!(api.image, "shop-api");
    assert_eq!(
        api.env,
        [
            "DB_POOL=8",
            "GREETING=hello there\n",
            "RAW=$not_interpolated",
            "FEATURES=a,b",
            "DEBUG=1"
        ]
    );
    assert_eq!(api.proxyport, 9000);
    assert_eq!((api.memory, api.cpus), (Some(1 << 30), Some(1.5)));
    assert_eq!(api.link, ["db"]);
    assert_eq!(db.duration, Duration::Oneshot);
    assert_eq!(db.image, "postgres:16-alpine");
    let n = notes(&i);
    for expected in [
        "service \"Web_Front\": `restart`: \"on-failure:3\": a daemon is restarted whatever its exit status",
        "service \"Web_Front\": `environment.PORT`: PORT is set by Phoenix to the service's proxyport",
        "service \"Web_Front\": `ports[0]`: publishing on the host (443)",
        "service \"Web_Front\": `healthcheck`: start_period: the minion's",
        "service \"Web_Front\": `links[0]`: the alias \"backend\": reach the service as \"api\"",
        "service \"Web_Front\": `deploy.replicas`: 3 replicas: Phoenix has no replica count yet",
        "service \"Web_Front\": `deploy.resources.reservations`: Phoenix has limits, not reservations",
        "service \"Web_Front\": `labels`: Phoenix has no labels",
        "service \"api\": `profiles`: every service of the file is imported",
        "service \"db\": `stop_grace_period`: the minion's --stop-timeout-ms applies",
    ] {
        assert!(n.contains(expected), "{expected}\nnot in\n{n}");
    }
    let w = warnings(&i);
    for expected in [
        "service \"Web_Front\": `services`: named \"web-front\"",
        "service \"api\": `image`: \"shop-api@sha256:",
        "service \"api\": `entrypoint`: carried as the start of `args`",
        "service \"api\": `env_file[0]`: the 4 variables of api.env are written into `env`",
        "service \"api\": `env_file[1]`: missing.env is optional and cannot be read",
        "service \"api\": `expose`: the first exposed port is proxyport",
    ] {
        assert!(w.contains(expected), "{expected}\nnot in\n{w}");
    }
    assert!(
        !w.contains("WEB_TAG"),
        "a default is not an unset variable: {w}"
    );
}

#[test]
fn ports_in_every_form() {
    let port = |p: &str| {
        let i = small(&format!(
            "services:\n  a:\n    image: x\n    ports:\n      - {p}\n"
        ));
        (i.specs[0].proxyport, notes(&i))
    };
    assert_eq!(port("80").0, Some(80));
    assert_eq!(port("\"8080:80\"").0, Some(80));
    assert_eq!(port("127.0.0.1:8080:80/tcp").0, Some(80));
    assert_eq!(port("\"[::1]:8080:80\"").0, Some(80));
    let (p, n) = port("\"3000-3005:4000-4005\"");
    assert_eq!(p, Some(4000));
    assert!(n.contains("a range: only its first port, 4000"), "{n}");
    let (p, n) = port("{target: 53, protocol: udp}");
    assert_eq!(p, None);
    assert!(n.contains("udp port 53"), "{n}");
    assert!(
        port("{target: 81, published: \"8081\"}")
            .1
            .contains("publishing on the host (8081)")
    );
    let e =
        problems("services:\n  a:\n    image: x\n    ports:\n      - \"80:http\"\n      - 70000\n");
    assert!(
        e.contains("line 5: service \"a\": field `ports[0]`: \"80:http\": \"http\" is not a port"),
        "{e}"
    );
    assert!(
        e.contains("line 6: service \"a\": field `ports[1]`: \"70000\" is not a port"),
        "{e}"
    );
}

#[test]
fn healthchecks_carried_and_not() {
    let check = |test: &str, ports: &str| {
        let i = small(&format!(
            "services:\n  a:\n    image: x\n{ports}    healthcheck:\n      test: {test}\n"
        ));
        (
            i.specs[0].healthcheck.clone(),
            i.specs[0].proxyport,
            notes(&i),
            warnings(&i),
        )
    };
    let p80 = "    ports: [\"80\"]\n";
    assert_eq!(
        check(
            "[\"CMD\", \"curl\", \"-f\", \"http://localhost/health\"]",
            p80
        )
        .0
        .as_deref(),
        Some("/health")
    );
    assert_eq!(
        check("curl -fsS http://127.0.0.1:80", p80).0.as_deref(),
        Some("/")
    );
    assert_eq!(
        check(
            "[\"CMD-SHELL\", \"wget -qO- http://localhost/up || exit 1\"]",
            p80
        )
        .0
        .as_deref(),
        Some("/up")
    );
    // No port of its own: the check's port becomes proxyport.
    let (h, p, _, w) = check(
        "[\"CMD\", \"/usr/bin/curl\", \"http://localhost:3000/ok\"]",
        "",
    );
    assert_eq!((h.as_deref(), p), (Some("/ok"), Some(3000)));
    assert!(
        w.contains("proxyport is 3000, the port the healthcheck fetches"),
        "{w}"
    );
    // Not carried: another port, another host, https, not a fetch.
    let (h, _, n, _) = check("curl http://localhost:81/h", p80);
    assert!(
        h.is_none() && n.contains("is on port 81, but Phoenix checks proxyport, 80"),
        "{n}"
    );
    let (h, _, n, _) = check("curl http://db/h", p80);
    assert!(h.is_none() && n.contains("checks another host, db"), "{n}");
    let (h, _, n, _) = check("curl https://localhost/h", p80);
    assert!(h.is_none() && n.contains("over plain HTTP"), "{n}");
    let (h, _, n, _) = check("[\"CMD\", \"redis-cli\", \"ping\"]", p80);
    assert!(
        h.is_none() && n.contains("\"redis-cli ping\" is not an HTTP fetch"),
        "{n}"
    );
    // Disabled: nothing to carry, nothing to say.
    let (h, _, n, _) = check("[\"NONE\"]", p80);
    assert!(h.is_none() && n.is_empty(), "{n}");
}

#[test]
fn commands_environment_and_limits() {
    let i = small(
        "services:\n  a:\n    image: x\n    command: sh -c 'echo \"$$HOME\" && sleep 1'\n    \
         environment:\n      N: 3\n      B: true\n      EMPTY: \"\"\n      UNSET:\n    mem_limit: 512m\n    cpus: \"0.25\"\n",
    );
    let s = &i.specs[0];
    assert_eq!(s.args, ["sh", "-c", "echo \"$HOME\" && sleep 1"]);
    assert_eq!(s.env, ["N=3", "B=true", "EMPTY="]);
    assert!(notes(&i).contains("`environment.UNSET`: UNSET has no value here and is not set now"));
    assert_eq!(s.memory, Some(Size::Text("512M".into())));
    assert_eq!(s.cpus, Some(0.25));
    assert_eq!(compose_size("1.5g"), Some(3 << 29));
    assert_eq!(compose_size("100000"), Some(100_000));
    assert_eq!(compose_size("64MiB"), Some(64 << 20));
    assert_eq!(compose_size("lots"), None);
    assert_eq!(size_text(1536), Size::Bytes(1536));
    assert_eq!(size_text(3 << 10), Size::Text("3K".into()));
    let e = problems(
        "services:\n  a:\n    image: x\n    command: echo 'unclosed\n    mem_limit: big\n    restart: sometimes\n",
    );
    for expected in [
        "line 4: service \"a\": field `command`: \"echo 'unclosed\" cannot be split into words",
        "line 5: service \"a\": field `mem_limit`: expected a size like 512m or 1g, got a string \"big\"",
        "line 6: service \"a\": field `restart`: \"sometimes\" is not a restart policy",
    ] {
        assert!(e.contains(expected), "{expected}\nnot in\n{e}");
    }
}

#[test]
fn links_must_name_services_of_the_file_and_names_must_stay_apart() {
    let e = problems(
        "services:\n  a:\n    image: x\n    depends_on: [b]\n  My.App:\n    image: x\n  my_app:\n    image: x\n",
    );
    assert!(
        e.contains(
            "line 4: service \"a\": field `depends_on`: \"b\" is not a service of this file"
        ),
        "{e}"
    );
    assert!(e.contains("service \"my_app\": field `services`: services \"My.App\" and \"my_app\" both become \"my-app\""), "{e}");
}

#[test]
fn the_file_as_a_whole() {
    assert!(problems("").contains("no YAML document"));
    assert!(problems("- a\n").contains("expected a compose file (a mapping with `services`)"));
    assert!(problems("version: '3'\n").contains("the file has no `services`"));
    assert!(problems("services: {}\n").contains("field `services`: the file defines no services"));
    assert!(problems("services: [a]\n").contains("expected a mapping of services, got a list"));
    assert!(
        problems("services:\n  a:\n    build: .\n    image: ${TAG:?set TAG}\n")
            .contains("line 4: field `services.a.image`: variable TAG is required: set TAG")
    );
    assert!(
        problems("services:\n  a: {}\n")
            .contains("service \"a\": field `image`: a service needs `image` (or `build`)")
    );
    let i =
        small("version: '3.8'\nservices:\n  a:\n    image: x:${NOPE}1\n    x-note: hi\nx-top: 1\n");
    assert_eq!(i.specs[0].image.as_deref(), Some("x:1"));
    let w = warnings(&i);
    assert!(w.contains("line 1: `version`: ignored"), "{w}");
    assert!(
        w.contains("line 4: `services.a.image`: variable NOPE is not set"),
        "{w}"
    );
    assert!(notes(&i).is_empty(), "{}", notes(&i));
}

#[test]
fn env_files_parse_like_compose() {
    let env = parse_env_file(
        "# c\nA=1\nexport B = two \nC='lit ${A}'\nD=\"q ${E:-e}\\tx\"\nDEBUG\nNOPE\nF=x # y\n",
        &vars,
    )
    .unwrap();
    let want = [
        ("A", "1"),
        ("B", "two"),
        ("C", "lit ${A}"),
        ("D", "q e\tx"),
        ("DEBUG", "1"),
        ("F", "x"),
    ];
    let got: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(got, want);
    let e = parse_env_file("1A=x\nB='open\nC=${X:?needed}\n", &vars).unwrap_err();
    assert_eq!(e.len(), 3, "{e:?}");
    assert_eq!(e[0].0, 1);
    assert!(e[2].1.contains("variable X is required"), "{e:?}");
    // A line that is no entry at all is not repeated.
    let e = parse_env_file("root:$6$salt$hash:20228:0\n", &vars).unwrap_err();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(!e[0].1.contains("hash"), "{e:?}");
    assert!(e[0].1.contains("expected KEY=VALUE"), "{e:?}");
}

#[test]
fn what_the_spec_checks_refuse_points_at_the_service() {
    let i = small("services:\n  a:\n    image: x\n  b:\n    image: x\n    mem_limit: 1m\n");
    let e = i.check("c.yml").unwrap_err().to_string();
    assert!(
        e.starts_with("c.yml (imported): rejected, nothing was changed (1 error):\n  line 4: spec #2 (\"b\"): field `memory`: expected a size of at least 4M"),
        "{e}"
    );
}

#[test]
fn an_unreadable_env_file_is_a_problem_naming_it() {
    let e = problems("services:\n  a:\n    image: x\n    env_file: nope.env\n");
    assert!(
        e.contains("line 4: service \"a\": field `env_file`: cannot read nope.env:"),
        "{e}"
    );
}

#[test]
fn image_references() {
    let r = |s: &str| image_ref(s);
    assert_eq!(
        r("nginx:1.25").unwrap(),
        ("nginx:1.25".into(), "nginx.tar".into(), false)
    );
    assert_eq!(
        r("localhost:5000/team/app:v1").unwrap(),
        ("app:v1".into(), "app.tar".into(), false)
    );
    assert_eq!(
        r("redis").unwrap(),
        ("redis".into(), "redis.tar".into(), false)
    );
    assert!(r("app@sha256:00").unwrap().2);
    // Nor in a service's name, which `docker compose build NAME` holds.
    let e = problems("services:\n  \"x;id\":\n    build: .\n  \"a b\":\n    image: x\n");
    assert!(
        e.contains("line 2: service \"x;id\": field `services`: a compose service's name is"),
        "{e}"
    );
    assert!(e.contains("service \"a b\""), "{e}");
    // Nothing a shell would run when the `docker save` line is pasted.
    for hostile in [
        "x$(touch /tmp/p):v1",
        "y;id",
        "w`id`",
        "a b",
        "a|b",
        "a&b",
        "a'b",
    ] {
        let e = r(hostile).unwrap_err();
        assert!(e.contains("is not an image reference"), "{e}");
    }
    assert!(r("app:").is_err());
    assert!(r("/").is_err());
}
