//! The ledger's HTTP API: submit transactions (and wait for finality), read blocks, accounts and
//! transactions, export the chain, and get proofs checkable offline.
//!
//! Transactions carry their own signature, so `POST /v1/tx` needs no request signature; reads
//! are public like the rest of a ledger.

use crate::api::{ApiState, error};
use archipel_consensus::{Proven, TxLocation, TxStatus};
use archipel_ledger::{
    Account, Block, BlockHeader, Hash, LeaseStatus, SignedTransaction, StateKey, StateProof, TxProof,
};
use archipel_types::NodeId;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Longest `?wait=final` / `wait_ms` wait.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The ledger routes.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/tx", post(submit))
        .route("/v1/txs", post(submit_batch))
        .route("/v1/tx/{hash}", get(tx_status))
        .route("/v1/ledger/head", get(head))
        .route("/v1/ledger/blocks", get(blocks))
        .route("/v1/ledger/blocks/{height}", get(block))
        .route("/v1/ledger/export", get(export))
        .route("/v1/accounts/{id}", get(account))
        .route("/v1/proof/tx/{hash}", get(prove_tx))
        .route("/v1/proof/state/{*key}", get(prove_state))
}

/// `POST /v1/tx` answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubmitResponse {
    /// The transaction hash.
    pub hash: Hash,
    /// Where it is.
    #[serde(flatten)]
    pub status: TxStatus,
}

/// `POST /v1/tx` query.
#[derive(Debug, Deserialize)]
pub struct SubmitQuery {
    /// `final` to answer only once the transaction is in a finalized block.
    pub wait: Option<String>,
    /// How long to wait (ms, default 30 000).
    pub timeout_ms: Option<u64>,
}

async fn submit(
    State(s): State<Arc<ApiState>>,
    Query(q): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let max = s.genesis.ledger.max_tx_bytes as usize;
    let json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("json"));
    let stx = if json {
        match serde_json::from_slice::<SignedTransaction>(&body) {
            Ok(t) => t,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "malformed",
                    format!("the body is not a signed transaction: {e}"),
                );
            }
        }
    } else {
        match SignedTransaction::from_bytes(&body, max) {
            Ok(t) => t,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.code(), e.to_string()),
        }
    };
    let bytes = stx.to_bytes();
    tracing::debug!("transaction submitted");
    let hash = match s.chain.submit(stx, bytes.len(), archipel_consensus::app::system_now_ms()) {
        Ok(h) => h,
        Err(e) => {
            let status =
                if e.code() == "mempool_full" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::BAD_REQUEST };
            return error(status, e.code(), e.to_string());
        }
    };
    let _ = s.tx_out.send(bytes);
    match q.wait.as_deref() {
        None => (StatusCode::ACCEPTED, Json(SubmitResponse { hash, status: s.chain.tx_status(&hash) })).into_response(),
        Some("final") => {
            let timeout = Duration::from_millis(q.timeout_ms.unwrap_or(30_000)).min(MAX_WAIT);
            match wait_final(&s, hash, timeout).await {
                Some(loc) => Json(SubmitResponse { hash, status: TxStatus::Final(loc) }).into_response(),
                None => (
                    StatusCode::GATEWAY_TIMEOUT,
                    Json(serde_json::json!({
                        "error": "not_final_yet",
                        "message": format!("transaction {hash} was accepted but is not final after {} ms; check it with GET /v1/tx/{hash}", timeout.as_millis()),
                        "hash": hash,
                    })),
                )
                    .into_response(),
            }
        }
        Some(other) => {
            error(StatusCode::BAD_REQUEST, "bad_query", format!("wait={other} is not supported: use wait=final"))
        }
    }
}

/// Most transactions in one `POST /v1/txs`.
pub const MAX_BATCH: usize = 1_000;

/// One answer of `POST /v1/txs`: the hash, or why the transaction was refused.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchItem {
    /// The transaction hash (if it decoded).
    pub hash: Option<Hash>,
    /// Refusal code, if refused.
    pub error: Option<String>,
    /// Refusal reason, if refused.
    pub message: Option<String>,
}

