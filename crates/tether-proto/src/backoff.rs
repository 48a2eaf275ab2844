//! Reconnect backoff: capped exponential backoff with full jitter, deterministic and seedable.
//!
//! Delay `n` (0-based, counted since the last [`Backoff::reset`]) is drawn uniformly from
//! `[0, min(cap, base · 2^n)]` ("full jitter", as in the AWS Architecture Blog's
//! *Exponential Backoff And Jitter*): clients that lost the same server at the same moment
//! spread their reconnects over the whole window instead of arriving in waves.
//!
//! ```text
//!   ceiling(n) = min(cap, base << n)          (saturating, never overflows)
//!   delay(n)   = uniform[0, ceiling(n)]       (inclusive, nanosecond resolution)
//! ```
//!
//! The random source is a splitmix64 generator seeded by the caller, so a test can assert an
//! exact sequence; the driver seeds it from the OS. Nothing here reads the clock.
//!
//! Delays are computed in nanoseconds and saturate at `u64::MAX` ns (about 584 years), which is
//! far above any sensible `cap`.

use std::time::Duration;

/// Settings for [`Backoff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Ceiling of the first delay; each later attempt doubles the ceiling. Default: 100 ms.
    pub base: Duration,
    /// Upper bound of every ceiling. Default: 30 s.
    pub cap: Duration,
    /// How many delays [`Backoff::next_delay`] hands out before it returns `None` (give up).
    /// `None` retries forever. Default: `None`.
    pub max_attempts: Option<u32>,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

impl BackoffConfig {
    /// The jitter window's upper bound for attempt `attempt` (0-based):
    /// `min(cap, base · 2^attempt)`, saturating instead of overflowing.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let cap = duration_nanos(self.cap);
        let base = duration_nanos(self.base);
        let scaled = if base == 0 {
            0
        } else if attempt > base.leading_zeros() {
            // base << attempt would lose its top bit: saturate, the cap decides.
            u64::MAX
        } else {
            base << attempt
        };
        Duration::from_nanos(scaled.min(cap))
    }
}

/// Capped exponential backoff with full jitter (see the module docs).
///
/// ```
/// use std::time::Duration;
/// use tether_proto::backoff::{Backoff, BackoffConfig};
///
/// let cfg = BackoffConfig { base: Duration::from_millis(100), cap: Duration::from_secs(5), max_attempts: Some(3) };
/// let mut b = Backoff::new(cfg, 42);
/// for n in 0..3 {
///     let d = b.next_delay().unwrap();
///     assert!(d <= cfg.ceiling(n));
/// }
/// assert_eq!(b.next_delay(), None); // gave up after 3 attempts
/// b.reset();                        // connected again: start from the small window
/// assert_eq!(b.attempt(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    cfg: BackoffConfig,
    attempt: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// A backoff at attempt 0 whose jitter is drawn from a generator seeded with `seed`.
    pub fn new(cfg: BackoffConfig, seed: u64) -> Self {
        Backoff {
            cfg,
            attempt: 0,
            rng: SplitMix64(seed),
        }
    }

    /// The next delay to wait before reconnecting, and advances the attempt counter; `None`
    /// once `max_attempts` delays have been handed out since the last reset.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if let Some(max) = self.cfg.max_attempts {
            if self.attempt >= max {
                return None;
            }
        }
        let ceiling = duration_nanos(self.cfg.ceiling(self.attempt));
        let delay = self.rng.below_inclusive(ceiling);
        self.attempt = self.attempt.saturating_add(1);
        Some(Duration::from_nanos(delay))
    }

    /// How many delays have been handed out since the last reset (the 0-based index of the
    /// next one).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over at attempt 0 (call it once a connection has succeeded). The random
    /// sequence continues; it is not reseeded.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The settings this backoff was built with.
    pub fn config(&self) -> &BackoffConfig {
        &self.cfg
    }
}

/// A duration in nanoseconds, saturating at `u64::MAX`.
fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// splitmix64 (Steele, Lea, Flood 2014; the constants of Vigna's public-domain reference).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, max]` without modulo bias (Lemire's multiply-and-reject method).
    fn below_inclusive(&mut self, max: u64) -> u64 {
        let Some(range) = max.checked_add(1) else {
            return self.next_u64(); // the whole u64 range
        };
        let threshold = range.wrapping_neg() % range;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(range);
            // Truncation keeps the low 64 bits on purpose: that is the rejection test.
            #[allow(clippy::cast_possible_truncation)]
            let low = m as u64;
            if low >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}
