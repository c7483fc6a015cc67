//! The compute marketplace with real node processes on the default 12-node topology, some
//! providers with their own price floors and one Byzantine provider (n11 reports a wrong output
//! hash for every run): jobs posted with `archipel job submit`, bid on, awarded, run in child
//! processes and paid once; limits ending runs with typed reasons and nothing paid; `job why`
//! explaining a job nobody bids on; a 3-way job outvoting the Byzantine provider; and the
//! us-east-1 drill — every us-east node killed -9 while one job runs there (it moves to another
//! allowed provider by itself, paid once) and an EU-only job runs on, untouched.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// The default topology, with price floors that decide who wins: n11 (eu-ie, a US operator)
/// is the cheapest and lies; n06 (alpen-dc) is the cheapest EU, non-US provider; n12 (us-east)
/// the cheapest in us-east. The others ask 10.
fn topology(dir: &Path) -> std::path::PathBuf {
    let nodes = [
        ("n01", "eu-de", "DE", "rheinhost", "DE", "validator,storage,compute", ""),
        ("n02", "eu-fr", "FR", "seine-cloud", "FR", "validator,storage,compute", ""),
        ("n03", "eu-nl", "NL", "polder-net", "NL", "validator,storage,compute", ""),
        ("n04", "us-east", "US", "bigcloud", "US", "validator,storage,compute", ""),
        ("n05", "eu-de", "DE", "rheinhost", "DE", "storage,compute", ""),
        ("n06", "eu-de", "DE", "alpen-dc", "DE", "storage,compute", "price_floor_micro = 7\n"),
        ("n07", "eu-fr", "FR", "seine-cloud", "FR", "storage,compute", ""),
        ("n08", "eu-fr", "FR", "lyon-compute", "FR", "storage,compute", ""),
        ("n09", "eu-nl", "NL", "polder-net", "NL", "storage,compute", ""),
        ("n10", "eu-de", "DE", "bigcloud", "US", "storage,compute", ""),
        (
            "n11",
            "eu-ie",
            "IE",
            "orange-box",
            "US",
            "storage,compute",
            "price_floor_micro = 5\nfault_wrong_output = true\n",
        ),
        ("n12", "us-east", "US", "bigcloud", "US", "storage,compute", "price_floor_micro = 6\n"),
    ];
    let mut text = String::new();
    for (name, region, country, operator, jur, roles, compute) in nodes {
        let roles: Vec<String> = roles.split(',').map(|r| format!("{r:?}")).collect();
        text.push_str(&format!(
            "[[node]]\nname = {name:?}\nregion = {region:?}\ncountry = {country:?}\noperator = {operator:?}\n\
             operator_jurisdiction = {jur:?}\ncapacity = \"50GiB\"\nroles = [{}]\n",
            roles.join(", ")
        ));
        if !compute.is_empty() {
            text.push_str(&format!("[node.compute]\n{compute}"));
        }
    }
    let path = dir.join("topology.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const SPIN: &str = r#"(module (func (export "_start") (loop $l (br $l))))"#;
const MEMORY_BOMB: &str = r#"(module (memory 1)
  (func (export "_start")
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable))"#;
const FOREIGN_IMPORT: &str = r#"(module (import "env" "open_socket" (func)) (func (export "_start")))"#;
/// Writes 64 KiB to stdout, forever.
const FLOOD: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 65536))
    (loop $more
      (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $more))))"#;

struct Net {
    w: std::path::PathBuf,
    key: String,
    nodes: String,
    node: String,
}

impl Net {
    fn cli(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--key".into(), self.key.clone(), "--node".into(), self.nodes.clone()]);
        v
    }

    /// Posts a job; its id.
    fn submit(&self, extra: &[&str]) -> String {
        let mut a = vec!["job", "submit"];
        a.extend_from_slice(extra);
        run(&self.w, &args(&self.cli(&a))).trim().to_string()
    }

    fn job(&self, id: &str) -> serde_json::Value {
        let v: serde_json::Value =
            rt().block_on(archipel_node::client::ApiClient::new(&self.node).get(&format!("/v1/jobs/{id}"))).unwrap();
        v["job"].clone()
    }

