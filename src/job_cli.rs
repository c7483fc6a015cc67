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
    /// Post a job to the marketplace: `archipel job submit examples/jobs/wordcount.wasm --input
    /// notes.txt --max-price 100 --region eu --wait`. Local files are stored as objects first.
    Submit(crate::market_cli::SubmitArgs),
    /// Where a job is: its auction, its leases, its results, how it ended.
    Status(crate::market_cli::JobArgs),
    /// The logs (stderr) of a job's runs, from their providers.
    Logs(crate::market_cli::JobArgs),
    /// The accepted output of a job, checked against the ledger's hash.
    Output(crate::market_cli::OutputArgs),
    /// Why a job has no (or too few) bids: the providers that match its policy and why the
    /// others declined.
    Why(crate::market_cli::JobArgs),
    /// Cancel a job before any provider was awarded it: the escrow comes back.
    Cancel(crate::market_cli::JobArgs),
}

/// A run's limits as flags (`job run-local`, `job submit`); each overrides a spec's.
#[derive(Args, Debug)]
pub struct LimitFlags {
    /// Linear memory the module may use (default 256MiB).
    #[arg(long)]
    pub(crate) memory: Option<String>,
    /// CPU time one run may use (default 60s).
    #[arg(long)]
    pub(crate) cpu: Option<String>,
    /// Wall time one run may take (default 120s).
    #[arg(long)]
    pub(crate) timeout: Option<String>,
    /// Output (stdout) the module may write (default 64MiB).
    #[arg(long)]
    pub(crate) max_output: Option<String>,
}

/// `archipel job run-local`.
#[derive(Args, Debug)]
pub struct RunLocalArgs {
    /// The module (binary .wasm or .wat text); or give --spec.
    #[arg(required_unless_present = "spec")]
    module: Option<PathBuf>,
    /// A job spec file (TOML, or JSON when it ends in .json): module, inputs, args, env, limits,
    /// redundancy — see README. Flags given as well override it.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// The file given as stdin (default: the spec's inputs, concatenated; else empty stdin).
    #[arg(long)]
    stdin: Option<PathBuf>,
    /// An argument for the module (repeat for more).
    #[arg(long = "arg", allow_hyphen_values = true)]
    args: Vec<String>,
    /// An environment variable for the module, KEY=VALUE (repeat for more).
    #[arg(long = "env")]
    env: Vec<String>,
    #[command(flatten)]
    limits: LimitFlags,
    /// Log (stderr) kept; the rest is counted (default 64KiB).
    #[arg(long)]
    max_log: Option<String>,
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
        JobCommand::Submit(a) => crate::market_cli::submit(a).await,
        JobCommand::Status(a) => crate::market_cli::status(a).await,
        JobCommand::Logs(a) => crate::market_cli::logs(a).await,
        JobCommand::Output(a) => crate::market_cli::output(a).await,
        JobCommand::Why(a) => crate::market_cli::why(a).await,
        JobCommand::Cancel(a) => crate::market_cli::cancel(a).await,
    }
}

/// Largest spec file read.
const MAX_SPEC_BYTES: u64 = 1 << 20;

