//! Ledger state and `apply`: accounts with balances and nonces, and liveness leases.
//!
//! `apply` checks everything first and only then mutates, so a transaction is applied whole or
//! not at all. The state root is a BLAKE3 Merkle root over the sorted key/value leaves.

use crate::tx::{Payload, SignedTransaction, TxError};
use archipel_types::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// An account.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Balance in micro-units.
    pub balance_micro: u64,
    /// Next expected nonce.
    pub nonce: u64,
}

/// What an applied transaction did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Receipt {
    /// Funds moved.
    Transferred {
        /// From.
        from: NodeId,
        /// To.
        to: NodeId,
        /// Amount.
        amount_micro: u64,
    },
    /// A lease was renewed until the given block time.
    LeaseRenewed {
        /// The node.
        node: NodeId,
        /// Block time of the heartbeat (ms).
        at_ms: u64,
    },
}

/// Liveness of a node by its lease at a given block time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseStatus {
    /// Heartbeat within `lease_ttl`.
    Up,
    /// No heartbeat within `lease_ttl` (or never).
    Down,
}

/// The ledger state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    accounts: BTreeMap<NodeId, Account>,
    nodes: BTreeSet<NodeId>,
    leases: BTreeMap<NodeId, u64>,
}

impl State {
    /// A state with funded accounts and registered nodes (from genesis).
    pub fn genesis(accounts: impl IntoIterator<Item = (NodeId, u64)>, nodes: impl IntoIterator<Item = NodeId>) -> Self {
        let mut s = State::default();
        for (id, balance_micro) in accounts {
            s.accounts.entry(id).or_default().balance_micro += balance_micro;
        }
        s.nodes.extend(nodes);
        s
    }

    /// An account (default if it never appeared).
    pub fn account(&self, id: &NodeId) -> Account {
        self.accounts.get(id).copied().unwrap_or_default()
    }

    /// Total money in all accounts.
    pub fn total_micro(&self) -> u128 {
        self.accounts.values().map(|a| a.balance_micro as u128).sum()
    }

    /// Lease status of `node` at block time `now_ms` with `lease_ttl_ms`.
    pub fn lease_status(&self, node: &NodeId, now_ms: u64, lease_ttl_ms: u64) -> LeaseStatus {
        match self.leases.get(node) {
            Some(t) if now_ms.saturating_sub(*t) <= lease_ttl_ms => LeaseStatus::Up,
            _ => LeaseStatus::Down,
        }
    }

    /// Applies one transaction at block time `block_time_ms`: all of it, or nothing.
    pub fn apply(&mut self, stx: &SignedTransaction, block_time_ms: u64) -> Result<Receipt, TxError> {
        stx.verify()?;
        let tx = &stx.tx;
        let signer = self.account(&tx.signer);
        if tx.nonce != signer.nonce {
            return Err(TxError::BadNonce { expected: signer.nonce, got: tx.nonce });
        }
        let receipt = match &tx.payload {
            Payload::Transfer { to, amount_micro } => self.apply_transfer(tx.signer, *to, *amount_micro)?,
            Payload::Heartbeat => self.apply_heartbeat(tx.signer, block_time_ms)?,
        };
        self.accounts.entry(tx.signer).or_default().nonce += 1;
        Ok(receipt)
    }

    fn apply_transfer(&mut self, from: NodeId, to: NodeId, amount: u64) -> Result<Receipt, TxError> {
        let balance = self.account(&from).balance_micro;
        if balance < amount {
            return Err(TxError::InsufficientFunds { balance_micro: balance, needed_micro: amount });
        }
        if from != to {
            self.account(&to).balance_micro.checked_add(amount).ok_or(TxError::Overflow)?;
            self.accounts.entry(from).or_default().balance_micro -= amount;
            self.accounts.entry(to).or_default().balance_micro += amount;
        }
        Ok(Receipt::Transferred { from, to, amount_micro: amount })
    }

    fn apply_heartbeat(&mut self, node: NodeId, at_ms: u64) -> Result<Receipt, TxError> {
        if !self.nodes.contains(&node) {
            return Err(TxError::NotAllowed(format!(
                "{} is not a registered node: only nodes heartbeat",
                node.short()
            )));
        }
        self.leases.insert(node, at_ms);
        Ok(Receipt::LeaseRenewed { node, at_ms })
    }

    /// The leaves committed by the state root, in key order.
    fn leaves(&self) -> Vec<[u8; 32]> {
        let mut out = Vec::new();
        for (id, a) in &self.accounts {
            out.push(leaf(b"account", id, &[a.balance_micro.to_be_bytes(), a.nonce.to_be_bytes()].concat()));
        }
        for id in &self.nodes {
            out.push(leaf(b"node", id, &[]));
        }
        for (id, t) in &self.leases {
            out.push(leaf(b"lease", id, &t.to_be_bytes()));
        }
        out
    }

    /// BLAKE3 Merkle root over all state.
    pub fn state_root(&self) -> [u8; 32] {
        merkle_root(self.leaves())
    }
}

