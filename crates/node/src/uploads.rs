//! Per-key bounds on what a storage node holds of uploads the ledger has not committed.
//!
//! A key that may use the data plane can upload shards of versions of its own that it never
//! commits; the collector deletes such a version once nothing was written to or sealed in it for
//! `COLLECT_AFTER` (10 minutes), and the node's finalized state is past any receipt it could
//! have signed. Without a bound one key could fill a node's disk. [`UploadQuota`] counts, per
//! key and version, the bytes and writes of its owner-claimed writes (shards and manifests) that
//! this node's finalized state does not list as committed, and refuses a write that would take
//! the key past a quarter of the node's capacity ([`KEY_SHARE`]) or past [`MAX_PENDING_WRITES`]
//! writes. A version stops counting once committed (checked when the key reaches its bound, at
//! most every [`PRUNE_EVERY`], for at most [`PRUNE_LOOKUPS`] versions, oldest first), or once
//! nothing was written to it for [`PENDING_HORIZON`] — longer than the collector waits, so what a
//! version holds on disk counts until the collector could have taken it: writing into an old
//! upload keeps all of it counted, as it keeps all of it on disk.
//!
//! The cost for honest tenants: one upload in flight may hold at most a quarter of a node's
//! capacity on it (at 4+2, an object of the node's capacity). Many funded keys together can
//! still fill a node for the horizon; a deposit per upload is the fix (ARCHITECTURE.md). While
//! the ledger stalls, the collector waits and the quota does not: a stall of more than the
//! horizon lets a key hold more than its bound until the chain moves again.

use archipel_ledger::Hash;
use archipel_ledger::storage::MAX_RECEIPT_TTL_MS;
use archipel_store::Version;
use archipel_types::NodeId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A key may hold at most `capacity / KEY_SHARE` bytes of uncommitted uploads on one node.
pub const KEY_SHARE: u64 = 4;
/// ... but never less than this (a small node still takes one object's share).
pub const MIN_KEY_QUOTA: u64 = 256 << 20;
/// Most writes of one key counted at once (bounds the files it makes and the node's memory).
pub const MAX_PENDING_WRITES: u64 = 65_536;
/// A version nothing was written to for this long stops counting: the collector deletes it
/// first (after 10 minutes idle), and its receipts expired.
pub const PENDING_HORIZON: Duration = Duration::from_millis(MAX_RECEIPT_TTL_MS + 60_000);
/// Committed versions are looked for at most this often per key.
pub const PRUNE_EVERY: Duration = Duration::from_secs(2);
/// Most versions one prune looks up (the longest idle first).
pub const PRUNE_LOOKUPS: usize = 4_096;

/// What one key wrote to one version.
#[derive(Debug)]
struct Pending {
    /// The last write.
    last: Instant,
    object: Hash,
    bytes: u64,
    writes: u64,
}

/// One key's counted versions.
#[derive(Debug, Default)]
struct KeyUploads {
    versions: HashMap<Version, Pending>,
    bytes: u64,
    writes: u64,
    pruned: Option<Instant>,
}

impl KeyUploads {
    fn over(&self, bytes: u64, limit: u64) -> bool {
        self.bytes.saturating_add(bytes) > limit || self.writes >= MAX_PENDING_WRITES
    }

