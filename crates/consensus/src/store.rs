//! Where a node keeps its finalized blocks: an append-only log of `(block, certificate)` records
//! in the ledger export format, so `archipel ledger export` is the genesis followed by this log.
//!
//! Two implementations behind one trait: a file (nodes) and memory (simulator and unit tests);
//! both pass the same conformance tests.

use archipel_ledger::export::{MAX_RECORD_BYTES, put_record, take_record};
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

/// A finalized block's bytes and its finality certificate's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The encoded block.
    pub block: Vec<u8>,
    /// The encoded finality certificate.
    pub certificate: Vec<u8>,
}

/// An append-only store of finalized blocks, indexed by height (1 = first block).
pub trait BlockStore: Send + 'static {
    /// Number of blocks stored (= the height of the last one).
    fn height(&self) -> u64;
    /// Appends the block at `height() + 1`.
    fn append(&mut self, record: &Record) -> Result<(), String>;
    /// The block at `height`, if stored.
    fn get(&self, height: u64) -> Result<Option<Record>, String>;
    /// The raw bytes of records `from..=to` (clamped to what is stored) as they appear in an
    /// export.
    fn raw_range(&self, from: u64, to: u64) -> Result<Vec<u8>, String>;
}

/// Blocks in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Vec<Record>,
}

impl BlockStore for MemoryStore {
    fn height(&self) -> u64 {
        self.records.len() as u64
    }
    fn append(&mut self, record: &Record) -> Result<(), String> {
        self.records.push(record.clone());
        Ok(())
    }
    fn get(&self, height: u64) -> Result<Option<Record>, String> {
        Ok(height.checked_sub(1).and_then(|i| self.records.get(i as usize)).cloned())
    }
    fn raw_range(&self, from: u64, to: u64) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        let take = to.saturating_sub(from.max(1)) + 1;
        for r in self.records.iter().skip(from.saturating_sub(1) as usize).take(take as usize) {
            put_record(&mut out, &r.block);
            put_record(&mut out, &r.certificate);
        }
        Ok(out)
    }
}

/// Blocks in a file, with an in-memory index of record offsets.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    file: File,
    /// Offset of each block's record; one extra entry: the end of the log.
    offsets: Vec<u64>,
    unsynced: u32,
}

impl FileStore {
    /// Opens (or creates) the log at `path`. A torn last record (a crash mid-append) is moved to
    /// `<path>.torn-<offset>` and cut off (the network still has those blocks); anything else that
    /// does not parse is an error naming the height, and nothing is changed.
    pub fn open(path: &Path) -> Result<Self, String> {
        let err = |e: std::io::Error| format!("block log {}: {e}", path.display());
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let mut offsets = vec![0u64];
        let mut at = 0usize;
        while at < bytes.len() {
            let start = at;
            let ok = take_record(&bytes, &mut at, MAX_RECORD_BYTES)
                .and_then(|_| take_record(&bytes, &mut at, MAX_RECORD_BYTES));
            match ok {
                Ok(_) => offsets.push(at as u64),
                Err(e) if e.starts_with("truncated") => {
                    let aside = PathBuf::from(format!("{}.torn-{start}", path.display()));
                    tracing::warn!(path = %path.display(), height = offsets.len(), aside = %aside.display(), "moving a torn record at the end of the block log aside");
                    std::fs::write(&aside, &bytes[start..]).map_err(err)?;
                    file.set_len(start as u64).map_err(err)?;
                    break;
                }
                Err(e) => return Err(format!("block log {}: block {}: {e}", path.display(), offsets.len())),
            }
        }
        Ok(FileStore { path: path.to_path_buf(), file, offsets, unsynced: 0 })
    }
}

impl BlockStore for FileStore {
    fn height(&self) -> u64 {
        self.offsets.len() as u64 - 1
    }

    fn append(&mut self, record: &Record) -> Result<(), String> {
        let mut out = Vec::with_capacity(record.block.len() + record.certificate.len() + 8);
        put_record(&mut out, &record.block);
        put_record(&mut out, &record.certificate);
        let err = |e: std::io::Error| format!("cannot append to block log {}: {e}", self.path.display());
        self.file.write_all(&out).map_err(err)?;
        // The OS has the bytes once write returns; fsync in batches keeps append cheap while
        // bounding what a power cut could take (the network still has every finalized block).
        // The sync runs on its own thread: the caller holds the chain's lock, and one slow fsync
        // on a busy disk would stall admission, proposals and verification on this node.
        self.unsynced += 1;
        if self.unsynced >= 64 {
            let file = self.file.try_clone().map_err(err)?;
            let path = self.path.clone();
            std::thread::spawn(move || {
                if let Err(e) = file.sync_data() {
                    tracing::warn!(path = %path.display(), error = %e, "cannot sync the block log");
                }
            });
            self.unsynced = 0;
        }
        let end = self.offsets.last().copied().unwrap_or(0) + out.len() as u64;
        self.offsets.push(end);
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

    /// The behaviour both stores must share.
    fn conformance(store: &mut dyn BlockStore) {
        assert_eq!(store.height(), 0);
        assert_eq!(store.get(1).unwrap(), None);
        for i in 1..=5 {
            store.append(&record(i)).unwrap();
        }
        assert_eq!(store.height(), 5);
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
    }

    #[test]
    fn memory_store_conforms() {
        conformance(&mut MemoryStore::default());
    }

    #[test]
    fn file_store_conforms_reopens_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocks.log");
        conformance(&mut FileStore::open(&path).unwrap());
        let s = FileStore::open(&path).unwrap();
        assert_eq!(s.height(), 5);
        assert_eq!(s.get(5).unwrap(), Some(record(5)));
        // A crash mid-append leaves half a record: it is cut and the log stays usable.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 50, 1, 2]).unwrap();
        drop(f);
        let mut s = FileStore::open(&path).unwrap();
        assert_eq!(s.height(), 5);
        s.append(&record(6)).unwrap();
        assert_eq!(FileStore::open(&path).unwrap().get(6).unwrap(), Some(record(6)));
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
}
