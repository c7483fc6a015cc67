//! [`Shards`] over the nodes' signed HTTP data plane (`archipel_node::shards` serves it).
//!
//! Every call is signed with the client's key. A node busy with its maximum of shard transfers
//! answers 503 `data_busy`, and one over its per-key data rate 429 `key_rate_limit`; either call is
//! retried a few times after a short pause. Timeouts scale
//! with the body: a slow node fails its call rather than stalling a transfer for ever.

use crate::pipeline::ShardHash;
use crate::transfer::{CLAIM_HEADER, Claim, Holder, SealWith, Sealed, Shards, TransferError};
use archipel_crypto::{Identity, sign_request, sign_request_prehashed};
use archipel_ledger::Hash;
use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Header carrying a shard's hash on upload (the node's `shards::HASH_HEADER`).
pub const HASH_HEADER: &str = "x-archipel-shard-hash";
/// Times a busy node is asked again.
const BUSY_RETRIES: u32 = 20;

/// Shards over signed HTTP.
#[derive(Clone, Debug)]
pub struct HttpShards {
    http: reqwest::Client,
    identity: Identity,
}

impl HttpShards {
    /// A transport signing with `identity`.
    pub fn new(identity: Identity) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .no_proxy()
            .pool_max_idle_per_host(8)
            .build()
            .unwrap_or_default();
        HttpShards { http, identity }
    }

    /// Sends a signed request; `hash`, for a shard's body, is its BLAKE3 hash: declared in
    /// [`HASH_HEADER`] and signed as the body's hash (not computed again).
    async fn call(
        &self,
        method: &str,
        h: &Holder,
        path: &str,
        body: Bytes,
        hash: Option<ShardHash>,
        claim: Option<&Claim>,
    ) -> Result<Bytes, TransferError> {
        let url = format!("{}{path}", h.url.trim_end_matches('/'));
        // A minute plus a second per MiB: generous for a slow disk, finite for a dead node. A
        // batched seal holds other PUTs' batches: 15 s plus a second per MiB, so that one
        // holder that hangs does not stall them for a minute.
        let base = if path == crate::batch::SEAL_BATCH_PATH { 15 } else { 60 };
        let timeout = Duration::from_secs(base + (body.len() as u64 >> 20));
        let fail = |message: String| TransferError { message, full: false, code: None };
        let mut attempt = 0;
        loop {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            let mut nonce = [0u8; 16];
            rand::fill(&mut nonce);
            // A shard's hash is its body's: signed as it is, not hashed again.
            let headers = match &hash {
                Some(hash) => sign_request_prehashed(&self.identity, method, path, hash, now, nonce),
                None => sign_request(&self.identity, method, path, &body, now, nonce),
            };
            let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| fail(e.to_string()))?;
            let mut req = self.http.request(m, &url).timeout(timeout).body(body.clone());
            for (k, v) in headers.pairs() {
                req = req.header(k, v);
            }
            if let Some(hash) = hash {
                req = req.header(HASH_HEADER, hex::encode(hash));
            }
            if let Some(claim) = claim {
                req = req.header(CLAIM_HEADER, claim.to_header());
            }
            let resp = req.send().await.map_err(|e| fail(format!("cannot reach {url}: {}", root_cause(&e))))?;
            let status = resp.status();
            let bytes = read_capped(resp, &url).await?;
            if status.is_success() {
                return Ok(bytes);
            }
            let (code, message) = match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(v) => (
                    v["error"].as_str().unwrap_or("error").to_string(),
                    v["message"].as_str().unwrap_or_default().to_string(),
                ),
                Err(_) => ("error".into(), String::from_utf8_lossy(&bytes).chars().take(200).collect()),
            };
            if (code == "data_busy" || code == "key_rate_limit") && attempt < BUSY_RETRIES {
                attempt += 1;
                // A growing pause: the node's `Retry-After` is in whole seconds, far longer than
                // its limiters need.
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(5)))).await;
                continue;
            }
            return Err(TransferError {
                message: format!("{url} answered {} {code}: {message}", status.as_u16()),
                full: code == "storage_full",
                code: Some(code),
            });
        }
    }
}

/// Most bytes read from one answer: a shard or manifest at most (the node's data-plane body
/// limit). A node that sends more is cut off, not buffered: a Byzantine holder cannot exhaust the
/// reader's memory.
pub const MAX_ANSWER_BYTES: usize = 80 << 20;

