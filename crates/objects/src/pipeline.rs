//! Per-segment PUT and GET work: encrypt, erasure-code and hash a segment; check, decode and
//! decrypt it back.
//!
//! A segment holds [`SEGMENT_PLAIN_BYTES`] of plaintext (the last one fewer), so that with its
//! 16-byte tag it is exactly [`SEGMENT_BYTES`] (8 MiB) of ciphertext: with code 4+2 every shard
//! is then 2 MiB and starts on a page boundary of the segment buffer.
//!
//! Shards are identified by the BLAKE3 hash of their bytes. Every shard read back is hashed and
//! compared with the manifest's hash before it is used, so a holder that serves corrupt, truncated
//! or made-up bytes is caught here, and decoding only ever sees good shards: a GET returns the
//! right bytes or an error, never wrong bytes.

use archipel_crypto::{DataKey, ObjectCipher, ObjectCryptoError, TAG_BYTES};
use archipel_erasure::{Decoder, Encoded, Encoder, ErasureError, shard_bytes};
use archipel_types::ErasureCode;

/// Ciphertext bytes of a full segment.
pub const SEGMENT_BYTES: u64 = 8 << 20;
/// Plaintext bytes of a full segment.
pub const SEGMENT_PLAIN_BYTES: u64 = SEGMENT_BYTES - TAG_BYTES as u64;

/// The BLAKE3 hash of a shard's bytes.
pub type ShardHash = [u8; 32];

/// The hash a shard is known by.
pub fn shard_hash(shard: &[u8]) -> ShardHash {
    *blake3::hash(shard).as_bytes()
}

/// Errors of the object pipeline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// Too few good shards to rebuild a segment.
    #[error(
        "segment {segment} is unrecoverable: {good} good shards of the {need} needed ({bad} failed their hash check)"
    )]
    Unrecoverable {
        /// Segment index.
        segment: u64,
        /// Shards that passed their hash check.
        good: usize,
        /// Shards needed (k).
        need: usize,
        /// Shards that failed it.
        bad: usize,
    },
    /// A manifest whose shard hash list does not match its code.
    #[error("segment {segment} lists {got} shard hashes, its code {code} has {want} shards")]
    HashCount {
        /// Segment index.
        segment: u64,
        /// Listed.
        got: usize,
        /// k+m.
        want: usize,
        /// The code.
        code: ErasureCode,
    },
    /// Erasure coding refused the segment.
    #[error(transparent)]
    Erasure(#[from] ErasureError),
    /// Encryption or authentication failed.
    #[error(transparent)]
    Crypto(#[from] ObjectCryptoError),
}

/// The PUT side of one object: seals its segments one after another, reusing its buffers.
#[derive(Debug)]
pub struct SegmentSealer {
    cipher: ObjectCipher,
    encoder: Encoder,
    code: ErasureCode,
}

/// A sealed segment: its k+m shards (borrowed from the segment buffer and the sealer) and their
/// hashes.
#[derive(Debug)]
pub struct SealedSegment<'a> {
    encoded: Encoded<'a>,
    /// The hash of each shard, in shard order.
    pub hashes: Vec<ShardHash>,
    /// Ciphertext bytes of the segment (before padding to whole shards).
    pub cipher_len: usize,
}

impl SealedSegment<'_> {
    /// Shard `index`.
    pub fn shard(&self, index: usize) -> Option<&[u8]> {
        self.encoded.shard(index)
    }

    /// Bytes of every shard.
    pub fn shard_bytes(&self) -> usize {
        self.encoded.shard_bytes()
    }
}

impl SegmentSealer {
    /// The sealer of object `object` under `key` and `code`.
    pub fn new(key: &DataKey, object: &[u8; 32], code: ErasureCode) -> Self {
        SegmentSealer { cipher: ObjectCipher::new(key, object), encoder: Encoder::new(code), code }
    }

    /// Room a segment buffer of `plain_len` bytes needs so that sealing never reallocates it.
    pub fn buffer_capacity(&self, plain_len: usize) -> usize {
        let cipher_len = plain_len + TAG_BYTES;
        (cipher_len).max(shard_bytes(self.code, cipher_len) * usize::from(self.code.data))
    }

    /// Seals segment `index`, whose plaintext is in `buf`: encrypts it in place, splits it into
    /// shards and hashes each one. `buf` is consumed as the data shards' storage.
    pub fn seal<'a>(&'a mut self, index: u64, buf: &'a mut Vec<u8>) -> Result<SealedSegment<'a>, ObjectError> {
        self.cipher.seal(index, buf)?;
        let cipher_len = buf.len();
        let encoded = self.encoder.encode(buf)?;
        let hashes = (0..self.code.total()).map(|i| shard_hash(encoded.shard(i).unwrap_or_default())).collect();
        Ok(SealedSegment { encoded, hashes, cipher_len })
    }
}

/// The GET side of one object.
#[derive(Debug)]
pub struct SegmentOpener {
    cipher: ObjectCipher,
    decoder: Decoder,
    code: ErasureCode,
}

impl SegmentOpener {
    /// The opener of object `object` under `key` and `code`.
    pub fn new(key: &DataKey, object: &[u8; 32], code: ErasureCode) -> Self {
        SegmentOpener { cipher: ObjectCipher::new(key, object), decoder: Decoder::new(code), code }
    }

