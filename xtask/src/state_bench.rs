//! `cargo xtask bench state`: what a block costs the ledger's state as the state grows (issue 18).
//!
//! At each size (10^3, 10^5 and 10^6 accounts; 10^7 with `ARCHIPEL_BENCH_STATE_MAX=10000000` where
//! the disk allows) the state is filled through the real state machine on the node's own disk
//! store (`StateDb`, a `redb` file in a temporary directory): blocks of `transfer_many`
//! transactions from one funded account, committed block by block as a node commits them. Then
//! every one of `BLOCKS` blocks of 1,000 changed accounts (five `transfer_many` of 200 credits to
//! accounts already in the state, spread over all of them) is timed in three parts: applying the
//! transactions (reads go through to the store), sealing the state root (the trie paths of the
//! changed entries, reading back the leaves of the trie's buckets they fall in), and committing
//! (writing the entries and their leaves, one redb transaction without a
//! flush, every `COMMIT_BLOCKS` blocks as the chain does; its cost is spread over the blocks in
//! the per-block mean, and shows whole in the maximum) — every block, no sample. Then: the store's file size, the process's resident memory,
//! and the time to reopen the state from the store (what a restarted node does before replaying
//! the few blocks after its last checkpoint).
//!
//! Baselines from the same run: the 10^3 figures (the goal: at 10^6 a block costs within 1.2× of
//! them), and an approximation of the design this replaced, rebuilding the root from every entry
//! (`rebuilt_root`, which reads the entries through the store, where the old code hashed them in
//! memory), timed once per size up to 10^5 (it grows linearly; not run above) and set against the
//! seal alone. Signatures and the transaction index are not part of these figures (they do not
//! depend on the state's size). The memory figure is the process's peak (`VmHWM`) up to that size;
//! reopening opens the file afresh. Reads in the timed blocks may hit the store's entry cache
//! (warm from the fill), as a running node's do.

use anyhow::{Context, Result, ensure};
use archipel_consensus::chain::COMMIT_BLOCKS;
use archipel_consensus::state_db::StateDb;
use archipel_crypto::Identity;
use archipel_ledger::store::StateStore;
use archipel_ledger::{Credit, GenesisState, Hash, Payload, SignedTransaction, State, Transaction};
use archipel_types::NodeId;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Blocks timed at each size: two commits' worth.
const BLOCKS: usize = 2 * COMMIT_BLOCKS as usize;
/// Credits per `transfer_many` (the protocol's maximum).
const CREDITS: usize = 200;
/// Changed accounts per timed block.
const CHANGES: usize = 1_000;
/// Accounts created per fill block.
const FILL_PER_BLOCK: usize = 20_000;

/// An account id that no key owns (state entries need none).
fn account(i: u64) -> NodeId {
    NodeId(Hash::of(&[b"bench-account", &i.to_be_bytes()]).0)
}

fn credits(ids: impl Iterator<Item = u64>) -> Vec<Credit> {
    ids.map(|i| Credit { to: account(i), amount_micro: 1 }).collect()
}

struct Sizes {
    entries: u64,
    fill: Duration,
    apply: Vec<Duration>,
    seal: Vec<Duration>,
    commit: Vec<Duration>,
    /// Of each commit, the part a node does under its chain lock (taking the writes, and letting
    /// go of them once written).
    collect: Vec<Duration>,
    flush: Duration,
    rebuild: Option<Duration>,
    file_bytes: u64,
    rss_bytes: u64,
    /// Resident memory after the timed blocks (`VmRSS`), not a peak.
    rss_now_bytes: u64,
    /// Most trie nodes the state held in memory after any timed block.
    trie_nodes: usize,
    reopen: Duration,
}

/// The process's peak resident memory so far (`VmHWM`): sizes run in increasing order, so each
/// size's figure is the peak up to and including it.
fn rss_bytes() -> u64 {
    status_kib("VmHWM:")
}

/// A line of `/proc/self/status` in bytes (its figures are KiB).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Applies `txs` as block `height` and seals it, and every [`COMMIT_BLOCKS`] blocks commits (as
/// the chain does); returns the times of the apply, the seal, the commit and the commit's part a
/// node does under its chain lock (the commit's zero between commits).
fn block(
    state: &mut State,
    store: &StateDb,
    height: u64,
    txs: &[SignedTransaction],
) -> Result<(Duration, Duration, Duration, Duration)> {
    let t = Instant::now();
    state.begin_block(height, height * 1_000);
    for tx in txs {
        state.apply_verified(tx).map_err(|e| anyhow::anyhow!("block {height}: {e}"))?;
    }
    let applied = t.elapsed();
    let t = Instant::now();
    state.seal()?;
    let sealed = t.elapsed();
    let t = Instant::now();
    let mut collected = Duration::ZERO;
    if height.is_multiple_of(COMMIT_BLOCKS) {
        let c = state.commit()?;
        collected = t.elapsed();
        store.commit(&c, false)?;
        let written = Instant::now();
        state.committed();
        collected += written.elapsed();
    }
    Ok((applied, sealed, t.elapsed(), collected))
}

