//! Several hosts on one machine: a network namespace per host, joined by a
//! bridge that lives in a namespace of its own (so the root namespace's
//! firewall, which Docker may have set to drop forwarded packets, never sees
//! the traffic). Each host has `eth0` with `10.99.0.N/24` and its own `lo`.
//!
//! Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip` from iproute2;
//! [`Net::new`] returns `None`, with the reason, where they are missing.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Why the multi-host tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, TUN devices)".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("needs /dev/net/tun".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs `ip` (iproute2)".into());
    }
    None
}

/// Skips the calling test with a message if the harness cannot run here.
#[macro_export]
macro_rules! require_netns {
    () => {
        if let Some(why) = $crate::netns::unavailable() {
            eprintln!("SKIPPED: multi-host test {}", why);
            return;
        }
    };
}

fn run(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// A set of hosts on one bridge.
pub struct Net {
    switch: String,
    pub hosts: Vec<Host>,
}

impl Net {
    pub fn new(names: &[&str]) -> Net {
        static N: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "phx{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let switch = format!("{id}-sw");
        run(&["netns", "add", &switch]);
        let mut net = Net {
            switch: switch.clone(),
            hosts: Vec::new(),
        };
        run(&["-n", &switch, "link", "set", "lo", "up"]);
        run(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        run(&["-n", &switch, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{id}-{name}");
            run(&["netns", "add", &ns]);
            let ip = Ipv4Addr::new(10, 99, 0, i as u8 + 1);
            net.hosts.push(Host {
                name: (*name).to_owned(),
                ns: ns.clone(),
                ip,
            });
            let port = format!("v-{name}");
            run(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            run(&["-n", &switch, "link", "set", &port, "master", "br0", "up"]);
            run(&["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            run(&["-n", &ns, "link", "set", "eth0", "up"]);
            run(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// A command that runs `program` inside a host.
    pub fn command(&self, host: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(host).ns]).arg(program);
        c
    }

    /// Unplugs a host's cable (its side keeps its address, but no carrier).
    pub fn cut(&self, host: &str) {
        self.cable(host, "down");
    }

    pub fn heal(&self, host: &str) {
        self.cable(host, "up");
    }

    fn cable(&self, host: &str, state: &str) {
        let port = format!("v-{host}");
        run(&["-n", &self.switch, "link", "set", &port, state]);
    }

    /// Caps what a host sends (`rate` as tc takes it, e.g. `40mbit`).
    pub fn limit_rate(&self, host: &str, rate: &str) {
        let ns = &self.host(host).ns;
        run(&[
            "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate",
            rate, "burst", "64kb", "latency", "500ms",
        ]);
    }

    /// Lifts [`Net::limit_rate`].
    pub fn unlimit_rate(&self, host: &str) {
        let ns = &self.host(host).ns;
        run(&[
            "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root",
        ]);
    }

    /// Drops everything on a host's `eth0` except WireGuard (UDP `wg`) and
    /// the join endpoint (TCP `join`), both directions.
    pub fn only_overlay(&self, host: &str, wg: u16, join: u16) {
        let rules = format!(
            "table inet phx {{
               chain input {{ type filter hook input priority 0; policy accept;
                 iifname \"eth0\" udp dport {wg} accept
                 iifname \"eth0\" udp sport {wg} accept
                 iifname \"eth0\" tcp dport {join} accept
                 iifname \"eth0\" tcp sport {join} accept
                 iifname \"eth0\" counter drop
               }}
               chain output {{ type filter hook output priority 0; policy accept;
                 oifname \"eth0\" udp dport {wg} accept
                 oifname \"eth0\" udp sport {wg} accept
                 oifname \"eth0\" tcp dport {join} accept
                 oifname \"eth0\" tcp sport {join} accept
                 oifname \"eth0\" counter drop
               }}
             }}"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.host(host).ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft (Debian package nftables)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft rules for {host}");
    }

    /// Runs `f` on a thread inside a host's network namespace.
    pub fn within<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.host(host).ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).expect("open netns");
                // SAFETY: setns(2) on a namespace file we hold open; it only
                // moves this (scoped, short-lived) thread.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in netns")
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.switch])
            .status();
    }
}
