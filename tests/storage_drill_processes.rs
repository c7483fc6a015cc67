//! Storage under node loss, with real processes on the default 12-node devnet:
//!
//! 1. The us-east-1 drill: while a large PUT into an "EU only, no US operators" bucket and reads
//!    of earlier objects run, every node in `us-east` (one of them a validator) is killed -9. The
//!    PUT completes, every read returns the right bytes, no shard lands outside the fence, and no
//!    repair starts for nodes that are still up.
//! 2. Two holders killed -9 during a PUT: the client places the object again without them and it
//!    reads back byte-identical; the abandoned attempt never lists.
//! 0. First, a tenant funded after the genesis stores and reads with its own key.
//! 3. A holder killed during a PUT when no compliant node is left to take its place: a clean
//!    error, and nothing lists as present.
//!
//! The drill's object is 1 GiB (`ARCHIPEL_DRILL_MIB` sets another size).

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Writes `mib` MiB that differ from segment to segment (a 1 MiB block and a counter), returning
/// the file's BLAKE3 hash.
fn write_source(path: &Path, mib: usize, seed: u64) -> blake3::Hash {
    let mut block = vec![0u8; 1 << 20];
    let mut x = seed | 1;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut h = blake3::Hasher::new();
    for i in 0..mib {
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        f.write_all(&block).unwrap();
        h.update(&block);
    }
    f.flush().unwrap();
    h.finalize()
}

fn hash_file(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).unwrap()).unwrap();
    h.finalize()
}

#[derive(Clone)]
struct Net {
    w: PathBuf,
    key: String,
    genesis: String,
    /// The API every command talks to (n01, an EU validator that stays up).
    node: String,
}

impl Net {
    fn t(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--key".into(), self.key.clone(), "--node".into(), self.node.clone()]);
        v
    }

    fn run(&self, extra: &[&str]) -> String {
        run(&self.w, &args(&self.t(extra)))
    }

