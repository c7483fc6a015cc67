//! Group commit of small objects: many PUTs of one tenant into one bucket, sealed on each holder
//! in one call and committed by one `PutObjects` transaction ([`archipel_ledger::batch`]).
//!
//! A 4 KiB PUT alone costs a seal call per holder (each with its own fsyncs), a transaction with
//! k+m receipts that every node verifies, and a wait for finality; concurrent small PUTs of one
//! client share all of it here:
//! - **On the holders**: one `POST /v1/seal-batch` per holder carries, for every object of the
//!   batch it holds a shard of, the version, the uploader's claim, the manifest and the shard
//!   ([`encode_items`]); the node stores them all, makes them durable together and signs one
//!   receipt over the list ([`archipel_ledger::batch::batch_receipt_bytes`]).
//! - **On the ledger**: one transaction, each holder once with its one receipt.
//!
//! [`seal_batch`] does one batch; [`GroupCommit`] decides what goes together: a PUT joins the
//! queue of its bucket, and up to [`MAX_FLUSHES`] batches are in flight at once, each taking
//! everything queued (up to a transaction's worth) when it starts — no timer: a lone PUT goes at
//! once, alone, the usual way, and batches form only while earlier ones are under way.

use crate::transfer::{Claim, Holder, Prepared, Shards, TransferFailed, holder_failed};
use archipel_crypto::verify_signature;
use archipel_ledger::Hash;
use archipel_ledger::batch::{BATCH_RECEIPT_NAMESPACE, BatchHolder, BatchedPut, PutBatch, batch_receipt_bytes};
use archipel_ledger::storage::shard_bytes_per_holder;
use archipel_types::{ErasureCode, NodeId};
use bytes::{Buf, BufMut, Bytes};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Mutex;

/// Path of the batched seal on a storage node.
pub const SEAL_BATCH_PATH: &str = "/v1/seal-batch";
/// Objects up to this size go through group commit (larger ones are their own best batch).
pub const MAX_BATCHED_OBJECT_BYTES: u64 = 1 << 20;
/// Batches of one client in flight at once: two, so that one fills while the other is under way
/// (measured with 32 PUTs at once: four in flight made batches of five objects on average).
pub const MAX_FLUSHES: usize = 2;
/// A batch's transaction payload stays under this (the ledger's default `max_tx_bytes` is 8 KiB;
/// the rest is the transaction's own fields and signature).
pub const MAX_BATCH_PAYLOAD_BYTES: usize = 7 * 1024;

/// One object's part on one holder of a batched seal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealItem {
    /// The version.
    pub version: Hash,
    /// The object (hash of bucket and key).
    pub object: Hash,
    /// The nonce the uploader made the version from (its claim).
    pub nonce: [u8; 32],
    /// The holder's shard index.
    pub index: u8,
    /// The manifest (one segment).
    pub manifest: Bytes,
    /// The holder's shard of that segment.
    pub shard: Bytes,
}

/// A holder's answer to a batched seal: one receipt for all of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSealed {
    /// The holder.
    pub node: NodeId,
    /// When the receipt expires (Unix ms).
    pub expires_ms: u64,
    /// Its signature (hex) over [`batch_receipt_bytes`] of the items, in the call's order.
    pub receipt: String,
    /// Bytes it keeps of each item, in the call's order.
    pub shard_bytes: Vec<u64>,
}

