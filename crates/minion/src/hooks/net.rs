//! The network hook: every service in a network namespace of its own, at
//! its own address ([`phoenix_net`] builds it), with `link` enforced by the
//! minion's nftables table and the names it links in its `/etc/hosts`.
//!
//! - A runner asks [`ServiceNetworks::create`] for its service's namespace
//!   before its first start; it keeps it across restarts of the process,
//!   and gives it back with [`ServiceNetworks::release`] when the service
//!   is deleted or moved. After a minion restart, [`ServiceNetworks::adopt`]
//!   takes over the namespace of a running process (`/proc/PID/ns/net`).
//!   A namespace is held by a descriptor, never mounted: when the minion
//!   and the service's processes are gone, the kernel removes it, so a
//!   killed minion leaks nothing.
//! - The firewall is one table, rebuilt whole by one applier task from the
//!   services' entries whenever one changes (a burst of changes is one
//!   `nft` run). A new namespace waits until the table that lets its
//!   service out is in place before its process starts, so a service is
//!   never briefly unconfined; restarts do not wait.
//! - Instance keys: everything here is per run, named by the assignment's
//!   key (the service's name, or `NAME.GENERATION` for the run a
//!   zero-downtime update starts beside the old one): the veth, the IPv4
//!   address, the firewall entry. A run is reached at its own address
//!   (`reach_ip`); while it holds the service's stable address too, that
//!   one is on its `eth0` and the host routes it to its veth.
//!   [`ServiceNetworks::readdress`] moves the stable address to a run
//!   without a restart: the firewall lets the run send from it, then the
//!   address is added inside and the host route replaced (atomic: no
//!   moment without a route). A run given back deletes its veth, which
//!   takes only the routes through it, so never a route another run took.
//! - Names: the service's hosts file (`work/NAME/hosts`) lists its own name
//!   and every service it links; the drivers mount it on `/etc/hosts`. A
//!   change of what a link points at rewrites it in place (the mount holds
//!   the file, not the name), and `PHOENIX_LINK_<NAME>` carries the same
//!   addresses in the environment from the next start.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phoenix_model::proto::Assignment;
use phoenix_net::{FirewallState, FwService, Ipv4Pool, NetPlan, ServiceNet};
use tokio::sync::{Notify, oneshot, watch};

/// How services reach the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetMode {
    /// A namespace per service (the default).
    Namespaces,
    /// Services share the minion's network (`--service-network host`):
    /// no addresses, no `link` enforcement; for hosts where the minion may
    /// not make namespaces.
    Host,
}

impl std::str::FromStr for NetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<NetMode, String> {
        match s {
            "netns" => Ok(NetMode::Namespaces),
            "host" => Ok(NetMode::Host),
            other => Err(format!("{other:?}: use netns or host")),
        }
    }
}

/// How long a new namespace waits for the firewall that confines it.
const FIREWALL_WAIT: Duration = Duration::from_secs(10);
/// Between attempts of a firewall update that failed.
const FIREWALL_RETRY: Duration = Duration::from_secs(1);

/// A run's network, held by its runner for as long as the run is on this
/// minion.
pub struct ServiceNetwork {
    /// Shared with the jobs that change its addresses.
    net: Arc<ServiceNet>,
    /// The run's own address, where it is reached.
    ipv6: Ipv6Addr,
    ipv4: Ipv4Addr,
    host_if: String,
    /// The stable address the newest change asked it to hold.
    held6: Option<Ipv6Addr>,
    /// Changes of `held6` asked so far; a job applies its change only if
    /// no newer one was asked meanwhile (the newer job applies that).
    changes: Arc<AtomicU64>,
    /// Held by a job while it checks and applies, so jobs never interleave.
    applying: Arc<Mutex<()>>,
}

