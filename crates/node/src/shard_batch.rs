//! `POST /v1/seal-batch`: a storage node's part of a batch of small objects
//! ([`archipel_objects::batch`]) — for each item, a new version of the caller's (its claim
//! checked as one seal's is), the manifest of its one segment and this node's shard of it — all
//! stored, made durable together and answered with one receipt over the list, for the caller's
//! `PutObjects`.
//!
//! Refused whole, naming the item, when one item is: not the caller's version (403
//! `not_your_version`), committed already (409 `already_committed`), a manifest that is not the
//! version's or has more than one segment, a shard that is not the one it lists (400
//! `bad_batch`), the same version twice, or past the key's bound on uncommitted uploads (429
//! `upload_quota`). The body is bounded like any data-plane call (its length is reserved from
//! the node's body budget before it is read).

use crate::api::{ApiState, Caller, error};
use crate::shards::{BatchWrite, Refused, blocking, check_manifest_for, count_upload, grant_claim, service};
use archipel_ledger::batch::MAX_BATCH_PUTS;
use archipel_objects::batch::{BatchSealed, SealItem, decode_items};
use archipel_objects::transfer::Claim;
use archipel_store::ShardKey;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Decodes a batched seal's body (at most [`MAX_BATCH_PUTS`] items), as the handler does first.
pub fn decode(body: Bytes) -> Result<Vec<SealItem>, String> {
    decode_items(body, MAX_BATCH_PUTS)
}

fn bad(message: String) -> Refused {
    error(StatusCode::BAD_REQUEST, "bad_batch", message).into()
}

/// The handler.
pub(crate) async fn seal_batch(
    State(s): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Extension(crate::api::VerifiedBody(body)): Extension<crate::api::VerifiedBody>,
) -> Result<Response, Refused> {
    let body = body.bytes().clone();
    let svc = service(&s)?;
    let items = decode(body).map_err(|m| bad(format!("not a batch of seals: {m}")))?;
    // Hashing a batch's shards (up to the data plane's body bound) runs on a blocking thread, not
    // on the API's async workers.
    let items = tokio::task::spawn_blocking(move || {
        items.into_iter().map(|it| (*blake3::hash(&it.shard).as_bytes(), it)).collect::<Vec<_>>()
    })
    .await
    .map_err(|e| bad(format!("hashing the batch failed: {e}")))?;
    let mut versions = BTreeSet::new();
    let mut writes = Vec::with_capacity(items.len());
    for (n, (shard_hash, it)) in items.into_iter().enumerate() {
        let version = it.version.0;
        let short = hex::encode(&version[..8]);
        if !versions.insert(version) {
            return Err(bad(format!("item {n}: version {short} is twice in the batch")));
        }
        let claim = Claim::Owner { object: it.object, nonce: it.nonce };
        let grant = grant_claim(&s, &caller.0, &version, claim)?;
        let manifest = check_manifest_for(&version, &it.manifest)?;
        let [hashes] = manifest.segments.as_slice() else {
            return Err(bad(format!(
                "item {n}: version {short} has {} segments; a batch carries objects of one segment (seal it on its \
                 own)",
                manifest.segments.len()
            )));
        };
        let Some(&hash) = hashes.get(usize::from(it.index)) else {
            return Err(bad(format!("item {n}: the manifest of {short} lists no shard {}", it.index)));
        };
        if shard_hash != hash {
            return Err(bad(format!("item {n}: the shard is not shard {} the manifest of {short} lists", it.index)));
        }
        writes.push((
            claim,
            grant,
            BatchWrite {
                version,
                object: it.object,
                index: it.index,
                root: manifest.root(),
                manifest: it.manifest,
                shard: it.shard,
                hash,
            },
        ));
    }
    // Every item checked: now each is counted against the caller's bound on uploads, what it
    // carries that is not stored already (a retry counts nothing again); one past the bound
    // gives back what the others counted.
    let mut counted = Vec::with_capacity(writes.len());
    for (claim, grant, w) in &writes {
        let key = ShardKey { version: w.version, index: w.index, segment: 0 };
        let carried = (if svc.holds_manifest(&w.version, &w.manifest) { 0 } else { w.manifest.len() })
            + (if svc.holds_shard(&key, &w.shard, &w.hash) { 0 } else { w.shard.len() });
        match count_upload(&s, &svc, &caller.0, claim, &w.version, carried as u64, *grant) {
            Ok(c) => counted.push((c, w.version)),
            Err(refused) => {
                for (c, version) in &counted {
                    c.release(&svc, &caller.0, version);
                }
                return Err(refused);
            }
        }
    }
    let writes: Vec<BatchWrite> = writes.into_iter().map(|(_, _, w)| w).collect();
    let store = svc.clone();
    let node = svc.node_id();
    // What was counted stays counted if the seal fails: some of it may be on disk until the
    // collector takes it, as after a failed single seal.
    let (expires_ms, receipt, shard_bytes) = blocking(move || store.seal_batch(&writes)).await?;
    tracing::debug!(caller = %caller.0.short(), items = shard_bytes.len(), "batch sealed");
    Ok(Json(BatchSealed { node, expires_ms, receipt: hex::encode(receipt), shard_bytes }).into_response())
}

