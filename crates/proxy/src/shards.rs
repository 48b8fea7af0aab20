//! [`Shards`]: the proxy as N proxies, one a thread, each with its own
//! single-threaded tokio runtime and backend pool, all accepting from the
//! same listening sockets, fed as one.
//!
//! Why: on a multi-thread runtime every worker shares one I/O driver, and
//! the workers hand work to each other with futex wakes. With the proxy,
//! the load generator and the backends on two CPUs, those hand-offs queue
//! behind each other and the proxy spent its time waiting (about 0.6 CPU
//! where nginx used 0.8, and 0.57x nginx's small keep-alive requests/s in
//! `bench/proxy.sh`). nginx runs one event loop a worker; so do these
//! threads. Every thread watches the same listening socket (see `listen`
//! for why not one `SO_REUSEPORT` socket each): the thread that is free
//! takes a new connection, and the connection stays on that thread, with
//! the backend connections it opens.
//!
//! Each shard is a whole [`Proxy`]: its own route table (every table goes
//! to all of them), instance states, counters and keep-alive pools. They
//! share one TLS config (so one session ticket key: a client resumes its
//! session on whichever thread its next connection lands), one
//! certificate map, one ACME challenge source, one basic-auth
//! cache and one set of connection limits, so `max_connections` and
//! `max_connections_per_ip` count across all threads and mean what they
//! mean with one proxy. What is per shard: passive health (an instance
//! that refuses connections is found out by each shard on its own, one
//! retried request each) and the idle connections kept to each instance
//! (`backend_pool_max_idle` a shard).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::{
    Certs, Challenges, InstanceSnapshot, Proxy, ProxyConfig, ProxyError, RouteError, Routes,
    Shared, Snapshot,
};

/// Why [`Shards`] could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum ShardsError {
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("starting a proxy thread: {0}")]
    Thread(io::Error),
    #[error("the proxy is already serving")]
    Serving,
}

/// N proxies on N threads, fed as one. Cheap to clone, every clone the
/// same proxies.
#[derive(Clone, Debug)]
pub struct Shards {
    shards: Arc<[Proxy]>,
    /// Threads still running (after [`serve`](Self::serve)).
    running: Arc<watch::Sender<usize>>,
    served: Arc<std::sync::atomic::AtomicBool>,
}

/// The addresses [`Shards::serve`] listens on (ports chosen by the kernel
/// filled in).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
}

impl Shards {
    /// Threads by default: the CPUs this process may use, at most 4.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    }

