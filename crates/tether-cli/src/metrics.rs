//! The one metrics registry helper: `serve`, `proxy` and `tunnel` each build a
//! [`prometheus_client`] registry at start (counters registered where they are counted,
//! collectors over the library's snapshots for what the library counts) and serve it with
//! [`route`] as OpenMetrics text.
//!
//! Naming (Prometheus conventions): every name starts with `tether_`; a counter is registered
//! without its suffix and exposed as `…_total`; units are base units in the name (`_bytes`,
//! `_seconds`); label values are the lowercase names the logs use (`reason="heartbeat-timeout"`).

use std::fmt;
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format, which Prometheus negotiates.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry as OpenMetrics text.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail; an encoding error would be a bug in a collector,
    // and the partial text is still the most useful answer.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "metrics: encoding failed");
    }
    out
}

/// `GET /metrics` over `registry`.
pub(crate) fn route(registry: Arc<Registry>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = Arc::clone(&registry);
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&registry)).into_response() }
        }),
    )
}

/// Writes metric families from a snapshot, for [`prometheus_client::collector::Collector`]s.
pub(crate) struct Families<'a> {
    encoder: DescriptorEncoder<'a>,
}

impl<'a> Families<'a> {
    pub(crate) fn new(encoder: DescriptorEncoder<'a>) -> Self {
        Families { encoder }
    }

    /// A counter without labels (`name` without `_total`).
    pub(crate) fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let c = ConstCounter::new(value);
        let m = self
            .encoder
            .encode_descriptor(name, help, None, c.metric_type())?;
        c.encode(m)
    }

    /// A gauge without labels.
    pub(crate) fn gauge(&mut self, name: &str, help: &str, value: i64) -> fmt::Result {
        let g = ConstGauge::new(value);
        let m = self
            .encoder
            .encode_descriptor(name, help, None, g.metric_type())?;
        g.encode(m)
    }

    /// A counter family: one sample per label set.
    pub(crate) fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut m = self.encoder.encode_descriptor(
            name,
            help,
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (labels, v) in samples {
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A gauge family: one sample per label set.
    pub(crate) fn gauges<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, i64)>,
    ) -> fmt::Result {
        let mut m = self.encoder.encode_descriptor(
            name,
            help,
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (labels, v) in samples {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A saturating conversion for gauges.
pub(crate) fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
pub(crate) mod check {
    //! Checks of the exposition text shared by the metrics tests.

    /// The value of the sample line starting with `sample ` (name and labels), if present.
    pub(crate) fn value(text: &str, sample: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }

    /// Every sample's family has a `# TYPE` line before it, counters end in `_total`, and
    /// the text ends with `# EOF`.
    pub(crate) fn well_formed(text: &str) {
        let mut typed: Vec<(String, String)> = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                typed.push((it.next().unwrap().to_owned(), it.next().unwrap().to_owned()));
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let (family, kind) = typed.last().expect("a sample before any TYPE");
                match kind.as_str() {
                    "counter" => assert_eq!(name, format!("{family}_total"), "{l}"),
                    _ => assert_eq!(name, family, "{l}"),
                }
                assert!(name.starts_with("tether_"), "{l}");
            }
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
