//! Signed HTTP requests: the one implementation used by the CLI client and the node's server.
//!
//! A request carries four headers: the caller's key, a timestamp (Unix milliseconds), a random
//! nonce and a signature under [`crate::namespace::REQUEST`] over
//! `METHOD \n PATH?QUERY \n TIMESTAMP \n NONCE \n BLAKE3(body)`. The server refuses a request that
//! is unsigned, malformed, outside the allowed clock skew, signed by a different key, replayed
//! (same key and nonce seen within the skew window) or signed by a key it does not know.
//!
//! [`RequestVerifier`] takes the current time as an argument and keeps the nonces it has seen,
//! so it is deterministic and testable without a clock.

use crate::{Identity, namespace, verify_signature};
use archipel_types::NodeId;
use std::collections::{HashSet, VecDeque};

/// Header carrying the caller's public key (64 hex).
pub const HEADER_KEY: &str = "x-archipel-key";
/// Header carrying the signing time, Unix milliseconds.
pub const HEADER_TIMESTAMP: &str = "x-archipel-timestamp";
/// Header carrying a random 16-byte nonce (32 hex).
pub const HEADER_NONCE: &str = "x-archipel-nonce";
/// Header carrying the Ed25519 signature (128 hex).
pub const HEADER_SIGNATURE: &str = "x-archipel-signature";
/// Largest accepted difference between the signer's clock and ours.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;
/// Most nonces remembered at once; beyond it new requests are refused until old ones expire.
pub const MAX_REMEMBERED_NONCES: usize = 1_000_000;

fn canonical(
    method: &str,
    path_and_query: &str,
    timestamp_ms: u64,
    nonce_hex: &str,
    body_blake3: &[u8; 32],
) -> Vec<u8> {
    format!(
        "{}\n{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path_and_query,
        timestamp_ms,
        nonce_hex,
        hex::encode(body_blake3)
    )
    .into_bytes()
}

/// The four authentication headers of a request, as sent or as received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SignedRequestHeaders {
    /// [`HEADER_KEY`].
    pub key: Option<String>,
    /// [`HEADER_TIMESTAMP`].
    pub timestamp: Option<String>,
    /// [`HEADER_NONCE`].
    pub nonce: Option<String>,
    /// [`HEADER_SIGNATURE`].
    pub signature: Option<String>,
}

impl SignedRequestHeaders {
    /// The headers as name/value pairs, for a client to attach.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        [
            (HEADER_KEY, &self.key),
            (HEADER_TIMESTAMP, &self.timestamp),
            (HEADER_NONCE, &self.nonce),
            (HEADER_SIGNATURE, &self.signature),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

/// Signs a request. `nonce` must be fresh randomness for every request.
pub fn sign_request(
    identity: &Identity,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now_ms: u64,
    nonce: [u8; 16],
) -> SignedRequestHeaders {
    sign_request_prehashed(identity, method, path_and_query, blake3::hash(body).as_bytes(), now_ms, nonce)
}

/// [`sign_request`] for a body whose BLAKE3 hash the caller has already (a shard, hashed for its
/// manifest): the body is not hashed again. A wrong hash only gets the request refused.
pub fn sign_request_prehashed(
    identity: &Identity,
    method: &str,
    path_and_query: &str,
    body_blake3: &[u8; 32],
    now_ms: u64,
    nonce: [u8; 16],
) -> SignedRequestHeaders {
    let nonce_hex = hex::encode(nonce);
    let sig = identity.sign(namespace::REQUEST, &canonical(method, path_and_query, now_ms, &nonce_hex, body_blake3));
    SignedRequestHeaders {
        key: Some(identity.node_id().to_string()),
        timestamp: Some(now_ms.to_string()),
        nonce: Some(nonce_hex),
        signature: Some(hex::encode(sig)),
    }
}

/// Why a request was refused. [`AuthError::status`] gives the HTTP status, [`AuthError::code`] a
/// stable machine-readable name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// A required header is absent.
    #[error(
        "request is not signed: header {0} is missing (sign requests with the archipel CLI or see README 'Signed requests')"
    )]
    Missing(&'static str),
    /// A header cannot be parsed.
    #[error("header {0} is malformed: {1}")]
    Malformed(&'static str, String),
    /// The timestamp is too far from the server's clock.
    #[error(
        "request timestamp is {skew_ms} ms away from the server clock (limit {limit_ms} ms): check the client's clock (NTP)"
    )]
    Stale {
        /// How far off, in milliseconds.
        skew_ms: u64,
        /// The limit.
        limit_ms: u64,
    },
    /// The signature does not match the key, method, path, timestamp, nonce or body.
    #[error("signature does not verify for key {0}: the request was altered or signed with a different key")]
    BadSignature(String),
    /// The nonce was already used by this key.
    #[error("nonce already used by key {0}: the request is a replay; send a fresh nonce per request")]
    Replayed(String),
    /// The key is valid but not known to this network.
    #[error("key {0} is not known to this network: only registered nodes and tenant accounts may call this endpoint")]
    UnknownKey(String),
    /// Too many requests in the skew window to remember their nonces.
    #[error("server is remembering too many recent nonces; retry in a few seconds")]
    Busy,
}

