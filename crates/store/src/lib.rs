//! A storage node's shard store: every shard a plain file, a `redb` index of their lengths and
//! hashes, capacity accounting, and every read checked against the hash it was stored with.
//!
//! Layout under the store's directory:
//! - `shards/<2 hex>/<version hex>/<index>.<segment>`: one file per shard, written to a temporary
//!   name and renamed, so a reader never sees half a shard under the final name;
//! - `shards/<2 hex>/<version hex>/manifest`: the object's manifest, as uploaded;
//! - `index.redb`: `(version, index, segment) → (length, BLAKE3 hash)` and each manifest's length.
//!
//! Durability: writes go to the page cache; [`ShardStore::seal`] fsyncs every shard of one object
//! version and shard index, their directories and the index before it returns — the node signs
//! its receipt only after that. A crash before a seal may lose unsealed writes, which no receipt
//! ever vouched for; a torn or flipped file fails its hash check on every read; the temporary
//! files of interrupted writes are removed when the store is opened again.
//!
//! Capacity: the bytes of every shard and manifest count against the capacity the store was
//! opened with; a write beyond it, or a disk that runs out of space, is refused with
//! [`ShardStoreError::Full`] and leaves nothing behind.

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

/// `(version 32 bytes, index 1, segment 8 big-endian)` → `(length 8, hash 32)`.
const SHARDS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("shards");
/// `version` → manifest length (8 bytes).
const MANIFESTS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("manifests");

/// An object version's id (the ledger's `version`).
pub type Version = [u8; 32];

/// One version of a [`ShardStore::seal_many`]: the version, the shard index, and each listed
/// segment with the hash it must have.
pub type SealOf = (Version, u8, Vec<(u64, [u8; 32])>);

/// Which shard: object version, shard index, segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardKey {
    /// The object version.
    pub version: Version,
    /// The shard index within each segment (0..k+m).
    pub index: u8,
    /// The segment.
    pub segment: u64,
}

impl ShardKey {
    fn to_bytes(self) -> [u8; 41] {
        let mut out = [0u8; 41];
        out[..32].copy_from_slice(&self.version);
        out[32] = self.index;
        out[33..].copy_from_slice(&self.segment.to_be_bytes());
        out
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(ShardKey {
            version: b.get(..32)?.try_into().ok()?,
            index: *b.get(32)?,
            segment: u64::from_be_bytes(b.get(33..41)?.try_into().ok()?),
        })
    }
}

/// Errors of the shard store. Each says what went wrong and, where there is one, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ShardStoreError {
    /// No room: the store's capacity or the disk itself.
    #[error("shard store full: {need} more bytes needed, {free} free of {capacity} ({why})")]
    Full {
        /// Bytes the write needed.
        need: u64,
        /// Bytes free by the store's accounting.
        free: u64,
        /// The store's capacity.
        capacity: u64,
        /// Which limit: the declared capacity or the disk.
        why: &'static str,
    },
    /// The bytes do not have the hash they were sent with.
    #[error("shard {key} does not match its hash: expected {expected}, got {got} (a corrupt or truncated upload)")]
    HashMismatch {
        /// Which shard.
        key: String,
        /// The hash it should have.
        expected: String,
        /// The hash it has.
        got: String,
    },
    /// The store does not hold it.
    #[error("shard {0} is not stored here")]
    NotFound(String),
    /// A stored shard whose bytes no longer match: bitrot, a torn write or tampering.
    #[error("stored shard {key} is corrupt ({why}): it must be repaired from the other holders")]
    Corrupt {
        /// Which shard.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// A file or index operation failed.
    #[error("shard store I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The index failed.
    #[error("shard index: {0}")]
    Index(String),
    /// A request outside the store's bounds.
    #[error("{0}")]
    Invalid(String),
    /// Other bytes are stored under that name already: shards and manifests are never
    /// overwritten.
    #[error("{0} is stored already with other bytes: shards and manifests are never overwritten")]
    Exists(String),
}

fn index_err(e: impl std::fmt::Display) -> ShardStoreError {
    ShardStoreError::Index(e.to_string())
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> ShardStoreError + '_ {
    move |source| ShardStoreError::Io { path: path.to_path_buf(), source }
}

fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

fn describe(key: &ShardKey) -> String {
    format!("{}/{}.{}", &hex::encode(key.version)[..16], key.index, key.segment)
}

/// Bytes with their BLAKE3 hash, taken from them here and nowhere else: a store write given one
/// does not hash the bytes again (the node's API hashed the request body once, to check its
/// signature, and the same hash serves the shard).
#[derive(Clone, Debug)]
pub struct Hashed<B> {
    bytes: B,
    hash: [u8; 32],
}

impl<B: AsRef<[u8]>> Hashed<B> {
    /// `bytes` and their BLAKE3 hash.
    pub fn new(bytes: B) -> Self {
        let hash = *blake3::hash(bytes.as_ref()).as_bytes();
        Hashed { bytes, hash }
    }

    /// The bytes.
    pub fn bytes(&self) -> &B {
        &self.bytes
    }

    /// Their BLAKE3 hash.
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }
}

fn too_large(len: usize) -> ShardStoreError {
    ShardStoreError::Invalid(format!("shard of {len} bytes: the limit is {MAX_SHARD_BYTES}"))
}

/// Largest shard or manifest the store accepts (a 64 MiB segment at k = 1, or a manifest of
/// a 5 TiB object in 8 MiB segments at 32+16).
pub const MAX_SHARD_BYTES: usize = 256 << 20;

/// Shards at least this large are synced by the early writer as soon as they are written.
const EARLY_WRITEBACK_BYTES: usize = 256 << 10;

