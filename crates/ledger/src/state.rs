//! Ledger state and `apply`: the network it belongs to, the chain position, accounts, the node
//! registry (with its deposits and the versions of nodes that left) and liveness leases.
//!
//! `apply` checks everything first and only then mutates, so a transaction is applied whole or
//! not at all. The state root is the root of a [`Trie`] over every `(key, value)` entry, brought
//! up to date from the entries changed since the last block ([`State::seal`]), so a block costs
//! O(changes × log entries) hashing whatever the size of the state, and [`State::prove`] shows
//! any key's value — or its absence — against a block header. Each kind of entry is a
//! [`Table`]: forking the state for a candidate block copies no entries.

use crate::hash::Hash;
use crate::lease::Lease;
use crate::params::LedgerParams;
use crate::storage::{BucketRecord, ObjectRecord};
use crate::store::{Commit, Committed, MemoryStore, StateStore, StoreError};
use crate::table::{Overlay, Table};
use crate::trie::{self, Trie, TrieProof};
use crate::tx::{Payload, SignedTransaction, Transaction, TxError};
use archipel_crypto::SignedDescriptor;
use archipel_types::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// An account.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Balance in micro-units.
    pub balance_micro: u64,
    /// Next expected nonce.
    pub nonce: u64,
}

/// A registered node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// What the node says about itself, signed by it.
    pub descriptor: SignedDescriptor,
    /// The account that registered it (itself for genesis nodes); it may update or remove it.
    pub owner: NodeId,
    /// Locked from the owner at registration (`node_deposit_micro` then; 0 for genesis nodes),
    /// returned to the owner when the node leaves.
    pub deposit_micro: u64,
    /// Whether an update changed its region, country or operator jurisdiction since it
    /// registered: the shards it holds may be outside their geofence now, so repair checks them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relocated: bool,
}

/// What an applied transaction did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Receipt {
    /// Funds moved.
    Transferred {
        /// From.
        from: NodeId,
        /// To.
        to: NodeId,
        /// Amount.
        amount_micro: u64,
        /// Fee burned.
        fee_micro: u64,
    },
    /// Funds moved to several recipients ([`crate::Payload::TransferMany`]).
    TransferredMany {
        /// From.
        from: NodeId,
        /// How many credits.
        credits: usize,
        /// Sum of the amounts.
        total_micro: u64,
        /// Fee burned (one transfer fee per credit).
        fee_micro: u64,
    },
    /// A node joined the registry.
    NodeRegistered {
        /// The node.
        node: NodeId,
        /// Its owner.
        owner: NodeId,
        /// Locked from the owner until the node leaves.
        deposit_micro: u64,
    },
    /// A node's descriptor changed.
    NodeUpdated {
        /// The node.
        node: NodeId,
    },
    /// A bucket was created.
    BucketCreated {
        /// Its name.
        name: String,
        /// Its owner.
        owner: NodeId,
    },
    /// An empty bucket was deleted.
    BucketDeleted {
        /// Its name.
        name: String,
    },
    /// An object version was stored (final: every holder signed its receipt).
    ObjectStored {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// The new version.
        version: Hash,
        /// The version it replaced, whose shards the holders may now delete.
        replaced: Option<Hash>,
    },
    /// Objects were stored by one `PutObjects`, in its order.
    ObjectsStored {
        /// Bucket.
        bucket: String,
        /// Each key, its new version and the version it replaced.
        stored: Vec<crate::batch::StoredVersion>,
    },
    /// An object was deleted; its holders may delete its shards.
    ObjectDeleted {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// The version deleted.
        version: Hash,
    },
    /// A holder failed its audit: its shard is repaired and its reputation lowered.
    AuditFailed {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// The holder that failed.
        holder: NodeId,
        /// Its shard index.
        index: u8,
    },
    /// Shards of an object moved to new holders (a repair).
    ShardsMoved {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// How many shards moved.
        moved: usize,
    },
    /// A node left the registry.
    NodeLeft {
        /// The node.
        node: NodeId,
        /// Its owner, who got the deposit back.
        owner: NodeId,
        /// The deposit returned.
        deposit_micro: u64,
    },
    /// A job transaction was applied ([`crate::jobs`]).
    JobStep {
        /// The job (the first, for a heartbeat naming several).
        job: Hash,
        /// The transaction's kind (`post_job`, `bid_commit`…).
        step: String,
        /// Whether the job ended with it.
        ended: bool,
    },
    /// Access-token ids were revoked.
    TokensRevoked {
        /// The account that revoked them.
        account: NodeId,
        /// Ids in the transaction.
        revoked: u32,
        /// Ids the account's list holds now.
        total: u32,
    },
    /// A protocol upgrade was scheduled ([`crate::upgrade`]).
    UpgradeScheduled {
        /// The version.
        protocol: u32,
        /// The height it comes into force at.
        height: u64,
    },
    /// A scheduled protocol upgrade was cancelled.
    UpgradeCancelled {
        /// The version.
        protocol: u32,
        /// The height it would have come into force at.
        height: u64,
    },
}

/// Liveness of a node as finalized state records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseStatus {
    /// The validators hear its heartbeats.
    Up,
    /// The validators stopped hearing it for `lease_ttl` (or never heard it).
    Down,
}

/// Where the chain is: the last applied block, and the protocol version in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPosition {
    /// Height of the last applied block (0 = genesis).
    pub height: u64,
    /// Its consensus timestamp (Unix ms).
    pub timestamp_ms: u64,
    /// Total fees burned so far.
    pub fees_burned_micro: u64,
    /// The protocol version in force ([`crate::upgrade`]).
    #[serde(default = "genesis_protocol")]
    pub protocol: u32,
    /// An upgrade scheduled and not yet in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<crate::upgrade::Upgrade>,
    /// Scheduled upgrades cancelled so far (approvals name the count).
    #[serde(default)]
    pub cancels: u32,
}

fn genesis_protocol() -> u32 {
    crate::upgrade::GENESIS_PROTOCOL
}

impl Default for ChainPosition {
    fn default() -> Self {
        ChainPosition {
            height: 0,
            timestamp_ms: 0,
            fees_burned_micro: 0,
            protocol: crate::upgrade::GENESIS_PROTOCOL,
            upgrade: None,
            cancels: 0,
        }
    }
}

/// What a genesis puts into the first state.
#[derive(Clone, Debug, Default)]
pub struct GenesisState {
    /// The network: the genesis hash (zero in unit tests). Registration consents, alive proofs
    /// and transactions are bound to it, so they cannot be replayed on another network.
    pub network: Hash,
    /// Parameters.
    pub params: LedgerParams,
    /// Genesis time (Unix ms).
    pub timestamp_ms: u64,
    /// The validators.
    pub validators: Vec<NodeId>,
    /// Funded accounts.
    pub accounts: Vec<(NodeId, u64)>,
    /// Registered nodes (each owns itself).
    pub nodes: Vec<SignedDescriptor>,
}

