//! `tether tunnel entry|exit`: carry an unmodified program's TCP connections across a path
//! that breaks (see `tether::tunnel` and docs/TUNNEL.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tether::tunnel::{EntryConfig, ExitConfig, TunnelEnd, TunnelEvent};
use tether::ServerConfig;
use tether_proto::duration::Human;
use tether_proto::policy::Policy;
use tether_proto::session::SessionConfig;

use crate::config::{parse_addr, parse_bytes, parse_count, parse_duration, Layers, PolicyFlags};
use crate::exit::UsageError;
use crate::log;
use crate::security::{
    host_of, ClientSecurity, ClientSecurityArgs, ServerSecurity, ServerSecurityArgs, CLIENT_KEYS,
    SERVER_KEYS,
};

/// Keys common to both sides (flags, `TETHER_<KEY>`, TOML).
const COMMON_KEYS: &[&str] = &[
    "listen",
    "http",
    "detect_within",
    "path",
    "heartbeat",
    "session_linger",
    "replay_buffer",
    "workers",
];

/// `tether tunnel --help`: wired in main.rs with `#[command(long_about = tunnel::LONG_ABOUT)]`.
pub(crate) const LONG_ABOUT: &str = "\
Carry a program's TCP connections across a path that breaks.

A pair: `tether tunnel entry` runs next to the program that connects (and cannot be changed),
`tether tunnel exit` runs next to the server it connects to. The program connects to the entry
instead of the server; each of its connections becomes one tether session to the exit, which
opens a connection to the target for it. Between the two the tether protocol runs with
heartbeats and resumable sessions:

  - the path breaks and comes back within --session-linger: the program's connections stay
    open, and no byte is lost, duplicated or reordered;
  - it stays down longer: both application connections are reset (RST);
  - a half-close (EOF) is forwarded as a half-close, a reset as a reset.

Both sides log every tunnelled connection (open, path-down, path-up, close with the reason and
the bytes moved) on stderr.

Settings come from flags, then TETHER_<KEY> environment variables (e.g.
TETHER_SESSION_LINGER=60s), then a TOML file given with --config (keys as the long flags), then
defaults.

