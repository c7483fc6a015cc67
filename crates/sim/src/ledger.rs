//! Deterministic simulation of the replicated ledger.
//!
//! Four validators run the real consensus engine ([`archipel_consensus::engine`]: simplex and
//! marshal, with the ledger as the application) and one or two followers run it as followers, on
//! commonware's deterministic runtime and `p2p::simulated` links with seeded latency, jitter and
//! loss. A seeded fault schedule cuts the network (into two halves of validators, or around one
//! validator) and degrades every link (long delays, heavy loss) for a while, then heals. One
//! validator may be Byzantine: it proposes blocks with a wrong state root, or it runs no engine at
//! all and equivocates, answering every vote it hears with its own votes for the same proposal
//! and for a made-up one. A client submits a seeded stream of transfers to random honest nodes,
//! and a stand-in for transaction gossip copies each to every honest validator. A scenario may
//! also set one node's wall clock off the real time ([`ClockOffset`]), stop one node for good
//! (its tasks end and its links go dead) and sample every node's finalized height over time.
//!
//! [`run_ledger`] returns every node's finalized chain with certificates, the heights reached
//! when the faults healed and a little later, and a hash of everything (with the runtime's audit
//! digest) so a seed can be checked to replay exactly.

use crate::SeedStream;
use crate::disk::{ClockOffset, OwnDisk};
pub use crate::jobs::JobScript;
use archipel_consensus::app::Behaviour;
use archipel_consensus::block::BlockCfg;
use archipel_consensus::engine::{
    self, BACKFILL_CHANNEL, BLOCKS_CHANNEL, CERTIFICATES_CHANNEL, Channels, ConsensusConfig, FETCH_CHANNEL,
    RESOLVER_CHANNEL, VOTES_CHANNEL,
};
use archipel_consensus::liveness::LIVENESS_CHANNEL;
use archipel_consensus::{Chain, MemoryStore};
use archipel_crypto::{Identity, SignedDescriptor};
use archipel_ledger::{Block, GenesisState, Hash, LedgerParams, Payload, SignedTransaction, State, Transaction};
use archipel_types::NodeId;
use commonware_codec::{Decode as _, Encode as _};
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_consensus::simplex::types::{Finalize, Notarize, Proposal, Vote};
use commonware_cryptography::Signer as _;
use commonware_cryptography::blake3::Digest;
use commonware_cryptography::ed25519::PublicKey;
use commonware_p2p::Recipients;
use commonware_p2p::simulated::{self, Link, Network};
use commonware_runtime::{Clock, Handle, Quota, Runner, Spawner, Supervisor, deterministic};
use commonware_utils::{NZU32, NZUsize, Probability, ordered::Set};
use rand::RngExt as _;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// Number of validators (f = 1: one may be Byzantine).
pub const VALIDATORS: usize = 4;

/// How long after the faults heal every honest node must have made progress.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(8);

/// Blocks every honest node must finalize past the highest pre-healing height within
/// [`LIVENESS_WINDOW`].
pub const LIVENESS_BLOCKS: u64 = 3;

/// Number of funded client accounts that send transfers.
const CLIENT_ACCOUNTS: usize = 3;

/// What a Byzantine validator does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Byzantine {
    /// Runs the engine but proposes blocks with a wrong state root
    /// ([`Behaviour::ProposesInvalidBlocks`]).
    ProposesInvalidBlocks,
    /// Runs no engine; answers every notarize and finalize vote it receives with its own votes for
    /// that proposal and for a random payload in the same view, sent to different peers.
    Equivocates,
}

/// Which links a partition cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Validators `{0, 1}` from `{2, 3}` (no side has a quorum without the other); follower `k`
    /// (node `4 + k`) is on the first side when `k` is even.
    Halves,
    /// One validator from every other node.
    Isolate(usize),
}

/// A partition between two virtual times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// What is cut.
    pub cut: Cut,
    /// When the links are cut.
    pub from: Duration,
    /// When they are restored.
    pub until: Duration,
}

/// A time window during which every link is slower and lossier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Degradation {
    /// Start.
    pub from: Duration,
    /// End.
    pub until: Duration,
    /// Latency added to every link.
    pub extra_latency: Duration,
    /// Percentage of messages delivered meanwhile.
    pub delivery_percent: u64,
}

