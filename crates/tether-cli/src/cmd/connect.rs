//! `tether connect`: a line-oriented tether client that reconnects on its own.

use std::net::SocketAddr;
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
use tokio::io::AsyncWriteExt;

use crate::config::{parse_addr, parse_bool, parse_duration, parse_size, Layers};
use crate::exit::Exit;
use crate::log;
use crate::security::{host_of, ClientSecurity, ClientSecurityArgs, CLIENT_KEYS};

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

/// Connect to a tether server; send stdin lines as messages, print what arrives.
///
/// Each line read from stdin is sent as one message (without its newline); each message that
/// arrives is printed on stdout as one line. Connection state changes (connected,
/// disconnected with the reason and how long the server had been silent, reconnecting with
/// the attempt and delay) go to stderr. When the connection dies the client reconnects with
/// capped exponential backoff and full jitter, and resumes its session: messages sent into a
/// dead connection are delivered after the reconnect, once and in order (or the log says
/// which may be lost). End of stdin closes the connection in order after --linger; Ctrl-C
/// or SIGTERM closes it at once (within a second), even while stdin is still open.
///
/// Delivery: a line counts as delivered once it left the local queue for a connection
/// and the server did not report it lost (with a session, the server acknowledges what it
/// received; a session it cannot resume names the unacknowledged lines, and those count as
/// not delivered). Lines still queued at exit, or read while no connection was ever made
/// (nothing listening: connect-refused), were not delivered: the exit code says so.
///
/// Exit codes: 0 every line delivered (after end of stdin, or a signal); 1 runtime error
/// (gave up connecting); 2 bad arguments; 3 the server refused the connection;
/// 5 replaced by a newer connection with the same --id (terminal: no reconnect);
/// 6 lines read from stdin were not delivered.
///
/// Security: --tls (or --ca, --server-name, --cert) speaks TLS and verifies the server's
/// certificate for the host as written in ADDR; --token or --token-file presents a
/// credential, refreshed in band before it expires when the file has a newer one. A refusal
/// for the credential (unauthorized, id-not-allowed) is final: exit 3.
///
/// Examples:
///   tether connect 127.0.0.1:7300 --id alice
///   echo hello | tether connect 127.0.0.1:7300 --id bot --path aws-nlb
///   tether connect tether.example.com:7300 --tls --id alice --token-file alice.jwt
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub(crate) struct ConnectArgs {
    /// Server address (HOST:PORT, or a port on 127.0.0.1).
    #[arg(value_name = "ADDR", value_parser = parse_target)]
    addr: Target,
    /// Client id (1-255 bytes; no control or invisible format characters, no line separators).
    /// [default: HOSTNAME-PID]
    #[arg(long, value_name = "NAME")]
    id: Option<String>,
    /// Local detection bound for socket options; the server dictates heartbeats.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    detect_within: Duration,
    /// Idle timeout of the path: a preset name (`tether plan --list`), PRESET=DURATION, or a
    /// duration.
    #[arg(long, value_name = "PRESET|DURATION", value_parser = PathSpec::parse)]
    path: Option<PathSpec>,
    /// Reconnect after a disconnect (true/false).
    #[arg(long, value_name = "BOOL", default_value = "true", value_parser = parse_bool)]
    reconnect: bool,
    /// Longest delay between reconnect attempts.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    backoff_cap: Duration,
    /// Ask for a resumable session (messages survive reconnects exactly once).
    #[arg(long, value_name = "BOOL", default_value = "true", value_parser = parse_bool)]
    session: bool,
    /// Unacknowledged bytes kept for replay; sending waits beyond this.
    #[arg(long, value_name = "BYTES", default_value = "4MiB", value_parser = parse_size)]
    replay_buffer: usize,
    /// After end of stdin, keep printing replies this long before closing.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    linger: Duration,
    /// TOML file with any of the settings above.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    security: ClientSecurityArgs,
}

/// The server address as written (its host names the server for TLS) and resolved.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    addr: SocketAddr,
}

fn parse_target(s: &str) -> std::result::Result<Target, String> {
    Ok(Target {
        host: host_of(s),
        addr: parse_addr(s)?,
    })
}

