//! Authenticated, encrypted node-to-node networking on `commonware-p2p` (`authenticated::lookup`).
//!
//! Every connection is a handshake between two Ed25519 keys; the allowed set is the member nodes
//! (the node registry of finalized ledger state plus nodes admitted by validator quorum, with their
//! p2p addresses), so a process whose key is not registered cannot connect and receives nothing.
//! [`MemberSet`] re-tracks the set when the registry changes or a node is admitted. The namespace
//! includes the genesis hash: nodes of different networks never talk, even with the same keys.
//!
//! commonware sizes its mailboxes from a peer limit fixed at start and panics when a tracked set
//! is larger ("peer set too large"). The limit is therefore [`peer_limit`] — the genesis's
//! `max_registered_nodes` (which the ledger enforces at registration) plus room for admitted nodes
//! and this node — never the current member count, and [`MemberSet`] never hands commonware a
//! set above it, whatever the registry or the admissions say.

use crate::genesis::Genesis;
use crate::gossip::{GOSSIP_CHANNEL, MAX_GOSSIP_MESSAGE};
use archipel_consensus::engine::{
    BACKFILL_CHANNEL, BLOCKS_CHANNEL, CERTIFICATES_CHANNEL, Channels, FETCH_CHANNEL, RESOLVER_CHANNEL, VOTES_CHANNEL,
};
use archipel_consensus::liveness::LIVENESS_CHANNEL;
use archipel_crypto::{Identity, SignedDescriptor};
use archipel_ledger::LedgerParams;
use archipel_types::NodeId;
use commonware_cryptography::ChaCha20Poly1305;
use commonware_p2p::authenticated::lookup::{self, Network};
use commonware_p2p::{Address, AddressableManager};
use commonware_runtime::{Quota, Supervisor, tokio as cw_tokio};
use commonware_stream::cups::{self, Cups};
use commonware_stream::sake::{self, Sake};
use commonware_utils::{NZU32, NZUsize, ordered::Map};
use std::collections::BTreeMap;
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

/// How many recent member sets the p2p layer keeps allowed. One: a node that left is dropped at
/// once (peers in both the old and the new set keep their connections), and every channel's
/// mailbox, sized peer limit x tracked sets x burst, stays a quarter of commonware's default.
const TRACKED_PEER_SETS: NonZeroUsize = NZUsize!(1);

/// Room in the allowed set for nodes admitted by validator quorum (`archipel node admit`) beyond
/// the registry; further admissions are not allowed at the p2p layer (and logged).
pub const ADMITTED_PEERS: usize = 16;

/// The p2p peer limit of a network: `max_registered_nodes` (the registry can never hold more),
/// [`ADMITTED_PEERS`], and this node itself (commonware counts it even when it is not yet
/// registered, as a node started with `--join`).
pub fn peer_limit(params: &LedgerParams) -> NonZeroUsize {
    let limit = (params.max_registered_nodes as usize).saturating_add(ADMITTED_PEERS + 1);
    NonZeroUsize::new(limit).unwrap_or(NZUsize!(1))
}

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

/// Where a [`MemberSet`] sends the sets it tracks: the p2p oracle in a node, a recorder in tests.
pub trait PeerTracker {
    /// Makes `peers` the allowed set with index `index` (indices increase).
    fn track_peers(&mut self, index: u64, peers: Map<archipel_crypto::Ed25519PublicKey, Address>);
}

impl PeerTracker for lookup::Oracle<archipel_crypto::Ed25519PublicKey> {
    fn track_peers(&mut self, index: u64, peers: Map<archipel_crypto::Ed25519PublicKey, Address>) {
        let _ = self.track(index, peers);
    }
}

/// The members as commonware counts them: the set plus this node if it is not in it.
fn counted(members: &BTreeMap<NodeId, Address>, me: &NodeId) -> usize {
    members.len() + usize::from(!members.contains_key(me))
}

/// The allowed peer set as tracked by the p2p oracle, bounded by the peer limit.
#[allow(missing_debug_implementations)]
pub struct MemberSet<T: PeerTracker = lookup::Oracle<archipel_crypto::Ed25519PublicKey>> {
    tracker: T,
    me: NodeId,
    limit: usize,
    members: BTreeMap<NodeId, Address>,
    next_id: u64,
}

