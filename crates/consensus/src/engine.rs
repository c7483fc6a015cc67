//! Starting consensus on a node: simplex + marshal for validators, marshal alone (fed by the
//! finality certificates validators broadcast) for followers, and the task that applies finalized
//! blocks to the node's [`Chain`] in height order.
//!
//! Generic over the runtime and the p2p channels, so nodes (tokio, authenticated p2p) and the
//! simulator (deterministic runtime, simulated links) run the same code.

use crate::app::{Behaviour, LedgerApp};
use crate::block::{BlockCfg, LedgerBlock, hash_of};
use crate::candidates::{self, Candidates};
use crate::chain::Chain;
use crate::liveness::{self, SharedTracker, Tracker};
use commonware_broadcast::buffered;
use commonware_codec::{Decode as _, Encode as _};
use commonware_consensus::marshal::core::{Actor, Mailbox};
use commonware_consensus::marshal::standard::Standard;
use commonware_consensus::marshal::{self, Start, Update};
use commonware_consensus::simplex::config::{Floor, ForwardPolicy, SkipBudget, SkipPolicy};
use commonware_consensus::simplex::elector::RoundRobin;
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_consensus::simplex::types::{Activity, Certificate, Finalization};
use commonware_consensus::simplex::{self};
use commonware_consensus::types::{Epoch, FixedEpocher, Round, View, ViewDelta};
use commonware_consensus::{Heightable as _, Reporter};
use commonware_cryptography::blake3::Digest;
use commonware_cryptography::certificate::{ConstantProvider, Verifier as _};
use commonware_cryptography::ed25519::{PrivateKey, PublicKey};
use commonware_cryptography::{Digested, Digestible, Sha256, Signer as _};
use commonware_p2p::{Blocker, Provider, Receiver, Sender};
use commonware_parallel::Sequential;
use commonware_runtime::buffer::paged::CacheRef;
use commonware_runtime::{Clock, Handle, Metrics, Spawner, Storage};
use commonware_storage::archive::immutable;
use commonware_utils::acknowledgement::Exact;
use commonware_utils::channel::{mpsc, oneshot};
use commonware_utils::{Acknowledgement as _, NZDuration, NZU16, NZU64, NZUsize, ordered::Set};
use std::sync::Arc;
use std::time::Duration;

/// p2p channel of simplex votes.
pub const VOTES_CHANNEL: u64 = 1;
/// p2p channel of simplex certificates (followers read finalizations from it).
pub const CERTIFICATES_CHANNEL: u64 = 2;
/// p2p channel of simplex's certificate fetches.
pub const RESOLVER_CHANNEL: u64 = 3;
/// p2p channel of full blocks (marshal's buffered broadcast).
pub const BLOCKS_CHANNEL: u64 = 4;
/// p2p channel of block backfill (marshal's resolver).
pub const BACKFILL_CHANNEL: u64 = 5;
/// p2p channel of candidate blocks a validator missed ([`crate::candidates`]).
pub const FETCH_CHANNEL: u64 = 7;

/// The consensus namespace of a network (signatures of one network never count in another).
pub fn namespace(genesis_hash: &str) -> Vec<u8> {
    format!("archipel/consensus/v1/{genesis_hash}").into_bytes()
}

/// What consensus needs besides the runtime, the network and the chain.
#[derive(Clone, Debug)]
pub struct ConsensusConfig {
    /// [`namespace`] of the network.
    pub namespace: Vec<u8>,
    /// The validators' keys.
    pub validators: Vec<PublicKey>,
    /// Decoding limits of blocks.
    pub block_cfg: BlockCfg,
    /// How this node behaves as a validator (simulator faults).
    pub behaviour: Behaviour,
    /// Time a view waits for its leader's proposal.
    pub leader_timeout: Duration,
}

impl ConsensusConfig {
    /// Defaults for a network.
    pub fn new(namespace: Vec<u8>, validators: Vec<PublicKey>, block_cfg: BlockCfg) -> Self {
        Self { namespace, validators, block_cfg, behaviour: Behaviour::Honest, leader_timeout: Duration::from_secs(1) }
    }

