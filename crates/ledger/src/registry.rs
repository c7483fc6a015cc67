//! The node registry: `RegisterNode`, `UpdateNode`, `LeaveNode`.
//!
//! A node is registered by a sponsoring account (which pays the fee, locks the deposit and becomes
//! its owner) with a descriptor signed by the node's own key and the node's *consent*: its
//! signature over the network, the sponsor and the descriptor, so nobody registers a key they do
//! not hold and nobody can take a gossiped descriptor and register the node to themselves. The
//! registry holds at most `max_registered_nodes` nodes (every node's p2p peer limit is sized from
//! it). Descriptor versions only go up: an update needs a newer version than the registered one,
//! and a node that left is remembered (a tombstone with its last version) so its old consent
//! cannot register it again. The owner or the node itself may update or remove it; removal
//! returns the deposit to the owner. Validators are fixed by the genesis and cannot leave
//! (changing the validator set needs epochs, a later issue).

use crate::state::{NodeRecord, Receipt, State};
use crate::tx::{CONSENT_NAMESPACE, TxError, consent_bytes};
use archipel_crypto::{SignedDescriptor, verify_signature};
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

    /// Checks that `signer` may register `descriptor`'s node with `consent` and can lock the
    /// deposit besides paying `fee`, without changing anything.
    pub(crate) fn check_register(
        &self,
        signer: NodeId,
        fee: u64,
        descriptor: &SignedDescriptor,
        consent: &[u8; 64],
    ) -> Result<(), TxError> {
        // The checks that need no signature first: a registration refused anyway costs no
        // signature check (mempool admission runs them under the chain's lock).
        self.check_register_cheap(signer, fee, descriptor)?;
        Self::check_descriptor(descriptor)?;
        let node = descriptor.descriptor.node_id;
        verify_signature(&node, CONSENT_NAMESPACE, &consent_bytes(&self.network, &signer, descriptor), consent)
            .map_err(|_| TxError::NoConsent { node: node.short(), owner: signer.short() })?;
        Ok(())
    }

    /// [`State::check_register`] without its two signature checks.
    pub(crate) fn check_register_cheap(
        &self,
        signer: NodeId,
        fee: u64,
        descriptor: &SignedDescriptor,
    ) -> Result<(), TxError> {
        let node = descriptor.descriptor.node_id;
        if self.nodes.contains_key(&node) {
            return Err(TxError::NotAllowed(format!(
                "node {} is already registered: use UpdateNode to change it",
                node.short()
            )));
        }
        let max = self.params.max_registered_nodes;
        if self.nodes.len() >= max as usize {
            return Err(TxError::RegistryFull { registered: self.nodes.len(), max });
        }
        if let Some(left) = self.departed_version(&node)
            && descriptor.descriptor.version <= left
        {
            return Err(TxError::StaleDescriptor {
                node: node.short(),
                current: left,
                got: descriptor.descriptor.version,
                context: "the version it left the registry with",
            });
        }
        let deposit_micro = self.params.node_deposit_micro;
        if let Some(balance_micro) = self.short_of(signer, deposit_micro, fee) {
            return Err(TxError::InsufficientDeposit { balance_micro, deposit_micro, fee_micro: fee });
        }
        Ok(())
    }

    /// Registers the node and locks the deposit; only after [`State::check_register`].
    pub(crate) fn apply_register(&mut self, signer: NodeId, descriptor: &SignedDescriptor) -> Receipt {
        let node = descriptor.descriptor.node_id;
        let deposit_micro = self.params.node_deposit_micro;
        self.update_account(signer, |a| a.balance_micro -= deposit_micro);
        // A node that left may still be listed as a holder, and may come back from anywhere: its
        // shards are checked against their fences as a moved node's are.
        let returning = self.departed_version(&node).is_some();
        self.departed.set(node, None);
        self.nodes.insert(
            node,
            NodeRecord { descriptor: descriptor.clone(), owner: signer, deposit_micro, relocated: returning },
        );
        self.open_lease(node);
        Receipt::NodeRegistered { node, owner: signer, deposit_micro }
    }

    /// Checks that `signer` may replace the node's descriptor with a newer one, without changing
    /// anything.
    pub(crate) fn check_update(&self, signer: NodeId, descriptor: &SignedDescriptor) -> Result<(), TxError> {
        self.check_update_cheap(signer, descriptor)?;
        Self::check_descriptor(descriptor)
    }

    /// [`State::check_update`] without the descriptor's signature check.
    pub(crate) fn check_update_cheap(&self, signer: NodeId, descriptor: &SignedDescriptor) -> Result<(), TxError> {
        let node = descriptor.descriptor.node_id;
        let registered = self.check_controls(signer, node)?.descriptor.descriptor.version;
        if descriptor.descriptor.version <= registered {
            return Err(TxError::StaleDescriptor {
                node: node.short(),
                current: registered,
                got: descriptor.descriptor.version,
                context: "the registered one",
            });
        }
        Ok(())
    }

    /// Replaces the descriptor (the owner stays); only after [`State::check_update`].
    pub(crate) fn apply_update(&mut self, descriptor: &SignedDescriptor) -> Receipt {
        let node = descriptor.descriptor.node_id;
        let to = &descriptor.descriptor;
        self.nodes.update_existing(&node, |rec| {
            let from = &rec.descriptor.descriptor;
            rec.relocated |= (&from.region, from.country, from.operator_jurisdiction)
                != (&to.region, to.country, to.operator_jurisdiction);
            rec.descriptor = descriptor.clone();
        });
        Receipt::NodeUpdated { node }
    }

    /// Checks that `signer` may remove `node` and its deposit can go back to the owner, without
    /// changing anything.
    pub(crate) fn check_leave(&self, signer: NodeId, node: NodeId) -> Result<(), TxError> {
        let rec = self.check_controls(signer, node)?;
        if self.validators.contains(&node) {
            return Err(TxError::NotAllowed(format!(
                "node {} is a validator: the validator set is fixed by the genesis",
                node.short()
            )));
        }
        self.account(&rec.owner).balance_micro.checked_add(rec.deposit_micro).ok_or(TxError::Overflow)?;
        Ok(())
    }

    /// Removes the node and its lease, returns the deposit to the owner and remembers the node's
    /// last descriptor version; only after [`State::check_leave`].
    pub(crate) fn apply_leave(&mut self, node: NodeId) -> Receipt {
        self.leases.set(node, None);
        let Some(rec) = self.nodes.remove(&node) else {
            return Receipt::NodeLeft { node, owner: node, deposit_micro: 0 };
        };
        self.update_account(rec.owner, |a| a.balance_micro += rec.deposit_micro);
        self.departed.set(node, Some(rec.descriptor.descriptor.version));
        Receipt::NodeLeft { node, owner: rec.owner, deposit_micro: rec.deposit_micro }
    }
}

