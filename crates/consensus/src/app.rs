//! The ledger as simplex's automaton, relay and reporter: propose a block from the mempool as
//! soon as transactions wait, verify other validators' blocks by executing them, send blocks to
//! the other validators, and hand finalizations to the applier.
//!
//! Marshal (commonware's block sync) stays beside it for what it is good at — finalized
//! archives, backfill for late or restarted nodes — but entirely off the path of a view: blocks
//! travel through the buffered broadcast engine, the parent of a proposal or a verified block is
//! looked up in the node's [`Chain`], a block this node missed is fetched from the other
//! validators by [`Candidates`] (also a finalized block it never executed:
//! `LedgerApp::catch_up`), and marshal hears only finalizations, at most one every
//! [`MARSHAL_FINALIZATION_INTERVAL`] (it stores every candidate, notarization and finalization it
//! hears with its own syncs, which on a shared disk delayed every view). The one durability
//! barrier kept: `certify` (the finalize vote) waits until [`Candidates`] has the block on this
//! node's disk, so a finalized block is on the disks of a quorum.

use crate::block::{LedgerBlock, digest_of, hash_of};
use crate::candidates::Candidates;
use crate::chain::Chain;
use crate::engine::ToApply;
use crate::liveness::SharedTracker;
use commonware_broadcast::{Broadcaster as _, buffered};
use commonware_consensus::marshal::core::Mailbox;
use commonware_consensus::marshal::standard::Standard;
use commonware_consensus::simplex::Plan;
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_consensus::simplex::types::{Activity, Context, Finalization};
use commonware_consensus::types::Round;
use commonware_consensus::{Automaton, CertifiableAutomaton, Relay, Reporter};
use commonware_cryptography::blake3::Digest;
use commonware_cryptography::ed25519::PublicKey;
use commonware_cryptography::{Digested, Digestible};
use commonware_p2p::Recipients;
use commonware_runtime::telemetry::metrics::histogram::Timed;
use commonware_runtime::{Clock, Metrics, Spawner};
use commonware_utils::channel::{fallible::OneshotExt as _, mpsc, oneshot};
use futures::future::Either;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long an idle leader waits for a transaction, a liveness change or a job falling due
/// before proposing an empty block. Well inside the validators' 1 s leader timeout, so an idle
/// view is never nullified for its wait; each idle block costs every node its marshal archive
/// writes and syncs, so the idle chain's cost falls with this (two empty blocks a second).
pub const IDLE_WAIT: Duration = Duration::from_millis(500);

/// An idle leader proposes early for a job falling due only this long after its parent's block
/// time: however many jobs a tenant posts, with due times however close together, they add at
/// most five blocks a second to an idle chain (bid windows are at least 200 ms, so a single
/// auction never waits for it).
pub const MIN_WAKE_GAP_MS: u64 = 200;

/// While it waits, an idle leader plans liveness changes again this often: a `Down` due in the
/// wait goes into a block within this (so [`crate::liveness::Tracker`] plans Downs this much
/// before the lease's end).
pub const LIVENESS_RECHECK: Duration = Duration::from_millis(250);

/// Marshal hears at most one finalization per this interval (the newest; it implies its
/// ancestors) — unless this node never executed a finalized block, which only marshal's delivery
/// can then bring: that finalization goes to marshal at once.
pub const MARSHAL_FINALIZATION_INTERVAL: Duration = Duration::from_millis(500);

/// The finalization marshal has not heard yet.
#[derive(Default)]
struct ForMarshal {
    /// The newest one.
    newest: Option<Finalization<Scheme, Digest>>,
    /// Some finalized block is not executed here: do not wait for the interval.
    urgent: bool,
}

/// How long `LedgerApp::catch_up` tries the validators before leaving a finalized block this
/// node never executed to marshal.
pub const CATCH_UP_LIMIT: Duration = Duration::from_secs(2);

/// A notarized block that has not reached this node by broadcast within this long is fetched
/// from the other validators.
pub const CERTIFY_FETCH_AFTER: Duration = Duration::from_millis(200);

/// How a validator misbehaves (simulator only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Follows the protocol.
    #[default]
    Honest,
    /// Proposes blocks with a wrong state root.
    ProposesInvalidBlocks,
}