    fn participants(&self) -> Set<PublicKey> {
        Set::from_iter_dedup(self.validators.iter().cloned())
    }

    /// A scheme that checks finality certificates (no signing).
    pub fn verifier(&self) -> Scheme {
        Scheme::verifier(&self.namespace, self.participants())
    }
}

/// Checks that `certificate` (an encoded simplex finalization) finalizes the block with header
/// hash `block`, signed by a quorum of `cfg`'s validators.
pub fn verify_finality(cfg: &ConsensusConfig, block: &archipel_ledger::Hash, certificate: &[u8]) -> Result<(), String> {
    let scheme = cfg.verifier();
    let f = Finalization::<Scheme, Digest>::decode_cfg(
        commonware_codec::Copying(certificate),
        &scheme.certificate_codec_config(),
    )
    .map_err(|e| format!("not a finality certificate: {e}"))?;
    if f.proposal.payload != crate::block::digest_of(block) {
        return Err(format!("it finalizes {} (another block)", crate::block::hash_of(&f.proposal.payload).short()));
    }
    if !f.verify(&mut rand::rng(), &scheme, &Sequential) {
        return Err("its signatures are not a quorum of the validators".into());
    }
    Ok(())
}

/// The p2p channels consensus uses, as `(sender, receiver)` pairs.
#[allow(missing_debug_implementations)]
pub struct Channels<S, R> {
    /// [`VOTES_CHANNEL`].
    pub votes: (S, R),
    /// [`CERTIFICATES_CHANNEL`].
    pub certificates: (S, R),
    /// [`RESOLVER_CHANNEL`].
    pub resolver: (S, R),
    /// [`BLOCKS_CHANNEL`].
    pub blocks: (S, R),
    /// [`BACKFILL_CHANNEL`].
    pub backfill: (S, R),
    /// [`FETCH_CHANNEL`].
    pub fetch: (S, R),
    /// [`crate::liveness::LIVENESS_CHANNEL`].
    pub liveness: (S, R),
}

/// What the applier task hears.
pub(crate) enum ToApply {
    /// Marshal's finalized blocks, in height order, once durable in its archives.
    Block(Update<LedgerBlock>),
    /// A finalization as simplex forms it, before marshal has stored anything: the fast path
    /// for blocks this node already executed.
    Finalization(Finalization<Scheme, Digest>),
}

/// Forwards marshal's finalized blocks to the applier task.
#[derive(Clone, Debug)]
struct Finalized(mpsc::UnboundedSender<ToApply>);

impl Reporter for Finalized {
    type Activity = Update<LedgerBlock>;
    fn report(&mut self, activity: Self::Activity) -> commonware_actor::Feedback {
        match self.0.send(ToApply::Block(activity)) {
            Ok(()) => commonware_actor::Feedback::Ok,
            Err(_) => commonware_actor::Feedback::Closed,
        }
    }
}

fn archive_config<C>(prefix: &str, what: &str, page_cache: &CacheRef, codec_config: C) -> immutable::Config<C> {
    immutable::Config {
        metadata_partition: format!("{prefix}-{what}-metadata"),
        freezer_table_partition: format!("{prefix}-{what}-table"),
        freezer_table_initial_size: 1_024,
        freezer_table_resize_frequency: 4,
        freezer_table_resize_chunk_size: 1 << 16,
        freezer_key_partition: format!("{prefix}-{what}-key"),
        freezer_key_page_cache: page_cache.clone(),
        freezer_value_partition: format!("{prefix}-{what}-value"),
        freezer_value_target_size: 1 << 30,
        freezer_value_compression: None,
        ordinal_partition: format!("{prefix}-{what}-ordinal"),
        items_per_section: NZU64!(262_144),
        freezer_key_write_buffer: NZUsize!(1 << 16),
        freezer_value_write_buffer: NZUsize!(1 << 16),
        ordinal_write_buffer: NZUsize!(1 << 16),
        replay_buffer: NZUsize!(1 << 16),
        codec_config,
    }
}

