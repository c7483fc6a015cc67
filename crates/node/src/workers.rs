//! A node's background duties, each a [`Worker`]: a name, an interval and one step at a time,
//! with its last status kept for `/v1/workers` and the logs. No free-floating loops.
//!
//! - [`Repairer`] (storage nodes): finds objects whose holders are unhealthy in finalized state
//!   (gone, outside the fence, or Down past `repair_grace_ms`), takes those whose repair duty
//!   falls to this node (a rendezvous hash over the live storage nodes, so every node computes
//!   the same owner and exactly one acts), rebuilds the lost shards on policy-compliant nodes
//!   chosen by `placement::replace`, and submits `MoveShards`. When the geofence holds no node
//!   with room, the object stays degraded and is reported — never placed outside it.
//! - [`Collector`] (storage nodes): deletes the shards of versions the ledger no longer lists on
//!   this node (deleted, replaced, moved away, or uploads never committed) once they are
//!   [`COLLECT_AFTER`] old, so an upload in progress is never collected.
//!
//! Both read state by scanning every object (O(objects) per pass); an index by holder is a
//! later step (ARCHITECTURE.md).

use crate::shards::ShardService;
use archipel_consensus::Chain;
use archipel_crypto::Identity;
use archipel_ledger::storage::{MAX_RECEIPT_TTL_MS, ObjectRecord, ShardMove, auditor_among, object_id};
use archipel_ledger::{Hash, LeaseStatus, Payload, Transaction};
use archipel_objects::http::HttpShards;
use archipel_objects::transfer::{Holder, Shards as _};
use archipel_types::{NodeId, PlacementPolicy};
use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One background duty.
pub trait Worker: Send + 'static {
    /// Its name, for status and logs.
    fn name(&self) -> &'static str;
    /// Pause between steps.
    fn interval(&self) -> Duration;
    /// One pass; its summary, or why it failed.
    fn step(&mut self) -> impl Future<Output = Result<String, String>> + Send;
}

/// What a worker last did.
#[derive(Clone, Debug, Serialize, Default)]
pub struct WorkerStatus {
    /// Steps run.
    pub steps: u64,
    /// Whether the last step succeeded.
    pub ok: bool,
    /// Its summary or error.
    pub last: String,
    /// When it ran (Unix ms).
    pub at_ms: u64,
}

