//! Helpers for the real-process integration tests: run the `archipel` binary, start devnets on
//! private loopback ranges, poll the HTTP API.

#![allow(dead_code)]

use archipel_node::api::NodesView;
use archipel_node::client::ApiClient;
use archipel_node::membership::PeerStatus;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_archipel")
}

/// Runs `archipel ARGS` to completion in `dir`.
pub fn archipel(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin()).current_dir(dir).args(args).env_remove("ARCHIPEL_NODE").output().expect("run archipel")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The network id (genesis hash) of the node at `url`: what transactions are signed for.
pub fn network(url: &str) -> archipel_ledger::Hash {
    let v: serde_json::Value = rt().block_on(ApiClient::new(url).get("/v1/ledger/head")).expect("head");
    v["genesis_hash"].as_str().expect("genesis_hash").parse().expect("a hash")
}

/// The test's one runtime, shared by every thread that blocks on a request. One runtime for the
/// whole test matters: a client pools its connections, and a connection opened on a runtime that
/// was since dropped fails its next request with "runtime dropped the dispatch task".
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap())
}

/// Starts `archipel ARGS` in `dir` in the background, output discarded.
/// The last `n` lines of the log of the processes [`spawn`]ed in `dir`, for a failure message.
pub fn spawned_log_tail(dir: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(dir.join("spawned.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn spawn(dir: &Path, args: &[&str]) -> Child {
    spawn_with_env(dir, args, &[])
}

/// [`spawn`] with `env` set for the process (as a devnet started with it sets for its nodes).
pub fn spawn_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    // Its log goes to `spawned.log` in `dir` (appended by every process spawned there), to read
    // when a test fails.
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("spawned.log"));
    Command::new(bin())
        .current_dir(dir)
        .envs(env.iter().copied())
        .args(args)
        .stdout(Stdio::null())
        .stderr(log.map_or_else(|_| Stdio::null(), Stdio::from))
        .spawn()
        .expect("start archipel")
}

/// A devnet child process with its stdout lines forwarded to a channel.
pub struct Devnet {
    pub child: Child,
    pub dir: PathBuf,
    pub lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Devnet {
    /// Starts `archipel devnet` with `extra` args in `work` and waits for "devnet ready".
    pub fn start(work: &Path, extra: &[&str]) -> Devnet {
        Self::start_with_env(work, extra, &[])
    }

    /// [`Devnet::start`] with `env` set for the devnet and its nodes.
    pub fn start_with_env(work: &Path, extra: &[&str], env: &[(&str, &str)]) -> Devnet {
        let dir = work.join("devnet");
        let mut child = Command::new(bin())
            .current_dir(work)
            .envs(env.iter().copied())
            .arg("devnet")
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            // Tests run side by side: no devnet takes the default S3 port unless asked to.
            .args(if extra.contains(&"--s3-listen") { &[][..] } else { &["--s3-listen", "off"][..] })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start devnet");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Devnet { child, dir, lines: rx, seen: Vec::new() };
        d.wait_for_line("devnet ready", Duration::from_secs(120));
        d
    }

    /// Waits for a stdout line containing `needle`; panics with what was seen on timeout.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no line with {needle:?} within {timeout:?}; devnet said:\n{}", self.seen.join("\n")),
            }
        }
    }

    pub fn state(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.dir.join("devnet.json")).unwrap()).unwrap()
    }

    pub fn node(&self, i: usize) -> (String, String, u32, PathBuf) {
        let s = self.state();
        let n = &s["nodes"][i];
        (
            n["name"].as_str().unwrap().to_string(),
            n["api_url"].as_str().unwrap().to_string(),
            n["pid"].as_u64().unwrap_or(0) as u32,
            PathBuf::from(n["config"].as_str().unwrap()),
        )
    }

    /// Node `i`'s id (public key).
    pub fn id(&self, i: usize) -> archipel_types::NodeId {
        self.state()["nodes"][i]["id"].as_str().unwrap().parse().unwrap()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.state()["nodes"].as_array().unwrap().iter().filter_map(|n| n["pid"].as_u64()).map(|p| p as u32).collect()
    }
}

impl Drop for Devnet {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

pub fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); check /proc state too.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    !stat.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z'))
}