Security: the exit refuses to listen beyond loopback without TLS (--tls-cert, --tls-key) and
authentication (--auth-secret, --auth-public-key, --auth-jwks, or --client-ca for entry
certificates) unless --insecure is given: an unauthenticated entry is refused at its HELLO and
its OPEN never reaches the target. The entry speaks TLS with --tls (or --ca, --server-name,
--cert) and presents --token / --token-file (a token from `tether token --sub NAME`: the exit
lets any authenticated entry open tunnels, and no entry can touch another's). SIGHUP makes the
exit reload its certificate and keys; open tunnels are untouched.

Examples:
  tether tunnel exit  --listen 0.0.0.0:7400 --target 127.0.0.1:1883 \
      --tls-cert exit.crt --tls-key exit.key --auth-secret tunnel.secret
  tether tunnel entry --listen 127.0.0.1:1883 --relay broker.example:7400 --path aws-nat-gw \
      --tls --token-file entry.jwt";

/// Carry a program's TCP connections across a path that breaks (entry and exit).
#[derive(Args, Debug)]
pub(crate) struct TunnelArgs {
    #[command(subcommand)]
    side: Side,
}

#[derive(Subcommand, Debug)]
enum Side {
    /// Accept the program's connections and carry each one to the exit.
    Entry(EntryArgs),
    /// Accept tunnels from entries and connect each one to the target.
    Exit(ExitArgs),
}

/// Flags of both sides.
#[derive(Args, Debug)]
struct Common {
    /// Notice a silent path within this long (e.g. 10s, 500ms). [default: 10s]
    #[arg(long, value_name = "DURATION")]
    detect_within: Option<String>,
    /// Idle timeout of the path between entry and exit: a preset name (`tether plan --list`)
    /// or seconds. Heartbeats and keepalive are kept well under it.
    #[arg(long, value_name = "PRESET|SECONDS")]
    path: Option<String>,
    /// Override the derived heartbeat interval (must stay valid for --detect-within and --path).
    #[arg(long, value_name = "DURATION")]
    heartbeat: Option<String>,
    /// Longest outage ridden out; past it both application connections are reset. The entry
    /// uses the smaller of its own and the exit's. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    session_linger: Option<String>,
    /// Unacknowledged bytes kept per connection for replay after a reconnect. [default: 4MiB]
    #[arg(long, value_name = "BYTES")]
    replay_buffer: Option<String>,
    /// Serve Prometheus /metrics on this address, or "off". [default: off]
    #[arg(long, value_name = "ADDR|off")]
    http: Option<String>,
    /// Threads that move the bytes (tokio workers), 1 to 1024. One carries a few busy
    /// connections fastest (measured: BENCHMARKS.md, "fifth pass"); more spread many busy
    /// connections over the cores. [default: 1]
    #[arg(long, value_name = "N")]
    workers: Option<String>,
    /// TOML file with any of these settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct EntryArgs {
    /// Address the program connects to instead of its server.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Address of `tether tunnel exit`.
    #[arg(long, value_name = "ADDR")]
    relay: Option<String>,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    security: ClientSecurityArgs,
}

#[derive(Args, Debug)]
struct ExitArgs {
    /// Address entries connect to.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The program's real server: every tunnelled connection is connected here.
    #[arg(long, value_name = "ADDR")]
    target: Option<String>,
    /// Tunnelled connections open at once; a connection beyond it is reset at once (no
    /// target connection is made for it). [default: 10000]
    #[arg(long, value_name = "N")]
    max_connections: Option<String>,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    security: ServerSecurityArgs,
}

/// Policy, linger, session bounds and the process settings, resolved.
struct Shared {
    policy: Policy,
    linger: Duration,
    session: SessionConfig,
    process: Process,
}

/// What the process runs with besides the tunnel's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Process {
    /// Where `/metrics` is served, if anywhere.
    http: Option<SocketAddr>,
    /// Worker threads of the runtime.
    workers: usize,
}

/// Worker threads when `--workers` is not given. One: a tunnel side's work is mostly the
/// kernel copying bytes between sockets, and with one worker a message hops between tasks on
/// one thread instead of waking the other (`benches/tunnel.rs` with `TUNNEL_BENCH_WORKERS`,
/// BENCHMARKS.md "fifth pass": fewer context switches and less CPU per byte, throughput
/// level or better with a few busy connections).
const DEFAULT_WORKERS: usize = 1;
/// More worker threads than this is a typo, not a setting.
const MAX_WORKERS: usize = 1024;

/// `--workers`: 1 to [`MAX_WORKERS`].
fn parse_workers(s: &str) -> std::result::Result<usize, String> {
    match s.replace('_', "").parse::<usize>() {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
        Ok(_) => Err(format!("must be 1 to {MAX_WORKERS} worker threads")),
        Err(_) => Err("expected a number of worker threads, like 1 or 4".into()),
    }
}

fn keys(extra: &[&'static str], security: &[&'static str]) -> Vec<&'static str> {
    let mut k = COMMON_KEYS.to_vec();
    k.extend_from_slice(extra);
    k.extend_from_slice(security);
    k
}

fn resolve_common(l: &Layers, c: &Common) -> Result<Shared> {
    let flags = PolicyFlags {
        detect_within: c.detect_within.as_deref(),
        path: c.path.as_deref(),
        heartbeat: c.heartbeat.as_deref(),
        ..PolicyFlags::default()
    };
    let policy = l.policy(flags, Duration::from_secs(10))?;
    let linger = l
        .get(
            "session_linger",
            c.session_linger.as_deref(),
            |s| match parse_duration(s) {
                Ok(d) if d.is_zero() => Err("a tunnel needs a session linger above 0".to_owned()),
                r => r,
            },
        )?
        .unwrap_or(Duration::from_secs(30));
    let mut session = SessionConfig::default();
    if let Some(b) = l.get("replay_buffer", c.replay_buffer.as_deref(), parse_bytes)? {
        if b < 64 << 10 {
            return Err(UsageError(format!(
                "invalid value {b} for the replay buffer: must be at least 64KiB"
            ))
            .into());
        }
        session.max_replay_bytes = usize::try_from(b).unwrap_or(usize::MAX);
    }
    let http = l.optional_addr("http", c.http.as_deref(), None)?;
    let workers = l
        .get("workers", c.workers.as_deref(), parse_workers)?
        .unwrap_or(DEFAULT_WORKERS);
    Ok(Shared {
        policy,
        linger,
        session,
        process: Process { http, workers },
    })
}

