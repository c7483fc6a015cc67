//! Multipart uploads: parts stream into the object's segments as they arrive.
//!
//! At `CreateMultipartUpload` the gateway starts a [`Staged`] version (its holders placed, its
//! data key made and wrapped); each upload is a directory in the spool holding `upload.json`
//! (bucket, key, metadata, the staged version) and `stream.json` (what has been streamed).
//!
//! - **In order**: part `n` when parts `1..n` are streamed goes straight through: its bytes,
//!   after the *carry* (the tail of the parts before that did not fill a segment), are cut into
//!   segments of [`SEGMENT_PLAIN_BYTES`], each sealed and uploaded to the holders while the next
//!   one is read; what is left over is the new carry (`carry.<offset>`, under one segment). At
//!   most two segments and the carry are in memory, whatever the part's size.
//! - **Out of order** (a part ahead of the next one, or one arriving while another part of the
//!   upload is streaming): spooled to a file (`part-<n>.<md5>`, written to a temporary name and
//!   renamed, so whole or absent), and streamed from there, then removed, once its turn comes. The
//!   spool holds at most the parts a client sends ahead — for aws-cli's 10 threads, about ten.
//! - **Again**: a part already streamed sent again with the same bytes (a retry) is answered with
//!   its ETag; with other bytes it is refused ([`MultipartError::AlreadyStreamed`]).
//! - **Complete** ([`Uploads::complete`]): the list must begin with the streamed parts; listed
//!   parts after them are streamed from the spool in the list's order; then the carry is the last
//!   segment and the caller seals the version ([`TenantClient::commit_staged`]).
//! - **Restarts**: `stream.json` is written after the part's segments are uploaded and their
//!   hashes appended to `segments.bin` (fsynced; entries past its count are ignored), so a crash
//!   leaves the part unrecorded and the client's retry streams it again (same bytes, same
//!   ciphertext, same segment numbers).
//! - **Slow clients**: holders collect an unsealed version nothing was written to for 10
//!   minutes; [`Uploads::keep_alive`] writes a provisional manifest to the holders of every upload
//!   idle for [`KEEP_ALIVE_AFTER`].
//!
//! [`TenantClient::commit_staged`]: archipel_objects::tenant::TenantClient::commit_staged

use archipel_objects::meta::ObjectMeta;
use archipel_objects::tenant::{TenantClient, TenantError};
use archipel_objects::transfer::Staged;
use archipel_objects::{SEGMENT_PLAIN_BYTES, ShardHash};
use md5::Digest as _;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt};

/// Smallest part but the last, as S3 requires.
pub const MIN_PART_BYTES: u64 = 5 * 1024 * 1024;
/// Largest part.
pub const MAX_PART_BYTES: u64 = 5 * 1024 * 1024 * 1024;
/// Highest part number.
pub const MAX_PART_NUMBER: i32 = 10_000;
/// An upload nothing was written to for this long gets a keep-alive write to its holders (they
/// collect unsealed versions after 10 minutes idle).
pub const KEEP_ALIVE_AFTER: std::time::Duration = std::time::Duration::from_secs(4 * 60);
/// An upload not completed this long after it started is removed (its holders then collect what
/// it streamed): abandoned uploads do not hold storage for ever.
pub const MAX_UPLOAD_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// Most bytes of one upload's parts waiting in the spool for their turn: a client sending parts
/// far ahead of the ones it has not sent is asked to slow down, not given the gateway's disk.
pub const MAX_SPOOLED_BYTES: u64 = 4 << 30;

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
    /// The version its parts stream into.
    pub staged: Staged,
}

/// One part, streamed or spooled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// What has been streamed into an upload's segments.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Stream {
    /// The parts streamed, in order (numbers 1, 2, … while uploading; the completion may add
    /// listed parts that skip numbers).
    parts: Vec<Part>,
    /// Bytes streamed: the segments' and the carry's.
    offset: u64,
    /// Segments sealed and uploaded (their hashes are the first entries of `segments.bin`).
    segments: u64,
    /// When something was last written to the holders (Unix ms).
    written_ms: u64,
}

impl Stream {
    fn next_part(&self) -> i32 {
        self.parts.last().map_or(1, |p| p.number + 1)
    }

    /// The carry's length; `None` when the record is damaged (no carry of a segment or more).
    fn carry_len(&self) -> Option<u64> {
        self.offset.checked_sub(self.segments.checked_mul(SEGMENT_PLAIN_BYTES)?).filter(|c| *c < SEGMENT_PLAIN_BYTES)
    }
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
    /// A part already streamed into the object, sent again with other bytes.
    #[error(
        "part {0} was already streamed into the object with other bytes; parts are streamed as they arrive, so a part cannot be replaced after the parts before it arrived: start the upload again"
    )]
    AlreadyStreamed(i32),
    /// The list leaves out a streamed part, or lists it with another ETag.
    #[error(
        "part {0} was streamed into the object as it arrived: the list must begin with every part up to the last one uploaded in order, with their ETags"
    )]
    NotListed(i32),
    /// A segment number already sent to the holders with other bytes (a part sent again with
    /// other bytes after an attempt that failed midway).
    #[error(
        "segment {0} of this upload was already sent to its holders with other bytes (a part sent again with other bytes after a failed attempt); it cannot be sealed again: start the upload again"
    )]
    Resealed(u64),
    /// Too many bytes of this upload's parts wait in the spool for parts not sent yet.
    #[error(
        "{waiting} bytes of this upload's parts already wait for parts before them; send the parts in order (part {next} is next)"
    )]
    SpoolFull {
        /// Bytes waiting.
        waiting: u64,
        /// The part whose turn it is.
        next: i32,
    },
    /// The object would pass the largest size an object may have.
    #[error(
        "the upload's parts come to more than the {0} bytes an object of this bucket may hold (its manifest lists \
         every shard of every segment; a holder stores at most 4 MiB of it)"
    )]
    TooLarge(u64),
    /// The object pipeline failed (a holder, the network).
    #[error("{0}")]
    Stage(#[from] TenantError),
    /// The spool directory failed.
    #[error("the gateway's spool directory failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Where streamed segments go: the object pipeline ([`TenantClient`]), or memory in tests.
pub trait Stager: Send + Sync {
    /// Seals and uploads `plain` as segment `segment` of `staged`; returns its shards' hashes.
    fn stage(
        &self,
        staged: &Staged,
        segment: u64,
        plain: &[u8],
    ) -> impl Future<Output = Result<Vec<ShardHash>, TenantError>> + Send;

    /// Writes something to the holders of `staged` (whose first `segments` are staged, `size`
    /// bytes) so that they keep its shards.
    fn keep(
        &self,
        staged: &Staged,
        size: u64,
        segments: Vec<Vec<ShardHash>>,
    ) -> impl Future<Output = Result<(), TenantError>> + Send;
}

impl Stager for TenantClient {
    async fn stage(&self, staged: &Staged, segment: u64, plain: &[u8]) -> Result<Vec<ShardHash>, TenantError> {
        self.stage_segment(staged, segment, plain).await
    }

    async fn keep(&self, staged: &Staged, size: u64, segments: Vec<Vec<ShardHash>>) -> Result<(), TenantError> {
        self.keep_staged(staged, size, segments).await
    }
}

/// What [`Uploads::complete`] hands back: everything to seal the version with.
#[derive(Debug)]
pub struct Completed {
    /// The upload.
    pub upload: Upload,
    /// The object's size.
    pub size: u64,
    /// Every segment's shard hashes, in order.
    pub segments: Vec<Vec<ShardHash>>,
    /// S3's multipart ETag: the MD5 of the parts' MD5s, `-` and the count.
    pub etag: String,
}

/// An upload held for its completion: no part streams into it and no keep-alive writes to its
/// holders until this is dropped (a keep-alive's provisional manifest landing between the seals
/// would make holders sign for different manifests).
#[derive(Debug)]
pub struct Held {
    id: String,
    lock: Option<tokio::sync::OwnedMutexGuard<()>>,
    gate: Arc<Gate>,
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.lock.take());
        // Parts that waited for the lock look again.
        self.gate.done.notify_waiters();
    }
}

