//! Where committed state lives: the boundary between the sans-IO state machine and a disk.
//!
//! A [`StateStore`] holds the state as of one committed height — every entry's key and value
//! bytes, kept in the order of the key's trie hash ([`crate::trie::key_hash`]) — and the height and
//! root they belong to. Kept in that order, the entries are also the trie's leaves in the trie's
//! own order: the leaves of one bucket (see [`crate::trie`]) sit together and come back in one
//! range read, and an entry is written once, not once as an entry and once as a leaf.
//! [`crate::State`] reads through it (entries it did not change since the last commit, the leaves
//! of the buckets on changed paths) and hands it one [`Commit`] per finalized block — the entries
//! written, the new height and root — which the store applies atomically.
//! A commit is *durable* or not: after a crash a store reopens at its last durable commit, which
//! the node then replays forward from its block log, so commits need not wait for a disk flush
//! each block.
//!
//! Two implementations pass one conformance suite ([`conformance`]): [`MemoryStore`] here (tests
//! and the simulator, where [`MemoryStore::crash`] drops every commit not yet durable) and the
//! node's disk store.

use crate::hash::Hash;
use crate::trie::{self, Leaf, LeafSource, TrieError};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

/// The height and state root a store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Height of the block whose state this is (0: the genesis).
    pub height: u64,
    /// Its state root.
    pub root: Hash,
}

/// One block's writes: applied all at once, or not at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commit {
    /// The height these writes bring the store to.
    pub height: u64,
    /// The state root after them.
    pub root: Hash,
    /// Entries by key: the new value bytes, or `None` when removed.
    pub entries: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The block's transactions, by hash, with what the node records about each (opaque here):
    /// kept beside the state so the two are always at the same height.
    pub txs: Vec<(Hash, Vec<u8>)>,
    /// Index rows by key (`None`: removed): derived from the entries by [`index_rows`], kept in
    /// key order beside them so listings read a page, not the state. Not part of the state root:
    /// anyone can derive them again from the entries.
    pub index: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// Where an [`StateStore::index_scan`] of `prefix` after `after` starts in key order: just past
/// `after`, or at `prefix` when `after` sorts before it.
pub fn index_start<'a>(prefix: &'a [u8], after: Option<&'a [u8]>) -> std::ops::Bound<&'a [u8]> {
    match after {
        Some(a) if a >= prefix => std::ops::Bound::Excluded(a),
        _ => std::ops::Bound::Included(prefix),
    }
}

/// The index rows a state entry contributes (see [`Commit::index`]): an object's name, holders
/// and suspect shards (see [`crate::storage`]); nothing for other entries.
pub fn index_rows(key: &[u8], value: &[u8]) -> Entries {
    crate::listing::index_rows(key, value)
}

/// Entries as key and value bytes, in key order.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// A store that could not read or write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The disk failed.
    #[error("state store I/O failed: {0}")]
    Io(String),
    /// What the store holds does not decode or does not fit together.
    #[error("state store is corrupt: {0} (restore the data directory or resync the node)")]
    Corrupt(String),
    /// A commit for a height not above the committed one.
    #[error("state commit out of order: the store is at height {at}, the commit is for {got}")]
    OutOfOrder {
        /// The committed height.
        at: u64,
        /// The commit's height.
        got: u64,
    },
}

impl From<TrieError> for StoreError {
    fn from(e: TrieError) -> Self {
        match e {
            TrieError::Mismatch { .. } | TrieError::Corrupt(_) => StoreError::Corrupt(e.to_string()),
            TrieError::Source(s) => StoreError::Io(s),
        }
    }
}