impl ServiceNetwork {
    fn new(net: ServiceNet) -> ServiceNetwork {
        let plan = net.plan();
        ServiceNetwork {
            net: Arc::new(net),
            ipv6: plan.ipv6,
            ipv4: plan.ipv4,
            host_if: plan.host_if,
            held6: plan.held6,
            changes: Arc::default(),
            applying: Arc::default(),
        }
    }

    /// The run's own address (its assignment's `reach_ip`).
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// The stable address it holds beside its own, if it does.
    pub fn held6(&self) -> Option<Ipv6Addr> {
        self.held6
    }

    pub fn netns(&self) -> std::os::fd::BorrowedFd<'_> {
        self.net.netns()
    }
}

/// The stable address a run holds beside its own: `ip` while it holds it
/// and it is not the run's own address.
pub fn held6(a: &Assignment) -> Option<Ipv6Addr> {
    let own = a.reach_ip();
    a.addresses().into_iter().find(|ip| *ip != own)
}

/// The networks of this minion's services.
pub struct ServiceNetworks {
    mode: NetMode,
    minion_id: String,
    pool: Mutex<Ipv4Pool>,
    firewall: Arc<Firewall>,
    /// Namespaces made or adopted at once: each takes a thread, and a
    /// thousand services starting together must not make a thousand (a
    /// minion with that many threads forks slowly and misses heartbeats).
    setups: tokio::sync::Semaphore,
}

/// See [`ServiceNetworks::setups`].
const PARALLEL_SETUPS: usize = 4;

impl ServiceNetworks {
    /// `minion_id` names this minion's interfaces and table (several
    /// minions may share a host).
    pub fn new(mode: NetMode, minion_id: &str) -> ServiceNetworks {
        ServiceNetworks {
            mode,
            minion_id: minion_id.to_owned(),
            pool: Mutex::new(Ipv4Pool::new()),
            firewall: Arc::new(Firewall::new(minion_id)),
            setups: tokio::sync::Semaphore::new(PARALLEL_SETUPS),
        }
    }

    pub fn mode(&self) -> NetMode {
        self.mode
    }

    /// Checks the host and turns forwarding on; an error says what to
    /// install. Then starts the firewall's applier.
    pub fn prepare(&self) -> Result<(), phoenix_net::NetError> {
        if self.mode == NetMode::Host {
            return Ok(());
        }
        let report = phoenix_net::prepare_host()?;
        tracing::info!(
            nft = %report.nft_version,
            accept_ra_raised = ?report.accept_ra_raised,
            "service networks: a namespace per service"
        );
        tokio::spawn(self.firewall.clone().applier());
        Ok(())
    }

    /// The first desired set has `services` services: the firewall is
    /// first rebuilt once each has been adopted or started (or after a
    /// while), so that a minion restart never drops the rules of a
    /// service it is about to adopt.
    pub fn expect(&self, services: usize) {
        self.firewall.expect(services);
    }

    /// A runner is done with its first recovery or start attempt.
    pub fn settled(&self) {
        self.firewall.settled();
    }

    fn plan(&self, a: &Assignment) -> Option<NetPlan> {
        let ipv4 = lock(&self.pool).allocate(a.reach_ip())?;
        Some(NetPlan {
            service: a.key().to_owned(),
            ipv6: a.reach_ip(),
            held6: held6(a),
            ipv4,
            host_if: phoenix_net::host_if_name(a.key(), &self.minion_id),
        })
    }

    /// Makes the service's namespace, and waits until the firewall
    /// confines it. `Ok(None)` in host mode.
    pub async fn create(&self, a: &Assignment) -> Result<Option<ServiceNetwork>, String> {
        if self.mode == NetMode::Host {
            return Ok(None);
        }
        let plan = self
            .plan(a)
            .ok_or("no free node-local IPv4 address (100.64.0.0/10 is full)")?;
        let ipv4 = plan.ipv4;
        // The firewall is rebuilt while the namespace is made.
        let version = self
            .firewall
            .set(a.key(), fw_entry(&plan.host_if, plan.ipv4, a));
        let made = {
            let _turn = self.setups.acquire().await;
            tokio::task::spawn_blocking(move || ServiceNet::create(&plan)).await
        };
        let net = match made {
            Ok(Ok(net)) => net,
            Ok(Err(e)) => {
                self.forget(a.key(), ipv4);
                return Err(e.to_string());
            }
            Err(e) => {
                self.forget(a.key(), ipv4);
                return Err(format!("network setup thread: {e}"));
            }
        };
        let net = ServiceNetwork::new(net);
        if let Err(e) = self.firewall.wait(version).await {
            self.release(a.key(), net);
            return Err(format!("firewall: {e}"));
        }
        Ok(Some(net))
    }

