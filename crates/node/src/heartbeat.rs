//! The heartbeat worker: renews this node's liveness lease with a `Heartbeat` transaction every
//! `lease_ttl / 4`, keeping at most one heartbeat in flight.

use archipel_consensus::{Chain, TxStatus};
use archipel_crypto::Identity;
use archipel_ledger::{Hash, Payload, Transaction};
use commonware_runtime::Clock;
use commonware_utils::SystemTimeExt as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The heartbeat interval for a lease TTL: four chances per lease.
pub fn interval(lease_ttl_ms: u64) -> Duration {
    Duration::from_millis((lease_ttl_ms / 4).max(1))
}

/// Runs forever: submits a heartbeat locally and gossips it to the validators.
pub async fn run(clock: impl Clock, chain: Arc<Chain>, identity: Identity, gossip: mpsc::UnboundedSender<Vec<u8>>) {
    let me = identity.node_id();
    let every = interval(chain.with_state(|s| s.params().lease_ttl_ms));
    let mut in_flight: Option<Hash> = None;
    loop {
        clock.sleep(every).await;
        if in_flight.is_some_and(|h| chain.tx_status(&h) == TxStatus::Pending) {
            continue;
        }
        let (registered, nonce) = chain.with_state(|s| (s.nodes().contains_key(&me), s.account(&me).nonce));
        if !registered {
            continue;
        }
        let stx = Transaction { signer: me, nonce, payload: Payload::Heartbeat }.sign(&identity);
        let bytes = stx.to_bytes();
        match chain.submit(stx, bytes.len(), clock.current().epoch_millis()) {
            Ok(h) => {
                in_flight = Some(h);
                let _ = gossip.send(bytes);
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat not admitted"),
        }
    }
}
