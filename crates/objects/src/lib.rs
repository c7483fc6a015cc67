//! The client side of object storage: what the CLI and the S3 gateway do to put and get objects.
//!
//! - [`pipeline`]: the per-segment work of a PUT (encrypt → erasure-code → hash every shard) and
//!   of a GET (check every shard's hash → decode → decrypt), on buffers of one segment each, so a
//!   transfer holds a few segments whatever the object's size.
//!
//! Nodes and validators only ever receive what leaves this crate: ciphertext shards, their hashes
//! and wrapped keys.

pub mod pipeline;

pub use pipeline::{
    ObjectError, SEGMENT_BYTES, SEGMENT_PLAIN_BYTES, SealedSegment, SegmentOpener, SegmentSealer, ShardHash, shard_hash,
};
