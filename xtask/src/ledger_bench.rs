//! `cargo xtask bench ledger [--runs N]`: submit->final latency and sustained transfer throughput
//! of a local 4-validator devnet, beside two baselines measured in the same run: the bare
//! simplex engine with no application ([`crate::simplex_baseline`]) and a 3-member etcd cluster
//! ([`crate::etcd_bench`]).
//!
//! Every figure is over every transaction the load sent, timed from its submission to the moment
//! the client learned it was final ([`crate::finality`]); nothing is sampled by a probe. The
//! open-loop steps raise the offered rate while every step meets the goal (p99 <= 50 ms); the
//! first miss ends the search. Throughput against etcd is measured closed loop with the same
//! outstanding work on both. With `--runs N` the whole bench runs N times and every figure is
//! given as min/median/max.

use crate::etcd_bench::{self, EtcdFigures};
use crate::figures::{self, KEEP_UP, Latencies, Ms, P99_GOAL_MS, RunFigures, SortedMs, Spread, Step};
use crate::finality::{self, BatchWaiter, SharedTracker, Tracker};
use crate::simplex_baseline::{self, BareFigures};
use anyhow::{Context as _, Result, bail};
use archipel_crypto::Identity;
use archipel_ledger::export::put_record;
use archipel_ledger::{Hash, Payload, Transaction};
use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODES: [&str; 4] = ["127.0.60.2:26201", "127.0.60.3:26201", "127.0.60.4:26201", "127.0.60.5:26201"];
/// Idle latency samples, one transaction at a time.
pub const LATENCY_SAMPLES: usize = 300;
/// How long the closed-loop load is measured (ours and etcd's).
pub const LOAD: Duration = Duration::from_secs(15);
/// Load clients, each with its own account (and etcd's, each with its own keys).
pub const CLIENTS: usize = 16;
/// Operations per request in the closed loop: each client has one batch of this many transfers
/// (etcd: one transaction of this many puts) outstanding.
pub const BATCH: usize = 50;
/// How long a load runs before its measurement starts (the idle->load edge, right after the
/// client signed the step's transfers, is not steady state).
pub const WARM_UP: Duration = Duration::from_secs(1);
/// Offered loads (transfers per second) of the open-loop steps.
const RATES: [f64; 8] = [1_000.0, 2_000.0, 3_000.0, 4_000.0, 5_000.0, 6_000.0, 7_000.0, 8_000.0];
/// The throughput goal (transfers/s with p99 <= 50 ms).
const GOAL_RATE: f64 = 5_000.0;
/// The latency goal against the bare engine: our p50 at most this times its p50.
const GOAL_P50_RATIO: f64 = 1.5;
/// The throughput goal against etcd under the same outstanding work.
const GOAL_ETCD_RATIO: f64 = 1.0;
/// Length of one rate step's measured window.
const STEP: Duration = Duration::from_secs(6);
/// After a window, how long the client waits for its last transfers to be final.
const DRAIN: Duration = Duration::from_secs(5);
/// A closed-loop client gives up waiting for its batch after this long (the rest count as never
/// final).
const BATCH_WAIT: Duration = Duration::from_secs(10);
/// How often an open-loop client sends what is due.
const OPEN_TICK: Duration = Duration::from_millis(20);
/// Most transfers an open-loop client sends in one request (the API takes up to 1,000).
const MAX_OPEN_BATCH: usize = 500;
/// Transfers per second signed beforehand for the closed loop (more are signed on the fly).
const PRESIGN_CLOSED_RATE: f64 = 16_000.0;
/// Concurrent `GET /v1/ledger/export` streams during the exports step, each from its own source
/// address (as many clients would), each reading the export to its end and starting again.
const EXPORTS: usize = 50;
/// The transfer rate of the exports step (default; `ARCHIPEL_BENCH_EXPORT_RATE`): a rate every
/// full run sustains, so what the exports add is measured, not the box running out of CPU.
const EXPORT_RATE: f64 = 2_000.0;
/// The exports of the exports step must stream at least this much in all (MB/s) for the step to
/// judge the goal: one node's default export budget (16 MiB/s), a quarter of what the four
/// devnet nodes' budgets allow.
const EXPORT_MIN_MB_S: f64 = 16.0;
/// Goal: p99 with the exports at most this times p99 without them.
const GOAL_EXPORT_RATIO: f64 = 1.2;
/// Spam step: funded accounts flooding transactions the mempool must refuse or hold in its
/// bounds (half with nonces behind a gap, half spending more than their balance), each account
/// from its own source address, [`SPAM_PER_ACCOUNT`] transactions each.
const SPAMMERS: usize = 100;
const SPAM_PER_ACCOUNT: u64 = 1_023;
/// Flood transfers per `POST /v1/txs` (the API takes at most 1,000).
const SPAM_BATCH: usize = 512;
/// What each spammer is funded with; an over-spending spammer's transfers each move 60 % of it.
const SPAM_BALANCE: u64 = 1_000_000;
/// Honest transfers timed before the flood.
const SPAM_PROBES: usize = 400;
/// Honest accounts timing transfers side by side in the spam step, one at a time each, each
/// through its own node in turn (so the short flood meets enough of them).
const PROBERS: usize = 8;
/// Fewest honest transfers that must have run during the flood for the step to judge its goal.
const SPAM_MIN_PROBES_DURING: usize = 20;
/// Goal: honest p99 during the flood at most this times p99 before it.
const GOAL_SPAM_RATIO: f64 = 1.2;
/// How long the bare-simplex baseline runs (default; `ARCHIPEL_BENCH_SIMPLEX_SECS`).
const SIMPLEX_SECS: u64 = 20;

/// What the ledger itself measured in one run.
struct Ours {
    idle: Latencies,
    steps: Vec<Step>,
    exports: Option<ExportsFigures>,
    spam: SpamFigures,
    /// Closed loop, each transfer signed on its own.
    closed: ClosedLoop,
    /// Closed loop, each client's batch one `transfer_many` (etcd's shape: one transaction of
    /// `BATCH` operations).
    closed_many: ClosedLoop,
}

/// Honest transfers, one at a time, before and during the spam flood.
struct SpamFigures {
    before: Latencies,
    during: Latencies,
    /// Flood transactions sent, and how the nodes answered them (error code or "admitted").
    sent: u64,
    answers: std::collections::BTreeMap<String, u64>,
    flood_secs: f64,
}

/// What the export readers of one step did.
struct Streamed {
    completed: u64,
    bytes: u64,
    failed: u64,
    secs: f64,
}

/// The same open-loop step without and with [`EXPORTS`] concurrent chain exports (twice each).
struct ExportsFigures {
    without: Vec<Step>,
    with: Vec<Step>,
    /// Every transfer of the steps without, and with, exports.
    pooled_without: Latencies,
    pooled_with: Latencies,
    /// Exports read to the end during the loaded step, and their bytes per second.
    completed: u64,
    bytes_per_s: f64,
    /// Exports that ended in an error (a refused request or a broken stream).
    failed: u64,
}

/// A closed-loop load: every client has the same work outstanding and sends more only when it
/// learned that work final.
#[derive(Clone, Debug)]
pub struct ClosedLoop {
    /// Operations final (committed) per second in the measured window.
    pub ops_per_s: f64,
    /// Submission to learned-final, of every operation sent in the window.
    pub latency: Latencies,
    /// Operations refused (or whose request failed).
    pub refused: u64,
    /// How busy the box's CPUs were.
    pub busy_percent: f64,
}

/// How the bench runs, from the command line and the environment.
struct Options {
    runs: usize,
    rates: Vec<f64>,
    simplex: Option<Duration>,
    etcd: bool,
    /// The exports step's rate, or `None` to skip it (`ARCHIPEL_BENCH_EXPORT_RATE=0`).
    export_rate: Option<f64>,
}

