//! Object storage from the command line: `archipel bucket create|ls|show|rm`, `archipel put`,
//! `get`, `ls`, `rm` and `stat`.
//!
//! Data is encrypted, erasure-coded and hashed here, on the tenant's machine
//! (`archipel_objects`); nodes only receive shards. A PUT returns once its `PutObject` is final.
//! Long transfers show a progress bar (bytes, rate, ETA) on a terminal; `--json` prints one JSON
//! document instead.

use crate::ledger_cli::NodeArg;
use anyhow::{Context as _, Result, anyhow, bail};
use archipel_crypto::Identity;
use archipel_ledger::Payload;
use archipel_ledger::storage::BucketRecord;
use archipel_objects::api::{ObjectList, ObjectView};
use archipel_objects::tenant::{FileSource, NewObject, TenantClient};
use archipel_types::{CountryCode, ErasureCode, PlacementPolicy, RegionMatch};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt as _;

/// Who signs and which node is asked.
#[derive(Args, Debug, Clone)]
pub struct Tenant {
    /// Your key file (default: the devnet tenant key).
    #[arg(long, env = "ARCHIPEL_KEY")]
    pub(crate) key: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) node: NodeArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `archipel bucket`.
#[derive(Subcommand, Debug)]
pub enum BucketCommand {
    /// Create a bucket with a placement policy; refused, with the numbers, when the live
    /// network cannot place it. Example: `archipel bucket create eu-docs --regions eu
    /// --deny-jurisdictions US` ("EU only, no US-operated nodes").
    Create {
        /// The bucket's name (3-63 lowercase letters, digits, dots, hyphens).
        name: String,
        /// Erasure code DATA+PARITY.
        #[arg(long, default_value = "4+2")]
        code: ErasureCode,
        /// Allowed regions or areas, comma separated (`eu`, `eu-de`); default: anywhere.
        #[arg(long, value_delimiter = ',')]
        regions: Vec<RegionMatch>,
        /// Allowed countries of the hardware, comma separated (`DE,FR`); default: any.
        #[arg(long, value_delimiter = ',')]
        countries: Vec<CountryCode>,
        /// Refused operator jurisdictions, comma separated (`US`).
        #[arg(long, value_delimiter = ',')]
        deny_jurisdictions: Vec<CountryCode>,
        /// Fewest distinct regions per object's shards.
        #[arg(long, default_value_t = 1)]
        min_regions: u8,
        /// Fewest distinct operators per object's shards.
        #[arg(long, default_value_t = 1)]
        min_operators: u8,
        #[command(flatten)]
        tenant: Tenant,
    },
    /// List buckets.
    Ls(#[command(flatten)] Tenant),
    /// Show a bucket: owner, policy, objects, bytes.
    Show {
        /// The bucket.
        name: String,
        #[command(flatten)]
        tenant: Tenant,
    },
    /// Delete an empty bucket.
    Rm {
        /// The bucket.
        name: String,
        #[command(flatten)]
        tenant: Tenant,
    },
}

/// `BUCKET/KEY`.
fn split_path(path: &str) -> Result<(String, String)> {
    match path.split_once('/') {
        Some((b, k)) if !b.is_empty() && !k.is_empty() => Ok((b.to_string(), k.to_string())),
        _ => bail!("{path:?} is not BUCKET/KEY (e.g. eu-docs/reports/2026.pdf)"),
    }
}

fn identity(t: &Tenant) -> Result<Identity> {
    let path = t.key.clone().unwrap_or_else(|| Path::new(crate::devnet::DEFAULT_DIR).join("tenant.key"));
    Ok(Identity::load(&path)?)
}

/// The tenant's client: its key and the nodes asked — `--node` (several comma-separated), or
/// every node of the local devnet, its first one first. Several nodes let a read of absence or
/// a listing be checked at the freshest height among them (`TenantClient::freshest`): an object
/// the gateway has just written is then never missed by a node a block behind.
pub fn client(t: &Tenant) -> Result<TenantClient> {
    let mut nodes: Vec<String> = match &t.node.node {
        Some(list) => list.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect(),
        None => crate::devnet::api_urls(Path::new(crate::devnet::DEFAULT_DIR)),
    };
    if nodes.is_empty() {
        nodes.push(crate::default_node(None)?);
    }
    Ok(TenantClient::new(&nodes, identity(t)?))
}

/// The tenant's bucket `name`, or an error saying there is none.
async fn bucket_named(c: &TenantClient, name: &str) -> Result<BucketRecord> {
    c.bucket(name).await?.ok_or_else(|| anyhow!("no bucket {name:?} (see `archipel bucket ls`)"))
}

/// The object at `bucket/key`, or an error saying there is none.
async fn object_at(c: &TenantClient, bucket: &str, key: &str) -> Result<ObjectView> {
    c.object(bucket, key).await?.ok_or_else(|| anyhow!("no object {bucket}/{key} (see `archipel ls {bucket}`)"))
}

/// Runs `archipel bucket …`.
pub async fn bucket(cmd: BucketCommand) -> Result<()> {
    match cmd {
        BucketCommand::Create {
            name,
            code,
            regions,
            countries,
            deny_jurisdictions,
            min_regions,
            min_operators,
            tenant,
        } => {
            let policy = PlacementPolicy {
                code,
                regions: regions.into_iter().collect(),
                countries: countries.into_iter().collect(),
                deny_jurisdictions: deny_jurisdictions.into_iter().collect(),
                min_regions,
                min_operators,
            };
            policy.validate()?;
            let r =
                client(&tenant)?.submit(Payload::CreateBucket { name: name.clone(), policy: policy.clone() }).await?;
            if tenant.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"bucket": name, "policy": policy, "tx": r.hash, "height": r.height})
                    )?
                );
            } else {
                println!(
                    "bucket {name} created — code {}, {} — final in block {}",
                    policy.code,
                    policy.describe_fence(),
                    r.height
                );
            }
        }
        BucketCommand::Ls(tenant) => {
            let list = client(&tenant)?.buckets().await?;
            if tenant.json {
                println!("{}", serde_json::to_string_pretty(&list.buckets)?);
            } else if list.buckets.is_empty() {
                println!("no buckets yet: `archipel bucket create NAME`");
            } else {
                let mut t = comfy_table::Table::new();
                t.load_preset(comfy_table::presets::NOTHING);
                t.set_header(["NAME", "CODE", "PLACEMENT", "OBJECTS", "BYTES", "OWNER"]);
                for b in &list.buckets {
                    t.add_row([
                        b.name.clone(),
                        b.policy.code.to_string(),
                        b.policy.describe_fence(),
                        b.objects.to_string(),
                        human(b.bytes),
                        b.owner.short(),
                    ]);
                }
                println!("{t}");
            }
        }
        BucketCommand::Show { name, tenant } => {
            let b = bucket_named(&client(&tenant)?, &name).await?;
            if tenant.json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!("bucket     {}", b.name);
                println!("owner      {}", b.owner);
                println!("code       {}", b.policy.code);
                println!("placement  {}", b.policy.describe_fence());
                println!(
                    "spread     at least {} regions and {} operators per object",
                    b.policy.min_regions, b.policy.min_operators
                );
                println!("objects    {} ({})", b.objects, human(b.bytes));
                println!("created    block {}", b.created_height);
            }
        }
        BucketCommand::Rm { name, tenant } => {
            let r = client(&tenant)?.submit(Payload::DeleteBucket { name: name.clone() }).await?;
            println!("bucket {name} deleted — final in block {}", r.height);
        }
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    archipel_types::ByteSize(bytes).to_string()
}

