//! Blocks: proposing, executing and verifying them offline.
//!
//! A header commits to its height, its parent's hash, the consensus timestamp, the Merkle root of
//! its transactions and the state root after applying them. The first block's parent is the
//! genesis header, whose state root commits to the whole genesis state. [`verify_chain`] replays
//! a chain and names the first block that is wrong and why — the core of `archipel ledger verify`.

use crate::hash::Hash;
use crate::lease::LivenessChange;
use crate::merkle;
use crate::state::{Receipt, State};
use crate::store::StoreError;
use crate::tx::{SignedTransaction, TxError, verify_all};
use archipel_types::NodeId;
use bytes::{Buf as _, BufMut};
use commonware_codec::{Buf, Copying, EncodeSize, Error as CodecError, FixedSize, RangeCfg, Read, ReadExt, Write};
use serde::{Deserialize, Serialize};

/// A block header: what consensus orders and what proofs are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHeader {
    /// Height (the genesis header is 0; the first block is 1).
    pub height: u64,
    /// Hash of the parent header.
    pub parent: Hash,
    /// Consensus timestamp, Unix ms; never decreases.
    pub timestamp_ms: u64,
    /// Merkle root of the transaction hashes.
    pub tx_root: Hash,
    /// Merkle root of the liveness changes' hashes.
    pub liveness_root: Hash,
    /// State root after applying the transactions.
    pub state_root: Hash,
}

impl Write for BlockHeader {
    fn write(&self, buf: &mut impl BufMut) {
        self.height.write(buf);
        self.parent.0.write(buf);
        self.timestamp_ms.write(buf);
        self.tx_root.0.write(buf);
        self.liveness_root.0.write(buf);
        self.state_root.0.write(buf);
    }
}

impl FixedSize for BlockHeader {
    const SIZE: usize = 8 + 32 + 8 + 32 + 32 + 32;
}

impl Read for BlockHeader {
    type Cfg = ();
    fn read_cfg(buf: &mut impl Buf, _: &()) -> Result<Self, CodecError> {
        Ok(BlockHeader {
            height: u64::read(buf)?,
            parent: Hash(<[u8; 32]>::read(buf)?),
            timestamp_ms: u64::read(buf)?,
            tx_root: Hash(<[u8; 32]>::read(buf)?),
            liveness_root: Hash(<[u8; 32]>::read(buf)?),
            state_root: Hash(<[u8; 32]>::read(buf)?),
        })
    }
}

impl BlockHeader {
    /// The header hash (the block's identity).
    pub fn hash(&self) -> Hash {
        let mut bytes = Vec::with_capacity(Self::SIZE);
        self.write(&mut bytes);
        Hash::of(&[b"archipel/block/v1", &bytes])
    }
}

/// A block: header, liveness changes and transactions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// The header.
    pub header: BlockHeader,
    /// Lease changes decided by the validators, applied before the transactions.
    #[serde(default)]
    pub liveness: Vec<LivenessChange>,
    /// The transactions, in order.
    pub txs: Vec<SignedTransaction>,
}

impl Write for Block {
    fn write(&self, buf: &mut impl BufMut) {
        self.header.write(buf);
        self.liveness.write(buf);
        self.txs.write(buf);
    }
}

impl EncodeSize for Block {
    fn encode_size(&self) -> usize {
        BlockHeader::SIZE + self.liveness.encode_size() + self.txs.encode_size()
    }
}

/// The smallest encoded transaction (a DeleteBucket with an empty name: signer, nonce, kind, a
/// one-byte length, signature): a block of `n` bytes holds at most `n / MIN_TX_BYTES`
/// transactions. Every kind's smallest encoding must be at least this (a test checks each), or a
/// block holding it would not decode and would stall the chain.
pub const MIN_TX_BYTES: usize = 32 + 8 + 1 + 1 + 64;

/// The smallest encoded liveness change (a Down: kind, node).
pub const MIN_LIVENESS_BYTES: usize = 1 + 32;

