//! Real runs: this test binary is also the runner's child (`runs wasm-run REQUEST`), so every
//! case below starts a real process, feeds it, bounds it and reads how it ended — the same path
//! a provider takes with `archipel wasm-run`.

use archipel_compute::{End, Job, Limits, Outcome, RunError, Runner};
use std::path::{Path, PathBuf};

const WASI: &str = "wasi_snapshot_preview1";

/// `_start` copying stdin to stdout through a 64 KiB buffer at 64; iovec at 0, counts at 8.
fn echo() -> String {
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
      (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
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
    // Within a few watchdog periods of the limit, not the kernel's whole second.
    assert!(o.wall_ms < 2_000, "{o:?}");
    let (o, _) = c.run(&c.job(SPIN, Limits { cpu_ms: 60_000, wall_ms: 400, ..small() }));
    assert_eq!(o.end, End::WallLimit { limit_ms: 400 }, "{o:?}");
    assert!(o.wall_ms < 3_000, "{o:?}");
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
}

fn unbounded_output_ends_at_the_output_limit_and_keeps_the_limit() {
    let c = Case::new();
    let (o, out) = c.run(&c.job(&flood(1, -1), Limits { output_bytes: 300_000, ..small() }));
    assert_eq!(o.end, End::OutputLimit { limit_bytes: 300_000 }, "{o:?}");
    assert_eq!(out.len(), 300_000);
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
    ];
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let mut failed = Vec::new();
    for (name, case) in cases {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        match std::panic::catch_unwind(case) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        println!("failed: {failed:?}");
        std::process::exit(1);
    }
}
