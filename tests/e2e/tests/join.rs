//! The join endpoint under attack: floods from many source networks,
//! squatters on a real minion's name, junk that must not be kept.
//!
//! Floods come from `127.N.M.1` (one /24 each) to the master on 127.0.0.1,
//! so everything stays on this machine's loopback; each lasts a few seconds.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use phoenix_e2e::joinflood::{
    Flood, FloodPlan, FloodReport, ask, loopback_target, read_answer, request,
};
use phoenix_e2e::{Cluster, alive, wait_for};
use serde_json::Value;

/// Floods long enough to have emptied every budget a flood can reach.
const FLOOD_WARMUP: Duration = Duration::from_secs(2);
/// How long a minion with the token may take to be accepted, flood or not.
const ADMIT_BOUND: Duration = Duration::from_secs(5);

/// The flood the tests send: 1000 requests a second (33 times what kept
/// minions out before), well within what the host's connection tracking
/// holds over a test run.
fn plan(c: &Cluster, squat: &str) -> FloodPlan {
    FloodPlan {
        rate: Some(1000),
        target: loopback_target(c.join_port),
        networks: 200,
        threads: 4,
        // 4 × 96: more than the master's waiting list holds.
        hold_per_thread: 96,
        squat: Some((squat.to_owned(), 5)),
    }
}

/// The flood was a real one: fast, and mostly refused.
fn assert_flooded(r: &FloodReport) {
    assert!(
        r.rate() >= 300.0,
        "the flood reached only {:.0} requests/s: {r:?}",
        r.rate()
    );
    assert!(r.refused > 0 && r.waiting > 0, "{r:?}");
}

/// A master started with `--auto-accept`.
fn auto_accepting_master() -> (Cluster, String) {
    let mut c = Cluster::master_only();
    c.kill_master();
    c.master_flags.push("--auto-accept".into());
    c.start_master();
    let token = c.json(&["master-info", "--json"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    (c, token)
}

/// Whether `name` is an accepted node.
fn is_node(c: &Cluster, name: &str) -> bool {
    c.json(&["nodes", "--json"])
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n["name"] == name))
}

/// Starts minion `name` with the join token and times its acceptance.
fn time_admission(c: &mut Cluster, name: &str, token: &str) -> Duration {
    c.minion_flags.extend(["--token".into(), token.to_owned()]);
    let start = Instant::now();
    c.start_minion(name);
    c.minion_flags.truncate(c.minion_flags.len() - 2);
    while !is_node(c, name) {
        assert!(
            start.elapsed() < ADMIT_BOUND * 4,
            "{name} not accepted after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = start.elapsed();
    if took > Duration::from_secs(1) {
        // Why it took long is in the minion's join lines.
        let log = c.log(name);
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("join")).collect();
        eprintln!("{name} accepted after {took:?}:\n{}", lines.join("\n"));
    }
    took
}

#[test]
fn a_minion_with_the_token_is_admitted_through_a_flood() {
    let (mut c, token) = auto_accepting_master();
    let flood = Flood::start(plan(&c, "m1"));
    std::thread::sleep(FLOOD_WARMUP);
    let took = time_admission(&mut c, "m1", &token);
    let during = flood.report();
    assert!(
        took < ADMIT_BOUND,
        "accepted only after {took:?} (flood: {during:?})"
    );
    // Over the overlay too, with the flood still on, and it stays up.
    c.wait_reachable("m1");
    while flood.report().elapsed < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(100));
    }
    c.wait_reachable("m1");
    let report = flood.stop();
    eprintln!(
        "flood {:.0} requests/s ({report:?}); m1 accepted after {took:?}",
        report.rate()
    );
    assert_flooded(&report);
    assert!(
        alive(u64::from(c.minion_pid("m1"))),
        "the minion's daemon exited"
    );
    // The squatters with its name did not take it.
    let nodes = c.json(&["nodes", "--json"]);
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
    let waiting = c.json(&["waiting", "--json"]);
    assert!(
        !waiting
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "m1"),
        "a squatter for an accepted name is still listed: {waiting}"
    );
}

/// The fingerprint of `name`'s request from 127.0.0.1 (the real minion's).
fn real_fingerprint(waiting: &Value, name: &str) -> Option<String> {
    waiting.as_array()?.iter().find_map(|w| {
        (w["name"] == name && w["public_ip"] == "127.0.0.1")
            .then(|| w["fingerprint"].as_str().unwrap().to_owned())
    })
}

