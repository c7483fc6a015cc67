//! Fair admission of submitted transactions: a few threads at the node's normal priority run
//! every submission, and when several wait, they are served fairly by source address: each
//! address gets an equal share of admission, counted in transactions.
//!
//! Why: admission holds the chain's lock and checks signatures, so it must not run on the API's
//! niced threads (a preempted holder would make consensus wait). It used to run on the consensus
//! runtime's blocking pool, one thread per request: a flood of large batches from many addresses
//! then put hundreds of normal-priority threads against consensus, and an honest transfer
//! queued behind all of them. Here the work of admission is bounded by the number of workers,
//! and an address that sends little (an honest client) is served before the jobs of one that
//! sends much (a spammer), however long the spammer's queue.
//!
//! The order is self-clocked fair queueing by cost (transactions, a `transfer_many` by its
//! credits): a job's finish tag is its cost after the later of the address's previous finish tag
//! and the tag of the job last started; the smallest tag runs first, ties to the job that came
//! first. So one transfer from an address that was quiet lately goes before a batch of 512 from
//! a fresh one, and addresses that queue all the time share admission equally. "Use" (the cost each
//! address had run, halved for every [`DECAY`] that passed) says which addresses are light for
//! pacing, below. The queue is bounded ([`MAX_QUEUED_PER_SOURCE`], [`MAX_QUEUED`]):
//! beyond, a submission is refused at once (`Busy`), and a job whose caller stopped waiting is
//! dropped unrun.
//!
//! Heavy sources are paced ([`Pace`]): a job from an address whose use, with the job, would be
//! above [`Pace::light`] starts only while a node-wide token bucket of [`Pace::per_second`]
//! transactions is not in debt (it may run into debt by one job, so a batch of any size runs).
//! Light jobs are never delayed, and are charged too, so heavy ones get what light ones leave.
//! Why: a flood of 100,000 transactions from 100 addresses arriving in 0.2 s kept both cores of
//! the bench box busy and an honest transfer took 4–8 times as long; spread over a second or
//! two, the same flood leaves consensus the CPU it needs. The budget is far above what the ledger
//! can finalize, so it never binds honest load.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often every address's recorded use is halved.
pub const DECAY: Duration = Duration::from_secs(1);
/// Most use an address may have (with the job) for its jobs to count as light: a client
/// sending a few transactions a second (use settles near twice the rate, halved every second).
pub const LIGHT_USE: u64 = 64;
/// Most jobs one source address may have waiting.
pub const MAX_QUEUED_PER_SOURCE: usize = 16;
/// Most jobs waiting in all.
pub const MAX_QUEUED: usize = 1_024;

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
    /// Most use (decayed transactions) an address may have, with the job, to run unpaced.
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
    /// Only heavy jobs wait and the bucket is in debt until then.
    WaitUntil(Instant),
    Idle,
}

/// A waiting job.
struct Queued {
    /// Its arrival number (ties go to the lower).
    arrival: u64,
    /// Its finish tag (the lowest runs first).
    finish: u64,
    cost: u64,
    job: Job,
}

struct Sched {
    /// Waiting jobs by source.
    queues: HashMap<IpAddr, VecDeque<Queued>>,
    /// Each source's last finish tag, while above `virtual_time` or the source has jobs waiting.
    finish: HashMap<IpAddr, u64>,
    /// The finish tag of the job last started.
    virtual_time: u64,
    /// Jobs waiting in all, and the next arrival number.
    queued: usize,
    arrivals: u64,
    /// Cost run per source lately (decayed).
    used: HashMap<IpAddr, u64>,
    decayed_at: Option<Instant>,
    closed: bool,
    pace: Pace,
    /// The bucket's transactions (negative: in debt), as of `refilled_at`.
    tokens: f64,
    refilled_at: Option<Instant>,
}

impl Sched {
    fn new(pace: Pace) -> Self {
        Sched {
            queues: HashMap::new(),
            finish: HashMap::new(),
            virtual_time: 0,
            queued: 0,
            arrivals: 0,
            used: HashMap::new(),
            decayed_at: None,
            closed: false,
            pace,
            tokens: pace.burst as f64,
            refilled_at: None,
        }
    }

