//! PUT and GET of whole objects over a [`Shards`] transport (signed HTTP in production, a map in
//! memory in unit tests).
//!
//! **PUT** ([`put_object`]): a fresh version id and data key; the k+m holders chosen by
//! `placement` for that version (deterministic, re-checkable); then segment after segment: read,
//! seal ([`crate::pipeline`]), upload the k+m shards in parallel, while the next segment is read
//! and sealed — at most [`SEGMENTS_IN_FLIGHT`] segments are held, whatever the object's size.
//! Then every holder gets the manifest with the request to seal its shards and signs a receipt,
//! and the result is the `PutObject` payload, which the caller submits; the object exists once
//! that transaction is final. Any holder failing makes the PUT fail with its name: nothing is
//! committed, and what was uploaded is garbage the holders collect.
//!
//! **Staged PUT** ([`Staged`], [`stage_segment`], [`finish_staged`]): the same steps spread over
//! calls — a multipart upload seals and uploads segments as its parts arrive and the manifest
//! and seals come at its completion; [`keep_staged`] keeps a slow upload's shards on its holders.
//!
//! **GET** ([`get_object`]): the manifest from the first holder that has it, checked against the
//! ledger's root; then, per segment, shards from the data holders plus one more (a hedge), the
//! first k good ones decoded and decrypted; a holder that fails or serves bytes that fail their
//! hash is replaced by the next one, and one that is silent for [`HEDGE_AFTER`] gets company. Range reads fetch only the segments they cover.

use crate::meta::ObjectMeta;
use crate::pipeline::{ObjectError, SEGMENT_PLAIN_BYTES, SegmentOpener, SegmentSealer, ShardHash};
use archipel_crypto::{DataKey, Identity, WrapKey};
use archipel_erasure::Segments;
use archipel_ledger::Hash;
use archipel_ledger::storage::{
    BucketRecord, Manifest, ObjectPut, ObjectRecord, ReceiptTerms, ShardHolder, WRAPPED_KEY_BYTES, object_id,
    shard_bytes_per_holder,
};
use archipel_placement::Candidate;
use archipel_types::NodeId;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use md5::Digest as _;
use std::ops::Range;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A GET asks one more holder when no shard arrived for this long.
pub const HEDGE_AFTER: std::time::Duration = std::time::Duration::from_millis(1500);

/// Segments sealed and uploading at once during a PUT.
pub const SEGMENTS_IN_FLIGHT: usize = 2;

/// A node holding (or about to hold) shards, and where to reach it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    /// The node.
    pub node: NodeId,
    /// Its API base URL.
    pub url: String,
}

/// What entitles a writer to store and seal shards of a version on a holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The uploader of a new version of `object`: it shows the `nonce` that, with its key and
    /// `object`, hashes to the version ([`archipel_ledger::storage::version_id`]).
    Owner {
        /// The object (hash of bucket and key).
        object: Hash,
        /// The nonce the version was made from.
        nonce: [u8; 32],
    },
    /// A repair of the version the ledger lists for `object`: the holder accepts only the
    /// manifest with the ledger's root and shards with that manifest's hashes.
    Committed {
        /// The object (hash of bucket and key).
        object: Hash,
    },
}

impl Claim {
    /// The object the claim is for.
    pub fn object(&self) -> Hash {
        match self {
            Claim::Owner { object, .. } | Claim::Committed { object } => *object,
        }
    }

    /// As sent in [`CLAIM_HEADER`]: the object's hash, then `.` and the nonce for an owner.
    pub fn to_header(&self) -> String {
        match self {
            Claim::Owner { object, nonce } => format!("{object}.{}", hex::encode(nonce)),
            Claim::Committed { object } => object.to_string(),
        }
    }

    /// Parses [`Claim::to_header`].
    pub fn from_header(s: &str) -> Result<Claim, String> {
        let bad = || {
            format!(
                "{CLAIM_HEADER} must be the object's 64-hex hash, then `.` and the 64-hex version nonce for an upload"
            )
        };
        let (object, nonce) = match s.split_once('.') {
            Some((o, n)) => (o, Some(n)),
            None => (s, None),
        };
        let object: Hash = object.parse().map_err(|_| bad())?;
        match nonce {
            None => Ok(Claim::Committed { object }),
            Some(n) => {
                let mut nonce = [0u8; 32];
                hex::decode_to_slice(n, &mut nonce).map_err(|_| bad())?;
                Ok(Claim::Owner { object, nonce })
            }
        }
    }
}

/// Header carrying a write's [`Claim`].
pub const CLAIM_HEADER: &str = "x-archipel-claim";

/// Why a transfer with one holder failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TransferError {
    /// What went wrong, for the user.
    pub message: String,
    /// Whether the holder said it is full.
    pub full: bool,
    /// The error code the holder answered with (`shard_not_found`, `shard_corrupt`, `data_busy`…);
    /// `None` when it did not answer (unreachable, timed out, cut off).
    pub code: Option<String>,
}

impl TransferError {
    /// Whether the holder itself said it cannot serve the shard: it does not have it, or its copy
    /// failed its hash. A busy, rate-limited or unreachable holder has said nothing of the kind.
    pub fn holder_lacks_shard(&self) -> bool {
        matches!(self.code.as_deref(), Some("shard_not_found" | "shard_corrupt"))
    }
}

