//! Fair admission of submitted transactions: a few threads at the node's normal priority run
//! every submission, and when several wait, small jobs from addresses that used little lately go
//! first.
//!
//! Why: admission holds the chain's lock and checks signatures, so it must not run on the API's
//! niced threads (a preempted holder would make consensus wait). It used to run on the consensus
//! runtime's blocking pool, one thread per request: a flood of large batches from many addresses
//! then put hundreds of normal-priority threads against consensus, and an honest transfer
//! queued behind all of them. Here the work of admission is bounded by the number of workers,
//! and an address that sends little (an honest client) is served before the jobs of one that
//! sends much (a spammer), however long the spammer's queue.
//!
//! "Use" is the cost (transactions, a `transfer_many` by its credits) each address had run, halved
//! for every [`DECAY`] that passed. The job with the least use of its address plus
//! [`SIZE_WEIGHT`] times its own cost runs first, ties to the job that came first. So one transfer
//! from a client sending a hundred a second goes before a chunk of 64 from a fresh address (a
//! flood from many new addresses does not push it back), addresses that queue all the time
//! alternate by cost, and an address that sent thousands lately waits for the others. (Tried:
//! self-clocked fair queueing by finish tags, with equal shares, made a new job wait for the round
//! of every busy address's queued job — 25 flooding addresses of 64-transaction chunks at the
//! paced 20,000/s delayed an honest transfer 40–80 ms; use plus cost alone let 25 fresh
//! addresses' first chunks go before an honest client's transfer, 100–130 ms.) The queue is
//! bounded ([`MAX_QUEUED_PER_SOURCE`], [`MAX_QUEUED`]):
//! beyond, a submission is refused at once (`Busy`), and a job whose caller stopped waiting is
//! dropped unrun.
//!
//! Heavy sources are paced ([`Pace`]): a job from an address whose use, with the job, would be
//! above [`Pace::light`] starts only while a node-wide token bucket of [`Pace::per_second`]
//! transactions is not in debt (it may run into debt by one job, so a batch of any size runs).
//! Light jobs may also run while the debt is under one burst, and are charged too, so heavy ones
//! get what light ones leave and many light addresses together are paced as well. The bucket is
//! charged the job's transactions (its `work`, what admission's CPU is spent on), fairness its
//! `cost` (a `transfer_many` by its credits). Refused transactions are paced apart, at an eighth
//! of the rate ([`REFUSED_SHARE`], [`FairQueue::refused`]): a flood of transactions that will
//! never be final is spread out further, without taking the pace of addresses whose
//! transactions are admitted. A job whose caller stopped waiting is dropped
//! without a charge, and heavy jobs may fill at most [`MAX_QUEUED_HEAVY`] of the queue, so junk
//! from busy addresses cannot lock light ones out.
//! Why: a flood of 100,000 transactions from 100 addresses arriving in 0.2 s kept both cores of
//! the bench box busy and an honest transfer took 4–8 times as long; spread over a second or
//! two, the same flood leaves consensus the CPU it needs. The budget is far above what the ledger
//! can finalize, so it never binds honest load.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often every address's recorded use is halved.
pub const DECAY: Duration = Duration::from_secs(1);
/// How much a job's own cost weighs in its turn against its address's recent use (see the
/// module's documentation).
pub const SIZE_WEIGHT: u64 = 8;
/// Most use an address may have (with the job) for its jobs to count as light: a client
/// sending a few transactions a second (use settles near 1.5 times the rate, halved every
/// second). Below a chunk of a batch (64), so a fresh address's first chunk is already heavy.
pub const LIGHT_USE: u64 = 32;
/// Most jobs one source address may have waiting.
pub const MAX_QUEUED_PER_SOURCE: usize = 16;
/// Most jobs waiting in all.
pub const MAX_QUEUED: usize = 1_024;
/// Refused transactions are admitted at most this share of the pace: once an address had at least
/// this many transactions refused (lately: halved with its use), its heavy jobs also wait for a
/// node-wide bucket of refusals refilled at `per_second / REFUSED_SHARE` (burst likewise), and
/// each refusal adds `REFUSED_SHARE − 1` more to its use. Addresses whose transactions are
/// admitted never wait for that bucket, so refusals cannot take the pace honest bulk uses.
pub const REFUSED_SHARE: u64 = 8;
/// Most jobs of heavy addresses waiting (the rest of [`MAX_QUEUED`] is kept for light ones).
pub const MAX_QUEUED_HEAVY: usize = MAX_QUEUED * 3 / 4;

/// A job: runs the work and answers its caller, unless the caller is gone (then returns false
/// without running it).
type Job = Box<dyn FnOnce() -> bool + Send>;

