//! Whole-object PUT and GET over an in-memory transport: round trips of many sizes, range reads,
//! holders that die, lie or corrupt, and receipts the ledger would accept; and a seeded simulation
//! (`ARCHIPEL_SIM_SEEDS=A..B` or `ARCHIPEL_SIM_SEED=N`; 0..24 by default) of random codes, fences,
//! object sizes and faults per shard, checking that no object is lost with at most m bad shards per
//! segment, that m+1 give "unrecoverable" and never wrong bytes, and that repairs stay in the fence.

use archipel_crypto::Identity;
use archipel_ledger::Hash;
use archipel_ledger::batch::{BATCH_RECEIPT_NAMESPACE, BatchItem, batch_receipt_bytes, sign_batch_receipt};
use archipel_ledger::storage::{BucketRecord, ObjectPut, ObjectRecord, ReceiptTerms, shard_bytes_per_holder};
use archipel_objects::batch::{BatchSealed, SealItem, seal_batch};
use archipel_objects::transfer::{
    Claim, HEDGE_AFTER, Holder, PutPlan, SealWith, Sealed, Shards, Staged, TransferError, TransferFailed,
    finish_staged, get_object, keep_staged, prepare_single, put_object, stage_segment,
};
use archipel_objects::{SEGMENT_PLAIN_BYTES, ShardHash};
use archipel_placement::Candidate;
use archipel_types::{ErasureCode, NodeId, PlacementPolicy};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// Where a shard is: holder, version, index, segment.
type ShardAt = (NodeId, Hash, u8, u64);

/// Holders in memory; some may be down, corrupt what they serve, or sign for the wrong bytes.
#[derive(Default)]
struct Memory {
    shards: Mutex<BTreeMap<ShardAt, Vec<u8>>>,
    manifests: Mutex<BTreeMap<(NodeId, Hash), Vec<u8>>>,
    down: Mutex<BTreeSet<NodeId>>,
    corrupt: Mutex<BTreeSet<NodeId>>,
    /// Single shards that a holder serves wrong.
    damaged: Mutex<BTreeMap<ShardAt, Damage>>,
    keys: BTreeMap<NodeId, Identity>,
    /// Every write's version and claim, in order.
    claims: Mutex<Vec<(Hash, Claim)>>,
    /// Seals that carried their shard.
    seals_with_shard: std::sync::atomic::AtomicUsize,
    /// Shards stored by their own call.
    shard_calls: std::sync::atomic::AtomicUsize,
    /// Batched seal calls.
    batch_calls: std::sync::atomic::AtomicUsize,
    /// Holders that sign a batch receipt over something else.
    lying: Mutex<BTreeSet<NodeId>>,
    /// Holders that never answer a shard read (a hung connection).
    silent: Mutex<BTreeSet<NodeId>>,
    /// Holders that answer a batch with one byte more than they keep of its first item (and sign
    /// for that).
    miscounting: Mutex<BTreeSet<NodeId>>,
}

/// How a holder serves one damaged shard.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// One bit flipped (bitrot).
    Flip,
    /// Cut short.
    Truncate,
    /// Lost: "no shard".
    Missing,
    /// Made-up bytes of the right length.
    MadeUp,
}

fn fail(m: &str) -> TransferError {
    TransferError { message: m.into(), full: false, code: None }
}

impl Memory {
    fn check(&self, h: &Holder) -> Result<(), TransferError> {
        if self.down.lock().unwrap().contains(&h.node) { Err(fail("connection refused")) } else { Ok(()) }
    }
}