impl Read for Block {
    /// The most transactions (and the most liveness changes) a block may hold.
    type Cfg = usize;
    fn read_cfg(buf: &mut impl Buf, max_txs: &usize) -> Result<Self, CodecError> {
        let header = BlockHeader::read(buf)?;
        // A count the remaining bytes cannot hold is refused before room is reserved for it.
        let most = (*max_txs).min(buf.remaining() / MIN_LIVENESS_BYTES);
        let liveness = Vec::read_cfg(buf, &(RangeCfg::new(0..=most), ()))?;
        let most = (*max_txs).min(buf.remaining() / MIN_TX_BYTES);
        Ok(Block { header, liveness, txs: Vec::read_cfg(buf, &(RangeCfg::new(0..=most), ()))? })
    }
}

impl Block {
    /// The block's hash (its header's).
    pub fn hash(&self) -> Hash {
        self.header.hash()
    }

    /// The binary encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encode_size());
        self.write(&mut out);
        out
    }

    /// Decodes exactly `bytes` (at most `max_txs` transactions).
    pub fn from_bytes(bytes: &[u8], max_txs: usize) -> Result<Self, String> {
        let mut buf = Copying(bytes);
        let b = Block::read_cfg(&mut buf, &max_txs).map_err(|e| format!("not a block: {e}"))?;
        if buf.has_remaining() {
            return Err(format!("{} bytes after the block", buf.remaining()));
        }
        Ok(b)
    }
}

/// Merkle root of transactions (by transaction hash).
pub fn tx_root(txs: &[SignedTransaction]) -> Hash {
    merkle::root(&txs.iter().map(SignedTransaction::hash).collect::<Vec<_>>())
}

/// Merkle root of liveness changes (by their hashes).
pub fn liveness_root(changes: &[LivenessChange]) -> Hash {
    merkle::root(&changes.iter().map(LivenessChange::hash).collect::<Vec<_>>())
}

/// The header of the genesis state (height 0): the parent of block 1.
pub fn genesis_header(state: &State) -> BlockHeader {
    BlockHeader {
        height: 0,
        parent: Hash::ZERO,
        timestamp_ms: state.chain().timestamp_ms,
        tx_root: tx_root(&[]),
        liveness_root: liveness_root(&[]),
        state_root: state.state_root(),
    }
}

/// Whether transaction signatures still need checking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signatures {
    /// Check every signature.
    Verify,
    /// The caller already checked them (e.g. at admission or in a batch).
    AlreadyVerified,
}

/// What executing a block did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockOutcome {
    /// One receipt per transaction, in order.
    pub receipts: Vec<Receipt>,
    /// Nodes marked Down at this block.
    pub went_down: Vec<NodeId>,
    /// Nodes marked Up at this block.
    pub came_up: Vec<NodeId>,
}

impl BlockOutcome {
    fn record(&mut self, change: &LivenessChange) {
        match change {
            LivenessChange::Down { node } => self.went_down.push(*node),
            LivenessChange::Up { node, .. } => self.came_up.push(*node),
        }
    }
}

/// A proposed block, the state after it, and the candidates left out (with why).
#[derive(Debug)]
pub struct Proposal {
    /// The block.
    pub block: Block,
    /// The state after it.
    pub state: State,
    /// Its outcome.
    pub outcome: BlockOutcome,
    /// Candidates that did not apply, with the reason.
    pub dropped: Vec<(Hash, TxError)>,
}

