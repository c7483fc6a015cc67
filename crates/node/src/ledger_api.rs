//! The ledger's HTTP API: submit transactions (and wait for finality), read blocks, accounts and
//! transactions, export the chain, and get proofs checkable offline.
//!
//! Transactions carry their own signature, so `POST /v1/tx` needs no request signature; reads
//! are public like the rest of a ledger. Submissions are charged to their source address's
//! budget (`api.limits.txs_per_second_per_ip`), one per transaction, before anything is decoded.
//!
//! Every answer is bounded, so no caller holds the chain lock or the node's memory for long:
//! block lists hold at most [`MAX_BLOCKS_PER_PAGE`] blocks, waits end after [`MAX_WAIT`], and the
//! export streams the block log in chunks read under short locks.

use crate::api::{ApiState, error, request_source, retry_later};
use archipel_consensus::chain::TxWatch;
use archipel_consensus::{Chain, Proven, TxLocation, TxStatus};
use archipel_ledger::{
    Account, Block, BlockHeader, Hash, LeaseStatus, SignedTransaction, StateKey, StateProof, TxProof,
};
use archipel_types::NodeId;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Longest `?wait=final` / `wait_ms` wait; a transaction not final by then is answered as still
/// pending.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Most blocks in one `GET /v1/ledger/blocks` answer (a larger `limit` gets this many).
pub const MAX_BLOCKS_PER_PAGE: u64 = 100;

/// Most blocks in one export chunk.
pub const EXPORT_CHUNK_BLOCKS: u64 = 256;

/// Most bytes in one export chunk (whole blocks; a larger block is a chunk of its own).
pub const EXPORT_CHUNK_BYTES: u64 = 1 << 20;

/// The query parameters of a request, parsed one by one so that a bad value is answered with
/// 400 naming the parameter.
type Params = Query<HashMap<String, String>>;

/// A query parameter that is not acceptable (the message starts with `name=`); answered with
/// 400 `bad_query`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadQuery(pub String);

impl IntoResponse for BadQuery {
    fn into_response(self) -> Response {
        error(StatusCode::BAD_REQUEST, "bad_query", self.0)
    }
}

/// The whole-number parameter `name`, if given.
fn param_u64(params: &HashMap<String, String>, name: &str) -> Result<Option<u64>, BadQuery> {
    match params.get(name) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| BadQuery(format!("{name}={v:?} is not a whole number between 0 and {}", u64::MAX))),
    }
}

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
        .route("/v1/ledger/snapshot", get(snapshot))
        .route("/v1/accounts/{id}", get(account))
        .route("/v1/accounts/{id}/revocations", get(revocations))
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

/// What admitting `stx` costs its source in the admission queue: one per transaction, a
/// `transfer_many` one per credit.
fn admission_cost(stx: &SignedTransaction) -> u64 {
    match &stx.tx.payload {
        archipel_ledger::Payload::TransferMany { credits } => credits.len().max(1) as u64,
        _ => 1,
    }
}

