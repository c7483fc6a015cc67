//! Node descriptors signed by the node they describe.

use crate::{CryptoError, Identity, namespace, verify_signature};
use archipel_types::NodeDescriptor;
use serde::{Deserialize, Serialize};

/// A [`NodeDescriptor`] with the describing node's signature over its signing bytes.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SignedDescriptor {
    /// The descriptor.
    #[serde(flatten)]
    pub descriptor: NodeDescriptor,
    /// Hex Ed25519 signature by `descriptor.node_id` over [`NodeDescriptor::signing_bytes`].
    pub signature: String,
}

impl SignedDescriptor {
    /// Signs `descriptor` with `identity`, which must be the described node's key.
    pub fn sign(identity: &Identity, descriptor: NodeDescriptor) -> Result<Self, CryptoError> {
        if identity.node_id() != descriptor.node_id {
            return Err(CryptoError::Invalid(format!(
                "descriptor describes node {} but the key is {}",
                descriptor.node_id.short(),
                identity.node_id().short()
            )));
        }
        let signature = hex::encode(identity.sign(namespace::DESCRIPTOR, &descriptor.signing_bytes()));
        Ok(Self { descriptor, signature })
    }

    /// Checks the fields and that the described node signed exactly this descriptor.
    pub fn verify(&self) -> Result<(), CryptoError> {
        let d = &self.descriptor;
        d.validate().map_err(|e| CryptoError::Invalid(e.to_string()))?;
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig).map_err(|_| CryptoError::BadSignature(d.node_id.short()))?;
        verify_signature(&d.node_id, namespace::DESCRIPTOR, &d.signing_bytes(), &sig)
    }
}

/// A valid example descriptor of `id`'s node, for tests in this and other crates.
pub fn example_descriptor(id: &Identity) -> NodeDescriptor {
    NodeDescriptor {
        node_id: id.node_id(),
        name: "n01".into(),
        operator: "acme".into(),
        region: "eu-de".parse().unwrap(),
        country: "DE".parse().unwrap(),
        operator_jurisdiction: "DE".parse().unwrap(),
        capacity: "1GiB".parse().unwrap(),
        roles: "storage".parse().unwrap(),
        p2p_address: "127.0.0.2:1".parse().unwrap(),
        p2p_egress_ip: None,
        api_address: "127.0.0.2:2".parse().unwrap(),
        version: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_and_detects_tampering() {
        let id = Identity::from_seed(3);
        let signed = SignedDescriptor::sign(&id, example_descriptor(&id)).unwrap();
        assert_eq!(signed.verify(), Ok(()));

        let mut tampered = signed.clone();
        tampered.descriptor.operator_jurisdiction = "US".parse().unwrap();
        assert!(matches!(tampered.verify(), Err(CryptoError::BadSignature(_))));

        let json = serde_json::to_string(&signed).unwrap();
        let back: SignedDescriptor = serde_json::from_str(&json).unwrap();
        assert_eq!(back.verify(), Ok(()));

        let other = Identity::from_seed(4);
        assert!(SignedDescriptor::sign(&other, example_descriptor(&id)).is_err());
    }
}
