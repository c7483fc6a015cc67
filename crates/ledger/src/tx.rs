//! Transactions: who signs, which per-account nonce, what payload; signed under a namespace over
//! an explicit binary encoding (commonware-codec).
//!
//! Each payload kind has its own variant here and its own `apply` function in the module that
//! owns that part of the state (`accounts`, `registry`). Later issues (storage, market)
//! add kinds the same way; consensus only ever sees opaque, encoded transactions.

use crate::batch::PutBatch;
use crate::hash::{Hash, hex64};
use crate::storage::{
    MAX_BUCKET_NAME, MAX_OBJECT_KEY_BYTES, ObjectPut, ShardMove, read_moves, read_policy, read_str, str_size,
    write_moves, write_policy, write_str,
};
use archipel_crypto::{Identity, SignatureItem, SignedDescriptor, verify_signature_memo, verify_signatures_memo};
use archipel_types::NodeId;
use archipel_types::PlacementPolicy;
use bytes::{Buf as _, BufMut};
use commonware_codec::{Buf, Copying, EncodeSize, Error as CodecError, RangeCfg, Read, ReadExt, Write};
use serde::{Deserialize, Serialize};
use std::borrow::Borrow;

/// Signature namespace of ledger transactions.
pub const NAMESPACE: &[u8] = b"archipel/tx/v1";

/// Largest JSON descriptor carried by a registry transaction.
pub const MAX_DESCRIPTOR_BYTES: usize = 4 * 1024;

/// Signature namespace of a node's consent to be registered by one sponsor.
pub const CONSENT_NAMESPACE: &[u8] = b"archipel/node-consent/v1";

/// What a node signs (under [`CONSENT_NAMESPACE`]) to consent to its registration: the network
/// (genesis hash), the sponsoring account that will own it, and the hash of the exact descriptor
/// registered. Nobody else can register the node with this consent, on this network or another,
/// nor with another descriptor.
pub fn consent_bytes(network: &Hash, owner: &NodeId, descriptor: &SignedDescriptor) -> Vec<u8> {
    let descriptor_hash = Hash::of(&[&descriptor.descriptor.signing_bytes()]);
    [&network.0[..], owner.as_bytes(), &descriptor_hash.0].concat()
}

/// Most credits one [`Payload::TransferMany`] carries.
pub const MAX_CREDITS: usize = 200;

/// One recipient of a [`Payload::TransferMany`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// Recipient.
    pub to: NodeId,
    /// Amount in micro-units.
    pub amount_micro: u64,
}

