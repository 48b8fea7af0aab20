//! Property tests ("fuzzing") for the public join endpoint's handling of a
//! request: whatever bytes arrive, decoding and checking never panic; a
//! request is proven exactly when it is well-formed and its proof is right;
//! and the waiting list stays within its caps whatever is thrown at it.
//!
//! A few hundred cases run in every `cargo test`; to look harder:
//! `PROPTEST_CASES=100000 cargo test -p phoenix-master --test fuzz_join`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use phoenix_master::join::budget::SourceNet;
use phoenix_master::join::check_request;
use phoenix_master::join::waiting::{Limits, WaitingRequests};
use phoenix_model::keys::token_proof;
use phoenix_model::proto::{JoinRequest, MAX_JOIN_FRAME, read_frame};
use proptest::prelude::*;

const TOKEN: &str = "the-cluster-join-token";

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime")
});

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(400)
}

/// One request's frame as the endpoint reads it (4 KiB at most).
fn decode(mut bytes: &[u8]) -> Option<JoinRequest> {
    RUNTIME
        .block_on(read_frame::<_, JoinRequest>(&mut bytes, MAX_JOIN_FRAME))
        .ok()
        .flatten()
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        // Few networks, so per-network caps are reached.
        (0u8..4, any::<u8>()).prop_map(|(n, h)| IpAddr::V4(Ipv4Addr::new(10, 0, n, h))),
    ]
}

/// A name: often a valid hostname label, sometimes not.
fn name() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z][a-z0-9-]{0,10}", ".{0,70}"]
}

/// A key: often a valid one (32 bytes in base64: 43 characters, the last
/// with its two low bits clear, and `=`), sometimes junk.
fn key() -> impl Strategy<Value = String> {
    prop_oneof!["[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=", ".{0,60}"]
}

#[derive(Clone, Debug)]
enum Proof {
    None,
    Right,
    WrongToken,
    Junk(String),
}

fn proof() -> impl Strategy<Value = Proof> {
    prop_oneof![
        Just(Proof::None),
        Just(Proof::Right),
        Just(Proof::WrongToken),
        ".{0,70}".prop_map(Proof::Junk),
    ]
}

fn request() -> impl Strategy<Value = (JoinRequest, Proof)> {
    (name(), key(), ip(), ip(), any::<u16>(), proof()).prop_map(
        |(name, key, public_ip, private_ip, wg_port, p)| {
            let proof = match &p {
                Proof::None => None,
                Proof::Right => Some(token_proof(TOKEN, &key)),
                Proof::WrongToken => Some(token_proof("another-token", &key)),
                Proof::Junk(s) => Some(s.clone()),
            };
            let req = JoinRequest {
                name,
                key,
                public_ip,
                private_ip,
                wg_port,
                version: "0".into(),
                proof,
            };
            (req, p)
        },
    )
}

fn well_formed(req: &JoinRequest) -> bool {
    phoenix_model::spec::check_hostname_label(&req.name).is_ok()
        && phoenix_model::keys::is_valid_public_key(&req.key)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn any_bytes_on_the_join_port_are_answered_without_panicking(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600).prop_map(|b| framed(&b)),
            proptest::collection::vec(any::<u8>(), 0..600),
            "\\{\"name\":\".{0,20}\",\"key\":\".{0,50}\",\"public_ip\":\"[0-9.:a-f]{0,20}\",\"private_ip\":\"[0-9.]{0,16}\",\"wg_port\":[0-9]{1,6},\"version\":\".{0,5}\"(,\"proof\":\".{0,70}\")?\\}"
                .prop_map(|s| framed(s.as_bytes())),
        ]
    ) {
        if let Some(req) = decode(&bytes) {
            let _ = check_request(&req, TOKEN);
        }
    }

    #[test]
    fn a_request_is_proven_exactly_when_well_formed_with_the_right_proof((req, p) in request()) {
        let checked = check_request(&req, TOKEN);
        match (well_formed(&req), &p) {
            (false, _) => prop_assert!(checked.is_err()),
            (true, Proof::None) => prop_assert_eq!(&checked, &Ok(false)),
            (true, Proof::Right) => prop_assert_eq!(&checked, &Ok(true)),
            (true, Proof::WrongToken) => {
                let reason = checked.clone().unwrap_err();
                prop_assert!(reason.contains("wrong join token proof"), "{}", reason);
            }
            // A junk proof is right only by a BLAKE3 collision.
            (true, Proof::Junk(_)) => prop_assert!(checked.is_err()),
        }
        // What was checked survives its trip through a frame.
        let wire = framed(&serde_json::to_vec(&req).unwrap());
        if wire.len() - 4 <= MAX_JOIN_FRAME {
            let back = decode(&wire).unwrap();
            prop_assert_eq!(check_request(&back, TOKEN), checked);
        }
    }

}

proptest! {
    // Each case is a whole sequence of up to 120 requests: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(cases().div_ceil(8)))]

    #[test]
    fn the_waiting_list_stays_within_its_caps_whatever_is_asked(
        asks in proptest::collection::vec((request(), ip(), any::<bool>(), 0u64..40), 1..120),
    ) {
        let limits = Limits {
            anonymous: 12,
            per_net: 3,
            proven: 5,
            grace: Duration::from_secs(30),
        };
        let mut list = WaitingRequests::new(limits);
        let start = Instant::now();
        let mut now = start;
        let mut held = Vec::new();
        for ((req, _), source, close_one, step_s) in asks {
            now += Duration::from_secs(step_s);
            let proven = check_request(&req, TOKEN) == Ok(true);
            if let Ok((candidate, decision)) = list.insert(req, source, proven, 0, now) {
                held.push((candidate.id, decision));
            }
            if close_one && let Some((id, _)) = held.pop() {
                list.closed(id, now);
            }
            let listed = list.list(now);
            let proven_n = listed.iter().filter(|c| c.proven).count();
            let anonymous: Vec<_> = listed.iter().filter(|c| !c.proven).collect();
            prop_assert!(proven_n <= limits.proven, "{} proven listed", proven_n);
            prop_assert!(anonymous.len() <= limits.anonymous, "{} anonymous listed", anonymous.len());
            let mut per_net: HashMap<SourceNet, usize> = HashMap::new();
            for c in anonymous {
                *per_net.entry(SourceNet::of(c.source)).or_default() += 1;
            }
            prop_assert!(per_net.values().all(|n| *n <= limits.per_net), "{:?}", per_net);
        }
    }
}
