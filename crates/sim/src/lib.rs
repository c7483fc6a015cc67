//! Deterministic simulation of archipel's network layer.
//!
//! N nodes run the real membership actor ([`archipel_node::gossip`]) on commonware's
//! deterministic executor, connected by `p2p::simulated` links with seeded latency, jitter and
//! loss, plus a seeded fault schedule (a partition that heals, isolated nodes, an unregistered
//! intruder, a Byzantine member relaying forged descriptors). Virtual time makes a 60 s scenario
//! run in milliseconds, and the same seed always produces the same trace: every effect of every
//! node with its virtual time, hashed together with the runtime's own audit digest.
//!
//! [`ledger`] does the same for the replicated ledger: validators and followers running the real
//! consensus engine, with partitions, lossy links and a Byzantine validator. [`crash`] cuts the
//! power of the whole ledger network at a seeded moment (unsynced writes are lost) and restarts it.
//! [`jobs`] adds a compute tenant whose jobs' deadlines the block times must follow.
//!
//! Invariant tests live one per file under `tests/` and run over a seed range
//! (`ARCHIPEL_SIM_SEEDS=0..200`, or `ARCHIPEL_SIM_SEED=17` for one); a failing seed prints the
//! command that replays it.

pub mod crash;
pub mod disk;
pub mod jobs;
pub mod journal;
pub mod ledger;
pub mod votes;

use archipel_crypto::{Identity, SignedDescriptor};
use archipel_node::gossip::{self, GOSSIP_CHANNEL, GossipObserver, MAX_GOSSIP_MESSAGE, SharedPeerTable, lock_table};
use archipel_node::membership::{Effect, GossipMessage, MembershipTiming, PeerStatus, PeerTable};
use archipel_types::{NodeDescriptor, NodeId};
use commonware_cryptography::{Signer, ed25519};
use commonware_p2p::simulated::{self, Link, Network};
use commonware_p2p::{Recipients, Sender as _};
use commonware_runtime::{Clock, IoBuf, Quota, Runner, Spawner, Supervisor, deterministic};
use commonware_utils::{NZU32, NZUsize, Probability};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A scenario to simulate. Build one with [`Scenario::from_seed`] to get seeded faults.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Seed of the executor and of the fault schedule.
    pub seed: u64,
    /// Number of honest nodes.
    pub nodes: usize,
    /// Mean one-way latency of every link.
    pub latency: Duration,
    /// Standard deviation of the latency.
    pub jitter: Duration,
    /// Percentage of messages delivered (0–100).
    pub delivery_percent: u64,
    /// A partition of the honest nodes into `[0, split)` and `[split, nodes)` between the two
    /// times, if any.
    pub partition: Option<(usize, Duration, Duration)>,
    /// Honest nodes cut off from everyone for a time window: (node index, from, until).
    pub isolations: Vec<(usize, Duration, Duration)>,
    /// Whether an unregistered key joins the simulated network and talks to everyone.
    pub intruder: bool,
    /// Whether one extra registered member is Byzantine: it relays the intruder's descriptor and
    /// forged descriptors of honest nodes.
    pub byzantine_member: bool,
    /// Total virtual time to run.
    pub duration: Duration,
    /// Membership timing.
    pub timing: MembershipTiming,
}

/// A deterministic stream of numbers from a seed (SplitMix64), used for the fault schedule.
#[derive(Debug)]
struct SeedStream(u64);

impl SeedStream {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

impl Scenario {
    /// A scenario whose links and faults are drawn from `seed`: 4–9 nodes, 1–80 ms latency,
    /// 80–100 % delivery, usually a partition healed by the 25th second and an isolated node, an
    /// intruder and a Byzantine member; 60 s of virtual time.
    pub fn from_seed(seed: u64) -> Self {
        let mut r = SeedStream(seed);
        let nodes = 4 + r.below(6) as usize;
        let latency = Duration::from_millis(1 + r.below(80));
        let jitter = Duration::from_millis(r.below(latency.as_millis() as u64 / 2 + 1));
        let delivery_percent = 80 + r.below(21);
        let partition = (r.below(4) != 0).then(|| {
            let split = 1 + r.below(nodes as u64 - 1) as usize;
            let from = Duration::from_millis(2_000 + r.below(5_000));
            let until = from + Duration::from_millis(3_000 + r.below(15_000));
            (split, from, until)
        });
        let isolations = (0..r.below(3))
            .map(|_| {
                let node = r.below(nodes as u64) as usize;
                let from = Duration::from_millis(1_000 + r.below(20_000));
                (node, from, from + Duration::from_millis(1_000 + r.below(8_000)))
            })
            .collect();
        Self {
            seed,
            nodes,
            latency,
            jitter,
            delivery_percent,
            partition,
            isolations,
            intruder: true,
            byzantine_member: r.below(2) == 0,
            duration: Duration::from_secs(60),
            timing: MembershipTiming::default(),
        }
    }

