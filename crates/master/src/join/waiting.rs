//! Join requests waiting for an admin: in memory, as long as their minion
//! holds its connection.
//!
//! A waiting request is not a fact of the cluster, so it is not stored: it
//! lives while its join connection is open, and for [`Limits::grace`] after
//! it closes (so a minion that reconnects keeps its place and its asked-at
//! time, and an `accept` typed in that moment still works). A master restart
//! forgets them all; the minions, which never stop asking, ask again.
//!
//! The list is capped per pool: requests that proved the join token have a
//! pool of their own that anonymous ones cannot fill. When the anonymous pool
//! is full, a closed request goes first; then, to be fair between networks,
//! the oldest request of the network holding the most, if that network holds
//! more than the newcomer's would after it came in. Otherwise the newcomer
//! is refused, so requests that came first keep their place.
//!
//! A name is not claimed by waiting: requests for one name with different
//! keys wait side by side, and the admin chooses one by its key's
//! fingerprint. A request for a name and key already waiting replaces the
//! older one (the same minion asking again).

use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use phoenix_model::keys::fingerprint;
use phoenix_model::proto::JoinRequest;
use tokio::sync::oneshot;

use super::budget::SourceNet;

/// What an admin decided for a waiting request; sent to its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Accepted(Ipv6Addr),
    Refused {
        reason: String,
        permanent: bool,
    },
    /// A newer connection of the same minion (name and key) took its place.
    Replaced,
}

/// A waiting join request, as `phoenix waiting` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    pub request: JoinRequest,
    /// The address its connection came from.
    pub source: IpAddr,
    /// Whether it proved the join token.
    pub proven: bool,
    /// When it first asked (Unix ms), kept across its reconnections.
    pub requested_at: u64,
}

impl Candidate {
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.request.key)
    }
}

#[derive(Debug)]
struct Entry {
    candidate: Candidate,
    net: SourceNet,
    since: Instant,
    /// Where its connection waits for the decision; `None` once it closed.
    held: Option<oneshot::Sender<Decision>>,
    closed_at: Option<Instant>,
}

impl Entry {
    fn decide(mut self, decision: Decision) {
        if let Some(held) = self.held.take() {
            // The connection may have ended meanwhile; nothing to tell then.
            let _ = held.send(decision);
        }
    }

    fn in_pool(&self, proven: bool) -> bool {
        self.candidate.proven == proven
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Waiting requests without the join token.
    pub anonymous: usize,
    /// Of those, from one source network.
    pub per_net: usize,
    /// Waiting requests that proved the join token.
    pub proven: usize,
    /// How long a request stays listed after its connection closed.
    pub grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            anonymous: 256,
            per_net: 16,
            proven: 256,
            grace: Duration::from_secs(30),
        }
    }
}

/// Why a request could not be listed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListFull {
    #[error("{limit} join requests from {net} are already waiting")]
    Net { net: SourceNet, limit: usize },
    #[error("{limit} join requests without the join token are already waiting")]
    Anonymous { limit: usize },
    #[error("{limit} join requests with the join token are already waiting")]
    Proven { limit: usize },
}

/// Why an admin's choice of request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Choice {
    #[error("no join request from {name:?} is waiting (see `phoenix waiting`)")]
    NoneWaiting { name: String },
    #[error("no join request from {name:?} with key fingerprint {fingerprint} is waiting; waiting: {}", .waiting.join(", "))]
    NoSuchKey {
        name: String,
        fingerprint: String,
        waiting: Vec<String>,
    },
    #[error(
        "{} join requests for {name:?} are waiting, with different keys: {}; compare the fingerprint the machine shows and choose one with `--fingerprint FP`",
        .waiting.len(), .waiting.join(", ")
    )]
    Ambiguous { name: String, waiting: Vec<String> },
}

pub struct WaitingRequests {
    limits: Limits,
    next_id: u64,
    entries: Vec<Entry>,
}

