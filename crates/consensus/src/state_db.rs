//! The ledger state on disk: a [`StateStore`] in one `redb` file (`ledger/state.redb`).
//!
//! Three tables: `state` (every entry under its key's trie hash: the key's length as two
//! big-endian bytes, the key, the value — so the entries are also the trie's leaves, in the trie's
//! order, see [`archipel_ledger::store`]), `txs` (transaction hash → where it is and what it did)
//! and `meta` (the committed height and root). A block's [`Commit`] is one write transaction, so
//! the file always holds one whole committed state. A file from before the `state` table (entries
//! by key in `entries`, trie nodes in `trie`, leaves in `leaves`) is converted when opened.
//! Commits that are not durable skip the flush
//! (redb's `Durability::None`): after a crash the file opens at the last durable commit and the
//! chain replays the blocks after it from its block log, so the node flushes its state once in a
//! while instead of once per block.
//!
//! Reads go through a snapshot (a read transaction with the tables open) taken after each write
//! and shared by every reader, so a read is a B-tree lookup, not a new transaction; readers never
//! wait for a write or a flush (writers take their own lock), and a reader holding an old
//! snapshot keeps its pages alive until it lets go.

use archipel_ledger::Hash;
use archipel_ledger::store::{
    Commit, Committed, Entries, StateSnapshot, StateStore, StoreError, check_import, check_order,
};
use archipel_ledger::trie::{self, Leaf, LeafSource, TrieError};
use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

