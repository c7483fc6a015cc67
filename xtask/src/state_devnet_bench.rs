//! `cargo xtask bench state` (second part): the 5-node devnet (4 validators and a follower) with
//! its state pre-filled to 10^3, 10^5 and 10^6 accounts (`ARCHIPEL_BENCH_STATE_MAX` as in the
//! first part) on a chain of 100,000 blocks, every size in the same run.
//!
//! Per size: a devnet is created and stopped, `archipel debug fill-chain` gives it the chain and
//! the accounts (built and signed offline with its own validator keys), and it starts again from
//! there. Then, every operation counted (no sample):
//! - **load**: `CLIENTS` accounts each send one transfer at a time to accounts spread over the
//!   whole state, each from its own loopback address, through the validators in turn, each waiting for its node's answer that it is
//!   final (`?wait=final`), for `LOAD`: transfers final per second (over the load's whole wall
//!   time), and submit→final p50/p99 of every one sent (a failed one counts as infinitely late);
//! - **RSS**: the largest peak resident set (`VmHWM`) of the node processes: the five after the
//!   load, the restarted validator and the joined follower;
//! - **restart**: a validator stopped cleanly (SIGTERM) and started again, then killed (SIGKILL)
//!   and started again, each until it answers healthy at the head the others had when it started;
//! - **join**: the follower killed, its ledger and consensus storage deleted, started with
//!   `--join`, until it is healthy at the head the others had when it started (the state sync's
//!   own time is what the node prints).
//!
//! Ratios are against the 10^3 figures of the same run; goals (issue 18): at 10^6 throughput and
//! latency within 1.2× of them, restart ≤ 5 s, join ≤ 60 s, RSS ≤ 512 MiB.

use anyhow::{Context, Result, bail};
use archipel_crypto::Identity;
use archipel_ledger::export::put_record;
use archipel_ledger::{Hash, Payload, Transaction};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The chain's length before the measurements.
const CHAIN: u64 = 100_000;
/// Concurrent clients in the load.
const CLIENTS: usize = 24;
/// How long the load runs.
const LOAD: Duration = Duration::from_secs(20);
/// Where the devnet listens.
const BASE_IP: &str = "127.0.72.2";
const BASE_PORT: &str = "28300";

/// One size's figures.
#[derive(Debug)]
pub struct Figures {
    accounts: u64,
    fill: Duration,
    final_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    transfers: usize,
    failed: usize,
    rss_mib: f64,
    restart: Duration,
    restart_after_kill: Duration,
    join: Duration,
    sync_line: String,
    tail: String,
}

struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn devnet(bin: &Path, work: &Path) -> Result<crate::ledger_bench::Devnet> {
    crate::ledger_bench::start_devnet(bin, work, &["--nodes", "5", "--base-ip", BASE_IP, "--base-port", BASE_PORT])
}

fn get(http: &reqwest::blocking::Client, url: &str) -> Option<serde_json::Value> {
    http.get(url).send().ok()?.json().ok()
}

fn height(http: &reqwest::blocking::Client, api: &str) -> Option<u64> {
    get(http, &format!("{api}/v1/ledger/head"))?["header"]["height"].as_u64()
}

fn healthy(http: &reqwest::blocking::Client, api: &str) -> bool {
    get(http, &format!("{api}/health")).is_some_and(|h| h["status"] == "ok")
}

/// Waits until `api` is healthy at `target` or above; how long it took from `since`.
fn follows(http: &reqwest::blocking::Client, api: &str, target: u64, since: Instant, what: &str) -> Result<Duration> {
    loop {
        if healthy(http, api) && height(http, api).is_some_and(|h| h >= target) {
            return Ok(since.elapsed());
        }
        if since.elapsed() > Duration::from_secs(300) {
            bail!("{what}: {api} did not reach {target} within 300 s");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A node of a running devnet, from the supervisor's `devnet.json`.
pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) api: String,
    pub(crate) pid: u32,
    pub(crate) config: PathBuf,
}

/// The nodes of the devnet in `work/devnet`, in start order.
pub(crate) fn nodes(work: &Path) -> Result<Vec<Node>> {
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(work.join("devnet/devnet.json"))?)?;
    state["nodes"]
        .as_array()
        .context("devnet.json has no nodes")?
        .iter()
        .map(|n| {
            Ok(Node {
                name: n["name"].as_str().context("name")?.to_string(),
                api: n["api_url"].as_str().context("api_url")?.to_string(),
                pid: n["pid"].as_u64().unwrap_or(0) as u32,
                config: PathBuf::from(n["config"].as_str().context("config")?),
            })
        })
        .collect()
}

