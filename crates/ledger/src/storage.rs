//! Object storage on the ledger: buckets with placement policies, objects with their shard
//! holders, each node's stored bytes, and shard moves (repairs) — `CreateBucket`, `DeleteBucket`,
//! `PutObject`, `DeleteObject`, `MoveShards`.
//!
//! What the ledger records of an object is constant in size whatever the object's size:
//! - **One placement per object.** Shard `i` of every segment lives on holder `i`, so an object
//!   has k+m holders, all recorded on the ledger and each checked against the bucket's geofence
//!   when the object is put and whenever a shard moves.
//! - **The manifest's root.** The per-segment shard hashes (24 KiB for 1 GiB at 4+2) form the
//!   manifest, which every holder stores beside its shards; the ledger keeps its Merkle root, so
//!   anyone can check a manifest read from any holder.
//! - **Receipts.** Each holder signs, after fsync, that it holds its shard of every segment,
//!   checked against that root ([`receipt_bytes`]). A PUT is final only with all k+m receipts:
//!   a forged or missing receipt is refused, never counted as a copy.
//!
//! Each node's stored bytes (`stored/<node>`) are the sum of its shards' sizes; a PUT or move that
//! would exceed a node's declared capacity is refused, so a full node receives nothing.
//!
//! Repairs: a shard may move only away from a holder that is *unhealthy* in this state — gone
//! from the registry, or Down for at least `repair_grace_ms` of chain time — and only to a
//! registered storage node that is Up, has room, does not hold another shard of the object, is
//! inside the bucket's geofence, and signed a receipt for it. Anyone may submit the move (each
//! node computes the same repair duty from finalized state); nobody can move a healthy holder's
//! shard.
//!
//! Limits and what they are for: bucket names follow S3's rules (3–63 characters); object keys
//! are at most 1,024 bytes; an object at most 5 TiB in segments of 4 KiB to 64 MiB.

use crate::hash::Hash;
use crate::state::{LeaseStatus, Receipt, State, StateKey};
use crate::tx::TxError;
use archipel_crypto::{Identity, SignatureItem, TAG_BYTES, verify_signature_memo, verify_signatures_memo};
use archipel_placement::Candidate;
use archipel_types::{ErasureCode, NodeId, PlacementPolicy, Role};
use bytes::BufMut;
use commonware_codec::{Buf, EncodeSize, Error as CodecError, RangeCfg, Read, ReadExt, Write};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Reputation a holder loses for each failed audit (of [`archipel_placement::MAX_REPUTATION`]).
pub const AUDIT_PENALTY: u16 = 250;

/// The seed of an object's audit in `epoch`: who audits it, and which shard and segment.
pub fn audit_seed(version: &Hash, epoch: u64) -> [u8; 32] {
    Hash::of(&[b"archipel/audit/v1", &version.0, &epoch.to_be_bytes()]).0
}

/// Which shard index and segment of `object` its audit in `epoch` challenges.
pub fn audit_challenge(object: &ObjectRecord, epoch: u64) -> (u8, u64) {
    let seed = audit_seed(&object.version, epoch);
    let index = (u64::from(seed[0]) % object.holders.len().max(1) as u64) as u8;
    let segment = u64::from_be_bytes(seed[8..16].try_into().unwrap_or_default()) % object.segments().max(1);
    (index, segment)
}

/// Who audits the shards `holder` holds in `epoch`: one of the live storage nodes `live` (in id
/// order) other than `holder`, picked by a hash of holder and epoch. O(1), so a node finds the
/// holders it audits in O(holders); each holder has one auditor per epoch, and the pick moves
/// every epoch.
pub fn holder_auditor(holder: &NodeId, epoch: u64, live: &[NodeId]) -> Option<NodeId> {
    let at = live.binary_search(holder);
    let others = live.len() - usize::from(at.is_ok());
    if others == 0 {
        return None;
    }
    let seed = Hash::of(&[b"archipel/audit-holder/v1", holder.as_bytes(), &epoch.to_be_bytes()]);
    let mut pick = (u64::from_be_bytes(seed.0[..8].try_into().unwrap_or_default()) % others as u64) as usize;
    if let Ok(at) = at
        && pick >= at
    {
        pick += 1;
    }
    live.get(pick).copied()
}

/// [`State::auditor_of`] with the live storage nodes given (in id order).
pub fn auditor_among(object: &ObjectRecord, epoch: u64, live: &[NodeId]) -> Option<NodeId> {
    let (index, _) = audit_challenge(object, epoch);
    holder_auditor(object.holders.get(usize::from(index))?, epoch, live)
}

/// Signature namespace of shard receipts.
pub const RECEIPT_NAMESPACE: &[u8] = b"archipel/shard-receipt/v1";
/// Longest object key, in bytes (S3's limit).
pub const MAX_OBJECT_KEY_BYTES: usize = 1024;
/// Largest object (S3's limit).
pub const MAX_OBJECT_BYTES: u64 = 5 << 40;
/// Smallest plaintext segment.
pub const MIN_SEGMENT_BYTES: u64 = 4 << 10;
/// Largest plaintext segment (64 MiB of ciphertext with its tag).
pub const MAX_SEGMENT_BYTES: u64 = (64 << 20) - TAG_BYTES as u64;
/// Longest ETag.
pub const MAX_ETAG_BYTES: usize = 64;
/// Longest bucket name (S3's rule).
pub const MAX_BUCKET_NAME: usize = 63;
/// Bytes of a JSON placement policy in a `CreateBucket`.
const MAX_POLICY_JSON: usize = 4 * 1024;

/// Checks a bucket name against S3's rules: 3–63 characters of lowercase letters, digits, dots
/// and hyphens, starting and ending with a letter or digit, no `..`, not shaped like an IP address.
pub fn check_bucket_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = (3..=MAX_BUCKET_NAME).contains(&b.len())
        && b.iter().all(|c| alnum(c) || *c == b'.' || *c == b'-')
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && !name.contains("..")
        && name.parse::<std::net::Ipv4Addr>().is_err();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid bucket name {name:?}: use 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending \
             with a letter or digit (e.g. \"eu-docs\")"
        ))
    }
}

/// Checks an object key: 1 to 1,024 bytes of UTF-8 without control characters.
pub fn check_object_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_OBJECT_KEY_BYTES {
        return Err(format!("object key must be 1 to {MAX_OBJECT_KEY_BYTES} bytes, not {}", key.len()));
    }
    if key.chars().any(char::is_control) {
        return Err(format!("object key {key:?} contains a control character"));
    }
    Ok(())
}

/// The state key hash of a bucket name.
pub fn bucket_id(name: &str) -> Hash {
    Hash::of(&[b"archipel/bucket/v1", name.as_bytes()])
}

/// The state key hash of an object's name (bucket and key, length-prefixed).
pub fn object_id(bucket: &str, key: &str) -> Hash {
    Hash::of(&[b"archipel/object/v1", &[bucket.len() as u8], bucket.as_bytes(), key.as_bytes()])
}

/// An object version bound to the key that uploads it and the name it is uploaded for:
/// `BLAKE3(owner, object, nonce)` with a fresh random `nonce`. A holder accepts uploads and seals
/// for a version not yet on the ledger only from the key that shows the nonce, so nobody else can
/// write into, seal or take over another tenant's upload, and a version names one object only.
pub fn version_id(owner: &NodeId, object: &Hash, nonce: &[u8; 32]) -> Hash {
    Hash::of(&[b"archipel/version/v1", owner.as_bytes(), &object.0, nonce])
}

/// Bytes each holder stores for an object of `size` bytes cut into `segment_bytes` segments:
/// one shard of every encrypted segment (plaintext plus the GCM tag).
pub fn shard_bytes_per_holder(code: ErasureCode, size: u64, segment_bytes: u64) -> u64 {
    if size == 0 || segment_bytes == 0 {
        return 0;
    }
    let tag = TAG_BYTES as u64;
    let full = size / segment_bytes;
    let rest = size % segment_bytes;
    full.saturating_mul(code.shard_bytes(segment_bytes + tag)).saturating_add(if rest > 0 {
        code.shard_bytes(rest + tag)
    } else {
        0
    })
}

/// How many segments an object of `size` bytes has in segments of `segment_bytes`.
fn segment_count(size: u64, segment_bytes: u64) -> u64 {
    if segment_bytes == 0 { 0 } else { size.div_ceil(segment_bytes) }
}

/// A bucket as the ledger records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    /// Its name.
    pub name: String,
    /// The account that created it; it alone writes and deletes objects in it.
    pub owner: NodeId,
    /// Where its objects' shards may live and how they are spread.
    pub policy: PlacementPolicy,
    /// Height it was created at.
    pub created_height: u64,
    /// That block's time (Unix ms).
    #[serde(default)]
    pub created_ms: u64,
    /// Objects in it.
    pub objects: u64,
    /// Sum of its objects' sizes.
    pub bytes: u64,
    /// Sum of its objects' segments (for health reports without a pass over the objects).
    #[serde(default)]
    pub segments: u64,
}

/// An object as the ledger records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    /// Its bucket.
    pub bucket: String,
    /// Its key.
    pub key: String,
    /// This version's id, chosen at random by the writer: the associated data of its
    /// encryption and the name its shards are stored under.
    pub version: Hash,
    /// Plaintext bytes.
    pub size: u64,
    /// Plaintext bytes per segment (the last one fewer).
    pub segment_bytes: u64,
    /// The erasure code (the bucket's when it was put).
    pub code: ErasureCode,
    /// Merkle root of the manifest (every segment's shard hashes).
    pub manifest_root: Hash,
    /// The ETag S3 clients see.
    pub etag: String,
    /// `holders[i]` holds shard `i` of every segment.
    pub holders: Vec<NodeId>,
    /// Bytes each holder stores for it.
    pub shard_bytes: u64,
    /// Height and block time it was put at.
    pub created_height: u64,
    /// Block time it was put at (Unix ms).
    pub created_ms: u64,
    /// The holders' generation: 0 when put, one more after each `MoveShards` (receipts name it).
    #[serde(default)]
    pub generation: u32,
    /// Shard indices whose holder failed an audit: repaired like an unhealthy holder's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suspect: Vec<u8>,
}

impl ObjectRecord {
    /// How many segments.
    pub fn segments(&self) -> u64 {
        segment_count(self.size, self.segment_bytes)
    }
}

/// Bytes of a wrapped data key in a manifest (salt, key, tag).
pub const WRAPPED_KEY_BYTES: usize = archipel_crypto::WRAPPED_KEY_BYTES;
const MANIFEST_MAGIC: &[u8] = b"archipel/manifest/v1";
/// A manifest with sealed metadata: the v1 layout, then the metadata's length (u32) and bytes
/// between the wrapped key and the shard hashes.
const MANIFEST_MAGIC_V2: &[u8] = b"archipel/manifest/v2";

/// An object version's manifest: its layout, its data key wrapped for the owner, and the BLAKE3
/// hash of every shard of every segment. Every holder stores it beside its shards; the ledger
/// keeps its [`Manifest::root`], so a manifest read from any holder is checked before use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The version id.
    pub version: Hash,
    /// Plaintext bytes.
    pub size: u64,
    /// Plaintext bytes per segment.
    pub segment_bytes: u64,
    /// The erasure code.
    pub code: ErasureCode,
    /// The object's data key, wrapped for its owner.
    pub wrapped_key: [u8; WRAPPED_KEY_BYTES],
    /// `segments[s][i]`: the hash of shard `i` of segment `s`.
    pub segments: Vec<Vec<[u8; 32]>>,
    /// The object's metadata (content type, user metadata), sealed by the owner with the data
    /// key: opaque here, at most [`MAX_MANIFEST_META_BYTES`]. Empty: none (the v1 layout).
    pub meta: Vec<u8>,
}

/// Most bytes of sealed metadata a manifest carries.
pub const MAX_MANIFEST_META_BYTES: usize = 16 * 1024;

/// Most bytes of a manifest a holder stores (it reads a stored one whole to seal and serve it).
/// With 32 bytes per shard of every segment it bounds an object's size: with 8 MiB segments,
/// about 170 GiB at 4+2 and 21 GiB at the widest code, 32+16.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Bytes of a manifest besides its shard hashes, at most (layout, wrapped key, metadata).
pub const MANIFEST_OVERHEAD_BYTES: usize = 1024 + MAX_MANIFEST_META_BYTES;

impl Manifest {
    /// Ciphertext bytes of segment `s` (plaintext and the tag).
    pub fn cipher_len(&self, s: u64) -> u64 {
        let start = s.saturating_mul(self.segment_bytes);
        self.size.saturating_sub(start).min(self.segment_bytes) + TAG_BYTES as u64
    }

    /// Bytes of each shard of segment `s`.
    pub fn shard_len(&self, s: u64) -> u64 {
        self.code.shard_bytes(self.cipher_len(s))
    }

    /// The root the ledger records: the layout, the wrapped key and a Merkle tree over the
    /// segments' shard hashes.
    pub fn root(&self) -> Hash {
        let leaves: Vec<Hash> = self
            .segments
            .iter()
            .enumerate()
            .map(|(s, hashes)| {
                let mut h = blake3::Hasher::new();
                h.update(b"archipel/manifest-segment/v1");
                h.update(&(s as u64).to_be_bytes());
                for x in hashes {
                    h.update(x);
                }
                Hash(*h.finalize().as_bytes())
            })
            .collect();
        let segments = crate::merkle::root(&leaves);
        let layout: [&[u8]; 5] = [
            &self.version.0,
            &self.size.to_be_bytes(),
            &self.segment_bytes.to_be_bytes(),
            &[self.code.data, self.code.parity],
            &self.wrapped_key,
        ];
        if self.meta.is_empty() {
            Hash::of(&[&[MANIFEST_MAGIC][..], &layout, &[&segments.0[..]]].concat())
        } else {
            let meta = Hash::of(&[&self.meta]);
            Hash::of(&[&[MANIFEST_MAGIC_V2][..], &layout, &[&meta.0[..], &segments.0[..]]].concat())
        }
    }