impl Options {
    fn from_env(runs: usize) -> Result<Self> {
        // ARCHIPEL_BENCH_RATES=1000,3000 runs only those steps (quick experiments).
        let mut rates = match std::env::var("ARCHIPEL_BENCH_RATES") {
            Ok(v) => parse_rates(&v)?,
            Err(_) => RATES.to_vec(),
        };
        rates.sort_by(|a, b| a.total_cmp(b));
        rates.dedup();
        let simplex = if std::env::var_os("ARCHIPEL_BENCH_NO_SIMPLEX").is_some() {
            None
        } else {
            let secs = match std::env::var("ARCHIPEL_BENCH_SIMPLEX_SECS") {
                Ok(v) => v.trim().parse::<u64>().ok().filter(|s| *s > 3).with_context(|| {
                    format!("ARCHIPEL_BENCH_SIMPLEX_SECS={v:?} is not a whole number of seconds above 3")
                })?,
                Err(_) => SIMPLEX_SECS,
            };
            Some(Duration::from_secs(secs))
        };
        let export_rate = match std::env::var("ARCHIPEL_BENCH_EXPORT_RATE") {
            Ok(v) if v.trim() == "0" => None,
            Ok(v) => Some(parse_rates(&v)?.first().copied().unwrap_or(EXPORT_RATE)),
            Err(_) => Some(EXPORT_RATE),
        };
        Ok(Options { runs, rates, simplex, etcd: std::env::var_os("ARCHIPEL_BENCH_NO_ETCD").is_none(), export_rate })
    }
}

/// Parses `1000,3000` into rates.
fn parse_rates(text: &str) -> Result<Vec<f64>> {
    let rates: Vec<f64> = text
        .split(',')
        .map(|r| {
            r.trim().parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 1.0).with_context(|| {
                format!("ARCHIPEL_BENCH_RATES: {r:?} is not a rate: give transfers per second, e.g. 1000,3000")
            })
        })
        .collect::<Result<_>>()?;
    if rates.is_empty() {
        bail!("ARCHIPEL_BENCH_RATES is empty: give transfers per second, e.g. 1000,3000");
    }
    Ok(rates)
}

/// Runs the whole bench `runs` times; with more than one run, prints each figure's spread.
pub fn bench(bin: &Path, runs: usize) -> Result<()> {
    let options = Options::from_env(runs)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut all = Vec::new();
    for run in 1..=options.runs {
        println!("== ledger bench, run {run} of {}", options.runs);
        all.push(one_run(&rt, bin, &options)?);
    }
    if options.runs > 1 {
        print_spread(&all);
    }
    Ok(())
}

fn one_run(rt: &tokio::runtime::Runtime, bin: &Path, options: &Options) -> Result<RunFigures> {
    let bare = match options.simplex {
        Some(duration) => {
            eprintln!("bare simplex: 4 validator processes for {} s", duration.as_secs());
            match simplex_baseline::run(duration) {
                Ok(b) => {
                    println!(
                        "  bare simplex (4 validators, no application): propose->finalize {}, {:.0} views/s; a payload arriving at a random moment, to its finalization (the next proposal's): {}",
                        b.latency, b.views_per_s, b.arrival
                    );
                    Some(b)
                }
                Err(e) => {
                    println!("  bare simplex baseline failed: {e:#}");
                    None
                }
            }
        }
        None => {
            println!("  bare simplex baseline: not run (ARCHIPEL_BENCH_NO_SIMPLEX is set)");
            None
        }
    };
    settle_disk();
    let ours = rt.block_on(archipel(bin, &options.rates, options.export_rate))?;
    let etcd = if options.etcd {
        settle_disk();
        match rt.block_on(etcd_bench::run()) {
            Ok(f) => Some(f),
            Err(e) => {
                println!("  etcd baseline skipped: {e:#}");
                None
            }
        }
    } else {
        println!("  etcd baseline skipped: ARCHIPEL_BENCH_NO_ETCD is set");
        None
    };
    Ok(summarise(&ours, bare.as_ref(), etcd.as_ref()))
}

