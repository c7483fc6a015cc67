//! The arithmetic of the benchmarks' verdicts, kept apart from the processes and sockets so it
//! can be tested: percentiles over every transaction (a transaction never seen final counts as
//! infinitely late, not as absent), whether a load step met the goal, the sustained rate (the
//! highest step such that it and every lower step met the goal), and the spread of a figure over
//! several runs.

use std::fmt;
use std::time::Duration;

/// Latency goal of every load step: p99 over all of its transactions.
pub const P99_GOAL_MS: f64 = 50.0;
/// A step keeps up when at least this share of its target rate was offered by the client,
/// and finalized by the ledger, in its measured window (block boundaries at the window's edges
/// move a few transactions in or out).
pub const KEEP_UP: f64 = 0.97;

/// Latency samples in ms, sorted; `f64::INFINITY` stands for a transaction never seen final.
#[derive(Clone, Debug, Default)]
pub struct SortedMs(Vec<f64>);

impl SortedMs {
    /// Sorts `samples` (NaN never occurs: every sample is a difference of instants or infinity).
    pub fn new(mut samples: Vec<f64>) -> Self {
        samples.sort_by(|a, b| a.total_cmp(b));
        Self(samples)
    }

    /// The `p` quantile (0.0-1.0) by the nearest-rank rule; NaN when there are no samples.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.0.len() as f64 * p).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1]
    }
}

/// p50/p99 of a set of transactions and how many there were.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latencies {
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms (infinite when more than 1 % were never seen final).
    pub p99_ms: f64,
    /// Transactions counted.
    pub count: usize,
    /// Of those, never seen final.
    pub not_final: usize,
}

impl Latencies {
    /// Summarises `samples`.
    pub fn of(samples: SortedMs) -> Self {
        Self {
            p50_ms: samples.percentile(0.5),
            p99_ms: samples.percentile(0.99),
            count: samples.0.len(),
            not_final: samples.0.iter().filter(|s| s.is_infinite()).count(),
        }
    }
}

impl fmt::Display for Latencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p50 {} ms, p99 {} ms (n={}", Ms(self.p50_ms), Ms(self.p99_ms), self.count)?;
        if self.not_final > 0 {
            write!(f, ", {} never final", self.not_final)?;
        }
        f.write_str(")")
    }
}

/// A latency for printing: "never" for a transaction never seen final.
pub struct Ms(pub f64);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_infinite() { f.write_str("never") } else { write!(f, "{:.1}", self.0) }
    }
}

/// What one open-loop load step measured (rates over its measured window).
#[derive(Clone, Debug)]
pub struct Step {
    /// The rate the client aimed at (transfers/s).
    pub target_per_s: f64,
    /// Transfers the client sent, per second.
    pub offered_per_s: f64,
    /// Transfers the nodes admitted, per second.
    pub accepted_per_s: f64,
    /// Load transfers the client learned final during the window, per second.
    pub finalized_per_s: f64,
    /// Submission to learned-final of every transfer admitted in the window.
    pub latency: Latencies,
    /// How long the client waited after the window for the last transfers to be final.
    pub drain: Duration,
}

impl Step {
    /// Whether the step carried its load, whatever its latency: transfers admitted and all final,
    /// and the rate offered, admitted and finalized within [`KEEP_UP`] of the target.
    pub fn kept_up(&self) -> bool {
        self.latency.count > 0
            && self.latency.not_final == 0
            && self.offered_per_s >= KEEP_UP * self.target_per_s
            && self.accepted_per_s >= KEEP_UP * self.offered_per_s
            && self.finalized_per_s >= KEEP_UP * self.target_per_s
    }

    /// Whether this step met the goal, and if not, why (every reason that applies).
    pub fn verdict(&self) -> Result<(), String> {
        let mut why = Vec::new();
        if self.latency.count == 0 {
            why.push("no transfer was admitted".to_string());
        }
        if self.latency.p99_ms.is_nan() || self.latency.p99_ms > P99_GOAL_MS {
            why.push(format!("p99 {} ms > {P99_GOAL_MS} ms", Ms(self.latency.p99_ms)));
        }
        if self.latency.not_final > 0 {
            why.push(format!(
                "{} admitted transfers were not final {:.0} s after the step",
                self.latency.not_final,
                self.drain.as_secs_f64()
            ));
        }
        if self.offered_per_s < KEEP_UP * self.target_per_s {
            why.push(format!("the client offered only {:.0}/s", self.offered_per_s));
        }
        if self.accepted_per_s < KEEP_UP * self.offered_per_s {
            why.push(format!("the nodes admitted only {:.0}/s", self.accepted_per_s));
        }
        if self.finalized_per_s < KEEP_UP * self.target_per_s {
            why.push(format!("only {:.0}/s were finalized", self.finalized_per_s));
        }
        if why.is_empty() { Ok(()) } else { Err(why.join("; ")) }
    }
}

