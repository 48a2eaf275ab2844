//! `tether proxy`: a single-ended TCP sidecar that protects an unmodified program's connections
//! (keepalive and `TCP_USER_TIMEOUT` on both legs, the other leg closed at once when one
//! dies), with an event log on stderr and Prometheus `/metrics`.
//!
//! The relay itself is `tether::proxy`; this module resolves the settings, logs events,
//! counts them, and serves `/metrics` on the shared HTTP stack ([`crate::http`]).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tether::proxy::{CopyMode, Proxy, ProxyConfig, ProxyEvent, ProxyHandle, PROXY_REASONS};
use tether_proto::duration::Human;

use crate::config::{parse_addr, parse_count, parse_duration, Layers, PolicyFlags};
use crate::exit::UsageError;
use crate::log;

const KEYS: &[&str] = &[
    "listen",
    "upstream",
    "http",
    "detect_within",
    "path",
    "idle_timeout",
    "connect_timeout",
    "max_connections",
    "copy",
    "half_close_timeout",
];

/// Relay TCP connections to an upstream and make both legs honest.
///
/// For programs that cannot be changed: put the proxy next to the program (client side) or
/// next to the server. Both legs get TCP keepalive and TCP_USER_TIMEOUT derived from
/// --detect-within (and --path, the idle timeout of a NAT or load balancer on the way), so
/// idle flows survive the middlebox and a vanished peer is detected within the bound. When
/// either leg dies, the other is closed at once: with RST when the cause was a failure
/// (reset, keepalive or user timeout, idle timeout, error), with FIN when it was an orderly
/// close. Half-closes are forwarded. Every connection's end is logged on stderr with the
/// reason, the leg, the bytes moved each way and the duration.
///
/// Settings come from flags, then `TETHER_<KEY>` environment variables (e.g.
/// TETHER_UPSTREAM=10.0.0.5:1883), then a TOML file given with --config (keys as the long
/// flags, e.g. `idle_timeout = "10m"`), then defaults.
///
/// Examples:
///   tether proxy --listen 127.0.0.1:1883 --upstream broker.example:1883 --path azure-nat-gw
///   tether proxy --listen 0.0.0.0:4000 --upstream 127.0.0.1:4001 --detect-within 10s
///   tether proxy --listen 0.0.0.0:9000 --upstream 10.0.0.7:9000 --idle-timeout 5m --http 127.0.0.1:7302
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub(crate) struct ProxyArgs {
    /// Address programs connect to (a bare port means 127.0.0.1). Required.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Address every connection is forwarded to. Required.
    #[arg(long, value_name = "ADDR")]
    upstream: Option<String>,
    /// Detect a dead peer on either leg within this long (TCP keepalive + TCP_USER_TIMEOUT).
    /// [default: 30s]
    #[arg(long, value_name = "DURATION")]
    detect_within: Option<String>,
    /// Idle timeout of the path on either leg: a preset name (`tether plan --list`) or
    /// seconds. Keepalive probes are sent well under it.
    #[arg(long, value_name = "PRESET|SECONDS")]
    path: Option<String>,
    /// Reset both legs after this long without a byte in either direction. Off by default.
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<String>,
    /// Give up connecting upstream after this long (the client gets RST). [default: the
    /// --detect-within value]
    #[arg(long, value_name = "DURATION")]
    connect_timeout: Option<String>,
    /// Reset connections beyond this many open at once. [default: 10000]
    #[arg(long, value_name = "N")]
    max_connections: Option<String>,
    /// Once one side has half-closed (sent FIN), reset both legs when the other direction
    /// moves nothing for this long, or "off" to wait for the other side's FIN forever.
    /// [default: 60s]
    #[arg(long, value_name = "DURATION|off")]
    half_close_timeout: Option<String>,
    /// Serve Prometheus /metrics on this address, or "off". [default: off]
    #[arg(long, value_name = "ADDR|off")]
    http: Option<String>,
    /// How bytes are copied: splice (Linux, zero-copy through a pipe) or buffer.
    /// [default: splice on Linux]
    #[arg(long, value_name = "splice|buffer")]
    copy: Option<String>,
    /// TOML file with any of the settings above.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Everything `proxy` needs, resolved from the layers.
#[derive(Debug)]
pub(crate) struct ProxySettings {
    pub(crate) config: ProxyConfig,
    pub(crate) http: Option<SocketAddr>,
}

/// A duration, or "off"/"none" for none.
fn parse_optional_duration(s: &str) -> std::result::Result<Option<Duration>, String> {
    if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none") {
        Ok(None)
    } else {
        parse_duration(s).map(Some)
    }
}