/// Prints the run's summary with the goals and returns its figures.
fn summarise(ours: &Ours, bare: Option<&BareFigures>, etcd: Option<&EtcdFigures>) -> RunFigures {
    let mut f = RunFigures::default();
    println!();
    println!(
        "ledger, 4 validators on this box; every transaction timed from submission until the client learned it final:"
    );
    println!("  idle (one transfer at a time): {}", ours.idle);
    f.set("idle p50 ms", ours.idle.p50_ms);
    f.set("idle p99 ms", ours.idle.p99_ms);
    for s in &ours.steps {
        let r = s.target_per_s;
        f.set(format!("{r:.0}/s step: offered /s"), s.offered_per_s);
        f.set(format!("{r:.0}/s step: accepted /s"), s.accepted_per_s);
        f.set(format!("{r:.0}/s step: finalized /s"), s.finalized_per_s);
        f.set(format!("{r:.0}/s step: p50 ms"), s.latency.p50_ms);
        f.set(format!("{r:.0}/s step: p99 ms"), s.latency.p99_ms);
    }
    let search = figures::sustained(&ours.steps);
    let sustained = search.highest.map(|i| &ours.steps[i]);
    match sustained {
        Some(s) => println!(
            "  sustained (that step and every lower one: p99 <= {P99_GOAL_MS} ms over all transfers, >= {:.0}% of the rate offered and finalized): {:.0} transfers/s ({:.0}/s finalized, {})",
            KEEP_UP * 100.0,
            s.target_per_s,
            s.finalized_per_s,
            s.latency
        ),
        None => println!("  sustained: none (the lowest step missed the goal)"),
    }
    match &search.stopped_at {
        Some((i, why)) => println!(
            "  the search ended at the {:.0}/s step, which missed the goal: {why}; no higher step was run",
            ours.steps[*i].target_per_s
        ),
        None => println!("  every step run met the goal (add higher ARCHIPEL_BENCH_RATES to search further)"),
    }
    f.set("sustained transfers/s", sustained.map_or(0.0, |s| s.target_per_s));
    println!(
        "  closed loop ({CLIENTS} clients x 1 outstanding batch of {BATCH} transfers, the next sent when all are final): {:.0} transfers/s, {}, CPU {:.0}% busy{}",
        ours.closed.ops_per_s,
        ours.closed.latency,
        ours.closed.busy_percent,
        if ours.closed.refused > 0 { format!(", {} transfers refused", ours.closed.refused) } else { String::new() }
    );
    f.set("closed loop transfers/s", ours.closed.ops_per_s);
    f.set("closed loop p50 ms", ours.closed.latency.p50_ms);
    f.set("closed loop p99 ms", ours.closed.latency.p99_ms);
    let many = &ours.closed_many;
    println!(
        "  closed loop, etcd's shape ({CLIENTS} clients x 1 outstanding transfer_many of {BATCH} transfers to its own {BATCH} accounts, one signature each): {:.0} transfers/s, {} (per transaction), CPU {:.0}% busy{}",
        many.ops_per_s,
        many.latency,
        many.busy_percent,
        if many.refused > 0 { format!(", {} transfers refused", many.refused) } else { String::new() }
    );
    f.set("closed loop (transfer_many) transfers/s", many.ops_per_s);
    f.set("closed loop (transfer_many) p50 ms", many.latency.p50_ms);
    f.set("closed loop (transfer_many) p99 ms", many.latency.p99_ms);
    if let Some(b) = bare {
        f.set("bare simplex p50 ms", b.latency.p50_ms);
        f.set("bare simplex p99 ms", b.latency.p99_ms);
        f.set("bare simplex views/s", b.views_per_s);
    }
    if let Some(e) = etcd {
        println!(
            "  etcd, 3 members: idle (one put at a time) {}; closed loop ({CLIENTS} clients x 1 outstanding transaction of {BATCH} puts to its own {BATCH} keys): {:.0} puts/s, {}, CPU {:.0}% busy{}",
            e.idle,
            e.closed.ops_per_s,
            e.closed.latency,
            e.closed.busy_percent,
            if e.closed.refused > 0 { format!(", {} puts failed", e.closed.refused) } else { String::new() }
        );
        f.set("etcd idle p50 ms", e.idle.p50_ms);
        f.set("etcd idle p99 ms", e.idle.p99_ms);
        f.set("etcd closed loop puts/s", e.closed.ops_per_s);
        f.set("etcd closed loop p50 ms", e.closed.latency.p50_ms);
        f.set("etcd closed loop p99 ms", e.closed.latency.p99_ms);
    }

    println!("goals:");
    let rate_ratio = sustained.map_or(0.0, |s| s.target_per_s) / GOAL_RATE;
    println!(
        "  >= {GOAL_RATE:.0} transfers/s sustained with p99 <= {P99_GOAL_MS} ms: {:.0}/s, ratio {rate_ratio:.2} (goal >= 1.00) — {}",
        sustained.map_or(0.0, |s| s.target_per_s),
        met(rate_ratio >= 1.0)
    );
    f.set("goal: sustained / 5000", rate_ratio);
    // The p50 goal holds at the goal rate: the lowest sustained step at or above it, else the
    // highest sustained step (said so).
    let at_goal =
        search.highest.and_then(|h| ours.steps[..=h].iter().find(|s| s.target_per_s >= GOAL_RATE)).or(sustained);
    match (bare, at_goal) {
        (Some(b), Some(s)) => {
            let ratio = s.latency.p50_ms / b.latency.p50_ms;
            let idle_ratio = ours.idle.p50_ms / b.latency.p50_ms;
            let below = if s.target_per_s < GOAL_RATE { " (the goal rate was not sustained)" } else { "" };
            println!(
                "  p50 <= {GOAL_P50_RATIO} x bare simplex p50: at the {:.0}/s step{below} p50 {} ms / bare {} ms = {ratio:.2} (goal <= {GOAL_P50_RATIO:.2}) — {}; idle {} ms / bare = {idle_ratio:.2}",
                s.target_per_s,
                Ms(s.latency.p50_ms),
                Ms(b.latency.p50_ms),
                met(ratio <= GOAL_P50_RATIO && s.target_per_s >= GOAL_RATE),
                Ms(ours.idle.p50_ms),
            );
            // Below the goal rate the ratio does not judge the goal: recorded as NaN, so the
            // spread over runs never counts it as met.
            f.set("goal: p50 at goal step / bare p50", if s.target_per_s >= GOAL_RATE { ratio } else { f64::NAN });
            f.set("idle p50 / bare p50", idle_ratio);
            // Context, not the goal: what the bare engine itself gives a payload that arrives
            // at a random moment (it waits for the next proposal, as a transaction does).
            let floor_ratio = b.arrival.p50_ms / b.latency.p50_ms;
            let arrival_ratio = s.latency.p50_ms / b.arrival.p50_ms;
            println!(
                "    bare simplex itself, for a payload arriving at a random moment: p50 {} ms = {floor_ratio:.2} x its propose->finalize p50 (a lower bound, measured on the idle bare engine, for any application on it); ours at that step / that = {arrival_ratio:.2}",
                Ms(b.arrival.p50_ms),
            );
            f.set("bare arrival->final p50 / bare propose->finalize p50", floor_ratio);
            f.set(
                "p50 at goal step / bare arrival->final p50",
                if s.target_per_s >= GOAL_RATE { arrival_ratio } else { f64::NAN },
            );
        }
        (None, _) => {
            println!("  p50 <= {GOAL_P50_RATIO} x bare simplex p50: not judged (the bare-simplex baseline did not run)")
        }
        (Some(_), None) => {
            println!("  p50 <= {GOAL_P50_RATIO} x bare simplex p50: not judged (no step was sustained) — not met")
        }
    }
    match &ours.exports {
        Some(x) => {
            let (with, without) = (x.pooled_with.p99_ms, x.pooled_without.p99_ms);
            let ratio = with / without;
            // Judged only when the exports streamed (with 50 sharing the nodes' export budget
            // over a long chain, none may reach its end within a step: the bytes are what
            // count), none failed, and every step carried its transfer load.
            let complete = x.with.iter().chain(&x.without).all(Step::kept_up)
                && x.bytes_per_s >= EXPORT_MIN_MB_S * 1e6
                && x.failed == 0;
            println!(
                "  p99 with {EXPORTS} concurrent exports <= {GOAL_EXPORT_RATIO} x without, at {:.0}/s (over all transfers of three steps each): {} / {} ms = {ratio:.2} — {}",
                x.with[0].target_per_s,
                Ms(with),
                Ms(without),
                if complete {
                    met(ratio <= GOAL_EXPORT_RATIO)
                } else {
                    "not judged (the exports streamed under EXPORT_MIN_MB_S or failed, or a step did not carry its load)"
                }
            );
            f.set("exports step: p99 ms without", without);
            f.set("exports step: p99 ms with exports", with);
            f.set("exports step: exports read to the end", x.completed as f64);
            f.set("exports step: export MB/s", x.bytes_per_s / 1e6);
            f.set("exports step: exports failed", x.failed as f64);
            // An export step with unfinished transfers or no export bytes does not judge the goal.
            f.set("goal: p99 with exports / without", if complete { ratio } else { f64::NAN });
        }
        None => println!("  p99 with {EXPORTS} concurrent exports: not judged (the exports step did not run)"),
    }
    {
        let x = &ours.spam;
        let ratio = x.during.p99_ms / x.before.p99_ms;
        // Judged only when the flood reached the mempools as meant: every request answered, every
        // transfer judged by the mempool (admitted, or refused by its rules: none left unrun by
        // a busy admission queue), both kinds of refusal among them.
        let failed = x.answers.contains_key("request failed");
        let judged_by_the_mempool = x.answers.values().sum::<u64>() == x.sent
            && x.answers
                .keys()
                .all(|k| ["admitted", "insufficient_funds", "nonce_gap", "overspend"].contains(&k.as_str()));
        let refused_as_meant = x.answers.contains_key("nonce_gap") && x.answers.contains_key("overspend");
        let judged = x.during.not_final == 0
            && x.before.not_final == 0
            && !failed
            && judged_by_the_mempool
            && refused_as_meant
            && x.during.count >= SPAM_MIN_PROBES_DURING;
        println!(
            "  honest p99 during the spam flood <= {GOAL_SPAM_RATIO} x before: {} / {} ms = {ratio:.2} — {}",
            Ms(x.during.p99_ms),
            Ms(x.before.p99_ms),
            if judged {
                met(ratio <= GOAL_SPAM_RATIO)
            } else {
                "not judged (a flood request failed, a flood transfer was not judged by the mempool, the flood was not refused as nonce_gap and overspend, or fewer than SPAM_MIN_PROBES_DURING honest transfers ran during it)"
            }
        );
        f.set("spam step: honest p50 ms before", x.before.p50_ms);
        f.set("spam step: honest p99 ms before", x.before.p99_ms);
        f.set("spam step: honest p50 ms during", x.during.p50_ms);
        f.set("spam step: honest p99 ms during", x.during.p99_ms);
        f.set("goal: honest p99 during spam / before", if judged { ratio } else { f64::NAN });
    }
    match etcd {
        Some(e) => {
            let ratio = ours.closed_many.ops_per_s / e.closed.ops_per_s;
            println!(
                "  throughput >= {GOAL_ETCD_RATIO:.1} x etcd's, both closed loop with {} operations outstanding ({CLIENTS} x 1 transaction of {BATCH}): {:.0} / {:.0} = {ratio:.2} — {}",
                CLIENTS * BATCH,
                ours.closed_many.ops_per_s,
                e.closed.ops_per_s,
                met(ratio >= GOAL_ETCD_RATIO)
            );
            f.set("goal: closed loop ours / etcd", ratio);
            let single = ours.closed.ops_per_s / e.closed.ops_per_s;
            println!(
                "    (not the same shape: with each of the {BATCH} transfers its own signed transaction, {:.0} / {:.0} = {single:.2})",
                ours.closed.ops_per_s, e.closed.ops_per_s
            );
            f.set("closed loop, one signature per transfer / etcd", single);
        }
        None => println!("  throughput >= {GOAL_ETCD_RATIO:.1} x etcd's: not judged (etcd did not run)"),
    }
    println!();
    f
}