impl<T: PeerTracker> MemberSet<T> {
    /// Tracks `members` (see [`MemberSet::set`]) as the first set of node `me`, never more than
    /// `limit` peers counting `me`.
    pub fn new(tracker: T, me: NodeId, limit: NonZeroUsize, members: &[SignedDescriptor]) -> Self {
        let mut set = Self { tracker, me, limit: limit.get(), members: BTreeMap::new(), next_id: 0 };
        set.members = set.bounded(members);
        set.track();
        set
    }

    /// The current members (what the last tracked set allows).
    pub fn members(&self) -> &BTreeMap<NodeId, Address> {
        &self.members
    }

    /// `members` in order until the limit; the rest is left out with an error log. The registry
    /// comes first in every caller and never exceeds `max_registered_nodes`, so only admitted
    /// nodes beyond [`ADMITTED_PEERS`] can be left out.
    fn bounded(&self, members: &[SignedDescriptor]) -> BTreeMap<NodeId, Address> {
        let mut out = BTreeMap::new();
        let mut left_out = Vec::new();
        for m in members {
            let id = m.descriptor.node_id;
            if out.contains_key(&id) {
                continue;
            }
            out.insert(id, address(&m.descriptor));
            if counted(&out, &self.me) > self.limit {
                out.remove(&id);
                left_out.push(id.short());
            }
        }
        if !left_out.is_empty() {
            tracing::error!(
                limit = self.limit,
                left_out = ?left_out,
                "p2p peer limit reached: these nodes are not allowed to connect (the limit is max_registered_nodes + {ADMITTED_PEERS} admitted nodes + this node)"
            );
        }
        out
    }

    fn track(&mut self) {
        let entries: Vec<(archipel_crypto::Ed25519PublicKey, Address)> = self
            .members
            .iter()
            .filter_map(|(id, a)| archipel_crypto::public_key(id).ok().map(|pk| (pk, a.clone())))
            .collect();
        // `bounded` keeps the set within the limit; checked again here because commonware
        // panics on a larger set.
        if counted(&self.members, &self.me) > self.limit {
            tracing::error!(members = self.members.len(), limit = self.limit, "peer set above the limit not tracked");
            return;
        }
        if let Ok(peers) = Map::try_from(entries) {
            self.tracker.track_peers(self.next_id, peers);
            self.next_id += 1;
        }
    }

    /// Adds a member (an admitted node) and tracks the new set; refused (with an error log)
    /// when the set is at the peer limit.
    pub fn add(&mut self, member: &SignedDescriptor) {
        let id = member.descriptor.node_id;
        if self.members.contains_key(&id) {
            return;
        }
        self.members.insert(id, address(&member.descriptor));
        if counted(&self.members, &self.me) > self.limit {
            self.members.remove(&id);
            tracing::error!(node = %id.short(), limit = self.limit, "p2p peer limit reached: admitted node not allowed to connect");
            return;
        }
        self.track();
    }

    /// Makes the allowed set `members` (the node registry in finalized state first, then
    /// admitted nodes), cut at the peer limit; tracks it only when it changed.
    pub fn set(&mut self, members: &[SignedDescriptor]) {
        let next = self.bounded(members);
        if next != self.members {
            self.members = next;
            self.track();
        }
    }
}