/// A progress bar over `len` bytes on a terminal (hidden for `--json` or a pipe); its message
/// names what is being moved.
pub fn progress(len: u64, json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// `archipel put FILE BUCKET/KEY`, or `archipel put DIR BUCKET/PREFIX --recursive`.
#[derive(Args, Debug)]
pub struct PutArgs {
    /// The file to upload (a directory with --recursive).
    file: PathBuf,
    /// Where: BUCKET/KEY (BUCKET or BUCKET/PREFIX with --recursive).
    path: String,
    /// Put every file under the directory FILE, each at PREFIX/its path.
    #[arg(long, short = 'r')]
    recursive: bool,
    /// With --recursive: PUTs under way at once (small files then go together, one transaction
    /// for many).
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    #[command(flatten)]
    tenant: Tenant,
}

/// The bucket named `bucket`, which must be the client's own.
async fn owned_bucket(c: &TenantClient, bucket: &str) -> Result<BucketRecord> {
    let record = bucket_named(c, bucket).await?;
    if record.owner != c.me() {
        bail!(
            "bucket {bucket:?} belongs to {}, not to your key {}: only its owner writes into it (pass --key)",
            record.owner.short(),
            c.me().short()
        );
    }
    Ok(record)
}

/// Runs `archipel put`.
pub async fn put(args: PutArgs) -> Result<()> {
    if args.file.is_dir() {
        if !args.recursive {
            bail!("{} is a directory: pass --recursive to put every file under it", args.file.display());
        }
        let (bucket, prefix) = args.path.split_once('/').unwrap_or((args.path.as_str(), ""));
        if bucket.is_empty() {
            bail!("{:?} is not BUCKET or BUCKET/PREFIX (e.g. eu-docs/reports)", args.path);
        }
        let c = client(&args.tenant)?;
        let record = owned_bucket(&c, bucket).await?;
        return crate::put_tree::put_tree(&c, &record, &args.file, prefix, args.parallel, args.tenant.json).await;
    }
    let (bucket, key) = split_path(&args.path)?;
    archipel_ledger::storage::check_object_key(&key).map_err(|e| anyhow!(e))?;
    let c = client(&args.tenant)?;
    let size = std::fs::metadata(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?.len();
    let bucket_record = owned_bucket(&c, &bucket).await?;
    let bar = progress(size, args.tenant.json);
    let started = std::time::Instant::now();
    let stored = c
        .put(
            &bucket_record,
            NewObject { key: key.clone(), size, ..Default::default() },
            FileSource(args.file.clone()),
            |n| bar.set_position(n),
            |w| bar.suspend(|| eprintln!("warning: {w}")),
        )
        .await;
    bar.finish_and_clear();
    let stored = stored?;
    let (put, r) = (&stored.put, &stored.tx);
    let secs = started.elapsed().as_secs_f64();
    if args.tenant.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "bucket": bucket, "key": key, "version": put.version, "size": size, "etag": put.etag,
                "holders": put.holders.iter().map(|h| h.node).collect::<Vec<_>>(),
                "tx": r.hash, "height": r.height, "seconds": secs,
            }))?
        );
    } else {
        println!(
            "{bucket}/{key}: {} stored on {} nodes in {secs:.1} s ({}/s) — final in block {}",
            human(size),
            put.holders.len(),
            human((size as f64 / secs.max(1e-3)) as u64),
            r.height
        );
    }
    Ok(())
}

