//! Protocol upgrades: the ledger's rules carry a version, and a new version comes into force at a
//! block height that a quorum of validators agreed on beforehand (`ScheduleUpgrade`).
//!
//! Every node replays every block, so a rule that changes (how a market round is judged, what a
//! transaction may carry) must change on every node at the same block, or nodes built before and
//! after the change disagree about the state. So a rule change is a new protocol version: the
//! code keeps the old rule for blocks before the version's activation height and the new one from
//! it ([`State::protocol`] says which applies), and a build refuses to execute a block at a height
//! where a version newer than it implements ([`PROTOCOL`]) is in force
//! ([`State::check_runnable`]): an outdated validator stops voting and proposing there, an
//! outdated follower stops applying and says why on `/health`, and `archipel ledger verify`
//! names the release needed. The chain never forks over it: it halts at the activation height
//! while fewer than a quorum of validators run a build that implements the version, and goes on
//! once they do.
//!
//! Scheduling: anyone submits a `ScheduleUpgrade` carrying the approvals — each validator's
//! signature over (network, version, height, cancels so far) — of a quorum of the current
//! validators (the same 2f+1 as consensus). The version must be the next one, the height at least
//! the network's notice ahead (time for operators to install the release), and only one upgrade
//! is scheduled at a time. Before its height a quorum may cancel it (`CancelUpgrade`, approvals
//! under their own namespace); each cancel counts, and approvals name the count, so neither a
//! schedule nor a cancel can be replayed after a cancel. The schedule lives in the `chain` entry,
//! so it is in the state root; a state with no upgrade ever scheduled encodes that entry exactly as
//! before.

use crate::Hash;
use crate::state::State;
use crate::tx::TxError;
use archipel_crypto::Identity;
use archipel_types::NodeId;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};

/// The newest protocol version this build implements; a network starts at 1.
pub const PROTOCOL: u32 = 1;

/// A newer protocol this process acts as implementing (0: [`PROTOCOL`]); see
/// [`pretend_build_implements`].
static BUILD_CEILING: AtomicU32 = AtomicU32::new(0);

/// Makes this process act as a build that implements protocol versions up to `protocol`: for
/// upgrade drills (a debug build of `archipel node run` sets it from
/// `ARCHIPEL_TEST_PROTOCOL_CEILING`; release builds never do). No rule differs between the
/// versions there are, so nothing else changes.
pub fn pretend_build_implements(protocol: u32) {
    BUILD_CEILING.store(protocol, Ordering::Relaxed);
}

/// The newest protocol this process executes.
fn build_protocol() -> u32 {
    match BUILD_CEILING.load(Ordering::Relaxed) {
        0 => PROTOCOL,
        n => n,
    }
}

/// The protocol every network starts with.
pub const GENESIS_PROTOCOL: u32 = 1;

/// The fewest blocks between a `ScheduleUpgrade` and the height it names on a network whose
/// genesis sets no `upgrade_notice_blocks`.
pub const MIN_UPGRADE_NOTICE_BLOCKS: u64 = 1_000;

/// The furthest ahead an upgrade may be scheduled, in notices: a mistyped height cannot block every
/// later upgrade for long (one is pending at a time) even if no quorum cancels it.
pub const MAX_LEAD_NOTICES: u64 = 100;

/// Most approvals one `ScheduleUpgrade` or `CancelUpgrade` carries (its count is one byte).
pub const MAX_APPROVALS: usize = u8::MAX as usize;

/// The bytes of a `ScheduleUpgrade` (or `CancelUpgrade`) transaction with `approvals` approvals: signer, nonce,
/// signature, tag, version, height, count, then 96 bytes an approval.
pub fn schedule_tx_bytes(approvals: usize) -> usize {
    32 + 8 + 64 + 1 + 4 + 8 + 1 + approvals * (32 + 64)
}