/// How the parts of one upload take turns.
#[derive(Debug, Default)]
struct Gate {
    /// Held by the part streaming (and by a completion).
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Parts of this upload being received now (streaming, or waiting for their turn), by
    /// number, with how many copies.
    in_flight: Mutex<BTreeMap<i32, usize>>,
    /// Told whenever a part arrives or is done.
    done: tokio::sync::Notify,
}

/// A part being received, in its gate's `in_flight` until dropped.
struct InFlight<'a> {
    gate: &'a Gate,
    number: i32,
}

impl<'a> InFlight<'a> {
    fn new(gate: &'a Gate, number: i32) -> Self {
        *gate.in_flight.lock().unwrap_or_else(|e| e.into_inner()).entry(number).or_default() += 1;
        // Parts waiting for this one to arrive look again.
        gate.done.notify_waiters();
        InFlight { gate, number }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.gate.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = in_flight.get_mut(&self.number) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.number);
            }
        }
        drop(in_flight);
        self.gate.done.notify_waiters();
    }
}

/// How long a part waits for the parts before it (being received) before it goes to the spool.
const TURN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a part waits for parts before it that have not arrived (a client's threads start
/// their requests at once, and they arrive in any order) before it goes to the spool.
const ARRIVAL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The uploads in progress.
#[derive(Debug)]
pub struct Uploads {
    dir: PathBuf,
    /// One gate per upload: one part streams at a time.
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    /// [`MAX_SPOOLED_BYTES`], smaller in tests.
    max_spooled: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn damaged(what: &str) -> MultipartError {
    MultipartError::Io(std::io::Error::other(format!("{what} is damaged")))
}

impl Uploads {
    /// The uploads kept in `dir` (created if missing).
    pub fn open(dir: &Path) -> std::io::Result<Uploads> {
        std::fs::create_dir_all(dir)?;
        // Spooled parts and carries are plaintext: for the gateway's user only.
        #[cfg(unix)]
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(Uploads { dir: dir.to_path_buf(), gates: Mutex::new(HashMap::new()), max_spooled: MAX_SPOOLED_BYTES })
    }

    fn upload_dir(&self, id: &str) -> Result<PathBuf, MultipartError> {
        // The id comes from the client: only ids this gateway could have made name a directory.
        if !valid_id(id) {
            return Err(MultipartError::NoSuchUpload(id.chars().take(80).collect()));
        }
        Ok(self.dir.join(id))
    }

    fn gate(&self, id: &str) -> Arc<Gate> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        // Gates of finished uploads go once nobody uses them.
        if gates.len() > 1024 {
            gates.retain(|_, g| Arc::strong_count(g) > 1 || Arc::strong_count(&g.lock) > 1);
        }
        gates.entry(id.to_string()).or_default().clone()
    }

    /// Starts an upload of `bucket/key` into `staged`.
    pub async fn create(
        &self,
        bucket: &str,
        key: &str,
        meta: ObjectMeta,
        staged: Staged,
    ) -> Result<Upload, MultipartError> {
        let mut raw = [0u8; 16];
        rand::fill(&mut raw);
        let upload =
            Upload { id: hex::encode(raw), bucket: bucket.into(), key: key.into(), meta, started_ms: now_ms(), staged };
        let dir = self.upload_dir(&upload.id)?;
        tokio::fs::create_dir_all(&dir).await?;
        save_stream(&dir, &Stream { written_ms: now_ms(), ..Stream::default() }).await?;
        let json = serde_json::to_vec(&upload).map_err(std::io::Error::other)?;
        write_atomically(&dir.join("upload.json"), &json).await?;
        Ok(upload)
    }

    /// The upload `id`.
    pub async fn get(&self, id: &str) -> Result<Upload, MultipartError> {
        let path = self.upload_dir(id)?.join("upload.json");
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|_| damaged("the upload's record")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(MultipartError::NoSuchUpload(id.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Every upload in progress into `bucket`, by key then start.
    pub async fn list(&self, bucket: &str) -> Result<Vec<Upload>, MultipartError> {
        let mut out = Vec::new();
        for id in self.ids().await? {
            if let Ok(u) = self.get(&id).await
                && u.bucket == bucket
            {
                out.push(u);
            }
        }
        out.sort_by(|a, b| (&a.key, a.started_ms).cmp(&(&b.key, b.started_ms)));
        Ok(out)
    }

    async fn ids(&self) -> Result<Vec<String>, MultipartError> {
        let mut out = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.dir).await?;
        while let Some(entry) = dir.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if valid_id(&name) {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// The parts of upload `id` — streamed and spooled —, by number.
    pub async fn parts(&self, id: &str) -> Result<Vec<Part>, MultipartError> {
        let dir = self.upload_dir(id)?;
        let stream = load_stream(&dir, id).await?;
        let mut parts = spooled(&dir, id).await?;
        parts.retain(|p| stream.parts.iter().all(|s| s.number != p.number));
        parts.extend(stream.parts);
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    /// Stores part `number` of upload `id`: exactly `size` bytes from `body`, streamed into the
    /// object's segments through `stager` when it is the next part. A part whose turn comes after
    /// parts being received now (a client sending parts 1–4 at once) waits for them, its body
    /// unread, up to [`TURN_WAIT`]; one with parts missing before it waits [`ARRIVAL_WAIT`] for
    /// them to arrive, then goes to the spool. Returns its ETag.
    pub async fn put_part(
        &self,
        id: &str,
        number: i32,
        size: u64,
        mut body: impl AsyncRead + Unpin,
        stager: &Arc<impl Stager + 'static>,
    ) -> Result<String, MultipartError> {
        if !(1..=MAX_PART_NUMBER).contains(&number) {
            return Err(MultipartError::BadPartNumber(number));
        }
        let upload = self.get(id).await?;
        let dir = self.upload_dir(id)?;
        let max = archipel_objects::transfer::max_object_bytes(upload.staged.bucket.policy.code);
        let gate = self.gate(id);
        let lock = gate.lock.clone();
        let _in_flight = InFlight::new(&gate, number);
        let waited_from = std::time::Instant::now();
        let stream = loop {
            // Told of any part arriving or done, and of the lock let go, from here on (no wake-up
            // is lost between the look below and the wait).
            let done = gate.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            // A look needs no lock (the record is replaced whole); only the part whose turn it is
            // takes it, so looks never keep a part from its turn.
            let stream = load_stream(&dir, id).await?;
            // Past what the bucket's code holds: refused before the body is read.
            if stream.offset.saturating_add(size) > max {
                return Err(MultipartError::TooLarge(max));
            }
            if let Some(p) = stream.parts.iter().find(|p| p.number == number) {
                return again(p, size, body).await;
            }
            let wait = if number == stream.next_part() {
                if let Ok(_streaming) = lock.try_lock() {
                    let mut stream = load_stream(&dir, id).await?;
                    if let Some(p) = stream.parts.iter().find(|p| p.number == number) {
                        return again(p, size, body).await;
                    }
                    if number == stream.next_part() {
                        let etag =
                            stream_part(&dir, &upload.staged, &mut stream, number, size, &mut body, None, stager)
                                .await?;
                        drain(&dir, &upload.staged, &mut stream, stager).await?;
                        return Ok(etag);
                    }
                    // Streamed meanwhile: look again.
                    continue;
                }
                // Held (the same number sent twice, a keep-alive, a completion): its holder tells
                // when it lets go.
                TURN_WAIT
            } else {
                // Every part before this one is being received here: its turn comes when they are
                // done. Otherwise a part before it has not arrived yet.
                let in_flight = gate.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                if (stream.next_part()..number).all(|n| in_flight.contains_key(&n)) { TURN_WAIT } else { ARRIVAL_WAIT }
            };
            let left = wait.saturating_sub(waited_from.elapsed());
            if left.is_zero() || tokio::time::timeout(left, done).await.is_err() {
                break stream;
            }
        };
        // Ahead of its turn with parts missing before it: to the spool.
        let waiting: u64 = spooled(&dir, id).await?.iter().filter(|p| p.number != number).map(|p| p.size).sum();
        if stream.offset.saturating_add(waiting).saturating_add(size) > max {
            return Err(MultipartError::TooLarge(max));
        }
        if waiting.saturating_add(size) > self.max_spooled {
            return Err(MultipartError::SpoolFull { waiting, next: stream.next_part() });
        }
        let etag = spool(&dir, number, size, &mut body).await?;
        // Its turn may have come meanwhile (the part streaming before it has ended).
        let _streaming = lock.lock().await;
        let mut stream = load_stream(&dir, id).await?;
        if let Some(p) = stream.parts.iter().find(|p| p.number == number) {
            // The same number sent twice at once, and the other copy streamed first: this one
            // stands only if it has the same bytes.
            let _ = tokio::fs::remove_file(dir.join(format!("part-{number}.{etag}"))).await;
            return if p.etag == etag { Ok(etag) } else { Err(MultipartError::AlreadyStreamed(number)) };
        }
        drain(&dir, &upload.staged, &mut stream, stager).await?;
        match stream.parts.iter().find(|p| p.number == number) {
            // Another copy of the number, spooled after this one, replaced it and streamed.
            Some(p) if p.etag != etag => Err(MultipartError::AlreadyStreamed(number)),
            _ => Ok(etag),
        }
    }

    /// Holds upload `id` for its completion (waiting for a part streaming into it).
    pub async fn hold(&self, id: &str) -> Result<Held, MultipartError> {
        self.upload_dir(id)?;
        let gate = self.gate(id);
        let lock = Some(gate.lock.clone().lock_owned().await);
        Ok(Held { id: id.to_string(), lock, gate })
    }

    /// Checks `listed` (part number, ETag) against upload `id`, streams the listed parts still
    /// spooled, and hands back what seals the object: its size, segments and ETag.
    pub async fn complete(
        &self,
        held: &Held,
        listed: &[(i32, String)],
        stager: &Arc<impl Stager + 'static>,
    ) -> Result<Completed, MultipartError> {
        let id = held.id.as_str();
        if listed.is_empty() {
            return Err(MultipartError::Empty);
        }
        if listed.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(MultipartError::InvalidPartOrder);
        }
        let upload = self.get(id).await?;
        let dir = self.upload_dir(id)?;
        let mut stream = load_stream(&dir, id).await?;
        drain(&dir, &upload.staged, &mut stream, stager).await?;
        // The list begins with the streamed parts, then names spooled ones.
        for (i, p) in stream.parts.iter().enumerate() {
            match listed.get(i) {
                Some((n, e)) if *n == p.number && e.trim_matches('"') == p.etag => {}
                _ => return Err(MultipartError::NotListed(p.number)),
            }
        }
        let spooled = spooled(&dir, id).await?;
        let mut rest = Vec::new();
        for (n, e) in &listed[stream.parts.len()..] {
            let part = spooled
                .iter()
                .find(|p| p.number == *n && p.etag == e.trim_matches('"'))
                .ok_or(MultipartError::InvalidPart(*n))?;
            rest.push(part.clone());
        }
        let all: Vec<&Part> = stream.parts.iter().chain(&rest).collect();
        for (i, p) in all.iter().enumerate() {
            if i + 1 < all.len() && p.size < MIN_PART_BYTES {
                return Err(MultipartError::TooSmall { number: p.number, size: p.size });
            }
        }
        for p in rest {
            stream_spooled(&dir, &upload.staged, &mut stream, &p, stager).await?;
        }
        let mut md5s = md5::Md5::new();
        for p in &stream.parts {
            md5s.update(hex::decode(&p.etag).map_err(|_| damaged("a part's ETag"))?);
        }
        let etag = format!("{}-{}", hex::encode(md5s.finalize()), stream.parts.len());
        let max = archipel_objects::transfer::max_object_bytes(upload.staged.bucket.policy.code);
        if stream.offset > max {
            return Err(MultipartError::TooLarge(max));
        }
        let mut segments = load_segments(&dir, &upload.staged, stream.segments).await?;
        // The carry is the last segment (sealed anew if the completion is tried again: the same
        // bytes under the same number).
        let carry = load_carry(&dir, &stream).await?;
        if !carry.is_empty() {
            segments.push(stage_once(&dir, &upload.staged, stream.segments, &carry, &**stager).await?);
        }
        Ok(Completed { size: stream.offset, segments, etag, upload })
    }

    /// Forgets upload `id` and its parts (its streamed shards are collected by their holders),
    /// once no part streams into it.
    pub async fn remove(&self, id: &str) -> Result<(), MultipartError> {
        let held = self.hold(id).await?;
        self.remove_held(&held).await
    }

    /// Forgets a held upload: its record first (so parts arriving now find no upload), then its
    /// directory (a part spooling meanwhile may leave a file: the directory goes on the sweep).
    pub async fn remove_held(&self, held: &Held) -> Result<(), MultipartError> {
        let dir = self.upload_dir(&held.id)?;
        match tokio::fs::remove_file(dir.join("upload.json")).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MultipartError::NoSuchUpload(held.id.clone()));
            }
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            tracing::warn!("upload {}: its directory is left for the sweep: {e}", held.id);
        }
        Ok(())
    }

    /// Writes a provisional manifest to the holders of every upload with streamed segments that
    /// nothing was written to for [`KEEP_ALIVE_AFTER`], so they keep its shards; removes uploads
    /// older than [`MAX_UPLOAD_AGE`] and directories an abort or a crash left without a record.
    /// Returns how many uploads it kept. Run every minute by the gateway.
    pub async fn keep_alive(&self, stager: &impl Stager) -> usize {
        let mut kept = 0;
        for id in self.ids().await.unwrap_or_default() {
            let gate = self.gate(&id);
            // A part streaming is a write already; a completion holds the upload.
            let Ok(streaming) = gate.lock.clone().try_lock_owned() else { continue };
            let held = Held { id: id.clone(), lock: Some(streaming), gate: gate.clone() };
            let Ok(dir) = self.upload_dir(&id) else { continue };
            let upload = match self.get(&id).await {
                Ok(u) => u,
                Err(MultipartError::NoSuchUpload(_)) => {
                    // No record: removed (or never made whole) — swept once old enough that no
                    // creation is under way.
                    let old = tokio::fs::metadata(&dir)
                        .await
                        .ok()
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > std::time::Duration::from_secs(3600));
                    if old {
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                    }
                    continue;
                }
                Err(_) => continue,
            };
            if now_ms().saturating_sub(upload.started_ms) > MAX_UPLOAD_AGE.as_millis() as u64 {
                tracing::info!(
                    "upload {id} of {}/{} was not completed within 7 days: removed",
                    upload.bucket,
                    upload.key
                );
                let _ = self.remove_held(&held).await;
                continue;
            }
            let Ok(mut stream) = load_stream(&dir, &id).await else { continue };
            if stream.segments == 0 || now_ms().saturating_sub(stream.written_ms) < KEEP_ALIVE_AFTER.as_millis() as u64
            {
                continue;
            }
            let Ok(segments) = load_segments(&dir, &upload.staged, stream.segments).await else { continue };
            // One slow holder must not hold up the other uploads' keep-alives.
            let size = stream.segments * SEGMENT_PLAIN_BYTES;
            match tokio::time::timeout(std::time::Duration::from_secs(30), stager.keep(&upload.staged, size, segments))
                .await
            {
                Ok(Ok(())) => {
                    stream.written_ms = now_ms();
                    if save_stream(&dir, &stream).await.is_ok() {
                        kept += 1;
                    }
                }
                Ok(Err(e)) => tracing::warn!("upload {id}: keeping its streamed parts on their holders failed: {e}"),
                Err(_) => tracing::warn!("upload {id}: keeping its streamed parts on their holders timed out"),
            }
        }
        kept
    }
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = tokio::fs::File::create(&tmp).await?;
    f.write_all(bytes).await?;
    f.sync_all().await?;
    tokio::fs::rename(&tmp, path).await
}

async fn load_stream(dir: &Path, id: &str) -> Result<Stream, MultipartError> {
    match tokio::fs::read(dir.join("stream.json")).await {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|_| damaged("the upload's stream record")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(MultipartError::NoSuchUpload(id.into())),
        Err(e) => Err(e.into()),
    }
}

async fn save_stream(dir: &Path, stream: &Stream) -> std::io::Result<()> {
    write_atomically(&dir.join("stream.json"), &serde_json::to_vec(stream).map_err(std::io::Error::other)?).await
}

/// The first `count` entries of `segments.bin`: each segment's k+m shard hashes.
async fn load_segments(dir: &Path, staged: &Staged, count: u64) -> Result<Vec<Vec<ShardHash>>, MultipartError> {
    let per = staged.bucket.policy.code.total();
    if per == 0 {
        return Err(damaged("the upload's record"));
    }
    let bytes = match tokio::fs::read(dir.join("segments.bin")).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let want = usize::try_from(count).ok().and_then(|c| c.checked_mul(per * 32)).unwrap_or(usize::MAX);
    if bytes.len() < want {
        return Err(damaged("the upload's segment list"));
    }
    Ok(bytes[..want]
        .chunks_exact(per * 32)
        .map(|seg| seg.chunks_exact(32).map(|h| h.try_into().unwrap_or([0; 32])).collect())
        .collect())
}

fn carry_path(dir: &Path, offset: u64) -> PathBuf {
    dir.join(format!("carry.{offset}"))
}

async fn load_carry(dir: &Path, stream: &Stream) -> Result<Vec<u8>, MultipartError> {
    let want = stream.carry_len().ok_or_else(|| damaged("the upload's stream record"))? as usize;
    if want == 0 {
        return Ok(Vec::new());
    }
    let carry = tokio::fs::read(carry_path(dir, stream.offset)).await?;
    if carry.len() != want {
        return Err(damaged("the upload's carry"));
    }
    Ok(carry)
}

/// Part files in the spool, by number (the newest of two files of one number, left by a crash
/// between a rename and a removal).
async fn spooled(dir: &Path, id: &str) -> Result<Vec<Part>, MultipartError> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(MultipartError::NoSuchUpload(id.into())),
        Err(e) => return Err(e.into()),
    };
    let mut parts = Vec::new();
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((number, etag)) = name.strip_prefix("part-").and_then(|r| r.split_once('.')) else { continue };
        let (Ok(number), false) = (number.parse::<i32>(), etag.contains('.')) else { continue };
        let meta = entry.metadata().await?;
        let stored_ms = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        parts.push(Part { number, size: meta.len(), etag: etag.to_string(), stored_ms });
    }
    parts.sort_by_key(|p| (p.number, std::cmp::Reverse(p.stored_ms)));
    parts.dedup_by_key(|p| p.number);
    Ok(parts)
}

