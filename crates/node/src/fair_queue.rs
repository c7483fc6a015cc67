//! Fair admission of submitted transactions: a few threads at the node's normal priority run
//! every submission, and when several wait, the source address that has used the least lately
//! goes first.
//!
//! Why: admission holds the chain's lock and checks signatures, so it must not run on the API's
//! niced threads (a preempted holder would make consensus wait). It used to run on the consensus
//! runtime's blocking pool, one thread per request: a flood of large batches from many addresses
//! then put hundreds of normal-priority threads against consensus, and an honest transfer
//! queued behind all of them. Here the work of admission is bounded by the number of workers,
//! and an address that sent little (an honest client) is served before one that sent much
//! (a spammer), however long the spammer's queue.
//!
//! "Used" is the cost (transactions, a `transfer_many` by its credits) each address had run,
//! halved for every [`DECAY`] that passed: a quiet address soon counts as fresh again. Ties go to
//! the job that came first. The queue is bounded ([`MAX_QUEUED_PER_SOURCE`], [`MAX_QUEUED`]):
//! beyond, a submission is refused at once (`Busy`), and a job whose caller stopped waiting is
//! dropped unrun.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often every address's recorded use is halved.
pub const DECAY: Duration = Duration::from_secs(1);
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

#[derive(Default)]
struct Sched {
    /// Waiting jobs by source, each with its arrival number and cost.
    queues: HashMap<IpAddr, VecDeque<(u64, u64, Job)>>,
    /// Jobs waiting in all, and the next arrival number.
    queued: usize,
    arrivals: u64,
    /// Cost run per source lately (decayed).
    used: HashMap<IpAddr, u64>,
    decayed_at: Option<Instant>,
    closed: bool,
}

impl Sched {
    /// The next job: the oldest of the waiting source that used the least (the earlier arrival
    /// on a tie).
    fn next(&mut self, now: Instant) -> Option<Job> {
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
        }
        let used = &self.used;
        let source = *self
            .queues
            .iter()
            .min_by_key(|(ip, q)| (used.get(*ip).copied().unwrap_or(0), q.front().map_or(u64::MAX, |j| j.0)))?
            .0;
        let queue = self.queues.get_mut(&source)?;
        let (_, cost, job) = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.remove(&source);
        }
        self.queued -= 1;
        let u = self.used.entry(source).or_default();
        *u = u.saturating_add(cost);
        Some(job)
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
    pub fn new(workers: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared { sched: Mutex::new(Sched::default()), ready: Condvar::new() });
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
            let arrival = s.arrivals;
            s.arrivals += 1;
            s.queued += 1;
            s.queues.entry(source).or_default().push_back((arrival, cost.max(1), job));
        }
        self.shared.ready.notify_one();
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
                if let Some(job) = s.next(Instant::now()) {
                    break job;
                }
                s = shared.ready.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
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
        let q = Arc::new(FairQueue::new(1).unwrap());
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
    /// honest job runs right after the spammer's first (FIFO would run it last).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_address_that_used_least_goes_first_however_long_the_others_queue() {
        // Both fresh at first: the earlier arrival (1) wins the tie; then 2, which used least.
        assert_eq!(order_of(&[(1, 512), (1, 512), (1, 512), (1, 512), (2, 1)]).await, [1, 2, 1, 1, 1]);
        // Use is counted by cost, not by job: after A's 512, B's three cheap jobs go first.
        assert_eq!(order_of(&[(1, 512), (1, 1), (2, 1), (2, 1), (2, 1)]).await, [1, 2, 2, 2, 1]);
        // A tie goes to the earlier arrival, whatever the addresses.
        assert_eq!(order_of(&[(7, 1), (3, 1)]).await, [7, 3]);
    }

    /// A source may queue [`MAX_QUEUED_PER_SOURCE`] jobs; beyond, it is refused at once while
    /// another source still gets in. A job whose caller stopped waiting does not run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_is_bounded_and_abandoned_jobs_do_not_run() {
        let q = Arc::new(FairQueue::new(1).unwrap());
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
        let mut s = Sched::default();
        let t0 = Instant::now();
        let noop = || -> Job { Box::new(|| true) };
        s.queues.entry(ip(1)).or_default().push_back((0, 1_000, noop()));
        s.queued = 1;
        assert!(s.next(t0).is_some());
        assert_eq!(s.used[&ip(1)], 1_000);
        assert!(s.next(t0).is_none(), "nothing waits");
        // One look after two periods halves twice; after ten more, once more per period.
        s.next(t0 + DECAY * 2);
        assert_eq!(s.used[&ip(1)], 250);
        s.next(t0 + DECAY * 12);
        assert!(s.used.is_empty(), "halved to nothing and forgotten: {:?}", s.used);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_leaves_the_worker_running_and_a_dropped_queue_answers_none() {
        let q = FairQueue::new(1).unwrap();
        assert_eq!(q.run(ip(1), 1, || -> u8 { panic!("job failed") }).await, Err(Refused::Failed));
        assert_eq!(q.run(ip(1), 1, || 7).await, Ok(7));
        q.shared.lock().closed = true;
        assert_eq!(q.run(ip(1), 1, || 8).await, Err(Refused::Stopped));
    }
}
