//! Who is alive, as each validator hears it: the off-chain half of liveness leases.
//!
//! Every node sends a small heartbeat to the validators every `lease_ttl / 4` over
//! [`LIVENESS_CHANNEL`] (authenticated p2p: the sender is known from the connection, nothing
//! needs signing). A node whose finalized lease is Down adds an [`AliveProof`] to it. Each
//! validator keeps, in a [`Tracker`], when it last heard each node, on its own clock. Proposers
//! turn that into [`LivenessChange`]s for the block ([`Tracker::plan`]); verifiers refuse a block
//! whose changes contradict what they heard themselves ([`Tracker::judge`]).
//!
//! Why off-chain: a lease then measures how long the *validators* have not heard a node, never
//! block time, so a consensus stall, a leader timeout, a halted and resumed network or a
//! validator with a skewed clock cannot expire the lease of a node that kept heartbeating; and
//! the ledger records one change per status change instead of one transaction per node per
//! heartbeat interval.
//!
//! The thresholds leave a margin between proposer and verifiers: a leader proposes `Down` after
//! [`Tracker::down_after`] (`lease_ttl` less one idle block interval) of silence, a verifier
//! accepts it after half the TTL; a leader proposes `Up` for a node heard within half the TTL, a
//! verifier accepts it if it heard the node within the whole TTL. Silence is counted from the
//! tracker's start at the earliest, so a validator that just restarted neither proposes nor
//! accepts a `Down` before it had time to hear everyone. A node is thus marked Down only when a
//! quorum of validators (at least one honest) stopped hearing it: one Byzantine leader cannot mark
//! a live node Down, and a partitioned or crashed validator changes nothing.

use archipel_crypto::Identity;
use archipel_ledger::{AliveProof, LeaseStatus, LivenessChange, State};
use archipel_types::NodeId;
use commonware_cryptography::ed25519::PublicKey;
use commonware_p2p::{Receiver, Recipients, Sender};
use commonware_runtime::Clock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// p2p channel of heartbeats (every node → validators).
pub const LIVENESS_CHANNEL: u64 = 8;

/// Heartbeat wire format version.
const VERSION: u8 = 1;
/// A heartbeat: version and flag, plus the proof when the flag is set.
const HEARTBEAT_BYTES: usize = 2;
const HEARTBEAT_WITH_PROOF_BYTES: usize = 2 + 8 + 64;

/// Encodes a heartbeat, with this node's alive proof when its lease is Down.
pub fn encode_heartbeat(proof: Option<&AliveProof>) -> Vec<u8> {
    match proof {
        None => vec![VERSION, 0],
        Some(p) => {
            let mut out = Vec::with_capacity(HEARTBEAT_WITH_PROOF_BYTES);
            out.extend_from_slice(&[VERSION, 1]);
            out.extend_from_slice(&p.at_height.to_be_bytes());
            out.extend_from_slice(&p.signature);
            out
        }
    }
}

/// Decodes a heartbeat: `Ok(proof)` or why it is malformed.
pub fn decode_heartbeat(bytes: &[u8]) -> Result<Option<AliveProof>, &'static str> {
    match bytes {
        [VERSION, 0] => Ok(None),
        [VERSION, 1, rest @ ..] if rest.len() == HEARTBEAT_WITH_PROOF_BYTES - HEARTBEAT_BYTES => {
            let (height, signature) = rest.split_at(8);
            Ok(Some(AliveProof {
                at_height: u64::from_be_bytes(height.try_into().map_err(|_| "bad height")?),
                signature: signature.try_into().map_err(|_| "bad signature length")?,
            }))
        }
        [VERSION, ..] => Err("wrong length for its flag"),
        _ => Err("unknown version"),
    }
}

#[derive(Clone, Copy, Debug)]
struct Heard {
    at: SystemTime,
    proof: Option<AliveProof>,
}

/// When this validator last heard each node.
#[derive(Debug)]
pub struct Tracker {
    ttl: Duration,
    down_after: Duration,
    started: SystemTime,
    heard: HashMap<NodeId, Heard>,
    /// When this validator last proposed a change for a node: a change its peers refused (the
    /// view failed) is not proposed again for a TTL, so a node heard by some validators and not
    /// by others costs a view now and then, never the chain's progress.
    proposed: HashMap<NodeId, SystemTime>,
}

impl Tracker {
    /// A tracker started at `now` for leases of `lease_ttl`; `idle_block` is the longest a leader
    /// waits before proposing an empty block (a `Down` can wait that long for its block).
    pub fn new(lease_ttl: Duration, idle_block: Duration, now: SystemTime) -> Self {
        let down_after = lease_ttl.saturating_sub(idle_block).max(lease_ttl * 3 / 4);
        Self { ttl: lease_ttl, down_after, started: now, heard: HashMap::new(), proposed: HashMap::new() }
    }

