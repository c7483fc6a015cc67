//! The node registry: `RegisterNode`, `UpdateNode`, `LeaveNode`.
//!
//! A node is registered by a sponsoring account (which pays the fee and becomes its owner) with a
//! descriptor signed by the node's own key, so nobody registers a key they do not hold. The owner
//! or the node itself may update or remove it. Validators are fixed by the genesis and cannot
//! leave (changing the validator set needs epochs, a later issue).

use crate::state::{NodeRecord, Receipt, State};
use crate::tx::TxError;
use archipel_crypto::SignedDescriptor;
use archipel_types::NodeId;

impl State {
    fn check_descriptor(descriptor: &SignedDescriptor) -> Result<(), TxError> {
        descriptor.verify().map_err(|e| TxError::NotAllowed(format!("invalid node descriptor: {e}")))
    }

    fn check_controls(&self, signer: NodeId, node: NodeId) -> Result<&NodeRecord, TxError> {
        let rec = self.nodes.get(&node).ok_or_else(|| {
            TxError::NotAllowed(format!("node {} is not registered (see `archipel nodes`)", node.short()))
        })?;
        if signer != node && signer != rec.owner {
            return Err(TxError::NotAllowed(format!(
                "{} may not change node {}: only the node itself or its owner {} may",
                signer.short(),
                node.short(),
                rec.owner.short()
            )));
        }
        Ok(rec)
    }

    /// Checks that `signer` may register `descriptor`'s node, without changing anything.
    pub(crate) fn check_register(&self, descriptor: &SignedDescriptor) -> Result<(), TxError> {
        Self::check_descriptor(descriptor)?;
        let node = descriptor.descriptor.node_id;
        if self.nodes.contains_key(&node) {
            return Err(TxError::NotAllowed(format!(
                "node {} is already registered: use UpdateNode to change it",
                node.short()
            )));
        }
        Ok(())
    }

    /// Registers the node; only after [`State::check_register`].
    pub(crate) fn apply_register(&mut self, signer: NodeId, descriptor: &SignedDescriptor) -> Receipt {
        let node = descriptor.descriptor.node_id;
        self.nodes.insert(node, NodeRecord { descriptor: descriptor.clone(), owner: signer });
        self.open_lease(node);
        Receipt::NodeRegistered { node, owner: signer }
    }

    /// Checks that `signer` may replace the node's descriptor, without changing anything.
    pub(crate) fn check_update(&self, signer: NodeId, descriptor: &SignedDescriptor) -> Result<(), TxError> {
        Self::check_descriptor(descriptor)?;
        self.check_controls(signer, descriptor.descriptor.node_id).map(|_| ())
    }

    /// Replaces the descriptor (the owner stays); only after [`State::check_update`].
    pub(crate) fn apply_update(&mut self, descriptor: &SignedDescriptor) -> Receipt {
        let node = descriptor.descriptor.node_id;
        if let Some(rec) = self.nodes.get_mut(&node) {
            rec.descriptor = descriptor.clone();
        }
        Receipt::NodeUpdated { node }
    }

    /// Checks that `signer` may remove `node`, without changing anything.
    pub(crate) fn check_leave(&self, signer: NodeId, node: NodeId) -> Result<(), TxError> {
        self.check_controls(signer, node)?;
        if self.validators.contains(&node) {
            return Err(TxError::NotAllowed(format!(
                "node {} is a validator: the validator set is fixed by the genesis",
                node.short()
            )));
        }
        Ok(())
    }

    /// Removes the node and its lease; only after [`State::check_leave`].
    pub(crate) fn apply_leave(&mut self, node: NodeId) -> Receipt {
        self.nodes.remove(&node);
        self.leases.remove(&node);
        Receipt::NodeLeft { node }
    }
}

#[cfg(test)]
mod tests {
    use crate::state::tests::{genesis, id, signed};
    use crate::state::{LeaseStatus, Receipt};
    use crate::tx::{Payload, TxError};
    use archipel_crypto::SignedDescriptor;
    use archipel_crypto::test_support::example_descriptor;

    fn descriptor(seed: u64) -> SignedDescriptor {
        SignedDescriptor::sign(&id(seed), example_descriptor(&id(seed))).unwrap()
    }

    #[test]
    fn a_sponsor_registers_updates_and_removes_a_node() {
        let mut s = genesis();
        let node = id(20).node_id();
        let r = s.apply(&signed(0, 0, Payload::RegisterNode { descriptor: descriptor(20) })).unwrap();
        assert_eq!(r, Receipt::NodeRegistered { node, owner: id(0).node_id() });
        assert!(s.nodes().contains_key(&node));
        // Down until it proves it is alive; the owner updates it.
        assert_eq!(s.lease_status(&node), LeaseStatus::Down);
        s.begin_block(1, 500);
        let proof = crate::AliveProof::sign(&id(20), &s.network(), 0);
        s.apply_liveness(&crate::LivenessChange::Up { node, proof }).unwrap();
        assert_eq!(s.lease_status(&node), LeaseStatus::Up);
        let mut d = example_descriptor(&id(20));
        d.name = "renamed".into();
        let d = SignedDescriptor::sign(&id(20), d).unwrap();
        s.apply(&signed(0, 1, Payload::UpdateNode { descriptor: d })).unwrap();
        assert_eq!(s.nodes()[&node].descriptor.descriptor.name, "renamed");
        // A stranger may not remove it; the node itself may.
        assert!(matches!(s.apply(&signed(1, 0, Payload::LeaveNode { node })), Err(TxError::NotAllowed(_))));
        s.apply(&signed(20, 0, Payload::LeaveNode { node })).unwrap_err(); // no money for the fee
        s.apply(&signed(0, 2, Payload::LeaveNode { node })).unwrap();
        assert!(!s.nodes().contains_key(&node));
        assert_eq!(s.lease_status(&node), LeaseStatus::Down);
    }

    #[test]
    fn bad_registrations_are_refused_whole() {
        let mut s = genesis();
        let root = s.state_root();
        let mut forged = descriptor(21);
        forged.descriptor.name = "tampered".into();
        let e = s.apply(&signed(0, 0, Payload::RegisterNode { descriptor: forged })).unwrap_err();
        assert!(e.to_string().contains("invalid node descriptor"), "{e}");
        let e = s.apply(&signed(0, 0, Payload::RegisterNode { descriptor: descriptor(10) })).unwrap_err();
        assert!(e.to_string().contains("already registered"), "{e}");
        let e = s.apply(&signed(10, 0, Payload::LeaveNode { node: id(10).node_id() })).unwrap_err();
        assert!(e.to_string().contains("validator set is fixed"), "{e}");
        assert_eq!(s.state_root(), root);
    }
}
