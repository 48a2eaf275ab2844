//! `tether serve`: the connection server with presence, an event log and a status page.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tether::{Server, ServerConfig, ServerEvent};
use tether_proto::duration::Human;
use tether_proto::policy::Policy;
use tether_proto::presence::PresenceState;

use crate::config::{
    parse_addr, parse_addr_or_off, parse_bool, parse_bytes, parse_count, parse_duration,
    parse_duration_or_off, parse_size, Layers, Toggle, TypedPolicyFlags,
};
use crate::log;
use crate::status::metrics::ServerCollector;
use crate::status::model::ServerSource;
use tether_proto::presets::PathSpec;

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
/// SIGHUP does not stop the server: it is logged ("reload") and ignored, since nothing can
/// be reloaded yet (settings need a restart; TLS certificates will be reloaded on SIGHUP).
/// Ctrl-C or SIGTERM closes every connection with CLOSE(going-away) and exits.
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
    /// Address to accept tether clients on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7300", value_parser = parse_addr)]
    listen: SocketAddr,
    /// Address of the status page (/, /api/clients, /metrics), or "off".
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:7301", value_parser = parse_addr_or_off)]
    http: Toggle<SocketAddr>,
    /// Declare a silent client dead within this long (e.g. 30s, 500ms, 2m).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    detect_within: Duration,
    /// Idle timeout of the path in front of the server: a preset name (`tether plan --list`),
    /// PRESET=DURATION, or a duration. Heartbeats and keepalive are kept well under it.
    #[arg(long, value_name = "PRESET|DURATION", value_parser = PathSpec::parse)]
    path: Option<PathSpec>,
    /// Echo every message back to its sender (for demos and tests).
    #[arg(long)]
    echo: bool,
    /// Refuse connections beyond this many (`server-full`).
    #[arg(long, value_name = "N", default_value = "100000", value_parser = parse_count)]
    max_connections: usize,
    /// A client must say hello within this long.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Longest frame accepted (16 B to 1 GiB).
    #[arg(long, value_name = "BYTES", default_value = "1MiB", value_parser = parse_max_frame)]
    max_frame: u32,
    /// Override the derived heartbeat interval (must stay valid for --detect-within and --path).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    heartbeat: Option<Duration>,
    /// Close a client's connection after this long without application data (heartbeats do
    /// not count). Off by default.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Hold a disconnected client's session this long so it can resume without losing or
    /// duplicating a message (the client shows as `resuming`), or "off".
    #[arg(long, value_name = "DURATION|off", default_value = "30s", value_parser = parse_duration_or_off)]
    session_linger: Toggle<Duration>,
    /// Unacknowledged bytes kept per session for replay; sending waits beyond this.
    #[arg(long, value_name = "BYTES", default_value = "4MiB", value_parser = parse_size)]
    replay_buffer: usize,
    /// Unacknowledged messages kept per session for replay.
    #[arg(long, value_name = "N", default_value = "4096", value_parser = parse_count)]
    replay_messages: usize,
    /// TOML file with any of the settings above.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// A frame limit: 16 B to 1 GiB.
fn parse_max_frame(s: &str) -> std::result::Result<u32, String> {
    let n = parse_bytes(s)?;
    if !(16..=1 << 30).contains(&n) {
        return Err("must be between 16 B and 1 GiB".to_owned());
    }
    Ok(n as u32) // ≤ 1 GiB fits
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
    /// The settings from the flags (given on the command line in `matches`), the
    /// `TETHER_*` environment and the config file.
    pub(crate) fn resolve(&self, matches: &clap::ArgMatches) -> Result<ServeSettings> {
        let l = Layers::load(self.config.as_deref(), KEYS)?.given(matches);
        let mut policy = l.typed_policy(TypedPolicyFlags {
            detect_within: self.detect_within,
            path: self.path,
            heartbeat: self.heartbeat,
            idle_timeout: self.idle_timeout,
        })?;
        // RTT for the status page: one PING every three heartbeat intervals (it replaces a
        // heartbeat, so it costs 9 bytes more, not an extra packet).
        policy
            .ping_interval
            .get_or_insert(policy.heartbeat_interval * 3);
        let session = tether_proto::session::SessionConfig {
            max_replay_bytes: l.pick("replay_buffer", self.replay_buffer, parse_size)?,
            max_replay_messages: l.pick("replay_messages", self.replay_messages, parse_count)?,
            ..Default::default()
        };
        Ok(ServeSettings {
            listen: l.pick("listen", self.listen, parse_addr)?,
            http: l.pick("http", self.http, parse_addr_or_off)?.0,
            policy,
            echo: l.pick("echo", self.echo, parse_bool)?,
            max_connections: l.pick("max_connections", self.max_connections, parse_count)?,
            handshake_timeout: l.pick(
                "handshake_timeout",
                self.handshake_timeout,
                parse_duration,
            )?,
            max_frame: l.pick("max_frame", self.max_frame, parse_max_frame)?,
            session_linger: l
                .pick("session_linger", self.session_linger, parse_duration_or_off)?
                .0,
            session,
        })
    }
}

