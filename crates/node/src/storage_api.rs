//! Public reads of object storage from the finalized ledger: buckets, object listings (prefix,
//! delimiter, pagination), one object with its holders, and the storage nodes a client may
//! place shards on. Like the other reads of current state, they answer 503 `ledger_stalled`
//! rather than a stale view while this node's ledger is stalled.
//!
//! Listings scan the state's stored entries (O(state)); a name index is a later step
//! (ARCHITECTURE.md, "Object storage").

use crate::api::{ApiState, error};
use archipel_ledger::storage::{BucketRecord, ObjectRecord};
use archipel_ledger::{LeaseStatus, State as LedgerState};
use archipel_types::{NodeId, Role};
use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Most keys one listing page returns.
pub const MAX_LIST_KEYS: usize = 1000;

/// The storage read routes.
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/buckets", get(buckets))
        .route("/v1/buckets/{name}", get(bucket))
        .route("/v1/buckets/{name}/objects", get(list))
        .route("/v1/buckets/{name}/keys/{*key}", get(object))
        .route("/v1/storage/nodes", get(storage_nodes))
        .route("/v1/storage/health", get(health))
}

/// A node as storage sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StorageNode {
    /// The node.
    pub node: NodeId,
    /// Its name.
    pub name: String,
    /// Its API URL.
    pub api_url: String,
    /// Region.
    pub region: String,
    /// Country of its hardware.
    pub country: String,
    /// Operator.
    pub operator: String,
    /// The operator's jurisdiction.
    pub jurisdiction: String,
    /// Declared capacity.
    pub capacity_bytes: u64,
    /// Bytes of shards the ledger assigns it.
    pub stored_bytes: u64,
    /// Lease in finalized state.
    pub lease: LeaseStatus,
    /// Whether it has the storage role.
    pub storage: bool,
    /// Its reputation (1000 less 250 per failed audit).
    pub reputation: u16,
}

/// `GET /v1/storage/nodes`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StorageNodes {
    /// Finalized height read.
    pub height: u64,
    /// Every registered node.
    pub nodes: Vec<StorageNode>,
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

/// `GET /v1/buckets`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BucketList {
    /// Finalized height read.
    pub height: u64,
    /// The buckets, by name.
    pub buckets: Vec<BucketRecord>,
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

/// `GET /v1/buckets/{name}/objects`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectList {
    /// Finalized height read.
    pub height: u64,
    /// Objects, by key.
    pub objects: Vec<ObjectRecord>,
    /// Prefixes grouped by the delimiter.
    pub common_prefixes: Vec<String>,
    /// Whether more keys follow; ask again with `start_after` = `next_start_after`.
    pub truncated: bool,
    /// The last key or prefix returned, when truncated.
    pub next_start_after: Option<String>,
}

/// One page of a listing of `objects` (sorted by key): S3's rules for prefix, delimiter and
/// `start_after`.
pub fn list_page(objects: Vec<ObjectRecord>, q: &ListQuery, height: u64) -> ObjectList {
    let limit = q.limit.unwrap_or(MAX_LIST_KEYS).clamp(1, MAX_LIST_KEYS);
    let mut out =
        ObjectList { height, objects: vec![], common_prefixes: vec![], truncated: false, next_start_after: None };
    let mut prefixes = BTreeSet::new();
    let mut count = 0;
    for o in objects {
        if !o.key.starts_with(&q.prefix) || q.start_after.as_ref().is_some_and(|a| o.key.as_str() <= a.as_str()) {
            continue;
        }
        let grouped =
            q.delimiter.as_deref().filter(|d| !d.is_empty()).and_then(|d| {
                o.key[q.prefix.len()..].find(d).map(|at| o.key[..q.prefix.len() + at + d.len()].to_string())
            });
        // A group already returned on this page, or on an earlier one (a page that ended on a
        // common prefix resumes after the whole group).
        if let Some(p) = &grouped
            && (prefixes.contains(p) || q.start_after.as_ref().is_some_and(|a| p.as_str() <= a.as_str()))
        {
            continue;
        }
        if count == limit {
            out.truncated = true;
            break;
        }
        count += 1;
        match grouped {
            Some(p) => {
                out.next_start_after = Some(p.clone());
                prefixes.insert(p.clone());
                out.common_prefixes.push(p);
            }
            None => {
                out.next_start_after = Some(o.key.clone());
                out.objects.push(o);
            }
        }
    }
    if !out.truncated {
        out.next_start_after = None;
    }
    out
}

