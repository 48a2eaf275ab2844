//! `tether proxy`: a single-ended TCP sidecar that protects an unmodified program's connections
//! (keepalive and `TCP_USER_TIMEOUT` on both legs, the other leg closed at once when one
//! dies), with an event log on stderr and Prometheus `/metrics`.
//!
//! The relay itself is `tether::proxy`; this module resolves the settings, logs events and
//! serves `/metrics` with a deliberately tiny HTTP/1.1 responder (GET/HEAD `/metrics` only,
//! 8 KiB head read within 5 s, at most 16 requests at once, `Connection: close`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tether::proxy::{
    CopyMode, Proxy, ProxyConfig, ProxyEvent, ProxyHandle, ProxyMetrics, PROXY_REASONS,
};
use tether_proto::duration::Human;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::{parse_addr, parse_count, parse_duration, Layers, PolicyFlags};
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

/// A required setting that no layer gave.
#[derive(Debug)]
struct Missing(&'static str);

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = self.0;
        write!(
            f,
            "missing --{} (or TETHER_{} or `{key}` in the config file)",
            key.replace('_', "-"),
            key.to_ascii_uppercase()
        )
    }
}

impl std::error::Error for Missing {}

impl ProxyArgs {
    pub(crate) fn resolve(&self) -> Result<ProxySettings> {
        let l = Layers::load(self.config.as_deref(), KEYS)?;
        let listen = l
            .get("listen", self.listen.as_deref(), parse_addr)?
            .ok_or(Missing("listen"))?;
        let upstream = l
            .get("upstream", self.upstream.as_deref(), parse_addr)?
            .ok_or(Missing("upstream"))?;
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
    let s = match args.resolve() {
        Ok(s) => s,
        Err(e) if e.downcast_ref::<Missing>().is_some() => {
            // A usage error: exit 2 like the other configuration errors.
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e),
    };
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
    if let Some(addr) = s.http {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for /metrics on {addr}"))?;
        log::line(
            "-",
            "metrics",
            &format!("http://{}/metrics", listener.local_addr().unwrap_or(addr)),
        );
        tokio::spawn(serve_metrics(listener, proxy.handle()));
    }
    let run = proxy.run(log_event);
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

/// `/metrics` in the Prometheus text exposition format (0.0.4); every leg × reason pair is
/// listed even when zero.
pub(crate) fn render_metrics(m: &ProxyMetrics) -> String {
    let mut out = String::with_capacity(2048);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut out,
        "tether_proxy_connections_open",
        "gauge",
        "Connections being relayed now.",
    );
    let _ = writeln!(out, "tether_proxy_connections_open {}", m.open);
    family(
        &mut out,
        "tether_proxy_channels",
        "gauge",
        "Pipes or 64 KiB buffers held now (busy directions; idle connections hold none).",
    );
    let _ = writeln!(out, "tether_proxy_channels {}", m.channels);
    family(
        &mut out,
        "tether_proxy_connections_total",
        "counter",
        "Connections accepted (including rejected and failed ones).",
    );
    let _ = writeln!(out, "tether_proxy_connections_total {}", m.accepted);
    family(
        &mut out,
        "tether_proxy_closed_total",
        "counter",
        "Relayed connections that ended, by the leg whose event ended them and the reason.",
    );
    for (leg, row) in ["client", "upstream", "none"].iter().zip(&m.closed) {
        for (reason, n) in PROXY_REASONS.iter().zip(row) {
            let _ = writeln!(
                out,
                "tether_proxy_closed_total{{leg=\"{leg}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
    family(
        &mut out,
        "tether_proxy_setup_failed_total",
        "counter",
        "Connections reset because the upstream leg could not be set up.",
    );
    let _ = writeln!(out, "tether_proxy_setup_failed_total {}", m.setup_failed);
    family(
        &mut out,
        "tether_proxy_rejected_total",
        "counter",
        "Connections reset because max_connections were open.",
    );
    let _ = writeln!(out, "tether_proxy_rejected_total {}", m.rejected);
    family(
        &mut out,
        "tether_proxy_bytes_total",
        "counter",
        "Bytes relayed; up = client to upstream, down = upstream to client.",
    );
    let _ = writeln!(
        out,
        "tether_proxy_bytes_total{{direction=\"up\"}} {}",
        m.bytes_up
    );
    let _ = writeln!(
        out,
        "tether_proxy_bytes_total{{direction=\"down\"}} {}",
        m.bytes_down
    );
    out
}

const MAX_HEAD: usize = 8 * 1024;
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
const MAX_CONCURRENT: usize = 16;

async fn serve_metrics(listener: TcpListener, handle: ProxyHandle) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return; // never closed
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            answer(stream, &handle).await;
        });
    }
}

async fn answer(mut stream: TcpStream, handle: &ProxyHandle) {
    let head = match tokio::time::timeout(HEAD_DEADLINE, read_head(&mut stream)).await {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(_) => {
            let _ = write_response(&mut stream, 408, "", false).await;
            return;
        }
    };
    let (status, body, head_only) = respond(&head, handle);
    let _ = tokio::time::timeout(
        HEAD_DEADLINE,
        write_response(&mut stream, status, &body, head_only),
    )
    .await;
}

/// Status, body, and whether to omit the body (HEAD).
fn respond(head: &[u8], handle: &ProxyHandle) -> (u16, String, bool) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => (200, render_metrics(&handle.metrics()), method == "HEAD"),
        ("GET" | "HEAD", _) => (
            404,
            "404 Not Found: try /metrics\n".into(),
            method == "HEAD",
        ),
        ("", _) => (400, "400 Bad Request\n".into(), false),
        _ => (405, "405 Method Not Allowed\n".into(), false),
    }
}

/// The request head (up to the blank line), or `None` if the peer closed first or it is too
/// large (then the connection is just closed).
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(i);
            return Some(buf);
        }
        if buf.len() >= MAX_HEAD {
            return None;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let phrase = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        _ => "Error",
    };
    let ctype = if status == 200 {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
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
        assert!(e.downcast_ref::<Missing>().is_some());
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

    #[test]
    fn metrics_list_every_leg_and_reason() {
        let mut m = ProxyMetrics {
            open: 2,
            accepted: 9,
            bytes_up: 100,
            bytes_down: 2000,
            channels: 3,
            ..Default::default()
        };
        m.closed[1][1] = 3; // upstream peer-reset
        let text = render_metrics(&m);
        assert!(text.contains("tether_proxy_connections_open 2\n"));
        assert!(text.contains("tether_proxy_connections_total 9\n"));
        assert!(text.contains("tether_proxy_channels 3\n"));
        assert!(
            text.contains("tether_proxy_closed_total{leg=\"upstream\",reason=\"peer-reset\"} 3\n")
        );
        assert!(
            text.contains("tether_proxy_closed_total{leg=\"none\",reason=\"idle-timeout\"} 0\n")
        );
        assert!(text.contains("tether_proxy_bytes_total{direction=\"down\"} 2000\n"));
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("tether_proxy_closed_total{"))
                .count(),
            3 * PROXY_REASONS.len()
        );
    }

    #[tokio::test]
    async fn metrics_endpoint_answers_get_head_and_404() {
        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = ProxyConfig::new("127.0.0.1:0".parse().unwrap(), up.local_addr().unwrap());
        let proxy = Proxy::bind(cfg).await.unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(serve_metrics(l, proxy.handle()));
        async fn get(addr: SocketAddr, req: &str) -> String {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("tether_proxy_connections_open 0"), "{r}");
        let r = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && !r.contains("tether_proxy"),
            "{r}"
        );
        let r = get(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
        server.abort();
    }
}