/// Starts consensus for this node: as a validator if `key` is one, else as a follower.
/// `provider` tells marshal and the block broadcast who the peers are; `blocker` blocks peers
/// that send invalid data (on a node both are the p2p oracle).
pub async fn start<E, P, B, S, R>(
    context: E,
    key: PrivateKey,
    provider: P,
    blocker: B,
    chain: Arc<Chain>,
    cfg: ConsensusConfig,
    channels: Channels<S, R>,
) -> Result<Vec<Handle<()>>, String>
where
    E: Spawner + Clock + Storage + Metrics + rand_core::CryptoRng,
    P: Provider<PublicKey = PublicKey> + Clone + Send + Sync + 'static,
    B: Blocker<PublicKey = PublicKey> + Clone + Send + Sync + 'static,
    S: Sender<PublicKey = PublicKey>,
    R: Receiver<PublicKey = PublicKey>,
{
    let me = key.public_key();
    let key_for_heartbeats = key.clone();
    let mut handles = Vec::new();
    let participants = cfg.participants();
    let signer = Scheme::signer(&cfg.namespace, participants.clone(), key);
    let scheme = signer.clone().unwrap_or_else(|| cfg.verifier());
    let genesis_state = chain.genesis_state();
    let genesis = LedgerBlock::genesis(&genesis_state);
    let genesis_digest = genesis.digest();
    let genesis = Digested::precomputed(genesis, genesis_digest);
    let page_cache = CacheRef::new(NZU16!(4096), NZUsize!(256));
    let epocher = FixedEpocher::new(NZU64!(u64::MAX));
    let prefix = "archipel-marshal";

    let (broadcast, buffer) = buffered::Engine::<_, PublicKey, LedgerBlock, _, _>::new(
        context.child("broadcast"),
        buffered::Config {
            public_key: me.clone(),
            mailbox_size: NZUsize!(1024),
            // Marshal takes finalized blocks from here (it hears a finalization only every
            // MARSHAL_FINALIZATION_INTERVAL): room for a few seconds of blocks per leader.
            deque_size: 128,
            priority: true,
            codec_config: cfg.block_cfg,
            peer_provider: provider.clone(),
            strategy: Sequential,
        },
    );
    let resolver = marshal::resolver::p2p::init(
        context.child("backfill"),
        marshal::resolver::p2p::Config {
            public_key: me.clone(),
            peer_provider: provider.clone(),
            blocker: blocker.clone(),
            mailbox_size: NZUsize!(1024),
            fetch_timeout: NZDuration!(Duration::from_secs(1)),
            fetch_retry_delay: Duration::from_millis(100),
            priority_requests: false,
            priority_responses: false,
        },
        channels.backfill,
    );
    let finalizations = immutable::Archive::init(
        context.child("finalizations"),
        archive_config(prefix, "finalizations", &page_cache, Scheme::certificate_codec_config_unbounded()),
    )
    .await
    .map_err(|e| format!("cannot open the finalizations archive: {e}"))?;
    let blocks =
        immutable::Archive::init(context.child("blocks"), archive_config(prefix, "blocks", &page_cache, cfg.block_cfg))
            .await
            .map_err(|e| format!("cannot open the blocks archive: {e}"))?;
    let (actor, mailbox, _floor) =
        Actor::<E, Standard<LedgerBlock>, ConstantProvider<Scheme, Epoch>, _, _, FixedEpocher, Sequential>::init(
            context.child("marshal"),
            finalizations,
            blocks,
            marshal::Config {
                provider: ConstantProvider::new(scheme.clone()),
                epocher: epocher.clone(),
                start: Start::Genesis(genesis),
                partition_prefix: prefix.to_string(),
                mailbox_size: NZUsize!(1024),
                view_retention: ViewDelta::new(1024),
                prunable_items_per_section: NZU64!(4096),
                page_cache: page_cache.clone(),
                replay_buffer: NZUsize!(1 << 16),
                key_write_buffer: NZUsize!(1 << 16),
                value_write_buffer: NZUsize!(1 << 16),
                block_codec_config: cfg.block_cfg,
                max_repair: NZUsize!(64),
                max_pending_acks: NZUsize!(64),
                strategy: Sequential,
            },
        )
        .await;

    // Heartbeats: every node sends them; validators track them for the blocks' liveness changes.
    let ttl = Duration::from_millis(genesis_state.params().lease_ttl_ms);
    let tracker: SharedTracker =
        Arc::new(std::sync::Mutex::new(Tracker::new(ttl, crate::app::IDLE_WAIT, context.current())));
    let (heartbeat_sender, heartbeat_receiver) = channels.liveness;
    handles.push(context.child("heartbeat").spawn({
        let identity = archipel_crypto::Identity::from_private_key(key_for_heartbeats);
        let (chain, validators) = (chain.clone(), cfg.validators.clone());
        let own = signer.is_some().then(|| tracker.clone());
        move |context| liveness::send_heartbeats(context, identity, chain, heartbeat_sender, validators, own)
    }));
    if signer.is_some() {
        let tracker = tracker.clone();
        handles.push(
            context
                .child("heartbeat_receiver")
                .spawn(move |context| liveness::receive_heartbeats(context, heartbeat_receiver, tracker)),
        );
    } else {
        drop(heartbeat_receiver);
    }

    let (finalized_tx, finalized_rx) = mpsc::unbounded_channel();
    let early_tx = finalized_tx.clone();
    handles.push(broadcast.start(channels.blocks));
    let buffer_for_app = buffer.clone();
    handles.push(actor.start(Finalized(finalized_tx), buffer, resolver));
    handles.push(context.child("ledger_apply").spawn({
        let chain = chain.clone();
        let mailbox = mailbox.clone();
        move |context| apply_finalized(context, chain, mailbox, finalized_rx)
    }));

    match signer {
        Some(scheme) => {
            let others: Vec<PublicKey> = participants.iter().filter(|p| **p != me).cloned().collect();
            let opened = Candidates::open(context.child("candidates"), chain.head().height, &cfg.block_cfg).await?;
            // Candidates read back after a restart: marshal may need them to finish the chain.
            for (view, block) in opened.recovered {
                let (ack, _) = oneshot::channel();
                mailbox.verified_deferred(Round::new(Epoch::zero(), View::new(view)), block, ack);
            }
            let (candidates, wants, block_cfg) = (opened.candidates.clone(), opened.wants, cfg.block_cfg);
            handles.push(
                context
                    .child("candidate_fetch")
                    .spawn(move |_| candidates::serve(candidates, wants, channels.fetch, others, block_cfg)),
            );
            let app = LedgerApp::new(
                context.child("ledger"),
                chain,
                cfg.behaviour,
                mailbox,
                buffer_for_app,
                opened.candidates,
                early_tx,
                tracker,
            );
            let engine = simplex::Engine::new(
                context.child("simplex"),
                simplex::Config {
                    scheme,
                    elector: RoundRobin::<Sha256>::default(),
                    blocker,
                    automaton: app.clone(),
                    relay: app.clone(),
                    reporter: app,
                    track_historical_votes: false,
                    strategy: Sequential,
                    partition: "archipel-simplex-e0".into(),
                    mailbox_size: NZUsize!(1024),
                    epoch: Epoch::zero(),
                    floor: Floor::Genesis(genesis_digest),
                    replay_buffer: NZUsize!(1 << 16),
                    write_buffer: NZUsize!(1 << 16),
                    page_cache,
                    leader_timeout: cfg.leader_timeout,
                    certification_timeout: cfg.leader_timeout * 3 / 2,
                    timeout_retry: cfg.leader_timeout,
                    view_retention: ViewDelta::new(256),
                    skip: SkipPolicy::Enabled { timeout: cfg.leader_timeout * 3, budget: SkipBudget::Participants },
                    fetch_timeout: NZDuration!(Duration::from_secs(1)),
                    fetch_retry_delay: Duration::from_millis(100),
                    forward: ForwardPolicy::SilentLeader,
                },
            );
            handles.push(engine.start(channels.votes, channels.certificates, channels.resolver));
        }
        None => {
            // A follower keeps the simplex channels registered (validators send to everyone) and
            // feeds verified finalizations from the certificate channel to marshal.
            let (_votes_tx, votes_rx) = channels.votes;
            let (_resolver_tx, resolver_rx) = channels.resolver;
            drop((votes_rx, resolver_rx));
            let (_, certificates) = channels.certificates;
            handles.push(
                context
                    .child("finality_tap")
                    .spawn(move |context| tap_finalizations(context, scheme, mailbox, certificates)),
            );
        }
    }
    Ok(handles)
}