impl WaitingRequests {
    pub fn new(limits: Limits) -> WaitingRequests {
        WaitingRequests {
            limits,
            next_id: 1,
            entries: Vec::new(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Forgets requests whose connection closed more than the grace ago.
    fn expire(&mut self, now: Instant) {
        let grace = self.limits.grace;
        self.entries.retain(|e| {
            e.closed_at
                .is_none_or(|at| now.saturating_duration_since(at) < grace)
        });
    }

    /// Whether this request is the same minion asking again from the same
    /// address (it then costs no budget: it replaces its earlier request).
    pub fn is_repeat(&self, name: &str, key: &str, source: IpAddr) -> bool {
        self.entries.iter().any(|e| {
            e.candidate.request.name == name
                && e.candidate.request.key == key
                && e.candidate.source == source
        })
    }

    /// Lists a request; its connection waits on the receiver for the
    /// decision. A request with the same name and key replaces the older one.
    pub fn insert(
        &mut self,
        mut request: JoinRequest,
        source: IpAddr,
        proven: bool,
        requested_at: u64,
        now: Instant,
    ) -> Result<(Candidate, oneshot::Receiver<Decision>), ListFull> {
        self.expire(now);
        // The proof has done its job; it is not shown or kept.
        request.proof = None;
        let net = SourceNet::of(source);
        let mut requested_at = requested_at;
        if let Some(i) = self.entries.iter().position(|e| {
            e.candidate.request.name == request.name && e.candidate.request.key == request.key
        }) {
            let old = self.entries.remove(i);
            requested_at = requested_at.min(old.candidate.requested_at);
            old.decide(Decision::Replaced);
        } else {
            self.make_room(net, proven)?;
        }
        let candidate = Candidate {
            id: self.next_id,
            request,
            source,
            proven,
            requested_at,
        };
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.entries.push(Entry {
            candidate: candidate.clone(),
            net,
            since: now,
            held: Some(tx),
            closed_at: None,
        });
        Ok((candidate, rx))
    }

    /// Makes room for one more request in its pool, or says why not.
    fn make_room(&mut self, net: SourceNet, proven: bool) -> Result<(), ListFull> {
        let limit = if proven {
            self.limits.proven
        } else {
            self.limits.anonymous
        };
        let in_pool = self.entries.iter().filter(|e| e.in_pool(proven)).count();
        let of_net = |entries: &[Entry], net: SourceNet| {
            entries
                .iter()
                .filter(|e| !e.candidate.proven && e.net == net)
                .count()
        };
        if !proven && of_net(&self.entries, net) >= self.limits.per_net {
            return Err(ListFull::Net {
                net,
                limit: self.limits.per_net,
            });
        }
        if in_pool < limit {
            return Ok(());
        }
        // A request whose connection closed goes first, the oldest of them.
        let closed = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.in_pool(proven) && e.closed_at.is_some())
            .min_by_key(|(_, e)| e.since)
            .map(|(i, _)| i);
        if let Some(i) = closed {
            self.entries.remove(i);
            return Ok(());
        }
        if proven {
            return Err(ListFull::Proven { limit });
        }
        // The network holding the most; the oldest of its requests.
        let mut counts: std::collections::HashMap<SourceNet, usize> = Default::default();
        for e in self.entries.iter().filter(|e| !e.candidate.proven) {
            *counts.entry(e.net).or_default() += 1;
        }
        let newcomer = counts.get(&net).copied().unwrap_or(0);
        let biggest = counts
            .iter()
            .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))
            .map(|(n, c)| (*n, *c));
        match biggest {
            Some((big, count)) if count > newcomer + 1 => {
                let oldest = self
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| !e.candidate.proven && e.net == big)
                    .min_by_key(|(_, e)| e.since)
                    .map(|(i, _)| i);
                if let Some(i) = oldest {
                    let evicted = self.entries.remove(i);
                    tracing::info!(
                        node = %evicted.candidate.request.name, source = %evicted.candidate.source,
                        "waiting join request dropped for one from a network with fewer"
                    );
                    evicted.decide(Decision::Refused {
                        reason: format!(
                            "the list of waiting join requests is full and {big} holds the most; asking again later"
                        ),
                        permanent: false,
                    });
                }
                Ok(())
            }
            _ => Err(ListFull::Anonymous { limit }),
        }
    }

    /// The request's connection closed: it stays listed for the grace.
    pub fn closed(&mut self, id: u64, now: Instant) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.candidate.id == id) {
            e.held = None;
            e.closed_at = Some(now);
        }
        self.expire(now);
    }

    /// Every waiting request, by name, then oldest first.
    pub fn list(&mut self, now: Instant) -> Vec<Candidate> {
        self.expire(now);
        let mut all: Vec<Candidate> = self.entries.iter().map(|e| e.candidate.clone()).collect();
        all.sort_by(|a, b| {
            (&a.request.name, a.requested_at, a.id).cmp(&(&b.request.name, b.requested_at, b.id))
        });
        all
    }

    pub fn has_name(&self, name: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.candidate.request.name == name)
    }

    /// The one request for `name` an admin means: the only one, or the one
    /// whose key has `fingerprint`.
    pub fn choose(
        &mut self,
        name: &str,
        fingerprint: Option<&str>,
        now: Instant,
    ) -> Result<Candidate, Choice> {
        self.expire(now);
        let named: Vec<&Candidate> = self
            .entries
            .iter()
            .map(|e| &e.candidate)
            .filter(|c| c.request.name == name)
            .collect();
        let listing = || -> Vec<String> {
            named
                .iter()
                .map(|c| {
                    let token = if c.proven { " (join token)" } else { "" };
                    format!("{} from {}{token}", c.fingerprint(), c.source)
                })
                .collect()
        };
        if named.is_empty() {
            return Err(Choice::NoneWaiting { name: name.into() });
        }
        match fingerprint {
            Some(fp) => named
                .iter()
                .find(|c| c.fingerprint().eq_ignore_ascii_case(fp.trim()))
                .map(|c| (*c).clone())
                .ok_or_else(|| Choice::NoSuchKey {
                    name: name.into(),
                    fingerprint: fp.into(),
                    waiting: listing(),
                }),
            None if named.len() == 1 => Ok(named[0].clone()),
            None => Err(Choice::Ambiguous {
                name: name.into(),
                waiting: listing(),
            }),
        }
    }

    /// `name` was accepted with `key`: its request hears `Accepted`, every
    /// other request for the name a final refusal. All leave the list.
    pub fn accepted(&mut self, name: &str, key: &str, overlay_ip: Ipv6Addr) {
        let (named, rest): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| e.candidate.request.name == name);
        self.entries = rest;
        for e in named {
            if e.candidate.request.key == key {
                e.decide(Decision::Accepted(overlay_ip));
            } else {
                e.decide(Decision::Refused {
                    reason: taken(name, key),
                    permanent: true,
                });
            }
        }
    }

    /// Removes one request; its connection hears a final refusal.
    pub fn reject(&mut self, id: u64) -> Option<Candidate> {
        let i = self.entries.iter().position(|e| e.candidate.id == id)?;
        let e = self.entries.remove(i);
        let candidate = e.candidate.clone();
        e.decide(Decision::Refused {
            reason: "an admin rejected the join request".into(),
            permanent: true,
        });
        Some(candidate)
    }
}

