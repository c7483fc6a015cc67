//! Where a node keeps its finalized blocks: an append-only log of `(block, certificate)` records
//! in the ledger export format, so `archipel ledger export` is the genesis followed by this log.
//!
//! Two implementations behind one trait: a file (nodes) and memory (simulator and unit tests);
//! both pass the same conformance tests. An append is not durable until a [`BlockStore::sync`]
//! that follows it has answered: the applier syncs before it tells marshal a block is processed,
//! so after a power loss the log is never behind what marshal considers delivered.
//! [`MemoryStore::crash`] drops what was not synced, as a power loss does to the file.

use archipel_ledger::export::{MAX_RECORD_BYTES, put_record, take_record};
use futures::channel::oneshot;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

/// A finalized block's bytes and its finality certificate's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The encoded block.
    pub block: Vec<u8>,
    /// The encoded finality certificate.
    pub certificate: Vec<u8>,
}

/// The answer to [`BlockStore::sync`]: the height up to which blocks are durable, or why the
/// sync failed.
pub type Synced = oneshot::Receiver<Result<u64, String>>;

/// An append-only store of finalized blocks, indexed by height (1 = first block).
pub trait BlockStore: Send + 'static {
    /// Number of blocks stored (= the height of the last one).
    fn height(&self) -> u64;
    /// Appends the block at `height() + 1`. It is readable at once but durable only once a later
    /// [`BlockStore::sync`] answers.
    fn append(&mut self, record: &Record) -> Result<(), String>;
    /// The block at `height`, if stored.
    fn get(&self, height: u64) -> Result<Option<Record>, String>;
    /// The raw bytes of records `from..=to` (clamped to what is stored) as they appear in an
    /// export.
    fn raw_range(&self, from: u64, to: u64) -> Result<Vec<u8>, String>;
    /// What [`BlockStore::raw_range`] would read for `from..=to`, cut to the whole records that
    /// fit in `max_bytes` (at least one), as a read to run later: a store on disk returns one
    /// that reads the file without the store (so without the chain's lock, which consensus
    /// needs); the default reads now and ignores `max_bytes` (stores in memory, for tests).
    fn raw_range_reader(&self, from: u64, to: u64, max_bytes: u64) -> RangeRead {
        let _ = max_bytes;
        let last = to.min(self.height());
        let bytes = self.raw_range(from, to);
        let len = bytes.as_ref().map_or(0, |b| b.len() as u64);
        RangeRead { last, len, read: Box::new(move || bytes) }
    }
    /// Starts making every block appended so far durable and answers, once they are, with the
    /// height they reach. Cheap under a lock: the sync runs elsewhere, and requests that arrive
    /// while one runs share the next.
    fn sync(&mut self) -> Synced;
}

/// A read of stored records, run after the store's lock is released (see
/// [`BlockStore::raw_range_reader`]).
pub type RangeReader = Box<dyn FnOnce() -> Result<Vec<u8>, String> + Send>;

/// A planned read: the last height it covers (below `from` when there is nothing), its size,
/// and the read.
pub struct RangeRead {
    /// Height of the last record read.
    pub last: u64,
    /// Bytes the read returns.
    pub len: u64,
    /// The read.
    pub read: RangeReader,
}

impl RangeRead {
    /// A read of nothing, ending at `last`.
    pub fn nothing(last: u64) -> Self {
        RangeRead { last, len: 0, read: Box::new(|| Ok(Vec::new())) }
    }
}

impl std::fmt::Debug for RangeRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeRead").field("last", &self.last).field("len", &self.len).finish_non_exhaustive()
    }
}

fn answered(result: Result<u64, String>) -> Synced {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(result);
    rx
}

/// Blocks in memory, on a simulated disk: clones share the disk, and [`MemoryStore::crash`]
/// keeps only the blocks a sync made durable, as a power loss would.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    disk: Arc<Mutex<MemoryDisk>>,
}

#[derive(Debug, Default)]
struct MemoryDisk {
    records: Vec<Record>,
    /// Records made durable by a sync.
    synced: usize,
}

impl MemoryStore {
    fn disk(&self) -> std::sync::MutexGuard<'_, MemoryDisk> {
        crate::lock(&self.disk)
    }

    /// A power loss: every block appended since the last sync is gone. Returns the height left.
    pub fn crash(&self) -> u64 {
        let mut d = self.disk();
        let synced = d.synced;
        d.records.truncate(synced);
        synced as u64
    }

    /// Keeps only the blocks up to `height`, as a disk that acknowledged syncs it never did
    /// (or a log written by an older version that synced less often) would after a power loss.
    /// Returns the height left.
    pub fn truncate(&self, height: u64) -> u64 {
        let mut d = self.disk();
        let keep = (height as usize).min(d.records.len());
        d.records.truncate(keep);
        d.synced = d.synced.min(keep);
        keep as u64
    }

    /// Height of the last block a sync made durable.
    pub fn synced_height(&self) -> u64 {
        self.disk().synced as u64
    }
}

