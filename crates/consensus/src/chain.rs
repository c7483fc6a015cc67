//! One node's view of the ledger: the finalized state and blocks, the mempool, and the states of
//! blocks that were proposed or verified but are not final yet.
//!
//! Consensus calls [`Chain::build`], [`Chain::verify`] and [`Chain::finalize`]; the HTTP API
//! submits transactions and reads state, proofs and blocks. Everything is behind one mutex held
//! only for bookkeeping: executing a block happens outside it.
//!
//! Finalized state lives in a [`StateStore`] (on disk in a node): each finalized block's state
//! changes and transaction index go in as one commit, without a flush; every
//! [`CHECKPOINT_BLOCKS`] blocks the block log is synced and then the store flushed, so the store
//! is never durably ahead of the log. [`Chain::open_with`] opens the state at the store's height
//! and replays only the blocks after it.

use crate::health::ApplierHealth;
use crate::store::{BlockStore, Record, Synced};
use archipel_ledger::store::{Commit, StateStore, StoreError};
use archipel_ledger::{
    Block, BlockHeader, BlockOutcome, Hash, LivenessChange, Mempool, MempoolError, MempoolLimits, Receipt, Signatures,
    SignedTransaction, State, StateKey, StateProof, TxProof, execute, genesis_header, merkle, propose, verify_all,
    verify_each,
};
use futures::channel::oneshot;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Finalized blocks between durable state checkpoints: a restart replays at most this many
/// blocks from the log (plus those after the last checkpoint's). The log's sync and the store's
/// flush run on the commit thread (a flush takes ~390 ms at 10^6 entries; under the chain lock,
/// checkpoints every 256 blocks showed as 70–90 ms stretches in the bench's latency), so they
/// hold up neither the lock nor the applier; replaying 1,024 mostly small blocks takes well
/// under a second.
pub const CHECKPOINT_BLOCKS: u64 = 1_024;

/// Finalized blocks whose state changes are written to the state store together: an entry or
/// trie node changed by several of them is written once, and one written and replaced between
/// two commits never is (the top of the trie changes every block). Until then the head state
/// holds them in memory, and the transaction index of those blocks too.
pub const COMMIT_BLOCKS: u64 = 32;

/// Mempool capacity per node.
pub const MEMPOOL_CAPACITY: usize = 100_000;

/// Transactions admitted together by [`Chain::submit_many`]: their signatures are verified as one
/// batch (batch verification gains little beyond a few dozen). Each transaction is prechecked as
/// though the ones before it that passed were in the pool, so the transactions of a flood that
/// the mempool's rules refuse cost no verification: 1,023 transfers behind a missing nonce cost
/// the 16 that may wait.
pub const SUBMIT_CHUNK: usize = 64;

/// Most `?wait=final` waiters a node keeps at once (requests whose transaction is not final yet);
/// beyond it [`Chain::watch_tx`] answers [`TxWatch::Busy`].
pub const MAX_TX_WAITERS: usize = 10_000;

/// Where a finalized transaction is and what it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxLocation {
    /// Block height.
    pub height: u64,
    /// Position in the block.
    pub index: u32,
    /// The block's consensus time.
    pub block_time_ms: u64,
    /// What it did.
    pub receipt: Receipt,
}

/// What a node knows about a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum TxStatus {
    /// In a finalized block.
    Final(TxLocation),
    /// Waiting in this node's mempool.
    Pending,
    /// Never seen here (or dropped).
    Unknown,
}

/// A finalized block as the chain recorded it.
#[derive(Clone, Debug)]
pub struct Finalized {
    /// The block.
    pub block: Block,
    /// Nodes marked Down at this block.
    pub went_down: Vec<archipel_types::NodeId>,
    /// Nodes marked Up at this block.
    pub came_up: Vec<archipel_types::NodeId>,
}

/// A block this node built or verified that is not final yet, and what executing it gave.
struct Executed {
    block: Block,
    state: State,
    outcome: BlockOutcome,
}

struct Inner {
    head: BlockHeader,
    /// Highest block with a finality certificate of its own (blocks below it without one are
    /// proven through it).
    certified: u64,
    state: State,
    store: Box<dyn BlockStore>,
    /// Finalized state and the transaction index, committed block by block.
    states: Arc<dyn StateStore>,
    /// Blocks finalized since the last checkpoint started.
    since_checkpoint: u64,
    /// The height of the state the store last made durable (blocks below it may be pruned).
    durable_at: u64,
    /// Finalized blocks not yet committed to `states`, and their transactions.
    uncommitted: u64,
    /// Where this node's commits and checkpoints fall: at heights `phase` modulo
    /// [`COMMIT_BLOCKS`] and modulo `checkpoint_every` (see [`Chain::with_commit_phase`]).
    phase: u64,
    /// The last write of the state failed: the next is waited for.
    commit_failed: bool,
    /// The height `states` was last committed at.
    committed_at: u64,
    uncommitted_txs: HashMap<Hash, TxLocation>,
    /// Blocks between checkpoints ([`CHECKPOINT_BLOCKS`] unless a test sets it).
    checkpoint_every: u64,
    /// Finalized blocks kept in the log below the head (`None`: all, an archive node).
    retain: Option<u64>,
    mempool: Mempool,
    pending: HashMap<Hash, Executed>,
    tx_waiters: TxWaiters,
    block_waiters: Vec<oneshot::Sender<u64>>,
    mempool_waiters: Vec<oneshot::Sender<()>>,
}

/// How [`Chain::open_with`] found its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The height the state store was at (0: empty, or rebuilt).
    pub state_height: u64,
    /// Blocks replayed from the log after it.
    pub replayed: u64,
}

/// The ledger as one node sees it.
pub struct Chain {
    genesis: BlockHeader,
    opened: Opened,
    /// The write of the head's state to the store in flight on its own thread (at most one),
    /// and whether it is a checkpoint; held while a commit starts or finishes.
    committing: Mutex<Option<InFlight>>,
    genesis_state: State,
    inner: Mutex<Inner>,
    applier: ApplierHealth,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain").field("genesis", &self.genesis.hash()).finish_non_exhaustive()
    }
}

impl Chain {
    /// Opens the chain with its state in memory: replays every finalized block in `store` on
    /// `genesis_state` (tests and the simulator; a node keeps its state on disk, see
    /// [`Chain::open_with`]).
    pub fn open(genesis_state: State, store: Box<dyn BlockStore>) -> Result<Self, String> {
        Self::open_with(genesis_state, store, Arc::new(archipel_ledger::store::MemoryStore::default()))
    }

    /// Opens the chain: the state `states` holds (the genesis on an empty store), checked against
    /// the block log's header at its height, then the blocks after it replayed from the log,
    /// checking every link and root (signatures were checked before the blocks were stored).
    pub fn open_with(
        genesis_state: State,
        store: Box<dyn BlockStore>,
        states: Arc<dyn StateStore>,
    ) -> Result<Self, String> {
        let genesis = genesis_header(&genesis_state);
        let max_txs = genesis_state.params().max_block_txs as usize;
        let failed = |e: StoreError| format!("the state store failed: {e}");
        let read = |height: u64| -> Result<(Block, bool), String> {
            let record = store.get(height)?.ok_or_else(|| format!("block {height} is missing from the log"))?;
            let block = Block::from_bytes(&record.block, max_txs).map_err(|e| format!("stored block {height}: {e}"))?;
            Ok((block, !record.certificate.is_empty()))
        };
        let opened = match State::open(states.clone()) {
            Ok(opened) => opened,
            // The log is the record: a store whose entries do not add up is rebuilt from it.
            Err(StoreError::Corrupt(e)) => {
                tracing::warn!(error = %e, "the state store is corrupt: rebuilding it from the block log");
                states.clear().map_err(failed)?;
                None
            }
            Err(e) => return Err(failed(e)),
        };
        let resumed = match opened {
            None => None,
            Some(s) => {
                let at = s.chain().height;
                if s.network() != genesis_state.network() {
                    return Err(format!(
                        "the state store belongs to network {}, not this genesis's {}",
                        s.network(),
                        genesis_state.network()
                    ));
                }
                let header = if at == 0 && store.first() == 1 {
                    Some(genesis)
                } else if (store.first()..=store.height()).contains(&at) {
                    Some(read(at)?.0.header)
                } else {
                    None
                };
                match header {
                    Some(h) if h.state_root == s.state_root() => Some((s, h)),
                    _ => {
                        // Ahead of the log (a disk that lost writes it had acknowledged) or not
                        // this chain's: the log is the record, so the state is rebuilt from it.
                        tracing::warn!(
                            state_height = at,
                            log_height = store.height(),
                            "the state store does not match the block log: rebuilding it from the log"
                        );
                        states.clear().map_err(failed)?;
                        None
                    }
                }
            }
        };
        let (mut state, mut head) = match resumed {
            Some(resumed) => resumed,
            // A log that starts above the genesis (a node that joined by state sync) cannot
            // rebuild a state: only a new join can.
            None if store.first() > 1 => {
                return Err(format!(
                    "the block log starts at block {} (this node joined by state sync, or prunes old blocks) and the state store does not hold a state it can resume from: start the node with --join to sync the state again",
                    store.first()
                ));
            }
            // An empty store starts from the genesis, committed durably.
            None => {
                // Entries without a committed height (a join cut short) are not a state.
                states.clear().map_err(failed)?;
                let mut s = genesis_state.clone().with_store(states.clone());
                let c = s.commit().map_err(failed)?;
                states.commit(&c, true).map_err(failed)?;
                s.committed();
                (s, genesis)
            }
        };
        let state_height = head.height;
        let mut certified = 0;
        for height in (store.first()..=store.height()).rev() {
            if store.get(height)?.is_some_and(|r| !r.certificate.is_empty()) {
                certified = height;
                break;
            }
        }
        // Replay what the store does not hold yet, committing as `finalize` does.
        let mut txs = HashMap::new();
        for height in head.height + 1..=store.height() {
            let (block, _) = read(height)?;
            let outcome = execute(&mut state, &head, &block, Signatures::AlreadyVerified).map_err(|e| {
                if e.what.contains("upgrade required") {
                    // Blocks of a newer protocol than this build's: the data is fine, the build is old.
                    return format!("stored chain does not replay on this build: {e}");
                }
                format!(
                    "stored chain does not replay: {e} (a data directory written by another version of archipel? \
                         its state format may differ: start afresh, e.g. `archipel devnet --reset`)"
                )
            })?;
            txs.extend(tx_index(&block, outcome.receipts));
            head = block.header;
            if (height - state_height).is_multiple_of(COMMIT_BLOCKS) || height == store.height() {
                write(&*states, &commit_writes(&mut state, &txs)?)?;
                state.committed();
                txs.clear();
            }
        }
        // State replayed from the log is made durable only once the log is: what was read back
        // may not be synced (a restart reads the page cache).
        let mut store = store;
        if head.height > state_height {
            let synced = futures::executor::block_on(store.sync())
                .map_err(|_| "the block log's sync was dropped".to_string())??;
            if synced < head.height {
                return Err(format!("the block log synced to {synced}, below its height {}", head.height));
            }
            states.flush().map_err(failed)?;
        }
        Ok(Chain {
            genesis,
            opened: Opened { state_height, replayed: head.height - state_height },
            committing: Mutex::new(None),
            genesis_state,
            inner: Mutex::new(Inner {
                head,
                certified,
                state,
                store,
                states,
                since_checkpoint: 0,
                durable_at: head.height,
                uncommitted: 0,
                phase: 0,
                commit_failed: false,
                committed_at: head.height,
                uncommitted_txs: HashMap::new(),
                checkpoint_every: CHECKPOINT_BLOCKS,
                retain: None,
                mempool: Mempool::new(MempoolLimits::with_capacity(MEMPOOL_CAPACITY)),
                pending: HashMap::new(),
                tx_waiters: TxWaiters::default(),
                block_waiters: Vec::new(),
                mempool_waiters: Vec::new(),
            }),
            applier: ApplierHealth::default(),
        })
    }

    /// Makes the state at the head durable (a clean shutdown): commits it, syncs the block log,
    /// flushes the store.
    /// A write or checkpoint in flight that failed does not stop it: the closing checkpoint is
    /// the retry (a restart would otherwise replay from an older durable state, or a node that
    /// prunes would need `--join`), and only its own failure is returned.
    pub fn close(&self) -> Result<(), String> {
        let mut in_flight = crate::lock(&self.committing);
        if let Err(e) = self.finish_commit(&mut in_flight) {
            tracing::warn!(error = %e, "the last write of the state failed: retrying it to close");
        }
        self.lock().checkpoint()
    }

