//! A tenant's client of the network: reads of finalized state, signed transactions, and whole
//! object PUT/GET over the nodes' APIs. The CLI and the S3 gateway both stand on it.
//!
//! - **Several nodes.** A client is given one or more node URLs; a read or a submission that
//!   finds a node unreachable, stalled (503) or rate-limited goes to the next one, so the loss of
//!   one node (or region) does not stop the tenant.
//! - **Nonces.** Transactions from one key must use consecutive nonces. The client allocates them
//!   itself under a lock held only while a transaction is *admitted*; it then waits for finality
//!   outside the lock (submitting the same transaction again is the same transaction), so many
//!   PUTs commit in the same block instead of one per block. A nonce refused as taken or stale
//!   is re-read from the ledger and the transaction signed again.
//! - **PUT retries.** A holder that fails during an upload is left out and the object placed
//!   again, when the source can be read again ([`PutSource`]); what the failed attempt stored is
//!   never committed and its holders collect it.
//! - **Group commit.** Objects of up to [`crate::batch::MAX_BATCHED_OBJECT_BYTES`] put while
//!   other PUTs of this client are under way go together ([`crate::batch`]): one seal call per
//!   holder and one `PutObjects` for the lot. A batch that fails before its transaction is sent
//!   sends each of its objects again on its own, the usual way, so each gets its own answer and
//!   retries; one that fails after fails its PUTs as "not final" (it may still commit).

use crate::api::{BucketList, ObjectList, ObjectView, StorageNode, StorageNodes};
use crate::batch::{Fit, GroupCommit, MAX_BATCHED_OBJECT_BYTES, seal_batch};
use crate::http::HttpShards;
use crate::meta::ObjectMeta;
use crate::pipeline::ShardHash;
use crate::transfer::{
    Holder, Opened, Prepared, PutPlan, Staged, TransferFailed, finish_staged, get_object, keep_staged, open_object,
    prepare_single, put_object, read_exactly, read_object, seal_single, stage_segment,
};
use archipel_crypto::Identity;
use archipel_ledger::storage::{BucketRecord, ObjectPut};
use archipel_ledger::{Hash, LeaseStatus, Payload, Receipt, Transaction};
use archipel_placement::Candidate;
use archipel_types::NodeId;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// How many times a PUT places an object before it gives up, each time without the nodes that
/// failed before.
pub const PUT_ATTEMPTS: usize = 4;

/// How long a submission waits for its block to be final.
const FINAL_TIMEOUT: Duration = Duration::from_secs(35);

/// Times a transaction refused for a nonce gap is sent again, 50 ms apart.
const GAP_WAITS: usize = 60;