#[test]
fn a_waiting_minion_keeps_its_place_through_a_flood_and_squatters() {
    let mut c = Cluster::master_only();
    c.start_minion("m1");
    c.wait_waiting("m1");
    let fp = real_fingerprint(&c.json(&["waiting", "--json"]), "m1").expect("m1 waiting");
    let pid = u64::from(c.minion_pid("m1"));

    // While the flood lasts, the real request stays listed (held, not
    // expired, not pushed out), and the minion keeps running.
    let flood = Flood::start(plan(&c, "m1"));
    let until = Instant::now() + Duration::from_secs(6);
    let mut most_listed = 0;
    while Instant::now() < until {
        let waiting = c.json(&["waiting", "--json"]);
        let listed = waiting.as_array().unwrap();
        most_listed = most_listed.max(listed.len());
        assert_eq!(
            real_fingerprint(&waiting, "m1").as_deref(),
            Some(fp.as_str()),
            "m1's request left the list during the flood ({:?})",
            flood.report()
        );
        assert!(alive(pid), "the minion's daemon exited during the flood");
        std::thread::sleep(Duration::from_millis(300));
    }
    let report = flood.stop();
    eprintln!("flood {:.0} requests/s: {report:?}", report.rate());
    assert_flooded(&report);
    // Capped: 256 without the token, whatever the flood sent.
    assert!(
        (2..=256).contains(&most_listed),
        "{most_listed} requests were listed at once"
    );

    // Junk is not kept across a restart; the real minion asks again.
    c.kill_master();
    c.start_master();
    wait_for(
        "only m1's request listed after a master restart",
        Duration::from_secs(15),
        || {
            let waiting = c.json(&["waiting", "--json"]);
            (waiting.as_array()?.len() == 1 && real_fingerprint(&waiting, "m1")? == fp)
                .then_some(())
        },
    );

    // A squatter asks for the name with another key: both are listed, and
    // the admin must choose.
    let (mut squatter, first) = ask(
        loopback_target(c.join_port),
        Ipv4Addr::new(127, 200, 0, 1),
        &request("m1", 7),
    )
    .unwrap_or_else(|_| panic!("the squatter's request got no answer"));
    assert_eq!(first["result"], "waiting", "{first}");
    let waiting = c.json(&["waiting", "--json"]);
    let named: Vec<&Value> = waiting
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["name"] == "m1")
        .collect();
    assert_eq!(named.len(), 2, "{waiting}");
    let refusal = c.fails(&["accept", "m1"]);
    assert!(
        refusal.contains("--fingerprint") && refusal.contains(&fp),
        "{refusal}"
    );
    c.ok(&["accept", "m1", "--fingerprint", &fp]);
    c.wait_reachable("m1");
    assert!(alive(pid), "the minion's daemon exited");

    // The squatter hears a final refusal on its held connection.
    squatter
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let answer = loop {
        let a = read_answer(&mut squatter).expect("an answer for the squatter");
        if a["result"] != "waiting" {
            break a;
        }
    };
    assert_eq!(answer["result"], "refused", "{answer}");
    assert_eq!(answer["permanent"], true, "{answer}");
    assert!(
        answer["reason"]
            .as_str()
            .unwrap()
            .contains("accepted node with another key"),
        "{answer}"
    );
}

/// The figures of BENCHMARKS.md's "Join flood" section (`bench/joinflood.sh`
/// runs this in release mode): time to accept a minion with the token, on a
/// quiet master and under floods of 1000 and 3000 requests a second, over
/// `PHOENIX_JOINFLOOD_ROUNDS` rounds (5), each on a fresh master.
#[test]
#[ignore = "a benchmark: bench/joinflood.sh"]
fn join_flood_figures() {
    let rounds: usize = std::env::var("PHOENIX_JOINFLOOD_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "| flood asked for (requests/s) | flood achieved (requests/s, median) | refused | listed as waiting (all rounds) | time to accept a minion with the token: median | max |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for rate in [None, Some(1000), Some(3000)] {
        let mut took = Vec::new();
        let mut reports = Vec::new();
        for _ in 0..rounds {
            let (mut c, token) = auto_accepting_master();
            let flood = rate.map(|r| {
                let flood = Flood::start(FloodPlan {
                    rate: Some(r),
                    ..plan(&c, "m1")
                });
                std::thread::sleep(FLOOD_WARMUP);
                flood
            });
            took.push(ms(time_admission(&mut c, "m1", &token)));
            if let Some(flood) = flood {
                // The flood's rate over a fixed span, the admission inside it.
                while flood.report().elapsed < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                reports.push(flood.stop());
            }
        }
        took.sort_by(f64::total_cmp);
        let mut rates: Vec<f64> = reports.iter().map(FloodReport::rate).collect();
        rates.sort_by(f64::total_cmp);
        let sent: u64 = reports.iter().map(|r| r.sent).sum::<u64>().max(1);
        let refused: u64 = reports.iter().map(|r| r.refused).sum();
        let listed: u64 = reports.iter().map(|r| r.waiting).sum();
        println!(
            "| {} | {} | {} | {} | {:.0} ms | {:.0} ms |",
            rate.map_or("none".into(), |r| r.to_string()),
            rates
                .get(rates.len() / 2)
                .map_or("-".into(), |r| format!("{r:.0}")),
            if rate.is_some() {
                format!("{:.2} %", 100.0 * refused as f64 / sent as f64)
            } else {
                "-".into()
            },
            if rate.is_some() {
                listed.to_string()
            } else {
                "-".into()
            },
            took[took.len() / 2],
            took[took.len() - 1],
        );
    }
}
