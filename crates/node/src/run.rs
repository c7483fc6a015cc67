//! Starting a node: load and check everything, then run p2p, membership and consensus on
//! commonware's tokio runtime and the HTTP API on its own runtime ([`api::ApiServer`]), until a
//! signal, a shutdown request or the parent's exit.
//!
//! Every check that can fail because of the operator's input happens before anything is written or
//! bound for long, and fails with an error naming the file, field or address and what to do.

use crate::api::{self, ApiState};
use crate::config::{ConfigError, NodeConfig};
use crate::datadir::{self, DataDirError, DataDirMarker};
use crate::genesis::{Genesis, GenesisError};
use crate::gossip::{self, GossipObserver, LogObserver};
use crate::membership::{AdmissionRule, Effect, PeerTable};
use crate::p2p;
use crate::txgossip;
use archipel_consensus::block::BlockCfg;
use archipel_consensus::engine::ConsensusConfig;
use archipel_consensus::state_db::StateDb;
use archipel_consensus::{Chain, FileStore};
use archipel_crypto::{Admission, Identity, KeyFileError, RequestVerifier, SignedDescriptor};
use archipel_types::NodeDescriptor;
use commonware_cryptography::Signer as _;
use commonware_runtime::telemetry::metrics::{GaugeExt, MetricsExt};
use commonware_runtime::{Clock, Metrics, Runner, Spawner, Supervisor, tokio as cw_tokio};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Config problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Key problem.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// Genesis problem.
    #[error(transparent)]
    Genesis(#[from] GenesisError),
    /// Data directory problem.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The node's key is not a genesis node.
    #[error(
        "this node's key {key} (from {key_file}) is not one of the nodes in genesis {genesis}: register it on the ledger (`archipel node register`) and start it with --join, add its descriptor (`archipel node descriptor`) to a new genesis, or use the right key"
    )]
    NotInGenesis {
        /// The key.
        key: String,
        /// Key file.
        key_file: PathBuf,
        /// Genesis file.
        genesis: PathBuf,
    },
    /// The expected genesis hash given is not a hash.
    #[error(
        "--genesis-hash {given:?} is not a genesis hash: give all 64 hex characters that `archipel genesis show` prints ({reason})"
    )]
    BadGenesisHash {
        /// What was given.
        given: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The genesis hash is not the expected one.
    #[error(
        "genesis {path} has hash {found} but {expected} was expected (--genesis-hash): every node of a network must use the same genesis file"
    )]
    GenesisMismatch {
        /// Genesis file.
        path: PathBuf,
        /// Its hash.
        found: String,
        /// The expected hash.
        expected: String,
    },
    /// A listen address cannot be bound.
    #[error("cannot listen on {what} address {addr}: {reason}")]
    Bind {
        /// `p2p` or `api`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why, with advice.
        reason: String,
    },
    /// An admission file is unusable.
    #[error("admission {path}: {reason}")]
    Admission {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The config describes the node inconsistently.
    #[error("config is invalid: {0}")]
    Invalid(String),
}

/// Options of `archipel node run` beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Refuse to start unless the genesis hash is exactly this (64 hex characters).
    pub expect_genesis_hash: Option<String>,
    /// Stop when the parent process exits (used by the devnet supervisor so no node is orphaned).
    pub exit_with_parent: bool,
    /// The admission of a node that joins after genesis (see `archipel node admit`).
    pub admission: Option<PathBuf>,
    /// Start although the key is not a genesis node (it was registered on the ledger), and sync
    /// the state from a peer when the ledger is empty or far behind ([`crate::join`]).
    pub join: bool,
    /// With `join`: how far behind the network the ledger may be and still catch up by blocks
    /// ([`crate::join::REJOIN_BEHIND_BLOCKS`] by default).
    pub join_behind: u64,
    /// A validator without its record of votes votes at once (see
    /// [`archipel_consensus::vote_gate`]).
    pub vote_without_record: bool,
}

/// The node's observer: logs, re-tracks the p2p allowed set when a node is admitted, and persists
/// admissions so they survive restarts.
struct NodeObserver {
    members: Arc<Mutex<p2p::MemberSet>>,
    data_dir: PathBuf,
    admissions: Vec<Admission>,
}