async fn list(State(s): State<Arc<ApiState>>, Path(name): Path<String>, Query(q): Query<ListQuery>) -> Response {
    let found = s.chain.with_state(|st| st.bucket(&name).map(|_| (st.objects_in(&name), st.chain().height)));
    match found {
        Some((objects, height)) => Json(list_page(objects, &q, height)).into_response(),
        None => {
            error(StatusCode::NOT_FOUND, "no_such_bucket", format!("no bucket {name:?} (see `archipel bucket ls`)"))
        }
    }
}

/// `GET /v1/buckets/{name}/keys/{key}`: an object with its holders.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ObjectView {
    /// Finalized height read.
    pub height: u64,
    /// The object.
    pub object: ObjectRecord,
    /// Its holders in shard order (`None`: no longer registered).
    pub holders: Vec<Option<StorageNode>>,
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

/// The health of every bucket in `st` at `now_ms` (O(objects)).
pub fn storage_health(st: &LedgerState, now_ms: u64) -> StorageHealth {
    // One pass over the objects, with each bucket's policy from the bucket list.
    let mut buckets: std::collections::BTreeMap<String, (archipel_types::PlacementPolicy, BucketHealth)> = st
        .buckets()
        .into_iter()
        .map(|b| {
            let h = BucketHealth {
                bucket: b.name.clone(),
                code: b.policy.code.to_string(),
                tolerates_losses: i64::from(b.policy.code.parity),
                ..BucketHealth::default()
            };
            (b.name, (b.policy, h))
        })
        .collect();
    for o in st.all_objects() {
        let Some((policy, h)) = buckets.get_mut(&o.bucket) else { continue };
        let available = o
            .holders
            .iter()
            .filter(|n| st.lease_status(n) == LeaseStatus::Up && st.unhealthy_at(n, policy, now_ms).is_none())
            .count() as i64;
        let k = i64::from(o.code.data);
        h.objects += 1;
        h.segments += o.segments();
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

    #[test]
    fn listings_follow_s3s_prefix_delimiter_and_pagination() {
        let all: Vec<ObjectRecord> =
            ["a.txt", "docs/1", "docs/2", "docs/sub/3", "photos/x", "z"].iter().map(|k| obj(k)).collect();
        let q = ListQuery { delimiter: Some("/".into()), ..ListQuery::default() };
        let l = list_page(all.clone(), &q, 7);
        assert_eq!(keys(&l), ["a.txt", "z"]);
        assert_eq!(l.common_prefixes, ["docs/", "photos/"]);
        assert!(!l.truncated);
        let q = ListQuery { prefix: "docs/".into(), delimiter: Some("/".into()), ..ListQuery::default() };
        let l = list_page(all.clone(), &q, 7);
        assert_eq!((keys(&l), l.common_prefixes.clone()), (vec!["docs/1", "docs/2"], vec!["docs/sub/".to_string()]));
        // Pages of two, resumed with start_after, cover everything once.
        let mut seen = vec![];
        let mut after = None;
        loop {
            let q = ListQuery { limit: Some(2), start_after: after.clone(), ..ListQuery::default() };
            let l = list_page(all.clone(), &q, 7);
            seen.extend(keys(&l).into_iter().map(String::from));
            if !l.truncated {
                break;
            }
            after = l.next_start_after.clone();
        }
        assert_eq!(seen, ["a.txt", "docs/1", "docs/2", "docs/sub/3", "photos/x", "z"]);
        // With a delimiter, a page counts a common prefix once and resumes after it.
        let q = ListQuery { limit: Some(2), delimiter: Some("/".into()), ..ListQuery::default() };
        let l = list_page(all.clone(), &q, 7);
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
        let l = list_page(all, &q, 7);
        assert_eq!((keys(&l), l.common_prefixes.clone(), l.truncated), (vec!["z"], vec!["photos/".to_string()], false));
    }
}
