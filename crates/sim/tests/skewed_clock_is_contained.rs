//! Invariant: one validator whose wall clock is 4 s off (ahead in one test, behind in the other)
//! neither expires a lease nor freezes or drags block time. With every other node heartbeating
//! and one follower stopped for good halfway through:
//! - no node that kept heartbeating is ever marked Down in finalized state: its only change is its
//!   first Up (registered nodes start Down), finalized within [`WARM_UP`];
//! - the chain keeps finalizing, through the views the skewed validator leads;
//! - block time never goes back, is never further ahead of the honest clocks than
//!   `max_clock_drift_ms` when its block is finalized, and never lags them by more than
//!   [`MAX_LAG_MS`];
//! - the stopped follower goes Down within `lease_ttl` plus [`DOWN_MARGIN_MS`] of its stop.
//!
//! The honest validators' clocks are the runtime's time, called real time below. A validator 4 s
//! ahead proposes blocks the others refuse (too far in the future), so its views fail; one 4 s
//! behind refuses every other validator's block (too far in *its* future), so it votes for
//! nothing and the three others are exactly a quorum. Either way it spends the network's one
//! fault: links lose nothing here, since loss on top of it is a second fault (liveness then
//! waits for retries, as with a crashed validator — `liveness_after_healing` covers that).

use archipel_ledger::{Block, LivenessChange};
use archipel_sim::disk::ClockOffset;
use archipel_sim::ledger::{LedgerOutcome, LedgerScenario, NodeRun, VALIDATORS, check_ledger_seeds};
use std::time::Duration;

/// How far the skewed validator's clock is off.
const SKEW: Duration = Duration::from_secs(4);
/// Virtual time of each run.
const RUN: Duration = Duration::from_secs(40);
/// When the second follower stops.
const STOP_AT: Duration = Duration::from_secs(20);
/// How often every node's finalized height is sampled (the resolution of "when finalized").
const SAMPLE: Duration = Duration::from_millis(50);
/// Two leases: a tracker proposes and accepts no Down in its first lease, and a first Up may be
/// refused by a validator that has not heard the node yet, then wait for a view the skewed
/// validator leads to pass. Progress and block time are checked from here on.
const WARM_UP: Duration = Duration::from_secs(4);
/// The most real time may run ahead of the finalized head's block time: a view the skewed
/// validator leads fails (the others wait out the drift, refuse its block and give up on the view
/// after the 1.5 s certification timeout), the next leader may wait `IDLE_WAIT` (500 ms) for
/// something to propose, and its block needs a few link latencies (≤ 60 ms each) to be final.
/// Measured: at most 2.0 s over these seeds with a 250 ms `IDLE_WAIT` (transfers keep most
/// blocks from waiting it whole).
const MAX_LAG_MS: u64 = 2_500;
/// The longest the finalized height may stand still: one failed view, then a good one.
/// Measured: at most 1.65 s.
const MAX_GAP_MS: u64 = 2_500;
/// Beyond `lease_ttl` after the stop, by when the stopped follower's Down must be final. A leader
/// proposes it `lease_ttl` less `LIVENESS_RECHECK` after it last heard the follower (before the stop);
/// if that view is the skewed validator's, it fails and the Down waits for the next view (1.5 s);
/// then a few link latencies and a sample. Measured: at most 0.75 s.
const DOWN_MARGIN_MS: u64 = 2_000;
/// A skew just inside `max_clock_drift_ms` (1 s by default): the skewed validator's blocks are
/// accepted, so its views do not fail and block time may run that far ahead of the honest clocks.
const INSIDE_DRIFT: Duration = Duration::from_millis(900);
/// With no failed view, a Down is proposed `lease_ttl` less `LIVENESS_RECHECK` after the follower was
/// last heard (at or before its stop) and is final a few link latencies later: it must be final
/// within the TTL, plus a sample and latencies.
const DOWN_MARGIN_INSIDE_DRIFT_MS: u64 = 300;