fn parse_copy(s: &str) -> std::result::Result<CopyMode, String> {
    match s.to_ascii_lowercase().as_str() {
        "splice" => Ok(CopyMode::Splice),
        "buffer" => Ok(CopyMode::Buffer),
        _ => Err("expected splice or buffer".into()),
    }
}

/// A required setting that no layer gave: a usage error naming every place it can come from.
fn missing(key: &str) -> UsageError {
    UsageError(format!(
        "missing --{} (or TETHER_{} or `{key}` in the config file)",
        key.replace('_', "-"),
        key.to_ascii_uppercase()
    ))
}

impl ProxyArgs {
    pub(crate) fn resolve(&self) -> Result<ProxySettings> {
        let l = Layers::load(self.config.as_deref(), KEYS)?;
        let listen = l
            .get("listen", self.listen.as_deref(), parse_addr)?
            .ok_or_else(|| missing("listen"))?;
        let upstream = l
            .get("upstream", self.upstream.as_deref(), parse_addr)?
            .ok_or_else(|| missing("upstream"))?;
        let http = l.optional_addr("http", self.http.as_deref(), None)?;
        let flags = PolicyFlags {
            detect_within: self.detect_within.as_deref(),
            path: self.path.as_deref(),
            idle_timeout: self.idle_timeout.as_deref(),
            ..PolicyFlags::default()
        };
        let policy = l.policy(flags, Duration::from_secs(30))?;
        let mut config = ProxyConfig::new(listen, upstream).policy(policy);
        if let Some(t) = l.get(
            "connect_timeout",
            self.connect_timeout.as_deref(),
            parse_duration,
        )? {
            config = config.connect_timeout(t);
        }
        if let Some(n) = l.get(
            "max_connections",
            self.max_connections.as_deref(),
            parse_count,
        )? {
            config = config.max_connections(n);
        }
        if let Some(c) = l.get("copy", self.copy.as_deref(), parse_copy)? {
            config = config.copy(c);
        }
        if let Some(t) = l.get(
            "half_close_timeout",
            self.half_close_timeout.as_deref(),
            parse_optional_duration,
        )? {
            config = config.half_close_timeout(t);
        }
        Ok(ProxySettings { config, http })
    }
}

pub(crate) fn run(args: ProxyArgs) -> Result<ExitCode> {
    let s = args.resolve()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(proxy(s))
}