impl AuthError {
    /// HTTP status: 401 for requests that fail authentication, 403 for authenticated but unknown
    /// keys, 503 when the server cannot take more.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::UnknownKey(_) => 403,
            AuthError::Busy => 503,
            _ => 401,
        }
    }

    /// A stable name of the failed check, for scripts.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing(_) => "missing_signature",
            AuthError::Malformed(..) => "malformed_signature",
            AuthError::Stale { .. } => "stale_timestamp",
            AuthError::BadSignature(_) => "bad_signature",
            AuthError::Replayed(_) => "replayed_nonce",
            AuthError::UnknownKey(_) => "unknown_key",
            AuthError::Busy => "busy",
        }
    }
}

/// A signed request's headers, parsed.
struct Parsed<'h> {
    key: NodeId,
    ts: u64,
    nonce: [u8; 16],
    nonce_hex: &'h str,
    sig: [u8; 64],
}

/// Verifies signed requests and remembers nonces to refuse replays.
#[derive(Debug)]
pub struct RequestVerifier {
    max_skew_ms: u64,
    capacity: usize,
    seen: HashSet<(NodeId, [u8; 16])>,
    // Expiry order of `seen`: (forget-after ms, key, nonce). A nonce needs remembering only while
    // its timestamp is inside the skew window; after that the request is refused as stale anyway.
    expiry: VecDeque<(u64, NodeId, [u8; 16])>,
}

impl Default for RequestVerifier {
    fn default() -> Self {
        Self::new(MAX_CLOCK_SKEW_MS, MAX_REMEMBERED_NONCES)
    }
}

impl RequestVerifier {
    /// A verifier accepting `max_skew_ms` of clock difference and remembering up to `capacity` nonces.
    pub fn new(max_skew_ms: u64, capacity: usize) -> Self {
        Self { max_skew_ms, capacity, seen: HashSet::new(), expiry: VecDeque::new() }
    }