    /// The manifest's bytes as stored on holders.
    pub fn to_bytes(&self) -> Vec<u8> {
        let shards: usize = self.segments.iter().map(Vec::len).sum();
        let mut out =
            Vec::with_capacity(MANIFEST_MAGIC.len() + 32 + 18 + WRAPPED_KEY_BYTES + 4 + self.meta.len() + shards * 32);
        out.extend_from_slice(if self.meta.is_empty() { MANIFEST_MAGIC } else { MANIFEST_MAGIC_V2 });
        out.extend_from_slice(&self.version.0);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.segment_bytes.to_be_bytes());
        out.extend_from_slice(&[self.code.data, self.code.parity]);
        out.extend_from_slice(&self.wrapped_key);
        if !self.meta.is_empty() {
            out.extend_from_slice(&(self.meta.len() as u32).to_be_bytes());
            out.extend_from_slice(&self.meta);
        }
        for hashes in &self.segments {
            for x in hashes {
                out.extend_from_slice(x);
            }
        }
        out
    }

    /// Decodes [`Manifest::to_bytes`], checking that its layout is one the ledger accepts and
    /// that it holds exactly one hash per shard of every segment.
    pub fn from_bytes(b: &[u8]) -> Result<Manifest, String> {
        let head = MANIFEST_MAGIC.len() + 32 + 18 + WRAPPED_KEY_BYTES;
        let with_meta = b.starts_with(MANIFEST_MAGIC_V2);
        if b.len() < head || !(with_meta || b.starts_with(MANIFEST_MAGIC)) {
            return Err("not an archipel manifest (v1 or v2)".into());
        }
        let mut at = MANIFEST_MAGIC.len();
        let mut take = |n: usize| {
            let part = b.get(at..at + n).unwrap_or_default();
            at += n;
            part
        };
        let version = Hash(take(32).try_into().map_err(|_| "short manifest")?);
        let size = u64::from_be_bytes(take(8).try_into().map_err(|_| "short manifest")?);
        let segment_bytes = u64::from_be_bytes(take(8).try_into().map_err(|_| "short manifest")?);
        let code_bytes = take(2);
        let code = ErasureCode::new(code_bytes[0], code_bytes[1]).map_err(|e| e.to_string())?;
        let wrapped_key: [u8; WRAPPED_KEY_BYTES] = take(WRAPPED_KEY_BYTES).try_into().map_err(|_| "short manifest")?;
        if size > MAX_OBJECT_BYTES || !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&segment_bytes) {
            return Err(format!("manifest layout out of bounds: {size} bytes in segments of {segment_bytes}"));
        }
        let meta = if with_meta {
            let len = u32::from_be_bytes(take(4).try_into().map_err(|_| "short manifest")?) as usize;
            if len == 0 || len > MAX_MANIFEST_META_BYTES {
                return Err(format!("manifest metadata of {len} bytes (1 to {MAX_MANIFEST_META_BYTES})"));
            }
            let meta = take(len);
            if meta.len() != len {
                return Err("short manifest".into());
            }
            meta.to_vec()
        } else {
            Vec::new()
        };
        let segments = size.div_ceil(segment_bytes);
        let total = code.total();
        let expected = (segments as usize).checked_mul(total * 32).ok_or("manifest too large")?;
        let rest = b.get(at..).unwrap_or_default();
        if rest.len() != expected {
            return Err(format!(
                "manifest lists {} bytes of shard hashes, its layout needs {expected} ({segments} segments of {total} shards)",
                rest.len()
            ));
        }
        let segments = rest
            .chunks_exact(total * 32)
            .map(|seg| seg.chunks_exact(32).map(|h| h.try_into().expect("32-byte chunks")).collect())
            .collect();
        Ok(Manifest { version, size, segment_bytes, code, wrapped_key, segments, meta })
    }
}

/// How long a holder's receipt is good for, from when it signs it (chain time, ms). The
/// collector keeps unlisted shards longer than this (`RECEIPT_TTL_MS` < the collector's
/// `COLLECT_AFTER`), so a receipt never vouches for shards already collected.
pub const RECEIPT_TTL_MS: u64 = 5 * 60_000;
/// Latest expiry the ledger accepts, from the block's time (clocks are a little apart).
pub const MAX_RECEIPT_TTL_MS: u64 = 10 * 60_000;

/// What a holder's receipt vouches for: it has fsynced its shard `index` of every segment of
/// object `version` stored at `object` (the hash of bucket and key), checked against the
/// manifest with root `manifest_root`, `shard_bytes` in all, for the object's `generation`
/// of holders (0 when put; each `MoveShards` makes the next); valid until `expires_ms`. Bound
/// to all of these, a receipt cannot be replayed for another object, another bucket, a later
/// move, or after the holder may have collected the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiptTerms {
    /// [`object_id`] of the bucket and key.
    pub object: Hash,
    /// The version.
    pub version: Hash,
    /// The holders' generation.
    pub generation: u32,
    /// The shard index.
    pub index: u8,
    /// The manifest root.
    pub manifest_root: Hash,
    /// Bytes of the holder's shards.
    pub shard_bytes: u64,
    /// Until when (Unix ms, chain time).
    pub expires_ms: u64,
}

impl ReceiptTerms {
    /// The signed bytes.
    pub fn bytes(&self, network: &Hash) -> Vec<u8> {
        [
            &network.0[..],
            &self.object.0,
            &self.version.0,
            &self.generation.to_be_bytes(),
            &[self.index],
            &self.manifest_root.0,
            &self.shard_bytes.to_be_bytes(),
            &self.expires_ms.to_be_bytes(),
        ]
        .concat()
    }

    /// The holder's signature.
    pub fn sign(&self, holder: &Identity, network: &Hash) -> [u8; 64] {
        holder.sign(RECEIPT_NAMESPACE, &self.bytes(network))
    }

    /// Whether `node` signed these terms.
    pub fn verify(&self, network: &Hash, node: &NodeId, signature: &[u8; 64]) -> bool {
        verify_signature_memo(node, RECEIPT_NAMESPACE, &self.bytes(network), signature).is_ok()
    }
}

/// One shard's holder in a `PutObject`, with its receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardHolder {
    /// The node.
    pub node: NodeId,
    /// Its signature over the [`ReceiptTerms`].
    #[serde(with = "crate::hash::hex64")]
    pub receipt: [u8; 64],
    /// When the receipt expires.
    pub expires_ms: u64,
}

/// A new object version: the payload of `PutObject`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectPut {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The version id: [`version_id`] of the signer, the object and `nonce`.
    pub version: Hash,
    /// The random nonce the version was made from: the ledger checks that the version is the
    /// signer's, for this object, so a version names one object network-wide.
    pub nonce: Hash,
    /// Plaintext bytes.
    pub size: u64,
    /// Plaintext bytes per segment.
    pub segment_bytes: u64,
    /// Merkle root of the manifest.
    pub manifest_root: Hash,
    /// The ETag.
    pub etag: String,
    /// The k+m holders in shard order (none for an empty object).
    pub holders: Vec<ShardHolder>,
}

/// One shard moved by a repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMove {
    /// The shard index.
    pub index: u8,
    /// The new holder.
    pub to: NodeId,
    /// Its receipt for the shard (the object's next generation).
    #[serde(with = "crate::hash::hex64")]
    pub receipt: [u8; 64],
    /// When the receipt expires.
    pub expires_ms: u64,
}

pub(crate) fn write_str(s: &str, buf: &mut impl BufMut) {
    s.as_bytes().to_vec().write(buf);
}

pub(crate) fn str_size(s: &str) -> usize {
    s.as_bytes().to_vec().encode_size()
}

pub(crate) fn read_str(buf: &mut impl Buf, max: usize, what: &'static str) -> Result<String, CodecError> {
    let bytes = Vec::<u8>::read_cfg(buf, &(RangeCfg::new(0..=max), ()))?;
    String::from_utf8(bytes).map_err(|_| CodecError::Invalid(what, "not UTF-8"))
}

/// Writes a policy as canonical JSON (it is a small, rarely written value).
pub(crate) fn write_policy(p: &PlacementPolicy, buf: &mut impl BufMut) {
    serde_json::to_vec(p).expect("policies serialize").write(buf);
}

pub(crate) fn policy_size(p: &PlacementPolicy) -> usize {
    serde_json::to_vec(p).expect("policies serialize").encode_size()
}

pub(crate) fn read_policy(buf: &mut impl Buf) -> Result<PlacementPolicy, CodecError> {
    let json = Vec::<u8>::read_cfg(buf, &(RangeCfg::new(0..=MAX_POLICY_JSON), ()))?;
    let p: PlacementPolicy =
        serde_json::from_slice(&json).map_err(|_| CodecError::Invalid("CreateBucket", "policy is not valid JSON"))?;
    if serde_json::to_vec(&p).ok().as_deref() != Some(json.as_slice()) {
        return Err(CodecError::Invalid("CreateBucket", "policy JSON is not in canonical form"));
    }
    Ok(p)
}

impl Write for ObjectPut {
    fn write(&self, buf: &mut impl BufMut) {
        write_str(&self.bucket, buf);
        write_str(&self.key, buf);
        self.version.0.write(buf);
        self.nonce.0.write(buf);
        self.size.write(buf);
        self.segment_bytes.write(buf);
        self.manifest_root.0.write(buf);
        write_str(&self.etag, buf);
        u8::try_from(self.holders.len()).unwrap_or(u8::MAX).write(buf);
        for h in &self.holders {
            h.node.0.write(buf);
            h.receipt.write(buf);
            h.expires_ms.write(buf);
        }
    }
}

impl EncodeSize for ObjectPut {
    fn encode_size(&self) -> usize {
        str_size(&self.bucket)
            + str_size(&self.key)
            + 32
            + 32
            + 8
            + 8
            + 32
            + str_size(&self.etag)
            + 1
            + self.holders.len() * 104
    }
}

/// Most holders an object can have (32 + 16).
pub(crate) const MAX_HOLDERS: usize = ErasureCode::MAX_DATA as usize + ErasureCode::MAX_PARITY as usize;

impl Read for ObjectPut {
    type Cfg = ();
    fn read_cfg(buf: &mut impl Buf, _: &()) -> Result<Self, CodecError> {
        let bucket = read_str(buf, MAX_BUCKET_NAME, "bucket")?;
        let key = read_str(buf, MAX_OBJECT_KEY_BYTES, "key")?;
        let version = Hash(<[u8; 32]>::read(buf)?);
        let nonce = Hash(<[u8; 32]>::read(buf)?);
        let size = u64::read(buf)?;
        let segment_bytes = u64::read(buf)?;
        let manifest_root = Hash(<[u8; 32]>::read(buf)?);
        let etag = read_str(buf, MAX_ETAG_BYTES, "etag")?;
        let n = usize::from(u8::read(buf)?);
        if n > MAX_HOLDERS {
            return Err(CodecError::Invalid("PutObject", "more holders than any code has shards"));
        }
        let mut holders = Vec::with_capacity(n);
        for _ in 0..n {
            holders.push(ShardHolder {
                node: NodeId(<[u8; 32]>::read(buf)?),
                receipt: <[u8; 64]>::read(buf)?,
                expires_ms: u64::read(buf)?,
            });
        }
        Ok(ObjectPut { bucket, key, version, nonce, size, segment_bytes, manifest_root, etag, holders })
    }
}

/// Writes the moves of a `MoveShards`.
pub(crate) fn write_moves(moves: &[ShardMove], buf: &mut impl BufMut) {
    u8::try_from(moves.len()).unwrap_or(u8::MAX).write(buf);
    for m in moves {
        m.index.write(buf);
        m.to.0.write(buf);
        m.receipt.write(buf);
        m.expires_ms.write(buf);
    }
}

/// Reads the moves of a `MoveShards` (1 to 48).
pub(crate) fn read_moves(buf: &mut impl Buf) -> Result<Vec<ShardMove>, CodecError> {
    let n = usize::from(u8::read(buf)?);
    if n == 0 || n > MAX_HOLDERS {
        return Err(CodecError::Invalid("MoveShards", "between 1 and 48 moves"));
    }
    let mut moves = Vec::with_capacity(n);
    for _ in 0..n {
        moves.push(ShardMove {
            index: u8::read(buf)?,
            to: NodeId(<[u8; 32]>::read(buf)?),
            receipt: <[u8; 64]>::read(buf)?,
            expires_ms: u64::read(buf)?,
        });
    }
    Ok(moves)
}

/// Why a holder's shards may be moved elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unhealthy {
    /// The node left the registry.
    Gone,
    /// The node's descriptor changed and it is now outside the bucket's geofence.
    OutsideFence,
    /// The node has been Down since this block time, at least `repair_grace_ms` ago.
    Down {
        /// When it went down (Unix ms, block time).
        since_ms: u64,
    },
}

impl State {
    /// The bucket named `name`.
    pub fn bucket(&self, name: &str) -> Option<BucketRecord> {
        let id = bucket_id(name);
        self.buckets
            .get(&id, |id| self.load(&StateKey::Bucket(*id), crate::state::decode_json))
            .filter(|b| b.name == name)
    }

    /// The object at `bucket`/`key`.
    pub fn object(&self, bucket: &str, key: &str) -> Option<ObjectRecord> {
        self.object_by_id(&object_id(bucket, key)).filter(|o| o.bucket == bucket && o.key == key)
    }

    /// The object whose name hashes to `id` ([`object_id`]).
    pub fn object_by_id(&self, id: &Hash) -> Option<ObjectRecord> {
        self.objects.get(id, |id| self.load(&StateKey::Object(*id), crate::state::decode_json))
    }

