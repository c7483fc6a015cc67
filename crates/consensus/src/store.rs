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
use std::io::{Read as _, Write as _};
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

/// An append-only store of finalized blocks, indexed by height. A log holds every block from
/// the first (height 1), or — on a node that joined by state sync or prunes old blocks — from
/// [`BlockStore::first`].
pub trait BlockStore: Send + 'static {
    /// The height of the last block stored (the first height less one when it holds none).
    fn height(&self) -> u64;
    /// The height of the first block the log holds or will hold (1: the log starts at the
    /// genesis' child).
    fn first(&self) -> u64 {
        1
    }
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
    /// The first half of dropping every block below `keep_from` (the last block always stays):
    /// a job that writes the blocks kept to a new log, to run without the store (outside the
    /// chain's lock), then handed to [`BlockStore::prune_finish`]. `None` when there is nothing
    /// to drop.
    fn prune_plan(&self, keep_from: u64) -> Option<PruneJob> {
        let keep_from = keep_from.min(self.height());
        (keep_from > self.first()).then(|| -> PruneJob { Box::new(move || Ok(Pruned { keep_from, file: None })) })
    }
    /// The second half: takes the new log in place of the old one (with any block appended
    /// since the plan). Returns the new first height.
    fn prune_finish(&mut self, pruned: Pruned) -> Result<u64, String>;
}

/// A prune's slow half (see [`BlockStore::prune_plan`]).
pub type PruneJob = Box<dyn FnOnce() -> Result<Pruned, String> + Send>;

/// What a prune's slow half made: the first height kept, and the new log's file, if the store
/// keeps one.
#[derive(Debug)]
pub struct Pruned {
    keep_from: u64,
    /// The new log's path and the offset in the old log its copy ends at.
    file: Option<(PathBuf, u64)>,
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
    /// Height of `records[0]` less one.
    before: u64,
    records: Vec<Record>,
    /// Records made durable by a sync.
    synced: usize,
}

impl MemoryStore {
    fn disk(&self) -> std::sync::MutexGuard<'_, MemoryDisk> {
        crate::lock(&self.disk)
    }

    /// An empty log whose first block will be at `first` (a node that joined by state sync).
    pub fn starting_at(first: u64) -> Self {
        let s = Self::default();
        s.disk().before = first.max(1) - 1;
        s
    }

    /// A power loss: every block appended since the last sync is gone. Returns the height left.
    pub fn crash(&self) -> u64 {
        let mut d = self.disk();
        let synced = d.synced;
        d.records.truncate(synced);
        d.before + synced as u64
    }

    /// Keeps only the blocks up to `height`, as a disk that acknowledged syncs it never did
    /// (or a log written by an older version that synced less often) would after a power loss.
    /// Returns the height left.
    pub fn truncate(&self, height: u64) -> u64 {
        let mut d = self.disk();
        let keep = (height.saturating_sub(d.before) as usize).min(d.records.len());
        d.records.truncate(keep);
        d.synced = d.synced.min(keep);
        d.before + keep as u64
    }

    /// Height of the last block a sync made durable.
    pub fn synced_height(&self) -> u64 {
        let d = self.disk();
        d.before + d.synced as u64
    }
}

impl BlockStore for MemoryStore {
    fn height(&self) -> u64 {
        let d = self.disk();
        d.before + d.records.len() as u64
    }
    fn first(&self) -> u64 {
        self.disk().before + 1
    }
    fn append(&mut self, record: &Record) -> Result<(), String> {
        self.disk().records.push(record.clone());
        Ok(())
    }
    fn get(&self, height: u64) -> Result<Option<Record>, String> {
        let d = self.disk();
        Ok(height.checked_sub(d.before + 1).and_then(|i| d.records.get(i as usize).cloned()))
    }
    fn raw_range(&self, from: u64, to: u64) -> Result<Vec<u8>, String> {
        let d = self.disk();
        let from = from.max(d.before + 1);
        let mut out = Vec::new();
        let take = (to.saturating_add(1)).saturating_sub(from);
        for r in d.records.iter().skip((from - d.before - 1) as usize).take(take as usize) {
            put_record(&mut out, &r.block);
            put_record(&mut out, &r.certificate);
        }
        Ok(out)
    }
    fn sync(&mut self) -> Synced {
        let mut d = self.disk();
        d.synced = d.records.len();
        answered(Ok(d.before + d.synced as u64))
    }
    fn prune_finish(&mut self, pruned: Pruned) -> Result<u64, String> {
        let mut d = self.disk();
        let keep_from = pruned.keep_from.min(d.before + d.records.len() as u64).max(d.before + 1);
        let drop = (keep_from - d.before - 1) as usize;
        d.records.drain(..drop);
        d.synced = d.synced.saturating_sub(drop);
        d.before += drop as u64;
        Ok(d.before + 1)
    }
}

