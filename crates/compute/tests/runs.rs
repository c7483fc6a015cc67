//! Real runs: this test binary is also the runner's child (`runs wasm-run REQUEST`), so every
//! case below starts a real process, feeds it, bounds it and reads how it ended — the same path
//! a provider takes with `archipel wasm-run`.

use archipel_compute::{End, Job, Limits, Outcome, RunError, Runner};
use std::path::{Path, PathBuf};

const WASI: &str = "wasi_snapshot_preview1";

/// `_start` copying stdin to stdout through a 64 KiB buffer at 64; iovec at 0, counts at 8.
fn echo() -> String {
    echo_to(1)
}

/// [`echo`] to file descriptor `fd`.
fn echo_to(fd: i32) -> String {
    format!(
        r#"(module
  (import "{WASI}" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "{WASI}" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (loop $more
      (i32.store (i32.const 0) (i32.const 64))
      (i32.store (i32.const 4) (i32.const 65536))
      (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (if (i32.eqz (i32.load (i32.const 8))) (then (return)))
      (i32.store (i32.const 4) (i32.load (i32.const 8)))
      (drop (call $write (i32.const {fd}) (i32.const 0) (i32.const 1) (i32.const 12)))
      (br $more))))"#
    )
}

/// `_start` writing 64 KiB to `fd`, `times` times (-1: forever), then returning.
fn flood(fd: i32, times: i32) -> String {
    format!(
        r#"(module
  (import "{WASI}" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start") (local $n i32)
    (local.set $n (i32.const {times}))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 65536))
    (loop $more
      (if (i32.eqz (local.get $n)) (then (return)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (drop (call $write (i32.const {fd}) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $more))))"#
    )
}

fn exit_with(code: i32) -> String {
    format!(
        r#"(module
  (import "{WASI}" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const {code}))))"#
    )
}

