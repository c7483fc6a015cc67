//! Who is alive, as each validator hears it: the off-chain half of liveness leases.
//!
//! Every node sends a small heartbeat to the validators every `lease_ttl / 4` over
//! [`LIVENESS_CHANNEL`] (authenticated p2p: the sender is known from the connection, nothing
//! needs signing). A node whose finalized lease is Down adds an [`AliveProof`] to it. Each
//! validator keeps, in a [`Tracker`], when it last heard each node, on its own clock. Proposers
//! turn that into [`LivenessChange`]s for the block ([`Tracker::plan`]); verifiers refuse a block
//! whose changes contradict what they heard themselves ([`Tracker::judge`]). Validators' heartbeats
//! carry a [`Report`] of the changes they would accept, and a proposer proposes a change only when
//! a quorum of validators reported it, so a node heard by some validators and not by others cannot
//! make views fail.
//!
//! Why off-chain: a lease then measures how long the *validators* have not heard a node, never
//! block time, so a consensus stall, a leader timeout, a halted and resumed network or a
//! validator with a skewed clock cannot expire the lease of a node that kept heartbeating; and
//! the ledger records one change per status change instead of one transaction per node per
//! heartbeat interval.
//!
//! The thresholds leave a margin between proposer and verifiers: a leader proposes `Down` after
//! [`Tracker::down_after`] (`lease_ttl` less how often an idle leader plans again) of silence, a verifier
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
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// p2p channel of heartbeats (every node → validators).
pub const LIVENESS_CHANNEL: u64 = 8;

/// Heartbeat wire format version without a report (every node).
const VERSION: u8 = 1;
/// Heartbeat wire format version with a validator's [`Report`].
const VERSION_REPORT: u8 = 2;
/// A heartbeat: version and flag, plus the proof when the flag is set.
const HEARTBEAT_BYTES: usize = 2;
const PROOF_BYTES: usize = 8 + 64;
/// Most nodes in each list of a [`Report`]: the registry's largest size, so a list is never cut
/// (a cut list would let nodes with ground low ids crowd honest ones out of every report).
pub const MAX_REPORTED: usize = archipel_ledger::params::MAX_REGISTERED_NODES_LIMIT as usize;
/// Largest heartbeat: version, flag, proof and two counts, and at most [`MAX_REPORTED`] ids in all
/// (a node is Up or Down, so it is in one list at most).
pub const MAX_HEARTBEAT_BYTES: usize = HEARTBEAT_BYTES + PROOF_BYTES + 4 + MAX_REPORTED * 32;
/// How long another validator's report counts: one heartbeat interval and half another, so one
/// late report does not drop the backing, while a report of silence stops counting soon after
/// the node was heard again.
fn report_fresh(ttl: Duration) -> Duration {
    heartbeat_interval(ttl) * 3 / 2
}

/// What a validator tells the others with its heartbeats: the changes it would accept now. A
/// leader proposes a change only when a quorum of validators (itself included) reported it
/// lately, so a node that heartbeats to some validators only cannot make the others propose
/// `Down`s that are refused (each refused proposal costs a view and its timeout).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Up nodes this validator has not heard for half a lease (it would accept their `Down`).
    pub silent: Vec<NodeId>,
    /// Down nodes it heard within half a lease (it would accept their `Up`).
    pub heard: Vec<NodeId>,
}

/// A [`Report`] as sets, for lookups.
#[derive(Clone, Debug, Default)]
pub struct ReportSets {
    silent: HashSet<NodeId>,
    heard: HashSet<NodeId>,
}

impl From<Report> for ReportSets {
    fn from(r: Report) -> Self {
        Self { silent: r.silent.into_iter().collect(), heard: r.heard.into_iter().collect() }
    }
}

/// A decoded heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// The sender's alive proof, when its finalized lease is Down.
    pub proof: Option<AliveProof>,
    /// A validator's report (see [`Report`]).
    pub report: Option<Report>,
}