/// A holder's seal: its receipt for one shard index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// Bytes of its shards.
    pub shard_bytes: u64,
    /// The manifest root it checked.
    pub manifest_root: Hash,
    /// Its signature over the `ReceiptTerms`.
    pub receipt: [u8; 64],
    /// When the receipt expires.
    pub expires_ms: u64,
}

/// Moving shards to and from holders.
#[allow(async_fn_in_trait)]
pub trait Shards: Send + Sync + 'static {
    /// Stores one shard on `holder`.
    #[allow(clippy::too_many_arguments)] // where the shard goes, the writer's claim, the bytes and their hash
    fn put_shard(
        &self,
        holder: &Holder,
        version: &Hash,
        claim: &Claim,
        index: u8,
        segment: u64,
        bytes: Bytes,
        hash: ShardHash,
    ) -> impl Future<Output = Result<(), TransferError>> + Send;
    /// Stores the manifest on `holder`.
    fn put_manifest(
        &self,
        holder: &Holder,
        version: &Hash,
        claim: &Claim,
        bytes: Bytes,
    ) -> impl Future<Output = Result<(), TransferError>> + Send;
    /// Asks `holder` to seal its shard `index` of `version`, stored at the claim's object (the
    /// hash of bucket and key), and sign the receipt for the object's holder `generation`;
    /// what `with` carries is stored first.
    fn seal(
        &self,
        holder: &Holder,
        version: &Hash,
        claim: &Claim,
        index: u8,
        generation: u32,
        with: SealWith,
    ) -> impl Future<Output = Result<Sealed, TransferError>> + Send;
    /// Stores and seals on `holder` its part of a batch of new one-segment objects
    /// ([`crate::batch`]), answering one receipt for all of it.
    fn seal_batch(
        &self,
        holder: &Holder,
        items: Vec<crate::batch::SealItem>,
    ) -> impl Future<Output = Result<crate::batch::BatchSealed, TransferError>> + Send;
    /// Reads the manifest from `holder`.
    fn get_manifest(
        &self,
        holder: &Holder,
        version: &Hash,
    ) -> impl Future<Output = Result<Vec<u8>, TransferError>> + Send;
    /// Reads one shard from `holder`.
    fn get_shard(
        &self,
        holder: &Holder,
        version: &Hash,
        index: u8,
        segment: u64,
    ) -> impl Future<Output = Result<Vec<u8>, TransferError>> + Send;
}

/// What a seal call carries, saving the calls that would store it first.
#[derive(Clone, Debug, Default)]
pub struct SealWith {
    /// The manifest, stored as [`Shards::put_manifest`] does.
    pub manifest: Option<Bytes>,
    /// The holder's shard of segment 0 (for an object of one segment: the holder's whole share),
    /// stored after the manifest and checked against the hash it lists. Needs `manifest`.
    pub shard: Option<Bytes>,
}

/// The largest object a bucket with `code` holds: its manifest (32 bytes per shard of every
/// segment) must fit the [`archipel_ledger::storage::MAX_MANIFEST_BYTES`] a holder stores, and
/// the ledger's [`archipel_ledger::storage::MAX_OBJECT_BYTES`] bounds every object.
pub fn max_object_bytes(code: archipel_types::ErasureCode) -> u64 {
    use archipel_ledger::storage::{MANIFEST_OVERHEAD_BYTES, MAX_MANIFEST_BYTES, MAX_OBJECT_BYTES};
    let room = (MAX_MANIFEST_BYTES - MANIFEST_OVERHEAD_BYTES) as u64;
    (room / (32 * code.total() as u64) * SEGMENT_PLAIN_BYTES).min(MAX_OBJECT_BYTES)
}

/// Refuses an object too large for the manifest a holder stores (its shard hashes of every
/// segment), before anything is sent.
pub fn check_manifest_fits(size: u64, code: archipel_types::ErasureCode) -> Result<(), TransferFailed> {
    use archipel_ledger::storage::MAX_MANIFEST_BYTES;
    let max = max_object_bytes(code);
    if size > max {
        return Err(TransferFailed::Io(format!(
            "an object of {size} bytes is too large for code {code}: its manifest would pass the {MAX_MANIFEST_BYTES} \
             bytes a holder stores; with this code an object is at most {max} bytes (split it, or use a bucket with \
             fewer shards per segment)"
        )));
    }
    Ok(())
}

