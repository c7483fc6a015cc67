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

    // The duty holder gives away all it has: it cannot pay the fee of a `MoveShards`.
    let duty_i = index_of(&duty);
    let (duty_name, _, _, duty_config) = devnet.node(duty_i);
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
            &tenant,
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
    // A node's counter, from a node that must answer (an unreachable one is a failure, not 0).
    let counter = |id: &NodeId, name: &str| -> f64 {
        let url = devnet.node(index_of(id)).1;
        let text = rt().block_on(archipel_node::client::ApiClient::new(&url).metrics_text());
        let text = text.unwrap_or_else(|e| panic!("{url} did not answer /metrics: {e}"));
        text.lines()
            .filter(|l| !l.starts_with('#') && l.split_whitespace().next().is_some_and(|n| n.ends_with(name)))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    };
    let height_at_kill = {
        let v: serde_json::Value =
            rt().block_on(archipel_node::client::ApiClient::new(&api).get("/v1/ledger/head")).unwrap();
        v["header"]["height"].as_u64().unwrap()
    };

    // Kill the holder: past the repair grace (10 s) the duty holder tries and is refused; the
    // next in line takes the repair up 3 s after it saw the object degraded (the one after it
    // 6 s…), and moves the shard.
    kill9(devnet.node(index_of(&victim)).2);
    let killed_at = Instant::now();
    // 60 s: the grace, the backup's 3 s wait and the rebuild, with room for a slow box; with the
    // default wait (a minute, after the 10 s grace and a lease) the repair could not land this soon.
    let deadline = killed_at + Duration::from_secs(60);
    let after = loop {
        let now = stat("backup/obj.bin");
        let at: NodeId = now["holders"][victim_at]["node"].as_str().unwrap().parse().unwrap();
        if at != victim {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "no repair within 60 s (duty holder {duty_name}, without funds); workers:\n{}",
            workers_said()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // The duty holder tried, and its own mempool refused the move for want of funds.
    assert!(
        counter(&duty, "storage_repairs_refused") >= 1.0,
        "{duty_name} never tried the repair; workers:\n{}",
        workers_said()
    );
    assert_eq!(counter(&duty, "storage_repairs_submitted"), 0.0, "{duty_name} could not pay, yet submitted");
    // The move the ledger took was signed by a node further down the line, within the places
    // the waits reach by then (3 s each).
    let mut movers = Vec::new();
    let mut from = height_at_kill;
    loop {
        let page: Vec<archipel_node::ledger_api::BlockView> = rt()
            .block_on(
                archipel_node::client::ApiClient::new(&api).get(&format!("/v1/ledger/blocks?from={from}&limit=500")),
            )
            .unwrap();
        let Some(last) = page.last().map(|b| b.header.height) else { break };
        for b in &page {
            for t in &b.txs {
                if let archipel_ledger::Payload::MoveShards { version: v, .. } = &t.tx.tx.payload
                    && *v == version
                {
                    movers.push(t.tx.tx.signer);
                }
            }
        }
        from = last + 1;
    }
    assert_eq!(movers.len(), 1, "one move of the object after the kill: {movers:?}");
    let mover_rank = archipel_placement::duty_rank(&seed, live.iter().copied(), &movers[0]);
    let reach = (killed_at.elapsed().as_secs() / 3) as usize;
    assert!(
        mover_rank.is_some_and(|r| (1..=reach).contains(&r)),
        "the move came from place {mover_rank:?} in line (the waits reach place {reach})"
    );
    assert!(counter(&movers[0], "storage_repairs_submitted") >= 1.0);
    // Every holder now is live, distinct, and the object reads back byte-identical.
    let now: Vec<NodeId> =
        after["holders"].as_array().unwrap().iter().map(|h| h["node"].as_str().unwrap().parse().unwrap()).collect();
    assert!(!now.contains(&victim), "{now:?}");
    assert_eq!(now.iter().collect::<std::collections::BTreeSet<_>>().len(), now.len(), "{now:?}");
    let back = w.join("back.bin");
    run(w, &args(&t(&["get", "backup/obj.bin", back.to_str().unwrap()])));
    assert!(std::fs::read(&back).unwrap() == body, "the repaired object reads back different");
}
