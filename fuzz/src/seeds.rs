//! The seed corpus: valid encodings for every target, built from the shared network with the
//! project's own encoders, so fuzzing starts from inputs that pass every check and mutates
//! inwards. `fuzz/corpus/<target>/seed-*` are these bytes, written by
//! `ARCHIPEL_FUZZ_WRITE_SEEDS=1 cargo test -p archipel-node --test fuzz_decoders`; the harness
//! fails when they differ from what the code builds today.

use super::fixture::{Network, descriptor, network};
use archipel_consensus::block::{BlockCfg, LedgerBlock, digest_of};
use archipel_consensus::candidates::{self, FetchMessage};
use archipel_consensus::store::{BlockStore, FileStore, Record};
use archipel_crypto::{Admission, Identity, SignedDescriptor};
use archipel_ledger::export::{push_block, put_record, start};
use archipel_ledger::{
    AliveProof, Block, BlockHeader, Hash, LivenessChange, Payload, Signatures, State, StateKey, StateProof,
    Transaction, TxProof, merkle, propose,
};
use archipel_node::config::{ApiConfig, NodeConfig, P2pConfig};
use archipel_node::ledger_api::{AnyProof, Proof};
use archipel_node::ledger_verify;
use archipel_node::membership::GossipMessage;
use commonware_codec::Encode as _;
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_consensus::simplex::types::{Finalization, Finalize, Proposal};
use commonware_consensus::types::{Epoch, Round, View};
use commonware_cryptography::blake3::Digest;
use commonware_parallel::Sequential;
use commonware_utils::iter::NonEmpty;
use commonware_utils::ordered::Set;
use std::sync::atomic::{AtomicU64, Ordering};

/// One seed: its target, its name (the file is `fuzz/corpus/<target>/seed-<name>`) and its bytes.
pub type Seed = (&'static str, String, Vec<u8>);

/// Two blocks on the genesis with a transaction of every kind, the states after them, and a
/// finality certificate of the second (the first is final as its ancestor).
struct Chain {
    txs: Vec<archipel_ledger::SignedTransaction>,
    blocks: Vec<Block>,
    states: Vec<State>,
    certificate: Vec<u8>,
}

fn sign(who: &Identity, network: &Hash, nonce: u64, payload: Payload) -> archipel_ledger::SignedTransaction {
    Transaction { signer: who.node_id(), nonce, payload }.sign(who, network)
}

/// A descriptor of node `seed` at `version`, re-signed.
fn versioned(seed: u64, version: u64) -> SignedDescriptor {
    let mut d = descriptor(seed, "storage").descriptor;
    d.version = version;
    d.p2p_egress_ip = Some([127, 0, 0, 1].into());
    SignedDescriptor::sign(&Identity::from_seed(seed), d).unwrap_or_else(|e| unreachable!("its own key: {e}"))
}

fn chain(net: &Network) -> Chain {
    let (tenant, n1, n2, n5) = (&net.tenant, &net.nodes[0], &net.nodes[1], &Identity::from_seed(5));
    let network = net.state.network();
    let register = Payload::register_node(n5, &network, &tenant.node_id(), descriptor(5, "storage"));
    let first = vec![
        sign(tenant, &network, 0, Payload::Transfer { to: n2.node_id(), amount_micro: 1_000 }),
        sign(tenant, &network, 1, register),
    ];
    let second = vec![
        sign(n2, &network, 0, Payload::UpdateNode { descriptor: versioned(2, 2) }),
        sign(tenant, &network, 2, Payload::LeaveNode { node: n5.node_id() }),
        sign(
            n2,
            &network,
            1,
            Payload::TransferMany {
                credits: vec![
                    archipel_ledger::Credit { to: tenant.node_id(), amount_micro: 10 },
                    archipel_ledger::Credit { to: n1.node_id(), amount_micro: 20 },
                ],
            },
        ),
    ];
    // Lease changes: n01 proves it is alive in the first block and is marked down in the second.
    let up = LivenessChange::Up { node: n1.node_id(), proof: AliveProof::sign(n1, &network, 0) };
    let liveness = [vec![up], vec![LivenessChange::Down { node: n1.node_id() }]];
    let (mut state, mut parent) = (net.state.clone(), net.header);
    let (mut blocks, mut states) = (Vec::new(), Vec::new());
    for (i, txs) in [first.clone(), second.clone()].into_iter().enumerate() {
        let now = net.genesis.created_at_ms + 500 * (i as u64 + 1);
        let p = propose(&state, &parent, now, liveness[i].clone(), txs, Signatures::Verify)
            .unwrap_or_else(|e| panic!("an in-memory state cannot fail: {e}"));
        if p.block.liveness.len() != liveness[i].len() {
            panic!("seed block {} dropped a liveness change; fix the seed chain in fuzz/src/seeds.rs", i + 1);
        }
        if let Some((hash, why)) = p.dropped.first() {
            panic!("seed block {} dropped transaction {hash}: {why}; fix the seed chain in fuzz/src/seeds.rs", i + 1);
        }
        parent = p.block.header;
        state = p.state;
        blocks.push(p.block);
        states.push(state.clone());
    }
    let certificate = finalization(net, &blocks[1].header, 2);
    Chain { txs: [first, second].concat(), blocks, states, certificate }
}

/// A finality certificate of `header` at `view`, signed by three of the four validators.
fn finalization(net: &Network, header: &BlockHeader, view: u64) -> Vec<u8> {
    let cfg = ledger_verify::consensus_config(&net.genesis);
    let participants = Set::from_iter_dedup(cfg.validators.iter().cloned());
    let proposal: Proposal<Digest> =
        Proposal::new(Round::new(Epoch::zero(), View::new(view)), View::new(view - 1), digest_of(&header.hash()));
    let votes: Vec<Finalize<Scheme, Digest>> = net.nodes[..3]
        .iter()
        .filter_map(|id| {
            let scheme = Scheme::signer(&cfg.namespace, participants.clone(), id.private_key().clone())?;
            Finalize::sign(&scheme, proposal.clone())
        })
        .collect();
    let votes = NonEmpty::try_new(votes.iter()).unwrap_or_else(|| unreachable!("three validators vote"));
    let f = Finalization::from_finalizes(&cfg.verifier(), votes, &Sequential)
        .unwrap_or_else(|e| panic!("cannot assemble the seed finality certificate: {e:?}"));
    f.encode().to_vec()
}

fn json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|e| unreachable!("seeds serialize: {e}"))
}

