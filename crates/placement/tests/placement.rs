//! Placement properties: the geofence is never crossed, shards go to distinct nodes spread over
//! failure domains, equal inputs give equal answers in any order, and refusals carry the numbers.

use archipel_placement::{
    Candidate, MIN_REPUTATION, PlacementError, Violation, check, duty_holder, duty_rank, duty_rank_within, eligible,
    feasible, place, replace, replace_what_fits,
};
use archipel_types::{ErasureCode, NodeId, PlacementPolicy};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const MIB: u64 = 1 << 20;

fn node(i: u8) -> NodeId {
    NodeId([i; 32])
}

/// The devnet's twelve nodes: eight in EU regions run by EU operators, two in the EU run by a US
/// operator, two in us-east.
fn devnet() -> Vec<Candidate> {
    [
        ("eu-de", "DE", "rheinhost", "DE"),
        ("eu-fr", "FR", "seine-cloud", "FR"),
        ("eu-nl", "NL", "polder-net", "NL"),
        ("us-east", "US", "bigcloud", "US"),
        ("eu-de", "DE", "rheinhost", "DE"),
        ("eu-de", "DE", "alpen-dc", "DE"),
        ("eu-fr", "FR", "seine-cloud", "FR"),
        ("eu-fr", "FR", "lyon-compute", "FR"),
        ("eu-nl", "NL", "polder-net", "NL"),
        ("eu-de", "DE", "bigcloud", "US"),
        ("eu-ie", "IE", "bigcloud", "US"),
        ("us-east", "US", "bigcloud", "US"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (region, country, operator, jurisdiction))| Candidate {
        node: node(i as u8 + 1),
        region: region.parse().unwrap(),
        country: country.parse().unwrap(),
        operator: operator.to_string(),
        jurisdiction: jurisdiction.parse().unwrap(),
        free_bytes: 50 << 30,
        reputation: 1000,
    })
    .collect()
}

fn eu_no_us(min_regions: u8, min_operators: u8) -> PlacementPolicy {
    PlacementPolicy {
        regions: ["eu".parse().unwrap()].into(),
        deny_jurisdictions: ["US".parse().unwrap()].into(),
        min_regions,
        min_operators,
        ..PlacementPolicy::anywhere(ErasureCode::DEFAULT)
    }
}

fn registry(candidates: &[Candidate]) -> BTreeMap<NodeId, Candidate> {
    candidates.iter().map(|c| (c.node, c.clone())).collect()
}

#[test]
fn eu_only_no_us_operators_uses_the_eight_eu_nodes_and_spreads_them() {
    let pool = devnet();
    let policy = eu_no_us(3, 4);
    let inside: BTreeSet<NodeId> = [1, 2, 3, 5, 6, 7, 8, 9].map(node).into();
    let mut uses: BTreeMap<NodeId, usize> = BTreeMap::new();
    for s in 0..600u16 {
        let mut seed = [0u8; 32];
        seed[..2].copy_from_slice(&s.to_be_bytes());
        let holders = place(&policy, &pool, &seed, MIB).unwrap();
        assert_eq!(holders.len(), 6);
        assert!(holders.iter().all(|h| inside.contains(h)), "seed {s}: {holders:?}");
        check(&policy, &registry(&pool), &holders).unwrap();
        let mut regions: BTreeMap<_, usize> = BTreeMap::new();
        for h in &holders {
            *regions.entry(pool[h.0[0] as usize - 1].region.clone()).or_default() += 1;
        }
        let operators: BTreeSet<_> = holders.iter().map(|h| pool[h.0[0] as usize - 1].operator.clone()).collect();
        // Three EU regions are allowed and five EU operators: the spread puts two shards in each
        // region, so losing a whole region loses no more than the two parity shards, and uses at
        // least four operators.
        assert!(regions.values().all(|&n| n == 2), "seed {s}: {regions:?}");
        assert!(operators.len() >= 4, "seed {s}: {operators:?}");
        for h in holders {
            *uses.entry(h).or_default() += 1;
        }
    }
    // Every EU node takes shards. The spread comes first, so the two eu-nl nodes and the only
    // nodes of alpen-dc and lyon-compute hold a shard of every segment, and the others share the
    // rest evenly; capacity then bounds the rare domains (a full node is no candidate).
    assert_eq!(uses.len(), 8);
    for n in [3, 6, 8, 9].map(node) {
        assert_eq!(uses[&n], 600);
    }
    for n in [1, 2, 5, 7].map(node) {
        assert!((240..=360).contains(&uses[&n]), "{uses:?}");
    }
}