/// What a transaction does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Payload {
    /// Move `amount_micro` from the signer to `to`.
    Transfer {
        /// Recipient.
        to: NodeId,
        /// Amount in micro-units.
        amount_micro: u64,
    },
    /// Several transfers from the signer under one signature and one nonce (a payroll, paying a
    /// job's providers): all of them or none. Each credit pays the transfer fee.
    TransferMany {
        /// 1 to [`MAX_CREDITS`] recipients and amounts (a recipient may appear more than once).
        credits: Vec<Credit>,
    },
    /// Register a new node; the signer sponsors it (pays the fee and locks the deposit) and
    /// becomes its owner, with the node's consent. Build it with [`Payload::register_node`].
    RegisterNode {
        /// The node's descriptor, signed by the node's own key.
        descriptor: SignedDescriptor,
        /// The node's signature over [`consent_bytes`] for this network, this signer and this
        /// descriptor (hex in JSON).
        #[serde(with = "hex64")]
        consent: [u8; 64],
    },
    /// Replace a registered node's descriptor (signed by the node or its owner).
    UpdateNode {
        /// The new descriptor, signed by the node's own key.
        descriptor: SignedDescriptor,
    },
    /// Remove a node from the registry (signed by the node or its owner).
    LeaveNode {
        /// The node that leaves.
        node: NodeId,
    },
    /// Create a bucket owned by the signer, refused when the live network cannot place it.
    CreateBucket {
        /// Its name (S3 rules).
        name: String,
        /// Its placement policy.
        policy: PlacementPolicy,
    },
    /// Delete an empty bucket (its owner).
    DeleteBucket {
        /// Its name.
        name: String,
    },
    /// Store an object version whose shards every holder has acknowledged (the bucket's owner).
    PutObject {
        /// The object, its manifest root, holders and their receipts.
        put: ObjectPut,
    },
    /// Store many new object versions in one bucket at once, each holder with one receipt for
    /// all it holds of them ([`crate::batch`]; the bucket's owner): all of them or none.
    PutObjects {
        /// The objects, their holders and the holders' receipts.
        batch: PutBatch,
    },
    /// Delete an object (the bucket's owner).
    DeleteObject {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
    },
    /// Report that the holder challenged by this object's audit in `epoch` failed it (signed by
    /// that epoch's auditor): its shard is repaired and its reputation lowered.
    AuditFailed {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// The object version audited.
        version: Hash,
        /// The audit epoch.
        epoch: u64,
    },
    /// Move shards of unhealthy holders to new ones (a repair; anyone may submit it).
    MoveShards {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// The object version repaired.
        version: Hash,
        /// The moves, each with the new holder's receipt.
        moves: Vec<ShardMove>,
    },
    /// Revoke access tokens the signer issued: 1 to [`crate::tokens::MAX_REVOKE_PER_TX`] token
    /// ids, added to the signer's list (at most [`crate::tokens::MAX_REVOCATIONS`]).
    RevokeTokens {
        /// The ids.
        ids: Vec<Hash>,
    },
    /// Schedule the next protocol version at a height ([`crate::upgrade`]), approved by a quorum
    /// of the validators; anyone may submit it.
    ScheduleUpgrade {
        /// The version and its activation height.
        upgrade: crate::upgrade::Upgrade,
        /// The validators' approvals (at most one per validator).
        approvals: Vec<crate::upgrade::Approval>,
    },
    /// Cancel the scheduled upgrade before its height, approved by a quorum of the validators
    /// (signatures under [`crate::upgrade::CANCEL_NAMESPACE`]); anyone may submit it.
    CancelUpgrade {
        /// The upgrade scheduled.
        upgrade: crate::upgrade::Upgrade,
        /// The validators' approvals of its cancellation.
        approvals: Vec<crate::upgrade::Approval>,
    },
    /// Post a compute job ([`crate::jobs`]): locks `max_price × redundancy` of the signer's
    /// balance as its escrow and opens its first auction. Its id is [`crate::jobs::job_id`] of
    /// the signer and this transaction's nonce.
    PostJob {
        /// What to run, on what, under which limits, price and geofence.
        spec: archipel_market::JobSpec,
    },
    /// A provider's sealed bid ([`archipel_market::rule::commitment`]), locking the job's bond.
    BidCommit {
        /// The job.
        job: Hash,
        /// The commitment.
        digest: Hash,
        /// The bond it locks: the job's ([`archipel_market::Job::bond`]), stated so that the
        /// mempool can count it against the balance.
        bond_micro: u64,
    },
    /// Opens a sealed bid once sealed bids have closed.
    BidReveal {
        /// The job.
        job: Hash,
        /// The price for one run.
        price_micro: u64,
        /// The salt of the commitment.
        salt: Hash,
    },
    /// A provider's heartbeat on the leases it holds: 1 to [`crate::jobs::MAX_HEARTBEAT_JOBS`]
    /// jobs.
    JobHeartbeat {
        /// The jobs.
        jobs: Vec<Hash>,
    },
    /// A leaseholder's sealed result ([`archipel_market::rule::result_commitment`]): its run ended.
    ResultCommit {
        /// The job.
        job: Hash,
        /// The commitment.
        digest: Hash,
    },
    /// Opens a sealed result once every run of the round has sealed.
    ResultReveal {
        /// The job.
        job: Hash,
        /// The output's hash, or how the run failed.
        outcome: archipel_market::RunOutcome,
        /// The salt of the commitment.
        salt: Hash,
    },
    /// The tenant cancels a job no provider has been awarded yet: the escrow comes back.
    CancelJob {
        /// The job.
        job: Hash,
    },
}

impl Payload {
    /// A `RegisterNode` of `node`'s descriptor on `network`, sponsored and owned by `owner`, with
    /// the consent signed by the node's key.
    pub fn register_node(node: &Identity, network: &Hash, owner: &NodeId, descriptor: SignedDescriptor) -> Payload {
        let consent = node.sign(CONSENT_NAMESPACE, &consent_bytes(network, owner, &descriptor));
        Payload::RegisterNode { descriptor, consent }
    }

    /// A short name of the kind, for tables and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Payload::Transfer { .. } => "transfer",
            Payload::TransferMany { .. } => "transfer_many",
            Payload::RegisterNode { .. } => "register_node",
            Payload::UpdateNode { .. } => "update_node",
            Payload::LeaveNode { .. } => "leave_node",
            Payload::CreateBucket { .. } => "create_bucket",
            Payload::DeleteBucket { .. } => "delete_bucket",
            Payload::PutObject { .. } => "put_object",
            Payload::PutObjects { .. } => "put_objects",
            Payload::DeleteObject { .. } => "delete_object",
            Payload::MoveShards { .. } => "move_shards",
            Payload::AuditFailed { .. } => "audit_failed",
            Payload::RevokeTokens { .. } => "revoke_tokens",
            Payload::ScheduleUpgrade { .. } => "schedule_upgrade",
            Payload::CancelUpgrade { .. } => "cancel_upgrade",
            Payload::PostJob { .. } => "post_job",
            Payload::BidCommit { .. } => "bid_commit",
            Payload::BidReveal { .. } => "bid_reveal",
            Payload::JobHeartbeat { .. } => "job_heartbeat",
            Payload::ResultCommit { .. } => "result_commit",
            Payload::ResultReveal { .. } => "result_reveal",
            Payload::CancelJob { .. } => "cancel_job",
        }
    }

    /// The fee this payload pays when the per-transaction fee is `tx_fee_micro`: once per
    /// transfer of a [`Payload::TransferMany`] and per object of a [`Payload::PutObjects`], once
    /// for any other kind.
    pub fn fee_micro(&self, tx_fee_micro: u64) -> u64 {
        match self {
            Payload::TransferMany { credits } => tx_fee_micro.saturating_mul(credits.len() as u64),
            Payload::PutObjects { batch } => tx_fee_micro.saturating_mul(batch.puts.len() as u64),
            _ => tx_fee_micro,
        }
    }
}