#[cfg(test)]
mod tests {
    use crate::Hash;
    use crate::state::tests::{genesis, id, signed};
    use crate::state::{LeaseStatus, Receipt, State};
    use crate::tx::{Payload, TxError};
    use archipel_crypto::SignedDescriptor;
    use archipel_crypto::test_support::example_descriptor;

    /// The test genesis with a deposit the test accounts can afford (account 0 has 1,000).
    fn registry_genesis() -> State {
        let mut s = genesis();
        s.params_mut().node_deposit_micro = 100;
        s
    }

    fn descriptor_v(seed: u64, version: u64) -> SignedDescriptor {
        let mut d = example_descriptor(&id(seed));
        d.version = version;
        SignedDescriptor::sign(&id(seed), d).unwrap()
    }

    fn descriptor(seed: u64) -> SignedDescriptor {
        descriptor_v(seed, 1)
    }

    /// A RegisterNode of node `seed` with its consent to be owned by account `owner`.
    fn register(seed: u64, owner: u64, d: SignedDescriptor) -> Payload {
        Payload::register_node(&id(seed), &Hash::ZERO, &id(owner).node_id(), d)
    }

    #[test]
    fn a_sponsor_registers_updates_and_removes_a_node() {
        let mut s = registry_genesis();
        let node = id(20).node_id();
        let r = s.apply(&signed(0, 0, register(20, 0, descriptor(20)))).unwrap();
        assert_eq!(r, Receipt::NodeRegistered { node, owner: id(0).node_id(), deposit_micro: 100 });
        assert!(s.nodes().contains_key(&node));
        // Down until it proves it is alive; the owner updates it.
        assert_eq!(s.lease_status(&node), LeaseStatus::Down);
        s.begin_block(1, 500);
        let proof = crate::AliveProof::sign(&id(20), &s.network(), 0);
        s.apply_liveness(&crate::LivenessChange::Up { node, proof }).unwrap();
        assert_eq!(s.lease_status(&node), LeaseStatus::Up);
        let mut d = example_descriptor(&id(20));
        d.name = "renamed".into();
        d.version = 2;
        let d = SignedDescriptor::sign(&id(20), d).unwrap();
        s.apply(&signed(0, 1, Payload::UpdateNode { descriptor: d })).unwrap();
        assert_eq!(s.nodes().get(&node).unwrap().descriptor.descriptor.name, "renamed");
        // A stranger may not remove it; the node itself may.
        assert!(matches!(s.apply(&signed(1, 0, Payload::LeaveNode { node })), Err(TxError::NotAllowed(_))));
        s.apply(&signed(20, 0, Payload::LeaveNode { node })).unwrap_err(); // no money for the fee
        s.apply(&signed(0, 2, Payload::LeaveNode { node })).unwrap();
        assert!(!s.nodes().contains_key(&node));
        assert_eq!(s.lease_status(&node), LeaseStatus::Down);
    }