fn met(yes: bool) -> &'static str {
    if yes { "met" } else { "NOT met" }
}

/// Prints min/median/max of every figure over the runs, and how many runs met each goal.
fn print_spread(runs: &[RunFigures]) {
    println!("== spread over {} runs (min / median / max):", runs.len());
    for (name, spread) in figures::spreads(runs) {
        match spread {
            Some(Spread { min, median, max, runs: n }) => {
                let partial =
                    if n < runs.len() { format!(" (measured in {n} of {} runs)", runs.len()) } else { String::new() };
                println!("  {name:<42} {} / {} / {}{partial}", value(min), value(median), value(max));
            }
            None => println!("  {name:<42} not measured"),
        }
    }
    let count = |name: &str, ok: fn(f64) -> bool| runs.iter().filter(|r| r.get(name).is_some_and(ok)).count();
    println!(
        "  goals met: sustained >= {GOAL_RATE:.0}/s in {} of {n} runs; p50 <= {GOAL_P50_RATIO} x bare in {} of {n}; throughput >= {GOAL_ETCD_RATIO:.1} x etcd in {} of {n}; p99 with exports <= {GOAL_EXPORT_RATIO} x without in {} of {n}; honest p99 during spam <= {GOAL_SPAM_RATIO} x before in {} of {n}",
        count("goal: sustained / 5000", |r| r >= 1.0),
        count("goal: p50 at goal step / bare p50", |r| r <= GOAL_P50_RATIO),
        count("goal: closed loop ours / etcd", |r| r >= GOAL_ETCD_RATIO),
        count("goal: p99 with exports / without", |r| r <= GOAL_EXPORT_RATIO),
        count("goal: honest p99 during spam / before", |r| r <= GOAL_SPAM_RATIO),
        n = runs.len()
    );
}

/// A figure for the spread table: "never" for an infinite latency, fewer decimals for larger
/// values.
fn value(v: f64) -> String {
    match v.abs() {
        x if x.is_infinite() => "never".into(),
        x if x < 10.0 => format!("{v:.2}"),
        x if x < 100.0 => format!("{v:.1}"),
        _ => format!("{v:.0}"),
    }
}

/// A flush slower than this means the disk is still busy with what came before.
const SLOW_FLUSH: Duration = Duration::from_millis(20);
/// The disk counts as quiet after this long without a slow flush...
const QUIET_FOR: Duration = Duration::from_secs(5);
/// ...and the wait ends after this long in any case.
const SETTLE_AT_MOST: Duration = Duration::from_secs(60);

