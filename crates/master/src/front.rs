//! The master's front door: its HTTP/HTTPS proxy (`phoenix_proxy`) and
//! the ACME manager that gets the proxy's certificates (`phoenix_acme`),
//! fed from the hub.
//!
//! - One task keeps the proxy's route table equal to
//!   [`crate::routes::route_table`]: at start, after every change to the
//!   services, and after every status report that changes a state (so an
//!   instance reported unhealthy or stopped is out of the rotation within
//!   that report). The same task gives the ACME manager the set of names.
//! - One task hands every certificate the manager issues or renews to the
//!   proxy, which serves it by SNI.
//! - The proxy answers ACME's HTTP-01 challenges from the manager's map.
//!
//! The proxy runs as [`phoenix_proxy::Shards`]: `--proxy-threads` threads
//! of their own (not the master's runtime), each a current-thread runtime
//! with its own proxy, all accepting from the same listeners, like nginx's
//! workers;
//! route tables, certificates and challenges go to all of them, and
//! [`Front::drained`] waits for all of them.
//!
//! Without a working ACME setup (no CA roots on the host, a bad
//! `--acme-ca`), the proxy still serves every route over plain HTTP, and
//! `phoenix routes` says why there are no certificates.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use phoenix_model::proto::{CertView, ProxyView, RouteInstanceView, RouteView, RoutesView};

use crate::MasterError;
use crate::hub::Hub;
use crate::routes::RouteSpec;

/// The proxy's settings (master flags).
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub http_port: u16,
    pub https_port: u16,
    pub acme_directory: String,
    /// An extra root certificate to trust for the ACME directory.
    pub acme_ca: Option<PathBuf>,
    pub acme_email: Option<String>,
    /// For a client to send a request head (and finish TLS).
    pub header_timeout: std::time::Duration,
    /// A client connection without a request in flight is closed.
    pub idle_timeout: std::time::Duration,
    /// To connect to an instance.
    pub connect_timeout: std::time::Duration,
    /// For an instance to start answering.
    pub response_timeout: std::time::Duration,
    pub max_conns_per_ip: usize,
    /// Requests in flight at once from one client address (429 beyond).
    pub max_requests_per_ip: usize,
    /// Proxy threads, each with its own runtime, proxy and listeners;
    /// `None`: the CPUs the master may use, at most 4.
    pub threads: Option<usize>,
}

/// The running proxy and its certificate manager.
pub struct Front {
    proxy: phoenix_proxy::Shards,
    acme: Option<phoenix_acme::Acme>,
    acme_error: Option<String>,
    http_port: u16,
    https_port: u16,
}

