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

use crate::storage_cli::{Tenant, client};
use anyhow::{Context as _, Result, anyhow, bail};
use archipel_ledger::Payload;
use archipel_objects::meta::ObjectMeta;
use archipel_objects::tenant::{FileSource, NewObject, TenantClient};
use archipel_types::PlacementPolicy;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The index file of an export.
pub const INDEX: &str = "archipel-export.json";

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
    /// The directory to write (created if missing; an interrupted export resumes).
    #[arg(long)]
    to: PathBuf,
    #[command(flatten)]
    tenant: Tenant,
}

/// `archipel import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// An export directory.
    #[arg(long)]
    from: PathBuf,
    /// The bucket to fill (default: the exported bucket's name). Created with the exported
    /// policy when missing, unless --policy-anywhere.
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

/// Runs `archipel export`.
pub async fn export(args: ExportArgs) -> Result<()> {
    let c = client(&args.tenant)?;
    let bucket = c
        .bucket(&args.bucket)
        .await?
        .ok_or_else(|| anyhow!("no bucket {:?} (see `archipel bucket ls`)", args.bucket))?;
    std::fs::create_dir_all(&args.to).with_context(|| format!("cannot create {}", args.to.display()))?;
    let mut index = read_index(&args.to)?.unwrap_or_default();
    if !index.bucket.is_empty() && index.bucket != args.bucket {
        bail!("{} holds an export of bucket {:?}: export {:?} elsewhere", args.to.display(), index.bucket, args.bucket);
    }
    index.bucket = args.bucket.clone();
    index.policy = Some(bucket.policy.clone());
    let records = all_objects(&c, &args.bucket, &args.prefix).await?;
    let total: u64 = records.iter().map(|o| o.size).sum();
    let progress = crate::storage_cli::progress(total, args.tenant.json);
    let (mut written, mut skipped, mut done) = (0u64, 0u64, 0u64);
    for rec in records {
        let file = place(&args.to, &rec.key);
        let path = args.to.join(&file);
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
        write_index(&args.to, &index)?;
        written += 1;
        done += o.size;
    }
    index.objects.sort_by(|a, b| a.key.cmp(&b.key));
    write_index(&args.to, &index)?;
    progress.finish_and_clear();
    if args.tenant.json {
        println!(
            "{}",
            serde_json::json!({"bucket": args.bucket, "to": args.to, "written": written, "skipped": skipped, "bytes": total})
        );
    } else {
        println!(
            "{}: {written} objects written, {skipped} already there, {} in all, to {}",
            args.bucket,
            archipel_types::ByteSize(total),
            args.to.display()
        );
    }
    Ok(())
}

/// Runs `archipel import`.
pub async fn import(args: ImportArgs) -> Result<()> {
    let index = read_index(&args.from)?
        .ok_or_else(|| anyhow!("{} has no {INDEX}: is it an `archipel export` directory?", args.from.display()))?;
    // Every file checked before anything changes on the network.
    for o in &index.objects {
        let path = args.from.join(&o.file);
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
    let bucket = match c.bucket(&name).await? {
        Some(b) if b.owner != c.me() => bail!("bucket {name:?} belongs to another tenant: pass --bucket"),
        Some(b) => b,
        None => {
            let policy = match (&index.policy, args.policy_anywhere) {
                (Some(p), false) => p.clone(),
                _ => PlacementPolicy::anywhere(archipel_types::ErasureCode::DEFAULT),
            };
            c.submit(Payload::CreateBucket { name: name.clone(), policy })
                .await
                .with_context(|| format!("cannot create bucket {name:?} (pass --policy-anywhere if the exported policy cannot be placed here)"))?;
            c.bucket(&name).await?.ok_or_else(|| anyhow!("bucket {name:?} was created but cannot be read back"))?
        }
    };
    let total: u64 = index.objects.iter().map(|o| o.size).sum();
    let progress = crate::storage_cli::progress(total, args.tenant.json);
    let (mut put, mut skipped, mut done) = (0u64, 0u64, 0u64);
    for o in &index.objects {
        let path = args.from.join(&o.file);
        if c.object(&name, &o.key).await?.is_some_and(|v| v.object.etag == o.etag && v.object.size == o.size) {
            skipped += 1;
            done += o.size;
            progress.set_position(done);
            continue;
        }
        progress.set_message(o.key.clone());
        let base = done;
        // A single-part ETag is the content's MD5: checked against the bytes read (an edited
        // file is refused, not imported under its old ETag). A multipart ETag is kept as it was.
        let single = !o.etag.contains('-');
        let object = NewObject {
            key: o.key.clone(),
            size: o.size,
            etag: (!single).then(|| o.etag.clone()),
            meta: o.meta.clone(),
            content_md5: single.then(|| o.etag.clone()),
        };
        c.put(
            &bucket,
            object,
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
            serde_json::json!({"bucket": name, "from": args.from, "imported": put, "skipped": skipped, "bytes": total})
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
    fn keys_unsafe_as_paths_go_under_keys_by_hex() {
        assert_eq!(file_for("photos/2026/a.jpg"), "photos/2026/a.jpg");
        for k in ["../etc/passwd", "/abs", "a//b", "a/./b", "dir/", "", INDEX, "_keys/x", "a\\b"] {
            let f = file_for(k);
            assert!(f.starts_with("_keys/"), "{k:?} -> {f}");
            assert_eq!(hex::decode(&f[6..]).unwrap(), k.as_bytes());
        }
    }
}
