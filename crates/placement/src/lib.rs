//! Which nodes hold the shards of a segment: a pure function of a bucket's placement policy, the
//! candidate nodes (from finalized ledger state) and a seed, so anyone can re-check a placement.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and draws no randomness; the
//! seed comes in as an argument (the object id and segment index), and equal inputs give equal
//! outputs on every machine.
//!
//! The rules, in order:
//! 1. **The geofence is absolute.** Only nodes inside the policy's geofence
//!    ([`PlacementPolicy::allows`]), with at least [`MIN_REPUTATION`] and room for the shard, are
//!    candidates; no fallback ever places outside it. Repairs follow the same rule.
//! 2. **k+m distinct nodes**, spread over failure domains: each pick prefers a node that adds a
//!    region or operator the segment still lacks, then the least-used region and operator.
//! 3. **Load spreading:** among equals, higher reputation bands come first, then a rendezvous
//!    hash of seed and node id, so segments land on different nodes and a node's departure moves
//!    only its own shards.
//!
//! The spread step is greedy: every pick adds a lacking region or operator while one exists among
//! the eligible nodes, and the first adds both, so it needs at most `min_regions + min_operators
//! - 1` picks. With `min_regions + min_operators <= k + m + 1` it therefore refuses only when the
//! fence really holds too few regions or operators ([`PlacementError::TooFewDomains`]); above
//! that it may refuse a placement that exists ([`PlacementError::Spread`]).

use archipel_types::{CountryCode, NodeId, PlacementPolicy, Region};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Highest reputation; new nodes start here.
pub const MAX_REPUTATION: u16 = 1000;
/// Nodes below this reputation receive no new shards.
pub const MIN_REPUTATION: u16 = 200;
/// Reputation is compared in bands of this width: within a band, the hash decides.
pub const REPUTATION_BAND: u16 = 250;

/// A node that might hold shards, as finalized state describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The node.
    pub node: NodeId,
    /// Its region.
    pub region: Region,
    /// Where its hardware is.
    pub country: CountryCode,
    /// Who runs it.
    pub operator: String,
    /// The jurisdiction its operator answers to.
    pub jurisdiction: CountryCode,
    /// Bytes it can still take.
    pub free_bytes: u64,
    /// 0 to [`MAX_REPUTATION`]; lowered by failed audits.
    pub reputation: u16,
}

impl Candidate {
    fn inside(&self, policy: &PlacementPolicy) -> bool {
        policy.allows(&self.region, self.country, self.jurisdiction)
    }
}

/// Why no placement exists.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Not enough eligible nodes.
    #[error("{}", too_few(.code, *.needed, *.eligible, *.live, .fence, *.shard_bytes))]
    TooFewNodes {
        /// The code, e.g. `4+2`.
        code: String,
        /// Nodes needed (new shards to place).
        needed: usize,
        /// Eligible nodes (inside the geofence, reputable, with room, not already holding).
        eligible: usize,
        /// All candidate nodes given.
        live: usize,
        /// The geofence in words.
        fence: String,
        /// Bytes each shard needs.
        shard_bytes: u64,
    },
    /// A failure-domain minimum cannot be met.
    #[error(
        "shards must cover {needed} {domain}s, but the nodes {fence} with room span {found} ({names}) — \
         lower min_{domain}s to {found} or add nodes in another {domain}"
    )]
    TooFewDomains {
        /// `region` or `operator`.
        domain: &'static str,
        /// The policy's minimum.
        needed: usize,
        /// Domains reachable.
        found: usize,
        /// Their names.
        names: String,
        /// The geofence in words.
        fence: String,
    },
    /// Enough domains exist, but the greedy spread could not cover both minimums with the
    /// segment's shards (see the module docs).
    #[error(
        "could not spread {shards} shards over {min_regions} regions and {min_operators} operators at once {fence} — \
         lower min_regions or min_operators, or add nodes that are both in a new region and under a new operator"
    )]
    Spread {
        /// Shards of a segment.
        shards: usize,
        /// The policy's region minimum.
        min_regions: usize,
        /// The policy's operator minimum.
        min_operators: usize,
        /// The geofence in words.
        fence: String,
    },
    /// Shard indices out of range or already held, in a repair request.
    #[error("invalid repair request: {0}")]
    BadRequest(String),
}

