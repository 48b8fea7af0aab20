//! Property tests ("fuzzing") for the frame decoder that every stream
//! uses, the public join endpoint included: whatever bytes arrive, reading
//! never panics, never takes a frame over the limit, and what was written
//! reads back.
//!
//! A few hundred cases run in every `cargo test`; to look harder:
//! `PROPTEST_CASES=100000 cargo test -p phoenix-model --test fuzz_frames`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use phoenix_model::proto::{FrameError, JoinRequest, MAX_JOIN_FRAME, read_frame, write_frame};
use proptest::prelude::*;
use serde_json::Value;

/// Reading from a byte slice never waits, so one runtime serves every case.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime")
});

fn read_all<T: serde::de::DeserializeOwned>(
    mut bytes: &[u8],
    limit: usize,
) -> Vec<Result<Option<T>, FrameError>> {
    RUNTIME.block_on(async {
        let mut out = Vec::new();
        loop {
            let r = read_frame::<_, T>(&mut bytes, limit).await;
            let last = !matches!(r, Ok(Some(_)));
            out.push(r);
            if last {
                return out;
            }
        }
    })
}

fn frame_of<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    RUNTIME.block_on(async {
        let mut buf = Vec::new();
        write_frame(&mut buf, msg).await.expect("a frame");
        buf
    })
}

/// Bytes that start with a length header more often than chance would:
/// a real length, a length past the limit, or any four bytes.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    let body = proptest::collection::vec(any::<u8>(), 0..600);
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        body.clone().prop_map(|b| {
            let mut v = (b.len() as u32).to_be_bytes().to_vec();
            v.extend(b);
            v
        }),
        (any::<u32>(), body).prop_map(|(len, b)| {
            let mut v = len.to_be_bytes().to_vec();
            v.extend(b);
            v
        }),
        // JSON-looking bodies, so the decoder gets past the first byte.
        "[\\[{\"a-z:0-9,\\]} ]{0,200}".prop_map(|s| {
            let mut v = (s.len() as u32).to_be_bytes().to_vec();
            v.extend(s.into_bytes());
            v
        }),
    ]
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ]
}

fn join_request() -> impl Strategy<Value = JoinRequest> {
    (
        ".{0,40}",
        ".{0,60}",
        ip(),
        ip(),
        any::<u16>(),
        ".{0,20}",
        proptest::option::of(".{0,80}"),
    )
        .prop_map(
            |(name, key, public_ip, private_ip, wg_port, version, proof)| JoinRequest {
                name,
                key,
                public_ip,
                private_ip,
                wg_port,
                version,
                proof,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(400)
    ))]

    #[test]
    fn any_bytes_are_answered_without_panicking_and_within_the_limit(
        bytes in wire_bytes(),
        limit in prop_oneof![Just(MAX_JOIN_FRAME), 0usize..700],
    ) {
        let results = read_all::<Value>(&bytes, limit);
        let mut at = 0usize;
        for r in &results {
            let header: Option<[u8; 4]> = bytes.get(at..at + 4).and_then(|h| h.try_into().ok());
            match r {
                Ok(Some(_)) => {
                    let len = u32::from_be_bytes(header.expect("a frame has a header")) as usize;
                    prop_assert!(len <= limit, "a frame of {len} bytes passed a limit of {limit}");
                    at += 4 + len;
                    prop_assert!(at <= bytes.len());
                }
                // A clean end only where a frame would start.
                Ok(None) => prop_assert!(bytes.len() - at < 4),
                Err(FrameError::TooLarge(len, l)) => {
                    prop_assert_eq!(*l, limit);
                    prop_assert!(*len > limit);
                    prop_assert_eq!(Some(*len), header.map(|h| u32::from_be_bytes(h) as usize));
                }
                Err(FrameError::Io(_)) | Err(FrameError::Json(_)) => {}
            }
        }
    }

    #[test]
    fn any_bytes_as_a_join_request_are_answered_without_panicking(bytes in wire_bytes()) {
        let _ = read_all::<JoinRequest>(&bytes, MAX_JOIN_FRAME);
    }

    #[test]
    fn written_frames_read_back_in_order_and_end_cleanly(
        requests in proptest::collection::vec(join_request(), 0..4),
    ) {
        let mut wire = Vec::new();
        for r in &requests {
            wire.extend(frame_of(r));
        }
        let results = read_all::<JoinRequest>(&wire, usize::MAX);
        prop_assert_eq!(results.len(), requests.len() + 1);
        for (r, sent) in results.iter().zip(&requests) {
            match r {
                Ok(Some(got)) => prop_assert_eq!(got, sent),
                other => prop_assert!(false, "expected {sent:?}, read {other:?}"),
            }
        }
        prop_assert!(matches!(results.last(), Some(Ok(None))));
    }

    #[test]
    fn a_frame_cut_short_is_an_error_never_a_message(request in join_request(), cut in any::<prop::sample::Index>()) {
        let wire = frame_of(&request);
        // Anywhere but nothing at all (a clean end) or the whole frame.
        let at = 1 + cut.index(wire.len() - 1);
        let results = read_all::<JoinRequest>(&wire[..at], usize::MAX);
        prop_assert_eq!(results.len(), 1);
        prop_assert!(results[0].is_err() || (at < 4 && matches!(results[0], Ok(None))));
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_whatever_its_body(request in join_request(), limit in 0usize..64) {
        let wire = frame_of(&request);
        let len = wire.len() - 4;
        let results = read_all::<JoinRequest>(&wire, limit);
        if len > limit {
            prop_assert!(matches!(results[0], Err(FrameError::TooLarge(l, m)) if l == len && m == limit));
        } else {
            prop_assert!(matches!(&results[0], Ok(Some(got)) if *got == request));
        }
    }
}

/// A header that claims 4 GiB is refused from its four bytes, before
/// anything is allocated or waited for.
#[test]
fn a_huge_length_is_refused_at_once() {
    let results = read_all::<Value>(&[0xff, 0xff, 0xff, 0xff], MAX_JOIN_FRAME);
    assert!(matches!(
        results[0],
        Err(FrameError::TooLarge(0xffff_ffff, MAX_JOIN_FRAME))
    ));
}