/// What a write of a shard or manifest did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Its bytes are stored now.
    New,
    /// The same bytes were stored already (a retry): nothing was written.
    AlreadyHeld,
}

/// A node's shards on disk.
pub struct ShardStore {
    dir: PathBuf,
    db: Database,
    capacity: u64,
    used: Mutex<u64>,
    temp_seq: AtomicU64,
    /// Held while a shard or manifest is checked and written.
    writing: Mutex<()>,
    /// The durable flushes seals share.
    flushes: Mutex<Flushes>,
    /// Signalled when a flush ends.
    flushed: Condvar,
    /// Flushes run so far.
    flush_runs: AtomicU64,
    /// Large shards just written, for the writer thread to sync ahead of their seal.
    early_sync: std::sync::mpsc::SyncSender<File>,
    /// Set for good when a sync failed (the early writer's, or a seal's flush): on Linux a later
    /// fsync on a new descriptor may not report that error again, so no seal vouches for
    /// anything after it.
    sync_failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The store's directory, open since the store was: `syncfs` on it reports every write error
    /// of the filesystem since then ([`ShardStore::seal_many`]), even one another process's
    /// `syncfs` on the same filesystem saw first (a descriptor opened later would not).
    fs_handle: File,
    /// Whether a batch seal may rest on one `syncfs`: Linux 5.8 or later (earlier kernels do
    /// not report write errors from it) and the shards on the store directory's filesystem (a
    /// separate mount would not be synced). Otherwise each file and directory is synced.
    whole_sync: bool,
}

/// Whether `syncfs` on `dir` makes its shards durable and reports their write errors: Linux 5.8
/// or later, `dir/shards` on the same device as `dir`.
fn syncfs_is_enough(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let recent = matches!((parts.next(), parts.next()), (Some(major), Some(minor)) if (major, minor) >= (5, 8));
    let same = match (std::fs::metadata(dir), std::fs::metadata(dir.join("shards"))) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    };
    cfg!(target_os = "linux") && recent && same
}

/// Shards waiting for the early writer at most; more are left to their seal.
const EARLY_SYNC_QUEUE: usize = 64;

/// The early writer: syncs each shard it is handed (its data only) until the store is dropped;
/// a failed sync sets `failed` for good.
fn early_writer(
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::sync::mpsc::SyncSender<File>, std::io::Error> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<File>(EARLY_SYNC_QUEUE);
    std::thread::Builder::new().name("shard-sync".into()).spawn(move || {
        for f in rx {
            if f.sync_data().is_err() {
                failed.store(true, Ordering::SeqCst);
            }
        }
    })?;
    Ok(tx)
}

/// Failed flushes remembered for their waiting seals (a waiter wakes long before this many more
/// flushes run).
const MAX_FAILED_FLUSHES: usize = 1_024;

/// The flush a seal runs for everyone: whatever way it ends (a panic too), the next may start
/// and the waiting seals wake; one that panicked counts as a failed sync.
struct FlushRun<'a>(&'a ShardStore);

impl Drop for FlushRun<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.sync_failed.store(true, Ordering::SeqCst);
        }
        self.0.flushes.lock().unwrap_or_else(|e| e.into_inner()).running = false;
        self.0.flushed.notify_all();
    }
}

/// Group commit of seals: every seal needs its directories fsynced and a durable index commit
/// after its own files are synced, and one flush that starts after a seal asked serves it. Seals
/// that ask while a flush runs wait for the next one, which covers them all at once.
#[derive(Default)]
struct Flushes {
    /// Tickets handed out (one per request).
    asked: u64,
    /// Every ticket up to this one has its flush's verdict.
    done: u64,
    /// The tickets of the last failed flushes, `(after, through]`: their seals get the error,
    /// whoever runs the next flush (which does not sync their directories again).
    failed: std::collections::VecDeque<(u64, u64)>,
    /// A flush is under way.
    running: bool,
    /// Directories the next flush syncs.
    dirs: BTreeSet<PathBuf>,
    /// The next flush first syncs the whole filesystem ([`ShardStore::seal_many`]).
    whole: bool,
}

impl std::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardStore").field("dir", &self.dir).field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

/// Removes the temporary files of writes a crash or power cut interrupted (`.tmp-*` in any
/// version's directory): never renamed to a shard's name, never counted, never read. O(versions).
fn remove_temporaries(shards: &Path) -> Result<(), ShardStoreError> {
    for prefix in fs::read_dir(shards).map_err(io_at(shards))?.flatten() {
        let Ok(versions) = fs::read_dir(prefix.path()) else { continue };
        for version in versions.flatten() {
            let Ok(files) = fs::read_dir(version.path()) else { continue };
            for f in files.flatten() {
                if f.file_name().as_encoded_bytes().starts_with(b".tmp-") {
                    fs::remove_file(f.path()).map_err(io_at(&f.path()))?;
                }
            }
        }
    }
    Ok(())
}

