//! What a node said on the vote channel: a sender wrapper that decodes every message the node
//! sends there and notes the vote (its kind, view and proposal) in a [`VoteLog`], then sends it
//! on unchanged.
//!
//! Peers only check votes of the views they are still in, so a validator that votes twice in a
//! view long past goes unnoticed by them; the log shows every vote it sent, whoever got it.

use commonware_actor::{Feedback, Unreliable};
use commonware_codec::Read as _;
use commonware_consensus::Viewable as _;
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_consensus::simplex::types::Vote;
use commonware_cryptography::blake3::Digest;
use commonware_p2p::{CheckedSender, LimitedSender, Recipients};
use commonware_runtime::IoBufs;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A vote's kind and, for notarize and finalize, the proposal's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Said {
    /// A notarize vote for this payload.
    Notarize(Digest),
    /// A nullify vote.
    Nullify,
    /// A finalize vote for this payload.
    Finalize(Digest),
    /// A message on the vote channel that does not decode as a vote (noted with view 0, so a
    /// test sees it rather than the vote going unlogged).
    Unreadable,
}

/// One vote a node sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VoteSent {
    /// Its view.
    pub view: u64,
    /// What it said.
    pub said: Said,
}

/// The votes one node sent, in order (shared by the wrapper and the test reading them).
pub type VoteLog = Arc<Mutex<Vec<VoteSent>>>;

/// Notes `message` in `log`: the vote it decodes as, or [`Said::Unreadable`].
fn note(log: &VoteLog, mut message: IoBufs) {
    let Ok(vote) = Vote::<Scheme, Digest>::read_cfg(&mut message, &()) else {
        log.lock().unwrap_or_else(|e| e.into_inner()).push(VoteSent { view: 0, said: Said::Unreadable });
        return;
    };
    let view = vote.view().get();
    let said = match vote {
        Vote::Notarize(v) => Said::Notarize(v.proposal.payload),
        Vote::Nullify(_) => Said::Nullify,
        Vote::Finalize(v) => Said::Finalize(v.proposal.payload),
    };
    log.lock().unwrap_or_else(|e| e.into_inner()).push(VoteSent { view, said });
}

/// A sender that notes the votes it sends in its log, when it has one.
#[derive(Clone)]
pub struct Tapped<S> {
    inner: S,
    log: Option<VoteLog>,
}

impl<S> Tapped<S> {
    /// `inner`, noting its votes in `log` when given.
    pub fn new(inner: S, log: Option<VoteLog>) -> Self {
        Tapped { inner, log }
    }
}

impl<S: LimitedSender> LimitedSender for Tapped<S> {
    type PublicKey = S::PublicKey;
    type Checked<'a>
        = TappedChecked<S::Checked<'a>>
    where
        Self: 'a;

    fn check(&mut self, recipients: Recipients<Self::PublicKey>) -> Result<Self::Checked<'_>, SystemTime> {
        let log = self.log.clone();
        self.inner.check(recipients).map(|inner| TappedChecked { inner, log })
    }
}

/// [`Tapped`]'s checked sender.
pub struct TappedChecked<C> {
    inner: C,
    log: Option<VoteLog>,
}

impl<S> std::fmt::Debug for Tapped<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tapped").field("noting_votes", &self.log.is_some()).finish_non_exhaustive()
    }
}

impl<C> std::fmt::Debug for TappedChecked<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TappedChecked").field("noting_votes", &self.log.is_some()).finish_non_exhaustive()
    }
}

impl<C: CheckedSender> CheckedSender for TappedChecked<C> {
    type PublicKey = C::PublicKey;

    fn recipients(&self) -> Vec<Self::PublicKey> {
        self.inner.recipients()
    }

    fn send(self, message: impl Into<IoBufs> + Send, priority: bool) -> Unreliable<Feedback> {
        let message: IoBufs = message.into();
        if let Some(log) = &self.log {
            note(log, message.clone());
        }
        self.inner.send(message, priority)
    }
}

/// Views in which `before` and `after` (two lives of one validator) both voted, each with what
/// each life said there: a validator that forgot its votes must never vote again in a view it
/// may have voted in.
pub fn views_voted_twice(before: &[VoteSent], after: &[VoteSent]) -> BTreeMap<u64, (BTreeSet<Said>, BTreeSet<Said>)> {
    let by_view = |votes: &[VoteSent]| {
        let mut m: BTreeMap<u64, BTreeSet<Said>> = BTreeMap::new();
        for v in votes {
            m.entry(v.view).or_default().insert(v.said);
        }
        m
    };
    let (before, mut after) = (by_view(before), by_view(after));
    before.into_iter().filter_map(|(view, b)| Some((view, (b, after.remove(&view)?)))).collect()
}

/// Whether the votes said in one view conflict (what simplex's peers would block for): two
/// notarizes or two finalizes of different payloads, or a nullify and a finalize.
pub fn conflicting(said: &BTreeSet<Said>) -> bool {
    let notarized: BTreeSet<_> =
        said.iter().filter_map(|s| if let Said::Notarize(d) = s { Some(d) } else { None }).collect();
    let finalized: BTreeSet<_> =
        said.iter().filter_map(|s| if let Said::Finalize(d) = s { Some(d) } else { None }).collect();
    notarized.len() > 1 || finalized.len() > 1 || (!finalized.is_empty() && said.contains(&Said::Nullify))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: u8) -> Digest {
        Digest::from([b; 32])
    }

    fn votes(list: &[(u64, Said)]) -> Vec<VoteSent> {
        list.iter().map(|(view, said)| VoteSent { view: *view, said: *said }).collect()
    }

    #[test]
    fn views_voted_in_both_lives_are_found() {
        let before = votes(&[(3, Said::Notarize(digest(1))), (4, Said::Nullify), (5, Said::Finalize(digest(2)))]);
        let after = votes(&[(5, Said::Nullify), (6, Said::Notarize(digest(3)))]);
        let twice = views_voted_twice(&before, &after);
        assert_eq!(twice.keys().copied().collect::<Vec<_>>(), vec![5]);
        let (b, a) = &twice[&5];
        let both: BTreeSet<Said> = b.union(a).copied().collect();
        assert!(conflicting(&both), "a finalize and a nullify in one view conflict");
        assert!(views_voted_twice(&before, &votes(&[(6, Said::Nullify)])).is_empty());
    }

    #[test]
    fn what_conflicts() {
        let set = |s: &[Said]| s.iter().copied().collect::<BTreeSet<_>>();
        assert!(!conflicting(&set(&[Said::Notarize(digest(1)), Said::Finalize(digest(1))])));
        assert!(!conflicting(&set(&[Said::Notarize(digest(1)), Said::Nullify])), "nullify after notarize is allowed");
        assert!(conflicting(&set(&[Said::Notarize(digest(1)), Said::Notarize(digest(2))])));
        assert!(conflicting(&set(&[Said::Finalize(digest(1)), Said::Finalize(digest(2))])));
        assert!(conflicting(&set(&[Said::Finalize(digest(1)), Said::Nullify])));
    }
}