/// The key of one state entry, e.g. `account/<64 hex>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StateKey {
    /// An account's balance and nonce.
    Account(NodeId),
    /// A bucket, by the hash of its name ([`crate::storage::bucket_id`]).
    Bucket(Hash),
    /// Height, block time and fees burned.
    Chain,
    /// The highest descriptor version of a node that left the registry (a tombstone: registering
    /// it again needs a newer descriptor, so an old registration cannot be replayed).
    Departed(NodeId),
    /// A node's lease: Up or Down, and since which height.
    Lease(NodeId),
    /// The network this state belongs to (the genesis hash).
    Network,
    /// A node's registry record.
    Node(NodeId),
    /// An object, by the hash of its bucket and key ([`crate::storage::object_id`]).
    Object(Hash),
    /// The ledger parameters.
    Params,
    /// A node's reputation (lowered by failed audits; absent: full).
    Reputation(NodeId),
    /// Bytes of shards assigned to a node.
    Stored(NodeId),
    /// A validator.
    Validator(NodeId),
    /// The access-token ids an account revoked ([`crate::tokens`]).
    Revocations(NodeId),
    /// A compute job ([`crate::jobs`]), by id.
    Job(Hash),
    /// A compute provider's record of runs ([`crate::jobs`]).
    Record(NodeId),
}

impl fmt::Display for StateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateKey::Account(id) => write!(f, "account/{id}"),
            StateKey::Bucket(h) => write!(f, "bucket/{h}"),
            StateKey::Chain => f.write_str("chain"),
            StateKey::Departed(id) => write!(f, "departed/{id}"),
            StateKey::Lease(id) => write!(f, "lease/{id}"),
            StateKey::Network => f.write_str("network"),
            StateKey::Node(id) => write!(f, "node/{id}"),
            StateKey::Object(h) => write!(f, "object/{h}"),
            StateKey::Params => f.write_str("params"),
            StateKey::Reputation(id) => write!(f, "reputation/{id}"),
            StateKey::Revocations(id) => write!(f, "revocations/{id}"),
            StateKey::Job(h) => write!(f, "job/{h}"),
            StateKey::Record(id) => write!(f, "record/{id}"),
            StateKey::Stored(id) => write!(f, "stored/{id}"),
            StateKey::Validator(id) => write!(f, "validator/{id}"),
        }
    }
}

impl FromStr for StateKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let id = |rest: &str| rest.parse::<NodeId>().map_err(|e| format!("state key {s:?}: {e}"));
        match s.split_once('/') {
            None if s == "chain" => Ok(StateKey::Chain),
            None if s == "network" => Ok(StateKey::Network),
            None if s == "params" => Ok(StateKey::Params),
            Some(("account", rest)) => Ok(StateKey::Account(id(rest)?)),
            Some(("bucket", rest)) => Ok(StateKey::Bucket(rest.parse().map_err(|e| format!("state key {s:?}: {e}"))?)),
            Some(("object", rest)) => Ok(StateKey::Object(rest.parse().map_err(|e| format!("state key {s:?}: {e}"))?)),
            Some(("stored", rest)) => Ok(StateKey::Stored(id(rest)?)),
            Some(("reputation", rest)) => Ok(StateKey::Reputation(id(rest)?)),
            Some(("revocations", rest)) => Ok(StateKey::Revocations(id(rest)?)),
            Some(("job", rest)) => Ok(StateKey::Job(rest.parse().map_err(|e| format!("state key {s:?}: {e}"))?)),
            Some(("record", rest)) => Ok(StateKey::Record(id(rest)?)),
            Some(("departed", rest)) => Ok(StateKey::Departed(id(rest)?)),
            Some(("lease", rest)) => Ok(StateKey::Lease(id(rest)?)),
            Some(("node", rest)) => Ok(StateKey::Node(id(rest)?)),
            Some(("validator", rest)) => Ok(StateKey::Validator(id(rest)?)),
            _ => Err(format!(
                "unknown state key {s:?}: use account/<key>, node/<key>, lease/<key>, departed/<key>, validator/<key>, stored/<key>, reputation/<key>, revocations/<key>, record/<key>, bucket/<hash>, object/<hash>, job/<hash>, chain, network or params"
            )),
        }
    }
}

/// The ledger state: the entries written since the last commit, over a [`StateStore`] holding
/// the rest (an empty [`MemoryStore`] unless opened from one).
#[derive(Clone, Debug, Default)]
pub struct State {
    pub(crate) network: Hash,
    pub(crate) params: LedgerParams,
    pub(crate) chain: ChainPosition,
    pub(crate) validators: BTreeSet<NodeId>,
    /// Accounts grow without bound: read through from the store.
    pub(crate) accounts: Overlay<NodeId, Account>,
    /// The registry is bounded by `max_registered_nodes` and walked often: all in memory.
    pub(crate) nodes: Table<NodeId, NodeRecord>,
    /// Leases, one per registered node: read through from the store, as every kind a module
    /// adds is (see [`crate::lease`]).
    pub(crate) leases: Overlay<NodeId, Lease>,
    /// Tombstones: the highest descriptor version of each node that left (removed when it
    /// registers again). Read through from the store.
    pub(crate) departed: Overlay<NodeId, u64>,
    /// Buckets, by name hash (storage): read through from the store.
    pub(crate) buckets: Overlay<Hash, BucketRecord>,
    /// Objects, by name hash: read through from the store.
    pub(crate) objects: Overlay<Hash, ObjectRecord>,
    /// Bytes of shards assigned to each node: read through from the store.
    pub(crate) stored: Overlay<NodeId, u64>,
    /// Reputations lowered by audits: read through from the store.
    pub(crate) reputations: Overlay<NodeId, u16>,
    /// Revoked token ids per account: read through from the store.
    pub(crate) revocations: Overlay<NodeId, Vec<Hash>>,
    /// Compute jobs, by id: read through from the store.
    pub(crate) jobs: Overlay<Hash, archipel_market::Job>,
    /// Compute providers' records: read through from the store.
    pub(crate) records: Overlay<NodeId, archipel_market::Record>,
    /// Open jobs by the block time they are next due at (not in the root: derived from the
    /// jobs, rebuilt when a state is opened from its store).
    pub(crate) due_jobs: imbl::OrdSet<(u64, Hash)>,
    /// Each open job's entry in `due_jobs`.
    pub(crate) job_due: imbl::OrdMap<Hash, u64>,
    /// Block times an idle chain makes a block at for a job ([`archipel_market::Job::wake_times_ms`];
    /// derived and rebuilt like `due_jobs`), read by [`State::next_wake_ms`].
    pub(crate) wakes: imbl::OrdSet<(u64, Hash)>,
    /// Each open job's entries in `wakes`.
    pub(crate) job_wakes: imbl::OrdMap<Hash, Vec<u64>>,
    /// The newest ended jobs, by the time they ended ([`crate::jobs::RECENT_ENDED`] of them):
    /// what `GET /v1/jobs` lists without reading every job (not in the root either).
    pub(crate) recent_ended: imbl::OrdSet<(u64, Hash)>,
    /// Changed entries outside the tables (the chain position; the network, parameters and
    /// validators at genesis).
    pub(crate) other_changed: BTreeSet<StateKey>,
    /// Entries sealed since the last commit, with the height they were last written at: what
    /// the next [`State::commit`] writes. Persistent, so forking a state stays O(1).
    unsaved: imbl::OrdMap<StateKey, u64>,
    /// The entries as of the last [`State::seal`]; nodes off the changed paths are in the store.
    trie: Trie,
    pub(crate) store: StoreRef,
    /// The first failed store read, shared by every fork: sealing refuses to go on after it.
    fault: Arc<Mutex<Option<StoreError>>>,
    /// The newest protocol version this build executes, when a simulation of an upgrade sets it
    /// ([`State::with_supported_protocol`]); else [`crate::upgrade::PROTOCOL`]. Not in the root.
    pub(crate) protocol_ceiling: Option<u32>,
}

