//! [`Client`]: a tether client that reconnects on its own, with capped exponential backoff and
//! full jitter (the pure [`Backoff`](tether_proto::backoff::Backoff) from the core).
//!
//! ```text
//!   connect ──ok──▶ Connected ──recv loop──▶ Message* ──error──▶ Disconnected{reason}
//!      ▲                                                              │
//!      └──── sleep(delay) ◀── Reconnecting{attempt, delay} ◀──────────┘
//! ```
//!
//! A refusal that cannot change by retrying (`bad-hello`, `unsupported-version`) ends the
//! client with [`ClientEvent::GaveUp`]; `server-full` and every transport failure are retried.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tether_proto::backoff::{Backoff, BackoffConfig};
use tether_proto::codec::Welcome;
use tether_proto::{CloseCode, Disconnect, DisconnectReason};
use tokio::sync::{mpsc, watch};

use crate::connection::{ConnectError, ConnectOptions, Connection, Sender};

/// What a [`Client`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// Connected (again); the server's parameters.
    Connected {
        /// The WELCOME (heartbeat interval and dead-after in force).
        welcome: Welcome,
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
    pub addr: SocketAddr,
    /// Connection options (client id, policy, frame limit, handshake timeout).
    pub connect: ConnectOptions,
    /// Reconnect backoff. Default: 100 ms base, 30 s cap, retry forever.
    pub backoff: BackoffConfig,
    /// Seed for the jitter. Default: from the OS's random source.
    pub seed: Option<u64>,
}

impl ClientConfig {
    /// Defaults for connecting to `addr` as `client_id`.
    pub fn new(addr: SocketAddr, client_id: impl Into<String>) -> Self {
        ClientConfig {
            addr,
            connect: ConnectOptions::new(client_id),
            backoff: BackoffConfig::default(),
            seed: None,
        }
    }
}

/// Why [`Client::send`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientSendError {
    /// The client stopped (gave up or was dropped).
    #[error("client stopped")]
    Stopped,
    /// The connection ended while the message was queued; it may not have been delivered.
    #[error("connection ended: {0}")]
    Disconnected(DisconnectReason),
}

/// A reconnecting client. Dropping it stops the client and closes the connection.
pub struct Client {
    events: mpsc::UnboundedReceiver<ClientEvent>,
    current: watch::Receiver<Option<Sender>>,
    stop: Arc<tokio::sync::Notify>,
}

impl Client {
    /// Starts connecting in the background.
    pub fn start(cfg: ClientConfig) -> Client {
        let (tx, rx) = mpsc::unbounded_channel();
        let (cur_tx, cur_rx) = watch::channel(None);
        let stop = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(supervise(cfg, tx, cur_tx, stop.clone()));
        Client {
            events: rx,
            current: cur_rx,
            stop,
        }
    }

    /// The next event; `None` once the client stopped.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }

    /// True while connected.
    pub fn is_connected(&self) -> bool {
        self.current
            .borrow()
            .as_ref()
            .is_some_and(|s| s.disconnected().is_none())
    }

    /// Sends on the current connection, waiting for one if disconnected. Without a session
    /// (see the sessions feature) a message queued into a connection that then dies may be
    /// lost; the error says so when it is known.
    pub async fn send(&self, msg: Bytes) -> Result<(), ClientSendError> {
        let mut cur = self.current.clone();
        let sender = loop {
            if let Some(s) = cur.borrow_and_update().as_ref() {
                if s.disconnected().is_none() {
                    break s.clone();
                }
            }
            if cur.changed().await.is_err() {
                return Err(ClientSendError::Stopped);
            }
        };
        sender
            .send(msg)
            .await
            .map_err(|d| ClientSendError::Disconnected(d.reason))
    }

    /// Closes the connection in order and stops reconnecting.
    pub fn close(&self) {
        if let Some(s) = self.current.borrow().as_ref() {
            s.close(CloseCode::NORMAL, "client closing");
        }
        self.stop.notify_one();
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
        // No OS randomness: fall back to the address of a stack value mixed with the time.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ (&b as *const _ as u64);
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

async fn supervise(
    cfg: ClientConfig,
    tx: mpsc::UnboundedSender<ClientEvent>,
    current: watch::Sender<Option<Sender>>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut backoff = Backoff::new(cfg.backoff, cfg.seed.unwrap_or_else(os_seed));
    loop {
        let attempt = tokio::select! {
            r = Connection::connect_with(cfg.addr, &cfg.connect) => r,
            _ = stop.notified() => return,
        };
        let reason = match attempt {
            Ok(mut conn) => {
                backoff.reset();
                let _ = current.send(Some(conn.sender()));
                if tx
                    .send(ClientEvent::Connected {
                        welcome: conn.welcome().clone(),
                    })
                    .is_err()
                {
                    return;
                }
                let d = loop {
                    let r = tokio::select! {
                        r = conn.recv() => r,
                        _ = stop.notified() => {
                            conn.close(CloseCode::NORMAL, "client closing");
                            let _ = conn.closed().await;
                            return;
                        }
                    };
                    match r {
                        Ok(m) => {
                            if tx.send(ClientEvent::Message(m)).is_err() {
                                return;
                            }
                        }
                        Err(d) => break d,
                    }
                };
                let reason = d.reason.clone();
                let _ = tx.send(ClientEvent::Disconnected { disconnect: d });
                reason
            }
            Err(e) => {
                let reason = match e {
                    ConnectError::Refused { code, text } => {
                        DisconnectReason::Refused { code, text }
                    }
                    ConnectError::Handshake(r) => r,
                    ConnectError::Connect { source, .. } => match source.kind() {
                        std::io::ErrorKind::ConnectionRefused => DisconnectReason::PeerReset,
                        _ => DisconnectReason::Io(source.to_string()),
                    },
                    ConnectError::Timeout(t) => DisconnectReason::ProtocolError(format!(
                        "connect/handshake timed out after {t:?}"
                    )),
                    other => DisconnectReason::Io(other.to_string()),
                };
                let _ = tx.send(ClientEvent::Disconnected {
                    disconnect: Disconnect {
                        reason: reason.clone(),
                        silent_for: Duration::ZERO,
                    },
                });
                reason
            }
        };
        if !retryable(&reason) {
            let _ = tx.send(ClientEvent::GaveUp { reason });
            return;
        }
        let Some(delay) = backoff.next_delay() else {
            let _ = tx.send(ClientEvent::GaveUp { reason });
            return;
        };
        let _ = tx.send(ClientEvent::Reconnecting {
            attempt: backoff.attempt(),
            delay,
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.notified() => return,
        }
    }
}