/// An unsigned transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// The signing account.
    pub signer: NodeId,
    /// The signer's next nonce (starts at 0, +1 per applied transaction).
    pub nonce: u64,
    /// What to do.
    pub payload: Payload,
}

/// Why a transaction was refused. Nothing of a refused transaction is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The bytes are not a transaction.
    #[error("malformed transaction: {0}")]
    Malformed(String),
    /// Too big.
    #[error("transaction is {bytes} bytes, the limit is {max}")]
    TooLarge {
        /// Encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The signature does not verify.
    #[error("signature by {0} does not verify: sign the transaction with that account's key")]
    BadSignature(String),
    /// Wrong nonce (a replay or a gap).
    #[error("nonce {got} is not the account's next nonce {expected}")]
    BadNonce {
        /// Expected nonce.
        expected: u64,
        /// Given nonce.
        got: u64,
    },
    /// The nonce was already used: a replay.
    #[error("nonce {got} was already used (the account's next nonce is {next}): a replay")]
    Replay {
        /// Given nonce.
        got: u64,
        /// The account's next nonce.
        next: u64,
    },
    /// The nonce is too far ahead of the account's next nonce.
    #[error("nonce {got} is more than {window} ahead of the account's next nonce {next}")]
    NonceTooFarAhead {
        /// Given nonce.
        got: u64,
        /// The account's next nonce.
        next: u64,
        /// The allowed window.
        window: u64,
    },
    /// Not enough balance.
    #[error("balance {balance_micro} is less than the {needed_micro} needed (amount + fee)")]
    InsufficientFunds {
        /// Available.
        balance_micro: u64,
        /// Needed.
        needed_micro: u64,
    },
    /// The sponsor cannot lock a node registration's deposit and pay the fee.
    #[error(
        "balance {balance_micro} is less than the {deposit_micro} deposit a node registration locks plus the {fee_micro} fee: fund the sponsoring account (the deposit comes back when the node leaves)"
    )]
    InsufficientDeposit {
        /// Available.
        balance_micro: u64,
        /// The deposit (genesis parameter `node_deposit_micro`).
        deposit_micro: u64,
        /// The fee.
        fee_micro: u64,
    },
    /// The signer cannot lock the deposit of a new state entry (a bucket, an object key) and
    /// pay the fee.
    #[error(
        "balance {balance_micro} is less than the {deposit_micro} deposit {what} locks plus the {fee_micro} fee: fund the account (the deposit comes back when the {what_short} is deleted)"
    )]
    InsufficientEntryDeposit {
        /// Available.
        balance_micro: u64,
        /// The deposit (genesis parameter `entry_deposit_micro`).
        deposit_micro: u64,
        /// The fee.
        fee_micro: u64,
        /// What the entry is, e.g. "a new bucket".
        what: &'static str,
        /// The same, in one word.
        what_short: &'static str,
    },
    /// The node registry holds `max_registered_nodes` nodes already.
    #[error(
        "the node registry is full ({registered} of {max} nodes, genesis parameter max_registered_nodes): a node must leave before another can register"
    )]
    RegistryFull {
        /// Nodes registered now.
        registered: usize,
        /// The limit.
        max: u32,
    },
    /// A descriptor not newer than the node's registered one (or than the one it left with).
    #[error(
        "descriptor version {got} of node {node} is not above version {current}, {context}: sign a newer descriptor (`archipel node update` / `node register` do)"
    )]
    StaleDescriptor {
        /// The node (short id).
        node: String,
        /// The version it has, or left with.
        current: u64,
        /// The version offered.
        got: u64,
        /// Which version `current` is.
        context: &'static str,
    },
    /// The node's key did not consent to this registration.
    #[error(
        "node {node} did not consent to being registered by {owner} on this network: its consent must be signed by the node's key for this sponsor, network and descriptor (`archipel node register --config <the node's node.toml> --key <sponsor key>` signs it)"
    )]
    NoConsent {
        /// The node (short id).
        node: String,
        /// The sponsor that tried (short id).
        owner: String,
    },
    /// The signer may not do this.
    #[error("{0}")]
    NotAllowed(String),
    /// The amount would overflow.
    #[error("amount overflows")]
    Overflow,
}

impl TxError {
    /// A stable, machine-readable code for HTTP errors and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            TxError::Malformed(_) => "malformed",
            TxError::TooLarge { .. } => "too_large",
            TxError::BadSignature(_) => "bad_signature",
            TxError::BadNonce { .. } => "bad_nonce",
            TxError::Replay { .. } => "replayed_nonce",
            TxError::NonceTooFarAhead { .. } => "nonce_too_far_ahead",
            TxError::InsufficientFunds { .. } => "insufficient_funds",
            TxError::InsufficientDeposit { .. } | TxError::InsufficientEntryDeposit { .. } => "insufficient_funds",
            TxError::RegistryFull { .. } => "registry_full",
            TxError::StaleDescriptor { .. } => "stale_descriptor",
            TxError::NoConsent { .. } => "no_consent",
            TxError::NotAllowed(_) => "not_allowed",
            TxError::Overflow => "overflow",
        }
    }
}

