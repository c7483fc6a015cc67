//! One job's life, as a state machine the ledger drives with finalized transactions and block
//! times: posted (escrow locked) → sealed bids (each with a bond) → reveals → award (the winner
//! rule) → leases kept alive by heartbeats → sealed results → once every run has sealed, the
//! results revealed (nobody can copy another's) → the majority accepted and paid once, the rest
//! refunded. A lapsed lease passes to the best standing-by bid at once — one outside the region
//! and operator of the lapsed lease first, since what took one run down there (an outage) may
//! take the next — or back to auction; a
//! sealed result not revealed in its window is no vote, and its run goes the same way.
//!
//! **Money.** Posting moves `max_price × N` from the tenant into the job's escrow. A sealed bid
//! moves a bond (`max_price × BOND_PERCENT / 100`, at least 1) from the provider into the job.
//! Losing bids get their bond back at the award, except the N best, which stand by (bond kept)
//! until the job ends. A bid committed and not revealed, a revealed bid the rule cannot take
//! (above the max price, outside the geofence), a lease that lapses, and a result outvoted by the
//! majority forfeit the bond — it is **burned** (`burned_micro`; nobody gains from another's
//! penalty, so a tenant cannot profit by outvoting honest providers with nodes of its own) — and
//! count as a penalty on the provider's record. When a result is accepted, each provider in the
//! majority is paid its own bid out of the escrow, exactly once, and gets its bond back;
//! everything left in the escrow goes back to the tenant. Nothing else moves money: the sum of all
//! balances, all jobs' escrows and bonds, and what was burned never changes (property-tested).
//!
//! **One node, one vote.** A node holds at most one lease per run, whether its result is posted
//! or not, and winners of one run never share an operator; the tenant cannot bid on its own job.
//! A lease lapses without a heartbeat for the TTL, and also — heartbeats or not — once its run has
//! had its wall time and a TTL more. The tenant may cancel only before the first award.
//!
//! **Failure.** When the majority outcome is a failure (the module trapped or exited non-zero
//! the same way on most providers), the job is refunded: nobody is paid, the providers that agree
//! get their bond back, outvoted ones lose it. A tenant can thus have a job run for nothing by
//! making it fail; what that costs providers is bounded by the job's CPU and wall-time limits,
//! which each provider's bidder weighs (`rule::Offer::max_cpu_ms`).
//!
//! **Limits.** A majority that hit the CPU or wall-time limit, or whose runner crashed, says more
//! of the machines than of the job, and could be claimed without running: the job runs once more
//! on other providers, the claimants excluded and unpaid, their bonds held. A later majority that
//! finished the job (a result) burns their bonds; any other decision gives them back. A limit
//! confirmed so was the tenant's own: that round's majority is paid its bids, like a result. A
//! limit sealed sooner after the award than the limit (less a lease TTL, for block times) is
//! refused at its reveal.
//!
//! **No majority.** When every run of a round has ended and no outcome has more than N/2 of them,
//! the job runs once more from a new auction, the round's providers excluded and their bonds held
//! (`Job::earlier`). The round that decides judges the earlier runs too: one with the accepted
//! result is paid its bid while fewer than N runs are paid in all (the deciding round's first);
//! the others get their bonds back — the deciding round saw their revealed results, so it may
//! pay for them but not burn them. If the rerun ends without a majority too, the tenant is
//! refunded and the bonds go back (nobody is shown to be wrong).

use crate::rule::{Bid, Provider, commitment, pick, rank};
use crate::spec::{JobLimits, JobSpec};
use crate::{MarketError, Micro};
use archipel_types::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A bid's bond as a share of the job's max price.
pub const BOND_PERCENT: u64 = 10;
/// Most sealed bids one auction round takes.
pub const MAX_COMMITS: usize = 256;
/// Auction rounds a job may go through (re-auctions after lapses or empty rounds) before the
/// tenant is refunded.
pub const MAX_ROUNDS: u32 = 16;
/// Runs again after a round without majority.
pub const MAX_RERUNS: u32 = 1;
/// Runs again after a round whose majority only hit a limit or had its runner crash (confirmed
/// elsewhere before a refund).
pub const MAX_LIMIT_RERUNS: u32 = 1;
/// Longest failure name in a result (`cpu_limit`, `exited:3`…).
pub const MAX_END_BYTES: usize = 64;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Money in and out of accounts; the ledger's accounts implement it, tests a map.
pub trait Accounts {
    /// Takes `amount` from `who`, or says it is not there.
    fn debit(&mut self, who: &NodeId, amount: Micro) -> Result<(), MarketError>;
    /// Gives `amount` to `who`.
    fn credit(&mut self, who: &NodeId, amount: Micro);
}

/// Market-wide settings, from genesis.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct MarketParams {
    /// A lease lapses when no heartbeat came for this long.
    pub lease_ttl_ms: u64,
}

