//! `archipel node run --join`: a node with no ledger, or one far behind the network, takes the
//! state from a peer instead of replaying every block since the genesis.
//!
//! Runs before consensus starts. The peers asked are the genesis nodes at their API addresses
//! (any node serves `GET /v1/ledger/snapshot`), in an order that differs per node so joiners
//! spread out. Nothing a peer sends is trusted: `archipel_consensus::join` checks the blocks'
//! links, a quorum's finality certificate and the entries against the final state root, and a
//! peer whose snapshot fails — or is far older than the network's head, or trickles — is skipped
//! for the next. A node whose ledger is more than [`REJOIN_BEHIND_BLOCKS`] behind the network's
//! head (the median of what the peers report) moves its ledger and marshal's storage aside
//! (`<data dir>/replaced-<unix seconds>/`, for the operator to delete) and joins afresh; so does a
//! node whose ledger cannot be resumed (a join cut short).

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

/// Longest wait for the answer, or for the next piece of a snapshot, before the peer is given up.
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

/// The ledger's height on disk: `None` when there is nothing to resume from — no block and no
/// committed state, or a log that starts above the genesis (a join) without a committed state at
/// or above its first block (a join cut short by a crash).
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
    if log.first() > 1 && committed.is_none_or(|c| c.height < log.first()) {
        return Ok(None);
    }
    Ok(Some(log.height()))
}

/// The API URLs of the genesis nodes but `me`, in an order that changes from start to start (a
/// peer that wastes a joiner's time is not asked first every time).
fn peers(genesis: &Genesis, me: &NodeId) -> Vec<String> {
    let mut urls: Vec<String> = genesis
        .nodes
        .iter()
        .filter(|n| n.descriptor.node_id != *me)
        .map(|n| format!("http://{}", n.descriptor.api_address))
        .collect();
    if !urls.is_empty() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let turn = (me.0.iter().map(|b| *b as usize).sum::<usize>() + nanos as usize) % urls.len();
        urls.rotate_left(turn);
    }
    urls
}

/// The median of the heads the peers report (`None` if none answers): one peer lying about its
/// head moves it by at most one place.
fn median(mut heads: Vec<u64>) -> Option<u64> {
    heads.sort_unstable();
    heads.get(heads.len().checked_sub(1)? / 2).copied()
}

/// Why a peer gave no state.
#[derive(Debug)]
enum Refused {
    /// It has nothing past the genesis to give (a young network).
    NothingYet,
    /// Anything else: the next peer is asked.
    Failed(String),
}

/// Before consensus starts, with `--join`: syncs the state from a peer when this node's ledger
/// (`<data dir>/ledger`) is empty or more than `behind` blocks behind the network's head (the
/// median of the peers' heads; [`REJOIN_BEHIND_BLOCKS`] unless the operator says otherwise).
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
        let network_head = median(heads(&http, &peers).await);
        match (local, network_head) {
            (Some(height), None) => {
                tracing::warn!(height, "--join: no peer answered with its head: going on with this node's ledger");
                return Ok(Prepared::Kept);
            }
            (Some(height), Some(head)) if head <= height.saturating_add(behind) => {
                tracing::info!(height, head, "--join: the ledger is close enough to the network's head to catch up by blocks");
                return Ok(Prepared::Kept);
            }
            (Some(height), Some(head)) => {
                let aside = move_aside(data_dir).map_err(invalid)?;
                tracing::warn!(height, head, aside = %aside.display(), "--join: the ledger is far behind the network: moved aside, syncing the state instead");
            }
            (None, _) if dir.read_dir().is_ok_and(|mut d| d.next().is_some()) => {
                // What is there cannot be resumed (a join cut short): keep it aside, start afresh.
                let aside = move_aside(data_dir).map_err(invalid)?;
                tracing::warn!(aside = %aside.display(), "--join: the ledger cannot be resumed: moved aside");
            }
            (None, _) => {}
        }
        std::fs::create_dir_all(&dir).map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
        // A snapshot much older than the network's head is refused: the blocks after it may be
        // pruned everywhere.
        let oldest = network_head.map_or(0, |h| h.saturating_sub(behind));
        let (mut failures, mut nothing_yet) = (Vec::new(), 0);
        for peer in &peers {
            let started = Instant::now();
            match sync_from(&http, peer, genesis, consensus, &dir, oldest).await {
                Ok(joined) => return Ok(Prepared::Joined { peer: peer.clone(), joined, took: started.elapsed() }),
                Err(Refused::NothingYet) => {
                    tracing::info!(peer = %peer, "--join: the peer has no state past the genesis yet");
                    nothing_yet += 1;
                }
                Err(Refused::Failed(e)) => {
                    tracing::warn!(peer = %peer, error = %e, "--join: state sync from this peer failed; trying the next");
                    failures.push(format!("{peer}: {e}"));
                }
            }
        }
        // Only a fresh node on a young network starts from the genesis, and only when no peer
        // answered otherwise: one peer saying so is not enough.
        if local.is_none() && nothing_yet > 0 && failures.is_empty() {
            tracing::info!("--join: no peer has a state past the genesis: starting from the genesis");
            return Ok(Prepared::Kept);
        }
        Err(invalid(format!(
            "no peer gave a state that checks out ({}); start without --join to replay the chain from the genesis",
            if peers.is_empty() { "no other node in the genesis".to_string() } else { failures.join("; ") }
        )))
    })
}

