//! The node's HTTP API (axum).
//!
//! Public reads: `/health`, `/metrics`, `GET /v1/node`, `GET /v1/nodes` and the ledger reads of
//! [`crate::ledger_api`]. The other calls under `/v1/` must be signed (see `archipel_crypto`
//! request signing): the [`authenticate`] middleware verifies the signature, clock skew, nonce and
//! that the key is known to the network, and answers 401/403 with a JSON body naming the failed
//! check.
//!
//! The API cannot starve consensus: it runs on its own tokio runtime ([`ApiServer`]), at most
//! `max_concurrent_requests` requests are handled at once and a quarter of them from one source
//! address ([`IN_FLIGHT_SOURCE_SHARE`]), public reads and submitted transactions are rate-limited
//! per source address and signed calls per key ([`crate::config::ApiLimits`]); a refused call gets
//! 429 with `Retry-After` and a JSON error naming the limit.
//!
//! `/health` answers 200 while this node's ledger keeps up with consensus, and 503 with the reason
//! while its applier is stalled; meanwhile reads that answer from the current finalized state
//! (`/v1/ledger/head`, `/v1/accounts/…`, `/v1/proof/state/…`) are refused with 503
//! `ledger_stalled` rather than served stale.

use crate::config::ApiLimits;
use crate::genesis::Genesis;
use crate::gossip::{SharedPeerTable, lock_table};
use crate::membership::PeerStatus;
use crate::ratelimit::{RateLimiter, source_of};
use archipel_crypto::{AuthError, RequestVerifier, SignedDescriptor, SignedRequestHeaders};
use archipel_types::{NodeId, Role};
use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, IntoMakeServiceWithConnectInfo};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// One source address (IPv6: one /64) may have at most 1/`IN_FLIGHT_SOURCE_SHARE` of
/// `max_concurrent_requests` in flight (at least one). Long polls (`?wait=final`, `wait_ms`) and
/// streamed exports hold their slot for up to 30 s or the export's length, so without a share one
/// address could hold every slot and lock everyone else out; with a quarter it takes at least four
/// addresses, while one client (the CLI, a load generator, a gateway) still keeps 64 of the
/// default 256 busy.
pub const IN_FLIGHT_SOURCE_SHARE: u32 = 4;

/// Everything the handlers read.
pub struct ApiState {
    /// The membership table.
    pub table: SharedPeerTable,
    /// The network's genesis.
    pub genesis: Arc<Genesis>,
    /// Its hash.
    pub genesis_hash: String,
    /// This node's current descriptor.
    pub own: SignedDescriptor,
    /// Tenant accounts allowed to call signed endpoints (member nodes are allowed too).
    pub accounts: BTreeSet<NodeId>,
    /// Verifier with its nonce memory.
    pub verifier: Mutex<RequestVerifier>,
    /// Renders the Prometheus text of every registered metric.
    pub render_metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// When the node started.
    pub started: Instant,
    /// Signals the node to stop (from `POST /v1/node/shutdown`).
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// The ledger as this node sees it.
    pub chain: Arc<archipel_consensus::Chain>,
    /// Encoded transactions to gossip to the validators.
    pub tx_out: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    /// Concurrency and rate limits.
    pub guards: ApiGuards,
    /// This node's shard store, when it has the storage role.
    pub shards: Option<Arc<crate::shards::ShardService>>,
    /// This node's compute provider's book (declines, runs), when it has the compute role.
    pub provider: Option<Arc<crate::provider::ProviderBook>>,
    /// What the node's background workers last did.
    pub workers: crate::workers::WorkerStatuses,
    /// Where submissions are admitted: [`ADMISSION_WORKERS`] threads at the node's normal
    /// priority (admission holds the chain's lock, and a holder on one of the API's niced
    /// threads, preempted, would make consensus wait behind it), the address that used least
    /// first ([`crate::fair_queue`]).
    pub admission: crate::fair_queue::FairQueue,
}

/// Threads that admit submitted transactions (see [`ApiState::admission`]).
pub const ADMISSION_WORKERS: usize = 2;

impl ApiState {
    /// Runs `f` (work under the chain's lock) on an admission thread in `source`'s turn,
    /// charged `cost` (fairness: transactions, a `transfer_many` by its credits) and `work`
    /// transactions (the node-wide pace); the answer to send instead when it could not run.
    pub(crate) async fn admit<R: Send + 'static>(
        &self,
        source: IpAddr,
        cost: u64,
        work: u64,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, Response> {
        self.admission.run(source, cost, work, f).await.map_err(refusal)
    }
}

/// The answer to a submission that [`crate::fair_queue::FairQueue`] did not run.
pub(crate) fn refusal(refused: crate::fair_queue::Refused) -> Response {
    let (status, code, message) = refusal_parts(refused);
    match refused {
        crate::fair_queue::Refused::Busy => retry_later(status, code, message, Duration::from_secs(1)),
        _ => error(status, code, message),
    }
}

/// Status, code and message of a refusal (also given per item of a batch).
pub(crate) fn refusal_parts(refused: crate::fair_queue::Refused) -> (StatusCode, &'static str, String) {
    use crate::fair_queue::{MAX_QUEUED_PER_SOURCE, Refused};
    match refused {
        Refused::Busy => (
            StatusCode::SERVICE_UNAVAILABLE,
            "admission_busy",
            format!(
                "{MAX_QUEUED_PER_SOURCE} submissions from your address (or too many in all) already wait to be admitted: retry when they are answered"
            ),
        ),
        Refused::Stopped => {
            (StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the node is stopping: retry on another node".into())
        }
        Refused::Failed => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "admitting the submission failed on this node (see its log): retry on another node".into(),
        ),
    }
}

/// The API's admission control, built from [`ApiLimits`].
#[derive(Debug)]
pub struct ApiGuards {
    limits: ApiLimits,
    in_flight: Arc<Semaphore>,
    in_flight_by_source: Arc<Mutex<HashMap<IpAddr, u32>>>,
    max_in_flight_per_source: u32,
    reads: RateLimiter<IpAddr>,
    txs: RateLimiter<IpAddr>,
    signed: RateLimiter<NodeId>,
    data: RateLimiter<NodeId>,
    export_bytes: RateLimiter<()>,
    exports: Arc<Semaphore>,
    exports_by_source: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl ApiGuards {
    /// Guards enforcing `limits`.
    pub fn new(limits: ApiLimits) -> Self {
        ApiGuards {
            limits,
            in_flight: Arc::new(Semaphore::new(limits.max_concurrent_requests.get() as usize)),
            in_flight_by_source: Arc::default(),
            max_in_flight_per_source: (limits.max_concurrent_requests.get() / IN_FLIGHT_SOURCE_SHARE).max(1),
            reads: RateLimiter::new(limits.reads_per_second_per_ip, limits.read_burst_per_ip),
            txs: RateLimiter::new(limits.txs_per_second_per_ip, limits.tx_burst_per_ip),
            signed: RateLimiter::new(limits.signed_per_second_per_key, limits.signed_burst_per_key),
            data: RateLimiter::new(limits.data_calls_per_second_per_key, limits.data_burst_per_key),
            export_bytes: RateLimiter::new(limits.export_kib_per_second, limits.export_kib_per_second),
            exports: Arc::new(Semaphore::new(MAX_EXPORTS)),
            exports_by_source: Arc::default(),
        }
    }
}

impl ApiGuards {
    /// A slot for one more request from `source`, unless it already has its share in flight.
    fn source_slot(&self, source: IpAddr) -> Option<SourceSlot> {
        SourceSlot::take(&self.in_flight_by_source, source, self.max_in_flight_per_source)
    }

