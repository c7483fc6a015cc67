//! Object storage with real processes on the default 12-node devnet topology: a bucket "EU only,
//! no US operators", an impossible policy refused with the numbers, PUT/GET/range/ls/stat/rm
//! through the CLI, files only on holders inside the fence, no plaintext in any node's data
//! directory, a rotting holder caught by its audit (shard moved, reputation lowered), reads that
//! survive m killed holders, a clean "unrecoverable" beyond, health, and repair by the network.

mod common;

use common::*;
use std::collections::BTreeSet;

fn key_path(dir: &str) -> String {
    format!("{dir}/tenant.key")
}

#[test]
fn objects_are_stored_encrypted_inside_the_geofence_and_survive_m_lost_holders() {
    let work = tempfile::tempdir().unwrap();
    // One-second audit epochs, so a rotten holder is caught within the test; collectors pass every
    // 3 s instead of 30 (a deleted version's files go after two passes).
    let fast_collector = [("ARCHIPEL_COLLECT_EVERY_SECS", "3")];
    let devnet = Devnet::start_with_env(
        work.path(),
        &["--base-ip", "127.0.91.2", "--base-port", "26500", "--audit-epoch-ms", "1000"],
        &fast_collector,
    );
    let w = work.path();
    let node = devnet.node(0).1;
    let dir = devnet.dir.to_str().unwrap().to_string();
    let key = format!("{dir}/tenant.key");
    let genesis = format!("{dir}/genesis.json");
    let t = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--key".into(), key.clone(), "--node".into(), node.clone()]);
        v
    };

    wait_storage_up(&node, 12);

    // A policy the network cannot place is refused with the numbers.
    let e = refused(
        w,
        &args(&t(&["bucket", "create", "wide", "--code", "8+2", "--regions", "eu", "--deny-jurisdictions", "US"])),
    );
    assert!(
        e.contains("needs 10 nodes in regions [eu] outside US jurisdiction") && e.contains("8 of the 12 live nodes"),
        "{e}"
    );
    run(
        w,
        &args(&t(&[
            "bucket",
            "create",
            "eu-docs",
            "--regions",
            "eu",
            "--deny-jurisdictions",
            "US",
            "--min-regions",
            "2",
            "--min-operators",
            "2",
        ])),
    );
    let e = refused(w, &args(&t(&["bucket", "create", "eu-docs"])));
    assert!(e.contains("exists already"), "{e}");
    // Listed, and shown with its fence and spread (the refused one is nowhere).
    let listed: serde_json::Value = serde_json::from_str(&run(w, &args(&t(&["bucket", "ls", "--json"])))).unwrap();
    let names: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|b| b["name"].as_str()).collect();
    assert!(names.contains(&"eu-docs") && !names.contains(&"wide"), "{listed}");
    let table = run(w, &args(&t(&["bucket", "ls"])));
    assert!(table.contains("eu-docs") && table.contains("4+2"), "{table}");
    let shown = run(w, &args(&t(&["bucket", "show", "eu-docs"])));
    assert!(shown.contains("regions [eu]") && shown.contains("US"), "{shown}");
    assert!(shown.contains("at least 2 regions and 2 operators"), "{shown}");
    let e = refused(w, &args(&t(&["bucket", "show", "no-such-bucket"])));
    assert!(e.contains("no-such-bucket"), "{e}");

    // A file with a known marker throughout, over several segments.
    let marker = b"ARCHIPEL-PLAINTEXT-MARKER-7f3a9c";
    let mut body: Vec<u8> = Vec::with_capacity(20 << 20);
    let mut x = 7u64;
    while body.len() < 20 << 20 {
        body.extend_from_slice(marker);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.extend_from_slice(&x.to_le_bytes());
    }
    let src = w.join("report.bin");
    std::fs::write(&src, &body).unwrap();
    let out = run(w, &args(&t(&["put", src.to_str().unwrap(), "eu-docs/reports/2026.bin", "--json"])));
    let put: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(put["size"], body.len() as u64, "{put}");
    run(w, &args(&t(&["put", src.to_str().unwrap(), "eu-docs/reports/copy.bin"])));
    run(w, &args(&t(&["put", src.to_str().unwrap(), "eu-docs/top.bin"])));

    // Read back whole and by range (across a segment boundary: a segment holds 8,388,592 bytes).
    let back = w.join("back.bin");
    run(w, &args(&t(&["get", "eu-docs/reports/2026.bin", back.to_str().unwrap()])));
    assert!(std::fs::read(&back).unwrap() == body, "the object read back differs");
    let part = w.join("part.bin");
    run(w, &args(&t(&["get", "eu-docs/reports/2026.bin", part.to_str().unwrap(), "--range", "8388500-8388700"])));
    assert_eq!(std::fs::read(&part).unwrap(), body[8_388_500..=8_388_700]);
    let e = refused(w, &args(&t(&["get", "eu-docs/reports/2026.bin", back.to_str().unwrap()])));
    assert!(e.contains("exists: pass --force"), "{e}");

    // Listing with a delimiter; stat shows only EU, non-US holders and a verified proof.
    let ls: serde_json::Value =
        serde_json::from_str(&run(w, &args(&t(&["ls", "eu-docs", "--delimiter", "/", "--json"])))).unwrap();
    assert_eq!(ls["common_prefixes"], serde_json::json!(["reports/"]), "{ls}");
    assert_eq!(ls["objects"].as_array().unwrap().len(), 1);
    let stat_of = |key: &str, node: &str| -> serde_json::Value {
        let out =
            archipel(w, &["stat", key, "--genesis", &genesis, "--json", "--key", &key_path(&dir), "--node", node]);
        assert!(out.status.success(), "stat {key}: {}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    let inside = |h: &serde_json::Value| {
        h["region"].as_str().unwrap().starts_with("eu-") && h["jurisdiction"].as_str().unwrap() != "US"
    };
    let stat = stat_of("eu-docs/reports/2026.bin", &node);
    let holders = stat["holders"].as_array().unwrap().clone();
    assert_eq!(holders.len(), 6);
    assert!(holders.iter().all(inside), "{holders:?}");
    assert!(stat["proven_in_block"].as_u64().unwrap() > 0);

    // On disk too: only the holders of each object have its files, none outside the fence, and
    // no node's data directory holds the plaintext.
    let all = files(&devnet.dir.join("nodes"));
    for key in ["eu-docs/reports/2026.bin", "eu-docs/reports/copy.bin", "eu-docs/top.bin"] {
        let st = stat_of(key, &node);
        let version = st["object"]["version"].as_str().unwrap().to_string();
        let on: BTreeSet<String> = all
            .iter()
            .filter(|p| p.to_string_lossy().contains(&version))
            .map(|p| {
                p.strip_prefix(devnet.dir.join("nodes")).unwrap().iter().next().unwrap().to_string_lossy().into_owned()
            })
            .collect();
        let listed: BTreeSet<String> =
            st["holders"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap().to_string()).collect();
        assert_eq!(on, listed, "{key}: files on {on:?}, holders {listed:?}");
        assert!(on.iter().all(|n| !["n04", "n10", "n11", "n12"].contains(&n.as_str())), "{on:?}");
    }
    for p in &all {
        let bytes = std::fs::read(p).unwrap_or_default();
        assert!(!bytes.windows(marker.len()).any(|win| win == marker), "{} holds plaintext", p.display());
    }

    let version = stat["object"]["version"].as_str().unwrap().to_string();
    let shard_file = |name: &str, index: usize, segment: u64| {
        devnet
            .dir
            .join("nodes")
            .join(name)
            .join("data/shards/shards")
            .join(&version[..2])
            .join(&version)
            .join(format!("{index}.{segment}"))
    };
    let names: Vec<String> = holders.iter().map(|h| h["name"].as_str().unwrap().to_string()).collect();
    let validators: Vec<String> = (0..4).map(|i| devnet.node(i).0).collect();

    // Audits: one holder's shards all rot on disk. Within a few one-second audit epochs its
    // auditor fetches a challenged shard, finds it wrong, reports it; the shard is rebuilt on a
    // compliant node and the holder's reputation falls. Reads never return wrong bytes meanwhile.
    // What every node's auditor and repairer last said, for a failure message: which step
    // (challenge, report, rebuild, move) stopped.
    let workers_said = || {
        let said: Vec<String> = (0..12)
            .map(|i| {
                let (name, url, _, _) = devnet.node(i);
                let said =
                    rt().block_on(archipel_node::client::ApiClient::new(&url).get::<serde_json::Value>("/v1/workers"));
                format!("{name}: {}", said.map_or_else(|e| e.to_string(), |v| v.to_string()))
            })
            .collect();
        said.join("\n")
    };
    let rotten = (0..6).find(|i| !validators.contains(&names[*i])).unwrap();
    for segment in 0..3 {
        let f = shard_file(&names[rotten], rotten, segment);
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[1000] ^= 0x55;
        std::fs::write(&f, &bytes).unwrap();
    }
    let out = run(w, &args(&t(&["get", "eu-docs/reports/2026.bin", w.join("b2.bin").to_str().unwrap(), "--json"])));
    assert!(std::fs::read(w.join("b2.bin")).unwrap() == body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let audited = loop {
        let st = stat_of("eu-docs/reports/2026.bin", &node);
        if st["holders"][rotten]["name"].as_str().unwrap() != names[rotten] {
            break st;
        }
        if std::time::Instant::now() >= deadline {
            panic!(
                "the rotten holder {} was never caught; last get: {out}\nobject now: {st}\nworkers:\n{}",
                names[rotten],
                workers_said()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(audited["holders"].as_array().unwrap().iter().all(inside));
    let nodes: serde_json::Value =
        rt().block_on(archipel_node::client::ApiClient::new(&node).get("/v1/storage/nodes")).unwrap();
    let reputation = |name: &str| {
        nodes["nodes"].as_array().unwrap().iter().find(|n| n["name"] == name).unwrap()["reputation"].as_u64().unwrap()
    };
    assert_eq!(reputation(&names[rotten]), 750, "the failed audit costs the holder");
    let shown: serde_json::Value = serde_json::from_str(&run(w, &["nodes", "--json", "--node", &node])).unwrap();
    let row = shown["nodes"].as_array().unwrap().iter().find(|n| n["name"] == names[rotten].as_str()).unwrap().clone();
    assert_eq!(row["reputation"], 750, "`archipel nodes` shows it: {row}");
    let names: Vec<String> =
        audited["holders"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap().to_string()).collect();

    // Kill -9 two holders that are not validators (two of four validators down would stop
    // consensus): every read still returns the right bytes.
    let killed: Vec<usize> = (0..6).filter(|i| !validators.contains(&names[*i])).take(2).collect();
    assert_eq!(killed.len(), 2, "{names:?}");
    let index_of = |name: &str| (0..12).find(|i| devnet.node(*i).0 == name).unwrap();
    let ask = devnet.node((0..12).find(|i| !names.contains(&devnet.node(*i).0)).unwrap()).1;
    for i in &killed {
        let pid = devnet.node(index_of(&names[*i])).2;
        kill9(pid);
    }
    let t2 = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--key".into(), key.clone(), "--node".into(), ask.clone()]);
        v
    };
    let back3 = w.join("back3.bin");
    run(w, &args(&t2(&["get", "eu-docs/reports/2026.bin", back3.to_str().unwrap()])));
    assert!(std::fs::read(&back3).unwrap() == body);

    // A third shard of segment 0 rots: three of six unusable — "unrecoverable", never wrong
    // bytes, no file left behind. Healed at once; an audit may catch it meanwhile, and then the
    // repair below must still rebuild the killed holders' shards first (the fence has room for
    // two new holders, not three).
    let third = (0..6).find(|i| !killed.contains(i)).unwrap();
    let f = shard_file(&names[third], third, 0);
    let good = std::fs::read(&f).unwrap();
    let mut bad = good.clone();
    bad[7] ^= 1;
    std::fs::write(&f, &bad).unwrap();
    let lost = w.join("lost.bin");
    let e = refused(w, &args(&t2(&["get", "eu-docs/reports/2026.bin", lost.to_str().unwrap()])));
    std::fs::write(&f, &good).unwrap();
    assert!(e.contains("unrecoverable"), "{e}");
    assert!(!lost.exists() && !w.join("lost.archipel-partial").exists());

    // Health shows the degraded segments once the leases expire.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let health: serde_json::Value = serde_json::from_str(&run(w, &args(&t2(&["health", "--json"])))).unwrap();
        let b = &health["buckets"][0];
        // Both killed holders of 2026.bin down: it survives no further loss.
        if b["degraded_segments"].as_u64().unwrap() >= 3 && b["tolerates_losses"].as_i64().unwrap() <= 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the killed holders never showed: {health}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    // Repair, with no operator action: once the killed holders have been down for the repair
    // grace, their shards are rebuilt on live EU, non-US nodes and moved there.
    let mut degraded_seen = 0.0f64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let repaired = loop {
        degraded_seen = degraded_seen.max(metric(&ask, "storage_degraded_objects"));
        let out = archipel(w, &args(&t2(&["stat", "eu-docs/reports/2026.bin", "--genesis", &genesis, "--json"])));
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
            let now: Vec<String> =
                v["holders"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap().to_string()).collect();
            if killed.iter().all(|i| now[*i] != names[*i]) {
                break v;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no repair within 90 s; last stat: {}{}\nworkers:\n{}",
            stdout(&out),
            stderr(&out),
            workers_said()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    // The metrics showed it: degraded objects while waiting, and the repairs somebody submitted.
    assert!(degraded_seen >= 1.0, "storage_degraded_objects never rose");
    let live: Vec<String> =
        (0..12).map(|i| devnet.node(i)).filter(|n| !killed.iter().any(|k| names[*k] == n.0)).map(|n| n.1).collect();
    let repairs: f64 = live.iter().map(|u| metric(u, "storage_repairs_submitted")).sum();
    assert!(repairs >= 1.0, "no node counted a repair");
    for h in repaired["holders"].as_array().unwrap() {
        assert!(inside(h), "{h}");
        assert_eq!(h["lease"], "up", "{h}");
    }
    // Every rebuilt shard is on its new holder and matches the manifest.
    let tenant = archipel_crypto::Identity::load(std::path::Path::new(&key)).unwrap();
    let shards = archipel_objects::http::HttpShards::new(tenant);
    let record: archipel_ledger::storage::ObjectRecord = serde_json::from_value(repaired["object"].clone()).unwrap();
    let now: Vec<archipel_objects::transfer::Holder> = repaired["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| archipel_objects::transfer::Holder {
            node: h["node"].as_str().unwrap().parse().unwrap(),
            url: h["api_url"].as_str().unwrap().to_string(),
        })
        .collect();
    let manifest = rt().block_on(archipel_objects::transfer::fetch_manifest(&shards, &record, &now)).unwrap();
    for i in &killed {
        for segment in 0..3u64 {
            use archipel_objects::transfer::Shards as _;
            let got = rt().block_on(shards.get_shard(&now[*i], &record.version, *i as u8, segment)).unwrap();
            assert_eq!(
                archipel_objects::shard_hash(&got),
                manifest.segments[segment as usize][*i],
                "shard {i}.{segment}"
            );
        }
    }

    // Another key (a member node's: a Byzantine peer) cannot touch the committed version: an
    // uploader's claim with its own nonce does not make this version, a repair's claim is held
    // to the ledger's manifest root and that manifest's hashes, and a claim for another object
    // is refused. The real shards and manifest are untouched.
    {
        use archipel_objects::transfer::{Claim, SealWith, Shards as _};
        let attacker_dir = devnet.node(0).3.parent().unwrap().to_path_buf();
        let attacker = archipel_crypto::Identity::load(&attacker_dir.join("node.key")).unwrap();
        let evil = archipel_objects::http::HttpShards::new(attacker);
        let object = archipel_ledger::storage::object_id("eu-docs", "reports/2026.bin");
        let junk = vec![0x5au8; 1000];
        let junk_hash = archipel_objects::shard_hash(&junk);
        let owner_claim = Claim::Owner { object, nonce: [7; 32] };
        // The attacker uploads the junk as shard `index` of segment `segment`: the code refused.
        let planted = |h: &archipel_objects::transfer::Holder, v: &archipel_ledger::Hash, c: &Claim, index, segment| {
            let r = rt().block_on(evil.put_shard(h, v, c, index, segment, junk.clone().into(), junk_hash));
            r.unwrap_err().code
        };
        let e = planted(&now[0], &record.version, &owner_claim, 0, 0);
        assert_eq!(e.as_deref(), Some("not_your_version"));
        let with_manifest = |m: &archipel_ledger::storage::Manifest, shard: Option<&[u8]>| SealWith {
            manifest: Some(m.to_bytes().into()),
            shard: shard.map(|b| b.to_vec().into()),
        };
        let e = rt().block_on(evil.seal(&now[0], &record.version, &owner_claim, 0, 0, with_manifest(&manifest, None)));
        assert_eq!(e.unwrap_err().code.as_deref(), Some("not_your_version"));
        let committed = Claim::Committed { object };
        let e = planted(&now[1], &record.version, &committed, 1, 0);
        assert_eq!(e.as_deref(), Some("hash_mismatch"), "a shard the manifest does not list");
        let mut fake = manifest.clone();
        fake.segments[0][1] = junk_hash;
        let e = rt().block_on(evil.put_manifest(&now[1], &record.version, &committed, fake.to_bytes().into()));
        assert_eq!(e.unwrap_err().code.as_deref(), Some("hash_mismatch"), "a manifest without the ledger's root");
        // The same two riding with a seal (manifest, then a shard in one body): refused alike.
        let e = rt().block_on(evil.seal(&now[1], &record.version, &committed, 1, 1, with_manifest(&fake, Some(&junk))));
        assert_eq!(e.unwrap_err().code.as_deref(), Some("hash_mismatch"), "a seal carrying a fake manifest");
        let e =
            rt().block_on(evil.seal(&now[1], &record.version, &committed, 1, 1, with_manifest(&manifest, Some(&junk))));
        assert_eq!(e.unwrap_err().code.as_deref(), Some("hash_mismatch"), "a seal carrying a junk shard");
        let other = Claim::Committed { object: archipel_ledger::storage::object_id("eu-docs", "top.bin") };
        let e = planted(&now[1], &record.version, &other, 1, 0);
        assert_eq!(e.as_deref(), Some("not_committed"));
        // A node that holds nothing of the object: junk under the version's name is refused
        // too — there is no manifest yet to check it against, and the right one goes in.
        let ids: Vec<archipel_types::NodeId> = now.iter().map(|h| h.node).collect();
        let bystander = (0..12)
            .map(|i| (devnet.id(i), devnet.node(i).1))
            .find(|(id, url)| !ids.contains(id) && live.contains(url))
            .map(|(node, url)| archipel_objects::transfer::Holder { node, url })
            .unwrap();
        let e = planted(&bystander, &record.version, &committed, 1, 0);
        assert_eq!(e.as_deref(), Some("shard_not_found"), "no manifest to check against");
        rt().block_on(evil.put_manifest(&bystander, &record.version, &committed, manifest.to_bytes().into())).unwrap();
        let e = planted(&bystander, &record.version, &committed, 1, 0);
        assert_eq!(e.as_deref(), Some("hash_mismatch"));
        let got = rt().block_on(shards.get_shard(&now[1], &record.version, 1, 0)).unwrap();
        assert_eq!(archipel_objects::shard_hash(&got), manifest.segments[0][1], "the holder's shard is untouched");
        let kept = rt().block_on(shards.get_manifest(&now[1], &record.version)).unwrap();
        let kept = archipel_ledger::storage::Manifest::from_bytes(&kept).unwrap();
        assert_eq!(kept.root(), record.manifest_root, "the holder's manifest is untouched");
        // An upload in flight: the tenant writes a shard of a fresh version of its own; a holder
        // that saw its claim (nonce included) replays it with its own key — refused, for writes
        // and for the seal, and the tenant's shard stays.
        let tenant_id = archipel_crypto::Identity::load(std::path::Path::new(&key)).unwrap().node_id();
        let nonce = [0x42; 32];
        let fresh = archipel_ledger::storage::version_id(&tenant_id, &object, &nonce);
        let claim = Claim::Owner { object, nonce };
        let mine = vec![0x11u8; 2000];
        let mine_hash = archipel_objects::shard_hash(&mine);
        rt().block_on(shards.put_shard(&now[2], &fresh, &claim, 2, 0, mine.clone().into(), mine_hash)).unwrap();
        let e = planted(&now[2], &fresh, &claim, 2, 0);
        assert_eq!(e.as_deref(), Some("not_your_version"), "a replayed claim from another key");
        let e = planted(&now[2], &fresh, &claim, 2, 1);
        assert_eq!(e.as_deref(), Some("not_your_version"), "nor a shard the tenant has not sent yet");
        let e = rt().block_on(evil.seal(&now[2], &fresh, &claim, 2, 0, SealWith::default()));
        assert_eq!(e.unwrap_err().code.as_deref(), Some("not_your_version"));
        assert_eq!(rt().block_on(shards.get_shard(&now[2], &fresh, 2, 0)).unwrap(), mine);
    }

    // Every object repaired: nothing degraded, each survives m more losses.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let health: serde_json::Value = serde_json::from_str(&run(w, &args(&t2(&["health", "--json"])))).unwrap();
        let b = &health["buckets"][0];
        if b["degraded_segments"] == 0 {
            assert_eq!((b["tolerates_losses"].as_i64(), b["repair_queue"].as_u64()), (Some(2), Some(0)), "{health}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "objects still degraded: {health}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let back4 = w.join("back4.bin");
    run(w, &args(&t2(&["get", "eu-docs/reports/2026.bin", back4.to_str().unwrap()])));
    assert!(std::fs::read(&back4).unwrap() == body, "the repaired object reads back different");

    // Bad input: unknown bucket and key, a key path without a key, deletion.
    let e = refused(w, &args(&t2(&["put", src.to_str().unwrap(), "nope/x"])));
    assert!(e.contains("no bucket \"nope\""), "{e}");
    let e = refused(w, &args(&t2(&["get", "eu-docs/missing", lost.to_str().unwrap()])));
    assert!(e.contains("no object eu-docs/missing"), "{e}");
    let e = refused(w, &args(&t2(&["put", src.to_str().unwrap(), "eu-docs"])));
    assert!(e.contains("BUCKET/KEY"), "{e}");
    // Deletion, then garbage collection: the holders of the deleted version delete its files,
    // and a listed version's stay, however old. The collector waits until no receipt signed when
    // the files were written can still be valid (10 min + a margin, from the files' age): the
    // test ages both versions' directories by half an hour instead of waiting.
    let version_dirs = |key: &str| -> Vec<(String, std::path::PathBuf)> {
        let st = stat_of(key, &node);
        let v = st["object"]["version"].as_str().unwrap().to_string();
        let holders = st["holders"].as_array().unwrap().clone();
        holders
            .iter()
            .filter(|h| h["lease"] == "up")
            .map(|h| {
                let name = h["name"].as_str().unwrap().to_string();
                let d = devnet.dir.join("nodes").join(&name).join("data/shards/shards").join(&v[..2]).join(&v);
                (name, d)
            })
            .collect()
    };
    let deleted_dirs = version_dirs("eu-docs/top.bin");
    let kept_dirs = version_dirs("eu-docs/reports/copy.bin");
    assert!(deleted_dirs.len() >= 4 && kept_dirs.len() >= 4, "{deleted_dirs:?} {kept_dirs:?}");
    run(w, &args(&t2(&["rm", "eu-docs/top.bin"])));
    let half_an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(1800);
    for (_, d) in deleted_dirs.iter().chain(&kept_dirs) {
        std::fs::File::open(d).unwrap().set_modified(half_an_hour_ago).unwrap();
    }
    let collected_from = std::time::Instant::now();
    let ls: serde_json::Value = serde_json::from_str(&run(w, &args(&t2(&["ls", "eu-docs", "--json"])))).unwrap();
    let keys: Vec<&str> = ls["objects"].as_array().unwrap().iter().map(|o| o["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["reports/2026.bin", "reports/copy.bin"]);
    let e = refused(w, &args(&t2(&["bucket", "rm", "eu-docs"])));
    assert!(e.contains("still holds 2 objects"), "{e}");

    // Crash durability: a holder killed -9 long after its receipt and started again serves what
    // it sealed. With two other holders of the object down too, a read needs all four left — it
    // included — and returns the right bytes.
    let copy = stat_of("eu-docs/reports/copy.bin", &node);
    let up_holders: Vec<usize> = copy["holders"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["lease"] == "up" && !validators.iter().any(|v| h["name"] == v.as_str()))
        .map(|h| index_of(h["name"].as_str().unwrap()))
        .collect();
    assert!(up_holders.len() >= 3, "three holders that are not validators: {copy}");
    let (restarted, others) = (up_holders[0], &up_holders[1..3]);
    let (_, url, pid, config) = devnet.node(restarted);
    kill9(pid);
    let gone = std::time::Instant::now();
    // Its sockets close with its last thread: wait for /proc to forget it (not only for it to be a
    // zombie) before the restart.
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && gone.elapsed() < std::time::Duration::from_secs(10)
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _again = Reaped(spawn_with_env(w, &["node", "run", "--config", config.to_str().unwrap()], &fast_collector));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let answers = || rt().block_on(http.get(format!("{url}/health")).send()).is_ok_and(|r| r.status().is_success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !answers() {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted holder never answered: {}",
            spawned_log_tail(w, 20)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // And Up again in finalized state before the others die (a restart slower than the repair
    // grace would have had its shards moved already; this keeps a slow one from racing on).
    let restarted_name = devnet.node(restarted).0;
    while {
        let v: serde_json::Value =
            rt().block_on(archipel_node::client::ApiClient::new(&node).get("/v1/storage/nodes")).unwrap();
        !v["nodes"].as_array().unwrap().iter().any(|n| n["name"] == restarted_name.as_str() && n["lease"] == "up")
    } {
        assert!(std::time::Instant::now() < deadline, "the restarted holder's lease never came up again");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let restarted_at = std::time::Instant::now();
    for i in others {
        kill9(devnet.node(*i).2);
    }
    let back5 = w.join("back5.bin");
    run(w, &args(&t(&["get", "eu-docs/reports/copy.bin", back5.to_str().unwrap()])));
    assert!(std::fs::read(&back5).unwrap() == body, "read through the restarted holder");

    // The collectors (a pass every 3 s here; a version unlisted on two passes in a row goes) of the
    // deleted version's holders that are still running have deleted its files.
    // The holder killed and restarted above runs under a new pid (it replayed its chain and
    // rebuilt nothing of its shards): it counts as running too.
    let again_pid = _again.0.id();
    let running = |name: &str| {
        (name == restarted_name && pid_alive(again_pid))
            || (0..12).any(|i| devnet.node(i).0 == name && pid_alive(devnet.node(i).2))
    };
    // From the later of the deletion and the restarted holder's answer (its collector starts then).
    let deadline =
        (collected_from + std::time::Duration::from_secs(60)).max(restarted_at + std::time::Duration::from_secs(30));
    loop {
        let left: Vec<&String> =
            deleted_dirs.iter().filter(|(n, d)| running(n) && d.exists()).map(|(n, _)| n).collect();
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the deleted version's files are still on {left:?}");
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    assert!(deleted_dirs.iter().any(|(n, _)| running(n)), "no holder of the deleted version left running to check");
    // A listed version aged alike stays on every running holder, also after two more passes of
    // every collector (a holder of it alone made no pass the deletion above waited for).
    std::thread::sleep(std::time::Duration::from_secs(7));
    for (n, d) in kept_dirs.iter().filter(|(n, _)| running(n)) {
        assert!(d.exists(), "{n} collected a listed version: {}", d.display());
    }
    assert!(kept_dirs.iter().any(|(n, _)| running(n)), "no holder of the listed version left running to check");
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}
