//! A per-source-address throttle for failed attempts (wrong resume tokens, bad credentials),
//! in bounded memory.
//!
//! Each source is a GCRA token bucket (one instant per source: the "theoretical arrival
//! time" `tat`): a source may fail `burst` times in a row, then once per `interval`. A
//! failure moves `tat = max(tat, now) + interval`; the source is throttled while
//! `tat - now > (burst - 1) · interval`.
//!
//! ```text
//!  burst = 3, interval = I          tat − now:  I   2I   3I  → throttled (> 2I)
//!  failures at t = 0:  ✗ ✗ ✗        wait I:     tat − now = 2I → one more attempt
//! ```
//!
//! Sources are IPv4 addresses and IPv6 prefixes (a /64 by default: one host usually holds a
//! whole /64, so single IPv6 addresses are free for an attacker). The table is sized once
//! from a byte budget and never grows: when it is full, entries whose bucket has refilled are
//! dropped (they carry no information), and if none has, the eighth of the table closest to
//! refilled goes (the most-throttled sources are kept longest). A flood of new addresses
//! therefore costs a bounded table and amortised O(1) work per failure, and can only push out
//! sources that were barely throttled.
//!
//! Pure: every call takes `now`; nothing here reads a clock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use thiserror::Error;

/// The source is throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("too many failed attempts; retry in {retry_after:?}")]
pub struct Throttled {
    /// When the next attempt will be allowed.
    pub retry_after: Duration,
}

/// Settings of a [`FailureThrottle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    burst: u32,
    interval: Duration,
    max_bytes: usize,
    ipv6_prefix: u8,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            burst: 10,
            interval: Duration::from_secs(6),
            max_bytes: 256 * 1024,
            ipv6_prefix: 64,
        }
    }
}

impl ThrottleConfig {
    /// Failures a source may make in a row before it is throttled (at least 1). Default: 10.
    pub fn burst(mut self, n: u32) -> Self {
        self.burst = n.max(1);
        self
    }

    /// After the burst, one more failure is allowed per this interval. Default: 6 s (10 a
    /// minute).
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d.max(Duration::from_millis(1));
        self
    }

    /// Memory for the table, in bytes (at least one table slot's worth). Default: 256 KiB
    /// (a few thousand sources).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// IPv6 sources are grouped by this prefix length (1..=128). Default: 64.
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.ipv6_prefix = bits.clamp(1, 128);
        self
    }
}

/// A source: an IPv4 address or an IPv6 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(u32),
    V6(u128),
}

/// Table slot: the key, the instant, and the hash table's control byte.
const SLOT_BYTES: usize = std::mem::size_of::<(Source, Instant)>() + 1;

/// Failed attempts per source address, throttled (see the module docs).
#[derive(Debug)]
pub struct FailureThrottle {
    cfg: ThrottleConfig,
    tat: HashMap<Source, Instant>,
    cap: usize,
}

impl FailureThrottle {
    /// A throttle with its table allocated once from `cfg.max_bytes`.
    pub fn new(cfg: ThrottleConfig) -> Self {
        // The largest power-of-two number of slots that fits the budget; the table holds at
        // most 7/8 of them (its load factor), so it never reallocates.
        let slots = (cfg.max_bytes / SLOT_BYTES).max(16);
        let slots = if slots.is_power_of_two() {
            slots
        } else {
            slots.next_power_of_two() / 2
        };
        let cap = slots / 8 * 7;
        FailureThrottle {
            cfg,
            tat: HashMap::with_capacity(cap),
            cap,
        }
    }

    fn source(&self, addr: IpAddr) -> Source {
        match addr {
            IpAddr::V4(a) => Source::V4(a.into()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.into()),
                None => {
                    let bits = u32::from(self.cfg.ipv6_prefix);
                    let mask = if bits >= 128 {
                        u128::MAX
                    } else {
                        !(u128::MAX >> bits)
                    };
                    Source::V6(u128::from(a) & mask)
                }
            },
        }
    }

    fn limit(&self) -> Duration {
        self.cfg.interval.saturating_mul(self.cfg.burst - 1)
    }

    /// Whether `addr` may make an attempt at `now`. Ask before the expensive or sensitive
    /// check (token compare, signature); answer REFUSE(THROTTLED) on `Err`.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Throttled> {
        let Some(&tat) = self.tat.get(&self.source(addr)) else {
            return Ok(());
        };
        let ahead = tat.saturating_duration_since(now);
        let limit = self.limit();
        if ahead > limit {
            Err(Throttled {
                retry_after: ahead - limit,
            })
        } else {
            Ok(())
        }
    }

    /// Counts a failed attempt from `addr` at `now`.
    pub fn record_failure(&mut self, addr: IpAddr, now: Instant) {
        let src = self.source(addr);
        if !self.tat.contains_key(&src) && self.tat.len() >= self.cap {
            self.make_room(now);
        }
        let interval = self.cfg.interval;
        let tat = self.tat.entry(src).or_insert(now);
        *tat = (*tat).max(now) + interval;
    }

    fn make_room(&mut self, now: Instant) {
        // Refilled buckets say nothing: drop them all.
        let mut cut = now;
        let mut to_drop = usize::MAX;
        if !self.tat.values().any(|tat| *tat <= now) {
            // None: drop the eighth closest to refilled.
            let mut tats: Vec<Instant> = self.tat.values().copied().collect();
            let k = (tats.len() / 8).max(1) - 1;
            cut = *tats.select_nth_unstable(k).1;
            to_drop = k + 1;
        }
        self.rebuild(|tat| {
            if to_drop > 0 && tat <= cut {
                to_drop -= 1;
                false
            } else {
                true
            }
        });
    }

    /// Keeps the entries `keep` says yes to, in a fresh table of the configured size. (Removing
    /// in place leaves tombstones that make the hash table double on later inserts; a fresh
    /// table never grows past the budget.)
    fn rebuild(&mut self, mut keep: impl FnMut(Instant) -> bool) {
        let mut fresh = HashMap::with_capacity(self.cap);
        fresh.extend(self.tat.drain().filter(|&(_, tat)| keep(tat)));
        self.tat = fresh;
    }

    /// Sources tracked.
    pub fn len(&self) -> usize {
        self.tat.len()
    }

    /// True when no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.tat.is_empty()
    }

    /// Most sources the table holds.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// An estimate of the table's memory in bytes (its slots; within `max_bytes`).
    pub fn memory_bytes(&self) -> usize {
        // hashbrown allocates a power of two of slots holding capacity()·8/7 entries.
        (self.tat.capacity() * 8 / 7).next_power_of_two() * SLOT_BYTES
    }

    /// Forgets sources whose bucket has refilled by `now` (optional housekeeping; the table
    /// also does this when it is full).
    pub fn purge(&mut self, now: Instant) {
        self.rebuild(|tat| tat > now);
    }
}

