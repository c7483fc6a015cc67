//! A compute tenant on the simulated ledger: it stores an (empty) module, posts jobs one after
//! another, and for each job one node seals a bid and never reveals it.
//!
//! What this exercises is the consensus side of the market: block times that follow the jobs'
//! deadlines. With a sealed bid in, a job's commit phase ends one bid window after its posting,
//! and its reveal phase one more window later; an idle leader proposes when block time passes
//! either ([`archipel_ledger::State::next_wake_ms`]), instead of waiting out its idle wait. Nothing
//! runs here — the nodes are the consensus engine only — so the job ends unawarded, its silent
//! bidder penalized.

use crate::ledger::{LedgerScenario, submit_gossiped};
use archipel_consensus::Chain;
use archipel_crypto::Identity;
use archipel_ledger::storage::{ObjectPut, object_id, version_id};
use archipel_ledger::{Hash, Payload, SignedTransaction, Transaction};
use archipel_market::{JobLimits, JobSpec, ObjectRef};
use archipel_types::{ErasureCode, Geofence, PlacementPolicy, Roles};
use commonware_runtime::{Clock, deterministic};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// The bucket that holds the module.
pub const BUCKET: &str = "sim-jobs";
/// The module's key.
pub const MODULE_KEY: &str = "job.wasm";
/// The price each bidder seals.
pub const PRICE_MICRO: u64 = 50;

/// What the tenant does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobScript {
    /// When it starts (the nodes' leases should be up: only a node that is Up bids).
    pub from: Duration,
    /// How many jobs it posts, one after the other.
    pub count: usize,
    /// Each job's bid window.
    pub bid_window_ms: u64,
    /// Time after a job's reveal phase before the next job is posted.
    pub pause: Duration,
}

/// The roles of every node when a scenario has jobs.
pub(crate) fn provider_roles() -> Roles {
    "storage,compute".parse().unwrap_or_else(|e| unreachable!("known roles: {e}"))
}

/// The job spec the tenant posts: the stored module, anywhere, one run.
pub fn spec(module: ObjectRef, bid_window_ms: u64) -> JobSpec {
    JobSpec {
        module,
        inputs: vec![],
        args: vec![],
        env: vec![],
        limits: JobLimits { memory_bytes: 1 << 20, cpu_ms: 1_000, wall_ms: 5_000, output_bytes: 1 << 20 },
        max_price_micro: 100,
        geofence: Geofence::default(),
        redundancy: 1,
        bid_window_ms,
    }
}

/// The tenant's task and what it needs.
pub(crate) struct Tenant {
    pub(crate) script: JobScript,
    pub(crate) sc: LedgerScenario,
    pub(crate) tenant: Identity,
    /// The nodes that bid, in turn (index, identity).
    pub(crate) providers: Vec<(usize, Identity)>,
    /// Where the tenant and the bidders submit.
    pub(crate) entry: (usize, Arc<Chain>),
    /// Honest validators, which gossip copies reach.
    pub(crate) validators: Vec<(usize, Arc<Chain>)>,
    pub(crate) network: Hash,
    /// The run's log of refused submissions (second element).
    pub(crate) refused: Arc<Mutex<(Vec<crate::ledger::SubmittedTransfer>, Vec<String>)>>,
}

