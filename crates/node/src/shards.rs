//! The storage node's data plane: signed HTTP calls that store, seal and serve shards.
//!
//! - `PUT /v1/objects/{version}/shards/{index}/{segment}` with the shard's BLAKE3 hash in
//!   [`HASH_HEADER`]: stored if the body has that hash, refused otherwise (422 `hash_mismatch`)
//!   and when the node is full (507 `storage_full`).
//! - `PUT /v1/objects/{version}/manifest`: the object's manifest, decoded and checked for its
//!   version before it is stored.
//! - `POST /v1/objects/{version}/seal/{index}?generation=` (the body: the manifest, to store it
//!   first in the same call, or empty): checks that this node holds
//!   shard `index` of every segment the manifest lists, with the manifest's hashes, fsyncs them,
//!   and answers the node's signed receipt ([`archipel_ledger::storage::ReceiptTerms`], valid
//!   for five minutes) — the one thing a `PutObject` or `MoveShards` needs from it.
//! - `GET …/manifest`, `GET …/shards/{index}/{segment}`: hash-checked reads (a shard that rotted
//!   on disk answers 500 `shard_corrupt`, never its bytes).
//! - `GET …/audit/{index}/{segment}?offset=&len=`: the hash of a byte range of a shard, for audits.
//!
//! Every write carries a claim ([`CLAIM_HEADER`]) naming the object (hash of bucket and key):
//! - an uploader's, with the nonce its version was made from (`version_id(caller, object,
//!   nonce)`): only the key that made a version writes or seals it before it is committed, and a
//!   receipt names the one object the version was made for — nobody can squat another tenant's
//!   upload, seal it for their own object or break it with other bytes;
//! - a repair's, for the version this node's finalized state lists for the object: the manifest
//!   must have the ledger's root and each shard the hash that manifest lists, and they replace
//!   whatever else is stored under their names, so junk planted at a future repair target cannot
//!   block a repair.
//!
//! An owner's writes count against its key's bound on uploads this node's finalized state does
//! not list as committed ([`crate::uploads::UploadQuota`]: a quarter of the node's capacity per
//! key); a write past it is refused with 429 `upload_quota` and the numbers.
//!
//! Every call is signed (the same keys as the other signed calls). Bodies are read whole (a
//! shard is at most [`MAX_SHARD_BODY`]); a call reserves its declared length out of
//! [`DATA_BODY_BUDGET`] before its body is read, at most [`MAX_DATA_CALLS`] run at once, so a
//! node's memory for uploads stays bounded whatever the number of clients. One source address
//! may hold at most a quarter of either ([`MAX_DATA_CALLS_PER_SOURCE`],
//! [`DATA_BODY_BUDGET_PER_SOURCE`]): the reservation comes before the body, so before the
//! signature over it is checked, and the key a call names is only a claim then — a share per
//! key would let anyone exhaust a victim's share by naming its key, while the source address is
//! what the TCP connection really comes from. Disk work runs on blocking threads, never on the
//! API's async workers.

use crate::api::{ApiState, Caller, VerifiedBody, error};
use crate::uploads::UploadQuota;
use archipel_crypto::Identity;
use archipel_ledger::Hash;
use archipel_ledger::batch::{BatchItem, sign_batch_receipt};
use archipel_ledger::storage::{Manifest, RECEIPT_TTL_MS, ReceiptTerms, version_id};
use archipel_objects::transfer::{CLAIM_HEADER, Claim};
use archipel_store::{Hashed, ShardKey, ShardStore, ShardStoreError, Version, Written};
use archipel_types::NodeId;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Header carrying a shard's BLAKE3 hash (hex) on upload.
pub const HASH_HEADER: &str = "x-archipel-shard-hash";
/// Largest data-plane body: a shard of a 64 MiB segment at k = 1, or a manifest of an object of
/// about 3 TiB in 8 MiB segments at 4+2 (a larger object needs larger segments).
pub const MAX_SHARD_BODY: usize = 80 << 20;
/// Bytes of data-plane request bodies a node holds in memory at once: 16 of the largest
/// ([`MAX_SHARD_BODY`]). Each call reserves its declared length (`Content-Length`; the largest
/// body when it declares none) before its body is read and may not send more.
pub const DATA_BODY_BUDGET: usize = 16 * MAX_SHARD_BODY;
/// Data-plane calls handled at once, whatever their size: small shards, manifests, seals and
/// reads hold little memory, so many run together — with one slot per largest body they queued
/// behind each other (retried after a pause) while the node's CPU sat idle.
pub const MAX_DATA_CALLS: usize = 256;
/// The unit [`DATA_BODY_BUDGET`] is counted in.
const BUDGET_UNIT: usize = 64 << 10;
/// Data-plane calls one source address may have running at once: a quarter of
/// [`MAX_DATA_CALLS`], so one host (a slow or hostile client) leaves the rest to the others. An
/// honest client has a few calls per holder at once (an S3 gateway serving dozens of small PUTs
/// together, a few dozen).
pub const MAX_DATA_CALLS_PER_SOURCE: usize = MAX_DATA_CALLS / 4;
/// Bytes of bodies one source address may hold at once: a quarter of [`DATA_BODY_BUDGET`] (four of
/// the largest bodies, 160 shards of an 8 MiB segment at 4+2).
pub const DATA_BODY_BUDGET_PER_SOURCE: usize = DATA_BODY_BUDGET / 4;

/// What each source address holds of the data plane's calls and body budget (in
/// [`BUDGET_UNIT`]s); an address holding nothing has no entry.
type SourceShares = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (usize, usize)>>>;

/// Why a data-plane call got no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotRefused {
    /// The node runs [`MAX_DATA_CALLS`] or holds its [`DATA_BODY_BUDGET`].
    Busy,
    /// This source address holds its share ([`MAX_DATA_CALLS_PER_SOURCE`],
    /// [`DATA_BODY_BUDGET_PER_SOURCE`]).
    SourceBusy,
}

/// A storage node's shard store with the key that signs its receipts.
#[derive(Debug)]
pub struct ShardService {
    store: ShardStore,
    identity: Identity,
    network: Hash,
    calls: Arc<Semaphore>,
    body_budget: Arc<Semaphore>,
    sources: SourceShares,
    /// Each key's bound on uploads not committed yet.
    pub(crate) quota: UploadQuota,
}

/// A data-plane call's place: one of [`MAX_DATA_CALLS`] and its body's share of
/// [`DATA_BODY_BUDGET`]; both are given back when it is dropped.
#[derive(Debug)]
pub struct DataSlot {
    _call: tokio::sync::OwnedSemaphorePermit,
    _body: tokio::sync::OwnedSemaphorePermit,
    _share: SourceShare,
}

/// One call's part of its source address's share, given back when dropped.
#[derive(Debug)]
struct SourceShare {
    sources: SourceShares,
    source: std::net::IpAddr,
    units: usize,
}

impl Drop for SourceShare {
    fn drop(&mut self) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((calls, units)) = sources.get_mut(&self.source) {
            *calls = calls.saturating_sub(1);
            *units = units.saturating_sub(self.units);
            if *calls == 0 {
                sources.remove(&self.source);
            }
        }
    }
}

/// A holder's receipt, as `POST …/seal/{index}` answers it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SealReceipt {
    /// The holder.
    pub node: archipel_types::NodeId,
    /// The shard index.
    pub index: u8,
    /// Bytes of all its shards of the object.
    pub shard_bytes: u64,
    /// The manifest root it checked them against.
    pub manifest_root: Hash,
    /// Its signature (hex), over the `ReceiptTerms`.
    pub receipt: String,
    /// When the receipt expires (Unix ms).
    pub expires_ms: u64,
}

