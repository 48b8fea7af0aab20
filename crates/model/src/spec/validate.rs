//! The validation pass: a [`RawSpec`] whose fields have the right shapes
//! becomes a [`Spec`], or every reason it cannot.
//!
//! This pass knows nothing of formats: a raw spec read from JSON, or built by
//! an importer, is judged by the same rules. It reports every problem of the
//! spec, each naming its field; the caller names the spec. Rules that need
//! the cluster (does the machine exist, is the address free) are the
//! master's.

use std::collections::HashMap;
use std::net::Ipv6Addr;

use super::raw::{RawSpec, Size};
use super::{DEFAULT_PROXYPORT, Duration, Kind, MAX_ARGS_ENV_BYTES, RESERVED_ENV, Spec, SpecError};
use crate::net;

/// The smallest memory limit: less than this and a service cannot even start.
const MIN_MEMORY: u64 = 4 << 20;

/// The accepted CPU limits, in cores.
const CPUS: std::ops::RangeInclusive<f64> = 0.01..=1024.0;

const MEMORY_EXPECTED: &str = "a size of at least 4M, like \"512M\", \"2G\" or a number of bytes";
const CPUS_EXPECTED: &str = "a number of cores from 0.01 up, like 0.5 or 2";

/// Checks a raw spec and fills in defaults.
///
/// The errors name their field but not the spec: the caller knows which
/// spec of its file this is (see [`SpecError::at`]).
pub fn validate(raw: RawSpec) -> Result<Spec, Vec<SpecError>> {
    let mut errs = Vec::new();
    let mut err = |field: &str, reason: String| errs.push(SpecError::new(Some(field), reason));

    let machine = text(&mut err, "machine", raw.machine, true);
    let name = text(&mut err, "name", raw.name, true);
    let image = text(&mut err, "image", raw.image, true);
    let kind = text(&mut err, "type", raw.kind, true).and_then(|k| match k.as_str() {
        "binary" => Some(Kind::Binary),
        "docker" => Some(Kind::Docker),
        "vm" => Some(Kind::Vm),
        other => {
            err(
                "type",
                format!("{other:?} is not a type; use \"binary\", \"docker\" or \"vm\""),
            );
            None
        }
    });
    let duration = text(&mut err, "duration", raw.duration, false).and_then(|d| match d.as_str() {
        "daemon" => Some(Duration::Daemon),
        "oneshot" => Some(Duration::Oneshot),
        other => {
            err(
                "duration",
                format!("{other:?} is not a duration; use \"daemon\" or \"oneshot\""),
            );
            None
        }
    });
    let proxyname = text(&mut err, "proxyname", raw.proxyname, false);
    let proxypath = text(&mut err, "proxypath", raw.proxypath, false);
    let healthcheck = text(&mut err, "healthcheck", raw.healthcheck, false);
    let ip = text(&mut err, "ip", raw.ip, false).and_then(|s| match check_ip(&s) {
        Ok(ip) => Some(ip),
        Err(r) => {
            err("ip", r);
            None
        }
    });
    let memory = raw.memory.and_then(|size| {
        match size.bytes() {
            Some(b) if b >= MIN_MEMORY => return Some(b),
            _ => err(
                "memory",
                format!("expected {MEMORY_EXPECTED}, got {}", size.describe()),
            ),
        }
        None
    });
    let cpus = raw.cpus.and_then(|c| {
        if CPUS.contains(&c) {
            return Some(c);
        }
        err(
            "cpus",
            format!("expected {CPUS_EXPECTED}, got a number {c}"),
        );
        None
    });

    if let Some(m) = &machine {
        check_hostname_label(m).unwrap_or_else(|r| err("machine", r));
    }
    if let Some(n) = &name {
        check_hostname_label(n).unwrap_or_else(|r| err("name", r));
    }
    if let Some(i) = &image {
        check_image_name(i).unwrap_or_else(|r| err("image", r));
    }
    for (i, entry) in raw.env.iter().enumerate() {
        check_env(entry).unwrap_or_else(|r| err(&format!("env[{i}]"), r));
    }
    for (i, file) in raw.env_file.iter().enumerate() {
        let field = format!("env_file[{i}]");
        super::env_file::check_env_file_path(&file.path).unwrap_or_else(|r| err(&field, r));
        for entry in file.env.iter().flatten() {
            check_env(entry).unwrap_or_else(|r| err(&field, format!("{}: {r}", file.path)));
        }
    }
    for (i, arg) in raw.args.iter().enumerate() {
        if arg.contains('\0') {
            err(
                &format!("args[{i}]"),
                "holds a NUL byte, which a process argument cannot".into(),
            );
        }
    }
    let exec_bytes = exec_bytes(&raw.args, &raw.env);
    if exec_bytes > MAX_ARGS_ENV_BYTES {
        err(
            if raw.args.is_empty() { "env" } else { "args" },
            format!(
                "args and env together take {exec_bytes} bytes; at most {MAX_ARGS_ENV_BYTES} \
                 (128 KiB) are allowed, to stay well under the kernel's limit for a new process"
            ),
        );
    }
    if let Some(p) = &proxyname {
        check_domain(p).unwrap_or_else(|r| err("proxyname", r));
    }
    if let Some(p) = &proxypath {
        check_proxypath(p).unwrap_or_else(|r| err("proxypath", r));
        if proxyname.is_none() {
            err(
                "proxypath",
                "a path is routed under a host name: set `proxyname` too".into(),
            );
        }
    }
    let mut users: HashMap<&str, usize> = HashMap::new();
    for (i, entry) in raw.proxyauth.iter().enumerate() {
        // The entry itself is never repeated: it holds a password hash.
        check_proxyauth(entry).unwrap_or_else(|r| err(&format!("proxyauth[{i}]"), r));
        // A second entry for a user would never be used (the first
        // matching user decides), so its password would not work.
        if let Some((user, _)) = entry.split_once(':')
            && let Some(first) = users.insert(user, i)
        {
            err(
                &format!("proxyauth[{i}]"),
                format!("user {user:?} is already in proxyauth[{first}]; one entry a user"),
            );
        }
    }
    if !raw.proxyauth.is_empty() && proxyname.is_none() {
        err(
            "proxyauth",
            "basic auth is asked of requests through the proxy: set `proxyname` too".into(),
        );
    }
    if let Some(h) = &healthcheck
        && (!h.starts_with('/') || h.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        err(
            "healthcheck",
            format!(
                "{h:?} is not a URL path; it must start with '/' and hold no spaces, e.g. \"/health\""
            ),
        );
    }
    for (i, l) in raw.link.iter().enumerate() {
        if let Err(r) = check_hostname_label(l) {
            err(&format!("link[{i}]"), r);
        } else if name.as_deref() == Some(l) {
            err(
                &format!("link[{i}]"),
                "a service need not link to itself".into(),
            );
        }
    }

    match (machine, name, image, kind) {
        (Some(machine), Some(name), Some(image), Some(kind)) if errs.is_empty() => Ok(Spec {
            machine,
            name,
            image,
            kind,
            duration: duration.unwrap_or_default(),
            env: raw.env,
            env_file: raw.env_file,
            proxyname,
            proxypath,
            proxyauth: raw.proxyauth,
            proxyport: raw.proxyport.unwrap_or(DEFAULT_PROXYPORT),
            healthcheck,
            ip,
            args: raw.args,
            link: raw.link,
            memory,
            cpus,
        }),
        // A required field that is absent has already been reported.
        _ => Err(errs),
    }
}

