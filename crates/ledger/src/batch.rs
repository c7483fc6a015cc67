//! Group commit of small objects: `PutObjects`, many new object versions in one bucket under one
//! signature, one nonce and one receipt per holder.
//!
//! A `PutObject` carries one receipt per shard: k+m Ed25519 signatures that every validator and
//! follower checks. For 4 KiB objects that check, and the transaction around it, cost more than
//! the object (measured: ~20 ms of CPU per small PUT over the devnet's processes). A batch instead
//! lists each distinct holder once, with one signature over everything it holds of the batch
//! ([`batch_receipt_bytes`]: each item's object, version, shard index, manifest root and bytes, in
//! the batch's order), and each put names its holders by their place in that list. The state it
//! leaves is exactly that of the same puts sent one by one: one object record per put, the same
//! holders, bytes and deposits.
//!
//! All of it or nothing: a batch is refused whole when one put would be (a client then sends its
//! objects one by one to learn which). Keys are distinct within a batch; each put pays the
//! transaction fee and, for a new key, the entry deposit, as it would alone; each holder needs
//! room for everything the batch gives it.

use crate::hash::{Hash, hex64};
use crate::state::{Receipt, State};
use crate::storage::{
    MAX_BUCKET_NAME, MAX_ETAG_BYTES, MAX_HOLDERS, MAX_OBJECT_KEY_BYTES, ObjectPut, ShardHolder, object_id, read_str,
    shard_bytes_per_holder, str_size, write_str,
};
use crate::tx::TxError;
use archipel_crypto::{Identity, SignatureItem, verify_signature_memo, verify_signatures_memo};
use archipel_types::NodeId;
use bytes::BufMut;
use commonware_codec::{Buf, EncodeSize, Error as CodecError, Read, ReadExt, Write};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Signature namespace of a holder's receipt for its part of a batch.
pub const BATCH_RECEIPT_NAMESPACE: &[u8] = b"archipel/shard-receipt-batch/v1";
/// Most objects one `PutObjects` carries.
pub const MAX_BATCH_PUTS: usize = 64;

/// One object of a batch: an [`ObjectPut`] whose holders are places in [`PutBatch::holders`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchedPut {
    /// The key.
    pub key: String,
    /// The version id ([`crate::storage::version_id`] of the signer, the object and `nonce`).
    pub version: Hash,
    /// The nonce the version was made from.
    pub nonce: Hash,
    /// Plaintext bytes.
    pub size: u64,
    /// Plaintext bytes per segment.
    pub segment_bytes: u64,
    /// Merkle root of the manifest.
    pub manifest_root: Hash,
    /// The ETag.
    pub etag: String,
    /// Holder `i` (of shard `i`) is `holders[self.holders[i]]` of the batch.
    pub holders: Vec<u8>,
}

/// One holder of a batch, with its one receipt for everything it holds of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHolder {
    /// The node.
    pub node: NodeId,
    /// Its signature over [`batch_receipt_bytes`] of its items.
    #[serde(with = "hex64")]
    pub receipt: [u8; 64],
    /// When the receipt expires.
    pub expires_ms: u64,
}

/// The payload of `PutObjects`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutBatch {
    /// The bucket every put goes to.
    pub bucket: String,
    /// 1 to [`MAX_BATCH_PUTS`] puts, distinct keys.
    pub puts: Vec<BatchedPut>,
    /// Every holder the puts name, once each, each named by at least one put (at most 255).
    pub holders: Vec<BatchHolder>,
}

/// What a holder vouches for of one put of a batch: as a [`crate::storage::ReceiptTerms`] of
/// generation 0, without the network and expiry, which the receipt covers once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchItem {
    /// [`object_id`] of the bucket and key.
    pub object: Hash,
    /// The version.
    pub version: Hash,
    /// The shard index this holder has of it.
    pub index: u8,
    /// The manifest root.
    pub manifest_root: Hash,
    /// Bytes of the holder's shards of it.
    pub shard_bytes: u64,
}

/// The bytes a holder signs for `items` (in the batch's order), valid until `expires_ms`, on
/// `network`.
pub fn batch_receipt_bytes(network: &Hash, expires_ms: u64, items: &[BatchItem]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + 8 + 4 + items.len() * 105);
    out.extend_from_slice(&network.0);
    out.extend_from_slice(&expires_ms.to_be_bytes());
    out.extend_from_slice(&(items.len() as u32).to_be_bytes());
    for it in items {
        out.extend_from_slice(&it.object.0);
        out.extend_from_slice(&it.version.0);
        out.push(it.index);
        out.extend_from_slice(&it.manifest_root.0);
        out.extend_from_slice(&it.shard_bytes.to_be_bytes());
    }
    out
}