/// Times a transaction is signed again after its nonce was refused.
const NONCE_RETRIES: usize = 8;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// No node could be reached.
    #[error("cannot reach any node ({0}): is the network running? check the addresses, or start `archipel devnet`")]
    Unreachable(String),
    /// A node answered with an error.
    #[error("{url} answered {status} {code}: {message}")]
    Api {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Error code from the body (`no_such_bucket`, `no_such_key`, `bucket_exists`…).
        code: String,
        /// Message from the body.
        message: String,
    },
    /// An answer could not be understood.
    #[error("unexpected answer from {url}: {reason}")]
    Decode {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The bytes received differ from the MD5 the client announced.
    #[error("the content's MD5 is {got}, the request announced {announced}: nothing was stored")]
    BadDigest {
        /// What the client said.
        announced: String,
        /// What arrived.
        got: String,
    },
    /// The transaction was admitted but is not final yet.
    #[error("transaction {0} was accepted but is not final yet: check `archipel ledger show {0}`")]
    NotFinal(Hash),
    /// Moving the data failed.
    #[error(transparent)]
    Transfer(#[from] TransferFailed),
}

impl TenantError {
    /// The error code a node answered with, if it answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            TenantError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status a node answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            TenantError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether another node may answer better: this one is unreachable, stalled, busy or failed.
    fn try_another(&self) -> bool {
        match self {
            TenantError::Unreachable(_) => true,
            TenantError::Api { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// A node's error body.
#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
}

/// Where a submitted transaction is (the node's `POST /v1/tx` answer).
#[derive(Deserialize)]
struct Submitted {
    hash: Hash,
    #[serde(flatten)]
    status: SubmittedStatus,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
enum SubmittedStatus {
    Final { height: u64, block_time_ms: u64, receipt: Receipt },
    Pending,
    Unknown,
}

/// A transaction in a finalized block.
#[derive(Clone, Debug)]
pub struct Committed {
    /// Its hash.
    pub hash: Hash,
    /// The block's height.
    pub height: u64,
    /// The block's consensus time (Unix ms).
    pub block_time_ms: u64,
    /// What it did.
    pub receipt: Receipt,
}

/// What a PUT reads: once, or again from the start for a retry.
pub trait PutSource: Send {
    /// The reader for one attempt; `None` when it cannot be read again (a request body already
    /// consumed), which ends the retries.
    fn open(&mut self) -> impl Future<Output = std::io::Result<Option<Box<dyn AsyncRead + Send + Unpin>>>> + Send;
}

/// A source read once (a request body streaming in): no retry after a holder fails.
#[derive(Debug)]
pub struct Once<R>(Option<R>);

impl<R> Once<R> {
    /// Wraps `reader`.
    pub fn new(reader: R) -> Self {
        Once(Some(reader))
    }
}

impl<R: AsyncRead + Send + Unpin + 'static> PutSource for Once<R> {
    async fn open(&mut self) -> std::io::Result<Option<Box<dyn AsyncRead + Send + Unpin>>> {
        Ok(self.0.take().map(|r| Box::new(r) as Box<dyn AsyncRead + Send + Unpin>))
    }
}

/// Bytes in memory, read again for each attempt.
#[derive(Debug)]
pub struct InMemory(pub bytes::Bytes);

impl PutSource for InMemory {
    async fn open(&mut self) -> std::io::Result<Option<Box<dyn AsyncRead + Send + Unpin>>> {
        Ok(Some(Box::new(std::io::Cursor::new(self.0.clone()))))
    }
}

/// A file, opened again for each attempt.
#[derive(Debug)]
pub struct FileSource(pub std::path::PathBuf);

impl PutSource for FileSource {
    async fn open(&mut self) -> std::io::Result<Option<Box<dyn AsyncRead + Send + Unpin>>> {
        let f = tokio::fs::File::open(&self.0).await?;
        Ok(Some(Box::new(tokio::io::BufReader::with_capacity(1 << 20, f))))
    }
}

/// What a PUT stores besides the bytes.
#[derive(Clone, Debug, Default)]
pub struct NewObject {
    /// The key.
    pub key: String,
    /// Exactly this many bytes are read from the source.
    pub size: u64,
    /// The ETag to record (default: the MD5 of the content, in hex, as S3 does).
    pub etag: Option<String>,
    /// Metadata sealed into the manifest.
    pub meta: ObjectMeta,
    /// The content's MD5 (hex) the client announced: a PUT whose bytes differ is not committed.
    pub content_md5: Option<String>,
}

/// A stored object.
#[derive(Clone, Debug)]
pub struct Stored {
    /// What was committed.
    pub put: ObjectPut,
    /// Its transaction.
    pub tx: Committed,
}

/// A tenant's client: its key and the nodes it talks to.
#[derive(Debug)]
pub struct TenantClient {
    nodes: Vec<String>,
    /// The node tried first (the last one that answered).
    preferred: AtomicUsize,
    http: reqwest::Client,
    identity: Identity,
    shards: Arc<HttpShards>,
    network: tokio::sync::OnceCell<Hash>,
    /// The next nonce to use, once known.
    next_nonce: tokio::sync::Mutex<Option<u64>>,
    /// The highest block holding one of this client's transactions: reads must see it.
    written: std::sync::atomic::AtomicU64,
    /// Per node (as in `nodes`), the highest finalized state height it answered with.
    seen: Vec<std::sync::atomic::AtomicU64>,
    /// How long a read waits for a node to reach the client's own writes (or for nodes that
    /// all answered "too many requests").
    behind_wait: Duration,
    /// Reads go to the nodes in turn (a node bounds the reads of one address).
    turn: AtomicUsize,
    /// The storage nodes up, as last read, and when ([`CANDIDATES_FOR`]).
    candidates: std::sync::Mutex<Option<(std::time::Instant, CandidateList)>>,
    /// Small PUTs waiting to go together.
    group: GroupCommit<Waiting>,
    /// Nodes a seal failed on, and when ([`AVOID_FOR`]).
    avoid: std::sync::Mutex<std::collections::BTreeMap<NodeId, std::time::Instant>>,
    /// Whether small PUTs go together (on unless [`TenantClient::without_group_commit`]).
    group_commit: bool,
}

/// How long new placements leave out a node a seal failed on.
pub const AVOID_FOR: Duration = Duration::from_secs(30);

/// A small PUT waiting in [`TenantClient::group`].
#[derive(Debug)]
struct Waiting {
    prepared: Prepared,
    code: archipel_types::ErasureCode,
    answer: tokio::sync::mpsc::UnboundedSender<Turn>,
}

/// What a waiting PUT hears.
#[derive(Debug)]
enum Turn {
    /// It is committed.
    Done(Box<Stored>),
    /// Its batch failed before its transaction was admitted (why): it goes again on its own.
    Alone(String),
    /// Its batch's transaction was admitted but is not known final (why, and its hash): sending
    /// the object again would store it twice, so the PUT fails as a single one would.
    Unknown(String, Option<Hash>),
    /// Run this batch: the flush slot is handed over.
    Lead(String, Vec<Waiting>),
}

/// How a batch failed.
enum BatchFailed {
    /// Before its transaction was admitted: each object may go again on its own.
    Before(String),
    /// After: its transaction may still become final.
    After(String, Option<Hash>),
}

/// A waiting PUT's end of its channel. If the PUT is dropped (cancelled) while a batch to run
/// was handed to it, that batch's PUTs are told to go on their own and the flush slot is handed
/// on, so that no slot is lost with it.
struct Inbox<'a> {
    turns: tokio::sync::mpsc::UnboundedReceiver<Turn>,
    group: &'a GroupCommit<Waiting>,
}

impl Drop for Inbox<'_> {
    fn drop(&mut self) {
        // No send succeeds after `close`; what was sent before is drained here.
        self.turns.close();
        while let Ok(turn) = self.turns.try_recv() {
            if let Turn::Lead(_, batch) = turn {
                drop(Flight::new(self.group, &batch));
            }
        }
    }
}

/// A batch being run: if the future running it is dropped, every PUT in it is told so — to go
/// on its own if the batch's transaction was not sent yet, else that its outcome is unknown (it
/// may still become final: sending the objects again would store them twice) — and the flush
/// slot is handed over, so that none waits for ever.
struct Flight<'a> {
    group: &'a GroupCommit<Waiting>,
    answers: Vec<tokio::sync::mpsc::UnboundedSender<Turn>>,
    /// Set once the batch's transaction is being sent.
    sent: std::sync::atomic::AtomicBool,
}

impl<'a> Flight<'a> {
    fn new(group: &'a GroupCommit<Waiting>, batch: &[Waiting]) -> Self {
        Flight { group, answers: batch.iter().map(|w| w.answer.clone()).collect(), sent: Default::default() }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let sent = self.sent.load(std::sync::atomic::Ordering::SeqCst);
        for a in self.answers.drain(..) {
            let _ = a.send(if sent {
                Turn::Unknown(
                    "the PUT that was committing its batch was cancelled after sending the transaction: check the \
                     object (it may be stored)"
                        .into(),
                    None,
                )
            } else {
                Turn::Alone("the PUT that was sending its batch was cancelled".into())
            });
        }
        hand_over(self.group);
    }
}

/// Gives the flush slot of a batch that ended to the oldest waiting PUT, with its batch; gives
/// it back when nothing waits. A PUT that is gone meanwhile passes it on.
fn hand_over(group: &GroupCommit<Waiting>) {
    while let Some((bucket, batch)) = group.next_batch(fits) {
        let Some(first) = batch.first().map(|w| w.answer.clone()) else { continue };
        match first.send(Turn::Lead(bucket, batch)) {
            Ok(()) => return,
            Err(tokio::sync::mpsc::error::SendError(Turn::Lead(_, batch))) => {
                for w in batch.iter().skip(1) {
                    let _ = w.answer.send(Turn::Alone("the PUT that was to send its batch was cancelled".into()));
                }
            }
            Err(_) => {}
        }
    }
}

fn fits(batch: &[Waiting], next: &Waiting) -> Fit {
    if next.answer.is_closed() {
        // Its PUT was cancelled while it waited: not committed for nobody.
        return Fit::Gone;
    }
    let batch: Vec<&Prepared> = batch.iter().map(|w| &w.prepared).collect();
    crate::batch::fits_one_transaction(&batch, &next.prepared)
}

/// Storage nodes that may receive shards, with their URLs.
type CandidateList = Vec<(Candidate, String)>;

/// How long a list of storage nodes serves new PUTs before it is read again: the list is
/// O(nodes) (10,000 nodes: megabytes), and a node down since is left out by the PUT's retry.
pub const CANDIDATES_FOR: Duration = Duration::from_secs(5);

/// How long [`TenantClient::freshest`] waits for each node's head.
pub const FRESHEST_WAIT: Duration = Duration::from_secs(2);

fn base_url(u: &str) -> String {
    let u = u.trim_end_matches('/');
    if u.contains("://") { u.to_string() } else { format!("http://{u}") }
}

/// Percent-encodes a query value or path segment.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A storage node as a placement candidate, with its URL; `None` when its location does not parse.
pub fn candidate(n: StorageNode) -> Option<(Candidate, String)> {
    Some((
        Candidate {
            node: n.node,
            region: n.region.parse().ok()?,
            country: n.country.parse().ok()?,
            operator: n.operator,
            jurisdiction: n.jurisdiction.parse().ok()?,
            free_bytes: n.capacity_bytes.saturating_sub(n.stored_bytes),
            reputation: n.reputation,
        },
        n.api_url,
    ))
}

/// An object's holders with their URLs, in shard order.
pub fn holders(view: &ObjectView) -> Vec<Holder> {
    view.object
        .holders
        .iter()
        .zip(&view.holders)
        .map(|(node, n)| Holder { node: *node, url: n.as_ref().map(|n| n.api_url.clone()).unwrap_or_default() })
        .collect()
}

impl TenantClient {
    /// A client signing with `identity` and asking `nodes` (URLs or `host:port`), the first one
    /// first. Panics on an empty list.
    pub fn new(nodes: &[String], identity: Identity) -> Self {
        assert!(!nodes.is_empty(), "a tenant client needs at least one node");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .connect_timeout(Duration::from_secs(3))
            .no_proxy()
            .build()
            .unwrap_or_default();
        TenantClient {
            nodes: nodes.iter().map(|n| base_url(n)).collect(),
            preferred: AtomicUsize::new(0),
            http,
            shards: Arc::new(HttpShards::new(identity.clone())),
            identity,
            network: tokio::sync::OnceCell::new(),
            next_nonce: tokio::sync::Mutex::new(None),
            written: std::sync::atomic::AtomicU64::new(0),
            seen: nodes.iter().map(|_| std::sync::atomic::AtomicU64::new(0)).collect(),
            behind_wait: Duration::from_secs(10),
            turn: AtomicUsize::new(0),
            candidates: std::sync::Mutex::new(None),
            group: GroupCommit::default(),
            avoid: Default::default(),
            group_commit: true,
        }
    }

    /// The same client with every PUT on its own (no group commit): for comparisons.
    pub fn without_group_commit(mut self) -> Self {
        self.group_commit = false;
        self
    }

    /// The tenant's key.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The tenant's account.
    pub fn me(&self) -> NodeId {
        self.identity.node_id()
    }

    /// The nodes asked, in order.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Sends one request to node `at`; returns the answer body.
    async fn send_at(
        &self,
        at: usize,
        method: &reqwest::Method,
        path: &str,
        body: &[u8],
    ) -> Result<bytes::Bytes, TenantError> {
        let url = format!("{}{path}", self.nodes[at]);
        let mut req = self.http.request(method.clone(), &url);
        if !body.is_empty() {
            req = req.header("content-type", "application/octet-stream").body(body.to_vec());
        }
        let resp = req.send().await.map_err(|e| TenantError::Unreachable(format!("{url}: {}", root_cause(&e))))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| TenantError::Unreachable(format!("{url}: {}", root_cause(&e))))?;
        if status.is_success() {
            return Ok(bytes);
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => (e.error, e.message),
            Err(_) => ("error".into(), String::from_utf8_lossy(&bytes).chars().take(200).collect()),
        };
        Err(TenantError::Api { url, status: status.as_u16(), code, message })
    }

    /// Whether node `at` has applied block `min` (read-your-writes: a node that finalized this
    /// client's PUT a moment after another must not answer 404 for it); `Ok(false)` when not yet.
    async fn reached(&self, at: usize, min: u64) -> Result<bool, TenantError> {
        if self.seen[at].load(Ordering::Relaxed) >= min {
            return Ok(true);
        }
        let path = format!("/v1/accounts/{}", self.me());
        let bytes = self.send_at(at, &reqwest::Method::GET, &path, &[]).await?;
        let view: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| TenantError::Decode { url: path, reason: e.to_string() })?;
        let height = view["height"].as_u64().unwrap_or(0);
        self.seen[at].fetch_max(height, Ordering::Relaxed);
        Ok(height >= min)
    }

    /// Sends one request to each node in turn until one answers without a reason to try
    /// another; returns the answer body. Writes start at the node that answered last (a client's
    /// transactions reach one node in order), reads at the next node in turn (a node bounds the
    /// reads of one address: reads spread over all of them). A node that has not applied block
    /// `min_height` is not asked; when none has, or every node answered 429, all are tried again
    /// 25 ms later, for up to 10 s. Reads of state and transactions (signed themselves) need no
    /// request signature.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
        min_height: u64,
    ) -> Result<bytes::Bytes, TenantError> {
        let deadline = std::time::Instant::now() + self.behind_wait;
        loop {
            let first = if method == reqwest::Method::GET {
                self.turn.fetch_add(1, Ordering::Relaxed)
            } else {
                self.preferred.load(Ordering::Relaxed)
            } % self.nodes.len();
            let mut last = None;
            let mut behind = false;
            for n in 0..self.nodes.len() {
                let at = (first + n) % self.nodes.len();
                let result = match self.reached(at, min_height).await {
                    Ok(true) => self.send_at(at, &method, path, &body).await,
                    Ok(false) => {
                        behind = true;
                        Err(TenantError::Api {
                            url: self.nodes[at].clone(),
                            status: 503,
                            code: "behind".into(),
                            message: format!(
                                "the node is at block {}, behind this client's own writes at {min_height}",
                                self.seen[at].load(Ordering::Relaxed)
                            ),
                        })
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Err(e) if e.try_another() => {
                        // Too many requests from here: another node, or the same ones shortly.
                        behind |= e.status() == Some(429);
                        last = Some(e);
                    }
                    other => {
                        self.preferred.store(at, Ordering::Relaxed);
                        return other;
                    }
                }
            }
            if !behind || std::time::Instant::now() > deadline {
                return Err(last.unwrap_or_else(|| TenantError::Unreachable("no node".into())));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `GET` a JSON document of finalized state, from a node that has applied this client's own
    /// writes.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, TenantError> {
        self.get_from(path, 0).await
    }

    /// [`Self::get`], from a node that has also applied block `floor`.
    async fn get_from<T: DeserializeOwned>(&self, path: &str, floor: u64) -> Result<T, TenantError> {
        let min = floor.max(self.written.load(Ordering::Relaxed));
        let bytes = self.send(reqwest::Method::GET, path, Vec::new(), min).await?;
        serde_json::from_slice(&bytes).map_err(|e| TenantError::Decode { url: path.into(), reason: e.to_string() })
    }

    /// `GET` a JSON document of finalized state from a node at the freshest height any of this
    /// client's nodes has applied ([`Self::freshest`]): what another client wrote and saw final
    /// at one of them is in the answer.
    pub async fn get_fresh<T: DeserializeOwned>(&self, path: &str) -> Result<T, TenantError> {
        let floor = self.freshest().await;
        self.get_from(path, floor).await
    }

    /// [`Self::get`], `None` for a 404 — an absence believed only when a node at the freshest
    /// height ([`Self::freshest`]) says so too.
    pub async fn get_or_absent<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, TenantError> {
        match not_found_is_none(self.get(path).await)? {
            Some(v) => Ok(Some(v)),
            None => not_found_is_none(self.get_fresh(path).await),
        }
    }

    /// The highest block any of this client's nodes has applied, asked of all of them at once
    /// ([`FRESHEST_WAIT`] each; a node that does not answer in time is left out). A write another
    /// client saw final at one of these nodes is at or below it. Reads of absence (no such
    /// object, bucket) and listings go there before they are believed: a node a block behind
    /// would otherwise answer "no such key" for an object another client has just written.
    pub async fn freshest(&self) -> u64 {
        let asks = (0..self.nodes.len()).map(|at| async move {
            let ask = self.send_at(at, &reqwest::Method::GET, "/v1/ledger/head", &[]);
            let height = match tokio::time::timeout(FRESHEST_WAIT, ask).await {
                Ok(Ok(bytes)) => serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["header"]["height"].as_u64())
                    .unwrap_or(0),
                _ => 0,
            };
            self.seen[at].fetch_max(height, Ordering::Relaxed);
            height
        });
        futures::future::join_all(asks).await.into_iter().max().unwrap_or(0)
    }

    /// The network's genesis hash (transactions and receipts are bound to it).
    pub async fn network(&self) -> Result<Hash, TenantError> {
        self.network
            .get_or_try_init(|| async {
                let head: serde_json::Value = self.get("/v1/ledger/head").await?;
                head["genesis_hash"].as_str().unwrap_or("").parse().map_err(|e| TenantError::Decode {
                    url: "/v1/ledger/head".into(),
                    reason: format!("malformed genesis hash: {e}"),
                })
            })
            .await
            .copied()
    }

    /// The account's next nonce, read at the freshest height any of the client's nodes has
    /// applied: a node a block behind would give a nonce this key already used (in another
    /// process, a moment ago), and a transaction with it is admitted there and never final.
    async fn ledger_nonce(&self) -> Result<u64, TenantError> {
        let me: Option<serde_json::Value> =
            not_found_is_none(self.get_fresh(&format!("/v1/accounts/{}", self.me())).await)?;
        Ok(me.and_then(|m| m["nonce"].as_u64()).unwrap_or(0))
    }

    /// Signs `payload` at the next nonce, submits it and waits until it is final.
    pub async fn submit(&self, payload: Payload) -> Result<Committed, TenantError> {
        self.submit_tracked(payload).await.map_err(|(e, _)| e)
    }

    /// [`TenantClient::submit`], telling on failure whether the transaction was admitted (then
    /// it may still become final: sending its contents again would do them twice).
    async fn submit_tracked(&self, payload: Payload) -> Result<Committed, (TenantError, bool)> {
        let refused = |e: TenantError| (e, false);
        let network = self.network().await.map_err(refused)?;
        let mut retries = 0;
        let mut gap_waits = 0;
        let stx = {
            let mut next = self.next_nonce.lock().await;
            loop {
                let nonce = match *next {
                    Some(n) => n,
                    None => self.ledger_nonce().await.map_err(refused)?,
                };
                let stx =
                    Transaction { signer: self.me(), nonce, payload: payload.clone() }.sign(&self.identity, &network);
                match self.send(reqwest::Method::POST, "/v1/tx", stx.to_bytes(), 0).await {
                    Ok(_) => {
                        *next = Some(nonce + 1);
                        break stx;
                    }
                    // The node asked has not yet heard of this client's earlier transactions
                    // (admitted by another node, still gossiping): the same nonce, a moment later.
                    Err(e) if gap_waits < GAP_WAITS && e.code() == Some("nonce_gap") => {
                        gap_waits += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e)
                        if retries < NONCE_RETRIES
                            && matches!(e.code(), Some("nonce_taken" | "replayed_nonce" | "bad_nonce")) =>
                    {
                        retries += 1;
                        // Taken by a transaction this client no longer knows of (a restart): the
                        // one after it; stale: the ledger's.
                        *next = match (e.code(), *next) {
                            (Some("nonce_taken"), _) => Some(nonce + 1),
                            _ => None,
                        };
                    }
                    Err(e) => {
                        *next = None;
                        // A node's refusal: not admitted. No answer (a timeout, a cut
                        // connection): it may have been.
                        let maybe = !matches!(e, TenantError::Api { .. });
                        return Err((e, maybe));
                    }
                }
            }
        };
        let path = format!("/v1/tx?wait=final&timeout_ms={}", FINAL_TIMEOUT.as_millis() - 5_000);
        let r = self.send(reqwest::Method::POST, &path, stx.to_bytes(), 0).await;
        let bytes = match r {
            Ok(b) => b,
            Err(e) => {
                // Whether the nonce was used is unknown now: read it again next time.
                *self.next_nonce.lock().await = None;
                return Err((e, true));
            }
        };
        let s: Submitted = serde_json::from_slice(&bytes)
            .map_err(|e| (TenantError::Decode { url: path.clone(), reason: e.to_string() }, true))?;
        match s.status {
            SubmittedStatus::Final { height, block_time_ms, receipt } => {
                self.written.fetch_max(height, Ordering::Relaxed);
                Ok(Committed { hash: s.hash, height, block_time_ms, receipt })
            }
            SubmittedStatus::Pending | SubmittedStatus::Unknown => {
                *self.next_nonce.lock().await = None;
                Err((TenantError::NotFinal(s.hash), true))
            }
        }
    }

    /// Every bucket.
    pub async fn buckets(&self) -> Result<BucketList, TenantError> {
        self.get_fresh("/v1/buckets").await
    }

    /// One bucket; `None` when there is none of that name.
    pub async fn bucket(&self, name: &str) -> Result<Option<BucketRecord>, TenantError> {
        self.get_or_absent(&format!("/v1/buckets/{}", urlencode(name))).await
    }

    /// One object with its holders; `None` when there is none at that key.
    pub async fn object(&self, bucket: &str, key: &str) -> Result<Option<ObjectView>, TenantError> {
        // In the query, not the path: a path's `.` and `..` segments would be resolved on the way.
        let path = format!("/v1/buckets/{}/object?key={}", urlencode(bucket), urlencode(key));
        let view: Option<ObjectView> = self.get_or_absent(&path).await?;
        match view {
            Some(v) if v.object.bucket != bucket || v.object.key != key => Err(TenantError::Decode {
                url: path,
                reason: format!("asked for {bucket}/{key}, the node described {}/{}", v.object.bucket, v.object.key),
            }),
            other => Ok(other),
        }
    }

    /// One page of a bucket's listing (S3 rules for prefix, delimiter and `start_after`).
    pub async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ObjectList, TenantError> {
        let mut q = vec![format!("prefix={}", urlencode(prefix)), format!("limit={limit}")];
        if let Some(d) = delimiter {
            q.push(format!("delimiter={}", urlencode(d)));
        }
        if let Some(a) = start_after {
            q.push(format!("start_after={}", urlencode(a)));
        }
        self.get_fresh(&format!("/v1/buckets/{}/objects?{}", urlencode(bucket), q.join("&"))).await
    }

    /// Nodes that may receive shards now, from finalized state.
    pub async fn candidates(&self) -> Result<Vec<(Candidate, String)>, TenantError> {
        if let Some((at, list)) = self.candidates.lock().unwrap_or_else(|e| e.into_inner()).as_ref()
            && at.elapsed() < CANDIDATES_FOR
        {
            return Ok(list.clone());
        }
        let view: StorageNodes = self.get("/v1/storage/nodes").await?;
        let list: Vec<(Candidate, String)> =
            view.nodes.into_iter().filter(|n| n.storage && n.lease == LeaseStatus::Up).filter_map(candidate).collect();
        *self.candidates.lock().unwrap_or_else(|e| e.into_inner()) = Some((std::time::Instant::now(), list.clone()));
        Ok(list)
    }

    /// Puts `object.size` bytes from `source` into `bucket` and waits until the `PutObject` is
    /// final. `progress(bytes)` follows the upload; `warn` hears of a holder left out for a retry.
    /// A small object goes with the client's other small PUTs when there are any (group commit).
    pub async fn put(
        &self,
        bucket: &BucketRecord,
        object: NewObject,
        mut source: impl PutSource,
        mut progress: impl FnMut(u64),
        mut warn: impl FnMut(String),
    ) -> Result<Stored, TenantError> {
        if !self.group_commit || object.size == 0 || object.size > MAX_BATCHED_OBJECT_BYTES {
            return self.put_alone(bucket, object, source, progress, warn).await;
        }
        let mut reader = source
            .open()
            .await
            .map_err(|e| TransferFailed::Io(format!("reading the source: {e}")))?
            .ok_or_else(|| TransferFailed::Io("the source was read already".into()))?;
        let data = read_exactly(&mut reader, 0, object.size, object.size).await?;
        progress(0);
        match self.put_grouped(bucket, &object, data.clone()).await? {
            Ok(stored) => {
                progress(object.size);
                Ok(stored)
            }
            Err(why) => {
                warn(format!("{why}; putting the object on its own"));
                self.put_alone(bucket, object, InMemory(data.into()), progress, warn).await
            }
        }
    }

    /// Puts one small object with whatever else of this client's is waiting: `Ok(Err(why))`
    /// when its batch failed and it is to go on its own.
    async fn put_grouped(
        &self,
        bucket: &BucketRecord,
        object: &NewObject,
        data: Vec<u8>,
    ) -> Result<Result<Stored, String>, TenantError> {
        let plan = PutPlan {
            bucket: bucket.clone(),
            key: object.key.clone(),
            size: object.size,
            candidates: self.placeable().await?,
            network: self.network().await?,
            etag: object.etag.clone(),
            meta: object.meta.clone(),
        };
        let prepared = match prepare_single(&plan, &self.identity, data.clone()) {
            // Without the avoided nodes the bucket's policy cannot be met: with all of them.
            Err(TransferFailed::Placement(_)) => {
                prepare_single(&PutPlan { candidates: self.candidates().await?, ..plan.clone() }, &self.identity, data)?
            }
            other => other?,
        };
        if let Some(announced) = &object.content_md5 {
            let got = hex::encode(put_md5(&prepared.put));
            if plan.etag.is_none() && !announced.eq_ignore_ascii_case(&got) {
                return Err(TenantError::BadDigest { announced: announced.clone(), got });
            }
        }
        let (answer, turns) = tokio::sync::mpsc::unbounded_channel();
        let mut inbox = Inbox { turns, group: &self.group };
        let code = bucket.policy.code;
        let mut lead = if self.group.join(&bucket.name, Waiting { prepared, code, answer }) {
            self.group.next_batch(fits)
        } else {
            None
        };
        loop {
            if let Some((name, batch)) = lead.take() {
                let mut flight = Flight::new(&self.group, &batch);
                let r = self.run_batch(&name, &batch, &flight.sent).await;
                let answers = std::mem::take(&mut flight.answers);
                match r {
                    Ok(stored) => {
                        for (a, s) in answers.iter().zip(stored) {
                            let _ = a.send(Turn::Done(Box::new(s)));
                        }
                    }
                    Err(BatchFailed::Before(why)) => {
                        for a in &answers {
                            let _ = a.send(Turn::Alone(why.clone()));
                        }
                    }
                    Err(BatchFailed::After(why, hash)) => {
                        for a in &answers {
                            let _ = a.send(Turn::Unknown(why.clone(), hash));
                        }
                    }
                }
                // Dropping the flight hands the slot over.
                drop(flight);
            }
            match inbox.turns.recv().await {
                Some(Turn::Done(stored)) => return Ok(Ok(*stored)),
                Some(Turn::Alone(why)) => return Ok(Err(why)),
                Some(Turn::Unknown(why, hash)) => {
                    return Err(match hash {
                        Some(h) => TenantError::NotFinal(h),
                        None => TenantError::Transfer(TransferFailed::Io(why)),
                    });
                }
                Some(Turn::Lead(name, batch)) => lead = Some((name, batch)),
                None => return Ok(Err("its batch was lost".into())),
            }
        }
    }

    /// Seals and commits one batch: alone, as `PutObject`; more, as `PutObjects`.
    async fn run_batch(
        &self,
        bucket: &str,
        batch: &[Waiting],
        sent: &std::sync::atomic::AtomicBool,
    ) -> Result<Vec<Stored>, BatchFailed> {
        let network = self.network().await.map_err(|e| BatchFailed::Before(e.to_string()))?;
        let (payload, puts) = if let [one] = batch {
            let put = seal_single(&*self.shards, &one.prepared, &network)
                .await
                .map_err(|e| BatchFailed::Before(self.blame(e)))?;
            (Payload::PutObject { put: put.clone() }, vec![put])
        } else {
            let code = batch[0].code;
            let prepared: Vec<&Prepared> = batch.iter().map(|w| &w.prepared).collect();
            let sealed = seal_batch(&*self.shards, &network, bucket, code, &prepared).await.map_err(|e| {
                BatchFailed::Before(format!("the batch of {} objects failed ({})", batch.len(), self.blame(e)))
            })?;
            let puts = sealed.puts.iter().map(|p| sealed.object_put(p)).collect();
            (Payload::PutObjects { batch: sealed }, puts)
        };
        let n = puts.len();
        sent.store(true, std::sync::atomic::Ordering::SeqCst);
        let tx = self.submit_tracked(payload).await.map_err(|(e, admitted)| {
            let why = format!("the batch of {n} objects was not committed ({e})");
            match (admitted, &e) {
                (false, _) => BatchFailed::Before(why),
                (true, TenantError::NotFinal(h)) => BatchFailed::After(why, Some(*h)),
                (true, _) => BatchFailed::After(why, None),
            }
        })?;
        Ok(puts.into_iter().map(|put| Stored { put, tx: tx.clone() }).collect())
    }

    /// What a failed seal says, after noting the holder it blames: new placements of this client
    /// leave that node out for [`AVOID_FOR`] (a dead node would otherwise fail every batch that
    /// names it until the list of storage nodes is read again and its lease has expired).
    fn blame(&self, e: TransferFailed) -> String {
        // Only a holder that did not answer (down, unreachable, cut off): one that answered a
        // refusal (busy, over its quota, a block behind) is up and may take the next batch.
        if let TransferFailed::Holder { node, error, .. } = &e
            && error.code.is_none()
        {
            self.blame_node(*node);
        }
        e.to_string()
    }

    fn blame_node(&self, node: NodeId) {
        let mut avoid = self.avoid.lock().unwrap_or_else(|p| p.into_inner());
        avoid.retain(|_, since| since.elapsed() < AVOID_FOR);
        avoid.insert(node, std::time::Instant::now());
    }

    /// The storage nodes a grouped PUT places on: [`TenantClient::candidates`] without the ones
    /// that did not answer a seal in the last [`AVOID_FOR`].
    async fn placeable(&self) -> Result<CandidateList, TenantError> {
        let all = self.candidates().await?;
        let avoid = self.avoid.lock().unwrap_or_else(|p| p.into_inner());
        Ok(all.into_iter().filter(|(c, _)| avoid.get(&c.node).is_none_or(|t| t.elapsed() >= AVOID_FOR)).collect())
    }

    /// [`TenantClient::put`] of one object on its own, placed again without a holder that
    /// failed.
    async fn put_alone(
        &self,
        bucket: &BucketRecord,
        object: NewObject,
        mut source: impl PutSource,
        mut progress: impl FnMut(u64),
        mut warn: impl FnMut(String),
    ) -> Result<Stored, TenantError> {
        let mut plan = PutPlan {
            bucket: bucket.clone(),
            key: object.key,
            size: object.size,
            candidates: vec![],
            network: self.network().await?,
            etag: object.etag,
            meta: object.meta,
        };
        let mut left_out: Vec<NodeId> = Vec::new();
        let put = loop {
            plan.candidates =
                self.candidates().await?.into_iter().filter(|(n, _)| !left_out.contains(&n.node)).collect();
            let reader = source
                .open()
                .await
                .map_err(|e| TransferFailed::Io(format!("reading the source: {e}")))?
                .ok_or_else(|| TransferFailed::Io("the source cannot be read again for a retry".into()))?;
            progress(0);
            match put_object(self.shards.clone(), &plan, &self.identity, reader, &mut progress).await {
                Ok(put) => break put,
                Err(e) => match e.holder_fault() {
                    Some((node, fault)) if left_out.len() < PUT_ATTEMPTS - 1 => {
                        // A source read once cannot be tried again.
                        left_out.push(node);
                        warn(format!(
                            "{fault}; placing the object again without node {} (attempt {} of {PUT_ATTEMPTS})",
                            node.short(),
                            left_out.len() + 1
                        ));
                    }
                    _ => return Err(e.into()),
                },
            }
        };
        if let Some(announced) = object.content_md5 {
            // Only meaningful when the ETag is the content's MD5 (not a given one).
            let got = hex::encode(put_md5(&put));
            if plan.etag.is_none() && !announced.eq_ignore_ascii_case(&got) {
                return Err(TenantError::BadDigest { announced, got });
            }
        }
        let tx = self.submit(Payload::PutObject { put: put.clone() }).await?;
        Ok(Stored { put, tx })
    }

    /// Starts a version of `bucket/key` written a segment at a time ([`Staged`]): placed now on
    /// the storage nodes up.
    pub async fn begin_staged(&self, bucket: &BucketRecord, key: &str) -> Result<Staged, TenantError> {
        let candidates = self.candidates().await?;
        Ok(Staged::begin(bucket, key, &candidates, &self.identity)?)
    }

    /// Seals and uploads segment `segment` of a staged version; returns its shards' hashes.
    pub async fn stage_segment(
        &self,
        staged: &Staged,
        segment: u64,
        plain: &[u8],
    ) -> Result<Vec<ShardHash>, TenantError> {
        Ok(stage_segment(self.shards.clone(), staged, &self.identity, segment, plain).await?)
    }

    /// Writes a provisional manifest of a staged version to its holders, so that they keep its
    /// shards while parts are slow to come.
    pub async fn keep_staged(
        &self,
        staged: &Staged,
        size: u64,
        segments: Vec<Vec<ShardHash>>,
    ) -> Result<(), TenantError> {
        Ok(keep_staged(&*self.shards, staged, &self.identity, size, segments).await?)
    }

    /// Seals a staged version whose `segments` are all staged and waits until its `PutObject`
    /// is final.
    pub async fn commit_staged(
        &self,
        staged: &Staged,
        size: u64,
        segments: Vec<Vec<ShardHash>>,
        meta: &ObjectMeta,
        etag: String,
    ) -> Result<Stored, TenantError> {
        let network = self.network().await?;
        let put = finish_staged(&*self.shards, staged, &self.identity, size, segments, meta, &network, etag).await?;
        let tx = self.submit(Payload::PutObject { put: put.clone() }).await?;
        Ok(Stored { put, tx })
    }

    /// Opens the object `view` describes: its manifest, data key and metadata.
    pub async fn open(&self, view: &ObjectView) -> Result<Opened, TenantError> {
        Ok(open_object(&*self.shards, &view.object, &holders(view), &self.identity).await?)
    }

    /// Reads `range` (all when `None`) of an object opened with [`Self::open`] into `out`;
    /// returns the holders whose shards failed their hash check.
    pub async fn read(
        &self,
        view: &ObjectView,
        opened: &Opened,
        range: Option<Range<u64>>,
        out: impl AsyncWrite + Unpin,
        progress: impl FnMut(u64),
    ) -> Result<Vec<NodeId>, TenantError> {
        Ok(read_object(&*self.shards, &view.object, &holders(view), opened, range, out, progress).await?)
    }

    /// Reads `range` (all when `None`) of the object `view` describes into `out`; returns the
    /// holders whose shards failed their hash check.
    pub async fn get_into(
        &self,
        view: &ObjectView,
        range: Option<Range<u64>>,
        out: impl AsyncWrite + Unpin,
        progress: impl FnMut(u64),
    ) -> Result<Vec<NodeId>, TenantError> {
        Ok(get_object(&*self.shards, &view.object, &holders(view), &self.identity, range, out, progress).await?)
    }
}

/// The MD5 a PUT computed (its ETag, when none was given).
fn put_md5(put: &ObjectPut) -> Vec<u8> {
    hex::decode(&put.etag).unwrap_or_default()
}

fn not_found_is_none<T>(r: Result<T, TenantError>) -> Result<Option<T>, TenantError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.status() == Some(404) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The innermost cause of an error (what a connection failure really was), as text.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A node on loopback answering `/v1/accounts/…` with the next of `heights` (the last one
    /// once they run out) and any other GET with its `name`; records the other paths asked.
    async fn node(name: &'static str, heights: Vec<u64>) -> (String, Arc<Mutex<Vec<String>>>) {
        throttled_node(name, heights, 0).await
    }

    /// [`node`], answering its first `throttle` other requests 429 (a per-address read bound).
    async fn throttled_node(
        name: &'static str,
        heights: Vec<u64>,
        throttle: usize,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        fake_node(name, heights, throttle, false).await
    }

    /// [`throttled_node`], also answering `/v1/ledger/head` with its height, and every other GET
    /// 404 when `absent` (a node that has not applied a write yet).
    async fn fake_node(
        name: &'static str,
        heights: Vec<u64>,
        throttle: usize,
        absent: bool,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        tokio::spawn(async move {
            let mut heights = heights.into_iter().peekable();
            let mut last = 0;
            let mut throttle = throttle;
            loop {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                let (status, body) = if path.starts_with("/v1/accounts/") {
                    last = heights.next().unwrap_or(last);
                    ("200 OK", serde_json::json!({ "height": last }))
                } else if path == "/v1/ledger/head" {
                    last = heights.next().unwrap_or(last);
                    ("200 OK", serde_json::json!({ "header": { "height": last } }))
                } else if throttle > 0 {
                    throttle -= 1;
                    ("429 Too Many Requests", serde_json::json!({ "error": "ip_rate_limit", "message": "slow down" }))
                } else {
                    log.lock().unwrap().push(path);
                    if absent {
                        ("404 Not Found", serde_json::json!({ "error": "no_such_object", "message": "none" }))
                    } else {
                        ("200 OK", serde_json::json!({ "node": name }))
                    }
                };
                let body = body.to_string();
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        (url, asked)
    }

    #[tokio::test]
    async fn reads_skip_nodes_behind_the_clients_own_writes() {
        let (a, asked_a) = node("a", vec![5]).await;
        let (b, asked_b) = node("b", vec![12]).await;
        let c = TenantClient::new(&[a, b], Identity::generate());
        // Nothing written yet: the first node answers, no height asked.
        let v: serde_json::Value = c.get("/v1/x").await.unwrap();
        assert_eq!(v["node"], "a");
        // A write finalized at block 10: node a (at 5) is not asked, whichever node a read starts
        // at; b (at 12) answers.
        c.written.store(10, Ordering::Relaxed);
        for path in ["/v1/y", "/v1/z"] {
            let v: serde_json::Value = c.get(path).await.unwrap();
            assert_eq!(v["node"], "b");
        }
        assert_eq!(*asked_a.lock().unwrap(), ["/v1/x"]);
        assert_eq!(*asked_b.lock().unwrap(), ["/v1/y", "/v1/z"]);
    }

    #[tokio::test]
    async fn reads_from_nodes_that_stay_behind_fail_as_behind_not_as_absent() {
        let (a, asked_a) = node("a", vec![5]).await;
        let mut c = TenantClient::new(&[a], Identity::generate());
        c.behind_wait = Duration::from_millis(300);
        c.written.store(10, Ordering::Relaxed);
        let e = c.get::<serde_json::Value>("/v1/buckets/b/object?key=k").await.unwrap_err();
        assert_eq!((e.status(), e.code()), (Some(503), Some("behind")), "{e}");
        assert!(asked_a.lock().unwrap().is_empty(), "a node behind is never asked the read");
    }

    #[tokio::test]
    async fn reads_spread_over_the_nodes_and_wait_out_a_node_saying_too_many() {
        let (a, asked_a) = node("a", vec![0]).await;
        let (b, asked_b) = node("b", vec![0]).await;
        let c = TenantClient::new(&[a, b], Identity::generate());
        for _ in 0..4 {
            c.get::<serde_json::Value>("/v1/r").await.unwrap();
        }
        assert_eq!((asked_a.lock().unwrap().len(), asked_b.lock().unwrap().len()), (2, 2));
        // Every node says 429 for a while: the read waits, then is answered.
        let (t, asked_t) = throttled_node("t", vec![0], 3).await;
        let c = TenantClient::new(&[t], Identity::generate());
        let v: serde_json::Value = c.get("/v1/s").await.unwrap();
        assert_eq!(v["node"], "t");
        assert_eq!(*asked_t.lock().unwrap(), ["/v1/s"]);
    }

    #[tokio::test]
    async fn reads_wait_until_a_node_catches_up() {
        let (a, asked_a) = node("a", vec![3, 4, 5, 9, 10]).await;
        let c = TenantClient::new(&[a], Identity::generate());
        c.written.store(10, Ordering::Relaxed);
        let v: serde_json::Value = c.get("/v1/z").await.unwrap();
        assert_eq!(v["node"], "a");
        assert_eq!(*asked_a.lock().unwrap(), ["/v1/z"]);
        assert_eq!(c.seen[0].load(Ordering::Relaxed), 10);
    }

    #[tokio::test]
    async fn absence_and_listings_are_believed_only_at_the_freshest_height_of_any_node() {
        // Another client's write is final at block 9: node b has applied it, node a (at 5) not.
        let (a, asked_a) = fake_node("a", vec![5], 0, true).await;
        let (b, asked_b) = fake_node("b", vec![9], 0, false).await;
        let c = TenantClient::new(&[a, b.clone()], Identity::generate());
        assert_eq!(c.freshest().await, 9);
        // Reads start at a and b in turn. Each time, the answer is b's (a document that is no
        // object, bucket or listing: a decoding error), never a's "absent".
        for _ in 0..2 {
            let o = c.object("x", "k").await;
            assert!(matches!(o, Err(TenantError::Decode { .. })), "{o:?}");
            let k = c.bucket("x").await;
            assert!(matches!(k, Err(TenantError::Decode { .. })), "{k:?}");
            let l = c.list("x", "", None, None, 10).await;
            assert!(matches!(l, Err(TenantError::Decode { .. })), "{l:?}");
        }
        assert!(asked_a.lock().unwrap().iter().all(|p| !p.contains("/objects?")), "a is never asked a listing");
        assert_eq!(asked_b.lock().unwrap().iter().filter(|p| p.contains("/objects?")).count(), 2);
        // A node that does not answer is left out of the freshest height.
        let c = TenantClient::new(&["127.0.0.1:9".to_string(), b], Identity::generate());
        assert_eq!(c.freshest().await, 9);
    }

    /// A queued PUT with its end of the channel.
    fn waiting(key: &str) -> (Waiting, tokio::sync::mpsc::UnboundedReceiver<Turn>) {
        let (answer, turns) = tokio::sync::mpsc::unbounded_channel();
        let put = ObjectPut {
            bucket: "b".into(),
            key: key.into(),
            version: Hash::ZERO,
            nonce: Hash::ZERO,
            size: 1,
            segment_bytes: 4096,
            manifest_root: Hash::ZERO,
            etag: String::new(),
            holders: vec![],
        };
        let prepared = Prepared {
            put,
            claim: crate::transfer::Claim::Owner { object: Hash::ZERO, nonce: [0; 32] },
            holders: vec![],
            manifest: bytes::Bytes::new(),
            shards: vec![],
            per_holder: 0,
        };
        (Waiting { prepared, code: archipel_types::ErasureCode::DEFAULT, answer }, turns)
    }

    fn keys(batch: &[Waiting]) -> Vec<String> {
        batch.iter().map(|w| w.prepared.put.key.clone()).collect()
    }

    /// A batch ends (run, or its runner cancelled): the slot goes to the oldest waiting PUT
    /// with its batch; a PUT cancelled with a batch handed to it, or before, passes the slot on
    /// and sends that batch's PUTs on their own; nothing waits for ever, no slot is lost.
    #[test]
    fn flush_slots_pass_from_batch_to_batch_and_survive_cancelled_puts() {
        use crate::batch::MAX_FLUSHES;
        let group: GroupCommit<Waiting> = GroupCommit::default();
        let mut inboxes = std::collections::BTreeMap::new();
        let mut running = vec![];
        for k in ["a", "b", "c", "d", "e"] {
            let (w, rx) = waiting(k);
            inboxes.insert(k, rx);
            if group.join("bucket", w) {
                running.push(group.next_batch(fits).unwrap());
            }
        }
        // The first MAX_FLUSHES PUTs each took a slot and ran what was waiting then.
        assert_eq!(running.len(), MAX_FLUSHES);
        assert_eq!(group.load().1, MAX_FLUSHES);
        let waiting_keys: Vec<&str> = ["a", "b", "c", "d", "e"][MAX_FLUSHES..].to_vec();
        assert_eq!(group.load().0, waiting_keys.len());

        // The first running batch is cancelled mid-flight: its PUTs go alone, the slot passes
        // to the oldest waiting PUT with everything waiting.
        let (_, first) = running.remove(0);
        drop(Flight::new(&group, &first));
        for k in keys(&first) {
            assert!(matches!(inboxes.get_mut(k.as_str()).unwrap().try_recv(), Ok(Turn::Alone(_))), "{k}");
        }
        let lead = waiting_keys[0];
        let handed = match inboxes.get_mut(lead).unwrap().try_recv() {
            Ok(Turn::Lead(_, batch)) => batch,
            other => panic!("{other:?}"),
        };
        assert_eq!(keys(&handed), waiting_keys);
        assert_eq!(group.load(), (0, MAX_FLUSHES));
        // That PUT is cancelled before it runs the batch: the batch's PUTs go alone and, with
        // nothing else waiting, the slot is given back.
        let (answer, turns) = tokio::sync::mpsc::unbounded_channel();
        answer.send(Turn::Lead("bucket".into(), handed)).unwrap();
        drop(Inbox { turns, group: &group });
        for k in &waiting_keys[1..] {
            assert!(matches!(inboxes.get_mut(k).unwrap().try_recv(), Ok(Turn::Alone(_))), "{k}");
        }
        assert_eq!(group.load(), (0, MAX_FLUSHES - 1));

        // Every slot busy again, then a PUT that is gone before its turn comes: it is dropped
        // from the queue (never committed for nobody) and the next one leads.
        let mut busy = running;
        let mut keep = vec![];
        while group.load().1 < MAX_FLUSHES {
            let (w, rx) = waiting("x");
            keep.push(rx);
            assert!(group.join("bucket", w));
            busy.push(group.next_batch(fits).unwrap());
        }
        let (gone, gone_rx) = waiting("f");
        let (next, mut next_rx) = waiting("g");
        assert!(!group.join("bucket", gone) && !group.join("bucket", next));
        drop(gone_rx);
        for (_, batch) in busy {
            drop(Flight::new(&group, &batch));
        }
        match next_rx.try_recv() {
            Ok(Turn::Lead(_, batch)) => assert_eq!(keys(&batch), ["g"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(group.load(), (0, 1));
        drop(Flight::new(&group, &[]));
        assert_eq!(group.load(), (0, 0), "every slot given back");
        let (again, mut again_rx) = waiting("h");
        assert!(group.join("bucket", again), "a new PUT finds a free slot");
        // Its runner is cancelled after the batch's transaction was sent: its PUTs learn that
        // the outcome is unknown (sending them again could store them twice).
        let (_, batch) = group.next_batch(fits).unwrap();
        let flight = Flight::new(&group, &batch);
        flight.sent.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(flight);
        assert!(matches!(again_rx.try_recv(), Ok(Turn::Unknown(..))));
        assert_eq!(group.load(), (0, 0));
    }
}
