//! The ledger's deterministic state machine (sans-IO): signed transactions, admission and the
//! mempool, atomic `apply` with typed receipts, the node registry, liveness leases, object storage
//! (buckets, objects, shard holders), compute jobs, blocks, a Merkle state root with proofs, and the offline
//! chain verifier.
//!
//! Architecture Invariant: no I/O, no clock, nothing spawned. Block time comes in as an argument,
//! so every node replaying the same blocks reaches the same state roots.

mod accounts;
pub mod batch;
pub mod block;
pub mod export;
pub mod hash;
pub mod jobs;
pub mod lease;
pub mod listing;
pub mod mempool;
pub mod merkle;
pub mod params;
pub mod proof;
mod registry;
pub mod state;
pub mod storage;
pub mod store;
pub mod table;
pub mod tokens;
pub mod trie;
pub mod tx;
pub mod upgrade;

pub use block::{
    Block, BlockHeader, BlockOutcome, ChainError, Proposal, Signatures, execute, genesis_header, liveness_root,
    propose, verify_chain,
};
pub use hash::Hash;
pub use lease::{AliveProof, Lease, LivenessChange, LivenessError};
pub use mempool::{Mempool, MempoolError, MempoolLimits};
pub use params::LedgerParams;
pub use proof::{ProofError, StateProof, TxProof};
pub use state::{Account, ChainPosition, GenesisState, LeaseStatus, NodeRecord, Receipt, State, StateKey};
pub use tx::{Credit, MAX_CREDITS, Payload, SignedTransaction, Transaction, TxError, verify_all, verify_each};