/// A holder's signature over `items`.
pub fn sign_batch_receipt(holder: &Identity, network: &Hash, expires_ms: u64, items: &[BatchItem]) -> [u8; 64] {
    holder.sign(BATCH_RECEIPT_NAMESPACE, &batch_receipt_bytes(network, expires_ms, items))
}

impl PutBatch {
    /// Put `i` as the [`ObjectPut`] it stands for (each holder with the batch's receipt, which
    /// is not a single receipt: for the checks that do not read signatures, and for applying).
    pub fn object_put(&self, put: &BatchedPut) -> ObjectPut {
        ObjectPut {
            bucket: self.bucket.clone(),
            key: put.key.clone(),
            version: put.version,
            nonce: put.nonce,
            size: put.size,
            segment_bytes: put.segment_bytes,
            manifest_root: put.manifest_root,
            etag: put.etag.clone(),
            holders: put
                .holders
                .iter()
                .filter_map(|&at| self.holders.get(usize::from(at)))
                .map(|h| ShardHolder { node: h.node, receipt: h.receipt, expires_ms: h.expires_ms })
                .collect(),
        }
    }

    /// What holder `at` (a place in [`PutBatch::holders`]) vouches for, in the batch's order,
    /// when each holder of an object of `size` bytes in `segment_bytes` takes `shard_bytes(size,
    /// segment_bytes)`.
    pub fn items_of(&self, at: usize, shard_bytes: impl Fn(u64, u64) -> u64) -> Vec<BatchItem> {
        let mut items = Vec::new();
        for p in &self.puts {
            for (index, &h) in p.holders.iter().enumerate() {
                if usize::from(h) == at {
                    items.push(BatchItem {
                        object: object_id(&self.bucket, &p.key),
                        version: p.version,
                        index: index as u8,
                        manifest_root: p.manifest_root,
                        shard_bytes: shard_bytes(p.size, p.segment_bytes),
                    });
                }
            }
        }
        items
    }
}

impl State {
    /// Every check of a `PutObjects` but the receipts' signatures.
    pub(crate) fn check_put_batch_cheap(&self, signer: NodeId, fee: u64, batch: &PutBatch) -> Result<(), TxError> {
        let bad = |m: String| Err(TxError::NotAllowed(m));
        if batch.puts.is_empty() || batch.puts.len() > MAX_BATCH_PUTS {
            return bad(format!("a batch carries 1 to {MAX_BATCH_PUTS} objects, not {}", batch.puts.len()));
        }
        if batch.holders.len() > usize::from(u8::MAX) {
            return bad(format!("a batch lists at most 255 holders, not {}", batch.holders.len()));
        }
        let bucket = self.owned_bucket(signer, &batch.bucket)?;
        let mut nodes = BTreeSet::new();
        for h in &batch.holders {
            if !nodes.insert(h.node) {
                return bad(format!("holder {} is listed twice in the batch: list each once", h.node.short()));
            }
        }
        let mut named = vec![false; batch.holders.len()];
        let mut keys = BTreeSet::new();
        let mut new_keys = 0u64;
        let mut lists: Vec<(Vec<NodeId>, u64)> = Vec::with_capacity(batch.puts.len());
        for p in &batch.puts {
            if !keys.insert(p.key.as_str()) {
                return bad(format!("key {:?} is twice in the batch: put it once", p.key));
            }
            for &at in &p.holders {
                match named.get_mut(usize::from(at)) {
                    Some(n) => *n = true,
                    None => {
                        return bad(format!(
                            "object {:?} names holder {at} of a batch listing {}",
                            p.key,
                            batch.holders.len()
                        ));
                    }
                }
            }
            if self.object(&batch.bucket, &p.key).is_none() {
                new_keys += 1;
            }
            let put = batch.object_put(p);
            let need = self.check_put_shape(signer, &bucket, &put)?;
            lists.push((put.holders.iter().map(|h| h.node).collect(), need));
        }
        if let Some(unused) = named.iter().position(|n| !n) {
            return bad(format!(
                "holder {} is listed in the batch but holds none of its objects: leave it out",
                batch.holders[unused].node.short()
            ));
        }
        let deposit_micro = self.params.entry_deposit_micro.saturating_mul(new_keys);
        if let Some(balance_micro) = self.short_of(signer, deposit_micro, fee) {
            return Err(TxError::InsufficientEntryDeposit {
                balance_micro,
                deposit_micro,
                fee_micro: fee,
                what: "the batch's new object keys",
                what_short: "object",
            });
        }
        let lists: Vec<(&[NodeId], u64)> =
            lists.iter().filter(|(n, _)| !n.is_empty()).map(|(n, need)| (n.as_slice(), *need)).collect();
        self.check_holder_lists(&bucket.policy, &lists)
    }

