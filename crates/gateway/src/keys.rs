//! Access keys and what each may do.
//!
//! Every request is signed (SigV4) with an access key's secret; [`Auth`] gives `s3s` the secret
//! of a known key, and `s3s` checks the signature. [`Access`] then checks the operation, its
//! bucket and its key (or listing prefix) against the key's grant:
//!
//! - the **root key**, derived from the tenant's identity ([`root_key`]): everything;
//! - a **token key**: the credentials of a capability token ([`crate::tokens`]) — a bucket, a
//!   prefix, read-only, an expiry, narrowed by any attenuation — refused once any of its ids is in
//!   the tenant's revocation list on the ledger.
//!
//! Anything outside a grant is `AccessDenied`. **Revocations** are read from the ledger by
//! [`Keys::refresh_revocations`] (the gateway calls it every [`REVOCATION_POLL`]); when the list
//! could not be read for [`REVOCATION_MAX_AGE`], token keys are refused with `ServiceUnavailable`
//! rather than checked against a stale list.

use crate::tokens::{Authority, Op, Request};
use archipel_crypto::Identity;
use archipel_ledger::Hash;
use biscuit_auth::Biscuit;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::*;
use s3s::path::S3Path;
use s3s::{S3Request, S3Result, s3_error};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How often the gateway reads the tenant's revocations.
pub const REVOCATION_POLL: Duration = Duration::from_secs(1);
/// Token keys are refused when the revocations are older than this.
pub const REVOCATION_MAX_AGE: Duration = Duration::from_secs(10);

/// What a key may do.
#[derive(Clone, Debug)]
pub enum Grant {
    /// Everything the tenant may.
    Root,
    /// What the token allows, until one of its ids is revoked.
    Token {
        /// The token, its signatures checked when it was registered.
        token: Arc<Biscuit>,
        /// Its revocation ids (hashed), one per block.
        ids: Vec<Hash>,
    },
}

/// One access key.
#[derive(Clone)]
pub struct Key {
    /// The access key id clients send.
    pub access_key: String,
    /// The secret they sign with.
    pub secret: String,
    /// What it may do.
    pub grant: Grant,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.grant {
            Grant::Root => "root",
            Grant::Token { .. } => "token",
        };
        f.debug_struct("Key").field("access_key", &self.access_key).field("grant", &kind).finish_non_exhaustive()
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
        grant: Grant::Root,
    }
}

/// The tenant's revocation list as last read.
#[derive(Debug)]
struct Revoked {
    ids: BTreeSet<Hash>,
    read_at: Option<Instant>,
}

/// The keys a gateway accepts.
#[derive(Debug)]
pub struct Keys {
    authority: Authority,
    keys: RwLock<HashMap<String, Key>>,
    revoked: RwLock<Revoked>,
    /// Where registered tokens are kept (one file per key), if anywhere.
    dir: Option<std::path::PathBuf>,
}

