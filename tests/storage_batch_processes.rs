//! Group commit of small objects with real processes: `archipel put DIR --recursive` puts a tree
//! of small files with many PUTs under way at once, which go to the ledger together (fewer
//! transactions than files); every file reads back byte-identical. Then a storage node is killed
//! -9 just before such a put, while the ledger still lists it up: batches placed on it fail and
//! their objects go on their own, every object is stored, and every one listed reads back
//! byte-identical; and the bad uses of the command are refused with what to do.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `n` files of pseudo-random bytes under `root` (some in sub-directories), sizes
/// 1–20,000 bytes, one empty and one of 1.5 MiB (larger than group commit takes); returns
/// each relative path with its bytes.
fn tree(root: &Path, n: usize, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = BTreeMap::new();
    for i in 0..n {
        let rel = match i % 3 {
            0 => format!("f{i}.bin"),
            1 => format!("sub/f{i}.bin"),
            _ => format!("sub/deeper/f{i}.bin"),
        };
        let len = match i {
            0 => 0,
            1 => 3 << 19,
            _ => (next() % 20_000 + 1) as usize,
        };
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let path = root.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        out.insert(rel, bytes);
    }
    out
}

#[test]
fn a_tree_of_small_files_goes_in_fewer_transactions_and_survives_a_killed_holder() {
    let work = tempfile::tempdir().unwrap();
    let devnet = Devnet::start(work.path(), &["--base-ip", "127.0.97.2", "--base-port", "28200"]);
    let w = work.path();
    let (_, api, _, _) = devnet.node(0);
    let dir = devnet.dir.to_str().unwrap().to_string();
    let key = format!("{dir}/tenant.key");
    let t = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--key".into(), key.clone(), "--node".into(), api.clone()]);
        v
    };
    wait_storage_up(&api, 12);
    run(w, &args(&t(&["bucket", "create", "many"])));

    let src = w.join("tree");
    let files = tree(&src, 40, 7);
    let out =
        run(w, &args(&t(&["put", src.to_str().unwrap(), "many/tree", "--recursive", "--parallel", "16", "--json"])));
    let put: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((put["stored"].as_u64(), put["failed"].as_u64()), (Some(40), Some(0)), "{put}");
    let txs = put["transactions"].as_u64().unwrap();
    eprintln!("40 files: {txs} transactions, {} s", put["seconds"]);
    assert!(txs < 40, "40 files took {txs} transactions: nothing went together");
    let reported: BTreeMap<String, u64> = put["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["key"].as_str().unwrap().to_string(), o["size"].as_u64().unwrap()))
        .collect();
    let expected: BTreeMap<String, u64> = files.iter().map(|(k, v)| (format!("tree/{k}"), v.len() as u64)).collect();
    assert_eq!(reported, expected);

    let listed = |prefix: &str| -> BTreeMap<String, u64> {
        let ls: serde_json::Value =
            serde_json::from_str(&run(w, &args(&t(&["ls", &format!("many/{prefix}"), "--json"])))).unwrap();
        ls["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["key"].as_str().unwrap().to_string(), o["size"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(listed("tree/"), expected);
    let read_back = |key: &str, want: &[u8]| {
        let back = w.join("back.bin");
        let _ = std::fs::remove_file(&back);
        run(w, &args(&t(&["get", &format!("many/{key}"), back.to_str().unwrap()])));
        assert!(std::fs::read(&back).unwrap() == want, "{key} read back differs");
    };
    for (rel, bytes) in &files {
        read_back(&format!("tree/{rel}"), bytes);
    }

    // A storage node that is not a validator is killed just before a second tree goes up, while
    // finalized state still lists it as up: batches placed on it fail, their objects go on
    // their own (and retry without it), later batches leave it out. Whatever the put reports
    // stored, and whatever is listed, reads back byte-identical.
    let second = w.join("second");
    let files2 = tree(&second, 60, 11);
    let (victim, _, pid, _) = devnet.node(7);
    kill9(pid);
    let out = archipel(
        w,
        &args(&t(&["put", second.to_str().unwrap(), "many/second", "--recursive", "--parallel", "32", "--json"])),
    );
    let put: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("put with {victim} killed: {e}: {} / {}", stdout(&out), stderr(&out)));
    let warnings = stderr(&out);
    assert!(
        warnings.contains("putting the object on its own"),
        "no batch failed with {victim} just killed: {warnings}"
    );
    let stored: Vec<String> = put["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["error"].is_null())
        .map(|o| o["key"].as_str().unwrap().to_string())
        .collect();
    eprintln!("with {victim} killed: {} of 60 stored, {} transactions", stored.len(), put["transactions"]);
    assert_eq!(stored.len(), 60, "{put}");
    let now = listed("second/");
    for k in &stored {
        assert!(now.contains_key(k), "{k} reported stored but not listed");
    }
    for (k, size) in &now {
        let rel = k.strip_prefix("second/").unwrap();
        assert_eq!(*size, files2[rel].len() as u64, "{k}");
        read_back(k, &files2[rel]);
    }

    // Bad uses are refused with what to do.
    let e = refused(w, &args(&t(&["put", src.to_str().unwrap(), "many/x"])));
    assert!(e.contains("is a directory: pass --recursive"), "{e}");
    let e = refused(w, &args(&t(&["put", src.to_str().unwrap(), "many/x", "--recursive", "--parallel", "0"])));
    assert!(e.contains("--parallel 0: use 1 to"), "{e}");
    let empty = w.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = refused(w, &args(&t(&["put", empty.to_str().unwrap(), "many", "--recursive"])));
    assert!(e.contains("holds no files"), "{e}");
}