impl Front {
    /// Binds the proxy's ports on `ip` and starts the proxy, the ACME
    /// manager and the tasks that feed them from `hub`.
    pub async fn start(
        hub: Arc<Hub>,
        settings: &ProxySettings,
        ip: IpAddr,
        data_dir: PathBuf,
    ) -> Result<Arc<Front>, MasterError> {
        let nofile = phoenix_host::raise_nofile_limit();
        let max_connections = max_connections_for(nofile);
        tracing::info!(
            open_files = nofile,
            max_connections,
            "the proxy's client connections at most"
        );
        let config = phoenix_proxy::ProxyConfig {
            max_connections,
            https_port: settings.https_port,
            header_read_timeout: settings.header_timeout,
            idle_timeout: settings.idle_timeout,
            backend_connect_timeout: settings.connect_timeout,
            backend_response_timeout: settings.response_timeout,
            max_connections_per_ip: settings.max_conns_per_ip,
            max_requests_per_ip: settings.max_requests_per_ip,
            ..phoenix_proxy::ProxyConfig::default()
        };
        let proxy = phoenix_proxy::Shards::new(
            config,
            settings
                .threads
                .unwrap_or_else(phoenix_proxy::Shards::default_threads),
        )
        .map_err(|e| MasterError::Proxy(e.to_string()))?;
        let challenges = phoenix_acme::Challenges::new();
        let (acme, acme_error) = match start_acme(settings, data_dir, challenges.clone()) {
            Ok(acme) => (Some(acme), None),
            Err(e) => {
                tracing::error!("no certificates: {e}; the proxy serves plain HTTP only");
                (None, Some(e))
            }
        };
        let front = Arc::new(Front {
            proxy,
            acme,
            acme_error,
            http_port: settings.http_port,
            https_port: settings.https_port,
        });
        if let Some(acme) = &front.acme {
            front
                .proxy
                .challenges()
                .set_source(move |token| challenges.get(token));
            tokio::spawn({
                let acme = acme.clone();
                async move { acme.run().await }
            });
            tokio::spawn(keep_certs(front.clone(), acme.clone()));
        }
        let http = SocketAddr::new(ip, settings.http_port);
        let https = SocketAddr::new(ip, settings.https_port);
        front
            .proxy
            .serve(Some(http), Some(https))
            .map_err(|e| match e {
                phoenix_proxy::ShardsError::Listen { addr, source } => {
                    let (what, flag) = if addr == http {
                        ("HTTP port", "--http-port")
                    } else {
                        ("HTTPS port", "--https-port")
                    };
                    MasterError::ProxyListen {
                        addr,
                        what: format!(
                            "the proxy's {what}; pick another port with {flag}, or run with --no-proxy"
                        ),
                        source,
                    }
                }
                e => MasterError::Proxy(e.to_string()),
            })?;
        tokio::spawn(keep_routes(front.clone(), hub));
        tracing::info!(
            http = settings.http_port,
            https = settings.https_port,
            threads = front.proxy.shards().len(),
            acme = %settings.acme_directory,
            "proxy up"
        );
        Ok(front)
    }

    /// The handler of the proxy's `/_phoenix/` requests (git webhooks).
    pub fn hooks(&self) -> phoenix_proxy::Hooks {
        self.proxy.hooks()
    }

    /// Gives the proxy this route table now. A route the proxy refuses is
    /// left out (and logged) so that the others still change.
    pub fn set_routes(&self, table: &[RouteSpec]) {
        for e in set_table(&self.proxy, proxy_routes(table)) {
            tracing::error!("the proxy refused a route, which it does not serve: {e}");
        }
    }

    /// Resolves once no request is in flight on the run `id`. A request
    /// that looked up the table just before the run left it may pick it a
    /// moment later (after a basic-auth check, say): the count must stay
    /// at zero for a short while.
    pub async fn drained(&self, id: &str) {
        loop {
            self.proxy.drained(id).await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if self.proxy.outstanding(id) == 0 {
                return;
            }
        }
    }

    /// What `phoenix routes` shows, from the route table `table`.
    pub fn view(&self, table: &[RouteSpec]) -> RoutesView {
        let snapshot = self.proxy.snapshot();
        let certs = self.acme.as_ref().map(|a| a.status()).unwrap_or_default();
        let proxy = ProxyView {
            http_port: self.http_port,
            https_port: self.https_port,
            connections: snapshot.connections,
            acme_error: self.acme_error.clone(),
        };
        routes_view(table, Some(&snapshot), &certs, Some(proxy))
    }
}

