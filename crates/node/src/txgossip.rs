//! Transaction gossip: a transaction submitted to any node reaches every validator (the leader
//! rotates every view), batched so a burst costs a few messages, not one per transaction.

use crate::p2p::NodeSender;
use archipel_consensus::Chain;
use archipel_crypto::Ed25519PublicKey as PublicKey;
use archipel_ledger::export::{put_record, take_record};
use archipel_ledger::{Hash, MempoolError, SignedTransaction, TxError};
use commonware_p2p::{Recipients, Sender as _};
use commonware_runtime::IoBuf;
use commonware_runtime::telemetry::metrics::MetricsExt as _;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
        match self.0.get(peer) {
            Some(until) if *until > now => false,
            Some(_) => {
                self.0.remove(peer);
                true
            }
            None => true,
        }
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

/// Most transactions waiting from one peer. Beyond, its batches are dropped (and counted): a
/// follower sends what still waits in its mempool again every 2 s, and a validator keeps what it
/// gossiped in its own mempool, so an honest peer loses nothing for long. About 3 s of the
/// ledger's measured throughput (~5,000 transactions/s).
pub const MAX_WAITING_PER_PEER: usize = 16_384;
/// Most encoded bytes waiting from one peer (held decoded, before any signature check): 16,384
/// transfers of ~200 bytes fit, not 16,384 transactions of the largest size (8 KiB by default).
pub const MAX_WAITING_BYTES_PER_PEER: usize = 4 * 1024 * 1024;
/// Most encoded bytes waiting from all peers together: beyond, lines fuller than the pushing
/// peer's would be lose their newest batches, or else the pushed batch is dropped (with 10,000
/// peers, the per-peer bound alone would allow 40 GB).
pub const MAX_WAITING_BYTES: usize = 64 * 1024 * 1024;
/// Most transactions of one peer checked in one go: its waiting batches are merged into one
/// signature batch, up to this many.
pub const MAX_TAKE: usize = 4_096;
/// Each transaction this node refused (for a reason of the transaction's own, see
/// [`MempoolError::refusals`]) counts this many times in its peer's use, so a peer whose gossip is mostly
/// refused waits behind the others.
pub const REFUSED_WEIGHT: u64 = 8;
/// Refusals a peer may have had lately (halved every [`DECAY`]) and still be read: above, its
/// gossip waits until the count decays below. So one peer's validly signed junk (variants of one
/// nonce, spends its balance cannot cover) costs this node at most about this many checks a
/// second, on the one thread gossip is admitted on, whatever the peer sends.
pub const PEER_REFUSALS: u64 = 2_048;
/// How often every peer's use and refusals are halved.
pub const DECAY: Duration = Duration::from_secs(1);

/// Gossiped transactions from each peer, waiting to be admitted, and whose turn is next.
///
/// Why: batches used to be admitted one message at a time in arrival order, so one peer sending
/// batch after batch of validly signed transactions this node refuses kept the loop busy and
/// honest peers' transactions waited behind them, however long. Here each peer has its own line
/// (bounded, [`MAX_WAITING_PER_PEER`], [`MAX_WAITING_BYTES_PER_PEER`], and all together
/// [`MAX_WAITING_BYTES`]); the peer that used least lately goes first, refused
/// transactions count [`REFUSED_WEIGHT`] times, and a peer with more than [`PEER_REFUSALS`]
/// refusals lately waits for them to decay. Peers are registered nodes (a deposit each), and a
/// peer that sends a bad signature is not read at all for a while ([`Ignored`]). Memory is bounded
/// by the peers that can connect.
#[derive(Debug, Default)]
pub struct Intake {
    peers: HashMap<PublicKey, Line>,
    /// Encoded bytes waiting in all lines.
    bytes: usize,
    ignored: Ignored,
    arrivals: u64,
    decayed_at: Option<Instant>,
}

/// Decoded transactions of a gossip message, each with its encoded size.
type Batch = Vec<(SignedTransaction, usize)>;

/// One peer's waiting batches and recent history.
#[derive(Debug, Default)]
struct Line {
    /// Batches with their arrival numbers and encoded bytes.
    waiting: VecDeque<(u64, usize, Batch)>,
    /// Transactions in `waiting`, and their encoded bytes.
    txs: usize,
    bytes: usize,
    /// Transactions checked lately, refused ones [`REFUSED_WEIGHT`] times (decayed).
    used: u64,
    /// Transactions refused lately (decayed).
    refused: u64,
}

