//! `archipel ledger …`, `archipel account …` and `archipel proof verify`: follow, show, export and
//! verify the replicated ledger, read and move balances, and check proofs offline.

use anyhow::{Context as _, Result, anyhow, bail};
use archipel_crypto::Identity;
use archipel_ledger::{Hash, Payload, Transaction};
use archipel_node::client::ApiClient;
use archipel_node::ledger_api::{AccountView, AnyProof, BlockView, HeadView, SubmitResponse};
use archipel_node::ledger_verify::{verify_export, verify_export_pinned, verify_proof};
use archipel_types::NodeId;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where to reach a node.
#[derive(Args, Debug, Clone)]
pub struct NodeArg {
    /// A node's API URL (default: the local devnet's first node). Storage commands (bucket, put,
    /// get, ls, export, import …) take several comma-separated (default: every devnet node);
    /// others ask the first.
    #[arg(long, env = "ARCHIPEL_NODE")]
    pub node: Option<String>,
}

/// How a transaction is signed, where it goes, and how its outcome is shown.
#[derive(Args, Debug, Clone)]
pub struct SubmitArgs {
    /// Your key file (default: the devnet tenant key).
    #[arg(long, env = "ARCHIPEL_KEY")]
    key: Option<PathBuf>,
    #[command(flatten)]
    node: NodeArg,
    /// Return once accepted, without waiting for finality.
    #[arg(long)]
    no_wait: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `archipel ledger`.
#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// Follow finalized blocks live (Ctrl-C stops).
    Tail {
        #[command(flatten)]
        node: NodeArg,
        /// Start at this height (default: the next block).
        #[arg(long)]
        from: Option<u64>,
        /// Print each block as one JSON line.
        #[arg(long)]
        json: bool,
        /// Stop after this many blocks.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Show a finalized block (by height) or a transaction (by hash).
    Show {
        /// A height, or a 64-hex transaction hash.
        what: String,
        #[command(flatten)]
        node: NodeArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the finalized chain (genesis, blocks, finality certificates) to FILE.
    Export {
        /// Output file (refuses to overwrite).
        file: PathBuf,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Verify an export offline: signatures, hash links, transaction roots, a full replay and
    /// every state root; names the first bad block. Prints which genesis it trusted.
    Verify {
        /// The export file.
        file: PathBuf,
        /// Require the export's genesis to be this genesis file's (the network you trust).
        #[arg(long)]
        genesis: Option<PathBuf>,
        /// Require the export's genesis to have this hash (64 hex characters, as `archipel
        /// genesis show` prints it).
        #[arg(long)]
        genesis_hash: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Protocol upgrades: which rules are in force, and scheduling the next version at a height
    /// (a quorum of validators approves; see README "Upgrading the protocol").
    Upgrade {
        #[command(subcommand)]
        command: UpgradeCommand,
    },
}

/// `archipel ledger upgrade`.
#[derive(Subcommand, Debug)]
pub enum UpgradeCommand {
    /// The protocol version in force, the upgrade scheduled, and the newest version this node's
    /// build implements.
    Status {
        #[command(flatten)]
        node: NodeArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// As a validator, sign an approval of protocol VERSION from HEIGHT on (or, with --cancel, of
    /// cancelling that scheduled upgrade); prints it as `VALIDATOR:SIGNATURE` for `upgrade
    /// schedule --approval` (or `upgrade cancel --approval`).
    Approve {
        /// The version (the one after the version in force).
        #[arg(long)]
        protocol: u32,
        /// The first height executed under it.
        #[arg(long)]
        height: u64,
        /// Approve cancelling this scheduled upgrade instead.
        #[arg(long)]
        cancel: bool,
        /// The validator's key file (e.g. `.archipel/devnet/nodes/n01/node.key`).
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Submit a ScheduleUpgrade with a quorum of validators' approvals; returns once final.
    Schedule(UpgradeTx),
    /// Submit a CancelUpgrade of the scheduled upgrade with a quorum of validators' approvals (from
    /// `upgrade approve --cancel`); returns once final. Only before its height.
    Cancel(UpgradeTx),
}

/// An upgrade and the validators' approvals of it (or of its cancellation), to submit.
#[derive(Args, Debug)]
pub struct UpgradeTx {
    /// The version.
    #[arg(long)]
    protocol: u32,
    /// The first height executed under it.
    #[arg(long)]
    height: u64,
    /// A validator's approval, `VALIDATOR:SIGNATURE` as `upgrade approve` (or `approve --cancel`)
    /// prints it (repeat).
    #[arg(long = "approval", required = true)]
    approvals: Vec<String>,
    #[command(flatten)]
    submit: SubmitArgs,
}

/// `archipel account`.
#[derive(Subcommand, Debug)]
pub enum AccountCommand {
    /// Balance, next nonce and (for nodes) lease status, from finalized state.
    Show {
        /// Account id (hex public key) or a key file (default: the devnet tenant key).
        account: Option<String>,
        #[command(flatten)]
        node: NodeArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Transfer funds (waits until final unless --no-wait).
    Transfer {
        /// Recipient account id (hex public key) or key file.
        to: String,
        /// Amount in micro-units.
        amount_micro: u64,
        #[command(flatten)]
        submit: SubmitArgs,
    },
    /// Pay several recipients in one transaction (all or none; one fee per recipient; waits
    /// until final unless --no-wait). FILE (or - for standard input) has one `RECIPIENT AMOUNT`
    /// per line (account id or key file, micro-units; spaces, tabs or a comma between; `#`
    /// starts a comment), at most 200 lines.
    Pay {
        /// The list of payments.
        file: PathBuf,
        #[command(flatten)]
        submit: SubmitArgs,
    },
}

/// Reads a payment list (`account pay`): one `RECIPIENT AMOUNT` per line.
fn read_credits(file: &Path) -> Result<Vec<archipel_ledger::Credit>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("cannot read the payment list from standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read the payment list {}", file.display()))?
    };
    let mut credits = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(|c: char| c == ',' || c.is_whitespace()).filter(|f| !f.is_empty()).collect();
        let [to, amount] = fields[..] else {
            bail!("{} line {}: expected `RECIPIENT AMOUNT`, got {line:?}", file.display(), i + 1);
        };
        let to = account_id(to).with_context(|| format!("{} line {}", file.display(), i + 1))?;
        let amount_micro: u64 = amount.parse().with_context(|| {
            format!("{} line {}: amount {amount:?} is not a whole number of micro-units", file.display(), i + 1)
        })?;
        credits.push(archipel_ledger::Credit { to, amount_micro });
    }
    if credits.is_empty() || credits.len() > archipel_ledger::MAX_CREDITS {
        bail!(
            "{} lists {} payments: one transaction pays 1 to {} recipients (split the list)",
            file.display(),
            credits.len(),
            archipel_ledger::MAX_CREDITS
        );
    }
    Ok(credits)
}

/// `archipel proof`.
#[derive(Subcommand, Debug)]
pub enum ProofCommand {
    /// Get a proof from a node (transaction hash, or state key such as account/<id>).
    Get {
        /// `tx/<hash>` or a state key (`account/<id>`, `node/<id>`, `lease/<id>`, `chain`, …).
        what: String,
        /// Write it to this file (default: print it).
        #[arg(long, short)]
        out: Option<PathBuf>,
        #[command(flatten)]
        node: NodeArg,
    },
    /// Verify a proof offline against a genesis file. Prints which genesis it trusted.
    Verify {
        /// The proof (JSON from `archipel proof get` or GET /v1/proof/...).
        file: PathBuf,
        /// The network's genesis (default: the local devnet's).
        #[arg(long)]
        genesis: Option<PathBuf>,
        /// Require that genesis to have this hash (64 hex characters, as `archipel genesis
        /// show` prints it).
        #[arg(long)]
        genesis_hash: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Where the genesis a verification trusted came from.
#[derive(Debug)]
enum GenesisSource {
    /// The `--genesis` file.
    File(PathBuf),
    /// The local devnet's genesis (the default of `proof verify`).
    DevnetFile(PathBuf),
    /// The genesis inside the verified file itself.
    Embedded(PathBuf),
}

/// The genesis a verification trusted.
#[derive(Debug)]
struct TrustedGenesis {
    hash: String,
    source: GenesisSource,
    /// It was checked to have the `--genesis-hash` given.
    hash_given: bool,
}

impl TrustedGenesis {
    /// The `trusted_genesis` object of `--json` output.
    fn json(&self) -> serde_json::Value {
        let (source, path) = match &self.source {
            GenesisSource::File(p) => ("genesis_file", p),
            GenesisSource::DevnetFile(p) => ("devnet_genesis_file", p),
            GenesisSource::Embedded(p) => ("file_itself", p),
        };
        serde_json::json!({ "hash": self.hash, "source": source, "path": path, "hash_given": self.hash_given })
    }

    /// "genesis HASH (from …)".
    fn describe(&self) -> String {
        let from = match &self.source {
            GenesisSource::File(p) => format!("the --genesis file {}", p.display()),
            GenesisSource::DevnetFile(p) => format!("the local devnet's {}", p.display()),
            GenesisSource::Embedded(p) => format!("inside {} itself", p.display()),
        };
        let given = if self.hash_given { ", equal to --genesis-hash" } else { "" };
        format!("genesis {} (from {from}{given})", self.hash)
    }

    /// Says plainly on stderr when the genesis was not one the user named.
    fn warn_if_unchecked(&self) {
        let what = match &self.source {
            _ if self.hash_given => return,
            GenesisSource::File(_) => return,
            GenesisSource::Embedded(p) => format!("the genesis inside {}", p.display()),
            GenesisSource::DevnetFile(p) => format!("the local devnet's genesis {}", p.display()),
        };
        eprintln!(
            "note: no --genesis or --genesis-hash given, so {what} was trusted (hash {}). Check that this is your network's genesis hash (`archipel genesis show <the network's genesis.json>`, or `genesis_hash` in a trusted node's GET /health), or pass --genesis FILE or --genesis-hash HEX.",
            self.hash
        )
    }
}

/// The hash `--genesis-hash` gave, checked to be a whole genesis hash.
fn given_genesis_hash(given: Option<&str>) -> Result<Option<String>> {
    given
        .map(|g| {
            archipel_node::ledger_verify::parse_genesis_hash(g).map_err(|reason| {
                anyhow!("--genesis-hash {g:?} is not a genesis hash: give all 64 hex characters that `archipel genesis show` prints ({reason})")
            })
        })
        .transpose()
}

/// Fails unless the genesis at `path` with hash `found` has the `--genesis-hash` `expected`.
fn check_genesis_hash(path: &Path, found: &str, expected: Option<&str>) -> Result<()> {
    match expected {
        Some(e) if e != found => {
            bail!(
                "genesis {} has hash {found}, not the --genesis-hash {e}: it is another network's genesis",
                path.display()
            )
        }
        _ => Ok(()),
    }
}

fn client(node: &NodeArg) -> Result<ApiClient> {
    Ok(ApiClient::new(&crate::default_node(node.node.clone())?))
}

fn devnet_path(file: &str) -> PathBuf {
    Path::new(crate::devnet::DEFAULT_DIR).join(file)
}

/// An account given as a hex id or a key file.
fn account_id(spec: &str) -> Result<NodeId> {
    if let Ok(id) = spec.parse::<NodeId>() {
        return Ok(id);
    }
    let path = Path::new(spec);
    if path.exists() {
        return Ok(Identity::load(path)?.node_id());
    }
    bail!("{spec:?} is neither an account id (64 hex characters) nor a key file")
}

fn short_ts(ms: u64) -> String {
    let secs = ms / 1000;
    format!("{:02}:{:02}:{:02}.{:03}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60, ms % 1000)
}

fn print_block_line(b: &BlockView) {
    let kinds: Vec<String> = {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for t in &b.txs {
            *counts.entry(t.tx.tx.payload.kind()).or_default() += 1;
        }
        counts.into_iter().map(|(k, n)| format!("{n} {k}")).collect()
    };
    println!(
        "#{:<8} {}  {}  {:>4} tx  {}",
        b.header.height,
        b.hash.short(),
        short_ts(b.header.timestamp_ms),
        b.txs.len(),
        kinds.join(", ")
    );
}

/// Runs `archipel ledger …`.
pub async fn ledger(cmd: LedgerCommand) -> Result<()> {
    match cmd {
        LedgerCommand::Tail { node, from, json, count } => {
            let c = client(&node)?;
            let mut next = match from {
                Some(h) => h.max(1),
                None => c.get::<HeadView>("/v1/ledger/head").await?.header.height + 1,
            };
            let mut shown = 0u64;
            loop {
                let blocks: Vec<BlockView> =
                    c.get(&format!("/v1/ledger/blocks?from={next}&limit=100&wait_ms=5000")).await?;
                for b in &blocks {
                    if json {
                        println!("{}", serde_json::to_string(b)?);
                    } else {
                        print_block_line(b);
                    }
                    next = b.header.height + 1;
                    shown += 1;
                    if count.is_some_and(|c| shown >= c) {
                        return Ok(());
                    }
                }
            }
        }
        LedgerCommand::Show { what, node, json } => {
            let c = client(&node)?;
            if let Ok(height) = what.parse::<u64>() {
                let b: BlockView = c.get(&format!("/v1/ledger/blocks/{height}")).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&b)?);
                } else {
                    println!("block {} {}", b.header.height, b.hash);
                    println!("  parent      {}", b.header.parent);
                    println!("  time        {} ({} ms)", short_ts(b.header.timestamp_ms), b.header.timestamp_ms);
                    println!("  tx root     {}", b.header.tx_root);
                    println!("  state root  {}", b.header.state_root);
                    println!("  finality    {} bytes of validator signatures", b.certificate.len() / 2);
                    for t in &b.txs {
                        println!(
                            "  tx {}  {} nonce {}  {}",
                            t.hash.short(),
                            t.tx.tx.signer.short(),
                            t.tx.tx.nonce,
                            t.tx.tx.payload.kind()
                        );
                    }
                }
                return Ok(());
            }
            let hash: Hash = what.parse().map_err(|e: String| anyhow!("{e} (or give a block height)"))?;
            let r: SubmitResponse = c.get(&format!("/v1/tx/{hash}")).await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            if !json && matches!(r.status, archipel_consensus::TxStatus::Unknown) {
                eprintln!("this node has not seen transaction {hash}");
            }
            Ok(())
        }
        LedgerCommand::Export { file, node } => {
            if file.exists() {
                bail!("{} already exists: choose another file or remove it", file.display());
            }
            let c = client(&node)?;
            let bytes = c.raw("GET", "/v1/ledger/export", Vec::new(), Duration::from_secs(300)).await?;
            let (_, v) =
                verify_export(&bytes).map_err(|e| anyhow!("the node sent an export that does not verify: {e}"))?;
            archipel_node::files::write_new(&file, &bytes).map_err(|e| anyhow!("{e}"))?;
            println!(
                "wrote {} — {} blocks, {} transactions, head {}",
                file.display(),
                v.blocks,
                v.transactions,
                v.head
            );
            Ok(())
        }
        LedgerCommand::Upgrade { command } => upgrade(command).await,
        LedgerCommand::Verify { file, genesis, genesis_hash, json } => {
            let expected = given_genesis_hash(genesis_hash.as_deref())?;
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let pin = match &genesis {
                Some(p) => {
                    let hash = archipel_node::genesis::Genesis::load(p)?.hash();
                    check_genesis_hash(p, &hash, expected.as_deref())?;
                    Some(hash)
                }
                None => expected.clone(),
            };
            match verify_export_pinned(&bytes, pin.as_deref()) {
                Ok((g, v)) => {
                    let trusted = TrustedGenesis {
                        hash: g.hash(),
                        source: genesis.map_or_else(|| GenesisSource::Embedded(file.clone()), GenesisSource::File),
                        hash_given: expected.is_some(),
                    };
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"ok": true, "network": g.network, "genesis_hash": g.hash(), "trusted_genesis": trusted.json(), "blocks": v.blocks, "transactions": v.transactions, "head": v.head, "state_root": v.state_root})
                        );
                    } else {
                        println!(
                            "ok: network {}, trusted {}; {} blocks, {} transactions; every certificate, signature, link and state root checks out; head {} state root {}",
                            g.network,
                            trusted.describe(),
                            v.blocks,
                            v.transactions,
                            v.head.short(),
                            v.state_root.short()
                        );
                    }
                    trusted.warn_if_unchecked();
                    Ok(())
                }
                Err(e) => {
                    if json {
                        println!("{}", serde_json::json!({"ok": false, "height": e.height, "error": e.what}));
                        std::process::exit(1);
                    }
                    bail!("{} does not verify: block {}: {}", file.display(), e.height, e.what)
                }
            }
        }
    }
}

