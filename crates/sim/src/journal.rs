//! A validator that lost its record of votes, on the deterministic runtime.
//!
//! Four validators run under load; at a seeded moment validator 0 stops and starts again at
//! once without its simplex journal — its runtime directory deleted, its block log kept — while
//! the other three run on and still hold its recent votes. With the
//! [`archipel_consensus::vote_gate`] it follows the chain until the network finalizes a view it
//! cannot have voted in, then votes; without it (`vote_without_record`) it votes again from its
//! block log's last certified block, in views it already voted in, and the others see the
//! conflicting votes. Once the gate must have opened, validator 1 stops: the other three finalize
//! only if validator 0 votes.
//!
//! [`run_journal_loss`] reports every vote validator 0 sent in each of its two lives (read off its
//! vote channel, see [`crate::votes`]) and the views it voted in in both, which nodes blocked
//! which (honest validators block a peer whose conflicting votes they both hold — only while
//! they are still in that view, so the vote log is the direct check) and the heights before and
//! after validator 1 stopped. Links are lossless (see the scenario).

use crate::SeedStream;
use crate::crash::{network, node_disk, now, start_node_tapped, transfer_load};
use crate::ledger::{LedgerScenario, participants};
use crate::votes::{Said, VoteLog, views_voted_twice};
use archipel_consensus::engine::SIMPLEX_PARTITION;
use archipel_consensus::store::BlockStore as _;
use archipel_consensus::{Chain, MemoryStore};
use archipel_ledger::store::MemoryStore as StateMemory;
use commonware_cryptography::Signer as _;
use commonware_cryptography::ed25519::PublicKey;
use commonware_runtime::{Clock, Metrics as _, Runner as _, Storage as _, deterministic};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// The validator whose journal is lost.
pub const WIPED: usize = 0;
/// The validator stopped once the gate must have opened.
pub const STOPPED: usize = 1;
/// After the restart, when validator [`STOPPED`] stops (the gate observes for 3 s, then opens
/// at the next finalization).
pub const STOP_AFTER: Duration = Duration::from_secs(10);
/// How long the three others run after that.
pub const RUN_AFTER_STOP: Duration = Duration::from_secs(10);

/// What a run produced.
#[derive(Debug)]
pub struct JournalLoss {
    /// The seed.
    pub seed: u64,
    /// When validator [`WIPED`] stopped.
    pub restart_at: Duration,
    /// Pairs `(blocker, blocked)` over the whole run.
    pub blocked: Vec<(usize, usize)>,
    /// Validator 2's finalized height when validator [`STOPPED`] stopped, and at the end.
    pub heights: (u64, u64),
    /// Validator [`WIPED`]'s finalized height at the end.
    pub wiped_height: u64,
    /// Validator [`WIPED`]'s vote gate when validator [`STOPPED`] stopped (its metrics), if it
    /// waited at one.
    pub gate: Option<GateSeen>,
    /// How many votes validator [`WIPED`] sent before and after it lost its journal.
    pub votes: (usize, usize),
    /// Messages on its vote channel that did not decode as votes (none expected).
    pub unreadable: usize,
    /// The views it voted in both before and after, with what it said in each life.
    pub voted_twice: BTreeMap<u64, (BTreeSet<Said>, BTreeSet<Said>)>,
}

/// A vote gate's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateSeen {
    /// 1 while it does not vote.
    pub waiting: u64,
    /// The view a finalization had to be above.
    pub bar: u64,
    /// The finalized view after which it started voting (0: not yet).
    pub opened_at: u64,
}

