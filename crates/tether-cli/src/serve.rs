//! `tether serve`: the connection server with presence, an event log and a status page.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Args;
use tether::{Server, ServerConfig, ServerEvent, ServerHandle};
use tether_proto::duration::Human;
use tether_proto::policy::Policy;
use tether_proto::presence::PresenceState;

use crate::config::{parse_addr, parse_bytes, parse_count, parse_duration, Layers, PolicyFlags};
use crate::http::{self, ClientRow, MetricsSnapshot, PresenceView, StatusSource};
use crate::log;

const KEYS: &[&str] = &[
    "listen",
    "http",
    "detect_within",
    "path",
    "echo",
    "max_connections",
    "handshake_timeout",
    "max_frame",
    "heartbeat",
    "idle_timeout",
    "session_linger",
    "replay_buffer",
    "replay_messages",
];

/// Run a tether server that knows who is online.
///
/// Clients connect with the tether protocol (`tether connect`, or the `tether` library). The
/// server dictates the heartbeat interval and applies `--detect-within`: a client that sends
/// nothing at all for that long is declared dead (`heartbeat-timeout`), and both sides' TCP
/// keepalive and TCP_USER_TIMEOUT are set to match. Every connect, state change and
/// disconnect is logged on stderr with its reason and how long the client had been silent.
///
/// Settings come from flags, then `TETHER_<KEY>` environment variables (e.g.
/// TETHER_DETECT_WITHIN=10s), then a TOML file given with --config (keys as the long flags,
/// e.g. `detect_within = "10s"`), then defaults.
///
/// Examples:
///   tether serve                                   # 127.0.0.1:7300, status page on :7301
///   tether serve --path azure-lb --detect-within 20s --echo
///   tether serve --listen 0.0.0.0:7300 --http off --config /etc/tether.toml
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub(crate) struct ServeArgs {
    /// Address to accept tether clients on. [default: 127.0.0.1:7300]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Address of the status page (/, /api/clients, /metrics), or "off". [default: 127.0.0.1:7301]
    #[arg(long, value_name = "ADDR|off")]
    http: Option<String>,
    /// Declare a silent client dead within this long (e.g. 30s, 500ms, 2m). [default: 30s]
    #[arg(long, value_name = "DURATION")]
    detect_within: Option<String>,
    /// Idle timeout of the path in front of the server: a preset name (`tether plan --list`)
    /// or seconds. Heartbeats and keepalive are kept well under it.
    #[arg(long, value_name = "PRESET|SECONDS")]
    path: Option<String>,
    /// Echo every message back to its sender (for demos and tests).
    #[arg(long)]
    echo: bool,
    /// Refuse connections beyond this many (`server-full`). [default: 100000]
    #[arg(long, value_name = "N")]
    max_connections: Option<String>,
    /// A client must say hello within this long. [default: 10s]
    #[arg(long, value_name = "DURATION")]
    handshake_timeout: Option<String>,
    /// Longest frame accepted (e.g. 1MiB). [default: 1MiB]
    #[arg(long, value_name = "BYTES")]
    max_frame: Option<String>,
    /// Override the derived heartbeat interval (must stay valid for --detect-within and --path).
    #[arg(long, value_name = "DURATION")]
    heartbeat: Option<String>,
    /// Close a client's connection after this long without application data (heartbeats do
    /// not count). Off by default.
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<String>,
    /// Hold a disconnected client's session this long so it can resume without losing or
    /// duplicating a message (the client shows as `resuming`), or "off". [default: 30s]
    #[arg(long, value_name = "DURATION|off")]
    session_linger: Option<String>,
    /// Unacknowledged bytes kept per session for replay; sending waits beyond this. [default: 4MiB]
    #[arg(long, value_name = "BYTES")]
    replay_buffer: Option<String>,
    /// Unacknowledged messages kept per session for replay. [default: 4096]
    #[arg(long, value_name = "N")]
    replay_messages: Option<String>,
    /// TOML file with any of the settings above.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Everything `serve` needs, resolved from the layers.
#[derive(Debug)]
pub(crate) struct ServeSettings {
    pub(crate) listen: SocketAddr,
    pub(crate) http: Option<SocketAddr>,
    pub(crate) policy: Policy,
    pub(crate) echo: bool,
    pub(crate) max_connections: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_frame: u32,
    pub(crate) session_linger: Option<Duration>,
    pub(crate) session: tether_proto::session::SessionConfig,
}

impl ServeArgs {
    pub(crate) fn resolve(&self) -> Result<ServeSettings> {
        let l = Layers::load(self.config.as_deref(), KEYS)?;
        let listen = l
            .get("listen", self.listen.as_deref(), parse_addr)?
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7300)));
        let http = l.optional_addr(
            "http",
            self.http.as_deref(),
            Some(SocketAddr::from(([127, 0, 0, 1], 7301))),
        )?;
        let flags = PolicyFlags {
            detect_within: self.detect_within.as_deref(),
            path: self.path.as_deref(),
            heartbeat: self.heartbeat.as_deref(),
            idle_timeout: self.idle_timeout.as_deref(),
        };
        let mut policy = l.policy(flags, Duration::from_secs(30))?;
        // RTT for the status page: one PING every three heartbeat intervals (it replaces a
        // heartbeat, so it costs 9 bytes more, not an extra packet).
        policy
            .ping_interval
            .get_or_insert(policy.heartbeat_interval * 3);
        let max_frame = l.get("max_frame", self.max_frame.as_deref(), |s| {
            let n = parse_bytes(s)?;
            if !(16..=1 << 30).contains(&n) {
                return Err("must be between 16 B and 1 GiB".to_owned());
            }
            Ok(n as u32)
        })?;
        let session_linger = match l.raw("session_linger", self.session_linger.as_deref()) {
            Some((v, _)) if v.eq_ignore_ascii_case("off") => None,
            _ => Some(
                l.get(
                    "session_linger",
                    self.session_linger.as_deref(),
                    parse_duration,
                )?
                .unwrap_or(Duration::from_secs(30)),
            ),
        };
        let mut session = tether_proto::session::SessionConfig::default();
        if let Some(b) = l.get("replay_buffer", self.replay_buffer.as_deref(), parse_bytes)? {
            session.max_replay_bytes = usize::try_from(b).unwrap_or(usize::MAX);
        }
        if let Some(n) = l.get(
            "replay_messages",
            self.replay_messages.as_deref(),
            parse_count,
        )? {
            session.max_replay_messages = n;
        }
        Ok(ServeSettings {
            session_linger,
            session,
            listen,
            http,
            policy,
            echo: l.flag("echo", self.echo)?,
            max_connections: l
                .get(
                    "max_connections",
                    self.max_connections.as_deref(),
                    parse_count,
                )?
                .unwrap_or(100_000),
            handshake_timeout: l
                .get(
                    "handshake_timeout",
                    self.handshake_timeout.as_deref(),
                    parse_duration,
                )?
                .unwrap_or(Duration::from_secs(10)),
            max_frame: max_frame.unwrap_or(tether_proto::codec::DEFAULT_MAX_FRAME_LEN),
        })
    }
}

