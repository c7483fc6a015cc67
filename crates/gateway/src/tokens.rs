//! Capability tokens behind scoped access keys ([biscuit](https://www.biscuitsec.org) tokens).
//!
//! The tenant's **authority** is an Ed25519 key derived from the tenant's identity: every gateway
//! of the tenant derives the same one, so any of them verifies any token the tenant minted. A
//! token's first block names the tenant and holds the checks of its [`Scope`]; anyone holding a
//! token may **attenuate** it — append a block with more checks (a narrower bucket or prefix,
//! read-only, an earlier expiry) — and hand the result on, without the tenant's key. A block can
//! only add checks, so an attenuated token never does more than its parent.
//!
//! Vocabulary: a request states `time(now)`, `operation("read" | "write" | "admin")`, and, when
//! it has them, `bucket(name)` and `key(key or listing prefix)`. A [`Scope`] becomes
//! `check if time($t), $t <= expiry`, `check if bucket($b), $b == name`,
//! `check if key($k), $k.starts_with(prefix)` and `check if operation("read")`.
//!
//! **Revocation**: each block's revocation id, hashed ([`revocation_ids`]), can be listed on the
//! ledger by the tenant (`RevokeTokens`); a token any of whose ids is listed is refused, so
//! revoking a token revokes every token attenuated from it.

use archipel_crypto::Identity;
use archipel_ledger::Hash;
use archipel_types::NodeId;
use biscuit_auth::builder::Term;
use biscuit_auth::{AuthorizerBuilder, Biscuit, BlockBuilder, KeyPair, PrivateKey, PublicKey};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a key (or an attenuation) allows.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Scope {
    /// The one bucket; `None`: every bucket of the tenant.
    pub bucket: Option<String>,
    /// Keys (and listing prefixes) must start with this.
    pub prefix: String,
    /// Reads only (GET, HEAD, listings).
    pub read_only: bool,
    /// Unix seconds after which the token is refused.
    pub expires_s: Option<u64>,
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// GET, HEAD, listings.
    Read,
    /// PUT, DELETE, copies, multipart.
    Write,
    /// Creating or deleting buckets and changing their settings.
    Admin,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Admin => "admin",
        }
    }
}

/// One request as the authorizer sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// What it does.
    pub op: Op,
    /// Its bucket, if any.
    pub bucket: Option<&'a str>,
    /// Its key, or a listing's prefix, if any.
    pub key: Option<&'a str>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not a token, or not signed by this tenant's authority.
    #[error("not a valid archipel access token for this tenant: {0}")]
    Invalid(String),
    /// The token does not allow the request.
    #[error("the access token does not allow this: {0}")]
    Denied(String),
}

/// The tenant's token authority.
pub struct Authority {
    tenant: NodeId,
    root: KeyPair,
    secrets: [u8; 32],
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("tenant", &self.tenant).finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A scope's checks as one block's Datalog, with its parameters.
fn checks(scope: &Scope) -> (String, HashMap<String, Term>) {
    let mut code = String::new();
    let mut params = HashMap::new();
    if let Some(at) = scope.expires_s {
        code.push_str("check if time($t), $t <= {expires};\n");
        params.insert("expires".into(), Term::Date(at));
    }
    if let Some(b) = &scope.bucket {
        code.push_str("check if bucket($b), $b == {bucket};\n");
        params.insert("bucket".into(), Term::Str(b.clone()));
    }
    if !scope.prefix.is_empty() {
        // A bucket-level read (HeadBucket: does it exist, may I use it) names no key: a key
        // scoped to a prefix of the bucket may make it.
        code.push_str("check if key($k), $k.starts_with({prefix}) or bucket_head(true);\n");
        params.insert("prefix".into(), Term::Str(scope.prefix.clone()));
    }
    if scope.read_only {
        code.push_str("check if operation(\"read\");\n");
    }
    (code, params)
}

fn invalid(e: impl std::fmt::Display) -> TokenError {
    TokenError::Invalid(e.to_string())
}

impl Authority {
    /// The authority of the tenant `identity`.
    pub fn of(identity: &Identity) -> Authority {
        let seed = identity.derive_secret("archipel/s3/token-authority/v1");
        let private = PrivateKey::from_bytes(&seed, biscuit_auth::Algorithm::Ed25519)
            .expect("32 bytes are an Ed25519 private key");
        Authority {
            tenant: identity.node_id(),
            root: KeyPair::from(&private),
            secrets: identity.derive_secret("archipel/s3/token-secrets/v1"),
        }
    }

    /// The public key tokens are verified with.
    pub fn public(&self) -> PublicKey {
        self.root.public()
    }