/// Why a job did not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too many jobs wait already (this source's share, or all): retry later.
    Busy,
    /// The queue stopped (the node is shutting down).
    Stopped,
    /// The job panicked.
    Failed,
}

/// How heavy sources are paced (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    /// Most use (decayed cost) an address may have, with the job, for the job to be light.
    pub light: u64,
    /// Transactions per second the node-wide bucket refills with.
    pub per_second: u64,
    /// Most transactions the bucket holds.
    pub burst: u64,
}

impl Pace {
    /// Never paces (tests of the ordering alone).
    pub const OFF: Pace = Pace { light: u64::MAX, per_second: u64::MAX, burst: u64::MAX };
}

/// What a worker does next.
enum Next {
    Run(Job),
    /// The bucket is too deep in debt for any waiting job until then.
    WaitUntil(Instant),
    Idle,
}

/// Which jobs the bucket lets start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Allowed {
    Any,
    LightOnly,
}

/// A waiting job.
struct Queued {
    /// Its arrival number (ties go to the lower).
    arrival: u64,
    /// Charged to its source's use.
    cost: u64,
    /// Charged to the bucket.
    work: u64,
    /// Its source was heavy when it was queued (counted in `queued_heavy`).
    heavy: bool,
    /// Set when its caller stopped waiting.
    gone: Arc<AtomicBool>,
    job: Job,
}

struct Sched {
    /// Waiting jobs by source.
    queues: HashMap<IpAddr, VecDeque<Queued>>,
    /// Jobs waiting in all, of them queued by heavy sources, and the next arrival number.
    queued: usize,
    queued_heavy: usize,
    arrivals: u64,
    /// Cost run per source lately (decayed).
    used: HashMap<IpAddr, u64>,
    decayed_at: Option<Instant>,
    closed: bool,
    pace: Pace,
    /// The bucket's transactions (negative: in debt), as of `refilled_at`.
    tokens: f64,
    /// The bucket of refused transactions ([`REFUSED_SHARE`]), as of `refilled_at`.
    refusals: f64,
    refilled_at: Option<Instant>,
    /// Transactions refused per source lately (decayed with `used`).
    refused: HashMap<IpAddr, u64>,
}

impl Sched {
    fn new(pace: Pace) -> Self {
        Sched {
            queues: HashMap::new(),
            queued: 0,
            queued_heavy: 0,
            arrivals: 0,
            used: HashMap::new(),
            decayed_at: None,
            closed: false,
            pace,
            tokens: pace.burst as f64,
            refusals: Self::refusal_burst(pace),
            refilled_at: None,
            refused: HashMap::new(),
        }
    }

    fn refusal_burst(pace: Pace) -> f64 {
        (pace.burst as f64 / REFUSED_SHARE as f64).max(1.0)
    }

    /// Refills both buckets up to `now`.
    fn refill(&mut self, now: Instant) {
        let refilled_at = *self.refilled_at.get_or_insert(now);
        let (rate, burst) = (self.pace.per_second as f64, self.pace.burst as f64);
        let secs = now.saturating_duration_since(refilled_at).as_secs_f64();
        self.tokens = (self.tokens + secs * rate).min(burst);
        self.refusals = (self.refusals + secs * rate / REFUSED_SHARE as f64).min(Self::refusal_burst(self.pace));
        self.refilled_at = Some(now.max(refilled_at));
    }

    /// The next job to run ([`Sched::pick`] under [`Pace`]).
    fn next(&mut self, now: Instant) -> Next {
        self.refill(now);
        let burst = self.pace.burst as f64;
        self.drop_abandoned();
        let allowed = if self.tokens >= 0.0 {
            Allowed::Any
        } else if self.tokens >= -burst {
            Allowed::LightOnly
        } else {
            // Nothing may start: wait for the light jobs' threshold if one waits, else for zero.
            let light_waits = self.queues.iter().any(|(ip, q)| q.front().is_some_and(|j| self.is_light(ip, j.cost)));
            return self.wait_for(if light_waits { -burst } else { 0.0 }, now);
        };
        match self.pick(now, allowed) {
            Some((job, work)) => {
                self.tokens -= work as f64;
                Next::Run(job)
            }
            // Everything allowed waits for the refusals' bucket (the pace's has room), or for the
            // next halving of the counts, which may stop an address counting as refusing.
            None if allowed == Allowed::Any && self.queued > 0 => {
                let rate = self.pace.per_second as f64 / REFUSED_SHARE as f64;
                let secs = (-self.refusals / rate).clamp(1e-6, 1.0);
                let refilled = now + Duration::from_secs_f64(secs);
                let halved = self.decayed_at.map_or(refilled, |at| (at + DECAY).max(now + Duration::from_micros(1)));
                Next::WaitUntil(refilled.min(halved))
            }
            None => self.wait_for(0.0, now),
        }
    }

