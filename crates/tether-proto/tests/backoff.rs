//! Backoff: exact seeded sequences, jitter bounds, give-up, reset, no overflow.

use std::time::Duration;

use proptest::prelude::*;
use tether_proto::backoff::{Backoff, BackoffConfig};

fn cfg(base_ms: u64, cap_ms: u64, max_attempts: Option<u32>) -> BackoffConfig {
    BackoffConfig {
        base: Duration::from_millis(base_ms),
        cap: Duration::from_millis(cap_ms),
        max_attempts,
    }
}

/// The expected values come from an independent Python model of splitmix64 (whose seed-0
/// outputs match Vigna's reference: 0xe220a8397b1dcdaf, …) with Lemire's unbiased
/// multiply-and-reject range reduction, over nanosecond windows min(2 s, 100 ms · 2^n).
#[test]
fn seeded_sequence_is_exact() {
    let mut b = Backoff::new(cfg(100, 2_000, None), 7);
    let got: Vec<u64> = (0..8)
        .map(|_| b.next_delay().unwrap().as_nanos() as u64)
        .collect();
    assert_eq!(
        got,
        [
            38_982_975,
            3_357_658,
            360_304_273,
            466_344_235,
            723_907_032,
            498_863_044,
            935_906_008,
            656_153_478
        ]
    );
    assert_eq!(b.attempt(), 8);
}

#[test]
fn same_seed_same_sequence_other_seed_differs() {
    let c = cfg(50, 10_000, None);
    let a: Vec<_> = {
        let mut b = Backoff::new(c, 99);
        (0..20).map(|_| b.next_delay()).collect()
    };
    let again: Vec<_> = {
        let mut b = Backoff::new(c, 99);
        (0..20).map(|_| b.next_delay()).collect()
    };
    let other: Vec<_> = {
        let mut b = Backoff::new(c, 100);
        (0..20).map(|_| b.next_delay()).collect()
    };
    assert_eq!(a, again);
    assert_ne!(a, other);
}

#[test]
fn ceiling_doubles_then_caps() {
    let c = cfg(100, 1_000, None);
    let ms = |n| c.ceiling(n).as_millis();
    assert_eq!(
        (0..7).map(ms).collect::<Vec<_>>(),
        [100, 200, 400, 800, 1_000, 1_000, 1_000]
    );
}

#[test]
fn gives_up_after_max_attempts_and_reset_starts_over() {
    let c = cfg(100, 1_000, Some(3));
    let mut b = Backoff::new(c, 1);
    for n in 0..3 {
        assert_eq!(b.attempt(), n);
        assert!(b.next_delay().is_some());
    }
    assert_eq!(b.next_delay(), None);
    assert_eq!(b.next_delay(), None);
    assert_eq!(b.attempt(), 3);
    b.reset();
    assert_eq!(b.attempt(), 0);
    let d = b.next_delay().unwrap();
    assert!(
        d <= Duration::from_millis(100),
        "first window after reset: {d:?}"
    );
}

#[test]
fn zero_max_attempts_never_retries() {
    let mut b = Backoff::new(cfg(100, 1_000, Some(0)), 1);
    assert_eq!(b.next_delay(), None);
}

#[test]
fn no_overflow_at_huge_attempt_counts() {
    let c = BackoffConfig {
        base: Duration::from_secs(1),
        cap: Duration::MAX,
        max_attempts: None,
    };
    // 1 s = 2^29.9 ns: 1 s · 2^34 still fits in u64 nanoseconds; from attempt 35 on the
    // window saturates at u64::MAX ns.
    assert_eq!(c.ceiling(34), Duration::from_secs(1 << 34));
    assert_eq!(c.ceiling(35), Duration::from_nanos(u64::MAX));
    assert_eq!(c.ceiling(u32::MAX), Duration::from_nanos(u64::MAX));
    let c = cfg(100, 30_000, None);
    assert_eq!(c.ceiling(64), Duration::from_secs(30));
    assert_eq!(c.ceiling(u32::MAX), Duration::from_secs(30));
    let mut b = Backoff::new(c, 5);
    for _ in 0..10_000 {
        assert!(b.next_delay().unwrap() <= Duration::from_secs(30));
    }
    assert_eq!(b.attempt(), 10_000);
}

#[test]
fn exact_top_bit_window_is_not_saturated() {
    // base = 1 ns: base << 63 = 2^63 ns exactly fits; << 64 saturates.
    let c = BackoffConfig {
        base: Duration::from_nanos(1),
        cap: Duration::MAX,
        max_attempts: None,
    };
    assert_eq!(c.ceiling(63), Duration::from_nanos(1 << 63));
    assert_eq!(c.ceiling(64), Duration::from_nanos(u64::MAX));
}

#[test]
fn zero_base_gives_zero_delays() {
    let mut b = Backoff::new(cfg(0, 1_000, None), 3);
    for _ in 0..10 {
        assert_eq!(b.next_delay(), Some(Duration::ZERO));
    }
}

#[test]
fn delays_spread_over_the_window() {
    // Full jitter: over many draws in a fixed window, both halves of it are used and the mean
    // is near the middle (loose bounds: 10,000 draws, expected mean 500 ms ± a few ms).
    let c = cfg(1_000, 1_000, None);
    let mut b = Backoff::new(c, 12345);
    let mut sum = 0u128;
    let (mut low, mut high) = (0, 0);
    for _ in 0..10_000 {
        b.reset();
        let d = b.next_delay().unwrap();
        sum += d.as_nanos();
        if d < Duration::from_millis(500) {
            low += 1;
        } else {
            high += 1;
        }
    }
    let mean_ms = (sum / 10_000 / 1_000_000) as u64;
    assert!((470..=530).contains(&mean_ms), "mean {mean_ms} ms");
    assert!(low > 4_500 && high > 4_500, "low {low} high {high}");
}

proptest! {
    #[test]
    fn every_delay_is_within_its_window(
        seed in any::<u64>(),
        base_ns in 0u64..=10_000_000_000,
        cap_ns in 0u64..=u64::MAX,
        n in 1usize..200,
    ) {
        let c = BackoffConfig {
            base: Duration::from_nanos(base_ns),
            cap: Duration::from_nanos(cap_ns),
            max_attempts: None,
        };
        let mut b = Backoff::new(c, seed);
        for attempt in 0..n as u32 {
            let expected_ceiling = u64::try_from(u128::from(base_ns) << attempt.min(100))
                .unwrap_or(u64::MAX)
                .min(cap_ns);
            prop_assert_eq!(c.ceiling(attempt), Duration::from_nanos(expected_ceiling));
            let d = b.next_delay().unwrap();
            prop_assert!(d <= c.ceiling(attempt), "attempt {} delay {:?}", attempt, d);
        }
        prop_assert_eq!(b.attempt(), n as u32);
    }
}
