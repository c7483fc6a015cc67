//! The ledger's deterministic state machine (sans-IO): signed transactions, atomic `apply` with
//! typed receipts, liveness leases, and a state root committing to all state.
//!
//! Started in the foundation's last session as groundwork for the "Replicated ledger" issue; not
//! yet wired to consensus. It performs no I/O, reads no clock and spawns nothing: block time comes
//! in as an argument, so every node replaying the same transactions reaches the same state root.

pub mod block;
pub mod state;
pub mod tx;

pub use block::{Block, BlockHeader, ChainError, build_block, genesis_header, verify_chain};
pub use state::{Account, LeaseStatus, Receipt, State};
pub use tx::{Payload, SignedTransaction, Transaction, TxError};