/// The body of a batched seal: a count, then each item (version, object, nonce, index, then the
/// manifest and the shard, each after its length), integers big-endian.
pub fn encode_items(items: &[SealItem]) -> Vec<u8> {
    let len = 2 + items.iter().map(|i| 32 * 3 + 1 + 8 + i.manifest.len() + i.shard.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.put_u16(items.len() as u16);
    for i in items {
        out.put_slice(&i.version.0);
        out.put_slice(&i.object.0);
        out.put_slice(&i.nonce);
        out.put_u8(i.index);
        out.put_u32(i.manifest.len() as u32);
        out.put_slice(&i.manifest);
        out.put_u32(i.shard.len() as u32);
        out.put_slice(&i.shard);
    }
    out
}

/// Decodes [`encode_items`]' bytes: at most `max_items` items, nothing left over.
pub fn decode_items(mut body: Bytes, max_items: usize) -> Result<Vec<SealItem>, String> {
    fn take(body: &mut Bytes, n: usize, what: &str) -> Result<Bytes, String> {
        if body.remaining() < n {
            return Err(format!("the body ends inside {what}"));
        }
        Ok(body.split_to(n))
    }
    fn hash(body: &mut Bytes, what: &str) -> Result<[u8; 32], String> {
        Ok(take(body, 32, what)?.as_ref().try_into().unwrap_or([0; 32]))
    }
    let n = usize::from(u16::from_be_bytes(take(&mut body, 2, "the count")?.as_ref().try_into().unwrap_or([0; 2])));
    if n == 0 || n > max_items {
        return Err(format!("a batch carries 1 to {max_items} items, not {n}"));
    }
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let version = Hash(hash(&mut body, "a version")?);
        let object = Hash(hash(&mut body, "an object")?);
        let nonce = hash(&mut body, "a nonce")?;
        let index = take(&mut body, 1, "an index")?[0];
        let m = take(&mut body, 4, "a manifest length")?.get_u32() as usize;
        let manifest = take(&mut body, m, "a manifest")?;
        let s = take(&mut body, 4, "a shard length")?.get_u32() as usize;
        let shard = take(&mut body, s, "a shard")?;
        items.push(SealItem { version, object, nonce, index, manifest, shard });
    }
    if body.has_remaining() {
        return Err(format!("{} bytes after the last item", body.remaining()));
    }
    Ok(items)
}

/// Seals `puts` (of `bucket`, in this order) on their holders, one call per holder, and checks
/// every receipt; returns the batch to submit as `PutObjects`.
pub async fn seal_batch<S: Shards>(
    shards: &S,
    network: &Hash,
    bucket: &str,
    code: ErasureCode,
    puts: &[&Prepared],
) -> Result<PutBatch, TransferFailed> {
    // Each holder once, in order of first appearance; each put names them by place.
    let mut table: Vec<Holder> = Vec::new();
    let mut batched = Vec::with_capacity(puts.len());
    for p in puts {
        let mut at = Vec::with_capacity(p.holders.len());
        for h in &p.holders {
            let place = match table.iter().position(|t| t.node == h.node) {
                Some(i) => i,
                None => {
                    table.push(h.clone());
                    table.len() - 1
                }
            };
            at.push(u8::try_from(place).map_err(|_| TransferFailed::Io("more than 255 holders in a batch".into()))?);
        }
        batched.push(BatchedPut {
            key: p.put.key.clone(),
            version: p.put.version,
            nonce: p.put.nonce,
            size: p.put.size,
            segment_bytes: p.put.segment_bytes,
            manifest_root: p.put.manifest_root,
            etag: p.put.etag.clone(),
            holders: at,
        });
    }
    let mut batch = PutBatch {
        bucket: bucket.to_string(),
        puts: batched,
        holders: table.iter().map(|h| BatchHolder { node: h.node, receipt: [0; 64], expires_ms: 0 }).collect(),
    };
    let calls = table.iter().enumerate().map(|(at, h)| {
        // This holder's items, in the batch's order (the order its receipt covers).
        let mut items = Vec::new();
        for (p, b) in puts.iter().zip(&batch.puts) {
            for (index, &place) in b.holders.iter().enumerate() {
                if usize::from(place) == at {
                    let Claim::Owner { nonce, .. } = p.claim else { continue };
                    items.push(SealItem {
                        version: p.put.version,
                        object: p.claim.object(),
                        nonce,
                        index: index as u8,
                        manifest: p.manifest.clone(),
                        shard: p.shards[index].clone(),
                    });
                }
            }
        }
        async move { shards.seal_batch(h, items).await.map_err(|e| holder_failed(h, e)) }
    });
    let answers = futures::future::try_join_all(calls).await?;
    let per_holder = |size, segment_bytes| shard_bytes_per_holder(code, size, segment_bytes);
    for (at, (h, a)) in table.iter().zip(answers).enumerate() {
        let items = batch.items_of(at, per_holder);
        let mut receipt = [0u8; 64];
        let decoded = hex::decode_to_slice(&a.receipt, &mut receipt).is_ok();
        let signed = batch_receipt_bytes(network, a.expires_ms, &items);
        let counts = a.shard_bytes.len() == items.len()
            && a.shard_bytes.iter().zip(&items).all(|(got, item)| *got == item.shard_bytes);
        if a.node != h.node
            || !decoded
            || !counts
            || verify_signature(&h.node, BATCH_RECEIPT_NAMESPACE, &signed, &receipt).is_err()
        {
            return Err(TransferFailed::BadReceipt(h.node));
        }
        batch.holders[at].receipt = receipt;
        batch.holders[at].expires_ms = a.expires_ms;
    }
    Ok(batch)
}