impl BlockStore for MemoryStore {
    fn height(&self) -> u64 {
        self.disk().records.len() as u64
    }
    fn append(&mut self, record: &Record) -> Result<(), String> {
        self.disk().records.push(record.clone());
        Ok(())
    }
    fn get(&self, height: u64) -> Result<Option<Record>, String> {
        Ok(height.checked_sub(1).and_then(|i| self.disk().records.get(i as usize).cloned()))
    }
    fn raw_range(&self, from: u64, to: u64) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let take = to.saturating_sub(from.max(1)) + 1;
        for r in self.disk().records.iter().skip(from.saturating_sub(1) as usize).take(take as usize) {
            put_record(&mut out, &r.block);
            put_record(&mut out, &r.certificate);
        }
        Ok(out)
    }
    fn sync(&mut self) -> Synced {
        let mut d = self.disk();
        d.synced = d.records.len();
        answered(Ok(d.synced as u64))
    }
}

/// A request to the sync thread: the height appended when it was made, and where to answer.
type SyncRequest = (u64, oneshot::Sender<Result<u64, String>>);

/// Blocks in a file, with an in-memory index of record offsets.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    file: File,
    /// Offset of each block's record; one extra entry: the end of the log.
    offsets: Vec<u64>,
    /// Requests to the thread that syncs the file (an fsync on a busy disk must stall neither the
    /// chain's lock nor a runtime thread).
    syncer: mpsc::Sender<SyncRequest>,
    /// Why appends are refused: a failed write could not be cut back off the end of the file.
    broken: Option<String>,
}

impl FileStore {
    /// Opens (or creates) the log at `path`. A torn last record (a crash mid-append), or a tail
    /// of zeros (a power loss after the file grew but before its data reached the disk), is moved
    /// to `<path>.torn-<offset>` and cut off (the network still has those blocks); anything else
    /// that does not parse is an error naming the height, and nothing is changed.
    pub fn open(path: &Path) -> Result<Self, String> {
        let err = |e: std::io::Error| format!("block log {}: {e}", path.display());
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let mut offsets = vec![0u64];
        let mut at = 0usize;
        while at < bytes.len() {
            let start = at;
            // No block encodes to nothing: a zero length starts a zeroed tail, not a record.
            let zeroed = bytes[start..].iter().take(4).all(|b| *b == 0);
            let ok = if zeroed {
                Err(String::from("a zero length"))
            } else {
                take_record(&bytes, &mut at, MAX_RECORD_BYTES)
                    .and_then(|_| take_record(&bytes, &mut at, MAX_RECORD_BYTES))
            };
            match ok {
                Ok(_) => offsets.push(at as u64),
                Err(e) if e.starts_with("truncated") || (zeroed && bytes[start..].iter().all(|b| *b == 0)) => {
                    let aside = PathBuf::from(format!("{}.torn-{start}", path.display()));
                    tracing::warn!(path = %path.display(), height = offsets.len(), aside = %aside.display(), "moving a torn record at the end of the block log aside");
                    std::fs::write(&aside, &bytes[start..]).map_err(err)?;
                    file.set_len(start as u64).map_err(err)?;
                    file.sync_all().map_err(err)?;
                    break;
                }
                Err(e) => return Err(format!("block log {}: block {}: {e}", path.display(), offsets.len())),
            }
        }
        let syncer = spawn_syncer(&file, path)?;
        Ok(FileStore { path: path.to_path_buf(), file, offsets, syncer, broken: None })
    }
}

/// Starts the thread that syncs the log at `path`; it ends when the store is dropped.
fn spawn_syncer(file: &File, path: &Path) -> Result<mpsc::Sender<SyncRequest>, String> {
    let file = file.try_clone().map_err(|e| format!("block log {}: {e}", path.display()))?;
    let (tx, rx) = mpsc::channel::<SyncRequest>();
    let shown = path.display().to_string();
    std::thread::Builder::new()
        .name("block-log-sync".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                // Everything asked for while the last sync ran is covered by this one.
                let batch: Vec<SyncRequest> = std::iter::once(first).chain(rx.try_iter()).collect();
                let result = file.sync_data().map_err(|e| format!("cannot sync the block log {shown}: {e}"));
                for (height, answer) in batch {
                    let _ = answer.send(result.clone().map(|()| height));
                }
            }
        })
        .map_err(|e| format!("block log {}: cannot start its sync thread: {e}", path.display()))?;
    Ok(tx)
}

