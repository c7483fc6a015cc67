//! Candidate blocks: blocks this validator built or received for a view and has not seen
//! finalized yet.
//!
//! Two jobs, both off marshal's actor so that no view waits behind marshal's own disk work:
//! - **Durability before the finalize vote.** [`Candidates::persist`] appends the block to a
//!   log on this node's disk and answers once it is synced; `certify` waits for that, so a
//!   finalized block is on the disks of a quorum even if every validator loses power a moment
//!   later. Concurrent writes share one sync (group commit). The log is two blobs used in turn:
//!   once the active one passes [`LOG_SWITCH_BYTES`] and the other one holds nothing from a view
//!   after the last finalized one, the other one is emptied and becomes active. Views, not
//!   heights, decide: once view `v` is finalized, a block from a view up to `v` is either
//!   finalized or can never be, whatever height it claims — so a block at a made-up height
//!   cannot keep a blob forever. A block received from a leader is written only as a child of
//!   its notarized parent ([`Candidates::persist_child`]). On start the blocks above the
//!   finalized head are read back ([`Candidates::open`]).
//! - **Serving validators that missed a block** ([`FETCH_CHANNEL`](crate::engine::FETCH_CHANNEL)):
//!   [`Candidates::fetch`] asks the other validators for a block by digest until one answers;
//!   any validator that holds the block answers a validator (no one else: blocks are not served
//!   to any peer of the network). The digest is the block's hash, so an answer is checked by
//!   decoding it.

use crate::block::{BlockCfg, LedgerBlock, hash_of};
use commonware_codec::{Copying, Decode as _, Encode as _};
use commonware_cryptography::blake3::Digest;
use commonware_cryptography::ed25519::PublicKey;
use commonware_cryptography::{Digested, Digestible};
use commonware_p2p::{Receiver, Recipients, Sender};
use commonware_runtime::{Blob, Clock, ReadOptions, Spawner, Storage, WriteOptions};
use commonware_utils::channel::{mpsc, oneshot};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Storage partition of the candidate log.
const PARTITION: &str = "archipel-candidates";
/// Size after which the log moves to its other blob (when that one holds only finalized blocks).
pub const LOG_SWITCH_BYTES: u64 = 16 << 20;
/// Finalized blocks kept in memory below the head, for validators a little behind.
const KEEP_FINALIZED: u64 = 64;
/// How often an unanswered fetch asks again.
const FETCH_RETRY: Duration = Duration::from_millis(250);
/// Record header: block length (u32), view (u64) and the block's digest (checked on reading).
const RECORD_HEADER: usize = 44;

const WANT: u8 = 0;
const HAVE: u8 = 1;

/// A message on the fetch channel: a tag byte, then a digest (`Want`) or an encoded block
/// (`Have`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchMessage {
    /// "Send me the block with this digest."
    Want(Digest),
    /// A block, answering a `Want`.
    Have(LedgerBlock),
}

impl FetchMessage {
    /// The encoding of `Want(digest)`.
    pub fn want(digest: &Digest) -> Vec<u8> {
        [&[WANT][..], digest.as_ref()].concat()
    }

    /// The encoding of `Have(block)` (built from a reference: blocks are shared, not cloned).
    pub fn have(block: &LedgerBlock) -> Vec<u8> {
        [&[HAVE][..], block.encode().as_ref()].concat()
    }

    /// Decodes a message received from a peer (blocks within `cfg`'s limits).
    pub fn decode(bytes: &[u8], cfg: &BlockCfg) -> Result<Self, &'static str> {
        match bytes.split_first() {
            Some((&WANT, body)) => {
                let digest: [u8; 32] = body.try_into().map_err(|_| "a block request is not 32 bytes of digest")?;
                Ok(FetchMessage::Want(Digest::from(digest)))
            }
            Some((&HAVE, body)) => LedgerBlock::decode_cfg(Copying(body), cfg)
                .map(FetchMessage::Have)
                .map_err(|_| "a block answer is not a valid block"),
            _ => Err("unknown message tag"),
        }
    }
}

/// A block waiting to be written, and who waits for its sync.
struct Write {
    digest: Digest,
    view: u64,
    record: Vec<u8>,
    done: oneshot::Sender<bool>,
}

/// A block this node holds.
struct Held {
    block: Digested<LedgerBlock>,
    /// The view it was built or received for (`None`: fetched for another node's view).
    view: Option<u64>,
    /// On the log's disk already.
    synced: bool,
}

