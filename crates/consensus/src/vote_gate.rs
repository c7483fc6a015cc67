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
use commonware_runtime::Clock;
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
    first_seen: Option<SystemTime>,
    highest: u64,
    bar: Option<u64>,
}

impl VoteGate {
    /// A gate that collects certificates for `observe` after the first one.
    pub fn new(observe: Duration) -> Self {
        Self { observe, first_seen: None, highest: 0, bar: None }
    }

    /// A verified certificate of `view` (any kind) arrived at `now`.
    pub fn seen(&mut self, view: u64, now: SystemTime) {
        let first = *self.first_seen.get_or_insert(now);
        if self.bar.is_some() {
            return;
        }
        if now.duration_since(first).unwrap_or_default() < self.observe {
            self.highest = self.highest.max(view);
        } else {
            // Views this validator may have voted in end one above the highest certificate.
            self.bar = Some(self.highest.saturating_add(1));
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

/// Follows the chain from the certificate channel (finalizations to marshal, as a follower does)
/// and drains the vote and resolver channels, until a finalization opens the gate: that
/// finalization, to start simplex from. `None` if a channel closed (the node is stopping).
pub(crate) async fn wait<E, R>(
    mut context: E,
    scheme: Scheme,
    mut mailbox: Mailbox<Scheme, Standard<LedgerBlock>>,
    certificates: &mut R,
    votes: &mut R,
    resolver: &mut R,
) -> Option<Finalization<Scheme, Digest>>
where
    E: Clock + rand_core::CryptoRng,
    R: Receiver<PublicKey = PublicKey>,
{
    let codec = scheme.certificate_codec_config();
    let mut gate = VoteGate::new(OBSERVE);
    let mut last_final = 0u64;
    let mut say_at = context.current() + SAY_EVERY;
    tracing::warn!(
        "this validator has no record of its votes on this chain (its simplex journal is missing): it follows the chain and votes only after the network has finalized a view it cannot have voted in (start it with --vote-without-record if a quorum of validators lost their journals and the network halted)"
    );
    loop {
        let message = commonware_macros::select! {
            received = certificates.recv() => match received {
                Ok((_, message)) => message,
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
        let Ok(certificate) = Certificate::<Scheme, Digest>::decode_cfg(message, &codec) else { continue };
        let view = view_of(&certificate);
        // Only a view that would change something is worth a verification.
        let useful = match &certificate {
            Certificate::Finalization(_) => view > last_final,
            _ => gate.bar().is_none() && view > gate.highest(),
        };
        if !useful || !certificate.verify(&mut context, &scheme, &Sequential) {
            continue;
        }
        gate.seen(view, context.current());
        if let Certificate::Finalization(f) = certificate {
            last_final = view;
            let _ = mailbox.report(Activity::Finalization(f.clone()));
            if gate.opens_at(view) {
                tracing::info!(view, bar = gate.bar(), "this validator starts voting after this finalized view");
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
        let mut gate = VoteGate::new(Duration::from_secs(3));
        assert!(!gate.opens_at(u64::MAX), "nothing seen: closed");
        gate.seen(100, at(10_000));
        gate.seen(104, at(11_000));
        gate.seen(102, at(12_999));
        assert_eq!(gate.bar(), None, "still observing");
        assert!(!gate.opens_at(500), "no bar while observing");
        // The first certificate after the window sets the bar from what was seen in it.
        gate.seen(106, at(13_000));
        assert_eq!(gate.bar(), Some(105));
        assert!(!gate.opens_at(104));
        assert!(!gate.opens_at(105), "it may have voted in the view above the highest certificate");
        assert!(gate.opens_at(106));
        // Later certificates do not move the bar.
        gate.seen(1_000, at(20_000));
        assert_eq!(gate.bar(), Some(105));
    }

    #[test]
    fn a_clock_going_back_neither_panics_nor_ends_the_window() {
        let mut gate = VoteGate::new(Duration::from_secs(3));
        gate.seen(7, at(10_000));
        gate.seen(9, at(5_000));
        assert_eq!(gate.bar(), None);
        assert_eq!(gate.highest(), 9);
        gate.seen(u64::MAX, at(10_500));
        gate.seen(1, at(14_000));
        assert_eq!(gate.bar(), Some(u64::MAX), "saturates, never wraps to a low bar");
        assert!(!gate.opens_at(u64::MAX));
    }
}
