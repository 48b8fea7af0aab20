//! Every command and flag, declared in one place.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The master's data dir when neither --data-dir nor PHOENIX_DATA_DIR says.
pub const DEFAULT_MASTER_DIR: &str = "/var/lib/phoenix/master";
pub const DEFAULT_MINION_DIR: &str = "/var/lib/phoenix/minion";

/// This build's version, as `phoenix version` and `--version` print it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Parser, Debug)]
#[command(
    name = "phoenix",
    version = VERSION,
    about = "A multi-server process supervisor: installer, master, minion and CLI in one binary",
    long_about = "A multi-server process supervisor: installer, master, minion and CLI in one binary.\n\n\
        Set up a master with `phoenix master <public-ip>`, join minions with `phoenix minion ...`, \
        accept them with `phoenix accept <name>`, then `phoenix deploy spec.json`.\n\
        Commands other than master/minion talk to the master through the Unix socket in its data dir.",
    after_help = "Exit status: 0 ok, 1 failure (an internal error), 2 usage, \
        3 invalid input (spec errors), 4 not found, 5 conflict (already accepted, still in use), \
        6 unavailable (the master or a machine is not reachable, or waiting timed out), \
        7 not started (the change is stored, but a service did not start)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Parses the command line, exiting with clap's usage error (2) on a bad
/// one. An unknown subcommand gets our suggestions: clap's similarity
/// measure offers odd neighbours (`version` for `servcies`).
pub fn parse() -> Cli {
    Cli::try_parse().unwrap_or_else(|e| with_close_subcommands(e).exit())
}

fn with_close_subcommands(mut e: clap::Error) -> clap::Error {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::InvalidSubcommand {
        return e;
    }
    let Some(ContextValue::String(typo)) = e.get(ContextKind::InvalidSubcommand).cloned() else {
        return e;
    };
    let cmd = Cli::command();
    let names = cmd
        .get_subcommands()
        .flat_map(|s| std::iter::once(s.get_name()).chain(s.get_visible_aliases()));
    let close = close_names(&typo, names);
    if close.is_empty() {
        e.remove(ContextKind::SuggestedSubcommand);
    } else {
        e.insert(
            ContextKind::SuggestedSubcommand,
            ContextValue::Strings(close),
        );
    }
    e
}

