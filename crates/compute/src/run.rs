//! The parent side of a run: starts the child process ([`crate::child`]) with a clean
//! environment, gives it the input file as stdin, copies its stdout into the caller's sink up to
//! the output limit (hashing it on the way), keeps the first bytes of its stderr as the log,
//! kills it at the wall-time deadline or when the output passes its limit, and reads how it ended.
//! Dropping the future kills the child too.

use crate::child::{CPU_LIMIT_EXIT, Request, Status};
use crate::{End, Job};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// What went wrong on the provider's side, before or around the run (the module's own failures
/// are an [`End`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A limit is zero or above [`crate::MAX_LIMITS`].
    #[error("bad limits: {0}")]
    Limits(String),
    /// The module or input file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The child process could not be started.
    #[error("cannot start the runner {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The output sink refused bytes (e.g. a full disk): the run was stopped.
    #[error("cannot keep the job's output: {0}")]
    Output(std::io::Error),
    /// The run's own files (request, status) could not be written or read.
    #[error("cannot prepare the run: {0}")]
    Work(std::io::Error),
    /// The child found another parent than this process and ran nothing (the runner's program
    /// forks instead of exec'ing the child): the provider's fault, no result of the job.
    #[error(
        "the runner process ran nothing: it found another parent than this one (is the runner's program a wrapper that forks?)"
    )]
    Orphaned,
}

/// How a run went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// How it ended.
    pub end: End,
    /// Bytes of stdout kept (at most the output limit).
    pub output_bytes: u64,
    /// BLAKE3 of those bytes, hex.
    pub output_blake3: String,
    /// The first [`crate::Limits::log_bytes`] of stderr.
    pub log: Vec<u8>,
    /// Bytes of stderr beyond those, counted and dropped.
    pub log_dropped: u64,
    /// CPU time the child reported (none when it was killed or crashed).
    pub cpu_ms: Option<u64>,
    /// Wall time from start to end.
    pub wall_ms: u64,
}

/// How to start the child: a program and the arguments before the request file, e.g. the
/// `archipel` binary and `wasm-run`.
#[derive(Clone, Debug)]
pub struct Runner {
    program: PathBuf,
    prefix: Vec<OsString>,
}

impl Runner {
    /// Starts children as `program prefix… REQUEST`. The child checks that its parent is this
    /// process, so `program` must be the child or exec it (`nice` may wrap it; `sh -c` may not).
    pub fn new(program: impl Into<PathBuf>, prefix: &[&str]) -> Self {
        Runner { program: program.into(), prefix: prefix.iter().map(OsString::from).collect() }
    }