    /// Takes over the namespace of the service's running process `pid`
    /// (off the runtime: a few netlink calls on a thread of its own), and
    /// brings its addresses to the assignment's (one it came to hold while
    /// the minion was down is added, and its route taken over).
    /// `Ok(None)` in host mode.
    pub async fn adopt(&self, a: &Assignment, pid: u32) -> Result<Option<ServiceNetwork>, String> {
        if self.mode == NetMode::Host {
            return Ok(None);
        }
        let plan = self
            .plan(a)
            .ok_or("no free node-local IPv4 address (100.64.0.0/10 is full)")?;
        let ipv4 = plan.ipv4;
        let adopted = {
            let plan = plan.clone();
            let _turn = self.setups.acquire().await;
            tokio::task::spawn_blocking(move || {
                ServiceNet::adopt(pid, &plan).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("network adoption thread: {e}")))
        };
        match adopted {
            Ok(net) => {
                self.firewall
                    .set(a.key(), fw_entry(&plan.host_if, plan.ipv4, a));
                Ok(Some(ServiceNetwork::new(net)))
            }
            Err(e) => {
                lock(&self.pool).release(ipv4);
                Err(e.to_string())
            }
        }
    }

    /// The run's links changed: new firewall entry.
    pub fn relink(&self, a: &Assignment, net: &ServiceNetwork) {
        self.firewall
            .set(a.key(), fw_entry(&net.host_if, net.ipv4, a));
    }

    /// Brings the run's addresses to `a` without a restart: whether it
    /// holds the service's stable address (`holds_ip`), and its links.
    ///
    /// The firewall entry changes at once. Taking the stable address: once
    /// the firewall lets the run send from it (so its first replies are
    /// not dropped as spoofed; bounded by the firewall's wait), the address
    /// is added to its `eth0` and the host route replaced to go through its
    /// veth, atomically. Giving it up: the address is removed and the route
    /// deleted if it still goes through this run's veth. The work runs on a
    /// task of its own, off the runtime thread; `done` is told when it is
    /// over (at once when nothing changes), whether it worked or not.
    pub fn readdress(
        &self,
        a: &Assignment,
        net: &mut ServiceNetwork,
        done: Option<oneshot::Sender<()>>,
    ) {
        let tell = |done: Option<oneshot::Sender<()>>| {
            if let Some(d) = done {
                let _ = d.send(());
            }
        };
        let version = self
            .firewall
            .set(a.key(), fw_entry(&net.host_if, net.ipv4, a));
        let want = held6(a);
        if want == net.held6 {
            tell(done);
            return;
        }
        net.held6 = want;
        let change = net.changes.fetch_add(1, Ordering::SeqCst) + 1;
        let (shared, changes, applying) =
            (net.net.clone(), net.changes.clone(), net.applying.clone());
        let firewall = self.firewall.clone();
        let key = a.key().to_owned();
        tokio::spawn(async move {
            if want.is_some()
                && let Err(e) = firewall.wait(version).await
            {
                tracing::warn!(service = %key, "taking over the stable address without its firewall entry: {e}");
            }
            let applied = tokio::task::spawn_blocking(move || {
                let _turn = lock(&applying);
                if changes.load(Ordering::SeqCst) != change {
                    // A newer change came: its job applies that.
                    return Ok(());
                }
                shared.readdress(want).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("readdress thread: {e}")));
            match applied {
                Ok(()) => tracing::info!(service = %key, held = ?want, "readdressed"),
                Err(e) => tracing::warn!(service = %key, "cannot change its addresses: {e}"),
            }
            tell(done);
        });
    }