    #[test]
    fn registry_changes_refused_anyway_are_refused_before_any_signature_is_checked() {
        let mut s = registry_genesis();
        s.apply(&signed(0, 0, register(20, 0, descriptor(20)))).unwrap();
        // Forged descriptor and consent signatures: `precheck` must answer from the rules alone.
        let forge = |mut d: SignedDescriptor| {
            d.descriptor.name = "tampered".into();
            d
        };
        let check = |payload: Payload| s.precheck(&signed(1, 0, payload), 200).map_err(|e| e.code());
        let stranger_update = Payload::UpdateNode { descriptor: forge(descriptor_v(20, 2)) };
        assert_eq!(check(stranger_update), Err("not_allowed"), "account 1 does not control node 20");
        let stale = Payload::UpdateNode { descriptor: forge(descriptor_v(20, 1)) };
        assert_eq!(s.precheck(&signed(0, 1, stale), 200).map_err(|e| e.code()), Err("stale_descriptor"));
        let Payload::RegisterNode { descriptor, mut consent } = register(20, 1, descriptor(20)) else { unreachable!() };
        consent[0] ^= 1;
        let again = Payload::RegisterNode { descriptor: forge(descriptor), consent };
        assert_eq!(check(again), Err("not_allowed"), "already registered");
        let validator = Payload::LeaveNode { node: id(10).node_id() };
        assert_eq!(s.precheck(&signed(10, 0, validator), 200).map_err(|e| e.code()), Err("not_allowed"));
        // What passes the rules still has its signatures checked, by `admit`.
        let owner_update = signed(0, 1, Payload::UpdateNode { descriptor: forge(descriptor_v(20, 2)) });
        assert_eq!(s.precheck(&owner_update, 200), Ok(()));
        assert!(s.admit(&owner_update, 200).unwrap_err().to_string().contains("invalid node descriptor"));
    }

    #[test]
    fn bad_registrations_are_refused_whole() {
        let mut s = registry_genesis();
        let root = s.state_root();
        let mut forged = descriptor(21);
        forged.descriptor.name = "tampered".into();
        let e = s.apply(&signed(0, 0, register(21, 0, forged))).unwrap_err();
        assert!(e.to_string().contains("invalid node descriptor"), "{e}");
        let e = s.apply(&signed(0, 0, register(10, 0, descriptor(10)))).unwrap_err();
        assert!(e.to_string().contains("already registered"), "{e}");
        let e = s.apply(&signed(10, 0, Payload::LeaveNode { node: id(10).node_id() })).unwrap_err();
        assert!(e.to_string().contains("validator set is fixed"), "{e}");
        assert_eq!(s.state_root(), root);
    }

