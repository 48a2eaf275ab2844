//! Per-connection counters, readable by any thread without locks.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tether_proto::conn::ConnStats;
use tether_proto::Conn;

/// A process-wide origin for storing instants in atomics; also the driver's stamps'
/// (`Stamp::origin`).
pub(super) fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(|| tokio::time::Instant::now().into_std())
}

/// Per-connection counters, updated by the connection's task once per wake-up.
///
/// Every connection keeps one (in its `Shared`), so the counters that cannot need 64 bits
/// have 32 (issue 17, 64 B instead of 80): the smoothed RTT in µs (71 minutes) and the
/// heartbeats each way (4 billion; at the fastest interval a policy allows, years), both
/// saturating.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    last_rx_us: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// The session's highest number the peer acknowledged (0 without a session).
    acked: AtomicU64,
    srtt_us: AtomicU32,
    heartbeats_in: AtomicU32,
    heartbeats_out: AtomicU32,
    /// Times the task re-armed its sleep (tests check it is not once per wake-up).
    #[cfg(test)]
    timer_resets: AtomicU64,
    /// Times the task was polled (tests count the wake-ups of an idle connection).
    #[cfg(test)]
    polls: AtomicU64,
}

/// A connection's counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// When anything was last received (`None` before the first byte).
    pub last_rx: Option<Instant>,
    /// Smoothed RTT, once measured.
    pub srtt: Option<Duration>,
    /// Application messages received.
    pub messages_in: u64,
    /// Application messages sent.
    pub messages_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Heartbeats received.
    pub heartbeats_in: u64,
    /// Heartbeats sent.
    pub heartbeats_out: u64,
}

impl StatsSnapshot {
    /// The counters without the instants (what the presence registry keeps after the end).
    pub fn counters(&self) -> ConnStats {
        ConnStats {
            messages_in: self.messages_in,
            messages_out: self.messages_out,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            heartbeats_in: self.heartbeats_in,
            heartbeats_out: self.heartbeats_out,
        }
    }

    /// A snapshot of counters kept after a connection ended (no RTT; `last_rx` as given).
    pub fn from_counters(c: ConnStats, last_rx: Option<Instant>) -> Self {
        StatsSnapshot {
            last_rx,
            srtt: None,
            messages_in: c.messages_in,
            messages_out: c.messages_out,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            heartbeats_in: c.heartbeats_in,
            heartbeats_out: c.heartbeats_out,
        }
    }
}

impl Stats {
    pub(crate) fn update(&self, conn: &Conn) {
        self.publish(&conn.stats(), conn.last_rx());
        if let Some(r) = conn.srtt() {
            self.srtt_us.store(saturate(r.as_micros()), Relaxed);
        }
        self.acked
            .store(conn.session().map_or(0, |s| s.acked()), Relaxed);
    }

    /// The counters and the last arrival alone: what a read taken on the frozen form
    /// changes (`FrozenConn::parked_heartbeats`; the RTT and the session's ACK stay).
    pub(crate) fn publish(&self, s: &ConnStats, last_rx: Instant) {
        let us = last_rx.saturating_duration_since(base()).as_micros() as u64;
        self.publish_us(s, us + 1);
    }

    /// [`publish`](Self::publish) with the last arrival given in nanoseconds after
    /// [`base`] (as `tether_proto::offset::offset` gives it; the driver's stamps share the
    /// origin): the same value stored, without an `Instant` made and read back (a parked
    /// connection publishes on every heartbeat it answers).
    pub(crate) fn publish_offset(&self, s: &ConnStats, last_rx: i64) {
        self.publish_us(s, (last_rx.max(0) / 1000) as u64 + 1);
    }

    /// Stores the counters and the last arrival (µs after `base()`, plus one: 0 is none).
    fn publish_us(&self, s: &ConnStats, last_rx_us: u64) {
        self.last_rx_us.store(last_rx_us, Relaxed);
        self.messages_in.store(s.messages_in, Relaxed);
        self.messages_out.store(s.messages_out, Relaxed);
        self.bytes_in.store(s.bytes_in, Relaxed);
        self.bytes_out.store(s.bytes_out, Relaxed);
        self.heartbeats_in
            .store(saturate(s.heartbeats_in.into()), Relaxed);
        self.heartbeats_out
            .store(saturate(s.heartbeats_out.into()), Relaxed);
    }

    /// The state machine's counters as last published ([`update`](Self::update)). A parked
    /// connection's frozen state machine does not keep them (`driver::Parked`): its thaw
    /// takes them from here.
    pub(crate) fn counters(&self) -> ConnStats {
        ConnStats {
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            heartbeats_in: self.heartbeats_in.load(Relaxed).into(),
            heartbeats_out: self.heartbeats_out.load(Relaxed).into(),
        }
    }

    /// Whether the published counters are exactly `c` (the state machine's): true after
    /// [`update`](Self::update) until it counts more, except past 2^32 - 1 heartbeats either
    /// way, where the 32-bit counts saturate.
    pub(crate) fn holds(&self, c: &ConnStats) -> bool {
        self.counters() == *c
    }

    /// The session's highest number the peer acknowledged, as of the task's last pass.
    pub(crate) fn acked(&self) -> u64 {
        self.acked.load(Relaxed)
    }

    pub(crate) fn timer_reset(&self) {
        #[cfg(test)]
        self.timer_resets.fetch_add(1, Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn polled(&self) {
        self.polls.fetch_add(1, Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn polls(&self) -> u64 {
        self.polls.load(Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn timer_resets(&self) -> u64 {
        self.timer_resets.load(Relaxed)
    }

    /// Reads every counter.
    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let rx = self.last_rx_us.load(Relaxed);
        let rtt = self.srtt_us.load(Relaxed);
        let last_rx = (rx > 0).then(|| base() + Duration::from_micros(rx - 1));
        StatsSnapshot {
            srtt: (rtt > 0).then(|| Duration::from_micros(rtt.into())),
            ..StatsSnapshot::from_counters(self.counters(), last_rx)
        }
    }
}

/// A count for a 32-bit counter, saturating.
fn saturate(v: u128) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A last arrival published as an offset from the base stores what the instant itself
    /// would: before, at and after the base, to the microsecond's rounding.
    #[test]
    fn a_last_arrival_published_as_an_offset_is_the_instant_published() {
        let origin = base();
        let c = ConnStats::default();
        for ns in [
            -500_000_000i64,
            -1,
            0,
            1,
            999,
            1_000,
            1_001,
            123_456_789,
            86_400_000_000_123,
        ] {
            let t = tether_proto::offset::instant(origin, ns);
            let (a, o) = (Stats::default(), Stats::default());
            a.publish(&c, t);
            o.publish_offset(&c, ns);
            assert_eq!(
                a.last_rx_us.load(Relaxed),
                o.last_rx_us.load(Relaxed),
                "{ns} ns after the origin"
            );
            assert_eq!(a.snapshot(), o.snapshot());
        }
    }
}
