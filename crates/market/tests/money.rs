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
    earlier_paid: AtomicUsize,
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
                    // Only a majority that finished the job contradicts a limit claim.
                    let ended = ev.iter().find_map(|e| if let Event::Ended(x) = e { Some(x) } else { None });
                    prop_assert!(
                        matches!(ended, Some(Ended::Accepted { outcome: RunOutcome::Success { .. }, .. })),
                        "a limit claim burned by {ended:?}"
                    );
                }
                match e {
                    Event::Paid { provider, amount_micro } => {
                        paid.entry(*i).or_default().push((*provider, *amount_micro))
                    }
                    Event::Ended(Ended::Accepted { outcome, .. }) => {
                        count(&reached.accepted);
                        // Exactly the leases whose result is the majority's, each its own bid, once;
                        // then earlier rounds' runs with that result while fewer than N are paid.
                        let agreeing = |leases: &[archipel_market::job::Lease]| -> BTreeSet<(NodeId, Micro)> {
                            leases
                                .iter()
                                .filter(|l| l.result.as_ref() == Some(outcome))
                                .map(|l| (l.bid.provider.node, l.bid.price_micro))
                                .collect()
                        };
                        let (want, earlier) = (agreeing(&jobs[*i].leases), agreeing(&jobs[*i].earlier));
                        let n = usize::from(jobs[*i].spec.redundancy);
                        let got: BTreeSet<(NodeId, Micro)> =
                            paid.get(i).cloned().unwrap_or_default().into_iter().collect();
                        prop_assert_eq!(got.len(), paid.get(i).map_or(0, Vec::len), "each paid once");
                        prop_assert!(want.is_subset(&got), "the majority paid: {:?} {:?}", want, got);
                        prop_assert!(got.difference(&want).all(|x| earlier.contains(x)));
                        prop_assert_eq!(got.len(), want.len() + earlier.len().min(n - want.len()));
                        prop_assert!(want.len() > n / 2, "a majority");
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
    println!(
        "accepted {a}, refunded {r} (failed majority {f}), cancelled {c}, standby took over {s}, outvoted {o} \
         (limit claims and earlier rounds: see the next property)"
    );
    assert!(
        // (A majority of `cpu_limit` runs first runs again elsewhere, so fewer end refunded.)
        seed != SEED || (a >= 30 && r >= 15 && c >= 100 && s >= 40 && f >= 15 && o >= 1),
        "the histories reach too little: {a} {r} {c} {s} {f} {o}"
    );
}

/// The outcome with more than `n / 2` of `results`, if any.
fn majority_of(results: &[(NodeId, RunOutcome)], n: u8) -> Option<RunOutcome> {
    let mut counts: BTreeMap<&RunOutcome, usize> = BTreeMap::new();
    for (_, o) in results {
        *counts.entry(o).or_default() += 1;
    }
    counts.into_iter().find(|(_, c)| *c > usize::from(n) / 2).map(|(o, _)| o.clone())
}

/// One job through up to three rounds of `n` fresh providers each, every run ending as its round
/// says (0 and 1: two different outputs, 2: the job's own failure, 3: its CPU limit, 4: its wall
/// limit, 5: a crashed runner); then whether it ended, and each provider's money, against the
/// rules, worked out here from the rounds alone.
fn limit_rounds(n: u8, rounds: &[Vec<u8>], reached: &Reached) -> Result<(), TestCaseError> {
    let mut book = Book::default();
    let tenant = tenant(0);
    book.credit(&tenant, 10_000);
    let (mut job, _) = Job::post([9; 32], tenant, spec(n, 100), 0, &mut book).unwrap();
    let mut total: Micro = book.0.values().sum::<Micro>() + held(std::slice::from_ref(&job));
    let (mut now, mut next) = (0, 10u8);
    let mut played: Vec<Vec<(NodeId, RunOutcome)>> = Vec::new();
    let (mut limit_checked, mut rerun_spent) = (false, false);
    let mut events = Vec::new();
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
                    3 => RunOutcome::Failed { end: "cpu_limit".into() },
                    4 => RunOutcome::Failed { end: "wall_limit".into() },
                    _ => RunOutcome::Failed { end: "crashed".into() },
                };
                (p.node, o)
            })
            .collect();
        for (p, o) in &outcomes {
            job.commit_result(p, result_commitment(&job.id, p, o, &[1; 32]), now).unwrap();
        }
        for (p, o) in &outcomes {
            events.extend(job.reveal_result(p, o.clone(), &[1; 32], now, &PARAMS, &mut book).unwrap());
        }
        // Whether the job ends here, by the rules: a majority decides unless it says more of the
        // machine than of the job (a limit, a crash) and no round has yet checked such a claim; no
        // majority runs the job once more, and refunds it the second time.
        let should_end = match majority_of(&outcomes, n) {
            Some(m) if m.depends_on_the_machine() && !limit_checked => {
                limit_checked = true;
                false
            }
            Some(_) => true,
            None if !rerun_spent => {
                rerun_spent = true;
                false
            }
            None => true,
        };
        played.push(outcomes);
        prop_assert_eq!(book.0.values().sum::<Micro>() + held(std::slice::from_ref(&job)), total, "money conserved");
        prop_assert_eq!(job.ended.is_some(), should_end, "after round {}: {:?}", played.len(), job.ended);
        if should_end {
            break;
        }
    }
    let Some(ended) = job.ended.clone() else { return Ok(()) };
    // The rules, from the rounds alone. The last round decides when it has a majority; an earlier
    // round whose majority hit a limit sent the job on, and its providers with that outcome are
    // its claimants.
    let (last, before) = played.split_last().unwrap();
    let decided = majority_of(last, n);
    let claimants: BTreeSet<NodeId> = before
        .iter()
        .filter_map(|r| majority_of(r, n).filter(RunOutcome::depends_on_the_machine).map(|m| (r, m)))
        .flat_map(|(r, m)| r.iter().filter(move |(_, o)| *o == m).map(|(p, _)| *p))
        .collect();
    // Paid: all of the deciding round's with its outcome, then earlier ones with it while fewer
    // than N are (which of them, when more are left, the winner rule's order says).
    let (mut now_paid, mut may_pay) = (BTreeSet::new(), BTreeSet::new());
    let mut want_burned = BTreeMap::new();
    if let Some(m) = &decided {
        // A result, or a CPU or wall limit (never a crash) confirmed: paid.
        let pays = match m {
            RunOutcome::Success { .. } => true,
            RunOutcome::Failed { end } => end == "cpu_limit" || end == "wall_limit",
        };
        prop_assert_eq!(matches!(ended, Ended::Accepted { .. }), pays, "{:?}", ended);
        for (i, (p, o)) in played.iter().enumerate().flat_map(|(i, r)| r.iter().map(move |x| (i, x))) {
            let deciding = i + 1 == played.len();
            if claimants.contains(p) && matches!(m, RunOutcome::Success { .. }) {
                // A limit or crash claim that sent the job on, and the job finished elsewhere.
                want_burned.insert(*p, "limit_contradicted");
            } else if o == m {
                if pays {
                    if deciding {
                        now_paid.insert(*p)
                    } else {
                        may_pay.insert(*p)
                    };
                }
            } else if deciding && !o.depends_on_the_machine() && !m.depends_on_the_machine() {
                // Outvoted in the deciding round; an earlier round's other runs get their bonds back.
                want_burned.insert(*p, "outvoted");
            }
        }
    } else {
        prop_assert!(matches!(ended, Ended::Refunded { .. }), "{:?}", ended);
    }
    let paid: Vec<NodeId> = events
        .iter()
        .filter_map(|e| if let Event::Paid { provider, .. } = e { Some(*provider) } else { None })
        .collect();
    let paid_now = paid.iter().take_while(|p| now_paid.contains(p)).count();
    prop_assert_eq!(paid_now, now_paid.len(), "the deciding round first: {:?}", paid);
    prop_assert!(paid[paid_now..].iter().all(|p| may_pay.contains(p)), "then earlier ones: {:?}", paid);
    prop_assert_eq!(paid.len(), now_paid.len() + may_pay.len().min(usize::from(n) - now_paid.len()));
    prop_assert_eq!(paid.iter().collect::<BTreeSet<_>>().len(), paid.len(), "once each");
    let want_paid = paid.clone();
    let burned: BTreeMap<NodeId, &str> = events
        .iter()
        .filter_map(|e| if let Event::Penalized { provider, why } = e { Some((*provider, *why)) } else { None })
        .collect();
    prop_assert_eq!(&burned, &want_burned);
    for (p, _) in played.iter().flatten() {
        let want = 1_000 + if want_paid.contains(p) { 10 } else { 0 } - if burned.contains_key(p) { 10 } else { 0 };
        prop_assert_eq!(book.of(p), want, "{:?} after {:?}", p, ended);
    }
    prop_assert_eq!(book.of(&tenant), 10_000 - 10 * want_paid.len() as Micro);
    if decided.as_ref().is_some_and(RunOutcome::is_a_limit) {
        count(&reached.limit_paid);
    }
    if want_burned.values().any(|w| *w == "limit_contradicted") {
        count(&reached.limit_contradicted);
    }
    if want_paid.iter().any(|p| !last.iter().any(|(q, _)| q == p)) {
        count(&reached.earlier_paid);
    }
    Ok(())
}

#[test]
fn limit_claims_are_paid_when_confirmed_and_burned_when_contradicted() {
    let reached = Reached::default();
    let mut runner =
        TestRunner::new(Config { cases: 2_000, rng_seed: RngSeed::Fixed(20_261_129), ..Config::default() });
    let ends = |n: u8| proptest::collection::vec(proptest::collection::vec(0u8..6, usize::from(n)), 1..=3);
    let strategy = (1u8..=3).prop_flat_map(move |n| (Just(n), ends(n)));
    if let Err(e) = runner.run(&strategy, |(n, rounds)| limit_rounds(n, &rounds, &reached)) {
        panic!("{e}");
    }
    let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    let (lp, lc, ep) = (n(&reached.limit_paid), n(&reached.limit_contradicted), n(&reached.earlier_paid));
    println!("a confirmed limit paid: {lp}, limit claims contradicted: {lc}, an earlier round's run paid: {ep}");
    assert!(lp >= 20 && lc >= 20 && ep >= 20, "the histories reach too little: {lp} {lc} {ep}");
}