    /// Waits until job `id` ended; returns it.
    fn ended(&self, id: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let j = self.job(id);
            if !j["ended"].is_null() {
                return j;
            }
            assert!(Instant::now() < deadline, "job {id} did not end within {within:?}: {j}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn balance(&self, who: &str) -> u64 {
        let v: serde_json::Value = rt()
            .block_on(archipel_node::client::ApiClient::new(&self.node).get(&format!("/v1/accounts/{who}")))
            .unwrap();
        v["balance_micro"].as_u64().unwrap()
    }
}

fn leaseholders(job: &serde_json::Value) -> Vec<String> {
    job["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["bid"]["provider"]["node"].as_str().unwrap().to_string())
        .collect()
}

fn paid(job: &serde_json::Value) -> Vec<String> {
    job["paid"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect()
}

#[test]
fn jobs_are_bid_on_run_verified_paid_once_and_survive_the_loss_of_us_east() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let topo = topology(w);
    let devnet =
        Devnet::start(w, &["--base-ip", "127.0.94.2", "--base-port", "27600", "--topology", topo.to_str().unwrap()]);
    let dir = devnet.dir.clone();
    let urls: Vec<String> = (0..12).map(|i| devnet.node(i).1).collect();
    let names: Vec<String> = (0..12).map(|i| devnet.node(i).0).collect();
    let id_of = |name: &str| devnet.id(names.iter().position(|n| n == name).unwrap()).to_string();
    let net = Net {
        w: w.to_path_buf(),
        key: format!("{}/tenant.key", dir.display()),
        nodes: urls.join(","),
        node: urls[0].clone(),
    };
    let tenant = archipel_crypto::Identity::load(Path::new(&net.key)).unwrap().node_id().to_string();
    wait_storage_up(&urls[0], 12);
    let wasm = |name: &str| format!("{}/examples/jobs/{name}.wasm", env!("CARGO_MANIFEST_DIR"));

    // 1. A word count, EU only and no US operator: the cheapest such provider (n06) wins, runs
    // it and is paid its bid once; the output is what the same module gives here.
    let notes = w.join("notes.txt");
    std::fs::write(&notes, "to be or not to be\nthat is the question\n".repeat(100)).unwrap();
    let local = run(w, &["job", "run-local", &wasm("wordcount"), "--stdin", notes.to_str().unwrap()]);
    let before = (net.balance(&tenant), net.balance(&id_of("n06")));
    let out = w.join("count.txt");
    let started = Instant::now();
    run(
        w,
        &args(&net.cli(&[
            "job",
            "submit",
            &wasm("wordcount"),
            "--input",
            notes.to_str().unwrap(),
            "--max-price",
            "100",
            "--region",
            "eu",
            "--deny-jurisdictions",
            "US",
            "--wait",
            "--output",
            out.to_str().unwrap(),
        ])),
    );
    eprintln!("word count job: submitted, run and fetched in {:?}", started.elapsed());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), local, "the job's output is the module's");
    let list: serde_json::Value =
        rt().block_on(archipel_node::client::ApiClient::new(&net.node).get("/v1/jobs")).unwrap();
    let first = list["recent"][0].clone();
    assert_eq!(paid(&first), vec![id_of("n06")], "{first}");
    assert_eq!(first["escrow_micro"], 0);
    let after = (net.balance(&tenant), net.balance(&id_of("n06")));
    assert!(after.1 > before.1, "the provider was paid: {before:?} → {after:?}");

    // 2. Limits end runs with typed reasons; nothing is paid, the escrow comes back (the tenant
    // pays only its fees), and the providers keep bidding.
    let modules = [
        ("spin", SPIN, "cpu_limit"),
        ("bomb", MEMORY_BOMB, "memory_limit"),
        ("socket", FOREIGN_IMPORT, "unsupported_import"),
        ("flood", FLOOD, "output_limit"),
    ];
    let mut ids = Vec::new();
    for (name, text, _) in modules {
        let f = w.join(format!("{name}.wat"));
        std::fs::write(&f, text).unwrap();
        ids.push(net.submit(&[
            f.to_str().unwrap(),
            "--max-price",
            "50",
            "--region",
            "eu",
            "--deny-jurisdictions",
            "US",
            "--cpu",
            "2s",
            "--timeout",
            "5s",
            "--memory",
            "16MiB",
            "--max-output",
            "1MiB",
        ]));
    }
    let junk = w.join("junk.wasm");
    std::fs::write(&junk, b"\0asm this is not a module").unwrap();
    ids.push(net.submit(&[
        junk.to_str().unwrap(),
        "--max-price",
        "50",
        "--region",
        "eu",
        "--deny-jurisdictions",
        "US",
    ]));
    let reasons = modules.iter().map(|m| m.2).chain(["invalid_module"]);
    for (id, reason) in ids.iter().zip(reasons) {
        let j = net.ended(id, Duration::from_secs(60));
        let why = j["ended"]["why"].as_str().unwrap_or_default();
        assert_eq!(j["ended"]["status"], "refunded", "{j}");
        assert!(why.contains(reason), "job {id}: {why} (wanted {reason})");
        assert!(paid(&j).is_empty(), "nothing paid: {j}");
        assert_eq!(j["escrow_micro"], 0);
    }

    // 3. Nobody can take it: `job why` says so, with the numbers.
    let outside = net.submit(&[&wasm("wordcount"), "--max-price", "50", "--region", "ap"]);
    let cheap = net.submit(&[&wasm("wordcount"), "--max-price", "2", "--region", "eu"]);
    std::thread::sleep(Duration::from_secs(2));
    let why = run(w, &args(&net.cli(&["job", "why", &outside])));
    assert!(why.contains("none of the 12 providers is in regions [ap]"), "{why}");
    let why = run(w, &args(&net.cli(&["job", "why", &cheap])));
    assert!(why.contains("have a price floor above your max price 2") && why.contains("lowest floor 5"), "{why}");
    for id in [&outside, &cheap] {
        run(w, &args(&net.cli(&["job", "cancel", id])));
        assert_eq!(net.job(id)["ended"]["status"], "cancelled");
    }

