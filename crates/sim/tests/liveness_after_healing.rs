//! Invariant: once partitions, delays and heavy loss heal (links keep their base loss of up to
//! 10 %), consensus makes progress again: within `LIVENESS_WINDOW` every honest node (validators
//! and followers) finalizes `LIVENESS_BLOCKS` blocks past the highest height any honest node had
//! reached at healing, and every transfer the client submitted is final on every honest node by
//! the end of the run — with or without a Byzantine validator.

use archipel_ledger::Hash;
use archipel_sim::ledger::{LIVENESS_BLOCKS, LIVENESS_WINDOW, LedgerOutcome, check_ledger_seeds};
use std::collections::BTreeSet;

fn live(o: &LedgerOutcome) -> Result<(), String> {
    if let Some(r) = o.refused.first() {
        return Err(format!("a node refused a transfer of the client: {r}"));
    }
    let reached_at_heal = o.honest().map(|n| n.height_at_heal).max().unwrap_or(0);
    for n in o.honest() {
        if n.height_after_window < reached_at_heal + LIVENESS_BLOCKS {
            return Err(format!(
                "node {} is at height {} {:?} after healing ({} at the end); honest nodes had reached \
                 {reached_at_heal} at healing",
                n.index,
                n.height_after_window,
                LIVENESS_WINDOW,
                n.chain.len()
            ));
        }
    }
    for n in o.honest() {
        let included: BTreeSet<Hash> = n.chain.iter().flat_map(|(b, _)| b.txs.iter().map(|t| t.hash())).collect();
        if let Some(missing) = o.submitted.iter().find(|s| !included.contains(&s.hash)) {
            return Err(format!(
                "node {} (height {}): the transfer {} submitted to node {} at {} ms is not final",
                n.index,
                n.chain.len(),
                missing.hash.short(),
                missing.node,
                missing.at_ms
            ));
        }
    }
    Ok(())
}

#[test]
fn progress_resumes_and_transfers_become_final_after_healing() {
    check_ledger_seeds("liveness_after_healing", 0..24, Some, live);
}
