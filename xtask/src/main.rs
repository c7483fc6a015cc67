//! Project automation: `cargo xtask bench [devnet|verify|ledger|liveness|state|pipeline|storage|s3|wasm|all]`,
//! `cargo xtask sim --seeds N` and `cargo xtask fuzz [--seconds N]`.
//!
//! Benchmarks print absolute figures and a ratio against a baseline measured in the same run on
//! the same machine, because absolute numbers move by tens of percent on a shared 2-core box.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod etcd_bench;
mod figures;
mod finality;
mod fuzz;
mod ledger_bench;
mod liveness_bench;
mod market_bench;
mod pipeline_bench;
mod s3_bench;
mod simplex_baseline;
mod state_bench;
mod state_devnet_bench;
mod storage_bench;
mod wasm_bench;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => {
            let which = args.get(1).map(String::as_str).unwrap_or("all");
            match which {
                "verify" => bench_verify(),
                "devnet" => bench_devnet(),
                "ledger" => ledger_bench::bench(&build_release()?, runs(&args)?),
                "liveness" => liveness_bench::bench(),
                "state" => bench_state_in_process().and_then(|_| bench_state_devnet()),
                "pipeline" => pipeline_bench::bench(),
                "storage" => storage_bench::bench(&build_release()?),
                "s3" => s3_bench::bench(&build_release()?),
                "wasm" => wasm_bench::bench(&build_release()?),
                "market" => market_bench::bench(&build_release()?),
                "all" => bench_verify()
                    .and_then(|_| bench_devnet())
                    .and_then(|_| ledger_bench::bench(&build_release()?, runs(&args)?))
                    .and_then(|_| liveness_bench::bench())
                    .and_then(|_| bench_state_in_process())
                    .and_then(|_| bench_state_devnet())
                    .and_then(|_| pipeline_bench::bench())
                    .and_then(|_| storage_bench::bench(&build_release()?))
                    .and_then(|_| s3_bench::bench(&build_release()?))
                    .and_then(|_| wasm_bench::bench(&build_release()?))
                    .and_then(|_| market_bench::bench(&build_release()?)),
                other => {
                    bail!(
                        "unknown benchmark {other:?}: use verify, devnet, ledger, liveness, state, pipeline, storage, s3, wasm, market or all"
                    )
                }
            }
        }
        Some("sim") => {
            let seeds: u64 = match args.iter().position(|a| a == "--seeds") {
                Some(i) => {
                    args.get(i + 1).context("--seeds needs a number")?.parse().context("--seeds needs a number")?
                }
                None => 1000,
            };
            let status = Command::new(env!("CARGO"))
                .args(["test", "--release", "-p", "archipel-sim"])
                .env("ARCHIPEL_SIM_SEEDS", format!("0..{seeds}"))
                .status()?;
            if !status.success() {
                bail!("simulation failed: the failing seed and its replay command are printed above");
            }
            Ok(())
        }
        Some("fuzz") => fuzz::run(&args[1..]),
        // Started by `bench storage` itself: runs one program and reports its peak RSS.
        Some("peak-rss") => storage_bench::peak_rss_main(&args[1..]),
        // Started by `bench ledger` itself: one validator of the bare-simplex baseline.
        Some("simplex-validator") => simplex_baseline::validator_main(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask bench [verify|devnet|ledger|liveness|state|pipeline|storage|s3|wasm|all] [--runs N]\n       cargo xtask sim [--seeds N]\n       \
                 cargo xtask fuzz [--seconds N] [TARGET...]"
            );
            Ok(())
        }
    }
}

/// How many times the ledger bench runs: `--runs N`, else `ARCHIPEL_BENCH_RUNS`, else three times
/// (its figures are judged over the spread of three runs).
fn runs(args: &[String]) -> Result<usize> {
    let text = match args.iter().position(|a| a == "--runs") {
        Some(i) => args.get(i + 1).cloned().context("--runs needs a number of runs, e.g. --runs 3")?,
        None => match std::env::var("ARCHIPEL_BENCH_RUNS") {
            Ok(v) => v,
            Err(_) => return Ok(3),
        },
    };
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => bail!("the number of runs must be a whole number >= 1 (--runs or ARCHIPEL_BENCH_RUNS), not {text:?}"),
    }
}