    /// A slot for one more export from `source` ([`MAX_EXPORTS`] at once in all,
    /// [`MAX_EXPORTS_PER_SOURCE`] from one address), held until the export's stream ends; or the
    /// refusal to answer (429 `export_limit`).
    pub(crate) fn export_slot(&self, source: IpAddr) -> Result<ExportSlot, Box<Response>> {
        let refused = |what: String| {
            Box::new(retry_later(
                StatusCode::TOO_MANY_REQUESTS,
                "export_limit",
                format!(
                    "{what}: retry when one has finished (exports share this node's export budget, api.limits.export_kib_per_second)"
                ),
                Duration::from_secs(5),
            ))
        };
        let Ok(permit) = self.exports.clone().try_acquire_owned() else {
            return Err(refused(format!("this node already streams {MAX_EXPORTS} exports, the most it does at once")));
        };
        let Some(slot) = SourceSlot::take(&self.exports_by_source, source, MAX_EXPORTS_PER_SOURCE) else {
            return Err(refused(format!(
                "{source} already has {MAX_EXPORTS_PER_SOURCE} exports streaming, the most one address may"
            )));
        };
        Ok(ExportSlot { _permit: permit, _slot: slot })
    }

    /// Waits until all exports together may stream `bytes` more
    /// ([`ApiLimits::export_kib_per_second`]).
    pub(crate) async fn pace_export(&self, bytes: usize) {
        let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        while let Err(wait) = self.export_bytes.take_n((), kib, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Charges `count` submitted transactions to `source`'s budget; over it, the refusal to
    /// answer (429 `ip_tx_rate_limit` saying when to retry).
    pub(crate) fn charge_txs(&self, source: IpAddr, count: usize) -> Option<Response> {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        self.txs.take_n(source, count, Instant::now()).err().map(|wait| {
            let l = &self.limits;
            retry_later(
                StatusCode::TOO_MANY_REQUESTS,
                "ip_tx_rate_limit",
                format!(
                    "{source} submitted more than {} transactions in a burst, {} per second (api.limits.tx_burst_per_ip, txs_per_second_per_ip): retry after {} ms",
                    l.tx_burst_per_ip,
                    l.txs_per_second_per_ip,
                    wait.as_millis().max(1)
                ),
                wait,
            )
        })
    }
}

/// One request in flight from `source`, given back when dropped. Entries at zero are removed, so
/// the table holds at most one entry per request in flight.
#[derive(Debug)]
struct SourceSlot {
    counts: Arc<Mutex<HashMap<IpAddr, u32>>>,
    source: IpAddr,
}

impl SourceSlot {
    /// One more of `counts[source]`, unless it already holds `max`.
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, u32>>>, source: IpAddr, max: u32) -> Option<SourceSlot> {
        let mut held_by = counts.lock().unwrap_or_else(|p| p.into_inner());
        let held = held_by.entry(source).or_insert(0);
        if *held >= max {
            if *held == 0 {
                held_by.remove(&source);
            }
            return None;
        }
        *held += 1;
        Some(SourceSlot { counts: counts.clone(), source })
    }
}

/// Most exports a node streams at once, and from one source address. An export holds its slot
/// until its stream ends (a client that stops reading holds it until its connection closes), so
/// exports get their own small pool and can never take every request slot of the node.
pub const MAX_EXPORTS: usize = 16;
/// See [`MAX_EXPORTS`].
pub const MAX_EXPORTS_PER_SOURCE: u32 = 2;

/// An export's hold on [`MAX_EXPORTS`] (released when dropped, with the export's stream).
#[derive(Debug)]
pub struct ExportSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _slot: SourceSlot,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = counts.get_mut(&self.source) {
            *held -= 1;
            if *held == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// The source a request counts against (IPv6 by /64); the unspecified address when the server
/// was not given connection info.
pub(crate) fn request_source(connection: Option<&ConnectInfo<SocketAddr>>) -> IpAddr {
    connection.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| source_of(c.0.ip()))
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").field("node", &self.own.descriptor.node_id).finish_non_exhaustive()
    }
}

/// A JSON error body: `{"error": "<code>", "message": "<what to do>"}`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// Stable machine-readable code.
    pub error: String,
    /// Human explanation.
    pub message: String,
}

pub(crate) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(ApiError { error: code.into(), message: message.into() })).into_response()
}

/// An error answer telling the caller to retry after `wait` (`Retry-After`, whole seconds, at
/// least 1).
pub(crate) fn retry_later(status: StatusCode, code: &str, message: impl Into<String>, wait: Duration) -> Response {
    let mut r = error(status, code, message);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    r
}

/// The body of a signed request with the BLAKE3 hash its signature was checked against (set by
/// the authentication layer for the handler: a shard's hash is that one, not computed again).
#[derive(Clone, Debug)]
pub struct VerifiedBody(pub archipel_store::Hashed<axum::body::Bytes>);

/// The authenticated caller of a signed request.
#[derive(Clone, Copy, Debug)]
pub struct Caller(pub NodeId);

/// One row of `GET /v1/nodes`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRow {
    /// Node id (hex public key).
    pub node_id: NodeId,
    /// Human label.
    pub name: String,
    /// Region.
    pub region: String,
    /// Country of the hardware.
    pub country: String,
    /// Operator.
    pub operator: String,
    /// Jurisdiction of the operator.
    pub operator_jurisdiction: String,
    /// Roles, comma separated.
    pub roles: String,
    /// Whether the node is in the genesis validator set.
    pub validator: bool,
    /// Capacity.
    pub capacity: String,
    /// P2P address.
    pub p2p_address: String,
    /// API URL.
    pub api_url: String,
    /// `up` or `down` as seen by the answering node.
    pub status: PeerStatus,
    /// Last heard from, Unix ms.
    pub last_seen_ms: Option<u64>,
    /// Whether this row is the answering node.
    pub is_self: bool,
    /// Liveness lease in finalized ledger state (`None` if the node is not in the registry).
    #[serde(default)]
    pub lease: Option<archipel_ledger::LeaseStatus>,
    /// Height of the block that set the lease's current status.
    #[serde(default)]
    pub lease_since_height: Option<u64>,
    /// Reputation in finalized ledger state (1000 less 250 per failed storage audit).
    #[serde(default)]
    pub reputation: Option<u16>,
}

