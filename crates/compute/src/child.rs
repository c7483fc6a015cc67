//! The child process of a run: `archipel wasm-run REQUEST` compiles the module with wasmtime and
//! runs its `_start` with WASI preview 1 — stdin, stdout and stderr are the process's own (the
//! parent gave it the input file and two pipes), no preopened directory, no socket — then writes
//! how it ended to the request's status file.
//!
//! This process holds the untrusted code, so it bounds itself before compiling it: `RLIMIT_CORE`
//! 0, `RLIMIT_CPU` one second above the limit (the kernel's backstop), and a watchdog thread that
//! ends the process within [`WATCHDOG_EVERY`] of the CPU limit. Memory is bounded by the store's
//! resource limiter ([`MemoryLimiter`]).

use crate::{End, Job};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use wasmtime::{Config, Engine, Linker, Module, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

/// How often the watchdog reads the process's CPU clock.
pub const WATCHDOG_EVERY: Duration = Duration::from_millis(10);

/// Exit code of a child its watchdog ended (the status file says `cpu_limit`).
pub const CPU_LIMIT_EXIT: i32 = 86;

/// Exit code of a child that could not read its request (nothing else is known).
pub const BAD_REQUEST_EXIT: i32 = 87;

/// Table elements a module may grow its tables to (each is a pointer: 8 MiB at most).
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// What the parent asks of the child, as JSON in the request file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// The run.
    pub job: Job,
    /// Where the child writes its [`Status`].
    pub status: PathBuf,
}

/// What the child reports, as JSON in the status file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// How the run ended.
    pub end: End,
    /// CPU time the child used, compilation included.
    pub cpu_ms: u64,
}

/// Runs the request in `request` and returns the process's exit code: 0 once a status is written
/// (whatever the module did), [`BAD_REQUEST_EXIT`] when the request cannot be read or the status
/// cannot be written.
pub fn main(request: &Path) -> i32 {
    let req: Request = match std::fs::read(request)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("archipel wasm-run: cannot read the request {}: {e}", request.display());
            return BAD_REQUEST_EXIT;
        }
    };
    bound_self(&req);
    let end = run_module(&req.job);
    match write_status(&req.status, &Status { end, cpu_ms: cpu_ms() }) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("archipel wasm-run: cannot write the status {}: {e}", req.status.display());
            BAD_REQUEST_EXIT
        }
    }
}

/// The CPU time this process has used.
fn cpu_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    (t.tv_sec as u64).saturating_mul(1000) + (t.tv_nsec as u64) / 1_000_000
}

/// Writes `status` to `path` atomically (a temporary file named by the writing thread, renamed):
/// the watchdog and the main thread may both write, the last rename wins.
fn write_status(path: &Path, status: &Status) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::write(&tmp, serde_json::to_vec(status).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// No core dumps; the kernel's CPU limit one second above ours; the watchdog.
fn bound_self(req: &Request) {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let _ = setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) });
    let limit_ms = req.job.limits.cpu_ms;
    let soft = limit_ms.div_ceil(1000) + 1;
    let _ = setrlimit(Resource::Cpu, Rlimit { current: Some(soft), maximum: Some(soft + 1) });
    let status = req.status.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(WATCHDOG_EVERY);
            if cpu_ms() >= limit_ms {
                let end = End::CpuLimit { limit_ms };
                let _ = write_status(&status, &Status { end, cpu_ms: cpu_ms() });
                std::process::exit(CPU_LIMIT_EXIT);
            }
        }
    });
}

/// Refuses memory growth beyond the limit, and remembers that it did: a run that fails after
/// a refusal ran out of memory.
#[derive(Debug)]
pub struct MemoryLimiter {
    limit_bytes: usize,
    refused: bool,
}

impl MemoryLimiter {
    /// A limiter for `limit_bytes` of linear memory.
    pub fn new(limit_bytes: u64) -> Self {
        MemoryLimiter { limit_bytes: usize::try_from(limit_bytes).unwrap_or(usize::MAX), refused: false }
    }