/// Whether `validators` validators can ever schedule an upgrade: a quorum of approvals fits in a
/// transaction of `max_tx_bytes` (checked with the genesis).
pub fn check_quorum_fits(validators: usize, max_tx_bytes: u32) -> Result<(), String> {
    let q = quorum(validators);
    if q > MAX_APPROVALS || schedule_tx_bytes(q) > max_tx_bytes as usize {
        return Err(format!(
            "{validators} validators need {q} approvals to schedule a protocol upgrade: {} bytes, more than \
             max_tx_bytes ({max_tx_bytes}) or {MAX_APPROVALS} approvals — raise max_tx_bytes or have fewer validators",
            schedule_tx_bytes(q)
        ));
    }
    Ok(())
}

/// The namespace of a validator's approval signature.
pub const APPROVAL_NAMESPACE: &[u8] = b"archipel/upgrade-approval/v1";

/// A protocol version that comes into force at a height.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgrade {
    /// The version.
    pub protocol: u32,
    /// The first height executed under it.
    pub height: u64,
}

/// A validator's signature approving an [`Upgrade`] on one network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The validator.
    pub validator: NodeId,
    /// Its signature over [`approval_bytes`] (hex in JSON).
    #[serde(with = "crate::hash::hex64")]
    pub signature: [u8; 64],
}

/// The namespace of a validator's approval of cancelling a scheduled upgrade.
pub const CANCEL_NAMESPACE: &[u8] = b"archipel/upgrade-cancel/v1";

/// What a validator signs to approve `upgrade` on `network` when `cancels` upgrades were cancelled
/// so far (or, under [`CANCEL_NAMESPACE`], its cancellation): the count makes an approval
/// single-use across cancels.
pub fn approval_bytes(network: &Hash, upgrade: &Upgrade, cancels: u32) -> Vec<u8> {
    [&network.0[..], &upgrade.protocol.to_be_bytes(), &upgrade.height.to_be_bytes(), &cancels.to_be_bytes()].concat()
}

/// `validator`'s approval of `upgrade` on `network`, after `cancels` cancels
/// ([`State::upgrade_cancels`]).
pub fn approve(validator: &Identity, network: &Hash, upgrade: &Upgrade, cancels: u32) -> Approval {
    Approval {
        validator: validator.node_id(),
        signature: validator.sign(APPROVAL_NAMESPACE, &approval_bytes(network, upgrade, cancels)),
    }
}

/// `validator`'s approval of cancelling the scheduled `upgrade` on `network`, after `cancels`
/// cancels.
pub fn approve_cancel(validator: &Identity, network: &Hash, upgrade: &Upgrade, cancels: u32) -> Approval {
    Approval {
        validator: validator.node_id(),
        signature: validator.sign(CANCEL_NAMESPACE, &approval_bytes(network, upgrade, cancels)),
    }
}

/// How many of `validators` validators must approve: the consensus quorum, 2f+1 of 3f+1 (the
/// same as for admitting a node).
pub use archipel_crypto::quorum;

impl State {
    /// The protocol version in force at the current block.
    pub fn protocol(&self) -> u32 {
        self.chain.protocol
    }

    /// The fewest blocks between scheduling an upgrade and its height on this network.
    pub fn upgrade_notice_blocks(&self) -> u64 {
        match self.params.upgrade_notice_blocks {
            0 => MIN_UPGRADE_NOTICE_BLOCKS,
            n => n,
        }
    }

    /// How many scheduled upgrades were cancelled on this network (approvals name it).
    pub fn upgrade_cancels(&self) -> u32 {
        self.chain.cancels
    }

    /// The upgrade scheduled and not yet in force, if any.
    pub fn scheduled_upgrade(&self) -> Option<Upgrade> {
        self.chain.upgrade
    }

    /// The protocol version a block at `height` (after this state) is executed under.
    pub fn protocol_at(&self, height: u64) -> u32 {
        match self.chain.upgrade {
            Some(u) if height >= u.height => u.protocol,
            _ => self.chain.protocol,
        }
    }

    /// Whether this build can execute a block at `height` after this state: `Err` names the
    /// version in force there and the version this build implements.
    pub fn check_runnable(&self, height: u64) -> Result<(), String> {
        let needed = self.protocol_at(height);
        let supported = self.supported_protocol();
        if needed > supported {
            let when = match self.chain.upgrade {
                Some(u) if height >= u.height => format!("from height {}", u.height),
                _ => format!("at height {}", self.chain.height),
            };
            return Err(format!(
                "upgrade required: the network runs protocol {needed} {when}, and this build of archipel \
                 implements protocol {supported} at most — install a release that implements protocol {needed}"
            ));
        }
        Ok(())
    }