async fn read_capped(mut resp: reqwest::Response, url: &str) -> Result<Bytes, TransferError> {
    let fail = |message: String| TransferError { message, full: false, code: None };
    if resp.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
        return Err(fail(format!("{url} announced an answer of more than {MAX_ANSWER_BYTES} bytes")));
    }
    let mut out = Vec::with_capacity(resp.content_length().unwrap_or(0) as usize);
    while let Some(chunk) = resp.chunk().await.map_err(|e| fail(format!("{url}: {}", root_cause(&e))))? {
        if out.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(fail(format!("{url} sent more than {MAX_ANSWER_BYTES} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn object_path(version: &Hash) -> String {
    format!("/v1/objects/{version}")
}

impl Shards for HttpShards {
    async fn put_shard(
        &self,
        holder: &Holder,
        version: &Hash,
        claim: &Claim,
        index: u8,
        segment: u64,
        bytes: Bytes,
        hash: ShardHash,
    ) -> Result<(), TransferError> {
        let path = format!("{}/shards/{index}/{segment}", object_path(version));
        self.call("PUT", holder, &path, bytes, Some(hash), Some(claim)).await.map(drop)
    }

    async fn put_manifest(
        &self,
        holder: &Holder,
        version: &Hash,
        claim: &Claim,
        bytes: Bytes,
    ) -> Result<(), TransferError> {
        self.call("PUT", holder, &format!("{}/manifest", object_path(version)), bytes, None, Some(claim))
            .await
            .map(drop)
    }

    async fn seal(
        &self,
        holder: &Holder,
        version: &Hash,
        claim: &Claim,
        index: u8,
        generation: u32,
        with: SealWith,
    ) -> Result<Sealed, TransferError> {
        let mut path = format!("{}/seal/{index}?generation={generation}", object_path(version));
        // The body is the manifest, then the shard if one rides along (the query says where the
        // manifest ends).
        let body = match (with.manifest, with.shard) {
            (None, None) => Bytes::new(),
            (Some(m), None) => m,
            (Some(m), Some(shard)) => {
                path.push_str(&format!("&manifest_bytes={}", m.len()));
                Bytes::from([m.as_ref(), shard.as_ref()].concat())
            }
            (None, Some(_)) => {
                return Err(TransferError {
                    message: "a shard rides with a seal only with its manifest".into(),
                    full: false,
                    code: None,
                });
            }
        };
        let body = self.call("POST", holder, &path, body, None, Some(claim)).await?;
        let bad = |m: &str| TransferError {
            message: format!("{}: bad seal answer: {m}", holder.url),
            full: false,
            code: None,
        };
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(&e.to_string()))?;
        let mut receipt = [0u8; 64];
        hex::decode_to_slice(v["receipt"].as_str().unwrap_or(""), &mut receipt).map_err(|_| bad("receipt"))?;
        let manifest_root: Hash =
            v["manifest_root"].as_str().unwrap_or("").parse().map_err(|_| bad("manifest_root"))?;
        let shard_bytes = v["shard_bytes"].as_u64().ok_or_else(|| bad("shard_bytes"))?;
        let expires_ms = v["expires_ms"].as_u64().ok_or_else(|| bad("expires_ms"))?;
        Ok(Sealed { shard_bytes, manifest_root, receipt, expires_ms })
    }

    async fn seal_batch(
        &self,
        holder: &Holder,
        items: Vec<crate::batch::SealItem>,
    ) -> Result<crate::batch::BatchSealed, TransferError> {
        let body = Bytes::from(crate::batch::encode_items(&items));
        let answer = self.call("POST", holder, crate::batch::SEAL_BATCH_PATH, body, None, None).await?;
        serde_json::from_slice(&answer).map_err(|e| TransferError {
            message: format!("{}: bad batched seal answer: {e}", holder.url),
            full: false,
            code: None,
        })
    }

    async fn get_manifest(&self, holder: &Holder, version: &Hash) -> Result<Vec<u8>, TransferError> {
        self.call("GET", holder, &format!("{}/manifest", object_path(version)), Bytes::new(), None, None)
            .await
            .map(|b| b.to_vec())
    }

    async fn get_shard(
        &self,
        holder: &Holder,
        version: &Hash,
        index: u8,
        segment: u64,
    ) -> Result<Vec<u8>, TransferError> {
        let path = format!("{}/shards/{index}/{segment}", object_path(version));
        self.call("GET", holder, &path, Bytes::new(), None, None).await.map(|b| b.to_vec())
    }
}