    /// A new token for `scope`, naming the tenant.
    pub fn mint(&self, scope: &Scope) -> Result<Biscuit, TokenError> {
        let (code, mut params) = checks(scope);
        params.insert("tenant".into(), Term::Str(self.tenant.to_string()));
        Biscuit::builder()
            .code_with_params(format!("tenant({{tenant}});\n{code}"), params, HashMap::new())
            .and_then(|b| b.build(&self.root))
            .map_err(invalid)
    }

    /// Reads a token (base64), checking every block's signature back to this authority.
    pub fn parse(&self, token: &str) -> Result<Biscuit, TokenError> {
        Biscuit::from_base64(token.trim(), self.public()).map_err(invalid)
    }

    /// The S3 credentials of `token`: an access key id naming it and a secret only this tenant's
    /// gateways derive.
    pub fn credentials(&self, token: &Biscuit) -> Result<(String, String), TokenError> {
        let bytes = token.to_vec().map_err(invalid)?;
        let id = blake3::hash(&bytes);
        let secret = blake3::keyed_hash(&self.secrets, &bytes);
        Ok((format!("AKTK{}", hex::encode_upper(&id.as_bytes()[..8])), hex::encode(&secret.as_bytes()[..20])))
    }

    /// Whether `token` allows `req` now.
    pub fn authorize(&self, token: &Biscuit, req: &Request<'_>) -> Result<(), TokenError> {
        self.authorize_with(token, req, "")
    }

    /// [`Self::authorize`] for a bucket-level read that names no key (HeadBucket,
    /// GetBucketLocation): allowed to any key that may read something in `bucket`.
    pub fn authorize_bucket_head(&self, token: &Biscuit, bucket: &str) -> Result<(), TokenError> {
        self.authorize_with(token, &Request { op: Op::Read, bucket: Some(bucket), key: None }, "bucket_head(true);\n")
    }

