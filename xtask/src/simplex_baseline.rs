//! The bare consensus engine the ledger is built on, measured on this box: commonware simplex
//! (the workspace's pinned version) with no application work, 4 validators as 4 processes on
//! loopback, wired like archipel's validators (authenticated `lookup` p2p with the same channel
//! quotas, the tokio runtime with 2 worker threads, simplex's journal on disk, the same timeouts).
//!
//! It exists so that the ledger's latency has a floor measured in the same run, from the
//! repository alone: every proposal is a digest made on the spot, every verification answers yes
//! at once, nothing is broadcast besides simplex's own messages. Each validator records, for the
//! views it led, the time from `propose` to the finalization it observes (as archipel's bench
//! records submit->final at the client, this is the least any ledger transaction can take).
//!
//! `cargo xtask bench ledger` runs [`run`], which starts `xtask simplex-validator ...` four times
//! ([`validator_main`]) and reads back what each recorded.

use crate::figures::{Latencies, SortedMs};
use anyhow::{Context as _, Result, bail};
use commonware_consensus::simplex::config::{Floor, ForwardPolicy, SkipBudget, SkipPolicy};
use commonware_consensus::simplex::elector::RoundRobin;
use commonware_consensus::simplex::scheme::ed25519::Scheme;
use commonware_consensus::simplex::types::{Activity, Context};
use commonware_consensus::simplex::{self, Plan};
use commonware_consensus::types::{Epoch, ViewDelta};
use commonware_consensus::{Automaton, CertifiableAutomaton, Relay, Reporter};
use commonware_cryptography::ed25519::{PrivateKey, PublicKey};
use commonware_cryptography::sha256::Digest;
use commonware_cryptography::{ChaCha20Poly1305, Hasher as _, Sha256, Signer as _};
use commonware_p2p::authenticated::lookup::{self, Network};
use commonware_p2p::{Address, AddressableManager as _};
use commonware_parallel::Sequential;
use commonware_runtime::buffer::paged::CacheRef;
use commonware_runtime::{Clock as _, Quota, Runner as _, Supervisor as _, tokio as cw_tokio};
use commonware_stream::cups::{self, Cups};
use commonware_stream::sake::{self, Sake};
use commonware_utils::channel::{fallible::OneshotExt as _, oneshot};
use commonware_utils::ordered::{Map, Set};
use commonware_utils::{NZDuration, NZU16, NZU32, NZUsize};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Validators (as in the ledger bench's devnet).
const VALIDATORS: usize = 4;
/// Loopback addresses of the validators: 127.0.62.2-5 (the ledger bench uses 127.0.60.x, etcd
/// 127.0.61.x).
const BASE_IP: [u8; 4] = [127, 0, 62, 2];
/// p2p port of every validator.
const PORT: u16 = 26_401;
/// Same as archipel's validators (`ConsensusConfig::new`).
const LEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// Views proposed in the first seconds (while connections form) are not measured.
const WARM_UP: Duration = Duration::from_secs(3);
/// Name of the file each validator writes its samples to, in its own directory.
const SAMPLES_FILE: &str = "propose_to_finalize_ms.txt";
/// Each validator's own proposals: `proposed_us finalized_us` (Unix microseconds) per line.
const TIMELINE_FILE: &str = "timeline_us.txt";
/// Spacing of the virtual arrivals of [`arrival_to_final`].
const ARRIVAL_STEP_US: u64 = 100;

fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The best any application could do on this engine for a transaction that arrives at a random
/// moment: it waits for the next proposal (by any leader), then that proposal's finalization.
/// `timeline` holds every validator's (proposed, finalized) instants (Unix µs, one box's
/// clock); arrivals every `step_us` from the first proposal to the last are each timed to the
/// finalization of the first proposal at or after them. Milliseconds, one per arrival.
pub fn arrival_to_final(timeline: &mut [(u64, u64)], step_us: u64) -> Vec<f64> {
    timeline.sort_unstable();
    let (Some(first), Some(last)) = (timeline.first(), timeline.last()) else { return Vec::new() };
    let (start, end) = (first.0, last.0);
    let mut out = Vec::new();
    let mut next = 0;
    let mut t = start;
    while t <= end {
        while timeline[next].0 < t {
            next += 1;
        }
        out.push(timeline[next].1.saturating_sub(t) as f64 / 1e3);
        t += step_us.max(1);
    }
    out
}

/// What the bare engine measured.
#[derive(Clone, Debug)]
pub struct BareFigures {
    /// Propose->finalize at the proposer, over every view led by any validator after the
    /// warm-up.
    pub latency: Latencies,
    /// Views finalized per second (as seen by validator 0).
    pub views_per_s: f64,
    /// A payload arriving at a random moment, to its finalization ([`arrival_to_final`]).
    pub arrival: Latencies,
}

/// Runs 4 validator processes (this executable, `simplex-validator`) for `duration` and
/// collects their samples.
pub fn run(duration: Duration) -> Result<BareFigures> {
    if duration <= WARM_UP {
        bail!("the bare-simplex run must last longer than its {WARM_UP:?} warm-up (got {duration:?})");
    }
    let exe = std::env::current_exe().context("cannot find the xtask executable to start the validators")?;
    let work = std::env::temp_dir().join(format!("archipel-bench-simplex-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let mut children = Vec::new();
    for index in 0..VALIDATORS {
        let dir = work.join(format!("v{index}"));
        let log = std::fs::File::create(work.join(format!("v{index}.log")))?;
        let child = Command::new(&exe)
            .arg("simplex-validator")
            .args(["--index", &index.to_string(), "--millis", &duration.as_millis().to_string(), "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start bare-simplex validator {index}"))?;
        children.push(ChildGuard(child));
    }
    let deadline = Instant::now() + duration + Duration::from_secs(30);
    for (index, child) in children.iter_mut().enumerate() {
        let status = child.wait_until(deadline)?;
        if !status.is_some_and(|s| s.success()) {
            bail!(
                "bare-simplex validator {index} did not finish cleanly ({status:?}); its log is {}",
                work.join(format!("v{index}.log")).display()
            );
        }
    }
    let mut all = Vec::new();
    let mut views_per_s = f64::NAN;
    let mut timeline = Vec::new();
    for index in 0..VALIDATORS {
        let dir = work.join(format!("v{index}"));
        timeline.extend(read_timeline(&dir.join(TIMELINE_FILE))?);
        let (samples, finalized_views) = read_samples(&dir.join(SAMPLES_FILE))?;
        if index == 0 {
            views_per_s = finalized_views as f64 / (duration - WARM_UP).as_secs_f64();
        }
        all.extend(samples);
    }
    if all.is_empty() {
        bail!("the bare-simplex validators finalized no view they proposed; logs in {}", work.display());
    }
    let _ = std::fs::remove_dir_all(&work);
    let arrival = Latencies::of(SortedMs::new(arrival_to_final(&mut timeline, ARRIVAL_STEP_US)));
    Ok(BareFigures { latency: Latencies::of(SortedMs::new(all)), views_per_s, arrival })
}

fn read_timeline(path: &Path) -> Result<Vec<(u64, u64)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .map(|l| {
            let mut it = l.split(' ').map(str::parse::<u64>);
            match (it.next(), it.next()) {
                (Some(Ok(p)), Some(Ok(f))) => Ok((p, f)),
                _ => bail!("{}: {l:?} is not `proposed_us finalized_us`", path.display()),
            }
        })
        .collect()
}

/// Reads a validator's samples: the first line is `finalized_views N`, then one latency (ms)
/// per line.
fn read_samples(path: &Path) -> Result<(Vec<f64>, u64)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    let views = lines
        .next()
        .and_then(|l| l.strip_prefix("finalized_views "))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{} does not start with `finalized_views N`", path.display()))?;
    let samples = lines
        .map(|l| l.parse::<f64>().with_context(|| format!("{}: {l:?} is not a number", path.display())))
        .collect::<Result<_>>()?;
    Ok((samples, views))
}

/// `xtask simplex-validator --index I --millis MS --dir DIR`: one validator, run for MS
/// milliseconds; writes its samples to `DIR/propose_to_finalize_ms.txt`.
pub fn validator_main(args: &[String]) -> Result<()> {
    let value = |name: &str| -> Result<&String> {
        let at = args.iter().position(|a| a == name).with_context(|| format!("simplex-validator needs {name}"))?;
        args.get(at + 1).with_context(|| format!("{name} needs a value"))
    };
    let index: usize = value("--index")?.parse().context("--index needs a number")?;
    if index >= VALIDATORS {
        bail!("--index {index} is not a validator: use 0 to {}", VALIDATORS - 1);
    }
    let millis: u64 = value("--millis")?.parse().context("--millis needs a number")?;
    let dir = PathBuf::from(value("--dir")?);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let runner = cw_tokio::Runner::new(
        cw_tokio::Config::new().with_worker_threads(2).with_storage_directory(dir.join("runtime")),
    );
    let out = dir.join(SAMPLES_FILE);
    runner.start(|context| async move {
        let keys: Vec<PrivateKey> = (0..VALIDATORS as u64).map(PrivateKey::from_seed).collect();
        let me = keys[index].clone();
        let participants = Set::from_iter_dedup(keys.iter().map(|k| k.public_key()));
        let namespace = b"archipel/bench/bare-simplex".to_vec();

        let handshake = Cups::<_, ChaCha20Poly1305>::new(
            Sake {
                signer: me.clone(),
                synchrony_bound: Duration::from_secs(30),
                max_handshake_age: Duration::from_secs(30),
                version: sake::Version::V1,
            },
            cups::Version::V1,
        );
        let mut cfg = lookup::Config::local(
            handshake,
            &namespace,
            address(index),
            NZUsize!(VALIDATORS),
            1 << 20,
            NZUsize!(1_024),
        );
        // As archipel's p2p (`archipel_node::p2p::start`).
        cfg.allow_private_ips = true;
        cfg.dial_frequency = Duration::from_millis(200);
        cfg.peer_connection_cooldown = Duration::from_millis(500);
        cfg.ping_frequency = Duration::from_secs(1);
        let (mut network, mut oracle) = Network::new(context.child("p2p"), cfg);
        let peers: Vec<(PublicKey, Address)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                // On loopback the kernel sends from 127.0.0.1 whatever address a peer listens on.
                let egress = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
                (k.public_key(), Address::Asymmetric { ingress: address(i).into(), egress })
            })
            .collect();
        let peers = Map::try_from(peers).map_err(|e| anyhow::anyhow!("validator keys collide: {e:?}"))?;
        let _ = oracle.track(0, peers);
        let fast = |rate| Quota::per_second(rate).allow_burst(NZU32!(64));
        let votes = network.register(1, fast(NZU32!(2_000)));
        let certificates = network.register(2, fast(NZU32!(2_000)));
        let resolver = network.register(3, fast(NZU32!(500)));
        network.start();

        let scheme = Scheme::signer(&namespace, participants, me)
            .context("this validator's key is not among the participants")?;
        let started = Instant::now();
        let app = BareApp::new(started + WARM_UP);
        let genesis = Sha256::hash(&[b"archipel/bench/bare-simplex/genesis"]);
        let engine = simplex::Engine::new(
            context.child("simplex"),
            simplex::Config {
                scheme,
                elector: RoundRobin::<Sha256>::default(),
                blocker: oracle,
                automaton: app.clone(),
                relay: app.clone(),
                reporter: app.clone(),
                track_historical_votes: false,
                strategy: Sequential,
                partition: "bare-simplex".into(),
                mailbox_size: NZUsize!(1024),
                epoch: Epoch::zero(),
                floor: Floor::Genesis(genesis),
                replay_buffer: NZUsize!(1 << 16),
                write_buffer: NZUsize!(1 << 16),
                page_cache: CacheRef::new(NZU16!(4096), NZUsize!(256)),
                leader_timeout: LEADER_TIMEOUT,
                certification_timeout: LEADER_TIMEOUT * 3 / 2,
                timeout_retry: LEADER_TIMEOUT,
                view_retention: ViewDelta::new(256),
                skip: SkipPolicy::Enabled { timeout: LEADER_TIMEOUT * 3, budget: SkipBudget::Participants },
                fetch_timeout: NZDuration!(Duration::from_secs(1)),
                fetch_retry_delay: Duration::from_millis(100),
                forward: ForwardPolicy::SilentLeader,
            },
        );
        let _engine = engine.start(votes, certificates, resolver);
        context.sleep(Duration::from_millis(millis)).await;
        app.write(&out)
    })
}

