//! Segments and Reed–Solomon shards of object data, with memory bounded by one segment.
//!
//! An object is cut into fixed-size segments ([`Segments`]); each segment (already encrypted by
//! the caller) is split into k data shards and extended with m parity shards by
//! [reed-solomon-simd](https://docs.rs/reed-solomon-simd). Any k of the k+m shards give the
//! segment back.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and spawns nothing. It works on
//! buffers the caller owns, so a pipeline holds a few segments whatever the object's size.
//!
//! Shard sizes are rounded up to [`SHARD_ALIGN`] bytes: reed-solomon-simd works in 64-byte
//! blocks, and with 8 MiB segments of code 4+2 every shard then starts on a page boundary of the
//! segment buffer (glibc's `rep movsb` copies run far slower at unlucky page offsets on this CPU,
//! see ARCHITECTURE.md).

use archipel_types::ErasureCode;
use reed_solomon_simd::{EncoderResult, ReedSolomonDecoder, ReedSolomonEncoder};
use std::ops::Range;

/// Shard sizes are multiples of this many bytes.
pub const SHARD_ALIGN: usize = archipel_types::SHARD_ALIGN as usize;
/// Largest segment accepted (encrypted bytes).
pub const MAX_SEGMENT_BYTES: usize = 64 << 20;

/// Errors from encoding or decoding a segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErasureError {
    /// Fewer than k usable shards.
    #[error("segment unrecoverable: {have} of the {need} shards it needs are available")]
    NotEnoughShards {
        /// Usable shards given.
        have: usize,
        /// Shards needed (k).
        need: usize,
    },
    /// A shard of the wrong length (truncated, padded or from another segment).
    #[error("shard {index} is {got} bytes, expected {want}")]
    ShardSize {
        /// Shard index.
        index: usize,
        /// Its length.
        got: usize,
        /// The length this segment's shards have.
        want: usize,
    },
    /// A shard index outside 0..k+m, or given twice.
    #[error("shard index {index} is out of range or repeated (code {code})")]
    ShardIndex {
        /// The index.
        index: usize,
        /// The code.
        code: ErasureCode,
    },
    /// A segment that is empty or larger than [`MAX_SEGMENT_BYTES`].
    #[error("segment of {0} bytes: a segment holds 1 to {MAX_SEGMENT_BYTES} bytes")]
    SegmentSize(usize),
    /// The Reed–Solomon library refused the input (a bug here if it ever happens).
    #[error("reed-solomon: {0}")]
    Codec(String),
}

fn codec(e: reed_solomon_simd::Error) -> ErasureError {
    ErasureError::Codec(e.to_string())
}

/// Bytes in each shard of a segment of `segment_len` bytes under `code`.
pub fn shard_bytes(code: ErasureCode, segment_len: usize) -> usize {
    // Segments are at most MAX_SEGMENT_BYTES, so the size fits usize on every platform.
    code.shard_bytes(segment_len as u64) as usize
}

fn check_segment(len: usize) -> Result<(), ErasureError> {
    if len == 0 || len > MAX_SEGMENT_BYTES { Err(ErasureError::SegmentSize(len)) } else { Ok(()) }
}

/// How an object of a given length is cut into segments: all of `segment_bytes` except a shorter
/// last one. An empty object has no segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segments {
    /// The object's length in bytes.
    pub object_len: u64,
    /// Length of every segment but the last.
    pub segment_bytes: u64,
}

impl Segments {
    /// The segmenting of an object of `object_len` bytes (`segment_bytes` must be non-zero).
    pub fn new(object_len: u64, segment_bytes: u64) -> Self {
        Segments { object_len, segment_bytes: segment_bytes.max(1) }
    }

    /// Number of segments.
    pub fn count(&self) -> u64 {
        self.object_len.div_ceil(self.segment_bytes)
    }

    /// The object bytes of segment `index` (empty past the end).
    pub fn range(&self, index: u64) -> Range<u64> {
        let start = index.saturating_mul(self.segment_bytes).min(self.object_len);
        start..start.saturating_add(self.segment_bytes).min(self.object_len)
    }