/// Per-round state between a proposal or verification and its certification.
#[derive(Default)]
struct Rounds {
    /// Blocks this node built, until consensus asks to send them.
    built: BTreeMap<Round, Digested<LedgerBlock>>,
    /// Durability of candidate blocks (true once synced), awaited by `certify`; the outer
    /// channel answers once the block has arrived.
    durable: BTreeMap<(Round, Digest), oneshot::Receiver<oneshot::Receiver<bool>>>,
}

/// The ledger application as simplex sees it. Cheap to clone (shared state behind `Arc`s).
#[allow(missing_debug_implementations)]
pub struct LedgerApp<E> {
    context: Arc<E>,
    chain: Arc<Chain>,
    behaviour: Behaviour,
    marshal: Mailbox<Scheme, Standard<LedgerBlock>>,
    blocks: buffered::Mailbox<PublicKey, LedgerBlock>,
    candidates: Arc<Candidates>,
    rounds: Arc<Mutex<Rounds>>,
    /// Every finalization, for the applier.
    applier: mpsc::UnboundedSender<ToApply>,
    /// The newest finalization marshal has not heard yet.
    for_marshal: Arc<Mutex<ForMarshal>>,
    marshal_wake: mpsc::Sender<()>,
    ancestor_fetch: Timed,
    /// A finalized block this node never executed is being fetched from the validators.
    catching_up: Arc<AtomicBool>,
    /// When this validator last heard each node (liveness changes in blocks).
    liveness: SharedTracker,
}

impl<E> Clone for LedgerApp<E> {
    fn clone(&self) -> Self {
        Self {
            context: self.context.clone(),
            chain: self.chain.clone(),
            behaviour: self.behaviour,
            marshal: self.marshal.clone(),
            blocks: self.blocks.clone(),
            candidates: self.candidates.clone(),
            rounds: self.rounds.clone(),
            applier: self.applier.clone(),
            for_marshal: self.for_marshal.clone(),
            marshal_wake: self.marshal_wake.clone(),
            ancestor_fetch: self.ancestor_fetch.clone(),
            catching_up: self.catching_up.clone(),
            liveness: self.liveness.clone(),
        }
    }
}

impl<E> LedgerApp<E>
where
    E: Spawner + Clock + Metrics,
{
    /// The application over `chain`; starts the task that passes finalizations on to marshal.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        context: E,
        chain: Arc<Chain>,
        behaviour: Behaviour,
        marshal: Mailbox<Scheme, Standard<LedgerBlock>>,
        blocks: buffered::Mailbox<PublicKey, LedgerBlock>,
        candidates: Arc<Candidates>,
        applier: mpsc::UnboundedSender<ToApply>,
        liveness: SharedTracker,
    ) -> Self {
        let ancestor_fetch = Timed::register(
            &context,
            "ancestor_fetch_duration",
            "Time to fetch a block unknown here from the other validators",
        );
        let (marshal_wake, wake) = mpsc::channel(1);
        let for_marshal = Arc::new(Mutex::new(ForMarshal::default()));
        context.child("marshal_feed").spawn({
            let (marshal, for_marshal) = (marshal.clone(), for_marshal.clone());
            move |context| feed_marshal(context, marshal, for_marshal, wake)
        });
        Self {
            context: Arc::new(context),
            chain,
            behaviour,
            marshal,
            blocks,
            candidates,
            rounds: Default::default(),
            applier,
            for_marshal,
            marshal_wake,
            ancestor_fetch,
            catching_up: Default::default(),
            liveness,
        }
    }

    /// `f` finalized a block this node never executed (it missed the block, or its vote was not
    /// needed): fetch the block and its missing ancestors from the validators, which hold recent
    /// blocks, execute them, and hand the finalization to the applier again. One at a time and
    /// for at most [`CATCH_UP_LIMIT`]; marshal, told at once, covers anything longer (a node far
    /// behind).
    fn catch_up(&self, f: Finalization<Scheme, Digest>) {
        if self.catching_up.swap(true, Ordering::AcqRel) {
            return;
        }
        let app = self.clone();
        self.context.child("catch_up").spawn(move |runtime| async move {
            let runtime = Arc::new(runtime);
            let digest = f.proposal.payload;
            let known = ensure_known(&runtime, &app.chain, &app.candidates, &app.ancestor_fetch, digest);
            commonware_macros::select! {
                known = known => if known {
                    tracing::debug!(view = f.proposal.round.view().get(), "finalized block fetched from the validators");
                    let _ = app.applier.send(ToApply::Finalization(f));
                },
                _ = runtime.sleep(CATCH_UP_LIMIT) => {},
            }
            app.catching_up.store(false, Ordering::Release);
        });
    }

    fn rounds(&self) -> std::sync::MutexGuard<'_, Rounds> {
        crate::lock(&self.rounds)
    }

    /// Makes this node's own block durable, and remembers the durability for `certify`.
    fn store(&self, round: Round, block: Digested<LedgerBlock>) {
        let (arrived, durable) = oneshot::channel();
        self.rounds().durable.insert((round, block.digest()), durable);
        let _ = arrived.send(self.candidates.persist(round.view().get(), block));
    }
}