/// A text field: absent is fine unless `required`, empty never is.
fn text(
    err: &mut impl FnMut(&str, String),
    field: &str,
    value: Option<String>,
    required: bool,
) -> Option<String> {
    match value {
        None if required => {
            err(field, "required field is missing".into());
            None
        }
        Some(s) if s.is_empty() => {
            err(field, "must not be empty".into());
            None
        }
        other => other,
    }
}

/// What `args` and `env` take of the kernel's room for a new process: each
/// string and its terminating NUL.
fn exec_bytes(args: &[String], env: &[String]) -> usize {
    args.iter().chain(env).map(|s| s.len() + 1).sum()
}

fn check_ip(s: &str) -> Result<Ipv6Addr, String> {
    let Ok(ip) = s.parse::<Ipv6Addr>() else {
        return Err(format!("{s:?} is not an IPv6 address"));
    };
    if !net::in_cluster(ip) {
        return Err(format!(
            "{ip} is outside the cluster's range fd38:dde8:32dd::/48"
        ));
    }
    if net::in_node_range(ip) {
        return Err(format!(
            "{ip} is in fd38:dde8:32dd::/64, which is reserved for nodes"
        ));
    }
    Ok(ip)
}

impl Size {
    /// The size in bytes, if it is one.
    fn bytes(&self) -> Option<u64> {
        match self {
            Size::Bytes(b) => Some(*b),
            Size::Text(s) => parse_size(s),
        }
    }