    /// Writes the head's state to the store on a thread of its own, with the chain lock held
    /// only to take the writes and, once written, to let go of them: admission, block building,
    /// verification and the applier go on meanwhile (the head, and the states after it, hold
    /// everything until the write is done). The write before it is finished first, so at most one
    /// is in flight and the head holds at most two commits' worth of changes.
    ///
    /// With `checkpoint` the same thread then makes the state durable: it waits for the block log's
    /// sync (asked for now, so it covers the head) and flushes the store, so the store is never
    /// durably ahead of the log. A flush takes hundreds of milliseconds at 10^6 entries: on the
    /// applier it held up the consensus runtime's threads, and the bench's 24 clients stalled
    /// together. With `wait` (a retry after a failed write) it returns once this write is done
    /// too: a store that cannot be written stalls the applier instead of letting memory grow.
    fn commit_outside_lock(&self, wait: bool, checkpoint: bool) -> Result<(), String> {
        let mut in_flight = crate::lock(&self.committing);
        self.finish_commit(&mut in_flight)?;
        let (commit, sync, states, height) = {
            let mut g = self.lock();
            if g.uncommitted == 0 && !checkpoint {
                return Ok(());
            }
            let inner = &mut *g;
            let commit = if inner.uncommitted > 0 {
                Some(commit_writes(&mut inner.state, &inner.uncommitted_txs)?)
            } else {
                None
            };
            inner.uncommitted = 0;
            let sync = checkpoint.then(|| inner.store.sync());
            if checkpoint {
                inner.since_checkpoint = 0;
            }
            (commit, sync, inner.states.clone(), inner.head.height)
        };
        let job = move || {
            if let Some(c) = &commit {
                write(&*states, c)?;
            }
            let durable = sync.map(|sync| {
                let synced =
                    futures::executor::block_on(sync).map_err(|_| "the block log's sync was dropped".to_string())??;
                if synced < height {
                    return Err(format!("the block log synced to {synced}, below the committed state at {height}"));
                }
                states.flush().map_err(|e| format!("the state store failed: {e}"))
            });
            Ok(Written { height, durable })
        };
        // The writes are out of the head now: if no thread can be had, they are written here
        // (late, but never lost).
        let job = Arc::new(Mutex::new(Some(job)));
        let theirs = Arc::clone(&job);
        fn run<F: FnOnce() -> Result<Written, String>>(job: &Mutex<Option<F>>) -> Result<Written, String> {
            crate::lock(job).take().map_or_else(|| Err("the state write ran twice".to_string()), |f| f())
        }
        let pending = match std::thread::Builder::new().name("state-commit".into()).spawn(move || run(&theirs)) {
            Ok(handle) => Pending::Thread(handle),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to write the state: writing it on this one");
                Pending::Done(run(&job))
            }
        };
        *in_flight = Some(InFlight { pending, checkpoint });
        if wait {
            self.finish_commit(&mut in_flight)?;
        }
        Ok(())
    }

    /// Lets go of what the write in flight wrote once it is done (waiting for it); after a
    /// failed write, the next commit starts at once and is waited for (and, when the write was a
    /// checkpoint, is one again; a checkpoint whose write went in but whose sync or flush failed
    /// is retried the same way, with only what came since to write).
    fn finish_commit(&self, in_flight: &mut Option<InFlight>) -> Result<(), String> {
        let Some(InFlight { pending, checkpoint }) = in_flight.take() else { return Ok(()) };
        let written = pending.wait();
        let mut g = self.lock();
        match written {
            Ok(Written { height, durable }) => {
                g.committed_through(height);
                match durable {
                    None => Ok(()),
                    Some(Ok(())) => {
                        g.durable_at = height;
                        Ok(())
                    }
                    Some(Err(e)) => {
                        g.since_checkpoint = g.since_checkpoint.max(g.checkpoint_every);
                        g.commit_failed = true;
                        Err(e)
                    }
                }
            }
            Err(e) => {
                g.uncommitted = g.uncommitted.max(COMMIT_BLOCKS);
                g.commit_failed = true;
                if checkpoint {
                    g.since_checkpoint = g.since_checkpoint.max(g.checkpoint_every);
                }
                Err(e)
            }
        }
    }

    /// Finishes the write in flight if it is done, without waiting: so the head lets go of what
    /// it wrote soon after, not a whole commit later.
    fn reap_commit(&self) -> Result<(), String> {
        let mut in_flight = crate::lock(&self.committing);
        if in_flight.as_ref().is_some_and(|w| w.pending.is_finished()) {
            self.finish_commit(&mut in_flight)?;
        }
        Ok(())
    }

    /// Waits for the write of the state in flight, if any (tests: what the store holds is then
    /// settled).
    pub fn wait_for_commit(&self) -> Result<(), String> {
        let mut in_flight = crate::lock(&self.committing);
        self.finish_commit(&mut in_flight)
    }

    /// What opening found: the stored state's height and the blocks replayed after it.
    pub fn opened(&self) -> Opened {
        self.opened
    }

    /// The height of the first block this node holds (1 unless it joined by state sync or
    /// prunes old blocks; blocks below it are answered as not held).
    pub fn first_block(&self) -> u64 {
        self.lock().store.first()
    }

    /// The highest block with a finality certificate of its own, and that certificate: where
    /// consensus starts when its own storage is new but the block log is not (a node that
    /// joined by state sync, or whose ledger came from elsewhere).
    pub fn certified_tip(&self) -> Result<Option<(Block, Vec<u8>)>, String> {
        let certified = self.lock().certified;
        if certified == 0 {
            return Ok(None);
        }
        self.block(certified)
    }

    /// Every entry of the state as last committed to the store, at its height (a joining node's
    /// copy): one consistent view, read while the chain goes on.
    pub fn state_snapshot(&self) -> Result<Box<dyn archipel_ledger::store::StateSnapshot>, String> {
        let states = self.lock().states.clone();
        states.snapshot().map_err(|e| e.to_string())
    }

    /// Keeps only the last `blocks` finalized blocks in the log (and never drops the block the
    /// stored state is at): older ones are dropped once as many as are kept have piled up, so
    /// the rewrite costs O(1) per block. Without it the node keeps every block (an archive).
    pub fn with_retention(self, blocks: u64) -> Self {
        self.lock().retain = Some(blocks.max(1));
        self
    }

    /// Drops the blocks below what [`Chain::with_retention`] keeps, when due: the kept blocks are
    /// written to a new log without the chain's lock (the applier, the only appender, is the
    /// caller), which then takes its place under it.
    fn prune_outside_lock(&self) -> Result<(), String> {
        let job = {
            let g = self.lock();
            let Some(retain) = g.retain else { return Ok(()) };
            // Blocks above the durable state stay: a power cut replays them.
            let keep_from = g.head.height.saturating_sub(retain).min(g.durable_at);
            if keep_from < g.store.first().saturating_add(retain.max(COMMIT_BLOCKS)) {
                return Ok(());
            }
            g.store.prune_plan(keep_from)
        };
        let Some(job) = job else { return Ok(()) };
        let pruned = job()?;
        let first = self.lock().store.prune_finish(pruned)?;
        tracing::info!(first, "block log pruned: older blocks dropped as the retention setting says");
        Ok(())
    }

    /// Commits the state at heights `phase` modulo [`COMMIT_BLOCKS`] and checkpoints at heights
    /// `phase` modulo the checkpoint interval, instead of at multiples of them (phase 0). Nodes
    /// would otherwise commit and checkpoint at the same heights, and both are bursts of work (at
    /// 10^6 entries the load's slowest transfers came in stalls of all 24 clients at once, one per
    /// 32 blocks, measured by `bench state`): with phases spread (the node's key picks it), a
    /// block's validators do not all pay for a commit in the same block, and a quorum is not held
    /// up. The phase is one of heights, not of blocks since opening or since the last checkpoint
    /// (whose commit comes off the phase): nodes restarted together, or whose checkpoints once
    /// fell together, stay spread. With the default interval (a multiple of [`COMMIT_BLOCKS`]) a
    /// node's checkpoints fall on its commit heights.
    pub fn with_commit_phase(self, phase: u64) -> Self {
        self.lock().phase = phase;
        self
    }

    /// Checkpoints every `blocks` finalized blocks instead of [`CHECKPOINT_BLOCKS`] (the
    /// simulator crashes nodes between checkpoints).
    pub fn with_checkpoint_every(self, blocks: u64) -> Self {
        self.lock().checkpoint_every = blocks.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        crate::lock(&self.inner)
    }

    /// The genesis state.
    pub fn genesis_state(&self) -> State {
        self.genesis_state.clone()
    }

    /// The genesis header (height 0).
    pub fn genesis(&self) -> BlockHeader {
        self.genesis
    }

    /// Whether the applier keeps this chain up with consensus (a stall means [`Chain::head`] is
    /// stale).
    pub fn applier(&self) -> &ApplierHealth {
        &self.applier
    }

    /// Starts making every finalized block recorded so far durable in the block log; answers
    /// once it is (outside the lock).
    pub fn sync_blocks(&self) -> Synced {
        self.lock().store.sync()
    }

    /// The last finalized header.
    pub fn head(&self) -> BlockHeader {
        self.lock().head
    }

    /// Reads the finalized state.
    pub fn with_state<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock().state)
    }

    /// Number of transactions waiting in the mempool.
    pub fn mempool_len(&self) -> usize {
        self.lock().mempool.len()
    }

    /// (waiting in the mempool, of which behind a missing nonce).
    pub fn mempool_counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.mempool.len(), g.mempool.gapped_len())
    }

    /// Up to `max` transactions waiting in the mempool.
    pub fn mempool_snapshot(&self, max: usize) -> Vec<SignedTransaction> {
        self.lock().mempool.all(max)
    }

    /// Admits a transaction into the mempool (judged against the finalized state and the
    /// account's other waiting transactions) at `now_ms` (this node's clock: mempool entries
    /// expire by it).
    pub fn submit(&self, stx: SignedTransaction, encoded_len: usize, now_ms: u64) -> Result<Hash, MempoolError> {
        self.submit_many(vec![(stx, encoded_len)], now_ms).pop().expect("one answer per transaction")
    }

    /// Admits transactions (each with its encoded length) into the mempool at `now_ms`; one
    /// answer per transaction, in order. They are admitted [`SUBMIT_CHUNK`] at a time: signatures
    /// are checked as one batch per chunk, outside the lock, and only for transactions not
    /// already known here that pass the checks costing no signature ([`State::precheck`]: size,
    /// nonce window, fee, a transfer's amount, a registry change's rules; and the account's
    /// mempool rules, [`archipel_ledger::Mempool::prechecker`]: nonce taken, quota, entries behind
    /// a gap, cumulative spend, each as though the earlier transactions that passed were in the
    /// pool). Each chunk sees the pool as the chunks before it left it, so a batch of transactions
    /// that would be refused anyway (over-spending, far behind a gap) costs the node no
    /// verification, and forged ones from an account that cannot pay none either.
    pub fn submit_many(&self, items: Vec<(SignedTransaction, usize)>, now_ms: u64) -> Vec<Result<Hash, MempoolError>> {
        let mut out = Vec::with_capacity(items.len());
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let chunk: Vec<_> = items.by_ref().take(SUBMIT_CHUNK).collect();
            out.extend(self.submit_chunk(chunk, now_ms));
        }
        out
    }

    /// [`Chain::submit_many`] for one chunk.
    fn submit_chunk(&self, items: Vec<(SignedTransaction, usize)>, now_ms: u64) -> Vec<Result<Hash, MempoolError>> {
        let hashes: Vec<Hash> = items.iter().map(|(t, _)| t.hash()).collect();
        // Per transaction: `None` when known here (nothing to check), else the cheap checks' verdict.
        let prechecked: Vec<Option<Result<(), MempoolError>>> = {
            let mut g = self.lock();
            // What insertion would drop first, so the prechecker judges the pool insertion sees.
            g.mempool.expire(now_ms);
            let g = g;
            // Each judged as though the chunk's earlier ones that passed were in the pool.
            let mut pool = g.mempool.prechecker(&g.state);
            items
                .iter()
                .zip(&hashes)
                .map(|((t, len), h)| {
                    if g.mempool.contains(h) || g.uncommitted_txs.contains_key(h) {
                        return None;
                    }
                    let r = g.state.precheck(t, *len).map_err(MempoolError::from).and_then(|()| pool.check(h, t));
                    // A used nonce may be this very transaction, final already: known. (The
                    // store's index is read only then, not for every submission.)
                    if matches!(&r, Err(e) if e.code() == "replayed_nonce") && g.final_tx(h).is_some() {
                        return None;
                    }
                    Some(r)
                })
                .collect()
        };
        let fresh: Vec<&SignedTransaction> =
            items.iter().zip(&prechecked).filter(|(_, p)| matches!(p, Some(Ok(())))).map(|((t, _), _)| t).collect();
        // Each transaction's own verdict, by position (`None`: known, not checked): whatever the
        // second lock finds, no result can move to another transaction.
        let network = self.genesis_state.network();
        #[cfg(test)]
        tests::VERIFIED.with(|v| v.set(v.get() + fresh.len()));
        let mut checked = verify_each(&fresh, &network).into_iter();
        let signatures: Vec<Option<Result<(), MempoolError>>> = items
            .iter()
            .zip(prechecked)
            .map(|((t, _), p)| {
                p.map(|cheap| {
                    cheap
                        .and_then(|()| checked.next().unwrap_or_else(|| t.verify(&network)).map_err(MempoolError::from))
                })
            })
            .collect();
        #[cfg(test)]
        tests::between_locks(self);
        let mut g = self.lock();
        let inner = &mut *g;
        let mut admitted = false;
        let out = items
            .into_iter()
            .zip(hashes)
            .zip(signatures)
            .map(|(((stx, len), hash), signature)| {
                if inner.uncommitted_txs.contains_key(&hash) {
                    return Ok(hash);
                }
                // Known at the first lock: the same hash is the same signature, checked on its
                // admission.
                if let Some(checked) = signature {
                    checked?;
                }
                let r = inner.mempool.insert_hashed(&inner.state, hash, stx, len, Signatures::AlreadyVerified, now_ms);
                // Finalized and committed between the two locks: known.
                if matches!(&r, Err(e) if e.code() == "replayed_nonce") && inner.final_tx(&hash).is_some() {
                    return Ok(hash);
                }
                admitted |= r.is_ok();
                r
            })
            .collect();
        if admitted {
            for w in inner.mempool_waiters.drain(..) {
                let _ = w.send(());
            }
        }
        out
    }

    /// The nonce `signer`'s next transaction should take: after those of its transactions that
    /// wait in this node's mempool in a run from its finalized nonce (see
    /// [`archipel_ledger::Mempool::next_free_nonce`]).
    pub fn next_free_nonce(&self, signer: &archipel_types::NodeId) -> u64 {
        let g = self.lock();
        g.mempool.next_free_nonce(&g.state, signer)
    }

    /// What this node knows about `hash`.
    pub fn tx_status(&self, hash: &Hash) -> TxStatus {
        let g = self.lock();
        match g.final_tx(hash) {
            Some(loc) => TxStatus::Final(loc),
            None if g.mempool.contains(hash) => TxStatus::Pending,
            None => TxStatus::Unknown,
        }
    }

    /// The location of `hash` if final, or a receiver that fires when it is. A waiter whose
    /// receiver was dropped (its request ended or timed out) is removed when the waiters are
    /// full, before refusing: at most [`MAX_TX_WAITERS`] are kept.
    pub fn watch_tx(&self, hash: Hash) -> TxWatch {
        let mut g = self.lock();
        if let Some(loc) = g.final_tx(&hash) {
            return TxWatch::Final(loc);
        }
        match g.tx_waiters.add(hash) {
            Some(rx) => TxWatch::Wait(rx),
            None => TxWatch::Busy,
        }
    }

    /// Number of `?wait=final` waiters held (including ones whose request already ended and that
    /// the next [`Chain::watch_tx`] at capacity removes).
    pub fn tx_waiters(&self) -> usize {
        self.lock().tx_waiters.count
    }

    /// `Ok(head height)` if the head is above `height`, or a receiver that fires at the next
    /// finalized block.
    pub fn watch_height(&self, height: u64) -> Result<u64, oneshot::Receiver<u64>> {
        let mut g = self.lock();
        if g.head.height > height {
            return Ok(g.head.height);
        }
        let (tx, rx) = oneshot::channel();
        g.block_waiters.push(tx);
        Err(rx)
    }

    /// A receiver that fires when the next transaction enters the mempool.
    pub fn next_submission(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut g = self.lock();
        // An idle leader asks again every few hundred ms and drops the last receiver unfired: with
        // no transaction for hours, those would pile up.
        g.mempool_waiters.retain(|w| !w.is_canceled());
        g.mempool_waiters.push(tx);
        rx
    }

    /// The header and state after block `hash`, if it is the head, the genesis or a block this
    /// node built or verified that is not final yet.
    fn after(&self, g: &Inner, hash: &Hash) -> Option<(BlockHeader, State)> {
        if *hash == g.head.hash() {
            return Some((g.head, g.state.clone()));
        }
        if g.head.height == 0 && *hash == self.genesis.hash() {
            return Some((self.genesis, self.genesis_state.clone()));
        }
        g.pending.get(hash).map(|e| (e.block.header, e.state.clone()))
    }

    /// True when the state after block `hash` is known here.
    pub fn knows(&self, hash: &Hash) -> bool {
        let g = self.lock();
        *hash == g.head.hash() || (g.head.height == 0 && *hash == self.genesis.hash()) || g.pending.contains_key(hash)
    }

    /// Builds a block on `parent` at time `now_ms` from the liveness changes `liveness` plans on
    /// the parent's state and the mempool; `None` if the parent is unknown here or the state store
    /// failed (logged; the node's health reports the store once a finalized block cannot apply).
    pub fn build(
        &self,
        parent: &Hash,
        now_ms: u64,
        liveness: impl FnOnce(&State) -> Vec<LivenessChange>,
    ) -> Option<Block> {
        let (header, state, candidates) = {
            let mut g = self.lock();
            g.mempool.expire(now_ms);
            let (header, state) = self.after(&g, parent)?;
            let candidates = g.mempool.candidates(&state, state.params().max_block_txs as usize);
            (header, state, candidates)
        };
        // A protocol version this build does not implement is in force from this height: build
        // nothing (the view times out; the chain waits for upgraded validators).
        if let Err(e) = state.check_runnable(header.height + 1) {
            tracing::warn!(height = header.height + 1, error = %e, "not proposing");
            return None;
        }
        let changes = liveness(&state);
        // Mempool transactions were verified on admission.
        let p = match propose(&state, &header, now_ms, changes, candidates, Signatures::AlreadyVerified) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot build a block: the state store failed");
                return None;
            }
        };
        let mut g = self.lock();
        for (hash, e) in &p.dropped {
            tracing::debug!(tx = %hash.short(), error = %e, "dropping a transaction that no longer applies");
            g.mempool.remove(hash);
        }
        g.pending.insert(p.block.hash(), Executed { block: p.block.clone(), state: p.state, outcome: p.outcome });
        Some(p.block)
    }

    /// Checks `block` (from another validator) against its parent at time `now_ms`, and its
    /// liveness changes with `judge` (what this validator heard itself); on success remembers the
    /// resulting state so children can build on it.
    pub fn verify(
        &self,
        block: &Block,
        now_ms: u64,
        judge: impl Fn(&LivenessChange) -> Result<(), String>,
    ) -> Result<(), String> {
        let h = &block.header;
        let drift = self.genesis_state.params().max_clock_drift_ms;
        if h.timestamp_ms > now_ms.saturating_add(drift) {
            return Err(format!(
                "block {} is {} ms in the future (at most {drift} ms allowed)",
                h.height,
                h.timestamp_ms - now_ms
            ));
        }
        for change in &block.liveness {
            judge(change).map_err(|e| format!("block {}: {e}", h.height))?;
        }
        let (parent, mut state) = {
            let g = self.lock();
            if g.pending.contains_key(&block.hash()) {
                return Ok(());
            }
            let Some(p) = self.after(&g, &h.parent) else {
                return Err(format!("block {}: parent {} is not known here", h.height, h.parent.short()));
            };
            // Signatures of transactions already in our mempool were checked on admission.
            let unchecked: Vec<&SignedTransaction> =
                block.txs.iter().filter(|t| !g.mempool.contains(&t.hash())).collect();
            drop(g);
            verify_all(&unchecked, &self.genesis_state.network())
                .map_err(|(_, e)| format!("block {}: {e}", h.height))?;
            p
        };
        let outcome = execute(&mut state, &parent, block, Signatures::AlreadyVerified).map_err(|e| e.to_string())?;
        self.lock().pending.insert(block.hash(), Executed { block: block.clone(), state, outcome });
        Ok(())
    }

    /// Records a finalized block (delivered in height order; repeats are ignored).
    pub fn finalize(&self, block: Block, certificate: Vec<u8>) -> Result<Option<Finalized>, String> {
        let hash = block.hash();
        self.reap_commit().map_err(|e| format!("block {}: {e}", block.header.height))?;
        let (parent, cached) = {
            let mut g = self.lock();
            if block.header.height <= g.head.height {
                return Ok(None);
            }
            if block.header.height != g.head.height + 1 {
                return Err(format!(
                    "finalized block {} arrived while the head is {}",
                    block.header.height, g.head.height
                ));
            }
            // The store catches up before the head moves on, so a store that cannot be written
            // stalls the applier (which retries) instead of letting memory grow.
            let checkpoint = g.checkpoint_due();
            if checkpoint || g.commit_due() {
                let wait = g.commit_failed;
                drop(g);
                self.commit_outside_lock(wait, checkpoint)
                    .map_err(|e| format!("block {}: {e}", block.header.height))?;
                // A prune that fails leaves the log as it was: the node goes on, and says so.
                if checkpoint && let Err(e) = self.prune_outside_lock() {
                    tracing::warn!(error = %e, "cannot prune the block log; keeping every block for now");
                }
                g = self.lock();
            }
            // A block this node built or verified on the head already has its state.
            let cached = g.pending.remove(&hash).filter(|e| e.block.header.parent == g.head.hash());
            (g.head, cached.map(|e| (e.state, e.outcome)).ok_or_else(|| g.state.clone()))
        };
        // Otherwise (a follower, or a validator catching up) execute it now, checking every
        // signature.
        let (state, outcome) = match cached {
            Ok(done) => done,
            Err(mut state) => {
                let outcome = execute(&mut state, &parent, &block, Signatures::Verify).map_err(|e| e.to_string())?;
                (state, outcome)
            }
        };
        let mut g = self.lock();
        let height = block.header.height;
        if height != g.head.height + 1 {
            return Ok(None); // finalized meanwhile by another path
        }
        let certified = !certificate.is_empty();
        let index = tx_index(&block, outcome.receipts);
        // Never append a block the log already holds (a retry after a failed append, which the
        // log cuts back off, finds it absent again).
        if g.store.height() < height {
            g.store.append(&Record { block: block.to_bytes(), certificate })?;
        }
        if certified {
            g.certified = height;
        }
        g.head = block.header;
        g.state = state;
        // A state executed before the last commit still holds what that commit wrote.
        let committed_at = g.committed_at;
        g.state.forget_committed_through(committed_at);
        g.uncommitted_txs.extend(index.iter().cloned());
        g.uncommitted += 1;
        g.since_checkpoint += 1;
        let inner = &mut *g;
        // Every transaction of the block used its signer's nonce, so pruning its signers by the
        // new nonces also drops the block's transactions from the mempool.
        inner.mempool.prune(&inner.state, block.txs.iter().map(|t| t.tx.signer));
        // A job transaction whose moment passed (a bid after its window) would hold its
        // signer's later ones until it expired.
        inner.mempool.drop_stale_heads(&inner.state);
        for (h, loc) in index {
            if let Some(ws) = inner.tx_waiters.remove(&h) {
                for w in ws {
                    let _ = w.send(loc.clone());
                }
            }
        }
        inner.pending.retain(|_, e| e.block.header.height > height);
        for w in inner.block_waiters.drain(..) {
            let _ = w.send(height);
        }
        Ok(Some(Finalized { block, went_down: outcome.went_down, came_up: outcome.came_up }))
    }

    /// Records the block with header hash `hash` as finalized by `certificate` if this node built
    /// or verified it and it follows the head (the fast path: straight from consensus, before
    /// marshal stores and delivers it). `None` when it does not apply here yet.
    pub fn finalize_known(&self, hash: &Hash, certificate: Vec<u8>) -> Result<Option<Finalized>, String> {
        // The block and its ancestors back to the head, newest first, all executed here.
        let path = {
            let g = self.lock();
            let mut path = Vec::new();
            let mut at = *hash;
            loop {
                let Some(e) = g.pending.get(&at) else { return Ok(None) };
                if e.block.header.height <= g.head.height {
                    return Ok(None);
                }
                path.push(e.block.clone());
                if e.block.header.parent == g.head.hash() {
                    break;
                }
                at = e.block.header.parent;
            }
            path
        };
        // Ancestors are final with it; like marshal's, they carry no certificate of their own.
        let mut last = None;
        let newest = path.len() - 1;
        for (i, block) in path.into_iter().rev().enumerate() {
            let certificate = if i == newest { certificate.clone() } else { Vec::new() };
            last = self.finalize(block, certificate)?;
        }
        Ok(last)
    }

    /// A finalized block and its certificate (read under the lock, decoded outside it).
    pub fn block(&self, height: u64) -> Result<Option<(Block, Vec<u8>)>, String> {
        let (record, max_txs) = {
            let g = self.lock();
            (g.store.get(height)?, g.state.params().max_block_txs as usize)
        };
        let Some(r) = record else { return Ok(None) };
        let b = Block::from_bytes(&r.block, max_txs)?;
        Ok(Some((b, r.certificate)))
    }

    /// The export-format bytes of at most `max_blocks` finalized blocks from `from`, never past
    /// the last certified one, and the height of that last certified block.
    pub fn raw_blocks_from(&self, from: u64, max_blocks: u64) -> Result<(Vec<u8>, u64), String> {
        let (plan, certified) = self.plan_raw_blocks(from, max_blocks, u64::MAX);
        Ok(((plan.read)()?, certified))
    }

    /// A read of the export-format bytes of at most `max_blocks` finalized blocks from `from`
    /// (whole blocks within `max_bytes`, at least one), never past the last certified one, and
    /// the height of that last certified block. One short lock, released before anything is
    /// read: the caller knows the size before it reads, and an export reads the log in such
    /// chunks without holding up consensus.
    pub fn plan_raw_blocks(&self, from: u64, max_blocks: u64, max_bytes: u64) -> (crate::store::RangeRead, u64) {
        let g = self.lock();
        // Below the first block held (pruned, or this node joined above it): nothing, never a
        // range that silently starts later.
        if from < g.store.first() && from > 0 {
            return (crate::store::RangeRead::nothing(from - 1), g.certified);
        }
        let from = from.max(1);
        let to = from.saturating_add(max_blocks.max(1) - 1).min(g.certified);
        if from > to {
            return (crate::store::RangeRead::nothing(from - 1), g.certified);
        }
        (g.store.raw_range_reader(from, to, max_bytes), g.certified)
    }

    /// The headers after `height` up to the first block with a certificate of its own, and that
    /// certificate: what shows block `height` final. `None` while no certificate covers it yet.
    fn finality_of(&self, height: u64) -> Result<Option<Finality>, String> {
        let certified = self.lock().certified;
        if height > certified {
            return Ok(None);
        }
        let mut links = Vec::new();
        for h in height..=certified {
            let Some((block, cert)) = self.block(h)? else { return Ok(None) };
            if h > height {
                links.push(block.header);
            }
            if !cert.is_empty() {
                return Ok(Some((links, cert)));
            }
        }
        Ok(None)
    }

    /// A proof that `hash` is in a finalized block, with what shows that block final (the
    /// headers up to the next certified block, and its certificate).
    pub fn prove_tx(&self, hash: &Hash) -> Result<Proven<TxProof>, String> {
        let Some(loc) = self.lock().final_tx(hash) else { return Ok(Proven::Unknown) };
        let Some((block, _)) = self.block(loc.height)? else { return Ok(Proven::Unknown) };
        let Some((links, certificate)) = self.finality_of(loc.height)? else { return Ok(Proven::NotYet) };
        let hashes: Vec<Hash> = block.txs.iter().map(SignedTransaction::hash).collect();
        let path = merkle::path(&hashes, loc.index as usize).ok_or("transaction index out of range")?;
        let tx = block.txs[loc.index as usize].clone();
        Ok(Proven::Ready { proof: TxProof { header: block.header, index: loc.index, tx, path }, links, certificate })
    }

    /// A proof of the state entry `key` after the head block — its value, or that it has none —
    /// with what shows the head final (nothing at the genesis, which the genesis file itself
    /// attests).
    pub fn prove_state(&self, key: &StateKey) -> Result<Proven<StateProof>, String> {
        // A copy costs one `Arc` clone per table; the path is walked outside the lock. A value
        // read after a commit moved the store past this copy would not match its path, and a
        // trie bucket read back then would not match the hash the copy kept (an error): either
        // way, ask again.
        let mut attempts = 0;
        let (header, value, path) = loop {
            let (header, state) = {
                let g = self.lock();
                (g.head, g.state.clone())
            };
            attempts += 1;
            let (value, path) = match state.prove(key) {
                Ok(proved) => proved,
                Err(e) if attempts == 3 => return Err(e.to_string()),
                Err(_) => continue,
            };
            let shown = path.verify(&header.state_root, &archipel_ledger::state::state_key_hash(key));
            let matches = match (&shown, &value) {
                (Ok(archipel_ledger::trie::Proven::Present(h)), Some(v)) => *h == archipel_ledger::trie::value_hash(v),
                (Ok(archipel_ledger::trie::Proven::Absent), None) => true,
                _ => false,
            };
            if matches {
                break (header, value, path);
            }
            if attempts == 3 {
                return Err(format!("{key}: the state moved while proving it; retry"));
            }
        };
        let (links, certificate) = match header.height {
            0 => (Vec::new(), Vec::new()),
            h => match self.finality_of(h)? {
                Some(f) => f,
                None => return Ok(Proven::NotYet),
            },
        };
        let proof = StateProof { header, key: key.to_string(), value_hex: value.map(hex::encode), path };
        Ok(Proven::Ready { proof, links, certificate })
    }
}