/// The first record of a log that does not start at height 1: this magic and the height of
/// the log's first block (big-endian), with an empty certificate. No block encodes to 25 bytes.
const BASE_MAGIC: &[u8; 17] = b"archipel-log-base";

fn base_marker(first: u64) -> Vec<u8> {
    let mut out = Vec::new();
    put_record(&mut out, &[&BASE_MAGIC[..], &first.to_be_bytes()].concat());
    put_record(&mut out, &[]);
    out
}

/// The first block's height a log's first record names, if it is a base marker.
fn parse_base(block: &[u8], certificate: &[u8]) -> Option<u64> {
    (block.len() == BASE_MAGIC.len() + 8 && block.starts_with(BASE_MAGIC) && certificate.is_empty())
        .then(|| u64::from_be_bytes(block[BASE_MAGIC.len()..].try_into().expect("8 bytes")))
        .filter(|first| *first > 1 && *first <= u64::MAX / 2)
}

/// A request to the sync thread: the height appended when it was made, and where to answer.
pub(crate) type SyncRequest = (u64, oneshot::Sender<Result<u64, String>>);

/// Blocks in a file, with an in-memory index of record offsets.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    file: File,
    /// The file as readers read it: a planned read ([`BlockStore::raw_range_reader`]) keeps the
    /// file it was planned on, even after [`FileStore::prune_below`] replaced it.
    reader: Arc<File>,
    /// Height of the first block (1, or what the log's base marker names).
    first: u64,
    /// Offset of each block's record (`offsets[0]`: block `first`); one extra entry: the end of
    /// the log.
    offsets: Vec<u64>,
    /// Requests to the thread that syncs the file (an fsync on a busy disk must stall neither the
    /// chain's lock nor a runtime thread).
    syncer: mpsc::Sender<SyncRequest>,
    /// The first failed sync, if any: shared with every sync thread this log had, so a prune
    /// (which starts a new one) does not forget it.
    sync_failed: Arc<Mutex<Option<String>>>,
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
        let mut first = 1;
        let mut at = 0usize;
        while at < bytes.len() {
            let start = at;
            // No block encodes to nothing: a zero length starts a zeroed tail, not a record.
            let zeroed = bytes[start..].iter().take(4).all(|b| *b == 0);
            let ok = if zeroed {
                Err(String::from("a zero length"))
            } else {
                take_record(&bytes, &mut at, MAX_RECORD_BYTES)
                    .and_then(|block| Ok((block, take_record(&bytes, &mut at, MAX_RECORD_BYTES)?)))
            };
            match ok {
                Ok((block, certificate)) => match parse_base(block, certificate) {
                    Some(base) if start == 0 => {
                        first = base;
                        offsets[0] = at as u64;
                    }
                    _ => offsets.push(at as u64),
                },
                Err(e) if e.starts_with("truncated") || (zeroed && bytes[start..].iter().all(|b| *b == 0)) => {
                    let aside = PathBuf::from(format!("{}.torn-{start}", path.display()));
                    let height = first + offsets.len() as u64 - 1;
                    tracing::warn!(path = %path.display(), height, aside = %aside.display(), "moving a torn record at the end of the block log aside");
                    std::fs::write(&aside, &bytes[start..]).map_err(err)?;
                    file.set_len(start as u64).map_err(err)?;
                    file.sync_all().map_err(err)?;
                    break;
                }
                Err(e) => {
                    let height = first + offsets.len() as u64 - 1;
                    return Err(format!("block log {}: block {height}: {e}", path.display()));
                }
            }
        }
        let sync_failed = Arc::new(Mutex::new(None));
        let syncer = spawn_syncer(&file, path, Arc::clone(&sync_failed))?;
        let reader = Arc::new(File::open(path).map_err(err)?);
        // A prune cut short before its rename left its copy: the log is whole without it.
        let leftover = PathBuf::from(format!("{}.pruning", path.display()));
        if leftover.exists() {
            std::fs::remove_file(&leftover).map_err(err)?;
        }
        Ok(FileStore { path: path.to_path_buf(), file, reader, first, offsets, syncer, sync_failed, broken: None })
    }

    /// Creates the log at `path` for a node that joined by state sync: empty, its first block
    /// at `first`. Refuses a file that already holds anything.
    pub fn create_at(path: &Path, first: u64) -> Result<Self, String> {
        let err = |e: std::io::Error| format!("block log {}: {e}", path.display());
        if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            return Err(format!("block log {} already holds blocks: move it aside to start a new one", path.display()));
        }
        if first > 1 {
            write_synced(path, &base_marker(first)).map_err(err)?;
        }
        Self::open(path)
    }

    /// Drops every block below `height` at once (kept: `height` and above, at least the last
    /// block): [`BlockStore::prune_plan`] then [`BlockStore::prune_finish`]. Returns the new first
    /// height.
    pub fn prune_below(&mut self, height: u64) -> Result<u64, String> {
        match self.prune_plan(height) {
            Some(job) => self.prune_finish(job()?),
            None => Ok(self.first),
        }
    }
}

