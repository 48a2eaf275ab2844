//! The proxy's counters: live atomics shared by the accept loop and every connection
//! ([`Counters`]), their snapshot ([`ProxyMetrics`]) and the handle that takes it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use super::{Leg, RelayEnd};

/// The reasons a proxied connection can end with, in the order of [`ProxyMetrics::closed`].
pub const PROXY_REASONS: [&str; 7] = [
    "peer-closed",
    "peer-reset",
    "keepalive-timeout",
    "user-timeout",
    "idle-timeout",
    "half-close-timeout",
    "io-error",
];

/// Counters of a [`Proxy`](super::Proxy) (see [`Proxy::handle`](super::Proxy::handle) and
/// [`ProxyHandle::metrics`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyMetrics {
    /// Connections being relayed now.
    pub open: u64,
    /// Connections accepted since start (including rejected and failed ones).
    pub accepted: u64,
    /// Relayed connections that ended, by leg (`[client, upstream, neither]`, the last for
    /// `idle-timeout`) and reason (indexed like [`PROXY_REASONS`]).
    pub closed: [[u64; PROXY_REASONS.len()]; 3],
    /// Connections whose setup failed (upstream unreachable, socket options).
    pub setup_failed: u64,
    /// Connections reset because the limit was reached.
    pub rejected: u64,
    /// Bytes relayed client → upstream (counted as they are written, live).
    pub bytes_up: u64,
    /// Bytes relayed upstream → client.
    pub bytes_down: u64,
    /// Channels (pipes or buffers, each up to [`CHANNEL_BYTES`](super::CHANNEL_BYTES)) held now: at most two per
    /// busy connection, none for an idle one.
    pub channels: u64,
}

impl ProxyMetrics {
    /// Ended connections with reason `label`, summed over legs.
    pub fn closed_with(&self, label: &str) -> u64 {
        PROXY_REASONS
            .iter()
            .position(|l| *l == label)
            .map(|i| self.closed.iter().map(|row| row[i]).sum())
            .unwrap_or(0)
    }
}

/// Live counters shared by the accept loop, every connection and [`ProxyHandle`]s.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) open: AtomicUsize,
    pub(super) accepted: AtomicU64,
    pub(super) closed: [[AtomicU64; PROXY_REASONS.len()]; 3],
    pub(super) setup_failed: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) bytes_up: AtomicU64,
    pub(super) bytes_down: AtomicU64,
    pub(super) channels: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> ProxyMetrics {
        let mut closed = [[0u64; PROXY_REASONS.len()]; 3];
        for (row, src) in closed.iter_mut().zip(&self.closed) {
            for (c, s) in row.iter_mut().zip(src) {
                *c = s.load(Relaxed);
            }
        }
        ProxyMetrics {
            open: self.open.load(Relaxed) as u64,
            accepted: self.accepted.load(Relaxed),
            closed,
            setup_failed: self.setup_failed.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            bytes_up: self.bytes_up.load(Relaxed),
            bytes_down: self.bytes_down.load(Relaxed),
            channels: self.channels.load(Relaxed),
        }
    }

    pub(super) fn record_end(&self, end: &RelayEnd) {
        let row = match end.leg {
            Some(Leg::Client) => 0,
            Some(Leg::Upstream) => 1,
            None => 2,
        };
        let label = end.reason.label();
        let col = PROXY_REASONS
            .iter()
            .position(|l| *l == label)
            .unwrap_or(PROXY_REASONS.len() - 1); // anything else counts as io-error
        self.closed[row][col].fetch_add(1, Relaxed);
    }
}

/// A cheap handle to a running proxy's counters.
#[derive(Debug, Clone)]
pub struct ProxyHandle {
    pub(super) counters: Arc<Counters>,
}

impl ProxyHandle {
    /// A snapshot of the counters.
    pub fn metrics(&self) -> ProxyMetrics {
        self.counters.snapshot()
    }
}

/// Decrements the open count when a connection task ends, however it ends.
pub(super) struct OpenGuard(pub(super) Arc<Counters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tether_proto::DisconnectReason;

    use super::*;

    #[test]
    fn every_proxy_reason_is_a_disconnect_label() {
        for l in PROXY_REASONS {
            assert!(DisconnectReason::LABELS.contains(&l), "{l}");
        }
    }

    #[test]
    fn metrics_sum_over_legs() {
        let c = Counters::default();
        let end = |reason, leg| RelayEnd {
            reason,
            leg,
            first_fin: None,
            abortive: true,
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
        };
        c.record_end(&end(DisconnectReason::PeerReset, Some(Leg::Client)));
        c.record_end(&end(DisconnectReason::PeerReset, Some(Leg::Upstream)));
        c.record_end(&end(DisconnectReason::IdleTimeout, None));
        c.record_end(&end(DisconnectReason::Io("x".into()), Some(Leg::Client)));
        let m = c.snapshot();
        assert_eq!(m.closed_with("peer-reset"), 2);
        assert_eq!(m.closed_with("idle-timeout"), 1);
        assert_eq!(m.closed[2][4], 1);
        assert_eq!(m.closed_with("io-error"), 1);
        assert_eq!(m.closed_with("no-such-reason"), 0);
    }
}