#[derive(Default)]
struct Inner {
    /// Known candidates (and the last [`KEEP_FINALIZED`] finalized blocks) by digest.
    blocks: HashMap<Digest, Held>,
    /// Local fetches waiting for a block from the network.
    waiting: HashMap<Digest, Vec<oneshot::Sender<Digested<LedgerBlock>>>>,
}

/// This validator's candidate blocks; see the module docs.
#[allow(missing_debug_implementations)]
pub struct Candidates {
    inner: Arc<Mutex<Inner>>,
    writes: mpsc::UnboundedSender<Write>,
    wants: mpsc::UnboundedSender<Digest>,
    /// Height of the finalized head (pruning).
    finalized: Arc<AtomicU64>,
    /// View of the last finalization (pruning, and when a log blob may be emptied).
    finalized_view: Arc<AtomicU64>,
}

/// What [`Candidates::open`] returns.
#[allow(missing_debug_implementations)]
pub struct Opened {
    /// The candidates, shared with the application.
    pub candidates: Arc<Candidates>,
    /// Blocks above the finalized head read back from the log, by view.
    pub recovered: Vec<(u64, Digested<LedgerBlock>)>,
    /// This node's block requests, for [`serve`].
    pub wants: mpsc::UnboundedReceiver<Digest>,
}

/// One blob of the log, as the writer sees it.
struct LogBlob<B> {
    blob: B,
    size: u64,
    /// Highest view of a block written to it (0 when empty).
    highest_view: u64,
}

impl Candidates {
    /// Opens the log, reads back the blocks above `head`, and starts its writer on `context`.
    pub async fn open<E>(context: E, head: u64, cfg: &BlockCfg) -> Result<Opened, String>
    where
        E: Storage + Spawner + Clock,
    {
        Self::open_switching_at(context, head, cfg, LOG_SWITCH_BYTES).await
    }

    /// [`Candidates::open`] with the log moving to its other blob after `switch_bytes`.
    async fn open_switching_at<E>(context: E, head: u64, cfg: &BlockCfg, switch_bytes: u64) -> Result<Opened, String>
    where
        E: Storage + Spawner + Clock,
    {
        let mut blobs = Vec::new();
        let mut recovered: Vec<(u64, Digested<LedgerBlock>)> = Vec::new();
        for name in [b"a", b"b"] {
            let (blob, size) =
                context.open(PARTITION, name).await.map_err(|e| format!("cannot open the candidate log: {e}"))?;
            let bytes = if size == 0 {
                Vec::new()
            } else {
                let buf = blob
                    .read_at(0, size as usize, ReadOptions::default())
                    .await
                    .map_err(|e| format!("cannot read the candidate log: {e}"))?;
                buf.coalesce().as_ref().to_vec()
            };
            let records = parse(&bytes, cfg);
            let highest_view = records.iter().map(|(view, _)| *view).max().unwrap_or(0);
            recovered.extend(records.into_iter().filter(|(_, b)| b.inner().header().height > head));
            blobs.push(LogBlob { blob, size, highest_view });
        }
        recovered.sort_by_key(|(view, _)| *view);
        // Continue in the blob written last (the one holding the latest view).
        let active = usize::from(blobs[1].highest_view > blobs[0].highest_view);
        let finalized = Arc::new(AtomicU64::new(head));
        let finalized_view = Arc::new(AtomicU64::new(0));
        let (writes, queue) = mpsc::unbounded_channel();
        let (wants, wants_rx) = mpsc::unbounded_channel();
        let mut inner = Inner::default();
        for (view, block) in &recovered {
            inner.blocks.insert(block.digest(), Held { block: block.clone(), view: Some(*view), synced: true });
        }
        let inner = Arc::new(Mutex::new(inner));
        let candidates = Arc::new(Candidates {
            inner: inner.clone(),
            writes,
            wants,
            finalized,
            finalized_view: finalized_view.clone(),
        });
        let [a, b]: [LogBlob<E::Blob>; 2] = blobs.try_into().unwrap_or_else(|_| unreachable!("two blobs"));
        let log = Log { blobs: [a, b], active, switch_bytes };
        context.child("candidate_log").spawn(move |_| write_log(queue, log, finalized_view, inner));
        Ok(Opened { candidates, recovered, wants: wants_rx })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::lock(&self.inner)
    }

