//! Messages between the CLI, the master and the minions, and their framing.
//!
//! Three conversations, each over its own stream:
//! - join (minion → master's public endpoint): one [`JoinRequest`], one [`JoinReply`];
//! - link (minion ↔ master, long-lived): [`ToMaster`] up, [`ToMinion`] down;
//!   an image fetch opens its own short link connection with [`ToMaster::FetchIndex`];
//! - api (CLI ↔ master over the Unix socket): one [`Request`], then
//!   [`Reply`] frames until a final one.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::spec::Spec;
use crate::status::{NodeStats, ServiceStatus};

/// Bumped on any incompatible change to these messages.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame accepted (a desired set of thousands of services fits).
pub const MAX_FRAME: usize = 64 << 20;

/// The largest desired set the master sends a minion, serialized. Well
/// under [`MAX_FRAME`], so a set that passed the deploy check always fits
/// in a frame (with room for a newer master's additions to it); a change
/// that would go past it is refused at deploy.
pub const MAX_DESIRED_SET: usize = MAX_FRAME / 4;

/// The largest join request accepted on the public endpoint.
pub const MAX_JOIN_FRAME: usize = 4 << 10;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("a frame of {0} bytes is larger than the limit of {1}")]
    TooLarge(usize, usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// One message as a whole frame (length prefix included); a body over
/// `limit` bytes is refused before anything is written.
pub fn encode_frame<T: Serialize>(msg: &T, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, msg)?;
    let len = buf.len() - 4;
    // A frame's length field is 32 bits, whatever the limit.
    if len > limit || u32::try_from(len).is_err() {
        return Err(FrameError::TooLarge(len, limit));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Writes one message as a frame; one over [`MAX_FRAME`] is an error and
/// nothing is written.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let buf = encode_frame(msg, MAX_FRAME)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R, T>(r: &mut R, limit: usize) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(FrameError::TooLarge(len, limit));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body)?))
}

// ---------------------------------------------------------------- join

/// The one clear-text message a minion sends: who it is. It carries no secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    pub name: String,
    /// The minion's WireGuard public key (base64).
    pub key: String,
    pub public_ip: IpAddr,
    pub private_ip: IpAddr,
    /// The minion's WireGuard UDP port (on `public_ip`).
    pub wg_port: u16,
    pub version: String,
    /// Proof of the cluster's join token: `keys::token_proof(token, key)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

/// The master's answers on a join connection. The master keeps the
/// connection open after `Waiting` and sends `Accepted` (or `Refused`) when
/// an admin decides, so the minion learns it at once, without asking again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum JoinReply {
    /// Recorded; an admin must `phoenix accept` it.
    Waiting,
    /// A member: this is its overlay address.
    Accepted { overlay_ip: Ipv6Addr },
    Refused {
        reason: String,
        /// The refusal cannot change by asking again (the request is
        /// malformed, its token proof is wrong, an admin rejected it, or the
        /// name belongs to an accepted node with another key): the minion
        /// stops. Otherwise (rate limits, a full waiting list, a master
        /// error) it backs off and asks again. Absent from older masters,
        /// so an older master's refusals are retried.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        permanent: bool,
    },
}

// ---------------------------------------------------------------- link

