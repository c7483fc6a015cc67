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
use redb::{Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

const STATE: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("state");
/// Tables of earlier versions of the file: entries by key (converted when opened), trie nodes
/// and leaves (dropped).
const OLD_ENTRIES: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("entries");
const OLD_TABLES: [TableDefinition<'_, &[u8], &[u8]>; 3] =
    [OLD_ENTRIES, TableDefinition::new("trie"), TableDefinition::new("leaves")];
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const TXS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("txs");
const COMMITTED: &str = "committed";

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
}

impl fmt::Debug for StateDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateDb").field("path", &self.path).finish_non_exhaustive()
    }
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
            for item in old.iter().map_err(io)? {
                let (k, v) = item.map_err(io)?;
                state.insert(&trie::key_hash(k.value()).0[..], row(k.value(), v.value())?.as_slice()).map_err(io)?;
            }
            txn.open_table(META).map_err(io)?;
            txn.open_table(TXS).map_err(io)?;
        }
        for t in OLD_TABLES {
            txn.delete_table(t).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        let snapshot = RwLock::new(Arc::new(Self::snapshot_of(&db, EntryCache::new())?));
        Ok(Self { db, path: path.to_path_buf(), writer: Mutex::new(()), snapshot })
    }

    fn snapshot_of(db: &Database, cache: EntryCache) -> Result<Snapshot, StoreError> {
        let txn = db.begin_read().map_err(io)?;
        let state = txn.open_table(STATE).map_err(io)?;
        let txs = txn.open_table(TXS).map_err(io)?;
        let meta = txn.open_table(META).map_err(io)?;
        let committed = match meta.get(COMMITTED).map_err(io)? {
            Some(v) => Some(decode_committed(v.value())?),
            None => None,
        };
        Ok(Snapshot { cache: RwLock::new(cache), _txn: txn, state, txs, committed })
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

/// Reads up to `limit` rows of `table` from `from` on whose keys start with `prefix`, as entries.
fn rows(
    table: &ReadOnlyTable<&'static [u8], &'static [u8]>,
    from: std::ops::Bound<&[u8]>,
    prefix: &[u8],
    limit: usize,
) -> Result<Entries, StoreError> {
    let mut out = Vec::new();
    for item in table.range::<&[u8]>((from, std::ops::Bound::Unbounded)).map_err(io)? {
        if out.len() == limit {
            break;
        }
        let (_, v) = item.map_err(io)?;
        let (k, v) = split_row(v.value())?;
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
                return Err(TrieError::Source("a state row's key is not a 32-byte hash".into()));
            };
            let (_, value) = split_row(v.value()).map_err(|e| TrieError::Source(e.to_string()))?;
            out.push((Hash(k), trie::value_hash(value)));
        }
        Ok(out)
    }
}

impl StateStore for StateDb {
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
        let after = after.map(trie::key_hash);
        let from = after.as_ref().map_or(std::ops::Bound::Unbounded, |h| std::ops::Bound::Excluded(&h.0[..]));
        rows(&self.snapshot().state, from, prefix, limit)
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
            let mut meta = txn.open_table(META).map_err(io)?;
            let marker = [&commit.height.to_be_bytes()[..], &commit.root.0[..]].concat();
            meta.insert(COMMITTED, marker.as_slice()).map_err(io)?;
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
        txn.delete_table(META).map_err(io)?;
        for t in [STATE, TXS] {
            txn.open_table(t).map_err(io)?;
        }
        txn.open_table(META).map_err(io)?;
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
            for (k, v) in entries {
                state.insert(&trie::key_hash(k).0[..], row(k, v)?.as_slice()).map_err(io)?;
            }
        }
        txn.commit().map_err(io)?;
        // Imported pages are read once, at the end: not worth the cache.
        self.refresh(&[], false)
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
        let after = after.map(trie::key_hash);
        let from = after.as_ref().map_or(std::ops::Bound::Unbounded, |h| std::ops::Bound::Excluded(&h.0[..]));
        rows(&self.0.state, from, b"", limit)
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
        // whose hash they sit under: refused by every read.
        for (under, row) in [
            (trie::key_hash(b"account/1").0.to_vec(), vec![0u8, 9, b'a']),
            (vec![7u8; 5], row(b"account/1", b"x").unwrap()),
            (trie::key_hash(b"account/1").0.to_vec(), row(b"account/2", b"x").unwrap()),
        ] {
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
        }
        assert!(row(&[0u8; 70_000], b"x").unwrap_err().to_string().contains("longer than 65,535"));
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
}