/// Runs `f` in a fresh `archipel-bench-NAME-PID` directory under the system's temporary one,
/// removed afterwards whatever `f` returned.
fn in_scratch_dir(name: &str, f: impl FnOnce(&std::path::Path) -> Result<()>) -> Result<()> {
    let work = std::env::temp_dir().join(format!("archipel-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = f(&work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Signed-request verifications per second on one core, against bare Ed25519 verification of the
/// same bytes (the floor: signature checking is the irreducible cost).
fn bench_verify() -> Result<()> {
    use archipel_crypto::{Identity, RequestVerifier, sign_request};
    use commonware_codec::DecodeExt;
    use commonware_cryptography::{Signer, Verifier, ed25519};
    const N: usize = 20_000;
    let id = Identity::from_seed(1);
    let now = 1_800_000_000_000u64;
    let body = br#"{"amount":1}"#;
    let requests: Vec<_> = (0..N)
        .map(|i| {
            let mut nonce = [0u8; 16];
            nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
            sign_request(&id, "POST", "/v1/tx", body, now, nonce)
        })
        .collect();
    let pk = id.private_key().public_key();
    let raw: Vec<(Vec<u8>, ed25519::Signature)> = (0..N)
        .map(|i| {
            let msg = format!("POST\n/v1/tx\n{now}\n{i:032x}\n{}", blake3::hash(body).to_hex()).into_bytes();
            let sig = id.private_key().sign(archipel_crypto::namespace::REQUEST, &msg);
            (msg, sig)
        })
        .collect();
    let _ = ed25519::Signature::decode(vec![0u8; 64]);

    let mut ours = Vec::new();
    let mut base = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for (msg, sig) in &raw {
            assert!(pk.verify(archipel_crypto::namespace::REQUEST, msg, sig));
        }
        base.push(N as f64 / t.elapsed().as_secs_f64());
        let mut verifier = RequestVerifier::new(30_000, N + 1);
        let t = Instant::now();
        for h in &requests {
            verifier.verify(h, "POST", "/v1/tx", body, now, |_| true).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        ours.push(N as f64 / t.elapsed().as_secs_f64());
    }
    let (o, b) = (median(ours), median(base));
    println!("signed-request verification, 1 core: {o:.0}/s; bare Ed25519 verify: {b:.0}/s; ratio {:.2}", o / b);
    Ok(())
}

/// The in-process part of `bench state` (skipped with `ARCHIPEL_BENCH_STATE_IN_PROCESS=0`).
fn bench_state_in_process() -> Result<()> {
    if std::env::var("ARCHIPEL_BENCH_STATE_IN_PROCESS").is_ok_and(|v| v == "0") {
        println!("== bench state (in process): skipped (ARCHIPEL_BENCH_STATE_IN_PROCESS=0)");
        return Ok(());
    }
    state_bench::bench()
}

/// The devnet part of `bench state` (skipped with `ARCHIPEL_BENCH_STATE_DEVNET=0`; 10^7 entries
/// stay in the first part only).
fn bench_state_devnet() -> Result<()> {
    if std::env::var("ARCHIPEL_BENCH_STATE_DEVNET").is_ok_and(|v| v == "0") {
        println!("== bench state (devnet): skipped (ARCHIPEL_BENCH_STATE_DEVNET=0)");
        return Ok(());
    }
    let sizes: Vec<u64> = state_bench::sizes()?.into_iter().filter(|n| *n <= 1_000_000).collect();
    state_devnet_bench::bench(&build_release()?, &sizes)
}

/// Builds the `archipel` binary where `cargo run --release` builds it (`target/release`, not
/// xtask's own target directory). `ARCHIPEL_BENCH_BIN` names another binary instead (an A/B
/// against an older build; the benches' in-process parts are this checkout's either way).
fn build_release() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ARCHIPEL_BENCH_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("ARCHIPEL_BENCH_BIN={}: no such file", bin.display());
        }
        println!("benchmarking {} (ARCHIPEL_BENCH_BIN), not a fresh build", bin.display());
        return Ok(bin);
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.join("target");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--bin", "archipel", "--target-dir"])
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .status()?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    Ok(target.join("release/archipel"))
}

/// CPU use over a window: of the whole box, and of some processes, as a share of all CPUs.
struct CpuShare {
    cpus: usize,
    box_percent: f64,
    processes_percent: f64,
}

/// The box's busy and total CPU ticks so far, from the aggregate line of `/proc/stat` (user nice
/// system idle iowait irq softirq steal …; idle and iowait are not busy).
fn box_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|f| f.parse().unwrap_or(0)).collect();
    let idle = v[3] + v[4];
    Ok((v.iter().sum::<u64>() - idle, v.iter().sum()))
}

/// The share of the box's CPU busy between two [`box_ticks`] readings, in percent.
fn busy_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    100.0 * after.0.saturating_sub(before.0) as f64 / after.1.saturating_sub(before.1).max(1) as f64
}

