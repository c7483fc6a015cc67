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
pub mod health;
pub mod join;
pub mod liveness;
pub mod state_db;
pub mod store;
pub mod vote_gate;

pub use chain::{Chain, Finalized, Opened, Proven, TxLocation, TxStatus};

/// Locks `m`, also after a thread panicked while holding it: every lock in this crate guards
/// state that is consistent between statements, so a panic elsewhere must not take the node's
/// consensus down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
pub use health::{ApplierHealth, Stall};
pub use store::{BlockStore, FileStore, MemoryStore, RangeRead, RangeReader, Record};
