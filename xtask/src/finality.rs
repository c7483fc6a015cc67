//! How the ledger bench learns when each of its transactions is final, for every transaction of
//! the load (not a sample): the load clients note each transaction's hash and submission time in
//! a [`Tracker`] before they send it, and one [`follow`] task reads the finalized blocks as they
//! come (`GET /v1/ledger/blocks?from=H&wait_ms=..`, a long poll that answers as soon as block H is
//! final) and marks every transaction in them final at the moment the answer arrived.
//!
//! Why this way: it is what costs the nodes least. Each finalized block is read and encoded once
//! in all, by one node (the follower asks the four validators in turn, so the cost is spread),
//! in one request per wake that carries every block finalized since the last one. The other
//! ways cost a request per batch or per transaction: the API has no wait for a batch, and waiting
//! on a batch's last transaction with `POST /v1/tx?wait=final` sends it to the validators again.
//! The follower is one HTTP client of the nodes like any other, so the latency counts what a
//! client pays to learn finality, not only what the validators take to reach it.

use anyhow::{Context as _, Result, bail};
use archipel_ledger::Hash;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Signals a closed-loop client when every transaction of its batch is final (or refused).
#[derive(Debug)]
pub struct BatchWaiter {
    remaining: AtomicUsize,
    done: tokio::sync::Notify,
}

impl BatchWaiter {
    /// A waiter for `n` transactions.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self { remaining: AtomicUsize::new(n), done: tokio::sync::Notify::new() })
    }

    fn settle_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Waits until every transaction is settled, at most `timeout`; false on timeout.
    pub async fn wait(&self, timeout: Duration) -> bool {
        if self.remaining.load(Ordering::Acquire) == 0 {
            return true;
        }
        tokio::time::timeout(timeout, self.done.notified()).await.is_ok() || self.remaining.load(Ordering::Acquire) == 0
    }
}

struct Pending {
    sent: Instant,
    /// When the node's admission answer arrived.
    answered: Option<Instant>,
    waiter: Option<Arc<BatchWaiter>>,
}

/// Where one transaction's time went: submission to the node's answer, answer to the block's
/// proposal (the leader's clock in the header, same box), proposal to the client learning it
/// final. Milliseconds; the middle two rest on the header's millisecond timestamp.
#[derive(Clone, Copy, Debug, Default)]
pub struct Split {
    pub admission_ms: f64,
    pub until_proposed_ms: f64,
    pub proposed_to_learned_ms: f64,
}

/// Submissions and what became of them (sans-IO: every instant is passed in).
#[derive(Default)]
pub struct Tracker {
    pending: HashMap<Hash, Pending>,
    /// (sent, learned final) of every transaction seen final.
    finals: Vec<(Instant, Instant)>,
    /// Where the time went, for each final transaction whose answer and block time are known.
    splits: Vec<(Instant, Split)>,
    /// When each submission attempt was sent.
    attempts: Vec<Instant>,
    /// When each refused attempt was sent.
    refusals: Vec<Instant>,
    /// When each refused transaction was first sent: sent again, it is timed from then, so the
    /// refusal's round trip and the client's back-off count in its latency.
    first_sent: HashMap<Hash, Instant>,
}

/// What a window of the load measured.
#[derive(Clone, Debug)]
pub struct WindowCounts {
    /// Attempts sent in the window.
    pub offered: usize,
    /// Of those, admitted by the node.
    pub accepted: usize,
    /// Transactions learned final in the window (whenever they were sent).
    pub finalized: usize,
    /// Submission to learned-final of each transaction admitted in the window; infinite for one
    /// not seen final.
    pub latencies_ms: Vec<f64>,
    /// The same, each with its send time in seconds into the window.
    pub timeline: Vec<(f64, f64)>,
    /// Where the time went, for the final transactions sent in the window whose answer and block
    /// time are known.
    pub splits: Vec<Split>,
}