/// The heads the peers report (those that answer within 3 s).
async fn heads(http: &reqwest::Client, peers: &[String]) -> Vec<u64> {
    let mut out = Vec::new();
    for peer in peers {
        let head = async {
            let response =
                http.get(format!("{peer}/v1/ledger/head")).timeout(Duration::from_secs(3)).send().await.ok()?;
            let body = bounded_body(response, 64 * 1024).await?;
            let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
            v["header"]["height"].as_u64()
        };
        if let Some(h) = head.await {
            out.push(h);
        }
    }
    out
}

/// At most `max` bytes of `response`'s body (`None` past that, or on a broken transfer).
async fn bounded_body(mut response: reqwest::Response, max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(3), response.chunk()).await.ok()?.ok()? {
        out.extend_from_slice(&chunk);
        if out.len() > max {
            return None;
        }
    }
    Some(out)
}

/// Moves `<data dir>/ledger` and marshal's storage (`<data dir>/runtime/archipel-marshal-*`) into
/// `<data dir>/replaced-<unix seconds>`. Simplex's journal stays: a validator must remember the
/// votes it cast.
fn move_aside(data_dir: &Path) -> Result<std::path::PathBuf, String> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let aside = data_dir.join(format!("replaced-{secs}"));
    std::fs::create_dir_all(aside.join("runtime")).map_err(|e| format!("cannot create {}: {e}", aside.display()))?;
    let mut moves = vec![(data_dir.join("ledger"), aside.join("ledger"))];
    if let Ok(entries) = std::fs::read_dir(data_dir.join("runtime")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("archipel-marshal") {
                moves.push((e.path(), aside.join("runtime").join(e.file_name())));
            }
        }
    }
    for (from, to) in moves {
        if from.exists() {
            std::fs::rename(&from, &to).map_err(|e| format!("cannot move {} aside: {e}", from.display()))?;
        }
    }
    Ok(aside)
}

/// The least a snapshot must arrive at, once it has run for a minute (a peer trickling bytes is
/// given up, whatever its pauses).
const MIN_BYTES_PER_SECOND: u64 = 64 * 1024;

