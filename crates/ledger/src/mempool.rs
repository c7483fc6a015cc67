//! The mempool: admitted transactions waiting for a block, ordered per account by nonce.
//!
//! Sans-IO: the node feeds it transactions (from `POST /v1/tx` or gossip), the state they are
//! judged against and its own clock's time; the proposer asks it for candidates on top of any
//! (possibly not yet final) parent state.
//!
//! **Spam limits.** A transaction that is valid alone may still be spam together with the
//! account's other waiting ones, so an account's waiting transactions are judged together:
//! - their amounts and fees together may not exceed the account's finalized balance (a thousand
//!   transfers that each spend the whole balance cannot all wait);
//! - at most [`MempoolLimits::gapped_per_account`] of them may wait behind a missing nonce (they
//!   cannot go into any block until it arrives);
//! - at most [`MempoolLimits::per_account`] may wait at all;
//! - over all accounts, at most [`MempoolLimits::gapped_total`] may wait behind a missing nonce
//!   (see [`GAPPED_SHARE_PERCENT`]), and when the pool is full a transaction that can go into the
//!   next block evicts the oldest of them rather than being refused;
//! - each leaves after [`MempoolLimits::ttl_ms`] of the node's clock if no block took it.
//!
//! So one account holds a bounded share of the pool, and what it holds either pays its fees in a
//! block soon or expires. Every check is O(log n): per-account sums and run lengths are kept up to
//! date on every insert and removal, and expiry walks an age index from its oldest end. Keeping the
//! index of gapped entries costs O(k log n) more when a run end moves over k entries (k is at most
//! [`MempoolLimits::per_account`]).

use crate::block::Signatures;
use crate::hash::Hash;
use crate::params::LedgerParams;
use crate::state::{Account, State};
use crate::tx::{Payload, SignedTransaction, Transaction, TxError};
use archipel_types::NodeId;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Why the mempool did not take a transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MempoolError {
    /// The transaction itself is refused.
    #[error(transparent)]
    Invalid(#[from] TxError),
    /// Another transaction with the same signer and nonce is already waiting.
    #[error("another transaction with nonce {nonce} from {signer} is already waiting; use the next nonce")]
    NonceTaken {
        /// The signer (short).
        signer: String,
        /// The nonce.
        nonce: u64,
    },
    /// The mempool is full.
    #[error("the mempool is full ({0} transactions waiting): retry in a moment")]
    Full(usize),
    /// The account already has as many transactions waiting as one account may.
    #[error(
        "account {signer} already has {waiting} transactions waiting, the most one account may: \
         wait until some are final, then submit more"
    )]
    AccountQuota {
        /// The signer (short).
        signer: String,
        /// Its waiting transactions (the limit).
        waiting: usize,
    },
    /// Too many of the account's transactions wait behind a nonce that never arrived.
    #[error(
        "account {signer} already has {gapped} transactions waiting behind its missing nonce {missing} \
         (at most {max}): submit nonce {missing} first"
    )]
    NonceGap {
        /// The signer (short).
        signer: String,
        /// The first nonce missing from the account's waiting transactions.
        missing: u64,
        /// How many wait behind it.
        gapped: usize,
        /// The limit.
        max: usize,
    },
    /// The pool already holds as many transactions waiting behind a missing nonce as it may,
    /// over all accounts.
    #[error(
        "the mempool already holds {gapped} transactions waiting behind missing nonces, the most it holds \
         from all accounts: submit nonce {missing} of {signer} first, or retry once some have expired \
         (60 s)"
    )]
    GappedFull {
        /// The signer (short).
        signer: String,
        /// This signer's first missing nonce.
        missing: u64,
        /// Gapped transactions waiting (the limit).
        gapped: usize,
    },
    /// With the account's other waiting transactions, this one would spend more than the
    /// account's finalized balance.
    #[error(
        "account {signer}'s waiting transactions already spend {waiting_micro} of its final balance of \
         {balance_micro}, and this one needs {needed_micro} more (amount + fee): wait until they are \
         final, or send less"
    )]
    Overspend {
        /// The signer (short).
        signer: String,
        /// Amounts and fees of its waiting transactions.
        waiting_micro: u128,
        /// This transaction's amount and fee.
        needed_micro: u64,
        /// The account's finalized balance.
        balance_micro: u64,
    },
}

impl MempoolError {
    /// True for refusals that say the node or the chain is busy, not that the transaction is
    /// wrong: a full pool (`mempool_full`), a full share of gapped transactions (`gapped_full`),
    /// an account's quota of waiting transactions (`account_quota`). A sender cannot know them in
    /// advance, so they do not count against it (see the node's admission and gossip).
    pub fn is_congestion(&self) -> bool {
        matches!(self, MempoolError::Full(_) | MempoolError::GappedFull { .. } | MempoolError::AccountQuota { .. })
    }

    /// How many of a submission's `results` were refused for a reason of the transaction's own,
    /// not for congestion ([`MempoolError::is_congestion`]), which an honest sender cannot know.
    /// A transaction known already is not refused (its answer is its hash).
    pub fn refusals(results: &[Result<Hash, MempoolError>]) -> usize {
        results.iter().filter(|r| matches!(r, Err(e) if !e.is_congestion())).count()
    }

    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            MempoolError::Invalid(e) => e.code(),
            MempoolError::NonceTaken { .. } => "nonce_taken",
            MempoolError::Full(_) => "mempool_full",
            MempoolError::AccountQuota { .. } => "account_quota",
            MempoolError::NonceGap { .. } => "nonce_gap",
            MempoolError::GappedFull { .. } => "gapped_full",
            MempoolError::Overspend { .. } => "overspend",
        }
    }
}

/// Share of the mempool's capacity, in percent, that transactions waiting behind a missing nonce
/// may take over all accounts ([`MempoolLimits::gapped_total`]).
///
/// Such transactions pay no fee until their gap closes, so without a global bound about 6,250
/// funded accounts holding [`MempoolLimits::gapped_per_account`] (16) each fill a 100,000-entry
/// pool with transactions no block can take. Honest gaps are short-lived (transactions pipelined
/// through different nodes, gossip batches arriving out of order) and close within a gossip round
/// trip: 5 % of the default pool is 5,000 entries, a whole second of the ledger's measured
/// throughput (~5,000 transactions/s) arriving out of order at once. The other 95 % stays for
/// transactions that can go into the next block and pay their fee, and those evict gapped ones
/// when the pool is full anyway.
pub const GAPPED_SHARE_PERCENT: usize = 5;

