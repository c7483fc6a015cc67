//! Random transaction histories give the same state roots held in memory and kept in a store,
//! committed block by block, with crashes (commits not yet durable dropped) and reopenings at
//! random points, replaying from the reopened height.

use archipel_crypto::Identity;
use archipel_ledger::state::state_key_hash;
use archipel_ledger::store::{MemoryStore, StateStore};
use archipel_ledger::trie::Trie;
use archipel_ledger::{
    Block, BlockHeader, Credit, GenesisState, Hash, Payload, Signatures, SignedTransaction, State, StateKey,
    Transaction, execute, genesis_header, propose,
};
use proptest::prelude::*;
use std::sync::Arc;

fn id(i: u64) -> Identity {
    Identity::from_seed(i)
}

fn genesis() -> State {
    State::genesis(GenesisState {
        accounts: (0..4).map(|i| (id(i).node_id(), 1_000_000)).collect(),
        validators: vec![id(0).node_id()],
        ..GenesisState::default()
    })
}

/// One step of a history: who sends, to whom (often a new account), how much, and how the store
/// treats the block.
#[derive(Clone, Debug)]
struct Step {
    from: u64,
    to: u64,
    amount: u64,
    many: bool,
    durable: bool,
    crash: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (0u64..4, 0u64..40, 0u64..5_000, any::<bool>(), any::<bool>(), prop::bool::weighted(0.15))
        .prop_map(|(from, to, amount, many, durable, crash)| Step { from, to, amount, many, durable, crash })
}

fn tx(state: &State, s: &Step) -> SignedTransaction {
    let signer = id(s.from);
    let nonce = state.account(&signer.node_id()).nonce;
    let payload = if s.many {
        Payload::TransferMany {
            credits: (0..3).map(|k| Credit { to: id(100 + s.to + k).node_id(), amount_micro: s.amount / 3 }).collect(),
        }
    } else {
        Payload::Transfer { to: id(100 + s.to).node_id(), amount_micro: s.amount }
    };
    Transaction { signer: signer.node_id(), nonce, payload }.sign(&signer, &Hash::ZERO)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn roots_agree_in_memory_and_on_disk_through_crashes(steps in prop::collection::vec(step(), 1..40)) {
        // The history, in memory only.
        let mut mem = genesis();
        let mut headers: Vec<BlockHeader> = vec![genesis_header(&mem)];
        let mut blocks: Vec<Block> = Vec::new();
        for (i, s) in steps.iter().enumerate() {
            let p = propose(&mem, headers.last().unwrap(), 10 * (i as u64 + 1), [], [tx(&mem, s)], Signatures::Verify).unwrap();
            mem = p.state;
            headers.push(p.block.header);
            blocks.push(p.block);
        }

        // The same blocks on a store: committed one by one, durable or not, crashing at times.
        // Buckets below depth 2: the store's leaves are read back on most paths.
        let store = MemoryStore::with_bucket_depth(BUCKETS);
        let mut disk = genesis().with_store(Arc::new(store.clone()));
        let c = disk.commit().unwrap();
        store.commit(&c, true).unwrap();
        disk.committed();
        let mut height = 0usize;
        let mut crashed = std::collections::BTreeSet::new();
        let commit = |st: &mut State, durable: bool| -> Result<(), TestCaseError> {
            let c = st.commit().unwrap();
            prop_assert_eq!(c.root, headers[c.height as usize].state_root);
            store.commit(&c, durable).unwrap();
            st.committed();
            Ok(())
        };
        while height < blocks.len() {
            let s = &steps[height];
            let mut cur = disk.clone();
            execute(&mut cur, &headers[height], &blocks[height], Signatures::Verify).unwrap();
            // As a validator does: the next block executed on this one before this one is
            // committed (it then commits this one's writes again).
            let child = (s.many && height + 1 < blocks.len()).then(|| {
                let mut child = cur.clone();
                execute(&mut child, &headers[height + 1], &blocks[height + 1], Signatures::Verify).unwrap();
                child
            });
            commit(&mut cur, s.durable)?;
            height += 1;
            disk = cur;
            if let Some(mut child) = child {
                // As the chain does when the child becomes the head: what the commit wrote is let
                // go of (the trie's buckets too, but those the child changed).
                child.forget_committed_through(height as u64);
                prop_assert_eq!(child.state_root(), headers[height + 1].state_root);
                commit(&mut child, steps[height].durable)?;
                height += 1;
                disk = child;
            }
            // Each block's crash happens once: replaying it after the crash commits it again.
            if s.crash && crashed.insert(height) {
                store.crash();
                disk = State::open(Arc::new(store.clone())).unwrap().expect("the genesis commit is durable");
                height = disk.chain().height as usize;
                prop_assert_eq!(disk.state_root(), headers[height].state_root, "reopened at {} with its header's root", height);
                for i in [1u64, 3, 120, 999] {
                    let key = StateKey::Account(id(i).node_id());
                    let (value, proof) = disk.prove(&key).unwrap();
                    let shown = proof.verify(&headers[height].state_root, &state_key_hash(&key)).unwrap();
                    prop_assert_eq!(shown == archipel_ledger::trie::Proven::Absent, value.is_none());
                }
            }
        }
        prop_assert_eq!(disk.state_root(), mem.state_root());
        prop_assert_eq!(disk.rebuilt_root(), mem.state_root(), "the store holds every entry");
        for i in 0..4u64 {
            prop_assert_eq!(disk.account(&id(i).node_id()), mem.account(&id(i).node_id()));
        }
        // Proofs from the stored trie hold, for present and absent keys.
        for key in [StateKey::Account(id(1).node_id()), StateKey::Account(id(999).node_id()), StateKey::Chain] {
            let (value, proof) = disk.prove(&key).unwrap();
            prop_assert_eq!(value.clone(), mem.prove(&key).unwrap().0);
            let shown = proof.verify(&mem.state_root(), &state_key_hash(&key)).unwrap();
            prop_assert_eq!(shown == archipel_ledger::trie::Proven::Absent, value.is_none());
        }
        // Committed, the state holds only what a trie opened from the store holds: the levels
        // above the buckets (and subtrees too big for one).
        let opened = Trie::open(&store, BUCKETS).unwrap();
        prop_assert_eq!(opened.root(), mem.state_root());
        prop_assert_eq!(disk.memory_trie_nodes(), opened.memory_nodes());
        prop_assert!(mem.memory_trie_nodes() > opened.memory_nodes(), "the state in memory holds its whole trie");
    }
}

