//! Certificates from an ACME server (RFC 8555) for the master's HTTPS
//! proxy, validated with the HTTP-01 challenge.
//!
//! # Flow
//!
//! The master makes one [`Acme`] at start ([`Acme::new`] with an
//! [`AcmeConfig`]: the directory URL, an optional extra root certificate
//! for it, the contact e-mail, the data dir) and a [`Challenges`] map,
//! whose clone the proxy holds to answer
//! `GET /.well-known/acme-challenge/TOKEN` on the HTTP port. It serves the
//! certificates [`Acme::current`] loaded from disk, spawns [`Acme::run`],
//! and calls [`Acme::set_hosts`] with every `proxyname` on each route
//! change. New and renewed certificates arrive on [`Acme::subscribe`] (a
//! `watch` of the whole map, so nothing is lost to lag); [`Acme::status`]
//! tells, per host, the certificate's expiry, the last error and when the
//! next order is due.
//!
//! The task orders, one at a time, for each wanted host that is due (see
//! below). An order for host `H`: place a new order for the DNS name `H`
//! (one certificate per host, so hosts renew and fail independently); for
//! each pending authorization, put the HTTP-01 token's key authorization
//! into [`Challenges`] and tell the server the challenge is ready; poll the
//! order until it is ready (waiting the server's `Retry-After` when it
//! gives one, else 250 ms doubling, at most 90 s); withdraw the tokens
//! (also when the order fails or the task is aborted); generate a fresh
//! ECDSA P-256 key and finalize with a CSR for `H`; poll for and download
//! the chain; check that the leaf is for `H` and matches the key; store
//! it; publish it. The ACME account is created at the first order
//! (agreeing to the CA's terms of service, with the e-mail as `mailto:`
//! contact), stored, and reused; a manager whose certificates are all
//! valid makes no network request at all.
//!
//! # Files
//!
//! Under `DATA_DIR/acme` (mode 0700), every file 0600 and written
//! atomically (temporary file, fsync, rename, directory fsync):
//!
//! - `account.json`: the directory URL and the account's id and private
//!   key. A different `--acme-directory` gets a new account (the old file is
//!   replaced); an account the server no longer knows is moved to
//!   `account.json.old` and a new one created.
//! - `certs/<host>.pem` (the chain, leaf first) and `certs/<host>.key` (its
//!   PKCS#8 key). The key is written first; a pair whose key is not the
//!   leaf's (a crash between the two writes) is ignored at load, and the
//!   host ordered again.
//! - `state.json`: per host, the certificate's validity, the failures in
//!   a row, the last error, when the backoff ends, the last attempt.
//!
//! Host names are checked as DNS names ([`canonical_host`]) before they
//! become file names: no `/`, `..`, NUL, wildcard or address.
//!
//! # Renewal and backoff
//!
//! A host is due when it has no certificate, when two thirds of its
//! certificate's lifetime (notBefore to notAfter) have passed (day 60 of
//! Let's Encrypt's 90; never within 10 minutes of its last order, so a
//! certificate that arrives already due is not ordered in a loop), or,
//! after a failed order, when its backoff ends:
//! 1 minute after the first failure, doubling up to 24 hours, each wait
//! jittered by ±20 %. The backoff is persisted, so a restart neither
//! retries early nor orders for a host whose certificate is valid and not
//! due. A success clears it. The task sleeps until the next host is due or
//! the host set changes (at most an hour at a time, so a jump of the wall
//! clock is noticed); it never polls anything but an order in flight.
//!
//! A host removed from the set is no longer renewed. Nothing is deleted:
//! its files and state stay, and its certificate stays in the published
//! map (which holds every stored certificate, loaded again at each start;
//! the proxy serves only the names it routes). A host that comes back is
//! served its stored certificate at once and renewed when due.

mod cert;
mod challenges;
mod client;
mod host;
mod manager;
mod policy;
mod store;

pub use cert::Cert;
pub use challenges::{CHALLENGE_PATH_PREFIX, Challenges};
pub use client::ClientError;
pub use host::{InvalidHost, canonical_host};
pub use manager::{Acme, AcmeConfig, AcmeError, CertMap, HostCert, LETS_ENCRYPT_PRODUCTION};
pub use policy::{
    BACKOFF_MAX_MS, BACKOFF_MIN_MS, HostState, MIN_RENEWAL_INTERVAL_MS, backoff_ms, due_at,
    renew_at,
};
pub use store::{CertStore, StoreError};
