//! The replicated ledger with real processes: blocks keep finalizing when one of 4 validators is
//! killed, a restarted validator catches up and validates again, 2 of 4 down stops progress
//! without forking, and progress resumes when one returns.

mod common;

use archipel_node::client::ApiClient;
use archipel_node::ledger_api::{BlockView, HeadView};
use archipel_types::NodeId;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

fn head(url: &str) -> Option<u64> {
    let h: HeadView = rt().block_on(ApiClient::new(url).get("/v1/ledger/head")).ok()?;
    Some(h.header.height)
}

/// Waits until `url`'s finalized height is at least `min`; returns it.
fn wait_height(url: &str, min: u64, timeout: Duration) -> u64 {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        last = head(url);
        if last.is_some_and(|h| h >= min) {
            return last.unwrap_or_default();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} did not reach height {min} within {timeout:?} (last seen {last:?})");
}

/// Block hashes `1..=to` as `url` reports them.
fn hashes(url: &str, to: u64) -> Vec<String> {
    let client = ApiClient::new(url);
    let mut out = Vec::new();
    let mut from = 1;
    while from <= to {
        let page: Vec<BlockView> =
            rt().block_on(client.get(&format!("/v1/ledger/blocks?from={from}&limit=1000"))).expect("blocks");
        assert!(!page.is_empty(), "{url} has no block {from}");
        for b in page.into_iter().take_while(|b| b.header.height <= to) {
            assert_eq!(b.header.height, from, "{url} skipped a height");
            out.push(b.hash.to_string());
            from += 1;
        }
    }
    out
}

/// Every node reports the same block at every height up to the lowest head: no fork.
fn assert_no_fork(urls: &[&str]) {
    let to = urls.iter().map(|u| head(u).expect("head")).min().unwrap_or(0);
    let reference = hashes(urls[0], to);
    for u in &urls[1..] {
        assert_eq!(hashes(u, to), reference, "{u} and {} disagree below height {to}", urls[0]);
    }
}

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
}

/// Restarts a devnet node from its config (as `archipel devnet` does).
fn restart(work: &Path, config: &Path) -> ChildGuard {
    ChildGuard(spawn(work, &["node", "run", "--config", config.to_str().unwrap()]))
}

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn one_validator_killed_keeps_finalizing_and_returns_to_catch_up_and_validate() {
    let work = tempfile::tempdir().unwrap();
    let devnet = Devnet::start(work.path(), &["--nodes", "5", "--base-ip", "127.0.48.2", "--base-port", "25700"]);
    let url = |i| devnet.node(i).1;
    let (n1, n5) = (url(0), url(4));
    wait_height(&n1, 5, Duration::from_secs(60));
    wait_all_leases_up(&n1);

    // kill -9 validator n02: the other three keep finalizing, seen by a validator and a follower.
    let (_, n2, pid2, config2) = devnet.node(1);
    sigkill(pid2);
    std::thread::sleep(Duration::from_millis(500));
    let h = head(&n1).unwrap();
    wait_height(&n1, h + 10, Duration::from_secs(60));
    wait_height(&n5, h + 10, Duration::from_secs(60));

    // Restarted, it catches up by itself…
    let _n2 = restart(work.path(), &config2);
    let target = head(&n1).unwrap();
    wait_height(&n2, target, Duration::from_secs(90));

    // …and validates again: with n03 killed too, progress needs n02's votes (3 of 4).
    let (_, _, pid3, _) = devnet.node(2);
    sigkill(pid3);
    std::thread::sleep(Duration::from_millis(500));
    let h = head(&n1).unwrap();
    wait_height(&n1, h + 10, Duration::from_secs(90));
    wait_height(&n2, h + 10, Duration::from_secs(60));
    assert_no_fork(&[&n1, &n2, &url(3), &n5]);
    // Leader timeouts of the dead validators' views never expired a live node's lease.
    assert_never_down(&n1, &[devnet.id(0), devnet.id(3), devnet.id(4)]);
}

#[test]
fn two_of_four_validators_down_stops_progress_without_fork_until_one_returns() {
    let work = tempfile::tempdir().unwrap();
    let devnet = Devnet::start(work.path(), &["--nodes", "5", "--base-ip", "127.0.49.2", "--base-port", "25800"]);
    let url = |i| devnet.node(i).1;
    let (n1, n4, n5) = (url(0), url(3), url(4));
    wait_height(&n1, 3, Duration::from_secs(60));
    // n02 must be Up before it dies for its Down to be a change at all.
    wait_all_leases_up(&n1);

    let (_, _, pid2, _) = devnet.node(1);
    let (_, n3, pid3, config3) = devnet.node(2);
    sigkill(pid2);
    sigkill(pid3);
    // Let in-flight finalizations land, then watch: nothing may finalize with 2 of 4 validators.
    // (A follower may stay one block behind: the last certificate may have come only from a
    // validator that was killed.)
    std::thread::sleep(Duration::from_secs(3));
    let before: Vec<u64> = [&n1, &n4, &n5].iter().map(|u| head(u).unwrap()).collect();
    let top = before.iter().copied().max().unwrap_or(0);
    std::thread::sleep(Duration::from_secs(5));
    // A node may still learn a block another had at the stall (its certificate came late), but
    // no height beyond what anyone had.
    for u in [&n1, &n4, &n5] {
        let h = head(u).unwrap();
        assert!(h <= top, "{u} is at height {h}, past {top}: progress with only 2 of 4 validators");
    }
    let stalled = head(&n1).unwrap();
    assert_no_fork(&[&n1, &n4, &n5]);

    // One returns: progress resumes, and it agrees with everyone.
    let _n3 = restart(work.path(), &config3);
    wait_height(&n1, stalled + 5, Duration::from_secs(90));
    wait_height(&n3, stalled + 5, Duration::from_secs(90));
    assert_no_fork(&[&n1, &n3, &n4, &n5]);
    // The halt and the restart never expired the lease of a node that kept heartbeating; the
    // validator still dead is marked down once the chain runs again.
    wait_height(&n1, stalled + 20, Duration::from_secs(90));
    assert_never_down(&n1, &[devnet.id(0), devnet.id(3), devnet.id(4)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let to = head(&n1).unwrap();
        let down: Vec<NodeId> = downs(&n1, to).into_iter().map(|(_, n)| n).collect();
        if down.contains(&devnet.id(1)) {
            break;
        }
        assert!(Instant::now() < deadline, "the dead validator n02 was not marked down within 30 s: {down:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
