//! The compute provider: a node with the `compute` role bids on open jobs, runs the leases it
//! wins, keeps them alive with heartbeats, and seals then reveals each run's result — all from
//! finalized ledger state, through the node's one [`Submitter`].
//!
//! Every step (each [`STEP`]) reads the open jobs and, for each:
//! - **bids** while its auction takes sealed bids: the job is checked against this provider's
//!   offer ([`ComputeConfig`]: price floor, free slots, memory and CPU it gives one job) and
//!   its place ([`archipel_market::rule::evaluate`]); it commits its floor as price with a fresh
//!   salt, or records why it declines (`GET /v1/jobs/{id}/declined`, which `archipel job why`
//!   reads from every provider);
//! - **reveals** its bid once the finalized chain's time has passed the commit phase;
//! - **runs** a lease it holds: fetches the module and inputs (objects, opened with the data
//!   keys the job carries), runs them in a child process ([`archipel_compute::Runner`]) with
//!   the job's limits, WASI randomness seeded with the job id, and NaNs canonicalized when the
//!   job runs on more than one provider (their outputs are compared); keeps stdout and the log
//!   under `data/jobs/<id>/` for the tenant;
//! - **heartbeats** every lease it runs, every quarter lease TTL (one transaction for all);
//! - **seals** the result when the run ends, and **reveals** it once every run of the round has
//!   sealed.
//!
//! Free slots count the leases it runs, its sealed bids still in auction and its standing-by
//! bids, so it never wins more jobs than it can run at once. A run it cannot start (the module
//! or an input cannot be read) stops its heartbeats: the lease lapses and the job moves on.

use crate::workers::{Submitter, Worker};
use archipel_consensus::Chain;
use archipel_crypto::{DataKey, Identity};
use archipel_ledger::{Hash, LeaseStatus, Payload, State as LedgerState};
use archipel_market::rule::{Decline, Offer, commitment, evaluate, result_commitment};
use archipel_market::{Job, RunOutcome};
use archipel_objects::http::HttpShards;
use archipel_objects::transfer::Holder;
use archipel_types::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Pause between two steps.
pub const STEP: Duration = Duration::from_millis(100);
/// Most open jobs one step looks at for bidding (the soonest due first), besides the jobs it
/// has bid on, stands by for or runs — those it always reads.
pub const MAX_JOBS_PER_STEP: usize = 256;
/// The shortest bid window it bids in: a sealed bid must be revealed in a block within one
/// window after sealed bids close, or its bond is lost; blocks come every few hundred ms.
pub const MIN_BID_WINDOW_MS: u64 = 500;
/// Declines kept for `job why` (the newest).
pub const MAX_DECLINES: usize = 4_096;
/// How long a run's output and log stay after its job ended.
pub const KEEP_OUTPUT: Duration = Duration::from_secs(3_600);
/// Bytes of a run's stderr kept as its log.
pub const LOG_BYTES: u64 = 64 << 10;

/// `[compute]` in `node.toml`: what this provider offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComputeConfig {
    /// The least it takes for one run (its bid).
    pub price_floor_micro: u64,
    /// Jobs it runs at once.
    pub slots: u32,
    /// The most memory it gives one job.
    pub max_memory: archipel_types::ByteSize,
    /// The most CPU time it gives one job.
    pub max_cpu_ms: u64,
    /// Fault injection for tests: report a wrong output hash for every successful run (a
    /// Byzantine provider).
    pub fault_wrong_output: bool,
}

impl Default for ComputeConfig {
    /// A floor of 10, 2 slots, 1 GiB and 10 minutes of CPU per job.
    fn default() -> Self {
        ComputeConfig {
            price_floor_micro: 10,
            slots: 2,
            max_memory: archipel_types::ByteSize(1 << 30),
            max_cpu_ms: 600_000,
            fault_wrong_output: false,
        }
    }
}