/// Makes sure the state after block `digest` (the parent of a proposal or of a block to verify)
/// is known here, fetching and executing unknown ancestors oldest first. False if they do not
/// connect to the finalized chain or one is invalid; waits as long as no validator answers.
async fn ensure_known<E: Clock>(
    context: &Arc<E>,
    chain: &Chain,
    candidates: &Candidates,
    fetch: &Timed,
    digest: Digest,
) -> bool {
    if chain.knows(&hash_of(&digest)) {
        return true;
    }
    tracing::debug!(parent = %hash_of(&digest).short(), "parent unknown here: fetching it");
    let timer = fetch.timer(&**context);
    // The applier may finalize blocks while this walks back: an ancestor at or below the head it
    // started from means the chain does not connect, unless the head has moved since — then the
    // walk starts over against the new head (fetched blocks are cached by `candidates`).
    let missing = loop {
        let head = chain.head().height;
        let mut missing = Vec::new();
        let mut next = digest;
        let connected = loop {
            if chain.knows(&hash_of(&next)) {
                break true;
            }
            let block = candidates.fetch(&**context, next).await;
            if block.inner().header().height <= head {
                break false;
            }
            next = digest_of(&block.inner().header().parent);
            missing.push(block);
        };
        if connected {
            break missing;
        }
        if chain.head().height == head {
            tracing::debug!(head, "ancestor is not on the finalized chain");
            return false;
        }
    };
    timer.observe(&**context);
    // Ancestors are notarized already (a quorum judged their liveness changes): only the state
    // machine's checks apply.
    missing.iter().rev().all(|b| match chain.verify(b.inner().block(), now_ms(&**context), |_| Ok(())) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(height = b.inner().header().height, error = %e, "ancestor does not verify");
            false
        }
    })
}

/// Passes the newest finalization to marshal, at most one per [`MARSHAL_FINALIZATION_INTERVAL`]
/// unless one is urgent.
async fn feed_marshal<E: Clock>(
    context: E,
    mut marshal: Mailbox<Scheme, Standard<LedgerBlock>>,
    pending: Arc<Mutex<ForMarshal>>,
    mut wake: mpsc::Receiver<()>,
) {
    let take = || {
        let mut p = crate::lock(&pending);
        p.urgent = false;
        p.newest.take()
    };
    loop {
        let Some(f) = take() else {
            if wake.recv().await.is_none() {
                return;
            }
            continue;
        };
        let _ = marshal.report(Activity::Finalization(f));
        let deadline = context.current() + MARSHAL_FINALIZATION_INTERVAL;
        loop {
            commonware_macros::select! {
                _ = context.sleep_until(deadline) => break,
                woken = wake.recv() => {
                    if woken.is_none() {
                        return;
                    }
                    if crate::lock(&pending).urgent {
                        break;
                    }
                },
            }
        }
    }
}

/// Runs `work` unless consensus drops the request `tx` answers first (it abandoned the view):
/// `None` then.
async fn unless_dropped<R, T>(tx: &mut oneshot::Sender<R>, work: impl std::future::Future<Output = T>) -> Option<T> {
    commonware_macros::select! {
        _ = tx.closed() => None,
        done = work => Some(done),
    }
}

/// The block time at which an idle leader proposes for a job falling due at `due_ms` (the first
/// after the parent's `parent_ms`): then, but never sooner than [`MIN_WAKE_GAP_MS`] after the
/// parent.
fn early_wake_ms(parent_ms: u64, due_ms: Option<u64>) -> Option<u64> {
    due_ms.map(|t| t.max(parent_ms.saturating_add(MIN_WAKE_GAP_MS)))
}

/// Whether a leader proposes `block` now (at `now`): it orders something (transactions or
/// liveness changes), its time passed a job's wake time `wake_ms`, or the idle wait is over.
fn ready(block: &archipel_ledger::Block, wake_ms: Option<u64>, now: SystemTime, deadline: SystemTime) -> bool {
    let due = wake_ms.is_some_and(|t| t <= block.header.timestamp_ms);
    !block.txs.is_empty() || !block.liveness.is_empty() || due || now >= deadline
}

