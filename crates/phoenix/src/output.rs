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
                v.last_exit.map_or_else(dash, |e| e.to_string()),
            ]
        })
        .collect();
    render(
        &[
            "NAME",
            "MACHINE",
            "STATE",
            "PID",
            "RESTARTS",
            "HEALTH",
            "IP",
            "LAST EXIT",
        ],
        &rows,
    )
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
                i.hash.chars().take(12).collect(),
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
}