/// Takes the snapshot of `peer` into `dir` (its state store and a new block log), refusing one
/// below height `oldest`.
async fn sync_from(
    http: &reqwest::Client,
    peer: &str,
    genesis: &Genesis,
    consensus: &archipel_consensus::engine::ConsensusConfig,
    dir: &Path,
    oldest: u64,
) -> Result<Joined, Refused> {
    let failed = Refused::Failed;
    let log_path = dir.join("blocks.log");
    let states = Arc::new(StateDb::open(&dir.join("state.redb")).map_err(|e| failed(e.to_string()))?);
    let mut join = Join::new(genesis.ledger_state(), consensus.clone(), states).map_err(failed)?;
    let started = Instant::now();
    let mut response = tokio::time::timeout(STALL, http.get(format!("{peer}/v1/ledger/snapshot")).send())
        .await
        .map_err(|_| failed(format!("no answer within {STALL:?}")))?
        .map_err(|e| failed(format!("cannot reach it: {e}")))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = bounded_body(response, 4 * 1024).await.unwrap_or_default();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && body.contains("\"no_snapshot\"") {
            return Err(Refused::NothingYet);
        }
        return Err(failed(format!("it answered {status}: {body}")));
    }
    let (mut received, mut shown, mut last_log) = (0u64, 0u64, Instant::now());
    while !join.ended() {
        let chunk = tokio::time::timeout(STALL, response.chunk())
            .await
            .map_err(|_| failed(format!("nothing arrived for {STALL:?}")))?
            .map_err(|e| failed(format!("the transfer broke: {e}")))?;
        let Some(chunk) = chunk else { break };
        received += chunk.len() as u64;
        join.push(&chunk).map_err(failed)?;
        match join.claimed() {
            Some((0, _)) => return Err(Refused::NothingYet),
            Some((h, _)) if h < oldest => {
                return Err(failed(format!(
                    "its state is at block {h}, far behind the network's head (below {oldest})"
                )));
            }
            _ => {}
        }
        let elapsed = started.elapsed();
        if elapsed > Duration::from_secs(60) && received < MIN_BYTES_PER_SECOND * elapsed.as_secs() {
            return Err(failed(format!("{received} bytes in {:.0} s: too slow", elapsed.as_secs_f64())));
        }
        if last_log.elapsed() >= Duration::from_secs(2) && join.entries() > shown {
            shown = join.entries();
            last_log = Instant::now();
            tracing::info!(peer, entries = shown, "--join: receiving the state");
        }
    }
    let Some((height, _)) = join.claimed() else { return Err(failed("the snapshot is empty".into())) };
    let _ = std::fs::remove_file(&log_path);
    let mut log = FileStore::create_at(&log_path, height).map_err(failed)?;
    let joined = join.finish(&mut log);
    if joined.is_err() {
        drop(log);
        let _ = std::fs::remove_file(&log_path);
    }
    joined.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::genesis::GenesisAccount;
    use archipel_crypto::{Identity, SignedDescriptor};

    #[test]
    fn what_cannot_be_resumed_is_empty_and_a_log_from_the_genesis_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(local_height(dir.path()).unwrap(), None, "nothing on disk");
        drop(FileStore::create_at(&dir.path().join("blocks.log"), 500).unwrap());
        assert_eq!(local_height(dir.path()).unwrap(), None, "a joined log that got no block");
        let mut log = FileStore::open(&dir.path().join("blocks.log")).unwrap();
        log.append(&archipel_consensus::Record { block: vec![1; 40], certificate: Vec::new() }).unwrap();
        drop(log);
        assert_eq!(local_height(dir.path()).unwrap(), None, "a join cut short: blocks from 500 but no state there");
        let other = tempfile::tempdir().unwrap();
        let mut log = FileStore::open(&other.path().join("blocks.log")).unwrap();
        log.append(&archipel_consensus::Record { block: vec![1; 40], certificate: Vec::new() }).unwrap();
        drop(log);
        assert_eq!(local_height(other.path()).unwrap(), Some(1), "a log from the genesis rebuilds its state");
    }

    #[test]
    fn the_median_head_moves_one_place_per_liar() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![7]), Some(7));
        assert_eq!(median(vec![100, u64::MAX, 101]), Some(101));
        assert_eq!(median(vec![100, 0, 101, u64::MAX]), Some(100));
    }

    /// A genesis whose other nodes are the `peers` (API addresses) and this node (seed 1).
    fn genesis_with(peers: &[std::net::SocketAddr]) -> (Genesis, NodeId) {
        let mut nodes = Vec::new();
        for (i, addr) in std::iter::once(&"127.0.0.1:9".parse().unwrap()).chain(peers).enumerate() {
            let id = Identity::from_seed(1 + i as u64);
            let mut d = archipel_crypto::test_support::example_descriptor(&id);
            d.name = format!("n{i}");
            d.api_address = *addr;
            d.p2p_address = format!("127.0.0.{}:1", 10 + i).parse().unwrap();
            d.roles = "validator".parse().unwrap();
            nodes.push(SignedDescriptor::sign(&id, d).unwrap());
        }
        let genesis = Genesis {
            network: "join-test".into(),
            created_at_ms: 1,
            validators: nodes.iter().map(|n| n.descriptor.node_id).collect(),
            nodes,
            accounts: vec![GenesisAccount {
                name: "t".into(),
                key: Identity::from_seed(50).node_id(),
                balance_micro: 1,
            }],
            membership: Default::default(),
            ledger: Default::default(),
        };
        (genesis, Identity::from_seed(1).node_id())
    }

    /// A peer answering `/v1/ledger/head` with `head` and `/v1/ledger/snapshot` with `snapshot`.
    fn peer(rt: &tokio::runtime::Runtime, head: u64, snapshot: (u16, Vec<u8>)) -> std::net::SocketAddr {
        use axum::routing::get;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (status, body) = snapshot;
        let app = axum::Router::new()
            .route(
                "/v1/ledger/head",
                get(move || async move { axum::Json(serde_json::json!({"header": {"height": head}})) }),
            )
            .route(
                "/v1/ledger/snapshot",
                get(move || {
                    let body = body.clone();
                    async move { (axum::http::StatusCode::from_u16(status).unwrap(), body) }
                }),
            );
        rt.spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn run(genesis: &Genesis, me: &NodeId, data: &Path) -> Result<Prepared, NodeError> {
        let cfg = crate::ledger_verify::consensus_config(genesis);
        prepare_ledger(data, genesis, &cfg, me, REJOIN_BEHIND_BLOCKS)
    }

    #[test]
    fn peers_that_lie_or_have_nothing_are_named_and_leave_no_state() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let no_snapshot =
            br#"{"error":"no_snapshot","message":"the state store holds no committed state yet"}"#.to_vec();
        let mut garbage = archipel_consensus::join::head(5, archipel_ledger::Hash::ZERO);
        garbage.extend_from_slice(&[9; 40]);
        // Every peer lies or fails: an error naming each, and nothing committed.
        let liars = [peer(&rt, 10, (200, garbage.clone())), peer(&rt, 10, (500, b"oops".to_vec()))];
        let (genesis, me) = genesis_with(&liars);
        let data = tempfile::tempdir().unwrap();
        let err = run(&genesis, &me, data.path()).unwrap_err().to_string();
        assert!(err.contains("unknown frame tag") && err.contains("500"), "{err}");
        let states = StateDb::open(&data.path().join("ledger/state.redb")).unwrap();
        assert_eq!(states.committed().unwrap(), None, "nothing committed");
        drop(states);
        assert!(!data.path().join("ledger/blocks.log").exists(), "no log left behind");
        // Every peer has nothing yet: a fresh node starts from the genesis.
        let young = [peer(&rt, 3, (503, no_snapshot.clone())), peer(&rt, 3, (503, no_snapshot.clone()))];
        let (genesis, me) = genesis_with(&young);
        assert_eq!(run(&genesis, &me, tempfile::tempdir().unwrap().path()).unwrap(), Prepared::Kept);
        // One peer saying so is not enough when another has a state (here a lying one).
        let mixed = [peer(&rt, 3, (503, no_snapshot)), peer(&rt, 3, (200, garbage))];
        let (genesis, me) = genesis_with(&mixed);
        assert!(run(&genesis, &me, tempfile::tempdir().unwrap().path()).is_err());
        // A snapshot far older than the network's head is refused before it is read.
        let old = archipel_consensus::join::head(5, archipel_ledger::Hash::ZERO);
        let stale = [peer(&rt, 50_000, (200, old.clone())), peer(&rt, 50_000, (200, old))];
        let (genesis, me) = genesis_with(&stale);
        let err = run(&genesis, &me, tempfile::tempdir().unwrap().path()).unwrap_err().to_string();
        assert!(err.contains("far behind the network's head"), "{err}");
    }
}
