//! Server-wide counters: totals of ended connections plus what live ones did so far.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tether_proto::DisconnectReason;

use super::events::ServerMetrics;
use super::Inner;
use crate::driver::StatsSnapshot;

/// Counters folded in when connections end (live ones are read from their own counters).
#[derive(Debug, Default)]
pub(super) struct Totals {
    pub(super) heartbeats_sent: AtomicU64,
    pub(super) heartbeats_received: AtomicU64,
    pub(super) messages_received: AtomicU64,
    pub(super) messages_sent: AtomicU64,
    pub(super) accepted: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) disconnects: [AtomicU64; DisconnectReason::LABELS.len()],
}

impl Totals {
    /// Folds an ended connection's counters in.
    pub(super) fn fold(&self, s: &StatsSnapshot) {
        self.heartbeats_sent.fetch_add(s.heartbeats_out, Relaxed);
        self.heartbeats_received.fetch_add(s.heartbeats_in, Relaxed);
        self.messages_received.fetch_add(s.messages_in, Relaxed);
        self.messages_sent.fetch_add(s.messages_out, Relaxed);
    }
}

impl Inner {
    pub(super) fn metrics(&self) -> ServerMetrics {
        let t = &self.totals;
        let mut m = ServerMetrics {
            connections: self.open.load(Relaxed),
            handshaking: self.admission.handshaking(),
            parked: self.lot.as_ref().map_or(0, |l| l.parked()),
            presence: super::lifecycle::lock(&self.registry).counts(),
            disconnects: DisconnectReason::LABELS
                .iter()
                .zip(t.disconnects.iter())
                .map(|(l, c)| (*l, c.load(Relaxed)))
                .collect(),
            heartbeats_sent: t.heartbeats_sent.load(Relaxed),
            heartbeats_received: t.heartbeats_received.load(Relaxed),
            messages_received: t.messages_received.load(Relaxed),
            messages_sent: t.messages_sent.load(Relaxed),
            accepted: t.accepted.load(Relaxed),
            refused: t.refused.load(Relaxed),
            queued_bytes: self.budgets.backlog.used(),
            partial_frame_bytes: self.budgets.frames.used(),
            unsent_bytes: self.budgets.unsent.used(),
        };
        // Add what live connections did so far (ended ones were folded into the totals).
        self.clients.for_each_live(|shared| {
            let s = shared.stats.snapshot();
            m.heartbeats_sent += s.heartbeats_out;
            m.heartbeats_received += s.heartbeats_in;
            m.messages_received += s.messages_in;
            m.messages_sent += s.messages_out;
        });
        m
    }
}
