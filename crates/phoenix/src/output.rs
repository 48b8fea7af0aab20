//! Tables and times for people.

use phoenix_model::status::now_ms;

/// Prints rows under a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render(header, rows));
}

pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 < widths.len() {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            } else {
                s.push_str(c);
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(&mut header.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

/// The services table of `phoenix services` (and the demo). A `?` after the
/// state marks the last known state of a service whose machine is unreachable.
pub fn services_table(list: &[phoenix_model::proto::ServiceView]) {
    print!("{}", services_text(list));
}

/// What `phoenix services` says when there is nothing to list.
pub const NO_SERVICES: &str =
    "no services; deploy one with `phoenix deploy SPEC.json` (README: \"Run something\")\n";
/// What `phoenix nodes` says when no machine has joined.
pub const NO_NODES: &str = "no machines have joined; on each machine run \
    `phoenix minion NAME ...` (the command is in `phoenix master-info`), \
    then `phoenix waiting` and `phoenix accept NAME` here\n";
/// What `phoenix waiting` says when no join request waits.
pub const NO_WAITING: &str = "no machines are waiting to join; start one with \
    `phoenix minion NAME ...` (the command is in `phoenix master-info`)\n";

/// A short image hash, as tables show it.
pub fn short_hash(hash: &str) -> String {
    hash.chars().take(12).collect()
}

/// The image version a service runs: `app@3f2a9c1b0d4e`, with a `*` when
/// the registry holds a newer version it does not run yet.
pub fn image_version(v: &phoenix_model::proto::ServiceView) -> String {
    if v.image_hash.is_empty() {
        return v.image.clone();
    }
    let newer = if v.registry_hash.is_some() { "*" } else { "" };
    format!("{}@{}{newer}", v.image, short_hash(&v.image_hash))
}

/// `status`'s image line: the version, when it was pushed, and how to run
/// a newer one.
pub fn image_detail(v: &phoenix_model::proto::ServiceView) -> String {
    let mut s = v.image.clone();
    if !v.image_hash.is_empty() {
        s.push_str(&format!(" (version {}", short_hash(&v.image_hash)));
        if let Some(at) = v.image_pushed_at {
            s.push_str(&format!(", pushed {}", ago(at)));
        }
        s.push(')');
    }
    if let Some(newer) = &v.registry_hash {
        s.push_str(&format!(
            "; the registry holds a newer version {}: `phoenix restart {}` runs it",
            short_hash(newer),
            v.name
        ));
    }
    s
}

/// `status`'s links line: the names in the spec's `link` that no service
/// has (deleted since), or None when every link resolves.
pub fn dangling_links(v: &phoenix_model::proto::ServiceView) -> Option<String> {
    if v.dangling_links.is_empty() {
        return None;
    }
    let names: Vec<String> = v
        .dangling_links
        .iter()
        .map(|n| format!("{n} (no such service)"))
        .collect();
    Some(names.join(", "))
}

/// The fields an audited change touched, one line each: `+ field: value`
/// (added), `- field: value` (removed), `~ field: old -> new` (changed).
/// Values are compact JSON; a change without a before or after lists all
/// of its fields as added or removed.
pub fn audit_changes(
    old: Option<&serde_json::Value>,
    new: Option<&serde_json::Value>,
) -> Vec<String> {
    use serde_json::{Map, Value};
    let empty = Map::new();
    let fields = |v: Option<&Value>| -> Option<Map<String, Value>> {
        match v {
            None => Some(empty.clone()),
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => None,
        }
    };
    let (Some(before), Some(after)) = (fields(old), fields(new)) else {
        // Not objects: show them whole.
        let show = |v: Option<&Value>| v.map_or_else(|| "-".into(), Value::to_string);
        return vec![format!("~ {} -> {}", show(old), show(new))];
    };
    let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|k| match (before.get(k), after.get(k)) {
            (None, Some(b)) => Some(format!("+ {k}: {b}")),
            (Some(a), None) => Some(format!("- {k}: {a}")),
            (Some(a), Some(b)) if a != b => Some(format!("~ {k}: {a} -> {b}")),
            _ => None,
        })
        .collect()
}

/// [`services_table`] as text.
pub fn services_text(list: &[phoenix_model::proto::ServiceView]) -> String {
    let dash = || "-".to_owned();
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.machine.clone(),
                if v.node_reachable {
                    v.state.clone()
                } else {
                    format!("{}?", v.state)
                },
                v.pid.map_or_else(dash, |p| p.to_string()),
                v.restarts.to_string(),
                v.health.clone(),
                v.ip.to_string(),
                image_version(v),
                v.last_exit.map_or_else(dash, |e| e.to_string()),
            ]
        })
        .collect();
    let mut out = render(
        &[
            "NAME",
            "MACHINE",
            "STATE",
            "PID",
            "RESTARTS",
            "HEALTH",
            "IP",
            "IMAGE",
            "LAST EXIT",
        ],
        &rows,
    );
    if list.iter().any(|v| v.registry_hash.is_some()) {
        out.push_str(
            "* a newer version of the image is in the registry: \
             `phoenix restart NAME` (or `phoenix update`) runs it\n",
        );
    }
    out
}