    /// Every check of a `PutObjects`, each holder's receipt included.
    pub(crate) fn check_put_batch(&self, signer: NodeId, fee: u64, batch: &PutBatch) -> Result<(), TxError> {
        self.check_put_batch_cheap(signer, fee, batch)?;
        let Some(code) = self.bucket(&batch.bucket).map(|b| b.policy.code) else {
            return Ok(());
        };
        let signed: Vec<Vec<u8>> = (0..batch.holders.len())
            .map(|at| {
                let items = batch.items_of(at, |size, segment_bytes| shard_bytes_per_holder(code, size, segment_bytes));
                batch_receipt_bytes(&self.network, batch.holders[at].expires_ms, &items)
            })
            .collect();
        let items: Vec<SignatureItem<'_>> =
            batch.holders.iter().zip(&signed).map(|(h, b)| (&h.node, b.as_slice(), &h.receipt)).collect();
        if verify_signatures_memo(BATCH_RECEIPT_NAMESPACE, &items) {
            return Ok(());
        }
        for (h, b) in batch.holders.iter().zip(&signed) {
            if verify_signature_memo(&h.node, BATCH_RECEIPT_NAMESPACE, b, &h.receipt).is_err() {
                return Err(TxError::NotAllowed(format!(
                    "the batch receipt of node {} does not verify: it did not sign that it holds its shards of these \
                     objects",
                    h.node.short()
                )));
            }
        }
        Ok(())
    }

    /// Stores every put of a checked batch, as `PutObject` would one by one.
    pub(crate) fn apply_put_batch(&mut self, batch: &PutBatch) -> Receipt {
        let mut stored = Vec::with_capacity(batch.puts.len());
        for p in &batch.puts {
            let replaced = match self.apply_put_object(&batch.object_put(p)) {
                Receipt::ObjectStored { replaced, .. } => replaced,
                _ => None,
            };
            stored.push(StoredVersion { key: p.key.clone(), version: p.version, replaced });
        }
        Receipt::ObjectsStored { bucket: batch.bucket.clone(), stored }
    }
}

/// One object a `PutObjects` stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVersion {
    /// Key.
    pub key: String,
    /// The new version.
    pub version: Hash,
    /// The version it replaced, whose shards the holders may now delete.
    pub replaced: Option<Hash>,
}

impl Write for PutBatch {
    fn write(&self, buf: &mut impl BufMut) {
        write_str(&self.bucket, buf);
        // Counts that do not fit are written as 0, which never decodes.
        u8::try_from(self.holders.len()).unwrap_or(0).write(buf);
        for h in &self.holders {
            h.node.0.write(buf);
            h.receipt.write(buf);
            h.expires_ms.write(buf);
        }
        u8::try_from(self.puts.len()).unwrap_or(0).write(buf);
        for p in &self.puts {
            write_str(&p.key, buf);
            p.version.0.write(buf);
            p.nonce.0.write(buf);
            p.size.write(buf);
            p.segment_bytes.write(buf);
            p.manifest_root.0.write(buf);
            write_str(&p.etag, buf);
            u8::try_from(p.holders.len()).unwrap_or(u8::MAX).write(buf);
            for h in &p.holders {
                h.write(buf);
            }
        }
    }
}

impl EncodeSize for PutBatch {
    fn encode_size(&self) -> usize {
        str_size(&self.bucket)
            + 1
            + self.holders.len() * (32 + 64 + 8)
            + 1
            + self
                .puts
                .iter()
                .map(|p| str_size(&p.key) + 32 + 32 + 8 + 8 + 32 + str_size(&p.etag) + 1 + p.holders.len())
                .sum::<usize>()
    }
}

