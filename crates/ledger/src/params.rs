//! Ledger parameters fixed by the genesis: lease timing, fees and size limits.

use serde::{Deserialize, Serialize};

/// Parameters every node must agree on (they are part of the genesis and of the state root).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerParams {
    /// A node whose last heartbeat is older than this at block time is Down.
    pub lease_ttl_ms: u64,
    /// A heartbeat less than this after the previous one is refused (spam limit; heartbeats are
    /// free).
    pub heartbeat_min_gap_ms: u64,
    /// Fee burned by every transaction except heartbeats (spam limit).
    pub tx_fee_micro: u64,
    /// Largest encoded transaction accepted.
    pub max_tx_bytes: u32,
    /// Most transactions in one block.
    pub max_block_txs: u32,
    /// Largest encoded block.
    pub max_block_bytes: u32,
    /// The mempool accepts nonces up to this far ahead of an account's next nonce.
    pub nonce_window: u64,
}

impl Default for LedgerParams {
    fn default() -> Self {
        Self {
            lease_ttl_ms: 2_000,
            heartbeat_min_gap_ms: 100,
            tx_fee_micro: 1,
            max_tx_bytes: 8 * 1024,
            max_block_txs: 4_096,
            max_block_bytes: 1024 * 1024,
            nonce_window: 1_024,
        }
    }
}

impl LedgerParams {
    /// Checks the parameters make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_ttl_ms == 0 {
            return Err("lease_ttl_ms must be positive".into());
        }
        if self.heartbeat_min_gap_ms >= self.lease_ttl_ms {
            return Err(format!(
                "heartbeat_min_gap_ms ({}) must be below lease_ttl_ms ({}) or no node could stay up",
                self.heartbeat_min_gap_ms, self.lease_ttl_ms
            ));
        }
        if self.max_tx_bytes < 512 {
            return Err("max_tx_bytes must be at least 512 (a node registration needs about 400)".into());
        }
        // In u64: a max_tx_bytes of 2^30 or more overflows four times itself in u32 (found by fuzzing).
        if u64::from(self.max_block_bytes) < 4 * u64::from(self.max_tx_bytes) {
            return Err("max_block_bytes must hold at least 4 transactions of max_tx_bytes".into());
        }
        if self.max_block_txs == 0 || self.nonce_window == 0 {
            return Err("max_block_txs and nonce_window must be positive".into());
        }
        Ok(())
    }
}
