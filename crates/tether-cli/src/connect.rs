//! `tether connect`: a line-oriented tether client that reconnects on its own.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Args;
use tether::{Client, ClientConfig, ClientEvent, DisconnectReason};
use tether_proto::backoff::BackoffConfig;
use tether_proto::duration::Human;
use tether_proto::policy::Policy;
use tether_proto::presets::PathSpec;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::config::{parse_addr, parse_duration, Layers};
use crate::log;

const KEYS: &[&str] = &[
    "id",
    "detect_within",
    "path",
    "reconnect",
    "backoff_cap",
    "session",
    "replay_buffer",
    "linger",
];

/// Exit code when the server refuses the connection.
pub(crate) const EXIT_REFUSED: u8 = 3;

/// Connect to a tether server; send stdin lines as messages, print what arrives.
///
/// Each line read from stdin is sent as one message (without its newline); each message that
/// arrives is printed on stdout as one line. Connection state changes (connected,
/// disconnected with the reason and how long the server had been silent, reconnecting with
/// the attempt and delay) go to stderr. When the connection dies the client reconnects with
/// capped exponential backoff and full jitter, and resumes its session: messages sent into a
/// dead connection are delivered after the reconnect, once and in order (or the log says
/// which may be lost). End of stdin closes the connection in order after --linger.
///
/// Exit codes: 0 after end of stdin, 1 on errors, 2 on bad arguments, 3 when the server
/// refuses the connection.
///
/// Examples:
///   tether connect 127.0.0.1:7300 --id alice
///   echo hello | tether connect 127.0.0.1:7300 --id bot --path aws-nlb
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub(crate) struct ConnectArgs {
    /// Server address (HOST:PORT).
    #[arg(value_name = "ADDR")]
    addr: String,
    /// Client id (1-255 bytes, no control characters). [default: HOSTNAME-PID]
    #[arg(long, value_name = "NAME")]
    id: Option<String>,
    /// Local detection bound for socket options; the server dictates heartbeats. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    detect_within: Option<String>,
    /// Idle timeout of the path: preset name or seconds (`tether plan --list`).
    #[arg(long, value_name = "PRESET|SECONDS")]
    path: Option<String>,
    /// Reconnect after a disconnect (true/false). [default: true]
    #[arg(long, value_name = "BOOL")]
    reconnect: Option<String>,
    /// Longest delay between reconnect attempts. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    backoff_cap: Option<String>,
    /// Ask for a resumable session (messages survive reconnects exactly once). [default: true]
    #[arg(long, value_name = "BOOL")]
    session: Option<String>,
    /// Unacknowledged bytes kept for replay; sending waits beyond this. [default: 4MiB]
    #[arg(long, value_name = "BYTES")]
    replay_buffer: Option<String>,
    /// After end of stdin, keep printing replies this long before closing. [default: 1s]
    #[arg(long, value_name = "DURATION")]
    linger: Option<String>,
    /// TOML file with any of the settings above.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub(crate) fn run(args: ConnectArgs) -> Result<ExitCode> {
    let l = Layers::load(args.config.as_deref(), KEYS)?;
    let addr = parse_addr(&args.addr)
        .map_err(|e| anyhow::anyhow!("invalid server address {:?}: {e}", args.addr))?;
    let id = l
        .get("id", args.id.as_deref(), |s| Ok::<_, String>(s.to_owned()))?
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "client".into());
            format!("{host}-{}", std::process::id())
        });
    let detect = l
        .get(
            "detect_within",
            args.detect_within.as_deref(),
            parse_duration,
        )?
        .unwrap_or(Duration::from_secs(30));
    let path = l.get("path", args.path.as_deref(), |s| {
        PathSpec::parse(s).map_err(|e| e.to_string())
    })?;
    let policy = Policy::derive(detect, path).context("the liveness settings are inconsistent")?;
    let reconnect = l
        .get(
            "reconnect",
            args.reconnect.as_deref(),
            crate::config::parse_bool,
        )?
        .unwrap_or(true);
    let cap = l
        .get("backoff_cap", args.backoff_cap.as_deref(), parse_duration)?
        .unwrap_or(Duration::from_secs(30));
    let mut cfg = ClientConfig::new(addr, id);
    cfg.connect.policy = policy;
    cfg.backoff = BackoffConfig {
        cap,
        max_attempts: (!reconnect).then_some(0),
        ..BackoffConfig::default()
    };
    cfg.session = l
        .get(
            "session",
            args.session.as_deref(),
            crate::config::parse_bool,
        )?
        .unwrap_or(true);
    if let Some(b) = l.get(
        "replay_buffer",
        args.replay_buffer.as_deref(),
        crate::config::parse_bytes,
    )? {
        cfg.session_config.max_replay_bytes = usize::try_from(b).unwrap_or(usize::MAX);
    }
    let linger = l
        .get("linger", args.linger.as_deref(), parse_duration)?
        .unwrap_or(Duration::from_secs(1));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(connect(cfg, linger))
}