fn write_descriptor(d: &SignedDescriptor, buf: &mut impl BufMut) {
    // JSON of a descriptor is deterministic (fixed field order, sorted role set).
    let json = serde_json::to_vec(d).expect("descriptors serialize");
    json.write(buf);
}

fn descriptor_size(d: &SignedDescriptor) -> usize {
    serde_json::to_vec(d).expect("descriptors serialize").encode_size()
}

fn read_descriptor(buf: &mut impl Buf) -> Result<SignedDescriptor, CodecError> {
    let json = Vec::<u8>::read_cfg(buf, &(RangeCfg::new(0..=MAX_DESCRIPTOR_BYTES), ()))?;
    let d: SignedDescriptor = serde_json::from_slice(&json)
        .map_err(|_| CodecError::Invalid("RegisterNode", "descriptor is not valid JSON"))?;
    // Only the canonical form is accepted, so an encoding decodes and re-encodes to itself.
    if serde_json::to_vec(&d).ok().as_deref() != Some(json.as_slice()) {
        return Err(CodecError::Invalid("RegisterNode", "descriptor JSON is not in canonical form"));
    }
    Ok(d)
}

impl Write for Payload {
    fn write(&self, buf: &mut impl BufMut) {
        match self {
            Payload::Transfer { to, amount_micro } => {
                1u8.write(buf);
                to.0.write(buf);
                amount_micro.write(buf);
            }
            Payload::TransferMany { credits } => {
                2u8.write(buf);
                // Count first (a u8 suffices: at most MAX_CREDITS), then each credit. A list too
                // long for the byte is written with count 0, which never decodes.
                u8::try_from(credits.len()).unwrap_or(0).write(buf);
                for c in credits {
                    c.to.0.write(buf);
                    c.amount_micro.write(buf);
                }
            }
            Payload::RegisterNode { descriptor, consent } => {
                3u8.write(buf);
                write_descriptor(descriptor, buf);
                consent.write(buf);
            }
            Payload::UpdateNode { descriptor } => {
                4u8.write(buf);
                write_descriptor(descriptor, buf);
            }
            Payload::LeaveNode { node } => {
                5u8.write(buf);
                node.0.write(buf);
            }
            Payload::CreateBucket { name, policy } => {
                6u8.write(buf);
                write_str(name, buf);
                write_policy(policy, buf);
            }
            Payload::DeleteBucket { name } => {
                7u8.write(buf);
                write_str(name, buf);
            }
            Payload::PutObject { put } => {
                8u8.write(buf);
                put.write(buf);
            }
            Payload::DeleteObject { bucket, key } => {
                9u8.write(buf);
                write_str(bucket, buf);
                write_str(key, buf);
            }
            Payload::MoveShards { bucket, key, version, moves } => {
                10u8.write(buf);
                write_str(bucket, buf);
                write_str(key, buf);
                version.0.write(buf);
                write_moves(moves, buf);
            }
            Payload::AuditFailed { bucket, key, version, epoch } => {
                11u8.write(buf);
                write_str(bucket, buf);
                write_str(key, buf);
                version.0.write(buf);
                epoch.write(buf);
            }
            Payload::RevokeTokens { ids } => {
                12u8.write(buf);
                // A list too long for the byte is written with count 0, which never decodes.
                u8::try_from(ids.len()).unwrap_or(0).write(buf);
                for id in ids {
                    id.0.write(buf);
                }
            }
            Payload::PostJob { spec } => {
                13u8.write(buf);
                spec_json(spec).write(buf);
            }
            Payload::BidCommit { job, digest, bond_micro } => {
                14u8.write(buf);
                job.0.write(buf);
                digest.0.write(buf);
                bond_micro.write(buf);
            }
            Payload::BidReveal { job, price_micro, salt } => {
                15u8.write(buf);
                job.0.write(buf);
                price_micro.write(buf);
                salt.0.write(buf);
            }
            Payload::JobHeartbeat { jobs } => {
                16u8.write(buf);
                // A list too long for the byte is written with count 0, which never decodes.
                u8::try_from(jobs.len()).unwrap_or(0).write(buf);
                for j in jobs {
                    j.0.write(buf);
                }
            }
            Payload::ResultCommit { job, digest } => {
                17u8.write(buf);
                job.0.write(buf);
                digest.0.write(buf);
            }
            Payload::ResultReveal { job, outcome, salt } => {
                18u8.write(buf);
                job.0.write(buf);
                write_outcome(outcome, buf);
                salt.0.write(buf);
            }
            Payload::CancelJob { job } => {
                19u8.write(buf);
                job.0.write(buf);
            }
            Payload::PutObjects { batch } => {
                20u8.write(buf);
                batch.write(buf);
            }
            Payload::ScheduleUpgrade { upgrade, approvals } => {
                21u8.write(buf);
                write_upgrade(upgrade, approvals, buf);
            }
            Payload::CancelUpgrade { upgrade, approvals } => {
                22u8.write(buf);
                write_upgrade(upgrade, approvals, buf);
            }
        }
    }
}