    /// This state, executing as a build that implements protocol versions up to `protocol`
    /// (simulations of an upgrade; a node runs with [`PROTOCOL`]). Not part of the state.
    pub fn with_supported_protocol(mut self, protocol: u32) -> Self {
        self.protocol_ceiling = Some(protocol);
        self
    }

    /// The newest protocol version this state executes blocks under.
    pub fn supported_protocol(&self) -> u32 {
        self.protocol_ceiling.unwrap_or_else(build_protocol)
    }

    /// Puts a scheduled upgrade in force once `height` reaches it (at the start of a block).
    pub(crate) fn activate_upgrade(&mut self, height: u64) {
        if let Some(u) = self.chain.upgrade
            && height >= u.height
        {
            self.chain.protocol = u.protocol;
            self.chain.upgrade = None;
        }
    }

    /// The checks of a `ScheduleUpgrade`; the approvals' signatures only `with_signatures` (the
    /// mempool's precheck runs the rest first, under the chain's lock, at no signature's cost).
    pub(crate) fn check_schedule_upgrade(
        &self,
        upgrade: &Upgrade,
        approvals: &[Approval],
        with_signatures: bool,
    ) -> Result<(), TxError> {
        let refuse = |why: String| Err(TxError::NotAllowed(format!("ScheduleUpgrade: {why}")));
        if let Some(u) = self.chain.upgrade {
            return refuse(format!(
                "protocol {} is already scheduled for height {}; one upgrade at a time",
                u.protocol, u.height
            ));
        }
        let next = self.chain.protocol.saturating_add(1);
        if upgrade.protocol != next {
            return refuse(format!(
                "the network runs protocol {}, so the next upgrade is to {next}, not {}",
                self.chain.protocol, upgrade.protocol
            ));
        }
        let notice = self.upgrade_notice_blocks();
        let earliest = self.chain.height.saturating_add(notice);
        if upgrade.height < earliest {
            return refuse(format!(
                "height {} is too soon: give operators at least {notice} blocks to upgrade (height {earliest} or later)",
                upgrade.height
            ));
        }
        let latest = self.chain.height.saturating_add(notice.saturating_mul(MAX_LEAD_NOTICES));
        if upgrade.height > latest {
            return refuse(format!(
                "height {} is too far ahead: at most {MAX_LEAD_NOTICES} notices ({latest})",
                upgrade.height
            ));
        }
        self.check_approvals("ScheduleUpgrade", APPROVAL_NAMESPACE, upgrade, approvals, with_signatures)
    }

    /// The checks of a `CancelUpgrade`: `upgrade` is the one scheduled (not yet in force), and a
    /// quorum approves its cancellation (signatures only `with_signatures`).
    pub(crate) fn check_cancel_upgrade(
        &self,
        upgrade: &Upgrade,
        approvals: &[Approval],
        with_signatures: bool,
    ) -> Result<(), TxError> {
        if self.chain.upgrade != Some(*upgrade) {
            let now = match self.chain.upgrade {
                Some(u) => format!("protocol {} at height {} is", u.protocol, u.height),
                None => "nothing is".into(),
            };
            return Err(TxError::NotAllowed(format!(
                "CancelUpgrade: protocol {} at height {} is not scheduled ({now}; an upgrade in force stays)",
                upgrade.protocol, upgrade.height
            )));
        }
        self.check_approvals("CancelUpgrade", CANCEL_NAMESPACE, upgrade, approvals, with_signatures)
    }

