//! The node API's answers about storage, as tenant-side clients read them: the CLI and the S3
//! gateway decode these, the node (`archipel_node::storage_api`) serves them.

use archipel_ledger::LeaseStatus;
use archipel_ledger::storage::{BucketRecord, ObjectRecord};
use archipel_types::NodeId;
use serde::{Deserialize, Serialize};

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

/// `GET /v1/buckets`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BucketList {
    /// Finalized height read.
    pub height: u64,
    /// The buckets, by name.
    pub buckets: Vec<BucketRecord>,
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