impl Shards for Memory {
    async fn put_shard(
        &self,
        h: &Holder,
        v: &Hash,
        claim: &Claim,
        i: u8,
        s: u64,
        bytes: Bytes,
        hash: ShardHash,
    ) -> Result<(), TransferError> {
        self.check(h)?;
        self.shard_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.claims.lock().unwrap().push((*v, *claim));
        if *blake3::hash(&bytes).as_bytes() != hash {
            return Err(fail("hash_mismatch"));
        }
        // As a node does: a repair's shard only after the manifest that lists it.
        if let Claim::Committed { .. } = claim {
            let m = self.manifests.lock().unwrap().get(&(h.node, *v)).cloned().ok_or_else(|| fail("manifest first"))?;
            let m = archipel_ledger::storage::Manifest::from_bytes(&m).map_err(|e| fail(&e))?;
            if m.segments.get(s as usize).and_then(|hs| hs.get(usize::from(i))) != Some(&hash) {
                return Err(fail("not the shard the manifest lists"));
            }
        }
        self.shards.lock().unwrap().insert((h.node, *v, i, s), bytes.to_vec());
        Ok(())
    }
    async fn put_manifest(&self, h: &Holder, v: &Hash, claim: &Claim, bytes: Bytes) -> Result<(), TransferError> {
        self.check(h)?;
        self.claims.lock().unwrap().push((*v, *claim));
        self.manifests.lock().unwrap().insert((h.node, *v), bytes.to_vec());
        Ok(())
    }
    async fn seal(
        &self,
        h: &Holder,
        v: &Hash,
        claim: &Claim,
        i: u8,
        generation: u32,
        with: SealWith,
    ) -> Result<Sealed, TransferError> {
        self.check(h)?;
        self.claims.lock().unwrap().push((*v, *claim));
        if let Some(m) = with.manifest {
            self.manifests.lock().unwrap().insert((h.node, *v), m.to_vec());
        }
        let m = self.manifests.lock().unwrap().get(&(h.node, *v)).cloned().ok_or_else(|| fail("no manifest"))?;
        let m = archipel_ledger::storage::Manifest::from_bytes(&m).map_err(|e| fail(&e))?;
        // As a node does: a shard riding with the seal is segment 0's, with the manifest's hash.
        if let Some(shard) = with.shard {
            let listed =
                m.segments.first().and_then(|hs| hs.get(usize::from(i))).ok_or_else(|| fail("no segment 0"))?;
            if blake3::hash(&shard).as_bytes() != listed {
                return Err(fail("not the shard the manifest lists"));
            }
            self.seals_with_shard.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.shards.lock().unwrap().insert((h.node, *v, i, 0), shard.to_vec());
        }
        let shards = self.shards.lock().unwrap();
        let mut total = 0;
        for (s, hashes) in m.segments.iter().enumerate() {
            let b = shards.get(&(h.node, *v, i, s as u64)).ok_or_else(|| fail("missing shard"))?;
            if *blake3::hash(b).as_bytes() != hashes[usize::from(i)] {
                return Err(fail("wrong shard"));
            }
            total += b.len() as u64;
        }
        let terms = ReceiptTerms {
            object: claim.object(),
            version: *v,
            generation,
            index: i,
            manifest_root: m.root(),
            shard_bytes: total,
            expires_ms: 1_000,
        };
        let receipt = terms.sign(&self.keys[&h.node], &Hash::ZERO);
        Ok(Sealed { shard_bytes: total, manifest_root: m.root(), receipt, expires_ms: 1_000 })
    }
    async fn seal_batch(&self, h: &Holder, items: Vec<SealItem>) -> Result<BatchSealed, TransferError> {
        self.check(h)?;
        self.batch_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut signed = vec![];
        for it in &items {
            // As a node does: the manifest is the version's, of one segment, listing this shard.
            let m = archipel_ledger::storage::Manifest::from_bytes(&it.manifest).map_err(|e| fail(&e))?;
            let listed =
                m.segments.first().and_then(|hs| hs.get(usize::from(it.index))).ok_or_else(|| fail("no shard"))?;
            if m.version != it.version || m.segments.len() != 1 || blake3::hash(&it.shard).as_bytes() != listed {
                return Err(fail("not the shard the manifest lists"));
            }
            self.claims.lock().unwrap().push((it.version, Claim::Owner { object: it.object, nonce: it.nonce }));
            self.manifests.lock().unwrap().insert((h.node, it.version), it.manifest.to_vec());
            self.shards.lock().unwrap().insert((h.node, it.version, it.index, 0), it.shard.to_vec());
            signed.push(BatchItem {
                object: it.object,
                version: it.version,
                index: it.index,
                manifest_root: m.root(),
                shard_bytes: it.shard.len() as u64,
            });
        }
        if self.lying.lock().unwrap().contains(&h.node) {
            signed.pop();
        }
        if self.miscounting.lock().unwrap().contains(&h.node) {
            signed[0].shard_bytes += 1;
        }
        let receipt = sign_batch_receipt(&self.keys[&h.node], &Hash::ZERO, 1_000, &signed);
        Ok(BatchSealed {
            node: h.node,
            expires_ms: 1_000,
            receipt: hex::encode(receipt),
            shard_bytes: signed.iter().map(|i| i.shard_bytes).collect(),
        })
    }
    async fn get_manifest(&self, h: &Holder, v: &Hash) -> Result<Vec<u8>, TransferError> {
        self.check(h)?;
        self.manifests.lock().unwrap().get(&(h.node, *v)).cloned().ok_or_else(|| fail("no manifest"))
    }
    async fn get_shard(&self, h: &Holder, v: &Hash, i: u8, s: u64) -> Result<Vec<u8>, TransferError> {
        self.check(h)?;
        if self.silent.lock().unwrap().contains(&h.node) {
            std::future::pending::<()>().await;
        }
        let mut b = self.shards.lock().unwrap().get(&(h.node, *v, i, s)).cloned().ok_or_else(|| fail("no shard"))?;
        if self.corrupt.lock().unwrap().contains(&h.node) {
            b[0] ^= 1;
        }
        match self.damaged.lock().unwrap().get(&(h.node, *v, i, s)) {
            None => {}
            Some(Damage::Flip) => {
                let mid = b.len() / 2;
                b[mid] ^= 0x10
            }
            Some(Damage::Truncate) => b.truncate(b.len() / 2),
            Some(Damage::Missing) => return Err(fail("no shard")),
            Some(Damage::MadeUp) => b.iter_mut().enumerate().for_each(|(n, x)| *x = n as u8),
        }
        Ok(b)
    }
}

fn world() -> (Arc<Memory>, Vec<(Candidate, String)>) {
    let mut mem = Memory::default();
    let mut candidates = vec![];
    for n in 0..8u64 {
        let id = Identity::from_seed(100 + n);
        let node = id.node_id();
        mem.keys.insert(node, id);
        candidates.push((
            Candidate {
                node,
                region: ["eu-de", "eu-fr", "eu-nl", "eu-ie"][n as usize % 4].parse().unwrap(),
                country: "DE".parse().unwrap(),
                operator: format!("op{}", n % 3),
                jurisdiction: "DE".parse().unwrap(),
                free_bytes: 1 << 40,
                reputation: 1000,
            },
            format!("mem://{n}"),
        ));
    }
    (Arc::new(mem), candidates)
}

fn plan(candidates: &[(Candidate, String)], size: u64) -> PutPlan {
    PutPlan {
        bucket: BucketRecord {
            name: "b".into(),
            owner: Identity::from_seed(1).node_id(),
            policy: PlacementPolicy {
                min_regions: 2,
                min_operators: 2,
                ..PlacementPolicy::anywhere(ErasureCode::DEFAULT)
            },
            created_height: 1,
            created_ms: 0,
            objects: 0,
            bytes: 0,
            segments: 0,
        },
        key: "k".into(),
        size,
        candidates: candidates.to_vec(),
        network: Hash::ZERO,
        etag: None,
        meta: Default::default(),
    }
}

fn record(put: &ObjectPut) -> ObjectRecord {
    ObjectRecord {
        bucket: put.bucket.clone(),
        key: put.key.clone(),
        version: put.version,
        size: put.size,
        segment_bytes: put.segment_bytes,
        code: ErasureCode::DEFAULT,
        manifest_root: put.manifest_root,
        etag: put.etag.clone(),
        holders: put.holders.iter().map(|h| h.node).collect(),
        shard_bytes: shard_bytes_per_holder(ErasureCode::DEFAULT, put.size, put.segment_bytes),
        created_height: 1,
        created_ms: 0,
        generation: 0,
        suspect: vec![],
    }
}