/// Committed state, read by [`crate::State`] and written one block at a time.
pub trait StateStore: LeafSource + Send + Sync + fmt::Debug {
    /// The depth below which a state over this store keeps its trie as buckets whose leaves it
    /// reads back from the store (see [`crate::trie`]).
    fn bucket_depth(&self) -> usize {
        trie::BUCKET_DEPTH
    }
    /// The height and root held, or `None` for a store nothing was committed to.
    fn committed(&self) -> Result<Option<Committed>, StoreError>;
    /// The committed value bytes of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` committed entries whose keys start with `prefix`, in key-hash order, after the
    /// entry of key `after` (its hash: the key itself need not be stored). Entries are not kept
    /// by prefix, so this reads every entry from `after` on until it has `limit`: O(state) for a
    /// rare prefix, for opening and inspection only.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Entries, StoreError>;
    /// Applies `commit` atomically; with `durable` it survives a crash once this returns,
    /// without it the store may reopen at the last durable commit. The commit's height must be
    /// above the committed height (any height on an empty store); it may cover several blocks.
    fn commit(&self, commit: &Commit, durable: bool) -> Result<(), StoreError>;
    /// Makes every commit so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    /// What a commit recorded for transaction `hash`.
    fn tx(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError>;
    /// Forgets everything, durably: the store is empty again (to rebuild it from the blocks).
    fn clear(&self) -> Result<(), StoreError>;
    /// A consistent view of every committed entry at the height it was taken, read page by page
    /// while commits go on (a joining node's copy of the state).
    fn snapshot(&self) -> Result<Box<dyn StateSnapshot>, StoreError>;
    /// Writes `entries` into a store nothing was committed to (a join: the entries of a
    /// snapshot, a page at a time); the [`StateStore::commit`] that follows gives them their
    /// height and root. Refused once a height is committed.
    /// Its index rows ([`index_rows`]) are written with them.
    fn import(&self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError>;
    /// Up to `limit` committed index rows ([`Commit::index`]) whose keys start with `prefix`, in
    /// key order, after key `after` (which need not be stored): O(page).
    fn index_scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Entries, StoreError>;
}

/// Every entry of one committed state, as [`StateStore::snapshot`] took it.
pub trait StateSnapshot: Send {
    /// The height and root of the state it shows (`None`: nothing was committed).
    fn committed(&self) -> Option<Committed>;
    /// Up to `limit` entries after the entry of key `after`, in key-hash order.
    fn entries(&self, after: Option<&[u8]>, limit: usize) -> Result<Entries, StoreError>;
}

/// Refuses an import into a store that holds a committed state.
pub fn check_import(committed: Option<Committed>) -> Result<(), StoreError> {
    match committed {
        Some(c) => Err(StoreError::Io(format!(
            "cannot import entries into a state store committed at height {}: clear it first",
            c.height
        ))),
        None => Ok(()),
    }
}

/// Checks that `commit` comes after what `store` holds (a commit may cover several blocks).
pub fn check_order(committed: Option<Committed>, commit: &Commit) -> Result<(), StoreError> {
    match committed {
        Some(c) if commit.height <= c.height => Err(StoreError::OutOfOrder { at: c.height, got: commit.height }),
        _ => Ok(()),
    }
}

/// One version of everything a store holds.
#[derive(Clone, Debug, Default)]
struct Contents {
    committed: Option<Committed>,
    /// Key hash → key and value.
    entries: BTreeMap<Hash, (Vec<u8>, Vec<u8>)>,
    txs: HashMap<Hash, Vec<u8>>,
    /// Index rows, by key.
    index: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Contents {
    fn apply(&mut self, c: &Pending) {
        let c = match c {
            Pending::Commit(c) => c,
            Pending::Import(entries) => {
                for (k, v) in entries {
                    self.write(k, Some(v));
                    self.index.extend(index_rows(k, v));
                }
                return;
            }
        };
        for (k, v) in &c.entries {
            self.write(k, v.as_ref());
        }
        for (k, v) in &c.index {
            match v {
                Some(v) => self.index.insert(k.clone(), v.clone()),
                None => self.index.remove(k),
            };
        }
        self.txs.extend(c.txs.iter().cloned());
        self.committed = Some(Committed { height: c.height, root: c.root });
    }
}

impl Contents {
    fn write(&mut self, k: &[u8], v: Option<&Vec<u8>>) {
        match v {
            Some(v) => self.entries.insert(trie::key_hash(k), (k.to_vec(), v.clone())),
            None => self.entries.remove(&trie::key_hash(k)),
        };
    }
}

/// A store in memory: for tests and the simulator. Clones share one store.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryInner>>,
    bucket_depth: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self { inner: Arc::default(), bucket_depth: trie::BUCKET_DEPTH }
    }
}

#[derive(Debug, Default)]
struct MemoryInner {
    /// What reads see.
    current: Contents,
    /// What survives [`MemoryStore::crash`].
    durable: Contents,
    /// Commits (and imports) since the last durable one, in order.
    since_durable: Vec<Pending>,
}

/// A write not yet durable.
#[derive(Debug)]
enum Pending {
    Commit(Commit),
    Import(Entries),
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A power cut: every commit not yet durable is lost.
    pub fn crash(&self) {
        let mut g = self.lock();
        g.current = g.durable.clone();
        g.since_durable.clear();
    }