fn required(v: Option<SocketAddr>, flag: &str) -> Result<SocketAddr> {
    match v {
        Some(a) => Ok(a),
        None => Err(UsageError(format!("invalid value: {flag} is required")).into()),
    }
}

fn entry_config(a: &EntryArgs) -> Result<(EntryConfig, Process)> {
    let l = Layers::load(a.common.config.as_deref(), &keys(&["relay"], CLIENT_KEYS))?;
    let listen = required(
        l.get("listen", a.listen.as_deref(), parse_addr)?,
        "--listen",
    )?;
    let relay = required(l.get("relay", a.relay.as_deref(), parse_addr)?, "--relay")?;
    let relay_host = l
        .raw("relay", a.relay.as_deref())
        .map(|(v, _)| host_of(v.trim()))
        .unwrap_or_default();
    let sec = ClientSecurity::resolve(&a.security, &l, &relay_host)?;
    let s = resolve_common(&l, &a.common)?;
    let mut cfg = EntryConfig::new(listen, relay);
    cfg.tls = sec.tls;
    cfg.credential = sec.credentials;
    cfg.policy = s.policy;
    cfg.linger = s.linger;
    cfg.session = s.session;
    Ok((cfg, s.process))
}

/// The exit's settings, the process's and its TLS and authentication (for SIGHUP).
type ExitSetup = (ExitConfig, Process, Arc<ServerSecurity>);

fn exit_config(a: &ExitArgs) -> Result<ExitSetup> {
    let l = Layers::load(
        a.common.config.as_deref(),
        &keys(&["target", "max_connections"], SERVER_KEYS),
    )?;
    let listen = required(
        l.get("listen", a.listen.as_deref(), parse_addr)?,
        "--listen",
    )?;
    let target = required(
        l.get("target", a.target.as_deref(), parse_addr)?,
        "--target",
    )?;
    let s = resolve_common(&l, &a.common)?;
    let sec = ServerSecurity::resolve(&a.security, &l)?;
    sec.check_exposure(listen, "accept tunnels")?;
    let mut cfg = ExitConfig::new(listen, target);
    cfg.server = ServerConfig::new(listen)
        .policy(s.policy)
        .session_linger(Some(s.linger))
        .session_config(s.session);
    if let Some(n) = l.get("max_connections", a.max_connections.as_deref(), parse_count)? {
        cfg = cfg.max_connections(n);
    }
    if let Some(tls) = &sec.tls {
        cfg.server = cfg.server.tls(tls.clone());
    }
    // Tunnel ids are random (`tun-…`): any authenticated entry may open them; each stays
    // bound to the entry that opened it.
    let tunnels = tether::auth::AllowedIds::parse(["tun-*"]).expect("a valid pattern");
    if let Some(hook) = sec.authorizer_with_ids(Some(tunnels)) {
        cfg.server = cfg.server.authorize(hook);
    }
    Ok((cfg, s.process, Arc::new(sec)))
}

/// Runs one side until Ctrl-C or SIGTERM.
pub(crate) fn run(args: TunnelArgs) -> Result<ExitCode> {
    enum Cfg {
        Entry(EntryConfig),
        Exit(ExitConfig, Arc<ServerSecurity>),
    }
    // Resolve before starting anything, so bad settings exit with 2 at once.
    let (cfg, process) = match &args.side {
        Side::Entry(a) => {
            let (c, p) = entry_config(a)?;
            (Cfg::Entry(c), p)
        }
        Side::Exit(a) => {
            let (c, p, sec) = exit_config(a)?;
            (Cfg::Exit(c, sec), p)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(process.workers)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        match cfg {
            Cfg::Entry(c) => run_entry(c, process).await,
            Cfg::Exit(c, sec) => run_exit(c, process, sec).await,
        }
    })
}

