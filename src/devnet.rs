//! `archipel devnet`: a local network of real node processes.
//!
//! Creates `./.archipel/devnet/` (keys, configs, genesis, data, logs) on first run, resumes from it
//! on later runs, starts one `archipel node run` process per node — each on its own loopback
//! address, so nothing can silently assume a single host — supervises them (reports any child that
//! exits, restarts none), shows a live status line, and on SIGINT/SIGTERM stops every child: SIGTERM,
//! then SIGKILL after a grace period. Children also watch their parent and exit if it dies, so no
//! node outlives the devnet.

use crate::topology::Topology;
use anyhow::{Context, Result, bail};
use archipel_crypto::{Identity, SignedDescriptor};
use archipel_node::client::ApiClient;
use archipel_node::config::{ApiConfig, NodeConfig, P2pConfig};
use archipel_node::genesis::{Genesis, GenesisAccount};
use archipel_node::membership::PeerStatus;
use archipel_node::run::own_descriptor;
use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the devnet lives by default, relative to the current directory.
pub const DEFAULT_DIR: &str = ".archipel/devnet";
const MARKER: &str = ".archipel-devnet";
const STATE: &str = "devnet.json";
/// Balance of each devnet node's own account, in micro-units (fees of its repairs).
const NODE_BALANCE_MICRO: u64 = 1_000_000_000;

/// Balance of the devnet tenant account, in micro-units.
const TENANT_BALANCE_MICRO: u64 = 1_000_000_000_000;

/// Flags of `archipel devnet`. None are needed.
#[derive(Args, Debug)]
pub struct DevnetArgs {
    /// Directory for keys, configs, genesis, data and logs.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Number of nodes (default 12, from the built-in topology).
    #[arg(long)]
    nodes: Option<usize>,
    /// A topology file ([[node]] tables with name, region, country, operator, operator_jurisdiction, capacity, roles).
    #[arg(long, conflicts_with = "nodes")]
    topology: Option<PathBuf>,
    /// Delete the devnet directory and start a new network.
    #[arg(long)]
    reset: bool,
    /// P2P port of every node; the API uses the next port. Each node has its own loopback address.
    #[arg(long, default_value_t = 23100)]
    base_port: u16,
    /// Loopback address of the first node; the others follow (127.0.0.2, 127.0.0.3, …).
    #[arg(long, default_value = "127.0.0.2")]
    base_ip: Ipv4Addr,
    /// Seconds to wait for all nodes to come up.
    #[arg(long, default_value_t = 60)]
    startup_timeout: u64,
    /// Length of an audit epoch in a new devnet's genesis, ms (each object is audited once per
    /// epoch).
    #[arg(long, default_value_t = 10_000)]
    audit_epoch_ms: u64,
    /// Where the devnet's S3 gateway listens (`off`: no gateway).
    #[arg(long, default_value = "127.0.0.1:9000")]
    s3_listen: String,
}

/// One node as recorded in `devnet.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevnetNode {
    /// Name.
    pub name: String,
    /// Node id.
    pub id: String,
    /// Config file.
    pub config: PathBuf,
    /// API URL.
    pub api_url: String,
    /// P2P address.
    pub p2p_address: SocketAddr,
    /// Process id while running.
    pub pid: Option<u32>,
    /// Log file.
    pub log: PathBuf,
}

/// `devnet.json`: what is running where.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevnetState {
    /// The supervisor's pid while running.
    pub supervisor_pid: Option<u32>,
    /// Network name.
    pub network: String,
    /// Genesis hash.
    pub genesis_hash: String,
    /// The tenant key file.
    pub tenant_key: PathBuf,
    /// The nodes.
    pub nodes: Vec<DevnetNode>,
    /// The S3 gateway, once it listens.
    #[serde(default)]
    pub gateway: Option<crate::gateway_cli::GatewayInfo>,
}

/// Every node's API URL of the devnet in `dir`.
pub fn api_urls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(STATE))
        .ok()
        .and_then(|text| serde_json::from_str::<DevnetState>(&text).ok())
        .map(|state| state.nodes.iter().map(|n| n.api_url.clone()).collect())
        .unwrap_or_default()
}