    /// The next job to run ([`Sched::pick`] under [`Pace`]).
    fn next(&mut self, now: Instant) -> Next {
        let refilled_at = *self.refilled_at.get_or_insert(now);
        let rate = self.pace.per_second as f64;
        self.tokens =
            (self.tokens + now.saturating_duration_since(refilled_at).as_secs_f64() * rate).min(self.pace.burst as f64);
        self.refilled_at = Some(now);
        let in_debt = self.tokens < 0.0;
        match self.pick(now, in_debt) {
            Some((job, cost)) => {
                self.tokens -= cost as f64;
                Next::Run(job)
            }
            None if self.queued > 0 && in_debt => {
                Next::WaitUntil(now + Duration::from_secs_f64((-self.tokens / rate).min(1.0)))
            }
            None => Next::Idle,
        }
    }

    /// Queues `job` from `source`, costing `cost`, with its finish tag.
    fn push(&mut self, source: IpAddr, cost: u64, job: Job) {
        let cost = cost.max(1);
        let last = self.finish.get(&source).copied().unwrap_or(0);
        let finish = last.max(self.virtual_time).saturating_add(cost);
        self.finish.insert(source, finish);
        let arrival = self.arrivals;
        self.arrivals += 1;
        self.queued += 1;
        self.queues.entry(source).or_default().push_back(Queued { arrival, finish, cost, job });
    }

    /// The next job and its cost: of the jobs first in their source's line, the smallest finish
    /// tag (the earlier arrival on a tie); with `light_only`, of the light sources' only.
    fn pick(&mut self, now: Instant, light_only: bool) -> Option<(Job, u64)> {
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
            let virtual_time = self.virtual_time;
            self.finish.retain(|ip, finish| *finish > virtual_time || queues.contains_key(ip));
        }
        let (used, light) = (&self.used, self.pace.light);
        let source = *self
            .queues
            .iter()
            .filter_map(|(ip, q)| {
                let next = q.front()?;
                let use_ = used.get(ip).copied().unwrap_or(0);
                (!light_only || use_.saturating_add(next.cost) <= light).then_some((ip, next.finish, next.arrival))
            })
            .min_by_key(|&(_, finish, arrival)| (finish, arrival))?
            .0;
        let queue = self.queues.get_mut(&source)?;
        let Queued { finish, cost, job, .. } = queue.pop_front()?;
        self.virtual_time = self.virtual_time.max(finish);
        if queue.is_empty() {
            self.queues.remove(&source);
        }
        self.queued -= 1;
        let u = self.used.entry(source).or_default();
        *u = u.saturating_add(cost);
        Some((job, cost))
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

    /// Runs `f` on a worker in its turn, charged `cost` to `source`. `f` does not run if the
    /// caller stopped waiting before its turn.
    pub async fn run<R: Send + 'static>(
        &self,
        source: IpAddr,
        cost: u64,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, Refused> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut s = self.shared.lock();
            if s.closed {
                return Err(Refused::Stopped);
            }
            let waiting_here = s.queues.get(&source).map_or(0, VecDeque::len);
            if waiting_here >= MAX_QUEUED_PER_SOURCE || s.queued >= MAX_QUEUED {
                return Err(Refused::Busy);
            }
            let job: Job = Box::new(move || {
                if tx.is_closed() {
                    return false;
                }
                let _ = tx.send(f());
                true
            });
            s.push(source, cost, job);
        }
        // Every worker: one waiting for the bucket may take a light job at once.
        self.shared.ready.notify_all();
        // The sender is dropped unsent when the job panicked, or when the queue stopped first.
        rx.await.map_err(|_| if self.shared.lock().closed { Refused::Stopped } else { Refused::Failed })
    }

    /// Jobs waiting (not yet started).
    pub fn waiting(&self) -> usize {
        self.shared.lock().queues.values().map(VecDeque::len).sum()
    }
}

