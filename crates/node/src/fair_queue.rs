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
//! "Used" is the cost (transactions) each address had run, halved every [`DECAY`]: a quiet
//! address soon counts as fresh again.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often every address's recorded use is halved.
pub const DECAY: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Sched {
    /// Waiting jobs by source, each with its cost.
    queues: HashMap<IpAddr, VecDeque<(u64, Job)>>,
    /// Cost run per source lately (decayed).
    used: HashMap<IpAddr, u64>,
    decayed_at: Option<Instant>,
    closed: bool,
}

impl Sched {
    /// The next job: the oldest of the waiting source that used the least.
    fn next(&mut self, now: Instant) -> Option<Job> {
        let decayed_at = *self.decayed_at.get_or_insert(now);
        if now.duration_since(decayed_at) >= DECAY {
            self.decayed_at = Some(now);
            let queues = &self.queues;
            self.used.retain(|ip, used| {
                *used /= 2;
                *used > 0 || queues.contains_key(ip)
            });
        }
        let used = &self.used;
        let source = *self.queues.keys().min_by_key(|ip| (used.get(*ip).copied().unwrap_or(0), **ip))?;
        let queue = self.queues.get_mut(&source)?;
        let (cost, job) = queue.pop_front()?;
        if queue.is_empty() {
            self.queues.remove(&source);
        }
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

    /// Runs `f` on a worker in its turn, charged `cost` to `source`; `None` if the queue stopped
    /// first. `f` runs even if the caller stops waiting.
    pub async fn run<R: Send + 'static>(
        &self,
        source: IpAddr,
        cost: u64,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut s = self.shared.lock();
            if s.closed {
                return None;
            }
            let job: Job = Box::new(move || {
                let _ = tx.send(f());
            });
            s.queues.entry(source).or_default().push_back((cost.max(1), job));
        }
        self.shared.ready.notify_one();
        rx.await.ok()
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
        // A panicking job must not take the worker with it (its caller sees `None`).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    /// With one worker held busy, a spammer queues many costly jobs and an honest address one
    /// cheap job after them: the honest job runs right after the spammer's first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_address_that_used_least_goes_first_however_long_the_others_queue() {
        let q = Arc::new(FairQueue::new(1).unwrap());
        let order = Arc::new(Mutex::new(Vec::new()));
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let blocker = {
            let q = q.clone();
            tokio::spawn(async move {
                q.run(ip(9), 1, move || {
                    started.send(()).unwrap();
                    gate.recv().unwrap()
                })
                .await
            })
        };
        // The only worker is busy from here on: everything below queues.
        running.await.unwrap();
        let mut waits = Vec::new();
        for (who, cost) in [(1u8, 512u64), (1, 512), (1, 512), (1, 512), (2, 1)] {
            let (q2, order) = (q.clone(), order.clone());
            waits.push(tokio::spawn(
                async move { q2.run(ip(who), cost, move || order.lock().unwrap().push(who)).await },
            ));
            while q.waiting() < waits.len() {
                tokio::task::yield_now().await;
            }
        }
        release.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        for w in waits {
            w.await.unwrap().unwrap();
        }
        // Both fresh at first: the lower address (1) wins the tie; then 2, which used least.
        assert_eq!(*order.lock().unwrap(), [1, 2, 1, 1, 1]);
    }

    #[test]
    fn use_is_forgotten_over_time() {
        let mut s = Sched::default();
        let t0 = Instant::now();
        let noop = || -> Job { Box::new(|| {}) };
        s.queues.entry(ip(1)).or_default().push_back((1_000, noop()));
        assert!(s.next(t0).is_some());
        assert_eq!(s.used[&ip(1)], 1_000);
        assert!(s.next(t0).is_none(), "nothing waits");
        for k in 1..=10 {
            s.next(t0 + DECAY * k);
        }
        assert!(s.used.is_empty(), "halved to nothing and forgotten: {:?}", s.used);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_leaves_the_worker_running_and_a_dropped_queue_answers_none() {
        let q = FairQueue::new(1).unwrap();
        assert_eq!(q.run(ip(1), 1, || -> u8 { panic!("job failed") }).await, None);
        assert_eq!(q.run(ip(1), 1, || 7).await, Some(7));
        q.shared.lock().closed = true;
        assert_eq!(q.run(ip(1), 1, || 8).await, None);
    }
}