fn leaf(kind: &[u8], id: &NodeId, value: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"leaf:");
    h.update(kind);
    h.update(id.as_bytes());
    h.update(value);
    *h.finalize().as_bytes()
}

/// Merkle root of `leaves` (pairs hashed with a node prefix; an odd last node is carried up).
pub fn merkle_root(mut level: Vec<[u8; 32]>) -> [u8; 32] {
    if level.is_empty() {
        return *blake3::hash(b"empty").as_bytes();
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => {
                    let mut h = blake3::Hasher::new();
                    h.update(b"node:");
                    h.update(a);
                    h.update(b);
                    *h.finalize().as_bytes()
                }
                [a] => *a,
                _ => unreachable!("chunks(2) yields one or two"),
            })
            .collect();
    }
    level[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tx::Transaction;
    use archipel_crypto::Identity;
    use proptest::prelude::*;

    fn id(seed: u64) -> Identity {
        Identity::from_seed(seed)
    }

    fn transfer(from: u64, nonce: u64, to: u64, amount: u64) -> SignedTransaction {
        Transaction {
            signer: id(from).node_id(),
            nonce,
            payload: Payload::Transfer { to: id(to).node_id(), amount_micro: amount },
        }
        .sign(&id(from))
    }

    fn genesis() -> State {
        State::genesis([(id(0).node_id(), 1_000), (id(1).node_id(), 500)], [id(10).node_id()])
    }

    #[test]
    fn transfers_move_money_and_bump_the_nonce() {
        let mut s = genesis();
        let r = s.apply(&transfer(0, 0, 1, 300), 5).unwrap();
        assert!(matches!(r, Receipt::Transferred { amount_micro: 300, .. }));
        assert_eq!(s.account(&id(0).node_id()), Account { balance_micro: 700, nonce: 1 });
        assert_eq!(s.account(&id(1).node_id()).balance_micro, 800);
    }

    #[test]
    fn refused_transactions_change_nothing() {
        let mut s = genesis();
        let root = s.state_root();
        assert!(matches!(s.apply(&transfer(0, 1, 1, 1), 0), Err(TxError::BadNonce { expected: 0, got: 1 })));
        assert!(matches!(s.apply(&transfer(0, 0, 1, 5_000), 0), Err(TxError::InsufficientFunds { .. })));
        let mut forged = transfer(0, 0, 1, 10);
        forged.tx.payload = Payload::Transfer { to: id(2).node_id(), amount_micro: 10 };
        assert!(matches!(s.apply(&forged, 0), Err(TxError::BadSignature(_))));
        let hb = Transaction { signer: id(0).node_id(), nonce: 0, payload: Payload::Heartbeat }.sign(&id(0));
        assert!(matches!(s.apply(&hb, 0), Err(TxError::NotAllowed(_))));
        assert_eq!(s.state_root(), root);
        // A replay of an applied transaction is refused.
        let t = transfer(0, 0, 1, 1);
        s.apply(&t, 0).unwrap();
        assert!(matches!(s.apply(&t, 0), Err(TxError::BadNonce { .. })));
    }

    #[test]
    fn leases_expire_deterministically_and_renew() {
        let mut s = genesis();
        let node = id(10).node_id();
        assert_eq!(s.lease_status(&node, 0, 2_000), LeaseStatus::Down);
        let hb = |n| Transaction { signer: node, nonce: n, payload: Payload::Heartbeat }.sign(&id(10));
        s.apply(&hb(0), 1_000).unwrap();
        assert_eq!(s.lease_status(&node, 3_000, 2_000), LeaseStatus::Up);
        assert_eq!(s.lease_status(&node, 3_001, 2_000), LeaseStatus::Down);
        s.apply(&hb(1), 3_500).unwrap();
        assert_eq!(s.lease_status(&node, 4_000, 2_000), LeaseStatus::Up);
    }

    proptest! {
        #[test]
        fn money_is_conserved_and_replay_gives_the_same_root(ops in prop::collection::vec((0u64..3, 0u64..3, 0u64..700), 0..40)) {
            let mut a = State::genesis((0..3).map(|i| (id(i).node_id(), 1_000)), []);
            let mut nonces = [0u64; 3];
            let mut applied = Vec::new();
            for (from, to, amount) in ops {
                let t = transfer(from, nonces[from as usize], to, amount);
                if a.apply(&t, 0).is_ok() {
                    nonces[from as usize] += 1;
                    applied.push(t);
                }
                prop_assert_eq!(a.total_micro(), 3_000);
            }
            let mut b = State::genesis((0..3).map(|i| (id(i).node_id(), 1_000)), []);
            for t in &applied {
                prop_assert!(b.apply(t, 0).is_ok());
            }
            prop_assert_eq!(a.state_root(), b.state_root());
        }
    }

    #[test]
    fn merkle_root_depends_on_every_leaf() {
        let leaves: Vec<[u8; 32]> = (0..5u8).map(|i| [i; 32]).collect();
        let root = merkle_root(leaves.clone());
        for i in 0..5 {
            let mut l = leaves.clone();
            l[i][0] ^= 1;
            assert_ne!(merkle_root(l), root);
        }
    }
}
