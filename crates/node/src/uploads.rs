//! Per-key bounds on what a storage node holds of uploads the ledger has not committed.
//!
//! A key that may use the data plane can upload shards of versions of its own that it never
//! commits; the collector deletes them only once no receipt signed for them can still be valid
//! (`MAX_RECEIPT_TTL_MS` and a margin, about 11 minutes). Without a bound one key could fill a
//! node's disk for that long. [`UploadQuota`] counts, per key, the bytes of its owner-claimed
//! writes (shards and manifests) that this node's finalized state does not list as committed, and
//! refuses a write that would take the key past a quarter of the node's capacity
//! ([`KEY_SHARE`]), or past [`MAX_PENDING_WRITES`] uncounted writes. A write stops counting once
//! its version is committed (checked when the key reaches its bound, at most every
//! [`PRUNE_EVERY`], for at most [`PRUNE_LOOKUPS`] versions, oldest first) or once it is older than [`PENDING_HORIZON`], when the ledger can no longer
//! commit it and the collector takes it.
//!
//! The cost for honest tenants: one upload in flight may hold at most a quarter of a node's
//! capacity on it (at 4+2, an object of the node's capacity). Many funded keys together can
//! still fill a node for the horizon; a deposit per upload is the fix (ARCHITECTURE.md).

use archipel_ledger::Hash;
use archipel_ledger::storage::MAX_RECEIPT_TTL_MS;
use archipel_store::Version;
use archipel_types::NodeId;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A key may hold at most `capacity / KEY_SHARE` bytes of uncommitted uploads on one node.
pub const KEY_SHARE: u64 = 4;
/// ... but never less than this (a small node still takes one object's share).
pub const MIN_KEY_QUOTA: u64 = 256 << 20;
/// Most writes of one key counted at once (bounds the node's memory: ~100 bytes each).
pub const MAX_PENDING_WRITES: usize = 65_536;
/// After this, a write cannot be committed any more (its receipts expired) and the collector
/// deletes it: it stops counting.
pub const PENDING_HORIZON: Duration = Duration::from_millis(MAX_RECEIPT_TTL_MS + 60_000);
/// Committed versions are looked for at most this often per key (each look is one state lookup
/// per counted write).
pub const PRUNE_EVERY: Duration = Duration::from_secs(2);
/// Most versions one prune looks up (the oldest writes' first).
pub const PRUNE_LOOKUPS: usize = 4_096;

/// One counted write.
#[derive(Debug)]
struct Pending {
    at: Instant,
    object: Hash,
    version: Version,
    bytes: u64,
}

/// One key's counted writes, oldest first.
#[derive(Debug, Default)]
struct KeyUploads {
    writes: VecDeque<Pending>,
    bytes: u64,
    pruned: Option<Instant>,
}

impl KeyUploads {
    fn expire(&mut self, now: Instant) {
        while let Some(p) = self.writes.front() {
            if now.saturating_duration_since(p.at) < PENDING_HORIZON {
                break;
            }
            self.bytes -= p.bytes;
            self.writes.pop_front();
        }
    }

    fn over(&self, bytes: u64, limit: u64) -> bool {
        self.bytes.saturating_add(bytes) > limit || self.writes.len() >= MAX_PENDING_WRITES
    }
}

/// The per-key bound on uncommitted uploads of one node.
#[derive(Debug)]
pub struct UploadQuota {
    limit: u64,
    keys: Mutex<HashMap<NodeId, KeyUploads>>,
}

/// A write refused by [`UploadQuota::reserve`], with the numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key {key} holds {bytes} bytes in {writes} writes on this node that the ledger has not committed, and this write \
     of {asked} bytes would pass its bound of {limit} bytes and {max_writes} writes: commit those uploads (or let them \
     expire, {horizon_s} s after they were written) before sending more"
)]
pub struct QuotaExceeded {
    /// The key.
    pub key: String,
    /// Bytes it holds uncommitted.
    pub bytes: u64,
    /// Writes counted.
    pub writes: usize,
    /// Bytes this write asked for.
    pub asked: u64,
    /// The bound in bytes.
    pub limit: u64,
    /// The bound in writes.
    pub max_writes: usize,
    /// After how long a write stops counting.
    pub horizon_s: u64,
}

