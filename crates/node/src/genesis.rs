//! The genesis file: the initial nodes (signed descriptors), the validator set, funded tenant
//! accounts and protocol timing that every node of one network shares.
//!
//! The genesis hash (BLAKE3 of the canonical JSON re-serialization, so whitespace does not
//! matter) identifies the network: a node refuses to start with a different one, and a data
//! directory remembers the hash it was created for.

use crate::membership::MembershipTiming;
use archipel_crypto::SignedDescriptor;
use archipel_ledger::{GenesisState, Hash, LedgerParams, State};
use archipel_types::{NodeId, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Largest accepted genesis file.
pub const MAX_GENESIS_BYTES: u64 = 16 * 1024 * 1024;

/// A funded account in genesis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesisAccount {
    /// Human label.
    pub name: String,
    /// The account's Ed25519 public key.
    pub key: NodeId,
    /// Initial balance in micro-units.
    pub balance_micro: u64,
}

/// The genesis of a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Genesis {
    /// Network name (e.g. `archipel-devnet`).
    pub network: String,
    /// When the genesis was made (Unix ms); informative, part of the hash.
    pub created_at_ms: u64,
    /// The initial nodes.
    pub nodes: Vec<SignedDescriptor>,
    /// The validator set (node ids; each must be a node with the validator role).
    pub validators: Vec<NodeId>,
    /// Funded tenant accounts.
    #[serde(default)]
    pub accounts: Vec<GenesisAccount>,
    /// Membership timing shared by all nodes.
    #[serde(default)]
    pub membership: MembershipTiming,
    /// Ledger parameters (lease timing, fees, limits). A genesis without them has the defaults of
    /// the version that wrote it: none asked an entry deposit, so theirs is 0 (the network id
    /// stays what it was).
    #[serde(default = "params_of_a_genesis_without_them")]
    pub ledger: LedgerParams,
}

/// The ledger parameters of a genesis file that has none (see [`Genesis::ledger`]).
fn params_of_a_genesis_without_them() -> LedgerParams {
    LedgerParams { entry_deposit_micro: 0, ..LedgerParams::default() }
}

/// A problem with a genesis file, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum GenesisError {
    /// Missing file.
    #[error(
        "genesis file {0} does not exist: build one with `archipel genesis new` (or copy the network's genesis.json)"
    )]
    Missing(PathBuf),
    /// Unreadable file.
    #[error("cannot read genesis file {path}: {message}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Syntax or schema problem.
    #[error("genesis file {path} is malformed: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Content that parses but is inconsistent.
    #[error("genesis is invalid: {0}")]
    Invalid(String),
}

