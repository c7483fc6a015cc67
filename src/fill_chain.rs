//! `archipel debug fill-chain`: gives a stopped devnet a long chain and a large state without
//! running consensus for hours — for benchmarks and tests of what must not depend on the chain's
//! length or the state's size (restart, join by state sync).
//!
//! The blocks are built and executed by the same `Chain` a node runs (every state root is real)
//! and signed by the devnet's own validator keys, which sit in its directory: a finality
//! certificate on every 100th block and on the last (the blocks between are final as their
//! ancestors, as in a live chain). `accounts` fresh accounts are credited 1 micro each by the
//! tenant first (`TransferMany`, 200 credits a transaction), then empty blocks follow up to
//! `blocks`. Every block carries the genesis' time, so the live chain's next block (at the
//! current time) never goes back. Each node's ledger and consensus storage is replaced by a copy
//! of the result, marked as never voted on; the devnet's nodes then start from its last certified
//! block.

use crate::devnet::DevnetState;
use anyhow::{Context as _, Result, bail};
use archipel_consensus::block::BlockCfg;
use archipel_consensus::engine::{ConsensusConfig, namespace, sign_finality};
use archipel_consensus::state_db::StateDb;
use archipel_consensus::{Chain, FileStore};
use archipel_crypto::Identity;
use archipel_ledger::{Credit, MAX_CREDITS, Payload, Transaction};
use archipel_node::config::NodeConfig;
use archipel_node::genesis::Genesis;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// A certificate every this many blocks.
const CERTIFY_EVERY: u64 = 100;

/// What was built.
#[derive(Debug, serde::Serialize)]
pub struct Filled {
    /// The last block's height.
    pub height: u64,
    /// Accounts created.
    pub accounts: u64,
    /// Seconds it took.
    pub seconds: f64,
}

/// Builds the chain in `<dir>/fill-chain` and installs it in every node of the devnet in `dir`.
pub fn fill(dir: &Path, blocks: u64, accounts: u64) -> Result<Filled> {
    let started = Instant::now();
    let state: DevnetState = serde_json::from_str(
        &std::fs::read_to_string(dir.join("devnet.json"))
            .with_context(|| format!("{} is not a devnet directory (no devnet.json)", dir.display()))?,
    )?;
    if let Some(pid) =
        state.supervisor_pid.filter(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), None).is_ok())
    {
        bail!("the devnet in {} is running (pid {pid}): stop it first", dir.display());
    }
    let genesis = Genesis::load(&dir.join("genesis.json"))?;
    let tenant = Identity::load(&state.tenant_key)?;
    let configs: Vec<NodeConfig> = state.nodes.iter().map(|n| NodeConfig::load(&n.config)).collect::<Result<_, _>>()?;
    let mut signers = Vec::new();
    for config in &configs {
        let key = Identity::load(&config.key_file)?;
        if genesis.validators.contains(&key.node_id()) {
            signers.push(key.private_key().clone());
        }
    }
    if signers.len() != genesis.validators.len() {
        bail!(
            "found the keys of {} of the {} validators in the devnet directory",
            signers.len(),
            genesis.validators.len()
        );
    }
    let cfg = ConsensusConfig::new(
        namespace(&genesis.hash()),
        genesis.validators.iter().filter_map(|v| archipel_crypto::public_key(v).ok()).collect(),
        BlockCfg::from(&genesis.ledger),
    );

    let work = dir.join("fill-chain");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let log = FileStore::open(&work.join("blocks.log")).map_err(anyhow::Error::msg)?;
    let states = StateDb::open(&work.join("state.redb"))?;
    let chain =
        Chain::open_with(genesis.ledger_state(), Box::new(log), Arc::new(states)).map_err(anyhow::Error::msg)?;
    let network = chain.with_state(archipel_ledger::State::network);
    let now = genesis.created_at_ms;
    let mut nonce = chain.with_state(|s| s.account(&tenant.node_id()).nonce);
    let mut credited = 0u64;
    let per_block = (genesis.ledger.max_block_bytes / genesis.ledger.max_tx_bytes.max(1)).max(1) as u64 / 2;
    let mut last_shown = Instant::now();
    while chain.head().height < blocks || credited < accounts {
        let head = chain.head();
        let mut txs = 0;
        while credited < accounts && txs < per_block {
            let n = (accounts - credited).min(MAX_CREDITS as u64);
            let credits = (credited..credited + n)
                .map(|i| Credit { to: Identity::from_seed(1_000_000_000 + i).node_id(), amount_micro: 1 })
                .collect();
            let tx = Transaction { signer: tenant.node_id(), nonce, payload: Payload::TransferMany { credits } }
                .sign(&tenant, &network);
            let len = tx.to_bytes().len();
            chain.submit(tx, len, now).map_err(|e| anyhow::anyhow!("the tenant's credits were refused: {e}"))?;
            nonce += 1;
            credited += n;
            txs += 1;
        }
        let block = chain
            .build(&head.hash(), now, |_| Vec::new())
            .with_context(|| format!("cannot build block {}", head.height + 1))?;
        let height = block.header.height;
        let certificate = if height.is_multiple_of(CERTIFY_EVERY) || (height >= blocks && credited >= accounts) {
            sign_finality(&cfg, &signers, &block.hash(), height).context("the validators' keys do not sign")?
        } else {
            Vec::new()
        };
        chain
            .finalize_known(&block.hash(), certificate)
            .map_err(anyhow::Error::msg)?
            .with_context(|| format!("block {height} was not finalized"))?;
        if last_shown.elapsed().as_secs() >= 5 {
            last_shown = Instant::now();
            eprintln!("fill-chain: block {height} of {blocks}, {credited} of {accounts} accounts");
        }
    }
    chain.close().map_err(anyhow::Error::msg)?;
    let height = chain.head().height;
    drop(chain);

    for config in &configs {
        let data = &config.data_dir;
        for part in ["ledger", "runtime"] {
            let p = data.join(part);
            if p.exists() {
                std::fs::remove_dir_all(&p).with_context(|| format!("cannot clear {}", p.display()))?;
            }
        }
        let ledger = data.join("ledger");
        std::fs::create_dir_all(&ledger)?;
        for file in ["blocks.log", "state.redb"] {
            std::fs::copy(work.join(file), ledger.join(file))
                .with_context(|| format!("cannot copy {file} into {}", ledger.display()))?;
        }
        // No validator voted on this chain: each may vote from its last block at once (see
        // `archipel_consensus::vote_gate`). The runtime's storage names blobs in hex.
        let marker = data.join("runtime").join(archipel_consensus::vote_gate::NEVER_VOTED_PARTITION);
        std::fs::create_dir_all(&marker)?;
        std::fs::write(marker.join("00"), b"fill-chain")
            .with_context(|| format!("cannot write the never-voted marker in {}", marker.display()))?;
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(Filled { height, accounts: credited, seconds: started.elapsed().as_secs_f64() })
}