async fn tap_finalizations<E, R>(
    mut context: E,
    scheme: Scheme,
    mut mailbox: Mailbox<Scheme, Standard<LedgerBlock>>,
    mut certificates: R,
) where
    E: rand_core::CryptoRng,
    R: Receiver<PublicKey = PublicKey>,
{
    let codec = scheme.certificate_codec_config();
    let mut last_view = 0u64;
    while let Ok((_, message)) = certificates.recv().await {
        let Ok(cert) = Certificate::<Scheme, Digest>::decode_cfg(message, &codec) else { continue };
        let Certificate::Finalization(f) = cert else { continue };
        let view = f.proposal.round.view().get();
        if view <= last_view || !f.verify(&mut context, &scheme, &Sequential) {
            continue;
        }
        last_view = view;
        let _ = mailbox.report(Activity::Finalization(f));
    }
}

/// Marshal's deliveries are acknowledged in batches of this many (each acknowledgement batch
/// costs marshal's actor a metadata fsync, during which it answers nobody)...
const ACK_BATCH: usize = 16;
/// ...or when no delivery came for this long. Unacknowledged blocks are delivered again after a
/// restart, which the chain ignores (it already has them).
const ACK_DELAY: Duration = Duration::from_millis(200);

async fn apply_finalized<E: Clock>(
    context: E,
    chain: Arc<Chain>,
    mailbox: Mailbox<Scheme, Standard<LedgerBlock>>,
    mut updates: mpsc::UnboundedReceiver<ToApply>,
) {
    let mut acks: Vec<Exact> = Vec::new();
    loop {
        let update = if acks.is_empty() {
            updates.recv().await
        } else {
            commonware_macros::select! {
                update = updates.recv() => update,
                _ = context.sleep(ACK_DELAY) => {
                    acks.drain(..).for_each(Exact::acknowledge);
                    continue;
                },
            }
        };
        let Some(update) = update else { return };
        let applied = match update {
            ToApply::Finalization(f) => {
                let applied = chain.finalize_known(&hash_of(&f.proposal.payload), f.encode().to_vec());
                // `advanced`: this finalization moved the head (false: not executed here yet, or
                // final already — a catch-up hands the same finalization over twice).
                tracing::debug!(
                    view = f.proposal.round.view().get(),
                    advanced = matches!(applied, Ok(Some(_))),
                    "finalization"
                );
                applied
            }
            ToApply::Block(Update::Block(block, ack)) => {
                let height = block.height();
                let mut applied = Ok(None);
                if height.get() > chain.head().height {
                    // A block finalized as the ancestor of a later finalized block has no
                    // certificate of its own: it is proven by the next certified block through
                    // the parent-hash links.
                    let certificate =
                        mailbox.get_finalization(height).await.map(|f| f.encode().to_vec()).unwrap_or_default();
                    applied = chain.finalize(block.inner().block().clone(), certificate);
                    tracing::debug!(height = height.get(), "finalized block from marshal");
                }
                if applied.is_ok() {
                    acks.push(ack);
                    if acks.len() >= ACK_BATCH {
                        acks.drain(..).for_each(Exact::acknowledge);
                    }
                }
                applied
            }
            ToApply::Block(_) => Ok(None),
        };
        match applied {
            Ok(Some(f)) => {
                for node in f.went_down {
                    tracing::info!(height = f.block.header.height, node = %node.short(), "validators stopped hearing the node: lease down");
                }
                for node in f.came_up {
                    tracing::info!(height = f.block.header.height, node = %node.short(), "node heard again: lease up");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "a finalized block does not apply; stopping the ledger");
                return;
            }
        }
    }
}
