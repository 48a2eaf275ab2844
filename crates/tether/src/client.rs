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
//! Some ends are terminal and stop the client with [`ClientEvent::GaveUp`], which names what
//! may not have been delivered: a refusal that retrying cannot fix (`bad-hello`,
//! `unsupported-version`, `unauthorized`, `id-not-allowed`), and being *replaced* — a newer
//! connection with the same client id took over (`docs/PROTOCOL.md`: the newest connection
//! wins; a replaced client must not reconnect by itself, or two clients with one id would
//! replace each other forever). Everything else is retried with backoff (`throttled`
//! included).
//!
//! The transport is TCP to [`ClientConfig::addr`] by default; [`Client::start_with`] takes any
//! [`Connector`] (TLS, an in-memory stream in tests).

use std::future::Future;
use std::io;
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
use crate::credential::Credentials;
use crate::driver::{self, Limits, Shared, Sink};
use crate::sockopt;
use crate::tls::{ClientTlsStream, TlsClient};
use crate::transport::Transport;

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
    /// The server accepted the refreshed credential (sent on its own at 90 % of the ttl,
    /// fetched from [`ConnectOptions::credential`]); it now runs out in `ttl`
    /// (`Duration::ZERO`: it does not expire).
    CredentialRefreshed {
        /// The new credential's time to live.
        ttl: Duration,
    },
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
    /// The client stopped: it was replaced by a newer connection with the same id, refused
    /// for a reason retrying cannot fix, or out of attempts. Always the last event.
    GaveUp {
        /// The last reason.
        reason: DisconnectReason,
        /// Sequence numbers of the session sent but never acknowledged: they may not have
        /// been delivered (`None`: nothing outstanding, or no session).
        unacked: Option<RangeInclusive<u64>>,
        /// Messages given to `send` that were never sent: certainly not delivered.
        unsent: Vec<Bytes>,
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

/// How a [`Client`] opens its transport, once per connection attempt. Implemented for
/// closures returning a future of a [`Transport`], e.g. a TLS connector:
///
/// ```no_run
/// # async fn run() {
/// use tether::{Client, ClientConfig};
/// let cfg = ClientConfig::new("127.0.0.1:7300".parse().unwrap(), "phone-1");
/// let addr = cfg.addr;
/// let client = Client::start_with(cfg, move || tokio::net::TcpStream::connect(addr));
/// # }
/// ```
pub trait Connector: Send + 'static {
    /// The transport a connection runs over.
    type Io: Transport;
    /// Opens one transport.
    fn connect(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl<F, Fut, T> Connector for F
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<T>> + Send,
    T: Transport,
{
    type Io = T;
    fn connect(&mut self) -> impl Future<Output = io::Result<T>> + Send {
        self()
    }
}

/// The default connector: TCP to the configured address, with the policy's socket options.
struct Tcp {
    addr: std::net::SocketAddr,
    policy: tether_proto::Policy,
}

impl Connector for Tcp {
    type Io = TcpStream;
    async fn connect(&mut self) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(self.addr).await?;
        if let Err(e) = sockopt::apply(&stream, &self.policy) {
            tracing::debug!(error = %e, "cannot set socket options");
        }
        Ok(stream)
    }
}

/// TLS over [`Tcp`] (when [`ConnectOptions::tls`] is set).
struct Tls {
    tcp: Tcp,
    tls: TlsClient,
}

impl Connector for Tls {
    type Io = ClientTlsStream<TcpStream>;
    async fn connect(&mut self) -> io::Result<ClientTlsStream<TcpStream>> {
        let stream = self.tcp.connect().await?;
        let host = self.tcp.addr.ip().to_string();
        self.tls.connect(&host, stream).await.map_err(|e| {
            // Says it was TLS (a certificate not trusted, a name that does not match).
            io::Error::new(e.kind(), format!("tls handshake: {e}"))
        })
    }
}

impl Client {
    /// Starts connecting (TCP to `cfg.addr`) in the background.
    ///
    /// ```no_run
    /// use bytes::Bytes;
    /// use tether::{Client, ClientConfig, ClientEvent};
    ///
    /// # async fn run() {
    /// let mut client = Client::start(ClientConfig::new("127.0.0.1:7300".parse().unwrap(), "phone-1"));
    /// // Queued at once; sent right after the handshake, and again after a resume if needed.
    /// client.send(Bytes::from_static(b"hello")).await.unwrap();
    /// while let Some(ev) = client.next_event().await {
    ///     match ev {
    ///         ClientEvent::Message(m) => println!("got {m:?}"),
    ///         ClientEvent::GaveUp { reason, unacked, unsent } => {
    ///             eprintln!("stopped: {reason}; maybe lost: {unacked:?}, unsent: {}", unsent.len());
    ///         }
    ///         _ => {}
    ///     }
    /// }
    /// # }
    /// ```
    ///
    /// With [`ConnectOptions::tls`] set, each connection speaks TLS over that TCP.
    pub fn start(cfg: ClientConfig) -> Client {
        let tcp = Tcp {
            addr: cfg.addr,
            policy: cfg.connect.policy.clone(),
        };
        match cfg.connect.tls.clone() {
            Some(tls) => Client::start_with(cfg, Tls { tcp, tls }),
            None => Client::start_with(cfg, tcp),
        }
    }

    /// Starts connecting in the background, opening each connection with `connector`
    /// (`cfg.addr` is then only used in messages).
    pub fn start_with<C: Connector>(cfg: ClientConfig, connector: C) -> Client {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Shared::persistent(Limits {
            outbox_bytes: cfg.outbox_bytes,
            inbox_bytes: usize::MAX,
        });
        let task = tokio::spawn(supervise(cfg, connector, tx, shared.clone()));
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

/// Whether the client may try again after `reason`. Being replaced is terminal (the newest
/// connection with an id wins; reconnecting would take the id back and start a fight), and
/// so are refusals that cannot change by retrying.
fn retryable(reason: &DisconnectReason) -> bool {
    !matches!(
        reason,
        DisconnectReason::Replaced
            | DisconnectReason::Refused {
                code: CloseCode::BAD_HELLO
                    | CloseCode::UNSUPPORTED_VERSION
                    | CloseCode::UNAUTHORIZED
                    | CloseCode::ID_NOT_ALLOWED,
                ..
            }
    )
}

/// Forwards a connection's events to the client's event channel; fetches a new credential
/// when the state machine asks for one.
struct ClientSink {
    tx: mpsc::UnboundedSender<ClientEvent>,
    credentials: Option<Credentials>,
}

impl Sink for ClientSink {
    fn event(&mut self, shared: &Arc<Shared>, ev: ConnEvent) {
        let out = match ev {
            ConnEvent::RefreshCredential { .. } => {
                if let Some(c) = &self.credentials {
                    c.refresh_into(shared);
                }
                return;
            }
            ConnEvent::CredentialRefreshed { ttl } => ClientEvent::CredentialRefreshed { ttl },
            ConnEvent::Established(welcome) => ClientEvent::Connected { welcome },
            ConnEvent::Resumed { replayed } => ClientEvent::Resumed { replayed },
            ConnEvent::SessionLost { unacked } => ClientEvent::SessionLost { unacked },
            ConnEvent::Message { payload: m, .. } => ClientEvent::Message(m),
            ConnEvent::Closed(disconnect) => ClientEvent::Disconnected { disconnect },
            _ => return,
        };
        let _ = self.tx.send(out);
    }
}

fn stopped(shared: &Shared) -> bool {
    shared.done().is_some()
}

async fn supervise<C: Connector>(
    cfg: ClientConfig,
    mut connector: C,
    tx: mpsc::UnboundedSender<ClientEvent>,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::new(cfg.backoff, cfg.seed.unwrap_or_else(crate::random::u64));
    let mut session: Option<Session> = None;
    let opts = &cfg.connect;
    loop {
        if stopped(&shared) {
            return;
        }
        // A credential per attempt: a refreshed one after an expiry, a rotated token file.
        let credential = match &opts.credential {
            None => Ok(None),
            Some(c) => match tokio::time::timeout(opts.handshake_timeout, c.fetch()).await {
                Ok(Ok(c)) => Ok(Some(c)),
                Ok(Err(e)) => Err(format!("cannot get a credential: {e}")),
                Err(_) => Err("the credential source did not answer in time".to_owned()),
            },
        };
        let attempt = match credential {
            Ok(credential) => Ok((
                tokio::time::timeout(opts.handshake_timeout, connector.connect()).await,
                credential,
            )),
            Err(why) => Err(why),
        };
        let reason = match attempt {
            Err(why) => {
                let reason = DisconnectReason::Io(why);
                let _ = tx.send(ClientEvent::Disconnected {
                    disconnect: Disconnect {
                        reason: reason.clone(),
                        silent_for: Duration::ZERO,
                    },
                });
                reason
            }
            Ok((Ok(Ok(io)), credential)) => {
                let now = driver::now();
                let hello = Hello {
                    client_id: opts.client_id.clone(),
                    requested_heartbeat: opts.policy.heartbeat_interval,
                    want_session: cfg.session,
                    resume: None,
                    credential,
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
                    io,
                    conn,
                    shared.clone(),
                    ClientSink {
                        tx: tx.clone(),
                        credentials: opts.credential.clone(),
                    },
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
            Ok((Ok(Err(e)), _)) => {
                let reason = DisconnectReason::from_io_error(&e);
                let _ = tx.send(ClientEvent::Disconnected {
                    disconnect: Disconnect {
                        reason: reason.clone(),
                        silent_for: Duration::ZERO,
                    },
                });
                reason
            }
            Ok((Err(_), _)) => {
                let reason = DisconnectReason::Io(format!(
                    "connect timed out after {}",
                    tether_proto::duration::Human::ms(opts.handshake_timeout)
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
        let delay = if retryable(&reason) {
            backoff.next_delay()
        } else {
            None
        };
        let Some(delay) = delay else {
            give_up(&shared, &tx, reason, session.take());
            return;
        };
        let _ = tx.send(ClientEvent::Reconnecting {
            attempt: backoff.attempt(),
            delay,
        });
        let watch = shared.watch();
        let done = watch.notified();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = done => if stopped(&shared) { return },
        }
    }
}

/// The client stops for good: senders fail from now on, and the application learns what may
/// not have been delivered.
fn give_up(
    shared: &Shared,
    tx: &mpsc::UnboundedSender<ClientEvent>,
    reason: DisconnectReason,
    session: Option<Session>,
) {
    shared.finish(Disconnect {
        reason: reason.clone(),
        silent_for: Duration::ZERO,
    });
    let _ = tx.send(ClientEvent::GaveUp {
        reason,
        unacked: session.and_then(|s| s.unacked_range()),
        unsent: shared.take_outbox(),
    });
}
