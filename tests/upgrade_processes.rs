//! A protocol upgrade with real processes: three of four validators approve protocol 2 from a
//! height, anyone schedules it, and at that height the network — every node running a build that
//! implements protocol 1 — stops, without a fork, each node's `/health` saying an upgrade is
//! required. Three validators restarted as builds of protocol 2 (a debug build reads
//! `ARCHIPEL_TEST_PROTOCOL_CEILING`) are a quorum: the chain goes on under protocol 2, while the
//! outdated validator and follower stop at the height and say why, never serving a stale head
//! as current. Then a planned upgrade to protocol 3, the validators restarted one at a time on
//! builds of it before its height: the chain crosses the height without standing still.

mod common;

use archipel_node::client::ApiClient;
use archipel_node::ledger_api::{BlockView, HeadView};
use common::*;
use std::time::{Duration, Instant};

fn head(url: &str) -> Option<HeadView> {
    rt().block_on(ApiClient::new(url).get("/v1/ledger/head")).ok()
}

fn height(url: &str) -> u64 {
    head(url).map_or(0, |h| h.header.height)
}

fn wait_height(url: &str, min: u64, timeout: Duration) {
    let start = Instant::now();
    while height(url) < min {
        assert!(start.elapsed() < timeout, "{url} did not reach height {min} within {timeout:?} (at {})", height(url));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `/health` as (HTTP status, body); (0, null) while the node does not answer.
fn health(url: &str) -> (u16, serde_json::Value) {
    let Ok(r) = rt().block_on(reqwest::get(format!("{url}/health"))) else { return (0, serde_json::Value::Null) };
    let status = r.status().as_u16();
    (status, rt().block_on(r.json()).unwrap_or_default())
}

fn block_hash(url: &str, h: u64) -> String {
    let b: BlockView = rt().block_on(ApiClient::new(url).get(&format!("/v1/ledger/blocks/{h}"))).expect("block");
    b.hash.to_string()
}

#[test]
fn an_upgrade_halts_outdated_builds_at_its_height_and_goes_on_with_an_upgraded_quorum() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let devnet = Devnet::start(w, &["--nodes", "5", "--base-ip", "127.0.141.2", "--base-port", "26200"]);
    let node = |i| devnet.node(i);
    let url = |i| devnet.node(i).1;
    let n1 = url(0);
    wait_height(&n1, 5, Duration::from_secs(60));
    let key = |i: usize| node(i).3.parent().unwrap().join("node.key").to_string_lossy().into_owned();
    let tenant = devnet.dir.join("tenant.key").to_string_lossy().into_owned();

    // The devnet's notice, read from the node; the height leaves 60 blocks (~30 s) beyond it for
    // the CLI calls below on a slow machine.
    let notice = head(&n1).unwrap().protocol.unwrap().notice_blocks;
    assert_eq!(notice, 40, "the devnet's upgrade notice");
    let at = height(&n1) + notice + 60;
    let approve_for = |protocol: u32, i: usize, at: u64| {
        let (protocol, at) = (protocol.to_string(), at.to_string());
        let args = ["ledger", "upgrade", "approve", "--protocol", &protocol, "--height", &at, "--key", &key(i)];
        run(w, &[&args[..], &["--node", &n1]].concat()).trim().to_string()
    };
    let approve = |i: usize, at: u64| approve_for(2, i, at);
    let schedule_for = |protocol: u32, at: u64, approvals: &[String]| {
        let (protocol, at) = (protocol.to_string(), at.to_string());
        let mut a = vec!["ledger", "upgrade", "schedule", "--protocol", &protocol, "--key", &tenant, "--node", &n1];
        a.extend(["--height", &at]);
        for x in approvals {
            a.extend(["--approval", x]);
        }
        archipel(w, &a)
    };
    let schedule = |at: u64, approvals: &[String]| schedule_for(2, at, approvals);
    // Too soon (the validator's CLI refuses to sign it; the ledger's own refusal is unit-tested),
    // too few approvals, a malformed one, approvals of another height: refused with the reason.
    let soon = (height(&n1) + 5).to_string();
    let e = refused(
        w,
        &["ledger", "upgrade", "approve", "--protocol", "2", "--height", &soon, "--key", &key(0), "--node", &n1],
    );
    assert!(e.contains("too soon") && e.contains("40 blocks of notice"), "{e}");
    let approvals: Vec<String> = (0..3).map(|i| approve(i, at)).collect();
    let late = at + 1_000;
    let two = schedule(late, &[approve(0, late), approve(1, late)]);
    assert!(!two.status.success() && stderr(&two).contains("2 of 4 validators approve; 3 must"), "{}", stderr(&two));
    let bad = schedule(at, &["not-an-approval".to_string()]);
    assert!(!bad.status.success() && stderr(&bad).contains("is not VALIDATOR:SIGNATURE"), "{}", stderr(&bad));
    let other = schedule(at + 1, &approvals);
    assert!(
        !other.status.success() && stderr(&other).contains("approval is not its ScheduleUpgrade signature"),
        "{}",
        stderr(&other)
    );

    let out = schedule(at, &approvals);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains(&format!("protocol 2 scheduled from height {at}")), "{}", stdout(&out));
    let status = run(w, &["ledger", "upgrade", "status", "--node", &n1]);
    assert!(status.contains("protocol 1 in force") && status.contains("install a release with protocol 2"), "{status}");

    // Every node runs protocol 1: the chain stops just below the height, on every node alike
    // (without the halt, about 8 blocks would come in the 4 s).
    for i in 0..5 {
        wait_height(&url(i), at - 1, Duration::from_secs(120));
    }
    std::thread::sleep(Duration::from_secs(4));
    for i in 0..5 {
        assert_eq!(height(&url(i)), at - 1, "{} went past the activation height", node(i).0);
        let (code, body) = health(&url(i));
        assert_eq!((code, body["status"].as_str()), (503, Some("upgrade_required")), "{}: {body}", node(i).0);
        assert!(body["message"].as_str().unwrap().contains("protocol 2 from height"), "{body}");
    }
    let below = block_hash(&n1, at - 1);
    assert!((1..5).all(|i| block_hash(&url(i), at - 1) == below), "no fork below the height");

    // n01–n03 restarted as builds of protocol 2: a quorum, so the chain goes on.
    let mut upgraded = Vec::new();
    for i in 0..3 {
        kill9(node(i).2);
    }
    let start = Instant::now();
    while (0..3).any(|i| alive(node(i).2)) {
        assert!(start.elapsed() < Duration::from_secs(10), "a validator survived kill -9");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..3 {
        let config = node(i).3.to_string_lossy().into_owned();
        upgraded.push(Reaped(spawn_with_env(
            w,
            &["node", "run", "--config", &config],
            &[("ARCHIPEL_TEST_PROTOCOL_CEILING", "2")],
        )));
    }
    let (n2, n4, n5) = (url(1), url(3), url(4));
    let start = Instant::now();
    let supported = loop {
        match head(&n1).and_then(|h| h.protocol) {
            Some(p) => break p.supported,
            None if start.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(200)),
            None => panic!("restarted n01 does not answer; the restarted nodes' log:\n{}", spawned_log_tail(w, 40)),
        }
    };
    assert_eq!(supported, 2, "ARCHIPEL_TEST_PROTOCOL_CEILING is read by debug builds only: run this test unoptimised");
    wait_height(&n1, at + 5, Duration::from_secs(90));
    wait_height(&n2, at + 5, Duration::from_secs(60));
    let p = head(&n1).unwrap().protocol.unwrap();
    assert_eq!((p.active, p.scheduled, p.supported), (2, None, 2));
    assert_eq!(block_hash(&n2, at), block_hash(&n1, at));
    assert_eq!(health(&n1).0, 200);

    // The outdated validator and follower: stalled at the height, saying so, not serving their head
    // as current.
    for u in [&n4, &n5] {
        let start = Instant::now();
        let (code, body) = loop {
            let (code, body) = health(u);
            if body["status"] == "ledger_stalled" {
                break (code, body);
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{u} never stalled: {body}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(code, 503, "{u}: {body}");
        assert_eq!(body["ledger"]["stall"]["height"], at, "{u}: {body}");
        assert!(body["message"].as_str().unwrap_or_default().contains("upgrade required"), "{u}: {body}");
        let r = rt().block_on(reqwest::get(format!("{u}/v1/ledger/head"))).expect("head answers");
        assert_eq!(r.status().as_u16(), 503, "{u} serves its head while stalled");
        let e: serde_json::Value = rt().block_on(r.json()).expect("JSON");
        assert_eq!(e["error"], "ledger_stalled", "{u}: {e}");
    }

    // A planned upgrade, as operators would run one: the release installed first — n04 restarted as
    // a build of protocol 3 (it catches up), then n01–n03 one at a time (three validators up at
    // every moment) — then protocol 3 scheduled: the chain crosses its height without stopping.
    let (_, _, pid4, config4) = node(3);
    kill9(pid4);
    // Gone (its sockets closed) before it starts again.
    let start = Instant::now();
    while alive(pid4) {
        assert!(start.elapsed() < Duration::from_secs(10), "n04 survived kill -9");
        std::thread::sleep(Duration::from_millis(50));
    }
    let run_as = |config: &std::path::Path, protocol: &str| {
        let config = config.to_string_lossy().into_owned();
        Reaped(spawn_with_env(
            w,
            &["node", "run", "--config", &config],
            &[("ARCHIPEL_TEST_PROTOCOL_CEILING", protocol)],
        ))
    };
    // Up, healthy and within a block of `reference` (a node that kept running).
    let caught_up = |u: &str, reference: &str, what: &str| {
        let start = Instant::now();
        while !(health(u).0 == 200 && height(u) + 1 >= height(reference)) {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "{what} did not catch up: {:?}; the restarted nodes' log:\n{}",
                health(u),
                spawned_log_tail(w, 40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let _v4 = run_as(&config4, "3");
    caught_up(&n4, &n1, "n04");
    for (i, v) in upgraded.iter_mut().enumerate() {
        let _ = v.0.kill();
        let _ = v.0.wait();
        *v = run_as(&node(i).3, "3");
        caught_up(&url(i), &n4, &node(i).0);
    }
    // First at a mistyped height, withdrawn by a quorum (`approve --cancel`, `cancel`).
    let wrong = height(&n1) + notice + 500;
    let approvals: Vec<String> = (0..3).map(|i| approve_for(3, i, wrong)).collect();
    assert!(schedule_for(3, wrong, &approvals).status.success());
    let (p, h) = ("3".to_string(), wrong.to_string());
    let cancels: Vec<String> = (0..3)
        .map(|i| {
            let a = ["ledger", "upgrade", "approve", "--cancel", "--protocol", &p, "--height", &h, "--key", &key(i)];
            run(w, &[&a[..], &["--node", &n1]].concat()).trim().to_string()
        })
        .collect();
    let mut a = vec!["ledger", "upgrade", "cancel", "--protocol", &p, "--height", &h, "--key", &tenant, "--node", &n1];
    for x in &cancels {
        a.extend(["--approval", x]);
    }
    let out = run(w, &a);
    assert!(out.contains(&format!("the upgrade to protocol 3 at height {wrong} is cancelled")), "{out}");
    assert!(run(w, &["ledger", "upgrade", "status", "--node", &n1]).contains("no upgrade scheduled"));
    let at3 = height(&n1) + notice + 20;
    let approvals: Vec<String> = (0..3).map(|i| approve_for(3, i, at3)).collect();
    let out = schedule_for(3, at3, &approvals);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    wait_height(&n1, at3 + 3, Duration::from_secs(120));
    let time = |h: u64| -> u64 {
        let b: BlockView = rt().block_on(ApiClient::new(&n1).get(&format!("/v1/ledger/blocks/{h}"))).expect("block");
        b.header.timestamp_ms
    };
    let gap = time(at3) - time(at3 - 1);
    assert!(gap < 2_000, "the chain stood {gap} ms at the height of a planned upgrade");
    let p = head(&n1).unwrap().protocol.unwrap();
    assert_eq!((p.active, p.scheduled), (3, None));
    assert_eq!(health(&n4).0, 200);
    drop(upgraded);
}
