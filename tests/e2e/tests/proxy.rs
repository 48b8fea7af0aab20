//! The master's proxy in front of real services on two minions: routing by
//! host and path, spreading, health, basic auth, and `phoenix routes`.
//! The client is a test thread in a host of its own ("client"), speaking
//! plain HTTP to the master's public address (no certificate is issued
//! here: the ACME directory is unreachable, so every host is served over
//! HTTP).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use phoenix_e2e::netns::Net;
use phoenix_e2e::{Cluster, require_netns, wait_for};
use serde_json::{Value, json};

/// One HTTP/1.1 GET with `host`; (status, headers, body).
fn request(
    to: SocketAddr,
    host: &str,
    path: &str,
    auth: Option<&str>,
) -> Option<(u16, String, String)> {
    request_with(to, "GET", host, path, auth)
}

/// One HTTP/1.1 request (a POST has an empty body); (status, headers,
/// body).
fn request_with(
    to: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    auth: Option<&str>,
) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = auth
        .map(|a| format!("Authorization: Basic {a}\r\n"))
        .unwrap_or_default();
    let length = if method == "POST" {
        "Content-Length: 0\r\n"
    } else {
        ""
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}{length}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, head.to_owned(), body.to_owned()))
}

fn testy(machine: &str, name: &str, extra: Value) -> Value {
    let mut s = json!({
        "machine": machine, "name": name, "image": "testy", "type": "binary",
        "proxyport": 8000, "healthcheck": "/health",
    });
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

fn running(s: &Value) -> bool {
    s["state"] == "running" && s["health"] == "healthy"
}

/// User `ann`, password `secret`: bcrypt (cost 5), made once with Python's
/// `bcrypt.hashpw`, as `htpasswd -nbB` would.
const ANN_SECRET: &str = "ann:$2b$05$HfvgBVLT/DV0UtaWDfXyy.w.SMCf60miFSlNfsJW2cmks4zQ6F.HC";
/// User `bob`, password `open sesame`, from `htpasswd -nbB -C 5`.
const BOB_SESAME: &str = "bob:$2y$05$VI4XYWF09ZHhQFMvKbRgs.Obmn4SLqfMO2LcpUDB86Kw5Hpp907zC";

#[test]
fn routes_spread_follow_health_and_ask_for_credentials() {
    require_netns!();
    let mut c = Cluster::start_on(Net::new(&["master", "m1", "m2", "client"]), 2);
    c.master_flags.extend([
        "--acme-directory".into(),
        "https://127.0.0.1:1/directory".into(),
        "--proxy-response-timeout-ms".into(),
        "1000".into(),
    ]);
    c.kill_master();
    c.start_master();
    c.wait_reachable("m1");
    c.wait_reachable("m2");
    let site = json!({"proxyname": "shop.example"});
    c.apply(
        "deploy",
        &json!([
            testy("m1", "web1", site.clone()),
            testy("m2", "web2", site.clone()),
            testy(
                "m1",
                "api",
                json!({"proxyname": "shop.example", "proxypath": "/api"})
            ),
            testy(
                "m2",
                "admin",
                json!({"proxyname": "admin.example", "proxyauth": [ANN_SECRET]})
            ),
        ]),
    );
    for n in ["web1", "web2", "api", "admin"] {
        c.wait_status(n, "running and healthy", running);
    }
    let net = c.net.as_ref().unwrap();
    let master: SocketAddr = (net.host("master").ip, 80).into();
    let get = |host: &str, path: &str, auth: Option<&str>| {
        c.net
            .as_ref()
            .unwrap()
            .within("client", || request(master, host, path, auth))
    };

    // Spread over the two instances, by host.
    let served = wait_for(
        "the proxy to serve shop.example",
        Duration::from_secs(10),
        || get("shop.example", "/", None).filter(|r| r.0 == 200),
    );
    assert!(served.2.starts_with("testy name=web"), "{served:?}");
    let mut by: HashMap<String, u32> = HashMap::new();
    for _ in 0..40 {
        let (code, _, body) = get("shop.example", "/", None).expect("an answer");
        assert_eq!(code, 200, "{body}");
        let name = body.split_whitespace().nth(1).unwrap_or("").to_owned();
        *by.entry(name).or_default() += 1;
    }
    assert_eq!(by.len(), 2, "both instances serve: {by:?}");

    // The path prefix goes to its own service, stripped.
    let (code, _, body) = get("shop.example", "/api/", None).unwrap();
    assert_eq!(
        (code, body.starts_with("testy name=api")),
        (200, true),
        "{body}"
    );
    let (code, _, body) = get("shop.example", "/api/health", None).unwrap();
    assert_eq!((code, body.as_str()), (200, "ok"));
    // The proxy tells the service who asked, and how.
    let (_, _, env) = get("shop.example", "/api/env", None).unwrap();
    assert!(env.contains("PHOENIX_NAME=api"), "{env}");

    // An instance slower than --proxy-response-timeout-ms: a 504.
    let (code, _, body) = get("shop.example", "/sleep?ms=3000", None).unwrap();
    assert_eq!(code, 504, "{body}");

    // An unknown host is a clear 404.
    let (code, _, body) = get("nowhere.example", "/", None).unwrap();
    assert_eq!(code, 404, "{body}");

    // Basic auth.
    let (code, head, _) = get("admin.example", "/", None).unwrap();
    assert_eq!(code, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic"),
        "{head}"
    );
    // "ann:wrong" and "ann:secret" in base64.
    assert_eq!(
        get("admin.example", "/", Some("YW5uOndyb25n")).unwrap().0,
        401
    );
    assert_eq!(
        get("admin.example", "/", Some("YW5uOnNlY3JldA=="))
            .unwrap()
            .0,
        200
    );

    // The hash stays on the master: not in the audit log, not on the
    // minion that runs the service.
    let hash = ANN_SECRET.split_once(':').unwrap().1;
    let audit = c.json(&["audit", "--json", "-n", "100"]).to_string();
    assert!(audit.contains("ann:bcrypt:"), "{audit}");
    assert!(!audit.contains(hash), "{audit}");
    let desired = std::fs::read_to_string(c.minion_dir("m2").join("desired.json"))
        .expect("m2's desired.json");
    assert!(desired.contains("\"name\":\"admin\""), "{desired}");
    assert!(!desired.contains(hash), "{desired}");

    // A change of routing alone (here the path and the credentials)
    // restarts nothing: the same process serves under the new route.
    let pid = c.status("admin")["pid"].as_i64().expect("admin's pid");
    let out = c.apply(
        "update",
        &json!([testy(
            "m2",
            "admin",
            json!({"proxyname": "admin.example", "proxypath": "/admin", "proxyauth": [BOB_SESAME]})
        )]),
    );
    assert!(out.contains("nothing restarted"), "{out}");
    let bob = Some("Ym9iOm9wZW4gc2VzYW1l");
    let moved = wait_for(
        "the route to move to /admin, for bob",
        Duration::from_secs(5),
        || get("admin.example", "/admin/health", bob).filter(|r| r.0 == 200),
    );
    assert_eq!(moved.2, "ok");
    assert_eq!(get("admin.example", "/", bob).unwrap().0, 404);
    let ann = Some("YW5uOnNlY3JldA==");
    assert_eq!(get("admin.example", "/admin/health", ann).unwrap().0, 401);
    let admin = c.status("admin");
    assert_eq!(admin["pid"].as_i64(), Some(pid), "{admin}");
    assert_eq!(admin["generation"].as_u64(), Some(1), "{admin}");

    // An instance that turns unhealthy is taken out when its minion says
    // so, restarted, and put back once healthy again: through all of it,
    // no request fails.
    c.http_service("web2", 8000, "/unhealthy")
        .expect("web2 answers");
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let mut answered = 0;
    while std::time::Instant::now() < until {
        let (code, _, body) = get("shop.example", "/", None).expect("an answer");
        assert_eq!(code, 200, "request {answered} failed: {body}");
        answered += 1;
    }
    let web2 = c.status("web2");
    assert!(
        web2["restarts"].as_u64() >= Some(1),
        "web2 was restarted: {web2}"
    );

    // An instance killed: its minion restarts it; meanwhile only a request
    // in flight at the kill may fail (a connect that fails is retried on
    // the other instance).
    let pid = c.status("web1")["pid"].as_i64().expect("web1's pid");
    // SAFETY: kill(2) on the pid of a service this test deployed.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let until = std::time::Instant::now() + Duration::from_secs(2);
    let mut failed = 0;
    while std::time::Instant::now() < until {
        if get("shop.example", "/", None).is_none_or(|r| r.0 != 200) {
            failed += 1;
        }
    }
    assert!(failed <= 1, "{failed} requests failed after a kill");

    // `phoenix routes` shows hosts, paths, instances and their health,
    // and why there is no certificate.
    let routes = c.json(&["routes", "--json"]);
    let shop = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == "shop.example" && r["path"] == "/")
        .unwrap_or_else(|| panic!("{routes}"));
    assert_eq!(shop["instances"].as_array().unwrap().len(), 2, "{shop}");
    let text = c.ok(&["routes"]);
    assert!(
        text.contains("shop.example/api") || text.contains("shop.example /api"),
        "{text}"
    );
}

