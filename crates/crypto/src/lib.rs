//! Identity keys, signed node descriptors, HTTP request signing and client-side object encryption.
//!
//! Every archipel actor — node or tenant — is an Ed25519 key. This crate owns how keys are stored
//! on disk, how things are signed (always under a namespace, so a signature made for one purpose can
//! never be replayed for another), and the one implementation of request signing that both the CLI
//! client and the node's HTTP server use.

mod admission;
mod descriptor;
mod keys;
mod memo;
mod object;
mod request;

pub use admission::{Admission, Approval, quorum};
pub use descriptor::SignedDescriptor;

/// Fixtures for tests in this and other crates.
pub mod test_support {
    pub use crate::descriptor::example_descriptor;
}
pub use keys::{Identity, KeyFileError, SignatureItem, public_key, verify_signature, verify_signatures};
pub use memo::{verify_signature_memo, verify_signatures_memo};
pub use object::{DataKey, ObjectCipher, ObjectCryptoError, TAG_BYTES, WRAPPED_KEY_BYTES, WrapKey};
pub use request::{
    AuthError, HEADER_KEY, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP, MAX_CLOCK_SKEW_MS, RequestVerifier,
    SignedRequestHeaders, sign_request, sign_request_prehashed,
};

/// Re-export of the underlying key types for crates that talk to commonware directly.
pub use commonware_cryptography::ed25519::{PrivateKey as Ed25519PrivateKey, PublicKey as Ed25519PublicKey};

/// Signature namespaces: a signature is only valid for the purpose it was made for.
pub mod namespace {
    /// Node descriptors.
    pub const DESCRIPTOR: &[u8] = b"archipel/descriptor/v1";
    /// Validator approvals of nodes joining after genesis.
    pub const ADMISSION: &[u8] = b"archipel/admission/v1";
    /// Signed HTTP requests.
    pub const REQUEST: &[u8] = b"archipel/request/v1";
}

/// Errors from verifying signed data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The bytes are not a valid Ed25519 public key.
    #[error("{0} is not a valid Ed25519 public key")]
    BadPublicKey(String),
    /// The signature does not verify.
    #[error("signature by {0} does not verify")]
    BadSignature(String),
    /// The signed content is malformed.
    #[error("{0}")]
    Invalid(String),
}