/// `GET /v1/nodes` response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodesView {
    /// Network name.
    pub network: String,
    /// The answering node.
    pub observer: NodeId,
    /// The answering node's clock when it answered (Unix ms).
    pub now_ms: u64,
    /// The rows.
    pub nodes: Vec<NodeRow>,
    /// Set while the answering node's ledger is stalled: the lease columns are then stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_stall: Option<archipel_consensus::Stall>,
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn system_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Builds the router.
pub fn router(state: Arc<ApiState>) -> Router {
    let signed = Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/node/shutdown", post(shutdown))
        .route("/v1/admissions", post(admit))
        .merge(crate::jobs_api::tenant_routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate));
    let data =
        crate::shards::routes().route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate_data));
    let public = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/node", get(node))
        .route("/v1/nodes", get(nodes))
        .route("/v1/workers", get(workers))
        .merge(crate::jobs_api::provider_routes())
        .merge(
            crate::ledger_api::routes()
                .merge(crate::storage_api::routes())
                .merge(crate::jobs_api::ledger_routes())
                .route_layer(axum::middleware::from_fn_with_state(state.clone(), refuse_stale_reads)),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), limit_reads));
    Router::new()
        .merge(public)
        .merge(signed)
        .merge(data)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see README 'HTTP API'") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), limit_concurrency))
        .with_state(state)
}

/// The router as a service that knows each connection's source address (for per-IP limits).
pub fn service(state: Arc<ApiState>) -> IntoMakeServiceWithConnectInfo<Router, SocketAddr> {
    router(state).into_make_service_with_connect_info::<SocketAddr>()
}

/// The HTTP API's own tokio runtime: handlers, exports and waits never run on the threads that
/// run consensus. Create it before the consensus runtime, [`ApiServer::serve`] from inside it,
/// and [`ApiServer::stop`] it after the consensus runtime returned (a runtime cannot be dropped
/// from async code).
#[derive(Debug)]
pub struct ApiServer {
    runtime: tokio::runtime::Runtime,
}

impl ApiServer {
    /// Starts the runtime with `limits.worker_threads` threads named `archipel-api`, each (and
    /// each of its blocking threads) [`API_NICE`] steps below the node's other threads.
    pub fn new(limits: &ApiLimits) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(limits.worker_threads.get() as usize)
            .thread_name("archipel-api")
            .on_thread_start({
                // Absolute, from the caller's priority: a thread started by an API thread
                // inherits that thread's lowered priority and must not be lowered again.
                let base = rustix::process::getpriority_process(None).unwrap_or(0);
                move || lower_this_threads_priority(base)
            })
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the API runtime: {e}"))?;
        Ok(ApiServer { runtime })
    }

    /// A handle to spawn the server from another runtime.
    pub fn handle(&self) -> ApiHandle {
        ApiHandle(self.runtime.handle().clone())
    }

    /// Stops the runtime, giving running requests up to `grace`.
    pub fn stop(self, grace: Duration) {
        self.runtime.shutdown_timeout(grace);
    }
}

/// How many nice steps the API's threads run below the node's others. When the CPU is short the
/// kernel shares it by weight, and a thread 10 steps nicer weighs about a tenth: a flood of
/// exports, long polls or list requests then takes the CPU consensus leaves idle, not the CPU
/// consensus needs (measured by the ledger bench's exports step). Work under the chain's lock
/// (admitting submissions) runs elsewhere ([`ApiState::admit`]).
pub const API_NICE: i32 = 10;

/// Sets the calling thread's priority to [`API_NICE`] below `base` (Linux gives each thread its
/// own nice value). Lowering needs no privilege; a failure is logged, and the thread runs as
/// before.
fn lower_this_threads_priority(base: i32) {
    if let Err(e) = rustix::process::setpriority_process(None, (base + API_NICE).min(19)) {
        tracing::warn!(error = %e, "cannot lower the priority of an API thread; the API competes with consensus for CPU");
    }
}

/// Spawns the HTTP server on an [`ApiServer`]'s runtime.
#[derive(Clone, Debug)]
pub struct ApiHandle(tokio::runtime::Handle);

impl ApiHandle {
    /// The API runtime, for background workers.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.0
    }

    /// Serves `state` on `listener` until `stop` turns true; the task ends when the server has.
    pub fn serve(
        &self,
        listener: std::net::TcpListener,
        state: Arc<ApiState>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<()>, String> {
        let _in_runtime = self.0.enter();
        listener.set_nonblocking(true).map_err(|e| format!("API listener: {e}"))?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| format!("API listener: {e}"))?;
        Ok(self.0.spawn(async move {
            let _ = axum::serve(listener, service(state))
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        }))
    }
}

