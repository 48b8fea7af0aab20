//! A join-port flooder: what an attacker who can reach the join port sends.
//!
//! Threads open connections from many loopback source addresses (Linux
//! routes all of 127.0.0.0/8 to `lo`, so `127.N.M.1` are as many source
//! networks as the budgets count), send a well-formed `JoinRequest` with a
//! fresh key and no token, and read the answer. A request the master lists
//! as waiting is held open (up to a number per thread, oldest closed first),
//! so the flood also fills the master's waiting list; some requests squat
//! on a real minion's name. Everything stays on this machine's loopback.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// What to flood with.
#[derive(Clone, Debug)]
pub struct FloodPlan {
    /// The master's join endpoint.
    pub target: SocketAddrV4,
    /// Distinct source /24 networks (`127.N.M.1`, N from 1), at most 65 000.
    pub networks: u32,
    pub threads: usize,
    /// Waiting connections each thread keeps open.
    pub hold_per_thread: usize,
    /// Every how many requests one asks for this name (a squatter).
    pub squat: Option<(String, u32)>,
    /// Requests per second over all threads; `None`: as fast as answered.
    /// Each request is a new connection, and the host's connection tracking
    /// (`nf_conntrack_max`, often 262144, each entry kept ~2 min after
    /// close) drops every new connection, the real minion's too, once a
    /// flood has filled it: keep the rate times the duration well below it.
    pub rate: Option<u32>,
}

/// Counts of what the master answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodReport {
    /// Requests sent in full.
    pub sent: u64,
    pub waiting: u64,
    pub refused: u64,
    /// Connections that failed or closed without an answer.
    pub failed: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    /// Requests sent per second.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    waiting: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// A running flood; stopped (and its connections closed) when dropped.
pub struct Flood {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Flood {
    pub fn start(plan: FloodPlan) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let threads = (0..plan.threads)
            .map(|t| {
                let (plan, stop, counters) = (plan.clone(), stop.clone(), counters.clone());
                std::thread::spawn(move || flood_thread(&plan, t, &stop, &counters))
            })
            .collect();
        Flood {
            stop,
            counters,
            threads,
            started: Instant::now(),
        }
    }

    /// The counts so far.
    pub fn report(&self) -> FloodReport {
        let c = &self.counters;
        FloodReport {
            sent: c.sent.load(Ordering::Relaxed),
            waiting: c.waiting.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            elapsed: self.started.elapsed(),
        }
    }

    /// Stops the threads, closes their connections, returns the counts.
    pub fn stop(mut self) -> FloodReport {
        self.halt();
        self.report()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.halt();
    }
}

fn flood_thread(plan: &FloodPlan, thread: usize, stop: &AtomicBool, c: &Counters) {
    let mut held: VecDeque<TcpStream> = VecDeque::new();
    let mut n: u64 = thread as u64;
    let every = plan
        .rate
        .map(|r| Duration::from_secs_f64(plan.threads as f64 / f64::from(r.max(1))));
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(every) = every {
            next += every;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        n += plan.threads as u64;
        let net = (n % u64::from(plan.networks.max(1))) as u32;
        let source = Ipv4Addr::new(127, 1 + (net / 256) as u8, (net % 256) as u8, 1);
        let name = match &plan.squat {
            Some((name, every)) if n.is_multiple_of(u64::from(*every)) => name.clone(),
            _ => format!("junk{n}"),
        };
        match ask(plan.target, source, &request(&name, n)) {
            Ok((stream, answer)) => {
                c.sent.fetch_add(1, Ordering::Relaxed);
                match answer["result"].as_str() {
                    Some("waiting") => {
                        c.waiting.fetch_add(1, Ordering::Relaxed);
                        held.push_back(stream);
                        if held.len() > plan.hold_per_thread {
                            held.pop_front();
                        }
                    }
                    Some("refused") => {
                        c.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        c.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(Sent::Yes) => {
                c.sent.fetch_add(1, Ordering::Relaxed);
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
            Err(Sent::No) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
                // Out of ports or descriptors: let some close.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// A join request with a fresh (valid-looking) key, made from `n`, and no
/// token.
pub fn request(name: &str, n: u64) -> Value {
    let key = base64(blake3::hash(&n.to_le_bytes()).as_bytes());
    json!({
        "name": name, "key": key, "public_ip": "192.0.2.1", "private_ip": "192.0.2.1",
        "wg_port": 51820, "version": "flood",
    })
}

/// Whether a failed request was sent in full before it failed.
pub enum Sent {
    Yes,
    No,
}

/// Sends one request from `source` and reads the first answer.
pub fn ask(
    target: SocketAddrV4,
    source: Ipv4Addr,
    req: &Value,
) -> Result<(TcpStream, Value), Sent> {
    let mut s = connect_from(source, target).map_err(|_| Sent::No)?;
    let body = req.to_string();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|_| Sent::No)?;
    s.write_all(&frame).map_err(|_| Sent::No)?;
    let answer = read_answer(&mut s).ok_or(Sent::Yes)?;
    Ok((s, answer))
}

/// The next frame the master sends on a join connection, as JSON.
pub fn read_answer(s: &mut TcpStream) -> Option<Value> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut answer = vec![0u8; u32::from_be_bytes(len).min(1 << 16) as usize];
    s.read_exact(&mut answer).ok()?;
    serde_json::from_slice(&answer).ok()
}

/// A TCP connection from a chosen local address.
pub fn connect_from(source: Ipv4Addr, target: SocketAddrV4) -> std::io::Result<TcpStream> {
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket(2) with constant arguments; the descriptor is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and own; the TcpStream
    // closes it, also on the error paths below.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let local = sockaddr(SocketAddrV4::new(source, 0));
    let remote = sockaddr(target);
    // SAFETY: bind/connect on our socket with pointers to sockaddr_in
    // values that live for the calls, and their exact size.
    unsafe {
        if libc::bind(fd, std::ptr::from_ref(&local).cast(), len) != 0
            || libc::connect(fd, std::ptr::from_ref(&remote).cast(), len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(stream)
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let v = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The join endpoint's address of a cluster on loopback.
pub fn loopback_target(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0u8; 32]).len(), 44);
    }
}