fn policy_line(p: &Policy, linger: Duration) -> String {
    format!(
        "heartbeat={} dead_after={} keepalive={} user_timeout={} linger={}",
        Human(p.heartbeat_interval),
        Human(p.dead_after),
        p.keepalive
            .map(|k| format!("{}+{}x{}", Human(k.idle), k.count, Human(k.interval)))
            .unwrap_or_else(|| "off".into()),
        p.user_timeout
            .map(|u| Human(u).to_string())
            .unwrap_or_else(|| "off".into()),
        Human(linger),
    )
}

/// Logs one event; returns +1 for an opened connection, -1 for a closed one.
fn log_event(ev: &TunnelEvent) -> i64 {
    match ev {
        TunnelEvent::Opened { id, app } => {
            log::line(id, "open", &format!("app={app}"));
            1
        }
        TunnelEvent::PathDown { id, reason } => {
            log::line(
                id,
                "path-down",
                &format!("reason={reason}; holding the session"),
            );
            0
        }
        TunnelEvent::PathUp { id } => {
            log::line(id, "path-up", "session resumed, nothing lost");
            0
        }
        TunnelEvent::Rejected { id, limit } => {
            log::line(
                id,
                "rejected",
                &format!("at the limit of {limit} connections (--max-connections); reset"),
            );
            0
        }
        TunnelEvent::Closed {
            id,
            end,
            bytes_from_app,
            bytes_to_app,
            outages,
            duration,
        } => {
            log::line(
                id,
                "close",
                &format!(
                    "end={end} from_app={bytes_from_app} to_app={bytes_to_app} outages={outages} duration={}{}",
                    Human(*duration),
                    if end.is_failure() { " (reset)" } else { "" }
                ),
            );
            -1
        }
        _ => 0,
    }
}

/// What the loop needs of either side.
trait Running {
    async fn next(&mut self) -> Option<TunnelEvent>;
    fn stop(&self);
}

impl Running for tether::tunnel::TunnelEntry {
    async fn next(&mut self) -> Option<TunnelEvent> {
        self.next_event().await
    }
    fn stop(&self) {
        self.shutdown()
    }
}

impl Running for tether::tunnel::TunnelExit {
    async fn next(&mut self) -> Option<TunnelEvent> {
        self.next_event().await
    }
    fn stop(&self) {
        self.shutdown()
    }
}

/// Counters of the tunnelled connections, counted where the events are logged:
///
/// ```text
///   tether_tunnel_opened_total               tunnelled connections started
///   tether_tunnel_open                       gauge: tunnelled connections now
///   tether_tunnel_closed_total{end}          ended: closed, local-reset, peer-aborted,
///                                            path-lost, protocol-error, shutdown
///   tether_tunnel_path_down_total            path outages (sessions held for a resume)
///   tether_tunnel_path_up_total              sessions resumed, nothing lost
///   tether_tunnel_bytes_total{direction}     bytes of ended connections: from_app, to_app
/// ```
///
/// The exit also serves its tether server's metrics (`tether_connections`, …).
#[derive(Debug, Clone, Default)]
struct TunnelMetrics {
    opened: Counter,
    open: Gauge,
    closed: Family<[(&'static str, &'static str); 1], Counter>,
    path_down: Counter,
    path_up: Counter,
    bytes: Family<[(&'static str, &'static str); 1], Counter>,
}

/// The label of how a tunnelled connection ended.
fn end_label(end: &TunnelEnd) -> &'static str {
    match end {
        TunnelEnd::Closed => "closed",
        TunnelEnd::LocalReset(_) => "local-reset",
        TunnelEnd::PeerAborted(_) => "peer-aborted",
        TunnelEnd::PathLost(_) => "path-lost",
        TunnelEnd::Protocol(_) => "protocol-error",
        TunnelEnd::Shutdown => "shutdown",
        _ => "other",
    }
}

