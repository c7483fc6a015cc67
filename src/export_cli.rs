//! `archipel export` and `archipel import`: a bucket's objects, decrypted, with their metadata, to
//! a plain directory and back into any archipel network — no lock-in.
//!
//! An export directory holds each object as an ordinary file at its key (keys that are not safe
//! as paths — `..` or empty segments, a leading `/` — go under `_keys/` by the hex of the key) and
//! `archipel-export.json`: the bucket's policy and, per object, its key, file, size, ETag, user
//! metadata and content headers, and when it was stored. Both commands are **resumable**: export
//! skips objects whose file is already there with the recorded size and ETag, import skips objects
//! the target bucket already holds with the same size and ETag (imported objects keep their
//! ETags). Both show a progress bar over the bytes.
//!
//! `archipel export --to s3://bucket/prefix` writes to another S3 endpoint instead (the standard
//! `AWS_*` variables or `--endpoint-url` name it and its credentials; the bucket is created when
//! missing): each object at `prefix` + its key (`_keys/<hex>` for keys a path-style URL cannot
//! carry), with its content headers and user metadata, plus `x-amz-meta-archipel-etag` (its ETag
//! here, which an object sent in parts does not keep there) and `x-amz-meta-archipel-created-ms`.
//! Objects up to [`PART_BYTES`] go in one PUT, larger ones as multipart uploads, one part in
//! memory at a time; every body is sent with its MD5 and SHA-256. Resumable the same way: an
//! object already there with the same size and `archipel-etag` is skipped.

use crate::storage_cli::{Tenant, client};
use anyhow::{Context as _, Result, anyhow, bail};
use archipel_gateway::client::{ClientError, S3Client};
use archipel_ledger::Payload;
use archipel_ledger::storage::BucketRecord;
use archipel_objects::meta::ObjectMeta;
use archipel_objects::tenant::{FileSource, NewObject, PutSource, TenantClient};
use archipel_types::PlacementPolicy;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The index file of an export.
pub const INDEX: &str = "archipel-export.json";

/// Objects up to this size go to an S3 target in one PUT; larger ones in parts of this size
/// (larger when the object would take more than [`MAX_PARTS`]).
pub const PART_BYTES: u64 = 16 << 20;

/// Most parts of one multipart upload (S3's limit).
const MAX_PARTS: u64 = 10_000;

/// The user metadata naming an object's ETag here, at an S3 target.
const ETAG_META: &str = "archipel-etag";

/// The user metadata naming when an object was stored here, at an S3 target.
const CREATED_META: &str = "archipel-created-ms";

/// An export's index.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ExportIndex {
    /// The bucket exported.
    pub bucket: String,
    /// Its placement policy.
    pub policy: Option<PlacementPolicy>,
    /// The objects, by key.
    pub objects: Vec<ExportedObject>,
}

/// One exported object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportedObject {
    /// Its key.
    pub key: String,
    /// Its file, relative to the export directory.
    pub file: String,
    /// Bytes.
    pub size: u64,
    /// Its ETag.
    pub etag: String,
    /// Metadata and content headers.
    #[serde(default)]
    pub meta: ObjectMeta,
    /// When it was stored (Unix ms).
    pub created_ms: u64,
}

/// `archipel export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The bucket.
    #[arg(long)]
    bucket: String,
    /// Only keys under this prefix.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Where to: a directory (created if missing), or `s3://bucket[/prefix]` at another S3
    /// endpoint. An interrupted export resumes.
    #[arg(long)]
    to: String,
    /// With `--to s3://…`: the endpoint (default: `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`;
    /// credentials from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, region from `AWS_REGION`).
    #[arg(long)]
    endpoint_url: Option<String>,
    #[command(flatten)]
    tenant: Tenant,
}

/// `archipel import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// An export directory, or `s3://bucket[/prefix]` at an S3 endpoint (what `archipel export
    /// --to s3://…` wrote there, or any objects).
    #[arg(long)]
    from: String,
    /// With `--from s3://…`: the endpoint (default: `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`;
    /// credentials from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, region from `AWS_REGION`).
    #[arg(long)]
    endpoint_url: Option<String>,
    /// The bucket to fill (default: the exported bucket's name; from S3, the source bucket's).
    /// Created when missing with the exported policy (from S3: 4+2 anywhere), unless
    /// --policy-anywhere.
    #[arg(long)]
    bucket: Option<String>,
    /// Create a missing bucket as 4+2 anywhere instead of with the exported policy.
    #[arg(long)]
    policy_anywhere: bool,
    #[command(flatten)]
    tenant: Tenant,
}