/// `POST /v1/txs`: many encoded transactions, each as a 4-byte big-endian length and the bytes
/// (the ledger export's record framing); answers one item per transaction, in order.
async fn submit_batch(State(s): State<Arc<ApiState>>, body: Bytes) -> Response {
    let max = s.genesis.ledger.max_tx_bytes as usize;
    let mut at = 0;
    // Decoded transactions go to the chain in one call (one signature batch); the others are
    // answered here.
    let (mut decoded, mut encoded) = (Vec::new(), Vec::new());
    let mut out: Vec<Option<BatchItem>> = Vec::new();
    while at < body.len() {
        if out.len() == MAX_BATCH {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                format!("at most {MAX_BATCH} transactions per batch"),
            );
        }
        let record = match archipel_ledger::export::take_record(&body, &mut at, max) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, "malformed", format!("transaction {}: {e}", out.len())),
        };
        match SignedTransaction::from_bytes(record, max) {
            Err(e) => {
                out.push(Some(BatchItem { hash: None, error: Some(e.code().into()), message: Some(e.to_string()) }))
            }
            Ok(stx) => {
                decoded.push((stx, record.len()));
                encoded.push(record.to_vec());
                out.push(None);
            }
        }
    }
    let Some(results) = crate::txgossip::admit(&s.chain, decoded).await else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "admission stopped");
    };
    let mut results = results.into_iter().zip(encoded);
    let out: Vec<BatchItem> = out
        .into_iter()
        .map(|item| {
            item.unwrap_or_else(|| match results.next().expect("one result per decoded transaction") {
                (Ok(h), bytes) => {
                    let _ = s.tx_out.send(bytes);
                    BatchItem { hash: Some(h), error: None, message: None }
                }
                (Err(e), _) => BatchItem { hash: None, error: Some(e.code().into()), message: Some(e.to_string()) },
            })
        })
        .collect();
    Json(out).into_response()
}

async fn wait_final(s: &ApiState, hash: Hash, timeout: Duration) -> Option<TxLocation> {
    match s.chain.watch_tx(hash) {
        Ok(loc) => Some(loc),
        Err(rx) => tokio::time::timeout(timeout, rx).await.ok()?.ok(),
    }
}

async fn tx_status(State(s): State<Arc<ApiState>>, Path(hash): Path<String>) -> Response {
    let hash: Hash = match hash.parse() {
        Ok(h) => h,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_hash", e),
    };
    Json(SubmitResponse { hash, status: s.chain.tx_status(&hash) }).into_response()
}

/// `GET /v1/ledger/head`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeadView {
    /// Network name.
    pub network: String,
    /// Genesis hash.
    pub genesis_hash: String,
    /// The last finalized header.
    pub header: BlockHeader,
    /// Its hash.
    pub hash: Hash,
    /// Transactions waiting in this node's mempool.
    pub mempool: usize,
}

async fn head(State(s): State<Arc<ApiState>>) -> Response {
    let header = s.chain.head();
    Json(HeadView {
        network: s.genesis.network.clone(),
        genesis_hash: s.genesis_hash.clone(),
        header,
        hash: header.hash(),
        mempool: s.chain.mempool_len(),
    })
    .into_response()
}

/// A finalized block with its hash, transaction hashes and finality certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockView {
    /// The block hash.
    pub hash: Hash,
    /// The header.
    pub header: BlockHeader,
    /// Lease changes the validators decided in this block.
    #[serde(default)]
    pub liveness: Vec<archipel_ledger::LivenessChange>,
    /// The transactions with their hashes.
    pub txs: Vec<TxView>,
    /// Hex finality certificate (empty for the genesis).
    pub certificate: String,
}

/// A transaction and its hash.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TxView {
    /// The hash.
    pub hash: Hash,
    /// The transaction.
    #[serde(flatten)]
    pub tx: SignedTransaction,
}

fn block_view(block: Block, certificate: &[u8]) -> BlockView {
    BlockView {
        hash: block.hash(),
        header: block.header,
        liveness: block.liveness,
        txs: block.txs.into_iter().map(|t| TxView { hash: t.hash(), tx: t }).collect(),
        certificate: hex::encode(certificate),
    }
}

fn internal(e: String) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e)
}

async fn block(State(s): State<Arc<ApiState>>, Path(height): Path<u64>) -> Response {
    if height == 0 {
        return Json(block_view(Block { header: s.chain.genesis(), liveness: Vec::new(), txs: Vec::new() }, &[]))
            .into_response();
    }
    match s.chain.block(height) {
        Ok(Some((b, c))) => Json(block_view(b, &c)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no_such_block",
            format!("block {height} is not finalized yet (head is {})", s.chain.head().height),
        ),
        Err(e) => internal(e),
    }
}

