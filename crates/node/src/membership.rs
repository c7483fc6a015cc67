//! The peer table: who is in the network, their signed descriptors, and whether they are alive.
//!
//! This is a sans-IO state machine. It never reads a clock or touches a socket: the gossip actor
//! ([`crate::gossip`]) feeds it messages and ticks with the current time and performs the
//! [`Effect`]s it returns. The same code therefore runs in a real node and in the deterministic
//! simulator.
//!
//! Protocol: every `hello_interval` a node broadcasts `Hello` with a digest of its table. A node
//! receiving a `Hello` marks the sender as seen; if the digests differ it answers with its whole
//! table (`Descriptors`, in messages of at most [`TABLE_CHUNK`] descriptors, so a table of any
//! registry size fits the gossip message limits). Tables merge by keeping, per node, the highest version whose signature
//! verifies and whose key is in the allowed set (the genesis nodes). A peer not heard from for
//! `down_after` is down; the next message from it brings it back up.
//!
//! The admitted keys start as the genesis nodes and grow by [`Admission`]s (a validator quorum's
//! approval of a new node), which travel with the table and surface once as [`Effect::Admitted`].

use archipel_crypto::{Admission, SignedDescriptor};
use archipel_types::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Largest number of descriptors accepted in one message.
pub const MAX_DESCRIPTORS_PER_MESSAGE: usize = 1_024;

/// Descriptors (or admissions) per table message sent: a registry of up to
/// `max_registered_nodes` nodes goes out in several messages, each far below the count limit and
/// the 512 KiB size limit (a descriptor's JSON is well under 1 KiB).
pub const TABLE_CHUNK: usize = 128;

/// Timing of the membership protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipTiming {
    /// How often a node says hello to all peers, in milliseconds.
    pub hello_interval_ms: u64,
    /// After how long without any message a peer counts as down, in milliseconds.
    pub down_after_ms: u64,
}

impl Default for MembershipTiming {
    fn default() -> Self {
        Self { hello_interval_ms: 500, down_after_ms: 2_000 }
    }
}

/// A message of the membership protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GossipMessage {
    /// "I am alive, and this is the digest of my table."
    Hello {
        /// Hex BLAKE3 digest of the sender's table, see [`PeerTable::digest`].
        digest: String,
    },
    /// A full table, sent when digests differ.
    Descriptors(Vec<SignedDescriptor>),
    /// Every admission the sender knows, sent before its table when digests differ.
    Admissions(Vec<Admission>),
}

impl GossipMessage {
    /// Wire encoding.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a message of at most `max_len` bytes received from the network.
    pub fn decode(bytes: &[u8], max_len: usize) -> Result<Self, String> {
        if bytes.len() > max_len {
            return Err(format!("message of {} bytes exceeds the limit of {max_len}", bytes.len()));
        }
        let msg: Self = serde_json::from_slice(bytes).map_err(|e| format!("undecodable message: {e}"))?;
        let count = match &msg {
            GossipMessage::Descriptors(list) => list.len(),
            GossipMessage::Admissions(list) => list.len(),
            GossipMessage::Hello { .. } => 0,
        };
        if count > MAX_DESCRIPTORS_PER_MESSAGE {
            return Err(format!("{count} entries exceed the limit of {MAX_DESCRIPTORS_PER_MESSAGE}"));
        }
        Ok(msg)
    }
}

/// Liveness of a peer as seen by this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerStatus {
    /// Heard from within `down_after`.
    Up,
    /// Never heard from, or silent for longer than `down_after`.
    Down,
}

/// What the shell must do after a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send to every connected peer.
    Broadcast(GossipMessage),
    /// Send to one peer.
    SendTo(NodeId, GossipMessage),
    /// A peer changed liveness.
    StatusChanged {
        /// The peer.
        node: NodeId,
        /// Its new status.
        status: PeerStatus,
    },
    /// A node was admitted after genesis (emitted once per admission, at the next tick).
    Admitted(Admission),
    /// A message was refused (unknown sender, bad signature, unknown descriptor key, …).
    Rejected {
        /// Who sent it.
        from: NodeId,
        /// Why it was refused.
        reason: String,
    },
}

/// One row of the table as shown by the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    /// The peer's signed descriptor.
    pub descriptor: SignedDescriptor,
    /// Up or down.
    pub status: PeerStatus,
    /// When the peer was last heard from (Unix ms); `None` if never.
    pub last_seen_ms: Option<u64>,
    /// Whether this row is the node itself.
    pub is_self: bool,
}

