//! The node's HTTP API (axum).
//!
//! Public reads: `/health`, `/metrics`, `GET /v1/node`, `GET /v1/nodes`. Everything else under
//! `/v1/` must be signed (see `archipel_crypto` request signing): the [`authenticate`] middleware
//! verifies the signature, clock skew, nonce and that the key is known to the network, and answers
//! 401/403 with a JSON body naming the failed check.
//!
//! `/health` answers 200 while this node's ledger keeps up with consensus, and 503 with the reason
//! while its applier is stalled; meanwhile reads that answer from the current finalized state
//! (`/v1/ledger/head`, `/v1/accounts/…`, `/v1/proof/state/…`) are refused with 503
//! `ledger_stalled` rather than served stale.

use crate::genesis::Genesis;
use crate::gossip::{SharedPeerTable, lock_table};
use crate::membership::PeerStatus;
use archipel_crypto::{AuthError, RequestVerifier, SignedDescriptor, SignedRequestHeaders};
use archipel_types::{NodeId, Role};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

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
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/node", get(node))
        .route("/v1/nodes", get(nodes))
        .merge(
            crate::ledger_api::routes()
                .route_layer(axum::middleware::from_fn_with_state(state.clone(), refuse_stale_reads)),
        )
        .merge(signed)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see README 'HTTP API'") })
        .with_state(state)
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
        && (path == "/v1/ledger/head" || path.starts_with("/v1/accounts/") || path.starts_with("/v1/proof/state/"))
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
    let leases: std::collections::BTreeMap<NodeId, (archipel_ledger::LeaseStatus, Option<u64>)> =
        s.chain.with_state(|st| {
            st.nodes().keys().map(|id| (*id, (st.lease_status(id), st.lease(id).map(|l| l.since_height)))).collect()
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
    let (mut parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds {MAX_BODY_BYTES} bytes"),
            );
        }
    };
    let path = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    let headers = auth_headers(&parts.headers);
    let verdict = {
        let mut v = s.verifier.lock().unwrap_or_else(|p| p.into_inner());
        let members = lock_table(&s.table).allowed().clone();
        v.verify(&headers, parts.method.as_str(), &path, &bytes, system_now_ms(), |k| {
            s.accounts.contains(k) || members.contains(k)
        })
    };
    match verdict {
        Ok(caller) => {
            parts.extensions.insert(Caller(caller));
            next.run(Request::from_parts(parts, Body::from(bytes))).await
        }
        Err(e) => auth_error(&e),
    }
}

fn auth_error(e: &AuthError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    error(status, e.code(), e.to_string())
}

#[cfg(test)]
mod tests {
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