fn measure(entries: u64, dir: &std::path::Path) -> Result<Sizes> {
    let whale = Identity::from_seed(7);
    let path = dir.join(format!("state-{entries}.redb"));
    let store = Arc::new(StateDb::open(&path)?);
    let mut state = State::genesis(GenesisState {
        accounts: vec![(whale.node_id(), u64::MAX / 2)],
        validators: vec![whale.node_id()],
        ..GenesisState::default()
    })
    .with_store(store.clone());
    let c = state.commit()?;
    store.commit(&c, true)?;
    state.committed();
    let network = state.network();
    let mut nonce = 0u64;
    let mut sign = |credits: Vec<Credit>| {
        let tx = Transaction { signer: whale.node_id(), nonce, payload: Payload::TransferMany { credits } };
        nonce += 1;
        tx.sign(&whale, &network)
    };

    // Fill: `entries` accounts, FILL_PER_BLOCK a block.
    let t = Instant::now();
    let mut height = 0;
    let mut next = 0u64;
    while next < entries {
        let end = (next + FILL_PER_BLOCK as u64).min(entries);
        let txs: Vec<SignedTransaction> =
            (next..end).collect::<Vec<_>>().chunks(CREDITS).map(|c| sign(credits(c.iter().copied()))).collect();
        height += 1;
        block(&mut state, &store, height, &txs)?;
        // Fill blocks are large (FILL_PER_BLOCK entries): each is committed, so what the fill
        // holds in memory stays one block's, as a node's does.
        if !height.is_multiple_of(COMMIT_BLOCKS) {
            store.commit(&state.commit()?, false)?;
            state.committed();
        }
        next = end;
    }
    // Start the timed blocks at a commit boundary, from a durable state.
    store.flush()?;
    height = height.next_multiple_of(COMMIT_BLOCKS);
    let fill = t.elapsed();

    // The old design's cost at this size: the root from every entry.
    let rebuild = (entries <= 100_000)
        .then(|| {
            let t = Instant::now();
            let root = state.rebuilt_root();
            (t.elapsed(), root)
        })
        .map(|(d, root)| {
            ensure!(root == state.state_root(), "{entries}: the rebuilt root differs from the sealed one");
            Ok(d)
        })
        .transpose()?;

    // Timed blocks: 1,000 existing accounts each, spread over the whole state.
    let (mut apply, mut seal, mut commit, mut collect) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut trie_nodes = 0;
    let stride = (entries / CHANGES as u64).max(1);
    for b in 0..BLOCKS as u64 {
        let ids: Vec<u64> = (0..CHANGES as u64).map(|k| (k * stride + b * 7_919) % entries).collect();
        let txs: Vec<SignedTransaction> = ids.chunks(CREDITS).map(|c| sign(credits(c.iter().copied()))).collect();
        height += 1;
        let (a, s, c, l) = block(&mut state, &store, height, &txs)?;
        apply.push(a);
        seal.push(s);
        commit.push(c);
        collect.push(l);
        trie_nodes = trie_nodes.max(state.memory_trie_nodes());
    }
    // The flush a checkpoint does, timed and spread over the blocks between checkpoints.
    let t = Instant::now();
    store.flush()?;
    let flush = t.elapsed();
    let rss = rss_bytes();
    let rss_now = status_kib("VmRSS:");
    let root = state.state_root();
    drop(state);
    drop(store);

    // A restart: open the file afresh (no warm cache) and the state it holds.
    let t = Instant::now();
    let store = Arc::new(StateDb::open(&path)?);
    let reopened = State::open(store.clone())?.context("the store holds a state")?;
    let reopen = t.elapsed();
    ensure!(reopened.state_root() == root, "{entries}: the reopened state has another root");
    ensure!(reopened.account(&account(entries - 1)).balance_micro >= 1, "{entries}: the last account is missing");
    let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    drop(reopened);
    drop(store);
    let _ = std::fs::remove_file(&path);
    Ok(Sizes {
        entries,
        fill,
        apply,
        seal,
        commit,
        collect,
        flush,
        rebuild,
        file_bytes,
        rss_bytes: rss,
        rss_now_bytes: rss_now,
        trie_nodes,
        reopen,
    })
}

