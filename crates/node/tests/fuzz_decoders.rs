//! Fuzzing on stable Rust, bounded, in every `cargo test`: each decoder that reads the network or
//! the disk (`fuzz/src/targets.rs`) gets its committed corpus (`fuzz/corpus/<target>/`) and a fixed
//! number of seeded mutations of it. A panic fails the test naming the target and the input, saved
//! to a file, with the command that replays it. `cargo xtask fuzz` runs the same targets under
//! libFuzzer (nightly) for longer.
//!
//! `ARCHIPEL_FUZZ_ITERATIONS` (default 10,000 per target), `ARCHIPEL_FUZZ_SECONDS` (the time cap
//! per target, default 60) and `ARCHIPEL_FUZZ_SEED` (default 0) make longer or different runs:
//! `ARCHIPEL_FUZZ_ITERATIONS=200000 ARCHIPEL_FUZZ_SECONDS=600 ARCHIPEL_FUZZ_SEED=7 cargo test
//! -p archipel-node --test fuzz_decoders`.

#[path = "../../../fuzz/src/lib.rs"]
mod archipel_fuzz;

use archipel_fuzz::mutate::{Rng, mutate};
use archipel_fuzz::seeds::seeds;
use archipel_fuzz::targets::{TARGETS, Target, by_name, max_len, remove_scratch};
use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Mutations per target unless `ARCHIPEL_FUZZ_ITERATIONS` says otherwise.
const DEFAULT_ITERATIONS: u64 = 10_000;
/// A target stops mutating after this many seconds (unless `ARCHIPEL_FUZZ_SECONDS` says
/// otherwise) even if iterations remain (slow machines, debug builds), so the test suite's time
/// stays bounded.
const DEFAULT_SECONDS: u64 = 60;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// The committed corpus of `target`, by file name (none if its directory is missing).
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let bytes = std::fs::read(e.path()).unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    files.sort();
    files
}

/// Runs `target` on `input`; on a panic, saves the input and fails naming both.
fn check(name: &str, target: Target, what: &str, input: &[u8]) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(input))) {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
        let file = dir.join(format!("{name}-{}", &blake3::hash(input).to_hex()[..16]));
        let saved = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&file, input));
        let head: String = hex::encode(&input[..input.len().min(64)]);
        panic!(
            "fuzz target `{name}` panicked on {what} ({} bytes, starting {head}): {message}\n\
             input saved to {} ({saved:?}); after fixing the decoder, keep it as a regression input: \
             cp {} fuzz/corpus/{name}/regress-<what-it-was> && cargo test -p archipel-node --test fuzz_decoders {name}",
            input.len(),
            file.display(),
            file.display(),
        );
    }
}

/// The corpus of `name` (committed files and today's seeds), then seeded mutations of it.
fn run(name: &str) {
    let target = by_name(name).unwrap_or_else(|| panic!("no fuzz target named {name}"));
    let mut inputs = corpus(name);
    inputs.extend(seeds().into_iter().filter(|(t, _, _)| *t == name).map(|(_, n, b)| (format!("built seed {n}"), b)));
    for (what, input) in &inputs {
        check(name, target, &format!("corpus input {what}"), input);
    }
    let pool: Vec<Vec<u8>> = inputs.into_iter().map(|(_, b)| b).collect();
    let seed = env_u64("ARCHIPEL_FUZZ_SEED", 0);
    let iterations = env_u64("ARCHIPEL_FUZZ_ITERATIONS", DEFAULT_ITERATIONS);
    // Each target draws its own stream, so adding a target changes no other target's inputs.
    let mut rng =
        Rng::new(seed ^ u64::from_le_bytes(blake3::hash(name.as_bytes()).as_bytes()[..8].try_into().unwrap()));
    let budget = Duration::from_secs(env_u64("ARCHIPEL_FUZZ_SECONDS", DEFAULT_SECONDS));
    let start = Instant::now();
    let mut done = 0;
    while done < iterations && start.elapsed() < budget {
        let base = &pool[rng.below(pool.len())];
        let input = mutate(&mut rng, base, &pool, max_len(name));
        check(name, target, &format!("mutation {done} (ARCHIPEL_FUZZ_SEED={seed})"), &input);
        done += 1;
    }
    remove_scratch();
    eprintln!(
        "fuzz target {name}: {} corpus inputs and {done} of {iterations} mutations in {:.1} s, no panic",
        pool.len(),
        start.elapsed().as_secs_f64()
    );
}

macro_rules! fuzz_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                run(stringify!($target));
            }
        )*

        /// Every target in `targets.rs` has a test here, a libFuzzer binary and a corpus.
        #[test]
        fn every_target_has_a_test_a_fuzz_binary_and_a_corpus() {
            let tested: BTreeSet<&str> = [$(stringify!($target)),*].into_iter().collect();
            let listed: BTreeSet<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
            assert_eq!(tested, listed, "targets.rs and this file's test list differ");
            let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
            for name in listed {
                let bin = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
                let source = std::fs::read_to_string(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
                assert!(source.contains(&format!("targets::{name}(")), "{} does not call targets::{name}", bin.display());
                assert!(manifest.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml has no [[bin]] {name}");
                assert!(!corpus(name).is_empty(), "fuzz/corpus/{name} is empty");
            }
        }
    };
}

fuzz_tests!(
    transaction,
    transaction_json,
    block,
    ledger_block,
    descriptor,
    gossip_message,
    tx_batch,
    seal_batch,
    heartbeat,
    fetch_message,
    candidate_log,
    block_log,
    export,
    genesis,
    node_config,
    proof,
    state_snapshot,
);

/// The committed `seed-*` files are what the code builds today (encodings change when formats
/// do); `ARCHIPEL_FUZZ_WRITE_SEEDS=1` rewrites them.
#[test]
fn committed_seeds_are_current() {
    let write = std::env::var_os("ARCHIPEL_FUZZ_WRITE_SEEDS").is_some();
    let mut stale = Vec::new();
    let built = seeds();
    for (target, _) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let expected: Vec<(String, &Vec<u8>)> =
            built.iter().filter(|(t, _, _)| t == target).map(|(_, n, b)| (format!("seed-{n}"), b)).collect();
        let committed: Vec<(String, Vec<u8>)> =
            corpus(target).into_iter().filter(|(n, _)| n.starts_with("seed-")).collect();
        for (file, bytes) in &expected {
            if !committed.iter().any(|(n, b)| n == file && b == *bytes) {
                stale.push(format!("{target}/{file}"));
                if write {
                    std::fs::write(dir.join(file), bytes).unwrap();
                }
            }
        }
        for (file, _) in &committed {
            if !expected.iter().any(|(n, _)| n == file) {
                stale.push(format!("{target}/{file} (no longer built)"));
                if write {
                    std::fs::remove_file(dir.join(file)).unwrap();
                }
            }
        }
    }
    assert!(
        write || stale.is_empty(),
        "the seed corpus in fuzz/corpus differs from what fuzz/src/seeds.rs builds ({stale:?}); \
         rewrite it with: ARCHIPEL_FUZZ_WRITE_SEEDS=1 cargo test -p archipel-node --test fuzz_decoders committed_seeds"
    );
}
