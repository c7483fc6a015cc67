//! `cargo xtask bench market`: the compute marketplace.
//!
//! - **Awards per second** (in process, the ledger's own code): 48 compute providers, 2,000 jobs
//!   each with 3 sealed bids, all revealed in one block, where each job's last reveal awards it;
//!   awards/s over that block's whole execution (the 6,000 reveals — their commitments checked,
//!   signatures not, as for the transfers — and every award: the winner rule, bonds back,
//!   standbys, the due index, writes), three rounds, median. Baseline in the same run: a
//!   block of 2,000 plain transfers, applied the same way; the ratio says what an award (with
//!   its reveals) costs against the cheapest transaction. Goal: ≥ 500 awards/s.
//! - **Post → award → running** (a release devnet of 12 node processes): 30 word-count jobs posted
//!   one after another with `archipel job submit` (bid window 500 ms, the least a provider bids in);
//!   for every job, from the block time of its `PostJob` to the block time of its award (both on
//!   the ledger) and to the moment its provider started it (the provider's `/v1/jobs/{id}/run`,
//!   same machine clock); p50 and p99 over all 30. Baseline in the same run: a transfer's time
//!   from submission to finality, median of 30. Goal: post → running p50 ≤ 1 s.
//! - **Failover**: 5 times, a long job (EU only) is posted, and once it runs its provider is
//!   killed -9 (the devnet's validators do not run jobs here, so that any provider may die); the
//!   time from the kill to the block time of the award to another provider, read on the ledger;
//!   p50 and p99 over all 5, every one must move. Goal: ≤ 3 s.
//!
//! Every job of the run must end accepted; a job that does not fails the bench.

use crate::ledger_bench::start_devnet;
use crate::state_devnet_bench::nodes;
use anyhow::{Context, Result, bail};
use archipel_crypto::{Identity, SignedDescriptor};
use archipel_ledger::{AliveProof, GenesisState, Hash, LedgerParams, LivenessChange, Payload, State, Transaction};
use archipel_market::rule::commitment;
use archipel_market::{JobLimits, JobSpec, ObjectRef};
use archipel_types::{ErasureCode, Geofence};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const PROVIDERS: u64 = 48;
const JOBS: usize = 2_000;
const BIDS: usize = 3;
const ROUNDS: usize = 3;
const LATENCY_JOBS: usize = 30;
const FAILOVERS: usize = 5;
/// The default devnet's nodes: name, region, country, operator, its jurisdiction.
const TOPOLOGY: [(&str, &str, &str, &str, &str); 12] = [
    ("n01", "eu-de", "DE", "rheinhost", "DE"),
    ("n02", "eu-fr", "FR", "seine-cloud", "FR"),
    ("n03", "eu-nl", "NL", "polder-net", "NL"),
    ("n04", "us-east", "US", "bigcloud", "US"),
    ("n05", "eu-de", "DE", "rheinhost", "DE"),
    ("n06", "eu-de", "DE", "alpen-dc", "DE"),
    ("n07", "eu-fr", "FR", "seine-cloud", "FR"),
    ("n08", "eu-fr", "FR", "lyon-compute", "FR"),
    ("n09", "eu-nl", "NL", "polder-net", "NL"),
    ("n10", "eu-de", "DE", "bigcloud", "US"),
    ("n11", "eu-ie", "IE", "bigcloud", "US"),
    ("n12", "us-east", "US", "bigcloud", "US"),
];

