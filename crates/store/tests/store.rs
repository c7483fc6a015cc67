//! The shard store against a real directory: round trips, capacity, corruption on disk, seals,
//! reopening, garbage collection and a disk that runs out of space.

use archipel_store::{Hashed, ShardKey, ShardStore, ShardStoreError};
use std::path::Path;

fn key(v: u8, index: u8, segment: u64) -> ShardKey {
    ShardKey { version: [v; 32], index, segment }
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect()
}

fn hash(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

#[test]
fn shards_round_trip_and_count_against_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let store = ShardStore::open(dir.path(), 10_000).unwrap();
    let a = bytes(4_000, 1);
    store.put_shard(key(1, 0, 0), &a, &hash(&a)).unwrap();
    assert_eq!(store.shard(&key(1, 0, 0)).unwrap(), a);
    assert_eq!((store.used(), store.free()), (4_000, 6_000));
    // The same bytes again: nothing changes. Other bytes: refused, whoever asks — a stored
    // shard is never overwritten.
    store.put_shard(key(1, 0, 0), &a, &hash(&a)).unwrap();
    assert_eq!(store.used(), 4_000);
    let b = bytes(3_000, 2);
    let e = store.put_shard(key(1, 0, 0), &b, &hash(&b)).unwrap_err();
    assert!(matches!(e, ShardStoreError::Exists(_)), "{e}");
    assert_eq!((store.shard(&key(1, 0, 0)).unwrap(), store.used()), (a.clone(), 4_000));
    store.put_shard(key(1, 0, 1), &b, &hash(&b)).unwrap();
    assert_eq!(store.used(), 7_000);
    std::fs::remove_file(dir.path().join("shards/01").join(hex::encode([1u8; 32])).join("0.1")).unwrap();
    // A shard whose file vanished may be stored again with its own bytes.
    store.put_shard(key(1, 0, 1), &b, &hash(&b)).unwrap();
    assert_eq!((store.shard(&key(1, 0, 1)).unwrap(), store.used()), (b.clone(), 7_000));

    // Full: refused with the numbers, nothing left behind.
    let big = bytes(3_001, 3);
    let before = files_under(dir.path());
    let e = store.put_shard(key(1, 1, 0), &big, &hash(&big)).unwrap_err();
    assert!(matches!(e, ShardStoreError::Full { need: 3_001, free: 3_000, capacity: 10_000, .. }), "{e}");
    assert!(e.to_string().contains("declared capacity"), "{e}");
    assert_eq!(store.used(), 7_000);
    assert_eq!(files_under(dir.path()), before);
    assert!(matches!(store.shard(&key(1, 1, 0)), Err(ShardStoreError::NotFound(_))));

    // A body that does not match its hash is refused.
    let e = store.put_shard(key(1, 2, 0), &a, &hash(&b)).unwrap_err();
    assert!(matches!(e, ShardStoreError::HashMismatch { .. }), "{e}");
    assert_eq!(store.used(), 7_000);
}

#[test]
fn reads_catch_every_change_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = ShardStore::open(dir.path(), 1 << 20).unwrap();
    let a = bytes(5_000, 9);
    for seg in 0..3 {
        store.put_shard(key(2, 1, seg), &a, &hash(&a)).unwrap();
    }
    let file = |seg: u64| dir.path().join("shards").join("02").join(hex::encode([2u8; 32])).join(format!("1.{seg}"));
    // A flipped byte.
    let mut flipped = std::fs::read(file(0)).unwrap();
    flipped[123] ^= 1;
    std::fs::write(file(0), &flipped).unwrap();
    let e = store.shard(&key(2, 1, 0)).unwrap_err();
    assert!(matches!(&e, ShardStoreError::Corrupt { why, .. } if why.contains("changed")), "{e}");
    // A truncated file.
    std::fs::write(file(1), &a[..100]).unwrap();
    assert!(matches!(store.shard(&key(2, 1, 1)), Err(ShardStoreError::Corrupt { .. })));
    // A missing file.
    std::fs::remove_file(file(2)).unwrap();
    let e = store.shard(&key(2, 1, 2)).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    // An audit of a corrupt shard fails too.
    assert!(store.range_hash(&key(2, 1, 0), 0, 10).is_err());
}