fn scenario(mut sc: LedgerScenario, clock: ClockOffset) -> LedgerScenario {
    // The skew is the only fault.
    sc.partition = None;
    sc.degradation = None;
    sc.byzantine = None;
    sc.delivery_percent = 100;
    sc.followers = 2;
    sc.skewed_clock = Some(((sc.seed % VALIDATORS as u64) as usize, clock));
    sc.stopped = Some((VALIDATORS + 1, STOP_AT));
    sc.duration = RUN;
    sc.transfers_until = RUN;
    sc.head_samples = Some(SAMPLE);
    sc
}

fn name(o: &LedgerOutcome, i: usize) -> String {
    match o.scenario.skewed_clock {
        Some((s, c)) if s == i => format!("node {i} (clock {c:?})"),
        _ if o.scenario.stopped.is_some_and(|(s, _)| s == i) => format!("node {i} (stopped)"),
        _ => format!("node {i}"),
    }
}

/// When (real ms) some honest validator first held `height` finalized, as sampled; the end of
/// the run if none did before it ended.
fn finalized_at(o: &LedgerOutcome, honest: &[&NodeRun], height: u64) -> u64 {
    let first = honest.iter().filter_map(|n| n.heads.iter().find(|(_, h)| *h >= height).map(|(at, _)| *at)).min();
    first.unwrap_or(o.scenario.duration.as_millis() as u64)
}

/// [`contained_within`] with the margin for a skew beyond the drift (the skewed leader's views fail).
fn contained(o: &LedgerOutcome) -> Result<(), String> {
    contained_within(o, DOWN_MARGIN_MS)
}

