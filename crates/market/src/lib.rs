//! The compute marketplace's rules, sans-IO: what a job may ask ([`spec`]), whether a provider
//! can take it and the winner rule ([`rule`]), and a job's life from posting to payment
//! ([`job`]). The ledger applies finalized transactions through these functions, with the block's
//! time; so does `archipel ledger verify` offline — every award and payment is re-checkable.
//!
//! Architecture Invariant: no I/O, no clock, no randomness — time comes in as `now_ms` (the
//! finalized block's time), money moves only through the caller's [`job::Accounts`].

pub mod job;
pub mod rule;
pub mod spec;

pub use job::{Accounts, Ended, Event, Job, MarketParams, RunOutcome};
pub use rule::{Bid, Decline, Offer, Provider, Record};
pub use spec::{JobLimits, JobSpec, ObjectRef, SpecError};

/// Money, in micro-units of the ledger's currency.
pub type Micro = u64;

/// Why the market refuses a step.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum MarketError {
    /// The spec is refused.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// An account lacks the money.
    #[error("balance too low: {need} needed")]
    Insufficient {
        /// How much was needed.
        need: Micro,
    },
    /// The job has ended.
    #[error("the job has ended")]
    Ended,
    /// No auction is open.
    #[error("no auction is open for this job")]
    NoAuction,
    /// Not the phase for this step.
    #[error("{0}")]
    Phase(&'static str),
    /// The provider may not take this job (its lease lapsed, it ran it, or it runs it).
    #[error("this provider is excluded from the job (its lease lapsed, or it runs or ran it)")]
    Excluded,
    /// A second sealed bid in one round.
    #[error("this provider has already bid in this round")]
    AlreadyBid,
    /// The round has all the sealed bids it takes.
    #[error("the auction round is full ({} sealed bids)", job::MAX_COMMITS)]
    AuctionFull,
    /// A reveal without a sealed bid.
    #[error("no sealed bid from this provider in this round")]
    NoCommit,
    /// A reveal that does not match its sealed bid.
    #[error("the reveal does not match the sealed bid")]
    BadReveal,
    /// A heartbeat or result from a provider without a lease on the job.
    #[error("this provider holds no lease on the job: it did not win it, or its lease lapsed or ended")]
    NotLeaseholder,
    /// A bid of nothing.
    #[error("a bid's price is at least 1")]
    ZeroPrice,
    /// A CPU or wall-time limit claimed by a result sealed before the run could have reached it.
    #[error(
        "a run cannot hit its {limit_ms} ms limit {ran_ms} ms after its award: the result was sealed too early to claim it"
    )]
    EarlyLimit {
        /// Block time from the award to the sealed result.
        ran_ms: u64,
        /// The limit claimed.
        limit_ms: u64,
    },
    /// Cancelled by someone else than the tenant.
    #[error("only the tenant who posted the job may cancel it")]
    NotTenant,
}