/// Most bytes of a job spec's JSON in a `PostJob`.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;

/// A job spec's canonical JSON (serde's, fields in declaration order).
fn spec_json(spec: &archipel_market::JobSpec) -> Vec<u8> {
    serde_json::to_vec(spec).expect("job specs serialize")
}

fn read_spec(buf: &mut impl Buf) -> Result<archipel_market::JobSpec, CodecError> {
    let json = Vec::<u8>::read_cfg(buf, &(RangeCfg::new(0..=MAX_SPEC_BYTES), ()))?;
    let spec: archipel_market::JobSpec =
        serde_json::from_slice(&json).map_err(|_| CodecError::Invalid("PostJob", "spec is not valid JSON"))?;
    // Only the canonical form is accepted, so an encoding decodes and re-encodes to itself.
    if spec_json(&spec) != json {
        return Err(CodecError::Invalid("PostJob", "spec JSON is not in canonical form"));
    }
    Ok(spec)
}

fn write_outcome(outcome: &archipel_market::RunOutcome, buf: &mut impl BufMut) {
    match outcome {
        archipel_market::RunOutcome::Success { output } => {
            0u8.write(buf);
            output.write(buf);
        }
        archipel_market::RunOutcome::Failed { end } => {
            1u8.write(buf);
            write_str(end, buf);
        }
    }
}

fn outcome_size(outcome: &archipel_market::RunOutcome) -> usize {
    1 + match outcome {
        archipel_market::RunOutcome::Success { .. } => 32,
        archipel_market::RunOutcome::Failed { end } => str_size(end),
    }
}

fn read_outcome(buf: &mut impl Buf) -> Result<archipel_market::RunOutcome, CodecError> {
    Ok(match u8::read(buf)? {
        0 => archipel_market::RunOutcome::Success { output: <[u8; 32]>::read(buf)? },
        1 => archipel_market::RunOutcome::Failed { end: read_str(buf, archipel_market::job::MAX_END_BYTES, "end")? },
        tag => return Err(CodecError::InvalidEnum(tag)),
    })
}

impl EncodeSize for Payload {
    fn encode_size(&self) -> usize {
        1 + match self {
            Payload::Transfer { .. } => 32 + 8,
            Payload::TransferMany { credits } => 1 + credits.len() * (32 + 8),
            Payload::RegisterNode { descriptor, .. } => descriptor_size(descriptor) + 64,
            Payload::UpdateNode { descriptor } => descriptor_size(descriptor),
            Payload::LeaveNode { .. } => 32,
            Payload::CreateBucket { name, policy } => str_size(name) + crate::storage::policy_size(policy),
            Payload::DeleteBucket { name } => str_size(name),
            Payload::PutObject { put } => put.encode_size(),
            Payload::PutObjects { batch } => batch.encode_size(),
            Payload::DeleteObject { bucket, key } => str_size(bucket) + str_size(key),
            Payload::MoveShards { bucket, key, moves, .. } => {
                str_size(bucket) + str_size(key) + 32 + 1 + moves.len() * 105
            }
            Payload::AuditFailed { bucket, key, .. } => str_size(bucket) + str_size(key) + 32 + 8,
            Payload::RevokeTokens { ids } => 1 + ids.len() * 32,
            Payload::PostJob { spec } => spec_json(spec).encode_size(),
            Payload::BidCommit { .. } => 32 + 32 + 8,
            Payload::BidReveal { .. } => 32 + 8 + 32,
            Payload::JobHeartbeat { jobs } => 1 + jobs.len() * 32,
            Payload::ResultCommit { .. } => 32 + 32,
            Payload::ResultReveal { outcome, .. } => 32 + outcome_size(outcome) + 32,
            Payload::CancelJob { .. } => 32,
            Payload::ScheduleUpgrade { approvals, .. } | Payload::CancelUpgrade { approvals, .. } => {
                4 + 8 + 1 + approvals.len() * (32 + 64)
            }
        }
    }
}

