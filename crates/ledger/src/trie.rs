//! The authenticated state structure: a sparse binary Merkle trie keyed by the hash of each entry's
//! key, whose root depends only on the set of `(key, value)` entries — not on the order they were
//! written in, nor on where its nodes are kept.
//!
//! Why this shape: a block changes a few entries of a state that may hold millions, so the root
//! must be updated by touching only the changed entries' paths (O(changes × log n) hashes), and a
//! replay, a node that synced the state from a peer and the in-memory store of the tests must all
//! reach the same root. An entry sits at the shallowest depth where no other key shares its path
//! prefix; a subtree with one entry *is* that entry's leaf and an empty subtree hashes to
//! [`Hash::ZERO`], so the shape is canonical. A proof lists the siblings from the root down to
//! where a key's path ends — at its own leaf (presence), at an empty subtree or at another key's
//! leaf (absence) — and is checked offline by folding them back up to the root.
//!
//! Nodes are addressed by their hash. A [`Trie`] holds the nodes it changed in memory and refers to
//! the others by hash, loading them through a [`NodeSource`] (a disk store in the node, nothing in
//! unit tests), so a trie can be forked per block at the cost of one `Arc` clone and persisted by
//! writing out only its new nodes ([`Trie::new_nodes`]).
//!
//! Architecture Invariant: no I/O here; reading stored nodes goes through the caller's
//! [`NodeSource`].

use crate::hash::Hash;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Depth of a key's path: the bits of a 32-byte hash.
pub const KEY_BITS: usize = 256;

/// The hash under which an entry's key is placed.
pub fn key_hash(key: &[u8]) -> Hash {
    Hash::of(&[b"archipel/trie/key", key])
}

/// The hash a leaf commits to for an entry's value.
pub fn value_hash(value: &[u8]) -> Hash {
    Hash::of(&[b"archipel/trie/value", value])
}

fn leaf_hash(key: &Hash, value: &Hash) -> Hash {
    Hash::of(&[b"archipel/trie/leaf", &key.0, &value.0])
}

fn branch_hash(left: &Hash, right: &Hash) -> Hash {
    Hash::of(&[b"archipel/trie/node", &left.0, &right.0])
}

/// Bit `depth` of `h`, most significant first: 0 goes left, 1 right.
fn bit(h: &Hash, depth: usize) -> bool {
    h.0[depth / 8] & (0x80 >> (depth % 8)) != 0
}

/// A node as it is stored: addressed by its hash ([`StoredNode::hash`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredNode {
    /// One entry: its key hash and value hash.
    Leaf {
        /// [`key_hash`] of the entry's key.
        key: Hash,
        /// [`value_hash`] of its value.
        value: Hash,
    },
    /// Two subtrees, at least one holding two entries or both holding one.
    Branch {
        /// Hash of the left subtree ([`Hash::ZERO`] when empty).
        left: Hash,
        /// Hash of the right subtree.
        right: Hash,
    },
}

impl StoredNode {
    /// The node's hash: what its parent and the store know it by.
    pub fn hash(&self) -> Hash {
        match self {
            StoredNode::Leaf { key, value } => leaf_hash(key, value),
            StoredNode::Branch { left, right } => branch_hash(left, right),
        }
    }

    /// The 65-byte encoding a store keeps: a tag (0 leaf, 1 branch) and two hashes.
    pub fn to_bytes(&self) -> [u8; 65] {
        let (tag, a, b) = match self {
            StoredNode::Leaf { key, value } => (0, key, value),
            StoredNode::Branch { left, right } => (1, left, right),
        };
        let mut out = [0u8; 65];
        out[0] = tag;
        out[1..33].copy_from_slice(&a.0);
        out[33..].copy_from_slice(&b.0);
        out
    }

    /// Decodes [`StoredNode::to_bytes`]; `None` for anything else.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 65 {
            return None;
        }
        let a = Hash(bytes[1..33].try_into().ok()?);
        let b = Hash(bytes[33..].try_into().ok()?);
        match bytes[0] {
            0 => Some(StoredNode::Leaf { key: a, value: b }),
            1 => Some(StoredNode::Branch { left: a, right: b }),
            _ => None,
        }
    }
}