const STATE: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("state");
/// Tables of earlier versions of the file: entries by key (converted when opened), trie nodes
/// and leaves (dropped).
const OLD_ENTRIES: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("entries");
const OLD_TABLES: [TableDefinition<'_, &[u8], &[u8]>; 3] =
    [OLD_ENTRIES, TableDefinition::new("trie"), TableDefinition::new("leaves")];
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const TXS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("txs");
/// Index rows by key ([`archipel_ledger::store::index_rows`]).
const INDEX: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("index");
const COMMITTED: &str = "committed";
/// Which index the `index` table holds and the committed marker it was last written with (every
/// commit writes both): a file whose marker differs — from before the index, or committed to by
/// a version without it (a downgrade, then this) — has its index rebuilt from the entries when
/// opened.
const INDEX_MARKER: &str = "index";
const INDEX_VERSION: &[u8] = b"1";

/// redb's page cache for the state file: what it keeps in memory beyond the OS page cache (its
/// default, 1 GiB, would be most of a node's memory budget).
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

fn io(e: impl fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Entries kept decoded in memory per snapshot (hot accounts are read several times per
/// transaction, by admission, block building and execution); cleared when full.
pub const CACHED_ENTRIES: usize = 200_000;

type EntryCache = std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>;

/// What readers read: one read transaction with the tables open.
struct Snapshot {
    /// Entries read or written lately, as this snapshot holds them.
    cache: RwLock<EntryCache>,
    _txn: ReadTransaction,
    state: ReadOnlyTable<&'static [u8], &'static [u8]>,
    txs: ReadOnlyTable<&'static [u8], &'static [u8]>,
    index: ReadOnlyTable<&'static [u8], &'static [u8]>,
    committed: Option<Committed>,
}

/// The state store of a node's data directory.
pub struct StateDb {
    db: Database,
    path: PathBuf,
    /// Held by a commit, flush or clear for its whole write: one writer at a time.
    writer: Mutex<()>,
    /// What readers read, swapped (briefly, under the write lock) after each write: readers
    /// never wait for a write transaction or its flush.
    snapshot: RwLock<Arc<Snapshot>>,
    /// The trie's bucket depth for states over this store: from the entry count after each
    /// write (see [`bucket_depth_for`]), unless fixed by [`StateDb::with_bucket_depth`].
    bucket_depth: AtomicUsize,
    fixed_depth: Option<usize>,
}

/// The fewest entries a trie bucket holds on average at the depth [`bucket_depth_for`] picks (at
/// most twice as many): 7.6 at 10^6. Smaller buckets cost a change fewer leaves to read and hash
/// (16 → 8 cut the seal of a block by a quarter at 10^6, measured); the trie's top then costs
/// about 25 bytes of memory per entry (two nodes per bucket).
pub const ENTRIES_PER_BUCKET: u64 = 6;
/// The deepest buckets go: 2^24 buckets (about 2 GiB of top) is beyond any state this node holds.
pub const MAX_BUCKET_DEPTH: usize = 24;

/// The bucket depth for a store of `entries`: [`trie::BUCKET_DEPTH`] (16) up to about 800,000
/// entries, then one level deeper each time the state doubles, so a bucket stays
/// [`ENTRIES_PER_BUCKET`] to twice as many entries — what one change costs to rebuild, and what a
/// commit's worth of changed buckets holds in memory until the commit — while the top grows by
/// about 25 bytes per entry. Buckets of different depths coexist in one trie (each is read at its own depth), so
/// the depth may change as the state grows.
pub fn bucket_depth_for(entries: u64) -> usize {
    ((entries / ENTRIES_PER_BUCKET).max(1).ilog2() as usize).clamp(trie::BUCKET_DEPTH, MAX_BUCKET_DEPTH)
}

impl fmt::Debug for StateDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateDb").field("path", &self.path).finish_non_exhaustive()
    }
}

/// The index marker for a file whose committed marker is `committed` (empty: nothing committed).
fn index_marker(committed: &[u8]) -> Vec<u8> {
    [INDEX_VERSION, b"/", committed].concat()
}

fn decode_committed(b: &[u8]) -> Result<Committed, StoreError> {
    if b.len() != 40 {
        return Err(StoreError::Corrupt(format!("the committed marker is {} bytes, not 40", b.len())));
    }
    let height = u64::from_be_bytes(b[..8].try_into().map_err(io)?);
    let root = Hash(b[8..].try_into().map_err(io)?);
    Ok(Committed { height, root })
}

impl StateDb {
    /// Opens (creating if missing) the state file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| io(format!("cannot open {}: {e}", path.display())))?;
        // Create the tables once, so read transactions find them.
        let txn = db.begin_write().map_err(io)?;
        {
            let mut state = txn.open_table(STATE).map_err(io)?;
            let old = txn.open_table(OLD_ENTRIES).map_err(io)?;
            if !old.is_empty().map_err(io)? {
                // Rows a later version left behind (a downgrade, then this) are not this state's.
                state.retain(|_, _| false).map_err(io)?;
            }
            for item in old.iter().map_err(io)? {
                let (k, v) = item.map_err(io)?;
                state.insert(&trie::key_hash(k.value()).0[..], row(k.value(), v.value())?.as_slice()).map_err(io)?;
            }
            txn.open_table(TXS).map_err(io)?;
            let mut meta = txn.open_table(META).map_err(io)?;
            let committed = meta.get(COMMITTED).map_err(io)?.map(|v| v.value().to_vec()).unwrap_or_default();
            let marker = index_marker(&committed);
            let current = meta.get(INDEX_MARKER).map_err(io)?.is_some_and(|v| v.value() == marker.as_slice());
            let mut index = txn.open_table(INDEX).map_err(io)?;
            if !current {
                // Written by a version without this index: derive it from the entries.
                index.retain(|_, _| false).map_err(io)?;
                for item in state.iter().map_err(io)? {
                    let (_, row_bytes) = item.map_err(io)?;
                    let (k, v) = split_row(row_bytes.value())?;
                    for (ik, iv) in archipel_ledger::store::index_rows(k, v) {
                        index.insert(ik.as_slice(), iv.as_slice()).map_err(io)?;
                    }
                }
                meta.insert(INDEX_MARKER, marker.as_slice()).map_err(io)?;
            }
        }
        for t in OLD_TABLES {
            txn.delete_table(t).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        let snapshot = Arc::new(Self::snapshot_of(&db, EntryCache::new())?);
        let depth = bucket_depth_for(snapshot.state.len().map_err(io)?);
        Ok(Self {
            db,
            path: path.to_path_buf(),
            writer: Mutex::new(()),
            snapshot: RwLock::new(snapshot),
            bucket_depth: AtomicUsize::new(depth),
            fixed_depth: None,
        })
    }

    /// This store with states over it keeping their tries as buckets below `depth` whatever
    /// the state's size (tests: small states get buckets too).
    pub fn with_bucket_depth(mut self, depth: usize) -> Self {
        self.fixed_depth = Some(depth.min(trie::KEY_BITS));
        self
    }

    fn snapshot_of(db: &Database, cache: EntryCache) -> Result<Snapshot, StoreError> {
        let txn = db.begin_read().map_err(io)?;
        let state = txn.open_table(STATE).map_err(io)?;
        let txs = txn.open_table(TXS).map_err(io)?;
        let index = txn.open_table(INDEX).map_err(io)?;
        let meta = txn.open_table(META).map_err(io)?;
        let committed = match meta.get(COMMITTED).map_err(io)? {
            Some(v) => Some(decode_committed(v.value())?),
            None => None,
        };
        Ok(Snapshot { cache: RwLock::new(cache), _txn: txn, state, txs, index, committed })
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A new snapshot after a write, its cache carried over with `written` applied.
    fn refresh(&self, written: &[(Vec<u8>, Option<Vec<u8>>)], keep_cache: bool) -> Result<(), StoreError> {
        let mut cache = if keep_cache {
            std::mem::take(&mut *self.snapshot().cache.write().unwrap_or_else(|e| e.into_inner()))
        } else {
            EntryCache::new()
        };
        if cache.len() + written.len() > CACHED_ENTRIES {
            cache.clear();
        }
        for (k, v) in written {
            cache.insert(k.clone(), v.clone());
        }
        let next = Arc::new(Self::snapshot_of(&self.db, cache)?);
        self.bucket_depth.store(bucket_depth_for(next.state.len().map_err(io)?), Ordering::Relaxed);
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The `state` table's value for an entry: the key's length (two big-endian bytes), the key, the
/// value.
fn row(key: &[u8], value: &[u8]) -> Result<Vec<u8>, StoreError> {
    let len = u16::try_from(key.len())
        .map_err(|_| StoreError::Io(format!("a state key of {} bytes is longer than 65,535", key.len())))?;
    Ok([&len.to_be_bytes()[..], key, value].concat())
}

/// Splits a `state` row into key and value.
fn split_row(row: &[u8]) -> Result<(&[u8], &[u8]), StoreError> {
    let corrupt = || StoreError::Corrupt("a state row is shorter than its key".into());
    let len = u16::from_be_bytes(row.get(..2).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?) as usize;
    let key = row.get(2..2 + len).ok_or_else(corrupt)?;
    Ok((key, &row[2 + len..]))
}

/// Refuses a row filed under another hash than its key's (a disk that garbled it: the trie would
/// read it in the wrong place).
fn check_filed(under: &[u8], key: &[u8]) -> Result<(), StoreError> {
    if under != trie::key_hash(key).0 {
        return Err(StoreError::Corrupt(format!(
            "the row of {} is filed under another key's hash",
            String::from_utf8_lossy(key)
        )));
    }
    Ok(())
}

/// Reads up to `limit` rows of `table` after the row of key `after` whose keys start with
/// `prefix`, as entries.
fn rows(
    table: &ReadOnlyTable<&'static [u8], &'static [u8]>,
    after: Option<&[u8]>,
    prefix: &[u8],
    limit: usize,
) -> Result<Entries, StoreError> {
    let after = after.map(trie::key_hash);
    let from = after.as_ref().map_or(std::ops::Bound::Unbounded, |h| std::ops::Bound::Excluded(&h.0[..]));
    let mut out = Vec::new();
    for item in table.range::<&[u8]>((from, std::ops::Bound::Unbounded)).map_err(io)? {
        if out.len() == limit {
            break;
        }
        let (h, v) = item.map_err(io)?;
        let (k, v) = split_row(v.value())?;
        check_filed(h.value(), k)?;
        if k.starts_with(prefix) {
            out.push((k.to_vec(), v.to_vec()));
        }
    }
    Ok(out)
}

impl LeafSource for StateDb {
    fn leaves(&self, lo: &Hash, hi: &Hash) -> Result<Vec<Leaf>, TrieError> {
        let source = |e: redb::StorageError| TrieError::Source(e.to_string());
        let snap = self.snapshot();
        let mut out = Vec::new();
        for item in snap.state.range::<&[u8]>(&lo.0[..]..=&hi.0[..]).map_err(source)? {
            let (k, v) = item.map_err(source)?;
            let Ok(k) = <[u8; 32]>::try_from(k.value()) else {
                return Err(TrieError::Corrupt("a state row's key is not a 32-byte hash".into()));
            };
            // The row's key is not hashed again here: the trie checks the bucket's `(key hash,
            // value hash)` pairs against the hash it kept, and a read by key checks the key.
            let (_, value) = split_row(v.value()).map_err(|e| TrieError::Corrupt(e.to_string()))?;
            out.push((Hash(k), trie::value_hash(value)));
        }
        Ok(out)
    }
}

impl StateStore for StateDb {
    fn bucket_depth(&self) -> usize {
        self.fixed_depth.unwrap_or_else(|| self.bucket_depth.load(Ordering::Relaxed))
    }

    fn committed(&self) -> Result<Option<Committed>, StoreError> {
        Ok(self.snapshot().committed)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let snap = self.snapshot();
        if let Some(v) = snap.cache.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            return Ok(v.clone());
        }
        let v = match snap.state.get(&trie::key_hash(key).0[..]).map_err(io)? {
            None => None,
            Some(row) => {
                let (k, v) = split_row(row.value())?;
                if k != key {
                    return Err(StoreError::Corrupt(format!(
                        "the row under {}'s hash holds another key",
                        String::from_utf8_lossy(key)
                    )));
                }
                Some(v.to_vec())
            }
        };
        let mut cache = snap.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHED_ENTRIES {
            cache.clear();
        }
        cache.insert(key.to_vec(), v.clone());
        Ok(v)
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Entries, StoreError> {
        rows(&self.snapshot().state, after, prefix, limit)
    }

    fn commit(&self, commit: &Commit, durable: bool) -> Result<(), StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        check_order(self.snapshot().committed, commit)?;
        let mut txn = self.db.begin_write().map_err(io)?;
        txn.set_durability(if durable { Durability::Immediate } else { Durability::None }).map_err(io)?;
        {
            let mut state = txn.open_table(STATE).map_err(io)?;
            for (k, v) in &commit.entries {
                let h = trie::key_hash(k);
                match v {
                    Some(v) => state.insert(&h.0[..], row(k, v)?.as_slice()).map_err(io)?,
                    None => state.remove(&h.0[..]).map_err(io)?,
                };
            }
            let mut txs = txn.open_table(TXS).map_err(io)?;
            for (h, v) in &commit.txs {
                txs.insert(&h.0[..], v.as_slice()).map_err(io)?;
            }
            let mut index = txn.open_table(INDEX).map_err(io)?;
            for (k, v) in &commit.index {
                match v {
                    Some(v) => index.insert(k.as_slice(), v.as_slice()).map_err(io)?,
                    None => index.remove(k.as_slice()).map_err(io)?,
                };
            }
            let mut meta = txn.open_table(META).map_err(io)?;
            let marker = [&commit.height.to_be_bytes()[..], &commit.root.0[..]].concat();
            meta.insert(COMMITTED, marker.as_slice()).map_err(io)?;
            meta.insert(INDEX_MARKER, index_marker(&marker).as_slice()).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        self.refresh(&commit.entries, true)
    }

    fn tx(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.snapshot().txs.get(&hash.0[..]).map_err(io)?.map(|v| v.value().to_vec()))
    }

    fn clear(&self) -> Result<(), StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.db.begin_write().map_err(io)?;
        txn.delete_table(STATE).map_err(io)?;
        txn.delete_table(TXS).map_err(io)?;
        txn.delete_table(INDEX).map_err(io)?;
        txn.delete_table(META).map_err(io)?;
        for t in [STATE, TXS, INDEX] {
            txn.open_table(t).map_err(io)?;
        }
        txn.open_table(META).map_err(io)?.insert(INDEX_MARKER, index_marker(&[]).as_slice()).map_err(io)?;
        txn.commit().map_err(io)?;
        self.refresh(&[], false)
    }

    fn snapshot(&self) -> Result<Box<dyn StateSnapshot>, StoreError> {
        Ok(Box::new(Pinned(self.snapshot())))
    }

    fn import(&self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        check_import(self.snapshot().committed)?;
        // Not durable by itself: the commit naming the entries' height flushes them with it.
        let mut txn = self.db.begin_write().map_err(io)?;
        txn.set_durability(Durability::None).map_err(io)?;
        {
            let mut state = txn.open_table(STATE).map_err(io)?;
            let mut index = txn.open_table(INDEX).map_err(io)?;
            for (k, v) in entries {
                state.insert(&trie::key_hash(k).0[..], row(k, v)?.as_slice()).map_err(io)?;
                for (ik, iv) in archipel_ledger::store::index_rows(k, v) {
                    index.insert(ik.as_slice(), iv.as_slice()).map_err(io)?;
                }
            }
        }
        txn.commit().map_err(io)?;
        // Imported pages are read once, at the end: not worth the cache.
        self.refresh(&[], false)
    }

    fn index_scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Entries, StoreError> {
        let snap = self.snapshot();
        let mut out = Vec::new();
        let start = archipel_ledger::store::index_start(prefix, after);
        for item in snap.index.range::<&[u8]>((start, std::ops::Bound::Unbounded)).map_err(io)? {
            let (k, v) = item.map_err(io)?;
            if out.len() == limit || !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // An empty durable commit persists the non-durable ones before it.
        let mut txn = self.db.begin_write().map_err(io)?;
        txn.set_durability(Durability::Immediate).map_err(io)?;
        txn.commit().map_err(io)
    }
}

/// One read transaction of the store, kept while a snapshot is read (its pages stay alive).
struct Pinned(Arc<Snapshot>);

impl StateSnapshot for Pinned {
    fn committed(&self) -> Option<Committed> {
        self.0.committed
    }

    fn entries(&self, after: Option<&[u8]>, limit: usize) -> Result<Entries, StoreError> {
        rows(&self.0.state, after, b"", limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_ledger::store::conformance;

    #[test]
    fn the_disk_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicUsize::new(0);
        let path = |i: usize| dir.path().join(format!("state-{i}.redb"));
        conformance::run(
            || StateDb::open(&path(n.fetch_add(1, std::sync::atomic::Ordering::SeqCst))).unwrap(),
            |s| {
                let p = s.path().to_path_buf();
                drop(s);
                StateDb::open(&p).unwrap()
            },
        );
    }

    #[test]
    fn a_corrupt_row_or_marker_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let s = StateDb::open(&path).unwrap();
        let txn = s.db.begin_write().unwrap();
        {
            let mut m = txn.open_table(META).unwrap();
            m.insert(COMMITTED, &[1u8, 2, 3][..]).unwrap();
        }
        txn.commit().unwrap();
        drop(s);
        let err = StateDb::open(&path).unwrap_err();
        assert!(err.to_string().contains("committed marker"), "{err}");
        // Rows cut short, under a key that is not a hash, or holding another key than the one
        // whose hash they sit under: refused by reads. A misfiled row is refused by a read by key
        // and by scans (and so by opening the state and by a state sync's import); read as a
        // trie bucket's leaves it passes, since the trie commits to key hashes and values only.
        for (i, (under, row)) in [
            (trie::key_hash(b"account/1").0.to_vec(), vec![0u8, 9, b'a']),
            (vec![7u8; 5], row(b"account/1", b"x").unwrap()),
            (trie::key_hash(b"account/1").0.to_vec(), row(b"account/2", b"x").unwrap()),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join("state2.redb");
            let _ = std::fs::remove_file(&path);
            let s = StateDb::open(&path).unwrap();
            let txn = s.db.begin_write().unwrap();
            txn.open_table(STATE).unwrap().insert(under.as_slice(), row.as_slice()).unwrap();
            txn.commit().unwrap();
            drop(s);
            let s = StateDb::open(&path).unwrap();
            let leaves = s.leaves(&Hash::ZERO, &Hash([0xff; 32]));
            let get = s.get(b"account/1");
            let scan = s.scan(b"", None, 10);
            assert!(leaves.is_err() || get.is_err() || scan.is_err(), "{leaves:?} {get:?} {scan:?}");
            if under.len() == 32 {
                assert!(get.unwrap_err().to_string().contains("corrupt"));
            }
            if i == 2 {
                assert!(leaves.is_ok(), "a bucket's leaves are not hashed again by key");
                assert!(scan.unwrap_err().to_string().contains("corrupt"), "a scan reads the key and checks it");
            }
        }
        assert!(row(&[0u8; 70_000], b"x").unwrap_err().to_string().contains("longer than 65,535"));
    }

    #[test]
    fn buckets_go_deeper_as_the_state_grows() {
        assert_eq!(bucket_depth_for(0), trie::BUCKET_DEPTH);
        assert_eq!(bucket_depth_for(100_000), trie::BUCKET_DEPTH);
        assert_eq!(bucket_depth_for(1_000_000), 17, "about 7.6 entries a bucket at 10^6");
        assert_eq!(bucket_depth_for(4_000_000), 19);
        assert_eq!(bucket_depth_for(10_000_000), 20, "about 9.5 entries a bucket at 10^7");
        assert_eq!(bucket_depth_for(u64::MAX), MAX_BUCKET_DEPTH);
        let dir = tempfile::tempdir().unwrap();
        let s = StateDb::open(&dir.path().join("state.redb")).unwrap();
        assert_eq!(s.bucket_depth(), 16);
        assert_eq!(s.with_bucket_depth(3).bucket_depth(), 3, "tests fix it");
    }

    #[test]
    fn a_file_from_before_the_state_table_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut e = txn.open_table(OLD_ENTRIES).unwrap();
                e.insert(&b"account/1"[..], &b"x"[..]).unwrap();
                e.insert(&b"account/2"[..], &b"y"[..]).unwrap();
                let mut t = txn.open_table(OLD_TABLES[1]).unwrap();
                t.insert(&[7u8; 32][..], &[9u8; 65][..]).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = StateDb::open(&path).unwrap();
        assert_eq!(s.get(b"account/2").unwrap().as_deref(), Some(&b"y"[..]));
        let mut want = vec![
            (trie::key_hash(b"account/1"), trie::value_hash(b"x")),
            (trie::key_hash(b"account/2"), trie::value_hash(b"y")),
        ];
        want.sort();
        assert_eq!(s.leaves(&Hash::ZERO, &Hash([0xff; 32])).unwrap(), want);
        let txn = s.db.begin_read().unwrap();
        for t in OLD_TABLES {
            assert!(txn.open_table(t).is_err(), "the old tables are dropped");
        }
    }

    #[test]
    fn an_index_not_written_with_the_last_commit_is_rebuilt_from_the_entries_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let (key, value) = conformance::example_object("docs", "a");
        let rows_of = |k: &[u8], v: &[u8]| {
            let mut r = archipel_ledger::store::index_rows(k, v);
            r.sort();
            r
        };
        {
            let s = StateDb::open(&path).unwrap();
            // What a version before the index wrote: entries, no rows, no marker — and a stale row.
            let entries = vec![(key.clone(), Some(value.clone())), (b"account/1".to_vec(), Some(b"x".to_vec()))];
            let index = vec![(b"name/zz/00".to_vec(), Some(vec![0; 32]))];
            s.commit(&Commit { height: 3, root: Hash([1; 32]), entries, index, ..Commit::default() }, true).unwrap();
            let txn = s.db.begin_write().unwrap();
            txn.open_table(META).unwrap().remove(INDEX_MARKER).unwrap();
            txn.commit().unwrap();
        }
        let s = StateDb::open(&path).unwrap();
        assert_eq!(s.index_scan(b"", None, 10).unwrap(), rows_of(&key, &value), "rebuilt, the stale row gone");
        assert_eq!(s.committed().unwrap().map(|c| c.height), Some(3), "the state is untouched");
        // A commit by a version without the index (a downgrade): entries and the committed marker
        // move on, the index does not.
        let (key2, value2) = conformance::example_object("docs", "b");
        {
            let txn = s.db.begin_write().unwrap();
            txn.open_table(STATE)
                .unwrap()
                .insert(&trie::key_hash(&key2).0[..], row(&key2, &value2).unwrap().as_slice())
                .unwrap();
            let marker = [&4u64.to_be_bytes()[..], &[2u8; 32][..]].concat();
            txn.open_table(META).unwrap().insert(COMMITTED, marker.as_slice()).unwrap();
            txn.commit().unwrap();
        }
        drop(s);
        let s = StateDb::open(&path).unwrap();
        let mut want = [rows_of(&key, &value), rows_of(&key2, &value2)].concat();
        want.sort();
        assert_eq!(s.index_scan(b"", None, 10).unwrap(), want, "the rows of what the other version committed");
        // Opened again after a commit of its own: the index is current and kept as it is.
        s.commit(&Commit { height: 5, root: Hash([3; 32]), ..Commit::default() }, true).unwrap();
        let planted = {
            let txn = s.db.begin_write().unwrap();
            txn.open_table(INDEX).unwrap().insert(&b"name/zz/01"[..], &[0u8; 32][..]).unwrap();
            txn.commit().unwrap();
            b"name/zz/01".to_vec()
        };
        drop(s);
        let s = StateDb::open(&path).unwrap();
        let rows = s.index_scan(b"", None, 10).unwrap();
        assert!(rows.iter().any(|(k, _)| *k == planted), "a current index is not rebuilt on every open");
    }

    /// A ledger history on the disk store with buckets three levels down: blocks executed on
    /// their parent before the parent's commit (as a validator does), commits every few blocks,
    /// reopenings from the file; every root, value and proof agrees with the state held in
    /// memory, and a committed state holds only the trie's top.
    #[test]
    fn a_history_on_the_disk_store_with_buckets_agrees_with_the_one_in_memory() {
        use archipel_crypto::Identity;
        use archipel_ledger::{
            Credit, GenesisState, Payload, Signatures, State, StateKey, Transaction, execute, genesis_header, propose,
        };
        const DEPTH: usize = 3;
        let id = |i: u64| Identity::from_seed(i);
        let genesis = || {
            State::genesis(GenesisState {
                accounts: (0..40).map(|i| (id(i).node_id(), 1_000_000)).collect(),
                validators: vec![id(0).node_id()],
                ..GenesisState::default()
            })
        };
        // The history, in memory: block n sends from account n % 4 to three accounts, new ones
        // and old ones alike.
        let mut mem = genesis();
        let mut headers = vec![genesis_header(&mem)];
        let mut blocks = Vec::new();
        for n in 0..60u64 {
            let signer = id(n % 4);
            let credits =
                (0..3).map(|k| Credit { to: id((n * 7 + k * 13) % 90).node_id(), amount_micro: 1 + k }).collect();
            let nonce = mem.account(&signer.node_id()).nonce;
            let tx = Transaction { signer: signer.node_id(), nonce, payload: Payload::TransferMany { credits } }
                .sign(&signer, &archipel_ledger::Hash::ZERO);
            let p = propose(&mem, headers.last().unwrap(), 10 * (n + 1), [], [tx], Signatures::Verify).unwrap();
            mem = p.state;
            headers.push(p.block.header);
            blocks.push(p.block);
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let open = || Arc::new(StateDb::open(&path).unwrap().with_bucket_depth(DEPTH));
        let mut store = open();
        let mut disk = genesis().with_store(store.clone());
        store.commit(&disk.commit().unwrap(), true).unwrap();
        disk.committed();
        let keys: Vec<StateKey> =
            (0..95).map(|i| StateKey::Account(id(i).node_id())).chain([StateKey::Chain]).collect();
        let mut h = 0usize;
        while h < blocks.len() {
            let mut cur = disk.clone();
            execute(&mut cur, &headers[h], &blocks[h], Signatures::Verify).unwrap();
            // Every third block: the child is executed before this block is committed.
            let child = (h.is_multiple_of(3) && h + 1 < blocks.len()).then(|| {
                let mut c = cur.clone();
                execute(&mut c, &headers[h + 1], &blocks[h + 1], Signatures::Verify).unwrap();
                c
            });
            store.commit(&cur.commit().unwrap(), h.is_multiple_of(5)).unwrap();
            cur.committed();
            assert!(cur.memory_trie_nodes() < 1 << (DEPTH + 1), "block {}: {}", h + 1, cur.memory_trie_nodes());
            h += 1;
            disk = cur;
            if let Some(mut c) = child {
                c.forget_committed_through(h as u64);
                assert_eq!(c.state_root(), headers[h + 1].state_root);
                store.commit(&c.commit().unwrap(), false).unwrap();
                c.committed();
                h += 1;
                disk = c;
            }
            assert_eq!(disk.state_root(), headers[h].state_root, "block {h}");
            if h.is_multiple_of(10) {
                // A restart: the file reopened, the state opened from it.
                store.flush().unwrap();
                drop(disk);
                drop(store);
                store = open();
                disk = State::open(store.clone()).unwrap().expect("a committed state");
                assert_eq!(disk.chain().height, h as u64);
                assert!(disk.memory_trie_nodes() < 1 << (DEPTH + 1));
            }
            for key in keys.iter().step_by(7) {
                let (value, proof) = disk.prove(key).unwrap();
                let shown = proof.verify(&headers[h].state_root, &archipel_ledger::state::state_key_hash(key)).unwrap();
                match &value {
                    Some(v) => assert_eq!(shown, archipel_ledger::trie::Proven::Present(trie::value_hash(v)), "{key}"),
                    None => assert_eq!(shown, archipel_ledger::trie::Proven::Absent, "{key}"),
                }
            }
        }
        assert_eq!(disk.state_root(), mem.state_root());
        for key in &keys {
            assert_eq!(disk.prove(key).unwrap().0, mem.prove(key).unwrap().0, "{key}");
        }
    }
}