/// A validator process, killed if still running when dropped (an error or a panic of the bench
/// leaves none behind).
struct ChildGuard(std::process::Child);

impl ChildGuard {
    /// Waits for the process to exit until `deadline`; `None` (and the process killed) if it
    /// is still running then.
    fn wait_until(&mut self, deadline: Instant) -> Result<Option<std::process::ExitStatus>> {
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Validator `index`'s p2p address.
fn address(index: usize) -> SocketAddr {
    let [a, b, c, d] = BASE_IP;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d + index as u8)), PORT)
}

/// What one validator observed.
#[derive(Default)]
struct Observed {
    /// When this validator proposed each of its payloads (and the wall clock then).
    proposed: HashMap<Digest, (Instant, u64)>,
    /// Propose->finalize of this validator's own proposals made after the warm-up (ms).
    samples: Vec<f64>,
    /// Views finalized after the warm-up.
    finalized_views: u64,
    /// (proposed, finalized) in Unix microseconds, of the same proposals as `samples`.
    timeline: Vec<(u64, u64)>,
}

/// The application with no work: proposes a digest of the round, accepts every payload, relays
/// nothing (there is no payload to send), and times its own proposals to finality.
#[derive(Clone)]
struct BareApp {
    measure_from: Instant,
    observed: Arc<Mutex<Observed>>,
}

