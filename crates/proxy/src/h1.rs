//! HTTP/1.1 to instances on the wire, without I/O: the request head as
//! bytes ([`RequestHead`]), the response head parsed from a read buffer
//! ([`parse_response`]), and the response body cut out of that buffer by
//! its framing ([`Decoder`]). `pool` does the reading and writing.
//!
//! Why not hyper's client: it runs each connection as a task of its own,
//! so a request crossed tasks four times (request in, head back, each body
//! frame, the connection back), and it built the request's header map only
//! to encode it again. Here the client connection's task writes the head
//! it built in one pass over the client's headers and reads the response
//! itself: 23 % fewer instructions a proxied request
//! (`bench/proxy-instructions.sh`). Parsing is httparse's, as in hyper.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::headers::{CONNECTION, CONTENT_LENGTH, HOPS, TRANSFER_ENCODING, UPGRADE, name_index};

/// The most headers a response head may have.
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (with extensions) and trailer section read.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
const MAX_TRAILER_FIELDS: usize = 32;

/// Why an instance's response could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("the instance's response is not HTTP/1: {0}")]
    Parse(#[from] httparse::Error),
    #[error("the instance's response has an invalid {0}")]
    Invalid(&'static str),
    #[error("the instance's response head is larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("the instance's chunked body is malformed")]
    Chunked,
    #[error("the instance closed the connection before the body's end")]
    Truncated,
}

/// A request head for an instance, written as it is built.
pub(crate) struct RequestHead(Vec<u8>);

impl RequestHead {
    /// The request line: `method target HTTP/1.1`.
    pub fn new(method: &Method, target: &str) -> RequestHead {
        let mut buf = Vec::with_capacity(512);
        buf.extend_from_slice(method.as_str().as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(target.as_bytes());
        buf.extend_from_slice(b" HTTP/1.1\r\n");
        RequestHead(buf)
    }

    pub fn header(&mut self, name: &str, value: &[u8]) {
        let buf = &mut self.0;
        buf.reserve(name.len() + value.len() + 4);
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value);
        buf.extend_from_slice(b"\r\n");
    }

    /// Adds `value` to the last header's line after `separator` (cookies
    /// that HTTP/2 sent as several fields go as one line, RFC 9113 §8.2.3).
    pub fn extend_last(&mut self, separator: &[u8], value: &[u8]) {
        self.0.truncate(self.0.len() - 2);
        self.0.extend_from_slice(separator);
        self.0.extend_from_slice(value);
        self.0.extend_from_slice(b"\r\n");
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(b"\r\n");
        self.0
    }
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    /// Status and headers, hop-by-hop headers removed; no body.
    pub response: Response<()>,
    /// How its body is framed.
    pub decoder: Decoder,
    /// Whether the connection may take another request after this body.
    pub keep_alive: bool,
}

/// Parses the response head at the start of `buf` and takes it out of
/// `buf`, or `None` if the head is not whole yet. The header values share
/// the head's bytes. `head_request`: the request was a HEAD, so the
/// response has no body whatever its headers say.
pub(crate) fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, H1Error> {
    // Where each header's name and value lie in `buf`, so that the
    // values can be slices of one `Bytes` once the head is split off.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut slots,
        )? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return Ok(None),
        };
        let base = buf.as_ptr() as usize;
        let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
            let (name, value) = (at(h.name.as_bytes()), at(h.value));
            *span = (
                name,
                name + h.name.len() as u32,
                value,
                value + h.value.len() as u32,
            );
        }
        let code = parsed.code.ok_or(H1Error::Invalid("status line"))?;
        let minor = parsed.version.ok_or(H1Error::Invalid("status line"))?;
        (len, code, minor, parsed.headers.len())
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| H1Error::Invalid("status code"))?;

    let mut headers = HeaderMap::with_capacity(count);
    let (mut close, mut keep_alive_token) = (false, false);
    let mut named: Vec<HeaderName> = Vec::new();
    let (mut transfer_encoding, mut chunked) = (false, false);
    let mut length: Option<u64> = None;
    for &(name_start, name_end, value_start, value_end) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize])
            .map_err(|_| H1Error::Invalid("header name"))?;
        let value = &head[value_start as usize..value_end as usize];
        match name_index(&name) {
            Some(CONNECTION) => {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive_token = true;
                    } else if let Ok(name) = HeaderName::from_bytes(token)
                        && !(code == 101 && name == header::UPGRADE)
                    {
                        named.push(name);
                    }
                }
                continue;
            }
            Some(TRANSFER_ENCODING) => {
                transfer_encoding = true;
                chunked = value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                continue;
            }
            // A 101's `Upgrade` says what the connection became.
            Some(UPGRADE) if code == 101 => {}
            Some(i) if i < HOPS => continue,
            Some(CONTENT_LENGTH) => {
                let n = content_length(value)?;
                if length.is_some_and(|before| before != n) {
                    return Err(H1Error::Invalid("content-length (two values)"));
                }
                length = Some(n);
            }
            _ => {}
        }
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
                .map_err(|_| H1Error::Invalid("header value"))?;
        headers.append(name, value);
    }
    for name in named {
        headers.remove(name);
    }

    let mut keep_alive = match minor {
        1 => !close,
        _ => keep_alive_token && !close,
    };
    let decoder = if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Decoder::Done
    } else if transfer_encoding {
        if minor == 0 {
            // HTTP/1.0 has no Transfer-Encoding: framing nobody can
            // trust (RFC 9112 §6.1).
            return Err(H1Error::Invalid(
                "transfer-encoding in an HTTP/1.0 response",
            ));
        }
        // The Transfer-Encoding wins over a Content-Length sent with it
        // (RFC 9112 §6.3); passed on, that length would promise the
        // client another size than it gets. A response with both is
        // suspect: its connection is not used again.
        if length.is_some() {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        if chunked {
            Decoder::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Decoder::UntilClose
        }
    } else if let Some(n) = length {
        Decoder::Length(n)
    } else {
        keep_alive = false;
        Decoder::UntilClose
    };
    if status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
    }

    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(Some(ResponseHead {
        response,
        decoder,
        keep_alive,
    }))
}

