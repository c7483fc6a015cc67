//! `cargo xtask bench s3`: the S3 gateway of a 12-node release devnet against a single-node
//! plain-disk S3 server, side by side in the same run, with the same client.
//!
//! - **Baseline**: `s3s-fs` 0.14.1 (the s3s project's file-system S3 server, the library at the
//!   pinned version) served in this process on loopback, objects as plain files on the same disk.
//! - **archipel**: the devnet's gateway (in its supervisor process): every object encrypted,
//!   erasure-coded 4+2 over 6 of the 12 node processes and committed on the ledger before the PUT
//!   answers.
//! - **Client**: the gateway crate's SigV4 client (reqwest, `UNSIGNED-PAYLOAD`), the same for both.
//! - **Large objects**: three rounds of a 1 GiB PUT (single request, from memory), GET (every
//!   byte hashed and compared) and multipart PUT (8 MiB parts, 4 at once, as aws-cli sends them;
//!   read back and compared, untimed), per round and min/median/max.
//! - **Small objects**: 32 concurrent clients × 40 PUTs of 4 KiB, then the same GETs; ops/s over
//!   every operation of the run.
//!
//! Ratios are archipel ÷ baseline; the goal is ≥ 1.0.

use crate::ledger_bench::{Devnet, start_devnet};
use crate::median;
use anyhow::{Context, Result, bail};
use archipel_gateway::client::{ClientError, PayloadHash, S3Client};
use bytes::Bytes;
use std::path::Path;
use std::time::{Duration, Instant};

const BASE_IP: &str = "127.0.74.2";
const BASE_PORT: &str = "26700";
const GATEWAY: &str = "127.0.74.1:26799";
const LARGE_MIB: usize = 1024;
const ROUNDS: usize = 3;
const SMALL_CLIENTS: usize = 32;
const SMALL_PER_CLIENT: usize = 40;
const SMALL_BYTES: usize = 4096;
const BUCKET: &str = "bench";
const PART_MIB: usize = 8;
const PARTS_AT_ONCE: usize = 4;

/// PUTs answered 503 and sent again, over the run.
static RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The bench's client of one endpoint: the shared SigV4 client, payload unsigned (the client's
/// hashing is no part of either server's cost).
#[derive(Clone)]
struct S3(S3Client);

impl S3 {
    fn new(endpoint: &str, access: &str, secret: &str) -> Result<S3> {
        Ok(S3(S3Client::new(endpoint, "us-east-1", access, secret)?.with_payload(PayloadHash::Unsigned)))
    }

    /// PUTs `body` at `bench/key`; a 503 (which S3 clients retry) is sent again, up to 4 times,
    /// and counted in [`RETRIES`]; the time of every attempt is part of the operation's.
    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        let mut attempt = 0;
        loop {
            match self.0.put_object(BUCKET, key, &[], body.clone()).await {
                Err(ClientError::S3 { status: 503, .. }) if attempt < 4 => {
                    attempt += 1;
                    RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                r => return r.map(drop).map_err(Into::into),
            }
        }
    }