/// A job spec file, read by `job run-local` and `job submit` alike. Local paths are relative to
/// the file (and, for `job submit`, inside its directory); `job submit` also takes
/// `stored:BUCKET/KEY` for a stored object.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpecFile {
    /// The module.
    pub(crate) module: Option<String>,
    /// Inputs, concatenated as stdin.
    #[serde(default)]
    pub(crate) inputs: Vec<String>,
    #[serde(default)]
    pub(crate) args: Vec<String>,
    #[serde(default)]
    pub(crate) env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) limits: SpecLimits,
    /// On how many providers the job is to run (1–5): above 1, NaNs are canonical and WASI's
    /// randomness seeded, as providers will run it.
    pub(crate) redundancy: Option<u8>,
    /// The most paid one provider for one run, in micro-units (`job submit`).
    pub(crate) max_price: Option<u64>,
    /// How long sealed bids are taken (`job submit`), e.g. "2s".
    pub(crate) bid_window: Option<String>,
    /// Allowed regions or areas (`job submit`), e.g. ["eu"].
    #[serde(default)]
    pub(crate) regions: Vec<String>,
    /// Allowed countries of the hardware (`job submit`), e.g. ["DE", "FR"].
    #[serde(default)]
    pub(crate) countries: Vec<String>,
    /// Refused operator jurisdictions (`job submit`), e.g. ["US"].
    #[serde(default)]
    pub(crate) deny_jurisdictions: Vec<String>,
    /// The directory the spec's relative paths start from.
    #[serde(skip)]
    base: PathBuf,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpecLimits {
    pub(crate) memory: Option<String>,
    pub(crate) cpu: Option<String>,
    pub(crate) timeout: Option<String>,
    pub(crate) max_output: Option<String>,
    pub(crate) max_log: Option<String>,
}

impl SpecFile {
    /// The spec's module as a local path.
    fn module_path(&self) -> Option<PathBuf> {
        self.module.as_ref().map(|m| self.base.join(m))
    }

    /// The spec's inputs as local paths.
    fn input_paths(&self) -> Vec<PathBuf> {
        self.inputs.iter().map(|i| self.base.join(i)).collect()
    }

    /// The spec's environment with the `--env KEY=VALUE` flags `flags` added (a flag replaces
    /// the spec's variable of its name).
    pub(crate) fn env_with(&self, flags: &[String]) -> Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = self.env.clone().into_iter().collect();
        for kv in flags {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    env.retain(|(name, _)| name != k);
                    env.push((k.to_string(), v.to_string()));
                }
                _ => bail!("--env {kv:?}: give KEY=VALUE"),
            }
        }
        Ok(env)
    }

    /// `text` as a file of the spec's own directory tree: refused when absolute, or when it leads
    /// outside that tree (`..`, or a symbolic link out of it). A spec someone else wrote cannot
    /// make `job submit` publish a file of yours elsewhere (the job carries its data key).
    pub(crate) fn inside(&self, text: &str) -> Result<PathBuf> {
        let path = std::path::Path::new(text);
        if path.is_absolute() {
            bail!("the spec names {text:?}: paths in a spec are relative to it (copy the file next to the spec)");
        }
        let local = self.base.join(path);
        let base = std::fs::canonicalize(if self.base.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            &self.base
        })
        .with_context(|| format!("cannot resolve the spec's directory {}", self.base.display()))?;
        let real = std::fs::canonicalize(&local)
            .with_context(|| format!("the spec names {text:?}, but there is no file {}", local.display()))?;
        if !real.starts_with(&base) {
            bail!(
                "the spec names {text:?}, which leads outside the spec's directory {} (to {})",
                base.display(),
                real.display()
            );
        }
        if !real.is_file() {
            bail!("the spec names {text:?}, but {} is not a file", local.display());
        }
        Ok(real)
    }

    pub(crate) fn load(path: &std::path::Path) -> Result<SpecFile> {
        use std::io::Read as _;
        let file = std::fs::File::open(path).with_context(|| format!("cannot read the spec {}", path.display()))?;
        let mut text = String::new();
        file.take(MAX_SPEC_BYTES + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read the spec {} (is it text?)", path.display()))?;
        if text.len() as u64 > MAX_SPEC_BYTES {
            bail!(
                "the spec {} is larger than {} KiB: a job spec names files, it does not hold them",
                path.display(),
                MAX_SPEC_BYTES >> 10
            );
        }
        let mut spec: SpecFile = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| anyhow!("the spec {} is not a job spec: {e}", path.display()))?
        } else {
            toml::from_str(&text).map_err(|e| anyhow!("the spec {} is not a job spec: {e}", path.display()))?
        };
        if let Some(n) = spec.redundancy
            && !(1..=archipel_market::spec::MAX_REDUNDANCY).contains(&n)
        {
            bail!("the spec's redundancy {n} is out of range: run a job on 1 to 5 providers");
        }
        spec.base = path.parent().unwrap_or(std::path::Path::new(".")).to_path_buf();
        Ok(spec)
    }
}