/// The S3 gateway endpoint of the devnet in `dir`, while it runs.
pub fn gateway_endpoint(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(STATE)).ok()?;
    let state: DevnetState = serde_json::from_str(&text).ok()?;
    state.gateway.map(|g| g.endpoint)
}

/// The first node's API URL of the devnet in `dir`, if there is one.
pub fn first_api_url(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(STATE)).ok()?;
    let state: DevnetState = serde_json::from_str(&text).ok()?;
    state.nodes.first().map(|n| n.api_url.clone())
}

fn node_ip(base: Ipv4Addr, i: usize) -> Result<Ipv4Addr> {
    let v = u32::from(base).checked_add(i as u32).context("address overflow")?;
    let ip = Ipv4Addr::from(v);
    if ip.octets()[0] != 127 {
        bail!("node {i} would get address {ip}, outside 127.0.0.0/8: use a lower --base-ip or fewer nodes");
    }
    Ok(ip)
}

/// Creates keys, configs and the genesis for `topology` in `dir`.
fn create(dir: &Path, topology: &Topology, base_ip: Ipv4Addr, base_port: u16, audit_epoch_ms: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "archipel devnet directory; `archipel devnet --reset` deletes it\n")?;
    let mut descriptors: Vec<SignedDescriptor> = Vec::new();
    for (i, n) in topology.nodes.iter().enumerate() {
        let node_dir = dir.join("nodes").join(&n.name);
        let ip = node_ip(base_ip, i)?;
        let cfg = NodeConfig {
            ledger: Default::default(),
            compute: n.compute.clone(),
            name: n.name.clone(),
            key_file: "node.key".into(),
            data_dir: "data".into(),
            genesis_file: "../../genesis.json".into(),
            region: n.region.clone(),
            country: n.country,
            operator: n.operator.clone(),
            operator_jurisdiction: n.operator_jurisdiction,
            capacity: n.capacity,
            roles: n.roles.clone(),
            // Outgoing loopback connections leave from 127.0.0.1 whatever address the node listens on.
            p2p: P2pConfig {
                listen: SocketAddr::new(ip.into(), base_port),
                public: None,
                egress_ip: Some(Ipv4Addr::LOCALHOST.into()),
                allow_private_ips: true,
            },
            api: ApiConfig {
                listen: SocketAddr::new(ip.into(), base_port + 1),
                public: None,
                limits: Default::default(),
            },
        };
        let identity = Identity::generate();
        identity.save(&node_dir.join("node.key"))?;
        cfg.write_new(&node_dir.join("node.toml"))?;
        descriptors.push(own_descriptor(&identity, &cfg, None, 1)?);
    }
    let tenant = Identity::generate();
    tenant.save(&dir.join("tenant.key"))?;
    let mut accounts =
        vec![GenesisAccount { name: "tenant".into(), key: tenant.node_id(), balance_micro: TENANT_BALANCE_MICRO }];
    // Each node's own account pays the fees of what it submits by itself (shard repairs).
    accounts.extend(descriptors.iter().map(|d| GenesisAccount {
        name: d.descriptor.name.clone(),
        key: d.descriptor.node_id,
        balance_micro: NODE_BALANCE_MICRO,
    }));
    let mut genesis =
        crate::build_genesis("archipel-devnet", descriptors, &[], accounts, archipel_node::api::system_now_ms())?;
    genesis.ledger.audit_epoch_ms = audit_epoch_ms;
    // 40 blocks of notice for a protocol upgrade (~20 s idle), so an upgrade can be tried here.
    genesis.ledger.upgrade_notice_blocks = 40;
    genesis.ledger.validate().map_err(|e| anyhow::anyhow!("--audit-epoch-ms: {e}"))?;
    std::fs::write(dir.join("topology.toml"), toml::to_string_pretty(topology)?)?;
    genesis.write_new(&dir.join("genesis.json"))?;
    Ok(())
}