    /// The segments holding the object bytes `range` (for range reads), clamped to the object.
    pub fn covering(&self, range: Range<u64>) -> Range<u64> {
        let end = range.end.min(self.object_len);
        if range.start >= end {
            return 0..0;
        }
        range.start / self.segment_bytes..end.div_ceil(self.segment_bytes)
    }
}

/// A segment's shards, borrowed from the segment buffer (data shards) and the encoder (parity).
pub struct Encoded<'a> {
    data: &'a [u8],
    shard_bytes: usize,
    parity: EncoderResult<'a>,
}

impl Encoded<'_> {
    /// Bytes per shard.
    pub fn shard_bytes(&self) -> usize {
        self.shard_bytes
    }

    /// Shard `index` (data shards first, then parity); `None` past k+m.
    pub fn shard(&self, index: usize) -> Option<&[u8]> {
        let k = self.data.len() / self.shard_bytes;
        if index < k {
            Some(&self.data[index * self.shard_bytes..(index + 1) * self.shard_bytes])
        } else {
            self.parity.recovery(index - k)
        }
    }
}

/// Encodes segments of one code, reusing its work buffers from segment to segment.
pub struct Encoder {
    code: ErasureCode,
    rs: Option<ReedSolomonEncoder>,
}

impl Encoder {
    /// An encoder for `code`.
    pub fn new(code: ErasureCode) -> Self {
        Encoder { code, rs: None }
    }

    /// Splits `segment` into shards: pads it with zeros in place to k whole shards (reserve
    /// `k * shard_bytes` to avoid a reallocation), then computes the m parity shards.
    pub fn encode<'a>(&'a mut self, segment: &'a mut Vec<u8>) -> Result<Encoded<'a>, ErasureError> {
        check_segment(segment.len())?;
        let k = usize::from(self.code.data);
        let m = usize::from(self.code.parity);
        let shard_bytes = shard_bytes(self.code, segment.len());
        segment.resize(k * shard_bytes, 0);
        let rs = match &mut self.rs {
            Some(rs) => {
                rs.reset(k, m, shard_bytes).map_err(codec)?;
                rs
            }
            slot => slot.insert(ReedSolomonEncoder::new(k, m, shard_bytes).map_err(codec)?),
        };
        for shard in segment.chunks_exact(shard_bytes) {
            rs.add_original_shard(shard).map_err(codec)?;
        }
        let parity = rs.encode().map_err(codec)?;
        Ok(Encoded { data: segment, shard_bytes, parity })
    }
}

/// Decodes segments of one code from any k of their shards.
pub struct Decoder {
    code: ErasureCode,
    rs: Option<ReedSolomonDecoder>,
}

impl Decoder {
    /// A decoder for `code`.
    pub fn new(code: ErasureCode) -> Self {
        Decoder { code, rs: None }
    }