    /// Silence after which a proposer marks a node Down.
    pub fn down_after(&self) -> Duration {
        self.down_after
    }

    /// `node` was heard at `now`, with its alive proof if it sent one.
    pub fn heard(&mut self, node: NodeId, now: SystemTime, proof: Option<AliveProof>) {
        self.heard.insert(node, Heard { at: now, proof });
    }

    /// How long `node` has been silent at `now` (counted from the tracker's start at most).
    pub fn silent_for(&self, node: &NodeId, now: SystemTime) -> Duration {
        let last = self.heard.get(node).map_or(self.started, |h| h.at.max(self.started));
        now.duration_since(last).unwrap_or_default()
    }

    /// Whether this tracker has run for a whole TTL: before that, a silence may only mean that
    /// connections are still forming (after a restart), so no Down is proposed or accepted.
    fn settled(&self, now: SystemTime) -> bool {
        now.duration_since(self.started).unwrap_or_default() >= self.ttl
    }

    /// Whether `node` was heard since this tracker started, within `within`.
    fn heard_within(&self, node: &NodeId, now: SystemTime, within: Duration) -> bool {
        self.heard.get(node).is_some_and(|h| now.duration_since(h.at).unwrap_or_default() <= within)
    }

    /// Whether a change for `node` was proposed here within the last TTL.
    fn recently_proposed(&self, node: &NodeId, now: SystemTime) -> bool {
        self.proposed.get(node).is_some_and(|at| now.duration_since(*at).unwrap_or_default() < self.ttl)
    }

    /// The liveness changes a proposer puts into the block after `state` (at most `max`): Down
    /// for Up nodes silent for [`Tracker::down_after`], Up for Down nodes heard within half the
    /// TTL whose latest proof is recent enough to apply; at most one proposal per node per TTL
    /// (a change still not in `state` a TTL later is proposed again). Records what it planned.
    pub fn plan(&mut self, state: &State, now: SystemTime, max: usize) -> Vec<LivenessChange> {
        let mut out = Vec::new();
        let settled = self.settled(now);
        for (node, lease) in &state.leases() {
            if out.len() >= max {
                break;
            }
            if self.recently_proposed(node, now) {
                continue;
            }
            let silent = self.silent_for(node, now);
            match lease.status {
                LeaseStatus::Up if settled && silent >= self.down_after => {
                    out.push(LivenessChange::Down { node: *node })
                }
                LeaseStatus::Down if self.heard_within(node, now, self.ttl / 2) => {
                    let proof = self.heard.get(node).and_then(|h| h.proof);
                    if let Some(proof) = proof.filter(|p| p.at_height >= lease.since_height) {
                        out.push(LivenessChange::Up { node: *node, proof });
                    }
                }
                _ => {}
            }
        }
        for change in &out {
            self.proposed.insert(change.node(), now);
        }
        out
    }

    /// Whether this validator agrees with `change` at `now` (what it heard itself); the state
    /// machine checks the rest.
    pub fn judge(&self, change: &LivenessChange, now: SystemTime) -> Result<(), String> {
        let node = change.node();
        let silent = self.silent_for(&node, now);
        match change {
            LivenessChange::Down { .. } if !self.settled(now) => {
                Err(format!("marks node {} down, but this validator started less than a lease ago", node.short()))
            }
            LivenessChange::Down { .. } if silent < self.ttl / 2 => Err(format!(
                "marks node {} down, but this validator heard it {} ms ago",
                node.short(),
                silent.as_millis()
            )),
            LivenessChange::Up { .. } if !self.heard_within(&node, now, self.ttl) => {
                Err(format!("marks node {} up, but this validator has not heard it within a lease", node.short()))
            }
            _ => Ok(()),
        }
    }

    /// Forgets nodes no longer in `state`'s registry (bounded memory).
    pub fn retain_registered(&mut self, state: &State) {
        self.heard.retain(|node, _| state.nodes().contains_key(node));
        self.proposed.retain(|node, _| state.nodes().contains_key(node));
    }
}

/// A tracker shared between the heartbeat receiver and the application.
pub type SharedTracker = Arc<Mutex<Tracker>>;

/// The heartbeat interval for a lease TTL: four chances per lease.
pub fn heartbeat_interval(lease_ttl: Duration) -> Duration {
    (lease_ttl / 4).max(Duration::from_millis(1))
}

