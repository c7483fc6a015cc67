//! Access keys and what each may do.
//!
//! Every request is signed (SigV4) with an access key's secret; [`Auth`] gives `s3s` the secret
//! of a known, unexpired key, and `s3s` checks the signature. [`Access`] then checks the
//! operation against the key's [`Scope`]: a bucket, a key prefix, read-only or read-write, and an
//! expiry. Anything outside it is `AccessDenied`.
//!
//! The **root key** is derived from the tenant's identity ([`root_key`]): the same tenant key
//! always gives the same S3 credentials, which the devnet prints.

use archipel_crypto::Identity;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::*;
use s3s::path::S3Path;
use s3s::{S3Request, S3Result, s3_error};
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// What a key may touch.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Scope {
    /// The one bucket it may use; `None`: every bucket of the tenant.
    pub bucket: Option<String>,
    /// Keys it may use start with this.
    pub prefix: String,
    /// Reads only (GET, HEAD, listings).
    pub read_only: bool,
    /// Unix ms after which the key is refused; `None`: never.
    pub expires_ms: Option<u64>,
}

impl Scope {
    /// Whether the key may touch `bucket` (at all).
    pub fn allows_bucket(&self, bucket: &str) -> bool {
        self.bucket.as_deref().is_none_or(|b| b == bucket)
    }

    /// Whether the key may touch `key` in `bucket`.
    pub fn allows_object(&self, bucket: &str, key: &str) -> bool {
        self.allows_bucket(bucket) && key.starts_with(&self.prefix)
    }

    /// Whether a listing of `prefix` stays inside the scope.
    pub fn allows_listing(&self, bucket: &str, prefix: &str) -> bool {
        self.allows_bucket(bucket) && prefix.starts_with(&self.prefix)
    }

    /// Whether the key is unscoped: every bucket, every key, read and write.
    pub fn is_root(&self) -> bool {
        self.bucket.is_none() && self.prefix.is_empty() && !self.read_only
    }
}

/// One access key.
#[derive(Clone)]
pub struct Key {
    /// The access key id clients send.
    pub access_key: String,
    /// The secret they sign with.
    pub secret: String,
    /// What it may do.
    pub scope: Scope,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("access_key", &self.access_key).field("scope", &self.scope).finish_non_exhaustive()
    }
}

/// The tenant's root key: an access key id naming the tenant and a secret derived from its
/// private key.
pub fn root_key(identity: &Identity) -> Key {
    let id = blake3::hash(identity.node_id().to_string().as_bytes());
    let secret = identity.derive_secret("archipel/s3/root-secret/v1");
    Key {
        access_key: format!("AKAR{}", hex::encode_upper(&id.as_bytes()[..8])),
        secret: hex::encode(&secret[..20]),
        scope: Scope::default(),
    }
}

/// The keys a gateway accepts.
#[derive(Debug, Default)]
pub struct Keys {
    keys: RwLock<HashMap<String, Key>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Keys {
    /// Keys holding only `root`.
    pub fn with_root(root: Key) -> Self {
        let keys = Keys::default();
        keys.insert(root);
        keys
    }

    /// Accepts `key` from now on (replacing one with the same id).
    pub fn insert(&self, key: Key) {
        self.keys.write().unwrap_or_else(|e| e.into_inner()).insert(key.access_key.clone(), key);
    }

    /// Refuses `access_key` from now on.
    pub fn remove(&self, access_key: &str) -> bool {
        self.keys.write().unwrap_or_else(|e| e.into_inner()).remove(access_key).is_some()
    }

    /// The key `access_key`, if known and not expired.
    fn live(&self, access_key: &str) -> S3Result<Key> {
        let key =
            self.keys.read().unwrap_or_else(|e| e.into_inner()).get(access_key).cloned().ok_or_else(|| {
                s3_error!(InvalidAccessKeyId, "the access key {access_key} is not known to this gateway")
            })?;
        if key.scope.expires_ms.is_some_and(|at| now_ms() >= at) {
            return Err(s3_error!(AccessDenied, "the access key {access_key} has expired: create a new one"));
        }
        Ok(key)
    }

    /// The scope of the key that signed a request (none signed: refused).
    pub fn scope_of(&self, credentials: Option<&s3s::auth::Credentials>) -> S3Result<Scope> {
        let c = credentials.ok_or_else(|| s3_error!(AccessDenied, "the request is not signed"))?;
        Ok(self.live(&c.access_key)?.scope)
    }
}

/// `s3s`'s view of [`Keys`]: the secret to check a signature with.
#[derive(Debug)]
pub struct Auth(pub std::sync::Arc<Keys>);

#[async_trait::async_trait]
impl S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        Ok(SecretKey::from(self.0.live(access_key)?.secret))
    }
}

/// Operations that only read.
fn reads_only(op: &str) -> bool {
    op.starts_with("Get") || op.starts_with("Head") || op.starts_with("List") || matches!(op, "SelectObjectContent")
}