impl GossipObserver for NodeObserver {
    fn on_effect(&mut self, now_ms: u64, effect: &Effect) {
        LogObserver.on_effect(now_ms, effect);
        if let Effect::Admitted(a) = effect {
            self.members.lock().unwrap_or_else(|p| p.into_inner()).add(&a.descriptor);
            let id = a.descriptor.descriptor.node_id;
            if !self.admissions.iter().any(|x| x.descriptor.descriptor.node_id == id) {
                tracing::info!(node = %id.short(), name = %a.descriptor.descriptor.name, "node admitted");
                self.admissions.push(a.clone());
                if let Err(e) = datadir::save_admissions(&self.data_dir, &self.admissions) {
                    tracing::error!(error = %e, "cannot persist admissions");
                }
            }
        }
    }
}

/// Opens the node's finalized chain: the blocks from `<data dir>/ledger/blocks.log`, the state
/// and transaction index from `<data dir>/ledger/state.redb` (only the blocks after its height
/// are replayed).
fn open_chain(cfg: &NodeConfig, genesis: &Genesis, me: &archipel_types::NodeId) -> Result<Arc<Chain>, NodeError> {
    let dir = cfg.data_dir.join("ledger");
    std::fs::create_dir_all(&dir).map_err(|e| NodeError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
    let store = FileStore::open(&dir.join("blocks.log")).map_err(NodeError::Invalid)?;
    let states = StateDb::open(&dir.join("state.redb")).map_err(|e| {
        NodeError::Invalid(format!(
            "{e}: delete {} to have the state rebuilt from the block log",
            dir.join("state.redb").display()
        ))
    })?;
    let mut chain = Chain::open_with(genesis.ledger_state(), Box::new(store), Arc::new(states)).map_err(|e| {
        NodeError::Invalid(format!(
            "{e}: the data directory {} is damaged; move it aside to resync",
            cfg.data_dir.display()
        ))
    })?;
    if let Some(blocks) = cfg.ledger.retain_blocks {
        chain = chain.with_retention(blocks);
    }
    // Nodes commit their state at heights their keys spread out (see `with_commit_phase`).
    chain = chain.with_commit_phase(u64::from_le_bytes(me.0[..8].try_into().unwrap_or_default()));
    let opened = chain.opened();
    tracing::info!(
        state_height = opened.state_height,
        replayed = opened.replayed,
        head = chain.head().height,
        "ledger opened: stored state, then the blocks after it replayed from the log"
    );
    Ok(Arc::new(chain))
}

/// Keeps the p2p allowed set and the peer table equal to the finalized node registry.
async fn follow_registry(
    chain: Arc<Chain>,
    table: crate::gossip::SharedPeerTable,
    members: Arc<Mutex<p2p::MemberSet>>,
) {
    let mut height = chain.head().height;
    loop {
        height = match chain.watch_height(height) {
            Ok(h) => h,
            Err(next) => match next.await {
                Ok(h) => h,
                Err(_) => return,
            },
        };
        let registry: Vec<SignedDescriptor> =
            chain.with_state(|s| s.nodes().values().map(|r| r.descriptor.clone()).collect());
        let mut table = crate::gossip::lock_table(&table);
        if table.set_registry(&registry) {
            let mut all = registry;
            all.extend(table.admissions().into_iter().map(|a| a.descriptor));
            members.lock().unwrap_or_else(|p| p.into_inner()).set(&all);
            tracing::info!(height, nodes = all.len(), "p2p allowed set follows the node registry");
        }
    }
}

/// A duration in whole seconds from the environment variable `name` (the tests' knobs for the
/// storage workers), or `default` when it is unset; one that is not a number of seconds is
/// logged and ignored.
fn secs_from_env(name: &str, default: Duration) -> Duration {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v.trim().parse().map(Duration::from_secs).unwrap_or_else(|_| {
            tracing::warn!(variable = name, value = %v, default_secs = default.as_secs(), "not a number of seconds: ignored");
            default
        }),
    }
}

fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr).map_err(|e| {
        let reason = match e.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "the address is already in use (another archipel node or program?): stop it, or choose another with --{what}-listen"
            ),
            std::io::ErrorKind::AddrNotAvailable => {
                "no local interface has this address: use an address of this machine (or 0.0.0.0) with --{what}-listen".replace("{what}", what)
            }
            std::io::ErrorKind::PermissionDenied => "permission denied (ports below 1024 need privileges)".to_string(),
            _ => e.to_string(),
        };
        NodeError::Bind { what, addr, reason }
    })
}

