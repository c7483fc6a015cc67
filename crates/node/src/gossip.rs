//! The membership actor: drives a [`PeerTable`] over a commonware p2p channel.
//!
//! Generic over the runtime (`tokio` in a node, `deterministic` in the simulator) and over the p2p
//! sender/receiver (`authenticated::lookup` in a node, `simulated` in the simulator). It reads the
//! clock from the runtime, decodes and bounds every inbound message, feeds the table, and performs
//! the table's effects. Observers see every effect (logs, metrics, simulation traces).

use crate::membership::{Effect, GossipMessage, PeerStatus, PeerTable};
use archipel_crypto::Ed25519PublicKey;
use archipel_types::NodeId;
use commonware_macros::select;
use commonware_p2p::{Receiver, Recipients, Sender};
use commonware_runtime::telemetry::metrics::{GaugeExt, MetricsExt};
use commonware_runtime::{Clock, IoBuf, Metrics};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// The p2p channel carrying membership gossip.
pub const GOSSIP_CHANNEL: u64 = 0;
/// Largest gossip message accepted or sent, in bytes.
pub const MAX_GOSSIP_MESSAGE: usize = 512 * 1024;

/// A shared handle to the peer table (the API reads it; the actor writes it).
pub type SharedPeerTable = Arc<Mutex<PeerTable>>;

/// Sees every effect the table produces, with the time it happened.
pub trait GossipObserver: Send + 'static {
    /// Called for each effect, before it is performed.
    fn on_effect(&mut self, now_ms: u64, effect: &Effect);
}

/// Logs status changes and rejections with `tracing`.
#[derive(Debug, Default)]
pub struct LogObserver;

impl GossipObserver for LogObserver {
    fn on_effect(&mut self, _now_ms: u64, effect: &Effect) {
        match effect {
            Effect::StatusChanged { node, status: PeerStatus::Up } => tracing::info!(peer = %node.short(), "peer up"),
            Effect::StatusChanged { node, status: PeerStatus::Down } => {
                tracing::warn!(peer = %node.short(), "peer down")
            }
            Effect::Rejected { from, reason } => tracing::warn!(peer = %from.short(), %reason, "gossip rejected"),
            _ => {}
        }
    }
}

/// Milliseconds since the Unix epoch according to the runtime's clock.
pub fn now_ms(clock: &impl Clock) -> u64 {
    clock.current().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Converts a commonware public key to a node id.
pub fn node_id_of(pk: &Ed25519PublicKey) -> NodeId {
    let mut out = [0u8; 32];
    out.copy_from_slice(pk.as_ref());
    NodeId(out)
}

/// Locks the table; a panic elsewhere while holding the lock leaves a still-consistent table
/// (every mutation is a single step), so poisoning is ignored.
pub fn lock_table(table: &SharedPeerTable) -> std::sync::MutexGuard<'_, PeerTable> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the membership protocol until the network closes.
pub async fn run<E, S, R, O>(context: E, table: SharedPeerTable, mut sender: S, mut receiver: R, mut observer: O)
where
    E: Clock + Metrics,
    S: Sender<PublicKey = Ed25519PublicKey>,
    R: Receiver<PublicKey = Ed25519PublicKey>,
    O: GossipObserver,
{
    let messages_in = context.counter("messages_in", "gossip messages received");
    let messages_out = context.counter("messages_out", "gossip messages sent (per recipient)");
    let rejected = context.counter("messages_rejected", "gossip messages or descriptors refused");
    let peers_up = context.gauge("peers_connected", "peers heard from within the liveness window");

    let mut perform = |now: u64, effects: Vec<Effect>, sender: &mut S| {
        for effect in effects {
            observer.on_effect(now, &effect);
            let (to, msg) = match effect {
                Effect::Broadcast(m) => (Recipients::All, m),
                Effect::SendTo(id, m) => match archipel_crypto::public_key(&id) {
                    Ok(pk) => (Recipients::One(pk), m),
                    Err(_) => continue,
                },
                Effect::Rejected { .. } => {
                    rejected.inc();
                    continue;
                }
                Effect::StatusChanged { .. } | Effect::Admitted(_) => continue,
            };
            let bytes = msg.encode();
            if bytes.len() > MAX_GOSSIP_MESSAGE {
                tracing::error!(len = bytes.len(), "gossip message too large to send; table too big");
                continue;
            }
            let sent = sender.send(to, IoBuf::from(bytes), false);
            messages_out.inc_by(sent.len() as u64);
        }
    };

    loop {
        let now = now_ms(&context);
        let (effects, next) = {
            let mut t = lock_table(&table);
            let fx = t.tick(now);
            let _ = peers_up.try_set(t.peers_up());
            (fx, t.next_tick_ms())
        };
        perform(now, effects, &mut sender);
        let deadline = UNIX_EPOCH + Duration::from_millis(next);
        select! {
            _ = context.sleep_until(deadline) => {},
            msg = receiver.recv() => {
                let Ok((pk, buf)) = msg else {
                    tracing::info!("p2p network closed; membership stops");
                    return;
                };
                messages_in.inc();
                let from = node_id_of(&pk);
                let now = now_ms(&context);
                let effects = match GossipMessage::decode(buf.as_ref(), MAX_GOSSIP_MESSAGE) {
                    Ok(m) => {
                        let mut t = lock_table(&table);
                        let fx = t.on_message(from, m, now);
                        let _ = peers_up.try_set(t.peers_up());
                        fx
                    }
                    Err(reason) => vec![Effect::Rejected { from, reason }],
                };
                perform(now, effects, &mut sender);
            },
        }
    }
}