impl BareApp {
    fn new(measure_from: Instant) -> Self {
        Self { measure_from, observed: Arc::default() }
    }

    fn observed(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.observed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, path: &Path) -> Result<()> {
        let o = self.observed();
        let mut text = format!("finalized_views {}\n", o.finalized_views);
        for s in &o.samples {
            text.push_str(&format!("{s:.3}\n"));
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        let timeline: String = o.timeline.iter().map(|(p, f)| format!("{p} {f}\n")).collect();
        let path = path.with_file_name(TIMELINE_FILE);
        std::fs::write(&path, timeline).with_context(|| format!("cannot write {}", path.display()))
    }
}

impl Automaton for BareApp {
    type Context = Context<Digest, PublicKey>;
    type Digest = Digest;

    async fn propose(&mut self, context: Self::Context) -> oneshot::Receiver<Digest> {
        let round = context.round;
        let digest = Sha256::hash(&[&round.epoch().get().to_be_bytes(), &round.view().get().to_be_bytes()]);
        self.observed().proposed.insert(digest, (Instant::now(), unix_us()));
        let (tx, rx) = oneshot::channel();
        tx.send_lossy(digest);
        rx
    }

    async fn verify(&mut self, _context: Self::Context, _payload: Digest) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        tx.send_lossy(true);
        rx
    }
}