fn data(len: usize) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn holders_of(put: &ObjectPut, candidates: &[(Candidate, String)]) -> Vec<Holder> {
    put.holders
        .iter()
        .map(|h| Holder { node: h.node, url: candidates.iter().find(|(c, _)| c.node == h.node).unwrap().1.clone() })
        .collect()
}

async fn put(mem: &Arc<Memory>, candidates: &[(Candidate, String)], body: &[u8]) -> Result<ObjectPut, TransferFailed> {
    let owner = Identity::from_seed(1);
    let mut seen = vec![];
    let r = put_object(mem.clone(), &plan(candidates, body.len() as u64), &owner, body, |n| seen.push(n)).await;
    if r.is_ok() && !body.is_empty() {
        assert_eq!(seen.last(), Some(&(body.len() as u64)), "progress reaches the size");
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }
    r
}

async fn get(
    mem: &Memory,
    put: &ObjectPut,
    holders: &[Holder],
    range: Option<std::ops::Range<u64>>,
) -> Result<Vec<u8>, TransferFailed> {
    let mut out = vec![];
    get_object(mem, &record(put), holders, &Identity::from_seed(1), range, &mut out, |_| {}).await.map(|_| out)
}

/// Every holder's receipt of a PUT of `b/k` verifies against the terms of the write.
fn assert_receipts(p: &ObjectPut) {
    let per_holder = shard_bytes_per_holder(ErasureCode::DEFAULT, p.size, p.segment_bytes);
    for (i, h) in p.holders.iter().enumerate() {
        let terms = ReceiptTerms {
            object: archipel_ledger::storage::object_id("b", "k"),
            version: p.version,
            generation: 0,
            index: i as u8,
            manifest_root: p.manifest_root,
            shard_bytes: per_holder,
            expires_ms: h.expires_ms,
        };
        assert!(terms.verify(&Hash::ZERO, &h.node, &h.receipt), "holder {i}'s receipt, size {}", p.size);
    }
}

#[tokio::test]
async fn objects_of_every_size_round_trip_with_valid_receipts() {
    let (mem, candidates) = world();
    let seg = SEGMENT_PLAIN_BYTES as usize;
    for size in [0, 1, 4095, 100_000, seg, seg + 1, 2 * seg + 77] {
        let body = data(size);
        let seals_before = mem.seals_with_shard.load(std::sync::atomic::Ordering::Relaxed);
        let calls_before = mem.shard_calls.load(std::sync::atomic::Ordering::Relaxed);
        let p = put(&mem, &candidates, &body).await.unwrap();
        assert_eq!((p.size, p.holders.len()), (size as u64, if size == 0 { 0 } else { 6 }));
        // An object of one segment reaches each holder in one call: the shard rides with the seal.
        let with_shard = mem.seals_with_shard.load(std::sync::atomic::Ordering::Relaxed) - seals_before;
        assert_eq!(with_shard, if size > 0 && size <= seg { 6 } else { 0 }, "size {size}");
        let separate = mem.shard_calls.load(std::sync::atomic::Ordering::Relaxed) - calls_before;
        assert_eq!(separate, if size > seg { 6 * size.div_ceil(seg) } else { 0 }, "shard calls, size {size}");
        assert_receipts(&p);
        let holders = holders_of(&p, &candidates);
        assert_eq!(get(&mem, &p, &holders, None).await.unwrap(), body, "size {size}");
        if size > 10 {
            let r = 3..(size as u64 - 2);
            assert_eq!(get(&mem, &p, &holders, Some(r.clone())).await.unwrap(), body[3..size - 2]);
        }
    }
    // Nothing stored is plaintext.
    let marker = b"ARCHIPEL-MARKER-0123456789abcdef";
    let body: Vec<u8> = marker.iter().copied().cycle().take(300_000).collect();
    put(&mem, &candidates, &body).await.unwrap();
    for b in mem.shards.lock().unwrap().values() {
        assert!(!b.windows(16).any(|w| w == &marker[..16]));
    }
}

#[tokio::test]
async fn a_staged_object_round_trips_with_valid_receipts_and_keep_alives_write_new_manifests() {
    let (mem, candidates) = world();
    let owner = Identity::from_seed(1);
    let seg = SEGMENT_PLAIN_BYTES as usize;
    let bucket = plan(&candidates, 0).bucket;
    for size in [0, 5, seg, 2 * seg + 77] {
        let body = data(size);
        let staged = Staged::begin(&bucket, "k", &candidates, &owner).unwrap();
        let mut segments = vec![];
        for (i, chunk) in body.chunks(seg).enumerate() {
            segments.push(stage_segment(mem.clone(), &staged, &owner, i as u64, chunk).await.unwrap());
            // Slow parts: keep-alives write a provisional manifest, new bytes each time.
            let before = mem.manifests.lock().unwrap().get(&(staged.holders[0].node, staged.version)).cloned();
            keep_staged(&*mem, &staged, &owner, (i as u64 + 1) * seg as u64, segments.clone()).await.unwrap();
            keep_staged(&*mem, &staged, &owner, (i as u64 + 1) * seg as u64, segments.clone()).await.unwrap();
            let after = mem.manifests.lock().unwrap().get(&(staged.holders[0].node, staged.version)).cloned();
            assert!(after.is_some() && after != before);
        }
        // A segment count that does not fit the size is refused.
        let wrong = finish_staged(
            &*mem,
            &staged,
            &owner,
            size as u64 + seg as u64,
            segments.clone(),
            &Default::default(),
            &Hash::ZERO,
            "e".into(),
        )
        .await;
        assert!(wrong.is_err(), "size {size}");
        let meta =
            archipel_objects::meta::ObjectMeta { content_type: Some("text/x-test".into()), ..Default::default() };
        let p = finish_staged(&*mem, &staged, &owner, size as u64, segments, &meta, &Hash::ZERO, "abcd-2".into())
            .await
            .unwrap();
        assert_eq!((p.size, p.etag.as_str(), p.holders.len()), (size as u64, "abcd-2", if size == 0 { 0 } else { 6 }));
        assert_receipts(&p);
        // The seal's manifest replaced the provisional ones: the object reads back whole, with its metadata.
        let holders = holders_of(&p, &candidates);
        assert_eq!(get(&mem, &p, &holders, None).await.unwrap(), body, "size {size}");
        if size > 0 {
            let opened = archipel_objects::transfer::open_object(&*mem, &record(&p), &holders, &owner).await.unwrap();
            assert_eq!(opened.meta, meta);
        }
    }
}