#[derive(Clone, Debug)]
struct Entry {
    descriptor: SignedDescriptor,
    last_seen_ms: Option<u64>,
    status: PeerStatus,
}

/// What an [`Admission`] must satisfy: the network's genesis hash and its validator set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmissionRule {
    /// Genesis hash of this network.
    pub genesis_hash: String,
    /// Genesis validators, whose quorum admits new nodes.
    pub validators: Vec<NodeId>,
}

/// The membership state machine.
#[derive(Debug)]
pub struct PeerTable {
    me: NodeId,
    timing: MembershipTiming,
    allowed: BTreeSet<NodeId>,
    entries: BTreeMap<NodeId, Entry>,
    next_hello_ms: u64,
    rule: Option<AdmissionRule>,
    admissions: BTreeMap<NodeId, Admission>,
    newly_admitted: Vec<Admission>,
}

impl PeerTable {
    /// A table for node `me` (whose current descriptor is `own`), knowing the `initial` descriptors
    /// (from genesis) and admitting only keys in `allowed`.
    pub fn new(
        own: SignedDescriptor,
        initial: impl IntoIterator<Item = SignedDescriptor>,
        mut allowed: BTreeSet<NodeId>,
        timing: MembershipTiming,
    ) -> Self {
        let me = own.descriptor.node_id;
        // A node admitted after genesis is not in the genesis set; it always admits itself.
        allowed.insert(me);
        let mut table = Self {
            me,
            timing,
            allowed,
            entries: BTreeMap::new(),
            next_hello_ms: 0,
            rule: None,
            admissions: BTreeMap::new(),
            newly_admitted: Vec::new(),
        };
        // Genesis descriptors were verified when the genesis was loaded; one that still fails here
        // is simply not admitted.
        for d in initial {
            let _ = table.merge(d);
        }
        let _ = table.merge(own);
        if let Some(e) = table.entries.get_mut(&me) {
            e.status = PeerStatus::Up;
        }
        table
    }

    /// Lets the table admit nodes after genesis under `rule`.
    pub fn with_admission_rule(mut self, rule: AdmissionRule) -> Self {
        self.rule = Some(rule);
        self
    }

    /// Admits the node of `admission` if it is valid for this network. Returns whether it was new.
    pub fn admit(&mut self, admission: Admission) -> Result<bool, String> {
        let rule = self.rule.as_ref().ok_or("this table does not admit nodes after genesis")?;
        let id = admission.descriptor.descriptor.node_id;
        if self.allowed.contains(&id) {
            return Ok(false);
        }
        admission.verify(&rule.genesis_hash, &rule.validators).map_err(|e| e.to_string())?;
        self.allowed.insert(id);
        let _ = self.merge(admission.descriptor.clone());
        self.admissions.insert(id, admission.clone());
        self.newly_admitted.push(admission);
        Ok(true)
    }

    /// Follows the node registry of finalized ledger state: registered nodes are allowed (with
    /// their registered descriptors), nodes that left are forgotten (admitted ones stay).
    /// Returns whether the allowed set changed.
    pub fn set_registry(&mut self, registry: &[SignedDescriptor]) -> bool {
        let mut allowed: BTreeSet<NodeId> = registry.iter().map(|d| d.descriptor.node_id).collect();
        allowed.insert(self.me);
        allowed.extend(self.admissions.keys().copied());
        if allowed == self.allowed {
            return false;
        }
        self.allowed = allowed;
        let allowed = &self.allowed;
        self.entries.retain(|id, _| allowed.contains(id));
        for d in registry {
            let _ = self.merge(d.clone());
        }
        true
    }

    /// Admissions accepted so far (for persistence).
    pub fn admissions(&self) -> Vec<Admission> {
        self.admissions.values().cloned().collect()
    }

    /// The admitted keys.
    pub fn allowed(&self) -> &BTreeSet<NodeId> {
        &self.allowed
    }