impl Read for PutBatch {
    type Cfg = ();
    fn read_cfg(buf: &mut impl Buf, _: &()) -> Result<Self, CodecError> {
        let bucket = read_str(buf, MAX_BUCKET_NAME, "bucket")?;
        // No holders: a batch of empty objects.
        let n = usize::from(u8::read(buf)?);
        let mut holders = Vec::with_capacity(n);
        for _ in 0..n {
            holders.push(BatchHolder {
                node: NodeId(<[u8; 32]>::read(buf)?),
                receipt: <[u8; 64]>::read(buf)?,
                expires_ms: u64::read(buf)?,
            });
        }
        let n = usize::from(u8::read(buf)?);
        if n == 0 || n > MAX_BATCH_PUTS {
            return Err(CodecError::Invalid("PutObjects", "between 1 and 64 objects"));
        }
        let mut puts = Vec::with_capacity(n);
        for _ in 0..n {
            let key = read_str(buf, MAX_OBJECT_KEY_BYTES, "key")?;
            let version = Hash(<[u8; 32]>::read(buf)?);
            let nonce = Hash(<[u8; 32]>::read(buf)?);
            let size = u64::read(buf)?;
            let segment_bytes = u64::read(buf)?;
            let manifest_root = Hash(<[u8; 32]>::read(buf)?);
            let etag = read_str(buf, MAX_ETAG_BYTES, "etag")?;
            let h = usize::from(u8::read(buf)?);
            if h > MAX_HOLDERS {
                return Err(CodecError::Invalid("PutObjects", "more holders than any code has shards"));
            }
            let mut at = Vec::with_capacity(h);
            for _ in 0..h {
                at.push(u8::read(buf)?);
            }
            puts.push(BatchedPut { key, version, nonce, size, segment_bytes, manifest_root, etag, holders: at });
        }
        Ok(PutBatch { bucket, puts, holders })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::id;
    use crate::storage::tests::{EXPIRES, MIB, TENANT, Tenant, bucket_with, eu_no_us, placed, put_on, world};
    use crate::tx::Payload;
    use commonware_codec::{Encode, ReadExt};

    /// A batch of `objects` (key, size, holders by seed, version) into `bucket`, each holder's
    /// receipt signed over its items as a node signs it.
    fn batch_of(s: &State, bucket: &str, objects: &[(&str, u64, Vec<u64>, u8)]) -> PutBatch {
        let mut seeds: Vec<u64> = Vec::new();
        let mut puts = Vec::new();
        for (key, size, holders, version) in objects {
            let single = put_on(s, bucket, key, *size, holders, *version);
            let at: Vec<u8> = holders
                .iter()
                .map(|n| {
                    if !seeds.contains(n) {
                        seeds.push(*n);
                    }
                    seeds.iter().position(|m| m == n).unwrap() as u8
                })
                .collect();
            puts.push(BatchedPut {
                key: single.key,
                version: single.version,
                nonce: single.nonce,
                size: single.size,
                segment_bytes: single.segment_bytes,
                manifest_root: single.manifest_root,
                etag: single.etag,
                holders: at,
            });
        }
        let mut batch = PutBatch {
            bucket: bucket.into(),
            puts,
            holders: seeds
                .iter()
                .map(|n| BatchHolder { node: id(*n).node_id(), receipt: [0; 64], expires_ms: EXPIRES })
                .collect(),
        };
        let code = s.bucket(bucket).unwrap().policy.code;
        for (at, n) in seeds.iter().enumerate() {
            let items = batch.items_of(at, |size, seg| shard_bytes_per_holder(code, size, seg));
            batch.holders[at].receipt = sign_batch_receipt(&id(*n), &s.network, EXPIRES, &items);
        }
        batch
    }

    fn objects(s: &State) -> Vec<(&'static str, u64, Vec<u64>, u8)> {
        vec![("a", 4096, placed(s, "eu-docs", 1), 1), ("b", 10 * MIB, placed(s, "eu-docs", 2), 2), ("c", 0, vec![], 3)]
    }

    #[test]
    fn a_batch_leaves_the_state_its_puts_leave_one_by_one() {
        let (mut one, mut many) = (world(), world());
        let (mut t1, mut tn) = (Tenant { nonce: 0 }, Tenant { nonce: 0 });
        bucket_with(&mut one, &mut t1, "eu-docs", eu_no_us());
        bucket_with(&mut many, &mut tn, "eu-docs", eu_no_us());
        // An object that the batch replaces.
        let old = put_on(&one, "eu-docs", "a", 4096, &placed(&one, "eu-docs", 9), 9);
        t1.send(&mut one, Payload::PutObject { put: old.clone() }).unwrap();
        tn.send(&mut many, Payload::PutObject { put: old.clone() }).unwrap();

        let list = objects(&many);
        let batch = batch_of(&many, "eu-docs", &list);
        let r = tn.send(&mut many, Payload::PutObjects { batch: batch.clone() }).unwrap();
        let Receipt::ObjectsStored { bucket, stored } = r else { panic!("{r:?}") };
        assert_eq!(bucket, "eu-docs");
        assert_eq!(stored.iter().map(|v| v.key.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(stored[0].replaced, Some(old.version));
        assert_eq!(stored[1].replaced, None);
        for (key, size, holders, version) in &list {
            let put = put_on(&one, "eu-docs", key, *size, holders, *version);
            t1.send(&mut one, Payload::PutObject { put }).unwrap();
        }
        for (key, ..) in &list {
            assert_eq!(one.object("eu-docs", key), many.object("eu-docs", key), "{key}");
        }
        assert_eq!(one.bucket("eu-docs"), many.bucket("eu-docs"));
        for n in 101..=112 {
            assert_eq!(one.stored_bytes(&id(n).node_id()), many.stored_bytes(&id(n).node_id()), "node {n}");
        }
        // The same fees (one per object) and deposits (one per new key).
        let tenant = id(TENANT).node_id();
        assert_eq!(one.account(&tenant).balance_micro, many.account(&tenant).balance_micro);
        assert_eq!(many.total_micro(), one.total_micro());

        // And the batch survives its encoding.
        let p = Payload::PutObjects { batch };
        assert_eq!(Payload::read(&mut p.encode()).unwrap(), p);
    }

    #[test]
    fn a_batch_is_refused_whole_naming_what_is_wrong() {
        let mut s = world();
        let mut t = Tenant { nonce: 0 };
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        let list = objects(&s);
        let good = batch_of(&s, "eu-docs", &list);
        let refused = |s: &mut State, t: &mut Tenant, batch: PutBatch| {
            let before = s.bucket("eu-docs").unwrap();
            let e = t.send(s, Payload::PutObjects { batch }).unwrap_err().to_string();
            assert_eq!(s.bucket("eu-docs").unwrap(), before, "nothing stored: {e}");
            assert!(s.object("eu-docs", "a").is_none(), "{e}");
            e
        };

        // One holder's receipt forged: named.
        let mut forged = good.clone();
        let victim = forged.holders[2].node;
        forged.holders[2].receipt = forged.holders[3].receipt;
        let e = refused(&mut s, &mut t, forged);
        assert!(e.contains(&format!("receipt of node {}", victim.short())) && e.contains("does not verify"), "{e}");
        // A receipt signed for other items (the batch without its last object) does not carry over.
        let shorter = batch_of(&s, "eu-docs", &list[..1]);
        let both = list[0].2.iter().find(|n| list[1].2.contains(n)).map(|n| id(*n).node_id()).unwrap();
        let mut swapped = good.clone();
        let at = swapped.holders.iter().position(|h| h.node == both).unwrap();
        swapped.holders[at].receipt = shorter.holders.iter().find(|h| h.node == both).unwrap().receipt;
        assert!(refused(&mut s, &mut t, swapped).contains("does not verify"));
        // A key twice.
        let twice = batch_of(&s, "eu-docs", &[list[0].clone(), ("a", 4096, placed(&s, "eu-docs", 4), 4)]);
        assert!(refused(&mut s, &mut t, twice).contains("twice in the batch"));
        // A holder named by nobody, one listed twice, a place beyond the list.
        let mut unused = good.clone();
        unused.holders.push(BatchHolder { node: id(112).node_id(), receipt: [1; 64], expires_ms: EXPIRES });
        let unused_seed = (101..=112).find(|n| !good.holders.iter().any(|h| h.node == id(*n).node_id()));
        unused.holders.last_mut().unwrap().node = id(unused_seed.expect("a node no put names")).node_id();
        assert!(refused(&mut s, &mut t, unused).contains("holds none of its objects"));
        let mut listed_twice = good.clone();
        listed_twice.holders.push(listed_twice.holders[0]);
        assert!(refused(&mut s, &mut t, listed_twice).contains("listed twice"));
        let mut beyond = good.clone();
        beyond.puts[0].holders[0] = 200;
        assert!(refused(&mut s, &mut t, beyond).contains("names holder 200"));
        // One bad put (its version not made from the signer's key) refuses all of them.
        let mut stolen = good.clone();
        stolen.puts[1].nonce = Hash([7; 32]);
        assert!(refused(&mut s, &mut t, stolen).contains("not made from your key"));
        // Nothing, or too much.
        let mut empty = good.clone();
        empty.puts.clear();
        assert!(refused(&mut s, &mut t, empty).contains("1 to 64 objects"));
        let mut many = good.clone();
        many.puts = (0..65).map(|i| BatchedPut { key: format!("k{i}"), ..good.puts[2].clone() }).collect();
        assert!(refused(&mut s, &mut t, many).contains("1 to 64 objects, not 65"));
        // Someone else's bucket.
        let e = s.apply(&crate::state::tests::signed(1, 0, Payload::PutObjects { batch: good.clone() })).unwrap_err();
        assert!(e.to_string().contains("belongs to"), "{e}");

        // The good one is stored whole.
        t.send(&mut s, Payload::PutObjects { batch: good }).unwrap();
        assert_eq!(s.bucket("eu-docs").unwrap().objects, 3);
    }

    #[test]
    fn decoding_refuses_a_batch_of_no_or_too_many_objects_and_holders_beyond_any_code() {
        let mut s = world();
        bucket_with(&mut s, &mut Tenant { nonce: 0 }, "eu-docs", eu_no_us());
        let good = batch_of(&s, "eu-docs", &[("a", 4096, vec![101, 102, 103, 104, 105, 106], 1)]);
        let decode = |b: &PutBatch| PutBatch::read(&mut b.encode()).map_err(|e| e.to_string());
        assert_eq!(decode(&good).unwrap(), good);
        let mut none = good.clone();
        none.puts.clear();
        assert!(decode(&none).unwrap_err().contains("between 1 and 64 objects"));
        let mut many = good.clone();
        many.puts = vec![good.puts[0].clone(); 65];
        assert!(decode(&many).unwrap_err().contains("between 1 and 64 objects"));
        let mut wide = good.clone();
        wide.puts[0].holders = vec![0; 49];
        assert!(decode(&wide).unwrap_err().contains("more holders than any code"));
        // Cut anywhere: an error, never a panic.
        let bytes = good.encode();
        for cut in 0..bytes.len() {
            assert!(PutBatch::read(&mut bytes.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_batch_pays_every_deposit_and_fits_every_holder_together() {
        let mut s = world();
        let mut t = Tenant { nonce: 0 };
        bucket_with(&mut s, &mut t, "eu-docs", eu_no_us());
        // Two objects on the same holders, each needing 0.3 GiB of every holder's 1 GiB: each
        // fits alone (and two would), four do not.
        let holders = placed(&s, "eu-docs", 1);
        let big = 1200 * MIB;
        let four: Vec<_> =
            ["w", "x", "y", "z"].iter().enumerate().map(|(i, k)| (*k, big, holders.clone(), i as u8 + 1)).collect();
        let batch = batch_of(&s, "eu-docs", &four);
        let e = t.send(&mut s, Payload::PutObjects { batch }).unwrap_err().to_string();
        assert!(e.contains("bytes free") && e.contains("it is full"), "{e}");
        let batch = batch_of(&s, "eu-docs", &four[..2]);
        t.send(&mut s, Payload::PutObjects { batch }).unwrap();

        // A balance that covers one new key's deposit and fee but not three.
        let p = s.params().clone();
        let tenant = id(TENANT).node_id();
        let keep = p.entry_deposit_micro + p.tx_fee_micro;
        let give = s.account(&tenant).balance_micro - keep - p.tx_fee_micro;
        t.send(&mut s, Payload::Transfer { to: id(1).node_id(), amount_micro: give }).unwrap();
        let list = objects(&s);
        let batch = batch_of(&s, "eu-docs", &list);
        let e = t.send(&mut s, Payload::PutObjects { batch }).unwrap_err();
        assert!(p.entry_deposit_micro > 0);
        assert!(
            matches!(e, TxError::InsufficientEntryDeposit { deposit_micro, .. } if deposit_micro == 3 * p.entry_deposit_micro),
            "{e}"
        );
        let batch = batch_of(&s, "eu-docs", &list[..1]);
        t.send(&mut s, Payload::PutObjects { batch }).unwrap();
    }
}