impl Genesis {
    /// Reads, parses and validates a genesis file.
    pub fn load(path: &Path) -> Result<Self, GenesisError> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => GenesisError::Missing(path.to_path_buf()),
            _ => GenesisError::Unreadable { path: path.to_path_buf(), message: e.to_string() },
        })?;
        if meta.len() > MAX_GENESIS_BYTES {
            return Err(GenesisError::Malformed {
                path: path.to_path_buf(),
                message: format!("{} bytes exceeds the limit of {MAX_GENESIS_BYTES}", meta.len()),
            });
        }
        let bytes = std::fs::read(path)
            .map_err(|e| GenesisError::Unreadable { path: path.to_path_buf(), message: e.to_string() })?;
        Self::parse(&bytes, path)
    }

    /// Parses and validates the contents of the genesis file at `path` (named in errors): what
    /// [`Genesis::load`] does once the file is read.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, GenesisError> {
        let g: Genesis = serde_json::from_slice(bytes)
            .map_err(|e| GenesisError::Malformed { path: path.to_path_buf(), message: e.to_string() })?;
        g.validate().map_err(|e| match e {
            GenesisError::Invalid(m) => GenesisError::Malformed { path: path.to_path_buf(), message: m },
            other => other,
        })?;
        Ok(g)
    }

    /// Checks internal consistency: every descriptor signed, ids and addresses unique,
    /// validators are nodes with the validator role, timing sane.
    pub fn validate(&self) -> Result<(), GenesisError> {
        let bad = |m: String| Err(GenesisError::Invalid(m));
        if self.network.is_empty() || self.network.len() > 64 {
            return bad("`network` must be a name of 1 to 64 characters".into());
        }
        if self.nodes.is_empty() {
            return bad("`nodes` is empty: a network needs at least one node".into());
        }
        let mut ids = BTreeSet::new();
        let mut p2p = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let d = &n.descriptor;
            n.verify().map_err(|e| GenesisError::Invalid(format!("nodes[{i}] ({}): {e}", d.name)))?;
            if !ids.insert(d.node_id) {
                return bad(format!("nodes[{i}] ({}): node {} is listed twice", d.name, d.node_id.short()));
            }
            if !p2p.insert(d.p2p_address) {
                return bad(format!("nodes[{i}] ({}): p2p address {} is used by another node", d.name, d.p2p_address));
            }
        }
        if self.validators.is_empty() {
            return bad("`validators` is empty: list at least one node with the validator role".into());
        }
        let mut vset = BTreeSet::new();
        for v in &self.validators {
            let Some(n) = self.node(v) else {
                return bad(format!("validator {} is not one of the genesis nodes", v.short()));
            };
            if !n.descriptor.roles.contains(Role::Validator) {
                return bad(format!(
                    "validator {} ({}) lacks the validator role in its descriptor",
                    v.short(),
                    n.descriptor.name
                ));
            }
            if !vset.insert(*v) {
                return bad(format!("validator {} is listed twice", v.short()));
            }
        }
        let mut acc = BTreeSet::new();
        for a in &self.accounts {
            if !acc.insert(a.key) {
                return bad(format!("account {} ({}) is listed twice", a.key.short(), a.name));
            }
        }
        // Money is conserved (fees are burned, not created), so a total that fits in u64 keeps
        // every balance and the burned total in range (found by fuzzing exports).
        if self.accounts.iter().try_fold(0u64, |total, a| total.checked_add(a.balance_micro)).is_none() {
            return bad(format!("the account balances add up to more than {} micro-units: lower them", u64::MAX));
        }
        let t = self.membership;
        if t.hello_interval_ms == 0 || t.down_after_ms <= t.hello_interval_ms {
            return bad("membership: down_after_ms must be greater than hello_interval_ms, which must be > 0".into());
        }
        self.ledger.validate().map_err(|e| GenesisError::Invalid(format!("ledger: {e}")))?;
        archipel_ledger::upgrade::check_quorum_fits(self.validators.len(), self.ledger.max_tx_bytes)
            .map_err(|e| GenesisError::Invalid(format!("ledger: {e}")))?;
        if self.nodes.len() > self.ledger.max_registered_nodes as usize {
            return bad(format!(
                "ledger: max_registered_nodes ({}) is below the {} genesis nodes: raise it",
                self.ledger.max_registered_nodes,
                self.nodes.len()
            ));
        }
        Ok(())
    }

    /// The canonical form: compact JSON (what the hash and ledger exports are computed over).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a genesis that must already be in canonical form (as embedded in a ledger export),
    /// validating it.
    pub fn from_canonical(bytes: &[u8]) -> Result<Self, String> {
        let g: Genesis = serde_json::from_slice(bytes).map_err(|e| format!("not a genesis: {e}"))?;
        if g.canonical_bytes() != bytes {
            return Err("the genesis is not in canonical form (it was edited)".into());
        }
        g.validate().map_err(|e| e.to_string())?;
        Ok(g)
    }

    /// The ledger's first state: the network (this genesis's hash), parameters, validators,
    /// funded accounts and the genesis nodes.
    pub fn ledger_state(&self) -> State {
        State::genesis(GenesisState {
            network: self.network_hash(),
            params: self.ledger.clone(),
            timestamp_ms: self.created_at_ms,
            validators: self.validators.clone(),
            accounts: self.accounts.iter().map(|a| (a.key, a.balance_micro)).collect(),
            nodes: self.nodes.clone(),
        })
    }

    /// The genesis hash: BLAKE3 over the canonical JSON form.
    pub fn hash(&self) -> String {
        self.network_hash().to_string()
    }

    /// The genesis hash as bytes: the ledger's `network` (see [`archipel_ledger::State::network`]),
    /// to which registration consents are bound.
    pub fn network_hash(&self) -> Hash {
        Hash(*blake3::hash(&self.canonical_bytes()).as_bytes())
    }

    /// The descriptor of `id`, if it is a genesis node.
    pub fn node(&self, id: &NodeId) -> Option<&SignedDescriptor> {
        self.nodes.iter().find(|n| n.descriptor.node_id == *id)
    }

    /// The node ids admitted to the p2p network.
    pub fn node_ids(&self) -> BTreeSet<NodeId> {
        self.nodes.iter().map(|n| n.descriptor.node_id).collect()
    }

    /// Writes the genesis as pretty JSON to a new file (never overwrites).
    pub fn write_new(&self, path: &Path) -> Result<(), GenesisError> {
        let err = |m: String| GenesisError::Unreadable { path: path.to_path_buf(), message: m };
        let text = serde_json::to_string_pretty(self).map_err(|e| err(e.to_string()))?;
        crate::files::write_new(path, format!("{text}\n").as_bytes()).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_crypto::Identity;
    use archipel_crypto::test_support::example_descriptor;

    fn sample(nodes: u64) -> Genesis {
        let nodes: Vec<SignedDescriptor> = (0..nodes)
            .map(|i| {
                let id = Identity::from_seed(i);
                let mut d = example_descriptor(&id);
                d.roles = "validator,storage".parse().unwrap();
                d.p2p_address = format!("127.0.0.{}:1", i + 2).parse().unwrap();
                SignedDescriptor::sign(&id, d).unwrap()
            })
            .collect();
        Genesis {
            network: "test".into(),
            created_at_ms: 1,
            validators: vec![nodes[0].descriptor.node_id],
            nodes,
            accounts: Vec::new(),
            membership: MembershipTiming::default(),
            ledger: LedgerParams::default(),
        }
    }

    #[test]
    fn the_ledger_state_belongs_to_the_genesis_network() {
        let g = sample(2);
        assert_eq!(g.ledger_state().network(), g.network_hash());
        assert_eq!(g.network_hash().to_string(), g.hash());
        let mut other = g.clone();
        other.network = "other".into();
        assert_ne!(other.ledger_state().network(), g.ledger_state().network());
    }

    #[test]
    fn a_genesis_from_before_entry_deposits_keeps_its_network_id() {
        // Without a ledger section, or with one that lacks the field: no deposit, and the file
        // hashes as it did (the field is not written back).
        let mut g = sample(2);
        g.ledger.entry_deposit_micro = 0;
        let mut json = serde_json::to_value(&g).unwrap();
        assert!(json["ledger"].get("entry_deposit_micro").is_none());
        let with_section: Genesis = serde_json::from_value(json.clone()).unwrap();
        json.as_object_mut().unwrap().remove("ledger");
        let without: Genesis = serde_json::from_value(json).unwrap();
        assert_eq!(without.ledger.entry_deposit_micro, 0);
        assert_eq!(with_section.hash(), g.hash());
        assert_eq!(without.ledger, g.ledger);
        assert_eq!(without.hash(), g.hash());
        // A new genesis asks one, and its id says so.
        let new = sample(2);
        assert!(new.ledger.entry_deposit_micro > 0);
        assert_ne!(new.hash(), g.hash());
    }

    #[test]
    fn upgrades_leave_an_older_genesis_as_it_was_and_need_a_quorum_that_fits_a_transaction() {
        // No notice set: not written, so a genesis from before upgrades hashes as it did.
        let g = sample(4);
        let json = serde_json::to_value(&g).unwrap();
        assert!(json["ledger"].get("upgrade_notice_blocks").is_none());
        let mut devnet = g.clone();
        devnet.ledger.upgrade_notice_blocks = 40;
        assert_ne!(devnet.hash(), g.hash());
        devnet.ledger.upgrade_notice_blocks = 5;
        assert!(devnet.validate().unwrap_err().to_string().contains("upgrade_notice_blocks (5)"));
        // With the smallest transactions (1 KiB), 13 validators' quorum of 9 approvals fits (982
        // bytes); 14 validators need 10 (1,078 bytes): refused, or they could never upgrade.
        for (n, fits) in [(13, true), (14, false)] {
            let mut g = sample(n);
            g.validators = g.nodes.iter().map(|d| d.descriptor.node_id).collect();
            g.ledger.max_tx_bytes = 1_024;
            match g.validate() {
                Ok(()) => assert!(fits, "{n} validators"),
                Err(e) => {
                    assert!(!fits, "{n} validators: {e}");
                    let e = e.to_string();
                    assert!(e.contains("14 validators need 10 approvals") && e.contains("1078 bytes"), "{e}");
                }
            }
        }
    }

    #[test]
    fn the_registry_limit_holds_the_genesis_nodes() {
        let mut g = sample(3);
        g.ledger.max_registered_nodes = 3;
        g.validate().unwrap();
        g.ledger.max_registered_nodes = 2;
        let e = g.validate().unwrap_err().to_string();
        assert!(e.contains("max_registered_nodes (2) is below the 3 genesis nodes"), "{e}");
    }
}