/// Minion → master.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum ToMaster {
    /// First frame of the long-lived connection.
    Hello {
        name: String,
        key: String,
        version: String,
        /// The revision of the desired set the minion holds.
        revision: u64,
        /// Whether its services share its network (`--service-network
        /// host`): then two runs of one service cannot be side by side, so
        /// an update there stops the old version before it starts the new.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        host_network: bool,
        /// It takes desired sets without the proxy's routing fields
        /// (`proxyname`, `proxypath`, `proxyauth`), and a set that differs
        /// from the one it runs only in those restarts nothing. The master
        /// leaves them out only for such a minion: an older one would
        /// restart every run whose assignment lost them.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        routing_free: bool,
    },
    /// Sent every `heartbeat_ms` (from the welcome) so the master can tell a
    /// silent minion from a lost one.
    Heartbeat,
    /// Service states. `full` replaces everything known about the node.
    Status {
        services: Vec<ServiceStatus>,
        full: bool,
    },
    /// Services the minion no longer runs, by instance key (the name, or
    /// `NAME.GENERATION` for a run an update started).
    Gone {
        names: Vec<String>,
    },
    Node(NodeStats),
    /// Log bytes for an earlier [`ToMinion::Logs`].
    LogData {
        stream: u64,
        data: String,
    },
    /// The end of a log stream; `error` when it could not be served.
    LogEnd {
        stream: u64,
        error: Option<String>,
    },
    /// First frame of a fetch connection: the index (chunk list) of this
    /// image, answered with [`ToMinion::Index`].
    FetchIndex {
        name: String,
        key: String,
        image: String,
        hash: String,
    },
    /// Then, any number of times: these chunks, answered with
    /// [`ToMinion::Chunks`].
    FetchChunks {
        hashes: Vec<String>,
        /// Per chunk, a chunk the minion holds that is likely similar (the
        /// one at its place in the version it has); the master may send the
        /// chunk as a delta against it.
        #[serde(default)]
        bases: Vec<Option<String>>,
    },
    /// Which registry images the minion holds, is fetching or failed to
    /// fetch; sent on connect and whenever it changes.
    Images(ImageSync),
}

/// A minion's image cache as it reports it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ImageSync {
    /// Hashes of the complete, verified images it holds.
    pub held: Vec<String>,
    /// The image being fetched, with bytes of chunks done and needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetching: Option<Fetching>,
    /// Images whose last fetch failed: hash → why.
    #[serde(default)]
    pub failed: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Fetching {
    pub hash: String,
    pub done: u64,
    pub total: u64,
}

/// One file of the master's registry, as minions pre-cache it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    pub name: String,
    pub hash: String,
    pub size: u64,
}

/// Master → minion.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum ToMinion {
    /// The connection is admitted; `master_key` lets the minion check it
    /// reached the master it was set up for.
    Welcome {
        master_key: String,
        heartbeat_ms: u64,
    },
    /// The master's heartbeat; the minion reconnects when they stop.
    Heartbeat,
    /// Not admitted (yet); the connection closes.
    Refused { reason: String },
    /// The whole desired set; replaces the previous one.
    Desired(DesiredSet),
    /// Send the last `tail` lines of a service's log, then more if `follow`.
    Logs {
        stream: u64,
        service: String,
        tail: usize,
        follow: bool,
    },
    /// Stop a following log stream.
    LogsCancel { stream: u64 },
    /// The image's index (`phoenix_chunks::Index::to_bytes`) of this many
    /// bytes follows the frame.
    Index { size: u64 },
    /// A zstd batch of chunks (`phoenix_chunks::encode_batch`) of this many
    /// bytes follows the frame.
    Chunks { size: u64 },
    /// Every image in the registry; sent on connect and on every change.
    /// The minion fetches what it lacks and drops what is in neither this
    /// nor its desired set.
    Catalog { images: Vec<CatalogEntry> },
}

/// Everything a minion should run, as of `revision`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct DesiredSet {
    pub revision: u64,
    pub services: Vec<Assignment>,
    /// Every other accepted minion, as this one's direct WireGuard peer
    /// (the mesh): services' traffic goes straight from minion to minion,
    /// never through the master, and keeps flowing while the master is
    /// down. Sorted by node name. Absent from older masters' sets (and
    /// from desired.json files they wrote): no mesh peers.
    #[serde(default)]
    pub peers: Vec<MeshPeer>,
}

/// Another minion, as a direct WireGuard peer of the minion that gets it.
/// Listed whether or not it runs services (node-to-node traffic) and
/// whether or not it is connected to the master now (its endpoint is
/// still known).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MeshPeer {
    /// The node's name, for logs.
    pub node: String,
    /// Its WireGuard public key (base64).
    pub key: String,
    /// Its overlay address (`fd38:dde8:32dd::N`): a /128 it is allowed.
    pub overlay_ip: Ipv6Addr,
    /// Where its WireGuard listens: the public IP and WireGuard port it
    /// joined with. None when it runs without the overlay.
    pub endpoint: Option<SocketAddr>,
    /// The addresses of the services it runs, each a /128 it is allowed;
    /// sorted.
    pub services: Vec<Ipv6Addr>,
}