/// Runs `archipel account …`.
pub async fn account(cmd: AccountCommand) -> Result<()> {
    match cmd {
        AccountCommand::Show { account, node, json } => {
            let id = match account {
                Some(a) => account_id(&a)?,
                None => Identity::load(&devnet_path("tenant.key"))?.node_id(),
            };
            let v: AccountView = client(&node)?.get(&format!("/v1/accounts/{id}")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("account {}", v.id);
                println!("  balance     {} micro", v.account.balance_micro);
                println!("  next nonce  {}", v.account.nonce);
                if let Some(l) = v.lease {
                    println!("  lease       {}", serde_json::to_value(l)?.as_str().unwrap_or("?"));
                }
                println!("  as of block {}", v.height);
            }
            Ok(())
        }
        AccountCommand::Transfer { to, amount_micro, submit } => {
            let to = account_id(&to)?;
            let done = format!("transferred {amount_micro} micro to {}", to.short());
            sign_submit_print(submit, Payload::Transfer { to, amount_micro }, &done).await
        }
        AccountCommand::Pay { file, submit } => {
            let credits = read_credits(&file)?;
            let (count, total) = (credits.len(), credits.iter().fold(0u64, |t, c| t.saturating_add(c.amount_micro)));
            let done = format!("paid {total} micro to {count} recipients");
            sign_submit_print(submit, Payload::TransferMany { credits }, &done).await
        }
    }
}

