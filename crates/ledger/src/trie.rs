//! The authenticated state structure: a sparse binary Merkle trie keyed by the hash of each entry's
//! key, whose root depends only on the set of `(key, value)` entries — not on the order they were
//! written in, nor on which of its nodes are held in memory.
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
//! Memory stays bounded as the state grows: a [`Trie`] keeps in memory only the levels above a
//! *bucket depth* (16 in the node, 17 at 10^6 entries: a few MiB) and the paths changed since
//! its last [`Trie::compact`]. Below that depth a subtree of two or more entries is kept as its
//! hash alone, a *bucket*; its leaves — `(key hash, value hash)` pairs — are read back from a
//! [`LeafSource`] (the state store keeps them in key-hash order) and the subtree is rebuilt
//! whenever a change or a proof goes through it, and checked against the kept hash, so a source
//! that does not match is an error, never a wrong root. At 10^6 entries a bucket holds about 8,
//! so touching one costs a range read and about 20 hashes (each leaf's, each branch's of the old
//! bucket once, and the changed path's again); a subtree of more than
//! [`MAX_BUCKET_LEAVES`] entries (keys ground to share a prefix) is split further in memory.
//!
//! Architecture Invariant: no I/O here; reading leaves goes through the caller's [`LeafSource`].

use crate::hash::Hash;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Depth of a key's path: the bits of a 32-byte hash.
pub const KEY_BITS: usize = 256;

/// The shallowest depth at which the node keeps subtrees as buckets (see the module docs): 2^16
/// buckets; the store goes deeper as the state grows.
pub const BUCKET_DEPTH: usize = 16;

/// Most entries a bucket holds: a subtree at the bucket depth with more (keys whose hashes were
/// ground to share a prefix, or a state that outgrew its depth) is split further, in memory,
/// until its parts fit, so what a change or a proof rebuilds stays bounded whatever the keys.
pub const MAX_BUCKET_LEAVES: usize = 64;

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

/// The smallest and largest hashes sharing the first `depth` bits of `path`: the key range of
/// the subtree at that depth on that path.
pub fn prefix_range(path: &Hash, depth: usize) -> (Hash, Hash) {
    let (mut lo, mut hi) = (*path, *path);
    for d in depth.min(KEY_BITS)..KEY_BITS {
        let mask = 0x80u8 >> (d % 8);
        lo.0[d / 8] &= !mask;
        hi.0[d / 8] |= mask;
    }
    (lo, hi)
}

/// One entry as the trie sees it: its key hash and value hash.
pub type Leaf = (Hash, Hash);

/// Why a trie operation could not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrieError {
    /// A bucket's leaves, as the source holds them, do not hash to the bucket the trie kept (a
    /// store that lost or changed entries, or a trie older than what the store now holds).
    #[error(
        "the state store's entries under trie prefix {prefix} (depth {depth}) hash to {got}, not {want}: the store does not hold this state"
    )]
    Mismatch {
        /// The first bytes of the bucket's path, in hex.
        prefix: String,
        /// The bucket's depth.
        depth: usize,
        /// The hash the trie kept.
        want: String,
        /// What the source's leaves hash to.
        got: String,
    },
    /// The source holds something no store writes (leaves out of order, repeated, or garbled).
    #[error("the state store is corrupt: {0}")]
    Corrupt(String),
    /// The source failed to read.
    #[error("state store read failed: {0}")]
    Source(String),
}

/// Where a trie reads the leaves of its buckets: every entry as `(key hash, value hash)`, in
/// key-hash order.
pub trait LeafSource {
    /// The leaves whose key hashes lie in `lo..=hi`, in key-hash order.
    fn leaves(&self, lo: &Hash, hi: &Hash) -> Result<Vec<Leaf>, TrieError>;
}

/// A source with no leaves: for tries held wholly in memory (never compacted).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLeaves;

impl LeafSource for NoLeaves {
    fn leaves(&self, _: &Hash, _: &Hash) -> Result<Vec<Leaf>, TrieError> {
        Ok(Vec::new())
    }
}

/// A subtree: empty, a bucket (its leaves in the source), or one held in memory. Two words (a
/// bucket is boxed).
#[derive(Clone, Debug, Default)]
enum Sub {
    #[default]
    Empty,
    /// Two to [`MAX_BUCKET_LEAVES`] entries at or below the bucket depth, kept as their
    /// subtree's hash.
    Bucket(Box<Bucket>),
    /// A bucket changed since the last compaction, held as its sorted leaves and hash (not as
    /// nodes: one allocation for the whole bucket, and nothing to rebuild until a proof asks).
    Leaves(Arc<MemBucket>),
    Leaf(Arc<MemLeaf>),
    Branch(Arc<MemBranch>),
}

/// A bucket in memory: two to [`MAX_BUCKET_LEAVES`] leaves with their hashes, in key-hash order,
/// and the hash of their subtree.
#[derive(Debug)]
struct MemBucket {
    leaves: Vec<Hashed>,
    hash: Hash,
}

/// An entry. Its hash is not kept (one hash of 64 bytes when a path through it changes): 48
/// bytes less per entry.
#[derive(Debug)]
struct MemLeaf {
    key: Hash,
    value: Hash,
}

/// A subtree kept as its hash, with how many entries it holds.
#[derive(Clone, Debug)]
struct Bucket {
    hash: Hash,
    leaves: u32,
}