    /// The block with `digest`, if this node holds it.
    pub fn get(&self, digest: &Digest) -> Option<Digested<LedgerBlock>> {
        self.lock().blocks.get(digest).map(|h| h.block.clone())
    }

    /// The height of the block with `digest`, if this node holds it.
    pub fn height(&self, digest: &Digest) -> Option<u64> {
        self.lock().blocks.get(digest).map(|h| h.block.inner().header().height)
    }

    /// Keeps `block` (proposed or received at `view`) and makes it durable; the answer is true
    /// once it is synced (at once if it already is), false if the disk refused it.
    pub fn persist(&self, view: u64, block: Digested<LedgerBlock>) -> oneshot::Receiver<bool> {
        let (done, answer) = oneshot::channel();
        let digest = block.digest();
        {
            let mut g = self.lock();
            if g.blocks.get(&digest).is_some_and(|h| h.synced) {
                let _ = done.send(true);
                return answer;
            }
            g.blocks.insert(digest, Held { block: block.clone(), view: Some(view), synced: false });
        }
        let encoded = block.inner().encode();
        let mut record = Vec::with_capacity(RECORD_HEADER + encoded.len());
        record.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        record.extend_from_slice(&view.to_be_bytes());
        record.extend_from_slice(digest.as_ref());
        record.extend_from_slice(encoded.as_ref());
        if let Err(mpsc::error::SendError(write)) = self.writes.send(Write { digest, view, record, done }) {
            // The writer is gone (shutting down): never claim durability.
            let _ = write.done.send(false);
        }
        answer
    }

    /// [`Candidates::persist`] for a block a leader proposed at `view` on the notarized
    /// `parent`, if it is the parent's child: it names `parent` and, when the parent is held
    /// here, its height is the parent's plus one — a block at a made-up height never reaches the
    /// log. `Ok(None)` when the parent is not held here (the caller persists the block once it
    /// verified); an error says how the block fails to follow its parent.
    pub fn persist_child(
        &self,
        view: u64,
        block: Digested<LedgerBlock>,
        parent: &Digest,
    ) -> Result<Option<oneshot::Receiver<bool>>, String> {
        let header = block.inner().header();
        if header.parent != hash_of(parent) {
            return Err(format!(
                "block {} names parent {}, not the notarized parent {}",
                header.height,
                header.parent.short(),
                hash_of(parent).short()
            ));
        }
        let Some(parent_height) = self.height(parent) else { return Ok(None) };
        if parent_height.checked_add(1) != Some(header.height) {
            return Err(format!("block claims height {} on a parent at height {parent_height}", header.height));
        }
        Ok(Some(self.persist(view, block)))
    }

    /// Records that consensus finalized block `digest` at `view`: the log may drop what it wrote
    /// for views up to `view`, and blocks more than [`KEEP_FINALIZED`] below the finalized
    /// height, or from views up to `view` above it (never to be finalized), are forgotten.
    pub fn finalized(&self, view: u64, digest: &Digest) {
        let view = self.finalized_view.fetch_max(view, Ordering::Relaxed).max(view);
        let mut g = self.lock();
        let height = g.blocks.get(digest).map(|h| h.block.inner().header().height).unwrap_or(0);
        let height = self.finalized.fetch_max(height, Ordering::Relaxed).max(height);
        let floor = height.saturating_sub(KEEP_FINALIZED);
        g.blocks.retain(|_, h| {
            let at = h.block.inner().header().height;
            at > floor && (at <= height || h.view.is_none_or(|v| v > view))
        });
    }

    /// The block with `digest`: from here if held, else from the other validators (asking
    /// again every [`FETCH_RETRY`] until one answers; drop the future to stop).
    pub async fn fetch(&self, clock: &impl Clock, digest: Digest) -> Digested<LedgerBlock> {
        loop {
            let answer = {
                let mut g = self.lock();
                if let Some(h) = g.blocks.get(&digest) {
                    return h.block.clone();
                }
                let (tx, rx) = oneshot::channel();
                let waiting = g.waiting.entry(digest).or_default();
                waiting.retain(|w| !w.is_closed());
                waiting.push(tx);
                rx
            };
            let _ = self.wants.send(digest);
            commonware_macros::select! {
                block = answer => if let Ok(block) = block { return block },
                _ = clock.sleep(FETCH_RETRY) => {},
            }
        }
    }