/// What the admitting loop does next.
#[derive(Debug)]
pub enum Turn {
    /// Admit this peer's transactions (one or more of its batches, merged).
    Admit(PublicKey, Vec<(SignedTransaction, usize)>),
    /// Every waiting peer had too many refusals lately: wait until the next decay.
    WaitUntil(Instant),
    /// Nothing waits.
    Idle,
}

impl Intake {
    /// Whether a message of `len` bytes from `peer` at `now` may be queued at all (it is read,
    /// and its line has room for it): checked before the message is decoded.
    pub fn accepts(&mut self, peer: &PublicKey, len: usize, now: Instant) -> bool {
        self.ignored.listens_to(peer, now)
            && self.peers.get(peer).is_none_or(|l| {
                l.txs < MAX_WAITING_PER_PEER && l.bytes.saturating_add(len) <= MAX_WAITING_BYTES_PER_PEER
            })
    }

    /// Queues `batch` from `peer`, received at `now`; the number of transactions dropped: the
    /// whole batch when the peer is ignored or its line is full; when all lines together are
    /// full, the newest batches of lines fuller than this one would be, or else this batch.
    pub fn push(&mut self, peer: &PublicKey, batch: Vec<(SignedTransaction, usize)>, now: Instant) -> usize {
        if !self.ignored.listens_to(peer, now) {
            return batch.len();
        }
        let bytes: usize = batch.iter().map(|(_, len)| *len).sum();
        let own = self.peers.get(peer).map_or(0, |l| l.bytes);
        if self.peers.get(peer).is_some_and(|l| l.txs.saturating_add(batch.len()) > MAX_WAITING_PER_PEER)
            || own.saturating_add(bytes) > MAX_WAITING_BYTES_PER_PEER
        {
            return batch.len();
        }
        // All lines full: room is made in lines fuller than this one would be, the fullest
        // first, newest batches first; if none is, this batch is dropped.
        let mut dropped = 0;
        let after = own + bytes;
        while self.bytes + bytes > MAX_WAITING_BYTES {
            let Some(victim) = self
                .peers
                .iter_mut()
                .filter(|(p, l)| *p != peer && l.bytes > after)
                .max_by_key(|(_, l)| l.bytes)
                .map(|(_, l)| l)
            else {
                return dropped + batch.len();
            };
            while self.bytes + bytes > MAX_WAITING_BYTES && victim.bytes > after {
                let Some((_, freed, newest)) = victim.waiting.pop_back() else { break };
                victim.txs -= newest.len();
                victim.bytes -= freed;
                self.bytes -= freed;
                dropped += newest.len();
            }
        }
        let line = self.peers.entry(peer.clone()).or_default();
        line.txs += batch.len();
        line.bytes += bytes;
        line.waiting.push_back((self.arrivals, bytes, batch));
        self.arrivals += 1;
        self.bytes += bytes;
        dropped
    }

    /// The next turn at `now`: the waiting peer with the least use lately (the earlier batch on a
    /// tie), among those with at most [`PEER_REFUSALS`] refusals lately.
    pub fn next(&mut self, now: Instant) -> Turn {
        self.decay(now);
        let pick = self
            .peers
            .iter()
            .filter(|(_, l)| l.refused <= PEER_REFUSALS)
            .filter_map(|(p, l)| Some((p, l.used, l.waiting.front()?.0)))
            .min_by_key(|&(_, used, arrival)| (used, arrival))
            .map(|(p, ..)| p.clone());
        let Some(peer) = pick else {
            return match (self.peers.values().any(|l| l.txs > 0), self.decayed_at) {
                (true, Some(at)) => Turn::WaitUntil(at + DECAY),
                _ => Turn::Idle,
            };
        };
        let Some(line) = self.peers.get_mut(&peer) else { return Turn::Idle };
        let mut taken = Vec::new();
        while let Some((_, _, batch)) = line.waiting.front() {
            if !taken.is_empty() && taken.len() + batch.len() > MAX_TAKE {
                break;
            }
            let Some((_, bytes, batch)) = line.waiting.pop_front() else { break };
            line.txs -= batch.len();
            line.bytes -= bytes;
            self.bytes -= bytes;
            taken.extend(batch);
        }
        Turn::Admit(peer, taken)
    }