/// The depth below which the stored states keep their tries as buckets.
const BUCKETS: usize = 2;

#[test]
fn a_reopened_state_reads_the_registry_and_parameters_from_the_store() {
    let store = MemoryStore::default();
    let mut s = genesis().with_store(Arc::new(store.clone()));
    let c = s.commit().unwrap();
    store.commit(&c, true).unwrap();
    let opened = State::open(Arc::new(store.clone())).unwrap().unwrap();
    assert_eq!(opened.state_root(), s.state_root());
    assert_eq!(opened.validators(), s.validators());
    assert_eq!(opened.params(), s.params());
    assert_eq!(opened.account(&id(2).node_id()).balance_micro, 1_000_000);
    assert!(State::open(Arc::new(MemoryStore::default())).unwrap().is_none(), "an empty store opens to nothing");
}

#[test]
fn a_store_whose_entries_do_not_hash_to_its_root_is_refused_not_a_panic() {
    // An entry lost (or changed) behind the state's back: the rebuilt trie gives another root.
    let store = MemoryStore::default();
    let mut s = genesis().with_store(Arc::new(store.clone()));
    let mut c = s.commit().unwrap();
    c.entries.retain(|(k, _)| !k.starts_with(b"account/"));
    store.commit(&c, true).unwrap();
    let err = State::open(Arc::new(store.clone())).unwrap_err();
    assert!(err.to_string().contains("corrupt") && err.to_string().contains("not the committed"), "{err}");
    // A garbled entry reads as absent and stops the next seal.
    let store = MemoryStore::default();
    let mut s = genesis().with_store(Arc::new(store.clone()));
    let mut c = s.commit().unwrap();
    for (k, v) in &mut c.entries {
        if k.starts_with(b"account/") {
            *v = Some(vec![1, 2, 3]);
        }
    }
    store.commit(&c, true).unwrap();
    s.committed();
    assert_eq!(s.account(&id(0).node_id()).balance_micro, 0, "a bad entry reads as absent");
    let mut f = s.clone();
    f.begin_block(1, 1);
    assert!(f.seal().unwrap_err().to_string().contains("corrupt"));
}