impl TunnelMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = TunnelMetrics::default();
        for end in [
            "closed",
            "local-reset",
            "peer-aborted",
            "path-lost",
            "protocol-error",
            "shutdown",
        ] {
            let _ = m.closed.get_or_create(&[("end", end)]);
        }
        for d in ["from_app", "to_app"] {
            let _ = m.bytes.get_or_create(&[("direction", d)]);
        }
        r.register(
            "tether_tunnel_opened",
            "Tunnelled connections started.",
            m.opened.clone(),
        );
        r.register(
            "tether_tunnel_open",
            "Tunnelled connections now.",
            m.open.clone(),
        );
        r.register(
            "tether_tunnel_closed",
            "Tunnelled connections that ended, by how.",
            m.closed.clone(),
        );
        r.register(
            "tether_tunnel_path_down",
            "Path outages ridden out (session held for a resume).",
            m.path_down.clone(),
        );
        r.register(
            "tether_tunnel_path_up",
            "Sessions resumed after an outage, nothing lost.",
            m.path_up.clone(),
        );
        r.register(
            "tether_tunnel_bytes",
            "Bytes of ended tunnelled connections: from_app (read from this side's application), to_app.",
            m.bytes.clone(),
        );
        m
    }

    fn count(&self, ev: &TunnelEvent) {
        match ev {
            TunnelEvent::Opened { .. } => {
                self.opened.inc();
                self.open.inc();
            }
            TunnelEvent::PathDown { .. } => {
                self.path_down.inc();
            }
            TunnelEvent::PathUp { .. } => {
                self.path_up.inc();
            }
            TunnelEvent::Closed {
                end,
                bytes_from_app,
                bytes_to_app,
                ..
            } => {
                self.closed.get_or_create(&[("end", end_label(end))]).inc();
                self.bytes
                    .get_or_create(&[("direction", "from_app")])
                    .inc_by(*bytes_from_app);
                self.bytes
                    .get_or_create(&[("direction", "to_app")])
                    .inc_by(*bytes_to_app);
            }
            _ => {}
        }
    }
}

/// Starts `/metrics` on `http` (if given) and returns the counters to count into.
async fn start_metrics(
    http: Option<SocketAddr>,
    server: Option<tether::ServerHandle>,
) -> Result<TunnelMetrics> {
    let mut registry = Registry::default();
    let m = TunnelMetrics::register(&mut registry);
    if let Some(handle) = server {
        registry.register_collector(Box::new(crate::status::metrics::ServerCollector { handle }));
    }
    if let Some(addr) = http {
        let listener = crate::http::bind(addr, "/metrics").await?;
        log::line(
            "-",
            "metrics",
            &format!("http://{}/metrics", listener.local_addr().unwrap_or(addr)),
        );
        let app = crate::metrics::route(std::sync::Arc::new(registry));
        tokio::spawn(crate::http::serve(
            listener,
            app,
            crate::http::METRICS_LIMITS,
        ));
    }
    Ok(m)
}

/// Logs events until Ctrl-C or SIGTERM, then resets what is open and logs those closes
/// (waiting at most 3 s). SIGHUP reloads `security`'s files (the exit's certificate and
/// keys), if any.
async fn event_loop(
    mut side: impl Running,
    metrics: TunnelMetrics,
    security: Option<Arc<ServerSecurity>>,
) -> Result<ExitCode> {
    let stop = log::shutdown_signal();
    tokio::pin!(stop);
    let mut hangups = log::Hangups::install();
    let mut open = 0;
    let log_event = |ev: &TunnelEvent| {
        metrics.count(ev);
        let d = log_event(ev);
        if d < 0 && metrics.open.get() > 0 {
            metrics.open.dec();
        }
        d
    };
    loop {
        tokio::select! {
            ev = side.next() => match ev {
                Some(ev) => open = (open + log_event(&ev)).max(0),
                None => return Ok(ExitCode::SUCCESS),
            },
            () = hangups.recv() => {
                let done = security.as_ref().map(|s| s.reload()).unwrap_or_default();
                if done.is_empty() {
                    log::line("-", "reload", "signal=SIGHUP note=\"nothing to reload: no TLS or auth files\"");
                }
                for (ok, what) in done {
                    let event = if ok { "reloaded" } else { "reload-failed" };
                    log::line("-", event, &log::kv(&[("signal", "SIGHUP"), ("what", &what), ("tunnels", "untouched")]));
                }
            }
            _ = &mut stop => break,
        }
    }
    log::line(
        "-",
        "shutdown",
        &format!("resetting {open} tunnelled connection(s)"),
    );
    side.stop();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while open > 0 {
            match side.next().await {
                Some(ev) => open += log_event(&ev),
                None => break,
            }
        }
    })
    .await;
    Ok(ExitCode::SUCCESS)
}