    /// Records at `now` that `refused` transactions of a job from `source` were refused: they
    /// are charged to the refusals' bucket, and [`REFUSED_SHARE`] − 1 more each to `source`'s use.
    fn refused(&mut self, now: Instant, source: IpAddr, refused: u64) {
        self.refill(now);
        // Floored: refusals from addresses not held back (light ones, or new) must not leave a
        // debt that holds refusing addresses back for long (at most a burst's refill, 0.1 s).
        self.refusals = (self.refusals - refused as f64).max(-Self::refusal_burst(self.pace));
        let r = self.refused.entry(source).or_default();
        *r = r.saturating_add(refused);
        let u = self.used.entry(source).or_default();
        *u = u.saturating_add(refused.saturating_mul(REFUSED_SHARE - 1));
    }

    /// True when `source`'s jobs, heavy, wait for the refusals' bucket too: it had at least
    /// [`REFUSED_SHARE`] transactions refused lately (an honest client's occasional refusal, or
    /// one from someone else behind the same address, does not mark it).
    fn is_refusing(&self, source: &IpAddr) -> bool {
        self.refused.get(source).is_some_and(|r| *r >= REFUSED_SHARE)
    }

    /// Idle, or a wait until the bucket holds `level`.
    fn wait_for(&self, level: f64, now: Instant) -> Next {
        if self.queued == 0 {
            return Next::Idle;
        }
        let secs = ((level - self.tokens) / self.pace.per_second as f64).clamp(1e-6, 1.0);
        Next::WaitUntil(now + Duration::from_secs_f64(secs))
    }

    /// True when a job costing `cost` from `source` is light now.
    fn is_light(&self, source: &IpAddr, cost: u64) -> bool {
        self.used.get(source).copied().unwrap_or(0).saturating_add(cost) <= self.pace.light
    }

    /// Drops the jobs whose callers stopped waiting, uncharged.
    fn drop_abandoned(&mut self) {
        let (mut dropped, mut heavy) = (0, 0);
        self.queues.retain(|_, q| {
            q.retain(|j| {
                let gone = j.gone.load(Ordering::Relaxed);
                if gone {
                    dropped += 1;
                    heavy += usize::from(j.heavy);
                }
                !gone
            });
            !q.is_empty()
        });
        self.queued -= dropped;
        self.queued_heavy -= heavy;
    }

    /// Queues `job` from `source`, unless the queue is full for it.
    fn push(&mut self, source: IpAddr, cost: u64, work: u64, gone: Arc<AtomicBool>, job: Job) -> Result<(), Refused> {
        let cost = cost.max(1);
        let heavy = !self.is_light(&source, cost);
        let waiting_here = self.queues.get(&source).map_or(0, VecDeque::len);
        if waiting_here >= MAX_QUEUED_PER_SOURCE
            || self.queued >= MAX_QUEUED
            || (heavy && self.queued_heavy >= MAX_QUEUED_HEAVY)
        {
            return Err(Refused::Busy);
        }
        let arrival = self.arrivals;
        self.arrivals += 1;
        self.queued += 1;
        self.queued_heavy += usize::from(heavy);
        self.queues.entry(source).or_default().push_back(Queued { arrival, cost, work, heavy, gone, job });
        Ok(())
    }

    /// The next job and its work: of the jobs first in their source's line, the one whose source's
    /// use plus [`SIZE_WEIGHT`] times its cost is least (the earlier arrival on a tie); under
    /// [`Allowed::LightOnly`], of the light ones only.
    fn pick(&mut self, now: Instant, allowed: Allowed) -> Option<(Job, u64)> {
        let decayed_at = *self.decayed_at.get_or_insert(now);
        let periods = now.duration_since(decayed_at).as_nanos() / DECAY.as_nanos().max(1);
        if periods > 0 {
            self.decayed_at = Some(decayed_at + DECAY * periods.min(u32::MAX as u128) as u32);
            let shift = periods.min(63) as u32;
            let queues = &self.queues;
            self.used.retain(|ip, used| {
                *used >>= shift;
                *used > 0 || queues.contains_key(ip)
            });
            self.refused.retain(|_, refused| {
                *refused >>= shift;
                *refused > 0
            });
        }
        let source = *self
            .queues
            .iter()
            .filter_map(|(ip, q)| {
                let next = q.front()?;
                let turn =
                    self.used.get(ip).copied().unwrap_or(0).saturating_add(next.cost.saturating_mul(SIZE_WEIGHT));
                let light = self.is_light(ip, next.cost);
                let may = light || (allowed == Allowed::Any && (self.refusals >= 0.0 || !self.is_refusing(ip)));
                may.then_some((ip, turn, next.arrival))
            })
            .min_by_key(|&(_, turn, arrival)| (turn, arrival))?
            .0;
        let queue = self.queues.get_mut(&source)?;
        let Queued { cost, work, heavy, job, .. } = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.remove(&source);
        }
        self.queued -= 1;
        self.queued_heavy -= usize::from(heavy);
        let u = self.used.entry(source).or_default();
        *u = u.saturating_add(cost);
        Some((job, work))
    }
}