/// `phoenix routes`: the route table with the proxy's counters and the
/// hosts' certificates, where there are any (none with `--no-proxy`).
pub fn routes_view(
    table: &[RouteSpec],
    snapshot: Option<&phoenix_proxy::Snapshot>,
    certs: &[phoenix_acme::HostCert],
    proxy: Option<ProxyView>,
) -> RoutesView {
    let routes = table
        .iter()
        .map(|r| {
            let counters = snapshot.and_then(|s| {
                s.routes
                    .iter()
                    .find(|s| s.host == r.host && s.path_prefix == r.path)
            });
            RouteView {
                host: r.host.clone(),
                path: r.path.clone(),
                auth: !r.auth.is_empty(),
                instances: r
                    .instances
                    .iter()
                    .map(|i| {
                        let seen = counters.and_then(|c| {
                            c.instances
                                .iter()
                                .find(|s| s.id == i.service && s.addr == i.addr)
                        });
                        RouteInstanceView {
                            service: i.service.clone(),
                            machine: i.machine.clone(),
                            addr: i.addr,
                            up: i.up,
                            draining: i.draining,
                            outstanding: seen.map_or(0, |s| s.outstanding),
                            requests: seen.map_or(0, |s| s.total),
                            failures: seen.map_or(0, |s| s.failures),
                            down_for_ms: seen.and_then(|s| s.down_for_ms),
                        }
                    })
                    .collect(),
                certificate: certs.iter().find(|c| c.host == r.host).map(|c| CertView {
                    not_after: c.not_after,
                    last_error: c.last_error.clone(),
                    next_attempt: c.next_attempt,
                }),
            }
        })
        .collect();
    RoutesView { proxy, routes }
}

fn start_acme(
    settings: &ProxySettings,
    data_dir: PathBuf,
    challenges: phoenix_acme::Challenges,
) -> Result<phoenix_acme::Acme, String> {
    let extra_ca_pem = match &settings.acme_ca {
        Some(path) => {
            Some(std::fs::read(path).map_err(|e| format!("--acme-ca {}: {e}", path.display()))?)
        }
        None => None,
    };
    phoenix_acme::Acme::new(
        phoenix_acme::AcmeConfig {
            directory_url: settings.acme_directory.clone(),
            extra_ca_pem,
            email: settings.acme_email.clone(),
            data_dir,
        },
        challenges,
    )
    .map_err(|e| e.to_string())
}

/// The proxy's table as the proxy takes it.
fn proxy_routes(table: &[RouteSpec]) -> phoenix_proxy::Routes {
    phoenix_proxy::Routes {
        routes: table
            .iter()
            .map(|r| {
                let instances = r
                    .instances
                    .iter()
                    .map(|i| phoenix_proxy::Instance {
                        healthy: i.up,
                        draining: i.draining,
                        ..phoenix_proxy::Instance::new(i.service.clone(), i.addr)
                    })
                    .collect();
                let mut route =
                    phoenix_proxy::Route::new(r.host.clone(), instances).at(r.path.clone());
                route.auth = r.auth.clone();
                route
            })
            .collect(),
    }
}

/// Open files the master keeps for itself beside the proxy's connections:
/// the store, minion links, the CLI socket, logs, the registry, ACME.
const RESERVED_FILES: u64 = 512;

/// Client connections the proxy may hold with `nofile` open files: each
/// may need one to an instance too, and the master keeps some for itself.
/// At the limit the listeners stop accepting and the kernel queues new
/// connections, where past the open-file limit every part of the master
/// (store, links, CLI socket) would fail to open a file.
fn max_connections_for(nofile: u64) -> usize {
    let most = phoenix_proxy::ProxyConfig::default().max_connections;
    let fit = nofile.saturating_sub(RESERVED_FILES) / 2;
    usize::try_from(fit).unwrap_or(usize::MAX).clamp(64, most)
}

/// Sets `routes` on `proxy`, less each route it refuses (the proxy takes a
/// table whole or not at all: one bad route would hold every other at the
/// last table); returns the refusals.
fn set_table(
    proxy: &phoenix_proxy::Shards,
    mut routes: phoenix_proxy::Routes,
) -> Vec<phoenix_proxy::RouteError> {
    use phoenix_proxy::RouteError;
    let mut refused = Vec::new();
    loop {
        let Err(e) = proxy.set_routes(routes.clone()) else {
            return refused;
        };
        let (RouteError::BadHost { index, .. }
        | RouteError::BadPrefix { index, .. }
        | RouteError::Duplicate { index, .. }
        | RouteError::BadAuth { index, .. }) = e;
        refused.push(e);
        if index >= routes.routes.len() {
            return refused;
        }
        routes.routes.remove(index);
    }
}