/// A Content-Length value: digits, or a list of the same number.
fn content_length(value: &[u8]) -> Result<u64, H1Error> {
    let mut length = None;
    for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(H1Error::Invalid("content-length"));
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|before| before != n) {
            return Err(H1Error::Invalid("content-length (two values)"));
        }
        length = Some(n);
    }
    length.ok_or(H1Error::Invalid("content-length"))
}

/// How much of a response body is left, by its framing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoder {
    /// So many bytes.
    Length(u64),
    Chunked(Chunk),
    /// Up to the connection's end.
    UntilClose,
    /// Read whole (or there is no body).
    Done,
}

/// Where a chunked body is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, so many bytes left.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section (dropped) and its CRLF.
    Trailers,
}

/// What [`Decoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// The trailer fields of a chunked body, which end it.
    Trailers(HeaderMap),
    /// The buffer holds no more of the body: read.
    More,
    /// The body is whole.
    End,
}

impl Decoder {
    /// Takes the next piece of the body out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Length(0) => {
                    *self = Decoder::Done;
                    return Ok(Decoded::End);
                }
                Decoder::Length(left) => {
                    let Some(data) = take(buf, left) else {
                        return Ok(Decoded::More);
                    };
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Decoded::Data(data));
                }
                Decoder::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Decoder::Chunked(chunk) => match chunk {
                    Chunk::Size => {
                        if !buf.first().is_some_and(u8::is_ascii_hexdigit) {
                            if buf.is_empty() {
                                return Ok(Decoded::More);
                            }
                            return Err(H1Error::Chunked);
                        }
                        match httparse::parse_chunk_size(buf) {
                            // A size line, extensions and all, is bounded
                            // and holds no bare LF (httparse lets any byte
                            // through in an extension).
                            Ok(httparse::Status::Complete((used, _)))
                                if used > MAX_CHUNK_LINE || buf[..used - 2].contains(&b'\n') =>
                            {
                                return Err(H1Error::Chunked);
                            }
                            Ok(httparse::Status::Complete((used, 0))) => {
                                buf.advance(used);
                                *chunk = Chunk::Trailers;
                            }
                            Ok(httparse::Status::Complete((used, size))) => {
                                buf.advance(used);
                                *chunk = Chunk::Data(size);
                            }
                            Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => {
                                return Ok(Decoded::More);
                            }
                            _ => return Err(H1Error::Chunked),
                        }
                    }
                    Chunk::Data(left) => {
                        let Some(data) = take(buf, left) else {
                            return Ok(Decoded::More);
                        };
                        if *left == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        return Ok(Decoded::Data(data));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Decoded::More);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(H1Error::Chunked);
                        }
                        buf.advance(2);
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        // Either the CRLF that ends the body at once, or
                        // trailer fields up to an empty line.
                        if buf.starts_with(b"\r\n") {
                            buf.advance(2);
                            *self = Decoder::Done;
                            return Ok(Decoded::End);
                        }
                        let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
                        match httparse::parse_headers(buf, &mut fields) {
                            Ok(httparse::Status::Complete((used, fields))) => {
                                let trailers = trailers(fields);
                                buf.advance(used);
                                *self = Decoder::Done;
                                return Ok(Decoded::Trailers(trailers));
                            }
                            Ok(httparse::Status::Partial) if buf.len() < MAX_TRAILERS => {
                                return Ok(Decoded::More);
                            }
                            _ => return Err(H1Error::Chunked),
                        }
                    }
                },
            }
        }
    }

    /// The connection ended with `buf` empty: the end of an until-close
    /// body, a truncated one otherwise.
    pub fn at_eof(&mut self) -> Result<Decoded, H1Error> {
        match self {
            Decoder::UntilClose | Decoder::Done => {
                *self = Decoder::Done;
                Ok(Decoded::End)
            }
            _ => Err(H1Error::Truncated),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done | Decoder::Length(0))
    }

    /// The bytes left, when the framing tells.
    pub fn exact(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }
}

