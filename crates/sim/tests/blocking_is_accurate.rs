//! Invariant: a node blocks a peer only for misbehaviour. Honest nodes never block one another
//! (not for being partitioned, slow or lossy), and every honest validator blocks an equivocating
//! validator, whose conflicting votes it receives.

use archipel_sim::ledger::{Byzantine, LedgerOutcome, VALIDATORS, check_ledger_seeds};

fn accurate(o: &LedgerOutcome) -> Result<(), String> {
    let honest = |i: usize| o.nodes[i].honest;
    if let Some((a, b)) = o.blocked.iter().find(|(a, b)| honest(*a) && honest(*b)) {
        return Err(format!("honest node {a} blocked honest node {b}"));
    }
    if let Some((byz, Byzantine::Equivocates)) = o.scenario.byzantine {
        for v in (0..VALIDATORS).filter(|v| *v != byz) {
            if !o.blocked.contains(&(v, byz)) {
                return Err(format!("validator {v} never blocked the equivocator {byz}"));
            }
        }
    }
    Ok(())
}

#[test]
fn only_misbehaving_peers_are_blocked() {
    check_ledger_seeds(
        "blocking_is_accurate",
        0..12,
        |s| {
            // Every other seed has an equivocator; the rest keep their drawn Byzantine validator.
            if s.seed % 2 == 0 {
                let v = (s.seed / 2 % 4) as usize;
                Some(s.with_byzantine(Some((v, Byzantine::Equivocates))))
            } else {
                Some(s)
            }
        },
        accurate,
    );
}