#[tokio::test]
async fn reads_survive_m_lost_or_lying_holders_and_fail_cleanly_beyond() {
    let (mem, candidates) = world();
    let body = data(3 * SEGMENT_PLAIN_BYTES as usize / 2);
    let p = put(&mem, &candidates, &body).await.unwrap();
    let holders = holders_of(&p, &candidates);
    // Two holders down: still readable.
    mem.down.lock().unwrap().extend([holders[0].node, holders[3].node]);
    assert_eq!(get(&mem, &p, &holders, None).await.unwrap(), body);
    // One down, one serving corrupt bytes: still readable, and the liar is named.
    mem.down.lock().unwrap().clear();
    mem.down.lock().unwrap().insert(holders[1].node);
    mem.corrupt.lock().unwrap().insert(holders[2].node);
    let mut out = vec![];
    let bad = get_object(&*mem, &record(&p), &holders, &Identity::from_seed(1), None, &mut out, |_| {}).await.unwrap();
    assert_eq!(out, body);
    assert!(bad.contains(&holders[2].node));
    // Three gone: a clear "unrecoverable", never wrong bytes.
    mem.down.lock().unwrap().insert(holders[4].node);
    let e = get(&mem, &p, &holders, None).await.unwrap_err();
    assert!(e.to_string().contains("unrecoverable"), "{e}");
    // Another owner's key cannot open it.
    mem.down.lock().unwrap().clear();
    mem.corrupt.lock().unwrap().clear();
    let mut out = vec![];
    let e =
        get_object(&*mem, &record(&p), &holders, &Identity::from_seed(2), None, &mut out, |_| {}).await.unwrap_err();
    assert!(e.to_string().contains("another owner"), "{e}");
    // A manifest that does not match the ledger's root is refused.
    let mut wrong = record(&p);
    wrong.manifest_root = Hash([1; 32]);
    let mut out = vec![];
    let e = get_object(&*mem, &wrong, &holders, &Identity::from_seed(1), None, &mut out, |_| {}).await.unwrap_err();
    assert!(e.to_string().contains("matching the ledger"), "{e}");
}

#[tokio::test]
async fn a_silent_holder_gets_company_after_the_hedge_delay() {
    let (mem, candidates) = world();
    let body = data(SEGMENT_PLAIN_BYTES as usize + 1000);
    let p = put(&mem, &candidates, &body).await.unwrap();
    let holders = holders_of(&p, &candidates);
    // Two of the k + 1 holders asked first hang: only the hedge (a holder not yet asked) gives the
    // k-th shard; without it the read would wait forever.
    mem.silent.lock().unwrap().extend([holders[0].node, holders[2].node]);
    let started = std::time::Instant::now();
    let read = tokio::time::timeout(HEDGE_AFTER * 10, get(&mem, &p, &holders, None)).await;
    let took = started.elapsed();
    assert_eq!(read.expect("the read asked another holder").unwrap(), body);
    // Once per segment (two here), each after the hedge delay.
    assert!(took >= HEDGE_AFTER * 2 && took < HEDGE_AFTER * 6, "{took:?}");
    // A silent holder beyond the first k + 1 costs nothing.
    mem.silent.lock().unwrap().clear();
    mem.silent.lock().unwrap().insert(holders[5].node);
    let started = std::time::Instant::now();
    assert_eq!(get(&mem, &p, &holders, None).await.unwrap(), body);
    assert!(started.elapsed() < HEDGE_AFTER, "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_holder_dying_during_a_put_fails_it_with_its_name() {
    let (mem, candidates) = world();
    let all: Vec<NodeId> = candidates.iter().map(|(c, _)| c.node).collect();
    mem.down.lock().unwrap().insert(all[0]);
    mem.down.lock().unwrap().insert(all[5]);
    let body = data(50_000);
    // The placement does not know the node is down (the ledger still says up): the PUT fails,
    // naming it, or succeeds when the placement avoided both.
    match put(&mem, &candidates, &body).await {
        Err(e) => {
            assert!(e.to_string().contains("connection refused") && e.to_string().contains("retry the PUT"), "{e}")
        }
        Ok(p) => assert!(p.holders.iter().all(|h| h.node != all[0] && h.node != all[5])),
    }
    // A source shorter than announced is an error, not a truncated object.
    let owner = Identity::from_seed(1);
    let e = put_object(mem.clone(), &plan(&candidates, 100), &owner, &body[..50], |_| {}).await.unwrap_err();
    assert!(matches!(e, TransferFailed::ShortSource { read: 50, size: 100 }), "{e}");
}

#[tokio::test]
async fn a_put_streams_its_source_as_it_arrives_and_a_stream_cut_short_fails() {
    let (mem, candidates) = world();
    let owner = Identity::from_seed(1);
    let body = data(2 * SEGMENT_PLAIN_BYTES as usize + 4_321);
    // A body arriving in small pieces over a pipe far smaller than a segment (a request body).
    let (mut tx, rx) = tokio::io::duplex(64 << 10);
    let sent = body.clone();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for chunk in sent.chunks(10_007) {
            tx.write_all(chunk).await.unwrap();
        }
    });
    let p = put_object(mem.clone(), &plan(&candidates, body.len() as u64), &owner, rx, |_| {}).await.unwrap();
    writer.await.unwrap();
    let holders = holders_of(&p, &candidates);
    assert_eq!(get(&mem, &p, &holders, None).await.unwrap(), body);
    // The sender stops half way: an error naming how much came, nothing to commit.
    let (mut tx, rx) = tokio::io::duplex(64 << 10);
    let half = body[..body.len() / 2].to_vec();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        tx.write_all(&half).await.unwrap();
    });
    let e = put_object(mem.clone(), &plan(&candidates, body.len() as u64), &owner, rx, |_| {}).await.unwrap_err();
    assert!(
        matches!(e, TransferFailed::ShortSource { read, size } if read == (body.len() / 2) as u64 && size == body.len() as u64),
        "{e}"
    );
}

