//! The manager: which hosts need a certificate, when to order, the order
//! itself, and publishing the result.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, Order,
    OrderStatus, RetryPolicy,
};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::cert::{Cert, check_pair};
use crate::challenges::Challenges;
use crate::client::{ClientError, HttpsClient, https_client, parse_roots};
use crate::host::{InvalidHost, canonical_host};
use crate::policy::{HostState, backoff_ms, due_at};
use crate::store::{CertStore, StoreError, StoredAccount};

/// Let's Encrypt's production directory, the master's default.
pub const LETS_ENCRYPT_PRODUCTION: &str = instant_acme::LetsEncrypt::Production.url();

/// How long the server may take to validate the challenges of an order.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the server may take to issue once the order is finalized.
const ISSUANCE_TIMEOUT: Duration = Duration::from_secs(90);
/// The bound on a whole order, network stalls included.
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest the manager sleeps without looking at the clock again (a
/// wall-clock jump or a suspend then costs at most this much delay).
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// What the manager needs to know (the master's `--acme-*` flags).
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The ACME directory, `https://…` ([`LETS_ENCRYPT_PRODUCTION`] by
    /// default in the master).
    pub directory_url: String,
    /// Root certificates (PEM) to trust for the directory besides the
    /// system's: a private ACME server, or the tests' pebble.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// The account's contact (`mailto:`), for the CA's expiry notices.
    pub email: Option<String>,
    /// The master's data directory; the manager uses `data_dir/acme`.
    pub data_dir: PathBuf,
}

/// Why the manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME directory URL {url:?}: it must start with https://")]
    DirectoryUrl { url: String },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the ACME store in the data directory: {0}")]
    Store(#[from] StoreError),
}

/// One host's certificate status, for `phoenix routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCert {
    pub host: String,
    /// The stored certificate's notAfter, Unix ms (`None`: no certificate).
    pub not_after: Option<u64>,
    /// Why the last order failed, until one succeeds; for a name that
    /// cannot have a certificate, why not.
    pub last_error: Option<String>,
    /// When the manager orders next for this host, Unix ms: the renewal
    /// time, the end of the backoff, or about now for a host waiting for
    /// its first certificate (`None` for a name it will never order).
    pub next_attempt: Option<u64>,
}

/// Every stored certificate by host. Shared, so publishing one is cheap.
pub type CertMap = Arc<BTreeMap<String, Arc<Cert>>>;

/// The ACME manager: cheap to clone, all clones the same manager.
#[derive(Clone)]
pub struct Acme {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("directory_url", &self.inner.directory_url)
            .field("store", &self.inner.store.dir())
            .finish()
    }
}

struct Inner {
    directory_url: String,
    email: Option<String>,
    challenges: Challenges,
    store: CertStore,
    http: HttpsClient,
    shared: Mutex<Shared>,
    wake: Notify,
    certs: watch::Sender<CertMap>,
    changes: watch::Sender<u64>,
    account: tokio::sync::Mutex<Option<Account>>,
    orders: AtomicU64,
    running: AtomicBool,
}

#[derive(Default)]
struct Shared {
    /// The hosts that need a certificate (canonical names).
    wanted: BTreeSet<String>,
    /// Names the last `set_hosts` refused.
    refused: Vec<InvalidHost>,
    /// Every host the manager knows about, wanted or not (persisted).
    hosts: BTreeMap<String, HostState>,
}

/// Why an order failed: the step and what went wrong, kept as the host's
/// `last_error`.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {detail}")]
struct OrderError {
    step: &'static str,
    detail: String,
}

fn fail<E: std::error::Error>(step: &'static str) -> impl FnOnce(E) -> OrderError {
    move |e| OrderError {
        step,
        detail: error_text(&e),
    }
}

/// An error and its sources, each once (hyper's "client error (Connect)"
/// alone does not say that the connection was refused).
fn error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