/// The descriptor this node announces: the known one (from genesis or its admission) if the
/// config still matches it, otherwise a newer version signed now; version 1 for a new node.
pub fn own_descriptor(
    identity: &Identity,
    cfg: &NodeConfig,
    known: Option<&SignedDescriptor>,
    now_ms: u64,
) -> Result<SignedDescriptor, NodeError> {
    let node_id = identity.node_id();
    let mut d = NodeDescriptor {
        node_id,
        name: cfg.name.clone(),
        operator: cfg.operator.clone(),
        region: cfg.region.clone(),
        country: cfg.country,
        operator_jurisdiction: cfg.operator_jurisdiction,
        capacity: cfg.capacity,
        roles: cfg.roles.clone(),
        p2p_address: cfg.p2p_public(),
        p2p_egress_ip: cfg.p2p.egress_ip,
        api_address: cfg.api_public(),
        version: known.map_or(1, |k| k.descriptor.version),
    };
    if let Some(k) = known {
        if k.descriptor == d {
            return Ok(k.clone());
        }
        d.version = (k.descriptor.version + 1).max(now_ms);
    }
    d.validate().map_err(|e| NodeError::Invalid(e.to_string()))?;
    SignedDescriptor::sign(identity, d).map_err(|e| NodeError::Invalid(e.to_string()))
}

/// Everything checked and loaded, ready to run.
#[derive(Debug)]
pub struct PreparedNode {
    cfg: NodeConfig,
    identity: Identity,
    genesis: Arc<Genesis>,
    genesis_hash: String,
    own: SignedDescriptor,
    api_listener: TcpListener,
    options: RunOptions,
    admissions: Vec<Admission>,
}

/// Loads key, genesis and data directory and binds the API, failing with a clear error.
pub fn prepare(cfg: NodeConfig, options: RunOptions) -> Result<PreparedNode, NodeError> {
    let identity = Identity::load(&cfg.key_file)?;
    let genesis = Genesis::load(&cfg.genesis_file)?;
    let genesis_hash = genesis.hash();
    if let Some(given) = &options.expect_genesis_hash {
        let expected = crate::ledger_verify::parse_genesis_hash(given)
            .map_err(|reason| NodeError::BadGenesisHash { given: given.clone(), reason })?;
        if genesis_hash != expected {
            return Err(NodeError::GenesisMismatch { path: cfg.genesis_file.clone(), found: genesis_hash, expected });
        }
    }
    // Admissions this node knows: persisted from earlier runs, plus the one given on the command line.
    let me = identity.node_id();
    let mut admissions = datadir::load_admissions(&cfg.data_dir)?;
    if let Some(path) = &options.admission {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NodeError::Admission { path: path.clone(), reason: format!("cannot read it: {e}") })?;
        let a: Admission = serde_json::from_str(&text)
            .map_err(|e| NodeError::Admission { path: path.clone(), reason: format!("malformed: {e}") })?;
        if a.descriptor.descriptor.node_id != me {
            return Err(NodeError::Admission {
                path: path.clone(),
                reason: format!(
                    "it admits node {}, not this node {}",
                    a.descriptor.descriptor.node_id.short(),
                    me.short()
                ),
            });
        }
        a.verify(&genesis_hash, &genesis.validators)
            .map_err(|e| NodeError::Admission { path: path.clone(), reason: e.to_string() })?;
        admissions.push(a);
    }
    admissions.retain(|a| genesis.node(&a.descriptor.descriptor.node_id).is_none());
    let known = genesis.node(&me).or_else(|| {
        admissions
            .iter()
            .find(|a| a.descriptor.descriptor.node_id == me && a.verify(&genesis_hash, &genesis.validators).is_ok())
            .map(|a| &a.descriptor)
    });
    let Some(known) = known else {
        if options.join {
            let own = own_descriptor(&identity, &cfg, None, api::system_now_ms())?;
            return finish_prepare(cfg, identity, genesis, genesis_hash, own, options, admissions);
        }
        return Err(NodeError::NotInGenesis {
            key: me.short(),
            key_file: cfg.key_file.clone(),
            genesis: cfg.genesis_file.clone(),
        });
    };
    let own = own_descriptor(&identity, &cfg, Some(known), api::system_now_ms())?;
    finish_prepare(cfg, identity, genesis, genesis_hash, own, options, admissions)
}

