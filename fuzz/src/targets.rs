//! One function per decoder that reads bytes from the network or the disk. Each takes any bytes
//! and must return without panicking; it then does with what decoded what the node does next
//! (admission, execution, the peer table, verification), and where a format promises one
//! encoding per value it checks that what decoded re-encodes to the same bytes (a failed check
//! panics, so it is reported like a crash).
//!
//! Shared by the cargo-fuzz binaries (`fuzz/fuzz_targets/`, nightly) and the stable harness that
//! `cargo test` runs (`crates/node/tests/fuzz_decoders.rs`), so both exercise the same code.

use super::fixture::network;
use archipel_consensus::FileStore;
use archipel_consensus::block::{BlockCfg, LedgerBlock};
use archipel_consensus::candidates::{self, FetchMessage};
use archipel_consensus::store::{BlockStore, Record};
use archipel_crypto::SignedDescriptor;
use archipel_ledger::block::tx_root;
use archipel_ledger::tx::MAX_DESCRIPTOR_BYTES;
use archipel_ledger::{Block, Payload, Signatures, SignedTransaction, execute, genesis_header};
use archipel_node::config::NodeConfig;
use archipel_node::genesis::Genesis;
use archipel_node::gossip::MAX_GOSSIP_MESSAGE;
use archipel_node::ledger_api::AnyProof;
use archipel_node::ledger_verify;
use archipel_node::membership::{AdmissionRule, Effect, GossipMessage, PeerTable};
use archipel_node::txgossip;
use commonware_codec::{Copying, Decode as _, Encode as _, Read as _, Write as _};
use std::path::{Path, PathBuf};

/// A fuzz target: takes any bytes, must not panic.
pub type Target = fn(&[u8]);