/// Flushes what the previous system wrote and waits until the disk is quiet, so each system
/// starts on an idle disk (every view of all three waits on flushes). Measured on this box: after
/// the bare-simplex baseline's processes exit, a 4 KiB write + fdatasync that normally takes
/// 0.5 ms takes 90-150 ms every 2-3 s for about 20 s, even after `sync` (the virtual disk is
/// still busy below the guest); without this wait those stalls landed in archipel's first load
/// steps. Probes the flush latency every 10 ms until none was slow for `QUIET_FOR`.
fn settle_disk() {
    let _ = Command::new("sync").status();
    let path = std::env::temp_dir().join(format!("archipel-bench-settle-{}", std::process::id()));
    let Ok(file) = std::fs::File::create(&path) else { return };
    let (start, mut quiet_since) = (Instant::now(), Instant::now());
    while quiet_since.elapsed() < QUIET_FOR && start.elapsed() < SETTLE_AT_MOST {
        let t = Instant::now();
        if file.write_all_at(&[0u8; 4096], 0).and_then(|_| file.sync_data()).is_err() {
            break;
        }
        if t.elapsed() > SLOW_FLUSH {
            quiet_since = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(&path);
    println!(
        "  disk quiet after {:.0} s (no flush slower than {SLOW_FLUSH:?} for {QUIET_FOR:?})",
        start.elapsed().as_secs_f64()
    );
}

/// The devnet's supervisor, stopped with SIGINT (which stops its nodes) when dropped.
/// `archipel devnet --dir devnet` with `args` in `work`, once it says it is ready; stopped (SIGINT)
/// when dropped.
pub(crate) fn start_devnet(bin: &Path, work: &Path, args: &[&str]) -> Result<Devnet> {
    let mut child = Command::new(bin)
        .current_dir(work)
        .args(["devnet", "--dir", "devnet"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let devnet = Devnet(child);
    let mut lines = BufReader::new(out).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("devnet ready") => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("devnet exited before it was ready"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok(devnet)
}

pub(crate) struct Devnet(Child);

impl Drop for Devnet {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGINT);
        let _ = self.0.wait();
    }
}

/// A signed transfer: its encoding and its hash.
struct Signed {
    bytes: Vec<u8>,
    hash: Hash,
}

/// The network id of the devnet under test, read from its head once it is up (each run of the
/// bench starts a new devnet, with a new genesis).
static NETWORK: std::sync::RwLock<Hash> = std::sync::RwLock::new(Hash::ZERO);

/// One transaction paying `amount` to each of `to` (a `transfer_many`).
fn transfer_many(from: &Identity, nonce: u64, to: &[Identity], amount: u64) -> Signed {
    let credits = to.iter().map(|t| archipel_ledger::Credit { to: t.node_id(), amount_micro: amount }).collect();
    let stx = Transaction { signer: from.node_id(), nonce, payload: Payload::TransferMany { credits } }
        .sign(from, &NETWORK.read().map_or(Hash::ZERO, |n| *n));
    Signed { hash: stx.hash(), bytes: stx.to_bytes() }
}

fn transfer(from: &Identity, nonce: u64, to: &Identity, amount: u64) -> Signed {
    let stx = Transaction {
        signer: from.node_id(),
        nonce,
        payload: Payload::Transfer { to: to.node_id(), amount_micro: amount },
    }
    .sign(from, &NETWORK.read().map_or(Hash::ZERO, |n| *n));
    Signed { hash: stx.hash(), bytes: stx.to_bytes() }
}

pub(crate) async fn post(client: &reqwest::Client, url: String, body: Vec<u8>) -> Result<serde_json::Value> {
    let r = client.post(url).header("content-type", "application/octet-stream").body(body).send().await?;
    let status = r.status();
    let v: serde_json::Value = r.json().await?;
    if !status.is_success() {
        bail!("{status}: {v}");
    }
    Ok(v)
}

async fn head(client: &reqwest::Client, node: &str) -> Result<u64> {
    let v: serde_json::Value = client.get(format!("http://{node}/v1/ledger/head")).send().await?.json().await?;
    v["header"]["height"].as_u64().context("height")
}

async fn archipel(bin: &Path, rates: &[f64], export_rate: Option<f64>) -> Result<Ours> {
    let work = std::env::temp_dir().join(format!("archipel-bench-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let _devnet = start_devnet(bin, &work, &["--nodes", "4", "--base-ip", "127.0.60.2", "--base-port", "26200"])?;
    let client =
        reqwest::Client::builder().no_proxy().pool_max_idle_per_host(64).timeout(Duration::from_secs(30)).build()?;
    while head(&client, NODES[0]).await.unwrap_or(0) < 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Transactions are signed for this network (its genesis hash).
    let v: serde_json::Value = client.get(format!("http://{}/v1/ledger/head", NODES[0])).send().await?.json().await?;
    let network: Hash =
        v["genesis_hash"].as_str().context("head without genesis_hash")?.parse().map_err(anyhow::Error::msg)?;
    *NETWORK.write().unwrap_or_else(|p| p.into_inner()) = network;
    let tenant = Identity::load(&work.join("devnet/tenant.key"))?;
    let sink = Identity::from_seed(7_000_000);

    // Fund the load accounts (one batch, then wait until final).
    let accounts: Vec<Identity> = (0..CLIENTS as u64).map(|i| Identity::from_seed(7_000_001 + i)).collect();
    let spammers: Vec<Identity> = (0..SPAMMERS as u64).map(|i| Identity::from_seed(7_100_001 + i)).collect();
    let mut nonce = 0u64;
    let mut batch = Vec::new();
    for a in &accounts {
        put_record(&mut batch, &transfer(&tenant, nonce, a, 1_000_000_000).bytes);
        nonce += 1;
    }
    for a in &spammers {
        put_record(&mut batch, &transfer(&tenant, nonce, a, SPAM_BALANCE).bytes);
        nonce += 1;
    }
    let probers: Vec<Identity> = (0..PROBERS as u64).map(|i| Identity::from_seed(7_200_001 + i)).collect();
    for a in &probers {
        put_record(&mut batch, &transfer(&tenant, nonce, a, 1_000_000_000).bytes);
        nonce += 1;
    }
    let answers = post(&client, format!("http://{}/v1/txs", NODES[0]), batch).await?;
    if answers.as_array().is_none_or(|a| a.iter().any(|x| !x["error"].is_null())) {
        bail!("funding the load accounts was refused: {answers}");
    }
    let last = transfer(&tenant, nonce, &sink, 1);
    nonce += 1;
    let answer = post(&client, format!("http://{}/v1/tx?wait=final", NODES[0]), last.bytes).await.context("funding")?;
    if answer["status"] != "final" {
        bail!("the funding transfers were not final after the node's wait: {answer}");
    }
    eprintln!("load accounts funded; measuring idle latency");

    // From here every transfer is timed: one follower learns finality for all of them.
    let tracker: SharedTracker = Arc::new(Mutex::new(Tracker::default()));
    let stop_following = Arc::new(AtomicBool::new(false));
    let follower = tokio::spawn(finality::follow(
        client.clone(),
        NODES.iter().map(|n| n.to_string()).collect(),
        head(&client, NODES[0]).await? + 1,
        tracker.clone(),
        stop_following.clone(),
    ));

    // Idle latency: one transfer at a time, each to the next node, waiting for the node's answer
    // that it is final. The follower times the same transfers: the difference is what learning
    // finality from the blocks adds (the way every load transfer below is timed).
    let mut idle = Vec::new();
    let (cpu_start, heights_start, idle_start) = (cpu_ticks(), head(&client, NODES[0]).await?, Instant::now());
    for i in 0..LATENCY_SAMPLES {
        let signed = transfer(&tenant, nonce, &sink, 1);
        nonce += 1;
        let t = Instant::now();
        finality::lock(&tracker).submitting(signed.hash, t, None);
        let answer = post(&client, format!("http://{}/v1/tx?wait=final", NODES[i % 4]), signed.bytes)
            .await
            .with_context(|| format!("idle latency sample {i} via {}", NODES[i % 4]))?;
        // A transfer the node stopped waiting for counts as never final.
        idle.push(if answer["status"] == "final" { t.elapsed().as_secs_f64() * 1e3 } else { f64::INFINITY });
    }
    let idle_end = Instant::now();
    let blocks = head(&client, NODES[0]).await?.saturating_sub(heights_start);
    println!(
        "  idle transfers: {:.0} blocks/s, CPU {:.0}% busy",
        blocks as f64 / idle_start.elapsed().as_secs_f64(),
        busy_since(cpu_start)
    );
    let drain_start = Instant::now();
    while finality::lock(&tracker).pending() > 0 && drain_start.elapsed() < DRAIN {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let followed = finality::lock(&tracker).take_window(idle_start, idle_end);
    let idle = Latencies::of(SortedMs::new(idle));
    let idle_followed = Latencies::of(SortedMs::new(followed.latencies_ms));
    println!(
        "  the same idle transfers timed by following blocks: {idle_followed} (the node's ?wait=final answer: p50 {} ms, p99 {} ms)",
        Ms(idle.p50_ms),
        Ms(idle.p99_ms)
    );
    eprintln!("idle latency measured; load steps follow");
    let mut load =
        Load { client: client.clone(), tracker, accounts: accounts.into_iter().map(|a| (a, 0)).collect(), sink };
    let mut steps = Vec::new();
    for &rate in rates {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let step = load.open_loop(rate).await?;
        println!(
            "  target {:>5.0}/s: offered {:>5.0}/s, accepted {:>5.0}/s, finalized {:>5.0}/s; {}; CPU {:.0}% busy — {}",
            step.step.target_per_s,
            step.step.offered_per_s,
            step.step.accepted_per_s,
            step.step.finalized_per_s,
            step.step.latency,
            step.busy_percent,
            match step.step.verdict() {
                Ok(()) => "goal met".to_string(),
                Err(why) => format!("goal missed: {why}"),
            }
        );
        if !step.slow.is_empty() {
            println!("    over {P99_GOAL_MS} ms: {}", figures::describe_stretches(&step.slow, 4));
        }
        if let Some(split) = &step.split {
            println!("    {split}");
        }
        let missed = step.step.verdict().is_err();
        steps.push(step.step);
        if missed {
            break;
        }
    }
    let exports = match export_rate {
        Some(rate) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some(load.with_exports(rate).await?)
        }
        None => {
            println!("  exports step: not run (ARCHIPEL_BENCH_EXPORT_RATE=0)");
            None
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spam = spam_step(&client, probers, &spammers, &load.sink).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    quiesce(&client).await;
    let closed = load.closed_loop().await?;
    quiesce(&client).await;
    let closed_many = load.closed_loop_many().await?;
    stop_following.store(true, Ordering::Relaxed);
    let follow = follower.await.context("the block follower panicked")??;
    if follow.rate_limited > 0 {
        println!(
            "  note: the block follower was rate-limited {} times in {} requests (the nodes' read limit); those waits are in the latencies",
            follow.rate_limited, follow.requests
        );
    }
    if std::env::var_os("ARCHIPEL_BENCH_KEEP").is_some() {
        println!("  devnet kept in {} (ARCHIPEL_BENCH_KEEP)", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(Ours { idle, steps, exports, spam, closed, closed_many })
}

/// Waits (at most [`DRAIN`] twice over) until no node's mempool holds a transaction a block could
/// take: what an earlier step left behind must not weigh on the next one's baseline.
async fn quiesce(client: &reqwest::Client) {
    let started = Instant::now();
    while started.elapsed() < DRAIN * 2 {
        let mut waiting = 0;
        for node in NODES {
            let head: Option<serde_json::Value> = match client.get(format!("http://{node}/v1/ledger/head")).send().await
            {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            // Entries behind a missing nonce (the spam step leaves some until they expire) are
            // not work a block can take.
            waiting += head
                .and_then(|h| Some(h["mempool"].as_u64()?.saturating_sub(h["mempool_gapped"].as_u64().unwrap_or(0))))
                .unwrap_or(1);
        }
        if waiting == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("  note: the mempools were not empty {:.0} s after the last step", (DRAIN * 2).as_secs_f64());
}

/// Honest transfers from each of `probers` side by side (each one at a time, sent to the next
/// node with `?wait=final` and timed until the node answered it final; never final: infinitely
/// late): at least `min` in all, then while `more` says so. Returns the accounts' next nonces.
/// Each prober sends from its own source address, as separate honest clients do (the spammers
/// have theirs too): together on one address they would look like one client sending hundreds
/// a second, which a node's admission paces like a flood.
async fn honest_probes(
    probers: &mut [(Identity, u64)],
    sink: &Identity,
    min: usize,
    more: Arc<dyn Fn() -> bool + Send + Sync>,
) -> Result<Vec<f64>> {
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (p, (account, nonce)) in probers.iter().enumerate() {
        let source = std::net::IpAddr::from([127, 0, 61, 2 + p as u8]);
        let client = reqwest::Client::builder().no_proxy().local_address(source).build()?;
        let (account, sink, more, taken) = (account.clone(), sink.clone(), more.clone(), taken.clone());
        let mut nonce = *nonce;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while taken.fetch_add(1, Ordering::Relaxed) < min || more() {
                let signed = transfer(&account, nonce, &sink, 1);
                nonce += 1;
                let t = Instant::now();
                let node = NODES[(p + out.len()) % NODES.len()];
                let answer = post(&client, format!("http://{node}/v1/tx?wait=final"), signed.bytes)
                    .await
                    .with_context(|| format!("honest transfer via {node}"))?;
                out.push(if answer["status"] == "final" { t.elapsed().as_secs_f64() * 1e3 } else { f64::INFINITY });
                if std::env::var_os("ARCHIPEL_BENCH_DEBUG_PROBES").is_some() {
                    let sent_unix = std::time::SystemTime::now() - t.elapsed();
                    let sent_ms = sent_unix.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
                    eprintln!("probe {p} via {node} sent at {sent_ms}: {:.1} ms, {answer}", out[out.len() - 1]);
                }
            }
            anyhow::Ok((nonce, out))
        }));
    }
    let mut all = Vec::new();
    for (t, (_, nonce)) in tasks.into_iter().zip(probers.iter_mut()) {
        let (next, out) = t.await??;
        *nonce = next;
        all.extend(out);
    }
    Ok(all)
}

/// The spam step: honest transfers timed one at a time, then again for as long as [`SPAMMERS`]
/// funded accounts (each from its own source address, as many machines would) send
/// [`SPAM_PER_ACCOUNT`] transfers each that the mempool must refuse or bound: even ones with
/// nonces behind a gap, odd ones each spending 60 % of the balance.
async fn spam_step(
    client: &reqwest::Client,
    probers: Vec<Identity>,
    spammers: &[Identity],
    sink: &Identity,
) -> Result<SpamFigures> {
    quiesce(client).await;
    let mut probers: Vec<(Identity, u64)> = probers.into_iter().map(|p| (p, 0)).collect();
    let before = honest_probes(&mut probers, sink, SPAM_PROBES, Arc::new(|| false)).await?;
    // Signed beforehand, off the measured window.
    let mut floods = Vec::new();
    for (i, s) in spammers.iter().enumerate() {
        let (s, sink) = (s.clone(), sink.clone());
        floods.push(tokio::task::spawn_blocking(move || {
            let gapped = i % 2 == 0;
            // Batches of at most SPAM_BATCH records (the API takes up to 1,000 per request).
            let signed: Vec<Signed> =
                (0..SPAM_PER_ACCOUNT)
                    .map(|k| {
                        if gapped {
                            transfer(&s, k + 1, &sink, 1)
                        } else {
                            transfer(&s, k, &sink, SPAM_BALANCE * 6 / 10)
                        }
                    })
                    .collect();
            let batches: Vec<(Vec<u8>, u64)> = signed
                .chunks(SPAM_BATCH)
                .map(|chunk| {
                    let mut bytes = Vec::new();
                    for t in chunk {
                        put_record(&mut bytes, &t.bytes);
                    }
                    (bytes, chunk.len() as u64)
                })
                .collect();
            batches
        }));
    }
    // Each spammer sends its transfers once (in batches the API takes); the honest probes run
    // while any spammer is still sending.
    let mut signed = Vec::with_capacity(floods.len());
    for f in floods {
        signed.push(f.await?);
    }
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    // The spammers get their own runtime thread, and read their answers without parsing them
    // whole: sharing the honest clients' scheduler, or parsing 100,000 JSON answers on this
    // box, would delay the honest clients in the bench itself, not in the nodes. They run at the
    // normal priority: on loopback much of the nodes' TCP receive work runs in the sender's
    // context, so a niced sender would hide cost the nodes really pay.
    let flood_rt =
        BackgroundRuntime(Some(tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?));
    // A pause before the flood, to attach a profiler (`perf record -a`) when "spam flood signed"
    // is printed; echoed with the figures.
    if let Some(ms) = std::env::var("ARCHIPEL_BENCH_SPAM_PAUSE_MS").ok().and_then(|v| v.parse::<u64>().ok()) {
        println!("  note: the spam flood started {ms} ms after it was signed (ARCHIPEL_BENCH_SPAM_PAUSE_MS)");
        eprintln!("spam flood signed; pausing {ms} ms");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    eprintln!(
        "spam flood starts at {}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
    );
    let started = Instant::now();
    for (i, batches) in signed.into_iter().enumerate() {
        let source = std::net::IpAddr::from([127, 0, 62, 2 + i as u8]);
        let client = reqwest::Client::builder().no_proxy().local_address(source).build()?;
        let url = format!("http://{}/v1/txs", NODES[i % NODES.len()]);
        let done = done.clone();
        senders.push(flood_rt.handle().spawn(async move {
            let mut answers = std::collections::BTreeMap::<String, u64>::new();
            let mut sent = 0u64;
            for (bytes, count) in batches {
                sent += count;
                let answer = async {
                    let r = client.post(url.clone()).header("content-type", "application/octet-stream").body(bytes);
                    let r = r.send().await?.error_for_status()?;
                    anyhow::Ok(r.bytes().await?)
                };
                match answer.await {
                    Ok(body) => count_answers(&body, &mut answers),
                    Err(e) => *answers.entry(format!("request failed: {e:#}")).or_insert(0) += 1,
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
            (sent, answers)
        }));
    }
    let flooding = done.clone();
    let during =
        honest_probes(&mut probers, sink, 0, Arc::new(move || flooding.load(Ordering::Relaxed) < SPAMMERS)).await?;
    let flood_secs = started.elapsed().as_secs_f64();
    drop(flood_rt);
    let mut answers = std::collections::BTreeMap::new();
    let mut sent = 0;
    for s in senders {
        let (n, a) = s.await?;
        sent += n;
        for (code, count) in a {
            // Request failures are counted by kind, not by message.
            let code = if code.starts_with("request failed") { "request failed".to_string() } else { code };
            *answers.entry(code).or_insert(0) += count;
        }
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (max_before, max_during) = (max(&before), max(&during));
    let figures = SpamFigures {
        before: Latencies::of(SortedMs::new(before)),
        during: Latencies::of(SortedMs::new(during)),
        sent,
        answers,
        flood_secs,
    };
    println!(
        "  spam step, honest transfers ({PROBERS} accounts, each one at a time) before the flood: {}, max {max_before:.1} ms",
        figures.before
    );
    println!(
        "  spam step, during the flood ({} transfers from {SPAMMERS} accounts in {:.1} s; answers {:?}): {}, max {max_during:.1} ms",
        figures.sent, figures.flood_secs, figures.answers, figures.during
    );
    Ok(figures)
}

/// A runtime inside an async context: shut down in the background when dropped (dropping a
/// runtime there panics), also on an early return.
struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl BackgroundRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Counts the codes of a `POST /v1/txs` answer (`[{"hash":..,"error":"code",..},..]`; an item
/// without an error was admitted) without parsing the JSON whole.
fn count_answers(body: &[u8], answers: &mut std::collections::BTreeMap<String, u64>) {
    const ERROR: &[u8] = b"\"error\":";
    let mut items = 0u64;
    let mut at = 0;
    while let Some(k) = body[at..].windows(ERROR.len()).position(|w| w == ERROR) {
        at += k + ERROR.len();
        items += 1;
        let rest = &body[at..];
        if rest.first() == Some(&b'"') {
            let end = rest[1..].iter().position(|&b| b == b'"').unwrap_or(rest.len() - 1);
            *answers.entry(String::from_utf8_lossy(&rest[1..1 + end]).into_owned()).or_insert(0) += 1;
        } else {
            *answers.entry("admitted".into()).or_insert(0) += 1;
        }
    }
    if items == 0 {
        *answers.entry("request failed: no items in the answer".into()).or_insert(0) += 1;
    }
}

/// A step's figures, how busy the box was, and when its slow transfers were sent.
struct MeasuredStep {
    step: Step,
    /// Where the time went (p50s of [`finality::Split`]), when known.
    split: Option<String>,
    busy_percent: f64,
    slow: Vec<figures::SlowStretch>,
    /// Every transfer's latency (ms; infinite: never final), for pooling steps.
    latencies_ms: Vec<f64>,
}

/// The load clients' accounts and what they share.
struct Load {
    client: reqwest::Client,
    tracker: SharedTracker,
    /// Each client's account and next nonce.
    accounts: Vec<(Identity, u64)>,
    sink: Identity,
}

/// How a client sends.
#[derive(Clone, Copy)]
enum Pace {
    /// `per_second` transfers per second on average, whatever the answers: every `OPEN_TICK` the
    /// client sends what is due since it started and not yet admitted (a slow answer makes the
    /// next batch larger, not the rate lower).
    Open { per_second: f64 },
    /// `BATCH` transfers, then wait until all are final.
    Closed,
    /// One `transfer_many` of `BATCH` credits (to the client's own `BATCH` accounts) under one
    /// signature, then wait until it is final: the shape of etcd's one transaction of `BATCH`
    /// puts (to the client's own `BATCH` keys).
    ClosedMany,
}

/// One item of the `POST /v1/txs` answer.
#[derive(Deserialize)]
struct Admission {
    error: Option<String>,
}

impl Load {
    /// Signs `per_client` transfers per account beforehand: the client shares the 2 cores with
    /// the nodes, and what is measured is the ledger, not the client's signing.
    async fn presign(&mut self, per_client: usize) -> Result<Vec<(Identity, u64, Vec<Signed>)>> {
        let mut signing = Vec::new();
        for (account, n) in self.accounts.drain(..) {
            let sink = self.sink.clone();
            signing.push(tokio::task::spawn_blocking(move || {
                let signed: Vec<Signed> = (n..n + per_client as u64).map(|k| transfer(&account, k, &sink, 1)).collect();
                (account, n, signed)
            }));
        }
        let mut out = Vec::new();
        for s in signing {
            out.push(s.await?);
        }
        Ok(out)
    }

    /// Runs the clients at `pace` until `until` has passed, then returns the accounts.
    async fn drive(&mut self, pace: Pace, per_client: usize, until: Duration) -> Result<(Instant, Instant, f64)> {
        let presigned = self.presign(per_client).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (i, (account, first, signed)) in presigned.into_iter().enumerate() {
            let (client, stop, sink, tracker) =
                (self.client.clone(), stop.clone(), self.sink.clone(), self.tracker.clone());
            // Each client's own BATCH accounts (as etcd's clients each write their own keys).
            let recipients: Arc<Vec<Identity>> =
                Arc::new((0..BATCH as u64).map(|j| Identity::from_seed(7_300_001 + (i * BATCH) as u64 + j)).collect());
            let url = format!("http://{}/v1/txs", NODES[i % NODES.len()]);
            tasks.push(tokio::spawn(async move {
                let c = ClientLoop { client, url, tracker, account, first, signed, sink, recipients };
                client_loop(c, pace, stop).await
            }));
        }
        let cpu_start = cpu_ticks();
        tokio::time::sleep(WARM_UP).await;
        let from = Instant::now();
        tokio::time::sleep(until).await;
        let to = Instant::now();
        let busy = busy_since(cpu_start);
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            self.accounts.push(t.await?);
        }
        // The last transfers of the window: wait (bounded) until the client learns them final.
        let drain_start = Instant::now();
        while finality::lock(&self.tracker).pending() > 0 && drain_start.elapsed() < DRAIN {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok((from, to, busy))
    }

    /// One open-loop step at `rate` transfers/s in all.
    async fn open_loop(&mut self, rate: f64) -> Result<MeasuredStep> {
        let per_second = rate / CLIENTS as f64;
        let per_client = (per_second * (STEP + WARM_UP).as_secs_f64() * 1.2).ceil() as usize;
        let (from, to, busy_percent) = self.drive(Pace::Open { per_second }, per_client, STEP).await?;
        let w = finality::lock(&self.tracker).take_window(from, to);
        let secs = (to - from).as_secs_f64();
        let slow = figures::slow_stretches(&w.timeline, P99_GOAL_MS);
        Ok(MeasuredStep {
            step: Step {
                target_per_s: rate,
                offered_per_s: w.offered as f64 / secs,
                accepted_per_s: w.accepted as f64 / secs,
                finalized_per_s: w.finalized as f64 / secs,
                latency: Latencies::of(SortedMs::new(w.latencies_ms.clone())),
                drain: DRAIN,
            },
            busy_percent,
            slow,
            latencies_ms: w.latencies_ms,
            split: describe_split(&w.splits),
        })
    }

    /// The same open-loop step at `rate` six times, alone / with [`EXPORTS`] concurrent exports /
    /// with / alone / alone / with (so a drift over time, e.g. the chain growing, weighs on both
    /// sides alike); each side's latencies are pooled (p99 over ~36,000 transfers at 2,000/s, far
    /// steadier than one 6 s step's).
    async fn with_exports(&mut self, rate: f64) -> Result<ExportsFigures> {
        // The rate search's last step may have overloaded the nodes: start from empty mempools.
        quiesce(&self.client).await;
        let mut without = Vec::new();
        let mut with = Vec::new();
        let (mut completed, mut bytes, mut failed, mut elapsed) = (0, 0, 0, 0.0);
        let (mut pooled_without, mut pooled_with) = (Vec::new(), Vec::new());
        for exports in [false, true, true, false, false, true] {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !exports {
                let measured = self.open_loop(rate).await?;
                println!("  exports step, {rate:.0}/s alone: {}", measured.step.latency);
                without.push(measured.step);
                pooled_without.extend(measured.latencies_ms);
                continue;
            }
            let (measured, streamed) = self.exported_step(rate).await?;
            pooled_with.extend(measured.latencies_ms);
            let step = measured.step;
            println!(
                "  exports step, {rate:.0}/s with {EXPORTS} concurrent exports: {}; {} exports read to the end ({:.0} MB/s){}",
                step.latency,
                streamed.completed,
                streamed.bytes as f64 / streamed.secs / 1e6,
                if streamed.failed > 0 { format!(", {} failed", streamed.failed) } else { String::new() }
            );
            with.push(step);
            (completed, bytes, failed, elapsed) = (
                completed + streamed.completed,
                bytes + streamed.bytes,
                failed + streamed.failed,
                elapsed + streamed.secs,
            );
        }
        Ok(ExportsFigures {
            without,
            with,
            pooled_without: Latencies::of(SortedMs::new(pooled_without)),
            pooled_with: Latencies::of(SortedMs::new(pooled_with)),
            completed,
            bytes_per_s: bytes as f64 / elapsed,
            failed,
        })
    }

    /// One open-loop step at `rate` while [`EXPORTS`] readers stream the chain from the nodes
    /// (round robin), each starting again when its export ends.
    async fn exported_step(&mut self, rate: f64) -> Result<(MeasuredStep, Streamed)> {
        let stop = Arc::new(AtomicBool::new(false));
        // The readers stand for clients on other machines: on this box they run on their own
        // runtime, as far below the load client and the nodes as the nodes' API threads are, so
        // their own CPU neither delays the load client nor takes what the nodes need.
        let readers_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("export-readers")
            .on_thread_start(|| {
                let _ = rustix::process::nice(10);
            })
            .enable_all()
            .build()?;
        let mut readers = Vec::new();
        for i in 0..EXPORTS {
            // Each reader its own source address: the per-address limits are not what is measured.
            let source = std::net::IpAddr::from([127, 0, 61, 2 + i as u8]);
            let client = reqwest::Client::builder().no_proxy().local_address(source).build()?;
            let url = format!("http://{}/v1/ledger/export", NODES[i % NODES.len()]);
            readers.push(readers_rt.spawn(export_loop(client, url, stop.clone())));
        }
        let started = Instant::now();
        let step = self.open_loop(rate).await;
        stop.store(true, Ordering::Relaxed);
        let mut streamed = Streamed { completed: 0, bytes: 0, failed: 0, secs: started.elapsed().as_secs_f64() };
        for r in readers {
            let (c, b, f) = r.await?;
            (streamed.completed, streamed.bytes, streamed.failed) =
                (streamed.completed + c, streamed.bytes + b, streamed.failed + f);
        }
        readers_rt.shutdown_background();
        Ok((step?, streamed))
    }

    /// The closed loop: every client keeps one batch of `BATCH` transfers outstanding, each
    /// transfer its own signed transaction.
    async fn closed_loop(&mut self) -> Result<ClosedLoop> {
        let per_client =
            (PRESIGN_CLOSED_RATE / CLIENTS as f64 * (LOAD + WARM_UP).as_secs_f64()).ceil() as usize + BATCH;
        self.closed(Pace::Closed, per_client, 1).await
    }

    /// The closed loop with every client's `BATCH` transfers in one `transfer_many` (signed on
    /// the fly: one signature per `BATCH` transfers).
    async fn closed_loop_many(&mut self) -> Result<ClosedLoop> {
        self.closed(Pace::ClosedMany, 0, BATCH).await
    }

    /// A closed-loop window at `pace`; each final transaction counts `ops_per_tx` operations.
    async fn closed(&mut self, pace: Pace, presign: usize, ops_per_tx: usize) -> Result<ClosedLoop> {
        let (from, to, busy_percent) = self.drive(pace, presign, LOAD).await?;
        let w = finality::lock(&self.tracker).take_window(from, to);
        Ok(ClosedLoop {
            ops_per_s: (w.finalized * ops_per_tx) as f64 / (to - from).as_secs_f64(),
            latency: Latencies::of(SortedMs::new(w.latencies_ms)),
            refused: ((w.offered - w.accepted) * ops_per_tx) as u64,
            busy_percent,
        })
    }
}

/// Reads `url` (an export) to its end again and again until `stop`: exports read to the end,
/// bytes read, and exports that failed (refused or broken off; the reader then waits a little).
async fn export_loop(client: reqwest::Client, url: String, stop: Arc<AtomicBool>) -> (u64, u64, u64) {
    let (mut completed, mut bytes, mut failed) = (0, 0, 0);
    while !stop.load(Ordering::Relaxed) {
        let ok = match client.get(&url).send().await.and_then(|r| r.error_for_status()) {
            Ok(mut response) => loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => bytes += chunk.len() as u64,
                    Ok(None) => break true,
                    Err(_) => break false,
                }
                if stop.load(Ordering::Relaxed) {
                    return (completed, bytes, failed);
                }
            },
            Err(_) => false,
        };
        if ok {
            completed += 1;
        } else {
            failed += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (completed, bytes, failed)
}

/// One load client's state.
struct ClientLoop {
    client: reqwest::Client,
    url: String,
    tracker: SharedTracker,
    account: Identity,
    /// Nonce of `signed[0]`.
    first: u64,
    signed: Vec<Signed>,
    sink: Identity,
    /// The accounts a `transfer_many` pays.
    recipients: Arc<Vec<Identity>>,
}

/// "where the time went": p50 and p90 of each part of [`finality::Split`] over `splits`.
fn describe_split(splits: &[finality::Split]) -> Option<String> {
    if splits.is_empty() {
        return None;
    }
    let part = |f: fn(&finality::Split) -> f64| {
        let sorted = SortedMs::new(splits.iter().map(f).collect());
        format!("p50 {:.1} / p90 {:.1} ms", sorted.percentile(0.5), sorted.percentile(0.9))
    };
    Some(format!(
        "where the time went ({} transfers; block times are whole ms, a negative part counts as 0): submit->admission answer {}; answer->block built {}; block built->learned final {}",
        splits.len(),
        part(|s| s.admission_ms),
        part(|s| s.until_proposed_ms),
        part(|s| s.proposed_to_learned_ms),
    ))
}

/// Sends transfers at `pace` until `stop`; returns the account and its next nonce.
async fn client_loop(c: ClientLoop, pace: Pace, stop: Arc<AtomicBool>) -> (Identity, u64) {
    let mut n = c.first;
    let started = Instant::now();
    let mut tick = tokio::time::interval(OPEN_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut extra: Vec<Signed> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let batch = match pace {
            Pace::Open { per_second } => {
                tick.tick().await;
                let due = (started.elapsed().as_secs_f64() * per_second) as u64;
                (due.saturating_sub(n - c.first) as usize).min(MAX_OPEN_BATCH)
            }
            Pace::Closed => BATCH,
            Pace::ClosedMany => 1,
        };
        if batch == 0 {
            continue;
        }
        let mut body = Vec::new();
        let mut hashes = Vec::with_capacity(batch);
        for k in n..n + batch as u64 {
            let signed = match c.signed.get((k - c.first) as usize) {
                Some(s) => s,
                None => {
                    // Beyond what was signed beforehand (a fast closed loop): sign now.
                    let at = (k - c.first) as usize - c.signed.len();
                    if at >= extra.len() {
                        extra.push(match pace {
                            Pace::ClosedMany => transfer_many(&c.account, k, &c.recipients, 1),
                            _ => transfer(&c.account, k, &c.sink, 1),
                        });
                    }
                    &extra[at]
                }
            };
            put_record(&mut body, &signed.bytes);
            hashes.push(signed.hash);
        }
        let waiter = matches!(pace, Pace::Closed | Pace::ClosedMany).then(|| BatchWaiter::new(batch));
        let sent = Instant::now();
        {
            let mut t = finality::lock(&c.tracker);
            for h in &hashes {
                t.submitting(*h, sent, waiter.clone());
            }
        }
        let answer = c
            .client
            .post(&c.url)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success());
        let items: Option<Vec<Admission>> = match answer {
            Some(r) => r.json().await.ok().filter(|items: &Vec<Admission>| items.len() == batch),
            None => None,
        };
        match items {
            Some(items) => {
                let first_refused = items.iter().position(|i| i.error.is_some());
                {
                    let answered = Instant::now();
                    let mut t = finality::lock(&c.tracker);
                    for (item, h) in items.iter().zip(&hashes) {
                        if item.error.is_some() {
                            t.refused(h, sent);
                        } else {
                            t.answered(h, answered);
                        }
                    }
                }
                match first_refused {
                    // Refused (e.g. the account's quota is full): resend from there next time.
                    Some(at) => {
                        n += at as u64;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    None => n += batch as u64,
                }
            }
            None => {
                // No usable answer: count the batch as refused and send it again.
                {
                    let mut t = finality::lock(&c.tracker);
                    for h in &hashes {
                        t.refused(h, sent);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if let Some(w) = waiter {
            w.wait(BATCH_WAIT).await;
        }
    }
    (c.account, n)
}

/// Percent of the box's CPU time spent busy since `start` (a [`cpu_ticks`] reading).
pub fn busy_since(start: Option<(u64, u64)>) -> f64 {
    match (start, cpu_ticks()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    }
}

/// (busy, total) CPU ticks of the whole box so far, from /proc/stat.
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_are_counted_by_code() {
        let body = br#"[{"hash":"ab","error":null,"message":null},{"hash":null,"error":"nonce_gap","message":"x \"error\": y"},{"hash":"cd","error":"overspend","message":"m"},{"hash":"ef","error":null}]"#;
        let mut answers = std::collections::BTreeMap::new();
        count_answers(body, &mut answers);
        let got: Vec<(&str, u64)> = answers.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(got, [("admitted", 2), ("nonce_gap", 1), ("overspend", 1)]);
    }

    #[test]
    fn rates_are_named_when_they_are_not_numbers() {
        assert_eq!(parse_rates("1000, 3000").unwrap(), vec![1000.0, 3000.0]);
        let e = parse_rates("1000,fast").unwrap_err().to_string();
        assert!(e.contains("\"fast\" is not a rate"), "{e}");
        assert!(parse_rates("0").is_err());
        assert!(parse_rates("").is_err());
    }
}