    /// PUTs `body` at `bench/key` as a multipart upload of [`PART_MIB`] parts, [`PARTS_AT_ONCE`]
    /// at a time, as aws-cli does.
    async fn put_multipart(&self, key: &str, body: &Bytes) -> Result<()> {
        use futures::StreamExt as _;
        let upload = self.0.create_multipart(BUCKET, key, &[]).await?;
        let upload = upload.as_str();
        let parts: Vec<(u32, String)> = futures::stream::iter(body.chunks(PART_MIB << 20).enumerate())
            .map(|(i, chunk)| {
                let part = body.slice_ref(chunk);
                async move {
                    let n = i as u32 + 1;
                    let mut attempt = 0;
                    loop {
                        match self.0.upload_part(BUCKET, key, upload, n, part.clone()).await {
                            Err(ClientError::S3 { status: 503, .. }) if attempt < 4 => {
                                attempt += 1;
                                RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            r => return Ok::<_, anyhow::Error>((n, r?)),
                        }
                    }
                }
            })
            .buffered(PARTS_AT_ONCE)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        self.0.complete_multipart(BUCKET, key, upload, &parts).await?;
        Ok(())
    }

    /// GETs `bench/key`, hashing every byte; returns the byte count and the hash. A 503 is sent
    /// again like a PUT's, and counted.
    async fn get(&self, key: &str) -> Result<(usize, blake3::Hash)> {
        let mut attempt = 0;
        let mut r = loop {
            match self.0.get_object(BUCKET, key).await {
                Err(ClientError::S3 { status: 503, .. }) if attempt < 4 => {
                    attempt += 1;
                    RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                r => break r?,
            }
        };
        let mut h = blake3::Hasher::new();
        let mut n = 0;
        while let Some(chunk) = r.chunk().await? {
            n += chunk.len();
            h.update(&chunk);
        }
        Ok((n, h.finalize()))
    }
}

/// Figures of one target.
struct Figures {
    put_mib_s: Vec<f64>,
    multipart_mib_s: Vec<f64>,
    get_mib_s: Vec<f64>,
    small_put_ops: f64,
    small_get_ops: f64,
}

async fn measure(name: &str, s3: &S3, large: &Bytes) -> Result<Figures> {
    let retries_at_start = RETRIES.load(std::sync::atomic::Ordering::Relaxed);
    let want = blake3::hash(large);
    s3.0.create_bucket(BUCKET).await?;
    let (mut put_mib_s, mut get_mib_s, mut multipart_mib_s) = (vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let path = format!("large-{round}.bin");
        let t = Instant::now();
        s3.put(&path, large.clone()).await?;
        put_mib_s.push(LARGE_MIB as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let (n, h) = s3.get(&path).await?;
        get_mib_s.push(LARGE_MIB as f64 / t.elapsed().as_secs_f64());
        if n != large.len() || h != want {
            bail!("{name}: {path} read back {n} bytes that differ from what was put");
        }
        let key = format!("multipart-{round}.bin");
        let t = Instant::now();
        s3.put_multipart(&key, large).await?;
        multipart_mib_s.push(LARGE_MIB as f64 / t.elapsed().as_secs_f64());
        let (n, h) = s3.get(&key).await?;
        if n != large.len() || h != want {
            bail!("{name}: {key} read back {n} bytes that differ from what was put");
        }
        println!(
            "  {name} round {round}: PUT {:.0} MiB/s, GET {:.0} MiB/s, multipart PUT {:.0} MiB/s (all checked)",
            put_mib_s[round], get_mib_s[round], multipart_mib_s[round]
        );
        // Untimed: the disk holds one round's objects at a time.
        s3.0.delete_object(BUCKET, &path).await?;
        s3.0.delete_object(BUCKET, &key).await?;
    }
    let small = Bytes::from(vec![0x5au8; SMALL_BYTES]);
    let run = |get: bool| {
        let tasks: Vec<_> = (0..SMALL_CLIENTS)
            .map(|c| {
                let s3 = s3.clone();
                let small = small.clone();
                tokio::spawn(async move {
                    for i in 0..SMALL_PER_CLIENT {
                        let path = format!("small/{c}-{i}");
                        if get {
                            let (n, _) = s3.get(&path).await?;
                            if n != SMALL_BYTES {
                                bail!("GET {path}: {n} bytes");
                            }
                        } else {
                            s3.put(&path, small.clone()).await?;
                        }
                    }
                    Ok::<_, anyhow::Error>(())
                })
            })
            .collect();
        async move {
            let t = Instant::now();
            for task in tasks {
                task.await??;
            }
            Ok::<_, anyhow::Error>((SMALL_CLIENTS * SMALL_PER_CLIENT) as f64 / t.elapsed().as_secs_f64())
        }
    };
    let large_retried = RETRIES.load(std::sync::atomic::Ordering::Relaxed) - retries_at_start;
    println!("  {name} large: {large_retried} requests answered 503 and sent again, counted in the time");
    let retries_before = RETRIES.load(std::sync::atomic::Ordering::Relaxed);
    let small_put_ops = run(false).await?;
    let put_retried = RETRIES.load(std::sync::atomic::Ordering::Relaxed) - retries_before;
    let small_get_ops = run(true).await?;
    let get_retried = RETRIES.load(std::sync::atomic::Ordering::Relaxed) - retries_before - put_retried;
    println!(
        "  {name} small ({SMALL_CLIENTS} clients × {SMALL_PER_CLIENT} of 4 KiB, every operation): PUT {small_put_ops:.0} ops/s, GET {small_get_ops:.0} ops/s ({put_retried} PUTs and {get_retried} GETs answered 503 and sent again, counted in the time)"
    );
    Ok(Figures { put_mib_s, multipart_mib_s, get_mib_s, small_put_ops, small_get_ops })
}

pub fn bench(bin: &Path) -> Result<()> {
    crate::in_scratch_dir("s3", |work| bench_in(bin, work))
}

fn bench_in(bin: &Path, work: &Path) -> Result<()> {
    println!(
        "== bench s3: archipel's gateway (12-node release devnet, 4+2) vs s3s-fs (one process, plain files), same disk {}",
        work.display()
    );
    let devnet: Devnet =
        start_devnet(bin, work, &["--base-ip", BASE_IP, "--base-port", BASE_PORT, "--s3-listen", GATEWAY])?;
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(work.join("devnet/devnet.json"))?)?;
    let gw = &state["gateway"];
    let (endpoint, access, secret) = (
        gw["endpoint"].as_str().context("devnet.json names no gateway")?.to_string(),
        gw["access_key_id"].as_str().context("no access key")?.to_string(),
        gw["secret_access_key"].as_str().context("no secret")?.to_string(),
    );
    let api = state["nodes"][0]["api_url"].as_str().context("no node")?.to_string();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(async {
        // Every storage lease up before anything is placed.
        let http = reqwest::Client::builder().no_proxy().build()?;
        let t = Instant::now();
        loop {
            let v: serde_json::Value = http.get(format!("{api}/v1/storage/nodes")).send().await?.json().await?;
            let nodes = v["nodes"].as_array().map(Vec::len).unwrap_or(0);
            let up = v["nodes"].as_array().map_or(0, |n| n.iter().filter(|n| n["lease"] == "up").count());
            if nodes > 0 && up == nodes {
                break;
            }
            if t.elapsed() > Duration::from_secs(90) {
                bail!("only {up} of {nodes} storage leases up after 90 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let root = work.join("s3s-fs");
        std::fs::create_dir_all(&root)?;
        let fs = s3s_fs::FileSystem::new(&root).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?;
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(access.as_str(), secret.as_str()));
        let listener = tokio::net::TcpListener::bind("127.0.74.1:0").await?;
        let baseline_url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(archipel_gateway::serve(listener, builder.build(), async {
            let _ = stopped.await;
        }));
        let mut large = vec![0u8; LARGE_MIB << 20];
        for (i, chunk) in large.chunks_mut(1 << 20).enumerate() {
            chunk.copy_from_slice(&[blake3::hash(&i.to_le_bytes()).as_bytes().as_slice(); 1 << 15].concat());
        }
        let large = Bytes::from(large);
        let base = measure("s3s-fs", &S3::new(&baseline_url, &access, &secret)?, &large).await?;
        let ours = measure("archipel", &S3::new(&endpoint, &access, &secret)?, &large).await?;
        let _ = stop.send(());
        let spread = |v: &[f64]| {
            let mut s = v.to_vec();
            s.sort_by(f64::total_cmp);
            format!("{:.0}/{:.0}/{:.0}", s[0], s[s.len() / 2], s[s.len() - 1])
        };
        println!("s3 (archipel ÷ s3s-fs; goal ≥ 1.0):");
        println!(
            "  1 GiB PUT  MiB/s min/median/max  archipel {}  s3s-fs {}  ratio {:.2}",
            spread(&ours.put_mib_s),
            spread(&base.put_mib_s),
            median(ours.put_mib_s.clone()) / median(base.put_mib_s.clone())
        );
        println!(
            "  1 GiB multipart PUT ({PART_MIB} MiB parts, {PARTS_AT_ONCE} at once)  MiB/s min/median/max  archipel {}  s3s-fs {}  ratio {:.2}",
            spread(&ours.multipart_mib_s),
            spread(&base.multipart_mib_s),
            median(ours.multipart_mib_s.clone()) / median(base.multipart_mib_s.clone())
        );
        println!(
            "  1 GiB GET  MiB/s min/median/max  archipel {}  s3s-fs {}  ratio {:.2}",
            spread(&ours.get_mib_s),
            spread(&base.get_mib_s),
            median(ours.get_mib_s.clone()) / median(base.get_mib_s.clone())
        );
        println!(
            "  4 KiB PUT  ops/s  archipel {:.0}  s3s-fs {:.0}  ratio {:.3}",
            ours.small_put_ops,
            base.small_put_ops,
            ours.small_put_ops / base.small_put_ops
        );
        println!(
            "  4 KiB GET  ops/s  archipel {:.0}  s3s-fs {:.0}  ratio {:.3}",
            ours.small_get_ops,
            base.small_get_ops,
            ours.small_get_ops / base.small_get_ops
        );
        Ok(())
    });
    drop(devnet);
    result
}
