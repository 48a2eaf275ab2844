//! Giving the allocator's free pages back after a burst of connections parked (issue 17).
//!
//! A connection that parks frees its task (an 896 B cell) and whatever its handshake
//! allocated; the blocks that stay (its lot entry, `Shared`, id, presence slot) were
//! allocated between them. After a burst of connections — a deploy, a reconnect storm, a
//! benchmark — the freed blocks are holes in the heap: glibc reuses them for later blocks of
//! the same sizes but keeps their pages resident. Measured with `tether bench hold` and a
//! `malloc_trim(0)` called into the server from `gdb` (2026-12-01): 212 KiB at 5,000 idle
//! clients (42 B per connection) and 564 KiB at 19,000 (30 B per connection) went back.
//!
//! So a lot thread calls `malloc_trim(0)` (glibc: every arena's free pages, not only the
//! heap's top, are `madvise`d away) once a burst is over: at least [`TRIM_AFTER`]
//! connections parked since the last trim, none for [`QUIET`], and at most once per
//! [`MIN_GAP`]. A steady trickle of parks does not trim (the holes are being reused); a
//! trim costs a walk of the arenas' free lists (~1 ms for tens of MB), on a lot thread,
//! never on a worker. Elsewhere than Linux with glibc it does nothing.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Relaxed};
use std::time::Duration;

use super::Stamp;

/// Parks since the last trim before a trim is worth its walk.
pub(super) const TRIM_AFTER: u64 = 1024;
/// No park for this long: the burst is over.
pub(super) const QUIET: Duration = Duration::from_secs(1);
/// At most one trim per this long.
pub(super) const MIN_GAP: Duration = Duration::from_secs(10);

/// The decision, on explicit instants (nanosecond stamps), so it is tested without a clock.
#[derive(Debug, Default)]
pub(super) struct Policy {
    /// Connections parked since the last trim.
    parks: AtomicU64,
    /// When the last one parked (a `Stamp`'s nanoseconds; 0: never).
    last_park: AtomicU64,
    /// When the last trim ran (0: never).
    last_trim: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Policy {
    pub(super) const fn new() -> Self {
        Policy {
            parks: AtomicU64::new(0),
            last_park: AtomicU64::new(0),
            last_trim: AtomicU64::new(0),
        }
    }

    /// `n` connections parked at `now`.
    pub(super) fn parked(&self, n: usize, now: u64) {
        if n > 0 {
            self.parks.fetch_add(n as u64, Relaxed);
            self.last_park.fetch_max(now, Relaxed);
        }
    }

    /// Enough connections parked since the last trim for one to be worth its walk.
    pub(super) fn pending(&self) -> bool {
        self.parks.load(Relaxed) >= TRIM_AFTER
    }

    /// How long until a trim is due (zero: now); `None`: none is pending.
    pub(super) fn due_in(&self, now: u64) -> Option<Duration> {
        if !self.pending() {
            return None;
        }
        let quiet = self.last_park.load(Relaxed).saturating_add(nanos(QUIET));
        let gap = match self.last_trim.load(Relaxed) {
            0 => 0,
            t => t.saturating_add(nanos(MIN_GAP)),
        };
        Some(Duration::from_nanos(quiet.max(gap).saturating_sub(now)))
    }

    /// True when a trim is due at `now` and this caller is the one to run it (a trim is
    /// claimed once, whichever lot thread asks first).
    pub(super) fn claim(&self, now: u64) -> bool {
        if self.due_in(now) != Some(Duration::ZERO) {
            return false;
        }
        let parks = self.parks.swap(0, AcqRel);
        if parks < TRIM_AFTER {
            // Another thread claimed it between the two looks: give the count back.
            self.parks.fetch_add(parks, Relaxed);
            return false;
        }
        self.last_trim.store(now.max(1), Relaxed);
        true
    }
}

static POLICY: Policy = Policy::new();

/// Now as the policy counts it (never 0).
fn stamp_now() -> u64 {
    // A stamp is signed nanoseconds from a process-wide origin; shifted to be positive.
    (Stamp::at(super::now()).0 as u64 ^ (1 << 63)).max(1)
}

/// `n` connections parked on a lot thread.
pub(super) fn parked(n: usize) {
    if n > 0 {
        POLICY.parked(n, stamp_now());
    }
}

/// Once per pass of a lot thread: trims if a trim is due (see the module docs) and answers
/// how long the thread may sleep before the next one is (`None`: none pending). Reads no
/// clock unless enough connections parked since the last trim.
pub(super) fn tick() -> Option<Duration> {
    if !POLICY.pending() {
        return None;
    }
    let now = stamp_now();
    if POLICY.claim(now) {
        let t = std::time::Instant::now();
        let released = release_free_pages();
        tracing::debug!(
            released,
            took_us = t.elapsed().as_micros() as u64,
            "gave the allocator's free pages back after a burst of parked connections"
        );
        return None;
    }
    POLICY.due_in(now)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_pages() -> bool {
    // SAFETY: malloc_trim takes the allocator's own locks and only returns free pages to the
    // kernel; it touches no memory a caller holds.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_burst_is_trimmed_once_it_is_over_and_not_again_within_the_gap() {
        let p = Policy::new();
        let t0 = 100 * S;
        p.parked(1000, t0);
        assert_eq!(
            p.due_in(t0),
            None,
            "fewer than TRIM_AFTER parks: nothing pending"
        );
        p.parked(100, t0 + S / 2);
        // Due a second after the last park, not before.
        assert_eq!(p.due_in(t0 + S / 2), Some(QUIET));
        assert!(!p.claim(t0 + S / 2 + QUIET.as_nanos() as u64 - 1));
        assert!(p.claim(t0 + S / 2 + S));
        assert!(!p.claim(t0 + S / 2 + S), "claimed once");
        assert_eq!(p.due_in(t0 + 2 * S), None, "the count starts again");
        // Another burst right after: waits for the gap, not only for quiet.
        p.parked(5000, t0 + 2 * S);
        let trimmed = t0 + S / 2 + S;
        assert_eq!(
            p.due_in(t0 + 3 * S),
            Some(Duration::from_nanos(trimmed + 10 * S - (t0 + 3 * S)))
        );
        assert!(!p.claim(trimmed + 10 * S - 1));
        assert!(p.claim(trimmed + 10 * S));
    }

    #[test]
    fn a_steady_trickle_keeps_postponing_the_trim() {
        let p = Policy::new();
        for i in 0..5000u64 {
            let t = 10 * S + i * (S / 10);
            p.parked(1, t);
            assert!(!p.claim(t), "parks every 100 ms: never quiet for {QUIET:?}");
        }
    }

    #[test]
    fn two_threads_claim_one_trim() {
        let p = std::sync::Arc::new(Policy::new());
        p.parked(4096, S);
        let claims: usize = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || usize::from(p.claim(3 * S)))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .sum();
        assert_eq!(claims, 1);
    }
}
