//! The example jobs (`examples/jobs`, C built to wasm32-wasip1 and checked in) run through the
//! real binary, `archipel job run-local`, as a provider runs them: their outputs are checked
//! against the same computation done here in Rust; limits end runaway modules with their reason;
//! bad input is refused with a message.

mod common;

use common::{archipel, stderr, stdout};
use std::path::{Path, PathBuf};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/jobs").join(name)
}

fn run(dir: &Path, args: &[&str]) -> (bool, Vec<u8>, String) {
    let o = archipel(dir, args);
    (o.status.success(), o.stdout.clone(), stderr(&o))
}

#[test]
fn word_count_counts_its_input_object() {
    let dir = tempfile::tempdir().unwrap();
    let text = "the quick brown fox\njumps\tover\r\n\n  the lazy dog \x0b\x0c caf\u{e9} \n".repeat(5_000);
    let input = dir.path().join("in.txt");
    std::fs::write(&input, &text).unwrap();
    let module = example("wordcount.wasm");
    let (ok, out, err) =
        run(dir.path(), &["job", "run-local", module.to_str().unwrap(), "--stdin", input.to_str().unwrap()]);
    assert!(ok, "{err}");
    let want = format!("{} {} {}\n", text.matches('\n').count(), text.split_whitespace().count(), text.len());
    assert!(err.contains(&format!("blake3 {}", blake3::hash(&out).to_hex())), "{err}");
    assert_eq!(String::from_utf8(out).unwrap(), want);
    assert!(err.contains("finished"), "{err}");
}