impl Drop for FairQueue {
    fn drop(&mut self) {
        // Waiting jobs are dropped (their callers see `None`); running ones finish.
        let mut s = self.shared.lock();
        s.closed = true;
        s.queues.clear();
        s.queued = 0;
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
            q2.run(ip(9), 1, move || {
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
            waits.push(tokio::spawn(
                async move { q2.run(ip(who), cost, move || order.lock().unwrap().push(who)).await },
            ));
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
                q2.run(ip(1), 1, move || ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst)).await
            }));
            while q.waiting() < waits.len() {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(q.run(ip(1), 1, || ()).await, Err(Refused::Busy));
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
        assert_eq!(q.run(ip(2), 1, || 5).await, Ok(5));
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0, "no abandoned job ran");
    }

    #[test]
    fn use_is_forgotten_over_time() {
        let mut s = Sched::new(Pace::OFF);
        let t0 = Instant::now();
        let noop = || -> Job { Box::new(|| true) };
        s.push(ip(1), 1_000, noop());
        assert!(matches!(s.next(t0), Next::Run(_)));
        assert_eq!(s.used[&ip(1)], 1_000);
        assert!(matches!(s.next(t0), Next::Idle), "nothing waits");
        // One look after two periods halves twice; after ten more, once more per period.
        s.next(t0 + DECAY * 2);
        assert_eq!(s.used[&ip(1)], 250);
        s.next(t0 + DECAY * 12);
        assert!(s.used.is_empty(), "halved to nothing and forgotten: {:?}", s.used);
    }

    /// Queues a job for `who` costing `cost` that records `who` in `ran` when it runs.
    fn queue(s: &mut Sched, ran: &Arc<Mutex<Vec<u8>>>, who: u8, cost: u64) {
        let ran = ran.clone();
        s.push(
            ip(who),
            cost,
            Box::new(move || {
                ran.lock().unwrap().push(who);
                true
            }),
        );
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

    /// A busy address's jobs start at the node-wide pace once the burst is spent (the bucket
    /// may go into debt by one job); a light address's job runs at once, in debt or not.
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
        // A light job (fresh address, cost 1) runs now, in debt.
        queue(&mut s, &ran, 2, 1);
        assert!(drain(&mut s, t0).is_some());
        assert_eq!(*ran.lock().unwrap(), [1, 1, 2]);
        // Half-way, the heavy job still waits; once the debt (now 101) is paid, it runs.
        assert!(drain(&mut s, t0 + Duration::from_millis(50)).is_some());
        assert_eq!(ran.lock().unwrap().len(), 3);
        assert!(drain(&mut s, t0 + Duration::from_millis(102)).is_some(), "the fourth waits for the third's cost");
        assert_eq!(*ran.lock().unwrap(), [1, 1, 2, 1]);
        assert_eq!(drain(&mut s, t0 + Duration::from_millis(210)), None);
        assert_eq!(*ran.lock().unwrap(), [1, 1, 2, 1, 1]);
        // Without pacing, all run at once.
        let mut s = Sched::new(Pace::OFF);
        for _ in 0..4 {
            queue(&mut s, &ran, 3, 100);
        }
        assert_eq!(drain(&mut s, t0), None);
        assert_eq!(ran.lock().unwrap().iter().filter(|w| **w == 3).count(), 4);
    }

    /// Through the real queue and its worker: while a busy address's flood waits for the
    /// bucket (at one transaction a second, the second job would wait 40 s), a light address's
    /// job is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_light_job_passes_a_paced_flood() {
        let q = Arc::new(FairQueue::new(1, Pace { light: 4, per_second: 1, burst: 10 }).unwrap());
        let mut flood = Vec::new();
        for _ in 0..MAX_QUEUED_PER_SOURCE {
            let q = q.clone();
            flood.push(tokio::spawn(async move { q.run(ip(1), 50, || ()).await }));
        }
        // The first flood job takes the burst and runs into debt; the others wait.
        while q.waiting() > MAX_QUEUED_PER_SOURCE - 1 || !flood.iter().any(|f| f.is_finished()) {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.run(ip(2), 1, || 7).await, Ok(7));
        assert_eq!(q.waiting(), MAX_QUEUED_PER_SOURCE - 1, "the flood is still paced");
        for f in flood {
            f.abort();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_leaves_the_worker_running_and_a_dropped_queue_answers_none() {
        let q = FairQueue::new(1, Pace::OFF).unwrap();
        assert_eq!(q.run(ip(1), 1, || -> u8 { panic!("job failed") }).await, Err(Refused::Failed));
        assert_eq!(q.run(ip(1), 1, || 7).await, Ok(7));
        q.shared.lock().closed = true;
        assert_eq!(q.run(ip(1), 1, || 8).await, Err(Refused::Stopped));
    }
}
