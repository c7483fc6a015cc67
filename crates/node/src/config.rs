//! The node's TOML configuration, and how flags and environment variables override it.
//!
//! Precedence, highest first: command-line flag, environment variable (`ARCHIPEL_*`, resolved by
//! the CLI), config file, default. Relative paths in the file are relative to the file's directory,
//! so a node directory can be moved as a whole.

use archipel_types::{ByteSize, CountryCode, Region, Roles};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

/// The documented template written by `archipel node init` (values are filled in).
pub const TEMPLATE_HEADER: &str = "\
# archipel node configuration.
# Every field can also be set with a flag of `archipel node run` (e.g. --region) or an environment
# variable (e.g. ARCHIPEL_REGION); flags win over variables, variables over this file.
# Relative paths are relative to this file's directory.
";

/// Problems loading a config, each naming the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("config file {0} does not exist: create it with `archipel node init`")]
    Missing(PathBuf),
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or a field value is wrong.
    #[error("config file {path} is malformed: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, including the field.
        message: String,
    },
    /// Writing the config failed.
    #[error("cannot write config file {path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Peer-to-peer settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct P2pConfig {
    /// Address to listen on (e.g. `0.0.0.0:23100`).
    pub listen: SocketAddr,
    /// Address other nodes dial (defaults to `listen`; must not be 0.0.0.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<SocketAddr>,
    /// Source IP of outgoing connections if it differs from the public address (NAT; loopback
    /// devnets, where the kernel sends from 127.0.0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_ip: Option<IpAddr>,
    /// Accept peers on private/loopback addresses (true for devnets and LANs).
    #[serde(default = "default_true")]
    pub allow_private_ips: bool,
}

/// HTTP API settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on (e.g. `0.0.0.0:23101`).
    pub listen: SocketAddr,
    /// Address clients use (defaults to `listen`; must not be 0.0.0.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<SocketAddr>,
    /// Limits that keep API callers from starving consensus (section `[api.limits]`).
    #[serde(default)]
    pub limits: ApiLimits,
}

/// How much of the node the HTTP API may use. Every value must be at least 1; a refused call
/// gets 429 with `Retry-After` and a JSON error naming the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiLimits {
    /// Worker threads of the API's own runtime (consensus runs on another one).
    pub worker_threads: NonZeroU32,
    /// Requests handled at once, over all callers (a streamed export counts until it ends).
    pub max_concurrent_requests: NonZeroU32,
    /// Public reads (`GET` without a request signature) per second from one source IP address.
    pub reads_per_second_per_ip: NonZeroU32,
    /// Public reads one source IP address may make in a burst.
    pub read_burst_per_ip: NonZeroU32,
    /// Signed calls per second from one key (checked after the signature).
    pub signed_per_second_per_key: NonZeroU32,
    /// Signed calls one key may make in a burst.
    pub signed_burst_per_key: NonZeroU32,
    /// Shard and manifest transfers (the data plane) per second from one key: a 1 GiB PUT at
    /// 4+2 is 128 shard transfers to each holder, made as fast as the disks allow.
    pub data_calls_per_second_per_key: NonZeroU32,
    /// Data-plane transfers one key may make in a burst.
    pub data_burst_per_key: NonZeroU32,
    /// Transactions per second one source IP address may submit (`POST /v1/tx` counts one,
    /// `POST /v1/txs` one per transaction in the batch, whether or not they decode).
    pub txs_per_second_per_ip: NonZeroU32,
    /// Transactions one source IP address may submit in a burst (a batch above it waits for a
    /// full bucket, then its excess is waited for before the next submission).
    pub tx_burst_per_ip: NonZeroU32,
    /// Transactions per second this node admits from busy addresses, over all of them (an
    /// address that submitted little lately is never held back): a flood from many addresses is
    /// spread over time instead of taking every core at once (see `fair_queue`).
    pub admission_txs_per_second: NonZeroU32,
    /// Transactions of busy addresses admitted in a burst before the pace above applies.
    pub admission_burst: NonZeroU32,
    /// KiB per second all of this node's ledger exports together may stream (a token bucket with
    /// a burst of one second's worth): however many run, exports cost the node a bounded share
    /// of its CPU and disk.
    pub export_kib_per_second: NonZeroU32,
}

