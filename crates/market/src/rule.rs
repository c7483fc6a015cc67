//! The rules anyone can re-check from finalized state: whether a provider can take a job (and
//! why not), what a sealed bid commits to, and the **winner rule**.
//!
//! **Winner rule.** Among the revealed bids at or below the job's max price, from providers that
//! are inside its geofence and not excluded (a provider whose lease on this job lapsed, or that
//! already ran it), each bid's *score* is its price divided by the provider's reliability:
//! `price × 1,000,000 / reliability_ppm`, where `reliability_ppm = 1,000,000 × (accepted + 1) /
//! (accepted + penalized + 2)` from the provider's record on the ledger (a newcomer is at 50 %, a
//! provider with 98 accepted runs and no penalty at 99 %, one penalized as often as accepted at
//! 50 %). Bids are ranked by score, then by `BLAKE3(job id ‖ provider)` (no bidder can choose its
//! place in a tie). Winners are taken from the top: first each from an operator *and* region not
//! yet taken, then, if slots remain, each from an operator not yet taken. Never two winners from one
//! operator: redundancy that one operator can fake is no redundancy. Each winner is paid its own
//! bid.

use crate::Micro;
use archipel_types::{CountryCode, Geofence, NodeId, Region};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A provider's record of runs, from the ledger.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Record {
    /// Results accepted (in the majority).
    pub accepted: u32,
    /// Penalties: lapsed leases, dissenting results, bids committed and not revealed.
    pub penalized: u32,
}

impl Record {
    /// Reliability in parts per million: `(accepted + 1) / (accepted + penalized + 2)`.
    pub fn reliability_ppm(&self) -> u64 {
        let a = u64::from(self.accepted) + 1;
        a * 1_000_000 / (a + u64::from(self.penalized) + 1)
    }
}

/// A provider as the market sees it, from finalized state.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Provider {
    /// The node.
    pub node: NodeId,
    /// Who runs it (winners of one job have distinct operators).
    pub operator: String,
    /// Its region.
    pub region: Region,
    /// Its country.
    pub country: CountryCode,
    /// Its operator's jurisdiction.
    pub jurisdiction: CountryCode,
    /// Its record.
    pub record: Record,
}

/// What a provider's bidder knows of itself beyond the ledger: its price and free capacity.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Offer {
    /// The least it takes for one run.
    pub price_floor_micro: Micro,
    /// Jobs it can run now besides those it runs.
    pub free_slots: u32,
    /// The most memory it gives one job.
    pub max_memory_bytes: u64,
    /// The most CPU time it gives one job.
    pub max_cpu_ms: u64,
}

/// Why a provider does not bid on a job (recorded so that `archipel job why` can say it).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Decline {
    /// Outside the job's geofence.
    Geofence,
    /// Its floor is above the job's max price.
    PriceFloor {
        /// The provider's floor.
        floor_micro: Micro,
        /// The job's max price.
        max_micro: Micro,
    },
    /// No free slot.
    NoCapacity,
    /// The job asks more memory or CPU than it gives one job.
    Limits {
        /// What was too much, e.g. "memory 8 GiB > 2 GiB".
        what: String,
    },
    /// Excluded from this job (its lease lapsed, or it already ran it).
    Excluded,
}

impl std::fmt::Display for Decline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decline::Geofence => f.write_str("outside the job's geofence"),
            Decline::PriceFloor { floor_micro, max_micro } => {
                write!(f, "price floor {floor_micro} above the job's max price {max_micro}")
            }
            Decline::NoCapacity => f.write_str("no free capacity"),
            Decline::Limits { what } => write!(f, "asks more than it gives one job: {what}"),
            Decline::Excluded => f.write_str("excluded from this job (lapsed lease or already ran it)"),
        }
    }
}

/// Whether `provider` can bid on a job asking `geofence`, `max_micro` and the given memory and
/// CPU: its bid price (its floor), or why not.
pub fn evaluate(
    provider: &Provider,
    offer: &Offer,
    geofence: &Geofence,
    max_micro: Micro,
    memory_bytes: u64,
    cpu_ms: u64,
) -> Result<Micro, Decline> {
    if !geofence.allows(&provider.region, provider.country, provider.jurisdiction) {
        return Err(Decline::Geofence);
    }
    if offer.price_floor_micro > max_micro {
        return Err(Decline::PriceFloor { floor_micro: offer.price_floor_micro, max_micro });
    }
    if memory_bytes > offer.max_memory_bytes {
        return Err(Decline::Limits { what: format!("memory {memory_bytes} > {}", offer.max_memory_bytes) });
    }
    if cpu_ms > offer.max_cpu_ms {
        return Err(Decline::Limits { what: format!("CPU {cpu_ms} ms > {} ms", offer.max_cpu_ms) });
    }
    if offer.free_slots == 0 {
        return Err(Decline::NoCapacity);
    }
    Ok(offer.price_floor_micro)
}

/// What a sealed bid commits to: `BLAKE3("archipel bid" ‖ job ‖ provider ‖ round ‖ price ‖ salt)`.
/// The round is in it so that a reveal cannot be replayed into a later auction of the same job.
pub fn commitment(job: &[u8; 32], provider: &NodeId, round: u32, price: Micro, salt: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("archipel sealed bid");
    h.update(job).update(&provider.0).update(&round.to_le_bytes()).update(&price.to_le_bytes()).update(salt);
    *h.finalize().as_bytes()
}