fn is_alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// Prepares the devnet directory (create, resume or reset) and returns its genesis and topology.
fn prepare(args: &DevnetArgs) -> Result<(Genesis, Topology)> {
    let dir = &args.dir;
    if args.reset && dir.exists() {
        if !dir.join(MARKER).exists() {
            bail!("{} does not look like a devnet directory (no {MARKER}): refusing to delete it", dir.display());
        }
        if let Ok(text) = std::fs::read_to_string(dir.join(STATE))
            && let Ok(state) = serde_json::from_str::<DevnetState>(&text)
            && let Some(pid) = state.supervisor_pid.filter(|p| is_alive(*p) && *p != std::process::id())
        {
            bail!("a devnet (pid {pid}) is running from {}: stop it first (Ctrl-C)", dir.display());
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot delete {}", dir.display()))?;
    }
    let wanted = match (&args.topology, args.nodes) {
        (Some(path), _) => Some(Topology::load(path)?),
        (None, Some(n)) => Some(Topology::default_with(n)?),
        (None, None) => None,
    };
    let genesis_path = dir.join("genesis.json");
    if genesis_path.exists() {
        let topology: Topology = toml::from_str(
            &std::fs::read_to_string(dir.join("topology.toml"))
                .context("devnet topology.toml is missing: run with --reset")?,
        )
        .context("devnet topology.toml is malformed: run with --reset")?;
        if let Some(w) = wanted
            && w != topology
        {
            bail!(
                "the devnet in {} was created with {} nodes and another topology: run `archipel devnet --reset` to start over with the new one",
                dir.display(),
                topology.nodes.len()
            );
        }
        let genesis = Genesis::load(&genesis_path)?;
        println!("resuming devnet from {} ({} nodes)", dir.display(), topology.nodes.len());
        return Ok((genesis, topology));
    }
    let topology = match wanted {
        Some(t) => t,
        None => Topology::default_with(12)?,
    };
    create(dir, &topology, args.base_ip, args.base_port, args.audit_epoch_ms)?;
    println!("created devnet in {} ({} nodes)", dir.display(), topology.nodes.len());
    Ok((Genesis::load(&genesis_path)?, topology))
}

fn write_state(dir: &Path, state: &DevnetState) -> Result<()> {
    let tmp = dir.join(format!("{STATE}.tmp"));
    // It holds the gateway's root secret.
    crate::write_private(&tmp, &serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, dir.join(STATE))?;
    Ok(())
}

fn last_log_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.lines().rev().find(|l| !l.trim().is_empty()).map(str::to_string))
        .unwrap_or_default()
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

struct Supervised {
    node: DevnetNode,
    child: Option<Child>,
}

