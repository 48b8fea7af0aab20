//! The route table: what the master pushes, and the compiled form the
//! request path reads.
//!
//! [`Routes`] is plain data (serde, so the master can log or diff it).
//! [`Proxy::set_routes`](crate::Proxy::set_routes) validates it and compiles
//! it into a [`Table`]: hosts normalised (lower case, no trailing dot),
//! prefixes normalised (`/api/` → `/api`), each host's routes sorted longest
//! prefix first. The table then replaces the old one in one atomic swap.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::balance::InstanceState;
use crate::stats::RouteCounters;

/// A whole route table, as the master computes it from its state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    pub routes: Vec<Route>,
}

/// One host + path prefix and the instances that serve it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// A DNS name (`proxyname`). Matched case-insensitively against the
    /// request's Host (or `:authority`), its port ignored.
    pub host: String,
    /// A path prefix (`proxypath`), `/` for the whole host. Matched on a
    /// segment boundary: `/api` matches `/api` and `/api/x`, not `/apix`.
    #[serde(default = "root")]
    pub path_prefix: String,
    /// Whether the prefix is removed before the request reaches the
    /// backend (`/api/x` → `/x`, `/api` → `/`).
    #[serde(default = "yes")]
    pub strip_prefix: bool,
    pub instances: Vec<Instance>,
    /// `(user, bcrypt hash)` pairs (`proxyauth`); empty means no
    /// authentication. See [`parse_htpasswd`].
    #[serde(default)]
    pub auth: Vec<(String, String)>,
}

fn root() -> String {
    "/".to_owned()
}

fn yes() -> bool {
    true
}

impl Route {
    /// A route for `host` at `/`, prefix stripping on, no auth.
    pub fn new(host: impl Into<String>, instances: Vec<Instance>) -> Self {
        Route {
            host: host.into(),
            path_prefix: root(),
            strip_prefix: true,
            instances,
            auth: Vec::new(),
        }
    }

    /// The same route at `prefix`.
    pub fn at(mut self, prefix: impl Into<String>) -> Self {
        self.path_prefix = prefix.into();
        self
    }
}

/// One backend: a service instance at its own address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The service's name. Instances are identified by `(id, addr)`: their
    /// counters survive table replacements under that key.
    pub id: String,
    pub addr: SocketAddr,
    /// As the master sees it (health checks); unhealthy instances get no
    /// requests.
    #[serde(default = "yes")]
    pub healthy: bool,
    /// No new requests; those in flight finish. See
    /// [`Proxy::drained`](crate::Proxy::drained).
    #[serde(default)]
    pub draining: bool,
}

impl Instance {
    /// A healthy, not draining instance.
    pub fn new(id: impl Into<String>, addr: SocketAddr) -> Self {
        Instance {
            id: id.into(),
            addr,
            healthy: true,
            draining: false,
        }
    }
}

/// Why a route table was refused. Nothing of a refused table is applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("route {index}: host {host:?} is not a DNS name")]
    BadHost { index: usize, host: String },
    #[error(
        "route {index} ({host}): path prefix {prefix:?} must start with '/' and hold no '?', '#', '.' or '..' segment"
    )]
    BadPrefix {
        index: usize,
        host: String,
        prefix: String,
    },
    #[error("route {index}: {host}{prefix} is already routed by route {first}")]
    Duplicate {
        index: usize,
        first: usize,
        host: String,
        prefix: String,
    },
    #[error("route {index} ({host}): auth user {user:?}: {problem}")]
    BadAuth {
        index: usize,
        host: String,
        user: String,
        problem: &'static str,
    },
}

/// Why an htpasswd line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("htpasswd entry {line:?}: {problem}")]
pub struct HtpasswdError {
    /// The line up to its first ':' only: never the hash.
    pub line: String,
    pub problem: &'static str,
}

