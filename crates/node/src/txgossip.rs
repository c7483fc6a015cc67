//! Transaction gossip: a transaction submitted to any node reaches every validator (the leader
//! rotates every view), batched so a burst costs a few messages, not one per transaction.

use crate::p2p::{NodeReceiver, NodeSender};
use archipel_consensus::Chain;
use archipel_crypto::Ed25519PublicKey as PublicKey;
use archipel_ledger::export::{put_record, take_record};
use archipel_ledger::{Hash, MempoolError, SignedTransaction, TxError};
use commonware_p2p::{Receiver as _, Recipients, Sender as _};
use commonware_runtime::IoBuf;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Largest batch sent in one message.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Sends queued transactions (encoded) to the validators.
pub async fn send_loop(
    mut sender: NodeSender,
    validators: Vec<archipel_crypto::Ed25519PublicKey>,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    if validators.is_empty() {
        return;
    }
    while let Some(first) = queue.recv().await {
        let mut batch = Vec::with_capacity(first.len() + 4);
        put_record(&mut batch, &first);
        while batch.len() < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(tx) => put_record(&mut batch, &tx),
                Err(_) => break,
            }
        }
        let _ = sender.send(Recipients::Some(validators.clone()), IoBuf::from(batch), false);
    }
}

/// On a follower: every `every`, sends what still waits in the mempool to the validators again
/// (a transaction gossiped while connections were still forming would otherwise wait forever).
pub async fn resend_loop(
    clock: impl commonware_runtime::Clock,
    chain: Arc<Chain>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    every: std::time::Duration,
) {
    loop {
        clock.sleep(every).await;
        for stx in chain.mempool_snapshot(1_000) {
            if out.send(stx.to_bytes()).is_err() {
                return;
            }
        }
    }
}

/// How long gossip from a peer that sent a transaction with a bad signature is dropped unread.
/// Honest nodes gossip only transactions they admitted, so their signatures were checked against
/// the same network: a bad one means a faulty or hostile peer, and each of its batches would
/// cost one-by-one signature checks (a batch check fails as a whole).
pub const IGNORE_BAD_PEER_FOR: Duration = Duration::from_secs(600);

/// Peers whose gossip is dropped, and until when. Bounded by the peers that can connect (the
/// registry's members).
#[derive(Debug, Default)]
pub struct Ignored(HashMap<PublicKey, Instant>);

impl Ignored {
    /// Whether gossip from `peer` is read at `now` (forgets sentences served).
    pub fn listens_to(&mut self, peer: &PublicKey, now: Instant) -> bool {
        self.0.retain(|_, until| *until > now);
        !self.0.contains_key(peer)
    }

    /// Ignores `peer` for [`IGNORE_BAD_PEER_FOR`] from `now` if one of its transactions had a bad
    /// signature; says whether it did.
    pub fn judge(&mut self, peer: &PublicKey, results: &[Result<Hash, MempoolError>], now: Instant) -> bool {
        let forged = results.iter().any(|r| matches!(r, Err(MempoolError::Invalid(TxError::BadSignature(_)))));
        if forged {
            self.0.insert(peer.clone(), now + IGNORE_BAD_PEER_FOR);
        }
        forged
    }
}

/// Admits gossiped transactions into the local mempool, a message at a time (one signature
/// batch; see [`admit`] for where it is checked). A peer that sends a bad signature is ignored
/// for [`IGNORE_BAD_PEER_FOR`].
pub async fn receive_loop(mut receiver: NodeReceiver, chain: Arc<Chain>, max_tx_bytes: usize) {
    let mut ignored = Ignored::default();
    while let Ok((from, message)) = receiver.recv().await {
        if !ignored.listens_to(&from, Instant::now()) {
            continue;
        }
        let batch = decode_batch(message.as_ref(), max_tx_bytes);
        tracing::trace!(peer = ?from, txs = batch.len(), "transaction batch received");
        if batch.is_empty() {
            continue;
        }
        let Some(results) = admit(&chain, batch).await else { return };
        tracing::debug!(txs = results.len(), "gossiped transactions checked");
        if ignored.judge(&from, &results, Instant::now()) {
            tracing::warn!(
                peer = ?from,
                for_s = IGNORE_BAD_PEER_FOR.as_secs(),
                "a peer gossiped a transaction with a bad signature: its gossip is ignored"
            );
        }
        for e in results.into_iter().filter_map(Result::err) {
            tracing::trace!(error = %e, "gossiped transaction not admitted");
        }
    }
}