impl FileStore {
    fn pruning_path(&self) -> PathBuf {
        PathBuf::from(format!("{}.pruning", self.path.display()))
    }
}

/// Writes `head` then the bytes `start..end` of `from` (the file at `path`) as the whole file
/// `to`, a MiB at a time, and syncs it.
fn copy_synced(from: &File, path: &Path, start: u64, end: u64, head: &[u8], to: &Path) -> Result<(), String> {
    let err = |e: std::io::Error| format!("cannot write {}: {e}", to.display());
    let mut out = OpenOptions::new().write(true).create(true).truncate(true).open(to).map_err(err)?;
    out.write_all(head).map_err(err)?;
    let mut at = start;
    while at < end {
        let next = end.min(at + (1 << 20));
        out.write_all(&read_range(from, path, at, next)?).map_err(err)?;
        at = next;
    }
    out.sync_all().map_err(err)
}

/// Writes `bytes` as the whole file at `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Starts the thread that syncs the log at `path`; it ends when the store is dropped.
fn spawn_syncer(
    file: &File,
    path: &Path,
    failed: Arc<Mutex<Option<String>>>,
) -> Result<mpsc::Sender<SyncRequest>, String> {
    let file = file.try_clone().map_err(|e| format!("block log {}: {e}", path.display()))?;
    spawn_syncer_with(path, failed, move || file.sync_data())
}

/// [`spawn_syncer`] with the sync itself given. A failed sync answers every later request too
/// (it is kept in `failed`): after a failed `fsync` Linux may mark the unwritten pages clean, so
/// a retry that "succeeds" would call blocks durable that never reached the disk, and a state
/// flushed on that word would be durably ahead of the log. Only a restart, after the operator
/// checked the disk, clears it; a prune keeps it (its copy would read those same pages).
fn spawn_syncer_with(
    path: &Path,
    failed: Arc<Mutex<Option<String>>>,
    mut sync: impl FnMut() -> std::io::Result<()> + Send + 'static,
) -> Result<mpsc::Sender<SyncRequest>, String> {
    let (tx, rx) = mpsc::channel::<SyncRequest>();
    let shown = path.display().to_string();
    std::thread::Builder::new()
        .name("block-log-sync".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                // Everything asked for while the last sync ran is covered by this one.
                let batch: Vec<SyncRequest> = std::iter::once(first).chain(rx.try_iter()).collect();
                let earlier = crate::lock(&failed).clone();
                let result = match earlier {
                    Some(e) => Err(e),
                    None => sync().map_err(|e| {
                        tracing::error!(log = %shown, error = %e, "the block log's sync failed: the node must be restarted");
                        let e = format!(
                            "the block log {shown} failed to sync ({e}): blocks may not have reached the disk; check the disk, then restart the node"
                        );
                        *crate::lock(&failed) = Some(e.clone());
                        e
                    }),
                };
                for (height, answer) in batch {
                    let _ = answer.send(result.clone().map(|()| height));
                }
            }
        })
        .map_err(|e| format!("block log {}: cannot start its sync thread: {e}", path.display()))?;
    Ok(tx)
}

impl FileStore {
    /// Offsets of the records `from..=to`, clamped to what is stored (`None`: nothing).
    fn span(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        let (from, to) = (from.max(self.first), to.min(self.height()));
        (from <= to).then_some((from, to))
    }

