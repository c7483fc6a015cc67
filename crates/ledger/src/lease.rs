//! Liveness leases: the `Heartbeat` kind. A node is Up while its last heartbeat is within
//! `lease_ttl_ms` of block time; the status is a pure function of state and block time, so every
//! node sees the same node go Down at the same height.

use crate::state::{Receipt, State};
use crate::tx::TxError;
use archipel_types::NodeId;

impl State {
    /// Checks a heartbeat from `node` at the current block time without changing anything.
    pub(crate) fn check_heartbeat(&self, node: NodeId) -> Result<(), TxError> {
        if !self.nodes.contains_key(&node) {
            return Err(TxError::NotAllowed(format!(
                "{} is not a registered node: only registered nodes heartbeat (register it with a RegisterNode transaction)",
                node.short()
            )));
        }
        if let Some(last) = self.leases.get(&node) {
            let gap_ms = self.chain.timestamp_ms.saturating_sub(*last);
            if gap_ms < self.params.heartbeat_min_gap_ms {
                return Err(TxError::HeartbeatTooSoon { gap_ms, min_gap_ms: self.params.heartbeat_min_gap_ms });
            }
        }
        Ok(())
    }

    /// Renews `node`'s lease at the current block time; only after [`State::check_heartbeat`].
    pub(crate) fn apply_heartbeat(&mut self, node: NodeId) -> Receipt {
        let now = self.chain.timestamp_ms;
        self.leases.insert(node, now);
        Receipt::LeaseRenewed { node, at_ms: now }
    }
}

#[cfg(test)]
mod tests {
    use crate::state::LeaseStatus;
    use crate::state::tests::{genesis, id, signed};
    use crate::tx::{Payload, TxError};

    #[test]
    fn leases_expire_at_a_deterministic_block_and_renew() {
        let mut s = genesis();
        let node = id(10).node_id();
        assert_eq!(s.lease_status(&node), LeaseStatus::Down, "never heartbeated");
        s.begin_block(1, 1_000);
        s.apply(&signed(10, 0, Payload::Heartbeat)).unwrap();
        assert_eq!(s.lease_status(&node), LeaseStatus::Up);
        assert!(s.begin_block(2, 3_000).is_empty(), "exactly lease_ttl later it is still up");
        assert_eq!(s.lease_status(&node), LeaseStatus::Up);
        assert_eq!(s.begin_block(3, 3_001), vec![node], "down from this block");
        assert_eq!(s.lease_status(&node), LeaseStatus::Down);
        s.apply(&signed(10, 1, Payload::Heartbeat)).unwrap();
        assert_eq!(s.lease_status(&node), LeaseStatus::Up, "up again after its next heartbeat");
    }

    #[test]
    fn heartbeats_too_close_together_are_refused() {
        let mut s = genesis();
        s.begin_block(1, 1_000);
        s.apply(&signed(10, 0, Payload::Heartbeat)).unwrap();
        s.begin_block(2, 1_050);
        assert!(matches!(
            s.apply(&signed(10, 1, Payload::Heartbeat)),
            Err(TxError::HeartbeatTooSoon { gap_ms: 50, .. })
        ));
        s.begin_block(3, 1_100);
        s.apply(&signed(10, 1, Payload::Heartbeat)).unwrap();
    }
}
