//! Runs a `wasm32-wasip1` job: a module, its stdin, args and env, under limits on memory, CPU time,
//! wall time and output — and says in a typed [`End`] how the run ended.
//!
//! Each run is its own child process (`archipel wasm-run REQUEST`, see [`child`]) that the parent
//! ([`run`]) starts, feeds and, when needed, kills. The limits cost the generated code nothing:
//! - **memory**: wasmtime's resource limiter refuses `memory.grow` (and table growth) beyond the
//!   limit — a check at growth, not per access;
//! - **CPU time**: a watchdog thread in the child reads the process CPU clock every
//!   [`child::WATCHDOG_EVERY`], and the kernel's `RLIMIT_CPU` (whole seconds, one over) backs it;
//! - **wall time**: the parent kills the child at its deadline;
//! - **output**: the parent reads the child's stdout into the caller's sink and kills the child
//!   when it passes the limit; stderr is kept up to a bound as the job's log, the rest counted.
//!
//! Fuel and epoch interruption are not used: measured here (`../shared/notes/performance.md`), they
//! make tight float loops ~1.5× slower, where a process per job costs ~nothing per instruction.
//! Canonical NaNs are asked for ([`Job::canonical_nans`]) by jobs whose outputs are compared across
//! providers; [`canon`] rewrites the module to make arithmetic NaNs canonical only where their bits
//! could be seen, not after every float operation (~3–5× on float loops) — observably the same;
//! modules using SIMD get the latter.
//!
//! The module gets no filesystem, no network and no clock beyond WASI's: its stdin is the input,
//! its stdout the output. Architecture Invariant: nothing here reads the ledger or the network.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub mod canon;
pub mod child;
pub mod run;

pub use run::{Outcome, RunError, Runner};

/// The limits a run is held to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Linear memory (all memories together) the module may grow to.
    pub memory_bytes: u64,
    /// CPU time of the whole run (compilation included), to within [`child::WATCHDOG_EVERY`].
    pub cpu_ms: u64,
    /// Wall time from start to end.
    pub wall_ms: u64,
    /// Bytes the module may write to stdout.
    pub output_bytes: u64,
    /// Bytes of stderr kept as the run's log (the rest is counted, not kept).
    pub log_bytes: u64,
}

impl Default for Limits {
    /// 256 MiB, 60 s of CPU, 120 s of wall time, 64 MiB of output, 64 KiB of log.
    fn default() -> Self {
        Limits {
            memory_bytes: 256 << 20,
            cpu_ms: 60_000,
            wall_ms: 120_000,
            output_bytes: 64 << 20,
            log_bytes: 64 << 10,
        }
    }
}

/// Most a limit may be set to (a provider's own bound is lower): 4 GiB of memory (wasm32's
/// address space), a day of CPU or wall time, 4 GiB of output, 1 MiB of log.
pub const MAX_LIMITS: Limits = Limits {
    memory_bytes: 4 << 30,
    cpu_ms: 86_400_000,
    wall_ms: 86_400_000,
    output_bytes: 4 << 30,
    log_bytes: 1 << 20,
};

impl Limits {
    /// The first limit above [`MAX_LIMITS`] or zero, named, or `None` when all are sane.
    pub fn check(&self) -> Option<String> {
        let fields = [
            ("memory_bytes", self.memory_bytes, MAX_LIMITS.memory_bytes),
            ("cpu_ms", self.cpu_ms, MAX_LIMITS.cpu_ms),
            ("wall_ms", self.wall_ms, MAX_LIMITS.wall_ms),
            ("output_bytes", self.output_bytes, MAX_LIMITS.output_bytes),
            ("log_bytes", self.log_bytes, MAX_LIMITS.log_bytes),
        ];
        fields.iter().find_map(|(name, v, max)| match *v {
            0 if *name != "log_bytes" && *name != "output_bytes" => {
                Some(format!("{name} is 0: give it a positive value"))
            }
            v if v > *max => Some(format!("{name} {v} is above the most allowed, {max}")),
            _ => None,
        })
    }
}

