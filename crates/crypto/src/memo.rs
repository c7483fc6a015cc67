//! Signatures this process has already checked and found good.
//!
//! The ledger checks the same signatures several times: a transaction and the shard receipts it
//! carries are checked when a node admits it to its mempool, again when a validator proposes or
//! verifies the block holding it, and again when a follower executes that block. Each check is an
//! Ed25519 verification (~50 µs here); a `PutObject` carries k+m receipts. The memo remembers
//! every good signature by the BLAKE3 of everything the check read — namespace, signer, signature
//! and message — so a second check of exactly the same inputs is a hash and a lookup. Anything
//! different (another message, signer or signature, one bit of it) misses and is verified in full;
//! bad signatures are never remembered.
//!
//! The memo holds at most `2 × GENERATION` entries (~32 bytes each): when the current generation
//! fills up it becomes the previous one and the one before is dropped, so a signature checked
//! recently survives and memory stays bounded however many signatures arrive.

use crate::CryptoError;
use crate::keys::{SignatureItem, verify_signature, verify_signatures};
use archipel_types::NodeId;
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{LazyLock, Mutex, PoisonError};

/// Entries per generation (two generations are kept).
const GENERATION: usize = 1 << 15;

/// The memo's key: BLAKE3 over the check's inputs.
type Seen = [u8; 32];

/// The key is already a uniform hash: its first 8 bytes serve as the table's hash.
#[derive(Default)]
struct TakeEight(u64);

impl Hasher for TakeEight {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (8 * i);
        }
    }
}

type SeenSet = HashSet<Seen, BuildHasherDefault<TakeEight>>;

#[derive(Default)]
struct Memo {
    current: SeenSet,
    previous: SeenSet,
}

impl Memo {
    fn contains(&self, k: &Seen) -> bool {
        self.current.contains(k) || self.previous.contains(k)
    }

    fn insert(&mut self, k: Seen) {
        if self.current.len() >= GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(k);
    }
}

static MEMO: LazyLock<Mutex<Memo>> = LazyLock::new(Default::default);

fn memo() -> std::sync::MutexGuard<'static, Memo> {
    MEMO.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The memo key of one check: every input, unambiguously (the namespace is length-prefixed,
/// signer and signature have fixed sizes, the message is the rest).
fn key(namespace: &[u8], signer: &NodeId, msg: &[u8], sig: &[u8; 64]) -> Seen {
    let mut h = blake3::Hasher::new();
    h.update(&(namespace.len() as u64).to_le_bytes());
    h.update(namespace);
    h.update(signer.as_bytes());
    h.update(sig);
    h.update(msg);
    *h.finalize().as_bytes()
}

/// [`verify_signature`], answered from the memo when exactly this check passed before.
pub fn verify_signature_memo(signer: &NodeId, namespace: &[u8], msg: &[u8], sig: &[u8; 64]) -> Result<(), CryptoError> {
    let k = key(namespace, signer, msg, sig);
    if memo().contains(&k) {
        return Ok(());
    }
    verify_signature(signer, namespace, msg, sig)?;
    memo().insert(k);
    Ok(())
}

/// [`verify_signatures`] (one batch, all under `namespace`), skipping the items the memo already
/// holds; true when every item is good (and then all of them are remembered). An empty `items`
/// is false, as for [`verify_signatures`]. When false, check the items one by one with
/// [`verify_signature_memo`] to find the bad one.
pub fn verify_signatures_memo(namespace: &[u8], items: &[SignatureItem<'_>]) -> bool {
    if items.is_empty() {
        return false;
    }
    let keys: Vec<Seen> = items.iter().map(|(signer, msg, sig)| key(namespace, signer, msg, sig)).collect();
    let unseen: Vec<SignatureItem<'_>> = {
        let m = memo();
        items.iter().zip(&keys).filter(|(_, k)| !m.contains(k)).map(|(item, _)| *item).collect()
    };
    let good = match unseen.as_slice() {
        [] => true,
        [(signer, msg, sig)] => verify_signature(signer, namespace, msg, sig).is_ok(),
        more => verify_signatures(namespace, more),
    };
    if good {
        let mut m = memo();
        for k in keys {
            m.insert(k);
        }
    }
    good
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn a_remembered_signature_covers_exactly_its_inputs() {
        let id = Identity::from_seed(9_100_001);
        let other = Identity::from_seed(9_100_002);
        let sig = id.sign(b"ns-memo", b"message");
        assert!(verify_signature_memo(&id.node_id(), b"ns-memo", b"message", &sig).is_ok());
        // Remembered now; every changed input still misses and fails.
        assert!(verify_signature_memo(&id.node_id(), b"ns-memo", b"message", &sig).is_ok());
        assert!(verify_signature_memo(&id.node_id(), b"ns-memo", b"messagf", &sig).is_err());
        assert!(verify_signature_memo(&id.node_id(), b"ns-memO", b"message", &sig).is_err());
        assert!(verify_signature_memo(&other.node_id(), b"ns-memo", b"message", &sig).is_err());
        let mut flipped = sig;
        flipped[63] ^= 1;
        assert!(verify_signature_memo(&id.node_id(), b"ns-memo", b"message", &flipped).is_err());
        // The namespace/message boundary is part of the key.
        let shifted = id.sign(b"ns-mem", b"omessage");
        assert!(verify_signature_memo(&id.node_id(), b"ns-mem", b"omessage", &shifted).is_ok());
        assert!(verify_signature_memo(&id.node_id(), b"ns-memo", b"message", &shifted).is_err());
    }

    #[test]
    fn a_batch_with_one_bad_item_fails_and_remembers_nothing() {
        let ids: Vec<Identity> = (0..4).map(|i| Identity::from_seed(9_200_000 + i)).collect();
        let msgs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 10]).collect();
        let mut sigs: Vec<[u8; 64]> = ids.iter().zip(&msgs).map(|(id, m)| id.sign(b"ns-batch", m)).collect();
        sigs[2][0] ^= 1;
        let node_ids: Vec<NodeId> = ids.iter().map(Identity::node_id).collect();
        let items: Vec<SignatureItem<'_>> = (0..4).map(|i| (&node_ids[i], msgs[i].as_slice(), &sigs[i])).collect();
        assert!(!verify_signatures_memo(b"ns-batch", &items));
        assert!(!verify_signatures_memo(b"ns-batch", &items), "a failed batch is not remembered");
        // The good ones alone pass, and then pass from the memo; the bad one still fails.
        let good: Vec<SignatureItem<'_>> = items.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, x)| *x).collect();
        assert!(verify_signatures_memo(b"ns-batch", &good));
        assert!(verify_signatures_memo(b"ns-batch", &good));
        assert!(!verify_signatures_memo(b"ns-batch", &items));
        assert!(!verify_signatures_memo(b"ns-batch", &[]));
    }

    #[test]
    fn the_memo_stays_bounded() {
        let mut m = Memo::default();
        for i in 0..(3 * GENERATION as u64) {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&i.to_le_bytes());
            m.insert(k);
        }
        assert!(m.current.len() + m.previous.len() <= 2 * GENERATION);
        let mut last = [0u8; 32];
        last[..8].copy_from_slice(&(3 * GENERATION as u64 - 1).to_le_bytes());
        assert!(m.contains(&last));
        assert!(!m.contains(&[0u8; 32]), "the oldest generation is gone");
    }
}