    fn authorize_with(&self, token: &Biscuit, req: &Request<'_>, facts: &str) -> Result<(), TokenError> {
        let mut code = String::from("time({now});\noperation({op});\nallow if tenant({tenant});\n");
        code.push_str(facts);
        let mut params: HashMap<String, Term> = HashMap::new();
        params.insert("now".into(), Term::Date(unix_now()));
        params.insert("op".into(), Term::Str(req.op.name().into()));
        params.insert("tenant".into(), Term::Str(self.tenant.to_string()));
        if let Some(b) = req.bucket {
            code.push_str("bucket({bucket});\n");
            params.insert("bucket".into(), Term::Str(b.into()));
        }
        if let Some(k) = req.key {
            code.push_str("key({key});\n");
            params.insert("key".into(), Term::Str(k.into()));
        }
        let mut authorizer = AuthorizerBuilder::new()
            .code_with_params(code, params, HashMap::new())
            .and_then(|a| a.build(token))
            .map_err(invalid)?;
        authorizer.authorize().map(drop).map_err(|e| TokenError::Denied(describe(&e, req)))
    }
}

fn describe(e: &biscuit_auth::error::Token, req: &Request<'_>) -> String {
    let what = format!(
        "{} of {}{}",
        req.op.name(),
        req.bucket.unwrap_or("(no bucket)"),
        req.key.map(|k| format!("/{k}")).unwrap_or_default()
    );
    match e {
        biscuit_auth::error::Token::FailedLogic(logic) => format!("{what}: a check failed ({logic:?})"),
        other => format!("{what}: {other}"),
    }
}

/// The block narrowing a token to `scope`; refused when it narrows nothing.
fn attenuation(scope: &Scope) -> Result<BlockBuilder, TokenError> {
    let (code, params) = checks(scope);
    if code.is_empty() {
        return Err(TokenError::Invalid(
            "an attenuation adds at least one limit (bucket, prefix, read-only, expiry)".into(),
        ));
    }
    BlockBuilder::new().code_with_params(code, params, HashMap::new()).map_err(invalid)
}

/// `token` with a block narrowing it to `scope` (offline: no key needed).
pub fn attenuate(token: &Biscuit, scope: &Scope) -> Result<Biscuit, TokenError> {
    token.append(attenuation(scope)?).map_err(invalid)
}

/// `token` (base64) with a block narrowing it to `scope`, by someone who does not hold the
/// tenant's key (its signatures are checked by the gateway when the result is used).
pub fn attenuate_base64(token: &str, scope: &Scope) -> Result<String, TokenError> {
    let block = attenuation(scope)?;
    biscuit_auth::UnverifiedBiscuit::from_base64(token.trim())
        .and_then(|t| t.append(block))
        .and_then(|t| t.to_base64())
        .map_err(invalid)
}

/// The hashes of a token's revocation ids, one per block: listing any of them on the ledger
/// revokes the token; listing block `i`'s revokes every token attenuated from its first `i + 1`
/// blocks.
pub fn revocation_ids(token: &Biscuit) -> Vec<Hash> {
    token.revocation_identifiers().iter().map(|id| Hash(*blake3::hash(id).as_bytes())).collect()
}

/// `7d`, `12h`, `30m`, `45s` as a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a duration: use e.g. 7d, 12h, 30m or 45s"))?;
    let secs = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        "s" | "" => Some(n),
        _ => None,
    }
    .filter(|s| *s > 0)
    .ok_or_else(|| format!("{s:?} is not a duration: use e.g. 7d, 12h, 30m or 45s"))?;
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bucket: &'static str, key: &'static str) -> Request<'static> {
        Request { op: Op::Read, bucket: Some(bucket), key: Some(key) }
    }

    #[test]
    fn tokens_allow_their_scope_only_and_attenuation_only_narrows() {
        let a = Authority::of(&Identity::from_seed(1));
        let all = a.mint(&Scope::default()).unwrap();
        assert!(a.authorize(&all, &Request { op: Op::Admin, bucket: Some("b"), key: None }).is_ok());
        let scope = Scope { bucket: Some("b".into()), prefix: "team/".into(), read_only: true, expires_s: None };
        let t = a.mint(&scope).unwrap();
        assert!(a.authorize(&t, &read("b", "team/x")).is_ok());
        assert!(a.authorize(&t, &read("b", "other/x")).is_err());
        assert!(a.authorize(&t, &read("c", "team/x")).is_err());
        assert!(a.authorize(&t, &Request { op: Op::Write, bucket: Some("b"), key: Some("team/x") }).is_err());
        // HeadBucket of its bucket, not of another; a bucket-level call that is not one is refused.
        assert!(a.authorize_bucket_head(&t, "b").is_ok());
        assert!(a.authorize_bucket_head(&t, "other").is_err());
        assert!(a.authorize(&t, &Request { op: Op::Read, bucket: Some("b"), key: None }).is_err());
        assert!(
            a.authorize(&t, &Request { op: Op::Read, bucket: None, key: None }).is_err(),
            "no bucket: no listing of buckets"
        );
        // Attenuated by someone without the key: narrower, never wider.
        let b64 = t.to_base64().unwrap();
        let narrow =
            attenuate(&a.parse(&b64).unwrap(), &Scope { prefix: "team/a/".into(), ..Default::default() }).unwrap();
        assert!(a.authorize(&narrow, &read("b", "team/a/1")).is_ok());
        assert!(a.authorize(&narrow, &read("b", "team/b/1")).is_err());
        let wider = attenuate(&t, &Scope { bucket: Some("c".into()), ..Default::default() }).unwrap();
        assert!(a.authorize(&wider, &read("c", "team/x")).is_err(), "a block only adds checks");
        assert!(attenuate(&t, &Scope::default()).is_err(), "an empty attenuation is refused");
        // The same offline, from base64 alone.
        let offline = attenuate_base64(&b64, &Scope { prefix: "team/a/".into(), ..Default::default() }).unwrap();
        let offline = a.parse(&offline).unwrap();
        assert!(a.authorize(&offline, &read("b", "team/a/1")).is_ok());
        assert!(a.authorize(&offline, &read("b", "team/b/1")).is_err());
        assert!(attenuate_base64("garbage", &Scope { read_only: true, ..Default::default() }).is_err());
        // Ids: one per block, the parent's are the child's first.
        let (p, c) = (revocation_ids(&t), revocation_ids(&narrow));
        assert_eq!((p.len(), c.len()), (1, 2));
        assert_eq!(p[0], c[0]);
        // Expiry.
        let old = a.mint(&Scope { expires_s: Some(unix_now() - 10), ..Default::default() }).unwrap();
        assert!(a.authorize(&old, &read("b", "k")).is_err());
        let later = a.mint(&Scope { expires_s: Some(unix_now() + 3600), ..Default::default() }).unwrap();
        assert!(a.authorize(&later, &read("b", "k")).is_ok());
        // Another tenant's authority: not parsed; its tokens give this tenant nothing.
        let other = Authority::of(&Identity::from_seed(2));
        assert!(other.parse(&b64).is_err());
        assert!(a.parse("garbage").is_err());
        let foreign = other.mint(&Scope::default()).unwrap();
        assert!(a.parse(&foreign.to_base64().unwrap()).is_err());
        // Credentials: stable per token, different per token and per tenant.
        let (k1, s1) = a.credentials(&t).unwrap();
        assert_eq!(a.credentials(&a.parse(&b64).unwrap()).unwrap(), (k1.clone(), s1.clone()));
        assert_ne!(a.credentials(&narrow).unwrap().0, k1);
        assert_ne!(Authority::of(&Identity::from_seed(2)).credentials(&t).unwrap().1, s1);
        assert_eq!(k1.len(), 20);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_duration("12h").unwrap(), Duration::from_secs(12 * 3_600));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        for bad in ["", "d", "0d", "7w", "-1h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