/// Splits an htpasswd line `user:$2y$...` into `(user, hash)`. Only bcrypt
/// hashes are accepted.
pub fn parse_htpasswd(line: &str) -> Result<(String, String), HtpasswdError> {
    let line = line.trim();
    let Some((user, hash)) = line.split_once(':') else {
        return Err(HtpasswdError {
            line: line.to_owned(),
            problem: "expected user:hash",
        });
    };
    let err = |problem| HtpasswdError {
        line: user.to_owned(),
        problem,
    };
    if user.is_empty() {
        return Err(err("the user is empty"));
    }
    if !is_bcrypt(hash) {
        return Err(err(
            "the hash is not bcrypt ($2a$, $2b$ or $2y$, 60 characters)",
        ));
    }
    Ok((user.to_owned(), hash.to_owned()))
}

fn is_bcrypt(hash: &str) -> bool {
    hash.len() == 60
        && (hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$"))
        && hash.is_ascii()
}

/// A host as the table keys it: lower case, no port, no trailing dot.
/// `None` when it is not a plausible DNS name or address.
pub(crate) fn normalize_host(host: &str) -> Option<Cow<'_, str>> {
    let host = host.trim();
    // Strip a port: `[v6]:port`, `name:port`.
    let host = if let Some(rest) = host.strip_prefix('[') {
        let end = rest.find(']')?;
        &host[..end + 2]
    } else if let Some((name, port)) = host.rsplit_once(':') {
        if name.contains(':') || !port.bytes().all(|b| b.is_ascii_digit()) {
            // A bare IPv6 address, or something odd: keep as is and let the
            // character check decide.
            host
        } else {
            name
        }
    } else {
        host
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    let ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':'));
    if !ok {
        return None;
    }
    // Borrowed in the usual case (per request, no allocation).
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// `/api/` → `/api`, `/` stays. `None` when not a clean absolute path.
fn normalize_prefix(prefix: &str) -> Option<String> {
    if !prefix.starts_with('/') || prefix.contains(['?', '#', ';']) {
        return None;
    }
    // In the form request paths are looked up in (`clean_path`).
    let prefix = clean_path(prefix).ok()?;
    let trimmed = prefix.trim_end_matches('/');
    Some(if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    })
}

/// Why a request path is refused (400) before routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BadPath {
    /// `.` or `..` (also percent-encoded).
    DotSegment,
    /// `%2F`, `%5C`, `%00`, `%3B`, `%25`, `%3F` or `%23`: a character that
    /// backends decode into a path separator, a parameter, a second
    /// encoding or the end of the path, each in its own way.
    Encoded(u8),
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// A raw `\`, which some backends take for `/`.
    Backslash,
}

impl BadPath {
    pub fn message(self) -> &'static str {
        match self {
            BadPath::DotSegment => "phoenix: the path holds a '.' or '..' segment\n",
            BadPath::Encoded(b'/') => "phoenix: the path holds an encoded '/' (%2F)\n",
            BadPath::Encoded(b'\\') => "phoenix: the path holds an encoded '\\' (%5C)\n",
            BadPath::Encoded(0) => "phoenix: the path holds an encoded NUL (%00)\n",
            BadPath::Encoded(b';') => "phoenix: the path holds an encoded ';' (%3B)\n",
            BadPath::Encoded(b'%') => "phoenix: the path holds an encoded '%' (%25)\n",
            BadPath::Encoded(b'?') => "phoenix: the path holds an encoded '?' (%3F)\n",
            BadPath::Encoded(_) => "phoenix: the path holds an encoded '#' (%23)\n",
            BadPath::BadEscape => "phoenix: the path holds a '%' without two hex digits\n",
            BadPath::Backslash => "phoenix: the path holds a '\\'\n",
        }
    }
}