    fn put_child(&self, src: &Path, path: &str) -> std::process::Child {
        Command::new(bin())
            .current_dir(&self.w)
            .args(args(&self.t(&["put", src.to_str().unwrap(), path, "--json"])))
            .env_remove("ARCHIPEL_NODE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn stat(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.run(&["stat", path, "--genesis", &self.genesis, "--json"])).unwrap()
    }

    /// Names of the holders of `path`, by shard index.
    fn holders(&self, path: &str) -> Vec<String> {
        self.stat(path)["holders"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap().to_string()).collect()
    }

    fn keys(&self, bucket: &str) -> Vec<String> {
        let ls: serde_json::Value = serde_json::from_str(&self.run(&["ls", bucket, "--json"])).unwrap();
        ls["objects"].as_array().unwrap().iter().map(|o| o["key"].as_str().unwrap().to_string()).collect()
    }

    /// Every storage node's name, region, jurisdiction and lease, from finalized state.
    fn storage_nodes(&self) -> Vec<(String, String, String, String)> {
        let v: serde_json::Value =
            rt().block_on(archipel_node::client::ApiClient::new(&self.node).get("/v1/storage/nodes")).unwrap();
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let s = |k: &str| n[k].as_str().unwrap_or_default().to_string();
                (s("name"), s("region"), s("jurisdiction"), s("lease"))
            })
            .collect()
    }

    fn wait_not_up(&self, names: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.storage_nodes().iter().any(|n| names.contains(&n.0) && n.3 == "up") {
            assert!(Instant::now() < deadline, "{names:?} still up after {timeout:?}: {:?}", self.storage_nodes());
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Nodes (directory names) holding files of an object version that is not in `known`, with the
/// versions seen.
fn new_versions(nodes_dir: &Path, known: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in files(nodes_dir) {
        let rel = p.strip_prefix(nodes_dir).unwrap();
        let parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
        // NAME/data/shards/shards/XX/VERSION/INDEX.SEGMENT
        if parts.len() == 7 && parts[3] == "shards" && !known.contains(&parts[5]) {
            out.entry(parts[0].clone()).or_default().insert(parts[5].clone());
        }
    }
    out
}

/// Every object version with files on some node (committed or not).
fn on_disk(nodes_dir: &Path) -> BTreeSet<String> {
    new_versions(nodes_dir, &BTreeSet::new()).into_values().flatten().collect()
}

fn wait_child(child: std::process::Child, what: &str) -> std::process::Output {
    let out = child.wait_with_output().unwrap();
    eprintln!("{what}: {}\n{}", stdout(&out), stderr(&out));
    out
}

#[test]
fn us_east_drill_and_holders_killed_during_puts() {
    let work = tempfile::tempdir().unwrap();
    let devnet = Devnet::start(work.path(), &["--base-ip", "127.0.92.2", "--base-port", "26700"]);
    let dir = devnet.dir.to_str().unwrap().to_string();
    let net = Net {
        w: work.path().to_path_buf(),
        key: format!("{dir}/tenant.key"),
        genesis: format!("{dir}/genesis.json"),
        node: devnet.node(0).1,
    };
    let nodes_dir = devnet.dir.join("nodes");
    wait_storage_up(&net.node, 12);
    let pid_of = |name: &str| (0..12).map(|i| devnet.node(i)).find(|n| n.0 == name).unwrap().2;
    let url_of = |name: &str| (0..12).map(|i| devnet.node(i)).find(|n| n.0 == name).unwrap().1;
    let validators: Vec<String> = (0..4).map(|i| devnet.node(i).0).collect();
    let all: Vec<(String, String, String, String)> = net.storage_nodes();
    let outside: BTreeSet<String> =
        all.iter().filter(|n| !n.1.starts_with("eu-") || n.2 == "US").map(|n| n.0.clone()).collect();
    let us_east: Vec<String> = all.iter().filter(|n| n.1 == "us-east").map(|n| n.0.clone()).collect();
    assert_eq!(us_east.len(), 2, "{all:?}");
    assert!(us_east.iter().any(|n| validators.contains(n)), "a us-east validator: {us_east:?}");

    net.run(&["bucket", "create", "eu-only", "--regions", "eu", "--deny-jurisdictions", "US"]);

    // A tenant who joined after the genesis (an account funded by a transfer) has a bucket of its
    // own and stores and reads with its key: the nodes' data plane knows every ledger account.
    let late_key = net.w.join("late.key");
    run(&net.w, &["key", "gen", "--out", late_key.to_str().unwrap()]);
    net.run(&["account", "transfer", late_key.to_str().unwrap(), "1000000000"]);
    let late = Net { key: late_key.to_str().unwrap().to_string(), ..net.clone() };
    late.run(&["bucket", "create", "late", "--regions", "eu", "--deny-jurisdictions", "US"]);
    let src = net.w.join("late.bin");
    let hash = write_source(&src, 3, 5);
    late.run(&["put", src.to_str().unwrap(), "late/a.bin"]);
    late.run(&["get", "late/a.bin", net.w.join("late-back.bin").to_str().unwrap()]);
    assert_eq!(hash_file(&net.w.join("late-back.bin")), hash, "the late tenant's object reads back different");
    // Another account cannot write into that bucket.
    let e = refused(&net.w, &args(&net.t(&["put", src.to_str().unwrap(), "late/b.bin"])));
    assert!(e.contains("bucket \"late\" belongs to"), "{e}");

    // Earlier objects, read in a loop while the drill runs.
    let mut earlier = vec![];
    for i in 0..3u64 {
        let src = net.w.join(format!("earlier{i}.bin"));
        let hash = write_source(&src, 9, 100 + i);
        let key = format!("eu-only/earlier/{i}.bin");
        net.run(&["put", src.to_str().unwrap(), &key]);
        earlier.push((key, hash));
    }
    let holders_before: Vec<Vec<String>> = earlier.iter().map(|(k, _)| net.holders(k)).collect();

    let mib: usize = std::env::var("ARCHIPEL_DRILL_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let big = net.w.join("big.bin");
    let big_hash = write_source(&big, mib, 7);
    let known = on_disk(&nodes_dir);

    let stop = Arc::new(AtomicBool::new(false));
    let done_reads = Arc::new(AtomicU32::new(0));
    let reader = {
        let stop = stop.clone();
        let done_reads = done_reads.clone();
        let earlier = earlier.clone();
        let (w, targs) = (net.w.clone(), net.t(&[]));
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for (key, hash) in &earlier {
                    let out_file = w.join("read.bin");
                    let mut a =
                        vec!["get".to_string(), key.clone(), out_file.to_str().unwrap().into(), "--force".into()];
                    a.extend(targs.iter().cloned());
                    let out = archipel(&w, &args(&a));
                    assert!(out.status.success(), "read {reads} of {key} during the drill: {}", stderr(&out));
                    assert_eq!(hash_file(&out_file), *hash, "{key} read back different during the drill");
                    reads += 1;
                    done_reads.fetch_add(1, Ordering::SeqCst);
                }
            }
            reads
        })
    };

    // The drill: kill -9 us-east once the big PUT's first shards are on disk.
    let started = Instant::now();
    let mut put = net.put_child(&big, "eu-only/drill.bin");
    let deadline = Instant::now() + Duration::from_secs(60);
    while new_versions(&nodes_dir, &known).is_empty() {
        assert!(Instant::now() < deadline, "the big PUT never wrote a shard");
        std::thread::sleep(Duration::from_millis(20));
    }
    for name in &us_east {
        kill9(pid_of(name));
    }
    assert!(put.try_wait().unwrap().is_none(), "the PUT ended before us-east was killed: the drill tested nothing");
    let reads_at_kill = done_reads.load(Ordering::SeqCst);
    let out = wait_child(put, "drill PUT");
    let reads_during = done_reads.load(Ordering::SeqCst) - reads_at_kill;
    assert!(out.status.success(), "the PUT failed during the drill: {}", stderr(&out));
    eprintln!("drill: {mib} MiB PUT in {:.1} s with us-east killed", started.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("every read during the drill returned the right bytes");
    assert!(reads_during >= 3, "only {reads_during} reads ended between the kill and the PUT's end ({reads} in all)");

    let drill_holders = net.holders("eu-only/drill.bin");
    let late_holders = late.holders("late/a.bin");
    let back = net.w.join("drill-back.bin");
    net.run(&["get", "eu-only/drill.bin", back.to_str().unwrap()]);
    assert_eq!(hash_file(&back), big_hash, "the drill's object reads back different");
    std::fs::remove_file(&back).unwrap();

    // No repair for nodes that are still up: once us-east is down in finalized state and the
    // repair grace (10 s) has passed, every holder is where it was and no node counted a repair.
    net.wait_not_up(&us_east, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(14));
    for ((key, _), before) in earlier.iter().zip(&holders_before) {
        assert_eq!(&net.holders(key), before, "{key} was moved although all its holders are up");
    }
    assert_eq!(net.holders("eu-only/drill.bin"), drill_holders, "the drill's object was moved");
    assert_eq!(late.holders("late/a.bin"), late_holders, "late/a.bin was moved");
    let live: Vec<String> = all.iter().map(|n| n.0.clone()).filter(|n| !us_east.contains(n)).collect();
    let repairs: f64 = live.iter().map(|n| metric(&url_of(n), "storage_repairs_submitted")).sum();
    assert_eq!(repairs, 0.0, "a repair started although no holder is down");
    let fence_holds = |keys: &[String]| {
        for key in keys {
            let st = net.stat(key);
            for h in st["holders"].as_array().unwrap() {
                assert!(!outside.contains(h["name"].as_str().unwrap()), "{key} has a shard outside the fence: {h}");
            }
        }
        let on_disk = new_versions(&nodes_dir, &BTreeSet::new());
        for name in &outside {
            assert!(!on_disk.contains_key(name), "{name} (outside the fence) holds shards: {:?}", on_disk[name]);
        }
    };
    let mut keys: Vec<String> = earlier.iter().map(|(k, _)| k.clone()).collect();
    keys.push("eu-only/drill.bin".into());
    fence_holds(&keys);
    std::fs::remove_file(&big).unwrap();

    // Two holders killed -9 during a PUT (not validators: with us-east gone, one more validator
    // down would stop consensus). The client leaves them out and places the object again.
    let known = on_disk(&nodes_dir);
    let src = net.w.join("during.bin");
    let hash = write_source(&src, 64, 11);
    let mut put = net.put_child(&src, "eu-only/during.bin");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (victims, abandoned) = loop {
        let seen = new_versions(&nodes_dir, &known);
        let holders: Vec<String> = seen.keys().filter(|n| !validators.contains(n)).cloned().collect();
        if holders.len() >= 2 {
            break (holders[..2].to_vec(), seen.values().flatten().cloned().collect::<BTreeSet<String>>());
        }
        assert!(Instant::now() < deadline, "the PUT never wrote shards to two non-validators: {seen:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    for name in &victims {
        kill9(pid_of(name));
    }
    assert!(put.try_wait().unwrap().is_none(), "the PUT ended before its holders were killed");
    let out = wait_child(put, "PUT with two holders killed");
    assert!(out.status.success(), "the PUT did not survive two killed holders: {}", stderr(&out));
    assert!(stderr(&out).contains("placing the object again without node"), "{}", stderr(&out));
    let st = net.stat("eu-only/during.bin");
    let version = st["object"]["version"].as_str().unwrap().to_string();
    assert!(!abandoned.contains(&version), "the committed version is the abandoned attempt's");
    let holders = net.holders("eu-only/during.bin");
    assert!(victims.iter().all(|v| !holders.contains(v)), "a killed node holds a shard: {holders:?}");
    let back = net.w.join("during-back.bin");
    net.run(&["get", "eu-only/during.bin", back.to_str().unwrap()]);
    assert_eq!(hash_file(&back), hash, "the object put around two killed holders reads back different");
    assert_eq!(net.keys("eu-only").iter().filter(|k| *k == "during.bin").count(), 1);
    keys.push("eu-only/during.bin".into());
    fence_holds(&keys);

    // Six EU, non-US nodes are left for a 4+2 code: one more holder killed during a PUT leaves
    // no compliant node to take its shards. A clean error, and nothing half-stored lists.
    net.wait_not_up(&victims, Duration::from_secs(30));
    let known = on_disk(&nodes_dir);
    let put = net.put_child(&src, "eu-only/doomed.bin");
    let deadline = Instant::now() + Duration::from_secs(60);
    let victim = loop {
        let seen = new_versions(&nodes_dir, &known);
        if let Some(n) = seen.keys().find(|n| !validators.contains(n)) {
            break n.clone();
        }
        assert!(Instant::now() < deadline, "the PUT never wrote shards to a non-validator: {seen:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    kill9(pid_of(&victim));
    let out = wait_child(put, "PUT with no replacement left");
    assert!(!out.status.success(), "the PUT cannot have succeeded without six live compliant nodes");
    let e = stderr(&out);
    assert!(e.contains("cannot place the object") && e.contains("needs 6 nodes") && e.contains("5 of the"), "{e}");
    assert_eq!(e.matches("needs 6 nodes").count(), 1, "the cause is printed once: {e}");
    assert!(!net.keys("eu-only").contains(&"doomed.bin".to_string()), "a failed PUT lists as present");
    let missing = refused(&net.w, &args(&net.t(&["stat", "eu-only/doomed.bin"])));
    assert!(missing.contains("no object eu-only/doomed.bin"), "{missing}");
    // Everything stored before still reads back.
    net.run(&["get", "eu-only/during.bin", back.to_str().unwrap(), "--force"]);
    assert_eq!(hash_file(&back), hash);

    // The killed holder's shards have nowhere compliant to go (every EU, non-US node left holds
    // one of each segment already): past the repair grace they stay degraded, in the repair queue,
    // said by `archipel health` and by the nodes' degraded-objects gauge — and never moved out of
    // the fence.
    let urls: Vec<String> = (0..12).map(|i| devnet.node(i).1).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let h: serde_json::Value = serde_json::from_str(&net.run(&["health", "--json"])).unwrap();
        let b = h["buckets"].as_array().unwrap().iter().find(|b| b["bucket"] == "eu-only").cloned().unwrap();
        let gauge: f64 = urls.iter().map(|u| metric(u, "storage_degraded_objects")).sum();
        if b["degraded_segments"].as_u64() > Some(0) && b["repair_queue"].as_u64() > Some(0) && gauge > 0.0 {
            assert!(b["tolerates_losses"].as_i64() < Some(2), "fewer losses tolerated than m: {b}");
            break;
        }
        assert!(Instant::now() < deadline, "the stuck segments were never reported (health {b}, gauge {gauge})");
        std::thread::sleep(Duration::from_millis(500));
    }
    fence_holds(&keys);
    net.run(&["get", "eu-only/during.bin", back.to_str().unwrap(), "--force"]);
    assert_eq!(hash_file(&back), hash, "a degraded object still reads back");
}
