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
    limit_paid: AtomicUsize,
    limit_contradicted: AtomicUsize,
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
                            if let Ok(ev) = j.reveal_result(&p, o.clone(), &[7; 32], now, &PARAMS, &mut book) {
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
                if matches!(e, Event::Penalized { why: "limit_contradicted", .. }) {
                    count(&reached.limit_contradicted);
                    // Only a majority that ran past the claimed limit contradicts it.
                    let ended = ev.iter().find_map(|e| if let Event::Ended(x) = e { Some(x) } else { None });
                    prop_assert!(
                        matches!(ended, Some(Ended::Accepted { outcome, .. }) if !outcome.depends_on_the_machine()),
                        "a limit claim burned by {ended:?}"
                    );
                }
                match e {
                    Event::Paid { provider, amount_micro } => {
                        paid.entry(*i).or_default().push((*provider, *amount_micro))
                    }
                    Event::Ended(Ended::Accepted { outcome, .. }) => {
                        count(&reached.accepted);
                        if outcome.is_a_limit() {
                            count(&reached.limit_paid);
                        }
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
    let (lp, lc) = (n(&reached.limit_paid), n(&reached.limit_contradicted));
    let (a, r, c, s, f, o) = (
        n(&reached.accepted),
        n(&reached.refunded),
        n(&reached.cancelled),
        n(&reached.standby_took_over),
        n(&reached.failed_majority),
        n(&reached.outvoted),
    );
    println!(
        "accepted {a} (a confirmed limit paid: {lp}), refunded {r} (failed majority {f}), cancelled {c}, \
         standby took over {s}, outvoted {o}, limit claims contradicted {lc}"
    );
    assert!(
        // (A majority of `cpu_limit` runs first runs again elsewhere, so fewer end refunded.)
        seed != SEED || (a >= 30 && r >= 15 && c >= 100 && s >= 40 && f >= 15 && o >= 1),
        "the histories reach too little: {a} {r} {c} {s} {f} {o} {lp} {lc}"
    );
}

/// One job through up to three rounds of `n` fresh providers each, every run ending as its round
/// says (0 and 1: two different outputs, 2: the job's own failure, 3: its CPU limit).
fn limit_rounds(n: u8, rounds: &[Vec<u8>], reached: &Reached) -> Result<(), TestCaseError> {
    let mut book = Book::default();
    let tenant = tenant(0);
    book.credit(&tenant, 10_000);
    let (mut job, _) = Job::post([9; 32], tenant, spec(n, 100), 0, &mut book).unwrap();
    let mut total: Micro = book.0.values().sum::<Micro>() + held(std::slice::from_ref(&job));
    let (mut now, mut next) = (0, 10u8);
    let mut paid = Vec::new();
    let mut claimants = BTreeSet::new();
    let mut penalized = Vec::new();
    for ends in rounds {
        let round = job.auction.as_ref().map(|a| a.round).expect("a round is open");
        let ps: Vec<Provider> =
            (0..n).map(|k| Provider { operator: format!("op-{}", next + k), ..provider(next + k) }).collect();
        next += n;
        for p in &ps {
            book.credit(&p.node, 1_000);
            total += 1_000;
            job.commit(&p.node, commitment(&job.id, &p.node, round, 10, &[p.node.0[0]; 32]), now, &mut book).unwrap();
        }
        now += 300;
        for p in &ps {
            job.reveal(p, 10, &[p.node.0[0]; 32], now).unwrap();
        }
        job.tick(now, &PARAMS, &mut book);
        prop_assert_eq!(job.active().count(), usize::from(n));
        now += 500;
        let outcomes: Vec<(NodeId, RunOutcome)> = ps
            .iter()
            .zip(ends)
            .map(|(p, e)| {
                let o = match e {
                    0 | 1 => RunOutcome::Success { output: [*e; 32] },
                    2 => RunOutcome::Failed { end: "exited:1".into() },
                    _ => RunOutcome::Failed { end: "cpu_limit".into() },
                };
                (p.node, o)
            })
            .collect();
        for (p, o) in &outcomes {
            job.commit_result(p, result_commitment(&job.id, p, o, &[1; 32]), now).unwrap();
        }
        claimants.extend(job.limit_claimants.iter().copied());
        for (p, o) in &outcomes {
            for e in job.reveal_result(p, o.clone(), &[1; 32], now, &PARAMS, &mut book).unwrap() {
                match e {
                    Event::Paid { provider, .. } => paid.push(provider),
                    Event::Penalized { provider, why: "limit_contradicted" } => penalized.push(provider),
                    _ => {}
                }
            }
        }
        claimants.extend(job.limit_claimants.iter().copied());
        prop_assert_eq!(book.0.values().sum::<Micro>() + held(std::slice::from_ref(&job)), total, "money conserved");
        if job.ended.is_some() {
            break;
        }
    }
    let Some(ended) = &job.ended else { return Ok(()) };
    let accepted = match ended {
        Ended::Accepted { outcome, .. } => Some(outcome),
        _ => None,
    };
    // A run is paid only when the job ends accepted with a result or a confirmed limit, and
    // only those of the deciding round agreeing with it.
    let deciding: BTreeSet<NodeId> = job
        .leases
        .iter()
        .filter(|l| accepted.is_some_and(|o| l.result.as_ref() == Some(o)))
        .map(|l| l.bid.provider.node)
        .collect();
    prop_assert_eq!(paid.iter().copied().collect::<BTreeSet<_>>(), deciding.clone());
    // Limit claims that sent the job on are burned exactly when the deciding round's majority
    // ran past them (it finished, or failed the job's own way).
    let mut counts: BTreeMap<&RunOutcome, usize> = BTreeMap::new();
    for r in job.leases.iter().filter_map(|l| l.result.as_ref()) {
        *counts.entry(r).or_default() += 1;
    }
    let majority = counts.into_iter().find(|(_, c)| *c > usize::from(n) / 2).map(|(o, _)| o);
    let contradicted = majority.is_some_and(|o| !o.depends_on_the_machine());
    let want: BTreeSet<NodeId> = if contradicted { claimants.clone() } else { BTreeSet::new() };
    prop_assert_eq!(penalized.iter().copied().collect::<BTreeSet<_>>(), want);
    for c in &claimants {
        let bond_back = if contradicted { 990 } else { 1_000 };
        prop_assert_eq!(book.of(c), bond_back, "claimant {:?} after {:?}", c, ended);
    }
    if accepted.is_some_and(RunOutcome::is_a_limit) {
        count(&reached.limit_paid);
    }
    if contradicted && !claimants.is_empty() {
        count(&reached.limit_contradicted);
    }
    Ok(())
}

#[test]
fn limit_claims_are_paid_when_confirmed_and_burned_when_contradicted() {
    let reached = Reached::default();
    let mut runner =
        TestRunner::new(Config { cases: 2_000, rng_seed: RngSeed::Fixed(20_261_129), ..Config::default() });
    let ends = |n: u8| proptest::collection::vec(proptest::collection::vec(0u8..4, usize::from(n)), 1..=3);
    let strategy = (1u8..=3).prop_flat_map(move |n| (Just(n), ends(n)));
    if let Err(e) = runner.run(&strategy, |(n, rounds)| limit_rounds(n, &rounds, &reached)) {
        panic!("{e}");
    }
    let (lp, lc) = (reached.limit_paid.load(Ordering::Relaxed), reached.limit_contradicted.load(Ordering::Relaxed));
    println!("a confirmed limit paid: {lp}, limit claims contradicted: {lc}");
    assert!(lp >= 20 && lc >= 20, "the histories reach too little: {lp} {lc}");
}