/// The names a typo is likely to mean, closest first: within one edit
/// (an insertion, deletion, substitution or swap of neighbours) per three
/// letters.
fn close_names<'a>(typo: &str, names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut close: Vec<(usize, &str)> = names
        .filter_map(|name| {
            let d = phoenix_model::spec::edit_distance(typo, name);
            let allowed = (name.len().max(typo.len()) / 3).max(1);
            (d <= allowed).then_some((d, name))
        })
        .collect();
    close.sort();
    close.dedup();
    close.into_iter().map(|(_, n)| n.to_owned()).collect()
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The master's data dir, which holds its CLI socket; also set by
    /// the environment variable PHOENIX_DATA_DIR.
    // The variable's name is in the text because clap renders the env
    // with its current value (`[env: PHOENIX_DATA_DIR=]` when unset).
    #[arg(
        long,
        env = "PHOENIX_DATA_DIR",
        hide_env = true,
        default_value = DEFAULT_MASTER_DIR,
        global = true
    )]
    pub data_dir: PathBuf,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct Json {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Waiting for a change to take effect on the minions.
#[derive(Args, Debug, Clone, Copy)]
pub struct Waiting {
    /// Return once the master has stored the change, without waiting for
    /// the minions to carry it out.
    #[arg(long)]
    pub detach: bool,
    /// How long to wait for the minions, in seconds.
    // `--timeout` was the flag's name before every time flag named its unit.
    #[arg(
        long = "timeout-s",
        alias = "timeout",
        default_value_t = 60,
        value_name = "SECONDS"
    )]
    pub timeout_s: u64,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Set up and run the master on this machine.
    Master(MasterArgs),
    /// Set up and run a minion on this machine and ask the master to let it join.
    Minion(MinionArgs),
    /// Remove the system service that `master` or `minion` installed.
    Uninstall {
        /// Which service: master or minion.
        #[arg(value_parser = ["master", "minion"])]
        role: String,
        /// Also delete the data dir (the store, keys, images, logs). Irreversible.
        #[arg(long)]
        purge: bool,
        /// The data dir to purge (default: the role's default dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Show the master's public IP, key, and the next minion's overlay address.
    MasterInfo {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// List machines that asked to join and wait to be accepted.
    Waiting {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Admit a waiting machine to the cluster (check its key fingerprint first).
    Accept {
        /// The machine's name, as `phoenix waiting` lists it.
        name: String,
        /// The key fingerprint (from `phoenix waiting`) of the request meant,
        /// when several wait under the name.
        #[arg(long, value_name = "FP")]
        fingerprint: Option<String>,
        #[command(flatten)]
        json: Json,
        #[command(flatten)]
        target: Target,
    },
    /// Refuse a waiting machine's join request.
    Reject {
        /// The machine's name, as `phoenix waiting` lists it.
        name: String,
        /// The key fingerprint (from `phoenix waiting`) of the request meant,
        /// when several wait under the name.
        #[arg(long, value_name = "FP")]
        fingerprint: Option<String>,
        #[command(flatten)]
        json: Json,
        #[command(flatten)]
        target: Target,
    },
    /// Remove an accepted machine, its overlay peer and its key (it must run no services).
    Forget {
        /// The machine's name, as `phoenix nodes` lists it.
        name: String,
        #[command(flatten)]
        json: Json,
        #[command(flatten)]
        target: Target,
    },
    /// Create the services of a spec file (one spec or an array); all or nothing.
    Deploy(ApplyArgs),
    /// Change existing services (or restart them unchanged); all or nothing.
    Update(ApplyArgs),
    /// Show what `phoenix apply PATH` would create, change and delete.
    Diff(TreeArgs),
    /// Turn a compose file or a Procfile into specs: printed for review
    /// (YAML, or --json), or applied at once with --apply. What is not
    /// carried over is listed on stderr.
    #[command(subcommand)]
    Import(crate::import::Import),
    /// Make the cluster match a spec file or a folder of them, in one
    /// transaction: create what is new, change what differs, restart
    /// nothing unchanged; delete what the files dropped only with --prune.
    /// With --git, the master reads a git repository itself (and with
    /// --watch keeps applying its new commits).
    Apply {
        /// A spec file, or a folder: its `.json`, `.yaml` and `.yml` files,
        /// recursively (dotfiles and dot-folders skipped).
        #[arg(required_unless_present = "git", conflicts_with = "git")]
        path: Option<PathBuf>,
        #[command(flatten)]
        git: GitArgs,
        /// The name of the source the services belong to; the canonical
        /// path of PATH by default (with --git: the source's name, the
        /// repository's by default). Services of another source are never
        /// touched.
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
        /// Also delete the services of this source that the files no
        /// longer define.
        #[arg(long)]
        prune: bool,
        #[command(flatten)]
        waiting: Waiting,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// List the git sources the master tracks (`phoenix apply --git`):
    /// URL, ref, live commit, last look and last error.
    Sources {
        #[command(subcommand)]
        action: Option<SourcesAction>,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Stop and remove a service; waits until its machine has stopped it.
    Del {
        /// The service's name.
        name: String,
        #[command(flatten)]
        waiting: Waiting,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Restart services on their machines, with the registry's current
    /// version of their image; waits until they run.
    Restart {
        /// The services' names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        #[command(flatten)]
        waiting: Waiting,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Show a service's state, pid, restarts, health and image version.
    Status {
        /// The service's name.
        name: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Print a service's spec (with its address) as JSON; with --env, its
    /// environment: each variable, its value and the layer it comes from
    /// (image < cluster < env_file < spec), secrets as `secret:NAME`.
    Info {
        /// The service's name.
        name: String,
        /// Show the service's environment, layer by layer.
        #[arg(long)]
        env: bool,
        #[command(flatten)]
        target: Target,
        /// Accepted for uniformity: the spec is always JSON.
        #[command(flatten)]
        json: Json,
    },
    /// The cluster's environment variables: every service gets them, under
    /// its env files and its spec's `env`.
    Env {
        #[command(subcommand)]
        action: EnvAction,
    },
    /// Secrets: values kept encrypted on the master, given to services
    /// whose specs name them as `KEY=secret:NAME`.
    Secret {
        #[command(subcommand)]
        action: SecretAction,
    },
    /// List services.
    #[command(visible_alias = "ps")]
    Services {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// The proxy's routes: hosts and paths, their instances with health
    /// and traffic, and each host's certificate (expiry, or the last ACME
    /// error and when it is tried again).
    Routes {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// List accepted machines with their state and load.
    Nodes {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// List the registry's images: size, chunks, bytes no other image
    /// shares, and whether each machine holds them yet.
    Images {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Show the audit log: every change, who made it, and the fields it
    /// changed (--json: old and new spec whole).
    Audit {
        /// How many of the newest entries to show.
        #[arg(short = 'n', long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Add an image to the master's registry: an executable (ELF, or a
    /// script starting with `#!`) or a container image (an OCI or Docker
    /// archive tar, or a .zst).
    Push {
        /// The file to upload.
        file: PathBuf,
        /// The image's name in the registry (default: the file's name).
        name: Option<String>,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Print a service's output (stdout and stderr).
    Logs {
        /// The service's name.
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// How many of the last lines to print first.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Run a local cluster (a master and two minions on loopback) with a demo deployment.
    Demo {
        /// Where the demo keeps its state (removed at the end).
        #[arg(long, default_value = "/tmp/phoenix-demo")]
        dir: PathBuf,
        /// The testy binary to deploy (default: beside this binary).
        #[arg(long)]
        testy: Option<PathBuf>,
        /// Stop after this many seconds instead of at Ctrl-C.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Print this program's version.
    Version {
        #[command(flatten)]
        json: Json,
    },
    /// Print a shell completion script: `phoenix completions bash >
    /// /etc/bash_completion.d/phoenix`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// PID 1 of an OCI image the minion boots as a VM (it puts this binary
    /// in the guest's initramfs); not for use anywhere else.
    #[command(hide = true)]
    GuestInit,
}

#[derive(Args, Debug)]
pub struct MasterArgs {
    /// The address minions reach the master's join endpoint at.
    pub public_ip: IpAddr,
    /// Run the daemon in this terminal instead of installing a system service.
    #[arg(long)]
    pub foreground: bool,
    /// Where the master keeps its state; one master per data dir (a second
    /// one is refused).
    #[arg(long, default_value = DEFAULT_MASTER_DIR)]
    pub data_dir: PathBuf,
    /// TCP port of the public join endpoint.
    #[arg(long, default_value_t = phoenix_master::DEFAULT_JOIN_PORT)]
    pub join_port: u16,
    /// TCP port of the minion links (on the overlay address).
    #[arg(long, default_value_t = phoenix_master::DEFAULT_LINK_PORT)]
    pub link_port: u16,
    #[command(flatten)]
    pub overlay: OverlayArgs,
    /// Admit minions that prove the join token (`phoenix minion --token`) without `accept`.
    #[arg(long)]
    pub auto_accept: bool,
    /// Mark a minion unreachable after this long without a heartbeat, in ms.
    #[arg(long, default_value_t = 6000, value_parser = clap::value_parser!(u64).range(300..=60_000))]
    pub node_timeout_ms: u64,
    /// An update of a proxied daemon starts the new version beside the old
    /// one; it fails (the old one keeps serving) if the new one is not
    /// running and healthy within this many ms.
    #[arg(long, default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    pub update_timeout_ms: u64,
    /// How long requests in flight may take on an instance leaving the
    /// proxy's rotation (the old version after an update, a deleted
    /// service) before it is stopped anyway, in ms.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub drain_timeout_ms: u64,
    /// The proxy's HTTP port on the public IP: ACME challenges, and a
    /// redirect to HTTPS for every host that has a certificate (plain HTTP
    /// for one that has none yet).
    #[arg(long, default_value_t = 80)]
    pub http_port: u16,
    /// The proxy's HTTPS port on the public IP.
    #[arg(long, default_value_t = 443)]
    pub https_port: u16,
    /// Run without the proxy (no HTTP/HTTPS ports, no certificates).
    #[arg(long)]
    pub no_proxy: bool,
    /// The ACME directory certificates come from.
    #[arg(long, default_value = "https://acme-v02.api.letsencrypt.org/directory")]
    pub acme_directory: String,
    /// An extra root certificate (PEM) to trust for the ACME directory: a
    /// private ACME server, or tests.
    #[arg(long, value_name = "FILE")]
    pub acme_ca: Option<PathBuf>,
    /// The contact address given to the ACME server (expiry warnings).
    #[arg(long)]
    pub acme_email: Option<String>,
    /// The proxy: time a client has to send a request's head (and to
    /// finish a TLS handshake), in ms.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub proxy_header_timeout_ms: u64,
    /// The proxy: a client connection with no request in flight is closed
    /// after this long, and a request body that sends nothing for this
    /// long is cut off (408), in ms.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=86_400_000))]
    pub proxy_idle_timeout_ms: u64,
    /// The proxy: time to connect to an instance before trying another,
    /// in ms.
    #[arg(long, default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub proxy_connect_timeout_ms: u64,
    /// The proxy: time an instance has to start answering a request once
    /// it is sent (bodies, SSE and WebSockets have no limit), in ms; then
    /// the client gets a 504.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(100..=86_400_000))]
    pub proxy_response_timeout_ms: u64,
    /// The proxy: client connections open at once from one IPv4 address
    /// or one IPv6 /64.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub proxy_max_conns_per_ip: u64,
    /// The proxy: requests in flight at once from one IPv4 address or one
    /// IPv6 /64, over all its connections and HTTP/2 streams; more get
    /// 429.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub proxy_max_requests_per_ip: u64,
    /// The proxy: threads, each with its own event loop, taking new
    /// connections from the same listeners, like nginx's workers. Default:
    /// the CPUs, at most 4.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub proxy_threads: Option<u64>,
}

/// The overlay flags, the same for master and minion.
#[derive(Args, Debug)]
pub struct OverlayArgs {
    /// This node's WireGuard UDP port. Daemons on one machine each need
    /// their own (e.g. 51830 for a minion beside a master).
    #[arg(long, default_value_t = phoenix_overlay::DEFAULT_WG_PORT)]
    pub wg_port: u16,
    /// Name of the overlay's network interface. Daemons on one machine
    /// each need their own (e.g. phoenix1 for a minion beside a master).
    #[arg(long, default_value = "phoenix0")]
    pub tun_name: String,
    /// Which WireGuard carries the overlay: auto (the kernel's where the
    /// kernel has it, else the one built into phoenix), kernel or userspace.
    #[arg(long, default_value = "auto")]
    pub wireguard: phoenix_overlay::Mode,
    /// Run without the WireGuard overlay: links in clear text on the public
    /// IP (master and minions alike). For single-host development without
    /// root only.
    #[arg(long)]
    pub no_overlay: bool,
}

#[derive(Args, Debug)]
pub struct MinionArgs {
    /// This machine's name in the cluster (a hostname label).
    pub name: String,
    /// The master's public IP: where its join endpoint and WireGuard port
    /// are reached (`phoenix master-info` prints it).
    pub master_public_ip: IpAddr,
    /// The master's public key, as `phoenix master-info` prints it.
    pub master_key: String,
    /// This machine's public IP: where the master reaches its WireGuard
    /// port.
    pub minion_public_ip: IpAddr,
    /// This machine's address on a private network it shares with the
    /// other machines (give the public IP again if there is none). It is
    /// recorded and shown (`phoenix waiting`, `phoenix nodes`) for traffic
    /// between machines that should stay off the public network; nothing
    /// sends to it yet.
    pub minion_private_ip: IpAddr,
    /// Run the daemon in this terminal instead of installing a system service.
    #[arg(long)]
    pub foreground: bool,
    /// Where the minion keeps its state.
    #[arg(long, default_value = DEFAULT_MINION_DIR)]
    pub data_dir: PathBuf,
    /// The master's join port.
    #[arg(long, default_value_t = phoenix_master::DEFAULT_JOIN_PORT)]
    pub master_join_port: u16,
    /// The master's link port.
    #[arg(long, default_value_t = phoenix_master::DEFAULT_LINK_PORT)]
    pub master_link_port: u16,
    /// The master's WireGuard port.
    #[arg(long, default_value_t = phoenix_overlay::DEFAULT_WG_PORT)]
    pub master_wg_port: u16,
    #[command(flatten)]
    pub overlay: OverlayArgs,
    /// The cluster's join token (`phoenix master-info`); proves this minion may join.
    #[arg(long, env = "PHOENIX_JOIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Start-up grace in ms: failed health checks do not count during it.
    /// Checks begin 10 ms after a (re)start and repeat every 100 ms until
    /// one passes, so a service that answers at once is healthy at once.
    #[arg(long, default_value_t = 5000)]
    pub health_grace_ms: u64,
    /// Time between health checks once a service is healthy (or its grace
    /// is over), in ms.
    #[arg(long, default_value_t = 2000)]
    pub health_interval_ms: u64,
    /// How long a health check may take, in ms.
    #[arg(long, default_value_t = 1000)]
    pub health_timeout_ms: u64,
    /// How long a service has to exit after SIGTERM before SIGKILL, in ms.
    #[arg(long, default_value_t = 10000)]
    pub stop_timeout_ms: u64,
    /// How long a daemon without a health check must stay up before it
    /// counts as running, in ms (0: at once). A crash before then is a
    /// failed start, which `deploy` reports.
    #[arg(long, default_value_t = 1000)]
    pub min_uptime_ms: u64,
    /// Rotate a service's log file when it grows past this many bytes.
    #[arg(long, default_value_t = 10 << 20)]
    pub log_max_bytes: u64,
    /// Registry images no service here uses are pre-cached only while this
    /// much of the data dir's disk stays free, in MiB (default: a tenth of
    /// the disk, at most 1024). Images of this minion's own services need
    /// only 8 MiB to spare.
    #[arg(long)]
    pub keep_free_mb: Option<u64>,
    /// `netns`: every service in a network namespace of its own, at its own
    /// address, reaching only what its `link` names inside the cluster
    /// (needs root, the `nftables` package and the kernel's veth). `host`:
    /// services share this machine's network; addresses and `link` are not
    /// enforced (for hosts where the minion may not make namespaces).
    #[arg(long, default_value = "netns", value_name = "netns|host")]
    pub service_network: phoenix_minion::hooks::net::NetMode,
    /// How long a VM (type vm) with a health check has to pass it after a
    /// start, in ms: a guest that has not by then never booted, and is
    /// killed and restarted with backoff. Its health failures do not count
    /// before then (TCG boots take seconds).
    #[arg(long, default_value_t = 120_000)]
    pub vm_boot_timeout_ms: u64,
    /// The guest kernel an OCI image run as a VM (type vm with a container
    /// image) boots: a bzImage whose virtio drivers are built in or are
    /// modules under /lib/modules/RELEASE. Default: the newest
    /// /boot/vmlinuz-*-cloud-amd64 (Debian's linux-image-cloud-amd64).
    #[arg(long, value_name = "PATH")]
    pub vm_kernel: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The spec file: one spec or an array of them, YAML if it ends in
    /// `.yaml` or `.yml`, JSON otherwise; `-` reads JSON from stdin.
    pub file: PathBuf,
    #[command(flatten)]
    pub waiting: Waiting,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub json: Json,
}

/// `phoenix apply --git`: a git repository as the source (issue #15).
#[derive(Args, Debug)]
pub struct GitArgs {
    /// Apply the specs of a git repository, which the master fetches
    /// itself: its URL, with `#REF` for a branch or tag (the remote's HEAD
    /// by default).
    #[arg(long, value_name = "URL[#REF]")]
    pub git: Option<String>,
    /// With --git: the folder (or file) of the repository that holds the
    /// specs (its root by default).
    #[arg(
        long = "path",
        id = "git_path",
        value_name = "SUBDIR",
        requires = "git",
        conflicts_with = "path"
    )]
    pub subdir: Option<String>,
    /// With --git: keep tracking the ref, applying each new commit (a look
    /// every --interval-s, or at once when its webhook is called).
    #[arg(long, requires = "git", conflicts_with = "path")]
    pub watch: bool,
    /// With --watch: how often the master asks the remote for the ref's
    /// commit (`git ls-remote`), in seconds.
    // `--interval` is the spelling; time flags name their unit.
    #[arg(
        long = "interval-s",
        alias = "interval",
        default_value_t = 60,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..=604_800)
    )]
    pub interval_s: u64,
    /// With --watch: a file holding the webhook's shared secret (for
    /// `POST /_phoenix/git/NAME`); without it the master makes one and
    /// prints it once.
    #[arg(long, value_name = "FILE", requires = "watch")]
    pub webhook_secret_file: Option<PathBuf>,
}

/// `phoenix env` subcommands.
#[derive(Subcommand, Debug)]
pub enum EnvAction {
    /// Set cluster variables; restarts the services whose environment
    /// changes (and no other).
    Set {
        /// Variables to set, each KEY=VALUE (no `secret:` references).
        #[arg(required = true, value_name = "KEY=VALUE")]
        vars: Vec<String>,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Remove cluster variables; restarts the services whose environment
    /// changes.
    Unset {
        /// Names of the variables to remove.
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// List the cluster variables.
    List {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
}

/// `phoenix secret` subcommands.
#[derive(Subcommand, Debug)]
pub enum SecretAction {
    /// Set a secret's value, read from stdin (not echoed on a terminal; one
    /// trailing newline dropped); restarts the services that use it.
    Set {
        /// The secret's name: letters, digits, `_`, `.`, `-`.
        name: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// List secrets: names, when set, and which services use them (never
    /// values).
    List {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Remove a secret; refused while a service uses it.
    Rm {
        /// The secret's name, as `phoenix secret list` lists it.
        name: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
}

/// `phoenix sources` subcommands.
#[derive(Subcommand, Debug)]
pub enum SourcesAction {
    /// Stop tracking a git source; its services stay as they are.
    Rm {
        /// The source's name, as `phoenix sources` lists it.
        name: String,
    },
}

/// A tree of spec files, for `diff` and `apply`.
#[derive(Args, Debug)]
pub struct TreeArgs {
    /// A spec file, or a folder: its `.json`, `.yaml` and `.yml` files,
    /// recursively (dotfiles and dot-folders skipped).
    pub path: PathBuf,
    /// The name of the source the services belong to; the canonical path
    /// of PATH by default. Services of another source are never touched.
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub json: Json,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every subcommand, with its path (`phoenix minion`).
    fn all_commands() -> Vec<(String, clap::Command)> {
        let mut out = Vec::new();
        let mut todo = vec![("phoenix".to_owned(), Cli::command())];
        while let Some((path, cmd)) = todo.pop() {
            for sub in cmd.get_subcommands() {
                todo.push((format!("{path} {}", sub.get_name()), sub.clone()));
            }
            out.push((path, cmd));
        }
        out
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_positional_argument_is_described() {
        for (path, cmd) in all_commands() {
            for arg in cmd.get_positionals() {
                assert!(
                    arg.get_help().is_some(),
                    "`{path}` has an undescribed positional {}",
                    arg.get_id()
                );
            }
        }
    }

    #[test]
    fn every_time_flag_names_its_unit() {
        let times = ["timeout", "grace", "interval", "seconds", "delay", "every"];
        for (path, cmd) in all_commands() {
            for arg in cmd.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if times.iter().any(|t| long.contains(t)) {
                    assert!(
                        long.ends_with("-ms") || long.ends_with("-s") || long == "seconds",
                        "`{path} --{long}` is a time without its unit in its name"
                    );
                }
            }
        }
    }

    #[test]
    fn a_typo_suggests_the_verbs_it_is_close_to_and_nothing_odd() {
        let names = || {
            let cmd = Cli::command();
            cmd.get_subcommands()
                .flat_map(|s| {
                    std::iter::once(s.get_name().to_owned())
                        .chain(s.get_visible_aliases().map(str::to_owned))
                })
                .collect::<Vec<String>>()
        };
        let close = |typo: &str| close_names(typo, names().iter().map(String::as_str));
        assert_eq!(close("servcies"), ["services"]);
        assert_eq!(close("statsu"), ["status"]);
        assert_eq!(close("restrat"), ["restart"]);
        assert_eq!(close("imgaes"), ["images"]);
        assert_eq!(close("node"), ["nodes"]);
        assert!(close("frobnicate").is_empty());
        assert_eq!(phoenix_model::spec::edit_distance("version", "services"), 5);

        let e = Cli::try_parse_from(["phoenix", "servcies"]).unwrap_err();
        let text = with_close_subcommands(e).to_string();
        assert!(
            text.contains("a similar subcommand exists: 'services'"),
            "{text}"
        );
        let e = Cli::try_parse_from(["phoenix", "frobnicate"]).unwrap_err();
        let text = with_close_subcommands(e).to_string();
        assert!(!text.contains("similar"), "{text}");
    }

    #[test]
    fn apply_takes_a_path_or_a_git_url() {
        let cli = Cli::try_parse_from([
            "phoenix",
            "apply",
            "--git",
            "file:///r#main",
            "--path",
            "specs",
            "--watch",
            "--interval-s",
            "5",
            "--source",
            "conf",
        ])
        .unwrap();
        let Command::Apply {
            path, git, source, ..
        } = cli.command
        else {
            panic!("not apply");
        };
        assert!(path.is_none());
        assert_eq!(git.git.as_deref(), Some("file:///r#main"));
        assert_eq!(git.subdir.as_deref(), Some("specs"));
        assert!(git.watch);
        assert_eq!(git.interval_s, 5);
        assert_eq!(source.as_deref(), Some("conf"));
        for bad in [
            &["phoenix", "apply"][..],
            &["phoenix", "apply", "./d", "--git", "u"],
            &["phoenix", "apply", "./d", "--watch"],
            &[
                "phoenix",
                "apply",
                "--git",
                "u",
                "--webhook-secret-file",
                "f",
            ],
            &["phoenix", "apply", "--git", "u", "--interval-s", "0"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from(["phoenix", "sources", "rm", "conf"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Sources {
                action: Some(SourcesAction::Rm { .. }),
                ..
            }
        ));
    }

    #[test]
    fn everyday_verbs_parse() {
        let cli = Cli::try_parse_from(["phoenix", "restart", "a", "b", "--detach"]).unwrap();
        let Command::Restart { names, waiting, .. } = cli.command else {
            panic!("not restart");
        };
        assert_eq!(
            (names, waiting.detach),
            (vec!["a".into(), "b".into()], true)
        );
        assert!(Cli::try_parse_from(["phoenix", "restart"]).is_err());
        // `--timeout` (seconds) still works for scripts written before `-s`.
        let cli = Cli::try_parse_from(["phoenix", "del", "web", "--timeout", "5"]).unwrap();
        let Command::Del { waiting, .. } = cli.command else {
            panic!("not del");
        };
        assert_eq!(waiting.timeout_s, 5);
        let cli = Cli::try_parse_from(["phoenix", "ps", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Services {
                json: Json { json: true },
                ..
            }
        ));
    }
}
