//! `cargo xtask bench liveness`: what liveness costs at 12, 1,000 and 10,000 registered nodes,
//! beside the design it replaced, measured in the same run.
//!
//! Liveness is decided off the ledger (`archipel_consensus::liveness`): every node heartbeats the
//! validators every `lease_ttl / 4`, each validator's `Tracker` records it (`heard`), the leader
//! turns silences and returns into `LivenessChange`s (`plan`), every verifier checks them against
//! its own hearing (`judge`), and a block carries only those changes. The claim under test (issue
//! 17): the *ledger's* cost grows with the number of status changes, not with the number of
//! nodes. At each size this bench measures:
//!
//! - validator CPU: `heard` per heartbeat, `plan` per call with every node heard (no change) and
//!   with 1 % of the nodes silent (k changes), `retain_registered` (called before each `plan`),
//!   `judge` per change — over every call of the run, not a sample — and per second at the
//!   devnet's rates, read from the code (`LedgerParams::default()`, `heartbeat_interval`,
//!   `app::IDLE_WAIT`, `app::LIVENESS_RECHECK`);
//! - the ledger bytes and transactions spent on liveness, from real blocks built by
//!   `archipel_ledger::propose` out of the tracker's own plans;
//! - the old design as a baseline: one signed heartbeat transaction per node per heartbeat
//!   interval, built as the smallest transaction kind there is now (`LeaveNode`, 137 bytes; the
//!   removed `Heartbeat` kind was 105), checked with `verify_all` one block's worth at a time (as
//!   the chain batches signatures) and encoded into a block;
//! - executing a block with no change, with k Downs and with k Ups, and, for comparison, the
//!   state root rebuilt from every entry — what `execute` did every block before issue 18's trie
//!   (now it seals only the changed entries' paths).
//!
//! Setup (keys, signed descriptors, bringing every lease Up through real blocks) is timed apart
//! and not part of any figure.

use anyhow::{Result, ensure};
use archipel_consensus::app::{IDLE_WAIT, LIVENESS_RECHECK};
use archipel_consensus::liveness::{Tracker, heartbeat_interval};
use archipel_crypto::test_support::example_descriptor;
use archipel_crypto::{Identity, SignedDescriptor};
use archipel_ledger::block::MIN_LIVENESS_BYTES;

/// Bytes of a LeaveNode transaction (signer, nonce, kind, node, signature): what the old design's
/// heartbeat transactions are modelled as.
const LEAVE_NODE_TX_BYTES: usize = 32 + 8 + 1 + 32 + 64;
use archipel_ledger::{
    AliveProof, Block, BlockHeader, GenesisState, Hash, LedgerParams, LivenessChange, Payload, Proposal, Signatures,
    SignedTransaction, State, Transaction, execute, genesis_header, propose, verify_all,
};
use archipel_types::NodeId;
use commonware_codec::{EncodeSize as _, FixedSize as _};
use std::time::{Duration, Instant, SystemTime};

/// Registered nodes at which everything is measured.
pub const SIZES: [usize; 3] = [12, 1_000, 10_000];

/// How often the leader's tracker is asked per idle proposal: `app::propose` plans at once, finds
/// nothing to put in the block, plans again every `LIVENESS_RECHECK` while it waits `IDLE_WAIT`
/// for a transaction, and once more before proposing the empty block.
const PLANS_PER_IDLE_PROPOSAL: u32 = (IDLE_WAIT.as_millis() / LIVENESS_RECHECK.as_millis()) as u32 + 1;

/// Encoded size of the removed `Heartbeat` transaction (signer, nonce, kind, signature), for the
/// note beside the baseline, which is built of today's smallest kind.
const OLD_HEARTBEAT_BYTES: usize = 32 + 8 + 1 + 64;

/// Encoded size of one `Up` change (kind, node, height, the node's signature).
const UP_BYTES: usize = 1 + 32 + 8 + 64;