/// Validator [`WIPED`]'s gate metrics in `metrics` (the runtime's Prometheus text).
fn gate_of(metrics: &str) -> Option<GateSeen> {
    let value = |name: &str| {
        let prefix = format!("node_vote_gate_{name}{{index=\"{WIPED}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse::<u64>().ok())
    };
    Some(GateSeen { waiting: value("waiting")?, bar: value("bar")?, opened_at: value("opened_at")? })
}

/// Runs the scenario of `seed`, with validator [`WIPED`] told it never voted when
/// `vote_without_record`.
pub fn run_journal_loss(seed: u64, vote_without_record: bool) -> JournalLoss {
    let mut sc = LedgerScenario::from_seed(seed);
    sc.partition = None;
    sc.degradation = None;
    sc.byzantine = None;
    // Lossless links: with one validator silent at its gate, the other three must all take part
    // in every view, and the simulator's random message loss can then stall the network for longer
    // than the run (seen in seed 11 at 90 % delivery); `one_validator_down_over_lossy_links`
    // covers that case.
    sc.delivery_percent = 100;
    sc.followers = 0;
    let mut r = SeedStream(seed ^ 0x6a6f_7572); // "jour"
    let restart_at = Duration::from_millis(3_000 + r.below(3_001));
    let down_for = Duration::from_millis(r.below(501));
    let log_loss = r.below(21);
    sc.transfers_until = restart_at;
    let parts = Arc::new(participants(&sc));
    let keys: Vec<PublicKey> = parts.nodes.iter().map(|id| id.private_key().public_key()).collect();
    let stores: Vec<MemoryStore> = (0..sc.nodes()).map(|_| MemoryStore::default()).collect();
    let states: Vec<StateMemory> = (0..sc.nodes()).map(|_| StateMemory::default()).collect();
    let (stores_for_crash, states_for_crash) = (stores.clone(), states.clone());
    let genesis = parts.genesis.clone();
    let open = move |i: usize| {
        Arc::new(
            Chain::open_with(genesis.clone(), Box::new(stores[i].clone()), Arc::new(states[i].clone()))
                .unwrap_or_else(|e| panic!("node {i}: the chain does not open: {e}")),
        )
    };
    // Validator WIPED's votes before and after it lost its journal.
    let (first_life, second_life): (VoteLog, VoteLog) = (Arc::default(), Arc::default());
    let lives = (first_life.clone(), second_life.clone());
    let end = restart_at + down_for + STOP_AFTER + RUN_AFTER_STOP;
    let cfg = deterministic::Config::new().with_seed(seed).with_timeout(Some(end + Duration::from_secs(600)));
    let (blocked, heights, wiped_height, gate) = deterministic::Runner::new(cfg).start(move |context| async move {
        let oracle = network(&context, &sc, &keys).await;
        let mut chains: Vec<Arc<Chain>> = (0..sc.nodes()).map(&open).collect();
        let mut handles = Vec::new();
        for (i, chain) in chains.iter().enumerate() {
            let log = (i == WIPED).then(|| first_life.clone());
            handles.push(
                start_node_tapped(&context, &oracle, &parts, i, chain.clone(), parts.consensus.clone(), log).await,
            );
        }
        transfer_load(&context, &sc, &parts, &chains, restart_at).await;
        context.sleep(restart_at.saturating_sub(now(&context))).await;
        // Validator WIPED stops; its runtime directory is deleted, its journal with it.
        for h in std::mem::take(&mut handles[WIPED]) {
            h.abort();
        }
        context.sleep(down_for).await;
        // It lost power: its block log keeps what was synced, less `log_loss` blocks (a disk that
        // acknowledged syncs it did not do), so it starts views behind the ones it voted in.
        let store = &stores_for_crash[WIPED];
        let synced = store.crash();
        // Cut back to a certified block (a node resumes from its log's last one; without one it
        // would start from the genesis, where a lost journal goes unnoticed by design).
        let certified = |h: &u64| store.get(*h).ok().flatten().is_some_and(|r| !r.certificate.is_empty());
        let keep =
            (1..=synced.saturating_sub(log_loss)).rev().find(certified).or_else(|| (1..=synced).rev().find(certified));
        store.truncate(keep.unwrap_or(synced));
        states_for_crash[WIPED].crash();
        node_disk(&context, WIPED)
            .remove(SIMPLEX_PARTITION, None)
            .await
            .unwrap_or_else(|e| panic!("cannot remove validator {WIPED}'s journal: {e}"));
        chains[WIPED] = open(WIPED);
        let mut consensus = parts.consensus.clone();
        consensus.vote_without_record = vote_without_record;
        handles[WIPED] = start_node_tapped(
            &context,
            &oracle,
            &parts,
            WIPED,
            chains[WIPED].clone(),
            consensus,
            Some(second_life.clone()),
        )
        .await;
        let restarted = now(&context);
        context.sleep((restarted + STOP_AFTER).saturating_sub(now(&context))).await;
        let gate = gate_of(&context.encode());
        for h in std::mem::take(&mut handles[STOPPED]) {
            h.abort();
        }
        // Votes validator 1 sent before it stopped may still finalize a block or two.
        context.sleep(Duration::from_secs(2)).await;
        let at_stop = chains[2].head().height;
        context.sleep((restarted + STOP_AFTER + RUN_AFTER_STOP).saturating_sub(now(&context))).await;
        let at_end = chains[2].head().height;
        let blocked: Vec<(usize, usize)> = oracle
            .blocked()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(a, b)| Some((keys.iter().position(|k| *k == a)?, keys.iter().position(|k| *k == b)?)))
            .collect();
        (blocked, (at_stop, at_end), chains[WIPED].head().height, gate)
    });
    let read = |log: &VoteLog| log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (before, after) = (read(&lives.0), read(&lives.1));
    let unreadable = before.iter().chain(&after).filter(|v| v.said == Said::Unreadable).count();
    let voted_twice = views_voted_twice(&before, &after);
    JournalLoss {
        seed,
        restart_at,
        blocked,
        heights,
        wiped_height,
        gate,
        votes: (before.len(), after.len()),
        unreadable,
        voted_twice,
    }
}