struct Shared {
    sched: Mutex<Sched>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The admission queue and its worker threads (stopped when this is dropped).
pub struct FairQueue {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FairQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairQueue").finish_non_exhaustive()
    }
}

impl FairQueue {
    /// Starts `workers` threads. They take the calling thread's priority: create the queue on a
    /// thread at the node's normal priority.
    pub fn new(workers: usize, pace: Pace) -> std::io::Result<Self> {
        let shared = Arc::new(Shared { sched: Mutex::new(Sched::new(pace)), ready: Condvar::new() });
        for i in 0..workers.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new().name(format!("admission-{i}")).spawn(move || work(&shared))?;
        }
        Ok(FairQueue { shared })
    }

    /// Runs `f` on a worker in its turn, charged `cost` to `source` (fairness) and `work`
    /// transactions to the bucket (pace). `f` does not run if the caller stopped waiting before
    /// its turn.
    pub async fn run<R: Send + 'static>(
        &self,
        source: IpAddr,
        cost: u64,
        work: u64,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, Refused> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Marks the job abandoned if this future is dropped before its answer.
        let gone = Arc::new(AtomicBool::new(false));
        let _mark = MarkOnDrop(gone.clone());
        {
            let mut s = self.shared.lock();
            if s.closed {
                return Err(Refused::Stopped);
            }
            let queued_at = Instant::now();
            let job: Job = Box::new(move || {
                if tx.is_closed() {
                    return false;
                }
                let started = Instant::now();
                let answer = f();
                tracing::debug!(
                    %source,
                    cost,
                    waited_us = started.duration_since(queued_at).as_micros() as u64,
                    ran_us = started.elapsed().as_micros() as u64,
                    "admission job"
                );
                let _ = tx.send(answer);
                true
            });
            if s.push(source, cost, work, gone.clone(), job).is_err() {
                // Jobs whose callers left may be holding the room.
                s.drop_abandoned();
                return Err(Refused::Busy);
            }
        }
        // One worker: idle, or waiting for the bucket; either takes the job if the bucket lets it.
        self.shared.ready.notify_one();
        // The sender is dropped unsent when the job panicked, or when the queue stopped first.
        rx.await.map_err(|_| if self.shared.lock().closed { Refused::Stopped } else { Refused::Failed })
    }

    /// Records that `refused` transactions of a job from `source` were refused (the ledger's API
    /// calls it from inside the job, so a caller that leaves cannot skip it): later heavy jobs of
    /// `source` wait for the refusals' bucket too, and its use grows ([`REFUSED_SHARE`]).
    pub fn refused(&self, source: IpAddr, refused: u64) {
        if refused > 0 {
            self.shared.lock().refused(Instant::now(), source, refused);
        }
    }

    /// Jobs waiting (not yet started).
    pub fn waiting(&self) -> usize {
        self.shared.lock().queues.values().map(VecDeque::len).sum()
    }
}

/// Sets its flag when dropped.
struct MarkOnDrop(Arc<AtomicBool>);

impl Drop for MarkOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Drop for FairQueue {
    fn drop(&mut self) {
        // Waiting jobs are dropped (their callers see `None`); running ones finish.
        let mut s = self.shared.lock();
        s.closed = true;
        s.queues.clear();
        s.queued = 0;
        s.queued_heavy = 0;
        drop(s);
        self.shared.ready.notify_all();
    }
}

