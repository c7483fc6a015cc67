//! Admission of a node after genesis: a quorum of genesis validators signs the new node's
//! descriptor for one network (bound to the genesis hash).
//!
//! Until the ledger records `RegisterNode` transactions, this is how the member set grows: a node
//! whose key is not in genesis is admitted — at the p2p layer and in every peer table — once it
//! presents an admission approved by more than two thirds of the validators.

use crate::{CryptoError, Identity, SignedDescriptor, namespace, verify_signature};
use archipel_types::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One validator's approval.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Approval {
    /// The approving validator.
    pub validator: NodeId,
    /// Hex signature over [`Admission::signing_bytes`].
    pub signature: String,
}

/// A node admitted to a network after genesis.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Admission {
    /// Hash of the genesis of the network the node joins.
    pub genesis_hash: String,
    /// The admitted node's signed descriptor.
    pub descriptor: SignedDescriptor,
    /// Validator approvals.
    pub approvals: Vec<Approval>,
}

/// Approvals needed among `validators` validators: more than two thirds (2f+1 of 3f+1).
pub fn quorum(validators: usize) -> usize {
    validators - validators.saturating_sub(1) / 3
}

impl Admission {
    /// The bytes each validator signs.
    pub fn signing_bytes(genesis_hash: &str, descriptor: &SignedDescriptor) -> Vec<u8> {
        let mut out = b"archipel/admission/v1".to_vec();
        out.extend_from_slice(genesis_hash.as_bytes());
        out.push(0);
        out.extend_from_slice(&descriptor.descriptor.signing_bytes());
        out
    }

    /// A new admission with no approvals yet.
    pub fn new(genesis_hash: &str, descriptor: SignedDescriptor) -> Self {
        Self { genesis_hash: genesis_hash.to_string(), descriptor, approvals: Vec::new() }
    }

    /// Adds `validator`'s approval (replacing an earlier one by the same key).
    pub fn approve(&mut self, validator: &Identity) {
        let sig = validator.sign(namespace::ADMISSION, &Self::signing_bytes(&self.genesis_hash, &self.descriptor));
        let id = validator.node_id();
        self.approvals.retain(|a| a.validator != id);
        self.approvals.push(Approval { validator: id, signature: hex::encode(sig) });
    }

    /// Number of distinct, valid approvals by members of `validators`.
    pub fn valid_approvals(&self, validators: &[NodeId]) -> usize {
        let msg = Self::signing_bytes(&self.genesis_hash, &self.descriptor);
        let allowed: BTreeSet<_> = validators.iter().collect();
        let mut counted = BTreeSet::new();
        for a in &self.approvals {
            let mut sig = [0u8; 64];
            if allowed.contains(&a.validator)
                && hex::decode_to_slice(&a.signature, &mut sig).is_ok()
                && verify_signature(&a.validator, namespace::ADMISSION, &msg, &sig).is_ok()
            {
                counted.insert(a.validator);
            }
        }
        counted.len()
    }

    /// Checks the descriptor, the network and the validator quorum.
    pub fn verify(&self, genesis_hash: &str, validators: &[NodeId]) -> Result<(), CryptoError> {
        if self.genesis_hash != genesis_hash {
            return Err(CryptoError::Invalid(format!(
                "admission is for network {} but this network's genesis is {}",
                short(&self.genesis_hash),
                short(genesis_hash)
            )));
        }
        self.descriptor.verify()?;
        let have = self.valid_approvals(validators);
        let need = quorum(validators.len());
        if have < need {
            return Err(CryptoError::Invalid(format!(
                "admission of {} has {have} valid validator approvals of the {need} required; ask more validators to run `archipel node admit`",
                self.descriptor.descriptor.node_id.short()
            )));
        }
        Ok(())
    }
}

fn short(h: &str) -> String {
    h.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newcomer() -> SignedDescriptor {
        let id = Identity::from_seed(50);
        SignedDescriptor::sign(&id, crate::descriptor::example_descriptor(&id)).unwrap()
    }

    #[test]
    fn quorum_is_more_than_two_thirds() {
        assert_eq!([1, 2, 3, 4, 5, 7, 10].map(quorum), [1, 2, 3, 3, 4, 5, 7]);
    }

    #[test]
    fn needs_a_quorum_of_distinct_genesis_validators_for_this_network() {
        let vals: Vec<Identity> = (0..4).map(Identity::from_seed).collect();
        let ids: Vec<NodeId> = vals.iter().map(Identity::node_id).collect();
        let mut a = Admission::new("gh", newcomer());
        a.approve(&vals[0]);
        a.approve(&vals[1]);
        a.approve(&vals[1]);
        let err = a.verify("gh", &ids).unwrap_err().to_string();
        assert!(err.contains("2 valid validator approvals of the 3"), "{err}");
        // A non-validator's approval does not count.
        a.approve(&Identity::from_seed(99));
        assert!(a.verify("gh", &ids).is_err());
        a.approve(&vals[3]);
        assert_eq!(a.verify("gh", &ids), Ok(()));
        assert!(a.verify("other", &ids).unwrap_err().to_string().contains("network"));
        // Changing the descriptor voids the approvals (and its own signature).
        let mut t = a.clone();
        t.descriptor.descriptor.p2p_address = "127.0.0.10:1".parse().unwrap();
        assert!(t.verify("gh", &ids).is_err());
    }
}
