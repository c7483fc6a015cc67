//! Invariant: a lease means "the validators stopped hearing this node", never "consensus was
//! slow". Leader timeouts (an equivocating validator runs no engine, so its views time out), a
//! halted network (two halves without a quorum) and its healing never mark a node that kept
//! heartbeating Down in finalized state; a node cut off from every validator is marked Down by the
//! first block proposed a lease TTL after it was last heard, and Up again once it is heard.

use archipel_ledger::{Block, LivenessChange};
use archipel_sim::ledger::{Cut, LedgerOutcome, LedgerScenario, Partition, check_ledger_seeds};
use archipel_types::NodeId;
use std::time::Duration;

/// The simulation's lease TTL (the ledger's default).
const TTL_MS: u64 = 2_000;

/// Liveness changes of the longest honest chain, with their block's timestamp.
fn changes(o: &LedgerOutcome) -> Vec<(u64, LivenessChange)> {
    let longest = o.honest().max_by_key(|n| n.chain.len()).map(|n| n.blocks()).unwrap_or_default();
    longest.iter().flat_map(|b: &Block| b.liveness.iter().map(|c| (b.header.timestamp_ms, *c))).collect()
}

fn name(o: &LedgerOutcome, id: &NodeId) -> String {
    o.nodes.iter().find(|n| n.id == *id).map_or_else(|| id.short(), |n| format!("node {}", n.index))
}

fn never_down_while_heard(o: &LedgerOutcome) -> Result<(), String> {
    let engine: Vec<NodeId> = o.nodes.iter().filter(|n| n.runs_engine).map(|n| n.id).collect();
    let changes = changes(o);
    for n in o.nodes.iter().filter(|n| n.runs_engine) {
        if !changes.iter().any(|(_, c)| matches!(c, LivenessChange::Up { node, .. } if *node == n.id)) {
            return Err(format!("{} heartbeats but never came up", name(o, &n.id)));
        }
    }
    for (at, c) in &changes {
        match c {
            LivenessChange::Down { node } if engine.contains(node) => {
                return Err(format!("{} kept heartbeating but was marked down at {at} ms", name(o, node)));
            }
            LivenessChange::Up { node, .. } if !engine.contains(node) => {
                return Err(format!("{} never heartbeats but was marked up at {at} ms", name(o, node)));
            }
            _ => {}
        }
    }
    Ok(())
}

#[test]
fn leader_timeouts_and_halted_networks_never_expire_a_heartbeating_node() {
    check_ledger_seeds(
        "leases_follow_hearing",
        0..12,
        |mut sc: LedgerScenario| {
            // Loss heavy enough to silence a node for a lease is a real outage, not this test's.
            sc.degradation = None;
            if sc.partition.is_some_and(|p| p.cut != Cut::Halves) {
                sc.partition = None;
            }
            Some(sc)
        },
        never_down_while_heard,
    );
}

#[test]
fn a_node_cut_off_from_every_validator_goes_down_then_up() {
    let (from, until) = (Duration::from_secs(3), Duration::from_secs(9));
    check_ledger_seeds(
        "leases_follow_hearing",
        100..104,
        |mut sc: LedgerScenario| {
            sc.degradation = None;
            sc.byzantine = None;
            let victim = (sc.seed % 4) as usize;
            sc.partition = Some(Partition { cut: Cut::Isolate(victim), from, until });
            sc.duration = until + Duration::from_secs(10);
            sc.transfers_until = until + Duration::from_secs(1);
            Some(sc)
        },
        |o| {
            let Some(Partition { cut: Cut::Isolate(victim), .. }) = o.scenario.partition else {
                return Err("no isolated validator".into());
            };
            let victim = o.nodes[victim].id;
            let changes = changes(o);
            let down = changes.iter().find(|(_, c)| *c == LivenessChange::Down { node: victim });
            let Some((down_at, _)) = down else { return Err("the isolated validator never went down".into()) };
            // Heard last just before the cut (plus a link's latency): the first block proposed a
            // lease later must carry the Down, however long consensus took to get there.
            let due = from.as_millis() as u64 + TTL_MS + 300;
            let longest = o.honest().max_by_key(|n| n.chain.len()).map(|n| n.blocks()).unwrap_or_default();
            let first_due = longest.iter().map(|b| b.header.timestamp_ms).find(|t| *t >= due);
            if *down_at < from.as_millis() as u64 || first_due.is_some_and(|t| *down_at > t) {
                return Err(format!("down at {down_at} ms; the first block after {due} ms came at {first_due:?}"));
            }
            let back = changes.iter().any(|(at, c)| {
                matches!(c, LivenessChange::Up { node, .. } if *node == victim) && *at >= until.as_millis() as u64
            });
            if !back {
                return Err("the isolated validator did not come back up after healing".into());
            }
            let others = changes.iter().find(|(_, c)| matches!(c, LivenessChange::Down { node } if *node != victim));
            if let Some((at, c)) = others {
                return Err(format!(
                    "{} was marked down at {at} ms, though only the victim was cut off",
                    name(o, &c.node())
                ));
            }
            Ok(())
        },
    );
}
