//! testy: a deliberately unreliable HTTP service for exercising Phoenix's supervision.
//!
//! Only std and libc: one thread per connection, `Connection: close` on every reply.
//! Run `testy --help` (or read [`USAGE`]) for the knobs.

use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs,
    UdpSocket,
};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use std::{env, fs, process, thread};

static HEALTHY: AtomicBool = AtomicBool::new(true);
static START: OnceLock<Instant> = OnceLock::new();

const USAGE: &str = "\
usage: testy [OPTIONS]

A deliberately unreliable HTTP service for testing process supervisors.
Every option can also be set from env TESTY_<NAME> (e.g. TESTY_CRASH_AFTER=2.5,
TESTY_IGNORE_SIGTERM=1); command-line flags win. Also --opt=value is accepted.

  --port N                listen port (default: $PORT, else 8000; 0 = any free port)
  --bind ADDR             listen address (default: [::] dual-stack, else 0.0.0.0)
  --crash-after SECS      exit with --exit-code SECS after listening (0 = at once)
  --exit-code N           exit code used by --crash-after/--crash-prob (default 1)
  --crash-prob P          every second, exit with --exit-code with probability P (0..1)
  --start-delay SECS      sleep SECS before binding the port (slow start)
  --unhealthy-after SECS  make /health answer 503 SECS after listening
  --ignore-sigterm        ignore SIGTERM (the supervisor has to SIGKILL)
  --spawn-child           fork a child that sleeps forever (process-group kill tests)
  --announce ADDR         at start, send UDP 'started <pid> <unix_nanos>' to ADDR
  --write-file PATH       at start, append 'start <pid>' to PATH
  -h, --help              print this help

Endpoints:
  GET  /           name ($PHOENIX_NAME), pid and uptime in ms
  GET  /health     200 'ok', or 503 'unhealthy'
  POST /unhealthy  turn health off (GET works too)
  POST /healthy    turn health back on (GET works too)
  GET  /env        the environment as sorted K=V lines
  POST /crash      reply, then exit with ?code=N (default 1) (GET works too)
  POST /sleep      answer after ?ms=N milliseconds (at most 60000; GET works too)
  GET  /get?to=HOST:PORT&path=/P
                   GET http://HOST:PORT/P from inside this service (HOST may be
                   a name from /etc/hosts, or [v6]); 200 with the body it got,
                   502 with the error (connect timeout 2 s)
  GET  /file?path=/etc/hosts
                   the contents of a file, as this service sees it
  GET  /ws         with 'Connection: Upgrade': 101 Switching Protocols, then
                   every byte received is sent back until the peer closes
                   (no WebSocket framing: enough to see a proxy pass it on)
";

/// Options that take a value; `FLAG_OPTS` are booleans.
const VALUE_OPTS: &[&str] = &[
    "port",
    "bind",
    "crash-after",
    "exit-code",
    "crash-prob",
    "start-delay",
    "unhealthy-after",
    "announce",
    "write-file",
];
const FLAG_OPTS: &[&str] = &["ignore-sigterm", "spawn-child"];

#[derive(Debug, Clone, PartialEq)]
struct Config {
    port: u16,
    bind: Option<String>,
    crash_after: Option<f64>,
    exit_code: i32,
    crash_prob: f64,
    start_delay: f64,
    unhealthy_after: Option<f64>,
    ignore_sigterm: bool,
    spawn_child: bool,
    announce: Option<String>,
    write_file: Option<String>,
    help: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            port: 8000,
            bind: None,
            crash_after: None,
            exit_code: 1,
            crash_prob: 0.0,
            start_delay: 0.0,
            unhealthy_after: None,
            ignore_sigterm: false,
            spawn_child: false,
            announce: None,
            write_file: None,
            help: false,
        }
    }
}

impl Config {
    fn set(&mut self, name: &str, v: &str) -> Result<(), String> {
        let bad = |what: &str| format!("--{name}: invalid {what} '{v}'");
        let secs = || match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
            _ => Err(bad("number of seconds")),
        };
        let flag = || match v.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "false" | "no" | "off" => Ok(false),
            "1" | "true" | "yes" | "on" => Ok(true),
            _ => Err(bad("boolean")),
        };
        match name {
            "port" => self.port = v.trim().parse().map_err(|_| bad("port"))?,
            "bind" => self.bind = Some(v.to_string()),
            "crash-after" => self.crash_after = Some(secs()?),
            "exit-code" => {
                self.exit_code = match v.trim().parse() {
                    Ok(c @ 0..=255) => c,
                    _ => return Err(bad("exit code (0-255)")),
                }
            }
            "crash-prob" => {
                self.crash_prob = match v.trim().parse::<f64>() {
                    Ok(p) if (0.0..=1.0).contains(&p) => p,
                    _ => return Err(bad("probability (0..1)")),
                }
            }
            "start-delay" => self.start_delay = secs()?,
            "unhealthy-after" => self.unhealthy_after = Some(secs()?),
            "announce" => self.announce = Some(v.to_string()),
            "write-file" => self.write_file = Some(v.to_string()),
            "ignore-sigterm" => self.ignore_sigterm = flag()?,
            "spawn-child" => self.spawn_child = flag()?,
            _ => return Err(format!("unknown option '--{name}'")),
        }
        Ok(())
    }
}