impl ComputeConfig {
    /// Whether nothing differs from the defaults (then `node.toml` omits the section).
    pub fn is_default(&self) -> bool {
        *self == ComputeConfig::default()
    }
}

/// Why this provider did not bid on a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declined {
    /// The job.
    pub job: Hash,
    /// The auction round.
    pub round: u32,
    /// Why.
    pub decline: Decline,
    /// When (this node's clock, Unix ms).
    pub at_ms: u64,
}

/// Where a run is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum RunPhase {
    /// Reading the module and inputs.
    Fetching,
    /// The module runs.
    Running,
    /// It ended; the result is sealed with `salt` (hex) and revealed once every run has sealed.
    Done {
        /// The result.
        outcome: RunOutcome,
        /// How it ended, for people.
        end: String,
        /// Output bytes.
        output_bytes: u64,
        /// Wall time of the run.
        wall_ms: u64,
    },
    /// It could not start (provider side): the lease is left to lapse.
    Abandoned {
        /// Why.
        why: String,
    },
}

/// One run of a job on this provider.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    /// The job.
    pub job: Hash,
    /// Its tenant (who may read the output).
    pub tenant: NodeId,
    /// Where it is.
    #[serde(flatten)]
    pub phase: RunPhase,
    /// When it started (this node's clock).
    pub started_ms: u64,
    /// When the job was seen ended (then the files go after [`KEEP_OUTPUT`]).
    #[serde(skip)]
    ended_at: Option<std::time::Instant>,
    /// The seal's salt.
    #[serde(skip)]
    salt: [u8; 32],
    /// When the seal was last sent (sent again if the chain does not show it a lease TTL later).
    #[serde(skip)]
    sealed_at: Option<std::time::Instant>,
    /// When the reveal was last sent (likewise).
    #[serde(skip)]
    revealed_at: Option<std::time::Instant>,
}

/// What anyone may see of a run (`GET /v1/jobs/{id}/run`): where it is, not its outcome — a
/// provider that read another's result before the reveal could seal it without running.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunView {
    /// The job.
    pub job: Hash,
    /// `fetching`, `running`, `done` or `abandoned`.
    pub phase: String,
    /// When it started (the provider's clock, Unix ms).
    pub started_ms: u64,
}

impl RunView {
    /// The public view of `run`.
    pub fn of(run: &Run) -> Self {
        let phase = match run.phase {
            RunPhase::Fetching => "fetching",
            RunPhase::Running => "running",
            RunPhase::Done { .. } => "done",
            RunPhase::Abandoned { .. } => "abandoned",
        };
        RunView { job: run.job, phase: phase.into(), started_ms: run.started_ms }
    }
}

/// What the provider knows beyond the ledger, shared with the API.
#[derive(Debug, Default)]
pub struct ProviderBook {
    declines: Mutex<BTreeMap<Hash, Declined>>,
    runs: Mutex<BTreeMap<Hash, Run>>,
    dir: PathBuf,
}

impl ProviderBook {
    /// A book keeping runs' files under `dir`.
    pub fn new(dir: PathBuf) -> Self {
        ProviderBook { dir, ..ProviderBook::default() }
    }

    /// Why this provider declined `job`, if it did.
    pub fn declined(&self, job: &Hash) -> Option<Declined> {
        self.declines.lock().unwrap_or_else(|e| e.into_inner()).get(job).cloned()
    }

    /// This provider's run of `job`, if any.
    pub fn run(&self, job: &Hash) -> Option<Run> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).get(job).cloned()
    }

    /// The directory of `job`'s run files.
    pub fn job_dir(&self, job: &Hash) -> PathBuf {
        self.dir.join(job.to_string())
    }

    fn decline(&self, d: Declined) {
        let mut all = self.declines.lock().unwrap_or_else(|e| e.into_inner());
        all.insert(d.job, d);
        while all.len() > MAX_DECLINES {
            // The oldest goes.
            let Some(oldest) = all.values().min_by_key(|d| d.at_ms).map(|d| d.job) else { break };
            all.remove(&oldest);
        }
    }

    /// Runs fetching or running now.
    fn running(&self) -> usize {
        let runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        runs.values().filter(|r| matches!(r.phase, RunPhase::Fetching | RunPhase::Running)).count()
    }

    fn set_phase(&self, job: &Hash, phase: RunPhase) {
        if let Some(r) = self.runs.lock().unwrap_or_else(|e| e.into_inner()).get_mut(job) {
            r.phase = phase;
        }
    }
}

