//! `cargo xtask bench pipeline`: the client's per-segment data path against the bare libraries
//! doing the same work, on one core, in the same run (issue 19).
//!
//! Four pairs, each over every segment of a 256 MiB object (32 segments of 8 MiB ciphertext,
//! code 4+2), in `ROUNDS` rounds that alternate which side goes first, after an untimed warm-up
//! round (both sides' GET outputs are compared with the plaintext, and both encoders' parity
//! shards with each other, so both sides do the same work):
//! - **PUT**: copy the plaintext into the segment buffer, AES-256-GCM (ring) in place, Reed–Solomon
//!   4+2 (reed-solomon-simd), BLAKE3 of all six shards. Ours is `SegmentSealer::seal`.
//! - **GET** with two data shards lost: BLAKE3 of the four shards read, decode, AES-GCM open. Ours
//!   is `SegmentOpener::open`.
//! - **RS encode** and **RS decode** (two data shards lost) alone: ours is `archipel_erasure`.
//!
//! Every segment of every round is timed, none skipped; a figure is total plaintext bytes over
//! total time, with the per-segment p50 and p99. Goal (issue 19): ours ≥ 0.9× the bare libraries
//! for each pair. A memcpy of the same bytes is printed for scale.

use crate::figures::SortedMs;
use anyhow::{Result, bail};
use archipel_crypto::{DataKey, TAG_BYTES};
use archipel_erasure::{Decoder, Encoder};
use archipel_objects::{SEGMENT_BYTES, SEGMENT_PLAIN_BYTES, SegmentOpener, SegmentSealer, shard_hash};
use archipel_types::ErasureCode;
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use std::hint::black_box;
use std::time::{Duration, Instant};

const SEGMENTS: usize = 32;
/// Timed rounds (even, so each side goes first equally often), after one untimed warm-up round.
const ROUNDS: usize = 6;
const GOAL: f64 = 0.9;
const K: usize = 4;
const M: usize = 2;
const LOST: [usize; 2] = [0, 2];

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Per-segment times of one side.
#[derive(Default)]
struct Side {
    times: Vec<Duration>,
}

impl Side {
    fn time<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = black_box(f());
        self.times.push(t.elapsed());
        r
    }

    fn gib_per_s(&self, bytes_per_op: usize) -> f64 {
        let total: Duration = self.times.iter().sum();
        (bytes_per_op * self.times.len()) as f64 / total.as_secs_f64() / (1u64 << 30) as f64
    }

    fn percentiles(&self) -> (f64, f64) {
        let s = SortedMs::new(self.times.iter().map(|d| d.as_secs_f64() * 1e3).collect());
        (s.percentile(0.50), s.percentile(0.99))
    }
}

