//! The server's metrics: a collector over `ServerHandle::metrics()` (the library counts
//! them where they happen: in each connection's driver and in the server's totals), read on
//! every scrape.
//!
//! ```text
//!   tether_connections                     gauge    open connections (handshaking included)
//!   tether_presence{state}                 gauge    known clients per presence state
//!   tether_disconnects_total{reason}       counter  ended connections per DisconnectReason label
//!   tether_connections_accepted_total      counter  connections accepted
//!   tether_connections_refused_total       counter  connections refused (limits, bad hello, …)
//!   tether_heartbeats_sent_total           counter
//!   tether_heartbeats_received_total       counter
//!   tether_messages_received_total         counter  application messages
//!   tether_messages_sent_total             counter
//! ```

use tether::ServerHandle;
use tether_proto::presence::PresenceKind;

use crate::metrics::{gauge_value, Families};

/// A running server's counters as metric families.
#[derive(Debug)]
pub(crate) struct ServerCollector {
    /// The server.
    pub(crate) handle: ServerHandle,
}

impl prometheus_client::collector::Collector for ServerCollector {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        encode(&self.handle.metrics(), &mut Families::new(encoder))
    }
}

/// Writes one snapshot.
pub(crate) fn encode(m: &tether::ServerMetrics, f: &mut Families<'_>) -> std::fmt::Result {
    f.gauge(
        "tether_connections",
        "Open client connections (handshaking included).",
        gauge_value(m.connections as u64),
    )?;
    f.gauge(
        "tether_connections_parked",
        "Open connections parked while idle (held without a task of their own).",
        gauge_value(m.parked as u64),
    )?;
    f.gauges(
        "tether_presence",
        "Known clients by presence state.",
        PresenceKind::ALL.into_iter().map(|k| {
            (
                [("state", k.label())],
                gauge_value(m.presence.get(k) as u64),
            )
        }),
    )?;
    f.counters(
        "tether_disconnects",
        "Client connections ended, by reason.",
        m.disconnects
            .iter()
            .map(|(label, n)| ([("reason", *label)], *n)),
    )?;
    f.counter(
        "tether_connections_accepted",
        "Connections accepted.",
        m.accepted,
    )?;
    f.counter(
        "tether_connections_refused",
        "Connections refused (limits, bad hello, …).",
        m.refused,
    )?;
    f.counter(
        "tether_heartbeats_sent",
        "Heartbeat frames sent.",
        m.heartbeats_sent,
    )?;
    f.counter(
        "tether_heartbeats_received",
        "Heartbeat frames received.",
        m.heartbeats_received,
    )?;
    f.counter(
        "tether_messages_received",
        "Application messages received.",
        m.messages_received,
    )?;
    f.counter(
        "tether_messages_sent",
        "Application messages sent.",
        m.messages_sent,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::check;
    use prometheus_client::registry::Registry;
    use tether_proto::presence::PresenceCounts;
    use tether_proto::DisconnectReason;

    #[derive(Debug)]
    struct Fixed(tether::ServerMetrics);

    impl prometheus_client::collector::Collector for Fixed {
        fn encode(
            &self,
            encoder: prometheus_client::encoding::DescriptorEncoder,
        ) -> Result<(), std::fmt::Error> {
            encode(&self.0, &mut Families::new(encoder))
        }
    }

    #[test]
    fn every_state_and_reason_with_conventional_names() {
        let m = tether::ServerMetrics {
            connections: 2,
            presence: PresenceCounts {
                online: 1,
                suspect: 1,
                resuming: 0,
                offline: 3,
            },
            disconnects: DisconnectReason::LABELS
                .iter()
                .map(|l| (*l, u64::from(*l == "heartbeat-timeout") * 5))
                .collect(),
            heartbeats_sent: 10,
            heartbeats_received: 11,
            messages_received: 12,
            messages_sent: 13,
            accepted: 7,
            refused: 1,
            parked: 1,
            ..Default::default()
        };
        let mut r = Registry::default();
        r.register_collector(Box::new(Fixed(m)));
        let text = crate::metrics::render(&r);
        check::well_formed(&text);
        for (sample, v) in [
            ("tether_connections", 2.0),
            ("tether_connections_parked", 1.0),
            ("tether_presence{state=\"online\"}", 1.0),
            ("tether_presence{state=\"resuming\"}", 0.0),
            ("tether_presence{state=\"offline\"}", 3.0),
            (
                "tether_disconnects_total{reason=\"heartbeat-timeout\"}",
                5.0,
            ),
            ("tether_disconnects_total{reason=\"io-error\"}", 0.0),
            ("tether_disconnects_total{reason=\"slow-consumer\"}", 0.0),
            ("tether_connections_accepted_total", 7.0),
            ("tether_connections_refused_total", 1.0),
            ("tether_heartbeats_sent_total", 10.0),
            ("tether_heartbeats_received_total", 11.0),
            ("tether_messages_received_total", 12.0),
            ("tether_messages_sent_total", 13.0),
        ] {
            assert_eq!(check::value(&text, sample), Some(v), "{sample} in\n{text}");
        }
        assert!(text.contains("# TYPE tether_disconnects counter"), "{text}");
        let reasons = text
            .lines()
            .filter(|l| l.starts_with("tether_disconnects_total{"))
            .count();
        assert_eq!(reasons, DisconnectReason::LABELS.len());
    }
}