impl Tracker {
    /// A transaction is about to be sent at `sent` (call before sending, so that its finality
    /// cannot be seen first). A re-sent transaction keeps its first submission time.
    pub fn submitting(&mut self, hash: Hash, sent: Instant, waiter: Option<Arc<BatchWaiter>>) {
        self.attempts.push(sent);
        match self.pending.entry(hash) {
            // Already waiting under an earlier batch: that batch's waiter hears of it, this one
            // need not wait for it.
            std::collections::hash_map::Entry::Occupied(_) => {
                if let Some(w) = waiter {
                    w.settle_one();
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                let sent = self.first_sent.remove(v.key()).unwrap_or(sent);
                v.insert(Pending { sent, answered: None, waiter });
            }
        }
    }

    /// The node admitted `hash` and its answer arrived at `at`.
    pub fn answered(&mut self, hash: &Hash, at: Instant) {
        if let Some(p) = self.pending.get_mut(hash) {
            p.answered.get_or_insert(at);
        }
    }

    /// The node refused the attempt sent at `sent`.
    pub fn refused(&mut self, hash: &Hash, sent: Instant) {
        self.refusals.push(sent);
        let first = self.pending.remove(hash).map(|p| {
            if let Some(w) = p.waiter {
                w.settle_one();
            }
            p.sent
        });
        self.first_sent.entry(*hash).or_insert(first.unwrap_or(sent));
    }

    /// The client learned at `at` that `hashes` are final; hashes it did not submit (funding,
    /// other clients) are ignored. `proposed`: when their block was proposed, if known.
    pub fn learned_final<'a>(
        &mut self,
        hashes: impl IntoIterator<Item = &'a Hash>,
        at: Instant,
        proposed: Option<Instant>,
    ) -> usize {
        let ms = |later: Instant, earlier: Instant| later.saturating_duration_since(earlier).as_secs_f64() * 1e3;
        let mut ours = 0;
        for hash in hashes {
            if let Some(p) = self.pending.remove(hash) {
                self.finals.push((p.sent, at));
                if let (Some(answered), Some(proposed)) = (p.answered, proposed) {
                    let split = Split {
                        admission_ms: ms(answered, p.sent),
                        until_proposed_ms: ms(proposed, answered),
                        proposed_to_learned_ms: ms(at, proposed),
                    };
                    self.splits.push((p.sent, split));
                }
                if let Some(w) = p.waiter {
                    w.settle_one();
                }
                ours += 1;
            }
        }
        ours
    }

    /// Counts of the window `[from, to)`, then forgets everything (the next step starts clean;
    /// a transaction still pending counts as never final in its own step).
    pub fn take_window(&mut self, from: Instant, to: Instant) -> WindowCounts {
        let inside = |t: &Instant| *t >= from && *t < to;
        let offered = self.attempts.iter().filter(|t| inside(t)).count();
        let refused = self.refusals.iter().filter(|t| inside(t)).count();
        let finalized = self.finals.iter().filter(|(_, at)| inside(at)).count();
        let offset = |sent: &Instant| (*sent - from).as_secs_f64();
        let mut timeline: Vec<(f64, f64)> = self
            .finals
            .iter()
            .filter(|(sent, _)| inside(sent))
            .map(|(sent, at)| (offset(sent), (*at - *sent).as_secs_f64() * 1e3))
            .collect();
        timeline.extend(self.pending.values().filter(|p| inside(&p.sent)).map(|p| (offset(&p.sent), f64::INFINITY)));
        let latencies_ms = timeline.iter().map(|(_, ms)| *ms).collect();
        let splits = self.splits.iter().filter(|(sent, _)| inside(sent)).map(|(_, s)| *s).collect();
        for p in self.pending.values() {
            if let Some(w) = &p.waiter {
                w.settle_one();
            }
        }
        *self = Tracker::default();
        WindowCounts { offered, accepted: offered.saturating_sub(refused), finalized, latencies_ms, timeline, splits }
    }