/// What one run produced: its output's hash, or how it failed (the runner's end kind and code).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunOutcome {
    /// Exit code 0; the output object's hash.
    Success {
        /// BLAKE3 of the output.
        output: [u8; 32],
    },
    /// Any other end (a limit, a trap, a non-zero exit), by the runner's name for it.
    Failed {
        /// e.g. `cpu_limit`, `exited:3`.
        end: String,
    },
}

impl RunOutcome {
    /// Whether the outcome says more of the machine than of the job: a run ended by its CPU or
    /// wall-time limit (how far it got depends on the machine's speed) or by its runner crashing.
    /// Such a result is no dissent from a majority that ran to the end.
    pub fn depends_on_the_machine(&self) -> bool {
        self.is_a_limit() || matches!(self, RunOutcome::Failed { end } if end == "crashed")
    }

    /// Whether the run was ended by its CPU or wall-time limit.
    pub fn is_a_limit(&self) -> bool {
        matches!(self, RunOutcome::Failed { end } if end == "cpu_limit" || end == "wall_limit")
    }

    /// The CPU or wall-time limit of `limits` this outcome says the run hit, in ms (`None` for
    /// any other outcome).
    pub fn limit_hit(&self, limits: &JobLimits) -> Option<u64> {
        match self {
            RunOutcome::Failed { end } if end == "cpu_limit" => Some(limits.cpu_ms),
            RunOutcome::Failed { end } if end == "wall_limit" => Some(limits.wall_ms),
            _ => None,
        }
    }
}

/// A provider's lease on a job.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Lease {
    /// The winning bid.
    pub bid: Bid,
    /// When it was awarded.
    pub awarded_ms: u64,
    /// The last heartbeat (or the award).
    pub last_beat_ms: u64,
    /// Its sealed result ([`crate::rule::result_commitment`]), once committed.
    pub sealed: Option<[u8; 32]>,
    /// The block time its result was sealed at (absent before it is, and in leases sealed before
    /// the market kept it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_ms: Option<u64>,
    /// Its result, once revealed.
    pub result: Option<RunOutcome>,
}

/// A sealed bid.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Commit {
    /// [`commitment`] of the bid.
    pub digest: [u8; 32],
    /// The bond it locked.
    pub bond: Micro,
}

/// An auction round in progress.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Auction {
    /// Its number (0 for the first).
    pub round: u32,
    /// Sealed bids are taken until then.
    pub commit_until_ms: u64,
    /// Reveals are taken until then; the award follows (sooner once every sealed bid is
    /// revealed: see [`Auction::award_at_ms`]).
    pub reveal_until_ms: u64,
    /// Runs it awards.
    pub slots: usize,
    /// Sealed bids, by provider.
    pub commits: BTreeMap<NodeId, Commit>,
    /// Revealed bids, by provider.
    pub bids: BTreeMap<NodeId, Bid>,
}

impl Auction {
    /// When the auction is awarded: at the end of the reveal phase, or at the first block once
    /// every sealed bid is revealed — no bid can be added or changed then (sealed bids closed
    /// before the first reveal was taken), so waiting out the window would only delay the run.
    pub fn award_at_ms(&self) -> u64 {
        if !self.commits.is_empty() && self.bids.len() == self.commits.len() {
            self.commit_until_ms
        } else {
            self.reveal_until_ms
        }
    }
}

/// How a job ended.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Ended {
    /// A majority outcome was accepted and paid.
    Accepted {
        /// The outcome.
        outcome: RunOutcome,
        /// When.
        at_ms: u64,
    },
    /// The tenant got the escrow back.
    Refunded {
        /// Why.
        why: String,
        /// When.
        at_ms: u64,
    },
    /// The tenant cancelled it.
    Cancelled {
        /// When.
        at_ms: u64,
    },
}

/// Something the ledger records besides money: for provider records and the job's history.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A lease was awarded (at the auction's end, or from standing by after a lapse).
    Awarded {
        /// The provider.
        provider: NodeId,
        /// Its price.
        price_micro: Micro,
    },
    /// A provider lost its bond and gets a penalty on its record.
    Penalized {
        /// The provider.
        provider: NodeId,
        /// Why (`not_revealed`, `lapsed`, `outvoted`).
        why: &'static str,
    },
    /// A provider's result was accepted and paid.
    Paid {
        /// The provider.
        provider: NodeId,
        /// How much.
        amount_micro: Micro,
    },
    /// A new auction round opened.
    Reopened {
        /// Its number.
        round: u32,
        /// Runs it awards.
        slots: usize,
    },
    /// The job ended.
    Ended(Ended),
}