/// Why a trie operation could not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrieError {
    /// A node the trie refers to is not in its source (a store that lost data, or a node pruned
    /// while a fork of an older state still used it).
    #[error("trie node {0} is missing from the state store")]
    Missing(Hash),
    /// The source failed to read.
    #[error("state store read failed: {0}")]
    Source(String),
}

/// Where a trie finds the nodes it refers to by hash.
pub trait NodeSource {
    /// The node stored under `hash`.
    fn node(&self, hash: &Hash) -> Result<StoredNode, TrieError>;
}

/// A source with no nodes: for tries held wholly in memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNodes;

impl NodeSource for NoNodes {
    fn node(&self, hash: &Hash) -> Result<StoredNode, TrieError> {
        Err(TrieError::Missing(*hash))
    }
}

/// A subtree: empty, a node kept elsewhere (by hash), or one held in memory. Two words: the trie
/// of a node's whole state lives in memory, two of these per entry (a stored hash is boxed: the
/// node keeps no trie nodes in its store, so only tests and tools hold those).
#[derive(Clone, Debug, Default)]
enum Sub {
    #[default]
    Empty,
    Stored(Box<Hash>),
    Leaf(Arc<MemLeaf>),
    Branch(Arc<MemBranch>),
}

/// An entry. Its hash is not kept (one hash of 64 bytes when a path through it changes): 48
/// bytes less per entry.
#[derive(Debug)]
struct MemLeaf {
    key: Hash,
    value: Hash,
}

#[derive(Debug)]
struct MemBranch {
    left: Sub,
    right: Sub,
    hash: Hash,
}

/// A subtree with its top node read: what an update or a proof needs to descend.
enum Open {
    Empty,
    Leaf { key: Hash, value: Hash },
    Branch { left: Sub, right: Sub },
}

impl Sub {
    fn hash(&self) -> Hash {
        match self {
            Sub::Empty => Hash::ZERO,
            Sub::Stored(h) => **h,
            Sub::Leaf(l) => leaf_hash(&l.key, &l.value),
            Sub::Branch(b) => b.hash,
        }
    }

    fn leaf(key: Hash, value: Hash) -> Sub {
        Sub::Leaf(Arc::new(MemLeaf { key, value }))
    }

    /// A branch over two subtrees, in canonical form: one entry alone moves up to replace it.
    fn branch(left: Sub, right: Sub, src: &dyn NodeSource) -> Result<Sub, TrieError> {
        let single = |s: &Sub| -> Result<bool, TrieError> {
            Ok(match s {
                Sub::Leaf(_) => true,
                Sub::Stored(h) => matches!(src.node(h)?, StoredNode::Leaf { .. }),
                _ => false,
            })
        };
        Ok(match (&left, &right) {
            (Sub::Empty, Sub::Empty) => Sub::Empty,
            (Sub::Empty, other) | (other, Sub::Empty) if single(other)? => other.clone(),
            _ => {
                let hash = branch_hash(&left.hash(), &right.hash());
                Sub::Branch(Arc::new(MemBranch { left, right, hash }))
            }
        })
    }

    fn open(&self, src: &dyn NodeSource) -> Result<Open, TrieError> {
        Ok(match self {
            Sub::Empty => Open::Empty,
            Sub::Leaf(l) => Open::Leaf { key: l.key, value: l.value },
            Sub::Branch(b) => Open::Branch { left: b.left.clone(), right: b.right.clone() },
            Sub::Stored(h) => match src.node(h)? {
                StoredNode::Leaf { key, value } => Open::Leaf { key, value },
                StoredNode::Branch { left, right } => Open::Branch { left: stored(left), right: stored(right) },
            },
        })
    }
}

fn stored(h: Hash) -> Sub {
    if h == Hash::ZERO { Sub::Empty } else { Sub::Stored(Box::new(h)) }
}