    // 4. Three runs, one Byzantine provider (n11, the cheapest in the EU, reporting a wrong
    // hash): the majority is accepted and paid, n11 is outvoted, loses its bond, is not paid.
    let chain = net.submit(&[
        &wasm("sha256chain"),
        "--arg",
        "20000",
        "--arg",
        "seed",
        "--max-price",
        "100",
        "--region",
        "eu",
        "--redundancy",
        "3",
    ]);
    let j = net.ended(&chain, Duration::from_secs(90));
    assert_eq!(j["ended"]["status"], "accepted", "{j}");
    let liar = id_of("n11");
    assert!(leaseholders(&j).contains(&liar), "the cheapest provider won a run: {j}");
    assert!(!paid(&j).contains(&liar) && paid(&j).len() == 2, "the two honest runs are paid: {j}");
    let want =
        run(w, &["job", "run-local", &wasm("sha256chain"), "--arg", "20000", "--arg", "seed", "--canonical-nans"]);
    let got = run(w, &args(&net.cli(&["job", "output", &chain])));
    assert_eq!(got, want, "the tenant gets the majority's output");
    let providers: serde_json::Value =
        rt().block_on(archipel_node::client::ApiClient::new(&net.node).get("/v1/providers")).unwrap();
    let record =
        providers["providers"].as_array().unwrap().iter().find(|p| p["node"] == liar.as_str()).unwrap()["record"]
            .clone();
    assert!(record["penalized"].as_u64().unwrap() >= 1, "{record}");

    // 5. The us-east-1 drill. One job may run in us-east or eu-nl and goes to us-east (n12 asks
    // least there); one is EU-only, no US operator. Every us-east node (n04, a
    // validator, and n12) is killed -9 while both run: the first moves to another allowed
    // provider by itself and is paid once; the second runs on untouched.
    let long = ["--arg", "12000000", "--arg", "drill", "--max-price", "100", "--cpu", "120s", "--timeout", "120s"];
    let mut a = vec![wasm("sha256chain")];
    a.extend(long.iter().map(|s| s.to_string()));
    let us: Vec<String> = a.iter().cloned().chain(["--region".into(), "us-east,eu-nl".into()]).collect();
    let eu: Vec<String> =
        a.iter().cloned().chain(["--region".into(), "eu".into(), "--deny-jurisdictions".into(), "US".into()]).collect();
    let moving = net.submit(&args(&us));
    let staying = net.submit(&args(&eu));
    let us_east = [id_of("n04"), id_of("n12")];
    let deadline = Instant::now() + Duration::from_secs(30);
    let eu_provider = loop {
        let (m, s) = (net.job(&moving), net.job(&staying));
        let (on_m, on_s) = (leaseholders(&m), leaseholders(&s));
        if on_m.len() == 1 && on_s.len() == 1 {
            assert!(us_east.contains(&on_m[0]), "the cheapest allowed provider is in us-east: {m}");
            assert!(!us_east.contains(&on_s[0]), "{s}");
            break on_s[0].clone();
        }
        assert!(Instant::now() < deadline, "not awarded: {m}\n{s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Running, not just awarded.
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = Instant::now();
    for name in ["n04", "n12"] {
        kill9(devnet.node(names.iter().position(|n| n == name).unwrap()).2);
    }
    let ask = urls[0].clone();
    let failover = loop {
        let m = net.job(&moving);
        let holders = leaseholders(&m);
        // (A standby on n04, dead too, may take the lease first and lapse in turn.)
        if !holders.is_empty() && !holders.iter().any(|h| us_east.contains(h)) {
            break killed_at.elapsed();
        }
        assert!(killed_at.elapsed() < Duration::from_secs(30), "the job never left n12: {m}");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("failover: a new provider held the lease {failover:?} after the kill (asked {ask})");
    let m = net.ended(&moving, Duration::from_secs(180));
    let s = net.ended(&staying, Duration::from_secs(180));
    assert_eq!(m["ended"]["status"], "accepted", "{m}");
    assert_eq!(s["ended"]["status"], "accepted", "{s}");
    assert_eq!(paid(&s), vec![eu_provider], "the EU job ran on where it was: {s}");
    let movers = paid(&m);
    assert_eq!(movers.len(), 1, "paid exactly once: {m}");
    assert!(!us_east.contains(&movers[0]), "{m}");
    assert!(m["excluded"].as_array().unwrap().iter().any(|e| us_east.iter().any(|u| e == u.as_str())), "{m}");
    // Both accepted the same output: the chain of SHA-256 is the same wherever it runs.
    assert_eq!(m["ended"]["outcome"], s["ended"]["outcome"]);
}