/// Runs the bench with the release `archipel` binary at `archipel`.
pub fn bench(archipel: &Path) -> Result<()> {
    awards()?;
    devnet(archipel)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn spec() -> JobSpec {
    JobSpec {
        module: ObjectRef { bucket: "jobs".into(), key: "m.wasm".into(), version: [7; 32], data_key: [0; 32] },
        inputs: vec![],
        args: vec![],
        env: vec![],
        limits: JobLimits { memory_bytes: 1 << 20, cpu_ms: 1_000, wall_ms: 60_000, output_bytes: 1 << 20 },
        max_price_micro: 100,
        geofence: Geofence::default(),
        redundancy: 1,
        bid_window_ms: 1_000,
    }
}

/// A state with the providers up, a funded tenant and the module stored.
fn world() -> Result<State> {
    const REGIONS: [&str; 4] = ["eu-de", "eu-fr", "eu-nl", "eu-ie"];
    let tenant = Identity::from_seed(1);
    let providers: Vec<Identity> = (0..PROVIDERS).map(|i| Identity::from_seed(100 + i)).collect();
    let descriptors = providers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut d = archipel_crypto::test_support::example_descriptor(p);
            d.region = REGIONS[i % REGIONS.len()].parse()?;
            d.operator = format!("op-{i}");
            d.roles = "compute".parse()?;
            Ok(SignedDescriptor::sign(p, d)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut s = State::genesis(GenesisState {
        network: Hash::ZERO,
        params: LedgerParams { max_block_txs: 100_000, max_block_bytes: 64 << 20, ..LedgerParams::default() },
        timestamp_ms: 0,
        validators: vec![providers[0].node_id()],
        accounts: std::iter::once((tenant.node_id(), 1 << 40))
            .chain(providers.iter().map(|p| (p.node_id(), 1 << 30)))
            .collect(),
        nodes: descriptors,
    });
    s.begin_block(1, 1_000);
    for p in &providers {
        let proof = AliveProof::sign(p, &Hash::ZERO, 0);
        s.apply_liveness(&LivenessChange::Up { node: p.node_id(), proof }).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let m = spec().module;
    s.store_object_unchecked(archipel_ledger::storage::ObjectRecord {
        bucket: m.bucket,
        key: m.key,
        version: Hash(m.version),
        size: 1,
        segment_bytes: 64,
        code: ErasureCode::DEFAULT,
        manifest_root: Hash::ZERO,
        etag: String::new(),
        holders: vec![],
        shard_bytes: 64,
        created_height: 1,
        created_ms: 1_000,
        generation: 1,
        suspect: vec![],
    });
    s.seal().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(s)
}

/// Applies `txs` (signed) as one block at `t`; the seconds it took.
fn block(s: &mut State, t: u64, txs: &[archipel_ledger::SignedTransaction]) -> Result<f64> {
    let started = Instant::now();
    let height = s.chain().height + 1;
    s.begin_block(height, t);
    for tx in txs {
        s.apply_verified(tx).map_err(|e| anyhow::anyhow!("{}: {e}", tx.tx.payload.kind()))?;
    }
    s.seal().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(started.elapsed().as_secs_f64())
}

/// One round: (seconds of the award block, seconds of the transfer block).
fn award_round() -> Result<(f64, f64)> {
    let mut s = world()?;
    let tenant = Identity::from_seed(1);
    let providers: Vec<Identity> = (0..PROVIDERS).map(|i| Identity::from_seed(100 + i)).collect();
    let mut nonces = std::collections::HashMap::<archipel_types::NodeId, u64>::new();
    let mut sign = |who: &Identity, payload: Payload| {
        let n = nonces.entry(who.node_id()).or_default();
        *n += 1;
        Transaction { signer: who.node_id(), nonce: *n - 1, payload }.sign(who, &Hash::ZERO)
    };
    let posts: Vec<_> = (0..JOBS).map(|_| sign(&tenant, Payload::PostJob { spec: spec() })).collect();
    let ids: Vec<Hash> = (0..JOBS as u64).map(|n| archipel_ledger::jobs::job_id(&tenant.node_id(), n)).collect();
    block(&mut s, 2_000, &posts)?;
    let bidders = |j: usize| (0..BIDS).map(move |b| (j * 7 + b * 13) % PROVIDERS as usize);
    let salt = |j: usize, b: usize| [(j % 251) as u8 ^ b as u8; 32];
    let price = |b: usize| 10 + b as u64;
    // Every commit, then every reveal (each provider's nonces in block order).
    let mut commits = Vec::new();
    for (j, id) in ids.iter().enumerate() {
        for b in bidders(j) {
            let p = &providers[b];
            let digest = Hash(commitment(&id.0, &p.node_id(), 0, price(b), &salt(j, b)));
            commits.push(sign(p, Payload::BidCommit { job: *id, digest, bond_micro: 10 }));
        }
    }
    let mut reveals = Vec::new();
    for (j, id) in ids.iter().enumerate() {
        for b in bidders(j) {
            reveals.push(sign(
                &providers[b],
                Payload::BidReveal { job: *id, price_micro: price(b), salt: Hash(salt(j, b)) },
            ));
        }
    }
    block(&mut s, 2_500, &commits)?;
    // Each job's last reveal awards it, in this block: its time covers the 6,000 reveals (their
    // commitments; signatures are not checked here, nor for the transfers) and the 2,000 awards.
    let award = block(&mut s, 3_500, &reveals)?;
    let awarded = ids.iter().filter(|id| s.job(id).is_some_and(|j| j.active().count() == 1)).count();
    if awarded != JOBS {
        bail!("{awarded} of {JOBS} jobs awarded");
    }
    // Baseline: as many transfers, in one block.
    let transfers: Vec<_> = (0..JOBS)
        .map(|i| sign(&tenant, Payload::Transfer { to: providers[i % providers.len()].node_id(), amount_micro: 1 }))
        .collect();
    let base = block(&mut s, 5_000, &transfers)?;
    Ok((award, base))
}

fn awards() -> Result<()> {
    println!(
        "awards per second: {PROVIDERS} providers, {JOBS} jobs, {BIDS} bids each revealed in one block that awards them all; {ROUNDS} rounds"
    );
    let mut award = Vec::new();
    let mut base = Vec::new();
    for r in 0..ROUNDS {
        let (a, b) = award_round()?;
        println!(
            "  round {}: reveal + award block {:.0} ms ({:.0} awards/s); {JOBS} transfers {:.0} ms",
            r + 1,
            a * 1e3,
            JOBS as f64 / a,
            b * 1e3
        );
        award.push(a);
        base.push(b);
    }
    let (a, b) = (crate::median(award), crate::median(base));
    let rate = JOBS as f64 / a;
    println!(
        "  median: {rate:.0} awards/s; an award with its {BIDS} reveals costs {:.2}× a transfer; goal ≥ 500 awards/s: {}",
        a / b,
        if rate >= 500.0 { "met" } else { "NOT met" }
    );
    Ok(())
}

fn get(url: &str) -> Result<serde_json::Value> {
    let r = reqwest::blocking::Client::new().get(url).timeout(Duration::from_secs(10)).send()?;
    if !r.status().is_success() {
        bail!("{url}: {}", r.status());
    }
    Ok(r.json()?)
}

/// `archipel ARGS` in `work`; its stdout, or the error with its stderr.
fn cli(archipel: &Path, work: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(archipel).current_dir(work).args(args).output()?;
    if !out.status.success() {
        bail!("archipel {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits for job `id` to end accepted; the job.
fn accepted(api: &str, id: &str, within: Duration) -> Result<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        let j = get(&format!("{api}/v1/jobs/{id}"))?["job"].clone();
        match j["ended"]["status"].as_str() {
            Some("accepted") => return Ok(j),
            Some(other) => bail!("job {id} ended {other}: {}", j["ended"]),
            None if Instant::now() > deadline => bail!("job {id} did not end within {within:?}"),
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn devnet(archipel: &Path) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_path_buf();
    let work = root.join("target/bench-market");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // The default topology, but the four validators do not run jobs: every provider may be killed
    // without stopping the chain.
    let topology = work.join("topology.toml");
    let mut text = String::new();
    for (i, (name, region, country, operator, jur)) in TOPOLOGY.iter().enumerate() {
        let roles = if i < 4 { r#"["validator", "storage"]"# } else { r#"["storage", "compute"]"# };
        text.push_str(&format!(
            "[[node]]\nname = {name:?}\nregion = {region:?}\ncountry = {country:?}\noperator = {operator:?}\n\
             operator_jurisdiction = {jur:?}\ncapacity = \"50GiB\"\nroles = {roles}\n"
        ));
    }
    std::fs::write(&topology, text)?;
    let topology = topology.to_str().context("path")?;
    let _devnet = start_devnet(
        archipel,
        &work,
        &["--base-ip", "127.0.74.2", "--base-port", "26700", "--s3-listen", "off", "--topology", topology],
    )?;
    let all = nodes(&work)?;
    let api = all[0].api.clone();
    let list = all.iter().map(|n| n.api.clone()).collect::<Vec<_>>().join(",");
    let key = work.join("devnet/tenant.key");
    let key = key.to_str().context("path")?;
    // Leases come up a few seconds after the processes; the 8 non-validators are the providers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = get(&format!("{api}/v1/providers"))?;
        let ps = v["providers"].as_array().cloned().unwrap_or_default();
        if ps.len() == all.len() - 4 && ps.iter().all(|p| p["up"] == true) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the providers did not all come up: {v}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let wordcount = root.join("examples/jobs/wordcount.wasm");
    let chain = root.join("examples/jobs/sha256chain.wasm");
    let input = work.join("input.txt");
    std::fs::write(&input, "the quick brown fox jumps over the lazy dog\n".repeat(1000))?;
    let submit = |extra: &[&str]| -> Result<String> {
        let mut a = vec!["job", "submit"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--key", key, "--node", &list]);
        cli(archipel, &work, &a)
    };
    // Baseline: transfers from submission to finality (the command's whole time).
    let mut transfer = Vec::new();
    let to = Identity::from_seed(9).node_id().to_string();
    for _ in 0..LATENCY_JOBS {
        let t = Instant::now();
        cli(archipel, &work, &["account", "transfer", &to, "1", "--key", key, "--node", &api])
            .context("a baseline transfer")?;
        transfer.push(t.elapsed().as_secs_f64());
    }
    let transfer = crate::median(transfer);
    // Post → award → running.
    let w = wordcount.to_str().context("path")?;
    let i = input.to_str().context("path")?;
    submit(&[w, "--input", i, "--max-price", "100", "--bid-window", "500ms"])
        .context("the first job (stores the files)")?;
    let (mut to_award, mut to_run) = (Vec::new(), Vec::new());
    for _ in 0..LATENCY_JOBS {
        let id = submit(&[w, "--input", i, "--max-price", "100", "--bid-window", "500ms"])?;
        let j = accepted(&api, &id, Duration::from_secs(60))?;
        let posted = j["posted_ms"].as_u64().context("posted_ms")?;
        let lease = &j["leases"][0];
        let awarded = lease["awarded_ms"].as_u64().context("awarded_ms")?;
        let provider = lease["bid"]["provider"]["node"].as_str().context("provider")?.to_string();
        let url = get(&format!("{api}/v1/providers"))?["providers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["node"] == provider.as_str()))
            .and_then(|p| p["api_url"].as_str().map(String::from))
            .context("the provider's API")?;
        let run = get(&format!("{url}/v1/jobs/{id}/run"))?;
        let started = run["started_ms"].as_u64().context("started_ms")?;
        to_award.push(awarded.saturating_sub(posted) as f64 / 1e3);
        to_run.push(started.saturating_sub(posted) as f64 / 1e3);
    }
    let (award, run) = (sorted(to_award), sorted(to_run));
    println!(
        "post → award → running: {LATENCY_JOBS} word-count jobs, bid window 500 ms, release devnet of {} nodes",
        all.len()
    );
    println!(
        "  post → award   p50 {:.3} s, p99 {:.3} s\n  post → running p50 {:.3} s, p99 {:.3} s ({:.1}× a transfer's submission → finality, {:.3} s); goal p50 ≤ 1 s: {}",
        percentile(&award, 0.5),
        percentile(&award, 0.99),
        percentile(&run, 0.5),
        percentile(&run, 0.99),
        percentile(&run, 0.5) / transfer,
        transfer,
        if percentile(&run, 0.5) <= 1.0 { "met" } else { "NOT met" }
    );
    // Failover.
    let validators: Vec<String> = (0..4).map(|i| all[i].name.clone()).collect();
    let c = chain.to_str().context("path")?;
    let mut moves = Vec::new();
    let mut killed = Vec::new();
    while moves.len() < FAILOVERS {
        let id = submit(&[
            c,
            "--arg",
            "20000000",
            "--arg",
            "failover",
            "--max-price",
            "100",
            "--region",
            "eu",
            "--cpu",
            "300s",
            "--timeout",
            "300s",
            "--bid-window",
            "500ms",
        ])?;
        // Running on a non-validator, not yet killed: else wait for it to end and try again.
        let deadline = Instant::now() + Duration::from_secs(30);
        let provider = loop {
            let j = get(&format!("{api}/v1/jobs/{id}"))?["job"].clone();
            if let Some(p) = j["leases"][0]["bid"]["provider"]["node"].as_str() {
                break p.to_string();
            }
            if Instant::now() > deadline {
                bail!("job {id} was not awarded within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let Some(node) = all.iter().find(|n| {
            get(&format!("{}/v1/node", n.api)).ok().and_then(|d| d["descriptor"]["node_id"].as_str().map(String::from))
                == Some(provider.clone())
        }) else {
            bail!("no node of the devnet is provider {provider}");
        };
        if validators.contains(&node.name) {
            run_out(&api, &id)?;
            continue;
        }
        std::thread::sleep(Duration::from_millis(1_000));
        let kill = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(node.pid as i32), nix::sys::signal::Signal::SIGKILL)?;
        killed.push(node.name.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        let moved = loop {
            let j = get(&format!("{api}/v1/jobs/{id}"))?["job"].clone();
            let next = j["leases"]
                .as_array()
                .and_then(|ls| ls.iter().find(|l| l["bid"]["provider"]["node"] != provider.as_str()))
                .and_then(|l| l["awarded_ms"].as_u64());
            if let Some(at) = next {
                break at;
            }
            if Instant::now() > deadline {
                bail!("job {id} did not move within 60 s of killing {}", node.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        moves.push(moved.saturating_sub(kill) as f64 / 1e3);
        println!(
            "  failover {}: {} killed, the job moved {:.2} s later",
            moves.len(),
            node.name,
            moves.last().copied().unwrap_or(0.0)
        );
        run_out(&api, &id)?;
    }
    let moves = sorted(moves);
    println!(
        "failover: {FAILOVERS} providers killed -9 mid-job ({}): kill → new provider's award p50 {:.2} s, p99 {:.2} s; goal ≤ 3 s: {}",
        killed.join(", "),
        percentile(&moves, 0.5),
        percentile(&moves, 0.99),
        if percentile(&moves, 0.99) <= 3.0 { "met" } else { "NOT met" }
    );
    Ok(())
}

/// Waits for job `id` to end accepted (a failover job runs a while).
fn run_out(api: &str, id: &str) -> Result<()> {
    accepted(api, id, Duration::from_secs(300)).map(drop)
}