async fn run_entry(cfg: EntryConfig, process: Process) -> Result<ExitCode> {
    let details = format!(
        "relay={} tls={} token={} workers={} {}",
        cfg.relay,
        if cfg.tls.is_some() { "on" } else { "off" },
        if cfg.credential.is_some() {
            "on"
        } else {
            "off"
        },
        process.workers,
        policy_line(&cfg.policy, cfg.linger)
    );
    let entry = tether::tunnel::TunnelEntry::bind(cfg)
        .await
        .context("cannot start the tunnel entry")?;
    log::line(
        "-",
        "listening",
        &format!("entry addr={} {details}", entry.local_addr()),
    );
    let metrics = start_metrics(process.http, None).await?;
    event_loop(entry, metrics, None).await
}

async fn run_exit(
    cfg: ExitConfig,
    process: Process,
    security: Arc<ServerSecurity>,
) -> Result<ExitCode> {
    let details = format!(
        "target={} max_connections={} workers={} {}",
        cfg.target,
        cfg.max_connections,
        process.workers,
        policy_line(
            cfg.server.get_policy(),
            cfg.server.get_session_linger().unwrap_or_default()
        )
    );
    let exit = tether::tunnel::TunnelExit::bind(cfg)
        .await
        .context("cannot start the tunnel exit")?;
    log::line(
        "-",
        "listening",
        &format!(
            "exit addr={} {} {details}",
            exit.local_addr(),
            security.describe()
        ),
    );
    let metrics = start_metrics(process.http, Some(exit.server().clone())).await?;
    event_loop(exit, metrics, Some(security)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: TunnelArgs,
    }

    fn parse(args: &[&str]) -> TunnelArgs {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .unwrap()
            .a
    }

    #[test]
    fn entry_flags_resolve() {
        let a = parse(&[
            "entry",
            "--listen",
            "127.0.0.1:9000",
            "--relay",
            "127.0.0.1:9001",
            "--detect-within",
            "5s",
            "--session-linger",
            "1m",
            "--replay-buffer",
            "1MiB",
        ]);
        let Side::Entry(e) = &a.side else {
            panic!("not entry")
        };
        let (c, process) = entry_config(e).unwrap();
        assert_eq!(process.http, None);
        assert_eq!(process.workers, DEFAULT_WORKERS);
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.relay.port(), 9001);
        assert_eq!(c.linger, Duration::from_secs(60));
        assert_eq!(c.session.max_replay_bytes, 1 << 20);
        assert!(c.policy.dead_after <= Duration::from_secs(5));
    }

    #[test]
    fn workers_come_from_the_flag_and_a_bad_value_is_named() {
        let entry = |extra: &[&str]| {
            let mut args = vec!["entry", "--listen", "9000", "--relay", "9001"];
            args.extend_from_slice(extra);
            let a = parse(&args);
            let Side::Entry(e) = a.side else {
                panic!("not entry")
            };
            e
        };
        let (_, p) = entry_config(&entry(&["--workers", "3"])).unwrap();
        assert_eq!(p.workers, 3);
        let a = parse(&[
            "exit",
            "--listen",
            "9000",
            "--target",
            "9001",
            "--workers",
            "2",
        ]);
        let Side::Exit(e) = &a.side else {
            panic!("not exit")
        };
        assert_eq!(exit_config(e).unwrap().1.workers, 2);
        for bad in ["0", "many", "-1", "1025"] {
            let flag = format!("--workers={bad}");
            let err = format!("{:#}", entry_config(&entry(&[&flag])).err().unwrap());
            assert!(
                err.contains("--workers") && err.contains(&format!("\"{bad}\"")),
                "{bad}: {err}"
            );
            let usage = entry_config(&entry(&[&flag])).err().unwrap();
            assert!(
                usage.downcast_ref::<UsageError>().is_some(),
                "{bad}: exits 2"
            );
        }
        assert_eq!(parse_workers("1_024"), Ok(1024));
        assert_eq!(parse_workers("1"), Ok(1));
    }

    #[test]
    fn counts_every_event_with_conventional_names() {
        let mut r = Registry::default();
        let m = TunnelMetrics::register(&mut r);
        m.count(&TunnelEvent::Opened {
            id: "t1".into(),
            app: "127.0.0.1:1".parse().unwrap(),
        });
        m.count(&TunnelEvent::PathDown {
            id: "t1".into(),
            reason: "peer-reset".into(),
        });
        m.count(&TunnelEvent::PathUp { id: "t1".into() });
        m.count(&TunnelEvent::Closed {
            id: "t1".into(),
            end: TunnelEnd::PathLost("linger".into()),
            bytes_from_app: 10,
            bytes_to_app: 20,
            outages: 1,
            duration: Duration::from_secs(1),
        });
        let text = crate::metrics::render(&r);
        crate::metrics::check::well_formed(&text);
        use crate::metrics::check::value;
        assert_eq!(
            value(&text, "tether_tunnel_opened_total"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(value(&text, "tether_tunnel_open"), Some(1.0), "{text}");
        assert_eq!(value(&text, "tether_tunnel_path_down_total"), Some(1.0));
        assert_eq!(value(&text, "tether_tunnel_path_up_total"), Some(1.0));
        assert_eq!(
            value(&text, "tether_tunnel_closed_total{end=\"path-lost\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "tether_tunnel_closed_total{end=\"closed\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&text, "tether_tunnel_bytes_total{direction=\"to_app\"}"),
            Some(20.0)
        );
    }

    #[test]
    fn exit_needs_a_target_and_a_linger() {
        let a = parse(&["exit", "--listen", "127.0.0.1:9000"]);
        let Side::Exit(e) = &a.side else {
            panic!("not exit")
        };
        let err = exit_config(e).err().unwrap().to_string();
        assert!(err.contains("--target"), "{err}");
        let a = parse(&[
            "exit",
            "--listen",
            "9000",
            "--target",
            "9001",
            "--session-linger",
            "0s",
        ]);
        let Side::Exit(e) = &a.side else {
            panic!("not exit")
        };
        let err = format!("{:#}", exit_config(e).err().unwrap());
        assert!(err.contains("session linger"), "{err}");
        let a = parse(&["exit", "--listen", "9000", "--target", "9001"]);
        let Side::Exit(e) = &a.side else {
            panic!("not exit")
        };
        let (c, _, _) = exit_config(e).unwrap();
        assert_eq!(c.server.get_session_linger(), Some(Duration::from_secs(30)));
        assert_eq!(c.target.port(), 9001);
        assert_eq!(c.max_connections, 10_000, "default");
    }

    #[test]
    fn exit_max_connections() {
        let a = parse(&[
            "exit",
            "--listen",
            "9000",
            "--target",
            "9001",
            "--max-connections",
            "3",
        ]);
        let Side::Exit(e) = &a.side else {
            panic!("not exit")
        };
        assert_eq!(exit_config(e).unwrap().0.max_connections, 3);
        let a = parse(&[
            "exit",
            "--listen",
            "9000",
            "--target",
            "9001",
            "--max-connections",
            "many",
        ]);
        let Side::Exit(e) = &a.side else {
            panic!("not exit")
        };
        let err = format!("{:#}", exit_config(e).err().unwrap());
        assert!(err.contains("max"), "{err}");
    }
}