impl Read for Payload {
    type Cfg = ();
    fn read_cfg(buf: &mut impl Buf, _: &()) -> Result<Self, CodecError> {
        Ok(match u8::read(buf)? {
            1 => Payload::Transfer { to: NodeId(<[u8; 32]>::read(buf)?), amount_micro: u64::read(buf)? },
            2 => {
                let n = u8::read(buf)? as usize;
                if n == 0 || n > MAX_CREDITS {
                    return Err(CodecError::Invalid("TransferMany", "between 1 and 200 credits"));
                }
                let mut credits = Vec::with_capacity(n);
                for _ in 0..n {
                    credits.push(Credit { to: NodeId(<[u8; 32]>::read(buf)?), amount_micro: u64::read(buf)? });
                }
                Payload::TransferMany { credits }
            }
            3 => Payload::RegisterNode { descriptor: read_descriptor(buf)?, consent: <[u8; 64]>::read(buf)? },
            4 => Payload::UpdateNode { descriptor: read_descriptor(buf)? },
            5 => Payload::LeaveNode { node: NodeId(<[u8; 32]>::read(buf)?) },
            6 => Payload::CreateBucket { name: read_str(buf, MAX_BUCKET_NAME, "bucket")?, policy: read_policy(buf)? },
            7 => Payload::DeleteBucket { name: read_str(buf, MAX_BUCKET_NAME, "bucket")? },
            8 => Payload::PutObject { put: ObjectPut::read(buf)? },
            9 => Payload::DeleteObject {
                bucket: read_str(buf, MAX_BUCKET_NAME, "bucket")?,
                key: read_str(buf, MAX_OBJECT_KEY_BYTES, "key")?,
            },
            10 => Payload::MoveShards {
                bucket: read_str(buf, MAX_BUCKET_NAME, "bucket")?,
                key: read_str(buf, MAX_OBJECT_KEY_BYTES, "key")?,
                version: Hash(<[u8; 32]>::read(buf)?),
                moves: read_moves(buf)?,
            },
            11 => Payload::AuditFailed {
                bucket: read_str(buf, MAX_BUCKET_NAME, "bucket")?,
                key: read_str(buf, MAX_OBJECT_KEY_BYTES, "key")?,
                version: Hash(<[u8; 32]>::read(buf)?),
                epoch: u64::read(buf)?,
            },
            12 => {
                let n = u8::read(buf)? as usize;
                if n == 0 || n > crate::tokens::MAX_REVOKE_PER_TX {
                    return Err(CodecError::Invalid("RevokeTokens", "between 1 and 64 ids"));
                }
                let mut ids = Vec::with_capacity(n);
                for _ in 0..n {
                    ids.push(Hash(<[u8; 32]>::read(buf)?));
                }
                Payload::RevokeTokens { ids }
            }
            13 => Payload::PostJob { spec: read_spec(buf)? },
            14 => Payload::BidCommit {
                job: Hash(<[u8; 32]>::read(buf)?),
                digest: Hash(<[u8; 32]>::read(buf)?),
                bond_micro: u64::read(buf)?,
            },
            15 => Payload::BidReveal {
                job: Hash(<[u8; 32]>::read(buf)?),
                price_micro: u64::read(buf)?,
                salt: Hash(<[u8; 32]>::read(buf)?),
            },
            16 => {
                let n = u8::read(buf)? as usize;
                if n == 0 || n > crate::jobs::MAX_HEARTBEAT_JOBS {
                    return Err(CodecError::Invalid("JobHeartbeat", "between 1 and 64 jobs"));
                }
                let mut jobs = Vec::with_capacity(n);
                for _ in 0..n {
                    jobs.push(Hash(<[u8; 32]>::read(buf)?));
                }
                Payload::JobHeartbeat { jobs }
            }
            17 => Payload::ResultCommit { job: Hash(<[u8; 32]>::read(buf)?), digest: Hash(<[u8; 32]>::read(buf)?) },
            18 => Payload::ResultReveal {
                job: Hash(<[u8; 32]>::read(buf)?),
                outcome: read_outcome(buf)?,
                salt: Hash(<[u8; 32]>::read(buf)?),
            },
            19 => Payload::CancelJob { job: Hash(<[u8; 32]>::read(buf)?) },
            20 => Payload::PutObjects { batch: PutBatch::read(buf)? },
            21 => {
                let (upgrade, approvals) = read_upgrade(buf, "ScheduleUpgrade")?;
                Payload::ScheduleUpgrade { upgrade, approvals }
            }
            22 => {
                let (upgrade, approvals) = read_upgrade(buf, "CancelUpgrade")?;
                Payload::CancelUpgrade { upgrade, approvals }
            }
            tag => return Err(CodecError::InvalidEnum(tag)),
        })
    }
}

/// An upgrade and its approvals: version, height, a count byte, then each validator and signature.
fn write_upgrade(upgrade: &crate::upgrade::Upgrade, approvals: &[crate::upgrade::Approval], buf: &mut impl BufMut) {
    upgrade.protocol.write(buf);
    upgrade.height.write(buf);
    // A list too long for the byte is written with count 0, which never decodes.
    u8::try_from(approvals.len()).unwrap_or(0).write(buf);
    for a in approvals {
        a.validator.0.write(buf);
        a.signature.write(buf);
    }
}

fn read_upgrade(
    buf: &mut impl Buf,
    kind: &'static str,
) -> Result<(crate::upgrade::Upgrade, Vec<crate::upgrade::Approval>), CodecError> {
    let upgrade = crate::upgrade::Upgrade { protocol: u32::read(buf)?, height: u64::read(buf)? };
    let n = u8::read(buf)? as usize;
    if n == 0 {
        return Err(CodecError::Invalid(kind, "between 1 and 255 approvals"));
    }
    let mut approvals = Vec::with_capacity(n);
    for _ in 0..n {
        approvals.push(crate::upgrade::Approval {
            validator: NodeId(<[u8; 32]>::read(buf)?),
            signature: <[u8; 64]>::read(buf)?,
        });
    }
    Ok((upgrade, approvals))
}

impl Write for Transaction {
    fn write(&self, buf: &mut impl BufMut) {
        self.signer.0.write(buf);
        self.nonce.write(buf);
        self.payload.write(buf);
    }
}