/// Errors of a PUT or GET.
#[derive(Debug, thiserror::Error)]
pub enum TransferFailed {
    /// No placement: the bucket's policy cannot be met by the live nodes with room.
    #[error("cannot place the object: {0}")]
    Placement(archipel_placement::PlacementError),
    /// One holder failed.
    #[error("holder {} ({url}) failed: {error} — retry the PUT; its shards will be placed again", node.short())]
    Holder {
        /// The node.
        node: NodeId,
        /// Its URL.
        url: String,
        /// What it said.
        error: TransferError,
    },
    /// A holder's receipt does not verify.
    #[error("holder {} sent a receipt that does not verify: it is not counted; retry the PUT", .0.short())]
    BadReceipt(NodeId),
    /// Reading the source or writing the destination failed.
    #[error("{0}")]
    Io(String),
    /// The pipeline failed (a segment could not be decoded or opened).
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// The object's manifest could not be read from any holder, or does not match the ledger.
    #[error("no holder served the manifest of this object matching the ledger's root: {0}")]
    Manifest(String),
    /// The data key does not open with this key.
    #[error(transparent)]
    Key(#[from] archipel_crypto::ObjectCryptoError),
    /// The source ended before its announced size.
    #[error("the source ended after {read} of {size} bytes: it changed while being read")]
    ShortSource {
        /// Bytes read.
        read: u64,
        /// Bytes announced.
        size: u64,
    },
}

// By hand, not `#[from]`: that would also make the placement error this one's source, and error
// chains would print its text twice.
impl From<archipel_placement::PlacementError> for TransferFailed {
    fn from(e: archipel_placement::PlacementError) -> Self {
        TransferFailed::Placement(e)
    }
}

impl TransferFailed {
    /// The holder to blame, if one node is, with what it did (without the advice to retry): a
    /// client that retries itself leaves that node out of its next attempt.
    pub fn holder_fault(&self) -> Option<(NodeId, String)> {
        match self {
            TransferFailed::Holder { node, url, error } => {
                Some((*node, format!("holder {} ({url}) failed: {error}", node.short())))
            }
            TransferFailed::BadReceipt(node) => {
                Some((*node, format!("holder {} sent a receipt that does not verify", node.short())))
            }
            _ => None,
        }
    }
}

/// What a PUT needs to know besides the data.
#[derive(Clone, Debug)]
pub struct PutPlan {
    /// The bucket, as the ledger records it.
    pub bucket: BucketRecord,
    /// The key.
    pub key: String,
    /// The object's size (read exactly this many bytes).
    pub size: u64,
    /// Nodes that may receive shards now, with their URLs.
    pub candidates: Vec<(Candidate, String)>,
    /// The network (genesis hash): receipts are bound to it.
    pub network: Hash,
    /// The ETag to record; `None`: the MD5 of the content, in hex (S3's ETag of a single-part upload).
    pub etag: Option<String>,
    /// Metadata sealed into the manifest (an empty object has no manifest, so none is kept).
    pub meta: ObjectMeta,
}

/// A fresh version of `object` for `owner`, with its nonce and the claim that proves it is theirs.
fn new_version(owner: &NodeId, object: Hash) -> (Hash, Hash, Claim) {
    let mut nonce = [0u8; 32];
    rand::fill(&mut nonce);
    (archipel_ledger::storage::version_id(owner, &object, &nonce), Hash(nonce), Claim::Owner { object, nonce })
}

pub(crate) fn holder_failed(h: &Holder, error: TransferError) -> TransferFailed {
    TransferFailed::Holder { node: h.node, url: h.url.clone(), error }
}

/// What every PUT starts with: a fresh version and data key, the manifest without its segments
/// yet, and the holders placement chooses for the version.
struct Begun {
    version: Hash,
    nonce: Hash,
    claim: Claim,
    data_key: DataKey,
    manifest: Manifest,
    holders: Vec<Holder>,
    per_holder: u64,
}

fn begin_put(plan: &PutPlan, owner: &Identity) -> Result<Begun, TransferFailed> {
    let code = plan.bucket.policy.code;
    let object = object_id(&plan.bucket.name, &plan.key);
    let (version, nonce, claim) = new_version(&owner.node_id(), object);
    let data_key = DataKey::generate()?;
    let wrapped_key = WrapKey::for_owner(owner).wrap(&data_key, &version.0)?;
    let segments = Segments::new(plan.size, SEGMENT_PLAIN_BYTES);
    let per_holder = shard_bytes_per_holder(code, plan.size, SEGMENT_PLAIN_BYTES);
    let manifest = Manifest {
        version,
        size: plan.size,
        segment_bytes: SEGMENT_PLAIN_BYTES,
        code,
        wrapped_key,
        segments: Vec::with_capacity(segments.count() as usize),
        meta: plan.meta.seal(&data_key, &version.0).map_err(|e| TransferFailed::Io(e.to_string()))?,
    };
    let holders = if plan.size == 0 {
        vec![]
    } else {
        let candidates: Vec<Candidate> = plan.candidates.iter().map(|(c, _)| c.clone()).collect();
        let nodes = archipel_placement::place(&plan.bucket.policy, &candidates, &version.0, per_holder)?;
        nodes
            .iter()
            .map(|n| Holder {
                node: *n,
                url: plan.candidates.iter().find(|(c, _)| c.node == *n).map(|(_, u)| u.clone()).unwrap_or_default(),
            })
            .collect()
    };
    Ok(Begun { version, nonce, claim, data_key, manifest, holders, per_holder })
}

impl Begun {
    /// The payload for `plan` once the manifest is complete, holders without receipts yet.
    fn payload(&self, plan: &PutPlan, etag: String) -> ObjectPut {
        ObjectPut {
            bucket: plan.bucket.name.clone(),
            key: plan.key.clone(),
            version: self.version,
            nonce: self.nonce,
            size: plan.size,
            segment_bytes: SEGMENT_PLAIN_BYTES,
            manifest_root: self.manifest.root(),
            etag,
            holders: vec![],
        }
    }
}

/// An object of one segment, encrypted, coded and placed, before any call to its holders: what
/// [`seal_single`] sends to each holder in one call, or [`crate::batch`] with other objects'.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The `PutObject` payload, its holders without receipts yet.
    pub put: ObjectPut,
    /// The uploader's claim on the version.
    pub claim: Claim,
    /// The holders, in shard order.
    pub holders: Vec<Holder>,
    /// The manifest, encoded.
    pub manifest: Bytes,
    /// Shard `i`, for holder `i`.
    pub shards: Vec<Bytes>,
    /// Bytes each holder keeps.
    pub per_holder: u64,
}