/// A sealed bid this provider sent, to reveal.
#[derive(Clone, Copy, Debug)]
struct Sealed {
    price: u64,
    salt: [u8; 32],
    /// When the reveal was last sent (sent again after [`RESEND_AFTER`] if the chain does not
    /// show it).
    revealed_at: Option<std::time::Instant>,
}

/// A reveal the chain does not show this long after it was sent is sent again.
const RESEND_AFTER: Duration = Duration::from_millis(1_000);

fn due(sent: Option<std::time::Instant>, after: Duration) -> bool {
    sent.is_none_or(|t| t.elapsed() >= after)
}

/// The provider worker.
pub struct Provider {
    chain: Arc<Chain>,
    identity: Identity,
    submitter: Submitter,
    config: ComputeConfig,
    book: Arc<ProviderBook>,
    runner: archipel_compute::Runner,
    shards: HttpShards,
    bids: BTreeMap<(Hash, u32), Sealed>,
    /// Jobs it bid on (until they end): read every step, however many jobs are open.
    mine: std::collections::BTreeSet<Hash>,
    last_beat: Option<std::time::Instant>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider").field("config", &self.config).finish_non_exhaustive()
    }
}

/// What one step read from finalized state.
struct View {
    now_ms: u64,
    network: Hash,
    ttl_ms: u64,
    me: Option<archipel_market::Provider>,
    up: bool,
    jobs: Vec<(Hash, Job)>,
}

fn random_salt() -> [u8; 32] {
    let mut s = [0u8; 32];
    rand::fill(&mut s);
    s
}

/// The result a run's end gives the market: the output's hash on exit 0, else the end's name
/// (`exited:3` for a non-zero exit).
pub fn outcome_of(end: &archipel_compute::End, output_blake3: &str) -> RunOutcome {
    match end {
        archipel_compute::End::Exited { code: 0 } => {
            let mut output = [0u8; 32];
            let _ = hex::decode_to_slice(output_blake3, &mut output);
            RunOutcome::Success { output }
        }
        archipel_compute::End::Exited { code } => RunOutcome::Failed { end: format!("exited:{code}") },
        other => RunOutcome::Failed { end: other.kind().to_string() },
    }
}

impl Provider {
    /// The provider of the node with `identity`, offering `config`, starting children with
    /// `runner`, keeping run files in `book`; runs are spawned on `handle`.
    pub fn new(
        chain: Arc<Chain>,
        identity: Identity,
        submitter: Submitter,
        config: ComputeConfig,
        book: Arc<ProviderBook>,
        runner: archipel_compute::Runner,
        handle: tokio::runtime::Handle,
    ) -> Self {
        let shards = HttpShards::new(identity.clone());
        Provider {
            chain,
            identity,
            submitter,
            config,
            book,
            runner,
            shards,
            bids: BTreeMap::new(),
            mine: std::collections::BTreeSet::new(),
            last_beat: None,
            handle,
        }
    }

    fn view(&mut self) -> View {
        let me = self.identity.node_id();
        let mine = &mut self.mine;
        self.chain.with_state(|st| {
            // Its own jobs first (an attacker posting many jobs due sooner must not hide them),
            // then the soonest due; jobs that ended leave `mine`.
            let mut ids: Vec<Hash> = mine.iter().copied().collect();
            ids.extend(st.open_jobs().map(|(_, id)| id).filter(|id| !mine.contains(id)).take(MAX_JOBS_PER_STEP));
            let jobs: Vec<(Hash, Job)> = ids
                .into_iter()
                .filter_map(|id| st.job(&id).map(|j| (id, j)))
                .filter(|(_, j)| j.ended.is_none())
                .collect();
            mine.retain(|id| jobs.iter().any(|(j, _)| j == id));
            View {
                now_ms: st.chain().timestamp_ms,
                network: st.network(),
                ttl_ms: st.params().lease_ttl_ms,
                me: st.provider(&me),
                up: st.lease_status(&me) == LeaseStatus::Up,
                jobs,
            }
        })
    }