impl Drop for Chain {
    /// A write of the state in flight is finished before the chain goes: what a restart opens
    /// does not depend on a thread outliving it.
    ///
    /// The state store makes its pending (unflushed) writes durable when it closes, so the block
    /// log is synced first: a chain dropped without [`Chain::close`] (an error on the way out)
    /// must not leave a store durably ahead of the log. Both waits are bounded (a disk that hangs
    /// must not hang the process's exit with it); when either gives up, or the sync fails, the
    /// store is never closed in this process (one handle is leaked), so its pending writes are
    /// never made durable: the next open resumes at the last checkpoint and replays the log.
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + DROP_SYNC_WAIT;
        let wait = || std::thread::sleep(std::time::Duration::from_millis(2));
        let mut in_flight = self.committing.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        // Asked for first, so it runs while the write finishes: it covers every block appended,
        // so any height the write in flight reaches. (A checkpoint in flight syncs the log
        // itself; only if it fails is a sync asked for below.)
        let mut synced = {
            let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
            let commit_in_flight = in_flight.as_ref().is_some_and(|w| !w.checkpoint);
            (commit_in_flight || inner.committed_at > inner.durable_at).then(|| inner.store.sync())
        };
        while in_flight.as_ref().is_some_and(|w| !w.pending.is_finished()) && std::time::Instant::now() < deadline {
            wait();
        }
        let abandon = |inner: &Inner| std::mem::forget(Arc::clone(&inner.states));
        if in_flight.as_ref().is_some_and(|w| !w.pending.is_finished()) {
            tracing::error!("closing: the last write of the state did not finish in time; its store is left open");
            abandon(self.inner.get_mut().unwrap_or_else(|e| e.into_inner()));
            return;
        }
        // Through `finish_commit`, so what the write committed counts below: a commit finished
        // but not yet reaped leaves the store ahead of the durable state too.
        if let Err(e) = self.finish_commit(&mut in_flight) {
            tracing::warn!(error = %e, "closing: the last write of the state failed");
        }
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        let committed = inner.committed_at;
        if committed <= inner.durable_at {
            return;
        }
        let synced = synced.get_or_insert_with(|| inner.store.sync());
        let answer = loop {
            match synced.try_recv() {
                Ok(Some(answer)) => break Some(answer),
                Ok(None) if std::time::Instant::now() < deadline => wait(),
                Ok(None) => break None,
                Err(_) => break Some(Err("the block log's sync was dropped".into())),
            }
        };
        match answer {
            Some(Ok(synced)) if synced >= committed => return,
            Some(Ok(synced)) => tracing::error!(synced, committed, "closing: the block log is behind the state store"),
            Some(Err(e)) => tracing::error!(error = %e, "closing: the block log could not be synced"),
            None => tracing::error!(committed, "closing: the block log's sync did not answer in time"),
        }
        // Closing the store now would make the state at `committed` durable ahead of the log.
        abandon(inner);
    }
}

