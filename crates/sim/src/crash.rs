//! Crash recovery of the replicated ledger on the deterministic runtime.
//!
//! Four validators and one or two followers run the real consensus engine under a stream of
//! transfers until a seeded moment, when every node loses power at once: commonware's
//! deterministic storage keeps only the writes that were synced (simplex's journal, marshal's
//! archives and processed height, the candidate log), and each node's block log
//! ([`MemoryStore::crash`]) keeps only the blocks a sync made durable. In some seeds the block log
//! loses more (a disk that acknowledged a sync it did not do, or a log from an older version), so
//! it starts behind what marshal considers delivered. Each node's state store keeps what its last
//! checkpoint flushed ([`StateMemory::crash`]) — ahead of the truncated block log in those seeds,
//! which the chain must notice and rebuild from the log. The network then restarts from what is left
//! — one node some seconds after the others, so it has to catch up — and runs on.
//!
//! [`run_crash`] reports every node's chain before the crash, the height its block log kept, its
//! chain at the end and whether its applier is stalled.

use crate::SeedStream;
use crate::disk::OwnDisk;
use crate::ledger::{LedgerScenario, Participants, participants};
use crate::votes::{Tapped, VoteLog};
use archipel_consensus::engine::{
    self, BACKFILL_CHANNEL, BLOCKS_CHANNEL, CERTIFICATES_CHANNEL, Channels, FETCH_CHANNEL, RESOLVER_CHANNEL,
    VOTES_CHANNEL,
};
use archipel_consensus::{Chain, MemoryStore, Stall};
use archipel_ledger::store::MemoryStore as StateMemory;
use archipel_ledger::{Hash, Payload, Transaction};
use commonware_cryptography::Signer as _;
use commonware_cryptography::ed25519::PublicKey;
use commonware_p2p::simulated::{self, Network};
use commonware_runtime::{Clock, Handle, Quota, Runner as _, Supervisor, deterministic};
use commonware_utils::{NZU32, NZUsize};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// Blocks every node must finalize past the highest height reached before the crash.
pub const PROGRESS_BLOCKS: u64 = 3;

/// Blocks between state checkpoints in the simulation (a node uses 1,024): small, so the crash
/// falls after some and the restart opens a state store that is not at the genesis.
pub const CHECKPOINT_BLOCKS: u64 = 8;

/// A crash scenario. Build one with [`CrashScenario::from_seed`].
#[derive(Clone, Debug)]
pub struct CrashScenario {
    /// The network: seed, followers, link latency, jitter and loss (no partitions, no Byzantine
    /// validator: the crash is the fault).
    pub network: LedgerScenario,
    /// When every node loses power (virtual time).
    pub crash_at: Duration,
    /// Blocks each node's block log loses beyond what it had not synced.
    pub log_loss: u64,
    /// The node restarted late, and by how much.
    pub late: (usize, Duration),
    /// How long the network runs after the restart.
    pub run_after: Duration,
}

impl CrashScenario {
    /// A scenario drawn from `seed`: the crash 3–8 s after the start, under load; in half the
    /// seeds the block logs lose 1–20 durable blocks too; a random node (validator or follower)
    /// restarts 1–4 s after the others; 12 s of run after the restart.
    pub fn from_seed(seed: u64) -> Self {
        let mut network = LedgerScenario::from_seed(seed);
        network.partition = None;
        network.degradation = None;
        network.byzantine = None;
        let mut r = SeedStream(seed ^ 0x0063_7261_7368); // "crash"
        let crash_at = Duration::from_millis(3_000 + r.below(5_001));
        let log_loss = if r.below(2) == 0 { 0 } else { 1 + r.below(20) };
        let late = (r.below(network.nodes() as u64) as usize, Duration::from_millis(1_000 + r.below(3_001)));
        network.transfers_until = crash_at;
        network.duration = crash_at;
        Self { network, crash_at, log_loss, late, run_after: Duration::from_secs(12) }
    }
}

/// One node across the crash.
#[derive(Clone, Debug)]
pub struct NodeCrash {
    /// Index (validators first, then followers).
    pub index: usize,
    /// Hashes of its finalized blocks (heights 1, 2, …) when the power went out.
    pub before: Vec<Hash>,
    /// Height its block log kept.
    pub kept: u64,
    /// Hashes of its finalized blocks at the end.
    pub after: Vec<Hash>,
    /// Its applier's stall at the end, if stalled.
    pub stall: Option<Stall>,
}

/// What a crash run produced.
#[derive(Debug)]
pub struct CrashOutcome {
    /// The scenario run.
    pub scenario: CrashScenario,
    /// Every node, by index.
    pub nodes: Vec<NodeCrash>,
    /// Transfers the nodes admitted before the crash.
    pub submitted: usize,
}