impl Default for FailureThrottle {
    fn default() -> Self {
        FailureThrottle::new(ThrottleConfig::default())
    }
}

/// The IPv6 prefix a source address is counted under (for logs).
pub fn ipv6_prefix(addr: Ipv6Addr, bits: u8) -> Ipv6Addr {
    let bits = u32::from(bits.clamp(1, 128));
    let mask = if bits >= 128 {
        u128::MAX
    } else {
        !(u128::MAX >> bits)
    };
    Ipv6Addr::from(u128::from(addr) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    const I: Duration = Duration::from_secs(6);

    #[test]
    fn a_source_may_fail_burst_times_then_once_per_interval() {
        let t0 = Instant::now();
        let mut th = FailureThrottle::new(ThrottleConfig::default().burst(3).interval(I));
        let a = v4(1);
        for _ in 0..3 {
            assert_eq!(th.check(a, t0), Ok(()));
            th.record_failure(a, t0);
        }
        assert_eq!(th.check(a, t0), Err(Throttled { retry_after: I }));
        // Another source is not affected.
        assert_eq!(th.check(v4(2), t0), Ok(()));
        // Just before the interval: still throttled; at it: one more attempt.
        assert!(th.check(a, t0 + I - Duration::from_millis(1)).is_err());
        assert_eq!(th.check(a, t0 + I), Ok(()));
        th.record_failure(a, t0 + I);
        assert_eq!(th.check(a, t0 + I), Err(Throttled { retry_after: I }));
        // After burst · interval of quiet, the whole burst is back.
        let later = t0 + I * 5;
        for _ in 0..3 {
            assert_eq!(th.check(a, later), Ok(()));
            th.record_failure(a, later);
        }
        assert!(th.check(a, later).is_err());
    }

    #[test]
    fn ipv6_sources_are_grouped_by_prefix_and_mapped_v4_is_v4() {
        let t0 = Instant::now();
        let mut th = FailureThrottle::new(ThrottleConfig::default().burst(1).interval(I));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        th.record_failure(a, t0);
        assert!(th.check(same64, t0).is_err());
        assert!(th.check(other64, t0).is_ok());
        th.record_failure(v4(0x7f00_0001), t0);
        assert!(th.check("::ffff:127.0.0.1".parse().unwrap(), t0).is_err());
        assert_eq!(
            ipv6_prefix("2001:db8:1:2:3:4:5:6".parse().unwrap(), 64),
            "2001:db8:1:2::".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn a_flood_of_addresses_stays_within_the_byte_budget() {
        let t0 = Instant::now();
        let budget = 16 * 1024;
        let mut th = FailureThrottle::new(ThrottleConfig::default().max_bytes(budget));
        let cap = th.capacity();
        assert!(cap > 100, "{cap}");
        assert!(th.memory_bytes() <= budget, "{}", th.memory_bytes());
        // A persistent offender, throttled hard.
        let bad = v4(0xdead_beef);
        for _ in 0..100 {
            th.record_failure(bad, t0);
        }
        // 100 000 distinct addresses, one failure each, all within one second.
        for i in 0..100_000u32 {
            th.record_failure(v4(i), t0 + Duration::from_micros(u64::from(i) * 10));
            assert!(th.len() <= cap);
        }
        assert!(th.memory_bytes() <= budget, "{}", th.memory_bytes());
        assert_eq!(th.capacity(), cap);
        // The offender (furthest from refilled) survived the flood.
        assert!(th.check(bad, t0 + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn refilled_sources_are_dropped_first_when_full() {
        let t0 = Instant::now();
        let mut th = FailureThrottle::new(
            ThrottleConfig::default()
                .burst(2)
                .interval(I)
                .max_bytes(1024),
        );
        let cap = th.capacity();
        for i in 0..cap as u32 {
            th.record_failure(v4(i), t0);
        }
        assert_eq!(th.len(), cap);
        // One source keeps failing later on.
        let late = t0 + I * 2;
        th.record_failure(v4(0), late);
        th.record_failure(v4(0), late);
        assert!(th.check(v4(0), late).is_err());
        // A new source at `late`: every other bucket has refilled and is dropped.
        th.record_failure(v4(1 << 30), late);
        assert_eq!(th.len(), 2);
        assert!(th.check(v4(0), late).is_err());
        th.purge(late + I * 10);
        assert!(th.is_empty());
    }
}