/// Splits a batch received from a peer into its transactions, each with its encoded size. A
/// malformed record ends the batch (the framing is lost); a record that is not a transaction is
/// skipped.
pub fn decode_batch(bytes: &[u8], max_tx_bytes: usize) -> Vec<(SignedTransaction, usize)> {
    let mut at = 0;
    let mut batch = Vec::new();
    while at < bytes.len() {
        let Ok(tx) = take_record(bytes, &mut at, max_tx_bytes) else {
            tracing::debug!("malformed transaction batch");
            break;
        };
        match SignedTransaction::from_bytes(tx, max_tx_bytes) {
            Ok(stx) => batch.push((stx, tx.len())),
            Err(e) => tracing::debug!(error = %e, "malformed gossiped transaction"),
        }
    }
    batch
}

/// Below this many transactions a batch is checked in place: handing it to a blocking thread
/// costs more than checking it.
const INLINE_BATCH: usize = 16;

/// Admits `batch` into the mempool; larger batches are checked on a blocking thread, off the
/// async workers that also run consensus. `None` if the runtime is shutting down. The node runs
/// on the tokio runtime, whose clock is the system clock: mempool entries expire by it.
pub async fn admit(
    chain: &Arc<Chain>,
    batch: Vec<(SignedTransaction, usize)>,
) -> Option<Vec<Result<archipel_ledger::Hash, archipel_ledger::MempoolError>>> {
    let now_ms = archipel_consensus::app::system_now_ms();
    if batch.len() < INLINE_BATCH {
        return Some(chain.submit_many(batch, now_ms));
    }
    let chain = chain.clone();
    tokio::task::spawn_blocking(move || chain.submit_many(batch, now_ms)).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_crypto::Identity;
    use archipel_ledger::{Payload, Transaction};

    #[test]
    fn a_peer_that_gossips_a_forged_signature_is_ignored_for_a_while() {
        let key = |seed| archipel_crypto::public_key(&Identity::from_seed(seed).node_id()).unwrap();
        let (peer, other) = (key(1), key(2));
        let t0 = Instant::now();
        let mut ignored = Ignored::default();
        let refused = |e: TxError| vec![Ok(Hash::ZERO), Err(MempoolError::Invalid(e))];
        // Refusals an honest peer can cause (a race, a spent balance) change nothing.
        assert!(!ignored.judge(&peer, &refused(TxError::BadNonce { expected: 1, got: 0 }), t0));
        assert!(ignored.listens_to(&peer, t0));
        assert!(ignored.judge(&peer, &refused(TxError::BadSignature("x".into())), t0));
        assert!(!ignored.listens_to(&peer, t0 + Duration::from_secs(1)));
        assert!(ignored.listens_to(&other, t0 + Duration::from_secs(1)), "only that peer");
        assert!(ignored.listens_to(&peer, t0 + IGNORE_BAD_PEER_FOR + Duration::from_millis(1)), "not for ever");
        assert!(ignored.0.is_empty(), "served sentences are forgotten");
        // A forged transaction is refused as such by the chain's admission (what `judge` reads).
        let a = Identity::from_seed(3);
        let mut stx = Transaction { signer: a.node_id(), nonce: 0, payload: Payload::LeaveNode { node: a.node_id() } }
            .sign(&a, &Hash::ZERO);
        stx.signature[0] ^= 1;
        assert!(matches!(stx.verify(&Hash::ZERO), Err(TxError::BadSignature(_))));
    }
}
