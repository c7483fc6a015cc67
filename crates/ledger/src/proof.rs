//! Proofs checkable offline: a transaction in a block, a state entry after a block — or that a
//! key has no entry.
//!
//! A proof only shows that something is committed by a block header; that the header itself is
//! final is shown by the consensus certificate the node attaches (see the `consensus` crate).

use crate::block::BlockHeader;
use crate::hash::Hash;
use crate::merkle::{self, Step};
use crate::state::{Account, NodeRecord, StateKey, be_u64, state_key_hash};
use crate::trie::{Proven, TrieProof, value_hash};
use crate::tx::SignedTransaction;
use serde::{Deserialize, Serialize};

/// A transaction included in a block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxProof {
    /// The block header committing to the transaction.
    pub header: BlockHeader,
    /// Position in the block.
    pub index: u32,
    /// The transaction.
    pub tx: SignedTransaction,
    /// Path from the transaction hash to `header.tx_root`.
    pub path: Vec<Step>,
}

/// A state entry after a block, or its absence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateProof {
    /// The block header whose state root commits to the entry.
    pub header: BlockHeader,
    /// The entry's key (e.g. `account/<key>`).
    pub key: String,
    /// The entry's value bytes, hex; `null` when the proof shows the key has no entry.
    pub value_hex: Option<String>,
    /// The key's path in the state trie, from `header.state_root` down.
    pub path: TrieProof,
}

/// Why a proof does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("proof does not hold: {0}")]
pub struct ProofError(pub String);

impl TxProof {
    /// Checks the transaction's signature (made for `network`, the genesis hash) and that it is
    /// under the header's transaction root; returns the transaction hash.
    pub fn verify(&self, network: &Hash) -> Result<Hash, ProofError> {
        self.tx.verify(network).map_err(|e| ProofError(e.to_string()))?;
        let h = self.tx.hash();
        if merkle::root_from_path(h, &self.path) != self.header.tx_root {
            return Err(ProofError(format!(
                "transaction {} is not under the transaction root of block {}",
                h.short(),
                self.header.height
            )));
        }
        Ok(h)
    }
}

impl StateProof {
    /// Checks the claim — this value, or no entry — against the header's state root; returns the
    /// decoded value, `None` for a proven absence.
    pub fn verify(&self) -> Result<Option<serde_json::Value>, ProofError> {
        let key: StateKey = self.key.parse().map_err(ProofError)?;
        // One key, one spelling: the proof is about the canonical key it names.
        if key.to_string() != self.key {
            return Err(ProofError(format!("{:?} is not a canonical state key (write it as {key})", self.key)));
        }
        let value = match &self.value_hex {
            Some(v) => Some(hex::decode(v).map_err(|_| ProofError("value_hex is not hex".into()))?),
            None => None,
        };
        let shown = self
            .path
            .verify(&self.header.state_root, &state_key_hash(&key))
            .map_err(|e| ProofError(format!("{}: {e} (the state root of block {})", self.key, self.header.height)))?;
        match (shown, value) {
            (Proven::Present(h), Some(v)) if h == value_hash(&v) => {
                decode_value(&key, &v).map(Some).map_err(ProofError)
            }
            (Proven::Absent, None) => Ok(None),
            (Proven::Present(_), _) => Err(ProofError(format!(
                "{} = {} is not under the state root of block {}: the path shows another value",
                self.key,
                self.value_hex.as_deref().unwrap_or("no entry"),
                self.header.height
            ))),
            (Proven::Absent, Some(v)) => Err(ProofError(format!(
                "{} = {} is not under the state root of block {}: the path shows the key has no entry",
                self.key,
                hex::encode(v),
                self.header.height
            ))),
        }
    }
}