#[tokio::test]
async fn repairs_rebuild_lost_shards_on_new_holders_with_valid_receipts() {
    let (mem, candidates) = world();
    let body = data(2 * SEGMENT_PLAIN_BYTES as usize + 1234);
    let p = put(&mem, &candidates, &body).await.unwrap();
    let holders = holders_of(&p, &candidates);
    // Holders 1 and 4 die; two nodes that hold nothing of it take their shards.
    mem.down.lock().unwrap().extend([holders[1].node, holders[4].node]);
    let spare: Vec<Holder> = candidates
        .iter()
        .filter(|(c, _)| !p.holders.iter().any(|h| h.node == c.node))
        .map(|(c, url)| Holder { node: c.node, url: url.clone() })
        .take(2)
        .collect();
    let healthy: Vec<(usize, Holder)> =
        holders.iter().cloned().enumerate().filter(|(i, _)| *i != 1 && *i != 4).collect();
    let targets = vec![(1, spare[0].clone()), (4, spare[1].clone())];
    let rec = record(&p);
    // The PUT wrote every shard, manifest and seal under the owner's claim, whose nonce binds the
    // version to the owner's key and the object's name.
    let object = archipel_ledger::storage::object_id("b", "k");
    let put_claims = std::mem::take(&mut *mem.claims.lock().unwrap());
    assert!(!put_claims.is_empty());
    for (v, claim) in &put_claims {
        assert_eq!(*v, rec.version);
        match claim {
            Claim::Owner { object: o, nonce } => {
                assert_eq!(*o, object);
                let owner = Identity::from_seed(1).node_id();
                assert_eq!(archipel_ledger::storage::version_id(&owner, o, nonce), rec.version);
                let stranger = Identity::from_seed(2).node_id();
                assert_ne!(archipel_ledger::storage::version_id(&stranger, o, nonce), rec.version);
            }
            Claim::Committed { .. } => panic!("a PUT wrote with a repair's claim"),
        }
    }
    let moves = archipel_objects::repair::rebuild(&*mem, &rec, &healthy, &targets, &Hash::ZERO).await.unwrap();
    assert_eq!(moves.iter().map(|m| (m.index, m.to)).collect::<Vec<_>>(), vec![(1, spare[0].node), (4, spare[1].node)]);
    // The repair wrote under the committed version's claim, the manifest to each target first
    // (a holder checks the repaired shards against it, and so does this transport).
    let repair_claims = std::mem::take(&mut *mem.claims.lock().unwrap());
    assert!(repair_claims.iter().all(|(v, c)| *v == rec.version && *c == Claim::Committed { object }));
    assert_eq!(
        repair_claims.len(),
        2 + 2 * rec.segments() as usize + 2,
        "two manifests, two shards a segment, two seals"
    );
    for m in &moves {
        let terms = ReceiptTerms {
            object: archipel_ledger::storage::object_id("b", "k"),
            version: rec.version,
            generation: 1,
            index: m.index,
            manifest_root: rec.manifest_root,
            shard_bytes: rec.shard_bytes,
            expires_ms: m.expires_ms,
        };
        assert!(terms.verify(&Hash::ZERO, &m.to, &m.receipt), "the move of shard {}", m.index);
    }
    // With the new holders, the object survives two more losses among the old ones.
    let mut after = holders.clone();
    after[1] = spare[0].clone();
    after[4] = spare[1].clone();
    mem.down.lock().unwrap().extend([holders[0].node, holders[5].node]);
    let mut moved = rec.clone();
    moved.holders = after.iter().map(|h| h.node).collect();
    let mut out = vec![];
    get_object(&*mem, &moved, &after, &Identity::from_seed(1), None, &mut out, |_| {}).await.unwrap();
    assert_eq!(out, body);
    // A record the committed manifest does not fit (its owner or Byzantine holders committed
    // one with another code or size): a clean error, no panic, for repairs and reads.
    for change in [|r: &mut ObjectRecord| r.size += SEGMENT_PLAIN_BYTES, |r: &mut ObjectRecord| r.code.parity = 1] {
        let mut unfit = rec.clone();
        change(&mut unfit);
        let e = archipel_objects::repair::rebuild(&*mem, &unfit, &healthy, &targets, &Hash::ZERO).await.unwrap_err();
        assert!(e.to_string().contains("does not fit its ledger record"), "{e}");
        let mut out = vec![];
        let e = get_object(&*mem, &unfit, &after, &Identity::from_seed(1), None, &mut out, |_| {}).await.unwrap_err();
        assert!(e.to_string().contains("does not fit its ledger record"), "{e}");
    }
    // With fewer than k healthy holders, a repair fails as unrecoverable.
    let few: Vec<(usize, Holder)> = healthy.iter().take(3).cloned().collect();
    let e = archipel_objects::repair::rebuild(&*mem, &rec, &few, &targets, &Hash::ZERO).await.unwrap_err();
    assert!(e.to_string().contains("unrecoverable") || e.to_string().contains("manifest"), "{e}");
}

/// A small xorshift generator: the simulation's only source of chance.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize].clone()
    }
}