/// The flag's value, else the spec's, else the default, as a number.
pub(crate) fn pick<T>(
    flag: &Option<String>,
    spec: &Option<String>,
    default: &str,
    name: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T> {
    let text = flag.as_deref().or(spec.as_deref()).unwrap_or(default);
    parse(text).map_err(|e| anyhow!("{name}: {e}"))
}

fn limits(a: &RunLocalArgs, s: &SpecLimits) -> Result<Limits> {
    let l = Limits {
        memory_bytes: pick(&a.limits.memory, &s.memory, "256MiB", "--memory (limits.memory)", parse_bytes)?,
        cpu_ms: pick(&a.limits.cpu, &s.cpu, "60s", "--cpu (limits.cpu)", parse_millis)?,
        wall_ms: pick(&a.limits.timeout, &s.timeout, "120s", "--timeout (limits.timeout)", parse_millis)?,
        output_bytes: pick(
            &a.limits.max_output,
            &s.max_output,
            "64MiB",
            "--max-output (limits.max_output)",
            parse_bytes,
        )?,
        log_bytes: pick(&a.max_log, &s.max_log, "64KiB", "--max-log (limits.max_log)", parse_bytes)?,
    };
    if let Some(why) = l.check() {
        bail!("{why}");
    }
    Ok(l)
}

/// The inputs concatenated into one file in `dir` (the module's stdin).
fn concatenate(inputs: &[PathBuf], dir: &std::path::Path) -> Result<PathBuf> {
    let path = dir.join("stdin");
    let mut out = std::fs::File::create(&path)?;
    for i in inputs {
        let mut f = std::fs::File::open(i).with_context(|| format!("cannot read the input {}", i.display()))?;
        std::io::copy(&mut f, &mut out)?;
    }
    Ok(path)
}

async fn run_local(a: RunLocalArgs) -> Result<()> {
    let spec = match &a.spec {
        Some(p) => SpecFile::load(p)?,
        None => SpecFile::default(),
    };
    let limits = limits(&a, &spec.limits)?;
    let env = spec.env_with(&a.env)?;
    let redundant = spec.redundancy.unwrap_or(1) > 1;
    let seed = match &a.seed {
        Some(h) => Some(
            hex::decode(h)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| anyhow!("--seed: give 64 hex digits (32 bytes)"))?,
        ),
        // As providers will: the seed of a redundant job is fixed (here, by the spec's bytes).
        None if redundant => a.spec.as_ref().and_then(|p| std::fs::read(p).ok()).map(|b| *blake3::hash(&b).as_bytes()),
        None => None,
    };
    let module = a.module.clone().or(spec.module_path()).ok_or_else(|| anyhow!("the spec names no module"))?;
    let work = tempfile::tempdir().context("cannot make a temporary directory")?;
    let spec_inputs = spec.input_paths();
    let stdin = match (&a.stdin, spec_inputs.is_empty()) {
        (Some(f), _) => Some(f.clone()),
        (None, false) => Some(concatenate(&spec_inputs, work.path())?),
        (None, true) => None,
    };
    let job = Job {
        module: module.clone(),
        stdin: stdin.clone(),
        args: if a.args.is_empty() { spec.args.clone() } else { a.args.clone() },
        env,
        limits,
        canonical_nans: a.canonical_nans || redundant,
        seed,
    };
    let runner = Runner::new(std::env::current_exe().context("cannot find the archipel binary")?, &["wasm-run"]);
    let outcome = match (&a.output, a.json) {
        (Some(path), _) => {
            let inputs = stdin.iter().chain(&spec_inputs).chain(a.spec.iter());
            for (what, other) in std::iter::once(("the module", &module)).chain(inputs.map(|i| ("an input", i))) {
                if same_file(other, path) {
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