    /// A store whose states keep their tries as buckets below `depth` (the default is
    /// [`trie::BUCKET_DEPTH`]; tests use a few levels, so small states have buckets too).
    pub fn with_bucket_depth(depth: usize) -> Self {
        Self { bucket_depth: depth.min(trie::KEY_BITS), ..Self::default() }
    }
}

impl LeafSource for MemoryStore {
    fn leaves(&self, lo: &Hash, hi: &Hash) -> Result<Vec<Leaf>, TrieError> {
        let g = self.lock();
        Ok(g.current.entries.range(*lo..=*hi).map(|(h, (_, v))| (*h, trie::value_hash(v))).collect())
    }
}

impl StateStore for MemoryStore {
    fn bucket_depth(&self) -> usize {
        self.bucket_depth
    }

    fn committed(&self) -> Result<Option<Committed>, StoreError> {
        Ok(self.lock().current.committed)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().current.entries.get(&trie::key_hash(key)).map(|(_, v)| v.clone()))
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Entries, StoreError> {
        Ok(entries_after(&self.lock().current.entries, prefix, after, limit))
    }

    fn commit(&self, commit: &Commit, durable: bool) -> Result<(), StoreError> {
        let mut g = self.lock();
        check_order(g.current.committed, commit)?;
        let pending = Pending::Commit(commit.clone());
        g.current.apply(&pending);
        g.since_durable.push(pending);
        if durable {
            drop(g);
            return self.flush();
        }
        Ok(())
    }

    fn tx(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().current.txs.get(hash).cloned())
    }

    fn clear(&self) -> Result<(), StoreError> {
        *self.lock() = MemoryInner::default();
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        let mut g = self.lock();
        let pending = std::mem::take(&mut g.since_durable);
        for c in &pending {
            g.durable.apply(c);
        }
        Ok(())
    }

    fn snapshot(&self) -> Result<Box<dyn StateSnapshot>, StoreError> {
        let g = self.lock();
        Ok(Box::new(MemorySnapshot { committed: g.current.committed, entries: g.current.entries.clone() }))
    }

    fn import(&self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        let mut g = self.lock();
        check_import(g.current.committed)?;
        // Durable with the next durable commit or flush, like a commit.
        let pending = Pending::Import(entries.to_vec());
        g.current.apply(&pending);
        g.since_durable.push(pending);
        Ok(())
    }