impl Default for ApiLimits {
    fn default() -> Self {
        let n = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
        ApiLimits {
            worker_threads: n(2),
            max_concurrent_requests: n(256),
            reads_per_second_per_ip: n(100),
            read_burst_per_ip: n(200),
            signed_per_second_per_key: n(20),
            signed_burst_per_key: n(40),
            // 1,000 transfers of 2 MiB shards is 2 GB/s, beyond any disk here: never binds an
            // honest client; a runaway one is held to it (the 16 transfer slots bound memory).
            data_calls_per_second_per_key: n(1_000),
            data_burst_per_key: n(2_000),
            // The ledger's measured capacity (~5,000 transfers/s for the whole network): one
            // source may offer a node as much as the ledger can take, never more, which also caps
            // the signatures it makes the node verify; the burst is ten full batches.
            txs_per_second_per_ip: n(5_000),
            tx_burst_per_ip: n(10_000),
            // Four times the ledger's measured capacity: never binds honest load; a flood of
            // 25,000 transactions on one node takes about a second instead of 0.2 s of both cores.
            admission_txs_per_second: n(20_000),
            admission_burst: n(2_000),
            // 16 MiB/s: a 1 GB chain exports in about a minute. Measured in the ledger bench's
            // exports step (4 nodes on 2 cores, 50 concurrent exports): at 64 MiB/s per node
            // transfers' p99 rose 1.36x, at 16 MiB/s 1.11x (goal <= 1.2x).
            export_kib_per_second: n(16 * 1024),
        }
    }
}

impl ApiLimits {
    /// How the admission queue paces busy addresses.
    pub fn admission_pace(&self) -> crate::fair_queue::Pace {
        crate::fair_queue::Pace {
            light: crate::fair_queue::LIGHT_USE,
            per_second: u64::from(self.admission_txs_per_second.get()),
            burst: u64::from(self.admission_burst.get()),
        }
    }
}

fn default_true() -> bool {
    true
}

/// A node's configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Human label for tables and logs.
    pub name: String,
    /// Path of the node's Ed25519 key file.
    pub key_file: PathBuf,
    /// Directory for the node's state.
    pub data_dir: PathBuf,
    /// Path of the network's genesis file.
    pub genesis_file: PathBuf,
    /// Region the node is in (e.g. `eu-de`).
    pub region: Region,
    /// Country the hardware is in (ISO code).
    pub country: CountryCode,
    /// Who operates the node.
    pub operator: String,
    /// Jurisdiction of the operator (ISO code).
    pub operator_jurisdiction: CountryCode,
    /// Storage capacity offered (e.g. `50GiB`).
    pub capacity: ByteSize,
    /// Roles (validator, storage, compute, gateway).
    #[serde(default)]
    pub roles: Roles,
    /// P2P settings.
    pub p2p: P2pConfig,
    /// API settings.
    pub api: ApiConfig,
    /// Ledger settings (block retention).
    #[serde(default, skip_serializing_if = "LedgerConfig::is_default")]
    pub ledger: LedgerConfig,
    /// What a compute provider offers (price floor, slots, memory and CPU per job).
    #[serde(default, skip_serializing_if = "crate::provider::ComputeConfig::is_default")]
    pub compute: crate::provider::ComputeConfig,
}

/// Fewest blocks a pruning node keeps: what a peer behind by less than `--join`'s threshold
/// ([`crate::join::REJOIN_BEHIND_BLOCKS`]) needs to catch up by blocks.
pub const MIN_RETAIN_BLOCKS: u64 = crate::join::REJOIN_BEHIND_BLOCKS;

/// `[ledger]` in `node.toml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Keep only this many finalized blocks below the head (at least [`MIN_RETAIN_BLOCKS`]);
    /// absent, the node keeps every block (an archive node, which can export the whole chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_blocks: Option<u64>,
}

impl LedgerConfig {
    fn is_default(&self) -> bool {
        *self == LedgerConfig::default()
    }
}