impl ShardStore {
    /// Opens (creating if missing) the store in `dir`, holding at most `capacity` bytes; removes
    /// what interrupted writes left behind.
    pub fn open(dir: &Path, capacity: u64) -> Result<Self, ShardStoreError> {
        fs::create_dir_all(dir.join("shards")).map_err(io_at(dir))?;
        let path = dir.join("index.redb");
        let db = Database::create(&path).map_err(|e| ShardStoreError::Index(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(index_err)?;
        let mut used = 0u64;
        {
            let shards = txn.open_table(SHARDS).map_err(index_err)?;
            for row in shards.iter().map_err(index_err)? {
                let (_, v) = row.map_err(index_err)?;
                used = used.saturating_add(decode_entry(v.value())?.0);
            }
            let manifests = txn.open_table(MANIFESTS).map_err(index_err)?;
            for row in manifests.iter().map_err(index_err)? {
                let (_, v) = row.map_err(index_err)?;
                used = used.saturating_add(u64::from_be_bytes(v.value().try_into().map_err(index_err)?));
            }
        }
        txn.commit().map_err(index_err)?;
        remove_temporaries(&dir.join("shards"))?;
        let sync_failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        Ok(ShardStore {
            dir: dir.to_path_buf(),
            db,
            capacity,
            used: Mutex::new(used),
            temp_seq: AtomicU64::new(0),
            writing: Mutex::new(()),
            flushes: Mutex::default(),
            flushed: Condvar::new(),
            flush_runs: AtomicU64::new(0),
            early_sync: early_writer(sync_failed.clone()).map_err(io_at(dir))?,
            sync_failed,
            fs_handle: File::open(dir).map_err(io_at(dir))?,
            whole_sync: syncfs_is_enough(dir),
        })
    }

    /// The capacity the store was opened with.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes held (shards and manifests).
    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Durable flushes run so far: concurrent seals share one.
    pub fn flushes(&self) -> u64 {
        self.flush_runs.load(Ordering::Relaxed)
    }

    /// Bytes still free by the store's accounting.
    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used())
    }

    fn version_dir(&self, version: &Version) -> PathBuf {
        let hexed = hex::encode(version);
        self.dir.join("shards").join(&hexed[..2]).join(hexed)
    }

    fn shard_path(&self, key: &ShardKey) -> PathBuf {
        self.version_dir(&key.version).join(format!("{}.{}", key.index, key.segment))
    }