    /// Forgets versions idle past the horizon, and (at most [`PRUNE_LOOKUPS`] looked up, the
    /// longest idle first) those `committed` lists.
    fn prune(&mut self, now: Instant, committed: impl Fn(&Hash, &Version) -> bool) {
        let mut idle: Vec<(Instant, Version)> = self.versions.iter().map(|(v, p)| (p.last, *v)).collect();
        idle.sort_unstable();
        for (n, (last, v)) in idle.into_iter().enumerate() {
            let expired = now.saturating_duration_since(last) >= PENDING_HORIZON;
            let gone =
                expired || (n < PRUNE_LOOKUPS && self.versions.get(&v).is_some_and(|p| committed(&p.object, &v)));
            if gone && let Some(p) = self.versions.remove(&v) {
                self.bytes -= p.bytes;
                self.writes -= p.writes;
            }
        }
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
    "key {key} holds {bytes} bytes in {writes} writes to {versions} versions on this node that the ledger has not \
     committed, and this write of {asked} bytes would pass its bound of {limit} bytes and {max_writes} writes: commit \
     those uploads (or leave them: a version stops counting {horizon_s} s after its last write) before sending more"
)]
pub struct QuotaExceeded {
    /// The key.
    pub key: String,
    /// Bytes it holds uncommitted.
    pub bytes: u64,
    /// Writes counted.
    pub writes: u64,
    /// Versions they went to.
    pub versions: usize,
    /// Bytes this write asked for.
    pub asked: u64,
    /// The bound in bytes.
    pub limit: u64,
    /// The bound in writes.
    pub max_writes: u64,
    /// After how long without a write a version stops counting.
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
        let may_prune = k.pruned.is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY);
        if k.over(bytes, self.limit) && may_prune {
            k.pruned = Some(now);
            k.prune(now, committed);
        }
        if k.over(bytes, self.limit) {
            return Err(QuotaExceeded {
                key: key.short(),
                bytes: k.bytes,
                writes: k.writes,
                versions: k.versions.len(),
                asked: bytes,
                limit: self.limit,
                max_writes: MAX_PENDING_WRITES,
                horizon_s: PENDING_HORIZON.as_secs(),
            });
        }
        let p = k.versions.entry(version).or_insert(Pending { last: now, object, bytes: 0, writes: 0 });
        p.last = now;
        p.bytes += bytes;
        p.writes += 1;
        k.bytes += bytes;
        k.writes += 1;
        Ok(())
    }

    /// Gives back a reservation of `bytes` by `key` to `version` whose write failed or stored
    /// nothing new.
    pub fn release(&self, key: &NodeId, version: &Version, bytes: u64) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let Some(k) = keys.get_mut(key) else { return };
        if let Some(p) = k.versions.get_mut(version) {
            let bytes = bytes.min(p.bytes);
            p.bytes -= bytes;
            p.writes = p.writes.saturating_sub(1);
            k.bytes -= bytes;
            k.writes = k.writes.saturating_sub(1);
            if p.writes == 0 {
                k.versions.remove(version);
            }
        }
        if k.versions.is_empty() {
            keys.remove(key);
        }
    }

    /// Whether `key` has `version` counted; if so, it counts from `now` on as if written now (a
    /// seal keeps the version on disk as a write does).
    pub fn touch(&self, key: &NodeId, version: &Version, now: Instant) -> bool {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match keys.get_mut(key).and_then(|k| k.versions.get_mut(version)) {
            Some(p) => {
                p.last = now;
                true
            }
            None => false,
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

    fn version(i: usize) -> Version {
        let mut v = [0u8; 32];
        v[..8].copy_from_slice(&(i as u64).to_be_bytes());
        v
    }

    const NEVER: fn(&Hash, &Version) -> bool = |_, _| false;

    #[test]
    fn a_key_is_bounded_and_others_are_not_affected() {
        let q = UploadQuota::new(4 << 30); // 1 GiB per key
        assert_eq!(q.limit(), 1 << 30);
        let now = Instant::now();
        for v in 0..4u8 {
            q.reserve(&key(1), Hash::ZERO, [v; 32], 256 << 20, now, NEVER).unwrap();
        }
        let e = q.reserve(&key(1), Hash::ZERO, [9; 32], 1, now, NEVER).unwrap_err();
        assert_eq!((e.bytes, e.writes, e.versions, e.asked, e.limit), (1 << 30, 4, 4, 1, 1 << 30));
        assert!(e.to_string().contains("commit those uploads"), "{e}");
        // Another key has its own bound.
        q.reserve(&key(2), Hash::ZERO, [1; 32], 1 << 30, now, NEVER).unwrap();
        // A failed write gives its bytes back.
        q.release(&key(1), &[3; 32], 256 << 20);
        q.reserve(&key(1), Hash::ZERO, [9; 32], 256 << 20, now, NEVER).unwrap();
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
    fn a_prune_looks_up_a_bounded_number_of_versions() {
        let q = UploadQuota::with_limit(u64::MAX);
        let t0 = Instant::now();
        let lookups = RefCell::new(0);
        let always = |_: &Hash, _: &Version| {
            *lookups.borrow_mut() += 1;
            true
        };
        // Every write its own version, all committed: one prune looks up PRUNE_LOOKUPS of them.
        for i in 0..MAX_PENDING_WRITES as usize {
            q.reserve(&key(1), Hash::ZERO, version(i), 1, t0, NEVER).unwrap();
        }
        q.reserve(&key(1), Hash::ZERO, version(0), 1, t0 + PRUNE_EVERY, always).unwrap();
        assert_eq!(*lookups.borrow(), PRUNE_LOOKUPS);
    }

    #[test]
    fn a_prune_looks_up_the_longest_idle_versions_first() {
        let q = UploadQuota::with_limit(u64::MAX);
        let t0 = Instant::now();
        // Version 0 written first, the others after it; only version 0 is committed. The newest
        // PRUNE_LOOKUPS versions would all be uncommitted: a prune must start at the oldest.
        let n = MAX_PENDING_WRITES as usize;
        for i in 0..n {
            q.reserve(&key(1), Hash::ZERO, version(i), 1, t0 + Duration::from_millis(i as u64), NEVER).unwrap();
        }
        let oldest = |_: &Hash, v: &Version| *v == version(0);
        let later = t0 + Duration::from_millis(n as u64) + PRUNE_EVERY;
        q.reserve(&key(1), Hash::ZERO, version(n), 1, later, oldest).unwrap();
    }

    #[test]
    fn writing_into_an_old_upload_keeps_all_of_it_counted_until_it_is_idle_past_the_horizon() {
        let q = UploadQuota::new(0); // 256 MiB
        let t0 = Instant::now();
        q.reserve(&key(1), Hash::ZERO, [1; 32], 200 << 20, t0, NEVER).unwrap();
        // A small write every 10 minutes keeps the version on disk (the collector ages it from
        // its last write), so its 200 MiB keep counting.
        let mut t = t0;
        for _ in 0..5 {
            t += Duration::from_secs(600);
            q.reserve(&key(1), Hash::ZERO, [1; 32], 4_096, t, NEVER).unwrap();
        }
        let e = q.reserve(&key(1), Hash::ZERO, [2; 32], 100 << 20, t + PRUNE_EVERY, NEVER).unwrap_err();
        assert_eq!((e.versions, e.writes), (1, 6));
        assert!(e.bytes > 200 << 20);
        // Idle past the horizon: the collector has taken it, and it stops counting.
        q.reserve(&key(1), Hash::ZERO, [2; 32], 100 << 20, t + PENDING_HORIZON, NEVER).unwrap();
    }

    #[test]
    fn a_seal_keeps_a_counted_version_counting_as_it_keeps_it_on_disk() {
        let q = UploadQuota::new(0); // 256 MiB
        let t0 = Instant::now();
        q.reserve(&key(1), Hash::ZERO, [1; 32], 200 << 20, t0, NEVER).unwrap();
        let sealed = t0 + Duration::from_secs(540);
        assert!(q.touch(&key(1), &[1; 32], sealed));
        assert!(!q.touch(&key(1), &[2; 32], sealed), "a version never counted");
        assert!(!q.touch(&key(2), &[1; 32], sealed), "another key's");
        let later = t0 + PENDING_HORIZON + PRUNE_EVERY;
        assert!(q.reserve(&key(1), Hash::ZERO, [2; 32], 100 << 20, later, NEVER).is_err(), "counted from its seal");
        q.reserve(&key(1), Hash::ZERO, [2; 32], 100 << 20, sealed + PENDING_HORIZON, NEVER).unwrap();
    }

    #[test]
    fn writes_are_bounded_in_number_and_stop_counting_after_the_horizon() {
        let q = UploadQuota::with_limit(u64::MAX);
        let t0 = Instant::now();
        for i in 0..MAX_PENDING_WRITES as usize {
            q.reserve(&key(1), Hash::ZERO, version(i % 251), 1, t0, NEVER).unwrap();
        }
        let e = q.reserve(&key(1), Hash::ZERO, [0; 32], 1, t0, NEVER).unwrap_err();
        assert_eq!((e.writes, e.versions), (MAX_PENDING_WRITES, 251), "too many writes");
        q.reserve(&key(1), Hash::ZERO, [0; 32], 256 << 20, t0 + PENDING_HORIZON, NEVER).unwrap();
        q.release(&key(1), &[0; 32], 256 << 20);
        assert_eq!(q.keys(), 0, "a key with nothing counted is forgotten");
    }
}