fn pretty(value: &impl serde::Serialize) -> Vec<u8> {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|e| unreachable!("seeds serialize: {e}"));
    format!("{text}\n").into_bytes()
}

/// What a node serves to a joining node once its state is committed after the two blocks:
/// every entry, then block 2 with its certificate.
fn state_snapshot(net: &Network, chain: &Chain) -> Vec<u8> {
    let node = archipel_consensus::Chain::open(net.state.clone(), Box::new(archipel_consensus::MemoryStore::default()))
        .unwrap_or_else(|e| unreachable!("a chain in memory opens: {e}"));
    for (block, certificate) in chain.blocks.iter().zip([Vec::new(), chain.certificate.clone()]) {
        node.finalize(block.clone(), certificate).unwrap_or_else(|e| panic!("the seed blocks apply: {e}"));
    }
    node.close().unwrap_or_else(|e| unreachable!("a store in memory commits: {e}"));
    let mut source =
        archipel_consensus::join::Source::new(&node).unwrap_or_else(|e| unreachable!("a committed state: {e}"));
    let mut out = Vec::new();
    while let Some(part) = source.next_entries(1_000).unwrap_or_else(|e| unreachable!("a store in memory reads: {e}")) {
        out.extend(part);
    }
    out.extend(source.tail(&node).ok().flatten().unwrap_or_else(|| unreachable!("block 2 is certified")));
    let cfg = ledger_verify::consensus_config(&net.genesis);
    let states = std::sync::Arc::new(archipel_ledger::store::MemoryStore::default());
    let joined = archipel_consensus::join::Join::new(net.state.clone(), cfg, states).and_then(|mut j| {
        j.push(&out)?;
        j.finish(&mut archipel_consensus::MemoryStore::starting_at(2))
    });
    if let Err(e) = joined {
        panic!("the seed snapshot does not check out: {e}");
    }
    out
}