/// The checks shared by genesis nodes and nodes joining by registration: data directory, ports.
fn finish_prepare(
    cfg: NodeConfig,
    identity: Identity,
    genesis: Genesis,
    genesis_hash: String,
    own: SignedDescriptor,
    options: RunOptions,
    admissions: Vec<Admission>,
) -> Result<PreparedNode, NodeError> {
    datadir::open(
        &cfg.data_dir,
        &DataDirMarker {
            network: genesis.network.clone(),
            genesis_hash: genesis_hash.clone(),
            node_id: identity.node_id(),
        },
    )?;
    // Probe the p2p port now (commonware binds it later and cannot report a clear error), then
    // hold the API listener for the server.
    drop(bind("p2p", cfg.p2p.listen)?);
    let api_listener = bind("api", cfg.api.listen)?;
    Ok(PreparedNode { cfg, identity, genesis: Arc::new(genesis), genesis_hash, own, api_listener, options, admissions })
}

impl PreparedNode {
    /// Runs until SIGINT/SIGTERM, `POST /v1/node/shutdown`, or (with `exit_with_parent`) the parent's exit.
    pub fn run(self) -> Result<(), NodeError> {
        let PreparedNode { cfg, identity, genesis, genesis_hash, own, api_listener, options, admissions } = self;
        let storage = cfg.data_dir.join("runtime");
        let me = identity.node_id();
        // The API gets its own threads: a burst of requests queues there, not in front of consensus.
        let api_server = api::ApiServer::new(&cfg.api.limits).map_err(NodeError::Invalid)?;
        let api_handle = api_server.handle();
        let validators: Vec<archipel_crypto::Ed25519PublicKey> =
            genesis.validators.iter().filter_map(|v| archipel_crypto::public_key(v).ok()).collect();
        let mut consensus_cfg = ConsensusConfig::new(
            archipel_consensus::engine::namespace(&genesis_hash),
            validators.clone(),
            BlockCfg::from(&genesis.ledger),
        );
        consensus_cfg.vote_without_record = options.vote_without_record;
        if options.join {
            match crate::join::prepare_ledger(
                &cfg.data_dir,
                &genesis,
                &consensus_cfg,
                &own.descriptor.node_id,
                options.join_behind,
            )? {
                crate::join::Prepared::Kept => {}
                crate::join::Prepared::Joined { peer, joined, took } => {
                    tracing::info!(peer = %peer, height = joined.height, entries = joined.entries, took_ms = took.as_millis() as u64, "joined by state sync");
                    println!(
                        "joined by state sync from {peer}: the state at block {} ({} entries) in {:.1} s",
                        joined.height,
                        joined.entries,
                        took.as_secs_f64()
                    );
                }
            }
        }
        let runner =
            cw_tokio::Runner::new(cw_tokio::Config::new().with_worker_threads(2).with_storage_directory(storage));
        let result = runner.start(|context| async move {
            let started = Instant::now();
            let chain = open_chain(&cfg, &genesis, &me)?;
            // The allowed set is the node registry of finalized state (genesis nodes at first)
            // plus nodes admitted by validator quorum.
            let registry: Vec<SignedDescriptor> =
                chain.with_state(|s| s.nodes().values().map(|r| r.descriptor.clone()).collect());
            let mut members = registry.clone();
            members.extend(admissions.iter().map(|a| a.descriptor.clone()));
            let max_message = genesis.ledger.max_block_bytes + 64 * 1024;
            let p2p = p2p::start(
                &context,
                &identity,
                &members,
                &genesis.ledger,
                &genesis_hash,
                cfg.p2p.listen,
                cfg.p2p.allow_private_ips,
                max_message,
            )
            .map_err(NodeError::Invalid)?;
            let member_set = Arc::new(Mutex::new(p2p.members));

            let mut table = PeerTable::new(own.clone(), members, genesis.node_ids(), genesis.membership)
                .with_admission_rule(AdmissionRule {
                    genesis_hash: genesis_hash.clone(),
                    validators: genesis.validators.clone(),
                });
            for a in &admissions {
                if let Err(e) = table.admit(a.clone()) {
                    tracing::warn!(node = %a.descriptor.descriptor.node_id.short(), error = %e, "stored admission ignored");
                }
            }
            table.set_registry(&registry);
            let table = Arc::new(Mutex::new(table));
            let observer = NodeObserver { members: member_set.clone(), data_dir: cfg.data_dir.clone(), admissions };
            context.child("membership").spawn({
                let table = table.clone();
                move |ctx| gossip::run(ctx, table, p2p.sender, p2p.receiver, observer)
            });

            archipel_consensus::engine::start(
                context.child("consensus"),
                identity.private_key().clone(),
                p2p.oracle.clone(),
                p2p.oracle.clone(),
                chain.clone(),
                consensus_cfg,
                p2p.consensus,
            )
            .await
            .map_err(NodeError::Invalid)?;
            let (tx_out, tx_queue) = tokio::sync::mpsc::unbounded_channel();
            let (tx_sender, tx_receiver) = p2p.txs;
            let me_pk = identity.private_key().public_key();
            let gossip_to: Vec<_> = validators.iter().filter(|v| **v != me_pk).cloned().collect();
            context.child("tx_gossip_out").spawn(move |_| txgossip::send_loop(tx_sender, gossip_to, tx_queue));
            context.child("tx_gossip_in").spawn({
                let chain = chain.clone();
                let max = genesis.ledger.max_tx_bytes as usize;
                move |ctx| txgossip::receive_loop(ctx, tx_receiver, chain, max)
            });
            if !validators.contains(&me_pk) {
                context.child("tx_resend").spawn({
                    let chain = chain.clone();
                    let tx_out = tx_out.clone();
                    move |ctx| txgossip::resend_loop(ctx, chain, tx_out, Duration::from_secs(2))
                });
            }
            context.child("registry").spawn({
                let chain = chain.clone();
                let table = table.clone();
                let members = member_set.clone();
                move |_| follow_registry(chain, table, members)
            });

            let node_ctx = context.child("node");
            let build_info = node_ctx
                .child("build")
                .with_attribute("version", env!("CARGO_PKG_VERSION"))
                .gauge("info", "archipel build information");
            let _ = build_info.try_set(1);
            let uptime = node_ctx.gauge("uptime_seconds", "seconds since the node started");
            let counters = Arc::new(crate::workers::StorageCounters::default());
            let storage_ctx = context.child("storage");
            let storage_gauges = [
                storage_ctx.gauge("degraded_objects", "objects with a holder down, gone, outside the fence or failing audits"),
                storage_ctx.gauge("repairs_submitted", "shard repairs (MoveShards) this node submitted"),
                storage_ctx.gauge(
                    "repairs_refused",
                    "shard repairs this node rebuilt whose MoveShards its mempool refused (e.g. no funds for the fee)",
                ),
                storage_ctx.gauge("audits_passed", "audits this node put that the holder passed"),
                storage_ctx.gauge("audits_failed", "audits this node put that the holder failed"),
            ];
            let metrics_ctx = context.child("api");
            let render_metrics = Box::new({
                let counters = counters.clone();
                move || {
                    let _ = uptime.try_set(started.elapsed().as_secs());
                    use std::sync::atomic::Ordering::Relaxed;
                    let values = [
                        counters.degraded_objects.load(Relaxed),
                        counters.repairs_submitted.load(Relaxed),
                        counters.repairs_refused.load(Relaxed),
                        counters.audits_passed.load(Relaxed),
                        counters.audits_failed.load(Relaxed),
                    ];
                    for (gauge, value) in storage_gauges.iter().zip(values) {
                        let _ = gauge.try_set(value);
                    }
                    metrics_ctx.encode()
                }
            });

            let (shutdown_tx, mut shutdown_rx) = tokio::sync::watch::channel(false);
            let workers = crate::workers::WorkerStatuses::default();
            let shards = if own.descriptor.roles.contains(archipel_types::Role::Storage) {
                let dir = cfg.data_dir.join("shards");
                let store = archipel_store::ShardStore::open(&dir, own.descriptor.capacity.bytes()).map_err(|e| {
                    NodeError::Invalid(format!("cannot open the shard store in {}: {e}", dir.display()))
                })?;
                let network = chain.with_state(|st| st.network());
                Some(Arc::new(crate::shards::ShardService::new(store, identity.clone(), network)))
            } else {
                None
            };
            let provider = own
                .descriptor
                .roles
                .contains(archipel_types::Role::Compute)
                .then(|| Arc::new(crate::provider::ProviderBook::new(cfg.data_dir.join("jobs"))));
            let state = Arc::new(ApiState {
                table,
                genesis: genesis.clone(),
                genesis_hash: genesis_hash.clone(),
                own: own.clone(),
                accounts: genesis.accounts.iter().map(|a| a.key).collect(),
                verifier: Mutex::new(RequestVerifier::default()),
                render_metrics,
                started,
                shutdown: shutdown_tx.clone(),
                chain: chain.clone(),
                tx_out: tx_out.clone(),
                guards: api::ApiGuards::new(cfg.api.limits),
                // Started from the consensus runtime: its threads run at normal priority.
                admission: crate::fair_queue::FairQueue::new(api::ADMISSION_WORKERS, cfg.api.limits.admission_pace())
                    .map_err(|e| NodeError::Invalid(format!("cannot start the admission threads: {e}")))?,
                shards: shards.clone(),
                provider: provider.clone(),
                workers: workers.clone(),
            });
            let server = api_handle.serve(api_listener, state, shutdown_rx.clone()).map_err(NodeError::Invalid)?;
            // The node's own transactions, from every worker, numbered by one submitter.
            let submitter = crate::workers::Submitter::new(chain.clone(), identity.clone(), tx_out.clone());
            if let Some(book) = &provider {
                // Jobs run in child processes of this very binary (`archipel wasm-run`).
                let program = std::env::current_exe()
                    .map_err(|e| NodeError::Invalid(format!("cannot find this program to run jobs with: {e}")))?;
                let worker = crate::provider::Provider::new(
                    chain.clone(),
                    identity.clone(),
                    submitter.clone(),
                    cfg.compute.clone(),
                    book.clone(),
                    archipel_compute::Runner::new(program, &["wasm-run"]),
                    api_handle.runtime().clone(),
                );
                crate::workers::spawn(api_handle.runtime(), worker, workers.clone(), shutdown_rx.clone());
            }
            if let Some(service) = &shards {
                // Storage duties run on the API's (lower-priority) runtime, never on consensus'.
                let collect_after = secs_from_env("ARCHIPEL_COLLECT_AFTER_SECS", crate::workers::COLLECT_AFTER);
                let collect_every = secs_from_env("ARCHIPEL_COLLECT_EVERY_SECS", crate::workers::COLLECT_EVERY);
                let fallback_after =
                    secs_from_env("ARCHIPEL_REPAIR_FALLBACK_SECS", crate::workers::REPAIR_FALLBACK_AFTER);
                let repairer =
                    crate::workers::Repairer::new(chain.clone(), identity.clone(), submitter.clone(), counters.clone())
                        .with_fallback_after(fallback_after);
                crate::workers::spawn(api_handle.runtime(), repairer, workers.clone(), shutdown_rx.clone());
                let auditor =
                    crate::workers::Auditor::new(chain.clone(), identity.clone(), submitter.clone(), counters.clone());
                crate::workers::spawn(api_handle.runtime(), auditor, workers.clone(), shutdown_rx.clone());
                let collector =
                    crate::workers::Collector::new(chain.clone(), service.clone(), own.descriptor.node_id, collect_after)
                        .with_interval(collect_every);
                crate::workers::spawn(api_handle.runtime(), collector, workers.clone(), shutdown_rx.clone());
            }

            tracing::info!(
                node = %own.descriptor.node_id.short(),
                name = %own.descriptor.name,
                network = %genesis.network,
                p2p = %cfg.p2p.listen,
                api = %cfg.api.listen,
                "node started"
            );
            println!(
                "archipel node {} ({}) up: api http://{} p2p {}",
                own.descriptor.name,
                own.descriptor.node_id.short(),
                cfg.api_public(),
                cfg.p2p_public()
            );

            let parent = std::os::unix::process::parent_id();
            let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| NodeError::Invalid(format!("cannot install SIGTERM handler: {e}")))?;
            // Made once, like SIGTERM's: a SIGINT between two turns is kept for the next.
            let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| NodeError::Invalid(format!("cannot install SIGINT handler: {e}")))?;
            let reason = loop {
                tokio::select! {
                    _ = sigint.recv() => break "SIGINT",
                    _ = sigterm.recv() => break "SIGTERM",
                    _ = shutdown_rx.changed() => break "shutdown request",
                    _ = context.sleep(Duration::from_millis(500)) => {
                        if options.exit_with_parent && std::os::unix::process::parent_id() != parent {
                            break "parent process exited";
                        }
                    }
                }
            };
            tracing::info!(%reason, "node stopping");
            // The finalized state up to the head, durable: the next start replays nothing.
            if let Err(e) = chain.close() {
                tracing::warn!(error = %e, "could not save the ledger state at the head; the next start replays from the last checkpoint");
            }
            let _ = shutdown_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(3), server).await;
            Ok(())
        });
        api_server.stop(Duration::from_secs(1));
        result
    }
}