    fn offset(&self, height: u64) -> u64 {
        self.offsets[(height - self.first) as usize]
    }
}

impl BlockStore for FileStore {
    fn height(&self) -> u64 {
        self.first + self.offsets.len() as u64 - 2
    }

    fn first(&self) -> u64 {
        self.first
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
        let Some((height, _)) = self.span(height, height) else { return Ok(None) };
        let bytes = read_range(&self.reader, &self.path, self.offset(height), self.offset(height + 1))?;
        let mut at = 0;
        let block = take_record(&bytes, &mut at, MAX_RECORD_BYTES)?.to_vec();
        let certificate = take_record(&bytes, &mut at, MAX_RECORD_BYTES)?.to_vec();
        Ok(Some(Record { block, certificate }))
    }

    fn raw_range(&self, from: u64, to: u64) -> Result<Vec<u8>, String> {
        match self.span(from, to) {
            Some((from, to)) => read_range(&self.reader, &self.path, self.offset(from), self.offset(to + 1)),
            None => Ok(Vec::new()),
        }
    }

    fn raw_range_reader(&self, from: u64, to: u64, max_bytes: u64) -> RangeRead {
        let Some((from, to)) = self.span(from, to) else {
            return RangeRead::nothing(from.max(self.first) - 1);
        };
        let start = self.offset(from);
        // The last whole record within `max_bytes`, at least the first.
        let ends = &self.offsets[(from - self.first + 1) as usize..=(to - self.first + 1) as usize];
        let within = ends.partition_point(|end| end - start <= max_bytes);
        let to = from - 1 + (within as u64).max(1);
        // The log only grows at its end (a torn tail is cut off only when the log is opened; a
        // prune writes a new file and this read keeps the old one), so the bytes stay put.
        let (reader, path, end) = (self.reader.clone(), self.path.clone(), self.offset(to + 1));
        RangeRead { last: to, len: end - start, read: Box::new(move || read_range(&reader, &path, start, end)) }
    }

    fn prune_plan(&self, keep_from: u64) -> Option<PruneJob> {
        let keep_from = keep_from.min(self.height());
        // After a failed sync the file's pages may no longer hold what was appended: no copy.
        if keep_from <= self.first || crate::lock(&self.sync_failed).is_some() {
            return None;
        }
        // The new log: a base marker, then the records kept as they are now, written and synced
        // under another name; reads go through a handle of the old file, which only grows.
        let (reader, path, tmp) = (self.reader.clone(), self.path.clone(), self.pruning_path());
        let (start, end) = (self.offset(keep_from), *self.offsets.last().expect("one offset at least"));
        Some(Box::new(move || {
            copy_synced(&reader, &path, start, end, &base_marker(keep_from), &tmp)?;
            Ok(Pruned { keep_from, file: Some((tmp, end)) })
        }))
    }

    fn prune_finish(&mut self, pruned: Pruned) -> Result<u64, String> {
        let Some((tmp, copied_to)) = pruned.file else { return Ok(self.first) };
        let keep_from = pruned.keep_from;
        let err = |e: std::io::Error| format!("cannot prune the block log {}: {e}", self.path.display());
        if keep_from <= self.first || keep_from > self.height() || crate::lock(&self.sync_failed).is_some() {
            let _ = std::fs::remove_file(&tmp);
            return Ok(self.first);
        }
        // Blocks appended since the copy go along; everything that can fail is done on the new
        // file before it takes the log's name, so a failure leaves the old log in use, whole.
        let end = *self.offsets.last().expect("one offset at least");
        let file = OpenOptions::new().read(true).append(true).open(&tmp).map_err(err)?;
        if end > copied_to {
            let tail = read_range(&self.reader, &self.path, copied_to, end)?;
            (&file).write_all(&tail).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        let reader = Arc::new(File::open(&tmp).map_err(err)?);
        let syncer = spawn_syncer(&file, &self.path, Arc::clone(&self.sync_failed))?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        // The handles follow the file across the rename; only the rename's durability is left.
        let start = self.offset(keep_from);
        let marker = base_marker(keep_from).len() as u64;
        self.syncer = syncer;
        self.reader = reader;
        self.file = file;
        self.offsets = self.offsets[(keep_from - self.first) as usize..].iter().map(|o| o - start + marker).collect();
        self.first = keep_from;
        if let Some(dir) = self.path.parent() {
            // Until this is durable a power cut may bring the old log back, without the blocks
            // appended from here on: their syncs must fail too, so no state is flushed on them.
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                let e = format!(
                    "the block log {} was pruned but its directory failed to sync ({e}): blocks may not survive a power cut; check the disk, then restart the node",
                    self.path.display()
                );
                tracing::error!(error = %e, "the block log's sync failed: the node must be restarted");
                *crate::lock(&self.sync_failed) = Some(e.clone());
                return Err(e);
            }
        }
        Ok(keep_from)
    }