/// Keeps the proxy's routes and the ACME manager's names current.
async fn keep_routes(front: Arc<Front>, hub: Arc<Hub>) {
    let mut seen = 0;
    let mut last: Option<Vec<RouteSpec>> = None;
    // The services are read from the store when they change; a status
    // report only recomputes who is up (reports come by the hundred when
    // many services start).
    // They are read again, too, when an update or a delete switched since
    // they were read (see `Hub::route_table_of`).
    let mut services = None;
    loop {
        let table = loop {
            if services.is_none() {
                let moving = hub.moving_now();
                match hub.proxied_services() {
                    Ok(s) => services = Some((moving, s)),
                    Err(e) => {
                        tracing::error!("cannot read the proxy's services: {e}");
                        break None;
                    }
                }
            }
            let Some((moving, s)) = &services else {
                break None;
            };
            match hub.route_table_of(s, moving) {
                Some(table) => break Some(table),
                None => services = None,
            }
        };
        match table {
            Some(table) if last.as_ref() != Some(&table) => {
                front.set_routes(&table);
                if let Some(acme) = &front.acme {
                    let hosts: BTreeSet<String> = table.iter().map(|r| r.host.clone()).collect();
                    for bad in acme.set_hosts(hosts) {
                        tracing::warn!("no certificate for {bad:?}");
                    }
                }
                last = Some(table);
            }
            _ => {}
        }
        if hub.routes_may_change(&mut seen).await == crate::hub::RoutesChange::Services {
            services = None;
        }
    }
}

/// Gives the proxy every certificate the manager has, now and whenever
/// one is issued or renewed.
async fn keep_certs(front: Arc<Front>, acme: phoenix_acme::Acme) {
    let mut rx = acme.subscribe();
    loop {
        let map = rx.borrow_and_update().clone();
        for cert in map.values() {
            if let Err(e) = front.proxy.certs().set(
                &cert.host,
                cert.chain_pem.as_bytes(),
                cert.key_pem.as_bytes(),
            ) {
                tracing::error!(host = %cert.host, "the proxy refused a certificate: {e}");
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_proxy::{Instance, ProxyConfig, Route, Routes, Shards};

    #[test]
    fn the_proxy_keeps_its_connections_within_the_open_file_limit() {
        // Run by hand from a shell (soft limit 1024), the master kept the
        // proxy's 16384: 1100 clients sending half a request head took it
        // to 1024 descriptors and 'accept failed: Too many open files'.
        assert_eq!(max_connections_for(1024), 256);
        assert_eq!(max_connections_for(20_000), 9744);
        assert_eq!(max_connections_for(1_048_576), 16384);
        assert_eq!(max_connections_for(u64::MAX), 16384);
        assert_eq!(max_connections_for(100), 64);
    }

    #[test]
    fn a_route_the_proxy_refuses_is_left_out_and_the_others_apply() {
        // A spec stored before the spec checks matched the proxy's (a
        // proxypath "/%2e" was accepted once) made the proxy refuse every
        // table after it: no deploy, update or health change reached the
        // proxy any more.
        let proxy = Shards::new(ProxyConfig::default(), 1).unwrap();
        let route = |host: &str| {
            Route::new(
                host,
                vec![Instance::new("a", "[::1]:8000".parse().unwrap())],
            )
        };
        let table = Routes {
            routes: vec![
                route("a.test"),
                route("b.test").at("/%2e"),
                route("c.test"),
                route("A.test"),
            ],
        };
        let refused = set_table(&proxy, table);
        assert_eq!(refused.len(), 2, "{refused:?}");
        let hosts: Vec<String> = proxy
            .snapshot()
            .routes
            .iter()
            .map(|r| r.host.clone())
            .collect();
        assert_eq!(hosts, ["a.test", "c.test"]);
    }
}
