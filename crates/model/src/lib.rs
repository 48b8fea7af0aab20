//! The data Phoenix moves around, with no I/O of its own.
//!
//! - [`spec`]: the service spec users write (seed 000's JSON), with strict
//!   validation whose errors name the service, the field and the reason.
//! - [`env`]: a service's environment in layers, and secrets' views.
//! - [`framed`]: one framed connection with heartbeats and silence
//!   detection, the link as both the master and the minions run it.
//! - [`keys`]: WireGuard (X25519) key pairs and their fingerprints.
//! - [`net`]: the cluster's IPv6 plan (fd38:dde8:32dd::/48).
//! - [`proto`]: messages between CLI, master and minions, and the frame
//!   format that carries them (a 4-byte big-endian length, then JSON).
//! - [`status`]: observed state that minions report.
//! - [`tree`]: reading a tree of spec files from disk (the CLI's `apply`
//!   and the master's git sources).

pub mod env;
pub mod framed;
pub mod keys;
pub mod net;
pub mod proto;
pub mod spec;
pub mod status;
pub mod tree;

/// Locks a mutex of in-memory state, taking over one whose holder
/// panicked: the data is plain values, still consistent enough to serve,
/// and one panic must not take down every later caller (the master's hub,
/// the minion's image cache).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