/// How much the mempool holds, in all and per account, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MempoolLimits {
    /// Transactions waiting in all.
    pub capacity: usize,
    /// Transactions one account may have waiting.
    pub per_account: usize,
    /// Transactions one account may have waiting behind a missing nonce.
    pub gapped_per_account: usize,
    /// Transactions all accounts together may have waiting behind a missing nonce.
    pub gapped_total: usize,
    /// A transaction still waiting this long (node clock, ms) after its admission is dropped.
    pub ttl_ms: u64,
    /// A transaction admitted this long ago (ms) that still waits behind a missing nonce is
    /// dropped: honest gaps close within a gossip round trip, and entries no block can take
    /// must not hold the gapped share for the whole `ttl_ms`.
    pub gapped_ttl_ms: u64,
    /// Encoded bytes waiting in all (transactions differ in size: a transfer is ~150 bytes, a
    /// `transfer_many` of 200 credits ~8 KB).
    pub max_bytes: usize,
}

/// Default byte budget per transaction slot of [`MempoolLimits::with_capacity`]: 100,000 slots
/// hold 64 MB, so a pool of the largest transactions stays within that.
pub const BYTES_PER_SLOT: usize = 640;

impl MempoolLimits {
    /// The default limits for a pool of `capacity` transactions, [`GAPPED_SHARE_PERCENT`] of
    /// them gapped at most.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity,
            per_account: 256,
            gapped_per_account: 16,
            gapped_total: capacity / 100 * GAPPED_SHARE_PERCENT,
            ttl_ms: 60_000,
            gapped_ttl_ms: 5_000,
            max_bytes: capacity.saturating_mul(BYTES_PER_SLOT),
        }
    }
}

impl Default for MempoolLimits {
    fn default() -> Self {
        Self::with_capacity(100_000)
    }
}

/// What `tx` takes from its signer's balance at most: the fee and any amount sent. Mirrors the
/// kinds' rules in `state`; a kind that moves money must be added here.
fn spend_micro(params: &LedgerParams, tx: &Transaction) -> u64 {
    match &tx.payload {
        Payload::Transfer { amount_micro, .. } => params.tx_fee_micro.saturating_add(*amount_micro),
        Payload::TransferMany { credits } => {
            credits.iter().fold(tx.payload.fee_micro(params.tx_fee_micro), |sum, c| sum.saturating_add(c.amount_micro))
        }
        // The deposit is locked from the sponsor's balance too.
        Payload::RegisterNode { .. } => params.tx_fee_micro.saturating_add(params.node_deposit_micro),
        // A new entry's deposit (a `PutObject` that replaces a version locks none: counted as
        // though it did, the pool may ask a nearly empty account to wait for the block first).
        Payload::CreateBucket { .. } | Payload::PutObject { .. } => {
            params.tx_fee_micro.saturating_add(params.entry_deposit_micro)
        }
        // The same, per object.
        Payload::PutObjects { batch } => {
            params.tx_fee_micro.saturating_add(params.entry_deposit_micro).saturating_mul(batch.puts.len() as u64)
        }
        Payload::UpdateNode { .. }
        | Payload::LeaveNode { .. }
        | Payload::DeleteBucket { .. }
        | Payload::DeleteObject { .. }
        | Payload::MoveShards { .. }
        | Payload::AuditFailed { .. }
        | Payload::RevokeTokens { .. }
        | Payload::ScheduleUpgrade { .. }
        | Payload::CancelUpgrade { .. }
        | Payload::BidReveal { .. }
        | Payload::JobHeartbeat { .. }
        | Payload::ResultCommit { .. }
        | Payload::ResultReveal { .. }
        | Payload::CancelJob { .. } => params.tx_fee_micro,
        Payload::PostJob { spec } => params.tx_fee_micro.saturating_add(spec.escrow_micro()),
        Payload::BidCommit { bond_micro, .. } => params.tx_fee_micro.saturating_add(*bond_micro),
    }
}

/// One waiting transaction.
#[derive(Debug)]
struct Waiting {
    stx: SignedTransaction,
    hash: Hash,
    /// Encoded size.
    bytes: usize,
    spend_micro: u64,
    admitted_ms: u64,
}

/// One account's waiting transactions and the sums the limits need.
#[derive(Debug)]
struct AccountQueue {
    /// By nonce; every nonce is at least `next`.
    txs: BTreeMap<u64, Waiting>,
    /// The account's next nonce in the finalized state the queue was last aligned to.
    next: u64,
    /// The first nonce from `next` on that is not waiting here: `next..run_end` can go into
    /// blocks in order, everything above waits for `run_end`.
    run_end: u64,
    /// Amounts and fees of everything waiting.
    spend_micro: u128,
}

/// What [`Mempool::check_account`] reads of an account's queue: the queue itself, or the
/// [`Prechecker`]'s picture of it with a batch's earlier transactions added.
trait QueueView {
    /// Transactions waiting.
    fn waiting(&self) -> usize;
    /// True when one with `nonce` waits.
    fn holds(&self, nonce: u64) -> bool;
    /// The account's next nonce in the finalized state the queue was aligned to.
    fn next(&self) -> u64;
    /// The first nonce from `next` on that is not waiting.
    fn run_end(&self) -> u64;
    /// Amounts and fees of everything waiting.
    fn spend_micro(&self) -> u128;
    /// Transactions waiting behind a missing nonce.
    fn gapped(&self) -> usize {
        self.waiting().saturating_sub(self.run_end().saturating_sub(self.next()) as usize)
    }
}

/// `run_end` moved over the nonces `holds` says wait (the end of the run from `next`).
fn run_past(mut run_end: u64, holds: impl Fn(u64) -> bool) -> u64 {
    while run_end < u64::MAX && holds(run_end) {
        run_end += 1;
    }
    run_end
}

impl QueueView for AccountQueue {
    fn waiting(&self) -> usize {
        self.txs.len()
    }
    fn holds(&self, nonce: u64) -> bool {
        self.txs.contains_key(&nonce)
    }
    fn next(&self) -> u64 {
        self.next
    }
    fn run_end(&self) -> u64 {
        self.run_end
    }
    fn spend_micro(&self) -> u128 {
        self.spend_micro
    }
}

/// An account's queue as [`Prechecker`] pictures it: its nonces and sums, with the batch's
/// transactions that passed added.
#[derive(Debug)]
struct Shadow {
    nonces: BTreeSet<u64>,
    next: u64,
    run_end: u64,
    spend_micro: u128,
}

impl Shadow {
    fn of(q: &AccountQueue) -> Self {
        Shadow { nonces: q.txs.keys().copied().collect(), next: q.next, run_end: q.run_end, spend_micro: q.spend_micro }
    }

