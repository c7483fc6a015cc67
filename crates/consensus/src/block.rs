//! The ledger block as commonware consensus sees it: a digest (the header hash), a height, a
//! parent, and a bounded binary encoding.
//!
//! The digest is the header hash and the header commits to the transactions through their
//! Merkle root, so decoding refuses a block whose transactions do not match that root: blocks
//! fetched during backfill are matched by digest only.

use archipel_ledger::block::tx_root;
use archipel_ledger::{Block, BlockHeader, Hash, LedgerParams, State, genesis_header};
use bytes::BufMut;
use commonware_codec::{Buf, EncodeSize, Error as CodecError, Read, Write};
use commonware_consensus::types::Height;
use commonware_consensus::{BoundedBlock, Heightable};
use commonware_cryptography::Digestible;
use commonware_cryptography::blake3::Digest;

/// The consensus digest of a block: its header hash.
pub fn digest_of(hash: &Hash) -> Digest {
    Digest(hash.0)
}

/// The ledger hash of a consensus digest.
pub fn hash_of(digest: &Digest) -> Hash {
    Hash(digest.0)
}

/// Decoding limits of a block, from the ledger parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCfg {
    /// Most transactions.
    pub max_txs: usize,
    /// Most bytes.
    pub max_bytes: usize,
}

impl From<&LedgerParams> for BlockCfg {
    fn from(p: &LedgerParams) -> Self {
        BlockCfg { max_txs: p.max_block_txs as usize, max_bytes: p.max_block_bytes as usize }
    }
}

/// A ledger block with its digest computed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerBlock {
    block: Block,
    digest: Digest,
}

impl LedgerBlock {
    /// Wraps a block.
    pub fn new(block: Block) -> Self {
        let digest = digest_of(&block.hash());
        Self { block, digest }
    }

    /// The genesis block of `state` (height 0, no transactions).
    pub fn genesis(state: &State) -> Self {
        Self::new(Block { header: genesis_header(state), liveness: Vec::new(), txs: Vec::new() })
    }

    /// The ledger block.
    pub fn block(&self) -> &Block {
        &self.block
    }

    /// The header.
    pub fn header(&self) -> &BlockHeader {
        &self.block.header
    }
}

impl Write for LedgerBlock {
    fn write(&self, buf: &mut impl BufMut) {
        self.block.write(buf);
    }
}

impl EncodeSize for LedgerBlock {
    fn encode_size(&self) -> usize {
        self.block.encode_size()
    }
}

impl Read for LedgerBlock {
    type Cfg = BlockCfg;
    fn read_cfg(buf: &mut impl Buf, cfg: &BlockCfg) -> Result<Self, CodecError> {
        let before = buf.remaining();
        let block = Block::read_cfg(buf, &cfg.max_txs)?;
        if before - buf.remaining() > cfg.max_bytes {
            return Err(CodecError::Invalid("LedgerBlock", "block larger than max_block_bytes"));
        }
        if block.header.tx_root != tx_root(&block.txs) {
            return Err(CodecError::Invalid("LedgerBlock", "transactions do not match the transaction root"));
        }
        if block.header.liveness_root != archipel_ledger::liveness_root(&block.liveness) {
            return Err(CodecError::Invalid("LedgerBlock", "liveness changes do not match the liveness root"));
        }
        Ok(Self::new(block))
    }
}

impl Digestible for LedgerBlock {
    type Digest = Digest;
    fn digest(&self) -> Digest {
        self.digest
    }
}

impl Heightable for LedgerBlock {
    fn height(&self) -> Height {
        Height::new(self.block.header.height)
    }
}

impl commonware_consensus::Block for LedgerBlock {
    fn parent(&self) -> Digest {
        digest_of(&self.block.header.parent)
    }
}

impl BoundedBlock for LedgerBlock {
    fn max_encode_size(cfg: &BlockCfg) -> usize {
        cfg.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use commonware_codec::{Copying, Decode as _, Encode as _};

    #[test]
    fn decoding_refuses_transactions_that_do_not_match_the_root() {
        let a = archipel_crypto::Identity::from_seed(1);
        let state =
            State::genesis(archipel_ledger::GenesisState { accounts: vec![(a.node_id(), 100)], ..Default::default() });
        let tx = archipel_ledger::Transaction {
            signer: a.node_id(),
            nonce: 0,
            payload: archipel_ledger::Payload::Transfer { to: a.node_id(), amount_micro: 1 },
        }
        .sign(&a, &state.network());
        let p =
            archipel_ledger::propose(&state, &genesis_header(&state), 1, [], [tx], archipel_ledger::Signatures::Verify)
                .unwrap();
        let cfg = BlockCfg::from(state.params());
        let b = LedgerBlock::new(p.block.clone());
        let bytes = b.encode();
        assert_eq!(LedgerBlock::decode_cfg(Copying(&bytes), &cfg).unwrap(), b);
        let mut other = p.block;
        other.txs.clear();
        let bytes = LedgerBlock::new(other).encode();
        assert!(LedgerBlock::decode_cfg(Copying(&bytes), &cfg).is_err());
        let small = BlockCfg { max_txs: 10, max_bytes: 50 };
        assert!(LedgerBlock::decode_cfg(Copying(&b.encode()), &small).is_err());
    }
}