/// Middleware: at most `max_concurrent_requests` requests at once, and at most a share of them
/// ([`IN_FLIGHT_SOURCE_SHARE`]) from one source address; both are held until the response body
/// has been sent (an export streams for a while).
async fn limit_concurrency(State(s): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    // Health checks answer at once from memory: monitoring must see a busy node as busy, not as
    // down (they are still rate-limited per address as reads).
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let Ok(permit) = s.guards.in_flight.clone().try_acquire_owned() else {
        let max = s.guards.limits.max_concurrent_requests;
        return retry_later(
            StatusCode::TOO_MANY_REQUESTS,
            "concurrency_limit",
            format!("this node already handles {max} requests (api.limits.max_concurrent_requests): retry in a moment"),
            Duration::from_secs(1),
        );
    };
    let source = request_source(req.extensions().get::<ConnectInfo<SocketAddr>>());
    let Some(slot) = s.guards.source_slot(source) else {
        let (max, total) = (s.guards.max_in_flight_per_source, s.guards.limits.max_concurrent_requests);
        return retry_later(
            StatusCode::TOO_MANY_REQUESTS,
            "source_concurrency_limit",
            format!(
                "{source} already has {max} requests in flight, the most one address may (1/{IN_FLIGHT_SOURCE_SHARE} \
                 of api.limits.max_concurrent_requests, {total}; long polls and exports hold theirs until they \
                 end): retry when one of them has finished"
            ),
            Duration::from_secs(1),
        );
    };
    let (parts, body) = next.run(req).await.into_parts();
    if axum::body::HttpBody::size_hint(&body).exact().is_some() {
        // Already complete in memory: the request is done.
        return Response::from_parts(parts, body);
    }
    let body = futures::StreamExt::map(body.into_data_stream(), move |chunk| {
        let _held = (&permit, &slot);
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// Middleware: public reads (`GET`) are rate-limited per source address. Submissions have their
/// own per-address budget, counted in transactions by their handlers.
async fn limit_reads(State(s): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return next.run(req).await;
    }
    let ip = request_source(req.extensions().get::<ConnectInfo<SocketAddr>>());
    match s.guards.reads.take(ip, Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let l = &s.guards.limits;
            retry_later(
                StatusCode::TOO_MANY_REQUESTS,
                "ip_rate_limit",
                format!(
                    "{ip} made more than {} reads in a burst, {} per second (api.limits.read_burst_per_ip, reads_per_second_per_ip): retry after {} ms",
                    l.read_burst_per_ip,
                    l.reads_per_second_per_ip,
                    wait.as_millis().max(1)
                ),
                wait,
            )
        }
    }
}

async fn health(State(s): State<Arc<ApiState>>) -> Response {
    let (status, mut body) = ledger_health(&s.chain);
    body["node_id"] = serde_json::json!(s.own.descriptor.node_id);
    body["name"] = serde_json::json!(s.own.descriptor.name);
    body["network"] = serde_json::json!(s.genesis.network);
    body["genesis_hash"] = serde_json::json!(s.genesis_hash);
    body["uptime_s"] = serde_json::json!(s.started.elapsed().as_secs());
    body["version"] = serde_json::json!(env!("CARGO_PKG_VERSION"));
    (status, Json(body)).into_response()
}

/// The ledger part of `/health`: 200 and `"status": "ok"` while the applier keeps up; 503,
/// `"status": "ledger_stalled"` and the stall (height, reason, since when, attempts) while it does
/// not. `ledger.height` is the finalized head either way.
pub fn ledger_health(chain: &archipel_consensus::Chain) -> (StatusCode, serde_json::Value) {
    let height = chain.head().height;
    match chain.applier().stall() {
        // The next block needs a protocol this build does not implement: the chain waits for a
        // quorum of upgraded validators, and this node must be upgraded to follow it.
        None if let Err(why) = chain.with_state(|st| st.check_runnable(height + 1)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "status": "upgrade_required",
                "error": "upgrade_required",
                "message": format!("this node's ledger is at height {height} and cannot go on: {why}"),
                "ledger": { "height": height },
            }),
        ),
        None => (StatusCode::OK, serde_json::json!({ "status": "ok", "ledger": { "height": height } })),
        Some(stall) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "status": "ledger_stalled",
                "error": "ledger_stalled",
                "message": stall_message(height, &stall),
                "ledger": { "height": height, "stall": stall },
            }),
        ),
    }
}

fn stall_message(height: u64, stall: &archipel_consensus::Stall) -> String {
    format!(
        "this node's ledger is stalled at height {height}: {} (block {}, {} failed attempts, retrying); its state \
         is stale: read from another node, and see this node's log",
        stall.reason, stall.height, stall.attempts
    )
}

/// Whether a request reads the current finalized state (and so must not be served stale).
fn reads_current_state(method: &Method, path: &str) -> bool {
    method == Method::GET
        && (path == "/v1/ledger/head"
            || path.starts_with("/v1/accounts/")
            || path.starts_with("/v1/proof/state/")
            || path.starts_with("/v1/buckets")
            || path == "/v1/storage/nodes")
}

/// The refusal of a read of the current state while the ledger is stalled, if it is.
pub fn stale_read_refusal(chain: &archipel_consensus::Chain, method: &Method, path: &str) -> Option<Response> {
    if !reads_current_state(method, path) {
        return None;
    }
    let stall = chain.applier().stall()?;
    Some(error(StatusCode::SERVICE_UNAVAILABLE, "ledger_stalled", stall_message(chain.head().height, &stall)))
}

/// Middleware on the ledger routes: see [`stale_read_refusal`].
async fn refuse_stale_reads(State(s): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    match stale_read_refusal(&s.chain, req.method(), req.uri().path()) {
        Some(refusal) => refusal,
        None => next.run(req).await,
    }
}

async fn workers(State(s): State<Arc<ApiState>>) -> Response {
    Json(s.workers.snapshot()).into_response()
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    let body = (s.render_metrics)();
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
}

async fn node(State(s): State<Arc<ApiState>>) -> Response {
    Json(serde_json::json!({
        "descriptor": s.own,
        "network": s.genesis.network,
        "genesis_hash": s.genesis_hash,
        "validator": s.genesis.validators.contains(&s.own.descriptor.node_id),
    }))
    .into_response()
}

/// Builds the `/v1/nodes` view from the table.
pub fn nodes_view(s: &ApiState) -> NodesView {
    let rows = lock_table(&s.table).rows();
    let validators: BTreeSet<_> = s.genesis.validators.iter().copied().collect();
    type LeaseRow = (archipel_ledger::LeaseStatus, Option<u64>, u16);
    let leases: std::collections::BTreeMap<NodeId, LeaseRow> = s.chain.with_state(|st| {
        st.nodes()
            .keys()
            .map(|id| (*id, (st.lease_status(id), st.lease(id).map(|l| l.since_height), st.reputation(id))))
            .collect()
    });
    NodesView {
        network: s.genesis.network.clone(),
        observer: s.own.descriptor.node_id,
        now_ms: system_now_ms(),
        nodes: rows
            .into_iter()
            .map(|r| {
                let d = &r.descriptor.descriptor;
                NodeRow {
                    node_id: d.node_id,
                    name: d.name.clone(),
                    region: d.region.to_string(),
                    country: d.country.to_string(),
                    operator: d.operator.clone(),
                    operator_jurisdiction: d.operator_jurisdiction.to_string(),
                    roles: d.roles.to_string(),
                    validator: validators.contains(&d.node_id) && d.roles.contains(Role::Validator),
                    capacity: d.capacity.to_string(),
                    p2p_address: d.p2p_address.to_string(),
                    api_url: format!("http://{}", d.api_address),
                    status: r.status,
                    last_seen_ms: if r.is_self { Some(system_now_ms()) } else { r.last_seen_ms },
                    is_self: r.is_self,
                    lease: leases.get(&d.node_id).map(|l| l.0),
                    lease_since_height: leases.get(&d.node_id).and_then(|l| l.1),
                    reputation: leases.get(&d.node_id).map(|l| l.2),
                }
            })
            .collect(),
        ledger_stall: s.chain.applier().stall(),
    }
}

async fn nodes(State(s): State<Arc<ApiState>>) -> Response {
    Json(nodes_view(&s)).into_response()
}

