//! Determinism: the same seed gives the same trace, a different seed a different one.

use archipel_sim::{Scenario, run, seeds};

#[test]
fn a_seed_replays_to_the_same_trace() {
    for seed in seeds(0..5) {
        let a = run(Scenario::from_seed(seed));
        let b = run(Scenario::from_seed(seed));
        assert!(!a.trace.is_empty(), "seed {seed}: empty trace");
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "seed {seed} is not deterministic; replay: ARCHIPEL_SIM_SEED={seed} cargo test -p archipel-sim --test same_seed_same_trace"
        );
        assert_eq!(a.trace, b.trace);
    }
}

#[test]
fn different_seeds_give_different_traces() {
    let a = run(Scenario::from_seed(1));
    let b = run(Scenario::from_seed(2));
    assert_ne!(a.trace_hash, b.trace_hash);
}
