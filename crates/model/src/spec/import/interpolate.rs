//! Compose's variable interpolation: `$VAR`, `${VAR}`, `${VAR:-default}`,
//! `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+other}`,
//! `${VAR+other}` (the text after the operator may hold interpolations
//! itself), and `$$` for a literal `$`. Anything else after a `$` is an
//! error, as in compose.

/// The result of interpolating one string.
#[derive(Debug, PartialEq, Eq)]
pub struct Interpolated {
    pub text: String,
    /// Variables that were used without a value or default (they became
    /// the empty string, as compose makes them, with a warning).
    pub unset: Vec<String>,
}

/// Interpolates `s` with `vars` (the process environment, then `.env`).
/// The error says which expression failed and why.
pub fn interpolate(s: &str, vars: &dyn Fn(&str) -> Option<String>) -> Result<Interpolated, String> {
    let mut unset = Vec::new();
    let text = expand(s, vars, &mut unset)?;
    Ok(Interpolated { text, unset })
}

fn expand(
    s: &str,
    vars: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = closing_brace(body).ok_or_else(|| {
                format!("`${{{body}` has no closing `}}` (write `$$` for a literal `$`)")
            })?;
            out.push_str(&braced(&body[..end], vars, unset)?);
            rest = &body[end + 1..];
        } else {
            let len = name_len(after);
            if len == 0 {
                let shown: String = after.chars().take(8).collect();
                return Err(format!(
                    "`${shown}` is not an interpolation (write `$$` for a literal `$`)"
                ));
            }
            let name = &after[..len];
            out.push_str(&value(name, vars, unset));
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The length of the variable name `s` starts with.
fn name_len(s: &str) -> usize {
    let mut len = 0;
    for (i, c) in s.char_indices() {
        let ok = c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit());
        if !ok {
            break;
        }
        len = i + c.len_utf8();
    }
    len
}

/// Where the `}` closing a `${` is, counting nested `${ }`.
fn closing_brace(body: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'$') => i += 1,
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 1;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn value(name: &str, vars: &dyn Fn(&str) -> Option<String>, unset: &mut Vec<String>) -> String {
    vars(name).unwrap_or_else(|| {
        if !unset.iter().any(|u| u == name) {
            unset.push(name.to_owned());
        }
        String::new()
    })
}

/// The inside of `${...}`.
fn braced(
    body: &str,
    vars: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<String>,
) -> Result<String, String> {
    let len = name_len(body);
    if len == 0 {
        return Err(format!("`${{{body}}}` does not start with a variable name"));
    }
    let name = &body[..len];
    let op = &body[len..];
    if op.is_empty() {
        return Ok(value(name, vars, unset));
    }
    let got = vars(name);
    let set = got.is_some();
    let nonempty = got.as_deref().is_some_and(|v| !v.is_empty());
    let (test, arg) = match op {
        o if o.starts_with(":-") => ('-', (nonempty, &o[2..])),
        o if o.starts_with('-') => ('-', (set, &o[1..])),
        o if o.starts_with(":?") => ('?', (nonempty, &o[2..])),
        o if o.starts_with('?') => ('?', (set, &o[1..])),
        o if o.starts_with(":+") => ('+', (nonempty, &o[2..])),
        o if o.starts_with('+') => ('+', (set, &o[1..])),
        _ => {
            return Err(format!(
                "`${{{body}}}` is not supported; use ${{VAR}}, ${{VAR:-default}}, ${{VAR-default}}, \
                 ${{VAR:?error}}, ${{VAR?error}}, ${{VAR:+other}} or ${{VAR+other}}"
            ));
        }
    };
    let (ok, text) = arg;
    match test {
        '-' if ok => Ok(got.unwrap_or_default()),
        '-' => expand(text, vars, unset),
        '?' if ok => Ok(got.unwrap_or_default()),
        '?' => {
            let message = expand(text, vars, unset)?;
            Err(if message.is_empty() {
                format!("variable {name} is required (`${{{body}}}`) but not set")
            } else {
                format!("variable {name} is required: {message}")
            })
        }
        _ if ok => expand(text, vars, unset),
        _ => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db".into()),
            "EMPTY" => Some(String::new()),
            "TAG" => Some("1.25".into()),
            _ => None,
        }
    }

    fn ok(s: &str) -> String {
        interpolate(s, &vars).unwrap().text
    }

    #[test]
    fn the_common_forms() {
        assert_eq!(ok("nginx:${TAG}"), "nginx:1.25");
        assert_eq!(ok("$HOST:5432"), "db:5432");
        assert_eq!(ok("a$$b $${X}"), "a$b ${X}");
        assert_eq!(ok("${NOPE:-x}|${EMPTY:-x}|${EMPTY-x}|${NOPE-y}"), "x|x||y");
        assert_eq!(
            ok("${HOST:+on}|${EMPTY:+on}|${EMPTY+on}|${NOPE+on}"),
            "on||on|"
        );
        assert_eq!(ok("${NOPE:-${HOST}-${TAG:-0}}"), "db-1.25");
        assert_eq!(ok("${HOST:?needed}"), "db");
        assert_eq!(ok("no dollars"), "no dollars");
        assert_eq!(ok("ünï${HOST}cöde"), "ünïdbcöde");
    }

    #[test]
    fn unset_variables_become_empty_and_are_reported() {
        let i = interpolate("${A}-$B-${A}", &vars).unwrap();
        assert_eq!(i.text, "--");
        assert_eq!(i.unset, ["A", "B"]);
    }

    #[test]
    fn errors_say_what_and_why() {
        let e = |s: &str| interpolate(s, &vars).unwrap_err();
        assert_eq!(
            e("${DB_PASS:?set it in .env}"),
            "variable DB_PASS is required: set it in .env"
        );
        assert!(e("${EMPTY:?}").contains("variable EMPTY is required"));
        assert!(
            e("${HOST/a/b}").contains("is not supported"),
            "{}",
            e("${HOST/a/b}")
        );
        assert!(e("${HOST").contains("no closing"));
        assert!(e("cost $5").contains("`$5` is not an interpolation"));
        assert!(e("end $").contains("not an interpolation"));
        assert!(e("${}").contains("does not start with a variable name"));
    }
}