/// Encodes a heartbeat: version 1 without a report, 2 with one (at most [`MAX_REPORTED`] ids in
/// all, which a report of a registry cannot pass; beyond, the rest is left out).
pub fn encode_heartbeat(heartbeat: &Heartbeat) -> Vec<u8> {
    let version = if heartbeat.report.is_some() { VERSION_REPORT } else { VERSION };
    let mut out = Vec::with_capacity(HEARTBEAT_BYTES + PROOF_BYTES);
    out.extend_from_slice(&[version, u8::from(heartbeat.proof.is_some())]);
    if let Some(p) = &heartbeat.proof {
        out.extend_from_slice(&p.at_height.to_be_bytes());
        out.extend_from_slice(&p.signature);
    }
    if let Some(r) = &heartbeat.report {
        let mut room = MAX_REPORTED;
        for list in [&r.silent, &r.heard] {
            let n = list.len().min(room);
            room -= n;
            out.extend_from_slice(&(n as u16).to_be_bytes());
            for id in &list[..n] {
                out.extend_from_slice(&id.0);
            }
        }
    }
    out
}

/// Decodes a heartbeat, or says why it is malformed.
pub fn decode_heartbeat(bytes: &[u8]) -> Result<Heartbeat, &'static str> {
    let [version, flag, rest @ ..] = bytes else { return Err("too short") };
    if *version != VERSION && *version != VERSION_REPORT {
        return Err("unknown version");
    }
    let (proof, rest) = match flag {
        0 => (None, rest),
        1 => {
            let (proof, rest) = rest.split_at_checked(PROOF_BYTES).ok_or("proof cut short")?;
            let (height, signature) = proof.split_at(8);
            let proof = AliveProof {
                at_height: u64::from_be_bytes(height.try_into().map_err(|_| "bad height")?),
                signature: signature.try_into().map_err(|_| "bad signature length")?,
            };
            (Some(proof), rest)
        }
        _ => return Err("unknown flag"),
    };
    if *version == VERSION {
        return if rest.is_empty() { Ok(Heartbeat { proof, report: None }) } else { Err("wrong length for its flag") };
    }
    let mut at = rest;
    let mut list = || -> Result<Vec<NodeId>, &'static str> {
        let (n, tail) = at.split_at_checked(2).ok_or("report cut short")?;
        let n = u16::from_be_bytes([n[0], n[1]]) as usize;
        if n > MAX_REPORTED {
            return Err("report list too long");
        }
        let (ids, tail) = tail.split_at_checked(n * 32).ok_or("report cut short")?;
        at = tail;
        Ok(ids.chunks_exact(32).map(|c| NodeId(c.try_into().unwrap_or([0; 32]))).collect())
    };
    let silent = list()?;
    let heard = list()?;
    if silent.len() + heard.len() > MAX_REPORTED {
        return Err("report lists too long together");
    }
    if !at.is_empty() {
        return Err("trailing bytes after the report");
    }
    Ok(Heartbeat { proof, report: Some(Report { silent, heard }) })
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
    /// The changes of this validator's last proposal with any, not yet judged: the next plan
    /// looks whether its parent state has them (see [`Tracker::plan`]).
    last: Vec<LivenessChange>,
    /// Nodes whose change was in a proposal of several that failed: each is next proposed alone,
    /// so one refused change cannot keep the others out for ever.
    alone: Vec<NodeId>,
    /// Nodes whose change, proposed alone, failed: how often in a row, and until when it is not
    /// proposed again ([`Tracker::backoff`]).
    failed: HashMap<NodeId, (u32, SystemTime)>,
    /// Every validator (this one too, if it is one): a change needs [`Tracker::needed`] reports.
    validators: Vec<NodeId>,
    /// This node.
    me: Option<NodeId>,
    /// The latest report of each other validator, and when it came.
    reports: HashMap<NodeId, (SystemTime, ReportSets)>,
}

/// Most doublings of the wait before a change that failed alone is proposed again: 4 leases. A
/// failure is read from the next parent (the change is missing), which cannot tell a refused
/// change from a view lost for other reasons (a lossy link, a timeout after planning), so the
/// wait stays short: a dead node's `Down` is never held back long by views lost around it.
const MAX_BACKOFF_DOUBLINGS: u32 = 2;

impl Tracker {
    /// A tracker started at `now` for leases of `lease_ttl`; `replan` is the longest a waiting
    /// leader goes without planning again (`app::LIVENESS_RECHECK`: a `Down` can wait that long
    /// for its block).
    pub fn new(lease_ttl: Duration, replan: Duration, now: SystemTime) -> Self {
        let down_after = lease_ttl.saturating_sub(replan).max(lease_ttl * 3 / 4);
        Self {
            ttl: lease_ttl,
            down_after,
            started: now,
            heard: HashMap::new(),
            proposed: HashMap::new(),
            last: Vec::new(),
            alone: Vec::new(),
            failed: HashMap::new(),
            validators: Vec::new(),
            me: None,
            reports: HashMap::new(),
        }
    }