/// A ledger scenario. Build one with [`LedgerScenario::from_seed`].
#[derive(Clone, Debug)]
pub struct LedgerScenario {
    /// Seed of the executor, the identities, the faults and the transfers.
    pub seed: u64,
    /// Number of followers (nodes `VALIDATORS..VALIDATORS + followers`).
    pub followers: usize,
    /// Mean one-way latency of every link.
    pub latency: Duration,
    /// Standard deviation of the latency.
    pub jitter: Duration,
    /// Percentage of messages delivered outside faults.
    pub delivery_percent: u64,
    /// A partition that heals, if any.
    pub partition: Option<Partition>,
    /// A window of slow, lossy links, if any.
    pub degradation: Option<Degradation>,
    /// A Byzantine validator: its index and what it does.
    pub byzantine: Option<(usize, Byzantine)>,
    /// Time between two submitted transfers.
    pub transfer_interval: Duration,
    /// No transfer is submitted after this time.
    pub transfers_until: Duration,
    /// Total virtual time.
    pub duration: Duration,
    /// Consensus leader timeout.
    pub leader_timeout: Duration,
    /// A node whose wall clock is off the real time, and by how much (timers run in real time).
    pub skewed_clock: Option<(usize, ClockOffset)>,
    /// A node that stops for good at a virtual time: its tasks are aborted and its links cut (it
    /// receives no transfers from the client).
    pub stopped: Option<(usize, Duration)>,
    /// Followers that heartbeat to half the validators only, each from its time on: an even
    /// follower (node `VALIDATORS + k`, `k` even) loses its links to validators 2 and 3, an odd
    /// one to validators 0 and 1 (what a Byzantine node does to make the validators that do not
    /// hear it propose a `Down` the others refuse).
    pub half_heard: Vec<(usize, Duration)>,
    /// Records every node's finalized height this often ([`NodeRun::heads`]). Off by default: the
    /// sampling task changes the runtime's schedule, so seeds would replay differently.
    pub head_samples: Option<Duration>,
    /// A tenant posting compute jobs that the nodes bid on ([`crate::jobs`]); none by default
    /// (with it, every node also has the compute role and a funded account).
    pub jobs: Option<JobScript>,
}

impl LedgerScenario {
    /// A scenario drawn from `seed`: 1–2 followers, 5–60 ms latency, 90–100 % delivery; usually
    /// a partition (two halves or one isolated validator) starting in the first 4 s and lasting
    /// 1.5–5 s; often a window of 1–3 s with 50–90 % delivery and up to 400 ms more latency; a
    /// Byzantine validator in two seeds out of three (half of them propose invalid blocks, half
    /// equivocate). Transfers flow until 1 s after healing; the run ends [`LIVENESS_WINDOW`] + 2 s
    /// after it (short runs keep hundreds of seeds affordable in a debug build).
    pub fn from_seed(seed: u64) -> Self {
        let mut r = SeedStream(seed ^ 0x6c65_6467_6572); // "ledger"
        let followers = 1 + r.below(2) as usize;
        let latency = Duration::from_millis(5 + r.below(56));
        let jitter = Duration::from_millis(r.below(latency.as_millis() as u64 / 2 + 1));
        let delivery_percent = 90 + r.below(11);
        let partition = (r.below(4) != 0).then(|| {
            let cut = if r.below(2) == 0 { Cut::Halves } else { Cut::Isolate(r.below(VALIDATORS as u64) as usize) };
            let from = Duration::from_millis(1_000 + r.below(3_000));
            Partition { cut, from, until: from + Duration::from_millis(1_500 + r.below(3_500)) }
        });
        let degradation = (r.below(2) == 0).then(|| {
            let from = Duration::from_millis(1_000 + r.below(5_000));
            Degradation {
                from,
                until: from + Duration::from_millis(1_000 + r.below(2_000)),
                extra_latency: Duration::from_millis(r.below(401)),
                delivery_percent: 50 + r.below(41),
            }
        });
        let byzantine = match r.below(3) {
            0 => None,
            1 => Some((r.below(VALIDATORS as u64) as usize, Byzantine::ProposesInvalidBlocks)),
            _ => Some((r.below(VALIDATORS as u64) as usize, Byzantine::Equivocates)),
        };
        let transfer_interval = Duration::from_millis(100 + r.below(301));
        let mut s = Self {
            seed,
            followers,
            latency,
            jitter,
            delivery_percent,
            partition,
            degradation,
            byzantine,
            transfer_interval,
            transfers_until: Duration::ZERO,
            duration: Duration::ZERO,
            leader_timeout: Duration::from_secs(1),
            skewed_clock: None,
            stopped: None,
            half_heard: Vec::new(),
            head_samples: None,
            jobs: None,
        };
        s.transfers_until = s.healed_at() + Duration::from_secs(1);
        s.duration = s.healed_at() + LIVENESS_WINDOW + Duration::from_secs(2);
        s
    }

