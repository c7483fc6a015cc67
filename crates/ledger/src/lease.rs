//! Liveness leases, recorded by change: a block carries [`LivenessChange`]s (node X is Down, node
//! Y is Up again) and nothing for nodes whose status did not change.
//!
//! Heartbeats never reach the ledger. Every node sends one to the validators every
//! `lease_ttl / 4` over authenticated p2p; each validator keeps how long each node has been silent
//! (consensus' `liveness` module). A leader proposes `Down` for a node silent for `lease_ttl`, and
//! every validator refuses a block whose `Down` names a node it heard from recently, so a node is
//! marked Down only when a quorum of validators stopped hearing it — never because consensus
//! stalled, a leader timed out or block time jumped. `Up` carries an [`AliveProof`], the node's own
//! signature over a height at or after it went down, so a replayed proof cannot revive it and the
//! state machine checks it offline. The ledger's cost of liveness is thus one record per status
//! change, whatever the number of nodes.

use crate::hash::Hash;
use crate::state::{LeaseStatus, State, StateKey};
use archipel_crypto::{Identity, verify_signature_memo};
use archipel_types::NodeId;
use bytes::BufMut;
use commonware_codec::{Buf, EncodeSize, Error as CodecError, Read, ReadExt, Write};
use serde::{Deserialize, Serialize};

/// Signature namespace of alive proofs (the network's genesis hash is signed with them).
pub const ALIVE_NAMESPACE: &[u8] = b"archipel/alive/v1";

/// A node's lease as finalized state records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Up or Down.
    pub status: LeaseStatus,
    /// Height of the block that set this status (for a node never up: its registration).
    pub since_height: u64,
    /// That block's time (Unix ms): storage repairs a Down holder's shards once the chain's
    /// time is `repair_grace_ms` past it.
    #[serde(default)]
    pub since_ms: u64,
}

impl Lease {
    /// The state entry's value: status byte (1 = up), then the height and the time, big-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17);
        out.push(u8::from(self.status == LeaseStatus::Up));
        out.extend_from_slice(&self.since_height.to_be_bytes());
        out.extend_from_slice(&self.since_ms.to_be_bytes());
        out
    }

    /// Decodes [`Lease::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        let status = match b.first() {
            Some(1) => LeaseStatus::Up,
            Some(0) => LeaseStatus::Down,
            _ => return Err("a lease starts with a status byte, 0 or 1".into()),
        };
        if b.len() != 17 {
            return Err(format!("a lease is 17 bytes, not {}", b.len()));
        }
        Ok(Lease { status, since_height: crate::state::be_u64(b, 1)?, since_ms: crate::state::be_u64(b, 9)? })
    }
}

/// A node's signed statement that it was alive at (or after) finalized height `at_height`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliveProof {
    /// A finalized height the node had seen when it signed.
    pub at_height: u64,
    /// Ed25519 signature by the node under [`ALIVE_NAMESPACE`].
    #[serde(with = "crate::hash::hex64")]
    pub signature: [u8; 64],
}

impl AliveProof {
    fn message(network: &Hash, node: &NodeId, at_height: u64) -> Vec<u8> {
        [&network.0[..], &node.0[..], &at_height.to_be_bytes()[..]].concat()
    }

    /// Signs that `identity`'s node is alive at `at_height` on `network`.
    pub fn sign(identity: &Identity, network: &Hash, at_height: u64) -> Self {
        let signature = identity.sign(ALIVE_NAMESPACE, &Self::message(network, &identity.node_id(), at_height));
        Self { at_height, signature }
    }

    /// Checks the signature of `node`.
    pub fn verify(&self, network: &Hash, node: &NodeId) -> bool {
        verify_signature_memo(node, ALIVE_NAMESPACE, &Self::message(network, node, self.at_height), &self.signature)
            .is_ok()
    }
}

/// A change of one node's lease, decided by the validators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum LivenessChange {
    /// The validators stopped hearing the node for `lease_ttl`.
    Down {
        /// The node.
        node: NodeId,
    },
    /// The node is heard again and proves it is alive.
    Up {
        /// The node.
        node: NodeId,
        /// Its proof.
        proof: AliveProof,
    },
}

impl LivenessChange {
    /// The node it is about.
    pub fn node(&self) -> NodeId {
        match self {
            LivenessChange::Down { node } | LivenessChange::Up { node, .. } => *node,
        }
    }

