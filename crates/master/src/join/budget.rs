//! Join budgets: how many join requests the endpoint takes, and from whom.
//!
//! Requests are sorted before they are charged. One that proves the join
//! token (a keyed BLAKE3 of its key, cheap to check) draws from an allowance
//! of its own, which no anonymous request can touch, so a flood without the
//! token cannot keep a minion that holds it out. Anonymous requests draw
//! first from their source network's bucket (an IPv4 /24 or an IPv6 /64: one
//! host rotating its addresses stays in one bucket), then from one
//! anonymous bucket for the whole endpoint, which bounds the work a flood
//! from many networks causes. A bucket is charged only when every bucket
//! the request needs has a token, so a refused request costs nothing.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// The network a request comes from, as the budgets count it: the source
/// address cut to its /24 (IPv4) or /64 (IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceNet(IpAddr);

impl SourceNet {
    pub fn of(ip: IpAddr) -> SourceNet {
        // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        SourceNet(match ip {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(v4.to_bits() & !0xff)),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        })
    }
}

impl std::fmt::Display for SourceNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(ip) => write!(f, "{ip}/24"),
            IpAddr::V6(ip) => write!(f, "{ip}/64"),
        }
    }
}

/// A token bucket's shape: `burst` at once, then one every `every`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub burst: u32,
    pub every: Duration,
}

impl Rate {
    /// How long an emptied bucket takes to fill again.
    fn refill_time(self) -> Duration {
        self.every * self.burst
    }
}

/// A token bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let gained =
            now.saturating_duration_since(self.at).as_secs_f64() / rate.every.as_secs_f64();
        self.tokens = (self.tokens + gained).min(f64::from(rate.burst));
        self.at = now;
    }

    fn has_one(&self) -> bool {
        self.tokens >= 1.0
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

/// The endpoint's budgets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// Anonymous requests from one source network.
    pub per_net: Rate,
    /// Anonymous requests from everywhere together.
    pub anonymous: Rate,
    /// Requests that prove the join token, from everywhere together.
    pub proven: Rate,
}

impl Default for Rates {
    fn default() -> Self {
        Rates {
            // A handful of machines behind one NAT can ask at once; a host
            // rotating addresses in its /24 gets one request per 6 s.
            per_net: Rate {
                burst: 10,
                every: Duration::from_secs(6),
            },
            // Bounds the work of a flood from many networks (each request
            // that gets through is logged and may take a waiting slot).
            anonymous: Rate {
                burst: 100,
                every: Duration::from_millis(100),
            },
            // Token holders are the cluster's own machines: a whole rack
            // may start at once.
            proven: Rate {
                burst: 200,
                every: Duration::from_millis(50),
            },
        }
    }
}

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OverBudget {
    #[error("too many join requests from {0}")]
    SourceNet(SourceNet),
    #[error("too many join requests without the join token")]
    Anonymous,
    #[error("too many join requests with the join token")]
    Proven,
}

/// Source networks tracked before the full buckets among them are forgotten.
const TRACKED_NETS: usize = 10_000;

pub struct Budgets {
    rates: Rates,
    per_net: HashMap<SourceNet, Bucket>,
    anonymous: Bucket,
    proven: Bucket,
}

impl Budgets {
    pub fn new(rates: Rates, now: Instant) -> Budgets {
        Budgets {
            per_net: HashMap::new(),
            anonymous: Bucket::full(rates.anonymous, now),
            proven: Bucket::full(rates.proven, now),
            rates,
        }
    }

    /// Charges an anonymous request from `ip`: its network's bucket and the
    /// anonymous one, or neither.
    pub fn take_anonymous(&mut self, ip: IpAddr, now: Instant) -> Result<(), OverBudget> {
        let net = SourceNet::of(ip);
        if self.per_net.len() >= TRACKED_NETS && !self.per_net.contains_key(&net) {
            // A bucket untouched for its refill time is full again: the
            // same as no entry.
            let refill = self.rates.per_net.refill_time();
            self.per_net
                .retain(|_, b| now.saturating_duration_since(b.at) < refill);
        }
        let own = self
            .per_net
            .entry(net)
            .or_insert_with(|| Bucket::full(self.rates.per_net, now));
        own.refill(self.rates.per_net, now);
        self.anonymous.refill(self.rates.anonymous, now);
        if !own.has_one() {
            return Err(OverBudget::SourceNet(net));
        }
        if !self.anonymous.has_one() {
            return Err(OverBudget::Anonymous);
        }
        own.take();
        self.anonymous.take();
        Ok(())
    }

