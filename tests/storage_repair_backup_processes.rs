//! A repair whose duty holder is up but cannot do it is taken up by the next node in line, with
//! real processes: the duty holder of an object's repair is left without funds for the
//! `MoveShards` fee (it keeps heartbeating, so it stays the duty holder), a holder of the object
//! is killed, and the object must still be repaired — by a backup, after the fallback wait — and
//! read back byte-identical. Without backups the object would stay degraded for as long as its
//! duty holder stayed up.

mod common;

use archipel_types::NodeId;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn a_repair_its_duty_holder_cannot_pay_for_is_done_by_a_backup() {
    let work = tempfile::tempdir().unwrap();
    // Backups wait 3 s per place in line instead of a minute.
    let devnet = Devnet::start_with_env(
        work.path(),
        &["--base-ip", "127.0.96.2", "--base-port", "28000"],
        &[("ARCHIPEL_REPAIR_FALLBACK_SECS", "3")],
    );
    let w = work.path();
    let (_, api, _, _) = devnet.node(0);
    let dir = devnet.dir.to_str().unwrap().to_string();
    let tenant = format!("{dir}/tenant.key");
    let genesis_file = format!("{dir}/genesis.json");
    let t = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--key".into(), tenant.clone(), "--node".into(), api.clone()]);
        v
    };
    wait_storage_up(&api, 12);
    run(w, &args(&t(&["bucket", "create", "backup"])));
    let body: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let src = w.join("obj.bin");
    std::fs::write(&src, &body).unwrap();
    run(w, &args(&t(&["put", src.to_str().unwrap(), "backup/obj.bin"])));
    let stat = |key: &str| -> serde_json::Value {
        serde_json::from_str(&run(w, &args(&t(&["stat", key, "--json", "--genesis", &genesis_file])))).unwrap()
    };
    let before = stat("backup/obj.bin");
    let version: archipel_ledger::Hash = before["object"]["version"].as_str().unwrap().parse().unwrap();
    let holders: Vec<NodeId> =
        before["holders"].as_array().unwrap().iter().map(|h| h["node"].as_str().unwrap().parse().unwrap()).collect();
    let index_of = |id: &NodeId| (0..12).find(|i| devnet.id(*i) == *id).unwrap();

    // The holder to kill: not a validator (n01–n04), so the chain runs on unaffected.
    let victim = *holders.iter().find(|h| index_of(h) >= 4).expect("a holder that is not a validator");
    let victim_at = holders.iter().position(|h| *h == victim).unwrap();
    // Who repairs once it is down: ranked among the live storage nodes, all but the victim.
    let live: Vec<NodeId> = (0..12).map(|i| devnet.id(i)).filter(|n| *n != victim).collect();
    let seed = archipel_node::workers::repair_seed(&version);
    let duty = archipel_placement::duty_holder(&seed, live.iter().copied()).unwrap();
    let backups: Vec<NodeId> = live
        .iter()
        .copied()
        .filter(|n| {
            let rank = archipel_placement::duty_rank(&seed, live.iter().copied(), n).unwrap();
            (1..=archipel_node::workers::REPAIR_BACKUPS).contains(&rank)
        })
        .collect();
    assert_eq!(backups.len(), archipel_node::workers::REPAIR_BACKUPS);

    // The duty holder gives away all it has: it cannot pay the fee of a `MoveShards`.
    let duty_i = index_of(&duty);
    let (duty_name, duty_api, _, duty_config) = devnet.node(duty_i);
    let duty_key = duty_config.parent().unwrap().join("node.key");
    let genesis: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(devnet.dir.join("genesis.json")).unwrap()).unwrap();
    let fee = genesis["ledger"]["tx_fee_micro"].as_u64().unwrap();
    let balance = |id: &NodeId| -> u64 {
        let a: serde_json::Value =
            rt().block_on(archipel_node::client::ApiClient::new(&api).get(&format!("/v1/accounts/{id}"))).unwrap();
        a["balance_micro"].as_u64().unwrap_or(0)
    };
    let all = balance(&duty);
    assert!(all > fee, "the duty holder {duty_name} has {all} micro");
    let out = archipel(
        w,
        &[
            "account",
            "transfer",
            &devnet.id(0).to_string(),
            &(all - fee).to_string(),
            "--key",
            duty_key.to_str().unwrap(),
            "--node",
            &api,
        ],
    );
    assert!(out.status.success(), "draining {duty_name}: {}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(20);
    while balance(&duty) != 0 {
        assert!(Instant::now() < deadline, "{duty_name} still has {} micro", balance(&duty));
        std::thread::sleep(Duration::from_millis(200));
    }

    let workers_said = || {
        (0..12)
            .map(|i| {
                let (name, url, _, _) = devnet.node(i);
                let said =
                    rt().block_on(archipel_node::client::ApiClient::new(&url).get::<serde_json::Value>("/v1/workers"));
                format!("{name}: {}", said.map_or_else(|e| e.to_string(), |v| v.to_string()))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let repairs = |id: &NodeId| metric(&devnet.node(index_of(id)).1, "storage_repairs_submitted");

    // Kill the holder: past the repair grace (10 s) the duty holder tries and is refused; a
    // backup takes the repair up 3 s (first in line) or 6 s (second) after it saw the object
    // degraded, and moves the shard.
    kill9(devnet.node(index_of(&victim)).2);
    let duty_said = || {
        rt().block_on(archipel_node::client::ApiClient::new(&duty_api).get::<serde_json::Value>("/v1/workers"))
            .map(|v| v["repair"]["last"].to_string())
            .unwrap_or_default()
    };
    let mut duty_refused = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    let after = loop {
        // What the duty holder's repairer said at its steps (each stands for 2 s).
        let said = duty_said();
        if said.contains("refused") {
            duty_refused = Some(said);
        }
        let now = stat("backup/obj.bin");
        let at: NodeId = now["holders"][victim_at]["node"].as_str().unwrap().parse().unwrap();
        if at != victim {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "no repair within 90 s (duty holder {duty_name}, without funds); workers:\n{}",
            workers_said()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // The duty holder tried and was refused for want of funds; the repair was a backup's.
    let refused = duty_refused.unwrap_or_else(|| panic!("{duty_name} was never seen refused: {}", duty_said()));
    assert!(refused.contains("insufficient") || refused.contains("fee"), "{refused}");
    assert_eq!(repairs(&duty), 0.0, "{duty_name} could not pay, yet counted a repair");
    let by_backups: f64 = backups.iter().map(repairs).sum();
    assert!(by_backups >= 1.0, "no backup counted the repair; workers:\n{}", workers_said());
    // Every holder now is live, distinct, and the object reads back byte-identical.
    let now: Vec<NodeId> =
        after["holders"].as_array().unwrap().iter().map(|h| h["node"].as_str().unwrap().parse().unwrap()).collect();
    assert!(!now.contains(&victim), "{now:?}");
    assert_eq!(now.iter().collect::<std::collections::BTreeSet<_>>().len(), now.len(), "{now:?}");
    let back = w.join("back.bin");
    run(w, &args(&t(&["get", "backup/obj.bin", back.to_str().unwrap()])));
    assert!(std::fs::read(&back).unwrap() == body, "the repaired object reads back different");
}