    /// Every bucket, by name. O(state): it reads every stored entry (a name index is a later
    /// step; see ARCHITECTURE.md).
    pub fn buckets(&self) -> Vec<BucketRecord> {
        let mut out: Vec<BucketRecord> = self
            .overlay_keys("bucket/", &self.buckets, StateKey::Bucket)
            .into_iter()
            .filter_map(|k| match k {
                StateKey::Bucket(h) => {
                    self.buckets.get(&h, |h| self.load(&StateKey::Bucket(*h), crate::state::decode_json))
                }
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every object. O(state), like [`State::buckets`]: a listing reads a page of the index
    /// instead ([`State::list_objects`]).
    pub fn all_objects(&self) -> Vec<ObjectRecord> {
        self.overlay_keys("object/", &self.objects, StateKey::Object)
            .into_iter()
            .filter_map(|k| match k {
                StateKey::Object(h) => self.object_by_id(&h),
                _ => None,
            })
            .collect()
    }

    /// Bytes of shards assigned to `node`.
    pub fn stored_bytes(&self, node: &NodeId) -> u64 {
        self.stored.get(node, |id| self.load(&StateKey::Stored(*id), |b| crate::state::be_u64(b, 0))).unwrap_or(0)
    }

    /// `node` as a placement candidate, if it may receive shards now: registered with the storage
    /// role and Up. Its free bytes are its declared capacity less its stored bytes.
    pub fn storage_candidate(&self, node: &NodeId) -> Option<Candidate> {
        self.is_live_storage(node).then(|| self.candidate_of(node)).flatten()
    }

    /// Whether `node` is a registered storage node whose lease is Up.
    fn is_live_storage(&self, node: &NodeId) -> bool {
        self.nodes.get(node).is_some_and(|r| r.descriptor.descriptor.roles.contains(Role::Storage))
            && self.lease_status(node) == LeaseStatus::Up
    }

    /// The registered storage nodes whose lease is Up, in id order: who shares repair and audit
    /// duties (O(registry): the registry is bounded).
    pub fn live_storage_nodes(&self) -> Vec<NodeId> {
        self.nodes.keys().filter(|n| self.is_live_storage(n)).copied().collect()
    }

    /// Registered `node` described for placement checks (status not considered).
    fn candidate_of(&self, node: &NodeId) -> Option<Candidate> {
        let d = &self.nodes.get(node)?.descriptor.descriptor;
        Some(Candidate {
            node: *node,
            region: d.region.clone(),
            country: d.country,
            operator: d.operator.clone(),
            jurisdiction: d.operator_jurisdiction,
            free_bytes: d.capacity.bytes().saturating_sub(self.stored_bytes(node)),
            reputation: self.reputation(node),
        })
    }

    /// Every node that may receive shards now (O(registry): the registry is bounded).
    pub fn storage_candidates(&self) -> Vec<Candidate> {
        self.nodes.keys().filter_map(|n| self.storage_candidate(n)).collect()
    }

    /// Whether `node`'s shards of a bucket with `policy` may be moved now (at this state's block
    /// time), and why.
    pub fn unhealthy(&self, node: &NodeId, policy: &PlacementPolicy) -> Option<Unhealthy> {
        self.unhealthy_at(node, policy, self.chain.timestamp_ms)
    }

    /// [`State::unhealthy`] at time `now_ms`: a repairer asks with its own clock, since an idle
    /// chain makes no blocks; the ledger then checks the move against the block that carries it.
    pub fn unhealthy_at(&self, node: &NodeId, policy: &PlacementPolicy, now_ms: u64) -> Option<Unhealthy> {
        let Some(rec) = self.nodes.get(node) else { return Some(Unhealthy::Gone) };
        let d = &rec.descriptor.descriptor;
        if !policy.allows(&d.region, d.country, d.operator_jurisdiction) {
            return Some(Unhealthy::OutsideFence);
        }
        let lease = self.lease(node)?;
        let grace = self.params.repair_grace_ms;
        (lease.status == LeaseStatus::Down && now_ms.saturating_sub(lease.since_ms) >= grace)
            .then_some(Unhealthy::Down { since_ms: lease.since_ms })
    }

    /// A node's reputation: [`archipel_placement::MAX_REPUTATION`] less [`AUDIT_PENALTY`] per
    /// failed audit. Below `placement::MIN_REPUTATION` a node receives no new shards.
    pub fn reputation(&self, node: &NodeId) -> u16 {
        self.reputations
            .get(node, |id| self.load(&StateKey::Reputation(*id), crate::state::decode_u16))
            .unwrap_or(archipel_placement::MAX_REPUTATION)
    }

    /// The audit epoch at `now_ms`.
    pub fn audit_epoch(&self, now_ms: u64) -> u64 {
        now_ms / self.params.audit_epoch_ms.max(1)
    }

    /// Who audits `object` in `epoch`: the auditor of the holder its challenge falls on
    /// ([`holder_auditor`]); nobody for an object without shards.
    pub fn auditor_of(&self, object: &ObjectRecord, epoch: u64) -> Option<NodeId> {
        auditor_among(object, epoch, &self.live_storage_nodes())
    }

    /// The objects `me` audits in `epoch` among the live storage nodes `live` (in id order): the
    /// objects whose challenge falls on a holder `me` audits. O(holders + their objects), read
    /// from the object index, never a pass over every object.
    pub fn audit_duties(&self, me: &NodeId, epoch: u64, live: &[NodeId]) -> Vec<ObjectRecord> {
        let mine = self.holder_nodes().into_iter().filter(|h| holder_auditor(h, epoch, live) == Some(*me));
        mine.flat_map(|h| {
            self.objects_on(&h).into_iter().filter(move |o| {
                let (index, _) = audit_challenge(o, epoch);
                o.holders.get(usize::from(index)) == Some(&h)
            })
        })
        .collect()
    }

    pub(crate) fn check_audit_failed(
        &self,
        signer: NodeId,
        bucket: &str,
        key: &str,
        version: &Hash,
        epoch: u64,
    ) -> Result<(), TxError> {
        let bad = |m: String| Err(TxError::NotAllowed(m));
        let Some(obj) = self.object(bucket, key).filter(|o| o.version == *version) else {
            return bad(format!("no version {} of object {bucket}/{key}: it was deleted or replaced", version.short()));
        };
        let now = self.audit_epoch(self.chain.timestamp_ms);
        if epoch > now || epoch + 1 < now {
            return bad(format!("audit epoch {epoch} is not the current one ({now}) or the one before"));
        }
        if obj.holders.is_empty() {
            return bad(format!("{bucket}/{key} is empty: it has no shards to audit"));
        }
        if self.auditor_of(&obj, epoch) != Some(signer) {
            return bad(format!("{} is not the auditor of {bucket}/{key} in epoch {epoch}", signer.short()));
        }
        let (index, _) = audit_challenge(&obj, epoch);
        if obj.suspect.contains(&index) {
            return bad(format!("shard {index} of {bucket}/{key} failed an audit already"));
        }
        Ok(())
    }

    pub(crate) fn apply_audit_failed(&mut self, bucket: &str, key: &str, epoch: u64) -> Receipt {
        let Some(mut obj) = self.object(bucket, key) else {
            return Receipt::AuditFailed { bucket: bucket.into(), key: key.into(), holder: NodeId([0; 32]), index: 0 };
        };
        let (index, _) = audit_challenge(&obj, epoch);
        // Checked before (an empty object has no holders); never index past them.
        let Some(&holder) = obj.holders.get(usize::from(index)) else {
            return Receipt::AuditFailed { bucket: bucket.into(), key: key.into(), holder: NodeId([0; 32]), index };
        };
        obj.suspect.push(index);
        obj.suspect.sort_unstable();
        self.objects.set(object_id(bucket, key), Some(obj));
        let reputation = self.reputation(&holder).saturating_sub(AUDIT_PENALTY);
        self.reputations.set(holder, Some(reputation));
        Receipt::AuditFailed { bucket: bucket.into(), key: key.into(), holder, index }
    }

    pub(crate) fn owned_bucket(&self, signer: NodeId, name: &str) -> Result<BucketRecord, TxError> {
        let b = self.bucket(name).ok_or_else(|| {
            TxError::NotAllowed(format!("no bucket {name:?}: create it first (`archipel bucket create {name}`)"))
        })?;
        if b.owner != signer {
            return Err(TxError::NotAllowed(format!(
                "bucket {name:?} belongs to {}, not {}",
                b.owner.short(),
                signer.short()
            )));
        }
        Ok(b)
    }

    /// Refuses a new entry (a bucket or an object key) whose deposit and `fee` `signer` cannot pay.
    fn check_entry_deposit(
        &self,
        signer: NodeId,
        fee: u64,
        what: &'static str,
        what_short: &'static str,
    ) -> Result<(), TxError> {
        let deposit_micro = self.params.entry_deposit_micro;
        if let Some(balance_micro) = self.short_of(signer, deposit_micro, fee) {
            return Err(TxError::InsufficientEntryDeposit {
                balance_micro,
                deposit_micro,
                fee_micro: fee,
                what,
                what_short,
            });
        }
        Ok(())
    }

    /// Moves a state entry's deposit: locked from `owner` (`lock`) or returned to it.
    fn entry_deposit(&mut self, owner: NodeId, lock: bool) {
        let deposit = self.params.entry_deposit_micro;
        if deposit == 0 {
            return;
        }
        // The lock was checked against the balance; a return gives back what a lock took.
        self.update_account(owner, |a| {
            a.balance_micro =
                if lock { a.balance_micro.saturating_sub(deposit) } else { a.balance_micro.saturating_add(deposit) }
        });
    }

    /// What buckets and object keys lock: one deposit per bucket and per key in it.
    pub(crate) fn entry_deposits_micro(&self) -> u128 {
        let entries: u128 = self.buckets().iter().map(|b| 1 + u128::from(b.objects)).sum();
        entries * u128::from(self.params.entry_deposit_micro)
    }

    pub(crate) fn check_create_bucket(
        &self,
        signer: NodeId,
        fee: u64,
        name: &str,
        policy: &PlacementPolicy,
    ) -> Result<(), TxError> {
        check_bucket_name(name).map_err(TxError::NotAllowed)?;
        if self.bucket(name).is_some() {
            return Err(TxError::NotAllowed(format!("bucket {name:?} exists already: bucket names are global")));
        }
        self.check_entry_deposit(signer, fee, "a new bucket", "bucket")?;
        policy.validate().map_err(|e| TxError::NotAllowed(format!("bucket {name:?}: {e}")))?;
        let candidates = self.storage_candidates();
        archipel_placement::feasible(policy, &candidates, archipel_types::SHARD_ALIGN).map_err(|e| {
            let hint = if candidates.is_empty() {
                " (a storage node counts once its lease is up in finalized state: on a network that just started, retry in a few seconds)"
            } else {
                ""
            };
            TxError::NotAllowed(format!("bucket {name:?} cannot be placed: {e}{hint}"))
        })
    }

    pub(crate) fn apply_create_bucket(&mut self, signer: NodeId, name: &str, policy: &PlacementPolicy) -> Receipt {
        let record = BucketRecord {
            name: name.to_string(),
            owner: signer,
            policy: policy.clone(),
            created_height: self.chain.height,
            created_ms: self.chain.timestamp_ms,
            objects: 0,
            bytes: 0,
            segments: 0,
        };
        self.buckets.set(bucket_id(name), Some(record));
        self.entry_deposit(signer, true);
        Receipt::BucketCreated { name: name.to_string(), owner: signer }
    }

    pub(crate) fn check_delete_bucket(&self, signer: NodeId, name: &str) -> Result<(), TxError> {
        let b = self.owned_bucket(signer, name)?;
        if b.objects > 0 {
            return Err(TxError::NotAllowed(format!(
                "bucket {name:?} still holds {} objects: delete them first",
                b.objects
            )));
        }
        Ok(())
    }

    pub(crate) fn apply_delete_bucket(&mut self, name: &str) -> Receipt {
        if let Some(b) = self.bucket(name) {
            self.entry_deposit(b.owner, false);
        }
        self.buckets.set(bucket_id(name), None);
        Receipt::BucketDeleted { name: name.to_string() }
    }

    /// Every check of a `PutObject` but the receipts' signatures.
    pub(crate) fn check_put_object_cheap(&self, signer: NodeId, fee: u64, put: &ObjectPut) -> Result<(), TxError> {
        let bucket = self.owned_bucket(signer, &put.bucket)?;
        if self.object(&put.bucket, &put.key).is_none() {
            self.check_entry_deposit(signer, fee, "a new object key", "object")?;
        }
        let need = self.check_put_shape(signer, &bucket, put)?;
        if put.holders.is_empty() {
            return Ok(());
        }
        let nodes: Vec<NodeId> = put.holders.iter().map(|h| h.node).collect();
        self.check_holders(&bucket.policy, &nodes, need)
    }

    /// Every check of a put into `bucket` (the signer's) but the entry deposit, the holders'
    /// room and fence, and the receipts' signatures; returns the bytes each holder takes.
    pub(crate) fn check_put_shape(
        &self,
        signer: NodeId,
        bucket: &BucketRecord,
        put: &ObjectPut,
    ) -> Result<u64, TxError> {
        let bad = |m: String| Err(TxError::NotAllowed(m));
        check_object_key(&put.key).map_err(TxError::NotAllowed)?;
        if put.etag.len() > MAX_ETAG_BYTES || !put.etag.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-') {
            return bad(format!("etag must be at most {MAX_ETAG_BYTES} hex digits and dashes"));
        }
        if put.size > MAX_OBJECT_BYTES {
            return bad(format!("object of {} bytes: the limit is {MAX_OBJECT_BYTES} (5 TiB)", put.size));
        }
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&put.segment_bytes) {
            return bad(format!(
                "segments of {} bytes: use {MIN_SEGMENT_BYTES} to {MAX_SEGMENT_BYTES} bytes",
                put.segment_bytes
            ));
        }
        if version_id(&signer, &object_id(&put.bucket, &put.key), &put.nonce.0) != put.version {
            return bad(format!(
                "version {} is not made from your key, {}/{} and the nonce given: make it with version_id",
                put.version.short(),
                put.bucket,
                put.key
            ));
        }
        if let Some(old) = self.object(&put.bucket, &put.key)
            && old.version == put.version
        {
            return bad(format!("version {} of {}/{} is stored already", put.version.short(), put.bucket, put.key));
        }
        let code = bucket.policy.code;
        let want = if put.size == 0 { 0 } else { code.total() };
        if put.holders.len() != want {
            return bad(format!(
                "an object of {} bytes in a {code} bucket has {want} shard holders, not {}",
                put.size,
                put.holders.len()
            ));
        }
        if want == 0 {
            return Ok(0);
        }
        self.check_expiries(put.holders.iter().map(|h| h.expires_ms))?;
        let nodes: Vec<NodeId> = put.holders.iter().map(|h| h.node).collect();
        let need = shard_bytes_per_holder(code, put.size, put.segment_bytes);
        let regions: BTreeSet<_> =
            nodes.iter().filter_map(|n| self.nodes.get(n)).map(|r| &r.descriptor.descriptor.region).collect();
        let operators: BTreeSet<_> =
            nodes.iter().filter_map(|n| self.nodes.get(n)).map(|r| &r.descriptor.descriptor.operator).collect();
        let p = &bucket.policy;
        if regions.len() < usize::from(p.min_regions) || operators.len() < usize::from(p.min_operators) {
            return bad(format!(
                "the holders span {} regions and {} operators; bucket {:?} needs {} and {}",
                regions.len(),
                operators.len(),
                put.bucket,
                p.min_regions,
                p.min_operators
            ));
        }
        Ok(need)
    }

    /// Refuses receipts that expired or expire implausibly far ahead of this block's time.
    fn check_expiries(&self, expiries: impl Iterator<Item = u64>) -> Result<(), TxError> {
        let now = self.chain.timestamp_ms;
        for e in expiries {
            if e < now {
                return Err(TxError::NotAllowed(format!(
                    "a receipt expired {} ms before this block: ask the holders to seal again (receipts last {} s)",
                    now - e,
                    RECEIPT_TTL_MS / 1000
                )));
            }
            if e > now.saturating_add(MAX_RECEIPT_TTL_MS) {
                return Err(TxError::NotAllowed(format!(
                    "a receipt expires {} ms after this block, more than the {MAX_RECEIPT_TTL_MS} ms allowed",
                    e - now
                )));
            }
        }
        Ok(())
    }

    /// Checks a full holder list: distinct registered nodes inside the geofence, each a storage
    /// node that is Up with `need` bytes free.
    fn check_holders(&self, policy: &PlacementPolicy, nodes: &[NodeId], need: u64) -> Result<(), TxError> {
        self.check_holder_lists(policy, &[(nodes, need)])
    }

    /// [`State::check_holders`] for several objects at once: each list on its own, and each node
    /// with room for everything the lists give it together.
    pub(crate) fn check_holder_lists(
        &self,
        policy: &PlacementPolicy,
        lists: &[(&[NodeId], u64)],
    ) -> Result<(), TxError> {
        let mut needs: BTreeMap<NodeId, u64> = BTreeMap::new();
        for (nodes, need) in lists {
            for n in *nodes {
                let total = needs.entry(*n).or_default();
                *total = total.saturating_add(*need);
            }
        }
        let registry: BTreeMap<NodeId, Candidate> =
            needs.keys().filter_map(|n| self.candidate_of(n).map(|c| (*n, c))).collect();
        for (nodes, _) in lists {
            archipel_placement::check(policy, &registry, nodes).map_err(|e| TxError::NotAllowed(e.to_string()))?;
        }
        for (n, need) in &needs {
            self.check_one_new_holder(policy, n, *need)?;
        }
        Ok(())
    }

    pub(crate) fn check_put_object(&self, signer: NodeId, fee: u64, put: &ObjectPut) -> Result<(), TxError> {
        self.check_put_object_cheap(signer, fee, put)?;
        let need = self.bucket(&put.bucket).map(|b| shard_bytes_per_holder(b.policy.code, put.size, put.segment_bytes));
        let terms: Vec<Vec<u8>> = put
            .holders
            .iter()
            .enumerate()
            .map(|(i, h)| {
                ReceiptTerms {
                    object: object_id(&put.bucket, &put.key),
                    version: put.version,
                    generation: 0,
                    index: i as u8,
                    manifest_root: put.manifest_root,
                    shard_bytes: need.unwrap_or(0),
                    expires_ms: h.expires_ms,
                }
                .bytes(&self.network)
            })
            .collect();
        // All receipts as one batch (remembered once good: the block's execution after the
        // mempool's admission checks them from the memo); one by one only to name a bad one.
        let items: Vec<SignatureItem<'_>> =
            put.holders.iter().zip(&terms).map(|(h, t)| (&h.node, t.as_slice(), &h.receipt)).collect();
        if verify_signatures_memo(RECEIPT_NAMESPACE, &items) {
            return Ok(());
        }
        for (i, (h, t)) in put.holders.iter().zip(&terms).enumerate() {
            if verify_signature_memo(&h.node, RECEIPT_NAMESPACE, t, &h.receipt).is_err() {
                return Err(TxError::NotAllowed(format!(
                    "the receipt of node {} for shard {i} does not verify: it did not sign that it holds this shard",
                    h.node.short()
                )));
            }
        }
        Ok(())
    }

    /// Releases what an object holds: its holders' bytes and its bucket's counts.
    fn release_object(&mut self, old: &ObjectRecord) {
        for h in &old.holders {
            let left = self.stored_bytes(h).saturating_sub(old.shard_bytes);
            self.stored.set(*h, (left > 0).then_some(left));
        }
        if let Some(mut b) = self.bucket(&old.bucket) {
            b.objects = b.objects.saturating_sub(1);
            b.bytes = b.bytes.saturating_sub(old.size);
            b.segments = b.segments.saturating_sub(old.segments());
            self.buckets.set(bucket_id(&old.bucket), Some(b));
        }
    }

    pub(crate) fn apply_put_object(&mut self, put: &ObjectPut) -> Receipt {
        let replaced = self.object(&put.bucket, &put.key);
        if let Some(old) = &replaced {
            self.release_object(old);
        }
        let Some(mut bucket) = self.bucket(&put.bucket) else {
            return Receipt::ObjectStored {
                bucket: put.bucket.clone(),
                key: put.key.clone(),
                version: put.version,
                replaced: None,
            };
        };
        let shard_bytes = shard_bytes_per_holder(bucket.policy.code, put.size, put.segment_bytes);
        let holders: Vec<NodeId> = put.holders.iter().map(|h| h.node).collect();
        for h in &holders {
            let now = self.stored_bytes(h).saturating_add(shard_bytes);
            self.stored.set(*h, Some(now));
        }
        bucket.objects += 1;
        bucket.bytes = bucket.bytes.saturating_add(put.size);
        bucket.segments = bucket.segments.saturating_add(segment_count(put.size, put.segment_bytes));
        let code = bucket.policy.code;
        if replaced.is_none() {
            self.entry_deposit(bucket.owner, true);
        }
        self.buckets.set(bucket_id(&put.bucket), Some(bucket));
        let record = ObjectRecord {
            bucket: put.bucket.clone(),
            key: put.key.clone(),
            version: put.version,
            size: put.size,
            segment_bytes: put.segment_bytes,
            code,
            manifest_root: put.manifest_root,
            etag: put.etag.clone(),
            holders,
            shard_bytes,
            created_height: self.chain.height,
            created_ms: self.chain.timestamp_ms,
            generation: 0,
            suspect: vec![],
        };
        self.objects.set(object_id(&put.bucket, &put.key), Some(record));
        Receipt::ObjectStored {
            bucket: put.bucket.clone(),
            key: put.key.clone(),
            version: put.version,
            replaced: replaced.map(|o| o.version),
        }
    }

    pub(crate) fn check_delete_object(&self, signer: NodeId, bucket: &str, key: &str) -> Result<(), TxError> {
        self.owned_bucket(signer, bucket)?;
        if self.object(bucket, key).is_none() {
            return Err(TxError::NotAllowed(format!("no object {bucket}/{key}")));
        }
        Ok(())
    }

    pub(crate) fn apply_delete_object(&mut self, bucket: &str, key: &str) -> Receipt {
        let old = self.object(bucket, key);
        if let Some(old) = &old {
            self.release_object(old);
            self.objects.set(object_id(bucket, key), None);
            if let Some(b) = self.bucket(bucket) {
                self.entry_deposit(b.owner, false);
            }
        }
        Receipt::ObjectDeleted {
            bucket: bucket.into(),
            key: key.into(),
            version: old.map(|o| o.version).unwrap_or_default(),
        }
    }

    /// Every check of a `MoveShards` but the receipts' signatures; returns the object.
    pub(crate) fn check_move_shards_cheap(
        &self,
        bucket: &str,
        key: &str,
        version: &Hash,
        moves: &[ShardMove],
    ) -> Result<ObjectRecord, TxError> {
        let bad = |m: String| Err(TxError::NotAllowed(m));
        let Some(obj) = self.object(bucket, key).filter(|o| o.version == *version) else {
            return bad(format!("no version {} of object {bucket}/{key}: it was deleted or replaced", version.short()));
        };
        let policy = match self.bucket(bucket) {
            Some(b) => b.policy,
            None => return bad(format!("no bucket {bucket:?}")),
        };
        let mut after = obj.holders.clone();
        let mut indices = BTreeSet::new();
        for m in moves {
            let i = usize::from(m.index);
            if i >= after.len() || !indices.insert(i) {
                return bad(format!("shard index {i} is out of range or moved twice"));
            }
            let from = obj.holders[i];
            if self.unhealthy(&from, &policy).is_none() && !obj.suspect.contains(&m.index) {
                return bad(format!(
                    "shard {i} of {bucket}/{key} is on node {}, which is healthy: only the shards of a node that left or \
                     has been down for repair_grace_ms ({} ms) may move",
                    from.short(),
                    self.params.repair_grace_ms
                ));
            }
            after[i] = m.to;
        }
        self.check_expiries(moves.iter().map(|m| m.expires_ms))?;
        let distinct: BTreeSet<&NodeId> = after.iter().collect();
        if distinct.len() != after.len() {
            return bad("a new holder already holds another shard of this object".into());
        }
        for m in moves {
            self.check_one_new_holder(&policy, &m.to, obj.shard_bytes)?;
        }
        // The destinations are the ones placement chooses from this state (moves listed by
        // ascending index, as the repairer lists them): whoever submits first, the shards go
        // where every node would have put them, never onto nodes a submitter picked.
        let missing: Vec<usize> = moves.iter().map(|m| usize::from(m.index)).collect();
        if missing.windows(2).any(|w| w[0] > w[1]) {
            return bad("list the moves by ascending shard index".into());
        }
        let healthy: BTreeMap<usize, NodeId> =
            obj.holders.iter().enumerate().filter(|(i, _)| !indices.contains(i)).map(|(i, n)| (i, *n)).collect();
        let exclude: BTreeSet<NodeId> = missing.iter().map(|i| obj.holders[*i]).collect();
        let chosen = archipel_placement::replace(
            &policy,
            &self.storage_candidates(),
            &obj.version.0,
            obj.shard_bytes,
            &healthy,
            &missing,
            &exclude,
        )
        .map_err(|e| TxError::NotAllowed(format!("no compliant placement for the moved shards: {e}")))?;
        for (m, (i, node)) in moves.iter().zip(chosen) {
            if m.to != node {
                return bad(format!(
                    "shard {i} must move to node {} (placement's choice from finalized state), not {}",
                    node.short(),
                    m.to.short()
                ));
            }
        }
        Ok(obj)
    }

    /// A single new holder: inside the fence, a storage node, Up, with room.
    fn check_one_new_holder(&self, policy: &PlacementPolicy, node: &NodeId, need: u64) -> Result<(), TxError> {
        let Some(c) = self.storage_candidate(node) else {
            return Err(TxError::NotAllowed(format!(
                "node {} cannot take shards: it is not a registered storage node that is up",
                node.short()
            )));
        };
        if !policy.allows(&c.region, c.country, c.jurisdiction) {
            return Err(TxError::NotAllowed(format!("node {c} is outside the geofence ({})", policy.describe_fence())));
        }
        if c.free_bytes < need {
            return Err(TxError::NotAllowed(format!(
                "node {} has {} bytes free, the shard needs {need}: it is full",
                node.short(),
                c.free_bytes
            )));
        }
        if c.reputation < archipel_placement::MIN_REPUTATION {
            return Err(TxError::NotAllowed(format!(
                "node {} has reputation {} after failed audits, below the {} a node needs to take new shards: \
                 place them elsewhere",
                node.short(),
                c.reputation,
                archipel_placement::MIN_REPUTATION
            )));
        }
        Ok(())
    }

    pub(crate) fn check_move_shards(
        &self,
        bucket: &str,
        key: &str,
        version: &Hash,
        moves: &[ShardMove],
    ) -> Result<(), TxError> {
        let obj = self.check_move_shards_cheap(bucket, key, version, moves)?;
        for m in moves {
            let terms = ReceiptTerms {
                object: object_id(bucket, key),
                version: obj.version,
                generation: obj.generation.saturating_add(1),
                index: m.index,
                manifest_root: obj.manifest_root,
                shard_bytes: obj.shard_bytes,
                expires_ms: m.expires_ms,
            };
            if !terms.verify(&self.network, &m.to, &m.receipt) {
                return Err(TxError::NotAllowed(format!(
                    "the receipt of node {} for shard {} does not verify: it did not sign that it holds the rebuilt shard \
                     for this object's next generation of holders",
                    m.to.short(),
                    m.index
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn apply_move_shards(&mut self, bucket: &str, key: &str, moves: &[ShardMove]) -> Receipt {
        let Some(mut obj) = self.object(bucket, key) else {
            return Receipt::ShardsMoved { bucket: bucket.into(), key: key.into(), moved: 0 };
        };
        for m in moves {
            let i = usize::from(m.index);
            let from = obj.holders[i];
            let left = self.stored_bytes(&from).saturating_sub(obj.shard_bytes);
            self.stored.set(from, (left > 0).then_some(left));
            let now = self.stored_bytes(&m.to).saturating_add(obj.shard_bytes);
            self.stored.set(m.to, Some(now));
            obj.holders[i] = m.to;
            obj.suspect.retain(|s| *s != m.index);
        }
        obj.generation = obj.generation.saturating_add(1);
        self.objects.set(object_id(bucket, key), Some(obj));
        Receipt::ShardsMoved { bucket: bucket.into(), key: key.into(), moved: moves.len() }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::lease::{AliveProof, LivenessChange};
    use crate::params::LedgerParams;
    use crate::state::GenesisState;
    use crate::state::tests::{id, signed};
    use crate::tx::Payload;
    use archipel_crypto::SignedDescriptor;
    use archipel_types::NodeDescriptor;
    use commonware_codec::{Copying, Encode};

    pub(crate) const TENANT: u64 = 0;
    pub(crate) const MIB: u64 = 1 << 20;

    /// The devnet's topology: seeds 101..=112; 101-103, 105-109 in the EU under EU operators,
    /// 110-111 in the EU under a US operator, 104 and 112 in us-east.
    const TOPOLOGY: [(&str, &str, &str, &str); 12] = [
        ("eu-de", "DE", "rheinhost", "DE"),
        ("eu-fr", "FR", "seine-cloud", "FR"),
        ("eu-nl", "NL", "polder-net", "NL"),
        ("us-east", "US", "bigcloud", "US"),
        ("eu-de", "DE", "rheinhost", "DE"),
        ("eu-de", "DE", "alpen-dc", "DE"),
        ("eu-fr", "FR", "seine-cloud", "FR"),
        ("eu-fr", "FR", "lyon-compute", "FR"),
        ("eu-nl", "NL", "polder-net", "NL"),
        ("eu-de", "DE", "bigcloud", "US"),
        ("eu-ie", "IE", "bigcloud", "US"),
        ("us-east", "US", "bigcloud", "US"),
    ];

    fn descriptor(seed: u64, capacity: &str) -> NodeDescriptor {
        let (region, country, operator, jurisdiction) = TOPOLOGY[(seed - 101) as usize];
        let mut d = archipel_crypto::test_support::example_descriptor(&id(seed));
        d.region = region.parse().unwrap();
        d.country = country.parse().unwrap();
        d.operator = operator.into();
        d.operator_jurisdiction = jurisdiction.parse().unwrap();
        d.capacity = capacity.parse().unwrap();
        d
    }

    /// Twelve storage nodes of 1 GiB, all up at height 1 (time 1 s); the tenant has funds.
    pub(crate) fn world() -> State {
        let mut s = State::genesis(GenesisState {
            network: Hash::ZERO,
            params: LedgerParams::default(),
            timestamp_ms: 0,
            validators: vec![id(101).node_id()],
            accounts: [(id(TENANT).node_id(), 1_000_000_000), (id(1).node_id(), 1_000)]
                .into_iter()
                .chain((101..=112).map(|n| (id(n).node_id(), 1_000)))
                .collect(),
            nodes: (101..=112).map(|n| SignedDescriptor::sign(&id(n), descriptor(n, "1GiB")).unwrap()).collect(),
        });
        s.begin_block(1, 1_000);
        for n in 101..=112 {
            up(&mut s, n);
        }
        s
    }

    fn up(s: &mut State, seed: u64) {
        let proof = AliveProof::sign(&id(seed), &s.network, s.chain.height - 1);
        s.apply_liveness(&LivenessChange::Up { node: id(seed).node_id(), proof }).unwrap();
    }

    pub(crate) fn eu_no_us() -> PlacementPolicy {
        PlacementPolicy {
            regions: ["eu".parse().unwrap()].into(),
            deny_jurisdictions: ["US".parse().unwrap()].into(),
            min_regions: 2,
            min_operators: 2,
            ..PlacementPolicy::anywhere(ErasureCode::DEFAULT)
        }
    }

    pub(crate) fn seed_of(node: &NodeId) -> u64 {
        (101..=112).find(|n| id(*n).node_id() == *node).expect("a test node")
    }

    pub(crate) struct Tenant {
        pub(crate) nonce: u64,
    }

    impl Tenant {
        pub(crate) fn send(&mut self, s: &mut State, payload: Payload) -> Result<Receipt, TxError> {
            let r = s.apply(&signed(TENANT, self.nonce, payload));
            if r.is_ok() {
                self.nonce += 1;
            }
            r
        }
    }

    pub(crate) fn bucket_with(s: &mut State, t: &mut Tenant, name: &str, policy: PlacementPolicy) {
        t.send(s, Payload::CreateBucket { name: name.into(), policy }).unwrap();
    }

    /// A put of `size` bytes on `holders` (by seed), every receipt signed as the ledger expects.
    pub(crate) fn put_on(s: &State, bucket: &str, key: &str, size: u64, holders: &[u64], version: u8) -> ObjectPut {
        let code = s.bucket(bucket).map(|b| b.policy.code).unwrap_or(ErasureCode::DEFAULT);
        let nonce = Hash([version; 32]);
        let version = vid(bucket, key, version);
        let root = Hash([0xaa; 32]);
        let need = shard_bytes_per_holder(code, size, 8 * MIB);
        ObjectPut {
            bucket: bucket.into(),
            key: key.into(),
            version,
            nonce,
            size,
            segment_bytes: 8 * MIB,
            manifest_root: root,
            etag: "0123abcd".into(),
            holders: holders
                .iter()
                .enumerate()
                .map(|(i, n)| ShardHolder {
                    node: id(*n).node_id(),
                    receipt: terms(bucket, key, version, 0, i as u8, root, need).sign(&id(*n), &s.network),
                    expires_ms: EXPIRES,
                })
                .collect(),
        }
    }

    /// The tenant's version `n` of `bucket/key` (made from the nonce `[n; 32]`).
    fn vid(bucket: &str, key: &str, n: u8) -> Hash {
        version_id(&id(TENANT).node_id(), &object_id(bucket, key), &[n; 32])
    }

    /// When the tests' receipts expire (their chains run for a few seconds from time 0).
    pub(crate) const EXPIRES: u64 = 100_000;

    /// The terms a holder signs, expiring at [`EXPIRES`].
    fn terms(
        bucket: &str,
        key: &str,
        version: Hash,
        generation: u32,
        index: u8,
        root: Hash,
        bytes: u64,
    ) -> ReceiptTerms {
        ReceiptTerms {
            object: object_id(bucket, key),
            version,
            generation,
            index,
            manifest_root: root,
            shard_bytes: bytes,
            expires_ms: EXPIRES,
        }
    }

    /// Builds and sends a put (see [`put_on`]).
    fn put(
        s: &mut State,
        t: &mut Tenant,
        bucket: &str,
        key: &str,
        size: u64,
        holders: &[u64],
        version: u8,
    ) -> Result<Receipt, TxError> {
        let p = put_on(s, bucket, key, size, holders, version);
        t.send(s, Payload::PutObject { put: p })
    }

    /// Holders as placement chooses them for this version.
    pub(crate) fn placed(s: &State, bucket: &str, version: u8) -> Vec<u64> {
        let policy = s.bucket(bucket).unwrap().policy;
        let nodes = archipel_placement::place(&policy, &s.storage_candidates(), &[version; 32], MIB).unwrap();
        nodes.iter().map(seed_of).collect()
    }

    #[test]
    fn buckets_are_created_once_with_a_policy_the_network_can_place() {
        let mut s = world();
        let mut t = Tenant { nonce: 0 };
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        let b = s.bucket("eu-docs").unwrap();
        assert_eq!((b.owner, b.objects, b.created_height), (id(TENANT).node_id(), 0, 1));
        let again = t.send(&mut s, Payload::CreateBucket { name: "eu-docs".into(), policy: eu_no_us() }).unwrap_err();
        assert!(again.to_string().contains("exists already"), "{again}");
        let bad = t.send(&mut s, Payload::CreateBucket { name: "EU_Docs".into(), policy: eu_no_us() }).unwrap_err();
        assert!(bad.to_string().contains("invalid bucket name"), "{bad}");
        for name in ["ab", "-ab", "a..b", "192.168.1.1", &"a".repeat(64)] {
            assert!(check_bucket_name(name).is_err(), "{name:?}");
        }

        // 8+2 needs ten nodes; eight EU nodes are not US-operated.
        let mut wide = eu_no_us();
        wide.code = ErasureCode::new(8, 2).unwrap();
        let e = t.send(&mut s, Payload::CreateBucket { name: "wide".into(), policy: wide }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bucket \"wide\" cannot be placed: code 8+2 needs 10 nodes in regions [eu] outside US jurisdiction with \
             64 B free; 8 of the 12 live nodes qualify — add nodes or lower the code to 6+2"
        );
        // A Down node does not count: with two EU nodes down only six qualify for 4+2... and
        // with three down, five: refused.
        for n in [101, 102, 103] {
            s.begin_block(s.chain.height + 1, 2_000);
            s.apply_liveness(&LivenessChange::Down { node: id(n).node_id() }).unwrap();
        }
        let e = t.send(&mut s, Payload::CreateBucket { name: "later".into(), policy: eu_no_us() }).unwrap_err();
        assert!(e.to_string().contains("5 of the 9 live nodes qualify"), "{e}");
        // An impossible policy in itself.
        let mut odd = eu_no_us();
        odd.min_regions = 9;
        let e = t.send(&mut s, Payload::CreateBucket { name: "odd".into(), policy: odd }).unwrap_err();
        assert!(e.to_string().contains("cannot cover 9 regions"), "{e}");
    }

    #[test]
    fn a_put_is_stored_only_with_every_receipt_inside_the_fence() {
        let mut s = world();
        let mut t = Tenant { nonce: 0 };
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        let holders = placed(&s, "eu-docs", 1);
        let size = 20 * MIB;
        let good = put_on(&s, "eu-docs", "a/b.txt", size, &holders, 1);

        // A forged receipt: shard 2's holder did not sign, another node did.
        let mut forged = good.clone();
        let need = shard_bytes_per_holder(ErasureCode::DEFAULT, size, 8 * MIB);
        forged.holders[2].receipt =
            terms("eu-docs", "a/b.txt", good.version, 0, 2, good.manifest_root, need).sign(&id(holders[3]), &s.network);
        let e = t.send(&mut s, Payload::PutObject { put: forged }).unwrap_err();
        assert!(e.to_string().contains("receipt of node") && e.to_string().contains("shard 2"), "{e}");
        // A receipt for fewer bytes than the object's shards.
        let mut short = good.clone();
        short.holders[0].receipt =
            terms("eu-docs", "a/b.txt", good.version, 0, 0, good.manifest_root, 1).sign(&id(holders[0]), &s.network);
        assert!(t.send(&mut s, Payload::PutObject { put: short }).is_err());
        // A US-operated holder, even with a valid receipt.
        let mut us = holders.clone();
        us[5] = 110;
        let e = put(&mut s, &mut t, "eu-docs", "a/b.txt", size, &us, 1).unwrap_err();
        assert!(e.to_string().contains("outside the geofence"), "{e}");
        // The same node twice.
        let mut twice = holders.clone();
        twice[5] = twice[0];
        let e = put(&mut s, &mut t, "eu-docs", "a/b.txt", size, &twice, 1).unwrap_err();
        assert!(e.to_string().contains("holds shards"), "{e}");
        // Too few holders.
        let e = put(&mut s, &mut t, "eu-docs", "a/b.txt", size, &holders[..5], 1);
        assert!(e.unwrap_err().to_string().contains("has 6 shard holders, not 5"));
        // Somebody else's bucket.
        let stranger = s.apply(&signed(1, 0, Payload::PutObject { put: good.clone() })).unwrap_err();
        assert!(stranger.to_string().contains("belongs to"), "{stranger}");
        // Nothing of the refused puts is there.
        assert!(s.object("eu-docs", "a/b.txt").is_none());
        assert!((101..=112).all(|n| s.stored_bytes(&id(n).node_id()) == 0));

        // Receipts are bound to the bucket and key, and expire.
        bucket_with(&mut s, &mut t, "mine", eu_no_us());
        let mut copied = good.clone();
        copied.bucket = "mine".into();
        (copied.version, copied.nonce) = (vid("mine", "a/b.txt", 1), Hash([1; 32]));
        let e = t.send(&mut s, Payload::PutObject { put: copied }).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "a receipt replayed into another bucket: {e}");
        let mut stale = good.clone();
        for h in &mut stale.holders {
            h.expires_ms = 500;
        }
        let e = t.send(&mut s, Payload::PutObject { put: stale }).unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        let mut far = good.clone();
        far.holders[0].expires_ms = 10_000_000;
        assert!(t.send(&mut s, Payload::PutObject { put: far }).unwrap_err().to_string().contains("more than"));

        // A version must be the signer's, for this object: another key's, or this version under
        // another name, is refused — a version names one object network-wide.
        let mut alias = good.clone();
        alias.key = "elsewhere".into();
        let e = t.send(&mut s, Payload::PutObject { put: alias }).unwrap_err().to_string();
        assert!(e.contains("not made from your key"), "{e}");
        let mut forged = good.clone();
        forged.nonce = Hash([0x77; 32]);
        let e = t.send(&mut s, Payload::PutObject { put: forged }).unwrap_err().to_string();
        assert!(e.contains("not made from your key"), "{e}");
        let stranger =
            s.apply(&signed(101, s.account(&id(101).node_id()).nonce, Payload::PutObject { put: good.clone() }));
        assert!(stranger.is_err());
        let r = t.send(&mut s, Payload::PutObject { put: good.clone() }).unwrap();
        assert!(matches!(r, Receipt::ObjectStored { replaced: None, .. }), "{r:?}");
        let o = s.object("eu-docs", "a/b.txt").unwrap();
        let per_holder = shard_bytes_per_holder(ErasureCode::DEFAULT, size, 8 * MIB);
        assert_eq!((o.segments(), o.shard_bytes, o.holders.len()), (3, per_holder, 6));
        // 8 MiB segments of 4+2 give 2 MiB + 64 B shards (the tag); the last, 4 MiB, 1 MiB + 64 B.
        assert_eq!(per_holder, 2 * (2 * MIB + 64) + (MIB + 64));
        for h in &holders {
            assert_eq!(s.stored_bytes(&id(*h).node_id()), per_holder);
        }
        let b = s.bucket("eu-docs").unwrap();
        assert_eq!((b.objects, b.bytes, b.segments), (1, size, 3));
        // The same version again is refused; a new version replaces it and frees the old shards.
        assert!(t.send(&mut s, Payload::PutObject { put: good }).unwrap_err().to_string().contains("stored already"));
        let holders2 = placed(&s, "eu-docs", 2);
        let r = put(&mut s, &mut t, "eu-docs", "a/b.txt", MIB, &holders2, 2).unwrap();
        assert!(
            matches!(r, Receipt::ObjectStored { replaced: Some(v), .. } if v == vid("eu-docs", "a/b.txt", 1)),
            "{r:?}"
        );
        let b = s.bucket("eu-docs").unwrap();
        assert_eq!((b.objects, b.bytes, b.segments), (1, MIB, 1));
        let small = shard_bytes_per_holder(ErasureCode::DEFAULT, MIB, 8 * MIB);
        let total: u64 = (101..=112).map(|n| s.stored_bytes(&id(n).node_id())).sum();
        assert_eq!(total, 6 * small, "the old version's bytes are released");

        // Delete: the bucket can go once empty.
        let e = t.send(&mut s, Payload::DeleteBucket { name: "eu-docs".into() }).unwrap_err();
        assert!(e.to_string().contains("still holds 1 objects"), "{e}");
        t.send(&mut s, Payload::DeleteObject { bucket: "eu-docs".into(), key: "a/b.txt".into() }).unwrap();
        assert!(s.object("eu-docs", "a/b.txt").is_none());
        assert!((101..=112).all(|n| s.stored_bytes(&id(n).node_id()) == 0));
        assert!(t.send(&mut s, Payload::DeleteObject { bucket: "eu-docs".into(), key: "a/b.txt".into() }).is_err());
        t.send(&mut s, Payload::DeleteBucket { name: "eu-docs".into() }).unwrap();
        assert!(s.bucket("eu-docs").is_none());
    }

    #[test]
    fn new_buckets_and_object_keys_lock_a_deposit_returned_when_deleted() {
        let mut s = world();
        let mut t = Tenant { nonce: 0 };
        let me = id(TENANT).node_id();
        let (deposit, fee) = (s.params().entry_deposit_micro, s.params().tx_fee_micro);
        assert!(deposit > 0, "the default genesis asks a deposit");
        let balance = |s: &State| s.account(&me).balance_micro;
        let start = balance(&s);
        // A bucket locks one deposit; a new key another; a new version of that key none.
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        assert_eq!(balance(&s), start - deposit - fee);
        let holders = placed(&s, "eu-docs", 1);
        put(&mut s, &mut t, "eu-docs", "k", MIB, &holders, 1).unwrap();
        assert_eq!(balance(&s), start - 2 * deposit - 2 * fee);
        let holders = placed(&s, "eu-docs", 2);
        put(&mut s, &mut t, "eu-docs", "k", MIB, &holders, 2).unwrap();
        assert_eq!(balance(&s), start - 2 * deposit - 3 * fee);
        // Deleting gives each back to the owner.
        t.send(&mut s, Payload::DeleteObject { bucket: "eu-docs".into(), key: "k".into() }).unwrap();
        assert_eq!(balance(&s), start - deposit - 4 * fee);
        t.send(&mut s, Payload::DeleteBucket { name: "eu-docs".into() }).unwrap();
        assert_eq!(balance(&s), start - 5 * fee);
        // The money total counts what the entries lock.
        let total = s.total_micro();
        bucket_with(&mut s, &mut t, "counted", eu_no_us());
        let holders = placed(&s, "counted", 4);
        put(&mut s, &mut t, "counted", "k", MIB, &holders, 4).unwrap();
        assert_eq!(s.total_micro(), total, "locked deposits are counted, not lost");
        t.send(&mut s, Payload::DeleteObject { bucket: "counted".into(), key: "k".into() }).unwrap();
        t.send(&mut s, Payload::DeleteBucket { name: "counted".into() }).unwrap();
        assert_eq!(s.total_micro(), total);

        // An account that cannot lock the deposit is refused with the numbers, and nothing changes.
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        let poor = balance(&s) - deposit - fee + 1;
        t.send(&mut s, Payload::Transfer { to: id(1).node_id(), amount_micro: poor }).unwrap();
        let left = balance(&s);
        assert!(left < deposit + fee && left >= fee, "{left}");
        let root = s.state_root();
        let holders = placed(&s, "eu-docs", 3);
        let e = put(&mut s, &mut t, "eu-docs", "new", MIB, &holders, 3).unwrap_err();
        assert_eq!(e.code(), "insufficient_funds");
        let text = e.to_string();
        assert!(
            text.contains(&format!("{deposit} deposit a new object key locks")) && text.contains("deleted"),
            "{text}"
        );
        let e = t.send(&mut s, Payload::CreateBucket { name: "more".into(), policy: eu_no_us() }).unwrap_err();
        assert!(e.to_string().contains("a new bucket"), "{e}");
        assert_eq!(s.state_root(), root, "refused entries change nothing");
        // Admission refuses it too.
        let stx = signed(TENANT, t.nonce, Payload::CreateBucket { name: "more".into(), policy: eu_no_us() });
        assert!(s.admit(&stx, 1_000).is_err());

        // A network whose genesis predates deposits asks none.
        let mut s = world();
        s.params_mut().entry_deposit_micro = 0;
        let mut t = Tenant { nonce: 0 };
        let start = s.account(&me).balance_micro;
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        assert_eq!(s.account(&me).balance_micro, start - fee);
    }

    #[test]
    fn full_or_down_nodes_take_no_shards() {
        let mut s = world();
        let mut t = Tenant { nonce: 0 };
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        let holders = placed(&s, "eu-docs", 1);
        // 3 GiB at 4+2 puts 768 MiB (and tags) on each 1 GiB holder; a 2 GiB object would need
        // 512 MiB more: refused, the nodes are full.
        put(&mut s, &mut t, "eu-docs", "big1", 3 * 1024 * MIB, &holders, 1).unwrap();
        let e = put(&mut s, &mut t, "eu-docs", "big2", 2 * 1024 * MIB, &holders, 2).unwrap_err();
        assert!(e.to_string().contains("it is full"), "{e}");
        // A Down holder cannot sign for the PUT to count.
        s.begin_block(2, 2_000);
        s.apply_liveness(&LivenessChange::Down { node: id(holders[0]).node_id() }).unwrap();
        let e = put(&mut s, &mut t, "eu-docs", "small", MIB, &holders, 3).unwrap_err();
        assert!(e.to_string().contains("not a registered storage node that is up"), "{e}");
    }

    #[test]
    fn shards_move_only_away_from_unhealthy_holders_and_stay_inside_the_fence() {
        let mut s = world();
        let mut t = Tenant { nonce: 0 };
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        let holders = placed(&s, "eu-docs", 1);
        put(&mut s, &mut t, "eu-docs", "k", 10 * MIB, &holders, 1).unwrap();
        let o = s.object("eu-docs", "k").unwrap();
        let spare: Vec<u64> =
            [101, 102, 103, 105, 106, 107, 108, 109].into_iter().filter(|n| !holders.contains(n)).collect();
        let network = s.network;
        let mv = |index: u8, to: u64| ShardMove {
            index,
            to: id(to).node_id(),
            receipt: terms("eu-docs", "k", o.version, o.generation + 1, index, o.manifest_root, o.shard_bytes)
                .sign(&id(to), &network),
            expires_ms: EXPIRES,
        };
        let send = |s: &mut State, moves: Vec<ShardMove>| {
            // Anyone may submit a repair: account 1 does.
            let nonce = s.account(&id(1).node_id()).nonce;
            s.apply(&signed(
                1,
                nonce,
                Payload::MoveShards { bucket: "eu-docs".into(), key: "k".into(), version: o.version, moves },
            ))
        };
        // Healthy holder: refused.
        let e = send(&mut s, vec![mv(0, spare[0])]).unwrap_err();
        assert!(e.to_string().contains("which is healthy"), "{e}");
        // Down, but within the grace: refused.
        s.begin_block(2, 5_000);
        s.apply_liveness(&LivenessChange::Down { node: id(holders[0]).node_id() }).unwrap();
        assert_eq!(s.all_objects().len(), 1);
        let policy = s.bucket("eu-docs").unwrap().policy;
        assert_eq!(s.unhealthy_at(&id(holders[0]).node_id(), &policy, 5_000 + 9_999), None);
        assert_eq!(
            s.unhealthy_at(&id(holders[0]).node_id(), &policy, 15_000),
            Some(Unhealthy::Down { since_ms: 5_000 }),
            "a repairer's clock past the grace sees it, though the chain's time stands still"
        );
        assert_eq!(s.unhealthy_at(&id(holders[1]).node_id(), &policy, 99_000), None);
        s.begin_block(3, 5_000 + 9_999);
        assert!(send(&mut s, vec![mv(0, spare[0])]).unwrap_err().to_string().contains("healthy"));
        s.begin_block(4, 5_000 + 10_000);
        // The destination is placement's choice from this state; any other compliant node is
        // refused, so whoever submits first cannot steer the shard.
        let healthy: BTreeMap<usize, NodeId> = o.holders.iter().copied().enumerate().skip(1).collect();
        let exclude: BTreeSet<NodeId> = [o.holders[0]].into();
        let chosen = archipel_placement::replace(
            &eu_no_us(),
            &s.storage_candidates(),
            &o.version.0,
            o.shard_bytes,
            &healthy,
            &[0],
            &exclude,
        )
        .unwrap()[0]
            .1;
        let chosen = seed_of(&chosen);
        let spare: Vec<u64> = std::iter::once(chosen).chain(spare.iter().copied().filter(|n| *n != chosen)).collect();
        let e = send(&mut s, vec![mv(0, spare[1])]).unwrap_err();
        assert!(e.to_string().contains("must move to node"), "{e}");
        // Past the grace: not to a US operator, not to a node holding another shard, not with a
        // forged receipt, not twice the same index.
        let e = send(&mut s, vec![mv(0, 110)]).unwrap_err();
        assert!(e.to_string().contains("outside the geofence"), "{e}");
        assert!(send(&mut s, vec![mv(0, holders[1])]).unwrap_err().to_string().contains("already holds"));
        let mut forged = mv(0, spare[0]);
        forged.receipt =
            terms("eu-docs", "k", o.version, 1, 0, o.manifest_root, o.shard_bytes).sign(&id(spare[1]), &network);
        assert!(send(&mut s, vec![forged]).unwrap_err().to_string().contains("does not verify"));
        // A receipt of an earlier generation (such as the put's) cannot be replayed for a move.
        let mut replayed = mv(0, spare[0]);
        replayed.receipt =
            terms("eu-docs", "k", o.version, 0, 0, o.manifest_root, o.shard_bytes).sign(&id(spare[0]), &network);
        assert!(send(&mut s, vec![replayed]).unwrap_err().to_string().contains("next generation"));
        assert!(send(&mut s, vec![mv(0, spare[0]), mv(0, spare[1])]).is_err());
        // A stale version is refused.
        let nonce = s.account(&id(1).node_id()).nonce;
        let stale = Payload::MoveShards {
            bucket: "eu-docs".into(),
            key: "k".into(),
            version: Hash([9; 32]),
            moves: vec![mv(0, spare[0])],
        };
        assert!(s.apply(&signed(1, nonce, stale)).unwrap_err().to_string().contains("deleted or replaced"));
        // The repair.
        let before = s.stored_bytes(&id(holders[0]).node_id());
        let r = send(&mut s, vec![mv(0, spare[0])]).unwrap();
        assert!(matches!(r, Receipt::ShardsMoved { moved: 1, .. }));
        let after = s.object("eu-docs", "k").unwrap();
        assert_eq!(after.holders[0], id(spare[0]).node_id());
        assert_eq!(after.holders[1..], o.holders[1..]);
        assert_eq!(s.stored_bytes(&id(holders[0]).node_id()), before - o.shard_bytes);
        assert_eq!(s.stored_bytes(&id(spare[0]).node_id()), o.shard_bytes);
    }

    #[test]
    fn a_holder_that_leaves_or_moves_outside_the_fence_is_repaired_at_once() {
        let mut s = world();
        let mut t = Tenant { nonce: 0 };
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        let holders = placed(&s, "eu-docs", 1);
        put(&mut s, &mut t, "eu-docs", "k", MIB, &holders, 1).unwrap();
        let policy = eu_no_us();
        assert_eq!(s.unhealthy(&id(holders[0]).node_id(), &policy), None);
        // Holder 1 is now run by a US company: outside the fence, repairable at once.
        let signer = holders[1];
        t.send(&mut s, Payload::Transfer { to: id(signer).node_id(), amount_micro: 10 }).unwrap();
        let mut d = descriptor(holders[1], "1GiB");
        d.operator_jurisdiction = "US".parse().unwrap();
        d.version = 2;
        s.apply(&signed(
            signer,
            0,
            Payload::UpdateNode { descriptor: SignedDescriptor::sign(&id(signer), d).unwrap() },
        ))
        .unwrap();
        assert_eq!(s.unhealthy(&id(holders[1]).node_id(), &policy), Some(Unhealthy::OutsideFence));
        // A holder that left the registry.
        assert!(s.unhealthy(&id(999).node_id(), &policy) == Some(Unhealthy::Gone));
    }

    #[test]
    fn storage_payloads_round_trip_through_the_codec_and_garbage_is_refused() {
        let s = world();
        let put = put_on(&s, "eu-docs", "k/é/ü", 12345, &[101, 102, 103, 105, 106, 107], 4);
        let payloads = [
            Payload::CreateBucket { name: "eu-docs".into(), policy: eu_no_us() },
            Payload::DeleteBucket { name: "eu-docs".into() },
            Payload::PutObject { put },
            Payload::DeleteObject { bucket: "eu-docs".into(), key: "k".into() },
            Payload::MoveShards {
                bucket: "eu-docs".into(),
                key: "k".into(),
                version: Hash([3; 32]),
                moves: vec![ShardMove { index: 2, to: id(101).node_id(), receipt: [7; 64], expires_ms: 5 }],
            },
            Payload::AuditFailed { bucket: "eu-docs".into(), key: "k".into(), version: Hash([4; 32]), epoch: 99 },
        ];
        for p in payloads {
            let bytes = p.encode();
            assert_eq!(bytes.len(), p.encode_size(), "{}", p.kind());
            assert_eq!(Payload::read(&mut Copying(&bytes[..])).unwrap(), p);
            for cut in 0..bytes.len() {
                assert!(Payload::read(&mut Copying(&bytes[..cut])).is_err(), "{} cut at {cut}", p.kind());
            }
        }
        // No moves, or a non-canonical policy.
        let mut none = vec![10u8];
        for part in [&b"eu-docs"[..], b"k"] {
            (part.len() as u32).write(&mut none);
            none.extend_from_slice(part);
        }
        none.extend_from_slice(&[0; 32]);
        none.push(0);
        assert!(Payload::read(&mut Copying(&none[..])).is_err());
        let mut spaced = vec![6u8];
        (7u32).write(&mut spaced);
        spaced.extend_from_slice(b"eu-docs");
        let json = b" {\"code\":\"4+2\",\"min_regions\":1,\"min_operators\":1}".to_vec();
        json.write(&mut spaced);
        assert!(Payload::read(&mut Copying(&spaced[..])).is_err());
    }

    #[test]
    fn storage_entries_survive_a_commit_and_reopen() {
        let (store, mut s, mut t) = eu_docs_on_a_store();
        let holders = placed(&s, "eu-docs", 1);
        put(&mut s, &mut t, "eu-docs", "k", MIB, &holders, 1).unwrap();
        let c = s.commit().unwrap();
        crate::store::StateStore::commit(&*store, &c, true).unwrap();
        s.committed();
        let opened = State::open(store).unwrap().unwrap();
        assert_eq!(opened.state_root(), s.state_root());
        assert_eq!(opened.rebuilt_root(), s.state_root());
        assert_eq!(opened.object("eu-docs", "k"), s.object("eu-docs", "k"));
        assert_eq!(opened.bucket("eu-docs").map(|b| b.objects), Some(1));
        assert!(opened.keys().contains(&StateKey::Object(object_id("eu-docs", "k"))));
        let (value, proof) = opened.prove(&StateKey::Object(object_id("eu-docs", "k"))).unwrap();
        assert!(value.is_some());
        let shown = proof.verify(&opened.state_root(), &state_key_hash_of("eu-docs", "k")).unwrap();
        assert_eq!(shown, crate::trie::Proven::Present(crate::trie::value_hash(&value.unwrap())));
    }

    /// The world over a store of its own, with the tenant's bucket `eu-docs` (EU only, no US
    /// operators).
    fn eu_docs_on_a_store() -> (std::sync::Arc<crate::store::MemoryStore>, State, Tenant) {
        let store = std::sync::Arc::new(crate::store::MemoryStore::default());
        let mut s = world().with_store(store.clone());
        let mut t = Tenant { nonce: 0 };
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        (store, s, t)
    }

    /// Commits `s` to `store` as the chain does.
    fn commit_to(s: &mut State, store: &crate::store::MemoryStore) {
        let c = s.commit().unwrap();
        crate::store::StateStore::commit(store, &c, true).unwrap();
        s.committed();
    }

    fn keys_of(objects: &[ObjectRecord]) -> Vec<&str> {
        objects.iter().map(|o| o.key.as_str()).collect()
    }

    #[test]
    fn the_index_lists_by_key_and_follows_puts_deletes_moves_and_commits() {
        let (store, mut s, mut t) = eu_docs_on_a_store();
        bucket_with(&mut s, &mut t, "eu-more", eu_no_us());
        let holders = placed(&s, "eu-docs", 1);
        for (n, key) in ["c", "a", "b/2", "\u{e9}t\u{e9}", "b/1"].into_iter().enumerate() {
            put(&mut s, &mut t, "eu-docs", key, MIB, &holders, n as u8 + 1).unwrap();
        }
        let other = placed(&s, "eu-more", 9);
        put(&mut s, &mut t, "eu-more", "a", MIB, &other, 9).unwrap();
        let list = |s: &State, prefix: &str, after: Option<&str>, limit: usize| {
            let got = s.list_objects("eu-docs", prefix, after.map(str::as_bytes), limit).unwrap();
            got.iter().map(|o| o.key.clone()).collect::<Vec<_>>()
        };
        let all = ["a", "b/1", "b/2", "c", "\u{e9}t\u{e9}"];
        // Before a commit the rows are not in the store yet: the listing reads the state's writes.
        assert_eq!(list(&s, "", None, 10), all);
        commit_to(&mut s, &store);
        assert_eq!(list(&s, "", None, 10), all, "from the store's rows after the commit");
        assert_eq!(list(&s, "b/", None, 10), ["b/1", "b/2"]);
        assert_eq!(list(&s, "", Some("a"), 10), all[1..]);
        assert_eq!(list(&s, "", Some("b/"), 2), ["b/1", "b/2"], "after need not be a key");
        assert_eq!(list(&s, "", None, 2), ["a", "b/1"]);
        assert_eq!(list(&s, "\u{e9}", None, 10), ["\u{e9}t\u{e9}"], "a multi-byte prefix");
        // Past the whole `b/` group, as a delimiter listing skips it: 0xff follows no UTF-8 byte.
        let past_group = [&b"b/"[..], &[0xff]].concat();
        let got = s.list_objects("eu-docs", "", Some(&past_group), 10).unwrap();
        assert_eq!(keys_of(&got), ["c", "\u{e9}t\u{e9}"]);
        assert_eq!(keys_of(&s.list_objects("eu-more", "", None, 10).unwrap()), ["a"]);
        assert!(s.list_objects("no-such", "", None, 10).unwrap().is_empty());

        // Uncommitted changes over committed rows: a delete hides a row, a new key joins in order.
        s.begin_block(2, 2_000);
        t.send(&mut s, Payload::DeleteObject { bucket: "eu-docs".into(), key: "b/1".into() }).unwrap();
        put(&mut s, &mut t, "eu-docs", "bb", MIB, &holders, 6).unwrap();
        let now = ["a", "b/2", "bb", "c", "\u{e9}t\u{e9}"];
        assert_eq!(list(&s, "", None, 10), now);
        assert_eq!(list(&s, "", None, 3), now[..3], "a page is full although a stored row was deleted");
        commit_to(&mut s, &store);
        assert_eq!(list(&s, "", None, 10), now);
        let rows = crate::store::StateStore::index_scan(&*store, b"name/", None, 100).unwrap();
        assert_eq!(rows.len(), 6, "one name row per object, the deleted one's removed");

        // Holders: every object a node holds, and every node that holds one.
        let everything = s.all_objects();
        for n in 101..=112 {
            let node = id(n).node_id();
            let mut want: Vec<Hash> =
                everything.iter().filter(|o| o.holders.contains(&node)).map(|o| o.version).collect();
            let mut got: Vec<Hash> = s.objects_on(&node).iter().map(|o| o.version).collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "objects on node {n}");
        }
        let holding: BTreeSet<NodeId> = everything.iter().flat_map(|o| o.holders.iter().copied()).collect();
        assert_eq!(s.holder_nodes(), holding);

        // Reopened from the store, the same listing.
        let opened = State::open(store.clone()).unwrap().unwrap();
        assert_eq!(list(&opened, "", None, 10), now);
        assert!(opened.repair_candidates().is_empty(), "every holder is up where it registered");

        // A holder that moves is a repair candidate with exactly the objects it holds.
        let mover = holders[0];
        t.send(&mut s, Payload::Transfer { to: id(mover).node_id(), amount_micro: 10 }).unwrap();
        let mut d = descriptor(mover, "1GiB");
        d.region = "eu-fr".parse().unwrap();
        d.version = 2;
        let update = Payload::UpdateNode { descriptor: SignedDescriptor::sign(&id(mover), d).unwrap() };
        s.apply(&signed(mover, 0, update)).unwrap();
        assert!(s.nodes().get(&id(mover).node_id()).unwrap().relocated);
        let mut got: Vec<Hash> = s.repair_candidates().iter().map(|o| o.version).collect();
        let mut want: Vec<Hash> = s.objects_on(&id(mover).node_id()).iter().map(|o| o.version).collect();
        got.sort();
        want.sort();
        assert!(got.len() >= 5, "the five eu-docs objects at least");
        assert_eq!(got, want);
    }

    #[test]
    fn the_index_stays_the_entries_through_forks_commits_and_crashes() {
        let (store, mut s, mut t) = eu_docs_on_a_store();
        commit_to(&mut s, &store);
        let check = |when: &str| {
            if let Err(e) = crate::listing::check_index(&*store) {
                panic!("{when}: {e}");
            }
        };
        // Puts, overwrites and deletes of a handful of keys, block after block; the chain's
        // commit patterns: plain, a block executed on a fork before its parent's commit, and a
        // power cut that loses what was not durable.
        let ops = |s: &mut State, t: &mut Tenant, h: u64| {
            let key = format!("k{}", h % 5);
            if h % 4 == 3 && s.object("eu-docs", &key).is_some() {
                t.send(s, Payload::DeleteObject { bucket: "eu-docs".into(), key }).unwrap();
            } else {
                let holders = placed(s, "eu-docs", h as u8);
                put(s, t, "eu-docs", &key, MIB * (1 + h % 3), &holders, h as u8).unwrap();
            }
        };
        let mut h = 2;
        let mut crashed = BTreeSet::new();
        let mut cuts = 0;
        while h < 40 {
            s.begin_block(h, h * 1_000);
            ops(&mut s, &mut t, h);
            let crash = h % 7 == 4 && crashed.insert(h);
            match (crash, h % 3) {
                (true, _) => {
                    // A power cut: what was not durable is lost; the state is what the store holds.
                    let c = s.commit().unwrap();
                    crate::store::StateStore::commit(&*store, &c, false).unwrap();
                    store.crash();
                    cuts += 1;
                    check(&format!("after a power cut at block {h}"));
                    s = State::open(store.clone()).unwrap().unwrap();
                    assert!(s.chain.height < h, "the block was lost");
                    h = s.chain.height;
                    t.nonce = s.account(&id(TENANT).node_id()).nonce;
                }
                (false, 0) => {
                    // The next block runs on a fork while this one is written.
                    let c = s.commit().unwrap();
                    let mut next = s.clone();
                    next.begin_block(h + 1, (h + 1) * 1_000);
                    ops(&mut next, &mut t, h + 1);
                    crate::store::StateStore::commit(&*store, &c, h % 2 == 0).unwrap();
                    next.forget_committed_through(h);
                    check(&format!("after the commit of block {h}, block {} on a fork", h + 1));
                    s = next;
                    h += 1;
                }
                _ => {
                    let durable = h % 2 == 0;
                    let c = s.commit().unwrap();
                    crate::store::StateStore::commit(&*store, &c, durable).unwrap();
                    s.committed();
                    check(&format!("after the commit of block {h}"));
                }
            }
            h += 1;
        }
        let c = s.commit().unwrap();
        crate::store::StateStore::commit(&*store, &c, true).unwrap();
        check("at the end");
        assert_eq!(cuts, 4, "power cuts at blocks 11, 18, 32 and 39 (forks skip 4 and 25)");
        assert!(!s.list_objects("eu-docs", "", None, 10).unwrap().is_empty());
    }

    #[test]
    fn every_object_has_one_auditor_per_epoch_found_from_the_holders_it_audits() {
        let (store, mut s, mut t) = eu_docs_on_a_store();
        for n in 1..=12u8 {
            let holders = placed(&s, "eu-docs", n);
            put(&mut s, &mut t, "eu-docs", &format!("k{n}"), MIB, &holders, n).unwrap();
        }
        put(&mut s, &mut t, "eu-docs", "empty", 0, &[], 13).unwrap();
        commit_to(&mut s, &store);
        let live = s.live_storage_nodes();
        let objects = s.all_objects();
        for epoch in 0..20 {
            // Each node's duties, read from the index, against the rule applied to every object.
            let mut seen = BTreeMap::new();
            for me in &live {
                for o in s.audit_duties(me, epoch, &live) {
                    assert_eq!(s.auditor_of(&o, epoch), Some(*me), "epoch {epoch}: {}", o.key);
                    assert!(seen.insert(o.key.clone(), *me).is_none(), "epoch {epoch}: {} audited twice", o.key);
                }
            }
            for o in &objects {
                let auditor = s.auditor_of(o, epoch);
                if o.holders.is_empty() {
                    assert_eq!(auditor, None);
                    continue;
                }
                let (index, _) = audit_challenge(o, epoch);
                assert_ne!(auditor, Some(o.holders[usize::from(index)]), "a holder never audits itself");
                assert_eq!(seen.get(&o.key), auditor.as_ref(), "epoch {epoch}: {} has one auditor", o.key);
            }
        }
        // The pick moves from epoch to epoch.
        let h = objects.iter().find(|o| !o.holders.is_empty()).unwrap().holders[0];
        let picks: BTreeSet<NodeId> = (0..20).filter_map(|e| holder_auditor(&h, e, &live)).collect();
        assert!(picks.len() > 3, "{picks:?}");
        assert_eq!(holder_auditor(&h, 0, &[h]), None, "alone, nobody audits it");
    }

    #[test]
    fn holders_that_go_down_leave_or_come_back_elsewhere_are_repair_candidates() {
        let (store, mut s, mut t) = eu_docs_on_a_store();
        let holders = placed(&s, "eu-docs", 1);
        put(&mut s, &mut t, "eu-docs", "k", MIB, &holders, 1).unwrap();
        commit_to(&mut s, &store);
        assert!(s.repair_candidates().is_empty());
        let candidates = |s: &State| keys_of(&s.repair_candidates()).into_iter().map(String::from).collect::<Vec<_>>();
        // Down: a candidate (the repairer then waits out the grace).
        let mut down = s.clone();
        down.begin_block(2, 100_000);
        down.apply_liveness(&LivenessChange::Down { node: id(holders[0]).node_id() }).unwrap();
        assert_eq!(candidates(&down), ["k"]);
        // Left the registry: a candidate, and still one after it registers again elsewhere.
        s.begin_block(2, 2_000);
        let leaver = *holders.iter().find(|h| **h != 101).expect("a holder that is not the validator");
        s.apply(&signed(leaver, 0, Payload::LeaveNode { node: id(leaver).node_id() })).unwrap();
        assert_eq!(candidates(&s), ["k"]);
        commit_to(&mut s, &store);
        assert_eq!(candidates(&s), ["k"], "from the store's rows");
        s.begin_block(3, 3_000);
        s.params_mut().node_deposit_micro = 0;
        let mut d = descriptor(leaver, "1GiB");
        d.region = "us-east".parse().unwrap();
        d.country = "US".parse().unwrap();
        d.version = 2;
        let again = Payload::register_node(
            &id(leaver),
            &s.network,
            &id(leaver).node_id(),
            SignedDescriptor::sign(&id(leaver), d).unwrap(),
        );
        s.apply(&signed(leaver, 1, again)).unwrap();
        s.begin_block(5, 5_000);
        up(&mut s, leaver);
        assert_eq!(s.lease_status(&id(leaver).node_id()), LeaseStatus::Up);
        assert_eq!(s.unhealthy(&id(leaver).node_id(), &eu_no_us()), Some(Unhealthy::OutsideFence));
        assert_eq!(candidates(&s), ["k"], "a returning node is checked like a moved one");
    }

    #[test]
    fn an_audit_report_against_an_empty_object_is_refused_not_a_crash() {
        let mut s = world();
        let mut t = Tenant { nonce: 0 };
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        put(&mut s, &mut t, "eu-docs", "empty", 0, &[], 1).unwrap();
        let o = s.object("eu-docs", "empty").unwrap();
        assert!(o.holders.is_empty());
        let epoch = s.audit_epoch(s.chain.timestamp_ms);
        assert_eq!(s.auditor_of(&o, epoch), None, "an object without shards has nobody to audit it");
        let auditor = id(102).node_id();
        let report = Payload::AuditFailed { bucket: "eu-docs".into(), key: "empty".into(), version: o.version, epoch };
        let nonce = s.account(&auditor).nonce;
        let e = s.apply(&signed(seed_of(&auditor), nonce, report)).unwrap_err();
        assert!(e.to_string().contains("no shards to audit"), "{e}");
        // Applied anyway (a block built by a faulty proposer): no panic, nothing marked.
        let r = s.apply_audit_failed("eu-docs", "empty", epoch);
        assert!(matches!(r, Receipt::AuditFailed { .. }));
        assert!(s.object("eu-docs", "empty").unwrap().suspect.is_empty());
    }

    #[test]
    fn a_failed_audit_by_its_auditor_marks_the_shard_for_repair_and_costs_reputation() {
        let mut s = world();
        let mut t = Tenant { nonce: 0 };
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        let holders = placed(&s, "eu-docs", 1);
        put(&mut s, &mut t, "eu-docs", "k", 20 * MIB, &holders, 1).unwrap();
        let o = s.object("eu-docs", "k").unwrap();
        let epoch = s.audit_epoch(s.chain.timestamp_ms);
        let auditor = s.auditor_of(&o, epoch).unwrap();
        let (index, segment) = audit_challenge(&o, epoch);
        assert_ne!(auditor, o.holders[usize::from(index)], "a holder never audits itself");
        assert!(usize::from(index) < 6 && segment < o.segments());
        let holder = o.holders[usize::from(index)];
        let report =
            |epoch| Payload::AuditFailed { bucket: "eu-docs".into(), key: "k".into(), version: o.version, epoch };
        let as_node = |s: &mut State, node: NodeId, p: Payload| {
            let seed = seed_of(&node);
            let nonce = s.account(&node).nonce;
            s.apply(&signed(seed, nonce, p))
        };
        // Only the epoch's auditor may report, and only for this epoch or the one before.
        let stranger = (101..=112).map(|n| id(n).node_id()).find(|n| *n != auditor && !o.holders.contains(n)).unwrap();
        let e = as_node(&mut s, stranger, report(epoch)).unwrap_err();
        assert!(e.to_string().contains("is not the auditor"), "{e}");
        let e = as_node(&mut s, auditor, report(epoch + 1)).unwrap_err();
        assert!(e.to_string().contains("not the current one"), "{e}");
        let r = as_node(&mut s, auditor, report(epoch)).unwrap();
        assert!(matches!(r, Receipt::AuditFailed { holder: h, index: i, .. } if h == holder && i == index), "{r:?}");
        assert_eq!(s.reputation(&holder), archipel_placement::MAX_REPUTATION - AUDIT_PENALTY);
        assert_eq!(s.object("eu-docs", "k").unwrap().suspect, vec![index]);
        let e = as_node(&mut s, auditor, report(epoch)).unwrap_err();
        assert!(e.to_string().contains("failed an audit already"), "{e}");
        let o_suspect = s.object("eu-docs", "k").unwrap();
        assert_eq!(keys_of(&s.suspect_objects()), ["k"]);
        assert_eq!(keys_of(&s.repair_candidates()), ["k"], "a suspect shard is repair work although its holder is up");
        let store = std::sync::Arc::new(crate::store::MemoryStore::default());
        let mut committed = s.clone().with_store(store.clone());
        commit_to(&mut committed, &store);
        assert_eq!(keys_of(&committed.repair_candidates()), ["k"], "from the store's suspect row");
        // The suspect shard may move although its holder is up; the move clears it.
        let healthy: BTreeMap<usize, NodeId> =
            o.holders.iter().copied().enumerate().filter(|(i, _)| *i != usize::from(index)).collect();
        let moved = archipel_placement::replace(
            &eu_no_us(),
            &s.storage_candidates(),
            &o.version.0,
            o.shard_bytes,
            &healthy,
            &[usize::from(index)],
            &[holder].into(),
        )
        .unwrap();
        let spare = seed_of(&moved[0].1);
        let network = s.network;
        let mv = ShardMove {
            index,
            to: id(spare).node_id(),
            receipt: terms("eu-docs", "k", o.version, 1, index, o.manifest_root, o.shard_bytes)
                .sign(&id(spare), &network),
            expires_ms: EXPIRES,
        };
        let other = (index + 1) % 6;
        let healthy_move = ShardMove {
            index: other,
            to: id(spare).node_id(),
            receipt: terms("eu-docs", "k", o.version, 1, other, o.manifest_root, o.shard_bytes)
                .sign(&id(spare), &network),
            expires_ms: EXPIRES,
        };
        let mv_payload = |m: ShardMove| Payload::MoveShards {
            bucket: "eu-docs".into(),
            key: "k".into(),
            version: o.version,
            moves: vec![m],
        };
        assert!(s.apply(&signed(1, 0, mv_payload(healthy_move))).unwrap_err().to_string().contains("healthy"));
        s.apply(&signed(1, 0, mv_payload(mv))).unwrap();
        let after = s.object("eu-docs", "k").unwrap();
        assert!(after.suspect.is_empty() && after.holders[usize::from(index)] == id(spare).node_id());
        assert!(s.repair_candidates().is_empty());
        // The rows follow the move: the old holder's and the suspect row go, the new holder's comes.
        let key = StateKey::Object(object_id("eu-docs", "k")).to_bytes();
        let (before, after_json) = (serde_json::to_vec(&o_suspect).unwrap(), serde_json::to_vec(&after).unwrap());
        let changes = crate::listing::index_changes(&key, Some(&before), Some(&after_json));
        let removed: Vec<String> =
            changes.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect();
        let added: Vec<String> =
            changes.iter().filter(|(_, v)| v.is_some()).map(|(k, _)| String::from_utf8_lossy(k).into_owned()).collect();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(removed.iter().any(|k| k.starts_with("suspect/")));
        assert!(removed.iter().any(|k| k.starts_with(&format!("holder/{holder}/"))));
        assert_eq!(added.len(), 1, "only the new holder's row is written: {added:?}");
        assert!(added[0].starts_with(&format!("holder/{}/", id(spare).node_id())));
        // Reputation falls with every failure; a node below the floor takes no new shards.
        for _ in 0..3 {
            let r = s.reputation(&holder).saturating_sub(AUDIT_PENALTY);
            s.reputations.set(holder, Some(r));
        }
        assert_eq!(s.reputation(&holder), 0);
        assert!(
            !s.storage_candidates().iter().any(|c| c.node == holder && archipel_placement::eligible(&eu_no_us(), c, 1))
        );
        // And the ledger refuses it as a new holder, whoever placed it there: in a PutObject
        // (the same holders as the first object, which it was one of) and in a move.
        let e = put(&mut s, &mut t, "eu-docs", "k2", 20 * MIB, &holders, 2).unwrap_err().to_string();
        assert!(e.contains("reputation 0") && e.contains("below the 200"), "{e}");
        assert!(s.object("eu-docs", "k2").is_none());
        let e = s.check_one_new_holder(&eu_no_us(), &holder, 1).unwrap_err().to_string();
        assert!(e.contains("reputation 0"), "{e}");
        assert!(s.check_one_new_holder(&eu_no_us(), &id(spare).node_id(), 1).is_ok());
    }

    #[test]
    fn manifests_round_trip_and_their_root_covers_every_field() {
        let code = ErasureCode::DEFAULT;
        let m = Manifest {
            version: Hash([1; 32]),
            size: 20 * MIB,
            segment_bytes: 8 * MIB,
            code,
            wrapped_key: [5; WRAPPED_KEY_BYTES],
            segments: (0..3u8).map(|s| (0..6u8).map(|i| [s * 16 + i; 32]).collect()).collect(),
            meta: vec![],
        };
        let bytes = m.to_bytes();
        assert_eq!(Manifest::from_bytes(&bytes).unwrap(), m);
        assert_eq!(m.cipher_len(2), 4 * MIB + 16);
        assert_eq!(m.shard_len(0) * 2 + m.shard_len(2), shard_bytes_per_holder(code, m.size, m.segment_bytes));
        let root = m.root();
        let mut variants = vec![];
        let mut v = m.clone();
        v.version = Hash([2; 32]);
        variants.push(v);
        let mut v = m.clone();
        v.wrapped_key[0] ^= 1;
        variants.push(v);
        let mut v = m.clone();
        v.segments[2][5][0] ^= 1;
        variants.push(v);
        let mut v = m.clone();
        v.segments.swap(0, 1);
        variants.push(v);
        let mut with_meta = m.clone();
        with_meta.meta = vec![7; 40];
        variants.push(with_meta.clone());
        let mut v = with_meta.clone();
        v.meta[39] ^= 1;
        variants.push(v);
        for v in &variants {
            assert_ne!(v.root(), root);
        }
        assert_ne!(variants[variants.len() - 1].root(), with_meta.root());
        // Metadata rides in the v2 layout and round-trips; its length is bounded and exact.
        let meta_bytes = with_meta.to_bytes();
        assert!(meta_bytes.starts_with(MANIFEST_MAGIC_V2) && bytes.starts_with(MANIFEST_MAGIC));
        assert_eq!(Manifest::from_bytes(&meta_bytes).unwrap(), with_meta);
        assert!(Manifest::from_bytes(&meta_bytes[..meta_bytes.len() - 1]).is_err());
        let mut huge = with_meta.clone();
        huge.meta = vec![1; MAX_MANIFEST_META_BYTES + 1];
        assert!(Manifest::from_bytes(&huge.to_bytes()).unwrap_err().contains("metadata"));
        let mut lying = meta_bytes.clone();
        let at = MANIFEST_MAGIC_V2.len() + 32 + 18 + WRAPPED_KEY_BYTES;
        lying[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Manifest::from_bytes(&lying).is_err());
        // Truncated, padded, or with a layout that disagrees with its hash count.
        assert!(Manifest::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(Manifest::from_bytes(&[bytes.clone(), vec![0]].concat()).is_err());
        let mut bigger = m.clone();
        bigger.size = 30 * MIB;
        assert!(Manifest::from_bytes(&bigger.to_bytes()).unwrap_err().contains("4 segments"));
        assert!(Manifest::from_bytes(b"nonsense").is_err());
        assert!(Manifest::from_bytes(&[]).is_err());
    }

    fn state_key_hash_of(bucket: &str, key: &str) -> Hash {
        crate::state::state_key_hash(&StateKey::Object(object_id(bucket, key)))
    }
}
