//! Devnet topologies: which nodes a local network has, where they are and who runs them.
//!
//! The default is the topology of DESIGN.md §6: 12 nodes, 4 validators in 4 regions; 8 nodes in EU
//! regions run by EU operators, 2 EU-located nodes run by a US operator, 2 nodes in a US region.
//! The first four are the validators, one per region, so `--nodes 4` is still spread out.

use anyhow::{Context, Result, bail};
use archipel_types::{ByteSize, CountryCode, Region, Roles};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One node of a topology.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyNode {
    /// Name (also the directory name).
    pub name: String,
    /// Region.
    pub region: Region,
    /// Country of the hardware.
    pub country: CountryCode,
    /// Operator.
    pub operator: String,
    /// Jurisdiction of the operator.
    pub operator_jurisdiction: CountryCode,
    /// Capacity.
    pub capacity: ByteSize,
    /// Roles.
    pub roles: Roles,
    /// What it offers as a compute provider (`[node.compute]`: price floor, slots, memory and
    /// CPU per job); default: the node's defaults.
    #[serde(default, skip_serializing_if = "archipel_node::provider::ComputeConfig::is_default")]
    pub compute: archipel_node::provider::ComputeConfig,
}

/// A devnet topology file: `[[node]]` tables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The nodes, in start order.
    #[serde(rename = "node")]
    pub nodes: Vec<TopologyNode>,
}

const DEFAULT: &[(&str, &str, &str, &str, &str, &str)] = &[
    // name, region, country, operator, operator jurisdiction, roles
    ("n01", "eu-de", "DE", "rheinhost", "DE", "validator,storage,compute"),
    ("n02", "eu-fr", "FR", "seine-cloud", "FR", "validator,storage,compute"),
    ("n03", "eu-nl", "NL", "polder-net", "NL", "validator,storage,compute"),
    ("n04", "us-east", "US", "bigcloud", "US", "validator,storage,compute"),
    ("n05", "eu-de", "DE", "rheinhost", "DE", "storage,compute"),
    ("n06", "eu-de", "DE", "alpen-dc", "DE", "storage,compute"),
    ("n07", "eu-fr", "FR", "seine-cloud", "FR", "storage,compute"),
    ("n08", "eu-fr", "FR", "lyon-compute", "FR", "storage,compute"),
    ("n09", "eu-nl", "NL", "polder-net", "NL", "storage,compute"),
    ("n10", "eu-de", "DE", "bigcloud", "US", "storage,compute"),
    ("n11", "eu-ie", "IE", "bigcloud", "US", "storage,compute"),
    ("n12", "us-east", "US", "bigcloud", "US", "storage,compute"),
];

impl Topology {
    /// The default 12-node topology, or its first `n` nodes; beyond 12 the pattern repeats
    /// (without adding validators).
    pub fn default_with(n: usize) -> Result<Self> {
        if n == 0 || n > 250 {
            bail!(
                "--nodes must be between 1 and 250 (each node gets its own loopback address 127.0.0.2 … 127.0.0.251)"
            );
        }
        let nodes = (0..n)
            .map(|i| {
                let (_, region, country, operator, jur, roles) = DEFAULT[i % DEFAULT.len()];
                let roles = if i >= DEFAULT.len() { "storage,compute" } else { roles };
                Ok(TopologyNode {
                    name: format!("n{:02}", i + 1),
                    region: region.parse()?,
                    country: country.parse()?,
                    operator: operator.to_string(),
                    operator_jurisdiction: jur.parse()?,
                    capacity: ByteSize(50 << 30),
                    roles: roles.parse()?,
                    compute: Default::default(),
                })
            })
            .collect::<Result<Vec<_>, archipel_types::TypeError>>()?;
        Ok(Self { nodes })
    }

    /// Reads a topology file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read topology {}", path.display()))?;
        let t: Topology = toml::from_str(&text).with_context(|| format!("topology {} is malformed", path.display()))?;
        t.validate().with_context(|| format!("topology {} is invalid", path.display()))?;
        Ok(t)
    }

    /// Checks names and that there is a validator.
    pub fn validate(&self) -> Result<()> {
        if self.nodes.is_empty() || self.nodes.len() > 250 {
            bail!("a topology needs 1 to 250 nodes, found {}", self.nodes.len());
        }
        let mut names = std::collections::BTreeSet::new();
        for n in &self.nodes {
            if n.name.is_empty() || !n.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                bail!("node name {:?} must be letters, digits, '-' or '_'", n.name);
            }
            if !names.insert(&n.name) {
                bail!("node name {:?} is used twice", n.name);
            }
        }
        if !self.nodes.iter().any(|n| n.roles.contains(archipel_types::Role::Validator)) {
            bail!("no node has the validator role: give at least one node roles = [\"validator\", …]");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_types::Role;

    #[test]
    fn default_topology_matches_the_design() {
        let t = Topology::default_with(12).unwrap();
        let eu = |n: &&TopologyNode| n.region.area() == "eu";
        let us_op = |n: &&TopologyNode| n.operator_jurisdiction.as_str() == "US";
        assert_eq!(t.nodes.iter().filter(|n| eu(n) && !us_op(n)).count(), 8);
        assert_eq!(t.nodes.iter().filter(|n| eu(n) && us_op(n)).count(), 2);
        assert_eq!(t.nodes.iter().filter(|n| n.region.area() == "us").count(), 2);
        let validators: Vec<_> = t.nodes.iter().filter(|n| n.roles.contains(Role::Validator)).collect();
        assert_eq!(validators.len(), 4);
        let regions: std::collections::BTreeSet<_> = validators.iter().map(|n| n.region.clone()).collect();
        assert_eq!(regions.len(), 4);
        t.validate().unwrap();
        let text = toml::to_string(&t).unwrap();
        assert_eq!(toml::from_str::<Topology>(&text).unwrap(), t);
        assert!(Topology::default_with(0).is_err());
        assert_eq!(
            Topology::default_with(4).unwrap().nodes.iter().filter(|n| n.roles.contains(Role::Validator)).count(),
            4
        );
    }
}