fn sim_seeds() -> Vec<u64> {
    if let Ok(one) = std::env::var("ARCHIPEL_SIM_SEED") {
        return vec![one.trim().parse().expect("ARCHIPEL_SIM_SEED is a number")];
    }
    match std::env::var("ARCHIPEL_SIM_SEEDS") {
        Ok(r) => {
            let (a, b) = r.split_once("..").expect("ARCHIPEL_SIM_SEEDS is A..B");
            (a.trim().parse().unwrap()..b.trim().parse().unwrap()).collect()
        }
        Err(_) => (0..24).collect(),
    }
}

/// One seeded scenario; returns what it checked, for the failure message of the next.
async fn storage_scenario(seed: u64) -> String {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let code = ErasureCode { data: 1 + rng.below(6) as u8, parity: 1 + rng.below(3) as u8 };
    let (k, m) = (usize::from(code.data), usize::from(code.parity));
    let fences: [(&[&str], &[&str]); 4] = [(&[], &[]), (&["eu"], &[]), (&[], &["US"]), (&["eu"], &["US"])];
    let (regions, deny) = rng.pick(&fences);
    let policy = PlacementPolicy {
        regions: regions.iter().map(|r| r.parse().unwrap()).collect(),
        deny_jurisdictions: deny.iter().map(|j| j.parse().unwrap()).collect(),
        ..PlacementPolicy::anywhere(code)
    };
    let mut mem = Memory::default();
    let mut candidates = vec![];
    for n in 0..(k + m + rng.below(7) as usize) as u64 {
        let id = Identity::from_seed(10_000 + seed * 64 + n);
        mem.keys.insert(id.node_id(), id.clone());
        let (region, jurisdiction) = rng.pick(&[("eu-de", "DE"), ("eu-fr", "FR"), ("eu-ie", "US"), ("us-east", "US")]);
        candidates.push((
            Candidate {
                node: id.node_id(),
                region: region.parse().unwrap(),
                country: "DE".parse().unwrap(),
                operator: format!("op{}", rng.below(4)),
                jurisdiction: jurisdiction.parse().unwrap(),
                free_bytes: 1 << 40,
                reputation: 1000,
            },
            format!("mem://{n}"),
        ));
    }
    let registry: BTreeMap<NodeId, Candidate> = candidates.iter().map(|(c, _)| (c.node, c.clone())).collect();
    let inside = candidates.iter().filter(|(c, _)| policy.allows(&c.region, c.country, c.jurisdiction)).count();
    let seg = SEGMENT_PLAIN_BYTES as usize;
    let size = match rng.below(6) {
        0 => 1 + rng.below(100) as usize,
        1 | 2 => 1 + rng.below(300_000) as usize,
        3 => seg - 1 + rng.below(3) as usize,
        _ => seg + 1 + rng.below(seg as u64 + 5000) as usize,
    };
    let what = format!(
        "seed {seed}: code {code}, fence {}, {inside} of {} nodes inside, {size} bytes",
        policy.describe_fence(),
        candidates.len()
    );
    let mut body = data(size);
    body.iter_mut().enumerate().for_each(|(i, b)| *b ^= (seed as usize + i / 4096) as u8);
    let mem = Arc::new(mem);
    let mut p = plan(&candidates, size as u64);
    p.bucket.policy = policy.clone();
    let put = match put_object(mem.clone(), &p, &Identity::from_seed(1), &body[..], |_| {}).await {
        Ok(put) => put,
        Err(e) => {
            assert!(inside < k + m, "{what}: the PUT failed with room in the fence: {e}");
            assert!(e.to_string().contains(&format!("needs {} nodes", k + m)), "{what}: {e}");
            return what;
        }
    };
    let mut rec = record(&put);
    rec.code = code;
    rec.shard_bytes = shard_bytes_per_holder(code, put.size, put.segment_bytes);
    assert!(archipel_placement::check(&policy, &registry, &rec.holders).is_ok(), "{what}: placed outside the fence");
    let holders = holders_of(&put, &candidates);
    let segments = (size as u64).div_ceil(SEGMENT_PLAIN_BYTES);

    // Faults: up to m+1 holders down, and per segment up to m+1 more shards damaged.
    let mut down = BTreeSet::new();
    for _ in 0..rng.below(m as u64 + 2) {
        down.insert(rng.below((k + m) as u64) as usize);
    }
    let mut bad: Vec<BTreeSet<usize>> = vec![down.clone(); segments as usize];
    for (s, bad_s) in bad.iter_mut().enumerate() {
        for _ in 0..rng.below(m as u64 + 2) {
            let i = rng.below((k + m) as u64) as usize;
            let how = rng.pick(&[Damage::Flip, Damage::Truncate, Damage::Missing, Damage::MadeUp]);
            mem.damaged.lock().unwrap().insert((holders[i].node, put.version, i as u8, s as u64), how);
            bad_s.insert(i);
        }
    }
    mem.down.lock().unwrap().extend(down.iter().map(|i| holders[*i].node));
    let what = format!("{what}; holders down {down:?}, bad shards per segment {bad:?}");
    let readable = |segs: std::ops::Range<usize>| bad[segs].iter().all(|b| b.len() <= m);

    // A whole read: the right bytes, or "unrecoverable" with only right bytes written before.
    let mut out = vec![];
    let r = get_object(&*mem, &rec, &holders, &Identity::from_seed(1), None, &mut out, |_| {}).await;
    match r {
        Ok(_) => {
            assert!(readable(0..segments as usize), "{what}: read although a segment lost more than m");
            assert!(out == body, "{what}: wrong bytes");
        }
        Err(e) => {
            assert!(
                !readable(0..segments as usize) || down.len() == k + m,
                "{what}: read failed with at most m bad per segment: {e}"
            );
            // Every holder down: not even the manifest is there to say what is missing.
            let why = if down.len() == k + m { "no holder served the manifest" } else { "unrecoverable" };
            assert!(e.to_string().contains(why), "{what}: {e}");
            assert!(out.len() <= body.len() && out == body[..out.len()], "{what}: wrong bytes before the error");
        }
    }
    // A range read needs only its own segments.
    let a = rng.below(size as u64);
    let b = a + 1 + rng.below(size as u64 - a);
    let segs = (a / SEGMENT_PLAIN_BYTES) as usize..(b - 1) as usize / seg + 1;
    let mut out = vec![];
    let r = get_object(&*mem, &rec, &holders, &Identity::from_seed(1), Some(a..b), &mut out, |_| {}).await;
    assert_eq!(
        r.is_ok(),
        readable(segs.clone()) && down.len() < k + m,
        "{what}: range {a}..{b} (segments {segs:?}): {:?}",
        r.err()
    );
    if r.is_ok() {
        assert!(out == body[a as usize..b as usize], "{what}: wrong bytes in range {a}..{b}");
    }

    // Repair of the holders that are down, onto nodes placement chooses inside the fence.
    if down.is_empty() {
        return what;
    }
    let healthy_map: BTreeMap<usize, NodeId> =
        (0..k + m).filter(|i| !down.contains(i)).map(|i| (i, holders[i].node)).collect();
    let missing: Vec<usize> = down.iter().copied().collect();
    let live: Vec<Candidate> = candidates
        .iter()
        .filter(|(c, _)| !down.iter().any(|i| holders[*i].node == c.node))
        .map(|(c, _)| c.clone())
        .collect();
    let exclude: BTreeSet<NodeId> = down.iter().map(|i| holders[*i].node).collect();
    let chosen = match archipel_placement::replace(
        &policy,
        &live,
        &put.version.0,
        rec.shard_bytes,
        &healthy_map,
        &missing,
        &exclude,
    ) {
        Ok(c) => c,
        Err(e) => {
            // No room in the fence: the segment stays degraded; never placed outside.
            assert!(
                live.iter()
                    .filter(|c| policy.allows(&c.region, c.country, c.jurisdiction)
                        && !healthy_map.values().any(|n| *n == c.node))
                    .count()
                    < missing.len(),
                "{what}: {e}"
            );
            return what;
        }
    };
    let url = |n: &NodeId| candidates.iter().find(|(c, _)| c.node == *n).unwrap().1.clone();
    let targets: Vec<(usize, Holder)> = chosen.iter().map(|(i, n)| (*i, Holder { node: *n, url: url(n) })).collect();
    let healthy: Vec<(usize, Holder)> =
        healthy_map.iter().map(|(i, n)| (*i, Holder { node: *n, url: url(n) })).collect();
    let r = archipel_objects::repair::rebuild(&*mem, &rec, &healthy, &targets, &Hash::ZERO).await;
    if !readable(0..segments as usize) {
        assert!(r.is_err(), "{what}: rebuilt shards of a segment that lost more than m");
        return what;
    }
    let moves = r.unwrap_or_else(|e| panic!("{what}: repair failed with at most m bad per segment: {e}"));
    let mut after = holders.clone();
    for mv in &moves {
        after[usize::from(mv.index)] = Holder { node: mv.to, url: url(&mv.to) };
    }
    let after_nodes: Vec<NodeId> = after.iter().map(|h| h.node).collect();
    assert!(archipel_placement::check(&policy, &registry, &after_nodes).is_ok(), "{what}: repaired outside the fence");
    // The rebuilt shards match the manifest, and the object reads back from the new holders.
    let manifest = archipel_objects::transfer::fetch_manifest(&*mem, &rec, &after).await.unwrap();
    for mv in &moves {
        for s in 0..segments {
            let got = mem.shards.lock().unwrap()[&(mv.to, put.version, mv.index, s)].clone();
            assert_eq!(
                archipel_objects::shard_hash(&got),
                manifest.segments[s as usize][usize::from(mv.index)],
                "{what}"
            );
        }
    }
    mem.damaged.lock().unwrap().clear();
    let mut moved = rec.clone();
    moved.holders = after_nodes;
    let mut out = vec![];
    get_object(&*mem, &moved, &after, &Identity::from_seed(1), None, &mut out, |_| {}).await.unwrap();
    assert!(out == body, "{what}: wrong bytes after the repair");
    what
}