/// Every worker's status, by name.
#[derive(Clone, Debug, Default)]
pub struct WorkerStatuses(Arc<Mutex<BTreeMap<&'static str, WorkerStatus>>>);

impl WorkerStatuses {
    /// A copy of every status.
    pub fn snapshot(&self) -> BTreeMap<&'static str, WorkerStatus> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Storage figures the workers keep for `/metrics`.
#[derive(Debug, Default)]
pub struct StorageCounters {
    /// Objects with an unhealthy or suspect holder in finalized state, at the repairer's last pass.
    pub degraded_objects: std::sync::atomic::AtomicU64,
    /// Repairs (`MoveShards`) this node submitted.
    pub repairs_submitted: std::sync::atomic::AtomicU64,
    /// Repairs this node rebuilt whose `MoveShards` its own mempool refused (no funds for the
    /// fee, a move another repairer made first).
    pub repairs_refused: std::sync::atomic::AtomicU64,
    /// Audits this node put that the holder passed.
    pub audits_passed: std::sync::atomic::AtomicU64,
    /// Audits this node put that the holder failed (reported with `AuditFailed`).
    pub audits_failed: std::sync::atomic::AtomicU64,
}

/// Runs `worker` on `handle` until `stop` turns true.
pub fn spawn<W: Worker>(
    handle: &tokio::runtime::Handle,
    mut worker: W,
    statuses: WorkerStatuses,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    handle.spawn(async move {
        loop {
            let result = worker.step().await;
            let name = worker.name();
            {
                let mut all = statuses.0.lock().unwrap_or_else(|e| e.into_inner());
                let s = all.entry(name).or_default();
                s.steps += 1;
                s.ok = result.is_ok();
                s.at_ms = crate::api::system_now_ms();
                s.last = match &result {
                    Ok(m) | Err(m) => m.clone(),
                };
            }
            if let Err(e) = &result {
                tracing::warn!(worker = name, error = %e, "worker step failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(worker.interval()) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
}

/// Signs and submits the node's own transactions (repairs, audit reports, bids, heartbeats,
/// results) from its account. One per node, shared by its workers (clones share it, and one
/// submits at a time): each transaction takes the nonce after the node's own run of waiting
/// ones in its mempool ([`Chain::next_free_nonce`]), so two workers never submit the same
/// nonce, and a transaction the proposers dropped (front-run, or no longer valid) never holds
/// the next ones behind it.
#[derive(Clone, Debug)]
pub struct Submitter {
    chain: Arc<Chain>,
    identity: Identity,
    tx_out: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    one_at_a_time: Arc<Mutex<()>>,
}

impl Submitter {
    /// The submitter of the node with `identity`, gossiping its transactions on `tx_out`.
    pub fn new(chain: Arc<Chain>, identity: Identity, tx_out: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) -> Self {
        Submitter { chain, identity, tx_out, one_at_a_time: Arc::new(Mutex::new(())) }
    }

    /// Signs `payload` at the next free nonce and submits it to this node's mempool and the
    /// validators. Returns the transaction's hash.
    pub fn submit(&self, network: &Hash, payload: Payload) -> Result<Hash, String> {
        let me = self.identity.node_id();
        let _turn = self.one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
        let nonce = self.chain.next_free_nonce(&me);
        let stx = Transaction { signer: me, nonce, payload }.sign(&self.identity, network);
        let bytes = stx.to_bytes();
        let hash = self.chain.submit(stx, bytes.len(), crate::api::system_now_ms()).map_err(|e| e.to_string())?;
        let _ = self.tx_out.send(bytes);
        Ok(hash)
    }
}

/// A pass's summary, followed by its notes if any.
fn summarize(mut summary: String, notes: &[String]) -> String {
    if !notes.is_empty() {
        summary.push_str(": ");
        summary.push_str(&notes.join("; "));
    }
    summary
}

/// A repair not retried before this long after it failed.
pub const REPAIR_BACKOFF: Duration = Duration::from_secs(15);

/// How long an object may stay degraded, its repair's duty holder up, before the next node in
/// line takes the repair up too — and as long again for each node after it. Time for the holder
/// to rebuild a large object and retry a few times ([`REPAIR_BACKOFF`]); a holder that is up but
/// cannot repair (no funds for the fee, a broken disk or network) or will not (Byzantine) delays
/// the repair by this much, instead of leaving the object degraded for good. The line has no end:
/// nodes that ground their keys to stand first for an object delay its repair by a minute each.
pub const REPAIR_FALLBACK_AFTER: Duration = Duration::from_secs(60);
/// Repairs of other nodes' duties (as a backup) one node starts per step, after its own: a mass
/// failure, when many repairs run late, does not make every node rebuild every late object.
pub const BACKUP_REPAIRS_PER_STEP: usize = 1;

/// How far down the line for an object's repair a node may stand and take it up, having seen the
/// object degraded for `seen_for`: 0 (the duty holder) at once, one place more per
/// `fallback_after`.
pub fn repair_reach(seen_for: Duration, fallback_after: Duration) -> usize {
    if fallback_after.is_zero() {
        return usize::MAX;
    }
    usize::try_from(seen_for.as_nanos() / fallback_after.as_nanos()).unwrap_or(usize::MAX)
}

/// One entry of the repair queue: the object, its bucket's policy, the shard indices to repair.
pub type Degraded = (ObjectRecord, PlacementPolicy, Vec<usize>);

/// When this node first saw each degraded object (by version and holder generation).
pub type SeenDegraded = HashMap<(Hash, u32), Instant>;

/// The repairs `me` starts now from `queue` among the `live` storage nodes: every object whose
/// duty holder it is, then at most [`BACKUP_REPAIRS_PER_STEP`] of those the line reaches it for
/// ([`repair_reach`] of the time since `seen` first saw each), longest waiting first, skipping
/// versions in `tried`. `seen` is updated: entries for objects no longer in `queue` go, new ones
/// are stamped `now`. Returns the jobs and how many of them are backups.
pub fn pick_repairs(
    queue: Vec<Degraded>,
    live: &[NodeId],
    me: &NodeId,
    seen: &mut SeenDegraded,
    tried: &HashMap<Hash, Instant>,
    now: Instant,
    fallback_after: Duration,
) -> (Vec<Degraded>, usize) {
    // An object that left the queue (repaired, deleted) or was moved starts its wait afresh if
    // it is degraded again.
    let in_queue: BTreeSet<(Hash, u32)> = queue.iter().map(|(o, _, _)| (o.version, o.generation)).collect();
    seen.retain(|v, _| in_queue.contains(v));
    let (mut own, mut late) = (Vec::new(), Vec::new());
    for entry in queue {
        let since = *seen.entry((entry.0.version, entry.0.generation)).or_insert(now);
        let reach = repair_reach(now.saturating_duration_since(since), fallback_after);
        match archipel_placement::duty_rank_within(&repair_seed(&entry.0.version), live.iter().copied(), me, reach) {
            Some(0) => own.push(entry),
            Some(_) if !tried.contains_key(&entry.0.version) => late.push((since, entry)),
            _ => {}
        }
    }
    late.sort_by_key(|(since, _)| *since);
    let backups = late.len().min(BACKUP_REPAIRS_PER_STEP);
    own.extend(late.into_iter().take(BACKUP_REPAIRS_PER_STEP).map(|(_, entry)| entry));
    (own, backups)
}

/// Repairs the objects whose repair duty falls to this node, and (a few per step) those whose
/// duty holder left them degraded for long enough that the line reaches this node
/// ([`repair_reach`]).
#[derive(Debug)]
pub struct Repairer {
    chain: Arc<Chain>,
    identity: Identity,
    shards: HttpShards,
    submitter: Submitter,
    tried: HashMap<Hash, Instant>,
    /// Degraded objects (by version and generation of holders) and when this node first saw
    /// each degraded, for as long as they stay so: what backups count their wait from. A move
    /// makes a new generation, so a partly repaired object, or one that lost another holder,
    /// gives its duty holder a fresh head start.
    seen: SeenDegraded,
    fallback_after: Duration,
    submitted: u64,
    counters: Arc<StorageCounters>,
}

impl Repairer {
    /// The repairer of the node with `identity`, counting into `counters`.
    pub fn new(chain: Arc<Chain>, identity: Identity, submitter: Submitter, counters: Arc<StorageCounters>) -> Self {
        let shards = HttpShards::new(identity.clone());
        Repairer {
            chain,
            identity,
            shards,
            submitter,
            tried: HashMap::new(),
            seen: HashMap::new(),
            fallback_after: REPAIR_FALLBACK_AFTER,
            submitted: 0,
            counters,
        }
    }

    /// This repairer with backups waiting `after` per place in line instead of
    /// [`REPAIR_FALLBACK_AFTER`] (tests: `ARCHIPEL_REPAIR_FALLBACK_SECS`).
    pub fn with_fallback_after(mut self, after: Duration) -> Self {
        self.fallback_after = after;
        self
    }
}

/// Objects one node rebuilds at once. With [`archipel_objects::repair::REPAIR_SEGMENTS_IN_FLIGHT`]
/// segments each, at most 4 × 4 segments' shards (k read + the rebuilt ones, ≤ 2 MiB each at the
/// default segment size: ≤ 192 MiB at 4+2) are held.
pub const REPAIRS_IN_FLIGHT: usize = 4;

/// One object to repair, read from finalized state.
struct Job {
    object: ObjectRecord,
    policy: PlacementPolicy,
    healthy: Vec<(usize, Holder)>,
    /// Where shards are read from: the healthy holders and those whose shard failed an audit
    /// but are up (their other shards, or a shard that recovered, still pass the hash check).
    sources: Vec<(usize, Holder)>,
    missing: Vec<usize>,
    exclude: BTreeSet<NodeId>,
}

/// The seed of an object's repair duty.
pub fn repair_seed(version: &Hash) -> [u8; 32] {
    Hash::of(&[b"archipel/repair/v1", &version.0]).0
}

/// The shard indices of `object` to repair at `now_ms`: holders gone, outside the fence or down
/// past the grace, and shards that failed an audit.
pub fn to_repair(
    st: &archipel_ledger::State,
    object: &ObjectRecord,
    policy: &PlacementPolicy,
    now_ms: u64,
) -> Vec<usize> {
    object
        .holders
        .iter()
        .enumerate()
        .filter(|(i, h)| st.unhealthy_at(h, policy, now_ms).is_some() || object.suspect.contains(&(*i as u8)))
        .map(|(i, _)| i)
        .collect()
}

/// The shards of `missing` in the order a repair places them when the fence lacks room for
/// all: those no source serves (holder down or gone) first, then those whose holder still
/// serves its other shards (a failed audit); by index within each.
fn repair_order(missing: &[usize], sources: &[(usize, Holder)]) -> Vec<usize> {
    let mut order = missing.to_vec();
    order.sort_by_key(|i| (sources.iter().any(|(s, _)| s == i), *i));
    order
}

/// Objects with holders unhealthy at `now_ms` in `st`, each with its policy: the repair queue.
/// Reads the ledger's index of holders that are not up where they registered, and of suspect
/// shards ([`archipel_ledger::State::repair_candidates`]), not every object.
pub fn degraded(st: &archipel_ledger::State, now_ms: u64) -> Vec<Degraded> {
    let mut policies: HashMap<String, Option<PlacementPolicy>> = HashMap::new();
    let mut out = Vec::new();
    for o in st.repair_candidates() {
        let policy = policies.entry(o.bucket.clone()).or_insert_with(|| st.bucket(&o.bucket).map(|b| b.policy)).clone();
        let Some(policy) = policy else { continue };
        let bad = to_repair(st, &o, &policy, now_ms);
        if !bad.is_empty() {
            out.push((o, policy, bad));
        }
    }
    out
}

fn url_of(st: &archipel_ledger::State, node: &NodeId) -> String {
    st.nodes().get(node).map(|r| format!("http://{}", r.descriptor.descriptor.api_address)).unwrap_or_default()
}

impl Worker for Repairer {
    fn name(&self) -> &'static str {
        "repair"
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    async fn step(&mut self) -> Result<String, String> {
        let me = self.identity.node_id();
        let (queue, live) = self.chain.with_state(|st| {
            // Our clock, or the chain's if ahead: an idle chain makes no blocks, so its time
            // stands still while a holder stays down.
            let now_ms = crate::api::system_now_ms().max(st.chain().timestamp_ms);
            (degraded(st, now_ms), st.live_storage_nodes())
        });
        let queued = queue.len();
        self.tried.retain(|_, at| at.elapsed() < REPAIR_BACKOFF);
        // Who does what, outside the chain's lock (a place in line hashes the live nodes).
        let (picked, backups) =
            pick_repairs(queue, &live, &me, &mut self.seen, &self.tried, Instant::now(), self.fallback_after);
        let (jobs, candidates, urls, network) = self.chain.with_state(|st| {
            let jobs: Vec<Job> = picked
                .into_iter()
                .map(|(object, policy, missing)| {
                    let holder = |(i, n): (usize, &NodeId)| (i, Holder { node: *n, url: url_of(st, n) });
                    let healthy =
                        object.holders.iter().enumerate().filter(|(i, _)| !missing.contains(i)).map(holder).collect();
                    let sources = object
                        .holders
                        .iter()
                        .enumerate()
                        .filter(|(i, n)| {
                            !missing.contains(i)
                                || (object.suspect.contains(&(*i as u8)) && st.lease_status(n) == LeaseStatus::Up)
                        })
                        .map(holder)
                        .collect();
                    let exclude = missing.iter().map(|i| object.holders[*i]).collect();
                    Job { object, policy, healthy, sources, missing, exclude }
                })
                .collect();
            let candidates = st.storage_candidates();
            let urls: HashMap<NodeId, String> = candidates.iter().map(|c| (c.node, url_of(st, &c.node))).collect();
            (jobs, candidates, urls, st.network())
        });
        let live = live.len();
        self.counters.degraded_objects.store(queued as u64, std::sync::atomic::Ordering::Relaxed);
        let (mut repaired, mut degraded_left, mut notes) = (0, 0, Vec::new());
        // Plan every job first (placement is pure), then rebuild up to REPAIRS_IN_FLIGHT at
        // once — an object's repair is mostly waiting for shards — and submit each move as its
        // rebuild ends (the submitter numbers them in that order).
        let mut planned = Vec::new();
        for job in jobs {
            let o = &job.object;
            if self.tried.contains_key(&o.version) {
                degraded_left += 1;
                continue;
            }
            self.tried.insert(o.version, Instant::now());
            let name = format!("{}/{}", o.bucket, o.key);
            let k = usize::from(o.code.data);
            if job.sources.len() < k {
                degraded_left += 1;
                notes.push(format!("{name}: {} readable holders of the {k} needed — unrecoverable", job.sources.len()));
                continue;
            }
            let healthy_map: BTreeMap<usize, NodeId> = job.healthy.iter().map(|(i, h)| (*i, h.node)).collect();
            // Shards whose holder is down or gone first, then those that failed an audit (their
            // holder still serves the others): when the fence has room for only some, the
            // shards no one serves are rebuilt, and the rest wait for room.
            let order = repair_order(&job.missing, &job.sources);
            let (targets, short) = archipel_placement::replace_what_fits(
                &job.policy,
                &candidates,
                &o.version.0,
                o.shard_bytes,
                &healthy_map,
                &order,
                &job.exclude,
            );
            if let Some(e) = short {
                degraded_left += 1;
                let waiting = order.len() - targets.len();
                notes.push(format!("{name}: {waiting} of {} shards stay degraded: {e}", order.len()));
                if targets.is_empty() {
                    continue;
                }
            }
            let targets: Vec<(usize, Holder)> = targets
                .into_iter()
                .map(|(i, n)| (i, Holder { node: n, url: urls.get(&n).cloned().unwrap_or_default() }))
                .collect();
            planned.push((job, name, targets));
        }
        let shards = &self.shards;
        let network = &network;
        let mut rebuilds = futures::stream::iter(planned)
            .map(|(job, name, targets)| async move {
                let r = archipel_objects::repair::rebuild(shards, &job.object, &job.sources, &targets, network).await;
                (job, name, r)
            })
            .buffer_unordered(REPAIRS_IN_FLIGHT);
        while let Some((job, name, rebuilt)) = rebuilds.next().await {
            let o = &job.object;
            let moves: Vec<ShardMove> = match rebuilt {
                Ok(m) => m,
                Err(e) => {
                    degraded_left += 1;
                    notes.push(format!("{name}: repair failed: {e}"));
                    continue;
                }
            };
            // Another repairer's move finalized while this one rebuilt: this move is stale (its
            // receipts name a generation that is gone), and would only wait in the pool.
            let now = self.chain.with_state(|st| st.object(&o.bucket, &o.key).map(|x| (x.version, x.generation)));
            if now != Some((o.version, o.generation)) {
                notes.push(format!("{name}: moved or replaced by someone else meanwhile"));
                continue;
            }
            let payload =
                Payload::MoveShards { bucket: o.bucket.clone(), key: o.key.clone(), version: o.version, moves };
            match self.submitter.submit(network, payload) {
                Ok(_) => {
                    self.submitted += 1;
                    self.counters.repairs_submitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    repaired += 1;
                    tracing::info!(object = %name, shards = job.missing.len(), "repair submitted");
                }
                Err(e) => {
                    degraded_left += 1;
                    self.counters.repairs_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    notes.push(format!("{name}: the repair was refused: {e}"));
                }
            }
        }
        drop(rebuilds);
        let summary = format!(
            "{queued} objects degraded in finalized state ({live} live storage nodes share the repairs); this node: \
             {repaired} repairs submitted now ({} since start), {degraded_left} left degraded{}",
            self.submitted,
            if backups > 0 {
                format!(", {backups} taken up as a backup (their duty holder left them degraded too long)")
            } else {
                String::new()
            }
        );
        Ok(summarize(summary, &notes))
    }
}

/// Audits the objects whose audit in the current epoch falls to this node: fetches the
/// challenged shard from its holder and checks it against the manifest (read from the other
/// holders and checked against the ledger's root); a missing, corrupt or made-up shard is
/// reported with `AuditFailed`, which marks it for repair and lowers the holder's reputation.
/// A holder that is down is left to the repairer.
#[derive(Debug)]
pub struct Auditor {
    chain: Arc<Chain>,
    identity: Identity,
    shards: HttpShards,
    submitter: Submitter,
    done: BTreeSet<(Hash, u64)>,
    /// The objects (id and version) this node audits in each epoch it looked at, with the live
    /// set they were found with.
    duties: BTreeMap<u64, (Hash, Vec<(Hash, Hash)>)>,
    passed: u64,
    failed: u64,
    counters: Arc<StorageCounters>,
    /// Pause between steps: at most one audit epoch, so no epoch passes without its audits.
    interval: Duration,
}

/// Longest pause between two audit steps.
const AUDIT_STEP_MAX: Duration = Duration::from_secs(5);
/// Shortest pause between two audit steps (the first in an epoch reads the index for its duties).
const AUDIT_STEP_MIN: Duration = Duration::from_secs(1);

impl Auditor {
    /// The auditor of the node with `identity`, counting into `counters`.
    pub fn new(chain: Arc<Chain>, identity: Identity, submitter: Submitter, counters: Arc<StorageCounters>) -> Self {
        let shards = HttpShards::new(identity.clone());
        let epoch = Duration::from_millis(chain.with_state(|st| st.params().audit_epoch_ms));
        let interval = epoch.clamp(AUDIT_STEP_MIN, AUDIT_STEP_MAX);
        Auditor {
            chain,
            identity,
            shards,
            submitter,
            done: BTreeSet::new(),
            duties: BTreeMap::new(),
            passed: 0,
            failed: 0,
            counters,
            interval,
        }
    }
}

/// One challenge to put.
struct Challenge {
    object: ObjectRecord,
    epoch: u64,
    index: u8,
    segment: u64,
    holder: Holder,
    sources: Vec<Holder>,
}

impl Worker for Auditor {
    fn name(&self) -> &'static str {
        "audit"
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn step(&mut self) -> Result<String, String> {
        use archipel_ledger::storage::audit_challenge;
        let me = self.identity.node_id();
        let done = &self.done;
        let duties = &mut self.duties;
        let (challenges, network, epoch) = self.chain.with_state(|st| {
            let now_ms = crate::api::system_now_ms().max(st.chain().timestamp_ms);
            let epoch = st.audit_epoch(now_ms);
            // The epoch before too (the ledger takes a report for it): a step that came late does
            // not skip an epoch's audits.
            let epochs: Vec<u64> = [epoch.checked_sub(1), Some(epoch)].into_iter().flatten().collect();
            // Who audits what depends on the live storage nodes: a change makes every list stale.
            let live = st.live_storage_nodes();
            let live_set = Hash::of(&live.iter().map(|n| n.as_bytes().as_slice()).collect::<Vec<_>>());
            duties.retain(|e, (set, _)| epochs.contains(e) && *set == live_set);
            let unknown: Vec<u64> = epochs.iter().copied().filter(|e| !duties.contains_key(e)).collect();
            // Found once per epoch (and live set), not per step, from the object index: the
            // objects on the holders this node audits. Objects put after it wait for the next.
            for e in unknown {
                let list =
                    st.audit_duties(&me, e, &live).iter().map(|o| (object_id(&o.bucket, &o.key), o.version)).collect();
                duties.insert(e, (live_set, list));
            }
            let mut out = Vec::new();
            for (epoch, (id, version)) in duties.iter().flat_map(|(e, (_, ids))| ids.iter().map(move |d| (*e, *d))) {
                // Still this version, still this node's duty (a move may have changed its holders).
                let Some(o) = st.object_by_id(&id).filter(|o| o.version == version) else { continue };
                if done.contains(&(version, epoch)) || auditor_among(&o, epoch, &live) != Some(me) {
                    continue;
                }
                let (index, segment) = audit_challenge(&o, epoch);
                let holder = o.holders[usize::from(index)];
                if o.suspect.contains(&index) || st.lease_status(&holder) != LeaseStatus::Up {
                    continue;
                }
                let sources = o
                    .holders
                    .iter()
                    .filter(|h| **h != holder && st.lease_status(h) == LeaseStatus::Up)
                    .map(|h| Holder { node: *h, url: url_of(st, h) })
                    .collect();
                let holder = Holder { node: holder, url: url_of(st, &holder) };
                out.push(Challenge { object: o, epoch, index, segment, holder, sources });
            }
            (out, st.network(), epoch)
        });
        self.done.retain(|(_, e)| *e + 2 >= epoch);
        let mut notes = Vec::new();
        for c in challenges {
            self.done.insert((c.object.version, c.epoch));
            let name = format!("{}/{}", c.object.bucket, c.object.key);
            let manifest = match archipel_objects::transfer::fetch_manifest(&self.shards, &c.object, &c.sources).await {
                Ok(m) => m,
                Err(e) => {
                    // Not the audited holder's fault: no verdict.
                    notes.push(format!("{name}: no manifest to check against ({e})"));
                    continue;
                }
            };
            let Some(expected) = manifest.segments.get(c.segment as usize).and_then(|h| h.get(usize::from(c.index)))
            else {
                continue;
            };
            let answer = self.shards.get_shard(&c.holder, &c.object.version, c.index, c.segment).await;
            let why = match answer {
                Ok(bytes) if archipel_objects::shard_hash(&bytes) == *expected => {
                    self.passed += 1;
                    self.counters.audits_passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                Ok(_) => "served bytes that do not match the manifest".to_string(),
                Err(e) if e.holder_lacks_shard() => e.message,
                Err(e) => {
                    // Busy, rate-limited, slow or unreachable: no verdict. A holder that is down
                    // is the lease's business; reporting it here would let anyone who keeps a
                    // node busy (or the auditor's own network) cost it reputation.
                    notes.push(format!(
                        "{name}: holder {} did not answer ({}): no verdict",
                        c.holder.node.short(),
                        e.message
                    ));
                    continue;
                }
            };
            self.failed += 1;
            self.counters.audits_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(object = %name, holder = %c.holder.node.short(), shard = c.index, segment = c.segment, why = %why, "audit failed");
            let payload = Payload::AuditFailed {
                bucket: c.object.bucket.clone(),
                key: c.object.key.clone(),
                version: c.object.version,
                epoch: c.epoch,
            };
            match self.submitter.submit(&network, payload) {
                Ok(_) => {
                    notes.push(format!("{name}: holder {} failed ({why}): reported", c.holder.node.short()));
                }
                Err(e) => notes.push(format!(
                    "{name}: holder {} failed ({why}); the report was refused: {e}",
                    c.holder.node.short()
                )),
            }
        }
        let summary = format!("epoch {epoch}: {} audits passed, {} failed since start", self.passed, self.failed);
        Ok(summarize(summary, &notes))
    }
}

/// Shards of versions the ledger no longer lists here are deleted once this old.
pub const COLLECT_AFTER: Duration = Duration::from_secs(600);

/// Deletes shards this node no longer holds for anyone.
#[derive(Debug)]
pub struct Collector {
    chain: Arc<Chain>,
    service: Arc<ShardService>,
    me: NodeId,
    after: Duration,
    /// Time between passes ([`COLLECT_EVERY`] unless set).
    every: Duration,
    /// Versions found unlisted by the last pass: deleted only if still unlisted at the next.
    unlisted: BTreeSet<[u8; 32]>,
}

impl Collector {
    /// The collector of `service`'s store, deleting unlisted versions once `after` old.
    pub fn new(chain: Arc<Chain>, service: Arc<ShardService>, me: NodeId, after: Duration) -> Self {
        Collector { chain, service, me, after, every: COLLECT_EVERY, unlisted: BTreeSet::new() }
    }

    /// Passes `every` apart (within 1 s and 1 h) instead of [`COLLECT_EVERY`] (tests:
    /// `ARCHIPEL_COLLECT_EVERY_SECS`).
    pub fn with_interval(mut self, every: Duration) -> Self {
        self.every = every.clamp(Duration::from_secs(1), Duration::from_secs(3_600));
        self
    }
}

/// Time between two passes of the collector.
pub const COLLECT_EVERY: Duration = Duration::from_secs(30);

/// How far the validators' block time may be from this node's clock when the collector compares
/// them (issue 17 bounds block time to a few seconds of the validators' clocks).
const COLLECT_CLOCK_MARGIN_MS: u64 = 60_000;

impl Worker for Collector {
    fn name(&self) -> &'static str {
        "collect"
    }

    fn interval(&self) -> Duration {
        self.every
    }

    async fn step(&mut self) -> Result<String, String> {
        // Never from a view that may be incomplete: a store that failed a read lists nothing,
        // and a stalled ledger is behind.
        if let Some(stall) = self.chain.applier().stall() {
            return Err(format!("skipped: the ledger is stalled ({})", stall.reason));
        }
        let (listed, fault, head_ms) = self.chain.with_state(|st| {
            let listed: BTreeSet<[u8; 32]> = st.objects_on(&self.me).into_iter().map(|o| o.version.0).collect();
            (listed, st.store_fault(), st.chain().timestamp_ms)
        });
        if let Some(e) = fault {
            return Err(format!("skipped: the state store failed ({e})"));
        }
        let after = self.after;
        let before = std::mem::take(&mut self.unlisted);
        // Which versions to delete, from the files and the index's list of this node's objects.
        let store = self.service.clone();
        let (unlisted, doomed) = tokio::task::spawn_blocking(move || {
            let store = store.store();
            let mut doomed = Vec::new();
            let mut unlisted = BTreeSet::new();
            let now_ms = crate::api::system_now_ms();
            for v in store.versions().map_err(|e| e.to_string())? {
                let Some(age) = store.age(&v) else { continue };
                if listed.contains(&v) || age < after {
                    continue;
                }
                // A receipt signed when these files were written (or last sealed) is valid for
                // at most MAX_RECEIPT_TTL_MS: only once this node's finalized state has a block
                // later than that can it know the version was never committed. A node that lags
                // behind (cut off from the validators, still reached by clients) deletes nothing
                // a block it has not seen yet may list.
                let written_ms = now_ms.saturating_sub(age.as_millis() as u64);
                if head_ms < written_ms.saturating_add(MAX_RECEIPT_TTL_MS + COLLECT_CLOCK_MARGIN_MS) {
                    continue;
                }
                // Unlisted in two passes in a row, a pass apart, before anything is deleted.
                if !before.contains(&v) {
                    unlisted.insert(v);
                    continue;
                }
                doomed.push((v, age, store.object_of(&v)));
            }
            Ok::<_, String>((unlisted, doomed))
        })
        .await
        .map_err(|e| format!("collect task: {e}"))??;
        // Checked once more, without the index: a version whose object (kept beside its shards
        // when sealed) holds it on this node on the ledger is never deleted, whatever the index
        // says.
        let me = self.me;
        let (doomed, kept): (Vec<_>, Vec<_>) = self.chain.with_state(|st| {
            doomed.into_iter().partition(|(v, _, object)| {
                object.is_none_or(|o| {
                    st.object_by_id(&Hash(o)).is_none_or(|rec| rec.version.0 != *v || !rec.holders.contains(&me))
                })
            })
        });
        for (v, _, _) in &kept {
            tracing::error!(version = %hex::encode(&v[..8]), "the ledger lists this version but its object index does not list it on this node: kept");
        }
        let store = self.service.clone();
        let summary = tokio::task::spawn_blocking(move || {
            let store = store.store();
            let (mut freed, mut deleted) = (0u64, 0);
            for (v, age, _) in doomed {
                // Unless it was written or sealed since its age was read.
                if let Some(bytes) = store.delete_if_idle(&v, age).map_err(|e| e.to_string())? {
                    freed += bytes;
                    deleted += 1;
                }
            }
            let kept = if kept.is_empty() {
                String::new()
            } else {
                format!("; {} listed versions kept (see the log)", kept.len())
            };
            Ok::<_, String>(format!("{deleted} unlisted versions deleted, {freed} bytes freed{kept}"))
        })
        .await
        .map_err(|e| format!("collect task: {e}"))??;
        self.unlisted = unlisted;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A degraded object of version `v` (generation `generation`) as the repair queue has it.
    fn degraded_object(v: u8, generation: u32) -> Degraded {
        let object = ObjectRecord {
            bucket: "b".into(),
            key: format!("k{v}"),
            version: Hash([v; 32]),
            size: 1,
            segment_bytes: 1,
            code: archipel_types::ErasureCode::DEFAULT,
            manifest_root: Hash::ZERO,
            etag: String::new(),
            holders: vec![NodeId([v; 32]); 6],
            shard_bytes: 6,
            created_height: 1,
            created_ms: 1,
            generation,
            suspect: vec![],
        };
        (object, PlacementPolicy::anywhere(archipel_types::ErasureCode::DEFAULT), vec![0])
    }

    #[test]
    fn repairs_are_picked_by_place_in_line_and_time_seen() {
        let live: Vec<NodeId> = (1..=12u8).map(|i| NodeId([i; 32])).collect();
        let after = Duration::from_secs(60);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let rank = |o: &Degraded, n: &NodeId| {
            archipel_placement::duty_rank(&repair_seed(&o.0.version), live.iter().copied(), n).unwrap()
        };
        // The nodes at places 0, 1, 2 and 3 in line for object 1.
        let obj = degraded_object(1, 0);
        let at = |r: usize| *live.iter().find(|n| rank(&obj, n) == r).unwrap();
        let picks = |me: &NodeId, seen: &mut SeenDegraded, queue: Vec<Degraded>, now: Instant| {
            let (jobs, backups) = pick_repairs(queue, &live, me, seen, &HashMap::new(), now, after);
            (jobs.into_iter().map(|(o, _, _)| (o.version, o.generation)).collect::<Vec<_>>(), backups)
        };
        let key = (obj.0.version, 0);
        // The duty holder at first sight; the others not yet.
        assert_eq!(picks(&at(0), &mut SeenDegraded::new(), vec![obj.clone()], t0), (vec![key], 0));
        let mut seen1 = SeenDegraded::new();
        assert_eq!(picks(&at(1), &mut seen1, vec![obj.clone()], t0), (vec![], 0));
        // The first backup one wait after it first saw the object, not before.
        assert_eq!(picks(&at(1), &mut seen1, vec![obj.clone()], t0 + s(59)), (vec![], 0));
        assert_eq!(picks(&at(1), &mut seen1, vec![obj.clone()], t0 + s(60)), (vec![key], 1));
        // The second after two waits; the third not then.
        let mut seen2 = SeenDegraded::new();
        let mut seen3 = SeenDegraded::new();
        picks(&at(2), &mut seen2, vec![obj.clone()], t0);
        picks(&at(3), &mut seen3, vec![obj.clone()], t0);
        assert_eq!(picks(&at(2), &mut seen2, vec![obj.clone()], t0 + s(119)).0, vec![]);
        assert_eq!(picks(&at(2), &mut seen2, vec![obj.clone()], t0 + s(120)).0, vec![key]);
        assert_eq!(picks(&at(3), &mut seen3, vec![obj.clone()], t0 + s(120)).0, vec![]);
        assert_eq!(picks(&at(3), &mut seen3, vec![obj.clone()], t0 + s(180)).0, vec![key]);
        // An object that left the queue waits from scratch when it is back.
        assert_eq!(picks(&at(1), &mut seen1, vec![], t0 + s(61)), (vec![], 0));
        assert!(seen1.is_empty());
        assert_eq!(picks(&at(1), &mut seen1, vec![obj.clone()], t0 + s(62)).0, vec![]);
        assert_eq!(picks(&at(1), &mut seen1, vec![obj.clone()], t0 + s(122)).0, vec![key]);
        // A move (a new generation of holders) gives the duty holder a fresh head start.
        let moved = degraded_object(1, 1);
        assert_eq!(picks(&at(1), &mut seen1, vec![moved.clone()], t0 + s(123)).0, vec![]);
        assert_eq!(picks(&at(1), &mut seen1, vec![moved], t0 + s(183)).0, vec![(obj.0.version, 1)]);
        // A version tried lately is not taken up again as a backup.
        let mut seen_t = SeenDegraded::new();
        let tried: HashMap<Hash, Instant> = [(obj.0.version, t0)].into();
        pick_repairs(vec![obj.clone()], &live, &at(1), &mut seen_t, &tried, t0, after);
        assert!(pick_repairs(vec![obj.clone()], &live, &at(1), &mut seen_t, &tried, t0 + s(60), after).0.is_empty());
        // A node that is not a live storage node never repairs.
        let stranger = NodeId([99; 32]);
        assert_eq!(picks(&stranger, &mut SeenDegraded::new(), vec![obj.clone()], t0), (vec![], 0));
    }

    #[test]
    fn own_duties_go_first_and_backups_are_few_per_step() {
        let live: Vec<NodeId> = (1..=12u8).map(|i| NodeId([i; 32])).collect();
        let me = live[0];
        let after = Duration::from_secs(60);
        let t0 = Instant::now();
        let queue: Vec<Degraded> = (1..=60u8).map(|v| degraded_object(v, 0)).collect();
        let rank = |o: &Degraded| {
            archipel_placement::duty_rank(&repair_seed(&o.0.version), live.iter().copied(), &me).unwrap()
        };
        let own: Vec<Hash> = queue.iter().filter(|o| rank(o) == 0).map(|o| o.0.version).collect();
        assert!(!own.is_empty() && own.len() < queue.len());
        let mut seen = SeenDegraded::new();
        // Seen one after the other (the queue growing): object v at t0 + v ms.
        for i in 0..queue.len() {
            pick_repairs(
                queue[..=i].to_vec(),
                &live,
                &me,
                &mut seen,
                &HashMap::new(),
                t0 + Duration::from_millis(i as u64),
                after,
            );
        }
        // An hour later every object is within reach: all own duties, then one backup — the one
        // seen first of those not this node's.
        let (jobs, backups) =
            pick_repairs(queue.clone(), &live, &me, &mut seen, &HashMap::new(), t0 + Duration::from_secs(3_600), after);
        assert_eq!(backups, BACKUP_REPAIRS_PER_STEP);
        let versions: Vec<Hash> = jobs.iter().map(|(o, _, _)| o.version).collect();
        assert_eq!(versions[..own.len()], own[..]);
        let first_late = queue.iter().find(|o| rank(o) != 0).unwrap().0.version;
        assert_eq!(versions[own.len()..], [first_late]);
    }

    #[test]
    fn the_line_for_a_repair_reaches_one_node_further_per_wait() {
        let after = Duration::from_secs(60);
        let s = Duration::from_secs;
        // The duty holder at once, the first backup after one wait, the second after two…
        assert_eq!(repair_reach(Duration::ZERO, after), 0);
        assert_eq!(repair_reach(s(59), after), 0);
        assert_eq!(repair_reach(s(60), after), 1);
        assert_eq!(repair_reach(s(119), after), 1);
        assert_eq!(repair_reach(s(120), after), 2);
        // …with no end: an object left degraded reaches every node in time.
        assert_eq!(repair_reach(s(3_600), after), 60);
        // A zero wait (a test setting) lets every node act at once; nothing overflows.
        assert_eq!(repair_reach(Duration::ZERO, Duration::ZERO), usize::MAX);
        assert_eq!(repair_reach(Duration::MAX, Duration::from_nanos(1)), usize::MAX);
    }

    #[test]
    fn workers_sharing_a_submitter_never_take_one_nonce_twice() {
        // The tenant of the API fixture submits, from two threads at once, through clones of one
        // submitter: every transaction is admitted, with the nonces 0..40 each once.
        let state = crate::api::testing::state(crate::config::ApiLimits::default());
        let tenant = crate::api::testing::tenant();
        let (tx_out, _rx) = tokio::sync::mpsc::unbounded_channel();
        let submitter = Submitter::new(state.chain.clone(), tenant.clone(), tx_out);
        let network = state.chain.with_state(|st| st.network());
        let to = NodeId([9; 32]);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let s = submitter.clone();
                std::thread::spawn(move || {
                    (0..20)
                        .map(|_| s.submit(&network, Payload::Transfer { to, amount_micro: 1 }).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let hashes: Vec<Hash> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        assert_eq!(hashes.iter().collect::<BTreeSet<_>>().len(), 40);
        assert_eq!(state.chain.next_free_nonce(&tenant.node_id()), 40, "40 waiting in a run from nonce 0");
    }

    #[test]
    fn shards_no_one_serves_are_placed_before_suspect_ones() {
        let at = |i: usize| (i, Holder { node: NodeId([i as u8; 32]), url: String::new() });
        // Shard 0 failed an audit (its holder serves, so it is a source); 3 and 4 are down.
        let sources = [at(0), at(1), at(2), at(5)];
        assert_eq!(repair_order(&[0, 3, 4], &sources), [3, 4, 0]);
        assert_eq!(repair_order(&[4, 3], &sources), [3, 4]);
    }
}
