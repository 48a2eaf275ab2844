//! Randomness from the operating system: the one place tether draws it.
//!
//! - [`secret`]: bytes that must be unguessable (session resume tokens). Fails rather than
//!   hand out predictable bytes.
//! - [`u64`](fn@u64) and [`id`]: values that must only be distinct (jitter seeds, ids for
//!   logs). They fall back to the clock and a counter if the OS source fails.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// `N` unguessable bytes from the OS's random source.
pub fn secret<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)?;
    Ok(b)
}

/// A random `u64` (from the OS; distinct per call within the process even if the OS
/// source fails). Not for secrets.
pub fn u64() -> u64 {
    match secret::<8>() {
        Ok(b) => u64::from_le_bytes(b),
        Err(_) => {
            static NEXT: AtomicU64 = AtomicU64::new(1);
            #[allow(clippy::disallowed_methods)] // only a fallback for distinctness
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            t ^ NEXT.fetch_add(1, Relaxed).rotate_left(48) ^ u64::from(std::process::id()) << 16
        }
    }
}

/// `prefix` followed by 16 random hex digits, e.g. `id("tun-")` → `"tun-3f9a…"`. Not for
/// secrets.
///
/// ```
/// let a = tether::random::id("tun-");
/// assert!(a.starts_with("tun-") && a.len() == 20);
/// assert_ne!(a, tether::random::id("tun-"));
/// ```
pub fn id(prefix: &str) -> String {
    format!("{prefix}{:016x}", u64())
}
