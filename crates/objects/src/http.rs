//! [`Shards`] over the nodes' signed HTTP data plane (`archipel_node::shards` serves it).
//!
//! Every call is signed with the client's key. A node busy with its maximum of shard transfers
//! answers 503 `data_busy`, and one over its per-key data rate 429 `key_rate_limit`; either call is
//! retried a few times after a short pause. One that does not know the key yet (403
//! `unknown_key`: a node behind the block that funded a new tenant) is asked again every 500 ms
//! for 6 s. Timeouts scale
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
/// Times a node that does not know the caller's key yet is asked again, [`UNKNOWN_KEY_PAUSE`]
/// apart: a node a few blocks behind (a follower under load was measured 3 s behind) has not
/// applied the funding of a new tenant that other nodes already show.
const UNKNOWN_KEY_RETRIES: u32 = 12;
/// The pause between those.
const UNKNOWN_KEY_PAUSE: Duration = Duration::from_millis(500);

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
        let mut unknown = 0;
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
            if code == "unknown_key" && unknown < UNKNOWN_KEY_RETRIES {
                unknown += 1;
                tokio::time::sleep(UNKNOWN_KEY_PAUSE).await;
                continue;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Answers each connection's requests with `answers` in turn (one request per connection:
    /// the server closes it), reading each request whole first.
    async fn serve(answers: Vec<(u16, String)>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for (status, body) in answers {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers, then as much body as they announce.
                loop {
                    let n = conn.read(&mut buf).await.unwrap();
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if req.len() >= end + 4 + len {
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        url
    }

    /// A node that does not know the key yet (a block behind the funding) is asked again until
    /// it does; one that never learns it fails the call with its answer after the retries.
    #[tokio::test]
    async fn a_key_a_node_does_not_know_yet_is_tried_again() {
        let unknown = (403, r#"{"error":"unknown_key","message":"key 0b12 is not known to this network"}"#.to_string());
        let sealed = sealed_example();
        let url = serve(vec![unknown.clone(), unknown.clone(), (200, sealed.clone())]).await;
        let shards = HttpShards::new(Identity::from_seed(5));
        let holder = Holder { node: Identity::from_seed(6).node_id(), url };
        let started = std::time::Instant::now();
        let got = shards.seal_batch(&holder, vec![]).await.unwrap();
        assert_eq!(serde_json::to_string(&got).unwrap(), sealed);
        assert!(started.elapsed() >= 2 * UNKNOWN_KEY_PAUSE);

        let url = serve(vec![unknown; UNKNOWN_KEY_RETRIES as usize + 1]).await;
        let holder = Holder { node: Identity::from_seed(6).node_id(), url };
        let e = shards.seal_batch(&holder, vec![]).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some("unknown_key"), "{e:?}");
    }

    /// A batched seal's answer, as JSON.
    fn sealed_example() -> String {
        serde_json::to_string(&crate::batch::BatchSealed {
            node: Identity::from_seed(6).node_id(),
            expires_ms: 7,
            receipt: "00".repeat(64),
            shard_bytes: vec![1, 2],
        })
        .unwrap()
    }
}
