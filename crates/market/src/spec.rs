//! What a tenant asks for: a job's module, inputs, limits, price, geofence, redundancy and bid
//! window, checked on its own before anything else looks at it.

use crate::Micro;
use archipel_types::Geofence;
use serde::{Deserialize, Serialize};

/// Most providers one job may run on at once.
pub const MAX_REDUNDANCY: u8 = 5;
/// Most inputs, arguments and environment variables of a job.
pub const MAX_INPUTS: usize = 16;
/// Most arguments.
pub const MAX_ARGS: usize = 64;
/// Most environment variables.
pub const MAX_ENV: usize = 64;
/// Longest argument, variable name or value, in bytes.
pub const MAX_STRING_BYTES: usize = 1024;
/// Shortest and longest bid window (each of the commit and the reveal phase lasts this long).
pub const BID_WINDOW_MS: std::ops::RangeInclusive<u64> = 200..=600_000;
/// Most a job's limits may be: 4 GiB memory and output, a day of CPU or wall time.
pub const MAX_LIMITS: JobLimits =
    JobLimits { memory_bytes: 4 << 30, cpu_ms: 86_400_000, wall_ms: 86_400_000, output_bytes: 4 << 30 };

/// A stored object, by bucket and key, at one version.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct ObjectRef {
    /// The bucket.
    pub bucket: String,
    /// The key.
    pub key: String,
    /// The object's version (its manifest's hash), so that a job runs on exactly what was posted.
    #[serde(with = "hex32")]
    pub version: [u8; 32],
    /// The version's data key, so that the providers can read it: published with the job (the
    /// ledger is public), so it opens this version and nothing else.
    #[serde(with = "hex32")]
    pub data_key: [u8; 32],
}

/// 32 bytes as 64 hex digits in JSON.
pub(crate) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let bad = || D::Error::custom("expected 64 hex digits");
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(out)
    }
}

/// The limits a job runs under on every provider.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct JobLimits {
    /// Linear memory.
    pub memory_bytes: u64,
    /// CPU time.
    pub cpu_ms: u64,
    /// Wall time.
    pub wall_ms: u64,
    /// Output (stdout).
    pub output_bytes: u64,
}

/// A job as posted.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct JobSpec {
    /// The `wasm32-wasip1` module, stored as an object.
    pub module: ObjectRef,
    /// Inputs, concatenated in order as the module's stdin.
    pub inputs: Vec<ObjectRef>,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Limits.
    pub limits: JobLimits,
    /// The most the tenant pays one provider for one run.
    pub max_price_micro: Micro,
    /// Where the job may run (the same geofence as a bucket's).
    pub geofence: Geofence,
    /// On how many providers it runs at once (1–5); with more than one, the majority output wins.
    pub redundancy: u8,
    /// How long bids are collected, and then revealed.
    pub bid_window_ms: u64,
}

/// Why a spec is refused.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum SpecError {
    /// Redundancy out of range.
    #[error("redundancy {0} is out of range: run a job on 1 to {MAX_REDUNDANCY} providers")]
    Redundancy(u8),
    /// No price.
    #[error("max price is 0: offer providers something (e.g. --max-price 1000)")]
    NoPrice,
    /// The escrow would overflow.
    #[error("max price {price} × redundancy {n} overflows: lower the price")]
    PriceOverflow {
        /// The price.
        price: Micro,
        /// The redundancy.
        n: u8,
    },
    /// A limit is zero or too large.
    #[error("limit {name} = {value} is out of range: it must be between 1 and {max}")]
    Limit {
        /// The limit.
        name: &'static str,
        /// Its value.
        value: u64,
        /// The most allowed.
        max: u64,
    },
    /// The bid window is out of range.
    #[error("bid window {0} ms is out of range: use 200 ms to 10 min")]
    BidWindow(u64),
    /// Too many inputs, args or variables, or one too long.
    #[error("{0}")]
    TooMuch(String),
    /// The geofence is malformed.
    #[error("bad geofence: {0}")]
    Geofence(String),
}

impl JobSpec {
    /// The escrow the tenant locks when posting: the max price for each of the N runs.
    pub fn escrow_micro(&self) -> Micro {
        self.max_price_micro.saturating_mul(Micro::from(self.redundancy))
    }

    /// Checks the spec on its own (bounds, not whether any provider can run it).
    pub fn check(&self) -> Result<(), SpecError> {
        if self.redundancy == 0 || self.redundancy > MAX_REDUNDANCY {
            return Err(SpecError::Redundancy(self.redundancy));
        }
        if self.max_price_micro == 0 {
            return Err(SpecError::NoPrice);
        }
        if self.max_price_micro.checked_mul(Micro::from(self.redundancy)).is_none() {
            return Err(SpecError::PriceOverflow { price: self.max_price_micro, n: self.redundancy });
        }
        let l = &self.limits;
        for (name, value, max) in [
            ("memory_bytes", l.memory_bytes, MAX_LIMITS.memory_bytes),
            ("cpu_ms", l.cpu_ms, MAX_LIMITS.cpu_ms),
            ("wall_ms", l.wall_ms, MAX_LIMITS.wall_ms),
            ("output_bytes", l.output_bytes, MAX_LIMITS.output_bytes),
        ] {
            if value == 0 || value > max {
                return Err(SpecError::Limit { name, value, max });
            }
        }
        if !BID_WINDOW_MS.contains(&self.bid_window_ms) {
            return Err(SpecError::BidWindow(self.bid_window_ms));
        }
        let too = |what: String| Err(SpecError::TooMuch(what));
        if self.inputs.len() > MAX_INPUTS {
            return too(format!("{} inputs: at most {MAX_INPUTS}", self.inputs.len()));
        }
        if self.args.len() > MAX_ARGS || self.env.len() > MAX_ENV {
            return too(format!("at most {MAX_ARGS} arguments and {MAX_ENV} environment variables"));
        }
        let strings = self.args.iter().chain(self.env.iter().flat_map(|(k, v)| [k, v]));
        if strings.clone().any(|s| s.len() > MAX_STRING_BYTES || s.contains('\0')) {
            return too(format!("arguments and variables are at most {MAX_STRING_BYTES} bytes, without NUL"));
        }
        if self.env.iter().any(|(k, _)| k.is_empty() || k.contains('=')) {
            return too("an environment variable's name is empty or holds '='".into());
        }
        for o in std::iter::once(&self.module).chain(&self.inputs) {
            if o.bucket.is_empty() || o.key.is_empty() || o.bucket.len() > 63 || o.key.len() > MAX_STRING_BYTES {
                return too(format!("object {:?}/{:?} is no bucket and key", o.bucket, o.key));
            }
        }
        self.geofence.validate().map_err(|e| SpecError::Geofence(e.to_string()))
    }
}