    /// This tracker for validator `me` among `validators`: its changes then need the reports of a
    /// quorum (see [`Report`]). Without it (a single validator, or tests of one tracker alone),
    /// none are needed.
    pub fn with_validators(mut self, validators: &[PublicKey], me: NodeId) -> Self {
        self.validators = validators.iter().map(node_id).collect();
        self.me = Some(me);
        self
    }

    /// How many other validators' fresh reports a change needs: a quorum (2f + 1 of 3f + 1)
    /// less this validator.
    fn needed(&self) -> usize {
        let n = self.validators.len();
        if n <= 1 {
            return 0;
        }
        let quorum = n - (n - 1) / 3;
        quorum - usize::from(self.me.is_some_and(|me| self.validators.contains(&me)))
    }

    /// How many other validators reported, within [`report_fresh`] of `now` (1.5 heartbeat
    /// intervals), that they would accept a `Down` (`silent`) or an `Up` (not `silent`) for `node`.
    fn backing(&self, node: &NodeId, now: SystemTime, silent: bool) -> usize {
        self.reports
            .values()
            .filter(|(at, r)| {
                now.duration_since(*at).unwrap_or_default() <= report_fresh(self.ttl)
                    && if silent { r.silent.contains(node) } else { r.heard.contains(node) }
            })
            .count()
    }

    /// Whether reports from `from` count (another validator's).
    pub fn counts_reports_of(&self, from: &NodeId) -> bool {
        Some(*from) != self.me && self.validators.contains(from)
    }

    /// Records `from`'s report, received at `now` (ignored unless `from` is another validator).
    /// The sets are built by the caller, outside the tracker's lock ([`ReportSets::from`]).
    pub fn reported(&mut self, from: NodeId, now: SystemTime, report: ReportSets) {
        if self.counts_reports_of(&from) {
            self.reports.insert(from, (now, report));
        }
    }

    /// This validator's report at `now` against `state`: what [`Tracker::judge`] would accept
    /// (half a lease of silence for a `Down`; for an `Up`, hearing within half a lease with a
    /// proof recent enough to apply, as [`Tracker::plan`] asks). Sorted by id.
    pub fn report(&self, state: &State, now: SystemTime) -> Report {
        let mut report = Report::default();
        let settled = self.settled(now);
        for (node, lease) in state.leases() {
            match lease.status {
                LeaseStatus::Up if settled && self.silent_for(&node, now) >= self.ttl / 2 => report.silent.push(node),
                LeaseStatus::Down
                    if self.heard_within(&node, now, self.ttl / 2) && self.usable_proof(&node, &lease, state) =>
                {
                    report.heard.push(node)
                }
                _ => {}
            }
        }
        report
    }