    /// This scenario without faults (no partition, no lossy window, no Byzantine validator, every
    /// message delivered) and without transfers: an idle network.
    pub fn quiet(mut self) -> Self {
        self.partition = None;
        self.degradation = None;
        self.byzantine = None;
        self.delivery_percent = 100;
        self.transfers_until = Duration::ZERO;
        self
    }

    /// This scenario with validator `index` Byzantine in `mode` (or no Byzantine validator).
    pub fn with_byzantine(mut self, byzantine: Option<(usize, Byzantine)>) -> Self {
        self.byzantine = byzantine;
        self
    }

    /// Number of nodes (validators and followers).
    pub fn nodes(&self) -> usize {
        VALIDATORS + self.followers
    }

    /// The end of the last fault; after it the network is whole (links keep their base loss).
    pub fn healed_at(&self) -> Duration {
        let p = self.partition.map_or(Duration::ZERO, |p| p.until);
        let d = self.degradation.map_or(Duration::ZERO, |d| d.until);
        p.max(d)
    }

    fn is_byzantine(&self, node: usize) -> bool {
        self.byzantine.is_some_and(|(b, _)| b == node)
    }

    /// How far `node`'s wall clock is off the real time.
    pub fn clock(&self, node: usize) -> ClockOffset {
        self.skewed_clock.filter(|(n, _)| *n == node).map_or(ClockOffset::None, |(_, c)| c)
    }

    /// Whether `node` has stopped by `at`.
    fn is_stopped(&self, node: usize, at: Duration) -> bool {
        self.stopped.is_some_and(|(n, when)| n == node && when <= at)
    }

    /// Whether the link from `a` to `b` is up at `at`, and with which settings.
    pub(crate) fn link(&self, a: usize, b: usize, at: Duration) -> Option<Link> {
        if self.is_stopped(a, at) || self.is_stopped(b, at) {
            return None;
        }
        if let Some(p) = self.partition
            && p.from <= at
            && at < p.until
        {
            let side = |n: usize| if n < VALIDATORS { n < 2 } else { (n - VALIDATORS).is_multiple_of(2) };
            let cut = match p.cut {
                Cut::Halves => side(a) != side(b),
                Cut::Isolate(v) => a == v || b == v,
            };
            if cut {
                return None;
            }
        }
        let half_cut = |follower: usize, validator: usize| {
            validator < VALIDATORS
                && self.half_heard.iter().any(|(n, from)| {
                    *n == follower
                        && *from <= at
                        && (validator >= 2) == follower.saturating_sub(VALIDATORS).is_multiple_of(2)
                })
        };
        if half_cut(a, b) || half_cut(b, a) {
            return None;
        }
        let (mut latency, mut delivery) = (self.latency, self.delivery_percent);
        if let Some(d) = self.degradation
            && d.from <= at
            && at < d.until
        {
            latency += d.extra_latency;
            delivery = delivery.min(d.delivery_percent);
        }
        Some(Link {
            latency,
            jitter: self.jitter,
            success_rate: Probability::new(delivery, 100).unwrap_or_else(|| unreachable!("delivery is at most 100 %")),
        })
    }

    /// The times at which some link changes.
    fn link_changes(&self) -> Vec<Duration> {
        let mut at: Vec<Duration> = Vec::new();
        if let Some(p) = self.partition {
            at.extend([p.from, p.until]);
        }
        if let Some(d) = self.degradation {
            at.extend([d.from, d.until]);
        }
        if let Some((_, when)) = self.stopped {
            at.push(when);
        }
        at.extend(self.half_heard.iter().map(|(_, from)| *from));
        at.sort();
        at.dedup();
        at
    }
}

