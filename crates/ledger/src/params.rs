//! Ledger parameters fixed by the genesis: lease timing, clock drift, fees and size limits.

use serde::{Deserialize, Serialize};

/// Parameters every node must agree on (they are part of the genesis and of the state root).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerParams {
    /// A node the validators have not heard for this long is marked Down (nodes heartbeat every
    /// quarter of it). Measured on each validator's own clock, never in block time.
    pub lease_ttl_ms: u64,
    /// A block whose timestamp is further than this ahead of a validator's clock is not voted
    /// for until it no longer is; with `lease_ttl_ms` it bounds how far one validator's clock can
    /// push block time ahead.
    pub max_clock_drift_ms: u64,
    /// Most liveness changes (Down/Up records) in one block.
    pub max_block_liveness: u32,
    /// Fee burned by every transaction (spam limit).
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
            max_clock_drift_ms: 1_000,
            max_block_liveness: 1_024,
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
        if self.lease_ttl_ms < 400 {
            return Err(format!(
                "lease_ttl_ms ({}) must be at least 400: nodes heartbeat every quarter of it",
                self.lease_ttl_ms
            ));
        }
        if self.max_clock_drift_ms == 0 || self.max_clock_drift_ms > self.lease_ttl_ms / 2 {
            return Err(format!(
                "max_clock_drift_ms ({}) must be positive and at most half of lease_ttl_ms ({}): one validator's \
                 clock could otherwise move block time by a lease's length",
                self.max_clock_drift_ms, self.lease_ttl_ms
            ));
        }
        if self.max_block_liveness == 0 {
            return Err("max_block_liveness must be positive".into());
        }
        if self.max_tx_bytes < 512 {
            return Err("max_tx_bytes must be at least 512 (a node registration needs about 400)".into());
        }
        if self.max_block_bytes < 4 * self.max_tx_bytes {
            return Err("max_block_bytes must hold at least 4 transactions of max_tx_bytes".into());
        }
        if self.max_block_txs == 0 || self.nonce_window == 0 {
            return Err("max_block_txs and nonce_window must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_combinations_are_named() {
        LedgerParams::default().validate().unwrap();
        let p = LedgerParams { max_clock_drift_ms: 1_500, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("max_clock_drift_ms"));
        let p = LedgerParams { lease_ttl_ms: 100, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("lease_ttl_ms"));
        let p = LedgerParams { max_block_liveness: 0, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("max_block_liveness"));
    }
}