async fn connect(cfg: ClientConfig, linger: Duration) -> Result<ExitCode> {
    let id = cfg.connect.client_id.clone();
    let addr = cfg.addr;
    let mut client = Client::start(cfg);
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let stop = log::shutdown_signal();
    tokio::pin!(stop);
    // After end of stdin: keep printing replies for `linger`, then close in order.
    let mut stdin_open = true;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let closing = tokio::time::sleep_until(far);
    tokio::pin!(closing);
    let mut closed_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            ev = client.next_event() => match ev {
                Some(ClientEvent::Connected { welcome }) => {
                    let session = match &welcome.session {
                        Some(s) if s.resumed => format!(" session={} (resumed)", s.session_id),
                        Some(s) => format!(" session={} linger={}", s.session_id, Human(s.linger)),
                        None => String::new(),
                    };
                    log::line(
                        &id,
                        "connected",
                        &format!("server={addr} heartbeat={} dead_after={}{session}", Human(welcome.heartbeat), Human(welcome.dead_after)),
                    )
                }
                Some(ClientEvent::Resumed { replayed }) => {
                    log::line(&id, "resumed", &format!("replayed={replayed} message(s) the server had not received"))
                }
                Some(ClientEvent::SessionLost { unacked }) => {
                    let what = match unacked {
                        Some(r) => format!("messages {}..={} may not have been delivered", r.start(), r.end()),
                        None => "nothing was outstanding".to_owned(),
                    };
                    log::line(&id, "session-lost", &what)
                }
                Some(ClientEvent::Message(m)) => {
                    stdout.write_all(&m).await?;
                    stdout.write_all(b"\n").await?;
                    stdout.flush().await?;
                }
                Some(ClientEvent::Disconnected { disconnect }) => {
                    if let DisconnectReason::Refused { code, text } = &disconnect.reason {
                        if *code != tether::CloseCode::SESSION_UNKNOWN && *code != tether::CloseCode::SESSION_BUSY {
                            eprintln!("error: the server at {addr} refused the connection: {text} (code {code})");
                            return Ok(ExitCode::from(EXIT_REFUSED));
                        }
                    }
                    if closed_at.is_some() {
                        return Ok(ExitCode::SUCCESS);
                    }
                    log::line(
                        &id,
                        "disconnected",
                        &format!("reason={} silent_for={}", disconnect.reason, Human(disconnect.silent_for)),
                    );
                }
                Some(ClientEvent::Reconnecting { attempt, delay }) => {
                    log::line(&id, "reconnecting", &format!("attempt={attempt} in {}", Human(delay)))
                }
                Some(ClientEvent::GaveUp { reason, .. }) => {
                    eprintln!("error: gave up connecting to {addr}: {reason}");
                    return Ok(ExitCode::FAILURE);
                }
                Some(_) => {}
                None => return Ok(if closed_at.is_some() { ExitCode::SUCCESS } else { ExitCode::FAILURE }),
            },
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(l)) => {
                    if let Err(e) = client.send(Bytes::from(l.into_bytes())).await {
                        log::line(&id, "send-failed", &e.to_string());
                    }
                }
                Ok(None) | Err(_) => {
                    stdin_open = false;
                    closing.as_mut().reset(tokio::time::Instant::now() + linger);
                }
            },
            _ = &mut closing => {
                match closed_at {
                    None => {
                        client.close();
                        let t = tokio::time::Instant::now();
                        closed_at = Some(t);
                        closing.as_mut().reset(t + Duration::from_secs(2));
                    }
                    // The close did not complete in time (peer unreachable): give up waiting.
                    Some(_) => return Ok(ExitCode::SUCCESS),
                }
            }
            _ = &mut stop => {
                client.close();
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}
