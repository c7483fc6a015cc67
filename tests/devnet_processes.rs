//! Real processes: a 4-node devnet on its own loopback range. A node killed with SIGKILL is seen
//! down by the others within 5 s and up within 5 s of its restart; a foreign key is refused at the
//! p2p layer (receives nothing) and at the HTTP layer (403); SIGINT stops every child.

mod common;

use archipel_crypto::Identity;
use archipel_node::client::ApiClient;
use archipel_node::membership::PeerStatus;
use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn kill_restart_foreign_key_and_clean_shutdown() {
    let work = tempfile::tempdir().unwrap();
    let mut devnet = Devnet::start(work.path(), &["--nodes", "4", "--base-ip", "127.0.41.2", "--base-port", "25100"]);
    let (_, url1, _, _) = devnet.node(0);
    let (_, url2, _, _) = devnet.node(1);
    let (victim, victim_url, victim_pid, victim_config) = devnet.node(2);
    assert!(url1.contains("127.0.41.2") && url2.contains("127.0.41.3"), "each node has its own address: {url1} {url2}");

    wait_view(&url1, Duration::from_secs(20), "all 4 up", |v| {
        v.nodes.len() == 4 && v.nodes.iter().all(|n| n.status == PeerStatus::Up)
    });

    // Metrics: peers connected, messages in/out, uptime, build info; plus /health and /v1/node.
    let rt0 = rt();
    let c1 = ApiClient::new(&url1);
    let read = |metrics: &str, name: &str| -> Option<f64> {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
    };
    // "All up" is what the others' heartbeats say; this node's own gossip may come a moment
    // later (its first round is on a timer): read again until it has sent and received some.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = rt0.block_on(c1.metrics_text()).unwrap();
        let moved = |name: &str| read(&m, name).is_some_and(|v| v > 0.0);
        if (moved("membership_messages_in_total") && moved("membership_messages_out_total"))
            || std::time::Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let value =
        |name: &str| -> f64 { read(&metrics, name).unwrap_or_else(|| panic!("metric {name} missing:\n{metrics}")) };
    assert_eq!(value("membership_peers_connected"), 3.0);
    assert!(value("membership_messages_in_total") > 0.0);
    assert!(value("membership_messages_out_total") > 0.0);
    assert!(value("node_uptime_seconds") >= 0.0);
    assert_eq!(value("node_build_info"), 1.0);
    let health: serde_json::Value = rt0.block_on(c1.get("/health")).unwrap();
    assert_eq!(health["status"], "ok");
    let me: serde_json::Value = rt0.block_on(c1.get("/v1/node")).unwrap();
    assert_eq!(me["descriptor"]["region"], "eu-de");
    assert_eq!(me["validator"], true);

    // kill -9 one node: the others see it down within 5 s.
    kill(Pid::from_raw(victim_pid as i32), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    for url in [&url1, &url2] {
        let left = Duration::from_secs(5).saturating_sub(killed.elapsed());
        wait_view(url, left, "victim down", |v| status_of(v, &victim) == Some(PeerStatus::Down));
    }
    assert!(killed.elapsed() <= Duration::from_secs(5), "down after {:?}", killed.elapsed());
    let report = devnet.wait_for_line(&format!("node {victim} ("), Duration::from_secs(5));
    assert!(report.contains("signal 9"), "{report}");

    // While it is down, its own key can join at its address and receives gossip (positive control)…
    let net = devnet.dir.clone();
    let victim_dir = victim_config.parent().unwrap().to_path_buf();
    let victim_p2p = devnet.state()["nodes"][2]["p2p_address"].as_str().unwrap().to_string();
    let probe = |key: &std::path::Path, listen: &str| -> serde_json::Value {
        let out = archipel(
            work.path(),
            &[
                "debug",
                "p2p-probe",
                "--key",
                key.to_str().unwrap(),
                "--genesis",
                net.join("genesis.json").to_str().unwrap(),
                "--listen",
                listen,
                "--seconds",
                "8",
            ],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    let own = probe(&victim_dir.join("node.key"), &victim_p2p);
    assert!(own["messages_received"].as_u64().unwrap() > 0, "registered key received nothing: {own}");

    // …but a foreign key receives nothing.
    let foreign_key = work.path().join("foreign.key");
    assert!(archipel(work.path(), &["key", "gen", "--out", foreign_key.to_str().unwrap()]).status.success());
    let foreign = probe(&foreign_key, "127.0.41.200:25100");
    assert_eq!(foreign["registered"], false);
    assert_eq!(foreign["messages_received"].as_u64(), Some(0), "foreign key received gossip: {foreign}");

    // HTTP: unsigned → 401, foreign key → 403, tenant key → 200.
    let rt = rt();
    let unsigned = rt.block_on(ApiClient::new(&url1).get::<serde_json::Value>("/v1/whoami")).unwrap_err();
    assert_eq!(unsigned.status(), Some(401), "{unsigned}");
    assert!(unsigned.to_string().contains("missing_signature"), "{unsigned}");
    let foreign_id = Identity::load(&foreign_key).unwrap();
    let refused = rt
        .block_on(ApiClient::new(&url1).with_identity(foreign_id).get::<serde_json::Value>("/v1/whoami"))
        .unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
    assert!(refused.to_string().contains("unknown_key"), "{refused}");
    let tenant = Identity::load(&net.join("tenant.key")).unwrap();
    let me: serde_json::Value =
        rt.block_on(ApiClient::new(&url1).with_identity(tenant.clone()).get("/v1/whoami")).unwrap();
    assert_eq!(me["kind"], "account");
    // A known key that is not the node's own cannot stop it.
    let forbidden = rt
        .block_on(ApiClient::new(&url1).with_identity(tenant).call::<serde_json::Value>(
            "POST",
            "/v1/node/shutdown",
            vec![],
        ))
        .unwrap_err();
    assert_eq!(forbidden.status(), Some(403), "{forbidden}");

    // Restart the node.
    let mut restarted = Command::new(bin())
        .args(["node", "run", "--config", victim_config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once it runs (answers /health), the others see it up within 5 s.
    let started = Instant::now();
    while !rt0
        .block_on(ApiClient::new(&victim_url).get::<serde_json::Value>("/health"))
        .is_ok_and(|h| h["status"] == "ok")
    {
        assert!(started.elapsed() < Duration::from_secs(30), "the restarted node never answered /health");
        std::thread::sleep(Duration::from_millis(50));
    }
    let restart = Instant::now();
    for url in [&url1, &url2] {
        let left = Duration::from_secs(5).saturating_sub(restart.elapsed());
        wait_view(url, left, "victim up again", |v| status_of(v, &victim) == Some(PeerStatus::Up));
    }

    // SIGINT stops every child the devnet started; none is left behind.
    let pids = devnet.pids();
    assert_eq!(pids.len(), 4);
    kill(Pid::from_raw(devnet.child.id() as i32), Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = devnet.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "devnet did not exit after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "devnet exit status {status:?}");
    for pid in pids {
        assert!(!alive(pid), "node process {pid} outlived the devnet");
    }
    devnet.wait_for_line("stopped 4 nodes", Duration::from_secs(2));
    let _ = restarted.kill();
    let _ = restarted.wait();
}

#[test]
fn devnet_resumes_from_disk_and_refuses_a_different_topology() {
    let work = tempfile::tempdir().unwrap();
    let args = ["--nodes", "2", "--base-ip", "127.0.42.2", "--base-port", "25200"];
    let first_id;
    {
        let devnet = Devnet::start(work.path(), &args);
        first_id = devnet.state()["genesis_hash"].as_str().unwrap().to_string();
    }
    {
        let mut devnet = Devnet::start(work.path(), &args);
        devnet.wait_for_line("resuming devnet", Duration::from_secs(1));
        assert_eq!(devnet.state()["genesis_hash"].as_str().unwrap(), first_id);
    }
    let out = archipel(
        work.path(),
        &[
            "devnet",
            "--dir",
            work.path().join("devnet").to_str().unwrap(),
            "--nodes",
            "3",
            "--base-ip",
            "127.0.42.2",
            "--base-port",
            "25200",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--reset"), "{}", stderr(&out));
    let devnet =
        Devnet::start(work.path(), &["--reset", "--nodes", "3", "--base-ip", "127.0.42.2", "--base-port", "25200"]);
    assert_ne!(devnet.state()["genesis_hash"].as_str().unwrap(), first_id);
    assert_eq!(devnet.pids().len(), 3);
}

#[test]
fn devnet_runs_a_custom_topology_and_rejects_a_bad_one() {
    let work = tempfile::tempdir().unwrap();
    let topo = work.path().join("topology.toml");
    std::fs::write(
        &topo,
        r#"
[[node]]
name = "fra"
region = "eu-fr"
country = "FR"
operator = "seine-cloud"
operator_jurisdiction = "FR"
capacity = "1TiB"
roles = ["validator", "storage"]

[[node]]
name = "nyc"
region = "us-east"
country = "US"
operator = "bigcloud"
operator_jurisdiction = "US"
capacity = "2TiB"
roles = ["compute"]
"#,
    )
    .unwrap();
    let args = ["--topology", topo.to_str().unwrap(), "--base-ip", "127.0.47.2", "--base-port", "25600"];
    let devnet = Devnet::start(work.path(), &args);
    let (_, url, _, _) = devnet.node(0);
    wait_view(&url, Duration::from_secs(20), "custom topology up", |v| {
        v.nodes.len() == 2
            && v.nodes.iter().all(|n| n.status == PeerStatus::Up)
            && v.nodes.iter().any(|n| n.name == "nyc" && n.operator_jurisdiction == "US" && n.roles == "compute")
    });
    // Even a supervisor killed with SIGKILL leaves no orphans: nodes watch their parent.
    let pids = devnet.pids();
    let mut devnet = devnet;
    kill(Pid::from_raw(devnet.child.id() as i32), Signal::SIGKILL).unwrap();
    let _ = devnet.child.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "nodes outlived a SIGKILLed devnet: {pids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(devnet);

    std::fs::write(&topo, "[[node]]\nname = \"x\"\nregion = \"eu-fr\"\n").unwrap();
    let dir = work.path().join("other");
    let out = archipel(work.path(), &["devnet", "--dir", dir.to_str().unwrap(), "--topology", topo.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("topology") && stderr(&out).contains("missing field"), "{}", stderr(&out));
}