#[derive(Debug)]
struct MemBranch {
    left: Sub,
    right: Sub,
    hash: Hash,
    /// Entries under it (saturating).
    leaves: u32,
    /// Made by an update since the last [`Trie::compact`]: it may hold subtrees below the bucket
    /// depth in memory. Compaction walks only these, so it costs what changed, not the top's size.
    fresh: bool,
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
            Sub::Bucket(b) => b.hash,
            Sub::Leaves(b) => b.hash,
            Sub::Leaf(l) => leaf_hash(&l.key, &l.value),
            Sub::Branch(b) => b.hash,
        }
    }

    /// Entries under it.
    fn leaves(&self) -> u32 {
        match self {
            Sub::Empty => 0,
            Sub::Leaf(_) => 1,
            Sub::Bucket(b) => b.leaves,
            Sub::Leaves(b) => b.leaves.len() as u32,
            Sub::Branch(b) => b.leaves,
        }
    }

    fn bucket(hash: Hash, leaves: u32) -> Sub {
        Sub::Bucket(Box::new(Bucket { hash, leaves }))
    }

    fn leaf(key: Hash, value: Hash) -> Sub {
        Sub::Leaf(Arc::new(MemLeaf { key, value }))
    }

    /// A branch over two subtrees, in canonical form: one entry alone moves up to replace it (a
    /// bucket holds two or more, so it never does). Made by an update: fresh (see [`MemBranch`]).
    fn branch(left: Sub, right: Sub) -> Sub {
        Self::branch_of(left, right, true)
    }

    fn branch_of(left: Sub, right: Sub, fresh: bool) -> Sub {
        match (&left, &right) {
            (Sub::Empty, Sub::Empty) => Sub::Empty,
            (Sub::Empty, Sub::Leaf(_)) => right,
            (Sub::Leaf(_), Sub::Empty) => left,
            _ => {
                let hash = branch_hash(&left.hash(), &right.hash());
                let leaves = left.leaves().saturating_add(right.leaves());
                Sub::Branch(Arc::new(MemBranch { left, right, hash, leaves, fresh }))
            }
        }
    }

    fn open(&self, src: &dyn LeafSource, path: &Hash, depth: usize) -> Result<Open, TrieError> {
        Ok(match self {
            Sub::Empty => Open::Empty,
            Sub::Leaf(l) => Open::Leaf { key: l.key, value: l.value },
            Sub::Branch(b) => Open::Branch { left: b.left.clone(), right: b.right.clone() },
            Sub::Bucket(want) => {
                let b = expand(want, src, path, depth)?;
                Open::Branch { left: b.left.clone(), right: b.right.clone() }
            }
            Sub::Leaves(b) => {
                return build(depth, &plain(&b.leaves)).open(src, path, depth);
            }
        })
    }
}

/// The hash of the canonical subtree at `depth` over `entries` (sorted, distinct keys), computed
/// without building it.
fn root_of<L: Keyed>(depth: usize, entries: &[L]) -> Hash {
    match entries {
        [] => Hash::ZERO,
        [one] => one.leaf_hash(),
        _ => {
            let split = entries.partition_point(|l| !bit(l.key(), depth));
            // One entry alone under a side moves up only when the other side is empty, and then
            // this subtree would hold one entry: with two or more, both hashes are branches'.
            branch_hash(&root_of(depth + 1, &entries[..split]), &root_of(depth + 1, &entries[split..]))
        }
    }
}

/// The leaves of the bucket `want` on `path` at `depth`, read from the source and checked
/// against its hash.
fn load(want: &Bucket, src: &dyn LeafSource, path: &Hash, depth: usize) -> Result<Vec<Leaf>, TrieError> {
    let (lo, hi) = prefix_range(path, depth);
    let leaves = src.leaves(&lo, &hi)?;
    check_leaves(&leaves, &lo, &hi)?;
    check_bucket(want, &lo, depth, leaves.len(), root_of(depth, &leaves))?;
    Ok(leaves)
}

/// Refuses a bucket whose `count` leaves from the source (whose range starts at `lo`) hash to
/// `got` instead of the hash the trie kept.
fn check_bucket(want: &Bucket, lo: &Hash, depth: usize, count: usize, got: Hash) -> Result<(), TrieError> {
    if count < 2 || got != want.hash {
        return Err(TrieError::Mismatch {
            prefix: hex::encode(&lo.0[..depth.div_ceil(8).max(1)]),
            depth,
            want: want.hash.short(),
            got: got.short(),
        });
    }
    Ok(())
}

/// A leaf with its hash, computed once per bucket update and shared by the check of the old
/// bucket and the hash of the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hashed {
    key: Hash,
    value: Hash,
    hash: Hash,
}

impl Hashed {
    fn of((key, value): Leaf) -> Self {
        Hashed { key, value, hash: leaf_hash(&key, &value) }
    }
}

/// A leaf as the hashing of a subtree sees it: its key hash, and its leaf hash (computed, or
/// kept from an earlier computation).
trait Keyed {
    fn key(&self) -> &Hash;
    fn leaf_hash(&self) -> Hash;
}

impl Keyed for Leaf {
    fn key(&self) -> &Hash {
        &self.0
    }
    fn leaf_hash(&self) -> Hash {
        leaf_hash(&self.0, &self.1)
    }
}

impl Keyed for Hashed {
    fn key(&self) -> &Hash {
        &self.key
    }
    fn leaf_hash(&self) -> Hash {
        self.hash
    }
}

/// The `(key hash, value hash)` pairs of leaves held with their hashes.
fn plain(leaves: &[Hashed]) -> Vec<Leaf> {
    leaves.iter().map(|l| (l.key, l.value)).collect()
}

/// The hashes of the subtrees at `depth` over `old` and over `new` together: a part the two
/// share (no change under it) is hashed once, so a bucket's update costs its leaves' hashes,
/// its branches once, and the changed paths again.
fn roots_of_both(depth: usize, old: &[Hashed], new: &[Hashed]) -> (Hash, Hash) {
    if old == new {
        let h = root_of(depth, old);
        return (h, h);
    }
    if old.len() < 2 || new.len() < 2 {
        return (root_of(depth, old), root_of(depth, new));
    }
    let (so, sn) = (old.partition_point(|l| !bit(&l.key, depth)), new.partition_point(|l| !bit(&l.key, depth)));
    let (lo, ln) = roots_of_both(depth + 1, &old[..so], &new[..sn]);
    let (ro, rn) = roots_of_both(depth + 1, &old[so..], &new[sn..]);
    (branch_hash(&lo, &ro), branch_hash(&ln, &rn))
}

/// `leaves` after `ops` (both sorted by key hash, one op per key), unchanged leaves keeping their
/// hashes.
fn merge(leaves: &[Hashed], ops: &[Change]) -> Vec<Hashed> {
    let mut merged = Vec::with_capacity(leaves.len() + ops.len());
    let (mut i, mut j) = (0, 0);
    while i < leaves.len() || j < ops.len() {
        let take_op = j < ops.len() && (i == leaves.len() || ops[j].0 <= leaves[i].key);
        if take_op {
            if i < leaves.len() && leaves[i].key == ops[j].0 {
                i += 1; // replaced or removed
            }
            if let Some(v) = ops[j].1 {
                merged.push(Hashed::of((ops[j].0, v)));
            }
            j += 1;
        } else {
            merged.push(leaves[i]);
            i += 1;
        }
    }
    merged
}

/// The subtree at `depth` over `merged` (sorted), whose hash is `hash`: a bucket in memory while
/// it holds two to [`MAX_BUCKET_LEAVES`], else built as it comes out.
fn rebucket(depth: usize, merged: Vec<Hashed>, hash: Hash) -> Sub {
    if merged.len() < 2 || merged.len() > MAX_BUCKET_LEAVES {
        return build(depth, &plain(&merged));
    }
    Sub::Leaves(Arc::new(MemBucket { leaves: merged, hash }))
}

