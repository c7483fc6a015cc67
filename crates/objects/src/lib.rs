//! The client side of object storage: what the CLI and the S3 gateway do to put and get objects.
//!
//! - [`pipeline`]: the per-segment work of a PUT (encrypt → erasure-code → hash every shard) and
//!   of a GET (check every shard's hash → decode → decrypt), on buffers of one segment each, so a
//!   transfer holds a few segments whatever the object's size.
//! - [`transfer`]: whole-object PUT (placement, parallel uploads, receipts → the `PutObject`
//!   payload) and GET (manifest checked against the ledger, hedged shard reads, range reads) over
//!   a [`transfer::Shards`] transport; [`http`] is the signed-HTTP one.
//! - [`batch`]: group commit of small objects — concurrent PUTs into one bucket sealed on each
//!   holder in one call and committed by one `PutObjects`.
//! - [`repair`]: rebuilds lost shards from k healthy ones onto new holders, for `MoveShards`.
//!
//! Nodes and validators only ever receive what leaves this crate: ciphertext shards, their hashes
//! and wrapped keys.

pub mod api;
pub mod batch;
pub mod http;
pub mod meta;
pub mod pipeline;
pub mod repair;
pub mod tenant;
pub mod transfer;

pub use pipeline::{
    ObjectError, SEGMENT_BYTES, SEGMENT_PLAIN_BYTES, SealedSegment, SegmentOpener, SegmentSealer, ShardHash, shard_hash,
};