/// One service placed on a minion.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Assignment {
    pub spec: Spec,
    /// The service's address (the spec's `ip` or one assigned by the master).
    pub ip: Ipv6Addr,
    /// BLAKE3 of the image at deploy or update time, hex.
    pub image_hash: String,
    pub image_size: u64,
    /// Bumped by every `update`, so that even an unchanged spec restarts.
    pub generation: u64,
    /// The addresses of the services the spec's `link` names, by name. A
    /// name whose service does not exist (deleted since) is absent. Absent
    /// from older masters' sets: no links.
    #[serde(default)]
    pub links: BTreeMap<String, Ipv6Addr>,
    /// The key of this run of the service on its minion: its task, work
    /// dir, cgroup, run record, network namespace, log and status are named
    /// by it. Absent: the service's name. A zero-downtime update runs the
    /// new version under its own key (`NAME.GENERATION`, see
    /// [`instance_key`]) beside the old one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// This run's own address when it is not `ip` (a run started by a
    /// zero-downtime update): its health checks and the proxy reach it
    /// there, and it keeps it for as long as it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_ip: Option<Ipv6Addr>,
    /// Whether the service's stable address `ip` routes to this run. False
    /// only for the new version of an update before the switch; at the
    /// switch it turns true without a restart (the minion adds `ip` to the
    /// run's namespace and points the host route at it).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub holds_ip: bool,
    /// The service's environment as the master resolved it: the cluster's
    /// variables, its env files and its `env`, secrets in place
    /// (`crate::env`); the image's own variables go under it and Phoenix's
    /// over it. Absent from older masters' sets: the spec's `env`. Its
    /// `Debug` shows no value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<crate::env::Environment>,
}

fn yes() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if
fn is_true(b: &bool) -> bool {
    *b
}

/// The instance key of a run that a zero-downtime update started:
/// `NAME.GENERATION` (a `.` is never in a service name).
pub fn instance_key(name: &str, generation: u64) -> String {
    format!("{name}.{generation}")
}

impl Assignment {
    /// The key this run is known by on its minion (see
    /// [`Assignment::instance`]).
    pub fn key(&self) -> &str {
        self.instance.as_deref().unwrap_or(&self.spec.name)
    }

    /// The variables the service's process gets from the master (see
    /// [`Assignment::env`]), in order; the spec's `env` from an older
    /// master.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        let own = |(k, v): (&str, &str)| (k.to_owned(), v.to_owned());
        match &self.env {
            Some(env) => env.pairs().map(own).collect(),
            None => self.spec.env_pairs().map(own).collect(),
        }
    }

    /// Where this run itself is reached: its own address, else `ip`.
    pub fn reach_ip(&self) -> Ipv6Addr {
        self.own_ip.unwrap_or(self.ip)
    }

    /// Every address that routes to this run: its own and, while it holds
    /// it, the stable one.
    pub fn addresses(&self) -> Vec<Ipv6Addr> {
        let mut out = vec![self.reach_ip()];
        if self.holds_ip && self.own_ip.is_some_and(|own| own != self.ip) {
            out.push(self.ip);
        }
        out
    }
}

// ---------------------------------------------------------------- api

