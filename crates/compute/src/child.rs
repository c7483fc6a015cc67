//! The child process of a run: `archipel wasm-run REQUEST` compiles the module with wasmtime and
//! runs its `_start` with WASI preview 1 — stdin, stdout and stderr are the process's own (the
//! parent gave it the input file and two pipes), no preopened directory, no socket — then writes
//! how it ended to the request's status file.
//!
//! This process holds the untrusted code, so it bounds itself before compiling it: nice 10 (below
//! the node, whose heartbeats must not starve), `RLIMIT_CORE` 0, `RLIMIT_CPU` one second above the limit (the kernel's backstop), and a watchdog thread that
//! ends the process within [`WATCHDOG_EVERY`] of the CPU limit. Memory is bounded by the store's
//! resource limiter ([`MemoryLimiter`]).

use crate::{End, Job};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use wasmtime::{Config, Engine, Linker, Module, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

/// The run's scheduling priority (nice): below the node's own.
pub const NICE: i32 = 10;

/// How often the watchdog reads the process's CPU clock.
pub const WATCHDOG_EVERY: Duration = Duration::from_millis(10);

/// Exit code of a child its watchdog ended (the status file says `cpu_limit`).
pub const CPU_LIMIT_EXIT: i32 = 86;

/// Exit code of a child that could not read its request (nothing else is known).
pub const BAD_REQUEST_EXIT: i32 = 87;

/// Exit code of a child whose parent is not the one its request names (orphaned before it armed
/// its parent-death signal, or started through a wrapper that forks): it ran nothing.
pub const ORPHANED_EXIT: i32 = 88;

/// Table elements a module's tables may hold together (each is a pointer: 8 MiB at most).
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Tables a module may define.
pub const MAX_TABLES: usize = 8;

/// Largest module accepted (binary or text): compiling is the one cost outside the limiter's
/// reach, so the input to it is bounded.
pub const MAX_MODULE_BYTES: u64 = 64 << 20;

/// How long after the wall-time limit the child ends itself if its parent did not (a parent
/// that died): the parent's deadline comes first.
pub const WALL_GRACE: Duration = Duration::from_secs(2);

/// Who writes the status: the first of the main thread (the module ended) and the watchdog (a
/// limit); the other writes nothing.
static STATUS_WRITTEN: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

/// What the parent asks of the child, as JSON in the request file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// The run.
    pub job: Job,
    /// Where the child writes its [`Status`].
    pub status: PathBuf,
    /// The pid of the process that starts the child and waits for it (the runner's program must
    /// be the child itself or a wrapper that execs it, like `nice`, not one that forks it). A
    /// child whose parent is another has been orphaned before it could arm its parent-death
    /// signal, and ends at once. `None` (requests written by hand) checks only that the parent
    /// did not change while arming it.
    #[serde(default)]
    pub parent: Option<u32>,
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
    let mut written = STATUS_WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    if *written {
        // The watchdog has written a limit and is ending the process.
        drop(written);
        loop {
            std::thread::park();
        }
    }
    *written = true;
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

/// A lower priority (nice 10), so that a job spinning on every core cannot starve the node that
/// runs it (its heartbeats keep the lease); no core dumps; killed with its parent; the kernel's
/// CPU limit one second above ours; the watchdog (CPU limit, and the wall-time limit plus
/// [`WALL_GRACE`] should the parent be gone).
fn bound_self(req: &Request) {
    use rustix::process::{Resource, Rlimit, setrlimit};
    // First, so that every thread started later (compilation, the watchdog) inherits it.
    let _ = rustix::process::setpriority_process(None, NICE);
    let parent = rustix::process::getppid();
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let now = rustix::process::getppid();
    let pid = |p: Option<rustix::process::Pid>| p.map(|p| p.as_raw_nonzero().get().unsigned_abs());
    if now != parent || req.parent.is_some_and(|expected| pid(now) != Some(expected)) {
        // The parent died before the line above (or before this process even started): nobody
        // waits for this run, and the death signal was armed against whoever adopted it.
        eprintln!(
            "archipel wasm-run: not run: the parent is {:?}, the request names {:?} (orphaned, or started \
             through a wrapper that forks)",
            pid(now),
            req.parent
        );
        std::process::exit(ORPHANED_EXIT);
    }
    let _ = setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) });
    let limit_ms = req.job.limits.cpu_ms;
    let soft = limit_ms.div_ceil(1000) + 1;
    let _ = setrlimit(Resource::Cpu, Rlimit { current: Some(soft), maximum: Some(soft + 1) });
    let status = req.status.clone();
    let wall = Duration::from_millis(req.job.limits.wall_ms) + WALL_GRACE;
    let started = std::time::Instant::now();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(WATCHDOG_EVERY);
            let end = if cpu_ms() >= limit_ms {
                End::CpuLimit { limit_ms }
            } else if started.elapsed() >= wall {
                End::WallLimit { limit_ms: wall.as_millis() as u64 }
            } else {
                continue;
            };
            let mut written = STATUS_WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
            if *written {
                // The module ended first: its status stands.
                return;
            }
            *written = true;
            let _ = write_status(&status, &Status { end, cpu_ms: cpu_ms() });
            // Holding the lock: the main thread cannot write after this.
            std::process::exit(CPU_LIMIT_EXIT);
        }
    });
}