/// The status page's view of a running server.
struct Status {
    handle: ServerHandle,
}

impl StatusSource for Status {
    fn clients(&self) -> Vec<ClientRow> {
        let now = tokio::time::Instant::now().into_std();
        let wall = SystemTime::now();
        self.handle
            .clients()
            .into_iter()
            .map(|c| {
                let view = PresenceView {
                    id: &c.id,
                    state: &c.state,
                    conn_id: c.conn_id,
                    remote: c.remote,
                    connected_since: c.connected_since,
                    connects: c.connects,
                    disconnects: c.disconnects,
                };
                let mut row = ClientRow::from_view(&view, now, wall);
                if let Some(s) = c.stats {
                    row.last_seen_ago = s.last_rx.map(|rx| now.saturating_duration_since(rx));
                    row.rtt = s.srtt;
                    row.messages_in = s.messages_in;
                    row.messages_out = s.messages_out;
                    row.bytes_in = s.bytes_in;
                    row.bytes_out = s.bytes_out;
                }
                row
            })
            .collect()
    }

    fn metrics(&self) -> MetricsSnapshot {
        let m = self.handle.metrics();
        let mut disconnects = [0u64; tether_proto::DisconnectReason::LABELS.len()];
        for (i, (_, n)) in m.disconnects.iter().enumerate().take(disconnects.len()) {
            disconnects[i] = *n;
        }
        MetricsSnapshot {
            connections: m.connections as u64,
            presence: m.presence,
            disconnects,
            heartbeats_sent: m.heartbeats_sent,
            heartbeats_received: m.heartbeats_received,
            messages_received: m.messages_received,
            messages_sent: m.messages_sent,
        }
    }
}

pub(crate) fn run(args: ServeArgs) -> Result<ExitCode> {
    let s = args.resolve()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(serve(s))
}