    fn empty(next: u64) -> Self {
        Shadow { nonces: BTreeSet::new(), next, run_end: next, spend_micro: 0 }
    }

    fn add(&mut self, nonce: u64, spend: u64) {
        self.nonces.insert(nonce);
        self.spend_micro += u128::from(spend);
        self.run_end = run_past(self.run_end, |n| self.nonces.contains(&n));
    }
}

impl QueueView for Shadow {
    fn waiting(&self) -> usize {
        self.nonces.len()
    }
    fn holds(&self, nonce: u64) -> bool {
        self.nonces.contains(&nonce)
    }
    fn next(&self) -> u64 {
        self.next
    }
    fn run_end(&self) -> u64 {
        self.run_end
    }
    fn spend_micro(&self) -> u128 {
        self.spend_micro
    }
}

/// Prechecks a batch in order ([`Mempool::prechecker`]).
#[derive(Debug)]
pub struct Prechecker<'a> {
    pool: &'a Mempool,
    state: &'a State,
    /// Accounts with a transaction of the batch passed, as they would be with it inserted.
    shadows: HashMap<NodeId, Shadow>,
    /// Transactions passed.
    passed: HashSet<Hash>,
}

impl Prechecker<'_> {
    /// The mempool's verdict on `stx` (whose hash is `hash`) after the batch's earlier
    /// transactions that passed; a pass counts for the later ones.
    pub fn check(&mut self, hash: &Hash, stx: &SignedTransaction) -> Result<(), MempoolError> {
        // Waiting already, or passed earlier in the batch: insertion takes it once.
        if self.passed.contains(hash) || self.pool.by_hash.contains_key(hash) {
            return Ok(());
        }
        let (signer, nonce) = (stx.tx.signer, stx.tx.nonce);
        let account = self.state.account(&signer);
        let queue = self.pool.accounts.get(&signer);
        // Left to insertion (which aligns the queue first, or refuses the used nonce).
        if queue.is_some_and(|q| q.next != account.nonce) || nonce < account.nonce {
            return Ok(());
        }
        let spend = spend_micro(self.state.params(), &stx.tx);
        let shadow = self.shadows.get(&signer);
        match shadow {
            Some(shadow) => self.pool.check_account(signer, nonce, spend, account, Some(shadow))?,
            None => self.pool.check_account(signer, nonce, spend, account, queue)?,
        }
        // The pool-wide share of gapped entries is left to insertion: counting a batch's
        // unverified transactions against it would let one account's forged ones crowd out
        // another's.
        self.shadows
            .entry(signer)
            .or_insert_with(|| queue.map_or_else(|| Shadow::empty(account.nonce), Shadow::of))
            .add(nonce, spend);
        self.passed.insert(*hash);
        Ok(())
    }
}

impl AccountQueue {
    fn new(next: u64) -> Self {
        Self { txs: BTreeMap::new(), next, run_end: next, spend_micro: 0 }
    }

    /// Moves `run_end` over the nonces that wait here.
    fn extend_run(&mut self) {
        self.run_end = run_past(self.run_end, |n| self.txs.contains_key(&n));
    }

    fn remove(&mut self, nonce: u64) -> Option<Waiting> {
        let w = self.txs.remove(&nonce)?;
        self.spend_micro -= u128::from(w.spend_micro);
        if (self.next..self.run_end).contains(&nonce) {
            self.run_end = nonce;
        }
        Some(w)
    }
}

/// Whether a transaction of this kind may stop applying without any other transaction of its
/// signer: as block time passes (a job's phases close, its leases lapse) or as others act (a
/// repair someone else made first, an audit epoch gone). A node's workers send these, and share
/// one nonce sequence: a dead one would hold the others, heartbeats included.
fn may_go_stale(p: &Payload) -> bool {
    matches!(
        p,
        Payload::BidCommit { .. }
            | Payload::BidReveal { .. }
            | Payload::JobHeartbeat { .. }
            | Payload::ResultCommit { .. }
            | Payload::ResultReveal { .. }
            | Payload::CancelJob { .. }
            | Payload::MoveShards { .. }
            | Payload::AuditFailed { .. }
    )
}

/// Waiting transactions.
#[derive(Debug)]
pub struct Mempool {
    accounts: BTreeMap<NodeId, AccountQueue>,
    by_hash: HashMap<Hash, (NodeId, u64)>,
    /// Admission time and hash of every waiting transaction, oldest first (expiry).
    by_age: BTreeSet<(u64, Hash)>,
    /// The part of `by_age` that waits behind a missing nonce (nonce at or above its queue's
    /// `run_end`): its length is the global gapped count, its oldest end what a full pool evicts.
    gapped_by_age: BTreeSet<(u64, Hash)>,
    /// Encoded bytes of every waiting transaction.
    bytes: usize,
    limits: MempoolLimits,
}

/// Puts `q`'s transactions with nonces in `range` into the gapped index (`gapped`) or takes them
/// out. A transaction changes side only when its queue's run end moves over it, so callers pass
/// the range it moved over: the cost follows the change, bounded by the per-account limit.
fn reclassify(index: &mut BTreeSet<(u64, Hash)>, q: &AccountQueue, range: std::ops::Range<u64>, gapped: bool) {
    if range.is_empty() {
        return;
    }
    for w in q.txs.range(range).map(|(_, w)| w) {
        if gapped {
            index.insert((w.admitted_ms, w.hash));
        } else {
            index.remove(&(w.admitted_ms, w.hash));
        }
    }
}

impl Mempool {
    /// An empty mempool within `limits`.
    pub fn new(limits: MempoolLimits) -> Self {
        Self {
            accounts: BTreeMap::new(),
            by_hash: HashMap::new(),
            by_age: BTreeSet::new(),
            gapped_by_age: BTreeSet::new(),
            bytes: 0,
            limits,
        }
    }

    /// Its limits.
    pub fn limits(&self) -> MempoolLimits {
        self.limits
    }