    /// The status it gives the node's lease.
    pub fn status(&self) -> LeaseStatus {
        match self {
            LivenessChange::Down { .. } => LeaseStatus::Down,
            LivenessChange::Up { .. } => LeaseStatus::Up,
        }
    }

    /// Hash for the block's liveness root.
    pub fn hash(&self) -> Hash {
        let mut bytes = Vec::with_capacity(self.encode_size());
        self.write(&mut bytes);
        Hash::of(&[b"archipel/liveness/v1", &bytes])
    }
}

impl Write for LivenessChange {
    fn write(&self, buf: &mut impl BufMut) {
        match self {
            LivenessChange::Down { node } => {
                0u8.write(buf);
                node.0.write(buf);
            }
            LivenessChange::Up { node, proof } => {
                1u8.write(buf);
                node.0.write(buf);
                proof.at_height.write(buf);
                proof.signature.write(buf);
            }
        }
    }
}

impl EncodeSize for LivenessChange {
    fn encode_size(&self) -> usize {
        match self {
            LivenessChange::Down { .. } => 1 + 32,
            LivenessChange::Up { .. } => 1 + 32 + 8 + 64,
        }
    }
}

impl Read for LivenessChange {
    type Cfg = ();
    fn read_cfg(buf: &mut impl Buf, _: &()) -> Result<Self, CodecError> {
        Ok(match u8::read(buf)? {
            0 => LivenessChange::Down { node: NodeId(<[u8; 32]>::read(buf)?) },
            1 => LivenessChange::Up {
                node: NodeId(<[u8; 32]>::read(buf)?),
                proof: AliveProof { at_height: u64::read(buf)?, signature: <[u8; 64]>::read(buf)? },
            },
            tag => return Err(CodecError::InvalidEnum(tag)),
        })
    }
}

/// Why a liveness change does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LivenessError {
    /// The node is not in the registry.
    #[error("node {0} is not registered")]
    NotRegistered(String),
    /// The node already has that status.
    #[error("node {node} is {status:?} already")]
    Unchanged {
        /// The node (short).
        node: String,
        /// Its status.
        status: LeaseStatus,
    },
    /// The alive proof is older than the node's last status change, from the future, or forged.
    #[error("alive proof of node {node} at height {at_height} is invalid: {why}")]
    BadProof {
        /// The node (short).
        node: String,
        /// The height it claims.
        at_height: u64,
        /// Why.
        why: &'static str,
    },
}

impl State {
    /// Every registered node's lease, in node order (the registry is bounded and in memory; each
    /// lease is read through from the store unless written since the last commit).
    pub fn leases(&self) -> Vec<(NodeId, Lease)> {
        self.nodes.keys().filter_map(|id| Some((*id, self.lease(id)?))).collect()
    }

    /// The lease of a registered node.
    pub fn lease(&self, node: &NodeId) -> Option<Lease> {
        self.leases.get(node, |id| self.load(&StateKey::Lease(*id), Lease::from_bytes))
    }

    /// Checks `change` against the current state (block height set by `begin_block`) without
    /// changing anything.
    pub fn check_liveness(&self, change: &LivenessChange) -> Result<(), LivenessError> {
        let node = change.node();
        let lease = self.lease(&node).ok_or_else(|| LivenessError::NotRegistered(node.short()))?;
        let wanted = change.status();
        if lease.status == wanted {
            return Err(LivenessError::Unchanged { node: node.short(), status: wanted });
        }
        if let LivenessChange::Up { proof, .. } = change {
            let bad = |why| LivenessError::BadProof { node: node.short(), at_height: proof.at_height, why };
            if proof.at_height < lease.since_height {
                return Err(bad("signed before the node went down (a replay)"));
            }
            if proof.at_height >= self.chain.height {
                return Err(bad("not a finalized height yet"));
            }
            if !proof.verify(&self.network, &node) {
                return Err(bad("the signature does not verify"));
            }
        }
        Ok(())
    }

    /// Applies `change` at the current height: all of it, or nothing.
    pub fn apply_liveness(&mut self, change: &LivenessChange) -> Result<(), LivenessError> {
        self.check_liveness(change)?;
        let status = change.status();
        let lease = Lease { status, since_height: self.chain.height, since_ms: self.chain.timestamp_ms };
        self.leases.set(change.node(), Some(lease));
        Ok(())
    }

