//! More jobs than the providers have slots, with real processes: two providers of one slot each
//! get four CPU-bound jobs at once. No provider ever runs more than its slot (a sealed or
//! standing-by bid holds the slot too, so the loser of an auction stands by rather than bidding
//! elsewhere); the jobs they cannot take wait in further auction rounds (the recorded declines
//! say "no free capacity", as `archipel job why` shows) and run once a slot frees; every job ends
//! accepted and is paid once.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Six storage nodes (a 4+2 jobs bucket needs six), four of them validators; only n05 and n06
/// are compute providers, with one slot each.
fn topology(dir: &Path) -> std::path::PathBuf {
    let mut text = String::new();
    for (i, region) in ["eu-de", "eu-fr", "eu-nl", "eu-de", "eu-fr", "eu-nl"].iter().enumerate() {
        let n = i + 1;
        let roles = match n {
            1..=4 => r#"["validator", "storage"]"#,
            _ => r#"["storage", "compute"]"#,
        };
        text.push_str(&format!(
            "[[node]]\nname = \"n0{n}\"\nregion = {region:?}\ncountry = {:?}\noperator = \"op{n}\"\n\
             operator_jurisdiction = \"DE\"\ncapacity = \"20GiB\"\nroles = {roles}\n",
            region[3..].to_uppercase()
        ));
        if n > 4 {
            text.push_str("[node.compute]\nslots = 1\n");
        }
    }
    let path = dir.join("topology.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs (unsealed leases of open jobs) per provider, from finalized state.
fn running(node: &str) -> BTreeMap<String, usize> {
    let v: serde_json::Value = rt().block_on(archipel_node::client::ApiClient::new(node).get("/v1/jobs")).unwrap();
    let mut out = BTreeMap::new();
    for j in v["open"].as_array().unwrap() {
        for l in j["leases"].as_array().unwrap().iter().filter(|l| l["sealed"].is_null()) {
            *out.entry(l["bid"]["provider"]["node"].as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    out
}

#[test]
fn more_jobs_than_slots_wait_for_a_free_slot_and_no_provider_is_overcommitted() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let topo = topology(w);
    let devnet =
        Devnet::start(w, &["--base-ip", "127.0.98.2", "--base-port", "28400", "--topology", topo.to_str().unwrap()]);
    let urls: Vec<String> = (0..6).map(|i| devnet.node(i).1).collect();
    let node = urls[0].clone();
    wait_storage_up(&node, 6);
    let key = format!("{}/tenant.key", devnet.dir.display());
    let cli = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--key".into(), key.clone(), "--node".into(), urls.join(",")]);
        v
    };
    let module = format!("{}/examples/jobs/sha256chain.wasm", env!("CARGO_MANIFEST_DIR"));

    // Four jobs of a few seconds of CPU each, posted at once, for two slots.
    let ids: Vec<String> = (0..4)
        .map(|i| {
            let seed = format!("seed-{i}");
            let a = ["job", "submit", &module, "--arg", "3000000", "--arg", &seed, "--max-price", "100"];
            run(w, &args(&cli(&[&a[..], &["--bid-window", "2s", "--timeout", "120s"]].concat()))).trim().to_string()
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(240);
    let mut most: BTreeMap<String, usize> = BTreeMap::new();
    let mut said_no_capacity = false;
    loop {
        for (p, n) in running(&node) {
            let m = most.entry(p).or_default();
            *m = (*m).max(n);
        }
        assert!(most.values().all(|n| *n <= 1), "a provider of one slot ran more: {most:?}");
        let jobs: Vec<serde_json::Value> = ids.iter().map(|id| finalized_job(&node, id)).collect();
        // A job waiting for a round with no free provider says why.
        if !said_no_capacity
            && let Some(waiting) =
                jobs.iter().position(|j| j["ended"].is_null() && j["leases"].as_array().is_some_and(Vec::is_empty))
        {
            let why = archipel(w, &args(&cli(&["job", "why", &ids[waiting], "--json"])));
            said_no_capacity |= stdout(&why).contains("no_capacity");
        }
        if jobs.iter().all(|j| !j["ended"].is_null()) {
            for j in &jobs {
                assert_eq!(j["ended"]["status"], "accepted", "every job ran in the end: {j}");
                assert_eq!(j["paid"].as_array().map(Vec::len), Some(1), "paid once: {j}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "not every job ended within 240 s: {jobs:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!most.is_empty(), "no run was ever seen");
    assert!(said_no_capacity, "a waiting job's `job why` never named the full providers");
}