/// One node's view at the end of a run.
#[derive(Clone, Debug)]
pub struct NodeRun {
    /// Index (validators first, then followers).
    pub index: usize,
    /// The node's id.
    pub id: NodeId,
    /// Whether it is a validator.
    pub validator: bool,
    /// False for the Byzantine validator.
    pub honest: bool,
    /// Whether it ran the consensus engine (everyone but an equivocator).
    pub runs_engine: bool,
    /// Its finalized blocks from height 1 on, each with its finality certificate.
    pub chain: Vec<(Block, Vec<u8>)>,
    /// Finalized height when the faults healed.
    pub height_at_heal: u64,
    /// Finalized height [`LIVENESS_WINDOW`] after the faults healed.
    pub height_after_window: u64,
    /// With [`LedgerScenario::head_samples`]: `(virtual ms, height)` at each sample where the
    /// finalized height had changed since the previous one (the first sample always).
    pub heads: Vec<(u64, u64)>,
}

impl NodeRun {
    /// The finalized blocks.
    pub fn blocks(&self) -> Vec<Block> {
        self.chain.iter().map(|(b, _)| b.clone()).collect()
    }
}

/// A transfer the client submitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmittedTransfer {
    /// Transaction hash.
    pub hash: Hash,
    /// Virtual time of submission (ms).
    pub at_ms: u64,
    /// Node it was submitted to.
    pub node: usize,
    /// Index of the sending client account.
    pub client: usize,
    /// Its nonce.
    pub nonce: u64,
}

/// What a ledger run produced.
#[derive(Debug)]
pub struct LedgerOutcome {
    /// The scenario run.
    pub scenario: LedgerScenario,
    /// The genesis state every node started from.
    pub genesis: State,
    /// The consensus configuration (validators, namespace) for checking certificates.
    pub consensus: ConsensusConfig,
    /// Every node, by index.
    pub nodes: Vec<NodeRun>,
    /// Every transfer the client submitted (and a node admitted).
    pub submitted: Vec<SubmittedTransfer>,
    /// Submissions a node refused, with the reason.
    pub refused: Vec<String>,
    /// Pairs `(blocker, blocked)` of nodes that blocked a peer.
    pub blocked: Vec<(usize, usize)>,
    /// BLAKE3 over every chain, the submissions and the runtime's audit digest.
    pub trace_hash: String,
}

impl LedgerOutcome {
    /// The honest nodes (validators and followers).
    pub fn honest(&self) -> impl Iterator<Item = &NodeRun> {
        self.nodes.iter().filter(|n| n.honest)
    }
}

/// The genesis of a scenario's network: validators, followers and client accounts.
pub(crate) struct Participants {
    pub(crate) nodes: Vec<Identity>,
    pub(crate) clients: Vec<Identity>,
    /// Posts the scenario's jobs (funded only when it has some).
    pub(crate) tenant: Identity,
    pub(crate) genesis: State,
    pub(crate) consensus: ConsensusConfig,
}

pub(crate) fn participants(sc: &LedgerScenario) -> Participants {
    let base = sc.seed.wrapping_mul(100);
    let nodes: Vec<Identity> = (0..sc.nodes()).map(|i| Identity::from_seed(base + i as u64)).collect();
    let clients: Vec<Identity> = (0..CLIENT_ACCOUNTS).map(|i| Identity::from_seed(base + 50 + i as u64)).collect();
    let tenant = Identity::from_seed(base + 60);
    let params = LedgerParams { max_block_bytes: 256 * 1024, max_block_txs: 1_024, ..LedgerParams::default() };
    let mut accounts: Vec<(archipel_types::NodeId, u64)> =
        clients.iter().map(|c| (c.node_id(), 1_000_000_000)).collect();
    if sc.jobs.is_some() {
        // The tenant pays escrow and fees, the providers bonds and fees.
        accounts.push((tenant.node_id(), 1_000_000_000));
        accounts.extend(nodes.iter().map(|n| (n.node_id(), 1_000_000)));
    }
    let genesis = State::genesis(GenesisState {
        params: params.clone(),
        network: Hash::of(&[b"sim", &sc.seed.to_be_bytes()]),
        timestamp_ms: 0,
        validators: nodes[..VALIDATORS].iter().map(Identity::node_id).collect(),
        accounts,
        // Every node is registered: they heartbeat, and blocks carry their lease changes.
        nodes: nodes
            .iter()
            .map(|id| {
                let mut d = archipel_crypto::test_support::example_descriptor(id);
                if sc.jobs.is_some() {
                    d.roles = crate::jobs::provider_roles();
                }
                SignedDescriptor::sign(id, d).unwrap_or_else(|e| unreachable!("the example descriptor signs: {e}"))
            })
            .collect(),
    });
    let consensus = ConsensusConfig::new(
        engine::namespace(&format!("sim-{}", sc.seed)),
        nodes[..VALIDATORS].iter().map(|id| id.private_key().public_key()).collect(),
        BlockCfg::from(&params),
    );
    Participants { nodes, clients, tenant, genesis, consensus }
}