/// `archipel get BUCKET/KEY FILE`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// What: BUCKET/KEY.
    path: String,
    /// Where to write it (`-`: standard output). Refuses to overwrite unless --force.
    file: PathBuf,
    /// Only bytes FROM-TO (inclusive, as HTTP ranges: `0-1023`).
    #[arg(long)]
    range: Option<String>,
    /// Overwrite FILE if it exists.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    tenant: Tenant,
}

fn parse_range(text: &str, size: u64) -> Result<std::ops::Range<u64>> {
    let (a, b) = text.split_once('-').ok_or_else(|| anyhow!("--range {text:?}: use FROM-TO, e.g. 0-1023"))?;
    let from: u64 = a.trim().parse().map_err(|_| anyhow!("--range {text:?}: FROM is not a number"))?;
    let to: u64 = if b.trim().is_empty() {
        size.saturating_sub(1)
    } else {
        b.trim().parse().map_err(|_| anyhow!("--range {text:?}: TO is not a number"))?
    };
    if from > to || from >= size {
        bail!("--range {text:?} is outside the object's {size} bytes");
    }
    Ok(from..to.saturating_add(1).min(size))
}

/// Runs `archipel get`.
pub async fn get(args: GetArgs) -> Result<()> {
    let (bucket, key) = split_path(&args.path)?;
    let c = client(&args.tenant)?;
    let view = object_at(&c, &bucket, &key).await?;
    let range = args.range.as_deref().map(|r| parse_range(r, view.object.size)).transpose()?;
    let len = range.as_ref().map_or(view.object.size, |r| r.end - r.start);
    let to_stdout = args.file == Path::new("-");
    let tmp = args.file.with_extension("archipel-partial");
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if to_stdout {
        Box::new(tokio::io::stdout())
    } else {
        if args.file.exists() && !args.force {
            bail!("{} exists: pass --force to overwrite it", args.file.display());
        }
        Box::new(tokio::io::BufWriter::with_capacity(
            1 << 20,
            tokio::fs::File::create(&tmp).await.with_context(|| format!("cannot create {}", tmp.display()))?,
        ))
    };
    let bar = progress(len, args.tenant.json || to_stdout);
    let result: Result<_> = async {
        let bad = c.get_into(&view, range, &mut out, |n| bar.set_position(n)).await?;
        out.shutdown().await.with_context(|| format!("writing {}", args.file.display()))?;
        Ok(bad)
    }
    .await;
    bar.finish_and_clear();
    let bad = match result {
        Ok(bad) => bad,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if !to_stdout {
        std::fs::rename(&tmp, &args.file)
            .with_context(|| format!("cannot move the download to {}", args.file.display()))?;
    }
    for node in &bad {
        eprintln!(
            "warning: holder {} served a shard that failed its hash check; the object was rebuilt from the others",
            node.short()
        );
    }
    if args.tenant.json && !to_stdout {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"bucket": bucket, "key": key, "bytes": len, "file": args.file, "bad_holders": bad})
            )?
        );
    } else if !to_stdout {
        println!("{bucket}/{key}: {} written to {}", human(len), args.file.display());
    }
    Ok(())
}

