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
use crate::store::Synced;
use crate::vote_gate;
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
use commonware_consensus::types::{Epoch, FixedEpocher, Height, Round, View, ViewDelta};
use commonware_consensus::{Heightable as _, Reporter};
use commonware_cryptography::blake3::Digest;
use commonware_cryptography::certificate::{ConstantProvider, Verifier as _};
use commonware_cryptography::ed25519::{PrivateKey, PublicKey};
use commonware_cryptography::{Digested, Digestible, Sha256, Signer as _};
use commonware_p2p::{Blocker, Provider, Receiver, Sender};
use commonware_parallel::Sequential;
use commonware_runtime::buffer::paged::CacheRef;
use commonware_runtime::telemetry::metrics::{Counter, Gauge, GaugeExt as _, MetricsExt as _};
use commonware_runtime::{Clock, Handle, Metrics, Spawner, Storage};
use commonware_storage::archive::immutable;
use commonware_utils::acknowledgement::Exact;
use commonware_utils::channel::{mpsc, oneshot};
use commonware_utils::{Acknowledgement as _, NZDuration, NZU16, NZU64, NZUsize, ordered::Set};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
    /// A validator whose simplex journal is missing votes at once instead of waiting at the
    /// [`crate::vote_gate`] (`node run --vote-without-record`: the operator knows it cast no vote
    /// in the views of the lost record).
    pub vote_without_record: bool,
}