/// One change to apply: a key hash and its new value hash, or `None` to remove the entry.
pub type Change = (Hash, Option<Hash>);

/// The authenticated state structure (see the module docs). Cloning is one `Arc` clone (and a
/// copy of the stored nodes it replaced since it was opened).
#[derive(Clone, Debug, Default)]
pub struct Trie {
    root: Sub,
    /// Nodes this trie no longer reaches (stored ones, and ones an ancestor's commit may have
    /// stored), since it was opened or last asked.
    replaced: Vec<Hash>,
}

impl Trie {
    /// An empty trie (root [`Hash::ZERO`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// The trie whose root node is kept in a store under `root`.
    pub fn stored(root: Hash) -> Self {
        Self { root: stored(root), replaced: Vec::new() }
    }

    /// The root hash: [`Hash::ZERO`] when empty.
    pub fn root(&self) -> Hash {
        self.root.hash()
    }

    /// Applies `changes` (in any order; for a key given twice the last wins), touching only their
    /// paths.
    pub fn update(&mut self, changes: impl IntoIterator<Item = Change>, src: &dyn NodeSource) -> Result<(), TrieError> {
        let mut ops: Vec<Change> = changes.into_iter().collect();
        // Stable sort, then keep each key's last change.
        ops.sort_by_key(|a| a.0);
        let mut deduped: Vec<Change> = Vec::with_capacity(ops.len());
        for op in ops {
            match deduped.last_mut() {
                Some(last) if last.0 == op.0 => *last = op,
                _ => deduped.push(op),
            }
        }
        let mut walk = Walk { src, replaced: &mut self.replaced };
        self.root = update(&mut walk, &self.root, 0, &deduped)?;
        Ok(())
    }

    /// The nodes this trie stopped reaching since it was opened or last asked: what a store may
    /// delete once this root is committed (before writing [`Trie::new_nodes`], which may bring
    /// one of them back).
    pub fn take_replaced(&mut self) -> Vec<Hash> {
        std::mem::take(&mut self.replaced)
    }

    /// The value hash stored for `key_hash`, if any.
    pub fn get(&self, key_hash: &Hash, src: &dyn NodeSource) -> Result<Option<Hash>, TrieError> {
        let proof = self.prove(key_hash, src)?;
        Ok(match proof.end {
            ProofEnd::Leaf { key, value } if key == *key_hash => Some(value),
            _ => None,
        })
    }

    /// The path of `key_hash`: siblings from the root down to where it ends.
    pub fn prove(&self, key_hash: &Hash, src: &dyn NodeSource) -> Result<TrieProof, TrieError> {
        let mut siblings = Vec::new();
        let mut at = self.root.clone();
        loop {
            match at.open(src)? {
                Open::Empty => return Ok(TrieProof { siblings, end: ProofEnd::Empty }),
                Open::Leaf { key, value } => return Ok(TrieProof { siblings, end: ProofEnd::Leaf { key, value } }),
                Open::Branch { left, right } => {
                    let right_side = bit(key_hash, siblings.len());
                    let (next, sibling) = if right_side { (right, left) } else { (left, right) };
                    siblings.push(sibling.hash());
                    at = next;
                }
            }
        }
    }

    /// Every node held in memory (changed since the trie was last [`Trie::stored`]), children
    /// before parents: what a store must write to keep this root.
    pub fn new_nodes(&self) -> Vec<(Hash, StoredNode)> {
        let mut out = Vec::new();
        collect(&self.root, &mut out);
        out
    }

    /// How many nodes this trie holds in memory.
    pub fn memory_nodes(&self) -> usize {
        fn count(s: &Sub) -> usize {
            match s {
                Sub::Empty | Sub::Stored(_) => 0,
                Sub::Leaf(_) => 1,
                Sub::Branch(b) => 1 + count(&b.left) + count(&b.right),
            }
        }
        count(&self.root)
    }
}