impl ShardService {
    /// The service over `store`, signing receipts with `identity` for `network`.
    pub fn new(store: ShardStore, identity: Identity, network: Hash) -> Self {
        ShardService {
            quota: UploadQuota::new(store.capacity()),
            store,
            identity,
            network,
            calls: Arc::new(Semaphore::new(MAX_DATA_CALLS)),
            body_budget: Arc::new(Semaphore::new(DATA_BODY_BUDGET / BUDGET_UNIT)),
            sources: SourceShares::default(),
        }
    }

    /// The node whose receipts this service signs.
    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
    }

    /// The store.
    pub fn store(&self) -> &ShardStore {
        &self.store
    }

    /// A slot for one data-plane call from `source` whose body is at most `body_bytes` long;
    /// refused when `source` holds its share, or [`MAX_DATA_CALLS`] run or their bodies leave too
    /// little of [`DATA_BODY_BUDGET`].
    pub fn try_slot(&self, source: std::net::IpAddr, body_bytes: usize) -> Result<DataSlot, SlotRefused> {
        let units = body_bytes.min(MAX_SHARD_BODY).div_ceil(BUDGET_UNIT).max(1);
        let share = {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            let (calls, held) = sources.entry(source).or_default();
            if *calls >= MAX_DATA_CALLS_PER_SOURCE || *held + units > DATA_BODY_BUDGET_PER_SOURCE / BUDGET_UNIT {
                if *calls == 0 {
                    sources.remove(&source);
                }
                return Err(SlotRefused::SourceBusy);
            }
            *calls += 1;
            *held += units;
            SourceShare { sources: self.sources.clone(), source, units }
        };
        let call = self.calls.clone().try_acquire_owned().map_err(|_| SlotRefused::Busy)?;
        let body = self.body_budget.clone().try_acquire_many_owned(units as u32).map_err(|_| SlotRefused::Busy)?;
        Ok(DataSlot { _call: call, _body: body, _share: share })
    }

    /// Checks the manifest of `version` against what this node holds for shard `index`, makes
    /// it durable and signs the receipt.
    pub fn seal(
        &self,
        version: &Version,
        index: u8,
        object: Hash,
        generation: u32,
        grant: Grant,
    ) -> Result<SealReceipt, ShardStoreError> {
        let manifest = self.manifest(version, grant)?;
        if usize::from(index) >= manifest.code.total() {
            return Err(ShardStoreError::Invalid(format!("shard index {index} is beyond code {}", manifest.code)));
        }
        let expected: Vec<(u64, [u8; 32])> =
            manifest.segments.iter().enumerate().map(|(s, hashes)| (s as u64, hashes[usize::from(index)])).collect();
        // A repair's receipt vouches for what is on disk now: every shard read back and checked
        // (a copy that rotted since it was written fails here, never gets a receipt).
        if let Grant::Committed { .. } = grant {
            for (segment, _) in &expected {
                self.store.shard(&ShardKey { version: *version, index, segment: *segment })?;
            }
        }
        self.store.note_object(version, &object.0)?;
        // From before the sync, as the collector's clock (see `seal_batch`).
        let expires_ms = crate::api::system_now_ms() + RECEIPT_TTL_MS;
        let total = self.store.seal(version, index, &expected)?;
        let root = manifest.root();
        let terms = ReceiptTerms {
            object,
            version: Hash(*version),
            generation,
            index,
            manifest_root: root,
            shard_bytes: total,
            expires_ms,
        };
        Ok(SealReceipt {
            node: self.identity.node_id(),
            index,
            shard_bytes: total,
            manifest_root: root,
            receipt: hex::encode(terms.sign(&self.identity, &self.network)),
            expires_ms,
        })
    }

    /// Stores each of `writes` (new one-segment versions of their uploader: manifest, shard,
    /// object), makes them all durable together ([`ShardStore::seal_many`]) and signs one receipt
    /// over the list; returns its expiry, the signature and each version's bytes.
    pub fn seal_batch(&self, writes: &[BatchWrite]) -> Result<(u64, [u8; 64], Vec<u64>), ShardStoreError> {
        for w in writes {
            self.put_manifest(&w.version, &w.manifest, Grant::Owner)?;
            self.put_shard(
                ShardKey { version: w.version, index: w.index, segment: 0 },
                &Hashed::new(&w.shard),
                &w.hash,
                Grant::Owner,
            )?;
            self.store.note_object(&w.version, &w.object.0)?;
        }
        let seals: Vec<archipel_store::SealOf> =
            writes.iter().map(|w| (w.version, w.index, vec![(0, w.hash)])).collect();
        // The expiry counts from before the sync: the collector's clock for these versions
        // starts when they are marked written, before it too.
        let expires_ms = crate::api::system_now_ms() + RECEIPT_TTL_MS;
        let totals = self.store.seal_many(&seals)?;
        let items: Vec<BatchItem> = writes
            .iter()
            .zip(&totals)
            .map(|(w, total)| BatchItem {
                object: w.object,
                version: Hash(w.version),
                index: w.index,
                manifest_root: w.root,
                shard_bytes: *total,
            })
            .collect();
        Ok((expires_ms, sign_batch_receipt(&self.identity, &self.network, expires_ms, &items), totals))
    }

    /// The stored manifest of `version`, parsed; under a [`Grant::Committed`], only one with the
    /// ledger's root.
    fn manifest(&self, version: &Version, grant: Grant) -> Result<Manifest, ShardStoreError> {
        let bytes = self.store.manifest(version)?.ok_or_else(|| {
            ShardStoreError::NotFound(format!("the manifest of {}: upload it first", hex::encode(&version[..8])))
        })?;
        let manifest = Manifest::from_bytes(&bytes).map_err(ShardStoreError::Invalid)?;
        if let Grant::Committed { manifest_root } = grant
            && manifest.root() != manifest_root
        {
            return Err(ShardStoreError::NotFound(format!(
                "the manifest of {} with the ledger's root: upload it first",
                hex::encode(&version[..8])
            )));
        }
        Ok(manifest)
    }

    /// Whether `key` is stored with these bytes' length and `hash` already (a retry).
    pub(crate) fn holds_shard(&self, key: &ShardKey, bytes: &[u8], hash: &[u8; 32]) -> bool {
        matches!(self.store.entry(key), Ok(Some((len, h))) if len == bytes.len() as u64 && h == *hash)
    }

    /// Whether `version`'s manifest is stored as `bytes` already (a retry).
    pub(crate) fn holds_manifest(&self, version: &Version, bytes: &[u8]) -> bool {
        self.store.manifest(version).ok().flatten().as_deref() == Some(bytes)
    }

    /// Stores one shard under `grant`: an owner's as sent; a repair's only with the hash the
    /// ledger's manifest lists, replacing whatever else is stored under its name.
    pub fn put_shard<B: AsRef<[u8]>>(
        &self,
        key: ShardKey,
        shard: &Hashed<B>,
        hash: &[u8; 32],
        grant: Grant,
    ) -> Result<Written, ShardStoreError> {
        match grant {
            Grant::Owner => self.store.put_hashed(key, shard, hash),
            Grant::Committed { .. } => {
                let manifest = self.manifest(&key.version, grant)?;
                let listed = manifest
                    .segments
                    .get(key.segment as usize)
                    .and_then(|hashes| hashes.get(usize::from(key.index)))
                    .ok_or_else(|| {
                        ShardStoreError::Invalid(format!(
                            "the manifest has no shard {} of segment {}",
                            key.index, key.segment
                        ))
                    })?;
                if listed != hash {
                    return Err(ShardStoreError::HashMismatch {
                        key: format!("shard {} of segment {} (the ledger's manifest)", key.index, key.segment),
                        expected: hex::encode(listed),
                        got: hex::encode(hash),
                    });
                }
                self.store.replace_hashed(key, shard, hash)
            }
        }
    }

    /// Stores a manifest under `grant`: an owner's as sent, replacing its own until the version
    /// is sealed here (a multipart upload writes a provisional one to keep its shards while
    /// parts are slow; a receipt vouches for one manifest, so none changes after a seal); a
    /// repair's only with the ledger's root, replacing any other.
    pub fn put_manifest(&self, version: &Version, bytes: &[u8], grant: Grant) -> Result<Written, ShardStoreError> {
        match grant {
            Grant::Owner if self.store.object_of(version).is_none() => self.store.replace_manifest(version, bytes),
            Grant::Owner => self.store.put_manifest(version, bytes),
            Grant::Committed { manifest_root } => {
                let root = Manifest::from_bytes(bytes).map_err(ShardStoreError::Invalid)?.root();
                if root != manifest_root {
                    return Err(ShardStoreError::HashMismatch {
                        key: "the manifest (root)".into(),
                        expected: manifest_root.to_string(),
                        got: root.to_string(),
                    });
                }
                self.store.replace_manifest(version, bytes)
            }
        }
    }
}

