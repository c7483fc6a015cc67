//! Compute jobs on the ledger: the market's state machine ([`archipel_market::Job`]) driven by
//! finalized transactions and block times.
//!
//! - `job/<id>`: a job (JSON of [`Job`]), from `PostJob` to its end; ended jobs stay, so anyone
//!   can check what was paid.
//! - `record/<node>`: a provider's runs accepted and penalties ([`Record`]), which the winner
//!   rule weighs.
//!
//! Each job transaction is tried on a copy of the job with the balances it reads, and applied
//! only if that succeeds, so it is applied whole or not at all. Money moves only through the
//! market's [`Accounts`]: escrow and bonds leave balances into the job, payments and refunds
//! come back, and forfeited bonds are burned (added to the chain's fees burned). So the sum of
//! balances, deposits, fees burned, and the escrow and bonds every job holds never changes.
//!
//! **Time.** Every block first ticks the jobs that are due at its time ([`Job::next_due_ms`]):
//! auctions are awarded, leases without heartbeats lapse (the job goes to a standing-by bid in
//! the same block, or back to auction), result windows close. The due index lives in memory,
//! rebuilt from the stored jobs when a node opens its state, so a block costs O(due jobs), not
//! O(jobs).
//!
//! **Who may do what.** A bid, reveal, heartbeat or result comes from a registered node with the
//! `compute` role, signed with its own key; bids also need its lease to be Up. The provider the
//! winner rule sees (operator, region, country, jurisdiction, record) is read from the registry
//! and the records here, never from the transaction.

use crate::Hash;
use crate::state::{LeaseStatus, Receipt, State, StateKey};
use crate::tx::{Payload, TxError};
use archipel_market::{Accounts, Event, Job, MarketError, MarketParams, Provider, Record};
use archipel_types::{NodeId, Role};
use std::collections::BTreeMap;

/// Most jobs one heartbeat names.
pub const MAX_HEARTBEAT_JOBS: usize = 64;
/// Most due jobs one block ticks; the rest, the latest due, wait for the next block (so a
/// spammer's jobs all falling due at once cannot make one block unbounded work).
pub const MAX_TICKS_PER_BLOCK: usize = 4_096;
/// Ended jobs [`State::recent_ended_jobs`] keeps.
pub const RECENT_ENDED: usize = 100;

/// When `job` ended, if it did.
pub fn ended_at(job: &Job) -> Option<u64> {
    match job.ended.as_ref()? {
        archipel_market::Ended::Accepted { at_ms, .. }
        | archipel_market::Ended::Refunded { at_ms, .. }
        | archipel_market::Ended::Cancelled { at_ms } => Some(*at_ms),
    }
}

/// A job's id: `BLAKE3("archipel/job/v1" ‖ tenant ‖ nonce)` of the posting transaction, known to
/// the tenant before it posts.
pub fn job_id(tenant: &NodeId, nonce: u64) -> Hash {
    Hash::of(&[b"archipel/job/v1", tenant.as_bytes(), &nonce.to_be_bytes()])
}

/// Balances as a job step sees them: the state's, less the fee the signer pays, plus what the
/// step moved so far. Nothing is written until the step is applied.
struct Scratch<'a> {
    state: &'a State,
    signer: NodeId,
    fee: u64,
    moved: BTreeMap<NodeId, i128>,
}

impl Accounts for Scratch<'_> {
    fn debit(&mut self, who: &NodeId, amount: u64) -> Result<(), MarketError> {
        let fee = if *who == self.signer { i128::from(self.fee) } else { 0 };
        let moved = self.moved.get(who).copied().unwrap_or(0);
        let have = i128::from(self.state.account(who).balance_micro) - fee + moved;
        if have < i128::from(amount) {
            return Err(MarketError::Insufficient { need: amount });
        }
        *self.moved.entry(*who).or_default() -= i128::from(amount);
        Ok(())
    }

    fn credit(&mut self, who: &NodeId, amount: u64) {
        *self.moved.entry(*who).or_default() += i128::from(amount);
    }
}

/// What one job step did, to apply.
struct Step {
    id: Hash,
    job: Job,
    events: Vec<Event>,
    moved: BTreeMap<NodeId, i128>,
    burned: u64,
}

fn refused(job: &Hash, e: MarketError) -> TxError {
    match e {
        MarketError::Spec(e) => TxError::Malformed(format!("job spec: {e}")),
        MarketError::Insufficient { need } => TxError::NotAllowed(format!(
            "job {}: the balance does not cover the {need} it locks (and the fee)",
            job.short()
        )),
        e => TxError::NotAllowed(format!("job {}: {e}", job.short())),
    }
}

impl State {
    /// The market's settings: a job lease lapses after the ledger's lease TTL without heartbeat.
    pub fn market_params(&self) -> MarketParams {
        MarketParams { lease_ttl_ms: self.params.lease_ttl_ms }
    }

    /// A job, by id.
    pub fn job(&self, id: &Hash) -> Option<Job> {
        self.jobs.get(id, |id| self.load(&StateKey::Job(*id), crate::state::decode_json))
    }

    /// A provider's record (empty if it never ran a job).
    pub fn record(&self, node: &NodeId) -> Record {
        self.records.get(node, |id| self.load(&StateKey::Record(*id), crate::state::decode_json)).unwrap_or_default()
    }