/// Prepares `data` (exactly `plan.size` bytes, one segment at most, not empty) as a new version
/// of `plan.key`, encrypted for `owner`.
pub fn prepare_single(plan: &PutPlan, owner: &Identity, mut data: Vec<u8>) -> Result<Prepared, TransferFailed> {
    if plan.size == 0 || plan.size > SEGMENT_PLAIN_BYTES || data.len() as u64 != plan.size {
        return Err(TransferFailed::Io(format!(
            "{} bytes for an object of {} in one segment of at most {SEGMENT_PLAIN_BYTES}",
            data.len(),
            plan.size
        )));
    }
    let mut b = begin_put(plan, owner)?;
    let etag = plan.etag.clone().unwrap_or_else(|| {
        let mut h = md5::Md5::new();
        h.update(&data);
        etag_of(h)
    });
    let mut sealer = SegmentSealer::new(&b.data_key, &b.version.0, plan.bucket.policy.code);
    data.reserve(sealer.buffer_capacity(data.len()).saturating_sub(data.len()));
    let sealed = sealer.seal(0, &mut data)?;
    let shards = (0..plan.bucket.policy.code.total())
        .map(|i| Bytes::copy_from_slice(sealed.shard(i).unwrap_or_default()))
        .collect();
    b.manifest.segments.push(sealed.hashes.clone());
    drop(sealed);
    let mut put = b.payload(plan, etag);
    put.holders = b.holders.iter().map(|h| ShardHolder { node: h.node, receipt: [0; 64], expires_ms: 0 }).collect();
    Ok(Prepared {
        put,
        claim: b.claim,
        holders: b.holders,
        manifest: Bytes::from(b.manifest.to_bytes()),
        shards,
        per_holder: b.per_holder,
    })
}

/// Sends each holder of `p` its shard with the manifest and the request to seal it, in one call
/// each; returns the payload with every receipt, each checked.
pub async fn seal_single<S: Shards>(shards: &S, p: &Prepared, network: &Hash) -> Result<ObjectPut, TransferFailed> {
    let manifest = Manifest::from_bytes(&p.manifest).map_err(TransferFailed::Io)?;
    let receipts =
        seal_holders(shards, &p.holders, &p.claim, &manifest, p.per_holder, network, Some(p.shards.clone())).await?;
    Ok(ObjectPut { holders: receipts, ..p.put.clone() })
}

/// Puts `source` (exactly `plan.size` bytes) as a new version of `plan.key`, encrypted for
/// `owner`; returns the `PutObject` payload to submit. `progress` is called with the plaintext
/// bytes uploaded so far. The source is read a segment at a time as the uploads go (a file, a
/// request body streaming in), so memory stays a few segments whatever the size.
pub async fn put_object<S: Shards>(
    shards: Arc<S>,
    plan: &PutPlan,
    owner: &Identity,
    mut source: impl AsyncRead + Unpin,
    mut progress: impl FnMut(u64),
) -> Result<ObjectPut, TransferFailed> {
    if plan.size > 0 && plan.size <= SEGMENT_PLAIN_BYTES {
        // One segment: read whole, then one call per holder.
        let data = read_exactly(&mut source, 0, plan.size, plan.size).await?;
        let p = prepare_single(plan, owner, data)?;
        let put = seal_single(&*shards, &p, &plan.network).await?;
        progress(plan.size);
        return Ok(put);
    }
    let code = plan.bucket.policy.code;
    check_manifest_fits(plan.size, code)?;
    let b = begin_put(plan, owner)?;
    if plan.size == 0 {
        return Ok(b.payload(plan, plan.etag.clone().unwrap_or_else(|| etag_of(md5::Md5::new()))));
    }
    let Begun { version, nonce, claim, data_key, mut manifest, holders, per_holder } = b;
    let segments = Segments::new(plan.size, SEGMENT_PLAIN_BYTES);
    let mut content_hash = md5::Md5::new();
    let mut sealer = SegmentSealer::new(&data_key, &version.0, code);
    // A JoinSet aborts the uploads still running when an error returns early.
    let mut in_flight: tokio::task::JoinSet<Result<(), TransferFailed>> = tokio::task::JoinSet::new();
    let mut done = 0u64;
    for s in 0..segments.count() {
        let range = segments.range(s);
        let len = range.end - range.start;
        let mut buf = read_exactly(&mut source, range.start, len, plan.size).await?;
        if plan.etag.is_none() {
            content_hash.update(&buf);
        }
        buf.reserve(sealer.buffer_capacity(buf.len()).saturating_sub(buf.len()));
        let sealed = sealer.seal(s, &mut buf)?;
        let parts: Vec<(u8, Bytes, ShardHash)> = (0..code.total())
            .map(|i| (i as u8, Bytes::copy_from_slice(sealed.shard(i).unwrap_or_default()), sealed.hashes[i]))
            .collect();
        manifest.segments.push(sealed.hashes.clone());
        drop(sealed);
        while in_flight.len() >= SEGMENTS_IN_FLIGHT {
            finish(in_flight.join_next().await)?;
            done += SEGMENT_PLAIN_BYTES.min(plan.size - done);
            progress(done);
        }
        in_flight.spawn(upload_segment(shards.clone(), holders.clone(), version, claim, s, parts));
    }
    while let Some(r) = in_flight.join_next().await {
        finish(Some(r))?;
        done += SEGMENT_PLAIN_BYTES.min(plan.size - done);
        progress(done);
    }

    let receipts = seal_holders(&*shards, &holders, &claim, &manifest, per_holder, &plan.network, None).await?;
    progress(plan.size);
    Ok(ObjectPut {
        bucket: plan.bucket.name.clone(),
        key: plan.key.clone(),
        version,
        nonce,
        size: plan.size,
        segment_bytes: SEGMENT_PLAIN_BYTES,
        manifest_root: manifest.root(),
        etag: plan.etag.clone().unwrap_or_else(|| etag_of(content_hash)),
        holders: receipts,
    })
}