#[test]
fn seals_vouch_only_for_what_is_there_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let v = [3u8; 32];
    let segs: Vec<Vec<u8>> = (0..4).map(|s| bytes(1_000 + s, s as u8)).collect();
    {
        let store = ShardStore::open(dir.path(), 1 << 20).unwrap();
        store.put_manifest(&v, b"manifest bytes").unwrap();
        store.put_manifest(&v, b"manifest bytes").unwrap();
        let e = store.put_manifest(&v, b"another manifest").unwrap_err();
        assert!(matches!(e, ShardStoreError::Exists(_)), "{e}");
        for (s, b) in segs.iter().enumerate().take(3) {
            store.put_shard(ShardKey { version: v, index: 4, segment: s as u64 }, b, &hash(b)).unwrap();
        }
        let expected: Vec<(u64, [u8; 32])> = segs.iter().enumerate().map(|(s, b)| (s as u64, hash(b))).collect();
        let e = store.seal(&v, 4, &expected).unwrap_err();
        assert!(matches!(e, ShardStoreError::NotFound(_)), "{e}");
        let wrong: Vec<(u64, [u8; 32])> = vec![(0, hash(&segs[1]))];
        assert!(matches!(store.seal(&v, 4, &wrong), Err(ShardStoreError::HashMismatch { .. })));
        store.put_shard(ShardKey { version: v, index: 4, segment: 3 }, &segs[3], &hash(&segs[3])).unwrap();
        let total = store.seal(&v, 4, &expected).unwrap();
        assert_eq!(total, 1_000 + 1_001 + 1_002 + 1_003);
        let a = &segs[2];
        assert_eq!(store.range_hash(&ShardKey { version: v, index: 4, segment: 2 }, 10, 20).unwrap(), hash(&a[10..30]));
        assert!(store.range_hash(&ShardKey { version: v, index: 4, segment: 2 }, 1_000, 10).is_err());
    }
    let store = ShardStore::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(store.used(), 4_006 + b"manifest bytes".len() as u64);
    assert_eq!(store.manifest(&v).unwrap().as_deref(), Some(&b"manifest bytes"[..]));
    assert_eq!(store.shards_of(&v).unwrap(), vec![(4, 0), (4, 1), (4, 2), (4, 3)]);
    assert_eq!(store.versions().unwrap(), vec![v]);
    for (s, b) in segs.iter().enumerate() {
        assert_eq!(&store.shard(&ShardKey { version: v, index: 4, segment: s as u64 }).unwrap(), b);
    }
    // Garbage collection frees everything of the version.
    let freed = store.delete(&v).unwrap();
    assert_eq!((freed, store.used()), (4_006 + 14, 0));
    assert!(store.versions().unwrap().is_empty());
    assert!(store.manifest(&v).unwrap().is_none());
    assert!(store.shard(&ShardKey { version: v, index: 4, segment: 0 }).is_err());
}

/// A disk that fills up (a 1 MiB tmpfs, mounted when the tests run as root) is refused with
/// "the disk is full" even though the declared capacity is larger; the store keeps serving.
#[test]
fn a_full_disk_is_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mount =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(dir.path()).output();
    if !matches!(&mount, Ok(o) if o.status.success()) {
        eprintln!("skipping: mounting a tmpfs needs root ({mount:?})");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let store = ShardStore::open(dir.path(), 1 << 30).unwrap();
    let chunk = bytes(256 << 10, 5);
    let mut stored = 0;
    let err = loop {
        match store.put_shard(key(4, 0, stored), &chunk, &hash(&chunk)) {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 10, "a 1 MiB disk took 10 shards of 256 KiB");
    };
    assert!(matches!(&err, ShardStoreError::Full { why, .. } if why.contains("disk is full")), "{err}");
    assert_eq!(store.used(), stored * (256 << 10));
    for s in 0..stored {
        assert_eq!(store.shard(&key(4, 0, s)).unwrap(), chunk);
    }
    assert!(!files_under(dir.path()).iter().any(|f| f.contains(".tmp-")), "a temporary file was left behind");
}