/// The devnet's liveness rates, read from the code that sets them.
#[derive(Clone, Copy, Debug)]
pub struct Rates {
    /// `LedgerParams::default().lease_ttl_ms` (the devnet genesis uses the defaults).
    pub lease_ttl: Duration,
    /// Every node heartbeats each validator this often.
    pub heartbeat: Duration,
    /// An idle leader proposes an empty block after this long.
    pub idle_block: Duration,
}

impl Rates {
    /// The rates of a devnet started with `archipel devnet`.
    pub fn devnet() -> Self {
        let lease_ttl = Duration::from_millis(LedgerParams::default().lease_ttl_ms);
        Self { lease_ttl, heartbeat: heartbeat_interval(lease_ttl), idle_block: IDLE_WAIT }
    }

    /// Heartbeats each validator receives per second from one node (and, in the old design,
    /// heartbeat transactions per node per second).
    pub fn heartbeats_per_node_second(&self) -> f64 {
        1.0 / self.heartbeat.as_secs_f64()
    }

    /// Blocks per second of an idle network (an upper bound: consensus adds its latency).
    pub fn blocks_per_second(&self) -> f64 {
        1.0 / self.idle_block.as_secs_f64()
    }

    /// Calls of `retain_registered` + `plan` per second on a validator that leads every block.
    pub fn plans_per_second(&self) -> f64 {
        self.blocks_per_second() * f64::from(PLANS_PER_IDLE_PROPOSAL)
    }

    /// Blocks between two heartbeats of one node.
    fn blocks_per_heartbeat(&self) -> usize {
        (self.heartbeat.as_nanos() / self.idle_block.as_nanos()).max(1) as usize
    }
}

/// How many times each measured step runs at one size.
#[derive(Clone, Copy, Debug)]
pub struct Iterations {
    /// Simulated idle blocks of the steady run (heartbeats and two plans per block).
    pub steady_blocks: usize,
    /// Plans with 1 % of nodes silent (each a lease apart, so each proposes the k Downs again).
    pub silent_plans: usize,
    /// Executions of each block (empty, k Downs, k Ups) and state-root rebuilds.
    pub applies: usize,
    /// Old-design heartbeat transactions verified (rounded up to whole seconds of heartbeats).
    pub old_txs: usize,
}

impl Iterations {
    /// The bench's counts at `nodes`: 60 s of simulated idle devnet, 120 plans with changes, and
    /// at least 4,000 old-design signatures.
    pub fn bench(nodes: usize) -> Self {
        Self { steady_blocks: 240, silent_plans: 120, applies: (20_000 / nodes).clamp(40, 500), old_txs: 4_000 }
    }
}

/// Timings of every call of one step.
#[derive(Clone, Debug, Default)]
pub struct Calls {
    total: Duration,
    count: usize,
    /// Each timed call (or batch of `per_batch` calls, then `count` counts the calls).
    each: Vec<Duration>,
    per_batch: bool,
}

impl Calls {
    fn batched() -> Self {
        Self { per_batch: true, ..Self::default() }
    }

    fn record(&mut self, elapsed: Duration, calls: usize) {
        self.total += elapsed;
        self.count += calls;
        self.each.push(elapsed);
    }

    /// Mean per call, in seconds.
    pub fn mean(&self) -> f64 {
        self.total.as_secs_f64() / self.count.max(1) as f64
    }

    /// 99th percentile of the individually timed calls (None for batched timings).
    pub fn p99(&self) -> Option<f64> {
        if self.per_batch || self.each.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = self.each.iter().map(Duration::as_secs_f64).collect();
        v.sort_by(f64::total_cmp);
        Some(v[((v.len() * 99).div_ceil(100)).saturating_sub(1)])
    }
}

