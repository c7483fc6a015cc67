//! Authenticated, encrypted node-to-node networking on `commonware-p2p` (`authenticated::lookup`).
//!
//! Every connection is a handshake between two Ed25519 keys; the allowed set is the member nodes
//! (genesis nodes plus admitted ones, with their p2p addresses), so a process whose key is not
//! registered cannot connect and receives nothing. [`MemberSet`] re-tracks the set when a node is
//! admitted. The namespace includes the genesis hash: nodes of different networks never
//! talk, even with the same keys.

use crate::genesis::Genesis;
use crate::gossip::{GOSSIP_CHANNEL, MAX_GOSSIP_MESSAGE};
use archipel_consensus::engine::{
    BACKFILL_CHANNEL, BLOCKS_CHANNEL, CERTIFICATES_CHANNEL, Channels, FETCH_CHANNEL, RESOLVER_CHANNEL, VOTES_CHANNEL,
};
use archipel_consensus::liveness::LIVENESS_CHANNEL;
use archipel_crypto::{Identity, SignedDescriptor};
use commonware_cryptography::ChaCha20Poly1305;
use commonware_p2p::authenticated::lookup::{self, Network};
use commonware_p2p::{Address, AddressableManager};
use commonware_runtime::{Quota, Supervisor, tokio as cw_tokio};
use commonware_stream::cups::{self, Cups};
use commonware_stream::sake::{self, Sake};
use commonware_utils::{NZU32, NZUsize, ordered::Map};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

/// The concrete p2p sender of a node.
pub type NodeSender = lookup::Sender<archipel_crypto::Ed25519PublicKey, cw_tokio::Context>;
/// The concrete p2p receiver of a node.
pub type NodeReceiver = lookup::Receiver<archipel_crypto::Ed25519PublicKey>;

/// A started p2p network: the gossip channel and the allowed peer set.
#[allow(missing_debug_implementations)]
pub struct P2p {
    /// Sends on the gossip channel.
    pub sender: NodeSender,
    /// Receives from the gossip channel.
    pub receiver: NodeReceiver,
    /// The allowed peer set.
    pub members: MemberSet,
    /// The consensus channels.
    pub consensus: Channels<NodeSender, NodeReceiver>,
    /// The transaction gossip channel.
    pub txs: (NodeSender, NodeReceiver),
    /// The oracle (peer provider and blocker for consensus).
    pub oracle: lookup::Oracle<archipel_crypto::Ed25519PublicKey>,
}

/// How many recent member sets the p2p layer keeps allowed (commonware's default).
const TRACKED_PEER_SETS: NonZeroUsize = NZUsize!(4);

/// p2p channel of transaction gossip (to validators).
pub const TX_CHANNEL: u64 = 6;

/// The p2p namespace of a network: connections only form between nodes of the same genesis.
pub fn namespace(genesis_hash: &str) -> Vec<u8> {
    format!("archipel/p2p/v1/{genesis_hash}").into_bytes()
}

/// The commonware address of a member: its p2p address, and its egress IP if it has one.
fn address(d: &archipel_types::NodeDescriptor) -> Address {
    match d.p2p_egress_ip {
        Some(ip) => Address::Asymmetric { ingress: d.p2p_address.into(), egress: SocketAddr::new(ip, 0) },
        None => Address::Symmetric(d.p2p_address),
    }
}

/// The allowed peer set as tracked by the p2p oracle.
#[allow(missing_debug_implementations)]
pub struct MemberSet {
    oracle: lookup::Oracle<archipel_crypto::Ed25519PublicKey>,
    members: std::collections::BTreeMap<archipel_types::NodeId, Address>,
    next_id: u64,
}

impl MemberSet {
    /// Tracks `members` as peer set 0.
    fn new(oracle: lookup::Oracle<archipel_crypto::Ed25519PublicKey>, members: &[SignedDescriptor]) -> Self {
        let members = members.iter().map(|m| (m.descriptor.node_id, address(&m.descriptor))).collect();
        let mut set = Self { oracle, members, next_id: 0 };
        set.track();
        set
    }

    fn track(&mut self) {
        let entries: Vec<(archipel_crypto::Ed25519PublicKey, Address)> = self
            .members
            .iter()
            .filter_map(|(id, a)| archipel_crypto::public_key(id).ok().map(|pk| (pk, a.clone())))
            .collect();
        if let Ok(peers) = Map::try_from(entries) {
            let _ = self.oracle.track(self.next_id, peers);
            self.next_id += 1;
        }
    }

    /// Adds a member (an admitted node) and tracks the new set.
    pub fn add(&mut self, member: &SignedDescriptor) {
        if self.members.insert(member.descriptor.node_id, address(&member.descriptor)).is_none() {
            self.track();
        }
    }

    /// Makes the allowed set exactly `members` (the node registry in finalized state, plus
    /// admitted nodes); tracks it only when it changed.
    pub fn set(&mut self, members: &[SignedDescriptor]) {
        let next: std::collections::BTreeMap<_, _> =
            members.iter().map(|m| (m.descriptor.node_id, address(&m.descriptor))).collect();
        if next != self.members {
            let removed = self.members.keys().any(|id| !next.contains_key(id));
            self.members = next;
            // The p2p layer allows every member of its recent sets: after a removal, track the
            // new set until no older set that still holds the removed node remains.
            let times = if removed { TRACKED_PEER_SETS.get() } else { 1 };
            for _ in 0..times {
                self.track();
            }
        }
    }
}