/// CLI → master, one per connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "req", rename_all = "snake_case")]
pub enum Request {
    /// → [`MasterInfo`]
    MasterInfo,
    /// → `Vec<`[`WaitingNode`]`>`
    Waiting,
    /// → [`Accepted`]. `fingerprint` chooses among several waiting
    /// requests for one name (their keys' fingerprints differ).
    Accept {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint: Option<String>,
    },
    /// → [`Rejected`]. `fingerprint` as for `Accept`.
    Reject {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint: Option<String>,
    },
    /// Removes an accepted node, its overlay peer and its key. → [`Forgotten`]
    Forget { name: String },
    /// `source` names the file in error messages; `text` is its content;
    /// `env_files` the env files its specs name, each by
    /// `spec::env_file_key`. → `Vec<`[`Applied`]`>`
    Deploy {
        source: String,
        text: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        env_files: Vec<SourceFile>,
    },
    /// → `Vec<`[`Applied`]`>`
    Update {
        source: String,
        text: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        env_files: Vec<SourceFile>,
    },
    /// → [`Deleted`]
    Del { name: String },
    /// Restarts services where they are: each one's generation is bumped
    /// and its image resolved again (so a newly pushed version is used).
    /// → `Vec<`[`Applied`]`>`
    Restart { names: Vec<String> },
    /// Waits until the minions report the named (deleted) services stopped,
    /// up to `timeout_ms`. → `Vec<String>`: the names, once all are gone.
    WaitGone { names: Vec<String>, timeout_ms: u64 },
    /// → [`ServiceView`]
    Status { name: String },
    /// The spec as stored, with its address. → [`Spec`]
    Info { name: String },
    /// → `Vec<`[`ServiceView`]`>`
    Services,
    /// → `Vec<`[`NodeView`]`>`
    Nodes,
    /// → [`RoutesView`]
    Routes,
    /// → `Vec<`[`AuditEntry`]`>`
    Audit { limit: usize },
    /// `size` bytes of image follow this frame on the same stream. → [`Pushed`]
    Push { name: String, size: u64 },
    /// `Log` replies, then `null`.
    Logs {
        name: String,
        tail: usize,
        follow: bool,
    },
    /// Waits until each named service has a [`Verdict`] for its current
    /// generation (it runs, a oneshot ended, it failed to start, or its
    /// machine is unreachable), up to `timeout_ms` (then an `unavailable`
    /// error). → `Vec<`[`Settled`]`>` (a [`ServiceView`] with its verdict,
    /// so a CLI that reads `Vec<ServiceView>` still can).
    Wait { names: Vec<String>, timeout_ms: u64 },
    /// The registry's images and each node's copy of them.
    /// → `Vec<`[`ImageView`]`>`
    Images,
    /// `phoenix diff` (`dry_run`) and `phoenix apply`: a tree of spec files
    /// (and after them the env files they name, `model::tree::read_tree`)
    /// as one change, from `source` (the tree's canonical path, or a name
    /// given with `--source`). Services the tree names are created or
    /// changed, unchanged ones left alone; services of this source that it
    /// no longer names are deleted with `prune`, else only listed. → [`Plan`]
    ApplyTree {
        source: String,
        files: Vec<SourceFile>,
        #[serde(default)]
        prune: bool,
        #[serde(default)]
        dry_run: bool,
    },
    /// `phoenix env set`: sets cluster variables (`KEY=VALUE`), restarting
    /// the services whose environment changes. → [`crate::env::EnvChanged`]
    EnvSet { vars: Vec<String> },
    /// `phoenix env unset`. → [`crate::env::EnvChanged`]
    EnvUnset { keys: Vec<String> },
    /// `phoenix env list`. → `Vec<`[`crate::env::ClusterVar`]`>`
    EnvList,
    /// `phoenix info NAME --env`: the service's environment, layer by
    /// layer. → [`crate::env::EnvView`]
    InfoEnv { name: String },
    /// `phoenix secret set NAME` (the value from stdin), restarting the
    /// services that use it. → [`crate::env::SecretChanged`]
    SecretSet {
        name: String,
        value: crate::env::SecretValue,
    },
    /// `phoenix secret list`: names, times, users; never values.
    /// → `Vec<`[`crate::env::SecretView`]`>`
    SecretList,
    /// `phoenix secret rm NAME`, refused while a service uses it.
    /// → [`crate::env::SecretView`]
    SecretRm { name: String },
    /// `phoenix apply --git`: registers a git source the master tracks
    /// (or, for a name it has, changes its settings) and applies its ref's
    /// current commit now. → [`GitApplied`]
    GitSource(GitSettings),
    /// `phoenix sources`. → `Vec<`[`SourceView`]`>`
    Sources,
    /// `phoenix sources rm`: the master stops tracking a git source; its
    /// services stay as they are. → [`SourceView`]
    SourceRm { name: String },
}