/// Requests at `shop.example` through the proxy from the client host until
/// `stop`, each on a new connection, from `threads` threads doing `GET
/// /env` and one doing `POST /sleep?ms=200` (a request in flight for a
/// while, which the proxy may not send twice); returns every request's
/// outcome: Ok(body) or Err(what went wrong).
fn load(
    ns: String,
    master: SocketAddr,
    threads: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Result<String, String>>> {
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
        // SAFETY: setns(2) on a namespace file we hold open; it moves this
        // thread (and the threads it spawns) only.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..=threads)
                .map(|i| {
                    let stop = stop.clone();
                    let (method, path) = match i {
                        0 => ("POST", "/sleep?ms=200"),
                        _ => ("GET", "/env"),
                    };
                    s.spawn(move || {
                        let mut out = Vec::new();
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let got = request_with(master, method, "shop.example", path, None);
                            out.push(match got {
                                Some((200, _, body)) => Ok(body),
                                Some((code, _, body)) => Err(format!("{code}: {body}")),
                                None => Err("no answer".into()),
                            });
                        }
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("load thread"))
                .collect()
        })
    })
}

#[test]
fn updates_and_a_del_under_load_fail_no_request_and_a_broken_version_switches_nothing() {
    require_netns!();
    let mut c = Cluster::start_on(Net::new(&["master", "m1", "m2", "client"]), 2);
    c.master_flags.extend([
        "--acme-directory".into(),
        "https://127.0.0.1:1/directory".into(),
    ]);
    c.kill_master();
    c.start_master();
    c.wait_reachable("m1");
    c.wait_reachable("m2");
    let site = |version: &str| {
        testy(
            "m1",
            "web",
            json!({"proxyname": "shop.example", "env": [format!("VERSION={version}")]}),
        )
    };
    c.apply(
        "deploy",
        &json!([site("1"), testy("m2", "peer", json!({"link": ["web"]}))]),
    );
    c.wait_status("web", "running and healthy", running);
    c.wait_status("peer", "running and healthy", running);
    let stable = c.service_ip("web");
    let net = c.net.as_ref().unwrap();
    let master: SocketAddr = (net.host("master").ip, 80).into();
    wait_for("the proxy to serve web", Duration::from_secs(10), || {
        net.within("client", || request(master, "shop.example", "/env", None))
            .filter(|r| r.0 == 200)
    });

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = load(net.host("client").ns.clone(), master, 3, stop.clone());
    std::thread::sleep(Duration::from_millis(300));

    // The update returns once the new version took over.
    let out = c.apply("update", &json!([site("2")]));
    assert!(out.contains("beside"), "{out}");
    let web = c.status("web");
    assert_eq!(
        (web["generation"].as_u64(), web["instance"].as_str()),
        (Some(2), Some("web.2")),
        "{web}"
    );
    // The stable address is the new version's now, for other services.
    let q = format!("/get?to=[{stable}]:8000&path=/env");
    let (code, body) = c.http_service("peer", 8000, &q).expect("peer answers");
    assert!(code == 200 && body.contains("VERSION=2"), "{code} {body}");
    let routes = c.json(&["routes", "--json"]);
    let instances = &routes["routes"][0]["instances"];
    assert_eq!(instances.as_array().map(Vec::len), Some(1), "{routes}");
    assert_eq!(instances[0]["service"], "web.2", "{routes}");

    // A version that cannot start: the update fails, nothing switches,
    // and the running version never stops serving.
    let broken = testy(
        "m1",
        "web",
        json!({"proxyname": "shop.example", "args": ["--no-such-option"]}),
    );
    let path = c.dir.path().join("broken.json");
    std::fs::write(&path, json!([broken]).to_string()).unwrap();
    let out = c.phoenix(&["update", path.to_str().unwrap(), "--timeout", "30"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains("nothing was switched"), "{stderr}");
    // Why is the new version's log, which went with it, not the old
    // one's (which only says it served); and it is not restarted.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("--no-such-option"), "{stdout}");
    assert!(!stdout.contains("restarting in"), "{stdout}");
    let web = c.status("web");
    assert_eq!(web["instance"], "web.2", "{web}");
    assert_eq!(web["state"], "running", "{web}");

    // A second instance on m2, then deleted: it drains first, so the
    // requests in flight on it finish.
    c.apply(
        "deploy",
        &json!([testy("m2", "twin", json!({"proxyname": "shop.example"}))]),
    );
    wait_for("twin in the rotation", Duration::from_secs(10), || {
        let routes = c.json(&["routes", "--json"]);
        let up = routes["routes"][0]["instances"]
            .as_array()
            .is_some_and(|i| i.iter().filter(|i| i["up"] == true).count() == 2);
        up.then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    c.ok(&["del", "twin"]);
    std::thread::sleep(Duration::from_millis(300));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let outcomes = loader.join().expect("load");
    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    let new = outcomes
        .iter()
        .filter(|o| o.as_ref().is_ok_and(|b| b.contains("VERSION=2")))
        .count();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the updates: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!(
        "{} requests during two updates and a del, {new} answered by the new version, none failed",
        outcomes.len()
    );
    assert!(outcomes.len() >= 50, "only {} requests", outcomes.len());
    assert!(new >= 1, "no request reached the new version");
    // The old version is gone from its minion.
    assert!(!c.ok(&["services"]).contains("web.1"));
}
