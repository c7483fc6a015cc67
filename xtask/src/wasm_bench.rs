//! `cargo xtask bench wasm`: WebAssembly jobs against native code, the same C source at the same
//! `-O2`, in the same run.
//!
//! - **Kernels**: `examples/jobs/sha256chain.c` (integer: a chain of SHA-256) and
//!   `examples/jobs/mandelbrot.c` (floating point: a 1000×750 render, 2,000 iterations).
//! - **Native**: built here with `clang -O2` (Debian's `clang`), run as a process, stdout to a file.
//! - **Wasm**: the checked-in `.wasm` (built by `examples/jobs/build.sh`, same clang, `-O2`), run by
//!   `archipel job run-local` exactly as a provider runs a paid job — its own process, memory
//!   limiter, CPU watchdog, wall deadline, bounded output — stdout to a file. Its time is the whole
//!   command's: process start and compilation are part of it.
//! - **Redundant**: the float kernel again with NaN canonicalization, as jobs whose outputs are
//!   compared across providers (N > 1) run.
//!
//! Runs alternate native and wasm ([`ROUNDS`] each) so that a noisy neighbour hits both; every
//! run's output must be byte-identical to the native one's, else the bench fails. Ratios are
//! wasm ÷ native of the medians over every run; the goal is ≤ 1.1.

use crate::median;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const ROUNDS: usize = 5;

struct Kernel {
    name: &'static str,
    source: &'static str,
    args: &'static [&'static str],
    canonical_nans: bool,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        name: "integer (sha256chain)",
        source: "sha256chain",
        args: &["2000000", "archipel"],
        canonical_nans: false,
    },
    Kernel { name: "float (mandelbrot)", source: "mandelbrot", args: &["1000", "750", "2000"], canonical_nans: false },
    Kernel {
        name: "float, NaNs canonical (N > 1)",
        source: "mandelbrot",
        args: &["1000", "750", "2000"],
        canonical_nans: true,
    },
];

/// Runs the bench with the release `archipel` binary at `archipel`.
pub fn bench(archipel: &Path) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_path_buf();
    let jobs = root.join("examples/jobs");
    let work = root.join("target/bench-wasm");
    std::fs::create_dir_all(&work)?;
    println!("wasm vs native: same C source, clang -O2; {ROUNDS} runs each, alternating; limits as for paid jobs");
    let mut failed = Vec::new();
    for k in KERNELS {
        let native = build_native(&jobs, k.source, &work)?;
        let module = jobs.join(format!("{}.wasm", k.source));
        let (mut native_s, mut wasm_s) = (Vec::new(), Vec::new());
        let mut reference: Option<Vec<u8>> = None;
        for round in 0..ROUNDS {
            let out = work.join("native.out");
            let t = Instant::now();
            let status = Command::new(&native)
                .args(k.args)
                .stdout(std::fs::File::create(&out)?)
                .status()
                .with_context(|| format!("cannot run {}", native.display()))?;
            native_s.push(t.elapsed().as_secs_f64());
            if !status.success() {
                bail!("{} (native) failed: {status}", k.source);
            }
            let native_out = std::fs::read(&out)?;

            let out = work.join("wasm.out");
            let mut cmd = Command::new(archipel);
            cmd.args(["job", "run-local"]).arg(&module).arg("--output").arg(&out).arg("--json");
            for a in k.args {
                cmd.arg("--arg").arg(a);
            }
            if k.canonical_nans {
                cmd.arg("--canonical-nans");
            }
            let t = Instant::now();
            let run = cmd.output().with_context(|| format!("cannot run {}", archipel.display()))?;
            wasm_s.push(t.elapsed().as_secs_f64());
            if !run.status.success() {
                bail!(
                    "{} (wasm) failed: {}{}",
                    k.source,
                    String::from_utf8_lossy(&run.stdout),
                    String::from_utf8_lossy(&run.stderr)
                );
            }
            let wasm_out = std::fs::read(&out)?;
            if wasm_out != native_out {
                bail!(
                    "{} round {round}: the wasm output differs from the native one: not the same computation",
                    k.source
                );
            }
            match &reference {
                None => reference = Some(native_out),
                Some(r) if *r != native_out => bail!("{}: native outputs differ between runs", k.source),
                Some(_) => {}
            }
        }
        let (n, w) = (median(native_s.clone()), median(wasm_s.clone()));
        let ratio = w / n;
        let verdict = if k.canonical_nans {
            "(for reference: redundant jobs only)"
        } else if ratio <= 1.1 {
            "goal <= 1.1: met"
        } else {
            failed.push(k.name);
            "goal <= 1.1: NOT met"
        };
        println!(
            "  {:<31} native {:.3} s  wasm {:.3} s  ratio {:.2}x  {verdict}\n    native runs {:?}\n    wasm runs   {:?}",
            k.name,
            n,
            w,
            ratio,
            secs(&native_s),
            secs(&wasm_s)
        );
    }
    if failed.is_empty() {
        println!("wasm vs native: every kernel within 1.1x");
    } else {
        println!("wasm vs native: goal not met for {failed:?}");
    }
    Ok(())
}

fn secs(v: &[f64]) -> Vec<String> {
    v.iter().map(|s| format!("{s:.3}")).collect()
}

/// Builds `examples/jobs/NAME.c` natively with `clang -O2` into `work`.
fn build_native(jobs: &Path, name: &str, work: &Path) -> Result<PathBuf> {
    let out = work.join(name);
    let status = Command::new("clang")
        .arg("-O2")
        .arg(jobs.join(format!("{name}.c")))
        .arg("-o")
        .arg(&out)
        .status()
        .context("cannot run clang: install it (apt-get install clang wasi-libc lld libclang-rt-dev-wasm32)")?;
    if !status.success() {
        bail!("clang -O2 {name}.c failed: {status}");
    }
    Ok(out)
}