/// The bucket `want` at `depth` after `ops` (sorted, one per key, all under it): its leaves read
/// from the source and checked against its hash in the same pass that hashes the new bucket.
fn update_bucket(want: &Bucket, src: &dyn LeafSource, depth: usize, ops: &[Change]) -> Result<Sub, TrieError> {
    let (lo, hi) = prefix_range(&ops[0].0, depth);
    let leaves = src.leaves(&lo, &hi)?;
    check_leaves(&leaves, &lo, &hi)?;
    let old: Vec<Hashed> = leaves.into_iter().map(Hashed::of).collect();
    let merged = merge(&old, ops);
    let (got, hash) = roots_of_both(depth, &old, &merged);
    check_bucket(want, &lo, depth, old.len(), got)?;
    Ok(rebucket(depth, merged, hash))
}

/// The bucket `want` on `path` at `depth`, rebuilt in memory from the source's leaves (checked
/// by [`load`]).
fn expand(want: &Bucket, src: &dyn LeafSource, path: &Hash, depth: usize) -> Result<Arc<MemBranch>, TrieError> {
    match build(depth, &load(want, src, path, depth)?) {
        Sub::Branch(b) => Ok(b),
        _ => Err(TrieError::Corrupt("a bucket of two or more leaves built to no branch".into())),
    }
}

/// Refuses leaves a source handed back out of key order, twice, or outside `lo..=hi` (building
/// on them would not be canonical).
fn check_leaves(leaves: &[Leaf], lo: &Hash, hi: &Hash) -> Result<(), TrieError> {
    if leaves.iter().any(|(k, _)| k < lo || k > hi) || leaves.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(TrieError::Corrupt("leaves out of key-hash order or out of range".into()));
    }
    Ok(())
}

/// One change to apply: a key hash and its new value hash, or `None` to remove the entry.
pub type Change = (Hash, Option<Hash>);

/// The authenticated state structure (see the module docs). Cloning is one `Arc` clone.
#[derive(Clone, Debug, Default)]
pub struct Trie {
    root: Sub,
}

/// While a trie is built from all its leaves, the depth of the subtrees built one at a time.
const OPEN_CHUNK_DEPTH: usize = 8;

impl Trie {
    /// An empty trie (root [`Hash::ZERO`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// The trie over every leaf `src` holds, read a chunk at a time and kept in memory only
    /// above `bucket_depth` (see the module docs).
    pub fn open(src: &dyn LeafSource, bucket_depth: usize) -> Result<Self, TrieError> {
        let mut b = Builder::new(bucket_depth);
        for i in 0..1usize << b.chunk_depth {
            // Chunk `i`'s path: `i` in the first `chunk_depth` bits.
            let mut path = Hash::ZERO;
            for d in 0..b.chunk_depth {
                if i & (1 << (b.chunk_depth - 1 - d)) != 0 {
                    path.0[d / 8] |= 0x80 >> (d % 8);
                }
            }
            let (lo, hi) = prefix_range(&path, b.chunk_depth);
            let leaves = src.leaves(&lo, &hi)?;
            check_leaves(&leaves, &lo, &hi)?;
            for leaf in leaves {
                b.push(leaf)?;
            }
        }
        Ok(b.finish())
    }

    /// The root hash: [`Hash::ZERO`] when empty.
    pub fn root(&self) -> Hash {
        self.root.hash()
    }

    /// Applies `changes` (in any order; for a key given twice the last wins), touching only their
    /// paths; buckets on them are read from `src` (and stay in memory until [`Trie::compact`]).
    pub fn update(&mut self, changes: impl IntoIterator<Item = Change>, src: &dyn LeafSource) -> Result<(), TrieError> {
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
        self.root = update(src, &self.root, 0, &deduped)?;
        Ok(())
    }

    /// Lets go of every subtree of two or more entries at `bucket_depth`, keeping its hash: call
    /// once `src` holds exactly this trie's entries (after the state is committed to it), so
    /// what a later update or proof reads back is what was let go.
    pub fn compact(&mut self, bucket_depth: usize) {
        self.compact_except(bucket_depth, Vec::new());
    }

    /// As [`Trie::compact`], but the buckets holding any of `keep` (key hashes) stay in memory:
    /// for a trie one or more blocks ahead of what `src` holds, whose own changes since are
    /// those keys (a state executed on its parent before the parent was committed).
    pub fn compact_except(&mut self, bucket_depth: usize, mut keep: Vec<Hash>) {
        keep.sort_unstable();
        keep.dedup();
        if let Some(root) = compact(&self.root, 0, bucket_depth, &keep) {
            self.root = root;
        }
    }

    /// The value hash stored for `key_hash`, if any.
    pub fn get(&self, key_hash: &Hash, src: &dyn LeafSource) -> Result<Option<Hash>, TrieError> {
        let proof = self.prove(key_hash, src)?;
        Ok(match proof.end {
            ProofEnd::Leaf { key, value } if key == *key_hash => Some(value),
            _ => None,
        })
    }