/// What [`GroupCommit::next_batch`] does with a waiting PUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Into this batch.
    Take,
    /// Not into this one (its key is in it already): it waits for the next.
    Later,
    /// Its caller is gone: dropped from the queue.
    Gone,
    /// The batch is full.
    Full,
}

/// Which queued PUTs go together ([`GroupCommit`]), by bucket: `T` is what a waiting PUT keeps
/// (its prepared object and how to answer it).
#[derive(Debug)]
pub struct GroupCommit<T> {
    state: Mutex<Queues<T>>,
}

#[derive(Debug)]
struct Queues<T> {
    waiting: VecDeque<(String, T)>,
    running: usize,
}

impl<T> Default for GroupCommit<T> {
    fn default() -> Self {
        GroupCommit { state: Mutex::new(Queues { waiting: VecDeque::new(), running: 0 }) }
    }
}

impl<T> GroupCommit<T> {
    /// Queues `item` for `bucket`; `true` when the caller is to run a batch now (a flush slot
    /// was free), `false` when a running batch's end will hand it one.
    pub fn join(&self, bucket: &str, item: T) -> bool {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        q.waiting.push_back((bucket.to_string(), item));
        if q.running < MAX_FLUSHES {
            q.running += 1;
            true
        } else {
            false
        }
    }

    /// The next batch for a caller holding a flush slot: the oldest waiting PUT's bucket, and
    /// the waiting PUTs of that bucket after it as `fits` judges each (the first always goes,
    /// unless [`Fit::Gone`]). `None` when nothing waits: the slot is given back.
    pub fn next_batch(&self, mut fits: impl FnMut(&[T], &T) -> Fit) -> Option<(String, Vec<T>)> {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let Some((bucket, first)) = q.waiting.pop_front() else {
                q.running -= 1;
                return None;
            };
            if fits(&[], &first) == Fit::Gone {
                continue;
            }
            let mut batch = vec![first];
            let mut i = 0;
            while i < q.waiting.len() {
                if q.waiting[i].0 != bucket {
                    i += 1;
                    continue;
                }
                match fits(&batch, &q.waiting[i].1) {
                    Fit::Take => batch.extend(q.waiting.remove(i).map(|(_, t)| t)),
                    Fit::Later => i += 1,
                    Fit::Gone => drop(q.waiting.remove(i)),
                    Fit::Full => break,
                }
            }
            return Some((bucket, batch));
        }
    }

    /// Batches waiting and running, for tests and metrics.
    pub fn load(&self) -> (usize, usize) {
        let q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (q.waiting.len(), q.running)
    }
}