    fn sync(&mut self) -> Synced {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::SendError((_, tx))) = self.syncer.send((self.height(), tx)) {
            let _ = tx.send(Err(format!("the sync thread of the block log {} is gone", self.path.display())));
        }
        rx
    }
}

fn read_range(file: &File, path: &Path, start: u64, end: u64) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt as _;
    let mut out = vec![0u8; (end - start) as usize];
    file.read_exact_at(&mut out, start).map_err(|e| format!("cannot read block log {}: {e}", path.display()))?;
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

    #[test]
    fn a_failed_sync_is_never_followed_by_a_success() {
        // The first sync fails, every later one would succeed: each later request must still be
        // told of the failure (the pages it covered may be lost however the retry ends).
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = Arc::clone(&calls);
        let syncer = spawn_syncer_with(Path::new("test.log"), Arc::default(), move || {
            match counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0 => Err(std::io::Error::other("injected EIO")),
                _ => Ok(()),
            }
        })
        .unwrap();
        let ask = |height: u64| {
            let (tx, rx) = oneshot::channel();
            syncer.send((height, tx)).unwrap();
            futures::executor::block_on(rx).unwrap()
        };
        let first = ask(5).unwrap_err();
        assert!(first.contains("injected EIO") && first.contains("restart"), "{first}");
        for height in [5, 6, 7] {
            assert_eq!(ask(height), Err(first.clone()), "a later sync at {height} reports the first failure");
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "no sync is tried after a failure");
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

    /// What a log that starts above height 1 (a joined node's) must do, in both stores.
    fn conformance_from(store: &mut dyn BlockStore, first: u64) {
        assert_eq!((store.first(), store.height()), (first, first - 1), "empty: the height is the one before");
        for i in 0..4u8 {
            store.append(&record(i)).unwrap();
        }
        assert_eq!(store.height(), first + 3);
        assert_eq!(synced(store), Ok(first + 3));
        assert_eq!(store.get(first - 1).unwrap(), None, "below the first block: not held");
        assert_eq!(store.get(1).unwrap(), None);
        assert_eq!(store.get(first).unwrap(), Some(record(0)));
        assert_eq!(store.get(first + 3).unwrap(), Some(record(3)));
        assert_eq!(store.raw_range(1, first).unwrap(), store.raw_range(first, first).unwrap(), "ranges are clamped");
        let plan = store.raw_range_reader(1, first + 1, u64::MAX);
        assert_eq!(plan.last, first + 1);
        assert_eq!((plan.read)().unwrap(), store.raw_range(first, first + 1).unwrap());
        assert!(store.raw_range_reader(first + 9, first + 20, u64::MAX).last < first + 9, "nothing: below from");
    }

    #[test]
    fn logs_that_start_above_one_conform_and_reopen() {
        conformance_from(&mut MemoryStore::starting_at(1_000), 1_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks.log");
        conformance_from(&mut FileStore::create_at(&path, 1_000).unwrap(), 1_000);
        let s = FileStore::open(&path).unwrap();
        assert_eq!((s.first(), s.height(), s.get(1_002).unwrap()), (1_000, 1_003, Some(record(2))));
        assert!(FileStore::create_at(&path, 5).unwrap_err().contains("already holds blocks"));
        // An empty joined log reopens at its base.
        let empty = dir.path().join("empty.log");
        drop(FileStore::create_at(&empty, 77).unwrap());
        let s = FileStore::open(&empty).unwrap();
        assert_eq!((s.first(), s.height()), (77, 76));
        // A marker anywhere but first is not a marker: it is read as a block.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&base_marker(5)).unwrap();
        drop(f);
        let s = FileStore::open(&path).unwrap();
        assert_eq!((s.first(), s.height()), (1_000, 1_004));
    }

    #[test]
    fn pruning_keeps_the_newest_blocks_and_reads_planned_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks.log");
        let mut s = FileStore::open(&path).unwrap();
        for i in 1..=10 {
            s.append(&record(i)).unwrap();
        }
        let planned = s.raw_range_reader(2, 4, u64::MAX);
        let want = s.raw_range(2, 4).unwrap();
        assert_eq!(s.prune_below(6).unwrap(), 6);
        assert_eq!((planned.read)().unwrap(), want, "a read planned before the prune reads the old file");
        assert_eq!((s.first(), s.height()), (6, 10));
        assert_eq!(s.get(5).unwrap(), None);
        assert_eq!(s.get(6).unwrap(), Some(record(6)));
        s.append(&record(11)).unwrap();
        assert_eq!(synced(&mut s), Ok(11));
        assert_eq!(s.prune_below(3).unwrap(), 6, "never grows back");
        assert_eq!(s.prune_below(1_000).unwrap(), 11, "the last block stays");
        drop(s);
        let s = FileStore::open(&path).unwrap();
        assert_eq!((s.first(), s.height(), s.get(11).unwrap()), (11, 11, Some(record(11))));
        assert!(!dir.path().join("blocks.log.pruning").exists());
    }

    #[test]
    fn no_prune_after_a_failed_sync_and_the_failure_stays() {
        // After a failed sync the old file's pages may not hold what was appended: a prune must
        // not copy them into a new, freshly synced log, nor start a sync thread that forgets.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks.log");
        let mut s = FileStore::open(&path).unwrap();
        for i in 1..=10 {
            s.append(&record(i)).unwrap();
        }
        let planned = s.prune_plan(6).expect("blocks to drop");
        s.syncer = spawn_syncer_with(&path, Arc::clone(&s.sync_failed), || Err(std::io::Error::other("injected EIO")))
            .unwrap();
        let failed = synced(&mut s).unwrap_err();
        assert!(failed.contains("injected EIO"), "{failed}");
        assert!(s.prune_plan(6).is_none(), "no prune is planned after a failed sync");
        assert_eq!(s.prune_finish(planned().unwrap()).unwrap(), 1, "one planned before it is not finished");
        assert!(!dir.path().join("blocks.log.pruning").exists(), "its copy is removed");
        assert_eq!(s.prune_below(6).unwrap(), 1);
        assert_eq!((s.first(), s.height()), (1, 10));
        assert_eq!(synced(&mut s), Err(failed), "the failure is still reported");
    }

    #[test]
    fn a_pruned_log_keeps_reporting_a_sync_failure() {
        // The sync thread a prune starts shares the log's record of a failure: one recorded
        // after the prune (by the old thread, or the directory's sync) fails every later sync.
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::open(&dir.path().join("blocks.log")).unwrap();
        for i in 1..=10 {
            s.append(&record(i)).unwrap();
        }
        assert_eq!(s.prune_below(6).unwrap(), 6);
        assert_eq!(synced(&mut s), Ok(10));
        *crate::lock(&s.sync_failed) = Some("injected: an earlier sync failed".into());
        assert_eq!(synced(&mut s), Err("injected: an earlier sync failed".into()));
    }

    /// A prune in two halves, with blocks appended between them (the slow half runs without the
    /// store), in both stores: they keep what was appended, and the first height moves.
    fn prune_in_halves(store: &mut dyn BlockStore) {
        for i in 1..=8 {
            store.append(&record(i)).unwrap();
        }
        let job = store.prune_plan(5).expect("blocks to drop");
        store.append(&record(9)).unwrap();
        assert_eq!(store.prune_finish(job().unwrap()).unwrap(), 5);
        assert_eq!((store.first(), store.height()), (5, 9));
        assert_eq!(store.get(4).unwrap(), None);
        assert_eq!(store.get(9).unwrap(), Some(record(9)), "appended after the plan, kept");
        assert_eq!(store.get(5).unwrap(), Some(record(5)));
        assert!(store.prune_plan(5).is_none() && store.prune_plan(2).is_none(), "nothing to drop");
        store.append(&record(10)).unwrap();
        assert_eq!(synced(store), Ok(10));
    }

    #[test]
    fn both_stores_prune_in_two_halves() {
        prune_in_halves(&mut MemoryStore::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks.log");
        prune_in_halves(&mut FileStore::open(&path).unwrap());
        let s = FileStore::open(&path).unwrap();
        assert_eq!((s.first(), s.height(), s.get(10).unwrap()), (5, 10, Some(record(10))));
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