fn now(context: &impl Clock) -> Duration {
    context.current().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// A node's wall clock in ms at the runtime's time (the client reads its own, real clock).
fn node_now_ms(context: &impl Clock, clock: ClockOffset) -> u64 {
    clock.read(context.current()).duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

async fn sleep_until(context: &impl Clock, at: Duration) {
    let t = now(context);
    if at > t {
        context.sleep(at - t).await;
    }
}

/// Submits `stx` to the `entry` node's chain and, when it is admitted, copies it to every other
/// honest validator in `validators` the way transaction gossip would: one link latency later, or,
/// while a partition separates them, at the first retry after it heals. The copies are tasks of
/// `context`'s (they stop with it).
pub(crate) fn submit_gossiped(
    context: &deterministic::Context,
    sc: &LedgerScenario,
    (entry, chain): (usize, &Arc<Chain>),
    validators: &[(usize, Arc<Chain>)],
    stx: SignedTransaction,
) -> Result<Hash, archipel_ledger::MempoolError> {
    let len = stx.to_bytes().len();
    let hash = chain.submit(stx.clone(), len, node_now_ms(context, sc.clock(entry)))?;
    for (v, chain) in validators.iter().filter(|(v, _)| *v != entry) {
        let (v, chain, stx, sc) = (*v, chain.clone(), stx.clone(), sc.clone());
        context.child("gossip").spawn(move |ctx| async move {
            loop {
                ctx.sleep(sc.latency).await;
                if sc.link(entry, v, now(&ctx)).is_some() {
                    if let Err(e) = chain.submit(stx, len, node_now_ms(&ctx, sc.clock(v))) {
                        tracing::debug!(node = v, error = %e, "gossiped transaction refused");
                    }
                    return;
                }
                ctx.sleep(Duration::from_millis(500)).await;
            }
        });
    }
    Ok(hash)
}

/// Runs `scenario` to the end and returns every node's chain.
pub fn run_ledger(scenario: LedgerScenario) -> LedgerOutcome {
    let cfg = deterministic::Config::new()
        .with_seed(scenario.seed)
        .with_timeout(Some(scenario.duration + Duration::from_secs(600)));
    deterministic::Runner::new(cfg).start(|context| async move {
        let sc = scenario;
        let Participants { nodes, clients, tenant, genesis, consensus } = participants(&sc);
        let keys: Vec<PublicKey> = nodes.iter().map(|id| id.private_key().public_key()).collect();
        let index_of: BTreeMap<PublicKey, usize> = keys.iter().cloned().enumerate().map(|(i, k)| (k, i)).collect();

        let p2p_cfg = simulated::Config {
            max_size: 2 * 1024 * 1024,
            max_peers_per_set: NZUsize!(16),
            // A blocked equivocator keeps talking: honest nodes must keep ignoring it.
            disconnect_on_block: false,
            tracked_peer_sets: NZUsize!(1),
        };
        let (network, oracle) = Network::new_with_peers(context.child("network"), p2p_cfg, keys.clone()).await;
        network.start();
        let mut links: BTreeSet<(usize, usize)> = BTreeSet::new();
        for a in 0..keys.len() {
            for b in 0..keys.len() {
                if a != b
                    && let Some(link) = sc.link(a, b, Duration::ZERO)
                {
                    let _ = oracle.add_link(keys[a].clone(), keys[b].clone(), link).await;
                    links.insert((a, b));
                }
            }
        }

        let quota = Quota::per_second(NZU32!(1_000));
        let mut chains: Vec<Option<Arc<Chain>>> = Vec::new();
        let mut handles: Vec<Handle<()>> = Vec::new();
        // Each node's own tasks (aborting one aborts what it spawned), to stop a node.
        let mut node_handles: Vec<Vec<Handle<()>>> = Vec::new();
        for (i, id) in nodes.iter().enumerate() {
            let key = keys[i].clone();
            let control = oracle.control(key.clone());
            let register = |channel: u64| {
                let control = control.clone();
                async move {
                    control
                        .register(channel, quota)
                        .await
                        .unwrap_or_else(|e| panic!("node {i}: register {channel}: {e}"))
                }
            };
            if let Some((_, Byzantine::Equivocates)) = sc.byzantine.filter(|(b, _)| *b == i) {
                let (sender, receiver) = register(VOTES_CHANNEL).await;
                let scheme = Scheme::signer(
                    &consensus.namespace,
                    Set::from_iter_dedup(consensus.validators.iter().cloned()),
                    id.private_key().clone(),
                )
                .unwrap_or_else(|| unreachable!("the equivocator is a validator"));
                let peers: Vec<PublicKey> = keys.iter().filter(|k| **k != key).cloned().collect();
                node_handles.push(vec![
                    context.child("equivocator").spawn(move |ctx| equivocate(ctx, scheme, peers, sender, receiver)),
                ]);
                chains.push(None);
                continue;
            }
            let channels = Channels {
                votes: register(VOTES_CHANNEL).await,
                certificates: register(CERTIFICATES_CHANNEL).await,
                resolver: register(RESOLVER_CHANNEL).await,
                blocks: register(BLOCKS_CHANNEL).await,
                backfill: register(BACKFILL_CHANNEL).await,
                fetch: register(FETCH_CHANNEL).await,
                liveness: register(LIVENESS_CHANNEL).await,
            };
            let chain = Arc::new(
                Chain::open(genesis.clone(), Box::new(MemoryStore::default()))
                    .unwrap_or_else(|e| panic!("node {i}: open chain: {e}")),
            );
            let mut cfg = consensus.clone();
            cfg.leader_timeout = sc.leader_timeout;
            if sc.byzantine == Some((i, Byzantine::ProposesInvalidBlocks)) {
                cfg.behaviour = Behaviour::ProposesInvalidBlocks;
            }
            let node_context = OwnDisk::new(context.child("node").with_attribute("index", i), &format!("node{i}"))
                .with_clock_offset(sc.clock(i));
            let started = engine::start(
                node_context,
                id.private_key().clone(),
                oracle.manager(),
                control.clone(),
                chain.clone(),
                cfg,
                channels,
            )
            .await
            .unwrap_or_else(|e| panic!("node {i}: start consensus: {e}"));
            node_handles.push(started);
            chains.push(Some(chain));
        }

        // The client sends transfers between its accounts, each to a random honest node (the
        // entry). Transaction gossip is not part of consensus, so the simulation stands in for it:
        // the entry's copy reaches every other honest validator one link latency later, or, while
        // a partition separates them, at the first retry after it heals.
        let submitted = Arc::new(Mutex::new((Vec::<SubmittedTransfer>::new(), Vec::<String>::new())));
        {
            let entries: Vec<(usize, Arc<Chain>)> = (0..sc.nodes())
                .filter(|n| !sc.is_byzantine(*n) && sc.stopped.is_none_or(|(s, _)| s != *n))
                .filter_map(|n| chains[n].clone().map(|c| (n, c)))
                .collect();
            let validators: Vec<(usize, Arc<Chain>)> =
                entries.iter().filter(|(n, _)| *n < VALIDATORS).cloned().collect();
            if let Some(script) = sc.jobs {
                // The tenant's entry is the first honest validator; the providers are the honest
                // nodes that keep running.
                let providers: Vec<(usize, Identity)> = entries.iter().map(|(n, _)| (*n, nodes[*n].clone())).collect();
                let run = crate::jobs::Tenant {
                    script,
                    sc: sc.clone(),
                    tenant: tenant.clone(),
                    providers,
                    entry: validators[0].clone(),
                    validators: validators.clone(),
                    network: genesis.network(),
                    refused: submitted.clone(),
                };
                handles.push(context.child("tenant").spawn(move |ctx| run.run(ctx)));
            }
            let submitted = submitted.clone();
            let sc = sc.clone();
            let clients: Vec<Identity> = clients.clone();
            let network = genesis.network();
            handles.push(context.child("client").spawn(move |ctx| async move {
                let mut r = SeedStream(sc.seed ^ 0x636c_6965_6e74); // "client"
                let mut nonces = vec![0u64; clients.len()];
                let mut at = Duration::from_millis(500);
                while at <= sc.transfers_until {
                    sleep_until(&ctx, at).await;
                    let from = r.below(clients.len() as u64) as usize;
                    let to = (from + 1 + r.below(clients.len() as u64 - 1) as usize) % clients.len();
                    let (entry, chain) = &entries[r.below(entries.len() as u64) as usize];
                    let nonce = nonces[from];
                    let stx = Transaction {
                        signer: clients[from].node_id(),
                        nonce,
                        payload: Payload::Transfer { to: clients[to].node_id(), amount_micro: 1 + r.below(1_000) },
                    }
                    .sign(&clients[from], &network);
                    match submit_gossiped(&ctx, &sc, (*entry, chain), &validators, stx) {
                        Ok(hash) => {
                            nonces[from] += 1;
                            let mut log = submitted.lock().unwrap_or_else(|p| p.into_inner());
                            log.0.push(SubmittedTransfer {
                                hash,
                                at_ms: at.as_millis() as u64,
                                node: *entry,
                                client: from,
                                nonce,
                            });
                        }
                        Err(e) => {
                            let mut log = submitted.lock().unwrap_or_else(|p| p.into_inner());
                            log.1.push(format!("at {} ms node {entry}: {e}", at.as_millis()));
                        }
                    }
                    at += sc.transfer_interval;
                }
                // Gossip tasks are this task's children: they would stop with it.
                sleep_until(&ctx, sc.duration).await;
            }));
        }

        let heights = |chains: &[Option<Arc<Chain>>]| -> Vec<u64> {
            chains.iter().map(|c| c.as_ref().map_or(0, |c| c.head().height)).collect()
        };
        let heads = Arc::new(Mutex::new(vec![Vec::<(u64, u64)>::new(); sc.nodes()]));
        if let Some(every) = sc.head_samples {
            let (heads, chains, end) = (heads.clone(), chains.clone(), sc.duration);
            handles.push(context.child("head_sampler").spawn(move |ctx| async move {
                loop {
                    let at = now(&ctx);
                    {
                        let mut log = heads.lock().unwrap_or_else(|p| p.into_inner());
                        for (log, height) in log.iter_mut().zip(heights(&chains)) {
                            if log.last().is_none_or(|(_, h)| *h != height) {
                                log.push((at.as_millis() as u64, height));
                            }
                        }
                    }
                    if at >= end {
                        return;
                    }
                    ctx.sleep(every).await;
                }
            }));
        }

        // The fault schedule (link changes, the stop), and the two height samples.
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        enum Step {
            Links,
            Sample,
        }
        let heal = sc.healed_at();
        let mut steps: Vec<(Duration, Step)> = sc.link_changes().into_iter().map(|t| (t, Step::Links)).collect();
        steps.push((heal, Step::Sample));
        steps.push((heal + LIVENESS_WINDOW, Step::Sample));
        steps.retain(|(at, _)| *at <= sc.duration);
        steps.sort();
        let mut samples: Vec<Vec<u64>> = Vec::new();
        for (at, step) in steps {
            sleep_until(&context, at).await;
            if step == Step::Sample {
                samples.push(heights(&chains));
                continue;
            }
            if let Some((node, when)) = sc.stopped
                && when == at
            {
                node_handles[node].iter().for_each(Handle::abort);
            }
            for a in 0..keys.len() {
                for b in 0..keys.len() {
                    if a == b {
                        continue;
                    }
                    if links.remove(&(a, b)) {
                        let _ = oracle.remove_link(keys[a].clone(), keys[b].clone()).await;
                    }
                    if let Some(link) = sc.link(a, b, at) {
                        let _ = oracle.add_link(keys[a].clone(), keys[b].clone(), link).await;
                        links.insert((a, b));
                    }
                }
            }
        }
        sleep_until(&context, sc.duration).await;

        let blocked: Vec<(usize, usize)> = oracle
            .blocked()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(a, b)| Some((*index_of.get(&a)?, *index_of.get(&b)?)))
            .collect();
        let mut h = blake3::Hasher::new();
        let mut runs = Vec::new();
        for (i, id) in nodes.iter().enumerate() {
            let chain: Vec<(Block, Vec<u8>)> = match &chains[i] {
                Some(c) => (1..=c.head().height)
                    .map(|height| {
                        c.block(height)
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| panic!("node {i}: finalized block {height} is not in its store"))
                    })
                    .collect(),
                None => Vec::new(),
            };
            for (b, cert) in &chain {
                h.update(&b.hash().0);
                h.update(cert);
            }
            h.update(b"|");
            runs.push(NodeRun {
                index: i,
                id: id.node_id(),
                validator: i < VALIDATORS,
                honest: !sc.is_byzantine(i),
                runs_engine: chains[i].is_some(),
                chain,
                height_at_heal: samples.first().map_or(0, |s| s[i]),
                height_after_window: samples.get(1).map_or(0, |s| s[i]),
                heads: std::mem::take(&mut heads.lock().unwrap_or_else(|p| p.into_inner())[i]),
            });
        }
        let (submitted, refused) = submitted.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for s in &submitted {
            h.update(&s.hash.0);
        }
        h.update(context.auditor().state().as_bytes());
        drop((handles, node_handles));
        LedgerOutcome {
            scenario: sc,
            genesis,
            consensus,
            nodes: runs,
            submitted,
            refused,
            blocked,
            trace_hash: h.finalize().to_hex().to_string(),
        }
    })
}