    /// Removes the run's namespace and rules (off the runtime). Deleting
    /// its veth drops only the routes through it: a route to the stable
    /// address that another run took over stays.
    pub fn release(&self, key: &str, net: ServiceNetwork) {
        self.forget(key, net.ipv4);
        let name = key.to_owned();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = net.net.destroy() {
                tracing::warn!(service = %name, "{e}");
            }
        });
    }

    fn forget(&self, service: &str, ipv4: Ipv4Addr) {
        lock(&self.pool).release(ipv4);
        self.firewall.remove(service);
    }

    /// Deletes host ends of this minion's veths that no wanted run owns
    /// (left by runs deleted while the minion was down whose processes
    /// still held them); `wanted` are the wanted runs' keys.
    pub fn clean_orphans(&self, wanted: impl IntoIterator<Item = String>) {
        if self.mode == NetMode::Host {
            return;
        }
        let keep: HashSet<String> = wanted
            .into_iter()
            .map(|s| phoenix_net::host_if_name(&s, &self.minion_id))
            .collect();
        let prefix = phoenix_net::host_if_prefix(&self.minion_id);
        tokio::task::spawn_blocking(move || match phoenix_net::cleanup_orphans(&prefix, &keep) {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(?gone, "removed orphaned service networks")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cleaning up orphaned service networks: {e}"),
        });
    }
}

