//! `cargo xtask fuzz [--seconds N] [TARGET…]`: runs the libFuzzer targets of `fuzz/` for N seconds
//! each (default 30), starting from the committed corpus, with cargo-fuzz on a nightly toolchain.
//!
//! Where nightly or cargo-fuzz is missing it says so and succeeds: CI runs from a clean clone
//! with stable Rust only, and `cargo test` has already run every target on its corpus and on
//! bounded, seeded mutations (`crates/node/tests/fuzz_decoders.rs`).

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::{Command, Stdio};

/// Seconds per target unless `--seconds` says otherwise.
const DEFAULT_SECONDS: u64 = 30;

/// Why fuzzing cannot run here, if it cannot: no rustup, no nightly toolchain, or no cargo-fuzz.
fn missing_tool() -> Option<String> {
    let toolchains = Command::new("rustup").args(["toolchain", "list"]).output();
    let Ok(toolchains) = toolchains else {
        return Some("rustup is not installed, so there is no nightly toolchain".into());
    };
    if !String::from_utf8_lossy(&toolchains.stdout).lines().any(|l| l.starts_with("nightly")) {
        return Some("no nightly toolchain is installed (rustup toolchain install nightly)".into());
    }
    let fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !fuzz.is_ok_and(|s| s.success()) {
        return Some("cargo-fuzz is not installed (cargo install cargo-fuzz)".into());
    }
    None
}

/// The targets: one `fuzz/fuzz_targets/<name>.rs` each.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".rs").map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// The figure libFuzzer prints for `stat` with `-print_final_stats=1`.
fn final_stat(log: &str, stat: &str) -> Option<u64> {
    log.lines().find_map(|l| l.strip_prefix(&format!("stat::{stat}:"))?.trim().parse().ok())
}

/// Runs the subcommand with its arguments (after `fuzz`).
pub fn run(args: &[String]) -> Result<()> {
    let mut seconds = DEFAULT_SECONDS;
    let mut only = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().context("--seconds needs a number")?;
                seconds = value.parse().with_context(|| format!("--seconds {value:?} is not a number"))?;
            }
            name if !name.starts_with('-') => only.push(name.to_string()),
            other => bail!("unknown option {other:?}: cargo xtask fuzz [--seconds N] [TARGET...]"),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_path_buf();
    let fuzz_dir = root.join("fuzz");
    let all = targets(&fuzz_dir)?;
    if let Some(unknown) = only.iter().find(|t| !all.contains(t)) {
        bail!("no fuzz target {unknown:?}; the targets are: {}", all.join(", "));
    }
    let chosen = if only.is_empty() { all } else { only };
    if let Some(why) = missing_tool() {
        println!(
            "fuzz: skipping the libFuzzer run: {why}. `cargo test` has already run every target on its corpus and \
             on bounded mutations (crates/node/tests/fuzz_decoders.rs)."
        );
        return Ok(());
    }

    // Debug assertions (and the crate's overflow checks) as in the stable harness's debug build:
    // an overflow on decoded input is a finding.
    let status = Command::new("cargo")
        .current_dir(&root)
        .args(["+nightly", "fuzz", "build", "--debug-assertions"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .status()
        .context("cannot run cargo +nightly fuzz build")?;
    if !status.success() {
        bail!("cargo +nightly fuzz build failed (see above)");
    }

    let work = fuzz_dir.join("target/xtask");
    let mut crashed = Vec::new();
    for target in &chosen {
        // New inputs go to a scratch corpus (the first directory); the committed one is read only.
        let scratch = work.join("corpus").join(target);
        std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
        let log_path = work.join(format!("{target}.log"));
        let log = std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
        let status = Command::new("cargo")
            .current_dir(&root)
            .args(["+nightly", "fuzz", "run", "--debug-assertions", target])
            .arg(&scratch)
            .arg(fuzz_dir.join("corpus").join(target))
            .args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=1", "-timeout=20"])
            .args(["-rss_limit_mb=2048", "-malloc_limit_mb=1024", "-max_len=262144"])
            .env("RUSTUP_AUTO_INSTALL", "0")
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("cannot run cargo +nightly fuzz run {target}"))?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if status.success() {
            let runs = final_stat(&text, "number_of_executed_units").unwrap_or(0);
            println!("fuzz {target}: no crash in {runs} runs ({seconds} s)");
            continue;
        }
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        for line in tail.into_iter().rev() {
            println!("  {line}");
        }
        // `cargo fuzz run` rebuilds first: sources edited during the run can fail that build.
        if text.contains("failed to build fuzz script") {
            bail!("fuzz {target}: the target did not build (log {})", log_path.display());
        }
        println!("fuzz {target}: CRASH (log {}; the input is in fuzz/artifacts/{target}/)", log_path.display());
        crashed.push(target.clone());
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {}. Reproduce with `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>`; \
             after the fix, keep the input as fuzz/corpus/<target>/regress-<what-it-was> (the stable harness replays it)",
            crashed.join(", ")
        );
    }
    Ok(())
}