impl UploadQuota {
    /// The bound for a node of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        UploadQuota { limit: (capacity / KEY_SHARE).max(MIN_KEY_QUOTA), keys: Mutex::default() }
    }

    /// A bound of `limit` bytes per key, whatever the capacity (tests).
    #[cfg(test)]
    pub(crate) fn with_limit(limit: u64) -> Self {
        UploadQuota { limit, keys: Mutex::default() }
    }

    /// Bytes one key may hold uncommitted here.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Counts a write of `bytes` by `key` to `version` (of `object`) at `now`, or refuses it when
    /// it would pass the key's bound; `committed(object, version)` says whether finalized state
    /// lists the version. Give the bytes back with [`UploadQuota::release`] if the write fails.
    pub fn reserve(
        &self,
        key: &NodeId,
        object: Hash,
        version: Version,
        bytes: u64,
        now: Instant,
        committed: impl Fn(&Hash, &Version) -> bool,
    ) -> Result<(), QuotaExceeded> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let k = keys.entry(*key).or_default();
        k.expire(now);
        let may_prune = k.pruned.is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY);
        if k.over(bytes, self.limit) && may_prune {
            k.pruned = Some(now);
            // Oldest first (the likeliest to be committed), one lookup per version, at most
            // PRUNE_LOOKUPS of them: a key's prune costs bounded work under this lock.
            let mut seen: HashMap<Version, bool> = HashMap::new();
            let mut freed = 0;
            k.writes.retain(|p| {
                let done = match seen.get(&p.version) {
                    Some(done) => *done,
                    None if seen.len() < PRUNE_LOOKUPS => {
                        let done = committed(&p.object, &p.version);
                        seen.insert(p.version, done);
                        done
                    }
                    None => false,
                };
                if done {
                    freed += p.bytes;
                }
                !done
            });
            k.bytes -= freed;
        }
        if k.over(bytes, self.limit) {
            return Err(QuotaExceeded {
                key: key.short(),
                bytes: k.bytes,
                writes: k.writes.len(),
                asked: bytes,
                limit: self.limit,
                max_writes: MAX_PENDING_WRITES,
                horizon_s: PENDING_HORIZON.as_secs(),
            });
        }
        k.bytes += bytes;
        k.writes.push_back(Pending { at: now, object, version, bytes });
        Ok(())
    }

    /// Gives back a reservation whose write failed (the newest of `key` for `version` and
    /// `bytes`).
    pub fn release(&self, key: &NodeId, version: &Version, bytes: u64) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let Some(k) = keys.get_mut(key) else { return };
        if let Some(i) = k.writes.iter().rposition(|p| p.version == *version && p.bytes == bytes) {
            k.writes.remove(i);
            k.bytes -= bytes;
        }
        if k.writes.is_empty() {
            keys.remove(key);
        }
    }

    /// Keys with counted writes (for tests and metrics).
    pub fn keys(&self) -> usize {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    fn key(n: u8) -> NodeId {
        archipel_crypto::Identity::from_seed(u64::from(n) + 77_000).node_id()
    }

    #[test]
    fn a_key_is_bounded_and_others_are_not_affected() {
        let q = UploadQuota::new(4 << 30); // 1 GiB per key
        assert_eq!(q.limit(), 1 << 30);
        let now = Instant::now();
        let never = |_: &Hash, _: &Version| false;
        for v in 0..4u8 {
            q.reserve(&key(1), Hash::ZERO, [v; 32], 256 << 20, now, never).unwrap();
        }
        let e = q.reserve(&key(1), Hash::ZERO, [9; 32], 1, now, never).unwrap_err();
        assert_eq!((e.bytes, e.writes, e.asked, e.limit), (1 << 30, 4, 1, 1 << 30));
        assert!(e.to_string().contains("commit those uploads"), "{e}");
        // Another key has its own bound.
        q.reserve(&key(2), Hash::ZERO, [1; 32], 1 << 30, now, never).unwrap();
        // A failed write gives its bytes back.
        q.release(&key(1), &[3; 32], 256 << 20);
        q.reserve(&key(1), Hash::ZERO, [9; 32], 256 << 20, now, never).unwrap();
    }

    #[test]
    fn committed_versions_stop_counting_and_lookups_are_rate_limited() {
        let q = UploadQuota::new(0); // the minimum: 256 MiB
        let t0 = Instant::now();
        let committed: RefCell<BTreeSet<Version>> = RefCell::default();
        let lookups = RefCell::new(0);
        let is_committed = |_: &Hash, v: &Version| {
            *lookups.borrow_mut() += 1;
            committed.borrow().contains(v)
        };
        for v in 0..2u8 {
            q.reserve(&key(1), Hash::ZERO, [v; 32], 128 << 20, t0, is_committed).unwrap();
        }
        assert_eq!(*lookups.borrow(), 0, "no lookups while under the bound");
        assert!(q.reserve(&key(1), Hash::ZERO, [2; 32], 1, t0, is_committed).is_err());
        assert_eq!(*lookups.borrow(), 2);
        // Committed now, but the last look was just now: refused without looking again.
        committed.borrow_mut().insert([0; 32]);
        assert!(q.reserve(&key(1), Hash::ZERO, [2; 32], 1, t0 + Duration::from_millis(500), is_committed).is_err());
        assert_eq!(*lookups.borrow(), 2);
        // A while later: the committed version is found and stops counting.
        q.reserve(&key(1), Hash::ZERO, [2; 32], 128 << 20, t0 + PRUNE_EVERY, is_committed).unwrap();
        assert_eq!(*lookups.borrow(), 4);
    }

    #[test]
    fn a_prune_looks_up_each_version_once_and_a_bounded_number_of_them() {
        let q = UploadQuota::new(0);
        let t0 = Instant::now();
        let lookups = RefCell::new(0);
        let always = |_: &Hash, _: &Version| {
            *lookups.borrow_mut() += 1;
            true
        };
        // Every write its own version, all committed: one prune frees the oldest PRUNE_LOOKUPS.
        let version = |i: usize| {
            let mut v = [0u8; 32];
            v[..8].copy_from_slice(&(i as u64).to_be_bytes());
            v
        };
        for i in 0..MAX_PENDING_WRITES {
            q.reserve(&key(1), Hash::ZERO, version(i), 1, t0, |_, _| false).unwrap();
        }
        q.reserve(&key(1), Hash::ZERO, version(0), 1, t0 + PRUNE_EVERY, always).unwrap();
        assert_eq!(*lookups.borrow(), PRUNE_LOOKUPS);
        // Many writes of one version: one lookup.
        let q = UploadQuota::new(0);
        *lookups.borrow_mut() = 0;
        for _ in 0..MAX_PENDING_WRITES {
            q.reserve(&key(1), Hash::ZERO, [5; 32], 1, t0, |_, _| false).unwrap();
        }
        q.reserve(&key(1), Hash::ZERO, [6; 32], 1, t0 + PRUNE_EVERY, always).unwrap();
        assert_eq!(*lookups.borrow(), 1);
    }

    #[test]
    fn writes_stop_counting_after_the_horizon_and_memory_is_bounded() {
        let q = UploadQuota::new(0);
        let t0 = Instant::now();
        let never = |_: &Hash, _: &Version| false;
        for i in 0..MAX_PENDING_WRITES {
            q.reserve(&key(1), Hash::ZERO, [(i % 251) as u8; 32], 1, t0, never).unwrap();
        }
        assert!(q.reserve(&key(1), Hash::ZERO, [0; 32], 1, t0, never).is_err(), "too many writes");
        q.reserve(&key(1), Hash::ZERO, [0; 32], 256 << 20, t0 + PENDING_HORIZON, never).unwrap();
        q.release(&key(1), &[0; 32], 256 << 20);
        assert_eq!(q.keys(), 0, "a key with nothing counted is forgotten");
    }
}
