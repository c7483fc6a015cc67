//! Attack: registered nodes that heartbeat to half the validators only. The validators that do
//! not hear such a node propose its `Down`, the others refuse it (they heard it within half a
//! lease), and the view fails. Four such nodes, two heard by validators 0 and 1, two by 2 and 3,
//! turned on one after the other, so that every validator has nodes it does not hear and their
//! silences start at different moments; then a follower dies.
//!
//! Invariants: no half-heard node is ever marked Down; the dead node is marked Down within a few
//! leases, however the refused Downs fall beside it; and the chain keeps at least 70 % of the
//! blocks per second it finalized before the attack, averaged over the half minute after it
//! starts (a validator retries a refused change alone and backs off, a lease doubling up to 32).

use archipel_ledger::{Block, LivenessChange};
use archipel_sim::ledger::{LedgerOutcome, LedgerScenario, VALIDATORS, check_ledger_seeds};
use std::time::Duration;

const TTL_MS: u64 = 2_000;
/// When the first node starts heartbeating to half the validators (the next ones every 500 ms).
const ATTACK_FROM: Duration = Duration::from_secs(4);
/// Half-heard followers (nodes `VALIDATORS..VALIDATORS + 4`).
const HALF_HEARD: usize = 4;
/// The follower that dies, and when.
const DEAD: usize = VALIDATORS + HALF_HEARD;
const DIES_AT: Duration = Duration::from_secs(12);
const END: Duration = Duration::from_secs(40);

fn longest(o: &LedgerOutcome) -> Vec<Block> {
    o.honest().max_by_key(|n| n.chain.len()).map(|n| n.blocks()).unwrap_or_default()
}

fn blocks_per_s(blocks: &[Block], from_ms: u64, until_ms: u64) -> f64 {
    let n = blocks.iter().filter(|b| (from_ms..until_ms).contains(&b.header.timestamp_ms)).count();
    n as f64 * 1_000.0 / (until_ms - from_ms) as f64
}

fn check(o: &LedgerOutcome) -> Result<(), String> {
    let blocks = longest(o);
    let changes: Vec<(u64, LivenessChange)> =
        blocks.iter().flat_map(|b| b.liveness.iter().map(|c| (b.header.timestamp_ms, *c))).collect();
    for k in 0..HALF_HEARD {
        let node = o.nodes[VALIDATORS + k].id;
        if let Some((at, _)) = changes.iter().find(|(_, c)| *c == LivenessChange::Down { node }) {
            return Err(format!("half-heard node {} was marked down at {at} ms", VALIDATORS + k));
        }
    }
    let dead = o.nodes[DEAD].id;
    let died = DIES_AT.as_millis() as u64;
    match changes.iter().find(|(_, c)| *c == LivenessChange::Down { node: dead }) {
        None => return Err("the dead follower was never marked down".into()),
        Some((at, _)) if *at > died + 3 * TTL_MS => {
            return Err(format!("the dead follower died at {died} ms and was marked down only at {at} ms"));
        }
        Some(_) => {}
    }
    let attack = ATTACK_FROM.as_millis() as u64;
    let before = blocks_per_s(&blocks, 1_000, attack);
    let during = blocks_per_s(&blocks, attack, attack + 30_000);
    eprintln!("seed {}: {before:.1} blocks/s before the attack, {during:.1} during it", o.scenario.seed);
    if during < 0.7 * before {
        return Err(format!("{during:.1} blocks/s during the attack against {before:.1} before it"));
    }
    Ok(())
}

#[test]
fn half_heard_nodes_never_go_down_and_cannot_stall_the_chain_or_shield_a_dead_node() {
    check_ledger_seeds(
        "half_heard_nodes_cost_little",
        0..3,
        |mut sc: LedgerScenario| {
            sc.partition = None;
            sc.degradation = None;
            sc.byzantine = None;
            sc.delivery_percent = 100;
            sc.followers = HALF_HEARD + 1;
            sc.half_heard = (0..HALF_HEARD)
                .map(|k| (VALIDATORS + k, ATTACK_FROM + Duration::from_millis(500 * k as u64)))
                .collect();
            sc.stopped = Some((DEAD, DIES_AT));
            sc.duration = END;
            sc.transfers_until = END - Duration::from_secs(4);
            Some(sc)
        },
        check,
    );
}