/// Everything measured at one size.
#[derive(Debug)]
pub struct SizeFigures {
    /// Registered nodes.
    pub nodes: usize,
    /// Status changes measured (1 % of the nodes, at least one).
    pub k: usize,
    /// Keys, descriptors, states and old-design transactions (not measured).
    pub setup: Duration,
    /// `Tracker::heard`, per heartbeat (timed per block's heartbeats).
    pub heard: Calls,
    /// `Tracker::plan` with every node heard.
    pub plan_steady: Calls,
    /// `Tracker::plan` with 1 % of nodes silent (each call returns the k Downs).
    pub plan_changes: Calls,
    /// `Tracker::retain_registered`, before each plan.
    pub retain: Calls,
    /// `Tracker::judge`, per change (timed per block's changes).
    pub judge: Calls,
    /// Old design: `verify_all` per heartbeat transaction (timed per block's worth).
    pub old_verify: Calls,
    /// Encoded bytes a real block spends on liveness: none planned, k Downs, k Ups.
    pub bytes_none: usize,
    /// Same, with the k Downs the tracker planned.
    pub bytes_down: usize,
    /// Same, with k Ups.
    pub bytes_up: usize,
    /// Transactions in those blocks (liveness needs none).
    pub liveness_txs: usize,
    /// Per block, in every block: the header's liveness root and the empty list's count.
    pub fixed_bytes_per_block: usize,
    /// Old design: heartbeat transactions per second.
    pub old_txs_per_second: f64,
    /// Old design: encoded bytes per second those transactions add to blocks.
    pub old_bytes_per_second: f64,
    /// `execute` of an empty block (all leases Up).
    pub apply_empty: Calls,
    /// `execute` of a block with the k planned Downs, on the same state.
    pub apply_down: Calls,
    /// `execute` of an empty block on the state after the Downs.
    pub apply_empty_after_down: Calls,
    /// `execute` of a block bringing the k nodes back Up, on that state.
    pub apply_up: Calls,
    /// `State::rebuilt_root` (all leases Up): the root from every entry, what each block cost before
    /// the trie was sealed from changes only (issue 18).
    pub state_root: Calls,
}