/// Every target by name (also the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("transaction", transaction),
    ("transaction_json", transaction_json),
    ("block", block),
    ("ledger_block", ledger_block),
    ("descriptor", descriptor),
    ("gossip_message", gossip_message),
    ("tx_batch", tx_batch),
    ("seal_batch", seal_batch),
    ("fetch_message", fetch_message),
    ("heartbeat", heartbeat),
    ("candidate_log", candidate_log),
    ("block_log", block_log),
    ("export", export),
    ("genesis", genesis),
    ("node_config", node_config),
    ("proof", proof),
    ("state_snapshot", state_snapshot),
];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Largest input worth generating for `name` (a block log or export may be large; messages are
/// bounded by their decoders anyway).
pub fn max_len(name: &str) -> usize {
    match name {
        "export" | "block_log" | "candidate_log" | "block" | "ledger_block" | "fetch_message" | "state_snapshot" => {
            256 * 1024
        }
        _ => 64 * 1024,
    }
}

/// A transaction in binary form (`POST /v1/tx`, blocks, gossip): decoded, re-encoded, admitted.
pub fn transaction(data: &[u8]) {
    let net = network();
    let max = net.params().max_tx_bytes as usize;
    let Ok(stx) = SignedTransaction::from_bytes(data, max) else { return };
    assert_eq!(stx.to_bytes(), data, "a decoded transaction re-encodes to other bytes");
    let json = serde_json::to_vec(&stx).unwrap_or_else(|e| panic!("a decoded transaction has no JSON form: {e}"));
    let back: Option<SignedTransaction> = serde_json::from_slice(&json).ok();
    assert_eq!(back.as_ref(), Some(&stx), "a decoded transaction does not survive its JSON form");
    let _ = stx.hash();
    let _ = net.state.admit(&stx, data.len());
}

/// A transaction in JSON form (`POST /v1/tx` with a JSON content type): decoded, encoded,
/// admitted.
pub fn transaction_json(data: &[u8]) {
    let net = network();
    let Ok(stx) = serde_json::from_slice::<SignedTransaction>(data) else { return };
    let bytes = stx.to_bytes();
    let _ = SignedTransaction::from_bytes(&bytes, usize::MAX);
    let _ = net.state.admit(&stx, bytes.len());
}

/// A ledger block (`ledger verify`, the block log): decoded, re-encoded, executed on the genesis.
pub fn block(data: &[u8]) {
    let net = network();
    let Ok(block) = Block::from_bytes(data, net.params().max_block_txs as usize) else { return };
    assert_eq!(block.to_bytes(), data, "a decoded block re-encodes to other bytes");
    let mut state = net.state.clone();
    let _ = execute(&mut state, &net.header, &block, Signatures::Verify);
}

/// A block as consensus receives it (broadcast, backfill): decoded with the genesis limits,
/// re-encoded.
pub fn ledger_block(data: &[u8]) {
    let cfg = BlockCfg::from(network().params());
    let Ok(block) = LedgerBlock::decode_cfg(Copying(data), &cfg) else { return };
    assert_eq!(block.encode().as_ref(), data, "a decoded consensus block re-encodes to other bytes");
    assert_eq!(
        block.header().tx_root,
        tx_root(&block.block().txs),
        "a decoded block's transactions are not its root's"
    );
    assert!(data.len() <= cfg.max_bytes, "a block larger than max_block_bytes decoded");
}

/// A node descriptor in JSON: as a registry transaction carries it (canonical, at most 4 KiB) and
/// as gossip, genesis files and descriptor files carry it (then verified). A descriptor the
/// network accepts must fit in a registry transaction unchanged.
pub fn descriptor(data: &[u8]) {
    if let Some(payload) = registry_payload(data) {
        let mut again = Vec::new();
        payload.write(&mut again);
        assert_eq!(again, wrap_descriptor(data), "a decoded descriptor re-encodes to other bytes");
    }
    let Ok(d) = serde_json::from_slice::<SignedDescriptor>(data) else { return };
    let verified = d.verify().is_ok();
    let _ = d.descriptor.signing_bytes();
    let canonical =
        serde_json::to_vec(&d).unwrap_or_else(|e| panic!("a decoded descriptor does not serialize to JSON: {e}"));
    if canonical.len() <= MAX_DESCRIPTOR_BYTES {
        let back = registry_payload(&canonical);
        assert_eq!(
            back,
            Some(Payload::RegisterNode { descriptor: d.clone(), consent: [7u8; 64] }),
            "a descriptor read from JSON does not survive its canonical form"
        );
    }
    if verified {
        let reread: Option<SignedDescriptor> = serde_json::from_slice(&canonical).ok();
        assert!(
            reread.is_some_and(|r| r.verify().is_ok()),
            "a descriptor that verifies no longer verifies once re-serialized (as gossip and registry transactions carry it)"
        );
    }
}

/// `data` framed as the payload of a `RegisterNode` transaction (tag, length, JSON).
fn wrap_descriptor(data: &[u8]) -> Vec<u8> {
    let mut out = vec![3u8];
    data.to_vec().write(&mut out);
    // The node's consent (its signature is not checked by the decoder).
    out.extend_from_slice(&[7u8; 64]);
    out
}

/// The ledger's own reading of a descriptor: the payload of a `RegisterNode` transaction.
fn registry_payload(json: &[u8]) -> Option<Payload> {
    let wrapped = wrap_descriptor(json);
    let mut buf = Copying(wrapped.as_slice());
    let payload = Payload::read_cfg(&mut buf, &()).ok()?;
    assert!(!bytes::Buf::has_remaining(&buf), "a registry payload left bytes unread");
    Some(payload)
}

/// A membership gossip message: decoded with the size and count limits, then handed to a peer
/// table as if node 2 sent it, and the table's answers encoded.
pub fn gossip_message(data: &[u8]) {
    let Ok(msg) = GossipMessage::decode(data, MAX_GOSSIP_MESSAGE) else { return };
    let _ = msg.encode();
    let net = network();
    let g = &net.genesis;
    let rule = AdmissionRule { genesis_hash: net.genesis_hash.clone(), validators: g.validators.clone() };
    let mut table = PeerTable::new(g.nodes[0].clone(), g.nodes[1..2].iter().cloned(), g.node_ids(), g.membership)
        .with_admission_rule(rule);
    let mut effects = table.on_message(net.nodes[1].node_id(), msg, 1_000);
    effects.extend(table.tick(2_000));
    for effect in effects {
        if let Effect::SendTo(_, m) | Effect::Broadcast(m) = effect {
            let _ = m.encode();
        }
    }
}

/// A batch of transactions from the transaction gossip channel (`POST /v1/txs` uses the same
/// framing): split, decoded, admitted.
pub fn tx_batch(data: &[u8]) {
    let net = network();
    let max = net.params().max_tx_bytes as usize;
    for (stx, len) in txgossip::decode_batch(data, max) {
        assert!(len <= max, "a gossiped transaction larger than max_tx_bytes decoded");
        let _ = net.state.admit(&stx, len);
    }
}

/// The body of a storage node's `POST /v1/seal-batch`: decoded, re-encoded to the same bytes,
/// and each item's manifest parsed and checked as the handler does.
pub fn seal_batch(data: &[u8]) {
    let Ok(items) = archipel_node::shard_batch::decode(bytes::Bytes::copy_from_slice(data)) else { return };
    assert_eq!(archipel_objects::batch::encode_items(&items), data, "a batched seal re-encodes");
    for it in &items {
        if let Ok(m) = archipel_ledger::storage::Manifest::from_bytes(&it.manifest) {
            let _ = m.segments.first().and_then(|h| h.get(usize::from(it.index)));
            let _ = m.root();
        }
    }
}

/// A heartbeat from the liveness channel: decoded, re-encoded, its proof judged as a block's Up
/// change would be.
pub fn heartbeat(data: &[u8]) {
    let Ok(heartbeat) = archipel_consensus::liveness::decode_heartbeat(data) else { return };
    assert_eq!(archipel_consensus::liveness::encode_heartbeat(&heartbeat), data, "a heartbeat re-encodes");
    if let Some(proof) = heartbeat.proof {
        let net = network();
        let node = net.nodes[0].node_id();
        let _ = net.state.check_liveness(&archipel_ledger::LivenessChange::Up { node, proof });
    }
}

/// A message on the candidate fetch channel: decoded, re-encoded.
pub fn fetch_message(data: &[u8]) {
    let cfg = BlockCfg::from(network().params());
    match FetchMessage::decode(data, &cfg) {
        Ok(FetchMessage::Want(digest)) => assert_eq!(FetchMessage::want(&digest), data, "a request re-encodes"),
        Ok(FetchMessage::Have(block)) => assert_eq!(FetchMessage::have(&block), data, "an answer re-encodes"),
        Err(_) => {}
    }
}

/// A blob of the candidate log, as a validator reads it back on start.
pub fn candidate_log(data: &[u8]) {
    let cfg = BlockCfg::from(network().params());
    for (_, block) in candidates::parse(data, &cfg) {
        let _ = block.inner().header().height;
    }
}

/// The block log (`ledger/blocks.log`) as a node opens it on start: a torn tail is cut, every
/// complete record stays exactly as it was, and every stored block can be read back.
pub fn block_log(data: &[u8]) {
    let dir = scratch_dir();
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let path = dir.join("blocks.log");
    // A new file each time: truncating one and rewriting it makes ext4 flush it on close.
    let _ = std::fs::remove_file(&path);
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(mut store) = FileStore::open(&path) {
        let height = store.height();
        for h in 0..=height + 1 {
            let _ = store.get(h);
        }
        let kept = store.raw_range(1, height).unwrap_or_default();
        assert_eq!(kept, &data[..kept.len()], "the block log changed a complete record");
        let _ = store.raw_range(0, u64::MAX);
        let record = Record { block: vec![1, 2, 3], certificate: Vec::new() };
        if store.append(&record).is_ok() {
            assert_eq!(store.get(height + 1).ok().flatten(), Some(record), "an appended record reads back");
        }
    }
    // A torn tail was moved aside next to the log: clear it for the next input.
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
}

/// Removes this thread's scratch directory (the stable harness calls it when a target is done).
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(scratch_dir());
}