/// One new version of a batched seal ([`ShardService::seal_batch`]), checked by the caller: the
/// manifest is the version's, of one segment, listing `hash` for shard `index` under `root`.
#[derive(Clone, Debug)]
pub struct BatchWrite {
    /// The version.
    pub version: Version,
    /// Its object (hash of bucket and key).
    pub object: Hash,
    /// This node's shard index.
    pub index: u8,
    /// The manifest.
    pub manifest: Bytes,
    /// Its root.
    pub root: Hash,
    /// The shard.
    pub shard: Bytes,
    /// The shard's hash, as the manifest lists it.
    pub hash: [u8; 32],
}

/// What a write to a version may do, from its [`Claim`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The version's uploader (its key made it): what it sends is stored; a different shard or
    /// manifest already stored under the same name is refused.
    Owner,
    /// A repair of the version finalized state lists with this manifest root: only that
    /// manifest and shards with its hashes, which replace anything else under their names.
    Committed {
        /// The ledger's manifest root for the version.
        manifest_root: Hash,
    },
}

/// The grant of a write by `caller` to `version` with the claim in `headers`: an owner's nonce
/// must make the version from the caller's key; a repair's object must list the version in this
/// node's finalized state.
fn grant(s: &ApiState, caller: &NodeId, version: &Version, headers: &HeaderMap) -> Result<(Claim, Grant), Refused> {
    let text = headers.get(CLAIM_HEADER).and_then(|v| v.to_str().ok()).ok_or_else(|| {
        Refused::from(error(
            StatusCode::BAD_REQUEST,
            "claim_required",
            format!("send {CLAIM_HEADER}: the object's hash and, for a new version, the nonce it was made from"),
        ))
    })?;
    let claim = Claim::from_header(text).map_err(|m| Refused::from(error(StatusCode::BAD_REQUEST, "bad_claim", m)))?;
    Ok((claim, grant_claim(s, caller, version, claim)?))
}

/// The grant of a write by `caller` to `version` under `claim` (see [`grant`]).
pub(crate) fn grant_claim(s: &ApiState, caller: &NodeId, version: &Version, claim: Claim) -> Result<Grant, Refused> {
    let short = hex::encode(&version[..8]);
    match claim {
        Claim::Owner { object, nonce } => {
            if version_id(caller, &object, &nonce).0 != *version {
                Err(error(
                    StatusCode::FORBIDDEN,
                    "not_your_version",
                    format!(
                        "version {short} is not made from your key, that object and that nonce: only its uploader \
                         writes a new version (make your own with a fresh nonce)"
                    ),
                )
                .into())
            } else if s.chain.with_state(|st| st.object_by_id(&object)).is_some_and(|o| o.version.0 == *version) {
                // Once committed, a version's shards are what its manifest lists: nobody, its
                // uploader included, adds to it (repairs write under the ledger's manifest).
                Err(error(
                    StatusCode::CONFLICT,
                    "already_committed",
                    format!("version {short} is committed: it takes no more uploads (put a new version instead)"),
                )
                .into())
            } else {
                Ok(Grant::Owner)
            }
        }
        Claim::Committed { object } => match s.chain.with_state(|st| st.object_by_id(&object)) {
            Some(o) if o.version.0 == *version => Ok(Grant::Committed { manifest_root: o.manifest_root }),
            _ => Err(error(
                StatusCode::CONFLICT,
                "not_committed",
                format!(
                    "version {short} is not the version this node's finalized state lists for that object: only a \
                     committed version is repaired (retry once this node has the block that committed it)"
                ),
            )
            .into()),
        },
    }
}

/// The data-plane routes (signed; see [`crate::api::authenticate_data`]).
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/objects/{version}/shards/{index}/{segment}", put(put_shard).get(get_shard))
        .route("/v1/objects/{version}/manifest", put(put_manifest).get(get_manifest))
        .route("/v1/objects/{version}/seal/{index}", post(seal))
        .route(archipel_objects::batch::SEAL_BATCH_PATH, post(crate::shard_batch::seal_batch))
        .route("/v1/objects/{version}/audit/{index}/{segment}", get(audit))
}

/// A refused data-plane call (boxed: a response is large).
#[derive(Debug)]
pub struct Refused(Box<Response>);

impl From<Response> for Refused {
    fn from(r: Response) -> Self {
        Refused(Box::new(r))
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        *self.0
    }
}

pub(crate) fn store_error(e: ShardStoreError) -> Refused {
    let (status, code) = match &e {
        ShardStoreError::Full { .. } => (StatusCode::INSUFFICIENT_STORAGE, "storage_full"),
        ShardStoreError::HashMismatch { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "hash_mismatch"),
        ShardStoreError::NotFound(_) => (StatusCode::NOT_FOUND, "shard_not_found"),
        ShardStoreError::Corrupt { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "shard_corrupt"),
        ShardStoreError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        ShardStoreError::Exists(_) => (StatusCode::CONFLICT, "already_stored"),
        ShardStoreError::Io { .. } | ShardStoreError::Index(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_io"),
    };
    if status.is_server_error() {
        tracing::warn!(error = %e, "shard store");
    }
    error(status, code, e.to_string()).into()
}

pub(crate) fn service(s: &ApiState) -> Result<Arc<ShardService>, Refused> {
    s.shards.clone().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "not_a_storage_node",
            "this node does not have the storage role: ask a storage node",
        )
        .into()
    })
}

fn version_of(text: &str) -> Result<Version, Refused> {
    let mut v = [0u8; 32];
    hex::decode_to_slice(text, &mut v).map_err(|_| {
        Refused::from(error(StatusCode::BAD_REQUEST, "bad_version", "an object version is 64 hex characters"))
    })?;
    Ok(v)
}

/// Bytes an owner's write counted against its key's bound ([`UploadQuota`]); none for a repair
/// of a committed version or an empty body.
pub(crate) struct Counted(u64);

impl Counted {
    /// Gives the bytes back (the write failed).
    pub(crate) fn release(&self, svc: &ShardService, caller: &NodeId, version: &Version) {
        if self.0 > 0 {
            svc.quota.release(caller, version, self.0);
        }
    }
}

/// Counts `bytes` of an owner's write to `version` against the caller's bound, or refuses it
/// (429 `upload_quota`, with the numbers).
pub(crate) fn count_upload(
    s: &ApiState,
    svc: &ShardService,
    caller: &NodeId,
    claim: &Claim,
    version: &Version,
    bytes: u64,
    grant: Grant,
) -> Result<Counted, Refused> {
    if grant != Grant::Owner || bytes == 0 {
        return Ok(Counted(0));
    }
    let committed = |object: &Hash, v: &Version| {
        s.chain.with_state(|st| st.object_by_id(object)).is_some_and(|o| o.version.0 == *v)
    };
    svc.quota
        .reserve(caller, claim.object(), *version, bytes, std::time::Instant::now(), committed)
        .map_err(|e| Refused::from(error(StatusCode::TOO_MANY_REQUESTS, "upload_quota", e.to_string())))?;
    Ok(Counted(bytes))
}

/// Runs store work on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ShardStoreError> + Send + 'static,
) -> Result<T, Refused> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(store_error),
        Err(_) => {
            Err(error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the storage task failed; see the node's log")
                .into())
        }
    }
}