/// Starts the p2p network with `members` as the allowed set and returns the gossip channel.
/// `listen` is the local socket; peers are dialed at their descriptors' p2p addresses. The peer
/// limit comes from the genesis's `ledger` parameters ([`peer_limit`]).
#[allow(clippy::too_many_arguments)]
pub fn start(
    context: &cw_tokio::Context,
    identity: &Identity,
    members: &[SignedDescriptor],
    ledger: &LedgerParams,
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
    // Fixed for the node's life: the registry can grow up to max_registered_nodes. Each channel's
    // inbound mailbox is preallocated as this limit times the tracked peer sets times the burst.
    let limit = peer_limit(ledger);
    let mut cfg = lookup::Config::local(
        handshake,
        &namespace(genesis_hash),
        listen,
        limit,
        max_message_bytes.max(MAX_GOSSIP_MESSAGE as u32).max(archipel_consensus::liveness::MAX_HEARTBEAT_BYTES as u32),
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
    let members = MemberSet::new(oracle.clone(), identity.node_id(), limit, members);
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
        if let Ok(mut p2p) = start(&context, &identity, &genesis.nodes, &genesis.ledger, &genesis_hash, listen, true, 0)
        {
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

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_crypto::test_support::example_descriptor;

    /// A registered node `i` at its own loopback address (nothing listens there).
    fn member(i: u64) -> SignedDescriptor {
        let id = Identity::from_seed(i);
        let mut d = example_descriptor(&id);
        d.p2p_address = SocketAddr::from(([127, 0, 70, (i % 250) as u8 + 2], 20_000 + (i / 250) as u16));
        SignedDescriptor::sign(&id, d).unwrap()
    }

    #[derive(Default)]
    struct Recorder(Vec<(u64, usize)>);

    impl PeerTracker for Recorder {
        fn track_peers(&mut self, index: u64, peers: Map<archipel_crypto::Ed25519PublicKey, Address>) {
            self.0.push((index, peers.len()));
        }
    }

    #[test]
    fn the_peer_limit_follows_the_registry_limit_not_the_member_count() {
        let params = LedgerParams { max_registered_nodes: 100, ..LedgerParams::default() };
        assert_eq!(peer_limit(&params).get(), 100 + ADMITTED_PEERS + 1);
    }

    #[test]
    fn the_tracked_set_never_exceeds_the_limit_and_the_registry_comes_first() {
        let me = Identity::from_seed(0).node_id();
        let limit = NZUsize!(10);
        let registry: Vec<SignedDescriptor> = (0..8).map(member).collect();
        let mut set = MemberSet::new(Recorder::default(), me, limit, &registry);
        assert_eq!(set.tracker.0, vec![(0, 8)]);
        // Admitted nodes fill the room left, no further; the registry always stays.
        let mut all = registry.clone();
        all.extend((100..105).map(member));
        set.set(&all);
        assert_eq!(set.members().len(), 10);
        assert!(registry.iter().all(|d| set.members().contains_key(&d.descriptor.node_id)));
        set.add(&member(200));
        assert_eq!(set.members().len(), 10, "an admission beyond the limit is refused");
        // A node not (yet) in the set counts itself: room for one less.
        let mut joining = MemberSet::new(Recorder::default(), Identity::from_seed(999).node_id(), limit, &all);
        assert_eq!(joining.members().len(), 9);
        joining.set(&registry);
        assert_eq!(joining.members().len(), 8);
        assert!(set.tracker.0.iter().chain(&joining.tracker.0).all(|(_, n)| *n <= 10));
        let indices: Vec<u64> = set.tracker.0.iter().map(|(i, _)| *i).collect();
        assert!(indices.windows(2).all(|w| w[0] < w[1]), "indices increase: {indices:?}");
    }

    /// The devnet crash: 12 members, then 17 registrations made commonware's tracker panic with
    /// "peer set too large: 29 > 28" (the limit was members + 16). With the real oracle, the
    /// registry grows to its limit and admissions pile on, and nothing panics.
    #[test]
    fn registry_growth_never_panics_the_p2p_layer() {
        use commonware_runtime::Runner as _;
        let dir = tempfile::tempdir().unwrap();
        let runner =
            cw_tokio::Runner::new(cw_tokio::Config::new().with_worker_threads(1).with_storage_directory(dir.path()));
        runner.start(|context| async move {
            let params = LedgerParams { max_registered_nodes: 64, ..LedgerParams::default() };
            let me = Identity::from_seed(0);
            let genesis: Vec<SignedDescriptor> = (0..12).map(member).collect();
            let listen = SocketAddr::from(([127, 0, 70, 1], 0));
            let mut p2p = start(&context, &me, &genesis, &params, "test", listen, true, 0).unwrap();
            let mut registry = genesis.clone();
            for i in 12..64 {
                registry.push(member(i));
                p2p.members.set(&registry);
            }
            assert_eq!(p2p.members.members().len(), 64);
            let mut all = registry.clone();
            all.extend((1_000..1_100).map(member));
            p2p.members.set(&all);
            for i in 2_000..2_050 {
                p2p.members.add(&member(i));
            }
            assert_eq!(p2p.members.members().len(), peer_limit(&params).get());
        });
    }
}