    /// Number of waiting transactions.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Number of waiting transactions that wait behind a missing nonce.
    pub fn gapped_len(&self) -> usize {
        self.gapped_by_age.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// True when `hash` waits here.
    pub fn contains(&self, hash: &Hash) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// Admits `stx` (encoded in `encoded_len` bytes) against `state` at `now_ms` (the node's
    /// clock); returns its hash. Adding the same transaction twice is not an error.
    pub fn insert(
        &mut self,
        state: &State,
        stx: SignedTransaction,
        encoded_len: usize,
        now_ms: u64,
    ) -> Result<Hash, MempoolError> {
        self.insert_hashed(state, stx.hash(), stx, encoded_len, Signatures::Verify, now_ms)
    }

    /// [`Mempool::insert`] with the transaction's hash already computed, and its signature
    /// already checked if `signatures` says so.
    pub fn insert_hashed(
        &mut self,
        state: &State,
        hash: Hash,
        stx: SignedTransaction,
        encoded_len: usize,
        signatures: Signatures,
        now_ms: u64,
    ) -> Result<Hash, MempoolError> {
        self.expire(now_ms);
        if self.by_hash.contains_key(&hash) {
            return Ok(hash);
        }
        match signatures {
            Signatures::Verify => state.admit(&stx, encoded_len)?,
            Signatures::AlreadyVerified => state.admit_verified(&stx, encoded_len)?,
        }
        let signer = stx.tx.signer;
        let nonce = stx.tx.nonce;
        let account = state.account(&signer);
        self.align(&signer, account.nonce);
        let spend = spend_micro(state.params(), &stx.tx);
        self.check_account(signer, nonce, spend, account, self.accounts.get(&signer))?;
        let missing = self.accounts.get(&signer).map_or(account.nonce, |q| q.run_end);
        let next_in_line = nonce == missing;
        if !next_in_line && self.gapped_len() >= self.limits.gapped_total {
            return Err(MempoolError::GappedFull { signer: signer.short(), missing, gapped: self.gapped_len() });
        }
        // A full pool makes room for a transaction that can go next by evicting the oldest
        // gapped one (which pays nothing until its gap closes, if ever); a gapped one waits.
        while self.len() >= self.limits.capacity || self.bytes + encoded_len > self.limits.max_bytes {
            if !(next_in_line && self.evict_oldest_gapped()) {
                return Err(MempoolError::Full(self.len()));
            }
        }
        let q = self.accounts.entry(signer).or_insert_with(|| AccountQueue::new(account.nonce));
        q.spend_micro += u128::from(spend);
        q.txs.insert(nonce, Waiting { stx, hash, bytes: encoded_len, spend_micro: spend, admitted_ms: now_ms });
        self.bytes += encoded_len;
        if next_in_line {
            let was = q.run_end;
            q.extend_run();
            reclassify(&mut self.gapped_by_age, q, was..q.run_end, false);
        } else {
            self.gapped_by_age.insert((now_ms, hash));
        }
        self.by_hash.insert(hash, (signer, nonce));
        self.by_age.insert((now_ms, hash));
        Ok(hash)
    }

    /// The account's rules for one more transaction (`nonce`, spending `spend`) of `signer`,
    /// whose finalized account is `account`: nonce not taken, the account's quota, its gapped
    /// entries, its cumulative spend. The queue must be aligned with `account`.
    fn check_account(
        &self,
        signer: NodeId,
        nonce: u64,
        spend: u64,
        account: Account,
        q: Option<&impl QueueView>,
    ) -> Result<(), MempoolError> {
        if let Some(q) = q {
            if q.holds(nonce) {
                return Err(MempoolError::NonceTaken { signer: signer.short(), nonce });
            }
            if q.waiting() >= self.limits.per_account {
                return Err(MempoolError::AccountQuota { signer: signer.short(), waiting: q.waiting() });
            }
            // Admission refused replays, so `nonce` is not below `next`; not taken, so not
            // below `run_end` either: anything else than `run_end` is behind a gap.
            if nonce != q.run_end() && q.gapped() >= self.limits.gapped_per_account {
                return Err(MempoolError::NonceGap {
                    signer: signer.short(),
                    missing: q.run_end(),
                    gapped: q.gapped(),
                    max: self.limits.gapped_per_account,
                });
            }
            if q.spend_micro() + u128::from(spend) > u128::from(account.balance_micro) {
                return Err(MempoolError::Overspend {
                    signer: signer.short(),
                    waiting_micro: q.spend_micro(),
                    needed_micro: spend,
                    balance_micro: account.balance_micro,
                });
            }
        } else if nonce != account.nonce && self.limits.gapped_per_account == 0 {
            return Err(MempoolError::NonceGap { signer: signer.short(), missing: account.nonce, gapped: 0, max: 0 });
        }
        Ok(())
    }

    /// The account's rules of [`Mempool::insert_hashed`] (nonce taken, quota, gapped entries,
    /// cumulative spend) checked without changing anything, so that a transaction they refuse is
    /// refused before its signature is verified. A queue not yet aligned with `state` is left to
    /// insertion. What this refuses, insertion would refuse in the same pool; `Ok` says nothing of
    /// the other rules. For transactions submitted together, see [`Mempool::prechecker`].
    pub fn precheck(&self, state: &State, stx: &SignedTransaction) -> Result<(), MempoolError> {
        self.prechecker(state).check(&stx.hash(), stx)
    }

    /// [`Mempool::precheck`] for transactions submitted together: each is judged as though those
    /// before it that passed had been inserted, so a batch of 64 transfers behind a missing nonce
    /// passes 16 (the gapped entries an account may hold), not 64. What it refuses, inserting the
    /// passed ones in order would refuse too, provided they also pass the checks it does not make
    /// (signatures, a registry change's descriptor and consent, a credit's overflow, the pool's
    /// capacity and gapped share, expiry: call [`Mempool::expire`] first): a transaction refused
    /// here because an earlier one from the same account in the same batch took its place stays
    /// refused if that one then fails (the sender's own batch is wrong; it may resubmit). The
    /// account rules only ever refuse on account of the same signer's transactions.
    pub fn prechecker<'a>(&'a self, state: &'a State) -> Prechecker<'a> {
        Prechecker { pool: self, state, shadows: HashMap::new(), passed: HashSet::new() }
    }

    /// Drops `signer`'s transactions below `next` (its next nonce in a finalized state that
    /// has moved on since the queue was last aligned).
    fn align(&mut self, signer: &NodeId, next: u64) {
        let Some(q) = self.accounts.get_mut(signer) else { return };
        if next <= q.next {
            return;
        }
        let keep = q.txs.split_off(&next);
        let gone = std::mem::replace(&mut q.txs, keep);
        for w in gone.into_values() {
            q.spend_micro -= u128::from(w.spend_micro);
            self.bytes -= w.bytes;
            self.by_hash.remove(&w.hash);
            self.by_age.remove(&(w.admitted_ms, w.hash));
            self.gapped_by_age.remove(&(w.admitted_ms, w.hash));
        }
        q.next = next;
        let was = q.run_end;
        q.run_end = q.run_end.max(next);
        q.extend_run();
        reclassify(&mut self.gapped_by_age, q, was..q.run_end, false);
        if q.txs.is_empty() {
            self.accounts.remove(signer);
        }
    }

    /// Drops every transaction admitted more than `ttl_ms` before `now_ms`, and every one still
    /// behind a nonce gap admitted more than `gapped_ttl_ms` before it; returns how many. Called
    /// on every insert, so a node need not call it.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let mut dropped = 0;
        // Every entry by `ttl_ms`, then those still behind a gap by `gapped_ttl_ms`.
        for (ttl_ms, gapped_only) in [(self.limits.ttl_ms, false), (self.limits.gapped_ttl_ms, true)] {
            let Some(cutoff) = now_ms.checked_sub(ttl_ms) else { continue };
            loop {
                let index = if gapped_only { &self.gapped_by_age } else { &self.by_age };
                match index.first() {
                    Some(&(admitted_ms, hash)) if admitted_ms < cutoff => {
                        self.remove(&hash);
                        dropped += 1;
                    }
                    _ => break,
                }
            }
        }
        dropped
    }