pub(crate) fn run(args: ConnectArgs, matches: &clap::ArgMatches) -> Result<ExitCode> {
    let keys: Vec<&str> = KEYS.iter().chain(CLIENT_KEYS).copied().collect();
    let l = Layers::load(args.config.as_deref(), &keys)?.given(matches);
    let id = l
        .pick_opt("id", args.id.clone(), |s| Ok::<_, String>(s.to_owned()))?
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "client".into());
            format!("{host}-{}", std::process::id())
        });
    let detect = l.pick("detect_within", args.detect_within, parse_duration)?;
    let path = l.pick_opt("path", args.path, PathSpec::parse)?;
    let policy = Policy::derive(detect, path).context("the liveness settings are inconsistent")?;
    let reconnect = l.pick("reconnect", args.reconnect, parse_bool)?;
    let cap = l.pick("backoff_cap", args.backoff_cap, parse_duration)?;
    let id_check = tether_proto::check_client_id(&id);
    if let Err(e) = id_check {
        return Err(crate::exit::UsageError(format!("--id {id:?}: {e}")).into());
    }
    let sec = ClientSecurity::resolve(&args.security, &l, &args.addr.host)?;
    let mut cfg = ClientConfig::new(args.addr.addr, id);
    cfg.connect.policy = policy;
    cfg.connect.tls = sec.tls;
    cfg.connect.credential = sec.credentials;
    cfg.backoff = BackoffConfig {
        cap,
        max_attempts: (!reconnect).then_some(0),
        ..BackoffConfig::default()
    };
    cfg.session = l.pick("session", args.session, parse_bool)?;
    cfg.session_config.max_replay_bytes =
        l.pick("replay_buffer", args.replay_buffer, parse_size)?;
    let linger = l.pick("linger", args.linger, parse_duration)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(connect(cfg, linger))
}

/// What became of the lines read from stdin. The rule (also in `--help`): a line is
/// delivered once it left this process's queue for a connection that the server did not
/// name as lost; with a session (the default) the server acknowledges what it received and
/// a session it could not resume names the unacknowledged sequence numbers
/// (`session-lost`), which count as not delivered; without a session a line counts as
/// delivered once written to a connection. Lines still queued at exit, or read while no
/// connection was ever established, were not delivered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Delivery {
    /// Lines read from stdin and given to the client.
    read: u64,
    /// Whether any connection was established.
    connected: bool,
    /// Lines named by `session-lost` (may not have arrived).
    lost: u64,
}

impl Delivery {
    /// Lines not delivered, given how many are still queued in the client.
    fn undelivered(&self, queued: u64) -> u64 {
        if !self.connected {
            return self.read;
        }
        (queued + self.lost).min(self.read)
    }
}

/// How `connect` ends, for the exit code and the last words.
enum End {
    /// Stdin ended and the connection closed in order (or could not close in time).
    Done,
    /// Ctrl-C or SIGTERM.
    Signal,
    /// The server refused the connection for good.
    Refused(String),
    /// A newer connection with the same id took over (terminal: no reconnect).
    Replaced,
    /// The client gave up (a refusal retrying cannot fix, or attempts exhausted).
    GaveUp(String),
}

