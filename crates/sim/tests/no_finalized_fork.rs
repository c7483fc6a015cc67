//! Invariant: no two different blocks are ever finalized at one height, across every node that
//! runs consensus (honest validators, followers, and a validator that proposes invalid blocks),
//! whatever the partitions, delays and losses, with or without a Byzantine validator (one seed in
//! three has one that proposes invalid blocks, one in three an equivocator).
//!
//! The seed range is split over two tests so the two halves run in parallel.

use archipel_ledger::Hash;
use archipel_sim::ledger::{LedgerOutcome, check_ledger_seeds};
use std::collections::BTreeMap;
use std::time::Duration;

fn no_fork(o: &LedgerOutcome) -> Result<(), String> {
    let mut first: BTreeMap<u64, (Hash, usize)> = BTreeMap::new();
    for n in o.nodes.iter().filter(|n| n.runs_engine) {
        for (i, (block, _)) in n.chain.iter().enumerate() {
            let height = block.header.height;
            if height != i as u64 + 1 {
                return Err(format!("node {}: block {i} of its chain has height {height}", n.index));
            }
            let (hash, by) = *first.entry(height).or_insert((block.hash(), n.index));
            if hash != block.hash() {
                return Err(format!(
                    "fork at height {height}: node {by} finalized {} but node {} finalized {}",
                    hash.short(),
                    n.index,
                    block.hash().short()
                ));
            }
        }
    }
    if first.is_empty() {
        return Err("no node finalized any block: the run says nothing about forks".into());
    }
    Ok(())
}

/// Safety needs no liveness window: stop 5 s after the faults heal (enough for a couple of
/// views lost to message loss — 1 s leader and 1.5 s certification timeouts — and a good one, so
/// the run finalizes something to check).
fn short(mut s: archipel_sim::ledger::LedgerScenario) -> archipel_sim::ledger::LedgerScenario {
    s.duration = s.healed_at() + Duration::from_secs(5);
    s.transfers_until = s.transfers_until.min(s.duration);
    s
}

#[test]
fn no_finalized_fork_even_seeds() {
    check_ledger_seeds("no_finalized_fork", 0..100, |s| (s.seed % 2 == 0).then(|| short(s)), no_fork);
}

#[test]
fn no_finalized_fork_odd_seeds() {
    check_ledger_seeds("no_finalized_fork", 0..100, |s| (s.seed % 2 == 1).then(|| short(s)), no_fork);
}