/// When an idle leader that last planned at `now` looks again: at the next liveness re-plan,
/// when a job falls due (block time `wake_ms`), or at its `deadline`, whichever comes first.
fn idle_wake(now: SystemTime, deadline: SystemTime, wake_ms: Option<u64>) -> SystemTime {
    let due = wake_ms.map_or(deadline, |t| UNIX_EPOCH + Duration::from_millis(t));
    (now + LIVENESS_RECHECK).min(deadline).min(due)
}

fn now_ms(clock: &impl Clock) -> u64 {
    clock.current().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl<E> Automaton for LedgerApp<E>
where
    E: Spawner + Clock + Metrics,
{
    type Context = Context<Digest, PublicKey>;
    type Digest = Digest;

    async fn propose(&mut self, context: Self::Context) -> oneshot::Receiver<Digest> {
        let (mut tx, rx) = oneshot::channel();
        let app = self.clone();
        tracing::debug!(round = %context.round, "asked to propose");
        self.context.child("propose").spawn(move |runtime| async move {
            let runtime = Arc::new(runtime);
            // The idle wait counts from the view's start, not from when the parent was found:
            // the other validators' leader timeout runs from theirs.
            let deadline = runtime.current() + IDLE_WAIT;
            let (_, parent) = context.parent;
            let known = ensure_known(&runtime, &app.chain, &app.candidates, &app.ancestor_fetch, parent);
            let Some(true) = unless_dropped(&mut tx, known).await else { return };
            // No fixed block interval: propose at once when transactions or liveness changes can
            // go in, or when a job falls due (or an auction's commit phase closes) since the
            // parent; else wait a little for one of those (an empty block still moves block time
            // forward and gives the next leader its turn). Transactions that cannot go in yet (a
            // nonce gap) do not count.
            let parent = hash_of(&parent);
            let mut block = loop {
                let arrived = app.chain.next_submission();
                let now = runtime.current();
                let mut wake_ms = None;
                let plan = |s: &archipel_ledger::State| {
                    wake_ms = early_wake_ms(s.chain().timestamp_ms, s.next_wake_ms(s.chain().timestamp_ms));
                    let mut tracker = crate::lock(&app.liveness);
                    tracker.retain_registered(s);
                    tracker.plan(s, now, s.params().max_block_liveness as usize)
                };
                let Some(block) = app.chain.build(&parent, now_ms(&*runtime), plan) else { return };
                if ready(&block, wake_ms, runtime.current(), deadline) {
                    break block;
                }
                let wake = idle_wake(now, deadline, wake_ms);
                commonware_macros::select! {
                    _ = tx.closed() => return,
                    _ = arrived => {},
                    _ = runtime.sleep_until(wake) => {},
                }
            };
            tracing::debug!(
                height = block.header.height,
                txs = block.txs.len(),
                liveness = block.liveness.len(),
                "proposing"
            );
            if app.behaviour == Behaviour::ProposesInvalidBlocks {
                block.header.state_root.0[0] ^= 0xff;
            }
            let block = LedgerBlock::new(block);
            let digest = block.digest();
            app.rounds().built.insert(context.round, Digested::precomputed(block, digest));
            tx.send_lossy(digest);
        });
        rx
    }

    async fn verify(&mut self, context: Self::Context, digest: Digest) -> oneshot::Receiver<bool> {
        let (mut tx, rx) = oneshot::channel();
        // Registered before the block arrives: certify may come first (a notarization can form
        // without this node's vote) and must find the gate.
        let (arrived, durable) = oneshot::channel();
        self.rounds().durable.insert((context.round, digest), durable);
        // Held here already (read back after a restart, or fetched for a child): no need to
        // wait for the broadcast.
        let block = match self.candidates.get(&digest) {
            Some(held) => Either::Left(futures::future::ready(Ok(held))),
            None => Either::Right(self.blocks.subscribe(digest)),
        };
        let app = self.clone();
        self.context.child("verify").spawn(move |runtime| async move {
            let runtime = Arc::new(runtime);
            let Some(Ok(block)) = unless_dropped(&mut tx, block).await else { return };
            let header = block.inner().header();
            tracing::debug!(height = header.height, round = %context.round, "block to verify arrived");
            let (_, parent) = context.parent;
            // Only a child of the notarized parent reaches the candidate log (a made-up height
            // would stay there); with the parent not held here, only once the block verified.
            let view = context.round.view().get();
            let mut arrived = match app.candidates.persist_child(view, block.clone(), &parent) {
                Ok(Some(durable)) => {
                    let _ = arrived.send(durable);
                    None
                }
                Ok(None) => Some(arrived),
                Err(e) => {
                    tracing::warn!(height = header.height, error = %e, "rejecting a block that does not extend the notarized parent");
                    tx.send_lossy(false);
                    return;
                }
            };
            let mut persist = || {
                if let Some(arrived) = arrived.take() {
                    let _ = arrived.send(app.candidates.persist(view, block.clone()));
                }
            };
            // Already executed here (or just finalized without our vote, which is the head now).
            if app.chain.knows(&hash_of(&digest)) {
                persist();
                tx.send_lossy(true);
                return;
            }
            let known = ensure_known(&runtime, &app.chain, &app.candidates, &app.ancestor_fetch, parent);
            let Some(known) = unless_dropped(&mut tx, known).await else { return };
            if !known {
                tx.send_lossy(false);
                return;
            }
            // A block slightly in the future is not invalid: wait until it is acceptable, for at
            // most the drift allowed (a proposer whose clock runs further ahead is refused rather
            // than waited for, so it costs its own view only).
            let now = now_ms(&*runtime);
            let drift = app.chain.with_state(|s| s.params().max_clock_drift_ms);
            if header.timestamp_ms > now.saturating_add(drift) {
                let wait = header.timestamp_ms - now - drift;
                let waited = runtime.sleep(Duration::from_millis(wait.min(drift)));
                if unless_dropped(&mut tx, waited).await.is_none() {
                    return;
                }
            }
            tracing::debug!(height = header.height, "verifying");
            let now = runtime.current();
            let judge = |c: &archipel_ledger::LivenessChange| crate::lock(&app.liveness).judge(c, now);
            match app.chain.verify(block.inner().block(), now_ms(&*runtime), judge) {
                Ok(()) => {
                    tracing::debug!(height = header.height, "verified");
                    persist();
                    tx.send_lossy(true);
                }
                Err(e) => {
                    tracing::warn!(height = header.height, error = %e, "rejecting an invalid block");
                    tx.send_lossy(false);
                }
            }
        });
        rx
    }
}

impl<E> CertifiableAutomaton for LedgerApp<E>
where
    E: Spawner + Clock + Metrics,
{
    /// A notarized block is certified once it is on this node's disk: a quorum of validators
    /// verified it (at least one honest), so only its availability is this node's to ensure.
    async fn certify(&mut self, round: Round, digest: Digest) -> oneshot::Receiver<bool> {
        let (mut tx, rx) = oneshot::channel();
        tracing::debug!(round = %round, "asked to certify");
        let durable = self.rounds().durable.remove(&(round, digest));
        let candidates = self.candidates.clone();
        self.context.child("certify").spawn(move |runtime| async move {
            // The block arrived (by broadcast, or this node built it): wait for its sync. If it
            // has not arrived soon, fetch it from the other validators below.
            let arrived = async {
                match durable {
                    Some(durable) => durable.await.ok(),
                    None => futures::future::pending().await,
                }
            };
            let synced = commonware_macros::select! {
                _ = tx.closed() => return,
                synced = arrived => synced,
                _ = runtime.sleep(CERTIFY_FETCH_AFTER) => None,
            };
            let synced = match synced {
                Some(synced) => synced,
                None => {
                    let fetched = candidates.fetch(&runtime, digest);
                    let Some(block) = unless_dropped(&mut tx, fetched).await else { return };
                    candidates.persist(round.view().get(), block)
                }
            };
            if let Some(Ok(true)) = unless_dropped(&mut tx, synced).await {
                tracing::debug!(round = %round, "certified");
                tx.send_lossy(true);
            }
        });
        rx
    }
}

impl<E> Relay for LedgerApp<E>
where
    E: Spawner + Clock + Metrics,
{
    type Digest = Digest;
    type PublicKey = PublicKey;
    type Plan = Plan<PublicKey>;

    fn broadcast(&mut self, digest: Digest, plan: Plan<PublicKey>) -> commonware_actor::Feedback {
        match plan {
            Plan::Propose { round } => {
                let built = self.rounds().built.remove(&round);
                match built {
                    Some(block) if block.digest() == digest => {
                        let feedback = self.blocks.broadcast(Recipients::All, block.clone());
                        self.store(round, block);
                        feedback
                    }
                    _ => {
                        tracing::warn!(round = %round, "asked to send a block this node did not build");
                        commonware_actor::Feedback::Ok
                    }
                }
            }
            // Validators that missed the block (the leader went silent on them): send it on.
            Plan::Forward { recipients, .. } => match self.candidates.get(&digest) {
                Some(block) => self.blocks.broadcast(recipients, block),
                None => commonware_actor::Feedback::Ok,
            },
            // Only term-start candidates built before their parent certifies are prepared;
            // this application builds after (no `prepare`).
            Plan::Prepare { .. } => commonware_actor::Feedback::Ok,
        }
    }
}

impl<E> Reporter for LedgerApp<E>
where
    E: Spawner + Clock + Metrics,
{
    type Activity = Activity<Scheme, Digest>;

    fn report(&mut self, activity: Self::Activity) -> commonware_actor::Feedback {
        // Marshal hears finalizations only (see the module docs); votes and other certificates
        // matter to simplex alone.
        let Activity::Finalization(f) = activity else {
            return commonware_actor::Feedback::Ok;
        };
        let round = f.proposal.round;
        self.candidates.finalized(round.view().get(), &f.proposal.payload);
        {
            let mut rounds = self.rounds();
            rounds.built.retain(|r, _| *r > round);
            rounds.durable.retain(|(r, _), _| *r > round);
        }
        let _ = self.applier.send(ToApply::Finalization(f.clone()));
        let executed = self.chain.knows(&hash_of(&f.proposal.payload));
        if !executed {
            self.catch_up(f.clone());
        }
        {
            // A late finalization of an earlier view must not displace a newer one.
            let mut pending = crate::lock(&self.for_marshal);
            pending.urgent |= !executed;
            if pending.newest.as_ref().is_none_or(|n| n.proposal.round < round) {
                pending.newest = Some(f);
            }
        }
        let _ = self.marshal_wake.try_send(());
        commonware_actor::Feedback::Ok
    }
}

/// Wall-clock Unix ms (for callers outside a runtime).
pub fn system_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_leader_looks_again_at_the_first_of_replan_due_time_and_deadline() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let (now, deadline) = (at(10_000), at(10_000) + IDLE_WAIT);
        assert_eq!(idle_wake(now, deadline, None), now + LIVENESS_RECHECK, "liveness is planned again first");
        assert_eq!(idle_wake(now, deadline, Some(10_100)), at(10_100), "a job due sooner wakes it");
        assert_eq!(idle_wake(now, at(10_050), Some(10_100)), at(10_050), "never past the deadline");
        assert_eq!(idle_wake(now, deadline, Some(9_000)), at(9_000), "a time already passed: at once");
    }

    #[test]
    fn a_leader_proposes_an_empty_block_only_when_a_job_is_due_or_its_wait_is_over() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let genesis = archipel_ledger::State::genesis(archipel_ledger::GenesisState::default());
        let mut header = archipel_ledger::genesis_header(&genesis);
        header.timestamp_ms = 10_000;
        let mut block = archipel_ledger::Block { header, liveness: vec![], txs: vec![] };
        let deadline = at(10_500);
        assert!(!ready(&block, None, at(10_000), deadline), "empty, nothing due: wait");
        assert!(!ready(&block, Some(10_001), at(10_000), deadline), "due 1 ms after the block's time");
        assert!(ready(&block, Some(10_000), at(10_000), deadline), "due at the block's time");
        assert!(ready(&block, Some(9_000), at(10_000), deadline));
        assert!(ready(&block, None, deadline, deadline), "the wait is over");
        block.liveness.push(archipel_ledger::LivenessChange::Down { node: archipel_types::NodeId([1; 32]) });
        assert!(ready(&block, None, at(10_000), deadline), "a liveness change goes at once");
    }

    #[test]
    fn an_early_block_comes_no_sooner_than_the_gap_after_its_parent() {
        assert_eq!(early_wake_ms(1_000, None), None);
        assert_eq!(early_wake_ms(1_000, Some(1_500)), Some(1_500));
        assert_eq!(early_wake_ms(1_000, Some(1_001)), Some(1_000 + MIN_WAKE_GAP_MS), "jobs due 1 ms apart wait");
        assert_eq!(early_wake_ms(u64::MAX, Some(5)), Some(u64::MAX), "no overflow");
    }
}