#[derive(Serialize)]
struct Stored {
    stored: u64,
    free: u64,
}

async fn put_shard(
    State(s): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path((version, index, segment)): Path<(String, u8, u64)>,
    Extension(VerifiedBody(body)): Extension<VerifiedBody>,
    headers: HeaderMap,
) -> Result<Response, Refused> {
    {
        let svc = service(&s)?;
        let version = version_of(&version)?;
        let (claim, grant) = grant(&s, &caller.0, &version, &headers)?;
        let mut hash = [0u8; 32];
        let given = headers.get(HASH_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        hex::decode_to_slice(given, &mut hash).map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "bad_hash",
                format!("send the shard's BLAKE3 hash in {HASH_HEADER} (64 hex characters)"),
            )
        })?;
        let len = body.bytes().len() as u64;
        let key = ShardKey { version, index, segment };
        // A retry of a stored shard is answered, not counted (at the bound too).
        let counted = if svc.holds_shard(&key, body.bytes(), &hash) {
            Counted(0)
        } else {
            count_upload(&s, &svc, &caller.0, &claim, &version, len, grant)?
        };
        let store = svc.clone();
        let (written, free) = blocking(move || {
            // The body's hash was taken once, to check the request's signature.
            let written = store.put_shard(key, &body, &hash, grant)?;
            Ok((written, store.store.free()))
        })
        .await
        .inspect_err(|_| counted.release(&svc, &caller.0, &version))?;
        // A retry of a stored shard holds nothing more.
        if written == Written::AlreadyHeld {
            counted.release(&svc, &caller.0, &version);
        }
        Ok(Json(Stored { stored: len, free }).into_response())
    }
}

async fn get_shard(
    State(s): State<Arc<ApiState>>,
    Path((version, index, segment)): Path<(String, u8, u64)>,
) -> Result<Response, Refused> {
    {
        let svc = service(&s)?;
        let version = version_of(&version)?;
        let bytes = blocking(move || svc.store.shard(&ShardKey { version, index, segment })).await?;
        Ok(bytes.into_response())
    }
}

async fn put_manifest(
    State(s): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(version): Path<String>,
    headers: HeaderMap,
    // As for the seal: the checked body, not a 2 MiB-limited extractor (a manifest of a large
    // object with a wide code passes 2 MiB).
    Extension(VerifiedBody(body)): Extension<VerifiedBody>,
) -> Result<Response, Refused> {
    let body = body.bytes().clone();
    {
        let svc = service(&s)?;
        let version = version_of(&version)?;
        let (claim, grant) = grant(&s, &caller.0, &version, &headers)?;
        check_manifest_for(&version, &body)?;
        let len = body.len() as u64;
        // A retry of a stored manifest is answered, not counted (at the bound too).
        let counted = if svc.holds_manifest(&version, &body) {
            Counted(0)
        } else {
            count_upload(&s, &svc, &caller.0, &claim, &version, len, grant)?
        };
        let store = svc.clone();
        let (written, free) = blocking(move || {
            let written = store.put_manifest(&version, &body, grant)?;
            Ok((written, store.store.free()))
        })
        .await
        .inspect_err(|_| counted.release(&svc, &caller.0, &version))?;
        if written == Written::AlreadyHeld {
            counted.release(&svc, &caller.0, &version);
        }
        Ok(Json(Stored { stored: len, free }).into_response())
    }
}

/// Refuses bytes that are not a manifest of `version`; returns the manifest.
pub(crate) fn check_manifest_for(version: &Version, body: &[u8]) -> Result<Manifest, Refused> {
    let max = archipel_ledger::storage::MAX_MANIFEST_BYTES;
    if body.len() > max {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "manifest_too_large",
            format!("a manifest of {} bytes is over the {max} a holder stores", body.len()),
        )
        .into());
    }
    let manifest = Manifest::from_bytes(body).map_err(|e| {
        Refused::from(error(StatusCode::BAD_REQUEST, "bad_manifest", format!("not a valid manifest: {e}")))
    })?;
    if manifest.version.0 != *version {
        return Err(error(StatusCode::BAD_REQUEST, "bad_manifest", "the manifest is for another version").into());
    }
    Ok(manifest)
}

async fn get_manifest(State(s): State<Arc<ApiState>>, Path(version): Path<String>) -> Result<Response, Refused> {
    {
        let svc = service(&s)?;
        let version = version_of(&version)?;
        let bytes = blocking(move || {
            svc.store
                .manifest(&version)?
                .ok_or_else(|| ShardStoreError::NotFound(format!("manifest of {}", hex::encode(&version[..8]))))
        })
        .await?;
        Ok(bytes.into_response())
    }
}

/// Query of `POST …/seal/{index}`: the object's holder generation.
#[derive(Deserialize)]
struct SealQuery {
    #[serde(default)]
    generation: u32,
    /// The body is this many bytes of manifest followed by the caller's shard of segment 0.
    manifest_bytes: Option<usize>,
}

async fn seal(
    State(s): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path((version, index)): Path<(String, u8)>,
    Query(q): Query<SealQuery>,
    headers: HeaderMap,
    // The body the signature check read (not axum's `Bytes` extractor, whose 2 MiB default
    // limit refused a one-segment object's shard of more than 2 MiB with its manifest).
    Extension(VerifiedBody(body)): Extension<VerifiedBody>,
) -> Result<Response, Refused> {
    let body = body.bytes().clone();
    let svc = service(&s)?;
    let version = version_of(&version)?;
    let (claim, grant) = grant(&s, &caller.0, &version, &headers)?;
    // The manifest may come with the seal, and after it the shard of segment 0 (an object of one
    // segment: the whole upload in one call); each stored as by its own call.
    let (manifest, shard) = match q.manifest_bytes {
        None => (body, None),
        Some(m) if m < body.len() => (body.slice(..m), Some(body.slice(m..))),
        Some(m) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_seal_body",
                format!("manifest_bytes={m} leaves no shard in a body of {} bytes", body.len()),
            )
            .into());
        }
    };
    // A manifest that comes (or must come, ahead of a shard) is checked once, here.
    let listed =
        (!manifest.is_empty() || shard.is_some()).then(|| check_manifest_for(&version, &manifest)).transpose()?;
    let shard = match (shard, &listed) {
        (Some(bytes), Some(listed)) => {
            let hash = listed.segments.first().and_then(|hs| hs.get(usize::from(index))).copied().ok_or_else(|| {
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_seal_body",
                    format!("the manifest lists no shard {index} of segment 0"),
                )
            })?;
            Some((bytes, hash))
        }
        _ => None,
    };
    // What it carries that is stored already (a retry) counts nothing.
    let manifest_held = !manifest.is_empty() && svc.holds_manifest(&version, &manifest);
    let shard_held = shard
        .as_ref()
        .is_some_and(|(bytes, hash)| svc.holds_shard(&ShardKey { version, index, segment: 0 }, bytes, hash));
    let carried = (if manifest_held { 0 } else { manifest.len() }
        + shard.as_ref().filter(|_| !shard_held).map_or(0, |(b, _)| b.len())) as u64;
    let counted = count_upload(&s, &svc, &caller.0, &claim, &version, carried, grant)?;
    // A seal keeps its version on disk for the collector's wait again, so what the version holds
    // counts again too: an owner cannot keep an upload alive with seals the quota never sees.
    if grant == Grant::Owner && !svc.quota.touch(&caller.0, &version, std::time::Instant::now()) {
        let held = svc.store.version_bytes(&version).map_err(store_error)?;
        count_upload(&s, &svc, &caller.0, &claim, &version, held, grant)?;
    }
    let store = svc.clone();
    // Whether anything carried was newly stored, and the seal's outcome: what was stored keeps
    // counting even when the seal then fails (it stays on disk until collected); a retry that
    // stored nothing new counts nothing.
    let (stored, sealed) = blocking(move || {
        let mut stored = false;
        let write_and_seal = || {
            if !manifest.is_empty() {
                stored |= store.put_manifest(&version, &manifest, grant)? == Written::New;
            }
            if let Some((bytes, hash)) = shard {
                let key = ShardKey { version, index, segment: 0 };
                stored |= store.put_shard(key, &Hashed::new(bytes), &hash, grant)? == Written::New;
            }
            store.seal(&version, index, claim.object(), q.generation, grant)
        };
        let sealed = write_and_seal();
        Ok((stored, sealed))
    })
    .await?;
    if !stored {
        counted.release(&svc, &caller.0, &version);
    }
    let receipt = sealed.map_err(store_error)?;
    tracing::debug!(caller = %caller.0.short(), version = %hex::encode(&version[..8]), index, "shards sealed");
    Ok(Json(receipt).into_response())
}