/// `s3s`'s access check: every operation against the signing key's scope.
#[derive(Debug)]
pub struct Access(pub std::sync::Arc<Keys>);

#[async_trait::async_trait]
impl S3Access for Access {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let scope = self.0.scope_of(cx.credentials())?;
        let op = cx.s3_op().name();
        if scope.read_only && !reads_only(op) {
            return Err(s3_error!(AccessDenied, "this access key is read-only: {op} is refused"));
        }
        match cx.s3_path() {
            S3Path::Root => Ok(()),
            S3Path::Bucket { bucket } => {
                if !scope.allows_bucket(bucket) {
                    return Err(s3_error!(AccessDenied, "this access key does not cover bucket {bucket}"));
                }
                // Creating or deleting a bucket, or changing its settings, is for unscoped keys.
                let bucket_admin = matches!(op, "CreateBucket" | "DeleteBucket") || op.starts_with("PutBucket");
                if bucket_admin && !scope.is_root() {
                    return Err(s3_error!(AccessDenied, "{op} needs an unscoped access key"));
                }
                Ok(())
            }
            S3Path::Object { bucket, key } => {
                if scope.allows_object(bucket, key) {
                    Ok(())
                } else {
                    Err(s3_error!(AccessDenied, "this access key does not cover {bucket}/{key}"))
                }
            }
        }
    }

    async fn list_objects_v2(&self, req: &mut S3Request<ListObjectsV2Input>) -> S3Result<()> {
        let scope = self.0.scope_of(req.credentials.as_ref())?;
        listing_in_scope(&scope, &req.input.bucket, req.input.prefix.as_deref().unwrap_or(""))
    }

    async fn list_objects(&self, req: &mut S3Request<ListObjectsInput>) -> S3Result<()> {
        let scope = self.0.scope_of(req.credentials.as_ref())?;
        listing_in_scope(&scope, &req.input.bucket, req.input.prefix.as_deref().unwrap_or(""))
    }

    async fn copy_object(&self, req: &mut S3Request<CopyObjectInput>) -> S3Result<()> {
        let scope = self.0.scope_of(req.credentials.as_ref())?;
        match &req.input.copy_source {
            CopySource::Bucket { bucket, key, .. } if scope.allows_object(bucket, key) => Ok(()),
            CopySource::Bucket { bucket, key, .. } => {
                Err(s3_error!(AccessDenied, "this access key does not cover the copy source {bucket}/{key}"))
            }
            _ => Err(s3_error!(NotImplemented, "only bucket/key copy sources are supported")),
        }
    }

    async fn delete_objects(&self, req: &mut S3Request<DeleteObjectsInput>) -> S3Result<()> {
        let scope = self.0.scope_of(req.credentials.as_ref())?;
        let bucket = &req.input.bucket;
        match req.input.delete.objects.iter().find(|o| !scope.allows_object(bucket, &o.key)) {
            Some(o) => Err(s3_error!(AccessDenied, "this access key does not cover {bucket}/{}", o.key)),
            None => Ok(()),
        }
    }
}

fn listing_in_scope(scope: &Scope, bucket: &str, prefix: &str) -> S3Result<()> {
    if scope.allows_listing(bucket, prefix) {
        Ok(())
    } else {
        Err(s3_error!(
            AccessDenied,
            "this access key lists only {}/{}*: pass that prefix",
            scope.bucket.as_deref().unwrap_or(bucket),
            scope.prefix
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_cover_their_bucket_and_prefix_only() {
        let s = Scope { bucket: Some("b".into()), prefix: "team/".into(), read_only: true, expires_ms: None };
        assert!(s.allows_object("b", "team/x"));
        assert!(!s.allows_object("b", "other/x"));
        assert!(!s.allows_object("c", "team/x"));
        assert!(s.allows_listing("b", "team/sub/"));
        assert!(!s.allows_listing("b", ""));
        assert!(!s.is_root());
        assert!(Scope::default().is_root());
        assert!(reads_only("GetObject") && reads_only("ListObjectsV2") && reads_only("HeadObject"));
        assert!(!reads_only("PutObject") && !reads_only("DeleteObjects") && !reads_only("CopyObject"));
    }

    #[test]
    fn the_root_key_is_the_tenants_and_stable() {
        let a = root_key(&Identity::from_seed(1));
        assert_eq!(a.access_key, root_key(&Identity::from_seed(1)).access_key);
        assert_eq!(a.secret, root_key(&Identity::from_seed(1)).secret);
        assert_ne!(a.secret, root_key(&Identity::from_seed(2)).secret);
        assert_eq!(a.access_key.len(), 20);
        let keys = Keys::with_root(a.clone());
        assert!(keys.live(&a.access_key).is_ok());
        assert!(keys.live("AKNOPE").is_err());
        let expired = Key {
            access_key: "AKOLD".into(),
            secret: "s".into(),
            scope: Scope { expires_ms: Some(1), ..Default::default() },
        };
        keys.insert(expired);
        assert!(keys.live("AKOLD").is_err());
    }
}