    /// Up to `max` transactions that can follow `state`: per account the run of consecutive
    /// nonces from its next nonce, interleaved across accounts so none starves.
    pub fn candidates(&self, state: &State, max: usize) -> Vec<SignedTransaction> {
        let mut runs: Vec<Vec<&SignedTransaction>> = Vec::new();
        for (signer, q) in &self.accounts {
            let mut next = state.account(signer).nonce;
            let run: Vec<_> = q
                .txs
                .range(next..)
                .map_while(|(n, w)| {
                    (*n == next).then(|| {
                        next += 1;
                        &w.stx
                    })
                })
                .collect();
            if !run.is_empty() {
                runs.push(run);
            }
        }
        let mut out = Vec::new();
        let mut level = 0;
        while out.len() < max {
            let before = out.len();
            for run in &runs {
                if let Some(t) = run.get(level) {
                    out.push((*t).clone());
                    if out.len() == max {
                        break;
                    }
                }
            }
            if out.len() == before {
                break;
            }
            level += 1;
        }
        out
    }

    /// Up to `max` waiting transactions, oldest nonces first per account.
    pub fn all(&self, max: usize) -> Vec<SignedTransaction> {
        self.accounts.values().flat_map(|q| q.txs.values()).take(max).map(|w| w.stx.clone()).collect()
    }

    /// Forgets `hash` (e.g. a proposer found it no longer applies).
    pub fn remove(&mut self, hash: &Hash) {
        let Some((signer, nonce)) = self.by_hash.remove(hash) else { return };
        let Some(q) = self.accounts.get_mut(&signer) else { return };
        let was = q.run_end;
        if let Some(w) = q.remove(nonce) {
            self.bytes -= w.bytes;
            self.by_age.remove(&(w.admitted_ms, w.hash));
            self.gapped_by_age.remove(&(w.admitted_ms, w.hash));
        }
        // Removed from the run: everything after it in the run now waits behind it.
        reclassify(&mut self.gapped_by_age, q, q.run_end..was, true);
        if q.txs.is_empty() {
            self.accounts.remove(&signer);
        }
    }

    /// Drops the oldest transaction waiting behind a missing nonce; false if there is none.
    fn evict_oldest_gapped(&mut self) -> bool {
        let Some(&(_, hash)) = self.gapped_by_age.first() else { return false };
        self.remove(&hash);
        true
    }

    /// Drops each account's next transaction (the nonce `state` expects) when its kind may go
    /// stale without its signer — a job's bid, reveal, heartbeat, result or cancel, a repair,
    /// an audit report — and it no longer passes `state`'s checks (those that need no
    /// signature): a sealed bid that missed its window never will apply, and left waiting it
    /// would hold every later transaction of its account until it expires (`ttl_ms`) — a
    /// provider could not heartbeat its leases meanwhile. Returns how many were dropped.
    /// O(accounts waiting): call once per finalized block.
    pub fn drop_stale_heads(&mut self, state: &State) -> usize {
        let stale: Vec<Hash> = self
            .accounts
            .iter()
            .filter_map(|(signer, q)| q.txs.get(&state.account(signer).nonce))
            .filter(|w| may_go_stale(&w.stx.tx.payload) && state.precheck(&w.stx, w.bytes).is_err())
            .map(|w| w.hash)
            .collect();
        for h in &stale {
            self.remove(h);
        }
        stale.len()
    }

    /// The nonce `signer`'s next transaction should take: the first after the run of its
    /// transactions waiting here from the nonce `state` expects (that nonce itself when it does
    /// not wait here: what waits after a gap is not counted on).
    pub fn next_free_nonce(&self, state: &State, signer: &NodeId) -> u64 {
        let next = state.account(signer).nonce;
        match self.accounts.get(signer) {
            Some(q) => run_past(next, |n| q.txs.contains_key(&n)),
            None => next,
        }
    }