fn nonce(index: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[NONCE_LEN - 8..].copy_from_slice(&index.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The bare libraries' PUT of one segment.
fn bare_put(key: &LessSafeKey, rs: &mut ReedSolomonEncoder, index: u64, plain: &[u8], buf: &mut Vec<u8>) -> [u8; 32] {
    buf.clear();
    buf.extend_from_slice(plain);
    let tag = key.seal_in_place_separate_tag(nonce(index), Aad::from(index.to_be_bytes()), buf).expect("seal");
    buf.extend_from_slice(tag.as_ref());
    let shard = buf.len().div_ceil(K).div_ceil(64) * 64;
    buf.resize(shard * K, 0);
    rs.reset(K, M, shard).expect("reset");
    for s in buf.chunks_exact(shard) {
        rs.add_original_shard(s).expect("add");
    }
    let result = rs.encode().expect("encode");
    let mut acc = [0u8; 32];
    for s in buf.chunks_exact(shard).chain(result.recovery_iter()) {
        acc[0] ^= blake3::hash(s).as_bytes()[0];
    }
    acc
}

/// The bare libraries' GET of one segment from shards 1, 3, 4, 5.
fn bare_get(
    key: &LessSafeKey,
    rs: &mut ReedSolomonDecoder,
    index: u64,
    shards: &[Vec<u8>],
    hashes: &[[u8; 32]],
) -> Vec<u8> {
    let shard = shards[0].len();
    for i in (0..K + M).filter(|i| !LOST.contains(i)) {
        assert_eq!(*blake3::hash(&shards[i]).as_bytes(), hashes[i]);
    }
    rs.reset(K, M, shard).expect("reset");
    for i in (0..K + M).filter(|i| !LOST.contains(i)) {
        if i < K {
            rs.add_original_shard(i, &shards[i]).expect("add");
        } else {
            rs.add_recovery_shard(i - K, &shards[i]).expect("add");
        }
    }
    let restored = rs.decode().expect("decode");
    let mut out = Vec::with_capacity(K * shard);
    for (i, own) in shards.iter().enumerate().take(K) {
        out.extend_from_slice(restored.restored_original(i).unwrap_or(own));
    }
    out.truncate(SEGMENT_BYTES as usize);
    let len = key.open_in_place(nonce(index), Aad::from(index.to_be_bytes()), &mut out).expect("open").len();
    out.truncate(len);
    out
}

/// One segment's shards and their hashes.
type Segment = (Vec<Vec<u8>>, Vec<[u8; 32]>);

struct Pair {
    name: &'static str,
    bare: Side,
    ours: Side,
}

impl Pair {
    fn new(name: &'static str) -> Self {
        Pair { name, bare: Side::default(), ours: Side::default() }
    }
}

/// Runs the benchmark and prints its table; fails if a pair misses the goal.
pub fn bench() -> Result<()> {
    let plain_len = SEGMENT_PLAIN_BYTES as usize;
    let object = random_bytes(plain_len * SEGMENTS, 19);
    let code = ErasureCode::new(K as u8, M as u8)?;
    let key_bytes = [7u8; 32];
    let data_key = DataKey::from_bytes(key_bytes);
    let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key_bytes).expect("key"));
    let object_id = [1u8; 32];

    // Shards of every segment for the GET side, made once by our own sealer.
    let mut sealer = SegmentSealer::new(&data_key, &object_id, code);
    let mut sealed_segments: Vec<Segment> = Vec::with_capacity(SEGMENTS);
    let mut bare_segments: Vec<Segment> = Vec::with_capacity(SEGMENTS);
    let mut bare_rs = ReedSolomonEncoder::new(K, M, 64).expect("encoder");
    for (i, plain) in object.chunks(plain_len).enumerate() {
        let mut buf = Vec::with_capacity(SEGMENT_BYTES as usize);
        buf.extend_from_slice(plain);
        let sealed = sealer.seal(i as u64, &mut buf)?;
        let shards: Vec<Vec<u8>> = (0..K + M).map(|s| sealed.shard(s).unwrap_or_default().to_vec()).collect();
        sealed_segments.push((shards, sealed.hashes.clone()));
        // The bare GET opens segments sealed with its own associated data.
        let mut bare_buf = Vec::with_capacity(SEGMENT_BYTES as usize);
        bare_put(&ring_key, &mut bare_rs, i as u64, plain, &mut bare_buf);
        let shard = bare_buf.len() / K;
        let mut shards: Vec<Vec<u8>> = bare_buf.chunks_exact(shard).map(<[u8]>::to_vec).collect();
        bare_rs.reset(K, M, shard).expect("reset");
        for s in &shards {
            bare_rs.add_original_shard(s).expect("add");
        }
        let parity: Vec<Vec<u8>> = bare_rs.encode().expect("encode").recovery_iter().map(<[u8]>::to_vec).collect();
        shards.extend(parity);
        let hashes = shards.iter().map(|s| shard_hash(s)).collect();
        bare_segments.push((shards, hashes));
    }

    let mut put = Pair::new("PUT: copy + AES-256-GCM + RS 4+2 + BLAKE3 x6");
    let mut get = Pair::new("GET, 2 data shards lost: BLAKE3 x4 + RS decode + AES-GCM open");
    let mut enc = Pair::new("RS 4+2 encode, 8 MiB segments");
    let mut dec = Pair::new("RS 4+2 decode, 2 data shards lost");
    let mut memcpy = Side::default();

    let mut buf = Vec::with_capacity(SEGMENT_BYTES as usize);
    let mut opener = SegmentOpener::new(&data_key, &object_id, code);
    let mut bare_dec = ReedSolomonDecoder::new(K, M, 64).expect("decoder");
    let mut our_enc = Encoder::new(code);
    let mut our_dec = Decoder::new(code);
    let cipher_segment = random_bytes(SEGMENT_BYTES as usize, 3);
    let mut copy_dst = vec![0u8; plain_len];

    // Both sides encode the same segment to the same parity shards (untimed).
    {
        let mut ours = cipher_segment.clone();
        let encoded = our_enc.encode(&mut ours)?;
        let shard = cipher_segment.len() / K;
        bare_rs.reset(K, M, shard).expect("reset");
        for s in cipher_segment.chunks_exact(shard) {
            bare_rs.add_original_shard(s).expect("add");
        }
        let bare = bare_rs.encode().expect("encode");
        for p in 0..M {
            if encoded.shard(K + p) != bare.recovery(p) {
                bail!("our Reed-Solomon parity shard {p} differs from the bare library's");
            }
        }
    }

    // Round 0 warms both sides up (page faults, work buffers) and is not counted.
    for round in 0..=ROUNDS {
        if round == 1 {
            for pair in [&mut put, &mut get, &mut enc, &mut dec] {
                pair.bare.times.clear();
                pair.ours.times.clear();
            }
            memcpy.times.clear();
        }
        let ours_first = round % 2 == 1;
        for side in [ours_first, !ours_first] {
            for (i, plain) in object.chunks(plain_len).enumerate() {
                let index = i as u64;
                if side {
                    put.ours.time(|| {
                        buf.clear();
                        buf.extend_from_slice(plain);
                        sealer.seal(index, &mut buf).map(|s| s.hashes[0][0])
                    })?;
                } else {
                    put.bare.time(|| bare_put(&ring_key, &mut bare_rs, index, plain, &mut buf));
                }
            }
            for i in 0..SEGMENTS {
                let index = i as u64;
                if side {
                    let (shards, hashes) = &sealed_segments[i];
                    let given: Vec<(usize, &[u8])> =
                        (0..K + M).filter(|s| !LOST.contains(s)).map(|s| (s, shards[s].as_slice())).collect();
                    let (plain, bad) = get.ours.time(|| opener.open(index, plain_len, &given, hashes))?;
                    if !bad.is_empty() || plain != object[i * plain_len..(i + 1) * plain_len] {
                        bail!("our GET of segment {i} did not give its plaintext back");
                    }
                } else {
                    let (shards, hashes) = &bare_segments[i];
                    let plain = get.bare.time(|| bare_get(&ring_key, &mut bare_dec, index, shards, hashes));
                    if plain != object[i * plain_len..(i + 1) * plain_len] {
                        bail!("the bare GET of segment {i} did not give its plaintext back");
                    }
                }
            }
            for (shards, _) in &sealed_segments {
                if side {
                    enc.ours.time(|| {
                        buf.clear();
                        buf.extend_from_slice(&cipher_segment);
                        our_enc.encode(&mut buf).map(|e| e.shard(K).map(|s| s[0]))
                    })?;
                    let given: Vec<(usize, &[u8])> =
                        (0..K + M).filter(|s| !LOST.contains(s)).map(|s| (s, shards[s].as_slice())).collect();
                    dec.ours.time(|| our_dec.decode(SEGMENT_BYTES as usize, &given).map(|v| v.len()))?;
                } else {
                    enc.bare.time(|| {
                        buf.clear();
                        buf.extend_from_slice(&cipher_segment);
                        let shard = buf.len() / K;
                        bare_rs.reset(K, M, shard).expect("reset");
                        for s in buf.chunks_exact(shard) {
                            bare_rs.add_original_shard(s).expect("add");
                        }
                        bare_rs.encode().expect("encode").recovery(0).map(|s| s[0])
                    });
                    dec.bare.time(|| {
                        let shard = shards[0].len();
                        bare_dec.reset(K, M, shard).expect("reset");
                        for s in (0..K + M).filter(|s| !LOST.contains(s)) {
                            if s < K {
                                bare_dec.add_original_shard(s, &shards[s]).expect("add");
                            } else {
                                bare_dec.add_recovery_shard(s - K, &shards[s]).expect("add");
                            }
                        }
                        let restored = bare_dec.decode().expect("decode");
                        let mut out = Vec::with_capacity(K * shard);
                        for (s, own) in shards.iter().enumerate().take(K) {
                            out.extend_from_slice(restored.restored_original(s).unwrap_or(own));
                        }
                        out.len()
                    });
                }
            }
        }
        for plain in object.chunks(plain_len) {
            memcpy.time(|| {
                copy_dst.copy_from_slice(plain);
                copy_dst[0]
            });
        }
    }

    println!(
        "\n== pipeline: one core, {SEGMENTS} segments of {} MiB (ciphertext) x {ROUNDS} rounds, code 4+2, every segment timed",
        SEGMENT_BYTES >> 20
    );
    println!(
        "{:<64} {:>9} {:>9} {:>7} {:>15} {:>15}",
        "step", "bare GiB/s", "ours", "ratio", "bare p50/p99 ms", "ours p50/p99 ms"
    );
    let mut missed = vec![];
    for pair in [&put, &get, &enc, &dec] {
        let bytes = if pair.name.starts_with("RS") { SEGMENT_BYTES as usize } else { plain_len };
        let (b, o) = (pair.bare.gib_per_s(bytes), pair.ours.gib_per_s(bytes));
        let ratio = o / b;
        let (bp50, bp99) = pair.bare.percentiles();
        let (op50, op99) = pair.ours.percentiles();
        let verdict = if ratio >= GOAL { "met" } else { "NOT met" };
        println!(
            "{:<64} {b:>9.2} {o:>9.2} {ratio:>6.2}x {:>15} {:>15}  goal >= {GOAL}x: {verdict}",
            pair.name,
            format!("{bp50:.2}/{bp99:.2}"),
            format!("{op50:.2}/{op99:.2}")
        );
        if ratio < GOAL {
            missed.push(pair.name);
        }
    }
    println!("{:<64} {:>9.2}", "memcpy of the plaintext (scale)", memcpy.gib_per_s(plain_len));
    println!(
        "(ours adds per segment: the segment's object id and index in the AES-GCM associated data, and the hash list as a Vec; \
         the tag is {TAG_BYTES} bytes)"
    );
    if !missed.is_empty() {
        bail!("pipeline goal (>= {GOAL}x the bare libraries) missed by: {}", missed.join("; "));
    }
    Ok(())
}