/// Builds the block after `parent` on `state` (the state after `parent`): applies the liveness
/// changes that apply (up to `max_block_liveness`), then candidates in order, keeping those that
/// apply, up to the block size limit. Fails only if the state store fails.
pub fn propose(
    state: &State,
    parent: &BlockHeader,
    now_ms: u64,
    liveness: impl IntoIterator<Item = LivenessChange>,
    candidates: impl IntoIterator<Item = SignedTransaction>,
    signatures: Signatures,
) -> Result<Proposal, StoreError> {
    let mut state = state.clone();
    let timestamp_ms = now_ms.max(parent.timestamp_ms);
    let height = parent.height + 1;
    state.begin_block(height, timestamp_ms);
    let mut outcome = BlockOutcome::default();
    let mut changes = Vec::new();
    for change in liveness.into_iter().take(state.params().max_block_liveness as usize) {
        if state.apply_liveness(&change).is_ok() {
            outcome.record(&change);
            changes.push(change);
        }
    }
    let max = state.params().max_block_txs as usize;
    let max_bytes = state.params().max_block_bytes as usize;
    let mut bytes = BlockHeader::SIZE + 10 + changes.encode_size();
    let (mut txs, mut dropped) = (Vec::new(), Vec::new());
    for t in candidates {
        if txs.len() == max {
            break;
        }
        let size = t.encode_size();
        if bytes + size > max_bytes {
            break;
        }
        let result = match signatures {
            Signatures::Verify => state.apply(&t),
            Signatures::AlreadyVerified => state.apply_verified(&t),
        };
        match result {
            Ok(r) => {
                outcome.receipts.push(r);
                txs.push(t);
                bytes += size;
            }
            Err(e) => dropped.push((t.hash(), e)),
        }
    }
    let header = BlockHeader {
        height,
        parent: parent.hash(),
        timestamp_ms,
        tx_root: tx_root(&txs),
        liveness_root: liveness_root(&changes),
        state_root: state.seal()?,
    };
    Ok(Proposal { block: Block { header, liveness: changes, txs }, state, outcome, dropped })
}

/// The first problem found in a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block {height}: {what}")]
pub struct ChainError {
    /// Height of the first bad block.
    pub height: u64,
    /// What is wrong with it.
    pub what: String,
}

/// Executes `block` on `state` (the state after `parent`), checking its link, time, transaction
/// root, every transaction and the state root. On error `state` is unusable: callers execute on a
/// copy.
pub fn execute(
    state: &mut State,
    parent: &BlockHeader,
    block: &Block,
    signatures: Signatures,
) -> Result<BlockOutcome, ChainError> {
    let h = &block.header;
    let bad = |what: String| ChainError { height: h.height, what };
    if h.height != parent.height + 1 {
        return Err(bad(format!("height {} does not follow {}", h.height, parent.height)));
    }
    if h.parent != parent.hash() {
        return Err(bad(format!("parent hash {} is not the previous block's {}", h.parent, parent.hash())));
    }
    if h.timestamp_ms < parent.timestamp_ms {
        return Err(bad(format!("timestamp {} goes back before the parent's {}", h.timestamp_ms, parent.timestamp_ms)));
    }
    if block.txs.len() > state.params().max_block_txs as usize {
        return Err(bad(format!("{} transactions, the limit is {}", block.txs.len(), state.params().max_block_txs)));
    }
    if block.encode_size() > state.params().max_block_bytes as usize {
        return Err(bad(format!("{} bytes, the limit is {}", block.encode_size(), state.params().max_block_bytes)));
    }
    if h.tx_root != tx_root(&block.txs) {
        return Err(bad("transaction root does not match its transactions".into()));
    }
    if h.liveness_root != liveness_root(&block.liveness) {
        return Err(bad("liveness root does not match its liveness changes".into()));
    }
    if block.liveness.len() > state.params().max_block_liveness as usize {
        return Err(bad(format!(
            "{} liveness changes, the limit is {}",
            block.liveness.len(),
            state.params().max_block_liveness
        )));
    }
    let invalid =
        |i: usize, e: TxError| bad(format!("transaction {i} ({}) is invalid: {e}", block.txs[i].hash().short()));
    if signatures == Signatures::Verify {
        verify_all(&block.txs, &state.network()).map_err(|(i, e)| invalid(i, e))?;
    }
    state.check_runnable(h.height).map_err(bad)?;
    state.begin_block(h.height, h.timestamp_ms);
    let mut outcome = BlockOutcome::default();
    for (i, change) in block.liveness.iter().enumerate() {
        state.apply_liveness(change).map_err(|e| bad(format!("liveness change {i} is invalid: {e}")))?;
        outcome.record(change);
    }
    outcome.receipts.reserve(block.txs.len());
    for (i, t) in block.txs.iter().enumerate() {
        let receipt = state.apply_verified(t).map_err(|e| match state.store_fault() {
            // A refusal read from a failed store says nothing about the transaction.
            Some(f) => bad(format!("cannot replay it: {f} (this node's store, not the block)")),
            None => invalid(i, e),
        })?;
        outcome.receipts.push(receipt);
    }
    let root = state.seal().map_err(|e| bad(format!("cannot replay it: {e} (this node's store, not the block)")))?;
    if h.state_root != root {
        return Err(bad(format!("state root {} differs from the replayed {root}", h.state_root)));
    }
    Ok(outcome)
}

