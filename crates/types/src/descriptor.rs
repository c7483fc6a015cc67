//! A node descriptor: everything the network needs to know about a node — its key, where it is,
//! who operates it and under which jurisdiction, what it offers, and how to reach it.
//!
//! Descriptors are signed by the node's key (see the `crypto` crate); the bytes that are signed come
//! from [`NodeDescriptor::signing_bytes`], an explicit, versioned binary form, so the signature does
//! not depend on any serializer's choices.

use crate::{ByteSize, CountryCode, NodeId, Region, TypeError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// Longest accepted operator name, in bytes.
pub const MAX_OPERATOR_LEN: usize = 64;
/// Longest accepted node name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// What a node does for the network.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes part in BFT consensus (listed in the genesis validator set).
    Validator,
    /// Stores erasure-coded shards.
    Storage,
    /// Runs WebAssembly jobs.
    Compute,
    /// Serves the S3 gateway.
    Gateway,
}

impl Role {
    /// Every role, in display order.
    pub const ALL: [Role; 4] = [Role::Validator, Role::Storage, Role::Compute, Role::Gateway];

    /// The role's name as used in configs and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Validator => "validator",
            Role::Storage => "storage",
            Role::Compute => "compute",
            Role::Gateway => "gateway",
        }
    }

    fn tag(self) -> u8 {
        match self {
            Role::Validator => 1,
            Role::Storage => 2,
            Role::Compute => 3,
            Role::Gateway => 4,
        }
    }
}

impl FromStr for Role {
    type Err = TypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s.trim()).ok_or_else(|| TypeError::Role(s.to_string()))
    }
}

/// A set of roles, shown as `validator,storage`.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Roles(pub BTreeSet<Role>);

impl Roles {
    /// Whether the set contains `role`.
    pub fn contains(&self, role: Role) -> bool {
        self.0.contains(&role)
    }
}

impl FromStr for Roles {
    type Err = TypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',').filter(|p| !p.trim().is_empty()).map(str::parse).collect::<Result<BTreeSet<_>, _>>().map(Roles)
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.0.iter().map(|r| r.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

/// Everything the network needs to know about one node.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NodeDescriptor {
    /// The node's Ed25519 public key.
    pub node_id: NodeId,
    /// A human label chosen by the operator (`n01`, `fra-storage-3`); not unique, not trusted.
    pub name: String,
    /// Who runs the node (company or person), a failure domain of its own.
    pub operator: String,
    /// The region the node is in.
    pub region: Region,
    /// The country the node's hardware is in.
    pub country: CountryCode,
    /// The jurisdiction the operator answers to (e.g. a US company running a node in Germany is `US`).
    pub operator_jurisdiction: CountryCode,
    /// Storage capacity offered.
    pub capacity: ByteSize,
    /// What the node does.
    pub roles: Roles,
    /// Address other nodes dial for the authenticated p2p network.
    pub p2p_address: SocketAddr,
    /// Source address of the node's outgoing p2p connections, when it differs from the p2p
    /// address's IP (NAT, or a loopback devnet where the kernel sends from 127.0.0.1). Peers accept
    /// inbound connections for this key only from this IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p_egress_ip: Option<IpAddr>,
    /// Address of the node's HTTP API.
    pub api_address: SocketAddr,
    /// Monotonic version: a newer descriptor of the same node replaces an older one.
    pub version: u64,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl NodeDescriptor {
    /// Checks the bounds that parsing alone does not enforce.
    pub fn validate(&self) -> Result<(), TypeError> {
        let bad = |m: String| Err(TypeError::Descriptor(m));
        if self.name.len() > MAX_NAME_LEN || self.name.chars().any(char::is_control) {
            return bad(format!("name must be at most {MAX_NAME_LEN} printable bytes"));
        }
        if self.operator.is_empty()
            || self.operator.len() > MAX_OPERATOR_LEN
            || self.operator.chars().any(char::is_control)
        {
            return bad(format!("operator must be 1 to {MAX_OPERATOR_LEN} printable bytes"));
        }
        if self.p2p_address.port() == 0 || self.api_address.port() == 0 {
            return bad("p2p and api addresses need a non-zero port".into());
        }
        if self.p2p_address.ip().is_unspecified() || self.api_address.ip().is_unspecified() {
            return bad(
                "p2p and api addresses must be reachable addresses, not 0.0.0.0 or [::]: set the public address".into(),
            );
        }
        Ok(())
    }

    /// The exact bytes a node signs for this descriptor (versioned, length-prefixed, field order fixed).
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"archipel/node-descriptor/v1");
        out.extend_from_slice(self.node_id.as_bytes());
        put_str(&mut out, &self.name);
        put_str(&mut out, &self.operator);
        put_str(&mut out, self.region.as_str());
        put_str(&mut out, self.country.as_str());
        put_str(&mut out, self.operator_jurisdiction.as_str());
        out.extend_from_slice(&self.capacity.bytes().to_be_bytes());
        out.push(self.roles.0.len() as u8);
        out.extend(self.roles.0.iter().map(|r| r.tag()));
        put_str(&mut out, &self.p2p_address.to_string());
        put_str(&mut out, &self.p2p_egress_ip.map(|ip| ip.to_string()).unwrap_or_default());
        put_str(&mut out, &self.api_address.to_string());
        out.extend_from_slice(&self.version.to_be_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeDescriptor {
        NodeDescriptor {
            node_id: NodeId([1; 32]),
            name: "n01".into(),
            operator: "acme-de".into(),
            region: "eu-de".parse().unwrap(),
            country: "DE".parse().unwrap(),
            operator_jurisdiction: "DE".parse().unwrap(),
            capacity: "50GiB".parse().unwrap(),
            roles: "validator,storage".parse().unwrap(),
            p2p_address: "127.0.0.2:23100".parse().unwrap(),
            p2p_egress_ip: None,
            api_address: "127.0.0.2:23101".parse().unwrap(),
            version: 1,
        }
    }

    #[test]
    fn signing_bytes_change_with_every_field() {
        let base = sample();
        let mut variants = vec![];
        let mut d = base.clone();
        d.name = "n02".into();
        variants.push(d);
        let mut d = base.clone();
        d.operator_jurisdiction = "US".parse().unwrap();
        variants.push(d);
        let mut d = base.clone();
        d.roles = "storage".parse().unwrap();
        variants.push(d);
        let mut d = base.clone();
        d.p2p_egress_ip = Some("127.0.0.1".parse().unwrap());
        variants.push(d);
        let mut d = base.clone();
        d.version = 2;
        variants.push(d);
        let mut d = base.clone();
        d.api_address = "127.0.0.3:23101".parse().unwrap();
        variants.push(d);
        for v in variants {
            assert_ne!(v.signing_bytes(), base.signing_bytes(), "{v:?}");
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let mut d = sample();
        assert_eq!(d.validate(), Ok(()));
        d.operator = String::new();
        assert!(matches!(d.validate(), Err(TypeError::Descriptor(m)) if m.contains("operator")));
        let mut d = sample();
        d.p2p_address = "0.0.0.0:23100".parse().unwrap();
        assert!(matches!(d.validate(), Err(TypeError::Descriptor(m)) if m.contains("0.0.0.0")));
    }

    #[test]
    fn roles_parse_and_print() {
        let r: Roles = "storage, validator".parse().unwrap();
        assert_eq!(r.to_string(), "validator,storage");
        assert!("storage,wizard".parse::<Roles>().is_err());
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"["validator","storage"]"#);
    }
}