    /// Whether `node`'s latest proof fits its Down `lease` in a block after `state`: signed at
    /// or after the Down, at a finalized height (its signature was checked on arrival).
    fn usable_proof(&self, node: &NodeId, lease: &archipel_ledger::Lease, state: &State) -> bool {
        self.heard
            .get(node)
            .and_then(|h| h.proof)
            .is_some_and(|p| p.at_height >= lease.since_height && p.at_height <= state.chain().height)
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
    ///
    /// A proposal whose changes `state` (the next proposal's parent) lacks failed: its view was
    /// nullified, most likely because other validators heard a node this one did not. Then each
    /// of its changes is next proposed alone, and a change that fails alone waits
    /// [`Tracker::backoff`] (a lease, doubling with each failure in a row, up to 4) before it is
    /// proposed again. Changes are proposed only with a quorum's reports, so such failures are
    /// races (a verifier heard the node since it reported); the retries keep one refused change
    /// from holding a dead node's Down out of blocks beside it, and the back-off bounds what a
    /// node timing its heartbeats to make such races costs.
    pub fn plan(&mut self, state: &State, now: SystemTime, max: usize) -> Vec<LivenessChange> {
        self.judge_last(state, now);
        let mut out = Vec::new();
        let settled = self.settled(now);
        self.alone.retain(|node| state.lease(node).is_some());
        for (node, lease) in &state.leases() {
            if out.len() >= max {
                break;
            }
            if self.recently_proposed(node, now) || self.failed.get(node).is_some_and(|(_, until)| now < *until) {
                continue;
            }
            let silent = self.silent_for(node, now);
            match lease.status {
                LeaseStatus::Up
                    if settled && silent >= self.down_after && self.backing(node, now, true) >= self.needed() =>
                {
                    out.push(LivenessChange::Down { node: *node })
                }
                LeaseStatus::Down
                    if self.heard_within(node, now, self.ttl / 2)
                        && self.backing(node, now, false) >= self.needed()
                        && self.usable_proof(node, lease, state) =>
                {
                    if let Some(proof) = self.heard.get(node).and_then(|h| h.proof) {
                        out.push(LivenessChange::Up { node: *node, proof });
                    }
                }
                _ => {}
            }
        }
        // A change of a failed proposal goes alone (the first one due, if any is).
        if let Some(retry) = out.iter().position(|c| self.alone.contains(&c.node())) {
            let change = out.swap_remove(retry);
            self.alone.retain(|node| *node != change.node());
            out = vec![change];
        }
        for change in &out {
            self.proposed.insert(change.node(), now);
        }
        if !out.is_empty() {
            tracing::debug!(changes = ?out.iter().map(|c| (c.node().short(), matches!(c, LivenessChange::Up { .. }))).collect::<Vec<_>>(), "liveness changes proposed");
        }
        self.last.clone_from(&out);
        out
    }

    /// How long a change that failed alone `failures` times in a row waits before it is proposed
    /// again: a lease, doubled with each failure after the first, at most
    /// 2^[`MAX_BACKOFF_DOUBLINGS`] (4) leases.
    pub fn backoff(&self, failures: u32) -> Duration {
        self.ttl * (1u32 << failures.saturating_sub(1).min(MAX_BACKOFF_DOUBLINGS))
    }

    /// Judges this validator's last proposal with changes against `state`, the parent of the
    /// proposal being planned: a change `state` shows landed (or whose node left); if any is
    /// missing, the proposal failed.
    fn judge_last(&mut self, state: &State, now: SystemTime) {
        let last = std::mem::take(&mut self.last);
        let landed = |c: &LivenessChange| state.lease(&c.node()).is_none_or(|l| l.status == c.status());
        if last.iter().all(landed) {
            for c in &last {
                self.failed.remove(&c.node());
            }
            return;
        }
        match last.as_slice() {
            [only] => {
                let failures = self.failed.get(&only.node()).map_or(0, |(n, _)| *n).saturating_add(1);
                let until = now + self.backoff(failures);
                self.failed.insert(only.node(), (failures, until));
                tracing::debug!(node = %only.node().short(), failures, "a liveness change proposed alone failed: backing off");
            }
            several => {
                for c in several {
                    if !self.alone.contains(&c.node()) {
                        self.alone.push(c.node());
                    }
                }
            }
        }
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
        self.failed.retain(|node, _| state.nodes().contains_key(node));
        self.alone.retain(|node| state.nodes().contains_key(node));
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

/// What a heartbeat of `identity`'s node says at `now`: a proof when its finalized lease is
/// Down; on a validator (with its `tracker`), its report.
fn own_heartbeat(
    identity: &Identity,
    chain: &crate::Chain,
    tracker: Option<&SharedTracker>,
    now: SystemTime,
) -> Heartbeat {
    let me = identity.node_id();
    chain.with_state(|s| {
        let proof = match s.lease(&me) {
            Some(lease) if lease.status == LeaseStatus::Down => {
                Some(AliveProof::sign(identity, &s.network(), s.chain().height))
            }
            _ => None,
        };
        let report = tracker.map(|t| crate::lock(t).report(s, now));
        Heartbeat { proof, report }
    })
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
            let now = context.current();
            let heartbeat = own_heartbeat(&identity, &chain, tracker.as_ref(), now);
            if let Some(t) = &tracker {
                crate::lock(t).heard(me, now, heartbeat.proof);
            }
            if !others.is_empty() {
                let _ = sender.send(Recipients::Some(others.clone()), encode_heartbeat(&heartbeat), false);
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
    network: archipel_ledger::Hash,
) {
    while let Ok((peer, message)) = receiver.recv().await {
        match decode_heartbeat(message.as_ref()) {
            Ok(Heartbeat { proof, report }) => {
                let (node, now) = (node_id(&peer), context.current());
                // A proof that does not verify is kept out (an Up planned on it would be dropped
                // from the block, and count as a failed proposal).
                let proof = proof.filter(|p| {
                    let ok = p.verify(&network, &node);
                    if !ok {
                        tracing::debug!(peer = %peer, "ignoring a heartbeat's alive proof that does not verify");
                    }
                    ok
                });
                // Only validators' reports count: others' are not even turned into sets, and the
                // sets are built outside the lock, which a proposer waits for.
                let counts = report.is_some() && crate::lock(&tracker).counts_reports_of(&node);
                let sets = report.filter(|_| counts).map(ReportSets::from);
                let mut t = crate::lock(&tracker);
                t.heard(node, now, proof);
                if let Some(sets) = sets {
                    t.reported(node, now, sets);
                }
            }
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
    use commonware_cryptography::Signer as _;

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
        let plain = Heartbeat::default();
        assert_eq!(encode_heartbeat(&plain), vec![VERSION, 0], "version 1 as before");
        assert_eq!(decode_heartbeat(&encode_heartbeat(&plain)), Ok(plain));
        let p = AliveProof::sign(&Identity::from_seed(1), &Hash([3; 32]), 42);
        let proof = Heartbeat { proof: Some(p), report: None };
        assert_eq!(decode_heartbeat(&encode_heartbeat(&proof)), Ok(proof));
        let report = Report { silent: vec![id(1), id(2)], heard: vec![id(3)] };
        for proof in [None, Some(p)] {
            let h = Heartbeat { proof, report: Some(report.clone()) };
            let bytes = encode_heartbeat(&h);
            assert_eq!(bytes[0], VERSION_REPORT);
            assert_eq!(decode_heartbeat(&bytes), Ok(h));
            for cut in 0..bytes.len() {
                assert!(decode_heartbeat(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode_heartbeat(&longer).is_err(), "trailing byte");
        }
        for bad in [&[][..], &[9, 0], &[VERSION, 1, 0], &[VERSION, 0, 0], &[VERSION, 2], &[VERSION_REPORT, 0, 0]] {
            assert!(decode_heartbeat(bad).is_err(), "{bad:?}");
        }
        // A list longer than the limit is refused, and never encoded.
        let mut too_long = vec![VERSION_REPORT, 0];
        too_long.extend_from_slice(&((MAX_REPORTED + 1) as u16).to_be_bytes());
        too_long.extend(std::iter::repeat_n(0u8, (MAX_REPORTED + 1) * 32));
        too_long.extend_from_slice(&[0, 0]);
        assert_eq!(decode_heartbeat(&too_long), Err("report list too long"));
        let many = Report { silent: vec![id(1); MAX_REPORTED - 5], heard: vec![id(2); 10] };
        let bytes = encode_heartbeat(&Heartbeat { proof: Some(p), report: Some(many) });
        assert_eq!(bytes.len(), MAX_HEARTBEAT_BYTES, "the largest heartbeat");
        let r = decode_heartbeat(&bytes).unwrap().report.unwrap();
        assert_eq!((r.silent.len(), r.heard.len()), (MAX_REPORTED - 5, 5), "at most MAX_REPORTED ids in all");
        let mut both_full = vec![VERSION_REPORT, 0];
        for _ in 0..2 {
            both_full.extend_from_slice(&(MAX_REPORTED as u16).to_be_bytes());
            both_full.extend(std::iter::repeat_n(0u8, MAX_REPORTED * 32));
        }
        assert_eq!(decode_heartbeat(&both_full), Err("report lists too long together"));
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
        // Found failed at 3,100 (the state lacks it): a lease from then.
        assert!(t.plan(&s, at(5_099), 10).is_empty());
        assert_eq!(t.plan(&s, at(5_100), 10), vec![LivenessChange::Down { node: id(1) }], "a lease later");
        // A node that leaves the registry is forgotten.
        assert!(t.plan(&s, at(5_200), 10).is_empty());
        assert!(!t.failed.is_empty());
        t.retain_registered(&state_with(&[]));
        assert!(t.proposed.is_empty() && t.heard.is_empty() && t.failed.is_empty());
    }

    /// A state where the nodes of `seeds` are registered and Up.
    fn all_up(seeds: &[u64]) -> State {
        let mut s = state_with(seeds);
        s.begin_block(1, 0);
        for seed in seeds {
            let p = AliveProof::sign(&Identity::from_seed(*seed), &s.network(), 0);
            s.apply_liveness(&LivenessChange::Up { node: id(*seed), proof: p }).unwrap();
        }
        s
    }

    #[test]
    fn a_failed_proposal_is_retried_one_change_at_a_time_so_a_refused_node_cannot_shield_a_dead_one() {
        // Node 1 heartbeats to the other validators only (they refuse its Down); node 2 is dead.
        // Both are silent here, so the first proposal carries both Downs and its view fails.
        let mut s = all_up(&[1, 2]);
        let mut t = Tracker::new(TTL, Duration::from_millis(250), at(0));
        let first = t.plan(&s, at(3_000), 10);
        assert_eq!(first.len(), 2);
        assert!(t.plan(&s, at(3_100), 10).is_empty(), "failed: both wait their lease");
        // A lease later, each goes alone, one after the other: node 1's fails (the others refuse
        // it; nothing applied), node 2's lands (applied, as the next parent would have it).
        let mut alone = Vec::new();
        for (i, ms) in [5_000, 5_050, 5_100].into_iter().enumerate() {
            let plan = t.plan(&s, at(ms), 10);
            assert!(plan.len() <= 1, "alone, at {ms}: {plan:?}");
            if let [change] = plan.as_slice() {
                if change.node() == id(2) {
                    s.begin_block(2 + i as u64, 0);
                    s.apply_liveness(change).unwrap();
                }
                alone.push(change.node());
            }
        }
        alone.sort();
        let mut both = vec![id(1), id(2)];
        both.sort();
        assert_eq!(alone, both, "each once, alone");
        assert_eq!(s.lease(&id(2)).unwrap().status, LeaseStatus::Down, "the dead node's Down landed");
        assert_eq!(s.lease(&id(1)).unwrap().status, LeaseStatus::Up);
        // Node 1's Down failed alone once: it waits a lease from then (at most 5.1 s).
        assert!(t.plan(&s, at(6_000), 10).is_empty());
        assert_eq!(t.failed.get(&id(1)).map(|f| f.0), Some(1));
        assert_eq!(t.plan(&s, at(7_100), 10), vec![LivenessChange::Down { node: id(1) }]);
    }

    #[test]
    fn a_change_that_keeps_failing_alone_waits_longer_each_time_up_to_4_leases() {
        let s = all_up(&[1]);
        let mut t = Tracker::new(TTL, Duration::from_millis(250), at(0));
        let mut now = at(3_000);
        assert_eq!(t.plan(&s, now, 10).len(), 1);
        let mut waits = Vec::new();
        for _ in 0..7 {
            // The next plan finds it missing: failed alone.
            now += Duration::from_millis(50);
            assert!(t.plan(&s, now, 10).is_empty());
            let failed_at = now;
            // Probe for the moment it is proposed again (in steps of a tenth of a lease).
            loop {
                now += TTL / 10;
                if !t.plan(&s, now, 10).is_empty() {
                    break;
                }
            }
            waits.push((now.duration_since(failed_at).unwrap().as_millis() as u64).div_ceil(TTL.as_millis() as u64));
        }
        assert_eq!(waits, vec![1, 2, 4, 4, 4, 4, 4], "in leases");
        // Once it lands (another validator's block, say), the count starts again.
        let mut landed = s.clone();
        landed.begin_block(2, 0);
        landed.apply_liveness(&LivenessChange::Down { node: id(1) }).unwrap();
        assert!(t.plan(&landed, now + Duration::from_millis(50), 10).is_empty());
        assert!(t.failed.is_empty(), "a landed change clears its failures");
    }

    /// Validators 11..=14's keys, and the tracker of validator 11 among them.
    fn validator_tracker() -> (Vec<PublicKey>, Tracker) {
        let keys: Vec<PublicKey> = (11..=14).map(|s| Identity::from_seed(s).private_key().public_key()).collect();
        let t = Tracker::new(TTL, Duration::from_millis(250), at(0)).with_validators(&keys, id(11));
        (keys, t)
    }

    #[test]
    fn a_change_is_proposed_only_once_a_quorum_of_validators_reported_it() {
        // Node 1 is silent here; of 4 validators a change needs 3: this one and two reports.
        let s = all_up(&[1, 2]);
        let (_, mut t) = validator_tracker();
        assert_eq!(t.needed(), 2);
        t.heard(id(2), at(2_900), None);
        assert!(t.plan(&s, at(3_000), 10).is_empty(), "no report yet");
        let silent = |nodes: Vec<NodeId>| Report { silent: nodes, heard: vec![] };
        t.reported(id(12), at(3_000), silent(vec![id(1)]).into());
        assert!(t.plan(&s, at(3_010), 10).is_empty(), "one report: the other two may hear it");
        // Reports from a non-validator, or from itself, do not count.
        t.reported(id(1), at(3_000), silent(vec![id(1)]).into());
        t.reported(id(11), at(3_000), silent(vec![id(1)]).into());
        assert!(t.plan(&s, at(3_020), 10).is_empty());
        t.reported(id(13), at(3_000), silent(vec![id(1)]).into());
        assert_eq!(t.plan(&s, at(3_030), 10), vec![LivenessChange::Down { node: id(1) }]);
        // Reports are fresh for 1.5 heartbeat intervals only.
        let (_, mut t) = validator_tracker();
        t.reported(id(12), at(3_000), silent(vec![id(1)]).into());
        t.reported(id(13), at(3_000), silent(vec![id(1)]).into());
        assert!(t.plan(&s, at(3_000) + report_fresh(TTL) + Duration::from_millis(1), 10).is_empty(), "stale reports");
        assert_eq!(report_fresh(TTL), Duration::from_millis(750));
        // An Up likewise needs reports of hearing.
        let mut down = all_up(&[1]);
        down.begin_block(2, 0);
        down.apply_liveness(&LivenessChange::Down { node: id(1) }).unwrap();
        let (_, mut t) = validator_tracker();
        let proof = AliveProof::sign(&Identity::from_seed(1), &down.network(), 2);
        t.heard(id(1), at(3_000), Some(proof));
        assert!(t.plan(&down, at(3_010), 10).is_empty());
        let heard = Report { silent: vec![], heard: vec![id(1)] };
        t.reported(id(13), at(3_000), heard.clone().into());
        t.reported(id(14), at(3_005), heard.into());
        assert_eq!(t.plan(&down, at(3_010), 10), vec![LivenessChange::Up { node: id(1), proof }]);
    }

    #[test]
    fn a_report_lists_what_judge_would_accept() {
        let mut s = all_up(&[1, 2, 3]);
        s.begin_block(2, 0);
        s.apply_liveness(&LivenessChange::Down { node: id(3) }).unwrap();
        let (_, mut t) = validator_tracker();
        t.heard(id(1), at(2_500), None);
        // Node 3 is heard, first without a proof (no Up can be proposed for it: not reported),
        // then with one recent enough.
        t.heard(id(3), at(2_800), None);
        assert_eq!(t.report(&s, at(3_000)).heard, vec![]);
        let stale = AliveProof::sign(&Identity::from_seed(3), &s.network(), 1);
        t.heard(id(3), at(2_850), Some(stale));
        assert_eq!(t.report(&s, at(3_000)).heard, vec![], "a proof from before its Down");
        let future = AliveProof::sign(&Identity::from_seed(3), &s.network(), 3);
        t.heard(id(3), at(2_880), Some(future));
        assert_eq!(t.report(&s, at(3_000)).heard, vec![], "a proof at a height not finalized yet");
        let proof = AliveProof::sign(&Identity::from_seed(3), &s.network(), 2);
        t.heard(id(3), at(2_900), Some(proof));
        // Just started: no silence reported (judge accepts no Down yet either).
        assert_eq!(t.report(&s, at(1_500)).silent, vec![]);
        let r = t.report(&s, at(3_000));
        assert_eq!(r.silent, vec![id(2)], "node 2 never heard, node 1 heard 500 ms ago");
        assert_eq!(r.heard, vec![id(3)], "node 3 is Down and heard");
        for node in &r.silent {
            assert!(t.judge(&LivenessChange::Down { node: *node }, at(3_000)).is_ok());
        }
        for node in &r.heard {
            assert!(t.judge(&LivenessChange::Up { node: *node, proof }, at(3_000)).is_ok());
            let mut applied = s.clone();
            applied.begin_block(3, 0);
            assert!(applied.check_liveness(&LivenessChange::Up { node: *node, proof }).is_ok());
        }
        let r = t.report(&s, at(3_500));
        let mut both = vec![id(1), id(2)];
        both.sort();
        assert_eq!(r.silent, both, "node 1 silent for half a lease now");
        assert_eq!(r.heard, vec![id(3)]);
        assert_eq!(t.report(&s, at(3_901)).heard, vec![], "node 3 not heard within half a lease");
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
