//! `cargo xtask bench storage`: object storage on a release devnet of 12 node processes.
//!
//! Every figure is read against a baseline measured in the same run on the same disk:
//!
//! - **Disk ceiling**: sequential 1 MiB writes of 1 GiB then `fdatasync` (what `dd bs=1M
//!   conv=fdatasync` does), three times, median. A 4+2 PUT writes 1.5× the object on this one
//!   disk, so the PUT ceiling is that figure divided by (k+m)/k.
//! - **Large objects**: three rounds of `archipel put` and `archipel get` of a 1 GiB file through
//!   the CLI (final on the ledger, read back and checked), each round reported, min/median/max.
//! - **Small objects**: 32 concurrent clients, each a tenant with its own bucket, PUT 4 KiB
//!   objects in a closed loop through the library (upload, seal, `PutObject` final); ops/s over
//!   every PUT of the run, latency p50/p99 with the split between storing and finality.
//! - **Small objects, one client** (`grouped`): one tenant's client with 32 PUTs of 4 KiB under
//!   way at once, as the S3 gateway or `aws s3 cp --recursive` has them, through
//!   `TenantClient::put` (group commit: one seal call per holder and one `PutObjects` per batch);
//!   ops/s over every PUT, latency p50/p99, transactions and objects per transaction, and how many
//!   PUTs had to go on their own after their batch failed.
//! - **Repair**: the non-validator holding the most shard bytes is killed -9; the time from the
//!   moment its shards may be repaired (the time of the block that set its lease down plus the
//!   ledger's repair grace, both read from the ledger) until finalized state assigns it nothing
//!   and no object is degraded, against every byte it held; a second node going down meanwhile
//!   fails the run.
//! - **Client memory**: peak RSS of `archipel put` streaming a 10 GiB (sparse) file, measured by
//!   the kernel (`getrusage` of a parent that ran only that process); goal ≤ 256 MiB.
//!   `ARCHIPEL_BENCH_BIG_GIB` sets the size (0 skips it).
//!
//! `ARCHIPEL_BENCH_STEPS=small,large,repair,memory` runs only the listed steps (all by default;
//! `repair` kills the holder of the most bytes of whatever the earlier steps stored).

use crate::ledger_bench::{Devnet, post, start_devnet};
use crate::median;
use crate::state_devnet_bench::{Node, nodes};
use anyhow::{Context, Result, bail};
use archipel_crypto::Identity;
use archipel_ledger::storage::{BucketRecord, ObjectPut};
use archipel_ledger::{Credit, Hash, Payload, Transaction};
use archipel_objects::ShardHash;
use archipel_objects::http::HttpShards;
use archipel_objects::transfer::{Claim, Holder, PutPlan, SealWith, Sealed, Shards, TransferError, put_object};
use archipel_placement::Candidate;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BASE_IP: &str = "127.0.72.2";
const BASE_PORT: &str = "26400";
const LARGE_MIB: u64 = 1024;
const ROUNDS: usize = 3;
const SMALL_CLIENTS: usize = 32;
const SMALL_PER_CLIENT: usize = 40;
const SMALL_BYTES: usize = 4096;
/// The steps of the run, in order.
const STEPS: [&str; 5] = ["small", "grouped", "large", "repair", "memory"];

/// The steps `ARCHIPEL_BENCH_STEPS` (comma-separated) asks for; all of them by default.
fn steps() -> Result<Vec<&'static str>> {
    let Ok(v) = std::env::var("ARCHIPEL_BENCH_STEPS") else { return Ok(STEPS.to_vec()) };
    let mut out = vec![];
    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let step = STEPS
            .iter()
            .find(|k| **k == s)
            .with_context(|| format!("ARCHIPEL_BENCH_STEPS: no step {s:?}; the steps are {}", STEPS.join(", ")))?;
        out.push(*step);
    }
    if out.is_empty() {
        bail!("ARCHIPEL_BENCH_STEPS={v:?} names no step; the steps are {}", STEPS.join(", "));
    }
    let skipped: Vec<&str> = STEPS.iter().copied().filter(|s| !out.contains(s)).collect();
    if !skipped.is_empty() {
        println!("steps skipped (ARCHIPEL_BENCH_STEPS): {}", skipped.join(", "));
    }
    Ok(out)
}

