//! Measures `ServiceNet::create` and `destroy` (medians over 100 of each),
//! `apply_firewall` for 10, 100 and 1000 services, and the kernel memory 1000 service namespaces take, all inside a
//! throwaway network namespace (root only):
//!
//! ```text
//! cargo run --release -p phoenix-net --example netns_bench [COUNT] [MEMORY_COUNT]
//! ```

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use phoenix_model::net::service_ip;
use phoenix_net::{
    FirewallState, FwService, Ipv4Pool, NetPlan, ServiceNet, apply_firewall, host_if_name,
};

fn plan(i: u64, pool: &mut Ipv4Pool) -> NetPlan {
    let service = format!("svc{i}");
    let ipv6 = service_ip(i);
    NetPlan {
        host_if: host_if_name(&service, "bench"),
        ipv4: pool.allocate(ipv6).unwrap_or(Ipv4Addr::new(100, 64, 0, 1)),
        ipv6,
        held6: None,
        service,
    }
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 9 / 10], v[v.len() - 1])
}

fn meminfo(key: &str) -> i64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

const KEYS: [&str; 4] = ["MemFree", "SUnreclaim", "Percpu", "MemAvailable"];

fn snapshot() -> Vec<i64> {
    KEYS.iter().map(|k| meminfo(k)).collect()
}

fn report(what: &str, before: &[i64], after: &[i64], n: u64) {
    let parts: Vec<String> = KEYS
        .iter()
        .zip(before.iter().zip(after))
        .map(|(k, (b, a))| format!("{k} {:+} KiB ({:+} each)", a - b, (a - b) / n as i64))
        .collect();
    println!("{what}: {}", parts.join(", "));
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("netns_bench needs root (it creates network namespaces)");
        std::process::exit(2);
    }
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let memory_count: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    std::thread::spawn(move || {
        // SAFETY: only CLONE_NEWNET is unshared; the descriptor table stays
        // shared with the process.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
            .expect("unshare(CLONE_NEWNET)");
        let mut pool = Ipv4Pool::new();
        let plans: Vec<NetPlan> = (0..count).map(|i| plan(i, &mut pool)).collect();
        let mut created = Vec::new();
        let mut times = Vec::new();
        for p in &plans {
            let t = Instant::now();
            created.push(ServiceNet::create(p).expect("create"));
            times.push(t.elapsed());
        }
        let (m, p90, max) = median(times);
        println!("create  x{count}: median {m:?}, p90 {p90:?}, max {max:?}");
        let mut times = Vec::new();
        for net in created {
            let t = Instant::now();
            net.destroy().expect("destroy");
            times.push(t.elapsed());
        }
        let (m, p90, max) = median(times);
        println!("destroy x{count}: median {m:?}, p90 {p90:?}, max {max:?}");

        for services in [10u64, 100, 1000] {
            let state = FirewallState {
                services: (0..services)
                    .map(|i| FwService {
                        host_if: host_if_name(&format!("svc{i}"), "bench"),
                        own6: vec![service_ip(i)],
                        ipv4: Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + i as u32),
                        allowed: (1..=5).map(|k| service_ip((i + k) % services)).collect(),
                    })
                    .collect(),
            };
            let mut times = Vec::new();
            for _ in 0..20 {
                let t = Instant::now();
                apply_firewall("bench", &state).expect("apply_firewall");
                times.push(t.elapsed());
            }
            let (m, p90, max) = median(times);
            println!(
                "apply_firewall, {services} services x 5 links: median {m:?}, p90 {p90:?}, max {max:?}"
            );
        }

        if memory_count > 0 {
            std::thread::sleep(Duration::from_secs(2));
            let before = snapshot();
            let mut pool = Ipv4Pool::new();
            let t = Instant::now();
            let mut times = Vec::new();
            let nets: Vec<ServiceNet> = (0..memory_count)
                .map(|i| {
                    let t = Instant::now();
                    let net = ServiceNet::create(&plan(10_000 + i, &mut pool)).expect("create");
                    times.push(t.elapsed());
                    net
                })
                .collect();
            let took = t.elapsed();
            let after = snapshot();
            let tail = times.split_off(times.len() - times.len().min(100));
            println!(
                "{memory_count} namespaces in {took:?}; create median of the last 100: {:?}",
                median(tail).0
            );
            report("memory", &before, &after, memory_count);
            let t = Instant::now();
            for n in nets {
                n.destroy().expect("destroy");
            }
            println!("destroyed them in {:?}", t.elapsed());
            std::thread::sleep(Duration::from_secs(3));
            report(
                "3 s after destroying them, against before",
                &before,
                &snapshot(),
                memory_count,
            );
        }
    })
    .join()
    .expect("bench thread");
}
