//! Money is conserved and each job pays at most once per run slot, over random histories: jobs
//! posted, sealed bids right and wrong, reveals right and wrong, heartbeats, results (agreeing or
//! not), cancellations and time passing, in any order. Refused steps change nothing.

use archipel_market::job::MarketParams;
use archipel_market::rule::commitment;
use archipel_market::{
    Accounts, Ended, Event, Job, JobLimits, JobSpec, MarketError, Micro, ObjectRef, Provider, Record, RunOutcome,
};
use archipel_types::{Geofence, NodeId};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Default, Debug, Clone, PartialEq)]
struct Book(BTreeMap<NodeId, Micro>);

impl Accounts for Book {
    fn debit(&mut self, who: &NodeId, amount: Micro) -> Result<(), MarketError> {
        let b = self.0.entry(*who).or_default();
        if *b < amount {
            return Err(MarketError::Insufficient { need: amount });
        }
        *b -= amount;
        Ok(())
    }
    fn credit(&mut self, who: &NodeId, amount: Micro) {
        *self.0.entry(*who).or_default() += amount;
    }
}

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
}

fn step() -> impl Strategy<Value = Step> {
    let p = 1..=PROVIDERS;
    prop_oneof![
        (0..TENANTS, 1u8..=4, 1u64..500).prop_map(|(tenant, n, max)| Step::Post { tenant, n, max }),
        (0usize..4, p.clone(), 1u64..600, any::<bool>()).prop_map(|(job, p, price, honest)| Step::Commit {
            job,
            p,
            price,
            honest
        }),
        (0usize..4, 0usize..8, 1u64..600).prop_map(|(job, p, price)| Step::Reveal { job, p, price }),
        (0usize..4, 0usize..6).prop_map(|(job, p)| Step::Beat { job, p }),
        (0usize..4, 0usize..6, 0u8..3).prop_map(|(job, p, output)| Step::Result { job, p, output }),
        (0usize..4, 0u8..3).prop_map(|(job, by)| Step::Cancel { job, by }),
        (1u64..700).prop_map(|ms| Step::Wait { ms }),
    ]
}

/// The `i`-th active leaseholder of `j`, or (past them) some provider.
fn holder(j: &Job, i: usize) -> NodeId {
    let active: Vec<NodeId> = j.active().map(|l| l.bid.provider.node).collect();
    active.get(i).copied().unwrap_or(NodeId([1 + (i % 6) as u8; 32]))
}

fn held(jobs: &[Job]) -> Micro {
    jobs.iter().map(|j| j.escrow_micro + j.bonds.values().sum::<Micro>()).sum()
}