    /// Runs `job`, copying its output into `output`.
    pub async fn run<W>(&self, job: &Job, output: &mut W) -> Result<Outcome, RunError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        if let Some(why) = job.limits.check() {
            return Err(RunError::Limits(why));
        }
        let stdin = match &job.stdin {
            Some(p) => {
                Stdio::from(std::fs::File::open(p).map_err(|source| RunError::Read { path: p.clone(), source })?)
            }
            None => Stdio::null(),
        };
        std::fs::metadata(&job.module).map_err(|source| RunError::Read { path: job.module.clone(), source })?;
        let work = tempfile::Builder::new().prefix("archipel-run-").tempdir().map_err(RunError::Work)?;
        let status_path = work.path().join("status.json");
        let request_path = work.path().join("request.json");
        let mut job = job.clone();
        // The child runs in the work directory: paths it is given must not depend on ours.
        job.module = std::path::absolute(&job.module).map_err(RunError::Work)?;
        let request = Request { job: job.clone(), status: status_path.clone(), parent: Some(std::process::id()) };
        std::fs::write(&request_path, serde_json::to_vec(&request).map_err(|e| RunError::Work(e.into()))?)
            .map_err(RunError::Work)?;

        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(job.limits.wall_ms);
        let mut child = tokio::process::Command::new(&self.program)
            .args(&self.prefix)
            .arg(&request_path)
            .current_dir(work.path())
            .env_clear()
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| RunError::Spawn { program: self.program.clone(), source })?;
        let stdout = child.stdout.take().ok_or_else(|| RunError::Work(std::io::Error::other("no stdout pipe")))?;
        let stderr = child.stderr.take().ok_or_else(|| RunError::Work(std::io::Error::other("no stderr pipe")))?;
        let log = tokio::spawn(keep_log(stderr, job.limits.log_bytes));

        let mut hasher = blake3::Hasher::new();
        let copied =
            tokio::time::timeout_at(deadline, copy_bounded(stdout, output, job.limits.output_bytes, &mut hasher)).await;
        let (mut forced, output_bytes) = match copied {
            Err(_) => (Some(End::WallLimit { limit_ms: job.limits.wall_ms }), hasher.count()),
            Ok(Ok(Copied { bytes, over: true })) => {
                (Some(End::OutputLimit { limit_bytes: job.limits.output_bytes }), bytes)
            }
            Ok(Ok(Copied { bytes, over: false })) => (None, bytes),
            Ok(Err(CopyError::Sink(e))) => {
                let _ = child.kill().await;
                return Err(RunError::Output(e));
            }
            // The pipe broke: the child is going; its status says how.
            Ok(Err(CopyError::Pipe)) => (None, hasher.count()),
        };
        if forced.is_some() {
            let _ = child.start_kill();
        }
        // stdout closed (the module may close it and go on): the deadline still holds.
        let exit = match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(r) => r,
            Err(_) => {
                forced = Some(End::WallLimit { limit_ms: job.limits.wall_ms });
                let _ = child.start_kill();
                child.wait().await
            }
        }
        .map_err(RunError::Work)?;
        let wall_ms = started.elapsed().as_millis() as u64;
        let (log, log_dropped) = log.await.unwrap_or_default();
        let status: Option<Status> = std::fs::read(&status_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let (end, cpu_ms) = match (forced, status) {
            (Some(end), _) => (end, None),
            (None, Some(s)) => (s.end, Some(s.cpu_ms)),
            (None, None) if exit.code() == Some(crate::child::ORPHANED_EXIT) => return Err(RunError::Orphaned),
            (None, None) => (ended_without_status(&exit, &job), None),
        };
        Ok(Outcome {
            end,
            output_bytes,
            output_blake3: hasher.finalize().to_hex().to_string(),
            log,
            log_dropped,
            cpu_ms,
            wall_ms,
        })
    }
}

/// The end of a child that wrote no status: the kernel's CPU limit (SIGXCPU), or a crash.
fn ended_without_status(exit: &std::process::ExitStatus, job: &Job) -> End {
    use std::os::unix::process::ExitStatusExt as _;
    const SIGXCPU: i32 = 24;
    match (exit.signal(), exit.code()) {
        (Some(SIGXCPU), _) | (_, Some(CPU_LIMIT_EXIT)) => End::CpuLimit { limit_ms: job.limits.cpu_ms },
        _ => End::Crashed { reason: format!("the runner process ended ({exit}) without a status") },
    }
}

struct Copied {
    bytes: u64,
    over: bool,
}

enum CopyError {
    /// Reading the child's stdout failed.
    Pipe,
    /// Writing the sink failed.
    Sink(std::io::Error),
}

/// Copies `from` into `to` until its end or until `limit` bytes would be passed (then
/// `over`), hashing what is kept.
async fn copy_bounded<R, W>(
    mut from: R,
    to: &mut W,
    limit: u64,
    hasher: &mut blake3::Hasher,
) -> Result<Copied, CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; 64 << 10];
    let mut bytes = 0u64;
    loop {
        let n = from.read(&mut buf).await.map_err(|_| CopyError::Pipe)?;
        if n == 0 {
            to.flush().await.map_err(CopyError::Sink)?;
            return Ok(Copied { bytes, over: false });
        }
        let room = usize::try_from(limit - bytes).unwrap_or(usize::MAX);
        let keep = n.min(room);
        to.write_all(&buf[..keep]).await.map_err(CopyError::Sink)?;
        hasher.update(&buf[..keep]);
        bytes += keep as u64;
        if keep < n {
            to.flush().await.map_err(CopyError::Sink)?;
            return Ok(Copied { bytes, over: true });
        }
    }
}

/// Reads `from` to its end, keeping the first `limit` bytes and counting the rest.
async fn keep_log<R: AsyncRead + Unpin>(mut from: R, limit: u64) -> (Vec<u8>, u64) {
    let mut kept = Vec::new();
    let mut dropped = 0u64;
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = usize::try_from(limit.saturating_sub(kept.len() as u64)).unwrap_or(usize::MAX);
        let keep = n.min(room);
        kept.extend_from_slice(&buf[..keep]);
        dropped += (n - keep) as u64;
    }
    (kept, dropped)
}