/// How long a chain dropped without [`Chain::close`] waits for its last write of the state and
/// the block log's sync, together.
const DROP_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What [`Chain::watch_tx`] found.
#[derive(Debug)]
pub enum TxWatch {
    /// Already final.
    Final(TxLocation),
    /// Fires once it is final (dropping it frees the waiter).
    Wait(oneshot::Receiver<TxLocation>),
    /// [`MAX_TX_WAITERS`] requests already wait: retry later.
    Busy,
}

/// Requests waiting for transactions to become final, with their number.
#[derive(Default)]
struct TxWaiters {
    by_tx: HashMap<Hash, Vec<oneshot::Sender<TxLocation>>>,
    count: usize,
}

impl TxWaiters {
    /// A new waiter for `hash`; at capacity, first drops the waiters whose request ended, and
    /// `None` if that frees nothing.
    fn add(&mut self, hash: Hash) -> Option<oneshot::Receiver<TxLocation>> {
        if self.count >= MAX_TX_WAITERS {
            self.by_tx.retain(|_, ws| {
                ws.retain(|w| !w.is_canceled());
                !ws.is_empty()
            });
            self.count = self.by_tx.values().map(Vec::len).sum();
            if self.count >= MAX_TX_WAITERS {
                return None;
            }
        }
        let (tx, rx) = oneshot::channel();
        self.by_tx.entry(hash).or_default().push(tx);
        self.count += 1;
        Some(rx)
    }

    /// Takes the waiters of `hash` (it became final).
    fn remove(&mut self, hash: &Hash) -> Option<Vec<oneshot::Sender<TxLocation>>> {
        let ws = self.by_tx.remove(hash)?;
        self.count -= ws.len();
        Some(ws)
    }
}

/// Headers linking a block to a certified descendant, and that descendant's certificate.
type Finality = (Vec<BlockHeader>, Vec<u8>);

/// A proof and what shows its block final.
#[derive(Clone, Debug)]
pub enum Proven<P> {
    /// The proof, the headers from its block's child up to a certified block, and that block's
    /// finality certificate.
    Ready {
        /// The Merkle proof.
        proof: P,
        /// Headers linking the proof's block to the certified one (empty if it is certified).
        links: Vec<BlockHeader>,
        /// The certificate.
        certificate: Vec<u8>,
    },
    /// Final, but the certificate that covers it has not arrived yet: retry shortly.
    NotYet,
    /// Not known here.
    Unknown,
}

/// Records where each transaction of `block` is; returns their hashes in block order.
/// Each transaction of `block` with where it is and what it did.
fn tx_index(block: &Block, receipts: Vec<Receipt>) -> Vec<(Hash, TxLocation)> {
    block
        .txs
        .iter()
        .zip(receipts)
        .enumerate()
        .map(|(i, (t, receipt))| {
            let loc = TxLocation {
                height: block.header.height,
                index: i as u32,
                block_time_ms: block.header.timestamp_ms,
                receipt,
            };
            (t.hash(), loc)
        })
        .collect()
}

impl TxLocation {
    /// The bytes the state store keeps for it.
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The writes of what `state` changed since its last commit, with `txs`, the transactions of
/// those blocks.
fn commit_writes(state: &mut State, txs: &HashMap<Hash, TxLocation>) -> Result<Commit, String> {
    let mut c = state.commit().map_err(|e| format!("the state store failed: {e}"))?;
    c.txs = txs.iter().map(|(h, loc)| (*h, loc.encode())).collect();
    Ok(c)
}

/// A write of the state in flight (see [`Chain::commit_outside_lock`]).
struct InFlight {
    pending: Pending,
    /// It also makes the state durable.
    checkpoint: bool,
}

/// A write of the state on its thread, or done already (no thread could be started).
enum Pending {
    Thread(std::thread::JoinHandle<Result<Written, String>>),
    Done(Result<Written, String>),
}

impl Pending {
    fn is_finished(&self) -> bool {
        match self {
            Pending::Thread(handle) => handle.is_finished(),
            Pending::Done(_) => true,
        }
    }

    /// What the write did, waiting for its thread.
    fn wait(self) -> Result<Written, String> {
        match self {
            Pending::Thread(handle) => {
                handle.join().unwrap_or_else(|_| Err("the state commit's thread panicked".into()))
            }
            Pending::Done(written) => written,
        }
    }
}

/// What a write of the state in flight did: the height it committed, and for a checkpoint
/// whether the log's sync and the store's flush after it succeeded.
struct Written {
    height: u64,
    durable: Option<Result<(), String>>,
}

/// Writes `c` to `states` without a flush.
fn write(states: &dyn StateStore, c: &Commit) -> Result<(), String> {
    states.commit(c, false).map_err(|e| format!("the state store failed: {e}"))
}

impl Inner {
    /// Commits the head state to the store (see [`COMMIT_BLOCKS`]).
    fn commit(&mut self) -> Result<(), String> {
        if self.uncommitted > 0 || self.committed_at < self.head.height {
            let c = commit_writes(&mut self.state, &self.uncommitted_txs)?;
            write(&*self.states, &c)?;
            self.uncommitted = 0;
            self.committed_through(self.head.height);
        }
        Ok(())
    }

    /// Lets go of what the store now holds: the state at `height`, the head's or (a write that
    /// finished after the head moved on) an ancestor's.
    fn committed_through(&mut self, height: u64) {
        if self.head.height == height {
            self.state.committed();
        } else {
            self.state.forget_committed_through(height);
        }
        self.uncommitted_txs.retain(|_, loc| loc.height > height);
        self.committed_at = height;
        self.commit_failed = false;
    }