impl BlockStore for FileStore {
    fn height(&self) -> u64 {
        self.offsets.len() as u64 - 1
    }

    fn append(&mut self, record: &Record) -> Result<(), String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        let mut out = Vec::with_capacity(record.block.len() + record.certificate.len() + 8);
        put_record(&mut out, &record.block);
        put_record(&mut out, &record.certificate);
        let end = self.offsets.last().copied().unwrap_or(0);
        if let Err(e) = self.file.write_all(&out) {
            // Part of the record may have reached the file: cut it off, or the next append would
            // land behind garbage.
            let why =
                format!("cannot append block {} to the block log {}: {e}", self.height() + 1, self.path.display());
            if let Err(cut) = self.file.set_len(end) {
                self.broken = Some(format!(
                    "{why}; cutting the partial record off failed too ({cut}): restart the node (the torn record is moved aside on start)"
                ));
            }
            return Err(why);
        }
        self.offsets.push(end + out.len() as u64);
        Ok(())
    }

    fn get(&self, height: u64) -> Result<Option<Record>, String> {
        if height == 0 || height > self.height() {
            return Ok(None);
        }
        let (start, end) = (self.offsets[height as usize - 1], self.offsets[height as usize]);
        let bytes = read_range(&self.path, start, end)?;
        let mut at = 0;
        let block = take_record(&bytes, &mut at, MAX_RECORD_BYTES)?.to_vec();
        let certificate = take_record(&bytes, &mut at, MAX_RECORD_BYTES)?.to_vec();
        Ok(Some(Record { block, certificate }))
    }

    fn raw_range(&self, from: u64, to: u64) -> Result<Vec<u8>, String> {
        let from = from.max(1);
        let to = to.min(self.height());
        if from > to {
            return Ok(Vec::new());
        }
        read_range(&self.path, self.offsets[from as usize - 1], self.offsets[to as usize])
    }

    fn raw_range_reader(&self, from: u64, to: u64, max_bytes: u64) -> RangeRead {
        let (from, to) = (from.max(1), to.min(self.height()));
        if from > to {
            return RangeRead::nothing(from - 1);
        }
        let start = self.offsets[from as usize - 1];
        // The last whole record within `max_bytes`, at least the first.
        let within = self.offsets[from as usize..=to as usize].partition_point(|end| end - start <= max_bytes);
        let to = from - 1 + (within as u64).max(1);
        // The log only grows at its end (a torn tail is cut off only when the log is opened), so
        // the bytes of stored records stay where they are after the lock is released.
        let (path, end) = (self.path.clone(), self.offsets[to as usize]);
        RangeRead { last: to, len: end - start, read: Box::new(move || read_range(&path, start, end)) }
    }

    fn sync(&mut self) -> Synced {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError((_, tx))) = self.syncer.send((self.height(), tx)) {
            let _ = tx.send(Err(format!("the sync thread of the block log {} is gone", self.path.display())));
        }
        rx
    }
}