/// The store a state reads through: an empty [`MemoryStore`] by default.
#[derive(Clone, Debug)]
pub(crate) struct StoreRef(Arc<dyn StateStore>);

impl Default for StoreRef {
    fn default() -> Self {
        StoreRef(Arc::new(MemoryStore::default()))
    }
}

impl std::ops::Deref for StoreRef {
    type Target = dyn StateStore;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl State {
    /// The first state of a network.
    pub fn genesis(g: GenesisState) -> Self {
        let mut s = State {
            network: g.network,
            params: g.params,
            chain: ChainPosition { timestamp_ms: g.timestamp_ms, ..ChainPosition::default() },
            validators: g.validators.into_iter().collect(),
            ..State::default()
        };
        s.other_changed.extend([StateKey::Chain, StateKey::Network, StateKey::Params]);
        s.other_changed.extend(s.validators.iter().map(|v| StateKey::Validator(*v)));
        for (id, balance_micro) in g.accounts {
            s.accounts.update(id, |_| None, |a| a.balance_micro = a.balance_micro.saturating_add(balance_micro));
        }
        for d in g.nodes {
            let id = d.descriptor.node_id;
            s.nodes.insert(id, NodeRecord { owner: id, descriptor: d, deposit_micro: 0, relocated: false });
            s.open_lease(id);
        }
        s
    }

    /// The network this state belongs to: the genesis hash (zero when built without one).
    pub fn network(&self) -> Hash {
        self.network
    }

    /// The parameters.
    pub fn params(&self) -> &LedgerParams {
        &self.params
    }

    /// The last applied block's height, time and the fees burned.
    pub fn chain(&self) -> ChainPosition {
        self.chain
    }

    /// The validators.
    pub fn validators(&self) -> &BTreeSet<NodeId> {
        &self.validators
    }

    /// An account (default if it never appeared).
    pub fn account(&self, id: &NodeId) -> Account {
        self.accounts.get(id, |id| self.load(&StateKey::Account(*id), decode_account)).unwrap_or_default()
    }

    /// Changes `id`'s account (starting from the default if it never appeared).
    /// `signer`'s balance when it cannot lock `deposit` and pay `fee` too, else `None`.
    pub(crate) fn short_of(&self, signer: NodeId, deposit: u64, fee: u64) -> Option<u64> {
        let balance = self.account(&signer).balance_micro;
        deposit.checked_add(fee).is_none_or(|needed| balance < needed).then_some(balance)
    }

    pub(crate) fn update_account(&mut self, id: NodeId, f: impl FnOnce(&mut Account)) {
        let current = self.account(&id);
        // A failed read gives a default account the checks never saw: change nothing (the
        // fault stops the next seal).
        if self.check_fault().is_err() {
            return;
        }
        self.accounts.update(id, |_| Some(current), f)
    }

    /// The node registry.
    pub fn nodes(&self) -> &Table<NodeId, NodeRecord> {
        &self.nodes
    }

    /// The parameters, to change them in a test (the change enters the next state root).
    #[cfg(test)]
    pub(crate) fn params_mut(&mut self) -> &mut LedgerParams {
        self.other_changed.insert(StateKey::Params);
        &mut self.params
    }

    /// The highest descriptor version of `node` if it left the registry (and did not come back).
    pub fn departed_version(&self, node: &NodeId) -> Option<u64> {
        self.departed.get(node, |id| self.load(&StateKey::Departed(*id), |b| be_u64(b, 0)))
    }

    /// Money in all accounts, plus node deposits, plus fees burned: constant over any sequence of
    /// transactions. O(accounts): for checks.
    pub fn total_micro(&self) -> u128 {
        self.keys()
            .iter()
            .filter_map(
                |k| if let StateKey::Account(id) = k { Some(self.account(id).balance_micro as u128) } else { None },
            )
            .sum::<u128>()
            + self.nodes.values().map(|r| r.deposit_micro as u128).sum::<u128>()
            + self.chain.fees_burned_micro as u128
            + self.jobs_held_micro()
            + self.entry_deposits_micro()
    }

    /// Lease status of `node` (Down if it is not registered).
    pub fn lease_status(&self, node: &NodeId) -> LeaseStatus {
        match self.lease(node) {
            Some(l) if self.nodes.contains_key(node) => l.status,
            _ => LeaseStatus::Down,
        }
    }

    /// Starts block `height` at `timestamp_ms`.
    pub fn begin_block(&mut self, height: u64, timestamp_ms: u64) {
        self.other_changed.insert(StateKey::Chain);
        self.accounts.writing_at(height);
        self.departed.writing_at(height);
        self.leases.writing_at(height);
        self.buckets.writing_at(height);
        self.objects.writing_at(height);
        self.stored.writing_at(height);
        self.reputations.writing_at(height);
        self.revocations.writing_at(height);
        self.jobs.writing_at(height);
        self.records.writing_at(height);
        self.chain.height = height;
        self.chain.timestamp_ms = timestamp_ms;
        self.activate_upgrade(height);
        self.tick_jobs(timestamp_ms);
    }

    /// Checks a transaction before it enters the mempool: size, signature, nonce window, fee and
    /// everything its kind can check without the transactions before it. Changes nothing.
    pub fn admit(&self, stx: &SignedTransaction, encoded_len: usize) -> Result<(), TxError> {
        self.check_size(encoded_len)?;
        stx.verify(&self.network)?;
        self.admit_verified(stx, encoded_len)
    }

    fn check_size(&self, encoded_len: usize) -> Result<(), TxError> {
        let max = self.params.max_tx_bytes as usize;
        if encoded_len > max {
            return Err(TxError::TooLarge { bytes: encoded_len, max });
        }
        Ok(())
    }

    /// [`State::admit`] for a transaction whose signature was already checked.
    pub fn admit_verified(&self, stx: &SignedTransaction, encoded_len: usize) -> Result<(), TxError> {
        self.check_size(encoded_len)?;
        self.check_nonce_window(&stx.tx)?;
        // A gap in nonces is fine here (earlier transactions may still be on their way): check
        // the kind's rules as if this one came next.
        self.check_next(stx).map(|_| ())
    }

    /// The checks of [`State::admit`] that cost no signature verification: size, nonce window,
    /// the fee against the signer's balance, a transfer's amount, and a registry change's rules
    /// but for its descriptor and consent signatures (registered or not, who controls the node,
    /// room, versions, deposit, validators never leave). Run before signatures are
    /// verified, so a transaction that would be refused anyway costs its sender a signature and
    /// the node nothing; passing it says nothing about the other checks.
    pub fn precheck(&self, stx: &SignedTransaction, encoded_len: usize) -> Result<(), TxError> {
        self.check_size(encoded_len)?;
        let tx = &stx.tx;
        self.check_nonce_window(tx)?;
        self.check_kind(stx, false).map(|_| ())
    }

    /// Refuses a used nonce, or one further ahead of the account's next nonce than the window.
    fn check_nonce_window(&self, tx: &Transaction) -> Result<(), TxError> {
        let next = self.account(&tx.signer).nonce;
        if tx.nonce < next {
            return Err(TxError::Replay { got: tx.nonce, next });
        }
        if tx.nonce - next >= self.params.nonce_window {
            return Err(TxError::NonceTooFarAhead { got: tx.nonce, next, window: self.params.nonce_window });
        }
        Ok(())
    }

    /// Applies one transaction at the current block time: all of it, or nothing.
    pub fn apply(&mut self, stx: &SignedTransaction) -> Result<Receipt, TxError> {
        stx.verify(&self.network)?;
        self.apply_verified(stx)
    }

    /// [`State::apply`] for a transaction whose signature was already checked.
    pub fn apply_verified(&mut self, stx: &SignedTransaction) -> Result<Receipt, TxError> {
        let tx = &stx.tx;
        let expected = self.account(&tx.signer).nonce;
        if tx.nonce != expected {
            return Err(TxError::BadNonce { expected, got: tx.nonce });
        }
        let fee = self.check_next(stx)?;
        // Every check passed: only now mutate (nothing below can fail).
        let receipt = match &tx.payload {
            Payload::Transfer { to, amount_micro } => self.apply_transfer(tx.signer, *to, *amount_micro, fee),
            Payload::TransferMany { credits } => self.apply_transfer_many(tx.signer, credits, fee),
            Payload::RegisterNode { descriptor, .. } => self.apply_register(tx.signer, descriptor),
            Payload::UpdateNode { descriptor } => self.apply_update(descriptor),
            Payload::LeaveNode { node } => self.apply_leave(*node),
            Payload::CreateBucket { name, policy } => self.apply_create_bucket(tx.signer, name, policy),
            Payload::DeleteBucket { name } => self.apply_delete_bucket(name),
            Payload::PutObject { put } => self.apply_put_object(put),
            Payload::PutObjects { batch } => self.apply_put_batch(batch),
            Payload::DeleteObject { bucket, key } => self.apply_delete_object(bucket, key),
            Payload::MoveShards { bucket, key, moves, .. } => self.apply_move_shards(bucket, key, moves),
            Payload::AuditFailed { bucket, key, epoch, .. } => self.apply_audit_failed(bucket, key, *epoch),
            Payload::RevokeTokens { ids } => self.apply_revoke_tokens(tx.signer, ids),
            Payload::ScheduleUpgrade { upgrade, .. } => self.apply_schedule_upgrade(upgrade),
            Payload::CancelUpgrade { upgrade, .. } => self.apply_cancel_upgrade(upgrade),
            Payload::PostJob { .. }
            | Payload::BidCommit { .. }
            | Payload::BidReveal { .. }
            | Payload::JobHeartbeat { .. }
            | Payload::ResultCommit { .. }
            | Payload::ResultReveal { .. }
            | Payload::CancelJob { .. } => self.apply_job(tx.signer, tx.nonce, fee, &tx.payload),
        };
        self.update_account(tx.signer, |a| {
            a.balance_micro -= fee;
            a.nonce += 1;
        });
        self.chain.fees_burned_micro += fee;
        self.other_changed.insert(StateKey::Chain);
        Ok(receipt)
    }

    /// Checks everything about `stx` except its signature and nonce, as if it were the signer's
    /// next transaction; changes nothing. Returns the fee it would pay.
    fn check_next(&self, stx: &SignedTransaction) -> Result<u64, TxError> {
        self.check_kind(stx, true)
    }

    /// The fee against the balance and the kind's rules; a registry change's descriptor and
    /// consent signatures only `with_signatures`. Returns the fee.
    fn check_kind(&self, stx: &SignedTransaction, with_signatures: bool) -> Result<u64, TxError> {
        let tx = &stx.tx;
        let fee = tx.payload.fee_micro(self.params.tx_fee_micro);
        let balance_micro = self.account(&tx.signer).balance_micro;
        if balance_micro < fee {
            return Err(TxError::InsufficientFunds { balance_micro, needed_micro: fee });
        }
        match &tx.payload {
            Payload::Transfer { to, amount_micro } => self.check_transfer(tx.signer, *to, *amount_micro, fee)?,
            Payload::TransferMany { credits } if with_signatures => {
                self.check_transfer_many(tx.signer, credits, fee)?
            }
            Payload::TransferMany { credits } => self.check_transfer_many_cheap(tx.signer, credits, fee)?,
            Payload::RegisterNode { descriptor, consent } if with_signatures => {
                self.check_register(tx.signer, fee, descriptor, consent)?
            }
            Payload::RegisterNode { descriptor, .. } => self.check_register_cheap(tx.signer, fee, descriptor)?,
            Payload::UpdateNode { descriptor } if with_signatures => self.check_update(tx.signer, descriptor)?,
            Payload::UpdateNode { descriptor } => self.check_update_cheap(tx.signer, descriptor)?,
            Payload::LeaveNode { node } => self.check_leave(tx.signer, *node)?,
            Payload::CreateBucket { name, policy } => self.check_create_bucket(tx.signer, fee, name, policy)?,
            Payload::DeleteBucket { name } => self.check_delete_bucket(tx.signer, name)?,
            Payload::PutObject { put } if with_signatures => self.check_put_object(tx.signer, fee, put)?,
            Payload::PutObject { put } => self.check_put_object_cheap(tx.signer, fee, put)?,
            Payload::PutObjects { batch } if with_signatures => self.check_put_batch(tx.signer, fee, batch)?,
            Payload::PutObjects { batch } => self.check_put_batch_cheap(tx.signer, fee, batch)?,
            Payload::DeleteObject { bucket, key } => self.check_delete_object(tx.signer, bucket, key)?,
            Payload::MoveShards { bucket, key, version, moves } if with_signatures => {
                self.check_move_shards(bucket, key, version, moves)?
            }
            Payload::MoveShards { bucket, key, version, moves } => {
                self.check_move_shards_cheap(bucket, key, version, moves).map(drop)?
            }
            Payload::AuditFailed { bucket, key, version, epoch } => {
                self.check_audit_failed(tx.signer, bucket, key, version, *epoch)?
            }
            Payload::RevokeTokens { ids } => self.check_revoke_tokens(tx.signer, ids)?,
            Payload::ScheduleUpgrade { upgrade, approvals } => {
                self.check_schedule_upgrade(upgrade, approvals, with_signatures)?
            }
            Payload::CancelUpgrade { upgrade, approvals } => {
                self.check_cancel_upgrade(upgrade, approvals, with_signatures)?
            }
            Payload::PostJob { .. }
            | Payload::BidCommit { .. }
            | Payload::BidReveal { .. }
            | Payload::JobHeartbeat { .. }
            | Payload::ResultCommit { .. }
            | Payload::ResultReveal { .. }
            | Payload::CancelJob { .. } => self.check_job(tx.signer, tx.nonce, fee, &tx.payload)?,
        }
        Ok(fee)
    }

    /// The value bytes the state root commits to for `key`, or `None` when it has no entry.
    pub fn value(&self, key: &StateKey) -> Option<Vec<u8>> {
        match key {
            StateKey::Account(id) => self
                .accounts
                .get(id, |id| self.load(&StateKey::Account(*id), decode_account))
                .map(|a| [a.balance_micro.to_be_bytes(), a.nonce.to_be_bytes()].concat()),
            StateKey::Chain => Some(encode_chain(&self.chain)),
            StateKey::Departed(id) => self.departed_version(id).map(|v| v.to_be_bytes().to_vec()),
            StateKey::Lease(id) => self.lease(id).map(|l| l.to_bytes()),
            StateKey::Network => Some(self.network.0.to_vec()),
            StateKey::Node(id) => self.nodes.get(id).map(json),
            StateKey::Params => Some(json(&self.params)),
            StateKey::Validator(id) => self.validators.contains(id).then(Vec::new),
            StateKey::Bucket(h) => {
                self.buckets.get(h, |h| self.load(&StateKey::Bucket(*h), decode_json)).map(|b| json(&b))
            }
            StateKey::Object(h) => {
                self.objects.get(h, |h| self.load(&StateKey::Object(*h), decode_json)).map(|o| json(&o))
            }
            StateKey::Reputation(id) => self
                .reputations
                .get(id, |id| self.load(&StateKey::Reputation(*id), decode_u16))
                .map(|r| r.to_be_bytes().to_vec()),
            StateKey::Stored(id) => self
                .stored
                .get(id, |id| self.load(&StateKey::Stored(*id), |b| be_u64(b, 0)))
                .map(|v| v.to_be_bytes().to_vec()),
            StateKey::Revocations(id) => self
                .revocations
                .get(id, |id| self.load(&StateKey::Revocations(*id), decode_json))
                .map(|v: Vec<Hash>| json(&v)),
            StateKey::Job(h) => self.job(h).map(|j| json(&j)),
            StateKey::Record(id) => self
                .records
                .get(id, |id| self.load(&StateKey::Record(*id), decode_json))
                .map(|r: archipel_market::Record| json(&r)),
        }
    }

    /// Every key with an entry, in key order. O(state), reading every stored key: for checks and
    /// inspection.
    pub fn keys(&self) -> Vec<StateKey> {
        let mut out = Vec::new();
        out.extend(self.overlay_keys("account/", &self.accounts, StateKey::Account));
        out.extend(self.overlay_keys("bucket/", &self.buckets, StateKey::Bucket));
        out.push(StateKey::Chain);
        out.extend(self.overlay_keys("departed/", &self.departed, StateKey::Departed));
        out.extend(self.overlay_keys("job/", &self.jobs, StateKey::Job));
        out.extend(self.overlay_keys("lease/", &self.leases, StateKey::Lease));
        out.push(StateKey::Network);
        out.extend(self.nodes.keys().map(|id| StateKey::Node(*id)));
        out.extend(self.overlay_keys("object/", &self.objects, StateKey::Object));
        out.push(StateKey::Params);
        out.extend(self.overlay_keys("record/", &self.records, StateKey::Record));
        out.extend(self.overlay_keys("reputation/", &self.reputations, StateKey::Reputation));
        out.extend(self.overlay_keys("revocations/", &self.revocations, StateKey::Revocations));
        out.extend(self.overlay_keys("stored/", &self.stored, StateKey::Stored));
        out.extend(self.validators.iter().map(|id| StateKey::Validator(*id)));
        out
    }

    /// Every entry committed by the state root, in key order. O(state): for inspection and tests.
    pub fn entries(&self) -> Vec<(StateKey, Vec<u8>)> {
        self.keys().into_iter().filter_map(|k| self.value(&k).map(|v| (k, v))).collect()
    }

    /// Whether entries changed since the last [`State::seal`].
    fn has_changes(&self) -> bool {
        !self.other_changed.is_empty()
            || self.accounts.has_changes()
            || self.nodes.has_changes()
            || self.leases.has_changes()
            || self.departed.has_changes()
            || self.buckets.has_changes()
            || self.objects.has_changes()
            || self.stored.has_changes()
            || self.reputations.has_changes()
            || self.revocations.has_changes()
            || self.jobs.has_changes()
            || self.records.has_changes()
    }

    /// Brings the state root up to date with the entries changed since the last call, hashing
    /// only their paths; returns it. Call once per block, after its transactions. Fails — and
    /// every later call fails — once a store read failed: the root would not be this state's.
    pub fn seal(&mut self) -> Result<Hash, StoreError> {
        self.check_fault()?;
        if !self.has_changes() {
            return Ok(self.trie.root());
        }
        let mut keys: Vec<StateKey> = std::mem::take(&mut self.other_changed).into_iter().collect();
        keys.extend(self.accounts.take_changed().into_iter().map(StateKey::Account));
        keys.extend(self.nodes.take_changed().into_iter().map(StateKey::Node));
        keys.extend(self.leases.take_changed().into_iter().map(StateKey::Lease));
        keys.extend(self.departed.take_changed().into_iter().map(StateKey::Departed));
        keys.extend(self.buckets.take_changed().into_iter().map(StateKey::Bucket));
        keys.extend(self.objects.take_changed().into_iter().map(StateKey::Object));
        keys.extend(self.stored.take_changed().into_iter().map(StateKey::Stored));
        keys.extend(self.reputations.take_changed().into_iter().map(StateKey::Reputation));
        keys.extend(self.revocations.take_changed().into_iter().map(StateKey::Revocations));
        keys.extend(self.jobs.take_changed().into_iter().map(StateKey::Job));
        keys.extend(self.records.take_changed().into_iter().map(StateKey::Record));
        let changes: Vec<trie::Change> =
            keys.iter().map(|k| (state_key_hash(k), self.value(k).map(|v| trie::value_hash(&v)))).collect();
        self.check_fault()?;
        self.trie.update(changes, &*self.store)?;
        let at = self.chain.height;
        for k in keys {
            self.unsaved.insert(k, at);
        }
        Ok(self.trie.root())
    }

    /// The state root: the trie's root over every entry (sealing a copy if entries changed since
    /// the last [`State::seal`]). [`Hash::ZERO`] if the store failed (see [`State::seal`], which
    /// says why).
    pub fn state_root(&self) -> Hash {
        let root = if self.has_changes() { self.clone().seal() } else { self.check_fault().map(|()| self.trie.root()) };
        root.unwrap_or(Hash::ZERO)
    }

    /// The root rebuilt from every entry, O(state): a check that incremental sealing missed
    /// nothing.
    pub fn rebuilt_root(&self) -> Hash {
        let mut t = Trie::new();
        let changes = self.entries().into_iter().map(|(k, v)| (state_key_hash(&k), Some(trie::value_hash(&v))));
        match t.update(changes, &trie::NoLeaves) {
            Ok(()) => t.root(),
            Err(_) => Hash::ZERO, // a trie built in memory from nothing reads no stored node
        }
    }

    /// The value of `key` (`None` when absent) and its path to the state root, which shows either.
    pub fn prove(&self, key: &StateKey) -> Result<(Option<Vec<u8>>, TrieProof), StoreError> {
        let sealed;
        let s = if self.has_changes() {
            sealed = {
                let mut c = self.clone();
                c.seal()?;
                c
            };
            &sealed
        } else {
            self
        };
        let proof = s.trie.prove(&state_key_hash(key), &*s.store)?;
        let value = s.value(key);
        s.check_fault()?;
        Ok((value, proof))
    }

    /// The writes that bring a store holding this state's last committed ancestor to this state
    /// (sealing it first). Hand them to [`StateStore::commit`], then call [`State::committed`].
    pub fn commit(&mut self) -> Result<Commit, StoreError> {
        let root = self.seal()?;
        let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> =
            self.unsaved.keys().map(|k| (k.to_bytes(), self.value(k))).collect();
        // The index follows the objects: the store still holds each one's previous version.
        let mut index = Vec::new();
        for (k, new) in entries.iter().filter(|(k, _)| k.starts_with(b"object/")) {
            let old = self.store.get(k)?;
            index.extend(crate::listing::index_changes(k, old.as_deref(), new.as_deref()));
        }
        self.check_fault()?;
        // The store keeps the entries and, from them, the trie's leaves; no trie node is written
        // (one write per changed entry instead of one per node on its path).
        Ok(Commit { height: self.chain.height, root, entries, txs: Vec::new(), index })
    }

    /// Once the store holds this state: forget the entries written since the last commit, so
    /// reads of unchanged entries go to the store, and let go of the trie below the store's
    /// bucket depth (its leaves are read back from the store when a change or a proof needs
    /// them). Call it only on the state the store now holds exactly.
    pub fn committed(&mut self) {
        self.trie.compact(self.store.bucket_depth());
        self.unsaved = imbl::OrdMap::new();
        self.accounts.clear_written();
        self.departed.clear_written();
        self.leases.clear_written();
        self.buckets.clear_written();
        self.objects.clear_written();
        self.stored.clear_written();
        self.reputations.clear_written();
        self.revocations.clear_written();
        self.jobs.clear_written();
        self.records.clear_written();
    }

    /// Forgets what a store committed through `height` holds already: for a state forked from
    /// its ancestor before that commit (a block executed before its parent was committed), so
    /// memory and the next commit hold only what came after — its trie too, except the buckets
    /// its own blocks after `height` changed (see [`Trie::compact_except`]).
    pub fn forget_committed_through(&mut self, height: u64) {
        self.accounts.forget_through(height);
        self.departed.forget_through(height);
        self.leases.forget_through(height);
        self.buckets.forget_through(height);
        self.objects.forget_through(height);
        self.stored.forget_through(height);
        self.reputations.forget_through(height);
        self.revocations.forget_through(height);
        self.jobs.forget_through(height);
        self.records.forget_through(height);
        if self.unsaved.values().any(|at| *at <= height) {
            self.unsaved = self.unsaved.iter().filter(|(_, at)| **at > height).map(|(k, at)| (*k, *at)).collect();
            let own = self.unsaved.keys().map(state_key_hash).collect();
            self.trie.compact_except(self.store.bucket_depth(), own);
        }
    }

    /// Entries held in memory that a commit would write (a check that memory stays bounded).
    pub fn uncommitted_entries(&self) -> usize {
        self.unsaved.len()
    }

    /// How many trie nodes this state holds in memory: the levels above the store's bucket depth
    /// and the paths changed since its last commit.
    pub fn memory_trie_nodes(&self) -> usize {
        self.trie.memory_nodes()
    }

    /// This state, kept in `store` from now on: a fresh state (the genesis) moving onto the disk
    /// store it will be committed to. Everything written so far is still to be committed.
    pub fn with_store(mut self, store: Arc<dyn StateStore>) -> Self {
        self.store = StoreRef(store);
        self
    }

    /// The state a store holds at its committed height, or `None` for an empty store.
    pub fn open(store: Arc<dyn StateStore>) -> Result<Option<State>, StoreError> {
        let Some(Committed { height, root }) = store.committed()? else { return Ok(None) };
        let get = |key: StateKey| -> Result<Vec<u8>, StoreError> {
            store.get(&key.to_bytes())?.ok_or_else(|| StoreError::Corrupt(format!("no {key} entry")))
        };
        let corrupt = |key: &dyn fmt::Display, e: String| StoreError::Corrupt(format!("{key}: {e}"));
        let c = get(StateKey::Chain)?;
        let chain = decode_chain(&c).map_err(|e| corrupt(&"chain", e))?;
        if chain.height != height {
            return Err(StoreError::Corrupt(format!("chain entry at height {}, commit at {height}", chain.height)));
        }
        let network = Hash(get(StateKey::Network)?.try_into().map_err(|_| corrupt(&"network", "not 32 bytes".into()))?);
        let params: LedgerParams =
            serde_json::from_slice(&get(StateKey::Params)?).map_err(|e| corrupt(&"params", e.to_string()))?;
        // One pass over the store, in key-hash order: every entry is a leaf of the trie, whose
        // top levels are rebuilt (and must give the committed root), and the registry and
        // validators are kept as it goes.
        let mut builder = trie::Builder::new(store.bucket_depth());
        let mut registry = Vec::new();
        let mut jobs = Vec::new();
        let mut ended = BTreeSet::new();
        for_each_stored(&*store, "", |k, v| {
            builder.push((trie::key_hash(&k), trie::value_hash(&v)))?;
            if [&b"node/"[..], b"validator/"].iter().any(|p| k.starts_with(p)) {
                registry.push((parse_key("registry", k)?, v));
            } else if k.starts_with(b"job/") {
                // The due index is rebuilt from the open jobs, the recent ones from the ended.
                let key = parse_key("job", k)?;
                let job: archipel_market::Job =
                    serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))?;
                if let StateKey::Job(id) = key {
                    match crate::jobs::ended_at(&job) {
                        None => jobs.push((id, job)),
                        Some(at) => {
                            ended.insert((at, id));
                            if ended.len() > crate::jobs::RECENT_ENDED {
                                ended.pop_first();
                            }
                        }
                    }
                }
            }
            Ok(())
        })?;
        let trie = builder.finish();
        if trie.root() != root {
            return Err(StoreError::Corrupt(format!(
                "its entries hash to root {}, not the committed {}",
                trie.root().short(),
                root.short()
            )));
        }
        let mut s = State { network, params, chain, store: StoreRef(store.clone()), trie, ..State::default() };
        for (key, value) in registry {
            match key {
                StateKey::Validator(id) => {
                    s.validators.insert(id);
                }
                StateKey::Node(id) => {
                    let rec: NodeRecord = serde_json::from_slice(&value).map_err(|e| corrupt(&key, e.to_string()))?;
                    s.nodes.insert(id, rec);
                }
                _ => {}
            }
        }
        for (id, job) in jobs {
            s.index_job(&id, &job);
        }
        s.recent_ended = ended.into_iter().collect();
        // What was loaded is what the store holds: nothing to seal or write.
        s.nodes.take_changed();
        Ok(Some(s))
    }

    /// Reads `key` from the store; a failure is kept (see [`State::seal`]) and reads as absent.
    pub(crate) fn load<V>(&self, key: &StateKey, decode: fn(&[u8]) -> Result<V, String>) -> Option<V> {
        let read = self.store.get(&key.to_bytes()).and_then(|bytes| match bytes {
            None => Ok(None),
            Some(b) => decode(&b).map(Some).map_err(|e| StoreError::Corrupt(format!("{key}: {e}"))),
        });
        read.unwrap_or_else(|e| {
            self.record_fault(e);
            None
        })
    }

    /// The store failure that stopped this state, if any (checks refused because of it are this
    /// node's disk, not the transaction's fault).
    pub fn store_fault(&self) -> Option<StoreError> {
        self.check_fault().err()
    }

    /// Keeps the first store failure (see [`State::seal`]).
    fn record_fault(&self, e: StoreError) {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
    }

    /// Keeps `read`'s failure, if any (see [`State::seal`]).
    pub(crate) fn keep_fault(&self, read: Result<(), StoreError>) {
        if let Err(e) = read {
            self.record_fault(e);
        }
    }

    pub(crate) fn check_fault(&self) -> Result<(), StoreError> {
        match &*self.fault.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// The keys of one read-through kind: the store's, with this state's writes over them.
    pub(crate) fn overlay_keys<K: Ord + Clone + Copy + StoredId, V: Clone>(
        &self,
        prefix: &str,
        overlay: &Overlay<K, V>,
        key: fn(K) -> StateKey,
    ) -> Vec<StateKey> {
        let mut ids: BTreeSet<K> = match scan_all(&*self.store, prefix) {
            Ok(entries) => entries.into_iter().filter_map(|(k, _)| K::of(&k)).collect(),
            Err(e) => {
                self.record_fault(e);
                BTreeSet::new()
            }
        };
        for (id, v) in overlay.written() {
            if v.is_some() {
                ids.insert(*id);
            } else {
                ids.remove(id);
            }
        }
        ids.into_iter().map(key).collect()
    }
}