    /// Reserves `need` bytes (less `freed`, the bytes a replaced entry gives back).
    fn reserve(&self, need: u64, freed: u64) -> Result<(), ShardStoreError> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let after = used.saturating_sub(freed).saturating_add(need);
        if after > self.capacity {
            return Err(ShardStoreError::Full {
                need,
                free: self.capacity.saturating_sub(*used),
                capacity: self.capacity,
                why: "the node's declared capacity",
            });
        }
        *used = after;
        Ok(())
    }

    fn unreserve(&self, bytes: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(bytes);
    }

    /// Writes `bytes` to `path` through a temporary file and a rename (not yet fsynced).
    fn write_file(&self, path: &Path, bytes: &[u8]) -> Result<(), ShardStoreError> {
        let dir = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(dir).map_err(|e| self.map_write_err(dir, e, bytes.len()))?;
        let n = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let written = File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                // A large shard goes to disk now, behind the upload, not all at its seal: the
                // seal's fsync then finds little left to write. (When the writer is behind, the
                // seal does it all, as before.)
                if bytes.len() >= EARLY_WRITEBACK_BYTES {
                    let _ = self.early_sync.try_send(f);
                }
                Ok(())
            })
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(self.map_write_err(path, e, bytes.len()));
        }
        Ok(())
    }

    fn map_write_err(&self, path: &Path, e: std::io::Error, need: usize) -> ShardStoreError {
        if is_disk_full(&e) {
            ShardStoreError::Full {
                need: need as u64,
                free: self.free(),
                capacity: self.capacity,
                why: "the disk is full",
            }
        } else {
            ShardStoreError::Io { path: path.to_path_buf(), source: e }
        }
    }

    /// Stores shard `key` if `bytes` hash to `hash`. Storing the same bytes again is a no-op;
    /// different bytes for a shard already stored are refused ([`ShardStoreError::Exists`]):
    /// nobody can overwrite a shard, whoever signs the request.
    pub fn put_shard(&self, key: ShardKey, bytes: &[u8], hash: &[u8; 32]) -> Result<Written, ShardStoreError> {
        // Refused before it is hashed.
        if bytes.len() > MAX_SHARD_BYTES {
            return Err(too_large(bytes.len()));
        }
        self.put_hashed(key, &Hashed::new(bytes), hash)
    }

    /// [`ShardStore::put_shard`] for bytes hashed already (the node's API hashes every request
    /// body to check its signature): refused unless their hash is `hash`; not hashed again.
    pub fn put_hashed<B: AsRef<[u8]>>(
        &self,
        key: ShardKey,
        shard: &Hashed<B>,
        hash: &[u8; 32],
    ) -> Result<Written, ShardStoreError> {
        self.write_checked(key, shard, hash, false)
    }

    /// Stores shard `key` like [`ShardStore::put_hashed`], replacing a stored shard with other
    /// bytes: only for bytes the caller checked against the ledger (a repair of a committed
    /// version, whose manifest lists this hash), so what it replaces was wrong.
    pub fn replace_hashed<B: AsRef<[u8]>>(
        &self,
        key: ShardKey,
        shard: &Hashed<B>,
        hash: &[u8; 32],
    ) -> Result<Written, ShardStoreError> {
        self.write_checked(key, shard, hash, true)
    }

    fn write_checked<B: AsRef<[u8]>>(
        &self,
        key: ShardKey,
        shard: &Hashed<B>,
        hash: &[u8; 32],
        replace: bool,
    ) -> Result<Written, ShardStoreError> {
        let bytes = shard.bytes().as_ref();
        if bytes.len() > MAX_SHARD_BYTES {
            return Err(too_large(bytes.len()));
        }
        if shard.hash() != hash {
            return Err(ShardStoreError::HashMismatch {
                key: describe(&key),
                expected: hex::encode(hash),
                got: hex::encode(shard.hash()),
            });
        }
        // One writer at a time: the check of what is stored and the write are one step, so
        // two uploads of one shard cannot both count their bytes.
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.entry(&key)?;
        if let Some((len, h)) = previous {
            // The same shard again: kept only if the copy on disk still has its hash (one that
            // rotted, was cut short or vanished is written afresh).
            if h == *hash && len == bytes.len() as u64 && self.shard(&key).is_ok() {
                return Ok(Written::AlreadyHeld);
            }
            if h != *hash && !replace {
                return Err(ShardStoreError::Exists(describe(&key)));
            }
        }
        let freed = previous.map(|(len, _)| len).unwrap_or(0);
        self.reserve(bytes.len() as u64, freed)?;
        let path = self.shard_path(&key);
        let stored = self.write_file(&path, bytes).and_then(|()| {
            let mut value = Vec::with_capacity(40);
            value.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            value.extend_from_slice(hash);
            self.index_put(SHARDS, &key.to_bytes(), &value)
        });
        if let Err(e) = stored {
            self.unreserve(bytes.len() as u64);
            // The old entry's bytes were given back by the reservation; the file is gone now.
            if freed > 0 {
                let _ = self.index_remove(SHARDS, &key.to_bytes());
            }
            return Err(e);
        }
        Ok(Written::New)
    }

    fn index_put(&self, table: TableDefinition<'_, &[u8], &[u8]>, k: &[u8], v: &[u8]) -> Result<(), ShardStoreError> {
        let mut txn = self.db.begin_write().map_err(index_err)?;
        // Made durable by the seal that vouches for it.
        txn.set_durability(Durability::None).map_err(index_err)?;
        txn.open_table(table).map_err(index_err)?.insert(k, v).map_err(index_err)?;
        txn.commit().map_err(index_err)
    }

    fn index_remove(&self, table: TableDefinition<'_, &[u8], &[u8]>, k: &[u8]) -> Result<(), ShardStoreError> {
        let mut txn = self.db.begin_write().map_err(index_err)?;
        txn.set_durability(Durability::None).map_err(index_err)?;
        txn.open_table(table).map_err(index_err)?.remove(k).map_err(index_err)?;
        txn.commit().map_err(index_err)
    }

    /// The length and hash shard `key` was stored with.
    pub fn entry(&self, key: &ShardKey) -> Result<Option<(u64, [u8; 32])>, ShardStoreError> {
        let txn = self.db.begin_read().map_err(index_err)?;
        let table = txn.open_table(SHARDS).map_err(index_err)?;
        match table.get(&key.to_bytes()[..]).map_err(index_err)? {
            Some(v) => decode_entry(v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Shard `key`, checked against the hash it was stored with.
    pub fn shard(&self, key: &ShardKey) -> Result<Vec<u8>, ShardStoreError> {
        let (len, hash) = self.entry(key)?.ok_or_else(|| ShardStoreError::NotFound(describe(key)))?;
        let path = self.shard_path(key);
        let mut bytes = Vec::with_capacity(len as usize);
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(io_at(&path))?,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(ShardStoreError::Corrupt { key: describe(key), why: "its file is missing".into() });
            }
            Err(e) => return Err(ShardStoreError::Io { path, source: e }),
        };
        if bytes.len() as u64 != len {
            return Err(ShardStoreError::Corrupt {
                key: describe(key),
                why: format!("{} bytes on disk, {len} stored", bytes.len()),
            });
        }
        if blake3::hash(&bytes).as_bytes() != &hash {
            return Err(ShardStoreError::Corrupt { key: describe(key), why: "its bytes changed on disk".into() });
        }
        Ok(bytes)
    }

    /// The BLAKE3 hash of bytes `offset..offset + len` of shard `key` (an audit's answer), after
    /// checking the whole shard.
    pub fn range_hash(&self, key: &ShardKey, offset: u64, len: u64) -> Result<[u8; 32], ShardStoreError> {
        let bytes = self.shard(key)?;
        let end = offset.checked_add(len).filter(|e| *e <= bytes.len() as u64).ok_or_else(|| {
            ShardStoreError::Invalid(format!(
                "range {offset}+{len} is outside shard {} ({} bytes)",
                describe(key),
                bytes.len()
            ))
        })?;
        Ok(*blake3::hash(&bytes[offset as usize..end as usize]).as_bytes())
    }

    /// Stores an object version's manifest (its bytes, checked by the caller against the
    /// ledger's root). The same bytes again are a no-op; another manifest for a version that has
    /// one is refused ([`ShardStoreError::Exists`]).
    pub fn put_manifest(&self, version: &Version, bytes: &[u8]) -> Result<Written, ShardStoreError> {
        self.write_manifest(version, bytes, false)
    }

    /// Stores a manifest like [`ShardStore::put_manifest`], replacing another one: only for a
    /// manifest the caller checked against the ledger's root.
    pub fn replace_manifest(&self, version: &Version, bytes: &[u8]) -> Result<Written, ShardStoreError> {
        self.write_manifest(version, bytes, true)
    }

    fn write_manifest(&self, version: &Version, bytes: &[u8], replace: bool) -> Result<Written, ShardStoreError> {
        if bytes.len() > MAX_SHARD_BYTES {
            return Err(ShardStoreError::Invalid(format!("manifest of {} bytes is too large", bytes.len())));
        }
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = self.manifest(version)? {
            if existing == bytes {
                return Ok(Written::AlreadyHeld);
            }
            if !replace {
                return Err(ShardStoreError::Exists(format!("the manifest of {}", &hex::encode(version)[..16])));
            }
        }
        let previous = self.manifest_len(version)?;
        self.reserve(bytes.len() as u64, previous.unwrap_or(0))?;
        let path = self.version_dir(version).join("manifest");
        let stored = self
            .write_file(&path, bytes)
            .and_then(|()| self.index_put(MANIFESTS, version, &(bytes.len() as u64).to_be_bytes()));
        if let Err(e) = stored {
            self.unreserve(bytes.len() as u64);
            return Err(e);
        }
        Ok(Written::New)
    }

    fn manifest_len(&self, version: &Version) -> Result<Option<u64>, ShardStoreError> {
        let txn = self.db.begin_read().map_err(index_err)?;
        let table = txn.open_table(MANIFESTS).map_err(index_err)?;
        let len = table.get(&version[..]).map_err(index_err)?;
        len.map(|v| v.value().try_into().map(u64::from_be_bytes).map_err(index_err)).transpose()
    }

    /// The manifest stored for `version`, if any (the caller checks it against the ledger).
    pub fn manifest(&self, version: &Version) -> Result<Option<Vec<u8>>, ShardStoreError> {
        if self.manifest_len(version)?.is_none() {
            return Ok(None);
        }
        let path = self.version_dir(version).join("manifest");
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ShardStoreError::Io { path, source: e }),
        }
    }

    /// Makes shard `index` of every listed segment of `version` durable — each present with the
    /// expected hash — and returns their total length: what the node's receipt vouches for.
    ///
    /// A seal counts as a write of the version ([`ShardStore::age`] starts again): a receipt is
    /// signed now, so the version must outlive it even if its shards were written long before,
    /// and [`ShardStore::delete_if_idle`] cannot take it between the checks and the receipt.
    pub fn seal(&self, version: &Version, index: u8, expected: &[(u64, [u8; 32])]) -> Result<u64, ShardStoreError> {
        let dir = self.version_dir(version);
        let (total, paths) = {
            let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            self.check_sealable(version, index, expected)?
        };
        for path in &paths {
            let f = OpenOptions::new().read(true).open(path).map_err(io_at(path))?;
            self.sync(&f, path)?;
        }
        if let Ok(f) = File::open(dir.join("manifest")) {
            self.sync(&f, &dir)?;
        }
        let dirs = [Some(dir.as_path()), dir.parent(), dir.parent().and_then(Path::parent)];
        self.flush(dirs.into_iter().flatten().map(Path::to_path_buf))?;
        self.check_synced()?;
        Ok(total)
    }

    /// Checks what [`ShardStore::seal`] checks (every listed shard present with its hash) and
    /// marks the version written now; returns the shards' total length and their files. The
    /// caller holds the writing lock.
    fn check_sealable(
        &self,
        version: &Version,
        index: u8,
        expected: &[(u64, [u8; 32])],
    ) -> Result<(u64, Vec<PathBuf>), ShardStoreError> {
        let mut total = 0u64;
        let mut paths = Vec::with_capacity(expected.len());
        for (segment, hash) in expected {
            let key = ShardKey { version: *version, index, segment: *segment };
            let (len, stored) = self.entry(&key)?.ok_or_else(|| ShardStoreError::NotFound(describe(&key)))?;
            if stored != *hash {
                return Err(ShardStoreError::HashMismatch {
                    key: describe(&key),
                    expected: hex::encode(hash),
                    got: hex::encode(stored),
                });
            }
            paths.push(self.shard_path(&key));
            total += len;
        }
        let dir = self.version_dir(version);
        File::open(&dir).and_then(|d| d.set_modified(std::time::SystemTime::now())).map_err(io_at(&dir))?;
        Ok((total, paths))
    }

    /// [`ShardStore::seal`] for many versions at once (a batch of small objects): each checked
    /// as one seal is, then all made durable together — where `syncfs` is enough
    /// ([`ShardStore::whole_sync`]), one `syncfs` of the store's filesystem and one index commit
    /// (both shared with concurrent callers), instead of a sync per file and directory, which
    /// for a 4 KiB shard cost far more than writing it; elsewhere each file, then the
    /// directories and the index. Returns each version's total length, in order. The `syncfs`
    /// writes out whatever else is dirty on that filesystem too, so it is meant for small shards.
    pub fn seal_many(&self, seals: &[SealOf]) -> Result<Vec<u64>, ShardStoreError> {
        let mut totals = Vec::with_capacity(seals.len());
        let mut paths = Vec::new();
        {
            let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            for (version, index, expected) in seals {
                let (total, files) = self.check_sealable(version, *index, expected)?;
                totals.push(total);
                paths.extend(files);
                paths.push(self.version_dir(version).join("manifest"));
            }
        }
        if self.whole_sync {
            self.flush_with(std::iter::empty(), true)?;
        } else {
            // Each file, then its directories with the index (shared with concurrent seals).
            let mut dirs = BTreeSet::new();
            for path in &paths {
                match File::open(path) {
                    Ok(f) => self.sync(&f, path)?,
                    Err(e) => return Err(io_at(path)(e)),
                }
                let dir = path.parent().map(Path::to_path_buf);
                let parents = [dir.clone(), dir.as_deref().and_then(Path::parent).map(Path::to_path_buf)];
                dirs.extend(parents.into_iter().flatten());
            }
            self.flush(dirs)?;
        }
        self.check_synced()?;
        Ok(totals)
    }

    /// `syncfs` of the store's filesystem, on the descriptor held since the store was opened (so
    /// that a write error anywhere on the filesystem since then fails it); a failure poisons the
    /// store. Only called when [`ShardStore::whole_sync`] holds.
    fn sync_filesystem(&self) -> Result<(), ShardStoreError> {
        #[cfg(target_os = "linux")]
        {
            rustix::fs::syncfs(&self.fs_handle).map_err(|e| {
                self.sync_failed.store(true, Ordering::SeqCst);
                io_at(&self.dir)(e.into())
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            Err(io_at(&self.dir)(std::io::Error::other("no syncfs here")))
        }
    }

    /// `fsync`s `f`; a failure poisons the store ([`ShardStore::sync_failed`]): the pages it was
    /// writing may be lost although a later sync reports success.
    fn sync(&self, f: &File, path: &Path) -> Result<(), ShardStoreError> {
        f.sync_all().map_err(|e| {
            self.sync_failed.store(true, Ordering::SeqCst);
            io_at(path)(e)
        })
    }

    /// Refuses to vouch for anything once a sync failed ([`ShardStore::sync_failed`]).
    fn check_synced(&self) -> Result<(), ShardStoreError> {
        if self.sync_failed.load(Ordering::SeqCst) {
            return Err(ShardStoreError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other(
                    "an earlier write to this disk failed to reach it: the node seals nothing more until it is \
                     restarted and its disk checked",
                ),
            });
        }
        Ok(())
    }

    /// Makes `dirs` and every index write so far durable, sharing the work with concurrent
    /// callers: returns once a flush that started after this call has ended well, or with the
    /// error of one this call ran itself.
    fn flush(&self, dirs: impl IntoIterator<Item = PathBuf>) -> Result<(), ShardStoreError> {
        self.flush_with(dirs, false)
    }

    /// [`ShardStore::flush`], first syncing the whole filesystem when `whole` (concurrent
    /// batch seals share one `syncfs` as seals share their flush).
    fn flush_with(&self, dirs: impl IntoIterator<Item = PathBuf>, whole: bool) -> Result<(), ShardStoreError> {
        let mut g = self.flushes.lock().unwrap_or_else(|e| e.into_inner());
        g.dirs.extend(dirs);
        g.whole |= whole;
        g.asked += 1;
        let ticket = g.asked;
        loop {
            // After a failed flush nothing is vouched for, not even by a flush that then works:
            // the failure may have lost what it was syncing.
            self.check_synced()?;
            if g.done >= ticket {
                return match g.failed.iter().find(|(after, through)| *after < ticket && ticket <= *through) {
                    None => Ok(()),
                    Some(_) => Err(ShardStoreError::Io {
                        path: self.dir.clone(),
                        source: std::io::Error::other(
                            "the flush that was to make this seal durable failed; seal again",
                        ),
                    }),
                };
            }
            if g.running {
                g = self.flushed.wait(g).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            g.running = true;
            let through = g.asked;
            let dirs = std::mem::take(&mut g.dirs);
            let whole = std::mem::take(&mut g.whole);
            drop(g);
            let run = FlushRun(self);
            let r = if whole { self.sync_filesystem() } else { Ok(()) }.and_then(|()| self.flush_now(&dirs));
            {
                // A failed sync poisoned the store (`flush_now`); anything else (a directory that
                // could not be opened) fails this flush's seals, which may be tried again.
                let mut g = self.flushes.lock().unwrap_or_else(|e| e.into_inner());
                if r.is_err() {
                    let after = g.done;
                    g.failed.push_back((after, through));
                    if g.failed.len() > MAX_FAILED_FLUSHES {
                        g.failed.pop_front();
                    }
                }
                g.done = g.done.max(through);
            }
            drop(run);
            r?;
            g = self.flushes.lock().unwrap_or_else(|e| e.into_inner());
        }
    }

    /// One flush: fsync each directory (one deleted meanwhile has nothing left to make durable),
    /// then an empty durable commit, which makes every earlier non-durable one durable.
    fn flush_now(&self, dirs: &BTreeSet<PathBuf>) -> Result<(), ShardStoreError> {
        self.flush_runs.fetch_add(1, Ordering::Relaxed);
        for d in dirs {
            match File::open(d) {
                Ok(f) => self.sync(&f, d)?,
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(d)(e)),
            }
        }
        let mut txn = self.db.begin_write().map_err(index_err)?;
        txn.set_durability(Durability::Immediate).map_err(index_err)?;
        // A durable commit that fails may have failed its fsync: poisoned like one.
        txn.commit().map_err(|e| {
            self.sync_failed.store(true, Ordering::SeqCst);
            index_err(e)
        })
    }

    /// Deletes everything of `version` (garbage collection once the ledger no longer lists it);
    /// returns the bytes freed.
    pub fn delete(&self, version: &Version) -> Result<u64, ShardStoreError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.delete_locked(version)
    }

    /// Deletes `version` like [`ShardStore::delete`] if nothing was written to or sealed in it
    /// for `idle` ([`ShardStore::age`]), checked and done as one step with writes and seals held
    /// off; returns the bytes freed, or `None` when it is younger (or gone).
    pub fn delete_if_idle(&self, version: &Version, idle: std::time::Duration) -> Result<Option<u64>, ShardStoreError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        match self.age(version) {
            Some(age) if age >= idle => self.delete_locked(version).map(Some),
            _ => Ok(None),
        }
    }

    fn delete_locked(&self, version: &Version) -> Result<u64, ShardStoreError> {
        let mut freed = 0u64;
        let txn = self.db.begin_write().map_err(index_err)?;
        {
            let mut shards = txn.open_table(SHARDS).map_err(index_err)?;
            let end = last_key_of(version);
            let keys: Vec<Vec<u8>> = shards
                .range(&version[..]..=&end[..])
                .map_err(index_err)?
                .map(|r| r.map(|(k, v)| (k.value().to_vec(), decode_entry(v.value()).map(|e| e.0).unwrap_or(0))))
                .map(|r| {
                    r.map(|(k, len)| {
                        freed += len;
                        k
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(index_err)?;
            for k in keys {
                shards.remove(&k[..]).map_err(index_err)?;
            }
            let mut manifests = txn.open_table(MANIFESTS).map_err(index_err)?;
            if let Some(v) = manifests.remove(&version[..]).map_err(index_err)? {
                freed += v.value().try_into().map(u64::from_be_bytes).unwrap_or(0);
            }
        }
        txn.commit().map_err(index_err)?;
        let dir = self.version_dir(version);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(ShardStoreError::Io { path: dir, source: e }),
        }
        self.unreserve(freed);
        Ok(freed)
    }

    /// Every object version with files on disk (indexed or not): what garbage collection
    /// compares with the ledger.
    pub fn versions(&self) -> Result<Vec<Version>, ShardStoreError> {
        let mut out = Vec::new();
        let shards = self.dir.join("shards");
        for prefix in fs::read_dir(&shards).map_err(io_at(&shards))? {
            let prefix = prefix.map_err(io_at(&shards))?.path();
            let Ok(entries) = fs::read_dir(&prefix) else { continue };
            for entry in entries.flatten() {
                let mut v = [0u8; 32];
                if hex::decode_to_slice(entry.file_name().as_encoded_bytes(), &mut v).is_ok() {
                    out.push(v);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// How long ago anything of `version` was last written (its directory's modification time).
    pub fn age(&self, version: &Version) -> Option<std::time::Duration> {
        let modified = fs::metadata(self.version_dir(version)).and_then(|m| m.modified()).ok()?;
        Some(modified.elapsed().unwrap_or_default())
    }

    /// The shards indexed for `version`: `(index, segment)` pairs.
    pub fn shards_of(&self, version: &Version) -> Result<Vec<(u8, u64)>, ShardStoreError> {
        let txn = self.db.begin_read().map_err(index_err)?;
        let table = txn.open_table(SHARDS).map_err(index_err)?;
        let end = last_key_of(version);
        let mut out = Vec::new();
        for row in table.range(&version[..]..=&end[..]).map_err(index_err)? {
            let (k, _) = row.map_err(index_err)?;
            if let Some(key) = ShardKey::from_bytes(k.value()) {
                out.push((key.index, key.segment));
            }
        }
        Ok(out)
    }

    /// Bytes stored for `version`: its shards and manifest.
    pub fn version_bytes(&self, version: &Version) -> Result<u64, ShardStoreError> {
        let txn = self.db.begin_read().map_err(index_err)?;
        let table = txn.open_table(SHARDS).map_err(index_err)?;
        let end = last_key_of(version);
        let mut total = 0u64;
        for row in table.range(&version[..]..=&end[..]).map_err(index_err)? {
            let (_, v) = row.map_err(index_err)?;
            total = total.saturating_add(decode_entry(v.value())?.0);
        }
        Ok(total.saturating_add(self.manifest_len(version)?.unwrap_or(0)))
    }

    /// The object `version` was last sealed for, as [`ShardStore::note_object`] kept it (`None`
    /// for a version never sealed, or sealed by an older version of this store).
    pub fn object_of(&self, version: &Version) -> Option<[u8; 32]> {
        fs::read(self.version_dir(version).join(OBJECT_FILE)).ok()?.try_into().ok()
    }

    /// Keeps which object `version` is a version of, beside its shards (made durable by its
    /// seal's directory sync): the collector checks it against the ledger before deleting.
    pub fn note_object(&self, version: &Version, object: &[u8; 32]) -> Result<(), ShardStoreError> {
        if self.object_of(version).as_ref() == Some(object) {
            return Ok(());
        }
        let path = self.version_dir(version).join(OBJECT_FILE);
        self.write_file(&path, object)
    }
}

/// The largest shard key of `version`: its shards' index rows are `version..=last_key_of(version)`.
fn last_key_of(version: &Version) -> [u8; 41] {
    let mut end = [0xff; 41];
    end[..32].copy_from_slice(version);
    end
}

/// The file in a version's directory naming its object ([`ShardStore::note_object`]).
const OBJECT_FILE: &str = "object";

fn decode_entry(v: &[u8]) -> Result<(u64, [u8; 32]), ShardStoreError> {
    if v.len() != 40 {
        return Err(ShardStoreError::Index(format!("a shard entry is 40 bytes, not {}", v.len())));
    }
    let len = u64::from_be_bytes(v[..8].try_into().map_err(index_err)?);
    let hash: [u8; 32] = v[8..].try_into().map_err(index_err)?;
    Ok((len, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_bytes_are_stored_under_their_own_hash_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path(), 1 << 20).unwrap();
        let shard = Hashed::new(vec![6u8; 1_000]);
        assert_eq!(shard.hash(), blake3::hash(&[6u8; 1_000]).as_bytes());
        let key = ShardKey { version: [2; 32], index: 1, segment: 0 };
        let e = store.put_hashed(key, &shard, &[9; 32]).unwrap_err();
        assert!(matches!(e, ShardStoreError::HashMismatch { .. }), "{e}");
        assert!(store.entry(&key).unwrap().is_none());
        assert_eq!(store.put_hashed(key, &shard, shard.hash()).unwrap(), Written::New);
        assert_eq!(store.shard(&key).unwrap(), vec![6u8; 1_000]);
        assert_eq!(store.put_hashed(key, &shard, shard.hash()).unwrap(), Written::AlreadyHeld);
        let other = Hashed::new(vec![7u8; 1_000]);
        assert!(matches!(store.put_hashed(key, &other, other.hash()), Err(ShardStoreError::Exists(_))));
        assert_eq!(store.replace_hashed(key, &other, other.hash()).unwrap(), Written::New);
        assert_eq!(store.shard(&key).unwrap(), vec![7u8; 1_000]);
    }

    #[test]
    fn after_a_failed_sync_no_seal_is_vouched_for_even_if_the_next_flush_works() {
        let dir = tempfile::tempdir().unwrap();
        let store = ShardStore::open(dir.path(), 1 << 20).unwrap();
        let shard = vec![5u8; 1_000];
        let hash = *blake3::hash(&shard).as_bytes();
        store.put_shard(ShardKey { version: [1; 32], index: 0, segment: 0 }, &shard, &hash).unwrap();
        store.seal(&[1; 32], 0, &[(0, hash)]).unwrap();
        // A directory that cannot be opened (a file stands in its path): the flush fails, and
        // nothing was lost, so the store goes on.
        std::fs::write(dir.path().join("a-file"), b"x").unwrap();
        assert!(store.flush([dir.path().join("a-file").join("dir")]).is_err());
        assert!(!store.sync_failed.load(Ordering::SeqCst));
        store.seal(&[1; 32], 0, &[(0, hash)]).unwrap();
        // A seal waiting on a flush that fails gets its error, whoever ran it: here a flush is
        // under way (as another seal would run it) when the waiter asks, and it fails.
        store.flushes.lock().unwrap().running = true;
        let waiter = std::thread::scope(|scope| {
            let w = scope.spawn(|| store.flush([dir.path().to_path_buf()]));
            // Its ticket is taken under the lock it then waits on.
            while {
                let g = store.flushes.lock().unwrap();
                g.asked == g.done
            } {
                std::thread::yield_now();
            }
            {
                let mut g = store.flushes.lock().unwrap();
                let (after, through) = (g.done, g.asked);
                g.failed.push_back((after, through));
                g.done = through;
                g.running = false;
            }
            store.flushed.notify_all();
            w.join().unwrap()
        });
        assert!(waiter.unwrap_err().to_string().contains("seal again"));
        store.seal(&[1; 32], 0, &[(0, hash)]).unwrap();
        // A failed fsync (planted where `sync` records one: this box has no way to make a real
        // one fail): every later flush and seal is refused, though their own syncs would work.
        store.sync_failed.store(true, Ordering::SeqCst);
        let e = store.flush([dir.path().to_path_buf()]).unwrap_err();
        assert!(e.to_string().contains("seals nothing more"), "{e}");
        let e = store.seal(&[1; 32], 0, &[(0, hash)]).unwrap_err();
        assert!(e.to_string().contains("seals nothing more"), "{e}");
        // Reads go on.
        assert_eq!(store.shard(&ShardKey { version: [1; 32], index: 0, segment: 0 }).unwrap(), shard);
        assert!(!store.flushes.lock().unwrap().running, "the failed flush let go");
        let e = store.seal_many(&[([1; 32], 0, vec![(0, hash)])]).unwrap_err();
        assert!(e.to_string().contains("seals nothing more"), "{e}");
    }

    #[test]
    fn many_versions_seal_together_each_checked_as_one_seal_is() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ShardStore::open(dir.path(), 1 << 20).unwrap();
        // On this box (Linux 6, one filesystem) one `syncfs` is enough.
        assert!(store.whole_sync);
        for whole in [true, false] {
            store.whole_sync = whole;
            seal_many_checks(&store, if whole { 1 } else { 10 });
        }
    }

    /// One round of [`many_versions_seal_together_each_checked_as_one_seal_is`], with versions
    /// `[first; 32]`….
    fn seal_many_checks(store: &ShardStore, first: u8) {
        let mut seals = Vec::new();
        for v in first..first + 3 {
            let shard = vec![v; 100 * usize::from(v - first + 1)];
            let hash = *blake3::hash(&shard).as_bytes();
            store.put_manifest(&[v; 32], b"manifest").unwrap();
            store.put_shard(ShardKey { version: [v; 32], index: v, segment: 0 }, &shard, &hash).unwrap();
            seals.push(([v; 32], v, vec![(0, hash)]));
        }
        // Written an hour ago, as far as the collector can tell.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3_600);
        File::open(store.version_dir(&[first + 1; 32])).unwrap().set_modified(old).unwrap();
        assert!(store.age(&[first + 1; 32]).is_some_and(|a| a > std::time::Duration::from_secs(3_000)));
        let runs = store.flush_runs.load(Ordering::Relaxed);
        assert_eq!(store.seal_many(&seals).unwrap(), vec![100, 200, 300]);
        // One durable index commit for the lot (the filesystem sync cannot be observed here).
        assert_eq!(store.flush_runs.load(Ordering::Relaxed), runs + 1);
        // Sealed versions count as written now (the collector's clock starts again).
        assert!(store.age(&[first + 1; 32]).is_some_and(|a| a < std::time::Duration::from_secs(60)));
        let runs = store.flush_runs.load(Ordering::Relaxed);
        // One missing shard, or one with another hash, refuses the whole call, naming it.
        let mut missing = seals.clone();
        missing.push(([first + 9; 32], 0, vec![(0, [0; 32])]));
        assert!(matches!(store.seal_many(&missing), Err(ShardStoreError::NotFound(_))));
        let mut wrong = seals.clone();
        wrong[1].2[0].1 = [7; 32];
        assert!(matches!(store.seal_many(&wrong), Err(ShardStoreError::HashMismatch { .. })));
        assert_eq!(store.flush_runs.load(Ordering::Relaxed), runs, "nothing synced for a refused call");
    }
}
