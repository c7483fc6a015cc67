//! The ledger from a user's side, with real processes: transfers that wait for finality, every
//! kind of bad transaction refused at submission with its reason, proofs verified offline (and
//! refused when tampered), exports verified offline (and a changed byte named by block height),
//! the genesis each verification trusted (and `--genesis-hash`), `ledger tail/show` (also with
//! its reader gone, as in `ledger tail | head`) and lease status in `archipel nodes`.

mod common;

use archipel_crypto::Identity;
use archipel_ledger::{Payload, SignedTransaction, Transaction};
use archipel_node::client::{ApiClient, ClientError};
use common::*;
use std::time::Duration;

fn tenant(devnet: &Devnet) -> Identity {
    Identity::load(&devnet.dir.join("tenant.key")).unwrap()
}

fn balance(node: &str, who: &Identity) -> u64 {
    let a: serde_json::Value =
        rt().block_on(ApiClient::new(node).get(&format!("/v1/accounts/{}", who.node_id()))).unwrap();
    a["balance_micro"].as_u64().unwrap()
}

fn refused(client: &ApiClient, body: Vec<u8>) -> (u16, String) {
    match rt().block_on(client.raw("POST", "/v1/tx", body, Duration::from_secs(10))) {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn transfers_proofs_exports_and_bad_transactions() {
    let work = tempfile::tempdir().unwrap();
    let devnet = Devnet::start(work.path(), &["--nodes", "5", "--base-ip", "127.0.50.2", "--base-port", "25900"]);
    let node = devnet.node(4).1; // a follower: it gossips to the validators
    let dir = devnet.dir.to_str().unwrap().to_string();
    let w = work.path();
    let genesis = format!("{dir}/genesis.json");
    let key = format!("{dir}/tenant.key");
    let n5_key = devnet.node(4).3.parent().unwrap().join("node.key");
    let n5 = Identity::load(&n5_key).unwrap();

    // A transfer waits for finality and shows up in the balance (devnet nodes start funded for
    // their own fees).
    let n5_start = balance(&node, &n5);
    let out = archipel(
        w,
        &["account", "transfer", n5_key.to_str().unwrap(), "1234", "--key", &key, "--node", &node, "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["status"], "final", "{r}");
    let tx_hash = r["hash"].as_str().unwrap().to_string();
    let out = archipel(w, &["account", "show", &n5.node_id().to_string(), "--node", &node, "--json"]);
    let a: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(a["balance_micro"], n5_start + 1234);

    // Bad transactions are refused at submission with the reason; nothing is applied.
    let client = ApiClient::new(&node);
    let t = tenant(&devnet);
    let nonce =
        rt().block_on(client.get::<serde_json::Value>(&format!("/v1/accounts/{}", t.node_id()))).unwrap()["nonce"]
            .as_u64()
            .unwrap();
    let net = network(&node);
    let tx = |signer: &Identity, nonce: u64, amount: u64| -> SignedTransaction {
        Transaction {
            signer: signer.node_id(),
            nonce,
            payload: Payload::Transfer { to: n5.node_id(), amount_micro: amount },
        }
        .sign(signer, &net)
    };
    assert_eq!(refused(&client, tx(&t, nonce - 1, 1).to_bytes()), (400, "replayed_nonce".into()));
    // The same transfer signed for another network (same key, same nonce) is refused: signatures
    // are bound to the genesis hash.
    let foreign =
        Transaction { signer: t.node_id(), nonce, payload: Payload::Transfer { to: n5.node_id(), amount_micro: 1 } }
            .sign(&t, &archipel_ledger::Hash([0x0f; 32]));
    assert_eq!(refused(&client, foreign.to_bytes()), (400, "bad_signature".into()));
    let mut forged = tx(&t, nonce, 1);
    forged.tx.payload = Payload::Transfer { to: t.node_id(), amount_micro: 1 };
    assert_eq!(refused(&client, forged.to_bytes()), (400, "bad_signature".into()));
    assert_eq!(refused(&client, b"not a transaction".to_vec()), (400, "malformed".into()));
    assert_eq!(refused(&client, vec![0u8; 20_000]), (400, "too_large".into()));
    assert_eq!(refused(&client, tx(&t, nonce, u64::MAX / 2).to_bytes()), (400, "insufficient_funds".into()));
    assert_eq!(refused(&client, tx(&t, nonce + 100_000, 1).to_bytes()), (400, "nonce_too_far_ahead".into()));
    let stranger = Identity::from_seed(424242);
    assert_eq!(refused(&client, tx(&stranger, 0, 1).to_bytes()), (400, "insufficient_funds".into()));
    let out = archipel(w, &["account", "show", &n5.node_id().to_string(), "--node", &node, "--json"]);
    let a: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(a["balance_micro"], n5_start + 1234, "refused transactions changed nothing");

    // Proofs verify offline against the genesis, and not once tampered.
    let proof = w.join("tx-proof.json");
    let out = archipel(w, &["proof", "get", &format!("tx/{tx_hash}"), "-o", proof.to_str().unwrap(), "--node", &node]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = archipel(w, &["genesis", "show", &genesis, "--json"]);
    let genesis_hash =
        serde_json::from_str::<serde_json::Value>(&stdout(&out)).unwrap()["hash"].as_str().unwrap().to_string();
    let other_hash = "ab".repeat(32);
    let out = archipel(w, &["proof", "verify", proof.to_str().unwrap(), "--genesis", &genesis]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&tx_hash), "{}", stdout(&out));
    // Each verification names the genesis it trusted; --genesis-hash must be that genesis's.
    assert!(stdout(&out).contains(&genesis_hash) && stdout(&out).contains("--genesis file"), "{}", stdout(&out));
    assert!(!stderr(&out).contains("note:"), "{}", stderr(&out));
    let p = proof.to_str().unwrap();
    let out = archipel(w, &["proof", "verify", p, "--genesis", &genesis, "--genesis-hash", &genesis_hash, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["trusted_genesis"]["hash"], genesis_hash.as_str(), "{v}");
    assert_eq!(v["trusted_genesis"]["source"], "genesis_file", "{v}");
    let out = archipel(w, &["proof", "verify", p, "--genesis", &genesis, "--genesis-hash", &other_hash]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&genesis_hash) && stderr(&out).contains(&other_hash), "{}", stderr(&out));
    let state_proof = w.join("state-proof.json");
    let key_arg = format!("account/{}", n5.node_id());
    let out = archipel(w, &["proof", "get", &key_arg, "-o", state_proof.to_str().unwrap(), "--node", &node]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = archipel(w, &["proof", "verify", state_proof.to_str().unwrap(), "--genesis", &genesis, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1234"), "{}", stdout(&out));
    // An account that never appeared: its absence is proven, and cannot be passed off as a balance.
    let absent_proof = w.join("absent-proof.json");
    let absent_key = format!("account/{}", Identity::from_seed(4_242).node_id());
    let out = archipel(w, &["proof", "get", &absent_key, "-o", absent_proof.to_str().unwrap(), "--node", &node]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = archipel(w, &["proof", "verify", absent_proof.to_str().unwrap(), "--genesis", &genesis]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("has no entry"), "{}", stdout(&out));
    let mut p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&absent_proof).unwrap()).unwrap();
    p["value_hex"] = serde_json::Value::String(format!("{:032x}", 999_999u128 << 64));
    let tampered = w.join("tampered.json");
    std::fs::write(&tampered, p.to_string()).unwrap();
    let out = archipel(w, &["proof", "verify", tampered.to_str().unwrap(), "--genesis", &genesis]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("has no entry"), "{}", stderr(&out));
    let mut p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_proof).unwrap()).unwrap();
    p["value_hex"] = serde_json::Value::String(format!("{:032x}", 999_999u128 << 64));
    let tampered = w.join("tampered.json");
    std::fs::write(&tampered, p.to_string()).unwrap();
    let out = archipel(w, &["proof", "verify", tampered.to_str().unwrap(), "--genesis", &genesis]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not under the state root"), "{}", stderr(&out));
    let mut p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&proof).unwrap()).unwrap();
    p["certificate"] = serde_json::Value::String("00".repeat(100));
    std::fs::write(&tampered, p.to_string()).unwrap();
    let out = archipel(w, &["proof", "verify", tampered.to_str().unwrap(), "--genesis", &genesis]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not shown final"), "{}", stderr(&out));

    // Export, verify offline; a changed byte fails verify naming the block height.
    let export = w.join("chain.bin");
    let out = archipel(w, &["ledger", "export", export.to_str().unwrap(), "--node", &node]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = archipel(w, &["ledger", "export", export.to_str().unwrap(), "--node", &node]);
    assert!(!out.status.success() && stderr(&out).contains("already exists"), "refuses to overwrite");
    let out = archipel(w, &["ledger", "verify", export.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let blocks = v["blocks"].as_u64().unwrap();
    assert!(blocks > 0);
    // Without --genesis or --genesis-hash, the export's own genesis was trusted: said plainly.
    assert_eq!(v["trusted_genesis"]["source"], "file_itself", "{v}");
    assert_eq!(v["trusted_genesis"]["hash"], genesis_hash.as_str(), "{v}");
    assert!(stderr(&out).contains("no --genesis or --genesis-hash given") && stderr(&out).contains(&genesis_hash));
    let e = export.to_str().unwrap();
    let out = archipel(w, &["ledger", "verify", e, "--genesis-hash", &genesis_hash]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&genesis_hash) && !stderr(&out).contains("note:"), "{}", stdout(&out));
    let out = archipel(w, &["ledger", "verify", e, "--genesis", &genesis, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["trusted_genesis"]["source"], "genesis_file", "{v}");
    let out = archipel(w, &["ledger", "verify", e, "--genesis-hash", &other_hash]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&genesis_hash) && stderr(&out).contains(&other_hash), "{}", stderr(&out));
    let out = archipel(w, &["ledger", "verify", e, "--genesis-hash", &genesis_hash[..12]]);
    assert!(!out.status.success() && stderr(&out).contains("64 hex characters"), "{}", stderr(&out));
    let bytes = std::fs::read(&export).unwrap();
    let bad = w.join("bad.bin");
    // The last byte (the last block's certificate), a byte of the genesis's network name (caught
    // at block 1: the genesis hash is in the genesis state, so block 1's parent link no longer
    // matches — whether or not block 1 carries its own certificate, which a slow node may have
    // finalized only as the ancestor of a later one; at 0 when the genesis is pinned).
    for (at, height, pin) in [(bytes.len() - 1, blocks, false), (40, 1, false), (40, 0, true)] {
        let mut b = bytes.clone();
        b[at] ^= 0x04;
        std::fs::write(&bad, &b).unwrap();
        let mut args = vec!["ledger", "verify", bad.to_str().unwrap(), "--json"];
        if pin {
            args.extend(["--genesis", &genesis]);
        }
        let out = archipel(w, &args);
        assert!(!out.status.success());
        let e: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(e["height"], height, "byte {at}: {e}");
    }
    std::fs::write(&bad, b"garbage").unwrap();
    let out = archipel(w, &["ledger", "verify", bad.to_str().unwrap()]);
    assert!(!out.status.success() && stderr(&out).contains("not an archipel ledger export"), "{}", stderr(&out));

    // Follow and show blocks.
    let out = archipel(w, &["ledger", "tail", "--count", "2", "--node", &node]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2, "{}", stdout(&out));
    let out = archipel(w, &["ledger", "show", "1", "--node", &node]);
    assert!(out.status.success() && stdout(&out).contains("state root"), "{}", stdout(&out));
    // `ledger tail | head -1`: once the reader is gone, tail ends quietly with status 0.
    let mut tail = std::process::Command::new(bin())
        .args(["ledger", "tail", "--from", "1", "--node", &node])
        .env("RUST_BACKTRACE", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(tail.stdout.take().unwrap()), &mut first).unwrap();
    assert!(first.starts_with("#1 "), "{first}");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = tail.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "tail still runs with no reader");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut tail.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!((status.code(), err.as_str()), (Some(0), ""));
    let out = archipel(w, &["ledger", "show", &tx_hash, "--node", &node]);
    assert!(stdout(&out).contains("\"final\""), "{}", stdout(&out));
    let out = archipel(w, &["ledger", "show", "99999999", "--node", &node]);
    assert!(!out.status.success() && stderr(&out).contains("not finalized yet"), "{}", stderr(&out));

    // One transaction pays several recipients, all or none, one fee per recipient.
    let n4 = Identity::load(&devnet.node(3).3.parent().unwrap().join("node.key")).unwrap();
    let list = w.join("payroll.txt");
    std::fs::write(
        &list,
        format!(
            "# who, how much\n{},100\n{} 200   # key file\n\n{}\t3\n",
            n4.node_id(),
            n5_key.display(),
            n4.node_id()
        ),
    )
    .unwrap();
    let n4_before = balance(&node, &n4);
    let out = archipel(w, &["account", "pay", list.to_str().unwrap(), "--key", &key, "--node", &node]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("paid 303 micro to 3 recipients — final in block"), "{}", stdout(&out));
    assert_eq!(balance(&node, &n4), n4_before + 103);
    assert_eq!(balance(&node, &n5), n5_start + 1234 + 200);
    // A list the tenant cannot cover moves nothing and says why.
    let tenant_balance = balance(&node, &tenant(&devnet));
    std::fs::write(&list, format!("{} 1\n{} {}\n", n4.node_id(), n5.node_id(), tenant_balance - 2)).unwrap();
    let out = archipel(w, &["account", "pay", list.to_str().unwrap(), "--key", &key, "--node", &node]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("insufficient_funds"), "{}", stderr(&out));
    assert_eq!(balance(&node, &tenant(&devnet)), tenant_balance);
    assert_eq!(balance(&node, &n4), n4_before + 103, "all or none");
    // A malformed list is refused before anything is signed, naming the line.
    std::fs::write(&list, "nobody 5\n").unwrap();
    let out = archipel(w, &["account", "pay", list.to_str().unwrap(), "--key", &key, "--node", &node]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("line 1"), "{}", stderr(&out));
    std::fs::write(&list, "# nothing\n").unwrap();
    let out = archipel(w, &["account", "pay", list.to_str().unwrap(), "--key", &key, "--node", &node]);
    assert!(stderr(&out).contains("lists 0 payments: one transaction pays 1 to 200 recipients"), "{}", stderr(&out));

    // Every node heartbeats: all leases are up in finalized state.
    let start = std::time::Instant::now();
    loop {
        let out = archipel(w, &["nodes", "--json", "--node", &node]);
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        let leases: Vec<_> = v["nodes"].as_array().unwrap().iter().map(|n| n["lease"].clone()).collect();
        if leases.iter().all(|l| l == "up") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "leases not all up: {leases:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}
