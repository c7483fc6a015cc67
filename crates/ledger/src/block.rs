//! Blocks and offline chain verification.
//!
//! A block commits to its height, its parent's hash, the consensus timestamp, the Merkle root of
//! its transactions and the state root after applying them. [`verify_chain`] replays a chain from
//! a genesis state and names the first block that is wrong and why — the core of
//! `archipel ledger verify`.

use crate::state::{State, merkle_root};
use crate::tx::SignedTransaction;
use serde::{Deserialize, Serialize};

/// A block header: what consensus orders and what proofs are checked against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHeader {
    /// Height (genesis state is height 0; the first block is 1).
    pub height: u64,
    /// Hex hash of the parent header (all zeros for the first block).
    pub parent: String,
    /// Consensus timestamp, Unix ms; never decreases.
    pub timestamp_ms: u64,
    /// Hex Merkle root of the transactions.
    pub tx_root: String,
    /// Hex state root after applying the transactions.
    pub state_root: String,
}

impl BlockHeader {
    /// The header hash.
    pub fn hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"archipel/block/v1");
        h.update(&self.height.to_be_bytes());
        h.update(self.parent.as_bytes());
        h.update(&self.timestamp_ms.to_be_bytes());
        h.update(self.tx_root.as_bytes());
        h.update(self.state_root.as_bytes());
        h.finalize().to_hex().to_string()
    }
}

/// A block: header and transactions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// The header.
    pub header: BlockHeader,
    /// The transactions, in order.
    pub txs: Vec<SignedTransaction>,
}

/// Hex Merkle root of transactions (by transaction hash).
pub fn tx_root(txs: &[SignedTransaction]) -> String {
    hex::encode(merkle_root(txs.iter().map(SignedTransaction::hash).collect()))
}

/// The parent hash of the first block.
pub fn zero_hash() -> String {
    "0".repeat(64)
}

/// Builds the next block on `state` (mutating it): applies every transaction, which must all be
/// valid — proposers drop invalid ones before building.
pub fn build_block(
    state: &mut State,
    parent: &BlockHeader,
    timestamp_ms: u64,
    txs: Vec<SignedTransaction>,
) -> Result<Block, String> {
    let timestamp_ms = timestamp_ms.max(parent.timestamp_ms);
    for (i, t) in txs.iter().enumerate() {
        state.apply(t, timestamp_ms).map_err(|e| format!("transaction {i}: {e}"))?;
    }
    let header = BlockHeader {
        height: parent.height + 1,
        parent: if parent.height == 0 { zero_hash() } else { parent.hash() },
        timestamp_ms,
        tx_root: tx_root(&txs),
        state_root: hex::encode(state.state_root()),
    };
    Ok(Block { header, txs })
}

/// The pseudo-header of the genesis state (height 0).
pub fn genesis_header(state: &State, timestamp_ms: u64) -> BlockHeader {
    BlockHeader {
        height: 0,
        parent: zero_hash(),
        timestamp_ms,
        tx_root: tx_root(&[]),
        state_root: hex::encode(state.state_root()),
    }
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

/// Replays `blocks` on `state` and checks every link, root and transaction. Returns the final
/// state, or the first bad block and what is wrong with it.
pub fn verify_chain(mut state: State, genesis: &BlockHeader, blocks: &[Block]) -> Result<State, ChainError> {
    let mut parent = genesis.clone();
    for b in blocks {
        let h = &b.header;
        let bad = |what: String| ChainError { height: h.height, what };
        if h.height != parent.height + 1 {
            return Err(bad(format!("height follows {}", parent.height)));
        }
        let expected_parent = if parent.height == 0 { zero_hash() } else { parent.hash() };
        if h.parent != expected_parent {
            return Err(bad(format!("parent hash {} does not match the previous block's {expected_parent}", h.parent)));
        }
        if h.timestamp_ms < parent.timestamp_ms {
            return Err(bad(format!("timestamp {} goes back before {}", h.timestamp_ms, parent.timestamp_ms)));
        }
        if h.tx_root != tx_root(&b.txs) {
            return Err(bad("transaction root does not match its transactions".into()));
        }
        for (i, t) in b.txs.iter().enumerate() {
            state.apply(t, h.timestamp_ms).map_err(|e| bad(format!("transaction {i} is invalid: {e}")))?;
        }
        let root = hex::encode(state.state_root());
        if h.state_root != root {
            return Err(bad(format!("state root {} differs from the replayed {root}", h.state_root)));
        }
        parent = h.clone();
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tx::{Payload, Transaction};
    use archipel_crypto::Identity;

    fn chain() -> (State, BlockHeader, Vec<Block>) {
        let a = Identity::from_seed(1);
        let b = Identity::from_seed(2);
        let genesis = State::genesis([(a.node_id(), 1_000)], []);
        let g = genesis_header(&genesis, 0);
        let mut s = genesis.clone();
        let mut blocks = Vec::new();
        let mut parent = g.clone();
        for n in 0..4 {
            let tx = Transaction {
                signer: a.node_id(),
                nonce: n,
                payload: Payload::Transfer { to: b.node_id(), amount_micro: 10 },
            }
            .sign(&a);
            let block = build_block(&mut s, &parent, 100 * (n + 1), vec![tx]).unwrap();
            parent = block.header.clone();
            blocks.push(block);
        }
        (genesis, g, blocks)
    }

    #[test]
    fn a_good_chain_replays_to_its_roots() {
        let (genesis, g, blocks) = chain();
        let end = verify_chain(genesis, &g, &blocks).unwrap();
        assert_eq!(end.account(&Identity::from_seed(2).node_id()).balance_micro, 40);
    }

    #[test]
    fn any_change_names_the_first_bad_block() {
        let (genesis, g, blocks) = chain();
        let mut t = blocks.clone();
        t[2].header.state_root = "ab".repeat(32);
        assert_eq!(verify_chain(genesis.clone(), &g, &t).unwrap_err().height, 3);
        let mut t = blocks.clone();
        t[1].header.timestamp_ms += 1;
        // Changing block 2's header breaks block 3's parent link.
        assert_eq!(verify_chain(genesis.clone(), &g, &t).unwrap_err().height, 3);
        let mut t = blocks.clone();
        t[0].txs[0].signature = "00".repeat(64);
        let e = verify_chain(genesis.clone(), &g, &t).unwrap_err();
        assert_eq!(e.height, 1);
        assert!(e.what.contains("transaction root"), "{e}");
        let mut t = blocks.clone();
        t.swap(1, 2);
        assert_eq!(verify_chain(genesis.clone(), &g, &t).unwrap_err().height, 3);
        let mut t = blocks;
        t[3].header.timestamp_ms = 0;
        assert!(verify_chain(genesis, &g, &t).unwrap_err().what.contains("timestamp"));
    }
}