/// Reads exactly `len` bytes of the source, which is at byte `at` of an object of `size`.
pub(crate) async fn read_exactly(
    source: &mut (impl AsyncRead + Unpin),
    at: u64,
    len: u64,
    size: u64,
) -> Result<Vec<u8>, TransferFailed> {
    let mut buf = vec![0; len as usize];
    let mut read = 0;
    while read < buf.len() {
        match source.read(&mut buf[read..]).await {
            Ok(0) => return Err(TransferFailed::ShortSource { read: at + read as u64, size }),
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransferFailed::Io(format!("reading the source: {e}"))),
        }
    }
    Ok(buf)
}

/// Uploads one segment's k+m shards `(index, bytes, hash)` to their holders, in parallel.
async fn upload_segment<S: Shards>(
    shards: Arc<S>,
    holders: Vec<Holder>,
    version: Hash,
    claim: Claim,
    segment: u64,
    parts: Vec<(u8, Bytes, ShardHash)>,
) -> Result<(), TransferFailed> {
    let uploads = parts.into_iter().map(|(i, bytes, hash)| {
        let h = holders[usize::from(i)].clone();
        let t = shards.clone();
        async move { t.put_shard(&h, &version, &claim, i, segment, bytes, hash).await.map_err(|e| holder_failed(&h, e)) }
    });
    futures::future::try_join_all(uploads).await.map(drop)
}

/// Asks every holder to seal its shards of `manifest`'s version (storing the manifest first, and
/// for an object of one segment its shard, from `single`, in the same call), and checks each
/// receipt against the terms of the write.
async fn seal_holders<S: Shards>(
    shards: &S,
    holders: &[Holder],
    claim: &Claim,
    manifest: &Manifest,
    per_holder: u64,
    network: &Hash,
    single: Option<Vec<Bytes>>,
) -> Result<Vec<ShardHolder>, TransferFailed> {
    let root = manifest.root();
    let version = manifest.version;
    let manifest_bytes = Bytes::from(manifest.to_bytes());
    let seals = holders.iter().enumerate().map(|(i, h)| {
        let with = SealWith {
            manifest: Some(manifest_bytes.clone()),
            shard: single.as_ref().and_then(|parts| parts.get(i)).cloned(),
        };
        async move {
            let sealed = shards.seal(h, &version, claim, i as u8, 0, with).await.map_err(|e| holder_failed(h, e))?;
            let terms = ReceiptTerms {
                object: claim.object(),
                version,
                generation: 0,
                index: i as u8,
                manifest_root: root,
                shard_bytes: per_holder,
                expires_ms: sealed.expires_ms,
            };
            if !terms.verify(network, &h.node, &sealed.receipt) {
                return Err(TransferFailed::BadReceipt(h.node));
            }
            Ok::<_, TransferFailed>(ShardHolder {
                node: h.node,
                receipt: sealed.receipt,
                expires_ms: sealed.expires_ms,
            })
        }
    });
    futures::future::try_join_all(seals).await
}

/// A version written a segment at a time across calls — a multipart upload streaming its parts
/// in as they arrive — with what the writer needs between its first segment and its seal: the
/// version and its nonce, the data key wrapped for the owner, and the holders, chosen once at
/// the start. Saved by the caller (a gateway keeps it with the upload) and used again after a
/// restart.
///
/// The holders keep unsealed shards while something is written to the version at least every
/// 10 minutes: [`keep_staged`] writes a provisional manifest for that when parts are slow.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Staged {
    /// The bucket, as the ledger recorded it at the start.
    pub bucket: BucketRecord,
    /// The key.
    pub key: String,
    /// The version.
    pub version: Hash,
    /// The nonce the version was made from.
    pub nonce: Hash,
    /// The data key, wrapped for the owner.
    pub wrapped_key: Vec<u8>,
    /// The k+m holders, by shard index.
    pub holders: Vec<Holder>,
}