    /// Number of nonces currently remembered.
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }

    /// What can be checked of a signed request before its body is read: the headers are all
    /// there and well formed, the timestamp is inside the skew window and the key is known. A
    /// server runs it before it reserves memory for the body, so a stranger holds none.
    pub fn precheck(
        &self,
        headers: &SignedRequestHeaders,
        now_ms: u64,
        is_known: impl Fn(&NodeId) -> bool,
    ) -> Result<NodeId, AuthError> {
        let Parsed { key, .. } = self.parse_fresh(headers, now_ms)?;
        if !is_known(&key) {
            return Err(AuthError::UnknownKey(key.short()));
        }
        Ok(key)
    }

    /// The headers, parsed, with a timestamp inside the skew window.
    fn parse_fresh<'h>(&self, headers: &'h SignedRequestHeaders, now_ms: u64) -> Result<Parsed<'h>, AuthError> {
        let key = headers.key.as_deref().ok_or(AuthError::Missing(HEADER_KEY))?;
        let ts = headers.timestamp.as_deref().ok_or(AuthError::Missing(HEADER_TIMESTAMP))?;
        let nonce_hex = headers.nonce.as_deref().ok_or(AuthError::Missing(HEADER_NONCE))?;
        let sig_hex = headers.signature.as_deref().ok_or(AuthError::Missing(HEADER_SIGNATURE))?;

        let key: NodeId =
            key.parse().map_err(|_| AuthError::Malformed(HEADER_KEY, "expected 64 hex characters".into()))?;
        let ts: u64 =
            ts.parse().map_err(|_| AuthError::Malformed(HEADER_TIMESTAMP, "expected Unix milliseconds".into()))?;
        let mut nonce = [0u8; 16];
        hex::decode_to_slice(nonce_hex, &mut nonce)
            .map_err(|_| AuthError::Malformed(HEADER_NONCE, "expected 32 hex characters".into()))?;
        let mut sig = [0u8; 64];
        hex::decode_to_slice(sig_hex, &mut sig)
            .map_err(|_| AuthError::Malformed(HEADER_SIGNATURE, "expected 128 hex characters".into()))?;
        let skew_ms = now_ms.abs_diff(ts);
        if skew_ms > self.max_skew_ms {
            return Err(AuthError::Stale { skew_ms, limit_ms: self.max_skew_ms });
        }
        Ok(Parsed { key, ts, nonce, nonce_hex, sig })
    }

    /// Checks a request and returns the verified caller. `is_known` decides which keys may call.
    pub fn verify(
        &mut self,
        headers: &SignedRequestHeaders,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        now_ms: u64,
        is_known: impl Fn(&NodeId) -> bool,
    ) -> Result<NodeId, AuthError> {
        self.verify_prehashed(headers, method, path_and_query, blake3::hash(body).as_bytes(), now_ms, is_known)
    }

    /// [`RequestVerifier::verify`] for a body the server hashed itself, outside any lock (a
    /// shard of tens of MiB): `body_blake3` must be BLAKE3 of the very bytes received — a hash
    /// taken from the request would let a forged body through.
    pub fn verify_prehashed(
        &mut self,
        headers: &SignedRequestHeaders,
        method: &str,
        path_and_query: &str,
        body_blake3: &[u8; 32],
        now_ms: u64,
        is_known: impl Fn(&NodeId) -> bool,
    ) -> Result<NodeId, AuthError> {
        let Parsed { key, ts, nonce, nonce_hex, sig } = self.parse_fresh(headers, now_ms)?;
        verify_signature(
            &key,
            namespace::REQUEST,
            &canonical(method, path_and_query, ts, nonce_hex, body_blake3),
            &sig,
        )
        .map_err(|_| AuthError::BadSignature(key.short()))?;
        if !is_known(&key) {
            return Err(AuthError::UnknownKey(key.short()));
        }

        self.forget_expired(now_ms);
        if self.seen.contains(&(key, nonce)) {
            return Err(AuthError::Replayed(key.short()));
        }
        if self.seen.len() >= self.capacity {
            return Err(AuthError::Busy);
        }
        self.seen.insert((key, nonce));
        // Keep the queue sorted by expiry even if timestamps arrive out of order: a later
        // insertion with an earlier expiry is kept until the entries before it expire, which only
        // remembers it longer than needed, never shorter.
        let forget_after = (ts + self.max_skew_ms).max(self.expiry.back().map_or(0, |e| e.0));
        self.expiry.push_back((forget_after, key, nonce));
        Ok(key)
    }

    fn forget_expired(&mut self, now_ms: u64) {
        while let Some(&(forget_after, key, nonce)) = self.expiry.front() {
            if forget_after >= now_ms {
                break;
            }
            self.expiry.pop_front();
            self.seen.remove(&(key, nonce));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn setup() -> (Identity, RequestVerifier, SignedRequestHeaders) {
        let id = Identity::from_seed(7);
        let headers = sign_request(&id, "POST", "/v1/echo?x=1", b"body", NOW, [1; 16]);
        (id, RequestVerifier::default(), headers)
    }

    #[test]
    fn accepts_a_good_request_once() {
        let (id, mut v, h) = setup();
        assert_eq!(v.verify(&h, "POST", "/v1/echo?x=1", b"body", NOW + 5, |_| true), Ok(id.node_id()));
        let again = v.verify(&h, "POST", "/v1/echo?x=1", b"body", NOW + 6, |_| true);
        assert!(matches!(again, Err(AuthError::Replayed(_))), "{again:?}");
        assert_eq!(again.unwrap_err().status(), 401);
    }

    #[test]
    fn a_prehashed_body_signs_and_verifies_as_the_body_itself() {
        let id = Identity::from_seed(7);
        let hash = *blake3::hash(b"body").as_bytes();
        let pre = sign_request_prehashed(&id, "POST", "/v1/echo?x=1", &hash, NOW, [1; 16]);
        assert_eq!(pre, sign_request(&id, "POST", "/v1/echo?x=1", b"body", NOW, [1; 16]));
        let mut v = RequestVerifier::default();
        let other = *blake3::hash(b"bodY").as_bytes();
        let r = v.verify_prehashed(&pre, "POST", "/v1/echo?x=1", &other, NOW, |_| true);
        assert!(matches!(r, Err(AuthError::BadSignature(_))), "the hash of another body: {r:?}");
        assert_eq!(v.verify_prehashed(&pre, "POST", "/v1/echo?x=1", &hash, NOW, |_| true), Ok(id.node_id()));
        // The same request through `verify` (which hashes the body) is the replay it is.
        assert!(matches!(v.verify(&pre, "POST", "/v1/echo?x=1", b"body", NOW, |_| true), Err(AuthError::Replayed(_))));
    }

    #[test]
    fn tampered_body_path_or_method_fails() {
        let (_, mut v, h) = setup();
        for (m, p, b) in [
            ("POST", "/v1/echo?x=1", &b"bodY"[..]),
            ("POST", "/v1/echo?x=2", b"body"),
            ("PUT", "/v1/echo?x=1", b"body"),
        ] {
            let r = v.verify(&h, m, p, b, NOW, |_| true);
            assert!(matches!(r, Err(AuthError::BadSignature(_))), "{m} {p}: {r:?}");
        }
        // None of the failures consumed the nonce.
        assert!(v.verify(&h, "POST", "/v1/echo?x=1", b"body", NOW, |_| true).is_ok());
    }

    #[test]
    fn tampered_headers_fail() {
        let (_, mut v, h) = setup();
        let mut t = h.clone();
        t.timestamp = Some((NOW + 1).to_string());
        assert!(matches!(
            v.verify(&t, "POST", "/v1/echo?x=1", b"body", NOW, |_| true),
            Err(AuthError::BadSignature(_))
        ));
        let mut t = h.clone();
        t.nonce = Some(hex::encode([2u8; 16]));
        assert!(matches!(
            v.verify(&t, "POST", "/v1/echo?x=1", b"body", NOW, |_| true),
            Err(AuthError::BadSignature(_))
        ));
        // Another key claiming the same signature.
        let mut t = h.clone();
        t.key = Some(Identity::from_seed(8).node_id().to_string());
        assert!(matches!(
            v.verify(&t, "POST", "/v1/echo?x=1", b"body", NOW, |_| true),
            Err(AuthError::BadSignature(_))
        ));
    }

    #[test]
    fn clock_skew_beyond_limit_is_stale() {
        let (_, mut v, h) = setup();
        let late = v.verify(&h, "POST", "/v1/echo?x=1", b"body", NOW + MAX_CLOCK_SKEW_MS + 1, |_| true);
        assert!(matches!(late, Err(AuthError::Stale { .. })), "{late:?}");
        let early = v.verify(&h, "POST", "/v1/echo?x=1", b"body", NOW - MAX_CLOCK_SKEW_MS - 1, |_| true);
        assert!(matches!(early, Err(AuthError::Stale { .. })));
        assert_eq!(early.unwrap_err().code(), "stale_timestamp");
        assert!(v.verify(&h, "POST", "/v1/echo?x=1", b"body", NOW + MAX_CLOCK_SKEW_MS, |_| true).is_ok());
    }

    #[test]
    fn unknown_key_is_forbidden_after_signature_check() {
        let (_, mut v, h) = setup();
        let r = v.verify(&h, "POST", "/v1/echo?x=1", b"body", NOW, |_| false);
        assert!(matches!(r, Err(AuthError::UnknownKey(_))));
        assert_eq!(r.unwrap_err().status(), 403);
    }

    #[test]
    fn missing_and_malformed_headers_are_named() {
        let (_, mut v, h) = setup();
        for (i, name) in [HEADER_KEY, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE].iter().enumerate() {
            let mut t = h.clone();
            match i {
                0 => t.key = None,
                1 => t.timestamp = None,
                2 => t.nonce = None,
                _ => t.signature = None,
            }
            assert_eq!(v.verify(&t, "POST", "/v1/echo?x=1", b"body", NOW, |_| true), Err(AuthError::Missing(name)));
        }
        let mut t = h.clone();
        t.signature = Some("zz".into());
        assert!(matches!(
            v.verify(&t, "POST", "/v1/echo?x=1", b"body", NOW, |_| true),
            Err(AuthError::Malformed(HEADER_SIGNATURE, _))
        ));
        assert_eq!(SignedRequestHeaders::default().pairs(), vec![]);
    }

    #[test]
    fn nonces_are_forgotten_after_the_window_and_bounded() {
        let id = Identity::from_seed(9);
        let mut v = RequestVerifier::new(1_000, 2);
        for n in 0..2u8 {
            let h = sign_request(&id, "GET", "/", b"", NOW, [n; 16]);
            assert!(v.verify(&h, "GET", "/", b"", NOW, |_| true).is_ok());
        }
        let h = sign_request(&id, "GET", "/", b"", NOW, [9; 16]);
        assert_eq!(v.verify(&h, "GET", "/", b"", NOW, |_| true), Err(AuthError::Busy));
        let h = sign_request(&id, "GET", "/", b"", NOW + 1_500, [9; 16]);
        assert!(v.verify(&h, "GET", "/", b"", NOW + 1_500, |_| true).is_ok());
        assert_eq!(v.remembered(), 1);
    }
}