    /// Records a newly registered node's lease: Down until it proves it is alive.
    pub(crate) fn open_lease(&mut self, node: NodeId) {
        let lease =
            Lease { status: LeaseStatus::Down, since_height: self.chain.height, since_ms: self.chain.timestamp_ms };
        self.leases.set(node, Some(lease));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{genesis, id};

    fn up(seed: u64, s: &State, at_height: u64) -> LivenessChange {
        LivenessChange::Up { node: id(seed).node_id(), proof: AliveProof::sign(&id(seed), &s.network, at_height) }
    }

    #[test]
    fn leases_are_read_through_from_the_store_like_any_kind_a_module_adds() {
        let store = std::sync::Arc::new(crate::store::MemoryStore::default());
        let mut s = genesis().with_store(store.clone());
        let node = id(10).node_id();
        s.begin_block(1, 1_000);
        s.apply_liveness(&up(10, &s, 0)).unwrap();
        let c = s.commit().unwrap();
        crate::store::StateStore::commit(&*store, &c, true).unwrap();
        s.committed();
        assert_eq!(s.leases.written().count(), 0, "after a commit no lease is held in memory");
        assert_eq!(
            s.lease(&node).map(|l| (l.status, l.since_height)),
            Some((LeaseStatus::Up, 1)),
            "read from the store"
        );
        // Opening a state loads no lease either: each is read when asked for.
        let opened = State::open(store.clone()).unwrap().expect("committed");
        assert_eq!(opened.leases.written().count(), 0);
        assert_eq!(opened.lease_status(&node), LeaseStatus::Up);
        assert_eq!(opened.leases(), vec![(node, Lease { status: LeaseStatus::Up, since_height: 1, since_ms: 1_000 })]);
        assert_eq!(opened.state_root(), s.state_root());
    }

    #[test]
    fn a_node_goes_up_with_a_fresh_proof_and_down_once() {
        let mut s = genesis();
        let node = id(10).node_id();
        assert_eq!(s.lease_status(&node), LeaseStatus::Down, "never heard");
        s.begin_block(1, 1_000);
        s.apply_liveness(&up(10, &s, 0)).unwrap();
        assert_eq!(s.lease_status(&node), LeaseStatus::Up);
        assert_eq!(s.lease(&node).unwrap().since_height, 1);
        let again = s.apply_liveness(&up(10, &s, 0)).unwrap_err();
        assert!(matches!(again, LivenessError::Unchanged { .. }), "{again}");
        s.begin_block(2, 1_000);
        s.apply_liveness(&LivenessChange::Down { node }).unwrap();
        assert_eq!(s.lease_status(&node), LeaseStatus::Down);
        assert!(matches!(s.apply_liveness(&LivenessChange::Down { node }), Err(LivenessError::Unchanged { .. })));
        // The proof that brought it up before cannot bring it up again.
        s.begin_block(3, 1_000);
        let e = s.apply_liveness(&up(10, &s, 0)).unwrap_err();
        assert!(e.to_string().contains("replay"), "{e}");
        let e = s.apply_liveness(&up(10, &s, 3)).unwrap_err();
        assert!(e.to_string().contains("not a finalized height"), "{e}");
        s.apply_liveness(&up(10, &s, 2)).unwrap();
        assert_eq!(s.lease_status(&node), LeaseStatus::Up);
    }

    #[test]
    fn forged_or_foreign_proofs_and_strangers_are_refused() {
        let mut s = genesis();
        s.begin_block(1, 0);
        let root = s.state_root();
        // Signed by another key, or for another network.
        let forged = LivenessChange::Up { node: id(10).node_id(), proof: AliveProof::sign(&id(11), &s.network, 0) };
        assert!(s.apply_liveness(&forged).unwrap_err().to_string().contains("signature"));
        let other = LivenessChange::Up { node: id(10).node_id(), proof: AliveProof::sign(&id(10), &Hash([9; 32]), 0) };
        assert!(s.apply_liveness(&other).unwrap_err().to_string().contains("signature"));
        assert!(matches!(s.apply_liveness(&up(11, &s, 0)), Err(LivenessError::NotRegistered(_))));
        assert_eq!(s.state_root(), root, "refused changes change nothing");
    }

    #[test]
    fn changes_round_trip_through_the_codec() {
        let s = genesis();
        for c in [up(10, &s, 7), LivenessChange::Down { node: id(3).node_id() }] {
            let mut bytes = Vec::new();
            c.write(&mut bytes);
            assert_eq!(bytes.len(), c.encode_size());
            let back = LivenessChange::read(&mut commonware_codec::Copying(&bytes[..])).unwrap();
            assert_eq!(back, c);
        }
        assert!(LivenessChange::read(&mut commonware_codec::Copying(&[7u8][..])).is_err());
    }
}
