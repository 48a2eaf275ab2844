//! [`Client`]: a tether client that reconnects on its own, with capped exponential backoff and
//! full jitter (the pure [`Backoff`] from the core), and —
//! by default — a session that survives reconnects: what was sent into a dead connection is
//! replayed after the resume, exactly once and in order.
//!
//! ```text
//!   connect ──ok──▶ Connected ──▶ Resumed{replayed}? ──▶ Message* ──error──▶ Disconnected{reason}
//!      ▲                                                                       │
//!      └──── sleep(delay) ◀── Reconnecting{attempt, delay} ◀───────────────────┘
//! ```
//!
//! Messages given to [`Client::send`] wait in an outbox that outlives single connections
//! (bounded: `send` waits when it is full), move into the session's replay buffer (bounded
//! too) when a connection can take them, and leave it when the server acknowledges them.
//! When a session cannot be resumed, [`ClientEvent::SessionLost`] names the sequence numbers
//! that may not have arrived; the outbox's messages were never sent and go out on the new
//! session.
//!
//! A refusal that cannot change by retrying (`bad-hello`, `unsupported-version`) ends the
//! client with [`ClientEvent::GaveUp`]; everything else is retried.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tether_proto::backoff::{Backoff, BackoffConfig};
use tether_proto::codec::{Hello, Welcome};
use tether_proto::session::{Session, SessionConfig};
use tether_proto::{CloseCode, Conn, ConnConfig, ConnEvent, Disconnect, DisconnectReason};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::connection::{liveness_config, ConnectOptions};
use crate::driver::{self, Limits, Shared, Sink};
use crate::sockopt;

/// What a [`Client`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// Connected (again); the server's parameters.
    Connected {
        /// The WELCOME (heartbeat interval, dead-after, session grant).
        welcome: Welcome,
    },
    /// The session was resumed on the new connection; `replayed` messages of ours are sent
    /// again because the server had not received them.
    Resumed {
        /// Messages replayed.
        replayed: u64,
    },
    /// The session could not be resumed (linger expired, server restarted, token refused):
    /// these sequence numbers of ours may not have been delivered. A new session starts.
    SessionLost {
        /// Sequence numbers sent but never acknowledged.
        unacked: Option<RangeInclusive<u64>>,
    },
    /// A message from the server.
    Message(Bytes),
    /// The connection ended (or a connection attempt failed).
    Disconnected {
        /// Why, and how long the server had been silent.
        disconnect: Disconnect,
    },
    /// Waiting `delay` before connection attempt number `attempt` (1-based).
    Reconnecting {
        /// Attempt number.
        attempt: u32,
        /// The jittered delay.
        delay: Duration,
    },
    /// The client stopped trying: a refusal that retrying cannot fix, or attempts exhausted.
    GaveUp {
        /// The last reason.
        reason: DisconnectReason,
    },
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server address.
    pub addr: std::net::SocketAddr,
    /// Connection options (client id, policy, frame limit, handshake timeout).
    pub connect: ConnectOptions,
    /// Reconnect backoff. Default: 100 ms base, 30 s cap, retry forever.
    pub backoff: BackoffConfig,
    /// Seed for the jitter. Default: from the OS's random source.
    pub seed: Option<u64>,
    /// Ask for a resumable session. Default: true (a server without sessions is used
    /// without one).
    pub session: bool,
    /// Replay bounds and ACK timing of the session. Default: `SessionConfig::default()`.
    pub session_config: SessionConfig,
    /// Messages waiting for a connection, in bytes, before `send` waits. Default: 1 MiB.
    pub outbox_bytes: usize,
}

impl ClientConfig {
    /// Defaults for connecting to `addr` as `client_id`.
    pub fn new(addr: std::net::SocketAddr, client_id: impl Into<String>) -> Self {
        ClientConfig {
            addr,
            connect: ConnectOptions::new(client_id),
            backoff: BackoffConfig::default(),
            seed: None,
            session: true,
            session_config: SessionConfig::default(),
            outbox_bytes: 1 << 20,
        }
    }
}

/// Why [`Client::send`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientSendError {
    /// The client stopped (gave up or was closed).
    #[error("client stopped: {0}")]
    Stopped(DisconnectReason),
}

/// A reconnecting client. Dropping it stops the client and closes the connection in order.
pub struct Client {
    events: mpsc::UnboundedReceiver<ClientEvent>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Starts connecting in the background.
    pub fn start(cfg: ClientConfig) -> Client {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Shared::persistent(Limits {
            outbox_bytes: cfg.outbox_bytes,
            inbox_bytes: usize::MAX,
        });
        let task = tokio::spawn(supervise(cfg, tx, shared.clone()));
        Client {
            events: rx,
            shared,
            task,
        }
    }

    /// The next event; `None` once the client stopped.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }

    /// Queues a message. It is sent on the current connection, or after the next (re)connect;
    /// with a session it is delivered exactly once unless [`ClientEvent::SessionLost`] names
    /// its sequence number. Waits while the outbox is full.
    pub async fn send(&self, msg: Bytes) -> Result<(), ClientSendError> {
        self.shared
            .send(msg)
            .await
            .map_err(|d| ClientSendError::Stopped(d.reason))
    }

    /// A cloneable handle for sending from other tasks.
    pub fn sender(&self) -> ClientSender {
        ClientSender {
            shared: self.shared.clone(),
        }
    }

    /// Messages queued and not yet handed to a connection.
    pub fn queued(&self) -> usize {
        self.shared.lock().outbox.len()
    }

