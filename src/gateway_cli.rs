//! `archipel gateway`: the S3 gateway on the tenant's machine, and its start inside the devnet.

use anyhow::{Context as _, Result, anyhow};
use archipel_crypto::Identity;
use archipel_gateway::keys::{Key, Keys, root_key};
use archipel_gateway::{GatewayConfig, serve, service};
use archipel_objects::tenant::TenantClient;
use archipel_types::{CountryCode, ErasureCode, PlacementPolicy, RegionMatch};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `archipel gateway`.
#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Where to serve S3.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Node API URLs to talk to, comma separated; the next one is asked when one fails
    /// (default: every node of the local devnet).
    #[arg(long, value_delimiter = ',', env = "ARCHIPEL_NODES")]
    nodes: Vec<String>,
    /// The tenant's key file (default: the devnet tenant key).
    #[arg(long, env = "ARCHIPEL_KEY")]
    key: Option<PathBuf>,
    /// The gateway's directory: multipart parts (`spool/`) and registered token keys (`keys/`)
    /// (default: `gateway` beside the key).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Erasure code of buckets created through S3.
    #[arg(long, default_value = "4+2")]
    code: ErasureCode,
    /// Allowed regions or areas of buckets created through S3, comma separated; a bucket's
    /// location constraint narrows this further. Default: anywhere.
    #[arg(long, value_delimiter = ',')]
    regions: Vec<RegionMatch>,
    /// Refused operator jurisdictions of buckets created through S3, comma separated (`US`).
    #[arg(long, value_delimiter = ',')]
    deny_jurisdictions: Vec<CountryCode>,
    /// Print JSON (endpoint and root credentials) once listening.
    #[arg(long)]
    json: bool,
}

/// What a running gateway tells its users: where it is and the root credentials.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GatewayInfo {
    /// The S3 endpoint.
    pub endpoint: String,
    /// The root access key id.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
}

/// The gateway's root credentials and endpoint.
pub fn info(listen: SocketAddr, root: &Key) -> GatewayInfo {
    GatewayInfo {
        endpoint: format!("http://{listen}"),
        access_key_id: root.access_key.clone(),
        secret_access_key: root.secret.clone(),
    }
}

/// Binds and builds a gateway for `identity` over `nodes`, keeping its state in `dir`; returns
/// the listener, service and info.
pub async fn start(
    listen: SocketAddr,
    nodes: &[String],
    identity: Identity,
    dir: &Path,
    policy: PlacementPolicy,
) -> Result<(tokio::net::TcpListener, s3s::service::S3Service, GatewayInfo)> {
    if nodes.is_empty() {
        return Err(anyhow!("no node given: pass --nodes http://HOST:PORT,… or start `archipel devnet`"));
    }
    let root = root_key(&identity);
    let keys = Keys::open(&identity, Some(&dir.join("keys")))
        .with_context(|| format!("cannot use the gateway directory {}", dir.display()))?;
    let tenant = Arc::new(TenantClient::new(nodes, identity));
    let config = GatewayConfig { tenant, default_policy: policy, spool: dir.join("spool"), keys: Arc::new(keys) };
    let svc = service(config).with_context(|| format!("cannot use the gateway directory {}", dir.display()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}: is another gateway running? pass --listen"))?;
    let addr = listener.local_addr()?;
    Ok((listener, svc, info(addr, &root)))
}

/// Runs `archipel gateway` until Ctrl-C.
pub async fn run(args: GatewayArgs) -> Result<()> {
    let key_path = args.key.clone().unwrap_or_else(|| Path::new(crate::devnet::DEFAULT_DIR).join("tenant.key"));
    let identity = Identity::load(&key_path)?;
    let nodes = if args.nodes.is_empty() {
        crate::devnet::api_urls(Path::new(crate::devnet::DEFAULT_DIR))
    } else {
        args.nodes.clone()
    };
    let dir = args.dir.clone().unwrap_or_else(|| key_path.parent().unwrap_or(Path::new(".")).join("gateway"));
    let policy = PlacementPolicy {
        regions: args.regions.iter().cloned().collect(),
        deny_jurisdictions: args.deny_jurisdictions.iter().cloned().collect(),
        ..PlacementPolicy::anywhere(args.code)
    };
    policy.validate()?;
    let (listener, svc, info) = start(args.listen, &nodes, identity, &dir, policy).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print_info(&info, nodes.len());
    }
    serve(listener, svc, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// Prints how to use a gateway.
pub fn print_info(info: &GatewayInfo, nodes: usize) {
    println!("S3 gateway on {} (talking to {nodes} nodes; data is encrypted here)", info.endpoint);
    println!("  AWS_ACCESS_KEY_ID={}", info.access_key_id);
    println!("  AWS_SECRET_ACCESS_KEY={}", info.secret_access_key);
    println!("  aws --endpoint-url {} s3 mb s3://my-bucket", info.endpoint);
}