/// Builds the config from `$PORT`, then `$TESTY_*`, then the flags (last wins).
fn parse_args<I>(args: I, env: impl Fn(&str) -> Option<String>) -> Result<Config, String>
where
    I: IntoIterator<Item = String>,
{
    let mut cfg = Config::default();
    let env = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(p) = env("PORT") {
        cfg.set("port", &p).map_err(|e| format!("$PORT: {e}"))?;
    }
    for name in VALUE_OPTS.iter().chain(FLAG_OPTS) {
        let key = format!("TESTY_{}", name.to_ascii_uppercase().replace('-', "_"));
        if let Some(v) = env(&key) {
            cfg.set(name, &v).map_err(|e| format!("${key}: {e}"))?;
        }
    }
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            cfg.help = true;
            continue;
        }
        let Some(opt) = arg.strip_prefix("--") else {
            return Err(format!("unexpected argument '{arg}'"));
        };
        let (name, inline) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (opt, None),
        };
        if VALUE_OPTS.contains(&name) {
            let v = match inline {
                Some(v) => v,
                None => args
                    .next()
                    .ok_or_else(|| format!("option '--{name}' needs a value"))?,
            };
            cfg.set(name, &v)?;
        } else if FLAG_OPTS.contains(&name) {
            cfg.set(name, inline.as_deref().unwrap_or("true"))?;
        } else {
            return Err(format!("unknown option '--{name}'"));
        }
    }
    Ok(cfg)
}

#[derive(Debug, PartialEq)]
struct RequestLine<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
}

/// Parses `METHOD /path?query HTTP/1.x`; `None` means 400.
fn parse_request_line(line: &str) -> Option<RequestLine<'_>> {
    let mut parts = line.trim_end_matches(['\r', '\n']).split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if parts.next().is_some() || !method_ok || !target.starts_with('/') {
        return None;
    }
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(RequestLine {
        method,
        path,
        query,
    })
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

/// Writes a line to stdout and flushes, ignoring a closed stdout.
fn say(msg: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

fn crash(code: i32) -> ! {
    say(&format!("testy: crashing with code {code}"));
    let _ = io::stderr().flush();
    process::exit(code)
}

fn uptime_ms() -> u128 {
    START.get_or_init(Instant::now).elapsed().as_millis()
}

/// Returns (status, body, exit code to crash with after replying).
fn route(req: &RequestLine) -> (u16, String, Option<i32>) {
    let get_or_post = matches!(req.method, "GET" | "POST");
    let ok = |body: &str| (200, body.to_string(), None);
    match (req.method, req.path) {
        ("GET", "/") => {
            let name = env::var("PHOENIX_NAME").unwrap_or_else(|_| "-".into());
            let (pid, up) = (process::id(), uptime_ms());
            ok(&format!("testy name={name} pid={pid} uptime_ms={up}\n"))
        }
        ("GET", "/health") if HEALTHY.load(Ordering::SeqCst) => ok("ok"),
        ("GET", "/health") => (503, "unhealthy".into(), None),
        (_, "/unhealthy") if get_or_post => {
            HEALTHY.store(false, Ordering::SeqCst);
            ok("now unhealthy\n")
        }
        (_, "/healthy") if get_or_post => {
            HEALTHY.store(true, Ordering::SeqCst);
            ok("now healthy\n")
        }
        ("GET", "/env") => {
            let mut vars: Vec<String> = env::vars_os()
                .map(|(k, v)| format!("{}={}\n", k.to_string_lossy(), v.to_string_lossy()))
                .collect();
            vars.sort();
            ok(&vars.concat())
        }
        (_, "/sleep") if get_or_post => match query_param(req.query, "ms").map(str::parse::<u64>) {
            Some(Ok(ms @ 0..=60_000)) => {
                thread::sleep(Duration::from_millis(ms));
                (200, format!("slept {ms} ms\n"), None)
            }
            _ => (400, "bad ms (want 0-60000)\n".into(), None),
        },
        (_, "/crash") if get_or_post => match query_param(req.query, "code").map(str::parse) {
            None => (200, "crashing with code 1\n".into(), Some(1)),
            Some(Ok(c @ 0..=255)) => (200, format!("crashing with code {c}\n"), Some(c)),
            Some(_) => (400, "bad code (want 0-255)\n".into(), None),
        },
        ("GET", "/get") => match (query_param(req.query, "to"), query_param(req.query, "path")) {
            (Some(to), path) => match get_from(to, path.unwrap_or("/")) {
                Ok(body) => ok(&body),
                Err(e) => (502, format!("GET {to}: {e}\n"), None),
            },
            (None, _) => (400, "want ?to=HOST:PORT\n".into(), None),
        },
        ("GET", "/file") => match query_param(req.query, "path").map(fs::read_to_string) {
            Some(Ok(text)) => ok(&text),
            Some(Err(e)) => (404, format!("{e}\n"), None),
            None => (400, "want ?path=FILE\n".into(), None),
        },
        _ => (404, "not found\n".into(), None),
    }
}

/// A plain HTTP GET from this process: what a service reaches, and how.
fn get_from(to: &str, path: &str) -> io::Result<String> {
    let mut last = io::Error::other(format!("{to} resolves to no address"));
    for addr in to.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
                )?;
                let mut reply = String::new();
                s.read_to_string(&mut reply)?;
                return match reply.split_once("\r\n\r\n") {
                    Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
                    Some((head, _)) => Err(io::Error::other(format!(
                        "{addr} answered {:?}",
                        head.lines().next().unwrap_or("")
                    ))),
                    None => Err(io::Error::other(format!("{addr}: no HTTP reply"))),
                };
            }
            Err(e) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
        }
    }
    Err(last)
}