    /// Closes the connection in order (after the queued messages went out) and stops.
    pub fn close(&self) {
        self.shared.close(CloseCode::NORMAL, "client closing");
        self.shared.finish(Disconnect {
            reason: DisconnectReason::LocalClose,
            silent_for: Duration::ZERO,
        });
    }

    /// Closes and waits (at most `wait`) until the connection has ended.
    pub async fn shutdown(mut self, wait: Duration) {
        self.close();
        let _ = tokio::time::timeout(wait, &mut self.task).await;
    }
}

/// The sending half of a [`Client`], for other tasks. Sending fails once the client stopped.
#[derive(Debug, Clone)]
pub struct ClientSender {
    shared: Arc<Shared>,
}

impl ClientSender {
    /// Like [`Client::send`].
    pub async fn send(&self, msg: Bytes) -> Result<(), ClientSendError> {
        self.shared
            .send(msg)
            .await
            .map_err(|d| ClientSendError::Stopped(d.reason))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

fn os_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}

fn retryable(reason: &DisconnectReason) -> bool {
    !matches!(
        reason,
        DisconnectReason::Refused {
            code: CloseCode::BAD_HELLO | CloseCode::UNSUPPORTED_VERSION,
            ..
        }
    )
}

/// Forwards a connection's events to the client's event channel.
struct ClientSink {
    tx: mpsc::UnboundedSender<ClientEvent>,
}

impl Sink for ClientSink {
    fn event(&mut self, _shared: &Shared, ev: ConnEvent) {
        let out = match ev {
            ConnEvent::Established(welcome) => ClientEvent::Connected { welcome },
            ConnEvent::Resumed { replayed } => ClientEvent::Resumed { replayed },
            ConnEvent::SessionLost { unacked } => ClientEvent::SessionLost { unacked },
            ConnEvent::Message(m) => ClientEvent::Message(m),
            ConnEvent::Closed(disconnect) => ClientEvent::Disconnected { disconnect },
            _ => return,
        };
        let _ = self.tx.send(out);
    }
}

fn stopped(shared: &Shared) -> bool {
    shared.done().is_some()
}

async fn supervise(cfg: ClientConfig, tx: mpsc::UnboundedSender<ClientEvent>, shared: Arc<Shared>) {
    let mut backoff = Backoff::new(cfg.backoff, cfg.seed.unwrap_or_else(os_seed));
    let mut session: Option<Session> = None;
    let opts = &cfg.connect;
    loop {
        if stopped(&shared) {
            return;
        }
        let attempt =
            tokio::time::timeout(opts.handshake_timeout, TcpStream::connect(cfg.addr)).await;
        let reason = match attempt {
            Ok(Ok(stream)) => {
                if let Err(e) = sockopt::apply(&stream, &opts.policy) {
                    tracing::debug!(error = %e, "cannot set socket options");
                }
                let now = tokio::time::Instant::now().into_std();
                let hello = Hello {
                    client_id: opts.client_id.clone(),
                    requested_heartbeat: opts.policy.heartbeat_interval,
                    want_session: cfg.session,
                    resume: None,
                    credential: None,
                };
                let conn_cfg = ConnConfig {
                    max_frame_len: opts.max_frame_len,
                    handshake_timeout: opts.handshake_timeout,
                    session: cfg.session_config,
                };
                let conn = Conn::client(
                    now,
                    conn_cfg,
                    &hello,
                    liveness_config(&opts.policy, false),
                    session.take(),
                );
                let ended = driver::drive(
                    stream,
                    Box::new(conn),
                    shared.clone(),
                    ClientSink { tx: tx.clone() },
                )
                .await;
                session = ended.session;
                if ended.established {
                    backoff.reset();
                }
                match ended.disconnect.reason {
                    // The old session is gone (SessionLost was reported): start a new one at once.
                    DisconnectReason::Refused {
                        code: CloseCode::SESSION_UNKNOWN,
                        ..
                    } => continue,
                    r => r,
                }
            }
            Ok(Err(e)) => {
                let reason = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => DisconnectReason::PeerReset,
                    _ => DisconnectReason::Io(e.to_string()),
                };
                let _ = tx.send(ClientEvent::Disconnected {
                    disconnect: Disconnect {
                        reason: reason.clone(),
                        silent_for: Duration::ZERO,
                    },
                });
                reason
            }
            Err(_) => {
                let reason = DisconnectReason::Io(format!(
                    "connect timed out after {:?}",
                    opts.handshake_timeout
                ));
                let _ = tx.send(ClientEvent::Disconnected {
                    disconnect: Disconnect {
                        reason: reason.clone(),
                        silent_for: Duration::ZERO,
                    },
                });
                reason
            }
        };
        if stopped(&shared) {
            return;
        }
        if !retryable(&reason) {
            shared.finish(Disconnect {
                reason: reason.clone(),
                silent_for: Duration::ZERO,
            });
            let _ = tx.send(ClientEvent::GaveUp { reason });
            return;
        }
        let Some(delay) = backoff.next_delay() else {
            shared.finish(Disconnect {
                reason: reason.clone(),
                silent_for: Duration::ZERO,
            });
            let _ = tx.send(ClientEvent::GaveUp { reason });
            return;
        };
        let _ = tx.send(ClientEvent::Reconnecting {
            attempt: backoff.attempt(),
            delay,
        });
        let done = shared.space.notified();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = done => if stopped(&shared) { return },
        }
    }
}