    #[test]
    fn registration_locks_the_deposit_and_leaving_returns_it_to_the_owner() {
        let mut s = registry_genesis();
        let total = s.total_micro();
        let (sponsor, node) = (id(0).node_id(), id(20).node_id());
        s.apply(&signed(0, 0, register(20, 0, descriptor(20)))).unwrap();
        assert_eq!(s.account(&sponsor).balance_micro, 1_000 - 100 - 1, "deposit and fee");
        assert_eq!(s.nodes().get(&node).unwrap().deposit_micro, 100);
        assert_eq!(s.total_micro(), total, "the deposit is counted");
        // The record, deposit included, is committed by the state root.
        let before = s.state_root();
        let mut other = s.clone();
        other.nodes.update_existing(&node, |r| r.deposit_micro = 99).unwrap();
        assert_ne!(other.state_root(), before);

        // The node leaves on its own key (funded for the fee): the deposit goes to the owner.
        s.apply(&signed(0, 1, Payload::Transfer { to: node, amount_micro: 10 })).unwrap();
        let r = s.apply(&signed(20, 0, Payload::LeaveNode { node })).unwrap();
        assert_eq!(r, Receipt::NodeLeft { node, owner: sponsor, deposit_micro: 100 });
        assert_eq!(s.account(&sponsor).balance_micro, 1_000 - 1 - 10 - 1);
        assert_eq!(s.account(&node).balance_micro, 9);
        assert_eq!(s.total_micro(), total);

        // Account 1 holds 500: not enough for a 600 deposit plus the fee; the error names both.
        s.params_mut().node_deposit_micro = 600;
        let root = s.state_root();
        let e = s.apply(&signed(1, 0, register(21, 1, descriptor(21)))).unwrap_err();
        assert_eq!(e, TxError::InsufficientDeposit { balance_micro: 500, deposit_micro: 600, fee_micro: 1 });
        assert!(e.to_string().contains("600 deposit") && e.to_string().contains("1 fee"), "{e}");
        assert_eq!(e.code(), "insufficient_funds");
        assert_eq!(s.state_root(), root, "nothing changed");
        // Admission refuses it too, before it reaches a block.
        let stx = signed(1, 0, register(21, 1, descriptor(21)));
        assert!(matches!(s.admit(&stx, 1_000), Err(TxError::InsufficientDeposit { .. })));
    }

    #[test]
    fn a_full_registry_refuses_registrations_until_a_node_leaves() {
        let mut s = registry_genesis();
        s.params_mut().max_registered_nodes = 3; // the genesis validator and two more
        s.apply(&signed(0, 0, register(20, 0, descriptor(20)))).unwrap();
        s.apply(&signed(0, 1, register(21, 0, descriptor(21)))).unwrap();
        let root = s.state_root();
        let e = s.apply(&signed(0, 2, register(22, 0, descriptor(22)))).unwrap_err();
        assert_eq!(e, TxError::RegistryFull { registered: 3, max: 3 });
        assert!(e.to_string().contains("registry is full (3 of 3") && e.to_string().contains("max_registered_nodes"));
        assert_eq!(e.code(), "registry_full");
        assert_eq!(s.state_root(), root);
        s.apply(&signed(0, 2, Payload::LeaveNode { node: id(21).node_id() })).unwrap();
        s.apply(&signed(0, 3, register(22, 0, descriptor(22)))).unwrap();
        assert_eq!(s.nodes().len(), 3);
    }

    #[test]
    fn only_the_sponsor_the_node_consented_to_can_register_it() {
        let mut s = registry_genesis();
        let root = s.state_root();
        // Account 1 saw the node's registration (or just its gossiped descriptor) and submits it
        // first under its own key: refused, the consent names account 0.
        let front_run = signed(1, 0, register(20, 0, descriptor(20)));
        let e = s.apply(&front_run).unwrap_err();
        assert_eq!(e, TxError::NoConsent { node: id(20).node_id().short(), owner: id(1).node_id().short() });
        assert_eq!(e.code(), "no_consent");
        // A consent signed by the sponsor instead of the node, for another network, or for
        // another descriptor does not count either.
        let by_sponsor = Payload::register_node(&id(1), &Hash::ZERO, &id(1).node_id(), descriptor(20));
        let other_network = Payload::register_node(&id(20), &Hash([7; 32]), &id(1).node_id(), descriptor(20));
        let Payload::RegisterNode { consent, .. } = register(20, 1, descriptor(20)) else { unreachable!() };
        let other_descriptor = Payload::RegisterNode { descriptor: descriptor_v(20, 2), consent };
        for p in [by_sponsor, other_network, other_descriptor] {
            assert!(matches!(s.apply(&signed(1, 0, p)), Err(TxError::NoConsent { .. })));
        }
        assert_eq!(s.state_root(), root);
        // The consented sponsor registers it.
        s.apply(&signed(0, 0, register(20, 0, descriptor(20)))).unwrap();
        assert_eq!(s.nodes().get(&id(20).node_id()).unwrap().owner, id(0).node_id());
    }