/// `phoenix images`: one row per image, then why any node failed.
pub fn images_table(list: &[phoenix_model::proto::ImageView]) {
    print!("{}", images_text(list));
}

/// [`images_table`] as text.
pub fn images_text(list: &[phoenix_model::proto::ImageView]) -> String {
    if list.is_empty() {
        return "no images; add one with `phoenix push FILE [NAME]` or copy it into the registry folder\n".into();
    }
    let mut failures = Vec::new();
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let nodes: Vec<String> = i
                .nodes
                .iter()
                .map(|n| {
                    if let Some(e) = &n.error {
                        failures.push(format!("{} on {}: {e}", i.name, n.node));
                    }
                    match n.state.as_str() {
                        "syncing" if n.total > 0 => {
                            format!("{} syncing {}%", n.node, n.done * 100 / n.total)
                        }
                        state => format!("{} {state}", n.node),
                    }
                })
                .collect();
            vec![
                i.name.clone(),
                bytes(i.size),
                i.chunks.to_string(),
                bytes(i.unique_bytes),
                short_hash(&i.hash),
                if nodes.is_empty() {
                    "-".into()
                } else {
                    nodes.join(", ")
                },
            ]
        })
        .collect();
    let mut out = render(
        &["NAME", "SIZE", "CHUNKS", "UNIQUE", "HASH", "NODES"],
        &rows,
    );
    for f in failures {
        out.push_str(&f);
        out.push('\n');
    }
    out
}