impl EncodeSize for Transaction {
    fn encode_size(&self) -> usize {
        32 + 8 + self.payload.encode_size()
    }
}

impl Read for Transaction {
    type Cfg = ();
    fn read_cfg(buf: &mut impl Buf, _: &()) -> Result<Self, CodecError> {
        Ok(Transaction { signer: NodeId(<[u8; 32]>::read(buf)?), nonce: u64::read(buf)?, payload: Payload::read(buf)? })
    }
}

impl Transaction {
    /// The bytes that are signed: the encoded transaction.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encode_size());
        self.write(&mut out);
        out
    }

    /// What the signature covers: the network (genesis hash) and the encoded transaction, so a
    /// transaction signed for one network never verifies on another where the same key exists.
    pub fn signed_message(&self, network: &Hash) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.encode_size());
        out.extend_from_slice(&network.0);
        self.write(&mut out);
        out
    }

    /// Signs with `identity`, which must be the signer, for `network`.
    pub fn sign(self, identity: &Identity, network: &Hash) -> SignedTransaction {
        let signature = identity.sign(NAMESPACE, &self.signed_message(network));
        SignedTransaction { tx: self, signature }
    }
}

/// A transaction with its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTransaction {
    /// The transaction.
    pub tx: Transaction,
    /// Ed25519 signature by `tx.signer` (hex in JSON).
    #[serde(with = "hex64")]
    pub signature: [u8; 64],
}

impl Write for SignedTransaction {
    fn write(&self, buf: &mut impl BufMut) {
        self.tx.write(buf);
        self.signature.write(buf);
    }
}

impl EncodeSize for SignedTransaction {
    fn encode_size(&self) -> usize {
        self.tx.encode_size() + 64
    }
}

impl Read for SignedTransaction {
    type Cfg = ();
    fn read_cfg(buf: &mut impl Buf, _: &()) -> Result<Self, CodecError> {
        Ok(SignedTransaction { tx: Transaction::read(buf)?, signature: <[u8; 64]>::read(buf)? })
    }
}

impl SignedTransaction {
    /// Checks the signature (made for `network`).
    pub fn verify(&self, network: &Hash) -> Result<(), TxError> {
        verify_signature_memo(&self.tx.signer, NAMESPACE, &self.tx.signed_message(network), &self.signature)
            .map_err(|_| TxError::BadSignature(self.tx.signer.short()))
    }

    /// The transaction hash: BLAKE3 of the encoded transaction and its signature.
    pub fn hash(&self) -> Hash {
        Hash::of(&[&self.tx.signing_bytes(), &self.signature])
    }

    /// The binary encoding (what blocks and `POST /v1/tx` carry).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encode_size());
        self.write(&mut out);
        out
    }

    /// Decodes one transaction from exactly `bytes`, refusing more than `max_bytes`.
    pub fn from_bytes(bytes: &[u8], max_bytes: usize) -> Result<Self, TxError> {
        if bytes.len() > max_bytes {
            return Err(TxError::TooLarge { bytes: bytes.len(), max: max_bytes });
        }
        let mut buf = Copying(bytes);
        let stx = SignedTransaction::read(&mut buf).map_err(|e| TxError::Malformed(e.to_string()))?;
        if buf.has_remaining() {
            return Err(TxError::Malformed(format!("{} bytes after the transaction", buf.remaining())));
        }
        Ok(stx)
    }
}

/// Checks the signatures of all `txs`, as one batch when there are several (about twice as fast
/// per signature). On failure returns the index of the first bad one and why.
pub fn verify_all<T: Borrow<SignedTransaction>>(txs: &[T], network: &Hash) -> Result<(), (usize, TxError)> {
    if batch_passes(txs, network) {
        return Ok(());
    }
    // One of them is bad (or there is just one): find which.
    txs.iter().enumerate().try_for_each(|(i, t)| t.borrow().verify(network).map_err(|e| (i, e)))
}

/// Checks the signature of each of `txs` (as one batch first, one by one only if that fails);
/// one result per transaction.
pub fn verify_each<T: Borrow<SignedTransaction>>(txs: &[T], network: &Hash) -> Vec<Result<(), TxError>> {
    if batch_passes(txs, network) {
        return vec![Ok(()); txs.len()];
    }
    txs.iter().map(|t| t.borrow().verify(network)).collect()
}