    /// The path of `key_hash`: siblings from the root down to where it ends.
    pub fn prove(&self, key_hash: &Hash, src: &dyn LeafSource) -> Result<TrieProof, TrieError> {
        let mut siblings = Vec::new();
        let mut at = self.root.clone();
        loop {
            match at.open(src, key_hash, siblings.len())? {
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

    /// How many nodes this trie holds in memory: a bucket kept as its hash counts as none, one
    /// held as its leaves as one per leaf.
    pub fn memory_nodes(&self) -> usize {
        fn count(s: &Sub) -> usize {
            match s {
                Sub::Empty | Sub::Bucket(_) => 0,
                Sub::Leaf(_) => 1,
                Sub::Leaves(b) => b.leaves.len(),
                Sub::Branch(b) => 1 + count(&b.left) + count(&b.right),
            }
        }
        count(&self.root)
    }
}

/// Builds a trie from every leaf, given in key-hash order, holding one chunk's leaves at a time
/// (subtrees at [`OPEN_CHUNK_DEPTH`]: at 10^7 entries about 40,000 leaves, 2.5 MiB) and keeping
/// the result as buckets below the bucket depth: what opening a stored state costs, one pass.
#[derive(Debug)]
pub struct Builder {
    chunk_depth: usize,
    bucket_depth: usize,
    chunks: Vec<Sub>,
    current: Vec<Leaf>,
    current_chunk: usize,
}

impl Builder {
    /// A builder for a trie kept as buckets below `bucket_depth`.
    pub fn new(bucket_depth: usize) -> Self {
        let chunk_depth = OPEN_CHUNK_DEPTH.min(bucket_depth);
        Builder {
            chunk_depth,
            bucket_depth,
            chunks: vec![Sub::Empty; 1 << chunk_depth],
            current: Vec::new(),
            current_chunk: 0,
        }
    }

    /// Takes the next leaf; refuses one not above the last in key-hash order.
    pub fn push(&mut self, leaf: Leaf) -> Result<(), TrieError> {
        if self.current.last().is_some_and(|last| last.0 >= leaf.0) || self.chunk_of(&leaf.0) < self.current_chunk {
            return Err(TrieError::Corrupt("leaves out of key-hash order or repeated".into()));
        }
        let chunk = self.chunk_of(&leaf.0);
        if chunk != self.current_chunk {
            self.close_chunk();
            self.current_chunk = chunk;
        }
        self.current.push(leaf);
        Ok(())
    }

    /// The trie over every leaf pushed.
    pub fn finish(mut self) -> Trie {
        self.close_chunk();
        Trie { root: join_level(self.chunks) }
    }

    fn chunk_of(&self, h: &Hash) -> usize {
        (0..self.chunk_depth).fold(0, |acc, d| (acc << 1) | usize::from(bit(h, d)))
    }

    fn close_chunk(&mut self) {
        if !self.current.is_empty() {
            self.chunks[self.current_chunk] = build_compacted(self.chunk_depth, &self.current, self.bucket_depth);
            self.current.clear();
        }
    }
}

/// `subs`, the 2^k subtrees at depth k in path order, joined into the subtree above them.
fn join_level(mut subs: Vec<Sub>) -> Sub {
    while subs.len() > 1 {
        let mut it = subs.into_iter();
        let mut up = Vec::new();
        while let (Some(l), Some(r)) = (it.next(), it.next()) {
            up.push(Sub::branch_of(l, r, false));
        }
        subs = up;
    }
    subs.pop().unwrap_or_default()
}

/// The canonical subtree at `depth` over `entries` (sorted, distinct keys), kept as buckets at
/// `bucket_depth`.
fn build_compacted(depth: usize, entries: &[Leaf], bucket_depth: usize) -> Sub {
    match entries {
        [] => Sub::Empty,
        [(k, v)] => Sub::leaf(*k, *v),
        _ if depth >= bucket_depth && entries.len() <= MAX_BUCKET_LEAVES => {
            Sub::bucket(root_of(depth, entries), entries.len() as u32)
        }
        _ => {
            let split = entries.partition_point(|(k, _)| !bit(k, depth));
            let l = build_compacted(depth + 1, &entries[..split], bucket_depth);
            let r = build_compacted(depth + 1, &entries[split..], bucket_depth);
            Sub::branch_of(l, r, false)
        }
    }
}

/// Whether `b`, at `depth`, is small enough and deep enough to be kept as a bucket.
fn fits_bucket(b: &MemBranch, depth: usize, bucket_depth: usize) -> bool {
    depth >= bucket_depth && b.leaves as usize <= MAX_BUCKET_LEAVES
}

/// `s` (at `depth`) with its branches at `bucket_depth` (or below, for subtrees of more than
/// [`MAX_BUCKET_LEAVES`] entries) kept as buckets, except those holding a key of `keep`
/// (sorted); `None` if it stays as it is.
fn compact(s: &Sub, depth: usize, bucket_depth: usize, keep: &[Hash]) -> Option<Sub> {
    let b = match s {
        Sub::Branch(b) => b,
        Sub::Leaves(_) if !keep.is_empty() => return None,
        // A bucket above the bucket depth (made when the state was smaller, which buckets less
        // deeply) is split once it changed, so buckets follow the state as it grows.
        Sub::Leaves(b) if depth < bucket_depth => {
            return Some(build_compacted(depth, &plain(&b.leaves), bucket_depth));
        }
        Sub::Leaves(b) => return Some(Sub::bucket(b.hash, b.leaves.len() as u32)),
        _ => return None,
    };
    if fits_bucket(b, depth, bucket_depth) {
        return keep.is_empty().then(|| Sub::bucket(b.hash, b.leaves));
    }
    if !b.fresh {
        return None;
    }
    let split = keep.partition_point(|k| !bit(k, depth));
    let left = compact(&b.left, depth + 1, bucket_depth, &keep[..split]).unwrap_or_else(|| b.left.clone());
    let right = compact(&b.right, depth + 1, bucket_depth, &keep[split..]).unwrap_or_else(|| b.right.clone());
    // Still fresh while a subtree that could be a bucket stays in memory under it.
    let expanded = |c: &Sub| match c {
        Sub::Branch(c) => c.fresh || fits_bucket(c, depth + 1, bucket_depth),
        Sub::Leaves(_) => true,
        _ => false,
    };
    let fresh = expanded(&left) || expanded(&right);
    Some(Sub::Branch(Arc::new(MemBranch { left, right, hash: b.hash, leaves: b.leaves, fresh })))
}

/// `ops` sorted by key hash, one per key, all sharing the first `depth` bits of the path to `at`.
fn update(src: &dyn LeafSource, at: &Sub, depth: usize, ops: &[Change]) -> Result<Sub, TrieError> {
    if ops.is_empty() {
        return Ok(at.clone());
    }
    // Children are borrowed from nodes in memory, not cloned: only the changed path is rebuilt.
    match at {
        Sub::Empty => Ok(build(depth, &ops.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).collect::<Vec<_>>())),
        Sub::Leaf(l) => Ok(update_leaf(at, (l.key, l.value), depth, ops)),
        Sub::Branch(b) => update_branch(src, at, (&b.left, &b.right), depth, ops),
        Sub::Bucket(want) => update_bucket(want, src, depth, ops),
        Sub::Leaves(b) => {
            let merged = merge(&b.leaves, ops);
            let hash = root_of(depth, &merged);
            Ok(rebucket(depth, merged, hash))
        }
    }
}

/// Merges the resident entry with the changes (a change to its key wins), then rebuilds this
/// subtree from what remains: at most one entry more than the changes.
fn update_leaf(at: &Sub, (key, value): Leaf, depth: usize, ops: &[Change]) -> Sub {
    let mut entries: Vec<Leaf> = ops.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).collect();
    if !ops.iter().any(|(k, _)| *k == key) {
        let pos = entries.partition_point(|(k, _)| *k < key);
        entries.insert(pos, (key, value));
    }
    if entries == [(key, value)] {
        return at.clone();
    }
    build(depth, &entries)
}

fn update_branch(
    src: &dyn LeafSource,
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
    let l = update(src, left, depth + 1, &ops[..split])?;
    let r = update(src, right, depth + 1, &ops[split..])?;
    if l.hash() == left.hash() && r.hash() == right.hash() {
        return Ok(at.clone());
    }
    Ok(Sub::branch(l, r))
}

/// The canonical subtree at `depth` holding `entries` (sorted, distinct keys), all in memory.
fn build(depth: usize, entries: &[Leaf]) -> Sub {
    match entries {
        [] => Sub::Empty,
        [(k, v)] => Sub::leaf(*k, *v),
        _ => {
            let split = entries.partition_point(|(k, _)| !bit(k, depth));
            let l = build(depth + 1, &entries[..split]);
            let r = build(depth + 1, &entries[split..]);
            Sub::branch(l, r)
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
    use std::collections::BTreeMap;

    /// Leaves in a map: what the state store keeps, for tests.
    #[derive(Default, Clone)]
    struct MapSource(BTreeMap<Hash, Hash>);

    impl LeafSource for MapSource {
        fn leaves(&self, lo: &Hash, hi: &Hash) -> Result<Vec<Leaf>, TrieError> {
            Ok(self.0.range(*lo..=*hi).map(|(k, v)| (*k, *v)).collect())
        }
    }

    impl MapSource {
        fn apply(&mut self, changes: &[Change]) {
            for (k, v) in changes {
                match v {
                    Some(v) => self.0.insert(*k, *v),
                    None => self.0.remove(k),
                };
            }
        }
    }

    fn k(i: u64) -> Hash {
        key_hash(&i.to_be_bytes())
    }

    fn v(i: u64) -> Hash {
        value_hash(&i.to_be_bytes())
    }

    fn from_scratch(entries: &BTreeMap<u64, u64>) -> Hash {
        let mut sorted: Vec<Leaf> = entries.iter().map(|(a, b)| (k(*a), v(*b))).collect();
        sorted.sort();
        build(0, &sorted).hash()
    }

    /// Checks the shape compaction leaves: no branch in memory that would fit a bucket, and
    /// every bucket of two to [`MAX_BUCKET_LEAVES`] entries, at or below the bucket depth.
    fn compacted(s: &Sub, depth: usize, bucket_depth: usize) -> Result<(), String> {
        match s {
            Sub::Branch(b) if fits_bucket(b, depth, bucket_depth) => {
                Err(format!("a branch of {} entries at depth {depth} stays in memory", b.leaves))
            }
            Sub::Branch(b) => {
                compacted(&b.left, depth + 1, bucket_depth)?;
                compacted(&b.right, depth + 1, bucket_depth)
            }
            Sub::Bucket(b) if depth < bucket_depth || b.leaves < 2 || b.leaves as usize > MAX_BUCKET_LEAVES => {
                Err(format!("a bucket of {} entries at depth {depth}", b.leaves))
            }
            Sub::Leaves(b) => Err(format!("a bucket of {} entries held in memory at depth {depth}", b.leaves.len())),
            _ => Ok(()),
        }
    }

    fn source_of(changes: &[Change]) -> MapSource {
        let mut src = MapSource::default();
        src.apply(changes);
        src
    }

    #[test]
    fn a_subtree_is_two_words_and_an_entry_costs_two_small_allocations() {
        assert_eq!(std::mem::size_of::<Sub>(), 16);
        assert_eq!(std::mem::size_of::<MemLeaf>(), 64);
        assert_eq!(std::mem::size_of::<MemBranch>(), 72);
    }

    #[test]
    fn empty_and_single_entry_roots() {
        let mut t = Trie::new();
        assert_eq!(t.root(), Hash::ZERO);
        t.update([(k(1), Some(v(1)))], &NoLeaves).unwrap();
        assert_eq!(t.root(), leaf_hash(&k(1), &v(1)), "one entry is its own leaf, at the root");
        t.update([(k(1), None)], &NoLeaves).unwrap();
        assert_eq!(t.root(), Hash::ZERO);
        t.update([(k(2), None)], &NoLeaves).unwrap();
        assert_eq!(t.root(), Hash::ZERO, "removing an absent key changes nothing");
        assert_eq!(Trie::open(&NoLeaves, BUCKET_DEPTH).unwrap().root(), Hash::ZERO);
    }

    #[test]
    fn prefix_ranges_cover_exactly_the_keys_sharing_the_prefix() {
        let p = Hash([0b1011_0110; 32]);
        let (lo, hi) = prefix_range(&p, 3);
        assert_eq!(lo.0[0], 0b1010_0000);
        assert!(lo.0[1..].iter().all(|b| *b == 0));
        assert_eq!(hi.0[0], 0b1011_1111);
        assert!(hi.0[1..].iter().all(|b| *b == 0xff));
        assert_eq!(prefix_range(&p, KEY_BITS), (p, p));
        assert_eq!(prefix_range(&p, 0), (Hash::ZERO, Hash([0xff; 32])));
    }

    #[test]
    fn a_bucket_whose_source_changed_behind_it_is_an_error_not_a_wrong_root() {
        let changes: Vec<Change> = (0..64).map(|i| (k(i), Some(v(i)))).collect();
        let mut src = source_of(&changes);
        let mut t = Trie::open(&src, 2).unwrap();
        let root = t.root();
        assert!(t.memory_nodes() <= 7, "only the top two levels: {}", t.memory_nodes());
        // The store loses an entry (or holds a later state): every bucket read through is checked.
        src.0.remove(&k(5));
        let err = t.prove(&k(5), &src).unwrap_err();
        assert!(matches!(err, TrieError::Mismatch { depth: 2, .. }), "{err}");
        assert!(err.to_string().contains("does not hold this state"), "{err}");
        let err = t.update([(k(5), Some(v(99)))], &src).unwrap_err();
        assert!(matches!(err, TrieError::Mismatch { .. }), "{err}");
        assert_eq!(t.root(), root, "a failed update changes nothing");
        // Leaves handed back out of range or order are refused, not built on.
        struct Liar;
        impl LeafSource for Liar {
            fn leaves(&self, _: &Hash, _: &Hash) -> Result<Vec<Leaf>, TrieError> {
                Ok(vec![(k(2), v(2)), (k(1), v(1))])
            }
        }
        assert!(matches!(Trie::open(&Liar, 4), Err(TrieError::Corrupt(_))));
        assert!(matches!(t.prove(&k(1), &Liar), Err(TrieError::Corrupt(_))));
    }

    #[test]
    fn a_trie_opened_with_buckets_below_the_chunk_depth_matches_the_one_in_memory() {
        // The node's case: buckets (16 there, 12 here) below the chunks the builder reads (8),
        // with enough entries (20,000: about 5 a bucket) that buckets form everywhere.
        let changes: Vec<Change> = (0..20_000).map(|i| (k(i), Some(v(i % 7)))).collect();
        let mut mem = Trie::new();
        mem.update(changes.clone(), &NoLeaves).unwrap();
        let src = source_of(&changes);
        let mut opened = Trie::open(&src, 12).unwrap();
        assert_eq!(opened.root(), mem.root());
        assert!(opened.memory_nodes() < 1 << 13, "{} nodes above depth 12", opened.memory_nodes());
        for key in (0..20_500).step_by(97) {
            assert_eq!(opened.prove(&k(key), &src).unwrap(), mem.prove(&k(key), &NoLeaves).unwrap(), "key {key}");
        }
        let more: Vec<Change> = (19_900..20_100).map(|i| (k(i), (i % 2 == 0).then(|| v(i)))).collect();
        mem.update(more.clone(), &NoLeaves).unwrap();
        opened.update(more, &src).unwrap();
        assert_eq!(opened.root(), mem.root());
    }

    #[test]
    fn keys_ground_to_share_a_bucket_split_it_instead_of_growing_it() {
        // 1,000 keys sharing their first 16 bits (as an attacker grinding account ids would
        // make them): no bucket holds more than MAX_BUCKET_LEAVES, whatever the depth.
        let ground = |i: u64| {
            let mut h = k(i);
            h.0[0] = 0xab;
            h.0[1] = 0xcd;
            h
        };
        let changes: Vec<Change> =
            (0..1_000).map(|i| (ground(i), Some(v(i)))).chain((0..500).map(|i| (k(i), Some(v(i))))).collect();
        let mut mem = Trie::new();
        mem.update(changes.clone(), &NoLeaves).unwrap();
        let mut src = source_of(&changes);
        let mut t = Trie::open(&src, 16).unwrap();
        assert_eq!(t.root(), mem.root());
        assert_eq!(compacted(&t.root, 0, 16), Ok(()));
        for i in (0..1_000).step_by(37) {
            assert_eq!(t.prove(&ground(i), &src).unwrap(), mem.prove(&ground(i), &NoLeaves).unwrap());
        }
        let more: Vec<Change> = (1_000..1_200).map(|i| (ground(i), Some(v(i)))).collect();
        t.update(more.clone(), &src).unwrap();
        mem.update(more.clone(), &NoLeaves).unwrap();
        src.apply(&more);
        t.compact(16);
        assert_eq!(t.root(), mem.root());
        assert_eq!(compacted(&t.root, 0, 16), Ok(()));
    }

    #[test]
    fn buckets_made_when_the_state_was_smaller_are_split_once_they_change() {
        // 120 entries bucketed at depth 2 (about 30 a bucket).
        let changes: Vec<Change> = (0..120).map(|i| (k(i), Some(v(i)))).collect();
        let mut src = source_of(&changes);
        let mut t = Trie::open(&src, 2).unwrap();
        assert_eq!(compacted(&t.root, 0, 2), Ok(()));
        // The state grew and the store now buckets at depth 4: one change in each of the four
        // buckets, then the commit's compaction.
        let quarter = |h: &Hash| h.0[0] >> 6;
        let touched: Vec<Change> = (0..4u8)
            .map(|q| (0..).find(|i| quarter(&k(*i)) == q).unwrap())
            .map(|i| (k(i), Some(v(i + 1_000))))
            .collect();
        t.update(touched.clone(), &src).unwrap();
        src.apply(&touched);
        t.compact(4);
        assert_eq!(compacted(&t.root, 0, 4), Ok(()), "every bucket is now at depth 4 or below");
        assert_eq!(t.memory_nodes(), Trie::open(&src, 4).unwrap().memory_nodes(), "as a reopen buckets it");
        let mut mem = Trie::new();
        mem.update(changes.into_iter().chain(touched), &NoLeaves).unwrap();
        assert_eq!(t.root(), mem.root());
        for i in (0..120).step_by(7) {
            assert_eq!(t.prove(&k(i), &src).unwrap(), mem.prove(&k(i), &NoLeaves).unwrap());
        }
    }

    #[test]
    fn an_update_refuses_a_bucket_whose_untouched_leaves_changed_behind_it() {
        let changes: Vec<Change> = (0..64).map(|i| (k(i), Some(v(i)))).collect();
        let mut src = source_of(&changes);
        let mut t = Trie::open(&src, 2).unwrap();
        let root = t.root();
        // Another key of k(5)'s bucket (same first two bits).
        let other = (0..64).find(|i| *i != 5 && k(*i).0[0] >> 6 == k(5).0[0] >> 6).unwrap();
        for tamper in [Some(v(99)), None] {
            let mut lying = src.clone();
            match tamper {
                Some(x) => lying.0.insert(k(5), x),
                None => lying.0.remove(&k(5)),
            };
            let err = t.clone().update([(k(other), Some(v(1_000)))], &lying).unwrap_err();
            assert!(matches!(err, TrieError::Mismatch { depth: 2, .. }), "{err}");
        }
        // An entry the trie never held, added to the bucket behind its back.
        let stranger = (1_000..).map(k).find(|h| h.0[0] >> 6 == k(5).0[0] >> 6).unwrap();
        src.0.insert(stranger, v(1));
        assert!(matches!(t.update([(k(other), None)], &src), Err(TrieError::Mismatch { .. })));
        assert_eq!(t.root(), root, "a refused update changes nothing");
    }

    #[test]
    fn proofs_refuse_a_leaf_off_the_path_and_overlong_paths() {
        let mut t = Trie::new();
        t.update((0..8).map(|i| (k(i), Some(v(i)))), &NoLeaves).unwrap();
        let root = t.root();
        let mut p = t.prove(&k(3), &NoLeaves).unwrap();
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
        t.update([(a, Some(v(1))), (b, Some(v(2))), (c, Some(v(3)))], &NoLeaves).unwrap();
        let root = t.root();
        for (k, want) in [(a, v(1)), (b, v(2)), (c, v(3))] {
            let p = t.prove(&k, &NoLeaves).unwrap();
            assert_eq!(p.verify(&root, &k), Ok(Proven::Present(want)));
        }
        assert_eq!(t.prove(&a, &NoLeaves).unwrap().siblings.len(), KEY_BITS, "a and b part at the last bit");
        // The same, kept as a bucket at depth 8 and read back from a source.
        let src = source_of(&[(a, Some(v(1))), (b, Some(v(2))), (c, Some(v(3)))]);
        let opened = Trie::open(&src, 8).unwrap();
        assert_eq!(opened.root(), root);
        assert_eq!(opened.prove(&a, &src).unwrap(), t.prove(&a, &NoLeaves).unwrap());
        // Tampered paths: the end swapped for an empty subtree, a sibling flipped, one dropped.
        let p = t.prove(&a, &NoLeaves).unwrap();
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
        t.update([(b, None)], &NoLeaves).unwrap();
        assert_eq!(t.prove(&a, &NoLeaves).unwrap().siblings.len(), 1);
        let mut fresh = Trie::new();
        fresh.update([(a, Some(v(1))), (c, Some(v(3)))], &NoLeaves).unwrap();
        assert_eq!(t.root(), fresh.root());
        let mut opened = opened;
        opened.update([(b, None)], &src).unwrap();
        assert_eq!(opened.root(), fresh.root(), "a bucket that shrinks to one entry becomes its leaf");
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
                t.update(batch.iter().map(|(key, val)| (k(*key), val.map(v))), &NoLeaves).unwrap();
                for (key, val) in batch {
                    match val { Some(x) => { model.insert(*key, *x); } None => { model.remove(key); } }
                }
                prop_assert_eq!(t.root(), from_scratch(&model));
            }
            let root = t.root();
            for key in 0u64..64 {
                let proof = t.prove(&k(key), &NoLeaves).unwrap();
                let want = model.get(&key).map_or(Proven::Absent, |x| Proven::Present(v(*x)));
                prop_assert_eq!(proof.verify(&root, &k(key)), Ok(want));
                prop_assert_eq!(t.get(&k(key), &NoLeaves).unwrap(), model.get(&key).map(|x| v(*x)));
                // The same proof does not hold for another value or another root.
                if let Some(x) = model.get(&key) {
                    let mut forged = proof.clone();
                    forged.end = ProofEnd::Leaf { key: k(key), value: v(x + 1) };
                    prop_assert!(forged.verify(&root, &k(key)).is_err());
                }
                prop_assert!(proof.verify(&k(999), &k(key)).is_err());
            }
        }

        /// A bucket's update hashes the old and the new bucket in one pass: both hashes are the
        /// ones computed apart, and the merge is the model's set after the changes.
        #[test]
        fn one_pass_over_a_bucket_gives_its_old_and_new_hashes(
            old in prop::collection::btree_map(0u64..200, 0u64..4, 0..40),
            ops in prop::collection::vec((0u64..200, prop::option::of(0u64..4)), 0..20),
        ) {
            let sorted = |m: &BTreeMap<u64, u64>| {
                let mut l: Vec<Leaf> = m.iter().map(|(a, b)| (k(*a), v(*b))).collect();
                l.sort();
                l
            };
            let mut by_hash: BTreeMap<Hash, Option<Hash>> = BTreeMap::new();
            let mut model = old.clone();
            for (key, val) in &ops {
                by_hash.insert(k(*key), val.map(v));
                match val { Some(x) => { model.insert(*key, *x); } None => { model.remove(key); } }
            }
            let ops: Vec<Change> = by_hash.into_iter().collect();
            let (before, after) = (sorted(&old), sorted(&model));
            let hashed: Vec<Hashed> = before.iter().copied().map(Hashed::of).collect();
            let merged = merge(&hashed, &ops);
            prop_assert_eq!(plain(&merged), after.clone());
            prop_assert!(merged.iter().all(|l| l.hash == leaf_hash(&l.key, &l.value)));
            prop_assert_eq!(roots_of_both(0, &hashed, &merged), (root_of(0, &before), root_of(0, &after)));
        }

        /// Buckets changed several times between commits (emptied, down to one entry, past
        /// [`MAX_BUCKET_LEAVES`]) and a bucket depth that grows between commits, as the store's
        /// does while the state grows: the trie reads, proves and updates as the one in memory,
        /// and what it keeps after each compaction is buckets only, none above where it started.
        #[test]
        fn buckets_changed_between_commits_and_as_the_depth_grows_match_memory(
            first in prop::collection::vec((0u64..300, 0u64..4), 1..200),
            rounds in prop::collection::vec(
                (prop::collection::vec(prop::collection::vec((0u64..300, prop::option::of(0u64..4)), 0..30), 1..4), 0usize..2),
                1..4,
            ),
            start in 0usize..5,
        ) {
            fn bucket_depth_on(s: &Sub, path: &Hash, depth: usize) -> Option<usize> {
                match s {
                    Sub::Bucket(_) => Some(depth),
                    Sub::Branch(b) => bucket_depth_on(if bit(path, depth) { &b.right } else { &b.left }, path, depth + 1),
                    _ => None,
                }
            }
            fn settled(s: &Sub, depth: usize, floor: usize) -> Result<(), String> {
                match s {
                    Sub::Leaves(b) => Err(format!("{} leaves held at depth {depth}", b.leaves.len())),
                    Sub::Bucket(b) if depth < floor || b.leaves < 2 || b.leaves as usize > MAX_BUCKET_LEAVES => {
                        Err(format!("a bucket of {} entries at depth {depth}", b.leaves))
                    }
                    Sub::Branch(b) => settled(&b.left, depth + 1, floor).and_then(|()| settled(&b.right, depth + 1, floor)),
                    _ => Ok(()),
                }
            }
            let firsts: Vec<Change> = first.iter().map(|(a, b)| (k(*a), Some(v(*b)))).collect();
            let mut mem = Trie::new();
            mem.update(firsts.clone(), &NoLeaves).unwrap();
            let mut src = source_of(&firsts);
            let mut disk = Trie::open(&src, start).unwrap();
            let mut depth = start;
            let mut model: BTreeMap<u64, u64> = first.iter().map(|(a, b)| (*a, *b)).collect();
            for (batches, grow) in &rounds {
                // Keys whose entry this round changed (an update that changes nothing leaves its
                // bucket as it was).
                let mut changed = Vec::new();
                for batch in batches {
                    let before = model.clone();
                    for (key, val) in batch {
                        match val { Some(x) => { model.insert(*key, *x); } None => { model.remove(key); } }
                    }
                    changed.extend(batch.iter().map(|(key, _)| *key).filter(|key| model.get(key) != before.get(key)));
                }
                for batch in batches {
                    let changes: Vec<Change> = batch.iter().map(|(a, b)| (k(*a), b.map(v))).collect();
                    mem.update(changes.clone(), &NoLeaves).unwrap();
                    // The source still holds the last commit: changed buckets are held as leaves.
                    disk.update(changes, &src).unwrap();
                    prop_assert_eq!(disk.root(), mem.root());
                }
                for key in (1u64..300).step_by(11) {
                    prop_assert_eq!(disk.prove(&k(key), &src).unwrap(), mem.prove(&k(key), &NoLeaves).unwrap());
                }
                for batch in batches {
                    src.apply(&batch.iter().map(|(a, b)| (k(*a), b.map(v))).collect::<Vec<_>>());
                }
                depth += grow;
                disk.compact(depth);
                prop_assert_eq!(settled(&disk.root, 0, start), Ok(()));
                // A bucket a change went through was rebuilt at the depth of this compaction.
                for key in &changed {
                    let at = bucket_depth_on(&disk.root, &k(*key), 0);
                    prop_assert!(at.is_none_or(|d| d >= depth), "key {key}'s bucket at depth {at:?}, above {depth}");
                }
                prop_assert!(compact(&disk.root, 0, depth, &[]).is_none(), "nothing fresh left to walk");
                prop_assert_eq!(disk.root(), mem.root());
                for key in (4u64..300).step_by(11) {
                    prop_assert_eq!(disk.prove(&k(key), &src).unwrap(), mem.prove(&k(key), &NoLeaves).unwrap());
                }
            }
        }

        /// A trie opened from a source, kept as buckets below some depth, reads, proves and
        /// updates as the one held whole in memory, through commits (the source catching up and
        /// the trie compacted again), and holds only its top levels once compacted.
        #[test]
        fn a_trie_kept_as_buckets_behaves_as_the_one_in_memory(
            first in prop::collection::vec((0u64..300, 0u64..4), 1..200),
            rounds in prop::collection::vec(prop::collection::vec((0u64..300, prop::option::of(0u64..4)), 0..40), 1..4),
            depth in 0usize..7,
        ) {
            let first: Vec<Change> = first.iter().map(|(a, b)| (k(*a), Some(v(*b)))).collect();
            let mut mem = Trie::new();
            mem.update(first.clone(), &NoLeaves).unwrap();
            let mut src = source_of(&first);
            let mut disk = Trie::open(&src, depth).unwrap();
            prop_assert_eq!(disk.root(), mem.root());
            prop_assert_eq!(compacted(&disk.root, 0, depth), Ok(()));
            for round in &rounds {
                let changes: Vec<Change> = round.iter().map(|(a, b)| (k(*a), b.map(v))).collect();
                mem.update(changes.clone(), &NoLeaves).unwrap();
                // Updated before the source holds the change (a block sealed before its commit).
                disk.update(changes.clone(), &src).unwrap();
                prop_assert_eq!(disk.root(), mem.root());
                for key in (0u64..300).step_by(7) {
                    prop_assert_eq!(disk.prove(&k(key), &src).unwrap(), mem.prove(&k(key), &NoLeaves).unwrap());
                }
                // Committed: the source catches up and the trie lets go of what it holds.
                src.apply(&changes);
                disk.compact(depth);
                prop_assert_eq!(compacted(&disk.root, 0, depth), Ok(()));
                prop_assert_eq!(disk.memory_nodes(), Trie::open(&src, depth).unwrap().memory_nodes(), "compaction gives what an open does");
                prop_assert!(compact(&disk.root, 0, depth, &[]).is_none(), "a compacted trie has nothing fresh left to walk");
                prop_assert_eq!(disk.root(), mem.root());
                for key in (3u64..300).step_by(7) {
                    prop_assert_eq!(disk.prove(&k(key), &src).unwrap(), mem.prove(&k(key), &NoLeaves).unwrap());
                }
                prop_assert_eq!(Trie::open(&src, depth).unwrap().root(), mem.root(), "a reopen agrees");
            }
        }

        /// A trie a block ahead of its source (a child executed before its parent was committed)
        /// lets go of everything but the buckets its own changes are in, stays correct, and
        /// holds only the top once it is committed too.
        #[test]
        fn a_trie_ahead_of_its_source_keeps_only_its_own_changes(
            first in prop::collection::vec((0u64..300, 0u64..4), 1..200),
            parent in prop::collection::vec((0u64..300, prop::option::of(0u64..4)), 1..60),
            child in prop::collection::vec((0u64..300, prop::option::of(0u64..4)), 1..8),
            depth in 1usize..6,
        ) {
            let first: Vec<Change> = first.iter().map(|(a, b)| (k(*a), Some(v(*b)))).collect();
            let parent: Vec<Change> = parent.iter().map(|(a, b)| (k(*a), b.map(v))).collect();
            let child: Vec<Change> = child.iter().map(|(a, b)| (k(*a), b.map(v))).collect();
            let mut src = source_of(&first);
            let mut t = Trie::open(&src, depth).unwrap();
            t.update(parent.clone(), &src).unwrap();
            let mut ahead = t.clone();
            ahead.update(child.clone(), &src).unwrap();
            // The parent is committed; the child, executed before that, is not.
            src.apply(&parent);
            ahead.compact_except(depth, child.iter().map(|c| c.0).collect());
            let mut mem = Trie::new();
            mem.update(first.iter().chain(&parent).chain(&child).copied(), &NoLeaves).unwrap();
            prop_assert_eq!(ahead.root(), mem.root());
            for key in 0u64..300 {
                prop_assert_eq!(ahead.prove(&k(key), &src).unwrap(), mem.prove(&k(key), &NoLeaves).unwrap());
            }
            // What may stay in memory: what an open holds, and the buckets the child changed, as
            // the child has them.
            let mut after_child = src.clone();
            after_child.apply(&child);
            let top = Trie::open(&after_child, depth).unwrap().memory_nodes();
            let mut ranges: Vec<(Hash, Hash)> = child.iter().map(|c| prefix_range(&c.0, depth)).collect();
            ranges.sort();
            ranges.dedup();
            let kept: usize = ranges
                .iter()
                .map(|(lo, hi)| Trie { root: build(depth, &after_child.leaves(lo, hi).unwrap()) }.memory_nodes())
                .sum();
            prop_assert!(ahead.memory_nodes() <= top + kept, "only the child's buckets stay: {} nodes, {} kept", ahead.memory_nodes(), kept);
            // Committed in turn: nothing below the top is left.
            src.apply(&child);
            ahead.compact(depth);
            prop_assert_eq!(ahead.memory_nodes(), top);
            prop_assert_eq!(compacted(&ahead.root, 0, depth), Ok(()));
            prop_assert!(compact(&ahead.root, 0, depth, &[]).is_none());
        }
    }
}