impl Acme {
    /// Opens the store under `config.data_dir` and loads every stored
    /// certificate (published at once: [`Acme::current`]). Makes no network
    /// request: the account is loaded or created at the first order.
    pub fn new(config: AcmeConfig, challenges: Challenges) -> Result<Acme, AcmeError> {
        if !config.directory_url.starts_with("https://") {
            return Err(AcmeError::DirectoryUrl {
                url: config.directory_url,
            });
        }
        let roots = match &config.extra_ca_pem {
            Some(pem) => parse_roots(pem)?,
            None => Vec::new(),
        };
        let http = https_client(roots)?;
        let store = CertStore::open(&config.data_dir)?;
        let mut hosts = store.load_state().unwrap_or_else(|e| {
            warn!(error = %e, "ACME state unreadable; starting from the certificates alone");
            BTreeMap::new()
        });
        let mut certs = BTreeMap::new();
        for host in store.stored_hosts()? {
            match store.load_cert(&host) {
                Ok(Some(cert)) => {
                    certs.insert(host, Arc::new(cert));
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(%host, error = %e, "stored certificate unusable; it will be ordered again")
                }
            }
        }
        // The certificate files, not the state, say what is valid.
        for (host, state) in hosts.iter_mut() {
            let cert = certs.get(host);
            state.not_before = cert.map(|c| c.not_before);
            state.not_after = cert.map(|c| c.not_after);
        }
        for (host, cert) in &certs {
            let state = hosts.entry(host.clone()).or_default();
            state.not_before = Some(cert.not_before);
            state.not_after = Some(cert.not_after);
        }
        let (certs, _) = watch::channel(Arc::new(certs));
        let (changes, _) = watch::channel(0);
        Ok(Acme {
            inner: Arc::new(Inner {
                directory_url: config.directory_url,
                email: config.email,
                challenges,
                store,
                http,
                shared: Mutex::new(Shared {
                    hosts,
                    ..Shared::default()
                }),
                wake: Notify::new(),
                certs,
                changes,
                account: tokio::sync::Mutex::new(None),
                orders: AtomicU64::new(0),
                running: AtomicBool::new(false),
            }),
        })
    }

    /// The challenge map the manager fills (the proxy's clone answers it).
    pub fn challenges(&self) -> &Challenges {
        &self.inner.challenges
    }

    /// The names that need certificates, replacing the previous set (the
    /// master calls this on every route change). Names are compared in
    /// lower case. A host that leaves the set is no longer renewed; its
    /// files stay (and stay published), so a name that comes back has its
    /// certificate at once. Returns the names refused as invalid (they
    /// also show in [`Acme::status`]); the others are applied.
    pub fn set_hosts(&self, hosts: BTreeSet<String>) -> Vec<InvalidHost> {
        let mut wanted = BTreeSet::new();
        let mut refused = Vec::new();
        for name in hosts {
            match canonical_host(&name) {
                Ok(host) => {
                    wanted.insert(host);
                }
                Err(e) => {
                    warn!(error = %e, "no certificate");
                    refused.push(e);
                }
            }
        }
        {
            let mut shared = self.shared();
            shared.wanted = wanted;
            shared.refused = refused.clone();
        }
        self.changed();
        self.inner.wake.notify_one();
        refused
    }

    /// Every stored certificate now (at start: those loaded from disk),
    /// also those of hosts no longer in the set and expired ones (their
    /// `not_after` tells).
    pub fn current(&self) -> CertMap {
        self.inner.certs.borrow().clone()
    }

    /// The certificate map, sent again whenever a certificate is issued or
    /// renewed (level-triggered: a receiver that lags sees the latest map).
    pub fn subscribe(&self) -> watch::Receiver<CertMap> {
        self.inner.certs.subscribe()
    }

    /// A counter that moves whenever [`Acme::status`] may have changed (an
    /// order ended, the host set changed).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// How many orders this manager has placed since it was made.
    pub fn orders_placed(&self) -> u64 {
        self.inner.orders.load(Ordering::Relaxed)
    }

    /// The wanted hosts' certificates, errors and next orders, then the
    /// refused names, by name.
    pub fn status(&self) -> Vec<HostCert> {
        let now = now_ms();
        let shared = self.shared();
        let mut out: Vec<HostCert> = shared
            .wanted
            .iter()
            .map(|host| {
                let state = shared.hosts.get(host).cloned().unwrap_or_default();
                HostCert {
                    host: host.clone(),
                    not_after: state.not_after,
                    last_error: state.last_error.clone(),
                    next_attempt: Some(due_at(&state, now)),
                }
            })
            .collect();
        out.extend(shared.refused.iter().map(|e| HostCert {
            host: e.name.clone(),
            not_after: None,
            last_error: Some(e.to_string()),
            next_attempt: None,
        }));
        out
    }