/// "3s ago", "5m ago", "2h ago", "4d ago".
pub fn ago(ms: u64) -> String {
    let secs = now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// UTC time as `2026-11-21 22:15:39`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day), after Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Bytes as "512 B", "3.2 MiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `phoenix routes` as text: a table of routes and instances, then a line
/// per host about its certificate.
pub fn routes_text(view: &phoenix_model::proto::RoutesView) -> String {
    let mut out = String::new();
    match &view.proxy {
        None => out.push_str("the proxy is off (--no-proxy)\n"),
        Some(p) => {
            out.push_str(&format!(
                "proxy: http :{}, https :{}, {} connections\n",
                p.http_port, p.https_port, p.connections
            ));
            if let Some(e) = &p.acme_error {
                out.push_str(&format!("no certificates: {e}\n"));
            }
        }
    }
    if view.routes.is_empty() {
        out.push_str("no routes: give a service a \"proxyname\"\n");
        return out;
    }
    let mut rows = Vec::new();
    for r in &view.routes {
        let route = format!(
            "{}{}{}",
            r.host,
            if r.path == "/" { "" } else { &r.path },
            if r.auth { " (auth)" } else { "" }
        );
        for (i, inst) in r.instances.iter().enumerate() {
            rows.push(vec![
                if i == 0 { route.clone() } else { String::new() },
                inst.service.clone(),
                inst.machine.clone(),
                inst.addr.to_string(),
                match (inst.up, inst.down_for_ms) {
                    (false, _) => "down".to_owned(),
                    (true, Some(ms)) => format!("failing (retry in {ms} ms)"),
                    (true, None) => "up".to_owned(),
                },
                inst.outstanding.to_string(),
                inst.requests.to_string(),
                inst.failures.to_string(),
            ]);
        }
    }
    out.push_str(&render(
        &[
            "ROUTE",
            "SERVICE",
            "MACHINE",
            "ADDRESS",
            "STATE",
            "IN FLIGHT",
            "REQUESTS",
            "FAILED",
        ],
        &rows,
    ));
    let mut hosts: Vec<&phoenix_model::proto::RouteView> = view.routes.iter().collect();
    hosts.dedup_by(|a, b| a.host == b.host);
    for r in hosts {
        let line = match &r.certificate {
            None => "no certificate".to_owned(),
            Some(c) => {
                let mut parts = Vec::new();
                if let Some(t) = c.not_after {
                    parts.push(format!("certificate valid until {} UTC", utc(t)));
                } else {
                    parts.push("no certificate yet".to_owned());
                }
                if let Some(e) = &c.last_error {
                    parts.push(format!("last ACME error: {e}"));
                }
                if let Some(t) = c.next_attempt {
                    parts.push(format!("next order {} UTC", utc(t)));
                }
                parts.join("; ")
            }
        };
        out.push_str(&format!("{}: {line}\n", r.host));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_795_299_339_000), "2026-11-21 22:15:39");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(
            render(&["NAME", "STATE"], &[vec!["web".into(), "running".into()]]),
            "NAME  STATE\nweb   running\n"
        );
    }

    #[test]
    fn audit_shows_only_the_fields_a_change_touched() {
        let old =
            serde_json::json!({"name": "web", "env": ["A=1"], "proxyport": 8000, "args": ["-v"]});
        let new =
            serde_json::json!({"name": "web", "env": ["A=2"], "proxyport": 8000, "cpus": 0.5});
        assert_eq!(
            audit_changes(Some(&old), Some(&new)),
            [
                r#"- args: ["-v"]"#,
                "+ cpus: 0.5",
                r#"~ env: ["A=1"] -> ["A=2"]"#,
            ]
        );
        assert_eq!(
            audit_changes(None, Some(&serde_json::json!({"name": "web"}))),
            [r#"+ name: "web""#]
        );
        assert_eq!(
            audit_changes(Some(&serde_json::json!({"name": "web"})), None),
            [r#"- name: "web""#]
        );
        assert!(audit_changes(Some(&old), Some(&old)).is_empty());
    }

    fn view(registry_hash: Option<&str>) -> phoenix_model::proto::ServiceView {
        serde_json::from_value(serde_json::json!({
            "name": "web", "machine": "m1", "type": "binary", "duration": "daemon",
            "ip": "fd38:dde8:32dd:1::", "image": "app",
            "image_hash": "3f2a9c1b0d4e5f60718293a4b5c6d7e8", "image_pushed_at": now_ms() - 120_000,
            "registry_hash": registry_hash, "generation": 1, "state": "running",
            "pid": 42, "restarts": 0, "health": "-", "last_exit": null, "limits": null,
            "since": null, "message": null, "node_reachable": true
        }))
        .unwrap()
    }

    #[test]
    fn a_service_shows_its_image_version_and_a_newer_one() {
        let current = view(None);
        assert_eq!(image_version(&current), "app@3f2a9c1b0d4e");
        assert_eq!(
            image_detail(&current),
            "app (version 3f2a9c1b0d4e, pushed 2m ago)"
        );
        let table = services_text(&[current]);
        assert!(table.contains("app@3f2a9c1b0d4e"), "{table}");
        assert!(!table.contains("newer"), "{table}");

        let behind = view(Some("9999aaaabbbbccccdddd"));
        assert_eq!(image_version(&behind), "app@3f2a9c1b0d4e*");
        assert!(
            image_detail(&behind)
                .ends_with("newer version 9999aaaabbbb: `phoenix restart web` runs it"),
            "{}",
            image_detail(&behind)
        );
        let table = services_text(&[behind]);
        assert!(table.contains("`phoenix restart NAME`"), "{table}");
    }

    #[test]
    fn a_dangling_link_is_named_and_none_says_nothing() {
        let mut v = view(None);
        assert_eq!(dangling_links(&v), None);
        v.dangling_links = vec!["cache".into(), "db".into()];
        assert_eq!(
            dangling_links(&v).as_deref(),
            Some("cache (no such service), db (no such service)")
        );
        // Absent from JSON when empty, so older CLIs and scripts see no change.
        v.dangling_links.clear();
        let json = serde_json::to_value(&v).unwrap();
        assert!(json.get("dangling_links").is_none(), "{json}");
    }
}
