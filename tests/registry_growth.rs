//! Real processes: membership growth never crashes a node. On the default 12-node devnet, 200
//! nodes registered on the ledger (registration transactions only; the nodes never run) leave all
//! 12 processes running and finalizing — 17 registrations used to crash every node with "peer set
//! too large". On a network whose genesis allows 2 registered nodes, the third registration is
//! refused with the reason, and a node leaving makes room again.

mod common;

use archipel_crypto::{Identity, SignedDescriptor};
use archipel_ledger::{Payload, SignedTransaction, Transaction};
use archipel_node::client::ApiClient;
use archipel_node::genesis::Genesis;
use archipel_node::ledger_api::{AccountView, BatchItem, HeadView};
use archipel_types::NodeDescriptor;
use common::*;
use std::net::SocketAddr;
use std::path::Path;
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

/// The next nonce of `account` in `url`'s finalized state, if the node answers.
fn next_nonce(url: &str, account: &Identity) -> Option<u64> {
    let view: AccountView =
        rt().block_on(ApiClient::new(url).get(&format!("/v1/accounts/{}", account.node_id()))).ok()?;
    Some(view.account.nonce)
}

/// Panics naming the first node process that is gone (the crash this file guards against killed
/// every node within a second).
fn assert_all_alive(devnet: &Devnet) {
    for i in 0..12 {
        let (name, _, pid, _) = devnet.node(i);
        assert!(alive(pid), "node {name} (pid {pid}) exited: see {}", devnet.dir.join("logs").display());
    }
}

/// A storage node that is never started, at `p2p` (nothing listens there).
fn unstarted_node(i: usize, p2p: SocketAddr) -> (Identity, SignedDescriptor) {
    let identity = Identity::generate();
    let d = NodeDescriptor {
        node_id: identity.node_id(),
        name: format!("grown-{i}"),
        operator: "growth-op".into(),
        region: "eu-fr".parse().unwrap(),
        country: "FR".parse().unwrap(),
        operator_jurisdiction: "FR".parse().unwrap(),
        capacity: "1GiB".parse().unwrap(),
        roles: "storage".parse().unwrap(),
        p2p_address: p2p,
        p2p_egress_ip: None,
        api_address: SocketAddr::new(p2p.ip(), p2p.port() + 1),
        version: 1,
    };
    let signed = SignedDescriptor::sign(&identity, d).unwrap();
    (identity, signed)
}

/// Submits `txs` in one `POST /v1/txs` and asserts none was refused.
fn submit_batch(url: &str, txs: &[SignedTransaction]) {
    let mut body = Vec::new();
    for t in txs {
        let bytes = t.to_bytes();
        body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        body.extend_from_slice(&bytes);
    }
    let answer = rt()
        .block_on(ApiClient::new(url).raw("POST", "/v1/txs", body, Duration::from_secs(30)))
        .expect("batch submitted");
    let items: Vec<BatchItem> = serde_json::from_slice(&answer).expect("batch answer");
    assert_eq!(items.len(), txs.len());
    for item in items {
        assert!(item.error.is_none(), "refused: {:?} {:?}", item.error, item.message);
    }
}

#[test]
fn two_hundred_registrations_leave_every_devnet_node_running_and_finalizing() {
    let work = tempfile::tempdir().unwrap();
    let mut devnet = Devnet::start(work.path(), &["--base-ip", "127.0.71.2", "--base-port", "26600"]);
    assert_eq!(devnet.pids().len(), 12);
    let urls: Vec<String> = (0..12).map(|i| devnet.node(i).1).collect();
    let n1 = urls[0].clone();
    let tenant = Identity::load(&devnet.dir.join("tenant.key")).unwrap();
    let network = Genesis::load(&devnet.dir.join("genesis.json")).unwrap().network_hash();
    wait("a first finalized block", Duration::from_secs(30), || head(&n1).is_some_and(|h| h > 0));

    // 200 registrations by the tenant, each with its node's consent, in batches of 50, each batch
    // final before the next (as many `archipel node register` calls would be, only faster).
    let mut nonce = next_nonce(&n1, &tenant).expect("the tenant's account");
    let started = Instant::now();
    for batch in 0..4 {
        let txs: Vec<SignedTransaction> = (0..50)
            .map(|j| {
                let i = batch * 50 + j;
                let p2p = SocketAddr::from(([127, 0, 72, (i % 200) as u8 + 2], 26700));
                let (node, descriptor) = unstarted_node(i, p2p);
                let payload = Payload::register_node(&node, &network, &tenant.node_id(), descriptor);
                let tx = Transaction { signer: tenant.node_id(), nonce, payload }.sign(&tenant, &network);
                nonce += 1;
                tx
            })
            .collect();
        submit_batch(&n1, &txs);
        wait("the batch final", Duration::from_secs(30), || {
            assert_all_alive(&devnet);
            next_nonce(&n1, &tenant) == Some(nonce)
        });
    }
    eprintln!("200 registrations final in {:?}", started.elapsed());

    // Every node follows the registry (212 nodes), keeps running and keeps finalizing.
    for url in &urls {
        wait("the registry of 212 nodes in the node's table", Duration::from_secs(30), || {
            assert_all_alive(&devnet);
            rt().block_on(ApiClient::new(url).nodes()).is_ok_and(|v| v.nodes.len() == 212)
        });
    }
    let heads: Vec<u64> = urls.iter().map(|u| head(u).expect("head")).collect();
    std::thread::sleep(Duration::from_secs(3));
    for (url, before) in urls.iter().zip(&heads) {
        wait("the head advancing", Duration::from_secs(10), || head(url).is_some_and(|h| h >= before + 2));
    }
    assert_all_alive(&devnet);
    while let Ok(line) = devnet.lines.try_recv() {
        devnet.seen.push(line);
    }
    assert!(!devnet.seen.iter().any(|l| l.contains("exited")), "{}", devnet.seen.join("\n"));
    let balance: AccountView =
        rt().block_on(ApiClient::new(&n1).get(&format!("/v1/accounts/{}", tenant.node_id()))).unwrap();
    let deposit = archipel_ledger::LedgerParams::default().node_deposit_micro;
    assert!(balance.account.balance_micro <= 1_000_000_000_000 - 200 * deposit, "200 deposits locked");
}