/// Refuses memory growth beyond the limit — all memories and tables of the run together — and
/// remembers that it did: a run that fails after a refusal ran out of memory.
#[derive(Debug)]
pub struct MemoryLimiter {
    limit_bytes: usize,
    /// Linear memory granted so far, over every memory.
    memory_bytes: usize,
    /// Table elements granted so far, over every table.
    table_elements: usize,
    refused: bool,
}

impl MemoryLimiter {
    /// A limiter for `limit_bytes` of linear memory.
    pub fn new(limit_bytes: u64) -> Self {
        MemoryLimiter {
            limit_bytes: usize::try_from(limit_bytes).unwrap_or(usize::MAX),
            memory_bytes: 0,
            table_elements: 0,
            refused: false,
        }
    }

    /// Whether a growth was refused.
    pub fn refused(&self) -> bool {
        self.refused
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // `memory.grow` answers -1: the module may cope (malloc returns NULL). The total counts
        // every memory (multi-memory is off, but the count does not rely on it).
        let total = self.memory_bytes.saturating_sub(current).saturating_add(desired);
        let ok = total <= self.limit_bytes;
        if ok {
            self.memory_bytes = total;
        }
        self.refused |= !ok;
        Ok(ok)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.table_elements.saturating_sub(current).saturating_add(desired);
        let ok = total <= MAX_TABLE_ELEMENTS;
        if ok {
            self.table_elements = total;
        }
        self.refused |= !ok;
        Ok(ok)
    }

    // One module, one memory, a few tables: a WASI command needs no more.
    fn instances(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

struct State {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
}

/// The engine for a run: Cranelift, no fuel, no epochs; relaxed SIMD deterministic (the same
/// answers on every provider); with `canonical_nans`, the NaN result of every float operation made
/// canonical (for modules [`crate::canon::rewrite`] cannot rewrite).
pub fn engine(canonical_nans: bool) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.cranelift_nan_canonicalization(canonical_nans);
    config.relaxed_simd_deterministic(true);
    // A WASI p1 command has one memory; more would only be a way around the memory limit.
    config.wasm_multi_memory(false);
    // Compiled on this one thread: the CPU limit is read on the process's CPU clock, and with
    // compilation on several threads it could pass `cpu_ms` before as much wall time did — the
    // market refuses a CPU limit claimed sooner after the award than the limit (less a lease
    // TTL), so an honest run must not reach it faster than the wall clock.
    config.parallel_compilation(false);
    Engine::new(&config)
}

/// What an error really was (its innermost cause, without wasmtime's backtrace), on one line.
fn short(e: &wasmtime::Error) -> String {
    e.root_cause().to_string().replace('\n', " ").chars().take(1000).collect()
}

/// Compiles and runs the job's module in this process; says how it ended.
pub fn run_module(job: &Job) -> End {
    let bytes = match read_bounded(&job.module, MAX_MODULE_BYTES) {
        Ok(b) => b,
        Err(reason) => return End::InvalidModule { reason },
    };
    // Canonical NaNs: by rewriting the module where it allows it (see `canon`), else by Cranelift
    // after every float operation.
    let (bytes, every_op) = crate::canon::prepare(bytes, job.canonical_nans);
    let engine = match engine(every_op) {
        Ok(e) => e,
        Err(e) => return End::Crashed { reason: format!("cannot configure wasmtime: {}", short(&e)) },
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
        wasi.secure_random(SeededRandom::new(seed, "secure"));
        wasi.insecure_random(SeededRandom::new(seed, "insecure"));
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
        Err(_) if store.data().limiter.refused() => return End::MemoryLimit { limit_bytes: job.limits.memory_bytes },
        // A start function's trap is the module's doing; anything else (an import of the right
        // name and the wrong type, too many tables) is the module not fitting what jobs are given.
        Err(e) if e.downcast_ref::<wasmtime::Trap>().is_some() => return failed(&store, e, job),
        Err(e) => return End::InvalidModule { reason: short(&e) },
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

/// The file at `path`, if it is at most `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > max {
        return Err(format!("the module is larger than {} MiB", max >> 20));
    }
    Ok(bytes)
}

/// An endless stream of random-looking bytes from a seed: BLAKE3's extendable output under a
/// key derived from the seed and the stream's name. The same on every provider.
pub struct SeededRandom(blake3::OutputReader);

impl std::fmt::Debug for SeededRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeededRandom")
    }
}

impl SeededRandom {
    /// The stream `name` of `seed`.
    pub fn new(seed: &[u8; 32], name: &str) -> Self {
        let mut h = blake3::Hasher::new_derive_key("archipel job random v1");
        h.update(seed).update(name.as_bytes());
        SeededRandom(h.finalize_xof())
    }
}

impl rand::TryRng for SeededRandom {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.0.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill(dst);
        Ok(())
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