async fn whoami(State(s): State<Arc<ApiState>>, Extension(Caller(id)): Extension<Caller>) -> Response {
    let kind = if s.genesis.node(&id).is_some() { "node" } else { "account" };
    let name = s
        .genesis
        .node(&id)
        .map(|n| n.descriptor.name.clone())
        .or_else(|| s.genesis.accounts.iter().find(|a| a.key == id).map(|a| a.name.clone()));
    Json(serde_json::json!({ "key": id, "kind": kind, "name": name })).into_response()
}

async fn shutdown(State(s): State<Arc<ApiState>>, Extension(Caller(id)): Extension<Caller>) -> Response {
    if id != s.own.descriptor.node_id {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("only this node's own key may stop it; {} is not {}", id.short(), s.own.descriptor.node_id.short()),
        );
    }
    let _ = s.shutdown.send(true);
    Json(serde_json::json!({ "stopping": true })).into_response()
}

async fn admit(State(s): State<Arc<ApiState>>, body: axum::body::Bytes) -> Response {
    let admission: archipel_crypto::Admission = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, "malformed_admission", format!("body is not an admission: {e}"));
        }
    };
    let id = admission.descriptor.descriptor.node_id;
    match lock_table(&s.table).admit(admission) {
        Ok(new) => Json(serde_json::json!({ "node_id": id, "admitted": true, "new": new })).into_response(),
        Err(reason) => error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_admission", reason),
    }
}

fn auth_headers(h: &HeaderMap) -> SignedRequestHeaders {
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    SignedRequestHeaders {
        key: get(archipel_crypto::HEADER_KEY),
        timestamp: get(archipel_crypto::HEADER_TIMESTAMP),
        nonce: get(archipel_crypto::HEADER_NONCE),
        signature: get(archipel_crypto::HEADER_SIGNATURE),
    }
}

/// Middleware: verifies the request signature and attaches the [`Caller`].
pub async fn authenticate(State(s): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    authenticate_up_to(s, req, next, MAX_BODY_BYTES, false).await
}

/// [`authenticate`] for the shard data plane, whose bodies are whole shards
/// ([`crate::shards::MAX_SHARD_BODY`]).
pub async fn authenticate_data(State(s): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    // Bodies are held in memory: each call reserves its declared length out of the node's budget
    // first, and may send no more than it declared.
    // No length and no chunked body: an empty body (a read, a seal). A chunked one may be as
    // large as any.
    let headers = req.headers();
    let declared = match headers.get(axum::http::header::CONTENT_LENGTH) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(crate::shards::MAX_SHARD_BODY, |n| n.min(crate::shards::MAX_SHARD_BODY as u64) as usize),
        None if headers.contains_key(axum::http::header::TRANSFER_ENCODING) => crate::shards::MAX_SHARD_BODY,
        None => 0,
    };
    // A stranger, a stale timestamp or a malformed signature holds nothing: checked before the
    // body's memory is reserved (the signature itself covers the body, checked once it is read).
    let prechecked = {
        let v = s.verifier.lock().unwrap_or_else(|p| p.into_inner());
        let members = lock_table(&s.table).allowed().clone();
        v.precheck(&auth_headers(headers), system_now_ms(), |k| may_call(&s, &members, k, true))
    };
    if let Err(e) = prechecked {
        return auth_error(&e);
    }
    let source = request_source(req.extensions().get::<ConnectInfo<SocketAddr>>());
    let _slot = match s.shards.as_ref().map(|svc| svc.try_slot(source, declared)) {
        Some(Ok(slot)) => Some(slot),
        Some(Err(refused)) => {
            use crate::shards::{
                DATA_BODY_BUDGET, DATA_BODY_BUDGET_PER_SOURCE, MAX_DATA_CALLS, MAX_DATA_CALLS_PER_SOURCE, SlotRefused,
            };
            let message = match refused {
                SlotRefused::Busy => format!(
                    "this node already handles {MAX_DATA_CALLS} shard transfers or holds {} MiB of their bodies, the \
                     most it takes at once: retry in a moment",
                    DATA_BODY_BUDGET >> 20
                ),
                SlotRefused::SourceBusy => format!(
                    "{source} already has {MAX_DATA_CALLS_PER_SOURCE} shard transfers or {} MiB of their bodies on \
                     this node, the most one address may hold at once: retry when one has finished",
                    DATA_BODY_BUDGET_PER_SOURCE >> 20
                ),
            };
            return retry_later(StatusCode::SERVICE_UNAVAILABLE, "data_busy", message, Duration::from_millis(200));
        }
        // No shard store: nothing here takes a body (and none would be reserved for), so the
        // call is answered before one is read.
        None => {
            return error(
                StatusCode::NOT_FOUND,
                "not_a_storage_node",
                "this node does not have the storage role: ask a storage node",
            );
        }
    };
    authenticate_up_to(s, req, next, declared, true).await
}

/// Bodies larger than this are hashed on a blocking thread, not on the async worker.
const HASH_INLINE_BYTES: usize = 1 << 20;

/// Slowest pace a request body may arrive at (after a 10 s grace).
pub const MIN_BODY_BYTES_PER_SEC: usize = 1 << 20;

/// How long a body of at most `limit` bytes may take to arrive.
pub fn body_deadline(limit: usize) -> Duration {
    Duration::from_secs(10 + (limit / MIN_BODY_BYTES_PER_SEC) as u64)
}