    /// How the size was given, for error messages.
    fn describe(&self) -> String {
        match self {
            Size::Bytes(b) => format!("a number {b}"),
            Size::Text(s) => format!("a string {s:?}"),
        }
    }
}

/// `"512M"`, `"2G"`, `"64k"`, `"1000"` (bytes) → bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// A name that can be a hostname label (RFC 1123): 1 to 63 of `a-z`, `0-9`
/// and `-`, not starting or ending with `-`. Lowercase only, so that two
/// names never differ by case alone.
pub fn check_hostname_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!(
            "{s:?} is {} characters; a hostname label has at most 63",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{s:?} cannot be a hostname: {c:?} is not allowed (use a-z, 0-9 and '-')"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!(
            "{s:?} cannot be a hostname: it starts or ends with '-'"
        ));
    }
    Ok(())
}

/// An image is a file name in the registry: no path separators, not hidden.
pub fn check_image_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.contains('/') || s.starts_with('.') || s.len() > 255 {
        return Err(format!(
            "{s:?} is not an image name: it names a file in the registry, without '/' and not starting with '.'"
        ));
    }
    // A newline or other control character (NUL included) would break
    // every listing that shows the name, and no one types one on purpose.
    if s.chars().any(char::is_control) {
        return Err(format!(
            "{s:?} is not an image name: it holds a control character (a newline, a tab, NUL...)"
        ));
    }
    Ok(())
}

fn check_env(entry: &str) -> Result<(), String> {
    if entry.contains('\0') {
        return Err("holds a NUL byte, which an environment variable cannot".into());
    }
    let Some((key, _)) = entry.split_once('=') else {
        return Err(format!("{entry:?} is not of the form KEY=VALUE"));
    };
    let mut chars = key.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "{key:?} is not a variable name (letters, digits and '_', not starting with a digit)"
        ));
    }
    if RESERVED_ENV.contains(&key) {
        return Err(format!(
            "{key} is set by Phoenix for every service and cannot be overridden"
        ));
    }
    let value = &entry[key.len() + 1..];
    super::env_file::check_env_value(value)
}