    /// `threads` proxies (at least one) with `config`, an empty route
    /// table and no certificates. Nothing runs until
    /// [`serve`](Self::serve).
    pub fn new(config: ProxyConfig, threads: usize) -> Result<Shards, ProxyError> {
        crate::check(&config)?;
        let shared = Shared::new(&config)?;
        let shards = (0..threads.max(1))
            .map(|_| Proxy::with_shared(config.clone(), &shared))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Shards {
            shards: shards.into(),
            running: Arc::new(watch::Sender::new(0)),
            served: Arc::default(),
        })
    }

    /// The proxies, one a thread.
    pub fn shards(&self) -> &[Proxy] {
        &self.shards
    }

    /// Binds a listener on `http` and on `https` (either may be left out;
    /// port 0 lets the kernel pick) and starts the threads, each serving
    /// both listeners on a current-thread runtime until
    /// [`shutdown`](Self::shutdown). Every listener is bound before any
    /// thread starts: an address in use fails
    /// the whole call and leaves nothing running. Once only.
    pub fn serve(
        &self,
        http: Option<SocketAddr>,
        https: Option<SocketAddr>,
    ) -> Result<Listening, ShardsError> {
        if self.served.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(ShardsError::Serving);
        }
        let started = self.start(http, https);
        if let Err(ShardsError::Listen { .. }) = started {
            // Nothing runs: it may be tried again.
            self.served
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        started
    }

    fn start(
        &self,
        http: Option<SocketAddr>,
        https: Option<SocketAddr>,
    ) -> Result<Listening, ShardsError> {
        let mut at = Listening { http, https };
        // Clients speak first (a TLS ClientHello, an HTTP request): the
        // kernel may hold a connection until its first bytes are in, for
        // as long as a request head may take.
        let defer = self.shards[0].inner.config.header_read_timeout;
        let http = listen(&mut at.http, defer)?;
        let https = listen(&mut at.https, defer)?;
        let mut ready = Vec::with_capacity(self.shards.len());
        for _ in 0..self.shards.len() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ShardsError::Thread)?;
            // Every thread registers its own descriptor of the one
            // listening socket with its own reactor.
            let bound = {
                let _context = runtime.enter();
                share(http.as_ref(), at.http)
                    .and_then(|h| Ok((h, share(https.as_ref(), at.https)?)))
            };
            match bound {
                Ok((h, s)) => ready.push((runtime, h, s)),
                Err(e) => {
                    runtime.shutdown_background();
                    for (runtime, h, s) in ready {
                        drop((h, s));
                        runtime.shutdown_background();
                    }
                    return Err(e);
                }
            }
        }
        self.running.send_replace(ready.len());
        for (i, ((runtime, http, https), proxy)) in
            ready.into_iter().zip(self.shards.iter()).enumerate()
        {
            let proxy = proxy.clone();
            let exit = Exit(self.running.clone());
            std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || {
                    let _exit = exit;
                    runtime.block_on(async move {
                        let http = async {
                            if let Some(l) = http {
                                proxy.serve_http(l).await;
                            }
                        };
                        let https = async {
                            if let Some(l) = https {
                                proxy.serve_https(l).await;
                            }
                        };
                        tokio::join!(http, https);
                    });
                })
                .map_err(ShardsError::Thread)?;
        }
        Ok(at)
    }

    /// Gives every proxy this route table (see [`Proxy::set_routes`]). A
    /// table that does not check out is refused by the first, whole, and
    /// no proxy changes.
    pub fn set_routes(&self, routes: Routes) -> Result<(), RouteError> {
        let (last, rest) = self.shards.split_last().expect("at least one shard");
        for proxy in rest {
            proxy.set_routes(routes.clone())?;
        }
        last.set_routes(routes)
    }

    /// The certificates all the proxies serve (one map).
    pub fn certs(&self) -> Certs {
        self.shards[0].certs()
    }

    /// The ACME challenges all the proxies answer (one map).
    pub fn challenges(&self) -> Challenges {
        self.shards[0].challenges()
    }

    /// The handler of `/_phoenix/` requests all the proxies share.
    pub fn hooks(&self) -> crate::Hooks {
        self.shards[0].hooks()
    }

    /// Requests in flight on instances of `id`, over all proxies.
    pub fn outstanding(&self, id: &str) -> u64 {
        self.shards.iter().map(|p| p.outstanding(id)).sum()
    }

    /// Resolves when no request is in flight on instances of `id` on any
    /// proxy (see [`Proxy::drained`]).
    pub fn drained(&self, id: &str) -> impl Future<Output = ()> + Send + 'static {
        let shards = self.shards.clone();
        let id = id.to_owned();
        async move {
            loop {
                for proxy in shards.iter() {
                    proxy.drained(&id).await;
                }
                // One may have taken a request (a table set between) while
                // another was awaited: all at zero at once, or again.
                if shards.iter().all(|p| p.outstanding(&id) == 0) {
                    return;
                }
            }
        }
    }

    /// Stops every proxy (see [`Proxy::shutdown`]); the threads end once
    /// their connections are done, [`stopped`](Self::stopped) tells when.
    pub fn shutdown(&self) {
        for proxy in self.shards.iter() {
            proxy.shutdown();
        }
    }

    /// Resolves when every thread [`serve`](Self::serve) started has
    /// ended.
    pub async fn stopped(&self) {
        let mut running = self.running.subscribe();
        let _ = running.wait_for(|n| *n == 0).await;
    }

    /// The proxies' snapshots as one: per route and instance, the counters
    /// and requests in flight summed, draining if any says so, healthy if
    /// all do, the longest down mark; the connections (counted in the
    /// shared limits) once.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshots = self.shards.iter().map(Proxy::snapshot);
        let mut merged = snapshots.next().expect("at least one shard");
        for snapshot in snapshots {
            for route in snapshot.routes {
                let Some(into) = merged
                    .routes
                    .iter_mut()
                    .find(|r| r.host == route.host && r.path_prefix == route.path_prefix)
                else {
                    merged.routes.push(route);
                    continue;
                };
                into.requests += route.requests;
                into.unauthorized += route.unauthorized;
                into.unavailable += route.unavailable;
                into.bad_gateway += route.bad_gateway;
                into.timeouts += route.timeouts;
                for instance in route.instances {
                    match into
                        .instances
                        .iter_mut()
                        .find(|i| i.id == instance.id && i.addr == instance.addr)
                    {
                        Some(i) => add(i, &instance),
                        None => into.instances.push(instance),
                    }
                }
            }
        }
        merged
    }
}

