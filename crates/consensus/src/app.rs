//! The ledger as the simplex application: propose a block from the mempool as soon as
//! transactions wait, verify other validators' blocks by executing them, and apply finalized
//! blocks in order.

use crate::block::{LedgerBlock, hash_of};
use crate::chain::{Chain, MAX_CLOCK_DRIFT_MS};
use commonware_consensus::Application;
use commonware_consensus::marshal::ancestry::Ancestry;
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_consensus::simplex::types::Context;
use commonware_cryptography::blake3::Digest;
use commonware_cryptography::ed25519::PublicKey;
use commonware_cryptography::{Digested, Digestible};
use commonware_runtime::{Clock, Metrics, Spawner};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long an idle leader waits for a transaction before proposing an empty block.
pub const IDLE_WAIT: Duration = Duration::from_millis(250);

/// How a validator misbehaves (simulator only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Follows the protocol.
    #[default]
    Honest,
    /// Proposes blocks with a wrong state root.
    ProposesInvalidBlocks,
}

/// The ledger application given to marshal's inline wrapper.
#[derive(Clone, Debug)]
pub struct LedgerApp {
    chain: Arc<Chain>,
    behaviour: Behaviour,
}

impl LedgerApp {
    /// The application over `chain`.
    pub fn new(chain: Arc<Chain>, behaviour: Behaviour) -> Self {
        Self { chain, behaviour }
    }

    /// Makes sure the state after `tip` is known, executing the unknown ancestors (oldest first)
    /// that `ancestry` (newest first, after `tip`) yields. False if they do not connect to the
    /// finalized chain or one is invalid.
    async fn ensure_known(
        &self,
        now_ms: u64,
        tip: Digested<LedgerBlock>,
        mut ancestry: impl Ancestry<LedgerBlock>,
    ) -> bool {
        let head = self.chain.head().height;
        let mut missing = vec![tip];
        loop {
            let last = missing.last().expect("starts with the tip");
            if self.chain.knows(&hash_of(&last.digest())) {
                missing.pop();
                break;
            }
            if last.inner().header().height <= head {
                tracing::debug!(height = last.inner().header().height, head, "ancestor is not on the finalized chain");
                return false;
            }
            match ancestry.next().await {
                Some(b) => missing.push(b),
                None => {
                    tracing::debug!(height = last.inner().header().height, "ancestry ended before a known block");
                    return false;
                }
            }
        }
        missing.iter().rev().all(|b| match self.chain.verify(b.inner().block(), now_ms) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(height = b.inner().header().height, error = %e, "ancestor does not verify");
                false
            }
        })
    }
}

fn now_ms(clock: &impl Clock) -> u64 {
    clock.current().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl<E> Application<E> for LedgerApp
where
    E: Clock + Spawner + Metrics,
{
    type SigningScheme = Scheme;
    type Context = Context<Digest, PublicKey>;
    type Block = LedgerBlock;
    type Input = ();

    async fn propose(
        &mut self,
        (runtime, _context): (E, Self::Context),
        mut ancestry: impl Ancestry<LedgerBlock>,
        _input: (),
    ) -> Option<Digested<LedgerBlock>> {
        let parent = ancestry.next().await?;
        let parent_hash = hash_of(&parent.digest());
        if !self.ensure_known(now_ms(&runtime), parent, ancestry).await {
            return None;
        }
        // No fixed block interval: propose at once when transactions can go in, else wait a
        // little for one (an empty block still moves block time forward, which drives leases).
        // Transactions that cannot go in yet (a nonce gap) do not count.
        let deadline = runtime.current() + IDLE_WAIT;
        let mut block = loop {
            let arrived = self.chain.next_submission();
            let block = self.chain.build(&parent_hash, now_ms(&runtime))?;
            if !block.txs.is_empty() || runtime.current() >= deadline {
                break block;
            }
            commonware_macros::select! {
                _ = arrived => {},
                _ = runtime.sleep_until(deadline) => {},
            }
        };
        tracing::debug!(height = block.header.height, txs = block.txs.len(), "proposing");
        if self.behaviour == Behaviour::ProposesInvalidBlocks {
            block.header.state_root.0[0] ^= 0xff;
        }
        let block = LedgerBlock::new(block);
        let digest = block.digest();
        Some(Digested::precomputed(block, digest))
    }

    async fn verify(
        &mut self,
        (runtime, _context): (E, Self::Context),
        mut ancestry: impl Ancestry<LedgerBlock>,
    ) -> bool {
        let Some(block) = ancestry.next().await else { return false };
        // Already executed here (or just finalized without our vote, which is the head now).
        if self.chain.knows(&hash_of(&block.digest())) {
            return true;
        }
        let Some(parent) = ancestry.next().await else { return false };
        if !self.ensure_known(now_ms(&runtime), parent, ancestry).await {
            return false;
        }
        // A block from slightly in the future is not invalid: wait until it is acceptable.
        let ts = block.inner().header().timestamp_ms;
        let now = now_ms(&runtime);
        if ts > now + MAX_CLOCK_DRIFT_MS {
            let wait = ts - now - MAX_CLOCK_DRIFT_MS;
            runtime.sleep(Duration::from_millis(wait.min(10_000))).await;
        }
        tracing::debug!(height = block.inner().header().height, "verifying");
        match self.chain.verify(block.inner().block(), now_ms(&runtime)) {
            Ok(()) => {
                tracing::debug!(height = block.inner().header().height, "verified");
                true
            }
            Err(e) => {
                tracing::warn!(height = block.inner().header().height, error = %e, "rejecting an invalid block");
                false
            }
        }
    }
}

/// Wall-clock Unix ms (for callers outside a runtime).
pub fn system_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}