    /// The last moment a fault is active; after it the network is whole.
    pub fn healed_at(&self) -> Duration {
        let p = self.partition.map_or(Duration::ZERO, |(_, _, until)| until);
        self.isolations.iter().map(|(_, _, until)| *until).fold(p, Duration::max)
    }
}

/// One observed effect, with the node that produced it and the virtual time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// Virtual time in ms.
    pub at_ms: u64,
    /// Index of the honest node.
    pub node: usize,
    /// Short description of the effect.
    pub what: String,
    /// Peer the effect concerns, if any.
    pub peer: Option<NodeId>,
}

/// What a simulation run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The scenario run.
    pub scenario: Scenario,
    /// Every effect of every honest node.
    pub trace: Vec<TraceEvent>,
    /// BLAKE3 of the trace and the executor's audit digest.
    pub trace_hash: String,
    /// The honest nodes' ids.
    pub honest: Vec<NodeId>,
    /// The intruder's id.
    pub intruder: NodeId,
    /// The Byzantine member's id, if any.
    pub byzantine: Option<NodeId>,
    /// Each honest node's table at the end: digest, member ids, and ids it sees up.
    pub final_tables: Vec<FinalTable>,
}

/// An honest node's table at the end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalTable {
    /// Digest of the table.
    pub digest: [u8; 32],
    /// Nodes in the table.
    pub members: BTreeSet<NodeId>,
    /// Nodes seen up (including self).
    pub up: BTreeSet<NodeId>,
    /// When each peer was last heard from (virtual Unix ms).
    pub last_seen_ms: std::collections::BTreeMap<NodeId, u64>,
}

#[derive(Clone)]
struct Recorder {
    node: usize,
    events: Arc<Mutex<Vec<TraceEvent>>>,
}

impl GossipObserver for Recorder {
    fn on_effect(&mut self, now_ms: u64, effect: &Effect) {
        let (what, peer) = match effect {
            Effect::Broadcast(GossipMessage::Hello { digest }) => (format!("hello {}", &digest[..8]), None),
            Effect::Broadcast(GossipMessage::Descriptors(d)) => (format!("broadcast table {}", d.len()), None),
            Effect::Broadcast(GossipMessage::Admissions(a)) => (format!("broadcast admissions {}", a.len()), None),
            Effect::Admitted(a) => ("admitted".to_string(), Some(a.descriptor.descriptor.node_id)),
            Effect::SendTo(to, m) => (format!("send {}", matches!(m, GossipMessage::Hello { .. })), Some(*to)),
            Effect::StatusChanged { node, status } => (format!("status {status:?}"), Some(*node)),
            Effect::Rejected { from, reason } => (format!("rejected: {reason}"), Some(*from)),
        };
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.push(TraceEvent { at_ms: now_ms, node: self.node, what, peer });
    }
}

fn descriptor(identity: &Identity, index: usize, version: u64) -> SignedDescriptor {
    let ip = format!("127.1.{}.{}", index / 250, index % 250 + 2);
    let d = NodeDescriptor {
        node_id: identity.node_id(),
        name: format!("sim{index}"),
        operator: format!("op{}", index % 3),
        region: ["eu-de", "eu-fr", "us-east"][index % 3].parse().unwrap_or_else(|_| unreachable!()),
        country: ["DE", "FR", "US"][index % 3].parse().unwrap_or_else(|_| unreachable!()),
        operator_jurisdiction: ["DE", "FR", "US"][index % 3].parse().unwrap_or_else(|_| unreachable!()),
        capacity: archipel_types::ByteSize(1 << 30),
        roles: Default::default(),
        p2p_address: format!("{ip}:23100").parse().unwrap_or_else(|_| unreachable!()),
        p2p_egress_ip: None,
        api_address: format!("{ip}:23101").parse().unwrap_or_else(|_| unreachable!()),
        version,
    };
    SignedDescriptor::sign(identity, d).unwrap_or_else(|_| unreachable!())
}