fn collect(s: &Sub, out: &mut Vec<(Hash, StoredNode)>) {
    match s {
        Sub::Empty | Sub::Stored(_) => {}
        Sub::Leaf(l) => out.push((leaf_hash(&l.key, &l.value), StoredNode::Leaf { key: l.key, value: l.value })),
        Sub::Branch(b) => {
            collect(&b.left, out);
            collect(&b.right, out);
            out.push((b.hash, StoredNode::Branch { left: b.left.hash(), right: b.right.hash() }));
        }
    }
}

/// What an update reads stored nodes from, and where it reports the nodes it replaces.
struct Walk<'a> {
    src: &'a dyn NodeSource,
    replaced: &'a mut Vec<Hash>,
}

/// `ops` sorted by key hash, one per key, all sharing the first `depth` bits of the path to `at`.
fn update(w: &mut Walk<'_>, at: &Sub, depth: usize, ops: &[Change]) -> Result<Sub, TrieError> {
    if ops.is_empty() {
        return Ok(at.clone());
    }
    // Children are borrowed from nodes in memory, not cloned: only the changed path is rebuilt.
    let out = match at {
        Sub::Empty => build(depth, &ops.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).collect::<Vec<_>>(), w.src)?,
        Sub::Leaf(l) => update_leaf(w, at, (l.key, l.value), depth, ops)?,
        Sub::Branch(b) => update_branch(w, at, (&b.left, &b.right), depth, ops)?,
        Sub::Stored(h) => match w.src.node(h)? {
            StoredNode::Leaf { key, value } => update_leaf(w, at, (key, value), depth, ops)?,
            StoredNode::Branch { left, right } => update_branch(w, at, (&stored(left), &stored(right)), depth, ops)?,
        },
    };
    // A node held in memory may have been written by an ancestor's commit already (a child block
    // executed before its parent was committed), so it is reported like a stored one.
    if !matches!(at, Sub::Empty) && out.hash() != at.hash() {
        w.replaced.push(at.hash());
    }
    Ok(out)
}

/// Merges the resident entry with the changes (a change to its key wins), then rebuilds this
/// subtree from what remains: at most one entry more than the changes.
fn update_leaf(
    w: &mut Walk<'_>,
    at: &Sub,
    (key, value): (Hash, Hash),
    depth: usize,
    ops: &[Change],
) -> Result<Sub, TrieError> {
    let mut entries: Vec<(Hash, Hash)> = ops.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).collect();
    if !ops.iter().any(|(k, _)| *k == key) {
        let pos = entries.partition_point(|(k, _)| *k < key);
        entries.insert(pos, (key, value));
    }
    if entries == [(key, value)] {
        return Ok(at.clone());
    }
    build(depth, &entries, w.src)
}

fn update_branch(
    w: &mut Walk<'_>,
    at: &Sub,
    (left, right): (&Sub, &Sub),
    depth: usize,
    ops: &[Change],
) -> Result<Sub, TrieError> {
    if depth >= KEY_BITS {
        // Two distinct 256-bit keys differ before the last bit; a branch this deep is corrupt.
        return Err(TrieError::Source(format!("trie deeper than {KEY_BITS} levels")));
    }
    let split = ops.partition_point(|(k, _)| !bit(k, depth));
    let l = update(w, left, depth + 1, &ops[..split])?;
    let r = update(w, right, depth + 1, &ops[split..])?;
    if l.hash() == left.hash() && r.hash() == right.hash() {
        return Ok(at.clone());
    }
    Sub::branch(l, r, w.src)
}

/// The canonical subtree at `depth` holding `entries` (sorted, distinct keys).
fn build(depth: usize, entries: &[(Hash, Hash)], src: &dyn NodeSource) -> Result<Sub, TrieError> {
    match entries {
        [] => Ok(Sub::Empty),
        [(k, v)] => Ok(Sub::leaf(*k, *v)),
        _ => {
            let split = entries.partition_point(|(k, _)| !bit(k, depth));
            let l = build(depth + 1, &entries[..split], src)?;
            let r = build(depth + 1, &entries[split..], src)?;
            Sub::branch(l, r, src)
        }
    }
}