/// A stretch of send time in which every transfer sent was slower than the goal (or never final).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStretch {
    /// First slow transfer's send time, seconds into the window.
    pub from_s: f64,
    /// Last slow transfer's send time, seconds into the window.
    pub to_s: f64,
    /// Slow transfers in the stretch.
    pub count: usize,
    /// The slowest of them, ms.
    pub max_ms: f64,
}

/// Slow transfers sent within this of each other belong to one stretch.
const STRETCH_GAP_S: f64 = 0.25;

/// Groups the transfers slower than `over_ms` by when they were sent (`timeline`: send time in
/// seconds into the window, latency in ms): a few short stretches are a stall, one long one is an
/// overload.
pub fn slow_stretches(timeline: &[(f64, f64)], over_ms: f64) -> Vec<SlowStretch> {
    let mut slow: Vec<(f64, f64)> = timeline.iter().copied().filter(|(_, ms)| *ms > over_ms).collect();
    slow.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<SlowStretch> = Vec::new();
    for (at, ms) in slow {
        match out.last_mut() {
            Some(s) if at - s.to_s <= STRETCH_GAP_S => {
                s.to_s = at;
                s.count += 1;
                s.max_ms = s.max_ms.max(ms);
            }
            _ => out.push(SlowStretch { from_s: at, to_s: at, count: 1, max_ms: ms }),
        }
    }
    out
}

/// "412 sent in 2 stretches: 2.1-2.4 s (max 372.3 ms), 5.0-5.0 s (max 61.0 ms)", at most
/// `shown` stretches listed.
pub fn describe_stretches(stretches: &[SlowStretch], shown: usize) -> String {
    let total: usize = stretches.iter().map(|s| s.count).sum();
    let listed: Vec<String> = stretches
        .iter()
        .take(shown)
        .map(|s| format!("{:.1}-{:.1} s (max {} ms)", s.from_s, s.to_s, Ms(s.max_ms)))
        .collect();
    let more = if stretches.len() > shown { format!(", {} more", stretches.len() - shown) } else { String::new() };
    format!("{total} sent in {} stretches: {}{more}", stretches.len(), listed.join(", "))
}

/// The outcome of the rate search.
#[derive(Clone, Debug, PartialEq)]
pub struct Sustained {
    /// Index of the highest step such that it and every lower step met the goal.
    pub highest: Option<usize>,
    /// The first step that missed the goal (it ended the search) and why.
    pub stopped_at: Option<(usize, String)>,
}

/// Judges `steps` in order of their target rate: the sustained step is the last one of the
/// leading run of steps that all met the goal; the first miss ends the search (a higher step
/// that happened to pass after a miss does not count).
pub fn sustained(steps: &[Step]) -> Sustained {
    let mut order: Vec<usize> = (0..steps.len()).collect();
    order.sort_by(|a, b| steps[*a].target_per_s.total_cmp(&steps[*b].target_per_s));
    let mut highest = None;
    for i in order {
        match steps[i].verdict() {
            Ok(()) => highest = Some(i),
            Err(why) => return Sustained { highest, stopped_at: Some((i, why)) },
        }
    }
    Sustained { highest, stopped_at: None }
}

/// min, median and max of one figure over several runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// Smallest value.
    pub min: f64,
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Largest value.
    pub max: f64,
    /// Runs that produced the figure.
    pub runs: usize,
}

impl Spread {
    /// The spread of `values`, leaving out NaN (a figure a run could not measure); `None` when
    /// no value is left.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Spread { min: v[0], median, max: v[n - 1], runs: n })
    }
}

/// The named figures of one run, in the order they were measured.
#[derive(Clone, Debug, Default)]
pub struct RunFigures(Vec<(String, f64)>);

