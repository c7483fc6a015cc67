//! A validator with no record of its votes waits before voting.
//!
//! Simplex's journal is a validator's memory of the votes it cast: with it gone (the runtime
//! directory deleted, a disk replaced) while the block log survived, the validator could vote
//! again in a view it voted in before — for another block — and its peers would block it as an
//! equivocator (with two such validators out of four, safety itself is at stake). So such a
//! validator first follows the chain as a follower does (finalizations from the certificate
//! channel to marshal), and starts simplex only from a finalization in a view it cannot have
//! voted in.
//!
//! Which views could it have voted in? A validator enters view `v + 1` only on a certificate of
//! view `v`, so before it lost its journal it voted in views at most one above the highest
//! certificate then in existence — which is at most the highest certificate in existence now.
//! The gate watches the certificates validators broadcast for [`OBSERVE`] after the first one
//! arrives, takes the highest view among them (`h`), and opens at a verified finalization of a
//! view above `h + 1`; simplex then starts with that finalization as its floor, so it votes only
//! in later views. Every certificate is verified first: a made-up high view would keep the
//! validator from voting. If a quorum of validators lost their journals at once, none of them
//! sees certificates and the network halts: the operator, who knows no vote was cast in the
//! lost record's views, starts them with `archipel node run --vote-without-record`. A devnet
//! whose chain was built offline (`archipel debug fill-chain`) never voted on it: fill-chain
//! leaves the marker [`NEVER_VOTED_PARTITION`], which the node removes once it starts voting.

use commonware_codec::Decode as _;
use commonware_consensus::Reporter as _;
use commonware_consensus::marshal::core::Mailbox;
use commonware_consensus::marshal::standard::Standard;
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_consensus::simplex::types::{Activity, Certificate, Finalization};
use commonware_cryptography::blake3::Digest;
use commonware_cryptography::certificate::Verifier as _;
use commonware_cryptography::ed25519::PublicKey;
use commonware_p2p::Receiver;
use commonware_parallel::Sequential;
use commonware_runtime::telemetry::metrics::{Gauge, GaugeExt as _, MetricsExt as _};
use commonware_runtime::{Clock, Metrics};
use std::time::{Duration, SystemTime};

use crate::block::LedgerBlock;

/// How long the gate collects certificates, from the first that arrives, before it sets its bar.
pub const OBSERVE: Duration = Duration::from_secs(3);

/// A partition of the runtime's storage whose presence says this validator never voted on the
/// chain in its block log (written by `archipel debug fill-chain`).
pub const NEVER_VOTED_PARTITION: &str = "archipel-never-voted";

/// How often a waiting validator says what it waits for.
const SAY_EVERY: Duration = Duration::from_secs(10);

/// The gate's rule, apart from the network.
#[derive(Debug)]
pub struct VoteGate {
    observe: Duration,
    /// Distinct validators whose certificates must have arrived before the window runs.
    quorum_of_senders: usize,
    senders: std::collections::BTreeSet<usize>,
    /// When the last of those first spoke: the window runs from there.
    window_from: Option<SystemTime>,
    highest: u64,
    bar: Option<u64>,
}

impl VoteGate {
    /// A gate that knows this validator voted in views up to `known` at least (its block log's
    /// last certified view, one of its own), and collects certificates for `observe` once
    /// `senders` distinct validators have sent one.
    pub fn new(observe: Duration, known: u64, senders: usize) -> Self {
        Self {
            observe,
            quorum_of_senders: senders.max(1),
            senders: Default::default(),
            window_from: None,
            highest: known,
            bar: None,
        }
    }

    /// A verified certificate of `view` (any kind) arrived at `now` from validator `sender`.
    pub fn seen(&mut self, view: u64, sender: usize, now: SystemTime) {
        if self.bar.is_some() {
            return;
        }
        if self.senders.insert(sender) && self.senders.len() == self.quorum_of_senders {
            self.window_from = Some(now);
        }
        let closed = self.window_from.is_some_and(|from| now.duration_since(from).unwrap_or_default() >= self.observe);
        if closed {
            // Views this validator may have voted in end one above the highest certificate.
            self.bar = Some(self.highest.saturating_add(1));
        } else {
            self.highest = self.highest.max(view);
        }
    }

