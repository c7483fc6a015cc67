//! Spam costs the spammer, with real processes: 100 funded accounts each flood 1,023 transfers
//! that are valid one by one against the finalized state — all behind a nonce that never comes,
//! half of them each spending the account's whole balance — while an honest account keeps
//! transferring. Judged alone, the flood would fill every mempool (102,300 > 100,000 entries that
//! no block can take) and the honest transfers would be refused `mempool_full`; judged per
//! account, every node keeps admitting and finalizing the honest transfers, and each flooding
//! account holds at most 17 entries.

mod common;

use archipel_crypto::Identity;
use archipel_ledger::export::put_record;
use archipel_ledger::{Payload, SignedTransaction, Transaction};
use archipel_node::client::ApiClient;
use archipel_node::ledger_api::{BatchItem, HeadView};
use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SPAMMERS: u64 = 100;
const FLOOD_PER_ACCOUNT: u64 = 1_023;
const FUNDS_MICRO: u64 = 1_000;
/// Most transactions in one `POST /v1/txs`.
const BATCH: usize = 1_000;

/// The devnet's network id, read once it is up.
static NETWORK: std::sync::OnceLock<archipel_ledger::Hash> = std::sync::OnceLock::new();

fn transfer(from: &Identity, nonce: u64, to: &Identity, amount_micro: u64) -> SignedTransaction {
    let network = NETWORK.get().expect("the network is read before signing");
    Transaction { signer: from.node_id(), nonce, payload: Payload::Transfer { to: to.node_id(), amount_micro } }
        .sign(from, network)
}

/// Posts `txs` to `POST /v1/txs` in batches; returns one answer per transaction.
fn post_batches(client: &ApiClient, txs: &[SignedTransaction]) -> Vec<BatchItem> {
    let mut out = Vec::new();
    for chunk in txs.chunks(BATCH) {
        let mut body = Vec::new();
        for t in chunk {
            put_record(&mut body, &t.to_bytes());
        }
        let answer =
            rt().block_on(client.raw("POST", "/v1/txs", body, Duration::from_secs(60))).expect("batch answered");
        let items: Vec<BatchItem> = serde_json::from_slice(&answer).expect("batch answer");
        assert_eq!(items.len(), chunk.len());
        out.extend(items);
    }
    out
}

fn nonce_of(client: &ApiClient, who: &Identity) -> u64 {
    let a: serde_json::Value = rt().block_on(client.get(&format!("/v1/accounts/{}", who.node_id()))).unwrap();
    a["nonce"].as_u64().unwrap()
}