fn spec(n: u8, max: Micro) -> JobSpec {
    let obj = ObjectRef { bucket: "b".into(), key: "k".into(), version: [0; 32] };
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn money_is_conserved_and_each_job_pays_at_most_once_per_slot(steps in proptest::collection::vec(step(), 1..120)) {
        let mut book = Book::default();
        for t in 0..TENANTS {
            book.credit(&tenant(t), 2_000);
        }
        for p in 1..=PROVIDERS {
            book.credit(&NodeId([p; 32]), 300);
        }
        let total: Micro = book.0.values().sum();
        let mut jobs: Vec<Job> = Vec::new();
        // Every commit's (price, salt), to reveal honestly.
        let mut sealed: BTreeMap<(usize, u8, u32), Micro> = BTreeMap::new();
        let mut now = 0u64;
        let mut paid_events: BTreeMap<usize, Vec<NodeId>> = BTreeMap::new();
        for s in steps {
            let before = (book.clone(), jobs.clone());
            let result: Result<Vec<Event>, MarketError> = match s {
                Step::Post { tenant: t, n, max } => {
                    let id = [jobs.len() as u8; 32];
                    Job::post(id, tenant(t), spec(n, max), now, &mut book).map(|(j, ev)| { jobs.push(j); ev })
                }
                Step::Commit { job, p, price, honest } => match jobs.get_mut(job) {
                    None => Ok(vec![]),
                    Some(j) => {
                        let round = j.auction.as_ref().map_or(0, |a| a.round);
                        let digest = if honest { commitment(&j.id, &NodeId([p; 32]), round, price, &[p; 32]) } else { [9; 32] };
                        let r = j.commit(&NodeId([p; 32]), digest, now, &mut book).map(|()| vec![]);
                        if r.is_ok() && honest {
                            sealed.insert((job, p, round), price);
                        }
                        r
                    }
                },
                Step::Reveal { job, p, price } => match jobs.get_mut(job) {
                    None => Ok(vec![]),
                    Some(j) => {
                        let round = j.auction.as_ref().map_or(0, |a| a.round);
                        let committed: Vec<u8> =
                            j.auction.as_ref().map(|a| a.commits.keys().map(|n| n.0[0]).collect()).unwrap_or_default();
                        let p = committed.get(p).copied().unwrap_or(1 + (p % 6) as u8);
                        let price = sealed.get(&(job, p, round)).copied().unwrap_or(price);
                        j.reveal(&provider(p), price, &[p; 32], now).map(|()| vec![])
                    }
                },
                Step::Beat { job, p } => match jobs.get_mut(job) {
                    None => Ok(vec![]),
                    Some(j) => {
                        let p = holder(j, p);
                        j.heartbeat(&p, now).map(|()| vec![])
                    }
                },
                Step::Result { job, p, output } => match jobs.get_mut(job) {
                    None => Ok(vec![]),
                    Some(j) => {
                        let p = holder(j, p);
                        j.result(&p, RunOutcome::Success { output: [output % 2; 32] }, now, &mut book)
                    }
                },
                Step::Cancel { job, by } => match jobs.get_mut(job) {
                    None => Ok(vec![]),
                    Some(j) => j.cancel(&tenant(by), now, &mut book),
                },
                Step::Wait { ms } => {
                    now += ms;
                    Ok(jobs.iter_mut().flat_map(|j| j.tick(now, &PARAMS, &mut book)).collect())
                }
            };
            match result {
                // A refused step changes nothing.
                Err(_) => prop_assert_eq!((&book, &jobs), (&before.0, &before.1)),
                Ok(events) => {
                    for e in &events {
                        if let Event::Paid { provider, .. } = e {
                            // Which job: the one whose paid set grew.
                            for (i, j) in jobs.iter().enumerate() {
                                let had = before.1.get(i).map_or(0, |b| b.paid.len());
                                if j.paid.len() > had && j.paid.contains(provider) {
                                    paid_events.entry(i).or_default().push(*provider);
                                }
                            }
                        }
                    }
                }
            }
            let now_total: Micro = book.0.values().sum::<Micro>() + held(&jobs);
            prop_assert_eq!(now_total, total, "money conserved");
            for (i, j) in jobs.iter().enumerate() {
                prop_assert!(j.paid.len() <= usize::from(j.spec.redundancy));
                if !j.paid.is_empty() {
                    prop_assert!(matches!(j.ended, Some(Ended::Accepted { .. })), "paid only when accepted");
                }
                if j.ended.is_some() {
                    prop_assert_eq!(held(std::slice::from_ref(j)), 0, "an ended job holds nothing");
                }
                // Active leases never share an operator.
                let ops: Vec<&str> = j.active().map(|l| l.bid.provider.operator.as_str()).collect();
                let distinct: BTreeSet<&&str> = ops.iter().collect();
                prop_assert_eq!(ops.len(), distinct.len());
                let paid = paid_events.get(&i).cloned().unwrap_or_default();
                let once: BTreeSet<&NodeId> = paid.iter().collect();
                prop_assert_eq!(once.len(), paid.len(), "a provider paid twice for one job");
            }
        }
    }
}
