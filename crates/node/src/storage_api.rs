//! Public reads of object storage from the finalized ledger: buckets, object listings (prefix,
//! delimiter, pagination), one object with its holders, and the storage nodes a client may
//! place shards on. Like the other reads of current state, they answer 503 `ledger_stalled`
//! rather than a stale view while this node's ledger is stalled.
//!
//! Listings page the ledger's object index. The answers' types live in
//! [`archipel_objects::api`], where tenant-side clients (the CLI, the S3 gateway) read them.

use crate::api::{ApiState, error};
use archipel_ledger::storage::ObjectRecord;
use archipel_ledger::{LeaseStatus, State as LedgerState};
use archipel_types::{NodeId, Role};
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use archipel_objects::api::{BucketList, ObjectList, ObjectView, StorageNode, StorageNodes};

/// Most keys one listing page returns.
pub const MAX_LIST_KEYS: usize = 1000;

/// The storage read routes.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/buckets", get(buckets))
        .route("/v1/buckets/{name}", get(bucket))
        .route("/v1/buckets/{name}/objects", get(list))
        .route("/v1/buckets/{name}/keys/{*key}", get(object))
        .route("/v1/buckets/{name}/object", get(object_by_query))
        .route("/v1/storage/nodes", get(storage_nodes))
        .route("/v1/storage/health", get(health))
}

pub(crate) fn storage_node(st: &LedgerState, id: &NodeId) -> Option<StorageNode> {
    let rec = st.nodes().get(id)?;
    let d = &rec.descriptor.descriptor;
    Some(StorageNode {
        node: *id,
        name: d.name.clone(),
        api_url: format!("http://{}", d.api_address),
        region: d.region.to_string(),
        country: d.country.to_string(),
        operator: d.operator.clone(),
        jurisdiction: d.operator_jurisdiction.to_string(),
        capacity_bytes: d.capacity.bytes(),
        stored_bytes: st.stored_bytes(id),
        lease: st.lease_status(id),
        storage: d.roles.contains(Role::Storage),
        reputation: st.reputation(id),
    })
}

async fn storage_nodes(State(s): State<Arc<ApiState>>) -> Response {
    let view = s.chain.with_state(|st| StorageNodes {
        height: st.chain().height,
        nodes: st.nodes().keys().filter_map(|id| storage_node(st, id)).collect(),
    });
    Json(view).into_response()
}

async fn buckets(State(s): State<Arc<ApiState>>) -> Response {
    let view = s.chain.with_state(|st| BucketList { height: st.chain().height, buckets: st.buckets() });
    Json(view).into_response()
}

async fn bucket(State(s): State<Arc<ApiState>>, Path(name): Path<String>) -> Response {
    match s.chain.with_state(|st| st.bucket(&name)) {
        Some(b) => Json(b).into_response(),
        None => {
            error(StatusCode::NOT_FOUND, "no_such_bucket", format!("no bucket {name:?} (see `archipel bucket ls`)"))
        }
    }
}

/// Query of `GET /v1/buckets/{name}/objects`.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// Only keys starting with this.
    #[serde(default)]
    pub prefix: String,
    /// Group keys sharing the prefix up to this delimiter (S3's `delimiter`).
    #[serde(default)]
    pub delimiter: Option<String>,
    /// Only keys after this one (pagination).
    #[serde(default)]
    pub start_after: Option<String>,
    /// Most keys (and common prefixes) to return, at most [`MAX_LIST_KEYS`].
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Objects the first fetch after a common prefix asks for.
const FETCH_AFTER_GROUP: usize = 4;