fn work(shared: &Shared) {
    loop {
        let job = {
            let mut s = shared.lock();
            loop {
                if s.closed {
                    return;
                }
                let now = Instant::now();
                match s.next(now) {
                    Next::Run(job) => break job,
                    Next::WaitUntil(at) => {
                        s = shared.ready.wait_timeout(s, at - now).unwrap_or_else(|e| e.into_inner()).0;
                    }
                    Next::Idle => s = shared.ready.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner),
                }
            }
        };
        // A panicking job must not take the worker with it (its caller sees `Failed`).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    /// Holds the only worker of `q` busy until the returned sender is used or dropped.
    async fn hold(q: &Arc<FairQueue>) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let q2 = q.clone();
        let blocker = tokio::spawn(async move {
            q2.run(ip(9), 1, 1, move || {
                started.send(()).unwrap();
                let _ = gate.recv();
            })
            .await
            .unwrap()
        });
        running.await.unwrap();
        (release, blocker)
    }

    /// The order in which one worker runs `jobs` (source, cost), all queued while it was busy.
    async fn order_of(jobs: &[(u8, u64)]) -> Vec<u8> {
        let q = Arc::new(FairQueue::new(1, Pace::OFF).unwrap());
        let order = Arc::new(Mutex::new(Vec::new()));
        let (release, blocker) = hold(&q).await;
        let mut waits = Vec::new();
        for &(who, cost) in jobs {
            let (q2, order) = (q.clone(), order.clone());
            waits.push(tokio::spawn(async move {
                q2.run(ip(who), cost, cost, move || order.lock().unwrap().push(who)).await
            }));
            while q.waiting() < waits.len() {
                tokio::task::yield_now().await;
            }
        }
        release.send(()).unwrap();
        blocker.await.unwrap();
        for w in waits {
            w.await.unwrap().unwrap();
        }
        order.lock().unwrap().clone()
    }

    /// A spammer queues many costly jobs and an honest address one cheap job after them: the
    /// honest job runs first (FIFO would run it last).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cheap_job_from_a_quiet_address_goes_first_however_long_the_others_queue() {
        assert_eq!(order_of(&[(1, 512), (1, 512), (1, 512), (1, 512), (2, 1)]).await, [2, 1, 1, 1, 1]);
        // Counted by cost, not by job: B's three cheap jobs finish before A's first costly one,
        // and A's cheap second one after it.
        assert_eq!(order_of(&[(1, 512), (1, 1), (2, 1), (2, 1), (2, 1)]).await, [2, 2, 2, 1, 1]);
        // Equal shares: two addresses queueing equal jobs alternate, whoever queued more.
        assert_eq!(order_of(&[(1, 10), (1, 10), (1, 10), (2, 10), (2, 10)]).await, [1, 2, 1, 2, 1]);
        // A tie goes to the earlier arrival, whatever the addresses.
        assert_eq!(order_of(&[(7, 1), (3, 1)]).await, [7, 3]);
    }

    /// A source may queue [`MAX_QUEUED_PER_SOURCE`] jobs; beyond, it is refused at once while
    /// another source still gets in. A job whose caller stopped waiting does not run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_is_bounded_and_abandoned_jobs_do_not_run() {
        let q = Arc::new(FairQueue::new(1, Pace::OFF).unwrap());
        let (release, blocker) = hold(&q).await;
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut waits = Vec::new();
        for _ in 0..MAX_QUEUED_PER_SOURCE {
            let (q2, ran) = (q.clone(), ran.clone());
            waits.push(tokio::spawn(async move {
                q2.run(ip(1), 1, 1, move || ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst)).await
            }));
            while q.waiting() < waits.len() {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(q.run(ip(1), 1, 1, || ()).await, Err(Refused::Busy));
        // The callers give up: their jobs are dropped unrun once the worker is free.
        for w in &waits {
            w.abort();
        }
        for w in waits {
            let _ = w.await;
        }
        release.send(()).unwrap();
        blocker.await.unwrap();
        let started = Instant::now();
        while q.waiting() > 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "the abandoned jobs are never taken");
            tokio::task::yield_now().await;
        }
        assert_eq!(q.run(ip(2), 1, 1, || 5).await, Ok(5));
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0, "no abandoned job ran");
    }

    #[test]
    fn use_is_forgotten_over_time() {
        let mut s = Sched::new(Pace::OFF);
        let t0 = Instant::now();
        let noop = || -> Job { Box::new(|| true) };
        s.push(ip(1), 1_000, 1_000, Arc::default(), noop()).unwrap();
        assert!(matches!(s.next(t0), Next::Run(_)));
        assert_eq!(s.used[&ip(1)], 1_000);
        assert!(matches!(s.next(t0), Next::Idle), "nothing waits");
        // One look after two periods halves twice; after ten more, once more per period.
        s.next(t0 + DECAY * 2);
        assert_eq!(s.used[&ip(1)], 250);
        s.next(t0 + DECAY * 12);
        assert!(s.used.is_empty(), "halved to nothing and forgotten: {:?}", s.used);
    }

    /// Queues a job for `who` costing `cost` (and as much work) that records `who` in `ran`
    /// when it runs; the flag that abandons it.
    fn queue(s: &mut Sched, ran: &Arc<Mutex<Vec<u8>>>, who: u8, cost: u64) -> Arc<AtomicBool> {
        let ran = ran.clone();
        let gone = Arc::new(AtomicBool::new(false));
        let job: Job = Box::new(move || {
            ran.lock().unwrap().push(who);
            true
        });
        s.push(ip(who), cost, cost, gone.clone(), job).unwrap();
        gone
    }

    /// Runs what `s` hands out at `now`; how long it asks to wait, if it does.
    fn drain(s: &mut Sched, now: Instant) -> Option<Duration> {
        loop {
            match s.next(now) {
                Next::Run(job) => {
                    job();
                }
                Next::WaitUntil(at) => return Some(at - now),
                Next::Idle => return None,
            }
        }
    }

    /// A client sending a hundred transfers a second goes before chunks from flooding
    /// addresses, fresh or not, even when it arrives last (fair queueing by finish tags made it
    /// wait for the round; use plus cost alone, for the fresh ones' first chunks).
    #[test]
    fn a_steady_small_sender_goes_before_a_round_of_chunks() {
        for flooders_use in [0, 64] {
            let mut s = Sched::new(Pace::OFF);
            let ran = Arc::new(Mutex::new(Vec::new()));
            for who in 1..=25 {
                s.used.insert(ip(who), flooders_use);
            }
            s.used.insert(ip(100), 190);
            for who in 1..=25 {
                queue(&mut s, &ran, who, 64);
            }
            queue(&mut s, &ran, 100, 1);
            let Next::Run(job) = s.next(Instant::now()) else { panic!("a job runs") };
            job();
            assert_eq!(*ran.lock().unwrap(), [100], "flooders' use {flooders_use}");
        }
        // An address that sent thousands lately waits for a fresh address's chunk.
        let mut s = Sched::new(Pace::OFF);
        let ran = Arc::new(Mutex::new(Vec::new()));
        s.used.insert(ip(1), 5_000);
        queue(&mut s, &ran, 1, 1);
        queue(&mut s, &ran, 2, 64);
        assert_eq!(drain(&mut s, Instant::now()), None);
        assert_eq!(*ran.lock().unwrap(), [2, 1]);
    }

    /// A busy address's jobs start at the node-wide pace once the burst is spent (the bucket
    /// may go into debt by one job); a light address's job runs at once while the debt is under
    /// one burst, and is charged.
    #[test]
    fn heavy_addresses_are_paced_and_light_ones_never_wait() {
        let pace = Pace { light: 4, per_second: 1_000, burst: 100 };
        let mut s = Sched::new(pace);
        let ran = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        for _ in 0..4 {
            queue(&mut s, &ran, 1, 100);
        }
        // The burst (100) pays for the first job; the second runs into debt (-100); the third
        // waits until the debt is paid, 100 ms at 1,000 a second.
        let wait = drain(&mut s, t0).expect("the third heavy job waits");
        assert_eq!(*ran.lock().unwrap(), [1, 1]);
        assert!(wait > Duration::from_millis(95) && wait <= Duration::from_millis(100), "{wait:?}");
        // A light job (fresh address, cost 1) runs now, in debt, and is charged (debt 101).
        queue(&mut s, &ran, 2, 1);
        assert!(drain(&mut s, t0).is_some());
        assert_eq!(*ran.lock().unwrap(), [1, 1, 2]);
        // At 100.5 ms the debt is 0.5 (had the light job gone free, the third would run now).
        assert!(drain(&mut s, t0 + Duration::from_micros(100_500)).is_some());
        assert_eq!(ran.lock().unwrap().len(), 3, "the light job's charge delays the heavy ones");
        assert!(drain(&mut s, t0 + Duration::from_millis(102)).is_some(), "the fourth waits for the third's cost");
        assert_eq!(*ran.lock().unwrap(), [1, 1, 2, 1]);
        assert_eq!(drain(&mut s, t0 + Duration::from_millis(210)), None);
        assert_eq!(*ran.lock().unwrap(), [1, 1, 2, 1, 1]);
        // The bucket refills to its burst, no further: after a long pause, one burst's worth.
        for _ in 0..3 {
            queue(&mut s, &ran, 1, 100);
        }
        assert!(drain(&mut s, t0 + Duration::from_secs(60)).is_some(), "100 in the bucket: two jobs, then a wait");
        assert_eq!(ran.lock().unwrap().len(), 7);
        // Without pacing, all run at once.
        let mut s = Sched::new(Pace::OFF);
        for _ in 0..4 {
            queue(&mut s, &ran, 3, 100);
        }
        assert_eq!(drain(&mut s, t0), None);
        assert_eq!(ran.lock().unwrap().iter().filter(|w| **w == 3).count(), 4);
    }

    /// Once an address's transactions were refused, its heavy jobs also wait for the refusals'
    /// bucket (an eighth of the pace); an address whose transactions are admitted does not, and
    /// the pace's own bucket is not charged for the refusals.
    #[test]
    fn refusing_addresses_wait_for_the_refusals_bucket_alone() {
        // Refusals: 100 a second, burst 20.
        let mut s = Sched::new(Pace { light: 4, per_second: 800, burst: 160 });
        let ran = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        queue(&mut s, &ran, 1, 50);
        assert_eq!(drain(&mut s, t0), None);
        // All 50 refused: the refusals' bucket is 20 in debt (30, floored at one burst), the
        // address's use 50 + 7 × 50.
        s.refused(t0, ip(1), 50);
        assert_eq!(s.used[&ip(1)], 400);
        queue(&mut s, &ran, 1, 50);
        queue(&mut s, &ran, 2, 50);
        let wait = drain(&mut s, t0).expect("the refusing address waits");
        assert_eq!(*ran.lock().unwrap(), [1, 2], "the admitted address's heavy job runs at once (60 left)");
        assert!(wait > Duration::from_millis(195) && wait <= Duration::from_millis(200), "{wait:?}");
        assert_eq!(drain(&mut s, t0 + Duration::from_millis(200)), None);
        assert_eq!(*ran.lock().unwrap(), [1, 2, 1]);
        // A light job of a refusing address is not held back (it is light).
        s.refused(t0 + Duration::from_millis(300), ip(3), 40);
        s.used.insert(ip(3), 0);
        queue(&mut s, &ran, 3, 1);
        assert_eq!(drain(&mut s, t0 + Duration::from_millis(300)), None);
        assert_eq!(ran.lock().unwrap().last(), Some(&3));
        // Fewer than REFUSED_SHARE refusals do not mark an address.
        s.refused(t0 + Duration::from_millis(300), ip(6), REFUSED_SHARE - 1);
        assert!(!s.is_refusing(&ip(6)));
        // The bucket's debt is floored at one burst of refusals (20 here): a flood of refusals
        // from addresses not held back cannot hold refusing ones back for long.
        s.refused(t0 + Duration::from_millis(300), ip(7), 1_000_000);
        assert_eq!(s.refusals, -20.0);
        // Refusals are forgotten with use: 8 s later the address is not refusing any more.
        s.refused.clear();
        s.refused(t0 + Duration::from_millis(300), ip(4), REFUSED_SHARE);
        let mut later = t0 + Duration::from_millis(300);
        for _ in 0..8 {
            later += DECAY;
            queue(&mut s, &ran, 5, 1);
            drain(&mut s, later);
        }
        assert!(!s.is_refusing(&ip(4)), "{:?}", s.refused);
    }

    /// A refusing address waits for the refusals' bucket or for the next halving of the counts,
    /// whichever comes first: after the halving it may not count as refusing any more.
    #[test]
    fn a_refusing_address_waits_no_longer_than_the_next_halving() {
        // Refusals: 10 a second, burst 20: a floored debt takes 2 s to pay (waits are cut to 1 s).
        let mut s = Sched::new(Pace { light: 4, per_second: 80, burst: 160 });
        let ran = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        queue(&mut s, &ran, 1, 50);
        assert_eq!(drain(&mut s, t0), None, "halvings counted from t0");
        let t = t0 + Duration::from_millis(600);
        s.refused(t, ip(1), REFUSED_SHARE + 2);
        s.refused(t, ip(9), 1_000);
        queue(&mut s, &ran, 1, 50);
        let wait = drain(&mut s, t).expect("the refusing address waits");
        assert_eq!(wait, Duration::from_millis(400), "until the halving at t0 + 1 s, not 1 s from now");
        // At the halving its 10 refusals become 5: not refusing, so its job runs though the
        // bucket is still in debt.
        assert_eq!(drain(&mut s, t0 + DECAY), None);
        assert_eq!(*ran.lock().unwrap(), [1, 1]);
    }

    /// Light jobs may overdraw the bucket by one burst, no more: many light addresses together
    /// are paced too (and heavy ones wait until the debt is paid).
    #[test]
    fn light_addresses_together_overdraw_one_burst_at_most() {
        let mut s = Sched::new(Pace { light: 4, per_second: 1_000, burst: 10 });
        let ran = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        for who in 0..30 {
            queue(&mut s, &ran, who, 1);
        }
        // 10 from the bucket, then 10 more down to -10 and one more (the overdraft is checked
        // before each job): 21 run, the rest wait 1 ms for the next token above -10.
        let wait = drain(&mut s, t0).expect("the other light jobs wait");
        assert_eq!(ran.lock().unwrap().len(), 21);
        assert!(wait <= Duration::from_millis(2), "{wait:?}");
        // 9 ms later the debt is 2: nine more run (down to -10 and one past it), the last ones.
        assert_eq!(drain(&mut s, t0 + Duration::from_millis(9)), None);
        assert_eq!(ran.lock().unwrap().len(), 30);
    }

    /// A job whose caller left is dropped without a charge or a turn; abandoned jobs do not hold
    /// room in the queue.
    #[test]
    fn abandoned_jobs_are_dropped_uncharged() {
        let mut s = Sched::new(Pace { light: 0, per_second: 1_000, burst: 100 });
        let ran = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let gone: Vec<_> = (0..3).map(|_| queue(&mut s, &ran, 1, 100)).collect();
        queue(&mut s, &ran, 2, 100);
        for g in &gone {
            g.store(true, Ordering::Relaxed);
        }
        // Only address 2's job runs, paid by the burst: the abandoned ones cost nothing.
        assert_eq!(drain(&mut s, t0), None);
        assert_eq!(*ran.lock().unwrap(), [2]);
        assert_eq!((s.queued, s.queued_heavy), (0, 0));
        assert!(s.tokens >= 0.0, "{}", s.tokens);
    }

    /// Heavy jobs may fill three quarters of the queue; light ones still get in.
    #[test]
    fn heavy_jobs_leave_room_for_light_ones() {
        let mut s = Sched::new(Pace { light: 4, per_second: 1, burst: 1 });
        let ran = Arc::new(Mutex::new(Vec::new()));
        let mut heavy = 0;
        'fill: for who in 0..=255u8 {
            for _ in 0..MAX_QUEUED_PER_SOURCE {
                let job: Job = Box::new(|| true);
                if s.push(ip(who), 100, 100, Arc::default(), job).is_err() {
                    break 'fill;
                }
                heavy += 1;
            }
        }
        assert_eq!(heavy, MAX_QUEUED_HEAVY);
        let job: Job = Box::new(|| true);
        assert_eq!(s.push(IpAddr::from([10, 0, 0, 1]), 100, 100, Arc::default(), job).err(), Some(Refused::Busy));
        queue(&mut s, &ran, 200, 1);
        assert_eq!(s.queued, MAX_QUEUED_HEAVY + 1, "a light job gets in");
    }

    /// Through the real queue and its worker: while a busy address's flood waits for the
    /// bucket (at one transaction a second, its fourth job would wait 50 s), a light address's
    /// job is answered at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_light_job_passes_a_paced_flood() {
        let q = Arc::new(FairQueue::new(1, Pace { light: 4, per_second: 1, burst: 100 }).unwrap());
        let mut flood = Vec::new();
        for _ in 0..MAX_QUEUED_PER_SOURCE {
            let q = q.clone();
            flood.push(tokio::spawn(async move { q.run(ip(1), 50, 50, || ()).await }));
        }
        // Three flood jobs run (100 -> 50 -> 0 -> -50 in the bucket); the others wait.
        while q.waiting() != MAX_QUEUED_PER_SOURCE - 3 || flood.iter().filter(|f| f.is_finished()).count() < 3 {
            tokio::task::yield_now().await;
        }
        let light = tokio::time::timeout(Duration::from_secs(5), q.run(ip(2), 1, 1, || 7)).await;
        assert_eq!(light, Ok(Ok(7)), "the light job waited for the flood's debt");
        assert_eq!(q.waiting(), MAX_QUEUED_PER_SOURCE - 3, "the flood is still paced");
        for f in flood {
            f.abort();
        }
    }

    /// A paced job starts when the bucket allows, with nothing else to wake the worker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paced_job_starts_on_its_own_once_the_debt_is_paid() {
        let q = FairQueue::new(1, Pace { light: 0, per_second: 1_000, burst: 1 }).unwrap();
        assert_eq!(q.run(ip(1), 100, 100, || 1).await, Ok(1));
        // 99 in debt: about 0.1 s.
        let paced = tokio::time::timeout(Duration::from_secs(10), q.run(ip(1), 1, 1, || 2)).await;
        assert_eq!(paced, Ok(Ok(2)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_leaves_the_worker_running_and_a_dropped_queue_answers_none() {
        let q = FairQueue::new(1, Pace::OFF).unwrap();
        assert_eq!(q.run(ip(1), 1, 1, || -> u8 { panic!("job failed") }).await, Err(Refused::Failed));
        assert_eq!(q.run(ip(1), 1, 1, || 7).await, Ok(7));
        q.shared.lock().closed = true;
        assert_eq!(q.run(ip(1), 1, 1, || 8).await, Err(Refused::Stopped));
    }
}