/// The one form of a request path that routing, authentication and the
/// instance all see, or why there is none. Backends decode a path in
/// their own ways (nginx merges `//` and decodes `%61` and `%2F` before it
/// looks for a file), so a prefix compared with the raw path could be
/// walked around: `//admin` or `/%61dmin` past `/admin`'s basic auth to
/// the `/` route of the same instance. So, as Traefik does: percent-
/// encoded unreserved characters (letters, digits, `-._~`) are decoded,
/// other escapes upper-cased, runs of `/` merged into one; encoded
/// characters that backends read differently (`/ \ NUL ; % ? #`), a raw
/// `\` and `.`/`..` segments are refused. The path is borrowed when it is
/// already in that form (the usual case: no allocation), and what the
/// proxy forwards otherwise.
pub(crate) fn clean_path(path: &str) -> Result<Cow<'_, str>, BadPath> {
    let bytes = path.as_bytes();
    let plain = !bytes.contains(&b'%') && !bytes.contains(&b'\\') && !path.contains("//");
    if plain {
        return if has_dot_segment(path) {
            Err(BadPath::DotSegment)
        } else {
            Ok(Cow::Borrowed(path))
        };
    }
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = |at: usize| bytes.get(at).and_then(|&h| (h as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                    return Err(BadPath::BadEscape);
                };
                let decoded = u8::try_from(hi * 16 + lo).expect("two hex digits");
                if decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) {
                    out.push(char::from(decoded));
                } else if b"/\\\0;%?#".contains(&decoded) {
                    return Err(BadPath::Encoded(decoded));
                } else {
                    out.push('%');
                    out.push_str(&path[i + 1..i + 3].to_ascii_uppercase());
                }
                i += 3;
            }
            b'\\' => return Err(BadPath::Backslash),
            b'/' if out.ends_with('/') => i += 1,
            _ => {
                // Copy up to the next byte that needs a look (whole UTF-8
                // sequences: those bytes are all >= 0x80).
                let end = bytes[i..]
                    .iter()
                    .position(|&c| c == b'%' || c == b'\\' || c == b'/')
                    .map_or(bytes.len(), |n| i + n.max(1));
                out.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    if has_dot_segment(&out) {
        return Err(BadPath::DotSegment);
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// `path` as a backend that takes `;` for the start of a segment's
/// parameters (Tomcat, Jetty) reads it: `/admin;x/secret` → `/admin/secret`.
/// Routing looks a path up in this form too, so a parameter cannot hide a
/// prefix.
pub(crate) fn without_params(path: &str) -> Cow<'_, str> {
    if !path.contains(';') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (n, segment) in path.split('/').enumerate() {
        if n > 0 {
            out.push('/');
        }
        out.push_str(segment.split(';').next().unwrap_or(""));
    }
    Cow::Owned(out)
}

/// Whether a path has a `.` or `..` segment, also percent-encoded
/// (`%2e`). Such paths are refused rather than normalised: a backend that
/// resolved `/public/../admin` itself would otherwise be reached through the
/// `/public` route, around `/admin`'s authentication.
pub(crate) fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(is_dot_segment)
}

/// `.` or `..`, each dot written as `.`, `%2e` or `%2E`. Checked on the
/// bytes: this runs on every request, and allocates nothing.
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() && dots < 3 {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return false,
        };
        dots += 1;
    }
    rest.is_empty() && (dots == 1 || dots == 2)
}

/// Whether `path` is under `prefix` (normalised) on a segment boundary.
pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The backend path of `path_and_query` under `prefix`: `/api/x?q` →
/// `/x?q`, `/api` → `/`, `/api?q` → `/?q`.
pub(crate) fn strip(prefix: &str, path_and_query: &str) -> String {
    if prefix == "/" {
        return path_and_query.to_owned();
    }
    let rest = path_and_query
        .strip_prefix(prefix)
        .unwrap_or(path_and_query);
    if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    }
}

/// A compiled route: the route's settings, its counters and its instances'
/// shared state.
#[derive(Debug)]
pub(crate) struct RouteEntry {
    pub host: String,
    pub prefix: String,
    pub strip_prefix: bool,
    pub auth: Vec<(String, String)>,
    pub backends: Vec<Arc<InstanceState>>,
    pub counters: Arc<RouteCounters>,
}

/// The compiled table: host → routes, longest prefix first.
#[derive(Debug, Default)]
pub(crate) struct Table {
    pub hosts: HashMap<String, Vec<Arc<RouteEntry>>>,
    /// In the order the master gave them, for snapshots.
    pub order: Vec<Arc<RouteEntry>>,
}