    /// Whether a verified finalization of `view` lets voting start after it.
    pub fn opens_at(&self, view: u64) -> bool {
        self.bar.is_some_and(|bar| view > bar)
    }

    /// The view a finalization must be above, once set.
    pub fn bar(&self) -> Option<u64> {
        self.bar
    }

    /// The highest view seen while observing.
    pub fn highest(&self) -> u64 {
        self.highest
    }
}

fn view_of(certificate: &Certificate<Scheme, Digest>) -> u64 {
    match certificate {
        Certificate::Notarization(n) => n.round().view().get(),
        Certificate::Nullification(n) => n.round().view().get(),
        Certificate::Finalization(f) => f.round().view().get(),
    }
}

/// What the gate shows operators (registered by the task that outlives the wait).
pub(crate) struct GateMetrics {
    /// 1 while this validator does not vote yet.
    pub waiting: Gauge,
    /// The view a finalization must be above (0: not set yet).
    pub bar: Gauge,
    /// The finalized view after which voting started (0: not yet).
    pub opened_at: Gauge,
}

impl GateMetrics {
    /// Registers the gate's gauges on `context`.
    pub fn register(context: &impl Metrics) -> Self {
        Self {
            waiting: context.gauge("waiting", "1 while this validator, without its record of votes, does not vote yet"),
            bar: context.gauge("bar", "the view a finalization must be above before this validator votes (0: not set)"),
            opened_at: context
                .gauge("opened_at", "the finalized view after which this validator started voting (0: not yet)"),
        }
    }
}

/// The channels the gate reads while simplex does not run yet (handed back to it after).
pub(crate) struct Watched<'a, R> {
    /// Certificates: followed, and counted.
    pub certificates: &'a mut R,
    /// Votes: drained.
    pub votes: &'a mut R,
    /// Simplex's fetches: drained.
    pub resolver: &'a mut R,
}