/// One page of a listing with S3's rules for prefix, delimiter and `start_after`. `fetch(after,
/// n)` gives up to `n` objects whose keys start with the prefix and sort after the bytes `after`,
/// in key order (a page of the ledger's index); a group under a common prefix is skipped in one
/// fetch, so a page costs O(limit) reads whatever the bucket holds.
pub fn list_page<E>(
    q: &ListQuery,
    height: u64,
    mut fetch: impl FnMut(Option<&[u8]>, usize) -> Result<Vec<ObjectRecord>, E>,
) -> Result<ObjectList, E> {
    let limit = q.limit.unwrap_or(MAX_LIST_KEYS).clamp(1, MAX_LIST_KEYS);
    let delimiter = q.delimiter.as_deref().filter(|d| !d.is_empty());
    // The common prefix `key` falls under, if any.
    let group_of = |key: &str| -> Option<String> {
        let rest = key.strip_prefix(q.prefix.as_str())?;
        delimiter.and_then(|d| rest.find(d).map(|at| key[..q.prefix.len() + at + d.len()].to_string()))
    };
    // Past every key under `group`: no UTF-8 key has the byte 0xff.
    let past = |group: &str| [group.as_bytes(), &[0xff]].concat();
    let mut out =
        ObjectList { height, objects: vec![], common_prefixes: vec![], truncated: false, next_start_after: None };
    // A page that ended on a common prefix resumes after the whole group.
    let mut cursor: Option<Vec<u8>> = q.start_after.as_ref().map(|a| match group_of(a) {
        Some(g) => past(&g),
        None => a.as_bytes().to_vec(),
    });
    let mut count = 0;
    // After a common prefix the next fetch is small and grows while keys come ungrouped, so many
    // small groups cost a few reads each, not a page each.
    let mut batch = limit + 1;
    'pages: loop {
        // At most one more than fits, to know whether the listing goes on.
        let want = batch.min(limit + 1 - count);
        batch = batch.saturating_mul(2);
        let page = fetch(cursor.as_deref(), want)?;
        let short = page.len() < want;
        for o in page {
            if count == limit {
                out.truncated = true;
                break 'pages;
            }
            count += 1;
            if let Some(g) = group_of(&o.key) {
                batch = FETCH_AFTER_GROUP;
                cursor = Some(past(&g));
                out.next_start_after = Some(g.clone());
                out.common_prefixes.push(g);
                continue 'pages;
            }
            cursor = Some(o.key.as_bytes().to_vec());
            out.next_start_after = Some(o.key.clone());
            out.objects.push(o);
        }
        if short {
            break;
        }
    }
    if !out.truncated {
        out.next_start_after = None;
    }
    Ok(out)
}

async fn list(State(s): State<Arc<ApiState>>, Path(name): Path<String>, Query(q): Query<ListQuery>) -> Response {
    let listed = s.chain.with_state(|st| {
        st.bucket(&name).map(|_| {
            let height = st.chain().height;
            list_page(&q, height, |after, n| st.list_objects(&name, &q.prefix, after, n))
        })
    });
    match listed {
        Some(Ok(page)) => Json(page).into_response(),
        Some(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_failed",
            format!("this node cannot read its ledger state ({e}); ask another node"),
        ),
        None => {
            error(StatusCode::NOT_FOUND, "no_such_bucket", format!("no bucket {name:?} (see `archipel bucket ls`)"))
        }
    }
}

/// Query of `GET /v1/buckets/{name}/object`.
#[derive(Debug, Deserialize)]
pub struct KeyQuery {
    /// The object's key, exactly (a key with `.` or `..` segments cannot travel in a path).
    pub key: String,
}

async fn object_by_query(s: State<Arc<ApiState>>, Path(name): Path<String>, Query(q): Query<KeyQuery>) -> Response {
    object(s, Path((name, q.key))).await
}

async fn object(State(s): State<Arc<ApiState>>, Path((name, key)): Path<(String, String)>) -> Response {
    let found = s.chain.with_state(|st| {
        let object = st.object(&name, &key)?;
        let holders = object.holders.iter().map(|h| storage_node(st, h)).collect();
        Some(ObjectView { height: st.chain().height, object, holders })
    });
    match found {
        Some(v) => Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, "no_such_key", format!("no object {name}/{key}")),
    }
}

/// The health of one bucket's objects.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BucketHealth {
    /// The bucket.
    pub bucket: String,
    /// Its code.
    pub code: String,
    /// Objects.
    pub objects: u64,
    /// Segments of all its objects.
    pub segments: u64,
    /// Objects with at least one holder down, gone or outside the fence.
    pub degraded_objects: u64,
    /// Their segments.
    pub degraded_segments: u64,
    /// Objects whose repair may start now (holders gone, outside the fence, or down past the
    /// repair grace): the repair queue.
    pub repair_queue: u64,
    /// Objects with fewer than k available holders: not readable until holders come back.
    pub unavailable_objects: u64,
    /// The fewest further holder losses any of its objects survives (m when all is healthy;
    /// negative: unreadable now).
    pub tolerates_losses: i64,
}