/// True when `txs` has several transactions and all their signatures pass as one batch.
fn batch_passes<T: Borrow<SignedTransaction>>(txs: &[T], network: &Hash) -> bool {
    if txs.len() < 2 {
        return false;
    }
    let bytes: Vec<Vec<u8>> = txs.iter().map(|t| t.borrow().tx.signed_message(network)).collect();
    let items: Vec<SignatureItem<'_>> = txs
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            let t = t.borrow();
            (&t.tx.signer, b.as_slice(), &t.signature)
        })
        .collect();
    verify_signatures_memo(NAMESPACE, &items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify_all_z<T: Borrow<SignedTransaction>>(txs: &[T]) -> Result<(), (usize, TxError)> {
        verify_all(txs, &Hash::ZERO)
    }

    fn verify_each_z<T: Borrow<SignedTransaction>>(txs: &[T]) -> Vec<Result<(), TxError>> {
        verify_each(txs, &Hash::ZERO)
    }

    #[test]
    fn a_transaction_signed_for_one_network_does_not_verify_on_another() {
        let a = Identity::from_seed(1);
        let tx = Transaction {
            signer: a.node_id(),
            nonce: 0,
            payload: Payload::Transfer { to: Identity::from_seed(2).node_id(), amount_micro: 5 },
        };
        let (ours, theirs) = (Hash([1; 32]), Hash([2; 32]));
        let t = tx.sign(&a, &ours);
        t.verify(&ours).unwrap();
        assert!(matches!(t.verify(&theirs), Err(TxError::BadSignature(_))));
        assert!(verify_all(&[t.clone(), t.clone()], &theirs).is_err(), "nor in a batch");
    }

    #[test]
    fn batches_name_each_bad_signature() {
        let txs: Vec<SignedTransaction> = (0..6)
            .map(|i| {
                let a = Identity::from_seed(i);
                Transaction { signer: a.node_id(), nonce: i, payload: Payload::LeaveNode { node: a.node_id() } }
                    .sign(&a, &Hash::ZERO)
            })
            .collect();
        assert_eq!(verify_all_z(&txs), Ok(()));
        assert!(verify_each_z(&txs).iter().all(Result::is_ok));
        assert_eq!(verify_all::<SignedTransaction>(&[], &Hash::ZERO), Ok(()));
        let mut bad = txs.clone();
        bad[2].signature[0] ^= 1;
        bad[4].tx.nonce += 1;
        assert!(matches!(verify_all_z(&bad), Err((2, TxError::BadSignature(_)))));
        let each: Vec<bool> = verify_each_z(&bad).iter().map(Result::is_ok).collect();
        assert_eq!(each, [true, true, false, true, false, true]);
        let refs: Vec<&SignedTransaction> = bad[3..].iter().collect();
        assert!(matches!(verify_all_z(&refs), Err((1, _))), "works over references too");
        assert!(matches!(verify_all_z(&bad[2..3]), Err((0, _))), "a batch of one");
    }

    #[test]
    fn transfer_many_round_trips_and_refuses_no_or_too_many_credits() {
        let a = Identity::from_seed(1);
        let credit = Credit { to: Identity::from_seed(2).node_id(), amount_micro: 5 };
        let with = |n: usize| {
            Transaction { signer: a.node_id(), nonce: 3, payload: Payload::TransferMany { credits: vec![credit; n] } }
                .sign(&a, &Hash::ZERO)
        };
        for n in [1, 2, MAX_CREDITS] {
            let t = with(n);
            let bytes = t.to_bytes();
            assert_eq!(bytes.len(), t.encode_size());
            assert_eq!(SignedTransaction::from_bytes(&bytes, 16 * 1024).unwrap(), t);
            assert_eq!(t.tx.payload.fee_micro(3), 3 * n as u64);
        }
        // The largest fits the default transaction size limit.
        assert!(with(MAX_CREDITS).to_bytes().len() <= crate::LedgerParams::default().max_tx_bytes as usize);
        // Counts 0, 201 and more than a byte holds never decode.
        for n in [0, MAX_CREDITS + 1, 256, 300] {
            let e = SignedTransaction::from_bytes(&with(n).to_bytes(), 16 * 1024).unwrap_err();
            assert!(e.to_string().contains("between 1 and 200 credits"), "{e}");
        }
        // Truncated inside the credits.
        let bytes = with(3).to_bytes();
        assert!(matches!(SignedTransaction::from_bytes(&bytes[..60], 1024), Err(TxError::Malformed(_))));
    }

    #[test]
    fn encoding_round_trips_and_refuses_garbage() {
        let a = Identity::from_seed(1);
        let t = Transaction {
            signer: a.node_id(),
            nonce: 7,
            payload: Payload::Transfer { to: Identity::from_seed(2).node_id(), amount_micro: 5 },
        }
        .sign(&a, &Hash::ZERO);
        let bytes = t.to_bytes();
        let back = SignedTransaction::from_bytes(&bytes, 1024).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.hash(), t.hash());
        back.verify(&Hash::ZERO).unwrap();
        assert!(matches!(SignedTransaction::from_bytes(&bytes[..10], 1024), Err(TxError::Malformed(_))));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(SignedTransaction::from_bytes(&long, 1024), Err(TxError::Malformed(_))));
        assert!(matches!(SignedTransaction::from_bytes(&bytes, 10), Err(TxError::TooLarge { .. })));
        let mut bad = bytes.clone();
        bad[40] = 99; // payload tag
        assert!(matches!(SignedTransaction::from_bytes(&bad, 1024), Err(TxError::Malformed(_))));
        // Any flipped bit in the signed part breaks the signature.
        let mut flipped = bytes;
        flipped[45] ^= 1;
        let t2 = SignedTransaction::from_bytes(&flipped, 1024).unwrap();
        assert!(matches!(t2.verify(&Hash::ZERO), Err(TxError::BadSignature(_))));
    }
}