/// Runs the bench at every size and prints the table.
pub fn bench() -> Result<()> {
    let rates = Rates::devnet();
    println!(
        "== liveness bench at {} registered nodes (devnet rates from the code: lease_ttl {} ms, a heartbeat per node \
         to each validator every {} ms, an idle block every {} ms = {:.0} blocks/s, {} plans per idle proposal)",
        SIZES.map(thousands).join(" / "),
        rates.lease_ttl.as_millis(),
        rates.heartbeat.as_millis(),
        rates.idle_block.as_millis(),
        rates.blocks_per_second(),
        PLANS_PER_IDLE_PROPOSAL,
    );
    let started = Instant::now();
    let mut all = Vec::new();
    for nodes in SIZES {
        eprintln!("liveness bench: {} nodes…", thousands(nodes));
        let f = measure(nodes, rates, Iterations::bench(nodes))?;
        check(&f)?;
        all.push(f);
    }
    print_table(&all, rates);
    println!("whole bench: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn ids(nodes: usize) -> (Vec<Identity>, Vec<NodeId>) {
    let identities: Vec<Identity> = (0..nodes as u64).map(|s| Identity::from_seed(1_000 + s)).collect();
    let ids = identities.iter().map(Identity::node_id).collect();
    (identities, ids)
}

/// The genesis with `nodes` registered nodes, then real blocks bringing every lease Up (at most
/// `max_block_liveness` per block). Returns the state and the last header.
fn all_up(identities: &[Identity], ids: &[NodeId]) -> Result<(State, BlockHeader)> {
    let descriptors = identities
        .iter()
        .map(|id| SignedDescriptor::sign(id, example_descriptor(id)))
        .collect::<Result<Vec<_>, _>>()?;
    let params = LedgerParams { max_registered_nodes: (ids.len() as u32).max(256), ..LedgerParams::default() };
    let mut state = State::genesis(GenesisState {
        network: Hash([7; 32]),
        params,
        timestamp_ms: 1_800_000_000_000,
        validators: ids.iter().take(4).copied().collect(),
        accounts: Vec::new(),
        nodes: descriptors,
    });
    let mut head = genesis_header(&state);
    let network = state.network();
    let per_block = state.params().max_block_liveness as usize;
    for chunk in identities.iter().zip(ids).collect::<Vec<_>>().chunks(per_block) {
        let ups = chunk
            .iter()
            .map(|(id, node)| LivenessChange::Up { node: **node, proof: AliveProof::sign(id, &network, 0) });
        let p = propose(&state, &head, head.timestamp_ms + 250, ups, [], Signatures::AlreadyVerified)?;
        ensure!(
            p.block.liveness.len() == chunk.len(),
            "setup: {} of {} Ups applied",
            p.block.liveness.len(),
            chunk.len()
        );
        (state, head) = (p.state, p.block.header);
    }
    Ok((state, head))
}

/// Measures everything at `nodes` registered nodes.
pub fn measure(nodes: usize, rates: Rates, it: Iterations) -> Result<SizeFigures> {
    let setup_started = Instant::now();
    let (identities, ids) = ids(nodes);
    let (state, head) = all_up(&identities, &ids)?;
    let network = state.network();
    let k = (nodes / 100).max(1);
    let silent: Vec<usize> = (0..k).map(|i| i * nodes / k).collect();
    let old_seconds = it.old_txs.div_ceil((nodes as f64 * rates.heartbeats_per_node_second()).round() as usize);
    let per_second = (nodes as f64 * rates.heartbeats_per_node_second()).round() as usize;
    let old_txs: Vec<Vec<SignedTransaction>> = (0..old_seconds as u64)
        .map(|second| {
            (0..per_second)
                .map(|i| {
                    let (id, node) = (&identities[i % nodes], ids[i % nodes]);
                    let nonce = second * (per_second / nodes) as u64 + (i / nodes) as u64;
                    Transaction { signer: node, nonce, payload: Payload::LeaveNode { node } }.sign(id, &network)
                })
                .collect()
        })
        .collect();
    let setup = setup_started.elapsed();

    let epoch = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);

    // Two trackers side by side, their calls interleaved so that load from elsewhere on the box
    // falls on both alike. Steady: every node heartbeats every `heartbeat`, the leader plans
    // every `LIVENESS_RECHECK` of an idle block's wait and at its end. Silent: 1 % of the nodes never heartbeat; its plans are a lease
    // apart, each by a fresh tracker (a tracker whose last proposal is missing from the next
    // parent treats it as failed and backs off), so each proposes the k Downs, and every
    // verifier judges them.
    let mut steady = Tracker::new(rates.lease_ttl, LIVENESS_RECHECK, epoch);
    let phases = rates.blocks_per_heartbeat();
    let groups: Vec<Vec<NodeId>> = (0..phases)
        .map(|p| ids.iter().enumerate().filter(|(i, _)| i % phases == p).map(|(_, n)| *n).collect())
        .collect();
    let live: Vec<NodeId> = ids.iter().enumerate().filter(|(i, _)| !silent.contains(i)).map(|(_, n)| *n).collect();
    let (mut heard, mut plan_steady, mut retain) = (Calls::batched(), Calls::default(), Calls::default());
    let (mut plan_changes, mut judge) = (Calls::default(), Calls::batched());
    let (mut last_steady_plan, mut last_silent_plan) = (Vec::new(), Vec::new());
    let max = state.params().max_block_liveness as usize;
    let silent_every = (it.steady_blocks / it.silent_plans.max(1)).max(1);
    for b in 0..it.steady_blocks.max(it.silent_plans) {
        if b < it.steady_blocks {
            let block_start = epoch + rates.idle_block * b as u32;
            let group = &groups[b % phases];
            let t = Instant::now();
            for node in group {
                steady.heard(*node, block_start, None);
            }
            heard.record(t.elapsed(), group.len());
            for call in 0..PLANS_PER_IDLE_PROPOSAL {
                let now = block_start + (LIVENESS_RECHECK * call).min(rates.idle_block);
                let t = Instant::now();
                steady.retain_registered(&state);
                retain.record(t.elapsed(), 1);
                let t = Instant::now();
                let plan = steady.plan(&state, now, max);
                plan_steady.record(t.elapsed(), 1);
                ensure!(plan.is_empty(), "{nodes} nodes, all heard: block {b} planned {} changes", plan.len());
                last_steady_plan = plan;
            }
        }
        let j = b / silent_every;
        if b % silent_every == 0 && j < it.silent_plans {
            let now = epoch + rates.lease_ttl * (j as u32 + 1);
            let mut quiet = Tracker::new(rates.lease_ttl, LIVENESS_RECHECK, epoch);
            for node in &live {
                quiet.heard(*node, now - Duration::from_millis(1), None);
            }
            let t = Instant::now();
            let plan = quiet.plan(&state, now, max);
            plan_changes.record(t.elapsed(), 1);
            ensure!(plan.len() == k, "{nodes} nodes, {k} silent: plan {j} proposed {} changes", plan.len());
            let t = Instant::now();
            let verdicts: Vec<Result<(), String>> = plan.iter().map(|c| quiet.judge(c, now)).collect();
            judge.record(t.elapsed(), plan.len());
            for v in verdicts {
                v.map_err(|e| anyhow::anyhow!("{nodes} nodes: a verifier refused a planned Down: {e}"))?;
            }
            last_silent_plan = plan;
        }
    }

    // Real blocks out of those plans.
    let now_ms = head.timestamp_ms + 250;
    let Proposal { block: empty, .. } =
        propose(&state, &head, now_ms, last_steady_plan, [], Signatures::AlreadyVerified)?;
    let down = propose(&state, &head, now_ms, last_silent_plan, [], Signatures::AlreadyVerified)?;
    ensure!(down.block.liveness.len() == k, "{} of the {k} planned Downs applied", down.block.liveness.len());
    let after_down = down.state.clone();
    let ups: Vec<LivenessChange> = silent
        .iter()
        .map(|&i| LivenessChange::Up {
            node: ids[i],
            proof: AliveProof::sign(&identities[i], &network, down.block.header.height),
        })
        .collect();
    let Proposal { block: up, .. } =
        propose(&after_down, &down.block.header, now_ms + 250, ups, [], Signatures::AlreadyVerified)?;
    ensure!(up.liveness.len() == k, "{} of the {k} Ups applied", up.liveness.len());
    let Proposal { block: empty_after_down, .. } =
        propose(&after_down, &down.block.header, now_ms + 250, [], [], Signatures::AlreadyVerified)?;
    let liveness_bytes = |b: &Block| {
        let without = Block { liveness: Vec::new(), ..b.clone() };
        b.to_bytes().len() - without.to_bytes().len()
    };
    // The header's liveness root, and the count of the (empty) list every block carries.
    let fixed_bytes_per_block = 32 + (empty.to_bytes().len() - BlockHeader::SIZE - empty.txs.encode_size());

    // Executing those blocks, and the state root alone, interleaved (each on a fresh copy of
    // its parent state, copied outside the timing).
    let cases: [(&State, &BlockHeader, &Block); 4] = [
        (&state, &head, &empty),
        (&state, &head, &down.block),
        (&after_down, &down.block.header, &empty_after_down),
        (&after_down, &down.block.header, &up),
    ];
    let mut applied: [Calls; 4] = Default::default();
    let mut state_root = Calls::default();
    for _ in 0..it.applies {
        for ((base, parent, block), calls) in cases.iter().zip(applied.iter_mut()) {
            let mut s = (*base).clone();
            let t = Instant::now();
            let outcome = execute(&mut s, parent, block, Signatures::Verify)?;
            calls.record(t.elapsed(), 1);
            ensure!(outcome.went_down.len() + outcome.came_up.len() == block.liveness.len(), "outcome mismatch");
        }
        let t = Instant::now();
        let root = state.rebuilt_root();
        state_root.record(t.elapsed(), 1);
        ensure!(root == head.state_root, "the state root moved");
    }
    let [apply_empty, apply_down, apply_empty_after_down, apply_up] = applied;

    // The old design: a heartbeat transaction per node per heartbeat, one block's worth verified
    // at a time, and the bytes they add to a block.
    let per_block = (per_second as f64 / rates.blocks_per_second()).ceil().max(1.0) as usize;
    let mut old_verify = Calls::batched();
    for second in &old_txs {
        for batch in second.chunks(per_block) {
            let t = Instant::now();
            let verified = verify_all(batch, &network);
            old_verify.record(t.elapsed(), batch.len());
            verified.map_err(|(i, e)| anyhow::anyhow!("old heartbeat transaction {i} did not verify: {e}"))?;
        }
    }
    let with_old = Block { txs: old_txs[0].clone(), ..empty.clone() };
    let old_bytes_per_second = (with_old.to_bytes().len() - empty.to_bytes().len()) as f64;

    Ok(SizeFigures {
        nodes,
        k,
        setup,
        heard,
        plan_steady,
        plan_changes,
        retain,
        judge,
        old_verify,
        bytes_none: liveness_bytes(&empty),
        bytes_down: liveness_bytes(&down.block),
        bytes_up: liveness_bytes(&up),
        liveness_txs: empty.txs.len() + down.block.txs.len() + up.txs.len(),
        fixed_bytes_per_block,
        old_txs_per_second: per_second as f64,
        old_bytes_per_second,
        apply_empty,
        apply_down,
        apply_empty_after_down,
        apply_up,
        state_root,
    })
}

