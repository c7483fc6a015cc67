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
//! - **Redundant**: the float kernel again with canonical NaNs, as jobs whose outputs are compared
//!   across providers (N > 1) run: `archipel_compute::canon` rewrites the module so that an
//!   arithmetic result is made canonical unless only NaN-blind instructions take it.
//!
//! Runs alternate native and wasm ([`ROUNDS`] each, the order flipped every round) so that a noisy
//! neighbour hits both; every run's output must be byte-identical to the native one's and every
//! wasm run must end `exited` 0, else the bench fails. The checked-in `.wasm` is first rebuilt here
//! by `examples/jobs/build.sh` with the same clang and must equal it. The ratio is wasm ÷ native of
//! the **total** time over every run of the kernel; the goal is ≤ 1.1 on every row, the
//! canonical-NaN row included (judged, and said when it misses). The fixed cost of a wasm run
//! (process start, engine, compilation: `sha256chain 1 x`) is measured in the same run and printed
//! apart.

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
    rebuilt_equals_checked_in(&root, &work)?;
    let fixed = {
        let mut v = Vec::new();
        for _ in 0..ROUNDS {
            v.push(run_wasm(archipel, &jobs.join("sha256chain.wasm"), &["1", "x"], false, &work.join("fixed.out"))?.0);
        }
        median(v)
    };
    println!("  fixed cost of a wasm run (start, engine, compile; sha256chain 1 x): median {:.3} s", fixed);
    let mut failed = Vec::new();
    for k in KERNELS {
        let native = build_native(&jobs, k.source, &work)?;
        let module = jobs.join(format!("{}.wasm", k.source));
        let (mut native_s, mut wasm_s) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let (mut n, mut w) = (None, None);
            // Native first on even rounds, wasm first on odd ones.
            for native_turn in if round % 2 == 0 { [true, false] } else { [false, true] } {
                if native_turn {
                    n = Some(run_native(&native, k.args, &work.join("native.out"))?);
                } else {
                    w = Some(run_wasm(archipel, &module, k.args, k.canonical_nans, &work.join("wasm.out"))?);
                }
            }
            let ((n_s, native_out), (w_s, wasm_out)) = (n.context("native run")?, w.context("wasm run")?);
            if wasm_out != native_out {
                bail!(
                    "{} round {round}: the wasm output differs from the native one: not the same computation",
                    k.source
                );
            }
            native_s.push(n_s);
            wasm_s.push(w_s);
        }
        let (n, w): (f64, f64) = (native_s.iter().sum(), wasm_s.iter().sum());
        let ratio = w / n;
        let verdict = if ratio <= 1.1 {
            "goal <= 1.1: met"
        } else {
            failed.push(k.name);
            "goal <= 1.1: NOT met"
        };
        println!(
            "  {:<31} native {:.3} s  wasm {:.3} s (totals of {ROUNDS} runs)  ratio {:.2}x  {verdict}\n    native runs {:?}\n    wasm runs   {:?}",
            k.name,
            n,
            w,
            ratio,
            secs(&native_s),
            secs(&wasm_s)
        );
    }
    if failed.is_empty() {
        println!("wasm vs native: every row within 1.1x");
    } else {
        println!("wasm vs native: goal NOT met for {failed:?}");
    }
    Ok(())
}

/// Runs a native kernel; its time and output.
fn run_native(native: &Path, args: &[&str], out: &Path) -> Result<(f64, Vec<u8>)> {
    let t = Instant::now();
    let status = Command::new(native)
        .args(args)
        .stdout(std::fs::File::create(out)?)
        .status()
        .with_context(|| format!("cannot run {}", native.display()))?;
    let secs = t.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{} failed: {status}", native.display());
    }
    Ok((secs, std::fs::read(out)?))
}

/// Runs a wasm kernel as a paid job runs (`archipel job run-local`); its time and output. The run
/// must end `exited` 0.
fn run_wasm(archipel: &Path, module: &Path, args: &[&str], canonical_nans: bool, out: &Path) -> Result<(f64, Vec<u8>)> {
    let mut cmd = Command::new(archipel);
    cmd.args(["job", "run-local"]).arg(module).arg("--output").arg(out).arg("--json");
    for a in args {
        cmd.arg("--arg").arg(a);
    }
    if canonical_nans {
        cmd.arg("--canonical-nans");
    }
    let t = Instant::now();
    let run = cmd.output().with_context(|| format!("cannot run {}", archipel.display()))?;
    let secs = t.elapsed().as_secs_f64();
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap_or_default();
    if !run.status.success() || report["end"]["kind"] != "exited" || report["end"]["code"] != 0 {
        bail!(
            "{} failed: {}{}",
            module.display(),
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
    }
    Ok((secs, std::fs::read(out)?))
}

/// Rebuilds the examples with `build.sh` into `work` and checks they equal the checked-in ones:
/// the wasm measured is what this machine's clang makes of the source the native build uses.
fn rebuilt_equals_checked_in(root: &Path, work: &Path) -> Result<()> {
    let jobs = root.join("examples/jobs");
    let copy = work.join("rebuild");
    std::fs::create_dir_all(&copy)?;
    for entry in std::fs::read_dir(&jobs)? {
        let path = entry?.path();
        let name = path.file_name().context("a file")?.to_string_lossy().into_owned();
        if name.ends_with(".c") || name == "build.sh" {
            std::fs::copy(&path, copy.join(&name))?;
        }
    }
    let status = Command::new("sh").arg(copy.join("build.sh")).stdout(std::process::Stdio::null()).status()?;
    if !status.success() {
        bail!("examples/jobs/build.sh failed: install clang wasi-libc lld libclang-rt-dev-wasm32");
    }
    for k in KERNELS {
        let wasm = format!("{}.wasm", k.source);
        if std::fs::read(copy.join(&wasm))? != std::fs::read(jobs.join(&wasm))? {
            bail!("examples/jobs/{wasm} is not what build.sh makes of its source here: rebuild and commit it");
        }
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