/// Starts the p2p network with `members` as the allowed set and returns the gossip channel.
/// `listen` is the local socket; peers are dialed at their descriptors' p2p addresses.
pub fn start(
    context: &cw_tokio::Context,
    identity: &Identity,
    members: &[SignedDescriptor],
    genesis_hash: &str,
    listen: SocketAddr,
    allow_private_ips: bool,
    max_message_bytes: u32,
) -> Result<P2p, String> {
    let handshake = Cups::<_, ChaCha20Poly1305>::new(
        Sake {
            signer: identity.private_key().clone(),
            synchrony_bound: Duration::from_secs(30),
            max_handshake_age: Duration::from_secs(30),
            version: sake::Version::V1,
        },
        cups::Version::V1,
    );
    // Room for nodes admitted while running. The channel's inbound mailbox is sized from this
    // times the tracked peer sets times the per-peer quota, so keep both modest (memory).
    let peers = members.len() + 16;
    let mut cfg = lookup::Config::local(
        handshake,
        &namespace(genesis_hash),
        listen,
        NonZeroUsize::new(peers).unwrap_or(NZUsize!(1)),
        max_message_bytes.max(MAX_GOSSIP_MESSAGE as u32),
        NZUsize!(1_024),
    );
    cfg.allow_private_ips = allow_private_ips;
    // Reconnect quickly after a peer restarts: liveness is reported within seconds.
    cfg.dial_frequency = Duration::from_millis(200);
    cfg.peer_connection_cooldown = Duration::from_millis(500);
    cfg.ping_frequency = Duration::from_secs(1);
    cfg.block_duration = Duration::from_secs(60);
    cfg.tracked_peer_sets = TRACKED_PEER_SETS;

    let (mut network, oracle) = Network::new(context.child("p2p"), cfg);
    let members = MemberSet::new(oracle.clone(), members);
    // Membership sends ~2 hellos per second per peer plus occasional tables.
    let (sender, receiver) = network.register(GOSSIP_CHANNEL, Quota::per_second(NZU32!(50)));
    // Consensus runs at ~100 views/s with a few messages per view; the inbound mailbox of a
    // channel is sized peers x burst, so rates are high and bursts modest (memory).
    let fast = |rate| Quota::per_second(rate).allow_burst(NZU32!(64));
    let consensus = Channels {
        votes: network.register(VOTES_CHANNEL, fast(NZU32!(2_000))),
        certificates: network.register(CERTIFICATES_CHANNEL, fast(NZU32!(2_000))),
        resolver: network.register(RESOLVER_CHANNEL, fast(NZU32!(500))),
        blocks: network.register(BLOCKS_CHANNEL, fast(NZU32!(1_000))),
        backfill: network.register(BACKFILL_CHANNEL, fast(NZU32!(1_000))),
        fetch: network.register(FETCH_CHANNEL, fast(NZU32!(1_000))),
        // Every node heartbeats every lease_ttl / 4 (a few per second at most).
        liveness: network.register(LIVENESS_CHANNEL, fast(NZU32!(50))),
    };
    let txs = network.register(TX_CHANNEL, fast(NZU32!(2_000)));
    network.start();
    Ok(P2p { sender, receiver, members, consensus, txs, oracle })
}

/// What a probe connection saw, see [`probe`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProbeReport {
    /// The probing key.
    pub key: archipel_types::NodeId,
    /// Whether the key is one of the genesis nodes.
    pub registered: bool,
    /// Gossip messages received during the probe.
    pub messages_received: u64,
    /// Distinct peers that sent something.
    pub peers_heard: usize,
    /// How long the probe listened, in ms.
    pub duration_ms: u64,
}

/// Joins the network with `identity` for `duration` (listening on `listen`) and counts what it
/// receives. With an unregistered key the answer must be nothing: this is how tests show that the
/// transport refuses foreign keys.
pub fn probe(identity: &Identity, genesis: &Genesis, listen: SocketAddr, duration: Duration) -> ProbeReport {
    use commonware_p2p::Receiver as _;
    use commonware_runtime::{Clock, Runner};
    let genesis_hash = genesis.hash();
    let dir = std::env::temp_dir().join(format!("archipel-probe-{}", std::process::id()));
    let runner = cw_tokio::Runner::new(cw_tokio::Config::new().with_worker_threads(1).with_storage_directory(&dir));
    let identity = identity.clone();
    let registered = genesis.node(&identity.node_id()).is_some();
    let genesis = genesis.clone();
    let report = runner.start(|context| async move {
        let mut messages = 0u64;
        let mut heard = std::collections::BTreeSet::new();
        if let Ok(mut p2p) = start(&context, &identity, &genesis.nodes, &genesis_hash, listen, true, 0) {
            let deadline = context.current() + duration;
            loop {
                commonware_macros::select! {
                    _ = context.sleep_until(deadline) => break,
                    msg = p2p.receiver.recv() => match msg {
                        Ok((pk, _)) => {
                            messages += 1;
                            heard.insert(pk);
                        }
                        Err(_) => break,
                    },
                }
            }
        }
        ProbeReport {
            key: identity.node_id(),
            registered,
            messages_received: messages,
            peers_heard: heard.len(),
            duration_ms: duration.as_millis() as u64,
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    report
}