fn add(into: &mut InstanceSnapshot, other: &InstanceSnapshot) {
    into.healthy &= other.healthy;
    into.draining |= other.draining;
    into.outstanding += other.outstanding;
    into.total += other.total;
    into.failures += other.failures;
    into.down_for_ms = into.down_for_ms.max(other.down_for_ms);
}

/// The listening socket on `*addr`, not yet tied to a runtime; sets
/// `*addr` to the address bound.
///
/// One socket for all threads, not one `SO_REUSEPORT` socket a thread:
/// with `SO_REUSEPORT` the kernel hands each new connection to a thread by
/// a hash of its addresses, whatever that thread is doing, so a thread
/// held up (a burst of handshakes, a slow hook) keeps getting new
/// connections that wait for it while the other thread idles. With one
/// socket every thread watches, the thread that is free takes the
/// connection, as nginx's workers do with one shared socket (the test
/// `a_busy_thread_leaves_new_connections_to_the_free_one`). In
/// `bench/proxy.sh`, where neither thread is ever held, the two measured
/// alike (quiet A/B: 1 MiB with a new connection each, p99 113 against
/// 121 ms over three rounds; 100 B keep-alive within 1 %).
///
/// `TCP_DEFER_ACCEPT` (`defer`, rounded up to seconds): a connection is
/// handed to `accept` once its first data has arrived (or after `defer`,
/// as before). A new connection then costs the proxy one wake-up instead
/// of two (accept, then the ClientHello), and no read that finds nothing.
fn listen(
    addr: &mut Option<SocketAddr>,
    defer: Duration,
) -> Result<Option<std::net::TcpListener>, ShardsError> {
    let Some(want) = *addr else {
        return Ok(None);
    };
    let error = |source| ShardsError::Listen { addr: want, source };
    let socket = if want.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(error)?;
    // As tokio's TcpListener::bind does.
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(want).map_err(error)?;
    defer_accept(&socket, defer).map_err(error)?;
    // `TcpSocket::listen` would tie the listener to a runtime; listen(2)
    // on the descriptor leaves that to each thread.
    rustix::net::listen(&socket, 1024).map_err(|e| error(e.into()))?;
    // SAFETY: `into_raw_fd` hands over the socket's open descriptor, which
    // nothing else owns from here on.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(socket.into_raw_fd()) };
    *addr = Some(listener.local_addr().map_err(error)?);
    Ok(Some(listener))
}

/// A descriptor of `listener` registered with the current runtime.
fn share(
    listener: Option<&std::net::TcpListener>,
    addr: Option<SocketAddr>,
) -> Result<Option<TcpListener>, ShardsError> {
    let (Some(listener), Some(addr)) = (listener, addr) else {
        return Ok(None);
    };
    let error = |source| ShardsError::Listen { addr, source };
    TcpListener::from_std(listener.try_clone().map_err(error)?)
        .map(Some)
        .map_err(error)
}

/// Sets `TCP_DEFER_ACCEPT` on a listening socket.
fn defer_accept(socket: &TcpSocket, defer: Duration) -> io::Result<()> {
    let secs = libc::c_int::try_from(defer.as_secs() + u64::from(defer.subsec_nanos() > 0))
        .unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is the socket's, open for this call; the
    // option value is a c_int on the stack, passed with its size.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Counts a thread out when it ends, however it ends.
struct Exit(Arc<watch::Sender<usize>>);

impl Drop for Exit {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}
