//! Transactions: who signs, which per-account nonce, what payload; signed under a namespace over
//! an explicit, versioned encoding.
//!
//! Each payload kind has its own variant and its own `apply` function in [`crate::state`], so later
//! issues (storage, market) add kinds without touching consensus code.

use archipel_crypto::{Identity, verify_signature};
use archipel_types::NodeId;
use serde::{Deserialize, Serialize};

/// Signature namespace of ledger transactions.
pub const NAMESPACE: &[u8] = b"archipel/tx/v1";

/// What a transaction does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// Move `amount_micro` from the signer to `to`.
    Transfer {
        /// Recipient.
        to: NodeId,
        /// Amount in micro-units.
        amount_micro: u64,
    },
    /// Renew the signer node's liveness lease.
    Heartbeat,
}

/// An unsigned transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// The signing account.
    pub signer: NodeId,
    /// The signer's next nonce (starts at 0, +1 per applied transaction).
    pub nonce: u64,
    /// What to do.
    pub payload: Payload,
}

/// Why a transaction was refused. Nothing of a refused transaction is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The signature does not verify.
    #[error("signature by {0} does not verify")]
    BadSignature(String),
    /// Wrong nonce (a replay or a gap).
    #[error("nonce {got} is not the account's next nonce {expected}")]
    BadNonce {
        /// Expected nonce.
        expected: u64,
        /// Given nonce.
        got: u64,
    },
    /// Not enough balance.
    #[error("balance {balance_micro} is less than {needed_micro}")]
    InsufficientFunds {
        /// Available.
        balance_micro: u64,
        /// Needed.
        needed_micro: u64,
    },
    /// The signer may not do this.
    #[error("{0}")]
    NotAllowed(String),
    /// The amount would overflow.
    #[error("amount overflows")]
    Overflow,
}

impl Transaction {
    /// The bytes that are signed: tag, signer, nonce, payload kind and fields.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = b"archipel/tx/v1".to_vec();
        out.extend_from_slice(self.signer.as_bytes());
        out.extend_from_slice(&self.nonce.to_be_bytes());
        match &self.payload {
            Payload::Transfer { to, amount_micro } => {
                out.push(1);
                out.extend_from_slice(to.as_bytes());
                out.extend_from_slice(&amount_micro.to_be_bytes());
            }
            Payload::Heartbeat => out.push(2),
        }
        out
    }

    /// Signs with `identity`, which must be the signer.
    pub fn sign(self, identity: &Identity) -> SignedTransaction {
        let signature = hex::encode(identity.sign(NAMESPACE, &self.signing_bytes()));
        SignedTransaction { tx: self, signature }
    }
}

/// A transaction with its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTransaction {
    /// The transaction.
    pub tx: Transaction,
    /// Hex Ed25519 signature by `tx.signer`.
    pub signature: String,
}

impl SignedTransaction {
    /// Checks the signature.
    pub fn verify(&self) -> Result<(), TxError> {
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig).map_err(|_| TxError::BadSignature(self.tx.signer.short()))?;
        verify_signature(&self.tx.signer, NAMESPACE, &self.tx.signing_bytes(), &sig)
            .map_err(|_| TxError::BadSignature(self.tx.signer.short()))
    }

    /// The transaction hash (BLAKE3 of signing bytes and signature).
    pub fn hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&self.tx.signing_bytes());
        h.update(self.signature.as_bytes());
        *h.finalize().as_bytes()
    }
}
