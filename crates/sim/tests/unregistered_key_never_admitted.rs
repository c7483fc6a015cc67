//! Invariant: a key that is not registered in genesis is never admitted: it never appears in an
//! honest node's table, is never seen up, and forged descriptors relayed by a Byzantine member
//! never replace genuine ones.

use archipel_sim::{Scenario, check_seeds, run};

#[test]
fn unregistered_key_is_never_admitted() {
    check_seeds("unregistered_key_never_admitted", 0..40, |o| {
        for (i, t) in o.final_tables.iter().enumerate() {
            if t.members.contains(&o.intruder) || t.up.contains(&o.intruder) {
                return Err(format!("node {i} admitted the unregistered key {}", o.intruder.short()));
            }
        }
        for e in &o.trace {
            if e.peer == Some(o.intruder) && e.what.starts_with("status") {
                return Err(format!("node {} changed the intruder's status at {} ms", e.node, e.at_ms));
            }
        }
        Ok(())
    });
}

#[test]
fn forged_descriptors_from_a_byzantine_member_are_rejected() {
    // Seeds whose scenario has a Byzantine member; at least one must exist in the range.
    let mut checked = 0;
    for seed in archipel_sim::seeds(0..40) {
        let scenario = Scenario::from_seed(seed);
        if !scenario.byzantine_member {
            continue;
        }
        checked += 1;
        let o = run(scenario);
        let byz = o.byzantine.expect("scenario has a Byzantine member");
        let rejected = o.trace.iter().filter(|e| e.peer == Some(byz) && e.what.starts_with("rejected")).count();
        assert!(
            rejected > 0,
            "seed {seed}: no forged descriptor was rejected; replay: ARCHIPEL_SIM_SEED={seed} cargo test -p archipel-sim --test unregistered_key_never_admitted"
        );
        let first = &o.final_tables[0];
        assert!(
            o.final_tables.iter().all(|t| t.digest == first.digest),
            "seed {seed}: forged descriptors split the honest tables; replay: ARCHIPEL_SIM_SEED={seed} cargo test -p archipel-sim --test unregistered_key_never_admitted"
        );
    }
    assert!(checked > 0 || std::env::var("ARCHIPEL_SIM_SEED").is_ok(), "no seed in range had a Byzantine member");
}