#[test]
fn an_impossible_policy_is_refused_with_the_numbers() {
    let pool = devnet();
    let mut policy = eu_no_us(1, 1);
    policy.code = ErasureCode::new(8, 2).unwrap();
    let err = feasible(&policy, &pool, MIB).unwrap_err();
    assert!(matches!(err, PlacementError::TooFewNodes { needed: 10, eligible: 8, live: 12, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "code 8+2 needs 10 nodes in regions [eu] outside US jurisdiction with 1.0 MiB free; 8 of the 12 live nodes \
         qualify — add nodes or lower the code to 6+2"
    );

    let err = feasible(&eu_no_us(4, 1), &pool, MIB).unwrap_err();
    assert!(matches!(err, PlacementError::TooFewDomains { domain: "region", needed: 4, found: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("span 3 (eu-de, eu-fr, eu-nl)"), "{err}");

    // Room matters too: with every EU node nearly full, nothing qualifies.
    let mut full = devnet();
    for c in &mut full {
        c.free_bytes = 100;
    }
    assert!(matches!(feasible(&eu_no_us(1, 1), &full, MIB), Err(PlacementError::TooFewNodes { eligible: 0, .. })));
    // And reputation: nodes that failed audits take no new shards.
    let mut shunned = devnet();
    for c in shunned.iter_mut().take(5) {
        c.reputation = MIN_REPUTATION - 1;
    }
    assert!(!eligible(&eu_no_us(1, 1), &shunned[0], MIB));
    assert!(matches!(feasible(&eu_no_us(1, 1), &shunned, MIB), Err(PlacementError::TooFewNodes { eligible: 4, .. })));
}

#[test]
fn repairs_stay_inside_the_fence_or_fail() {
    let pool = devnet();
    let policy = eu_no_us(2, 2);
    let seed = [5u8; 32];
    let holders = place(&policy, &pool, &seed, MIB).unwrap();
    // Two holders die: they are no longer candidates.
    let dead: BTreeSet<NodeId> = holders[..2].iter().copied().collect();
    let live: Vec<Candidate> = pool.iter().filter(|c| !dead.contains(&c.node)).cloned().collect();
    let healthy: BTreeMap<usize, NodeId> = holders.iter().copied().enumerate().skip(2).collect();
    let moved = replace(&policy, &live, &seed, MIB, &healthy, &[0, 1], &BTreeSet::new()).unwrap();
    assert_eq!(moved.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 1]);
    let mut after = holders.clone();
    for (i, n) in &moved {
        assert!(!dead.contains(n) && !healthy.values().any(|h| h == n));
        after[*i] = *n;
    }
    check(&policy, &registry(&pool), &after).unwrap();

    // The EU nodes left hold everything already: a third loss cannot be repaired inside the
    // fence, and is not repaired outside it.
    let healthy: BTreeMap<usize, NodeId> = after.iter().copied().enumerate().skip(1).collect();
    let inside_live: Vec<Candidate> = live.iter().filter(|c| c.node != after[0]).cloned().collect();
    let few: Vec<Candidate> = inside_live
        .into_iter()
        .filter(|c| healthy.values().any(|h| *h == c.node) || c.jurisdiction.as_str() == "US")
        .collect();
    let err = replace(&policy, &few, &seed, MIB, &healthy, &[0], &BTreeSet::new()).unwrap_err();
    assert!(matches!(err, PlacementError::TooFewNodes { eligible: 0, .. }), "{err:?}");

    // Bad requests are named.
    assert!(matches!(
        replace(&policy, &pool, &seed, MIB, &healthy, &[1], &BTreeSet::new()),
        Err(PlacementError::BadRequest(_))
    ));
    assert!(matches!(
        replace(&policy, &pool, &seed, MIB, &BTreeMap::new(), &[6], &BTreeSet::new()),
        Err(PlacementError::BadRequest(_))
    ));
}

#[test]
fn a_repair_with_room_for_some_shards_rebuilds_those_first() {
    // The devnet's eight EU, non-US nodes: six hold the segment, two are spare.
    let pool = devnet();
    let policy = eu_no_us(2, 2);
    let seed = [9u8; 32];
    let holders = place(&policy, &pool, &seed, MIB).unwrap();
    // Holders 3 and 4 die; shard 0 failed an audit but its holder is up. Three shards need a
    // home and two spare nodes remain: the dead holders' shards (first in the order) move.
    let dead: BTreeSet<NodeId> = [holders[3], holders[4]].into();
    let live: Vec<Candidate> = pool.iter().filter(|c| !dead.contains(&c.node)).cloned().collect();
    let healthy: BTreeMap<usize, NodeId> = [1, 2, 5].iter().map(|i| (*i, holders[*i])).collect();
    let exclude: BTreeSet<NodeId> = [holders[0], holders[3], holders[4]].into();
    let all = replace(&policy, &live, &seed, MIB, &healthy, &[3, 4, 0], &exclude);
    assert!(matches!(all, Err(PlacementError::TooFewNodes { .. })), "{all:?}");
    let (moves, short) = replace_what_fits(&policy, &live, &seed, MIB, &healthy, &[3, 4, 0], &exclude);
    assert_eq!(moves.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![3, 4]);
    assert!(matches!(short, Some(PlacementError::TooFewNodes { .. })), "{short:?}");
    let mut after = holders.clone();
    for (i, n) in &moves {
        assert!(!holders.contains(n), "a new holder is a spare node");
        after[*i] = *n;
    }
    check(&policy, &registry(&pool), &after).unwrap();
    // With room for all, all move and nothing waits; with room for none, none.
    let (moves, short) = replace_what_fits(&policy, &live, &seed, MIB, &healthy, &[3, 4], &exclude);
    assert_eq!((moves.len(), short.is_none()), (2, true));
    let crowded: Vec<Candidate> = live.iter().filter(|c| holders.contains(&c.node)).cloned().collect();
    let (moves, short) = replace_what_fits(&policy, &crowded, &seed, MIB, &healthy, &[3, 4, 0], &exclude);
    assert!(moves.is_empty() && short.is_some());
    // A bad request is not retried smaller.
    let (moves, short) = replace_what_fits(&policy, &live, &seed, MIB, &healthy, &[1, 3], &exclude);
    assert!(moves.is_empty() && matches!(short, Some(PlacementError::BadRequest(_))));
}

#[test]
fn check_names_each_violation() {
    let pool = devnet();
    let reg = registry(&pool);
    let policy = eu_no_us(1, 1);
    let good = [1, 2, 3, 5, 6, 7].map(node).to_vec();
    check(&policy, &reg, &good).unwrap();
    let mut us = good.clone();
    us[4] = node(10);
    let err = check(&policy, &reg, &us).unwrap_err();
    assert!(matches!(err, Violation::OutsideFence { index: 4, .. }), "{err:?}");
    assert!(
        err.to_string().contains("(eu-de, DE, bigcloud under US), outside the geofence (in regions [eu] outside US"),
        "{err}"
    );
    let mut twice = good.clone();
    twice[5] = node(1);
    assert!(matches!(check(&policy, &reg, &twice), Err(Violation::SharedNode { first: 0, second: 5, .. })));
    let mut unknown = good.clone();
    unknown[0] = node(99);
    assert!(matches!(check(&policy, &reg, &unknown), Err(Violation::UnknownNode { index: 0, .. })));
    assert!(matches!(check(&policy, &reg, &good[..5]), Err(Violation::ShardCount { want: 6, got: 5, .. })));
}

#[test]
fn duties_are_shared_out_and_move_only_with_their_holder() {
    let nodes: Vec<NodeId> = (1..=12).map(node).collect();
    let mut counts: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut moved = 0;
    for s in 0..1200u16 {
        let mut seed = [0u8; 32];
        seed[30..].copy_from_slice(&s.to_be_bytes());
        let holder = duty_holder(&seed, nodes.iter().copied()).unwrap();
        let reversed = duty_holder(&seed, nodes.iter().rev().copied()).unwrap();
        assert_eq!(holder, reversed);
        *counts.entry(holder).or_default() += 1;
        let without_n5 = duty_holder(&seed, nodes.iter().copied().filter(|n| *n != node(5))).unwrap();
        if holder != node(5) {
            assert_eq!(without_n5, holder, "a duty moved although its holder stayed");
        } else {
            moved += 1;
        }
    }
    assert_eq!(counts.len(), 12);
    assert!(counts.values().all(|&c| (50..=150).contains(&c)), "{counts:?}");
    assert_eq!(moved, counts[&node(5)]);
    assert_eq!(duty_holder(&[0; 32], std::iter::empty()), None);
}

#[test]
fn every_node_has_one_place_in_line_for_a_duty() {
    let nodes: Vec<NodeId> = (1..=12).map(node).collect();
    for s in 0..200u16 {
        let mut seed = [0u8; 32];
        seed[..2].copy_from_slice(&s.to_be_bytes());
        let ranks: Vec<usize> = nodes.iter().map(|n| duty_rank(&seed, nodes.iter().copied(), n).unwrap()).collect();
        // A permutation of 0..12, the same whatever order the nodes come in.
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..12).collect::<Vec<_>>());
        for (n, r) in nodes.iter().zip(&ranks) {
            assert_eq!(duty_rank(&seed, nodes.iter().rev().copied(), n), Some(*r));
            // Within a bound: the rank when it is at most the bound, else nothing.
            for max in [0, 1, 5, 11] {
                let within = duty_rank_within(&seed, nodes.iter().copied(), n, max);
                assert_eq!(within, (*r <= max).then_some(*r), "rank {r}, max {max}");
            }
        }
        // Rank r is the duty holder once the nodes ranked before it are gone.
        for r in 0..12 {
            let at = nodes[ranks.iter().position(|x| *x == r).unwrap()];
            let rest = nodes.iter().zip(&ranks).filter(|(_, x)| **x >= r).map(|(n, _)| *n);
            assert_eq!(duty_holder(&seed, rest), Some(at));
        }
    }
    assert_eq!(duty_rank(&[0; 32], (1..=3).map(node), &node(9)), None);
    assert_eq!(duty_rank(&[0; 32], std::iter::empty(), &node(1)), None);
}

fn arb_candidate(i: u8) -> impl Strategy<Value = Candidate> {
    (0usize..5, 0usize..4, 0usize..3, 0u64..4, 0u16..=1000).prop_map(move |(r, o, j, free, rep)| {
        let regions = ["eu-de", "eu-fr", "eu-nl", "us-east", "ap-jp"];
        let countries = ["DE", "FR", "NL", "US", "JP"];
        Candidate {
            node: node(i),
            region: regions[r].parse().unwrap(),
            country: countries[r].parse().unwrap(),
            operator: format!("op{o}"),
            jurisdiction: ["DE", "US", "FR"][j].parse().unwrap(),
            free_bytes: free * MIB,
            reputation: rep,
        }
    })
}

fn arb_pool() -> impl Strategy<Value = Vec<Candidate>> {
    (1u8..40).prop_flat_map(|n| (1..=n).map(arb_candidate).collect::<Vec<_>>())
}

fn arb_policy() -> impl Strategy<Value = PlacementPolicy> {
    (1u8..=6, 1u8..=3, 1u8..=3, 1u8..=3, any::<bool>(), any::<bool>()).prop_map(|(k, m, r, o, eu, no_us)| {
        let mut p = PlacementPolicy::anywhere(ErasureCode::new(k, m).unwrap());
        p.min_regions = r;
        p.min_operators = o;
        if eu {
            p.regions.insert("eu".parse().unwrap());
        }
        if no_us {
            p.deny_jurisdictions.insert("US".parse().unwrap());
        }
        p
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever the pool and policy: a placement is k+m distinct eligible nodes meeting the
    /// domain minimums, the same in any candidate order; a refusal happens only when the
    /// eligible nodes or their domains are really too few, or the greedy spread says so.
    #[test]
    fn placements_hold_the_policy(pool in arb_pool(), policy in arb_policy(), seed: [u8; 32], rot in 0usize..40) {
        let shard = MIB;
        let mut rotated = pool.clone();
        rotated.rotate_left(rot % pool.len());
        rotated.reverse();
        let a = place(&policy, &pool, &seed, shard);
        let b = place(&policy, &rotated, &seed, shard);
        prop_assert_eq!(&a, &b);
        let eligible_nodes: Vec<&Candidate> = pool.iter().filter(|c| eligible(&policy, c, shard)).collect();
        match a {
            Ok(holders) => {
                prop_assert_eq!(holders.len(), policy.code.total());
                prop_assert!(check(&policy, &registry(&pool), &holders).is_ok());
                let chosen: Vec<&&Candidate> = holders.iter().map(|h| eligible_nodes.iter().find(|c| c.node == *h).unwrap()).collect();
                let regions: BTreeSet<_> = chosen.iter().map(|c| &c.region).collect();
                let operators: BTreeSet<_> = chosen.iter().map(|c| &c.operator).collect();
                prop_assert!(regions.len() >= usize::from(policy.min_regions));
                prop_assert!(operators.len() >= usize::from(policy.min_operators));
            }
            Err(PlacementError::TooFewNodes { eligible, .. }) => {
                prop_assert_eq!(eligible, eligible_nodes.len());
                prop_assert!(eligible < policy.code.total());
            }
            Err(PlacementError::TooFewDomains { domain, found, needed, .. }) => {
                let names: BTreeSet<&str> = eligible_nodes
                    .iter()
                    .map(|c| if domain == "region" { c.region.as_str() } else { c.operator.as_str() })
                    .collect();
                prop_assert_eq!(found, names.len());
                prop_assert!(found < needed);
            }
            Err(PlacementError::Spread { .. }) => {
                // Only when the two minimums together leave the greedy spread no slack.
                prop_assert!(usize::from(policy.min_regions) + usize::from(policy.min_operators) > policy.code.total() + 1);
            }
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    /// Repairs never leave the fence, never reuse a healthy or excluded holder.
    #[test]
    fn repairs_hold_the_policy(pool in arb_pool(), policy in arb_policy(), seed: [u8; 32], lose in 1usize..4) {
        let Ok(holders) = place(&policy, &pool, &seed, MIB) else { return Ok(()) };
        let lose = lose.min(holders.len());
        let healthy: BTreeMap<usize, NodeId> = holders.iter().copied().enumerate().skip(lose).collect();
        let exclude: BTreeSet<NodeId> = holders[..lose].iter().copied().collect();
        let missing: Vec<usize> = (0..lose).collect();
        if let Ok(moved) = replace(&policy, &pool, &seed, MIB, &healthy, &missing, &exclude) {
            let mut after = holders.clone();
            for (i, n) in moved {
                prop_assert!(!exclude.contains(&n));
                after[i] = n;
            }
            prop_assert!(check(&policy, &registry(&pool), &after).is_ok());
        }
    }
}