/// Runs `archipel ledger upgrade …`.
async fn upgrade(cmd: UpgradeCommand) -> Result<()> {
    use archipel_ledger::upgrade::Upgrade;
    match cmd {
        UpgradeCommand::Status { node, json } => {
            let head: HeadView = client(&node)?.get("/v1/ledger/head").await?;
            let p =
                head.protocol.ok_or_else(|| anyhow!("this node does not report its protocol: it predates upgrades"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
                return Ok(());
            }
            println!("protocol {} in force at block {}", p.active, head.header.height);
            match p.scheduled {
                Some(u) => println!(
                    "protocol {} scheduled from height {} ({} blocks from now)",
                    u.protocol,
                    u.height,
                    u.height.saturating_sub(head.header.height)
                ),
                None => println!("no upgrade scheduled"),
            }
            let needed = p.scheduled.map_or(p.active, |u| u.protocol);
            if needed > p.supported {
                println!(
                    "this node's build implements protocol {} at most: install a release with protocol {needed}",
                    p.supported
                );
            } else {
                println!("this node's build implements protocol {} at most", p.supported);
            }
            Ok(())
        }
        UpgradeCommand::Approve { protocol, height, cancel, key, node } => {
            let identity = Identity::load(&key)?;
            let head: HeadView = client(&node)?.get("/v1/ledger/head").await?;
            let network = network_in(&head)?;
            let upgrade = Upgrade { protocol, height };
            if let Some(p) = head.protocol {
                if cancel {
                    if p.scheduled != Some(upgrade) {
                        let now = p.scheduled.map_or("no upgrade is".into(), |u| {
                            format!("protocol {} at height {} is", u.protocol, u.height)
                        });
                        bail!("protocol {protocol} at height {height} is not scheduled ({now}): nothing to cancel");
                    }
                } else {
                    check_next_upgrade(&p, head.header.height, &upgrade)?;
                }
            }
            let cancels = head.protocol.map_or(0, |p| p.cancels);
            let a = if cancel {
                archipel_ledger::upgrade::approve_cancel(&identity, &network, &upgrade, cancels)
            } else {
                archipel_ledger::upgrade::approve(&identity, &network, &upgrade, cancels)
            };
            println!("{}:{}", a.validator, hex::encode(a.signature));
            Ok(())
        }
        UpgradeCommand::Schedule(t) => {
            let upgrade = Upgrade { protocol: t.protocol, height: t.height };
            let done = format!("protocol {} scheduled from height {}", t.protocol, t.height);
            let payload = Payload::ScheduleUpgrade { upgrade, approvals: parse_approvals(&t.approvals)? };
            sign_submit_print(t.submit, payload, &done).await
        }
        UpgradeCommand::Cancel(t) => {
            let upgrade = Upgrade { protocol: t.protocol, height: t.height };
            let done = format!("the upgrade to protocol {} at height {} is cancelled", t.protocol, t.height);
            let payload = Payload::CancelUpgrade { upgrade, approvals: parse_approvals(&t.approvals)? };
            sign_submit_print(t.submit, payload, &done).await
        }
    }
}

/// What `approve` checks before signing an upgrade, from the head's protocol view `p` at `head`
/// (the ledger checks the same again when the schedule is submitted): none pending, the next
/// version, the network's notice.
fn check_next_upgrade(
    p: &archipel_node::ledger_api::ProtocolView,
    head: u64,
    upgrade: &archipel_ledger::upgrade::Upgrade,
) -> Result<()> {
    if let Some(u) = p.scheduled {
        bail!("protocol {} is already scheduled from height {}: one upgrade at a time", u.protocol, u.height);
    }
    if upgrade.protocol != p.active + 1 {
        bail!(
            "the network runs protocol {}: the next upgrade is to {}, not {}",
            p.active,
            p.active + 1,
            upgrade.protocol
        );
    }
    let earliest = head + p.notice_blocks;
    if upgrade.height < earliest {
        bail!(
            "height {} is too soon: the network needs {} blocks of notice (height {earliest} or later, leaving time to \
             collect the other approvals)",
            upgrade.height,
            p.notice_blocks
        );
    }
    Ok(())
}

/// `VALIDATOR:SIGNATURE` approvals, as `ledger upgrade approve` prints them.
fn parse_approvals(approvals: &[String]) -> Result<Vec<archipel_ledger::upgrade::Approval>> {
    approvals
        .iter()
        .map(|a| {
            let bad = || anyhow!("approval {a:?} is not VALIDATOR:SIGNATURE (64 and 128 hex characters)");
            let (v, sig) = a.split_once(':').ok_or_else(bad)?;
            let validator: NodeId = v.parse().map_err(|_| bad())?;
            let signature: [u8; 64] = hex::decode(sig).ok().and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
            Ok(archipel_ledger::upgrade::Approval { validator, signature })
        })
        .collect()
}

/// Signs and submits `payload` as `submit` says, then prints the outcome (`done` once final).
async fn sign_submit_print(submit: SubmitArgs, payload: Payload, done: &str) -> Result<()> {
    let r = sign_and_submit(submit.key, payload, &submit.node, !submit.no_wait).await?;
    print_submitted(&r, submit.json, done)
}

/// Signs `payload` with `key` (default: the devnet tenant key) at the account's next nonce and
/// submits it, waiting until it is final when `wait`.
async fn sign_and_submit(key: Option<PathBuf>, payload: Payload, node: &NodeArg, wait: bool) -> Result<SubmitResponse> {
    let identity = Identity::load(&key.unwrap_or_else(|| devnet_path("tenant.key")))?;
    let c = client(node)?;
    let me: AccountView = c.get(&format!("/v1/accounts/{}", identity.node_id())).await?;
    let tx = Transaction { signer: identity.node_id(), nonce: me.account.nonce, payload }
        .sign(&identity, &network_of(&c).await?);
    Ok(c.submit(&tx, wait).await?)
}

/// Prints a submission's outcome: `done` and where it is final, or that it is still pending.
fn print_submitted(r: &SubmitResponse, json: bool, done: &str) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    match &r.status {
        archipel_consensus::TxStatus::Final(loc) => println!("{done} — final in block {} (tx {})", loc.height, r.hash),
        _ => println!("submitted tx {} (not final yet: `archipel ledger show {}`)", r.hash, r.hash),
    }
    Ok(())
}