const SPIN: &str = r#"(module (func (export "_start") (loop $l (br $l))))"#;
const TRAP: &str = r#"(module (func (export "_start") unreachable))"#;
const NO_START: &str = r#"(module (func (export "main")))"#;
const FOREIGN_IMPORT: &str = r#"(module (import "env" "open_socket" (func)) (func (export "_start")))"#;
/// A WASI call from a module without the `memory` export WASI needs: a trap, said so.
const NO_MEMORY: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (func (export "_start") (call $exit (i32.const 0))))"#;
/// Grows its memory by 1 MiB until refused, then traps (as a C program aborting on NULL does).
const MEMORY_BOMB: &str = r#"(module (memory 1)
  (func (export "_start")
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable))"#;
/// Grows by 1 MiB until refused, then exits with `code` (as a C program whose malloc returned NULL).
fn bomb_then_exit(code: i32) -> String {
    format!(
        r#"(module
  (import "{WASI}" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    (call $exit (i32.const {code}))))"#
    )
}
/// Two memories of 40 MiB each: 80 MiB in all.
const TWO_MEMORIES: &str = r#"(module (memory 640) (memory 640) (func (export "_start")))"#;
/// Tables of 2^20 elements each, two of them.
const BIG_TABLES: &str = r#"(module (table 1048576 funcref) (table 1048576 funcref) (func (export "_start")))"#;
/// A module whose `_start` runs `body` on a memory holding `data` at 64, then writes the `len`
/// bytes at 64 to stdout.
fn writes_at_64(data: &str, body: &str, len: u32) -> String {
    format!(
        r#"(module
  (import "{WASI}" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{data}")
  (func (export "_start")
    {body}
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len}))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#
    )
}
/// A signalling NaN, as stored at 64.
const PAYLOAD_NAN: &str = r"\01\00\00\00\00\00\f4\7f";
/// Loads a signalling NaN from memory, adds 1.0, and writes the result's 8 bytes to stdout.
fn nan_bits() -> String {
    writes_at_64(PAYLOAD_NAN, "(f64.store (i32.const 64) (f64.add (f64.load (i32.const 64)) (f64.const 1)))", 8)
}
/// Writes a NaN's bits through each way they can escape: an f64 store of NaN + 1 (a payload
/// kept by x86), an i64 reinterpretation of 0/0, copysign(1, 0/0) and an f32 store of 0/0.
fn nan_escapes() -> String {
    let body = r#"(f64.store (i32.const 64) (f64.add (f64.load (i32.const 64)) (f64.const 1)))
    (i64.store (i32.const 72) (i64.reinterpret_f64 (f64.div (f64.load (i32.const 128)) (f64.load (i32.const 128)))))
    (i64.store (i32.const 80) (i64.trunc_f64_s (f64.copysign (f64.const 1) (f64.div (f64.load (i32.const 128)) (f64.load (i32.const 128))))))
    (f32.store (i32.const 88) (f32.div (f32.load (i32.const 128)) (f32.load (i32.const 128))))"#;
    writes_at_64(PAYLOAD_NAN, body, 28)
}
/// Like [`nan_bits`] with SIMD: NaN + 1 in both lanes of an f64x2, stored as a v128.
fn nan_simd() -> String {
    let body = "(v128.store (i32.const 64) (f64x2.add (v128.load (i32.const 64)) (v128.const f64x2 1 1)))";
    writes_at_64(&PAYLOAD_NAN.repeat(2), body, 16)
}
/// Exits with the errno of `fd_prestat_get(3)`: 8 (BADF) when no directory is preopened.
fn prestat() -> String {
    format!(
        r#"(module
  (import "{WASI}" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
  (import "{WASI}" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (call $prestat (i32.const 3) (i32.const 0)))))"#
    )
}
/// Exits with the number of its environment variables.
fn env_count() -> String {
    format!(
        r#"(module
  (import "{WASI}" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
  (import "{WASI}" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $sizes (i32.const 0) (i32.const 4))) (call $exit (i32.load (i32.const 0)))))"#
    )
}
/// Closes its stdout, then spins.
fn close_and_spin() -> String {
    format!(
        r#"(module
  (import "{WASI}" "fd_close" (func $close (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $close (i32.const 1))) (loop $l (br $l))))"#
    )
}
/// Grows by 1 MiB until refused, then exits 0 if its memory is 1,009 pages (refused exactly at
/// 64 MiB), else 1.
const COPES_AND_SAYS: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    (call $exit (i32.ne (memory.size) (i32.const 1009)))))"#;
/// Writes 128 KiB of WASI random bytes to stdout.
fn random_bytes() -> String {
    format!(
        r#"(module
  (import "{WASI}" "random_get" (func $random (param i32 i32) (result i32)))
  (import "{WASI}" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 3)
  (func (export "_start")
    (drop (call $random (i32.const 64) (i32.const 131072)))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 131072))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#
    )
}
/// Asks for 1.25 GiB up front.
const HUGE_MEMORY: &str = r#"(module (memory 20000) (func (export "_start")))"#;
/// Grows by 1 MiB until refused, then exits 0: a module that copes with a refusal is not failed.
const COPES: &str = r#"(module (memory 1)
  (func (export "_start")
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))))"#;

struct Case {
    dir: tempfile::TempDir,
    runner: Runner,
}