#[tokio::test]
async fn seeded_faults_never_lose_data_within_m_nor_return_wrong_bytes() {
    let mut last = String::new();
    for seed in sim_seeds() {
        let run = tokio::spawn(storage_scenario(seed));
        match run.await {
            Ok(what) => last = what,
            Err(e) => panic!(
                "{e}\nreplay with: ARCHIPEL_SIM_SEED={seed} cargo test -p archipel-objects --test transfer seeded (previous: {last})"
            ),
        }
    }
}

#[test]
fn only_a_holder_that_says_it_lacks_the_shard_fails_an_audit() {
    let e = |code: Option<&str>| TransferError { message: String::new(), full: false, code: code.map(String::from) };
    assert!(e(Some("shard_not_found")).holder_lacks_shard());
    assert!(e(Some("shard_corrupt")).holder_lacks_shard());
    for busy in [Some("data_busy"), Some("key_rate_limit"), Some("too_busy"), None] {
        assert!(!e(busy).holder_lacks_shard(), "{busy:?} is no verdict");
    }
}

#[test]
fn claims_cross_the_wire_and_bad_headers_are_refused_with_the_format() {
    let object = archipel_ledger::storage::object_id("b", "k");
    for c in [Claim::Owner { object, nonce: [3; 32] }, Claim::Committed { object }] {
        assert_eq!(Claim::from_header(&c.to_header()), Ok(c));
    }
    let zeros = "0".repeat(64);
    for bad in [
        String::new(),
        "zz".into(),
        format!("{object}."),
        format!("{object}.abcd"),
        format!("{object}.{zeros}x"),
        format!("{zeros}0.{zeros}"),
    ] {
        let e = Claim::from_header(&bad).unwrap_err();
        assert!(e.contains("x-archipel-claim") && e.contains("nonce"), "{bad:?}: {e}");
    }
}

