//! `cargo xtask bench ledger`: submit→finalized latency and sustained transfer throughput on a
//! local 4-validator devnet, beside the bare simplex engine (`../shared/tools/simplex-baseline.sh`,
//! if present) and a 3-member etcd cluster (crash-fault-tolerant baseline) measured in the same run
//! with a comparable client load.

use anyhow::{Context, Result, bail};
use archipel_crypto::Identity;
use archipel_ledger::export::put_record;
use archipel_ledger::{Payload, Transaction};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const NODES: [&str; 4] = ["127.0.60.2:26201", "127.0.60.3:26201", "127.0.60.4:26201", "127.0.60.5:26201"];
/// Latency samples measured one at a time.
const LATENCY_SAMPLES: usize = 300;
/// How long the load runs.
const LOAD: Duration = Duration::from_secs(15);
/// Concurrent load clients (each with its own accounts).
const CLIENTS: usize = 16;
/// Transactions per request under load.
const BATCH: usize = 50;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn summary(mut v: Vec<f64>) -> (f64, f64, usize) {
    v.sort_by(|a, b| a.total_cmp(b));
    (percentile(&v, 0.5), percentile(&v, 0.99), v.len())
}

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGINT);
        let _ = self.0.wait();
    }
}

/// Results of one system under the same load shape.
struct Figures {
    idle_p50_ms: f64,
    idle_p99_ms: f64,
    load_p50_ms: f64,
    load_p99_ms: f64,
    ops_per_s: f64,
    /// Highest finalized rate of a rate step whose p99 stayed within 50 ms (archipel only).
    sustained_per_s: f64,
}