fn node_id(pk: &PublicKey) -> NodeId {
    let mut id = [0u8; 32];
    id.copy_from_slice(pk.as_ref());
    NodeId(id)
}

/// What a heartbeat of `identity`'s node says now: a proof when its finalized lease is Down.
fn own_heartbeat(identity: &Identity, chain: &crate::Chain) -> Vec<u8> {
    let me = identity.node_id();
    let proof = chain.with_state(|s| match s.lease(&me) {
        Some(lease) if lease.status == LeaseStatus::Down => {
            Some(AliveProof::sign(identity, &s.network(), s.chain().height))
        }
        _ => None,
    });
    encode_heartbeat(proof.as_ref())
}

/// Runs on every node: sends a heartbeat to the validators every [`heartbeat_interval`]; on a
/// validator also records its own in `tracker`.
pub async fn send_heartbeats<E: Clock, S: Sender<PublicKey = PublicKey>>(
    context: E,
    identity: Identity,
    chain: Arc<crate::Chain>,
    mut sender: S,
    validators: Vec<PublicKey>,
    tracker: Option<SharedTracker>,
) {
    let me = identity.node_id();
    let others: Vec<PublicKey> = validators.into_iter().filter(|v| node_id(v) != me).collect();
    let every = heartbeat_interval(Duration::from_millis(chain.with_state(|s| s.params().lease_ttl_ms)));
    loop {
        let registered = chain.with_state(|s| s.nodes().contains_key(&me));
        if registered {
            let message = own_heartbeat(&identity, &chain);
            if let Some(t) = &tracker {
                let proof = decode_heartbeat(&message).ok().flatten();
                crate::lock(t).heard(me, context.current(), proof);
            }
            if !others.is_empty() {
                let _ = sender.send(Recipients::Some(others.clone()), message, false);
            }
        }
        context.sleep(every).await;
    }
}