impl Keys {
    /// The keys of the tenant `identity`: its root key, and the token keys registered in `dir`
    /// (created if missing; `None`: kept in memory only).
    pub fn open(identity: &Identity, dir: Option<&std::path::Path>) -> std::io::Result<Keys> {
        let keys = Keys {
            authority: Authority::of(identity),
            keys: RwLock::new(HashMap::new()),
            revoked: RwLock::new(Revoked { ids: BTreeSet::new(), read_at: None }),
            dir: dir.map(std::path::Path::to_path_buf),
        };
        keys.insert(root_key(identity));
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)?;
            restrict(dir, 0o700)?;
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "token")
                    && let Ok(text) = std::fs::read_to_string(&path)
                {
                    match keys.token_key(&text) {
                        Ok(key) => keys.insert(key),
                        Err(e) => tracing::warn!("ignoring {}: {e}", path.display()),
                    }
                }
            }
        }
        Ok(keys)
    }

    /// The tenant's token authority.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    fn insert(&self, key: Key) {
        self.keys.write().unwrap_or_else(|e| e.into_inner()).insert(key.access_key.clone(), key);
    }

    fn token_key(&self, token_b64: &str) -> Result<Key, String> {
        let token = self.authority.parse(token_b64).map_err(|e| e.to_string())?;
        let (access_key, secret) = self.authority.credentials(&token).map_err(|e| e.to_string())?;
        let ids = crate::tokens::revocation_ids(&token);
        Ok(Key { access_key, secret, grant: Grant::Token { token: Arc::new(token), ids } })
    }

    /// Registers a token (base64): checks it is the tenant's and not revoked, keeps it, and
    /// returns its key (the S3 credentials).
    pub fn register(&self, token_b64: &str) -> Result<Key, String> {
        let key = self.token_key(token_b64)?;
        self.check_not_revoked(&key).map_err(|e| e.message().unwrap_or("refused").to_string())?;
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{}.token", key.access_key));
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, token_b64.trim())
                .and_then(|()| restrict(&tmp, 0o600))
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("cannot keep the token in {}: {e}", dir.display()))?;
        }
        self.insert(key.clone());
        Ok(key)
    }

    /// Replaces the revocation list with the ledger's.
    pub fn set_revocations(&self, ids: impl IntoIterator<Item = Hash>) {
        let mut r = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        r.ids = ids.into_iter().collect();
        r.read_at = Some(Instant::now());
    }

    /// Reads the tenant's revocations from the ledger once.
    pub async fn refresh_revocations(&self, tenant: &archipel_objects::tenant::TenantClient) -> Result<(), String> {
        let view: serde_json::Value =
            tenant.get_fresh(&format!("/v1/accounts/{}/revocations", tenant.me())).await.map_err(|e| e.to_string())?;
        let ids: Vec<Hash> = serde_json::from_value(view["revoked"].clone()).map_err(|e| e.to_string())?;
        self.set_revocations(ids);
        Ok(())
    }

    fn check_not_revoked(&self, key: &Key) -> S3Result<()> {
        let Grant::Token { ids, .. } = &key.grant else { return Ok(()) };
        let r = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        match r.read_at {
            Some(at) if at.elapsed() <= REVOCATION_MAX_AGE => {}
            _ => {
                return Err(s3_error!(
                    ServiceUnavailable,
                    "the gateway cannot read the tenant's revocations from the ledger: token keys are refused until it can"
                ));
            }
        }
        if ids.iter().any(|id| r.ids.contains(id)) {
            return Err(s3_error!(AccessDenied, "the access key {} was revoked on the ledger", key.access_key));
        }
        Ok(())
    }

    /// The key `access_key`, if known.
    fn known(&self, access_key: &str) -> S3Result<Key> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(access_key)
            .cloned()
            .ok_or_else(|| s3_error!(InvalidAccessKeyId, "the access key {access_key} is not known to this gateway"))
    }

    /// Whether the key that signed a request may do `req` (none signed: refused).
    pub fn allow(&self, credentials: Option<&s3s::auth::Credentials>, req: Request<'_>) -> S3Result<()> {
        self.allow_by(credentials, |authority, token| authority.authorize(token, &req))
    }

    /// Whether the signer may make a bucket-level read of `bucket` (HeadBucket): any key that may
    /// read something in it.
    pub fn allow_bucket_head(&self, credentials: Option<&s3s::auth::Credentials>, bucket: &str) -> S3Result<()> {
        self.allow_by(credentials, |authority, token| authority.authorize_bucket_head(token, bucket))
    }

    /// The signer's grant decides: the root key may do anything, a token key what `check` says.
    fn allow_by(
        &self,
        credentials: Option<&s3s::auth::Credentials>,
        check: impl FnOnce(&crate::tokens::Authority, &biscuit_auth::Biscuit) -> Result<(), crate::tokens::TokenError>,
    ) -> S3Result<()> {
        let c = credentials.ok_or_else(|| s3_error!(AccessDenied, "the request is not signed"))?;
        let key = self.known(&c.access_key)?;
        match &key.grant {
            Grant::Root => Ok(()),
            Grant::Token { token, .. } => {
                self.check_not_revoked(&key)?;
                check(&self.authority, token).map_err(|e| s3_error!(AccessDenied, "{e}"))
            }
        }
    }
}

#[cfg(unix)]
fn restrict(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// `s3s`'s view of [`Keys`]: the secret to check a signature with.
#[derive(Debug)]
pub struct Auth(pub Arc<Keys>);

#[async_trait::async_trait]
impl S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        Ok(SecretKey::from(self.0.known(access_key)?.secret))
    }
}

/// What an operation does, by its name.
fn op_of(name: &str) -> Op {
    if name.starts_with("Get") || name.starts_with("Head") || name.starts_with("List") || name == "SelectObjectContent"
    {
        Op::Read
    } else if matches!(name, "CreateBucket" | "DeleteBucket")
        || name.starts_with("PutBucket")
        || name.starts_with("DeleteBucket")
    {
        Op::Admin
    } else {
        Op::Write
    }
}