impl ConsensusConfig {
    /// Defaults for a network.
    pub fn new(namespace: Vec<u8>, validators: Vec<PublicKey>, block_cfg: BlockCfg) -> Self {
        Self {
            namespace,
            validators,
            block_cfg,
            behaviour: Behaviour::Honest,
            leader_timeout: Duration::from_secs(1),
            vote_without_record: false,
        }
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

/// A finality certificate for the block with header hash `block`, signed by `signers` (validators
/// of `cfg`) at view `view`: for tools and tests that build a chain without running consensus.
/// `None` if a signer is not a validator or the signers are not a quorum.
pub fn sign_finality(
    cfg: &ConsensusConfig,
    signers: &[PrivateKey],
    block: &archipel_ledger::Hash,
    view: u64,
) -> Option<Vec<u8>> {
    use commonware_consensus::simplex::types::{Finalize, Proposal};
    let round = Round::new(Epoch::zero(), View::new(view));
    let proposal = Proposal::new(round, View::new(view.saturating_sub(1)), crate::block::digest_of(block));
    let votes = signers
        .iter()
        .map(|key| Finalize::sign(&Scheme::signer(&cfg.namespace, cfg.participants(), key.clone())?, proposal.clone()))
        .collect::<Option<Vec<_>>>()?;
    let votes = commonware_utils::iter::NonEmpty::try_new(votes.into_iter())?;
    Finalization::from_owned_finalizes(&cfg.verifier(), votes, &Sequential).ok().map(|f| f.encode().to_vec())
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

/// Simplex's journal (epoch 0): the record of this validator's votes.
pub const SIMPLEX_PARTITION: &str = "archipel-simplex-e0";

/// True when `partition` holds nothing yet (consensus storage never written here).
async fn is_new<E: Storage>(context: &E, partition: &str) -> bool {
    context.scan(partition).await.map_or(true, |blobs| blobs.is_empty())
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
    // Marshal and simplex start at the genesis, or — when their storage is new but the block log
    // is not (a node that joined by state sync, or whose ledger came from elsewhere) — at the
    // log's highest certified block: nothing below it is asked of the network. With storage of
    // their own they resume from what they recorded.
    let marshal_new = is_new(&context, &format!("{prefix}-application-metadata")).await;
    let simplex_new = is_new(&context, SIMPLEX_PARTITION).await;
    let tip = match chain.certified_tip()? {
        Some((block, certificate)) if marshal_new || simplex_new => {
            // Checked before marshal sees it (marshal panics on a floor that does not verify):
            // a log from elsewhere, or a damaged one, is refused with a reason.
            let height = block.header.height;
            verify_finality(&cfg, &block.hash(), &certificate).map_err(|e| {
                format!("block {height}'s stored finality certificate is not valid ({e}): the block log is damaged or not this network's; move the ledger directory aside and start with --join")
            })?;
            let f = Finalization::<Scheme, Digest>::decode_cfg(
                commonware_codec::Copying(certificate.as_slice()),
                &scheme.certificate_codec_config(),
            )
            .map_err(|e| format!("block {height}'s stored finality certificate does not decode: {e}"))?;
            Some((height, block, f))
        }
        _ => None,
    };
    // The floor's block, which marshal needs in hand before it delivers anything above it: given
    // to the block broadcast's local cache below, where marshal looks first (nobody else may
    // hold it in a marshal archive: every node may have started from such a floor).
    let mut floor_block = None;
    let marshal_floor = match &tip {
        Some((height, block, f)) if marshal_new => {
            floor_block = Some(LedgerBlock::new(block.clone()));
            tracing::info!(height, "marshal starts from the block log's highest certified block");
            Start::Floor(f.clone())
        }
        _ => Start::Genesis(genesis),
    };
    // A validator whose journal is missing while its block log is past the genesis may have voted
    // on this chain: it waits at the vote gate, unless it is known never to have voted.
    let never_voted = !is_new(&context, vote_gate::NEVER_VOTED_PARTITION).await;
    if never_voted && signer.is_none() {
        // A follower keeps no record of votes: the marker means nothing to it.
        context
            .remove(vote_gate::NEVER_VOTED_PARTITION, None)
            .await
            .map_err(|e| format!("cannot remove the never-voted marker: {e}"))?;
    } else if never_voted {
        // The marker holds until the journal has a record: removed once it has one (a crash
        // before that finds the marker again; after it, a lost journal is noticed).
        handles.push(context.child("never_voted").spawn(|context| async move {
            while is_new(&context, SIMPLEX_PARTITION).await {
                context.sleep(Duration::from_secs(1)).await;
            }
            if let Err(e) = context.remove(vote_gate::NEVER_VOTED_PARTITION, None).await {
                tracing::warn!(error = %e, "cannot remove the never-voted marker; remove <data dir>/runtime/{} by hand", vote_gate::NEVER_VOTED_PARTITION);
            }
        }));
    }
    let gated = signer.is_some() && simplex_new && tip.is_some() && !never_voted && !cfg.vote_without_record;
    // The view of the log's last certified block: this validator took part in views up to it.
    let known_view = tip.as_ref().map_or(0, |(_, _, f)| f.proposal.round.view().get());
    let simplex_floor = match tip {
        Some((height, _, f)) if simplex_new => {
            if signer.is_some() && !gated {
                tracing::warn!(
                    height,
                    never_voted,
                    "this validator has no record of earlier votes and was told it never voted on this chain: voting starts after the block log's highest certified block"
                );
            }
            Floor::Finalized(f)
        }
        _ => Floor::Genesis(genesis_digest),
    };

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
                start: marshal_floor,
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
    let identity = archipel_crypto::Identity::from_private_key(key_for_heartbeats);
    let tracker: SharedTracker = Arc::new(std::sync::Mutex::new(
        Tracker::new(ttl, crate::app::LIVENESS_RECHECK, context.current())
            .with_validators(&cfg.validators, identity.node_id()),
    ));
    let (heartbeat_sender, heartbeat_receiver) = channels.liveness;
    handles.push(context.child("heartbeat").spawn({
        let (chain, validators) = (chain.clone(), cfg.validators.clone());
        let own = signer.is_some().then(|| tracker.clone());
        move |context| liveness::send_heartbeats(context, identity, chain, heartbeat_sender, validators, own)
    }));
    if signer.is_some() {
        let (tracker, network) = (tracker.clone(), genesis_state.network());
        handles.push(
            context
                .child("heartbeat_receiver")
                .spawn(move |context| liveness::receive_heartbeats(context, heartbeat_receiver, tracker, network)),
        );
    } else {
        drop(heartbeat_receiver);
    }

    let (finalized_tx, finalized_rx) = mpsc::unbounded_channel();
    let early_tx = finalized_tx.clone();
    handles.push(broadcast.start(channels.blocks));
    if let Some(block) = floor_block {
        let digest = block.digest();
        // To no one: only into this node's cache.
        let _ = commonware_broadcast::Broadcaster::broadcast(
            &buffer,
            commonware_p2p::Recipients::Some(Vec::new()),
            Digested::precomputed(block, digest),
        );
    }
    let buffer_for_app = buffer.clone();
    handles.push(actor.start(Finalized(finalized_tx), buffer, resolver));
    handles.push(context.child("ledger_applier").spawn({
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
            let gate_mailbox = mailbox.clone();
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
            let leader_timeout = cfg.leader_timeout;
            let start_simplex = move |context: E, floor, votes: (S, R), certificates: (S, R), resolver: (S, R)| {
                let engine = simplex::Engine::new(
                    context,
                    simplex::Config {
                        scheme,
                        elector: RoundRobin::<Sha256>::default(),
                        blocker,
                        automaton: app.clone(),
                        relay: app.clone(),
                        reporter: app,
                        track_historical_votes: false,
                        strategy: Sequential,
                        partition: SIMPLEX_PARTITION.into(),
                        mailbox_size: NZUsize!(1024),
                        epoch: Epoch::zero(),
                        floor,
                        replay_buffer: NZUsize!(1 << 16),
                        write_buffer: NZUsize!(1 << 16),
                        page_cache,
                        leader_timeout,
                        certification_timeout: leader_timeout * 3 / 2,
                        timeout_retry: leader_timeout,
                        view_retention: ViewDelta::new(256),
                        skip: SkipPolicy::Enabled { timeout: leader_timeout * 3, budget: SkipBudget::Participants },
                        fetch_timeout: NZDuration!(Duration::from_secs(1)),
                        fetch_retry_delay: Duration::from_millis(100),
                        forward: ForwardPolicy::SilentLeader,
                    },
                );
                engine.start(votes, certificates, resolver)
            };
            if gated {
                let verifier = cfg.verifier();
                let validators = cfg.validators.clone();
                handles.push(context.child("vote_gate").spawn(move |context| async move {
                    let metrics = vote_gate::GateMetrics::register(&context);
                    let (votes_tx, mut votes_rx) = channels.votes;
                    let (certificates_tx, mut certificates_rx) = channels.certificates;
                    let (resolver_tx, mut resolver_rx) = channels.resolver;
                    let opened = vote_gate::wait(
                        context.child("wait"),
                        verifier,
                        gate_mailbox,
                        vote_gate::Watched {
                            certificates: &mut certificates_rx,
                            votes: &mut votes_rx,
                            resolver: &mut resolver_rx,
                        },
                        &metrics,
                        &validators,
                        known_view,
                    )
                    .await;
                    let Some(finalization) = opened else { return };
                    let engine = start_simplex(
                        context.child("simplex"),
                        Floor::Finalized(finalization),
                        (votes_tx, votes_rx),
                        (certificates_tx, certificates_rx),
                        (resolver_tx, resolver_rx),
                    );
                    let _ = engine.await;
                }));
            } else {
                drop(gate_mailbox);
                handles.push(start_simplex(
                    context.child("simplex"),
                    simplex_floor,
                    channels.votes,
                    channels.certificates,
                    channels.resolver,
                ));
            }
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
/// costs marshal's actor a metadata fsync, during which it answers nobody, and costs the block
/// log a sync before it)...
const ACK_BATCH: usize = 16;
/// ...or this long after the oldest delivery not yet acknowledged. Unacknowledged blocks are
/// delivered again after a restart, which the chain ignores (it already has them).
const ACK_DELAY: Duration = Duration::from_millis(200);
/// A failed apply or block-log sync is retried after this long, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between two attempts.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A failed attempt: the height it was about, and what went wrong.
type Failure = (u64, String);

/// The acknowledgements of a batch of applied blocks, waiting for the block log's sync.
struct Syncing {
    answer: Synced,
    acks: Vec<Exact>,
}

/// What the applier waits for.
enum Event {
    /// An update from marshal or simplex (`None`: consensus stopped).
    Update(Option<ToApply>),
    /// Time to sync the block log for the blocks applied since the last sync.
    Flush,
    /// The block log's sync answered.
    Synced(Result<u64, String>),
}

/// The task that applies finalized blocks to the [`Chain`] in height order.
///
/// It never gives up and never lies: a block that cannot be applied (or a block log that cannot
/// be synced) is retried with backoff, and meanwhile the chain's [`crate::ApplierHealth`] holds the stall
/// (the API answers `/health` with 503 and refuses reads of the head), the gauge `stalled` is 1,
/// the counter `failures` counts the attempts, and each one is logged as an error. A block
/// marshal delivers is acknowledged only once the block log holding it is synced, so after a
/// power loss the log is never behind marshal's processed height; should it be behind anyway (a
/// disk that lied about a sync, or a log from an older version), the missing blocks are taken from
/// marshal's archive of finalized blocks.
struct Applier<E, A> {
    context: E,
    chain: Arc<Chain>,
    archive: A,
    stalled: Gauge,
    failures: Counter,
    /// Acknowledgements of applied blocks not yet covered by a sync.
    acks: Vec<Exact>,
    /// When to sync for `acks` (at most [`ACK_DELAY`] after the oldest; the backoff after a
    /// failed sync).
    flush_at: Option<SystemTime>,
    syncing: Option<Syncing>,
    /// The wait before the next attempt after a failure.
    retry: Duration,
    /// The last sync failed (a successful apply does not end that stall).
    sync_failed: bool,
    /// The height marshal was last asked to prune below (it follows the block log's first).
    pruned: u64,
}

/// What the applier reads from marshal besides its deliveries (a trait so that tests can stand
/// in for marshal).
pub(crate) trait FinalizedArchive {
    /// Marshal's processed height: it delivers the blocks above it.
    async fn processed(&self) -> Option<u64>;
    /// The finalized block at `height` from marshal's archive.
    async fn block(&self, height: u64) -> Option<archipel_ledger::Block>;
    /// The finality certificate of the block at `height` (empty: it has none of its own).
    async fn certificate(&self, height: u64) -> Vec<u8>;
    /// Drops the archive's blocks below `height` (the block log's retention; marshal ignores a
    /// height above what it processed).
    fn prune(&self, height: u64);
}

impl FinalizedArchive for Mailbox<Scheme, Standard<LedgerBlock>> {
    async fn processed(&self) -> Option<u64> {
        self.get_processed().await.map(|p| p.height().get())
    }
    fn prune(&self, height: u64) {
        Mailbox::prune(self, Height::new(height));
    }
    async fn block(&self, height: u64) -> Option<archipel_ledger::Block> {
        self.get_block(Height::new(height)).await.map(|b| b.inner().block().clone())
    }
    async fn certificate(&self, height: u64) -> Vec<u8> {
        self.get_finalization(Height::new(height)).await.map(|f| f.encode().to_vec()).unwrap_or_default()
    }
}

async fn apply_finalized<E: Clock + Metrics, A: FinalizedArchive>(
    context: E,
    chain: Arc<Chain>,
    archive: A,
    updates: mpsc::UnboundedReceiver<ToApply>,
) {
    let stalled =
        context.gauge("stalled", "1 while a finalized block cannot be applied or the block log cannot be synced");
    let failures = context.counter("failures", "failed attempts to apply a finalized block or to sync the block log");
    let applier = Applier {
        context,
        chain,
        archive,
        stalled,
        failures,
        acks: Vec::new(),
        flush_at: None,
        syncing: None,
        retry: RETRY_FIRST,
        sync_failed: false,
        pruned: 1,
    };
    applier.run(updates).await;
}

impl<E: Clock, A: FinalizedArchive> Applier<E, A> {
    async fn run(mut self, mut updates: mpsc::UnboundedReceiver<ToApply>) {
        // Marshal delivers from its processed height on: fill the block log up to it first.
        if let Some(to) = self.archive.processed().await {
            while let Err(failure) = self.fill(to).await {
                self.failed(failure).await;
            }
            self.succeeded();
        }
        loop {
            match self.next(&mut updates).await {
                Event::Update(None) => return,
                Event::Update(Some(update)) => {
                    while let Err(failure) = self.apply(&update).await {
                        self.failed(failure).await;
                    }
                    self.succeeded();
                    if let ToApply::Block(Update::Block(_, ack)) = update {
                        self.acks.push(ack);
                        self.flush_at.get_or_insert_with(|| self.context.current() + ACK_DELAY);
                        if self.acks.len() >= ACK_BATCH {
                            self.start_sync();
                        }
                    }
                }
                Event::Flush => self.start_sync(),
                Event::Synced(result) => {
                    let Some(Syncing { acks, .. }) = self.syncing.take() else { continue };
                    match result {
                        Ok(_) => {
                            acks.into_iter().for_each(Exact::acknowledge);
                            let first = self.chain.first_block();
                            if first > self.pruned {
                                self.archive.prune(first);
                                self.pruned = first;
                            }
                            self.sync_failed = false;
                            self.succeeded();
                            if self.acks.len() >= ACK_BATCH {
                                self.start_sync();
                            }
                        }
                        Err(why) => {
                            // Keep the acknowledgements (older first) for the next attempt, after
                            // the backoff.
                            let mut all = acks;
                            all.append(&mut self.acks);
                            self.acks = all;
                            self.sync_failed = true;
                            self.flush_at = Some(self.context.current() + self.retry);
                            let height = self.chain.head().height;
                            self.record_failure((height, why));
                        }
                    }
                }
            }
        }
    }

    /// Waits for the next update, the time to sync, or the answer of a running sync.
    async fn next(&mut self, updates: &mut mpsc::UnboundedReceiver<ToApply>) -> Event {
        let flush_at = if self.syncing.is_none() && !self.acks.is_empty() { self.flush_at } else { None };
        let context = &self.context;
        let flush = async move {
            match flush_at {
                Some(at) => context.sleep_until(at).await,
                None => futures::future::pending().await,
            }
        };
        let synced = async {
            match self.syncing.as_mut() {
                Some(s) => (&mut s.answer).await.unwrap_or_else(|_| Err("the block log's sync was dropped".into())),
                None => futures::future::pending().await,
            }
        };
        commonware_macros::select! {
            update = updates.recv() => Event::Update(update),
            _ = flush => Event::Flush,
            answer = synced => Event::Synced(answer),
        }
    }

    /// Starts syncing the block log for the acknowledgements waiting (one sync at a time).
    fn start_sync(&mut self) {
        if self.syncing.is_some() || self.acks.is_empty() {
            return;
        }
        let acks = std::mem::take(&mut self.acks);
        self.flush_at = None;
        self.syncing = Some(Syncing { answer: self.chain.sync_blocks(), acks });
    }

    /// Applies one update; a failure leaves it (and its acknowledgement) for the next attempt.
    async fn apply(&self, update: &ToApply) -> Result<(), Failure> {
        let applied = match update {
            ToApply::Finalization(f) => {
                let applied = self.chain.finalize_known(&hash_of(&f.proposal.payload), f.encode().to_vec());
                // `advanced`: this finalization moved the head (false: not executed here yet, or
                // final already — a catch-up hands the same finalization over twice).
                tracing::debug!(
                    view = f.proposal.round.view().get(),
                    advanced = matches!(applied, Ok(Some(_))),
                    "finalization"
                );
                applied.map_err(|e| (self.chain.head().height + 1, e))?
            }
            ToApply::Block(Update::Block(block, _)) => {
                let height = block.height().get();
                if height <= self.chain.head().height {
                    return Ok(());
                }
                self.fill(height - 1).await?;
                let applied = self.finalize(block.inner().block().clone(), height).await?;
                tracing::debug!(height, "finalized block from marshal");
                applied
            }
            ToApply::Block(_) => None,
        };
        if let Some(f) = applied {
            for node in f.went_down {
                tracing::info!(height = f.block.header.height, node = %node.short(), "validators stopped hearing the node: lease down");
            }
            for node in f.came_up {
                tracing::info!(height = f.block.header.height, node = %node.short(), "node heard again: lease up");
            }
        }
        Ok(())
    }

    /// Records the finalized `block` at `height` with its certificate from marshal's archive (a
    /// block finalized as the ancestor of a later finalized block has none of its own: the next
    /// certified block proves it through the parent-hash links).
    async fn finalize(&self, block: archipel_ledger::Block, height: u64) -> Result<Option<crate::Finalized>, Failure> {
        let certificate = self.archive.certificate(height).await;
        self.chain.finalize(block, certificate).map_err(|e| (height, e))
    }

    /// Applies the finalized blocks after the head up to `to` from marshal's archive: the block
    /// log lost blocks marshal already counts as delivered.
    async fn fill(&self, to: u64) -> Result<(), Failure> {
        let from = self.chain.head().height + 1;
        if from > to {
            return Ok(());
        }
        tracing::warn!(from, to, "the block log is behind marshal: taking the missing blocks from its archive");
        for height in from..=to {
            let Some(block) = self.archive.block(height).await else {
                return Err((
                    height,
                    format!("finalized block {height} is in neither the block log nor marshal's archive"),
                ));
            };
            self.finalize(block, height).await?;
        }
        Ok(())
    }

    /// Records a failed attempt and waits before the next one.
    async fn failed(&mut self, failure: Failure) {
        self.record_failure(failure);
        self.context.sleep(self.retry).await;
    }

    fn record_failure(&mut self, (height, why): Failure) {
        let now_ms = self.context.current().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let attempts = self.chain.applier().failed(height, why.clone(), now_ms);
        let _ = self.stalled.try_set(1);
        self.failures.inc();
        tracing::error!(
            height,
            attempts,
            retry_in_ms = self.retry.as_millis() as u64,
            error = %why,
            "the ledger is stalled: this node's head is stale until the retry succeeds"
        );
        self.retry = (self.retry * 2).min(RETRY_MAX);
    }

    /// Ends a stall after an attempt succeeded (unless the block log still cannot be synced).
    fn succeeded(&mut self) {
        if self.sync_failed {
            return;
        }
        self.retry = RETRY_FIRST;
        if let Some(stall) = self.chain.applier().recovered() {
            let _ = self.stalled.try_set(0);
            tracing::info!(height = stall.height, attempts = stall.attempts, "the ledger applier recovered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BlockStore, MemoryStore, Record};
    use archipel_ledger::{Block, GenesisState, State};
    use commonware_runtime::{Runner as _, Supervisor as _, deterministic};
    use futures::FutureExt as _;
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A sync requested at a height, answered when the test says.
    type PendingSync = (u64, futures::channel::oneshot::Sender<Result<u64, String>>);

    /// A block log whose appends fail while `fail_appends` is set and whose syncs answer only
    /// when the test releases them.
    #[derive(Clone, Default)]
    struct TestStore {
        inner: MemoryStore,
        fail_appends: Arc<AtomicBool>,
        syncs: Arc<Mutex<Vec<PendingSync>>>,
    }

    impl TestStore {
        /// Answers every sync requested so far with `ok` (or a failure); returns how many.
        fn release_syncs(&self, ok: bool) -> usize {
            let pending = std::mem::take(&mut *self.syncs.lock().unwrap());
            let n = pending.len();
            for (height, answer) in pending {
                let _ = answer.send(if ok { Ok(height) } else { Err("injected sync failure".into()) });
            }
            n
        }
    }

    impl BlockStore for TestStore {
        fn height(&self) -> u64 {
            self.inner.height()
        }
        fn append(&mut self, record: &Record) -> Result<(), String> {
            if self.fail_appends.load(Ordering::SeqCst) {
                return Err("injected: no space left on device".into());
            }
            self.inner.append(record)
        }
        fn get(&self, height: u64) -> Result<Option<Record>, String> {
            self.inner.get(height)
        }
        fn raw_range(&self, from: u64, to: u64) -> Result<Vec<u8>, String> {
            self.inner.raw_range(from, to)
        }
        fn sync(&mut self) -> Synced {
            let (tx, rx) = futures::channel::oneshot::channel();
            self.syncs.lock().unwrap().push((self.inner.height(), tx));
            rx
        }
        fn prune_finish(&mut self, pruned: crate::store::Pruned) -> Result<u64, String> {
            self.inner.prune_finish(pruned)
        }
    }

    /// Marshal's archive as the tests set it up.
    #[derive(Clone, Default)]
    struct TestArchive {
        processed: Option<u64>,
        blocks: BTreeMap<u64, Block>,
    }

    impl FinalizedArchive for TestArchive {
        async fn processed(&self) -> Option<u64> {
            self.processed
        }
        async fn block(&self, height: u64) -> Option<Block> {
            self.blocks.get(&height).cloned()
        }
        async fn certificate(&self, _: u64) -> Vec<u8> {
            Vec::new()
        }
        fn prune(&self, _: u64) {}
    }

    fn genesis() -> State {
        State::genesis(GenesisState::default())
    }

    /// A finalized chain of `n` empty blocks, built by another node.
    fn blocks(n: u64) -> Vec<Block> {
        let producer = Chain::open(genesis(), Box::new(MemoryStore::default())).unwrap();
        (1..=n)
            .map(|i| {
                let block = producer.build(&producer.head().hash(), i * 1_000, |_| Vec::new()).unwrap();
                producer.finalize_known(&block.hash(), vec![1]).unwrap().unwrap();
                block
            })
            .collect()
    }

    fn delivery(block: &Block) -> (ToApply, commonware_utils::acknowledgement::ExactWaiter) {
        let (ack, waiter) = Exact::handle();
        let block = LedgerBlock::new(block.clone());
        let digest = block.digest();
        (ToApply::Block(Update::Block(Digested::precomputed(block, digest), ack)), waiter)
    }

    fn metric(context: &deterministic::Context, name: &str) -> Option<f64> {
        context
            .encode()
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn a_block_that_does_not_apply_stalls_the_applier_loudly_until_a_retry_applies_it() {
        deterministic::Runner::default().start(|context| async move {
            let store = TestStore::default();
            let chain = Arc::new(Chain::open(genesis(), Box::new(store.clone())).unwrap());
            let (tx, rx) = mpsc::unbounded_channel();
            let _applier = context.child("applier").spawn({
                let chain = chain.clone();
                move |context| apply_finalized(context, chain, TestArchive::default(), rx)
            });
            let chain_blocks = blocks(2);
            store.fail_appends.store(true, Ordering::SeqCst);
            let (first, mut acked) = delivery(&chain_blocks[0]);
            tx.send(first).unwrap();
            context.sleep(Duration::from_secs(1)).await;

            let stall = chain.applier().stall().expect("a block that cannot be stored stalls the applier");
            assert_eq!(stall.height, 1);
            assert!(stall.reason.contains("no space left"), "{}", stall.reason);
            assert!(stall.attempts >= 2, "retried: {stall:?}");
            assert_eq!(chain.head().height, 0, "nothing applied");
            assert_eq!(metric(&context, "applier_stalled"), Some(1.0));
            assert!(metric(&context, "applier_failures_total").unwrap_or(0.0) >= 2.0);
            assert!((&mut acked).now_or_never().is_none(), "marshal is not told a block was processed");

            // The disk recovers: the next attempt applies it and the stall ends.
            store.fail_appends.store(false, Ordering::SeqCst);
            context.sleep(RETRY_MAX).await;
            assert_eq!(chain.applier().stall(), None);
            assert_eq!(chain.head().height, 1);
            assert_eq!(metric(&context, "applier_stalled"), Some(0.0));

            // Marshal hears of it only once the block log holding it is durable.
            context.sleep(ACK_DELAY * 2).await;
            assert!((&mut acked).now_or_never().is_none(), "acknowledged before the block log was synced");
            assert_eq!(store.release_syncs(true), 1, "one sync for the batch");
            context.sleep(Duration::from_millis(10)).await;
            assert!(matches!((&mut acked).now_or_never(), Some(Ok(()))), "acknowledged once synced");

            // A sync that fails is a stall too, retried; the acknowledgement waits for a good one.
            let (second, mut acked) = delivery(&chain_blocks[1]);
            tx.send(second).unwrap();
            context.sleep(ACK_DELAY * 2).await;
            assert_eq!(store.release_syncs(false), 1);
            context.sleep(Duration::from_millis(10)).await;
            let stall = chain.applier().stall().expect("a failed sync stalls");
            assert!(stall.reason.contains("injected sync failure"), "{}", stall.reason);
            assert!((&mut acked).now_or_never().is_none());
            context.sleep(Duration::from_secs(1)).await;
            assert_eq!(store.release_syncs(true), 1, "the sync is retried");
            context.sleep(Duration::from_millis(10)).await;
            assert!(matches!((&mut acked).now_or_never(), Some(Ok(()))));
            assert_eq!(chain.applier().stall(), None);
        });
    }

    #[test]
    fn a_block_log_behind_marshal_is_filled_from_marshal_s_archive() {
        deterministic::Runner::default().start(|context| async move {
            let store = TestStore::default();
            let chain = Arc::new(Chain::open(genesis(), Box::new(store.clone())).unwrap());
            let all = blocks(4);
            // Marshal processed block 2 (and archived 3) but the block log kept nothing.
            let archive = TestArchive {
                processed: Some(2),
                blocks: all.iter().take(3).map(|b| (b.header.height, b.clone())).collect(),
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let _applier = context.child("applier").spawn({
                let chain = chain.clone();
                move |context| apply_finalized(context, chain, archive, rx)
            });
            context.sleep(Duration::from_millis(100)).await;
            assert_eq!(chain.head().height, 2, "filled up to marshal's processed height at start");
            // Marshal delivers 4 next (3 was lost too): 3 comes from the archive.
            let (fourth, _acked) = delivery(&all[3]);
            tx.send(fourth).unwrap();
            context.sleep(Duration::from_millis(100)).await;
            assert_eq!(chain.head(), all[3].header);
            assert_eq!(chain.applier().stall(), None);
        });
    }
}