/// The refusal for a request whose name an accepted node holds.
pub fn taken(name: &str, key: &str) -> String {
    format!(
        "name {name:?} belongs to an accepted node with another key ({}); choose another name, or `phoenix forget {name}` on the master",
        fingerprint(key)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str, key: &str) -> JoinRequest {
        JoinRequest {
            name: name.into(),
            key: key.into(),
            public_ip: "192.0.2.1".parse().unwrap(),
            private_ip: "10.0.0.1".parse().unwrap(),
            wg_port: 51820,
            version: "0".into(),
            proof: Some("p".into()),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn small() -> Limits {
        Limits {
            anonymous: 4,
            per_net: 3,
            proven: 2,
            grace: Duration::from_secs(30),
        }
    }

    #[test]
    fn a_request_lives_while_its_connection_is_open_and_a_grace_after() {
        let t = Instant::now();
        let mut w = WaitingRequests::new(small());
        let (c, _rx) = w
            .insert(request("m1", "k1"), ip("192.0.2.1"), false, 5, t)
            .unwrap();
        assert_eq!(c.request.proof, None, "the proof is not kept");
        // Held for an hour: still there.
        let hour = t + Duration::from_secs(3600);
        assert_eq!(w.list(hour).len(), 1);
        w.closed(c.id, hour);
        assert_eq!(w.list(hour + Duration::from_secs(29)).len(), 1);
        assert!(w.list(hour + Duration::from_secs(30)).is_empty());
    }

    #[test]
    fn the_same_minion_asking_again_replaces_its_request_and_keeps_its_age() {
        let t = Instant::now();
        let mut w = WaitingRequests::new(small());
        let (first, mut rx) = w
            .insert(request("m1", "k1"), ip("192.0.2.1"), false, 5, t)
            .unwrap();
        assert!(w.is_repeat("m1", "k1", ip("192.0.2.1")));
        assert!(!w.is_repeat("m1", "k1", ip("192.0.2.2")));
        assert!(!w.is_repeat("m1", "k2", ip("192.0.2.1")));
        let (second, _rx) = w
            .insert(request("m1", "k1"), ip("192.0.2.1"), false, 9, t)
            .unwrap();
        assert_eq!(rx.try_recv(), Ok(Decision::Replaced));
        assert_ne!(first.id, second.id);
        let list = w.list(t);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].requested_at, 5);
        // The old connection closing later does not end the new one.
        w.closed(first.id, t);
        w.closed(first.id, t + Duration::from_secs(60));
        assert_eq!(w.list(t + Duration::from_secs(60)).len(), 1);
    }

    #[test]
    fn a_name_waits_with_several_keys_and_the_admin_chooses_by_fingerprint() {
        let t = Instant::now();
        let mut w = WaitingRequests::new(small());
        let (real, mut real_rx) = w
            .insert(request("m4", "real-key"), ip("192.0.2.1"), true, 1, t)
            .unwrap();
        let (_squat, mut squat_rx) = w
            .insert(request("m4", "squatter"), ip("198.51.100.1"), false, 1, t)
            .unwrap();
        assert_eq!(w.list(t).len(), 2);
        let err = w.choose("m4", None, t).unwrap_err();
        assert!(matches!(err, Choice::Ambiguous { .. }));
        let message = err.to_string();
        assert!(message.contains(&real.fingerprint()), "{message}");
        assert!(message.contains("--fingerprint"), "{message}");
        assert!(matches!(
            w.choose("m4", Some("00:11"), t),
            Err(Choice::NoSuchKey { .. })
        ));
        assert!(matches!(
            w.choose("m5", None, t),
            Err(Choice::NoneWaiting { .. })
        ));
        let chosen = w.choose("m4", Some(&real.fingerprint()), t).unwrap();
        assert_eq!(chosen.request.key, "real-key");
        let ip6: Ipv6Addr = "fd38:dde8:32dd::2".parse().unwrap();
        w.accepted("m4", "real-key", ip6);
        assert_eq!(real_rx.try_recv(), Ok(Decision::Accepted(ip6)));
        match squat_rx.try_recv() {
            Ok(Decision::Refused { reason, permanent }) => {
                assert!(permanent);
                assert!(
                    reason.contains("accepted node with another key"),
                    "{reason}"
                );
            }
            other => panic!("the squatter got {other:?}"),
        }
        assert!(w.list(t).is_empty());
    }

    #[test]
    fn the_lists_are_capped_and_token_holders_have_their_own() {
        let t = Instant::now();
        let mut w = WaitingRequests::new(small());
        // One network may hold 3.
        for i in 0..3 {
            w.insert(request(&format!("a{i}"), "k"), ip("192.0.2.1"), false, 1, t)
                .unwrap();
        }
        assert_eq!(
            w.insert(request("a9", "k"), ip("192.0.2.7"), false, 1, t)
                .unwrap_err(),
            ListFull::Net {
                net: SourceNet::of(ip("192.0.2.0")),
                limit: 3
            }
        );
        w.insert(request("b0", "k"), ip("198.51.100.1"), false, 1, t)
            .unwrap();
        // Full (4): the newcomer's network would hold 1 and 192.0.2.0/24
        // holds 3, so its oldest goes.
        w.insert(request("c0", "k"), ip("203.0.113.1"), false, 1, t)
            .unwrap();
        let names: Vec<String> = w.list(t).into_iter().map(|c| c.request.name).collect();
        assert_eq!(names, ["a1", "a2", "b0", "c0"]);
        // 2, 1, 1: another newcomer makes it 1, 1, 1, 1.
        w.insert(request("d0", "k"), ip("192.0.2.200"), false, 1, t)
            .unwrap_err();
        w.insert(request("e0", "k"), ip("10.9.9.9"), false, 1, t)
            .unwrap();
        // Now every network holds one: newcomers are refused, nobody evicted.
        assert_eq!(
            w.insert(request("f0", "k"), ip("10.8.8.8"), false, 1, t)
                .unwrap_err(),
            ListFull::Anonymous { limit: 4 }
        );
        assert_eq!(w.list(t).len(), 4);
        // Requests with the token still come in, up to their own limit.
        w.insert(request("p0", "k"), ip("10.7.7.7"), true, 1, t)
            .unwrap();
        w.insert(request("p1", "k"), ip("10.7.7.7"), true, 1, t)
            .unwrap();
        assert_eq!(
            w.insert(request("p2", "k"), ip("10.7.7.7"), true, 1, t)
                .unwrap_err(),
            ListFull::Proven { limit: 2 }
        );
        assert_eq!(w.list(t).len(), 6);
    }

    #[test]
    fn a_closed_request_makes_room_first() {
        let t = Instant::now();
        let mut w = WaitingRequests::new(small());
        let mut ids = Vec::new();
        for (i, host) in ["10.0.1.1", "10.0.2.1", "10.0.3.1", "10.0.4.1"]
            .iter()
            .enumerate()
        {
            let (c, rx) = w
                .insert(request(&format!("n{i}"), "k"), ip(host), false, 1, t)
                .unwrap();
            ids.push((c.id, rx));
        }
        w.closed(ids[2].0, t);
        w.insert(request("late", "k"), ip("10.0.5.1"), false, 1, t)
            .unwrap();
        let names: Vec<String> = w.list(t).into_iter().map(|c| c.request.name).collect();
        assert_eq!(names, ["late", "n0", "n1", "n3"]);
        // The held ones heard nothing.
        assert!(ids[0].1.try_recv().is_err());
    }

    #[test]
    fn rejecting_tells_the_connection_it_is_final() {
        let t = Instant::now();
        let mut w = WaitingRequests::new(small());
        let (c, mut rx) = w
            .insert(request("m1", "k1"), ip("192.0.2.1"), false, 1, t)
            .unwrap();
        assert_eq!(w.reject(c.id).unwrap().request.name, "m1");
        assert!(matches!(
            rx.try_recv(),
            Ok(Decision::Refused {
                permanent: true,
                ..
            })
        ));
        assert!(!w.has_name("m1"));
        assert_eq!(w.reject(c.id), None);
    }
}