/// Reads stdin lines on a thread of its own: a blocking read can neither be cancelled nor
/// awaited at exit, so the thread is abandoned, never joined, and exit does not wait for
/// Enter. `None` at end of input (or a read error).
fn stdin_lines() -> tokio::sync::mpsc::Receiver<Option<String>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            use std::io::BufRead;
            for line in std::io::stdin().lock().lines() {
                match line {
                    Ok(l) => {
                        if tx.blocking_send(Some(l)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.blocking_send(None);
        });
    if spawned.is_err() {
        // No thread: behave as if stdin were empty (the receiver sees the channel closed).
        log::line(
            "-",
            "stdin",
            "cannot start the stdin reader; reading nothing",
        );
    }
    rx
}

async fn connect(cfg: ClientConfig, linger: Duration) -> Result<ExitCode> {
    // Signal handlers first: a SIGTERM right after start must close in order, not kill.
    let stop = log::shutdown_signal();
    tokio::pin!(stop);
    let id = cfg.connect.client_id.clone();
    let addr = cfg.addr;
    let mut client = Client::start(cfg);
    let mut stdin = stdin_lines();
    let mut stdout = tokio::io::stdout();
    // After end of stdin: keep printing replies for `linger`, then close in order.
    let mut stdin_open = true;
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let closing = tokio::time::sleep_until(far);
    tokio::pin!(closing);
    let mut closed_at: Option<tokio::time::Instant> = None;
    let mut delivery = Delivery::default();
    let mut last_reason: Option<DisconnectReason> = None;
    let end = loop {
        tokio::select! {
            ev = client.next_event() => match ev {
                Some(ClientEvent::Connected { welcome }) => {
                    delivery.connected = true;
                    let session = match &welcome.session {
                        Some(s) if s.resumed => format!(" session={} resumed=true", s.session_id),
                        Some(s) => format!(" session={} linger={}", s.session_id, Human::ms(s.linger)),
                        None => String::new(),
                    };
                    log::line(
                        &id,
                        "connected",
                        &format!("server={addr} heartbeat={} dead_after={}{session}", Human::ms(welcome.heartbeat), Human::ms(welcome.dead_after)),
                    )
                }
                Some(ClientEvent::Resumed { replayed }) => {
                    log::line(&id, "resumed", &log::kv(&[("replayed", &replayed.to_string()), ("note", "messages the server had not received are sent again")]))
                }
                Some(ClientEvent::SessionLost { unacked }) => {
                    let what = match &unacked {
                        Some(r) => {
                            delivery.lost += r.end().saturating_sub(*r.start()) + 1;
                            format!("messages {}..={} may not have been delivered", r.start(), r.end())
                        }
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
                    let reason = disconnect.reason.clone();
                    last_reason = Some(reason.clone());
                    match &reason {
                        DisconnectReason::Refused { code, text }
                            if *code != tether::CloseCode::SESSION_UNKNOWN
                                && *code != tether::CloseCode::SESSION_BUSY
                                && *code != tether::CloseCode::THROTTLED =>
                        {
                            break End::Refused(format!("{text} (code {code})"));
                        }
                        DisconnectReason::Replaced => break End::Replaced,
                        DisconnectReason::PeerClose { code, .. } if *code == tether::CloseCode::REPLACED => {
                            break End::Replaced
                        }
                        _ => {}
                    }
                    if closed_at.is_some() {
                        break End::Done;
                    }
                    log::line(
                        &id,
                        "disconnected",
                        &format!("reason={} silent_for={}", log::quote(&reason.to_string()), Human::ms(disconnect.silent_for)),
                    );
                }
                Some(ClientEvent::Reconnecting { attempt, delay }) => {
                    log::line(&id, "reconnecting", &format!("attempt={attempt} in={}", Human::ms(delay)))
                }
                Some(ClientEvent::GaveUp { reason, .. }) => break End::GaveUp(reason.to_string()),
                Some(_) => {}
                None => break if closed_at.is_some() { End::Done } else { End::GaveUp("the client stopped".into()) },
            },
            line = stdin.recv(), if stdin_open => match line {
                Some(Some(l)) => {
                    delivery.read += 1;
                    if let Err(e) = client.send(Bytes::from(l.into_bytes())).await {
                        log::line(&id, "send-failed", &e.to_string());
                    }
                }
                Some(None) | None => {
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
                    Some(_) => break End::Done,
                }
            }
            _ = &mut stop => break End::Signal,
        }
    };
    let queued = client.queued() as u64;
    if matches!(end, End::Signal) {
        // Close in order, but do not wait long: a service manager waits for us.
        client.close();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(ev) = client.next_event().await {
                if matches!(ev, ClientEvent::Disconnected { .. }) {
                    break;
                }
            }
        })
        .await;
    }
    let undelivered = delivery.undelivered(queued);
    let why = match (&end, &last_reason) {
        (_, _) if !delivery.connected => match &last_reason {
            Some(r) => format!("never connected to {addr} (last: {r})"),
            None => format!("never connected to {addr}"),
        },
        _ => "the connection ended first".to_owned(),
    };
    let code = match end {
        End::Refused(text) => {
            eprintln!("error: the server at {addr} refused the connection: {text}");
            Exit::Refused
        }
        End::Replaced => {
            eprintln!(
                "error: replaced: a newer connection with client id {id:?} took over; not reconnecting \
                 ({queued} message(s) still queued here were not sent)"
            );
            Exit::Replaced
        }
        End::GaveUp(reason) => {
            eprintln!("error: gave up connecting to {addr}: {reason}");
            if undelivered > 0 {
                Exit::NotDelivered
            } else {
                Exit::Failure
            }
        }
        End::Done | End::Signal => {
            if undelivered > 0 {
                Exit::NotDelivered
            } else {
                Exit::Success
            }
        }
    };
    if undelivered > 0 && code != Exit::Replaced {
        eprintln!(
            "error: {undelivered} of {} message(s) read from stdin {} not delivered: {why}",
            delivery.read,
            if undelivered == 1 { "was" } else { "were" }
        );
    }
    Ok(code.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_rule() {
        let mut d = Delivery {
            read: 3,
            ..Delivery::default()
        };
        assert_eq!(
            d.undelivered(0),
            3,
            "never connected: nothing was delivered"
        );
        d.connected = true;
        assert_eq!(d.undelivered(0), 0);
        assert_eq!(d.undelivered(2), 2, "still queued here");
        d.lost = 2;
        assert_eq!(d.undelivered(2), 3, "never more than was read");
        assert_eq!(Delivery::default().undelivered(0), 0);
    }
}