/// The equivocating validator: for every notarize or finalize vote it hears, it signs the same
/// kind of vote for that proposal and for a random payload in the same round, and sends each
/// peer one of the two or both. It answers each (view, kind) once.
async fn equivocate<E, S, R>(mut context: E, scheme: Scheme, peers: Vec<PublicKey>, mut sender: S, mut receiver: R)
where
    E: rand::Rng,
    S: commonware_p2p::Sender<PublicKey = PublicKey>,
    R: commonware_p2p::Receiver<PublicKey = PublicKey>,
{
    let mut answered: BTreeSet<(u64, bool)> = BTreeSet::new();
    while let Ok((_, message)) = receiver.recv().await {
        let Ok(vote) = Vote::<Scheme, Digest>::decode_cfg(message, &()) else { continue };
        let (finalize, proposal) = match vote {
            Vote::Notarize(v) => (false, v.proposal),
            Vote::Finalize(v) => (true, v.proposal),
            Vote::Nullify(_) => continue,
        };
        let view = proposal.round.view().get();
        if !answered.insert((view, finalize)) {
            continue;
        }
        answered.retain(|(v, _)| v + 64 >= view);
        let fake = Proposal::new(proposal.round, proposal.parent, Digest(context.random()));
        let sign = |p: Proposal<Digest>| -> Option<Vote<Scheme, Digest>> {
            Some(if finalize {
                Vote::Finalize(Finalize::sign(&scheme, p)?)
            } else {
                Vote::Notarize(Notarize::sign(&scheme, p)?)
            })
        };
        let (Some(real), Some(fake)) = (sign(proposal), sign(fake)) else { continue };
        for peer in &peers {
            let to = || Recipients::One(peer.clone());
            match context.random_range(0..3u8) {
                0 => drop(sender.send(to(), real.encode(), false)),
                1 => drop(sender.send(to(), fake.encode(), false)),
                _ => {
                    drop(sender.send(to(), fake.encode(), false));
                    drop(sender.send(to(), real.encode(), false));
                }
            }
        }
    }
}

/// Checks `invariant` on [`run_ledger`] for every seed (see [`crate::seeds`]), with the scenario
/// adjusted by `adjust` (`None` skips the seed, e.g. to share a range between tests); on the first
/// violation panics with the seed, the reason, the scenario and the one-line command that
/// replays it. With `RUST_LOG` set (e.g. `RUST_LOG=archipel_consensus=debug`), the nodes' logs
/// are printed.
pub fn check_ledger_seeds(
    test: &str,
    default: std::ops::Range<u64>,
    adjust: impl Fn(LedgerScenario) -> Option<LedgerScenario>,
    invariant: impl Fn(&LedgerOutcome) -> Result<(), String>,
) {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    for seed in crate::seeds(default) {
        let Some(scenario) = adjust(LedgerScenario::from_seed(seed)) else { continue };
        let outcome = run_ledger(scenario);
        if let Err(why) = invariant(&outcome) {
            panic!(
                "invariant violated for seed {seed}: {why}\nscenario: {:?}\nreplay: ARCHIPEL_SIM_SEED={seed} cargo test -p archipel-sim --test {test}",
                outcome.scenario
            );
        }
    }
}