/// Virtual time since the simulation's start.
pub(crate) fn now(context: &impl Clock) -> Duration {
    context.current().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn hashes(chain: &Chain) -> Vec<Hash> {
    (1..=chain.head().height)
        .map(|h| {
            chain.block(h).ok().flatten().unwrap_or_else(|| panic!("finalized block {h} is not in the store")).0.hash()
        })
        .collect()
}

/// Starts node `i` of `parts` on `context`'s network with `chain`.
async fn start_node(
    context: &deterministic::Context,
    oracle: &simulated::Oracle<PublicKey, deterministic::Context>,
    parts: &Participants,
    i: usize,
    chain: Arc<Chain>,
) -> Vec<Handle<()>> {
    start_node_tapped(context, oracle, parts, i, chain, parts.consensus.clone(), None).await
}

/// The disk of node `i` (its storage partitions, as [`start_node`] gives them to it).
pub(crate) fn node_disk(context: &deterministic::Context, i: usize) -> OwnDisk<deterministic::Context> {
    OwnDisk::new(context.child("node").with_attribute("index", i), &format!("node{i}"))
}

/// [`start_node`] with a consensus configuration of its own, noting every vote the node sends in
/// `votes` when given.
pub(crate) async fn start_node_tapped(
    context: &deterministic::Context,
    oracle: &simulated::Oracle<PublicKey, deterministic::Context>,
    parts: &Participants,
    i: usize,
    chain: Arc<Chain>,
    consensus: archipel_consensus::engine::ConsensusConfig,
    votes: Option<VoteLog>,
) -> Vec<Handle<()>> {
    let key = parts.nodes[i].private_key().public_key();
    let control = oracle.control(key);
    let quota = Quota::per_second(NZU32!(1_000));
    let register_with = |channel: u64, log: Option<VoteLog>| {
        let control = control.clone();
        async move {
            let (sender, receiver) =
                control.register(channel, quota).await.unwrap_or_else(|e| panic!("node {i}: register {channel}: {e}"));
            (Tapped::new(sender, log), receiver)
        }
    };
    let register = |channel: u64| register_with(channel, None);
    let channels = Channels {
        votes: register_with(VOTES_CHANNEL, votes).await,
        certificates: register(CERTIFICATES_CHANNEL).await,
        resolver: register(RESOLVER_CHANNEL).await,
        blocks: register(BLOCKS_CHANNEL).await,
        backfill: register(BACKFILL_CHANNEL).await,
        fetch: register(FETCH_CHANNEL).await,
        liveness: register(archipel_consensus::liveness::LIVENESS_CHANNEL).await,
    };
    engine::start(
        node_disk(context, i),
        parts.nodes[i].private_key().clone(),
        oracle.manager(),
        control.clone(),
        chain,
        consensus,
        channels,
    )
    .await
    .unwrap_or_else(|e| panic!("node {i}: start consensus: {e}"))
}

/// Creates the simulated network of `sc` on `context` with every base link up.
pub(crate) async fn network(
    context: &deterministic::Context,
    sc: &LedgerScenario,
    keys: &[PublicKey],
) -> simulated::Oracle<PublicKey, deterministic::Context> {
    let p2p_cfg = simulated::Config {
        max_size: 2 * 1024 * 1024,
        max_peers_per_set: NZUsize!(8),
        disconnect_on_block: false,
        tracked_peer_sets: NZUsize!(1),
    };
    let (network, oracle) = Network::new_with_peers(context.child("network"), p2p_cfg, keys.to_vec()).await;
    network.start();
    for a in 0..keys.len() {
        for b in 0..keys.len() {
            if a != b
                && let Some(link) = sc.link(a, b, Duration::ZERO)
            {
                let _ = oracle.add_link(keys[a].clone(), keys[b].clone(), link).await;
            }
        }
    }
    oracle
}

/// Transfers between the client accounts of `parts`, one every `sc.transfer_interval` from 0.5 s
/// until `until`, each submitted to every validator's chain in `chains` (standing in for
/// transaction gossip); how many were admitted.
pub(crate) async fn transfer_load(
    context: &deterministic::Context,
    sc: &LedgerScenario,
    parts: &Participants,
    chains: &[Arc<Chain>],
    until: Duration,
) -> usize {
    let mut r = SeedStream(sc.seed ^ 0x6c6f_6164); // "load"
    let mut nonces = vec![0u64; parts.clients.len()];
    let mut submitted = 0;
    let mut at = Duration::from_millis(500);
    while at < until {
        context.sleep(at.saturating_sub(now(context))).await;
        let from = r.below(parts.clients.len() as u64) as usize;
        let to = (from + 1) % parts.clients.len();
        let stx = Transaction {
            signer: parts.clients[from].node_id(),
            nonce: nonces[from],
            payload: Payload::Transfer { to: parts.clients[to].node_id(), amount_micro: 1 + r.below(1_000) },
        }
        .sign(&parts.clients[from], &parts.genesis.network());
        let len = stx.to_bytes().len();
        let ms = now(context).as_millis() as u64;
        let validators = &chains[..crate::ledger::VALIDATORS.min(chains.len())];
        if validators.iter().filter(|c| c.submit(stx.clone(), len, ms).is_ok()).count() > 0 {
            nonces[from] += 1;
            submitted += 1;
        }
        at += sc.transfer_interval;
    }
    submitted
}

/// Runs `scenario`: load until the crash, power loss, restart (one node late), run on.
pub fn run_crash(scenario: CrashScenario) -> CrashOutcome {
    let sc = scenario.network.clone();
    let parts = Arc::new(participants(&sc));
    let keys: Vec<PublicKey> = parts.nodes.iter().map(|id| id.private_key().public_key()).collect();
    let stores: Vec<MemoryStore> = (0..sc.nodes()).map(|_| MemoryStore::default()).collect();
    // Each node's state store, checkpointed often so crashes fall between and after checkpoints.
    let states: Vec<StateMemory> = (0..sc.nodes()).map(|_| StateMemory::default()).collect();
    let open = |i: usize, store: &MemoryStore| {
        Arc::new(
            Chain::open_with(parts.genesis.clone(), Box::new(store.clone()), Arc::new(states[i].clone()))
                .unwrap_or_else(|e| panic!("node {i}: the chain does not reopen after the crash: {e}"))
                .with_checkpoint_every(CHECKPOINT_BLOCKS),
        )
    };

    // Before the crash: every node under load.
    let cfg = deterministic::Config::new()
        .with_seed(sc.seed)
        .with_timeout(Some(scenario.crash_at * 2 + scenario.run_after + Duration::from_secs(600)));
    let ((before, submitted), checkpoint) = deterministic::Runner::new(cfg).start_and_recover({
        let (parts, stores, keys, sc) = (parts.clone(), stores.clone(), keys.clone(), sc.clone());
        let crash_at = scenario.crash_at;
        move |context| async move {
            let oracle = network(&context, &sc, &keys).await;
            let mut chains = Vec::new();
            let mut handles = Vec::new();
            for (i, store) in stores.iter().enumerate() {
                let chain = open(i, store);
                handles.extend(start_node(&context, &oracle, &parts, i, chain.clone()).await);
                chains.push(chain);
            }
            let submitted = transfer_load(&context, &sc, &parts, &chains, crash_at).await;
            context.sleep(crash_at.saturating_sub(now(&context))).await;
            let before: Vec<Vec<Hash>> = chains.iter().map(|c| hashes(c)).collect();
            drop(handles);
            (before, submitted)
        }
    });

    // The power loss: each block log keeps what was synced (and loses `log_loss` more blocks),
    // each state store what was flushed (so in the lossy seeds it can be ahead of its log).
    let kept: Vec<u64> = stores
        .iter()
        .map(|s| {
            let synced = s.crash();
            s.truncate(synced.saturating_sub(scenario.log_loss))
        })
        .collect();
    for s in &states {
        s.crash();
    }

    // After the restart.
    let (late, late_by) = scenario.late;
    let run_after = scenario.run_after;
    let (after, stalls) = deterministic::Runner::from(checkpoint).start({
        let (parts, stores, keys, sc) = (parts.clone(), stores.clone(), keys.clone(), sc.clone());
        move |context| async move {
            let restart = now(&context);
            let oracle = network(&context, &sc, &keys).await;
            let mut chains: Vec<Option<Arc<Chain>>> = vec![None; stores.len()];
            let mut handles = Vec::new();
            for (i, store) in stores.iter().enumerate().filter(|(i, _)| *i != late) {
                let chain = open(i, store);
                handles.extend(start_node(&context, &oracle, &parts, i, chain.clone()).await);
                chains[i] = Some(chain);
            }
            context.sleep(late_by).await;
            let chain = open(late, &stores[late]);
            handles.extend(start_node(&context, &oracle, &parts, late, chain.clone()).await);
            chains[late] = Some(chain);
            context.sleep((restart + run_after).saturating_sub(now(&context))).await;
            let chains: Vec<Arc<Chain>> = chains.into_iter().flatten().collect();
            let after: Vec<Vec<Hash>> = chains.iter().map(|c| hashes(c)).collect();
            let stalls: Vec<Option<Stall>> = chains.iter().map(|c| c.applier().stall()).collect();
            drop(handles);
            (after, stalls)
        }
    });

    let nodes = (0..sc.nodes())
        .map(|i| NodeCrash {
            index: i,
            before: before[i].clone(),
            kept: kept[i],
            after: after[i].clone(),
            stall: stalls[i].clone(),
        })
        .collect();
    CrashOutcome { scenario, nodes, submitted }
}

/// Checks `invariant` on [`run_crash`] for every seed (see [`crate::seeds`]); on the first
/// violation panics with the seed, the reason, the scenario and the command that replays it.
pub fn check_crash_seeds(
    test: &str,
    default: std::ops::Range<u64>,
    invariant: impl Fn(&CrashOutcome) -> Result<(), String>,
) {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    for seed in crate::seeds(default) {
        let outcome = run_crash(CrashScenario::from_seed(seed));
        if let Err(why) = invariant(&outcome) {
            panic!(
                "invariant violated for seed {seed}: {why}\nscenario: {:?}\nreplay: ARCHIPEL_SIM_SEED={seed} cargo test -p archipel-sim --test {test}",
                outcome.scenario
            );
        }
    }
}
