//! Real processes: on a 5-node devnet whose chain is 100,000 blocks long, nodes whose ledger is
//! wiped (a follower, then a validator) or far behind come back with `node run --join`: they take the state from a peer instead of
//! replaying the chain, follow the network within seconds, agree with it on every block after
//! the state they took, and say clearly what they do not hold (older blocks, the export). The
//! joined validator votes: with another validator stopped the chain still finalizes.

mod common;

use archipel_crypto::Identity;
use archipel_ledger::{Payload, Transaction};
use archipel_node::client::ApiClient;
use archipel_node::ledger_api::{BlockView, HeadView};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn head(url: &str) -> Option<u64> {
    let h: HeadView = rt().block_on(ApiClient::new(url).get("/v1/ledger/head")).ok()?;
    Some(h.header.height)
}

fn healthy(url: &str) -> bool {
    rt().block_on(ApiClient::new(url).get::<serde_json::Value>("/health")).is_ok_and(|h| h["status"] == "ok")
}

fn block(url: &str, height: u64) -> Result<BlockView, String> {
    rt().block_on(ApiClient::new(url).get(&format!("/v1/ledger/blocks/{height}"))).map_err(|e| e.to_string())
}

fn wait_height(url: &str, height: u64, within: Duration) {
    let start = Instant::now();
    while head(url).unwrap_or(0) < height {
        assert!(start.elapsed() < within, "{url} did not reach height {height} within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills the devnet's process `pid` and waits until it is gone (its ports free).
fn kill_node(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
    let started = Instant::now();
    // Until the devnet reaped it: its sockets close only when its last thread has exited.
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(started.elapsed() < Duration::from_secs(10), "node {pid} still runs 10 s after kill -9");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the node `pid` and deletes its ledger and consensus storage (the node of `config`) —
/// all of it, or (a validator) all but simplex's journal: its record of the votes it cast, without
/// which it could vote twice in a view and be blocked by its peers as an equivocator.
fn kill_and_wipe(pid: u32, config: &Path, keep_votes: bool) {
    kill_node(pid);
    let data = config.parent().unwrap().join("data");
    std::fs::remove_dir_all(data.join("ledger")).unwrap();
    for entry in std::fs::read_dir(data.join("runtime")).unwrap().flatten() {
        if !(keep_votes && entry.file_name().to_string_lossy().starts_with("archipel-simplex")) {
            let path = entry.path();
            if path.is_dir() { std::fs::remove_dir_all(&path).unwrap() } else { std::fs::remove_file(&path).unwrap() }
        }
    }
}

/// Transfers from the tenant to `n` fresh accounts, so the state holds more than the genesis.
fn fill(url: &str, tenant: &Identity, n: u64) {
    let client = ApiClient::new(url);
    let net = network(url);
    let a: serde_json::Value = rt().block_on(client.get(&format!("/v1/accounts/{}", tenant.node_id()))).unwrap();
    let first = a["nonce"].as_u64().unwrap();
    for i in 0..n {
        let to = Identity::from_seed(10_000 + i).node_id();
        let tx = Transaction {
            signer: tenant.node_id(),
            nonce: first + i,
            payload: Payload::Transfer { to, amount_micro: 1 },
        }
        .sign(tenant, &net);
        // In rounds of 50, each waiting for its last to be final (within every admission limit).
        rt().block_on(client.submit(&tx, i % 50 == 49 || i + 1 == n)).expect("transfer admitted");
    }
}

/// A transfer from the tenant every 30 ms while it lives (each the next nonce once the last is
/// final; the same one again until then), so blocks follow each other at consensus' pace instead
/// of an idle leader's 500 ms: the test's waits for tens of blocks take seconds, not tens of them,
/// and the joins happen under load.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Traffic {
    fn start(url: &str, tenant: &Identity) -> Traffic {
        let (url, tenant, stop) = (url.to_string(), tenant.clone(), Arc::new(AtomicBool::new(false)));
        let net = network(&url);
        let to = Identity::from_seed(20_000).node_id();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let client = ApiClient::new(&url);
            let mut sent = 0;
            while !stopped.load(Ordering::Relaxed) {
                let account: Result<serde_json::Value, _> =
                    rt().block_on(client.get(&format!("/v1/accounts/{}", tenant.node_id())));
                if let Some(nonce) = account.ok().and_then(|a| a["nonce"].as_u64()) {
                    let payload = Payload::Transfer { to, amount_micro: 1 };
                    let tx = Transaction { signer: tenant.node_id(), nonce, payload }.sign(&tenant, &net);
                    sent += u64::from(rt().block_on(client.submit(&tx, false)).is_ok());
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            sent
        });
        Traffic { stop, thread: Some(thread) }
    }

    /// Stops the transfers; how many submissions were accepted.
    fn stop(mut self) -> u64 {
        self.halt().map_or(0, |r| r.expect("the traffic thread panicked"))
    }

    /// Stops the thread and waits for it (once).
    fn halt(&mut self) -> Option<std::thread::Result<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(std::thread::JoinHandle::join)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// Restarts node `i` with `--join` (and `extra`), waits until it follows `reference` (healthy, at
/// or above the reference's head when it started); returns the process and how long it took.
fn rejoin(work: &Path, config: &Path, url: &str, reference: &str, extra: &[&str]) -> (ChildGuard, Duration) {
    let mut args = vec!["node", "run", "--config", config.to_str().unwrap(), "--join"];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let child = ChildGuard(spawn(work, &args));
    let target = head(reference).expect("the reference answers");
    loop {
        if healthy(url) && head(url).is_some_and(|h| h >= target) {
            return (child, started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{url} does not follow {reference} (height {target}) 30 s after starting with --join (at {:?}); its log ends:\n{}",
            head(url),
            spawned_log_tail(work, 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first block `url` holds: the lowest height it answers (it holds every block from there).
fn first_held(url: &str) -> u64 {
    let (mut lo, mut hi) = (1, head(url).expect("head"));
    while lo < hi {
        let mid = (lo + hi) / 2;
        if block(url, mid).is_ok() { hi = mid } else { lo = mid + 1 }
    }
    lo
}

/// Every block from `from` to `url`'s head as `reference` has it.
fn assert_same_blocks(url: &str, reference: &str, from: u64) {
    let to = head(url).unwrap().min(head(reference).unwrap());
    for h in from..=to {
        let (a, b) = (block(url, h).expect("held"), block(reference, h).expect("held"));
        assert_eq!((a.hash, a.header.state_root), (b.hash, b.header.state_root), "block {h} of {url} and {reference}");
    }
}

/// The chain's length when the test starts.
const CHAIN: u64 = 100_000;

#[test]
fn wiped_or_far_behind_nodes_join_by_state_sync_and_follow_within_seconds() {
    let work = tempfile::tempdir().unwrap();
    let args = ["--nodes", "5", "--base-ip", "127.0.59.2", "--base-port", "26700"];
    // A devnet, stopped, given a chain of 100,000 blocks (built and signed offline with its own
    // validator keys), started again: it goes on from there.
    drop(Devnet::start(work.path(), &args));
    let dir = work.path().join("devnet");
    let filled = archipel(
        work.path(),
        &["debug", "fill-chain", "--dir", dir.to_str().unwrap(), "--blocks", &CHAIN.to_string(), "--accounts", "5000"],
    );
    assert!(filled.status.success(), "fill-chain: {}", stderr(&filled));
    let devnet = Devnet::start(work.path(), &args);
    let url = |i| devnet.node(i).1;
    let n1 = url(0);
    for i in 0..5 {
        wait_height(&url(i), CHAIN + 3, Duration::from_secs(60));
    }
    // fill-chain's chain was never voted on: each node voted at once, and once its record of votes
    // exists, the marker saying so is gone.
    for i in 0..5 {
        let marker = devnet.node(i).3.parent().unwrap().join("data/runtime/archipel-never-voted");
        let started = Instant::now();
        while marker.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} is still there 30 s after the start",
                marker.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let tenant = Identity::load(&devnet.dir.join("tenant.key")).unwrap();
    fill(&n1, &tenant, 200);
    let traffic = Traffic::start(&n1, &tenant);
    // Past a commit of the state store (every 32 blocks), so a snapshot holds the transfers.
    wait_height(&n1, head(&n1).unwrap() + 40, Duration::from_secs(60));

    // A follower loses its whole data directory's ledger and consensus storage.
    let (_, follower, pid, config) = devnet.node(4);
    kill_and_wipe(pid, &config, false);
    let (follower_proc, took) = rejoin(work.path(), &config, &follower, &n1, &[]);
    println!("follower: following {took:?} after starting with --join");
    let log = std::fs::read_to_string(work.path().join("spawned.log")).unwrap();
    assert!(log.contains("joined by state sync"), "the follower synced the state:\n{log}");
    let first = first_held(&follower);
    assert!(first > CHAIN, "it holds no block below the state it took (from {first})");
    let refused = block(&follower, first - 1).unwrap_err();
    assert!(refused.contains("block_pruned") && refused.contains("archive node"), "{refused}");
    let export = rt().block_on(reqwest::get(format!("{follower}/v1/ledger/export"))).unwrap();
    assert_eq!(export.status(), 409, "a joined node cannot export from the genesis");
    // Its balances are the network's: the state came whole.
    let a: serde_json::Value = rt()
        .block_on(ApiClient::new(&follower).get(&format!("/v1/accounts/{}", Identity::from_seed(10_199).node_id())))
        .unwrap();
    assert_eq!(a["balance_micro"].as_u64(), Some(1), "the last transfer's account: {a}");
    wait_height(&follower, head(&n1).unwrap() + 8, Duration::from_secs(30));
    assert_same_blocks(&follower, &n1, first);

    // A validator too — its ledger lost, its record of votes kept: it joins, then votes (with
    // another validator stopped, the chain still finalizes — three of four are needed).
    let (_, validator, pid, config) = devnet.node(1);
    kill_and_wipe(pid, &config, true);
    let (_validator_proc, took) = rejoin(work.path(), &config, &validator, &n1, &[]);
    println!("validator: following {took:?} after starting with --join");
    assert!(first_held(&validator) > CHAIN, "the validator took a state too");
    // It applies live blocks, not only the ones its snapshot carried.
    wait_height(&validator, head(&n1).unwrap() + 8, Duration::from_secs(30));
    let (_, _, other, _) = devnet.node(2);
    kill(Pid::from_raw(other as i32), Signal::SIGSTOP).unwrap();
    let before = head(&n1).unwrap();
    let progressed = std::panic::catch_unwind(|| wait_height(&n1, before + 8, Duration::from_secs(20)));
    kill(Pid::from_raw(other as i32), Signal::SIGCONT).unwrap();
    assert!(progressed.is_ok(), "with n03 stopped the chain stalled: the joined validator does not vote");
    assert_same_blocks(&validator, &n1, first_held(&validator));

    // A validator that lost its record of votes as well: it follows until the network has
    // finalized a view it cannot have voted in, then votes (with n03 stopped, n01, n02 and it
    // must finalize).
    let (_, wiped, pid, config) = devnet.node(3);
    kill_and_wipe(pid, &config, false);
    let log_before = std::fs::read_to_string(work.path().join("spawned.log")).unwrap_or_default().len();
    let (_wiped_proc, took) = rejoin(work.path(), &config, &wiped, &n1, &[]);
    println!("validator without its journal: following {took:?} after starting with --join");
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(work.path().join("spawned.log")).unwrap()[log_before..].to_string();
        assert!(
            log.contains("no record of its votes on this chain"),
            "the validator without a journal did not wait at the vote gate:\n{}",
            spawned_log_tail(work.path(), 40)
        );
        if log.contains("this validator starts voting after this finalized view") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the vote gate did not open within 30 s:\n{}",
            spawned_log_tail(work.path(), 40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    kill(Pid::from_raw(other as i32), Signal::SIGSTOP).unwrap();
    let before = head(&n1).unwrap();
    let progressed = std::panic::catch_unwind(|| wait_height(&n1, before + 8, Duration::from_secs(20)));
    kill(Pid::from_raw(other as i32), Signal::SIGCONT).unwrap();
    assert!(progressed.is_ok(), "with n03 stopped the chain stalled: the validator past its vote gate does not vote");

    // Far behind: the follower stops while the chain moves on, then starts with --join and a
    // threshold below the gap: its old ledger is moved aside and the state synced again.
    drop(follower_proc);
    let stopped_at = head(&n1).unwrap();
    // Peers commit their state every 32 blocks (a snapshot is the last commit): after 70 blocks
    // each has committed one above the follower's head.
    for i in 0..4 {
        wait_height(&url(i), stopped_at + 70, Duration::from_secs(60));
    }
    let config = devnet.node(4).3;
    let (_follower_proc, took) = rejoin(work.path(), &config, &follower, &n1, &["--join-behind", "50"]);
    println!("far-behind follower: following {took:?} after starting with --join");
    let aside: Vec<_> = std::fs::read_dir(config.parent().unwrap().join("data"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("replaced-"))
        .collect();
    assert_eq!(aside.len(), 1, "the old ledger is kept aside for the operator");
    assert!(aside[0].path().join("ledger/blocks.log").exists());
    assert!(first_held(&follower) > stopped_at, "it took a newer state instead of replaying the gap");
    wait_height(&follower, head(&n1).unwrap() + 8, Duration::from_secs(30));
    assert_same_blocks(&follower, &n1, first_held(&follower));
    let log = std::fs::read_to_string(work.path().join("spawned.log")).unwrap();
    assert_eq!(log.matches("joined by state sync").count(), 4, "four joins, each by state sync");
    let sent = traffic.stop();
    assert!(sent > 100, "the joins ran under load: {sent} transfers accepted");
}