/// A git source's settings, as `phoenix apply --git` gives them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GitSettings {
    /// The source's name: `[A-Za-z0-9._-]`, the webhook's path
    /// (`/_phoenix/git/NAME`); its services' source is `git:NAME`.
    pub name: String,
    pub url: String,
    /// A branch or tag (or a full `refs/...` name); `None`: the remote's HEAD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The folder (or file) of the repository that holds the specs;
    /// `None`: the whole repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Track the ref (else apply its current commit once).
    #[serde(default)]
    pub watch: bool,
    /// How often a watched source asks the remote for the ref's commit.
    pub interval_ms: u64,
    #[serde(default)]
    pub prune: bool,
    /// The webhook's shared secret; `None` keeps the source's own, or for
    /// a watched source that has none, has the master make one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
}

/// What `phoenix apply --git` did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GitApplied {
    pub source: SourceView,
    /// The plan applied, when a commit was (nothing when it is live already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// Why the commit was not applied (the source is registered all the
    /// same, and the previous commit, if any, stays live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refused>,
    /// A webhook secret the master made now; shown this once only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_webhook_secret: Option<String>,
}

/// A refusal carried inside a successful reply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub kind: ErrorKind,
    pub message: String,
}

/// A git source, for `phoenix sources`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SourceView {
    pub name: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub watch: bool,
    pub interval_ms: u64,
    pub prune: bool,
    /// Whether a webhook secret is set (the webhook is refused without).
    pub webhook: bool,
    /// The commit whose tree the cluster runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_commit: Option<String>,
    /// Unix ms when it was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_at: Option<u64>,
    /// Unix ms of the last look at the remote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<u64>,
    /// Why the last look or apply failed (cleared by the next success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// A commit that was refused: not tried again until the ref moves or
    /// the source is applied again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_commit: Option<String>,
}

/// One spec file of a tree: its path (as errors name it) and its text.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    pub path: String,
    pub text: String,
}

/// What applying a tree of spec files does (`diff`) or did (`apply`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    pub source: String,
    /// Services the tree names and the cluster does not have.
    pub create: Vec<PlanEntry>,
    /// Services of this source whose spec differs, with the fields that do.
    pub change: Vec<PlanEntry>,
    /// Services of this source whose spec is the same: nothing restarts.
    pub unchanged: Vec<String>,
    /// Services of this source the tree no longer names.
    pub delete: Vec<String>,
    /// Whether `delete` was (or, for a diff, would be) carried out: `--prune`.
    pub prune: bool,
    /// Whether the plan was written (`apply`), or only shown (`diff`).
    pub written: bool,
    /// The services written, as `deploy` reports them (empty for a diff).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<Applied>,
}

/// One service created or changed by a [`Plan`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PlanEntry {
    pub name: String,
    pub machine: String,
    /// The file of the tree that defines it.
    pub file: String,
    /// For a change: the fields that differ (`env`, `args`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// For a change of `env` or `env_file`: the variables that differ, as
    /// written (`+KEY=VALUE`, `-KEY`, `~KEY=VALUE (was OLD)`); a secret
    /// shows as `secret:NAME`, never its value (`crate::env::env_changes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
}

/// One registry image, for `phoenix images`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ImageView {
    pub name: String,
    pub hash: String,
    pub size: u64,
    pub chunks: usize,
    /// Bytes of chunks no other registry image shares.
    pub unique_bytes: u64,
    pub nodes: Vec<ImageNodeView>,
}

/// Where one node stands with one image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ImageNodeView {
    pub node: String,
    /// `synced`, `syncing`, `failed`, `pending` (not there yet) or
    /// `unknown` (the node has not reported since the master started).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// While syncing: chunk bytes fetched and needed.
    #[serde(default)]
    pub done: u64,
    #[serde(default)]
    pub total: u64,
}