    /// Where a finalized transaction is: in a block not committed yet, or in the store's index
    /// (`None` if the store cannot say: logged).
    fn final_tx(&self, hash: &Hash) -> Option<TxLocation> {
        if let Some(loc) = self.uncommitted_txs.get(hash) {
            return Some(loc.clone());
        }
        match self.states.tx(hash) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes)
                .map_err(
                    |e| tracing::error!(tx = %hash.short(), error = %e, "a transaction index entry does not decode"),
                )
                .ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::error!(tx = %hash.short(), error = %e, "cannot read the transaction index");
                None
            }
        }
    }

    /// Whether the state at the head is to be committed before the next block is appended: at
    /// the heights of this node's phase, and whenever [`COMMIT_BLOCKS`] are waiting (after a
    /// failed write, at once).
    fn commit_due(&self) -> bool {
        self.uncommitted >= COMMIT_BLOCKS
            || self.uncommitted > 0 && self.head.height % COMMIT_BLOCKS == self.phase % COMMIT_BLOCKS
    }

    /// Whether the head is to be made durable before the next block is appended: at the heights
    /// of this node's phase. (Heights come one at a time, so every interval holds one of them;
    /// the count is a safety net, not a second schedule.)
    fn checkpoint_due(&self) -> bool {
        self.since_checkpoint >= self.checkpoint_every
            || self.since_checkpoint > 0
                && self.head.height % self.checkpoint_every == self.phase % self.checkpoint_every
    }

    /// Makes the finalized state durable: the head committed, the block log synced (waiting for
    /// it), then the state store flushed, so the store is never durably ahead of the log.
    fn checkpoint(&mut self) -> Result<(), String> {
        self.commit()?;
        let synced = futures::executor::block_on(self.store.sync())
            .map_err(|_| "the block log's sync was dropped".to_string())??;
        if synced < self.head.height {
            return Err(format!("the block log synced to {synced}, below the head {}", self.head.height));
        }
        self.states.flush().map_err(|e| format!("the state store failed: {e}"))?;
        self.since_checkpoint = 0;
        self.durable_at = self.head.height;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use archipel_crypto::Identity;
    use archipel_ledger::{GenesisState, Payload, Transaction};

    fn transfer(from: u64, nonce: u64) -> SignedTransaction {
        let id = Identity::from_seed(from);
        let to = Identity::from_seed(99).node_id();
        Transaction { signer: id.node_id(), nonce, payload: Payload::Transfer { to, amount_micro: 1 } }
            .sign(&id, &archipel_ledger::Hash::ZERO)
    }

    /// What a test runs between the two locks of `submit_many`.
    type Hook = Box<dyn FnOnce(&Chain)>;

    thread_local! {
        /// Runs once in the next `submit_many` on this thread, between its two locks.
        static BETWEEN_LOCKS: std::cell::RefCell<Option<Hook>> = const { std::cell::RefCell::new(None) };
    }

    thread_local! {
        /// Signatures `submit_many` verified on this thread.
        pub(super) static VERIFIED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn verified_by(f: impl FnOnce()) -> usize {
        let before = VERIFIED.with(|v| v.get());
        f();
        VERIFIED.with(|v| v.get()) - before
    }

    #[test]
    fn a_flood_the_mempool_refuses_costs_only_the_signatures_of_what_it_admits() {
        let c = chain();
        // 1,023 transfers behind a missing nonce 0: 16 may wait, the rest are refused by the
        // mempool's rules, which the chunks after the first see before any signature.
        let flood: Vec<_> = (1..=1_023).map(|n| (transfer(0, n), 100)).collect();
        let mut out = Vec::new();
        let verified = verified_by(|| out = c.submit_many(flood, 0));
        assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 16);
        assert!(out[16..].iter().all(|r| r.is_err()), "{:?}", &out[16..20]);
        assert_eq!(verified, 16, "signatures verified for a flood of 1,023");
        // An honest batch of contiguous nonces is admitted whole, over several chunks.
        let honest: Vec<_> = (0..200).map(|n| (transfer(1, n), 100)).collect();
        let verified = verified_by(|| out = c.submit_many(honest, 0));
        assert!(out.iter().all(Result::is_ok), "{:?}", out.iter().find(|r| r.is_err()));
        assert_eq!(verified, 200);
    }

    /// The test hook `submit_many` calls between its two locks.
    pub(super) fn between_locks(chain: &Chain) {
        if let Some(hook) = BETWEEN_LOCKS.with(|h| h.borrow_mut().take()) {
            hook(chain);
        }
    }

    /// A genesis with accounts 0, 1 and 2 holding `balance_micro` each.
    fn three_accounts(balance_micro: u64) -> State {
        let accounts = (0..3).map(|i| (Identity::from_seed(i).node_id(), balance_micro)).collect();
        State::genesis(GenesisState { accounts, ..GenesisState::default() })
    }

    fn chain() -> Chain {
        let state = three_accounts(1_000);
        Chain::open(state, Box::new(MemoryStore::default())).unwrap()
    }

    #[test]
    fn a_batch_is_admitted_item_by_item() {
        let c = chain();
        let mut forged = transfer(1, 0);
        forged.signature[3] ^= 1;
        let good = transfer(0, 0);
        let items =
            vec![(good.clone(), 100), (forged, 100), (transfer(2, 0), 100), (good.clone(), 100), (transfer(7, 0), 100)];
        let out = c.submit_many(items, 0);
        assert_eq!(out[0], Ok(good.hash()));
        assert!(matches!(&out[1], Err(e) if e.code() == "bad_signature"), "{:?}", out[1]);
        assert!(out[2].is_ok());
        assert_eq!(out[3], Ok(good.hash()), "a repeat is not an error");
        assert!(matches!(&out[4], Err(e) if e.code() == "insufficient_funds"), "{:?}", out[4]);
        assert_eq!(c.mempool_len(), 2);
        // Nothing known is checked twice; a known transaction is still answered.
        assert_eq!(c.submit(good.clone(), 100, 0), Ok(good.hash()));
    }

    #[test]
    fn waiters_for_a_submission_dropped_unfired_do_not_pile_up() {
        let c = chain();
        for _ in 0..1_000 {
            drop(c.next_submission());
        }
        let mut kept = c.next_submission();
        assert!(c.lock().mempool_waiters.len() <= 2, "{} waiters kept", c.lock().mempool_waiters.len());
        assert!(matches!(kept.try_recv(), Ok(None)), "nothing submitted yet");
        c.submit(transfer(0, 0), 100, 0).unwrap();
        assert!(matches!(kept.try_recv(), Ok(Some(()))), "the live waiter still fires");
    }

    #[test]
    fn cheap_checks_come_before_signatures() {
        let c = chain();
        c.submit(transfer(0, 0), 100, 0).unwrap();
        let block = c.build(&c.genesis().hash(), 1_000, |_| Vec::new()).unwrap();
        c.finalize_known(&block.hash(), vec![1]).unwrap().expect("finalized");
        let forged = |mut t: SignedTransaction| {
            t.signature[3] ^= 1;
            t
        };
        // Forged signatures on transactions that fail a check needing no signature are answered
        // with that check: their signatures are never verified.
        let items = vec![
            (forged(transfer(7, 0)), 100),     // an account that cannot pay the fee
            (forged(transfer(0, 0)), 100),     // a used nonce
            (forged(transfer(1, 5_000)), 100), // a nonce too far ahead
            (forged(transfer(1, 0)), 100_000), // too large
            (transfer(2, 0), 100),
            (forged(transfer(1, 0)), 100), // passes the cheap checks: its signature is checked
        ];
        let mut answers = Vec::new();
        let verified = verified_by(|| answers = c.submit_many(items, 0));
        assert_eq!(verified, 2, "only the two that pass the cheap checks have their signatures verified");
        let codes: Vec<&str> = answers.iter().map(|r| r.as_ref().map_or_else(|e| e.code(), |_| "ok")).collect();
        assert_eq!(
            codes,
            ["insufficient_funds", "replayed_nonce", "nonce_too_far_ahead", "too_large", "ok", "bad_signature"]
        );
        assert_eq!(c.mempool_len(), 1);
    }

    #[test]
    fn a_transaction_finalized_between_the_two_locks_shifts_no_signature_result() {
        let c = chain();
        let first = transfer(0, 0);
        let mut forged = transfer(1, 0);
        forged.signature[3] ^= 1;
        let last = transfer(2, 0);
        // While the batch's signatures are checked, `first` arrives by another path and is
        // finalized: the second lock finds it final.
        let early = first.clone();
        BETWEEN_LOCKS.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |c: &Chain| {
                c.submit(early, 100, 0).unwrap();
                let block = c.build(&c.genesis().hash(), 1_000, |_| Vec::new()).unwrap();
                c.finalize_known(&block.hash(), vec![1]).unwrap().expect("finalized");
            }))
        });
        let out = c.submit_many(vec![(first.clone(), 100), (forged.clone(), 100), (last.clone(), 100)], 0);
        assert_eq!(out[0], Ok(first.hash()), "final already");
        assert!(matches!(&out[1], Err(e) if e.code() == "bad_signature"), "a forged signature: {:?}", out[1]);
        assert_eq!(out[2], Ok(last.hash()), "its own signature is good");
        assert_eq!(c.tx_status(&forged.hash()), TxStatus::Unknown);
        assert_eq!(c.mempool_len(), 1);
    }

    /// A chain on `blocks` and `states` that finalized `n` blocks of one transfer each, checkpointing
    /// every 4; the transfers.
    fn run_blocks(blocks: &MemoryStore, states: &archipel_ledger::store::MemoryStore, n: u64) -> (Chain, Vec<Hash>) {
        run_blocks_every(blocks, states, n, 4)
    }

    fn run_blocks_every(
        blocks: &MemoryStore,
        states: &archipel_ledger::store::MemoryStore,
        n: u64,
        checkpoint: u64,
    ) -> (Chain, Vec<Hash>) {
        let genesis = three_accounts(1_000);
        let c = Chain::open_with(genesis, Box::new(blocks.clone()), Arc::new(states.clone()))
            .unwrap()
            .with_checkpoint_every(checkpoint);
        let mut txs = Vec::new();
        for _ in 0..n {
            let head = c.head();
            let t = transfer(0, head.height);
            let now = 1_000 * (head.height + 1);
            c.submit(t.clone(), 100, now).unwrap();
            let block = c.build(&head.hash(), now, |_| Vec::new()).unwrap();
            assert_eq!(block.txs.len(), 1, "block {}", head.height + 1);
            c.finalize_known(&block.hash(), vec![1]).unwrap().expect("finalized");
            txs.push(t.hash());
        }
        (c, txs)
    }

    /// A state store whose states keep their tries as buckets two levels down: the chain's
    /// blocks then read leaves back from the store on almost every path, also while blocks are
    /// executed on states not committed yet.
    fn small_buckets() -> archipel_ledger::store::MemoryStore {
        archipel_ledger::store::MemoryStore::with_bucket_depth(2)
    }

    fn reopen(blocks: &MemoryStore, states: &archipel_ledger::store::MemoryStore) -> Chain {
        let genesis = three_accounts(1_000);
        Chain::open_with(genesis, Box::new(blocks.clone()), Arc::new(states.clone())).unwrap()
    }

    /// Finalizes the next block on `c`'s head, with account 0's next transfer (its nonce is the
    /// head's height) in it.
    fn finalize_a_transfer_of_account_0(c: &Chain) {
        let head = c.head();
        let now = 1_000 * (head.height + 1);
        c.submit(transfer(0, head.height), 100, now).unwrap();
        let block = c.build(&head.hash(), now, |_| Vec::new()).unwrap();
        c.finalize_known(&block.hash(), vec![1]).unwrap().expect("finalized");
    }

    #[test]
    fn pruning_keeps_every_block_above_the_last_durable_state() {
        // Commits every 32 blocks, checkpoints every 64: the stored state is often ahead of the
        // durable one, and a power cut reopens at the durable one, replaying the blocks above it.
        // A prune runs as a checkpoint starts, so before that checkpoint is durable.
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        let store = Arc::new(Flaky { inner: states.clone(), ..Flaky::default() });
        let c = Chain::open_with(three_accounts(1_000), Box::new(blocks.clone()), store.clone())
            .unwrap()
            .with_checkpoint_every(2 * COMMIT_BLOCKS)
            .with_retention(8);
        let (mut firsts, mut ahead) = (Vec::new(), 0);
        let check = |c: &Chain| {
            let g = c.lock();
            let first = g.store.first();
            assert!(
                first == 1 || first <= g.durable_at,
                "block {first} is the first kept, the durable state is at {}",
                g.durable_at
            );
            (first, g.committed_at > g.durable_at)
        };
        for _ in 0..10 * COMMIT_BLOCKS {
            finalize_a_transfer_of_account_0(&c);
            let (first, is_ahead) = check(&c);
            ahead += usize::from(is_ahead);
            if firsts.last() != Some(&first) {
                firsts.push(first);
            }
        }
        assert!(firsts.len() >= 3, "pruned again and again: {firsts:?}");
        assert!(ahead > 0, "the stored state was never ahead of the durable one: the test shows nothing");
        // The power cut comes after the next checkpoint started (and pruned) but before it was
        // durable: its flush fails. The chain reopens at the last durable state, 64 blocks back,
        // and replays every synced block above it, which must all still be in the log.
        let durable = c.lock().durable_at;
        store.fail_flush.store(true, std::sync::atomic::Ordering::SeqCst);
        finalize_a_transfer_of_account_0(&c);
        the_write_in_flight_ended(&c, "the checkpoint never ended");
        assert_eq!(store.failed_flushes.load(std::sync::atomic::Ordering::SeqCst), 1, "the checkpoint's flush failed");
        let (first, _) = check(&c);
        assert!(first > firsts[firsts.len() - 1], "the checkpoint pruned the log");
        let head = c.head();
        std::mem::forget(c);
        let synced = blocks.crash();
        states.crash();
        assert!(synced > durable, "the log is synced to {synced}, not above the durable state at {durable}");
        let c = reopen(&blocks, &states);
        assert_eq!(c.opened().state_height, durable, "reopened at the last durable state");
        assert_eq!(c.opened().replayed, synced - durable);
        assert!(c.head().height == synced && synced <= head.height);
        assert_eq!(c.with_state(State::rebuilt_root), c.head().state_root);
    }

    #[test]
    fn a_retention_setting_keeps_the_last_blocks_and_the_stored_states_block() {
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        let genesis = three_accounts(1_000);
        let c = Chain::open_with(genesis, Box::new(blocks.clone()), Arc::new(states.clone()))
            .unwrap()
            .with_checkpoint_every(8)
            .with_retention(40);
        let mut firsts = Vec::new();
        for _ in 0..300 {
            finalize_a_transfer_of_account_0(&c);
            let first = c.first_block();
            assert!(c.head().height - first >= 40 || first == 1, "at least the last 40 blocks stay");
            let committed = c.lock().committed_at;
            assert!(
                first == 1 || first <= committed,
                "the stored state's block stays: first {first}, committed at {committed}"
            );
            if firsts.last() != Some(&first) {
                firsts.push(first);
            }
        }
        assert!(firsts.len() >= 3, "pruned again and again: {firsts:?}");
        assert!(c.head().height - c.first_block() <= 40 + 40 + 8 + COMMIT_BLOCKS, "and not much more is kept");
        assert_eq!(c.block(c.first_block() - 1).unwrap().map(|b| b.0.header.height), None);
        let (plan, _) = c.plan_raw_blocks(1, 10, u64::MAX);
        assert_eq!(plan.len, 0, "a range starting below the first block held reads nothing, never a later start");
        // A restart opens from the state it stored; the log still holds that state's block.
        c.close().unwrap();
        drop(c);
        let c = reopen(&blocks, &states);
        assert_eq!(c.opened().replayed, 0);
        assert_eq!(c.head().height, 300);
        assert!(c.first_block() > 1);
    }

    #[test]
    fn a_restart_opens_the_stored_state_and_replays_only_the_blocks_after_it() {
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        let (c, txs) = run_blocks(&blocks, &states, 10);
        let (head, root) = (c.head(), c.with_state(State::state_root));
        // Without a clean shutdown the last two blocks (after the checkpoint at 8) are not in the
        // store; `close` commits them.
        c.close().unwrap();
        drop(c);
        // A clean restart: the store holds all ten blocks, nothing is replayed.
        let c = reopen(&blocks, &states);
        assert_eq!(c.opened(), Opened { state_height: 10, replayed: 0 });
        assert_eq!((c.head(), c.with_state(State::state_root)), (head, root));
        assert!(matches!(c.tx_status(&txs[1]), TxStatus::Final(loc) if loc.height == 2), "the index is stored");
        // Sent again, a transaction final long ago is known, not refused for its used nonce.
        assert_eq!(c.submit(transfer(0, 1), 100, 0), Ok(txs[1]));
        assert!(c.submit(transfer(1, 0), 100, 0).is_ok(), "a fresh one is admitted");
        drop(c);

        // A power cut after ten blocks, the log synced to the end since the last checkpoint
        // (block 8): the store keeps block 8's state, the two blocks after it are replayed.
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        let (c, txs) = run_blocks(&blocks, &states, 10);
        let head = c.head();
        assert_eq!(futures::executor::block_on(c.sync_blocks()).unwrap(), Ok(10));
        drop(c);
        states.crash();
        assert_eq!(blocks.crash(), 10);
        let c = reopen(&blocks, &states);
        assert_eq!(c.opened(), Opened { state_height: 8, replayed: 2 });
        assert_eq!(c.head(), head);
        assert_eq!(c.with_state(State::state_root), head.state_root);
        assert!(
            matches!(c.tx_status(&txs[9]), TxStatus::Final(loc) if loc.height == 10),
            "replayed blocks are indexed"
        );
        assert!(matches!(c.tx_status(&txs[7]), TxStatus::Final(loc) if loc.height == 8));
        drop(c);
        // A power cut with nothing synced since block 8: both keep block 8.
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        drop(run_blocks(&blocks, &states, 10));
        states.crash();
        assert_eq!(blocks.crash(), 8, "a checkpoint syncs the log first");
        let c = reopen(&blocks, &states);
        assert_eq!(c.opened(), Opened { state_height: 8, replayed: 0 });
        assert_eq!(c.with_state(State::state_root), c.head().state_root);
    }

    #[test]
    fn the_head_holds_only_what_came_after_the_last_commit() {
        // Every block is built here and finalized from its cached state, which was forked from
        // the head before the head's commit: what that commit wrote must not stay in memory.
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        let genesis = three_accounts(1_000_000);
        let c = Chain::open_with(genesis, Box::new(blocks), Arc::new(states)).unwrap();
        let sender = Identity::from_seed(0);
        for n in 0..3 * COMMIT_BLOCKS {
            finalize_one_transfer(&c, &sender, n);
        }
        c.wait_for_commit().unwrap();
        let held = c.with_state(State::uncommitted_entries);
        // Exactly the blocks since the last commit (65 to 96), each changing its recipient, plus
        // the sender and the chain position: nothing older, nothing newer forgotten.
        assert_eq!(held, COMMIT_BLOCKS as usize + 2, "entries held after {} blocks", 3 * COMMIT_BLOCKS);
        for n in 0..3 * COMMIT_BLOCKS {
            let to = Identity::from_seed(1_000 + n).node_id();
            assert_eq!(c.with_state(|s| s.account(&to).balance_micro), 1, "recipient of block {}", n + 1);
        }
        assert_eq!(c.with_state(State::rebuilt_root), c.head().state_root);
    }

    /// Builds on the head a block of one transfer from `sender` (at nonce `n`) to a new recipient
    /// (an entry no later block writes again) and finalizes it from its cached state.
    fn finalize_one_transfer(c: &Chain, sender: &Identity, n: u64) {
        let head = c.head();
        let payload = Payload::Transfer { to: Identity::from_seed(1_000 + n).node_id(), amount_micro: 1 };
        let t = Transaction { signer: sender.node_id(), nonce: n, payload }.sign(sender, &Hash::ZERO);
        let now = 1_000 * (head.height + 1);
        c.submit(t, 100, now).unwrap();
        let block = c.build(&head.hash(), now, |_| Vec::new()).unwrap();
        assert_eq!(block.txs.len(), 1, "block {}", head.height + 1);
        c.finalize_known(&block.hash(), vec![1]).unwrap().expect("finalized");
    }

    /// A fresh chain of phase `phase`, checkpointing every `checkpoint_every` blocks, that
    /// finalized `n` blocks of one transfer each; the heights the state was committed at, and
    /// those the block log was synced at (checkpoints).
    fn commits_and_checkpoints(phase: u64, checkpoint_every: u64, n: u64) -> (Chain, Vec<u64>, Vec<u64>) {
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        let c = Chain::open_with(three_accounts(1_000_000), Box::new(blocks.clone()), Arc::new(states.clone()))
            .unwrap()
            .with_checkpoint_every(checkpoint_every)
            .with_commit_phase(phase);
        let sender = Identity::from_seed(0);
        let (mut commits, mut checkpoints) = (Vec::new(), Vec::new());
        for i in 0..n {
            finalize_one_transfer(&c, &sender, i);
            c.wait_for_commit().unwrap();
            let at = states.committed().unwrap().map_or(0, |c| c.height);
            if at > 0 && commits.last() != Some(&at) {
                commits.push(at);
            }
            let synced = blocks.synced_height();
            if synced > 0 && checkpoints.last() != Some(&synced) {
                checkpoints.push(synced);
            }
        }
        (c, commits, checkpoints)
    }

    #[test]
    fn a_commit_phase_moves_the_commits_and_keeps_the_interval() {
        let (c, commits, _) = commits_and_checkpoints(COMMIT_BLOCKS + 5, CHECKPOINT_BLOCKS, 2 * COMMIT_BLOCKS + 8);
        // Phase 5 (of 32): commits at heights 5, 37, 69.
        assert_eq!(commits, [5, 5 + COMMIT_BLOCKS, 5 + 2 * COMMIT_BLOCKS]);
        assert_eq!(c.with_state(State::rebuilt_root), c.head().state_root);
    }

    #[test]
    fn checkpoints_follow_the_phase_and_do_not_move_the_commits() {
        // Phase 37: commits at 5 modulo 32, checkpoints (every 48) at 37 modulo 48. A checkpoint
        // commits the head: were later commits counted from it, they would leave the phase
        // whenever the checkpoint interval is not a multiple of 32, as 48 is not.
        let (_, commits, checkpoints) = commits_and_checkpoints(37, 48, 140);
        assert_eq!(checkpoints, [37, 85, 133], "checkpoints at 37 modulo 48");
        // Commits at 5 modulo 32, plus the checkpoints' own; none counted from a checkpoint.
        assert_eq!(commits, [5, 37, 69, 85, 101, 133]);
        // Two chains of other phases, started together, never checkpoint at the same height.
        let ((_, a_commits, a_checkpoints), (_, b_commits, b_checkpoints)) =
            (commits_and_checkpoints(10, 48, 100), commits_and_checkpoints(11, 48, 100));
        assert_eq!((a_checkpoints.as_slice(), b_checkpoints.as_slice()), ([10, 58].as_slice(), [11, 59].as_slice()));
        assert!(a_commits.iter().all(|h| !b_commits.contains(h)), "commits {a_commits:?} and {b_commits:?} apart");
    }

    #[test]
    fn the_head_keeps_its_trie_in_memory_only_above_the_buckets_and_what_changed_since() {
        // 2,000 accounts, buckets 8 levels down (256 of them): blocks built on the head before
        // its commit must still let go of what the commit wrote, or the whole trie stays.
        let accounts: Vec<_> = (0..2_000).map(|i| (Identity::from_seed(i).node_id(), 1_000_000)).collect();
        let genesis = State::genesis(GenesisState { accounts, ..GenesisState::default() });
        let whole = {
            let mut g = genesis.clone();
            g.seal().unwrap();
            g.memory_trie_nodes()
        };
        let states = archipel_ledger::store::MemoryStore::with_bucket_depth(8);
        let c = Chain::open_with(genesis, Box::new(MemoryStore::default()), Arc::new(states)).unwrap();
        let sender = Identity::from_seed(0);
        let mut most = 0;
        for n in 0..8 * COMMIT_BLOCKS {
            let head = c.head();
            let payload = Payload::Transfer { to: Identity::from_seed(1 + n % 1_999).node_id(), amount_micro: 1 };
            let t = Transaction { signer: sender.node_id(), nonce: n, payload }.sign(&sender, &Hash::ZERO);
            let now = 1_000 * (head.height + 1);
            c.submit(t, 100, now).unwrap();
            let block = c.build(&head.hash(), now, |_| Vec::new()).unwrap();
            c.finalize_known(&block.hash(), vec![1]).unwrap().expect("finalized");
            if n > COMMIT_BLOCKS {
                most = most.max(c.with_state(State::memory_trie_nodes));
            }
        }
        // The top (at most 511 nodes) and the leaves of the buckets changed since the last commit
        // written (up to two commits' worth while one is written in the background: about 70
        // buckets of ~8 entries; about 570 held in all here), far below the whole trie, which a
        // head that never lets go of its forks' buckets approaches (about 1,650 after these
        // blocks, and growing).
        assert!(whole > 4_000, "the whole trie: {whole} nodes");
        assert!(most < 1_200, "the head held up to {most} trie nodes of the whole {whole}");
        assert_eq!(c.with_state(State::rebuilt_root), c.head().state_root);
    }

    /// A state store whose commits fail while `fail` is set, and whose flushes wait while
    /// `flush_gate` is held (and are counted).
    #[derive(Debug, Default)]
    struct Flaky {
        inner: archipel_ledger::store::MemoryStore,
        fail: std::sync::atomic::AtomicBool,
        flush_gate: Mutex<()>,
        /// Commits wait while it is held.
        commit_gate: Mutex<()>,
        flushes: std::sync::atomic::AtomicU64,
        fail_flush: std::sync::atomic::AtomicBool,
        failed_flushes: std::sync::atomic::AtomicU64,
        /// The height a [`HeldSyncs`] log's syncs last answered with, which each flush records
        /// in `synced_at_flush`.
        log_synced: Option<Arc<std::sync::atomic::AtomicU64>>,
        synced_at_flush: std::sync::atomic::AtomicU64,
    }

    /// A block log whose syncs are answered only when the test says so (with the height each
    /// was asked at, recorded in `answered`), or at once with a failure when `refuse` is set.
    #[derive(Default)]
    struct HeldSyncs {
        inner: MemoryStore,
        refuse: bool,
        held: Arc<Mutex<Vec<crate::store::SyncRequest>>>,
        answered: Arc<std::sync::atomic::AtomicU64>,
    }

    impl HeldSyncs {
        /// Answers the syncs asked for so far; returns how many.
        fn release(held: &Mutex<Vec<crate::store::SyncRequest>>, answered: &std::sync::atomic::AtomicU64) -> usize {
            let held = std::mem::take(&mut *crate::lock(held));
            for (height, _) in &held {
                answered.fetch_max(*height, std::sync::atomic::Ordering::SeqCst);
            }
            let n = held.len();
            for (height, answer) in held {
                let _ = answer.send(Ok(height));
            }
            n
        }
    }

    impl BlockStore for HeldSyncs {
        fn height(&self) -> u64 {
            self.inner.height()
        }
        fn append(&mut self, record: &crate::store::Record) -> Result<(), String> {
            self.inner.append(record)
        }
        fn get(&self, height: u64) -> Result<Option<crate::store::Record>, String> {
            self.inner.get(height)
        }
        fn raw_range(&self, from: u64, to: u64) -> Result<Vec<u8>, String> {
            self.inner.raw_range(from, to)
        }
        fn sync(&mut self) -> crate::store::Synced {
            let (tx, rx) = futures::channel::oneshot::channel();
            if self.refuse {
                let _ = tx.send(Err("injected: the sync failed".into()));
            } else {
                crate::lock(&self.held).push((self.inner.height(), tx));
            }
            rx
        }
        fn prune_finish(&mut self, pruned: crate::store::Pruned) -> Result<u64, String> {
            self.inner.prune_finish(pruned)
        }
    }

    impl archipel_ledger::trie::LeafSource for Flaky {
        fn leaves(
            &self,
            lo: &Hash,
            hi: &Hash,
        ) -> Result<Vec<archipel_ledger::trie::Leaf>, archipel_ledger::trie::TrieError> {
            self.inner.leaves(lo, hi)
        }
    }

    impl StateStore for Flaky {
        fn bucket_depth(&self) -> usize {
            self.inner.bucket_depth()
        }
        fn committed(&self) -> Result<Option<archipel_ledger::store::Committed>, StoreError> {
            self.inner.committed()
        }
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key)
        }
        fn scan(
            &self,
            prefix: &[u8],
            after: Option<&[u8]>,
            limit: usize,
        ) -> Result<archipel_ledger::store::Entries, StoreError> {
            self.inner.scan(prefix, after, limit)
        }
        fn commit(&self, commit: &archipel_ledger::store::Commit, durable: bool) -> Result<(), StoreError> {
            let _gate = crate::lock(&self.commit_gate);
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Io("the disk is full".into()));
            }
            self.inner.commit(commit, durable)
        }
        fn flush(&self) -> Result<(), StoreError> {
            let _gate = crate::lock(&self.flush_gate);
            if self.fail_flush.load(std::sync::atomic::Ordering::SeqCst) {
                self.failed_flushes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return Err(StoreError::Io("the flush failed".into()));
            }
            if let Some(synced) = &self.log_synced {
                self.synced_at_flush
                    .store(synced.load(std::sync::atomic::Ordering::SeqCst), std::sync::atomic::Ordering::SeqCst);
            }
            self.flushes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.flush()
        }
        fn tx(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.tx(hash)
        }
        fn clear(&self) -> Result<(), StoreError> {
            self.inner.clear()
        }
        fn snapshot(&self) -> Result<Box<dyn archipel_ledger::store::StateSnapshot>, StoreError> {
            self.inner.snapshot()
        }
        fn import(&self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
            self.inner.import(entries)
        }
        fn index_scan(
            &self,
            prefix: &[u8],
            after: Option<&[u8]>,
            limit: usize,
        ) -> Result<archipel_ledger::store::Entries, StoreError> {
            self.inner.index_scan(prefix, after, limit)
        }
    }

    #[test]
    fn a_slow_checkpoint_holds_up_neither_the_applier_nor_the_chain_lock() {
        // A flush takes hundreds of milliseconds at 10^6 entries; run by `finalize`, it held up
        // the consensus runtime. Here a flush waits until the test lets it go: the blocks after
        // the checkpoint are finalized (and the chain read) meanwhile, and the flush happens once,
        // after the log's sync answered.
        let blocks = HeldSyncs::default();
        let (held, answered) = (Arc::clone(&blocks.held), Arc::clone(&blocks.answered));
        let store = Arc::new(Flaky { inner: small_buckets(), log_synced: Some(answered.clone()), ..Flaky::default() });
        let c = Arc::new(
            Chain::open_with(three_accounts(1_000_000), Box::new(blocks), store.clone())
                .unwrap()
                .with_checkpoint_every(COMMIT_BLOCKS),
        );
        let gate = crate::lock(&store.flush_gate);
        let (done, finished) = std::sync::mpsc::channel();
        let worker = {
            let c = c.clone();
            std::thread::spawn(move || {
                let sender = Identity::from_seed(0);
                // The checkpoint is due once block 32 is final (it runs before 33 is appended).
                for n in 0..COMMIT_BLOCKS + 10 {
                    finalize_one_transfer(&c, &sender, n);
                }
                let _ = done.send(());
            })
        };
        let went_on = finished.recv_timeout(std::time::Duration::from_secs(20));
        let flushed_before = store.flushes.load(std::sync::atomic::Ordering::SeqCst);
        drop(gate);
        worker.join().unwrap();
        assert!(went_on.is_ok(), "finalize waited for the checkpoint's flush");
        assert_eq!(flushed_before, 0, "the flush ran past its gate");
        assert_eq!(c.head().height, COMMIT_BLOCKS + 10);
        // The gate is open, the log's sync not answered: the store must not be flushed yet.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while store.flushes.load(std::sync::atomic::Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            store.flushes.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "flushed before the log's sync answered"
        );
        assert!(HeldSyncs::release(&held, &answered) >= 1, "the checkpoint asked for a sync");
        c.wait_for_commit().unwrap();
        assert_eq!(store.flushes.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The log was synced before the flush, up to the checkpoint's height at least.
        let synced = store.synced_at_flush.load(std::sync::atomic::Ordering::SeqCst);
        assert!(synced >= COMMIT_BLOCKS, "the log was synced to {synced} when the store flushed");
        assert_eq!(store.committed().unwrap().unwrap().height, COMMIT_BLOCKS);
    }

    /// A chain checkpointing every 32 blocks whose store's flushes fail, 33 blocks in: the
    /// checkpoint for the state at 32 ran on the commit thread and failed (nothing else learned
    /// of it yet). The store, the chain and the sender (whose next nonce is 33).
    fn a_background_checkpoint_failed() -> (Arc<Flaky>, Chain, Identity) {
        let store = Arc::new(Flaky { inner: small_buckets(), ..Flaky::default() });
        let c = Chain::open_with(three_accounts(1_000_000), Box::new(MemoryStore::default()), store.clone())
            .unwrap()
            .with_checkpoint_every(COMMIT_BLOCKS);
        store.fail_flush.store(true, std::sync::atomic::Ordering::SeqCst);
        let sender = Identity::from_seed(0);
        // The checkpoint starts before block 33 goes in, for the state at 32.
        for n in 0..=COMMIT_BLOCKS {
            finalize_one_transfer(&c, &sender, n);
        }
        // Its thread ended, not only its flush: the next block must see it failed.
        the_write_in_flight_ended(&c, "the background checkpoint never ended");
        assert_eq!(store.failed_flushes.load(std::sync::atomic::Ordering::SeqCst), 1, "the checkpoint failed");
        (store, c, sender)
    }

    #[test]
    fn a_failed_checkpoint_is_retried_and_waited_for() {
        // The flush runs on the commit thread; once it failed, the next block is refused while
        // the checkpoint, retried there and waited for, fails, and goes in once it succeeds.
        // The failure reaches the applier the way it runs, through the next block (the setup
        // waits only until the commit thread ended, never collects its result itself).
        let (store, c, sender) = a_background_checkpoint_failed();
        let head = c.head();
        let t = Transaction {
            signer: sender.node_id(),
            nonce: COMMIT_BLOCKS + 1,
            payload: Payload::Transfer { to: Identity::from_seed(7).node_id(), amount_micro: 1 },
        };
        c.submit(t.sign(&sender, &Hash::ZERO), 100, 1_000 * (head.height + 1)).unwrap();
        let block = c.build(&head.hash(), 1_000 * (head.height + 1), |_| Vec::new()).unwrap();
        for _ in 0..2 {
            let e = c.finalize_known(&block.hash(), vec![1]).unwrap_err();
            assert!(e.contains("the flush failed"), "{e}");
            assert_eq!(c.head(), head, "the head moved past a failed checkpoint");
        }
        assert_eq!(store.flushes.load(std::sync::atomic::Ordering::SeqCst), 0);
        store.fail_flush.store(false, std::sync::atomic::Ordering::SeqCst);
        c.finalize_known(&block.hash(), vec![1]).unwrap().expect("finalized once the flush succeeds");
        // The retry was waited for: flushed, with the state at 33, before block 34 went in.
        assert_eq!(store.flushes.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(store.committed().unwrap().unwrap().height, COMMIT_BLOCKS + 1);
        assert_eq!(c.head().height, COMMIT_BLOCKS + 2);
        for n in COMMIT_BLOCKS + 2..COMMIT_BLOCKS + 6 {
            finalize_one_transfer(&c, &sender, n);
        }
        c.wait_for_commit().unwrap();
        assert_eq!(c.with_state(State::rebuilt_root), c.head().state_root);
    }

    /// Waits (at most 60 s, else fails with `never`) until the thread of `c`'s write in flight
    /// ended, without collecting its result.
    fn the_write_in_flight_ended(c: &Chain, never: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !crate::lock(&c.committing).as_ref().is_some_and(|w| w.pending.is_finished()) {
            assert!(std::time::Instant::now() < deadline, "{never}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A chain (default checkpoints) 33 blocks in over `blocks` and `store`: the commit of the
    /// state at 32 started as block 33 went in (with the store's commit gate held if `gated`),
    /// and nothing has collected it. Returns the gate's guard too.
    fn a_commit_in_flight(
        blocks: Box<dyn BlockStore>,
        store: &Arc<Flaky>,
        gated: bool,
    ) -> (Chain, Option<std::sync::MutexGuard<'_, ()>>) {
        let c = Chain::open_with(three_accounts(1_000_000), blocks, store.clone()).unwrap();
        let sender = Identity::from_seed(0);
        for n in 0..COMMIT_BLOCKS {
            finalize_one_transfer(&c, &sender, n);
        }
        let gate = gated.then(|| crate::lock(&store.commit_gate));
        finalize_one_transfer(&c, &sender, COMMIT_BLOCKS);
        (c, gate)
    }

    #[test]
    fn a_chain_dropped_after_an_uncollected_commit_syncs_the_log_it_committed_past() {
        // The commit of the state at 32 ended but was never collected: the store will make it
        // durable when it closes, so the log must be synced to 32 first.
        let blocks = MemoryStore::default();
        let store = Arc::new(Flaky { inner: small_buckets(), ..Flaky::default() });
        let (c, _) = a_commit_in_flight(Box::new(blocks.clone()), &store, false);
        the_write_in_flight_ended(&c, "the commit never ended");
        assert!(blocks.synced_height() < COMMIT_BLOCKS, "synced to {} before the drop", blocks.synced_height());
        drop(c);
        assert_eq!(store.committed().unwrap().unwrap().height, COMMIT_BLOCKS);
        assert!(blocks.synced_height() >= COMMIT_BLOCKS, "the log was synced to {} only", blocks.synced_height());
        assert_eq!(Arc::strong_count(&store), 1, "a store whose log was synced is closed");
    }

    #[test]
    fn a_chain_dropped_during_a_commit_waits_for_it_and_syncs_the_log() {
        let blocks = MemoryStore::default();
        let store = Arc::new(Flaky { inner: small_buckets(), ..Flaky::default() });
        let (c, gate) = a_commit_in_flight(Box::new(blocks.clone()), &store, true);
        let dropping = std::thread::spawn(move || drop(c));
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(gate);
        dropping.join().unwrap();
        assert_eq!(store.committed().unwrap().unwrap().height, COMMIT_BLOCKS, "the drop waited for the commit");
        assert!(blocks.synced_height() >= COMMIT_BLOCKS, "the log was synced to {} only", blocks.synced_height());
        assert_eq!(Arc::strong_count(&store), 1, "a store whose log was synced is closed");
    }

    #[test]
    fn a_chain_dropped_waits_at_most_five_seconds_for_its_write_and_sync_together() {
        // The commit takes 3 s, the log's sync never answers: the drop gives up 5 s after it
        // started (not 5 s after the commit), and leaves the store open, never closed ahead of
        // the log.
        let store = Arc::new(Flaky { inner: small_buckets(), ..Flaky::default() });
        let (c, gate) = a_commit_in_flight(Box::new(HeldSyncs::default()), &store, true);
        let started = std::time::Instant::now();
        let dropping = std::thread::spawn(move || drop(c));
        std::thread::sleep(std::time::Duration::from_secs(3));
        drop(gate);
        dropping.join().unwrap();
        let took = started.elapsed();
        assert_eq!(store.committed().unwrap().unwrap().height, COMMIT_BLOCKS, "the drop waited for the commit");
        assert!(took < DROP_SYNC_WAIT + std::time::Duration::from_millis(1_500), "the drop took {took:?}");
        assert_eq!(Arc::strong_count(&store), 2, "the store was closed though the log's sync never answered");
    }

    #[test]
    fn a_chain_dropped_while_its_checkpoint_hangs_does_not_hang() {
        // The checkpoint's flush never returns (a hung disk): dropping the chain gives up on it
        // after a bounded wait instead of hanging the process's exit.
        let store = Arc::new(Flaky { inner: small_buckets(), ..Flaky::default() });
        let c = Chain::open_with(three_accounts(1_000_000), Box::new(MemoryStore::default()), store.clone())
            .unwrap()
            .with_checkpoint_every(COMMIT_BLOCKS);
        let gate = crate::lock(&store.flush_gate);
        let sender = Identity::from_seed(0);
        for n in 0..=COMMIT_BLOCKS {
            finalize_one_transfer(&c, &sender, n);
        }
        let (done, dropped) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(c);
            let _ = done.send(());
        });
        let returned = dropped.recv_timeout(DROP_SYNC_WAIT + std::time::Duration::from_secs(20));
        let flushed = store.flushes.load(std::sync::atomic::Ordering::SeqCst);
        drop(gate);
        assert!(returned.is_ok(), "dropping the chain waited for a flush that never ends");
        assert_eq!(flushed, 0, "the flush ran past its gate");
        // The write ends later: the store must stay open (closing it would make its pending
        // writes durable, ahead of a log nobody synced).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while store.flushes.load(std::sync::atomic::Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(Arc::strong_count(&store), 2, "the store was closed once the abandoned write ended");
    }

    #[test]
    fn a_chain_whose_last_log_sync_fails_leaves_its_store_open() {
        // Committed past the durable state, and the log's sync at drop fails: the store must not
        // be closed (which would make that commit durable ahead of the log).
        let blocks = HeldSyncs { refuse: true, ..HeldSyncs::default() };
        let store = Arc::new(Flaky { inner: small_buckets(), ..Flaky::default() });
        let c = Chain::open_with(three_accounts(1_000_000), Box::new(blocks), store.clone()).unwrap();
        let sender = Identity::from_seed(0);
        for n in 0..COMMIT_BLOCKS + 2 {
            finalize_one_transfer(&c, &sender, n);
        }
        c.wait_for_commit().unwrap();
        let (committed, durable) = {
            let g = c.lock();
            (g.committed_at, g.durable_at)
        };
        assert!(committed > durable, "committed at {committed}, durable at {durable}");
        drop(c);
        assert_eq!(Arc::strong_count(&store), 2, "the store was closed after a failed sync");
    }

    #[test]
    fn closing_retries_a_checkpoint_that_failed_in_the_background() {
        // The background checkpoint's flush fails and nothing else learns of it before close:
        // close must still leave the head's state durable, not give up on the first error.
        let (store, c, _) = a_background_checkpoint_failed();
        store.fail_flush.store(false, std::sync::atomic::Ordering::SeqCst);
        c.close().expect("close retries the checkpoint");
        assert_eq!(store.flushes.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(store.committed().unwrap().unwrap().height, c.head().height, "the head's state is in the store");
    }

    #[test]
    fn a_state_store_that_cannot_be_written_stalls_the_head_until_it_can() {
        // Commits are written in the background; a failed one must still stop the head (memory
        // would grow otherwise), and the chain goes on once the store takes writes again.
        let store = Arc::new(Flaky { inner: small_buckets(), ..Flaky::default() });
        let c = Chain::open_with(three_accounts(1_000_000), Box::new(MemoryStore::default()), store.clone()).unwrap();
        let sender = Identity::from_seed(0);
        let block = |n: u64| {
            let head = c.head();
            let payload = Payload::Transfer { to: Identity::from_seed(1_000 + n).node_id(), amount_micro: 1 };
            let t = Transaction { signer: sender.node_id(), nonce: n, payload }.sign(&sender, &Hash::ZERO);
            let now = 1_000 * (head.height + 1);
            c.submit(t, 100, now).unwrap();
            c.build(&head.hash(), now, |_| Vec::new()).unwrap()
        };
        for n in 0..COMMIT_BLOCKS {
            let b = block(n);
            c.finalize_known(&b.hash(), vec![1]).unwrap().expect("finalized");
        }
        store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        // Block 33 starts the write of 1..=32 in the background, which fails: the head stops once
        // the failure is known, at the latest when the next write would start (block 65), and
        // does not move while the store refuses.
        let mut refused = 0;
        let mut n = COMMIT_BLOCKS;
        for _ in 0..2 * COMMIT_BLOCKS + 10 {
            let b = block(n);
            match c.finalize_known(&b.hash(), vec![1]) {
                Ok(_) => n += 1,
                Err(e) => {
                    assert!(e.contains("the disk is full"), "{e}");
                    refused += 1;
                }
            }
        }
        let stuck = c.head().height;
        assert!(stuck <= 2 * COMMIT_BLOCKS, "the head went on to {stuck} past a store that cannot be written");
        assert!(refused >= COMMIT_BLOCKS + 10, "{refused} refusals");
        store.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        for _ in 0..COMMIT_BLOCKS + 2 {
            let b = block(c.head().height);
            c.finalize_known(&b.hash(), vec![1]).unwrap().expect("finalized once the store takes writes");
        }
        c.wait_for_commit().unwrap();
        assert_eq!(c.with_state(State::rebuilt_root), c.head().state_root);
        let committed = store.committed().unwrap().unwrap();
        assert!(committed.height > stuck, "the store caught up: {committed:?}");
    }

    #[test]
    fn commits_every_32_blocks_are_what_a_restart_opens() {
        // No checkpoint in 70 blocks: the store holds the commits before blocks 33 and 65 (not
        // durable), the head the rest.
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        let (c, txs) = run_blocks_every(&blocks, &states, 70, 10_000);
        let head = c.head();
        drop(c);
        let c = reopen(&blocks, &states);
        assert_eq!(c.opened(), Opened { state_height: 64, replayed: 6 });
        assert_eq!(c.head(), head);
        assert_eq!(c.with_state(State::state_root), head.state_root);
        for (i, t) in txs.iter().enumerate() {
            assert!(
                matches!(c.tx_status(t), TxStatus::Final(loc) if loc.height == i as u64 + 1),
                "tx of block {}",
                i + 1
            );
        }
        drop(c);
        // A power cut: nothing was flushed or synced after the genesis, so both start over, and
        // the replay covers more than one commit's worth of blocks when the log kept them.
        states.crash();
        blocks.crash();
        let c = reopen(&blocks, &states);
        assert_eq!(c.opened().state_height, 70, "the reopen before flushed what it replayed");
        drop(c);
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        drop(run_blocks_every(&blocks, &states, 70, 10_000));
        assert_eq!(futures::executor::block_on(blocks.clone().sync()).unwrap(), Ok(70));
        states.crash();
        let c = reopen(&blocks, &states);
        assert_eq!(c.opened(), Opened { state_height: 0, replayed: 70 });
        assert_eq!(c.with_state(State::state_root), c.head().state_root);
    }

    #[test]
    fn a_state_store_ahead_of_the_block_log_is_rebuilt_from_the_log() {
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        let (c, _) = run_blocks(&blocks, &states, 10);
        let root5 = c.block(5).unwrap().unwrap().0.header.state_root;
        drop(c);
        // A disk that lost log writes it had acknowledged: the log ends at 5, the state is at 10.
        blocks.truncate(5);
        let c = reopen(&blocks, &states);
        assert_eq!(c.opened(), Opened { state_height: 0, replayed: 5 });
        assert_eq!(c.head().height, 5);
        assert_eq!(c.with_state(State::state_root), root5);
        drop(c);
        // A store whose entries do not hash to its committed root is rebuilt from the log too.
        let (blocks, states) = (MemoryStore::default(), small_buckets());
        let (c, _) = run_blocks(&blocks, &states, 10);
        let root9 = c.block(9).unwrap().unwrap().0.header.state_root;
        drop(c);
        let garbled = archipel_ledger::store::Commit {
            height: 9,
            root: root9,
            entries: vec![(b"chain".to_vec(), Some(vec![0; 24]))],
            ..Default::default()
        };
        states.commit(&garbled, true).unwrap();
        let c = reopen(&blocks, &states);
        assert_eq!(c.opened(), Opened { state_height: 0, replayed: 10 });
        assert_eq!(c.with_state(State::state_root), c.head().state_root);
        // It goes on from there.
        let head = c.head();
        c.submit(transfer(0, 5), 100, 0).unwrap();
        let block = c.build(&head.hash(), 99_000, |_| Vec::new()).unwrap();
        assert!(c.finalize_known(&block.hash(), vec![1]).unwrap().is_some());
    }

    #[test]
    fn a_finalization_applies_a_block_this_node_executed_once() {
        let c = chain();
        let t = transfer(0, 0);
        c.submit(t.clone(), 100, 0).unwrap();
        let genesis = c.genesis().hash();
        let block = c.build(&genesis, 1_000, |_| Vec::new()).unwrap();
        assert_eq!(block.txs, vec![t.clone()]);
        assert!(c.finalize_known(&Hash([7; 32]), vec![1]).unwrap().is_none(), "unknown block");
        let f = c.finalize_known(&block.hash(), vec![1, 2, 3]).unwrap().expect("applies");
        assert_eq!(f.block.header.height, 1);
        assert_eq!(c.head(), block.header);
        assert!(matches!(c.tx_status(&t.hash()), TxStatus::Final(loc) if loc.height == 1));
        assert_eq!(c.block(1).unwrap().unwrap().1, vec![1, 2, 3], "the certificate is kept");
        assert!(c.finalize_known(&block.hash(), vec![1]).unwrap().is_none(), "once");
        assert!(c.finalize(block, vec![]).unwrap().is_none(), "marshal's later delivery is a repeat");
        assert_eq!(c.mempool_len(), 0);
    }

    /// At an upgrade's height a build that does not implement the version builds no block (its
    /// view times out); one that does builds it as any other.
    #[test]
    fn a_build_builds_nothing_where_a_protocol_it_does_not_implement_is_in_force() {
        use archipel_ledger::upgrade::{Upgrade, approve};
        let (tenant, validator) = (Identity::from_seed(0), Identity::from_seed(1));
        let genesis = State::genesis(GenesisState {
            accounts: vec![(tenant.node_id(), 1_000)],
            params: archipel_ledger::LedgerParams { upgrade_notice_blocks: 20, ..Default::default() },
            validators: vec![validator.node_id()],
            ..GenesisState::default()
        });
        let upgrade = Upgrade { protocol: 2, height: 21 };
        let approvals = vec![approve(&validator, &archipel_ledger::Hash::ZERO, &upgrade, 0)];
        let schedule = Transaction {
            signer: tenant.node_id(),
            nonce: 0,
            payload: Payload::ScheduleUpgrade { upgrade, approvals },
        }
        .sign(&tenant, &archipel_ledger::Hash::ZERO);
        for supported in [1, 2] {
            let c = Chain::open(genesis.clone().with_supported_protocol(supported), Box::new(MemoryStore::default()))
                .unwrap();
            c.submit(schedule.clone(), 300, 0).unwrap();
            let mut parent = c.genesis().hash();
            for height in 1..=20 {
                let b = c.build(&parent, height * 100, |_| Vec::new()).expect("below the height, both build");
                assert_eq!(b.txs.len(), usize::from(height == 1));
                c.finalize_known(&b.hash(), vec![]).unwrap().expect("applies");
                parent = b.hash();
            }
            assert_eq!(c.with_state(|s| s.scheduled_upgrade()), Some(upgrade));
            let at = c.build(&parent, 2_100, |_| Vec::new());
            assert_eq!(at.is_some(), supported == 2, "protocol {supported} build at the height");
            if let Some(b) = at {
                c.finalize_known(&b.hash(), vec![]).unwrap().expect("applies");
                assert_eq!(c.with_state(|s| (s.protocol(), s.scheduled_upgrade())), (2, None));
            }
        }
    }

    #[test]
    fn a_finalization_also_applies_the_executed_ancestors_it_makes_final() {
        let c = chain();
        let genesis = c.genesis().hash();
        let first = c.build(&genesis, 1_000, |_| Vec::new()).unwrap();
        let second = c.build(&first.hash(), 2_000, |_| Vec::new()).unwrap();
        let third = c.build(&second.hash(), 3_000, |_| Vec::new()).unwrap();
        assert!(c.finalize_known(&Hash([7; 32]), vec![1]).unwrap().is_none());
        let f = c.finalize_known(&third.hash(), vec![3]).unwrap().expect("applies with its ancestors");
        assert_eq!(f.block.header.height, 3);
        assert_eq!(c.head(), third.header);
        assert_eq!(c.block(1).unwrap().unwrap().1, Vec::<u8>::new(), "an ancestor has no certificate of its own");
        assert_eq!(c.block(2).unwrap().unwrap().0, second);
        assert_eq!(c.block(3).unwrap().unwrap().1, vec![3]);
        assert!(c.finalize_known(&second.hash(), vec![2]).unwrap().is_none(), "already final");
    }

    #[test]
    fn waiters_of_ended_requests_are_freed_and_the_waiters_are_bounded() {
        let c = chain();
        // Requests that gave up (timed out, or the client went away) drop their receiver.
        for i in 0..3 * MAX_TX_WAITERS as u64 {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&i.to_be_bytes());
            match c.watch_tx(Hash(h)) {
                TxWatch::Wait(rx) => drop(rx),
                other => panic!("waiter {i}: {other:?}"),
            }
            assert!(c.tx_waiters() <= MAX_TX_WAITERS, "{} waiters after {i}", c.tx_waiters());
        }
        // Requests still waiting are kept, up to the cap; then the node says it is busy.
        let held: Vec<_> = (0..MAX_TX_WAITERS as u64)
            .map(|i| {
                let mut h = [1u8; 32];
                h[..8].copy_from_slice(&i.to_be_bytes());
                c.watch_tx(Hash(h))
            })
            .collect();
        assert!(held.iter().all(|w| matches!(w, TxWatch::Wait(_))));
        assert_eq!(c.tx_waiters(), MAX_TX_WAITERS);
        assert!(matches!(c.watch_tx(Hash([9; 32])), TxWatch::Busy));
        drop(held);
        assert!(matches!(c.watch_tx(Hash([9; 32])), TxWatch::Wait(_)), "freed once the requests ended");
        assert_eq!(c.tx_waiters(), 1);
    }

    #[test]
    fn raw_blocks_are_read_in_bounded_chunks_up_to_the_last_certified_block() {
        let c = chain();
        let mut parent = c.genesis().hash();
        for i in 1..=5u64 {
            let b = c.build(&parent, i * 1_000, |_| Vec::new()).unwrap();
            parent = b.hash();
            // Block 5 is final as the ancestor of nothing certified yet: no certificate.
            let cert = if i == 5 { Vec::new() } else { vec![i as u8] };
            c.finalize(b, cert).unwrap().unwrap();
        }
        let count = |raw: &[u8]| {
            let mut at = 0;
            let mut n = 0;
            while at < raw.len() {
                archipel_ledger::export::take_record(raw, &mut at, 1 << 20).unwrap();
                archipel_ledger::export::take_record(raw, &mut at, 1 << 20).unwrap();
                n += 1;
            }
            n
        };
        let (raw, certified) = c.raw_blocks_from(1, 2).unwrap();
        assert_eq!((count(&raw), certified), (2, 4));
        assert_eq!(count(&c.raw_blocks_from(3, 256).unwrap().0), 2, "stops at the last certified block");
        assert!(c.raw_blocks_from(5, 256).unwrap().0.is_empty());
        assert!(c.raw_blocks_from(u64::MAX, u64::MAX).unwrap().0.is_empty());
    }
}