/// Trailer fields as a header map, without those that describe the
/// message or the hop (framing, routing, hop-by-hop), which a trailer may
/// not carry (RFC 9110 §6.5.1) and HTTP/2 refuses.
fn trailers(fields: &[httparse::Header<'_>]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for field in fields {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            continue;
        };
        if name_index(&name).is_none() {
            map.append(name, value);
        }
    }
    map
}

/// Up to `left` bytes from the front of `buf` (`None` if it is empty),
/// counted off `left`.
fn take(buf: &mut BytesMut, left: &mut u64) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(*left).map_or(buf.len(), |left| left.min(buf.len()));
    *left -= n as u64;
    Some(buf.split_to(n).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, head_request: bool) -> Result<Option<ResponseHead>, H1Error> {
        parse_response(&mut BytesMut::from(text), head_request)
    }

    /// Decodes `wire` fed in pieces of `step` bytes; the body and what
    /// was left in the buffer.
    fn decode_in_steps(
        mut decoder: Decoder,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), H1Error> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut pieces = wire.chunks(step);
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End | Decoded::Trailers(_) => return Ok((body, buf.to_vec())),
                Decoded::More => match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => match decoder.at_eof()? {
                        Decoded::End => return Ok((body, Vec::new())),
                        other => panic!("{other:?}"),
                    },
                },
            }
        }
    }

    #[test]
    fn a_request_head_is_one_line_a_header_and_cookies_join() {
        let mut head = RequestHead::new(&Method::GET, "/a?b=c");
        head.header("host", b"example.com");
        head.header("cookie", b"a=1");
        head.extend_last(b"; ", b"b=2");
        assert_eq!(
            head.finish(),
            b"GET /a?b=c HTTP/1.1\r\nhost: example.com\r\ncookie: a=1; b=2\r\n\r\n"
        );
    }

    #[test]
    fn a_head_is_parsed_only_once_whole_and_hop_by_hop_headers_go() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nX-App: yes\r\nSet-Cookie: a\r\nSet-Cookie: b\r\n\r\nhello";
        for cut in 0..text.len() - 5 {
            assert!(parse(&text[..cut], false).unwrap().is_none(), "{cut}");
        }
        let mut buf = BytesMut::from(text);
        let head = parse_response(&mut buf, false).unwrap().unwrap();
        assert_eq!(&buf[..], b"hello", "the body stays in the buffer");
        assert_eq!(head.response.status(), StatusCode::OK);
        assert_eq!(head.decoder, Decoder::Length(5));
        assert!(head.keep_alive);
        let headers = head.response.headers();
        assert_eq!(headers.len(), 4, "{headers:?}");
        assert_eq!(headers["x-app"], "yes");
        assert_eq!(headers["content-length"], "5");
        assert_eq!(headers.get_all("set-cookie").iter().count(), 2);

        // Empty values, first and last.
        let head = parse(
            "HTTP/1.1 200 OK\r\nX-A:\r\nX-B: \r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.response.headers()["x-a"], "");
        assert_eq!(head.response.headers()["x-b"], "");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let frame = |text: &str, head_request| {
            let head = parse(text, head_request).unwrap().unwrap();
            (
                head.decoder,
                head.keep_alive,
                head.response.headers().contains_key("content-length"),
            )
        };
        assert_eq!(
            frame(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                false
            ),
            (Decoder::Chunked(Chunk::Size), false, false),
            "chunked wins, the length goes, and so does the connection"
        );
        assert_eq!(
            frame(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false
            ),
            (Decoder::Chunked(Chunk::Size), true, false)
        );
        assert_eq!(
            frame(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                false
            ),
            (Decoder::UntilClose, false, false),
            "not chunked last: read to the close"
        );
        assert_eq!(
            frame("HTTP/1.1 200 OK\r\n\r\n", false),
            (Decoder::UntilClose, false, false)
        );
        assert_eq!(
            frame("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true),
            (Decoder::Done, true, true),
            "a HEAD response has no body"
        );
        assert_eq!(
            frame(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false
            ),
            (Decoder::Done, true, true)
        );
        assert_eq!(
            frame("HTTP/1.1 204 No Content\r\n\r\n", false),
            (Decoder::Done, true, false)
        );
        assert_eq!(
            frame("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", false),
            (Decoder::Length(2), false, true),
            "HTTP/1.0 closes unless asked not to"
        );
        assert_eq!(
            frame(
                "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n",
                false
            ),
            (Decoder::Length(2), true, true)
        );
        assert_eq!(
            frame(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
                false
            ),
            (Decoder::Length(2), false, true)
        );
        let upgraded = parse(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!upgraded.keep_alive);
        assert_eq!(upgraded.decoder, Decoder::Done);
        assert_eq!(
            upgraded.response.headers()["upgrade"],
            "websocket",
            "a 101 keeps it"
        );
        assert!(upgraded.response.headers().get("connection").is_none());
        assert_eq!(
            frame("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n", false),
            (Decoder::Length(7), true, true)
        );
    }

    #[test]
    fn bad_heads_are_errors() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 7, 8\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "garbage\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(parse(text, false).is_err(), "{text:?}");
        }
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(parse(&many, false).is_err());
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads_cut() {
        let wire =
            b"5\r\nhello\r\n1;ext=\"x\"\r\n \r\nA\r\n0123456789\r\n0\r\nTrailer: t\r\n\r\nNEXT";
        for step in 1..=wire.len() {
            let (body, rest) = decode_in_steps(Decoder::Chunked(Chunk::Size), wire, step).unwrap();
            assert_eq!(body, b"hello 0123456789", "step {step}");
            // What follows the body stays for the caller to see.
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
        }
        let (body, _) = decode_in_steps(Decoder::Chunked(Chunk::Size), b"0\r\n\r\n", 1).unwrap();
        assert!(body.is_empty());
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        for wire in [
            &b"5\r\nhelloX\r\n0\r\n\r\n"[..],
            b"\r\n\r\n",
            b"g\r\n",
            b"-1\r\n",
            b"10000000000000000\r\n",
            b"5\r\nhel",
            b"1;a\nb\r\nx\r\n0\r\n\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            for step in [1, wire.len()] {
                assert!(
                    decode_in_steps(Decoder::Chunked(Chunk::Size), wire, step).is_err(),
                    "{:?} step {step}",
                    String::from_utf8_lossy(wire)
                );
            }
        }
        let long = [b'1'; 1]
            .iter()
            .chain(&[b';'; MAX_CHUNK_LINE])
            .copied()
            .collect::<Vec<_>>();
        assert!(decode_in_steps(Decoder::Chunked(Chunk::Size), &long, 512).is_err());
    }

    #[test]
    fn trailers_come_as_a_frame_without_framing_fields() {
        let mut decoder = Decoder::Chunked(Chunk::Size);
        let mut buf =
            BytesMut::from(&b"2\r\nok\r\n0\r\nGrpc-Status: 0\r\nContent-Length: 9\r\n\r\n"[..]);
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"ok"))
        );
        let Decoded::Trailers(trailers) = decoder.decode(&mut buf).unwrap() else {
            panic!("trailers");
        };
        assert_eq!(trailers.len(), 1, "{trailers:?}");
        assert_eq!(trailers["grpc-status"], "0");
        assert!(buf.is_empty());
        assert_eq!(decoder.decode(&mut buf).unwrap(), Decoded::End);
    }

    #[test]
    fn length_and_until_close_bodies() {
        for step in [1, 3, 100] {
            let (body, rest) = decode_in_steps(Decoder::Length(5), b"helloEXTRA", step).unwrap();
            assert_eq!(body, b"hello");
            assert!(b"EXTRA".starts_with(&rest));
            let (body, _) = decode_in_steps(Decoder::UntilClose, b"all of it", step).unwrap();
            assert_eq!(body, b"all of it");
        }
        assert!(matches!(
            decode_in_steps(Decoder::Length(10), b"short", 2),
            Err(H1Error::Truncated)
        ));
    }
}