/// Runs `scenario` to the end and returns what happened.
pub fn run(scenario: Scenario) -> Outcome {
    let cfg = deterministic::Config::new()
        .with_seed(scenario.seed)
        .with_timeout(Some(scenario.duration + Duration::from_secs(600)));
    let runner = deterministic::Runner::new(cfg);
    let sc = scenario.clone();
    runner.start(|context| async move {
        let base = scenario.seed.wrapping_mul(1_000);
        let honest_ids: Vec<Identity> = (0..sc.nodes).map(|i| Identity::from_seed(base + i as u64)).collect();
        let intruder = Identity::from_seed(base + 999);
        let byzantine = sc.byzantine_member.then(|| Identity::from_seed(base + 998));

        let mut members: Vec<&Identity> = honest_ids.iter().collect();
        members.extend(byzantine.iter());
        let genesis: Vec<SignedDescriptor> = members.iter().enumerate().map(|(i, id)| descriptor(id, i, 1)).collect();
        let allowed: BTreeSet<NodeId> = members.iter().map(|id| id.node_id()).collect();

        let p2p_cfg = simulated::Config {
            max_size: MAX_GOSSIP_MESSAGE as u32,
            max_peers_per_set: NZUsize!(1_024),
            disconnect_on_block: true,
            tracked_peer_sets: NZUsize!(1),
        };
        let registered: Vec<ed25519::PublicKey> = members.iter().map(|id| id.private_key().public_key()).collect();
        let (network, oracle) = Network::new_with_peers(context.child("network"), p2p_cfg, registered.clone()).await;
        network.start();

        let link = Link {
            latency: sc.latency,
            jitter: sc.jitter,
            success_rate: Probability::new(sc.delivery_percent, 100).unwrap_or_else(|| unreachable!()),
        };
        let mut everyone = registered.clone();
        everyone.push(intruder.private_key().public_key());
        for a in &everyone {
            for b in &everyone {
                if a != b {
                    let _ = oracle.add_link(a.clone(), b.clone(), link.clone()).await;
                }
            }
        }

        let quota = Quota::per_second(NZU32!(10_000));
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut tables: Vec<SharedPeerTable> = Vec::new();
        for (i, id) in honest_ids.iter().enumerate() {
            let (sender, receiver) = oracle
                .control(id.private_key().public_key())
                .register(GOSSIP_CHANNEL, quota)
                .await
                .unwrap_or_else(|e| panic!("register node {i}: {e}"));
            let table =
                Arc::new(Mutex::new(PeerTable::new(genesis[i].clone(), genesis.clone(), allowed.clone(), sc.timing)));
            tables.push(table.clone());
            let observer = Recorder { node: i, events: events.clone() };
            context
                .child("node")
                .with_attribute("index", i)
                .spawn(move |ctx| gossip::run(ctx, table, sender, receiver, observer));
        }

        // The intruder is not in any tracked peer set: it sends hellos and its descriptor to all.
        let intruder_desc = descriptor(&intruder, sc.nodes + 1, 1);
        {
            let (mut sender, _receiver) = oracle
                .control(intruder.private_key().public_key())
                .register(GOSSIP_CHANNEL, quota)
                .await
                .unwrap_or_else(|e| panic!("register intruder: {e}"));
            let desc = intruder_desc.clone();
            if sc.intruder {
                context.child("intruder").spawn(move |ctx| async move {
                    loop {
                        let hello = GossipMessage::Hello { digest: "00".repeat(32) };
                        let _ = sender.send(Recipients::All, IoBuf::from(hello.encode()), false);
                        let table = GossipMessage::Descriptors(vec![desc.clone()]);
                        let _ = sender.send(Recipients::All, IoBuf::from(table.encode()), false);
                        ctx.sleep(Duration::from_millis(300)).await;
                    }
                });
            }
        }

        // The Byzantine member says hello like everyone, but relays the intruder's descriptor and
        // forged descriptors (honest nodes' with a changed jurisdiction and a higher version).
        if let Some(byz) = &byzantine {
            let (mut sender, _receiver) = oracle
                .control(byz.private_key().public_key())
                .register(GOSSIP_CHANNEL, quota)
                .await
                .unwrap_or_else(|e| panic!("register byzantine: {e}"));
            let mut forged: Vec<SignedDescriptor> = genesis[..sc.nodes]
                .iter()
                .map(|d| {
                    let mut f = d.clone();
                    f.descriptor.version = 1_000;
                    f.descriptor.operator_jurisdiction = "KP".parse().unwrap_or_else(|_| unreachable!());
                    f
                })
                .collect();
            forged.push(intruder_desc.clone());
            context.child("byzantine").spawn(move |ctx| async move {
                loop {
                    let hello = GossipMessage::Hello { digest: "11".repeat(32) };
                    let _ = sender.send(Recipients::All, IoBuf::from(hello.encode()), false);
                    let _ = sender.send(
                        Recipients::All,
                        IoBuf::from(GossipMessage::Descriptors(forged.clone()).encode()),
                        false,
                    );
                    ctx.sleep(Duration::from_millis(700)).await;
                }
            });
        }

        // Fault schedule: cut and restore links at the scheduled virtual times.
        let pk = |i: usize| registered[i].clone();
        let mut changes: Vec<(Duration, bool, usize, usize)> = Vec::new();
        if let Some((split, from, until)) = sc.partition {
            for a in 0..split {
                for b in split..sc.nodes {
                    changes.push((from, false, a, b));
                    changes.push((until, true, a, b));
                }
            }
        }
        for (node, from, until) in &sc.isolations {
            for other in 0..sc.nodes {
                if other != *node {
                    changes.push((*from, false, *node, other));
                    changes.push((*until, true, *node, other));
                }
            }
        }
        // Stable order: by time, then removals before additions, then indices.
        changes.sort_by_key(|(at, up, a, b)| (*at, *up, *a, *b));
        let mut cut = std::collections::BTreeMap::<(usize, usize), u32>::new();
        for (at, up, a, b) in changes {
            let now = context.current().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            if at > now {
                context.sleep(at - now).await;
            }
            let key = (a.min(b), a.max(b));
            let count = cut.entry(key).or_default();
            if up {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    let _ = oracle.add_link(pk(a), pk(b), link.clone()).await;
                    let _ = oracle.add_link(pk(b), pk(a), link.clone()).await;
                }
            } else {
                *count += 1;
                if *count == 1 {
                    let _ = oracle.remove_link(pk(a), pk(b)).await;
                    let _ = oracle.remove_link(pk(b), pk(a)).await;
                }
            }
        }

        let now = context.current().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        if sc.duration > now {
            context.sleep(sc.duration - now).await;
        }

        let final_tables: Vec<FinalTable> = tables
            .iter()
            .map(|t| {
                let t = lock_table(t);
                let rows = t.rows();
                FinalTable {
                    digest: t.digest(),
                    members: rows.iter().map(|r| r.descriptor.descriptor.node_id).collect(),
                    up: rows
                        .iter()
                        .filter(|r| r.status == PeerStatus::Up)
                        .map(|r| r.descriptor.descriptor.node_id)
                        .collect(),
                    last_seen_ms: rows
                        .iter()
                        .filter_map(|r| r.last_seen_ms.map(|t| (r.descriptor.descriptor.node_id, t)))
                        .collect(),
                }
            })
            .collect();
        let trace = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut h = blake3::Hasher::new();
        for e in &trace {
            h.update(format!("{}|{}|{}|{:?}\n", e.at_ms, e.node, e.what, e.peer).as_bytes());
        }
        for t in &final_tables {
            h.update(&t.digest);
        }
        h.update(context.auditor().state().as_bytes());
        Outcome {
            scenario: sc,
            trace,
            trace_hash: h.finalize().to_hex().to_string(),
            honest: honest_ids.iter().map(Identity::node_id).collect(),
            intruder: intruder.node_id(),
            byzantine: byzantine.as_ref().map(Identity::node_id),
            final_tables,
        }
    })
}

