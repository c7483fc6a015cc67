//! Ledger parameters fixed by the genesis: lease timing, clock drift, fees, size limits and the node
//! registry's bounds (its capacity and the deposit a registration locks).

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
    /// Most nodes the registry holds (genesis nodes included); a `RegisterNode` beyond it is
    /// refused. Every node sizes its p2p peer limit from this value once at start, so the allowed
    /// set can never outgrow it (memory per node grows with it: see [`MAX_REGISTERED_NODES_LIMIT`]).
    pub max_registered_nodes: u32,
    /// Locked from the sponsor by `RegisterNode` and returned to the owner by `LeaveNode`: filling
    /// the registry costs `max_registered_nodes` deposits, not just fees.
    pub node_deposit_micro: u64,
    /// How long (chain time, ms) a storage node may be Down before its shards are repaired
    /// elsewhere: a restart or a short network cut moves nothing.
    pub repair_grace_ms: u64,
    /// Length of an audit epoch (chain time, ms): each object is challenged once per epoch by
    /// an auditor drawn from finalized state.
    pub audit_epoch_ms: u64,
    /// Locked from a bucket's owner for each entry it adds to the ledger's state — the bucket,
    /// and each object key in it — and returned to the owner when the entry is deleted (replacing
    /// an object's version adds no entry): every node keeps these entries, so filling the state
    /// costs deposits, not just fees. Absent from a genesis written before it (0: no deposit),
    /// which keeps that network's genesis and state root as they were.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub entry_deposit_micro: u64,
    /// The fewest blocks between a `ScheduleUpgrade` and the height it names
    /// ([`crate::upgrade`]): time for operators to install a release. 0 (absent, as in a genesis
    /// written before upgrades) means [`crate::upgrade::MIN_UPGRADE_NOTICE_BLOCKS`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub upgrade_notice_blocks: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Lowest accepted `max_tx_bytes`: the largest possible node registration (descriptor with the
/// longest names and addresses, and the node's consent) fits.
pub const MIN_MAX_TX_BYTES: u32 = 1_024;

/// Highest accepted `max_block_bytes` (64 MiB): nodes size their p2p message limit from it, and
/// the stream layer refuses (panics on) a limit near 4 GiB.
pub const MAX_BLOCK_BYTES_LIMIT: u32 = 64 * 1024 * 1024;

/// Highest accepted `max_registered_nodes`. Every node preallocates p2p mailboxes for this many
/// peers (about 0.25 KiB per peer and message of burst on each channel), so a genesis cannot ask
/// for more than a node can hold.
pub const MAX_REGISTERED_NODES_LIMIT: u32 = 16_384;