/// Values that override the file (from flags or environment variables); `None` keeps the file's.
#[derive(Clone, Debug, Default)]
pub struct ConfigOverrides {
    /// See [`NodeConfig::name`].
    pub name: Option<String>,
    /// See [`NodeConfig::key_file`].
    pub key_file: Option<PathBuf>,
    /// See [`NodeConfig::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`NodeConfig::genesis_file`].
    pub genesis_file: Option<PathBuf>,
    /// See [`NodeConfig::region`].
    pub region: Option<Region>,
    /// See [`NodeConfig::country`].
    pub country: Option<CountryCode>,
    /// See [`NodeConfig::operator`].
    pub operator: Option<String>,
    /// See [`NodeConfig::operator_jurisdiction`].
    pub operator_jurisdiction: Option<CountryCode>,
    /// See [`NodeConfig::capacity`].
    pub capacity: Option<ByteSize>,
    /// See [`NodeConfig::roles`].
    pub roles: Option<Roles>,
    /// See [`P2pConfig::listen`].
    pub p2p_listen: Option<SocketAddr>,
    /// See [`P2pConfig::public`].
    pub p2p_public: Option<SocketAddr>,
    /// See [`P2pConfig::egress_ip`].
    pub p2p_egress_ip: Option<IpAddr>,
    /// See [`ApiConfig::listen`].
    pub api_listen: Option<SocketAddr>,
    /// See [`ApiConfig::public`].
    pub api_public: Option<SocketAddr>,
}

