//! An idle chain is cheap: with nothing to order, a leader waits `IDLE_WAIT` for a transaction
//! before proposing an empty block, so the network makes about two blocks a second — each block
//! costs every node its archive writes and syncs — and never stands still (block time moves on,
//! the next leader gets its turn). Checked on the finalized chain of honest runs without faults or
//! transfers, after the first leases came up.

use archipel_consensus::app::IDLE_WAIT;
use archipel_sim::ledger::{LedgerOutcome, check_ledger_seeds};
use std::time::Duration;

/// Virtual time of each run.
const RUN: Duration = Duration::from_secs(24);
/// The nodes' first leases come up (liveness changes go into blocks at once) before this.
const WARM_UP_MS: u64 = 6_000;
/// Two empty blocks a second at most: what the idle network's cost is measured at (`cargo xtask
/// bench devnet`; at four a second the 12-node devnet used about a fifth more CPU).
const MIN_IDLE_GAP_MS: u64 = 500;
/// The longest a gap between two idle blocks may be: the wait, then the four link delays of a
/// view (the block out, votes back, the certificate out, the next leader in), each at most the
/// scenario's latency plus three deviations, and 100 ms of scheduling.
fn max_gap_ms(o: &LedgerOutcome) -> u64 {
    let link = o.scenario.latency + o.scenario.jitter * 3;
    (IDLE_WAIT + link * 4).as_millis() as u64 + 100
}

fn idle_rhythm(o: &LedgerOutcome) -> Result<(), String> {
    let longest = o.honest().max_by_key(|n| n.chain.len()).map(|n| n.blocks()).unwrap_or_default();
    let idle: Vec<_> = longest.iter().filter(|b| b.header.timestamp_ms >= WARM_UP_MS).collect();
    if let Some(b) = idle.iter().find(|b| !b.txs.is_empty() || !b.liveness.is_empty()) {
        return Err(format!(
            "block {} at {} ms is not empty: the run is not idle",
            b.header.height, b.header.timestamp_ms
        ));
    }
    let span = RUN.as_millis() as u64 - WARM_UP_MS;
    let max_gap = max_gap_ms(o);
    for pair in idle.windows(2) {
        let gap = pair[1].header.timestamp_ms - pair[0].header.timestamp_ms;
        if gap < IDLE_WAIT.as_millis() as u64 || gap < MIN_IDLE_GAP_MS {
            return Err(format!(
                "blocks {} and {} only {gap} ms apart on an idle chain",
                pair[0].header.height, pair[1].header.height
            ));
        }
        if gap > max_gap {
            return Err(format!("the idle chain stood still {gap} ms after block {}", pair[0].header.height));
        }
    }
    // Nor before the first idle block, nor after the last (the run ends at `RUN`; a block is final
    // a view's latencies after its time).
    let (first, last) = match (idle.first(), idle.last()) {
        (Some(f), Some(l)) => (f.header.timestamp_ms, l.header.timestamp_ms),
        _ => return Err(format!("no block after {WARM_UP_MS} ms")),
    };
    if first - WARM_UP_MS > max_gap || (RUN.as_millis() as u64).saturating_sub(last) > 2 * max_gap {
        return Err(format!("idle blocks only from {first} to {last} ms of {span} ms after warm-up"));
    }
    if (idle.len() as u64) < span / max_gap {
        return Err(format!("only {} blocks in {span} ms", idle.len()));
    }
    Ok(())
}

#[test]
fn an_idle_chain_waits_its_idle_wait_between_empty_blocks_and_never_stands_still() {
    check_ledger_seeds(
        "idle_chain_rhythm",
        0..4,
        |sc| {
            let mut sc = sc.quiet();
            sc.duration = RUN;
            Some(sc)
        },
        idle_rhythm,
    );
}