    /// Open jobs with the block time they are next due at, soonest first.
    pub fn open_jobs(&self) -> impl Iterator<Item = (u64, Hash)> + '_ {
        self.due_jobs.iter().copied()
    }

    /// The first block time after `after_ms` that someone waits on for a job: an auction with
    /// sealed bids closes its commit phase or is awarded, a lease lapses, a result reveal window
    /// closes ([`Job::wake_times_ms`]). An idle proposer proposes then rather than after its
    /// whole idle interval. One lookup in an index, however many jobs are open.
    pub fn next_wake_ms(&self, after_ms: u64) -> Option<u64> {
        let from = (after_ms.checked_add(1)?, Hash::ZERO);
        self.wakes.range(from..).next().map(|(t, _)| *t)
    }

    /// How many jobs are open.
    pub fn open_job_count(&self) -> usize {
        self.due_jobs.len()
    }

    /// The newest ended jobs (at most [`RECENT_ENDED`]), newest first, with when they ended.
    pub fn recent_ended_jobs(&self) -> impl Iterator<Item = (u64, Hash)> + '_ {
        self.recent_ended.iter().rev().copied()
    }

    /// `node` as the market sees it: from the registry and its record. `None` unless it is a
    /// registered node with the compute role.
    pub fn provider(&self, node: &NodeId) -> Option<Provider> {
        let d = &self.nodes.get(node)?.descriptor.descriptor;
        d.roles.contains(Role::Compute).then(|| Provider {
            node: *node,
            operator: d.operator.clone(),
            region: d.region.clone(),
            country: d.country,
            jurisdiction: d.operator_jurisdiction,
            record: self.record(node),
        })
    }

    /// Registered nodes with the compute role.
    pub fn providers(&self) -> Vec<Provider> {
        self.nodes.keys().filter_map(|n| self.provider(n)).collect()
    }

    fn provider_for(&self, signer: &NodeId, job: &Hash) -> Result<Provider, TxError> {
        self.provider(signer).ok_or_else(|| {
            TxError::NotAllowed(format!(
                "job {}: {} is not a registered compute provider: only nodes with the compute role bid and run jobs",
                job.short(),
                signer.short()
            ))
        })
    }

    fn existing_job(&self, id: &Hash) -> Result<Job, TxError> {
        self.job(id).ok_or_else(|| TxError::NotAllowed(format!("no job {id}")))
    }

    /// Tries the job transaction `payload` from `signer` (paying `fee`) on a copy of the job:
    /// what it would do, or why it is refused. Changes nothing.
    fn job_step(&self, signer: NodeId, nonce: u64, fee: u64, payload: &Payload) -> Result<Step, TxError> {
        let mut money = Scratch { state: self, signer, fee, moved: BTreeMap::new() };
        let now = self.chain.timestamp_ms;
        let (id, job, events) = match payload {
            Payload::PostJob { spec } => {
                let id = job_id(&signer, nonce);
                for o in std::iter::once(&spec.module).chain(&spec.inputs) {
                    match self.object(&o.bucket, &o.key) {
                        Some(rec) if rec.version.0 == o.version => {}
                        _ => {
                            return Err(TxError::NotAllowed(format!(
                                "the job names {}/{} at version {}, which is not stored: upload it first",
                                o.bucket,
                                o.key,
                                Hash(o.version).short()
                            )));
                        }
                    }
                }
                let (job, events) =
                    Job::post(id.0, signer, spec.clone(), now, &mut money).map_err(|e| refused(&id, e))?;
                (id, job, events)
            }
            Payload::BidCommit { job: id, digest, bond_micro } => {
                let mut job = self.existing_job(id)?;
                self.provider_for(&signer, id)?;
                if self.lease_status(&signer) != LeaseStatus::Up {
                    return Err(TxError::NotAllowed(format!(
                        "job {}: provider {} is not Up: a node bids only while its lease is kept alive",
                        id.short(),
                        signer.short()
                    )));
                }
                if *bond_micro != job.bond() {
                    return Err(TxError::NotAllowed(format!(
                        "job {}: a bid locks the job's bond of {}, not {bond_micro}",
                        id.short(),
                        job.bond()
                    )));
                }
                job.commit(&signer, digest.0, now, &mut money).map_err(|e| refused(id, e))?;
                (*id, job, Vec::new())
            }
            Payload::BidReveal { job: id, price_micro, salt } => {
                let mut job = self.existing_job(id)?;
                let provider = self.provider_for(&signer, id)?;
                job.reveal(&provider, *price_micro, &salt.0, now).map_err(|e| refused(id, e))?;
                // The last sealed bid revealed: awarded in this block, not the next one (an idle
                // chain proposes every 500 ms; the run should not wait for it). A tick changes
                // only what is due, so any other reveal is left as it was.
                let events = job.tick(now, &self.market_params(), &mut money);
                (*id, job, events)
            }
            Payload::ResultCommit { job: id, digest } => {
                let mut job = self.existing_job(id)?;
                self.provider_for(&signer, id)?;
                job.commit_result(&signer, digest.0, now).map_err(|e| refused(id, e))?;
                (*id, job, Vec::new())
            }
            Payload::ResultReveal { job: id, outcome, salt } => {
                let mut job = self.existing_job(id)?;
                self.provider_for(&signer, id)?;
                let events = job
                    .reveal_result(&signer, outcome.clone(), &salt.0, now, &self.market_params(), &mut money)
                    .map_err(|e| refused(id, e))?;
                (*id, job, events)
            }
            Payload::CancelJob { job: id } => {
                let mut job = self.existing_job(id)?;
                let events = job.cancel(&signer, now, &mut money).map_err(|e| refused(id, e))?;
                (*id, job, events)
            }
            _ => return Err(TxError::Malformed(format!("{} is not a job transaction", payload.kind()))),
        };
        let burned = job.burned_micro.saturating_sub(self.job(&id).map_or(0, |j| j.burned_micro));
        Ok(Step { id, job, events, moved: money.moved, burned })
    }

    /// A heartbeat's steps, one per job: refused whole if any job refuses it.
    fn heartbeats(&self, signer: NodeId, jobs: &[Hash]) -> Result<Vec<Step>, TxError> {
        if jobs.is_empty() || jobs.len() > MAX_HEARTBEAT_JOBS {
            return Err(TxError::Malformed(format!("1 to {MAX_HEARTBEAT_JOBS} jobs per heartbeat")));
        }
        let distinct: std::collections::BTreeSet<&Hash> = jobs.iter().collect();
        if distinct.len() != jobs.len() {
            return Err(TxError::Malformed("a heartbeat names a job twice".into()));
        }
        jobs.iter()
            .map(|id| {
                let mut job = self.existing_job(id)?;
                job.heartbeat(&signer, self.chain.timestamp_ms).map_err(|e| refused(id, e))?;
                Ok(Step { id: *id, job, events: Vec::new(), moved: BTreeMap::new(), burned: 0 })
            })
            .collect()
    }

    /// The steps of a job transaction: one per job a heartbeat names, else one.
    fn job_steps(&self, signer: NodeId, nonce: u64, fee: u64, payload: &Payload) -> Result<Vec<Step>, TxError> {
        match payload {
            Payload::JobHeartbeat { jobs } => self.heartbeats(signer, jobs),
            _ => self.job_step(signer, nonce, fee, payload).map(|s| vec![s]),
        }
    }

    /// Checks a job transaction (see [`State::job_step`]).
    pub(crate) fn check_job(&self, signer: NodeId, nonce: u64, fee: u64, payload: &Payload) -> Result<(), TxError> {
        self.job_steps(signer, nonce, fee, payload).map(drop)
    }

    /// Applies a job transaction checked by [`State::check_job`] just before.
    pub(crate) fn apply_job(&mut self, signer: NodeId, nonce: u64, fee: u64, payload: &Payload) -> Receipt {
        // Checked just before: it succeeds.
        let steps = self.job_steps(signer, nonce, fee, payload).unwrap_or_default();
        let first = steps.first().map(|s| (s.id, s.job.ended.is_some()));
        for step in steps {
            self.write_step(step);
        }
        let (job, ended) = first.unwrap_or((Hash::ZERO, false));
        Receipt::JobStep { job, step: payload.kind().to_string(), ended }
    }

    /// Writes a job step: the job, its due time, the money it moved and burned, the providers'
    /// records.
    fn write_step(&mut self, step: Step) {
        for (who, delta) in step.moved {
            self.update_account(who, |a| {
                // A debit was checked against this balance; a credit cannot overflow the supply.
                a.balance_micro = u64::try_from(i128::from(a.balance_micro) + delta).unwrap_or(a.balance_micro);
            });
        }
        if step.burned > 0 {
            self.chain.fees_burned_micro = self.chain.fees_burned_micro.saturating_add(step.burned);
            self.other_changed.insert(StateKey::Chain);
        }
        for e in &step.events {
            match e {
                Event::Paid { provider, .. } => {
                    let current = self.record(provider);
                    self.records.update(*provider, |_| Some(current), |r| r.accepted = r.accepted.saturating_add(1))
                }
                Event::Penalized { provider, .. } => {
                    let current = self.record(provider);
                    self.records.update(*provider, |_| Some(current), |r| r.penalized = r.penalized.saturating_add(1))
                }
                _ => {}
            }
        }
        self.index_job(&step.id, &step.job);
        self.jobs.set(step.id, Some(step.job));
    }

    /// Keeps the due index in step with `job`.
    pub(crate) fn index_job(&mut self, id: &Hash, job: &Job) {
        if let Some(old) = self.job_due.remove(id) {
            self.due_jobs.remove(&(old, *id));
        }
        let params = self.market_params();
        if let Some(due) = job.next_due_ms(&params) {
            self.job_due.insert(*id, due);
            self.due_jobs.insert((due, *id));
        }
        for t in self.job_wakes.remove(id).unwrap_or_default() {
            self.wakes.remove(&(t, *id));
        }
        let wakes = job.wake_times_ms(&params);
        if !wakes.is_empty() {
            for t in &wakes {
                self.wakes.insert((*t, *id));
            }
            self.job_wakes.insert(*id, wakes);
        }
        if let Some(at) = ended_at(job) {
            self.recent_ended.insert((at, *id));
            if self.recent_ended.len() > RECENT_ENDED {
                self.recent_ended.remove_min();
            }
        }
    }

    /// Moves on every job due at block time `now_ms` (called as a block begins).
    pub(crate) fn tick_jobs(&mut self, now_ms: u64) {
        let due: Vec<Hash> = self
            .due_jobs
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(MAX_TICKS_PER_BLOCK)
            .map(|(_, id)| *id)
            .collect();
        let params = self.market_params();
        for id in due {
            let Some(mut job) = self.job(&id) else { continue };
            let before = job.burned_micro;
            let mut money = Scratch { state: self, signer: NodeId([0; 32]), fee: 0, moved: BTreeMap::new() };
            let events = job.tick(now_ms, &params, &mut money);
            let moved = money.moved;
            let burned = job.burned_micro.saturating_sub(before);
            self.write_step(Step { id, job, events, moved, burned });
        }
    }

    /// Writes `record` as stored, without the receipts and checks of `PutObject`: for benchmarks
    /// that build a state in process (a job needs its module stored).
    #[cfg(feature = "test-support")]
    pub fn store_object_unchecked(&mut self, record: crate::storage::ObjectRecord) {
        self.objects.set(crate::storage::object_id(&record.bucket, &record.key), Some(record));
    }

    /// Escrow and bonds every job holds (for the money check). O(jobs).
    pub fn jobs_held_micro(&self) -> u128 {
        self.job_ids()
            .iter()
            .filter_map(|id| self.job(id))
            .map(|j| u128::from(j.escrow_micro) + j.bonds.values().map(|b| u128::from(*b)).sum::<u128>())
            .sum()
    }

    /// Every job id, in key order. O(jobs).
    pub fn job_ids(&self) -> Vec<Hash> {
        self.overlay_keys("job/", &self.jobs, StateKey::Job)
            .into_iter()
            .filter_map(|k| if let StateKey::Job(id) = k { Some(id) } else { None })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::lease::{AliveProof, LivenessChange};
    use crate::state::GenesisState;
    use crate::state::tests::{id, signed};
    use crate::storage::ObjectRecord;
    use crate::{LedgerParams, SignedTransaction};
    use archipel_crypto::SignedDescriptor;
    use archipel_market::rule::{commitment, result_commitment};
    use archipel_market::{JobLimits, JobSpec, ObjectRef, RunOutcome};
    use archipel_types::{ErasureCode, Geofence};
    use commonware_codec::{Encode as _, ReadExt as _};

    const TENANT: u64 = 50;
    /// Providers 201..=204 in distinct operators and regions; 205 is a storage-only node.
    const PROVIDERS: [(&str, &str, &str); 4] = [
        ("eu-de", "DE", "rheinhost"),
        ("eu-fr", "FR", "seine-cloud"),
        ("eu-nl", "NL", "polder-net"),
        ("us-east", "US", "bigcloud"),
    ];

    /// A one-run job on the module `jobs/wc.wasm`, max price 100, EU only.
    pub(crate) fn spec() -> JobSpec {
        JobSpec {
            module: ObjectRef { bucket: "jobs".into(), key: "wc.wasm".into(), version: [7; 32], data_key: [8; 32] },
            inputs: vec![],
            args: vec![],
            env: vec![],
            limits: JobLimits { memory_bytes: 1 << 20, cpu_ms: 1_000, wall_ms: 5_000, output_bytes: 1 << 20 },
            max_price_micro: 100,
            geofence: Geofence { regions: ["eu".parse().unwrap()].into(), ..Geofence::default() },
            redundancy: 1,
            bid_window_ms: 1_000,
        }
    }

    fn world() -> State {
        let descriptor = |seed: u64, roles: &str| {
            let mut d = archipel_crypto::test_support::example_descriptor(&id(seed));
            if let Some((region, country, operator)) = PROVIDERS.get((seed - 201) as usize) {
                d.region = region.parse().unwrap();
                d.country = country.parse().unwrap();
                d.operator_jurisdiction = country.parse().unwrap();
                d.operator = (*operator).into();
            }
            d.roles = roles.parse().unwrap();
            SignedDescriptor::sign(&id(seed), d).unwrap()
        };
        let mut s = State::genesis(GenesisState {
            network: Hash::ZERO,
            params: LedgerParams::default(),
            timestamp_ms: 0,
            validators: vec![id(201).node_id()],
            accounts: [(id(TENANT).node_id(), 10_000)]
                .into_iter()
                .chain((201..=205).map(|n| (id(n).node_id(), 1_000)))
                .collect(),
            nodes: (201..=204).map(|n| descriptor(n, "compute")).chain([descriptor(205, "storage")]).collect(),
        });
        s.begin_block(1, 1_000);
        for n in 201..=205 {
            let proof = AliveProof::sign(&id(n), &s.network, 0);
            s.apply_liveness(&LivenessChange::Up { node: id(n).node_id(), proof }).unwrap();
        }
        // The module, as if stored (its holders do not matter here).
        let m = &spec().module;
        let record = ObjectRecord {
            bucket: m.bucket.clone(),
            key: m.key.clone(),
            version: Hash(m.version),
            size: 10,
            segment_bytes: 64,
            code: ErasureCode::DEFAULT,
            manifest_root: Hash::ZERO,
            etag: String::new(),
            holders: vec![],
            shard_bytes: 64,
            created_height: 1,
            created_ms: 1_000,
            generation: 1,
            suspect: vec![],
        };
        s.objects.set(crate::storage::object_id(&m.bucket, &m.key), Some(record));
        s
    }

    /// Nonces per account, so a test reads as a story.
    #[derive(Default)]
    struct Nonces(BTreeMap<u64, u64>);

    impl Nonces {
        fn tx(&mut self, s: &State, who: u64, payload: Payload) -> SignedTransaction {
            let n = self.0.entry(who).or_insert_with(|| s.account(&id(who).node_id()).nonce);
            *n += 1;
            signed(who, *n - 1, payload)
        }
        fn send(&mut self, s: &mut State, who: u64, payload: Payload) -> Result<Receipt, TxError> {
            let tx = self.tx(s, who, payload);
            let r = s.apply(&tx);
            if r.is_err() {
                *self.0.get_mut(&who).unwrap() -= 1;
            }
            r
        }
    }

    fn salt(n: u64) -> Hash {
        Hash::of(&[b"salt", &n.to_be_bytes()])
    }

    /// Posts `spec`, has `bidders` (seed, price) bid and reveal (the last reveal awards), and opens
    /// one more block.
    fn posted_and_awarded(s: &mut State, n: &mut Nonces, spec: JobSpec, bidders: &[(u64, u64)]) -> Hash {
        let job = job_id(&id(TENANT).node_id(), s.account(&id(TENANT).node_id()).nonce);
        n.send(s, TENANT, Payload::PostJob { spec }).unwrap();
        let bond = s.job(&job).unwrap().bond();
        for (p, price) in bidders {
            let digest = Hash(commitment(&job.0, &id(*p).node_id(), 0, *price, &salt(*p).0));
            n.send(s, *p, Payload::BidCommit { job, digest, bond_micro: bond }).unwrap();
        }
        let t = s.chain.timestamp_ms;
        s.begin_block(s.chain.height + 1, t + 1_000);
        for (p, price) in bidders {
            n.send(s, *p, Payload::BidReveal { job, price_micro: *price, salt: salt(*p) }).unwrap();
        }
        s.begin_block(s.chain.height + 1, t + 2_000);
        job
    }

    #[test]
    fn the_last_reveal_awards_in_its_own_block() {
        let mut s = world();
        let mut n = Nonces::default();
        let job = job_id(&id(TENANT).node_id(), s.account(&id(TENANT).node_id()).nonce);
        n.send(&mut s, TENANT, Payload::PostJob { spec: spec() }).unwrap();
        let bond = s.job(&job).unwrap().bond();
        for (p, price) in [(201u64, 60u64), (202, 40)] {
            let digest = Hash(commitment(&job.0, &id(p).node_id(), 0, price, &salt(p).0));
            n.send(&mut s, p, Payload::BidCommit { job, digest, bond_micro: bond }).unwrap();
        }
        let t = s.chain.timestamp_ms;
        let window = s.job(&job).unwrap().spec.bid_window_ms;
        s.begin_block(s.chain.height + 1, t + window + 10);
        n.send(&mut s, 201, Payload::BidReveal { job, price_micro: 60, salt: salt(201) }).unwrap();
        assert!(leaseholders(&s, &job).is_empty(), "202 may still reveal");
        n.send(&mut s, 202, Payload::BidReveal { job, price_micro: 40, salt: salt(202) }).unwrap();
        assert_eq!(leaseholders(&s, &job), vec![id(202).node_id()], "awarded by the last reveal, in its block");
        assert_eq!(s.job(&job).unwrap().leases[0].awarded_ms, t + window + 10);
    }

    #[test]
    fn an_idle_proposer_wakes_when_a_commit_phase_closes_and_when_a_job_falls_due() {
        let mut s = world();
        let mut n = Nonces::default();
        assert_eq!(s.next_wake_ms(0), None, "no job, nothing falls due");
        let posted = s.chain.timestamp_ms;
        let job = job_id(&id(TENANT).node_id(), s.account(&id(TENANT).node_id()).nonce);
        n.send(&mut s, TENANT, Payload::PostJob { spec: spec() }).unwrap();
        assert_eq!(s.next_wake_ms(posted), None, "an auction nobody bid on asks for no block");
        let window = spec().bid_window_ms;
        let digest = Hash(commitment(&job.0, &id(201).node_id(), 0, 60, &salt(201).0));
        let bond = s.job(&job).unwrap().bond();
        n.send(&mut s, 201, Payload::BidCommit { job, digest, bond_micro: bond }).unwrap();
        // In the commit phase: the phase's end (reveals are taken from then), then the award.
        assert_eq!(s.next_wake_ms(posted), Some(posted + window));
        assert_eq!(s.next_wake_ms(posted + window), Some(posted + 2 * window), "the reveal window's end");
        // Past both: nothing before the job's next due time, which is over.
        assert_eq!(s.next_wake_ms(posted + 2 * window), None);
        // Awarded: the lease lapses a TTL after the award without a heartbeat.
        s.begin_block(s.chain.height + 1, posted + window + 10);
        n.send(&mut s, 201, Payload::BidReveal { job, price_micro: 60, salt: salt(201) }).unwrap();
        let ttl = s.params().lease_ttl_ms;
        assert_eq!(leaseholders(&s, &job), vec![id(201).node_id()]);
        assert_eq!(s.next_wake_ms(posted + window + 10), Some(posted + window + 10 + ttl + 1));
        assert_eq!(s.next_wake_ms(u64::MAX), None);
        // A second job with a sealed bid, cancelled by its tenant: an ended job asks for nothing
        // and leaves nothing in the index.
        let lapse = posted + window + 10 + ttl + 1;
        let second = job_id(&id(TENANT).node_id(), s.account(&id(TENANT).node_id()).nonce);
        n.send(&mut s, TENANT, Payload::PostJob { spec: spec() }).unwrap();
        let digest = Hash(commitment(&second.0, &id(202).node_id(), 0, 60, &salt(202).0));
        n.send(&mut s, 202, Payload::BidCommit { job: second, digest, bond_micro: bond }).unwrap();
        let now = s.chain.timestamp_ms;
        assert_eq!(s.next_wake_ms(now), Some((now + window).min(lapse)));
        assert_eq!(s.job_wakes.len(), 2);
        n.send(&mut s, TENANT, Payload::CancelJob { job: second }).unwrap();
        assert!(s.job(&second).unwrap().ended.is_some());
        assert_eq!(s.next_wake_ms(now), Some(lapse), "only the first job's lease is left");
        assert_eq!(s.job_wakes.keys().collect::<Vec<_>>(), vec![&job]);
        assert!(s.wakes.iter().all(|(_, id)| *id == job), "{:?}", s.wakes);
    }

    fn leaseholders(s: &State, job: &Hash) -> Vec<NodeId> {
        s.job(job).unwrap().active().map(|l| l.bid.provider.node).collect()
    }

    #[test]
    fn a_job_is_posted_bid_on_awarded_run_and_paid_once_with_money_conserved() {
        let mut s = world();
        let mut n = Nonces::default();
        let total = s.total_micro();
        let tenant = id(TENANT).node_id();
        let job = posted_and_awarded(&mut s, &mut n, spec(), &[(201, 60), (202, 40), (204, 10)]);
        assert_eq!(s.total_micro(), total, "escrow and bonds are counted");
        // The cheapest EU bid wins (the US provider is outside the fence: its bond is burned).
        assert_eq!(leaseholders(&s, &job), vec![id(202).node_id()]);
        let j = s.job(&job).unwrap();
        assert_eq!(j.standby.iter().map(|b| b.provider.node).collect::<Vec<_>>(), vec![id(201).node_id()]);
        assert_eq!(s.record(&id(204).node_id()).penalized, 1);
        assert_eq!(s.chain.fees_burned_micro, 7 + 10, "seven fees and one bond of 10");
        assert_eq!(s.open_jobs().map(|(_, id)| id).collect::<Vec<_>>(), vec![job]);

        // The winner heartbeats and runs; its sealed result is revealed; it is paid its bid.
        let t = s.chain.timestamp_ms;
        n.send(&mut s, 202, Payload::JobHeartbeat { jobs: vec![job] }).unwrap();
        let outcome = RunOutcome::Success { output: [9; 32] };
        let digest = Hash(result_commitment(&job.0, &id(202).node_id(), &outcome, &salt(1).0));
        n.send(&mut s, 202, Payload::ResultCommit { job, digest }).unwrap();
        s.begin_block(s.chain.height + 1, t + 500);
        let before = s.account(&id(202).node_id()).balance_micro;
        let r = n.send(&mut s, 202, Payload::ResultReveal { job, outcome: outcome.clone(), salt: salt(1) }).unwrap();
        assert_eq!(r, Receipt::JobStep { job, step: "result_reveal".into(), ended: true });
        // Paid its bid and its bond back, less the fee.
        assert_eq!(s.account(&id(202).node_id()).balance_micro, before + 40 + 10 - 1);
        let j = s.job(&job).unwrap();
        assert!(matches!(j.ended, Some(archipel_market::Ended::Accepted { .. })));
        assert_eq!((j.escrow_micro, j.bonds.len()), (0, 0));
        // The tenant paid the price and its fee, nothing more: the rest of the escrow came back.
        assert_eq!(s.account(&tenant).balance_micro, 10_000 - 40 - 1);
        assert_eq!(s.record(&id(202).node_id()), Record { accepted: 1, penalized: 0 });
        assert_eq!(s.total_micro(), total);
        assert_eq!(s.open_jobs().count(), 0, "an ended job is due no more");
        // Nothing more to pay: a second reveal is refused.
        let e = n.send(&mut s, 202, Payload::ResultReveal { job, outcome, salt: salt(1) }).unwrap_err();
        assert!(e.to_string().contains("ended"), "{e}");
        assert_eq!(s.rebuilt_root(), s.state_root());
    }

    #[test]
    fn a_lapsed_lease_passes_to_the_standby_in_the_block_that_sees_it() {
        let mut s = world();
        let mut n = Nonces::default();
        let total = s.total_micro();
        let job = posted_and_awarded(&mut s, &mut n, spec(), &[(201, 60), (202, 40)]);
        assert_eq!(leaseholders(&s, &job), vec![id(202).node_id()]);
        let awarded = s.job(&job).unwrap().leases[0].awarded_ms;
        let ttl = s.params.lease_ttl_ms;
        // One TTL without heartbeat is not yet a lapse; a millisecond more is.
        s.begin_block(s.chain.height + 1, awarded + ttl);
        assert_eq!(leaseholders(&s, &job), vec![id(202).node_id()]);
        let burned = s.chain.fees_burned_micro;
        s.begin_block(s.chain.height + 1, awarded + ttl + 1);
        assert_eq!(leaseholders(&s, &job), vec![id(201).node_id()], "the standby took over");
        assert_eq!(s.chain.fees_burned_micro, burned + 10, "the lapsed provider's bond is burned");
        assert_eq!(s.record(&id(202).node_id()).penalized, 1);
        assert_eq!(s.total_micro(), total);
        // The lapsed provider can neither beat nor post a result; the new one can.
        let e = n.send(&mut s, 202, Payload::JobHeartbeat { jobs: vec![job] }).unwrap_err();
        assert!(e.to_string().contains("no lease"), "{e}");
        n.send(&mut s, 201, Payload::JobHeartbeat { jobs: vec![job] }).unwrap();
        // Its lease runs from the takeover: due a TTL after its heartbeat.
        let due = s.open_jobs().next().unwrap().0;
        assert_eq!(due, awarded + ttl + 1 + ttl + 1);
    }

    #[test]
    fn job_transactions_from_the_wrong_key_or_for_the_wrong_job_are_refused_and_change_nothing() {
        let mut s = world();
        let mut n = Nonces::default();
        let job = posted_and_awarded(&mut s, &mut n, spec(), &[(201, 60)]);
        let root = s.state_root();
        let bond = s.job(&job).unwrap().bond();
        let refused = |s: &mut State, n: &mut Nonces, who: u64, p: Payload| {
            let e = n.send(s, who, p).unwrap_err().to_string();
            assert_eq!(s.state_root(), root, "refused: {e}");
            e
        };
        // A module that is not stored, a spec out of bounds, more than the balance.
        let mut missing = spec();
        missing.module.version = [1; 32];
        let e = refused(&mut s, &mut n, TENANT, Payload::PostJob { spec: missing });
        assert!(e.contains("not stored") && e.contains("upload it first"), "{e}");
        let mut bad = spec();
        bad.redundancy = 9;
        assert!(refused(&mut s, &mut n, TENANT, Payload::PostJob { spec: bad }).contains("redundancy 9"));
        let mut dear = spec();
        dear.max_price_micro = 1_000_000;
        assert!(refused(&mut s, &mut n, TENANT, Payload::PostJob { spec: dear }).contains("does not cover"));
        // A key that is not a provider (the tenant, a storage-only node) cannot bid or post results.
        let digest = Hash([1; 32]);
        let e = refused(&mut s, &mut n, 205, Payload::BidCommit { job, digest, bond_micro: bond });
        assert!(e.contains("not a registered compute provider"), "{e}");
        let e = refused(&mut s, &mut n, TENANT, Payload::ResultCommit { job, digest });
        assert!(e.contains("not a registered compute provider"), "{e}");
        // A provider that did not win cannot post a result or heartbeat.
        let e = refused(&mut s, &mut n, 203, Payload::ResultCommit { job, digest });
        assert!(e.contains("no lease"), "{e}");
        // A job that does not exist; a heartbeat naming a job twice.
        let e = refused(&mut s, &mut n, 201, Payload::JobHeartbeat { jobs: vec![Hash([3; 32])] });
        assert!(e.contains("no job"), "{e}");
        let e = refused(&mut s, &mut n, 201, Payload::JobHeartbeat { jobs: vec![job, job] });
        assert!(e.contains("twice"), "{e}");
        // Someone else cancelling; the tenant cancelling once a lease was awarded.
        assert!(refused(&mut s, &mut n, 203, Payload::CancelJob { job }).contains("only the tenant"));
        assert!(refused(&mut s, &mut n, TENANT, Payload::CancelJob { job }).contains("cancelled only before"));
        // A bid with another bond, or from a provider that is down, on a new job.
        let other = job_id(&id(TENANT).node_id(), s.account(&id(TENANT).node_id()).nonce);
        n.send(&mut s, TENANT, Payload::PostJob { spec: spec() }).unwrap();
        let root = s.state_root();
        let e = n.send(&mut s, 202, Payload::BidCommit { job: other, digest, bond_micro: bond + 1 }).unwrap_err();
        assert!(e.to_string().contains("bond of 10"), "{e}");
        s.apply_liveness(&LivenessChange::Down { node: id(203).node_id() }).unwrap();
        let root_down = s.state_root();
        let e = n.send(&mut s, 203, Payload::BidCommit { job: other, digest, bond_micro: bond }).unwrap_err();
        assert!(e.to_string().contains("not Up"), "{e}");
        assert_eq!(s.state_root(), root_down);
        assert_ne!(root, root_down);
        // The tenant can cancel the new job before any award: the escrow comes back.
        let before = s.account(&id(TENANT).node_id()).balance_micro;
        n.send(&mut s, TENANT, Payload::CancelJob { job: other }).unwrap();
        assert_eq!(s.account(&id(TENANT).node_id()).balance_micro, before + 100 - 1);
    }

    fn decode(bytes: &[u8]) -> Result<Payload, commonware_codec::Error> {
        Payload::read(&mut commonware_codec::Copying(bytes))
    }

    #[test]
    fn job_payloads_round_trip_and_a_spec_must_be_canonical() {
        let job = Hash([4; 32]);
        for p in [
            Payload::PostJob { spec: spec() },
            Payload::BidCommit { job, digest: Hash([5; 32]), bond_micro: 10 },
            Payload::BidReveal { job, price_micro: 7, salt: Hash([6; 32]) },
            Payload::JobHeartbeat { jobs: vec![job, Hash([1; 32])] },
            Payload::ResultCommit { job, digest: Hash([5; 32]) },
            Payload::ResultReveal { job, outcome: RunOutcome::Success { output: [3; 32] }, salt: Hash([6; 32]) },
            Payload::ResultReveal { job, outcome: RunOutcome::Failed { end: "cpu_limit".into() }, salt: Hash([6; 32]) },
            Payload::CancelJob { job },
        ] {
            let bytes = p.encode();
            assert_eq!(bytes.len(), commonware_codec::EncodeSize::encode_size(&p), "{}", p.kind());
            assert_eq!(decode(&bytes).unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<Payload>(&json).unwrap(), p, "{json}");
        }
        // The same spec with its JSON spaced differently does not decode.
        let json = serde_json::to_vec(&spec()).unwrap();
        let spaced = String::from_utf8(json).unwrap().replacen(':', ": ", 1).into_bytes();
        let mut bytes = vec![13u8];
        commonware_codec::Write::write(&spaced, &mut bytes);
        assert!(decode(&bytes).is_err());
        // No heartbeat of nothing, nor of 65 jobs; no failure name longer than 64 bytes.
        for n in [0usize, 65] {
            let mut b = vec![16u8, n as u8];
            b.extend(std::iter::repeat_n(0u8, 32 * n));
            assert!(decode(&b).is_err(), "{n}");
        }
        let long = Payload::ResultReveal { job, outcome: RunOutcome::Failed { end: "x".repeat(65) }, salt: job };
        assert!(decode(&long.encode()).is_err());
    }

    #[test]
    fn a_bid_that_missed_its_window_leaves_the_mempool_and_frees_its_nonce() {
        let mut s = world();
        let mut n = Nonces::default();
        let job = job_id(&id(TENANT).node_id(), 0);
        n.send(&mut s, TENANT, Payload::PostJob { spec: spec() }).unwrap();
        let mut pool = crate::Mempool::new(crate::MempoolLimits::default());
        let provider = id(201).node_id();
        let bid = signed(201, 0, Payload::BidCommit { job, digest: Hash([1; 32]), bond_micro: 10 });
        let transfer = signed(202, 0, Payload::Transfer { to: provider, amount_micro: 1 });
        pool.insert(&s, bid.clone(), 200, 0).unwrap();
        pool.insert(&s, transfer, 200, 0).unwrap();
        assert_eq!(pool.next_free_nonce(&s, &provider), 1, "after the bid that waits");
        // Still in its window: it stays.
        assert_eq!(pool.drop_stale_heads(&s), 0);
        // The window closed in the next block: the bid can never apply, and goes; the transfer
        // (whose kind does not depend on time) stays; the provider's next nonce is free again.
        let t = s.chain.timestamp_ms;
        s.begin_block(s.chain.height + 1, t + 1_000);
        assert!(s.admit(&bid, 200).is_err());
        assert_eq!(pool.drop_stale_heads(&s), 1);
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.next_free_nonce(&s, &provider), 0);
        // The provider's next transaction takes the freed nonce (it was taken while the bid waited).
        let next = signed(201, 0, Payload::Transfer { to: id(202).node_id(), amount_micro: 1 });
        pool.insert(&s, next, 200, 0).unwrap();
        assert_eq!(pool.next_free_nonce(&s, &provider), 1);
    }

    #[test]
    fn open_jobs_are_due_again_after_the_state_is_reopened_from_its_store() {
        let store = std::sync::Arc::new(crate::store::MemoryStore::default());
        let mut s = world().with_store(store.clone());
        let mut n = Nonces::default();
        let job = posted_and_awarded(&mut s, &mut n, spec(), &[(201, 60), (202, 40)]);
        let cancelled = job_id(&id(TENANT).node_id(), s.account(&id(TENANT).node_id()).nonce);
        n.send(&mut s, TENANT, Payload::PostJob { spec: spec() }).unwrap();
        n.send(&mut s, TENANT, Payload::CancelJob { job: cancelled }).unwrap();
        let c = s.commit().unwrap();
        crate::store::StateStore::commit(&*store, &c, true).unwrap();
        s.committed();
        let mut opened = State::open(store).unwrap().unwrap();
        assert_eq!(opened.open_jobs().collect::<Vec<_>>(), s.open_jobs().collect::<Vec<_>>());
        assert!(!s.wakes.is_empty(), "the running lease lapses at a time worth a block");
        assert_eq!((&opened.wakes, &opened.job_wakes), (&s.wakes, &s.job_wakes), "wake times rebuilt on opening");
        let recent: Vec<_> = s.recent_ended_jobs().collect();
        assert_eq!(recent.len(), 1, "the cancelled job");
        assert_eq!(opened.recent_ended_jobs().collect::<Vec<_>>(), recent);
        assert_eq!(opened.state_root(), s.state_root());
        // The lease lapses in the reopened state as in the original.
        let t = s.chain.timestamp_ms + s.params.lease_ttl_ms + 1;
        for st in [&mut s, &mut opened] {
            st.begin_block(st.chain.height + 1, t);
        }
        assert_eq!(leaseholders(&opened, &job), vec![id(201).node_id()]);
        assert_eq!(opened.state_root(), s.state_root());
    }
}
