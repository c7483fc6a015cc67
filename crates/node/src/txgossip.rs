//! Transaction gossip: a transaction submitted to any node reaches every validator (the leader
//! rotates every view), batched so a burst costs a few messages, not one per transaction.

use crate::p2p::{NodeReceiver, NodeSender};
use archipel_consensus::Chain;
use archipel_ledger::SignedTransaction;
use archipel_ledger::export::{put_record, take_record};
use commonware_p2p::{Receiver as _, Recipients, Sender as _};
use commonware_runtime::IoBuf;
use std::sync::Arc;
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

/// Admits gossiped transactions into the local mempool, a message at a time (one signature
/// batch; see [`admit`] for where it is checked).
pub async fn receive_loop(mut receiver: NodeReceiver, chain: Arc<Chain>, max_tx_bytes: usize) {
    while let Ok((from, message)) = receiver.recv().await {
        let batch = decode_batch(message.as_ref(), max_tx_bytes);
        tracing::trace!(peer = ?from, txs = batch.len(), "transaction batch received");
        if batch.is_empty() {
            continue;
        }
        let Some(results) = admit(&chain, batch).await else { return };
        tracing::debug!(txs = results.len(), "gossiped transactions checked");
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