impl Case {
    fn new() -> Case {
        let me = std::env::current_exe().expect("the test binary");
        Case { dir: tempfile::tempdir().unwrap(), runner: Runner::new(me, &["wasm-run"]) }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn job(&self, module: &str, limits: Limits) -> Job {
        Job {
            module: self.file("m.wat", module.as_bytes()),
            stdin: None,
            args: vec![],
            env: vec![],
            limits,
            canonical_nans: false,
            seed: None,
        }
    }

    fn run(&self, job: &Job) -> (Outcome, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut out = Vec::new();
        let o = rt.block_on(self.runner.run(job, &mut out)).expect("the run starts");
        assert_eq!(o.output_bytes, out.len() as u64, "{o:?}");
        assert_eq!(o.output_blake3, blake3::hash(&out).to_hex().to_string());
        (o, out)
    }
}

fn small() -> Limits {
    Limits { memory_bytes: 64 << 20, cpu_ms: 5_000, wall_ms: 10_000, output_bytes: 1 << 20, log_bytes: 1024 }
}

fn stdin_becomes_output_byte_for_byte() {
    let c = Case::new();
    let input: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut job = c.job(&echo(), small());
    job.stdin = Some(c.file("in", &input));
    let (o, out) = c.run(&job);
    assert_eq!(o.end, End::Exited { code: 0 }, "{o:?}");
    assert!(out == input, "the output is the input");
    assert!(o.cpu_ms.is_some() && o.log.is_empty());
    // No stdin given: empty input, empty output.
    let (o, out) = c.run(&c.job(&echo(), small()));
    assert_eq!((o.end, out.len()), (End::Exited { code: 0 }, 0));
}

fn exit_codes_and_traps_are_told_apart() {
    let c = Case::new();
    assert_eq!(c.run(&c.job(&exit_with(3), small())).0.end, End::Exited { code: 3 });
    assert_eq!(c.run(&c.job(&exit_with(0), small())).0.end, End::Exited { code: 0 });
    let end = c.run(&c.job(TRAP, small())).0.end;
    assert!(matches!(&end, End::Trapped { trap } if trap.contains("unreachable")), "{end:?}");
    let end = c.run(&c.job(NO_MEMORY, small())).0.end;
    assert!(matches!(&end, End::Trapped { trap } if trap.contains("memory export")), "{end:?}");
}

fn an_infinite_loop_ends_at_the_cpu_limit_and_at_the_wall_limit() {
    let c = Case::new();
    let (o, _) = c.run(&c.job(SPIN, Limits { cpu_ms: 300, ..small() }));
    assert_eq!(o.end, End::CpuLimit { limit_ms: 300 }, "{o:?}");
    // At the limit, within a few watchdog periods, not the kernel's whole second.
    assert!(o.cpu_ms.is_some_and(|ms| (300..1_000).contains(&ms)), "{o:?}");
    assert!(o.wall_ms < 2_000, "{o:?}");
    // One thread: the CPU limit is not reached before as much wall time passed (the market
    // refuses a CPU limit claimed sooner than that).
    assert!(o.wall_ms >= 300, "{o:?}");
    let (o, _) = c.run(&c.job(SPIN, Limits { cpu_ms: 60_000, wall_ms: 400, ..small() }));
    assert_eq!(o.end, End::WallLimit { limit_ms: 400 }, "{o:?}");
    assert!((400..3_000).contains(&o.wall_ms), "{o:?}");
    // A module that closes its stdout and goes on is still ended at its deadline.
    let (o, _) = c.run(&c.job(&close_and_spin(), Limits { cpu_ms: 60_000, wall_ms: 400, ..small() }));
    assert_eq!(o.end, End::WallLimit { limit_ms: 400 }, "{o:?}");
    still_runs(&c);
}

/// The runner still runs a job correctly after whatever came before.
fn still_runs(c: &Case) {
    let mut job = c.job(&echo(), small());
    job.stdin = Some(c.file("hello", b"still here"));
    let (o, out) = c.run(&job);
    assert_eq!((o.end, out.as_slice()), (End::Exited { code: 0 }, &b"still here"[..]));
}

fn a_memory_bomb_ends_at_the_memory_limit() {
    let c = Case::new();
    let (o, _) = c.run(&c.job(MEMORY_BOMB, small()));
    assert_eq!(o.end, End::MemoryLimit { limit_bytes: 64 << 20 }, "{o:?}");
    let (o, _) = c.run(&c.job(HUGE_MEMORY, small()));
    assert_eq!(o.end, End::MemoryLimit { limit_bytes: 64 << 20 }, "{o:?}");
    // Within the limit the same growth succeeds; refused and coped with, it is no failure.
    let (o, _) = c.run(&c.job(HUGE_MEMORY, Limits { memory_bytes: 2 << 30, ..small() }));
    assert_eq!(o.end, End::Exited { code: 0 }, "{o:?}");
    let (o, _) = c.run(&c.job(COPES, small()));
    assert_eq!(o.end, End::Exited { code: 0 }, "{o:?}");
    // Refused exactly at the limit: 1 page + 63 × 16 pages = 1,009 pages ≤ 64 MiB < 1,025.
    let (o, _) = c.run(&c.job(COPES_AND_SAYS, small()));
    assert_eq!(o.end, End::Exited { code: 0 }, "{o:?}");
    // A C program whose malloc returned NULL and that exits 1: out of memory; one that exits 0: fine.
    assert_eq!(c.run(&c.job(&bomb_then_exit(1), small())).0.end, End::MemoryLimit { limit_bytes: 64 << 20 });
    assert_eq!(c.run(&c.job(&bomb_then_exit(0), small())).0.end, End::Exited { code: 0 });
    // The limit is for all memory together: two memories, or tables past their bound, do not pass.
    let end = c.run(&c.job(TWO_MEMORIES, small())).0.end;
    assert!(matches!(&end, End::InvalidModule { reason } if reason.contains("multi")), "{end:?}");
    let end = c.run(&c.job(BIG_TABLES, small())).0.end;
    assert!(matches!(end, End::MemoryLimit { .. } | End::InvalidModule { .. }), "{end:?}");
    still_runs(&c);
}

fn nans_are_canonical_only_when_asked() {
    let c = Case::new();
    let mut job = c.job(&nan_bits(), small());
    let (o, plain) = c.run(&job);
    assert_eq!(o.end, End::Exited { code: 0 });
    job.canonical_nans = true;
    let (_, canonical) = c.run(&job);
    assert_eq!(u64::from_le_bytes(canonical.try_into().unwrap()), 0x7ff8_0000_0000_0000);
    assert_ne!(u64::from_le_bytes(plain.try_into().unwrap()), 0x7ff8_0000_0000_0000, "x86 keeps the payload");
}

/// Every way a NaN's bits escape gives the canonical bits when asked, where x86's own differ; a
/// SIMD module (canonicalized after every operation instead) too.
fn nans_are_canonical_wherever_they_escape() {
    let c = Case::new();
    let words = |b: &[u8]| {
        let w = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        (w(0), w(8), w(16) as i64, u32::from_le_bytes(b[24..28].try_into().unwrap()))
    };
    let mut job = c.job(&nan_escapes(), small());
    let (o, plain) = c.run(&job);
    assert_eq!(o.end, End::Exited { code: 0 });
    let plain = words(&plain);
    assert_ne!(plain.0, 0x7ff8_0000_0000_0000, "x86 keeps the payload: {plain:x?}");
    assert_ne!(plain.1, 0x7ff8_0000_0000_0000, "x86's 0/0 is negative: {plain:x?}");
    assert_eq!(plain.2, -1, "so copysign takes its sign");
    assert_ne!(plain.3, 0x7fc0_0000, "{plain:x?}");
    job.canonical_nans = true;
    let (o, canonical) = c.run(&job);
    assert_eq!(o.end, End::Exited { code: 0 });
    assert_eq!(words(&canonical), (0x7ff8_0000_0000_0000, 0x7ff8_0000_0000_0000, 1, 0x7fc0_0000));
    let mut job = c.job(&nan_simd(), small());
    let (_, plain) = c.run(&job);
    assert_ne!(plain[..8], 0x7ff8_0000_0000_0000u64.to_le_bytes());
    job.canonical_nans = true;
    let (_, canonical) = c.run(&job);
    assert_eq!(canonical, [0x7ff8_0000_0000_0000u64.to_le_bytes(); 2].concat());
}

fn seeded_randomness_is_the_seeds_stream_and_does_not_repeat() {
    let c = Case::new();
    let mut job = c.job(&random_bytes(), small());
    job.seed = Some([0x11; 32]);
    let (_, a) = c.run(&job);
    let (_, again) = c.run(&job);
    assert_eq!(a.len(), 131_072);
    assert!(a == again, "the same seed, the same bytes");
    // Pinned: providers running different builds must draw the same bytes from one seed (a
    // change of BLAKE3 stream, rand sampling or wasmtime's random_get shows here).
    let head: String = a[..16].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(head, "95ca3b8f9048e1f1c316b167a4003ee0", "the seeded stream changed");
    assert!(a[..65_536] != a[65_536..], "no 64 KiB period");
    job.seed = Some([0x22; 32]);
    assert!(c.run(&job).1 != a, "another seed, other bytes");
    job.seed = None;
    assert!(c.run(&job).1 != a, "no seed: the host's randomness");
}

/// A child whose parent dies goes with it (it would otherwise spin until its own limits).
fn a_run_whose_parent_dies_ends_too() {
    let c = Case::new();
    let job = c.job(SPIN, Limits { cpu_ms: 60_000, wall_ms: 60_000, ..small() });
    let req = c.dir.path().join("orphan-request.json");
    let request =
        archipel_compute::child::Request { job, status: c.dir.path().join("orphan-status.json"), parent: None };
    std::fs::write(&req, serde_json::to_vec(&request).unwrap()).unwrap();
    let me = std::env::current_exe().unwrap();
    // sh starts the child in the background and exits a second later (the child has armed its
    // parent-death signal by then, even on a loaded box).
    let script = format!("'{}' wasm-run '{}' & sleep 1", me.display(), req.display());
    assert!(std::process::Command::new("/bin/sh").arg("-c").arg(&script).status().unwrap().success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let alive = running(req.to_str().unwrap());
        if alive.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the orphan still runs 5 s after its parent died: {alive:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A child orphaned before it armed its parent-death signal (its parent is not the one the request
/// names) ends at once instead of running to its limits under whoever adopted it.
fn a_child_whose_parent_is_not_the_requester_ends_at_once() {
    let c = Case::new();
    let job = c.job(SPIN, Limits { cpu_ms: 60_000, wall_ms: 60_000, ..small() });
    let status = c.dir.path().join("adopted-status.json");
    let req = c.dir.path().join("adopted-request.json");
    // This process starts it, but the request names another parent (pid 1, which adopts orphans).
    let request = archipel_compute::child::Request { job, status: status.clone(), parent: Some(1) };
    std::fs::write(&req, serde_json::to_vec(&request).unwrap()).unwrap();
    let me = std::env::current_exe().unwrap();
    let started = std::time::Instant::now();
    let out = std::process::Command::new(&me).arg("wasm-run").arg(&req).output().unwrap();
    assert_eq!(out.status.code(), Some(archipel_compute::child::ORPHANED_EXIT), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("the request names Some(1)"), "{out:?}");
    assert!(!status.exists(), "it wrote no status: it never ran");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "ended at once, not at a limit");
    // Named right, the same request runs (and here ends at its CPU limit).
    let request = archipel_compute::child::Request {
        job: c.job(SPIN, Limits { cpu_ms: 200, ..small() }),
        status: status.clone(),
        parent: Some(std::process::id()),
    };
    std::fs::write(&req, serde_json::to_vec(&request).unwrap()).unwrap();
    let _ = std::process::Command::new(&me).arg("wasm-run").arg(&req).output().unwrap();
    assert!(status.exists(), "with its real parent named, the child ran and reported");
}

fn a_module_past_the_size_bound_is_refused_unread() {
    let c = Case::new();
    let mut job = c.job(SPIN, small());
    let big = c.dir.path().join("big.wasm");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(archipel_compute::child::MAX_MODULE_BYTES + 1).unwrap();
    job.module = big;
    let end = c.run(&job).0.end;
    assert!(matches!(&end, End::InvalidModule { reason } if reason.contains("larger than 64 MiB")), "{end:?}");
}

fn the_module_gets_its_env_and_no_other_and_no_files() {
    let c = Case::new();
    let mut job = c.job(&env_count(), small());
    assert_eq!(c.run(&job).0.end, End::Exited { code: 0 }, "none of the host's variables");
    job.env = vec![("A".into(), "B".into()), ("C".into(), "D".into())];
    assert_eq!(c.run(&job).0.end, End::Exited { code: 2 });
    assert_eq!(c.run(&c.job(&prestat(), small())).0.end, End::Exited { code: 8 }, "no preopened directory (EBADF)");
}

fn unbounded_output_ends_at_the_output_limit_and_keeps_the_limit() {
    let c = Case::new();
    let (o, out) = c.run(&c.job(&flood(1, -1), Limits { output_bytes: 300_000, ..small() }));
    assert_eq!(o.end, End::OutputLimit { limit_bytes: 300_000 }, "{o:?}");
    assert_eq!(out.len(), 300_000);
    // The bytes kept are the first ones.
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut job = c.job(&echo(), Limits { output_bytes: 70_000, ..small() });
    job.stdin = Some(c.file("in", &input));
    let (o, out) = c.run(&job);
    assert_eq!(o.end, End::OutputLimit { limit_bytes: 70_000 });
    assert!(out == input[..70_000]);
    still_runs(&c);
    // Exactly at the limit is fine.
    let (o, out) = c.run(&c.job(&flood(1, 2), Limits { output_bytes: 131_072, ..small() }));
    assert_eq!((o.end, out.len()), (End::Exited { code: 0 }, 131_072));
}

fn the_log_keeps_its_first_bytes_and_counts_the_rest() {
    let c = Case::new();
    let (o, out) = c.run(&c.job(&flood(2, 20), small()));
    assert_eq!(o.end, End::Exited { code: 0 });
    assert!(out.is_empty());
    assert_eq!((o.log.len(), o.log_dropped), (1024, 20 * 65_536 - 1024));
    let input: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let mut job = c.job(&echo_to(2), small());
    job.stdin = Some(c.file("in", &input));
    let (o, _) = c.run(&job);
    assert!(o.log == input[..1024] && o.log_dropped == 100_000 - 1024, "the first bytes of stderr are kept");
}

fn bad_modules_are_refused_with_the_reason() {
    let c = Case::new();
    let end = c.run(&c.job("\0asm this is not wasm", small())).0.end;
    assert!(matches!(end, End::InvalidModule { .. }), "{end:?}");
    let end = c.run(&c.job(NO_START, small())).0.end;
    assert!(matches!(&end, End::InvalidModule { reason } if reason.contains("_start")), "{end:?}");
    let end = c.run(&c.job(FOREIGN_IMPORT, small())).0.end;
    assert_eq!(end, End::UnsupportedImport { module: "env".into(), name: "open_socket".into() });
    assert!(end.to_string().contains("env::open_socket"), "{end}");
    // A WASI name WASI does not have, and a WASI function imported with the wrong type.
    let unknown = format!(r#"(module (import "{WASI}" "teleport" (func)) (func (export "_start")))"#);
    let end = c.run(&c.job(&unknown, small())).0.end;
    assert_eq!(end, End::UnsupportedImport { module: WASI.into(), name: "teleport".into() });
    let wrong = format!(r#"(module (import "{WASI}" "fd_write" (func)) (func (export "_start")))"#);
    let end = c.run(&c.job(&wrong, small())).0.end;
    assert!(matches!(&end, End::InvalidModule { reason } if reason.contains("type")), "{end:?}");
    still_runs(&c);
}

/// A sink that refuses every byte (a full disk).
struct Full;

impl tokio::io::AsyncWrite for Full {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Err(std::io::Error::other("no space left on device")))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The parent's own failures: a sink that refuses bytes, a child ended by SIGXCPU or by its
/// watchdog's exit code without a status, and a run dropped midway (its child is killed).
fn the_parents_own_failures_are_said() {
    let c = Case::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let e = rt.block_on(c.runner.run(&c.job(&flood(1, -1), small()), &mut Full)).unwrap_err();
    assert!(matches!(&e, RunError::Output(io) if io.to_string().contains("no space")), "{e}");
    let mut out = Vec::new();
    for script in ["kill -XCPU $$", "exit 86"] {
        let runner = Runner::new("/bin/sh", &["-c", script, "sh"]);
        let o = rt.block_on(runner.run(&c.job(SPIN, small()), &mut out)).unwrap();
        assert_eq!(o.end, End::CpuLimit { limit_ms: 5_000 }, "{script}");
    }
    // A child that found another parent ran nothing: the provider's error, not the job's end.
    let runner = Runner::new("/bin/sh", &["-c", "exit 88", "sh"]);
    let e = rt.block_on(runner.run(&c.job(SPIN, small()), &mut out)).unwrap_err();
    assert!(matches!(e, RunError::Orphaned), "{e}");
    // Dropped midway: the child is gone soon after.
    let job = c.job(SPIN, Limits { cpu_ms: 60_000, wall_ms: 60_000, ..small() });
    let dropped = rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_millis(500), c.runner.run(&job, &mut out)).await
    });
    assert!(dropped.is_err(), "still running at 500 ms");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let me = std::env::current_exe().unwrap();
    let pattern = format!("{} wasm-run", me.display());
    let children = running(&pattern);
    assert!(children.is_empty(), "a dropped run leaves no child: {children:?}");
}

fn bad_limits_and_missing_files_are_errors_before_any_run() {
    let c = Case::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut out = Vec::new();
    let job = c.job(SPIN, Limits { cpu_ms: 0, ..small() });
    let e = rt.block_on(c.runner.run(&job, &mut out)).unwrap_err();
    assert!(matches!(&e, RunError::Limits(why) if why.contains("cpu_ms")), "{e}");
    let job = c.job(SPIN, Limits { memory_bytes: 5 << 30, ..small() });
    assert!(matches!(rt.block_on(c.runner.run(&job, &mut out)), Err(RunError::Limits(_))));
    // These are refused before any process starts (the runner does not even exist).
    let none = Runner::new("/nonexistent/archipel", &["wasm-run"]);
    let job = c.job(SPIN, Limits { cpu_ms: 0, ..small() });
    assert!(matches!(rt.block_on(none.run(&job, &mut out)), Err(RunError::Limits(_))));
    let mut job = c.job(SPIN, small());
    job.module = Path::new("/nonexistent/m.wasm").into();
    assert!(matches!(rt.block_on(none.run(&job, &mut out)), Err(RunError::Read { .. })));
    let mut job = c.job(SPIN, small());
    job.module = Path::new("/nonexistent/m.wasm").into();
    assert!(matches!(rt.block_on(c.runner.run(&job, &mut out)), Err(RunError::Read { .. })));
    let mut job = c.job(SPIN, small());
    job.stdin = Some("/nonexistent/input".into());
    assert!(matches!(rt.block_on(c.runner.run(&job, &mut out)), Err(RunError::Read { .. })));
    let runner = Runner::new("/nonexistent/archipel", &["wasm-run"]);
    let job = c.job(SPIN, small());
    assert!(matches!(rt.block_on(runner.run(&job, &mut out)), Err(RunError::Spawn { .. })));
}

/// A child killed from outside (not by a limit) is a crash, said so.
fn a_runner_that_dies_is_a_crash() {
    let c = Case::new();
    let runner = Runner::new("/bin/sh", &["-c", "kill -9 $$", "sh"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut out = Vec::new();
    let o = rt.block_on(runner.run(&c.job(SPIN, small()), &mut out)).unwrap();
    assert!(matches!(&o.end, End::Crashed { reason } if reason.contains("signal")), "{o:?}");
}

/// Command lines of the live processes (not this one) whose command line contains `needle`,
/// read from /proc (no procps needed).
fn running(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if line.contains(needle) {
                found.push(format!("{name}: {line}"));
            }
        }
    }
    found
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("wasm-run") {
        std::process::exit(archipel_compute::child::main(Path::new(&args[2])));
    }
    let cases: &[(&str, fn())] = &[
        ("stdin_becomes_output_byte_for_byte", stdin_becomes_output_byte_for_byte),
        ("exit_codes_and_traps_are_told_apart", exit_codes_and_traps_are_told_apart),
        (
            "an_infinite_loop_ends_at_the_cpu_limit_and_at_the_wall_limit",
            an_infinite_loop_ends_at_the_cpu_limit_and_at_the_wall_limit,
        ),
        ("a_memory_bomb_ends_at_the_memory_limit", a_memory_bomb_ends_at_the_memory_limit),
        (
            "unbounded_output_ends_at_the_output_limit_and_keeps_the_limit",
            unbounded_output_ends_at_the_output_limit_and_keeps_the_limit,
        ),
        ("the_log_keeps_its_first_bytes_and_counts_the_rest", the_log_keeps_its_first_bytes_and_counts_the_rest),
        ("bad_modules_are_refused_with_the_reason", bad_modules_are_refused_with_the_reason),
        (
            "bad_limits_and_missing_files_are_errors_before_any_run",
            bad_limits_and_missing_files_are_errors_before_any_run,
        ),
        ("a_runner_that_dies_is_a_crash", a_runner_that_dies_is_a_crash),
        ("nans_are_canonical_only_when_asked", nans_are_canonical_only_when_asked),
        ("nans_are_canonical_wherever_they_escape", nans_are_canonical_wherever_they_escape),
        ("the_module_gets_its_env_and_no_other_and_no_files", the_module_gets_its_env_and_no_other_and_no_files),
        ("the_parents_own_failures_are_said", the_parents_own_failures_are_said),
        (
            "seeded_randomness_is_the_seeds_stream_and_does_not_repeat",
            seeded_randomness_is_the_seeds_stream_and_does_not_repeat,
        ),
        ("a_run_whose_parent_dies_ends_too", a_run_whose_parent_dies_ends_too),
        (
            "a_child_whose_parent_is_not_the_requester_ends_at_once",
            a_child_whose_parent_is_not_the_requester_ends_at_once,
        ),
        ("a_module_past_the_size_bound_is_refused_unread", a_module_past_the_size_bound_is_refused_unread),
    ];
    if args.iter().any(|a| a == "--list") {
        for (name, _) in cases {
            println!("{name}: test");
        }
        return;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, case) in cases {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        match std::panic::catch_unwind(case) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    println!("{ran} cases run, {} failed", failed.len());
    if !failed.is_empty() {
        println!("failed: {failed:?}");
        std::process::exit(1);
    }
    if ran == 0 {
        println!("no case matches {filter:?}");
        std::process::exit(1);
    }
}