/// Where a key's path ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ProofEnd {
    /// An empty subtree: the key is absent.
    Empty,
    /// A leaf: the key's own (present) or another key's sharing the path so far (absent).
    Leaf {
        /// The leaf's key hash.
        key: Hash,
        /// The leaf's value hash.
        value: Hash,
    },
}

/// A key's path in the trie: enough to show offline that the key has a value, or has none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrieProof {
    /// Sibling hashes from the root down ([`Hash::ZERO`] for an empty sibling).
    pub siblings: Vec<Hash>,
    /// Where the path ends.
    pub end: ProofEnd,
}

/// What a proof shows about a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proven {
    /// The key is present with this value hash.
    Present(Hash),
    /// The key is absent.
    Absent,
}

impl TrieProof {
    /// Checks the proof against `root` for `key_hash`: what it shows, or why it does not hold.
    pub fn verify(&self, root: &Hash, key_hash: &Hash) -> Result<Proven, String> {
        if self.siblings.len() > KEY_BITS {
            return Err(format!("a path of {} levels is longer than a key ({KEY_BITS} bits)", self.siblings.len()));
        }
        let bottom = match self.end {
            ProofEnd::Empty => Hash::ZERO,
            ProofEnd::Leaf { key, value } => {
                // A leaf on this path shares the key's first bits; otherwise it is not there.
                if (0..self.siblings.len()).any(|d| bit(&key, d) != bit(key_hash, d)) {
                    return Err("the proof's leaf is not on the key's path".into());
                }
                leaf_hash(&key, &value)
            }
        };
        let computed = self.siblings.iter().enumerate().rev().fold(bottom, |acc, (depth, sib)| {
            if bit(key_hash, depth) { branch_hash(sib, &acc) } else { branch_hash(&acc, sib) }
        });
        if computed != *root {
            return Err(format!("the path leads to root {}, not {}", computed.short(), root.short()));
        }
        Ok(match self.end {
            ProofEnd::Leaf { key, value } if key == *key_hash => Proven::Present(value),
            _ => Proven::Absent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

    /// A store of nodes in a map: what the node's disk store does, for tests.
    #[derive(Default)]
    struct MapSource(HashMap<Hash, StoredNode>);

    impl NodeSource for MapSource {
        fn node(&self, hash: &Hash) -> Result<StoredNode, TrieError> {
            self.0.get(hash).copied().ok_or(TrieError::Missing(*hash))
        }
    }

    fn k(i: u64) -> Hash {
        key_hash(&i.to_be_bytes())
    }

    fn v(i: u64) -> Hash {
        value_hash(&i.to_be_bytes())
    }

    /// The final entries after `first` (all writes) then `second`.
    fn mem_entries(first: &[(u64, u64)], second: &[(u64, Option<u64>)]) -> Vec<Change> {
        let mut m: BTreeMap<u64, u64> = first.iter().copied().collect();
        for (a, b) in second {
            match b {
                Some(x) => m.insert(*a, *x),
                None => m.remove(a),
            };
        }
        m.into_iter().map(|(a, b)| (k(a), Some(v(b)))).collect()
    }

    fn from_scratch(entries: &BTreeMap<u64, u64>) -> Hash {
        let mut sorted: Vec<(Hash, Hash)> = entries.iter().map(|(a, b)| (k(*a), v(*b))).collect();
        sorted.sort();
        build(0, &sorted, &NoNodes).unwrap().hash()
    }

    #[test]
    fn a_subtree_is_two_words_and_an_entry_costs_two_small_allocations() {
        // What the node's memory at a million entries rests on (the trie is held whole).
        assert_eq!(std::mem::size_of::<Sub>(), 16);
        assert_eq!(std::mem::size_of::<MemLeaf>(), 64);
        assert_eq!(std::mem::size_of::<MemBranch>(), 64);
    }

    #[test]
    fn empty_and_single_entry_roots() {
        let mut t = Trie::new();
        assert_eq!(t.root(), Hash::ZERO);
        t.update([(k(1), Some(v(1)))], &NoNodes).unwrap();
        assert_eq!(t.root(), leaf_hash(&k(1), &v(1)), "one entry is its own leaf, at the root");
        t.update([(k(1), None)], &NoNodes).unwrap();
        assert_eq!(t.root(), Hash::ZERO);
        t.update([(k(2), None)], &NoNodes).unwrap();
        assert_eq!(t.root(), Hash::ZERO, "removing an absent key changes nothing");
    }

    #[test]
    fn stored_nodes_round_trip_and_refuse_junk() {
        for n in [StoredNode::Leaf { key: k(1), value: v(2) }, StoredNode::Branch { left: k(3), right: Hash::ZERO }] {
            assert_eq!(StoredNode::from_bytes(&n.to_bytes()), Some(n));
        }
        let mut bad = StoredNode::Leaf { key: k(1), value: v(2) }.to_bytes();
        bad[0] = 7;
        assert_eq!(StoredNode::from_bytes(&bad), None);
        assert_eq!(StoredNode::from_bytes(&bad[..64]), None);
    }

    #[test]
    fn a_missing_stored_node_is_an_error_not_a_panic() {
        let t = Trie::stored(k(9));
        assert_eq!(t.get(&k(1), &NoNodes), Err(TrieError::Missing(k(9))));
        let mut t = t;
        assert_eq!(t.update([(k(1), Some(v(1)))], &NoNodes), Err(TrieError::Missing(k(9))));
    }

    #[test]
    fn proofs_refuse_a_leaf_off_the_path_and_overlong_paths() {
        let mut t = Trie::new();
        t.update((0..8).map(|i| (k(i), Some(v(i)))), &NoNodes).unwrap();
        let root = t.root();
        let mut p = t.prove(&k(3), &NoNodes).unwrap();
        assert_eq!(p.verify(&root, &k(3)), Ok(Proven::Present(v(3))));
        // Claim k(3)'s own leaf proves something about a key on another path.
        let other = (100..).map(k).find(|h| bit(h, 0) != bit(&k(3), 0)).unwrap();
        assert!(p.verify(&root, &other).is_err());
        p.siblings = vec![Hash::ZERO; KEY_BITS + 1];
        assert!(p.verify(&root, &k(3)).unwrap_err().contains("longer than a key"));
    }

    #[test]
    fn keys_that_split_at_the_last_bit_build_a_full_depth_path_and_collapse_back() {
        let a = Hash([0x5a; 32]);
        let mut b = a;
        b.0[31] ^= 1; // differs from `a` in the last bit only
        let c = Hash([0xa5; 32]); // differs in the first bit
        let mut t = Trie::new();
        t.update([(a, Some(v(1))), (b, Some(v(2))), (c, Some(v(3)))], &NoNodes).unwrap();
        let root = t.root();
        for (k, want) in [(a, v(1)), (b, v(2)), (c, v(3))] {
            let p = t.prove(&k, &NoNodes).unwrap();
            assert_eq!(p.verify(&root, &k), Ok(Proven::Present(want)));
        }
        assert_eq!(t.prove(&a, &NoNodes).unwrap().siblings.len(), KEY_BITS, "a and b part at the last bit");
        // Tampered paths: the end swapped for an empty subtree, a sibling flipped, one dropped.
        let p = t.prove(&a, &NoNodes).unwrap();
        let mut bad = p.clone();
        bad.end = ProofEnd::Empty;
        assert!(bad.verify(&root, &a).is_err(), "a present key passed off as absent");
        let mut bad = p.clone();
        bad.siblings[100].0[0] ^= 1;
        assert!(bad.verify(&root, &a).is_err());
        let mut bad = p;
        bad.siblings.pop();
        assert!(bad.verify(&root, &a).is_err());
        // Removing `b` collapses the long path: `a`'s leaf moves back up beside `c`.
        t.update([(b, None)], &NoNodes).unwrap();
        assert_eq!(t.prove(&a, &NoNodes).unwrap().siblings.len(), 1);
        let mut fresh = Trie::new();
        fresh.update([(a, Some(v(1))), (c, Some(v(3)))], &NoNodes).unwrap();
        assert_eq!(t.root(), fresh.root());
    }

    proptest! {
        /// Incremental updates in batches give the root built from scratch over the final set, and
        /// every key's proof shows exactly its value or its absence.
        #[test]
        fn root_depends_only_on_the_entries(
            batches in prop::collection::vec(prop::collection::vec((0u64..64, prop::option::of(0u64..4)), 0..24), 1..8),
        ) {
            let mut t = Trie::new();
            let mut model = BTreeMap::new();
            for batch in &batches {
                t.update(batch.iter().map(|(key, val)| (k(*key), val.map(v))), &NoNodes).unwrap();
                for (key, val) in batch {
                    match val { Some(x) => { model.insert(*key, *x); } None => { model.remove(key); } }
                }
                prop_assert_eq!(t.root(), from_scratch(&model));
            }
            let root = t.root();
            for key in 0u64..64 {
                let proof = t.prove(&k(key), &NoNodes).unwrap();
                let want = model.get(&key).map_or(Proven::Absent, |x| Proven::Present(v(*x)));
                prop_assert_eq!(proof.verify(&root, &k(key)), Ok(want));
                prop_assert_eq!(t.get(&k(key), &NoNodes).unwrap(), model.get(&key).map(|x| v(*x)));
                // The same proof does not hold for another value or another root.
                if let Some(x) = model.get(&key) {
                    let mut forged = proof.clone();
                    forged.end = ProofEnd::Leaf { key: k(key), value: v(x + 1) };
                    prop_assert!(forged.verify(&root, &k(key)).is_err());
                }
                prop_assert!(proof.verify(&k(999), &k(key)).is_err());
            }
        }

        /// A trie written to a store and reopened by its root hash reads, proves and updates as the
        /// one held in memory, loading only what it touches.
        #[test]
        fn a_stored_trie_behaves_as_the_one_in_memory(
            first in prop::collection::vec((0u64..200, 0u64..4), 1..120),
            second in prop::collection::vec((0u64..200, prop::option::of(0u64..4)), 0..40),
        ) {
            let mut mem = Trie::new();
            mem.update(first.iter().map(|(a, b)| (k(*a), Some(v(*b)))), &NoNodes).unwrap();
            let mut src = MapSource::default();
            for (h, n) in mem.new_nodes() {
                prop_assert_eq!(n.hash(), h);
                src.0.insert(h, n);
            }
            let mut disk = Trie::stored(mem.root());
            prop_assert_eq!(disk.memory_nodes(), 0);
            let changes: Vec<Change> = second.iter().map(|(a, b)| (k(*a), b.map(v))).collect();
            mem.update(changes.clone(), &NoNodes).unwrap();
            disk.update(changes, &src).unwrap();
            prop_assert_eq!(disk.root(), mem.root());
            // Writing the change as a store would — drop what it replaced, add what it made —
            // leaves exactly the nodes the new root reaches.
            let mut next = MapSource(src.0.clone());
            for h in disk.clone().take_replaced() {
                next.0.remove(&h);
            }
            next.0.extend(disk.new_nodes());
            let mut reachable = HashMap::new();
            let mut fresh = Trie::new();
            fresh.update(mem_entries(&first, &second), &NoNodes).unwrap();
            for (h, n) in fresh.new_nodes() {
                reachable.insert(h, n);
            }
            prop_assert_eq!(next.0, reachable);
            let mut deepest = 0;
            for key in 0u64..200 {
                let proof = mem.prove(&k(key), &NoNodes).unwrap();
                deepest = deepest.max(proof.siblings.len());
                prop_assert_eq!(disk.prove(&k(key), &src).unwrap(), proof);
            }
            // Each change rebuilds at most its own path and one displaced leaf.
            prop_assert!(disk.memory_nodes() <= second.len() * (deepest + 2), "only touched paths are held");
        }
    }
}
