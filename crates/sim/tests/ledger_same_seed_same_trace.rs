//! Determinism of the ledger simulation: the same seed finalizes the same chains (blocks and
//! certificates) on every node and leaves the same runtime audit digest; another seed does not.

use archipel_sim::ledger::{LedgerScenario, run_ledger};
use archipel_sim::seeds;

#[test]
fn a_seed_replays_to_the_same_chains() {
    for seed in seeds(0..3) {
        let a = run_ledger(LedgerScenario::from_seed(seed));
        let b = run_ledger(LedgerScenario::from_seed(seed));
        let replay =
            format!("replay: ARCHIPEL_SIM_SEED={seed} cargo test -p archipel-sim --test ledger_same_seed_same_trace");
        assert!(a.nodes.iter().any(|n| !n.chain.is_empty()), "seed {seed}: nothing was finalized; {replay}");
        for (x, y) in a.nodes.iter().zip(&b.nodes) {
            assert_eq!(x.chain, y.chain, "seed {seed}: node {} finalized another chain; {replay}", x.index);
            assert_eq!((x.height_at_heal, x.height_after_window), (y.height_at_heal, y.height_after_window));
        }
        assert_eq!(a.submitted, b.submitted, "seed {seed}: {replay}");
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed} is not deterministic; {replay}");
    }
}

#[test]
fn different_seeds_give_different_chains() {
    let a = run_ledger(LedgerScenario::from_seed(1));
    let b = run_ledger(LedgerScenario::from_seed(2));
    assert_ne!(a.trace_hash, b.trace_hash);
}