    /// Records the answers to `peer`'s admitted transactions at `now`: charges its use and
    /// refusals, and stops reading it (dropping what waits) if it sent a bad signature. True
    /// when it is ignored from now on.
    pub fn done(&mut self, peer: &PublicKey, results: &[Result<Hash, MempoolError>], now: Instant) -> bool {
        let refused = MempoolError::refusals(results) as u64;
        let line = self.peers.entry(peer.clone()).or_default();
        line.used = line.used.saturating_add(results.len() as u64).saturating_add(refused * (REFUSED_WEIGHT - 1));
        line.refused = line.refused.saturating_add(refused);
        let forged = self.ignored.judge(peer, results, now);
        if forged && let Some(line) = self.peers.get_mut(peer) {
            self.bytes -= line.bytes;
            line.waiting.clear();
            line.txs = 0;
            line.bytes = 0;
        }
        forged
    }

    /// Transactions waiting from all peers.
    pub fn waiting(&self) -> usize {
        self.peers.values().map(|l| l.txs).sum()
    }

    /// Halves every peer's use and refusals once per [`DECAY`] passed; forgets peers with nothing
    /// left.
    fn decay(&mut self, now: Instant) {
        let decayed_at = *self.decayed_at.get_or_insert(now);
        let periods = now.saturating_duration_since(decayed_at).as_nanos() / DECAY.as_nanos();
        if periods == 0 {
            return;
        }
        self.decayed_at = Some(decayed_at + DECAY * periods.min(u32::MAX as u128) as u32);
        let shift = periods.min(63) as u32;
        self.peers.retain(|_, l| {
            l.used >>= shift;
            l.refused >>= shift;
            l.used > 0 || l.refused > 0 || l.txs > 0
        });
        self.ignored.0.retain(|_, until| *until > now);
    }
}