    /// Transactions sent and not yet seen final.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The tracker as the load tasks and the follower share it.
pub type SharedTracker = Arc<Mutex<Tracker>>;

/// Locks the tracker (a panicked holder leaves counts that are still usable).
pub fn lock(t: &SharedTracker) -> std::sync::MutexGuard<'_, Tracker> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Deserialize)]
struct BlockSummary {
    header: HeaderSummary,
    txs: Vec<TxSummary>,
}

#[derive(Deserialize)]
struct HeaderSummary {
    height: u64,
    timestamp_ms: u64,
}

#[derive(Deserialize)]
struct TxSummary {
    hash: Hash,
}

/// What the follower saw.
#[derive(Clone, Debug, Default)]
pub struct FollowStats {
    /// Requests made.
    pub requests: u64,
    /// Answers 429 (the node's read rate limit): each delayed what the client learned.
    pub rate_limited: u64,
    /// Blocks read.
    pub blocks: u64,
}

/// Most blocks asked for per request (the API caps pages; a smaller page is answered in full).
const PAGE: u64 = 100;
/// Longest long poll.
const WAIT_MS: u64 = 1_000;
/// Failed requests in a row after which the follower gives up.
const MAX_FAILURES: u32 = 50;

/// Follows finalized blocks from height `from` on `nodes` (in turn) until `stop`, marking the
/// tracker's transactions final as their blocks arrive.
pub async fn follow(
    client: reqwest::Client,
    nodes: Vec<String>,
    mut from: u64,
    tracker: SharedTracker,
    stop: Arc<AtomicBool>,
) -> Result<FollowStats> {
    let mut stats = FollowStats::default();
    // Block times are wall-clock milliseconds of the proposer (on this box): mapped to instants
    // through one reading of both clocks.
    let (anchor, anchor_ms) = (Instant::now(), wall_ms());
    let proposed_at = |ts: u64| {
        if ts >= anchor_ms {
            anchor.checked_add(Duration::from_millis(ts - anchor_ms))
        } else {
            anchor.checked_sub(Duration::from_millis(anchor_ms - ts))
        }
    };
    let mut failures = 0;
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let node = &nodes[turn % nodes.len()];
        turn += 1;
        stats.requests += 1;
        let url = format!("http://{node}/v1/ledger/blocks?from={from}&limit={PAGE}&wait_ms={WAIT_MS}");
        let answer = match client.get(&url).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                stats.rate_limited += 1;
                let retry = r
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<f64>().ok())
                    .map_or(Duration::from_millis(100), Duration::from_secs_f64);
                tokio::time::sleep(retry.min(Duration::from_secs(1))).await;
                continue;
            }
            Ok(r) if r.status().is_success() => r.bytes().await,
            Ok(r) => {
                failures += 1;
                if failures > MAX_FAILURES {
                    bail!("following finalized blocks: {node} answered {} {MAX_FAILURES} times in a row", r.status());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => Err(e),
        };
        let body = match answer {
            Ok(body) => body,
            Err(e) => {
                failures += 1;
                if failures > MAX_FAILURES {
                    return Err(e)
                        .context(format!("following finalized blocks on {node}: {MAX_FAILURES} failures in a row"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let at = Instant::now();
        failures = 0;
        let blocks: Vec<BlockSummary> =
            serde_json::from_slice(&body).with_context(|| format!("{url} did not answer a list of blocks"))?;
        let mut t = lock(&tracker);
        for b in &blocks {
            if b.header.height != from {
                bail!("{url} answered block {} where {from} was expected", b.header.height);
            }
            t.learned_final(b.txs.iter().map(|tx| &tx.hash), at, proposed_at(b.header.timestamp_ms));
            from += 1;
            stats.blocks += 1;
        }
    }
    Ok(stats)
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> Hash {
        Hash([i; 32])
    }

    /// Every admitted transaction of the window is counted, from its own submission to the
    /// moment its block was learned final; refused ones are offered but not admitted; one still
    /// pending counts as never final; transactions of others are ignored.
    #[test]
    fn every_transaction_of_the_window_is_timed() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut t = Tracker::default();
        t.submitting(h(1), ms(0), None); // before the window: not timed, but its finality counts
        t.submitting(h(2), ms(100), None);
        t.submitting(h(3), ms(110), None);
        t.submitting(h(4), ms(120), None);
        t.refused(&h(4), ms(120));
        t.submitting(h(5), ms(130), None); // never final
        assert_eq!(t.learned_final(&[h(1), h(2), h(9)], ms(140), None), 2);
        assert_eq!(t.learned_final(&[h(3)], ms(150), None), 1);
        let w = t.take_window(ms(100), ms(200));
        assert_eq!((w.offered, w.accepted, w.finalized), (4, 3, 3));
        let mut l = w.latencies_ms;
        l.sort_by(|a, b| a.total_cmp(b));
        assert_eq!(l.len(), 3);
        assert!((l[0] - 40.0).abs() < 1e-6 && (l[1] - 40.0).abs() < 1e-6, "{l:?}");
        assert!(l[2].is_infinite());
        assert_eq!(t.pending(), 0, "the next window starts clean");
    }

    #[test]
    fn a_refused_then_resent_transaction_is_timed_from_its_first_sending() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.submitting(h(1), t0, None);
        t.refused(&h(1), t0);
        t.submitting(h(1), t0 + Duration::from_millis(40), None);
        t.learned_final(&[h(1)], t0 + Duration::from_millis(60), None);
        let w = t.take_window(t0, t0 + Duration::from_secs(1));
        assert_eq!((w.offered, w.accepted), (2, 1));
        assert_eq!(w.latencies_ms.len(), 1);
        assert!((w.latencies_ms[0] - 60.0).abs() < 1e-6, "{:?}", w.latencies_ms);
    }

    #[test]
    fn a_resent_transaction_keeps_its_first_submission_time() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        t.submitting(h(1), t0, None);
        t.submitting(h(1), t0 + Duration::from_millis(30), None);
        t.learned_final(&[h(1)], t0 + Duration::from_millis(50), None);
        let w = t.take_window(t0, t0 + Duration::from_secs(1));
        assert_eq!(w.offered, 2);
        assert_eq!(w.latencies_ms.len(), 1);
        assert!((w.latencies_ms[0] - 50.0).abs() < 1e-6);
    }

    /// The split needs the node's answer and the block's time; each part is measured from the
    /// one before (a block built before the answer arrived counts 0 for the middle part).
    #[test]
    fn where_the_time_went_is_split_at_the_answer_and_the_block_time() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut t = Tracker::default();
        t.submitting(h(1), ms(0), None);
        t.answered(&h(1), ms(3));
        t.submitting(h(2), ms(0), None);
        t.answered(&h(2), ms(9));
        t.submitting(h(3), ms(0), None); // never answered: no split
        t.learned_final(&[h(1), h(2), h(3)], ms(20), Some(ms(7)));
        let w = t.take_window(ms(0), ms(100));
        assert_eq!(w.splits.len(), 2);
        let parts = |s: &Split| (s.admission_ms.round(), s.until_proposed_ms.round(), s.proposed_to_learned_ms.round());
        assert_eq!(parts(&w.splits[0]), (3.0, 4.0, 13.0));
        assert_eq!(parts(&w.splits[1]), (9.0, 0.0, 13.0), "built before the answer arrived");
    }

    #[tokio::test]
    async fn a_batch_waiter_wakes_when_all_its_transactions_are_settled() {
        let t0 = Instant::now();
        let mut t = Tracker::default();
        let w = BatchWaiter::new(3);
        for i in 1..=3 {
            t.submitting(h(i), t0, Some(w.clone()));
        }
        t.learned_final(&[h(1)], t0, None);
        t.refused(&h(2), t0);
        assert!(!w.wait(Duration::from_millis(10)).await, "one is still pending");
        t.learned_final(&[h(3)], t0, None);
        assert!(w.wait(Duration::from_millis(10)).await);
    }
}