/// Measures [`CpuShare`] over `window` from `/proc/stat` and each process's `/proc/PID/stat`.
fn idle_cpu(pids: &[u32], window: Duration) -> Result<CpuShare> {
    // utime + stime (fields 14 and 15; the name in field 2 may hold spaces, so count from ')').
    fn process_ticks(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let f: Vec<&str> = after.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Linux reports these in USER_HZ ticks, 100 per second on every supported architecture.
    const TICKS_PER_SEC: f64 = 100.0;
    // A process that is gone would count as idle: every one must be there at both ends.
    let ticks = || -> Result<u64> {
        pids.iter()
            .map(|p| process_ticks(*p).with_context(|| format!("node process {p} is gone: the figure would be low")))
            .sum()
    };
    let (busy0, total0) = box_ticks()?;
    let procs0 = ticks()?;
    let t = Instant::now();
    std::thread::sleep(window);
    let (busy1, total1) = box_ticks()?;
    let procs1 = ticks()?;
    let wall = t.elapsed().as_secs_f64();
    Ok(CpuShare {
        cpus,
        box_percent: busy_percent((busy0, total0), (busy1, total1)),
        processes_percent: 100.0 * (procs1 - procs0) as f64 / TICKS_PER_SEC / wall / cpus as f64,
    })
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Time from `archipel devnet` to all 12 nodes answering, against spawning the same binary 12
/// times to print its version (the process-start floor); then idle CPU (against the box before the
/// devnet started) and idle RSS per node.
fn bench_devnet() -> Result<()> {
    let bin = build_release()?;
    let mut spawn = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let children: Vec<_> = (0..12)
            .map(|_| Command::new(&bin).arg("--version").stdout(Stdio::null()).spawn())
            .collect::<std::io::Result<_>>()?;
        for mut c in children {
            c.wait()?;
        }
        spawn.push(t.elapsed().as_secs_f64());
    }
    let spawn = median(spawn);

    let mut ups = Vec::new();
    let mut rss = Vec::new();
    // The box before any devnet runs: the baseline the idle figure is read against.
    let before = idle_cpu(&[], Duration::from_secs(10))?;
    let mut idle = None;
    for run in 0..3 {
        let work = std::env::temp_dir().join(format!("archipel-bench-devnet-{}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        // A fresh devnet each run: key generation and genesis are part of the measured time.
        let t = Instant::now();
        let mut child = Command::new(&bin)
            .current_dir(&work)
            .args(["devnet", "--dir", "devnet", "--base-ip", "127.0.70.2", "--base-port", "26100"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(out).lines();
        let mut ready = None;
        for line in lines.by_ref() {
            let line = line?;
            if line.contains("devnet ready") {
                ready = Some(t.elapsed());
                break;
            }
        }
        let ready = ready.context("devnet never became ready")?;
        // All 12 must also see each other up.
        let client = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build()?;
        let all_up = loop {
            let v: Option<serde_json::Value> =
                client.get("http://127.0.70.2:26101/v1/nodes").send().ok().and_then(|r| r.json().ok());
            let up = v
                .as_ref()
                .map_or(0, |v| v["nodes"].as_array().map_or(0, |a| a.iter().filter(|n| n["status"] == "up").count()));
            if up == 12 {
                break t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("not all nodes up after 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ups.push(all_up.as_secs_f64());
        println!(
            "  run {run}: API answering on all 12 after {:.2}s, all 12 seen up after {:.2}s",
            ready.as_secs_f64(),
            all_up.as_secs_f64()
        );
        if run == 0 {
            let state: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(work.join("devnet/devnet.json"))?)?;
            let pids: Vec<u32> = state["nodes"]
                .as_array()
                .context("nodes")?
                .iter()
                .filter_map(|n| n["pid"].as_u64())
                .map(|p| p as u32)
                .collect();
            // Idle CPU: 10 s, starting 25 s after the devnet answered (start-up work is over).
            std::thread::sleep(Duration::from_secs(25).saturating_sub(t.elapsed() - ready));
            if pids.len() != 12 {
                bail!("the devnet lists {} node processes, not 12", pids.len());
            }
            idle = Some(idle_cpu(&pids, Duration::from_secs(10))?);
            for p in &pids {
                if let Some(k) = rss_kib(*p) {
                    rss.push(k as f64 / 1024.0);
                }
            }
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)?;
        for _ in lines {}
        child.wait()?;
        let _ = std::fs::remove_dir_all(&work);
    }
    let up = median(ups);
    println!(
        "devnet, 12 nodes: all up (every node seen up by n01) in {up:.2}s; 12 bare process starts take {spawn:.3}s; ratio {:.1}",
        up / spawn
    );
    let idle = idle.context("no idle measurement")?;
    println!(
        "idle devnet, 12 nodes, 10 s from 25 s after start: the nodes use {:.1}% of the box's {} CPUs (goal <= 19.5%, \
         half the 39% measured at commit 98214b3; ratio {:.2}) — {}; the whole box was {:.1}% busy, {:.1}% before the devnet started",
        idle.processes_percent,
        idle.cpus,
        idle.processes_percent / 19.5,
        if idle.processes_percent <= 19.5 { "met" } else { "NOT met" },
        idle.box_percent,
        before.box_percent
    );
    let max = rss.iter().copied().fold(0.0, f64::max);
    let mean = rss.iter().sum::<f64>() / rss.len().max(1) as f64;
    println!(
        "idle RSS per node after 10 s: mean {mean:.1} MiB, max {max:.1} MiB (goal <= 100 MiB; ratio max/goal {:.2})",
        max / 100.0
    );
    Ok(())
}