/// The peak resident memory (`VmHWM`) of process `pid` so far, in MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read the memory of process {pid}"))?;
    let kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .with_context(|| format!("process {pid} has no VmHWM"))?;
    Ok(kib / 1024.0)
}

fn wait_gone(pid: u32) -> Result<()> {
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("process {pid} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Funds the clients and runs the load: (final per second over the whole load, sorted latencies
/// in ms of every transfer sent — one that failed or was not final within the node's wait counts
/// as infinitely late —, failures, where the slowest were in time).
fn load(
    http: &reqwest::blocking::Client,
    work: &Path,
    apis: &[String],
    accounts: u64,
) -> Result<(f64, Vec<f64>, usize, String)> {
    let head = get(http, &format!("{}/v1/ledger/head", apis[0])).context("head")?;
    let network: Hash = head["genesis_hash"].as_str().context("genesis_hash")?.parse().map_err(anyhow::Error::msg)?;
    let tenant = Identity::load(&work.join("devnet/tenant.key"))?;
    let nonce: u64 = get(http, &format!("{}/v1/accounts/{}", apis[0], tenant.node_id()))
        .and_then(|a| a["nonce"].as_u64())
        .context("the tenant's nonce")?;
    let clients: Vec<Identity> = (0..CLIENTS as u64).map(|i| Identity::from_seed(8_000_001 + i)).collect();
    let mut batch = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let tx = Transaction {
            signer: tenant.node_id(),
            nonce: nonce + i as u64,
            payload: Payload::Transfer { to: c.node_id(), amount_micro: 1_000_000_000 },
        }
        .sign(&tenant, &network);
        put_record(&mut batch, &tx.to_bytes());
    }
    let answers: serde_json::Value = http
        .post(format!("{}/v1/txs", apis[0]))
        .header("content-type", "application/octet-stream")
        .body(batch)
        .send()?
        .json()?;
    if answers.as_array().is_none_or(|a| a.iter().any(|x| !x["error"].is_null())) {
        bail!("funding the clients was refused: {answers}");
    }
    // Wait until every client is funded.
    let started = Instant::now();
    while clients.iter().any(|c| {
        get(http, &format!("{}/v1/accounts/{}", apis[0], c.node_id()))
            .and_then(|a| a["balance_micro"].as_u64())
            .unwrap_or(0)
            == 0
    }) {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the clients were not funded within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let load_started = Instant::now();
    let stop_at = load_started + LOAD;
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            // Each client from its own loopback address, as separate machines would be: a node
            // queues at most 16 submissions per address (`admission_busy` beyond).
            let source = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 73, 1 + i as u8));
            let http = reqwest::blocking::Client::builder()
                .no_proxy()
                .local_address(source)
                .timeout(Duration::from_secs(40))
                .build()
                .context("an HTTP client")?;
            let apis = apis.to_vec();
            Ok(std::thread::spawn(move || {
                let (mut latencies, mut failed, mut nonce, mut k) = (Vec::new(), 0usize, 0u64, i as u64);
                while Instant::now() < stop_at {
                    // A recipient spread over the filled accounts (fill-chain's ids).
                    k = k.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    let to = Identity::from_seed(1_000_000_000 + (k >> 11) % accounts.max(1)).node_id();
                    let tx = Transaction {
                        signer: client.node_id(),
                        nonce,
                        payload: Payload::Transfer { to, amount_micro: 1 },
                    }
                    .sign(&client, &network);
                    let api = &apis[(i + nonce as usize) % 4];
                    let sent = Instant::now();
                    let answer: Option<serde_json::Value> = http
                        .post(format!("{api}/v1/tx?wait=final"))
                        .header("content-type", "application/octet-stream")
                        .body(tx.to_bytes())
                        .send()
                        .ok()
                        .and_then(|r| r.json().ok());
                    if answer.as_ref().is_some_and(|a| a["status"] == "final") {
                        latencies.push((sent - load_started, sent.elapsed().as_secs_f64() * 1e3));
                        nonce += 1;
                    } else {
                        latencies.push((sent - load_started, f64::INFINITY));
                        failed += 1;
                        std::thread::sleep(Duration::from_millis(50));
                        // Start again from the nonce the ledger expects.
                        if let Some(n) = get(&http, &format!("{api}/v1/accounts/{}", client.node_id()))
                            .and_then(|a| a["nonce"].as_u64())
                        {
                            nonce = n;
                        }
                    }
                }
                (latencies, failed)
            }))
        })
        .collect::<Result<_>>()?;
    let (mut timed, mut failed) = (Vec::new(), 0);
    for t in threads {
        let (l, f) = t.join().map_err(|_| anyhow::anyhow!("a load client panicked"))?;
        timed.extend(l);
        failed += f;
    }
    // Until the last client's last answer: transfers still waiting at the deadline count.
    let wall = load_started.elapsed();
    let mut all: Vec<f64> = timed.iter().map(|(_, l)| *l).collect();
    all.sort_by(f64::total_cmp);
    let finals = all.iter().filter(|l| l.is_finite()).count();
    let tail = tail_in_time(&timed, percentile(&all, 0.99));
    Ok((finals as f64 / wall.as_secs_f64(), all, failed, tail))
}

