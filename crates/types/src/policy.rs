//! A bucket's placement policy: the erasure code its objects use, where their shards may live (the
//! geofence) and how widely they must be spread over failure domains.
//!
//! The policy is plain data. The `placement` crate decides which nodes satisfy it, and the ledger
//! checks every placement and every repair against it, so the rules below are the contract a
//! tenant relies on: "EU only, no US-operated nodes" is `allow = ["eu"]`, `deny_jurisdictions =
//! ["US"]`.

use crate::{CountryCode, Region, TypeError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// A Reed–Solomon code: `data` shards carry the segment, `parity` more let it survive the loss of
/// any `parity` of them. Shown as `4+2`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ErasureCode {
    /// Data shards (k), 1 to [`ErasureCode::MAX_DATA`].
    pub data: u8,
    /// Parity shards (m), 1 to [`ErasureCode::MAX_PARITY`].
    pub parity: u8,
}

impl ErasureCode {
    /// Most data shards of a segment.
    pub const MAX_DATA: u8 = 32;
    /// Most parity shards of a segment.
    pub const MAX_PARITY: u8 = 16;
    /// The devnet's default code.
    pub const DEFAULT: ErasureCode = ErasureCode { data: 4, parity: 2 };

    /// A code, checked against the bounds.
    pub fn new(data: u8, parity: u8) -> Result<Self, TypeError> {
        let code = ErasureCode { data, parity };
        code.validate()?;
        Ok(code)
    }

    /// Checks `1 <= data <= 32` and `1 <= parity <= 16`.
    pub fn validate(&self) -> Result<(), TypeError> {
        if (1..=Self::MAX_DATA).contains(&self.data) && (1..=Self::MAX_PARITY).contains(&self.parity) {
            Ok(())
        } else {
            Err(TypeError::Code(self.to_string()))
        }
    }

    /// Shards per segment (k + m): also the number of distinct nodes a segment needs.
    pub fn total(&self) -> usize {
        usize::from(self.data) + usize::from(self.parity)
    }

    /// Bytes in each shard of a segment of `segment_len` bytes: the segment split k ways, rounded
    /// up to [`SHARD_ALIGN`] bytes (reed-solomon-simd works in 64-byte blocks). The one rule the
    /// erasure coder, the ledger's capacity accounting and the shard store all follow.
    pub fn shard_bytes(&self, segment_len: u64) -> u64 {
        segment_len.div_ceil(u64::from(self.data.max(1))).div_ceil(SHARD_ALIGN).max(1) * SHARD_ALIGN
    }
}

/// Shard sizes are multiples of this many bytes.
pub const SHARD_ALIGN: u64 = 64;

impl fmt::Display for ErasureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.data, self.parity)
    }
}

impl FromStr for ErasureCode {
    type Err = TypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TypeError::Code(s.to_string());
        let (k, m) = s.trim().split_once('+').ok_or_else(bad)?;
        ErasureCode::new(k.trim().parse().map_err(|_| bad())?, m.trim().parse().map_err(|_| bad())?)
    }
}

/// One entry of a geofence's allowed places: a whole area (`eu`: every `eu-*` region) or one
/// region (`eu-de`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum RegionMatch {
    /// Every region whose two-letter area is this one.
    Area(String),
    /// Exactly this region.
    Region(Region),
}

impl RegionMatch {
    /// Whether `region` is inside this entry.
    pub fn matches(&self, region: &Region) -> bool {
        match self {
            RegionMatch::Area(area) => region.area() == area,
            RegionMatch::Region(r) => r == region,
        }
    }
}

impl fmt::Display for RegionMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionMatch::Area(a) => f.write_str(a),
            RegionMatch::Region(r) => write!(f, "{r}"),
        }
    }
}

impl FromStr for RegionMatch {
    type Err = TypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() == 2 && s.bytes().all(|b| b.is_ascii_lowercase()) {
            Ok(RegionMatch::Area(s.to_string()))
        } else {
            s.parse().map(RegionMatch::Region)
        }
    }
}

/// Most entries in each list of a policy.
pub const MAX_POLICY_ENTRIES: usize = 64;

/// Where a bucket's shards may live and how widely they are spread.
///
/// A node may hold a shard only if it is inside **every** non-empty allow list (its region matches
/// one entry of `regions`, its country is one of `countries`) and its operator's jurisdiction is not
/// in `deny_jurisdictions`. Each segment's k+m shards go to k+m distinct nodes covering at least
/// `min_regions` regions and `min_operators` operators.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PlacementPolicy {
    /// The erasure code of every segment.
    pub code: ErasureCode,
    /// Allowed regions or areas; empty allows every region.
    #[serde(default)]
    pub regions: BTreeSet<RegionMatch>,
    /// Allowed countries (where the hardware is); empty allows every country.
    #[serde(default)]
    pub countries: BTreeSet<CountryCode>,
    /// Operator jurisdictions refused (e.g. `US`: no node run by a US operator, wherever it is).
    #[serde(default)]
    pub deny_jurisdictions: BTreeSet<CountryCode>,
    /// Fewest distinct regions one segment's shards must cover.
    pub min_regions: u8,
    /// Fewest distinct operators one segment's shards must cover.
    pub min_operators: u8,
}