    /// Checks the shards' indices and lengths and keeps the first k of them, data shards first.
    fn usable<'s>(
        &self,
        segment_len: usize,
        shards: &[(usize, &'s [u8])],
    ) -> Result<Vec<(usize, &'s [u8])>, ErasureError> {
        check_segment(segment_len)?;
        let want = shard_bytes(self.code, segment_len);
        let mut seen = vec![false; self.code.total()];
        for &(index, shard) in shards {
            if index >= seen.len() || seen[index] {
                return Err(ErasureError::ShardIndex { index, code: self.code });
            }
            seen[index] = true;
            if shard.len() != want {
                return Err(ErasureError::ShardSize { index, got: shard.len(), want });
            }
        }
        let k = usize::from(self.code.data);
        let mut usable = shards.to_vec();
        usable.sort_by_key(|(index, _)| *index);
        if usable.len() < k {
            return Err(ErasureError::NotEnoughShards { have: usable.len(), need: k });
        }
        usable.truncate(k);
        Ok(usable)
    }

    /// The segment of `segment_len` bytes from at least k of its shards (`(index, bytes)`, in any
    /// order). With all k data shards it only copies them out; otherwise it decodes.
    pub fn decode(&mut self, segment_len: usize, shards: &[(usize, &[u8])]) -> Result<Vec<u8>, ErasureError> {
        let usable = self.usable(segment_len, shards)?;
        let k = usize::from(self.code.data);
        let m = usize::from(self.code.parity);
        let shard_bytes = shard_bytes(self.code, segment_len);
        let mut out = Vec::with_capacity(k * shard_bytes);
        if usable.iter().enumerate().all(|(i, (index, _))| i == *index) {
            for (_, shard) in &usable {
                out.extend_from_slice(shard);
            }
            out.truncate(segment_len);
            return Ok(out);
        }
        let rs = match &mut self.rs {
            Some(rs) => {
                rs.reset(k, m, shard_bytes).map_err(codec)?;
                rs
            }
            slot => slot.insert(ReedSolomonDecoder::new(k, m, shard_bytes).map_err(codec)?),
        };
        for &(index, shard) in &usable {
            if index < k {
                rs.add_original_shard(index, shard).map_err(codec)?;
            } else {
                rs.add_recovery_shard(index - k, shard).map_err(codec)?;
            }
        }
        let restored = rs.decode().map_err(codec)?;
        for index in 0..k {
            let shard = match usable.iter().find(|(i, _)| *i == index) {
                Some((_, shard)) => *shard,
                None => restored
                    .restored_original(index)
                    .ok_or_else(|| ErasureError::Codec(format!("data shard {index} was not restored")))?,
            };
            out.extend_from_slice(shard);
        }
        out.truncate(segment_len);
        Ok(out)
    }

    /// Rebuilds the shards `wanted` of a segment from at least k of its others (repair): decodes
    /// the segment, then encodes it again with `encoder`.
    pub fn rebuild(
        &mut self,
        encoder: &mut Encoder,
        segment_len: usize,
        shards: &[(usize, &[u8])],
        wanted: &[usize],
    ) -> Result<Vec<(usize, Vec<u8>)>, ErasureError> {
        if encoder.code != self.code {
            return Err(ErasureError::Codec(format!("encoder code {} for a {} segment", encoder.code, self.code)));
        }
        if let Some(&index) = wanted.iter().find(|&&i| i >= self.code.total()) {
            return Err(ErasureError::ShardIndex { index, code: self.code });
        }
        let mut segment = self.decode(segment_len, shards)?;
        let encoded = encoder.encode(&mut segment)?;
        wanted
            .iter()
            .map(|&index| {
                encoded
                    .shard(index)
                    .map(|s| (index, s.to_vec()))
                    .ok_or(ErasureError::ShardIndex { index, code: self.code })
            })
            .collect()
    }
}

impl std::fmt::Debug for Encoded<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoded").field("data_bytes", &self.data.len()).field("shard_bytes", &self.shard_bytes).finish()
    }
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("code", &self.code).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").field("code", &self.code).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
    }

    fn shards_of(code: ErasureCode, segment: &[u8]) -> Vec<Vec<u8>> {
        let mut enc = Encoder::new(code);
        let mut buf = segment.to_vec();
        let e = enc.encode(&mut buf).unwrap();
        (0..code.total()).map(|i| e.shard(i).unwrap().to_vec()).collect()
    }

    #[test]
    fn shard_sizes_are_aligned_and_cover_the_segment() {
        let c = ErasureCode::DEFAULT;
        assert_eq!(shard_bytes(c, 1), 64);
        assert_eq!(shard_bytes(c, 256), 64);
        assert_eq!(shard_bytes(c, 257), 128);
        assert_eq!(shard_bytes(c, 8 << 20), 2 << 20);
        for len in [1, 63, 64, 1000, 4096 + 16, 8 << 20] {
            for code in [ErasureCode::DEFAULT, ErasureCode::new(10, 4).unwrap(), ErasureCode::new(32, 16).unwrap()] {
                let s = shard_bytes(code, len);
                assert!(
                    s.is_multiple_of(SHARD_ALIGN)
                        && s * usize::from(code.data) >= len
                        && s * usize::from(code.data) < len + SHARD_ALIGN * usize::from(code.data)
                );
            }
        }
    }

    #[test]
    fn segments_cut_an_object_and_cover_ranges() {
        let s = Segments::new(10, 4);
        assert_eq!(s.count(), 3);
        assert_eq!((s.range(0), s.range(2), s.range(3)), (0..4, 8..10, 10..10));
        assert_eq!(s.covering(3..9), 0..3);
        assert_eq!(s.covering(4..8), 1..2);
        assert_eq!(s.covering(9..100), 2..3);
        assert_eq!(s.covering(10..20), 0..0);
        assert_eq!(Segments::new(0, 4).count(), 0);
        assert_eq!(Segments::new(u64::MAX, 8 << 20).range(u64::MAX), u64::MAX..u64::MAX);
    }

    #[test]
    fn too_few_shards_is_unrecoverable_never_wrong_bytes() {
        let code = ErasureCode::DEFAULT;
        let seg = bytes(5000, 1);
        let shards = shards_of(code, &seg);
        let three: Vec<(usize, &[u8])> = [1, 4, 5].iter().map(|&i| (i, shards[i].as_slice())).collect();
        assert_eq!(
            Decoder::new(code).decode(seg.len(), &three),
            Err(ErasureError::NotEnoughShards { have: 3, need: 4 })
        );
        let err = Decoder::new(code).decode(seg.len(), &three).unwrap_err().to_string();
        assert!(err.contains("unrecoverable"), "{err}");
    }

    #[test]
    fn bad_shards_are_named() {
        let code = ErasureCode::DEFAULT;
        let seg = bytes(5000, 2);
        let shards = shards_of(code, &seg);
        let mut d = Decoder::new(code);
        let short = &shards[2][..100];
        let given = [(0, shards[0].as_slice()), (1, shards[1].as_slice()), (2, short), (3, shards[3].as_slice())];
        assert!(matches!(d.decode(seg.len(), &given), Err(ErasureError::ShardSize { index: 2, got: 100, .. })));
        let twice = [(0, shards[0].as_slice()), (0, shards[0].as_slice()), (1, shards[1].as_slice())];
        assert!(matches!(d.decode(seg.len(), &twice), Err(ErasureError::ShardIndex { index: 0, .. })));
        let beyond = [(6, shards[0].as_slice())];
        assert!(matches!(d.decode(seg.len(), &beyond), Err(ErasureError::ShardIndex { index: 6, .. })));
        assert_eq!(d.decode(0, &[]), Err(ErasureError::SegmentSize(0)));
        assert!(Encoder::new(code).encode(&mut vec![]).is_err());
        assert!(Encoder::new(code).encode(&mut vec![0; MAX_SEGMENT_BYTES + 1]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any k of the k+m shards give the segment back, and a rebuilt shard equals the original.
        #[test]
        fn any_k_shards_decode(len in 1usize..20_000, k in 1u8..=8, m in 1u8..=4, seed: u8, pick: u64) {
            let code = ErasureCode::new(k, m).unwrap();
            let seg = bytes(len, seed);
            let shards = shards_of(code, &seg);
            // A pseudo-random subset of exactly k indices.
            let mut order: Vec<usize> = (0..code.total()).collect();
            let mut x = pick | 1;
            for i in (1..order.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                order.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let (keep, lost) = order.split_at(usize::from(k));
            let given: Vec<(usize, &[u8])> = keep.iter().map(|&i| (i, shards[i].as_slice())).collect();
            let mut dec = Decoder::new(code);
            prop_assert_eq!(dec.decode(len, &given).unwrap(), seg.clone());
            let rebuilt = dec.rebuild(&mut Encoder::new(code), len, &given, lost).unwrap();
            for (index, shard) in rebuilt {
                prop_assert_eq!(&shard, &shards[index]);
            }
        }
    }
}