/// `GET /v1/ledger/blocks` query.
#[derive(Debug, Deserialize)]
pub struct BlocksQuery {
    /// First height (default 1).
    pub from: Option<u64>,
    /// Most blocks (default 100, at most 1000).
    pub limit: Option<u64>,
    /// If no block at `from` exists yet, wait this long for one (ms).
    pub wait_ms: Option<u64>,
}

async fn blocks(State(s): State<Arc<ApiState>>, Query(q): Query<BlocksQuery>) -> Response {
    let from = q.from.unwrap_or(1).max(1);
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    if let (Some(ms), Err(rx)) = (q.wait_ms, s.chain.watch_height(from - 1)) {
        let _ = tokio::time::timeout(Duration::from_millis(ms).min(MAX_WAIT), rx).await;
    }
    let head = s.chain.head().height;
    let mut out = Vec::new();
    for h in from..=head.min(from + limit - 1) {
        match s.chain.block(h) {
            Ok(Some((b, c))) => out.push(block_view(b, &c)),
            Ok(None) => break,
            Err(e) => return internal(e),
        }
    }
    Json(out).into_response()
}

async fn export(State(s): State<Arc<ApiState>>) -> Response {
    let mut out = archipel_ledger::export::start(&s.genesis.canonical_bytes());
    match s.chain.raw_blocks_from(1) {
        Ok(raw) => out.extend_from_slice(&raw),
        Err(e) => return internal(e),
    }
    ([(header::CONTENT_TYPE, "application/octet-stream")], out).into_response()
}

/// `GET /v1/accounts/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccountView {
    /// The account.
    pub id: NodeId,
    /// Balance and next nonce.
    #[serde(flatten)]
    pub account: Account,
    /// Height of the finalized state this was read from.
    pub height: u64,
    /// Lease status if the account is a registered node.
    pub lease: Option<LeaseStatus>,
}

async fn account(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let id: NodeId = match id.parse() {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_account", format!("{e}")),
    };
    let view = s.chain.with_state(|st| AccountView {
        id,
        account: st.account(&id),
        height: st.chain().height,
        lease: st.nodes().contains_key(&id).then(|| st.lease_status(&id)),
    });
    Json(view).into_response()
}

/// A proof with the finality certificate of its block.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Proof<P> {
    /// The network's genesis hash (the validators come from that genesis).
    pub genesis_hash: String,
    /// The proof.
    #[serde(flatten)]
    pub proof: P,
    /// Headers from the child of `proof.header` up to the block `certificate` finalizes (empty
    /// when that is `proof.header` itself): a block finalized as an ancestor has no certificate
    /// of its own.
    #[serde(default)]
    pub links: Vec<BlockHeader>,
    /// Hex finality certificate of the last linked header (empty at the genesis).
    pub certificate: String,
}

/// What `archipel proof verify` reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AnyProof {
    /// A transaction proof.
    Tx(Proof<TxProof>),
    /// A state proof.
    State(Proof<StateProof>),
}

fn proof_answer<P: Serialize>(s: &ApiState, answer: Result<Proven<P>, String>, unknown: String) -> Response {
    match answer {
        Ok(Proven::Ready { proof, links, certificate }) => {
            Json(Proof { genesis_hash: s.genesis_hash.clone(), proof, links, certificate: hex::encode(certificate) })
                .into_response()
        }
        Ok(Proven::NotYet) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_certified_yet",
            "final, but the certificate covering it has not arrived yet: retry in a moment",
        ),
        Ok(Proven::Unknown) => error(StatusCode::NOT_FOUND, "not_found", unknown),
        Err(e) => internal(e),
    }
}

async fn prove_tx(State(s): State<Arc<ApiState>>, Path(hash): Path<String>) -> Response {
    let hash: Hash = match hash.parse() {
        Ok(h) => h,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_hash", e),
    };
    let unknown = format!("transaction {hash} is not in a finalized block ({:?} here)", s.chain.tx_status(&hash));
    proof_answer(&s, s.chain.prove_tx(&hash), unknown)
}

async fn prove_state(State(s): State<Arc<ApiState>>, Path(key): Path<String>) -> Response {
    let key: StateKey = match key.parse() {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_key", e),
    };
    proof_answer(&s, s.chain.prove_state(&key), format!("{key} is not in the state"))
}