    /// Slots taken: runs in progress, and the jobs it may yet have to run — sealed bids sent
    /// (final or not) in open auctions, standing-by bids, leases not started.
    fn busy(&self, view: &View) -> u32 {
        let me = self.identity.node_id();
        let running = self.book.running();
        let started: std::collections::BTreeSet<Hash> =
            self.book.runs.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
        let sent: std::collections::BTreeSet<Hash> = self.bids.keys().map(|(id, _)| *id).collect();
        let waiting = view
            .jobs
            .iter()
            .filter(|(id, j)| {
                let bid = sent.contains(id) || j.auction.as_ref().is_some_and(|a| a.commits.contains_key(&me));
                let standby = j.standby.iter().any(|b| b.provider.node == me);
                let leased = j.active().any(|l| l.bid.provider.node == me);
                (bid || standby || leased) && !started.contains(id)
            })
            .count();
        (running + waiting) as u32
    }

    fn submit(&self, network: &Hash, payload: Payload, notes: &mut Vec<String>) -> bool {
        let kind = payload.kind();
        match self.submitter.submit(network, payload) {
            Ok(_) => true,
            Err(e) => {
                notes.push(format!("{kind} refused: {e}"));
                false
            }
        }
    }

    /// Bids on, or declines, the jobs whose auction takes sealed bids; reveals sealed bids.
    fn auctions(&mut self, view: &View, notes: &mut Vec<String>) -> usize {
        let me = self.identity.node_id();
        let Some(provider) = view.me.clone() else { return 0 };
        let mut busy = self.busy(view);
        let mut sent = 0;
        for (id, job) in &view.jobs {
            let Some(a) = &job.auction else { continue };
            let key = (*id, a.round);
            if let Some(bid) = self.bids.get_mut(&key) {
                // Reveal once the finalized chain is past the commit phase (so the reveal is
                // taken when it arrives) and before the award.
                if due(bid.revealed_at, RESEND_AFTER)
                    && view.now_ms >= a.commit_until_ms
                    && view.now_ms < a.reveal_until_ms
                    && a.commits.contains_key(&me)
                    && !a.bids.contains_key(&me)
                {
                    let payload = Payload::BidReveal { job: *id, price_micro: bid.price, salt: Hash(bid.salt) };
                    bid.revealed_at = Some(std::time::Instant::now());
                    if self.submit(&view.network, payload, notes) {
                        sent += 1;
                    }
                }
                continue;
            }
            if view.now_ms >= a.commit_until_ms || !view.up || job.tenant == me {
                continue;
            }
            let involved = job.excluded.contains(&me)
                || job.leases.iter().any(|l| l.bid.provider.node == me)
                || job.standby.iter().any(|b| b.provider.node == me);
            let offer = Offer {
                price_floor_micro: self.config.price_floor_micro,
                free_slots: self.config.slots.saturating_sub(busy),
                max_memory_bytes: self.config.max_memory.bytes(),
                max_cpu_ms: self.config.max_cpu_ms,
            };
            let verdict = if involved {
                Err(Decline::Excluded)
            } else if job.spec.bid_window_ms < MIN_BID_WINDOW_MS {
                Err(Decline::Limits {
                    what: format!(
                        "a bid window of {} ms, under the {MIN_BID_WINDOW_MS} ms it needs to reveal in time",
                        job.spec.bid_window_ms
                    ),
                })
            } else {
                let l = &job.spec.limits;
                evaluate(&provider, &offer, &job.spec.geofence, job.spec.max_price_micro, l.memory_bytes, l.cpu_ms)
            };
            match verdict {
                Ok(price) => {
                    let salt = random_salt();
                    let digest = Hash(commitment(&id.0, &me, a.round, price, &salt));
                    let payload = Payload::BidCommit { job: *id, digest, bond_micro: job.bond() };
                    if self.submit(&view.network, payload, notes) {
                        self.bids.insert(key, Sealed { price, salt, revealed_at: None });
                        self.mine.insert(*id);
                        busy += 1;
                        sent += 1;
                    }
                }
                Err(decline) => {
                    if self.book.declined(id).is_none_or(|d| d.round != a.round || d.decline != decline) {
                        self.book.decline(Declined {
                            job: *id,
                            round: a.round,
                            decline,
                            at_ms: crate::api::system_now_ms(),
                        });
                    }
                }
            }
        }
        // Bids of auctions that are over are forgotten.
        let open: std::collections::BTreeSet<(Hash, u32)> =
            view.jobs.iter().filter_map(|(id, j)| j.auction.as_ref().map(|a| (*id, a.round))).collect();
        self.bids.retain(|k, _| open.contains(k));
        sent
    }

