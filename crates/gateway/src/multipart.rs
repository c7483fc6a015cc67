//! Multipart uploads, kept in the gateway's spool directory until completed.
//!
//! Each upload is a directory: `upload.json` (bucket, key, metadata, when it started) and one
//! file per part, written to a temporary name and renamed when its last byte arrived, so a part
//! is either whole or absent and a part uploaded again replaces the old one whole.
//! [`Uploads::complete`] checks the client's list against what is here (numbers ascending, ETags
//! matching, every part but the last at least [`MIN_PART_BYTES`]) and hands back the parts as one
//! source that can be read again, which the object pipeline streams into segments. A gateway
//! that restarts finds its uploads again in the spool.
//!
//! Parts are held on the gateway's disk (not in memory) between `UploadPart` and
//! `CompleteMultipartUpload`; ARCHITECTURE.md says why, and what would stream them straight into
//! segments instead.

use archipel_objects::meta::ObjectMeta;
use archipel_objects::tenant::PutSource;
use md5::Digest as _;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt};

/// Smallest part but the last, as S3 requires.
pub const MIN_PART_BYTES: u64 = 5 * 1024 * 1024;
/// Largest part.
pub const MAX_PART_BYTES: u64 = 5 * 1024 * 1024 * 1024;
/// Highest part number.
pub const MAX_PART_NUMBER: i32 = 10_000;

/// One upload's record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Upload {
    /// Its id.
    pub id: String,
    /// Where the object goes.
    pub bucket: String,
    /// Its key.
    pub key: String,
    /// Its metadata.
    pub meta: ObjectMeta,
    /// When it started (Unix ms).
    pub started_ms: u64,
}

/// One stored part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// Its number.
    pub number: i32,
    /// Its bytes.
    pub size: u64,
    /// The MD5 of its bytes, in hex (its ETag).
    pub etag: String,
    /// When it was stored (Unix ms).
    pub stored_ms: u64,
}

/// Why a multipart call failed.
#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    /// No such upload (never started, completed or aborted).
    #[error("no multipart upload {0} here: it was completed, aborted or never started")]
    NoSuchUpload(String),
    /// A part number outside 1..=10000.
    #[error("part number {0} is outside 1 to {MAX_PART_NUMBER}")]
    BadPartNumber(i32),
    /// A listed part is missing or its ETag differs.
    #[error("part {0} was not uploaded, or its ETag differs from the one listed")]
    InvalidPart(i32),
    /// Listed parts not in ascending order.
    #[error("the parts must be listed in ascending order of part number")]
    InvalidPartOrder,
    /// A part other than the last is too small.
    #[error("part {number} has {size} bytes: every part but the last needs at least {MIN_PART_BYTES}")]
    TooSmall {
        /// The part.
        number: i32,
        /// Its size.
        size: u64,
    },
    /// The body ended before its announced length.
    #[error("the part's body ended after {read} of {size} bytes")]
    Short {
        /// Bytes received.
        read: u64,
        /// Bytes announced.
        size: u64,
    },
    /// No parts listed.
    #[error("a multipart upload is completed with at least one part")]
    Empty,
    /// Reading the request body failed (it broke off, or failed its signature or hash).
    #[error("the part's body could not be read: {0}")]
    Body(String),
    /// The spool directory failed.
    #[error("the gateway's spool directory failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The uploads in progress.