/// Where in time the transfers slower than `p99` were sent: spread over the run (a cost every
/// block pays) or bunched in a few half-second windows (a burst: a commit, a checkpoint, a stall).
fn tail_in_time(timed: &[(Duration, f64)], p99: f64) -> String {
    let mut windows = std::collections::BTreeMap::<u64, usize>::new();
    for (at, _) in timed.iter().filter(|(_, l)| *l > p99) {
        *windows.entry(at.as_millis() as u64 / 500).or_default() += 1;
    }
    let slow: usize = windows.values().sum();
    let total = timed.iter().map(|(at, _)| at.as_millis() as u64 / 500).max().map_or(0, |w| w + 1);
    let mut worst: Vec<(u64, usize)> = windows.into_iter().collect();
    worst.sort_by_key(|(w, n)| (std::cmp::Reverse(*n), *w));
    let shown: Vec<String> = worst.iter().take(5).map(|(w, n)| format!("{n} at {:.1} s", *w as f64 / 2.0)).collect();
    format!(
        "the {slow} transfers over p99 were sent in {} of {total} half-second windows ({})",
        worst.len(),
        shown.join(", ")
    )
}

fn measure(bin: &Path, accounts: u64) -> Result<Figures> {
    let work = std::env::temp_dir().join(format!("archipel-bench-state-devnet-{}-{accounts}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = measure_in(bin, &work, accounts);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Starts `node` again; it and how long until it is healthy at the head `reference` had then.
fn restart_node(
    bin: &Path,
    http: &reqwest::blocking::Client,
    node: &Node,
    reference: &str,
    what: &str,
) -> Result<(Spawned, Duration)> {
    let target = height(http, reference).context("the reference's head")?;
    let started = Instant::now();
    let child = Command::new(bin)
        .args(["node", "run", "--config"])
        .arg(&node.config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let spawned = Spawned(child);
    let took = follows(http, &node.api, target, started, what)?;
    Ok((spawned, took))
}

fn measure_in(bin: &Path, work: &Path, accounts: u64) -> Result<Figures> {
    drop(devnet(bin, work)?);
    let t = Instant::now();
    let out = Command::new(bin)
        .current_dir(work)
        .args([
            "debug",
            "fill-chain",
            "--dir",
            "devnet",
            "--blocks",
            &CHAIN.to_string(),
            "--accounts",
            &accounts.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("fill-chain failed for {accounts} accounts");
    }
    let fill = t.elapsed();
    let running = devnet(bin, work)?;
    let http = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(40)).build()?;
    let all = nodes(work)?;
    let apis: Vec<String> = all.iter().map(|n| n.api.clone()).collect();
    for api in &apis {
        follows(&http, api, CHAIN + 3, Instant::now(), "start")?;
    }
    let (final_per_s, latencies, failed, tail) = load(&http, work, &apis, accounts)?;
    let mut rss = 0f64;
    for n in &all {
        rss = rss.max(peak_rss_mib(n.pid)?);
    }

    // Restart a validator cleanly.
    let n2 = &all[1];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(n2.pid as i32), nix::sys::signal::Signal::SIGTERM)?;
    wait_gone(n2.pid)?;
    let (restarted, restart) = restart_node(bin, &http, n2, &apis[0], "restart")?;
    rss = rss.max(peak_rss_mib(restarted.0.id())?);
    // And after a power cut (SIGKILL): the blocks since the last checkpoint are replayed.
    let pid = restarted.0.id();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)?;
    drop(restarted);
    wait_gone(pid)?;
    let (restarted, restart_after_kill) = restart_node(bin, &http, n2, &apis[0], "restart after kill -9")?;

    // The follower joins afresh.
    let n5 = &all[4];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(n5.pid as i32), nix::sys::signal::Signal::SIGKILL)?;
    wait_gone(n5.pid)?;
    let data = n5.config.parent().context("config dir")?.join("data");
    for part in ["ledger", "runtime"] {
        let _ = std::fs::remove_dir_all(data.join(part));
    }
    let target = height(&http, &apis[0]).context("n01's head")?;
    let started = Instant::now();
    let mut joiner = Command::new(bin)
        .args(["node", "run", "--join", "--config"])
        .arg(&n5.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = joiner.stdout.take().context("stdout")?;
    let joined = Spawned(joiner);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("joined by state sync") {
                let _ = tx.send(line);
            }
        }
    });
    let join = follows(&http, &n5.api, target, started, "join")?;
    let sync_line = rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow::anyhow!("{accounts} accounts: the follower did not join by state sync"))?;
    rss = rss.max(peak_rss_mib(joined.0.id())?);
    drop(joined);
    drop(restarted);
    drop(running);
    Ok(Figures {
        accounts,
        fill,
        final_per_s,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        transfers: latencies.len(),
        failed,
        rss_mib: rss,
        restart_after_kill,
        restart,
        join,
        sync_line,
        tail,
    })
}

