//! Real processes: one validator of a 5-node devnet is killed with SIGKILL 20 times, at random
//! moments (in steady work, and in a third of the rounds again during its start-up) while
//! transfers flow; after every round it has reopened its block log, caught up with the others and
//! reports `/health` ok, and in the end every node agrees on every block.

mod common;

use archipel_crypto::Identity;
use archipel_ledger::{Payload, Transaction};
use archipel_node::client::ApiClient;
use archipel_node::ledger_api::{BlockView, HeadView};
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const KILLS: usize = 20;

fn head(url: &str) -> Option<u64> {
    let h: HeadView = rt().block_on(ApiClient::new(url).get("/v1/ledger/head")).ok()?;
    Some(h.header.height)
}

fn healthy(url: &str) -> bool {
    rt().block_on(ApiClient::new(url).get::<serde_json::Value>("/health")).is_ok_and(|h| h["status"] == "ok")
}

/// Block hashes `1..=to` as `url` reports them.
fn hashes(url: &str, to: u64) -> Vec<String> {
    let client = ApiClient::new(url);
    let mut out = Vec::new();
    while (out.len() as u64) < to {
        let from = out.len() as u64 + 1;
        let page: Vec<BlockView> =
            rt().block_on(client.get(&format!("/v1/ledger/blocks?from={from}&limit=1000"))).expect("blocks");
        assert!(!page.is_empty(), "{url} has no block {from}");
        out.extend(page.into_iter().take_while(|b| b.header.height <= to).map(|b| b.hash.to_string()));
    }
    out
}

/// A small deterministic generator for the kill moments (the seed is printed).
struct Moments(u64);

impl Moments {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Transfers from the tenant to `to`, one every 20 ms through `url`, until `stop`; counts the
/// ones admitted.
fn load(url: String, tenant: Identity, to: Identity, stop: Arc<AtomicBool>, admitted: Arc<AtomicU64>) {
    let rt = rt();
    let client = ApiClient::new(&url);
    let nonce_now = || -> Option<u64> {
        let a: serde_json::Value = rt.block_on(client.get(&format!("/v1/accounts/{}", tenant.node_id()))).ok()?;
        a["nonce"].as_u64()
    };
    let mut nonce = None;
    let net = network(&url);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        let Some(n) = nonce.or_else(nonce_now) else { continue };
        let tx = Transaction {
            signer: tenant.node_id(),
            nonce: n,
            payload: Payload::Transfer { to: to.node_id(), amount_micro: 1 },
        }
        .sign(&tenant, &net);
        match rt.block_on(client.submit(&tx, false)) {
            Ok(_) => {
                nonce = Some(n + 1);
                admitted.fetch_add(1, Ordering::Relaxed);
            }
            // Refused (e.g. the mempool's nonce window is full): start again from the finalized nonce.
            Err(_) => nonce = None,
        }
    }
}