/// The block log as the node writes it: block 1 without a certificate of its own, block 2 with.
fn block_log(chain: &Chain) -> Vec<u8> {
    // Tests build the seeds in several threads at once: one directory per call.
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("archipel-fuzz-seeds-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("blocks.log");
    let written = std::fs::create_dir_all(&dir).map_err(|e| e.to_string()).and_then(|_| {
        let mut store = FileStore::open(&path)?;
        for (block, certificate) in chain.blocks.iter().zip([Vec::new(), chain.certificate.clone()]) {
            store.append(&Record { block: block.to_bytes(), certificate })?;
        }
        drop(store);
        std::fs::read(&path).map_err(|e| e.to_string())
    });
    let _ = std::fs::remove_dir_all(&dir);
    written.unwrap_or_else(|e| panic!("cannot write the seed block log in {}: {e}", dir.display()))
}

/// A candidate log blob: per block its length, view, digest and encoding.
fn candidate_log(chain: &Chain) -> Vec<u8> {
    let mut out = Vec::new();
    for (view, block) in chain.blocks.iter().enumerate() {
        let block = LedgerBlock::new(block.clone());
        let encoded = block.encode();
        out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        out.extend_from_slice(&(view as u64 + 1).to_be_bytes());
        out.extend_from_slice(digest_of(&block.header().hash()).as_ref());
        out.extend_from_slice(encoded.as_ref());
    }
    out
}

/// `text` parsed, on the config that sets its public addresses.
fn public_only<T: std::str::FromStr>(public: bool, text: &str) -> Option<T> {
    if public { text.parse().ok() } else { None }
}

fn node_config(public: bool) -> NodeConfig {
    let opt = |text| public_only(public, text);
    NodeConfig {
        ledger: Default::default(),
        compute: Default::default(),
        name: "n01".into(),
        key_file: "node.key".into(),
        data_dir: "data".into(),
        genesis_file: "../genesis.json".into(),
        region: "eu-de".parse().unwrap_or_else(|_| unreachable!("a valid region")),
        country: "DE".parse().unwrap_or_else(|_| unreachable!("a valid country")),
        operator: "acme".into(),
        operator_jurisdiction: "DE".parse().unwrap_or_else(|_| unreachable!("a valid country")),
        capacity: "50GiB".parse().unwrap_or_else(|_| unreachable!("a valid size")),
        roles: "validator,storage".parse().unwrap_or_else(|_| unreachable!("valid roles")),
        p2p: P2pConfig {
            listen: "0.0.0.0:23100".parse().unwrap_or_else(|_| unreachable!("an address")),
            public: opt("203.0.113.7:23100"),
            egress_ip: public_only(public, "203.0.113.8"),
            allow_private_ips: !public,
        },
        api: ApiConfig {
            listen: "127.0.0.2:23101".parse().unwrap_or_else(|_| unreachable!("an address")),
            public: opt("203.0.113.7:23101"),
            limits: Default::default(),
        },
    }
}

fn proofs(net: &Network, chain: &Chain) -> Vec<(String, AnyProof)> {
    let certificate = hex::encode(&chain.certificate);
    let mut out = Vec::new();
    // The transfer in block 1, final through block 2's certificate.
    let b1 = &chain.blocks[0];
    let hashes: Vec<_> = b1.txs.iter().map(archipel_ledger::SignedTransaction::hash).collect();
    let path = merkle::path(&hashes, 0).unwrap_or_default();
    let tx = TxProof { header: b1.header, index: 0, tx: b1.txs[0].clone(), path };
    let links = vec![chain.blocks[1].header];
    out.push((
        "tx".into(),
        AnyProof::Tx(Proof {
            genesis_hash: net.genesis_hash.clone(),
            proof: tx,
            links,
            certificate: certificate.clone(),
        }),
    ));
    // The tenant's account after block 2, and a validator entry at the genesis.
    let state_proof = |state: &State, header: BlockHeader, key: StateKey, certificate: String| {
        let (value, path) = state.prove(&key).unwrap_or_else(|e| panic!("an in-memory state cannot fail: {e}"));
        let proof = StateProof { header, key: key.to_string(), value_hex: value.map(hex::encode), path };
        AnyProof::State(Proof { genesis_hash: net.genesis_hash.clone(), proof, links: Vec::new(), certificate })
    };
    let account = StateKey::Account(net.tenant.node_id());
    out.push(("account".into(), state_proof(&chain.states[1], chain.blocks[1].header, account, certificate.clone())));
    let validator = StateKey::Validator(net.nodes[0].node_id());
    out.push(("genesis-validator".into(), state_proof(&net.state, net.header, validator, String::new())));
    let absent = StateKey::Account(archipel_crypto::Identity::from_seed(u64::MAX).node_id());
    out.push(("absent-account".into(), state_proof(&chain.states[1], chain.blocks[1].header, absent, certificate)));
    out
}

/// One transaction of each storage kind, from the tenant.
fn storage_txs(net: &Network) -> Vec<(String, archipel_ledger::SignedTransaction)> {
    use archipel_ledger::storage::{ObjectPut, ReceiptTerms, ShardHolder, ShardMove, object_id};
    use archipel_types::{ErasureCode, PlacementPolicy};
    let network = net.state.network();
    let tenant = &net.tenant;
    let policy = PlacementPolicy {
        regions: ["eu".parse().unwrap_or_else(|e| unreachable!("a region: {e}"))].into(),
        deny_jurisdictions: ["US".parse().unwrap_or_else(|e| unreachable!("a country: {e}"))].into(),
        ..PlacementPolicy::anywhere(ErasureCode::DEFAULT)
    };
    let nonce = Hash([9; 32]);
    let version =
        archipel_ledger::storage::version_id(&tenant.node_id(), &object_id("eu-docs", "reports/2026.pdf"), &nonce.0);
    let root = Hash([8; 32]);
    let terms = |index: u8, generation: u32| ReceiptTerms {
        object: object_id("eu-docs", "reports/2026.pdf"),
        version,
        generation,
        index,
        manifest_root: root,
        shard_bytes: 2 << 20,
        expires_ms: 1_000_000,
    };
    let holders = (0..6u8)
        .map(|i| {
            let node = &net.nodes[usize::from(i) % net.nodes.len()];
            ShardHolder { node: node.node_id(), receipt: terms(i, 0).sign(node, &network), expires_ms: 1_000_000 }
        })
        .collect();
    let put = ObjectPut {
        bucket: "eu-docs".into(),
        key: "reports/2026.pdf".into(),
        version,
        nonce,
        size: 8 << 20,
        segment_bytes: (8 << 20) - 16,
        manifest_root: root,
        etag: "0123456789abcdef".into(),
        holders,
    };
    let mover = &net.nodes[0];
    let payloads = [
        ("create-bucket", Payload::CreateBucket { name: "eu-docs".into(), policy }),
        ("put-object", Payload::PutObject { put }),
        (
            "move-shards",
            Payload::MoveShards {
                bucket: "eu-docs".into(),
                key: "reports/2026.pdf".into(),
                version,
                moves: vec![ShardMove {
                    index: 2,
                    to: mover.node_id(),
                    receipt: terms(2, 1).sign(mover, &network),
                    expires_ms: 1_000_000,
                }],
            },
        ),
        (
            "audit-failed",
            Payload::AuditFailed { bucket: "eu-docs".into(), key: "reports/2026.pdf".into(), version, epoch: 7 },
        ),
        ("delete-object", Payload::DeleteObject { bucket: "eu-docs".into(), key: "reports/2026.pdf".into() }),
        ("delete-bucket", Payload::DeleteBucket { name: "eu-docs".into() }),
        ("put-objects", Payload::PutObjects { batch: put_batch(net, "eu-docs") }),
    ];
    payloads
        .into_iter()
        .enumerate()
        .map(|(i, (name, payload))| (format!("storage-{name}"), sign(tenant, &network, 100 + i as u64, payload)))
        .collect()
}

/// Two small objects of `bucket` committed together: each node of the network listed once with
/// its receipt over what it holds.
fn put_batch(net: &Network, bucket: &str) -> archipel_ledger::batch::PutBatch {
    use archipel_ledger::batch::{BatchHolder, BatchedPut, PutBatch, sign_batch_receipt};
    use archipel_ledger::storage::{object_id, shard_bytes_per_holder, version_id};
    let tenant = net.tenant.node_id();
    let puts: Vec<BatchedPut> = (0..2u8)
        .map(|i| {
            let key = format!("small/{i}");
            let nonce = Hash([i + 20; 32]);
            BatchedPut {
                version: version_id(&tenant, &object_id(bucket, &key), &nonce.0),
                key,
                nonce,
                size: 4_096,
                segment_bytes: (8 << 20) - 16,
                manifest_root: Hash([i + 30; 32]),
                etag: "00aa".into(),
                holders: (0..6u8).map(|h| h % net.nodes.len() as u8).collect(),
            }
        })
        .collect();
    let mut batch = PutBatch {
        bucket: bucket.into(),
        puts,
        holders: net
            .nodes
            .iter()
            .map(|n| BatchHolder { node: n.node_id(), receipt: [0; 64], expires_ms: 1_000_000 })
            .collect(),
    };
    let code = archipel_types::ErasureCode::DEFAULT;
    for (at, node) in net.nodes.iter().enumerate() {
        let items = batch.items_of(at, |size, seg| shard_bytes_per_holder(code, size, seg));
        batch.holders[at].receipt = sign_batch_receipt(node, &net.state.network(), 1_000_000, &items);
    }
    batch
}

/// What a storage node receives in a batched seal: two objects' manifests and shards.
fn seal_items(net: &Network) -> Vec<archipel_objects::batch::SealItem> {
    use archipel_ledger::storage::{Manifest, WRAPPED_KEY_BYTES, object_id, version_id};
    (0..2u8)
        .map(|i| {
            let object = object_id("eu-docs", &format!("small/{i}"));
            let nonce = [i + 20; 32];
            let version = version_id(&net.tenant.node_id(), &object, &nonce);
            let shard = vec![i; 1_040];
            let mut hashes = vec![[0u8; 32]; 6];
            hashes[usize::from(i)] = *blake3::hash(&shard).as_bytes();
            let manifest = Manifest {
                version,
                size: 4_096,
                segment_bytes: (8 << 20) - 16,
                code: archipel_types::ErasureCode::DEFAULT,
                wrapped_key: [7; WRAPPED_KEY_BYTES],
                segments: vec![hashes],
                meta: vec![],
            };
            archipel_objects::batch::SealItem {
                version,
                object,
                nonce,
                index: i,
                manifest: bytes::Bytes::from(manifest.to_bytes()),
                shard: bytes::Bytes::from(shard),
            }
        })
        .collect()
}

/// Every seed of every target.
pub fn seeds() -> Vec<Seed> {
    let net = network();
    let chain = chain(net);
    let cfg = BlockCfg::from(net.params());
    let mut out: Vec<Seed> = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| out.push((target, name.to_string(), bytes));

    for (i, tx) in chain.txs.iter().enumerate() {
        let name = format!("{}-{}", i + 1, tx.tx.payload.kind().replace('_', "-"));
        add("transaction", &name, tx.to_bytes());
        add("transaction_json", &name, json(tx));
    }
    // The storage kinds, signed but not applied (their checks need storage nodes that are up).
    for (name, tx) in storage_txs(net) {
        add("transaction", &name, tx.to_bytes());
        add("transaction_json", &name, json(&tx));
    }
    // A protocol upgrade approved by three of the four validators, signed but not applied.
    {
        use archipel_ledger::upgrade::{Upgrade, approve};
        let network = net.state.network();
        let upgrade = Upgrade { protocol: 2, height: 5_000 };
        let approvals = net.nodes[..3].iter().map(|v| approve(v, &network, &upgrade, 0)).collect();
        let tx = sign(&net.tenant, &network, 200, Payload::ScheduleUpgrade { upgrade, approvals });
        add("transaction", "schedule-upgrade", tx.to_bytes());
        add("transaction_json", "schedule-upgrade", json(&tx));
        let approvals =
            net.nodes[..3].iter().map(|v| archipel_ledger::upgrade::approve_cancel(v, &network, &upgrade, 0)).collect();
        let tx = sign(&net.tenant, &network, 201, Payload::CancelUpgrade { upgrade, approvals });
        add("transaction", "cancel-upgrade", tx.to_bytes());
        add("transaction_json", "cancel-upgrade", json(&tx));
    }
    let empty = propose(&net.state, &net.header, net.genesis.created_at_ms, [], [], Signatures::Verify)
        .unwrap_or_else(|e| panic!("an in-memory state cannot fail: {e}"))
        .block;
    for (name, block) in [("block-1", &chain.blocks[0]), ("block-2", &chain.blocks[1]), ("empty", &empty)] {
        add("block", name, block.to_bytes());
        add("ledger_block", name, LedgerBlock::new(block.clone()).encode().to_vec());
    }
    add("descriptor", "genesis-node", json(&net.genesis.nodes[0]));
    add("descriptor", "with-egress", json(&versioned(2, 2)));
    add("descriptor", "pretty", pretty(&descriptor(5, "storage,compute,gateway")));

    let hello = GossipMessage::Hello { digest: hex::encode([7u8; 32]) };
    add("gossip_message", "hello", hello.encode());
    add("gossip_message", "descriptors", GossipMessage::Descriptors(net.genesis.nodes.clone()).encode());
    let mut admission = Admission::new(&net.genesis_hash, descriptor(5, "storage"));
    for v in &net.nodes[..3] {
        admission.approve(v);
    }
    add("gossip_message", "admissions", GossipMessage::Admissions(vec![admission]).encode());

    let mut batch = Vec::new();
    for tx in &chain.txs {
        put_record(&mut batch, &tx.to_bytes());
    }
    add("tx_batch", "six", batch);
    add("seal_batch", "two", archipel_objects::batch::encode_items(&seal_items(net)));
    {
        use archipel_consensus::liveness::{Heartbeat, Report, encode_heartbeat};
        add("heartbeat", "plain", encode_heartbeat(&Heartbeat::default()));
        let alive = AliveProof::sign(&net.nodes[0], &net.state.network(), 0);
        add("heartbeat", "with-proof", encode_heartbeat(&Heartbeat { proof: Some(alive), report: None }));
        let report = Report { silent: vec![net.nodes[0].node_id()], heard: vec![net.nodes[1].node_id()] };
        add("heartbeat", "with-report", encode_heartbeat(&Heartbeat { proof: Some(alive), report: Some(report) }));
    }
    add("tx_batch", "one", {
        let mut one = Vec::new();
        put_record(&mut one, &chain.txs[0].to_bytes());
        one
    });

    let b1 = LedgerBlock::new(chain.blocks[0].clone());
    add("fetch_message", "want", FetchMessage::want(&digest_of(&b1.header().hash())));
    add("fetch_message", "have", FetchMessage::have(&b1));

    let log = candidate_log(&chain);
    assert_eq!(candidates::parse(&log, &cfg).len(), 2, "the seed candidate log must read back whole");
    add("candidate_log", "two-blocks", log);

    add("block_log", "two-blocks", block_log(&chain));
    add("state_snapshot", "after-two-blocks", state_snapshot(net, &chain));

    let mut export = start(&net.genesis.canonical_bytes());
    push_block(&mut export, &chain.blocks[0].to_bytes(), &[]);
    push_block(&mut export, &chain.blocks[1].to_bytes(), &chain.certificate);
    if let Err(e) = ledger_verify::verify_export(&export) {
        panic!("the seed export does not verify: {e}");
    }
    add("export", "two-blocks", export);
    add("export", "genesis-only", start(&net.genesis.canonical_bytes()));

    add("genesis", "pretty", pretty(&net.genesis));
    add("genesis", "canonical", net.genesis.canonical_bytes());

    for (name, public) in [("devnet", false), ("public", true)] {
        let text = node_config(public).to_toml().unwrap_or_else(|e| unreachable!("configs render: {e}"));
        add("node_config", name, text.into_bytes());
    }

    for (name, proof) in proofs(net, &chain) {
        if let Err(e) = ledger_verify::verify_proof(&net.genesis, &proof) {
            panic!("the seed proof {name} does not verify: {e}");
        }
        add("proof", &name, pretty(&proof));
    }
    out
}