    /// A block arrived from the network: hand it to whoever waits for it, and keep it (in
    /// memory: persisting is the caller's choice) so that it is not fetched twice and this node
    /// can serve it on. Blocks nobody asked for are dropped.
    fn deliver(&self, block: Digested<LedgerBlock>) {
        let waiters = {
            let mut g = self.lock();
            let waiters = g.waiting.remove(&block.digest());
            if waiters.is_some() {
                g.blocks.entry(block.digest()).or_insert_with(|| Held {
                    block: block.clone(),
                    view: None,
                    synced: false,
                });
            }
            waiters
        };
        for w in waiters.into_iter().flatten() {
            let _ = w.send(block.clone());
        }
    }
}

/// Splits a log blob into (view, block) records; stops at the first torn or garbled one (a
/// crash in the middle of a write).
pub fn parse(mut bytes: &[u8], cfg: &BlockCfg) -> Vec<(u64, Digested<LedgerBlock>)> {
    let mut out = Vec::new();
    while bytes.len() >= RECORD_HEADER {
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap_or_default()) as usize;
        let view = u64::from_be_bytes(bytes[4..12].try_into().unwrap_or_default());
        let expected = &bytes[12..RECORD_HEADER];
        bytes = &bytes[RECORD_HEADER..];
        if len > bytes.len() {
            break;
        }
        let (record, rest) = bytes.split_at(len);
        match LedgerBlock::decode_cfg(Copying(record), cfg) {
            Ok(block) if block.digest().as_ref() == expected => {
                let digest = block.digest();
                out.push((view, Digested::precomputed(block, digest)));
            }
            _ => break,
        }
        bytes = rest;
    }
    out
}

/// The log's two blobs, which one is written, and when to move to the other.
struct Log<B> {
    blobs: [LogBlob<B>; 2],
    active: usize,
    switch_bytes: u64,
}

/// The log's writer: writes what is queued, syncs once for all of it, answers every waiter.
async fn write_log<B: Blob>(
    mut queue: mpsc::UnboundedReceiver<Write>,
    mut log: Log<B>,
    finalized_view: Arc<AtomicU64>,
    inner: Arc<Mutex<Inner>>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while let Ok(w) = queue.try_recv() {
            batch.push(w);
        }
        let (active, other) = (log.active, 1 - log.active);
        if log.blobs[active].size >= log.switch_bytes
            && log.blobs[other].highest_view <= finalized_view.load(Ordering::Relaxed)
            && log.blobs[other].blob.resize(0).await.is_ok()
        {
            log.blobs[other].size = 0;
            log.blobs[other].highest_view = 0;
            log.active = other;
        }
        let log = &mut log.blobs[log.active];
        let mut bytes = Vec::with_capacity(batch.iter().map(|w| w.record.len()).sum());
        for w in &batch {
            bytes.extend_from_slice(&w.record);
            log.highest_view = log.highest_view.max(w.view);
        }
        let len = bytes.len() as u64;
        let ok = match log.blob.write_at(log.size, bytes, WriteOptions::default()).await {
            Ok(()) => log.blob.sync().await.is_ok(),
            Err(_) => false,
        };
        if ok {
            log.size += len;
            let mut g = crate::lock(&inner);
            for w in &batch {
                if let Some(h) = g.blocks.get_mut(&w.digest) {
                    h.synced = true;
                }
            }
        } else {
            tracing::error!("cannot write the candidate log: this validator will not vote to finalize until it can");
        }
        for w in batch {
            let _ = w.done.send(ok);
        }
    }
}