impl PlacementPolicy {
    /// A policy with only a code: anywhere, one region and one operator at least.
    pub fn anywhere(code: ErasureCode) -> Self {
        PlacementPolicy {
            code,
            regions: BTreeSet::new(),
            countries: BTreeSet::new(),
            deny_jurisdictions: BTreeSet::new(),
            min_regions: 1,
            min_operators: 1,
        }
    }

    /// Checks what a policy can be on its own (live nodes are the `placement` crate's business).
    pub fn validate(&self) -> Result<(), TypeError> {
        self.code.validate()?;
        let bad = |m: String| Err(TypeError::Policy(m));
        let total = self.code.total();
        self.geofence().validate()?;
        if self.min_regions == 0 || self.min_operators == 0 {
            return bad("min_regions and min_operators are at least 1".into());
        }
        if usize::from(self.min_regions) > total || usize::from(self.min_operators) > total {
            return bad(format!(
                "a segment of code {} has {total} shards, so it cannot cover {} regions or {} operators: \
                 lower them to {total} at most",
                self.code, self.min_regions, self.min_operators
            ));
        }
        let exact: Vec<&Region> =
            self.regions.iter().filter_map(|r| if let RegionMatch::Region(r) = r { Some(r) } else { None }).collect();
        if !exact.is_empty() && usize::from(self.min_regions) > exact.len() && exact.len() == self.regions.len() {
            return bad(format!(
                "min_regions is {} but only {} regions are allowed ({})",
                self.min_regions,
                exact.len(),
                exact.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(())
    }

    /// Whether a node at `region` in `country`, run under `jurisdiction`, is inside the geofence.
    pub fn allows(&self, region: &Region, country: CountryCode, jurisdiction: CountryCode) -> bool {
        (self.regions.is_empty() || self.regions.iter().any(|m| m.matches(region)))
            && (self.countries.is_empty() || self.countries.contains(&country))
            && !self.deny_jurisdictions.contains(&jurisdiction)
    }

    /// The geofence in words, for error messages: `in regions [eu] outside US jurisdiction`.
    pub fn describe_fence(&self) -> String {
        let list = |items: Vec<String>| items.join(", ");
        let mut parts = vec![];
        if !self.regions.is_empty() {
            parts.push(format!("in regions [{}]", list(self.regions.iter().map(ToString::to_string).collect())));
        }
        if !self.countries.is_empty() {
            parts.push(format!("in countries [{}]", list(self.countries.iter().map(ToString::to_string).collect())));
        }
        if !self.deny_jurisdictions.is_empty() {
            parts.push(format!(
                "outside {} jurisdiction",
                self.deny_jurisdictions.iter().map(ToString::to_string).collect::<Vec<_>>().join("/")
            ));
        }
        if parts.is_empty() { "anywhere".into() } else { parts.join(" ") }
    }

    /// The exact bytes hashed or signed for this policy (versioned, field order fixed, lists in
    /// their sorted order).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(b"archipel/placement-policy/v1");
        out.extend_from_slice(&[self.code.data, self.code.parity, self.min_regions, self.min_operators]);
        out.push(self.regions.len() as u8);
        for r in &self.regions {
            let s = r.to_string();
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
        for set in [&self.countries, &self.deny_jurisdictions] {
            out.push(set.len() as u8);
            for c in set {
                out.extend_from_slice(c.as_str().as_bytes());
            }
        }
        out
    }
}

/// Where something may be: the geofence part of a bucket's [`PlacementPolicy`], and the whole
/// of a job's (the same fields, the same rule: inside every non-empty allow list, outside every
/// refused jurisdiction).
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Geofence {
    /// Allowed regions or areas; empty allows every region.
    #[serde(default)]
    pub regions: BTreeSet<RegionMatch>,
    /// Allowed countries; empty allows every country.
    #[serde(default)]
    pub countries: BTreeSet<CountryCode>,
    /// Operator jurisdictions refused.
    #[serde(default)]
    pub deny_jurisdictions: BTreeSet<CountryCode>,
}

impl Geofence {
    /// Checks the lists' lengths.
    pub fn validate(&self) -> Result<(), TypeError> {
        if self.regions.len() > MAX_POLICY_ENTRIES
            || self.countries.len() > MAX_POLICY_ENTRIES
            || self.deny_jurisdictions.len() > MAX_POLICY_ENTRIES
        {
            return Err(TypeError::Policy(format!("each list holds at most {MAX_POLICY_ENTRIES} entries")));
        }
        Ok(())
    }

    /// Whether a node at `region` in `country`, run under `jurisdiction`, is inside.
    pub fn allows(&self, region: &Region, country: CountryCode, jurisdiction: CountryCode) -> bool {
        self.as_policy().allows(region, country, jurisdiction)
    }

    /// The geofence in words: `in regions [eu] outside US jurisdiction`, or `anywhere`.
    pub fn describe(&self) -> String {
        self.as_policy().describe_fence()
    }

    fn as_policy(&self) -> PlacementPolicy {
        PlacementPolicy {
            regions: self.regions.clone(),
            countries: self.countries.clone(),
            deny_jurisdictions: self.deny_jurisdictions.clone(),
            ..PlacementPolicy::anywhere(ErasureCode::DEFAULT)
        }
    }
}

impl PlacementPolicy {
    /// This policy's geofence.
    pub fn geofence(&self) -> Geofence {
        Geofence {
            regions: self.regions.clone(),
            countries: self.countries.clone(),
            deny_jurisdictions: self.deny_jurisdictions.clone(),
        }
    }
}

serde_via_str!(ErasureCode);
serde_via_str!(RegionMatch);

#[cfg(test)]
mod tests {
    use super::*;

    fn eu_no_us() -> PlacementPolicy {
        PlacementPolicy {
            regions: ["eu".parse().unwrap()].into(),
            deny_jurisdictions: ["US".parse().unwrap()].into(),
            min_regions: 2,
            min_operators: 2,
            ..PlacementPolicy::anywhere(ErasureCode::DEFAULT)
        }
    }

    #[test]
    fn codes_parse_and_are_bounded() {
        assert_eq!("4+2".parse::<ErasureCode>(), Ok(ErasureCode { data: 4, parity: 2 }));
        assert_eq!("32+16".parse::<ErasureCode>().map(|c| c.total()), Ok(48));
        for bad in ["", "4", "4+0", "0+2", "33+1", "4+17", "a+b", "4+2+1", "-1+2"] {
            assert!(bad.parse::<ErasureCode>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_geofence_needs_every_list() {
        let p = eu_no_us();
        let de: Region = "eu-de".parse().unwrap();
        let us: Region = "us-east".parse().unwrap();
        let c = |s: &str| s.parse::<CountryCode>().unwrap();
        assert!(p.allows(&de, c("DE"), c("DE")));
        assert!(!p.allows(&de, c("DE"), c("US")), "a US operator in Germany is outside");
        assert!(!p.allows(&us, c("US"), c("DE")), "a German operator in us-east is outside");
        let mut only_fr = p.clone();
        only_fr.countries = [c("FR")].into();
        assert!(!only_fr.allows(&de, c("DE"), c("DE")));
        assert!(PlacementPolicy::anywhere(ErasureCode::DEFAULT).allows(&us, c("US"), c("US")));
        assert_eq!(p.describe_fence(), "in regions [eu] outside US jurisdiction");
    }

    #[test]
    fn impossible_policies_are_refused_with_the_numbers() {
        let mut p = eu_no_us();
        p.min_regions = 7;
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("6 shards") && err.contains("7 regions"), "{err}");
        let mut p = eu_no_us();
        p.regions = ["eu-de".parse().unwrap()].into();
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("only 1 regions are allowed (eu-de)"), "{err}");
        p.min_operators = 0;
        assert!(p.validate().is_err());
        assert_eq!(eu_no_us().validate(), Ok(()));
    }

    #[test]
    fn policies_round_trip_through_json_and_bytes_differ_per_field() {
        let p = eu_no_us();
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("\"code\":\"4+2\"") && json.contains("\"regions\":[\"eu\"]"), "{json}");
        assert_eq!(serde_json::from_str::<PlacementPolicy>(&json).unwrap(), p);
        let mut variants = vec![p.clone()];
        let mut v = p.clone();
        v.code.parity = 3;
        variants.push(v);
        let mut v = p.clone();
        v.min_regions = 1;
        variants.push(v);
        let mut v = p.clone();
        v.deny_jurisdictions.clear();
        variants.push(v);
        let mut v = p.clone();
        v.countries.insert("US".parse().unwrap());
        variants.push(v);
        let mut v = p.clone();
        v.regions.insert("eu-de".parse().unwrap());
        variants.push(v);
        let bytes: BTreeSet<Vec<u8>> = variants.iter().map(PlacementPolicy::canonical_bytes).collect();
        assert_eq!(bytes.len(), variants.len());
    }
}
