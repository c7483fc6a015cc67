//! `archipel node run --join`: a node with no ledger, or one far behind the network, takes the
//! state from a peer instead of replaying every block since the genesis.
//!
//! Runs before consensus starts. The peers asked are the genesis nodes at their API addresses
//! (any node serves `GET /v1/ledger/snapshot`), in an order that differs per node so joiners
//! spread out. Nothing a peer sends is trusted: `archipel_consensus::join` checks the blocks'
//! links, a quorum's finality certificate and the entries against the final state root, and a
//! peer whose snapshot fails is skipped for the next. A node whose ledger is more than
//! [`REJOIN_BEHIND_BLOCKS`] behind the best peer moves its ledger and consensus storage aside
//! (`<data dir>/replaced-<unix seconds>/`, for the operator to delete) and joins afresh.

use crate::genesis::Genesis;
use crate::run::NodeError;
use archipel_consensus::join::{Join, Joined};
use archipel_consensus::state_db::StateDb;
use archipel_consensus::{BlockStore as _, FileStore};
use archipel_ledger::store::StateStore as _;
use archipel_types::NodeId;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How far behind the best peer a node's ledger may be before `--join` replaces it with a
/// snapshot (closer than this, replaying the missing blocks is cheaper than a snapshot).
pub const REJOIN_BEHIND_BLOCKS: u64 = 10_000;

/// Longest wait for the next piece of a snapshot before the peer is given up.
const STALL: Duration = Duration::from_secs(30);

/// What [`prepare_ledger`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// The node's own ledger is used (not empty and not far behind, or no peer had a state to
    /// sync).
    Kept,
    /// The state was synced from `peer`.
    Joined {
        /// The peer's API URL.
        peer: String,
        /// What was taken.
        joined: Joined,
        /// How long it took.
        took: Duration,
    },
}

/// The ledger's height on disk: `None` when there is none to resume from (no block and no
/// committed state).
fn local_height(dir: &Path) -> Result<Option<u64>, String> {
    let (log_path, state_path) = (dir.join("blocks.log"), dir.join("state.redb"));
    if !log_path.exists() && !state_path.exists() {
        return Ok(None);
    }
    let log = FileStore::open(&log_path)?;
    let states = StateDb::open(&state_path).map_err(|e| e.to_string())?;
    let committed = states.committed().map_err(|e| e.to_string())?;
    if log.height() < log.first() && committed.is_none_or(|c| c.height == 0) {
        return Ok(None);
    }
    Ok(Some(log.height()))
}

/// The API URLs of the genesis nodes but `me`, rotated by `me` so joiners spread out.
fn peers(genesis: &Genesis, me: &NodeId) -> Vec<String> {
    let mut urls: Vec<String> = genesis
        .nodes
        .iter()
        .filter(|n| n.descriptor.node_id != *me)
        .map(|n| format!("http://{}", n.descriptor.api_address))
        .collect();
    if !urls.is_empty() {
        let turn = me.0.iter().map(|b| *b as usize).sum::<usize>() % urls.len();
        urls.rotate_left(turn);
    }
    urls
}

/// Before consensus starts, with `--join`: syncs the state from a peer when this node's ledger
/// (`<data dir>/ledger`) is empty or more than `behind` blocks behind the best peer's head
/// ([`REJOIN_BEHIND_BLOCKS`] unless the operator says otherwise).
pub fn prepare_ledger(
    data_dir: &Path,
    genesis: &Genesis,
    consensus: &archipel_consensus::engine::ConsensusConfig,
    me: &NodeId,
    behind: u64,
) -> Result<Prepared, NodeError> {
    let dir = data_dir.join("ledger");
    let invalid = |e: String| NodeError::Invalid(format!("--join: {e}"));
    std::fs::create_dir_all(&dir).map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
    let local = local_height(&dir).map_err(invalid)?;
    let peers = peers(genesis, me);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| invalid(format!("cannot start the join's runtime: {e}")))?;
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| invalid(format!("cannot build an HTTP client: {e}")))?;
        if let Some(height) = local {
            let best = best_head(&http, &peers).await;
            if best <= height.saturating_add(behind) {
                tracing::info!(height, best, "--join: the ledger is close enough to the network's head to catch up by blocks");
                return Ok(Prepared::Kept);
            }
            let aside = move_aside(data_dir).map_err(invalid)?;
            tracing::warn!(height, best, aside = %aside.display(), "--join: the ledger is far behind the network: moved aside, syncing the state instead");
            std::fs::create_dir_all(&dir).map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut failures = Vec::new();
        for peer in &peers {
            let started = Instant::now();
            match sync_from(&http, peer, genesis, consensus, &dir).await {
                Ok(joined) => {
                    return Ok(Prepared::Joined { peer: peer.clone(), joined, took: started.elapsed() });
                }
                Err(e) if e.contains("genesis state: nothing to sync") || e.contains("no committed state") => {
                    tracing::info!(peer = %peer, "--join: the peer's state is still the genesis: starting from the genesis");
                    return Ok(Prepared::Kept);
                }
                Err(e) => {
                    tracing::warn!(peer = %peer, error = %e, "--join: state sync from this peer failed; trying the next");
                    failures.push(format!("{peer}: {e}"));
                }
            }
        }
        Err(invalid(format!(
            "no peer gave a state that checks out ({}); start without --join to replay the chain from the genesis",
            if failures.is_empty() { "no peer in the genesis".to_string() } else { failures.join("; ") }
        )))
    })
}