/// The invariants, with the stopped follower's Down final within `lease_ttl + down_margin_ms`.
fn contained_within(o: &LedgerOutcome, down_margin_ms: u64) -> Result<(), String> {
    let params = o.genesis.params();
    let (ttl, drift) = (params.lease_ttl_ms, params.max_clock_drift_ms);
    let (Some((skewed, _)), Some((stopped, stop_at))) = (o.scenario.skewed_clock, o.scenario.stopped) else {
        return Err("the scenario has no skewed validator or no stopped node".into());
    };
    let (stop_ms, warm_ms) = (stop_at.as_millis() as u64, WARM_UP.as_millis() as u64);
    let run_ms = o.scenario.duration.as_millis() as u64;
    let honest: Vec<&NodeRun> = o.nodes.iter().filter(|n| n.validator && n.index != skewed).collect();
    let reference = honest.iter().max_by_key(|n| n.chain.len()).ok_or("no honest validator")?;
    let blocks: Vec<Block> = reference.blocks();
    let time_of = |height: u64| match height {
        0 => o.genesis.chain().timestamp_ms,
        h => blocks[h as usize - 1].header.timestamp_ms,
    };

    // 1. Leases.
    let mut first_up = vec![None; o.nodes.len()];
    let mut down_of_stopped = None;
    for b in &blocks {
        for c in &b.liveness {
            let i = o.nodes.iter().position(|n| n.id == c.node()).ok_or("a change for an unknown node")?;
            let height = b.header.height;
            match c {
                LivenessChange::Down { .. } if i == stopped => down_of_stopped = down_of_stopped.or(Some(height)),
                LivenessChange::Down { .. } => {
                    return Err(format!(
                        "{} kept heartbeating but was marked Down at height {height} (final at {} ms)",
                        name(o, i),
                        finalized_at(o, &honest, height)
                    ));
                }
                LivenessChange::Up { .. } if i == stopped && down_of_stopped.is_some() => {
                    return Err(format!("{} came Up again at height {height}", name(o, i)));
                }
                LivenessChange::Up { .. } if first_up[i].is_some() => {
                    return Err(format!("{} came Up twice without going Down (height {height})", name(o, i)));
                }
                LivenessChange::Up { .. } => first_up[i] = Some(height),
            }
        }
    }
    for (i, up) in first_up.iter().enumerate() {
        let at = up.map(|h| finalized_at(o, &honest, h));
        if at.is_none_or(|at| at > warm_ms) {
            return Err(format!(
                "{} heartbeats, but its first Up was final at {at:?} ms, after {warm_ms} ms",
                name(o, i)
            ));
        }
    }
    let down =
        down_of_stopped.ok_or_else(|| format!("{} stopped at {stop_ms} ms but never went Down", name(o, stopped)))?;
    let down_at = finalized_at(o, &honest, down);
    if down_at < stop_ms || down_at > stop_ms + ttl + down_margin_ms {
        return Err(format!(
            "{} stopped at {stop_ms} ms; its Down (height {down}) was final at {down_at} ms, not within {} ms",
            name(o, stopped),
            ttl + down_margin_ms
        ));
    }

    // 2. Progress: after the warm-up, the finalized height never stands still for long.
    let mut changes: Vec<(u64, u64)> = reference.heads.clone();
    changes.push((run_ms, u64::MAX));
    for pair in changes.windows(2) {
        let ((from, height), (to, _)) = (pair[0], pair[1]);
        if to > warm_ms && to - from.max(warm_ms) > MAX_GAP_MS {
            return Err(format!("node {}: stuck at height {height} from {from} ms to {to} ms", reference.index));
        }
    }

    // 3. Block time: never back; never more than the drift ahead of real time when final; and,
    //    just before each change of head and at the end, never more than MAX_LAG_MS behind.
    for pair in blocks.windows(2) {
        let (a, b) = (&pair[0].header, &pair[1].header);
        if b.timestamp_ms < a.timestamp_ms {
            return Err(format!(
                "block time goes back from {} ms to {} ms at height {}",
                a.timestamp_ms, b.timestamp_ms, b.height
            ));
        }
    }
    for b in &blocks {
        let at = finalized_at(o, &honest, b.header.height);
        if b.header.timestamp_ms > at + drift {
            return Err(format!(
                "block {} has time {} ms but was final at {at} ms real time: more than {drift} ms ahead",
                b.header.height, b.header.timestamp_ms
            ));
        }
    }
    for pair in changes.windows(2).filter(|p| p[1].0 > warm_ms) {
        let ((_, height), (at, _)) = (pair[0], pair[1]);
        let lag = at.saturating_sub(time_of(height));
        if lag > MAX_LAG_MS {
            return Err(format!(
                "at {at} ms real time the finalized head (height {height}) had block time {} ms: {lag} ms behind",
                time_of(height)
            ));
        }
    }
    Ok(())
}

#[test]
fn a_validator_4s_ahead_neither_expires_leases_nor_drags_block_time() {
    check_ledger_seeds("skewed_clock_is_contained", 0..5, |sc| Some(scenario(sc, ClockOffset::Ahead(SKEW))), contained);
}

#[test]
fn a_validator_4s_behind_neither_expires_leases_nor_freezes_block_time() {
    check_ledger_seeds(
        "skewed_clock_is_contained",
        0..5,
        |sc| Some(scenario(sc, ClockOffset::Behind(SKEW))),
        contained,
    );
}

#[test]
fn a_validator_just_inside_the_drift_ahead_is_accepted_and_still_contained() {
    check_ledger_seeds(
        "skewed_clock_is_contained",
        0..5,
        |sc| Some(scenario(sc, ClockOffset::Ahead(INSIDE_DRIFT))),
        |o| contained_within(o, DOWN_MARGIN_INSIDE_DRIFT_MS),
    );
}

#[test]
fn a_validator_just_inside_the_drift_behind_is_accepted_and_still_contained() {
    check_ledger_seeds(
        "skewed_clock_is_contained",
        0..5,
        |sc| Some(scenario(sc, ClockOffset::Behind(INSIDE_DRIFT))),
        |o| contained_within(o, DOWN_MARGIN_INSIDE_DRIFT_MS),
    );
}