/// Where `key` is written: itself when it is a safe relative path, else under `_keys/`.
pub fn file_for(key: &str) -> String {
    let safe = !key.is_empty()
        && !key.starts_with('/')
        && !key.starts_with("_keys/")
        && key != INDEX
        && !key.contains('\0')
        && !key.contains('\\')
        && key.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if safe { key.to_string() } else { format!("_keys/{}", hex::encode(key.as_bytes())) }
}

/// [`file_for`], or `_keys/` when that path collides with another key's file or directory (keys
/// `a` and `a/b` both exist).
fn place(dir: &Path, key: &str) -> String {
    let file = file_for(key);
    let path = dir.join(&file);
    let ancestor_is_file = path.ancestors().skip(1).take_while(|p| *p != dir).any(Path::is_file);
    if path.is_dir() || ancestor_is_file { format!("_keys/{}", hex::encode(key.as_bytes())) } else { file }
}

fn read_index(dir: &Path) -> Result<Option<ExportIndex>> {
    match std::fs::read(dir.join(INDEX)) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not an export index", dir.join(INDEX).display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.join(INDEX).display())),
    }
}

fn write_index(dir: &Path, index: &ExportIndex) -> Result<()> {
    let tmp = dir.join(format!("{INDEX}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(index)?)?;
    std::fs::rename(&tmp, dir.join(INDEX))?;
    Ok(())
}

async fn all_objects(
    c: &TenantClient,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<archipel_ledger::storage::ObjectRecord>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = c.list(bucket, prefix, None, after.as_deref(), 1000).await?;
        out.extend(page.objects);
        if !page.truncated {
            return Ok(out);
        }
        after = page.next_start_after;
    }
}

/// Where `s3://bucket[/prefix]` points: the bucket and the prefix (ending in `/` unless empty).
pub fn parse_s3_target(to: &str) -> Result<(String, String)> {
    let rest = to.strip_prefix("s3://").ok_or_else(|| anyhow!("{to:?} is not an s3://bucket[/prefix] URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.len() < 3
        || bucket.len() > 63
        || !bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        bail!("{bucket:?} is not an S3 bucket name (3–63 of a-z, 0-9, `-`, `.`): write s3://bucket[/prefix]");
    }
    let prefix = prefix.trim_end_matches('/');
    if prefix.split('/').any(|seg| seg == "." || seg == "..") || prefix.starts_with('/') {
        bail!("the prefix {prefix:?} has an empty, `.` or `..` segment, which an S3 URL cannot carry");
    }
    Ok((bucket.to_string(), if prefix.is_empty() { String::new() } else { format!("{prefix}/") }))
}

/// The key an object gets at an S3 target: `prefix` + its key, or `prefix` + `_keys/<hex>` when a
/// path-style URL cannot carry the key (a `.` or `..` segment) or it would collide with those.
pub fn s3_key_for(prefix: &str, key: &str) -> String {
    let carried = !key.is_empty() && !key.starts_with("_keys/") && !key.split('/').any(|seg| seg == "." || seg == "..");
    if carried { format!("{prefix}{key}") } else { format!("{prefix}_keys/{}", hex::encode(key.as_bytes())) }
}

/// The headers that carry an object's metadata to an S3 target.
fn s3_headers(meta: &ObjectMeta, etag: &str, created_ms: u64) -> Vec<(String, String)> {
    let mut h = Vec::new();
    let content = [
        ("content-type", &meta.content_type),
        ("content-encoding", &meta.content_encoding),
        ("content-disposition", &meta.content_disposition),
        ("content-language", &meta.content_language),
        ("cache-control", &meta.cache_control),
    ];
    for (name, value) in content {
        if let Some(v) = value {
            h.push((name.to_string(), v.clone()));
        }
    }
    for (name, value) in &meta.user {
        if name != ETAG_META && name != CREATED_META {
            h.push((format!("x-amz-meta-{name}"), value.clone()));
        }
    }
    h.push((format!("x-amz-meta-{ETAG_META}"), etag.to_string()));
    h.push((format!("x-amz-meta-{CREATED_META}"), created_ms.to_string()));
    h
}

/// Runs `archipel export`.
pub async fn export(args: ExportArgs) -> Result<()> {
    let c = client(&args.tenant)?;
    c.bucket(&args.bucket).await?.ok_or_else(|| anyhow!("no bucket {:?} (see `archipel bucket ls`)", args.bucket))?;
    if args.to.starts_with("s3://") {
        export_s3(&args, &c).await
    } else {
        if args.endpoint_url.is_some() {
            bail!("--endpoint-url is for --to s3://bucket: {} is a directory", args.to);
        }
        export_dir(&args, &c, Path::new(&args.to)).await
    }
}

/// `archipel export --to s3://…`.
async fn export_s3(args: &ExportArgs, c: &TenantClient) -> Result<()> {
    let (target, prefix) = parse_s3_target(&args.to)?;
    let s3 = S3Client::from_env(args.endpoint_url.as_deref())?;
    match s3.check_bucket(&target).await {
        Ok(()) => {}
        Err(ClientError::S3 { status: 404, .. }) => s3
            .create_bucket(&target)
            .await
            .with_context(|| format!("cannot create bucket {target} at {}", s3.endpoint()))?,
        Err(e) => return Err(e).with_context(|| format!("cannot use bucket {target} at {}", s3.endpoint())),
    }
    let records = all_objects(c, &args.bucket, &args.prefix).await?;
    let total: u64 = records.iter().map(|o| o.size).sum();
    let progress = crate::storage_cli::progress(total, args.tenant.json);
    let (mut written, mut skipped, mut done) = (0u64, 0u64, 0u64);
    let mut failed: Vec<String> = Vec::new();
    for rec in records {
        let key = s3_key_for(&prefix, &rec.key);
        let size = rec.size;
        match export_one(args, c, &s3, &target, &key, rec, &progress, done).await {
            Ok(true) => written += 1,
            Ok(false) => skipped += 1,
            // The target refused this object (its metadata, its size…): the others still go.
            Err(e) => {
                progress.suspend(|| eprintln!("warning: {e:#}"));
                failed.push(key);
            }
        }
        done += size;
        progress.set_position(done);
    }
    progress.finish_and_clear();
    if !failed.is_empty() {
        bail!(
            "{} of the bucket's objects were not exported ({}{}); the others were — run the export again after fixing what the warnings name",
            failed.len(),
            failed.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if failed.len() > 5 { ", …" } else { "" }
        );
    }
    if args.tenant.json {
        println!(
            "{}",
            serde_json::json!({"bucket": args.bucket, "to": args.to, "endpoint": s3.endpoint(), "written": written, "skipped": skipped, "bytes": total})
        );
    } else {
        println!(
            "{}: {written} objects written, {skipped} already there, {} in all, to {} at {}",
            args.bucket,
            archipel_types::ByteSize(total),
            args.to,
            s3.endpoint()
        );
    }
    Ok(())
}

/// Exports one object to `target/key` unless it is there already; `Ok(false)` when it was.
#[allow(clippy::too_many_arguments)] // the export's parts, the object and the progress
async fn export_one(
    args: &ExportArgs,
    c: &TenantClient,
    s3: &S3Client,
    target: &str,
    key: &str,
    rec: archipel_ledger::storage::ObjectRecord,
    progress: &indicatif::ProgressBar,
    done: u64,
) -> Result<bool> {
    let (target, key) = (target.to_string(), key.to_string());
    let there = s3.head_object(&target, &key).await?;
    if there.is_some_and(|h| h.size == rec.size && h.user.get(ETAG_META) == Some(&rec.etag)) {
        return Ok(false);
    }
    progress.set_message(rec.key.clone());
    // Read from the ledger again: the record listed may have been replaced since.
    let Some(view) = c.object(&args.bucket, &rec.key).await? else { return Ok(false) };
    let opened = c.open(&view).await?;
    let o = &view.object;
    let headers = s3_headers(&opened.meta, &o.etag, o.created_ms);
    if o.size <= PART_BYTES {
        let mut body = Vec::with_capacity(o.size as usize);
        c.read(&view, &opened, None, &mut body, |n| progress.set_position(done + n)).await?;
        s3.put_object(&target, &key, &headers, body.into()).await.with_context(|| format!("exporting {}", o.key))?;
        return Ok(true);
    }
    let part = PART_BYTES.max(o.size.div_ceil(MAX_PARTS));
    let upload = s3.create_multipart(&target, &key, &headers).await.with_context(|| format!("exporting {}", o.key))?;
    let sent = async {
        let mut parts = Vec::new();
        let mut start = 0;
        while start < o.size {
            let end = (start + part).min(o.size);
            let mut body = Vec::with_capacity((end - start) as usize);
            c.read(&view, &opened, Some(start..end), &mut body, |n| progress.set_position(done + start + n)).await?;
            let number = parts.len() as u32 + 1;
            parts.push((number, s3.upload_part(&target, &key, &upload, number, body.into()).await?));
            start = end;
        }
        s3.complete_multipart(&target, &key, &upload, &parts).await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = sent {
        // Free the parts sent; the object is sent whole again on the next run.
        let _ = s3.abort_multipart(&target, &key, &upload).await;
        return Err(e).with_context(|| format!("exporting {}", o.key));
    }
    Ok(true)
}

/// `archipel export --to DIR`.
async fn export_dir(args: &ExportArgs, c: &TenantClient, to: &Path) -> Result<()> {
    let bucket = c
        .bucket(&args.bucket)
        .await?
        .ok_or_else(|| anyhow!("no bucket {:?} (see `archipel bucket ls`)", args.bucket))?;
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    let mut index = read_index(to)?.unwrap_or_default();
    if !index.bucket.is_empty() && index.bucket != args.bucket {
        bail!("{} holds an export of bucket {:?}: export {:?} elsewhere", to.display(), index.bucket, args.bucket);
    }
    index.bucket = args.bucket.clone();
    index.policy = Some(bucket.policy.clone());
    let records = all_objects(c, &args.bucket, &args.prefix).await?;
    let total: u64 = records.iter().map(|o| o.size).sum();
    let progress = crate::storage_cli::progress(total, args.tenant.json);
    let (mut written, mut skipped, mut done) = (0u64, 0u64, 0u64);
    for rec in records {
        let file = place(to, &rec.key);
        let path = to.join(&file);
        let have = index.objects.iter().any(|o| o.key == rec.key && o.etag == rec.etag && o.size == rec.size)
            && std::fs::metadata(&path).is_ok_and(|m| m.len() == rec.size);
        if have {
            skipped += 1;
            done += rec.size;
            progress.set_position(done);
            continue;
        }
        progress.set_message(rec.key.clone());
        // Read from the ledger again: the record listed may have been replaced since.
        let Some(view) = c.object(&args.bucket, &rec.key).await? else { continue };
        let opened = c.open(&view).await?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let tmp = path.with_extension("archipel-partial");
        let mut out = tokio::io::BufWriter::with_capacity(
            1 << 20,
            tokio::fs::File::create(&tmp).await.with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        let base = done;
        c.read(&view, &opened, None, &mut out, |n| progress.set_position(base + n)).await?;
        tokio::io::AsyncWriteExt::flush(&mut out).await?;
        out.into_inner().sync_all().await?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        let o = &view.object;
        index.objects.retain(|e| e.key != o.key);
        index.objects.push(ExportedObject {
            key: o.key.clone(),
            file,
            size: o.size,
            etag: o.etag.clone(),
            meta: opened.meta.clone(),
            created_ms: o.created_ms,
        });
        // After every object: an interrupted export resumes after it.
        write_index(to, &index)?;
        written += 1;
        done += o.size;
    }
    index.objects.sort_by(|a, b| a.key.cmp(&b.key));
    write_index(to, &index)?;
    progress.finish_and_clear();
    if args.tenant.json {
        println!(
            "{}",
            serde_json::json!({"bucket": args.bucket, "to": to, "written": written, "skipped": skipped, "bytes": total})
        );
    } else {
        println!(
            "{}: {written} objects written, {skipped} already there, {} in all, to {}",
            args.bucket,
            archipel_types::ByteSize(total),
            to.display()
        );
    }
    Ok(())
}

/// The bucket an import fills: `name` when this tenant has it, else created with `policy`
/// (4+2 anywhere when `None`).
async fn import_bucket(c: &TenantClient, name: &str, policy: Option<PlacementPolicy>) -> Result<BucketRecord> {
    match c.bucket(name).await? {
        Some(b) if b.owner != c.me() => bail!("bucket {name:?} belongs to another tenant: pass --bucket"),
        Some(b) => Ok(b),
        None => {
            let policy = policy.unwrap_or_else(|| PlacementPolicy::anywhere(archipel_types::ErasureCode::DEFAULT));
            c.submit(Payload::CreateBucket { name: name.to_string(), policy }).await.with_context(|| {
                format!("cannot create bucket {name:?} (pass --policy-anywhere if the exported policy cannot be placed here)")
            })?;
            c.bucket(name).await?.ok_or_else(|| anyhow!("bucket {name:?} was created but cannot be read back"))
        }
    }
}

/// What an import stores of an object whose ETag there was `etag`: a single-part ETag (32 hex
/// digits, the content's MD5) is checked against the bytes read, so an edited or damaged copy is
/// refused rather than stored under its old ETag; a multipart ETag is kept as it was; any other
/// (an S3 service's own, not an MD5) is replaced by the content's MD5.
fn new_object(key: &str, size: u64, etag: &str, meta: ObjectMeta) -> NewObject {
    let md5 = etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit());
    let multipart = etag.split_once('-').is_some_and(|(h, n)| h.len() == 32 && n.parse::<u32>().is_ok());
    NewObject {
        key: key.to_string(),
        size,
        etag: multipart.then(|| etag.to_string()),
        meta,
        content_md5: md5.then(|| etag.to_ascii_lowercase()),
    }
}

/// Runs `archipel import`.
pub async fn import(args: ImportArgs) -> Result<()> {
    if args.from.starts_with("s3://") {
        import_s3(&args).await
    } else {
        if args.endpoint_url.is_some() {
            bail!("--endpoint-url is for --from s3://bucket: {} is a directory", args.from);
        }
        import_dir(&args, Path::new(&args.from)).await
    }
}

/// The key an object at an S3 target had here: [`s3_key_for`] undone.
fn key_from_s3(prefix: &str, s3_key: &str) -> Result<String> {
    let rest = s3_key.strip_prefix(prefix).unwrap_or(s3_key);
    // Under `_keys/`, the hex of a key an export put there; anything else there is a key of its
    // own (objects archipel did not write).
    Ok(rest
        .strip_prefix("_keys/")
        .and_then(|hex| hex::decode(hex).ok())
        .and_then(|k| String::from_utf8(k).ok())
        .unwrap_or_else(|| rest.to_string()))
}

/// An object at an S3 endpoint, read again from the start for each attempt: the version a HEAD
/// saw (`If-Match` its ETag, its size), never one replaced since.
struct S3Source {
    s3: S3Client,
    bucket: String,
    key: String,
    etag: String,
    size: u64,
}

impl PutSource for S3Source {
    async fn open(&mut self) -> std::io::Result<Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>> {
        let expect = Some((self.etag.as_str(), self.size));
        let reader = self.s3.get_reader(&self.bucket, &self.key, expect).await.map_err(std::io::Error::other)?;
        Ok(Some(Box::new(reader)))
    }
}

/// `archipel import --from s3://…`.
async fn import_s3(args: &ImportArgs) -> Result<()> {
    let (source, prefix) = parse_s3_target(&args.from)?;
    let s3 = S3Client::from_env(args.endpoint_url.as_deref())?;
    let mut listed = Vec::new();
    let mut token = None;
    loop {
        let page = s3
            .list_page(&source, &prefix, token.as_deref())
            .await
            .with_context(|| format!("cannot list {} at {}", args.from, s3.endpoint()))?;
        listed.extend(page.objects);
        match page.next {
            // A server answering the same page again would keep the import here for ever.
            Some(next) if token.as_ref() == Some(&next) => {
                bail!("{} at {} answered the continuation token {next:?} twice", args.from, s3.endpoint())
            }
            Some(next) => token = Some(next),
            None => break,
        }
    }
    let c = client(&args.tenant)?;
    let name = args.bucket.clone().unwrap_or_else(|| source.clone());
    let bucket = import_bucket(&c, &name, None).await?;
    let total: u64 = listed.iter().map(|(_, size)| size).sum();
    let progress = crate::storage_cli::progress(total, args.tenant.json);
    let (mut put, mut skipped, mut done) = (0u64, 0u64, 0u64);
    for (s3_key, size) in listed {
        let key = key_from_s3(&prefix, &s3_key)?;
        if key.is_empty() {
            // The prefix itself (a "folder" marker some tools write): no key to store it under.
            progress.suspend(|| eprintln!("warning: {s3_key:?} has no key after the prefix: skipped"));
            done += size;
            continue;
        }
        let head = s3
            .head_object(&source, &s3_key)
            .await?
            .ok_or_else(|| anyhow!("{s3_key} was listed at {} but is gone: run the import again", s3.endpoint()))?;
        // An archipel export's ETag travels in its metadata; another object's ETag is kept as it
        // is when the ledger can record it (hex digits and dashes), so that a run again finds
        // the object here, not checked against the bytes (not every service's ETag is an MD5).
        let ours = head.user.get(ETAG_META).cloned();
        let etag = ours.clone().unwrap_or_else(|| head.etag.clone());
        if c.object(&name, &key)
            .await?
            .is_some_and(|v| v.object.etag.eq_ignore_ascii_case(&etag) && v.object.size == head.size)
        {
            skipped += 1;
            done += size;
            progress.set_position(done);
            continue;
        }
        progress.set_message(key.clone());
        let content = |h: &str| head.content.get(h).cloned();
        let meta = ObjectMeta {
            content_type: content("content-type"),
            content_encoding: content("content-encoding"),
            content_disposition: content("content-disposition"),
            content_language: content("content-language"),
            cache_control: content("cache-control"),
            user: head
                .user
                .iter()
                .filter(|(k, _)| *k != ETAG_META && *k != CREATED_META)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let source_of = S3Source {
            s3: s3.clone(),
            bucket: source.clone(),
            key: s3_key.clone(),
            etag: head.etag.clone(),
            size: head.size,
        };
        let base = done;
        let object = match ours {
            Some(_) => new_object(&key, head.size, &etag, meta),
            None => {
                let recordable = !etag.is_empty()
                    && etag.len() <= archipel_ledger::storage::MAX_ETAG_BYTES
                    && etag.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
                NewObject {
                    key: key.clone(),
                    size: head.size,
                    etag: recordable.then(|| etag.to_ascii_lowercase()),
                    meta,
                    content_md5: None,
                }
            }
        };
        c.put(
            &bucket,
            object,
            source_of,
            |n| progress.set_position(base + n),
            |w| progress.suspend(|| eprintln!("warning: {w}")),
        )
        .await
        .with_context(|| format!("importing {s3_key} as {key}"))?;
        put += 1;
        done += size;
    }
    progress.finish_and_clear();
    if args.tenant.json {
        println!(
            "{}",
            serde_json::json!({"bucket": name, "from": args.from, "endpoint": s3.endpoint(), "imported": put, "skipped": skipped, "bytes": total})
        );
    } else {
        println!("{name}: {put} objects imported, {skipped} already there, {} in all", archipel_types::ByteSize(total));
    }
    Ok(())
}

/// `archipel import --from DIR`.
async fn import_dir(args: &ImportArgs, from: &Path) -> Result<()> {
    let index = read_index(from)?
        .ok_or_else(|| anyhow!("{} has no {INDEX}: is it an `archipel export` directory?", from.display()))?;
    // Every file checked before anything changes on the network.
    for o in &index.objects {
        let path = from.join(&o.file);
        // Only the two names export gives a key: an index cannot point outside the directory.
        if o.file != file_for(&o.key) && o.file != format!("_keys/{}", hex::encode(o.key.as_bytes())) {
            bail!("the export index names {} for key {:?}: the export is damaged", o.file, o.key);
        }
        let size =
            std::fs::metadata(&path).with_context(|| format!("{} is missing from the export", path.display()))?.len();
        if size != o.size {
            bail!("{} has {size} bytes, the export index says {}: the export is damaged", path.display(), o.size);
        }
    }
    let c = client(&args.tenant)?;
    let name = args.bucket.clone().unwrap_or_else(|| index.bucket.clone());
    let policy = if args.policy_anywhere { None } else { index.policy.clone() };
    let bucket = import_bucket(&c, &name, policy).await?;
    let total: u64 = index.objects.iter().map(|o| o.size).sum();
    let progress = crate::storage_cli::progress(total, args.tenant.json);
    let (mut put, mut skipped, mut done) = (0u64, 0u64, 0u64);
    for o in &index.objects {
        let path = from.join(&o.file);
        if c.object(&name, &o.key).await?.is_some_and(|v| v.object.etag == o.etag && v.object.size == o.size) {
            skipped += 1;
            done += o.size;
            progress.set_position(done);
            continue;
        }
        progress.set_message(o.key.clone());
        let base = done;
        c.put(
            &bucket,
            new_object(&o.key, o.size, &o.etag, o.meta.clone()),
            FileSource(path),
            |n| progress.set_position(base + n),
            |w| progress.suspend(|| eprintln!("warning: {w}")),
        )
        .await
        .with_context(|| format!("importing {}", o.key))?;
        put += 1;
        done += o.size;
    }
    progress.finish_and_clear();
    if args.tenant.json {
        println!(
            "{}",
            serde_json::json!({"bucket": name, "from": from, "imported": put, "skipped": skipped, "bytes": total})
        );
    } else {
        println!("{name}: {put} objects imported, {skipped} already there, {} in all", archipel_types::ByteSize(total));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_targets_name_a_bucket_and_a_prefix() {
        assert_eq!(parse_s3_target("s3://backup").unwrap(), ("backup".into(), String::new()));
        assert_eq!(parse_s3_target("s3://backup/2026/nov/").unwrap(), ("backup".into(), "2026/nov/".into()));
        for bad in ["s3://", "s3://UPPER", "s3://ab", "s3://b_x/p", "s3://bkt/a/../b", "s3://bkt//x", "/dir"] {
            assert!(parse_s3_target(bad).is_err(), "{bad}");
        }
        assert_eq!(s3_key_for("p/", "a/b.txt"), "p/a/b.txt");
        for k in ["x/../y", "./a", "", "_keys/z"] {
            assert_eq!(s3_key_for("p/", k), format!("p/_keys/{}", hex::encode(k)), "{k:?}");
        }
    }

    #[test]
    fn keys_come_back_from_s3_as_they_went() {
        for k in ["a/b.txt", "x/../y", "", "_keys/z", "é/ü"] {
            assert_eq!(key_from_s3("p/", &s3_key_for("p/", k)).unwrap(), k);
        }
        // Not the hex of a UTF-8 key: a key of its own.
        assert_eq!(key_from_s3("", "_keys/zz").unwrap(), "_keys/zz");
        assert_eq!(key_from_s3("", "_keys/ff").unwrap(), "_keys/ff");
    }

    #[test]
    fn imports_check_md5_etags_and_keep_multipart_ones() {
        let md5 = "0123456789abcdef0123456789ABCDEF";
        let o = new_object("k", 1, md5, ObjectMeta::default());
        assert_eq!((o.etag, o.content_md5.as_deref()), (None, Some("0123456789abcdef0123456789abcdef")));
        let o = new_object("k", 1, "0123456789abcdef0123456789abcdef-3", ObjectMeta::default());
        assert_eq!((o.etag.as_deref(), o.content_md5), (Some("0123456789abcdef0123456789abcdef-3"), None));
        for other in ["", "not-an-md5", "0123456789abcdef0123456789abcdef-x"] {
            let o = new_object("k", 1, other, ObjectMeta::default());
            assert_eq!((o.etag, o.content_md5), (None, None), "{other}");
        }
    }

    #[test]
    fn s3_headers_carry_metadata_and_the_etag_here() {
        let mut meta = ObjectMeta { content_type: Some("text/plain".into()), ..Default::default() };
        meta.user.insert("owner".into(), "ops".into());
        meta.user.insert(ETAG_META.into(), "forged".into());
        let h = s3_headers(&meta, "abc-2", 7);
        assert!(h.contains(&("content-type".into(), "text/plain".into())));
        assert!(h.contains(&("x-amz-meta-owner".into(), "ops".into())));
        assert_eq!(
            h.iter().filter(|(k, _)| k == "x-amz-meta-archipel-etag").collect::<Vec<_>>(),
            [&("x-amz-meta-archipel-etag".to_string(), "abc-2".to_string())]
        );
        assert!(h.contains(&("x-amz-meta-archipel-created-ms".into(), "7".into())));
    }

    #[test]
    fn keys_unsafe_as_paths_go_under_keys_by_hex() {
        assert_eq!(file_for("photos/2026/a.jpg"), "photos/2026/a.jpg");
        for k in ["../etc/passwd", "/abs", "a//b", "a/./b", "dir/", "", INDEX, "_keys/x", "a\\b"] {
            let f = file_for(k);
            assert!(f.starts_with("_keys/"), "{k:?} -> {f}");
            assert_eq!(hex::decode(&f[6..]).unwrap(), k.as_bytes());
        }
    }
}