#[test]
fn replacing_writes_swap_wrong_bytes_for_checked_ones_and_count_them_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = ShardStore::open(dir.path(), 10_000).unwrap();
    let (junk, good) = (bytes(1_000, 9), bytes(2_500, 4));
    store.put_shard(key(5, 1, 0), &junk, &hash(&junk)).unwrap();
    assert!(matches!(store.put_shard(key(5, 1, 0), &good, &hash(&good)), Err(ShardStoreError::Exists(_))));
    // A repair's write, checked against the ledger by the caller, replaces it; the junk's bytes
    // are given back.
    store.replace_hashed(key(5, 1, 0), &Hashed::new(&good), &hash(&good)).unwrap();
    assert_eq!((store.shard(&key(5, 1, 0)).unwrap(), store.used()), (good.clone(), 2_500));
    store.replace_hashed(key(5, 1, 0), &Hashed::new(&good), &hash(&good)).unwrap();
    assert_eq!(store.used(), 2_500, "the same bytes again change nothing");
    // Still hash-checked: bytes that are not what the hash says are refused.
    let e = store.replace_hashed(key(5, 1, 0), &Hashed::new(&junk), &hash(&good)).unwrap_err();
    assert!(matches!(e, ShardStoreError::HashMismatch { .. }), "{e}");
    // Manifests alike.
    let v = [5u8; 32];
    store.put_manifest(&v, b"a planted manifest").unwrap();
    assert!(matches!(store.put_manifest(&v, b"the ledger's manifest"), Err(ShardStoreError::Exists(_))));
    store.replace_manifest(&v, b"the ledger's manifest").unwrap();
    assert_eq!(store.manifest(&v).unwrap().unwrap(), b"the ledger's manifest");
    assert_eq!(store.used(), 2_500 + b"the ledger's manifest".len() as u64);
    // And it survives reopening.
    drop(store);
    let store = ShardStore::open(dir.path(), 10_000).unwrap();
    assert_eq!(store.shard(&key(5, 1, 0)).unwrap(), good);
    assert_eq!(store.used(), 2_500 + b"the ledger's manifest".len() as u64);
}

#[test]
fn writing_a_shard_again_heals_a_copy_that_rotted_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = ShardStore::open(dir.path(), 10_000).unwrap();
    let good = bytes(2_000, 6);
    store.put_shard(key(6, 2, 0), &good, &hash(&good)).unwrap();
    let path = dir.path().join("shards/06").join(hex::encode([6u8; 32])).join("2.0");
    let mut rotten = std::fs::read(&path).unwrap();
    rotten[1_000] ^= 0x40;
    std::fs::write(&path, &rotten).unwrap();
    assert!(matches!(store.shard(&key(6, 2, 0)), Err(ShardStoreError::Corrupt { .. })));
    // A repair (or the uploader) sending the right bytes again rewrites the file, counted once.
    store.replace_hashed(key(6, 2, 0), &Hashed::new(&good), &hash(&good)).unwrap();
    assert_eq!((store.shard(&key(6, 2, 0)).unwrap(), store.used()), (good.clone(), 2_000));
    std::fs::write(&path, &rotten).unwrap();
    store.put_shard(key(6, 2, 0), &good, &hash(&good)).unwrap();
    assert_eq!((store.shard(&key(6, 2, 0)).unwrap(), store.used()), (good, 2_000));
}

