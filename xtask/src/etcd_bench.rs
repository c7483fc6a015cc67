//! The crash-fault-tolerant baseline of `cargo xtask bench ledger`: a 3-member etcd cluster on
//! loopback, driven like the ledger with the same outstanding work. Idle: one put at a time,
//! waiting for each. Under load: closed loop, [`crate::ledger_bench::CLIENTS`] clients each with
//! one transaction of [`crate::ledger_bench::BATCH`] puts outstanding, sending the next when etcd
//! answers that the last one committed (the answer is etcd's linearizable commit, what the
//! ledger's clients learn from a finalized block).
//!
//! etcd is optional: installed with apt-get when missing, skipped with the reason otherwise.

use crate::figures::{Latencies, SortedMs};
use crate::ledger_bench::{BATCH, CLIENTS, ClosedLoop, LATENCY_SAMPLES, LOAD, WARM_UP};
use anyhow::{Context as _, Result, bail};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What etcd measured.
#[derive(Clone, Debug)]
pub struct EtcdFigures {
    /// One put at a time.
    pub idle: Latencies,
    /// Closed loop with the ledger's outstanding work.
    pub closed: ClosedLoop,
}

/// An etcd member, stopped with SIGINT when dropped.
struct Member(Child);

impl Drop for Member {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGINT);
        let _ = self.0.wait();
    }
}

/// The etcd binary, installed with apt-get (Debian `etcd-server`) if missing.
fn etcd_binary() -> Result<String> {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    println!("  installing etcd-server (apt-get)…");
    let ok = Command::new("sh")
        .args(["-c", "apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null 2>&1"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok || !Path::new("/usr/bin/etcd").exists() {
        bail!("etcd is not installed and apt-get could not install etcd-server (install it to compare)");
    }
    Ok("/usr/bin/etcd".into())
}

/// Runs the etcd baseline.
pub async fn run() -> Result<EtcdFigures> {
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
    let mut running = Vec::new();
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
        running.push(Member(child));
    }
    let client =
        reqwest::Client::builder().no_proxy().pool_max_idle_per_host(64).timeout(Duration::from_secs(10)).build()?;
    let put_urls: Vec<String> = members.iter().map(|(_, _, c)| format!("{c}/v3/kv/put")).collect();
    let ready = Instant::now();
    while put(&client, &put_urls[0], "warmup").await.is_err() {
        if ready.elapsed() > Duration::from_secs(30) {
            bail!("etcd cluster did not come up within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut idle = Vec::new();
    for i in 0..LATENCY_SAMPLES {
        let t = Instant::now();
        put(&client, &put_urls[i % 3], &format!("idle/{i}")).await?;
        idle.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let closed =
        closed_loop(&client, &members.iter().map(|(_, _, c)| format!("{c}/v3/kv/txn")).collect::<Vec<_>>()).await?;
    drop(running);
    let _ = std::fs::remove_dir_all(&work);
    Ok(EtcdFigures { idle: Latencies::of(SortedMs::new(idle)), closed })
}

async fn put(client: &reqwest::Client, url: &str, key: &str) -> Result<()> {
    let body = serde_json::json!({"key": b64(key.as_bytes()), "value": b64(b"1")});
    let r = client.post(url).json(&body).send().await?;
    if !r.status().is_success() {
        bail!("etcd answered {}", r.status());
    }
    Ok(())
}

/// `CLIENTS` clients, each with one transaction of `BATCH` puts outstanding; every put of a
/// transaction committed in the window counts, with the transaction's latency.
async fn closed_loop(client: &reqwest::Client, txn_urls: &[String]) -> Result<ClosedLoop> {
    let stop = Arc::new(AtomicBool::new(false));
    // (sent, committed) of every transaction.
    let done: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, stop, done, failures) = (client.clone(), stop.clone(), done.clone(), failures.clone());
        let url = txn_urls[c % txn_urls.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let ops: Vec<_> = (0..BATCH)
                    .map(|j| {
                        // Each client writes its own BATCH keys again and again, as each of our
                        // clients credits its own BATCH accounts: both sides update a fixed
                        // set of CLIENTS x BATCH entries (our state root is rebuilt over all
                        // entries every block until issue 18, so a growing keyspace would
                        // measure that instead).
                        serde_json::json!({"requestPut": {"key": b64(format!("load/{c}/{j}").as_bytes()), "value": b64(n.to_string().as_bytes())}})
                    })
                    .collect();
                n += 1;
                let sent = Instant::now();
                let ok = client
                    .post(&url)
                    .json(&serde_json::json!({"success": ops}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    done.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((sent, Instant::now()));
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let cpu_start = crate::ledger_bench::cpu_ticks();
    tokio::time::sleep(WARM_UP).await;
    let from = Instant::now();
    tokio::time::sleep(LOAD).await;
    let to = Instant::now();
    let busy_percent = crate::ledger_bench::busy_since(cpu_start);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let done = done.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let inside = |t: &Instant| *t >= from && *t < to;
    let committed = done.iter().filter(|(_, at)| inside(at)).count() * BATCH;
    // Every put of a transaction has the transaction's latency.
    let latencies: Vec<f64> = done
        .iter()
        .filter(|(sent, _)| inside(sent))
        .flat_map(|(sent, at)| std::iter::repeat_n((*at - *sent).as_secs_f64() * 1e3, BATCH))
        .collect();
    Ok(ClosedLoop {
        ops_per_s: committed as f64 / (to - from).as_secs_f64(),
        latency: Latencies::of(SortedMs::new(latencies)),
        refused: failures.load(Ordering::Relaxed) * BATCH as u64,
        busy_percent,
    })
}

/// Standard base64, as etcd's JSON gateway wants keys and values.
fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