/// Master → CLI.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Final: the request succeeded. The body is the JSON of the request's
    /// reply type (named on each [`Request`] variant); it stays JSON on the
    /// wire so that a newer master can add fields an older CLI ignores.
    Ok { body: serde_json::Value },
    /// Final: the request failed and changed nothing.
    Error {
        message: String,
        /// What kind of failure; a master from before kinds sends none.
        #[serde(default)]
        kind: ErrorKind,
    },
    /// Not final: some log output.
    Log { data: String },
}

impl Reply {
    /// The final reply for a request's outcome.
    pub fn of<T: Serialize>(result: Result<T, (ErrorKind, String)>) -> Reply {
        match result.map(serde_json::to_value) {
            Ok(Ok(body)) => Reply::Ok { body },
            Ok(Err(e)) => Reply::Error {
                message: format!("cannot encode the reply: {e}"),
                kind: ErrorKind::Internal,
            },
            Err((kind, message)) => Reply::Error { message, kind },
        }
    }
}

/// Why a request failed, so that a caller (and the CLI's exit code) can
/// tell a typo from a conflict from a machine that is down.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The input is malformed or fails validation (spec errors).
    Invalid,
    /// What the request names does not exist.
    NotFound,
    /// The request contradicts the cluster's state (already accepted,
    /// still in use).
    Conflict,
    /// A machine it needs is not connected, or waiting timed out.
    Unavailable,
    /// The master failed (its store, its disk); also any kind this CLI does
    /// not know yet.
    #[default]
    #[serde(other)]
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

// ---------------------------------------------------------------- replies
//
// The typed bodies of `Reply::Ok` for changes; reads reply with the views
// below (`MasterInfo`, `Vec<ServiceView>`, ...).

/// One service written by `deploy` or `update` (the reply is a list).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub name: String,
    pub machine: String,
    pub ip: Ipv6Addr,
    pub generation: u64,
    /// A zero-downtime update: the new version starts beside the old one,
    /// which serves until the new one is up, then drains and stops.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub beside: bool,
    /// Only where the proxy routes it changed (`proxyname`, `proxypath`,
    /// `proxyauth`): the running version serves on, nothing restarts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub routes_only: bool,
}

/// `del`'s reply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Deleted {
    pub deleted: String,
    pub machine: String,
    /// Whether its minion has reported it stopped: false from the master
    /// (it has only stored the change); a `del` that waits sets it.
    #[serde(default)]
    pub stopped: bool,
}

/// `accept`'s reply: the node is a member with this overlay address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub name: String,
    pub overlay_ip: Ipv6Addr,
}

/// `reject`'s reply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub rejected: String,
}

/// `forget`'s reply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Forgotten {
    pub forgotten: String,
}

/// `push`'s reply: the image as the registry indexed it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    pub name: String,
    /// BLAKE3 of the file, hex.
    pub hash: String,
    pub size: u64,
    pub chunks: usize,
    /// What the file is: `executable (ELF)`, `script`, `OCI/Docker archive`
    /// or `zstd archive`.
    #[serde(default)]
    pub format: String,
    /// Services that use this image but run another version of it; the new
    /// one reaches them with `phoenix restart` or `phoenix update`.
    #[serde(default)]
    pub stale_services: Vec<String>,
}