/// Checks the request's signature, from a genesis account or a member node; on the data plane
/// (`data_plane`) also from any account the finalized ledger knows (funded or used): tenants who
/// joined after the genesis store and read their objects with the key that owns their buckets.
/// Data-plane calls count against their own per-key rate (`data_calls_per_second_per_key`).
async fn authenticate_up_to(s: Arc<ApiState>, req: Request, next: Next, limit: usize, data_plane: bool) -> Response {
    let (mut parts, body) = req.into_parts();
    // A body must arrive at a pace: a client that trickles it would hold its slot (and on the data
    // plane its share of the body budget) for as long as it liked.
    let deadline = body_deadline(limit);
    let bytes = match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds {limit} bytes (the length it declared, or the most this call takes)"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s (at least {} KiB/s): send it at once",
                    deadline.as_secs(),
                    MIN_BODY_BYTES_PER_SEC >> 10
                ),
            );
        }
    };
    let path = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    let headers = auth_headers(&parts.headers);
    // Hashed once, outside the verifier's lock (a shard body is tens of MiB); the handler gets the
    // hash with the body (`VerifiedBody`) and does not hash it again.
    let body = if bytes.len() > HASH_INLINE_BYTES {
        // A large body (a shard of up to tens of MiB) is hashed off the async workers.
        match tokio::task::spawn_blocking(move || archipel_store::Hashed::new(bytes)).await {
            Ok(body) => body,
            Err(e) => {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("hashing the body failed: {e}"));
            }
        }
    } else {
        archipel_store::Hashed::new(bytes)
    };
    let verdict = {
        let mut v = s.verifier.lock().unwrap_or_else(|p| p.into_inner());
        let members = lock_table(&s.table).allowed().clone();
        v.verify_prehashed(&headers, parts.method.as_str(), &path, body.hash(), system_now_ms(), |k| {
            may_call(&s, &members, k, data_plane)
        })
    };
    match verdict {
        Ok(caller) => {
            let l = &s.guards.limits;
            let (limiter, burst, rate, names) = if data_plane {
                (
                    &s.guards.data,
                    l.data_burst_per_key,
                    l.data_calls_per_second_per_key,
                    "data_burst_per_key, data_calls_per_second_per_key",
                )
            } else {
                (
                    &s.guards.signed,
                    l.signed_burst_per_key,
                    l.signed_per_second_per_key,
                    "signed_burst_per_key, signed_per_second_per_key",
                )
            };
            if let Err(wait) = limiter.take(caller, Instant::now()) {
                return retry_later(
                    StatusCode::TOO_MANY_REQUESTS,
                    "key_rate_limit",
                    format!(
                        "key {} made more than {burst} signed calls in a burst, {rate} per second (api.limits.{names}): retry after {} ms",
                        caller.short(),
                        wait.as_millis().max(1)
                    ),
                    wait,
                );
            }
            parts.extensions.insert(Caller(caller));
            let bytes = body.bytes().clone();
            parts.extensions.insert(VerifiedBody(body));
            next.run(Request::from_parts(parts, Body::from(bytes))).await
        }
        // Only a signature that fails: a replay, an unknown key or a busy verifier say so as such.
        Err(e @ AuthError::BadSignature(_)) => {
            declared_hash_mismatch(&parts.headers, body.hash()).unwrap_or_else(|| auth_error(&e))
        }
        Err(e) => auth_error(&e),
    }
}

/// A shard upload whose declared hash is not its body's: signed with the declared hash (a
/// client signs a shard with the hash it has), so its signature fails; named for what it is.
fn declared_hash_mismatch(headers: &axum::http::HeaderMap, body: &[u8; 32]) -> Option<Response> {
    let declared = headers.get(crate::shards::HASH_HEADER)?.to_str().ok()?;
    let actual = hex::encode(body);
    (!declared.eq_ignore_ascii_case(&actual)).then(|| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "hash_mismatch",
            format!(
                "the body's BLAKE3 hash is {actual}, not the {declared} given in {}: send the shard's own hash",
                crate::shards::HASH_HEADER
            ),
        )
    })
}

/// Whether key `k` may make signed calls: a genesis account or a member node; on the data plane
/// (`data_plane`) also any account the finalized ledger knows (funded or used).
fn may_call(s: &ApiState, members: &std::collections::BTreeSet<NodeId>, k: &NodeId, data_plane: bool) -> bool {
    s.accounts.contains(k)
        || members.contains(k)
        || (data_plane
            && s.chain.with_state(|st| {
                let a = st.account(k);
                a.balance_micro > 0 || a.nonce > 0
            }))
}

fn auth_error(e: &AuthError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    error(status, e.code(), e.to_string())
}