/// One run: the module, what it is given, and its limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    /// The module file (binary wasm, or WAT text).
    pub module: PathBuf,
    /// The file given as stdin; none: stdin is empty.
    pub stdin: Option<PathBuf>,
    /// Arguments after the program name (`argv[1..]`).
    pub args: Vec<String>,
    /// Environment variables, in order.
    pub env: Vec<(String, String)>,
    /// The limits.
    pub limits: Limits,
    /// Canonical NaNs wherever their bits can be observed (for outputs compared across providers;
    /// see [`canon`]).
    pub canonical_nans: bool,
    /// When set, WASI's random bytes come from this seed (the same on every provider, so that
    /// redundant runs agree); when not, from the host's generator.
    #[serde(default)]
    pub seed: Option<[u8; 32]>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum End {
    /// The module returned from `_start` (code 0) or called `proc_exit(code)`.
    Exited {
        /// The exit code; 0 is success.
        code: i32,
    },
    /// The module trapped (unreachable, out-of-bounds access, division by zero, stack overflow…).
    Trapped {
        /// What the trap was.
        trap: String,
    },
    /// The module asked for more memory than [`Limits::memory_bytes`] and then failed.
    MemoryLimit {
        /// The limit.
        limit_bytes: u64,
    },
    /// The run used [`Limits::cpu_ms`] of CPU time.
    CpuLimit {
        /// The limit.
        limit_ms: u64,
    },
    /// The run was still going at [`Limits::wall_ms`].
    WallLimit {
        /// The limit.
        limit_ms: u64,
    },
    /// The module wrote more than [`Limits::output_bytes`] to stdout.
    OutputLimit {
        /// The limit.
        limit_bytes: u64,
    },
    /// The module is not valid WebAssembly, or not a WASI command (no `_start`).
    InvalidModule {
        /// Why.
        reason: String,
    },
    /// The module imports something a job is not offered (only `wasi_snapshot_preview1` is).
    UnsupportedImport {
        /// The import's module.
        module: String,
        /// The import's name.
        name: String,
    },
    /// The child process ended without saying how (killed from outside, crashed).
    Crashed {
        /// What is known: its exit status.
        reason: String,
    },
}

impl End {
    /// Whether the run succeeded (exit code 0).
    pub fn is_success(&self) -> bool {
        matches!(self, End::Exited { code: 0 })
    }

    /// A short machine-readable name of the kind of end (`exited`, `memory_limit`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            End::Exited { .. } => "exited",
            End::Trapped { .. } => "trapped",
            End::MemoryLimit { .. } => "memory_limit",
            End::CpuLimit { .. } => "cpu_limit",
            End::WallLimit { .. } => "wall_limit",
            End::OutputLimit { .. } => "output_limit",
            End::InvalidModule { .. } => "invalid_module",
            End::UnsupportedImport { .. } => "unsupported_import",
            End::Crashed { .. } => "crashed",
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Exited { code: 0 } => write!(f, "finished"),
            End::Exited { code } => write!(f, "exited with code {code}"),
            End::Trapped { trap } => write!(f, "trapped: {trap}"),
            End::MemoryLimit { limit_bytes } => {
                write!(f, "ran out of memory: the limit is {} (raise it in the job's limits)", size(*limit_bytes))
            }
            End::CpuLimit { limit_ms } => write!(f, "used its {limit_ms} ms of CPU time (raise the CPU limit)"),
            End::WallLimit { limit_ms } => write!(f, "was still running after {limit_ms} ms (raise the time limit)"),
            End::OutputLimit { limit_bytes } => {
                write!(f, "wrote more than its {} of output (raise the output limit)", size(*limit_bytes))
            }
            End::InvalidModule { reason } => write!(f, "is not a runnable wasm32-wasip1 module: {reason}"),
            End::UnsupportedImport { module, name } => write!(
                f,
                "imports {module}::{name}, which jobs are not offered (only wasi_snapshot_preview1, without files or sockets)"
            ),
            End::Crashed { reason } => write!(f, "the runner crashed: {reason}"),
        }
    }
}

/// `bytes` for people: `64 MiB`, `512 KiB`, `1000 bytes`.
pub fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// `64MiB`, `1GiB`, `512KiB`, `1000` (bytes) as bytes; also `kB`/`MB`/`GB` (powers of ten).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let bad = || format!("{text:?} is not a size: use e.g. 64MiB, 1GiB, 512KiB or a number of bytes");
    let n: u64 = n.parse().map_err(|_| bad())?;
    let unit_bytes: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_bytes).ok_or_else(bad)
}

/// `500ms`, `2s`, `5m`, `1h`, `1000` (milliseconds) as milliseconds.
pub fn parse_millis(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let bad = || format!("{text:?} is not a duration: use e.g. 500ms, 30s, 5m or 1h");
    let n: u64 = n.parse().map_err(|_| bad())?;
    let unit_ms: u64 = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_ms).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_or_say_what_is_expected() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("64MiB"));
        assert!(parse_bytes("99999999999999999999GiB").is_err());
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("2s"), Ok(2_000));
        assert_eq!(parse_millis("5m"), Ok(300_000));
        assert!(parse_millis("soon").unwrap_err().contains("30s"));
    }

    #[test]
    fn limits_outside_the_allowed_range_are_named() {
        assert_eq!(Limits::default().check(), None);
        assert!(Limits { wall_ms: 0, ..Limits::default() }.check().unwrap().contains("wall_ms"));
        let why = Limits { memory_bytes: 8 << 30, ..Limits::default() }.check().unwrap();
        assert!(why.contains("memory_bytes") && why.contains("above"), "{why}");
        assert_eq!(Limits { output_bytes: 0, log_bytes: 0, ..Limits::default() }.check(), None);
    }
}
