//! The tenant's side of the compute marketplace: `archipel job submit|status|logs|output|why|
//! cancel` and `archipel market`.
//!
//! `job submit` stores the module (and inputs given as local files) as objects in the tenant's
//! jobs bucket, posts the job with the data keys of exactly those versions (published with the
//! job: the providers must read them), and with `--wait` follows it live until it ends, then
//! fetches the accepted output from a provider whose result was in the majority and checks its
//! BLAKE3 against the ledger before writing it. Everything else reads finalized state, and the
//! providers' own APIs for what only they know (why they declined, their run's output and log).

use crate::job_cli::pick;
use crate::storage_cli::{Tenant, client};
use anyhow::{Context as _, Result, anyhow, bail};
use archipel_compute::{parse_bytes, parse_millis};
use archipel_ledger::{Hash, Payload, Receipt};
use archipel_market::{Ended, Job, JobLimits, JobSpec, ObjectRef, RunOutcome};
use archipel_node::jobs_api::{JobList, JobView, ProviderList};
use archipel_objects::tenant::{FileSource, NewObject, TenantClient};
use archipel_types::{CountryCode, Geofence, PlacementPolicy, RegionMatch};
use clap::Args;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `archipel job submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// The module: a local `.wasm` file (stored into --bucket first), or BUCKET/KEY of a stored
    /// one; or give --spec.
    #[arg(required_unless_present = "spec")]
    module: Option<String>,
    /// A job spec file (TOML, or JSON when it ends in .json), as `job run-local` reads it, with
    /// the market's fields too: max_price, redundancy, regions, countries, deny_jurisdictions,
    /// bid_window (see README). Flags given as well override it.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// An input: a local file (stored into --bucket first) or BUCKET/KEY of a stored object.
    /// Repeat for more; they are concatenated, in order, as the module's stdin.
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// An argument for the module (repeat for more).
    #[arg(long = "arg", allow_hyphen_values = true)]
    args: Vec<String>,
    /// An environment variable for the module, KEY=VALUE (repeat for more).
    #[arg(long = "env")]
    env: Vec<String>,
    /// The most you pay one provider for one run, in micro-units (N runs lock N times this);
    /// required, here or in the spec.
    #[arg(long)]
    max_price: Option<u64>,
    /// On how many providers it runs (1–5; default 1); with more, the majority output is accepted.
    #[arg(long)]
    redundancy: Option<u8>,
    /// Allowed regions or areas, comma separated (`eu`, `eu-de`); default: anywhere.
    #[arg(long = "region", value_delimiter = ',')]
    regions: Vec<RegionMatch>,
    /// Allowed countries of the hardware, comma separated (`DE,FR`).
    #[arg(long, value_delimiter = ',')]
    countries: Vec<CountryCode>,
    /// Refused operator jurisdictions, comma separated (`US`).
    #[arg(long, value_delimiter = ',')]
    deny_jurisdictions: Vec<CountryCode>,
    #[command(flatten)]
    limits: crate::job_cli::LimitFlags,
    /// How long sealed bids are taken, then revealed (200 ms to 10 min; providers bid only in
    /// windows of 500 ms or more; default 2s). Short windows award sooner; on a busy chain a
    /// provider may miss a short reveal window and lose its bond, so the default leaves room.
    #[arg(long)]
    bid_window: Option<String>,
    /// The bucket local files are stored in (created, with the job's region policy, if missing).
    #[arg(long, default_value = "jobs")]
    bucket: String,
    /// Follow the job until it ends, then write its output (to --output, else standard output).
    #[arg(long)]
    wait: bool,
    /// Where --wait writes the output.
    #[arg(long, short)]
    output: Option<PathBuf>,
    #[command(flatten)]
    tenant: Tenant,
}

/// A command on one job.
#[derive(Args, Debug)]
pub struct JobArgs {
    /// The job id (as `job submit` printed it).
    id: String,
    #[command(flatten)]
    tenant: Tenant,
}

/// `archipel job output`.
#[derive(Args, Debug)]
pub struct OutputArgs {
    /// The job id.
    id: String,
    /// Write the output here (default: standard output).
    #[arg(long, short)]
    output: Option<PathBuf>,
    #[command(flatten)]
    tenant: Tenant,
}

fn job_id(text: &str) -> Result<Hash> {
    text.trim()
        .parse()
        .map_err(|_| anyhow!("{text:?} is not a job id (64 hex digits, as `archipel job submit` printed)"))
}

/// The finalized view of job `id`.
async fn fetch_job(c: &TenantClient, id: &Hash) -> Result<JobView> {
    let view: Option<JobView> = c.get_or_absent(&format!("/v1/jobs/{id}")).await?;
    view.ok_or_else(|| anyhow!("no job {id} on the ledger (see `archipel market`)"))
}

/// Stores the local file `path` as `bucket/prefix<blake3>` unless it is stored there already;
/// an object reference with its data key.
async fn store_file(
    c: &TenantClient,
    bucket: &archipel_ledger::storage::BucketRecord,
    path: &Path,
    prefix: &str,
) -> Result<ObjectRef> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let key = format!("{prefix}{}", blake3::hash(&bytes).to_hex());
    if c.object(&bucket.name, &key).await?.is_none() {
        eprintln!("storing {} as {}/{key} …", path.display(), bucket.name);
        c.put(
            bucket,
            NewObject { key: key.clone(), size: bytes.len() as u64, ..Default::default() },
            FileSource(path.to_path_buf()),
            |_| {},
            |w| eprintln!("warning: {w}"),
        )
        .await?;
    }
    stored(c, &bucket.name, &key).await
}

/// The stored object `bucket/key` as a job references it: its version and data key.
async fn stored(c: &TenantClient, bucket: &str, key: &str) -> Result<ObjectRef> {
    let view =
        c.object(bucket, key).await?.ok_or_else(|| anyhow!("no object {bucket}/{key} (see `archipel ls {bucket}`)"))?;
    let opened = c.open(&view).await.with_context(|| format!("cannot open {bucket}/{key} with your key"))?;
    Ok(ObjectRef {
        bucket: bucket.into(),
        key: key.into(),
        version: view.object.version.0,
        data_key: opened.data_key().map_or([0; 32], |k| k.expose()),
    })
}

/// Where a job's module or input comes from.
enum Source {
    /// A local file, stored into the jobs bucket first.
    Local(PathBuf),
    /// A stored object.
    Stored { bucket: String, key: String },
}

/// `text` as BUCKET/KEY, if it has that form.
fn stored_name(text: &str) -> Option<Source> {
    match text.split_once('/') {
        Some((b, k)) if !b.is_empty() && !k.is_empty() => Some(Source::Stored { bucket: b.into(), key: k.into() }),
        _ => None,
    }
}

/// A command-line module or input: a file here, else BUCKET/KEY of a stored object.
fn arg_source(text: &str) -> Result<Source> {
    let path = Path::new(text);
    if path.is_file() {
        return Ok(Source::Local(path.to_path_buf()));
    }
    stored_name(text).ok_or_else(|| anyhow!("{text:?} is neither a file here nor BUCKET/KEY of a stored object"))
}

/// A spec file's module or input (`what`): `stored:BUCKET/KEY` for a stored object, else a file
/// in the spec's own directory tree — never a file of the current directory, nor one outside.
fn spec_source(file: &crate::job_cli::SpecFile, text: &str, what: &str) -> Result<Source> {
    if let Some(name) = text.strip_prefix("stored:") {
        return stored_name(name)
            .ok_or_else(|| anyhow!("the spec's {what} {text:?}: give a stored object as stored:BUCKET/KEY"));
    }
    file.inside(text).map(Source::Local).map_err(|e| anyhow!("the spec's {what}: {e:#}"))
}

/// What a job carries the data key of, as said before posting.
fn describe(source: &Source, what: &str) -> String {
    match source {
        Source::Local(p) => format!("{what} {} (stored into your jobs bucket)", p.display()),
        Source::Stored { bucket, key } => format!("{what} {bucket}/{key} (a stored object)"),
    }
}

/// The jobs bucket, created with the job's fence when missing (once per submission).
async fn jobs_bucket<'b>(
    c: &TenantClient,
    slot: &'b mut Option<archipel_ledger::storage::BucketRecord>,
    make_bucket: &dyn Fn() -> PlacementPolicy,
    bucket_name: &str,
) -> Result<&'b archipel_ledger::storage::BucketRecord> {
    if slot.is_none() {
        let b = match c.bucket(bucket_name).await? {
            Some(b) => b,
            None => {
                let policy = make_bucket();
                eprintln!("creating bucket {bucket_name} ({}) for job files …", policy.describe_fence());
                c.submit(Payload::CreateBucket { name: bucket_name.into(), policy }).await?;
                c.bucket(bucket_name)
                    .await?
                    .ok_or_else(|| anyhow!("bucket {bucket_name} was created but cannot be read"))?
            }
        };
        if b.owner != c.me() {
            bail!("bucket {bucket_name:?} is not yours: pass --bucket with one of your buckets");
        }
        *slot = Some(b);
    }
    slot.as_ref().ok_or_else(|| anyhow!("no jobs bucket"))
}

/// The flag's list when given, else the spec file's entries parsed (`name` in errors).
fn listed<T: std::str::FromStr + Clone>(flag: &[T], file: &[String], name: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    if !flag.is_empty() {
        return Ok(flag.to_vec());
    }
    file.iter().map(|t| t.parse::<T>().map_err(|e| anyhow!("the spec's {name}: {t:?}: {e}"))).collect()
}

/// Runs `archipel job submit`.
pub async fn submit(a: SubmitArgs) -> Result<()> {
    let file = match &a.spec {
        Some(p) => crate::job_cli::SpecFile::load(p)?,
        None => crate::job_cli::SpecFile::default(),
    };
    let geofence = Geofence {
        regions: listed(&a.regions, &file.regions, "regions")?.into_iter().collect(),
        countries: listed(&a.countries, &file.countries, "countries")?.into_iter().collect(),
        deny_jurisdictions: listed(&a.deny_jurisdictions, &file.deny_jurisdictions, "deny_jurisdictions")?
            .into_iter()
            .collect(),
    };
    geofence.validate()?;
    let env = file.env_with(&a.env)?;
    let (l, f) = (&file.limits, &a.limits);
    let limits = JobLimits {
        memory_bytes: pick(&f.memory, &l.memory, "256MiB", "--memory (limits.memory)", parse_bytes)?,
        cpu_ms: pick(&f.cpu, &l.cpu, "60s", "--cpu (limits.cpu)", parse_millis)?,
        wall_ms: pick(&f.timeout, &l.timeout, "120s", "--timeout (limits.timeout)", parse_millis)?,
        output_bytes: pick(&f.max_output, &l.max_output, "64MiB", "--max-output (limits.max_output)", parse_bytes)?,
    };
    let bid_window_ms = pick(&a.bid_window, &file.bid_window, "2s", "--bid-window (bid_window)", parse_millis)?;
    let max_price = a.max_price.or(file.max_price).ok_or_else(|| {
        anyhow!("no price: give --max-price MICRO (or max_price in the spec), the most one run may cost you")
    })?;
    let module = match (&a.module, &file.module) {
        (Some(m), _) => arg_source(m)?,
        (None, Some(m)) => spec_source(&file, m, "module")?,
        (None, None) => bail!("no module: give one (a .wasm file or BUCKET/KEY), or `module` in the spec"),
    };
    let inputs: Vec<Source> = if a.inputs.is_empty() {
        file.inputs.iter().map(|i| spec_source(&file, i, "input")).collect::<Result<_>>()?
    } else {
        a.inputs.iter().map(|i| arg_source(i)).collect::<Result<_>>()?
    };
    let c = client(&a.tenant)?;
    // Checked before anything is stored: a spec the ledger refuses costs no upload.
    let mut spec = JobSpec {
        module: ObjectRef { bucket: "-".into(), key: "-".into(), version: [0; 32], data_key: [0; 32] },
        inputs: vec![],
        args: if a.args.is_empty() { file.args.clone() } else { a.args.clone() },
        env,
        limits,
        max_price_micro: max_price,
        geofence: geofence.clone(),
        redundancy: a.redundancy.or(file.redundancy).unwrap_or(1),
        bid_window_ms,
    };
    spec.check()?;
    let fence = geofence.clone();
    let make_bucket = move || PlacementPolicy {
        regions: fence.regions.clone(),
        countries: fence.countries.clone(),
        deny_jurisdictions: fence.deny_jurisdictions.clone(),
        ..PlacementPolicy::anywhere(archipel_types::ErasureCode::DEFAULT)
    };
    eprintln!("the job will carry the data keys of (anyone who reads the ledger can read them):");
    eprintln!("  {}", describe(&module, "module"));
    for i in &inputs {
        eprintln!("  {}", describe(i, "input"));
    }
    // Stored objects first: a missing one is said before anything is uploaded.
    let sources: Vec<(&Source, &str)> =
        std::iter::once((&module, "modules/")).chain(inputs.iter().map(|i| (i, "inputs/"))).collect();
    let mut refs: Vec<Option<ObjectRef>> = Vec::with_capacity(sources.len());
    for (source, _) in &sources {
        refs.push(match source {
            Source::Stored { bucket, key } => Some(stored(&c, bucket, key).await?),
            Source::Local(_) => None,
        });
    }
    let mut bucket = None;
    for ((source, prefix), r) in sources.iter().zip(refs.iter_mut()) {
        if let Source::Local(path) = source {
            let b = jobs_bucket(&c, &mut bucket, &make_bucket, &a.bucket).await?;
            *r = Some(store_file(&c, b, path, prefix).await?);
        }
    }
    let mut refs = refs.into_iter().flatten();
    spec.module = refs.next().ok_or_else(|| anyhow!("the module was not resolved"))?;
    spec.inputs = refs.collect();
    let posted = c.submit(Payload::PostJob { spec: spec.clone() }).await?;
    let Receipt::JobStep { job: id, .. } = posted.receipt.clone() else {
        bail!("the ledger's receipt is not a job's: {:?}", posted.receipt)
    };
    if a.tenant.json && !a.wait {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"job": id, "height": posted.height, "escrow_micro": spec.escrow_micro()})
            )?
        );
        return Ok(());
    }
    eprintln!(
        "job {id} posted in block {} — {} locked in escrow ({} × {} runs)",
        posted.height,
        spec.escrow_micro(),
        spec.max_price_micro,
        spec.redundancy
    );
    if !a.wait {
        println!("{id}");
        return Ok(());
    }
    let job = follow(&c, &id).await?;
    match &job.ended {
        Some(Ended::Accepted { outcome: RunOutcome::Success { output }, .. }) => {
            let bytes = fetch_output(&c, &job, output).await?;
            write_out(a.output.as_deref(), &bytes)?;
            if a.tenant.json {
                println!("{}", serde_json::to_string_pretty(&summary(&job))?);
            }
            Ok(())
        }
        Some(e) => bail!("job {id} {}", ended_text(e)),
        None => bail!("job {id} has not ended"),
    }
}

/// Follows job `id`, printing each change, until it ends.
async fn follow(c: &TenantClient, id: &Hash) -> Result<Job> {
    let mut last = String::new();
    loop {
        let view = fetch_job(c, id).await?;
        let line = phase(&view.job, view.now_ms);
        if line != last {
            eprintln!("  {line}");
            last = line;
        }
        if view.job.ended.is_some() {
            return Ok(view.job);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ended_text(e: &Ended) -> String {
    match e {
        Ended::Accepted { outcome: RunOutcome::Success { output }, .. } => {
            format!("accepted: output BLAKE3 {}", hex::encode(output))
        }
        Ended::Accepted { outcome: RunOutcome::Failed { end }, .. } => {
            format!("accepted a failure: {end}, on two rounds of providers (the job's own limit: their runs are paid)")
        }
        Ended::Refunded { why, .. } => format!("refunded: {why}"),
        Ended::Cancelled { .. } => "cancelled: the escrow was refunded".into(),
    }
}

/// One line on where `job` is at block time `now_ms`.
fn phase(job: &Job, now_ms: u64) -> String {
    if let Some(e) = &job.ended {
        return ended_text(e);
    }
    let mut parts = Vec::new();
    if let Some(a) = &job.auction {
        let step = if now_ms < a.commit_until_ms { "taking sealed bids" } else { "revealing bids" };
        parts.push(format!(
            "auction round {}: {step} for {} run(s), {} sealed, {} revealed",
            a.round,
            a.slots,
            a.commits.len(),
            a.bids.len()
        ));
    }
    for l in &job.leases {
        let p = &l.bid.provider;
        let state = match (&l.sealed, &l.result) {
            (None, _) => "running".to_string(),
            (Some(_), None) => "result sealed".to_string(),
            (Some(_), Some(RunOutcome::Success { output })) => format!("result {}", &hex::encode(output)[..12]),
            (Some(_), Some(RunOutcome::Failed { end })) => format!("failed: {end}"),
        };
        parts.push(format!("{} ({}, {}) at {}: {state}", p.node.short(), p.region, p.operator, l.bid.price_micro));
    }
    if !job.earlier.is_empty() {
        let why = if job.limit_claimants.is_empty() {
            "no majority"
        } else {
            "a limit or crash claim, checked on other providers"
        };
        parts.push(format!("running again after {why} ({} earlier run(s) judged at the end)", job.earlier.len()));
    }
    if !job.excluded.is_empty() {
        parts.push(format!("{} provider(s) excluded", job.excluded.len()));
    }
    if parts.is_empty() { "waiting".into() } else { parts.join("; ") }
}

fn summary(job: &Job) -> serde_json::Value {
    serde_json::json!({
        "job": Hash(job.id),
        "tenant": job.tenant,
        "ended": job.ended,
        "escrow_micro": job.escrow_micro,
        "rounds": job.rounds,
        "paid": job.paid,
        "leases": job.leases.iter().map(|l| serde_json::json!({
            "provider": l.bid.provider.node, "region": l.bid.provider.region, "operator": l.bid.provider.operator,
            "price_micro": l.bid.price_micro, "sealed": l.sealed.is_some(), "result": l.result,
        })).collect::<Vec<_>>(),
        "excluded": job.excluded,
        "burned_micro": job.burned_micro,
    })
}

/// The API URLs of the registered providers.
async fn provider_urls(c: &TenantClient) -> Result<BTreeMap<archipel_types::NodeId, String>> {
    let list: ProviderList = c.get_fresh("/v1/providers").await?;
    Ok(list.providers.into_iter().map(|p| (p.provider.node, p.api_url)).collect())
}

/// The output of `job`, from a provider whose result was `output`, checked against it.
async fn fetch_output(c: &TenantClient, job: &Job, output: &[u8; 32]) -> Result<Vec<u8>> {
    let urls = provider_urls(c).await?;
    let mut tried = Vec::new();
    let id = Hash(job.id);
    for l in &job.leases {
        if l.result != Some(RunOutcome::Success { output: *output }) {
            continue;
        }
        let node = l.bid.provider.node;
        let Some(url) = urls.get(&node) else { continue };
        let api = archipel_node::client::ApiClient::new(url).with_identity(c.identity().clone());
        match api.get_bytes(&format!("/v1/jobs/{id}/output")).await {
            Ok(bytes) if blake3::hash(&bytes).as_bytes() == output => return Ok(bytes),
            Ok(_) => tried.push(format!("{}: its bytes do not hash to the accepted output", node.short())),
            Err(e) => tried.push(format!("{}: {e}", node.short())),
        }
    }
    bail!("no provider of the accepted result gave its output: {}", tried.join("; "))
}

fn write_out(path: Option<&Path>, bytes: &[u8]) -> Result<()> {
    match path {
        Some(p) => {
            let tmp = p.with_extension("archipel-partial");
            std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, p).with_context(|| format!("cannot write {}", p.display()))?;
            eprintln!("output: {} bytes written to {}", bytes.len(), p.display());
        }
        None => {
            use std::io::Write as _;
            std::io::stdout().write_all(bytes)?;
        }
    }
    Ok(())
}

/// Runs `archipel job status`.
pub async fn status(a: JobArgs) -> Result<()> {
    let c = client(&a.tenant)?;
    let view = fetch_job(&c, &job_id(&a.id)?).await?;
    if a.tenant.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        let j = &view.job;
        println!("job       {}", Hash(j.id));
        println!("tenant    {}", j.tenant);
        println!("module    {}/{}", j.spec.module.bucket, j.spec.module.key);
        println!(
            "runs      {} at most {} each, {}",
            j.spec.redundancy,
            j.spec.max_price_micro,
            j.spec.geofence.describe()
        );
        println!("escrow    {} held, {} burned from penalties", j.escrow_micro, j.burned_micro);
        println!("now       {}", phase(j, view.now_ms));
        for p in &j.paid {
            println!("paid      {}", p.short());
        }
    }
    Ok(())
}

/// Runs `archipel job output`.
pub async fn output(a: OutputArgs) -> Result<()> {
    let c = client(&a.tenant)?;
    let id = job_id(&a.id)?;
    let job = fetch_job(&c, &id).await?.job;
    match &job.ended {
        Some(Ended::Accepted { outcome: RunOutcome::Success { output }, .. }) => {
            let bytes = fetch_output(&c, &job, output).await?;
            write_out(a.output.as_deref(), &bytes)
        }
        Some(e) => bail!("job {id} has no output: {}", ended_text(e)),
        None => bail!("job {id} has not ended yet: {} (follow it with `archipel job status {id}`)", phase(&job, 0)),
    }
}

/// Runs `archipel job logs`: the log of every run that has one.
pub async fn logs(a: JobArgs) -> Result<()> {
    let c = client(&a.tenant)?;
    let id = job_id(&a.id)?;
    let job = fetch_job(&c, &id).await?.job;
    let urls = provider_urls(&c).await?;
    let mut any = false;
    for l in &job.leases {
        let node = l.bid.provider.node;
        let Some(url) = urls.get(&node) else { continue };
        let api = archipel_node::client::ApiClient::new(url).with_identity(c.identity().clone());
        match api.get_bytes(&format!("/v1/jobs/{id}/log")).await {
            Ok(bytes) => {
                any = true;
                println!("--- {} ({}) ---", node.short(), l.bid.provider.region);
                println!("{}", String::from_utf8_lossy(&bytes));
            }
            Err(e) => eprintln!("{}: {e}", node.short()),
        }
    }
    if !any {
        bail!("no run of job {id} has a log to show yet ({})", phase(&job, 0));
    }
    Ok(())
}

/// Runs `archipel job cancel`.
pub async fn cancel(a: JobArgs) -> Result<()> {
    let c = client(&a.tenant)?;
    let id = job_id(&a.id)?;
    let r = c.submit(Payload::CancelJob { job: id }).await?;
    println!("job {id} cancelled in block {}: the escrow is back", r.height);
    Ok(())
}

/// Runs `archipel job why`: where the job is and, without (enough) bids, why — from the
/// declines the providers recorded.
pub async fn why(a: JobArgs) -> Result<()> {
    let c = client(&a.tenant)?;
    let id = job_id(&a.id)?;
    let view = fetch_job(&c, &id).await?;
    let job = &view.job;
    let list: ProviderList = c.get_fresh("/v1/providers").await?;
    let mut declines = Vec::new();
    for p in &list.providers {
        let api = archipel_node::client::ApiClient::new(&p.api_url);
        let d: Result<archipel_node::provider::Declined, _> = api.get(&format!("/v1/jobs/{id}/declined")).await;
        match d {
            Ok(d) => declines.push(d.decline),
            // A provider outside the fence may not even look; the rule says so from the ledger.
            Err(_) if !job.spec.geofence.allows(&p.provider.region, p.provider.country, p.provider.jurisdiction) => {
                declines.push(archipel_market::Decline::Geofence)
            }
            Err(_) => {}
        }
    }
    let bids = job.auction.as_ref().map_or(0, |a| a.bids.len().max(a.commits.len()));
    let wanted = job.auction.as_ref().map_or(0, |a| a.slots);
    let text = archipel_market::rule::explain(
        &job.spec.geofence,
        job.spec.max_price_micro,
        list.providers.len(),
        &declines,
        bids,
        wanted,
    );
    if a.tenant.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "job": id, "now": phase(job, view.now_ms), "explanation": text, "declines": declines,
                "providers": list.providers.len(),
            }))?
        );
    } else {
        println!("now: {}", phase(job, view.now_ms));
        if job.ended.is_none() && (job.auction.is_some() || job.leases.is_empty()) {
            println!("why: {text}");
        }
    }
    Ok(())
}

/// Runs `archipel market`: open jobs, recent awards, and a price/performance index per region
/// computed from ledger data alone.
pub async fn market(t: Tenant) -> Result<()> {
    let c = client(&t)?;
    let list: JobList = c.get_fresh("/v1/jobs").await?;
    // Per region: accepted runs, their prices, and the providers' reliability.
    let mut regions: BTreeMap<String, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
    for j in &list.recent {
        if !matches!(j.ended, Some(Ended::Accepted { outcome: RunOutcome::Success { .. }, .. })) {
            continue;
        }
        for l in j.leases.iter().filter(|l| j.paid.contains(&l.bid.provider.node)) {
            let e = regions.entry(l.bid.provider.region.to_string()).or_default();
            e.0.push(l.bid.price_micro);
            e.1.push(l.bid.provider.record.reliability_ppm());
        }
    }
    let index: Vec<serde_json::Value> = regions
        .iter_mut()
        .map(|(r, (prices, rel))| {
            prices.sort_unstable();
            let median = prices[prices.len() / 2];
            let reliability = rel.iter().sum::<u64>() / rel.len() as u64;
            // Price per unit of reliability: what a reliable run costs there.
            serde_json::json!({"region": r, "runs": prices.len(), "median_price_micro": median,
                "mean_reliability_ppm": reliability, "price_per_reliability": median * 1_000_000 / reliability.max(1)})
        })
        .collect();
    if t.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "height": list.height, "open": list.open.iter().map(summary).collect::<Vec<_>>(),
                "recent": list.recent.iter().map(summary).collect::<Vec<_>>(), "index": index,
            }))?
        );
        return Ok(());
    }
    println!("open jobs at height {}: {}", list.height, list.open.len());
    for j in &list.open {
        println!("  {}  {}", Hash(j.id).short(), phase(j, list.now_ms));
    }
    println!("recent jobs: {}", list.recent.len());
    for j in list.recent.iter().take(20) {
        println!("  {}  {}", Hash(j.id).short(), phase(j, list.now_ms));
    }
    println!("price/performance by region (accepted runs among the recent jobs):");
    if index.is_empty() {
        println!("  no accepted runs yet");
    }
    for i in &index {
        println!(
            "  {:<10} {:>4} runs, median price {:>8}, reliability at award {:>5.1} %, price per reliable run {}",
            i["region"].as_str().unwrap_or("?"),
            i["runs"],
            i["median_price_micro"],
            i["mean_reliability_ppm"].as_u64().unwrap_or(0) as f64 / 10_000.0,
            i["price_per_reliability"]
        );
    }
    Ok(())
}