/// Reads the request head and discards any body (unread input would make
/// close() send a RST that can destroy our reply in flight). Returns the
/// head and the bytes read past it and its body (for an upgrade, the first
/// bytes of the new protocol).
fn read_request(stream: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("request head too large"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let body_len: u64 = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let read_past = (buf.len() - head_end) as u64;
    let rest = body_len.saturating_sub(read_past);
    io::copy(&mut (&*stream).take(rest.min(1 << 20)), &mut io::sink())?;
    let extra = buf.split_off(head_end + body_len.min(read_past) as usize);
    Ok((head, extra))
}

/// Whether a request head asks to switch protocols (`Connection: upgrade`).
fn wants_upgrade(head: &str) -> bool {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// `/ws`: 101, then an echo of the raw bytes until the peer closes (or is
/// silent for a minute).
fn echo(mut stream: TcpStream, head: &str, early: &[u8]) {
    let protocol = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("upgrade"))
        .map_or("websocket", |(_, v)| v.trim());
    say("testy: GET /ws -> 101");
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    );
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    if stream.write_all(reply.as_bytes()).is_err() || stream.write_all(early).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        if stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

fn handle(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok((head, extra)) = read_request(&mut stream) else {
        return;
    };
    let line = head.lines().next().unwrap_or("");
    if line.starts_with("GET /ws ") && wants_upgrade(&head) {
        echo(stream, &head, &extra);
        return;
    }
    let (status, body, crash_code) = match parse_request_line(line) {
        Some(req) => route(&req),
        None => (400, "bad request\n".into(), None),
    };
    say(&format!("testy: {line} -> {status}"));
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream
        .write_all(resp.as_bytes())
        .and_then(|()| stream.flush());
    if let Some(code) = crash_code {
        let _ = stream.shutdown(Shutdown::Write);
        crash(code);
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn announce(addr: &str, pid: u32) -> io::Result<()> {
    let target = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("address resolved to nothing"))?;
    let local = match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let msg = format!("started {pid} {}", unix_nanos());
    UdpSocket::bind((local, 0))?.send_to(msg.as_bytes(), target)?;
    Ok(())
}

/// Must run while this is the only thread, so the fork is a sane copy.
fn spawn_child() {
    // SAFETY: no other thread exists yet (we fork before binding or spawning
    // anything), and the child only calls the async-signal-safe pause().
    match unsafe { libc::fork() } {
        -1 => eprintln!("testy: fork: {}", io::Error::last_os_error()),
        0 => loop {
            // SAFETY: pause() has no preconditions; it sleeps until a signal.
            unsafe { libc::pause() };
        },
        child => say(&format!("testy: child pid {child}")),
    }
}

fn bind(cfg: &Config) -> io::Result<TcpListener> {
    match &cfg.bind {
        Some(host) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            TcpListener::bind((host, cfg.port))
        }
        None => TcpListener::bind((Ipv6Addr::UNSPECIFIED, cfg.port))
            .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, cfg.port))),
    }
}