#[derive(Deserialize)]
struct AuditQuery {
    offset: u64,
    len: u64,
}

async fn audit(
    State(s): State<Arc<ApiState>>,
    Path((version, index, segment)): Path<(String, u8, u64)>,
    Query(q): Query<AuditQuery>,
) -> Result<Response, Refused> {
    {
        let svc = service(&s)?;
        let version = version_of(&version)?;
        let hash =
            blocking(move || svc.store.range_hash(&ShardKey { version, index, segment }, q.offset, q.len)).await?;
        Ok(Json(serde_json::json!({ "hash": hex::encode(hash) })).into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_ledger::storage::WRAPPED_KEY_BYTES;
    use archipel_types::ErasureCode;

    /// The API of a storage node (key seed 4,242) over a fresh shard store, served on loopback:
    /// the store's directory (keep it), the API's state and its URL.
    async fn serve_shards() -> (tempfile::TempDir, Arc<ApiState>, String) {
        let dir = tempfile::tempdir().unwrap();
        let svc =
            ShardService::new(ShardStore::open(dir.path(), 1 << 30).unwrap(), Identity::from_seed(4_242), Hash::ZERO);
        let mut state = crate::api::testing::state(crate::config::ApiLimits::default());
        Arc::get_mut(&mut state).unwrap().shards = Some(Arc::new(svc));
        let url = crate::api::testing::serve(state.clone()).await;
        (dir, state, url)
    }

    /// The API hashes a shard body once (for the signature) and stores the shard under that hash:
    /// a body that is not the one signed, or not the one declared, is refused and nothing stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shard_is_stored_under_the_hash_its_signature_was_checked_against() {
        let (_dir, state, url) = serve_shards().await;
        let tenant = crate::api::testing::tenant();
        let object = archipel_ledger::storage::object_id("b", "k");
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let (a, b) = (vec![1u8; 900], vec![2u8; 900]);
        let (ha, hb) = (*blake3::hash(&a).as_bytes(), *blake3::hash(&b).as_bytes());
        // (nonce, hash signed, hash declared, body) → status, code
        let cases = [
            (1, ha, ha, &b, 422, "hash_mismatch"), // signed and declared for A, body B
            (2, hb, ha, &b, 422, "hash_mismatch"), // signed for the body, declared otherwise
            (3, ha, hb, &b, 401, "bad_signature"), // declared right, signed for another body
            (4, hb, hb, &b, 200, ""),
        ];
        // A shard PUT by `who` of version `nonce`, signed with hash `signed`, declaring `declared`.
        let put = |who: Identity, nonce: u8, signed: [u8; 32], declared: [u8; 32], body: Vec<u8>| {
            let (http, url) = (http.clone(), url.clone());
            let version = version_id(&tenant.node_id(), &object, &[nonce; 32]);
            async move {
                let claim = Claim::Owner { object, nonce: [nonce; 32] };
                let path = format!("/v1/objects/{version}/shards/0/0");
                let now = crate::api::system_now_ms();
                let headers = archipel_crypto::sign_request_prehashed(&who, "PUT", &path, &signed, now, [nonce; 16]);
                let mut req = http.put(format!("{url}{path}")).body(body);
                for (k, v) in headers.pairs() {
                    req = req.header(k, v);
                }
                let resp = req
                    .header(HASH_HEADER, hex::encode(declared))
                    .header(CLAIM_HEADER, claim.to_header())
                    .send()
                    .await
                    .unwrap();
                (version, resp.status().as_u16(), resp.text().await.unwrap())
            }
        };
        for (nonce, signed, declared, body, status, code) in cases {
            let (body, code): (&Vec<u8>, &str) = (body, code);
            let (version, got, text) = put(tenant.clone(), nonce, signed, declared, body.clone()).await;
            assert_eq!(got, status, "case {nonce}: {text}");
            assert!(text.contains(code), "case {nonce}: {text}");
            match nonce {
                // Refused by the authentication layer, which names both hashes.
                1 => assert!(
                    text.contains(&hex::encode(ha))
                        && text.contains(&hex::encode(hb))
                        && text.contains("send the shard's own hash"),
                    "{text}"
                ),
                // Signed right, refused by the store's check against the declared hash.
                2 => assert!(text.contains("expected") && text.contains(&hex::encode(ha)), "{text}"),
                _ => {}
            }
            let key = ShardKey { version: version.0, index: 0, segment: 0 };
            let svc = state.shards.as_ref().unwrap();
            let held = svc.store().entry(&key).unwrap();
            if status == 200 {
                assert_eq!(held, Some((900, hb)), "case {nonce}: stored under the body's hash");
                assert_eq!(svc.store().shard(&key).unwrap(), b);
            } else {
                assert_eq!(held, None, "case {nonce}: nothing stored");
            }
        }
        // An unknown key is refused as such, whatever hash it declares.
        let (_, got, text) = put(Identity::from_seed(99), 5, hb, ha, b.clone()).await;
        assert_eq!(got, 403, "{text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_address_holding_its_share_of_the_data_plane_waits_and_others_do_not() {
        use tokio::io::AsyncWriteExt;
        let (_dir, _state, url) = serve_shards().await;
        let addr = url.trim_start_matches("http://").to_string();
        let tenant = crate::api::testing::tenant();
        let object = archipel_ledger::storage::object_id("b", "k");
        // A signed shard PUT's head (declaring `len` body bytes) for version `nonce`.
        let head = |nonce: u8, len: usize, hash: [u8; 32]| {
            let version = version_id(&tenant.node_id(), &object, &[nonce; 32]);
            let path = format!("/v1/objects/{version}/shards/0/0");
            let signed = archipel_crypto::sign_request_prehashed(
                &tenant,
                "PUT",
                &path,
                &hash,
                crate::api::system_now_ms(),
                [nonce; 16],
            );
            let claim = Claim::Owner { object, nonce: [nonce; 32] };
            let mut h: Vec<(String, String)> =
                signed.pairs().into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            h.push((HASH_HEADER.into(), hex::encode(hash)));
            h.push((CLAIM_HEADER.into(), claim.to_header()));
            (path, h, len)
        };
        // Four uploads from 127.0.0.1 that declare the largest body and send none: they hold
        // this address's whole share of the body budget.
        let mut held = Vec::new();
        for nonce in 1..=4u8 {
            let (path, headers, len) = head(nonce, MAX_SHARD_BODY, [0; 32]);
            let mut text = format!("PUT {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {len}\r\n");
            for (k, v) in headers {
                text.push_str(&format!("{k}: {v}\r\n"));
            }
            text.push_str("\r\n");
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.write_all(text.as_bytes()).await.unwrap();
            held.push(stream);
        }
        let body = vec![7u8; 900];
        let hash = *blake3::hash(&body).as_bytes();
        let put = |from: [u8; 4], nonce: u8| {
            let (path, headers, _) = head(nonce, body.len(), hash);
            let http = reqwest::Client::builder().no_proxy().local_address(std::net::IpAddr::from(from)).build();
            let (url, body) = (url.clone(), body.clone());
            async move {
                let mut req = http.unwrap().put(format!("{url}{path}")).body(body);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                let resp = req.send().await.unwrap();
                (resp.status().as_u16(), resp.text().await.unwrap())
            }
        };
        // The same address waits, told why; another address is served.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut nonce = 10;
        let (status, text) = loop {
            // The held uploads' heads may not have been read yet.
            nonce += 1;
            let (status, text) = put([127, 0, 0, 1], nonce).await;
            if status != 200 || std::time::Instant::now() > deadline {
                break (status, text);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert_eq!(status, 503, "{text}");
        assert!(text.contains("data_busy") && text.contains("one address may hold"), "{text}");
        let (status, text) = put([127, 0, 0, 2], 200).await;
        assert_eq!(status, 200, "another address: {text}");
        // Once the held uploads are gone, the address is served again.
        drop(held);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            nonce += 1;
            let (status, text) = put([127, 0, 0, 1], nonce).await;
            if status == 200 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the share was never given back: {status} {text}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_past_its_bound_of_uncommitted_uploads_is_refused_with_the_numbers() {
        use archipel_objects::transfer::{Holder, Shards as _};
        let dir = tempfile::tempdir().unwrap();
        let node_key = Identity::from_seed(4_242);
        let mut svc = ShardService::new(ShardStore::open(dir.path(), 1 << 30).unwrap(), node_key, Hash::ZERO);
        svc.quota = UploadQuota::with_limit(1_500);
        let mut state = crate::api::testing::state(crate::config::ApiLimits::default());
        Arc::get_mut(&mut state).unwrap().shards = Some(Arc::new(svc));
        let url = crate::api::testing::serve(state.clone()).await;
        let tenant = crate::api::testing::tenant();
        let holder = Holder { node: Identity::from_seed(1).node_id(), url };
        let http = archipel_objects::http::HttpShards::new(tenant.clone());
        let object = archipel_ledger::storage::object_id("b", "k");
        let upload = |nonce: u8, segment: u64, bytes: Vec<u8>, hash: [u8; 32]| {
            let http = http.clone();
            let holder = holder.clone();
            let tenant = tenant.node_id();
            async move {
                let version = version_id(&tenant, &object, &[nonce; 32]);
                let claim = Claim::Owner { object, nonce: [nonce; 32] };
                http.put_shard(&holder, &version, &claim, 0, segment, bytes.into(), hash).await
            }
        };
        let shard = |fill: u8| (vec![fill; 700], *blake3::hash(&[fill; 700]).as_bytes());
        let (a, ha) = shard(1);
        upload(1, 0, a, ha).await.unwrap();
        // A write that fails (wrong hash) gives back what it counted.
        let (b, _) = shard(2);
        let e = upload(2, 0, b.clone(), [9; 32]).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some("hash_mismatch"));
        let (b, hb) = shard(2);
        upload(2, 0, b.clone(), hb).await.unwrap();
        // Retries of a stored shard hold nothing more, so they count nothing.
        for _ in 0..3 {
            upload(2, 0, b.clone(), hb).await.unwrap();
        }
        // 1,400 bytes counted: 700 more would pass 1,500 — refused, with the numbers, nothing stored.
        let (c, hc) = shard(3);
        let e = upload(3, 0, c, hc).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some("upload_quota"), "{}", e.message);
        assert!(
            e.message.contains("holds 1400 bytes in 2 writes to 2 versions") && e.message.contains("1500"),
            "{}",
            e.message
        );
        let svc = state.shards.clone().unwrap();
        let v3 = version_id(&tenant.node_id(), &object, &[3; 32]).0;
        assert!(svc.store().entry(&ShardKey { version: v3, index: 0, segment: 0 }).unwrap().is_none());
        // Another key is not affected.
        // The node's own key (`testing::state` makes it from seed 1): a member, so it may upload.
        let other = archipel_objects::http::HttpShards::new(Identity::from_seed(1));
        let me = Identity::from_seed(1).node_id();
        let version = version_id(&me, &object, &[4; 32]);
        let (d, hd) = shard(4);
        let claim = Claim::Owner { object, nonce: [4; 32] };
        other.put_shard(&holder, &version, &claim, 0, 0, d.into(), hd).await.unwrap();
    }

    /// A seal that carries the manifest and the caller's shard of segment 0 (an object of one
    /// segment in one call): stored and sealed when they agree, refused with a named error when
    /// the body or the manifest is wrong, and a retry counts nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_seal_carrying_manifest_and_shard_stores_both_and_bad_bodies_are_named() {
        use archipel_objects::transfer::{CLAIM_HEADER, Holder, SealWith, Shards as _};
        let tenant = crate::api::testing::tenant();
        let object = archipel_ledger::storage::object_id("b", "k");
        let nonce = [8u8; 32];
        let version = version_id(&tenant.node_id(), &object, &nonce);
        let claim = Claim::Owner { object, nonce };
        let shard = vec![0x42u8; 1_500];
        let mut hashes = vec![[0u8; 32]; 6];
        hashes[1] = *blake3::hash(&shard).as_bytes();
        let manifest = Manifest {
            version,
            size: 4_000,
            segment_bytes: 4_096,
            code: ErasureCode::DEFAULT,
            wrapped_key: [7; WRAPPED_KEY_BYTES],
            segments: vec![hashes],
            meta: vec![],
        };
        let m = Bytes::from(manifest.to_bytes());
        let dir = tempfile::tempdir().unwrap();
        let mut svc =
            ShardService::new(ShardStore::open(dir.path(), 1 << 30).unwrap(), Identity::from_seed(4_242), Hash::ZERO);
        // Room for what the refused seals below leave counted (a manifest stored, with the shard
        // that failed it) and one good upload of the same size: no retry could count again.
        let upload = (m.len() + shard.len()) as u64;
        svc.quota = UploadQuota::with_limit(2 * upload + 10);
        let mut state = crate::api::testing::state(crate::config::ApiLimits::default());
        Arc::get_mut(&mut state).unwrap().shards = Some(Arc::new(svc));
        let url = crate::api::testing::serve(state.clone()).await;
        let holder = Holder { node: Identity::from_seed(1).node_id(), url: url.clone() };
        let http = archipel_objects::http::HttpShards::new(tenant.clone());
        // Raw seals, for bodies no client of ours sends.
        let raw = |query: String, body: Vec<u8>| {
            let tenant = tenant.clone();
            let url = url.clone();
            async move {
                let path = format!("/v1/objects/{}/seal/1?generation=0{query}", version);
                let now = crate::api::system_now_ms();
                let headers = archipel_crypto::sign_request(&tenant, "POST", &path, &body, now, rand::random());
                let mut req = reqwest::Client::new().post(format!("{url}{path}")).body(body);
                for (k, v) in headers.pairs() {
                    req = req.header(k, v);
                }
                let resp = req.header(CLAIM_HEADER, claim.to_header()).send().await.unwrap();
                let status = resp.status().as_u16();
                let v: serde_json::Value = resp.json().await.unwrap();
                (status, v["error"].as_str().unwrap_or_default().to_string(), v["message"].to_string())
            }
        };
        let with = |m: &Bytes, s: &[u8]| [m.as_ref(), s].concat();
        let cases = [
            (format!("&manifest_bytes={}", m.len()), m.to_vec(), 400, "bad_seal_body", "leaves no shard"),
            (
                format!("&manifest_bytes={}", m.len() + shard.len() + 5),
                with(&m, &shard),
                400,
                "bad_seal_body",
                "leaves",
            ),
            (format!("&manifest_bytes={}", m.len() - 1), with(&m, &shard), 400, "bad_manifest", ""),
            (format!("&manifest_bytes={}", m.len()), with(&m, &[0x43u8; 1_500]), 422, "hash_mismatch", "expected"),
        ];
        for (query, body, want, code, says) in cases {
            let (status, got, message) = raw(query.clone(), body).await;
            assert_eq!((status, got.as_str()), (want, code), "{query}: {message}");
            assert!(message.contains(says), "{query}: {message}");
        }
        let svc = state.shards.clone().unwrap();
        let key = ShardKey { version: version.0, index: 1, segment: 0 };
        assert!(svc.store().entry(&key).unwrap().is_none(), "nothing stored by a refused seal");
        // A manifest for another version is refused too.
        let mut other = manifest.clone();
        other.version = Hash([9; 32]);
        let (status, got, _) =
            raw(format!("&manifest_bytes={}", m.len()), with(&Bytes::from(other.to_bytes()), &shard)).await;
        assert_eq!((status, got.as_str()), (400, "bad_manifest"));
        assert!(svc.store().manifest(&version.0).unwrap().is_some(), "stored (and counted) before its shard failed");
        // The real thing, for a fresh version: one call stores the manifest and the shard and seals.
        let nonce = [9u8; 32];
        let version = version_id(&tenant.node_id(), &object, &nonce);
        let claim = Claim::Owner { object, nonce };
        let m = Bytes::from(Manifest { version, ..manifest.clone() }.to_bytes());
        let key = ShardKey { version: version.0, index: 1, segment: 0 };
        let one_call = || SealWith { manifest: Some(m.clone()), shard: Some(Bytes::from(shard.clone())) };
        let sealed = http.seal(&holder, &version, &claim, 1, 0, one_call()).await.unwrap();
        assert_eq!(sealed.shard_bytes, shard.len() as u64);
        assert_eq!(svc.store().shard(&key).unwrap(), shard);
        assert_eq!(svc.store().manifest(&version.0).unwrap().as_deref(), Some(&m[..]));
        // Retried (an answer lost on the way) at the key's bound: answered, nothing more counted.
        for _ in 0..3 {
            http.seal(&holder, &version, &claim, 1, 0, one_call()).await.unwrap();
        }
        // And a seal with no body: the version is counted still, so nothing changes.
        http.seal(&holder, &version, &claim, 1, 0, SealWith::default()).await.unwrap();
        // Sealed: its manifest does not change any more, not even by its owner.
        let provisional = Manifest { version, segments: vec![], size: 0, ..manifest.clone() }.to_bytes();
        let e = svc.put_manifest(&version.0, &provisional, Grant::Owner).unwrap_err();
        assert!(matches!(e, ShardStoreError::Exists(_)), "{e}");
        // Before a seal, the owner's provisional manifest (a slow multipart upload's keep-alive)
        // is replaced by the real one the seal brings.
        let fresh = Hash([11; 32]);
        let provisional = Manifest { version: fresh, segments: vec![], size: 0, ..manifest.clone() }.to_bytes();
        svc.put_manifest(&fresh.0, &provisional, Grant::Owner).unwrap();
        let real = Manifest { version: fresh, ..manifest.clone() }.to_bytes();
        assert_eq!(svc.put_manifest(&fresh.0, &real, Grant::Owner).unwrap(), Written::New);
        assert_eq!(svc.store().manifest(&fresh.0).unwrap().as_deref(), Some(&real[..]));
    }

    /// A node without a shard store answers a data-plane call with a large body at once, without
    /// reading (or holding memory for) the body it declared.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_storage_answers_a_shard_upload_before_its_body() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tenant = crate::api::testing::tenant();
        let state = crate::api::testing::state(crate::config::ApiLimits::default());
        assert!(state.shards.is_none());
        let url = crate::api::testing::serve(state).await;
        let path = format!("/v1/objects/{}/shards/0/0", hex::encode([4u8; 32]));
        let declared = 50usize << 20;
        let now = crate::api::system_now_ms();
        let headers = archipel_crypto::sign_request(&tenant, "PUT", &path, &vec![0u8; declared], now, rand::random());
        let mut head = format!("PUT {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {declared}\r\n");
        for (k, v) in headers.pairs() {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut conn = tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        // Not one byte of the body is sent: the answer comes anyway.
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut answer))
            .await
            .expect("answered before the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 404") && answer.contains("not_a_storage_node"), "{answer}");
    }

    /// A one-call seal is not bound by a default request-body limit: at 2+1 the shard of a full
    /// 8 MiB segment is 4 MiB, and with its manifest it is stored and sealed (it was refused with
    /// "length limit exceeded" above 2 MiB).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_one_call_seal_takes_a_shard_of_more_than_two_mib() {
        use archipel_objects::transfer::{Holder, SealWith, Shards as _};
        let tenant = crate::api::testing::tenant();
        let object = archipel_ledger::storage::object_id("b", "big");
        let nonce = [5u8; 32];
        let version = version_id(&tenant.node_id(), &object, &nonce);
        let claim = Claim::Owner { object, nonce };
        let shard = vec![0x24u8; 4 << 20];
        let mut hashes = vec![[0u8; 32]; 3];
        hashes[2] = *blake3::hash(&shard).as_bytes();
        let code = ErasureCode::new(2, 1).unwrap();
        let manifest = Manifest {
            version,
            size: 8 << 20,
            segment_bytes: 8 << 20,
            code,
            wrapped_key: [7; WRAPPED_KEY_BYTES],
            segments: vec![hashes],
            meta: vec![],
        };
        let m = Bytes::from(manifest.to_bytes());
        let dir = tempfile::tempdir().unwrap();
        let svc =
            ShardService::new(ShardStore::open(dir.path(), 1 << 30).unwrap(), Identity::from_seed(77), Hash::ZERO);
        let mut state = crate::api::testing::state(crate::config::ApiLimits::default());
        Arc::get_mut(&mut state).unwrap().shards = Some(Arc::new(svc));
        let url = crate::api::testing::serve(state.clone()).await;
        let holder = Holder { node: Identity::from_seed(1).node_id(), url };
        let http = archipel_objects::http::HttpShards::new(tenant.clone());
        let with = SealWith { manifest: Some(m.clone()), shard: Some(Bytes::from(shard.clone())) };
        let sealed = http.seal(&holder, &version, &claim, 2, 0, with).await.unwrap();
        assert_eq!(sealed.shard_bytes, shard.len() as u64);
        let key = ShardKey { version: version.0, index: 2, segment: 0 };
        assert_eq!(state.shards.as_ref().unwrap().store().shard(&key).unwrap(), shard);
    }

    /// Manifests pass 2 MiB for large objects (3 MiB: 16,384 segments at 4+2, 128 GiB) and are
    /// stored; one over `MAX_MANIFEST_BYTES` is refused by name, with nothing stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_manifest_over_two_mib_is_stored_and_one_over_the_bound_is_refused() {
        use archipel_objects::transfer::{Holder, Shards as _};
        let tenant = crate::api::testing::tenant();
        let object = archipel_ledger::storage::object_id("b", "huge");
        let dir = tempfile::tempdir().unwrap();
        let svc =
            ShardService::new(ShardStore::open(dir.path(), 1 << 40).unwrap(), Identity::from_seed(78), Hash::ZERO);
        let mut state = crate::api::testing::state(crate::config::ApiLimits::default());
        Arc::get_mut(&mut state).unwrap().shards = Some(Arc::new(svc));
        let url = crate::api::testing::serve(state.clone()).await;
        let holder = Holder { node: Identity::from_seed(1).node_id(), url };
        let http = archipel_objects::http::HttpShards::new(tenant.clone());
        for (n, segments) in [(1u8, 16_384u64), (2, 28_000)] {
            let nonce = [n; 32];
            let version = version_id(&tenant.node_id(), &object, &nonce);
            let claim = Claim::Owner { object, nonce };
            let manifest = Manifest {
                version,
                size: segments * (8 << 20),
                segment_bytes: 8 << 20,
                code: ErasureCode::DEFAULT,
                wrapped_key: [7; WRAPPED_KEY_BYTES],
                segments: vec![vec![[3u8; 32]; 6]; segments as usize],
                meta: vec![],
            };
            let bytes = Bytes::from(manifest.to_bytes());
            let stored = state.shards.as_ref().unwrap().store().manifest(&version.0).unwrap();
            assert!(stored.is_none());
            let put = http.put_manifest(&holder, &version, &claim, bytes.clone()).await;
            let stored = state.shards.as_ref().unwrap().store().manifest(&version.0).unwrap();
            if bytes.len() <= archipel_ledger::storage::MAX_MANIFEST_BYTES {
                assert!(bytes.len() > 3 << 20, "{}", bytes.len());
                put.unwrap();
                assert_eq!(stored.as_deref(), Some(&bytes[..]));
            } else {
                let e = put.unwrap_err();
                assert_eq!(e.code.as_deref(), Some("manifest_too_large"), "{e:?}");
                assert!(e.message.contains("over the"), "{e:?}");
                assert!(stored.is_none());
            }
        }
    }

    #[test]
    fn a_repair_replaces_planted_junk_with_the_ledgers_manifest_and_shards_and_signs_only_after_a_check() {
        let (dir, svc) = fresh_service();
        let version = [3u8; 32];
        let shard = vec![0x33u8; 5_000];
        let mut hashes = vec![[0u8; 32]; 6];
        hashes[2] = *blake3::hash(&shard).as_bytes();
        let manifest = Manifest {
            version: Hash(version),
            size: 100,
            segment_bytes: 4096,
            code: ErasureCode::DEFAULT,
            wrapped_key: [7; WRAPPED_KEY_BYTES],
            segments: vec![hashes],
            meta: vec![],
        };
        let grant = Grant::Committed { manifest_root: manifest.root() };
        let key = ShardKey { version, index: 2, segment: 0 };
        // Planted before the repair: another manifest and other bytes under the shard's name.
        let mut planted = manifest.clone();
        planted.size = 99;
        svc.store().put_manifest(&version, &planted.to_bytes()).unwrap();
        let junk = vec![0x55u8; 4_000];
        svc.store().put_shard(key, &junk, blake3::hash(&junk).as_bytes()).unwrap();
        // Against the planted manifest, neither a shard nor a seal goes through.
        assert!(matches!(
            svc.put_shard(key, &Hashed::new(&shard), &hashes_of(&manifest), grant),
            Err(ShardStoreError::NotFound(_))
        ));
        assert!(svc.seal(&version, 2, Hash::ZERO, 1, grant).is_err());
        // A manifest without the ledger's root is refused; the ledger's replaces the planted one.
        let e = svc.put_manifest(&version, &planted.to_bytes(), grant).unwrap_err();
        assert!(matches!(e, ShardStoreError::HashMismatch { .. }), "{e}");
        svc.put_manifest(&version, &manifest.to_bytes(), grant).unwrap();
        // Bytes the manifest does not list are refused; its shard replaces the junk.
        let e = svc.put_shard(key, &Hashed::new(&junk), blake3::hash(&junk).as_bytes(), grant).unwrap_err();
        assert!(matches!(e, ShardStoreError::HashMismatch { .. }), "{e}");
        svc.put_shard(key, &Hashed::new(&shard), &hashes_of(&manifest), grant).unwrap();
        assert_eq!(svc.store().shard(&key).unwrap(), shard);
        assert_eq!(svc.store().used(), shard.len() as u64 + manifest.to_bytes().len() as u64);
        let receipt = svc.seal(&version, 2, Hash::ZERO, 1, grant).unwrap();
        assert_eq!((receipt.shard_bytes, receipt.manifest_root), (shard.len() as u64, manifest.root()));
        // A copy that rots after it was stored gets no repair receipt.
        let path = std::fs::read_dir(dir.path().join("shards/03").join(hex::encode(version)))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n == "2.0"))
            .unwrap();
        std::fs::write(&path, vec![0x34u8; 5_000]).unwrap();
        assert!(matches!(svc.seal(&version, 2, Hash::ZERO, 1, grant), Err(ShardStoreError::Corrupt { .. })));
    }

    fn hashes_of(m: &Manifest) -> [u8; 32] {
        m.segments[0][2]
    }

    /// A shard service over a fresh 1 GiB store (keep the directory while it is used).
    fn fresh_service() -> (tempfile::TempDir, ShardService) {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path(), 1 << 30).unwrap();
        (dir, ShardService::new(store, Identity::from_seed(1), Hash::ZERO))
    }

    /// Source address `i` (of many).
    fn host(i: usize) -> std::net::IpAddr {
        std::net::IpAddr::from([10, 0, (i >> 8) as u8, i as u8])
    }

    #[test]
    fn slots_count_body_bytes_so_small_calls_run_together_and_large_ones_are_bounded() {
        let (_dir, svc) = fresh_service();
        // Sixteen of the largest bodies (from four hosts) fill the budget; a seventeenth waits.
        let large: Vec<DataSlot> =
            (0..16).map(|i| svc.try_slot(host(i / 4), MAX_SHARD_BODY).expect("a large slot")).collect();
        assert_eq!(svc.try_slot(host(99), MAX_SHARD_BODY).unwrap_err(), SlotRefused::Busy);
        assert_eq!(svc.try_slot(host(99), 1 << 20).unwrap_err(), SlotRefused::Busy, "no budget for 1 MiB either");
        drop(large);
        // Small calls (a 4 KiB object's shard, a seal) run by the hundred, up to the call limit.
        let small: Vec<DataSlot> =
            (0..MAX_DATA_CALLS).map(|i| svc.try_slot(host(i % 8), 1_100).expect("a small slot")).collect();
        assert_eq!(svc.try_slot(host(99), 0).unwrap_err(), SlotRefused::Busy, "at most MAX_DATA_CALLS at once");
        drop(small);
        // A body that declares more than a shard may be is counted as the largest.
        let huge: Vec<DataSlot> = (0..16).map(|i| svc.try_slot(host(i), usize::MAX).unwrap()).collect();
        assert_eq!(svc.try_slot(host(99), 1).unwrap_err(), SlotRefused::Busy);
        drop(huge);
        assert!(svc.try_slot(host(0), MAX_SHARD_BODY).is_ok(), "everything given back");
        assert!(svc.sources.lock().unwrap().is_empty(), "no share left behind");
    }

    #[test]
    fn one_source_holds_at_most_a_quarter_of_the_calls_and_of_the_body_budget() {
        let (_dir, svc) = fresh_service();
        // Calls: a quarter, then this source waits while others still get in.
        let small: Vec<DataSlot> =
            (0..MAX_DATA_CALLS_PER_SOURCE).map(|_| svc.try_slot(host(1), 1_100).unwrap()).collect();
        assert_eq!(svc.try_slot(host(1), 1_100).unwrap_err(), SlotRefused::SourceBusy);
        assert!(svc.try_slot(host(2), 1_100).is_ok(), "another source is not held back");
        drop(small);
        // Bytes: four of the largest bodies, then no more from this source, even a small one
        // past its share; the others still have three quarters of the budget.
        let large: Vec<DataSlot> = (0..4).map(|_| svc.try_slot(host(1), MAX_SHARD_BODY).unwrap()).collect();
        assert_eq!(svc.try_slot(host(1), BUDGET_UNIT).unwrap_err(), SlotRefused::SourceBusy);
        let others: Vec<DataSlot> = (0..12).map(|i| svc.try_slot(host(10 + i), MAX_SHARD_BODY).unwrap()).collect();
        drop(large);
        // Given back on drop: the source's share is whole again.
        assert!(svc.try_slot(host(1), 1_100).is_ok());
        drop(others);
        assert!(svc.sources.lock().unwrap().is_empty());
        // A refusal for the node's budget gives the source's part back at once.
        let fill: Vec<DataSlot> = (0..16).map(|i| svc.try_slot(host(20 + i / 4), MAX_SHARD_BODY).unwrap()).collect();
        for _ in 0..10 {
            assert_eq!(svc.try_slot(host(1), MAX_SHARD_BODY).unwrap_err(), SlotRefused::Busy);
        }
        drop(fill);
        assert!(svc.sources.lock().unwrap().is_empty(), "a refused call left a share behind");
    }
}