/// `POST /v1/tx?wait=final&timeout_ms=N`: answers once the transaction is final, or after
/// `timeout_ms` (default and at most [`MAX_WAIT`]) with its status (`pending`).
async fn submit(
    State(s): State<Arc<ApiState>>,
    connection: Option<Extension<ConnectInfo<SocketAddr>>>,
    Query(q): Params,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = s.guards.charge_txs(request_source(connection.as_deref()), 1) {
        return refused;
    }
    let wait = match (q.get("wait").map(String::as_str), param_u64(&q, "timeout_ms")) {
        (_, Err(bad)) => return bad.into_response(),
        (None, _) => None,
        (Some("final"), Ok(ms)) => Some(ms.map_or(MAX_WAIT, |ms| Duration::from_millis(ms).min(MAX_WAIT))),
        (Some(other), _) => {
            return BadQuery(format!("wait={other:?} is not supported: use wait=final")).into_response();
        }
    };
    let max = s.genesis.ledger.max_tx_bytes as usize;
    let json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("json"));
    let stx = if json {
        // What is signed and gossiped is the binary form: a JSON transaction must be exactly
        // one that form decodes to (e.g. no transfer_many with more credits than it counts).
        let parsed = serde_json::from_slice::<SignedTransaction>(&body).map_err(|e| e.to_string()).and_then(|t| {
            match SignedTransaction::from_bytes(&t.to_bytes(), usize::MAX) {
                Ok(back) if back == t => Ok(t),
                Ok(_) => Err("it has no binary encoding (too many credits?)".to_string()),
                Err(e) => Err(e.to_string()),
            }
        });
        match parsed {
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
    tracing::debug!(hash = %stx.hash(), "transaction submitted");
    let (chain, len) = (s.chain.clone(), bytes.len());
    let (source, cost) = (request_source(connection.as_deref()), admission_cost(&stx));
    let state = s.clone();
    let admitted = s
        .admit(source, cost, 1, move || {
            let answer = chain.submit(stx, len, archipel_consensus::app::system_now_ms());
            charge_refusals(&state, source, std::slice::from_ref(&answer));
            answer
        })
        .await;
    let admitted = match admitted {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let hash = match admitted {
        Ok(h) => h,
        Err(e) => {
            // Full pools are this node's state, not the transaction's fault: retry later.
            let status = if matches!(e.code(), "mempool_full" | "gapped_full") {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_REQUEST
            };
            return error(status, e.code(), e.to_string());
        }
    };
    tracing::debug!(%hash, "transaction admitted");
    let _ = s.tx_out.send(bytes);
    let Some(timeout) = wait else {
        return (StatusCode::ACCEPTED, Json(SubmitResponse { hash, status: s.chain.tx_status(&hash) })).into_response();
    };
    match wait_final(&s.chain, hash, timeout).await {
        WaitOutcome::Final(loc) => Json(SubmitResponse { hash, status: TxStatus::Final(loc) }).into_response(),
        WaitOutcome::TimedOut => still_pending(&s.chain, hash, timeout),
        WaitOutcome::Busy => retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_waiters",
            format!(
                "transaction {hash} was accepted, but {} requests already wait for finality on this node: check it with GET /v1/tx/{hash}",
                archipel_consensus::chain::MAX_TX_WAITERS
            ),
            Duration::from_secs(1),
        ),
    }
}

/// 202 with the status of a transaction that was not final within `waited`.
fn still_pending(chain: &Chain, hash: Hash, waited: Duration) -> Response {
    let status = chain.tx_status(&hash);
    let mut body = serde_json::to_value(SubmitResponse { hash, status }).unwrap_or_default();
    body["message"] = serde_json::Value::String(format!(
        "transaction {hash} was accepted and is still pending after {} ms: check it with GET /v1/tx/{hash}",
        waited.as_millis()
    ));
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

/// Tells the admission queue how many of a job's `answers` the mempool refused: a flood of
/// transactions that will never be final (over-spending, behind a nonce gap) is then paced at an
/// eighth of the rate (`fair_queue::REFUSED_SHARE`), and its address waits its turn behind the
/// others, while addresses whose transactions are admitted keep the whole pace. Congestion (a full
/// pool, a full account quota: `MempoolError::is_congestion`) is not counted.
/// Figures in ARCHITECTURE.md (issue 17).
fn charge_refusals(s: &ApiState, source: std::net::IpAddr, answers: &[Result<Hash, archipel_ledger::MempoolError>]) {
    s.admission.refused(source, archipel_ledger::MempoolError::refusals(answers) as u64);
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
async fn submit_batch(
    State(s): State<Arc<ApiState>>,
    connection: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Bytes,
) -> Response {
    let max = s.genesis.ledger.max_tx_bytes as usize;
    // The budget is charged by the records sent (framing only: nothing decoded yet), at most
    // one more than a batch may hold.
    let mut records = 0;
    let mut at = 0;
    while records <= MAX_BATCH && archipel_ledger::export::take_record(&body, &mut at, max).is_ok() {
        records += 1;
    }
    if let Some(refused) = s.guards.charge_txs(request_source(connection.as_deref()), records.max(1)) {
        return refused;
    }
    let mut at = 0;
    // Decoded transactions go to admission chunk by chunk (one signature batch each); the others
    // are answered here.
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
    // Admitted a chunk at a time, each in the source's turn: a large batch never holds the
    // admission queue (or its pace's budget) for long in one piece. Each chunk's admitted
    // transactions are gossiped as soon as it is done.
    let source = request_source(connection.as_deref());
    let chunks = chunked(decoded, encoded);
    let admit = |chunk: Vec<(SignedTransaction, usize)>| {
        let (chain, now_ms) = (s.chain.clone(), archipel_consensus::app::system_now_ms());
        let cost = chunk.iter().map(|(stx, _)| admission_cost(stx)).sum();
        let work = chunk.len() as u64;
        let (state, admission) = (s.clone(), &s.admission);
        async move {
            admission
                .run(source, cost, work, move || {
                    let answers = chain.submit_many(chunk, now_ms);
                    charge_refusals(&state, source, &answers);
                    answers
                })
                .await
        }
    };
    let results = admit_chunks(chunks, admit, |bytes| {
        let _ = s.tx_out.send(bytes.to_vec());
    })
    .await;
    let results = match results {
        Ok(r) => r,
        Err(refused) => return crate::api::refusal(refused),
    };
    let mut results = results.into_iter();
    let out: Vec<BatchItem> = out
        .into_iter()
        .map(|item| {
            item.unwrap_or_else(|| match results.next().expect("one result per decoded transaction") {
                ChunkResult::Admitted(h) => BatchItem { hash: Some(h), error: None, message: None },
                ChunkResult::Refused(e) => {
                    BatchItem { hash: None, error: Some(e.code().into()), message: Some(e.to_string()) }
                }
                ChunkResult::NotRun(refused) => {
                    let (_, code, message) = crate::api::refusal_parts(refused);
                    BatchItem {
                        hash: None,
                        error: Some(code.into()),
                        message: Some(format!(
                            "{message} (this transaction was not admitted; the batch's earlier ones were judged)"
                        )),
                    }
                }
            })
        })
        .collect();
    Json(out).into_response()
}

/// One decoded transaction's answer from [`admit_chunks`].
#[derive(Debug)]
enum ChunkResult {
    /// Admitted (or already known; gossiped): its hash.
    Admitted(Hash),
    /// Judged and refused.
    Refused(archipel_ledger::MempoolError),
    /// Its chunk was not run (the queue refused it after earlier chunks ran).
    NotRun(crate::fair_queue::Refused),
}

/// Decoded transactions (each with its encoded length) and their encodings, admitted together.
type Chunk = Vec<((SignedTransaction, usize), Vec<u8>)>;

/// A batch's decoded transactions with their encodings, in chunks of
/// [`archipel_consensus::chain::SUBMIT_CHUNK`].
fn chunked(decoded: Vec<(SignedTransaction, usize)>, encoded: Vec<Vec<u8>>) -> Vec<Chunk> {
    let mut all = decoded.into_iter().zip(encoded).peekable();
    let mut chunks = Vec::new();
    while all.peek().is_some() {
        chunks.push(all.by_ref().take(archipel_consensus::chain::SUBMIT_CHUNK).collect());
    }
    chunks
}

/// Admits `chunks` in order through `admit` (one admission job each), handing each admitted
/// transaction's encoding to `gossip` as soon as its chunk is done; one answer per transaction.
/// A refusal before anything ran is the request's answer; after that, the chunks left answer
/// [`ChunkResult::NotRun`] and the earlier answers stand.
async fn admit_chunks<F, Fut>(
    chunks: Vec<Chunk>,
    mut admit: F,
    mut gossip: impl FnMut(&[u8]),
) -> Result<Vec<ChunkResult>, crate::fair_queue::Refused>
where
    F: FnMut(Vec<(SignedTransaction, usize)>) -> Fut,
    Fut: std::future::Future<
            Output = Result<Vec<Result<Hash, archipel_ledger::MempoolError>>, crate::fair_queue::Refused>,
        >,
{
    let mut results = Vec::new();
    let mut refused = None;
    for chunk in chunks {
        let (txs, encodings): (Vec<_>, Vec<_>) = chunk.into_iter().unzip();
        if let Some(r) = refused {
            results.extend(encodings.iter().map(|_| ChunkResult::NotRun(r)));
            continue;
        }
        match admit(txs).await {
            Ok(answers) => results.extend(answers.into_iter().zip(encodings).map(|(a, bytes)| match a {
                Ok(h) => {
                    gossip(&bytes);
                    ChunkResult::Admitted(h)
                }
                Err(e) => ChunkResult::Refused(e),
            })),
            Err(r) if results.is_empty() => return Err(r),
            Err(r) => {
                refused = Some(r);
                results.extend(encodings.iter().map(|_| ChunkResult::NotRun(r)));
            }
        }
    }
    Ok(results)
}

/// How a wait for finality ended.
enum WaitOutcome {
    Final(TxLocation),
    TimedOut,
    Busy,
}

/// Waits up to `timeout` for `hash` to be final. The waiter is dropped when this returns or is
/// cancelled (the client went away), and the chain frees it.
async fn wait_final(chain: &Chain, hash: Hash, timeout: Duration) -> WaitOutcome {
    match chain.watch_tx(hash) {
        TxWatch::Final(loc) => WaitOutcome::Final(loc),
        TxWatch::Busy => WaitOutcome::Busy,
        TxWatch::Wait(rx) => match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(loc)) => WaitOutcome::Final(loc),
            _ => WaitOutcome::TimedOut,
        },
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
    /// Of those, how many wait behind a missing nonce (no block can take them yet).
    #[serde(default)]
    pub mempool_gapped: usize,
    /// The protocol version in force, the upgrade scheduled and the newest version this node's
    /// build implements ([`archipel_ledger::upgrade`]).
    #[serde(default)]
    pub protocol: Option<ProtocolView>,
}

/// Which rules the ledger runs under, and which it will.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProtocolView {
    /// In force at the head.
    pub active: u32,
    /// Scheduled, not yet in force.
    pub scheduled: Option<archipel_ledger::upgrade::Upgrade>,
    /// The newest version this node's build implements.
    pub supported: u32,
    /// The fewest blocks between scheduling an upgrade and its height on this network.
    #[serde(default)]
    pub notice_blocks: u64,
    /// Scheduled upgrades cancelled so far: what approvals sign beside the upgrade.
    #[serde(default)]
    pub cancels: u32,
}

async fn head(State(s): State<Arc<ApiState>>) -> Response {
    let header = s.chain.head();
    let (mempool, mempool_gapped) = s.chain.mempool_counts();
    let protocol = s.chain.with_state(|st| ProtocolView {
        active: st.protocol(),
        scheduled: st.scheduled_upgrade(),
        supported: st.supported_protocol(),
        notice_blocks: st.upgrade_notice_blocks(),
        cancels: st.upgrade_cancels(),
    });
    Json(HeadView {
        network: s.genesis.network.clone(),
        genesis_hash: s.genesis_hash.clone(),
        header,
        hash: header.hash(),
        mempool,
        mempool_gapped,
        protocol: Some(protocol),
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
    if let Some(refused) = below_first(&s.chain, height) {
        return refused;
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

/// `GET /v1/ledger/blocks` query, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlocksQuery {
    /// First height (default 1; 0 counts as 1: the genesis is `/v1/ledger/blocks/0`).
    pub from: u64,
    /// Most blocks (default and at most [`MAX_BLOCKS_PER_PAGE`]).
    pub limit: u64,
    /// If no block at `from` exists yet, wait this long for one (at most [`MAX_WAIT`]).
    pub wait: Option<Duration>,
}

impl BlocksQuery {
    /// Parses `from`, `limit` and `wait_ms`; 400 naming the parameter when one is not a number
    /// or `limit` is 0.
    pub fn parse(params: &HashMap<String, String>) -> Result<Self, BadQuery> {
        let from = param_u64(params, "from")?.unwrap_or(1).max(1);
        let limit = match param_u64(params, "limit")? {
            None => MAX_BLOCKS_PER_PAGE,
            Some(0) => return Err(BadQuery(format!("limit=0 asks for no blocks: give 1 to {MAX_BLOCKS_PER_PAGE}"))),
            Some(n) => n.min(MAX_BLOCKS_PER_PAGE),
        };
        let wait = param_u64(params, "wait_ms")?.map(|ms| Duration::from_millis(ms).min(MAX_WAIT));
        Ok(BlocksQuery { from, limit, wait })
    }

    /// The heights to answer with when the head is at `head` (empty when `from` is above it).
    pub fn heights(&self, head: u64) -> std::ops::RangeInclusive<u64> {
        let last = self.from.saturating_add(self.limit - 1).min(head);
        self.from..=last
    }
}

async fn blocks(State(s): State<Arc<ApiState>>, Query(params): Params) -> Response {
    let q = match BlocksQuery::parse(&params) {
        Ok(q) => q,
        Err(bad) => return bad.into_response(),
    };
    if let Some(refused) = below_first(&s.chain, q.from) {
        return refused;
    }
    if let (Some(wait), Err(rx)) = (q.wait, s.chain.watch_height(q.from - 1)) {
        let _ = tokio::time::timeout(wait, rx).await;
    }
    let mut out = Vec::new();
    for h in q.heights(s.chain.head().height) {
        match s.chain.block(h) {
            Ok(Some((b, c))) => out.push(block_view(b, &c)),
            Ok(None) => break,
            Err(e) => return internal(e),
        }
    }
    Json(out).into_response()
}

/// `GET /v1/ledger/export`: the genesis, then the blocks up to the last certified one when the
/// request came, streamed.
async fn export(State(s): State<Arc<ApiState>>, connection: Option<Extension<ConnectInfo<SocketAddr>>>) -> Response {
    let slot = match s.guards.export_slot(request_source(connection.as_deref())) {
        Ok(slot) => slot,
        Err(refused) => return *refused,
    };
    let first = s.chain.first_block();
    if first > 1 {
        return error(
            StatusCode::CONFLICT,
            "blocks_pruned",
            format!(
                "this node holds blocks from height {first} on only (it joined by state sync, or prunes old blocks), so it cannot export the chain from the genesis: export from an archive node"
            ),
        );
    }
    let head = archipel_ledger::export::start(&s.genesis.canonical_bytes());
    match export_body(s.clone(), head, slot).await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response(),
        Err(e) => internal(e),
    }
}

/// Reads the next chunk of an export: blocks from `from` up to `end`, whole blocks within
/// [`EXPORT_CHUNK_BYTES`] (at least one, so a block larger than that is a chunk of its own). The
/// chain's lock is held only to find where the chunk is; the node's export budget
/// ([`crate::config::ApiLimits::export_kib_per_second`]) is paid for its size before it is read;
/// it is read on a blocking thread. Returns the bytes and the last height they hold, and the last
/// certified height.
async fn read_chunk(api: &Arc<ApiState>, from: u64, end: u64) -> Result<(Vec<u8>, u64, u64), String> {
    let want = EXPORT_CHUNK_BLOCKS.min(end.saturating_sub(from) + 1);
    let (plan, certified) = api.chain.plan_raw_blocks(from, want, EXPORT_CHUNK_BYTES);
    api.guards.pace_export(plan.len as usize).await;
    let last = plan.last;
    let bytes = tokio::task::spawn_blocking(plan.read)
        .await
        .map_err(|e| format!("the task reading the block log failed: {e}"))??;
    Ok((bytes, last, certified))
}

/// The export as a stream: `head` (magic, version, genesis) and the first chunk of blocks, read
/// before answering (it fixes where the export ends: the last certified block then), then the
/// rest of the block log in chunks ([`read_chunk`]), each read when the client has taken the
/// previous one. A read error ends the stream early: the client sees a truncated export, never
/// a wrong one.
async fn export_body(api: Arc<ApiState>, mut head: Vec<u8>, slot: crate::api::ExportSlot) -> Result<Body, String> {
    let (first, last, end) = read_chunk(&api, 1, u64::MAX).await?;
    head.extend_from_slice(&first);
    // The slot goes with the stream: released when the stream ends or is dropped.
    let rest = futures::stream::unfold(Some((api, last + 1, slot)), move |cursor| async move {
        let (api, next, slot) = cursor?;
        if next > end {
            return None;
        }
        match read_chunk(&api, next, end).await {
            Ok((bytes, _, _)) if bytes.is_empty() => None,
            Ok((bytes, last, _)) => Some((Ok(Bytes::from(bytes)), Some((api, last + 1, slot)))),
            Err(e) => {
                tracing::error!(error = %e, from = next, "export stopped: cannot read the block log");
                Some((Err(std::io::Error::other(e)), None))
            }
        }
    });
    let head = futures::stream::once(async move { Ok(Bytes::from(head)) });
    Ok(Body::from_stream(futures::StreamExt::chain(head, rest)))
}

/// A 404 naming the first block held, for a block below it (this node joined by state sync or
/// prunes old blocks); `None` for a height it may hold.
fn below_first(chain: &Chain, height: u64) -> Option<Response> {
    let first = chain.first_block();
    (height > 0 && height < first).then(|| {
        error(
            StatusCode::NOT_FOUND,
            "block_pruned",
            format!(
                "block {height} is below the first block this node holds ({first}: it joined by state sync, or prunes old blocks): ask an archive node"
            ),
        )
    })
}

/// Entries per snapshot chunk.
pub const SNAPSHOT_PAGE: usize = 4_096;

/// How long a snapshot may take to read, all of it: past it the pinned view of the state is let go
/// and the stream ends with an error (10^6 entries take seconds at the export budget).
pub const SNAPSHOT_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// `GET /v1/ledger/snapshot`: the state this node last committed, every entry, then the blocks
/// that show it final (the format and its checks: `archipel_consensus::join`). Streamed: each
/// page of entries is read on a blocking thread from one pinned view of the state store, and
/// paid from the node's export budget like an export. The height is in `X-Archipel-Height`.
async fn snapshot(State(s): State<Arc<ApiState>>, connection: Option<Extension<ConnectInfo<SocketAddr>>>) -> Response {
    let slot = match s.guards.export_slot(request_source(connection.as_deref())) {
        Ok(slot) => slot,
        Err(refused) => return *refused,
    };
    let source = match archipel_consensus::join::Source::new(&s.chain) {
        Ok(source) => source,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "no_snapshot", e),
    };
    let height = source.height();
    // The source pins a read of the state store (whose pages redb cannot reuse meanwhile): a
    // client that stops reading must not keep it, so it is dropped at the deadline whether or not
    // the stream is polled again.
    let pinned = Arc::new(std::sync::Mutex::new(Some(source)));
    let timer = tokio::spawn({
        let pinned = Arc::downgrade(&pinned);
        async move {
            tokio::time::sleep(SNAPSHOT_LIFETIME).await;
            if let Some(p) = pinned.upgrade() {
                p.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
        }
    });
    // The timer goes with the stream (aborted when the stream ends or is dropped).
    let timer = AbortOnDrop(timer.abort_handle());
    let body = futures::stream::unfold(Some((s, pinned, (slot, timer))), |cursor| async move {
        let (api, pinned, slot) = cursor?;
        let source = pinned.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(source) = source else {
            let e = format!("the snapshot was not read within {SNAPSHOT_LIFETIME:?}: ask again");
            return Some((Err(std::io::Error::other(e)), None));
        };
        match snapshot_chunk(&api, source).await {
            Ok((bytes, Some(source))) => {
                *pinned.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
                Some((Ok(Bytes::from(bytes)), Some((api, pinned, slot))))
            }
            Ok((bytes, None)) => Some((Ok(Bytes::from(bytes)), None)),
            Err(e) => {
                tracing::warn!(error = %e, "state snapshot stopped");
                Some((Err(std::io::Error::other(e)), None))
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::HeaderName::from_static("x-archipel-height"), height.to_string()),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The next chunk of a snapshot, and the source when more follows: a page of entries, or — once
/// they are out — the blocks up to a certified one (waiting up to [`MAX_WAIT`] for one) and the
/// end.
async fn snapshot_chunk(
    api: &Arc<ApiState>,
    mut source: archipel_consensus::join::Source,
) -> Result<(Vec<u8>, Option<archipel_consensus::join::Source>), String> {
    let (source, page) = tokio::task::spawn_blocking(move || {
        let page = source.next_entries(SNAPSHOT_PAGE);
        (source, page)
    })
    .await
    .map_err(|e| format!("the task reading the state failed: {e}"))?;
    if let Some(bytes) = page? {
        api.guards.pace_export(bytes.len()).await;
        return Ok((bytes, Some(source)));
    }
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    loop {
        if let Some(tail) = source.tail(&api.chain)? {
            return Ok((tail, None));
        }
        let waited = match api.chain.watch_height(api.chain.head().height) {
            Ok(_) => Ok(()),
            Err(next) => tokio::time::timeout_at(deadline, next).await.map(drop),
        };
        if waited.is_err() || tokio::time::Instant::now() >= deadline {
            return Err(format!("no certified block covered block {} within {MAX_WAIT:?}", source.height()));
        }
    }
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

/// `GET /v1/accounts/{id}/revocations`: the access-token ids an account revoked.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RevocationsView {
    /// The account.
    pub id: NodeId,
    /// Its revoked token ids, sorted.
    pub revoked: Vec<archipel_ledger::Hash>,
    /// Height of the finalized state this was read from.
    pub height: u64,
}

async fn revocations(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let id: NodeId = match id.parse() {
        Ok(i) => i,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_account", format!("{e}")),
    };
    let view = s.chain.with_state(|st| RevocationsView { id, revoked: st.revocations(&id), height: st.chain().height });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiError;
    use crate::api::testing::{limits, serve, state, tenant};
    use archipel_ledger::{MempoolError, Payload, Transaction};

    fn http() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    /// Finalizes `n` empty blocks on the chain, each with a certificate.
    fn grow(chain: &Chain, n: u64) {
        for _ in 0..n {
            let head = chain.head();
            let b = chain.build(&head.hash(), head.timestamp_ms + 10, |_| Vec::new()).unwrap();
            chain.finalize(b, vec![7; 40]).unwrap().unwrap();
        }
    }

    fn params(q: &[(&str, &str)]) -> HashMap<String, String> {
        q.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A batch admitted chunk by chunk: when the queue refuses a later chunk, the earlier
    /// answers stand (and were gossiped), the rest say why they were not admitted; a refusal of
    /// the first chunk answers the whole request.
    #[tokio::test]
    async fn a_batch_refused_midway_keeps_what_was_judged() {
        use crate::fair_queue::Refused;
        let who = archipel_crypto::Identity::from_seed(1);
        let batch = |n: u64| {
            let decoded: Vec<(SignedTransaction, usize)> = (0..n)
                .map(|nonce| {
                    let tx = Transaction {
                        signer: who.node_id(),
                        nonce,
                        payload: Payload::LeaveNode { node: who.node_id() },
                    };
                    (tx.sign(&who, &Hash::ZERO), 100)
                })
                .collect();
            let encoded = decoded.iter().map(|(t, _)| t.to_bytes()).collect();
            chunked(decoded, encoded)
        };
        let chunks = batch(130);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [64, 64, 2]);
        for refused in [Refused::Busy, Refused::Stopped, Refused::Failed] {
            let mut calls = 0;
            let mut gossiped = 0;
            let admit = |txs: Vec<(SignedTransaction, usize)>| {
                calls += 1;
                let answer = match calls {
                    // The first chunk: even nonces admitted, odd ones refused.
                    1 => Ok(txs
                        .iter()
                        .map(|(t, _)| match t.tx.nonce % 2 {
                            0 => Ok(t.hash()),
                            _ => Err(MempoolError::Full(0)),
                        })
                        .collect()),
                    _ => Err(refused),
                };
                async move { answer }
            };
            let results = admit_chunks(batch(130), admit, |_| gossiped += 1).await.unwrap();
            assert_eq!(calls, 2, "no chunk is tried after a refusal");
            assert_eq!(gossiped, 32, "the first chunk's admitted ones are gossiped");
            assert_eq!(results.len(), 130);
            assert!(matches!(results[0], ChunkResult::Admitted(_)));
            assert!(matches!(results[1], ChunkResult::Refused(MempoolError::Full(0))));
            assert!(results[64..].iter().all(|r| matches!(r, ChunkResult::NotRun(r) if r == &refused)));
            let (_, code, _) = crate::api::refusal_parts(refused);
            assert_eq!(code, ["admission_busy", "shutting_down", "internal"][refused as usize]);
        }
        let first_refused = admit_chunks(batch(3), |_| async { Err(Refused::Busy) }, |_| ()).await;
        assert_eq!(first_refused.err(), Some(Refused::Busy));
    }

    #[test]
    fn block_ranges_are_capped_and_never_overflow() {
        let q = BlocksQuery::parse(&params(&[("from", &u64::MAX.to_string()), ("limit", "100")])).unwrap();
        assert!(q.heights(u64::MAX).eq([u64::MAX]), "the last height, not an overflow");
        assert!(q.heights(10).is_empty());
        let q = BlocksQuery::parse(&params(&[("limit", "1000000")])).unwrap();
        assert_eq!((q.from, q.limit, q.wait), (1, MAX_BLOCKS_PER_PAGE, None));
        assert_eq!(q.heights(1_000), 1..=MAX_BLOCKS_PER_PAGE);
        let q = BlocksQuery::parse(&params(&[("from", "0"), ("wait_ms", "999999999")])).unwrap();
        assert_eq!((q.from, q.wait), (1, Some(MAX_WAIT)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_lists_are_bounded_and_bad_parameters_named() {
        let s = state(limits(|_| {}));
        grow(&s.chain, 150);
        let url = serve(s).await;
        let list = |q: &'static str| {
            let url = url.clone();
            async move { http().get(format!("{url}/v1/ledger/blocks?{q}")).send().await.unwrap() }
        };
        let r = list("limit=1000").await;
        assert_eq!(r.json::<Vec<BlockView>>().await.unwrap().len() as u64, MAX_BLOCKS_PER_PAGE);
        let r = list("from=140").await;
        let heights: Vec<u64> = r.json::<Vec<BlockView>>().await.unwrap().iter().map(|b| b.header.height).collect();
        assert_eq!(heights, (140..=150).collect::<Vec<_>>());
        let r = list("from=18446744073709551615&limit=100").await;
        assert_eq!(r.status(), 200);
        assert!(r.json::<Vec<BlockView>>().await.unwrap().is_empty());
        for (q, name) in
            [("limit=0", "limit"), ("from=-1", "from"), ("from=1&limit=x", "limit"), ("wait_ms=1e3", "wait_ms")]
        {
            let r = list(q).await;
            assert_eq!(r.status(), 400, "{q}");
            let e: ApiError = r.json().await.unwrap();
            assert_eq!(e.error, "bad_query");
            assert!(e.message.starts_with(&format!("{name}=")), "{q}: {}", e.message);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_export_streams_in_chunks() {
        let s = state(limits(|_| {}));
        grow(&s.chain, 2 * EXPORT_CHUNK_BLOCKS + 10);
        let mut expected = archipel_ledger::export::start(&s.genesis.canonical_bytes());
        expected.extend(s.chain.raw_blocks_from(1, u64::MAX).unwrap().0);
        let chain = s.chain.clone();
        let url = serve(s).await;
        let mut r = http().get(format!("{url}/v1/ledger/export")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.content_length(), None, "streamed, not built whole in memory first");
        let mut body = Vec::new();
        let mut chunks = 0;
        while let Some(c) = r.chunk().await.unwrap() {
            if chunks == 0 {
                // Blocks finalized during the export are not in it: it ends where it started.
                grow(&chain, 3);
            }
            body.extend_from_slice(&c);
            chunks += 1;
        }
        assert!(chunks >= 3, "{chunks} chunks");
        assert_eq!(chain.head().height, 2 * EXPORT_CHUNK_BLOCKS + 13);
        assert_eq!(body, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_streams_the_committed_state_and_its_final_blocks() {
        let s = state(limits(|_| {}));
        let chain = s.chain.clone();
        let url = serve(s).await;
        let r = http().get(format!("{url}/v1/ledger/snapshot")).send().await.unwrap();
        assert_eq!(r.status(), 503, "nothing past the genesis to give");
        assert!(r.text().await.unwrap().contains("no_snapshot"));
        grow(&chain, 5);
        chain.close().unwrap();
        let r = http().get(format!("{url}/v1/ledger/snapshot")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-archipel-height"], "5");
        let body = r.bytes().await.unwrap();
        assert!(body.starts_with(archipel_consensus::join::MAGIC));
        // Blocks below the first one held are refused by name on a node that joined.
        assert!(below_first(&chain, 0).is_none() && below_first(&chain, 3).is_none(), "this node holds every block");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exports_together_stream_within_the_nodes_export_budget() {
        // Size the budget from the export itself: two exports at once carry 2 x `kib`; the
        // bucket starts with one second's worth, so they cannot end before 1.5 s.
        let probe = state(limits(|_| {}));
        grow(&probe.chain, 3 * EXPORT_CHUNK_BLOCKS);
        let mut expected = archipel_ledger::export::start(&probe.genesis.canonical_bytes());
        expected.extend(probe.chain.raw_blocks_from(1, u64::MAX).unwrap().0);
        let kib = (expected.len() / 1024) as u32;
        let per_second = std::num::NonZeroU32::new(kib * 2 * 2 / 5).unwrap();
        let s = state(limits(|l| l.export_kib_per_second = per_second));
        grow(&s.chain, 3 * EXPORT_CHUNK_BLOCKS);
        let url = serve(s).await;
        let started = std::time::Instant::now();
        let one =
            || async { http().get(format!("{url}/v1/ledger/export")).send().await.unwrap().bytes().await.unwrap() };
        let (a, b) = tokio::join!(one(), one());
        let took = started.elapsed();
        assert_eq!((a.len(), b.len()), (expected.len(), expected.len()), "both exports are whole");
        assert!(took >= Duration::from_millis(1_400), "2 x {kib} KiB at {per_second} KiB/s took {took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_for_finality_ends_as_still_pending() {
        let s = state(limits(|_| {}));
        let chain = s.chain.clone();
        let url = serve(s).await;
        for nonce in 0..20 {
            let tx = Transaction {
                signer: tenant().node_id(),
                nonce,
                payload: Payload::Transfer { to: tenant().node_id(), amount_micro: 1 },
            }
            .sign(&tenant(), &chain.genesis_state().network());
            let r =
                http().post(format!("{url}/v1/tx?wait=final&timeout_ms=20")).body(tx.to_bytes()).send().await.unwrap();
            assert_eq!(r.status(), 202);
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["status"], "pending", "{v}");
            assert!(v["message"].as_str().unwrap().contains("still pending after 20 ms"), "{v}");
            let answer: SubmitResponse = serde_json::from_value(v).unwrap();
            assert_eq!(answer.hash, tx.hash());
        }
        assert!(chain.tx_waiters() <= archipel_consensus::chain::MAX_TX_WAITERS);
        let r = http().post(format!("{url}/v1/tx?wait=final&timeout_ms=soon")).body(vec![]).send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.json::<ApiError>().await.unwrap().message.starts_with("timeout_ms="));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_json_transaction_must_have_a_binary_form() {
        let s = state(limits(|_| {}));
        let network = s.chain.genesis_state().network();
        let url = serve(s).await;
        let credit = archipel_ledger::Credit { to: tenant().node_id(), amount_micro: 1 };
        let with = |n: usize| {
            Transaction {
                signer: tenant().node_id(),
                nonce: 0,
                payload: Payload::TransferMany { credits: vec![credit; n] },
            }
            .sign(&tenant(), &network)
        };
        // 300 credits do not fit the count byte (written 0, which never decodes): refused before
        // anything else.
        let r = http().post(format!("{url}/v1/tx")).json(&with(300)).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let e = r.json::<ApiError>().await.unwrap();
        assert_eq!(e.error, "malformed");
        assert!(e.message.contains("between 1 and 200 credits"), "{}", e.message);
        let r = http().post(format!("{url}/v1/tx")).json(&with(3)).send().await.unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refused_transactions_cost_the_admission_pace_extra() {
        // Paced at 100 a second, burst 100: refusals at 12.5 a second, burst 12.5. A batch of 64
        // refused transfers puts the refusals' bucket 12.5 in debt (floored at one burst): the
        // next batch from that (now busy, refusing) address waits for it, ~1 s. Were refusals
        // not paced apart, 36 would be left in the pace's bucket and it would run at once.
        let s = state(limits(|l| {
            l.admission_txs_per_second = crate::api::testing::nz(100);
            l.admission_burst = crate::api::testing::nz(100);
        }));
        let network = s.chain.genesis_state().network();
        let url = serve(s).await;
        let batch = |amount_micro: u64| {
            let mut body = Vec::new();
            for nonce in 0..64 {
                let payload = Payload::Transfer { to: archipel_crypto::Identity::from_seed(8).node_id(), amount_micro };
                let t = Transaction { signer: tenant().node_id(), nonce, payload }.sign(&tenant(), &network);
                archipel_ledger::export::put_record(&mut body, &t.to_bytes());
            }
            body
        };
        let items = |r: reqwest::Response| async move { r.json::<Vec<serde_json::Value>>().await.unwrap() };
        let (refusing, admissible) = (batch(u64::MAX / 4), batch(1));
        let refused = items(http().post(format!("{url}/v1/txs")).body(refusing).send().await.unwrap()).await;
        assert_eq!(refused.len(), 64);
        assert!(refused.iter().all(|i| i["error"] == "insufficient_funds"), "{:?}", refused[0]);
        let started = std::time::Instant::now();
        let admitted = items(http().post(format!("{url}/v1/txs")).body(admissible).send().await.unwrap()).await;
        let took = started.elapsed();
        assert!(admitted.iter().all(|i| i["error"].is_null()), "{:?}", admitted[0]);
        assert!(took >= std::time::Duration::from_millis(600), "the next batch waited {took:?} only");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_head_tells_gapped_mempool_entries_apart() {
        let s = state(limits(|_| {}));
        let chain = s.chain.clone();
        let network = chain.genesis_state().network();
        let to = |nonce| {
            Transaction {
                signer: tenant().node_id(),
                nonce,
                payload: Payload::Transfer { to: tenant().node_id(), amount_micro: 1 },
            }
            .sign(&tenant(), &network)
        };
        // Nonce 0 can go next; 5 waits behind the missing 1..4.
        for nonce in [0, 5] {
            let t = to(nonce);
            let len = t.to_bytes().len();
            chain.submit(t, len, archipel_consensus::app::system_now_ms()).unwrap();
        }
        let url = serve(s).await;
        let head: serde_json::Value =
            http().get(format!("{url}/v1/ledger/head")).send().await.unwrap().json().await.unwrap();
        assert_eq!((head["mempool"].as_u64(), head["mempool_gapped"].as_u64()), (Some(2), Some(1)), "{head}");
    }
}