// ---------------------------------------------------------------- views

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MasterInfo {
    pub public_ip: IpAddr,
    pub key: String,
    pub overlay_ip: Ipv6Addr,
    pub next_minion_ip: Ipv6Addr,
    pub join_port: u16,
    pub link_port: u16,
    /// WireGuard UDP port, or None when the overlay is off.
    pub wg_port: Option<u16>,
    /// The join token a minion may prove with `--token` (see `--auto-accept`).
    pub token: String,
    pub version: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WaitingNode {
    pub name: String,
    pub key: String,
    pub fingerprint: String,
    pub public_ip: IpAddr,
    pub private_ip: IpAddr,
    pub requested_at: u64,
    pub version: String,
    /// Whether the request proved the join token.
    pub token_proof: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NodeView {
    pub name: String,
    /// `reachable` or `unreachable`.
    pub state: String,
    pub overlay_ip: Ipv6Addr,
    pub public_ip: IpAddr,
    pub private_ip: IpAddr,
    pub key: String,
    pub last_seen: Option<u64>,
    pub version: Option<String>,
    pub services: usize,
    pub stats: Option<NodeStats>,
    /// Why the node's last link ended, and when; None if it has not
    /// dropped since the master started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drop: Option<LinkDropView>,
}

/// One end of a minion's link, as the master saw it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LinkDropView {
    /// e.g. `no heartbeat for 6000 ms`.
    pub reason: String,
    /// Unix ms.
    pub at: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ServiceView {
    pub name: String,
    pub machine: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub duration: String,
    pub ip: Ipv6Addr,
    pub image: String,
    /// BLAKE3 of the image version the service runs (chosen at deploy,
    /// update or restart), hex.
    #[serde(default)]
    pub image_hash: String,
    /// When that version reached the registry (Unix ms), if the registry
    /// still holds it.
    #[serde(default)]
    pub image_pushed_at: Option<u64>,
    /// The registry's version of the image when it differs from the one the
    /// service runs (a newer push not rolled out yet).
    #[serde(default)]
    pub registry_hash: Option<String>,
    pub generation: u64,
    /// The reported state, or `pending` before the minion has reported.
    pub state: String,
    pub pid: Option<u32>,
    pub restarts: u64,
    pub health: String,
    pub last_exit: Option<crate::status::Exit>,
    pub limits: Option<String>,
    pub since: Option<u64>,
    pub message: Option<String>,
    /// Whether the service's node is connected to the master now.
    pub node_reachable: bool,
    /// Names in the spec's `link` that no service has (deleted after this
    /// one was deployed); sorted. Absent when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dangling_links: Vec<String>,
    /// The instance key of the run that serves it, when an update started
    /// it (`NAME.GENERATION`); absent: the run named after the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// A zero-downtime update in progress: the new version and where it
    /// stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<String>,
    /// Something about how it runs that its user should know: a VM on a
    /// minion without hardware virtualisation runs under QEMU's software
    /// emulation (`tcg: software emulation, slow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What `status` says of a VM on a minion whose VMs run under TCG.
pub const TCG_NOTE: &str = "tcg: software emulation, slow (the minion has no hardware virtualisation; boots take seconds, not milliseconds)";

/// How a change to a service ended, as `Wait` judges it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// No verdict yet (only in a timed-out wait's message).
    Waiting,
    /// A daemon runs this generation: healthy, or without a health check
    /// up for the minion's minimum uptime.
    Running,
    /// A oneshot of this generation ended with status 0.
    Exited,
    /// This generation did not start: it went into backoff, turned
    /// unhealthy, a oneshot failed, or its image is held back. `reason`
    /// says why; the change stays stored and the minion keeps trying.
    Failed,
    /// Its machine is not connected; the change is stored and runs when the
    /// machine reconnects.
    Unreachable,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Waiting => "waiting",
            Verdict::Running => "running",
            Verdict::Exited => "exited",
            Verdict::Failed => "failed",
            Verdict::Unreachable => "unreachable",
        }
    }
}