/// Runs the devnet until SIGINT/SIGTERM.
pub fn run(args: DevnetArgs) -> Result<()> {
    let started = Instant::now();
    let (genesis, topology) = prepare(&args)?;
    let dir = args.dir.canonicalize().with_context(|| format!("cannot resolve {}", args.dir.display()))?;
    let exe = std::env::current_exe().context("cannot find the archipel executable")?;
    std::fs::create_dir_all(dir.join("logs"))?;

    let mut nodes: Vec<Supervised> = Vec::new();
    for n in &topology.nodes {
        let config = dir.join("nodes").join(&n.name).join("node.toml");
        let cfg = NodeConfig::load(&config)?;
        let id = Identity::load(&cfg.key_file)?.node_id();
        let log = dir.join("logs").join(format!("{}.log", n.name));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&exe)
            .args(["node", "run", "--exit-with-parent", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start node {}", n.name))?;
        nodes.push(Supervised {
            node: DevnetNode {
                name: n.name.clone(),
                id: id.to_string(),
                config,
                api_url: format!("http://{}", cfg.api_public()),
                p2p_address: cfg.p2p_public(),
                pid: Some(child.id()),
                log,
            },
            child: Some(child),
        });
    }
    let mut state = DevnetState {
        supervisor_pid: Some(std::process::id()),
        network: genesis.network.clone(),
        genesis_hash: genesis.hash(),
        tenant_key: dir.join("tenant.key"),
        nodes: nodes.iter().map(|s| s.node.clone()).collect(),
        gateway: None,
    };
    write_state(&dir, &state)?;

    let rt = crate::tokio_rt()?;
    let result = rt.block_on(supervise(&args, &dir, &genesis, &mut nodes, &mut state, started));
    stop_all(&mut nodes);
    for (s, n) in state.nodes.iter_mut().zip(&nodes) {
        s.pid = n.child.as_ref().map(Child::id);
    }
    state.supervisor_pid = None;
    state.gateway = None;
    let _ = write_state(&dir, &state);
    result
}

/// SIGTERM every child, wait up to 5 s, then SIGKILL what is left and reap everything.
fn stop_all(nodes: &mut [Supervised]) {
    for s in nodes.iter() {
        if let Some(c) = &s.child {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for s in nodes.iter_mut() {
            if let Some(c) = &mut s.child
                && matches!(c.try_wait(), Ok(Some(_)))
            {
                s.child = None;
            }
        }
        if nodes.iter().all(|s| s.child.is_none()) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for s in nodes.iter_mut() {
        if let Some(mut c) = s.child.take() {
            eprintln!("node {} did not stop within 5 s: killing it", s.node.name);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    println!("stopped {} nodes", nodes.len());
}

async fn supervise(
    args: &DevnetArgs,
    dir: &Path,
    genesis: &Genesis,
    nodes: &mut [Supervised],
    state: &mut DevnetState,
    started: Instant,
) -> Result<()> {
    // Both streams made once: a signal that arrives while no `recv` is pending (between two
    // turns of the loops below, e.g. while the status line asks a node) is kept for the next
    // one. A `ctrl_c()` made afresh each turn lost such a SIGINT, and the devnet ran on.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let tty = std::io::stdout().is_terminal();

    // Wait until every node answers /health.
    let deadline = Instant::now() + Duration::from_secs(args.startup_timeout);
    let mut ready = vec![false; nodes.len()];
    while ready.iter().any(|r| !r) {
        for (i, s) in nodes.iter_mut().enumerate() {
            if let Some(c) = &mut s.child
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "node {} exited during startup ({}): {}\nfull log: {}",
                    s.node.name,
                    describe_exit(status),
                    last_log_line(&s.node.log),
                    s.node.log.display()
                );
            }
            if !ready[i] {
                ready[i] = ApiClient::new(&s.node.api_url).get::<serde_json::Value>("/health").await.is_ok();
            }
        }
        if Instant::now() > deadline {
            let missing: Vec<_> =
                nodes.iter().zip(&ready).filter(|(_, r)| !**r).map(|(s, _)| s.node.name.clone()).collect();
            bail!(
                "nodes {missing:?} did not answer within {} s; see their logs in {}",
                args.startup_timeout,
                dir.join("logs").display()
            );
        }
        tokio::select! {
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let up_in = started.elapsed();
    print_summary(dir, genesis, nodes);
    // The tenant's S3 gateway, in this process: it holds the tenant key and talks to every node.
    let (stop_gateway, gateway_stopped) = tokio::sync::oneshot::channel::<()>();
    if args.s3_listen != "off" {
        let listen: SocketAddr = args
            .s3_listen
            .parse()
            .with_context(|| format!("--s3-listen {:?} is not HOST:PORT or off", args.s3_listen))?;
        let urls: Vec<String> = nodes.iter().map(|s| s.node.api_url.clone()).collect();
        let tenant = Identity::load(&dir.join("tenant.key"))?;
        let policy = archipel_types::PlacementPolicy::anywhere(archipel_types::ErasureCode::DEFAULT);
        match crate::gateway_cli::start(listen, &urls, tenant, &dir.join("gateway"), policy).await {
            Ok((listener, svc, info)) => {
                crate::gateway_cli::print_info(&info, urls.len());
                // Root credentials: for the devnet's user only.
                crate::write_private(
                    &dir.join("s3.env"),
                    format!(
                        "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\nAWS_ENDPOINT_URL={}\nAWS_DEFAULT_REGION=us-east-1\n",
                        info.access_key_id, info.secret_access_key, info.endpoint
                    ),
                )?;
                state.gateway = Some(info);
                write_state(dir, state)?;
                tokio::spawn(archipel_gateway::serve(listener, svc, async {
                    let _ = gateway_stopped.await;
                }));
            }
            // The nodes run without it; the user learns why and how to choose another address.
            Err(e) => eprintln!("warning: no S3 gateway: {e:#} (pass --s3-listen HOST:PORT, or off)"),
        }
    }
    println!("devnet ready: {} nodes up in {:.2}s", nodes.len(), up_in.as_secs_f64());
    let _ = std::io::stdout().flush();

    let mut reported = vec![false; nodes.len()];
    let mut last_line = String::new();
    let mut last_print = Instant::now();
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let mut running = 0;
        for (i, s) in nodes.iter_mut().enumerate() {
            if let Some(c) = &mut s.child {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        s.child = None;
                        if !reported[i] {
                            reported[i] = true;
                            if tty {
                                println!();
                            }
                            println!(
                                "node {} ({}) exited ({}): {}\n  log: {}\n  restart it with: {} node run --config {}",
                                s.node.name,
                                &s.node.id[..10],
                                describe_exit(status),
                                last_log_line(&s.node.log),
                                s.node.log.display(),
                                std::env::current_exe()
                                    .map(|p| p.display().to_string())
                                    .unwrap_or_else(|_| "archipel".into()),
                                s.node.config.display()
                            );
                        }
                    }
                    _ => running += 1,
                }
            }
        }
        // The network as seen by the first node that answers.
        let mut seen = None;
        for s in nodes.iter() {
            if let Ok(view) = ApiClient::new(&s.node.api_url).nodes().await {
                let up = view.nodes.iter().filter(|n| n.status == PeerStatus::Up).count();
                seen = Some((up, view.nodes.len(), s.node.name.clone()));
                break;
            }
        }
        let uptime = started.elapsed().as_secs();
        let view = match seen {
            Some((up, total, by)) => format!("{up}/{total} up (seen by {by})"),
            None => "no node answers".into(),
        };
        let line = format!(
            "{running}/{} processes · {view} · uptime {}m{:02}s · Ctrl-C stops",
            nodes.len(),
            uptime / 60,
            uptime % 60
        );
        if tty {
            print!("\r\x1b[2K{line}");
            let _ = std::io::stdout().flush();
        } else if line.split(" · uptime").next() != last_line.split(" · uptime").next()
            || last_print.elapsed() > Duration::from_secs(30)
        {
            println!("{line}");
            last_print = Instant::now();
        }
        last_line = line;
    }
    if tty {
        println!();
    }
    println!("stopping devnet…");
    let _ = stop_gateway.send(());
    Ok(())
}

fn print_summary(dir: &Path, genesis: &Genesis, nodes: &[Supervised]) {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(["NAME", "ID", "REGION", "COUNTRY", "OPERATOR", "JURISDICTION", "ROLES", "API", "PID"]);
    for s in nodes {
        let d = genesis.nodes.iter().find(|n| n.descriptor.node_id.to_string() == s.node.id).map(|n| &n.descriptor);
        let Some(d) = d else { continue };
        let mut row = vec![s.node.name.clone()];
        row.extend(crate::output::descriptor_cells(d));
        row.push(s.node.api_url.clone());
        row.push(s.node.pid.map(|p| p.to_string()).unwrap_or_default());
        t.add_row(row);
    }
    println!("{t}");
    let first = nodes.first().map(|s| s.node.api_url.clone()).unwrap_or_default();
    println!("network {} · genesis {} · data in {}", genesis.network, &genesis.hash()[..16], dir.display());
    println!("tenant key: {} (funded account in genesis)", dir.join("tenant.key").display());
    println!("try:");
    println!("  archipel nodes                 # the network as seen by {first}");
    println!("  archipel nodes --json          # the same, for scripts");
    println!("  archipel whoami                # a signed request with the tenant key");
    println!("  curl {first}/metrics");
}