pub(crate) fn run(args: ServeArgs, matches: &clap::ArgMatches) -> Result<ExitCode> {
    let s = args.resolve(matches)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(serve(s))
}

async fn serve(s: ServeSettings) -> Result<ExitCode> {
    // Signal handlers before anything listens: SIGTERM or SIGHUP right after start-up must
    // not kill the server without a CLOSE to anyone.
    let stop = log::shutdown_signal();
    tokio::pin!(stop);
    let mut hangups = log::Hangups::install();
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
        let listener = crate::http::bind(addr, "the status page").await?;
        log::line(
            "-",
            "status-page",
            &format!("http://{}/", listener.local_addr().unwrap_or(addr)),
        );
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ServerCollector {
            handle: server.handle(),
        }));
        let source = Arc::new(ServerSource {
            handle: server.handle(),
            rtt_every: s.policy.ping_interval,
        });
        let app = crate::status::router(source, Arc::new(registry));
        tokio::spawn(crate::http::serve(
            listener,
            app,
            crate::http::STATUS_LIMITS,
        ));
    }
    let mut presence = server.subscribe();
    let handle = server.handle();

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
                        &format!(
                            "reason={} silent_for={} conn={conn_id}",
                            log::quote(&disconnect.reason.to_string()),
                            Human::ms(disconnect.silent_for)
                        ),
                    );
                }
                Some(ServerEvent::Resumed { client_id, conn_id, replayed }) => {
                    log::line(&client_id, "resumed", &format!("conn={conn_id} replayed={replayed}"));
                }
                Some(ServerEvent::SessionLost { client_id, unacked, unsent, .. }) => {
                    let what = match unacked {
                        Some(r) => format!("messages {}..={} may not have been delivered", r.start(), r.end()),
                        None => "nothing unacknowledged".to_owned(),
                    };
                    log::line(&client_id, "session-lost", &log::kv(&[("lost", &what), ("never_sent", &unsent.len().to_string())]));
                }
                Some(ServerEvent::Refused { remote, reason }) => {
                    log::line("-", "refused", &format!("remote={remote} reason={}", log::quote(&reason.to_string())));
                }
                Some(_) => {}
            },
            ch = presence.recv() => match ch {
                Ok(ch) => match &ch.to {
                    PresenceState::Suspect => log::line(&ch.id, "suspect", "note=\"silent past heartbeat + margin\""),
                    PresenceState::Online if matches!(ch.from, Some(PresenceState::Suspect)) => {
                        log::line(&ch.id, "recovered", "note=\"heard from again\"")
                    }
                    PresenceState::Offline { reason, silent_for, .. } => {
                        log::line(&ch.id, "offline", &format!("reason={} silent_for={}", log::quote(&reason.to_string()), Human::ms(*silent_for)))
                    }
                    PresenceState::Resuming { until, .. } => {
                        let left = until.saturating_duration_since(tokio::time::Instant::now().into_std());
                        log::line(&ch.id, "resuming", &format!("held_for={}", Human::ms(left)))
                    }
                    _ => {}
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    log::line("-", "log-lagged", &format!("{n} presence changes not logged"));
                }
                Err(_) => {}
            },
            () = hangups.recv() => {
                log::line("-", "reload", "signal=SIGHUP note=\"nothing to reload yet: settings need a restart; connections untouched\"");
            }
            _ = &mut stop => {
                log::line("-", "shutdown", "close=going-away");
                handle.shutdown(Duration::from_secs(3)).await;
                break;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