/// Follows the chain from the certificate channel (finalizations to marshal, as a follower does)
/// and drains the vote and resolver channels, until a finalization opens the gate: that
/// finalization, to start simplex from. `None` if a channel closed (the node is stopping).
/// Sets `metrics` as it goes.
pub(crate) async fn wait<E, R>(
    mut context: E,
    scheme: Scheme,
    mut mailbox: Mailbox<Scheme, Standard<LedgerBlock>>,
    channels: Watched<'_, R>,
    metrics: &GateMetrics,
    validators: &[PublicKey],
    known: u64,
) -> Option<Finalization<Scheme, Digest>>
where
    E: Clock + rand_core::CryptoRng,
    R: Receiver<PublicKey = PublicKey>,
{
    let GateMetrics { waiting, bar: bar_gauge, opened_at: opened } = metrics;
    let Watched { certificates, votes, resolver } = channels;
    let _ = waiting.try_set(1);
    let codec = scheme.certificate_codec_config();
    // f + 1 validators: at least one honest validator's view of the network counts.
    let mut gate = VoteGate::new(OBSERVE, known, (validators.len().saturating_sub(1)) / 3 + 1);
    let mut last_final = known;
    let mut say_at = context.current() + SAY_EVERY;
    tracing::warn!(
        "this validator has no record of its votes on this chain (its simplex journal is missing): it follows the chain and votes only after the network has finalized a view it cannot have voted in (start it with --vote-without-record if a quorum of validators lost their journals and the network halted)"
    );
    loop {
        let (sender, message) = commonware_macros::select! {
            received = certificates.recv() => match received {
                Ok(received) => received,
                Err(_) => return None,
            },
            received = votes.recv() => match received {
                Ok(_) => continue,
                Err(_) => return None,
            },
            received = resolver.recv() => match received {
                Ok(_) => continue,
                Err(_) => return None,
            },
            _ = context.sleep_until(say_at) => {
                say_at = context.current() + SAY_EVERY;
                match gate.bar() {
                    Some(bar) => tracing::warn!(bar, last_finalized_view = last_final, "not voting yet: waiting for a finalized view above the bar"),
                    None => tracing::warn!(highest = gate.highest(), "not voting yet: collecting the network's certificates"),
                }
                continue;
            },
        };
        // Only validators' certificates count (followers relay nothing here).
        let Some(sender) = validators.iter().position(|v| *v == sender) else { continue };
        let Ok(certificate) = Certificate::<Scheme, Digest>::decode_cfg(message, &codec) else { continue };
        let view = view_of(&certificate);
        // Only a view that would change something is worth a verification.
        let useful = match &certificate {
            Certificate::Finalization(_) => view > last_final,
            // Any certificate of a validator not heard yet counts (it opens the window).
            _ => gate.bar().is_none(),
        };
        if !useful || !certificate.verify(&mut context, &scheme, &Sequential) {
            continue;
        }
        gate.seen(view, sender, context.current());
        if let Some(bar) = gate.bar() {
            let _ = bar_gauge.try_set(bar);
        }
        if let Certificate::Finalization(f) = certificate {
            last_final = view;
            let _ = mailbox.report(Activity::Finalization(f.clone()));
            if gate.opens_at(view) {
                tracing::info!(view, bar = gate.bar(), "this validator starts voting after this finalized view");
                let _ = waiting.try_set(0);
                let _ = opened.try_set(view);
                return Some(f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn the_gate_opens_only_above_the_highest_view_seen_while_observing_plus_one() {
        let mut gate = VoteGate::new(Duration::from_secs(3), 90, 2);
        assert!(!gate.opens_at(u64::MAX), "nothing seen: closed");
        gate.seen(100, 0, at(10_000));
        gate.seen(104, 0, at(20_000));
        assert_eq!(gate.bar(), None, "one validator heard: the window has not started");
        gate.seen(101, 2, at(21_000));
        gate.seen(102, 2, at(23_999));
        assert_eq!(gate.bar(), None, "still observing");
        assert!(!gate.opens_at(500), "no bar while observing");
        // The first certificate after the window sets the bar from what was seen until then.
        gate.seen(106, 1, at(24_000));
        assert_eq!(gate.bar(), Some(105));
        assert!(!gate.opens_at(104));
        assert!(!gate.opens_at(105), "it may have voted in the view above the highest certificate");
        assert!(gate.opens_at(106));
        // Later certificates do not move the bar.
        gate.seen(1_000, 3, at(30_000));
        assert_eq!(gate.bar(), Some(105));
    }

    #[test]
    fn the_block_logs_own_certified_view_is_a_floor_for_the_bar() {
        // Old certificates (from a peer replaying them) cannot bring the bar below what the
        // validator's own log shows it took part in.
        let mut gate = VoteGate::new(Duration::from_secs(3), 500, 2);
        gate.seen(10, 0, at(0));
        gate.seen(11, 1, at(0));
        gate.seen(12, 0, at(3_000));
        assert_eq!(gate.bar(), Some(501));
        assert!(!gate.opens_at(12) && !gate.opens_at(501) && gate.opens_at(502));
    }

    #[test]
    fn a_clock_going_back_neither_panics_nor_ends_the_window() {
        let mut gate = VoteGate::new(Duration::from_secs(3), 0, 1);
        gate.seen(7, 0, at(10_000));
        gate.seen(9, 0, at(5_000));
        assert_eq!(gate.bar(), None);
        assert_eq!(gate.highest(), 9);
        gate.seen(u64::MAX, 0, at(10_500));
        gate.seen(1, 0, at(14_000));
        assert_eq!(gate.bar(), Some(u64::MAX), "saturates, never wraps to a low bar");
        assert!(!gate.opens_at(u64::MAX));
    }
}