    /// Approvals of `upgrade` under `namespace`: distinct current validators, a quorum of them, and
    /// (`with_signatures`) each one's signature.
    fn check_approvals(
        &self,
        what: &str,
        namespace: &[u8],
        upgrade: &Upgrade,
        approvals: &[Approval],
        with_signatures: bool,
    ) -> Result<(), TxError> {
        let refuse = |why: String| Err(TxError::NotAllowed(format!("{what}: {why}")));
        let validators = self.validators();
        if approvals.len() > validators.len().min(MAX_APPROVALS) {
            return Err(TxError::Malformed(format!(
                "{} approvals for {} validators (at most {MAX_APPROVALS})",
                approvals.len(),
                validators.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for a in approvals {
            if !validators.contains(&a.validator) {
                return refuse(format!("{} is not a validator", a.validator.short()));
            }
            if !seen.insert(a.validator) {
                return refuse(format!("{} approves twice", a.validator.short()));
            }
        }
        let need = quorum(validators.len());
        if seen.len() < need {
            return refuse(format!(
                "{} of {} validators approve; {need} must (the consensus quorum)",
                seen.len(),
                validators.len()
            ));
        }
        if with_signatures {
            // Checked together, and remembered (`_memo`): the block that carries the transaction
            // checks them again at no cost.
            let msg = approval_bytes(&self.network, upgrade, self.chain.cancels);
            let items: Vec<archipel_crypto::SignatureItem<'_>> =
                approvals.iter().map(|a| (&a.validator, msg.as_slice(), &a.signature)).collect();
            if archipel_crypto::verify_signatures_memo(namespace, &items) {
                return Ok(());
            }
            for a in approvals {
                archipel_crypto::verify_signature_memo(&a.validator, namespace, &msg, &a.signature).map_err(|_| {
                    TxError::NotAllowed(format!(
                        "{what}: {}'s approval is not its {what} signature for protocol {} at height {} after {} \
                         cancels on this network",
                        a.validator.short(),
                        upgrade.protocol,
                        upgrade.height,
                        self.chain.cancels
                    ))
                })?;
            }
        }
        Ok(())
    }

    pub(crate) fn apply_cancel_upgrade(&mut self, upgrade: &Upgrade) -> crate::Receipt {
        self.chain.upgrade = None;
        self.chain.cancels = self.chain.cancels.saturating_add(1);
        self.other_changed.insert(crate::StateKey::Chain);
        crate::Receipt::UpgradeCancelled { protocol: upgrade.protocol, height: upgrade.height }
    }

    pub(crate) fn apply_schedule_upgrade(&mut self, upgrade: &Upgrade) -> crate::Receipt {
        self.chain.upgrade = Some(*upgrade);
        self.other_changed.insert(crate::StateKey::Chain);
        crate::Receipt::UpgradeScheduled { protocol: upgrade.protocol, height: upgrade.height }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Signatures, execute, genesis_header, propose};
    use crate::state::tests::{id, signed};
    use crate::{GenesisState, LedgerParams, Payload, Receipt, StateKey};
    use archipel_crypto::SignedDescriptor;

    /// Validators `1..=n` (registered nodes), and account 0 funded; the default notice.
    fn genesis_with_validators(n: u64) -> State {
        genesis_with(n, LedgerParams::default())
    }

    fn genesis_with(n: u64, params: LedgerParams) -> State {
        let descriptor =
            |v: u64| SignedDescriptor::sign(&id(v), archipel_crypto::test_support::example_descriptor(&id(v))).unwrap();
        State::genesis(GenesisState {
            network: Hash::ZERO,
            params,
            timestamp_ms: 0,
            validators: (1..=n).map(|v| id(v).node_id()).collect(),
            accounts: vec![(id(0).node_id(), 1_000)],
            nodes: (1..=n).map(descriptor).collect(),
        })
    }

    fn schedule(network: Hash, protocol: u32, height: u64, approvers: &[u64]) -> Payload {
        schedule_after(0, network, protocol, height, approvers)
    }

    /// A `ScheduleUpgrade` approved after `cancels` cancels.
    fn schedule_after(cancels: u32, network: Hash, protocol: u32, height: u64, approvers: &[u64]) -> Payload {
        let upgrade = Upgrade { protocol, height };
        let approvals = approvers.iter().map(|v| approve(&id(*v), &network, &upgrade, cancels)).collect();
        Payload::ScheduleUpgrade { upgrade, approvals }
    }

    #[test]
    fn the_quorum_is_two_thirds_and_one() {
        assert_eq!([1, 2, 3, 4, 5, 7, 10].map(quorum), [1, 2, 3, 3, 4, 5, 7]);
        // A quorum of approvals fits the default transaction up to 125 validators.
        assert!(check_quorum_fits(125, 8 * 1024).is_ok());
        assert!(check_quorum_fits(126, 8 * 1024).unwrap_err().contains("126 validators need 85 approvals"));
        assert!(check_quorum_fits(1_000, u32::MAX).unwrap_err().contains("255 approvals"));
    }

    #[test]
    fn a_quorum_of_validators_schedules_the_next_version_with_notice_and_nothing_else_does() {
        let mut s = genesis_with_validators(4);
        s.begin_block(1, 1_000);
        let root = s.seal().unwrap();
        let far = 1 + MIN_UPGRADE_NOTICE_BLOCKS;
        let mut nonce = 0;
        let refused = |s: &mut State, p: Payload| {
            let e = s.apply(&signed(0, nonce, p)).unwrap_err().to_string();
            assert_eq!(s.seal().unwrap(), root, "a refusal changes nothing: {e}");
            e
        };
        let e = refused(&mut s, schedule(Hash::ZERO, 2, far, &[1, 2]));
        assert!(e.contains("2 of 4 validators approve; 3 must"), "{e}");
        let e = refused(&mut s, schedule(Hash::ZERO, 2, far, &[1, 2, 0]));
        assert!(e.contains("is not a validator"), "{e}");
        let e = refused(&mut s, schedule(Hash::ZERO, 2, far, &[1, 2, 2]));
        assert!(e.contains("approves twice"), "{e}");
        let e = refused(&mut s, schedule(Hash::ZERO, 2, far, &[1, 2, 3, 4, 1]));
        assert!(e.contains("5 approvals for 4 validators"), "{e}");
        let e = refused(&mut s, schedule(Hash::ZERO, 3, far, &[1, 2, 3]));
        assert!(e.contains("the next upgrade is to 2, not 3"), "{e}");
        let e = refused(&mut s, schedule(Hash::ZERO, 2, far - 1, &[1, 2, 3]));
        assert!(e.contains("too soon") && e.contains(&format!("height {far} or later")), "{e}");
        let latest = 1 + MAX_LEAD_NOTICES * MIN_UPGRADE_NOTICE_BLOCKS;
        let e = refused(&mut s, schedule(Hash::ZERO, 2, latest + 1, &[1, 2, 3]));
        assert!(e.contains("too far ahead") && e.contains(&format!("({latest})")), "{e}");
        // The precheck (before signatures, under the chain's lock) checks no approval signature:
        // a forged one passes it, and the full check refuses it.
        let mut forged = schedule(Hash::ZERO, 2, far, &[1, 2, 3]);
        if let Payload::ScheduleUpgrade { approvals, .. } = &mut forged {
            approvals[1].signature[0] ^= 1;
        }
        let tx = signed(0, nonce, forged);
        s.precheck(&tx, 1_000).unwrap();
        assert!(s.admit(&tx, 1_000).unwrap_err().to_string().contains("approval is not its ScheduleUpgrade signature"));
        // An approval of another height, or on another network, is not one of this.
        let mut forged = schedule(Hash::ZERO, 2, far, &[1, 2, 3]);
        if let Payload::ScheduleUpgrade { upgrade, .. } = &mut forged {
            upgrade.height += 1;
        }
        assert!(refused(&mut s, forged).contains("approval is not its ScheduleUpgrade signature"));
        let other = Hash::of(&[b"another network"]);
        let upgrade = Upgrade { protocol: 2, height: far };
        let approvals = [1, 2, 3].map(|v| approve(&id(v), &other, &upgrade, 0)).to_vec();
        assert!(
            refused(&mut s, Payload::ScheduleUpgrade { upgrade, approvals })
                .contains("approval is not its ScheduleUpgrade signature")
        );

        let r = s.apply(&signed(0, nonce, schedule(Hash::ZERO, 2, far, &[3, 1, 2]))).unwrap();
        nonce += 1;
        assert_eq!(r, Receipt::UpgradeScheduled { protocol: 2, height: far });
        assert_eq!(s.scheduled_upgrade(), Some(upgrade));
        assert_eq!((s.protocol(), s.protocol_at(far - 1), s.protocol_at(far)), (1, 1, 2));
        assert_ne!(s.seal().unwrap(), root, "the schedule is in the root");
        let e = s.apply(&signed(0, nonce, schedule(Hash::ZERO, 2, far + 5, &[1, 2, 3]))).unwrap_err().to_string();
        assert!(e.contains("already scheduled for height"), "{e}");
    }

    /// A quorum can withdraw a scheduled upgrade before its height (a mistyped height, a release
    /// that will not ship); approvals of the schedule are not approvals of its cancellation.
    #[test]
    fn a_quorum_cancels_a_scheduled_upgrade_and_another_can_be_scheduled() {
        let mut s = genesis_with_validators(4);
        s.begin_block(1, 1_000);
        let root = s.seal().unwrap();
        let far = 1 + MIN_UPGRADE_NOTICE_BLOCKS;
        let upgrade = Upgrade { protocol: 2, height: far };
        let cancel_after = |cancels: u32, approvers: &[u64], u: Upgrade, namespace_of_schedule: bool| {
            let approvals = approvers
                .iter()
                .map(|v| {
                    if namespace_of_schedule {
                        approve(&id(*v), &Hash::ZERO, &u, cancels)
                    } else {
                        approve_cancel(&id(*v), &Hash::ZERO, &u, cancels)
                    }
                })
                .collect();
            Payload::CancelUpgrade { upgrade: u, approvals }
        };
        let cancel = |approvers: &[u64], u: Upgrade, namespace_of_schedule: bool| {
            cancel_after(0, approvers, u, namespace_of_schedule)
        };
        let e = s.apply(&signed(0, 0, cancel(&[1, 2, 3], upgrade, false))).unwrap_err().to_string();
        assert!(e.contains("is not scheduled (nothing is"), "{e}");
        s.apply(&signed(0, 0, schedule(Hash::ZERO, 2, far, &[1, 2, 3]))).unwrap();
        let scheduled = s.seal().unwrap();
        for (p, why) in [
            (cancel(&[1, 2], upgrade, false), "2 of 4 validators approve; 3 must"),
            (cancel(&[1, 2, 3], upgrade, true), "is not its CancelUpgrade signature"),
            (cancel(&[1, 2, 3], Upgrade { protocol: 2, height: far + 1 }, false), "is not scheduled (protocol 2 at"),
        ] {
            let e = s.apply(&signed(0, 1, p)).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
            assert_eq!(s.seal().unwrap(), scheduled);
        }
        let r = s.apply(&signed(0, 1, cancel(&[2, 3, 4], upgrade, false))).unwrap();
        assert_eq!(r, Receipt::UpgradeCancelled { protocol: 2, height: far });
        assert_eq!((s.scheduled_upgrade(), s.protocol_at(far)), (None, 1));
        assert_eq!(s.upgrade_cancels(), 1);
        assert_ne!(s.seal().unwrap(), root, "fees were burned, and the cancel is counted");
        // The cancelled schedule cannot be replayed: its approvals named no cancel yet.
        let e = s.apply(&signed(0, 2, schedule(Hash::ZERO, 2, far, &[1, 2, 3]))).unwrap_err().to_string();
        assert!(e.contains("approval is not its ScheduleUpgrade signature") && e.contains("after 1 cancels"), "{e}");
        s.apply(&signed(0, 2, schedule_after(1, Hash::ZERO, 2, far, &[1, 2, 3]))).unwrap();
        assert_eq!(s.scheduled_upgrade(), Some(upgrade));
        // Nor the cancel, against the same upgrade scheduled again.
        let e = s.apply(&signed(0, 3, cancel(&[2, 3, 4], upgrade, false))).unwrap_err().to_string();
        assert!(e.contains("approval is not its CancelUpgrade signature"), "{e}");
        // In force, it cannot be cancelled.
        s.begin_block(far, 2_000);
        let e = s.apply(&signed(0, 3, cancel_after(1, &[1, 2, 3], upgrade, false)));
        assert!(e.unwrap_err().to_string().contains("nothing is; an upgrade in force stays"));
        assert_eq!(s.protocol(), 2);
    }

    #[test]
    fn the_chain_entry_is_unchanged_until_an_upgrade_and_round_trips_after() {
        let mut s = genesis_with_validators(4);
        s.begin_block(1, 1_000);
        assert_eq!(s.value(&StateKey::Chain).unwrap().len(), 24, "networks without upgrades keep their roots");
        let far = 1 + MIN_UPGRADE_NOTICE_BLOCKS;
        s.apply(&signed(0, 0, schedule(Hash::ZERO, 2, far, &[1, 2, 3]))).unwrap();
        let v = s.value(&StateKey::Chain).unwrap();
        assert_eq!(v.len(), 44);
        let c = crate::state::decode_chain(&v).unwrap();
        assert_eq!((c.protocol, c.upgrade), (1, Some(Upgrade { protocol: 2, height: far })));
        let shown = crate::proof::decode_value(&StateKey::Chain, &v).unwrap();
        assert_eq!(shown["upgrade"]["height"], far);
        s.begin_block(far, 2_000);
        let c = crate::state::decode_chain(&s.value(&StateKey::Chain).unwrap()).unwrap();
        assert_eq!((c.protocol, c.upgrade), (2, None), "in force from its height");
        assert!(crate::state::decode_chain(&[0; 30]).is_err());
        // One encoding per state: upgrade fields that say nothing, or a height without a version.
        let mut plain = vec![0u8; 44];
        plain[24..28].copy_from_slice(&1u32.to_be_bytes());
        assert!(crate::state::decode_chain(&plain).unwrap_err().contains("canonical"));
        plain[32..40].copy_from_slice(&5u64.to_be_bytes());
        plain[40..44].copy_from_slice(&1u32.to_be_bytes());
        assert!(crate::state::decode_chain(&plain).unwrap_err().contains("canonical"));
        plain[32..40].copy_from_slice(&0u64.to_be_bytes());
        assert_eq!(crate::state::decode_chain(&plain).unwrap().cancels, 1);
    }

    /// A chain through an activation height: a build that implements the new version executes
    /// every block; one that does not executes every block before the height and refuses the
    /// block at it, naming the versions (`Chain::build` asks `check_runnable` before building).
    #[test]
    fn an_outdated_build_stops_at_the_activation_height_and_an_upgraded_one_goes_on() {
        let notice = crate::params::MIN_NOTICE_BLOCKS_LIMIT;
        let params = LedgerParams { upgrade_notice_blocks: notice, ..LedgerParams::default() };
        let g = genesis_with(4, params).with_supported_protocol(2);
        let mut s = g.clone();
        let mut parent = genesis_header(&s);
        let mut blocks = Vec::new();
        for height in 1..=notice + 2 {
            let txs =
                if height == 1 { vec![signed(0, 0, schedule(Hash::ZERO, 2, notice + 1, &[1, 2, 3]))] } else { vec![] };
            let p = propose(&s, &parent, height * 10, [], txs, Signatures::Verify).unwrap();
            assert_eq!(p.block.txs.len(), usize::from(height == 1), "{:?}", p.dropped);
            s = p.state;
            parent = p.block.header;
            blocks.push(p.block);
        }
        assert_eq!(s.protocol(), 2);
        let mut old = g.clone().with_supported_protocol(1);
        let mut parent = genesis_header(&old);
        for b in &blocks[..notice as usize] {
            execute(&mut old, &parent, b, Signatures::Verify).unwrap();
            parent = b.header;
        }
        assert_eq!(old.check_runnable(notice), Ok(()));
        let e = old.check_runnable(notice + 1).unwrap_err();
        assert!(e.contains("protocol 2 from height 21") && e.contains("implements protocol 1 at most"), "{e}");
        let mut copy = old.clone();
        let err = execute(&mut copy, &parent, &blocks[notice as usize], Signatures::Verify).unwrap_err();
        assert_eq!(err.height, notice + 1);
        assert!(err.what.contains("upgrade required"), "{err}");
        let e = crate::block::verify_chain(g.clone().with_supported_protocol(1), &blocks).unwrap_err();
        assert_eq!(e.height, notice + 1);
        assert!(e.what.contains("install a release that implements protocol 2"), "{e}");
        assert_eq!(crate::block::verify_chain(g, &blocks).unwrap().state_root(), s.state_root());
    }
}