impl Table {
    /// The route for a normalised host and a request path.
    pub fn lookup(&self, host: &str, path: &str) -> Lookup<'_> {
        match self.hosts.get(host) {
            None => Lookup::UnknownHost,
            Some(routes) => routes
                .iter()
                .find(|r| prefix_matches(&r.prefix, path))
                .map_or(Lookup::NoPrefix, Lookup::Found),
        }
    }
}

pub(crate) enum Lookup<'a> {
    Found(&'a Arc<RouteEntry>),
    UnknownHost,
    NoPrefix,
}

/// Key of an instance's shared state.
pub(crate) type InstanceKey = (String, SocketAddr);

/// Checks `routes` and compiles it, reusing the instance states and route
/// counters of `instances` and `counters` (the previous table's) so that
/// counters and in-flight requests carry over.
pub(crate) fn compile(
    routes: &Routes,
    instances: &HashMap<InstanceKey, Arc<InstanceState>>,
    counters: &HashMap<(String, String), Arc<RouteCounters>>,
    idle: &Arc<Notify>,
) -> Result<Compiled, RouteError> {
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut table = Table::default();
    let mut states: HashMap<InstanceKey, Arc<InstanceState>> = HashMap::new();
    // Health and draining as the new table says; an instance listed by
    // several routes is healthy only if every listing says so.
    let mut flags: HashMap<InstanceKey, (bool, bool)> = HashMap::new();
    for (index, route) in routes.routes.iter().enumerate() {
        let host = normalize_host(&route.host)
            .ok_or_else(|| RouteError::BadHost {
                index,
                host: route.host.clone(),
            })?
            .into_owned();
        let prefix = normalize_prefix(&route.path_prefix).ok_or_else(|| RouteError::BadPrefix {
            index,
            host: host.clone(),
            prefix: route.path_prefix.clone(),
        })?;
        if let Some(&first) = seen.get(&(host.clone(), prefix.clone())) {
            return Err(RouteError::Duplicate {
                index,
                first,
                host,
                prefix,
            });
        }
        seen.insert((host.clone(), prefix.clone()), index);
        for (user, hash) in &route.auth {
            let problem = if user.is_empty() || user.contains(':') {
                Some("the user is empty or holds ':'")
            } else if !is_bcrypt(hash) {
                Some("the hash is not bcrypt ($2a$, $2b$ or $2y$, 60 characters)")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(RouteError::BadAuth {
                    index,
                    host,
                    user: user.clone(),
                    problem,
                });
            }
        }
        let mut backends = Vec::with_capacity(route.instances.len());
        for instance in &route.instances {
            let key = (instance.id.clone(), instance.addr);
            let state = states
                .entry(key.clone())
                .or_insert_with(|| {
                    instances.get(&key).cloned().unwrap_or_else(|| {
                        Arc::new(InstanceState::new(
                            &instance.id,
                            instance.addr,
                            idle.clone(),
                        ))
                    })
                })
                .clone();
            let flag = flags.entry(key).or_insert((true, false));
            flag.0 &= instance.healthy;
            flag.1 |= instance.draining;
            if !backends.iter().any(|b| Arc::ptr_eq(b, &state)) {
                backends.push(state);
            }
        }
        let counters = counters
            .get(&(host.clone(), prefix.clone()))
            .cloned()
            .unwrap_or_default();
        let entry = Arc::new(RouteEntry {
            host: host.clone(),
            prefix,
            strip_prefix: route.strip_prefix,
            auth: route.auth.clone(),
            backends,
            counters,
        });
        table.order.push(entry.clone());
        table.hosts.entry(host).or_default().push(entry);
    }
    for routes in table.hosts.values_mut() {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    }
    Ok(Compiled {
        table,
        states,
        flags,
    })
}