/// Fails loudly on a figure that cannot be right.
pub fn check(f: &SizeFigures) -> Result<()> {
    let n = f.nodes;
    ensure!(f.bytes_none == 0, "{n} nodes: a block with no status change spends {} bytes on liveness", f.bytes_none);
    ensure!(f.liveness_txs == 0, "{n} nodes: liveness blocks carry {} transactions", f.liveness_txs);
    // The list's count may grow by a byte past 127 changes.
    let per_down = f.bytes_down as f64 / f.k as f64;
    let per_up = f.bytes_up as f64 / f.k as f64;
    ensure!(
        (MIN_LIVENESS_BYTES as f64..MIN_LIVENESS_BYTES as f64 + 1.0).contains(&per_down),
        "{n} nodes: {per_down} bytes per Down, expected {MIN_LIVENESS_BYTES}"
    );
    ensure!((UP_BYTES as f64..UP_BYTES as f64 + 1.0).contains(&per_up), "{n} nodes: {per_up} bytes per Up");
    let per_old_tx = f.old_bytes_per_second / f.old_txs_per_second;
    ensure!(
        (LEAVE_NODE_TX_BYTES as f64..LEAVE_NODE_TX_BYTES as f64 + 1.0).contains(&per_old_tx),
        "{n} nodes: {per_old_tx} bytes per old heartbeat transaction, expected {LEAVE_NODE_TX_BYTES}"
    );
    for (what, c) in [
        ("heard", &f.heard),
        ("plan (steady)", &f.plan_steady),
        ("plan (changes)", &f.plan_changes),
        ("retain_registered", &f.retain),
        ("judge", &f.judge),
        ("old verify", &f.old_verify),
        ("apply empty", &f.apply_empty),
        ("apply Downs", &f.apply_down),
        ("apply Ups", &f.apply_up),
        ("state root", &f.state_root),
    ] {
        ensure!(c.count > 0 && c.total > Duration::ZERO, "{n} nodes: {what} was not measured");
    }
    // An Ed25519 verification takes tens of microseconds; a cheaper one verified nothing.
    ensure!(
        f.old_verify.mean() > 5e-6,
        "{n} nodes: {:.1} µs per signature is not a verification",
        f.old_verify.mean() * 1e6
    );
    Ok(())
}