/// Writes part `number` (exactly `size` bytes of `body`) to the spool; returns its ETag. An
/// earlier spooled copy of the number with other bytes is replaced.
async fn spool(
    dir: &Path,
    number: i32,
    size: u64,
    body: &mut (impl AsyncRead + Unpin),
) -> Result<String, MultipartError> {
    let mut tmp_name = [0u8; 8];
    rand::fill(&mut tmp_name);
    let tmp = dir.join(format!("part-{number}.{}.tmp", hex::encode(tmp_name)));
    let result = async {
        let mut file = tokio::fs::File::create(&tmp).await?;
        let etag = read_part(body, size, &mut file).await?;
        file.sync_all().await?;
        // The part's ETag rides in its name: listing the directory lists the parts.
        tokio::fs::rename(&tmp, dir.join(format!("part-{number}.{etag}"))).await?;
        Ok(etag)
    }
    .await;
    match result {
        Ok(etag) => {
            let mut entries = tokio::fs::read_dir(dir).await?;
            while let Some(entry) = entries.next_entry().await? {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(other) = name.strip_prefix(&format!("part-{number}."))
                    && other != etag
                    && !other.contains('.')
                {
                    let _ = tokio::fs::remove_file(entry.path()).await;
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

/// Reads exactly `size` bytes of a part's `body` into `out`; returns their MD5, in hex.
async fn read_part(
    body: &mut (impl AsyncRead + Unpin),
    size: u64,
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> Result<String, MultipartError> {
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
        out.write_all(&buf[..n]).await?;
        read += n as u64;
    }
    Ok(hex::encode(md5.finalize()))
}

/// A streamed part sent again: answered with its ETag when it has the same bytes.
async fn again(part: &Part, size: u64, mut body: impl AsyncRead + Unpin) -> Result<String, MultipartError> {
    let etag = read_part(&mut body, size, &mut tokio::io::sink()).await?;
    if size == part.size && etag == part.etag {
        Ok(part.etag.clone())
    } else {
        Err(MultipartError::AlreadyStreamed(part.number))
    }
}

/// Streams the spooled parts whose turn has come.
async fn drain(
    dir: &Path,
    staged: &Staged,
    stream: &mut Stream,
    stager: &Arc<impl Stager + 'static>,
) -> Result<(), MultipartError> {
    loop {
        let next = stream.next_part();
        let Some(part) = spooled(dir, "").await?.into_iter().find(|p| p.number == next) else { return Ok(()) };
        stream_spooled(dir, staged, stream, &part, stager).await?;
    }
}

/// Streams spooled `part` from its file, then removes the file.
async fn stream_spooled(
    dir: &Path,
    staged: &Staged,
    stream: &mut Stream,
    part: &Part,
    stager: &Arc<impl Stager + 'static>,
) -> Result<(), MultipartError> {
    let path = dir.join(format!("part-{}.{}", part.number, part.etag));
    let mut file = tokio::io::BufReader::with_capacity(1 << 20, tokio::fs::File::open(&path).await?);
    stream_part(dir, staged, stream, part.number, part.size, &mut file, Some(&part.etag), stager).await?;
    let _ = tokio::fs::remove_file(&path).await;
    Ok(())
}

/// Reads `body` into `cur` until it holds a segment or the part's `remaining` bytes are read.
async fn fill(
    body: &mut (impl AsyncRead + Unpin),
    cur: &mut Vec<u8>,
    remaining: &mut u64,
    md5: &mut md5::Md5,
    size: u64,
) -> Result<(), MultipartError> {
    let segment = SEGMENT_PLAIN_BYTES as usize;
    while cur.len() < segment && *remaining > 0 {
        let start = cur.len();
        let want = (segment - start).min(1 << 20).min(*remaining as usize);
        cur.resize(start + want, 0);
        let n = match body.read(&mut cur[start..]).await {
            Ok(n) => n,
            Err(e) => {
                cur.truncate(start);
                return Err(MultipartError::Body(e.to_string()));
            }
        };
        cur.truncate(start + n);
        if n == 0 {
            return Err(MultipartError::Short { read: size - *remaining, size });
        }
        md5.update(&cur[start..]);
        *remaining -= n as u64;
    }
    Ok(())
}

/// Seals segment `index` through `stager`, once: AES-GCM must never seal two plaintexts under
/// one nonce (the data key and the segment number), and a holder sees what is sent even when it
/// refuses it. The plaintext's hash is written to `attempts.bin` before the shards go out; a
/// later attempt at the number with other bytes is refused, whatever happened in between.
async fn stage_once(
    dir: &Path,
    staged: &Staged,
    index: u64,
    plain: &[u8],
    stager: &impl Stager,
) -> Result<Vec<ShardHash>, MultipartError> {
    guard_attempt(dir, index, plain).await?;
    Ok(stager.stage(staged, index, plain).await?)
}

/// The check and record of [`stage_once`]: refuses segment `index` with bytes other than an
/// earlier attempt's, or records these. A part's segments pass it one after the other, before
/// each is staged: a part refused at one segment records none after it (with the check inside
/// the concurrent staging, the next segment could record other bytes beside a refused one, and
/// the first bytes could then never be sent again).
async fn guard_attempt(dir: &Path, index: u64, plain: &[u8]) -> Result<(), MultipartError> {
    let hash = blake3::hash(plain);
    let path = dir.join("attempts.bin");
    let mut log = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if log.len() % 40 != 0 {
        // A record torn by a crash or a full disk: no shard was sent after it (its write failed
        // first), so it goes, and the records after stay aligned.
        let whole = log.len() / 40 * 40;
        tokio::fs::OpenOptions::new().write(true).open(&path).await?.set_len(whole as u64).await?;
        log.truncate(whole);
    }
    let earlier = log
        .chunks_exact(40)
        .find(|r| r[..8] == index.to_be_bytes())
        .map(|r| <[u8; 32]>::try_from(&r[8..]).unwrap_or([0; 32]));
    match earlier {
        Some(h) if h == *hash.as_bytes() => {}
        Some(_) => return Err(MultipartError::Resealed(index)),
        None => {
            let mut record = index.to_be_bytes().to_vec();
            record.extend_from_slice(hash.as_bytes());
            let mut f = tokio::fs::OpenOptions::new().create(true).append(true).open(&path).await?;
            f.write_all(&record).await?;
            f.sync_all().await?;
        }
    }
    Ok(())
}

/// Segments sealed and uploading at once while a part streams.
const STAGING_AT_ONCE: usize = 2;

/// Segments staging on their own tasks, in order; those still running when this is dropped (a
/// part that failed) are stopped.
struct Staging(std::collections::VecDeque<tokio::task::JoinHandle<Result<Vec<ShardHash>, MultipartError>>>);

impl Staging {
    /// The hashes of the oldest segment staging.
    async fn next(&mut self) -> Result<Vec<ShardHash>, MultipartError> {
        match self.0.pop_front() {
            Some(task) => task.await.map_err(|e| MultipartError::Io(std::io::Error::other(e)))?,
            None => Err(MultipartError::Io(std::io::Error::other("no segment is staging"))),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Streams part `number` (exactly `size` bytes of `body`) after the carry into segments and
/// records it; `expect` is the ETag its bytes must have (a spooled part's). Returns its ETag.
#[allow(clippy::too_many_arguments)] // the upload's place, the part and where its segments go
async fn stream_part(
    dir: &Path,
    staged: &Staged,
    stream: &mut Stream,
    number: i32,
    size: u64,
    body: &mut (impl AsyncRead + Unpin),
    expect: Option<&str>,
    stager: &Arc<impl Stager + 'static>,
) -> Result<String, MultipartError> {
    let segment = SEGMENT_PLAIN_BYTES as usize;
    let mut cur = Vec::with_capacity(segment);
    cur.extend_from_slice(&load_carry(dir, stream).await?);
    let mut index = stream.segments;
    let mut hashes = Vec::new();
    let mut remaining = size;
    let mut md5 = md5::Md5::new();
    // Full segments are sealed and uploaded on their own tasks, two at once, while the next is
    // read (as a PUT does); their hashes come back in order.
    let mut in_flight = Staging(std::collections::VecDeque::new());
    loop {
        fill(body, &mut cur, &mut remaining, &mut md5, size).await?;
        if cur.len() == segment {
            let full = std::mem::replace(&mut cur, Vec::with_capacity(segment));
            while in_flight.0.len() >= STAGING_AT_ONCE {
                hashes.push(in_flight.next().await?);
            }
            let at = index;
            index += 1;
            guard_attempt(dir, at, &full).await?;
            let (staged, stager) = (staged.clone(), stager.clone());
            in_flight.0.push_back(tokio::spawn(async move { Ok(stager.stage(&staged, at, &full).await?) }));
        } else if remaining == 0 {
            break;
        }
    }
    while !in_flight.0.is_empty() {
        hashes.push(in_flight.next().await?);
    }
    let etag = hex::encode(md5.finalize());
    if let Some(expected) = expect
        && expected != etag
    {
        return Err(damaged(&format!("spooled part {number}")));
    }
    // The segments' hashes, then the carry, then the record naming both: a crash before the
    // record leaves the part unrecorded, its segments and carry ignored.
    let per = staged.bucket.policy.code.total() * 32;
    let mut f =
        tokio::fs::OpenOptions::new().create(true).write(true).truncate(false).open(dir.join("segments.bin")).await?;
    f.set_len(stream.segments * per as u64).await?;
    let mut bytes = Vec::with_capacity(hashes.len() * per);
    for h in &hashes {
        for shard in h {
            bytes.extend_from_slice(shard);
        }
    }
    tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::End(0)).await?;
    f.write_all(&bytes).await?;
    f.sync_all().await?;
    let old_carry = carry_path(dir, stream.offset);
    let offset = stream.offset + size;
    if !cur.is_empty() {
        write_atomically(&carry_path(dir, offset), &cur).await?;
    }
    let before = stream.clone();
    stream.parts.push(Part { number, size, etag: etag.clone(), stored_ms: now_ms() });
    stream.offset = offset;
    stream.segments = index;
    stream.written_ms = now_ms();
    if let Err(e) = save_stream(dir, stream).await {
        *stream = before;
        return Err(e.into());
    }
    if old_carry != carry_path(dir, offset) {
        let _ = tokio::fs::remove_file(old_carry).await;
    }
    // Best effort: a failed prune only leaves records that are no longer needed.
    let _ = prune_attempts(dir, stream.segments).await;
    Ok(etag)
}

/// Drops the `attempts.bin` records of segments below `streamed`: those are recorded in
/// `stream.json` and never sealed again (a part sent again is answered from its ETag), so the
/// nonce guard has nothing left to check for them, and the log each new segment reads stays the
/// size of what is in flight instead of growing with the object.
async fn prune_attempts(dir: &Path, streamed: u64) -> std::io::Result<()> {
    let path = dir.join("attempts.bin");
    let log = tokio::fs::read(&path).await?;
    let kept: Vec<u8> = log
        .chunks_exact(40)
        .filter(|r| u64::from_be_bytes(r[..8].try_into().unwrap_or_default()) >= streamed)
        .flatten()
        .copied()
        .collect();
    if kept.len() == log.len() {
        return Ok(());
    }
    write_atomically(&path, &kept).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_ledger::Hash;
    use archipel_ledger::storage::BucketRecord;
    use archipel_types::{ErasureCode, NodeId, PlacementPolicy};
    use std::collections::BTreeMap;

    const MIB: usize = 1 << 20;
    const SEG: usize = SEGMENT_PLAIN_BYTES as usize;

    /// Segments in memory, by number; fails the segments in `fail`.
    #[derive(Default)]
    struct Memory {
        /// A spool directory that must hold no part whenever a segment is staged.
        watch: Mutex<Option<PathBuf>>,
        segments: Mutex<BTreeMap<u64, Vec<u8>>>,
        fail: Mutex<Vec<u64>>,
        /// Keep-alive writes: (size, segments).
        kept: Mutex<Vec<(u64, usize)>>,
    }

    impl Stager for Memory {
        async fn stage(&self, _: &Staged, segment: u64, plain: &[u8]) -> Result<Vec<ShardHash>, TenantError> {
            if self.fail.lock().unwrap().contains(&segment) {
                return Err(TenantError::Unreachable(format!("segment {segment} failed")));
            }
            if let Some(dir) = self.watch.lock().unwrap().as_ref() {
                let spooled: Vec<String> = std::fs::read_dir(dir)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("part-"))
                    .collect();
                assert!(spooled.is_empty(), "spooled while streaming: {spooled:?}");
            }
            self.segments.lock().unwrap().insert(segment, plain.to_vec());
            Ok(vec![*blake3::hash(plain).as_bytes(); 6])
        }

        async fn keep(&self, _: &Staged, size: u64, segments: Vec<Vec<ShardHash>>) -> Result<(), TenantError> {
            self.kept.lock().unwrap().push((size, segments.len()));
            Ok(())
        }
    }

    impl Memory {
        /// The staged segments' bytes, in order, checked contiguous and full but the last.
        fn object(&self, count: usize) -> Vec<u8> {
            let segs = self.segments.lock().unwrap();
            let mut out = Vec::new();
            for i in 0..count as u64 {
                let s = &segs[&i];
                assert!(i + 1 == count as u64 || s.len() == SEG, "segment {i} has {} bytes", s.len());
                out.extend_from_slice(s);
            }
            out
        }
    }

    fn staged() -> Staged {
        let owner = NodeId([7; 32]);
        Staged {
            bucket: BucketRecord {
                name: "b".into(),
                owner,
                policy: PlacementPolicy::anywhere(ErasureCode::DEFAULT),
                created_height: 1,
                created_ms: 0,
                objects: 0,
                bytes: 0,
                segments: 0,
            },
            key: "k".into(),
            version: Hash([1; 32]),
            nonce: Hash([2; 32]),
            wrapped_key: vec![],
            holders: vec![],
        }
    }

    fn bytes(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn files(dir: &Path, id: &str, prefix: &str) -> Vec<String> {
        std::fs::read_dir(dir.join(id))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    fn md5_etag(parts: &[&str]) -> String {
        let mut all = md5::Md5::new();
        for p in parts {
            all.update(hex::decode(p).unwrap());
        }
        format!("{}-{}", hex::encode(all.finalize()), parts.len())
    }

    #[tokio::test]
    async fn parts_in_order_stream_into_segments_without_spooling() {
        let dir = tempfile::tempdir().unwrap();
        let ups = Uploads::open(dir.path()).unwrap();
        let mem = Arc::new(Memory::default());
        let u = ups.create("b", "k", ObjectMeta::default(), staged()).await.unwrap();
        // rclone's 5 MiB parts: segments straddle parts; the last part is 3 bytes.
        let parts = [bytes(1, 5 * MIB), bytes(2, 5 * MIB), bytes(3, 5 * MIB), bytes(4, 3)];
        let mut etags = vec![];
        for (i, p) in parts.iter().enumerate() {
            etags.push(ups.put_part(&u.id, i as i32 + 1, p.len() as u64, &p[..], &mem).await.unwrap());
            assert!(files(dir.path(), &u.id, "part-").is_empty(), "part {} was spooled", i + 1);
            // At most the carry, under one segment, is kept.
            let carry: u64 = files(dir.path(), &u.id, "carry.")
                .iter()
                .map(|f| std::fs::metadata(dir.path().join(&u.id).join(f)).unwrap().len())
                .sum();
            assert!(carry < SEG as u64);
        }
        assert_eq!(ups.parts(&u.id).await.unwrap().len(), 4);
        let listed: Vec<(i32, String)> =
            etags.iter().enumerate().map(|(i, e)| (i as i32 + 1, format!("\"{e}\""))).collect();
        let done = ups.complete(&ups.hold(&u.id).await.unwrap(), &listed, &mem).await.unwrap();
        let whole = parts.concat();
        assert_eq!(done.size, whole.len() as u64);
        assert_eq!(done.segments.len(), whole.len().div_ceil(SEG));
        assert_eq!(mem.object(done.segments.len()), whole);
        for (i, h) in done.segments.iter().enumerate() {
            assert_eq!(h[0], *blake3::hash(&mem.segments.lock().unwrap()[&(i as u64)]).as_bytes());
        }
        assert_eq!(done.etag, md5_etag(&etags.iter().map(String::as_str).collect::<Vec<_>>()));
    }

    /// A part that would take the object past what its bucket's code holds (its manifest must fit
    /// a holder's 4 MiB) is refused before its body is read, naming the bound; nothing is spooled.
    #[tokio::test]
    async fn a_part_past_the_largest_object_of_the_code_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let ups = Uploads::open(dir.path()).unwrap();
        let mem = Arc::new(Memory::default());
        let u = ups.create("b", "k", ObjectMeta::default(), staged()).await.unwrap();
        let max = archipel_objects::transfer::max_object_bytes(ErasureCode::DEFAULT);
        assert!((160 << 30..180 << 30).contains(&max), "{max}");
        // Declared, never sent: refused before the body is read.
        let e = ups.put_part(&u.id, 1, max + 1, &b""[..], &mem).await.unwrap_err();
        assert!(matches!(e, MultipartError::TooLarge(m) if m == max), "{e}");
        assert!(e.to_string().contains(&max.to_string()), "{e}");
        // A part within the bound goes through; the next counts what came before it.
        ups.put_part(&u.id, 1, 3, &b"abc"[..], &mem).await.unwrap();
        let e = ups.put_part(&u.id, 2, max - 2, &b""[..], &mem).await.unwrap_err();
        assert!(matches!(e, MultipartError::TooLarge(m) if m == max), "{e}");
        assert!(files(dir.path(), &u.id, "part-").is_empty());
    }

    #[tokio::test]
    async fn parts_out_of_order_wait_in_the_spool_and_a_restart_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(Memory::default());
        let parts = [bytes(1, 9 * MIB), bytes(2, 6 * MIB), bytes(3, 7 * MIB), bytes(4, MIB)];
        let (id, e3, e2) = {
            let ups = Uploads::open(dir.path()).unwrap();
            let u = ups.create("b", "k", ObjectMeta::default(), staged()).await.unwrap();
            let e3 = ups.put_part(&u.id, 3, parts[2].len() as u64, &parts[2][..], &mem).await.unwrap();
            let e2 = ups.put_part(&u.id, 2, parts[1].len() as u64, &parts[1][..], &mem).await.unwrap();
            assert_eq!(files(dir.path(), &u.id, "part-").len(), 2);
            assert!(mem.segments.lock().unwrap().is_empty());
            (u.id, e3, e2)
        };
        // Another gateway process over the same spool: part 1 streams, then 2 and 3 from the spool.
        let ups = Uploads::open(dir.path()).unwrap();
        let e1 = ups.put_part(&id, 1, parts[0].len() as u64, &parts[0][..], &mem).await.unwrap();
        assert!(files(dir.path(), &id, "part-").is_empty());
        let e4 = ups.put_part(&id, 4, parts[3].len() as u64, &parts[3][..], &mem).await.unwrap();
        let listed = vec![(1, e1.clone()), (2, e2.clone()), (3, e3.clone()), (4, e4.clone())];
        let done = ups.complete(&ups.hold(&id).await.unwrap(), &listed, &mem).await.unwrap();
        assert_eq!(mem.object(done.segments.len()), parts.concat());
        assert_eq!(done.etag, md5_etag(&[&e1, &e2, &e3, &e4]));
    }

    #[tokio::test]
    async fn a_part_sent_again_is_answered_or_refused_and_failures_leave_nothing_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let ups = Uploads::open(dir.path()).unwrap();
        let mem = Arc::new(Memory::default());
        let u = ups.create("b", "k", ObjectMeta::default(), staged()).await.unwrap();
        let p1 = bytes(1, 10 * MIB);
        let e1 = ups.put_part(&u.id, 1, p1.len() as u64, &p1[..], &mem).await.unwrap();
        // The same bytes again (a client's retry): its ETag. Other bytes: refused.
        assert_eq!(ups.put_part(&u.id, 1, p1.len() as u64, &p1[..], &mem).await.unwrap(), e1);
        let other = bytes(9, 10 * MIB);
        assert!(matches!(
            ups.put_part(&u.id, 1, other.len() as u64, &other[..], &mem).await,
            Err(MultipartError::AlreadyStreamed(1))
        ));
        // A body cut short: nothing recorded; the whole part then goes through.
        let p2 = bytes(2, 20 * MIB);
        assert!(matches!(
            ups.put_part(&u.id, 2, p2.len() as u64, &p2[..12 * MIB], &mem).await,
            Err(MultipartError::Short { .. })
        ));
        assert_eq!(ups.parts(&u.id).await.unwrap().len(), 1);
        // A holder failing: nothing recorded; the same bytes again go through.
        mem.fail.lock().unwrap().push(2);
        assert!(matches!(ups.put_part(&u.id, 2, p2.len() as u64, &p2[..], &mem).await, Err(MultipartError::Stage(_))));
        assert_eq!(ups.parts(&u.id).await.unwrap().len(), 1);
        mem.fail.lock().unwrap().clear();
        let e2 = ups.put_part(&u.id, 2, p2.len() as u64, &p2[..], &mem).await.unwrap();
        let done =
            ups.complete(&ups.hold(&u.id).await.unwrap(), &[(1, e1.clone()), (2, e2.clone())], &mem).await.unwrap();
        assert_eq!(mem.object(done.segments.len()), [p1.clone(), p2.clone()].concat());
        // Completing again (the seal failed, the client retries): the same answer.
        let again = ups.complete(&ups.hold(&u.id).await.unwrap(), &[(1, e1), (2, e2)], &mem).await.unwrap();
        assert_eq!(again.segments, done.segments);
    }

    #[tokio::test]
    async fn a_segment_number_is_never_sealed_with_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let ups = Uploads::open(dir.path()).unwrap();
        let mem = Arc::new(Memory::default());
        let u = ups.create("b", "k", ObjectMeta::default(), staged()).await.unwrap();
        // Segment 0 is sent and fails (the holders may have seen it); part 1 is then sent with
        // other bytes: refused before anything goes out.
        mem.fail.lock().unwrap().push(0);
        let p1 = bytes(1, 20 * MIB);
        assert!(matches!(ups.put_part(&u.id, 1, p1.len() as u64, &p1[..], &mem).await, Err(MultipartError::Stage(_))));
        mem.fail.lock().unwrap().clear();
        let other = bytes(5, 20 * MIB);
        let e = ups.put_part(&u.id, 1, other.len() as u64, &other[..], &mem).await.unwrap_err();
        assert!(matches!(e, MultipartError::Resealed(0)), "{e}");
        // No segment of the other bytes reached the holders (segment 1 of the first attempt may
        // have: it was staging beside segment 0).
        assert!(mem.segments.lock().unwrap().values().all(|v| other.chunks(SEG).all(|c| c != &v[..])));
        // The guard holds in any upload that has the log (kept for the end of this test).
        let log = dir.path().join(&u.id).join("attempts.bin");
        let failed_log = std::fs::read(&log).unwrap();
        // The same bytes as the failed attempt go through.
        ups.put_part(&u.id, 1, p1.len() as u64, &p1[..], &mem).await.unwrap();
        assert_eq!(mem.segments.lock().unwrap()[&0], p1[..SEG]);
        // Recorded: the records of its segments (0 and 1) are dropped, the log does not grow
        // with the object.
        let records = |log: &std::path::Path| -> Vec<u64> {
            std::fs::read(log)
                .unwrap()
                .chunks_exact(40)
                .map(|r| u64::from_be_bytes(r[..8].try_into().unwrap()))
                .collect()
        };
        assert!(records(&log).iter().all(|&i| i >= 2), "{:?}", records(&log));
        // A record torn by a crash (a full disk) is cut off; the log stays aligned and checked.
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, &[0xab; 7]).unwrap();
        let p2 = bytes(2, 9 * MIB);
        ups.put_part(&u.id, 2, p2.len() as u64, &p2[..], &mem).await.unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len() % 40, 0);
        assert!(records(&log).iter().all(|&i| i >= 3), "part 2 recorded: {:?}", records(&log));
        let u2 = ups.create("b", "k2", ObjectMeta::default(), staged()).await.unwrap();
        std::fs::write(dir.path().join(&u2.id).join("attempts.bin"), &failed_log).unwrap();
        let e = ups.put_part(&u2.id, 1, other.len() as u64, &other[..], &mem).await.unwrap_err();
        assert!(matches!(e, MultipartError::Resealed(0)), "{e}");
    }

    #[tokio::test]
    async fn idle_uploads_with_streamed_segments_get_a_keep_alive_write() {
        let dir = tempfile::tempdir().unwrap();
        let ups = Uploads::open(dir.path()).unwrap();
        let mem = Arc::new(Memory::default());
        let idle = ups.create("b", "idle", ObjectMeta::default(), staged()).await.unwrap();
        let p = bytes(1, 17 * MIB);
        ups.put_part(&idle.id, 1, p.len() as u64, &p[..], &mem).await.unwrap();
        let busy = ups.create("b", "busy", ObjectMeta::default(), staged()).await.unwrap();
        ups.put_part(&busy.id, 1, p.len() as u64, &p[..], &mem).await.unwrap();
        // Nothing written for long enough only to "idle"; "empty" has no segment to keep.
        ups.create("b", "empty", ObjectMeta::default(), staged()).await.unwrap();
        let dir_of = dir.path().join(&idle.id);
        let mut stream = load_stream(&dir_of, &idle.id).await.unwrap();
        stream.written_ms -= KEEP_ALIVE_AFTER.as_millis() as u64 + 1;
        save_stream(&dir_of, &stream).await.unwrap();
        assert_eq!(ups.keep_alive(&*mem).await, 1);
        assert_eq!(*mem.kept.lock().unwrap(), [(2 * SEGMENT_PLAIN_BYTES, 2)]);
        // Kept just now: not again.
        assert_eq!(ups.keep_alive(&*mem).await, 0);
    }

    #[tokio::test]
    async fn a_crash_before_the_record_leaves_the_part_to_stream_again() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(Memory::default());
        let parts = [bytes(1, 6 * MIB), bytes(2, 11 * MIB), bytes(3, 2 * MIB)];
        let ups = Uploads::open(dir.path()).unwrap();
        let u = ups.create("b", "k", ObjectMeta::default(), staged()).await.unwrap();
        let e1 = ups.put_part(&u.id, 1, parts[0].len() as u64, &parts[0][..], &mem).await.unwrap();
        let record = dir.path().join(&u.id).join("stream.json");
        let before = std::fs::read(&record).unwrap();
        let carries: Vec<(String, Vec<u8>)> = files(dir.path(), &u.id, "carry.")
            .into_iter()
            .map(|f| {
                let bytes = std::fs::read(dir.path().join(&u.id).join(&f)).unwrap();
                (f, bytes)
            })
            .collect();
        assert_eq!(carries.len(), 1);
        ups.put_part(&u.id, 2, parts[1].len() as u64, &parts[1][..], &mem).await.unwrap();
        // The power went before `stream.json` was written: segments.bin and the carry of part 2
        // are on disk, the record does not name them, and the old carry is still there.
        std::fs::write(&record, &before).unwrap();
        for (f, bytes) in &carries {
            std::fs::write(dir.path().join(&u.id).join(f), bytes).unwrap();
        }
        let ups = Uploads::open(dir.path()).unwrap();
        assert_eq!(ups.parts(&u.id).await.unwrap().len(), 1);
        let e2 = ups.put_part(&u.id, 2, parts[1].len() as u64, &parts[1][..], &mem).await.unwrap();
        let e3 = ups.put_part(&u.id, 3, parts[2].len() as u64, &parts[2][..], &mem).await.unwrap();
        let done = ups.complete(&ups.hold(&u.id).await.unwrap(), &[(1, e1), (2, e2), (3, e3)], &mem).await.unwrap();
        assert_eq!(mem.object(done.segments.len()), parts.concat());
    }

    #[tokio::test]
    async fn objects_of_whole_segments_and_of_nothing_complete() {
        let dir = tempfile::tempdir().unwrap();
        let ups = Uploads::open(dir.path()).unwrap();
        let mem = Arc::new(Memory::default());
        // Two parts making exactly two segments: no carry, no extra segment.
        let u = ups.create("b", "whole", ObjectMeta::default(), staged()).await.unwrap();
        let (a, b) = (bytes(1, SEG + 5 * MIB), bytes(2, SEG - 5 * MIB));
        let ea = ups.put_part(&u.id, 1, a.len() as u64, &a[..], &mem).await.unwrap();
        let eb = ups.put_part(&u.id, 2, b.len() as u64, &b[..], &mem).await.unwrap();
        let done = ups.complete(&ups.hold(&u.id).await.unwrap(), &[(1, ea), (2, eb)], &mem).await.unwrap();
        assert_eq!((done.size, done.segments.len()), (2 * SEG as u64, 2));
        assert_eq!(mem.object(2), [a, b].concat());
        // One empty part: an empty object, no segment.
        let u = ups.create("b", "empty", ObjectMeta::default(), staged()).await.unwrap();
        let e = ups.put_part(&u.id, 1, 0, &b""[..], &mem).await.unwrap();
        let done = ups.complete(&ups.hold(&u.id).await.unwrap(), &[(1, e.clone())], &mem).await.unwrap();
        assert_eq!((done.size, done.segments.len()), (0, 0));
        assert_eq!(done.etag, md5_etag(&[&e]));
    }

    #[tokio::test]
    async fn parts_sent_at_once_all_stream_and_a_number_sent_twice_at_once_stands_once() {
        let dir = tempfile::tempdir().unwrap();
        let ups = Arc::new(Uploads::open(dir.path()).unwrap());
        let mem = Arc::new(Memory::default());
        let u = ups.create("b", "k", ObjectMeta::default(), staged()).await.unwrap();
        // Parts sent at once wait for their turn: none is ever written to the spool.
        *mem.watch.lock().unwrap() = Some(dir.path().join(&u.id));
        let parts: Vec<Vec<u8>> = (0..6).map(|i| bytes(i, 5 * MIB + i as usize)).collect();
        // Six parts at once, as a client's threads send them: some stream, the others wait in
        // the spool and stream in turn; part 3 is also sent a second time with other bytes.
        let mut tasks = tokio::task::JoinSet::new();
        for (i, p) in parts.iter().enumerate() {
            let (ups, mem, id, p) = (ups.clone(), mem.clone(), u.id.clone(), p.clone());
            tasks.spawn(
                async move { (i as i32 + 1, ups.put_part(&id, i as i32 + 1, p.len() as u64, &p[..], &mem).await) },
            );
        }
        let (ups2, mem2, id2) = (ups.clone(), mem.clone(), u.id.clone());
        let twin = tokio::spawn(async move {
            let other = bytes(99, 5 * MIB + 2);
            ups2.put_part(&id2, 3, other.len() as u64, &other[..], &mem2).await
        });
        let mut etags = BTreeMap::new();
        while let Some(r) = tasks.join_next().await {
            let (n, e) = r.unwrap();
            if let Ok(e) = e {
                etags.insert(n, e);
            }
        }
        let twin = twin.await.unwrap();
        // Exactly one of the two part 3s stands; the spool keeps neither.
        assert!(files(dir.path(), &u.id, "part-").is_empty());
        let streamed = ups.parts(&u.id).await.unwrap();
        assert_eq!(streamed.len(), 6);
        let listed: Vec<(i32, String)> = streamed.iter().map(|p| (p.number, p.etag.clone())).collect();
        let done = ups.complete(&ups.hold(&u.id).await.unwrap(), &listed, &mem).await.unwrap();
        // The object holds one of the two, the one the part list names; the other's sender was
        // told so or had its copy replaced (as S3 does), never given the streamed one's ETag.
        let other = bytes(99, 5 * MIB + 2);
        let twin_won = streamed[2].etag == hex::encode(md5::Md5::digest(&other));
        let mut whole = parts.clone();
        if twin_won {
            whole[2] = other;
        }
        assert_eq!(mem.object(done.segments.len()), whole.concat());
        let (winner, loser) =
            if twin_won { (twin.ok(), etags.get(&3).cloned()) } else { (etags.get(&3).cloned(), twin.ok()) };
        assert_eq!(winner.as_deref(), Some(streamed[2].etag.as_str()));
        assert_ne!(loser.as_deref(), Some(streamed[2].etag.as_str()));
        for n in [1, 2, 4, 5, 6] {
            assert_eq!(etags[&n], streamed[n as usize - 1].etag);
        }
    }

    #[tokio::test]
    async fn parts_far_ahead_of_their_turn_are_asked_to_slow_down() {
        let dir = tempfile::tempdir().unwrap();
        let mut ups = Uploads::open(dir.path()).unwrap();
        ups.max_spooled = 3 * MIB as u64;
        let mem = Arc::new(Memory::default());
        let u = ups.create("b", "k", ObjectMeta::default(), staged()).await.unwrap();
        let p = bytes(1, 2 * MIB);
        ups.put_part(&u.id, 3, p.len() as u64, &p[..], &mem).await.unwrap();
        let e = ups.put_part(&u.id, 4, p.len() as u64, &p[..], &mem).await.unwrap_err();
        assert!(matches!(e, MultipartError::SpoolFull { waiting, next: 1 } if waiting == 2 * MIB as u64), "{e}");
        // Sending part 3 again replaces it: it does not count against itself.
        ups.put_part(&u.id, 3, p.len() as u64, &p[..], &mem).await.unwrap();
    }

    #[tokio::test]
    async fn bad_lists_parts_and_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ups = Uploads::open(dir.path()).unwrap();
        let mem = Arc::new(Memory::default());
        let u = ups.create("b", "k", ObjectMeta::default(), staged()).await.unwrap();
        let e1 = ups.put_part(&u.id, 1, 4, &b"abcd"[..], &mem).await.unwrap();
        let e3 = ups.put_part(&u.id, 3, 4, &b"ijkl"[..], &mem).await.unwrap();
        assert!(matches!(ups.complete(&ups.hold(&u.id).await.unwrap(), &[], &mem).await, Err(MultipartError::Empty)));
        assert!(matches!(
            ups.complete(&ups.hold(&u.id).await.unwrap(), &[(3, e3.clone()), (1, e1.clone())], &mem).await,
            Err(MultipartError::InvalidPartOrder)
        ));
        // Part 1 streamed: a list without it, or with another ETag, is refused.
        assert!(matches!(
            ups.complete(&ups.hold(&u.id).await.unwrap(), &[(3, e3.clone())], &mem).await,
            Err(MultipartError::NotListed(1))
        ));
        assert!(matches!(
            ups.complete(&ups.hold(&u.id).await.unwrap(), &[(1, e3.clone())], &mem).await,
            Err(MultipartError::NotListed(1))
        ));
        assert!(matches!(
            ups.complete(&ups.hold(&u.id).await.unwrap(), &[(1, e1.clone()), (2, e3.clone())], &mem).await,
            Err(MultipartError::InvalidPart(2))
        ));
        assert!(matches!(
            ups.complete(&ups.hold(&u.id).await.unwrap(), &[(1, e1.clone()), (3, e3.clone())], &mem).await,
            Err(MultipartError::TooSmall { number: 1, size: 4 })
        ));
        assert!(matches!(ups.put_part(&u.id, 0, 1, &b"x"[..], &mem).await, Err(MultipartError::BadPartNumber(0))));
        assert!(matches!(ups.put_part(&u.id, 10_001, 1, &b"x"[..], &mem).await, Err(MultipartError::BadPartNumber(_))));
        // A spooled body shorter than announced leaves no part behind.
        assert!(matches!(
            ups.put_part(&u.id, 5, 10, &b"short"[..], &mem).await,
            Err(MultipartError::Short { read: 5, size: 10 })
        ));
        assert!(ups.parts(&u.id).await.unwrap().iter().all(|p| p.number != 5));
        assert!(files(dir.path(), &u.id, "").iter().all(|n| !n.ends_with(".tmp")));
        // A single small part is a whole object; the part skipped (2) is no hole: the list decides.
        let u2 = ups.create("b", "k2", ObjectMeta::default(), staged()).await.unwrap();
        let only = ups.put_part(&u2.id, 1, 3, &b"xyz"[..], &mem).await.unwrap();
        let done = ups.complete(&ups.hold(&u2.id).await.unwrap(), &[(1, only)], &mem).await.unwrap();
        assert_eq!((done.size, done.segments.len()), (3, 1));
        // Ids from clients never reach outside the spool.
        for id in ["../etc", "..", "", "ABCDEF0123456789ABCDEF0123456789", &"a".repeat(33)] {
            assert!(matches!(ups.get(id).await, Err(MultipartError::NoSuchUpload(_))), "{id}");
            assert!(matches!(ups.remove(id).await, Err(MultipartError::NoSuchUpload(_))), "{id}");
        }
        ups.remove(&u.id).await.unwrap();
        assert!(matches!(ups.get(&u.id).await, Err(MultipartError::NoSuchUpload(_))));
    }
}
