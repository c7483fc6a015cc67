//! `archipel put DIR BUCKET/PREFIX --recursive`: every file under a directory, `--parallel` PUTs
//! at once through one client, so small files go together (group commit: one seal call per
//! holder and one `PutObjects` per batch, see `archipel_objects::batch`). Keys are the prefix
//! plus each file's path under the directory, `/`-separated; symbolic links are not followed.
//! One progress bar over all bytes; a file that fails is named and the others go on; the exit
//! status is non-zero if any failed.

use anyhow::{Context, Result, bail};
use archipel_objects::tenant::{FileSource, NewObject, TenantClient};
use archipel_types::ByteSize;
use futures::StreamExt as _;
use std::path::{Path, PathBuf};

/// Most PUTs `--parallel` allows at once.
pub const MAX_PARALLEL: usize = 256;

/// Every regular file under `root` (symbolic links skipped), sorted by path, with its size.
pub fn files_under(root: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let kind = entry.file_type().with_context(|| format!("cannot read {}", entry.path().display()))?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                let len = entry.metadata().with_context(|| format!("cannot read {}", entry.path().display()))?.len();
                out.push((entry.path(), len));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The key of `file` under `root` behind `prefix` (which gets a `/` unless empty or ending in one).
pub fn key_for(prefix: &str, root: &Path, file: &Path) -> Result<String> {
    let rel = file.strip_prefix(root).with_context(|| format!("{} is not under {}", file.display(), root.display()))?;
    let parts: Vec<&str> = rel
        .components()
        .map(|c| c.as_os_str().to_str().with_context(|| format!("{} is not UTF-8: name it so", file.display())))
        .collect::<Result<_>>()?;
    let sep = if prefix.is_empty() || prefix.ends_with('/') { "" } else { "/" };
    Ok(format!("{prefix}{sep}{}", parts.join("/")))
}

/// One file's outcome.
struct Outcome {
    file: PathBuf,
    key: String,
    size: u64,
    stored: Result<(archipel_ledger::Hash, u64), String>,
}

/// Puts every file under `root` into `bucket` behind `prefix`, `parallel` at once.
pub async fn put_tree(
    c: &TenantClient,
    bucket: &archipel_ledger::storage::BucketRecord,
    root: &Path,
    prefix: &str,
    parallel: usize,
    json: bool,
) -> Result<()> {
    if parallel == 0 || parallel > MAX_PARALLEL {
        bail!("--parallel {parallel}: use 1 to {MAX_PARALLEL}");
    }
    let files = files_under(root)?;
    if files.is_empty() {
        bail!("{} holds no files", root.display());
    }
    let mut planned = Vec::with_capacity(files.len());
    for (file, size) in files {
        let key = key_for(prefix, root, &file)?;
        archipel_ledger::storage::check_object_key(&key).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        planned.push((file, key, size));
    }
    let total: u64 = planned.iter().map(|(_, _, s)| s).sum();
    let bar = crate::storage_cli::progress(total, json);
    let started = std::time::Instant::now();
    let outcomes: Vec<Outcome> = futures::stream::iter(planned)
        .map(|(file, key, size)| {
            let bar = bar.clone();
            async move {
                let object = NewObject { key: key.clone(), size, ..Default::default() };
                let warn = |w: String| bar.suspend(|| eprintln!("warning: {key}: {w}"));
                let stored = c.put(bucket, object, FileSource(file.clone()), |_| {}, warn).await;
                bar.inc(size);
                let stored = stored.map(|s| (s.tx.hash, s.tx.height)).map_err(|e| e.to_string());
                Outcome { file, key: key.clone(), size, stored }
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.stored.is_err()).collect();
    let txs: std::collections::BTreeSet<_> =
        outcomes.iter().filter_map(|o| o.stored.as_ref().ok().map(|s| s.0)).collect();
    if json {
        let objects: Vec<_> = outcomes
            .iter()
            .map(|o| match &o.stored {
                Ok((tx, height)) => serde_json::json!({
                    "file": o.file, "key": o.key, "size": o.size, "tx": tx, "height": height,
                }),
                Err(e) => serde_json::json!({ "file": o.file, "key": o.key, "size": o.size, "error": e }),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "bucket": bucket.name, "objects": objects, "stored": outcomes.len() - failed.len(),
                "failed": failed.len(), "transactions": txs.len(), "seconds": secs,
            }))?
        );
    } else {
        for o in &failed {
            if let Err(e) = &o.stored {
                eprintln!("{} → {}/{}: {e}", o.file.display(), bucket.name, o.key);
            }
        }
        let stored = outcomes.len() - failed.len();
        println!(
            "{stored} of {} files ({}) stored in {}/{prefix} in {secs:.1} s ({:.0} objects/s), committed by {} transactions",
            outcomes.len(),
            ByteSize(total),
            bucket.name,
            stored as f64 / secs.max(1e-3),
            txs.len()
        );
    }
    if !failed.is_empty() {
        bail!("{} of {} files were not stored (named above); put them again", failed.len(), outcomes.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_tree_behind_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("top.txt"), b"1").unwrap();
        std::fs::write(dir.path().join("a/b/deep.bin"), b"22").unwrap();
        std::fs::write(dir.path().join("a/empty"), b"").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(dir.path().join("top.txt"), dir.path().join("link")).unwrap();
        let files = files_under(dir.path()).unwrap();
        let keys: Vec<String> = files.iter().map(|(f, _)| key_for("docs", dir.path(), f).unwrap()).collect();
        assert_eq!(keys, ["docs/a/b/deep.bin", "docs/a/empty", "docs/top.txt"], "links are not followed");
        assert_eq!(files.iter().map(|(_, s)| *s).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(key_for("", dir.path(), &files[2].0).unwrap(), "top.txt");
        assert_eq!(key_for("x/", dir.path(), &files[2].0).unwrap(), "x/top.txt");
    }
}
