//! Invariant: after every node loses power at once under load (every write not yet synced is
//! lost, and in some seeds the block logs lose durable blocks too), every node reopens its chain,
//! its applier is not stalled, it finalizes `PROGRESS_BLOCKS` blocks past the highest height any
//! node had reached before the crash (the node restarted late catches up), and nobody forks:
//! every node's chain extends what every node had finalized before the crash.

use archipel_sim::crash::{CrashOutcome, PROGRESS_BLOCKS, check_crash_seeds};

fn recovers(o: &CrashOutcome) -> Result<(), String> {
    let reached = o.nodes.iter().map(|n| n.before.len() as u64).max().unwrap_or(0);
    if reached == 0 {
        return Err(format!("only {reached} blocks before the crash: the scenario tests nothing"));
    }
    let longest = o.nodes.iter().map(|n| &n.after).max_by_key(|a| a.len()).cloned().unwrap_or_default();
    for n in &o.nodes {
        if let Some(s) = &n.stall {
            return Err(format!("node {}: the applier is stalled at height {}: {}", n.index, s.height, s.reason));
        }
        let height = n.after.len() as u64;
        if height < reached + PROGRESS_BLOCKS {
            return Err(format!(
                "node {} is at height {height} after the restart (its block log kept {}); nodes had reached \
                 {reached} before the crash",
                n.index, n.kept
            ));
        }
        if longest[..n.after.len()] != n.after[..] {
            return Err(format!("node {} forked from the longest chain after the restart", n.index));
        }
        for m in &o.nodes {
            if n.after[..m.before.len()] != m.before[..] {
                return Err(format!(
                    "node {} does not extend what node {} had finalized before the crash",
                    n.index, m.index
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn every_node_reopens_consistent_and_catches_up_after_a_power_loss() {
    check_crash_seeds("crash_recovers_consistent", 0..8, recovers);
}