    /// The manager's task: orders, one at a time, for every wanted host
    /// that is due (no certificate, two thirds of its lifetime gone, or its
    /// backoff over), then sleeps until the next one is due or the host
    /// set changes. Runs until dropped (abort the task to stop it; an order
    /// cut short withdraws its challenge tokens). One run at a time: a call
    /// while another runs returns at once.
    pub async fn run(&self) {
        if self.inner.running.swap(true, Ordering::SeqCst) {
            warn!("the ACME manager is already running");
            return;
        }
        // Cleared when this future ends or is dropped (an aborted task), so
        // the manager can be run again.
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _running = Running(&self.inner.running);
        loop {
            let now = now_ms();
            let (due, next) = {
                let shared = self.shared();
                let mut due: Option<(u64, &String)> = None;
                let mut next: Option<u64> = None;
                for host in &shared.wanted {
                    let at = shared.hosts.get(host).map_or(now, |s| due_at(s, now));
                    if at <= now {
                        if due.is_none_or(|(t, _)| at < t) {
                            due = Some((at, host));
                        }
                    } else if next.is_none_or(|t| at < t) {
                        next = Some(at);
                    }
                }
                (due.map(|(_, h)| h.clone()), next)
            };
            if let Some(host) = due {
                self.attempt(&host).await;
                continue;
            }
            let sleep = next.map_or(MAX_SLEEP, |t| {
                Duration::from_millis(t.saturating_sub(now)).min(MAX_SLEEP)
            });
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// One order for `host`, and its outcome recorded, stored and
    /// published.
    async fn attempt(&self, host: &str) {
        info!(%host, directory = %self.inner.directory_url, "ordering a certificate");
        let result = match tokio::time::timeout(ORDER_TIMEOUT, self.order(host)).await {
            Ok(r) => r,
            Err(_) => Err(OrderError {
                step: "ordering",
                detail: format!("no certificate after {} s", ORDER_TIMEOUT.as_secs()),
            }),
        };
        let now = now_ms();
        let snapshot = {
            let mut shared = self.shared();
            let state = shared.hosts.entry(host.to_string()).or_default();
            state.last_attempt = Some(now);
            match &result {
                Ok(cert) => {
                    info!(%host, not_after = cert.not_after, "certificate issued");
                    state.not_before = Some(cert.not_before);
                    state.not_after = Some(cert.not_after);
                    state.failures = 0;
                    state.last_error = None;
                    state.retry_at = None;
                }
                Err(e) => {
                    state.failures = state.failures.saturating_add(1);
                    let wait = backoff_ms(state.failures, jitter());
                    state.retry_at = Some(now.saturating_add(wait));
                    state.last_error = Some(e.to_string());
                    warn!(%host, error = %e, failures = state.failures, retry_in_s = wait / 1000,
                        "certificate order failed");
                }
            }
            shared.hosts.clone()
        };
        let store = self.inner.store.clone();
        let saved = tokio::task::spawn_blocking(move || store.save_state(&snapshot)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot save the ACME state"),
            Err(e) => warn!(error = %e, "cannot save the ACME state"),
        }
        if let Ok(cert) = result {
            self.inner.certs.send_modify(|map| {
                Arc::make_mut(map).insert(host.to_string(), Arc::new(cert));
            });
        }
        self.changed();
    }

    /// The order itself (RFC 8555 section 7): new order, HTTP-01 for every
    /// pending authorization, wait for validation, finalize with a CSR for
    /// `host` and a fresh key, download and check the chain, store it.
    async fn order(&self, host: &str) -> Result<Cert, OrderError> {
        let account = self.account().await?;
        self.inner.orders.fetch_add(1, Ordering::Relaxed);
        let identifiers = [Identifier::Dns(host.to_string())];
        let mut order = match account.new_order(&NewOrder::new(&identifiers)).await {
            Ok(order) => order,
            Err(e) => {
                if is_problem(&e, "accountDoesNotExist") {
                    self.forget_account().await;
                }
                return Err(fail("placing the order")(e));
            }
        };

        let mut tokens = Tokens {
            challenges: self.inner.challenges.clone(),
            tokens: Vec::new(),
        };
        {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(fail("fetching an authorization"))?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(OrderError {
                            step: "fetching an authorization",
                            detail: format!("it is {other:?}"),
                        });
                    }
                }
                let mut challenge =
                    authz
                        .challenge(ChallengeType::Http01)
                        .ok_or_else(|| OrderError {
                            step: "choosing a challenge",
                            detail: "the server offers no http-01 challenge".into(),
                        })?;
                let key_authorization = challenge.key_authorization().as_str().to_string();
                tokens.add(challenge.token.clone(), key_authorization);
                challenge
                    .set_ready()
                    .await
                    .map_err(fail("answering the challenge"))?;
            }
        }

        let retry = RetryPolicy::new().timeout(VALIDATION_TIMEOUT);
        let status = match order.poll_ready(&retry).await {
            Ok(status) => status,
            Err(e) => {
                let why = challenge_error(&mut order).await;
                return Err(OrderError {
                    step: "validating the http-01 challenge",
                    detail: why.unwrap_or_else(|| error_text(&e)),
                });
            }
        };
        if status != OrderStatus::Ready {
            let why = challenge_error(&mut order).await;
            return Err(OrderError {
                step: "validating the http-01 challenge",
                detail: why.unwrap_or_else(|| format!("the order is {status:?}")),
            });
        }
        drop(tokens);