    #[test]
    fn a_node_that_left_needs_a_fresh_consent_to_register_again() {
        let mut s = registry_genesis();
        let node = id(20).node_id();
        let first = register(20, 0, descriptor_v(20, 5));
        s.apply(&signed(0, 0, first.clone())).unwrap();
        s.apply(&signed(0, 1, Payload::LeaveNode { node })).unwrap();
        assert_eq!(s.departed_version(&node), Some(5));
        // Replaying the old registration (same sponsor, same consent) is refused, naming versions.
        let root = s.state_root();
        let e = s.apply(&signed(0, 2, first)).unwrap_err();
        assert!(matches!(e, TxError::StaleDescriptor { current: 5, got: 5, .. }), "{e}");
        assert!(e.to_string().contains("version 5") && e.to_string().contains("left"), "{e}");
        assert_eq!(e.code(), "stale_descriptor");
        assert_eq!(s.state_root(), root);
        // The tombstone is committed by the state root.
        let mut other = s.clone();
        other.departed.set(node, None);
        assert_ne!(other.state_root(), root);
        // A new consent over a newer descriptor registers it again and clears the tombstone.
        s.apply(&signed(0, 2, register(20, 0, descriptor_v(20, 6)))).unwrap();
        assert_eq!(s.departed_version(&node), None);
    }

    #[test]
    fn the_largest_registration_fits_the_smallest_allowed_transaction_size() {
        use commonware_codec::EncodeSize as _;
        let mut d = example_descriptor(&id(20));
        d.name = "n".repeat(archipel_types::MAX_NAME_LEN);
        d.operator = "o".repeat(archipel_types::MAX_OPERATOR_LEN);
        d.roles = "validator,storage,compute,gateway".parse().unwrap();
        d.p2p_address = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().unwrap();
        d.api_address = d.p2p_address;
        d.p2p_egress_ip = Some("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap());
        d.capacity = archipel_types::ByteSize(u64::MAX);
        d.version = u64::MAX;
        let d = SignedDescriptor::sign(&id(20), d).unwrap();
        let stx = signed(0, u64::MAX, register(20, 0, d));
        let smallest = crate::params::MIN_MAX_TX_BYTES as usize;
        assert!(stx.encode_size() <= smallest, "{} > {smallest}", stx.encode_size());
    }

    #[test]
    fn an_update_must_carry_a_newer_descriptor_version() {
        let mut s = registry_genesis();
        s.apply(&signed(0, 0, register(20, 0, descriptor_v(20, 5)))).unwrap();
        let root = s.state_root();
        for (nonce, older) in [(1, 4), (1, 5)] {
            let e =
                s.apply(&signed(0, nonce, Payload::UpdateNode { descriptor: descriptor_v(20, older) })).unwrap_err();
            assert_eq!(
                e,
                TxError::StaleDescriptor {
                    node: id(20).node_id().short(),
                    current: 5,
                    got: older,
                    context: "the registered one"
                }
            );
            assert!(e.to_string().contains(&format!("version {older}")) && e.to_string().contains("version 5"), "{e}");
        }
        assert_eq!(s.state_root(), root);
        s.apply(&signed(0, 1, Payload::UpdateNode { descriptor: descriptor_v(20, 6) })).unwrap();
        assert_eq!(s.nodes().get(&id(20).node_id()).unwrap().descriptor.descriptor.version, 6);
    }
}