/// MiB/s of writing 1 GiB sequentially in 1 MiB blocks and `fdatasync`ing it, in `dir`.
fn disk_write_mib_s(dir: &Path) -> Result<f64> {
    let path = dir.join("disk-ceiling.bin");
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let t = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    for _ in 0..1024 {
        f.write_all(&block)?;
    }
    f.sync_data()?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(1024.0 / secs)
}

/// Writes `mib` MiB of data that differs from MiB to MiB; returns its BLAKE3 hash.
fn write_source(path: &Path, mib: u64) -> Result<blake3::Hash> {
    let mut block: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(40_503) >> 7) as u8).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut h = blake3::Hasher::new();
    for i in 0..mib {
        block[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&block)?;
        h.update(&block);
    }
    f.flush()?;
    Ok(h.finalize())
}

fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize())
}

/// The CLI against the devnet, as the tenant.
struct Cli {
    bin: PathBuf,
    work: PathBuf,
    api: String,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        let key = self.work.join("devnet/tenant.key");
        c.current_dir(&self.work).args(args).arg("--key").arg(key).args(["--node", &self.api]);
        c.env_remove("ARCHIPEL_NODE").env_remove("ARCHIPEL_KEY");
        c
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.command(args).output()?;
        if !out.status.success() {
            bail!("archipel {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn get_json(http: &reqwest::blocking::Client, url: &str) -> Result<serde_json::Value> {
    Ok(http.get(url).send()?.error_for_status()?.json()?)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The storage nodes in finalized state, as `api` serves them.
fn storage_nodes(http: &reqwest::blocking::Client, api: &str) -> Result<Vec<serde_json::Value>> {
    let v = get_json(http, &format!("{api}/v1/storage/nodes"))?;
    Ok(v["nodes"].as_array().context("`nodes` missing from /v1/storage/nodes")?.clone())
}

/// Names of the storage nodes whose lease is up in finalized state, as `api` serves them.
fn leases_up(http: &reqwest::blocking::Client, api: &str) -> Result<Vec<String>> {
    Ok(storage_nodes(http, api)?
        .iter()
        .filter(|n| n["lease"] == "up")
        .filter_map(|n| n["name"].as_str().map(String::from))
        .collect())
}

pub fn bench(bin: &Path) -> Result<()> {
    crate::in_scratch_dir("storage", |work| bench_in(bin, work))
}

fn bench_in(bin: &Path, work: &Path) -> Result<()> {
    println!("== bench storage: 12-node release devnet, 4+2 bucket, data on {}", work.display());
    let disk = median((0..3).map(|_| disk_write_mib_s(work)).collect::<Result<Vec<_>>>()?);
    let ceiling = disk / 1.5;
    println!(
        "disk: sequential write + fdatasync {disk:.0} MiB/s (median of 3 × 1 GiB); a 4+2 PUT writes 1.5× its size: ceiling {ceiling:.0} MiB/s"
    );

    let devnet: Devnet = start_devnet(bin, work, &["--base-ip", BASE_IP, "--base-port", BASE_PORT])?;
    let nodes = nodes(work)?;
    let api = nodes.first().context("no nodes")?.api.clone();
    let http = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build()?;
    let t = Instant::now();
    while leases_up(&http, &api)?.len() < nodes.len() {
        if t.elapsed() > Duration::from_secs(90) {
            bail!("only {:?} of {} storage leases up after 90 s", leases_up(&http, &api)?, nodes.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let cli = Cli { bin: bin.to_path_buf(), work: work.to_path_buf(), api: api.clone() };
    cli.run(&["bucket", "create", "bench"])?;
    let bucket: BucketRecord = serde_json::from_value(get_json(&http, &format!("{api}/v1/buckets/bench"))?)?;

    let steps = steps()?;
    if steps.contains(&"small") {
        small_objects(work, &api, &bucket)?;
    }
    if steps.contains(&"grouped") {
        let urls: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
        small_grouped(work, &api, &bucket, &urls)?;
    }
    if steps.contains(&"large") {
        large_objects(&cli, work, ceiling, disk)?;
    }
    if steps.contains(&"repair") {
        repair(&http, work, &nodes, disk)?;
    }
    if steps.contains(&"memory") {
        client_memory(&cli, work)?;
    }
    drop(devnet);
    Ok(())
}

/// Three rounds of a 1 GiB PUT and GET through the CLI. A PUT writes (k+m)/k× the object to the
/// disk (`ceiling` is the disk's rate divided by that); a GET reads k shards (the object's size)
/// and writes the object once, so its ceiling is the disk's write rate `disk`.
fn large_objects(cli: &Cli, work: &Path, ceiling: f64, disk: f64) -> Result<()> {
    let src = work.join("large.bin");
    let hash = write_source(&src, LARGE_MIB)?;
    let back = work.join("large-back.bin");
    let (mut puts, mut gets) = (vec![], vec![]);
    for round in 0..ROUNDS {
        let last = format!("bench/large-{round}.bin");
        let t = Instant::now();
        cli.run(&["put", src.to_str().context("path")?, &last])?;
        puts.push(LARGE_MIB as f64 / t.elapsed().as_secs_f64());
        let _ = std::fs::remove_file(&back);
        let t = Instant::now();
        cli.run(&["get", &last, back.to_str().context("path")?])?;
        gets.push(LARGE_MIB as f64 / t.elapsed().as_secs_f64());
        if hash_file(&back)? != hash {
            bail!("{last} read back different from what was put");
        }
        println!(
            "  round {round}: PUT {:.0} MiB/s (final on the ledger), GET {:.0} MiB/s (checked)",
            puts[round], gets[round]
        );
    }
    std::fs::remove_file(&back)?;
    std::fs::remove_file(&src)?;
    let spread = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        (s[0], s[s.len() / 2], s[s.len() - 1])
    };
    let (pmin, pmed, pmax) = spread(&puts);
    let (gmin, gmed, gmax) = spread(&gets);
    println!(
        "large objects ({LARGE_MIB} MiB, {ROUNDS} rounds, every round counted): PUT min/median/max {pmin:.0}/{pmed:.0}/{pmax:.0} MiB/s = \
         {:.2}× the PUT ceiling of {ceiling:.0} MiB/s; GET {gmin:.0}/{gmed:.0}/{gmax:.0} MiB/s = {:.2}× the GET ceiling \
         (the disk's write rate, {disk:.0} MiB/s)",
        pmed / ceiling,
        gmed / disk
    );
    Ok(())
}

fn candidates(v: &serde_json::Value) -> Vec<(Candidate, String)> {
    let s = |n: &serde_json::Value, k: &str| n[k].as_str().unwrap_or_default().to_string();
    v["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|n| n["storage"] == true && n["lease"] == "up")
                .filter_map(|n| {
                    Some((
                        Candidate {
                            node: s(n, "node").parse().ok()?,
                            region: s(n, "region").parse().ok()?,
                            country: s(n, "country").parse().ok()?,
                            operator: s(n, "operator"),
                            jurisdiction: s(n, "jurisdiction").parse().ok()?,
                            free_bytes: n["capacity_bytes"].as_u64()?.saturating_sub(n["stored_bytes"].as_u64()?),
                            reputation: u16::try_from(n["reputation"].as_u64()?).ok()?,
                        },
                        s(n, "api_url"),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn final_tx(
    http: &reqwest::Client,
    api: &str,
    id: &Identity,
    nonce: u64,
    network: &Hash,
    payload: Payload,
) -> Result<()> {
    let stx = Transaction { signer: id.node_id(), nonce, payload }.sign(id, network);
    // A node with too many submissions waiting answers 503 `admission_busy` without admitting
    // this one: send it again after a pause (a bounded number of times).
    let mut attempts = 0;
    let answer = loop {
        match post(http, format!("{api}/v1/tx?wait=final"), stx.to_bytes()).await {
            Err(e) if e.to_string().contains("admission_busy") && attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => break r?,
        }
    };
    if answer["status"] != "final" {
        bail!("transaction {} not final: {answer}", stx.hash());
    }
    Ok(())
}

/// The signed-HTTP transport, timing every call by kind: where a small PUT's storing time goes.
struct Timed {
    inner: HttpShards,
    calls: std::sync::Mutex<Vec<(&'static str, f64)>>,
}

impl Timed {
    async fn time<T>(&self, kind: &'static str, call: impl std::future::Future<Output = T>) -> T {
        let t = Instant::now();
        let r = call.await;
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push((kind, t.elapsed().as_secs_f64() * 1e3));
        r
    }
}

impl Shards for Timed {
    async fn put_shard(
        &self,
        holder: &Holder,
        version: &Hash,
        claim: &Claim,
        index: u8,
        segment: u64,
        bytes: bytes::Bytes,
        hash: ShardHash,
    ) -> Result<(), TransferError> {
        self.time("shard upload", self.inner.put_shard(holder, version, claim, index, segment, bytes, hash)).await
    }
    async fn put_manifest(
        &self,
        holder: &Holder,
        version: &Hash,
        claim: &Claim,
        bytes: bytes::Bytes,
    ) -> Result<(), TransferError> {
        self.time("manifest upload", self.inner.put_manifest(holder, version, claim, bytes)).await
    }
    async fn seal(
        &self,
        holder: &Holder,
        version: &Hash,
        claim: &Claim,
        index: u8,
        generation: u32,
        with: SealWith,
    ) -> Result<Sealed, TransferError> {
        self.time("seal", self.inner.seal(holder, version, claim, index, generation, with)).await
    }
    async fn seal_batch(
        &self,
        holder: &Holder,
        items: Vec<archipel_objects::batch::SealItem>,
    ) -> Result<archipel_objects::batch::BatchSealed, TransferError> {
        self.time("batch seal", self.inner.seal_batch(holder, items)).await
    }
    async fn get_manifest(&self, holder: &Holder, version: &Hash) -> Result<Vec<u8>, TransferError> {
        self.inner.get_manifest(holder, version).await
    }
    async fn get_shard(
        &self,
        holder: &Holder,
        version: &Hash,
        index: u8,
        segment: u64,
    ) -> Result<Vec<u8>, TransferError> {
        self.inner.get_shard(holder, version, index, segment).await
    }
}

/// One small-object client: its tenant, its bucket, its next nonce.
struct SmallClient {
    id: Identity,
    nonce: u64,
    plan: PutPlan,
}

/// The devnet's network (genesis hash), its funded tenant and that tenant's next nonce.
async fn devnet_tenant(http: &reqwest::Client, work: &Path, api: &str) -> Result<(Hash, Identity, u64)> {
    let head: serde_json::Value = http.get(format!("{api}/v1/ledger/head")).send().await?.json().await?;
    let network: Hash =
        head["genesis_hash"].as_str().context("genesis_hash")?.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let tenant = Identity::load(&work.join("devnet/tenant.key"))?;
    let account: serde_json::Value =
        http.get(format!("{api}/v1/accounts/{}", tenant.node_id())).send().await?.json().await?;
    let nonce = account["nonce"].as_u64().context("tenant nonce")?;
    Ok((network, tenant, nonce))
}

/// 32 tenants PUT 4 KiB objects in a closed loop; ops/s over every PUT, latency p50/p99.
fn small_objects(work: &Path, api: &str, template: &BucketRecord) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?;
        let (network, tenant, nonce) = devnet_tenant(&http, work, api).await?;
        let ids: Vec<Identity> = (0..SMALL_CLIENTS as u64).map(|i| Identity::from_seed(0x5107_0000 + i)).collect();
        let credits = ids.iter().map(|t| Credit { to: t.node_id(), amount_micro: 10_000_000_000 }).collect();
        final_tx(&http, api, &tenant, nonce, &network, Payload::TransferMany { credits }).await.context("funding the clients")?;
        let nodes: serde_json::Value = http.get(format!("{api}/v1/storage/nodes")).send().await?.json().await?;
        let candidates = candidates(&nodes);
        let mut clients = vec![];
        for (i, id) in ids.into_iter().enumerate() {
            let name = format!("small-{i}");
            let policy = template.policy.clone();
            final_tx(&http, api, &id, 0, &network, Payload::CreateBucket { name: name.clone(), policy }).await?;
            let bucket: BucketRecord = http.get(format!("{api}/v1/buckets/{name}")).send().await?.json().await?;
            let plan = PutPlan { bucket, key: String::new(), size: SMALL_BYTES as u64, candidates: candidates.clone(), network, etag: None, meta: Default::default() };
            clients.push(SmallClient { id, nonce: 1, plan });
        }
        let started = Instant::now();
        let cpu_before = crate::box_ticks()?;
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(c, mut client)| {
                let http = http.clone();
                let api = api.to_string();
                tokio::spawn(async move {
                    let shards = Arc::new(Timed { inner: HttpShards::new(client.id.clone()), calls: Default::default() });
                    let mut samples = Vec::with_capacity(SMALL_PER_CLIENT);
                    for n in 0..SMALL_PER_CLIENT {
                        let data: Vec<u8> = (0..SMALL_BYTES).map(|i| (i ^ n ^ c) as u8).collect();
                        client.plan.key = format!("obj-{n}");
                        let t = Instant::now();
                        let put: ObjectPut = put_object(shards.clone(), &client.plan, &client.id, &data[..], |_| {}).await?;
                        let stored = t.elapsed();
                        final_tx(&http, &api, &client.id, client.nonce, &client.plan.network, Payload::PutObject { put }).await?;
                        client.nonce += 1;
                        samples.push((stored.as_secs_f64() * 1e3, t.elapsed().as_secs_f64() * 1e3));
                    }
                    let calls = std::mem::take(&mut *shards.calls.lock().unwrap_or_else(|e| e.into_inner()));
                    Ok::<_, anyhow::Error>((samples, calls))
                })
            })
            .collect();
        let (mut all, mut calls) = (vec![], vec![]);
        for t in tasks {
            let (samples, timed) = t.await.context("a client task")??;
            all.extend(samples);
            calls.extend(timed);
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = crate::busy_percent(cpu_before, crate::box_ticks()?);
        let n = all.len();
        let mut totals: Vec<f64> = all.iter().map(|s| s.1).collect();
        let mut stored: Vec<f64> = all.iter().map(|s| s.0).collect();
        totals.sort_by(f64::total_cmp);
        stored.sort_by(f64::total_cmp);
        let pct = |v: &[f64], p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        let ops = n as f64 / secs;
        println!(
            "small objects ({SMALL_BYTES} B, {SMALL_CLIENTS} clients × {SMALL_PER_CLIENT}, all {n} PUTs counted): {ops:.0} PUT/s \
             (goal 2,000: ratio {:.2}); per PUT p50 {:.1} ms, p99 {:.1} ms, of which storing the shards p50 {:.1} ms, p99 {:.1} ms \
             and the rest waiting for finality; the box's CPU {cpu:.0}% busy meanwhile",
            ops / 2000.0,
            pct(&totals, 0.5),
            pct(&totals, 0.99),
            pct(&stored, 0.5),
            pct(&stored, 0.99)
        );
        for kind in ["shard upload", "manifest upload", "seal"] {
            let mut v: Vec<f64> = calls.iter().filter(|(k, _)| *k == kind).map(|(_, ms)| *ms).collect();
            v.sort_by(f64::total_cmp);
            match v.is_empty() {
                true => println!("  {kind}: 0 calls"),
                false => println!("  {kind}: {} calls, p50 {:.1} ms, p99 {:.1} ms", v.len(), pct(&v, 0.5), pct(&v, 0.99)),
            }
        }
        Ok(())
    })
}

/// One tenant's client with [`SMALL_CLIENTS`] PUTs of 4 KiB under way at once, each task
/// [`SMALL_PER_CLIENT`] in a closed loop, every PUT counted: first with every PUT on its own (the
/// same client, group commit off: the baseline of this run), then with group commit.
fn small_grouped(work: &Path, api: &str, template: &BucketRecord, urls: &[String]) -> Result<()> {
    use archipel_objects::tenant::TenantClient;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?;
        let (network, tenant, nonce) = devnet_tenant(&http, work, api).await?;
        let id = Identity::from_seed(0x5107_1000);
        let credits = vec![Credit { to: id.node_id(), amount_micro: 100_000_000_000 }];
        final_tx(&http, api, &tenant, nonce, &network, Payload::TransferMany { credits }).await.context("funding the client")?;
        let name = "small-grouped".to_string();
        final_tx(&http, api, &id, 0, &network, Payload::CreateBucket { name: name.clone(), policy: template.policy.clone() })
            .await?;
        // Every node must know the new account before PUTs go to it as a holder (a node that
        // has not applied the funding refuses the key); how long that took is reported, since
        // after the step before the nodes may still be applying its blocks.
        let waited = Instant::now();
        for url in urls {
            loop {
                let a: serde_json::Value =
                    http.get(format!("{url}/v1/accounts/{}", id.node_id())).send().await?.json().await.unwrap_or_default();
                if a["balance_micro"].as_u64().unwrap_or(0) > 0 {
                    break;
                }
                if waited.elapsed() > Duration::from_secs(120) {
                    bail!("{url} has not applied the funding of the client after 120 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        println!("  every node knew the new client {:.1} s after its bucket was final", waited.elapsed().as_secs_f64());
        let alone = closed_loop_puts(TenantClient::new(urls, id.clone()).without_group_commit(), &name, "alone").await?;
        let grouped = closed_loop_puts(TenantClient::new(urls, id), &name, "grouped").await?;
        println!(
            "small objects, one client ({SMALL_BYTES} B, {SMALL_CLIENTS} PUTs at once × {SMALL_PER_CLIENT}, all PUTs counted): \
             group commit {grouped:.0} PUT/s, each PUT on its own {alone:.0} PUT/s: ratio {:.2}; goal 2,000 PUT/s: ratio {:.2}",
            grouped / alone,
            grouped / 2000.0
        );
        Ok(())
    })
}

/// [`SMALL_CLIENTS`] tasks each PUT [`SMALL_PER_CLIENT`] objects of 4 KiB through `client` in a
/// closed loop; prints the run's figures and returns its PUT/s over every PUT (a failed PUT
/// fails the run). Objects of `label` are read back by listing (every key present, with its
/// size) and one in 16 by GET, untimed.
async fn closed_loop_puts(client: archipel_objects::tenant::TenantClient, bucket: &str, label: &str) -> Result<f64> {
    use archipel_objects::tenant::{InMemory, NewObject};
    let client = Arc::new(client);
    let record = client.bucket(bucket).await?.context("the bucket")?;
    let fallbacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let body = |c: usize, n: usize| -> Vec<u8> { (0..SMALL_BYTES).map(|i| (i ^ n ^ c) as u8).collect() };
    let started = Instant::now();
    let cpu_before = crate::box_ticks()?;
    let tasks: Vec<_> = (0..SMALL_CLIENTS)
        .map(|c| {
            let (client, record, fallbacks) = (client.clone(), record.clone(), fallbacks.clone());
            let label = label.to_string();
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(SMALL_PER_CLIENT);
                for n in 0..SMALL_PER_CLIENT {
                    let object =
                        NewObject { key: format!("{label}/{c}-{n}"), size: SMALL_BYTES as u64, ..Default::default() };
                    let t = Instant::now();
                    let warn = |w: String| {
                        if w.contains("on its own") {
                            fallbacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        eprintln!("  {w}");
                    };
                    let stored = client.put(&record, object, InMemory(body(c, n).into()), |_| {}, warn).await?;
                    samples.push((t.elapsed().as_secs_f64() * 1e3, stored.tx.hash));
                }
                Ok::<_, anyhow::Error>(samples)
            })
        })
        .collect();
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.context("a PUT task")??);
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = crate::busy_percent(cpu_before, crate::box_ticks()?);
    let n = all.len();
    let txs: std::collections::BTreeSet<Hash> = all.iter().map(|s| s.1).collect();
    let mut totals: Vec<f64> = all.iter().map(|s| s.0).collect();
    totals.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let ops = n as f64 / secs;
    println!(
        "  {label}: {ops:.0} PUT/s over all {n} PUTs; per PUT p50 {:.1} ms, p99 {:.1} ms; {} transactions ({:.1} objects \
         each); {} PUTs went on their own after their batch failed; the box's CPU {cpu:.0}% busy meanwhile",
        pct(&totals, 0.5),
        pct(&totals, 0.99),
        txs.len(),
        n as f64 / txs.len().max(1) as f64,
        fallbacks.load(std::sync::atomic::Ordering::Relaxed),
    );
    // Checked, untimed: every object listed with its size; one in 16 read back.
    let mut listed = 0;
    let mut after: Option<String> = None;
    loop {
        let page = client.list(bucket, &format!("{label}/"), None, after.as_deref(), 1000).await?;
        for o in &page.objects {
            if o.size != SMALL_BYTES as u64 {
                bail!("{}/{} lists {} bytes", bucket, o.key, o.size);
            }
        }
        listed += page.objects.len();
        if !page.truncated {
            break;
        }
        after = page.next_start_after.clone();
    }
    if listed != n {
        bail!("{label}: {n} PUTs answered, {listed} objects listed");
    }
    for (c, k) in (0..SMALL_CLIENTS).flat_map(|c| (0..SMALL_PER_CLIENT).map(move |k| (c, k))).step_by(16) {
        let view = client.object(bucket, &format!("{label}/{c}-{k}")).await?.context("an object just put")?;
        let opened = client.open(&view).await?;
        let mut out = Vec::new();
        client.read(&view, &opened, None, &mut out, |_| {}).await?;
        if out != body(c, k) {
            bail!("{label}/{c}-{k} read back differs");
        }
    }
    Ok(ops)
}

/// Kills -9 the non-validator node holding the most shard bytes and times the network's repair
/// of every shard it held: from the moment they may be repaired (its lease down in finalized
/// state + the repair grace) until finalized state assigns it nothing and no bucket has a
/// degraded object.
fn repair(http: &reqwest::blocking::Client, work: &Path, nodes: &[Node], disk: f64) -> Result<()> {
    let validators: Vec<&str> = nodes.iter().take(4).map(|n| n.name.as_str()).collect();
    let ask = nodes.first().context("no nodes")?;
    let held = |name: &str| -> Result<u64> {
        let all = storage_nodes(http, &ask.api)?;
        let n = all.iter().find(|n| n["name"] == name).with_context(|| format!("{name} not in /v1/storage/nodes"))?;
        n["stored_bytes"].as_u64().context("stored_bytes")
    };
    let (victim, bytes) = storage_nodes(http, &ask.api)?
        .iter()
        .filter_map(|n| Some((n["name"].as_str()?.to_string(), n["stored_bytes"].as_u64()?)))
        .filter(|(name, _)| !validators.contains(&name.as_str()))
        .max_by_key(|(_, b)| *b)
        .context("no storage node that is not a validator")?;
    if bytes == 0 {
        bail!("{victim} holds nothing: nothing to repair");
    }
    let node = nodes.iter().find(|n| n.name == victim).context("victim")?;
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(node.pid as i32), nix::sys::signal::Signal::SIGKILL)?;
    let down = loop {
        if !leases_up(http, &ask.api)?.contains(&victim) {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("{victim} still up 60 s after kill -9");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let degraded = || -> Result<u64> {
        let h = get_json(http, &format!("{}/v1/storage/health", ask.api))?;
        let buckets = h["buckets"].as_array().context("buckets")?;
        buckets.iter().map(|b| b["degraded_objects"].as_u64().context("degraded_objects")).sum()
    };
    // The repair window opens at the block time of the block that set the lease down plus the
    // ledger's repair grace: read both from the ledger, not from when this bench noticed.
    let genesis: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(work.join("devnet/genesis.json"))?)?;
    let grace_ms = genesis["ledger"]["repair_grace_ms"].as_u64().context("repair_grace_ms in the genesis")?;
    let view = get_json(http, &format!("{}/v1/nodes", ask.api))?;
    let since_height = view["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .find(|n| n["name"] == victim.as_str())
        .and_then(|n| n["lease_since_height"].as_u64())
        .context("the victim's lease_since_height")?;
    let block = get_json(http, &format!("{}/v1/ledger/blocks/{since_height}", ask.api))?;
    let down_ms = block["header"]["timestamp_ms"].as_u64().context("timestamp_ms")?;
    let opens_ms = down_ms + grace_ms;
    let others: Vec<String> = nodes.iter().map(|n| n.name.clone()).filter(|n| *n != victim).collect();
    let repaired_ms = loop {
        if held(&victim)? == 0 && degraded()? == 0 {
            break unix_ms();
        }
        // Another node down would start repairs this figure does not count, or keep objects
        // degraded for reasons of its own.
        let up = leases_up(http, &ask.api)?;
        if let Some(gone) = others.iter().find(|n| !up.contains(n)) {
            bail!("{gone}'s lease went down during the repair of {victim}'s shards: the figure would mix two losses");
        }
        if killed.elapsed() > Duration::from_secs(900) {
            bail!(
                "{victim}'s shards not all repaired 900 s after kill -9: it still holds {} bytes, {} objects degraded",
                held(&victim)?,
                degraded()?
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    if repaired_ms <= opens_ms {
        bail!("repaired at {repaired_ms} ms, before the repair window opened at {opens_ms} ms: the clocks disagree");
    }
    let work_time = (repaired_ms - opens_ms) as f64 / 1e3;
    let mib = bytes as f64 / (1 << 20) as f64;
    println!(
        "repair: {victim} (holding {mib:.0} MiB of shards) killed -9; its lease down (block {since_height}) after {:.1} s, \
         repairable {:.0} s later; every shard it held rebuilt elsewhere and committed, no object degraded, {work_time:.1} s \
         after that ({:.1} s after the kill): {:.1} MiB/s rebuilt (reading k× that) = {:.3}× the disk's write ceiling of \
         {disk:.0} MiB/s",
        down.as_secs_f64(),
        grace_ms as f64 / 1e3,
        killed.elapsed().as_secs_f64(),
        mib / work_time,
        mib / work_time / disk
    );
    Ok(())
}

/// Peak RSS of `archipel put` streaming a large sparse file.
fn client_memory(cli: &Cli, work: &Path) -> Result<()> {
    let gib: u64 = match std::env::var("ARCHIPEL_BENCH_BIG_GIB") {
        Ok(v) => {
            v.trim().parse().with_context(|| format!("ARCHIPEL_BENCH_BIG_GIB must be a number of GiB, not {v:?}"))?
        }
        Err(_) => 10,
    };
    if gib == 0 {
        println!("client memory: skipped (ARCHIPEL_BENCH_BIG_GIB=0)");
        return Ok(());
    }
    let src = work.join("big.bin");
    std::fs::File::create(&src)?.set_len(gib << 30)?;
    let report = work.join("peak-rss");
    let xtask = std::env::current_exe()?;
    let put = cli.command(&["put", src.to_str().context("path")?, "bench/big.bin"]);
    let t = Instant::now();
    let status = Command::new(xtask)
        .arg("peak-rss")
        .arg(&report)
        .arg(put.get_program())
        .args(put.get_args())
        .current_dir(work)
        .status()?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&src)?;
    if !status.success() {
        bail!("the {gib} GiB PUT failed");
    }
    let kib: f64 = std::fs::read_to_string(&report)?.trim().parse()?;
    let mib = kib / 1024.0;
    println!(
        "client memory: {gib} GiB streaming PUT in {secs:.0} s ({:.0} MiB/s), peak RSS of archipel put {mib:.0} MiB (goal <= 256 MiB: ratio {:.2}) — {}",
        (gib << 10) as f64 / secs,
        mib / 256.0,
        if mib <= 256.0 { "met" } else { "NOT met" }
    );
    Ok(())
}

/// `xtask peak-rss REPORT PROGRAM ARGS…`: runs the program, writes its peak RSS in KiB to REPORT
/// and exits with its status. The kernel's `ru_maxrss` over this process's children is exactly
/// the program's, since it is the only child.
pub fn peak_rss_main(args: &[String]) -> Result<()> {
    let (report, program) = match args {
        [report, program, ..] => (report, program),
        _ => bail!("usage: xtask peak-rss REPORT PROGRAM [ARGS…]"),
    };
    let status = Command::new(program).args(&args[2..]).status()?;
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    std::fs::write(report, usage.max_rss().to_string())?;
    std::process::exit(status.code().unwrap_or(1));
}