#[derive(Debug)]
pub struct Uploads {
    dir: PathBuf,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Uploads {
    /// The uploads kept in `dir` (created if missing).
    pub fn open(dir: &Path) -> std::io::Result<Uploads> {
        std::fs::create_dir_all(dir)?;
        // Parts are plaintext: for the gateway's user only.
        #[cfg(unix)]
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(Uploads { dir: dir.to_path_buf() })
    }

    fn upload_dir(&self, id: &str) -> Result<PathBuf, MultipartError> {
        // The id comes from the client: only ids this gateway could have made name a directory.
        if !valid_id(id) {
            return Err(MultipartError::NoSuchUpload(id.chars().take(80).collect()));
        }
        Ok(self.dir.join(id))
    }

    /// Starts an upload of `bucket/key`.
    pub async fn create(&self, bucket: &str, key: &str, meta: ObjectMeta) -> Result<Upload, MultipartError> {
        let mut raw = [0u8; 16];
        rand::fill(&mut raw);
        let upload =
            Upload { id: hex::encode(raw), bucket: bucket.into(), key: key.into(), meta, started_ms: now_ms() };
        let dir = self.upload_dir(&upload.id)?;
        tokio::fs::create_dir_all(&dir).await?;
        let json = serde_json::to_vec(&upload).map_err(std::io::Error::other)?;
        write_atomically(&dir.join("upload.json"), &json).await?;
        Ok(upload)
    }

    /// The upload `id`.
    pub async fn get(&self, id: &str) -> Result<Upload, MultipartError> {
        let path = self.upload_dir(id)?.join("upload.json");
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| MultipartError::Io(std::io::Error::other(e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(MultipartError::NoSuchUpload(id.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Every upload in progress into `bucket`, by key then start.
    pub async fn list(&self, bucket: &str) -> Result<Vec<Upload>, MultipartError> {
        let mut out = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.dir).await?;
        while let Some(entry) = dir.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !valid_id(&name) {
                continue;
            }
            if let Ok(u) = self.get(&name).await
                && u.bucket == bucket
            {
                out.push(u);
            }
        }
        out.sort_by(|a, b| (&a.key, a.started_ms).cmp(&(&b.key, b.started_ms)));
        Ok(out)
    }

    /// Stores part `number` of upload `id`: exactly `size` bytes from `body`. Returns its ETag.
    pub async fn put_part(
        &self,
        id: &str,
        number: i32,
        size: u64,
        mut body: impl AsyncRead + Unpin,
    ) -> Result<String, MultipartError> {
        if !(1..=MAX_PART_NUMBER).contains(&number) {
            return Err(MultipartError::BadPartNumber(number));
        }
        self.get(id).await?;
        let dir = self.upload_dir(id)?;
        let mut tmp_name = [0u8; 8];
        rand::fill(&mut tmp_name);
        let tmp = dir.join(format!("part-{number}.{}.tmp", hex::encode(tmp_name)));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            let mut md5 = md5::Md5::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut read = 0u64;
            while read < size {
                let want = buf.len().min((size - read) as usize);
                let n = body.read(&mut buf[..want]).await.map_err(|e| MultipartError::Body(e.to_string()))?;
                if n == 0 {
                    return Err(MultipartError::Short { read, size });
                }
                md5.update(&buf[..n]);
                file.write_all(&buf[..n]).await?;
                read += n as u64;
            }
            file.sync_all().await?;
            let etag = hex::encode(md5.finalize());
            // The part's ETag rides in its name: listing the directory lists the parts.
            tokio::fs::rename(&tmp, dir.join(format!("part-{number}.{etag}"))).await?;
            Ok(etag)
        }
        .await;
        match result {
            Ok(etag) => {
                // An earlier upload of the same number with other bytes is replaced.
                for p in self.parts(id).await? {
                    if p.number == number && p.etag != etag {
                        let _ = tokio::fs::remove_file(dir.join(format!("part-{number}.{}", p.etag))).await;
                    }
                }
                Ok(etag)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// The parts of upload `id`, by number.
    pub async fn parts(&self, id: &str) -> Result<Vec<Part>, MultipartError> {
        let dir = self.upload_dir(id)?;
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(MultipartError::NoSuchUpload(id.into())),
            Err(e) => return Err(e.into()),
        };
        let mut parts = Vec::new();
        while let Some(entry) = entries.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((number, etag)) = name.strip_prefix("part-").and_then(|r| r.split_once('.')) else { continue };
            let (Ok(number), false) = (number.parse::<i32>(), etag.ends_with(".tmp") || etag.contains('.')) else {
                continue;
            };
            let meta = entry.metadata().await?;
            let stored_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            parts.push(Part { number, size: meta.len(), etag: etag.to_string(), stored_ms });
        }
        parts.sort_by_key(|p| (p.number, std::cmp::Reverse(p.stored_ms)));
        // Two files of one number (a crash between a rename and the removal): the newer one.
        parts.dedup_by_key(|p| p.number);
        Ok(parts)
    }

    /// Checks `listed` (part number, ETag) against the parts stored for upload `id` and returns
    /// the object's source, size and ETag (S3's: the MD5 of the parts' MD5s, `-` and the count).
    pub async fn assemble(
        &self,
        id: &str,
        listed: &[(i32, String)],
    ) -> Result<(PartsSource, u64, String), MultipartError> {
        if listed.is_empty() {
            return Err(MultipartError::Empty);
        }
        if listed.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(MultipartError::InvalidPartOrder);
        }
        let stored = self.parts(id).await?;
        let dir = self.upload_dir(id)?;
        let mut files = Vec::with_capacity(listed.len());
        let mut size = 0u64;
        let mut md5s = md5::Md5::new();
        for (i, (number, etag)) in listed.iter().enumerate() {
            let etag = etag.trim_matches('"');
            let part = stored
                .iter()
                .find(|p| p.number == *number && p.etag == etag)
                .ok_or(MultipartError::InvalidPart(*number))?;
            if i + 1 < listed.len() && part.size < MIN_PART_BYTES {
                return Err(MultipartError::TooSmall { number: *number, size: part.size });
            }
            let raw = hex::decode(&part.etag).map_err(|_| MultipartError::InvalidPart(*number))?;
            md5s.update(&raw);
            size += part.size;
            files.push(dir.join(format!("part-{number}.{}", part.etag)));
        }
        let etag = format!("{}-{}", hex::encode(md5s.finalize()), listed.len());
        Ok((PartsSource(files), size, etag))
    }

    /// Forgets upload `id` and its parts.
    pub async fn remove(&self, id: &str) -> Result<(), MultipartError> {
        let dir = self.upload_dir(id)?;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(MultipartError::NoSuchUpload(id.into())),
            Err(e) => Err(e.into()),
        }
    }
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = tokio::fs::File::create(&tmp).await?;
    f.write_all(bytes).await?;
    f.sync_all().await?;
    tokio::fs::rename(&tmp, path).await
}

/// The parts of a completed upload, read one after the other (again for each PUT attempt).
#[derive(Debug, Clone)]
pub struct PartsSource(Vec<PathBuf>);

impl PutSource for PartsSource {
    async fn open(&mut self) -> std::io::Result<Option<Box<dyn AsyncRead + Send + Unpin>>> {
        // Fail now, not mid-upload, if a part went missing.
        for path in &self.0 {
            tokio::fs::metadata(path).await?;
        }
        Ok(Some(Box::new(PartsReader { files: self.0.clone().into(), current: None, opening: None })))
    }
}

type Opening = std::pin::Pin<Box<dyn Future<Output = std::io::Result<tokio::fs::File>> + Send>>;

/// The parts one after the other, one file open at a time (an upload may have 10,000 parts).
struct PartsReader {
    files: std::collections::VecDeque<PathBuf>,
    current: Option<tokio::io::BufReader<tokio::fs::File>>,
    opening: Option<Opening>,
}

impl AsyncRead for PartsReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(opening) = self.opening.as_mut() {
                match opening.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(f)) => {
                        self.opening = None;
                        self.current = Some(tokio::io::BufReader::with_capacity(1 << 20, f));
                    }
                }
            }
            if let Some(current) = self.current.as_mut() {
                let before = buf.filled().len();
                match std::pin::Pin::new(current).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) if buf.filled().len() == before => self.current = None,
                    other => return other,
                }
            }
            match self.files.pop_front() {
                Some(path) => self.opening = Some(Box::pin(tokio::fs::File::open(path))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    async fn read_all(mut s: PartsSource) -> Vec<u8> {
        let mut out = Vec::new();
        s.open().await.unwrap().unwrap().read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn parts_assemble_in_order_with_s3s_etag_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ups = Uploads::open(dir.path()).unwrap();
        let u = ups.create("b", "big", ObjectMeta::default()).await.unwrap();
        let p1 = vec![1u8; 5 * MIB];
        let p2 = vec![2u8; 3];
        // Out of order, and part 1 uploaded twice: the second replaces the first.
        let e2 = ups.put_part(&u.id, 2, 3, &p2[..]).await.unwrap();
        ups.put_part(&u.id, 1, 5 * MIB as u64, &vec![9u8; 5 * MIB][..]).await.unwrap();
        let e1 = ups.put_part(&u.id, 1, 5 * MIB as u64, &p1[..]).await.unwrap();
        assert_eq!(ups.parts(&u.id).await.unwrap().len(), 2);
        let again = Uploads::open(dir.path()).unwrap();
        assert_eq!(again.get(&u.id).await.unwrap(), u);
        assert_eq!(again.list("b").await.unwrap(), vec![u.clone()]);
        let (src, size, etag) = again.assemble(&u.id, &[(1, format!("\"{e1}\"")), (2, e2.clone())]).await.unwrap();
        assert_eq!(size, 5 * MIB as u64 + 3);
        let mut expected = md5::Md5::new();
        expected.update(hex::decode(&e1).unwrap());
        expected.update(hex::decode(&e2).unwrap());
        assert_eq!(etag, format!("{}-2", hex::encode(expected.finalize())));
        assert_eq!(read_all(src.clone()).await, [p1.clone(), p2.clone()].concat());
        // Readable again for a retry.
        assert_eq!(read_all(src).await.len(), 5 * MIB + 3);
        again.remove(&u.id).await.unwrap();
        assert!(matches!(again.get(&u.id).await, Err(MultipartError::NoSuchUpload(_))));
    }

    #[tokio::test]
    async fn bad_lists_parts_and_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ups = Uploads::open(dir.path()).unwrap();
        let u = ups.create("b", "k", ObjectMeta::default()).await.unwrap();
        let e1 = ups.put_part(&u.id, 1, 4, &b"abcd"[..]).await.unwrap();
        let e2 = ups.put_part(&u.id, 2, 4, &b"efgh"[..]).await.unwrap();
        assert!(matches!(ups.assemble(&u.id, &[]).await, Err(MultipartError::Empty)));
        assert!(matches!(
            ups.assemble(&u.id, &[(2, e2.clone()), (1, e1.clone())]).await,
            Err(MultipartError::InvalidPartOrder)
        ));
        assert!(matches!(ups.assemble(&u.id, &[(1, e2.clone())]).await, Err(MultipartError::InvalidPart(1))));
        assert!(matches!(ups.assemble(&u.id, &[(3, e1.clone())]).await, Err(MultipartError::InvalidPart(3))));
        assert!(matches!(
            ups.assemble(&u.id, &[(1, e1.clone()), (2, e2.clone())]).await,
            Err(MultipartError::TooSmall { number: 1, size: 4 })
        ));
        // A single small part is a whole object.
        assert!(ups.assemble(&u.id, &[(2, e2)]).await.is_ok());
        assert!(matches!(ups.put_part(&u.id, 0, 1, &b"x"[..]).await, Err(MultipartError::BadPartNumber(0))));
        assert!(matches!(ups.put_part(&u.id, 10_001, 1, &b"x"[..]).await, Err(MultipartError::BadPartNumber(_))));
        // A body shorter than announced leaves no part behind.
        assert!(matches!(
            ups.put_part(&u.id, 3, 10, &b"short"[..]).await,
            Err(MultipartError::Short { read: 5, size: 10 })
        ));
        assert!(ups.parts(&u.id).await.unwrap().iter().all(|p| p.number != 3));
        assert!(
            std::fs::read_dir(dir.path().join(&u.id)).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp"))
        );
        // Ids from clients never reach outside the spool.
        for id in ["../etc", "..", "", "ABCDEF0123456789ABCDEF0123456789", &"a".repeat(33)] {
            assert!(matches!(ups.get(id).await, Err(MultipartError::NoSuchUpload(_))), "{id}");
            assert!(matches!(ups.remove(id).await, Err(MultipartError::NoSuchUpload(_))), "{id}");
        }
    }
}
