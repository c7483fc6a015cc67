//! Authenticated, encrypted node-to-node networking on `commonware-p2p` (`authenticated::lookup`).
//!
//! Every connection is a handshake between two Ed25519 keys; the allowed set is the genesis nodes
//! (their keys and p2p addresses), so a process whose key is not registered cannot connect and
//! receives nothing. The namespace includes the genesis hash: nodes of different networks never
//! talk, even with the same keys.

use crate::genesis::Genesis;
use crate::gossip::{GOSSIP_CHANNEL, MAX_GOSSIP_MESSAGE};
use archipel_crypto::Identity;
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

/// A started p2p network: the gossip channel and the oracle that manages the allowed peer set
/// (the ledger will update it as nodes register and leave; dropping it stops peer management).
#[allow(missing_debug_implementations)]
pub struct P2p {
    /// Sends on the gossip channel.
    pub sender: NodeSender,
    /// Receives from the gossip channel.
    pub receiver: NodeReceiver,
    /// Manages the tracked peer sets.
    pub oracle: lookup::Oracle<archipel_crypto::Ed25519PublicKey>,
}

/// The p2p namespace of a network: connections only form between nodes of the same genesis.
pub fn namespace(genesis_hash: &str) -> Vec<u8> {
    format!("archipel/p2p/v1/{genesis_hash}").into_bytes()
}

/// Starts the p2p network with the genesis nodes as the allowed set and returns the gossip
/// channel. `listen` is the local socket; peers are dialed at their genesis p2p addresses.
pub fn start(
    context: &cw_tokio::Context,
    identity: &Identity,
    genesis: &Genesis,
    genesis_hash: &str,
    listen: SocketAddr,
    allow_private_ips: bool,
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
    let peers = genesis.nodes.len() + 1;
    let mut cfg = lookup::Config::local(
        handshake,
        &namespace(genesis_hash),
        listen,
        NonZeroUsize::new(peers).unwrap_or(NZUsize!(1)),
        MAX_GOSSIP_MESSAGE as u32,
        NZUsize!(1_024),
    );
    cfg.allow_private_ips = allow_private_ips;
    // Reconnect quickly after a peer restarts: liveness is reported within seconds.
    cfg.dial_frequency = Duration::from_millis(200);
    cfg.peer_connection_cooldown = Duration::from_millis(500);
    cfg.ping_frequency = Duration::from_secs(1);
    cfg.block_duration = Duration::from_secs(60);

    let (mut network, mut oracle) = Network::new(context.child("p2p"), cfg);
    let entries: Vec<(archipel_crypto::Ed25519PublicKey, Address)> = genesis
        .nodes
        .iter()
        .filter_map(|n| {
            let pk = archipel_crypto::public_key(&n.descriptor.node_id).ok()?;
            let address = match n.descriptor.p2p_egress_ip {
                Some(ip) => {
                    Address::Asymmetric { ingress: n.descriptor.p2p_address.into(), egress: SocketAddr::new(ip, 0) }
                }
                None => Address::Symmetric(n.descriptor.p2p_address),
            };
            Some((pk, address))
        })
        .collect();
    let peers: Map<_, Address> = entries.try_into().map_err(|_| "duplicate keys in genesis".to_string())?;
    let _ = oracle.track(0, peers);
    let (sender, receiver) = network.register(GOSSIP_CHANNEL, Quota::per_second(NZU32!(1_000)));
    network.start();
    Ok(P2p { sender, receiver, oracle })
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
        if let Ok(mut p2p) = start(&context, &identity, &genesis, &genesis_hash, listen, true) {
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