    fn index_scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Entries, StoreError> {
        let g = self.lock();
        Ok(g.current
            .index
            .range::<[u8], _>((index_start(prefix, after), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// Up to `limit` of `entries` whose keys start with `prefix`, after the entry of key `after`.
fn entries_after(
    entries: &BTreeMap<Hash, (Vec<u8>, Vec<u8>)>,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
) -> Entries {
    let start = match after {
        Some(a) => std::ops::Bound::Excluded(trie::key_hash(a)),
        None => std::ops::Bound::Unbounded,
    };
    entries
        .range((start, std::ops::Bound::Unbounded))
        .filter(|(_, (k, _))| k.starts_with(prefix))
        .take(limit)
        .map(|(_, kv)| kv.clone())
        .collect()
}

/// A copy of a [`MemoryStore`]'s entries.
struct MemorySnapshot {
    committed: Option<Committed>,
    entries: BTreeMap<Hash, (Vec<u8>, Vec<u8>)>,
}

impl StateSnapshot for MemorySnapshot {
    fn committed(&self) -> Option<Committed> {
        self.committed
    }

    fn entries(&self, after: Option<&[u8]>, limit: usize) -> Result<Entries, StoreError> {
        Ok(entries_after(&self.entries, b"", after, limit))
    }
}

/// The suite every [`StateStore`] passes. `fresh` gives an empty store; `reopen` gives the same
/// store as it would be after a crash (for a disk store: closed and opened again; writes not yet
/// durable may be gone).
pub mod conformance {
    use super::*;
    use crate::trie::{Trie, key_hash, value_hash};

    /// The trie of the suite's states is kept as buckets below this depth, so its updates and
    /// proofs read leaves back from the store under test.
    const DEPTH: usize = 1;

    fn commit_of(trie: &mut Trie, height: u64, writes: &[(&str, Option<&str>)], src: &dyn LeafSource) -> Commit {
        trie.update(writes.iter().map(|(k, v)| (key_hash(k.as_bytes()), v.map(|v| value_hash(v.as_bytes())))), src)
            .expect("the store holds every leaf the trie needs");
        Commit {
            height,
            root: trie.root(),
            entries: writes.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()))).collect(),
            ..Commit::default()
        }
    }

    /// The store's leaves: every committed entry as `(key hash, value hash)`, in key-hash order.
    fn all_leaves(s: &dyn StateStore) -> Vec<Leaf> {
        s.leaves(&Hash::ZERO, &Hash([0xff; 32])).unwrap()
    }

    fn by_key_hash(entries: &[(&str, &str)]) -> Entries {
        let mut out: Entries = entries.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
        out.sort_by_key(|(k, _)| key_hash(k));
        out
    }

    fn leaves_of(entries: &[(&str, &str)]) -> Vec<Leaf> {
        let mut out: Vec<Leaf> =
            entries.iter().map(|(k, v)| (key_hash(k.as_bytes()), value_hash(v.as_bytes()))).collect();
        out.sort();
        out
    }

    /// Runs the suite; panics (as a test does) on the first failure.
    pub fn run<S: StateStore>(fresh: impl Fn() -> S, reopen: impl Fn(S) -> S) {
        let s = fresh();
        assert_eq!(s.committed().unwrap(), None, "a fresh store holds nothing");
        assert_eq!(s.get(b"a").unwrap(), None);
        assert!(all_leaves(&s).is_empty());

        // Height 0, then 1: entries, scans and leaves.
        let mut trie = Trie::new();
        let mut c0 =
            commit_of(&mut trie, 0, &[("account/1", Some("x")), ("account/2", Some("y")), ("node/1", Some("n"))], &s);
        c0.txs = vec![(Hash([5; 32]), b"where".to_vec())];
        s.commit(&c0, true).unwrap();
        trie.compact(DEPTH);
        assert_eq!(s.tx(&Hash([5; 32])).unwrap().as_deref(), Some(&b"where"[..]));
        assert_eq!(s.tx(&Hash([6; 32])).unwrap(), None);
        assert_eq!(s.committed().unwrap(), Some(Committed { height: 0, root: c0.root }));
        assert_eq!(s.get(b"account/2").unwrap().as_deref(), Some(&b"y"[..]));
        let scan = s.scan(b"account/", None, 10).unwrap();
        assert_eq!(scan, by_key_hash(&[("account/1", "x"), ("account/2", "y")]), "in key-hash order");
        assert_eq!(s.scan(b"account/", Some(&scan[0].0), 10).unwrap(), scan[1..], "after excludes the key itself");
        assert_eq!(s.scan(b"account/", None, 1).unwrap(), scan[..1], "limit holds");
        assert_eq!(s.scan(b"", None, 10).unwrap().len(), 3);
        assert!(s.scan(b"lease/", None, 10).unwrap().is_empty());
        let leaves = leaves_of(&[("account/1", "x"), ("account/2", "y"), ("node/1", "n")]);
        assert_eq!(all_leaves(&s), leaves, "every entry is a leaf, in key-hash order");
        // A range holds its ends.
        assert_eq!(s.leaves(&leaves[1].0, &leaves[1].0).unwrap(), [leaves[1]]);
        assert_eq!(s.leaves(&leaves[0].0, &leaves[1].0).unwrap(), leaves[..2]);
        assert_eq!(Trie::open(&s, DEPTH).unwrap().root(), c0.root);

        let c1 = commit_of(&mut trie, 1, &[("account/1", None), ("account/3", Some("z"))], &s);
        s.commit(&c1, false).unwrap();
        trie.compact(DEPTH);
        assert_eq!(s.get(b"account/1").unwrap(), None);
        assert_eq!(s.get(b"account/3").unwrap().as_deref(), Some(&b"z"[..]));
        assert_eq!(all_leaves(&s), leaves_of(&[("account/2", "y"), ("account/3", "z"), ("node/1", "n")]));
        // The trie reads back through the store: every key proves against the committed root.
        for (k, want) in [("account/1", None), ("account/2", Some("y")), ("account/3", Some("z"))] {
            assert_eq!(trie.get(&key_hash(k.as_bytes()), &s).unwrap(), want.map(|v| value_hash(v.as_bytes())));
        }
        // Out of order: refused, nothing changed.
        let stale = Commit { height: 1, entries: vec![(b"account/2".to_vec(), Some(b"late".to_vec()))], ..c1.clone() };
        let err = s.commit(&stale, true).unwrap_err();
        assert_eq!(err, StoreError::OutOfOrder { at: 1, got: 1 });
        assert_eq!(s.get(b"account/2").unwrap().as_deref(), Some(&b"y"[..]), "a refused commit writes nothing");
        assert_eq!(s.committed().unwrap().map(|c| c.height), Some(1));

        // A crash keeps at least the durable commit, and whatever it keeps is whole.
        let s = reopen(s);
        let at = s.committed().unwrap().expect("the durable commit survives");
        assert!(at.height == 0 || at.height == 1, "reopened at {at:?}");
        let (root, one, three) = if at.height == 0 { (c0.root, Some("x"), None) } else { (c1.root, None, Some("z")) };
        assert_eq!(at.root, root);
        assert_eq!(s.get(b"account/1").unwrap().as_deref(), one.map(str::as_bytes));
        assert_eq!(s.get(b"account/3").unwrap().as_deref(), three.map(str::as_bytes));
        let reopened = Trie::open(&s, DEPTH).unwrap();
        assert_eq!(reopened.root(), at.root, "the leaves are the entries of the state reopened");
        for (k, v) in [("account/1", one), ("account/2", Some("y")), ("account/3", three)] {
            assert_eq!(reopened.get(&key_hash(k.as_bytes()), &s).unwrap(), v.map(|v| value_hash(v.as_bytes())));
        }

        // Durable commits survive a reopen whole.
        let mut trie = reopened;
        let c = commit_of(&mut trie, at.height + 1, &[("account/9", Some("w"))], &s);
        s.commit(&c, true).unwrap();
        let s = reopen(s);
        assert_eq!(s.committed().unwrap(), Some(Committed { height: at.height + 1, root: c.root }));
        assert_eq!(s.get(b"account/9").unwrap().as_deref(), Some(&b"w"[..]));
        assert_eq!(s.tx(&Hash([5; 32])).unwrap().as_deref(), Some(&b"where"[..]), "the index survives");
        assert_eq!(Trie::open(&s, DEPTH).unwrap().root(), c.root);

        // A flush makes the commits before it durable.
        let mut trie = Trie::open(&s, DEPTH).unwrap();
        let c = commit_of(&mut trie, at.height + 2, &[("account/8", Some("v"))], &s);
        s.commit(&c, false).unwrap();
        s.flush().unwrap();
        let s = reopen(s);
        assert_eq!(s.committed().unwrap(), Some(Committed { height: at.height + 2, root: c.root }));
        assert_eq!(s.get(b"account/8").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(Trie::open(&s, DEPTH).unwrap().root(), c.root);

        // A snapshot is one committed state, whatever is committed after it was taken.
        let snap = s.snapshot().unwrap();
        assert_eq!(snap.committed(), s.committed().unwrap());
        let before = snap.entries(None, 100).unwrap();
        assert!(before.windows(2).all(|w| key_hash(&w[0].0) < key_hash(&w[1].0)), "in key-hash order");
        assert_eq!(before, s.scan(b"", None, 100).unwrap());
        let mut later = Trie::open(&s, DEPTH).unwrap();
        s.commit(&commit_of(&mut later, at.height + 3, &[("account/2", None), ("account/0", Some("new"))], &s), false)
            .unwrap();
        assert_eq!(snap.entries(None, 100).unwrap(), before, "later commits do not show in a snapshot");
        let paged: Vec<_> = {
            let mut out = Vec::new();
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = snap.entries(after.as_deref(), 2).unwrap();
                let Some(last) = page.last() else { break };
                after = Some(last.0.clone());
                out.extend(page);
            }
            out
        };
        assert_eq!(paged, before, "pages after the last key cover everything once");
        drop(snap);
        assert!(s.import(&[(b"x".to_vec(), b"y".to_vec())]).is_err(), "no import into a committed store");

        // Cleared, durably: nothing is left, and it takes a commit at any height again.
        s.clear().unwrap();
        let s = reopen(s);
        assert_eq!(s.committed().unwrap(), None);
        assert_eq!(s.get(b"account/8").unwrap(), None);
        assert_eq!(s.tx(&Hash([5; 32])).unwrap(), None);
        assert!(s.scan(b"", None, 10).unwrap().is_empty());
        assert!(all_leaves(&s).is_empty(), "no leaf outlives a clear");
        let mut trie = Trie::new();
        s.commit(&commit_of(&mut trie, 0, &[("chain", Some("c"))], &s), true).unwrap();
        assert_eq!(s.committed().unwrap().map(|c| c.height), Some(0));

        // An import (a join): pages of entries, then a commit that names their height and root.
        s.clear().unwrap();
        let pages: [&[(&str, &str)]; 2] = [&[("account/1", "a"), ("account/2", "b")], &[("node/7", "n")]];
        let mut trie = Trie::new();
        for page in pages {
            let entries: Vec<_> = page.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
            s.import(&entries).unwrap();
            trie.update(
                page.iter().map(|(k, v)| (key_hash(k.as_bytes()), Some(value_hash(v.as_bytes())))),
                &crate::trie::NoLeaves,
            )
            .unwrap();
        }
        assert_eq!(s.committed().unwrap(), None, "an import alone commits nothing");
        s.commit(&Commit { height: 500, root: trie.root(), ..Commit::default() }, true).unwrap();
        let s = reopen(s);
        assert_eq!(s.committed().unwrap(), Some(Committed { height: 500, root: trie.root() }));
        assert_eq!(s.scan(b"", None, 10).unwrap().len(), 3);
        assert_eq!(s.get(b"node/7").unwrap().as_deref(), Some(&b"n"[..]));
        assert_eq!(all_leaves(&s), leaves_of(&[("account/1", "a"), ("account/2", "b"), ("node/7", "n")]));
        assert_eq!(Trie::open(&s, DEPTH).unwrap().root(), trie.root(), "imported entries are leaves too");

        index(fresh(), &reopen);
    }

    /// The state entry (key and value) of an object `bucket/key` on two holders.
    pub fn example_object(bucket: &str, key: &str) -> (Vec<u8>, Vec<u8>) {
        let object = crate::storage::ObjectRecord {
            bucket: bucket.into(),
            key: key.into(),
            version: Hash([1; 32]),
            size: 1,
            segment_bytes: 4096,
            code: archipel_types::ErasureCode::new(1, 1).expect("1+1 is a code"),
            manifest_root: Hash([2; 32]),
            etag: "e".into(),
            holders: vec![archipel_types::NodeId([3; 32]), archipel_types::NodeId([4; 32])],
            shard_bytes: 20,
            created_height: 1,
            created_ms: 1,
            generation: 0,
            suspect: Vec::new(),
        };
        let entry_key = crate::StateKey::Object(crate::storage::object_id(bucket, key)).to_bytes();
        (entry_key, serde_json::to_vec(&object).expect("a record encodes"))
    }

    fn rows(s: &dyn StateStore, prefix: &str, after: Option<&str>, limit: usize) -> Vec<String> {
        let page = s.index_scan(prefix.as_bytes(), after.map(str::as_bytes), limit).unwrap();
        page.into_iter()
            .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(&k), String::from_utf8_lossy(&v)))
            .collect()
    }

