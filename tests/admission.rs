//! Real processes: a node added after genesis. Without a validator quorum it cannot start; with
//! approvals from 3 of 4 validators (`archipel node admit`) every node admits it — at the p2p layer
//! and in its peer table — and sees it up.

mod common;

use archipel_node::membership::PeerStatus;
use common::*;
use std::time::Duration;

#[test]
fn node_joins_after_genesis_with_a_validator_quorum() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let devnet = Devnet::start(w, &["--nodes", "4", "--base-ip", "127.0.45.2", "--base-port", "25400"]);
    let genesis = devnet.dir.join("genesis.json");
    init_late_node(w, "127.0.45.50", 25400, &genesis, &[]);
    let out = archipel(w, &["node", "descriptor", "--config", "late/node.toml", "--out", "late.json"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = archipel(w, &["node", "run", "--config", "late/node.toml"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not one of the nodes in genesis"), "{}", stderr(&out));

    let admit = |validator: &str| {
        let cfg = devnet.dir.join("nodes").join(validator).join("node.toml");
        archipel(
            w,
            &[
                "node",
                "admit",
                "--config",
                cfg.to_str().unwrap(),
                "--descriptor",
                "late.json",
                "--admission",
                "admission.json",
            ],
        )
    };
    let out = admit("n01");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1 of 3"), "{}", stdout(&out));
    let out = archipel(w, &["node", "run", "--config", "late/node.toml", "--admission", "admission.json"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("1 valid validator approvals of the 3"), "{}", stderr(&out));

    assert!(admit("n02").status.success());
    let out = admit("n03");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("quorum reached"), "{}", stdout(&out));

    let mut late = spawn(w, &["node", "run", "--config", "late/node.toml", "--admission", "admission.json"]);
    // n04 never received the submission: it learns the admission by gossip.
    let (_, url4, _, _) = devnet.node(3);
    for url in [devnet.node(0).1, url4, "http://127.0.45.50:25401".to_string()] {
        wait_view(&url, Duration::from_secs(20), "late node admitted and up everywhere", |v| {
            v.nodes.len() == 5 && v.nodes.iter().all(|n| n.status == PeerStatus::Up)
        });
    }
    // The admission is persisted: n04 stores it in its data directory.
    let stored = std::fs::read_to_string(devnet.dir.join("nodes/n04/data/admissions.json")).unwrap();
    assert!(stored.contains("late-op"), "{stored}");
    let _ = late.kill();
    let _ = late.wait();
}