    /// Starts runs of new leases; heartbeats running ones; seals and reveals results.
    fn leases(&mut self, view: &View, notes: &mut Vec<String>) -> usize {
        let me = self.identity.node_id();
        let mut sent = 0;
        let mut beat = Vec::new();
        let resend = Duration::from_millis(view.ttl_ms);
        for (id, job) in &view.jobs {
            let lease = job.leases.iter().find(|l| l.bid.provider.node == me);
            let run = self.book.run(id);
            match (lease, run) {
                (Some(l), None) if l.sealed.is_none() => self.start(*id, job.clone()),
                (Some(l), Some(run)) => match &run.phase {
                    RunPhase::Fetching | RunPhase::Running if l.sealed.is_none() => beat.push(*id),
                    RunPhase::Done { outcome, .. } if l.sealed.is_none() && due(run.sealed_at, resend) => {
                        let digest = Hash(result_commitment(&id.0, &me, outcome, &run.salt));
                        self.mark(id, |r| r.sealed_at = Some(std::time::Instant::now()));
                        if self.submit(&view.network, Payload::ResultCommit { job: *id, digest }, notes) {
                            sent += 1;
                        }
                    }
                    RunPhase::Done { outcome, .. }
                        if l.sealed.is_some()
                            && l.result.is_none()
                            && job.results_reveal_until_ms.is_some_and(|u| view.now_ms < u)
                            && due(run.revealed_at, RESEND_AFTER) =>
                    {
                        let payload =
                            Payload::ResultReveal { job: *id, outcome: outcome.clone(), salt: Hash(run.salt) };
                        self.mark(id, |r| r.revealed_at = Some(std::time::Instant::now()));
                        if self.submit(&view.network, payload, notes) {
                            sent += 1;
                        }
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        let every = Duration::from_millis(view.ttl_ms / 4);
        if !beat.is_empty() && self.last_beat.is_none_or(|t| t.elapsed() >= every) {
            for chunk in beat.chunks(archipel_ledger::jobs::MAX_HEARTBEAT_JOBS) {
                if self.submit(&view.network, Payload::JobHeartbeat { jobs: chunk.to_vec() }, notes) {
                    sent += 1;
                }
            }
            self.last_beat = Some(std::time::Instant::now());
        }
        self.forget_ended(view);
        sent
    }

    fn mark(&self, id: &Hash, f: impl FnOnce(&mut Run)) {
        if let Some(r) = self.book.runs.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
            f(r);
        }
    }

    /// Drops the files of runs whose job ended (or is gone) [`KEEP_OUTPUT`] ago.
    fn forget_ended(&self, view: &View) {
        let open: std::collections::BTreeSet<Hash> = view.jobs.iter().map(|(id, _)| *id).collect();
        let mut runs = self.book.runs.lock().unwrap_or_else(|e| e.into_inner());
        let mut gone = Vec::new();
        for (id, r) in runs.iter_mut() {
            // Every job with a run is in `mine`, so in the view until it ends.
            if open.contains(id) {
                continue;
            }
            match r.ended_at {
                None => r.ended_at = Some(std::time::Instant::now()),
                Some(t) if t.elapsed() >= KEEP_OUTPUT => gone.push(*id),
                Some(_) => {}
            }
        }
        for id in gone {
            runs.remove(&id);
            let _ = std::fs::remove_dir_all(self.book.job_dir(&id));
        }
    }

    /// Starts running `job` (a lease this provider holds) in the background.
    fn start(&mut self, id: Hash, job: Job) {
        let run = Run {
            job: id,
            tenant: job.tenant,
            phase: RunPhase::Fetching,
            started_ms: crate::api::system_now_ms(),
            ended_at: None,
            salt: random_salt(),
            sealed_at: None,
            revealed_at: None,
        };
        self.book.runs.lock().unwrap_or_else(|e| e.into_inner()).insert(id, run);
        self.mine.insert(id);
        let (chain, shards, runner, book) =
            (self.chain.clone(), self.shards.clone(), self.runner.clone(), self.book.clone());
        let lie = self.config.fault_wrong_output;
        self.handle.spawn(async move {
            let phase = match execute(&chain, &shards, &runner, &book, &id, &job).await {
                Ok((mut outcome, end, output_bytes, wall_ms)) => {
                    if lie && let RunOutcome::Success { output } = &mut outcome {
                        output[0] ^= 0xff;
                    }
                    RunPhase::Done { outcome, end, output_bytes, wall_ms }
                }
                // The tenant's module or inputs cannot be read (a wrong key, an object gone):
                // said as the run's end, so the job is refunded — a lapse would cost this
                // provider its bond for the tenant's doing.
                Err(Failure::Inputs(why)) => {
                    tracing::warn!(job = %id.short(), %why, "the job's module or inputs cannot be read");
                    let outcome = RunOutcome::Failed { end: "input_unreadable".into() };
                    RunPhase::Done {
                        outcome,
                        end: format!("cannot read its module or inputs: {why}"),
                        output_bytes: 0,
                        wall_ms: 0,
                    }
                }
                Err(Failure::Here(why)) => {
                    tracing::warn!(job = %id.short(), %why, "cannot run the job: its lease will lapse");
                    RunPhase::Abandoned { why }
                }
            };
            book.set_phase(&id, phase);
        });
    }
}

/// Why a run could not give an outcome.
enum Failure {
    /// The job's module or an input cannot be read: the tenant's doing (or the holders').
    Inputs(String),
    /// This provider's own trouble (its disk, starting the runner).
    Here(String),
}

/// Reads the object `o` (opened with the key the job carries) into `path`.
async fn fetch(
    chain: &Chain,
    shards: &HttpShards,
    o: &archipel_market::ObjectRef,
    path: &std::path::Path,
) -> Result<(), String> {
    let name = format!("{}/{}", o.bucket, o.key);
    let (record, holders) = chain
        .with_state(|st: &LedgerState| {
            let rec = st.object(&o.bucket, &o.key).filter(|r| r.version.0 == o.version)?;
            let holders = rec
                .holders
                .iter()
                .map(|n| Holder {
                    node: *n,
                    url: st
                        .nodes()
                        .get(n)
                        .map(|r| format!("http://{}", r.descriptor.descriptor.api_address))
                        .unwrap_or_default(),
                })
                .collect::<Vec<_>>();
            Some((rec, holders))
        })
        .ok_or_else(|| format!("{name} is no longer stored at the job's version"))?;
    let opened =
        archipel_objects::transfer::open_object_with_key(shards, &record, &holders, DataKey::from_bytes(o.data_key))
            .await
            .map_err(|e| format!("{name}: {e}"))?;
    let file = tokio::fs::File::create(path).await.map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = tokio::io::BufWriter::new(file);
    archipel_objects::transfer::read_object(shards, &record, &holders, &opened, None, &mut out, |_| {})
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    tokio::io::AsyncWriteExt::flush(&mut out).await.map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// Fetches and runs `job`: its outcome, how it ended, output bytes and wall time.
async fn execute(
    chain: &Chain,
    shards: &HttpShards,
    runner: &archipel_compute::Runner,
    book: &ProviderBook,
    id: &Hash,
    job: &Job,
) -> Result<(RunOutcome, String, u64, u64), Failure> {
    let here = |e: String| Failure::Here(e);
    let dir = book.job_dir(id);
    tokio::fs::create_dir_all(&dir).await.map_err(|e| here(format!("{}: {e}", dir.display())))?;
    let module = dir.join("module.wasm");
    fetch(chain, shards, &job.spec.module, &module).await.map_err(Failure::Inputs)?;
    // The inputs, in order, are the module's stdin.
    let input = dir.join("input");
    {
        let mut all = tokio::fs::File::create(&input).await.map_err(|e| here(format!("{}: {e}", input.display())))?;
        for (i, o) in job.spec.inputs.iter().enumerate() {
            let part = dir.join(format!("input.{i}"));
            fetch(chain, shards, o, &part).await.map_err(Failure::Inputs)?;
            let mut f = tokio::fs::File::open(&part).await.map_err(|e| here(e.to_string()))?;
            tokio::io::copy(&mut f, &mut all).await.map_err(|e| here(format!("{}: {e}", input.display())))?;
            let _ = tokio::fs::remove_file(&part).await;
        }
    }
    book.set_phase(id, RunPhase::Running);
    let l = &job.spec.limits;
    let run = archipel_compute::Job {
        module,
        stdin: Some(input),
        args: job.spec.args.clone(),
        env: job.spec.env.clone(),
        limits: archipel_compute::Limits {
            memory_bytes: l.memory_bytes,
            cpu_ms: l.cpu_ms,
            wall_ms: l.wall_ms,
            output_bytes: l.output_bytes,
            log_bytes: LOG_BYTES,
        },
        canonical_nans: job.spec.redundancy > 1,
        seed: Some(id.0),
    };
    let output_path = dir.join("output");
    let mut output =
        tokio::fs::File::create(&output_path).await.map_err(|e| here(format!("{}: {e}", output_path.display())))?;
    let outcome = runner.run(&run, &mut output).await.map_err(|e| here(e.to_string()))?;
    tokio::io::AsyncWriteExt::flush(&mut output).await.map_err(|e| here(e.to_string()))?;
    let mut log = outcome.log.clone();
    if outcome.log_dropped > 0 {
        log.extend_from_slice(format!("\n[{} more bytes of log dropped]\n", outcome.log_dropped).as_bytes());
    }
    tokio::fs::write(dir.join("log"), &log).await.map_err(|e| here(e.to_string()))?;
    let result = outcome_of(&outcome.end, &outcome.output_blake3);
    Ok((result, outcome.end.to_string(), outcome.output_bytes, outcome.wall_ms))
}

impl Worker for Provider {
    fn name(&self) -> &'static str {
        "provider"
    }

    fn interval(&self) -> Duration {
        STEP
    }

    async fn step(&mut self) -> Result<String, String> {
        let view = self.view();
        let mut notes = Vec::new();
        let bids = self.auctions(&view, &mut notes);
        let runs = self.leases(&view, &mut notes);
        let running = self.book.running();
        let mut summary = format!(
            "{} open jobs; {running} running of {} slots; {bids} bid transactions and {runs} run transactions now",
            view.jobs.len(),
            self.config.slots
        );
        if !notes.is_empty() {
            summary.push_str(": ");
            summary.push_str(&notes.join("; "));
        }
        Ok(summary)
    }
}
