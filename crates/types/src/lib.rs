//! Plain data shared by every archipel crate.
//!
//! Nothing here performs I/O or reads a clock: these are the nouns of the system (node ids, regions,
//! countries, jurisdictions, sizes, roles, node descriptors, placement policies) with validating
//! constructors, so that a value of one of these types is known to be well-formed wherever it
//! travels.

/// Serde for a type through its `Display` and `FromStr` forms (so a value read back is checked
/// exactly as a parsed one).
macro_rules! serde_via_str {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

mod descriptor;
mod geo;
mod id;
mod policy;
mod size;

pub use descriptor::{MAX_NAME_LEN, MAX_OPERATOR_LEN, NodeDescriptor, Role, Roles};
pub use geo::{CountryCode, Region};
pub use id::NodeId;
pub use policy::{ErasureCode, Geofence, MAX_POLICY_ENTRIES, PlacementPolicy, RegionMatch, SHARD_ALIGN};
pub use size::ByteSize;

/// Errors from parsing or validating plain data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    /// A region name that is not of the form `eu-de`, `us-east`, …
    #[error(
        "invalid region {0:?}: use lowercase letters, digits and dashes, starting with a 2-letter area, e.g. \"eu-de\" or \"us-east\""
    )]
    Region(String),
    /// A country or jurisdiction that is not an ISO 3166-1 alpha-2 code.
    #[error("invalid country code {0:?}: use a 2-letter ISO 3166-1 code such as \"DE\" or \"US\"")]
    Country(String),
    /// A size that could not be parsed.
    #[error("invalid size {0:?}: use a number with an optional unit, e.g. \"50GiB\", \"500MB\", \"1TiB\"")]
    Size(String),
    /// A role name that is not known.
    #[error("unknown role {0:?}: known roles are validator, storage, compute, gateway")]
    Role(String),
    /// A node id that is not 64 hex characters.
    #[error("invalid node id {0:?}: expected 64 hex characters (an Ed25519 public key)")]
    NodeId(String),
    /// An erasure code outside the supported bounds.
    #[error("invalid erasure code {0:?}: use data+parity, e.g. \"4+2\", with 1 to 32 data and 1 to 16 parity shards")]
    Code(String),
    /// A placement policy that can never be satisfied, whatever nodes are live.
    #[error("invalid placement policy: {0}")]
    Policy(String),
    /// A descriptor field that is out of bounds.
    #[error("invalid node descriptor: {0}")]
    Descriptor(String),
}