/// Answers other validators' block requests over `channel` and sends this node's own `wants` to
/// `validators` (the others); runs until the channel closes. Requests and answers from any other
/// peer are ignored: serving blocks is a validator's duty to validators, not a public service.
pub async fn serve<S, R>(
    candidates: Arc<Candidates>,
    mut wants: mpsc::UnboundedReceiver<Digest>,
    (mut sender, mut receiver): (S, R),
    validators: Vec<PublicKey>,
    cfg: BlockCfg,
) where
    S: Sender<PublicKey = PublicKey>,
    R: Receiver<PublicKey = PublicKey>,
{
    let allowed: HashSet<PublicKey> = validators.iter().cloned().collect();
    loop {
        commonware_macros::select! {
            want = wants.recv() => {
                let Some(digest) = want else { return };
                sender.send(Recipients::Some(validators.clone()), FetchMessage::want(&digest), false);
            },
            message = receiver.recv() => {
                let Ok((peer, bytes)) = message else { return };
                if !allowed.contains(&peer) {
                    tracing::debug!(peer = %peer, "ignoring a block message from a peer that is not a validator");
                    continue;
                }
                match FetchMessage::decode(bytes.as_ref(), &cfg) {
                    Ok(FetchMessage::Want(digest)) => {
                        if let Some(block) = candidates.get(&digest) {
                            sender.send(Recipients::One(peer), FetchMessage::have(block.inner()), false);
                        }
                    }
                    Ok(FetchMessage::Have(block)) => {
                        let digest = block.digest();
                        candidates.deliver(Digested::precomputed(block, digest));
                    }
                    Err(reason) => tracing::debug!(peer = %peer, reason, "ignoring a malformed fetch message"),
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_ledger::{GenesisState, Signatures, State, genesis_header, propose};
    use commonware_runtime::{Runner as _, Supervisor as _, deterministic};

    /// `n` empty blocks on top of genesis.
    fn blocks(n: u64) -> (BlockCfg, Vec<Digested<LedgerBlock>>) {
        let mut state = State::genesis(GenesisState::default());
        let cfg = BlockCfg::from(state.params());
        let mut parent = genesis_header(&state);
        let mut out = Vec::new();
        for i in 1..=n {
            let p = propose(&state, &parent, i * 1_000, [], [], Signatures::Verify).unwrap();
            parent = p.block.header;
            state = p.state;
            let block = LedgerBlock::new(p.block);
            let digest = block.digest();
            out.push(Digested::precomputed(block, digest));
        }
        (cfg, out)
    }

    #[test]
    fn synced_candidates_come_back_after_a_restart_unless_finalized() {
        deterministic::Runner::default().start(|context| async move {
            let (cfg, chain) = blocks(3);
            let opened = Candidates::open(context.child("first"), 0, &cfg).await.unwrap();
            assert!(opened.recovered.is_empty());
            for (i, b) in chain.iter().enumerate() {
                assert!(opened.candidates.persist(10 + i as u64, b.clone()).await.unwrap(), "block {i} not synced");
            }
            // Already synced: answered at once, nothing written twice.
            assert!(opened.candidates.persist(10, chain[0].clone()).await.unwrap());
            drop(opened);
            // Let the writer finish and close its blobs.
            context.sleep(Duration::from_millis(100)).await;

            // Restart with block 1 finalized: blocks 2 and 3 come back, with their views.
            let again = Candidates::open(context.child("second"), 1, &cfg).await.unwrap();
            let back: Vec<(u64, u64)> =
                again.recovered.iter().map(|(view, b)| (*view, b.inner().header().height)).collect();
            assert_eq!(back, vec![(11, 2), (12, 3)]);
            assert_eq!(again.candidates.get(&chain[2].digest()).map(|b| b.digest()), Some(chain[2].digest()));
            assert!(again.candidates.get(&chain[0].digest()).is_none());
            // A recovered block is already durable, and a block held here is fetched without the network.
            assert!(again.candidates.persist(12, chain[2].clone()).await.unwrap());
            assert_eq!(again.candidates.fetch(&context, chain[1].digest()).await.digest(), chain[1].digest());
        });
    }

    #[test]
    fn a_torn_or_garbled_tail_is_cut_off_and_the_rest_kept() {
        let (cfg, chain) = blocks(3);
        let mut log = Vec::new();
        for (i, b) in chain.iter().enumerate() {
            let encoded = b.inner().encode();
            log.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
            log.extend_from_slice(&(i as u64).to_be_bytes());
            log.extend_from_slice(b.digest().as_ref());
            log.extend_from_slice(encoded.as_ref());
        }
        let whole = parse(&log, &cfg);
        assert_eq!(whole.len(), 3);
        // Torn in the middle of the last record.
        let torn = parse(&log[..log.len() - 5], &cfg);
        assert_eq!(
            torn.iter().map(|(_, b)| b.digest()).collect::<Vec<_>>(),
            vec![chain[0].digest(), chain[1].digest()]
        );
        // A flipped byte inside the second record: only the first survives.
        let mut garbled = log.clone();
        let second = RECORD_HEADER + chain[0].inner().encode().len() + RECORD_HEADER + 3;
        garbled[second] ^= 0xff;
        assert_eq!(parse(&garbled, &cfg).len(), 1);
        assert!(parse(&[0, 0], &cfg).is_empty());
    }

    /// `block` claiming height `height` (a Byzantine leader's).
    fn at_height(block: &Digested<LedgerBlock>, height: u64) -> Digested<LedgerBlock> {
        let mut b = block.inner().block().clone();
        b.header.height = height;
        let b = LedgerBlock::new(b);
        let digest = b.digest();
        Digested::precomputed(b, digest)
    }

    #[test]
    fn a_block_that_does_not_follow_its_notarized_parent_is_never_written() {
        deterministic::Runner::default().start(|context| async move {
            let (cfg, chain) = blocks(3);
            let opened = Candidates::open(context.child("first"), 0, &cfg).await.unwrap();
            let c = &opened.candidates;
            assert!(c.persist(1, chain[0].clone()).await.unwrap());
            // A Byzantine leader's block on the notarized parent, at a made-up height.
            let bogus = at_height(&chain[1], u64::MAX);
            let e = c.persist_child(2, bogus.clone(), &chain[0].digest()).unwrap_err();
            assert!(e.contains(&format!("claims height {} on a parent at height 1", u64::MAX)), "{e}");
            // A block on another parent than the notarized one.
            let e = c.persist_child(2, chain[2].clone(), &chain[0].digest()).unwrap_err();
            assert!(e.contains("not the notarized parent"), "{e}");
            // The true child is written; with the parent not held here (the genesis), nothing
            // is written until the caller has verified the block.
            assert!(c.persist_child(2, chain[1].clone(), &chain[0].digest()).unwrap().unwrap().await.unwrap());
            let genesis = crate::block::digest_of(&chain[0].inner().header().parent);
            assert!(c.persist_child(1, chain[0].clone(), &genesis).unwrap().is_none());
            drop(opened);
            context.sleep(Duration::from_millis(100)).await;

            let again = Candidates::open(context.child("second"), 0, &cfg).await.unwrap();
            let back: Vec<u64> = again.recovered.iter().map(|(_, b)| b.inner().header().height).collect();
            assert_eq!(back, vec![1, 2]);
            assert!(again.candidates.get(&bogus.digest()).is_none());
        });
    }

    #[test]
    fn a_block_at_a_made_up_height_does_not_keep_the_log_from_switching() {
        deterministic::Runner::default().start(|context| async move {
            let (cfg, chain) = blocks(2);
            // Switch blobs after every write, as soon as the other blob may be emptied.
            let opened = Candidates::open_switching_at(context.child("first"), 0, &cfg, 1).await.unwrap();
            let c = &opened.candidates;
            // However it got there, a block at a made-up height sits in the first blob (view 1)...
            let bogus = at_height(&chain[1], u64::MAX);
            assert!(c.persist(1, bogus.clone()).await.unwrap());
            // ...the real chain follows at views 2 and 3 (in the second blob, then the first).
            assert!(c.persist(2, chain[0].clone()).await.unwrap());
            c.finalized(2, &chain[0].digest());
            assert!(c.get(&bogus.digest()).is_none(), "a block from a finalized view above the head is dead");
            assert!(c.persist(3, chain[1].clone()).await.unwrap());
            drop(opened);
            context.sleep(Duration::from_millis(100)).await;

            // View 2 is final, so the first blob (views up to 1) was emptied for view 3.
            let again = Candidates::open(context.child("second"), 0, &cfg).await.unwrap();
            let back: Vec<u64> = again.recovered.iter().map(|(view, _)| *view).collect();
            assert_eq!(back, vec![2, 3], "view 1's block left with its blob");
        });
    }

    #[test]
    fn blocks_are_served_to_validators_only() {
        use commonware_cryptography::Signer as _;
        use commonware_p2p::simulated::{self, Link, Network};
        use commonware_runtime::Quota;
        use commonware_utils::{NZU32, NZUsize};

        deterministic::Runner::default().start(|context| async move {
            let (cfg, chain) = blocks(1);
            let keys: Vec<PublicKey> =
                (0..3).map(|i| archipel_crypto::Identity::from_seed(i).private_key().public_key()).collect();
            let p2p = simulated::Config {
                max_size: 1 << 20,
                max_peers_per_set: NZUsize!(4),
                disconnect_on_block: false,
                tracked_peer_sets: NZUsize!(1),
            };
            let (network, oracle) = Network::new_with_peers(context.child("network"), p2p, keys.clone()).await;
            network.start();
            let link = Link { latency: Duration::from_millis(5), jitter: Duration::ZERO, success_rate: commonware_utils::Probability::new(1, 1).unwrap() };
            for a in &keys {
                for b in keys.iter().filter(|b| *b != a) {
                    oracle.add_link(a.clone(), b.clone(), link.clone()).await.unwrap();
                }
            }
            let mut channels = Vec::new();
            for k in &keys {
                channels.push(oracle.control(k.clone()).register(0, Quota::per_second(NZU32!(1_000))).await.unwrap());
            }
            let (mut outsider, mut validator) = (channels.pop().unwrap(), channels.pop().unwrap());
            // Node 0 holds the block; node 1 is the other validator, node 2 any peer.
            let server = channels.pop().unwrap();
            let opened = Candidates::open(context.child("server"), 0, &cfg).await.unwrap();
            assert!(opened.candidates.persist(1, chain[0].clone()).await.unwrap());
            let others = vec![keys[1].clone()];
            context
                .child("serve")
                .spawn(move |_| serve(opened.candidates, opened.wants, server, others, cfg));
            let mut want = vec![WANT];
            want.extend_from_slice(chain[0].digest().as_ref());

            outsider.0.send(Recipients::One(keys[0].clone()), want.clone(), false);
            commonware_macros::select! {
                answer = outsider.1.recv() => panic!("a peer that is not a validator was answered: {:?}", answer.map(|(p, _)| p)),
                _ = context.sleep(Duration::from_secs(1)) => {},
            }
            validator.0.send(Recipients::One(keys[0].clone()), want, false);
            let (from, answer) = validator.1.recv().await.unwrap();
            assert_eq!(from, keys[0]);
            let (&tag, body) = answer.as_ref().split_first().unwrap();
            assert_eq!(tag, HAVE);
            assert_eq!(LedgerBlock::decode_cfg(Copying(body), &cfg).unwrap().digest(), chain[0].digest());
        });
    }

    #[test]
    fn blocks_far_below_the_finalized_head_are_forgotten() {
        deterministic::Runner::default().start(|context| async move {
            let (cfg, chain) = blocks(3);
            let opened = Candidates::open(context.child("c"), 0, &cfg).await.unwrap();
            for b in &chain {
                opened.candidates.persist(1, b.clone()).await.unwrap();
            }
            opened.candidates.finalized(1, &chain[2].digest());
            assert!(opened.candidates.get(&chain[0].digest()).is_some(), "kept for validators a little behind");
            // A later finalization of a block not held here: only its view is known.
            opened.candidates.finalized(2, &Digest::from([7; 32]));
            assert!(opened.candidates.get(&chain[0].digest()).is_some());
            let (_, far) = blocks(KEEP_FINALIZED + 2);
            opened.candidates.persist(3, far[KEEP_FINALIZED as usize + 1].clone()).await.unwrap();
            opened.candidates.finalized(3, &far[KEEP_FINALIZED as usize + 1].digest());
            assert!(opened.candidates.get(&chain[0].digest()).is_none());
            assert!(opened.candidates.get(&chain[2].digest()).is_some());
        });
    }

    #[test]
    fn a_fetched_block_is_kept_to_serve_on_and_an_unasked_one_is_dropped() {
        deterministic::Runner::default().start(|context| async move {
            let (cfg, chain) = blocks(2);
            let mut opened = Candidates::open(context.child("log"), 0, &cfg).await.unwrap();
            let candidates = opened.candidates.clone();
            // Nobody asked for block 1: an answer carrying it is not kept.
            candidates.deliver(chain[0].clone());
            assert!(candidates.get(&chain[0].digest()).is_none());

            let wanted = chain[1].digest();
            let fetching = context.child("fetch").spawn({
                let candidates = candidates.clone();
                move |context| async move { candidates.fetch(&context, wanted).await }
            });
            // The request goes out to the validators...
            assert_eq!(opened.wants.recv().await, Some(wanted));
            // ...an answer arrives: the fetch gets it, and the node holds it to serve on.
            candidates.deliver(chain[1].clone());
            assert_eq!(fetching.await.unwrap().digest(), wanted);
            assert!(candidates.get(&wanted).is_some());
            // Held in memory only: persisting it still writes and syncs it.
            assert!(candidates.persist(5, chain[1].clone()).await.unwrap());
        });
    }
}