/// Runs the devnet part for each size and prints its table and ratios.
pub fn bench(bin: &Path, sizes: &[u64]) -> Result<()> {
    if sizes.is_empty() {
        bail!("no size to measure");
    }
    println!(
        "== bench state (devnet): 4 validators + 1 follower on a chain of {CHAIN} blocks, state pre-filled per size; load: {CLIENTS} clients, one transfer each at a time waiting for finality, {} s",
        LOAD.as_secs()
    );
    let mut rows = Vec::new();
    for &n in sizes {
        let f = measure(bin, n)?;
        println!(
            "{:>10} accounts: fill {:.1} s; {:.0} transfers final/s ({} sent, {} failed or not final); submit->final p50 {:.1} ms, p99 {:.1} ms (a failed one counts as infinitely late; {}); peak RSS of the largest node {:.0} MiB; validator restart {:.2} s (after kill -9 {:.2} s); follower join {:.2} s [{}]",
            f.accounts,
            f.fill.as_secs_f64(),
            f.final_per_s,
            f.transfers,
            f.failed,
            f.p50_ms,
            f.p99_ms,
            f.tail,
            f.rss_mib,
            f.restart.as_secs_f64(),
            f.restart_after_kill.as_secs_f64(),
            f.join.as_secs_f64(),
            f.sync_line
        );
        rows.push(f);
    }
    let base = &rows[0];
    println!(
        "== summary (devnet; ratios against {} accounts, same run; the load is closed, so throughput is about {CLIENTS} / latency and the ratios move together)",
        base.accounts
    );
    if rows.last().is_none_or(|r| r.accounts < 1_000_000) {
        println!(
            "(the goals are for 10^6 accounts, not measured in this run: ARCHIPEL_BENCH_STATE_MAX or ARCHIPEL_BENCH_STATE_SIZES left it out)"
        );
    }
    for r in &rows[1..] {
        let tput = base.final_per_s / r.final_per_s.max(1e-9);
        let (p50, p99) = (r.p50_ms / base.p50_ms, r.p99_ms / base.p99_ms);
        let goal = |ok: bool| if r.accounts >= 1_000_000 { if ok { " (met)" } else { " (NOT met)" } } else { "" };
        let restart = r.restart.max(r.restart_after_kill);
        println!(
            "{:>10} accounts: throughput {:.2}x slower{}; p50 {:.2}x{}; p99 {:.2}x{} (goal <= 1.2 at 10^6); {} failed (base {}); restart {:.2} s, after kill -9 {:.2} s{} (goal <= 5); join {:.2} s{} (goal <= 60); peak RSS {:.0} MiB{} (goal <= 512)",
            r.accounts,
            tput,
            goal(tput <= 1.2),
            p50,
            goal(p50 <= 1.2),
            p99,
            goal(p99 <= 1.2),
            r.failed,
            base.failed,
            r.restart.as_secs_f64(),
            r.restart_after_kill.as_secs_f64(),
            goal(restart <= Duration::from_secs(5)),
            r.join.as_secs_f64(),
            goal(r.join <= Duration::from_secs(60)),
            r.rss_mib,
            goal(r.rss_mib <= 512.0),
        );
    }
    Ok(())
}
