//! HTTP basic authentication against a route's bcrypt entries.
//!
//! bcrypt is slow on purpose (tens to hundreds of milliseconds a check),
//! so checks run on the blocking pool, at most one per core at a time, and
//! a successful check is remembered for a while: the cache keys are
//! SHA-256 over the stored hash, the user and the password given, so the
//! cache holds no cleartext, a changed hash misses, and one route's
//! success never opens another route with other entries. A flood of wrong
//! passwords can only queue other first logins behind it: cached
//! credentials are checked before the queue. An unknown user costs a
//! bcrypt check like a wrong password (against the route's first entry, so
//! at its cost), so timing does not tell which users exist. Nothing here
//! logs a header, a password or a hash.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

#[derive(Debug)]
pub(crate) struct Auth {
    cache: Mutex<HashMap<[u8; 32], Instant>>,
    ttl: Duration,
    capacity: usize,
    /// bcrypt checks running at once.
    slots: Arc<Semaphore>,
}

/// Compared against for an unknown user when there is no entry to compare
/// against instead (see `check`).
static DUMMY: OnceLock<String> = OnceLock::new();

impl Auth {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Auth {
            cache: Mutex::new(HashMap::new()),
            ttl,
            capacity: capacity.max(1),
            slots: Arc::new(Semaphore::new(cores)),
        }
    }

    /// Whether `header` (the request's `Authorization`) holds a user and
    /// password that one of `entries` accepts.
    pub async fn check(&self, entries: &[(String, String)], header: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = header.and_then(credentials) else {
            return false;
        };
        let entry = entries
            .iter()
            .find(|(u, _)| u.as_bytes() == user.as_slice());
        let hash = match entry {
            Some((_, hash)) => hash.clone(),
            None => {
                // Against a hash of the route's own cost: the fixed
                // dummy's cost (10) is not the entries' (htpasswd's default
                // is 5), and the difference told which users exist.
                let decoy = entries.first().map(|(_, hash)| hash.clone());
                self.verify(password, decoy).await;
                return false;
            }
        };
        let key = cache_key(&hash, &user, &password);
        if self.cached(&key) {
            return true;
        }
        let ok = self.verify(password, Some(hash)).await;
        if ok {
            self.remember(key);
        }
        ok
    }

    async fn verify(&self, password: Vec<u8>, hash: Option<String>) -> bool {
        let Ok(_slot) = self.slots.clone().acquire_owned().await else {
            return false;
        };
        let task = tokio::task::spawn_blocking(move || match hash {
            Some(hash) => bcrypt::verify(&password, &hash).unwrap_or(false),
            None => {
                let dummy = DUMMY.get_or_init(|| bcrypt::hash("phoenix", 10).unwrap_or_default());
                let _ = bcrypt::verify(&password, dummy);
                false
            }
        });
        task.await.unwrap_or(false)
    }

    fn cached(&self, key: &[u8; 32]) -> bool {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(key) {
            Some(&expires) if expires > now => true,
            Some(_) => {
                cache.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember(&self, key: [u8; 32]) {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.capacity {
            cache.retain(|_, &mut expires| expires > now);
        }
        if cache.len() >= self.capacity {
            // Full of live entries: drop the one closest to expiry.
            if let Some(oldest) = cache.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                cache.remove(&oldest);
            }
        }
        cache.insert(key, now + self.ttl);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.cache.lock().unwrap().len()
    }
}

/// `Basic base64(user:password)` → (user, password), as bytes.
fn credentials(header: &HeaderValue) -> Option<(Vec<u8>, Vec<u8>)> {
    let value = header.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let mut decoded = STANDARD.decode(encoded.trim()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let password = decoded.split_off(colon + 1);
    decoded.truncate(colon);
    Some((decoded, password))
}

fn cache_key(hash: &str, user: &[u8], password: &[u8]) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update(hash.as_bytes());
    digest.update([0]);
    digest.update(user);
    digest.update(b":");
    digest.update(password);
    digest.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "Basic {}",
            STANDARD.encode(format!("{user}:{password}"))
        ))
        .unwrap()
    }

    #[test]
    fn credentials_parse() {
        assert_eq!(
            credentials(&basic("alice", "pa:ss")),
            Some((b"alice".to_vec(), b"pa:ss".to_vec()))
        );
        assert_eq!(
            credentials(&HeaderValue::from_static("basic YTpi")),
            Some((b"a".to_vec(), b"b".to_vec()))
        );
        assert_eq!(credentials(&HeaderValue::from_static("Bearer YTpi")), None);
        assert_eq!(credentials(&HeaderValue::from_static("Basic !!!")), None);
        assert_eq!(credentials(&HeaderValue::from_static("Basic YWI=")), None);
    }

    #[tokio::test]
    async fn checks_and_caches_only_successes() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let entries = vec![("alice".to_owned(), hash.clone())];
        let auth = Auth::new(Duration::from_secs(60), 2);
        assert!(auth.check(&entries, Some(&basic("alice", "secret"))).await);
        assert_eq!(auth.len(), 1);
        assert!(auth.cached(&cache_key(&hash, b"alice", b"secret")));
        assert!(auth.check(&entries, Some(&basic("alice", "secret"))).await);
        assert!(!auth.check(&entries, Some(&basic("alice", "wrong"))).await);
        assert!(!auth.check(&entries, Some(&basic("bob", "secret"))).await);
        assert!(!auth.check(&entries, None).await);
        assert_eq!(auth.len(), 1);
        // Another route's entry for the same user: a different hash, so the
        // cached success does not count there.
        let other = vec![("alice".to_owned(), bcrypt::hash("other", 4).unwrap())];
        assert!(!auth.check(&other, Some(&basic("alice", "secret"))).await);
    }

    #[tokio::test]
    async fn an_unknown_user_takes_as_long_as_a_wrong_password() {
        // htpasswd -B hashes at cost 5 by default; an unknown user was
        // checked against a cost-10 hash, 32 times the work, so timing told
        // which users exist (13 ms against 380 ms through the proxy).
        let entries = vec![("alice".to_owned(), bcrypt::hash("secret", 4).unwrap())];
        let auth = Auth::new(Duration::from_secs(60), 16);
        let time = |user: &'static str| {
            let (auth, entries) = (&auth, &entries);
            async move {
                let start = Instant::now();
                for i in 0..4 {
                    let header = basic(user, &format!("wrong{i}"));
                    assert!(!auth.check(entries, Some(&header)).await);
                }
                start.elapsed()
            }
        };
        // Warm up (the first unknown user may set something up).
        time("bob").await;
        let known = time("alice").await;
        let unknown = time("bob").await;
        assert!(
            unknown < known * 4 + Duration::from_millis(20),
            "unknown user {unknown:?}, known user with a wrong password {known:?}"
        );
        // An unknown user with the password of a known one is still out.
        assert!(!auth.check(&entries, Some(&basic("bob", "secret"))).await);
    }

    #[test]
    fn the_cache_is_bounded_and_expires() {
        let auth = Auth::new(Duration::from_millis(0), 2);
        auth.remember([1; 32]);
        assert!(!auth.cached(&[1; 32]), "a zero ttl expires at once");
        let auth = Auth::new(Duration::from_secs(60), 2);
        for i in 0..5 {
            auth.remember([i; 32]);
        }
        assert_eq!(auth.len(), 2);
        assert!(auth.cached(&[4; 32]));
    }
}