async fn serve(s: ServeSettings) -> Result<ExitCode> {
    let cfg = ServerConfig::new(s.listen)
        .policy(s.policy.clone())
        .max_connections(s.max_connections)
        .handshake_timeout(s.handshake_timeout)
        .max_frame_len(s.max_frame)
        .session_linger(s.session_linger)
        .session_config(s.session);
    let mut server = Server::bind(cfg)
        .await
        .with_context(|| format!("cannot listen on {}", s.listen))?;
    let p = &s.policy;
    log::line(
        "-",
        "listening",
        &format!(
            "addr={} heartbeat={} dead_after={} suspect_after={} keepalive={} user_timeout={}{}",
            server.local_addr(),
            Human(p.heartbeat_interval),
            Human(p.dead_after),
            Human(p.suspect_after()),
            p.keepalive
                .map(|k| format!("{}+{}x{}", Human(k.idle), k.count, Human(k.interval)))
                .unwrap_or_else(|| "off".into()),
            p.user_timeout
                .map(|u| Human(u).to_string())
                .unwrap_or_else(|| "off".into()),
            if s.echo { " echo=on" } else { "" }
        ),
    );
    if let Some(addr) = s.http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for the status page on {addr}"))?;
        log::line(
            "-",
            "status-page",
            &format!("http://{}/", listener.local_addr().unwrap_or(addr)),
        );
        tokio::spawn(http::serve_status(
            listener,
            Arc::new(Status {
                handle: server.handle(),
            }),
        ));
    }
    let mut presence = server.subscribe();
    let handle = server.handle();
    let stop = log::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            ev = server.next_event() => match ev {
                None => break,
                Some(ServerEvent::Connected { client_id, remote, conn_id, replaced }) => {
                    let extra = replaced.map(|r| format!(" replaced_conn={r}")).unwrap_or_default();
                    log::line(&client_id, "connected", &format!("remote={remote} conn={conn_id}{extra}"));
                }
                Some(ServerEvent::Message { client_id, msg, .. }) => {
                    tracing::debug!(client = %client_id, bytes = msg.len(), "message");
                    if s.echo {
                        // Never await one client here: a client that does not read is closed
                        // as a slow consumer instead of stalling everyone's echo.
                        let _ = handle.try_send(&client_id, msg);
                    }
                }
                Some(ServerEvent::Disconnected { client_id, conn_id, disconnect }) => {
                    log::line(
                        &client_id,
                        "disconnected",
                        &format!("reason={} silent_for={} conn={conn_id}", disconnect.reason, Human(disconnect.silent_for)),
                    );
                }
                Some(ServerEvent::Resumed { client_id, conn_id, replayed }) => {
                    log::line(&client_id, "resumed", &format!("conn={conn_id} replayed={replayed}"));
                }
                Some(ServerEvent::SessionLost { client_id, unacked, unsent }) => {
                    let what = match unacked {
                        Some(r) => format!("messages {}..={} may not have been delivered", r.start(), r.end()),
                        None => "nothing unacknowledged".to_owned(),
                    };
                    log::line(&client_id, "session-lost", &format!("{what}; {} never sent", unsent.len()));
                }
                Some(ServerEvent::Refused { remote, reason }) => {
                    log::line("-", "refused", &format!("remote={remote} reason={reason}"));
                }
                Some(_) => {}
            },
            ch = presence.recv() => match ch {
                Ok(ch) => match &ch.to {
                    PresenceState::Suspect => log::line(&ch.id, "suspect", "silent past heartbeat + margin"),
                    PresenceState::Online if matches!(ch.from, Some(PresenceState::Suspect)) => {
                        log::line(&ch.id, "recovered", "heard from again")
                    }
                    PresenceState::Offline { reason, silent_for, .. } => {
                        log::line(&ch.id, "offline", &format!("reason={reason} silent_for={}", Human(*silent_for)))
                    }
                    PresenceState::Resuming { until, .. } => {
                        let left = until.saturating_duration_since(tokio::time::Instant::now().into_std());
                        log::line(&ch.id, "resuming", &format!("session held for {}", Human(left)))
                    }
                    _ => {}
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    log::line("-", "log-lagged", &format!("{n} presence changes not logged"));
                }
                Err(_) => {}
            },
            _ = &mut stop => {
                log::line("-", "shutdown", "closing every connection (going-away)");
                handle.shutdown(Duration::from_secs(3)).await;
                break;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