/// Validator CPU per second at the devnet's rates, in seconds per second.
struct PerSecond {
    heard: f64,
    proposer: f64,
    steady: f64,
    /// With k status changes every second: one of the plans carries them, every verifier judges them.
    churn: f64,
    old: f64,
}

fn per_second(f: &SizeFigures, rates: Rates) -> PerSecond {
    let heard = f.heard.mean() * f.nodes as f64 * rates.heartbeats_per_node_second();
    let proposer = (f.plan_steady.mean() + f.retain.mean()) * rates.plans_per_second();
    let steady = heard + proposer;
    let churn = steady + (f.plan_changes.mean() - f.plan_steady.mean()).max(0.0) + f.judge.mean() * f.k as f64;
    PerSecond { heard, proposer, steady, churn, old: f.old_verify.mean() * f.old_txs_per_second }
}

fn print_table(all: &[SizeFigures], rates: Rates) {
    let row = |label: &str, cells: Vec<String>| {
        println!("  {label:<52}{}", cells.iter().map(|c| format!("{c:>27}")).collect::<String>());
    };
    let each = |f: &dyn Fn(&SizeFigures) -> String| all.iter().map(f).collect::<Vec<_>>();
    println!();
    row("registered nodes", each(&|f| thousands(f.nodes)));
    row("k = status changes measured (1 % of nodes)", each(&|f| f.k.to_string()));
    row("setup, not measured (keys, descriptors, states)", each(&|f| format!("{:.1} s", f.setup.as_secs_f64())));

    println!("validator CPU per call, mean / p99 over every call of the run [calls]");
    let calls = |c: &Calls| match c.p99() {
        Some(p) => format!("{} / {} [{}]", time(c.mean()), time(p), c.count),
        None => format!("{} [{}]", time(c.mean()), c.count),
    };
    row("Tracker::heard, per heartbeat", each(&|f| calls(&f.heard)));
    row("Tracker::plan, all heard (0 changes)", each(&|f| calls(&f.plan_steady)));
    row("Tracker::plan, 1 % silent (k Downs)", each(&|f| calls(&f.plan_changes)));
    row("Tracker::retain_registered, before each plan", each(&|f| calls(&f.retain)));
    row("Tracker::judge, per change", each(&|f| calls(&f.judge)));
    row("old: verify_all per heartbeat tx (block batches)", each(&|f| calls(&f.old_verify)));

    println!(
        "validator CPU per second at devnet rates (a heartbeat per node every {} ms; {:.0} plans/s as if this \
         validator led every block)",
        rates.heartbeat.as_millis(),
        rates.plans_per_second()
    );
    let ps: Vec<PerSecond> = all.iter().map(|f| per_second(f, rates)).collect();
    let cpu = |s: f64| format!("{} ({:.2} %)", time(s), s * 100.0);
    let by = |g: &dyn Fn(&PerSecond) -> String| ps.iter().map(g).collect::<Vec<_>>();
    row("heartbeats heard", by(&|p| cpu(p.heard)));
    row("proposer: retain_registered + plan", by(&|p| cpu(p.proposer)));
    row("new, no status change", by(&|p| cpu(p.steady)));
    row("new, k status changes every second", by(&|p| cpu(p.churn)));
    row("old: verifying every heartbeat transaction", by(&|p| cpu(p.old)));
    row("ratio new/old, no change", by(&|p| format!("{:.3}", p.steady / p.old)));
    row("ratio new/old, k changes/s", by(&|p| format!("{:.3}", p.churn / p.old)));

    println!("ledger, from real blocks proposed out of the tracker's plans");
    row("liveness transactions per block (any case)", each(&|f| f.liveness_txs.to_string()));
    row("liveness bytes per block, no status change", each(&|f| f.bytes_none.to_string()));
    row("liveness bytes per block, k Downs", each(&|f| thousands(f.bytes_down)));
    row("liveness bytes per block, k Ups", each(&|f| thousands(f.bytes_up)));
    let bps = rates.blocks_per_second();
    row("new: liveness transactions/s", each(&|f| format!("{:.0}", f.liveness_txs as f64 * bps)));
    row("new: liveness bytes/s, no status change", each(&|f| format!("{:.0}", f.bytes_none as f64 * bps)));
    row("new: liveness bytes/s, k Downs/s", each(&|f| thousands(f.bytes_down)));
    row("old: heartbeat transactions/s", each(&|f| thousands(f.old_txs_per_second as usize)));
    row("old: heartbeat bytes/s", each(&|f| thousands(f.old_bytes_per_second as usize)));
    row("old: heartbeat bytes per block", each(&|f| thousands((f.old_bytes_per_second / bps) as usize)));
    println!(
        "  (old transactions are built as LeaveNode, {LEAVE_NODE_TX_BYTES} bytes; the removed \
         Heartbeat kind was {OLD_HEARTBEAT_BYTES}, so its bytes were {:.2} of these)",
        OLD_HEARTBEAT_BYTES as f64 / LEAVE_NODE_TX_BYTES as f64
    );
    row("ratio new/old bytes, no change", each(&|f| format!("{:.3}", f.bytes_none as f64 / f.old_bytes_per_second)));
    row("ratio new/old bytes, k Downs/s", each(&|f| format!("{:.4}", f.bytes_down as f64 / f.old_bytes_per_second)));
    if let Some(f) = all.first() {
        println!(
            "  fixed in every block whatever the nodes: the header's liveness root and the empty list's count, {} bytes \
             ({:.0} bytes/s at {:.0} blocks/s)",
            f.fixed_bytes_per_block,
            f.fixed_bytes_per_block as f64 * bps,
            bps
        );
    }

    println!("executing a block (ledger::execute, signatures checked), mean / p99 [blocks]");
    let plus = |c: &Calls, base: &Calls| {
        let d = c.mean() - base.mean();
        format!("{} ({}{})", time(c.mean()), if d < 0.0 { "-" } else { "+" }, time(d.abs()))
    };
    row("empty block", each(&|f| calls(&f.apply_empty)));
    row("k Downs (difference to the empty block)", each(&|f| plus(&f.apply_down, &f.apply_empty)));
    row("k Ups (difference to an empty block there)", each(&|f| plus(&f.apply_up, &f.apply_empty_after_down)));
    row(
        "for comparison: the root rebuilt from every entry (each block's cost before issue 18)",
        each(&|f| calls(&f.state_root)),
    );
    row("that rebuild per second at idle block rate", each(&|f| cpu(f.state_root.mean() * bps)));
}