/// `archipel ls BUCKET[/PREFIX]`.
#[derive(Args, Debug)]
pub struct LsArgs {
    /// BUCKET or BUCKET/PREFIX.
    path: String,
    /// Group keys by this delimiter (`/` shows one "directory" level).
    #[arg(long)]
    delimiter: Option<String>,
    #[command(flatten)]
    tenant: Tenant,
}

/// Runs `archipel ls`.
pub async fn ls(args: LsArgs) -> Result<()> {
    let (bucket, prefix) = match args.path.split_once('/') {
        Some((b, p)) => (b.to_string(), p.to_string()),
        None => (args.path.clone(), String::new()),
    };
    let c = client(&args.tenant)?;
    let mut after: Option<String> = None;
    let mut all =
        ObjectList { height: 0, objects: vec![], common_prefixes: vec![], truncated: false, next_start_after: None };
    loop {
        let page = c.list(&bucket, &prefix, args.delimiter.as_deref(), after.as_deref(), 1000).await?;
        all.height = page.height;
        all.objects.extend(page.objects);
        all.common_prefixes.extend(page.common_prefixes);
        if !page.truncated {
            break;
        }
        after = page.next_start_after;
    }
    if args.tenant.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for p in &all.common_prefixes {
        println!("{:>12}  {:<20}  {p}", "DIR", "");
    }
    for o in &all.objects {
        println!("{:>12}  block {:<14}  {}", human(o.size), o.created_height, o.key);
    }
    if all.objects.is_empty() && all.common_prefixes.is_empty() {
        println!("(no objects{})", if prefix.is_empty() { String::new() } else { format!(" under {prefix:?}") });
    }
    Ok(())
}

/// `archipel rm BUCKET/KEY`.
#[derive(Args, Debug)]
pub struct RmArgs {
    /// BUCKET/KEY.
    path: String,
    #[command(flatten)]
    tenant: Tenant,
}

/// Runs `archipel rm`.
pub async fn rm(args: RmArgs) -> Result<()> {
    let (bucket, key) = split_path(&args.path)?;
    let r = client(&args.tenant)?.submit(Payload::DeleteObject { bucket: bucket.clone(), key: key.clone() }).await?;
    println!("{bucket}/{key} deleted — final in block {}; its holders delete the shards", r.height);
    Ok(())
}

fn o_version_hex(view: &ObjectView) -> String {
    view.object.version.to_string()
}

