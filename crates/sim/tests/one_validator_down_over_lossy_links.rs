//! Invariant: with one of the four validators stopped, the other three keep finalizing over
//! lossy links (90 % of messages delivered, the worst the scenarios draw) — every view then
//! needs all three, and a proposal reaches each of them once, so losses cost views, and the chain
//! slows (about 0.5–2 blocks per second here against 2–4 before the stop) but never stops.
//!
//! The journal-loss simulation (`lost_journal_never_votes_twice`) runs over lossless links; this
//! is the case it leaves out: a validator silent (stopped, or waiting at its vote gate) and loss.

use archipel_sim::ledger::{LedgerScenario, NodeRun, VALIDATORS, run_ledger};
use std::time::Duration;

/// When validator 0 stops.
const STOP_AT: Duration = Duration::from_secs(4);
/// How long the three others run after it.
const AFTER: Duration = Duration::from_secs(16);
/// Blocks they must finalize in that time (the slowest seed of 0..12 made 8).
const MIN_BLOCKS: u64 = 5;

/// `node`'s finalized height at virtual `ms`, as sampled.
fn height_at(node: &NodeRun, ms: u64) -> u64 {
    node.heads.iter().filter(|(at, _)| *at <= ms).map(|(_, h)| *h).max().unwrap_or(0)
}

#[test]
fn three_validators_keep_finalizing_over_lossy_links() {
    for seed in archipel_sim::seeds(0..8) {
        let mut sc = LedgerScenario::from_seed(seed);
        sc.partition = None;
        sc.degradation = None;
        sc.byzantine = None;
        sc.delivery_percent = 90;
        sc.stopped = Some((0, STOP_AT));
        sc.duration = STOP_AT + AFTER;
        sc.transfers_until = sc.duration;
        sc.head_samples = Some(Duration::from_millis(250));
        let o = run_ledger(sc);
        let (from, to) = (STOP_AT.as_millis() as u64, (STOP_AT + AFTER).as_millis() as u64);
        for n in o.nodes.iter().filter(|n| n.validator && n.index != 0) {
            let (at_stop, at_end) = (height_at(n, from), height_at(n, to));
            assert!(
                at_end >= at_stop + MIN_BLOCKS,
                "seed {seed}: validator {} of {VALIDATORS} finalized {} blocks in the {} s after validator 0 stopped (from {at_stop}); replay: ARCHIPEL_SIM_SEED={seed} cargo test -p archipel-sim --test one_validator_down_over_lossy_links",
                n.index,
                at_end - at_stop,
                AFTER.as_secs()
            );
        }
    }
}