/// `1234567` as `1,234,567`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as ns, µs, ms or s.
fn time(seconds: f64) -> String {
    match seconds {
        s if s < 1e-6 => format!("{:.0} ns", s * 1e9),
        s if s < 1e-3 => format!("{:.1} µs", s * 1e6),
        s if s < 1.0 => format!("{:.2} ms", s * 1e3),
        s => format!("{s:.2} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_gives_sane_figures() {
        let rates = Rates::devnet();
        let it = Iterations { steady_blocks: 8, silent_plans: 3, applies: 2, old_txs: 24 };
        let f = measure(12, rates, it).unwrap();
        check(&f).unwrap();
        assert_eq!((f.k, f.bytes_none, f.bytes_down, f.bytes_up), (1, 0, 33, 105));
        assert_eq!(f.old_txs_per_second, 24.0, "12 nodes × a heartbeat every 500 ms");
        assert_eq!(f.heard.count, 8 * 12, "every heartbeat of 8 blocks (one per node per idle block) is timed");
        assert_eq!(f.plan_steady.count, 8 * 3, "planned at 0, 250 and 500 ms of each idle wait");
    }

    #[test]
    fn devnet_rates_come_from_the_code() {
        let r = Rates::devnet();
        assert_eq!(r.heartbeat, r.lease_ttl / 4);
        assert_eq!(r.idle_block, IDLE_WAIT);
        assert_eq!(r.blocks_per_heartbeat(), 1, "a heartbeat and an idle block every 500 ms");
        assert_eq!(PLANS_PER_IDLE_PROPOSAL, 3);
    }

    #[test]
    fn numbers_print_readably() {
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(12), "12");
        assert_eq!(time(2.5e-8), "25 ns");
        assert_eq!(time(0.0125), "12.50 ms");
    }
}
