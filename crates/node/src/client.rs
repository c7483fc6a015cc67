//! A client of the node HTTP API, signing requests with `archipel_crypto` when given a key.
//! Used by the CLI, the devnet supervisor and the integration tests.

use crate::api::{ApiError, NodesView};
use archipel_crypto::{Identity, sign_request};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection.
    #[error(
        "cannot reach {url}: {reason} (is the node running? check the address, or start a devnet with `archipel devnet`)"
    )]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The node answered with an error.
    #[error("{url} answered {status} {code}: {message}")]
    Api {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Error code from the body.
        code: String,
        /// Message from the body.
        message: String,
    },
    /// The answer could not be understood.
    #[error("unexpected answer from {url}: {reason}")]
    Decode {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

impl ClientError {
    /// The HTTP status, if the node answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client for one node.
#[derive(Clone, Debug)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
    identity: Option<Identity>,
}

impl ApiClient {
    /// A client for the node at `base` (`http://127.0.0.2:23101` or `127.0.0.2:23101`).
    pub fn new(base: &str) -> Self {
        let base = base.trim_end_matches('/');
        let base = if base.contains("://") { base.to_string() } else { format!("http://{base}") };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .no_proxy()
            .build()
            .unwrap_or_default();
        Self { base, http, identity: None }
    }

    /// Signs every request with `identity`.
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The node's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request (signed if the client has a key) and decodes a JSON answer.
    pub async fn call<T: DeserializeOwned>(&self, method: &str, path: &str, body: Vec<u8>) -> Result<T, ClientError> {
        let url = format!("{}{}", self.base, path);
        let bytes = self.call_bytes(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode { url, reason: e.to_string() })
    }

    /// `GET` raw bytes (signed if the client has a key): a job's output or log.
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        Ok(self.call_bytes("GET", path, Vec::new()).await?.to_vec())
    }

    /// Sends a request (signed if the client has a key); the answer's bytes.
    async fn call_bytes(&self, method: &str, path: &str, body: Vec<u8>) -> Result<bytes::Bytes, ClientError> {
        let url = format!("{}{}", self.base, path);
        let m = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::Decode { url: url.clone(), reason: e.to_string() })?;
        let mut req = self.http.request(m, &url);
        if let Some(id) = &self.identity {
            let mut nonce = [0u8; 16];
            rand::fill(&mut nonce);
            let headers = sign_request(id, method, path, &body, crate::api::system_now_ms(), nonce);
            for (k, v) in headers.pairs() {
                req = req.header(k, v);
            }
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json").body(body);
        }
        send(req, &url, self.identity.is_some()).await
    }

    /// `GET` a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, Vec::new()).await
    }

    /// Sends raw bytes (unsigned) and returns the raw answer body; API errors are decoded.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let url = format!("{}{}", self.base, path);
        let m = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::Decode { url: url.clone(), reason: e.to_string() })?;
        let mut req = self.http.request(m, &url).timeout(timeout);
        if !body.is_empty() {
            req = req.header("content-type", "application/octet-stream").body(body);
        }
        Ok(send(req, &url, false).await?.to_vec())
    }

    /// Submits a signed transaction; with `wait_final`, answers once it is in a finalized block.
    pub async fn submit(
        &self,
        tx: &archipel_ledger::SignedTransaction,
        wait_final: bool,
    ) -> Result<crate::ledger_api::SubmitResponse, ClientError> {
        let path = if wait_final { "/v1/tx?wait=final&timeout_ms=30000" } else { "/v1/tx" };
        let bytes = self.raw("POST", path, tx.to_bytes(), Duration::from_secs(35)).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Decode { url: format!("{}{path}", self.base), reason: e.to_string() })
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<NodesView, ClientError> {
        self.get("/v1/nodes").await
    }

    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> Result<String, ClientError> {
        let url = format!("{}/metrics", self.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable { url: url.clone(), reason: root_cause(&e) })?;
        resp.text().await.map_err(|e| ClientError::Decode { url, reason: e.to_string() })
    }
}

/// Most times an unsigned request refused with 429 is sent again.
pub const READ_RETRIES: u32 = 3;

/// Longest `Retry-After` waited for before sending again (longer: the 429 is returned).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Sends `req` and returns the body of a successful answer; an error answer becomes
/// [`ClientError::Api`] with the code and message from its JSON body. An unsigned request (a
/// read, or a transaction submission: the same transaction twice is one) refused by the node's
/// rate limit (429) is sent again after its `Retry-After`, up to [`READ_RETRIES`] times (a signed
/// request is not: its nonce is spent).
async fn send(mut req: reqwest::RequestBuilder, url: &str, signed: bool) -> Result<bytes::Bytes, ClientError> {
    let unreachable = |e: reqwest::Error| ClientError::Unreachable { url: url.to_string(), reason: root_cause(&e) };
    let mut retries = 0;
    let resp = loop {
        let again = if !signed && retries < READ_RETRIES { req.try_clone() } else { None };
        let resp = req.send().await.map_err(unreachable)?;
        let wait = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .map(Duration::from_secs);
        match (resp.status().as_u16(), wait, again) {
            (429, Some(wait), Some(again)) if wait <= MAX_RETRY_AFTER => {
                tokio::time::sleep(wait).await;
                retries += 1;
                req = again;
            }
            _ => break resp,
        }
    };
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(unreachable)?;
    if !status.is_success() {
        let (code, message) = match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) => (e.error, e.message),
            Err(_) => ("error".into(), String::from_utf8_lossy(&bytes).chars().take(200).collect()),
        };
        return Err(ClientError::Api { url: url.to_string(), status: status.as_u16(), code, message });
    }
    Ok(bytes)
}

use archipel_objects::tenant::root_cause;