    /// Whether a growth was refused.
    pub fn refused(&self) -> bool {
        self.refused
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // `memory.grow` answers -1: the module may cope (malloc returns NULL).
        let ok = desired <= self.limit_bytes;
        self.refused |= !ok;
        Ok(ok)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let ok = desired <= MAX_TABLE_ELEMENTS;
        self.refused |= !ok;
        Ok(ok)
    }
}

struct State {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
}

/// The engine for a run: Cranelift, no fuel, no epochs; NaNs canonical when asked; relaxed SIMD
/// deterministic (the same answers on every provider).
pub fn engine(canonical_nans: bool) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.cranelift_nan_canonicalization(canonical_nans);
    config.relaxed_simd_deterministic(true);
    Engine::new(&config)
}

/// What an error really was (its innermost cause, without wasmtime's backtrace), on one line.
fn short(e: &wasmtime::Error) -> String {
    e.root_cause().to_string().replace('\n', " ").chars().take(1000).collect()
}

/// Compiles and runs the job's module in this process; says how it ended.
pub fn run_module(job: &Job) -> End {
    let engine = match engine(job.canonical_nans) {
        Ok(e) => e,
        Err(e) => return End::Crashed { reason: format!("cannot configure wasmtime: {}", short(&e)) },
    };
    let bytes = match std::fs::read(&job.module) {
        Ok(b) => b,
        Err(e) => return End::InvalidModule { reason: format!("cannot read {}: {e}", job.module.display()) },
    };
    let module = match Module::new(&engine, &bytes) {
        Ok(m) => m,
        Err(e) => return End::InvalidModule { reason: short(&e) },
    };
    drop(bytes);
    let mut wasi = WasiCtxBuilder::new();
    let mut argv = vec!["job".to_string()];
    argv.extend(job.args.iter().cloned());
    wasi.inherit_stdin().inherit_stdout().inherit_stderr().args(&argv).envs(&job.env);
    if let Some(seed) = &job.seed {
        // The same random bytes on every provider: redundant runs must agree.
        let mut stream = vec![0u8; 64 << 10];
        blake3::Hasher::new_derive_key("archipel job random").update(seed).finalize_xof().fill(&mut stream);
        wasi.secure_random(wasmtime_wasi::Deterministic::new(stream.clone()));
        wasi.insecure_random(wasmtime_wasi::Deterministic::new(stream));
        wasi.insecure_random_seed(u128::from_le_bytes(seed[..16].try_into().unwrap_or_default()));
    }
    let state = State { wasi: wasi.build_p1(), limiter: MemoryLimiter::new(job.limits.memory_bytes) };
    let mut store = Store::new(&engine, state);
    store.limiter(|s| &mut s.limiter);
    let mut linker: Linker<State> = Linker::new(&engine);
    if let Err(e) = wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s| &mut s.wasi) {
        return End::Crashed { reason: format!("cannot offer WASI: {}", short(&e)) };
    }
    for import in module.imports() {
        if linker.get_by_import(&mut store, &import).is_none() {
            return End::UnsupportedImport { module: import.module().to_string(), name: import.name().to_string() };
        }
    }
    let instance = match linker.instantiate(&mut store, &module) {
        Ok(i) => i,
        Err(e) => return failed(&store, e, job),
    };
    let start = match instance.get_typed_func::<(), ()>(&mut store, "_start") {
        Ok(f) => f,
        Err(_) => {
            return End::InvalidModule {
                reason: "no `_start` function: build the module as a WASI command (clang --target=wasm32-wasi)".into(),
            };
        }
    };
    match start.call(&mut store, ()) {
        Ok(()) => End::Exited { code: 0 },
        Err(e) => failed(&store, e, job),
    }
}

/// The end of a run that returned an error: an exit, a memory refusal, or a trap.
fn failed(store: &Store<State>, e: wasmtime::Error, job: &Job) -> End {
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        if exit.0 != 0 && store.data().limiter.refused() {
            return End::MemoryLimit { limit_bytes: job.limits.memory_bytes };
        }
        return End::Exited { code: exit.0 };
    }
    if store.data().limiter.refused() {
        return End::MemoryLimit { limit_bytes: job.limits.memory_bytes };
    }
    End::Trapped { trap: short(&e) }
}