fn too_few(code: &str, needed: usize, eligible: usize, live: usize, fence: &str, shard_bytes: u64) -> String {
    let mut s = format!(
        "code {code} needs {needed} nodes {fence} with {} free; {eligible} of the {live} live nodes qualify",
        human(shard_bytes)
    );
    let parity: Option<usize> = code.split_once('+').and_then(|(_, m)| m.parse().ok());
    match parity {
        Some(m) if eligible > m => s.push_str(&format!(" — add nodes or lower the code to {}+{m}", eligible - m)),
        _ if eligible >= 2 => s.push_str(&format!(" — add nodes or lower the code to {}+1", eligible - 1)),
        _ => s.push_str(" — add nodes inside the geofence or widen it"),
    }
    s
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// Why an existing placement breaks its policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A holder outside the geofence.
    #[error("shard {index} is on node {holder}, outside the geofence ({fence})")]
    OutsideFence {
        /// Shard index.
        index: usize,
        /// The node, with its region, country, operator and jurisdiction.
        holder: String,
        /// The geofence in words.
        fence: String,
    },
    /// One node holds two shards of a segment.
    #[error("node {node} holds shards {first} and {second} of one segment")]
    SharedNode {
        /// The node (short id).
        node: String,
        /// One shard index.
        first: usize,
        /// The other.
        second: usize,
    },
    /// A holder the registry does not know.
    #[error("shard {index} is on node {node}, which is not registered")]
    UnknownNode {
        /// Shard index.
        index: usize,
        /// The node (short id).
        node: String,
    },
    /// Not k+m holders.
    #[error("a segment of code {code} has {want} shards, this one lists {got}")]
    ShardCount {
        /// The code.
        code: String,
        /// k+m.
        want: usize,
        /// Listed.
        got: usize,
    },
}

/// The rendezvous score of `node` for `seed`: lower comes first.
fn score(seed: &[u8; 32], node: &NodeId) -> [u8; 32] {
    *blake3::Hasher::new_derive_key("archipel 2026-11 placement rendezvous v1")
        .update(seed)
        .update(node.as_bytes())
        .finalize()
        .as_bytes()
}

fn band(reputation: u16) -> u16 {
    reputation.min(MAX_REPUTATION) / REPUTATION_BAND
}

/// Whether `c` may receive a new shard of `shard_bytes` under `policy`.
pub fn eligible(policy: &PlacementPolicy, c: &Candidate, shard_bytes: u64) -> bool {
    c.inside(policy) && c.reputation >= MIN_REPUTATION && c.free_bytes >= shard_bytes
}

/// Tally of the failure domains already used by a segment.
#[derive(Default)]
struct Domains<'a> {
    regions: BTreeMap<&'a str, usize>,
    operators: BTreeMap<&'a str, usize>,
}

impl<'a> Domains<'a> {
    fn add(&mut self, c: &'a Candidate) {
        *self.regions.entry(c.region.as_str()).or_default() += 1;
        *self.operators.entry(c.operator.as_str()).or_default() += 1;
    }
}

