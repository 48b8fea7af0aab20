//! The header names the proxy acts on: the hop-by-hop ones it never
//! passes on (RFC 9110 §7.6.1), and those it writes itself on a request
//! to an instance. Each has an index; [`name_index`] finds it with a match
//! on the lowercase name (a length test and at most a short compare), so
//! that neither forwarding nor parsing hashes a name to look it up.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop, `Connection` first.
pub(crate) const HOPS: usize = 9;
#[cfg(test)]
pub(crate) static HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

// Indices: the hop-by-hop names first, as in `HOP_BY_HOP`, then the names
// a request to an instance gets from the proxy rather than from the
// client, then `Authorization` (dropped on routes with basic auth), then
// `X-Forwarded-Prefix` (the proxy's own, set where it strips a prefix),
// then `Forwarded` and `X-Real-IP`: a client's own would tell an instance
// that trusts them whatever client address, scheme or host it likes, so
// they are dropped (the proxy says the same in `X-Forwarded-*`).
pub(crate) const CONNECTION: usize = 0;
pub(crate) const TRANSFER_ENCODING: usize = 7;
pub(crate) const UPGRADE: usize = 8;
pub(crate) const EXPECT: usize = HOPS;
pub(crate) const FORWARDED_FOR: usize = HOPS + 1;
pub(crate) const FORWARDED_PROTO: usize = HOPS + 2;
pub(crate) const FORWARDED_HOST: usize = HOPS + 3;
pub(crate) const HOST: usize = HOPS + 4;
pub(crate) const CONTENT_LENGTH: usize = HOPS + 5;
pub(crate) const AUTHORIZATION: usize = HOPS + 6;
pub(crate) const FORWARDED_PREFIX: usize = HOPS + 7;
const FORWARDED: usize = HOPS + 8;
const REAL_IP: usize = HOPS + 9;
const NAMES: usize = HOPS + 10;

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Where `name` is among the names the proxy acts on, if it is one.
pub(crate) fn name_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => CONNECTION,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => TRANSFER_ENCODING,
        "upgrade" => UPGRADE,
        "expect" => EXPECT,
        "x-forwarded-for" => FORWARDED_FOR,
        "x-forwarded-proto" => FORWARDED_PROTO,
        "x-forwarded-host" => FORWARDED_HOST,
        "host" => HOST,
        "content-length" => CONTENT_LENGTH,
        "authorization" => AUTHORIZATION,
        "x-forwarded-prefix" => FORWARDED_PREFIX,
        "forwarded" => FORWARDED,
        "x-real-ip" => REAL_IP,
        _ => return None,
    })
}

/// Which of those names a header map holds, found by one pass over its
/// names.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Present([bool; NAMES]);

impl Present {
    pub fn of(headers: &HeaderMap) -> Present {
        let mut present = Present::default();
        for name in headers.keys() {
            if let Some(i) = name_index(name) {
                present.0[i] = true;
            }
        }
        present
    }

    pub fn has(&self, index: usize) -> bool {
        self.0[index]
    }
}

/// Whether a `Connection` value is one of the usual tokens, which name no
/// other header.
fn usual(value: &HeaderValue) -> bool {
    value.as_bytes().eq_ignore_ascii_case(b"keep-alive")
        || value.as_bytes().eq_ignore_ascii_case(b"close")
}

/// Removes the headers that `Connection` names (other than `keep-alive`
/// and `close`, which name none): hop-by-hop too. The common case, no
/// such names, allocates nothing.
pub(crate) fn remove_connection_named(headers: &mut HeaderMap, present: &Present) {
    if !present.has(CONNECTION) || headers.get_all(header::CONNECTION).iter().all(usual) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| {
            !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close")
        })
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_index_finds_each_name_and_nothing_else() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(name_index(name), Some(i), "{name}");
        }
        for (name, i) in [
            (header::CONNECTION, CONNECTION),
            (header::TRANSFER_ENCODING, TRANSFER_ENCODING),
            (header::UPGRADE, UPGRADE),
            (header::EXPECT, EXPECT),
            (X_FORWARDED_FOR, FORWARDED_FOR),
            (
                HeaderName::from_static("x-forwarded-proto"),
                FORWARDED_PROTO,
            ),
            (HeaderName::from_static("x-forwarded-host"), FORWARDED_HOST),
            (header::HOST, HOST),
            (header::CONTENT_LENGTH, CONTENT_LENGTH),
            (header::AUTHORIZATION, AUTHORIZATION),
            (
                HeaderName::from_static("x-forwarded-prefix"),
                FORWARDED_PREFIX,
            ),
            (header::FORWARDED, FORWARDED),
            (HeaderName::from_static("x-real-ip"), REAL_IP),
        ] {
            assert_eq!(name_index(&name), Some(i), "{name}");
        }
        for other in ["x-forwarded-port", "connections", "tE-x", "keep", "cookie"] {
            let name = HeaderName::from_bytes(other.as_bytes()).unwrap();
            assert_eq!(name_index(&name), None, "{other}");
        }
    }

    #[test]
    fn the_headers_connection_names_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        let present = Present::of(&headers);
        remove_connection_named(&mut headers, &present);
        assert!(!headers.contains_key("x-secret"));
        assert!(headers.contains_key("x-kept"));
        assert!(
            headers.contains_key(header::CONNECTION),
            "left to the encoder"
        );
    }
}
