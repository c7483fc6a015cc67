//! The node's HTTP API (axum).
//!
//! Public reads: `/health`, `/metrics`, `GET /v1/node`, `GET /v1/nodes`. Everything else under
//! `/v1/` must be signed (see `archipel_crypto` request signing): the [`authenticate`] middleware
//! verifies the signature, clock skew, nonce and that the key is known to the network, and answers
//! 401/403 with a JSON body naming the failed check.

use crate::genesis::Genesis;
use crate::gossip::{SharedPeerTable, lock_table};
use crate::membership::PeerStatus;
use archipel_crypto::{AuthError, RequestVerifier, SignedDescriptor, SignedRequestHeaders};
use archipel_types::{NodeId, Role};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
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
        .merge(crate::ledger_api::routes())
        .merge(signed)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see README 'HTTP API'") })
        .with_state(state)
}

async fn health(State(s): State<Arc<ApiState>>) -> Response {
    Json(serde_json::json!({
        "status": "ok",
        "node_id": s.own.descriptor.node_id,
        "name": s.own.descriptor.name,
        "network": s.genesis.network,
        "genesis_hash": s.genesis_hash,
        "uptime_s": s.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
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