/// What a sealed result commits to: `BLAKE3("archipel sealed result" ‖ job ‖ provider ‖ outcome ‖
/// salt)`, the outcome as a tag byte then the output hash (0) or the failure's length and name (1).
/// The provider is in it, so one provider's seal cannot be replayed as another's.
pub fn result_commitment(job: &[u8; 32], provider: &NodeId, outcome: &crate::RunOutcome, salt: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("archipel sealed result");
    h.update(job).update(&provider.0);
    match outcome {
        crate::RunOutcome::Success { output } => h.update(&[0]).update(output),
        crate::RunOutcome::Failed { end } => {
            h.update(&[1]).update(&(end.len() as u64).to_le_bytes()).update(end.as_bytes())
        }
    };
    h.update(salt);
    *h.finalize().as_bytes()
}

/// A revealed bid with what the rule needs of its provider.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Bid {
    /// The provider.
    pub provider: Provider,
    /// Its price for one run.
    pub price_micro: Micro,
}

impl Bid {
    /// `price × 1,000,000 / reliability_ppm` (lower is better).
    pub fn score(&self) -> u128 {
        u128::from(self.price_micro) * 1_000_000 / u128::from(self.provider.record.reliability_ppm().max(1))
    }
}

fn tie_break(job: &[u8; 32], node: &NodeId) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("archipel winner tie-break");
    h.update(job).update(&node.0);
    *h.finalize().as_bytes()
}

/// The bids eligible for `job` (price ≤ max, inside the geofence, not excluded), best first.
pub fn rank<'a>(
    job: &[u8; 32],
    bids: impl IntoIterator<Item = &'a Bid>,
    geofence: &Geofence,
    max_micro: Micro,
    excluded: &BTreeSet<NodeId>,
) -> Vec<&'a Bid> {
    let mut eligible: Vec<&Bid> = bids
        .into_iter()
        .filter(|b| b.price_micro <= max_micro)
        .filter(|b| !excluded.contains(&b.provider.node))
        .filter(|b| geofence.allows(&b.provider.region, b.provider.country, b.provider.jurisdiction))
        .collect();
    eligible.sort_by_cached_key(|b| (b.score(), tie_break(job, &b.provider.node)));
    eligible
}

/// Picks up to `slots` winners from `ranked` (best first), none from an operator in
/// `taken_operators` nor two from one operator; regions not yet taken (nor in `taken_regions`)
/// are preferred. Returns the winners in the order taken.
pub fn pick<'a>(
    ranked: &[&'a Bid],
    slots: usize,
    taken_operators: &BTreeSet<String>,
    taken_regions: &BTreeSet<Region>,
) -> Vec<&'a Bid> {
    let mut operators = taken_operators.clone();
    let mut regions = taken_regions.clone();
    let mut winners: Vec<&Bid> = Vec::new();
    for spread_regions in [true, false] {
        for b in ranked {
            if winners.len() == slots {
                return winners;
            }
            if operators.contains(&b.provider.operator) || (spread_regions && regions.contains(&b.provider.region)) {
                continue;
            }
            operators.insert(b.provider.operator.clone());
            regions.insert(b.provider.region.clone());
            winners.push(b);
        }
    }
    winners
}

/// What `archipel job why` says of a job without (enough) bids, from the declines providers
/// recorded: how many providers there are, how many are inside the geofence, and why the others
/// did not bid — e.g. `no bids: 3 providers are in regions [eu]; 3 declined: price floor above
/// your max price 20 (3, lowest floor 25)`.
pub fn explain(
    geofence: &Geofence,
    max_micro: Micro,
    providers: usize,
    declines: &[Decline],
    bids: usize,
    wanted: usize,
) -> String {
    let fence = geofence.describe();
    let outside = declines.iter().filter(|d| matches!(d, Decline::Geofence)).count();
    let inside = providers.saturating_sub(outside);
    let head = match bids {
        0 => "no bids".to_string(),
        b if b < wanted => format!("{b} bid(s) for {wanted} runs"),
        b => format!("{b} bid(s)"),
    };
    if providers == 0 {
        return format!("{head}: no provider is registered");
    }
    if inside == 0 {
        return format!("{head}: none of the {providers} providers is {fence}: widen the job's geofence");
    }
    let mut reasons: Vec<String> = Vec::new();
    let floors: Vec<Micro> = declines
        .iter()
        .filter_map(|d| if let Decline::PriceFloor { floor_micro, .. } = d { Some(*floor_micro) } else { None })
        .collect();
    if let Some(lowest) = floors.iter().min() {
        reasons.push(format!(
            "{} have a price floor above your max price {max_micro} (lowest floor {lowest}: raise --max-price)",
            floors.len()
        ));
    }
    let count = |f: fn(&Decline) -> bool| declines.iter().filter(|d| f(d)).count();
    let busy = count(|d| matches!(d, Decline::NoCapacity));
    if busy > 0 {
        reasons.push(format!("{busy} have no free capacity (the job waits for one)"));
    }
    let limits = count(|d| matches!(d, Decline::Limits { .. }));
    if limits > 0 {
        reasons.push(format!("{limits} give one job less memory or CPU than it asks (lower its limits)"));
    }
    let excluded = count(|d| matches!(d, Decline::Excluded));
    if excluded > 0 {
        reasons.push(format!("{excluded} are excluded from this job (a lapsed lease, or they ran it)"));
    }
    let silent = inside.saturating_sub(declines.len() - outside).saturating_sub(bids);
    if silent > 0 {
        reasons.push(format!("{silent} said nothing (down, or not bidding)"));
    }
    let who = if fence == "anywhere" {
        format!("{providers} providers")
    } else {
        format!("{inside} of {providers} providers are {fence}")
    };
    format!("{head}: {who}; {}", reasons.join("; "))
}