/// Admits gossiped transactions into the local mempool, peer by peer in [`Intake`]'s order: one
/// task reads every message at once into its peer's line, another admits them (one signature
/// batch per turn; see [`admit`] for where it is checked). A peer that sends a bad signature is
/// ignored for [`IGNORE_BAD_PEER_FOR`]. Counts what it drops in the metric `dropped_txs`.
pub async fn receive_loop<E, R>(context: E, mut receiver: R, chain: Arc<Chain>, max_tx_bytes: usize)
where
    E: commonware_runtime::Spawner + commonware_runtime::Clock + commonware_runtime::Metrics,
    R: commonware_p2p::Receiver<PublicKey = PublicKey>,
{
    let dropped =
        context.counter("dropped_txs", "gossiped transactions dropped: their peer's line or all lines were full");
    let dropped_messages = context
        .counter("dropped_messages", "gossip messages dropped unread: their peer is ignored or its line is full");
    let intake = Arc::new(std::sync::Mutex::new(Intake::default()));
    let wake = Arc::new(tokio::sync::Notify::new());
    let closed = Arc::new(AtomicBool::new(false));
    {
        let (intake, wake, closed) = (intake.clone(), wake.clone(), closed.clone());
        context.child("reader").spawn(move |_| async move {
            let lock = || intake.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            while let Ok((from, message)) = receiver.recv().await {
                // Not decoded when it would be dropped anyway (an ignored peer, a full line).
                if !lock().accepts(&from, message.len(), Instant::now()) {
                    dropped_messages.inc();
                    continue;
                }
                let batch = decode_batch(message.as_ref(), max_tx_bytes);
                tracing::trace!(peer = ?from, txs = batch.len(), "transaction batch received");
                if batch.is_empty() {
                    continue;
                }
                let lost = lock().push(&from, batch, Instant::now());
                if lost > 0 {
                    dropped.inc_by(lost as u64);
                    tracing::debug!(peer = ?from, txs = lost, "gossiped transactions dropped: a line is full");
                }
                // Even for a held peer: only the admitting loop's turns decay its refusals. (A
                // held peer's wake-ups are bounded by its line, which stops being decoded when full.)
                wake.notify_one();
            }
            // The channel closed: the node is stopping. Wakes the admitting loop to end too.
            closed.store(true, Ordering::Relaxed);
            wake.notify_one();
        });
    }
    loop {
        if closed.load(Ordering::Relaxed) {
            return;
        }
        let turn = intake.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next(Instant::now());
        match turn {
            Turn::Idle => wake.notified().await,
            Turn::WaitUntil(at) => {
                let sleep = context.sleep(at.saturating_duration_since(Instant::now()));
                tokio::select! {
                    () = wake.notified() => {}
                    () = sleep => {}
                }
            }
            Turn::Admit(peer, batch) => {
                let Some(results) = admit(&chain, batch).await else { return };
                tracing::debug!(txs = results.len(), "gossiped transactions checked");
                let forged = intake.lock().unwrap_or_else(std::sync::PoisonError::into_inner).done(
                    &peer,
                    &results,
                    Instant::now(),
                );
                if forged {
                    tracing::warn!(
                        peer = ?peer,
                        for_s = IGNORE_BAD_PEER_FOR.as_secs(),
                        "a peer gossiped a transaction with a bad signature: its gossip is ignored"
                    );
                }
                for e in results.into_iter().filter_map(Result::err) {
                    tracing::trace!(error = %e, "gossiped transaction not admitted");
                }
            }
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

    fn peer(seed: u64) -> PublicKey {
        archipel_crypto::public_key(&Identity::from_seed(seed).node_id()).unwrap()
    }

    /// `n` copies of one signed transaction, with their sizes (the intake never looks inside).
    fn batch(n: usize) -> Vec<(SignedTransaction, usize)> {
        let a = Identity::from_seed(9);
        let stx = Transaction { signer: a.node_id(), nonce: 0, payload: Payload::LeaveNode { node: a.node_id() } }
            .sign(&a, &Hash::ZERO);
        vec![(stx, 100); n]
    }

    /// Answers for `n` transactions, `refused` of them refused for their own fault.
    fn answers(n: usize, refused: usize) -> Vec<Result<Hash, MempoolError>> {
        (0..n)
            .map(|i| {
                if i < refused {
                    Err(MempoolError::NonceTaken { signer: "x".into(), nonce: 0 })
                } else {
                    Ok(Hash::ZERO)
                }
            })
            .collect()
    }

    fn admitted(turn: Turn) -> (PublicKey, usize) {
        match turn {
            Turn::Admit(p, b) => (p, b.len()),
            other => panic!("expected a turn to admit, got {other:?}"),
        }
    }

    #[test]
    fn a_peer_whose_gossip_is_refused_waits_behind_the_others() {
        let (spammer, honest) = (peer(1), peer(2));
        let t0 = Instant::now();
        let mut intake = Intake::default();
        for _ in 0..3 {
            assert_eq!(intake.push(&spammer, batch(MAX_TAKE), t0), 0);
        }
        // Nothing else waits: the spammer's first batch goes, and is refused.
        assert_eq!(admitted(intake.next(t0)), (spammer.clone(), MAX_TAKE));
        assert!(!intake.done(&spammer, &answers(MAX_TAKE, MAX_TAKE / 4), t0));
        // An honest batch that came after its two others goes first.
        assert_eq!(intake.push(&honest, batch(5), t0), 0);
        assert_eq!(admitted(intake.next(t0)), (honest.clone(), 5));
        intake.done(&honest, &answers(5, 0), t0);
        assert_eq!(admitted(intake.next(t0)), (spammer.clone(), MAX_TAKE));
        // Only the refusals' weight puts a peer that sent fewer transactions behind: the honest
        // peer had 4,096 admitted (use 4,096), the spammer 1,024 refused (use 8,192; 1,024 if
        // refusals weighed like the others).
        let mut intake = Intake::default();
        intake.push(&honest, batch(MAX_TAKE), t0);
        assert_eq!(admitted(intake.next(t0)), (honest.clone(), MAX_TAKE));
        intake.done(&honest, &answers(MAX_TAKE, 0), t0);
        intake.push(&spammer, batch(1_024), t0);
        assert_eq!(admitted(intake.next(t0)), (spammer.clone(), 1_024));
        intake.done(&spammer, &answers(1_024, 1_024), t0);
        intake.push(&spammer, batch(5), t0);
        intake.push(&honest, batch(5), t0);
        assert_eq!(admitted(intake.next(t0)), (honest, 5), "the spammer's batch came first, but its refusals weigh");
    }

    #[test]
    fn a_peer_refused_all_the_time_gets_about_its_budget_checked_a_second() {
        // A peer whose line is always full and whose every transaction is refused, with a turn
        // every millisecond for 10 s: about the budget a second is checked, plus one turn.
        let spammer = peer(1);
        let t0 = Instant::now();
        let mut intake = Intake::default();
        let mut checked = 0u64;
        for ms in 0..10_000u64 {
            let now = t0 + Duration::from_millis(ms);
            while intake.accepts(&spammer, 512 * 100, now) {
                intake.push(&spammer, batch(512), now);
            }
            if let Turn::Admit(_, b) = intake.next(now) {
                checked += b.len() as u64;
                intake.done(&spammer, &answers(b.len(), b.len()), now);
            }
        }
        assert!(checked <= 10 * PEER_REFUSALS + MAX_TAKE as u64, "{checked} checked in 10 s");
        assert!(checked >= 5 * PEER_REFUSALS, "{checked} checked in 10 s: it is not shut out either");
    }

    #[test]
    fn lines_are_bounded_in_bytes_each_and_all_together() {
        let t0 = Instant::now();
        let sized = |n: usize, len: usize| batch(n).into_iter().map(|(t, _)| (t, len)).collect::<Vec<_>>();
        // One peer: 512 transactions of 8 KiB fill its 4 MiB.
        let mut intake = Intake::default();
        assert_eq!(intake.push(&peer(1), sized(512, 8 * 1024), t0), 0);
        assert!(!intake.accepts(&peer(1), 1, t0), "full: the next message is not even decoded");
        assert_eq!(intake.push(&peer(1), sized(1, 8 * 1024), t0), 1);
        assert!(intake.accepts(&peer(2), 512 * 1024, t0));
        // All peers: 16 peers of 4 MiB fill 64 MiB; the 17th's batch pushes the fullest peer's
        // newest batch out (a tie goes to any of them, never to the newcomer's only batch).
        let mut intake = Intake::default();
        for p in 0..16 {
            assert_eq!(intake.push(&peer(10 + p), sized(256, 8 * 1024), t0), 0);
            assert_eq!(intake.push(&peer(10 + p), sized(256, 8 * 1024), t0), 0);
        }
        assert_eq!(intake.bytes, MAX_WAITING_BYTES);
        assert_eq!(intake.push(&peer(99), sized(1, 1_000), t0), 256, "one of the fullest lost its newest batch");
        assert!(intake.bytes <= MAX_WAITING_BYTES);
        assert_eq!(intake.peers[&peer(99)].txs, 1, "the newcomer kept its batch");
        // A batch that would make its line the fullest is the one dropped.
        let before = intake.bytes;
        assert_eq!(intake.push(&peer(98), sized(512, 8 * 1024), t0), 512);
        assert_eq!(intake.bytes, before, "nothing else was dropped for it");
        // Taking from a line gives the room back.
        let mut turns = 0;
        while let Turn::Admit(p, b) = intake.next(t0) {
            intake.done(&p, &answers(b.len(), 0), t0);
            turns += 1;
        }
        assert!(turns >= 17);
        assert_eq!((intake.bytes, intake.waiting()), (0, 0));
    }

    #[test]
    fn congestion_is_not_counted_against_a_peer() {
        let congested = vec![
            Err(MempoolError::Full(10)),
            Err(MempoolError::AccountQuota { signer: "x".into(), waiting: 256 }),
            Err(MempoolError::GappedFull { signer: "x".into(), missing: 3, gapped: 5 }),
            Ok(Hash::ZERO),
        ];
        assert_eq!(MempoolError::refusals(&congested), 0);
        assert_eq!(MempoolError::refusals(&answers(10, 3)), 3);
        let bad_nonce = vec![Err(MempoolError::Invalid(TxError::BadNonce { expected: 1, got: 0 }))];
        assert_eq!(MempoolError::refusals(&bad_nonce), 1);
    }

    #[test]
    fn a_peer_over_its_refusals_waits_for_them_to_decay() {
        let (spammer, honest) = (peer(1), peer(2));
        let t0 = Instant::now();
        let mut intake = Intake::default();
        intake.push(&spammer, batch(MAX_TAKE), t0);
        intake.push(&spammer, batch(10), t0);
        assert_eq!(admitted(intake.next(t0)), (spammer.clone(), MAX_TAKE));
        // Everything refused: 4,096 refusals, twice the budget.
        intake.done(&spammer, &answers(MAX_TAKE, MAX_TAKE), t0);
        let wait = t0 + Duration::from_millis(300);
        match intake.next(wait) {
            Turn::WaitUntil(at) => assert_eq!(at, t0 + DECAY, "until the next halving"),
            other => panic!("the spammer must wait, got {other:?}"),
        }
        // Another peer is not held back meanwhile.
        intake.push(&honest, batch(3), wait);
        assert_eq!(admitted(intake.next(wait)), (honest, 3));
        // One halving brings the spammer to its budget: read again.
        assert!(matches!(intake.next(t0 + DECAY - Duration::from_millis(1)), Turn::WaitUntil(_)));
        assert_eq!(admitted(intake.next(t0 + DECAY)), (spammer, 10));
        assert!(matches!(intake.next(t0 + DECAY), Turn::Idle));
    }

    #[test]
    fn a_peers_line_is_bounded_and_merged_in_turns() {
        let (flooder, other) = (peer(1), peer(2));
        let t0 = Instant::now();
        let mut intake = Intake::default();
        for _ in 0..MAX_WAITING_PER_PEER / 1_024 {
            assert_eq!(intake.push(&flooder, batch(1_024), t0), 0);
        }
        assert_eq!(intake.push(&flooder, batch(7), t0), 7, "a full line drops the batch");
        assert_eq!(intake.push(&other, batch(7), t0), 0, "another peer's line is its own");
        assert_eq!(intake.waiting(), MAX_WAITING_PER_PEER + 7);
        // Batches are merged up to MAX_TAKE per turn.
        assert_eq!(admitted(intake.next(t0)), (flooder.clone(), MAX_TAKE));
        intake.done(&flooder, &answers(MAX_TAKE, 0), t0);
        assert_eq!(admitted(intake.next(t0)), (other.clone(), 7));
        intake.done(&other, &answers(7, 0), t0);
        // A single batch larger than MAX_TAKE still goes whole.
        let mut big = Intake::default();
        big.push(&other, batch(MAX_TAKE + 1), t0);
        assert_eq!(admitted(big.next(t0)), (other, MAX_TAKE + 1));
    }

    #[test]
    fn a_peer_that_sent_a_forged_signature_loses_its_line() {
        let (forger, honest) = (peer(1), peer(2));
        let t0 = Instant::now();
        let mut intake = Intake::default();
        intake.push(&forger, batch(4), t0);
        intake.push(&forger, batch(MAX_TAKE), t0);
        assert_eq!(admitted(intake.next(t0)), (forger.clone(), 4));
        let forged = vec![Ok(Hash::ZERO), Err(MempoolError::Invalid(TxError::BadSignature("x".into())))];
        assert!(intake.done(&forger, &forged, t0));
        assert_eq!(intake.waiting(), 0, "what it had queued is dropped");
        assert_eq!(intake.push(&forger, batch(2), t0 + Duration::from_secs(1)), 2, "and new gossip is not read");
        assert_eq!(intake.push(&honest, batch(2), t0 + Duration::from_secs(1)), 0);
    }

    /// A p2p receiver fed by the test.
    #[derive(Debug)]
    struct Fed(tokio::sync::mpsc::UnboundedReceiver<(PublicKey, IoBuf)>);

    impl commonware_p2p::Receiver for Fed {
        type Error = std::io::Error;
        type PublicKey = PublicKey;

        async fn recv(&mut self) -> Result<(PublicKey, IoBuf), std::io::Error> {
            self.0.recv().await.ok_or_else(|| std::io::Error::other("closed"))
        }

        fn capacity(&self) -> std::num::NonZeroUsize {
            std::num::NonZeroUsize::MIN
        }
    }

    /// A gossip message of `txs`.
    fn message(txs: &[SignedTransaction]) -> IoBuf {
        let mut bytes = Vec::new();
        for t in txs {
            put_record(&mut bytes, &t.to_bytes());
        }
        IoBuf::from(bytes)
    }

    /// The real loop, on the node's runtime, fed by a test receiver: a peer over its refusals
    /// waits while another is served; a forged signature stops a peer's gossip; drops are counted;
    /// the loop ends when the channel closes.
    #[test]
    fn the_receive_loop_serves_peers_in_turn_and_holds_back_refused_ones() {
        use archipel_consensus::{MemoryStore, TxStatus};
        use archipel_ledger::{GenesisState, State as LedgerState};
        use commonware_runtime::{Metrics as _, Runner as _, Spawner as _, Supervisor as _};
        let (spam, spam2, honest, forger) =
            (Identity::from_seed(21), Identity::from_seed(22), Identity::from_seed(23), Identity::from_seed(24));
        let network = Hash([7; 32]);
        let state = LedgerState::genesis(GenesisState {
            network,
            accounts: [&spam, &spam2, &honest, &forger].iter().map(|a| (a.node_id(), 1 << 40)).collect(),
            ..GenesisState::default()
        });
        let chain = Arc::new(Chain::open(state, Box::new(MemoryStore::default())).unwrap());
        let transfer = |from: &Identity, nonce: u64, amount: u64| {
            Transaction {
                signer: from.node_id(),
                nonce,
                payload: Payload::Transfer { to: Identity::from_seed(30).node_id(), amount_micro: amount },
            }
            .sign(from, &network)
        };
        // 4,097 variants of one nonce: the first is admitted, 4,096 refused (`nonce_taken`).
        let variants: Vec<SignedTransaction> = (1..=4_097).map(|a| transfer(&spam, 0, a)).collect();
        let variants2: Vec<SignedTransaction> = (1..=4_097).map(|a| transfer(&spam, 1, a)).collect();
        let held = transfer(&spam2, 0, 1);
        let held2 = transfer(&spam2, 1, 1);
        let served = transfer(&honest, 0, 1);
        let mut forged = transfer(&forger, 0, 1);
        forged.signature[0] ^= 1;
        let after_forged = transfer(&forger, 1, 1);
        let (feed, fed) = tokio::sync::mpsc::unbounded_channel();
        let (spammer, other, liar) = (peer(1), peer(2), peer(3));
        commonware_runtime::tokio::Runner::default().start(|context| async move {
            let looping = context.child("tx_gossip_in").spawn({
                let chain = chain.clone();
                move |ctx| receive_loop(ctx, Fed(fed), chain, 64 * 1024)
            });
            feed.send((spammer.clone(), message(&variants))).unwrap();
            feed.send((spammer.clone(), message(std::slice::from_ref(&held)))).unwrap();
            feed.send((other, message(std::slice::from_ref(&served)))).unwrap();
            feed.send((liar.clone(), message(&[forged]))).unwrap();
            let status = |t: &SignedTransaction| chain.tx_status(&t.hash());
            let wait_for = |t: SignedTransaction, within: Duration| {
                let chain = chain.clone();
                async move {
                    let start = Instant::now();
                    while chain.tx_status(&t.hash()) != TxStatus::Pending {
                        assert!(start.elapsed() < within, "not admitted within {within:?}");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            };
            wait_for(served.clone(), Duration::from_secs(5)).await;
            assert_eq!(status(&variants[0]), TxStatus::Pending);
            // Served first; the spammer's next batch waits for its refusals to halve, about a
            // second after the loop's first turn.
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(status(&held), TxStatus::Unknown, "the spammer's next batch waits for its refusals to decay");
            // Its refusals halve within a second: then its batch is admitted.
            wait_for(held.clone(), Duration::from_secs(3)).await;
            // Held again, with nothing left in its line and no other peer sending: its next batch
            // still wakes the loop, which waits for the halving and admits it.
            feed.send((spammer.clone(), message(&variants2))).unwrap();
            wait_for(variants2[0].clone(), Duration::from_secs(3)).await;
            // (The turn's refusals are charged once its whole batch was checked.)
            tokio::time::sleep(Duration::from_millis(100)).await;
            feed.send((spammer.clone(), message(std::slice::from_ref(&held2)))).unwrap();
            wait_for(held2, Duration::from_secs(3)).await;
            // The forger is ignored: its later, valid transaction is dropped unread and counted.
            feed.send((liar, message(std::slice::from_ref(&after_forged)))).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(status(&after_forged), TxStatus::Unknown);
            assert!(context.encode().contains("tx_gossip_in_dropped_messages_total 1"), "{}", context.encode());
            // The channel closes: the loop ends.
            drop(feed);
            tokio::time::timeout(Duration::from_secs(5), looping).await.expect("the loop ends").unwrap();
        });
    }

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