/// xorshift64; seeded from time and pid, good enough for coin flips.
struct Rng(u64);

impl Rng {
    fn seeded(pid: u32) -> Self {
        Rng((unix_nanos() as u64 ^ (u64::from(pid) << 32) ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn after(secs: f64, f: impl FnOnce() + Send + 'static) {
    thread::spawn(move || {
        thread::sleep(Duration::from_secs_f64(secs));
        f();
    });
}

fn start_chaos(cfg: &Config, pid: u32) {
    let code = cfg.exit_code;
    if let Some(secs) = cfg.crash_after {
        if secs == 0.0 {
            crash(code);
        }
        after(secs, move || crash(code));
    }
    if let Some(secs) = cfg.unhealthy_after {
        after(secs, || {
            HEALTHY.store(false, Ordering::SeqCst);
            say("testy: now unhealthy");
        });
    }
    if cfg.crash_prob > 0.0 {
        let (p, mut rng) = (cfg.crash_prob, Rng::seeded(pid));
        thread::spawn(move || {
            loop {
                thread::sleep(Duration::from_secs(1));
                if rng.next_f64() < p {
                    crash(code);
                }
            }
        });
    }
}

fn main() {
    START.get_or_init(Instant::now);
    let cfg = match parse_args(env::args().skip(1), |k| env::var(k).ok()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("testy: {e} (see --help)");
            process::exit(2);
        }
    };
    if cfg.help {
        print!("{USAGE}");
        return;
    }
    let pid = process::id();
    if cfg.ignore_sigterm {
        // SAFETY: SIG_IGN installs no handler code; nothing else in this
        // process manages signal dispositions.
        if unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) } == libc::SIG_ERR {
            eprintln!(
                "testy: cannot ignore SIGTERM: {}",
                io::Error::last_os_error()
            );
        } else {
            say("testy: ignoring SIGTERM");
        }
    }
    if let Some(path) = &cfg.write_file {
        let res = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "start {pid}"));
        if let Err(e) = res {
            eprintln!("testy: --write-file {path}: {e}");
        }
    }
    if let Some(addr) = &cfg.announce
        && let Err(e) = announce(addr, pid)
    {
        eprintln!("testy: --announce {addr}: {e}");
    }
    if cfg.spawn_child {
        spawn_child();
    }
    if cfg.start_delay > 0.0 {
        say(&format!(
            "testy: pid {pid} starting in {}s",
            cfg.start_delay
        ));
        thread::sleep(Duration::from_secs_f64(cfg.start_delay));
    }
    let listener = match bind(&cfg) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("testy: cannot listen on port {}: {e}", cfg.port);
            process::exit(1);
        }
    };
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    say(&format!("testy: pid {pid} listening on {addr}"));
    eprintln!("testy: stderr hello");
    start_chaos(&cfg, pid);
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || handle(stream));
            }
            Err(e) => {
                eprintln!("testy: accept: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_args(args.iter().map(|s| s.to_string()), |k| env.get(k).cloned())
    }

    #[test]
    fn defaults() {
        assert_eq!(parse(&[], &[]).unwrap(), Config::default());
        assert_eq!(parse(&[], &[]).unwrap().port, 8000);
    }

    #[test]
    fn flags() {
        let c = parse(
            &[
                "--port",
                "9001",
                "--bind=127.0.0.1",
                "--crash-after",
                "1.5",
                "--exit-code",
                "7",
                "--crash-prob",
                "0.25",
                "--start-delay",
                "0.5",
                "--unhealthy-after",
                "3",
                "--ignore-sigterm",
                "--spawn-child",
                "--announce",
                "127.0.0.1:9999",
                "--write-file",
                "/tmp/x",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.port, 9001);
        assert_eq!(c.bind.as_deref(), Some("127.0.0.1"));
        assert_eq!(c.crash_after, Some(1.5));
        assert_eq!((c.exit_code, c.crash_prob, c.start_delay), (7, 0.25, 0.5));
        assert_eq!(c.unhealthy_after, Some(3.0));
        assert!(c.ignore_sigterm && c.spawn_child && !c.help);
        assert_eq!(c.announce.as_deref(), Some("127.0.0.1:9999"));
        assert_eq!(c.write_file.as_deref(), Some("/tmp/x"));
        assert!(parse(&["--help"], &[]).unwrap().help);
        assert!(parse(&["-h"], &[]).unwrap().help);
    }

    #[test]
    fn env_and_precedence() {
        assert_eq!(parse(&[], &[("PORT", "7000")]).unwrap().port, 7000);
        let env = [("PORT", "7000"), ("TESTY_PORT", "7001")];
        assert_eq!(parse(&[], &env).unwrap().port, 7001);
        assert_eq!(parse(&["--port", "7002"], &env).unwrap().port, 7002);
        let env = [("TESTY_CRASH_AFTER", "2"), ("TESTY_IGNORE_SIGTERM", "yes")];
        let c = parse(&[], &env).unwrap();
        assert_eq!(c.crash_after, Some(2.0));
        assert!(c.ignore_sigterm);
        assert_eq!(
            parse(&["--crash-after=0"], &env).unwrap().crash_after,
            Some(0.0)
        );
        let off = parse(&["--ignore-sigterm=false"], &env).unwrap();
        assert!(!off.ignore_sigterm);
        assert_eq!(parse(&[], &[("TESTY_PORT", "")]).unwrap().port, 8000);
        let err = parse(&[], &[("TESTY_EXIT_CODE", "x")]).unwrap_err();
        assert!(err.contains("TESTY_EXIT_CODE"), "{err}");
    }

    #[test]
    fn errors() {
        let err = parse(&["--frobnicate"], &[]).unwrap_err();
        assert!(err.contains("--frobnicate"), "{err}");
        let err = parse(&["--frob=1"], &[]).unwrap_err();
        assert!(err.contains("'--frob'"), "{err}");
        assert!(
            parse(&["--port"], &[])
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(parse(&["stray"], &[]).is_err());
        for bad in [
            &["--port", "70000"][..],
            &["--crash-prob", "1.5"],
            &["--crash-after", "-1"],
            &["--start-delay", "nan"],
            &["--exit-code", "256"],
            &["--spawn-child=maybe"],
        ] {
            assert!(parse(bad, &[]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_lines() {
        let r = parse_request_line("GET /health HTTP/1.1\r\n").unwrap();
        assert_eq!((r.method, r.path, r.query), ("GET", "/health", ""));
        let r = parse_request_line("POST /crash?code=3&x=y HTTP/1.0").unwrap();
        assert_eq!(
            (r.method, r.path, r.query),
            ("POST", "/crash", "code=3&x=y")
        );
        for bad in [
            "",
            "GET",
            "GET /",
            "GET / HTTP/2",
            "get / HTTP/1.1",
            "GET health HTTP/1.1",
            "GET / HTTP/1.1 extra",
            "GET  / HTTP/1.1",
        ] {
            assert_eq!(parse_request_line(bad), None, "{bad:?}");
        }
        assert_eq!(query_param("code=3&x=y", "code"), Some("3"));
        assert_eq!(query_param("x=y&code", "code"), Some(""));
        assert_eq!(query_param("x=y", "code"), None);
    }

    #[test]
    fn routes() {
        let req = |line| route(&parse_request_line(line).unwrap());
        assert_eq!(req("GET /nope HTTP/1.1").0, 404);
        assert_eq!(req("DELETE /crash HTTP/1.1").0, 404);
        assert_eq!(req("POST /crash HTTP/1.1").2, Some(1));
        assert_eq!(req("GET /crash?code=42 HTTP/1.1").2, Some(42));
        assert_eq!(req("POST /crash?code=x HTTP/1.1").0, 400);
        assert_eq!(req("GET /health HTTP/1.1").0, 200);
        assert_eq!(req("POST /unhealthy HTTP/1.1").0, 200);
        assert_eq!(req("GET /health HTTP/1.1"), (503, "unhealthy".into(), None));
        req("POST /healthy HTTP/1.1");
        assert_eq!(req("GET /health HTTP/1.1"), (200, "ok".into(), None));
        assert!(req("GET /env HTTP/1.1").1.contains("PATH="));
    }

    #[test]
    fn ws_switches_protocols_then_echoes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || handle(listener.accept().unwrap().0));
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Bytes right behind the head come back too.
        s.write_all(
            b"GET /ws HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: x-echo\r\n\r\nearly",
        )
        .unwrap();
        let want = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x-echo\r\n\r\nearly";
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
        s.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        server.join().unwrap();
        // Without the upgrade header, /ws is an ordinary 404.
        assert!(!wants_upgrade(
            "GET /ws HTTP/1.1\r\nConnection: close\r\n\r\n"
        ));
    }

    #[test]
    fn rng_in_unit_interval() {
        let mut rng = Rng::seeded(1234);
        let xs: Vec<f64> = (0..1000).map(|_| rng.next_f64()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(xs.iter().any(|&x| x < 0.5) && xs.iter().any(|&x| x >= 0.5));
    }
}