impl Tenant {
    pub(crate) async fn run(self, ctx: deterministic::Context) {
        sleep_until(&ctx, self.script.from).await;
        let mut nonce = 0;
        let module = match self.store_module(&ctx, &mut nonce).await {
            Some(m) => m,
            None => return,
        };
        let mut provider_nonces = vec![0u64; self.providers.len()];
        for j in 0..self.script.count {
            let job = archipel_ledger::jobs::job_id(&self.tenant.node_id(), nonce);
            let post = Payload::PostJob { spec: spec(module.clone(), self.script.bid_window_ms) };
            if !self.send(&ctx, &self.tenant, &mut nonce, post, "post job") {
                return;
            }
            let Some(bond) = self.wait_for(&ctx, |s| s.job(&job).map(|j| j.bond())).await else {
                self.refuse(&ctx, format!("job {j} was not final in time"));
                return;
            };
            let at = j % self.providers.len();
            let (_, provider) = &self.providers[at];
            let salt = [j as u8; 32];
            let digest = Hash(archipel_market::rule::commitment(&job.0, &provider.node_id(), 0, PRICE_MICRO, &salt));
            let bid = Payload::BidCommit { job, digest, bond_micro: bond };
            if !self.send(&ctx, provider, &mut provider_nonces[at], bid, "bid commit") {
                return;
            }
            let window = Duration::from_millis(self.script.bid_window_ms);
            ctx.sleep(window * 2 + self.script.pause).await;
        }
        sleep_until(&ctx, self.sc.duration).await;
    }

    /// A bucket and an empty object in it (no shards, so no holders or receipts): the module.
    async fn store_module(&self, ctx: &deterministic::Context, nonce: &mut u64) -> Option<ObjectRef> {
        let policy = PlacementPolicy::anywhere(ErasureCode::new(2, 1).unwrap_or_else(|e| unreachable!("{e}")));
        if !self.send(ctx, &self.tenant, nonce, Payload::CreateBucket { name: BUCKET.into(), policy }, "bucket") {
            return None;
        }
        self.wait_for(ctx, |s| s.bucket(BUCKET).map(|_| ())).await?;
        let random = [7u8; 32];
        let version = version_id(&self.tenant.node_id(), &object_id(BUCKET, MODULE_KEY), &random);
        let put = ObjectPut {
            bucket: BUCKET.into(),
            key: MODULE_KEY.into(),
            version,
            nonce: Hash(random),
            size: 0,
            segment_bytes: 1 << 20,
            manifest_root: Hash::ZERO,
            etag: "d41d8cd98f00b204e9800998ecf8427e".into(),
            holders: vec![],
        };
        if !self.send(ctx, &self.tenant, nonce, Payload::PutObject { put }, "module") {
            return None;
        }
        self.wait_for(ctx, |s| s.object(BUCKET, MODULE_KEY).map(|_| ())).await?;
        Some(ObjectRef { bucket: BUCKET.into(), key: MODULE_KEY.into(), version: version.0, data_key: [0; 32] })
    }

    /// Signs and submits `payload` from `who`; on success takes the nonce, else logs the refusal.
    fn send(
        &self,
        ctx: &deterministic::Context,
        who: &Identity,
        nonce: &mut u64,
        payload: Payload,
        what: &str,
    ) -> bool {
        let stx: SignedTransaction =
            Transaction { signer: who.node_id(), nonce: *nonce, payload }.sign(who, &self.network);
        let (entry, chain) = &self.entry;
        match submit_gossiped(ctx, &self.sc, (*entry, chain), &self.validators, stx) {
            Ok(_) => {
                *nonce += 1;
                true
            }
            Err(e) => {
                self.refuse(ctx, format!("{what}: {e}"));
                false
            }
        }
    }

    fn refuse(&self, ctx: &deterministic::Context, why: String) {
        let at = ctx.current().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).1.push(format!("at {at} ms, tenant: {why}"));
    }

    /// Polls the entry's finalized state until `found` gives something, for at most 5 s.
    async fn wait_for<T>(
        &self,
        ctx: &deterministic::Context,
        found: impl Fn(&archipel_ledger::State) -> Option<T>,
    ) -> Option<T> {
        for _ in 0..500 {
            if let Some(t) = self.entry.1.with_state(&found) {
                return Some(t);
            }
            ctx.sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

async fn sleep_until(context: &impl Clock, at: Duration) {
    let t = context.current().duration_since(UNIX_EPOCH).unwrap_or_default();
    if at > t {
        context.sleep(at - t).await;
    }
}