    /// Charges a request that proved the join token.
    pub fn take_proven(&mut self, now: Instant) -> Result<(), OverBudget> {
        self.proven.refill(self.rates.proven, now);
        if !self.proven.has_one() {
            return Err(OverBudget::Proven);
        }
        self.proven.take();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates() -> Rates {
        Rates {
            per_net: Rate {
                burst: 3,
                every: Duration::from_secs(6),
            },
            anonymous: Rate {
                burst: 5,
                every: Duration::from_secs(1),
            },
            proven: Rate {
                burst: 2,
                every: Duration::from_secs(1),
            },
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn source_nets_are_slash_24_and_slash_64() {
        assert_eq!(
            SourceNet::of(ip("192.0.2.77")),
            SourceNet::of(ip("192.0.2.1"))
        );
        assert_ne!(
            SourceNet::of(ip("192.0.2.77")),
            SourceNet::of(ip("192.0.3.77"))
        );
        assert_eq!(
            SourceNet::of(ip("::ffff:192.0.2.9")),
            SourceNet::of(ip("192.0.2.1"))
        );
        assert_eq!(
            SourceNet::of(ip("2001:db8:1:2:aaaa::1")),
            SourceNet::of(ip("2001:db8:1:2::ffff"))
        );
        assert_ne!(
            SourceNet::of(ip("2001:db8:1:2::1")),
            SourceNet::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(SourceNet::of(ip("192.0.2.77")).to_string(), "192.0.2.0/24");
    }

    #[test]
    fn one_network_cannot_use_up_the_anonymous_budget() {
        let t = Instant::now();
        let mut b = Budgets::new(rates(), t);
        // Rotating addresses inside one /24 share its bucket of 3.
        for host in 1..=3 {
            assert_eq!(b.take_anonymous(ip(&format!("192.0.2.{host}")), t), Ok(()));
        }
        assert_eq!(
            b.take_anonymous(ip("192.0.2.200"), t),
            Err(OverBudget::SourceNet(SourceNet::of(ip("192.0.2.0"))))
        );
        // Another network still gets in: the anonymous bucket has 2 left.
        assert_eq!(b.take_anonymous(ip("198.51.100.1"), t), Ok(()));
        assert_eq!(b.take_anonymous(ip("203.0.113.1"), t), Ok(()));
        assert_eq!(
            b.take_anonymous(ip("198.51.100.2"), t),
            Err(OverBudget::Anonymous)
        );
        // A refused request took nothing from its network's bucket: one
        // second later the anonymous bucket has one token, and
        // 198.51.100.0/24 (one of 3 used) may take it.
        let later = t + Duration::from_secs(1);
        assert_eq!(b.take_anonymous(ip("198.51.100.3"), later), Ok(()));
        // 6 s on, 192.0.2.0/24 has one request again.
        let much_later = t + Duration::from_secs(6);
        assert_eq!(b.take_anonymous(ip("192.0.2.9"), much_later), Ok(()));
        assert!(b.take_anonymous(ip("192.0.2.9"), much_later).is_err());
    }

    #[test]
    fn an_anonymous_flood_leaves_the_proven_allowance_whole() {
        let t = Instant::now();
        let mut b = Budgets::new(rates(), t);
        let mut admitted = 0;
        for net in 0..100u32 {
            let a = Ipv4Addr::from(0x0a00_0000 + (net << 8) + 1);
            if b.take_anonymous(IpAddr::V4(a), t).is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(
            admitted, 5,
            "the anonymous bucket bounds a many-network flood"
        );
        assert_eq!(b.take_proven(t), Ok(()));
        assert_eq!(b.take_proven(t), Ok(()));
        assert_eq!(b.take_proven(t), Err(OverBudget::Proven));
        // And proven requests take nothing from anonymous ones.
        let later = t + Duration::from_secs(1);
        assert_eq!(b.take_anonymous(ip("192.0.2.1"), later), Ok(()));
    }

    #[test]
    fn full_buckets_are_forgotten_when_many_networks_are_tracked() {
        let t = Instant::now();
        let mut b = Budgets::new(
            Rates {
                anonymous: Rate {
                    burst: u32::MAX,
                    every: Duration::from_millis(1),
                },
                ..rates()
            },
            t,
        );
        for net in 0..TRACKED_NETS as u32 {
            let a = Ipv4Addr::from(net << 8);
            b.take_anonymous(IpAddr::V4(a), t).unwrap();
        }
        assert_eq!(b.per_net.len(), TRACKED_NETS);
        // Long after, all are full again; a new network clears them out.
        let later = t + Duration::from_secs(60);
        b.take_anonymous(ip("192.0.2.1"), later).unwrap();
        assert_eq!(b.per_net.len(), 1);
    }
}