/// The id inside a read-through kind's state key.
pub(crate) trait StoredId: Sized {
    fn of(key: &StateKey) -> Option<Self>;
}

impl StoredId for NodeId {
    fn of(key: &StateKey) -> Option<Self> {
        match key {
            StateKey::Account(id)
            | StateKey::Departed(id)
            | StateKey::Lease(id)
            | StateKey::Stored(id)
            | StateKey::Reputation(id)
            | StateKey::Revocations(id)
            | StateKey::Record(id) => Some(*id),
            _ => None,
        }
    }
}

impl StoredId for Hash {
    fn of(key: &StateKey) -> Option<Self> {
        match key {
            StateKey::Bucket(h) | StateKey::Object(h) | StateKey::Job(h) => Some(*h),
            _ => None,
        }
    }
}

pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    serde_json::from_slice(b).map_err(|e| e.to_string())
}

/// Every stored entry under `prefix`, with its key parsed.
fn scan_all(store: &dyn StateStore, prefix: &str) -> Result<Vec<(StateKey, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    for_each_stored(store, prefix, |k, v| {
        out.push((parse_key(prefix, k)?, v));
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f` on every stored entry under `prefix`, in key-hash order, a page at a time.
fn for_each_stored(
    store: &dyn StateStore,
    prefix: &str,
    mut f: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    const PAGE: usize = 4_096;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(prefix.as_bytes(), after.as_deref(), PAGE)?;
        let full = page.len() == PAGE;
        after = page.last().map(|(k, _)| k.clone());
        for (k, v) in page {
            f(k, v)?;
        }
        if !full {
            return Ok(());
        }
    }
}

fn parse_key(prefix: &str, k: Vec<u8>) -> Result<StateKey, StoreError> {
    let text = String::from_utf8(k).map_err(|_| StoreError::Corrupt(format!("a {prefix} key is not UTF-8")))?;
    text.parse::<StateKey>().map_err(StoreError::Corrupt)
}

/// The big-endian u64 at byte `at` of a state value.
pub(crate) fn be_u64(bytes: &[u8], at: usize) -> Result<u64, String> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| format!("value too short ({} bytes)", bytes.len()))
}

pub(crate) fn decode_u16(b: &[u8]) -> Result<u16, String> {
    b.try_into().map(u16::from_be_bytes).map_err(|_| format!("a 2-byte value is {} bytes", b.len()))
}

fn decode_account(b: &[u8]) -> Result<Account, String> {
    if b.len() != 16 {
        return Err(format!("an account is 16 bytes, not {}", b.len()));
    }
    Ok(Account { balance_micro: be_u64(b, 0)?, nonce: be_u64(b, 8)? })
}

/// Whether the chain entry needs its upgrade fields (else it is written as before upgrades).
fn upgraded_ever(c: &ChainPosition) -> bool {
    c.protocol != crate::upgrade::GENESIS_PROTOCOL || c.upgrade.is_some() || c.cancels != 0
}

/// The chain entry's bytes: height, time and fees burned (24 bytes); then, once an upgrade was
/// ever scheduled, the protocol in force, the scheduled upgrade (version 0 and height 0 for none)
/// and the cancels (44 bytes) — so a network that never upgraded keeps the entry, and its roots,
/// as they always were.
fn encode_chain(c: &ChainPosition) -> Vec<u8> {
    let mut v = [c.height.to_be_bytes(), c.timestamp_ms.to_be_bytes(), c.fees_burned_micro.to_be_bytes()].concat();
    if upgraded_ever(c) {
        let u = c.upgrade.unwrap_or(crate::upgrade::Upgrade { protocol: 0, height: 0 });
        v.extend_from_slice(&c.protocol.to_be_bytes());
        v.extend_from_slice(&u.protocol.to_be_bytes());
        v.extend_from_slice(&u.height.to_be_bytes());
        v.extend_from_slice(&c.cancels.to_be_bytes());
    }
    v
}

pub(crate) fn decode_chain(b: &[u8]) -> Result<ChainPosition, String> {
    let u32_at = |at: usize| -> Result<u32, String> {
        b.get(at..at + 4).and_then(|s| s.try_into().ok()).map(u32::from_be_bytes).ok_or("short".to_string())
    };
    let mut c = ChainPosition {
        height: be_u64(b, 0)?,
        timestamp_ms: be_u64(b, 8)?,
        fees_burned_micro: be_u64(b, 16)?,
        ..ChainPosition::default()
    };
    match b.len() {
        24 => {}
        44 => {
            c.protocol = u32_at(24)?;
            let (protocol, height) = (u32_at(28)?, be_u64(b, 32)?);
            c.upgrade = (protocol != 0).then_some(crate::upgrade::Upgrade { protocol, height });
            c.cancels = u32_at(40)?;
            // Only what `encode_chain` writes: one encoding per state.
            if !upgraded_ever(&c) || (protocol == 0 && height != 0) {
                return Err("the chain entry's upgrade fields are not in canonical form".into());
            }
        }
        n => return Err(format!("the chain entry is 24 or 44 bytes, not {n}")),
    }
    Ok(c)
}

/// Two states are equal when they hold the same entries: when their roots are.
impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.state_root() == other.state_root()
    }
}

impl Eq for State {}

impl StateKey {
    /// The key's bytes in the store and the trie: its text form (`account/<64 hex>`), written
    /// without the formatting machinery (this runs for every changed entry of every block).
    pub fn to_bytes(&self) -> Vec<u8> {
        let with_id = |prefix: &[u8], id: &[u8; 32]| {
            let mut out = Vec::with_capacity(prefix.len() + 64);
            out.extend_from_slice(prefix);
            let mut hexed = [0u8; 64];
            // 32 bytes always fit 64 hex characters.
            let _ = hex::encode_to_slice(id, &mut hexed);
            out.extend_from_slice(&hexed);
            out
        };
        match self {
            StateKey::Account(id) => with_id(b"account/", &id.0),
            StateKey::Chain => b"chain".to_vec(),
            StateKey::Departed(id) => with_id(b"departed/", &id.0),
            StateKey::Lease(id) => with_id(b"lease/", &id.0),
            StateKey::Network => b"network".to_vec(),
            StateKey::Node(id) => with_id(b"node/", &id.0),
            StateKey::Params => b"params".to_vec(),
            StateKey::Validator(id) => with_id(b"validator/", &id.0),
            StateKey::Bucket(h) => with_id(b"bucket/", &h.0),
            StateKey::Object(h) => with_id(b"object/", &h.0),
            StateKey::Stored(id) => with_id(b"stored/", &id.0),
            StateKey::Reputation(id) => with_id(b"reputation/", &id.0),
            StateKey::Revocations(id) => with_id(b"revocations/", &id.0),
            StateKey::Job(h) => with_id(b"job/", &h.0),
            StateKey::Record(id) => with_id(b"record/", &id.0),
        }
    }
}

/// Where `key` sits in the trie.
pub fn state_key_hash(key: &StateKey) -> Hash {
    trie::key_hash(&key.to_bytes())
}

/// JSON bytes of a state value (node records and parameters are stored as JSON).
fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("state values serialize")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tx::Transaction;
    use archipel_crypto::Identity;

    pub(crate) fn id(seed: u64) -> Identity {
        Identity::from_seed(seed)
    }

    pub(crate) fn signed(from: u64, nonce: u64, payload: Payload) -> SignedTransaction {
        Transaction { signer: id(from).node_id(), nonce, payload }.sign(&id(from), &Hash::ZERO)
    }

    pub(crate) fn transfer(from: u64, nonce: u64, to: u64, amount: u64) -> SignedTransaction {
        signed(from, nonce, Payload::Transfer { to: id(to).node_id(), amount_micro: amount })
    }

    pub(crate) fn genesis() -> State {
        State::genesis(GenesisState {
            network: Hash::ZERO,
            params: LedgerParams::default(),
            timestamp_ms: 0,
            validators: vec![id(10).node_id()],
            accounts: vec![(id(0).node_id(), 1_000), (id(1).node_id(), 500), (id(10).node_id(), 100)],
            nodes: vec![
                SignedDescriptor::sign(&id(10), archipel_crypto::test_support::example_descriptor(&id(10))).unwrap(),
            ],
        })
    }

    #[test]
    fn state_keys_print_and_parse() {
        for k in [
            StateKey::Account(id(1).node_id()),
            StateKey::Chain,
            StateKey::Params,
            StateKey::Lease(id(2).node_id()),
            StateKey::Network,
            StateKey::Departed(id(3).node_id()),
            StateKey::Node(id(4).node_id()),
            StateKey::Validator(id(5).node_id()),
            StateKey::Bucket(Hash([6; 32])),
            StateKey::Object(Hash([7; 32])),
            StateKey::Stored(id(8).node_id()),
            StateKey::Reputation(id(9).node_id()),
            StateKey::Revocations(id(9).node_id()),
            StateKey::Job(Hash([10; 32])),
            StateKey::Record(id(11).node_id()),
        ] {
            assert_eq!(k.to_string().parse::<StateKey>().unwrap(), k);
            assert_eq!(k.to_bytes(), k.to_string().into_bytes(), "the store's bytes are the text form");
        }
        assert!("bucket/x".parse::<StateKey>().unwrap_err().contains("not a hash"));
        assert!("job/x".parse::<StateKey>().unwrap_err().contains("not a hash"));
        assert!("jobs/x".parse::<StateKey>().unwrap_err().contains("unknown state key"));
        assert!("account/zz".parse::<StateKey>().is_err());
    }

    #[test]
    fn refused_transactions_change_nothing() {
        let mut s = genesis();
        let root = s.state_root();
        assert!(matches!(s.apply(&transfer(0, 1, 1, 1)), Err(TxError::BadNonce { expected: 0, got: 1 })));
        assert!(matches!(s.apply(&transfer(0, 0, 1, 5_000)), Err(TxError::InsufficientFunds { .. })));
        let mut forged = transfer(0, 0, 1, 10);
        forged.tx.payload = Payload::Transfer { to: id(2).node_id(), amount_micro: 10 };
        assert!(matches!(s.apply(&forged), Err(TxError::BadSignature(_))));
        // No money: not even the fee.
        assert!(matches!(s.apply(&transfer(5, 0, 1, 0)), Err(TxError::InsufficientFunds { .. })));
        assert_eq!(s.state_root(), root);
        let t = transfer(0, 0, 1, 1);
        s.apply(&t).unwrap();
        assert!(matches!(s.apply(&t), Err(TxError::BadNonce { .. })));
    }

    #[test]
    fn admission_names_replays_windows_and_sizes() {
        let mut s = genesis();
        let t = transfer(0, 0, 1, 1);
        s.admit(&t, 100).unwrap();
        s.apply(&t).unwrap();
        assert!(matches!(s.admit(&t, 100), Err(TxError::Replay { got: 0, next: 1 })));
        assert!(matches!(s.admit(&transfer(0, 1, 1, 1), 100_000), Err(TxError::TooLarge { .. })));
        assert!(matches!(s.admit(&transfer(0, 5_000, 1, 1), 100), Err(TxError::NonceTooFarAhead { .. })));
        // A future nonce inside the window is admitted (its predecessors may be in flight).
        s.admit(&transfer(0, 3, 1, 1), 100).unwrap();
        assert!(matches!(s.admit(&transfer(0, 3, 1, 10_000), 100), Err(TxError::InsufficientFunds { .. })));
        let root = s.state_root();
        let _ = s.admit(&transfer(0, 1, 1, 1), 100);
        assert_eq!(s.state_root(), root, "admission changes nothing");
    }

    #[test]
    fn the_network_is_a_state_entry_of_its_own() {
        let zero = genesis();
        assert_eq!(zero.network(), Hash::ZERO, "unit tests run on the zero network");
        let net = Hash([9; 32]);
        let s = State::genesis(GenesisState { network: net, ..GenesisState::default() });
        assert_eq!(s.network(), net);
        let (value, _) = s.prove(&StateKey::Network).unwrap();
        assert_eq!(value, Some(net.0.to_vec()));
        let other = State::genesis(GenesisState { network: Hash([8; 32]), ..GenesisState::default() });
        assert_ne!(s.state_root(), other.state_root(), "two networks never share a state root");
    }

    #[test]
    fn proofs_verify_against_the_root_and_only_for_their_value() {
        let s = genesis();
        let root = s.state_root();
        let key = StateKey::Account(id(0).node_id());
        let (value, proof) = s.prove(&key).unwrap();
        let value = value.expect("a funded account");
        assert_eq!(proof.verify(&root, &state_key_hash(&key)), Ok(trie::Proven::Present(trie::value_hash(&value))));
        // Another key's path does not hold for this one.
        assert!(proof.verify(&root, &state_key_hash(&StateKey::Account(id(1).node_id()))).is_err());
        // An absent account has a value of none, and a proof of that.
        let absent = StateKey::Account(id(99).node_id());
        let (none, proof) = s.prove(&absent).unwrap();
        assert_eq!(none, None);
        assert_eq!(proof.verify(&root, &state_key_hash(&absent)), Ok(trie::Proven::Absent));
    }

    #[test]
    fn sealing_block_by_block_gives_the_root_rebuilt_from_every_entry() {
        let mut s = genesis();
        assert_eq!(s.seal().unwrap(), s.rebuilt_root());
        let fork = s.clone();
        s.begin_block(1, 10);
        s.apply(&transfer(0, 0, 7, 5)).unwrap();
        assert_ne!(s.state_root(), fork.state_root(), "unsealed changes are in the root");
        assert_eq!(s.state_root(), s.seal().unwrap());
        assert_eq!(s.seal().unwrap(), s.rebuilt_root());
        assert_eq!(fork.state_root(), fork.rebuilt_root(), "a fork keeps its own entries");
    }
}