impl NodeConfig {
    /// Reads and parses a config file, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ConfigError::Missing(path.to_path_buf()),
            _ => ConfigError::Unreadable { path: path.to_path_buf(), source },
        })?;
        Self::parse(&text, path)
    }

    /// Parses the contents of the config file at `path` (named in errors; relative paths are
    /// resolved against its directory): what [`NodeConfig::load`] does once the file is read.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Malformed {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        if let Some(n) = cfg.ledger.retain_blocks
            && n < MIN_RETAIN_BLOCKS
        {
            return Err(ConfigError::Malformed {
                path: path.to_path_buf(),
                message: format!(
                    "ledger.retain_blocks = {n} is below {MIN_RETAIN_BLOCKS}: peers catching up need the recent blocks (remove the setting to keep every block)"
                ),
            });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.key_file, &mut cfg.data_dir, &mut cfg.genesis_file] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Applies flag/environment overrides.
    pub fn apply(&mut self, o: ConfigOverrides) {
        macro_rules! set {
            ($($field:ident).+ <- $value:expr) => {
                if let Some(v) = $value {
                    self.$($field).+ = v;
                }
            };
        }
        set!(name <- o.name);
        set!(key_file <- o.key_file);
        set!(data_dir <- o.data_dir);
        set!(genesis_file <- o.genesis_file);
        set!(region <- o.region);
        set!(country <- o.country);
        set!(operator <- o.operator);
        set!(operator_jurisdiction <- o.operator_jurisdiction);
        set!(capacity <- o.capacity);
        set!(roles <- o.roles);
        set!(p2p.listen <- o.p2p_listen);
        set!(api.listen <- o.api_listen);
        if o.p2p_public.is_some() {
            self.p2p.public = o.p2p_public;
        }
        if o.p2p_egress_ip.is_some() {
            self.p2p.egress_ip = o.p2p_egress_ip;
        }
        if o.api_public.is_some() {
            self.api.public = o.api_public;
        }
    }

    /// Address peers dial.
    pub fn p2p_public(&self) -> SocketAddr {
        self.p2p.public.unwrap_or(self.p2p.listen)
    }

    /// Address API clients use.
    pub fn api_public(&self) -> SocketAddr {
        self.api.public.unwrap_or(self.api.listen)
    }

    /// Renders the config as a commented TOML file.
    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string_pretty(self).map(|body| format!("{TEMPLATE_HEADER}\n{body}")).map_err(|e| e.to_string())
    }

    /// Writes the config to a new file, never overwriting an existing one.
    pub fn write_new(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |message: String| ConfigError::Write { path: path.to_path_buf(), message };
        let text = self.to_toml().map_err(err)?;
        crate::files::write_new(path, text.as_bytes()).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodeConfig {
        NodeConfig {
            ledger: Default::default(),
            compute: Default::default(),
            name: "n01".into(),
            key_file: "node.key".into(),
            data_dir: "data".into(),
            genesis_file: "../genesis.json".into(),
            region: "eu-de".parse().unwrap(),
            country: "DE".parse().unwrap(),
            operator: "acme".into(),
            operator_jurisdiction: "DE".parse().unwrap(),
            capacity: "50GiB".parse().unwrap(),
            roles: "storage".parse().unwrap(),
            p2p: P2pConfig {
                listen: "127.0.0.2:23100".parse().unwrap(),
                public: None,
                egress_ip: None,
                allow_private_ips: true,
            },
            api: ApiConfig { listen: "127.0.0.2:23101".parse().unwrap(), public: None, limits: ApiLimits::default() },
        }
    }

    #[test]
    fn round_trips_resolves_paths_and_applies_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n01/node.toml");
        sample().write_new(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# archipel node configuration"));
        let mut cfg = NodeConfig::load(&path).unwrap();
        assert_eq!(cfg.key_file, dir.path().join("n01/node.key"));
        assert_eq!(cfg.capacity, "50GiB".parse().unwrap());
        cfg.apply(ConfigOverrides {
            region: Some("eu-fr".parse().unwrap()),
            api_public: Some("10.0.0.1:80".parse().unwrap()),
            ..Default::default()
        });
        assert_eq!(cfg.region.as_str(), "eu-fr");
        assert_eq!(cfg.api_public(), "10.0.0.1:80".parse().unwrap());
        assert_eq!(cfg.p2p_public(), "127.0.0.2:23100".parse().unwrap());
        assert!(sample().write_new(&path).unwrap_err().to_string().contains("refusing to overwrite"));
    }

    #[test]
    fn malformed_files_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let good = sample().to_toml().unwrap();
        std::fs::write(&path, good.replace("region = \"eu-de\"", "region = \"EU DE\"")).unwrap();
        let err = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("node.toml") && err.contains("region"), "{err}");
        std::fs::write(&path, good.replace("capacity = \"50GiB\"", "capacity = \"lots\"")).unwrap();
        let err = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("capacity"), "{err}");
        std::fs::write(&path, format!("{good}\nbogus = 1\n")).unwrap();
        let err = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        std::fs::write(&path, "name = [").unwrap();
        assert!(matches!(NodeConfig::load(&path), Err(ConfigError::Malformed { .. })));
        assert!(matches!(NodeConfig::load(&dir.path().join("none.toml")), Err(ConfigError::Missing(_))));
    }

    #[test]
    fn api_limits_default_when_absent_and_zero_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let good = sample().to_toml().unwrap();
        assert!(good.contains("[api.limits]") && good.contains("reads_per_second_per_ip = 100"), "{good}");
        let without: String = good.lines().take_while(|l| *l != "[api.limits]").collect::<Vec<_>>().join("\n");
        std::fs::write(&path, &without).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap().api.limits, ApiLimits::default(), "configs written before limits");
        std::fs::write(&path, format!("{without}\n[api.limits]\nreads_per_second_per_ip = 5\n")).unwrap();
        let cfg = NodeConfig::load(&path).unwrap();
        assert_eq!(cfg.api.limits.reads_per_second_per_ip.get(), 5);
        assert_eq!(cfg.api.limits.read_burst_per_ip, ApiLimits::default().read_burst_per_ip, "others keep defaults");
        std::fs::write(&path, format!("{without}\n[api.limits]\nmax_concurrent_requests = 0\n")).unwrap();
        let err = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("max_concurrent_requests") && err.contains("nonzero"), "{err}");
    }

    #[test]
    fn block_retention_is_optional_and_never_below_what_peers_need() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let good = sample().to_toml().unwrap();
        assert!(!good.contains("[ledger]"), "an archive node's config says nothing: {good}");
        std::fs::write(&path, &good).unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap().ledger.retain_blocks, None);
        std::fs::write(
            &path,
            format!(
                "{good}
[ledger]
retain_blocks = 50000
"
            ),
        )
        .unwrap();
        assert_eq!(NodeConfig::load(&path).unwrap().ledger.retain_blocks, Some(50_000));
        std::fs::write(
            &path,
            format!(
                "{good}
[ledger]
retain_blocks = 10
"
            ),
        )
        .unwrap();
        let err = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("retain_blocks = 10") && err.contains(&MIN_RETAIN_BLOCKS.to_string()), "{err}");
    }
}