pub fn bench(bin: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let simplex = simplex_baseline();
    settle_disk();
    let ours = rt.block_on(archipel(bin))?;
    settle_disk();
    let etcd = match if std::env::var_os("ARCHIPEL_BENCH_NO_ETCD").is_some() {
        Err(anyhow::anyhow!("ARCHIPEL_BENCH_NO_ETCD is set"))
    } else {
        rt.block_on(etcd())
    } {
        Ok(f) => Some(f),
        Err(e) => {
            println!("etcd baseline skipped: {e:#}");
            None
        }
    };
    println!();
    println!("ledger, 4 validators on this box (submit -> finalized, measured at the client):");
    println!(
        "  idle:  p50 {:.1} ms, p99 {:.1} ms;  saturated: p50 {:.1} ms, p99 {:.1} ms, {:.0} transfers/s",
        ours.idle_p50_ms, ours.idle_p99_ms, ours.load_p50_ms, ours.load_p99_ms, ours.ops_per_s
    );
    println!("  sustained with submit->final p99 <= 50 ms: {:.0} transfers/s (goal >= 5,000)", ours.sustained_per_s);
    if let Some((p50, p99)) = simplex {
        println!(
            "  bare simplex (commonware-log, same box): propose->finalize p50 {p50:.1} ms, p99 {p99:.1} ms; ours/bare p50 {:.2} (goal <= 1.5), p99 {:.1} ms (goal <= 50)",
            ours.idle_p50_ms / p50,
            ours.idle_p99_ms
        );
    } else {
        println!(
            "  bare simplex baseline: not run (set SIMPLEX_BASELINE=1 to run ../shared/tools/simplex-baseline.sh, ~8 min the first time)"
        );
    }
    if let Some(e) = etcd {
        println!(
            "  etcd 3 members (same load shape): idle p50 {:.1} ms, p99 {:.1} ms; under load p50 {:.1} ms, p99 {:.1} ms; {:.0} puts/s",
            e.idle_p50_ms, e.idle_p99_ms, e.load_p50_ms, e.load_p99_ms, e.ops_per_s
        );
        println!(
            "  ours/etcd: idle p50 {:.2}, idle p99 {:.2}, throughput {:.2}",
            ours.idle_p50_ms / e.idle_p50_ms,
            ours.idle_p99_ms / e.idle_p99_ms,
            ours.ops_per_s / e.ops_per_s
        );
    }
    Ok(())
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

/// Runs `../shared/tools/simplex-baseline.sh` when asked (it builds commonware-log once, ~8 min).
fn simplex_baseline() -> Option<(f64, f64)> {
    if std::env::var("SIMPLEX_BASELINE").is_err() {
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let script = root.join("../shared/tools/simplex-baseline.sh");
    let out = Command::new("bash").arg(&script).env("RUN_S", "30").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{}", text.trim());
    // "simplex 4 validators: propose->finalize p50 10.2 ms, p90 … ms, p99 23.0 ms (n=…)"
    let grab = |key: &str| -> Option<f64> {
        let at = text.find(key)? + key.len();
        text[at..].split_whitespace().next()?.parse().ok()
    };
    Some((grab("p50 ")?, grab("p99 ")?))
}

fn transfer(from: &Identity, nonce: u64, to: &Identity, amount: u64) -> Vec<u8> {
    Transaction { signer: from.node_id(), nonce, payload: Payload::Transfer { to: to.node_id(), amount_micro: amount } }
        .sign(from)
        .to_bytes()
}

async fn post(client: &reqwest::Client, url: String, body: Vec<u8>) -> Result<serde_json::Value> {
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

/// Transactions finalized in heights `from..=to` and the block-time span they cover.
async fn count_txs(client: &reqwest::Client, node: &str, from: u64, to: u64) -> Result<u64> {
    let mut n = 0;
    let mut h = from;
    while h <= to {
        let v: serde_json::Value =
            client.get(format!("http://{node}/v1/ledger/blocks?from={h}&limit=1000")).send().await?.json().await?;
        let blocks = v.as_array().context("blocks")?;
        if blocks.is_empty() {
            break;
        }
        for b in blocks {
            if b["header"]["height"].as_u64().unwrap_or(u64::MAX) > to {
                return Ok(n);
            }
            n += b["txs"]
                .as_array()
                .map_or(0, |t| t.iter().filter(|t| t["tx"]["payload"]["kind"] == "transfer").count() as u64);
            h += 1;
        }
    }
    Ok(n)
}

async fn archipel(bin: &Path) -> Result<Figures> {
    let work = std::env::temp_dir().join(format!("archipel-bench-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut child = Command::new(bin)
        .current_dir(&work)
        .args(["devnet", "--dir", "devnet", "--nodes", "4", "--base-ip", "127.0.60.2", "--base-port", "26200"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let _guard = Guard(child);
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
    let client =
        reqwest::Client::builder().no_proxy().pool_max_idle_per_host(64).timeout(Duration::from_secs(30)).build()?;
    while head(&client, NODES[0]).await.unwrap_or(0) < 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tenant = Identity::load(&work.join("devnet/tenant.key"))?;
    let sink = Identity::from_seed(7_000_000);

    // Fund the load accounts (one batch, then wait until final).
    let accounts: Vec<Identity> = (0..CLIENTS as u64).map(|i| Identity::from_seed(7_000_001 + i)).collect();
    let mut nonce = 0u64;
    let mut batch = Vec::new();
    for a in &accounts {
        put_record(&mut batch, &transfer(&tenant, nonce, a, 1_000_000_000));
        nonce += 1;
    }
    let answers = post(&client, format!("http://{}/v1/txs", NODES[0]), batch).await?;
    if answers.as_array().is_none_or(|a| a.iter().any(|x| !x["error"].is_null())) {
        bail!("funding the load accounts was refused: {answers}");
    }
    let last = transfer(&tenant, nonce, &sink, 1);
    nonce += 1;
    post(&client, format!("http://{}/v1/tx?wait=final", NODES[0]), last).await.context("funding")?;
    eprintln!("load accounts funded; measuring idle latency");

    // Idle latency: one transfer at a time, each to the next node, waiting for finality.
    let mut idle = Vec::new();
    let (cpu_start, heights_start, idle_start) = (cpu_ticks(), head(&client, NODES[0]).await?, Instant::now());
    for i in 0..LATENCY_SAMPLES {
        let body = transfer(&tenant, nonce, &sink, 1);
        nonce += 1;
        let t = Instant::now();
        post(&client, format!("http://{}/v1/tx?wait=final", NODES[i % 4]), body)
            .await
            .with_context(|| format!("idle latency sample {i} via {}", NODES[i % 4]))?;
        idle.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let blocks = head(&client, NODES[0]).await?.saturating_sub(heights_start);
    println!(
        "  idle probes: {:.0} blocks/s, CPU {:.0}% busy",
        blocks as f64 / idle_start.elapsed().as_secs_f64(),
        busy_since(cpu_start)
    );
    eprintln!("idle latency measured; load steps follow");

    // Load at fixed offered rates (open loop), stepping up while latency holds, then as fast as
    // the nodes take transactions.
    let mut accounts: Vec<(Identity, u64)> = accounts.into_iter().map(|a| (a, 0)).collect();
    let mut probe = Probe { tenant, nonce, sink };
    let mut sustained = 0.0f64;
    // ARCHIPEL_BENCH_RATES=1000,3000 runs only those steps (quick experiments).
    let rates: Vec<f64> = match std::env::var("ARCHIPEL_BENCH_RATES") {
        Ok(v) => v.split(',').filter_map(|r| r.trim().parse().ok()).collect(),
        Err(_) => RATES.to_vec(),
    };
    for rate in rates {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let p = load_phase(&client, &mut probe, &mut accounts, Some(rate), STEP).await?;
        println!(
            "  offered {rate:>5.0} transfers/s: {:>5.0}/s finalized, submit->final p50 {:.1} ms, p99 {:.1} ms, CPU {:.0}% busy",
            p.finalized_per_s, p.p50_ms, p.p99_ms, p.busy_percent
        );
        if p.p99_ms <= 50.0 && p.finalized_per_s >= 0.9 * rate {
            sustained = sustained.max(p.finalized_per_s);
        }
        if p.p99_ms > 500.0 || p.finalized_per_s < 0.8 * rate {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let saturated = load_phase(&client, &mut probe, &mut accounts, None, LOAD).await?;
    println!(
        "  saturated ({CLIENTS} clients, batches of {BATCH}): {:.0}/s finalized, p50 {:.1} ms, p99 {:.1} ms, CPU {:.0}% busy",
        saturated.finalized_per_s, saturated.p50_ms, saturated.p99_ms, saturated.busy_percent
    );
    let (idle_p50_ms, idle_p99_ms, _) = summary(idle);
    if std::env::var_os("ARCHIPEL_BENCH_KEEP").is_some() {
        println!("  devnet kept in {} (ARCHIPEL_BENCH_KEEP)", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(Figures {
        idle_p50_ms,
        idle_p99_ms,
        load_p50_ms: saturated.p50_ms,
        load_p99_ms: saturated.p99_ms,
        ops_per_s: saturated.finalized_per_s,
        sustained_per_s: sustained,
    })
}

/// Offered loads (transfers per second) of the rate steps.
const RATES: [f64; 8] = [1_000.0, 2_000.0, 3_000.0, 4_000.0, 5_000.0, 6_000.0, 7_000.0, 8_000.0];
/// Transfers per second signed beforehand for the saturated phase.
const PRESIGN_SATURATED_RATE: f64 = 16_000.0;
/// Length of one rate step (measured, after `WARM_UP`).
const STEP: Duration = Duration::from_secs(6);
/// How long a load runs before its measurement starts.
const WARM_UP: Duration = Duration::from_secs(1);

/// The account that sends the latency probes.
struct Probe {
    tenant: Identity,
    nonce: u64,
    sink: Identity,
}

/// What one load phase measured.
struct Phase {
    finalized_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// How busy the whole box's CPUs were during the phase (nodes and load client).
    busy_percent: f64,
}

/// Percent of the box's CPU time spent busy since `start` (a [`cpu_ticks`] reading).
fn busy_since(start: Option<(u64, u64)>) -> f64 {
    match (start, cpu_ticks()) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => f64::NAN,
    }
}

/// (busy, total) CPU ticks of the whole box so far, from /proc/stat.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle, total))
}

/// `CLIENTS` tasks submit transfers from their own accounts, at `rate` per second in all (open
/// loop: batches on a timer, whatever the answers) or, with `None`, in batches of `BATCH` as fast
/// as the nodes take them; meanwhile a probe transfer measures submit->final latency every 20 ms.
async fn load_phase(
    client: &reqwest::Client,
    probe: &mut Probe,
    accounts: &mut Vec<(Identity, u64)>,
    rate: Option<f64>,
    duration: Duration,
) -> Result<Phase> {
    // Sign the load's transfers beforehand: the load client shares the 2 cores with the nodes,
    // and what is measured is the ledger, not the client's signing.
    let per_task = rate.unwrap_or(PRESIGN_SATURATED_RATE) / CLIENTS as f64 * (duration + WARM_UP).as_secs_f64() * 1.2;
    let mut signing = Vec::new();
    for (account, n) in accounts.drain(..) {
        let sink = probe.sink.clone();
        signing.push(tokio::task::spawn_blocking(move || {
            let signed: Vec<Vec<u8>> =
                (n..n + per_task.ceil() as u64 + BATCH as u64).map(|k| transfer(&account, k, &sink, 1)).collect();
            (account, n, signed)
        }));
    }
    let mut presigned = Vec::new();
    for s in signing {
        presigned.push(s.await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, (account, mut n, signed)) in presigned.into_iter().enumerate() {
        let (client, stop, sink) = (client.clone(), stop.clone(), probe.sink.clone());
        let first = n;
        tasks.push(tokio::spawn(async move {
            // Per task: `batch` transfers every `every`.
            let (batch, every) = match rate {
                Some(r) => {
                    let per_task = r / CLIENTS as f64;
                    let batch = (per_task * 0.02).ceil().max(1.0);
                    (batch as usize, Duration::from_secs_f64(batch / per_task))
                }
                None => (BATCH, Duration::ZERO),
            };
            let mut tick = tokio::time::interval(every.max(Duration::from_micros(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                if rate.is_some() {
                    tick.tick().await;
                }
                let mut body = Vec::new();
                for _ in 0..batch {
                    match signed.get((n - first) as usize) {
                        Some(tx) => put_record(&mut body, tx),
                        None => put_record(&mut body, &transfer(&account, n, &sink, 1)),
                    }
                    n += 1;
                }
                match post(&client, format!("http://{}/v1/txs", NODES[i % 4]), body).await {
                    Ok(v) => {
                        let ok = v.as_array().map_or(0, |a| a.iter().filter(|x| x["error"].is_null()).count());
                        if ok < batch {
                            // Refused (e.g. the nonce window is full): resync on the next batch.
                            n -= (batch - ok) as u64;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            (account, n)
        }));
    }
    // Steady state only: the step from no load to this load is not measured.
    tokio::time::sleep(WARM_UP).await;
    let start_height = head(client, NODES[0]).await?;
    let phase_start = Instant::now();
    let cpu_start = cpu_ticks();
    let mut latencies = Vec::new();
    let mut i = 0;
    while phase_start.elapsed() < duration {
        let body = transfer(&probe.tenant, probe.nonce, &probe.sink, 1);
        probe.nonce += 1;
        let t = Instant::now();
        post(client, format!("http://{}/v1/tx?wait=final", NODES[i % 4]), body)
            .await
            .with_context(|| format!("latency probe {i} under load via {}", NODES[i % 4]))?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = phase_start.elapsed();
    let busy_percent = busy_since(cpu_start);
    stop.store(true, Ordering::Relaxed);
    let end_height = head(client, NODES[0]).await?;
    for t in tasks {
        accounts.push(t.await?);
    }
    let finalized = count_txs(client, NODES[0], start_height + 1, end_height).await?;
    let (p50_ms, p99_ms, _) = summary(latencies);
    Ok(Phase { finalized_per_s: finalized as f64 / elapsed.as_secs_f64(), p50_ms, p99_ms, busy_percent })
}

/// Installs etcd if needed (Debian `etcd-server`).
fn etcd_binary() -> Result<String> {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    println!("installing etcd-server (apt-get)…");
    let ok = Command::new("sh")
        .args(["-c", "apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null 2>&1"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok || !Path::new("/usr/bin/etcd").exists() {
        bail!("etcd-server is not installed and apt-get could not install it");
    }
    Ok("/usr/bin/etcd".into())
}

async fn etcd() -> Result<Figures> {
    let bin = etcd_binary()?;
    let work = std::env::temp_dir().join(format!("archipel-bench-etcd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let members: Vec<(String, String, String)> = (0..3)
        .map(|i| {
            (format!("e{i}"), format!("http://127.0.61.{}:2380", i + 2), format!("http://127.0.61.{}:2379", i + 2))
        })
        .collect();
    let cluster = members.iter().map(|(n, p, _)| format!("{n}={p}")).collect::<Vec<_>>().join(",");
    let mut guards = Vec::new();
    for (name, peer, client_url) in &members {
        let child = Command::new(&bin)
            .args([
                "--name",
                name,
                "--data-dir",
                work.join(name).to_str().context("path")?,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--listen-client-urls",
                client_url,
                "--advertise-client-urls",
                client_url,
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "archipel-bench",
            ])
            .env("ETCD_UNSUPPORTED_ARCH", "")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        guards.push(Guard(child));
    }
    let client =
        reqwest::Client::builder().no_proxy().pool_max_idle_per_host(64).timeout(Duration::from_secs(10)).build()?;
    let urls: Vec<String> = members.iter().map(|(_, _, c)| format!("{c}/v3/kv/put")).collect();
    let put = |client: reqwest::Client, url: String, k: String| async move {
        let body = serde_json::json!({"key": b64(k.as_bytes()), "value": b64(b"1")});
        let r = client.post(url).json(&body).send().await?;
        if !r.status().is_success() {
            bail!("etcd answered {}", r.status());
        }
        Ok::<_, anyhow::Error>(())
    };
    let ready = Instant::now();
    while put(client.clone(), urls[0].clone(), "warmup".into()).await.is_err() {
        if ready.elapsed() > Duration::from_secs(30) {
            bail!("etcd cluster did not come up within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut idle = Vec::new();
    for i in 0..LATENCY_SAMPLES {
        let t = Instant::now();
        put(client.clone(), urls[i % 3].clone(), format!("idle/{i}")).await?;
        idle.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The same load shape: CLIENTS clients, each request a transaction of BATCH puts.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
        let url = format!("{}/v3/kv/txn", members[c % 3].2);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ops: Vec<_> = (0..BATCH)
                    .map(|j| {
                        serde_json::json!({"requestPut": {"key": b64(format!("load/{c}/{n}/{j}").as_bytes()), "value": b64(b"1")}})
                    })
                    .collect();
                n += 1;
                let ok = client
                    .post(&url)
                    .json(&serde_json::json!({"success": ops}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    done.fetch_add(BATCH as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(WARM_UP).await;
    let done_before = done.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut loaded = Vec::new();
    let mut i = 0;
    while start.elapsed() < LOAD {
        let t = Instant::now();
        put(client.clone(), urls[i % 3].clone(), format!("probe/{i}")).await?;
        loaded.push(t.elapsed().as_secs_f64() * 1e3);
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed();
    let done = done.load(Ordering::Relaxed) - done_before;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    drop(guards);
    let _ = std::fs::remove_dir_all(&work);
    let (idle_p50_ms, idle_p99_ms, _) = summary(idle);
    let (load_p50_ms, load_p99_ms, _) = summary(loaded);
    Ok(Figures {
        idle_p50_ms,
        idle_p99_ms,
        load_p50_ms,
        load_p99_ms,
        ops_per_s: done as f64 / elapsed.as_secs_f64(),
        sustained_per_s: f64::NAN,
    })
}

/// Standard base64, as etcd's JSON gateway wants keys and values.
fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
