//! The `archipel` command: keys, node configuration and running, genesis building, the local
//! devnet, and inspection of a running network.
//!
//! This is the only crate that uses `anyhow`; library errors are converted here and printed as
//! one line naming the problem and what to do, with a non-zero exit code.

mod devnet;
mod export_cli;
mod fill_chain;
mod gateway_cli;
mod job_cli;
mod ledger_cli;
mod market_cli;
mod output;
mod put_tree;
mod s3_cli;
mod storage_cli;
mod topology;

use anyhow::{Context as _, Result, anyhow, bail};
use archipel_crypto::{Identity, SignedDescriptor};
use archipel_node::client::ApiClient;
use archipel_node::config::{ApiConfig, ConfigOverrides, NodeConfig, P2pConfig};
use archipel_node::genesis::{Genesis, GenesisAccount};
use archipel_node::run::{RunOptions, own_descriptor};
use archipel_types::{ByteSize, CountryCode, NodeId, Region, Role, Roles};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "archipel",
    version,
    about = "archipel: a decentralized cloud — storage and compute that survive the loss of any provider, data center or region",
    after_help = "Start here: `archipel devnet` runs a local 12-node network; `archipel nodes` shows it."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create and inspect Ed25519 identity keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Configure, describe, run and stop a node.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Build and inspect genesis files.
    Genesis {
        #[command(subcommand)]
        command: GenesisCommand,
    },
    /// Run a local network of real node processes (12 by default) until Ctrl-C.
    Devnet(devnet::DevnetArgs),
    /// Show the network as seen by a node: id, region, country, operator jurisdiction, roles, status.
    Nodes(NodesArgs),
    /// Follow, show, export and verify the replicated ledger.
    Ledger {
        #[command(subcommand)]
        command: ledger_cli::LedgerCommand,
    },
    /// Show balances, transfer funds.
    Account {
        #[command(subcommand)]
        command: ledger_cli::AccountCommand,
    },
    /// Create, list, show and delete storage buckets (each with a placement policy).
    Bucket {
        #[command(subcommand)]
        command: storage_cli::BucketCommand,
    },
    /// Upload a file as an object: encrypted, erasure-coded and placed under the bucket's policy.
    Put(storage_cli::PutArgs),
    /// Download an object (or a byte range of it).
    Get(storage_cli::GetArgs),
    /// List the objects of a bucket.
    Ls(storage_cli::LsArgs),
    /// Delete an object.
    Rm(storage_cli::RmArgs),
    /// Show an object: size, segments, every shard holder with its region, country and operator
    /// jurisdiction, and the ledger's proof of that placement.
    Stat(storage_cli::StatArgs),
    /// Storage health per bucket: degraded segments, repair queue, durability.
    Health(storage_cli::Tenant),
    /// Serve S3 (aws-cli, boto3, rclone) for your buckets: data is encrypted and erasure-coded
    /// here, on your side, before it reaches any node.
    Gateway(gateway_cli::GatewayArgs),
    /// Write a bucket's objects, decrypted, with their metadata, to a directory (resumable).
    Export(export_cli::ExportArgs),
    /// Put an export directory's objects into a bucket, of this or another network (resumable).
    Import(export_cli::ImportArgs),
    /// S3 access keys: scoped, expiring, revocable (`archipel s3 keys create --bucket B --prefix P
    /// --read-only --expires 7d`).
    S3 {
        #[command(subcommand)]
        command: s3_cli::S3Command,
    },
    /// Get inclusion proofs from a node and verify them offline.
    Proof {
        #[command(subcommand)]
        command: ledger_cli::ProofCommand,
    },
    /// Ask a node who you are (a signed request: checks your key is known to the network).
    Whoami(WhoamiArgs),
    /// The compute marketplace: open jobs, recent awards and prices per region.
    Market(storage_cli::Tenant),
    /// WebAssembly jobs: submit one to the marketplace and follow it (`submit`, `status`,
    /// `logs`, `output`, `why`, `cancel`), or run one here under a provider's limits (`run-local`).
    Job {
        #[command(subcommand)]
        command: job_cli::JobCommand,
    },
    /// Diagnostics.
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
    /// The process one WebAssembly run lives in (started by `job run-local` and by providers).
    #[command(hide = true)]
    WasmRun {
        /// The run's request file.
        request: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Generate a new key file (mode 0600). The secret is never printed.
    Gen {
        /// Where to write the key.
        #[arg(long, short, default_value = "archipel.key")]
        out: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the public key (node/account id) of a key file.
    Show {
        /// The key file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Node fields settable by flag or environment variable; each overrides the config file.
#[derive(Args, Debug, Default, Clone)]
struct NodeFields {
    /// Human label for the node.
    #[arg(long, env = "ARCHIPEL_NAME")]
    name: Option<String>,
    /// Key file.
    #[arg(long, env = "ARCHIPEL_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Data directory.
    #[arg(long, env = "ARCHIPEL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Genesis file.
    #[arg(long, env = "ARCHIPEL_GENESIS")]
    genesis: Option<PathBuf>,
    /// Region, e.g. eu-de.
    #[arg(long, env = "ARCHIPEL_REGION")]
    region: Option<Region>,
    /// Country of the hardware (ISO code), e.g. DE.
    #[arg(long, env = "ARCHIPEL_COUNTRY")]
    country: Option<CountryCode>,
    /// Operator (company or person running the node).
    #[arg(long, env = "ARCHIPEL_OPERATOR")]
    operator: Option<String>,
    /// Jurisdiction of the operator (ISO code), e.g. US for a US company's node in Germany.
    #[arg(long, env = "ARCHIPEL_OPERATOR_JURISDICTION")]
    operator_jurisdiction: Option<CountryCode>,
    /// Storage capacity offered, e.g. 50GiB.
    #[arg(long, env = "ARCHIPEL_CAPACITY")]
    capacity: Option<ByteSize>,
    /// Roles, comma separated: validator,storage,compute,gateway.
    #[arg(long, env = "ARCHIPEL_ROLES")]
    roles: Option<Roles>,
    /// P2P listen address.
    #[arg(long, env = "ARCHIPEL_P2P_LISTEN")]
    p2p_listen: Option<SocketAddr>,
    /// P2P address other nodes dial (needed when listening on 0.0.0.0).
    #[arg(long, env = "ARCHIPEL_P2P_PUBLIC")]
    p2p_public: Option<SocketAddr>,
    /// Source IP of outgoing p2p connections, if not the public address's (NAT, loopback devnets).
    #[arg(long, env = "ARCHIPEL_P2P_EGRESS_IP")]
    p2p_egress_ip: Option<std::net::IpAddr>,
    /// HTTP API listen address.
    #[arg(long, env = "ARCHIPEL_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    /// HTTP API address clients use (needed when listening on 0.0.0.0).
    #[arg(long, env = "ARCHIPEL_API_PUBLIC")]
    api_public: Option<SocketAddr>,
}

impl NodeFields {
    fn overrides(&self) -> ConfigOverrides {
        ConfigOverrides {
            name: self.name.clone(),
            key_file: self.key_file.clone(),
            data_dir: self.data_dir.clone(),
            genesis_file: self.genesis.clone(),
            region: self.region.clone(),
            country: self.country,
            operator: self.operator.clone(),
            operator_jurisdiction: self.operator_jurisdiction,
            capacity: self.capacity,
            roles: self.roles.clone(),
            p2p_listen: self.p2p_listen,
            p2p_public: self.p2p_public,
            p2p_egress_ip: self.p2p_egress_ip,
            api_listen: self.api_listen,
            api_public: self.api_public,
        }
    }
}

/// A registered node and the key that controls it (`node update`, `node leave`).
#[derive(clap::Args, Debug)]
struct OwnedNode {
    /// The node's config file (its key signs a new descriptor).
    #[arg(long, short, env = "ARCHIPEL_CONFIG", default_value = "node.toml")]
    config: PathBuf,
    /// The owner's key (default: the devnet tenant key); the node's own key may sign too.
    #[arg(long, env = "ARCHIPEL_KEY")]
    key: Option<PathBuf>,
    #[command(flatten)]
    node: ledger_cli::NodeArg,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Create a node directory: a key (kept if present) and a documented node.toml.
    Init {
        /// Directory for the node's key, config and data.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[command(flatten)]
        fields: NodeFields,
    },
    /// Print the node's signed descriptor (JSON), to be added to a genesis file.
    Descriptor {
        /// The node's config file.
        #[arg(long, short, env = "ARCHIPEL_CONFIG", default_value = "node.toml")]
        config: PathBuf,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Run the node in the foreground until SIGINT/SIGTERM.
    Run {
        /// The node's config file.
        #[arg(long, short, env = "ARCHIPEL_CONFIG", default_value = "node.toml")]
        config: PathBuf,
        /// Refuse to start unless the genesis hash is exactly this (the 64 hex characters
        /// `archipel genesis show` prints).
        #[arg(long, env = "ARCHIPEL_GENESIS_HASH")]
        genesis_hash: Option<String>,
        /// Stop when the parent process exits (the devnet sets this).
        #[arg(long, hide = true)]
        exit_with_parent: bool,
        /// Admission file of a node joining after genesis (from `archipel node admit`); kept in
        /// the data directory afterwards.
        #[arg(long, env = "ARCHIPEL_ADMISSION")]
        admission: Option<PathBuf>,
        /// Join the network: start although the key is not a genesis node (it was registered
        /// on the ledger with `archipel node register` and is admitted once peers see that
        /// finalized), and, when this node's ledger is empty or far behind, take the state from
        /// a peer (checked against a finalized block) instead of replaying every block.
        #[arg(long)]
        join: bool,
        /// With --join: how many blocks behind the network's head this node's ledger may be and
        /// still catch up by blocks; further behind, it is moved aside (`<data dir>/replaced-*`)
        /// and the state is synced from a peer.
        #[arg(long, default_value_t = archipel_node::join::REJOIN_BEHIND_BLOCKS, requires = "join")]
        join_behind: u64,
        /// A validator whose record of its votes (simplex's journal under `<data dir>/runtime`) is
        /// missing votes at once instead of first waiting for the network to finalize a view it
        /// cannot have voted in. Only when a quorum of validators lost their records together and
        /// the network halted: a validator that voted before may otherwise vote twice in a view.
        #[arg(long)]
        vote_without_record: bool,
        #[command(flatten)]
        fields: NodeFields,
    },
    /// Register this node on the ledger (a RegisterNode transaction sponsored by a funded key),
    /// so it can join with `node run --join`; returns once final. The sponsor locks the network's
    /// node deposit (returned by `node leave`); the node's key signs its consent to this sponsor.
    Register {
        /// The new node's config file (its key signs the descriptor and the consent; its genesis
        /// names the network).
        #[arg(long, short, env = "ARCHIPEL_CONFIG", default_value = "node.toml")]
        config: PathBuf,
        /// The sponsor's key: pays the fee, locks the deposit and owns the node (default: the
        /// devnet tenant key).
        #[arg(long, env = "ARCHIPEL_KEY")]
        key: Option<PathBuf>,
        #[command(flatten)]
        node: ledger_cli::NodeArg,
    },
    /// Publish this node's changed descriptor (an UpdateNode transaction: edit node.toml — region,
    /// capacity, addresses, roles… — then run this); returns once final. Signed by the owner, or
    /// by the node's own key with --key.
    Update(#[command(flatten)] OwnedNode),
    /// Remove this node from the ledger's registry (signed by its owner, or by the node's own
    /// key with --key); peers drop it once final and its deposit goes back to the owner.
    Leave(#[command(flatten)] OwnedNode),
    /// As a validator, approve a node joining after genesis; with a quorum, submit the admission.
    Admit {
        /// The validator's config file.
        #[arg(long, short, env = "ARCHIPEL_CONFIG", default_value = "node.toml")]
        config: PathBuf,
        /// The new node's signed descriptor (from `archipel node descriptor`).
        #[arg(long)]
        descriptor: PathBuf,
        /// The admission file collecting approvals (created if missing).
        #[arg(long, default_value = "admission.json")]
        admission: PathBuf,
    },
    /// Ask a running node to stop (signed with the node's own key).
    Stop {
        /// The node's config file.
        #[arg(long, short, env = "ARCHIPEL_CONFIG", default_value = "node.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum GenesisCommand {
    /// Build a genesis file from node descriptors.
    New {
        /// Network name.
        #[arg(long)]
        network: String,
        /// Signed descriptor files (from `archipel node descriptor`).
        #[arg(long = "node", required = true)]
        nodes: Vec<PathBuf>,
        /// Validators by name or id (default: every node with the validator role).
        #[arg(long = "validator")]
        validators: Vec<String>,
        /// Funded accounts as NAME:KEY:BALANCE_MICRO, KEY being a key file or a 64-hex public key.
        #[arg(long = "account")]
        accounts: Vec<String>,
        /// Where to write the genesis.
        #[arg(long, short, default_value = "genesis.json")]
        out: PathBuf,
    },
    /// Check a genesis file and print its hash and nodes.
    Show {
        /// The genesis file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct NodesArgs {
    /// A node's API URL (default: the local devnet's first node).
    #[arg(long, env = "ARCHIPEL_NODE")]
    node: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct WhoamiArgs {
    /// A node's API URL (default: the local devnet's first node).
    #[arg(long, env = "ARCHIPEL_NODE")]
    node: Option<String>,
    /// Your key file (default: the local devnet's tenant key).
    #[arg(long, env = "ARCHIPEL_KEY")]
    key: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum DebugCommand {
    /// Join the p2p network with a key for a few seconds and report what was received.
    P2pProbe {
        /// The key to connect with.
        #[arg(long)]
        key: PathBuf,
        /// The network's genesis.
        #[arg(long)]
        genesis: PathBuf,
        /// Address to listen on while probing.
        #[arg(long)]
        listen: SocketAddr,
        /// How long to listen.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Give a stopped devnet a long chain and a large state, built and signed offline with its
    /// own validator keys (benchmarks and tests of restart and join). Replaces every node's
    /// ledger and consensus storage.
    FillChain {
        /// The devnet directory.
        #[arg(long, default_value = devnet::DEFAULT_DIR)]
        dir: PathBuf,
        /// The chain's height when done.
        #[arg(long)]
        blocks: u64,
        /// Fresh accounts to credit first (1 micro each, from the tenant).
        #[arg(long, default_value_t = 0)]
        accounts: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    quiet_on_closed_output();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARCHIPEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,commonware=warn,s3s=off"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Makes a closed standard output or error (`archipel ledger tail | head`) end the program
/// quietly with status 0, as Unix tools do, instead of a panic and a backtrace. `println!` panics
/// with the write's error when the reader went away (Rust ignores SIGPIPE); that one panic is
/// recognised here, for the whole binary, and every other panic is reported as usual.
fn quiet_on_closed_output() {
    let broken_pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe).to_string();
    let epipe = std::io::Error::from_raw_os_error(nix::errno::Errno::EPIPE as i32).to_string();
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        let printing =
            message.starts_with("failed printing to stdout") || message.starts_with("failed printing to stderr");
        if printing && (message.ends_with(&epipe) || message.ends_with(&broken_pipe)) {
            std::process::exit(0);
        }
        report(info);
    }));
}

/// Signs this node's descriptor from `config` and submits it in the transaction `payload` builds
/// (RegisterNode or UpdateNode), signed with `key`; returns once final.
fn publish_descriptor(
    config: &Path,
    key: Option<PathBuf>,
    node: &ledger_cli::NodeArg,
    done: &str,
    payload: impl FnOnce(SignedDescriptor) -> archipel_ledger::Payload,
) -> Result<()> {
    let cfg = load_config(config, None)?;
    let identity = Identity::load(&cfg.key_file)?;
    // The ledger takes only a version above the registered one (or above the one the node left
    // with): the current time in ms is, as long as clocks do not go back.
    let mut descriptor = own_descriptor(&identity, &cfg, None, archipel_node::api::system_now_ms())?.descriptor;
    descriptor.version = archipel_node::api::system_now_ms();
    let descriptor = SignedDescriptor::sign(&identity, descriptor)?;
    tokio_rt()?.block_on(ledger_cli::submit_as(key, payload(descriptor), node, &format!("{done} node {}", cfg.name)))
}

/// Writes `bytes` to `path` readable by its owner only.
fn write_private(path: &Path, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes.as_ref())?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
}

fn tokio_rt() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start async runtime")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Key { command } => key(command),
        Command::Node { command } => node(command),
        Command::Genesis { command } => genesis(command),
        Command::Devnet(args) => devnet::run(args),
        Command::Nodes(args) => tokio_rt()?.block_on(nodes(args)),
        Command::Whoami(args) => tokio_rt()?.block_on(whoami(args)),
        Command::Ledger { command } => tokio_rt()?.block_on(ledger_cli::ledger(command)),
        Command::Account { command } => tokio_rt()?.block_on(ledger_cli::account(command)),
        Command::Proof { command } => tokio_rt()?.block_on(ledger_cli::proof(command)),
        Command::Bucket { command } => tokio_rt()?.block_on(storage_cli::bucket(command)),
        Command::Put(args) => tokio_rt()?.block_on(storage_cli::put(args)),
        Command::Get(args) => tokio_rt()?.block_on(storage_cli::get(args)),
        Command::Ls(args) => tokio_rt()?.block_on(storage_cli::ls(args)),
        Command::Rm(args) => tokio_rt()?.block_on(storage_cli::rm(args)),
        Command::Stat(args) => tokio_rt()?.block_on(storage_cli::stat(args)),
        Command::Health(args) => tokio_rt()?.block_on(storage_cli::health(args)),
        Command::Gateway(args) => tokio_rt()?.block_on(gateway_cli::run(args)),
        Command::Export(args) => tokio_rt()?.block_on(export_cli::export(args)),
        Command::Import(args) => tokio_rt()?.block_on(export_cli::import(args)),
        Command::S3 { command } => tokio_rt()?.block_on(s3_cli::run(command)),
        Command::Job { command } => tokio_rt()?.block_on(job_cli::run(command)),
        Command::Market(t) => tokio_rt()?.block_on(market_cli::market(t)),
        Command::WasmRun { request } => std::process::exit(archipel_compute::child::main(&request)),
        Command::Debug { command: DebugCommand::P2pProbe { key, genesis, listen, seconds } } => {
            let identity = Identity::load(&key)?;
            let genesis = Genesis::load(&genesis)?;
            let report = archipel_node::p2p::probe(&identity, &genesis, listen, Duration::from_secs(seconds));
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Debug { command: DebugCommand::FillChain { dir, blocks, accounts, json } } => {
            let filled = fill_chain::fill(&dir, blocks, accounts)?;
            if json {
                println!("{}", serde_json::to_string(&filled)?);
            } else {
                println!(
                    "devnet {}: chain filled to block {} with {} new accounts in {:.1} s; start it with `archipel devnet --dir {}`",
                    dir.display(),
                    filled.height,
                    filled.accounts,
                    filled.seconds,
                    dir.display()
                );
            }
            Ok(())
        }
    }
}

fn key(cmd: KeyCommand) -> Result<()> {
    match cmd {
        KeyCommand::Gen { out, json } => {
            let id = Identity::generate();
            id.save(&out)?;
            if json {
                println!("{}", serde_json::json!({ "key_file": out, "id": id.node_id() }));
            } else {
                println!("wrote {} (mode 0600)\nid: {}", out.display(), id.node_id());
            }
        }
        KeyCommand::Show { file, json } => {
            let id = Identity::load(&file)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "key_file": file, "id": id.node_id(), "short": id.node_id().short() })
                );
            } else {
                println!("{}", id.node_id());
            }
        }
    }
    Ok(())
}

fn need<T>(v: Option<T>, flag: &str, env: &str) -> Result<T> {
    v.ok_or_else(|| anyhow!("--{flag} is required (or set {env})"))
}

/// Builds the config of `node init` from flags (and environment), with defaults.
fn init_config(dir: &Path, f: &NodeFields) -> Result<NodeConfig> {
    let p2p_listen = f.p2p_listen.unwrap_or_else(|| "0.0.0.0:23100".parse().unwrap_or_else(|_| unreachable!()));
    let api_listen = f.api_listen.unwrap_or_else(|| "0.0.0.0:23101".parse().unwrap_or_else(|_| unreachable!()));
    if p2p_listen.ip().is_unspecified() && f.p2p_public.is_none() {
        bail!(
            "--p2p-public is required when the p2p listen address is {p2p_listen}: give the address other nodes dial, e.g. --p2p-public 203.0.113.7:23100"
        );
    }
    if api_listen.ip().is_unspecified() && f.api_public.is_none() {
        bail!(
            "--api-public is required when the API listen address is {api_listen}: give the address clients use, e.g. --api-public 203.0.113.7:23101"
        );
    }
    let name = f.name.clone().unwrap_or_else(|| {
        std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.to_path_buf())
            .file_name()
            .map_or_else(|| "node".into(), |n| n.to_string_lossy().into_owned())
    });
    Ok(NodeConfig {
        ledger: Default::default(),
        compute: Default::default(),
        name,
        key_file: f.key_file.clone().unwrap_or_else(|| "node.key".into()),
        data_dir: f.data_dir.clone().unwrap_or_else(|| "data".into()),
        genesis_file: f.genesis.clone().unwrap_or_else(|| "genesis.json".into()),
        region: need(f.region.clone(), "region", "ARCHIPEL_REGION")?,
        country: need(f.country, "country", "ARCHIPEL_COUNTRY")?,
        operator: need(f.operator.clone(), "operator", "ARCHIPEL_OPERATOR")?,
        operator_jurisdiction: need(
            f.operator_jurisdiction,
            "operator-jurisdiction",
            "ARCHIPEL_OPERATOR_JURISDICTION",
        )?,
        capacity: f.capacity.unwrap_or(ByteSize(10 << 30)),
        roles: f.roles.clone().unwrap_or_else(|| "storage,compute".parse().unwrap_or_default()),
        p2p: P2pConfig {
            listen: p2p_listen,
            public: f.p2p_public,
            egress_ip: f.p2p_egress_ip,
            allow_private_ips: true,
        },
        api: ApiConfig { listen: api_listen, public: f.api_public, limits: Default::default() },
    })
}

/// Creates (or reuses) the key and writes `node.toml` in `dir`, checking everything before writing.
fn node_init(dir: &Path, fields: &NodeFields) -> Result<()> {
    let cfg = init_config(dir, fields)?;
    let config_path = dir.join("node.toml");
    if config_path.exists() {
        bail!("{} already exists: refusing to overwrite it (edit it, or remove it yourself)", config_path.display());
    }
    let key_path = if cfg.key_file.is_relative() { dir.join(&cfg.key_file) } else { cfg.key_file.clone() };
    let existing = key_path.exists();
    let identity = if existing { Identity::load(&key_path)? } else { Identity::generate() };
    // Fail now, before writing anything, on a config that cannot make a valid descriptor.
    own_descriptor(&identity, &cfg, None, 1)?;
    if existing {
        println!("using existing key {}", key_path.display());
    } else {
        identity.save(&key_path)?;
        println!("wrote key {} (mode 0600)", key_path.display());
    }
    cfg.write_new(&config_path)?;
    println!("wrote config {}", config_path.display());
    println!("node id: {}", identity.node_id());
    println!(
        "next: archipel node descriptor --config {} --out descriptor.json  (send it to whoever builds the genesis)",
        config_path.display()
    );
    Ok(())
}

fn load_config(path: &Path, fields: Option<&NodeFields>) -> Result<NodeConfig> {
    let mut cfg = NodeConfig::load(path)?;
    if let Some(f) = fields {
        cfg.apply(f.overrides());
    }
    Ok(cfg)
}

fn node(cmd: NodeCommand) -> Result<()> {
    match cmd {
        NodeCommand::Init { dir, fields } => node_init(&dir, &fields),
        NodeCommand::Descriptor { config, out } => {
            let cfg = load_config(&config, None)?;
            let identity = Identity::load(&cfg.key_file)?;
            let d = own_descriptor(&identity, &cfg, None, 1)?;
            let text = serde_json::to_string_pretty(&d)?;
            match out {
                Some(path) => {
                    write_new_file(&path, &format!("{text}\n"))?;
                    println!("wrote {}", path.display());
                }
                None => println!("{text}"),
            }
            Ok(())
        }
        NodeCommand::Register { config, key, node } => {
            // The node consents to be owned by this sponsor on this network (its genesis).
            let key = key.unwrap_or_else(|| Path::new(devnet::DEFAULT_DIR).join("tenant.key"));
            let owner = Identity::load(&key)?.node_id();
            let cfg = load_config(&config, None)?;
            let network = Genesis::load(&cfg.genesis_file)?.network_hash();
            let identity = Identity::load(&cfg.key_file)?;
            publish_descriptor(&config, Some(key), &node, "registered", |descriptor| {
                archipel_ledger::Payload::register_node(&identity, &network, &owner, descriptor)
            })
        }
        NodeCommand::Update(OwnedNode { config, key, node }) => {
            publish_descriptor(&config, key, &node, "updated", |descriptor| archipel_ledger::Payload::UpdateNode {
                descriptor,
            })
        }
        NodeCommand::Leave(OwnedNode { config, key, node }) => {
            let cfg = load_config(&config, None)?;
            let id = Identity::load(&cfg.key_file)?.node_id();
            let payload = archipel_ledger::Payload::LeaveNode { node: id };
            tokio_rt()?.block_on(ledger_cli::submit_as(
                key,
                payload,
                &node,
                &format!("node {} left the registry (its deposit went back to its owner)", cfg.name),
            ))
        }
        NodeCommand::Run {
            config,
            genesis_hash,
            exit_with_parent,
            admission,
            join,
            join_behind,
            vote_without_record,
            fields,
        } => {
            let cfg = load_config(&config, Some(&fields))?;
            // Upgrade drills (tests/upgrade_processes.rs): a debug build may act as a build of a
            // newer protocol. Release builds ignore the variable.
            #[cfg(debug_assertions)]
            if let Some(v) = std::env::var_os("ARCHIPEL_TEST_PROTOCOL_CEILING") {
                let n: u32 = v.to_string_lossy().parse().context("ARCHIPEL_TEST_PROTOCOL_CEILING is not a number")?;
                archipel_ledger::upgrade::pretend_build_implements(n);
            }
            let options = RunOptions {
                expect_genesis_hash: genesis_hash,
                exit_with_parent,
                admission,
                join,
                join_behind,
                vote_without_record,
            };
            let prepared = archipel_node::run::prepare(cfg, options)?;
            prepared.run()?;
            Ok(())
        }
        NodeCommand::Admit { config, descriptor, admission } => admit(&config, &descriptor, &admission),
        NodeCommand::Stop { config } => {
            let cfg = load_config(&config, None)?;
            let identity = Identity::load(&cfg.key_file)?;
            let client = ApiClient::new(&cfg.api_public().to_string()).with_identity(identity);
            tokio_rt()?.block_on(client.call::<serde_json::Value>("POST", "/v1/node/shutdown", Vec::new()))?;
            println!("node {} is stopping", cfg.name);
            Ok(())
        }
    }
}

/// Adds this validator's approval to `admission_path`; submits it to the validator's node once
/// the quorum is reached.
fn admit(config: &Path, descriptor: &Path, admission_path: &Path) -> Result<()> {
    use archipel_crypto::{Admission, quorum};
    let cfg = load_config(config, None)?;
    let identity = Identity::load(&cfg.key_file)?;
    let genesis = Genesis::load(&cfg.genesis_file)?;
    let hash = genesis.hash();
    if !genesis.validators.contains(&identity.node_id()) {
        bail!("{} is not a validator of network {}: only validators approve new nodes", cfg.name, genesis.network);
    }
    let text = std::fs::read_to_string(descriptor)
        .with_context(|| format!("cannot read descriptor {}", descriptor.display()))?;
    let d: SignedDescriptor =
        serde_json::from_str(&text).with_context(|| format!("descriptor {} is malformed", descriptor.display()))?;
    d.verify().with_context(|| format!("descriptor {} does not verify", descriptor.display()))?;
    if genesis.node(&d.descriptor.node_id).is_some() {
        bail!("node {} is already a genesis node: nothing to admit", d.descriptor.node_id.short());
    }
    let mut admission = match std::fs::read_to_string(admission_path) {
        Ok(t) => {
            let a: Admission = serde_json::from_str(&t)
                .with_context(|| format!("admission {} is malformed", admission_path.display()))?;
            if a.descriptor != d || a.genesis_hash != hash {
                bail!(
                    "admission {} is for another descriptor or network: use a new --admission file",
                    admission_path.display()
                );
            }
            a
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Admission::new(&hash, d),
        Err(e) => return Err(anyhow!("cannot read {}: {e}", admission_path.display())),
    };
    admission.approve(&identity);
    let tmp = admission_path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&admission)?)
        .and_then(|_| std::fs::rename(&tmp, admission_path))
        .with_context(|| format!("cannot write {}", admission_path.display()))?;
    let (have, need) = (admission.valid_approvals(&genesis.validators), quorum(genesis.validators.len()));
    println!(
        "{} approves {}: {have} of {need} approvals in {}",
        cfg.name,
        admission.descriptor.descriptor.name,
        admission_path.display()
    );
    if have >= need {
        let client = ApiClient::new(&cfg.api_public().to_string()).with_identity(identity);
        let body = serde_json::to_vec(&admission)?;
        tokio_rt()?.block_on(client.call::<serde_json::Value>("POST", "/v1/admissions", body))?;
        println!("quorum reached: submitted to {}; the network admits the node within seconds", client.base());
        println!(
            "next, on the new node: archipel node run --config node.toml --admission {}",
            admission_path.display()
        );
    }
    Ok(())
}

fn write_new_file(path: &Path, text: &str) -> Result<()> {
    archipel_node::files::write_new(path, text.as_bytes()).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

/// Parses `NAME:KEY:BALANCE` where KEY is a key file or a hex public key.
fn parse_account(spec: &str) -> Result<GenesisAccount> {
    let mut parts = spec.splitn(3, ':');
    let (Some(name), Some(key), Some(balance)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("account {spec:?} must be NAME:KEY:BALANCE_MICRO");
    };
    let key = match key.parse::<NodeId>() {
        Ok(id) => id,
        Err(_) => Identity::load(Path::new(key))
            .with_context(|| format!("account {name}: {key} is neither a 64-hex key nor a key file"))?
            .node_id(),
    };
    let balance_micro = balance
        .parse()
        .with_context(|| format!("account {name}: balance {balance:?} is not a whole number of micro-units"))?;
    Ok(GenesisAccount { name: name.to_string(), key, balance_micro })
}

/// Builds a validated genesis.
pub(crate) fn build_genesis(
    network: &str,
    nodes: Vec<SignedDescriptor>,
    validators: &[String],
    accounts: Vec<GenesisAccount>,
    now_ms: u64,
) -> Result<Genesis> {
    let validators: Vec<NodeId> = if validators.is_empty() {
        nodes.iter().filter(|n| n.descriptor.roles.contains(Role::Validator)).map(|n| n.descriptor.node_id).collect()
    } else {
        validators
            .iter()
            .map(|v| {
                nodes
                    .iter()
                    .find(|n| n.descriptor.name == *v || n.descriptor.node_id.to_string().starts_with(v.as_str()))
                    .map(|n| n.descriptor.node_id)
                    .ok_or_else(|| anyhow!("validator {v:?} is not the name or id of any --node"))
            })
            .collect::<Result<_>>()?
    };
    let g = Genesis {
        network: network.to_string(),
        created_at_ms: now_ms,
        nodes,
        validators,
        accounts,
        membership: Default::default(),
        ledger: Default::default(),
    };
    g.validate()?;
    Ok(g)
}

fn genesis(cmd: GenesisCommand) -> Result<()> {
    match cmd {
        GenesisCommand::New { network, nodes, validators, accounts, out } => {
            let nodes = nodes
                .iter()
                .map(|p| {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read descriptor {}", p.display()))?;
                    serde_json::from_str::<SignedDescriptor>(&text)
                        .with_context(|| format!("descriptor {} is malformed", p.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            let accounts = accounts.iter().map(|a| parse_account(a)).collect::<Result<Vec<_>>>()?;
            let g = build_genesis(&network, nodes, &validators, accounts, archipel_node::api::system_now_ms())?;
            g.write_new(&out)?;
            println!(
                "wrote {} — network {}, {} nodes, {} validators, hash {}",
                out.display(),
                g.network,
                g.nodes.len(),
                g.validators.len(),
                g.hash()
            );
            Ok(())
        }
        GenesisCommand::Show { file, json } => {
            let g = Genesis::load(&file)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "network": g.network, "hash": g.hash(), "nodes": g.nodes, "validators": g.validators, "accounts": g.accounts })
                );
            } else {
                println!("network {}  hash {}", g.network, g.hash());
                output::genesis_table(&g);
            }
            Ok(())
        }
    }
}

/// The API URL to use: the flag/env, else the local devnet's first node.
fn default_node(node: Option<String>) -> Result<String> {
    // A list (as storage commands take, e.g. one `ARCHIPEL_NODE` for every command): its first.
    if let Some(n) = node.as_deref().and_then(|n| n.split(',').map(str::trim).find(|n| !n.is_empty())) {
        return Ok(n.to_string());
    }
    devnet::first_api_url(Path::new(devnet::DEFAULT_DIR))
        .ok_or_else(|| anyhow!("no node given: pass --node http://HOST:PORT (or set ARCHIPEL_NODE), or start a local network with `archipel devnet`"))
}

async fn nodes(args: NodesArgs) -> Result<()> {
    let client = ApiClient::new(&default_node(args.node)?);
    let view = client.nodes().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        output::nodes_table(&view);
    }
    Ok(())
}

async fn whoami(args: WhoamiArgs) -> Result<()> {
    let key = match args.key {
        Some(k) => k,
        None => Path::new(devnet::DEFAULT_DIR).join("tenant.key"),
    };
    let identity = Identity::load(&key)?;
    let client = ApiClient::new(&default_node(args.node)?).with_identity(identity);
    let answer: serde_json::Value = client.get("/v1/whoami").await?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}