/// Replays `blocks` from the genesis `state`, checking every link, root and transaction. Returns
/// the final state, or the first bad block and what is wrong with it.
pub fn verify_chain(mut state: State, blocks: &[Block]) -> Result<State, ChainError> {
    let mut parent = genesis_header(&state);
    for b in blocks {
        execute(&mut state, &parent, b, Signatures::Verify)?;
        parent = b.header;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{genesis, transfer};
    use proptest::prelude::*;

    fn chain(n: u64) -> (State, Vec<Block>) {
        let start = genesis();
        let mut s = start.clone();
        let mut parent = genesis_header(&s);
        let mut blocks = Vec::new();
        for i in 0..n {
            let p = propose(&s, &parent, 100 * (i + 1), [], [transfer(0, i, 1, 10)], Signatures::Verify).unwrap();
            assert!(p.dropped.is_empty());
            s = p.state;
            parent = p.block.header;
            blocks.push(p.block);
        }
        (start, blocks)
    }

    #[test]
    fn a_good_chain_replays_to_its_roots() {
        let (start, blocks) = chain(4);
        let end = verify_chain(start, &blocks).unwrap();
        assert_eq!(end.account(&crate::state::tests::id(1).node_id()).balance_micro, 540);
        assert_eq!(end.chain().height, 4);
    }

    #[test]
    fn proposals_drop_invalid_candidates_and_say_why() {
        let s = genesis();
        let p = propose(
            &s,
            &genesis_header(&s),
            5,
            [],
            [transfer(0, 0, 1, 1), transfer(0, 0, 1, 2), transfer(0, 1, 1, 9_999)],
            Signatures::Verify,
        )
        .unwrap();
        assert_eq!(p.block.txs.len(), 1);
        assert_eq!(p.dropped.len(), 2);
        assert!(matches!(p.dropped[0].1, TxError::BadNonce { .. }));
        assert!(matches!(p.dropped[1].1, TxError::InsufficientFunds { .. }));
    }

    #[test]
    fn any_change_names_the_first_bad_block() {
        let (start, blocks) = chain(4);
        let mut t = blocks.clone();
        t[2].header.state_root = Hash([0xab; 32]);
        assert_eq!(verify_chain(start.clone(), &t).unwrap_err().height, 3);
        let mut t = blocks.clone();
        t[1].header.timestamp_ms += 1;
        // Changing block 2's header breaks block 3's parent link... unless the state root also
        // depends on time (it does: the chain entry), so block 2 itself fails first.
        assert_eq!(verify_chain(start.clone(), &t).unwrap_err().height, 2);
        let mut t = blocks.clone();
        t[0].txs[0].signature[3] ^= 1;
        let e = verify_chain(start.clone(), &t).unwrap_err();
        assert_eq!(e.height, 1);
        assert!(e.what.contains("transaction root"), "{e}");
        let mut t = blocks.clone();
        t.swap(1, 2);
        assert_eq!(verify_chain(start.clone(), &t).unwrap_err().height, 3);
        let mut t = blocks;
        t[3].header.timestamp_ms = 0;
        assert!(verify_chain(start, &t).unwrap_err().what.contains("timestamp"));
    }

    #[test]
    fn blocks_round_trip_and_refuse_too_many_transactions() {
        let (_, blocks) = chain(2);
        let bytes = blocks[1].to_bytes();
        assert_eq!(Block::from_bytes(&bytes, 10).unwrap(), blocks[1]);
        assert!(Block::from_bytes(&bytes, 0).is_err());
        assert!(Block::from_bytes(&bytes[..bytes.len() - 1], 10).is_err());
    }

    #[test]
    fn a_count_the_bytes_cannot_hold_is_refused_before_allocating() {
        // An export's genesis sets max_block_txs; one of u32::MAX let a 128 MiB record claim 2^32
        // transactions, and decoding reserved room for ~350,000 of them per MiB (tens of GB: the
        // process aborted). Now the count is bounded by what the bytes can hold.
        for liveness_count in [u32::MAX as usize, 0] {
            let mut bytes = vec![0u8; BlockHeader::SIZE];
            liveness_count.write(&mut bytes);
            (u32::MAX as usize).write(&mut bytes);
            bytes.resize(128 << 20, 0);
            let e = Block::from_bytes(&bytes, u32::MAX as usize).unwrap_err();
            assert!(e.contains("not a block"), "{e}");
        }
        // The bounds are the smallest transaction and the smallest change (a Down). Every kind,
        // at its smallest, fits the bound, and a block of only such transactions decodes.
        let a = crate::state::tests::id(1);
        let empty = String::new;
        let smallest = [
            crate::Payload::LeaveNode { node: a.node_id() },
            crate::Payload::Transfer { to: a.node_id(), amount_micro: 0 },
            crate::Payload::DeleteBucket { name: empty() },
            crate::Payload::DeleteObject { bucket: empty(), key: empty() },
            crate::Payload::MoveShards {
                bucket: empty(),
                key: empty(),
                version: Hash::ZERO,
                moves: vec![crate::storage::ShardMove { index: 0, to: a.node_id(), receipt: [0; 64], expires_ms: 0 }],
            },
            crate::Payload::AuditFailed { bucket: empty(), key: empty(), version: Hash::ZERO, epoch: 0 },
            crate::Payload::RevokeTokens { ids: vec![Hash::ZERO] },
            crate::Payload::ScheduleUpgrade {
                upgrade: crate::upgrade::Upgrade { protocol: 0, height: 0 },
                approvals: vec![crate::upgrade::Approval { validator: a.node_id(), signature: [0; 64] }],
            },
            crate::Payload::CancelUpgrade {
                upgrade: crate::upgrade::Upgrade { protocol: 0, height: 0 },
                approvals: vec![crate::upgrade::Approval { validator: a.node_id(), signature: [0; 64] }],
            },
            crate::Payload::BidCommit { job: Hash::ZERO, digest: Hash::ZERO, bond_micro: 0 },
            crate::Payload::BidReveal { job: Hash::ZERO, price_micro: 0, salt: Hash::ZERO },
            crate::Payload::JobHeartbeat { jobs: vec![Hash::ZERO] },
            crate::Payload::ResultCommit { job: Hash::ZERO, digest: Hash::ZERO },
            crate::Payload::ResultReveal {
                job: Hash::ZERO,
                outcome: archipel_market::RunOutcome::Failed { end: empty() },
                salt: Hash::ZERO,
            },
            crate::Payload::CancelJob { job: Hash::ZERO },
            crate::Payload::PostJob { spec: crate::jobs::tests::spec() },
            crate::Payload::TransferMany { credits: vec![crate::tx::Credit { to: a.node_id(), amount_micro: 0 }] },
            crate::Payload::CreateBucket {
                name: empty(),
                policy: archipel_types::PlacementPolicy::anywhere(archipel_types::ErasureCode::DEFAULT),
            },
            crate::Payload::PutObject {
                put: crate::storage::ObjectPut {
                    bucket: empty(),
                    key: empty(),
                    version: Hash::ZERO,
                    nonce: Hash::ZERO,
                    size: 0,
                    segment_bytes: 0,
                    manifest_root: Hash::ZERO,
                    etag: empty(),
                    holders: vec![],
                },
            },
            crate::Payload::PutObjects {
                batch: crate::batch::PutBatch {
                    bucket: empty(),
                    puts: vec![crate::batch::BatchedPut {
                        key: empty(),
                        version: Hash::ZERO,
                        nonce: Hash::ZERO,
                        size: 0,
                        segment_bytes: 0,
                        manifest_root: Hash::ZERO,
                        etag: empty(),
                        holders: vec![],
                    }],
                    holders: vec![],
                },
            },
            crate::Payload::RegisterNode {
                descriptor: archipel_crypto::SignedDescriptor::sign(
                    &a,
                    archipel_crypto::test_support::example_descriptor(&a),
                )
                .unwrap(),
                consent: [0; 64],
            },
            crate::Payload::UpdateNode {
                descriptor: archipel_crypto::SignedDescriptor::sign(
                    &a,
                    archipel_crypto::test_support::example_descriptor(&a),
                )
                .unwrap(),
            },
        ];
        // Every kind must appear above: this match has no wildcard, so a new kind does not
        // compile until its smallest form is added (and checked against the bound).
        for p in &smallest {
            match p {
                crate::Payload::LeaveNode { .. }
                | crate::Payload::Transfer { .. }
                | crate::Payload::DeleteBucket { .. }
                | crate::Payload::DeleteObject { .. }
                | crate::Payload::MoveShards { .. }
                | crate::Payload::AuditFailed { .. }
                | crate::Payload::RevokeTokens { .. }
                | crate::Payload::ScheduleUpgrade { .. }
                | crate::Payload::CancelUpgrade { .. }
                | crate::Payload::BidCommit { .. }
                | crate::Payload::BidReveal { .. }
                | crate::Payload::JobHeartbeat { .. }
                | crate::Payload::ResultCommit { .. }
                | crate::Payload::ResultReveal { .. }
                | crate::Payload::CancelJob { .. }
                | crate::Payload::PostJob { .. }
                | crate::Payload::TransferMany { .. }
                | crate::Payload::CreateBucket { .. }
                | crate::Payload::PutObject { .. }
                | crate::Payload::PutObjects { .. }
                | crate::Payload::RegisterNode { .. }
                | crate::Payload::UpdateNode { .. } => {}
            }
        }
        let kinds: std::collections::BTreeSet<&str> = smallest.iter().map(|p| p.kind()).collect();
        assert_eq!(kinds.len(), 22, "one payload of every kind: {kinds:?}");
        let txs: Vec<_> = smallest
            .into_iter()
            .map(|payload| crate::Transaction { signer: a.node_id(), nonce: 0, payload }.sign(&a, &Hash::of(&[b"net"])))
            .collect();
        assert_eq!(txs.iter().map(|t| t.encode_size()).min(), Some(MIN_TX_BYTES));
        for tx in &txs {
            let block = Block { header: genesis_header(&genesis()), liveness: vec![], txs: vec![tx.clone()] };
            assert_eq!(Block::from_bytes(&block.to_bytes(), 16).as_ref(), Ok(&block), "{}", tx.tx.payload.kind());
        }
        assert_eq!(LivenessChange::Down { node: a.node_id() }.encode_size(), MIN_LIVENESS_BYTES);
    }

    proptest! {
        /// Replay equivalence: applying the blocks to the genesis state always yields the recorded
        /// state roots, whatever the mix of valid and invalid candidates.
        #[test]
        fn replay_yields_the_recorded_roots(ops in prop::collection::vec(prop::collection::vec((0u64..3, 0u64..2, 0u64..3, 0u64..900), 0..6), 1..8)) {
            let start = genesis();
            let mut s = start.clone();
            let mut parent = genesis_header(&s);
            let mut blocks = Vec::new();
            for (i, batch) in ops.into_iter().enumerate() {
                let cands: Vec<_> = batch.into_iter().map(|(from, skew, to, amt)| {
                    let nonce = s.account(&crate::state::tests::id(from).node_id()).nonce + skew;
                    transfer(from, nonce, to, amt)
                }).collect();
                let p = propose(&s, &parent, 10 * i as u64, [], cands, Signatures::Verify).unwrap();
                s = p.state;
                parent = p.block.header;
                blocks.push(p.block);
            }
            let mut r = start;
            let mut prev = genesis_header(&r);
            for b in &blocks {
                prop_assert!(execute(&mut r, &prev, b, Signatures::Verify).is_ok());
                prop_assert_eq!(r.state_root(), b.header.state_root);
                // Sealing only the changed entries missed none of them.
                prop_assert_eq!(r.rebuilt_root(), b.header.state_root);
                prev = b.header;
            }
            prop_assert_eq!(r.total_micro(), s.total_micro());
        }
    }
}