fn mean(d: &[Duration]) -> Duration {
    d.iter().sum::<Duration>() / d.len().max(1) as u32
}

fn max(d: &[Duration]) -> Duration {
    d.iter().copied().max().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The sizes measured: 10^3, 10^5, 10^6 and 10^7, up to `ARCHIPEL_BENCH_STATE_MAX` (10^6 by
/// default); `ARCHIPEL_BENCH_STATE_SIZES=1000,1000000` names them instead (quick A/B runs; 10^3,
/// the baseline of every ratio, must be one).
pub fn sizes() -> Result<Vec<u64>> {
    if let Ok(list) = std::env::var("ARCHIPEL_BENCH_STATE_SIZES") {
        let mut sizes = list
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .with_context(|| format!("ARCHIPEL_BENCH_STATE_SIZES: {v:?} is not a number of entries"))
            })
            .collect::<Result<Vec<_>>>()?;
        sizes.sort_unstable();
        sizes.dedup();
        ensure!(
            sizes.first() == Some(&1_000),
            "ARCHIPEL_BENCH_STATE_SIZES must include 1000 (the baseline of every ratio) and nothing smaller"
        );
        return Ok(sizes);
    }
    let max_entries: u64 = std::env::var("ARCHIPEL_BENCH_STATE_MAX")
        .ok()
        .map(|v| v.trim().parse().context("ARCHIPEL_BENCH_STATE_MAX must be a number of entries"))
        .transpose()?
        .unwrap_or(1_000_000);
    Ok([1_000, 100_000, 1_000_000, 10_000_000].into_iter().filter(|n| *n <= max_entries).collect())
}

/// Runs the benchmark and prints its table.
pub fn bench() -> Result<()> {
    let sizes = sizes()?;
    let dir = tempfile_dir()?;
    println!(
        "== bench state: a block of {CHANGES} changed accounts on the node's disk store, {BLOCKS} blocks per size"
    );
    let mut rows = Vec::new();
    for &n in &sizes {
        let r = measure(n, &dir)?;
        println!(
            "{n:>10} accounts: fill {:.1} s; per block mean/max: apply {} / {}, seal {} / {}, commit {} / {} \
             (under the chain lock {} / {}); flush {}; rebuild-all {}; file {:.1} MiB; peak RSS {:.0} MiB (now {:.0} MiB; trie nodes and bucket leaves in memory at most {}); reopen {}",
            r.fill.as_secs_f64(),
            ms(mean(&r.apply)),
            ms(max(&r.apply)),
            ms(mean(&r.seal)),
            ms(max(&r.seal)),
            ms(mean(&r.commit)),
            ms(max(&r.commit)),
            ms(mean(&r.collect)),
            ms(max(&r.collect)),
            ms(r.flush),
            r.rebuild.map_or("not run (linear in entries)".into(), ms),
            r.file_bytes as f64 / 1048576.0,
            r.rss_bytes as f64 / 1048576.0,
            r.rss_now_bytes as f64 / 1048576.0,
            r.trie_nodes,
            ms(r.reopen),
        );
        rows.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let base = &rows[0];
    // Per block: everything the state costs, the commits spread over the blocks they cover and
    // a checkpoint's flush over the blocks between checkpoints.
    let total = |r: &Sizes| {
        mean(&r.apply) + mean(&r.seal) + mean(&r.commit) + r.flush / archipel_consensus::chain::CHECKPOINT_BLOCKS as u32
    };
    println!("== summary (ratios against {} accounts, same run)", base.entries);
    for r in &rows[1..] {
        let ratio = total(r).as_secs_f64() / total(base).as_secs_f64();
        let goal = if r.entries == 1_000_000 {
            if ratio <= 1.2 { " (goal <= 1.2 at 10^6: met)" } else { " (goal <= 1.2 at 10^6: NOT met)" }
        } else {
            ""
        };
        println!(
            "{:>10} accounts: state cost per block {} vs {} = {ratio:.2}x{goal}; seal alone {:.2}x; RSS {:.0} MiB (goal <= 512); reopen {}",
            r.entries,
            ms(total(r)),
            ms(total(base)),
            mean(&r.seal).as_secs_f64() / mean(&base.seal).as_secs_f64(),
            r.rss_bytes as f64 / 1048576.0,
            ms(r.reopen),
        );
    }
    if let Some(r) = rows.iter().rev().find(|r| r.rebuild.is_some()) {
        let rebuild = r.rebuild.unwrap_or_default();
        println!(
            "before (root rebuilt from every entry each block): {} at {} accounts = {:.0}x this design's seal",
            ms(rebuild),
            r.entries,
            rebuild.as_secs_f64() / mean(&r.seal).as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("archipel-bench-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