/// Whether `next` goes into a batch of `batch`: not when its key is in it already (the ledger
/// refuses a batch with a key twice), not when the batch would outgrow one transaction.
pub fn fits_one_transaction(batch: &[&Prepared], next: &Prepared) -> Fit {
    if batch.iter().any(|p| p.put.key == next.put.key) {
        return Fit::Later;
    }
    if batch.len() >= archipel_ledger::batch::MAX_BATCH_PUTS {
        return Fit::Full;
    }
    // Each put's fields (strings with up to 3 bytes of length) and its holders' places, then
    // each distinct holder once in the table: an upper bound of the encoding.
    let size = |p: &Prepared| p.put.key.len() + 3 + 3 * 32 + 16 + p.put.etag.len() + 3 + 1 + p.holders.len();
    let holders: std::collections::BTreeSet<NodeId> =
        batch.iter().chain([&next]).flat_map(|p| p.holders.iter().map(|h| h.node)).collect();
    let bytes = 64 + holders.len() * (32 + 64 + 8) + batch.iter().map(|p| size(p)).sum::<usize>() + size(next);
    if bytes <= MAX_BATCH_PAYLOAD_BYTES { Fit::Take } else { Fit::Full }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_items_decode_to_themselves_and_bad_bodies_are_named() {
        let item = |i: u8| SealItem {
            version: Hash([i; 32]),
            object: Hash([i + 1; 32]),
            nonce: [i + 2; 32],
            index: i,
            manifest: Bytes::from(vec![i; 50]),
            shard: Bytes::from(vec![i; 4096]),
        };
        let items: Vec<SealItem> = (0..3).map(item).collect();
        let body = Bytes::from(encode_items(&items));
        assert_eq!(decode_items(body.clone(), 64).unwrap(), items);
        assert!(decode_items(body.clone(), 2).unwrap_err().contains("1 to 2 items, not 3"));
        assert!(decode_items(body.slice(..body.len() - 1), 64).unwrap_err().contains("inside a shard"));
        let mut longer = body.to_vec();
        longer.push(0);
        assert!(decode_items(Bytes::from(longer), 64).unwrap_err().contains("1 bytes after the last item"));
        assert!(decode_items(Bytes::from_static(&[0, 0]), 64).unwrap_err().contains("not 0"));
        assert!(decode_items(Bytes::new(), 64).unwrap_err().contains("inside the count"));
    }

    #[test]
    fn batches_take_one_bucket_oldest_first_and_slots_are_bounded() {
        let g: GroupCommit<u32> = GroupCommit::default();
        // The first MAX_FLUSHES callers run at once; the rest wait for a slot.
        let ran: Vec<bool> = (0..6).map(|i| g.join(if i % 2 == 0 { "a" } else { "b" }, i)).collect();
        let expected: Vec<bool> = (0..6).map(|i| i < MAX_FLUSHES).collect();
        assert_eq!(ran, expected);
        assert_eq!(g.load(), (6, MAX_FLUSHES));
        let take = |_: &[u32], _: &u32| Fit::Take;
        // The oldest's bucket, all of it that fits (here: two at most).
        let two = |b: &[u32], _: &u32| if b.len() < 2 { Fit::Take } else { Fit::Full };
        assert_eq!(g.next_batch(two), Some(("a".to_string(), vec![0, 2])));
        // One that must wait (3, say its key is in the batch already) stays for the next batch;
        // one whose caller is gone (5) is dropped.
        let judge = |_: &[u32], t: &u32| match t {
            3 => Fit::Later,
            5 => Fit::Gone,
            _ => Fit::Take,
        };
        assert_eq!(g.next_batch(judge), Some(("b".to_string(), vec![1])));
        assert_eq!(g.next_batch(take), Some(("b".to_string(), vec![3])));
        assert_eq!(g.next_batch(take), Some(("a".to_string(), vec![4])));
        // Nothing left: the slot is given back.
        assert_eq!(g.next_batch(take), None);
        assert_eq!(g.load(), (0, MAX_FLUSHES - 1));
    }
}
