//! The HTTP-01 answers in flight: token → key authorization.
//!
//! The ACME manager fills the map while an order waits for validation and
//! empties it when the order ends; whatever serves the master's HTTP port
//! (the proxy) holds a clone and answers
//! `GET /.well-known/acme-challenge/TOKEN` with [`Challenges::get`], or
//! [`Challenges::answer`] for the whole path. The type uses nothing but
//! `std`, so holding one costs the holder no dependency.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

/// The path prefix of HTTP-01 challenge requests (RFC 8555, section 8.3).
pub const CHALLENGE_PATH_PREFIX: &str = "/.well-known/acme-challenge/";

/// A shared map from challenge token to key authorization; cloning shares
/// it.
#[derive(Clone, Default)]
pub struct Challenges {
    map: Arc<RwLock<HashMap<String, String>>>,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("tokens", &self.len())
            .finish()
    }
}

impl Challenges {
    pub fn new() -> Challenges {
        Challenges::default()
    }

    /// The key authorization to answer for `token`, if an order waits on it.
    pub fn get(&self, token: &str) -> Option<String> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .cloned()
    }

    /// The body to answer a request for `path` with: `Some` only for
    /// `/.well-known/acme-challenge/TOKEN` with a token that waits. The
    /// response is `200`, `Content-Type: application/octet-stream` (or
    /// `text/plain`), the returned string as the body; anything else under
    /// the prefix is a `404`.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(CHALLENGE_PATH_PREFIX)?;
        if token.is_empty() || token.contains('/') {
            return None;
        }
        self.get(token)
    }

    /// Publishes the answer for `token` (the manager does this).
    pub fn insert(&self, token: String, key_authorization: String) {
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token, key_authorization);
    }

    /// Withdraws the answer for `token`.
    pub fn remove(&self, token: &str) {
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(token);
    }

    /// How many tokens wait.
    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_map_and_answer_only_full_challenge_paths() {
        let a = Challenges::new();
        let b = a.clone();
        a.insert("tok".into(), "tok.thumb".into());
        assert_eq!(b.get("tok").as_deref(), Some("tok.thumb"));
        assert_eq!(
            b.answer("/.well-known/acme-challenge/tok").as_deref(),
            Some("tok.thumb")
        );
        assert_eq!(b.answer("/.well-known/acme-challenge/"), None);
        assert_eq!(b.answer("/.well-known/acme-challenge/tok/x"), None);
        assert_eq!(b.answer("/tok"), None);
        assert_eq!(b.answer("/.well-known/acme-challenge/other"), None);
        b.remove("tok");
        assert!(a.is_empty());
        assert_eq!(a.get("tok"), None);
    }
}