#[test]
fn sha256_chain_matches_ring() {
    let dir = tempfile::tempdir().unwrap();
    let module = example("sha256chain.wasm");
    let (ok, out, err) =
        run(dir.path(), &["job", "run-local", module.to_str().unwrap(), "--arg", "1000", "--arg", "archipel"]);
    assert!(ok, "{err}");
    let mut d = ring::digest::digest(&ring::digest::SHA256, b"archipel").as_ref().to_vec();
    for _ in 1..1000 {
        d = ring::digest::digest(&ring::digest::SHA256, &d).as_ref().to_vec();
    }
    assert_eq!(String::from_utf8(out).unwrap(), format!("{}\n", hex_of(&d)));
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The render, the same float operations in the same order as `mandelbrot.c`.
fn mandelbrot(w: usize, h: usize, max_iter: u32) -> Vec<u8> {
    let mut out = format!("P5\n{w} {h}\n255\n").into_bytes();
    for y in 0..h {
        let ci = -1.25 + 2.5 * y as f64 / h as f64;
        for x in 0..w {
            let cr = -2.0 + 3.0 * x as f64 / w as f64;
            let (mut zr, mut zi, mut i) = (0.0f64, 0.0f64, 0u32);
            while i < max_iter && zr * zr + zi * zi <= 4.0 {
                let t = zr * zr - zi * zi + cr;
                zi = 2.0 * zr * zi + ci;
                zr = t;
                i += 1;
            }
            out.push(if i == max_iter { 0 } else { (255 - (i * 255 / max_iter)) as u8 });
        }
    }
    out
}

#[test]
fn mandelbrot_renders_the_same_image_with_and_without_canonical_nans() {
    let dir = tempfile::tempdir().unwrap();
    let module = example("mandelbrot.wasm");
    let m = module.to_str().unwrap();
    let want = mandelbrot(160, 120, 500);
    for extra in [&[][..], &["--canonical-nans"][..]] {
        let mut args = vec!["job", "run-local", m, "--arg", "160", "--arg", "120", "--arg", "500"];
        args.extend_from_slice(extra);
        let (ok, out, err) = run(dir.path(), &args);
        assert!(ok, "{err}");
        assert!(out == want, "the image differs from the reference render ({extra:?})");
    }
    // Its own usage error is the module's exit code, said so.
    let (ok, _, err) = run(dir.path(), &["job", "run-local", m, "--arg", "0"]);
    assert!(!ok && err.contains("usage: mandelbrot") && err.contains("exited with code 2"), "{err}");
}

#[test]
fn runaway_modules_end_at_their_limits_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let spin = dir.path().join("spin.wat");
    std::fs::write(&spin, r#"(module (func (export "_start") (loop $l (br $l))))"#).unwrap();
    let (ok, _, err) = run(dir.path(), &["job", "run-local", spin.to_str().unwrap(), "--cpu", "300ms"]);
    assert!(!ok && err.contains("used its 300 ms of CPU time"), "{err}");
    // Less memory than the module's own initial memory (its stack and data).
    let m = example("mandelbrot.wasm");
    let (ok, _, err) = run(
        dir.path(),
        &["job", "run-local", m.to_str().unwrap(), "--arg", "16", "--arg", "2", "--arg", "2", "--memory", "64KiB"],
    );
    assert!(!ok && err.contains("ran out of memory: the limit is 64 KiB"), "{err}");
    // Output beyond the limit: the run ends, the output kept is exactly the limit.
    let out = dir.path().join("img.pgm");
    let o = archipel(
        dir.path(),
        &[
            "job",
            "run-local",
            m.to_str().unwrap(),
            "--arg",
            "400",
            "--arg",
            "400",
            "--arg",
            "10",
            "--max-output",
            "1000",
            "--output",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["end"]["kind"], "output_limit", "{v}");
    assert!(std::fs::read(&out).unwrap() == mandelbrot(400, 400, 10)[..1000], "the first 1,000 bytes are kept");
}

#[test]
fn the_output_file_is_whole_or_untouched_and_never_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let w = example("wordcount.wasm");
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "one two\n").unwrap();
    // --output naming the input: refused, the input intact.
    let (ok, _, err) = run(
        dir.path(),
        &["job", "run-local", w.to_str().unwrap(), "--stdin", input.to_str().unwrap(), "-o", input.to_str().unwrap()],
    );
    assert!(!ok && err.contains("would be overwritten"), "{err}");
    assert_eq!(std::fs::read_to_string(&input).unwrap(), "one two\n");
    // A run that cannot start leaves an existing output as it was, and no partial file.
    let out = dir.path().join("out.txt");
    std::fs::write(&out, "old").unwrap();
    let (ok, _, _) = run(dir.path(), &["job", "run-local", "/nonexistent.wasm", "-o", out.to_str().unwrap()]);
    assert!(!ok);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "old");
    assert!(!dir.path().join(".out.txt.partial").exists());
    // The module's log is printed with its control characters escaped.
    let noisy = dir.path().join("noisy.wat");
    std::fs::write(
        &noisy,
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "\1b]0;pwned\07hi\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 14))
    (drop (call $write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    )
    .unwrap();
    let (ok, _, err) = run(dir.path(), &["job", "run-local", noisy.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(!err.contains('\x1b') && err.contains("\\u{1b}]0;pwned\\u{7}hi"), "{err}");
}

#[test]
fn bad_modules_and_bad_flags_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0garbage").unwrap();
    let (ok, _, err) = run(dir.path(), &["job", "run-local", junk.to_str().unwrap()]);
    assert!(!ok && err.contains("is not a runnable wasm32-wasip1 module"), "{err}");
    let sock = dir.path().join("sock.wat");
    std::fs::write(&sock, r#"(module (import "env" "connect" (func)) (func (export "_start")))"#).unwrap();
    let (ok, _, err) = run(dir.path(), &["job", "run-local", sock.to_str().unwrap()]);
    assert!(!ok && err.contains("imports env::connect"), "{err}");
    let w = example("wordcount.wasm");
    let w = w.to_str().unwrap();
    for (flag, value, says) in [
        ("--memory", "lots", "--memory"),
        ("--cpu", "0ms", "cpu_ms is 0"),
        ("--timeout", "2days", "--timeout"),
        ("--memory", "8GiB", "above the most allowed"),
        ("--env", "NOEQUALS", "KEY=VALUE"),
        ("--seed", "abc", "64 hex digits"),
    ] {
        let (ok, _, err) = run(dir.path(), &["job", "run-local", w, flag, value]);
        assert!(!ok && err.contains(says), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, _, err) = run(dir.path(), &["job", "run-local", "/nonexistent.wasm"]);
    assert!(!ok && err.contains("cannot read /nonexistent.wasm"), "{err}");
    // The runner process itself, given a request that is no request, says so and exits 87.
    let req = dir.path().join("req.json");
    std::fs::write(&req, b"{not json").unwrap();
    let o = archipel(dir.path(), &["wasm-run", req.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(87), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot read the request"), "{}", stderr(&o));
}

#[test]
fn seeded_randomness_is_the_same_on_every_run() {
    let dir = tempfile::tempdir().unwrap();
    // A module printing its random bytes: the same seed gives the same bytes, run after run.
    let random = dir.path().join("random.wat");
    std::fs::write(
        &random,
        r#"(module
  (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $random (i32.const 64) (i32.const 32)))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 32))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    )
    .unwrap();
    let seed = "11".repeat(32);
    let r = random.to_str().unwrap();
    let (ok1, a, e1) = run(dir.path(), &["job", "run-local", r, "--seed", &seed]);
    let (ok2, b, e2) = run(dir.path(), &["job", "run-local", r, "--seed", &seed]);
    let (ok3, c, e3) = run(dir.path(), &["job", "run-local", r]);
    assert!(ok1 && ok2 && ok3, "{e1}{e2}{e3}");
    assert_eq!(a.len(), 32);
    assert_eq!(a, b, "the same seed, the same bytes");
    assert_ne!(a, c, "no seed: the host's randomness");
}

/// `examples/jobs/build.sh` rebuilds the checked-in `.wasm` byte for byte (needs Debian's clang,
/// wasi-libc, lld and libclang-rt-dev-wasm32, which `.ci/run` installs; without clang it says so).
#[test]
fn the_checked_in_modules_are_what_their_source_builds() {
    if std::process::Command::new("clang").arg("--version").output().is_err() {
        // .ci/run installs clang and sets ARCHIPEL_CI: there, a missing clang is a failure.
        assert!(std::env::var_os("ARCHIPEL_CI").is_none(), "clang is missing under .ci/run");
        eprintln!(
            "note: clang is not installed (apt-get install clang wasi-libc lld libclang-rt-dev-wasm32): not rebuilt"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let jobs = example("");
    for entry in std::fs::read_dir(&jobs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".c") || name == "build.sh" {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    let o = std::process::Command::new("sh").arg(dir.path().join("build.sh")).output().unwrap();
    assert!(o.status.success(), "build.sh: {}", String::from_utf8_lossy(&o.stderr));
    let mut sources = 0;
    for entry in std::fs::read_dir(&jobs).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".c") else { continue };
        sources += 1;
        let wasm = format!("{stem}.wasm");
        let checked_in = std::fs::read(jobs.join(&wasm)).unwrap_or_else(|_| panic!("{wasm} is not checked in"));
        let built = std::fs::read(dir.path().join(&wasm)).unwrap();
        assert!(built == checked_in, "{wasm} differs from what build.sh makes of {name}");
    }
    assert!(sources >= 3, "the examples are there");
}

#[test]
fn a_spec_file_gives_the_module_inputs_args_and_limits_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(example("wordcount.wasm"), d.join("wc.wasm")).unwrap();
    std::fs::write(d.join("a.txt"), "one two\n").unwrap();
    std::fs::write(d.join("b.txt"), "three\n").unwrap();
    std::fs::write(
        d.join("job.toml"),
        "module = \"wc.wasm\"\ninputs = [\"a.txt\", \"b.txt\"]\nredundancy = 1\n\
         max_price = 100\nregions = [\"eu\"]\ndeny_jurisdictions = [\"US\"]\nbid_window = \"3s\"\n\
         [limits]\nmemory = \"64MiB\"\ncpu = \"10s\"\n",
    )
    .unwrap();
    // (The market's fields are `job submit`'s: the same file runs here.)
    let spec = d.join("job.toml");
    let s = spec.to_str().unwrap();
    // Run from elsewhere: the spec's paths are its own directory's.
    let (ok, out, err) = run(Path::new("/"), &["job", "run-local", "--spec", s]);
    assert!(ok, "{err}");
    assert_eq!(String::from_utf8(out).unwrap(), "2 3 14\n", "both inputs, in order");
    // A flag overrides the spec: less memory than the module's own start.
    let (ok, _, err) = run(d, &["job", "run-local", "--spec", s, "--memory", "64KiB"]);
    assert!(!ok && err.contains("ran out of memory: the limit is 64 KiB"), "{err}");
    // --stdin replaces the inputs.
    let (ok, out, _) = run(d, &["job", "run-local", "--spec", s, "--stdin", d.join("b.txt").to_str().unwrap()]);
    assert!(ok && out == b"1 1 6\n");
    // JSON works too.
    std::fs::write(d.join("job.json"), r#"{"module": "wc.wasm", "inputs": ["b.txt"]}"#).unwrap();
    let (ok, out, _) = run(d, &["job", "run-local", "--spec", d.join("job.json").to_str().unwrap()]);
    assert!(ok && out == b"1 1 6\n");
    // Mistakes are named.
    for (text, says) in [
        ("module = \"wc.wasm\"\nmemmory = \"1GiB\"\n", "unknown field `memmory`"),
        ("module = \"wc.wasm\"\nredundancy = 9\n", "redundancy 9 is out of range"),
        ("module = \"wc.wasm\"\n[limits]\ncpu = \"forever\"\n", "--cpu (limits.cpu): \"forever\" is not a duration"),
        ("inputs = [\"a.txt\"]\n", "names no module"),
        ("module = \"wc.wasm\"\ninputs = [\"missing.txt\"]\n", "cannot read the input"),
    ] {
        std::fs::write(d.join("bad.toml"), text).unwrap();
        let (ok, _, err) = run(d, &["job", "run-local", "--spec", d.join("bad.toml").to_str().unwrap()]);
        assert!(!ok && err.contains(says), "{text}: {err}");
    }
    // --output naming one of the spec's inputs is refused.
    let (ok, _, err) = run(d, &["job", "run-local", "--spec", s, "-o", d.join("a.txt").to_str().unwrap()]);
    assert!(!ok && err.contains("would be overwritten"), "{err}");
}

#[test]
fn a_redundant_spec_runs_as_providers_will_canonical_nans_and_a_fixed_seed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("nan.wat"),
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "\01\00\00\00\00\00\f4\7f")
  (func (export "_start")
    (f64.store (i32.const 64) (f64.add (f64.load (i32.const 64)) (f64.const 1)))
    (drop (call $random (i32.const 72) (i32.const 8)))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    )
    .unwrap();
    std::fs::write(d.join("n3.toml"), "module = \"nan.wat\"\nredundancy = 3\n").unwrap();
    std::fs::write(d.join("n1.toml"), "module = \"nan.wat\"\nredundancy = 1\n").unwrap();
    let spec = |n: &str| d.join(n).to_str().unwrap().to_string();
    let (_, three, _) = run(d, &["job", "run-local", "--spec", &spec("n3.toml")]);
    let (_, again, _) = run(d, &["job", "run-local", "--spec", &spec("n3.toml")]);
    let (_, one, _) = run(d, &["job", "run-local", "--spec", &spec("n1.toml")]);
    assert_eq!(three.len(), 16);
    assert_eq!(u64::from_le_bytes(three[..8].try_into().unwrap()), 0x7ff8_0000_0000_0000, "canonical NaN");
    assert_ne!(u64::from_le_bytes(one[..8].try_into().unwrap()), 0x7ff8_0000_0000_0000, "N = 1: plain");
    assert_eq!(three, again, "the same random bytes run after run");
}