#[test]
fn a_validator_killed_20_times_under_load_catches_up_every_time() {
    let work = tempfile::tempdir().unwrap();
    let devnet = Devnet::start(work.path(), &["--nodes", "5", "--base-ip", "127.0.58.2", "--base-port", "26600"]);
    let url = |i| devnet.node(i).1;
    let (n1, n4, n5) = (url(0), url(3), url(4));
    let start = Instant::now();
    while head(&n1).unwrap_or(0) < 3 {
        assert!(start.elapsed() < Duration::from_secs(60), "the devnet does not finalize");
        std::thread::sleep(Duration::from_millis(100));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let admitted = Arc::new(AtomicU64::new(0));
    let loader = std::thread::spawn({
        let tenant = Identity::load(&devnet.dir.join("tenant.key")).unwrap();
        let to = Identity::load(&devnet.node(4).3.parent().unwrap().join("node.key")).unwrap();
        let (n1, stop, admitted) = (n1.clone(), stop.clone(), admitted.clone());
        move || load(n1, tenant, to, stop, admitted)
    });

    let (_, victim, first_pid, config) = devnet.node(1);
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
    let mut moments = Moments(seed);
    println!("kill moments from seed {seed}");
    let mut running: Option<ChildGuard> = None;
    let mut pid = first_pid;
    let mut kills = 0;
    let mut kill_and_restart = |pid: &mut u32| {
        kill(Pid::from_raw(*pid as i32), Signal::SIGKILL).expect("kill -9");
        match running.take() {
            Some(mut c) => drop(c.0.wait()),
            None => {
                // Started by the devnet, which reaps it. The process is a zombie as soon as its
                // main thread is, but its sockets close only when its last thread has exited (one
                // may be finishing an fsync): wait until it is gone, or the restart finds its
                // ports in use.
                let started = Instant::now();
                while std::path::Path::new(&format!("/proc/{pid}")).exists()
                    && started.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let child = spawn(work.path(), &["node", "run", "--config", config.to_str().unwrap()]);
        *pid = child.id();
        running = Some(ChildGuard(child));
    };
    while kills < KILLS {
        // A random moment of steady work after the last catch-up…
        let after = Duration::from_millis(moments.below(3_000));
        std::thread::sleep(after);
        kill_and_restart(&mut pid);
        kills += 1;
        let mut what = format!("kill {kills}: {after:?} after catching up");
        // …and in a third of the rounds another one during start-up (opening the block log,
        // filling it from marshal, catching up).
        if kills < KILLS && moments.below(3) == 0 {
            let early = Duration::from_millis(moments.below(1_000));
            std::thread::sleep(early);
            kill_and_restart(&mut pid);
            kills += 1;
            what += &format!("; kill {kills}: {early:?} after its restart");
        }
        let target = head(&n1).expect("n01 answers");
        let restarted = Instant::now();
        loop {
            if healthy(&victim) && head(&victim).is_some_and(|h| h >= target) {
                break;
            }
            assert!(
                restarted.elapsed() < Duration::from_secs(45),
                "{what} (moments seed {seed}): {victim} did not catch up with height {target} within 45 s (at \
                 {:?}, healthy: {}); its log ends:\n{}",
                head(&victim),
                healthy(&victim),
                spawned_log_tail(work.path(), 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("{what}: caught up with {target} in {:?}", restarted.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    assert!(admitted.load(Ordering::Relaxed) > 100, "the load ran: {} transfers", admitted.load(Ordering::Relaxed));

    // Nobody forked, and the victim's applier is not stalled.
    let to = [&n1, &victim, &n4, &n5].iter().map(|u| head(u).expect("head")).min().unwrap_or(0);
    let reference = hashes(&n1, to);
    for u in [&victim, &n4, &n5] {
        assert_eq!(hashes(u, to), reference, "{u} and {n1} disagree below height {to}");
    }
    // Restarts open the stored state and replay only the blocks after it (at most a checkpoint
    // interval, plus what the log synced since), never the whole chain.
    let log = std::fs::read_to_string(work.path().join("spawned.log")).unwrap_or_default();
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split_whitespace().find_map(|w| w.strip_prefix(name)).and_then(|v| v.trim_matches(',').parse().ok())
    };
    let opened: Vec<(u64, u64, u64)> = log
        .lines()
        .filter(|l| l.contains("ledger opened"))
        .filter_map(|l| Some((field(l, "state_height=")?, field(l, "replayed=")?, field(l, "head=")?)))
        .collect();
    assert!(opened.len() >= 2, "the restarts did not log how they opened the ledger: {opened:?}");
    // Each open flushes the state it replayed (after syncing the log), so the next restart opens
    // at least there, whatever the kill lost: it never replays what an earlier start did.
    for pair in opened.windows(2) {
        let ((_, _, head), (state_height, replayed, next_head)) = (pair[0], pair[1]);
        assert!(state_height >= head, "a restart opened the state at {state_height}, below {head}: {opened:?}");
        assert_eq!(state_height + replayed, next_head, "{opened:?}");
    }
    let metrics = rt().block_on(ApiClient::new(&victim).metrics_text()).unwrap();
    let stalled = metrics.lines().find(|l| l.starts_with("consensus_ledger_applier_stalled"));
    assert_eq!(stalled.and_then(|l| l.rsplit(' ').next()), Some("0"), "{metrics}");
}