#[cfg(test)]
mod tests {
    use crate::api::testing;
    use crate::shards::ShardService;
    use archipel_crypto::Identity;
    use archipel_ledger::Hash;
    use archipel_ledger::batch::{BATCH_RECEIPT_NAMESPACE, BatchItem, batch_receipt_bytes};
    use archipel_ledger::storage::{Manifest, WRAPPED_KEY_BYTES, object_id, version_id};
    use archipel_objects::batch::SealItem;
    use archipel_objects::transfer::{Holder, Shards as _};
    use archipel_store::{ShardKey, ShardStore};
    use archipel_types::ErasureCode;
    use bytes::Bytes;
    use std::sync::Arc;

    /// Item `k` of the tenant's: a fresh version of `b/k{k}` whose shard `index` is 1,000 bytes
    /// of `k`, with a manifest of `segments` segments listing it.
    fn item(tenant: &Identity, k: u8, index: u8, segments: usize) -> SealItem {
        let object = object_id("b", &format!("k{k}"));
        let nonce = [k; 32];
        let version = version_id(&tenant.node_id(), &object, &nonce);
        let shard = vec![k; 1_000];
        let mut hashes = vec![[0u8; 32]; 6];
        hashes[usize::from(index)] = *blake3::hash(&shard).as_bytes();
        let manifest = Manifest {
            version,
            size: 4_096 * segments as u64 - 96,
            segment_bytes: 4_096,
            code: ErasureCode::DEFAULT,
            wrapped_key: [7; WRAPPED_KEY_BYTES],
            segments: vec![hashes; segments],
            meta: vec![],
        };
        SealItem {
            version,
            object,
            nonce,
            index,
            manifest: Bytes::from(manifest.to_bytes()),
            shard: Bytes::from(shard),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_stored_sealed_and_signed_once_and_one_bad_item_refuses_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let node = Identity::from_seed(4_242);
        let svc = Arc::new(ShardService::new(ShardStore::open(dir.path(), 1 << 30).unwrap(), node.clone(), Hash::ZERO));
        let mut state = testing::state(crate::config::ApiLimits::default());
        Arc::get_mut(&mut state).unwrap().shards = Some(svc.clone());
        let url = testing::serve(state.clone()).await;
        let tenant = testing::tenant();
        let holder = Holder { node: node.node_id(), url };
        let http = archipel_objects::http::HttpShards::new(tenant.clone());

        let items = vec![item(&tenant, 1, 0, 1), item(&tenant, 2, 3, 1), item(&tenant, 3, 5, 1)];
        let sealed = http.seal_batch(&holder, items.clone()).await.unwrap();
        assert_eq!((sealed.node, sealed.shard_bytes.clone()), (node.node_id(), vec![1_000; 3]));
        let signed: Vec<BatchItem> = items
            .iter()
            .map(|i| BatchItem {
                object: i.object,
                version: i.version,
                index: i.index,
                manifest_root: Manifest::from_bytes(&i.manifest).unwrap().root(),
                shard_bytes: 1_000,
            })
            .collect();
        let mut receipt = [0u8; 64];
        hex::decode_to_slice(&sealed.receipt, &mut receipt).unwrap();
        let bytes = batch_receipt_bytes(&Hash::ZERO, sealed.expires_ms, &signed);
        archipel_crypto::verify_signature(&node.node_id(), BATCH_RECEIPT_NAMESPACE, &bytes, &receipt).unwrap();
        for i in &items {
            let key = ShardKey { version: i.version.0, index: i.index, segment: 0 };
            assert_eq!(svc.store().shard(&key).unwrap(), i.shard.to_vec());
            assert_eq!(svc.store().manifest(&i.version.0).unwrap().unwrap(), i.manifest.to_vec());
        }
        // A retry of the same batch is answered the same way (nothing new stored).
        assert_eq!(http.seal_batch(&holder, items.clone()).await.unwrap().shard_bytes, vec![1_000; 3]);

        // One bad item among good new ones: refused whole, named, and nothing of it stored.
        let fresh = item(&tenant, 9, 2, 1);
        let mut not_theirs = item(&tenant, 4, 1, 1);
        not_theirs.nonce = [99; 32];
        let mut wrong_shard = item(&tenant, 5, 1, 1);
        wrong_shard.shard = Bytes::from(vec![0u8; 1_000]);
        let cases = [
            (not_theirs, 403, "not_your_version", "not made from your key"),
            (wrong_shard, 400, "bad_batch", "item 1: the shard is not shard 1"),
            (item(&tenant, 6, 1, 2), 400, "bad_batch", "has 2 segments"),
            (fresh.clone(), 400, "bad_batch", "twice in the batch"),
        ];
        for (bad, status, code, words) in cases {
            let e = http.seal_batch(&holder, vec![fresh.clone(), bad]).await.unwrap_err();
            assert_eq!(e.code.as_deref(), Some(code), "{e:?}");
            assert!(e.message.contains(words) && e.message.contains(&status.to_string()), "{e:?}");
            let key = ShardKey { version: fresh.version.0, index: fresh.index, segment: 0 };
            assert!(svc.store().entry(&key).unwrap().is_none(), "{words}: nothing stored");
        }
        // A body that is no batch at all.
        let e = http.seal_batch(&holder, vec![]).await.unwrap_err();
        assert!(e.message.contains("not a batch of seals") && e.message.contains("not 0"), "{e:?}");
    }

    /// Each item counts against the uploader's bound on uncommitted uploads: a batch past it is
    /// refused with 429 and gives back what its other items counted; a retry counts nothing again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_past_the_upload_bound_is_refused_and_counts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let node = Identity::from_seed(4_242);
        let tenant = testing::tenant();
        let items: Vec<SealItem> = (1..=3).map(|k| item(&tenant, k, 1, 1)).collect();
        let one = (items[0].manifest.len() + items[0].shard.len()) as u64;
        let mut svc = ShardService::new(ShardStore::open(dir.path(), 1 << 30).unwrap(), node.clone(), Hash::ZERO);
        svc.quota = crate::uploads::UploadQuota::with_limit(2 * one);
        let mut state = testing::state(crate::config::ApiLimits::default());
        Arc::get_mut(&mut state).unwrap().shards = Some(Arc::new(svc));
        let url = testing::serve(state.clone()).await;
        let holder = Holder { node: node.node_id(), url };
        let http = archipel_objects::http::HttpShards::new(tenant.clone());
        let e = http.seal_batch(&holder, items.clone()).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some("upload_quota"), "{e:?}");
        // Two fit, once and again.
        http.seal_batch(&holder, items[..2].to_vec()).await.unwrap();
        http.seal_batch(&holder, items[..2].to_vec()).await.unwrap();
        let e = http.seal_batch(&holder, items[2..].to_vec()).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some("upload_quota"), "{e:?}");
    }
}