/// A job on the ledger.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Job {
    /// Its id (the posting transaction's hash).
    pub id: [u8; 32],
    /// Who posted it.
    pub tenant: NodeId,
    /// What was asked.
    pub spec: JobSpec,
    /// When it was posted.
    pub posted_ms: u64,
    /// Money still held for payments.
    pub escrow_micro: Micro,
    /// Bonds held, by provider (sealed bids, winners, standing by).
    pub bonds: BTreeMap<NodeId, Micro>,
    /// The auction open now, if any.
    pub auction: Option<Auction>,
    /// Rounds opened so far.
    pub rounds: u32,
    /// Reruns after a round without majority.
    pub reruns: u32,
    /// Reruns after a round whose majority only hit a limit (absent while 0: the encoding of
    /// jobs without one is unchanged).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub limit_reruns: u32,
    /// Providers whose limit or crash (the majority of their round) sent the job to run once
    /// more: excluded, their bonds held until a later round decides (absent while empty).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub limit_claimants: BTreeSet<NodeId>,
    /// Runs of earlier rounds that decided nothing (no majority, or a limit to confirm), with
    /// their results: the round that decides the job judges them too (absent while empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<Lease>,
    /// Leases of the current run (active, and ended with a result).
    pub leases: Vec<Lease>,
    /// Bids that lost the last award, best first: the first takes a lapsed lease at once.
    pub standby: Vec<Bid>,
    /// Providers that may not take this job again (lapsed, or ran it in a round without majority).
    pub excluded: BTreeSet<NodeId>,
    /// Providers paid for it (at most once each, at most N).
    pub paid: BTreeSet<NodeId>,
    /// Bonds forfeited (burned: the ledger adds them to the fees burned, nobody receives them).
    pub burned_micro: Micro,
    /// Sealed results are revealed until then (open once every run of the round has sealed).
    pub results_reveal_until_ms: Option<u64>,
    /// Whether a lease was ever awarded (the tenant can no longer cancel: work was done).
    pub ever_awarded: bool,
    /// How it ended.
    pub ended: Option<Ended>,
}

fn bond_for(spec: &JobSpec) -> Micro {
    (spec.max_price_micro.saturating_mul(BOND_PERCENT) / 100).max(1)
}

impl Job {
    /// Posts a job: checks the spec, locks the escrow from `tenant`, opens the first auction.
    pub fn post(
        id: [u8; 32],
        tenant: NodeId,
        spec: JobSpec,
        now_ms: u64,
        accounts: &mut impl Accounts,
    ) -> Result<(Job, Vec<Event>), MarketError> {
        spec.check()?;
        accounts.debit(&tenant, spec.escrow_micro())?;
        let mut job = Job {
            id,
            tenant,
            escrow_micro: spec.escrow_micro(),
            spec,
            posted_ms: now_ms,
            bonds: BTreeMap::new(),
            auction: None,
            rounds: 0,
            reruns: 0,
            limit_reruns: 0,
            limit_claimants: BTreeSet::new(),
            earlier: Vec::new(),
            leases: Vec::new(),
            standby: Vec::new(),
            excluded: BTreeSet::new(),
            paid: BTreeSet::new(),
            burned_micro: 0,
            results_reveal_until_ms: None,
            ever_awarded: false,
            ended: None,
        };
        let slots = usize::from(job.spec.redundancy);
        let mut events = Vec::new();
        job.open(slots, now_ms, &mut events);
        Ok((job, events))
    }

    /// The bond a sealed bid on this job locks.
    pub fn bond(&self) -> Micro {
        bond_for(&self.spec)
    }

    /// The first block time at which [`Job::tick`] would change this job (an auction to award, a
    /// lease to lapse, a reveal window to close); `None` once it ended. The ledger keeps open jobs
    /// by it, so a block ticks only the jobs that are due.
    pub fn next_due_ms(&self, params: &MarketParams) -> Option<u64> {
        if self.ended.is_some() {
            return None;
        }
        let auction = self.auction.as_ref().map(Auction::award_at_ms);
        self.lapses(params).chain(auction).chain(self.results_reveal_until_ms).min()
    }

    /// The block times someone waits on, for an idle chain to make a block at: an auction with
    /// sealed bids closes its commit phase (the bids can be revealed from the first block past
    /// it) and is awarded, a lease lapses, a result reveal window closes. An auction nobody bid
    /// on is left out — nothing waits for it to reopen or be refunded, and a job posted with a
    /// short window would otherwise ask for a block every window for 16 rounds. Empty once the
    /// job ended.
    pub fn wake_times_ms(&self, params: &MarketParams) -> Vec<u64> {
        if self.ended.is_some() {
            return Vec::new();
        }
        let auction = self.auction.as_ref().filter(|a| !a.commits.is_empty());
        let auction = auction.into_iter().flat_map(|a| [a.commit_until_ms, a.award_at_ms()]);
        self.lapses(params).chain(auction).chain(self.results_reveal_until_ms).collect()
    }