/// A scratch directory for this process and thread (the stable harness runs targets in threads,
/// libFuzzer in several processes).
fn scratch_dir() -> PathBuf {
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
    std::env::temp_dir().join(format!("archipel-fuzz-{}-{thread}", std::process::id()))
}

/// A ledger export (`archipel ledger verify`): the embedded genesis, every certificate, link, root
/// and transaction.
pub fn export(data: &[u8]) {
    let _ = ledger_verify::verify_export(data);
}

/// A genesis file (`genesis.json`): parsed and validated as `node run` loads it; a genesis that
/// loads must also be accepted in canonical form, as exports embed it.
pub fn genesis(data: &[u8]) {
    let _ = Genesis::from_canonical(data);
    let Ok(g) = Genesis::parse(data, Path::new("genesis.json")) else { return };
    let _ = g.hash();
    let _ = genesis_header(&g.ledger_state());
    let _ = ledger_verify::consensus_config(&g).verifier();
    let canonical = Genesis::from_canonical(&g.canonical_bytes());
    assert_eq!(canonical.as_ref().ok(), Some(&g), "a valid genesis is refused in its canonical form: {canonical:?}");
}

/// A node configuration file (`node.toml`); what `node init` writes from it must read back as the
/// same configuration.
pub fn node_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = NodeConfig::parse(text, Path::new("node/node.toml")) else { return };
    let _ = (cfg.p2p_public(), cfg.api_public());
    if let Ok(rendered) = cfg.to_toml() {
        let back = NodeConfig::parse(&rendered, Path::new("node.toml"));
        assert_eq!(back.as_ref().ok(), Some(&cfg), "a config does not read back as written: {back:?}\n{rendered}");
    }
}

/// A proof file (`archipel proof verify`): decoded and checked against the genesis.
pub fn proof(data: &[u8]) {
    let Ok(proof) = serde_json::from_slice::<AnyProof>(data) else { return };
    let _ = ledger_verify::verify_proof(&network().genesis, &proof);
}

/// A state snapshot (`GET /v1/ledger/snapshot`, read by `node run --join`), in two pieces as a
/// stream delivers it: refused, or checked whole — and then it opens as a chain at its height.
pub fn state_snapshot(data: &[u8]) {
    let net = network();
    let cfg = ledger_verify::consensus_config(&net.genesis);
    let states = std::sync::Arc::new(archipel_ledger::store::MemoryStore::default());
    let Ok(mut join) = archipel_consensus::join::Join::new(net.state.clone(), cfg, states.clone()) else { return };
    let (a, b) = data.split_at(data.len() / 2);
    if join.push(a).is_err() || join.push(b).is_err() {
        return;
    }
    let Some((height, _)) = join.claimed() else { return };
    let mut log = archipel_consensus::MemoryStore::starting_at(height);
    if let Ok(joined) = join.finish(&mut log) {
        let chain = archipel_consensus::Chain::open_with(net.state.clone(), Box::new(log), states)
            .unwrap_or_else(|e| panic!("a snapshot that checked out does not open: {e}"));
        assert_eq!(chain.first_block(), joined.height, "the chain starts at the snapshot's height");
    }
}
