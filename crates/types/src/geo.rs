//! Where a node is: its region (a failure domain such as `eu-de`) and ISO country codes, used both
//! for the country a node sits in and for the jurisdiction its operator answers to.

use crate::TypeError;
use std::fmt;
use std::str::FromStr;

/// A region name: the unit of geographic failure domains and geofences (`eu-de`, `eu-fr`, `us-east`).
///
/// Form: a two-letter area, a dash, then lowercase letters, digits and dashes; at most 32 bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Region(String);

impl Region {
    /// Longest accepted region name in bytes.
    pub const MAX_LEN: usize = 32;

    /// The region name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The two-letter area prefix, e.g. `eu` for `eu-de`.
    pub fn area(&self) -> &str {
        &self.0[..2]
    }
}

impl FromStr for Region {
    type Err = TypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = b.len() >= 4
            && b.len() <= Self::MAX_LEN
            && b[0].is_ascii_lowercase()
            && b[1].is_ascii_lowercase()
            && b[2] == b'-'
            && b[3..].iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && !s.ends_with('-');
        if ok { Ok(Self(s.to_string())) } else { Err(TypeError::Region(s.to_string())) }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An ISO 3166-1 alpha-2 country code (`DE`, `FR`, `US`), stored upper-case.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    /// The two letters.
    pub fn as_str(&self) -> &str {
        // Both bytes are ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl FromStr for CountryCode {
    type Err = TypeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        if b.len() == 2 && b.iter().all(u8::is_ascii_alphabetic) {
            Ok(Self([b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()]))
        } else {
            Err(TypeError::Country(s.to_string()))
        }
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CountryCode({})", self.as_str())
    }
}

serde_via_str!(Region);
serde_via_str!(CountryCode);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_validated() {
        for ok in ["eu-de", "us-east", "ap-south-1", "eu-de2"] {
            assert_eq!(ok.parse::<Region>().map(|r| r.to_string()), Ok(ok.to_string()));
        }
        for bad in ["", "eu", "EU-DE", "e-de", "eu_de", "eu-", "eu-de-", "eu-dé"] {
            assert!(bad.parse::<Region>().is_err(), "{bad:?} accepted");
        }
        assert_eq!("eu-de".parse::<Region>().map(|r| r.area().to_string()), Ok("eu".into()));
    }

    #[test]
    fn country_codes_are_two_letters_upper_cased() {
        assert_eq!("de".parse::<CountryCode>().map(|c| c.to_string()), Ok("DE".into()));
        for bad in ["", "D", "DEU", "D1", "ü"] {
            assert!(bad.parse::<CountryCode>().is_err(), "{bad:?} accepted");
        }
    }
}