/// Signs `payload` with `key` (default: the devnet tenant key) at its next nonce, submits it and
/// waits until it is final.
pub async fn submit_as(key: Option<PathBuf>, payload: Payload, node: &NodeArg, done: &str) -> Result<()> {
    let r = sign_and_submit(key, payload, node, true).await?;
    match &r.status {
        archipel_consensus::TxStatus::Final(loc) => println!("{done} — final in block {} (tx {})", loc.height, r.hash),
        _ => bail!("transaction {} was accepted but is not final yet: check `archipel ledger show {}`", r.hash, r.hash),
    }
    Ok(())
}

/// Runs `archipel proof …`.
pub async fn proof(cmd: ProofCommand) -> Result<()> {
    match cmd {
        ProofCommand::Get { what, out, node } => {
            let path = match what.strip_prefix("tx/") {
                Some(h) => format!("/v1/proof/tx/{h}"),
                None => format!("/v1/proof/state/{what}"),
            };
            let v: serde_json::Value = client(&node)?.get(&path).await?;
            let text = serde_json::to_string_pretty(&v)?;
            match out {
                Some(f) => {
                    archipel_node::files::write_new(&f, text.as_bytes()).map_err(|e| anyhow!("{e}"))?;
                    println!("wrote {}", f.display());
                }
                None => println!("{text}"),
            }
            Ok(())
        }
        ProofCommand::Verify { file, genesis, genesis_hash, json } => {
            let expected = given_genesis_hash(genesis_hash.as_deref())?;
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let proof: AnyProof =
                serde_json::from_str(&text).map_err(|e| anyhow!("{} is not a proof: {e}", file.display()))?;
            let (genesis_path, source) = match genesis {
                Some(p) => (p.clone(), GenesisSource::File(p)),
                None => (devnet_path("genesis.json"), GenesisSource::DevnetFile(devnet_path("genesis.json"))),
            };
            let g = match archipel_node::genesis::Genesis::load(&genesis_path) {
                Err(archipel_node::genesis::GenesisError::Missing(p))
                    if matches!(source, GenesisSource::DevnetFile(_)) =>
                {
                    bail!(
                        "no --genesis given, and there is no local devnet genesis at {}: pass --genesis FILE, the genesis of the network the proof is from",
                        p.display()
                    )
                }
                other => other?,
            };
            let trusted = TrustedGenesis { hash: g.hash(), source, hash_given: expected.is_some() };
            check_genesis_hash(&genesis_path, &trusted.hash, expected.as_deref())?;
            let report = verify_proof(&g, &proof).map_err(|e| anyhow!("{} does not verify: {e}", file.display()))?;
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["trusted_genesis"] = trusted.json();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "ok: {} proof — {} is committed by block {} ({}), finalized by the validators of the trusted {}",
                    report.kind,
                    report.shows,
                    report.height,
                    report.block.short(),
                    trusted.describe()
                );
            }
            trusted.warn_if_unchecked();
            Ok(())
        }
    }
}

/// The network (genesis hash) the node `c` talks to: transactions are signed for it, so one
/// signed for another network never applies here.
async fn network_of(c: &ApiClient) -> Result<Hash> {
    network_in(&c.get("/v1/ledger/head").await?)
}

/// The network (genesis hash) a head names.
fn network_in(head: &HeadView) -> Result<Hash> {
    head.genesis_hash.parse().map_err(|e| anyhow!("the node sent a malformed genesis hash: {e}"))
}
