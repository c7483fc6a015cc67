//! No lock-in, with real processes: a tenant exports a bucket from one network to a directory and
//! imports it into a fresh network (another genesis, other nodes, another key): the bucket comes
//! back with its placement policy, every key with its bytes, and the import resumes without
//! storing anything twice.

mod common;

use common::*;
use std::path::Path;

/// A network: its first node's URL and the tenant key's path, as CLI flags.
struct Net {
    node: String,
    key: String,
}

impl Net {
    fn of(devnet: &Devnet) -> Net {
        Net { node: devnet.node(0).1, key: format!("{}/tenant.key", devnet.dir.display()) }
    }

    fn t(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--key".into(), self.key.clone(), "--node".into(), self.node.clone()]);
        v
    }
}

fn keys(w: &Path, net: &Net, bucket: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&run(w, &args(&net.t(&["ls", bucket, "--json"])))).unwrap();
    let mut out: Vec<String> =
        v["objects"].as_array().unwrap().iter().map(|o| o["key"].as_str().unwrap().to_string()).collect();
    out.sort();
    out
}

#[test]
fn a_bucket_exported_from_one_network_is_imported_whole_into_a_fresh_one() {
    let work_a = tempfile::tempdir().unwrap();
    let work_b = tempfile::tempdir().unwrap();
    let w = work_a.path();
    let a =
        Devnet::start(w, &["--nodes", "6", "--base-ip", "127.0.99.2", "--base-port", "28600", "--s3-listen", "off"]);
    let old = Net::of(&a);
    wait_storage_up(&old.node, 6);

    // Five of the six nodes are not US-operated: a 3+2 bucket fenced so.
    run(w, &args(&old.t(&["bucket", "create", "docs", "--code", "3+2", "--deny-jurisdictions", "US"])));
    let objects = [("a.txt", bytes(10, 1)), ("reports/2026.bin", bytes(3 << 20, 2)), ("empty", vec![])];
    for (key, body) in &objects {
        let f = w.join("src.bin");
        std::fs::write(&f, body).unwrap();
        run(w, &args(&old.t(&["put", f.to_str().unwrap(), &format!("docs/{key}")])));
    }
    let out = w.join("export");
    run(w, &args(&old.t(&["export", "--bucket", "docs", "--to", out.to_str().unwrap()])));
    let old_genesis = std::fs::read(a.dir.join("genesis.json")).unwrap();
    drop(a);

    // A fresh network: its own genesis, nodes and tenant key.
    let b = Devnet::start(
        work_b.path(),
        &["--nodes", "6", "--base-ip", "127.0.100.2", "--base-port", "28800", "--s3-listen", "off"],
    );
    let new = Net::of(&b);
    assert_ne!(std::fs::read(b.dir.join("genesis.json")).unwrap(), old_genesis, "another network");
    assert_ne!(
        std::fs::read(b.dir.join("tenant.key")).unwrap(),
        std::fs::read(&old.key).unwrap(),
        "another tenant key"
    );
    wait_storage_up(&new.node, 6);
    let said = run(w, &args(&new.t(&["import", "--from", out.to_str().unwrap()])));
    eprintln!("import: {said}");
    // The bucket, with the policy it had.
    let shown: serde_json::Value =
        serde_json::from_str(&run(w, &args(&new.t(&["bucket", "show", "docs", "--json"])))).unwrap();
    assert!(shown["policy"]["code"].to_string().contains("3+2"), "{shown}");
    assert!(shown["policy"].to_string().contains("\"US\""), "the fence came along: {shown}");
    // Every key, every byte.
    let want: Vec<String> = {
        let mut k: Vec<String> = objects.iter().map(|(k, _)| k.to_string()).collect();
        k.sort();
        k
    };
    assert_eq!(keys(w, &new, "docs"), want);
    for (key, body) in &objects {
        let back = w.join("back.bin");
        run(w, &args(&new.t(&["get", &format!("docs/{key}"), back.to_str().unwrap(), "--force"])));
        assert!(std::fs::read(&back).unwrap() == *body, "docs/{key} differs after the move");
    }
    // Run again, it stores nothing twice (resumable): the same keys, the same versions.
    let versions = |net: &Net| -> Vec<String> {
        objects
            .iter()
            .map(|(key, _)| {
                let v: serde_json::Value = serde_json::from_str(&run(
                    w,
                    &args(&net.t(&[
                        "stat",
                        &format!("docs/{key}"),
                        "--json",
                        "--genesis",
                        &format!("{}/genesis.json", b.dir.display()),
                    ])),
                ))
                .unwrap();
                v["object"]["version"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let before = versions(&new);
    run(w, &args(&new.t(&["import", "--from", out.to_str().unwrap()])));
    assert_eq!(versions(&new), before, "a second import changed stored objects");
    assert_eq!(keys(w, &new, "docs"), want);
}