/// Chooses `count` nodes for new shards of one segment. `holding` are the nodes that already
/// hold the segment's other shards (they count toward its failure domains and are never chosen
/// again); `exclude` are nodes that must not be chosen (e.g. the holder that failed an audit).
fn choose<'a>(
    policy: &PlacementPolicy,
    candidates: &'a [Candidate],
    seed: &[u8; 32],
    shard_bytes: u64,
    count: usize,
    holding: &[&'a Candidate],
    exclude: &BTreeSet<NodeId>,
) -> Result<Vec<&'a Candidate>, PlacementError> {
    let taken: BTreeSet<NodeId> = holding.iter().map(|c| c.node).chain(exclude.iter().copied()).collect();
    let mut seen = BTreeSet::new();
    let mut pool: Vec<(u16, [u8; 32], &Candidate)> = candidates
        .iter()
        .filter(|c| !taken.contains(&c.node) && eligible(policy, c, shard_bytes) && seen.insert(c.node))
        .map(|c| (band(c.reputation), score(seed, &c.node), c))
        .collect();
    if pool.len() < count {
        return Err(PlacementError::TooFewNodes {
            code: policy.code.to_string(),
            needed: count,
            eligible: pool.len(),
            live: candidates.len(),
            fence: policy.describe_fence(),
            shard_bytes,
        });
    }
    // Rank: higher reputation band first, then the rendezvous hash.
    pool.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));

    let mut domains = Domains::default();
    for c in holding {
        domains.add(c);
    }
    let min_regions = usize::from(policy.min_regions);
    let min_operators = usize::from(policy.min_operators);
    let mut chosen = Vec::with_capacity(count);
    for _ in 0..count {
        let lacks_region = domains.regions.len() < min_regions;
        let lacks_operator = domains.operators.len() < min_operators;
        let (at, _) = pool
            .iter()
            .enumerate()
            .map(|(i, (_, _, c))| {
                let region_uses = domains.regions.get(c.region.as_str()).copied().unwrap_or(0);
                let operator_uses = domains.operators.get(c.operator.as_str()).copied().unwrap_or(0);
                let adds =
                    usize::from(lacks_region && region_uses == 0) + usize::from(lacks_operator && operator_uses == 0);
                // Smallest key wins; the pool's order (rank) breaks ties because `min_by_key`
                // keeps the first of equal keys.
                (i, (std::cmp::Reverse(adds), region_uses + operator_uses, region_uses))
            })
            .min_by_key(|(_, key)| *key)
            .expect("the pool holds at least `count` nodes");
        let (_, _, c) = pool.remove(at);
        domains.add(c);
        chosen.push(c);
    }

    let all: Vec<&Candidate> = candidates.iter().filter(|c| !exclude.contains(&c.node)).collect();
    for (domain, needed, got) in
        [("region", min_regions, domains.regions.len()), ("operator", min_operators, domains.operators.len())]
    {
        if got < needed {
            // Report every domain the fence and capacity allow, not only the chosen ones.
            let names: BTreeSet<&str> = all
                .iter()
                .filter(|c| holding.iter().any(|h| h.node == c.node) || eligible(policy, c, shard_bytes))
                .map(|c| if domain == "region" { c.region.as_str() } else { c.operator.as_str() })
                .collect();
            if names.len() >= needed {
                return Err(PlacementError::Spread {
                    shards: policy.code.total(),
                    min_regions,
                    min_operators,
                    fence: policy.describe_fence(),
                });
            }
            return Err(PlacementError::TooFewDomains {
                domain,
                needed,
                found: names.len(),
                names: names.into_iter().collect::<Vec<_>>().join(", "),
                fence: policy.describe_fence(),
            });
        }
    }
    Ok(chosen)
}

/// The k+m holders of a new segment, in shard order: deterministic in `(policy, candidates,
/// seed, shard_bytes)`, whatever order the candidates come in.
pub fn place(
    policy: &PlacementPolicy,
    candidates: &[Candidate],
    seed: &[u8; 32],
    shard_bytes: u64,
) -> Result<Vec<NodeId>, PlacementError> {
    let chosen = choose(policy, candidates, seed, shard_bytes, policy.code.total(), &[], &BTreeSet::new())?;
    Ok(chosen.into_iter().map(|c| c.node).collect())
}

/// Whether a bucket with `policy` could place a segment now: the check behind "bucket create",
/// which refuses a policy the live network cannot satisfy, with the numbers.
pub fn feasible(policy: &PlacementPolicy, candidates: &[Candidate], shard_bytes: u64) -> Result<(), PlacementError> {
    place(policy, candidates, &[0; 32], shard_bytes).map(drop)
}

/// New holders for the shards `missing` of a segment whose healthy shards are on `healthy`
/// (shard index → node). `exclude` lists nodes that must not receive them (the holders being
/// replaced, if still live). Returns `(shard index, new holder)` pairs, inside the geofence
/// always; an error when the fence holds too few nodes with room, and the segment stays degraded.
pub fn replace(
    policy: &PlacementPolicy,
    candidates: &[Candidate],
    seed: &[u8; 32],
    shard_bytes: u64,
    healthy: &BTreeMap<usize, NodeId>,
    missing: &[usize],
    exclude: &BTreeSet<NodeId>,
) -> Result<Vec<(usize, NodeId)>, PlacementError> {
    let total = policy.code.total();
    let missing_set: BTreeSet<usize> = missing.iter().copied().collect();
    if missing_set.len() != missing.len() || missing.iter().any(|&i| i >= total || healthy.contains_key(&i)) {
        return Err(PlacementError::BadRequest(format!(
            "shards {missing:?} must be distinct, below {total}, and not among the healthy ones"
        )));
    }
    let by_id: BTreeMap<NodeId, &Candidate> = candidates.iter().map(|c| (c.node, c)).collect();
    // Healthy holders no longer registered still occupy their node (never chosen twice) but add
    // no known failure domain.
    let holding: Vec<&Candidate> = healthy.values().filter_map(|n| by_id.get(n).copied()).collect();
    let mut exclude = exclude.clone();
    exclude.extend(healthy.values().copied());
    let chosen = choose(policy, candidates, seed, shard_bytes, missing.len(), &holding, &exclude)?;
    Ok(missing.iter().copied().zip(chosen.into_iter().map(|c| c.node)).collect())
}

