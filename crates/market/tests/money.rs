//! Money is conserved and each job pays exactly its majority, once, over random histories: jobs
//! posted, sealed bids right and wrong, reveals right and wrong, heartbeats, results (agreeing,
//! disagreeing or failed), cancellations and time passing, in any order. Refused steps change
//! nothing. The run counts how the jobs ended and checks that acceptance, refunds, cancellation
//! and failover to a standby all happened: a generator that never reaches them proves nothing.

mod common;

use archipel_market::job::MarketParams;
use archipel_market::rule::{commitment, result_commitment};
use archipel_market::{
    Accounts, Ended, Event, Job, JobLimits, JobSpec, MarketError, Micro, ObjectRef, Provider, Record, RunOutcome,
};
use archipel_types::{Geofence, NodeId};
use common::Book;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};

const TENANTS: u8 = 2;
const PROVIDERS: u8 = 6;
const PARAMS: MarketParams = MarketParams { lease_ttl_ms: 1_000 };

fn provider(i: u8) -> Provider {
    let regions = ["eu-de", "eu-fr", "us-east"];
    Provider {
        node: NodeId([i; 32]),
        // Providers 1 and 2 share an operator.
        operator: format!("op-{}", i.max(2)),
        region: regions[usize::from(i) % 3].parse().unwrap(),
        country: "DE".parse().unwrap(),
        jurisdiction: "DE".parse().unwrap(),
        record: Record { accepted: u32::from(i), penalized: u32::from(i % 2) },
    }
}

fn tenant(i: u8) -> NodeId {
    NodeId([100 + i; 32])
}