fn read_range(path: &Path, start: u64, end: u64) -> Result<Vec<u8>, String> {
    let err = |e: std::io::Error| format!("cannot read block log {}: {e}", path.display());
    let mut f = File::open(path).map_err(err)?;
    f.seek(SeekFrom::Start(start)).map_err(err)?;
    let mut out = vec![0u8; (end - start) as usize];
    f.read_exact(&mut out).map_err(err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u8) -> Record {
        Record { block: vec![i; 10 + i as usize], certificate: vec![0xc0 | i; 3] }
    }

    fn synced(store: &mut dyn BlockStore) -> Result<u64, String> {
        futures::executor::block_on(store.sync()).map_err(|_| "the sync was dropped".to_string())?
    }

    /// The behaviour both stores must share.
    fn conformance(store: &mut dyn BlockStore) {
        assert_eq!(store.height(), 0);
        assert_eq!(store.get(1).unwrap(), None);
        assert_eq!(synced(store), Ok(0), "an empty log syncs");
        for i in 1..=5 {
            store.append(&record(i)).unwrap();
        }
        assert_eq!(store.height(), 5);
        assert_eq!(synced(store), Ok(5), "a sync answers with the height it made durable");
        assert_eq!(store.get(3).unwrap(), Some(record(3)));
        assert_eq!(store.get(0).unwrap(), None);
        assert_eq!(store.get(6).unwrap(), None);
        let raw = store.raw_range(4, 100).unwrap();
        let mut at = 0;
        assert_eq!(take_record(&raw, &mut at, 100).unwrap(), record(4).block.as_slice());
        assert_eq!(store.raw_range(9, 100).unwrap(), Vec::<u8>::new());
        let two = store.raw_range(2, 3).unwrap();
        let mut at = 0;
        for i in 2..=3 {
            assert_eq!(take_record(&two, &mut at, 100).unwrap(), record(i).block.as_slice());
            assert_eq!(take_record(&two, &mut at, 100).unwrap(), record(i).certificate.as_slice());
        }
        assert_eq!(at, two.len());
        // Concurrent requests are all answered.
        let (a, b) = (store.sync(), store.sync());
        assert_eq!(futures::executor::block_on(async { (a.await, b.await) }), (Ok(Ok(5)), Ok(Ok(5))));
        // A reader taken now reads the same bytes later, after more appends.
        let (later, empty) = (store.raw_range_reader(2, 3, u64::MAX), store.raw_range_reader(9, 100, u64::MAX));
        store.append(&record(6)).unwrap();
        assert_eq!((later.last, later.len), (3, two.len() as u64));
        assert_eq!((later.read)().unwrap(), two);
        assert_eq!((empty.len, (empty.read)().unwrap()), (0, Vec::<u8>::new()));
        assert_eq!((store.raw_range_reader(5, 6, u64::MAX).read)().unwrap(), store.raw_range(5, 6).unwrap());
    }

    #[test]
    fn memory_store_conforms() {
        conformance(&mut MemoryStore::default());
    }

    #[test]
    fn a_memory_store_crash_keeps_only_synced_blocks() {
        let mut s = MemoryStore::default();
        let disk = s.clone();
        for i in 1..=3 {
            s.append(&record(i)).unwrap();
        }
        assert_eq!(synced(&mut s), Ok(3));
        s.append(&record(4)).unwrap();
        assert_eq!((disk.height(), disk.synced_height()), (4, 3), "clones share the disk");
        assert_eq!(disk.crash(), 3);
        assert_eq!(s.height(), 3);
        assert_eq!(s.get(4).unwrap(), None);
        s.append(&record(4)).unwrap();
        assert_eq!(s.get(4).unwrap(), Some(record(4)));
    }

    #[test]
    fn file_store_conforms_reopens_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks.log");
        conformance(&mut FileStore::open(&path).unwrap());
        let s = FileStore::open(&path).unwrap();
        assert_eq!(s.height(), 6);
        assert_eq!(s.get(6).unwrap(), Some(record(6)));
        // Reads cut to whole records within a byte budget, at least one.
        let two = s.raw_range(2, 3).unwrap().len() as u64;
        let cut = s.raw_range_reader(2, 6, two + 5);
        assert_eq!((cut.last, cut.len), (3, two));
        assert_eq!((cut.read)().unwrap(), s.raw_range(2, 3).unwrap());
        assert_eq!(s.raw_range_reader(2, 6, 1).last, 2, "at least one record");
        // A crash mid-append leaves half a record: it is cut and the log stays usable.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 50, 1, 2]).unwrap();
        drop(f);
        let mut s = FileStore::open(&path).unwrap();
        assert_eq!(s.height(), 6);
        s.append(&record(7)).unwrap();
        assert_eq!(FileStore::open(&path).unwrap().get(7).unwrap(), Some(record(7)));
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".torn-"))
            .collect();
        assert_eq!(std::fs::read(aside[0].path()).unwrap(), vec![0, 0, 0, 50, 1, 2], "the torn bytes are kept aside");
        // A corrupt length in the middle is an error naming the block, and nothing is cut.
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        bytes[0] = 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let e = FileStore::open(&path).unwrap_err();
        assert!(e.contains("block 1"), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, len);
    }

    #[test]
    fn a_zeroed_tail_from_a_power_loss_is_cut_but_zeros_inside_the_log_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks.log");
        let mut s = FileStore::open(&path).unwrap();
        for i in 1..=2 {
            s.append(&record(i)).unwrap();
        }
        drop(s);
        // The file grew but its last blocks' data never reached the disk.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0; 100]).unwrap();
        drop(f);
        let mut s = FileStore::open(&path).unwrap();
        assert_eq!(s.height(), 2);
        s.append(&record(3)).unwrap();
        drop(s);
        assert_eq!(FileStore::open(&path).unwrap().get(3).unwrap(), Some(record(3)));
        // Zeros followed by data are not a power loss: refused, nothing cut.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 0, 7]).unwrap();
        drop(f);
        let e = FileStore::open(&path).unwrap_err();
        assert!(e.contains("block 4") && e.contains("zero length"), "{e}");
    }
}