    /// Index rows: written and removed with their commit, read in key order from any point,
    /// whole after a crash, gone after a clear, derived from imported objects.
    fn index<S: StateStore>(s: S, reopen: &impl Fn(S) -> S) {
        let mut c0 = Commit { height: 0, ..Commit::default() };
        c0.index = ["name/b/61", "name/b/62", "name/b/6263", "name/c/61", "holder/1/x"]
            .iter()
            .map(|k| (k.as_bytes().to_vec(), Some(k.as_bytes()[k.len() - 1..].to_vec())))
            .collect();
        s.commit(&c0, true).unwrap();
        assert_eq!(rows(&s, "name/b/", None, 10), ["name/b/61=1", "name/b/62=2", "name/b/6263=3"], "key order");
        assert_eq!(rows(&s, "name/b/", Some("name/b/61"), 10), ["name/b/62=2", "name/b/6263=3"], "after excludes");
        assert_eq!(rows(&s, "name/b/", Some("name/b/615"), 1), ["name/b/62=2"], "after need not be stored");
        assert_eq!(rows(&s, "name/b/62", Some("name/b/62g"), 10), Vec::<String>::new(), "past a group");
        assert_eq!(rows(&s, "name/b/", Some("a"), 10).len(), 3, "an `after` before the prefix starts at it");
        assert_eq!(rows(&s, "name/", None, 10).len(), 4);
        assert!(rows(&s, "name/d/", None, 10).is_empty());
        assert!(rows(&s, "name/b/", None, 0).is_empty());

        let c1 = Commit {
            height: 1,
            index: vec![(b"name/b/61".to_vec(), None), (b"name/b/60".to_vec(), Some(b"0".to_vec()))],
            ..Commit::default()
        };
        s.commit(&c1, false).unwrap();
        assert_eq!(rows(&s, "name/b/", None, 10), ["name/b/60=0", "name/b/62=2", "name/b/6263=3"]);
        let s = reopen(s);
        let at = s.committed().unwrap().expect("the durable commit survives").height;
        let first = if at == 0 { "name/b/61=1" } else { "name/b/60=0" };
        assert_eq!(rows(&s, "name/b/", None, 10), [first, "name/b/62=2", "name/b/6263=3"], "the index is its commit's");

        s.clear().unwrap();
        let s = reopen(s);
        assert!(rows(&s, "", None, 10).is_empty(), "no index row outlives a clear");

        // An import derives the rows of the objects it writes.
        let (key, value) = example_object("docs", "a");
        s.import(&[(key.clone(), value.clone()), (b"account/1".to_vec(), b"a".to_vec())]).unwrap();
        let got = s.index_scan(b"", None, 10).unwrap();
        let mut want = index_rows(&key, &value);
        want.sort();
        assert_eq!(got, want, "an import writes its objects' rows");
        assert_eq!(got.len(), 3, "a name and two holders");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_store_passes_the_conformance_suite() {
        conformance::run(MemoryStore::default, |s| {
            s.crash();
            s
        });
        // And without a crash between: nothing is lost.
        conformance::run(MemoryStore::default, |s| s);
    }

    #[test]
    fn a_crash_drops_exactly_the_commits_not_yet_durable() {
        let s = MemoryStore::default();
        let c = |height: u64, v: &str| Commit {
            height,
            root: Hash([height as u8; 32]),
            entries: vec![(b"k".to_vec(), Some(v.as_bytes().to_vec()))],
            ..Commit::default()
        };
        s.commit(&c(0, "a"), true).unwrap();
        s.commit(&c(1, "b"), false).unwrap();
        s.commit(&c(2, "c"), false).unwrap();
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"c"[..]));
        s.crash();
        assert_eq!(s.committed().unwrap().map(|c| c.height), Some(0));
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"a"[..]));
        s.commit(&c(1, "b"), false).unwrap();
        s.commit(&c(2, "c"), true).unwrap();
        s.crash();
        assert_eq!(s.committed().unwrap().map(|c| c.height), Some(2), "a durable commit carries the ones before it");
        assert_eq!(s.get(b"k").unwrap().as_deref(), Some(&b"c"[..]));
    }
}