impl CertifiableAutomaton for BareApp {}

impl Relay for BareApp {
    type Digest = Digest;
    type PublicKey = PublicKey;
    type Plan = Plan<PublicKey>;

    fn broadcast(&mut self, _payload: Digest, _plan: Plan<PublicKey>) -> commonware_actor::Feedback {
        commonware_actor::Feedback::Ok
    }
}

impl Reporter for BareApp {
    type Activity = Activity<Scheme, Digest>;

    fn report(&mut self, activity: Self::Activity) -> commonware_actor::Feedback {
        if let Activity::Finalization(f) = activity {
            let now = Instant::now();
            let measure_from = self.measure_from;
            let mut o = self.observed();
            if now >= measure_from {
                o.finalized_views += 1;
            }
            if let Some((proposed, proposed_us)) = o.proposed.remove(&f.proposal.payload)
                && proposed >= measure_from
            {
                o.samples.push((now - proposed).as_secs_f64() * 1e3);
                o.timeline.push((proposed_us, unix_us()));
            }
        }
        commonware_actor::Feedback::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proposals at 0, 10 and 20 ms, each final 6 ms later: an arrival waits for the next
    /// proposal, then its 6 ms.
    #[test]
    fn an_arrival_waits_for_the_next_proposal_then_its_finalization() {
        let mut timeline = vec![(20_000, 26_000), (0, 6_000), (10_000, 16_000)];
        let l = arrival_to_final(&mut timeline, 2_500);
        assert_eq!(l, [6.0, 13.5, 11.0, 8.5, 6.0, 13.5, 11.0, 8.5, 6.0]);
        assert!(arrival_to_final(&mut [], 100).is_empty());
    }
}
