//! `archipel job run-local`: runs a `wasm32-wasip1` module on this machine exactly as a provider
//! runs a paid job — its own process, the same limits, the same typed end — so that a tenant can
//! try a job before posting it. `archipel wasm-run` (hidden) is that process.

use anyhow::{Context as _, Result, anyhow, bail};
use archipel_compute::{End, Job, Limits, Runner, parse_bytes, parse_millis};
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// `archipel job`.
#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Run a wasm32-wasip1 module here, under the limits a provider enforces: its stdin is the
    /// input file, its stdout the output. Example: `archipel job run-local
    /// examples/jobs/wordcount.wasm --stdin notes.txt`.
    RunLocal(RunLocalArgs),
}

/// `archipel job run-local`.
#[derive(Args, Debug)]
pub struct RunLocalArgs {
    /// The module (binary .wasm or .wat text).
    module: PathBuf,
    /// The file given as stdin (default: empty stdin).
    #[arg(long)]
    stdin: Option<PathBuf>,
    /// An argument for the module (repeat for more).
    #[arg(long = "arg", allow_hyphen_values = true)]
    args: Vec<String>,
    /// An environment variable for the module, KEY=VALUE (repeat for more).
    #[arg(long = "env")]
    env: Vec<String>,
    /// Linear memory the module may use.
    #[arg(long, default_value = "256MiB")]
    memory: String,
    /// CPU time the run may use.
    #[arg(long, default_value = "60s")]
    cpu: String,
    /// Wall time the run may take.
    #[arg(long, default_value = "120s")]
    timeout: String,
    /// Output (stdout) the module may write.
    #[arg(long, default_value = "64MiB")]
    max_output: String,
    /// Log (stderr) kept; the rest is counted.
    #[arg(long, default_value = "64KiB")]
    max_log: String,
    /// Canonicalize NaNs, as for jobs run on several providers (slower float code).
    #[arg(long)]
    canonical_nans: bool,
    /// Seed for WASI's random bytes (64 hex digits), as for jobs run on several providers.
    #[arg(long)]
    seed: Option<String>,
    /// Write the output here (default: standard output).
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Print how the run went as JSON (the output then goes only to --output, if given).
    #[arg(long)]
    json: bool,
}

/// Whether `a` and `b` name the same existing file.
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// `bytes` as text with control characters other than newline and tab shown escaped.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() && c != '\n' && c != '\t' { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

/// Runs `archipel job …`.
pub async fn run(command: JobCommand) -> Result<()> {
    match command {
        JobCommand::RunLocal(args) => run_local(args).await,
    }
}

fn limits(a: &RunLocalArgs) -> Result<Limits> {
    let l = Limits {
        memory_bytes: parse_bytes(&a.memory).map_err(|e| anyhow!("--memory: {e}"))?,
        cpu_ms: parse_millis(&a.cpu).map_err(|e| anyhow!("--cpu: {e}"))?,
        wall_ms: parse_millis(&a.timeout).map_err(|e| anyhow!("--timeout: {e}"))?,
        output_bytes: parse_bytes(&a.max_output).map_err(|e| anyhow!("--max-output: {e}"))?,
        log_bytes: parse_bytes(&a.max_log).map_err(|e| anyhow!("--max-log: {e}"))?,
    };
    if let Some(why) = l.check() {
        bail!("{why}");
    }
    Ok(l)
}

async fn run_local(a: RunLocalArgs) -> Result<()> {
    let limits = limits(&a)?;
    let env = a
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(anyhow!("--env {kv:?}: give KEY=VALUE")),
        })
        .collect::<Result<Vec<_>>>()?;
    let seed = match &a.seed {
        None => None,
        Some(h) => Some(
            hex::decode(h)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| anyhow!("--seed: give 64 hex digits (32 bytes)"))?,
        ),
    };
    let job = Job {
        module: a.module.clone(),
        stdin: a.stdin.clone(),
        args: a.args.clone(),
        env,
        limits,
        canonical_nans: a.canonical_nans,
        seed,
    };
    let runner = Runner::new(std::env::current_exe().context("cannot find the archipel binary")?, &["wasm-run"]);
    let outcome = match (&a.output, a.json) {
        (Some(path), _) => {
            for (what, other) in [("the module", Some(&a.module)), ("--stdin", a.stdin.as_ref())] {
                if other.is_some_and(|o| same_file(o, path)) {
                    bail!("--output {} is {what}: it would be overwritten; write the output elsewhere", path.display());
                }
            }
            // Written beside, renamed when the run ends: a file of that name is whole or old.
            let tmp = path.with_file_name(format!(
                ".{}.partial",
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into())
            ));
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("cannot write the output to {}", tmp.display()))?;
            let outcome = runner.run(&job, &mut file).await;
            drop(file);
            match outcome {
                Ok(o) => {
                    std::fs::rename(&tmp, path)
                        .with_context(|| format!("cannot write the output to {}", path.display()))?;
                    o
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            }
        }
        (None, true) => runner.run(&job, &mut tokio::io::sink()).await?,
        (None, false) => runner.run(&job, &mut tokio::io::stdout()).await?,
    };
    if a.json {
        let mut v = serde_json::to_value(&outcome)?;
        v["log"] = serde_json::Value::String(String::from_utf8_lossy(&outcome.log).into_owned());
        v["message"] = serde_json::Value::String(format!("the job {}", outcome.end));
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if !outcome.log.is_empty() {
            // The module's words, not ours: no terminal control sequences get through.
            let log = printable(&outcome.log);
            eprint!("{log}");
            if !log.ends_with('\n') {
                eprintln!();
            }
        }
        if outcome.log_dropped > 0 {
            eprintln!("({} more bytes of log dropped: --max-log)", outcome.log_dropped);
        }
        let cpu = outcome.cpu_ms.map(|c| format!(", {c} ms of CPU")).unwrap_or_default();
        eprintln!(
            "the job {} in {} ms{cpu}; {} bytes of output, blake3 {}",
            outcome.end, outcome.wall_ms, outcome.output_bytes, outcome.output_blake3
        );
    }
    match outcome.end {
        End::Exited { code: 0 } => Ok(()),
        end => Err(anyhow!("the job {end}")),
    }
}
