//! An archipel node: configuration, genesis, authenticated p2p networking, the membership
//! (peer table) protocol, the replicated ledger (consensus, transaction gossip), the
//! HTTP API and metrics, a storage node's shard data plane, and a compute provider's
//! bidder and runner.
//!
//! The protocol logic lives in sans-IO modules ([`membership`]); the actors that drive it
//! ([`gossip`]) are generic over commonware's runtime and p2p traits so the deterministic simulator
//! runs exactly the same code as a production node.

pub mod api;
pub mod client;
pub mod config;
pub mod datadir;
pub mod fair_queue;
pub mod files;
pub mod genesis;
pub mod gossip;
pub mod jobs_api;
pub mod join;
pub mod ledger_api;
pub mod ledger_verify;
pub mod membership;
pub mod p2p;
pub mod provider;
pub mod ratelimit;
pub mod run;
pub mod shard_batch;
pub mod shards;
pub mod storage_api;
pub mod txgossip;
pub mod uploads;
pub mod workers;
