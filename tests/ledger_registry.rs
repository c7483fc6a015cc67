//! Real processes: the p2p allowed set follows the node registry in finalized ledger state. A
//! node registered later (`node register`, a RegisterNode transaction) joins with `node run
//! --join`, syncs the chain and heartbeats; its owner updates its descriptor (`node update`); once it
//! leaves (`node leave`) peers drop it.

mod common;

use archipel_node::client::ApiClient;
use archipel_node::ledger_api::HeadView;
use common::*;
use std::time::{Duration, Instant};

fn head(url: &str) -> Option<u64> {
    rt().block_on(ApiClient::new(url).get::<HeadView>("/v1/ledger/head")).ok().map(|h| h.header.height)
}

fn wait(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < timeout, "{what} not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn lease_of(url: &str, name: &str) -> Option<String> {
    let v: serde_json::Value = rt().block_on(ApiClient::new(url).get("/v1/nodes")).ok()?;
    v["nodes"].as_array()?.iter().find(|n| n["name"] == name).map(|n| n["lease"].to_string())
}

/// The late node's id, from its key file.
fn late_id(w: &std::path::Path) -> String {
    archipel_crypto::Identity::load(&w.join("late/node.key")).unwrap().node_id().to_string()
}

/// The registry record of `node` in `url`'s finalized state, as text (it holds the descriptor as JSON).
fn registered_descriptor(url: &str, node: &str) -> String {
    let proof: serde_json::Value =
        rt().block_on(ApiClient::new(url).get(&format!("/v1/proof/state/node/{node}"))).expect("the node's record");
    let value = proof["value_hex"].as_str().or_else(|| proof["proof"]["value_hex"].as_str()).expect("value_hex");
    String::from_utf8_lossy(&hex::decode(value).unwrap()).into_owned()
}

#[test]
fn a_registered_node_joins_and_a_node_that_left_is_dropped() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let devnet = Devnet::start(w, &["--nodes", "4", "--base-ip", "127.0.51.2", "--base-port", "26000"]);
    let n1 = devnet.node(0).1;
    let dir = devnet.dir.to_str().unwrap().to_string();
    init_late_node(
        w,
        "127.0.51.30",
        26000,
        &devnet.dir.join("genesis.json"),
        &["--capacity", "10GiB", "--roles", "storage"],
    );

    // Not registered: it cannot start without --join, and with --join it is refused by every peer.
    let out = archipel(w, &["node", "run", "--config", "late/node.toml"]);
    assert!(!out.status.success() && stderr(&out).contains("--join"), "{}", stderr(&out));

    // Registered by the tenant (who pays and owns it), it joins, syncs and heartbeats.
    let tenant = format!("{dir}/tenant.key");
    let out = archipel(w, &["node", "register", "--config", "late/node.toml", "--key", &tenant, "--node", &n1]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("final in block"), "{}", stdout(&out));
    let log = std::fs::File::create(w.join("late.log")).unwrap();
    let late = std::process::Command::new(bin())
        .current_dir(w)
        .args(["node", "run", "--join", "--config", "late/node.toml"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let late = Kill(late);
    let late_url = "http://127.0.51.30:26001";
    wait("the new node catching up", Duration::from_secs(60), || {
        head(late_url).zip(head(&n1)).is_some_and(|(l, h)| l + 2 >= h && l > 0)
    });
    wait("the new node's lease up as n01 sees it", Duration::from_secs(30), || {
        lease_of(&n1, "late").as_deref() == Some("\"up\"")
    });

    // Its owner publishes a changed descriptor (node.toml edited): the registry holds the new one.
    let toml_path = w.join("late/node.toml");
    let toml = std::fs::read_to_string(&toml_path).unwrap();
    assert!(toml.contains("\"10GiB\""), "{toml}");
    std::fs::write(&toml_path, toml.replace("\"10GiB\"", "\"20GiB\"")).unwrap();
    // A funded stranger may not change it: refused with the reason, nothing changes.
    assert!(archipel(w, &["key", "gen", "--out", "stranger.key"]).status.success());
    let out = archipel(w, &["account", "transfer", "stranger.key", "1000000", "--key", &tenant, "--node", &n1]);
    assert!(out.status.success(), "{}", stderr(&out));
    let other = "stranger.key";
    let out = archipel(w, &["node", "update", "--config", "late/node.toml", "--key", other, "--node", &n1]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("may not change node"), "{}", stderr(&out));
    assert!(registered_descriptor(&n1, &late_id(w)).contains("\"10GiB\""));
    let out = archipel(w, &["node", "update", "--config", "late/node.toml", "--key", &tenant, "--node", &n1]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("updated node late"), "{}", stdout(&out));
    assert!(registered_descriptor(&n1, &late_id(w)).contains("\"20GiB\""));

    // It leaves: peers drop it; its chain stops while the network goes on.
    let out = archipel(w, &["node", "leave", "--config", "late/node.toml", "--key", &tenant, "--node", &n1]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait("n01 forgetting the node", Duration::from_secs(30), || lease_of(&n1, "late").is_none());
    std::thread::sleep(Duration::from_secs(3));
    let stopped = head(late_url).unwrap();
    let network = head(&n1).unwrap();
    wait("the network going on", Duration::from_secs(30), || head(&n1).unwrap() > network + 3);
    std::thread::sleep(Duration::from_secs(2));
    assert!(head(late_url).unwrap() <= stopped + 1, "a node that left no longer receives blocks");
    drop(late);
}