    /// When each running lease lapses: a TTL after its last heartbeat, or past its wall-time
    /// limit and a TTL (the first block after either ends it).
    fn lapses<'a>(&'a self, params: &MarketParams) -> impl Iterator<Item = u64> + 'a {
        let ttl = params.lease_ttl_ms;
        self.active().flat_map(move |l| {
            let deadline = l.awarded_ms.saturating_add(self.spec.limits.wall_ms).saturating_add(ttl);
            [l.last_beat_ms.saturating_add(ttl), deadline].map(|t| t.saturating_add(1))
        })
    }

    /// Running leases (no sealed result yet): they heartbeat, and lapse without.
    pub fn active(&self) -> impl Iterator<Item = &Lease> {
        self.leases.iter().filter(|l| l.sealed.is_none())
    }

    fn open(&mut self, slots: usize, now_ms: u64, events: &mut Vec<Event>) {
        let w = self.spec.bid_window_ms;
        self.auction = Some(Auction {
            round: self.rounds,
            commit_until_ms: now_ms.saturating_add(w),
            reveal_until_ms: now_ms.saturating_add(w.saturating_mul(2)),
            slots,
            commits: BTreeMap::new(),
            bids: BTreeMap::new(),
        });
        events.push(Event::Reopened { round: self.rounds, slots });
        self.rounds += 1;
    }

    fn live(&self) -> Result<(), MarketError> {
        match &self.ended {
            Some(_) => Err(MarketError::Ended),
            None => Ok(()),
        }
    }

    /// A sealed bid from `provider`: locks its bond. Refused outside the commit phase, twice in
    /// one round, from an excluded provider, or beyond [`MAX_COMMITS`].
    pub fn commit(
        &mut self,
        provider: &NodeId,
        digest: [u8; 32],
        now_ms: u64,
        accounts: &mut impl Accounts,
    ) -> Result<(), MarketError> {
        self.live()?;
        let bond = self.bond();
        // One lease per node per run (a result posted or not: one node, one vote), and never the
        // tenant on its own job.
        let excluded = self.excluded.contains(provider)
            || *provider == self.tenant
            || self.leases.iter().any(|l| l.bid.provider.node == *provider)
            || self.standby.iter().any(|b| b.provider.node == *provider);
        let a = self.auction.as_mut().ok_or(MarketError::NoAuction)?;
        if now_ms >= a.commit_until_ms {
            return Err(MarketError::Phase("sealed bids are closed: the auction is revealing or awarded"));
        }
        if excluded {
            return Err(MarketError::Excluded);
        }
        if a.commits.contains_key(provider) {
            return Err(MarketError::AlreadyBid);
        }
        if a.commits.len() >= MAX_COMMITS {
            return Err(MarketError::AuctionFull);
        }
        accounts.debit(provider, bond)?;
        a.commits.insert(*provider, Commit { digest, bond });
        *self.bonds.entry(*provider).or_default() += bond;
        Ok(())
    }

    /// Reveals `provider`'s sealed bid: `price` and `salt` must match its commitment.
    pub fn reveal(
        &mut self,
        provider: &Provider,
        price_micro: Micro,
        salt: &[u8; 32],
        now_ms: u64,
    ) -> Result<(), MarketError> {
        self.live()?;
        let id = self.id;
        let a = self.auction.as_mut().ok_or(MarketError::NoAuction)?;
        if now_ms < a.commit_until_ms || now_ms >= a.reveal_until_ms {
            return Err(MarketError::Phase("reveals are taken after sealed bids close and before the award"));
        }
        let c = a.commits.get(&provider.node).ok_or(MarketError::NoCommit)?;
        if price_micro == 0 {
            return Err(MarketError::ZeroPrice);
        }
        if commitment(&id, &provider.node, a.round, price_micro, salt) != c.digest {
            return Err(MarketError::BadReveal);
        }
        a.bids.insert(provider.node, Bid { provider: provider.clone(), price_micro });
        Ok(())
    }

    /// `provider`'s running lease.
    fn lease_of(&mut self, provider: &NodeId) -> Result<&mut Lease, MarketError> {
        self.leases
            .iter_mut()
            .find(|l| l.sealed.is_none() && l.bid.provider.node == *provider)
            .ok_or(MarketError::NotLeaseholder)
    }

    /// A heartbeat from a leaseholder.
    pub fn heartbeat(&mut self, provider: &NodeId, now_ms: u64) -> Result<(), MarketError> {
        self.live()?;
        let l = self.lease_of(provider)?;
        l.last_beat_ms = l.last_beat_ms.max(now_ms);
        Ok(())
    }

    /// A leaseholder's sealed result ([`crate::rule::result_commitment`]): its run is over. Once
    /// every run of the round has sealed, the results are revealed for one bid window — so nobody
    /// can copy another's result instead of running the job.
    pub fn commit_result(&mut self, provider: &NodeId, digest: [u8; 32], now_ms: u64) -> Result<(), MarketError> {
        self.live()?;
        let lease = self.lease_of(provider)?;
        lease.sealed = Some(digest);
        lease.sealed_ms = Some(now_ms);
        self.open_result_reveals(now_ms);
        Ok(())
    }

    /// Opens the reveal of results when every lease has sealed and no run is waiting for a lease.
    fn open_result_reveals(&mut self, now_ms: u64) {
        let pending = self.auction.as_ref().map_or(0, |a| a.slots);
        if self.results_reveal_until_ms.is_none()
            && pending == 0
            && self.active().count() == 0
            && !self.leases.is_empty()
        {
            self.results_reveal_until_ms = Some(now_ms.saturating_add(self.spec.bid_window_ms));
        }
    }

    /// Reveals `provider`'s sealed result. When it makes a majority, the job is decided. A CPU
    /// or wall-time limit sealed sooner after the award than the limit (less a lease TTL, for
    /// block times) is refused: no run hits a limit before it, and a provider that never ran the
    /// job must at least hold its slot that long to claim one.
    pub fn reveal_result(
        &mut self,
        provider: &NodeId,
        outcome: RunOutcome,
        salt: &[u8; 32],
        now_ms: u64,
        params: &MarketParams,
        accounts: &mut impl Accounts,
    ) -> Result<Vec<Event>, MarketError> {
        self.live()?;
        match self.results_reveal_until_ms {
            Some(until) if now_ms < until => {}
            _ => {
                return Err(MarketError::Phase(
                    "results are revealed once every run has sealed its own, for a bid window",
                ));
            }
        }
        if let RunOutcome::Failed { end } = &outcome
            && end.len() > MAX_END_BYTES
        {
            return Err(MarketError::BadReveal);
        }
        let id = self.id;
        let l = self
            .leases
            .iter_mut()
            .find(|l| l.sealed.is_some() && l.result.is_none() && l.bid.provider.node == *provider)
            .ok_or(MarketError::NotLeaseholder)?;
        if l.sealed != Some(crate::rule::result_commitment(&id, provider, &outcome, salt)) {
            return Err(MarketError::BadReveal);
        }
        // (A result sealed before this rule kept its time is taken as it is.)
        if let (Some(limit_ms), Some(sealed_ms)) = (outcome.limit_hit(&self.spec.limits), l.sealed_ms) {
            let ran_ms = sealed_ms.saturating_sub(l.awarded_ms);
            if ran_ms.saturating_add(params.lease_ttl_ms) < limit_ms {
                return Err(MarketError::EarlyLimit { ran_ms, limit_ms });
            }
        }
        l.result = Some(outcome);
        let mut events = Vec::new();
        if self.leases.iter().all(|l| l.result.is_some()) {
            self.results_reveal_until_ms = None;
            self.settle(now_ms, accounts, &mut events);
        }
        Ok(events)
    }

    /// The tenant cancels: bonds go back, the escrow is refunded.
    pub fn cancel(
        &mut self,
        who: &NodeId,
        now_ms: u64,
        accounts: &mut impl Accounts,
    ) -> Result<Vec<Event>, MarketError> {
        self.live()?;
        if *who != self.tenant {
            return Err(MarketError::NotTenant);
        }
        if self.ever_awarded {
            return Err(MarketError::Phase("the job runs: it can be cancelled only before a lease is awarded"));
        }
        let mut events = Vec::new();
        self.close(Ended::Cancelled { at_ms: now_ms }, accounts, &mut events);
        Ok(events)
    }

    /// Moves the job on at block time `now_ms`: closes sealed bids, awards, lapses leases.
    pub fn tick(&mut self, now_ms: u64, params: &MarketParams, accounts: &mut impl Accounts) -> Vec<Event> {
        let mut events = Vec::new();
        if self.ended.is_some() {
            return events;
        }
        // Lapsed leases: excluded, bond to the tenant, slot free.
        let ttl = params.lease_ttl_ms;
        // A lease lapses without heartbeats for the TTL, or, heartbeats or not, when its run
        // has had its wall time and a TTL more: a provider that beats and never answers cannot
        // hold the job (and the escrow) forever.
        let deadline = |l: &Lease| l.awarded_ms.saturating_add(self.spec.limits.wall_ms).saturating_add(ttl);
        let lapses =
            |l: &Lease| l.sealed.is_none() && (now_ms > l.last_beat_ms.saturating_add(ttl) || now_ms > deadline(l));
        let lapsed: Vec<NodeId> = self.leases.iter().filter(|l| lapses(l)).map(|l| l.bid.provider.node).collect();
        // Where they failed: a region or operator that just lost a run may be losing more (an
        // outage), so standby bids elsewhere take over first.
        let failed: (BTreeSet<_>, BTreeSet<_>) = self
            .leases
            .iter()
            .filter(|l| lapses(l))
            .map(|l| (l.bid.provider.region.clone(), l.bid.provider.operator.clone()))
            .unzip();
        if !lapsed.is_empty() {
            self.leases.retain(|l| !lapses(l));
            for p in &lapsed {
                self.excluded.insert(*p);
                events.push(Event::Penalized { provider: *p, why: "lapsed" });
                self.forfeit(p, accounts);
            }
            self.fill(lapsed.len(), &failed, now_ms, accounts, &mut events);
        }
        // Sealed results not revealed in their window: no vote, a penalty, the run again elsewhere.
        if let Some(until) = self.results_reveal_until_ms
            && now_ms >= until
        {
            self.results_reveal_until_ms = None;
            let silent: Vec<NodeId> =
                self.leases.iter().filter(|l| l.result.is_none()).map(|l| l.bid.provider.node).collect();
            self.leases.retain(|l| l.result.is_some());
            for p in &silent {
                self.excluded.insert(*p);
                events.push(Event::Penalized { provider: *p, why: "result_not_revealed" });
                self.forfeit(p, accounts);
            }
            // The round is decided on what was revealed; its runs are not passed on (the revealed
            // results are public: a later run could copy them).
            self.settle(now_ms, accounts, &mut events);
        }
        if let Some(a) = &self.auction
            && now_ms >= a.award_at_ms()
        {
            self.award(now_ms, accounts, &mut events);
        }
        events
    }

    /// The nodes holding a lease of this run.
    fn holders(&self) -> BTreeSet<NodeId> {
        self.leases.iter().map(|l| l.bid.provider.node).collect()
    }

    /// Up to `slots` of `candidates` (best first) for this run by the winner rule: none from an
    /// operator that holds one of its leases, regions it does not cover yet preferred.
    fn pick_for_run(&self, candidates: &[&Bid], slots: usize) -> Vec<Bid> {
        let operators = self.leases.iter().map(|l| l.bid.provider.operator.clone()).collect();
        let regions = self.leases.iter().map(|l| l.bid.provider.region.clone()).collect();
        pick(candidates, slots, &operators, &regions).into_iter().cloned().collect()
    }

    /// Gives `slots` freed runs to standing-by bids, best first — those outside the regions and
    /// operators in `failed` (where the lapsed leases were) before the others; what is left goes
    /// to auction.
    fn fill(
        &mut self,
        slots: usize,
        failed: &(BTreeSet<archipel_types::Region>, BTreeSet<String>),
        now_ms: u64,
        accounts: &mut impl Accounts,
        events: &mut Vec<Event>,
    ) {
        let holding = self.holders();
        let mut candidates: Vec<&Bid> = self
            .standby
            .iter()
            .filter(|b| !self.excluded.contains(&b.provider.node) && !holding.contains(&b.provider.node))
            .collect();
        // A stable sort: best first within each side.
        candidates.sort_by_key(|b| failed.0.contains(&b.provider.region) || failed.1.contains(&b.provider.operator));
        let chosen = self.pick_for_run(&candidates, slots);
        for b in &chosen {
            self.standby.retain(|s| s.provider.node != b.provider.node);
            self.grant(b, now_ms, events);
        }
        let missing = slots - chosen.len();
        if missing > 0 {
            self.reauction(missing, now_ms, accounts, events);
        }
    }

    /// Opens a new round for `slots` runs (added to one already open), or refunds the tenant when
    /// the job has had [`MAX_ROUNDS`].
    fn reauction(&mut self, slots: usize, now_ms: u64, accounts: &mut impl Accounts, events: &mut Vec<Event>) {
        if let Some(a) = &mut self.auction {
            a.slots += slots;
        } else if self.rounds >= MAX_ROUNDS {
            let why = format!("no provider took the job in {MAX_ROUNDS} auction rounds");
            self.close(Ended::Refunded { why, at_ms: now_ms }, accounts, events);
        } else {
            self.open(slots, now_ms, events);
        }
    }

    /// Ends the auction: unrevealed bids forfeit their bond; the winner rule awards the slots;
    /// the next best stand by; the others get their bond back.
    fn award(&mut self, now_ms: u64, accounts: &mut impl Accounts, events: &mut Vec<Event>) {
        let Some(a) = self.auction.take() else { return };
        for p in a.commits.keys().filter(|p| !a.bids.contains_key(*p)) {
            events.push(Event::Penalized { provider: *p, why: "not_revealed" });
            self.forfeit(p, accounts);
        }
        let ranked = rank(&self.id, a.bids.values(), &self.spec.geofence, self.spec.max_price_micro, &self.excluded);
        // A revealed bid the rule cannot take (above the max price, outside the geofence) was a
        // way to crowd the auction for nothing: its bond is forfeited too.
        let eligible: BTreeSet<NodeId> = ranked.iter().map(|b| b.provider.node).collect();
        for p in a.bids.keys().filter(|p| !eligible.contains(*p)) {
            events.push(Event::Penalized { provider: *p, why: "ineligible" });
            self.forfeit(p, accounts);
        }
        // A standby whose bond was just forfeited stands by no more.
        let bonds = &self.bonds;
        self.standby.retain(|b| bonds.contains_key(&b.provider.node));
        let winners = self.pick_for_run(&ranked, a.slots);
        let won: BTreeSet<NodeId> = winners.iter().map(|b| b.provider.node).collect();
        // The best losers stand by (bond kept), as many as the job has runs; the rest go home.
        let previous: Vec<Bid> = std::mem::take(&mut self.standby);
        let mut standby: Vec<Bid> =
            ranked.iter().filter(|b| !won.contains(&b.provider.node)).map(|b| (*b).clone()).collect();
        standby.extend(previous.iter().filter(|b| !a.bids.contains_key(&b.provider.node)).cloned());
        standby.truncate(usize::from(self.spec.redundancy));
        let keep: BTreeSet<NodeId> = standby.iter().map(|b| b.provider.node).collect();
        let holding = self.holders();
        let bidders = a.bids.keys().copied().chain(previous.iter().map(|b| b.provider.node)).collect::<BTreeSet<_>>();
        for p in bidders.iter().filter(|p| !won.contains(*p) && !keep.contains(*p) && !holding.contains(*p)) {
            self.release(p, accounts);
        }
        self.standby = standby;
        for b in &winners {
            self.grant(b, now_ms, events);
        }
        let missing = a.slots - winners.len();
        if missing > 0 {
            self.reauction(missing, now_ms, accounts, events);
        }
    }

    /// Decides a round whose results are all revealed (or whose reveal window closed): accepts a
    /// majority of the job's N runs (pays it, penalizes the outvoted, refunds the rest), or runs
    /// the job again on other providers, or refunds. Never called on part of a round: the order
    /// of reveals in a block decides nothing, and a provider that sealed is judged on what it
    /// sealed.
    fn settle(&mut self, now_ms: u64, accounts: &mut impl Accounts, events: &mut Vec<Event>) {
        let n = usize::from(self.spec.redundancy);
        let mut counts: BTreeMap<&RunOutcome, usize> = BTreeMap::new();
        for r in self.leases.iter().filter_map(|l| l.result.as_ref()) {
            *counts.entry(r).or_default() += 1;
        }
        let majority = counts.iter().find(|(_, c)| **c > n / 2).map(|(o, _)| (*o).clone());
        // A limit or a crashed runner says more of the machine than of the job, and only the
        // providers that ran it say so: before the job ends on their word it runs once more, on
        // others. A provider that bids low and claims a limit without running cannot end jobs
        // (it is excluded, unpaid, its bond held until the rerun bears it out or not).
        let unconfirmed =
            majority.as_ref().is_some_and(RunOutcome::depends_on_the_machine) && self.limit_reruns < MAX_LIMIT_RERUNS;
        if let Some(outcome) = majority.clone().filter(|_| !unconfirmed) {
            // A job that failed (the same way on most providers) is refunded, not paid — except
            // when its own CPU or wall-time limit stopped it, confirmed on two rounds of
            // different providers: they spent what the tenant allowed, so the majority is paid
            // (a tenant posting jobs that never end pays for them).
            let pays = matches!(outcome, RunOutcome::Success { .. }) || outcome.is_a_limit();
            // This round first, then the earlier ones (their bonds were held for this).
            let (leases, earlier) = (std::mem::take(&mut self.leases), self.earlier.clone());
            for l in &leases {
                self.judge(l, &outcome, pays, accounts, events);
            }
            for l in &earlier {
                self.judge_earlier(l, &outcome, pays, accounts, events);
            }
            self.leases = leases;
            let ended = match &outcome {
                RunOutcome::Failed { end } if !pays => {
                    Ended::Refunded { why: format!("the job failed on the providers: {end}"), at_ms: now_ms }
                }
                _ => Ended::Accepted { outcome, at_ms: now_ms },
            };
            self.close(ended, accounts, events);
            return;
        }
        {
            // No majority (or a limit not yet confirmed): results of this round are public now, so
            // nobody joins it later (a late run could copy them); the job runs again, on other
            // providers, or is refunded. Each cause has its own budget, so a limit is always
            // confirmed by a second round, whatever came before.
            if unconfirmed || self.reruns < MAX_RERUNS {
                if unconfirmed {
                    self.limit_reruns += 1;
                } else {
                    self.reruns += 1;
                }
                self.results_reveal_until_ms = None;
                // The round's runs keep their bonds in the job until a later round decides it:
                // that round judges them too.
                for l in std::mem::take(&mut self.leases) {
                    let p = l.bid.provider.node;
                    self.excluded.insert(p);
                    if unconfirmed && l.result.is_some() && l.result == majority {
                        self.limit_claimants.insert(p);
                    }
                    self.earlier.push(l);
                }
                self.reauction(n, now_ms, accounts, events);
            } else {
                let why = "no majority among the results, twice".to_string();
                self.close(Ended::Refunded { why, at_ms: now_ms }, accounts, events);
            }
        }
    }

    /// Judges one run of the deciding round by the accepted `outcome` (paid when `pays`): pays
    /// it, gives its bond back, or burns it (outvoted).
    fn judge(
        &mut self,
        l: &Lease,
        outcome: &RunOutcome,
        pays: bool,
        accounts: &mut impl Accounts,
        events: &mut Vec<Event>,
    ) {
        let p = l.bid.provider.node;
        let Some(r) = &l.result else { return };
        if r == outcome {
            self.pay(l, pays, accounts, events);
        } else if r.depends_on_the_machine() || outcome.depends_on_the_machine() {
            // Stopped by a CPU or wall-time limit, or by a crash of its runner: how far a run
            // gets before that depends on the machine, so it is no dissent — no pay, no penalty.
            // Nor is a run that finished beside a majority that hit a limit (a faster machine,
            // or providers claiming a limit they never ran into).
            self.release(&p, accounts);
        } else {
            events.push(Event::Penalized { provider: p, why: "outvoted" });
            self.forfeit(&p, accounts);
        }
    }

    /// Judges a run of an earlier round (one that decided nothing) by the deciding round's
    /// `outcome`: paid when it had that outcome (while fewer than N runs are paid); its bond
    /// burned only when its limit or crash claim sent the job on and the decision is a result —
    /// the job did finish within its limits on other machines. Any other earlier run gets its bond
    /// back: the deciding round could see the earlier results (they were revealed to find there was
    /// no majority), so it may pay for them but not burn them, whoever won it.
    fn judge_earlier(
        &mut self,
        l: &Lease,
        outcome: &RunOutcome,
        pays: bool,
        accounts: &mut impl Accounts,
        events: &mut Vec<Event>,
    ) {
        let p = l.bid.provider.node;
        if self.limit_claimants.contains(&p) && matches!(outcome, RunOutcome::Success { .. }) {
            events.push(Event::Penalized { provider: p, why: "limit_contradicted" });
            self.forfeit(&p, accounts);
        } else if l.result.as_ref() == Some(outcome) {
            self.pay(l, pays, accounts, events);
        } else {
            self.release(&p, accounts);
        }
    }

    /// Pays `l`'s provider its bid when `pays` (once, at most N runs in all, from what is left
    /// of the escrow), and gives its bond back.
    fn pay(&mut self, l: &Lease, pays: bool, accounts: &mut impl Accounts, events: &mut Vec<Event>) {
        let p = l.bid.provider.node;
        if pays && !self.paid.contains(&p) && self.paid.len() < usize::from(self.spec.redundancy) {
            let amount = l.bid.price_micro.min(self.escrow_micro);
            self.escrow_micro -= amount;
            accounts.credit(&p, amount);
            self.paid.insert(p);
            events.push(Event::Paid { provider: p, amount_micro: amount });
        }
        self.release(&p, accounts);
    }

    /// Gives `bid` a lease from `now_ms`.
    fn grant(&mut self, bid: &Bid, now_ms: u64, events: &mut Vec<Event>) {
        self.ever_awarded = true;
        events.push(Event::Awarded { provider: bid.provider.node, price_micro: bid.price_micro });
        self.leases.push(Lease {
            bid: bid.clone(),
            awarded_ms: now_ms,
            last_beat_ms: now_ms,
            sealed: None,
            sealed_ms: None,
            result: None,
        });
    }

    /// Returns `p`'s bond to it.
    fn release(&mut self, p: &NodeId, accounts: &mut impl Accounts) {
        if let Some(b) = self.bonds.remove(p) {
            accounts.credit(p, b);
        }
    }

    /// Burns `p`'s bond: nobody gains from another's penalty (a tenant paid forfeits would profit
    /// from outvoting honest providers with its own).
    fn forfeit(&mut self, p: &NodeId, _accounts: &mut impl Accounts) {
        if let Some(b) = self.bonds.remove(p) {
            self.burned_micro = self.burned_micro.saturating_add(b);
        }
    }

    /// Ends the job: bonds still held go back, the escrow left goes to the tenant.
    fn close(&mut self, ended: Ended, accounts: &mut impl Accounts, events: &mut Vec<Event>) {
        for (p, b) in std::mem::take(&mut self.bonds) {
            accounts.credit(&p, b);
        }
        accounts.credit(&self.tenant, self.escrow_micro);
        self.escrow_micro = 0;
        self.auction = None;
        self.standby.clear();
        self.results_reveal_until_ms = None;
        events.push(Event::Ended(ended.clone()));
        self.ended = Some(ended);
    }
}
