//! Invariant: a validator that proposes blocks with a wrong state root never gets one finalized.
//! Every honest node's finalized chain replays offline from the genesis (`verify_chain`), every
//! block is proven final by a certificate of the validators (`verify_finality`), and honest
//! progress continues: every honest node finalizes blocks past the highest height any honest node
//! had reached when the faults healed.

use archipel_consensus::engine::verify_finality;
use archipel_ledger::verify_chain;
use archipel_sim::ledger::{Byzantine, LIVENESS_BLOCKS, LedgerOutcome, NodeRun, check_ledger_seeds};

/// Every certificate finalizes its own block. A block finalized only through a descendant (simplex
/// finalizes a block's ancestors with it) may carry an empty certificate: the next certified block
/// proves it, through the hash links `verify_chain` checks; the last blocks of a chain may still
/// wait for that descendant.
fn certified(o: &LedgerOutcome, n: &NodeRun) -> Result<(), String> {
    for (block, certificate) in n.chain.iter().filter(|(_, c)| !c.is_empty()) {
        let height = block.header.height;
        verify_finality(&o.consensus, &block.hash(), certificate)
            .map_err(|e| format!("node {}: the certificate of block {height} does not verify: {e}", n.index))?;
    }
    Ok(())
}

fn invalid_blocks_rejected(o: &LedgerOutcome) -> Result<(), String> {
    let reached_at_heal = o.honest().map(|n| n.height_at_heal).max().unwrap_or(0);
    for n in o.honest() {
        verify_chain(o.genesis.clone(), &n.blocks()).map_err(|e| format!("node {}: {e}", n.index))?;
        certified(o, n)?;
        let end = n.chain.len() as u64;
        if end < reached_at_heal + LIVENESS_BLOCKS {
            return Err(format!(
                "node {} stopped at height {end}; honest nodes had reached {reached_at_heal} when the faults healed",
                n.index
            ));
        }
    }
    Ok(())
}

#[test]
fn blocks_with_a_wrong_state_root_are_never_finalized() {
    check_ledger_seeds(
        "invalid_blocks_rejected",
        0..24,
        |s| {
            let validator = (s.seed % 4) as usize;
            Some(s.with_byzantine(Some((validator, Byzantine::ProposesInvalidBlocks))))
        },
        invalid_blocks_rejected,
    );
}