#[test]
fn a_flood_of_gapped_and_overspending_transfers_leaves_honest_transfers_untouched() {
    let work = tempfile::tempdir().unwrap();
    let devnet = Devnet::start(work.path(), &["--nodes", "5", "--base-ip", "127.0.66.2", "--base-port", "26700"]);
    let clients: Vec<ApiClient> = (0..5).map(|i| ApiClient::new(&devnet.node(i).1)).collect();
    let tenant = Identity::load(&devnet.dir.join("tenant.key")).unwrap();
    let sink = Identity::from_seed(5_000_000);
    let _ = NETWORK.set(network(&devnet.node(0).1));

    // Fund the flooding accounts, and wait until that is final.
    let spammers: Vec<Identity> = (0..SPAMMERS).map(|i| Identity::from_seed(5_000_001 + i)).collect();
    let mut nonce = nonce_of(&clients[0], &tenant);
    let funding: Vec<SignedTransaction> =
        spammers.iter().enumerate().map(|(i, s)| transfer(&tenant, nonce + i as u64, s, FUNDS_MICRO)).collect();
    nonce += SPAMMERS;
    let answers = post_batches(&clients[0], &funding);
    assert!(answers.iter().all(|a| a.error.is_none()), "funding refused: {answers:?}");
    let last = transfer(&tenant, nonce, &sink, 1);
    nonce += 1;
    rt().block_on(clients[0].submit(&last, true)).expect("funding is final");
    // Every lease is Up before the flood, so "never Down" below means the flood cost none.
    wait_all_leases_up(&devnet.node(0).1);

    // Each account's flood, valid transaction by transaction: nonce 0 never comes (every later
    // nonce waits for it), and odd accounts spend the whole balance (amount + fee) each time.
    let started = Instant::now();
    let numbered: Vec<(usize, &Identity)> = spammers.iter().enumerate().collect();
    let floods: Vec<Vec<SignedTransaction>> = std::thread::scope(|scope| {
        let halves: Vec<_> = numbered
            .chunks(numbered.len() / 2)
            .map(|half| {
                let sink = &sink;
                scope.spawn(move || {
                    half.iter()
                        .map(|(i, s)| {
                            (0..FLOOD_PER_ACCOUNT)
                                .map(|k| match i % 2 {
                                    0 => transfer(s, k + 1, sink, 1),
                                    _ => transfer(s, k + 1, sink, FUNDS_MICRO - 1),
                                })
                                .collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        halves.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    eprintln!("{} flood transactions signed in {:?}", floods.iter().map(Vec::len).sum::<usize>(), started.elapsed());

    // The flood goes to every node at once (each account to one node) while the honest account
    // transfers, each waiting until final.
    let (flood_answers, honest) = std::thread::scope(|scope| {
        let flooding = scope.spawn(|| {
            let mut codes: BTreeMap<String, usize> = BTreeMap::new();
            let mut admitted_per_account = Vec::new();
            for (i, flood) in floods.iter().enumerate() {
                let answers = post_batches(&clients[i % clients.len()], flood);
                admitted_per_account.push(answers.iter().filter(|a| a.error.is_none()).count());
                for a in answers {
                    *codes.entry(a.error.unwrap_or_else(|| "admitted".into())).or_default() += 1;
                }
            }
            (codes, admitted_per_account)
        });
        let mut honest = Vec::new();
        let mut i = 0;
        while !flooding.is_finished() || i < 10 {
            let t = transfer(&tenant, nonce, &sink, 1);
            nonce += 1;
            let at = Instant::now();
            let client = &clients[i % clients.len()];
            match rt().block_on(client.submit(&t, true)) {
                Ok(r) => honest.push((at.elapsed(), r.status)),
                Err(e) => panic!("honest transfer {i} via {} refused or not final: {e}", client.base()),
            }
            i += 1;
        }
        (flooding.join().unwrap(), honest)
    });
    let (codes, admitted_per_account) = flood_answers;
    let latencies: Vec<Duration> = honest.iter().map(|(d, _)| *d).collect();
    eprintln!("flood answers: {codes:?}; honest transfers submit -> final: {latencies:?}");
    assert!(
        codes.keys().all(|c| ["admitted", "nonce_gap", "overspend"].contains(&c.as_str())),
        "every refusal names the spam limit: {codes:?}"
    );
    assert!(codes["nonce_gap"] > 0 && codes["overspend"] > 0, "{codes:?}");
    assert!(
        admitted_per_account.iter().all(|n| *n <= 17),
        "an account holds at most 1 + 16 gapped entries: {admitted_per_account:?}"
    );
    assert!(honest.len() >= 10);
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    assert!(slowest < Duration::from_secs(10), "an honest transfer took {slowest:?} to finalize during the flood");
    // The flood never cost a node its lease.
    let alive: Vec<_> = (0..5).map(|i| devnet.id(i)).collect();
    assert_never_down(&devnet.node(0).1, &alive);
    assert!(honest.iter().all(|(_, s)| matches!(s, archipel_consensus::TxStatus::Final(_))));

    // No mempool is anywhere near its capacity: 16 entries of each gapped account and one of each
    // overspending account wait out their time-to-live.
    for client in &clients {
        let head: HeadView = rt().block_on(client.get("/v1/ledger/head")).unwrap();
        assert!(head.mempool <= (SPAMMERS as usize) * 17, "{} holds {} transactions", client.base(), head.mempool);
    }
}