    /// The plaintext of segment `index` (`plain_len` bytes) from shards read back: each is
    /// hashed against `hashes` (the manifest's, in shard order) and dropped if it differs; the
    /// good ones are decoded and decrypted. Returns the plaintext and the indices of the shards
    /// that failed their check (to report their holders).
    pub fn open(
        &mut self,
        index: u64,
        plain_len: usize,
        shards: &[(usize, &[u8])],
        hashes: &[ShardHash],
    ) -> Result<(Vec<u8>, Vec<usize>), ObjectError> {
        if hashes.len() != self.code.total() {
            return Err(ObjectError::HashCount {
                segment: index,
                got: hashes.len(),
                want: self.code.total(),
                code: self.code,
            });
        }
        let mut good = Vec::with_capacity(shards.len());
        let mut bad = vec![];
        for &(i, shard) in shards {
            match hashes.get(i) {
                Some(h) if *h == shard_hash(shard) && !good.iter().any(|(g, _)| *g == i) => good.push((i, shard)),
                _ => bad.push(i),
            }
        }
        let need = usize::from(self.code.data);
        if good.len() < need {
            return Err(ObjectError::Unrecoverable { segment: index, good: good.len(), need, bad: bad.len() });
        }
        let mut segment = self.decoder.decode(plain_len + TAG_BYTES, &good)?;
        self.cipher.open(index, &mut segment)?;
        Ok((segment, bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn segments_round_trip_through_any_k_good_shards() {
        let key = DataKey::from_bytes([3; 32]);
        let object = [4; 32];
        let code = ErasureCode::DEFAULT;
        let mut sealer = SegmentSealer::new(&key, &object, code);
        let text = plain(100_000);
        let mut buf = Vec::with_capacity(sealer.buffer_capacity(text.len()));
        buf.extend_from_slice(&text);
        let cap = buf.capacity();
        let sealed = sealer.seal(7, &mut buf).unwrap();
        assert_eq!(sealed.cipher_len, text.len() + TAG_BYTES);
        let shards: Vec<Vec<u8>> = (0..6).map(|i| sealed.shard(i).unwrap().to_vec()).collect();
        let hashes = sealed.hashes.clone();
        drop(sealed);
        assert_eq!(buf.capacity(), cap, "sealing reallocated the segment buffer");

        let mut opener = SegmentOpener::new(&key, &object, code);
        let given: Vec<(usize, &[u8])> = [5, 1, 4, 2].iter().map(|&i| (i, shards[i].as_slice())).collect();
        assert_eq!(opener.open(7, text.len(), &given, &hashes).unwrap(), (text.clone(), vec![]));

        // A corrupt shard is caught and named; the others still suffice.
        let mut corrupt = shards[0].clone();
        corrupt[10] ^= 0xff;
        let given: Vec<(usize, &[u8])> =
            vec![(0, &corrupt), (1, &shards[1]), (2, &shards[2]), (3, &shards[3]), (4, &shards[4])];
        assert_eq!(opener.open(7, text.len(), &given, &hashes).unwrap(), (text.clone(), vec![0]));

        // Too few good shards: unrecoverable, never wrong bytes.
        let truncated = &shards[3][..100];
        let given: Vec<(usize, &[u8])> = vec![(0, &corrupt), (1, &shards[1]), (2, &shards[2]), (3, truncated)];
        assert_eq!(
            opener.open(7, text.len(), &given, &hashes),
            Err(ObjectError::Unrecoverable { segment: 7, good: 2, need: 4, bad: 2 })
        );
        // The right shards under the wrong segment index fail authentication.
        let given: Vec<(usize, &[u8])> = (0..4).map(|i| (i, shards[i].as_slice())).collect();
        assert!(matches!(opener.open(8, text.len(), &given, &hashes), Err(ObjectError::Crypto(_))));
        assert!(matches!(opener.open(7, text.len(), &given, &hashes[..5]), Err(ObjectError::HashCount { .. })));
    }

    #[test]
    fn shards_never_contain_the_plaintext() {
        let marker = b"ARCHIPEL-PLAINTEXT-MARKER-0123456789";
        let text: Vec<u8> = marker.iter().copied().cycle().take(1 << 16).collect();
        let mut sealer = SegmentSealer::new(&DataKey::generate().unwrap(), &[1; 32], ErasureCode::DEFAULT);
        let mut buf = text.clone();
        let sealed = sealer.seal(0, &mut buf).unwrap();
        for i in 0..6 {
            assert!(!sealed.shard(i).unwrap().windows(16).any(|w| w == &marker[..16]), "shard {i} shows plaintext");
        }
    }

    #[test]
    fn full_segments_give_page_aligned_two_mebibyte_shards() {
        let mut sealer = SegmentSealer::new(&DataKey::from_bytes([0; 32]), &[0; 32], ErasureCode::DEFAULT);
        let mut buf = vec![0u8; SEGMENT_PLAIN_BYTES as usize];
        assert_eq!(sealer.buffer_capacity(buf.len()), SEGMENT_BYTES as usize);
        let sealed = sealer.seal(0, &mut buf).unwrap();
        assert_eq!(sealed.shard_bytes(), 2 << 20);
        assert_eq!(sealed.cipher_len as u64, SEGMENT_BYTES);
    }
}