/// Runs on validators: records every heartbeat received in `tracker`. Malformed ones are
/// dropped (the sender is authenticated, so it only hurts itself).
pub async fn receive_heartbeats<E: Clock, R: Receiver<PublicKey = PublicKey>>(
    context: E,
    mut receiver: R,
    tracker: SharedTracker,
) {
    while let Ok((peer, message)) = receiver.recv().await {
        match decode_heartbeat(message.as_ref()) {
            Ok(proof) => crate::lock(&tracker).heard(node_id(&peer), context.current(), proof),
            Err(why) => tracing::debug!(peer = %peer, why, "ignoring a malformed heartbeat"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use archipel_crypto::SignedDescriptor;
    use archipel_crypto::test_support::example_descriptor;
    use archipel_ledger::{GenesisState, Hash};

    const TTL: Duration = Duration::from_millis(2_000);

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_000_000 + ms)
    }

    fn state_with(nodes: &[u64]) -> State {
        let nodes = nodes
            .iter()
            .map(|s| {
                SignedDescriptor::sign(&Identity::from_seed(*s), example_descriptor(&Identity::from_seed(*s))).unwrap()
            })
            .collect();
        State::genesis(GenesisState { nodes, network: Hash([3; 32]), ..GenesisState::default() })
    }

    fn id(seed: u64) -> NodeId {
        Identity::from_seed(seed).node_id()
    }

    #[test]
    fn heartbeats_round_trip_and_garbage_is_refused() {
        assert_eq!(decode_heartbeat(&encode_heartbeat(None)), Ok(None));
        let p = AliveProof::sign(&Identity::from_seed(1), &Hash([3; 32]), 42);
        assert_eq!(decode_heartbeat(&encode_heartbeat(Some(&p))), Ok(Some(p)));
        for bad in [&[][..], &[9, 0], &[VERSION, 1, 0], &[VERSION, 0, 0], &[VERSION, 2]] {
            assert!(decode_heartbeat(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_silent_node_goes_down_and_comes_back_with_a_proof() {
        let mut s = state_with(&[1, 2]);
        let mut t = Tracker::new(TTL, Duration::from_millis(250), at(0));
        // Never heard and the tracker just started: nothing to say yet.
        assert!(t.plan(&s, at(100), 10).is_empty());
        // Node 1 heartbeats with a proof: it goes up; node 2 stays down (never heard).
        let proof = AliveProof::sign(&Identity::from_seed(1), &s.network(), 0);
        t.heard(id(1), at(200), Some(proof));
        let plan = t.plan(&s, at(300), 10);
        assert_eq!(plan, vec![LivenessChange::Up { node: id(1), proof }]);
        s.begin_block(1, 0);
        s.apply_liveness(&plan[0]).unwrap();
        // Heard without a proof from now on: stays up while heard.
        for ms in (500..=5_000).step_by(500) {
            t.heard(id(1), at(ms), None);
            assert!(t.plan(&s, at(ms + 100), 10).is_empty(), "at {ms}");
        }
        // Silent: down once the leader's threshold passed, not before.
        assert!(t.plan(&s, at(5_000) + t.down_after() - Duration::from_millis(1), 10).is_empty());
        let plan = t.plan(&s, at(5_000) + t.down_after(), 10);
        assert_eq!(plan, vec![LivenessChange::Down { node: id(1) }]);
        s.begin_block(2, 0);
        s.apply_liveness(&plan[0]).unwrap();
        // The old proof is too old for the new Down: no Up until a fresh one.
        t.heard(id(1), at(9_000), Some(proof));
        assert!(t.plan(&s, at(9_100), 10).is_empty());
        let fresh = AliveProof::sign(&Identity::from_seed(1), &s.network(), 2);
        t.heard(id(1), at(9_500), Some(fresh));
        assert_eq!(t.plan(&s, at(9_600), 10), vec![LivenessChange::Up { node: id(1), proof: fresh }]);
        assert_eq!(t.plan(&s, at(9_600), 0), vec![], "bounded");
    }

    #[test]
    fn verifiers_refuse_changes_that_contradict_what_they_heard() {
        let mut t = Tracker::new(TTL, Duration::from_millis(250), at(0));
        let down = LivenessChange::Down { node: id(1) };
        // Just (re)started: no Down is accepted for a lease (connections may still be forming).
        let e = t.judge(&down, at(1_500)).unwrap_err();
        assert!(e.contains("started less than a lease ago"), "{e}");
        assert!(t.judge(&down, at(2_000)).is_ok());
        t.heard(id(1), at(2_000), None);
        let e = t.judge(&down, at(2_500)).unwrap_err();
        assert!(e.contains("heard it 500 ms ago"), "{e}");
        assert!(t.judge(&down, at(3_000)).is_ok());
        // Up only for a node actually heard since the start, within a lease.
        let up = LivenessChange::Up { node: id(1), proof: AliveProof { at_height: 0, signature: [0; 64] } };
        assert!(t.judge(&up, at(4_000)).is_ok());
        assert!(t.judge(&up, at(4_001)).unwrap_err().contains("has not heard it"));
        let never = LivenessChange::Up { node: id(2), proof: AliveProof { at_height: 0, signature: [0; 64] } };
        assert!(t.judge(&never, at(100)).unwrap_err().contains("has not heard it"), "not even just after a start");
    }

    #[test]
    fn a_refused_change_is_proposed_again_only_a_lease_later() {
        // Node 1 is heard by some validators and not by this one: its Down is refused by the
        // others, the view fails, the state does not change. Proposing it in every view would
        // stall the chain; once per lease costs a view now and then.
        let mut s = state_with(&[1]);
        s.begin_block(1, 0);
        let p = AliveProof::sign(&Identity::from_seed(1), &s.network(), 0);
        s.apply_liveness(&LivenessChange::Up { node: id(1), proof: p }).unwrap();
        let mut t = Tracker::new(TTL, Duration::from_millis(250), at(0));
        assert_eq!(t.plan(&s, at(3_000), 10), vec![LivenessChange::Down { node: id(1) }]);
        assert!(t.plan(&s, at(3_100), 10).is_empty(), "not again in the next view");
        assert!(t.plan(&s, at(4_999), 10).is_empty());
        assert_eq!(t.plan(&s, at(5_000), 10), vec![LivenessChange::Down { node: id(1) }], "a lease later");
        // A node that leaves the registry is forgotten.
        t.retain_registered(&state_with(&[]));
        assert!(t.proposed.is_empty() && t.heard.is_empty());
    }

    #[test]
    fn a_stall_or_a_clock_jump_of_block_time_changes_nothing() {
        // The tracker never looks at block time: a state whose block time jumped by minutes
        // still gets no Down for a node heard recently.
        let mut s = state_with(&[1]);
        s.begin_block(1, 0);
        let p = AliveProof::sign(&Identity::from_seed(1), &s.network(), 0);
        s.apply_liveness(&LivenessChange::Up { node: id(1), proof: p }).unwrap();
        s.begin_block(2, 10 * 60 * 1_000);
        let mut t = Tracker::new(TTL, Duration::from_millis(250), at(0));
        t.heard(id(1), at(3_000), None);
        assert!(t.plan(&s, at(3_400), 10).is_empty());
    }
}