/// `GET /v1/storage/health`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StorageHealth {
    /// Finalized height read.
    pub height: u64,
    /// Per bucket.
    pub buckets: Vec<BucketHealth>,
}

/// The health of every bucket in `st` at `now_ms`: counts from the bucket records, and the
/// objects that are not whole from the ledger's index of holders that are not up where they
/// registered (O(buckets + those objects), not O(objects)).
pub fn storage_health(st: &LedgerState, now_ms: u64) -> StorageHealth {
    let mut buckets: std::collections::BTreeMap<String, (archipel_types::PlacementPolicy, BucketHealth)> = st
        .buckets()
        .into_iter()
        .map(|b| {
            let h = BucketHealth {
                bucket: b.name.clone(),
                code: b.policy.code.to_string(),
                objects: b.objects,
                segments: b.segments,
                tolerates_losses: i64::from(b.policy.code.parity),
                ..BucketHealth::default()
            };
            (b.name, (b.policy, h))
        })
        .collect();
    // Every object with a holder that is not Up, gone, moved or suspect: a whole one tolerates m.
    for o in st.repair_candidates() {
        let Some((policy, h)) = buckets.get_mut(&o.bucket) else { continue };
        let available = o
            .holders
            .iter()
            .filter(|n| st.lease_status(n) == LeaseStatus::Up && st.unhealthy_at(n, policy, now_ms).is_none())
            .count() as i64;
        let k = i64::from(o.code.data);
        if available < o.holders.len() as i64 {
            h.degraded_objects += 1;
            h.degraded_segments += o.segments();
        }
        if !crate::workers::to_repair(st, &o, policy, now_ms).is_empty() {
            h.repair_queue += 1;
        }
        if available < k {
            h.unavailable_objects += 1;
        }
        h.tolerates_losses = h.tolerates_losses.min(available - k);
    }
    StorageHealth { height: st.chain().height, buckets: buckets.into_values().map(|(_, h)| h).collect() }
}