#[derive(Clone, Debug)]
enum Step {
    Post {
        tenant: u8,
        n: u8,
        max: Micro,
    },
    Commit {
        job: usize,
        p: u8,
        price: Micro,
        honest: bool,
    },
    /// Reveals the `p`-th sealed bid of the job's auction (its honest price, or `price`).
    Reveal {
        job: usize,
        p: usize,
        price: Micro,
    },
    /// The `p`-th active leaseholder beats; any provider when `p` is past them.
    Beat {
        job: usize,
        p: usize,
    },
    /// The `p`-th active leaseholder reports; any provider when `p` is past them.
    Result {
        job: usize,
        p: usize,
        output: u8,
    },
    Cancel {
        job: usize,
        by: u8,
    },
    Wait {
        ms: u64,
    },
    /// Providers `first..first + count` bid honestly on the job at `price` (each a commit).
    BidAll {
        job: usize,
        first: u8,
        count: u8,
        price: Micro,
    },
    /// Every honest sealed bid of the job's auction is revealed.
    RevealAll {
        job: usize,
    },
    /// Every sealed result of the job is revealed (as it was sealed).
    RevealResults {
        job: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let p = 1..=PROVIDERS;
    // Weighted so that histories get somewhere: bids, reveals and results are common, cancels rare.
    prop_oneof![
        2 => (0..TENANTS, prop_oneof![Just(1u8), Just(2), Just(3), Just(3)], 1u64..500)
            .prop_map(|(tenant, n, max)| Step::Post { tenant, n, max }),
        8 => (0usize..3, p.clone(), 1u64..600, proptest::bool::weighted(0.9))
            .prop_map(|(job, p, price, honest)| Step::Commit { job, p, price, honest }),
        8 => (0usize..3, 0usize..8, 1u64..600).prop_map(|(job, p, price)| Step::Reveal { job, p, price }),
        3 => (0usize..3, 0usize..4).prop_map(|(job, p)| Step::Beat { job, p }),
        8 => (0usize..3, 0usize..4, 0u8..4).prop_map(|(job, p, output)| Step::Result { job, p, output }),
        1 => (0usize..3, 0u8..8).prop_map(|(job, by)| Step::Cancel { job, by }),
        5 => (1u64..400).prop_map(|ms| Step::Wait { ms }),
        3 => (0usize..3, 1u8..=PROVIDERS, 1u8..=5, 1u64..300)
            .prop_map(|(job, first, count, price)| Step::BidAll { job, first, count, price }),
        3 => (0usize..3).prop_map(|job| Step::RevealAll { job }),
        6 => (0usize..3).prop_map(|job| Step::RevealResults { job }),
    ]
}

/// The `i`-th active leaseholder of `j`, or (past them) some provider.
fn holder(j: &Job, i: usize) -> NodeId {
    let active: Vec<NodeId> = j.active().map(|l| l.bid.provider.node).collect();
    active.get(i).copied().unwrap_or(NodeId([1 + (i % 6) as u8; 32]))
}

/// What the jobs hold or burned.
fn held(jobs: &[Job]) -> Micro {
    jobs.iter().map(|j| j.escrow_micro + j.bonds.values().sum::<Micro>() + j.burned_micro).sum()
}

fn spec(n: u8, max: Micro) -> JobSpec {
    let obj = ObjectRef { bucket: "b".into(), key: "k".into(), version: [0; 32], data_key: [0; 32] };
    JobSpec {
        module: obj.clone(),
        inputs: vec![obj],
        args: vec![],
        env: vec![],
        limits: JobLimits { memory_bytes: 1 << 20, cpu_ms: 1_000, wall_ms: 1_000, output_bytes: 1 << 20 },
        max_price_micro: max,
        geofence: Geofence::default(),
        redundancy: n,
        bid_window_ms: 300,
    }
}

/// How the jobs of every case ended, and what happened to them on the way.
#[derive(Default)]
struct Reached {
    accepted: AtomicUsize,
    refunded: AtomicUsize,
    cancelled: AtomicUsize,
    standby_took_over: AtomicUsize,
    failed_majority: AtomicUsize,
    outvoted: AtomicUsize,
}

fn count(c: &AtomicUsize) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn history(steps: Vec<Step>, reached: &Reached) -> Result<(), TestCaseError> {
    let mut book = Book::default();
    for t in 0..TENANTS {
        book.credit(&tenant(t), 2_000);
    }
    for p in 1..=PROVIDERS {
        book.credit(&NodeId([p; 32]), 300);
    }
    let total: Micro = book.0.values().sum();
    let mut jobs: Vec<Job> = Vec::new();
    // Every honest commit's price, to reveal it.
    let mut sealed: BTreeMap<(usize, u8, u32), Micro> = BTreeMap::new();
    // Every sealed result, to reveal it.
    let mut results: BTreeMap<(usize, NodeId), RunOutcome> = BTreeMap::new();
    let mut now = 0u64;
    // Every Paid event, per job.
    let mut paid: BTreeMap<usize, Vec<(NodeId, Micro)>> = BTreeMap::new();
    for s in steps {
        let before = (book.clone(), jobs.clone());
        // Each step's events, per job.
        let mut events: Vec<(usize, Vec<Event>)> = Vec::new();
        let mut refused = false;
        let mut on = |i: usize, r: Result<Vec<Event>, MarketError>, events: &mut Vec<(usize, Vec<Event>)>| match r {
            Ok(ev) => events.push((i, ev)),
            Err(_) => refused = true,
        };
        match s {
            Step::Post { tenant: t, n, max } => {
                let id = [jobs.len() as u8; 32];
                match Job::post(id, tenant(t), spec(n, max), now, &mut book) {
                    Ok((j, ev)) => {
                        jobs.push(j);
                        events.push((jobs.len() - 1, ev));
                    }
                    Err(_) => refused = true,
                }
            }
            Step::Commit { job, p, price, honest } => {
                if let Some(j) = jobs.get_mut(job) {
                    let round = j.auction.as_ref().map_or(0, |a| a.round);
                    let digest =
                        if honest { commitment(&j.id, &NodeId([p; 32]), round, price, &[p; 32]) } else { [9; 32] };
                    let r = j.commit(&NodeId([p; 32]), digest, now, &mut book).map(|()| vec![]);
                    if r.is_ok() && honest {
                        sealed.insert((job, p, round), price);
                    }
                    on(job, r, &mut events);
                }
            }
            Step::Reveal { job, p, price } => {
                if let Some(j) = jobs.get_mut(job) {
                    let round = j.auction.as_ref().map_or(0, |a| a.round);
                    let committed: Vec<u8> =
                        j.auction.as_ref().map(|a| a.commits.keys().map(|n| n.0[0]).collect()).unwrap_or_default();
                    let p = committed.get(p).copied().unwrap_or(1 + (p % 6) as u8);
                    let price = sealed.get(&(job, p, round)).copied().unwrap_or(price);
                    let r = j.reveal(&provider(p), price, &[p; 32], now).map(|()| vec![]);
                    on(job, r, &mut events);
                }
            }
            Step::Beat { job, p } => {
                if let Some(j) = jobs.get_mut(job) {
                    let p = holder(j, p);
                    let r = j.heartbeat(&p, now).map(|()| vec![]);
                    on(job, r, &mut events);
                }
            }
            Step::Result { job, p, output } => {
                if let Some(j) = jobs.get_mut(job) {
                    let p = holder(j, p);
                    let outcome = match output {
                        2 => RunOutcome::Failed { end: "exited:1".into() },
                        3 => RunOutcome::Failed { end: "cpu_limit".into() },
                        o => RunOutcome::Success { output: [o; 32] },
                    };
                    let digest = result_commitment(&j.id, &p, &outcome, &[7; 32]);
                    let r = j.commit_result(&p, digest, now).map(|()| vec![]);
                    if r.is_ok() {
                        results.insert((job, p), outcome);
                    }
                    on(job, r, &mut events);
                }
            }
            Step::RevealResults { job } => {
                if let Some(j) = jobs.get_mut(job) {
                    let sealed: Vec<NodeId> = j
                        .leases
                        .iter()
                        .filter(|l| l.sealed.is_some() && l.result.is_none())
                        .map(|l| l.bid.provider.node)
                        .collect();
                    for p in sealed {
                        if let Some(o) = results.get(&(job, p)) {
                            // Each reveal on its own: refused ones change nothing.
                            if let Ok(ev) = j.reveal_result(&p, o.clone(), &[7; 32], now, &mut book) {
                                events.push((job, ev));
                            }
                        }
                    }
                }
            }
            Step::BidAll { job, first, count, price } => {
                // Each commit on its own: refused ones change nothing, the others stand.
                for k in 0..count {
                    let p = 1 + (first + k - 1) % PROVIDERS;
                    if let Some(j) = jobs.get_mut(job) {
                        let round = j.auction.as_ref().map_or(0, |a| a.round);
                        let digest = commitment(&j.id, &NodeId([p; 32]), round, price, &[p; 32]);
                        if j.commit(&NodeId([p; 32]), digest, now, &mut book).is_ok() {
                            sealed.insert((job, p, round), price);
                        }
                    }
                }
            }
            Step::RevealAll { job } => {
                if let Some(j) = jobs.get_mut(job) {
                    let round = j.auction.as_ref().map_or(0, |a| a.round);
                    let committed: Vec<u8> =
                        j.auction.as_ref().map(|a| a.commits.keys().map(|n| n.0[0]).collect()).unwrap_or_default();
                    for p in committed {
                        if let Some(price) = sealed.get(&(job, p, round)) {
                            let _ = j.reveal(&provider(p), *price, &[p; 32], now);
                        }
                    }
                }
            }
            Step::Cancel { job, by } => {
                if let Some(j) = jobs.get_mut(job) {
                    let r = j.cancel(&tenant(by), now, &mut book);
                    on(job, r, &mut events);
                }
            }
            Step::Wait { ms } => {
                now += ms;
                for (i, j) in jobs.iter_mut().enumerate() {
                    // The ledger ticks a job only once it is due: before, a tick changes
                    // nothing; at or after, something.
                    let due = j.next_due_ms(&PARAMS);
                    if due.is_none_or(|d| d > now) {
                        let (copy, was) = (j.clone(), book.clone());
                        let ev = j.tick(now, &PARAMS, &mut book);
                        prop_assert!(ev.is_empty() && *j == copy && book == was, "ticked before due {due:?}");
                        continue;
                    }
                    let copy = j.clone();
                    events.push((i, j.tick(now, &PARAMS, &mut book)));
                    prop_assert!(*j != copy, "due at {due:?} and nothing changed at {now}");
                }
            }
        }
        if refused {
            prop_assert_eq!((&book, &jobs), (&before.0, &before.1), "a refused step changed something");
        }
        for (i, ev) in &events {
            let lapsed = ev.iter().any(|e| matches!(e, Event::Penalized { why: "lapsed", .. }));
            let reopened = ev.iter().any(|e| matches!(e, Event::Reopened { .. }));
            if lapsed && !reopened && ev.iter().any(|e| matches!(e, Event::Awarded { .. })) {
                count(&reached.standby_took_over);
            }
            for e in ev {
                if matches!(e, Event::Penalized { why: "outvoted", .. }) {
                    count(&reached.outvoted);
                }
                match e {
                    Event::Paid { provider, amount_micro } => {
                        paid.entry(*i).or_default().push((*provider, *amount_micro))
                    }
                    Event::Ended(Ended::Accepted { outcome, .. }) => {
                        count(&reached.accepted);
                        // Exactly the leases whose result is the majority's, each its own bid, once.
                        let want: BTreeSet<(NodeId, Micro)> = jobs[*i]
                            .leases
                            .iter()
                            .filter(|l| l.result.as_ref() == Some(outcome))
                            .map(|l| (l.bid.provider.node, l.bid.price_micro))
                            .collect();
                        let got = paid.get(i).cloned().unwrap_or_default();
                        prop_assert_eq!(got.len(), want.len(), "each paid once");
                        prop_assert_eq!(&got.into_iter().collect::<BTreeSet<_>>(), &want);
                        prop_assert!(want.len() > usize::from(jobs[*i].spec.redundancy) / 2, "a majority");
                    }
                    Event::Ended(Ended::Refunded { why, .. }) => {
                        count(&reached.refunded);
                        if why.contains("failed") {
                            count(&reached.failed_majority);
                        }
                        prop_assert!(!paid.contains_key(i), "a refunded job paid someone");
                    }
                    Event::Ended(Ended::Cancelled { .. }) => {
                        count(&reached.cancelled);
                        prop_assert!(!paid.contains_key(i), "a cancelled job paid someone");
                    }
                    _ => {}
                }
            }
        }
        let now_total: Micro = book.0.values().sum::<Micro>() + held(&jobs);
        prop_assert_eq!(now_total, total, "money conserved");
        for j in &jobs {
            prop_assert!(j.paid.len() <= usize::from(j.spec.redundancy));
            if j.ended.is_some() {
                prop_assert_eq!(j.escrow_micro + j.bonds.values().sum::<Micro>(), 0, "an ended job holds nothing");
            }
            // One node, one lease per run; leases of a run never share an operator.
            let nodes: BTreeSet<NodeId> = j.leases.iter().map(|l| l.bid.provider.node).collect();
            prop_assert_eq!(nodes.len(), j.leases.len());
            let ops: BTreeSet<&str> = j.leases.iter().map(|l| l.bid.provider.operator.as_str()).collect();
            prop_assert_eq!(ops.len(), j.leases.len());
        }
    }
    Ok(())
}

#[test]
fn money_is_conserved_and_each_job_pays_its_majority_once() {
    let reached = Reached::default();
    // A fixed seed: the reach counts below are then the same every run (set PROPTEST_RNG_SEED
    // to explore others; the properties must hold for every seed, the counts are this one's).
    const SEED: u64 = 20_261_127;
    let seed = std::env::var("PROPTEST_RNG_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(SEED);
    let mut runner = TestRunner::new(Config { cases: 6_000, rng_seed: RngSeed::Fixed(seed), ..Config::default() });
    let strategy = proptest::collection::vec(step(), 1..150);
    if let Err(e) = runner.run(&strategy, |steps| history(steps, &reached)) {
        panic!("{e}");
    }
    let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    let (a, r, c, s, f, o) = (
        n(&reached.accepted),
        n(&reached.refunded),
        n(&reached.cancelled),
        n(&reached.standby_took_over),
        n(&reached.failed_majority),
        n(&reached.outvoted),
    );
    println!("accepted {a}, refunded {r} (failed majority {f}), cancelled {c}, standby took over {s}, outvoted {o}");
    assert!(
        // (A majority of `cpu_limit` runs first runs again elsewhere, so fewer end refunded.)
        seed != SEED || (a >= 30 && r >= 15 && c >= 100 && s >= 40 && f >= 15 && o >= 1),
        "the histories reach too little: {a} {r} {c} {s} {f} {o}"
    );
}