/// Polls `url`'s view until `pred` holds; returns the time it took or panics after `timeout`.
pub fn wait_view(url: &str, timeout: Duration, what: &str, pred: impl Fn(&NodesView) -> bool) -> Duration {
    let rt = rt();
    let client = ApiClient::new(url);
    let start = Instant::now();
    let mut last = None;
    // Looked at once at least, even with no time left.
    loop {
        if let Ok(v) = rt.block_on(client.nodes()) {
            if pred(&v) {
                return start.elapsed();
            }
            last = Some(v);
        }
        if start.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let last: Option<Vec<_>> =
        last.map(|v| v.nodes.iter().map(|n| (n.name.clone(), n.status, n.last_seen_ms)).collect());
    panic!("{what}: not reached within {timeout:?} at {url}; last view: {last:?}");
}

pub fn status_of(v: &NodesView, name: &str) -> Option<PeerStatus> {
    v.nodes.iter().find(|n| n.name == name).map(|n| n.status)
}

/// `archipel node init` of a node "late" (eu-fr, FR operator `late-op`) that is not in the genesis,
/// listening on `ip` (p2p `port`, API `port + 1`); `extra` adds flags. Panics if it fails.
pub fn init_late_node(work: &Path, ip: &str, port: u16, genesis: &Path, extra: &[&str]) {
    let p2p = format!("{ip}:{port}");
    let api = format!("{ip}:{}", port + 1);
    let mut args = vec![
        "node",
        "init",
        "--dir",
        "late",
        "--name",
        "late",
        "--region",
        "eu-fr",
        "--country",
        "FR",
        "--operator",
        "late-op",
        "--operator-jurisdiction",
        "FR",
        "--p2p-listen",
        &p2p,
        "--api-listen",
        &api,
        "--p2p-egress-ip",
        "127.0.0.1",
        "--genesis",
        genesis.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = archipel(work, &args);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Nodes marked Down in `url`'s finalized blocks `1..=to`, with the height.
pub fn downs(url: &str, to: u64) -> Vec<(u64, archipel_types::NodeId)> {
    let client = ApiClient::new(url);
    let mut out = Vec::new();
    let mut from = 1;
    while from <= to {
        let page: Vec<archipel_node::ledger_api::BlockView> =
            rt().block_on(client.get(&format!("/v1/ledger/blocks?from={from}&limit=100"))).expect("blocks");
        assert!(!page.is_empty(), "{url} has no block {from}");
        for b in page.into_iter().take_while(|b| b.header.height <= to) {
            for c in &b.liveness {
                if let archipel_ledger::LivenessChange::Down { node } = c {
                    out.push((b.header.height, *node));
                }
            }
            from = b.header.height + 1;
        }
    }
    out
}

/// No node of `alive` (they ran throughout) was ever marked Down: a lease means "the validators
/// stopped hearing it", not "consensus stalled".
pub fn assert_never_down(url: &str, alive: &[archipel_types::NodeId]) {
    let head: archipel_node::ledger_api::HeadView =
        rt().block_on(ApiClient::new(url).get("/v1/ledger/head")).expect("head");
    let to = head.header.height;
    let wrong: Vec<_> = downs(url, to).into_iter().filter(|(_, n)| alive.contains(n)).collect();
    assert!(wrong.is_empty(), "live nodes marked down (height, node): {wrong:?}");
}

/// Runs `archipel ARGS` in `w` and returns its stdout; panics with its output if it fails.
pub fn run(w: &Path, args: &[&str]) -> String {
    let out = archipel(w, args);
    assert!(out.status.success(), "archipel {args:?} failed:\n{}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

/// Runs `archipel ARGS` in `w`, which must fail; returns its stderr.
pub fn refused(w: &Path, args: &[&str]) -> String {
    let out = archipel(w, args);
    assert!(!out.status.success(), "archipel {args:?} should have failed:\n{}", stdout(&out));
    stderr(&out)
}

pub fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Every file under `dir`.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(files(&p)) } else { out.push(p) }
        }
    }
    out
}

/// The sum of every series of the metric whose name ends with `name`, as `url` exports it (0 when
/// the node does not answer); panics when a node that answers exports no such series, so a
/// misspelt name cannot pass as zero.
pub fn metric(url: &str, name: &str) -> f64 {
    let Ok(text) = rt().block_on(ApiClient::new(url).metrics_text()) else { return 0.0 };
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.split_whitespace().next().is_some_and(|n| n.ends_with(name)))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    assert!(!values.is_empty(), "{url} exports no metric named …{name}");
    values.iter().sum()
}

/// Waits until `n` storage leases are up in the finalized state `url` serves (they come up a few
/// seconds after the processes start).
pub fn wait_storage_up(url: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: serde_json::Value = rt().block_on(ApiClient::new(url).get("/v1/storage/nodes")).unwrap();
        let up = v["nodes"].as_array().unwrap().iter().filter(|n| n["lease"] == "up").count();
        if up == n {
            return;
        }
        assert!(Instant::now() < deadline, "only {up} of {n} leases up: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every registered node's lease is Up in the finalized state `url` serves. Genesis
/// leases open Down until a node's first alive proof lands, so a test that kills a node and then
/// expects it marked Down must first see it Up.
pub fn wait_all_leases_up(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // A failed request is tried again until the deadline.
        let leases: Vec<_> = rt()
            .block_on(ApiClient::new(url).nodes())
            .map(|v| v.nodes.iter().filter_map(|n| n.lease).collect())
            .unwrap_or_default();
        if !leases.is_empty() && leases.iter().all(|l| *l == archipel_ledger::LeaseStatus::Up) {
            return;
        }
        assert!(Instant::now() < deadline, "not every lease came up within 60 s: {leases:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Job `id` in `node`'s finalized state. The CLI returns once some node shows the posting final;
/// this one may apply that block a moment later (404 until then).
pub fn finalized_job(node: &str, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r: Result<serde_json::Value, _> =
            rt().block_on(archipel_node::client::ApiClient::new(node).get(&format!("/v1/jobs/{id}")));
        match r {
            Ok(v) => return v["job"].clone(),
            Err(e) if Instant::now() < deadline && e.to_string().contains("no_such_job") => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("job {id}: {e}"),
        }
    }
}

/// SIGKILLs process `pid`.
pub fn kill9(pid: u32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
}

/// `n` bytes that differ per `seed` (xorshift: incompressible enough for shards, and the same on
/// every run). Seeds differing only in the lowest bit give the same bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A spawned process (a node restarted by hand), killed and reaped when the test ends.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
