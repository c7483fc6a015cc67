//! The small network every fuzz target decodes against and every seed is built from: four
//! validators and a funded tenant with deterministic keys, so the seed corpus is reproducible and
//! a mutated seed still refers to keys, parents and roots the targets know.

use archipel_crypto::test_support::example_descriptor;
use archipel_crypto::{Identity, SignedDescriptor};
use archipel_ledger::{BlockHeader, LedgerParams, State, genesis_header};
use archipel_node::genesis::{Genesis, GenesisAccount};
use std::sync::OnceLock;

/// The shared network; see the module docs.
#[derive(Debug)]
pub struct Network {
    /// The four genesis nodes, all validators (key seeds 1 to 4).
    pub nodes: Vec<Identity>,
    /// A funded tenant account (key seed 100).
    pub tenant: Identity,
    /// The genesis.
    pub genesis: Genesis,
    /// Its hash.
    pub genesis_hash: String,
    /// The ledger's first state.
    pub state: State,
    /// The header of the genesis state (the parent of block 1).
    pub header: BlockHeader,
}

impl Network {
    /// The ledger parameters (the defaults).
    pub fn params(&self) -> &LedgerParams {
        &self.genesis.ledger
    }
}

/// The signed descriptor of a node with key seed `seed`, at `127.0.0.<seed + 1>`.
pub fn descriptor(seed: u64, roles: &str) -> SignedDescriptor {
    let id = Identity::from_seed(seed);
    let mut d = example_descriptor(&id);
    d.name = format!("n{seed:02}");
    d.roles = roles.parse().unwrap_or_default();
    let ip = format!("127.0.0.{}", seed + 1);
    d.p2p_address = format!("{ip}:23100").parse().unwrap_or(d.p2p_address);
    d.api_address = format!("{ip}:23101").parse().unwrap_or(d.api_address);
    SignedDescriptor::sign(&id, d).unwrap_or_else(|e| unreachable!("the key is the descriptor's: {e}"))
}

/// The shared network, built once.
pub fn network() -> &'static Network {
    static NETWORK: OnceLock<Network> = OnceLock::new();
    NETWORK.get_or_init(|| {
        let nodes: Vec<Identity> = (1..=4).map(Identity::from_seed).collect();
        let tenant = Identity::from_seed(100);
        let genesis = Genesis {
            network: "fuzz-net".into(),
            created_at_ms: 1_700_000_000_000,
            nodes: (1..=4).map(|s| descriptor(s, "validator,storage")).collect(),
            validators: nodes.iter().map(Identity::node_id).collect(),
            accounts: vec![GenesisAccount {
                name: "tenant".into(),
                key: tenant.node_id(),
                balance_micro: 1_000_000_000,
            }],
            membership: Default::default(),
            ledger: Default::default(),
        };
        if let Err(e) = genesis.validate() {
            unreachable!("the fuzz network's genesis is valid: {e}");
        }
        let genesis_hash = genesis.hash();
        let state = genesis.ledger_state();
        let header = genesis_header(&state);
        Network { nodes, tenant, genesis, genesis_hash, state, header }
    })
}