impl Staged {
    /// A new version of `bucket/key` for `owner`, placed on `candidates` (the object's size is
    /// not known yet: holders short of space refuse shards as they come).
    pub fn begin(
        bucket: &BucketRecord,
        key: &str,
        candidates: &[(Candidate, String)],
        owner: &Identity,
    ) -> Result<Staged, TransferFailed> {
        let object = object_id(&bucket.name, key);
        let (version, nonce, _) = new_version(&owner.node_id(), object);
        let data_key = DataKey::generate()?;
        let wrapped_key = WrapKey::for_owner(owner).wrap(&data_key, &version.0)?.to_vec();
        let only: Vec<Candidate> = candidates.iter().map(|(c, _)| c.clone()).collect();
        let nodes = archipel_placement::place(&bucket.policy, &only, &version.0, 0)?;
        let holders = nodes
            .iter()
            .map(|n| Holder {
                node: *n,
                url: candidates.iter().find(|(c, _)| c.node == *n).map(|(_, u)| u.clone()).unwrap_or_default(),
            })
            .collect();
        Ok(Staged { bucket: bucket.clone(), key: key.to_string(), version, nonce, wrapped_key, holders })
    }

    fn claim(&self) -> Claim {
        Claim::Owner { object: object_id(&self.bucket.name, &self.key), nonce: self.nonce.0 }
    }

    fn wrapped(&self) -> Result<[u8; WRAPPED_KEY_BYTES], TransferFailed> {
        self.wrapped_key
            .as_slice()
            .try_into()
            .map_err(|_| TransferFailed::Io("the staged upload's wrapped key is damaged".into()))
    }

    fn data_key(&self, owner: &Identity) -> Result<DataKey, TransferFailed> {
        Ok(WrapKey::for_owner(owner).unwrap(&self.wrapped()?, &self.version.0)?)
    }

    fn manifest(
        &self,
        owner: &Identity,
        size: u64,
        segments: Vec<Vec<ShardHash>>,
        meta: &ObjectMeta,
    ) -> Result<Manifest, TransferFailed> {
        let data_key = self.data_key(owner)?;
        let wrapped_key = self.wrapped()?;
        Ok(Manifest {
            version: self.version,
            size,
            segment_bytes: SEGMENT_PLAIN_BYTES,
            code: self.bucket.policy.code,
            wrapped_key,
            segments,
            meta: meta.seal(&data_key, &self.version.0).map_err(|e| TransferFailed::Io(e.to_string()))?,
        })
    }
}

/// Seals segment `segment` of a staged version (`plain`: [`SEGMENT_PLAIN_BYTES`], or fewer for
/// the last) and uploads its k+m shards; returns their hashes, for the manifest.
pub async fn stage_segment<S: Shards>(
    shards: Arc<S>,
    staged: &Staged,
    owner: &Identity,
    segment: u64,
    plain: &[u8],
) -> Result<Vec<ShardHash>, TransferFailed> {
    let code = staged.bucket.policy.code;
    let data_key = staged.data_key(owner)?;
    let mut sealer = SegmentSealer::new(&data_key, &staged.version.0, code);
    let mut buf = Vec::with_capacity(sealer.buffer_capacity(plain.len()));
    buf.extend_from_slice(plain);
    let sealed = sealer.seal(segment, &mut buf)?;
    let hashes = sealed.hashes.clone();
    let parts: Vec<(u8, Bytes, ShardHash)> = (0..code.total())
        .map(|i| (i as u8, Bytes::copy_from_slice(sealed.shard(i).unwrap_or_default()), sealed.hashes[i]))
        .collect();
    drop(sealed);
    upload_segment(shards, staged.holders.clone(), staged.version, staged.claim(), segment, parts).await?;
    Ok(hashes)
}

/// Keeps a staged version's shards on its holders while parts are slow to come: a provisional
/// manifest of what is staged so far, written to every holder (a write, which restarts the
/// holders' 10-minute wait before collecting an unsealed version).
pub async fn keep_staged<S: Shards>(
    shards: &S,
    staged: &Staged,
    owner: &Identity,
    size: u64,
    segments: Vec<Vec<ShardHash>>,
) -> Result<(), TransferFailed> {
    let mut provisional = staged.manifest(owner, size, segments, &ObjectMeta::default())?;
    // Random bytes where the sealed metadata goes: each keep-alive is a new manifest, hence a
    // write (the same bytes again would be answered as held, and restart nothing).
    let mut tag = vec![0u8; 16];
    rand::fill(&mut tag[..]);
    provisional.meta = tag;
    let manifest = Bytes::from(provisional.to_bytes());
    let claim = staged.claim();
    let writes = staged.holders.iter().map(|h| {
        let manifest = manifest.clone();
        async move { shards.put_manifest(h, &staged.version, &claim, manifest).await.map_err(|e| holder_failed(h, e)) }
    });
    futures::future::try_join_all(writes).await.map(drop)
}