/// Lowest accepted nonzero `upgrade_notice_blocks` (a devnet's 10 seconds of idle blocks).
pub const MIN_NOTICE_BLOCKS_LIMIT: u64 = 20;

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
            max_registered_nodes: 256,
            node_deposit_micro: 1_000_000,
            repair_grace_ms: 10_000,
            audit_epoch_ms: 60_000,
            entry_deposit_micro: 10_000,
            upgrade_notice_blocks: 0,
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
        if self.max_tx_bytes < MIN_MAX_TX_BYTES {
            return Err(format!(
                "max_tx_bytes must be at least {MIN_MAX_TX_BYTES} (a node registration with the longest names and addresses needs that)"
            ));
        }
        if self.max_block_bytes > MAX_BLOCK_BYTES_LIMIT {
            return Err(format!(
                "max_block_bytes ({}) must be at most {MAX_BLOCK_BYTES_LIMIT}: a block travels as one p2p message",
                self.max_block_bytes
            ));
        }
        // In u64: a max_tx_bytes of 2^30 or more overflows four times itself in u32 (found by fuzzing).
        if u64::from(self.max_block_bytes) < 4 * u64::from(self.max_tx_bytes) {
            return Err("max_block_bytes must hold at least 4 transactions of max_tx_bytes".into());
        }
        if self.max_block_txs == 0 || self.nonce_window == 0 {
            return Err("max_block_txs and nonce_window must be positive".into());
        }
        if self.max_registered_nodes == 0 || self.max_registered_nodes > MAX_REGISTERED_NODES_LIMIT {
            return Err(format!(
                "max_registered_nodes ({}) must be 1 to {MAX_REGISTERED_NODES_LIMIT}: every node sizes its p2p peer limit from it",
                self.max_registered_nodes
            ));
        }
        if self.repair_grace_ms < self.lease_ttl_ms {
            return Err(format!(
                "repair_grace_ms ({}) must be at least lease_ttl_ms ({}): shards would move before a node is known dead",
                self.repair_grace_ms, self.lease_ttl_ms
            ));
        }
        if self.upgrade_notice_blocks != 0 && self.upgrade_notice_blocks < MIN_NOTICE_BLOCKS_LIMIT {
            return Err(format!(
                "upgrade_notice_blocks ({}) must be 0 (the default, {}) or at least {MIN_NOTICE_BLOCKS_LIMIT}: operators \
                 need time to install a release",
                self.upgrade_notice_blocks,
                crate::upgrade::MIN_UPGRADE_NOTICE_BLOCKS
            ));
        }
        if self.audit_epoch_ms < 1_000 {
            return Err(format!("audit_epoch_ms ({}) must be at least 1000", self.audit_epoch_ms));
        }
        if self.node_deposit_micro == 0 {
            return Err(
                "node_deposit_micro must be positive: without a deposit anyone can fill the node registry for the fee alone"
                    .into(),
            );
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
        // An upgrade notice: absent (the default) or at least 20 blocks.
        for (notice, ok) in [(0, true), (19, false), (20, true)] {
            let p = LedgerParams { upgrade_notice_blocks: notice, ..LedgerParams::default() };
            assert_eq!(p.validate().is_ok(), ok, "notice {notice}");
        }
        let p = LedgerParams { max_clock_drift_ms: 1_500, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("max_clock_drift_ms"));
        let p = LedgerParams { lease_ttl_ms: 100, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("lease_ttl_ms"));
        let p = LedgerParams { max_block_liveness: 0, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("max_block_liveness"));
    }

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(LedgerParams::default().validate(), Ok(()));
    }

    #[test]
    fn registry_bounds_are_checked() {
        let p = LedgerParams { max_registered_nodes: 0, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("max_registered_nodes (0)"));
        let p = LedgerParams { max_registered_nodes: MAX_REGISTERED_NODES_LIMIT + 1, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("p2p peer limit"));
        let p = LedgerParams { max_registered_nodes: MAX_REGISTERED_NODES_LIMIT, ..LedgerParams::default() };
        assert_eq!(p.validate(), Ok(()));
        let p = LedgerParams { max_tx_bytes: u32::MAX, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("hold at least 4 transactions"), "no overflow");
        let p = LedgerParams { max_block_bytes: u32::MAX, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("max_block_bytes (4294967295) must be at most"));
        // A genesis written before entry deposits reads as none, and writes back as it was.
        let mut old = serde_json::to_value(LedgerParams::default()).unwrap();
        old.as_object_mut().unwrap().remove("entry_deposit_micro");
        let read: LedgerParams = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(read.entry_deposit_micro, 0);
        assert_eq!(serde_json::to_value(&read).unwrap(), old);
        assert!(serde_json::to_value(LedgerParams::default()).unwrap()["entry_deposit_micro"].as_u64().unwrap() > 0);
        let p = LedgerParams { node_deposit_micro: 0, ..LedgerParams::default() };
        assert!(p.validate().unwrap_err().contains("node_deposit_micro must be positive"));
    }

    #[test]
    fn a_genesis_without_the_registry_fields_gets_the_defaults() {
        let p: LedgerParams = serde_json::from_str(r#"{"lease_ttl_ms": 3000}"#).unwrap();
        assert_eq!(p.max_registered_nodes, LedgerParams::default().max_registered_nodes);
        assert_eq!(p.node_deposit_micro, LedgerParams::default().node_deposit_micro);
    }
}
