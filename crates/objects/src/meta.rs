//! An object's metadata — content type, the other representation headers, and S3 user
//! metadata — sealed with the object's data key into its manifest, so holders and validators see
//! only ciphertext, and the manifest root the ledger records vouches for it.

use archipel_crypto::{DataKey, ObjectCipher};
use archipel_ledger::storage::MAX_MANIFEST_META_BYTES;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The segment index the metadata is sealed under: one no segment reaches.
const META_INDEX: u64 = u64::MAX;

/// Most bytes of metadata, before sealing (room for the tag within the manifest's bound).
pub const MAX_META_BYTES: usize = MAX_MANIFEST_META_BYTES - archipel_crypto::TAG_BYTES;

/// What an object says about itself besides its bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// `Content-Type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// `Content-Encoding`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// `Content-Disposition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_disposition: Option<String>,
    /// `Content-Language`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_language: Option<String>,
    /// `Cache-Control`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<String>,
    /// S3 user metadata (`x-amz-meta-NAME`), by lowercase name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub user: BTreeMap<String, String>,
}

/// Why metadata could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Too large for a manifest.
    #[error("the object's metadata takes {0} bytes, more than the {MAX_META_BYTES} a manifest carries: send less")]
    TooLarge(usize),
    /// The sealed bytes do not open with the object's key.
    #[error("the object's metadata does not open with its key: the manifest is not this object's")]
    Corrupt,
}

impl ObjectMeta {
    /// Whether there is nothing to store.
    pub fn is_empty(&self) -> bool {
        *self == ObjectMeta::default()
    }

    /// Seals the metadata for the manifest of `version` (empty when there is none).
    pub fn seal(&self, key: &DataKey, version: &[u8; 32]) -> Result<Vec<u8>, MetaError> {
        if self.is_empty() {
            return Ok(Vec::new());
        }
        let mut bytes = serde_json::to_vec(self).map_err(|_| MetaError::Corrupt)?;
        if bytes.len() > MAX_META_BYTES {
            return Err(MetaError::TooLarge(bytes.len()));
        }
        ObjectCipher::new(key, version).seal(META_INDEX, &mut bytes).map_err(|_| MetaError::TooLarge(bytes.len()))?;
        Ok(bytes)
    }

    /// Opens what [`ObjectMeta::seal`] made.
    pub fn open(sealed: &[u8], key: &DataKey, version: &[u8; 32]) -> Result<ObjectMeta, MetaError> {
        if sealed.is_empty() {
            return Ok(ObjectMeta::default());
        }
        let mut bytes = sealed.to_vec();
        ObjectCipher::new(key, version).open(META_INDEX, &mut bytes).map_err(|_| MetaError::Corrupt)?;
        serde_json::from_slice(&bytes).map_err(|_| MetaError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_sealed_and_refuses_other_keys_versions_and_excess() {
        let key = DataKey::from_bytes([3; 32]);
        let mut m = ObjectMeta { content_type: Some("text/plain".into()), ..Default::default() };
        m.user.insert("project".into(), "archipel-marker-7731".into());
        let sealed = m.seal(&key, &[1; 32]).unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"project"), "sealed metadata is ciphertext");
        assert_eq!(ObjectMeta::open(&sealed, &key, &[1; 32]).unwrap(), m);
        assert!(ObjectMeta::open(&sealed, &DataKey::from_bytes([4; 32]), &[1; 32]).is_err());
        assert!(ObjectMeta::open(&sealed, &key, &[2; 32]).is_err());
        assert!(ObjectMeta::default().seal(&key, &[1; 32]).unwrap().is_empty());
        assert_eq!(ObjectMeta::open(&[], &key, &[1; 32]).unwrap(), ObjectMeta::default());
        let mut big = ObjectMeta::default();
        big.user.insert("x".into(), "y".repeat(MAX_META_BYTES));
        assert!(matches!(big.seal(&key, &[1; 32]), Err(MetaError::TooLarge(_))));
    }
}