#[tokio::test]
async fn a_batch_seals_once_per_holder_and_every_object_reads_back() {
    let (mem, candidates) = world();
    let owner = Identity::from_seed(1);
    let bodies: Vec<Vec<u8>> = (0..5).map(|i| data(4096 + i * 1000)).collect();
    let prepared: Vec<_> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut p = plan(&candidates, b.len() as u64);
            p.key = format!("k{i}");
            prepare_single(&p, &owner, b.clone()).unwrap()
        })
        .collect();
    let refs: Vec<_> = prepared.iter().collect();
    let batch = seal_batch(&*mem, &Hash::ZERO, "b", ErasureCode::DEFAULT, &refs).await.unwrap();
    // One call per distinct holder, each listed once.
    let distinct: BTreeSet<NodeId> = prepared.iter().flat_map(|p| p.holders.iter().map(|h| h.node)).collect();
    assert_eq!(mem.batch_calls.load(std::sync::atomic::Ordering::Relaxed), distinct.len());
    assert_eq!(batch.holders.len(), distinct.len());
    // Every holder's receipt is over exactly its items, as the ledger recomputes them.
    for (at, h) in batch.holders.iter().enumerate() {
        let items = batch.items_of(at, |size, seg| shard_bytes_per_holder(ErasureCode::DEFAULT, size, seg));
        assert!(!items.is_empty());
        let signed = batch_receipt_bytes(&Hash::ZERO, h.expires_ms, &items);
        archipel_crypto::verify_signature(&h.node, BATCH_RECEIPT_NAMESPACE, &signed, &h.receipt).unwrap();
    }
    // And each object reads back from its holders.
    for (p, body) in batch.puts.iter().zip(&bodies) {
        let put = batch.object_put(p);
        let holders = holders_of(&put, &candidates);
        assert_eq!(&get(&mem, &put, &holders, None).await.unwrap(), body, "{}", p.key);
    }

    // A holder that signs for other items than it was sent: named, nothing to commit.
    let liar = prepared[0].holders[0].node;
    mem.lying.lock().unwrap().insert(liar);
    match seal_batch(&*mem, &Hash::ZERO, "b", ErasureCode::DEFAULT, &refs).await {
        Err(TransferFailed::BadReceipt(n)) => assert_eq!(n, liar),
        other => panic!("{other:?}"),
    }
    mem.lying.lock().unwrap().clear();
    // One that signs for more bytes than the object gives it: not a receipt the ledger takes.
    let greedy = prepared[2].holders[1].node;
    mem.miscounting.lock().unwrap().insert(greedy);
    match seal_batch(&*mem, &Hash::ZERO, "b", ErasureCode::DEFAULT, &refs).await {
        Err(TransferFailed::BadReceipt(n)) => assert_eq!(n, greedy),
        other => panic!("{other:?}"),
    }
    mem.miscounting.lock().unwrap().clear();
    // A holder that is down: the batch fails with its name.
    let dead = prepared[1].holders[2].node;
    mem.down.lock().unwrap().insert(dead);
    let e = seal_batch(&*mem, &Hash::ZERO, "b", ErasureCode::DEFAULT, &refs).await.unwrap_err();
    assert_eq!(e.holder_fault().map(|(n, _)| n), Some(dead), "{e}");
}

/// The client's bound on a batch keeps its transaction within the ledger's default
/// `max_tx_bytes`, whatever the keys, and still lets dozens of small objects go together.
#[tokio::test]
async fn a_batch_filled_to_its_bound_fits_one_transaction() {
    use archipel_objects::batch::fits_one_transaction;
    let (mem, candidates) = world();
    let owner = Identity::from_seed(1);
    let max = archipel_ledger::LedgerParams::default().max_tx_bytes as usize;
    for (key_len, at_least) in [(12, 25), (1_000, 4)] {
        let prepared: Vec<_> = (0..64)
            .map(|i| {
                let mut p = plan(&candidates, 4096);
                p.key = format!("{i:0>key_len$}");
                prepare_single(&p, &owner, data(4096)).unwrap()
            })
            .collect();
        let mut batch: Vec<&_> = vec![&prepared[0]];
        for p in &prepared[1..] {
            if fits_one_transaction(&batch, p) != archipel_objects::batch::Fit::Take {
                break;
            }
            batch.push(p);
        }
        assert!(batch.len() >= at_least, "only {} objects with keys of {key_len} bytes", batch.len());
        let sealed = seal_batch(&*mem, &Hash::ZERO, "b", ErasureCode::DEFAULT, &batch).await.unwrap();
        let tx = archipel_ledger::Transaction {
            signer: owner.node_id(),
            nonce: 0,
            payload: archipel_ledger::Payload::PutObjects { batch: sealed },
        }
        .sign(&owner, &Hash::ZERO);
        let len = tx.to_bytes().len();
        assert!(len <= max, "{} objects with keys of {key_len} bytes: {len} bytes, the limit is {max}", batch.len());
    }
}

#[test]
fn an_object_too_large_for_a_holders_manifest_is_refused_before_anything_is_sent() {
    use archipel_objects::transfer::check_manifest_fits;
    let code = ErasureCode::DEFAULT;
    assert!(check_manifest_fits(10 << 30, code).is_ok(), "10 GiB at 4+2");
    assert!(check_manifest_fits(160 << 30, code).is_ok(), "160 GiB at 4+2");
    let e = check_manifest_fits(200 << 30, code).unwrap_err().to_string();
    assert!(e.contains("too large for code 4+2") && e.contains("at most"), "{e}");
    let wide = ErasureCode::new(32, 16).unwrap();
    assert!(check_manifest_fits(20 << 30, wide).is_ok(), "20 GiB at 32+16");
    assert!(check_manifest_fits(30 << 30, wide).is_err(), "30 GiB at 32+16");
}