/// Seals a staged version of `size` bytes whose `segments` were all staged, with `meta` and
/// `etag`; returns the `PutObject` payload to submit.
#[allow(clippy::too_many_arguments)] // the staged version, its contents and what is recorded
pub async fn finish_staged<S: Shards>(
    shards: &S,
    staged: &Staged,
    owner: &Identity,
    size: u64,
    segments: Vec<Vec<ShardHash>>,
    meta: &ObjectMeta,
    network: &Hash,
    etag: String,
) -> Result<ObjectPut, TransferFailed> {
    let code = staged.bucket.policy.code;
    let expected = Segments::new(size, SEGMENT_PLAIN_BYTES).count();
    if segments.len() as u64 != expected {
        return Err(TransferFailed::Io(format!(
            "a staged object of {size} bytes has {expected} segments, {} were staged",
            segments.len()
        )));
    }
    let manifest = staged.manifest(owner, size, segments, meta)?;
    let holders = if size == 0 {
        // No shards: an empty object has no holders (as a PUT of one).
        vec![]
    } else {
        seal_holders(
            shards,
            &staged.holders,
            &staged.claim(),
            &manifest,
            shard_bytes_per_holder(code, size, SEGMENT_PLAIN_BYTES),
            network,
            None,
        )
        .await?
    };
    Ok(ObjectPut {
        bucket: staged.bucket.name.clone(),
        key: staged.key.clone(),
        version: staged.version,
        nonce: staged.nonce,
        size,
        segment_bytes: SEGMENT_PLAIN_BYTES,
        manifest_root: manifest.root(),
        etag,
        holders,
    })
}

/// S3's ETag of a single-part object: the MD5 of its content, in hex (clients such as rclone
/// compare it with their own).
fn etag_of(h: md5::Md5) -> String {
    hex::encode(h.finalize())
}

fn finish(r: Option<Result<Result<(), TransferFailed>, tokio::task::JoinError>>) -> Result<(), TransferFailed> {
    match r {
        None => Ok(()),
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(TransferFailed::Io(format!("an upload task failed: {e}"))),
    }
}

/// Reads and checks the manifest of `object` from the first holder that serves a good one.
pub async fn fetch_manifest<S: Shards>(
    shards: &S,
    object: &ObjectRecord,
    holders: &[Holder],
) -> Result<Manifest, TransferFailed> {
    let mut why = Vec::new();
    for h in holders {
        match shards.get_manifest(h, &object.version).await {
            Ok(bytes) => match Manifest::from_bytes(&bytes) {
                Ok(m) if m.root() == object.manifest_root => {
                    // The root is the owner's word; that the manifest fits the record is
                    // checked too, so nothing reading it indexes past what it has.
                    let fits = m.version == object.version
                        && m.code == object.code
                        && m.size == object.size
                        && m.segment_bytes == object.segment_bytes
                        && m.segments.len() as u64 == object.segments()
                        && (object.size == 0 || object.holders.len() == m.code.total())
                        && m.segments.iter().all(|hashes| hashes.len() == m.code.total());
                    if !fits {
                        return Err(TransferFailed::Manifest(format!(
                            "the manifest committed for {}/{} does not fit its ledger record (code, size, segments or \
                             holders differ): the object cannot be read or repaired",
                            object.bucket, object.key
                        )));
                    }
                    return Ok(m);
                }
                Ok(_) => why.push(format!("{}: a manifest that does not match the ledger", h.node.short())),
                Err(e) => why.push(format!("{}: {e}", h.node.short())),
            },
            Err(e) => why.push(format!("{}: {e}", h.node.short())),
        }
    }
    Err(TransferFailed::Manifest(why.join("; ")))
}

/// An object ready to read: its manifest checked against the ledger, its data key and metadata.
#[derive(Debug)]
pub struct Opened {
    /// The manifest (`None` for an empty object, which has none).
    manifest: Option<Manifest>,
    key: Option<DataKey>,
    /// The object's metadata.
    pub meta: ObjectMeta,
}

/// Reads the manifest of `object` from its holders and opens its data key and metadata with the
/// owner's key.
pub async fn open_object<S: Shards>(
    shards: &S,
    object: &ObjectRecord,
    holders: &[Holder],
    owner: &Identity,
) -> Result<Opened, TransferFailed> {
    if object.size == 0 {
        return Ok(Opened { manifest: None, key: None, meta: ObjectMeta::default() });
    }
    let manifest = fetch_manifest(shards, object, holders).await?;
    let wrapped: &[u8; WRAPPED_KEY_BYTES] = &manifest.wrapped_key;
    let key = WrapKey::for_owner(owner).unwrap(wrapped, &object.version.0)?;
    let meta = ObjectMeta::open(&manifest.meta, &key, &object.version.0)
        .map_err(|e| TransferFailed::Manifest(e.to_string()))?;
    Ok(Opened { manifest: Some(manifest), key: Some(key), meta })
}

