//! Node and account identifiers: an Ed25519 public key, shown in full or as a short prefix.

use crate::TypeError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// The identity of a node (or tenant account): the 32 bytes of its Ed25519 public key.
///
/// A node id says nothing about validity of the key by itself; the `crypto` crate turns it into a
/// verifying key and rejects points that are not on the curve.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// Number of hex characters in [`NodeId::short`].
    pub const SHORT_LEN: usize = 10;

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short, human-friendly prefix for tables and logs (not unique by construction, but
    /// 40 bits make collisions in one network vanishingly unlikely).
    pub fn short(&self) -> String {
        let mut full = self.to_string();
        full.truncate(Self::SHORT_LEN);
        full
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = TypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| TypeError::NodeId(s.to_string()))?;
        Ok(Self(out))
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_hex_and_rejects_bad_lengths() {
        let id = NodeId([7u8; 32]);
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<NodeId>(), Ok(id));
        assert_eq!(id.short(), "0707070707");
        assert!("abcd".parse::<NodeId>().is_err());
        assert!("zz".repeat(32).parse::<NodeId>().is_err());
    }
}