/// A compiled table and what applying it changes.
pub(crate) struct Compiled {
    pub table: Table,
    pub states: HashMap<InstanceKey, Arc<InstanceState>>,
    /// `(healthy, draining)` per instance of the new table.
    pub flags: HashMap<InstanceKey, (bool, bool)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(port: u16) -> Instance {
        Instance::new("svc", SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn table(routes: Vec<Route>) -> Table {
        compile(
            &Routes { routes },
            &HashMap::new(),
            &HashMap::new(),
            &Arc::default(),
        )
        .unwrap()
        .table
    }

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(
            normalize_host("Example.COM").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            normalize_host("example.com:8080").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            normalize_host("example.com.").as_deref(),
            Some("example.com")
        );
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("127.0.0.1:80").as_deref(), Some("127.0.0.1"));
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host("a b"), None);
        assert_eq!(normalize_host("a/b"), None);
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/ap"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn strip_keeps_an_absolute_path_and_the_query() {
        assert_eq!(strip("/api", "/api/x"), "/x");
        assert_eq!(strip("/api", "/api"), "/");
        assert_eq!(strip("/api", "/api?q=1"), "/?q=1");
        assert_eq!(strip("/api", "/api/x?q=1"), "/x?q=1");
        assert_eq!(strip("/", "/x?q"), "/x?q");
    }

    #[test]
    fn dot_segments_are_found_also_encoded() {
        assert!(has_dot_segment("/a/../b"));
        assert!(has_dot_segment("/a/%2E%2e/b"));
        assert!(has_dot_segment("/a/."));
        assert!(!has_dot_segment("/a/..b/c"));
        assert!(!has_dot_segment("/a/.well-known/x"));
        assert!(has_dot_segment("/a/%2e."));
        assert!(has_dot_segment(".."));
        assert!(!has_dot_segment("/a/.../b"));
        assert!(!has_dot_segment("/a/%2e%2e%2e"));
        assert!(!has_dot_segment("/a/%2/b"));
        assert!(!has_dot_segment("/a/%2f/b"));
        assert!(!has_dot_segment("/a//b/"));
    }

    #[test]
    fn paths_are_cleaned_into_one_form_or_refused() {
        let clean = |p: &str| clean_path(p).map(|c| c.into_owned());
        // Already clean: borrowed, no allocation.
        for p in ["/", "/admin/secret", "/a/..b/c", "/caf\u{e9}/x", "/a;b=c/d"] {
            assert!(matches!(clean_path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        // What a backend would read the same as `/admin/secret`.
        for p in [
            "//admin/secret",
            "/admin//secret",
            "///admin///secret",
            "/%61dmin/secret",
            "/%41%44%4D%49%4E/secret",
        ] {
            let want = if p.contains("%4") {
                "/ADMIN/secret"
            } else {
                "/admin/secret"
            };
            assert_eq!(clean(p), Ok(want.to_owned()), "{p}");
        }
        assert_eq!(clean("/a/%7e%2D%5f"), Ok("/a/~-_".to_owned()));
        // Other escapes stay, upper-cased; UTF-8 passes through.
        assert_eq!(clean("/a%20b/%c3%a9"), Ok("/a%20b/%C3%A9".to_owned()));
        assert_eq!(clean("/caf\u{e9}//x"), Ok("/caf\u{e9}/x".to_owned()));
        // Refused: what backends decode each in their own way.
        for (p, why) in [
            ("/admin%2fsecret", BadPath::Encoded(b'/')),
            ("/%2Fadmin/secret", BadPath::Encoded(b'/')),
            ("/x/..%2fadmin", BadPath::Encoded(b'/')),
            ("/a%5cb", BadPath::Encoded(b'\\')),
            ("/a%00", BadPath::Encoded(0)),
            ("/admin%3bx/secret", BadPath::Encoded(b';')),
            ("/a%252e%252e/b", BadPath::Encoded(b'%')),
            ("/a%3f", BadPath::Encoded(b'?')),
            ("/a%23", BadPath::Encoded(b'#')),
            ("/a%zz", BadPath::BadEscape),
            ("/a%2", BadPath::BadEscape),
            ("/a\\b", BadPath::Backslash),
            ("/x/%2e%2e/admin", BadPath::DotSegment),
            ("/x//../admin", BadPath::DotSegment),
            ("/x/%2E", BadPath::DotSegment),
            ("/x/..", BadPath::DotSegment),
        ] {
            assert_eq!(clean(p), Err(why), "{p}");
        }
    }

    #[test]
    fn parameters_are_taken_off_each_segment_for_the_lookup() {
        assert!(matches!(
            without_params("/admin/x"),
            Cow::Borrowed("/admin/x")
        ));
        assert_eq!(without_params("/admin;x/secret"), "/admin/secret");
        assert_eq!(without_params("/a;b=c;d/e;f"), "/a/e");
        assert_eq!(without_params("/;x"), "/");
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(vec![
            Route::new("a.example", vec![inst(1)]),
            Route::new("a.example", vec![inst(2)]).at("/api/"),
            Route::new("a.example", vec![inst(3)]).at("/api/v2"),
        ]);
        let found = |path| match t.lookup("a.example", path) {
            Lookup::Found(r) => r.prefix.clone(),
            _ => "none".into(),
        };
        assert_eq!(found("/api/v2/x"), "/api/v2");
        assert_eq!(found("/api/v2"), "/api/v2");
        assert_eq!(found("/api/v20"), "/api");
        assert_eq!(found("/api"), "/api");
        assert_eq!(found("/apix"), "/");
        assert!(matches!(t.lookup("b.example", "/"), Lookup::UnknownHost));
    }

    #[test]
    fn a_host_without_root_route_has_no_match_elsewhere() {
        let t = table(vec![Route::new("a.example", vec![inst(1)]).at("/api")]);
        assert!(matches!(t.lookup("a.example", "/other"), Lookup::NoPrefix));
    }

    #[test]
    fn bad_tables_are_refused_with_the_route_named() {
        let refuse = |routes| {
            compile(
                &Routes { routes },
                &HashMap::new(),
                &HashMap::new(),
                &Arc::default(),
            )
            .err()
        };
        assert!(matches!(
            refuse(vec![Route::new("a b", vec![])]),
            Some(RouteError::BadHost { index: 0, .. })
        ));
        assert!(matches!(
            refuse(vec![Route::new("a", vec![]).at("api")]),
            Some(RouteError::BadPrefix { .. })
        ));
        assert!(matches!(
            refuse(vec![Route::new("a", vec![]).at("/x/../y")]),
            Some(RouteError::BadPrefix { .. })
        ));
        assert!(matches!(
            refuse(vec![
                Route::new("A", vec![]),
                Route::new("a.", vec![]).at("/")
            ]),
            Some(RouteError::Duplicate {
                index: 1,
                first: 0,
                ..
            })
        ));
        let mut r = Route::new("a", vec![]);
        r.auth = vec![("bob".into(), "plain".into())];
        let err = refuse(vec![r]).unwrap();
        assert!(matches!(err, RouteError::BadAuth { .. }));
        assert!(!err.to_string().contains("plain"));
    }

    #[test]
    fn htpasswd_lines_split_and_never_echo_the_hash() {
        let hash = "$2y$05$abcdefghijklmnopqrstuuQ5H1Lw6NnHcj4D6DpJqj4Hs4dp0wKyS";
        assert_eq!(hash.len(), 60);
        let (u, h) = parse_htpasswd(&format!("alice:{hash}\n")).unwrap();
        assert_eq!((u.as_str(), h.as_str()), ("alice", hash));
        let err = parse_htpasswd("alice:{SHA}abc").unwrap_err();
        assert!(!err.to_string().contains("abc"), "{err}");
        assert!(parse_htpasswd("nocolon").is_err());
    }

    #[test]
    fn states_carry_over_and_flags_combine() {
        let a = inst(1);
        let first = compile(
            &Routes {
                routes: vec![Route::new("a", vec![a.clone()])],
            },
            &HashMap::new(),
            &HashMap::new(),
            &Arc::default(),
        )
        .unwrap();
        let mut drained = a.clone();
        drained.draining = true;
        let second = compile(
            &Routes {
                routes: vec![
                    Route::new("a", vec![a.clone()]),
                    Route::new("b", vec![drained]),
                ],
            },
            &first.states,
            &HashMap::new(),
            &Arc::default(),
        )
        .unwrap();
        let key = (a.id.clone(), a.addr);
        assert!(Arc::ptr_eq(&first.states[&key], &second.states[&key]));
        assert_eq!(second.flags[&key], (true, true));
    }
}