/// Turns the value bytes of a state entry into readable JSON.
pub fn decode_value(key: &StateKey, value: &[u8]) -> Result<serde_json::Value, String> {
    let json = |v: Result<serde_json::Value, serde_json::Error>| v.map_err(|e| e.to_string());
    match key {
        StateKey::Account(_) => {
            json(serde_json::to_value(Account { balance_micro: be_u64(value, 0)?, nonce: be_u64(value, 8)? }))
        }
        StateKey::Chain => {
            json(crate::state::decode_chain(value).map(serde_json::to_value).map_err(|e| e.to_string())?)
        }
        StateKey::Departed(_) => Ok(serde_json::json!({ "last_version": be_u64(value, 0)? })),
        StateKey::Lease(_) => {
            let status = match value.first() {
                Some(1) => "up",
                Some(0) => "down",
                _ => return Err("lease value has no status byte".into()),
            };
            Ok(
                serde_json::json!({ "status": status, "since_height": be_u64(value, 1)?, "since_ms": be_u64(value, 9)? }),
            )
        }
        StateKey::Bucket(_) => {
            json(serde_json::from_slice::<crate::storage::BucketRecord>(value).and_then(serde_json::to_value))
        }
        StateKey::Object(_) => {
            json(serde_json::from_slice::<crate::storage::ObjectRecord>(value).and_then(serde_json::to_value))
        }
        StateKey::Stored(_) => Ok(serde_json::json!({ "stored_bytes": be_u64(value, 0)? })),
        StateKey::Reputation(_) => Ok(serde_json::json!({ "reputation": crate::state::decode_u16(value)? })),
        StateKey::Revocations(_) => {
            json(serde_json::from_slice::<Vec<crate::Hash>>(value).and_then(serde_json::to_value))
        }
        StateKey::Job(_) => json(serde_json::from_slice::<archipel_market::Job>(value).and_then(serde_json::to_value)),
        StateKey::Record(_) => {
            json(serde_json::from_slice::<archipel_market::Record>(value).and_then(serde_json::to_value))
        }
        StateKey::Network => Ok(serde_json::json!({ "network": hex::encode(value) })),
        StateKey::Node(_) => json(serde_json::from_slice::<NodeRecord>(value).and_then(serde_json::to_value)),
        StateKey::Params => json(serde_json::from_slice(value)),
        StateKey::Validator(_) => Ok(serde_json::json!({ "validator": true })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Signatures, genesis_header, propose};
    use crate::state::tests::{genesis, id, transfer};

    #[test]
    fn tx_and_state_proofs_hold_and_fail_when_tampered() {
        let s = genesis();
        let p =
            propose(&s, &genesis_header(&s), 7, [], [transfer(0, 0, 1, 5), transfer(1, 0, 0, 3)], Signatures::Verify)
                .unwrap();
        let hashes: Vec<_> = p.block.txs.iter().map(SignedTransaction::hash).collect();
        let proof = TxProof {
            header: p.block.header,
            index: 1,
            tx: p.block.txs[1].clone(),
            path: merkle::path(&hashes, 1).unwrap(),
        };
        assert_eq!(proof.verify(&Hash::ZERO).unwrap(), hashes[1]);
        let mut bad = proof.clone();
        bad.tx = p.block.txs[0].clone();
        assert!(bad.verify(&Hash::ZERO).is_err());

        let key = StateKey::Account(id(1).node_id());
        let (value, path) = p.state.prove(&key).unwrap();
        let sp = StateProof { header: p.block.header, key: key.to_string(), value_hex: value.map(hex::encode), path };
        let v = sp.verify().unwrap().expect("present");
        assert_eq!(v["balance_micro"], 500 + 5 - 3 - 1);
        let mut bad = sp.clone();
        bad.value_hex = Some(hex::encode([0u8; 16]));
        assert!(bad.verify().unwrap_err().to_string().contains("shows another value"));
        let mut bad = sp.clone();
        bad.value_hex = None;
        assert!(bad.verify().is_err(), "a present entry cannot be passed off as absent");
        let mut bad = sp.clone();
        bad.key = StateKey::Account(id(0).node_id()).to_string();
        assert!(bad.verify().is_err());
        let mut bad = sp.clone();
        bad.header.state_root = Hash([7; 32]);
        assert!(bad.verify().is_err());
        // The same key spelled otherwise is not the key the proof is about.
        let mut bad = sp;
        bad.key = bad.key.to_uppercase().replace("ACCOUNT", "account");
        assert!(bad.verify().unwrap_err().to_string().contains("canonical"));

        // Absence: an account that never appeared.
        let key = StateKey::Account(id(77).node_id());
        let (value, path) = p.state.prove(&key).unwrap();
        let sp = StateProof { header: p.block.header, key: key.to_string(), value_hex: value.map(hex::encode), path };
        assert_eq!(sp.verify().unwrap(), None);
        let mut bad = sp;
        bad.value_hex = Some(hex::encode([0u8; 16]));
        assert!(bad.verify().unwrap_err().to_string().contains("shows the key has no entry"));
    }
}