/// `archipel node init` of a node `name` listening on `ip` (p2p `port`, API `port + 1`).
fn init(work: &Path, name: &str, ip: &str, port: u16, roles: &str) {
    let p2p = format!("{ip}:{port}");
    let api = format!("{ip}:{}", port + 1);
    let out = archipel(
        work,
        &[
            "node",
            "init",
            "--dir",
            name,
            "--name",
            name,
            "--region",
            "eu-de",
            "--country",
            "DE",
            "--operator",
            "acme",
            "--operator-jurisdiction",
            "DE",
            "--roles",
            roles,
            "--p2p-listen",
            &p2p,
            "--api-listen",
            &api,
            "--p2p-egress-ip",
            "127.0.0.1",
            "--genesis",
            "../genesis.json",
        ],
    );
    assert!(out.status.success(), "init {name}: {}", stderr(&out));
}

#[test]
fn a_full_registry_refuses_registration_with_the_reason() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A one-validator network whose genesis allows 2 registered nodes: itself and one more.
    init(w, "a", "127.0.73.2", 26800, "validator,storage");
    for late in ["late1", "late2"] {
        let ip = if late == "late1" { "127.0.73.3" } else { "127.0.73.4" };
        init(w, late, ip, 26800, "storage");
    }
    assert!(archipel(w, &["node", "descriptor", "--config", "a/node.toml", "--out", "a.json"]).status.success());
    assert!(archipel(w, &["key", "gen", "--out", "tenant.key"]).status.success());
    let out = archipel(
        w,
        &["genesis", "new", "--network", "small-net", "--node", "a.json", "--account", "t:tenant.key:10000000"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let path = w.join("genesis.json");
    let mut g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    g["ledger"]["max_registered_nodes"] = 2.into();
    std::fs::write(&path, serde_json::to_string_pretty(&g).unwrap()).unwrap();

    let mut a = spawn(w, &["node", "run", "--config", "a/node.toml"]);
    let url = "http://127.0.73.2:26801";
    wait("a first finalized block", Duration::from_secs(30), || head(url).is_some_and(|h| h > 0));
    let register = |late: &str| {
        archipel(
            w,
            &["node", "register", "--config", &format!("{late}/node.toml"), "--key", "tenant.key", "--node", url],
        )
    };
    let out = register("late1");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = register("late2");
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("registry_full") || err.contains("registry is full"), "{err}");
    assert!(err.contains("2 of 2 nodes") && err.contains("max_registered_nodes"), "{err}");

    // A node leaving makes room, and its deposit goes back to its owner (less the leave's fee).
    let tenant = Identity::load(&w.join("tenant.key")).unwrap().node_id();
    let balance = || {
        rt().block_on(ApiClient::new(url).get::<AccountView>(&format!("/v1/accounts/{tenant}")))
            .unwrap()
            .account
            .balance_micro
    };
    let before_leave = balance();
    let out = archipel(w, &["node", "leave", "--config", "late1/node.toml", "--key", "tenant.key", "--node", url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (deposit, fee) =
        (g["ledger"]["node_deposit_micro"].as_u64().unwrap(), g["ledger"]["tx_fee_micro"].as_u64().unwrap());
    wait("the deposit back", Duration::from_secs(10), || balance() == before_leave + deposit - fee);
    let out = register("late2");
    assert!(out.status.success(), "{}", stderr(&out));
    let before = head(url).unwrap();
    wait("the network going on", Duration::from_secs(10), || head(url).is_some_and(|h| h > before));
    assert!(a.try_wait().unwrap().is_none(), "the node is still running");
    let _ = a.kill();
    let _ = a.wait();
}