/// Like [`replace`], but when the fence has room for only some of the `missing` shards, new
/// holders for as many as fit: `missing` is in priority order (shards whose holder is gone
/// first), and the shards at its end wait. Returns the moves and, if any shard waits, why.
/// A repair that can rebuild two of three shards should not rebuild none.
pub fn replace_what_fits(
    policy: &PlacementPolicy,
    candidates: &[Candidate],
    seed: &[u8; 32],
    shard_bytes: u64,
    healthy: &BTreeMap<usize, NodeId>,
    missing: &[usize],
    exclude: &BTreeSet<NodeId>,
) -> (Vec<(usize, NodeId)>, Option<PlacementError>) {
    let first = match replace(policy, candidates, seed, shard_bytes, healthy, missing, exclude) {
        Ok(moves) => return (moves, None),
        Err(e @ PlacementError::BadRequest(_)) => return (Vec::new(), Some(e)),
        Err(e) => e,
    };
    for n in (1..missing.len()).rev() {
        // The shards that wait keep their holder for now (the caller excludes it); their
        // failure domains are not counted, so the spread asked of the others errs on the safe side.
        if let Ok(moves) = replace(policy, candidates, seed, shard_bytes, healthy, &missing[..n], exclude) {
            return (moves, Some(first));
        }
    }
    (Vec::new(), Some(first))
}

/// Checks that a segment's holders (`holders[i]` holds shard `i`) respect `policy`: k+m of them,
/// distinct, each registered and inside the geofence. Failure-domain minimums are a placement
/// goal, not checked here: after a region is lost, a repair keeps data inside the fence even if
/// it cannot keep the spread.
pub fn check(
    policy: &PlacementPolicy,
    registry: &BTreeMap<NodeId, Candidate>,
    holders: &[NodeId],
) -> Result<(), Violation> {
    let want = policy.code.total();
    if holders.len() != want {
        return Err(Violation::ShardCount { code: policy.code.to_string(), want, got: holders.len() });
    }
    let mut first: BTreeMap<NodeId, usize> = BTreeMap::new();
    for (index, node) in holders.iter().enumerate() {
        if let Some(&prev) = first.get(node) {
            return Err(Violation::SharedNode { node: node.short(), first: prev, second: index });
        }
        first.insert(*node, index);
        let c = registry.get(node).ok_or_else(|| Violation::UnknownNode { index, node: node.short() })?;
        if !c.inside(policy) {
            return Err(Violation::OutsideFence { index, holder: c.to_string(), fence: policy.describe_fence() });
        }
    }
    Ok(())
}

/// The node that owes a duty keyed by `seed` (e.g. repairing one segment): the lowest rendezvous
/// score among `nodes`. Every honest node computes the same answer from the same finalized state;
/// when the chosen node dies, only its duties move.
pub fn duty_holder(seed: &[u8; 32], nodes: impl IntoIterator<Item = NodeId>) -> Option<NodeId> {
    nodes.into_iter().min_by_key(|n| (score(seed, n), *n))
}

/// Where `me` stands in line for the duty keyed by `seed` among `nodes`: 0 for the
/// [`duty_holder`], 1 for the node that would hold it without that one, and so on; `None` when
/// `me` is not among `nodes`. Backups use it to take a duty up when the nodes before them have
/// left it undone for long enough (a holder that is up but cannot or will not do it).
pub fn duty_rank(seed: &[u8; 32], nodes: impl IntoIterator<Item = NodeId>, me: &NodeId) -> Option<usize> {
    duty_rank_within(seed, nodes, me, usize::MAX)
}

/// [`duty_rank`] when it is at most `max`, else `None`, counted only until more than `max`
/// nodes are found ahead: a node far down the line learns so after reading a fraction of a
/// large network.
pub fn duty_rank_within(
    seed: &[u8; 32],
    nodes: impl IntoIterator<Item = NodeId>,
    me: &NodeId,
    max: usize,
) -> Option<usize> {
    let mine = (score(seed, me), *me);
    let (mut ahead, mut found) = (0usize, false);
    for n in nodes {
        if n == *me {
            found = true;
        } else if (score(seed, &n), n) < mine {
            ahead += 1;
            if ahead > max {
                return None;
            }
        }
    }
    found.then_some(ahead)
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {}, {} under {})",
            self.node.short(),
            self.region,
            self.country,
            self.operator,
            self.jurisdiction
        )
    }
}