/// A one-node network's API state for the API's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::config::{ApiConfig, NodeConfig, P2pConfig};
    use crate::genesis::GenesisAccount;
    use crate::membership::PeerTable;
    use archipel_consensus::{Chain, MemoryStore};
    use archipel_crypto::Identity;

    /// The tenant account of [`state`], funded in its genesis.
    pub(crate) fn tenant() -> Identity {
        Identity::from_seed(7)
    }

    /// The API state of a one-node network enforcing `limits`; nothing finalizes unless the test
    /// finalizes blocks itself.
    pub(crate) fn state(limits: ApiLimits) -> Arc<ApiState> {
        let node = Identity::from_seed(1);
        let cfg = NodeConfig {
            ledger: Default::default(),
            compute: Default::default(),
            name: "n01".into(),
            key_file: "node.key".into(),
            data_dir: "data".into(),
            genesis_file: "genesis.json".into(),
            region: "eu-de".parse().unwrap(),
            country: "DE".parse().unwrap(),
            operator: "acme".into(),
            operator_jurisdiction: "DE".parse().unwrap(),
            capacity: "1GiB".parse().unwrap(),
            roles: "validator".parse().unwrap(),
            p2p: P2pConfig {
                listen: "127.0.0.1:1".parse().unwrap(),
                public: None,
                egress_ip: None,
                allow_private_ips: true,
            },
            api: ApiConfig { listen: "127.0.0.1:2".parse().unwrap(), public: None, limits },
        };
        let own = crate::run::own_descriptor(&node, &cfg, None, 1).unwrap();
        let genesis = Genesis {
            network: "api-test".into(),
            created_at_ms: 1,
            nodes: vec![own.clone()],
            validators: vec![node.node_id()],
            accounts: vec![GenesisAccount { name: "tenant".into(), key: tenant().node_id(), balance_micro: 1 << 40 }],
            membership: Default::default(),
            ledger: Default::default(),
        };
        let chain = Chain::open(genesis.ledger_state(), Box::new(MemoryStore::default())).unwrap();
        let table = PeerTable::new(own.clone(), vec![own.clone()], genesis.node_ids(), genesis.membership);
        let (tx_out, _) = tokio::sync::mpsc::unbounded_channel();
        let (shutdown, _) = tokio::sync::watch::channel(false);
        Arc::new(ApiState {
            table: Arc::new(Mutex::new(table)),
            genesis_hash: genesis.hash(),
            accounts: genesis.accounts.iter().map(|a| a.key).collect(),
            genesis: Arc::new(genesis),
            own,
            verifier: Mutex::new(RequestVerifier::default()),
            render_metrics: Box::new(String::new),
            started: Instant::now(),
            shutdown,
            chain: Arc::new(chain),
            tx_out,
            guards: ApiGuards::new(limits),
            admission: crate::fair_queue::FairQueue::new(ADMISSION_WORKERS, limits.admission_pace()).unwrap(),
            shards: None,
            provider: None,
            workers: Default::default(),
        })
    }

    /// Serves `state` on a free loopback port of the current runtime; returns its base URL.
    pub(crate) async fn serve(state: Arc<ApiState>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, service(state)).await });
        url
    }

    /// `limits` with the given changes.
    pub(crate) fn limits(change: impl FnOnce(&mut ApiLimits)) -> ApiLimits {
        let mut l = ApiLimits::default();
        change(&mut l);
        l
    }

    /// A non-zero `u32`.
    pub(crate) fn nz(v: u32) -> std::num::NonZeroU32 {
        std::num::NonZeroU32::new(v).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::client::{ApiClient, ClientError};
    use archipel_crypto::Identity;

    async fn get(url: &str) -> reqwest::Response {
        reqwest::Client::builder().no_proxy().build().unwrap().get(url).send().await.unwrap()
    }

    async fn refusal(r: reqwest::Response) -> (u16, Option<String>, String) {
        let status = r.status().as_u16();
        let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let e: ApiError = r.json().await.unwrap();
        assert!(!e.message.is_empty());
        (status, retry, e.error)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn public_reads_are_limited_per_source_address() {
        let state = state(limits(|l| {
            l.reads_per_second_per_ip = nz(1);
            l.read_burst_per_ip = nz(3);
        }));
        let url = serve(state).await;
        for _ in 0..3 {
            assert_eq!(get(&format!("{url}/health")).await.status(), 200);
        }
        let (status, retry, code) = refusal(get(&format!("{url}/v1/ledger/head")).await).await;
        assert_eq!((status, retry.as_deref(), code.as_str()), (429, Some("1"), "ip_rate_limit"));
        // The client waits as told and asks again.
        let client = ApiClient::new(&url);
        client.get::<serde_json::Value>("/v1/ledger/head").await.expect("answered after Retry-After");
        // Submissions are not reads: they have their own budget, and the ledger judges them (here: not a
        // transaction).
        match client.raw("POST", "/v1/tx", b"junk".to_vec(), Duration::from_secs(5)).await {
            Err(ClientError::Api { status, code, .. }) => assert_eq!((status, code.as_str()), (400, "malformed")),
            other => panic!("{other:?}"),
        }
    }

    async fn post(url: &str, body: Vec<u8>) -> reqwest::Response {
        reqwest::Client::builder().no_proxy().build().unwrap().post(url).body(body).send().await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn submissions_are_limited_per_source_address_by_transaction_count() {
        let state = state(limits(|l| {
            l.txs_per_second_per_ip = nz(1);
            l.tx_burst_per_ip = nz(5);
        }));
        let url = serve(state).await;
        // A batch of 4 records that are not transactions: each still costs one (what is sent is
        // charged, before decoding).
        let mut batch = Vec::new();
        for _ in 0..4 {
            archipel_ledger::export::put_record(&mut batch, b"junk");
        }
        let r = post(&format!("{url}/v1/txs"), batch.clone()).await;
        assert_eq!(r.status(), 200);
        let items: Vec<crate::ledger_api::BatchItem> = r.json().await.unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(post(&format!("{url}/v1/tx"), b"junk".to_vec()).await.status(), 400, "the fifth");
        let r = post(&format!("{url}/v1/tx"), b"junk".to_vec()).await;
        let (status, retry, code) = refusal(r).await;
        assert_eq!((status, retry.as_deref(), code.as_str()), (429, Some("1"), "ip_tx_rate_limit"));
        let r = post(&format!("{url}/v1/txs"), batch).await;
        let message = r.json::<ApiError>().await.unwrap().message;
        assert!(message.contains("tx_burst_per_ip") && message.contains("retry after"), "{message}");
        // Reads from the same address have their own budget.
        assert_eq!(get(&format!("{url}/health")).await.status(), 200);
        // The client waits as told and submits again.
        match ApiClient::new(&url).raw("POST", "/v1/tx", b"junk".to_vec(), Duration::from_secs(5)).await {
            Err(ClientError::Api { status, code, .. }) => assert_eq!((status, code.as_str()), (400, "malformed")),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signed_calls_are_limited_per_key() {
        let state = state(limits(|l| {
            l.signed_per_second_per_key = nz(1);
            l.signed_burst_per_key = nz(2);
        }));
        let url = serve(state).await;
        let tenant = ApiClient::new(&url).with_identity(tenant());
        for _ in 0..2 {
            tenant.get::<serde_json::Value>("/v1/whoami").await.unwrap();
        }
        match tenant.get::<serde_json::Value>("/v1/whoami").await {
            Err(ClientError::Api { status, code, message, .. }) => {
                assert_eq!((status, code.as_str()), (429, "key_rate_limit"));
                assert!(message.contains("signed_burst_per_key"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let node = ApiClient::new(&url).with_identity(Identity::from_seed(1));
        node.get::<serde_json::Value>("/v1/whoami").await.expect("another key has its own limit");
        // A key that is not allowed is refused for that reason, before any limit.
        let stranger = ApiClient::new(&url).with_identity(Identity::from_seed(99));
        assert!(matches!(stranger.get::<serde_json::Value>("/v1/whoami").await, Err(e) if e.status() == Some(403)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_in_flight_are_capped() {
        let state = state(limits(|l| l.max_concurrent_requests = nz(1)));
        let url = serve(state).await;
        // A long poll for a block that does not come holds the only slot.
        let poll = format!("{url}/v1/ledger/blocks?from=5&wait_ms=1500");
        let waiting = tokio::spawn(async move { get(&poll).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, retry, code) = refusal(get(&format!("{url}/v1/ledger/head")).await).await;
        assert_eq!((status, retry.as_deref(), code.as_str()), (429, Some("1"), "concurrency_limit"));
        assert_eq!(get(&format!("{url}/health")).await.status(), 200, "health checks are never held back");
        assert_eq!(waiting.await.unwrap().status(), 200);
        assert_eq!(get(&format!("{url}/v1/ledger/head")).await.status(), 200, "the slot is free again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_source_address_holds_at_most_a_share_of_the_requests_in_flight() {
        let state = state(limits(|l| l.max_concurrent_requests = nz(8)));
        let url = serve(state).await;
        // Two long polls from 127.0.0.1 hold its share (8 / 4).
        let poll = format!("{url}/v1/ledger/blocks?from=5&wait_ms=1500");
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let poll = poll.clone();
                tokio::spawn(async move { get(&poll).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = get(&format!("{url}/v1/ledger/head")).await;
        let (status, retry, code) = refusal(r).await;
        assert_eq!((status, retry.as_deref(), code.as_str()), (429, Some("1"), "source_concurrency_limit"));
        let r = get(&format!("{url}/v1/ledger/head")).await;
        let message = r.json::<ApiError>().await.unwrap().message;
        assert!(message.contains("127.0.0.1 already has 2 requests in flight"), "{message}");
        // Another source address still gets in.
        let other = reqwest::Client::builder().no_proxy().local_address("127.0.0.2".parse::<IpAddr>().unwrap());
        let r = other.build().unwrap().get(format!("{url}/v1/ledger/head")).send().await.unwrap();
        assert_eq!(r.status(), 200, "another source is not held back");
        for w in waiting {
            assert_eq!(w.await.unwrap().status(), 200);
        }
        assert_eq!(get(&format!("{url}/v1/ledger/head")).await.status(), 200, "the share is free again");
    }

    #[test]
    fn exports_have_their_own_small_pool_per_node_and_per_address() {
        let guards = ApiGuards::new(ApiLimits::default());
        let ip = |i: u8| IpAddr::from([127, 0, 9, i]);
        let first = guards.export_slot(ip(1)).unwrap();
        let _second = guards.export_slot(ip(1)).unwrap();
        let refused = guards.export_slot(ip(1)).unwrap_err();
        assert_eq!(refused.status(), 429);
        drop(first);
        let _again = guards.export_slot(ip(1)).expect("a finished export frees its slot");
        let mut held: Vec<_> = (2..=15).map(|i| guards.export_slot(ip(i)).unwrap()).collect();
        assert_eq!(held.len() + 2, MAX_EXPORTS);
        assert_eq!(guards.export_slot(ip(99)).unwrap_err().status(), 429, "the node's pool is full");
        held.pop();
        guards.export_slot(ip(99)).expect("room again");
    }

    #[test]
    fn the_api_threads_run_below_the_callers_priority() {
        let server = ApiServer::new(&ApiLimits::default()).unwrap();
        let mine = rustix::process::getpriority_process(None).unwrap();
        let on = |blocking: bool| {
            server.runtime.block_on(async move {
                let ask = || rustix::process::getpriority_process(None).unwrap();
                // Spawned from a worker, as the API spawns them: a new blocking thread inherits
                // the worker's priority and must still end at the same level.
                tokio::spawn(
                    async move { if blocking { tokio::task::spawn_blocking(ask).await.unwrap() } else { ask() } },
                )
                .await
                .unwrap()
            })
        };
        let expected = (mine + API_NICE).min(19);
        assert_eq!(on(false), expected, "a worker thread");
        assert_eq!(on(true), expected, "a blocking thread (export reads)");
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), mine, "the caller's thread is unchanged");
        server.stop(Duration::from_millis(100));
    }

    #[test]
    fn the_api_answers_while_the_consensus_runtime_is_busy() {
        let server = ApiServer::new(&ApiLimits::default()).unwrap();
        let state = state(ApiLimits::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let consensus = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let api = server.handle();
        let answered = consensus.block_on(async move {
            let _server = api.serve(listener, state, stop).unwrap();
            let asked = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
                    client.get(&url).send().await.map(|r| r.status().as_u16())
                })
            });
            // The consensus runtime's only thread is busy for longer than the client waits.
            std::thread::sleep(Duration::from_secs(3));
            asked.join().unwrap()
        });
        server.stop(Duration::from_millis(100));
        assert_eq!(answered.map_err(|e| e.to_string()), Ok(200));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stranger_on_the_data_plane_is_refused_before_its_body_is_awaited() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let url = serve(state(ApiLimits::default())).await;
        let addr = url.trim_start_matches("http://");
        let path = format!("/v1/objects/{}/manifest", "ab".repeat(32));
        // No signature at all, a body declared and never sent: answered at once, no slot held.
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 80000000\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("refused at once, not after the body deadline")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
        // A well-signed call from a key nobody knows (no account, not a member): refused too.
        let stranger = Identity::from_seed(0xdead);
        let headers = archipel_crypto::sign_request(&stranger, "PUT", &path, b"x", system_now_ms(), [1; 16]);
        let mut req = reqwest::Client::builder().no_proxy().build().unwrap().put(format!("{url}{path}")).body("x");
        for (k, v) in headers.pairs() {
            req = req.header(k, v);
        }
        let (status, _, code) = refusal(req.send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (403, "unknown_key"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_trickles_is_cut_off_with_a_clear_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let url = serve(state(ApiLimits::default())).await;
        let addr = url.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A signed route; the body declares 1,000 bytes and sends 10, then nothing.
        let head = format!("POST /v1/node/shutdown HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1000\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&[b'x'; 10]).await.unwrap();
        let started = Instant::now();
        // The answer's head and body may come in separate reads: read until the error code shows
        // or the node closes.
        let mut answer = vec![];
        let read_all = async {
            let mut buf = [0u8; 4096];
            loop {
                let n = conn.read(&mut buf).await.unwrap();
                answer.extend_from_slice(&buf[..n]);
                if n == 0 || String::from_utf8_lossy(&answer).contains("KiB/s") {
                    break;
                }
            }
        };
        tokio::time::timeout(body_deadline(MAX_BODY_BYTES) + Duration::from_secs(10), read_all)
            .await
            .expect("the node never answered a trickling body");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("body_timeout") && text.contains("KiB/s"), "{text}");
        assert!(started.elapsed() >= Duration::from_secs(9), "cut off after its deadline, not before");
    }
}

#[cfg(test)]
mod stall_tests {
    use super::*;
    use archipel_consensus::{Chain, MemoryStore};
    use archipel_ledger::{GenesisState, State as LedgerState};

    async fn body(r: Response) -> serde_json::Value {
        serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_stalled_applier_makes_health_503_and_refuses_reads_of_the_current_state() {
        let chain =
            Chain::open(LedgerState::genesis(GenesisState::default()), Box::new(MemoryStore::default())).unwrap();
        let (status, ok) = ledger_health(&chain);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ok["status"], "ok");
        assert_eq!(ok["ledger"]["height"], 0);
        assert!(stale_read_refusal(&chain, &Method::GET, "/v1/ledger/head").is_none());

        // What the applier records when a finalized block does not apply.
        chain.applier().failed(1, "cannot append block 1 to the block log: no space left on device".into(), 5);
        let (status, stalled) = ledger_health(&chain);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(stalled["status"], "ledger_stalled");
        assert_eq!(stalled["ledger"]["stall"]["height"], 1);
        assert!(stalled["message"].as_str().unwrap().contains("no space left"), "{stalled}");
        for path in ["/v1/ledger/head", "/v1/accounts/ab", "/v1/proof/state/params"] {
            let refusal = stale_read_refusal(&chain, &Method::GET, path).expect("refused while stalled");
            assert_eq!(refusal.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
            let e = body(refusal).await;
            assert_eq!(e["error"], "ledger_stalled", "{path}");
            assert!(e["message"].as_str().unwrap().contains("stalled at height 0"), "{e}");
        }
        // Finalized history does not go stale: blocks by height and transaction proofs are served.
        assert!(stale_read_refusal(&chain, &Method::GET, "/v1/ledger/blocks/1").is_none());
        assert!(stale_read_refusal(&chain, &Method::GET, "/v1/proof/tx/ab").is_none());

        chain.applier().recovered();
        assert_eq!(ledger_health(&chain).0, StatusCode::OK);
        assert!(stale_read_refusal(&chain, &Method::GET, "/v1/ledger/head").is_none());
    }
}
