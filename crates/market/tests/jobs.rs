//! A job's life through the market's rules: awards, failover to a standing-by bid, majority
//! verification, penalties, refunds — each with the exact money it moves.

mod common;

use archipel_market::job::{MAX_ROUNDS, MarketParams};
use archipel_market::rule::{commitment, evaluate, pick, rank, result_commitment};
use archipel_market::{
    Accounts, Bid, Decline, Ended, Event, Job, JobLimits, JobSpec, MarketError, Micro, ObjectRef, Offer, Provider,
    Record, RunOutcome,
};
use archipel_types::{Geofence, NodeId};
use common::Book;
use std::collections::BTreeSet;

const PARAMS: MarketParams = MarketParams { lease_ttl_ms: 2_000 };
const TENANT: NodeId = NodeId([200; 32]);
const JOB: [u8; 32] = [7; 32];

fn provider(i: u8, operator: &str, region: &str) -> Provider {
    Provider {
        node: NodeId([i; 32]),
        operator: operator.into(),
        region: region.parse().unwrap(),
        country: if region.starts_with("eu") { "DE" } else { "US" }.parse().unwrap(),
        jurisdiction: if region.starts_with("eu") { "DE" } else { "US" }.parse().unwrap(),
        record: Record::default(),
    }
}

fn spec(n: u8, max: Micro) -> JobSpec {
    let obj = |k: &str| ObjectRef { bucket: "jobs".into(), key: k.into(), version: [1; 32], data_key: [2; 32] };
    JobSpec {
        module: obj("wc.wasm"),
        inputs: vec![obj("in.txt")],
        args: vec![],
        env: vec![],
        limits: JobLimits { memory_bytes: 64 << 20, cpu_ms: 10_000, wall_ms: 20_000, output_bytes: 1 << 20 },
        max_price_micro: max,
        geofence: Geofence::default(),
        redundancy: n,
        bid_window_ms: 500,
    }
}

fn salt(p: &Provider) -> [u8; 32] {
    [p.node.0[0] ^ 0x5a; 32]
}

/// Posts a job at t=0 and has `bids` (provider, price) commit at 100 and reveal at 600.
fn auction(n: u8, max: Micro, bids: &[(&Provider, Micro)], book: &mut Book) -> Job {
    book.credit(&TENANT, 1_000_000);
    for (p, _) in bids {
        book.credit(&p.node, 1_000);
    }
    let (mut job, _) = Job::post(JOB, TENANT, spec(n, max), 0, book).unwrap();
    for (p, price) in bids {
        job.commit(&p.node, commitment(&JOB, &p.node, 0, *price, &salt(p)), 100, book).unwrap();
    }
    for (p, price) in bids {
        job.reveal(p, *price, &salt(p), 600).unwrap();
    }
    job
}

fn awarded(events: &[Event]) -> Vec<NodeId> {
    events.iter().filter_map(|e| if let Event::Awarded { provider, .. } = e { Some(*provider) } else { None }).collect()
}

fn result_salt(p: &NodeId) -> [u8; 32] {
    [p.0[0] ^ 0xa5; 32]
}

/// `p` seals `o` at `t` (its run is over).
fn seal(job: &mut Job, p: &NodeId, o: &RunOutcome, t: u64) -> Result<(), MarketError> {
    job.commit_result(p, result_commitment(&JOB, p, o, &result_salt(p)), t)
}

/// `p` reveals its sealed `o` at `t`.
fn reveal(job: &mut Job, p: &NodeId, o: &RunOutcome, t: u64, book: &mut Book) -> Result<Vec<Event>, MarketError> {
    job.reveal_result(p, o.clone(), &result_salt(p), t, &PARAMS, book)
}

/// Seals and reveals at once: for the last run of a round to seal.
fn answer(job: &mut Job, p: &NodeId, o: RunOutcome, t: u64, book: &mut Book) -> Result<Vec<Event>, MarketError> {
    seal(job, p, &o, t)?;
    reveal(job, p, &o, t, book)
}

fn output(b: u8) -> RunOutcome {
    RunOutcome::Success { output: [b; 32] }
}

