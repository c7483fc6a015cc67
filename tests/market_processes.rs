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
/// the cheapest in us-east; n03 (eu-nl) the next. The others ask 10.
fn topology(dir: &Path) -> std::path::PathBuf {
    let nodes = [
        ("n01", "eu-de", "DE", "rheinhost", "DE", "validator,storage,compute", ""),
        ("n02", "eu-fr", "FR", "seine-cloud", "FR", "validator,storage,compute", ""),
        ("n03", "eu-nl", "NL", "polder-net", "NL", "validator,storage,compute", "price_floor_micro = 8\n"),
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
        ("n12", "us-east", "US", "bigcloud", "US", "storage,compute", "price_floor_micro = 5\n"),
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
        finalized_job(&self.node, id)
    }

    /// Checks that no provider runs more jobs at once than its 2 slots (the devnet's default):
    /// its sealed and standing-by bids count as busy, so winning them all never overcommits it.
    fn within_slots(&self) {
        let v: serde_json::Value =
            rt().block_on(archipel_node::client::ApiClient::new(&self.node).get("/v1/jobs")).unwrap();
        let mut running: std::collections::BTreeMap<String, usize> = Default::default();
        for j in v["open"].as_array().unwrap() {
            for l in j["leases"].as_array().unwrap().iter().filter(|l| l["sealed"].is_null()) {
                *running.entry(l["bid"]["provider"]["node"].as_str().unwrap().to_string()).or_default() += 1;
            }
        }
        assert!(running.values().all(|n| *n <= 2), "a provider holds more leases than its slots: {running:?}");
    }

    /// Waits until job `id` ended (checking meanwhile that no provider is overcommitted);
    /// returns it.
    fn ended(&self, id: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            self.within_slots();
            let j = self.job(id);
            if !j["ended"].is_null() {
                return j;
            }
            assert!(Instant::now() < deadline, "job {id} did not end within {within:?}: {j}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `who`'s balance and the fees it paid so far (its next nonce: every transaction pays the
    /// devnet's fee of 1).
    /// `who`'s balance with the deposits its buckets and objects lock counted in (storing a job's
    /// module or input locks one per new key: that is storage's, not the market's), and nonce.
    fn account(&self, who: &str) -> (i64, i64) {
        let client = archipel_node::client::ApiClient::new(&self.node);
        let v: serde_json::Value = rt().block_on(client.get(&format!("/v1/accounts/{who}"))).unwrap();
        let genesis = Path::new(&self.key).with_file_name("genesis.json");
        let genesis: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(genesis).unwrap()).unwrap();
        let deposit = genesis["ledger"]["entry_deposit_micro"].as_i64().unwrap_or(0);
        let buckets: serde_json::Value = rt().block_on(client.get("/v1/buckets")).unwrap();
        let entries: i64 = buckets["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["owner"] == who)
            .map(|b| 1 + b["objects"].as_i64().unwrap())
            .sum();
        (v["balance_micro"].as_i64().unwrap() + deposit * entries, v["nonce"].as_i64().unwrap())
    }

    /// How `who`'s balance moved since `before`, fees put back: what it was paid or refunded.
    fn moved(&self, who: &str, before: (i64, i64)) -> i64 {
        let now = self.account(who);
        (now.0 - before.0) + (now.1 - before.1)
    }

    /// `who`'s record: runs accepted and penalties.
    fn record(&self, who: &str) -> (u64, u64) {
        let v: serde_json::Value =
            rt().block_on(archipel_node::client::ApiClient::new(&self.node).get("/v1/providers")).unwrap();
        let p = v["providers"].as_array().unwrap().iter().find(|p| p["node"] == who).unwrap().clone();
        (p["record"]["accepted"].as_u64().unwrap(), p["record"]["penalized"].as_u64().unwrap())
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
    let wasm_chain = wasm("sha256chain");

    // Long enough for every provider to seal a bid on a slow machine: who wins is asserted.
    let window = ["--bid-window", "4s"];

    // 1. A word count, EU only and no US operator, described by a spec file (the TOML `job
    // run-local` reads, with the market's fields; its input is a path relative to it): the
    // cheapest such provider (n06) wins, runs it and is paid its bid once; the output is what the
    // same module gives here.
    let notes = w.join("notes.txt");
    std::fs::write(&notes, "to be or not to be\nthat is the question\n".repeat(100)).unwrap();
    let local = run(w, &["job", "run-local", &wasm("wordcount"), "--stdin", notes.to_str().unwrap()]);
    // The spec and its files in their own directory, the command run from another.
    let specs = w.join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::copy(wasm("wordcount"), specs.join("wc.wasm")).unwrap();
    std::fs::copy(&notes, specs.join("notes.txt")).unwrap();
    let spec = specs.join("count.toml");
    std::fs::write(
        &spec,
        format!(
            "module = \"wc.wasm\"\ninputs = [\"notes.txt\"]\nmax_price = 100\nredundancy = 1\nregions = [\"eu\"]\n\
             deny_jurisdictions = [\"US\"]\nbid_window = \"{}\"\n[limits]\ncpu = \"30s\"\nmemory = \"128MiB\"\n",
            window[1]
        ),
    )
    .unwrap();
    // A missing input is named with the path tried, before anything is stored — even with a file
    // of that name in the directory the command runs in (the spec's paths are its own).
    std::fs::write(w.join("nothes.txt"), "not the spec's\n").unwrap();
    let broken = specs.join("broken.toml");
    std::fs::write(&broken, "module = \"wc.wasm\"\ninputs = [\"nothes.txt\"]\nmax_price = 100\n").unwrap();
    let e = refused(w, &args(&net.cli(&["job", "submit", "--spec", broken.to_str().unwrap()])));
    assert!(e.contains(&specs.join("nothes.txt").display().to_string()), "{e}");
    // A spec cannot reach files outside its directory (it may be someone else's, and the job
    // would publish the file's data key): not by `..`, not by an absolute path.
    let notes_path = notes.to_str().unwrap();
    for (input, said) in [("../nothes.txt", "leads outside"), (notes_path, "relative to it")] {
        std::fs::write(&broken, format!("module = \"wc.wasm\"\ninputs = [{input:?}]\nmax_price = 100\n")).unwrap();
        let e = refused(w, &args(&net.cli(&["job", "submit", "--spec", broken.to_str().unwrap()])));
        assert!(e.contains(said), "{input}: {e}");
    }
    let (t0, p0) = (net.account(&tenant), net.account(&id_of("n06")));
    let out = w.join("count.txt");
    let started = Instant::now();
    // A flag overrides the spec's field.
    let spec_arg = spec.to_str().unwrap();
    let a =
        ["job", "submit", "--spec", spec_arg, "--cpu", "20s", "--wait", "--output", out.to_str().unwrap(), "--json"];
    let done: serde_json::Value = serde_json::from_str(&run(w, &args(&net.cli(&a)))).unwrap();
    eprintln!("word count job: submitted, run and fetched in {:?}", started.elapsed());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), local, "the job's output is the module's");
    let list: serde_json::Value =
        rt().block_on(archipel_node::client::ApiClient::new(&net.node).get("/v1/jobs")).unwrap();
    let first = list["recent"][0].clone();
    assert_eq!(paid(&first), vec![id_of("n06")], "{first}");
    // The spec file's fields are the posted job's; flags given as well override it.
    let id = done["job"].as_str().unwrap().to_string();
    let status: serde_json::Value =
        serde_json::from_str(&run(w, &args(&net.cli(&["job", "status", &id, "--json"])))).unwrap();
    let posted = &status["job"]["spec"];
    assert_eq!(posted["max_price_micro"], 100, "{posted}");
    assert_eq!(posted["limits"]["cpu_ms"], 20_000, "--cpu over the spec's 30s: {posted}");
    assert_eq!(posted["limits"]["memory_bytes"], 128 << 20, "{posted}");
    assert_eq!(posted["bid_window_ms"], 4_000, "{posted}");
    assert_eq!(posted["inputs"].as_array().map(Vec::len), Some(1), "{posted}");
    // The input as stored: later jobs name it BUCKET/KEY instead of uploading it again.
    let stored_input =
        format!("{}/{}", posted["inputs"][0]["bucket"].as_str().unwrap(), posted["inputs"][0]["key"].as_str().unwrap());
    let fence = posted["geofence"].to_string();
    assert!(fence.contains("\"eu\"") && fence.contains("\"US\""), "{posted}");
    let text = run(w, &args(&net.cli(&["job", "status", &id])));
    assert!(text.contains("accepted") && text.contains(&id_of("n06")[..8]), "{text}");
    let logs = run(w, &args(&net.cli(&["job", "logs", &id])));
    assert!(logs.contains(&id_of("n06")[..8]), "the log of n06's run: {logs}");
    let market: serde_json::Value = serde_json::from_str(&run(w, &args(&net.cli(&["market", "--json"])))).unwrap();
    let index = market["index"].as_array().unwrap();
    assert!(
        index.iter().any(|r| r["region"] == "eu-de" && r["median_price_micro"] == 7 && r["runs"] == 1),
        "the index counts n06's accepted run at its price: {market}"
    );
    // A spec without a price is refused naming both ways to give one; a misspelt field by name.
    let unpriced = w.join("unpriced.json");
    std::fs::write(&unpriced, format!("{{\"module\": {:?}}}", wasm("wordcount"))).unwrap();
    let e = refused(w, &args(&net.cli(&["job", "submit", "--spec", unpriced.to_str().unwrap()])));
    assert!(e.contains("--max-price") && e.contains("max_price"), "{e}");
    let typo = w.join("typo.toml");
    std::fs::write(&typo, "module = \"x.wasm\"\nmax_prise = 5\n").unwrap();
    let e = refused(w, &args(&net.cli(&["job", "submit", "--spec", typo.to_str().unwrap()])));
    assert!(e.contains("max_prise"), "an unknown field is refused by name: {e}");
    assert_eq!(first["escrow_micro"], 0);
    // Exactly once: the tenant paid n06's bid of 7 (and its fees), n06 got 7 (less its fees).
    assert_eq!(net.moved(&tenant, t0), -7, "the tenant paid the winning bid once");
    assert_eq!(net.moved(&id_of("n06"), p0), 7, "the provider was paid its bid once");

    // 2. Limits end runs with typed reasons, and nobody is penalized; the providers keep bidding
    // (step 3). A failure is refunded (the tenant pays only its fees) — except the job's own CPU
    // limit, which a second provider confirms and is then paid for: a tenant pays for loops.
    let t0 = net.account(&tenant);
    let records: Vec<(u64, u64)> = names.iter().map(|n| net.record(&id_of(n))).collect();
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
        // The CPU limit ends the loop well before the wall time, however busy the machine.
        ids.push(net.submit(&[
            f.to_str().unwrap(),
            "--input",
            &stored_input,
            "--max-price",
            "50",
            "--region",
            "eu",
            "--deny-jurisdictions",
            "US",
            "--cpu",
            "2s",
            "--timeout",
            "60s",
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
    let mut spin_price = 0;
    for (id, reason) in ids.iter().zip(reasons) {
        let j = net.ended(id, Duration::from_secs(120));
        if reason != "invalid_module" {
            let input = &j["spec"]["inputs"][0];
            assert_eq!(
                format!("{}/{}", input["bucket"].as_str().unwrap(), input["key"].as_str().unwrap()),
                stored_input
            );
            assert_eq!(input["version"], posted["inputs"][0]["version"], "the stored version: {j}");
        }
        let ends: Vec<&str> =
            j["leases"].as_array().unwrap().iter().filter_map(|l| l["result"]["end"].as_str()).collect();
        assert_eq!(ends, [reason], "the run's own typed end: {j}");
        assert_eq!(j["escrow_micro"], 0);
        if reason == "cpu_limit" {
            assert_eq!(j["ended"]["status"], "accepted", "{j}");
            assert_eq!(j["ended"]["outcome"]["end"], reason, "{j}");
            assert_eq!(j["limit_reruns"], 1, "confirmed by a second provider: {j}");
            // The first provider's claim is kept with its bond until the second bore it out.
            let earlier = j["earlier"].as_array().unwrap();
            assert_eq!((earlier.len(), &earlier[0]["result"]["end"]), (1, &serde_json::json!(reason)), "{j}");
            let claimant = &earlier[0]["bid"]["provider"]["node"];
            assert_eq!(j["limit_claimants"].as_array().unwrap(), std::slice::from_ref(claimant), "{j}");
            assert_eq!(j["bonds"], serde_json::json!({}), "every bond given back or burned at the end: {j}");
            let text = run(w, &args(&net.cli(&["job", "status", id])));
            assert!(text.contains("accepted a failure: cpu_limit, on two rounds"), "{text}");
            let confirmer = j["leases"][0]["bid"]["provider"]["node"].as_str().unwrap();
            assert_eq!(paid(&j), [confirmer], "the confirming run is paid: {j}");
            spin_price = j["leases"][0]["bid"]["price_micro"].as_i64().unwrap();
            continue;
        }
        let why = j["ended"]["why"].as_str().unwrap_or_default();
        assert_eq!(j["ended"]["status"], "refunded", "{j}");
        assert!(why.contains(reason), "job {id}: {why} (wanted {reason})");
        assert!(paid(&j).is_empty(), "nothing paid: {j}");
    }
    assert!(spin_price > 0);
    assert_eq!(net.moved(&tenant, t0), -spin_price, "four escrows given back, the loop's run paid: besides fees");
    // Each run that ended with the job's typed failure got its bond back (no dissent): a job's
    // burns come only from leases that lapsed or bids not revealed (on a loaded machine, a
    // provider may miss a heartbeat or a reveal), never from the failure itself.
    for id in &ids {
        let j = net.job(id);
        let failed: Vec<String> = j["leases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| !l["result"].is_null())
            .map(|l| l["bid"]["provider"]["node"].as_str().unwrap().to_string())
            .collect();
        assert!(!failed.is_empty(), "someone ran job {id} to its typed end: {j}");
        let excluded = j["excluded"].as_array().unwrap();
        assert!(failed.iter().all(|p| !excluded.iter().any(|e| e == p.as_str())), "{j}");
    }
    let after: Vec<(u64, u64)> = names.iter().map(|n| net.record(&id_of(n))).collect();
    eprintln!("records before and after the failing jobs (accepted, penalized): {records:?} → {after:?}");

    // 3. Nobody can take it: `job why` says so, with the numbers. Each of the 10 EU providers
    // (the ones that just ran failing jobs too) records why it does not bid: it still bids.
    // Long bid windows: 16 empty rounds refund a job, and these must stay open until cancelled.
    let outside = net.submit(&[&wasm("wordcount"), "--max-price", "50", "--region", "ap", "--bid-window", "5s"]);
    let cheap = net.submit(&[&wasm("wordcount"), "--max-price", "2", "--region", "eu", "--bid-window", "5s"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let why = run(w, &args(&net.cli(&["job", "why", &cheap])));
        if why.contains("10 have a price floor above your max price 2 (lowest floor 5") {
            break;
        }
        assert!(Instant::now() < deadline, "{why}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let why = run(w, &args(&net.cli(&["job", "why", &outside])));
    assert!(why.contains("none of the 12 providers is in regions [ap]"), "{why}");
    let declined: serde_json::Value = rt()
        .block_on(archipel_node::client::ApiClient::new(&urls[0]).get(&format!("/v1/jobs/{outside}/declined")))
        .unwrap();
    assert_eq!(declined["decline"]["reason"], "geofence", "recorded by the provider itself: {declined}");
    for id in [&outside, &cheap] {
        let t0 = net.account(&tenant);
        run(w, &args(&net.cli(&["job", "cancel", id])));
        // Final on the node the CLI used; the node read here may be a block behind.
        let deadline = Instant::now() + Duration::from_secs(10);
        while net.job(id)["ended"]["status"].is_null() {
            assert!(Instant::now() < deadline, "the cancel never showed: {}", net.job(id));
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(net.job(id)["ended"]["status"], "cancelled");
        assert_eq!(net.moved(&tenant, t0), if id == &outside { 50 } else { 2 }, "the escrow came back");
    }

    // 4. Three runs, one Byzantine provider (n11, the cheapest in the EU, reporting a wrong
    // hash): the majority is accepted and paid, n11 is outvoted, loses its bond (10), is not paid.
    let liar = id_of("n11");
    let (liar0, liar_record) = (net.account(&liar), net.record(&liar));
    let mut a = vec![&wasm_chain as &str, "--arg", "20000", "--arg", "seed", "--max-price", "100"];
    a.extend_from_slice(&["--region", "eu", "--redundancy", "3"]);
    a.extend_from_slice(&window);
    let chain = net.submit(&a);
    let j = net.ended(&chain, Duration::from_secs(120));
    assert_eq!(j["ended"]["status"], "accepted", "{j}");
    assert!(leaseholders(&j).contains(&liar), "the cheapest provider won a run: {j}");
    let honest: Vec<String> = leaseholders(&j).into_iter().filter(|p| *p != liar).collect();
    assert_eq!(
        paid(&j),
        {
            let mut h = honest.clone();
            h.sort();
            h
        },
        "the two honest runs are paid: {j}"
    );
    assert_eq!(net.moved(&liar, liar0), -10, "the liar lost its bond and was paid nothing");
    assert_eq!(net.record(&liar), (liar_record.0, liar_record.1 + 1), "one penalty for the outvoted run");
    let want =
        run(w, &["job", "run-local", &wasm("sha256chain"), "--arg", "20000", "--arg", "seed", "--canonical-nans"]);
    let got = run(w, &args(&net.cli(&["job", "output", &chain])));
    assert_eq!(got, want, "the tenant gets the majority's output");

    // 5. The us-east-1 drill. One job may run in us-east or eu-nl and goes to n12 (the cheapest
    // there; n03 or n09 in eu-nl is next and stands by); one is EU-only, no US operator. Every us-east
    // node (n04, a validator, and n12) is killed -9 while both run: the first moves to the standby by
    // itself within a lease TTL and a block, and is paid once; the second runs on untouched.
    let long = ["--arg", "12000000", "--arg", "drill", "--max-price", "100", "--cpu", "300s", "--timeout", "300s"];
    let mut a = vec![wasm("sha256chain")];
    a.extend(long.iter().chain(&window).map(|s| s.to_string()));
    let us: Vec<String> = a.iter().cloned().chain(["--region".into(), "us-east,eu-nl".into()]).collect();
    let eu: Vec<String> =
        a.iter().cloned().chain(["--region".into(), "eu".into(), "--deny-jurisdictions".into(), "US".into()]).collect();
    // The standby is the better of the two eu-nl providers by the winner rule, price over
    // reliability ((accepted + 1) / (accepted + penalized + 2)): n03 asks 8, n09 10, and which
    // of them ran the earlier steps' jobs (reruns go to providers not tried yet) depends on the
    // order bids came in. Their records do not change while this job is auctioned.
    let score = |name: &str, price: u64| {
        let (accepted, penalized) = net.record(&id_of(name));
        let record = archipel_market::Record { accepted: accepted as u32, penalized: penalized as u32 };
        price * 1_000_000 / record.reliability_ppm()
    };
    let (n03, n09) = (score("n03", 8), score("n09", 10));
    let standby_name = if n03 <= n09 { "n03" } else { "n09" };
    let moving = net.submit(&args(&us));
    let staying = net.submit(&args(&eu));
    let deadline = Instant::now() + Duration::from_secs(60);
    let eu_provider = loop {
        let (m, s) = (net.job(&moving), net.job(&staying));
        let (on_m, on_s) = (leaseholders(&m), leaseholders(&s));
        if on_m.len() == 1 && on_s.len() == 1 {
            assert_eq!(on_m, [id_of("n12")], "the cheapest allowed provider is n12: {m}");
            let standby: Vec<&str> =
                m["standby"].as_array().unwrap().iter().filter_map(|b| b["provider"]["node"].as_str()).collect();
            let records = (net.record(&id_of("n03")), net.record(&id_of("n09")));
            assert_eq!(standby, [id_of(standby_name)], "records n03/n09 {records:?}: {m}");
            assert!(!on_s.contains(&id_of("n12")) && !on_s.contains(&id_of("n04")), "{s}");
            break on_s[0].clone();
        }
        assert!(Instant::now() < deadline, "not awarded: {m}\n{s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Running on n12, not just awarded.
    let n12 = names.iter().position(|n| n == "n12").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rt()
        .block_on(
            archipel_node::client::ApiClient::new(&urls[n12])
                .get::<serde_json::Value>(&format!("/v1/jobs/{moving}/run")),
        )
        .map_or(true, |r| r["phase"] != "running")
    {
        assert!(Instant::now() < deadline, "n12 never ran the job");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (before_kill, n12_0) = (net.job(&moving), net.account(&id_of("n12")));
    let mut last_beat = before_kill["leases"][0]["last_beat_ms"].as_u64().unwrap();
    let head_at_kill: serde_json::Value =
        rt().block_on(archipel_node::client::ApiClient::new(&net.node).get("/v1/ledger/head")).unwrap();
    let height_at_kill = head_at_kill["header"]["height"].as_u64().unwrap();
    let killed_at = Instant::now();
    for name in ["n04", "n12"] {
        kill9(devnet.node(names.iter().position(|n| n == name).unwrap()).2);
    }
    let (failover, m) = loop {
        let m = net.job(&moving);
        if leaseholders(&m) == [id_of(standby_name)] {
            break (killed_at.elapsed(), m);
        }
        // A heartbeat sent before the kill may land after the read above: the last one n12 got
        // in is the latest seen while its lease lasts (it lasts a TTL after it, polled every 50 ms).
        if leaseholders(&m) == [id_of("n12")] {
            last_beat = last_beat.max(m["leases"][0]["last_beat_ms"].as_u64().unwrap_or(0));
        }
        assert!(killed_at.elapsed() < Duration::from_secs(60), "the job never left n12: {m}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let awarded = m["leases"][0]["awarded_ms"].as_u64().unwrap();
    eprintln!(
        "failover: {standby_name} held the lease {failover:?} after the kill; in block time {} ms after n12's last heartbeat",
        awarded - last_beat
    );
    // In block time, whatever the machine's speed: the standby takes over in the first block more
    // than a lease TTL (2 s) after the last heartbeat n12 got in — not before, not a block later.
    let due = last_beat + 2_000;
    let mut stamps = Vec::new();
    let mut from = height_at_kill;
    while stamps.last().is_none_or(|t| *t < awarded) {
        let page: Vec<serde_json::Value> = rt()
            .block_on(
                archipel_node::client::ApiClient::new(&net.node)
                    .get(&format!("/v1/ledger/blocks?from={from}&limit=100")),
            )
            .unwrap();
        assert!(!page.is_empty(), "no block holds the award at {awarded}");
        stamps.extend(page.iter().map(|b| b["header"]["timestamp_ms"].as_u64().unwrap()));
        from += page.len() as u64;
    }
    let at = stamps.iter().position(|t| *t == awarded).expect("a block at the award's time");
    assert!(awarded > due, "awarded at {awarded}, not past the lease's end {due}");
    assert!(at > 0 && stamps[at - 1] <= due, "a block at {} was already past {due}: {stamps:?}", stamps[at - 1]);
    assert!(failover < Duration::from_secs(10), "{failover:?}");
    let m = net.ended(&moving, Duration::from_secs(300));
    let s = net.ended(&staying, Duration::from_secs(300));
    assert_eq!(m["ended"]["status"], "accepted", "{m}");
    assert_eq!(s["ended"]["status"], "accepted", "{s}");
    assert_eq!(paid(&s), vec![eu_provider], "the EU job ran on where it was: {s}");
    assert_eq!(paid(&m), vec![id_of(standby_name)], "paid exactly once, to the provider that took over: {m}");
    assert_eq!(m["excluded"], serde_json::json!([id_of("n12")]), "only n12 lapsed (no dead standby in us-east): {m}");
    // Its bond left its balance with its bid and never came back; it was paid nothing.
    // (Fees put back: a job heartbeat n12 sent just before the kill may be final only after it.)
    assert_eq!(net.moved(&id_of("n12"), n12_0), 0, "n12 was paid nothing and got no bond back");
    // Both accepted the same output: the chain of SHA-256 is the same wherever it runs.
    assert_eq!(m["ended"]["outcome"], s["ended"]["outcome"]);

    // Anyone can re-check every award, lapse and payment offline: the export replays, ticks
    // included, to every block's state root.
    let export = w.join("chain.export");
    run(w, &["ledger", "export", export.to_str().unwrap(), "--node", &urls[0]]);
    let genesis = dir.join("genesis.json");
    let verified = run(w, &["ledger", "verify", export.to_str().unwrap(), "--genesis", genesis.to_str().unwrap()]);
    assert!(
        verified.starts_with("ok:") && verified.contains("every certificate, signature, link and state root"),
        "{verified}"
    );
}
