//! Byte sizes with human units (`50GiB`, `500MB`), as used for node capacity.

use crate::TypeError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A number of bytes. Parses `123`, `10KB`, `50GiB`, `1.5TB` (decimal and binary units).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct ByteSize(pub u64);

const UNITS: &[(&str, u64)] = &[
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("pib", 1 << 50),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("pb", 1_000_000_000_000_000),
    ("k", 1 << 10),
    ("m", 1 << 20),
    ("g", 1 << 30),
    ("t", 1 << 40),
    ("b", 1),
];

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// The size in the largest unit that divides it exactly (`50GiB`, `500MB`, `1537B`): what
    /// files and descriptors store, because [`Display`](fmt::Display) rounds for people
    /// (`1.5KiB`) and a rounded size would not read back as the value that was signed.
    pub fn exact(self) -> String {
        const EXACT: &[(&str, u64)] = &[
            ("PiB", 1 << 50),
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("PB", 1_000_000_000_000_000),
            ("TB", 1_000_000_000_000),
            ("GB", 1_000_000_000),
            ("MB", 1_000_000),
            ("KB", 1_000),
        ];
        match EXACT.iter().find(|(_, m)| self.0 >= *m && self.0.is_multiple_of(*m)) {
            Some((unit, m)) => format!("{}{unit}", self.0 / m),
            None => format!("{}B", self.0),
        }
    }
}

impl FromStr for ByteSize {
    type Err = TypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || TypeError::Size(s.to_string());
        let t = s.trim().to_ascii_lowercase();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let mult = if unit.is_empty() {
            1
        } else {
            UNITS.iter().find(|(u, _)| *u == unit).map(|(_, m)| *m).ok_or_else(err)?
        };
        if num.is_empty() {
            return Err(err());
        }
        if let Ok(whole) = num.parse::<u64>() {
            return whole.checked_mul(mult).map(ByteSize).ok_or_else(err);
        }
        let f: f64 = num.parse().map_err(|_| err())?;
        let v = f * mult as f64;
        if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
            return Err(err());
        }
        Ok(ByteSize(v.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const BIN: &[(&str, u64)] =
            &[("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (unit, m) in BIN {
            if self.0 >= *m && self.0.is_multiple_of(*m) {
                return write!(f, "{}{unit}", self.0 / m);
            }
        }
        for (unit, m) in BIN {
            if self.0 >= *m {
                return write!(f, "{:.1}{unit}", self.0 as f64 / *m as f64);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.exact())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_common_units() {
        let p = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(p("50GiB"), Ok(50 << 30));
        assert_eq!(p("500MB"), Ok(500_000_000));
        assert_eq!(p("1.5 KiB"), Ok(1536));
        assert_eq!(p("42"), Ok(42));
        for bad in ["", "GiB", "12XB", "-1GiB", "99999999999PiB"] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(ByteSize(50 << 30).to_string(), "50GiB");
        assert_eq!(ByteSize(1536 + 1).to_string(), "1.5KiB");
    }

    #[test]
    fn serialization_is_exact_where_display_rounds() {
        // Found by fuzzing: `--capacity 500MB` was stored as "476.8MiB", which reads back as
        // 499,961,037 bytes, so a descriptor signed over 500,000,000 failed on every other node.
        for (size, stored) in [(500_000_000, "500MB"), (1537, "1537B"), (50 << 30, "50GiB"), (0, "0B")] {
            let json = serde_json::to_string(&ByteSize(size)).unwrap();
            assert_eq!(json, format!("\"{stored}\""));
            assert_eq!(serde_json::from_str::<ByteSize>(&json).unwrap(), ByteSize(size));
        }
    }

    proptest! {
        #[test]
        fn serialization_round_trips(n in any::<u64>()) {
            let json = serde_json::to_string(&ByteSize(n)).unwrap();
            prop_assert_eq!(serde_json::from_str::<ByteSize>(&json).unwrap(), ByteSize(n));
        }

        #[test]
        fn display_of_whole_binary_units_round_trips(n in 0u64..1_000_000, shift in prop::sample::select(vec![10u32, 20, 30, 40])) {
            let b = ByteSize(n << shift);
            prop_assert_eq!(b.to_string().parse::<ByteSize>(), Ok(b));
        }
    }
}