        let key = rcgen::KeyPair::generate().map_err(fail("generating the key"))?;
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
            .map_err(fail("writing the CSR"))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(fail("writing the CSR"))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(fail("finalizing the order"))?;
        let chain = order
            .poll_certificate(&RetryPolicy::new().timeout(ISSUANCE_TIMEOUT))
            .await
            .map_err(fail("downloading the certificate"))?;
        let cert = check_pair(host, chain, key.serialize_pem()).map_err(|detail| OrderError {
            step: "checking the certificate",
            detail,
        })?;
        let store = self.inner.store.clone();
        let to_store = cert.clone();
        tokio::task::spawn_blocking(move || store.save_cert(&to_store))
            .await
            .map_err(fail("storing the certificate"))?
            .map_err(fail("storing the certificate"))?;
        Ok(cert)
    }

    /// The ACME account: the stored one if it belongs to this directory,
    /// else a new one (stored at once).
    async fn account(&self) -> Result<Account, OrderError> {
        let mut slot = self.inner.account.lock().await;
        if let Some(account) = &*slot {
            return Ok(account.clone());
        }
        let store = self.inner.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.load_account())
            .await
            .map_err(fail("loading the ACME account"))?
            .map_err(fail("loading the ACME account"))?;
        let http = Box::new(self.inner.http.clone());
        let directory_url = self.inner.directory_url.clone();
        let account = match stored {
            Some(stored) if stored.directory_url == directory_url => {
                Account::builder_with_http(http)
                    .from_credentials(stored.credentials)
                    .await
                    .map_err(fail("loading the ACME account"))?
            }
            other => {
                if let Some(other) = other {
                    info!(old = %other.directory_url, new = %directory_url,
                        "the ACME directory changed; creating an account there");
                }
                let contact = self.inner.email.as_ref().map(|e| format!("mailto:{e}"));
                let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
                let (account, credentials) = Account::builder_with_http(http)
                    .create(
                        &NewAccount {
                            contact: &contacts,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        directory_url.clone(),
                        None,
                    )
                    .await
                    .map_err(fail("creating the ACME account"))?;
                let store = self.inner.store.clone();
                let stored = StoredAccount {
                    directory_url,
                    credentials,
                };
                tokio::task::spawn_blocking(move || store.save_account(&stored))
                    .await
                    .map_err(fail("storing the ACME account"))?
                    .map_err(fail("storing the ACME account"))?;
                info!(id = account.id(), "ACME account created");
                account
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    /// The server does not know the account: move its file aside so the next
    /// order creates a new one.
    async fn forget_account(&self) {
        warn!("the ACME server does not know the stored account; a new one will be created");
        *self.inner.account.lock().await = None;
        let store = self.inner.store.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.retire_account()).await {
            warn!(error = %e, "cannot move the old ACME account aside");
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.inner
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The challenge tokens an order published; withdrawn when dropped, so an
/// order that fails, times out or is aborted leaves none behind.
struct Tokens {
    challenges: Challenges,
    tokens: Vec<String>,
}

impl Tokens {
    fn add(&mut self, token: String, key_authorization: String) {
        self.challenges.insert(token.clone(), key_authorization);
        self.tokens.push(token);
    }
}

impl Drop for Tokens {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.challenges.remove(token);
        }
    }
}

/// The server's reason for an invalid authorization (the challenge's
/// error), if it gives one.
async fn challenge_error(order: &mut Order) -> Option<String> {
    if let Some(problem) = &order.state().error {
        return Some(problem_text(problem));
    }
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let Ok(mut authz) = authz else { continue };
        if authz.refresh().await.is_err() {
            continue;
        }
        let name = authz.identifier().to_string();
        if let Some(problem) = authz.challenges.iter().find_map(|c| c.error.as_ref()) {
            return Some(format!("{name}: {}", problem_text(problem)));
        }
        if authz.status != AuthorizationStatus::Valid {
            return Some(format!("{name}: the authorization is {:?}", authz.status));
        }
    }
    None
}

fn problem_text(problem: &instant_acme::Problem) -> String {
    match (&problem.detail, &problem.r#type) {
        (Some(detail), Some(kind)) => format!("{detail} ({kind})"),
        (Some(detail), None) => detail.clone(),
        _ => problem.to_string(),
    }
}

fn is_problem(e: &instant_acme::Error, kind: &str) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.r#type.as_deref() == Some(&format!("urn:ietf:params:acme:error:{kind}")))
}

fn jitter() -> f64 {
    f64::from(OsRng.next_u32()) / (f64::from(u32::MAX) + 1.0)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