/// Opens `object` with its data key handed over by its owner (a job's module and inputs: the
/// providers are not the owner). A wrong key fails to open the metadata.
pub async fn open_object_with_key<S: Shards>(
    shards: &S,
    object: &ObjectRecord,
    holders: &[Holder],
    key: DataKey,
) -> Result<Opened, TransferFailed> {
    if object.size == 0 {
        return Ok(Opened { manifest: None, key: None, meta: ObjectMeta::default() });
    }
    let manifest = fetch_manifest(shards, object, holders).await?;
    let meta = ObjectMeta::open(&manifest.meta, &key, &object.version.0)
        .map_err(|e| TransferFailed::Manifest(format!("the data key given does not open this version: {e}")))?;
    Ok(Opened { manifest: Some(manifest), key: Some(key), meta })
}

impl Opened {
    /// The version's data key (none for an empty object), to hand over with a job.
    pub fn data_key(&self) -> Option<&DataKey> {
        self.key.as_ref()
    }
}

/// Reads `range` of `object` (all of it when `None`) into `out`; `holders[i]` holds shard `i`.
/// `progress` is called with the plaintext bytes written so far. Returns the holders whose
/// shards failed their hash check (to report for repair).
pub async fn get_object<S: Shards>(
    shards: &S,
    object: &ObjectRecord,
    holders: &[Holder],
    owner: &Identity,
    range: Option<Range<u64>>,
    out: impl AsyncWrite + Unpin,
    progress: impl FnMut(u64),
) -> Result<Vec<NodeId>, TransferFailed> {
    let opened = open_object(shards, object, holders, owner).await?;
    read_object(shards, object, holders, &opened, range, out, progress).await
}

/// [`get_object`] of an object already opened.
pub async fn read_object<S: Shards>(
    shards: &S,
    object: &ObjectRecord,
    holders: &[Holder],
    opened: &Opened,
    range: Option<Range<u64>>,
    mut out: impl AsyncWrite + Unpin,
    mut progress: impl FnMut(u64),
) -> Result<Vec<NodeId>, TransferFailed> {
    let range = range.unwrap_or(0..object.size);
    let range = range.start.min(object.size)..range.end.min(object.size);
    let (Some(manifest), Some(key)) = (&opened.manifest, &opened.key) else {
        return Ok(vec![]);
    };
    if range.is_empty() {
        return Ok(vec![]);
    }
    let mut opener = SegmentOpener::new(key, &object.version.0, manifest.code);
    let segments = Segments::new(object.size, manifest.segment_bytes);
    let k = usize::from(manifest.code.data);
    let mut bad_holders = Vec::new();
    let mut written = 0u64;
    for s in segments.covering(range.clone()) {
        let seg_range = segments.range(s);
        let hashes =
            manifest.segments.get(s as usize).ok_or_else(|| TransferFailed::Manifest("too few segments".into()))?;
        // Ask the data holders and one more; on each failure, the next holder.
        let mut order = (0..holders.len()).collect::<Vec<_>>().into_iter();
        let mut pending = FuturesUnordered::new();
        for i in order.by_ref().take((k + 1).min(holders.len())) {
            pending.push(fetch(shards, holders, &object.version, i, s, hashes));
        }
        let mut got: Vec<(usize, Vec<u8>)> = Vec::with_capacity(k);
        while got.len() < k {
            // A holder slower than the hedge delay gets company: the next holder is asked too.
            let next = match tokio::time::timeout(HEDGE_AFTER, pending.next()).await {
                Ok(next) => next,
                Err(_) => {
                    if let Some(more) = order.next() {
                        pending.push(fetch(shards, holders, &object.version, more, s, hashes));
                    }
                    continue;
                }
            };
            let Some((i, result)) = next else { break };
            match result {
                Ok(bytes) => got.push((i, bytes)),
                Err(bad_hash) => {
                    if bad_hash {
                        bad_holders.push(holders[i].node);
                    }
                    if let Some(next) = order.next() {
                        pending.push(fetch(shards, holders, &object.version, next, s, hashes));
                    }
                }
            }
        }
        drop(pending);
        let given: Vec<(usize, &[u8])> = got.iter().map(|(i, b)| (*i, b.as_slice())).collect();
        let plain_len = (seg_range.end - seg_range.start) as usize;
        let (plain, _) = opener.open(s, plain_len, &given, hashes)?;
        let from = range.start.max(seg_range.start) - seg_range.start;
        let to = range.end.min(seg_range.end) - seg_range.start;
        out.write_all(&plain[from as usize..to as usize])
            .await
            .map_err(|e| TransferFailed::Io(format!("writing: {e}")))?;
        written += to - from;
        progress(written);
    }
    out.flush().await.map_err(|e| TransferFailed::Io(format!("writing: {e}")))?;
    Ok(bad_holders)
}

/// One shard of segment `s` from holder `i`, checked against its hash: `Err(true)` when the
/// holder served wrong bytes, `Err(false)` when it did not answer.
async fn fetch<S: Shards>(
    shards: &S,
    holders: &[Holder],
    version: &Hash,
    i: usize,
    s: u64,
    hashes: &[ShardHash],
) -> (usize, Result<Vec<u8>, bool>) {
    let r = match shards.get_shard(&holders[i], version, i as u8, s).await {
        Ok(bytes) if hashes.get(i).is_some_and(|h| *h == crate::pipeline::shard_hash(&bytes)) => Ok(bytes),
        Ok(_) => Err(true),
        Err(_) => Err(false),
    };
    (i, r)
}
