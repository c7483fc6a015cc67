//! Consensus for the ledger: commonware simplex among the genesis validators, with the ledger as
//! the application, and the node's finalized chain (blocks on disk, mempool, proofs).
//!
//! Kept in its own crate so the heavy commonware consensus dependencies build once and edits
//! elsewhere rebuild fast.

pub mod app;
pub mod block;
pub mod candidates;
pub mod chain;
pub mod engine;
pub mod store;

pub use chain::{Chain, Finalized, Proven, TxLocation, TxStatus};
pub use store::{BlockStore, FileStore, MemoryStore, Record};