/// Runs `archipel health`: per bucket, objects, degraded segments, the repair queue and how
/// many more holder losses every object survives.
pub async fn health(tenant: Tenant) -> Result<()> {
    let h: archipel_node::storage_api::StorageHealth = client(&tenant)?.get("/v1/storage/health").await?;
    if tenant.json {
        println!("{}", serde_json::to_string_pretty(&h)?);
        return Ok(());
    }
    if h.buckets.is_empty() {
        println!("no buckets yet: `archipel bucket create NAME`");
        return Ok(());
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header([
        "BUCKET",
        "CODE",
        "OBJECTS",
        "SEGMENTS",
        "DEGRADED SEGMENTS",
        "REPAIR QUEUE",
        "UNREADABLE",
        "DURABILITY",
    ]);
    for b in &h.buckets {
        let durability = match b.tolerates_losses {
            n if n < 0 => "unreadable now: too many holders down".to_string(),
            0 => "at risk: one more loss makes objects unreadable".to_string(),
            n => format!("survives {n} more holder losses"),
        };
        t.add_row([
            b.bucket.clone(),
            b.code.clone(),
            b.objects.to_string(),
            b.segments.to_string(),
            b.degraded_segments.to_string(),
            b.repair_queue.to_string(),
            b.unavailable_objects.to_string(),
            durability,
        ]);
    }
    println!("{t}");
    println!("(finalized block {}; repairs start once a holder has been down for the repair grace)", h.height);
    Ok(())
}

/// `archipel stat BUCKET/KEY`.
#[derive(Args, Debug)]
pub struct StatArgs {
    /// BUCKET/KEY.
    path: String,
    /// The genesis file of the network you trust, to check the placement proof (default: the
    /// local devnet's).
    #[arg(long)]
    genesis: Option<PathBuf>,
    #[command(flatten)]
    tenant: Tenant,
}

/// Runs `archipel stat`: the object, every holder with where it is and who runs it, and the
/// placement's inclusion proof checked against a finalized block.
pub async fn stat(args: StatArgs) -> Result<()> {
    let (bucket, key) = split_path(&args.path)?;
    let c = client(&args.tenant)?;
    let view = object_at(&c, &bucket, &key).await?;
    let state_key = archipel_ledger::StateKey::Object(archipel_ledger::storage::object_id(&bucket, &key));
    let proof: archipel_node::ledger_api::Proof<archipel_ledger::StateProof> =
        c.get(&format!("/v1/proof/state/{state_key}")).await?;
    let genesis_path =
        args.genesis.clone().unwrap_or_else(|| Path::new(crate::devnet::DEFAULT_DIR).join("genesis.json"));
    let genesis = archipel_node::genesis::Genesis::load(&genesis_path).with_context(|| {
        format!(
            "the placement proof is checked against a genesis you trust: pass --genesis FILE ({} is not there)",
            genesis_path.display()
        )
    })?;
    let report =
        archipel_node::ledger_verify::verify_proof(&genesis, &archipel_node::ledger_api::AnyProof::State(proof))
            .map_err(|e| anyhow!("the placement proof does not verify: {e}"))?;
    if !report.shows.contains(&o_version_hex(&view)) {
        bail!("the proof shows another version of {bucket}/{key} than the node described: ask another node");
    }
    let proven = report.height;
    let o = &view.object;
    if args.tenant.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"object": o, "holders": view.holders, "proven_in_block": proven})
            )?
        );
        return Ok(());
    }
    println!("object     {bucket}/{key}");
    println!(
        "size       {} ({} bytes), {} segments of {}",
        human(o.size),
        o.size,
        o.segments(),
        human(o.segment_bytes)
    );
    println!("version    {}", o.version);
    println!("etag       {}", o.etag);
    println!("code       {} — {} per holder", o.code, human(o.shard_bytes));
    println!("stored     block {}", o.created_height);
    println!("holders:");
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(["SHARD", "NODE", "NAME", "REGION", "COUNTRY", "OPERATOR", "JURISDICTION", "LEASE"]);
    for (i, (node, h)) in o.holders.iter().zip(&view.holders).enumerate() {
        match h {
            Some(n) => t.add_row([
                i.to_string(),
                node.short(),
                n.name.clone(),
                n.region.clone(),
                n.country.clone(),
                n.operator.clone(),
                n.jurisdiction.clone(),
                format!("{:?}", n.lease).to_lowercase(),
            ]),
            None => t.add_row([
                i.to_string(),
                node.short(),
                "(left the network)".into(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]),
        };
    }
    println!("{t}");
    println!("placement proven: the ledger's state root of finalized block {proven} commits to these holders");
    Ok(())
}