#[test]
fn the_cheapest_reliable_bid_wins_and_is_paid_its_price_once() {
    let (a, b, c) = (provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"), provider(3, "op-c", "us-east"));
    let mut book = Book::default();
    let mut job = auction(1, 100, &[(&a, 90), (&b, 60), (&c, 70)], &mut book);
    assert_eq!(book.of(&TENANT), 1_000_000 - 100, "escrow = max price × N");
    assert_eq!(book.of(&b.node), 1_000 - 10, "a bond of 10 % of the max price");
    let ev = job.tick(1_000, &PARAMS, &mut book);
    assert_eq!(awarded(&ev), [b.node]);
    // The two others stand by with their bond (N = 1: the best one); the last gets it back.
    assert_eq!(job.standby.iter().map(|s| s.provider.node).collect::<Vec<_>>(), [c.node]);
    assert_eq!((book.of(&a.node), book.of(&c.node)), (1_000, 990));
    job.heartbeat(&b.node, 1_500).unwrap();
    let ev = answer(&mut job, &b.node, output(9), 2_000, &mut book).unwrap();
    assert!(ev.contains(&Event::Paid { provider: b.node, amount_micro: 60 }), "{ev:?}");
    assert_eq!(job.ended, Some(Ended::Accepted { outcome: output(9), at_ms: 2_000 }));
    assert_eq!(book.of(&b.node), 1_060, "its price, and its bond back");
    assert_eq!(book.of(&c.node), 1_000, "the standby's bond back");
    assert_eq!(book.of(&TENANT), 1_000_000 - 60, "the tenant paid the winning price only");
    // Nothing more can happen to it.
    assert_eq!(answer(&mut job, &b.node, output(9), 2_100, &mut book), Err(MarketError::Ended));
    assert_eq!(job.cancel(&TENANT, 2_100, &mut book), Err(MarketError::Ended));
}

#[test]
fn a_lapsed_lease_passes_to_the_standby_at_once_and_the_job_is_paid_once() {
    let (a, b) = (provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"));
    let mut book = Book::default();
    let mut job = auction(1, 100, &[(&a, 50), (&b, 80)], &mut book);
    assert_eq!(awarded(&job.tick(1_000, &PARAMS, &mut book)), [a.node]);
    job.heartbeat(&a.node, 2_000).unwrap();
    // a dies: no heartbeat; 2 s after its last one its lease lapses and b runs the job.
    assert!(awarded(&job.tick(4_000, &PARAMS, &mut book)).is_empty(), "not yet: exactly the TTL");
    let ev = job.tick(4_001, &PARAMS, &mut book);
    assert!(ev.contains(&Event::Penalized { provider: a.node, why: "lapsed" }), "{ev:?}");
    assert_eq!(awarded(&ev), [b.node], "the standby, in the same block: no new auction");
    assert_eq!((book.of(&a.node), job.burned_micro), (990, 10), "its bond is burned");
    // a comes back: it holds no lease, its result is refused, and it may not bid on the job.
    assert_eq!(answer(&mut job, &a.node, output(1), 4_100, &mut book), Err(MarketError::NotLeaseholder));
    assert_eq!(job.heartbeat(&a.node, 4_100), Err(MarketError::NotLeaseholder));
    assert_eq!(
        job.cancel(&TENANT, 4_100, &mut book),
        Err(MarketError::Phase("the job runs: it can be cancelled only before a lease is awarded"))
    );
    answer(&mut job, &b.node, output(2), 5_000, &mut book).unwrap();
    assert_eq!(book.of(&b.node), 1_080);
    assert_eq!(book.of(&TENANT), 1_000_000 - 80, "paid once (b's price)");
    assert_eq!(job.paid, BTreeSet::from([b.node]));
}

#[test]
fn a_lapsed_lease_passes_first_to_a_standby_outside_the_region_and_operator_that_failed() {
    // Two runs; the best standby is in the region of the run that will fail (an outage there
    // may take it too), the next elsewhere.
    let a = provider(1, "op-a", "eu-de");
    let b = provider(2, "op-b", "eu-fr");
    let c = provider(3, "op-c", "eu-de");
    let d = provider(4, "op-d", "eu-nl");
    let mut book = Book::default();
    let mut job = auction(2, 100, &[(&a, 10), (&b, 20), (&c, 30), (&d, 40)], &mut book);
    assert_eq!(awarded(&job.tick(1_000, &PARAMS, &mut book)), [a.node, b.node]);
    assert_eq!(job.standby.iter().map(|s| s.provider.node).collect::<Vec<_>>(), [c.node, d.node]);
    job.heartbeat(&b.node, 3_000).unwrap();
    let ev = job.tick(3_001, &PARAMS, &mut book);
    assert_eq!(awarded(&ev), [d.node], "eu-de lost a run: the standby in eu-nl takes it, not the one in eu-de");
    // The operator counts too: a cheaper standby of the failed run's operator, in another
    // region, goes after a dearer one of another operator.
    let (f, g) = (provider(6, "op-a", "eu-nl"), provider(7, "op-g", "eu-fr"));
    let mut book = Book::default();
    let mut job = auction(1, 100, &[(&a, 10), (&f, 20), (&g, 30)], &mut book);
    assert_eq!(awarded(&job.tick(1_000, &PARAMS, &mut book)), [a.node]);
    assert_eq!(job.standby.iter().map(|s| s.provider.node).collect::<Vec<_>>(), [f.node]);
    // (N = 1: one standby; so that both stand by, two runs where the second never lapses.)
    let mut book = Book::default();
    let h = provider(8, "op-h", "eu-ie");
    let mut job = auction(2, 100, &[(&a, 10), (&h, 15), (&f, 20), (&g, 30)], &mut book);
    assert_eq!(awarded(&job.tick(1_000, &PARAMS, &mut book)), [a.node, h.node]);
    assert_eq!(job.standby.iter().map(|s| s.provider.node).collect::<Vec<_>>(), [f.node, g.node]);
    job.heartbeat(&h.node, 3_000).unwrap();
    assert_eq!(awarded(&job.tick(3_001, &PARAMS, &mut book)), [g.node], "not op-a's other node");
    // With no standby elsewhere, the one in the failed region still does.
    let e = provider(5, "op-a", "eu-fr");
    let mut book = Book::default();
    let mut job = auction(1, 100, &[(&b, 10), (&e, 20)], &mut book);
    assert_eq!(awarded(&job.tick(1_000, &PARAMS, &mut book)), [b.node]);
    assert_eq!(awarded(&job.tick(3_001, &PARAMS, &mut book)), [e.node]);
}

#[test]
fn without_a_standby_a_lapsed_lease_goes_back_to_auction_without_its_provider() {
    let (a, b) = (provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"));
    let mut book = Book::default();
    let mut job = auction(1, 100, &[(&a, 50)], &mut book);
    job.tick(1_000, &PARAMS, &mut book);
    let ev = job.tick(3_001, &PARAMS, &mut book);
    assert!(ev.contains(&Event::Reopened { round: 1, slots: 1 }), "{ev:?}");
    assert_eq!(job.escrow_micro, 100, "escrow intact");
    assert_eq!(job.commit(&a.node, [0; 32], 3_100, &mut book), Err(MarketError::Excluded));
    book.credit(&b.node, 1_000);
    job.commit(&b.node, commitment(&JOB, &b.node, 1, 70, &salt(&b)), 3_100, &mut book).unwrap();
    // A reveal for another round's commitment does not open this one.
    assert_eq!(job.reveal(&b, 70, &[0; 32], 3_600), Err(MarketError::BadReveal));
    job.reveal(&b, 70, &salt(&b), 3_600).unwrap();
    assert_eq!(awarded(&job.tick(4_001, &PARAMS, &mut book)), [b.node]);
}

#[test]
fn a_byzantine_provider_is_outvoted_and_penalized_and_the_majority_paid() {
    let ps = [provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"), provider(3, "op-c", "eu-nl")];
    let mut book = Book::default();
    let mut job = auction(3, 100, &[(&ps[0], 40), (&ps[1], 50), (&ps[2], 60)], &mut book);
    assert_eq!(awarded(&job.tick(1_000, &PARAMS, &mut book)).len(), 3);
    seal(&mut job, &ps[2].node, &output(66), 1_500).unwrap();
    seal(&mut job, &ps[0].node, &output(1), 1_550).unwrap();
    // Not all sealed: nothing can be revealed (nobody can read another's result and copy it).
    assert!(matches!(reveal(&mut job, &ps[0].node, &output(1), 1_560, &mut book), Err(MarketError::Phase(_))));
    seal(&mut job, &ps[1].node, &output(1), 1_570).unwrap();
    reveal(&mut job, &ps[2].node, &output(66), 1_600, &mut book).unwrap();
    reveal(&mut job, &ps[0].node, &output(1), 1_650, &mut book).unwrap();
    assert!(job.ended.is_none(), "one each: no majority yet");
    let ev = reveal(&mut job, &ps[1].node, &output(1), 1_700, &mut book).unwrap();
    assert!(ev.contains(&Event::Penalized { provider: ps[2].node, why: "outvoted" }), "{ev:?}");
    assert_eq!(job.ended, Some(Ended::Accepted { outcome: output(1), at_ms: 1_700 }));
    assert_eq!(book.of(&ps[0].node), 1_040);
    assert_eq!(book.of(&ps[1].node), 1_050);
    assert_eq!(book.of(&ps[2].node), 990, "no pay, bond lost");
    assert_eq!(book.of(&TENANT), 1_000_000 - 90, "the tenant pays the two it accepted, gains nothing");
    assert_eq!(job.burned_micro, 10, "the outvoted bond is burned");
}

#[test]
fn no_majority_runs_once_more_then_refunds() {
    let ps: Vec<Provider> = (1..=4).map(|i| provider(i, &format!("op-{i}"), "eu-de")).collect();
    let mut book = Book::default();
    let mut job = auction(2, 100, &[(&ps[0], 40), (&ps[1], 50)], &mut book);
    job.tick(1_000, &PARAMS, &mut book);
    seal(&mut job, &ps[0].node, &output(1), 1_100).unwrap();
    answer(&mut job, &ps[1].node, output(2), 1_150, &mut book).unwrap();
    let ev = reveal(&mut job, &ps[0].node, &output(1), 1_200, &mut book).unwrap();
    assert!(ev.contains(&Event::Reopened { round: 1, slots: 2 }), "{ev:?}");
    assert_eq!((book.of(&ps[0].node), book.of(&ps[1].node)), (990, 990), "bonds held until a later round decides");
    for p in &ps[2..] {
        book.credit(&p.node, 1_000);
        job.commit(&p.node, commitment(&JOB, &p.node, 1, 45, &salt(p)), 1_300, &mut book).unwrap();
    }
    for p in &ps[2..] {
        job.reveal(p, 45, &salt(p), 1_800).unwrap();
    }
    assert_eq!(awarded(&job.tick(2_200, &PARAMS, &mut book)).len(), 2);
    seal(&mut job, &ps[2].node, &output(3), 2_300).unwrap();
    answer(&mut job, &ps[3].node, output(4), 2_350, &mut book).unwrap();
    let ev = reveal(&mut job, &ps[2].node, &output(3), 2_400, &mut book).unwrap();
    assert!(matches!(job.ended, Some(Ended::Refunded { .. })), "{ev:?}");
    assert_eq!(book.of(&TENANT), 1_000_000, "all back");
    for p in &ps {
        assert_eq!(book.of(&p.node), 1_000, "nobody paid, nobody penalized");
    }
}

/// A job of N = 3 whose first round, on `ps` bidding `price` (+10 for each next one), ends with
/// three different outputs (1, 2 and 3, in `ps`' order): no majority, so it runs again.
fn split_first_round(ps: &[Provider], price: Micro, book: &mut Book) -> Job {
    let bids: Vec<(&Provider, Micro)> = ps.iter().zip(0..).map(|(p, i)| (p, price + 10 * i)).collect();
    let mut job = auction(3, 100, &bids, book);
    job.tick(1_000, &PARAMS, book);
    seal(&mut job, &ps[0].node, &output(1), 1_100).unwrap();
    seal(&mut job, &ps[1].node, &output(2), 1_100).unwrap();
    answer(&mut job, &ps[2].node, output(3), 1_100, book).unwrap();
    reveal(&mut job, &ps[0].node, &output(1), 1_150, book).unwrap();
    let ev = reveal(&mut job, &ps[1].node, &output(2), 1_150, book).unwrap();
    assert!(ev.contains(&Event::Reopened { round: 1, slots: 3 }), "{ev:?}");
    job
}

#[test]
fn the_round_that_decides_judges_the_earlier_ones_too() {
    let ps: Vec<Provider> = (1..=6).map(|i| provider(i, &format!("op-{i}"), "eu-de")).collect();
    let mut book = Book::default();
    let mut job = split_first_round(&ps[..3], 40, &mut book);
    // Round 2: output 1 twice and a third: accepted. Its two are paid, then round 1's run with
    // the same output (N = 3 paid in all). Its dissenter is outvoted; round 1's other runs get
    // their bonds back (round 2 saw their results: it may pay for them, not burn them).
    bid_round(&mut job, &ps[3..6], 1, 30, 1_200, &mut book);
    assert_eq!(awarded(&job.tick(2_100, &PARAMS, &mut book)).len(), 3);
    seal(&mut job, &ps[3].node, &output(1), 2_200).unwrap();
    seal(&mut job, &ps[4].node, &output(1), 2_200).unwrap();
    let ev = answer(&mut job, &ps[5].node, output(4), 2_200, &mut book).unwrap();
    assert!(ev.is_empty(), "{ev:?}");
    reveal(&mut job, &ps[3].node, &output(1), 2_250, &mut book).unwrap();
    let ev = reveal(&mut job, &ps[4].node, &output(1), 2_250, &mut book).unwrap();
    assert_eq!(job.ended, Some(Ended::Accepted { outcome: output(1), at_ms: 2_250 }));
    let paid: Vec<NodeId> =
        ev.iter().filter_map(|e| if let Event::Paid { provider, .. } = e { Some(*provider) } else { None }).collect();
    assert_eq!(paid, [ps[3].node, ps[4].node, ps[0].node], "this round first");
    let burned: Vec<NodeId> = ev
        .iter()
        .filter_map(|e| if let Event::Penalized { provider, .. } = e { Some(*provider) } else { None })
        .collect();
    assert_eq!(burned, [ps[5].node], "{ev:?}");
    assert!(ev.contains(&Event::Penalized { provider: ps[5].node, why: "outvoted" }), "{ev:?}");
    assert_eq!(book.of(&TENANT), 1_000_000 - 30 - 30 - 40, "each paid its own bid");
    assert_eq!((book.of(&ps[0].node), book.of(&ps[3].node), book.of(&ps[4].node)), (1_040, 1_030, 1_030));
    assert_eq!((book.of(&ps[1].node), book.of(&ps[2].node), book.of(&ps[5].node)), (1_000, 1_000, 990));
    assert_eq!(job.burned_micro, 10);
}

#[test]
fn a_node_that_answered_cannot_take_a_second_lease_of_the_same_run() {
    let ps = [provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"), provider(3, "op-c", "eu-nl")];
    let mut book = Book::default();
    let mut job = auction(3, 100, &[(&ps[0], 40), (&ps[1], 50), (&ps[2], 60)], &mut book);
    job.tick(1_000, &PARAMS, &mut book);
    seal(&mut job, &ps[0].node, &output(1), 1_100).unwrap();
    // b lapses; nobody stands by: a new round. a, having answered, may not bid for the slot.
    job.heartbeat(&ps[2].node, 2_900).unwrap();
    let ev = job.tick(3_001, &PARAMS, &mut book);
    assert!(ev.contains(&Event::Reopened { round: 1, slots: 1 }), "{ev:?}");
    let digest = commitment(&JOB, &ps[0].node, 1, 1, &salt(&ps[0]));
    assert_eq!(job.commit(&ps[0].node, digest, 3_100, &mut book), Err(MarketError::Excluded));
    // Nor may another node of an operator that already holds a lease in this run win it.
    let twin = provider(9, "op-a", "eu-pl");
    book.credit(&twin.node, 1_000);
    job.commit(&twin.node, commitment(&JOB, &twin.node, 1, 1, &salt(&twin)), 3_100, &mut book).unwrap();
    job.reveal(&twin, 1, &salt(&twin), 3_600).unwrap();
    let ev = job.tick(4_001, &PARAMS, &mut book);
    assert!(!ev.iter().any(|e| matches!(e, Event::Awarded { .. })), "{ev:?}");
}

#[test]
fn a_lease_that_beats_but_never_answers_lapses_after_its_wall_time() {
    let (a, b) = (provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"));
    let mut book = Book::default();
    let mut job = auction(1, 100, &[(&a, 50), (&b, 80)], &mut book);
    job.tick(1_000, &PARAMS, &mut book);
    // Awarded at 1 s, wall time 20 s, TTL 2 s: it may beat all it wants until 23 s.
    for t in (2_000..=23_000).step_by(1_000) {
        job.heartbeat(&a.node, t).unwrap();
        assert!(awarded(&job.tick(t, &PARAMS, &mut book)).is_empty(), "{t}");
    }
    job.heartbeat(&a.node, 23_001).unwrap();
    assert_eq!(awarded(&job.tick(23_001, &PARAMS, &mut book)), [b.node]);
}

#[test]
fn bids_the_rule_cannot_take_lose_their_bond() {
    let (a, b) = (provider(1, "op-a", "eu-de"), provider(2, "op-b", "us-east"));
    let mut book = Book::default();
    book.credit(&TENANT, 1_000);
    let eu = JobSpec {
        geofence: Geofence { regions: ["eu".parse().unwrap()].into(), ..Geofence::default() },
        ..spec(1, 100)
    };
    let (mut job, _) = Job::post(JOB, TENANT, eu, 0, &mut book).unwrap();
    for p in [&a, &b] {
        book.credit(&p.node, 1_000);
    }
    // a bids above the max price; b is outside the geofence.
    job.commit(&a.node, commitment(&JOB, &a.node, 0, 500, &salt(&a)), 100, &mut book).unwrap();
    job.commit(&b.node, commitment(&JOB, &b.node, 0, 10, &salt(&b)), 100, &mut book).unwrap();
    job.reveal(&a, 500, &salt(&a), 600).unwrap();
    job.reveal(&b, 10, &salt(&b), 600).unwrap();
    let ev = job.tick(1_000, &PARAMS, &mut book);
    for p in [&a, &b] {
        assert!(ev.contains(&Event::Penalized { provider: p.node, why: "ineligible" }), "{ev:?}");
        assert_eq!(book.of(&p.node), 990);
    }
    assert!(awarded(&ev).is_empty());
}

#[test]
fn a_job_that_fails_on_the_majority_is_refunded_and_nobody_paid() {
    let ps = [provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"), provider(3, "op-c", "eu-nl")];
    let mut book = Book::default();
    let mut job = auction(3, 100, &[(&ps[0], 40), (&ps[1], 50), (&ps[2], 60)], &mut book);
    job.tick(1_000, &PARAMS, &mut book);
    // A failure of the job itself (its own exit code), not of a machine's limit.
    let failed = RunOutcome::Failed { end: "exited:3".into() };
    seal(&mut job, &ps[0].node, &failed, 1_100).unwrap();
    seal(&mut job, &ps[1].node, &output(5), 1_150).unwrap();
    seal(&mut job, &ps[2].node, &failed, 1_200).unwrap();
    reveal(&mut job, &ps[0].node, &failed, 1_250, &mut book).unwrap();
    reveal(&mut job, &ps[1].node, &output(5), 1_260, &mut book).unwrap();
    let ev = reveal(&mut job, &ps[2].node, &failed, 1_300, &mut book).unwrap();
    assert!(matches!(&job.ended, Some(Ended::Refunded { why, .. }) if why.contains("exited:3")), "{ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, Event::Paid { .. })), "{ev:?}");
    assert_eq!(book.of(&TENANT), 1_000_000, "the whole escrow back");
    assert_eq!((book.of(&ps[0].node), book.of(&ps[2].node)), (1_000, 1_000), "the agreeing get their bond back");
    assert_eq!((book.of(&ps[1].node), job.burned_micro), (990, 10), "the outvoted one loses it");
}

/// When a run awarded at `awarded` may first claim the limit of the test spec's `outcome` (the
/// limit less a lease TTL: block times).
fn earliest_claim(awarded: u64, outcome: &RunOutcome) -> u64 {
    // The test spec's limits: CPU 10 s, wall 20 s; the lease TTL 2 s.
    match outcome {
        RunOutcome::Failed { end } if end == "cpu_limit" => awarded + 8_000,
        RunOutcome::Failed { end } if end == "wall_limit" => awarded + 18_000,
        _ => unreachable!("{outcome:?} is no limit"),
    }
}

#[test]
fn a_limit_claimed_by_the_only_run_is_checked_on_another_provider_and_a_wrong_claim_costs_its_bond() {
    let ps: Vec<Provider> = (1..=3).map(|i| provider(i, &format!("op-{i}"), "eu-de")).collect();
    let mut book = Book::default();
    let limit = RunOutcome::Failed { end: "cpu_limit".into() };
    // a bids lowest, wins, and says its run hit the CPU limit (it need not have run at all): the
    // job is not refunded on its word — it runs again elsewhere; a's bond stays in the job.
    let mut job = auction(1, 100, &[(&ps[0], 10)], &mut book);
    assert_eq!(awarded(&job.tick(1_000, &PARAMS, &mut book)), [ps[0].node]);
    let t = earliest_claim(1_000, &limit);
    let ev = answer(&mut job, &ps[0].node, limit.clone(), t, &mut book).unwrap();
    assert!(ev.contains(&Event::Reopened { round: 1, slots: 1 }), "{ev:?}");
    assert!(job.ended.is_none() && job.excluded.contains(&ps[0].node), "{job:?}");
    assert_eq!(book.of(&ps[0].node), 990, "nothing paid; its bond held until the rerun decides");
    assert_eq!(job.limit_claimants, BTreeSet::from([ps[0].node]));
    // b runs it to the end: accepted, b paid once; a's claim was wrong: its bond is burned.
    book.credit(&ps[1].node, 1_000);
    job.commit(&ps[1].node, commitment(&JOB, &ps[1].node, 1, 30, &salt(&ps[1])), t + 100, &mut book).unwrap();
    job.reveal(&ps[1], 30, &salt(&ps[1]), t + 600).unwrap();
    assert_eq!(awarded(&job.tick(t + 1_000, &PARAMS, &mut book)), [ps[1].node]);
    let ev = answer(&mut job, &ps[1].node, output(7), t + 1_100, &mut book).unwrap();
    assert!(matches!(job.ended, Some(Ended::Accepted { .. })), "{job:?}");
    assert!(ev.contains(&Event::Penalized { provider: ps[0].node, why: "limit_contradicted" }), "{ev:?}");
    assert_eq!((book.of(&ps[0].node), book.of(&ps[1].node), job.burned_micro), (990, 1_030, 10));
    assert_eq!(book.of(&TENANT), 1_000_000 - 30);

    // A job that really needs more than its limit: the second run says so too. Both spent what
    // the tenant allowed; the confirming run is paid its bid (so a tenant posting jobs that never
    // end pays for them), the first gets its bond back.
    let mut book = Book::default();
    let mut job = auction(1, 100, &[(&ps[0], 10)], &mut book);
    job.tick(1_000, &PARAMS, &mut book);
    answer(&mut job, &ps[0].node, limit.clone(), t, &mut book).unwrap();
    book.credit(&ps[2].node, 1_000);
    job.commit(&ps[2].node, commitment(&JOB, &ps[2].node, 1, 30, &salt(&ps[2])), t + 100, &mut book).unwrap();
    job.reveal(&ps[2], 30, &salt(&ps[2]), t + 600).unwrap();
    assert_eq!(awarded(&job.tick(t + 1_000, &PARAMS, &mut book)), [ps[2].node]);
    let second = earliest_claim(t + 1_000, &limit);
    let ev = answer(&mut job, &ps[2].node, limit.clone(), second, &mut book).unwrap();
    assert!(matches!(&job.ended, Some(Ended::Accepted { outcome, .. }) if *outcome == limit), "{ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, Event::Penalized { .. })), "{ev:?}");
    assert_eq!(book.of(&TENANT), 1_000_000 - 30, "the tenant pays the confirming run");
    assert_eq!((book.of(&ps[0].node), book.of(&ps[2].node)), (1_000, 1_030), "a's bond back, c paid its bid");
}

#[test]
fn a_limit_sealed_before_the_run_could_reach_it_is_refused() {
    let ps: Vec<Provider> = (1..=2).map(|i| provider(i, &format!("op-{i}"), "eu-de")).collect();
    for limit in ["cpu_limit", "wall_limit"].map(|end| RunOutcome::Failed { end: end.into() }) {
        let mut book = Book::default();
        let mut job = auction(1, 100, &[(&ps[0], 10)], &mut book);
        job.tick(1_000, &PARAMS, &mut book);
        // Sealed 1 ms too soon (block times may lag by a TTL, no more): the reveal is refused.
        // Revealed later, inside its window: the time that counts is the seal's.
        let early = earliest_claim(1_000, &limit) - 1;
        seal(&mut job, &ps[0].node, &limit, early).unwrap();
        let e = reveal(&mut job, &ps[0].node, &limit, early + 499, &mut book).unwrap_err();
        assert!(matches!(e, MarketError::EarlyLimit { .. }), "{e:?}");
        assert!(e.to_string().contains("sealed too early"), "{e}");
        // Unrevealed in its window, it is no vote: a penalty, and the job runs elsewhere.
        let ev = job.tick(early + 500, &PARAMS, &mut book);
        assert!(ev.contains(&Event::Penalized { provider: ps[0].node, why: "result_not_revealed" }), "{ev:?}");
        assert_eq!(book.of(&ps[0].node), 990, "{limit:?}");
        // Any other failure is taken at any time.
        let mut book = Book::default();
        let mut job = auction(1, 100, &[(&ps[1], 10)], &mut book);
        job.tick(1_000, &PARAMS, &mut book);
        let exited = RunOutcome::Failed { end: "exited:3".into() };
        answer(&mut job, &ps[1].node, exited, 1_001, &mut book).unwrap();
        assert!(matches!(job.ended, Some(Ended::Refunded { .. })), "{job:?}");
    }
}

/// Providers `ps` bid `price` in `round` at `t` (commit) and `t + 500` (reveal).
fn bid_round(job: &mut Job, ps: &[Provider], round: u32, price: Micro, t: u64, book: &mut Book) {
    for p in ps {
        book.credit(&p.node, 1_000);
        job.commit(&p.node, commitment(&JOB, &p.node, round, price, &salt(p)), t, book).unwrap();
    }
    for p in ps {
        job.reveal(p, price, &salt(p), t + 500).unwrap();
    }
}

#[test]
fn a_run_that_finished_beside_a_limit_majority_is_not_penalized_and_limits_get_their_own_rerun() {
    let ps: Vec<Provider> = (1..=9).map(|i| provider(i, &format!("op-{i}"), "eu-de")).collect();
    let limit = RunOutcome::Failed { end: "wall_limit".into() };
    let mut book = Book::default();
    let mut job = split_first_round(&ps[..3], 10, &mut book);
    // Round 2: two claim the wall limit, one finishes. The no-majority rerun is spent, yet the
    // limit is not taken on this round's word: it runs once more.
    bid_round(&mut job, &ps[3..6], 1, 10, 1_200, &mut book);
    assert_eq!(awarded(&job.tick(2_100, &PARAMS, &mut book)).len(), 3);
    let t = earliest_claim(2_100, &limit);
    seal(&mut job, &ps[3].node, &limit, t).unwrap();
    seal(&mut job, &ps[4].node, &output(9), t).unwrap();
    answer(&mut job, &ps[5].node, limit.clone(), t, &mut book).unwrap();
    reveal(&mut job, &ps[3].node, &limit, t + 50, &mut book).unwrap();
    let ev = reveal(&mut job, &ps[4].node, &output(9), t + 50, &mut book).unwrap();
    assert!(ev.contains(&Event::Reopened { round: 2, slots: 3 }), "{ev:?}");
    assert!(job.ended.is_none(), "{job:?}");
    assert_eq!(job.limit_claimants, BTreeSet::from([ps[3].node, ps[5].node]), "the finished run is no claimant");
    // Round 3: the limit again, beside a finished run: the limit is confirmed; its claimants in
    // this round are paid, then those of round 2 while fewer than N are; the other claimant of
    // round 2 gets its bond back; the finished runs are no dissent.
    bid_round(&mut job, &ps[6..9], 2, 10, t + 100, &mut book);
    assert_eq!(awarded(&job.tick(t + 1_000, &PARAMS, &mut book)).len(), 3);
    let t = earliest_claim(t + 1_000, &limit);
    seal(&mut job, &ps[6].node, &limit, t).unwrap();
    seal(&mut job, &ps[7].node, &output(9), t).unwrap();
    answer(&mut job, &ps[8].node, limit.clone(), t, &mut book).unwrap();
    reveal(&mut job, &ps[6].node, &limit, t + 50, &mut book).unwrap();
    let ev = reveal(&mut job, &ps[7].node, &output(9), t + 50, &mut book).unwrap();
    assert!(matches!(&job.ended, Some(Ended::Accepted { outcome, .. }) if *outcome == limit), "{ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, Event::Penalized { .. })), "{ev:?}");
    assert_eq!(book.of(&TENANT), 1_000_000 - 30, "N = 3 runs paid");
    for (i, p) in ps.iter().enumerate() {
        let paid = if [3, 6, 8].contains(&i) { 10 } else { 0 };
        assert_eq!(book.of(&p.node), 1_000 + paid, "{i}: every bond back, the confirming runs paid");
    }
}

#[test]
fn unrevealed_bids_lose_their_bond_and_bad_reveals_are_refused() {
    let (a, b) = (provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"));
    let mut book = Book::default();
    book.credit(&TENANT, 1_000);
    book.credit(&a.node, 100);
    book.credit(&b.node, 5);
    let (mut job, _) = Job::post(JOB, TENANT, spec(1, 100), 0, &mut book).unwrap();
    job.commit(&a.node, commitment(&JOB, &a.node, 0, 30, &salt(&a)), 100, &mut book).unwrap();
    assert_eq!(job.commit(&a.node, [0; 32], 110, &mut book), Err(MarketError::AlreadyBid));
    assert_eq!(job.commit(&b.node, [0; 32], 120, &mut book), Err(MarketError::Insufficient { need: 10 }));
    assert!(matches!(job.reveal(&a, 30, &salt(&a), 400), Err(MarketError::Phase(_))), "too early");
    assert_eq!(job.reveal(&a, 31, &salt(&a), 600), Err(MarketError::BadReveal));
    assert_eq!(job.reveal(&b, 30, &salt(&b), 600), Err(MarketError::NoCommit));
    assert!(matches!(job.commit(&b.node, [0; 32], 600, &mut book), Err(MarketError::Phase(_))), "too late");
    assert_eq!(job.reveal(&a, 0, &salt(&a), 600), Err(MarketError::ZeroPrice));
    let ev = job.tick(1_000, &PARAMS, &mut book);
    assert!(ev.contains(&Event::Penalized { provider: a.node, why: "not_revealed" }), "{ev:?}");
    assert_eq!((book.of(&a.node), job.burned_micro), (90, 10));
    assert_eq!(job.cancel(&a.node, 1_100, &mut book), Err(MarketError::NotTenant));
    // The tenant cannot bid on its own job.
    assert_eq!(job.commit(&TENANT, [0; 32], 1_100, &mut book), Err(MarketError::Excluded));
    job.cancel(&TENANT, 1_100, &mut book).unwrap();
    assert_eq!(book.of(&TENANT), 1_000, "the escrow back, whole");
}

#[test]
fn a_job_nobody_takes_is_refunded_after_its_rounds() {
    let mut book = Book::default();
    book.credit(&TENANT, 1_000);
    let (mut job, _) = Job::post(JOB, TENANT, spec(1, 100), 0, &mut book).unwrap();
    let mut t = 0;
    while job.ended.is_none() && t < 100_000 {
        t += 500;
        job.tick(t, &PARAMS, &mut book);
    }
    assert!(matches!(&job.ended, Some(Ended::Refunded { why, .. }) if why.contains("auction rounds")), "{job:?}");
    assert_eq!(job.rounds, MAX_ROUNDS);
    assert_eq!(book.of(&TENANT), 1_000);
}

#[test]
fn winners_spread_over_regions_before_taking_a_cheaper_bid_in_a_taken_region() {
    // The two cheapest are in one region; the third, dearer, is elsewhere.
    let ps = [provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-de"), provider(3, "op-c", "eu-fr")];
    let bids: Vec<Bid> =
        [10, 11, 30].iter().zip(&ps).map(|(p, v)| Bid { provider: v.clone(), price_micro: *p }).collect();
    let ranked = rank(&JOB, &bids, &Geofence::default(), 100, &BTreeSet::new());
    let two: Vec<NodeId> =
        pick(&ranked, 2, &BTreeSet::new(), &BTreeSet::new()).iter().map(|b| b.provider.node).collect();
    assert_eq!(two, [ps[0].node, ps[2].node], "eu-de then eu-fr, not the cheaper second eu-de");
    // Three slots: the region rule gives way, the operator rule does not.
    let three = pick(&ranked, 3, &BTreeSet::new(), &BTreeSet::new());
    assert_eq!(three.len(), 3);
    let twins = [provider(1, "op-a", "eu-de"), provider(2, "op-a", "eu-fr")];
    let bids: Vec<Bid> = twins.iter().map(|p| Bid { provider: p.clone(), price_micro: 5 }).collect();
    let ranked = rank(&JOB, &bids, &Geofence::default(), 100, &BTreeSet::new());
    assert_eq!(pick(&ranked, 2, &BTreeSet::new(), &BTreeSet::new()).len(), 1, "one operator, one winner");
}

#[test]
fn winners_come_from_distinct_operators_and_spread_over_regions() {
    let ps = [
        provider(1, "op-a", "eu-de"),
        provider(2, "op-a", "eu-fr"),
        provider(3, "op-b", "eu-de"),
        provider(4, "op-c", "eu-nl"),
    ];
    let bids: Vec<Bid> = ps.iter().map(|p| Bid { provider: p.clone(), price_micro: 10 }).collect();
    let ranked = rank(&JOB, &bids, &Geofence::default(), 100, &BTreeSet::new());
    let winners = pick(&ranked, 3, &BTreeSet::new(), &BTreeSet::new());
    let ops: BTreeSet<&str> = winners.iter().map(|b| b.provider.operator.as_str()).collect();
    assert_eq!(ops.len(), 3, "three operators");
    // Two slots from three regions and three operators: two regions.
    let two = pick(&ranked, 2, &BTreeSet::new(), &BTreeSet::new());
    assert_ne!(two[0].provider.region, two[1].provider.region);
    // Five slots, three operators: only three winners.
    assert_eq!(pick(&ranked, 5, &BTreeSet::new(), &BTreeSet::new()).len(), 3);
}

#[test]
fn reliability_weighs_against_price_and_ties_break_by_hash_not_by_order() {
    let mut good = provider(1, "op-a", "eu-de");
    good.record = Record { accepted: 98, penalized: 0 };
    let mut flaky = provider(2, "op-b", "eu-de");
    flaky.record = Record { accepted: 1, penalized: 5 };
    let bids = [Bid { provider: flaky, price_micro: 50 }, Bid { provider: good.clone(), price_micro: 90 }];
    let ranked = rank(&JOB, &bids, &Geofence::default(), 100, &BTreeSet::new());
    assert_eq!(ranked[0].provider.node, good.node, "90 at 99 % beats 50 at 25 %");
    let same: Vec<Bid> =
        (1..=8).map(|i| Bid { provider: provider(i, &format!("o{i}"), "eu-de"), price_micro: 5 }).collect();
    let mut reversed = same.clone();
    reversed.reverse();
    let order = |b: &[Bid]| -> Vec<NodeId> {
        rank(&JOB, b, &Geofence::default(), 100, &BTreeSet::new()).iter().map(|b| b.provider.node).collect()
    };
    assert_eq!(order(&same), order(&reversed));
    assert_ne!(order(&same), same.iter().map(|b| b.provider.node).collect::<Vec<_>>(), "not by node id");
}

#[test]
fn a_provider_says_why_it_does_not_bid() {
    let p = provider(1, "op-a", "us-east");
    let offer = Offer { price_floor_micro: 40, free_slots: 1, max_memory_bytes: 1 << 30, max_cpu_ms: 60_000 };
    let eu: Geofence = Geofence { regions: ["eu".parse().unwrap()].into(), ..Geofence::default() };
    assert_eq!(evaluate(&p, &offer, &eu, 100, 1, 1), Err(Decline::Geofence));
    let any = Geofence::default();
    assert_eq!(evaluate(&p, &offer, &any, 30, 1, 1), Err(Decline::PriceFloor { floor_micro: 40, max_micro: 30 }));
    assert!(matches!(evaluate(&p, &offer, &any, 100, 2 << 30, 1), Err(Decline::Limits { .. })));
    let full = Offer { free_slots: 0, ..offer };
    assert_eq!(evaluate(&p, &full, &any, 100, 1, 1), Err(Decline::NoCapacity));
    assert_eq!(evaluate(&p, &offer, &any, 100, 1, 1), Ok(40));
    let us_out = Geofence { deny_jurisdictions: ["US".parse().unwrap()].into(), ..Geofence::default() };
    assert_eq!(evaluate(&p, &offer, &us_out, 100, 1, 1), Err(Decline::Geofence));
}

#[test]
fn bad_specs_are_refused_with_the_reason() {
    let mut book = Book::default();
    book.credit(&TENANT, 1_000);
    for (s, says) in [
        (JobSpec { redundancy: 0, ..spec(1, 10) }, "redundancy 0"),
        (JobSpec { redundancy: 6, ..spec(1, 10) }, "1 to 5"),
        (JobSpec { max_price_micro: 0, ..spec(1, 10) }, "max price is 0"),
        (JobSpec { max_price_micro: u64::MAX, ..spec(2, 10) }, "overflows"),
        (JobSpec { bid_window_ms: 10, ..spec(1, 10) }, "bid window"),
        (JobSpec { args: vec!["x".repeat(5_000)], ..spec(1, 10) }, "at most 1024 bytes"),
        (JobSpec { env: vec![("A=B".into(), "c".into())], ..spec(1, 10) }, "'='"),
        (JobSpec { limits: JobLimits { cpu_ms: 0, ..spec(1, 10).limits }, ..spec(1, 10) }, "cpu_ms"),
    ] {
        let e = Job::post(JOB, TENANT, s, 0, &mut book).unwrap_err();
        assert!(e.to_string().contains(says), "{e} (wanted {says})");
    }
    let e = Job::post(JOB, TENANT, spec(1, 5_000), 0, &mut book).unwrap_err();
    assert_eq!(e, MarketError::Insufficient { need: 5_000 });
    assert_eq!(book.of(&TENANT), 1_000, "nothing taken by a refused post");
}

#[test]
fn why_a_job_has_no_bids_is_said_with_the_numbers() {
    use archipel_market::rule::explain;
    let eu = Geofence { regions: ["eu".parse().unwrap()].into(), ..Geofence::default() };
    let floors = |f: &[Micro]| -> Vec<Decline> {
        f.iter().map(|&floor_micro| Decline::PriceFloor { floor_micro, max_micro: 20 }).collect()
    };
    let why = explain(&eu, 20, 3, &floors(&[25, 40, 30]), 0, 1);
    assert_eq!(
        why,
        "no bids: 3 of 3 providers are in regions [eu]; 3 have a price floor above your max price 20 (lowest floor 25: raise --max-price)"
    );
    let outside = vec![Decline::Geofence; 4];
    let why = explain(&eu, 20, 4, &outside, 0, 1);
    assert!(why.contains("none of the 4 providers is in regions [eu]") && why.contains("widen"), "{why}");
    let mixed = [vec![Decline::NoCapacity, Decline::Limits { what: "memory".into() }], floors(&[50])].concat();
    let why = explain(&Geofence::default(), 20, 5, &mixed, 1, 2);
    assert!(why.starts_with("1 bid(s) for 2 runs: 5 providers;"), "{why}");
    assert!(why.contains("1 have no free capacity") && why.contains("1 give one job less memory"), "{why}");
    assert!(why.contains("lowest floor 50") && why.contains("1 said nothing"), "{why}");
    assert_eq!(explain(&eu, 20, 0, &[], 0, 1), "no bids: no provider is registered");
}

#[test]
fn a_result_cannot_be_copied_and_an_unrevealed_one_is_no_vote() {
    let ps = [provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"), provider(3, "op-c", "eu-nl")];
    let spare = provider(4, "op-d", "eu-pl");
    let mut book = Book::default();
    let mut job = auction(3, 100, &[(&ps[0], 40), (&ps[1], 50), (&ps[2], 60), (&spare, 70)], &mut book);
    job.tick(1_000, &PARAMS, &mut book);
    // c seals a guess without running the job; once the honest results are revealed it cannot
    // reveal them as its own.
    seal(&mut job, &ps[0].node, &output(1), 1_100).unwrap();
    seal(&mut job, &ps[1].node, &output(1), 1_100).unwrap();
    job.commit_result(&ps[2].node, [0xee; 32], 1_100).unwrap();
    assert_eq!(reveal(&mut job, &ps[2].node, &output(1), 1_200, &mut book), Err(MarketError::BadReveal));
    // A seal replayed from another provider is not its own either.
    let theirs = result_commitment(&JOB, &ps[0].node, &output(1), &result_salt(&ps[0].node));
    assert_ne!(theirs, result_commitment(&JOB, &ps[2].node, &output(1), &result_salt(&ps[0].node)));
    // Only a, then nobody else, reveals in the window (500 ms): b and c are no vote and
    // penalized; a's result is public, so no later run joins this round (it could copy it): the
    // round has no majority and the job runs again from a new auction, without a, b or c.
    reveal(&mut job, &ps[0].node, &output(1), 1_200, &mut book).unwrap();
    let ev = job.tick(1_600, &PARAMS, &mut book);
    for p in &ps[1..] {
        assert!(ev.contains(&Event::Penalized { provider: p.node, why: "result_not_revealed" }), "{ev:?}");
    }
    assert!(ev.contains(&Event::Reopened { round: 1, slots: 3 }), "{ev:?}");
    assert!(awarded(&ev).is_empty(), "the standby does not join a round whose results are out: {ev:?}");
    assert_eq!((job.burned_micro, book.of(&ps[0].node)), (20, 990), "a not paid, its bond held for the next round");
    assert_eq!(job.earlier.len(), 1, "a's run waits to be judged: {job:?}");
    for p in &ps {
        assert_eq!(job.commit(&p.node, [0; 32], 1_700, &mut book), Err(MarketError::Excluded));
    }
    // Work was done: the tenant can no longer cancel.
    assert!(matches!(job.cancel(&TENANT, 1_700, &mut book), Err(MarketError::Phase(_))));
}

#[test]
fn a_round_is_decided_on_all_its_reveals_not_the_first_that_agree() {
    let ps = [provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"), provider(3, "op-c", "eu-nl")];
    let spare = provider(4, "op-d", "eu-pl");
    let mut book = Book::default();
    let mut job = auction(3, 100, &[(&ps[0], 40), (&ps[1], 50), (&ps[2], 60), (&spare, 70)], &mut book);
    job.tick(1_000, &PARAMS, &mut book);
    for p in &ps[..2] {
        seal(&mut job, &p.node, &output(1), 1_100).unwrap();
    }
    seal(&mut job, &ps[2].node, &output(2), 1_100).unwrap();
    reveal(&mut job, &ps[0].node, &output(1), 1_200, &mut book).unwrap();
    let ev = reveal(&mut job, &ps[1].node, &output(1), 1_200, &mut book).unwrap();
    assert!(ev.is_empty() && job.ended.is_none(), "two agree, the third has not revealed: not yet decided");
    let ev = reveal(&mut job, &ps[2].node, &output(2), 1_300, &mut book).unwrap();
    assert!(ev.contains(&Event::Penalized { provider: ps[2].node, why: "outvoted" }), "{ev:?}");
    assert!(matches!(job.ended, Some(Ended::Accepted { .. })));
    // A failure name past its bound is refused (it would be stored on the ledger).
    let mut book = Book::default();
    let mut job = auction(1, 100, &[(&ps[0], 40)], &mut book);
    job.tick(1_000, &PARAMS, &mut book);
    let long = RunOutcome::Failed { end: "x".repeat(65) };
    seal(&mut job, &ps[0].node, &long, 1_100).unwrap();
    assert_eq!(reveal(&mut job, &ps[0].node, &long, 1_200, &mut book), Err(MarketError::BadReveal));
}

#[test]
fn a_run_stopped_by_its_time_limit_is_no_dissent_from_a_majority_that_finished() {
    let ps = [provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"), provider(3, "op-c", "eu-nl")];
    let mut book = Book::default();
    let mut job = auction(3, 100, &[(&ps[0], 40), (&ps[1], 50), (&ps[2], 60)], &mut book);
    job.tick(1_000, &PARAMS, &mut book);
    let slow = RunOutcome::Failed { end: "cpu_limit".into() };
    let wrong = RunOutcome::Failed { end: "exited:3".into() };
    assert!(slow.depends_on_the_machine() && !wrong.depends_on_the_machine());
    let t = earliest_claim(1_000, &slow);
    seal(&mut job, &ps[0].node, &output(1), 1_100).unwrap();
    seal(&mut job, &ps[1].node, &output(1), 1_100).unwrap();
    seal(&mut job, &ps[2].node, &slow, t).unwrap();
    reveal(&mut job, &ps[2].node, &slow, t + 100, &mut book).unwrap();
    reveal(&mut job, &ps[0].node, &output(1), t + 100, &mut book).unwrap();
    let ev = reveal(&mut job, &ps[1].node, &output(1), t + 100, &mut book).unwrap();
    assert!(!ev.iter().any(|e| matches!(e, Event::Penalized { .. })), "{ev:?}");
    assert_eq!(book.of(&ps[2].node), 1_000, "its bond back, no pay");
    assert_eq!((book.of(&ps[0].node), book.of(&ps[1].node)), (1_040, 1_050));
}

#[test]
fn a_node_standing_by_cannot_also_bid() {
    // s stands by but shares a's operator, so it cannot take b's run when b lapses: a new round
    // opens while s still stands by, and s may not bid in it (its bond backs its place).
    let (a, b, s) = (provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"), provider(3, "op-a", "eu-nl"));
    let mut book = Book::default();
    let mut job = auction(2, 100, &[(&a, 40), (&b, 50), (&s, 60)], &mut book);
    assert_eq!(awarded(&job.tick(1_000, &PARAMS, &mut book)), [a.node, b.node]);
    assert_eq!(job.standby.iter().map(|x| x.provider.node).collect::<Vec<_>>(), [s.node]);
    job.heartbeat(&a.node, 2_500).unwrap();
    let ev = job.tick(3_001, &PARAMS, &mut book);
    assert!(ev.contains(&Event::Reopened { round: 1, slots: 1 }), "{ev:?}");
    let digest = commitment(&JOB, &s.node, 1, 10, &salt(&s));
    assert_eq!(job.commit(&s.node, digest, 3_100, &mut book), Err(MarketError::Excluded));
}

#[test]
fn an_auction_is_awarded_as_soon_as_every_sealed_bid_is_revealed() {
    let (a, b) = (provider(1, "op-a", "eu-de"), provider(2, "op-b", "eu-fr"));
    let mut book = Book::default();
    // Both sealed bids revealed at 600 (commits closed at 500): due at once, awarded by the
    // first block after the reveals, not at the reveal phase's end (1,000).
    let mut job = auction(1, 100, &[(&a, 50), (&b, 80)], &mut book);
    assert_eq!(job.next_due_ms(&PARAMS), Some(500));
    assert_eq!(awarded(&job.tick(610, &PARAMS, &mut book)), [a.node]);
    assert_eq!(job.leases[0].awarded_ms, 610);
    // One of two revealed: the other may still reveal until 1,000, so the award waits for it.
    let mut book = Book::default();
    book.credit(&TENANT, 1_000_000);
    book.credit(&a.node, 1_000);
    book.credit(&b.node, 1_000);
    let (mut job, _) = Job::post(JOB, TENANT, spec(1, 100), 0, &mut book).unwrap();
    assert_eq!(job.next_due_ms(&PARAMS), Some(1_000), "no sealed bid yet: the window's end");
    for p in [&a, &b] {
        job.commit(&p.node, commitment(&JOB, &p.node, 0, 60, &salt(p)), 100, &mut book).unwrap();
    }
    job.reveal(&a, 60, &salt(&a), 600).unwrap();
    assert_eq!(job.next_due_ms(&PARAMS), Some(1_000));
    assert!(awarded(&job.tick(999, &PARAMS, &mut book)).is_empty(), "b may still reveal");
    job.reveal(&b, 60, &salt(&b), 999).unwrap();
    assert_eq!(job.next_due_ms(&PARAMS), Some(500));
    assert_eq!(awarded(&job.tick(999, &PARAMS, &mut book)).len(), 1);
}
