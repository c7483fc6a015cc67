//! The mempool: admitted transactions waiting for a block, ordered per account by nonce.
//!
//! Sans-IO: the node feeds it transactions (from `POST /v1/tx` or gossip) and the state they are
//! judged against; the proposer asks it for candidates on top of any (possibly not yet final)
//! parent state.

use crate::block::Signatures;
use crate::hash::Hash;
use crate::state::State;
use crate::tx::{SignedTransaction, TxError};
use archipel_types::NodeId;
use std::collections::{BTreeMap, HashMap};

/// Why the mempool did not take a transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MempoolError {
    /// The transaction itself is refused.
    #[error(transparent)]
    Invalid(#[from] TxError),
    /// Another transaction with the same signer and nonce is already waiting.
    #[error("another transaction with nonce {nonce} from {signer} is already waiting; use the next nonce")]
    NonceTaken {
        /// The signer (short).
        signer: String,
        /// The nonce.
        nonce: u64,
    },
    /// The mempool is full.
    #[error("the mempool is full ({0} transactions waiting): retry in a moment")]
    Full(usize),
}

impl MempoolError {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            MempoolError::Invalid(e) => e.code(),
            MempoolError::NonceTaken { .. } => "nonce_taken",
            MempoolError::Full(_) => "mempool_full",
        }
    }
}

/// Waiting transactions.
#[derive(Debug)]
pub struct Mempool {
    by_account: BTreeMap<NodeId, BTreeMap<u64, SignedTransaction>>,
    by_hash: HashMap<Hash, (NodeId, u64)>,
    capacity: usize,
}

impl Mempool {
    /// An empty mempool holding at most `capacity` transactions.
    pub fn new(capacity: usize) -> Self {
        Self { by_account: BTreeMap::new(), by_hash: HashMap::new(), capacity }
    }

    /// Number of waiting transactions.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// True when `hash` waits here.
    pub fn contains(&self, hash: &Hash) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// Admits `stx` (encoded in `encoded_len` bytes) against `state`; returns its hash. Adding the
    /// same transaction twice is not an error.
    pub fn insert(&mut self, state: &State, stx: SignedTransaction, encoded_len: usize) -> Result<Hash, MempoolError> {
        self.insert_hashed(state, stx.hash(), stx, encoded_len, Signatures::Verify)
    }

    /// [`Mempool::insert`] with the transaction's hash already computed, and its signature
    /// already checked if `signatures` says so.
    pub fn insert_hashed(
        &mut self,
        state: &State,
        hash: Hash,
        stx: SignedTransaction,
        encoded_len: usize,
        signatures: Signatures,
    ) -> Result<Hash, MempoolError> {
        if self.by_hash.contains_key(&hash) {
            return Ok(hash);
        }
        match signatures {
            Signatures::Verify => state.admit(&stx, encoded_len)?,
            Signatures::AlreadyVerified => state.admit_verified(&stx, encoded_len)?,
        }
        let signer = stx.tx.signer;
        let nonce = stx.tx.nonce;
        if self.by_account.get(&signer).is_some_and(|m| m.contains_key(&nonce)) {
            return Err(MempoolError::NonceTaken { signer: signer.short(), nonce });
        }
        if self.len() >= self.capacity {
            return Err(MempoolError::Full(self.len()));
        }
        self.by_account.entry(signer).or_default().insert(nonce, stx);
        self.by_hash.insert(hash, (signer, nonce));
        Ok(hash)
    }

    /// Up to `max` transactions that can follow `state`: per account the run of consecutive
    /// nonces from its next nonce, interleaved across accounts so none starves.
    pub fn candidates(&self, state: &State, max: usize) -> Vec<SignedTransaction> {
        let mut runs: Vec<Vec<&SignedTransaction>> = Vec::new();
        for (signer, txs) in &self.by_account {
            let mut next = state.account(signer).nonce;
            let run: Vec<_> = txs
                .range(next..)
                .map_while(|(n, t)| {
                    (*n == next).then(|| {
                        next += 1;
                        t
                    })
                })
                .collect();
            if !run.is_empty() {
                runs.push(run);
            }
        }
        let mut out = Vec::new();
        let mut level = 0;
        while out.len() < max {
            let before = out.len();
            for run in &runs {
                if let Some(t) = run.get(level) {
                    out.push((*t).clone());
                    if out.len() == max {
                        break;
                    }
                }
            }
            if out.len() == before {
                break;
            }
            level += 1;
        }
        out
    }

    /// Up to `max` waiting transactions, oldest nonces first per account.
    pub fn all(&self, max: usize) -> Vec<SignedTransaction> {
        self.by_account.values().flat_map(|m| m.values()).take(max).cloned().collect()
    }

    /// Forgets `hash` (e.g. a proposer found it no longer applies).
    pub fn remove(&mut self, hash: &Hash) {
        if let Some((signer, nonce)) = self.by_hash.remove(hash)
            && let Some(m) = self.by_account.get_mut(&signer)
        {
            m.remove(&nonce);
            if m.is_empty() {
                self.by_account.remove(&signer);
            }
        }
    }

    /// Drops every transaction whose nonce `state` (a finalized state) has used.
    pub fn prune(&mut self, state: &State) {
        let mut gone = Vec::new();
        self.by_account.retain(|signer, txs| {
            let next = state.account(signer).nonce;
            let keep = txs.split_off(&next);
            gone.extend(txs.values().map(SignedTransaction::hash));
            *txs = keep;
            !txs.is_empty()
        });
        for h in gone {
            self.by_hash.remove(&h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{genesis, id, transfer};

    #[test]
    fn candidates_follow_nonces_and_interleave_accounts() {
        let mut s = genesis();
        let mut m = Mempool::new(100);
        for (from, nonce) in [(0, 1), (0, 0), (1, 0), (0, 3), (1, 1)] {
            m.insert(&s, transfer(from, nonce, 1 - from, 1), 100).unwrap();
        }
        let c = m.candidates(&s, 10);
        let order: Vec<_> = c.iter().map(|t| (t.tx.signer, t.tx.nonce)).collect();
        let (a, b) = (id(0).node_id(), id(1).node_id());
        let expected = if a < b { vec![(a, 0), (b, 0), (a, 1), (b, 1)] } else { vec![(b, 0), (a, 0), (b, 1), (a, 1)] };
        assert_eq!(order, expected, "nonce 3 waits for 2");
        assert_eq!(m.candidates(&s, 3).len(), 3);
        s.apply(&c.iter().find(|t| t.tx.signer == a && t.tx.nonce == 0).unwrap().clone()).unwrap();
        m.prune(&s);
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn refuses_duplicates_of_a_nonce_bad_transactions_and_overflow() {
        let s = genesis();
        let mut m = Mempool::new(2);
        let t = transfer(0, 0, 1, 1);
        let h = m.insert(&s, t.clone(), 100).unwrap();
        assert_eq!(m.insert(&s, t, 100).unwrap(), h, "idempotent");
        assert!(matches!(m.insert(&s, transfer(0, 0, 1, 2), 100), Err(MempoolError::NonceTaken { .. })));
        assert!(matches!(m.insert(&s, transfer(0, 1, 1, 5_000), 100), Err(MempoolError::Invalid(_))));
        m.insert(&s, transfer(0, 1, 1, 1), 100).unwrap();
        assert!(matches!(m.insert(&s, transfer(1, 0, 0, 1), 100), Err(MempoolError::Full(2))));
        m.remove(&h);
        assert_eq!(m.len(), 1);
    }
}