#[test]
fn reopening_removes_what_an_interrupted_write_left_and_keeps_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let a = bytes(3_000, 8);
    let version_dir = dir.path().join("shards/07").join(hex::encode([7u8; 32]));
    {
        let store = ShardStore::open(dir.path(), 10_000).unwrap();
        store.put_shard(key(7, 0, 0), &a, &hash(&a)).unwrap();
        store.seal(&[7u8; 32], 0, &[(0, hash(&a))]).unwrap();
        // A power cut in the middle of the next write: its temporary file stays behind.
        std::fs::write(version_dir.join(".tmp-4242-9"), bytes(1_500, 1)).unwrap();
    }
    let store = ShardStore::open(dir.path(), 10_000).unwrap();
    assert!(!version_dir.join(".tmp-4242-9").exists(), "{:?}", files_under(dir.path()));
    assert_eq!((store.shard(&key(7, 0, 0)).unwrap(), store.used()), (a, 3_000));
}

#[test]
fn concurrent_seals_share_flushes_and_all_survive_reopening() {
    const SEALS: u8 = 24;
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(ShardStore::open(dir.path(), 1 << 30).unwrap());
    let start = std::sync::Arc::new(std::sync::Barrier::new(SEALS as usize));
    let threads: Vec<_> = (0..SEALS)
        .map(|v| {
            let (store, start) = (store.clone(), start.clone());
            std::thread::spawn(move || {
                let b = bytes(3_000 + v as usize, v);
                store.put_shard(key(v, 1, 0), &b, &hash(&b)).unwrap();
                start.wait();
                store.seal(&[v; 32], 1, &[(0, hash(&b))])
            })
        })
        .collect();
    for (v, t) in threads.into_iter().enumerate() {
        assert_eq!(t.join().unwrap().unwrap(), 3_000 + v as u64, "a seal returns the bytes it vouches for");
    }
    // At most one flush per seal (fewer when they overlap, which a barrier makes likely).
    assert!((1..=SEALS as u64).contains(&store.flushes()), "{} flushes", store.flushes());
    drop(store);
    let store = ShardStore::open(dir.path(), 1 << 30).unwrap();
    for v in 0..SEALS {
        assert_eq!(store.shard(&key(v, 1, 0)).unwrap(), bytes(3_000 + v as usize, v));
    }
}

#[test]
fn a_seal_restarts_a_versions_age_and_an_idle_delete_spares_what_was_touched() {
    let dir = tempfile::tempdir().unwrap();
    let store = ShardStore::open(dir.path(), 1 << 20).unwrap();
    let a = bytes(1_000, 1);
    store.put_shard(key(7, 0, 0), &a, &hash(&a)).unwrap();
    let version_dir = dir.path().join("shards/07").join(hex::encode([7u8; 32]));
    let backdate = || {
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3_600);
        std::fs::File::open(&version_dir).unwrap().set_modified(an_hour_ago).unwrap();
    };
    backdate();
    let old = store.age(&[7; 32]).unwrap();
    assert!(old >= std::time::Duration::from_secs(3_590), "aged {old:?}");
    // Sealed now: the receipt it signs must outlive the files, so the version is young again.
    store.seal(&[7; 32], 0, &[(0, hash(&a))]).unwrap();
    assert!(store.age(&[7; 32]).unwrap() < std::time::Duration::from_secs(60));
    assert_eq!(store.delete_if_idle(&[7; 32], old).unwrap(), None, "touched since its age was read");
    assert_eq!(store.shard(&key(7, 0, 0)).unwrap(), a);
    // Idle for as long as asked: deleted.
    backdate();
    let idle = std::time::Duration::from_secs(3_000);
    assert_eq!(store.delete_if_idle(&[7; 32], idle).unwrap(), Some(1_000));
    assert!(store.shard(&key(7, 0, 0)).is_err());
    assert_eq!(store.delete_if_idle(&[7; 32], idle).unwrap(), None, "gone");
}
