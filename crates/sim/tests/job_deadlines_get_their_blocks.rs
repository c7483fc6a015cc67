//! A job's deadlines get their blocks: when block time passes the end of an auction's commit phase
//! (with a sealed bid in) or of its reveal phase, an idle leader proposes then, instead of waiting
//! out its idle wait — so an award or a lapse is not held up by the idle rhythm. Checked on the
//! finalized chain of honest runs where a tenant posts jobs one after another and one node seals a
//! bid on each.

use archipel_consensus::app::{IDLE_WAIT, MIN_WAKE_GAP_MS};
use archipel_ledger::{Block, Payload};
use archipel_sim::jobs::JobScript;
use archipel_sim::ledger::{LedgerOutcome, check_ledger_seeds};
use std::time::Duration;

const SCRIPT: JobScript =
    JobScript { from: Duration::from_secs(6), count: 4, bid_window_ms: 700, pause: Duration::from_millis(300) };

/// How late a deadline's block may be: after the deadline (or [`MIN_WAKE_GAP_MS`] after the
/// block before it, whichever is later), the time for the next leader to learn of that block —
/// three link delays, each taken as the scenario's latency plus three deviations (the simulator
/// draws delays from a normal distribution, so a far tail could exceed it; each seed replays
/// exactly, so a seed that passes always does) — and 50 ms of scheduling. Far less than the idle
/// wait, so a chain that ignored the deadline would miss it whenever the deadline fell early in a
/// wait.
fn slack_ms(o: &LedgerOutcome) -> u64 {
    let link = o.scenario.latency + o.scenario.jitter * 3;
    (link * 3).as_millis() as u64 + 50
}

/// The block time of each posted job and of its first sealed bid.
fn jobs(blocks: &[Block]) -> Vec<(u64, Option<u64>)> {
    let mut out: Vec<(archipel_ledger::Hash, u64, Option<u64>)> = Vec::new();
    for b in blocks {
        for tx in &b.txs {
            match &tx.tx.payload {
                Payload::PostJob { .. } => {
                    out.push((archipel_ledger::jobs::job_id(&tx.tx.signer, tx.tx.nonce), b.header.timestamp_ms, None))
                }
                Payload::BidCommit { job, .. } => {
                    if let Some(j) = out.iter_mut().find(|(id, _, bid)| id == job && bid.is_none()) {
                        j.2 = Some(b.header.timestamp_ms);
                    }
                }
                _ => {}
            }
        }
    }
    out.into_iter().map(|(_, posted, bid)| (posted, bid)).collect()
}

fn deadlines_get_blocks(o: &LedgerOutcome) -> Result<(), String> {
    if !o.refused.is_empty() {
        return Err(format!("refused: {:?}", o.refused));
    }
    let blocks = o.honest().max_by_key(|n| n.chain.len()).map(|n| n.blocks()).unwrap_or_default();
    let posted = jobs(&blocks);
    if posted.len() != SCRIPT.count {
        return Err(format!("{} of {} jobs posted", posted.len(), SCRIPT.count));
    }
    let slack = slack_ms(o);
    let mut deadlines = Vec::new();
    for (j, (at, bid)) in posted.iter().enumerate() {
        let commit_end = at + SCRIPT.bid_window_ms;
        match bid {
            Some(t) if *t < commit_end => {}
            _ => return Err(format!("job {j} (posted at {at} ms) has no sealed bid before {commit_end} ms")),
        }
        for (what, deadline) in [("commit phase", commit_end), ("reveal phase", commit_end + SCRIPT.bid_window_ms)] {
            deadlines.push(deadline);
            let Some(i) = blocks.iter().position(|b| b.header.timestamp_ms >= deadline) else {
                return Err(format!("no block after job {j}'s {what} ended at {deadline} ms"));
            };
            let before = i.checked_sub(1).map_or(0, |p| blocks[p].header.timestamp_ms);
            let due = deadline.max(before + MIN_WAKE_GAP_MS);
            let t = blocks[i].header.timestamp_ms;
            if t > due + slack {
                return Err(format!(
                    "job {j}'s {what} ended at {deadline} ms; the block before was at {before} ms, the next at {t} ms: \
                     {} ms later than due ({due} ms, slack {slack} ms)",
                    t - due
                ));
            }
        }
    }
    // Nor early: an empty block comes an idle wait after its parent, unless it is the first past
    // a deadline, and then no sooner than the gap.
    for pair in blocks.windows(2) {
        let (parent, b) = (&pair[0].header, &pair[1]);
        let gap = b.header.timestamp_ms - parent.timestamp_ms;
        if !b.txs.is_empty() || !b.liveness.is_empty() || gap >= IDLE_WAIT.as_millis() as u64 {
            continue;
        }
        let first_past = deadlines.iter().any(|d| parent.timestamp_ms < *d && b.header.timestamp_ms >= *d);
        if !first_past || gap < MIN_WAKE_GAP_MS {
            return Err(format!(
                "empty block {} came {gap} ms after its parent, {}",
                b.header.height,
                if first_past { "closer than the gap" } else { "and no deadline fell between them" }
            ));
        }
    }
    Ok(())
}

#[test]
fn an_idle_chain_proposes_when_a_jobs_commit_or_reveal_phase_ends() {
    check_ledger_seeds(
        "job_deadlines_get_their_blocks",
        0..3,
        |sc| {
            let mut sc = sc.quiet();
            // Short links, so the slack stays well under the idle wait.
            sc.latency = sc.latency.min(Duration::from_millis(25));
            sc.jitter = sc.jitter.min(Duration::from_millis(5));
            let per_job = Duration::from_millis(3 * SCRIPT.bid_window_ms) + SCRIPT.pause;
            sc.duration = SCRIPT.from + per_job * SCRIPT.count as u32 + IDLE_WAIT * 4;
            sc.jobs = Some(SCRIPT);
            Some(sc)
        },
        deadlines_get_blocks,
    );
}
