//! Admission control for the HTTP API: token buckets per source address (public reads, and
//! transactions submitted, weighted by their count) and per key (signed calls), so that one caller
//! cannot take the CPU, disk or chain lock that consensus needs. The caps on requests in flight
//! (global and per source address) are in [`crate::api`].
//!
//! Time is an argument, so the arithmetic is tested without sleeping.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most callers tracked by one limiter. Beyond it, buckets that have refilled are forgotten
/// first (a full bucket is what a new caller gets anyway), then the least recently used eighth.
pub const MAX_TRACKED: usize = 10_000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A token bucket per caller: `rate` tokens per second, at most `burst` saved up; a call takes
/// one token, or its weight ([`RateLimiter::take_n`]).
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate_per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    /// A limiter of `rate` calls per second with bursts of up to `burst` calls.
    pub fn new(rate: NonZeroU32, burst: NonZeroU32) -> Self {
        RateLimiter { rate_per_s: f64::from(rate.get()), burst: f64::from(burst.get()), buckets: Mutex::default() }
    }

    /// Takes a token for `caller` at `now`, or says how long until one is available.
    pub fn take(&self, caller: K, now: Instant) -> Result<(), Duration> {
        self.take_n(caller, 1, now)
    }

    /// Takes `n` tokens for `caller` at `now`, or says how long until they are available. A call
    /// weighing more than the burst passes once the bucket is full and leaves it owing the rest,
    /// so it is paid for by the wait before the caller's next call, never refused forever.
    pub fn take_n(&self, caller: K, n: u32, now: Instant) -> Result<(), Duration> {
        let cost = f64::from(n);
        let needed = cost.min(self.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&caller) {
            self.forget(&mut buckets, now);
        }
        let b = buckets.entry(caller).or_insert(Bucket { tokens: self.burst, last: now });
        let refill = now.saturating_duration_since(b.last).as_secs_f64() * self.rate_per_s;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.last = now.max(b.last);
        if b.tokens >= needed {
            b.tokens -= cost;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - b.tokens) / self.rate_per_s))
        }
    }

    /// Number of callers tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn forget(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let (rate, burst) = (self.rate_per_s, self.burst);
        buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst);
        if buckets.len() >= MAX_TRACKED {
            let mut by_age: Vec<(Instant, K)> = buckets.iter().map(|(k, b)| (b.last, *k)).collect();
            let n = MAX_TRACKED / 8;
            by_age.select_nth_unstable_by_key(n, |(last, _)| *last);
            for (_, k) in &by_age[..n] {
                buckets.remove(k);
            }
        }
    }
}

/// The caller an IP address stands for: IPv4 addresses as they are (an IPv4-mapped IPv6
/// address too), IPv6 addresses by their /64 prefix (one host usually holds a whole /64).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).unwrap()
    }

    #[test]
    fn a_burst_then_the_rate_with_the_wait_named() {
        let l = RateLimiter::new(nz(10), nz(3));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.take(1u8, t0), Ok(()));
        }
        let wait = l.take(1, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert_eq!(l.take(2, t0), Ok(()), "callers have their own buckets");
        assert_eq!(l.take(1, t0 + Duration::from_millis(100)), Ok(()));
        assert!(l.take(1, t0 + Duration::from_millis(150)).is_err());
        // Idle for long: the bucket is full again, but never more than the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.take(1, later), Ok(()));
        }
        assert!(l.take(1, later).is_err());
    }

    #[test]
    fn a_weighted_call_takes_its_weight_and_one_above_the_burst_leaves_a_debt() {
        let l = RateLimiter::new(nz(100), nz(50));
        let t0 = Instant::now();
        assert_eq!(l.take_n(1u8, 30, t0), Ok(()));
        let wait = l.take_n(1, 30, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "10 tokens missing at 100/s: {wait:?}");
        assert_eq!(l.take_n(1, 20, t0), Ok(()), "what is left can be taken");
        // A call above the burst waits for a full bucket, then leaves the bucket owing the rest.
        let full = t0 + Duration::from_millis(500);
        assert_eq!(l.take_n(1, 250, full), Ok(()));
        let wait = l.take(1, full).unwrap_err();
        assert!((wait.as_secs_f64() - 2.01).abs() < 1e-6, "200 owed and 1 to take at 100/s: {wait:?}");
        assert_eq!(l.take(1, full + Duration::from_millis(2_011)), Ok(()));
    }

    #[test]
    fn many_callers_are_bounded() {
        let l = RateLimiter::new(nz(1), nz(1));
        let t0 = Instant::now();
        for i in 0..(3 * MAX_TRACKED) as u32 {
            let _ = l.take(i, t0 + Duration::from_micros(u64::from(i)));
            assert!(l.tracked() <= MAX_TRACKED);
        }
        // A caller whose bucket was emptied a moment ago is still remembered.
        let last = (3 * MAX_TRACKED) as u32 - 1;
        assert!(l.take(last, t0 + Duration::from_micros(u64::from(last))).is_err());
    }

    #[test]
    fn ipv6_callers_are_grouped_by_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_of(a), source_of(b));
        assert_ne!(source_of(a), source_of(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_of(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
