//! The repair executor: rebuilds an object's lost shards from k healthy ones and stores them on
//! new holders, returning the moves (with the new holders' receipts) for a `MoveShards`
//! transaction.
//!
//! Which objects need repair, who repairs them and where the shards go are decided from
//! finalized state (the node's repair worker, `placement::replace`); this module only moves
//! bytes. It never sees plaintext or keys: segments are rebuilt as ciphertext, and every rebuilt
//! shard must hash to the manifest's entry (checked against the ledger's root) before it is sent.

use crate::transfer::{Claim, Holder, SealWith, Shards, TransferFailed, fetch_manifest};
use archipel_erasure::{Decoder, Encoder};
use archipel_ledger::Hash;
use archipel_ledger::storage::{ObjectRecord, ReceiptTerms, ShardMove, object_id};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

/// Segments a repair rebuilds at once.
pub const REPAIR_SEGMENTS_IN_FLIGHT: usize = 4;

/// Rebuilds shards `targets` (`(shard index, new holder)`) of `object` from `healthy` holders
/// (`(shard index, holder)`), uploads them with the manifest, has each new holder seal them, and
/// returns the moves. `network` binds the receipts.
pub async fn rebuild<S: Shards>(
    shards: &S,
    object: &ObjectRecord,
    healthy: &[(usize, Holder)],
    targets: &[(usize, Holder)],
    network: &Hash,
) -> Result<Vec<ShardMove>, TransferFailed> {
    let sources: Vec<Holder> = healthy.iter().map(|(_, h)| h.clone()).collect();
    let manifest = fetch_manifest(shards, object, &sources).await?;
    let code = manifest.code;
    let k = usize::from(code.data);
    let wanted: Vec<usize> = targets.iter().map(|(i, _)| *i).collect();
    // The manifest first: a holder checks it against the ledger's root, then every repaired
    // shard against it.
    let claim = Claim::Committed { object: object_id(&object.bucket, &object.key) };
    let manifest_bytes = Bytes::from(manifest.to_bytes());
    let uploads = targets.iter().map(|(_, h)| {
        let m = manifest_bytes.clone();
        async move {
            shards.put_manifest(h, &object.version, &claim, m).await.map_err(|error| TransferFailed::Holder {
                node: h.node,
                url: h.url.clone(),
                error,
            })
        }
    });
    futures::future::try_join_all(uploads).await?;
    let manifest = &manifest;
    let claim = &claim;
    let wanted = &wanted;
    // Several segments at once: a segment's time is mostly waiting for shards to arrive and to
    // be stored, so one at a time left the network and disks idle. Memory: k + |targets| shards
    // per segment in flight.
    let segments = futures::stream::iter(0..manifest.segments.len() as u64).map(|s| async move {
        let hashes = &manifest.segments[s as usize];
        // k good shards from the healthy holders, asking the next one on each failure.
        let mut order = healthy.iter();
        let mut pending = FuturesUnordered::new();
        for (i, h) in order.by_ref().take(k) {
            pending.push(fetch_checked(shards, h, &object.version, *i, s, hashes[*i]));
        }
        let mut got: Vec<(usize, Vec<u8>)> = Vec::with_capacity(k);
        while got.len() < k {
            let Some((i, r)) = pending.next().await else { break };
            match r {
                Some(bytes) => got.push((i, bytes)),
                None => {
                    if let Some((i, h)) = order.next() {
                        pending.push(fetch_checked(shards, h, &object.version, *i, s, hashes[*i]));
                    }
                }
            }
        }
        drop(pending);
        if got.len() < k {
            return Err(TransferFailed::Object(crate::ObjectError::Unrecoverable {
                segment: s,
                good: got.len(),
                need: k,
                bad: healthy.len() - got.len(),
            }));
        }
        let given: Vec<(usize, &[u8])> = got.iter().map(|(i, b)| (*i, b.as_slice())).collect();
        let rebuilt = Decoder::new(code)
            .rebuild(&mut Encoder::new(code), manifest.cipher_len(s) as usize, &given, wanted)
            .map_err(|e| TransferFailed::Object(e.into()))?;
        let uploads = rebuilt.into_iter().map(|(index, bytes)| {
            let hash = hashes[index];
            let target = targets.iter().find(|(i, _)| *i == index).map(|(_, h)| h.clone());
            async move {
                let target = target.ok_or_else(|| TransferFailed::Io(format!("no target for shard {index}")))?;
                if crate::pipeline::shard_hash(&bytes) != hash {
                    return Err(TransferFailed::Io(format!(
                        "rebuilt shard {index} of segment {s} does not match the manifest"
                    )));
                }
                shards
                    .put_shard(&target, &object.version, claim, index as u8, s, Bytes::from(bytes), hash)
                    .await
                    .map_err(|error| TransferFailed::Holder { node: target.node, url: target.url.clone(), error })
            }
        });
        futures::future::try_join_all(uploads).await.map(drop)
    });
    let mut segments = segments.buffer_unordered(REPAIR_SEGMENTS_IN_FLIGHT);
    while let Some(done) = segments.next().await {
        done?;
    }
    drop(segments);
    let root = manifest.root();
    let seals = targets.iter().map(|(index, h)| async move {
        let fail = |error| TransferFailed::Holder { node: h.node, url: h.url.clone(), error };
        let generation = object.generation.saturating_add(1);
        let sealed = shards
            .seal(h, &object.version, claim, *index as u8, generation, SealWith::default())
            .await
            .map_err(fail)?;
        let terms = ReceiptTerms {
            object: claim.object(),
            version: object.version,
            generation,
            index: *index as u8,
            manifest_root: root,
            shard_bytes: object.shard_bytes,
            expires_ms: sealed.expires_ms,
        };
        if !terms.verify(network, &h.node, &sealed.receipt) {
            return Err(TransferFailed::BadReceipt(h.node));
        }
        Ok::<_, TransferFailed>(ShardMove {
            index: *index as u8,
            to: h.node,
            receipt: sealed.receipt,
            expires_ms: sealed.expires_ms,
        })
    });
    futures::future::try_join_all(seals).await
}

async fn fetch_checked<S: Shards>(
    shards: &S,
    h: &Holder,
    version: &Hash,
    index: usize,
    segment: u64,
    hash: [u8; 32],
) -> (usize, Option<Vec<u8>>) {
    let r = shards.get_shard(h, version, index as u8, segment).await.ok();
    (index, r.filter(|b| crate::pipeline::shard_hash(b) == hash))
}