async fn proxy(s: ProxySettings) -> Result<ExitCode> {
    let cfg = s.config;
    let p = cfg.policy.clone();
    let (upstream, copy) = (cfg.upstream, cfg.copy);
    let connect_timeout = cfg.connect_timeout.unwrap_or(p.detect_within);
    let proxy = Proxy::bind(cfg).await.context("cannot start the proxy")?;
    log::line(
        "-",
        "listening",
        &format!(
            "addr={} upstream={upstream} keepalive={} user_timeout={} idle_timeout={} \
             connect_timeout={} copy={}",
            proxy.local_addr(),
            p.keepalive
                .map(|k| format!("{}+{}x{}", Human(k.idle), k.count, Human(k.interval)))
                .unwrap_or_else(|| "off".into()),
            p.user_timeout
                .map(|u| Human(u).to_string())
                .unwrap_or_else(|| "off".into()),
            p.idle_timeout
                .map(|u| Human(u).to_string())
                .unwrap_or_else(|| "off".into()),
            Human(connect_timeout),
            copy.label(),
        ),
    );
    for note in p.notes() {
        log::line("-", "note", &note.to_string());
    }
    let mut registry = Registry::default();
    let counted = Counted::register(&mut registry);
    registry.register_collector(Box::new(Snapshot(proxy.handle())));
    if let Some(addr) = s.http {
        let listener = crate::http::bind(addr, "/metrics").await?;
        log::line(
            "-",
            "metrics",
            &format!("http://{}/metrics", listener.local_addr().unwrap_or(addr)),
        );
        let app = crate::metrics::route(Arc::new(registry));
        tokio::spawn(crate::http::serve(
            listener,
            app,
            crate::http::METRICS_LIMITS,
        ));
    }
    let run = proxy.run(move |ev| {
        counted.count(&ev);
        log_event(ev);
    });
    let stop = log::shutdown_signal();
    tokio::select! {
        () = run => {}
        () = stop => {
            log::line("-", "shutdown", "closing every connection");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line on stderr per event.
fn log_event(ev: ProxyEvent) {
    match ev {
        ProxyEvent::Opened { id, client, via } => {
            log::line(&client.to_string(), "open", &format!("conn={id} via={via}"));
        }
        ProxyEvent::Closed { id, client, end } => {
            let mut d = format!("conn={id} reason={}", end.reason);
            if let Some(leg) = end.leg {
                let _ = write!(d, " leg={}", leg.label());
            }
            if let Some(first) = end.first_fin {
                let _ = write!(d, " first_fin={}", first.label());
            }
            let _ = write!(
                d,
                " close={} bytes_up={} bytes_down={} duration={}",
                if end.abortive { "rst" } else { "fin" },
                end.bytes_up,
                end.bytes_down,
                // Whole milliseconds: enough for a log, and short.
                Human(Duration::from_millis(end.duration.as_millis() as u64))
            );
            log::line(&client.to_string(), "closed", &d);
        }
        ProxyEvent::SetupFailed {
            id,
            client,
            leg,
            error,
        } => {
            log::line(
                &client.to_string(),
                "setup-failed",
                &format!("conn={id} leg={} close=rst error={error}", leg.label()),
            );
        }
        ProxyEvent::Rejected { client, limit } => {
            log::line(
                &client.to_string(),
                "rejected",
                &format!("max_connections={limit} close=rst"),
            );
        }
        ProxyEvent::AcceptFailed { error } => {
            log::line(
                "-",
                "accept-failed",
                &format!("error={error} retry_in=100ms"),
            );
        }
        _ => {}
    }
}

// ---- /metrics -------------------------------------------------------------------------------

/// Counters of what the event log sees, counted where the events are handled:
///
/// ```text
///   tether_proxy_opened_total                   connections whose both legs came up
///   tether_proxy_closed_total{leg,reason}       relayed connections that ended: the leg whose
///                                               event ended it (client, upstream; none for
///                                               idle-timeout) and the DisconnectReason label
///   tether_proxy_setup_failed_total{leg}        connections reset because a leg failed to set up
///   tether_proxy_rejected_total                 connections reset at max_connections
///   tether_proxy_accept_failed_total            accept errors (e.g. out of file descriptors)
/// ```
#[derive(Debug, Clone, Default)]
pub(crate) struct Counted {
    opened: Counter,
    closed: Family<[(&'static str, &'static str); 2], Counter>,
    setup_failed: Family<[(&'static str, &'static str); 1], Counter>,
    rejected: Counter,
    accept_failed: Counter,
}

impl Counted {
    /// Registers the counters (every leg × reason pair listed from the start, at 0).
    pub(crate) fn register(registry: &mut Registry) -> Counted {
        let c = Counted::default();
        for reason in PROXY_REASONS {
            let legs: &[&str] = if reason == "idle-timeout" {
                &["none"]
            } else {
                &["client", "upstream"]
            };
            for leg in legs {
                let _ = c.closed.get_or_create(&[("leg", leg), ("reason", reason)]);
            }
        }
        for leg in ["client", "upstream"] {
            let _ = c.setup_failed.get_or_create(&[("leg", leg)]);
        }
        registry.register(
            "tether_proxy_opened",
            "Connections whose both legs came up.",
            c.opened.clone(),
        );
        registry.register(
            "tether_proxy_closed",
            "Relayed connections that ended, by the leg whose event ended them and the reason.",
            c.closed.clone(),
        );
        registry.register(
            "tether_proxy_setup_failed",
            "Connections reset because a leg could not be set up.",
            c.setup_failed.clone(),
        );
        registry.register(
            "tether_proxy_rejected",
            "Connections reset because max_connections were open.",
            c.rejected.clone(),
        );
        registry.register(
            "tether_proxy_accept_failed",
            "Accept errors (for example out of file descriptors).",
            c.accept_failed.clone(),
        );
        c
    }

    /// Counts one event.
    pub(crate) fn count(&self, ev: &ProxyEvent) {
        match ev {
            ProxyEvent::Opened { .. } => {
                self.opened.inc();
            }
            ProxyEvent::Closed { end, .. } => {
                let leg = end.leg.map_or("none", |l| l.label());
                self.closed
                    .get_or_create(&[("leg", leg), ("reason", end.reason.label())])
                    .inc();
            }
            ProxyEvent::SetupFailed { leg, .. } => {
                self.setup_failed
                    .get_or_create(&[("leg", leg.label())])
                    .inc();
            }
            ProxyEvent::Rejected { .. } => {
                self.rejected.inc();
            }
            ProxyEvent::AcceptFailed { .. } => {
                self.accept_failed.inc();
            }
            _ => {}
        }
    }
}

/// What only the relay knows, read on every scrape:
///
/// ```text
///   tether_proxy_connections_open               gauge    connections being relayed now
///   tether_proxy_channels                       gauge    pipes or 64 KiB buffers held now
///   tether_proxy_connections_total              counter  connections accepted
///   tether_proxy_bytes_total{direction}         counter  bytes relayed (up: client to upstream)
/// ```
#[derive(Debug)]
struct Snapshot(ProxyHandle);

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use crate::metrics::{gauge_value, Families};
        let m = self.0.metrics();
        let mut f = Families::new(encoder);
        f.gauge(
            "tether_proxy_connections_open",
            "Connections being relayed now.",
            gauge_value(m.open),
        )?;
        f.gauge(
            "tether_proxy_channels",
            "Pipes or 64 KiB buffers held now (busy directions; idle connections hold none).",
            gauge_value(m.channels),
        )?;
        f.counter(
            "tether_proxy_connections",
            "Connections accepted (including rejected and failed ones).",
            m.accepted,
        )?;
        f.counters(
            "tether_proxy_bytes",
            "Bytes relayed; up = client to upstream, down = upstream to client.",
            [
                ([("direction", "up")], m.bytes_up),
                ([("direction", "down")], m.bytes_down),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProxyArgs,
    }

    fn parse(argv: &[&str]) -> ProxyArgs {
        Cli::try_parse_from(std::iter::once("proxy").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn flags_resolve_to_a_config() {
        let s = parse(&[
            "--listen",
            "7400",
            "--upstream",
            "127.0.0.1:7401",
            "--detect-within",
            "10s",
            "--path",
            "azure-lb",
            "--idle-timeout",
            "5m",
            "--copy",
            "buffer",
            "--http",
            "127.0.0.1:0",
        ])
        .resolve()
        .unwrap();
        let c = &s.config;
        assert_eq!(c.listen.port(), 7400);
        assert_eq!(c.upstream.port(), 7401);
        assert_eq!(c.policy.user_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.policy.idle_timeout, Some(Duration::from_secs(300)));
        let k = c.policy.keepalive.unwrap();
        assert!(k.idle <= Duration::from_secs(80), "{k:?}"); // azure-lb 240 s / 3
        assert_eq!(c.copy, CopyMode::Buffer);
        assert!(s.http.is_some());
        assert_eq!(
            c.half_close_timeout,
            Some(Duration::from_secs(60)),
            "default"
        );
    }

    #[test]
    fn half_close_timeout_takes_a_duration_or_off() {
        let base = ["--listen", "7400", "--upstream", "127.0.0.1:7401"];
        let with = |v: &str| {
            let mut a = base.to_vec();
            a.extend(["--half-close-timeout", v]);
            parse(&a).resolve().map(|s| s.config.half_close_timeout)
        };
        assert_eq!(with("5s").unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(with("off").unwrap(), None);
        let e = with("soon").unwrap_err().to_string();
        assert!(
            e.contains("half-close-timeout") || e.contains("half_close_timeout"),
            "{e}"
        );
    }

    #[test]
    fn missing_upstream_is_a_usage_error() {
        let e = parse(&["--listen", "7400"]).resolve().unwrap_err();
        assert_eq!(crate::exit::classify(&e), crate::exit::Exit::Usage);
        assert!(e.to_string().contains("--upstream"), "{e}");
    }

    #[test]
    fn http_is_off_by_default_and_bad_values_name_the_flag() {
        let s = parse(&["--listen", "1", "--upstream", "2"])
            .resolve()
            .unwrap();
        assert_eq!(s.http, None);
        let e = parse(&["--listen", "1", "--upstream", "2", "--copy", "fast"])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("--copy"), "{e}");
        let e = parse(&["--listen", "1", "--upstream", "2", "--detect-within", "1ms"])
            .resolve()
            .unwrap_err();
        assert!(format!("{e:#}").contains("inconsistent"), "{e:#}");
    }

    #[tokio::test]
    async fn metrics_count_events_and_read_the_relay() {
        use crate::http::testing::{get, header};
        use crate::metrics::check;
        use tokio::net::TcpListener;

        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = ProxyConfig::new("127.0.0.1:0".parse().unwrap(), up.local_addr().unwrap());
        let proxy = Proxy::bind(cfg).await.unwrap();
        let mut registry = Registry::default();
        let counted = Counted::register(&mut registry);
        registry.register_collector(Box::new(Snapshot(proxy.handle())));
        let client: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        counted.count(&ProxyEvent::Rejected { client, limit: 1 });
        counted.count(&ProxyEvent::SetupFailed {
            id: 1,
            client,
            leg: tether::proxy::Leg::Upstream,
            error: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(crate::http::serve(
            l,
            crate::metrics::route(Arc::new(registry)),
            crate::http::METRICS_LIMITS,
        ));
        let (status, head, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(
            header(&head, "content-type"),
            Some(crate::metrics::CONTENT_TYPE)
        );
        check::well_formed(&text);
        for (sample, v) in [
            ("tether_proxy_connections_open", 0.0),
            ("tether_proxy_channels", 0.0),
            ("tether_proxy_connections_total", 0.0),
            ("tether_proxy_bytes_total{direction=\"up\"}", 0.0),
            ("tether_proxy_rejected_total", 1.0),
            ("tether_proxy_setup_failed_total{leg=\"upstream\"}", 1.0),
            (
                "tether_proxy_closed_total{leg=\"upstream\",reason=\"peer-reset\"}",
                0.0,
            ),
            (
                "tether_proxy_closed_total{leg=\"none\",reason=\"idle-timeout\"}",
                0.0,
            ),
            ("tether_proxy_opened_total", 0.0),
        ] {
            assert_eq!(check::value(&text, sample), Some(v), "{sample} in\n{text}");
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("tether_proxy_closed_total{"))
                .count(),
            2 * PROXY_REASONS.len() - 1
        );
        let (status, _, _) = get(addr, "/").await;
        assert_eq!(status, 404);
        server.abort();
    }
}