    /// Drops the transactions of `signers` whose nonces `state` (a finalized state) has used.
    /// Only the signers of the transactions applied since the last call can have any: pass
    /// those (the accounts of a finalized block), so the cost follows the block, not the pool.
    pub fn prune(&mut self, state: &State, signers: impl IntoIterator<Item = NodeId>) {
        for signer in signers {
            self.align(&signer, state.account(&signer).nonce);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{genesis, id, signed, transfer};

    fn pool(capacity: usize) -> Mempool {
        Mempool::new(MempoolLimits { capacity, ..MempoolLimits::default() })
    }

    /// A genesis state in which accounts `0..n` hold 1,000 each.
    fn funded(n: u64) -> State {
        State::genesis(crate::state::GenesisState {
            network: Hash::ZERO,
            params: LedgerParams::default(),
            timestamp_ms: 0,
            validators: vec![id(10_000).node_id()],
            accounts: (0..n).map(|i| (id(i).node_id(), 1_000)).collect(),
            nodes: vec![],
        })
    }

    #[test]
    fn gapped_transactions_are_bounded_over_all_accounts() {
        let s = funded(20);
        let limits =
            MempoolLimits { capacity: 1_000, gapped_per_account: 4, gapped_total: 10, ..MempoolLimits::default() };
        let mut m = Mempool::new(limits);
        // 20 accounts each try 4 transactions behind their missing nonce 0: 10 get in in all.
        let mut refused = Vec::new();
        for from in 0..20 {
            for nonce in 1..5 {
                if let Err(e) = m.insert(&s, transfer(from, nonce, 0, 1), 100, 0) {
                    refused.push(e);
                }
            }
        }
        assert_eq!(m.len(), 10);
        assert_eq!(refused.len(), 70);
        assert!(refused.iter().all(|e| e.code() == "gapped_full"), "{refused:?}");
        let e = &refused[0];
        assert!(e.to_string().contains("already holds 10 transactions waiting behind missing nonces"), "{e}");
        assert!(e.to_string().contains("submit nonce 0 of"), "{e}");
        // Transactions that can go into the next block still get in, and closing a gap frees room.
        for from in 0..20 {
            m.insert(&s, transfer(from, 0, 0, 1), 100, 0).unwrap();
        }
        assert_eq!(m.len(), 30);
        for from in 5..15 {
            m.insert(&s, transfer(from, 2, 0, 1), 100, 0).unwrap();
        }
        assert_eq!(m.insert(&s, transfer(15, 2, 0, 1), 100, 0).unwrap_err().code(), "gapped_full");
    }

    #[test]
    fn a_full_pool_evicts_gapped_transactions_oldest_first_for_ones_that_can_go_next() {
        let s = funded(20);
        let limits =
            MempoolLimits { capacity: 10, gapped_per_account: 4, gapped_total: 100, ..MempoolLimits::default() };
        let mut m = Mempool::new(limits);
        // The pool fills with gapped transactions, account 0's the oldest.
        let mut gapped = Vec::new();
        for (at, (from, nonce)) in (0..5).flat_map(|from| [(from, 2), (from, 3)]).enumerate() {
            let t = transfer(from, nonce, 0, 1);
            m.insert(&s, t.clone(), 100, at as u64).unwrap();
            gapped.push(t.hash());
        }
        assert_eq!(m.len(), 10);
        // Another gapped one is refused: the pool is full.
        assert_eq!(m.insert(&s, transfer(6, 1, 0, 1), 100, 20).unwrap_err().code(), "mempool_full");
        // One that can go next takes the oldest gapped one's place.
        m.insert(&s, transfer(7, 0, 0, 1), 100, 20).unwrap();
        assert_eq!(m.len(), 10);
        assert!(!m.contains(&gapped[0]));
        assert!(gapped[1..].iter().all(|h| m.contains(h)));
        // Closing account 1's gap makes its transactions runnable: they are no longer evicted first.
        m.remove(&gapped[9]);
        m.insert(&s, transfer(1, 0, 0, 1), 100, 21).unwrap();
        m.insert(&s, transfer(1, 1, 0, 1), 100, 21).unwrap();
        assert!(!m.contains(&gapped[1]), "account 0's last gapped one went");
        for from in 8..13 {
            m.insert(&s, transfer(from, 0, 0, 1), 100, 22).unwrap();
        }
        assert!(gapped[2..4].iter().all(|h| m.contains(h)), "account 1's run stays");
        assert!(gapped[4..9].iter().all(|h| !m.contains(h)));
        // Nothing gapped is left: a full pool refuses.
        assert_eq!(m.insert(&s, transfer(13, 0, 0, 1), 100, 23).unwrap_err().code(), "mempool_full");
    }

    #[test]
    fn candidates_follow_nonces_and_interleave_accounts() {
        let mut s = genesis();
        let mut m = pool(100);
        for (from, nonce) in [(0, 1), (0, 0), (1, 0), (0, 3), (1, 1)] {
            m.insert(&s, transfer(from, nonce, 1 - from, 1), 100, 0).unwrap();
        }
        let c = m.candidates(&s, 10);
        let order: Vec<_> = c.iter().map(|t| (t.tx.signer, t.tx.nonce)).collect();
        let (a, b) = (id(0).node_id(), id(1).node_id());
        let expected = if a < b { vec![(a, 0), (b, 0), (a, 1), (b, 1)] } else { vec![(b, 0), (a, 0), (b, 1), (a, 1)] };
        assert_eq!(order, expected, "nonce 3 waits for 2");
        assert_eq!(m.candidates(&s, 3).len(), 3);
        s.apply(&c.iter().find(|t| t.tx.signer == a && t.tx.nonce == 0).unwrap().clone()).unwrap();
        m.prune(&s, [a]);
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn refuses_duplicates_of_a_nonce_bad_transactions_and_overflow() {
        let s = genesis();
        let mut m = pool(2);
        let t = transfer(0, 0, 1, 1);
        let h = m.insert(&s, t.clone(), 100, 0).unwrap();
        assert_eq!(m.insert(&s, t, 100, 0).unwrap(), h, "idempotent");
        assert!(matches!(m.insert(&s, transfer(0, 0, 1, 2), 100, 0), Err(MempoolError::NonceTaken { .. })));
        assert!(matches!(m.insert(&s, transfer(0, 1, 1, 5_000), 100, 0), Err(MempoolError::Invalid(_))));
        m.insert(&s, transfer(0, 1, 1, 1), 100, 0).unwrap();
        assert!(matches!(m.insert(&s, transfer(1, 0, 0, 1), 100, 0), Err(MempoolError::Full(2))));
        m.remove(&h);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn entries_behind_a_gap_expire_sooner() {
        let s = genesis();
        let mut m = pool(100);
        m.insert(&s, transfer(0, 0, 1, 1), 100, 0).unwrap();
        m.insert(&s, transfer(0, 3, 1, 1), 100, 0).unwrap();
        m.insert(&s, transfer(1, 2, 0, 1), 100, 1_000).unwrap();
        assert_eq!(m.gapped_len(), 2);
        assert_eq!(m.expire(4_999), 0);
        assert_eq!(m.expire(5_001), 1, "account 0's gapped entry, admitted at 0");
        assert_eq!((m.len(), m.gapped_len()), (2, 1));
        assert_eq!(m.expire(6_001), 1);
        assert_eq!((m.len(), m.gapped_len()), (1, 0), "the entry that can go next stays");
        assert_eq!(m.expire(59_999), 0);
    }

    #[test]
    fn the_pool_is_bounded_in_bytes_too() {
        let s = genesis();
        let mut m = Mempool::new(MempoolLimits { max_bytes: 1_000, ..MempoolLimits::default() });
        m.insert(&s, transfer(0, 0, 1, 1), 600, 0).unwrap();
        // Room by count, not by bytes.
        assert!(matches!(m.insert(&s, transfer(1, 0, 0, 1), 401, 0), Err(MempoolError::Full(1))));
        m.insert(&s, transfer(1, 0, 0, 1), 400, 0).unwrap();
        // A gapped one is evicted for one that can go next, as for a full count.
        let mut m = Mempool::new(MempoolLimits { max_bytes: 1_000, ..MempoolLimits::default() });
        m.insert(&s, transfer(0, 5, 1, 1), 900, 0).unwrap();
        m.insert(&s, transfer(1, 0, 0, 1), 500, 0).unwrap();
        assert_eq!(m.len(), 1, "the gapped one made room");
    }

    #[test]
    fn a_transfer_many_counts_every_amount_and_fee_against_the_balance() {
        let s = genesis();
        let mut m = pool(100);
        let credits = vec![crate::Credit { to: id(1).node_id(), amount_micro: 300 }; 3];
        // 900 + 3 fees: 903 of account 0's 1,000.
        m.insert(&s, signed(0, 0, Payload::TransferMany { credits }), 100, 0).unwrap();
        let e = m.insert(&s, transfer(0, 1, 1, 97), 100, 0).unwrap_err();
        assert!(e.to_string().contains("already spend 903 of its final balance of 1000"), "{e}");
        m.insert(&s, transfer(0, 1, 1, 96), 100, 0).unwrap();
    }

    #[test]
    fn an_accounts_waiting_transactions_may_not_spend_more_than_its_final_balance_together() {
        let mut s = genesis();
        let mut m = pool(100);
        // Account 0 holds 1,000; each transfer alone is affordable (amount + fee 1).
        m.insert(&s, transfer(0, 0, 1, 600), 100, 0).unwrap();
        let e = m.insert(&s, transfer(0, 1, 1, 600), 100, 0).unwrap_err();
        assert_eq!(e.code(), "overspend");
        assert!(e.to_string().contains("already spend 601 of its final balance of 1000"), "{e}");
        // What is left still goes, exactly.
        let rest = transfer(0, 1, 1, 398);
        m.insert(&s, rest.clone(), 100, 0).unwrap();
        assert_eq!(m.insert(&s, transfer(0, 2, 1, 0), 100, 0).unwrap_err().code(), "overspend", "not even the fee");
        // Another account is judged on its own.
        m.insert(&s, transfer(1, 0, 0, 499), 100, 0).unwrap();
        // Once the first is final, what it spent left the balance and the pool alike.
        let first = m.candidates(&s, 10).into_iter().find(|t| t.tx.signer == id(0).node_id()).unwrap();
        s.apply(&first).unwrap();
        m.prune(&s, [id(0).node_id()]);
        assert!(m.contains(&rest.hash()));
        assert_eq!(m.insert(&s, transfer(0, 2, 1, 0), 100, 0).unwrap_err().code(), "overspend");
        // A dropped transaction frees its share.
        m.remove(&rest.hash());
        m.insert(&s, transfer(0, 1, 1, 397), 100, 0).unwrap();
        m.insert(&s, transfer(0, 2, 1, 0), 100, 0).unwrap();
        assert_eq!(m.insert(&s, transfer(0, 3, 1, 0), 100, 0).unwrap_err().code(), "overspend");
    }

    #[test]
    fn only_a_few_transactions_may_wait_behind_a_missing_nonce() {
        let s = genesis();
        let limits = MempoolLimits { capacity: 1_000, gapped_per_account: 3, ..MempoolLimits::default() };
        let mut m = Mempool::new(limits);
        // Nonce 0 never arrives: 3 may wait behind it.
        for nonce in [2, 5, 9] {
            m.insert(&s, transfer(0, nonce, 1, 1), 100, 0).unwrap();
        }
        let e = m.insert(&s, transfer(0, 10, 1, 1), 100, 0).unwrap_err();
        assert_eq!(e.code(), "nonce_gap");
        assert!(e.to_string().contains("behind its missing nonce 0 (at most 3): submit nonce 0 first"), "{e}");
        // The missing ones are always welcome and close the gap: 0, 1, 2 run; 5 and 9 wait.
        m.insert(&s, transfer(0, 0, 1, 1), 100, 0).unwrap();
        m.insert(&s, transfer(0, 1, 1, 1), 100, 0).unwrap();
        assert_eq!(m.candidates(&s, 100).len(), 3);
        m.insert(&s, transfer(0, 12, 1, 1), 100, 0).unwrap();
        assert_eq!(m.insert(&s, transfer(0, 13, 1, 1), 100, 0).unwrap_err().code(), "nonce_gap");
        // A transaction dropped from the run opens a gap again: everything above it waits.
        let one = transfer(0, 1, 1, 1).hash();
        m.remove(&one);
        assert_eq!(m.insert(&s, transfer(0, 3, 1, 1), 100, 0).unwrap_err().code(), "nonce_gap");
        m.insert(&s, transfer(0, 1, 1, 1), 100, 0).unwrap();
        m.insert(&s, transfer(0, 3, 1, 1), 100, 0).unwrap();
    }

    #[test]
    fn one_account_holds_at_most_its_quota() {
        let s = genesis();
        let limits = MempoolLimits { capacity: 1_000, per_account: 4, ..MempoolLimits::default() };
        let mut m = Mempool::new(limits);
        for nonce in 0..4 {
            m.insert(&s, transfer(0, nonce, 1, 1), 100, 0).unwrap();
        }
        let e = m.insert(&s, transfer(0, 4, 1, 1), 100, 0).unwrap_err();
        assert_eq!(e.code(), "account_quota");
        assert!(e.to_string().contains("already has 4 transactions waiting"), "{e}");
        m.insert(&s, transfer(1, 0, 0, 1), 100, 0).unwrap();
    }

    #[test]
    fn transactions_expire_after_the_time_to_live() {
        let s = genesis();
        let limits = MempoolLimits { capacity: 1_000, ttl_ms: 60_000, ..MempoolLimits::default() };
        let mut m = Mempool::new(limits);
        let old = transfer(0, 5, 1, 1);
        m.insert(&s, old.clone(), 100, 1_000).unwrap();
        let newer = transfer(1, 0, 0, 1);
        m.insert(&s, newer.clone(), 100, 30_000).unwrap();
        assert_eq!(m.expire(61_000), 0, "exactly the time-to-live: still there");
        // The next insert after the time-to-live drops the old one, and with it its spend and gap.
        m.insert(&s, transfer(0, 0, 1, 998), 100, 61_001).unwrap();
        assert!(!m.contains(&old.hash()));
        assert!(m.contains(&newer.hash()));
        assert_eq!(m.expire(90_001), 1);
        assert_eq!(m.len(), 1);
        assert_eq!(m.expire(1_000_000), 1);
        assert!(m.is_empty());
    }

    #[test]
    fn a_flood_of_gapped_and_overspending_transactions_leaves_room_for_honest_ones() {
        let s = genesis();
        let mut m = pool(100);
        // Account 0 floods gapped nonces, account 1 transfers that each spend its whole balance.
        for nonce in 1..1_024 {
            let _ = m.insert(&s, transfer(0, nonce, 1, 1), 100, 0);
            let _ = m.insert(&s, transfer(1, nonce - 1, 0, 499), 100, 0);
        }
        assert_eq!(m.len(), MempoolLimits::default().gapped_per_account + 1);
        // An honest transfer still gets in.
        m.insert(&s, signed(10, 0, Payload::Transfer { to: id(1).node_id(), amount_micro: 1 }), 100, 0).unwrap();
    }

    impl Mempool {
        /// Recomputes every per-account sum and run from scratch and compares.
        fn check_invariants(&self, state: &State) {
            let total: usize = self.accounts.values().map(|q| q.txs.len()).sum();
            assert_eq!(total, self.by_hash.len());
            assert_eq!(self.gapped_len(), self.accounts.values().map(AccountQueue::gapped).sum::<usize>());
            // Not bounded by `gapped_total`: that limit is checked on admission, and a transaction
            // dropped from the middle of a run puts the rest of the run behind a gap.
            assert!(self.len() <= self.limits.capacity);
            let bytes: usize = self.accounts.values().flat_map(|q| q.txs.values()).map(|w| w.bytes).sum();
            assert_eq!(bytes, self.bytes);
            assert!(self.bytes <= self.limits.max_bytes);
            assert_eq!(total, self.by_age.len());
            for (signer, q) in &self.accounts {
                assert!(!q.txs.is_empty(), "no empty queues");
                assert!(q.next <= state.account(signer).nonce);
                assert!(q.txs.keys().all(|n| *n >= q.next));
                let mut run_end = q.next;
                while q.txs.contains_key(&run_end) {
                    run_end += 1;
                }
                assert_eq!(q.run_end, run_end, "run of {}", signer.short());
                let spend: u128 = q.txs.values().map(|w| u128::from(w.spend_micro)).sum();
                assert_eq!(q.spend_micro, spend);
                assert!(q.spend_micro <= u128::from(state.account(signer).balance_micro));
                assert!(q.txs.len() <= self.limits.per_account);
                for (nonce, w) in &q.txs {
                    assert_eq!(self.by_hash.get(&w.hash), Some(&(*signer, *nonce)));
                    assert!(self.by_age.contains(&(w.admitted_ms, w.hash)));
                    let gapped = *nonce >= q.run_end;
                    assert_eq!(self.gapped_by_age.contains(&(w.admitted_ms, w.hash)), gapped, "nonce {nonce}");
                }
            }
        }
    }

    proptest::proptest! {
        /// The prechecker judges a batch as inserting it in order would: the same verdict for
        /// every transaction (the pool has room, nothing expires, every signature is valid), over
        /// nonce gaps, quotas, cumulative spend and repeats; the gapped share it leaves to
        /// insertion. After a block the pool was not told of, it leaves the account's queue to
        /// insertion, and only never refuses what insertion would take.
        #[test]
        fn a_batch_is_prechecked_as_inserting_it_in_order_would_judge_it(
            before in proptest::collection::vec((0u64..2, 0u64..24, 0u64..60), 0..30),
            batch in proptest::collection::vec((0u64..2, 0u64..24, 0u64..60, 0usize..8), 1..60),
            unpruned_block in proptest::bool::ANY,
        ) {
            let mut s = genesis();
            let limits = MempoolLimits { per_account: 12, gapped_per_account: 4, gapped_total: 6, ..MempoolLimits::default() };
            let mut m = Mempool::new(limits);
            let before: Vec<SignedTransaction> =
                before.iter().map(|&(from, nonce, amount)| transfer(from, nonce, 1 - from, amount)).collect();
            for t in &before {
                let _ = m.insert(&s, t.clone(), 100, 0);
            }
            if unpruned_block {
                // A block took the first candidate; the pool has not been pruned yet.
                if let Some(t) = m.candidates(&s, 1).pop() {
                    s.apply(&t).unwrap();
                }
            }
            // About one in eight repeats a transaction of the pool or of the batch before it.
            let mut txs: Vec<SignedTransaction> = Vec::new();
            for &(from, nonce, amount, repeat) in &batch {
                let t = match repeat {
                    0 if !before.is_empty() => before[nonce as usize % before.len()].clone(),
                    1 if !txs.is_empty() => txs[nonce as usize % txs.len()].clone(),
                    _ => transfer(from, nonce, 1 - from, amount),
                };
                txs.push(t);
            }
            let verdicts: Vec<Result<(), &'static str>> = {
                let mut p = m.prechecker(&s);
                // As `Chain::submit_many` does: what the pool holds is not checked again.
                txs.iter()
                    .map(|t| match m.contains(&t.hash()) {
                        true => Ok(()),
                        false => s.precheck(t, 100).map_err(MempoolError::from).and_then(|()| p.check(&t.hash(), t)),
                    })
                    .map(|v| v.map_err(|e| e.code()))
                    .collect()
            };
            // Accounts with a passed transaction that insertion then refused (for what the
            // prechecker leaves to it): their later verdicts may differ, as documented.
            let mut diverged = HashSet::new();
            for (t, verdict) in txs.into_iter().zip(verdicts) {
                let signer = t.tx.signer;
                let inserted = m.insert(&s, t, 100, 0).map(|_| ()).map_err(|e| e.code());
                match (verdict, inserted) {
                    _ if diverged.contains(&signer) => {}
                    (Ok(()), Err(code)) if code == "gapped_full" || unpruned_block => {
                        diverged.insert(signer);
                    }
                    (verdict, inserted) => proptest::prop_assert_eq!(verdict, inserted),
                }
            }
        }

        #[test]
        fn sums_and_runs_stay_consistent(ops in proptest::collection::vec((0u8..5, 0u64..2, 0u64..24, 0u64..400), 1..200)) {
            let mut s = genesis();
            // A small pool and gapped share, so that both fill and evict.
            let limits = MempoolLimits {
                capacity: 16,
                per_account: 12,
                gapped_per_account: 4,
                gapped_total: 6,
                ttl_ms: 500,
                gapped_ttl_ms: 200,
                // Binds before `capacity` when the larger transactions wait.
                max_bytes: 12 * 100,
            };
            let mut m = Mempool::new(limits);
            let mut now = 0;
            for (op, from, nonce, amount) in ops {
                now += 20;
                match op {
                    // Sizes 50 to 250 bytes, so the byte budget binds as well as the count.
                    0 | 1 => { let _ = m.insert(&s, transfer(from, nonce, 1 - from, amount), 50 + 50 * (amount as usize % 5), now); }
                    2 => m.remove(&transfer(from, nonce, 1 - from, amount).hash()),
                    3 => {
                        // A block takes the first candidate (as a proposer would) and is final.
                        if let Some(t) = m.candidates(&s, 1).pop() {
                            s.apply(&t).unwrap();
                            m.prune(&s, [t.tx.signer]);
                        }
                    }
                    _ => { m.expire(now); }
                }
                m.check_invariants(&s);
            }
        }
    }
}