async fn health(State(s): State<Arc<ApiState>>) -> Response {
    let view = s.chain.with_state(|st| storage_health(st, crate::api::system_now_ms().max(st.chain().timestamp_ms)));
    Json(view).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_ledger::Hash;
    use archipel_types::ErasureCode;

    fn obj(key: &str) -> ObjectRecord {
        ObjectRecord {
            bucket: "b".into(),
            key: key.into(),
            version: Hash::ZERO,
            size: 1,
            segment_bytes: 4096,
            code: ErasureCode::DEFAULT,
            manifest_root: Hash::ZERO,
            etag: String::new(),
            holders: vec![],
            shard_bytes: 0,
            created_height: 0,
            created_ms: 0,
            generation: 0,
            suspect: vec![],
        }
    }

    fn keys(l: &ObjectList) -> Vec<&str> {
        l.objects.iter().map(|o| o.key.as_str()).collect()
    }

    /// A page of `all` (sorted by key) as the ledger's index gives it, counting the objects read.
    fn from(all: &[ObjectRecord], q: &ListQuery, read: &mut usize) -> ObjectList {
        let page = list_page(q, 7, |after, n| {
            let got: Vec<ObjectRecord> = all
                .iter()
                .filter(|o| o.key.starts_with(&q.prefix) && after.is_none_or(|a| o.key.as_bytes() > a))
                .take(n)
                .cloned()
                .collect();
            *read += got.len();
            Ok::<_, ()>(got)
        });
        page.unwrap()
    }

    #[test]
    fn listings_follow_s3s_prefix_delimiter_and_pagination() {
        let all: Vec<ObjectRecord> =
            ["a.txt", "docs/1", "docs/2", "docs/sub/3", "photos/x", "z"].iter().map(|k| obj(k)).collect();
        let q = ListQuery { delimiter: Some("/".into()), ..ListQuery::default() };
        let l = from(&all, &q, &mut 0);
        assert_eq!(keys(&l), ["a.txt", "z"]);
        assert_eq!(l.common_prefixes, ["docs/", "photos/"]);
        assert!(!l.truncated);
        let q = ListQuery { prefix: "docs/".into(), delimiter: Some("/".into()), ..ListQuery::default() };
        let l = from(&all, &q, &mut 0);
        assert_eq!((keys(&l), l.common_prefixes.clone()), (vec!["docs/1", "docs/2"], vec!["docs/sub/".to_string()]));
        // Pages of two, resumed with start_after, cover everything once.
        let mut seen = vec![];
        let mut after = None;
        loop {
            let q = ListQuery { limit: Some(2), start_after: after.clone(), ..ListQuery::default() };
            let l = from(&all, &q, &mut 0);
            seen.extend(keys(&l).into_iter().map(String::from));
            if !l.truncated {
                break;
            }
            after = l.next_start_after.clone();
        }
        assert_eq!(seen, ["a.txt", "docs/1", "docs/2", "docs/sub/3", "photos/x", "z"]);
        // With a delimiter, a page counts a common prefix once and resumes after it.
        let q = ListQuery { limit: Some(2), delimiter: Some("/".into()), ..ListQuery::default() };
        let l = from(&all, &q, &mut 0);
        assert_eq!(
            (keys(&l), l.common_prefixes.clone(), l.truncated),
            (vec!["a.txt"], vec!["docs/".to_string()], true)
        );
        let q = ListQuery {
            limit: Some(2),
            delimiter: Some("/".into()),
            start_after: l.next_start_after.clone(),
            ..ListQuery::default()
        };
        let l = from(&all, &q, &mut 0);
        assert_eq!((keys(&l), l.common_prefixes.clone(), l.truncated), (vec!["z"], vec!["photos/".to_string()], false));
    }

    #[test]
    fn a_page_reads_about_its_own_size_however_big_the_bucket_or_its_groups() {
        // 10,000 keys under one common prefix and 10,000 after it.
        let mut all: Vec<ObjectRecord> = (0..10_000).map(|i| obj(&format!("big/{i:05}"))).collect();
        all.extend((0..10_000).map(|i| obj(&format!("z{i:05}"))));
        let mut read = 0;
        let q = ListQuery { limit: Some(10), delimiter: Some("/".into()), ..ListQuery::default() };
        let l = from(&all, &q, &mut read);
        assert_eq!(l.common_prefixes, ["big/"]);
        assert_eq!(keys(&l), (0..9).map(|i| format!("z{i:05}")).collect::<Vec<_>>());
        assert!(l.truncated && l.next_start_after.as_deref() == Some("z00008"));
        // A fetch of 11 that the group filled, then 10 after the group: not the 10,000 inside.
        assert!(read <= 2 * 11, "read {read} objects for a page of 10");
        // Resuming after the group itself skips it whole.
        let mut read = 0;
        let q = ListQuery { limit: Some(3), start_after: Some("big/".into()), delimiter: Some("/".into()), ..q };
        let l = from(&all, &q, &mut read);
        assert_eq!(keys(&l), ["z00000", "z00001", "z00002"]);
        assert!(read <= 4, "read {read}: the fetch starts past the group");
        // Many small groups: a few reads each, not a page each.
        let groups: Vec<ObjectRecord> =
            (0..100).flat_map(|g| (0..100).map(move |i| obj(&format!("u{g:03}/{i:03}")))).collect();
        let mut read = 0;
        let q = ListQuery { limit: Some(100), delimiter: Some("/".into()), ..ListQuery::default() };
        let l = from(&groups, &q, &mut read);
        assert_eq!((l.common_prefixes.len(), l.truncated), (100, false));
        assert!(read <= 5 * 101 + 101, "read {read} objects for 100 groups");
        // A key under a prefix that is not the listing's is never grouped.
        let q = ListQuery { prefix: "big/0000".into(), delimiter: Some("/".into()), ..ListQuery::default() };
        assert_eq!(keys(&from(&all, &q, &mut 0)).len(), 10);
    }
}