/// The highest head any peer reports (0 if none answers).
async fn best_head(http: &reqwest::Client, peers: &[String]) -> u64 {
    let mut best = 0;
    for peer in peers {
        let head = async {
            let v: serde_json::Value = http
                .get(format!("{peer}/v1/ledger/head"))
                .timeout(Duration::from_secs(3))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["header"]["height"].as_u64()
        };
        best = best.max(head.await.unwrap_or(0));
    }
    best
}

/// Moves `<data dir>/ledger` and `<data dir>/runtime` into `<data dir>/replaced-<unix seconds>`.
fn move_aside(data_dir: &Path) -> Result<std::path::PathBuf, String> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let aside = data_dir.join(format!("replaced-{secs}"));
    std::fs::create_dir_all(&aside).map_err(|e| format!("cannot create {}: {e}", aside.display()))?;
    for part in ["ledger", "runtime"] {
        let from = data_dir.join(part);
        if from.exists() {
            std::fs::rename(&from, aside.join(part))
                .map_err(|e| format!("cannot move {} aside: {e}", from.display()))?;
        }
    }
    Ok(aside)
}

/// Takes the snapshot of `peer` into `dir` (its state store and a new block log).
async fn sync_from(
    http: &reqwest::Client,
    peer: &str,
    genesis: &Genesis,
    consensus: &archipel_consensus::engine::ConsensusConfig,
    dir: &Path,
) -> Result<Joined, String> {
    let log_path = dir.join("blocks.log");
    let states = Arc::new(StateDb::open(&dir.join("state.redb")).map_err(|e| e.to_string())?);
    let mut join = Join::new(genesis.ledger_state(), consensus.clone(), states)?;
    let mut response =
        http.get(format!("{peer}/v1/ledger/snapshot")).send().await.map_err(|e| format!("cannot reach it: {e}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(format!("it answered {status}: {body}"));
    }
    let (mut shown, mut last_log) = (0u64, Instant::now());
    loop {
        let chunk = tokio::time::timeout(STALL, response.chunk())
            .await
            .map_err(|_| format!("nothing arrived for {STALL:?}"))?
            .map_err(|e| format!("the transfer broke: {e}"))?;
        let Some(chunk) = chunk else { break };
        join.push(&chunk)?;
        if last_log.elapsed() >= Duration::from_secs(2) && join.entries() > shown {
            shown = join.entries();
            last_log = Instant::now();
            tracing::info!(peer, entries = shown, "--join: receiving the state");
        }
    }
    let Some((height, _)) = join.claimed() else { return Err("the snapshot is empty".into()) };
    // A log holding no block (a join cut short) is replaced; one holding blocks is refused.
    if log_path.exists() {
        let old = FileStore::open(&log_path)?;
        if old.height() >= old.first() {
            return Err(format!("{} already holds blocks", log_path.display()));
        }
        drop(old);
        std::fs::remove_file(&log_path).map_err(|e| format!("cannot remove {}: {e}", log_path.display()))?;
    }
    let mut log = FileStore::create_at(&log_path, height)?;
    let joined = join.finish(&mut log);
    if joined.is_err() {
        drop(log);
        let _ = std::fs::remove_file(&log_path);
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_or_blockless_ledger_is_empty_and_one_with_blocks_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(local_height(dir.path()).unwrap(), None, "nothing on disk");
        drop(FileStore::create_at(&dir.path().join("blocks.log"), 500).unwrap());
        assert_eq!(local_height(dir.path()).unwrap(), None, "a joined log that got no block");
        let mut log = FileStore::open(&dir.path().join("blocks.log")).unwrap();
        log.append(&archipel_consensus::Record { block: vec![1; 40], certificate: Vec::new() }).unwrap();
        drop(log);
        assert_eq!(local_height(dir.path()).unwrap(), Some(500));
    }
}