/// `s3s`'s access check: every operation against the signing key's grant.
#[derive(Debug)]
pub struct Access(pub Arc<Keys>);

impl Access {
    fn object(&self, c: Option<&s3s::auth::Credentials>, op: Op, bucket: &str, key: &str) -> S3Result<()> {
        self.0.allow(c, Request { op, bucket: Some(bucket), key: Some(key) })
    }
}

#[async_trait::async_trait]
impl S3Access for Access {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let op = op_of(cx.s3_op().name());
        let req = match cx.s3_path() {
            S3Path::Root => Request { op, bucket: None, key: None },
            // Listings state their prefix in their own checks below; here, an empty one.
            S3Path::Bucket { bucket } => Request { op, bucket: Some(bucket), key: None },
            S3Path::Object { bucket, key } => Request { op, bucket: Some(bucket), key: Some(key) },
        };
        if cx.s3_op().name() == "PostObject" {
            return Err(s3_error!(NotImplemented, "browser POST uploads are not supported: use PUT"));
        }
        // A bucket-level call of a prefix-scoped key is decided by the typed check that knows its
        // keys (listings, DeleteObjects); everything else is decided here.
        if let S3Path::Bucket { bucket } = cx.s3_path()
            && matches!(cx.s3_op().name(), "HeadBucket" | "GetBucketLocation")
        {
            return self.0.allow_bucket_head(cx.credentials(), bucket);
        }
        if matches!(cx.s3_path(), S3Path::Bucket { .. })
            && matches!(cx.s3_op().name(), "ListObjects" | "ListObjectsV2" | "ListMultipartUploads" | "DeleteObjects")
        {
            let c = cx.credentials().ok_or_else(|| s3_error!(AccessDenied, "the request is not signed"))?;
            self.0.known(&c.access_key)?;
            return Ok(());
        }
        self.0.allow(cx.credentials(), req)
    }

    async fn list_objects_v2(&self, req: &mut S3Request<ListObjectsV2Input>) -> S3Result<()> {
        let prefix = req.input.prefix.as_deref().unwrap_or("");
        self.object(req.credentials.as_ref(), Op::Read, &req.input.bucket, prefix)
    }

    async fn list_objects(&self, req: &mut S3Request<ListObjectsInput>) -> S3Result<()> {
        let prefix = req.input.prefix.as_deref().unwrap_or("");
        self.object(req.credentials.as_ref(), Op::Read, &req.input.bucket, prefix)
    }

    async fn list_multipart_uploads(&self, req: &mut S3Request<ListMultipartUploadsInput>) -> S3Result<()> {
        let prefix = req.input.prefix.as_deref().unwrap_or("");
        self.object(req.credentials.as_ref(), Op::Read, &req.input.bucket, prefix)
    }

    async fn put_object(&self, req: &mut S3Request<PutObjectInput>) -> S3Result<()> {
        self.object(req.credentials.as_ref(), Op::Write, &req.input.bucket, &req.input.key)
    }

    async fn copy_object(&self, req: &mut S3Request<CopyObjectInput>) -> S3Result<()> {
        match &req.input.copy_source {
            CopySource::Bucket { bucket, key, .. } => self.object(req.credentials.as_ref(), Op::Read, bucket, key),
            _ => Err(s3_error!(NotImplemented, "only bucket/key copy sources are supported")),
        }
    }

    async fn delete_objects(&self, req: &mut S3Request<DeleteObjectsInput>) -> S3Result<()> {
        let bucket = &req.input.bucket;
        for o in &req.input.delete.objects {
            self.object(req.credentials.as_ref(), Op::Write, bucket, &o.key)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::Scope;

    fn creds(k: &Key) -> s3s::auth::Credentials {
        s3s::auth::Credentials { access_key: k.access_key.clone(), secret_key: SecretKey::from(k.secret.clone()) }
    }

    fn read<'a>(bucket: &'a str, key: &'a str) -> Request<'a> {
        Request { op: Op::Read, bucket: Some(bucket), key: Some(key) }
    }

    #[test]
    fn keys_are_checked_against_grants_revocations_and_their_freshness() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = Identity::from_seed(1);
        let keys = Keys::open(&tenant, Some(dir.path())).unwrap();
        let root = root_key(&tenant);
        assert!(keys.allow(Some(&creds(&root)), Request { op: Op::Admin, bucket: None, key: None }).is_ok());
        assert!(keys.allow(None, read("b", "k")).is_err(), "unsigned");
        let code = |r: S3Result<()>| r.unwrap_err().code().as_str().to_string();
        let stranger = Key { access_key: "AKNOPE".into(), secret: "x".into(), grant: Grant::Root };
        assert_eq!(code(keys.allow(Some(&creds(&stranger)), read("b", "k"))), "InvalidAccessKeyId");
        // A token key: refused until the revocations have been read once.
        let scope = Scope { bucket: Some("b".into()), prefix: "team/".into(), read_only: true, expires_s: None };
        let token = keys.authority().mint(&scope).unwrap().to_base64().unwrap();
        assert!(keys.register(&token).unwrap_err().contains("revocations"));
        keys.set_revocations([]);
        let k = keys.register(&token).unwrap();
        assert!(keys.allow(Some(&creds(&k)), read("b", "team/x")).is_ok());
        assert_eq!(code(keys.allow(Some(&creds(&k)), read("b", "x"))), "AccessDenied");
        assert_eq!(code(keys.allow(Some(&creds(&k)), read("c", "team/x"))), "AccessDenied");
        let write = Request { op: Op::Write, bucket: Some("b"), key: Some("team/x") };
        assert_eq!(code(keys.allow(Some(&creds(&k)), write)), "AccessDenied");
        // Kept on disk: a restarted gateway knows it.
        let again = Keys::open(&tenant, Some(dir.path())).unwrap();
        again.set_revocations([]);
        assert!(again.allow(Some(&creds(&k)), read("b", "team/x")).is_ok());
        // Revoked on the ledger: refused; an attenuated child with it.
        let child = crate::tokens::attenuate(
            &keys.authority().parse(&token).unwrap(),
            &Scope { prefix: "team/a/".into(), ..Default::default() },
        )
        .unwrap();
        let child = keys.register(&child.to_base64().unwrap()).unwrap();
        assert!(keys.allow(Some(&creds(&child)), read("b", "team/a/1")).is_ok());
        let Grant::Token { ids, .. } = &k.grant else { panic!() };
        keys.set_revocations([ids[0]]);
        assert_eq!(code(keys.allow(Some(&creds(&k)), read("b", "team/x"))), "AccessDenied");
        assert_eq!(code(keys.allow(Some(&creds(&child)), read("b", "team/a/1"))), "AccessDenied");
        assert!(keys.register(&token).unwrap_err().contains("revoked"));
        assert!(keys.allow(Some(&creds(&root)), read("b", "x")).is_ok(), "the root key is not a token");
        // Another tenant's token is not registered.
        let foreign = Authority::of(&Identity::from_seed(2)).mint(&Scope::default()).unwrap();
        assert!(keys.register(&foreign.to_base64().unwrap()).is_err());
        // Revocations that could not be read for too long: token keys refused, not trusted stale.
        keys.revoked.write().unwrap().read_at = Some(Instant::now() - REVOCATION_MAX_AGE - Duration::from_secs(1));
        keys.revoked.write().unwrap().ids.clear();
        assert_eq!(code(keys.allow(Some(&creds(&child)), read("b", "team/a/1"))), "ServiceUnavailable");
    }

    #[test]
    fn operations_are_classified() {
        assert_eq!(op_of("GetObject"), Op::Read);
        assert_eq!(op_of("ListObjectsV2"), Op::Read);
        assert_eq!(op_of("HeadObject"), Op::Read);
        assert_eq!(op_of("PutObject"), Op::Write);
        assert_eq!(op_of("DeleteObjects"), Op::Write);
        assert_eq!(op_of("CopyObject"), Op::Write);
        assert_eq!(op_of("CompleteMultipartUpload"), Op::Write);
        assert_eq!(op_of("CreateBucket"), Op::Admin);
        assert_eq!(op_of("DeleteBucket"), Op::Admin);
        assert_eq!(op_of("PutBucketVersioning"), Op::Admin);
    }

    #[test]
    fn the_root_key_is_the_tenants_and_stable() {
        let a = root_key(&Identity::from_seed(1));
        assert_eq!(a.access_key, root_key(&Identity::from_seed(1)).access_key);
        assert_eq!(a.secret, root_key(&Identity::from_seed(1)).secret);
        assert_ne!(a.secret, root_key(&Identity::from_seed(2)).secret);
        assert_eq!(a.access_key.len(), 20);
    }
}
