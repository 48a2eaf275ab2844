//! Instants kept as signed nanoseconds from an origin: 8 bytes instead of an `Instant`'s 16
//! (issue 17: records every idle connection keeps). Exact both ways within ±292 years.

use std::time::{Duration, Instant};

/// `t` as signed nanoseconds after `epoch` (negative before it; never `i64::MIN`, so
/// callers may use that as "none").
pub fn offset(epoch: Instant, t: Instant) -> i64 {
    let ns = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    match t.checked_duration_since(epoch) {
        Some(d) => ns(d),
        None => -ns(epoch.duration_since(t)),
    }
}

/// The instant `off` nanoseconds after `epoch` (the inverse of [`offset`]).
pub fn instant(epoch: Instant, off: i64) -> Instant {
    let d = Duration::from_nanos(off.unsigned_abs());
    if off >= 0 {
        epoch + d
    } else {
        epoch - d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // a test needs some instant to start from
    fn instants_before_and_after_the_epoch_come_back_exactly() {
        let epoch = Instant::now();
        for d in [0, 1, 999, 1_000_000_007, 86_400_000_000_000] {
            let d = Duration::from_nanos(d);
            let later = epoch + d;
            assert_eq!(instant(epoch, offset(epoch, later)), later);
            if let Some(earlier) = epoch.checked_sub(d) {
                assert_eq!(offset(epoch, earlier), -(d.as_nanos() as i64));
                assert_eq!(instant(epoch, offset(epoch, earlier)), earlier);
            }
        }
    }
}
