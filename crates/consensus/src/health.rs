//! Whether this node's finalized chain keeps up with consensus: the applier records here when a
//! finalized block cannot be applied (or the block log cannot be synced) and when it recovers, so
//! the node's `/health` and ledger reads can say the head is stale instead of serving it as
//! current.

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// Why the applier is stuck, since when, and how often it tried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stall {
    /// Height of the block the applier cannot get past (the block not applied, or the highest
    /// block whose sync failed).
    pub height: u64,
    /// What failed, as the last attempt reported it.
    pub reason: String,
    /// First failure of this stall (Unix ms, runtime clock).
    pub since_ms: u64,
    /// Failed attempts so far.
    pub attempts: u64,
}

/// The applier's health, shared between the applier (writes) and the API (reads). Cloning shares.
#[derive(Clone, Debug, Default)]
pub struct ApplierHealth(Arc<Mutex<Option<Stall>>>);

impl ApplierHealth {
    /// The current stall, `None` while the applier keeps up.
    pub fn stall(&self) -> Option<Stall> {
        crate::lock(&self.0).clone()
    }

    /// Records a failed attempt at `height` at time `now_ms`; returns the attempts of this stall.
    /// Called by the applier (and by tests of what readers do with a stall).
    pub fn failed(&self, height: u64, reason: String, now_ms: u64) -> u64 {
        let mut g = crate::lock(&self.0);
        let stall = g.get_or_insert_with(|| Stall { height, reason: reason.clone(), since_ms: now_ms, attempts: 0 });
        stall.height = height;
        stall.reason = reason;
        stall.attempts += 1;
        stall.attempts
    }

    /// Clears the stall after an attempt succeeded; returns the stall that ended, if any.
    pub fn recovered(&self) -> Option<Stall> {
        crate::lock(&self.0).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_counts_attempts_keeps_its_start_and_clears() {
        let h = ApplierHealth::default();
        let reader = h.clone();
        assert_eq!(reader.stall(), None);
        assert_eq!(h.failed(7, "disk full".into(), 1_000), 1);
        assert_eq!(h.failed(7, "disk still full".into(), 3_000), 2);
        let s = reader.stall().expect("stalled");
        assert_eq!((s.height, s.reason.as_str(), s.since_ms, s.attempts), (7, "disk still full", 1_000, 2));
        assert_eq!(h.recovered().map(|s| s.attempts), Some(2));
        assert_eq!(reader.stall(), None);
    }
}