/// A path prefix: `/`, then segments of URL path characters, no `.` or
/// `..` segment (also percent-encoded), no query, no fragment, no trailing `/` (but `/` itself).
fn check_proxypath(p: &str) -> Result<(), String> {
    let shape = "a URL path prefix such as \"/api\" or \"/app/v2\"";
    if !p.starts_with('/') {
        return Err(format!("{p:?} does not start with '/'; it must be {shape}"));
    }
    if p.len() > 1024 {
        return Err(format!("{} bytes long; at most 1024", p.len()));
    }
    if p == "/_phoenix" || p.starts_with("/_phoenix/") {
        return Err(format!(
            "{p:?} is under /_phoenix/, which the master's proxy keeps for itself (git webhooks) on every host; pick another prefix"
        ));
    }
    if p.len() > 1 && p.ends_with('/') {
        return Err(format!(
            "{p:?} ends with '/'; write it without, e.g. {:?}",
            p.trim_end_matches('/')
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,=:@%".contains(c);
    for seg in p[1..].split('/').filter(|_| p.len() > 1) {
        let why = if seg.is_empty() {
            "is empty ('//')".to_owned()
        } else if is_dot_segment(seg) {
            "is '.' or '..' (also percent-encoded), which could walk out of the prefix".to_owned()
        } else if seg.contains(';') {
            "holds ';', which starts a segment's parameters (the proxy routes a path as if they were not there)".to_owned()
        } else if let Some(c) = seg.chars().find(|&c| !allowed(c)) {
            format!("holds {c:?}, which a URL path needs percent-encoded")
        } else if let Some(why) = bad_escape(seg) {
            why
        } else {
            continue;
        };
        return Err(format!("{p:?} is not {shape}: segment {seg:?} {why}"));
    }
    Ok(())
}

/// What is wrong with a `%` escape in a prefix segment, if anything: the
/// proxy refuses request paths with a `%` not followed by two hex digits,
/// and with an encoded `/ \\ NUL ; % ? #`, so a prefix holding one could
/// never be reached (and the proxy refuses it).
fn bad_escape(seg: &str) -> Option<String> {
    let bytes = seg.as_bytes();
    for (i, _) in seg.match_indices('%') {
        let digits = bytes
            .get(i + 1..i + 3)
            .filter(|d| d.iter().all(u8::is_ascii_hexdigit));
        let Some(digits) = digits else {
            return Some("holds a '%' not followed by two hex digits".to_owned());
        };
        let code = std::str::from_utf8(digits).expect("hex digits");
        let byte = u8::from_str_radix(code, 16).expect("two hex digits");
        if b"/\\\0;%?#".contains(&byte) {
            return Some(format!(
                "holds %{code}, an encoded {:?}, which the proxy refuses in a request path",
                char::from(byte)
            ));
        }
    }
    None
}

/// `.` or `..`, each dot written as `.` or `%2e` (any case): the proxy
/// refuses a prefix with such a segment, and with it the whole route table
/// (every other service's routes too), so the spec must not get that far.
fn is_dot_segment(seg: &str) -> bool {
    let decoded = seg.to_ascii_lowercase().replace("%2e", ".");
    decoded == "." || decoded == ".."
}

/// `user:hash` with a bcrypt hash (`$2a$`, `$2b$` or `$2y$`, as `htpasswd
/// -B` writes). Messages never quote the entry: it holds a hash.
fn check_proxyauth(entry: &str) -> Result<(), String> {
    let Some((user, hash)) = entry.split_once(':') else {
        return Err("expected `user:bcrypt-hash` (as `htpasswd -nbB user password` prints)".into());
    };
    if user.is_empty() || user.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("the user name is empty or holds spaces or control characters".into());
    }
    // On bytes: a hash with a multibyte character must be refused, not
    // sliced inside that character (a panic).
    let h = hash.as_bytes();
    let bcrypt = h.len() == 60
        && ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p))
        && h[4..6].iter().all(u8::is_ascii_digit)
        && h[6] == b'$'
        && h[7..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/');
    if !bcrypt {
        return Err(format!(
            "the password of user {user:?} is not a bcrypt hash (60 characters starting $2y$, as `htpasswd -nbB user password` prints); plain passwords are not accepted"
        ));
    }
    // The cost is a power of two: every check of a password not yet
    // cached (a first login, any wrong one) takes 2^cost rounds on the
    // proxy's thread pool, about a second at 14 and hours at 31.
    let cost = u32::from(h[4] - b'0') * 10 + u32::from(h[5] - b'0');
    if !(MIN_BCRYPT_COST..=MAX_BCRYPT_COST).contains(&cost) {
        return Err(format!(
            "the bcrypt cost of user {user:?}'s hash is {cost}; {MIN_BCRYPT_COST} to {MAX_BCRYPT_COST} are accepted (each password check takes 2^cost rounds: 14 is about a second; `htpasswd -nbB` uses 5, `-C N` sets it)"
        ));
    }
    Ok(())
}

/// bcrypt's own lower bound.
const MIN_BCRYPT_COST: u32 = 4;
/// About a second a check: more would let each wrong password occupy the
/// proxy's hashing for seconds.
const MAX_BCRYPT_COST: u32 = 14;

fn check_domain(s: &str) -> Result<(), String> {
    let lower = s.to_ascii_lowercase();
    if s.len() > 253 || lower != s {
        return Err(format!(
            "{s:?} is not a lowercase domain name of at most 253 characters"
        ));
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err(format!(
                "{s:?} is not a domain name: it has an empty label (a leading or trailing '.', or '..'); write it without, e.g. {:?}",
                s.trim_matches('.')
            ));
        }
        check_hostname_label(label).map_err(|r| format!("{s:?} is not a domain name: {r}"))?;
    }
    // A name whose last label is a number (all digits, or 0x and hex
    // digits) is an IPv4 address to a browser (the WHATWG URL standard's
    // "ends in a number": `10.1`, `2130706433`, `x.0x7f`), and no
    // top-level domain is one (RFC 3696 §2): no certificate can be had
    // for it through HTTP-01.
    let last = s.rsplit('.').next().unwrap_or(s);
    let number = match last.strip_prefix("0x") {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => last.bytes().all(|b| b.is_ascii_digit()),
    };
    if number {
        return Err(format!(
            "{s:?} is an IP address or ends in a number, not a domain name: the proxy routes by host name and gets a certificate for it; point a DNS name at the master and use that"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> RawSpec {
        RawSpec {
            machine: Some("m1".into()),
            name: Some("web".into()),
            image: Some("testy".into()),
            kind: Some("binary".into()),
            ..RawSpec::default()
        }
    }

    #[test]
    fn proxy_paths_and_basic_auth() {
        let with = |path: Option<&str>, auth: Vec<&str>, name: Option<&str>| RawSpec {
            proxyname: name.map(Into::into),
            proxypath: path.map(Into::into),
            proxyauth: auth.into_iter().map(Into::into).collect(),
            ..minimal()
        };
        let hash = "$2y$05$abcdefghijklmnopqrstuu0123456789ABCDEFGHIJKLMNOPQRSTU";
        assert_eq!(hash.len(), 60);
        let ok = validate(with(
            Some("/api/v2"),
            vec![&format!("ann:{hash}")],
            Some("example.com"),
        ))
        .unwrap();
        assert_eq!(ok.proxypath.as_deref(), Some("/api/v2"));
        assert_eq!(ok.proxyauth.len(), 1);
        // One entry a user: a second one's password would never work.
        let twice = format!("ann:{hash}");
        let r = reasons(with(
            None,
            vec![&twice, &format!("bob:{hash}"), &twice],
            Some("example.com"),
        ));
        assert!(
            r.iter().any(|m| m.contains("field `proxyauth[2]`")
                && m.contains("user \"ann\" is already in proxyauth[0]")
                && !m.contains("$2y$")),
            "{r:?}"
        );
        assert!(validate(with(Some("/"), vec![], Some("example.com"))).is_ok());
        for (path, why) in [
            ("api", "does not start with '/'"),
            ("/api/", "ends with '/'"),
            ("/a//b", "segment"),
            ("/a/../b", "segment \"..\""),
            // Percent-encoded dots are dot segments too: the proxy refuses
            // such a prefix, and with it the whole route table.
            ("/a/%2e%2E", "segment \"%2e%2E\""),
            ("/%2e", "segment \"%2e\""),
            ("/a/.%2e/b", "segment \".%2e\""),
            ("/a?x=1", "segment"),
            ("/a b", "segment"),
            // What the proxy refuses in a request path, or routes as if
            // it were not there, could never be reached.
            ("/a;v=1", "starts a segment's parameters"),
            ("/a%2Fb", "encoded '/'"),
            ("/a%25", "encoded '%'"),
            ("/a%zz", "two hex digits"),
            ("/a%2", "two hex digits"),
            // The master's own requests: a service there would get only
            // `/_phoenix` itself, the rest going to the master.
            ("/_phoenix", "keeps for itself"),
            ("/_phoenix/git", "keeps for itself"),
        ] {
            let r = reasons(with(Some(path), vec![], Some("example.com")));
            assert!(
                r.iter()
                    .any(|m| m.contains("field `proxypath`") && m.contains(why)),
                "{path}: {r:?}"
            );
        }
        let r = reasons(with(None, vec![], Some("example.com.")));
        assert!(
            r.iter().any(|m| m.contains("field `proxyname`")
                && m.contains("empty label")
                && m.contains("\"example.com\"")),
            "{r:?}"
        );
        for ip in [
            "192.0.2.10",
            "10.1",
            "web.123",
            "2130706433",
            "x.0x7f",
            "a.0x",
        ] {
            let r = reasons(with(None, vec![], Some(ip)));
            assert!(
                r.iter()
                    .any(|m| m.contains("field `proxyname`") && m.contains("not a domain name")),
                "{ip}: {r:?}"
            );
        }
        for fine in [
            "localhost",
            "app.example.com",
            "1.example.com",
            "web.x1",
            "web.0xg",
            "0x1.io",
        ] {
            assert!(validate(with(None, vec![], Some(fine))).is_ok(), "{fine}");
        }
        let r = reasons(with(Some("/api"), vec![], None));
        assert!(r.iter().any(|m| m.contains("set `proxyname` too")), "{r:?}");
        let r = reasons(with(None, vec!["ann:secret", "bob"], Some("example.com")));
        assert!(
            r.iter()
                .any(|m| m.contains("proxyauth[0]") && m.contains("not a bcrypt hash")),
            "{r:?}"
        );
        assert!(
            r.iter()
                .any(|m| m.contains("proxyauth[1]") && m.contains("user:bcrypt-hash")),
            "{r:?}"
        );
        assert!(
            !r.iter().any(|m| m.contains("secret")),
            "a password is never repeated: {r:?}"
        );
    }

    fn reasons(raw: RawSpec) -> Vec<String> {
        validate(raw)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_proxyauth_hash_costing_more_than_14_is_refused() {
        let entry = |user: &str, cost: &str| format!("{user}:$2y${cost}${}", "a".repeat(53));
        let r = reasons(RawSpec {
            proxyname: Some("example.com".into()),
            proxyauth: vec![entry("ann", "14"), entry("bob", "31"), entry("cat", "03")],
            ..minimal()
        });
        assert!(!r.iter().any(|m| m.contains("proxyauth[0]")), "{r:?}");
        for (i, user, cost) in [(1, "bob", "31"), (2, "cat", "3")] {
            assert!(
                r.iter().any(|m| m.contains(&format!("proxyauth[{i}]"))
                    && m.contains(&format!("cost of user \"{user}\"'s hash is {cost};"))),
                "{r:?}"
            );
        }
    }

    #[test]
    fn a_proxyauth_hash_with_multibyte_characters_is_refused_not_a_panic() {
        // 60 bytes starting "$2y$", with a two-byte character where the
        // cost and its '$' are looked at.
        for hash in [
            format!("$2y$0\u{e9}{}", "a".repeat(53)),
            format!("$2y$05\u{e9}{}", "a".repeat(52)),
        ] {
            assert_eq!(hash.len(), 60);
            let r = reasons(RawSpec {
                proxyname: Some("example.com".into()),
                proxyauth: vec![format!("ann:{hash}")],
                ..minimal()
            });
            assert!(
                r.iter()
                    .any(|m| m.contains("proxyauth[0]") && m.contains("not a bcrypt hash")),
                "{r:?}"
            );
        }
    }

    #[test]
    fn a_raw_spec_from_an_importer_is_validated_without_any_format() {
        let spec = validate(RawSpec {
            memory: Some(Size::Text("512M".into())),
            cpus: Some(1.5),
            ..minimal()
        })
        .unwrap();
        assert_eq!(spec.memory, Some(512 << 20));
        assert_eq!(spec.cpus, Some(1.5));
        assert_eq!(spec.proxyport, DEFAULT_PROXYPORT);
    }

    #[test]
    fn binaries_take_limits_now() {
        let spec = validate(RawSpec {
            memory: Some(Size::Bytes(64 << 20)),
            cpus: Some(0.25),
            ..minimal()
        })
        .unwrap();
        assert_eq!((spec.memory, spec.cpus), (Some(64 << 20), Some(0.25)));
    }

    #[test]
    fn limits_out_of_range() {
        let all = reasons(RawSpec {
            memory: Some(Size::Bytes(1000)),
            cpus: Some(5000.0),
            ..minimal()
        })
        .join("\n");
        assert!(
            all.contains("field `memory`: expected a size of at least 4M, like \"512M\", \"2G\" or a number of bytes, got a number 1000"),
            "{all}"
        );
        assert!(
            all.contains("field `cpus`: expected a number of cores from 0.01 up, like 0.5 or 2, got a number 5000"),
            "{all}"
        );
        let all = reasons(RawSpec {
            memory: Some(Size::Text("lots".into())),
            ..minimal()
        })
        .join("\n");
        assert!(all.contains("got a string \"lots\""), "{all}");
    }

    #[test]
    fn nul_bytes_are_refused_by_index() {
        let all = reasons(RawSpec {
            env: vec!["A=1".into(), "B=x\0y".into()],
            args: vec!["ok".into(), "also".into(), "b\0d".into()],
            ..minimal()
        })
        .join("\n");
        assert!(all.contains("field `env[1]`: holds a NUL byte"), "{all}");
        assert!(all.contains("field `args[2]`: holds a NUL byte"), "{all}");
        assert!(!all.contains("env[0]") && !all.contains("args[0]"), "{all}");
    }

    #[test]
    fn args_and_env_share_one_limit() {
        // Each half fits; together they do not.
        let half = "x".repeat(MAX_ARGS_ENV_BYTES / 2);
        let all = reasons(RawSpec {
            env: vec![format!("A={half}")],
            args: vec![half.clone()],
            ..minimal()
        })
        .join("\n");
        let expected = format!(
            "field `args`: args and env together take {} bytes; at most 131072 (128 KiB)",
            2 * half.len() + 4
        );
        assert!(all.contains(&expected), "{all}");
        assert!(
            validate(RawSpec {
                args: vec![half],
                ..minimal()
            })
            .is_ok()
        );
    }

    #[test]
    fn empty_and_missing_are_told_apart() {
        let all = reasons(RawSpec {
            name: Some(String::new()),
            healthcheck: Some(String::new()),
            machine: None,
            ..minimal()
        })
        .join("\n");
        assert!(
            all.contains("field `machine`: required field is missing"),
            "{all}"
        );
        assert!(all.contains("field `name`: must not be empty"), "{all}");
        assert!(
            all.contains("field `healthcheck`: must not be empty"),
            "{all}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size(" 3 M "), Some(3 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("99999999999G"), None);
        assert_eq!(parse_size(""), None);
    }
}
