//! Every command and flag, declared in one place.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The master's data dir when neither --data-dir nor PHOENIX_DATA_DIR says.
pub const DEFAULT_MASTER_DIR: &str = "/var/lib/phoenix/master";
pub const DEFAULT_MINION_DIR: &str = "/var/lib/phoenix/minion";

#[derive(Parser, Debug)]
#[command(
    name = "phoenix",
    version,
    about = "A multi-server process supervisor: installer, master, minion and CLI in one binary",
    long_about = "A multi-server process supervisor: installer, master, minion and CLI in one binary.\n\n\
        Set up a master with `phoenix master <public-ip>`, join minions with `phoenix minion ...`, \
        accept them with `phoenix accept <name>`, then `phoenix deploy spec.json`.\n\
        Commands other than master/minion talk to the master through the Unix socket in its data dir.",
    after_help = "Exit status: 0 ok, 1 failure (a service failed, an internal error), 2 usage, \
        3 invalid input (spec errors), 4 not found, 5 conflict (already accepted, still in use), \
        6 unavailable (the master or a machine is not reachable, or waiting timed out)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The master's data dir, which holds its CLI socket.
    #[arg(long, env = "PHOENIX_DATA_DIR", default_value = DEFAULT_MASTER_DIR, global = true)]
    pub data_dir: PathBuf,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct Json {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
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
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Refuse a waiting machine's join request.
    Reject {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Remove an accepted machine, its overlay peer and its key (it must run no services).
    Forget {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Create the services of a spec file (one spec or an array); all or nothing.
    Deploy(ApplyArgs),
    /// Change existing services (or restart them unchanged); all or nothing.
    Update(ApplyArgs),
    /// Stop and remove a service.
    Del {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Show a service's state, pid, restarts and health.
    Status {
        name: String,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Print a service's spec (with its address) as JSON.
    Info {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// List services.
    Services {
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
    /// Show the audit log: every change, who made it, old and new spec.
    Audit {
        /// How many of the newest entries to show.
        #[arg(short = 'n', long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        json: Json,
    },
    /// Add an image (a file) to the master's registry.
    Push {
        file: PathBuf,
        /// The image's name in the registry (default: the file's name).
        name: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Print a service's output (stdout and stderr).
    Logs {
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
}

#[derive(Args, Debug)]
pub struct MasterArgs {
    /// The address minions reach the master's join endpoint at.
    pub public_ip: IpAddr,
    /// Run the daemon in this terminal instead of installing a system service.
    #[arg(long)]
    pub foreground: bool,
    /// Where the master keeps its state.
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
}

/// The overlay flags, the same for master and minion.
#[derive(Args, Debug)]
pub struct OverlayArgs {
    /// This node's WireGuard UDP port.
    #[arg(long, default_value_t = phoenix_overlay::DEFAULT_WG_PORT)]
    pub wg_port: u16,
    /// Name of the overlay's network interface.
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
    pub master_public_ip: IpAddr,
    /// The master's public key, as `phoenix master-info` prints it.
    pub master_key: String,
    pub minion_public_ip: IpAddr,
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
    /// Start-up grace before the first health check, in ms.
    #[arg(long, default_value_t = 5000)]
    pub health_grace_ms: u64,
    /// Time between health checks, in ms.
    #[arg(long, default_value_t = 2000)]
    pub health_interval_ms: u64,
    /// How long a health check may take, in ms.
    #[arg(long, default_value_t = 1000)]
    pub health_timeout_ms: u64,
    /// How long a service has to exit after SIGTERM before SIGKILL, in ms.
    #[arg(long, default_value_t = 10000)]
    pub stop_timeout_ms: u64,
    /// Rotate a service's log file when it grows past this many bytes.
    #[arg(long, default_value_t = 10 << 20)]
    pub log_max_bytes: u64,
    /// Registry images no service here uses are pre-cached only while this
    /// much of the data dir's disk stays free, in MiB (default: a tenth of
    /// the disk, at most 1024). Images of this minion's own services need
    /// only 8 MiB to spare.
    #[arg(long)]
    pub keep_free_mb: Option<u64>,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The spec file (JSON: one spec or an array of them); `-` reads stdin.
    pub file: PathBuf,
    /// Return once the master has stored the change, without waiting for the services to run.
    #[arg(long)]
    pub detach: bool,
    /// How long to wait for the services to run, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub json: Json,
}