    /// Digest over every (node, version, signature) in the table: equal digests mean equal tables.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for (id, e) in &self.entries {
            h.update(id.as_bytes());
            h.update(&e.descriptor.descriptor.version.to_be_bytes());
            h.update(e.descriptor.signature.as_bytes());
        }
        for id in self.admissions.keys() {
            h.update(b"admitted");
            h.update(id.as_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// Number of peers (excluding self) currently up.
    pub fn peers_up(&self) -> usize {
        self.entries.iter().filter(|(id, e)| **id != self.me && e.status == PeerStatus::Up).count()
    }

    /// The table as rows, in node-id order.
    pub fn rows(&self) -> Vec<PeerRow> {
        self.entries
            .iter()
            .map(|(id, e)| PeerRow {
                descriptor: e.descriptor.clone(),
                status: e.status,
                last_seen_ms: e.last_seen_ms,
                is_self: *id == self.me,
            })
            .collect()
    }

    /// Replaces this node's own descriptor (e.g. after a config change); gossip spreads it.
    pub fn set_own(&mut self, own: SignedDescriptor) -> Result<bool, String> {
        if own.descriptor.node_id != self.me {
            return Err("descriptor is not this node's".into());
        }
        self.merge(own)
    }

    /// Keeps `d` if it verifies, its key is admitted and it is newer than what we have.
    fn merge(&mut self, d: SignedDescriptor) -> Result<bool, String> {
        let id = d.descriptor.node_id;
        if !self.allowed.contains(&id) {
            return Err(format!("descriptor of unregistered key {}", id.short()));
        }
        d.verify().map_err(|e| format!("descriptor of {}: {e}", id.short()))?;
        match self.entries.get_mut(&id) {
            Some(e) if e.descriptor.descriptor.version >= d.descriptor.version => Ok(false),
            Some(e) => {
                e.descriptor = d;
                Ok(true)
            }
            None => {
                self.entries.insert(id, Entry { descriptor: d, last_seen_ms: None, status: PeerStatus::Down });
                Ok(true)
            }
        }
    }

    fn mark_seen(&mut self, from: NodeId, now_ms: u64, effects: &mut Vec<Effect>) {
        if let Some(e) = self.entries.get_mut(&from) {
            e.last_seen_ms = Some(e.last_seen_ms.map_or(now_ms, |t| t.max(now_ms)));
            if e.status == PeerStatus::Down {
                e.status = PeerStatus::Up;
                effects.push(Effect::StatusChanged { node: from, status: PeerStatus::Up });
            }
        }
    }

    /// Handles a message from peer `from` at time `now_ms`.
    pub fn on_message(&mut self, from: NodeId, msg: GossipMessage, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if from == self.me || !self.allowed.contains(&from) || !self.entries.contains_key(&from) {
            effects.push(Effect::Rejected { from, reason: "sender is not an admitted peer".into() });
            return effects;
        }
        self.mark_seen(from, now_ms, &mut effects);
        match msg {
            GossipMessage::Hello { digest } => {
                if digest != hex::encode(self.digest()) {
                    for chunk in self.admissions().chunks(TABLE_CHUNK) {
                        effects.push(Effect::SendTo(from, GossipMessage::Admissions(chunk.to_vec())));
                    }
                    let all: Vec<SignedDescriptor> = self.entries.values().map(|e| e.descriptor.clone()).collect();
                    for chunk in all.chunks(TABLE_CHUNK) {
                        effects.push(Effect::SendTo(from, GossipMessage::Descriptors(chunk.to_vec())));
                    }
                }
            }
            GossipMessage::Admissions(list) => {
                for a in list.into_iter().take(MAX_DESCRIPTORS_PER_MESSAGE) {
                    if let Err(reason) = self.admit(a) {
                        effects.push(Effect::Rejected { from, reason });
                    }
                }
            }
            GossipMessage::Descriptors(list) => {
                for d in list.into_iter().take(MAX_DESCRIPTORS_PER_MESSAGE) {
                    if let Err(reason) = self.merge(d) {
                        effects.push(Effect::Rejected { from, reason });
                    }
                }
            }
        }
        effects
    }

    /// Advances time: says hello when due and marks silent peers down.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut effects: Vec<Effect> = self.newly_admitted.drain(..).map(Effect::Admitted).collect();
        let down_after = self.timing.down_after_ms;
        for (id, e) in self.entries.iter_mut() {
            if *id == self.me || e.status == PeerStatus::Down {
                continue;
            }
            let silent = e.last_seen_ms.is_none_or(|t| now_ms.saturating_sub(t) > down_after);
            if silent {
                e.status = PeerStatus::Down;
                effects.push(Effect::StatusChanged { node: *id, status: PeerStatus::Down });
            }
        }
        if now_ms >= self.next_hello_ms {
            self.next_hello_ms = now_ms + self.timing.hello_interval_ms;
            effects.push(Effect::Broadcast(GossipMessage::Hello { digest: hex::encode(self.digest()) }));
        }
        effects
    }

    /// When [`PeerTable::tick`] next has something to do (Unix ms).
    pub fn next_tick_ms(&self) -> u64 {
        self.next_hello_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_crypto::{Admission, Identity};
    use archipel_types::NodeDescriptor;

    fn signed(seed: u64, version: u64) -> (Identity, SignedDescriptor) {
        let id = Identity::from_seed(seed);
        let d = NodeDescriptor {
            node_id: id.node_id(),
            name: format!("n{seed}"),
            operator: "op".into(),
            region: "eu-de".parse().unwrap(),
            country: "DE".parse().unwrap(),
            operator_jurisdiction: "DE".parse().unwrap(),
            capacity: "1GiB".parse().unwrap(),
            roles: "storage".parse().unwrap(),
            p2p_address: format!("127.0.{}.{}:1", seed / 250, seed % 250 + 2).parse().unwrap(),
            p2p_egress_ip: None,
            api_address: format!("127.0.{}.{}:2", seed / 250, seed % 250 + 2).parse().unwrap(),
            version,
        };
        let s = SignedDescriptor::sign(&id, d).unwrap();
        (id, s)
    }

    fn table(me: u64, members: &[u64]) -> PeerTable {
        let descs: Vec<_> = members.iter().map(|s| signed(*s, 1).1).collect();
        let allowed = descs.iter().map(|d| d.descriptor.node_id).collect();
        PeerTable::new(signed(me, 1).1, descs, allowed, MembershipTiming::default())
    }

    fn id(seed: u64) -> NodeId {
        Identity::from_seed(seed).node_id()
    }

    #[test]
    fn hello_marks_up_and_silence_marks_down() {
        let mut t = table(0, &[0, 1, 2]);
        assert_eq!(t.peers_up(), 0);
        let digest = hex::encode(t.digest());
        let fx = t.on_message(id(1), GossipMessage::Hello { digest }, 1_000);
        assert_eq!(fx, vec![Effect::StatusChanged { node: id(1), status: PeerStatus::Up }]);
        assert_eq!(t.peers_up(), 1);
        assert!(t.tick(2_999).iter().all(|e| !matches!(e, Effect::StatusChanged { .. })));
        let fx = t.tick(3_001);
        assert!(fx.contains(&Effect::StatusChanged { node: id(1), status: PeerStatus::Down }));
        assert_eq!(t.peers_up(), 0);
    }

    #[test]
    fn differing_digest_triggers_table_exchange_and_newer_versions_win() {
        let mut a = table(0, &[0, 1]);
        let mut b = table(1, &[0, 1]);
        let (id1, _) = signed(1, 1);
        let mut newer = signed(1, 5).1;
        newer.descriptor.capacity = "9GiB".parse().unwrap();
        let newer = SignedDescriptor::sign(&id1, newer.descriptor).unwrap();
        assert_eq!(b.set_own(newer.clone()), Ok(true));
        assert_ne!(a.digest(), b.digest());
        let fx = a.on_message(id(1), GossipMessage::Hello { digest: hex::encode(b.digest()) }, 10);
        let reply = fx.iter().find_map(|e| match e {
            Effect::SendTo(to, m) if *to == id(1) => Some(m.clone()),
            _ => None,
        });
        assert!(reply.is_some(), "{fx:?}");
        let fx = a.on_message(id(1), GossipMessage::Descriptors(vec![newer]), 11);
        assert!(fx.iter().all(|e| !matches!(e, Effect::Rejected { .. })), "{fx:?}");
        assert_eq!(a.digest(), b.digest());
        // An older version does not replace the newer one.
        a.on_message(id(1), GossipMessage::Descriptors(vec![signed(1, 1).1]), 12);
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn unknown_senders_and_foreign_or_forged_descriptors_are_rejected() {
        let mut t = table(0, &[0, 1]);
        let before = t.digest();
        let fx = t.on_message(id(9), GossipMessage::Hello { digest: String::new() }, 5);
        assert!(matches!(&fx[..], [Effect::Rejected { .. }]));
        // A member relays a descriptor of an unregistered key.
        let fx = t.on_message(id(1), GossipMessage::Descriptors(vec![signed(9, 1).1]), 6);
        assert!(fx.iter().any(|e| matches!(e, Effect::Rejected { reason, .. } if reason.contains("unregistered"))));
        // A member relays a forged descriptor of another member.
        let mut forged = signed(0, 7).1;
        forged.descriptor.operator_jurisdiction = "US".parse().unwrap();
        let fx = t.on_message(id(1), GossipMessage::Descriptors(vec![forged]), 7);
        assert!(fx.iter().any(|e| matches!(e, Effect::Rejected { .. })));
        assert_eq!(t.digest(), before);
        assert_eq!(t.rows().len(), 2);
    }

    #[test]
    fn admissions_need_a_validator_quorum_and_spread_with_the_table() {
        let rule = AdmissionRule { genesis_hash: "gh".into(), validators: vec![id(0), id(1), id(2)] };
        let mut a = table(0, &[0, 1, 2]).with_admission_rule(rule.clone());
        let mut b = table(1, &[0, 1, 2]).with_admission_rule(rule);
        let newcomer = signed(7, 1).1;
        let mut adm = Admission::new("gh", newcomer.clone());
        adm.approve(&Identity::from_seed(0));
        adm.approve(&Identity::from_seed(1));
        assert!(a.admit(adm.clone()).unwrap_err().contains("approvals"), "2 of 3 is not a quorum");
        adm.approve(&Identity::from_seed(2));
        assert_eq!(a.admit(adm.clone()), Ok(true));
        assert_eq!(a.admit(adm.clone()), Ok(false));
        assert!(a.allowed().contains(&id(7)));
        assert!(matches!(&a.tick(0)[0], Effect::Admitted(x) if x == &adm));
        // b learns the admission through the digest exchange, then accepts the newcomer's hello.
        let fx = a.on_message(id(1), GossipMessage::Hello { digest: hex::encode(b.digest()) }, 1);
        for e in fx {
            if let Effect::SendTo(_, m) = e {
                b.on_message(id(0), m, 2);
            }
        }
        assert_eq!(a.digest(), b.digest());
        let fx = b.on_message(id(7), GossipMessage::Hello { digest: hex::encode(b.digest()) }, 3);
        assert_eq!(fx, vec![Effect::StatusChanged { node: id(7), status: PeerStatus::Up }]);
        // Without a rule nothing is admitted after genesis.
        assert!(table(2, &[0, 1, 2]).admit(adm).is_err());
    }

    #[test]
    fn a_large_registry_goes_out_in_messages_within_the_limits() {
        // a holds newer descriptors than b of more registered nodes than one message may carry.
        let n = MAX_DESCRIPTORS_PER_MESSAGE as u64 + 76;
        let at = |version: u64| -> Vec<SignedDescriptor> { (0..n).map(|s| signed(s, version).1).collect() };
        let allowed: BTreeSet<NodeId> = (0..n).map(id).collect();
        let mut a = PeerTable::new(signed(0, 2).1, at(2), allowed.clone(), MembershipTiming::default());
        let mut b = PeerTable::new(signed(1, 2).1, at(1), allowed, MembershipTiming::default());
        let fx = a.on_message(id(1), GossipMessage::Hello { digest: hex::encode(b.digest()) }, 1);
        let sent: Vec<GossipMessage> = fx
            .into_iter()
            .filter_map(|e| match e {
                Effect::SendTo(_, m) => Some(m),
                _ => None,
            })
            .collect();
        assert_eq!(sent.len(), (n as usize).div_ceil(TABLE_CHUNK));
        for m in sent {
            let bytes = m.encode();
            assert!(bytes.len() <= crate::gossip::MAX_GOSSIP_MESSAGE);
            let decoded = GossipMessage::decode(&bytes, crate::gossip::MAX_GOSSIP_MESSAGE).unwrap();
            b.on_message(id(0), decoded, 2);
        }
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn decode_enforces_limits() {
        let msg = GossipMessage::Hello { digest: "ab".into() };
        let bytes = msg.encode();
        assert_eq!(GossipMessage::decode(&bytes, 1024), Ok(msg));
        assert!(GossipMessage::decode(&bytes, 3).is_err());
        assert!(GossipMessage::decode(b"{\"nope\":1}", 1024).is_err());
        let many = GossipMessage::Descriptors(vec![signed(1, 1).1; MAX_DESCRIPTORS_PER_MESSAGE + 1]);
        assert!(GossipMessage::decode(&many.encode(), usize::MAX).unwrap_err().contains("limit"));
    }
}