/// One service at the end of a `Wait`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Settled {
    #[serde(flatten)]
    pub view: ServiceView,
    pub verdict: Verdict,
    /// Why it failed or cannot be waited for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The last lines of the log of what failed, where the service's own
    /// log no longer holds them: an update's new version that did not
    /// come up (stopped and removed, its log with it, while the old
    /// version serves on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub at: u64,
    /// Who made the change (the CLI user's uid on the master's socket).
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub old: Option<serde_json::Value>,
    pub new: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_carry_their_kind_and_old_ones_read_as_internal() {
        let r = Reply::of::<()>(Err((ErrorKind::NotFound, "no service \"web\"".into())));
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"reply":"error","message":"no service \"web\"","kind":"not_found"}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), r);
        // A master from before kinds, and a kind from a newer master.
        for old in [
            r#"{"reply":"error","message":"m"}"#,
            r#"{"reply":"error","message":"m","kind":"quota"}"#,
        ] {
            assert_eq!(
                serde_json::from_str::<Reply>(old).unwrap(),
                Reply::Error {
                    message: "m".into(),
                    kind: ErrorKind::Internal
                }
            );
        }
        let ok = Reply::of::<Deleted>(Ok(Deleted {
            deleted: "web".into(),
            machine: "m1".into(),
            stopped: false,
        }));
        assert_eq!(
            ok,
            Reply::Ok {
                body: serde_json::json!({"deleted": "web", "machine": "m1", "stopped": false})
            }
        );
    }

    #[test]
    fn an_older_desired_set_without_links_or_peers_loads() {
        let spec = crate::spec::parse_specs(
            "t",
            r#"{"machine":"m1","name":"web","image":"app","type":"binary"}"#,
        )
        .unwrap()
        .remove(0);
        // As an older master wrote it: no `links`, no `peers`.
        let old = serde_json::json!({
            "revision": 4,
            "services": [{"spec": spec, "ip": "fd38:dde8:32dd:1::1",
                "image_hash": "h", "image_size": 1, "generation": 2}],
        })
        .to_string();
        let set: DesiredSet = serde_json::from_str(&old).unwrap();
        assert_eq!(set.revision, 4);
        assert!(set.peers.is_empty());
        assert!(set.services[0].links.is_empty());
        // And a new one round-trips with both.
        let mut new = set.clone();
        new.services[0]
            .links
            .insert("db".into(), "fd38:dde8:32dd:1::2".parse().unwrap());
        new.peers.push(MeshPeer {
            node: "m2".into(),
            key: "k".into(),
            overlay_ip: "fd38:dde8:32dd::3".parse().unwrap(),
            endpoint: Some("10.0.0.3:51820".parse().unwrap()),
            services: vec!["fd38:dde8:32dd:1::2".parse().unwrap()],
        });
        let text = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<DesiredSet>(&text).unwrap(), new);
    }

    #[tokio::test]
    async fn frames_round_trip_and_are_bounded() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msg = Request::Del { name: "web".into() };
        write_frame(&mut a, &msg).await.unwrap();
        let got: Request = read_frame(&mut b, MAX_FRAME).await.unwrap().unwrap();
        assert_eq!(got, msg);

        write_frame(&mut a, &"x".repeat(100)).await.unwrap();
        let err = read_frame::<_, String>(&mut b, 50).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(102, 50)), "{err}");

        drop(a);
        let (mut a, mut b) = tokio::io::duplex(64);
        drop(a.shutdown().await);
        assert!(
            read_frame::<_, Request>(&mut b, MAX_FRAME)
                .await
                .unwrap()
                .is_none()
        );
    }
}

// ---------------------------------------------------------------- routes

/// What `phoenix routes` shows: the proxy's routes, their instances and
/// certificates.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RoutesView {
    /// `None` when the master runs without its proxy (`--no-proxy`).
    pub proxy: Option<ProxyView>,
    pub routes: Vec<RouteView>,
}

/// The proxy itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ProxyView {
    pub http_port: u16,
    pub https_port: u16,
    /// Client connections open now.
    pub connections: u64,
    /// Why certificates cannot be ordered at all (no ACME), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme_error: Option<String>,
}

/// One host and path prefix.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct RouteView {
    pub host: String,
    pub path: String,
    /// Basic auth is asked.
    pub auth: bool,
    pub instances: Vec<RouteInstanceView>,
    /// The host's certificate, as the ACME manager knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertView>,
}

/// One service behind a route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RouteInstanceView {
    pub service: String,
    pub machine: String,
    pub addr: std::net::SocketAddr,
    /// Its minion reports it running and not unhealthy.
    pub up: bool,
    /// Taking no new requests, finishing those it has (the old version
    /// during an update's switch, a service being deleted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Requests in flight now, sent in all, failed (the proxy's counts).
    pub outstanding: u64,
    pub requests: u64,
    pub failures: u64,
    /// Passive health: ms left before the proxy tries it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_for_ms: Option<u64>,
}

/// A host's certificate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CertView {
    /// Unix ms; `None`: none yet.
    pub not_after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Unix ms of the next order (renewal, or the end of a backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<u64>,
}