impl RunFigures {
    /// Records `value` under `name` (a later value of the same name replaces it).
    pub fn set(&mut self, name: impl Into<String>, value: f64) {
        let name = name.into();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// The value recorded under `name`.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// Every figure's spread over `runs`, in the order figures first appear; a figure a run did not
/// produce counts as not measured in that run.
pub fn spreads(runs: &[RunFigures]) -> Vec<(String, Option<Spread>)> {
    let mut names: Vec<&String> = Vec::new();
    for run in runs {
        for (name, _) in &run.0 {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let values: Vec<f64> = runs.iter().map(|r| r.get(name).unwrap_or(f64::NAN)).collect();
            (name.clone(), Spread::of(&values))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(target: f64, p99_ms: f64) -> Step {
        Step {
            target_per_s: target,
            offered_per_s: target,
            accepted_per_s: target,
            finalized_per_s: target,
            latency: Latencies { p50_ms: p99_ms / 2.0, p99_ms, count: 1_000, not_final: 0 },
            drain: Duration::from_secs(5),
        }
    }

    /// The summary of the full run at 98214b3 said "sustained 7023/s" although the 1,000, 2,000
    /// and 5,000/s steps were over 50 ms: a passing step above a failed one must not count.
    #[test]
    fn a_failed_lower_step_ends_the_search() {
        let steps = [step(1_000.0, 40.0), step(2_000.0, 66.6), step(5_000.0, 45.0), step(7_000.0, 40.0)];
        let s = sustained(&steps);
        assert_eq!(s.highest, Some(0));
        let (at, why) = s.stopped_at.expect("the 2,000/s step missed");
        assert_eq!(at, 1);
        assert!(why.contains("p99 66.6 ms > 50 ms"), "{why}");
    }

    #[test]
    fn nothing_is_sustained_when_the_lowest_step_misses() {
        let s = sustained(&[step(1_000.0, 56.5), step(2_000.0, 30.0)]);
        assert_eq!(s.highest, None);
        assert_eq!(s.stopped_at.map(|(i, _)| i), Some(0));
    }

    #[test]
    fn steps_are_judged_in_rate_order_whatever_order_they_ran_in() {
        let s = sustained(&[step(3_000.0, 30.0), step(1_000.0, 20.0), step(2_000.0, 25.0)]);
        assert_eq!(s, Sustained { highest: Some(0), stopped_at: None });
    }

    #[test]
    fn a_step_that_did_not_keep_up_misses_even_with_low_latency() {
        let mut short_client = step(8_000.0, 30.0);
        short_client.offered_per_s = 6_500.0;
        assert!(short_client.verdict().unwrap_err().contains("offered only 6500/s"));
        let mut refused = step(8_000.0, 30.0);
        refused.accepted_per_s = 7_000.0;
        assert!(refused.verdict().unwrap_err().contains("admitted only 7000/s"));
        let mut behind = step(8_000.0, 30.0);
        behind.finalized_per_s = 7_000.0;
        assert!(behind.verdict().unwrap_err().contains("only 7000/s were finalized"));
    }

    #[test]
    fn a_transaction_never_seen_final_fails_the_step() {
        let mut lost = step(1_000.0, 30.0);
        lost.latency.not_final = 1;
        assert!(lost.verdict().unwrap_err().contains("1 admitted transfers were not final 5 s after the step"));
    }

    #[test]
    fn never_final_counts_as_infinitely_late() {
        let mut samples: Vec<f64> = (1..=98).map(f64::from).collect();
        samples.extend([f64::INFINITY, f64::INFINITY]);
        let l = Latencies::of(SortedMs::new(samples));
        assert_eq!((l.p50_ms, l.count, l.not_final), (50.0, 100, 2));
        assert!(l.p99_ms.is_infinite());
        assert_eq!(l.to_string(), "p50 50.0 ms, p99 never ms (n=100, 2 never final)");
        let one_lost: Vec<f64> = (1..=99).map(f64::from).chain([f64::INFINITY]).collect();
        assert_eq!(Latencies::of(SortedMs::new(one_lost)).p99_ms, 99.0);
    }

    #[test]
    fn slow_transfers_are_grouped_by_when_they_were_sent() {
        let timeline =
            [(0.1, 10.0), (2.1, 300.0), (2.2, 372.3), (2.4, 80.0), (3.0, 20.0), (5.0, 61.0), (5.5, f64::INFINITY)];
        let s = slow_stretches(&timeline, 50.0);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0], SlowStretch { from_s: 2.1, to_s: 2.4, count: 3, max_ms: 372.3 });
        assert_eq!(
            describe_stretches(&s, 2),
            "5 sent in 3 stretches: 2.1-2.4 s (max 372.3 ms), 5.0-5.0 s (max 61.0 ms), 1 more"
        );
        assert!(slow_stretches(&[(1.0, 49.0)], 50.0).is_empty());
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let s = SortedMs::new(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.percentile(0.5), s.percentile(0.99), s.percentile(0.0)), (2.0, 4.0, 1.0));
        assert!(SortedMs::default().percentile(0.5).is_nan());
    }

    #[test]
    fn spread_gives_min_median_max_and_skips_unmeasured_runs() {
        assert_eq!(Spread::of(&[30.0, 10.0, 20.0]), Some(Spread { min: 10.0, median: 20.0, max: 30.0, runs: 3 }));
        assert_eq!(Spread::of(&[30.0, f64::NAN, 10.0]), Some(Spread { min: 10.0, median: 20.0, max: 30.0, runs: 2 }));
        assert_eq!(Spread::of(&[f64::NAN]), None);
        let mut a = RunFigures::default();
        a.set("x", 1.0);
        a.set("y", 5.0);
        let mut b = RunFigures::default();
        b.set("x", 3.0);
        let s = spreads(&[a, b]);
        assert_eq!(s[0], ("x".to_string(), Some(Spread { min: 1.0, median: 2.0, max: 3.0, runs: 2 })));
        assert_eq!(s[1], ("y".to_string(), Some(Spread { min: 5.0, median: 5.0, max: 5.0, runs: 1 })));
    }
}