/// A run's firewall entry: it may send from exactly its addresses (its own
/// and, while it holds it, the stable one).
fn fw_entry(host_if: &str, ipv4: Ipv4Addr, a: &Assignment) -> FwService {
    let mut allowed: Vec<Ipv6Addr> = a.links.values().copied().collect();
    allowed.sort();
    allowed.dedup();
    FwService {
        host_if: host_if.to_owned(),
        own6: a.addresses(),
        ipv4,
        allowed,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the applier last did: the newest version in place, or the error
/// of the newest attempt.
#[derive(Clone, Debug, Default)]
struct Applied {
    version: u64,
    error: Option<(u64, String)>,
}

/// The minion's table, rebuilt by one task from the services' entries.
struct Firewall {
    minion_id: String,
    entries: Mutex<(u64, BTreeMap<String, FwService>)>,
    changed: Notify,
    applied: watch::Sender<Applied>,
    /// Services of the first desired set not yet adopted or started.
    unsettled: Mutex<Option<usize>>,
    ready: Notify,
}

impl Firewall {
    fn new(minion_id: &str) -> Firewall {
        Firewall {
            minion_id: minion_id.to_owned(),
            entries: Mutex::new((0, BTreeMap::new())),
            changed: Notify::new(),
            applied: watch::Sender::new(Applied::default()),
            unsettled: Mutex::new(None),
            ready: Notify::new(),
        }
    }

    /// Sets a service's entry; returns the version that includes it.
    fn set(&self, service: &str, entry: FwService) -> u64 {
        let mut g = lock(&self.entries);
        if g.1.get(service) == Some(&entry) {
            return g.0;
        }
        g.0 += 1;
        g.1.insert(service.to_owned(), entry);
        self.changed.notify_one();
        g.0
    }

    fn remove(&self, service: &str) {
        let mut g = lock(&self.entries);
        if g.1.remove(service).is_some() {
            g.0 += 1;
            self.changed.notify_one();
        }
    }

    fn expect(&self, services: usize) {
        let mut u = lock(&self.unsettled);
        if u.is_none() {
            *u = Some(services);
            if services == 0 {
                self.ready.notify_one();
            }
        }
    }

    fn settled(&self) {
        let mut u = lock(&self.unsettled);
        if let Some(n) = u.as_mut()
            && *n > 0
        {
            *n -= 1;
            if *n == 0 {
                self.ready.notify_one();
            }
        }
    }

    /// Waits until version `v` (or a newer one) is in place.
    async fn wait(&self, v: u64) -> Result<(), String> {
        let mut rx = self.applied.subscribe();
        let wait =
            rx.wait_for(|a| a.version >= v || a.error.as_ref().is_some_and(|(ev, _)| *ev >= v));
        match tokio::time::timeout(FIREWALL_WAIT, wait).await {
            Ok(Ok(a)) if a.version >= v => Ok(()),
            Ok(Ok(a)) => Err(a.error.clone().map(|e| e.1).unwrap_or_default()),
            Ok(Err(_)) => Err("the firewall applier stopped".into()),
            Err(_) => Err(format!("not in place after {} s", FIREWALL_WAIT.as_secs())),
        }
    }

    /// Rebuilds the table whenever an entry changes.
    async fn applier(self: Arc<Firewall>) {
        // After a minion restart, wait for the services it adopts (a
        // bounded while), so that the first rebuild keeps their rules.
        let _ = tokio::time::timeout(FIREWALL_WAIT, self.ready.notified()).await;
        let mut done = None;
        // What the kernel's table holds, when known: later changes are
        // then sent as set elements only (a new service is a handful of
        // elements, a few milliseconds, whatever the number of others);
        // the first, and any after a failure, rebuilds the whole table.
        let mut in_place: Option<FirewallState> = None;
        loop {
            let (version, state) = {
                let g = lock(&self.entries);
                let state = FirewallState {
                    services: g.1.values().cloned().collect(),
                };
                (g.0, state)
            };
            if done != Some(version) {
                let doc = match &in_place {
                    Some(old) => phoenix_net::ruleset_delta(&self.minion_id, old, &state),
                    None => Some(phoenix_net::ruleset(&self.minion_id, &state)),
                };
                let r = match doc {
                    Some(doc) => run_nft(&self.minion_id, &doc.to_string()).await,
                    None => Ok(()),
                };
                match r {
                    Ok(()) => {
                        done = Some(version);
                        in_place = Some(state);
                        self.applied.send_modify(|a| {
                            a.version = version;
                            a.error = None;
                        });
                    }
                    Err(e) if in_place.is_some() => {
                        // Rebuild the whole table at once instead.
                        tracing::warn!("firewall: {e}; rebuilding the whole table");
                        in_place = None;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("firewall: {e}");
                        self.applied.send_modify(|a| a.error = Some((version, e)));
                        tokio::time::sleep(FIREWALL_RETRY).await;
                        continue;
                    }
                }
            }
            let pending = lock(&self.entries).0 != version;
            if !pending {
                self.changed.notified().await;
            }
        }
    }
}

/// Runs one `nft -j -f -` transaction on the minion's table. Run through
/// the minion's reaper, which collects every child of the minion (a
/// `Child::wait` would race it and lose).
async fn run_nft(minion_id: &str, doc: &str) -> Result<(), String> {
    let mut cmd = std::process::Command::new("nft");
    cmd.args(["-j", "-f", "-"])
        .stdout(std::process::Stdio::null());
    match crate::reaper::run_with_input(&mut cmd, Some(doc.as_bytes())).await {
        Ok((exit, _)) if exit.code == Some(0) => Ok(()),
        Ok((exit, stderr)) => Err(format!(
            "nft exited with {exit} changing table inet {}: {}",
            phoenix_net::table_name(minion_id),
            stderr.trim()
        )),
        Err(e) => Err(format!("running nft: {e}")),
    }
}

/// The service's hosts file.
pub fn hosts_path(work_dir: &Path) -> PathBuf {
    work_dir.join("hosts")
}

/// What a service's `/etc/hosts` says: loopback, its own name, and every
/// service it links that exists.
pub fn hosts_text(name: &str, ip: Ipv6Addr, links: &BTreeMap<String, Ipv6Addr>) -> String {
    let mut s = String::from(
        "# written by the phoenix minion: this service and the services it links\n\
         127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    s.push_str(&format!("{ip}\t{name}\n"));
    for (n, addr) in links {
        s.push_str(&format!("{addr}\t{n}\n"));
    }
    s
}

/// Writes the hosts file in place (a bind mount holds the file itself, so
/// it is rewritten, never replaced), unless it already says `text`.
pub fn write_hosts(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::{Seek, Write};
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.seek(std::io::SeekFrom::Start(0))?;
    f.write_all(text.as_bytes())?;
    f.set_len(text.len() as u64)?;
    Ok(())
}

/// `PHOENIX_LINK_<NAME>=<address>` for every linked service that exists
/// (the name upper-cased, anything but letters and digits made `_`).
pub fn link_env(links: &BTreeMap<String, Ipv6Addr>) -> Vec<(String, String)> {
    links
        .iter()
        .map(|(n, ip)| {
            let key: String = n
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            (format!("PHOENIX_LINK_{key}"), ip.to_string())
        })
        .collect()
}

/// The address health checks and the minion use for a run: its own.
pub fn service_addr(net: Option<&ServiceNetwork>) -> Option<IpAddr> {
    net.map(|n| IpAddr::V6(n.ipv6()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn hosts_file_names_the_service_and_its_links() {
        let links = BTreeMap::from([
            ("db".to_owned(), ip("fd38:dde8:32dd:1::2")),
            ("cache-1".to_owned(), ip("fd38:dde8:32dd:1::3")),
        ]);
        let text = hosts_text("web", ip("fd38:dde8:32dd:1::1"), &links);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "127.0.0.1\tlocalhost",
                "::1\tlocalhost ip6-localhost ip6-loopback",
                "fd38:dde8:32dd:1::1\tweb",
                "fd38:dde8:32dd:1::3\tcache-1",
                "fd38:dde8:32dd:1::2\tdb",
            ]
        );
        assert_eq!(
            link_env(&links),
            [
                (
                    "PHOENIX_LINK_CACHE_1".to_owned(),
                    "fd38:dde8:32dd:1::3".to_owned()
                ),
                (
                    "PHOENIX_LINK_DB".to_owned(),
                    "fd38:dde8:32dd:1::2".to_owned()
                ),
            ]
        );
    }

    #[test]
    fn a_run_holds_the_stable_address_beside_its_own_only_when_told() {
        let spec = phoenix_model::spec::parse_specs(
            "t",
            r#"{"machine":"m","name":"web","type":"binary","image":"x"}"#,
        )
        .unwrap()
        .remove(0);
        let mut a = Assignment {
            spec,
            ip: ip("fd38:dde8:32dd:1::1"),
            image_hash: String::new(),
            image_size: 0,
            generation: 2,
            links: Default::default(),
            instance: None,
            own_ip: None,
            holds_ip: true,
            env: None,
        };
        // A plain run: its own address is the stable one.
        assert_eq!(held6(&a), None);
        a.instance = Some("web.2".into());
        a.own_ip = Some(ip("fd38:dde8:32dd:1::9"));
        a.holds_ip = false;
        assert_eq!(held6(&a), None);
        let fw = fw_entry("phx", Ipv4Addr::new(100, 64, 0, 9), &a);
        assert_eq!(fw.own6, [ip("fd38:dde8:32dd:1::9")]);
        a.holds_ip = true;
        assert_eq!(held6(&a), Some(ip("fd38:dde8:32dd:1::1")));
        let fw = fw_entry("phx", Ipv4Addr::new(100, 64, 0, 9), &a);
        assert_eq!(
            fw.own6,
            [ip("fd38:dde8:32dd:1::9"), ip("fd38:dde8:32dd:1::1")]
        );
    }

    #[test]
    fn hosts_file_is_rewritten_in_place() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        write_hosts(&path, "a long first version of the file\n").unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        write_hosts(&path, "short\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "short\n");
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "same file");
    }
}