/// The seeds to check: `ARCHIPEL_SIM_SEED=N` for one, `ARCHIPEL_SIM_SEEDS=A..B` for a range,
/// otherwise `default`.
pub fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    if let Ok(one) = std::env::var("ARCHIPEL_SIM_SEED")
        && let Ok(s) = one.trim().parse()
    {
        return vec![s];
    }
    if let Ok(range) = std::env::var("ARCHIPEL_SIM_SEEDS")
        && let Some((a, b)) = range.split_once("..")
        && let (Ok(a), Ok(b)) = (a.trim().parse(), b.trim().parse())
    {
        return (a..b).collect();
    }
    default.collect()
}

/// Checks `invariant` for every seed; on the first violation panics with the seed, the reason
/// and the one-line command that replays it.
pub fn check_seeds(test: &str, default: std::ops::Range<u64>, invariant: impl Fn(&Outcome) -> Result<(), String>) {
    for seed in seeds(default) {
        let outcome = run(Scenario::from_seed(seed));
        if let Err(why) = invariant(&outcome) {
            panic!(
                "invariant violated for seed {seed}: {why}\nscenario: {:?}\nreplay: ARCHIPEL_SIM_SEED={seed} cargo test -p archipel-sim --test {test}",
                outcome.scenario
            );
        }
    }
}
